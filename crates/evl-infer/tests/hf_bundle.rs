//! A checkpoint used the way `interpret` uses it: folder -> bundle, PNG -> pixels, question
//! -> prompt, greedy answer -> text. Against transformers' own answer stored with each case of
//! `../shared/hf` (12 greedy tokens of the random tiny models, decoded without special tokens).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use evl_infer::hf::HfBundle;

#[test]
fn answers_equal_transformers_generate_from_the_users_path() {
    let Some(shared) = evl_testkit::shared_dir() else {
        return;
    };
    let image = shared.join("data/ptbxl_subset/records100/00000/00004_lr-0.png");
    let device = evl_models::device::Device::flex();
    let mut checked = 0;
    for case in ["qwen3_vl_tiny", "llava_next_tiny"] {
        let dir = shared.join("hf").join(case);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let want = meta["generated_text"].as_str().unwrap();
        let b = HfBundle::load(&dir, &device).unwrap();
        let img = b.prepare_path(&image).unwrap();
        assert_eq!(
            b.image_tokens(&img).unwrap() as u64,
            meta["image_tokens"].as_u64().unwrap()
        );
        let got = b
            .answer(
                &img,
                "What are the main features in this ECG image?",
                12,
                &device,
            )
            .unwrap();
        assert_eq!(got, want.trim(), "{case}");
        checked += 1;
    }
    assert_eq!(checked, 2);
}
