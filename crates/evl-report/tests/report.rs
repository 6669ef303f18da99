//! Reports built from the small run directories in `tests/fixtures/` (hand-made in the
//! `evl-run` schema: a quickstart-like run and an `eval --out` run), and the errors a
//! malformed run file gives.

use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A writable copy of a fixture run directory.
fn copy_of(name: &str) -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("list") {
            let e = e.expect("entry");
            let p = e.path();
            if p.is_dir() {
                copy(&p, &to.join(e.file_name()));
            } else {
                std::fs::copy(&p, to.join(e.file_name())).expect("copy");
            }
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    copy(&fixture(name), dir.path());
    dir
}

#[test]
fn quickstart_run_gives_every_section() {
    let out = tempfile::tempdir().expect("temp dir");
    let w = evl_report::write_report(&fixture("quickstart-run"), Some(out.path())).expect("report");
    let html = std::fs::read_to_string(&w.html).expect("html");
    for part in [
        "evl-ecg quickstart report",
        "<td>evl</td>",
        "Training curves",
        "Per-class curves and calibration (evl-seed0)",
        "Sinkhorn plan, record rec00",
        "eps 0.1, 100 iterations",
        "eff. rank 3.2 of 8",
    ] {
        assert!(html.contains(part), "missing `{part}`");
    }
    let names: Vec<String> = w
        .figures
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    for f in [
        "curve-total.svg",
        "curve-ce.svg",
        "curve-ot.svg",
        "curve-mhca.svg",
        "roc.svg",
        "pr.svg",
        "reliability.svg",
        "transport-plan.svg",
        "spectra.svg",
    ] {
        assert!(names.iter().any(|n| n == f), "figure {f} not in {names:?}");
    }
    // The fixture has no records under data/: the ECG panel is skipped, and says why.
    assert_eq!(w.skipped.len(), 1, "{:?}", w.skipped);
    assert!(
        w.skipped[0].contains("record `rec00` not found"),
        "{:?}",
        w.skipped
    );
}

#[test]
fn eval_run_gives_its_tables_and_robustness() {
    let out = tempfile::tempdir().expect("temp dir");
    let w = evl_report::write_report(&fixture("eval-run"), Some(out.path())).expect("report");
    let html = std::fs::read_to_string(&w.html).expect("html");
    for part in [
        "evl-ecg evaluation report",
        "8 records (test split)",
        "<td>macro ROC AUC</td><td>0.930</td>",
        "Robustness",
        "<td>noise:0.05</td>",
        "-0.060 .. 0.000",
        "Per-class curves and calibration (predictions)",
    ] {
        assert!(html.contains(part), "missing `{part}`");
    }
    assert!(w.skipped.iter().any(|s| s.contains("training curves")));
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

#[test]
fn a_renamed_field_is_an_error_naming_the_file_and_line() {
    let run = copy_of("quickstart-run");
    let log = run.path().join("runs/evl-seed0/metrics.jsonl");
    edit(&log, "\"total\"", "\"loss\"");
    let e = evl_report::write_report(run.path(), None).expect_err("renamed field");
    let msg = e.to_string();
    assert!(msg.contains("evl-seed0/metrics.jsonl:1"), "{msg}");
    assert!(msg.contains("loss"), "{msg}");
}

#[test]
fn a_file_of_another_schema_version_is_refused() {
    let run = copy_of("quickstart-run");
    edit(
        &run.path().join("analysis.json"),
        "\"schema_version\": 1",
        "\"schema_version\": 7",
    );
    let e = evl_report::write_report(run.path(), None).expect_err("version 7");
    let msg = e.to_string();
    assert!(msg.contains("analysis.json"), "{msg}");
    assert!(msg.contains("schema version 7"), "{msg}");
}

#[test]
fn a_broken_prediction_or_results_file_is_an_error_not_a_gap() {
    let run = copy_of("eval-run");
    edit(&run.path().join("predictions.jsonl"), "\"probs\"", "\"p\"");
    let e = evl_report::write_report(run.path(), None).expect_err("no probs");
    assert!(e.to_string().contains("predictions.jsonl:1"), "{e}");

    let run = copy_of("quickstart-run");
    edit(&run.path().join("results.json"), "\"space\"", "\"labels\"");
    let e = evl_report::write_report(run.path(), None).expect_err("no space");
    let msg = e.to_string();
    assert!(
        msg.contains("results.json") && msg.contains("space"),
        "{msg}"
    );
}

#[test]
fn a_directory_that_is_no_run_says_what_was_looked_for() {
    let dir = tempfile::tempdir().expect("temp dir");
    let e = evl_report::write_report(dir.path(), None).expect_err("empty");
    assert!(e.to_string().contains("neither results.json"), "{e}");
}
