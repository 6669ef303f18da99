//! The paper's setting at tiny size: a LLaVA-NeXT teacher (`../shared/hf/llava_next_tiny`,
//! the real LLaMA-2 tokenizer) distilled into a Qwen3-VL student (`qwen3_vl_tiny`, the real
//! Qwen3 tokenizer) on ECGInstruct-style conversations over real PTB-XL images, with every
//! method; SFT of the student; the trained student written back in its checkpoint layout.
//!
//! The conversations are built here from PTB-XL's header labels (the images and labels are
//! real; the questions are ours). The checkpoints are randomly initialised: this checks that
//! every method trains the real architectures end to end, not what they learn.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use evl_infer::hf::{HfBundle, HfExample};
use evl_kd::Method;
use evl_models::device::Device;
use evl_models::hf::{HfBatch, HfModel};
use evl_models::vlm::Distillable;
use evl_train::hf::{HfTeacher, encode_examples, hf_distill, hf_sft, hf_teacher_cache};
use evl_train::train::{DistillConfig, OptimConfig};

/// burn's seeded generator is one per device, shared by the tests of this binary: runs that
/// must draw the same initialisation take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn shared() -> Option<PathBuf> {
    evl_testkit::shared_dir()
}

/// Four real PTB-XL images with two questions each, answered from their header labels.
fn examples(shared: &Path) -> Vec<HfExample> {
    let root = shared.join("data/ptbxl_subset");
    let mut rd = csv::Reader::from_path(root.join("labels_from_headers.csv")).unwrap();
    let mut out = Vec::new();
    for row in rd.deserialize::<std::collections::HashMap<String, String>>() {
        let row = row.unwrap();
        let image = root.join(format!("{}-0.png", row["filename_lr"]));
        if !image.is_file() {
            continue;
        }
        let labels = row["superdiagnostic"].replace(',', ", ");
        let normal = if row["superdiagnostic"] == "NORM" {
            "yes"
        } else {
            "no"
        };
        out.push(HfExample {
            id: row["ecg_id"].clone(),
            image,
            turns: vec![
                (
                    "Which diagnostic superclasses does this ECG show?".into(),
                    format!("{labels}."),
                ),
                ("Is this ECG normal?".into(), normal.into()),
            ],
        });
        if out.len() == 4 {
            break;
        }
    }
    assert_eq!(out.len(), 4, "PTB-XL images under {}", root.display());
    out
}

fn generic_view<M: Distillable>(m: &M, b: M::Batch<'_>) -> evl_models::vlm::DistillView {
    m.distill_view(b).unwrap()
}

fn first_values(m: &HfModel, name: &str) -> Vec<f32> {
    m.export()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.data)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

fn optim(steps: usize) -> OptimConfig {
    OptimConfig {
        steps,
        batch_size: 2,
        lr: 1e-3,
        warmup: 0,
        ..OptimConfig::default()
    }
}

#[test]
fn llava_next_teacher_distils_into_qwen3_vl_with_every_method() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(shared) = shared() else { return };
    let infer = Device::flex();
    let train = infer.clone().autodiff();
    let teacher = HfBundle::load(&shared.join("hf/llava_next_tiny"), &infer).unwrap();
    let student = HfBundle::load(&shared.join("hf/qwen3_vl_tiny"), &train).unwrap();
    let ex = examples(&shared);
    let t_enc = encode_examples(&teacher, &ex).unwrap();
    let s_enc = encode_examples(&student, &ex).unwrap();
    // Both tokenizers encode the same answers; the teacher's anyres image is far longer.
    assert!(t_enc.image_tokens[0] > 10 * s_enc.image_tokens[0]);
    let cache = hf_teacher_cache(&teacher.model, &t_enc, None, None, &infer).unwrap();
    assert_eq!(cache.outs.len(), 4);
    // Answers as each tokenizer writes them, end of turn included.
    for (b, enc, end) in [(&student, &s_enc, "<|im_end|>"), (&teacher, &t_enc, "</s>")] {
        let t = &enc.turns[0][0];
        let ids: Vec<u32> = t
            .ids
            .iter()
            .zip(&t.answer)
            .filter(|(_, m)| **m)
            .map(|(&i, _)| i as u32)
            .collect();
        let text = b.prompter.tokenizer.decode(&ids, false).unwrap();
        assert_eq!(text.trim(), format!("{}{end}", ex[0].turns[0].1));
    }
    // The cached answer logits are the teacher's next-token logits before each answer token.
    let (i, k) = (1, 1);
    let turn = &t_enc.turns[i][k];
    let full = teacher
        .model
        .logits(
            std::slice::from_ref(&turn.ids),
            &[Some(t_enc.images[i].to_model(&infer))],
        )
        .unwrap();
    let v = cache.vocab;
    let full: Vec<f32> = full.into_data().iter::<f32>().collect();
    let got = &cache.outs[i][k].answer_logits;
    let answer_at: Vec<usize> = (0..turn.ids.len()).filter(|&j| turn.answer[j]).collect();
    assert_eq!(got.len(), answer_at.len() * v);
    for (q, &j) in answer_at.iter().enumerate() {
        let want = &full[(j - 1) * v..j * v];
        let diff = got[q * v..(q + 1) * v]
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "answer token {q}: {diff}");
    }
    let (s_vocab, t_vocab) = (student.vocab_strings(), teacher.vocab_strings());
    let probe = "model.language_model.layers.0.mlp.down_proj.weight";
    let before = first_values(&student.model, probe);
    for name in Method::NAMES {
        let method = Method::parse(name, &[]).unwrap();
        let cfg = DistillConfig::paper(method, optim(2));
        let (dm, logs) = hf_distill(
            student.model.clone(),
            &s_enc,
            &s_vocab,
            &t_vocab,
            HfTeacher::Cached(&cache),
            &cfg,
            None,
            &train,
            |_| {},
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(logs.len(), 2, "{name}");
        for l in &logs {
            assert!(l.total.is_finite() && l.ce.is_finite(), "{name}: {l:?}");
            for (k, v) in &l.terms {
                assert!(v.is_finite(), "{name}: term {k} = {v}");
            }
        }
        if name != "ce" {
            assert!(!logs[0].terms.is_empty(), "{name} logged no KD term");
            assert!(
                logs.iter()
                    .any(|l| l.terms.iter().any(|(_, v)| v.abs() > 0.0)),
                "{name}: every KD term is 0: {logs:?}"
            );
        }
        let after = first_values(&dm.student, probe);
        assert_ne!(before, after, "{name} did not move the student");
    }
}

