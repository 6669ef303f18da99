//! A tiny model trained by `quickstart`, then `interpret`, `eval` (with perturbations) and the
//! parity scorer on eval's own output.

use super::*;

fn tiny_model(dir: &std::path::Path) {
    let (ok, _, err) = run(bin()
        .args(["quickstart", "--preset", "tiny", "--out"])
        .arg(dir));
    assert!(ok, "{err}");
}

#[test]
fn eval_writes_pulse_predictions_metrics_and_paired_perturbation_deltas() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    tiny_model(&q);
    let out = tmp.path().join("eval");
    let (ok, stdout, err) = run(bin()
        .args(["--json", "eval", "--model"])
        .arg(q.join("model"))
        .arg("--data")
        .arg(q.join("data"))
        .args([
            "--perturb",
            "amplitude:1",
            "--perturb",
            "noise:0",
            "--resamples",
            "200",
        ])
        .arg("--out")
        .arg(&out));
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    // The file carries its schema version (evl-run); the summary is the same document.
    let version = m.as_object_mut().unwrap().remove("schema_version");
    assert_eq!(version, Some(serde_json::json!(1)));
    assert_eq!(summary["data"], m);
    let n = m["n"].as_u64().unwrap() as usize;
    assert!(n > 0 && m["per_class"].as_array().unwrap().len() == 5);
    assert_eq!(m["reliability"].as_array().unwrap().len(), 10);
    // The identity perturbation changes nothing: every paired delta and its interval is 0.
    let id = &m["perturbations"][0];
    assert_eq!(id["spec"], "amplitude:1");
    for d in id["deltas"].as_array().unwrap() {
        if d["delta"].is_number() {
            assert_eq!(d["delta"].as_f64().unwrap(), 0.0, "{d}");
            assert_eq!(d["ci95"][0].as_f64().unwrap(), 0.0, "{d}");
            assert_eq!(d["ci95"][1].as_f64().unwrap(), 0.0, "{d}");
        }
    }
    assert_eq!(m["perturbations"][1]["spec"], "noise:0");
    assert!(out.join("predictions-noise_0.jsonl").is_file());
    // The parity scorer reads eval's predictions and gold and agrees with metrics.json.
    let (ok, stdout, err) = run(bin()
        .args(["--json", "score", "ecgbench", "--task", "ptb", "--pred"])
        .arg(out.join("predictions.jsonl"))
        .arg("--gold")
        .arg(out.join("gold.json")));
    assert!(ok, "{err}");
    let score: serde_json::Value = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["type"] == "score")
        .unwrap();
    let f1 = score["data"]["f1"].as_f64().unwrap();
    let expect = m["scores"]["parity_f1"].as_f64().unwrap();
    assert!((f1 - expect).abs() < 1e-12, "{f1} vs {expect}");
    // The quickstart wrote its HTML report; `report` also draws an eval run.
    let html = std::fs::read_to_string(q.join("report/index.html")).unwrap();
    for part in [
        "Methods compared",
        "Training curves",
        "ROC per class",
        "Reliability",
        "Sinkhorn plan",
        "Singular values",
        "data:image/png;base64,",
    ] {
        assert!(html.contains(part), "quickstart report lacks {part}");
    }
    // Offline: nothing fetched (SVG's xmlns URI is a name, not a fetch).
    for bad in [
        "<script",
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
    ] {
        assert!(!html.contains(bad), "report would load {bad}");
    }
    let (ok, stdout, err) = run(bin().args(["--json", "report"]).arg(&out));
    assert!(ok, "{err}");
    assert!(stdout.contains("index.html"));
    let html = std::fs::read_to_string(out.join("report/index.html")).unwrap();
    assert!(
        html.contains("Robustness") && html.contains("noise:0") && html.contains("ROC per class")
    );
    // interpret reads the same model directory.
    let labels = std::fs::read_to_string(q.join("data/labels.csv")).unwrap();
    let first = labels.lines().nth(1).unwrap().split(',').next().unwrap();
    let rec = q.join("data").join(first);
    let (ok, stdout, err) = run(bin()
        .args(["--json", "interpret", "--model"])
        .arg(q.join("model"))
        .arg(&rec));
    assert!(ok, "{err}");
    assert!(stdout.contains("probabilities"), "{stdout}");
}

