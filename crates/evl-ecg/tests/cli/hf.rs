//! The paper's real architectures through the binary: `train student --init` (SFT from a
//! Qwen3-VL checkpoint), `distill` between a LLaVA-NeXT teacher checkpoint and that student,
//! `interpret` of the result, resume, and the errors a user meets first.

use super::*;

/// ECGInstruct-style conversations (LLaVA format) over three real PTB-XL images; the
/// answers are the records' header labels.
fn conversations(dir: &std::path::Path) -> PathBuf {
    let items: Vec<serde_json::Value> = [("00001_lr", "NORM"), ("00002_lr", "NORM"), ("00030_lr", "HYP")]
        .iter()
        .map(|(rec, label)| {
            serde_json::json!({
                "id": rec,
                "image": format!("records100/00000/{rec}-0.png"),
                "conversations": [
                    {"from": "human", "value": "<image>\nWhich diagnostic superclasses does this ECG show?"},
                    {"from": "gpt", "value": format!("{label}.")}
                ]
            })
        })
        .collect();
    let p = dir.join("conv.json");
    std::fs::write(&p, serde_json::to_string(&items).unwrap()).unwrap();
    p
}

#[test]
fn real_checkpoints_sft_distil_interpret_and_resume() {
    let Some(shared) = evl_testkit::shared_dir() else {
        return;
    };
    let (hf, images) = (shared.join("hf"), shared.join("data/ptbxl_subset"));
    let tmp = tempfile::tempdir().unwrap();
    let conv = conversations(tmp.path());
    // SFT of the Qwen3-VL student from its checkpoint.
    let sft = tmp.path().join("sft");
    let (ok, _, err) = run(bin()
        .args(["train", "student", "--init"])
        .arg(hf.join("qwen3_vl_tiny"))
        .arg("--data")
        .arg(&conv)
        .arg("--image-root")
        .arg(&images)
        .args(["--steps", "2", "--batch-size", "2", "--out"])
        .arg(&sft));
    assert!(ok, "{err}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        assert!(sft.join("model").join(f).is_file(), "sft model lacks {f}");
    }
    // Distillation from the LLaVA-NeXT teacher, stopped after one step and resumed.
    let out = tmp.path().join("evl");
    let distill = |extra: &[&str]| {
        run(bin()
            .args(["--json", "distill", "--method", "evl", "--teacher"])
            .arg(hf.join("llava_next_tiny"))
            .arg("--student")
            .arg(sft.join("model"))
            .arg("--data")
            .arg(&conv)
            .arg("--image-root")
            .arg(&images)
            .args([
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--set",
                "distill.teacher_layer=-2",
                "--out",
            ])
            .arg(&out)
            .args(extra))
    };
    let (ok, _, err) = distill(&["--stop-after", "1"]);
    assert!(ok, "{err}");
    assert!(!out.join("model").exists(), "a stopped run wrote its model");
    let (ok, stdout, err) = distill(&["--resume"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["data"]["steps"], 2);
    let terms = summary["data"]["final_log"]["terms"].as_array().unwrap();
    assert_eq!(terms.len(), 3, "mhca, rel, ot: {terms:?}");
    // The distilled student answers about a record (rendered) and an image.
    let (ok, stdout, err) = run(bin()
        .args(["--json", "interpret", "--model"])
        .arg(out.join("model"))
        .arg(images.join("records100/00000/00001_lr"))
        .arg(images.join("records100/00000/00002_lr-0.png")));
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let p = l["data"]["probabilities"].as_array().unwrap();
        assert_eq!(p.len(), 5);
        assert!(
            p.iter()
                .all(|x| (0.0..=1.0).contains(&x[1].as_f64().unwrap()))
        );
    }
    // eval scores it on labelled records (rendered), writing predictions as for any model.
    let ev = tmp.path().join("eval");
    let (ok, _, err) = run(bin()
        .args(["eval", "--model"])
        .arg(out.join("model"))
        .arg("--data")
        .arg(&images)
        .args([
            "--split",
            "all",
            "--limit",
            "3",
            "--resamples",
            "20",
            "--out",
        ])
        .arg(&ev));
    assert!(ok, "{err}");
    let preds = std::fs::read_to_string(ev.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 3);
    // A checkpoint and a bundle cannot be mixed; a depth beyond the model is named.
    let (ok, _, err) = run(bin()
        .args(["distill", "--teacher"])
        .arg(hf.join("llava_next_tiny"))
        .arg("--student")
        .arg(tmp.path())
        .arg("--data")
        .arg(&conv)
        .arg("--image-root")
        .arg(&images)
        .arg("--out")
        .arg(tmp.path().join("mixed")));
    assert!(!ok && err.contains("Hugging Face checkpoint"), "{err}");
    let (ok, _, err) = run(bin()
        .args(["distill", "--teacher"])
        .arg(hf.join("llava_next_tiny"))
        .arg("--student")
        .arg(hf.join("qwen3_vl_tiny"))
        .arg("--data")
        .arg(&conv)
        .arg("--image-root")
        .arg(&images)
        .args(["--set", "distill.student_layer=40", "--out"])
        .arg(tmp.path().join("deep")));
    assert!(!ok && err.contains("distill.student_layer"), "{err}");
    // Labelled records without images are refused with what to pass instead.
    let (ok, _, err) = run(bin()
        .args(["train", "student", "--init"])
        .arg(hf.join("qwen3_vl_tiny"))
        .arg("--data")
        .arg(&images)
        .arg("--out")
        .arg(tmp.path().join("nolabels")));
    assert!(!ok && err.contains("--image-root"), "{err}");
}

#[test]
fn plan_sizes_the_papers_models_from_their_configs() {
    let root = evl_testkit::workspace_root().join("docs/configs");
    let (ok, stdout, err) = run(bin()
        .args(["--json", "plan", "--teacher"])
        .arg(root.join("pulse-7b"))
        .arg("--student")
        .arg(root.join("qwen3-vl-2b-instruct")));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let p = &v["data"]["plan"];
    let params = |m: &str| p[m]["params"]["total"].as_f64().unwrap() / 1e9;
    // LLaVA-v1.6-Vicuna-7B with its CLIP tower; Qwen3-VL-2B with tied embeddings.
    assert!((7.0..7.1).contains(&params("teacher")), "{p}");
    assert!((2.1..2.2).contains(&params("student")), "{p}");
    assert_eq!(p["teacher"]["visual_tokens"], 2438);
    assert_eq!(p["teacher_weights"], 0, "cached teacher by default");
    let (ok, _, err) = run(bin()
        .args(["plan", "--image", "2200", "--teacher"])
        .arg(root.join("pulse-7b"))
        .arg("--student")
        .arg(root.join("qwen3-vl-2b-instruct")));
    assert!(!ok && err.contains("WIDTHxHEIGHT"), "{err}");
}