#[test]
fn online_teacher_equals_the_cache_and_layers_are_selectable() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(shared) = shared() else { return };
    let infer = Device::flex();
    let train = infer.clone().autodiff();
    let teacher = HfBundle::load(&shared.join("hf/llava_next_tiny"), &infer).unwrap();
    let student = HfBundle::load(&shared.join("hf/qwen3_vl_tiny"), &train).unwrap();
    let ex = examples(&shared)[..2].to_vec();
    let t_enc = encode_examples(&teacher, &ex).unwrap();
    let s_enc = encode_examples(&student, &ex).unwrap();
    // Through the trait both families implement: the teacher's visual tokens are its
    // anyres tokens, the same number for both examples' same-sized pages (no mask).
    let images: Vec<_> = (0..2)
        .map(|i| Some(t_enc.images[i].to_model(&infer)))
        .collect();
    let ids: Vec<Vec<i64>> = (0..2).map(|i| t_enc.turns[i][0].ids.clone()).collect();
    let v = generic_view(
        &teacher.model,
        HfBatch {
            ids: &ids,
            images: &images,
            layer: None,
        },
    );
    assert_eq!(v.visual.dims()[1], t_enc.image_tokens[0]);
    assert!(v.visual_mask.is_none());
    let cache = hf_teacher_cache(&teacher.model, &t_enc, None, Some(1), &infer).unwrap();
    let last = hf_teacher_cache(&teacher.model, &t_enc, None, None, &infer).unwrap();
    assert_ne!(
        cache.outs[0][0].hidden, last.outs[0][0].hidden,
        "layer 1 read the final states"
    );
    let (s_vocab, t_vocab) = (student.vocab_strings(), teacher.vocab_strings());
    let cfg = DistillConfig {
        teacher_layer: Some(1),
        student_layer: Some(1),
        ..DistillConfig::paper(Method::evl(), optim(1))
    };
    let run = |t: HfTeacher<'_>| {
        hf_distill(
            student.model.clone(),
            &s_enc,
            &s_vocab,
            &t_vocab,
            t,
            &cfg,
            None,
            &train,
            |_| {},
        )
        .unwrap()
        .1
    };
    let a = run(HfTeacher::Cached(&cache));
    let b = run(HfTeacher::Online {
        model: &teacher.model,
        enc: &t_enc,
        device: &infer,
    });
    // The online cache's hidden-state RMS is over the batch's examples, the offline one's
    // over all: equal up to rounding here.
    assert!(
        (a[0].total - b[0].total).abs() < 1e-5 * a[0].total.abs(),
        "{a:?} {b:?}"
    );
}

#[test]
fn sft_trains_the_student_and_it_is_written_back_in_its_layout() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(shared) = shared() else { return };
    let infer = Device::flex();
    let train = infer.clone().autodiff();
    let student = HfBundle::load(&shared.join("hf/qwen3_vl_tiny"), &train).unwrap();
    let ex = examples(&shared);
    let enc = encode_examples(&student, &ex).unwrap();
    let mut cfg = optim(6);
    cfg.lr = 3e-3;
    cfg.batch_size = 4;
    let (model, logs) = hf_sft(student.model.clone(), &enc, &cfg, None, &train, |_| {}).unwrap();
    assert!(logs.iter().all(|l| l.total.is_finite()));
    assert!(
        logs.last().unwrap().total < logs[0].total,
        "SFT did not lower the answer CE: {logs:?}"
    );
    let out = tempfile::tempdir().unwrap();
    student.save(&model, out.path()).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.path().join(f).is_file(), "{f} not written");
    }
    assert!(!out.path().join("case.json").exists());
    // Reloaded as a user would: the same tensors, rounded to the checkpoint's bf16.
    let back = HfBundle::load(out.path(), &infer).unwrap();
    let bf16 = |x: f32| {
        let b = x.to_bits();
        let r = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
        f32::from_bits(r)
    };
    let (saved, trained) = (back.model.export(), model.export());
    assert_eq!(saved.len(), trained.len());
    for ((n1, a), (n2, b)) in saved.iter().zip(&trained) {
        assert_eq!(n1, n2);
        let want: Vec<f32> = b.data.iter().map(|&x| bf16(x)).collect();
        assert_eq!(a.data, want, "{n1}");
    }
    // Writing over the source checkpoint is refused.
    assert!(
        student
            .save(&model, &shared.join("hf/qwen3_vl_tiny"))
            .is_err()
    );
}
