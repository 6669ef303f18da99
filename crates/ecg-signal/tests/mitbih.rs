//! QRS detector against MIT-BIH record 100's reference beat annotations (150 ms window).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use ecg_io::wfdb::annotation::read_annotations;
use ecg_io::{ReadOptions, read_record};
use ecg_signal::qrs::{QrsConfig, detect_qrs, heart_rate_bpm, match_beats};

#[test]
fn mitbih_100_sensitivity_and_ppv_above_99_percent() {
    let Some(shared) = evl_testkit::shared_dir() else {
        return;
    };
    let dir = shared.join("data/physionet_misc");
    let rec = read_record(&dir.join("100"), ReadOptions::default()).unwrap();
    let sig = rec.to_mv_f32();
    let det = detect_qrs(&[&sig[0]], rec.fs, &QrsConfig::default());
    let beats: Vec<usize> = read_annotations(&dir.join("100.atr"))
        .unwrap()
        .iter()
        .filter(|a| a.is_beat())
        .map(|a| a.sample as usize)
        .collect();
    let tol = (0.150 * rec.fs) as usize;
    let (tp, fneg, fpos) = match_beats(&beats, &det, tol);
    let se = tp as f64 / (tp + fneg) as f64;
    let ppv = tp as f64 / (tp + fpos) as f64;
    eprintln!(
        "MIT-BIH 100: {} reference beats, {} detected, TP {tp}, FN {fneg}, FP {fpos}, \
         Se {:.4}, +P {:.4}",
        beats.len(),
        det.len(),
        se * 100.0,
        ppv * 100.0
    );
    assert!(se > 0.99 && ppv > 0.99, "Se {se}, +P {ppv}");
    let hr = heart_rate_bpm(&det, rec.fs).unwrap();
    assert!((60.0..90.0).contains(&hr), "{hr}");
}
