use super::*;

/// `data convert --to csv` writes every physical value so that it parses back to exactly the
/// reader's f64 (and so to wfdb-python's, see ecg-io's reference test).
#[test]
fn convert_csv_is_exact() {
    let Some(d) = data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for rel in [
        "physionet_misc/100",
        "cinc2021_subset/cpsc2018/A0001",
        "cpsc2021_af/data_101_6",
        "ptbxl_subset/records100/00000/00001_lr",
    ] {
        let out = tmp.path().join("x.csv");
        let (ok, _, err) = run(bin()
            .args(["data", "convert"])
            .arg(d.join(rel))
            .args(["--to", "csv", "--out"])
            .arg(&out));
        assert!(ok, "{rel}: {err}");
        let rec = ecg_io::read_record(&d.join(rel), Default::default()).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next().unwrap().split(',').collect();
        assert_eq!(head.len(), rec.channels.len());
        let mut n = 0;
        for (k, line) in lines.enumerate() {
            for (j, v) in line.split(',').enumerate() {
                let got: f64 = v.parse().unwrap();
                assert_eq!(
                    got.to_bits(),
                    rec.channels[j].physical_at(k).to_bits(),
                    "{rel} [{k},{j}]"
                );
            }
            n += 1;
        }
        assert_eq!(n, rec.n_samples);
    }
}

#[test]
fn synth_then_read_back_and_render() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("syn");
    let (ok, stdout, err) = run(bin()
        .args([
            "--json", "data", "synth", "--n", "6", "--seed", "3", "--out",
        ])
        .arg(&out));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["type"], "summary");
    assert_eq!(v["data"]["n"], 6);
    let r = ecg_io::read_record(&out.join("synth000004"), Default::default()).unwrap();
    assert_eq!(
        r,
        ecg_synth::generate(&ecg_synth::SynthConfig::default(), 3, 4).record
    );
    let png = tmp.path().join("x.png");
    let (ok, _, err) = run(bin()
        .arg("render")
        .arg(out.join("synth000004"))
        .args(["--dpi", "60", "--rotate", "2", "--out"])
        .arg(&png));
    assert!(ok, "{err}");
    let img = image::open(&png).unwrap();
    assert_eq!(img.width(), (279.4f32 * 60.0 / 25.4).round() as u32);
}

/// A bad record: clear error on stderr naming the file, exit status 2, the good record still
/// printed.
#[test]
fn inspect_reports_bad_records_and_continues() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("bad.hea"),
        "bad 1 500 10\nbad.dat 16 oops 16 0 0 0 0 I\n",
    )
    .unwrap();
    let good = tmp.path().join("syn");
    assert!(
        run(bin()
            .args(["data", "synth", "--n", "1", "--out"])
            .arg(&good))
        .0
    );
    let out = bin()
        .args(["--json", "data", "inspect"])
        .arg(tmp.path().join("bad"))
        .arg(good.join("synth000000"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.hea:2") && err.contains("gain"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["data"]["leads"].as_array().unwrap().len(), 12);
}

#[test]
fn checksum_error_and_no_verify() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("c.hea"),
        "c 1 100 2\nc.dat 16 200 16 0 1 3 0 I\n",
    )
    .unwrap();
    std::fs::write(tmp.path().join("c.dat"), [1u8, 0, 1, 0]).unwrap();
    let csv = tmp.path().join("c.csv");
    let (ok, _, err) = run(bin()
        .args(["data", "convert"])
        .arg(tmp.path().join("c"))
        .arg("--out")
        .arg(&csv));
    assert!(
        !ok && err.contains("checksum") && err.contains("--no-verify"),
        "{err}"
    );
    let (ok, _, err) = run(bin()
        .args(["data", "convert", "--no-verify"])
        .arg(tmp.path().join("c"))
        .arg("--out")
        .arg(&csv));
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&csv).unwrap(), "I\n0.005\n0.005\n");
}

#[test]
fn import_ptbxl_subset() {
    let Some(d) = data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let idx = tmp.path().join("ptbxl.jsonl");
    let (ok, _, err) = run(bin()
        .args(["data", "import", "ptbxl"])
        .arg(d.join("ptbxl_subset"))
        .args([
            "--database",
            "ptbxl_database_excerpt.csv",
            "--headers",
            "--out",
        ])
        .arg(&idx));
    assert!(ok, "{err}");
    let ds = ecg_data::Dataset::read_index(&idx).unwrap();
    assert_eq!(ds.entries.len(), 33);
    let ex = ds.load(0, &ecg_data::Preprocess::default()).unwrap();
    assert_eq!(ex.signal.len(), 12_000);
}

/// A reader that stops early (`| head`) ends the command quietly: no panic, exit 0.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let Some(d) = data() else { return };
    let rec = d.join("wfdb_python_sample/100");
    for args in [
        vec!["data", "convert", "--out", "-"],
        vec!["data", "inspect"],
        vec!["--json", "data", "inspect"],
    ] {
        let mut child = bin()
            .args(&args)
            .arg(&rec)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
    }
}

/// `data inspect` summarises the annotation files beside a record (counts as wfdb-python's
/// `rdann` reads them: 2,274 in 100.atr, 2,273 beats in 100.qrs) and names each signal as
/// its header does.
#[test]
fn inspect_summarises_annotations() {
    let Some(d) = data() else { return };
    let rec = d.join("wfdb_python_sample/100");
    let (ok, stdout, err) = run(bin().args(["--json", "data", "inspect"]).arg(&rec));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let anns = v["data"]["annotations"].as_array().unwrap();
    let count = |f: &str| {
        anns.iter()
            .find(|a| a["file"] == f)
            .map(|a| a["count"].as_u64().unwrap())
    };
    assert_eq!(count("100.atr"), Some(2274));
    assert_eq!(count("100.qrs"), Some(2273));
    assert_eq!(v["data"]["signals"], serde_json::json!(["MLII", "V5"]));
    let (ok, text, _) = run(bin().args(["data", "inspect"]).arg(&rec));
    assert!(
        ok && text.contains("annotations 100.atr: 2274 (N 2239, A 33"),
        "{text}"
    );
}

/// An EDF+ file holding only annotations (no ordinary signal) is inspected, not a panic.
#[test]
fn inspect_an_annotations_only_edf() {
    let Some(d) = data() else { return };
    let rec = d.join("wfdb_python_sample/test_edfann.edf");
    let (ok, stdout, err) = run(bin().args(["--json", "data", "inspect"]).arg(&rec));
    assert!(ok, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(v["data"]["signals"], serde_json::json!([]));
    assert!(v["data"]["heart_rate_bpm"].is_null());
}
