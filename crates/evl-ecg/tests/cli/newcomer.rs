//! What a new user trips over first (issue 19): each mistake gets an error that says what is
//! wrong and what to do, and the documented commands run as documented.

use crate::{bin, run};

#[test]
fn r19_print_config_needs_no_data_or_out_and_shows_every_loss_setting() {
    let (ok, stdout, err) = run(bin().args(["train", "teacher", "--print-config"]));
    assert!(ok, "{err}");
    for key in [
        "[distill.sinkhorn]",
        "eps = 0.1",
        "iterations = 100",
        "kernel = \"auto\"",
        "lambda_rel = 0.03",
    ] {
        assert!(stdout.contains(key), "missing `{key}` in\n{stdout}");
    }
    // Flags and --set land in the printed, resolved configuration.
    let (ok, stdout, err) = run(bin().args([
        "distill",
        "--print-config",
        "--kernel",
        "graph",
        "--eps",
        "0.05",
        "--sinkhorn-tol",
        "1e-6",
        "--set",
        "distill.sinkhorn.max_iter=500",
        "--lambda-rel",
        "0.1",
    ]));
    assert!(ok, "{err}");
    for key in [
        "kernel = \"graph\"",
        "eps = 0.05",
        "tolerance = 0.000001",
        "max_iter = 500",
        "lambda_rel = 0.1",
    ] {
        assert!(stdout.contains(key), "missing `{key}` in\n{stdout}");
    }
    // Without --print-config the paths are required, and clap says which.
    let (ok, _, err) = run(bin().args(["train", "teacher"]));
    assert!(
        !ok && err.contains("--data") && err.contains("--out"),
        "{err}"
    );
}

#[test]
fn r19_an_unknown_set_key_is_named() {
    let (ok, _, err) = run(bin().args([
        "distill",
        "--print-config",
        "--set",
        "distill.sinkhorn.epsilon=0.2",
    ]));
    assert!(!ok && err.contains("distill.sinkhorn.epsilon=0.2"), "{err}");
    assert!(err.contains("epsilon"), "{err}");
}

#[test]
fn r19_lr_is_the_learning_rate_and_says_so() {
    let (ok, stdout, _) = run(bin().args(["distill", "--help"]));
    assert!(ok);
    assert!(stdout.contains("--lambda-rel"), "{stdout}");
    let lr = stdout
        .split("--lr <LR>")
        .nth(1)
        .expect("--lr is documented");
    assert!(lr[..300.min(lr.len())].contains("--lambda-rel"), "{lr}");
}

#[test]
fn r19_an_image_given_to_data_inspect_is_named_as_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("ecg.png");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n").unwrap();
    let (ok, _, err) = run(bin().args(["data", "inspect"]).arg(&png));
    assert!(!ok, "{err}");
    assert!(err.contains("ecg.png is an image"), "{err}");
    assert!(!err.contains(".png.hea"), "{err}");
}

#[test]
fn r19_a_training_run_given_as_teacher_names_its_model_folder_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("runs/teacher");
    std::fs::create_dir_all(run_dir.join("model")).unwrap();
    std::fs::write(run_dir.join("model/config.json"), "{}").unwrap();
    let out = tmp.path().join("runs/evl");
    let (ok, _, err) = run(bin()
        .args(["distill", "--teacher"])
        .arg(&run_dir)
        .arg("--student")
        .arg(&run_dir)
        .arg("--data")
        .arg(tmp.path())
        .arg("--out")
        .arg(&out));
    assert!(!ok, "{err}");
    assert!(err.contains("teacher"), "{err}");
    assert!(
        err.contains(&format!("--teacher {}", run_dir.join("model").display())),
        "{err}"
    );
    assert!(!out.exists(), "a failed distill left {}", out.display());
}

#[test]
fn r19_swapped_pred_and_gold_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let pred = tmp.path().join("predictions.jsonl");
    let gold = tmp.path().join("gold.json");
    std::fs::write(
        &pred,
        "{\"question_id\": \"r1\", \"prompt\": \"p\", \"text\": \"NORM\"}\n",
    )
    .unwrap();
    std::fs::write(
        &gold,
        "[\n  {\"id\": \"r1\", \"conversations\": [{\"from\": \"human\", \"value\": \"p\"}, \
         {\"from\": \"gpt\", \"value\": \"NORM\"}]}\n]\n",
    )
    .unwrap();
    let (ok, _, err) = run(bin()
        .args(["score", "ecgbench", "--task", "ptb", "--pred"])
        .arg(&pred)
        .arg("--gold")
        .arg(&gold));
    assert!(ok, "the right way round scores: {err}");
    let (ok, _, err) = run(bin()
        .args(["score", "ecgbench", "--task", "ptb", "--pred"])
        .arg(&gold)
        .arg("--gold")
        .arg(&pred));
    assert!(!ok, "{err}");
    assert!(err.contains("swapped"), "{err}");
    assert!(!err.contains("malformed JSON"), "{err}");
}

#[test]
fn r19_eval_help_lists_one_perturbation_per_line() {
    let (ok, stdout, _) = run(bin().args(["eval", "--help"]));
    assert!(ok);
    for spec in [
        "noise:SNR_DB",
        "wander[:MV]",
        "lead-dropout:LEADS",
        "time-shift:MS",
    ] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(spec)),
            "`{spec}` does not start a line:\n{stdout}"
        );
    }
}

#[test]
fn r19_quickstart_prints_its_resolved_config_with_sinkhorn_settings() {
    let (ok, stdout, err) = run(bin().args([
        "quickstart",
        "--preset",
        "tiny",
        "--print-config",
        "--kernel",
        "graph",
        "--eps",
        "0.05",
        "--sinkhorn-iters",
        "40",
    ]));
    assert!(ok, "{err}");
    for key in [
        "preset = \"tiny\"",
        "kernel = \"graph\"",
        "[sinkhorn]",
        "eps = 0.05",
        "iterations = 40",
    ] {
        assert!(stdout.contains(key), "missing `{key}` in\n{stdout}");
    }
}
