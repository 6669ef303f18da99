//! The synthetic ECGs are credible: heart rate, QRS duration and QT measured from the signal
//! (our QRS detector and delineator, not the generator's parameters) fall in the clinical
//! ranges of each class; WFDB round trip is exact; generation is deterministic.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;

use ecg_signal::delineate::delineate;
use ecg_signal::{QrsConfig, detect_qrs, heart_rate_bpm};
use ecg_synth::{Difficulty, SynthConfig, generate, generate_many};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn measured_intervals_fall_in_clinical_ranges() {
    let cfg = SynthConfig {
        noise: 0.0,
        difficulty: Difficulty::Obvious,
        p_multilabel: 0.0,
        ..SynthConfig::default()
    };
    let ecgs = generate_many(&cfg, 7, 240);
    // (group) -> measured (hr, qrs ms, qt ms) per record
    let mut by: BTreeMap<&str, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for e in &ecgs {
        let sig = e.record.to_mv_f32();
        let refs: Vec<&[f32]> = sig.iter().map(|v| v.as_slice()).collect();
        let fs = e.record.fs;
        let r = detect_qrs(&refs, fs, &QrsConfig::default());
        let hr = heart_rate_bpm(&r, fs).unwrap();
        let beats = delineate(&refs, fs, &r);
        assert!(!beats.is_empty(), "{}: no beat delineated", e.record.name);
        let qrs = median(beats.iter().map(|b| b.qrs_s(fs) * 1000.0).collect());
        let qt = median(beats.iter().map(|b| b.qt_s(fs) * 1000.0).collect());
        let f = &e.truth.findings;
        let group = if f.iter().any(|x| x == "RBBB" || x == "LBBB") {
            "BBB"
        } else if f.iter().any(|x| x == "SBRAD") {
            "SBRAD"
        } else if f.iter().any(|x| x == "STACH") {
            "STACH"
        } else if f.iter().any(|x| x == "AF") {
            "AF"
        } else {
            e.truth.superclasses[0].as_str()
        };
        by.entry(group).or_default().push((hr, qrs, qt));
    }
    for (g, v) in &by {
        let hr = median(v.iter().map(|x| x.0).collect());
        let qrs = median(v.iter().map(|x| x.1).collect());
        let qt = median(v.iter().map(|x| x.2).collect());
        // Bazett's rate correction: the clinical range is stated for QTc.
        let qtc = qt / (60.0 / hr).sqrt();
        eprintln!(
            "{g:6} n={:3}  HR {hr:5.1} bpm  QRS {qrs:5.1} ms  QT {qt:5.1} ms  QTc {qtc:5.1} ms",
            v.len()
        );
        assert!((340.0..=470.0).contains(&qtc), "{g}: QTc {qtc}");
        match *g {
            "BBB" => assert!(qrs >= 120.0, "bundle-branch block QRS {qrs} ms < 120"),
            _ => assert!((70.0..=115.0).contains(&qrs), "{g}: QRS {qrs}"),
        }
        match *g {
            "SBRAD" => assert!(hr < 60.0, "{hr}"),
            "STACH" => assert!(hr > 100.0, "{hr}"),
            "AF" => assert!((60.0..=130.0).contains(&hr), "{hr}"),
            "BBB" => {}
            _ => assert!((55.0..=100.0).contains(&hr), "{g}: {hr}"),
        }
    }
    for g in ["NORM", "MI", "STTC", "HYP", "BBB", "SBRAD", "STACH", "AF"] {
        assert!(by.get(g).is_some_and(|v| v.len() >= 3), "too few {g}");
    }
}

#[test]
fn lvh_meets_voltage_criteria_and_leads_are_consistent() {
    let cfg = SynthConfig {
        noise: 1.0,
        difficulty: Difficulty::Obvious,
        ..SynthConfig::default()
    };
    let mut n_lvh = 0;
    for i in 0..200 {
        let e = generate(&cfg, 3, i);
        let s = e.record.to_mv_f32();
        // Einthoven holds even with electrode noise (up to 1 uV quantisation per lead).
        for ((i, ii), iii) in s[0].iter().zip(&s[1]).zip(&s[2]) {
            assert!((i + iii - ii).abs() < 2.5e-3);
        }
        if e.truth.findings.iter().any(|f| f == "LVH")
            && !e.truth.findings.iter().any(|f| f == "LBBB")
        {
            // Sokolow-Lyon: S(V1) + R(V5) >= 3.5 mV.
            let sv1 = -s[6].iter().cloned().fold(f32::MAX, f32::min);
            let rv5 = s[10].iter().cloned().fold(f32::MIN, f32::max);
            assert!(
                sv1 + rv5 > 3.5,
                "{}: SV1+RV5 = {}",
                e.record.name,
                sv1 + rv5
            );
            n_lvh += 1;
        }
    }
    assert!(n_lvh >= 5);
}

#[test]
fn deterministic_and_wfdb_round_trip_exact() {
    let cfg = SynthConfig::default();
    let a = generate(&cfg, 11, 5);
    let b = generate(&cfg, 11, 5);
    assert_eq!(a.record, b.record);
    assert_ne!(generate(&cfg, 12, 5).record, a.record);
    let dir = tempfile::tempdir().unwrap();
    let truths = ecg_synth::write_dataset(dir.path(), &cfg, 11, 8).unwrap();
    assert_eq!(truths[5], a.truth);
    let back = ecg_io::read_record(
        &dir.path().join("synth000005"),
        ecg_io::ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(back, a.record);
    let labels = std::fs::read_to_string(dir.path().join("labels.csv")).unwrap();
    assert_eq!(labels.lines().count(), 9);
}
