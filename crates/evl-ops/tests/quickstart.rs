//! The quickstart end to end at its tiny preset: every stage runs, and what it writes reads
//! back through the run-directory types (`evl-run`).

use burn::tensor::Device;
use evl_ops::quickstart::{Preset, QuickstartConfig};

#[test]
fn tiny_quickstart_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let mut cfg = QuickstartConfig::preset(Preset::Tiny);
    // A two-point search of lm on the validation records.
    cfg.search_lambda_mhca = vec![0.1, 1.0];
    let r = evl_ops::quickstart::run(
        dir.path(),
        &cfg,
        None,
        &device.clone().autodiff(),
        &device,
        |_| {},
    )
    .unwrap();
    assert!(r.teacher.params >= 10 * r.student.params);
    assert!(r.teacher.visual_tokens >= 4 * r.student.visual_tokens);
    assert_ne!(r.teacher.vocab, r.student.vocab);
    assert_ne!(r.teacher.d_model, r.student.d_model);
    assert!(r.teacher.mean_text_tokens < r.student.mean_text_tokens);
    assert_eq!(
        r.length_differs.0, r.length_differs.1,
        "L_t must differ from L_s on every turn"
    );
    assert_eq!(
        r.runs.len(),
        cfg.seeds.len() * (cfg.methods.len() + cfg.ablations.len())
    );
    // The search: every point tried and recorded, the best validation AUC chosen (the first
    // of equals), and the EVL-ECG runs use it (a weight other than the paper's is listed as
    // a deviation).
    assert_eq!(r.search.len(), 2);
    let score = |t: &evl_run::SearchTrial| t.val_macro_auc.unwrap_or(f64::NEG_INFINITY);
    let chosen: Vec<_> = r.search.iter().filter(|t| t.chosen).collect();
    assert_eq!(chosen.len(), 1);
    assert!(r.search.iter().all(|t| score(t) <= score(chosen[0])));
    assert!(r.search.iter().all(|t| t.n_val > 0 && t.lambda_ot == 0.1));
    let deviates = r
        .notes
        .iter()
        .any(|n| n.contains("lambdas (mhca, rel, ot) = (0.1,"));
    assert_eq!(deviates, chosen[0].lambda_mhca == 0.1, "{:?}", r.notes);
    let report = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(report.contains("chosen on validation"));
    assert!(
        report.contains("Methods compared")
            && report.contains("Loss ablation")
            && report.contains("ms/step")
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap())
            .unwrap();
    assert!(v["runs"][0]["synthetic"]["parity_f1"].is_number());
    // Predictions are in PULSE's format: the parity scorer reads them.
    let preds =
        evl_eval::ecgbench::read_predictions(&dir.path().join("predictions/evl-seed0.jsonl"))
            .unwrap();
    assert_eq!(preds.len(), r.runs[0].synthetic.n);
}
