//! ECG-Bench parity: our scorer against values the published PULSE script computed on the
//! same files (tests/parity/make_parity.py), to 1e-12, NaN where it gives NaN.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

use evl_eval::ecgbench::{Task, read_gold, read_predictions, score};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12
}

#[test]
fn every_task_matches_the_published_script() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tasks = expected["tasks"].as_object().unwrap();
    assert_eq!(tasks.len(), 8);
    for (name, exp) in tasks {
        let task = Task::parse(name.trim_end_matches("_nan")).unwrap();
        let case = dir.join("cases").join(name);
        let gold = read_gold(&case.join("gold.json")).unwrap();
        let pred_path = case.join("pred.jsonl");
        let preds = read_predictions(&pred_path).unwrap();
        let s = score(task, &preds, &gold, false, &pred_path).unwrap();
        if let Some(acc) = exp.get("accuracy") {
            assert!(
                close(s.accuracy.unwrap(), acc.as_f64().unwrap()),
                "{name}: accuracy {:?} vs {acc}",
                s.accuracy
            );
        } else {
            assert!(
                close(s.f1.unwrap(), exp["f1"].as_f64().unwrap()),
                "{name}: f1 {:?} vs {}",
                s.f1,
                exp["f1"]
            );
            assert!(
                close(s.hamming_loss.unwrap(), exp["hl"].as_f64().unwrap()),
                "{name}: hl"
            );
            match exp["auc"].as_f64() {
                Some(a) => assert!(
                    close(s.auc_binary.unwrap(), a),
                    "{name}: auc {:?} vs {a}",
                    s.auc_binary
                ),
                None => assert!(s.auc_binary.is_none(), "{name}: the script gives NaN"),
            }
        }
        if matches!(task, Task::Csn | Task::G12 | Task::Mmmu) {
            assert!(
                s.random_fallbacks > 10,
                "{name}: the case must exercise the random fallback"
            );
            // Strict mode counts them wrong instead: never higher than the parity accuracy
            // by more than the fallbacks' lucky draws.
            let strict = score(task, &preds, &gold, true, &pred_path).unwrap();
            assert_eq!(strict.random_fallbacks, 0);
            assert!(strict.accuracy.unwrap() <= s.accuracy.unwrap());
        }
    }
}