#[test]
fn eval_refuses_bad_perturbations_and_unlabelled_data_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    tiny_model(&q);
    let (ok, _, err) = run(bin()
        .args(["eval", "--model"])
        .arg(q.join("model"))
        .arg("--data")
        .arg(q.join("data"))
        .args(["--perturb", "lead-dropout:V9"]));
    assert!(
        !ok && err.contains("lead-dropout:V9") && err.contains("`V9`"),
        "{err}"
    );
    let Some(d) = data() else { return };
    let out = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(bin()
        .args(["eval", "--split", "all", "--model"])
        .arg(q.join("model"))
        .arg("--data")
        .arg(d.join("cinc2021_subset/cpsc2018"))
        .arg("--out")
        .arg(out.path()));
    // A CinC folder labels its records with SNOMED-CT codes: they are read as PTB-XL
    // superclasses (it once said `labels seen: []`, then refused them).
    assert!(ok, "{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("metrics.json")).unwrap())
            .unwrap();
    assert!(m["n"].as_u64().unwrap() >= 5, "{m}");
}

/// The two stages as commands: SFT of both models (the teacher killed half-way, refused
/// without --resume, then resumed),
/// then distillation with EVL-ECG (offline cache) and KD (online teacher); a TOML config with a
/// typo is refused by name.
#[test]
fn train_and_distill_commands_resume_and_validate_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (ok, _, err) = run(bin()
        .args(["data", "synth", "--n", "30", "--seed", "5", "--out"])
        .arg(&data));
    assert!(ok, "{err}");
    let small = ["--steps", "4", "--batch-size", "4"];
    // Training runs also pre-train the encoder, briefly.
    let pre = ["--pretrain-steps", "2"];
    let t = tmp.path().join("t");
    let (ok, _, err) = run(bin()
        .args(["train", "teacher", "--stop-after", "2", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&t)
        .args(small)
        .args(pre));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(t.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // Without --resume an existing run is not overwritten.
    let (ok, _, err) = run(bin()
        .args(["train", "teacher", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&t)
        .args(small)
        .args(pre));
    assert!(
        !ok && err.contains("--resume") && err.contains("step 2"),
        "{err}"
    );
    let (ok, stdout, err) = run(bin()
        .args(["--json", "train", "teacher", "--resume", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&t)
        .args(small)
        .args(pre));
    assert!(ok, "{err}");
    // Vision pre-training ran first (2 steps) and reported its probe on the validation split.
    let probe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("pretrain.json")).unwrap()).unwrap();
    assert!(probe["val_records"].as_u64().unwrap() > 0, "{probe}");
    assert_eq!(
        std::fs::read_to_string(t.join("pretrain_metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // Resumed at step 3: only steps 3 and 4 ran now, the log holds all four.
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains("\"type\":\"step\""))
            .count(),
        2,
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(t.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        4
    );
    let s = tmp.path().join("s");
    let (ok, _, err) = run(bin()
        .args(["train", "student", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&s)
        .args(small)
        .args(pre));
    assert!(ok, "{err}");
    for (method, extra) in [("evl", None), ("kl", Some("--online"))] {
        let out = tmp.path().join(method);
        let mut cmd = bin();
        cmd.args(["--json", "distill", "--method", method, "--teacher"])
            .arg(t.join("model"))
            .arg("--student")
            .arg(s.join("model"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(small);
        if let Some(x) = extra {
            cmd.arg(x);
        }
        let (ok, stdout, err) = run(&mut cmd);
        assert!(ok, "{method}: {err}");
        let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(last["data"]["steps"], 4);
        assert!(out.join("model/model.safetensors").is_file());
        let terms = &last["data"]["final_log"]["terms"];
        let want = if method == "evl" { "mhca" } else { "kd" };
        assert!(terms.to_string().contains(want), "{terms}");
    }
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[distill]\nlamda_ot = 0.2\n").unwrap();
    let (ok, _, err) = run(bin()
        .args([
            "distill",
            "--teacher",
            "x",
            "--student",
            "y",
            "--data",
            "z",
            "--out",
            "w",
            "--config",
        ])
        .arg(&bad));
    assert!(
        !ok && err.contains("lamda_ot") && err.contains("bad.toml"),
        "{err}"
    );
}

/// ECGInstruct-format conversations (LLaVA JSON, `human`/`gpt`) over the real PTB-XL images in
/// ../shared/data, image paths given under a directory that does not exist (resolved by file
/// name below --image-root), train an image teacher and student and distil; a missing image
/// is refused naming the item.
#[test]
fn conversations_with_an_image_root_train_and_distill() {
    let Some(d) = data() else { return };
    let root = d.join("ptbxl_subset");
    let tmp = tempfile::tempdir().unwrap();
    let mut items = Vec::new();
    for png in [
        "00001_hr-0.png",
        "00002_hr-0.png",
        "00003_hr-0.png",
        "00004_hr-0.png",
    ] {
        items.push(serde_json::json!({
            "id": png.trim_end_matches(".png"),
            "image": format!("ecg_images/{png}"),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat does this ECG show?"},
                {"from": "gpt", "value": "Sinus rhythm, normal ECG."}
            ]
        }));
    }
    let conv = tmp.path().join("conv.json");
    std::fs::write(&conv, serde_json::to_string(&items).unwrap()).unwrap();
    let small = ["--steps", "2", "--batch-size", "2"];
    let job = |role: &str, out: &std::path::Path, input: &str| {
        run(bin()
            .args(["train", role, "--input", input, "--vocab", "70", "--data"])
            .arg(&conv)
            .arg("--image-root")
            .arg(&root)
            .arg("--out")
            .arg(out)
            .args(small))
    };
    let (t, s) = (tmp.path().join("t"), tmp.path().join("s"));
    let (ok, _, err) = job("teacher", &t, "image");
    assert!(ok, "{err}");
    let (ok, _, err) = job("student", &s, "image");
    assert!(ok, "{err}");
    let (ok, stdout, err) = run(bin()
        .args(["--json", "distill", "--method", "evl", "--teacher"])
        .arg(t.join("model"))
        .arg("--student")
        .arg(s.join("model"))
        .arg("--data")
        .arg(&conv)
        .arg("--image-root")
        .arg(&root)
        .arg("--out")
        .arg(tmp.path().join("evl"))
        .args(small));
    assert!(ok, "{err}");
    assert!(stdout.contains("\"mhca\""), "{stdout}");
    // The WFDB record beside each PNG gives signal models their input too.
    let (ok, _, err) = job("student", &tmp.path().join("s2"), "signal");
    assert!(ok, "{err}");
    items.push(
        serde_json::json!({"id": "lost", "image": "nowhere/missing.png",
        "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]}),
    );
    std::fs::write(&conv, serde_json::to_string(&items).unwrap()).unwrap();
    let (ok, _, err) = job("teacher", &tmp.path().join("t2"), "image");
    assert!(
        !ok && err.contains("`lost`") && err.contains("missing.png"),
        "{err}"
    );
}

/// `--preset zoo` starts from the shipped teacher's recipe (an image teacher with the
/// convolutional stem, long pre-training, checkpoints every 100 steps), and a `--config`
/// file lays its keys over the preset rather than over the defaults.
#[test]
fn zoo_preset_is_the_base_that_config_and_flags_change() {
    let (ok, stdout, err) =
        run(bin().args(["train", "teacher", "--preset", "zoo", "--print-config"]));
    assert!(ok, "{err}");
    let teacher = stdout.split("[student]").next().unwrap();
    for key in [
        "input = \"image\"",
        "stem_channels = 128",
        "steps = 1500",
        "checkpoint_every = 100",
    ] {
        assert!(teacher.contains(key), "missing `{key}` in\n{teacher}");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[teacher.pretrain]\nsteps = 7\n").unwrap();
    let (ok, stdout, err) = run(bin()
        .args([
            "train",
            "teacher",
            "--preset",
            "zoo",
            "--print-config",
            "--config",
        ])
        .arg(&cfg));
    assert!(ok, "{err}");
    let teacher = stdout.split("[student]").next().unwrap();
    assert!(
        teacher.contains("stem_channels = 128") && teacher.contains("steps = 7"),
        "{teacher}"
    );
    // Without the preset the same file changes the defaults: no stem.
    let (ok, stdout, err) = run(bin()
        .args(["train", "teacher", "--print-config", "--config"])
        .arg(&cfg));
    assert!(ok, "{err}");
    assert!(stdout.contains("stem_channels = 0"), "{stdout}");
}

/// `quickstart --teacher-checkpoint DIR` distils from a trained model directory instead of
/// training a teacher (here a tiny quickstart's student stands in as the checkpoint): the run
/// says so in its notes and never writes a teacher training run; a directory that is not a
/// model is named.
#[test]
fn quickstart_loads_a_teacher_checkpoint_instead_of_training_one() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    tiny_model(&q);
    let out = tmp.path().join("q2");
    let (ok, _, err) = run(bin()
        .args(["quickstart", "--preset", "tiny", "--teacher-checkpoint"])
        .arg(q.join("model"))
        .arg("--out")
        .arg(&out));
    assert!(ok, "{err}");
    let results = std::fs::read_to_string(out.join("results.json")).unwrap();
    assert!(results.contains("teacher: loaded from"), "{results}");
    assert!(!out.join("teacher").exists() && !out.join("teacher-pretrain").exists());
    let (ok, _, err) = run(bin()
        .args(["quickstart", "--preset", "tiny", "--teacher-checkpoint"])
        .arg(q.join("data"))
        .arg("--out")
        .arg(tmp.path().join("q3")));
    assert!(!ok && err.contains("config.json"), "{err}");
    assert!(!tmp.path().join("q3").exists());
}

/// `quickstart --student-checkpoint DIR` distils into an SFT'd model directory instead of
/// pre-training and SFT'ing a student in the run; a directory that is not a model is named
/// before anything is written.
#[test]
fn quickstart_loads_a_student_checkpoint_instead_of_training_one() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    tiny_model(&q);
    let out = tmp.path().join("q2");
    let (ok, _, err) = run(bin()
        .args(["quickstart", "--preset", "tiny", "--student-checkpoint"])
        .arg(q.join("model"))
        .arg("--out")
        .arg(&out));
    assert!(ok, "{err}");
    let results = std::fs::read_to_string(out.join("results.json")).unwrap();
    assert!(
        results.contains("student: the SFT'd student loaded from"),
        "{results}"
    );
    assert!(!out.join("student-sft").exists() && !out.join("student-pretrain").exists());
    // The student's own tokenizer is the run's.
    assert_eq!(
        std::fs::read(out.join("tokenizers/student.json")).unwrap(),
        std::fs::read(q.join("model/tokenizer.json")).unwrap()
    );
    let (ok, _, err) = run(bin()
        .args(["quickstart", "--preset", "tiny", "--student-checkpoint"])
        .arg(q.join("data"))
        .arg("--out")
        .arg(tmp.path().join("q3")));
    assert!(
        !ok && err.contains("student_checkpoint") && err.contains("config.json"),
        "{err}"
    );
    assert!(!tmp.path().join("q3").exists());
}

/// `train student --init DIR` on a model folder this toolkit wrote continues its SFT: same
/// architecture and tokenizer, new weights, no pre-training; a folder that is neither kind of
/// model is refused by name, with nothing written.
#[test]
fn train_continues_from_a_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    tiny_model(&q);
    let out = tmp.path().join("more");
    let (ok, stdout, err) = run(bin()
        .args(["train", "student", "--init"])
        .arg(q.join("model"))
        .arg("--data")
        .arg(q.join("data"))
        .args(["--steps", "3", "--batch-size", "4", "--out"])
        .arg(&out));
    assert!(ok, "{err}");
    assert!(stdout.contains("3 steps"), "{stdout}");
    assert!(!out.join("pretrain").exists() && !out.join("pretrain.json").exists());
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    for same in ["config.json", "tokenizer.json", "input.json"] {
        assert_eq!(
            read(out.join("model").join(same)),
            read(q.join("model").join(same)),
            "{same}"
        );
    }
    assert_ne!(
        read(out.join("model/model.safetensors")),
        read(q.join("model/model.safetensors"))
    );
    // --pretrain-steps continues the encoder's pre-training first (a new probe, judged on
    // the validation split).
    let pre = tmp.path().join("pre");
    let (ok, _, err) = run(bin()
        .args(["train", "student", "--init"])
        .arg(q.join("model"))
        .arg("--data")
        .arg(q.join("data"))
        .args([
            "--pretrain-steps",
            "2",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out",
        ])
        .arg(&pre));
    assert!(ok, "{err}");
    let probe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pre.join("pretrain.json")).unwrap()).unwrap();
    assert!(probe["val_records"].as_u64().unwrap() > 0, "{probe}");
    assert_eq!(
        std::fs::read_to_string(pre.join("pretrain_metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    let bad = tmp.path().join("bad");
    let (ok, _, err) = run(bin()
        .args(["train", "student", "--init"])
        .arg(q.join("data"))
        .arg("--data")
        .arg(q.join("data"))
        .arg("--out")
        .arg(&bad));
    assert!(
        !ok && err.contains("--init") && err.contains("input.json"),
        "{err}"
    );
    assert!(!bad.exists());
}

/// `bench train` runs steps of both built-in models in every form (encoder every step,
/// cached tokens, fused kernels, the encoder learning by autodiff and fused), and the
/// forms train the same model: equal losses at the first step, and at the second among the
/// forms with a frozen encoder and among those where it learns.
#[test]
fn bench_train_steps_both_models_in_every_form() {
    let (ok, stdout, err) = run(bin().args([
        "--json",
        "bench",
        "train",
        "--no-torch",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--records",
        "8",
    ]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let rows = v["data"]["rows"].as_array().unwrap();
    let of = |who: &str| -> Vec<&serde_json::Value> {
        rows.iter()
            .filter(|r| r["case"].as_str().unwrap().starts_with(who))
            .collect()
    };
    let (student, teacher) = (of("student"), of("teacher"));
    assert_eq!((student.len(), teacher.len()), (6, 6), "{rows:?}");
    for model in [student, teacher] {
        let loss = |r: &serde_json::Value, k: usize| r["ours_losses"][k].as_f64().unwrap();
        let first = loss(model[0], 0);
        assert!(first.is_finite() && first > 0.0, "{model:?}");
        assert!(
            model
                .iter()
                .filter(|r| r["case"].as_str().unwrap().contains("fused"))
                .count()
                >= 2
        );
        for frozen in [true, false] {
            let same: Vec<_> = model
                .iter()
                .filter(|r| r["frozen_encoder"].as_bool().unwrap() == frozen)
                .collect();
            for r in &same {
                assert!((loss(r, 0) - first).abs() < 1e-5, "{r}");
                assert!((loss(r, 1) - loss(same[0], 1)).abs() < 1e-4, "{r}");
                assert!(r["ours_ms"].as_f64().unwrap() > 0.0);
            }
        }
    }
}

/// `bench serve` (the short version of the load test): below saturation every request is
/// answered, above it only 503s are added, and the direct-engine reference is measured.
#[test]
fn bench_serve_short_load_run() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (ok, stdout, err) = run(bin().current_dir(&root).args([
        "--json",
        "bench",
        "serve",
        "--workers",
        "1",
        "--queue",
        "2",
        "--duration",
        "1.5",
        "--soak",
        "0",
        "--over",
        "2",
    ]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let d = &v["data"];
    assert_eq!(d["below_all_ok"], true, "{d}");
    assert_eq!(d["above_only_503"], true, "{d}");
    assert!(d["below"]["ok"].as_u64().unwrap() > 0, "{d}");
    assert!(
        d["above"]["busy"].as_u64().unwrap() > 0,
        "no 503 above saturation: {d}"
    );
    assert!(d["direct_per_s"].as_f64().unwrap() > 0.0);
}
