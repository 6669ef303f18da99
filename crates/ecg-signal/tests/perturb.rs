//! Perturbations on a real PTB-XL record: each does what its spec says, measured.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use ecg_io::{Lead, ReadOptions, Record, read_record};
use ecg_signal::perturb::Perturbation;

fn record() -> Option<Record> {
    let shared = evl_testkit::shared_dir()?;
    Some(
        read_record(
            &shared.join("data/ptbxl_subset/records500/00000/00001_hr"),
            ReadOptions::default(),
        )
        .unwrap(),
    )
}

fn mv(r: &Record) -> Vec<Vec<f64>> {
    r.to_mv_f32()
        .into_iter()
        .map(|c| c.into_iter().map(f64::from).collect())
        .collect()
}

fn var(x: &[f64]) -> f64 {
    let m = x.iter().sum::<f64>() / x.len() as f64;
    x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / x.len() as f64
}

fn measured_snr_db(clean: &[f64], noisy: &[f64]) -> f64 {
    let d: Vec<f64> = noisy.iter().zip(clean).map(|(a, b)| a - b).collect();
    10.0 * (var(clean) / var(&d)).log10()
}

#[test]
fn additive_noise_hits_the_requested_snr_on_every_lead() {
    let Some(rec) = record() else { return };
    let clean = mv(&rec);
    for (spec, snr) in [
        ("noise:20", 20.0),
        ("noise:0", 0.0),
        ("electrode-motion:6", 6.0),
    ] {
        let mut r = rec.clone();
        spec.parse::<Perturbation>().unwrap().apply(&mut r, 3);
        for (c, n) in clean.iter().zip(mv(&r)) {
            let got = measured_snr_db(c, &n);
            // ADC rounding (1 uV) adds a little noise of its own.
            assert!((got - snr).abs() < 0.3, "{spec}: {got:.2} dB");
        }
    }
}

#[test]
fn deterministic_per_seed_and_record() {
    let Some(rec) = record() else { return };
    let p: Perturbation = "electrode-motion:3".parse().unwrap();
    let (mut a, mut b, mut c) = (rec.clone(), rec.clone(), rec.clone());
    p.apply(&mut a, 1);
    p.apply(&mut b, 1);
    p.apply(&mut c, 2);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, rec);
}

#[test]
fn powerline_and_wander_have_the_stated_amplitude_and_band() {
    let Some(rec) = record() else { return };
    let clean = mv(&rec);
    let mut r = rec.clone();
    "powerline:60:0.2"
        .parse::<Perturbation>()
        .unwrap()
        .apply(&mut r, 0);
    for (c, n) in clean.iter().zip(mv(&r)) {
        let d: Vec<f64> = n.iter().zip(c).map(|(a, b)| a - b).collect();
        // A sinusoid of amplitude A has variance A^2 / 2; its 60 Hz DFT bin holds all of it.
        assert!((var(&d).sqrt() - 0.2 / 2f64.sqrt()).abs() < 0.005);
        let (re, im) = d.iter().enumerate().fold((0.0, 0.0), |(re, im), (k, v)| {
            let w = std::f64::consts::TAU * 60.0 * k as f64 / rec.fs;
            (re + v * w.cos(), im - v * w.sin())
        });
        let amp = 2.0 * (re * re + im * im).sqrt() / d.len() as f64;
        assert!((amp - 0.2).abs() < 0.005, "{amp}");
    }
    let mut r = rec.clone();
    "wander:1.0"
        .parse::<Perturbation>()
        .unwrap()
        .apply(&mut r, 0);
    for (c, n) in clean.iter().zip(mv(&r)) {
        let d: Vec<f64> = n.iter().zip(c).map(|(a, b)| a - b).collect();
        let peak = d.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(peak <= 1.0 + 1e-3 && peak > 0.05, "{peak}");
        // Slow: consecutive samples at 500 Hz differ by far less than the amplitude.
        let step = d.windows(2).fold(0.0f64, |m, w| m.max((w[1] - w[0]).abs()));
        assert!(step < 0.01, "{step}");
    }
}

#[test]
fn dropout_amplitude_and_shift_are_exact() {
    let Some(rec) = record() else { return };
    let clean = mv(&rec);
    let mut r = rec.clone();
    "lead-dropout:V1,II"
        .parse::<Perturbation>()
        .unwrap()
        .apply(&mut r, 0);
    let out = mv(&r);
    for (i, ch) in rec.channels.iter().enumerate() {
        if ch.lead == Lead::V1 || ch.lead == Lead::II {
            assert!(out[i].iter().all(|&v| v == 0.0));
        } else {
            assert_eq!(out[i], clean[i]);
        }
    }
    let mut r = rec.clone();
    "amplitude:2"
        .parse::<Perturbation>()
        .unwrap()
        .apply(&mut r, 0);
    for (a, b) in rec.channels.iter().zip(&r.channels) {
        for (x, y) in a.adc.iter().zip(&b.adc) {
            assert_eq!(2.0 * (*x as f64 - a.baseline) + a.baseline, *y as f64);
        }
    }
    let mut r = rec.clone();
    "time-shift:20"
        .parse::<Perturbation>()
        .unwrap()
        .apply(&mut r, 0);
    let k = (0.02 * rec.fs) as usize;
    for (a, b) in rec.channels.iter().zip(&r.channels) {
        assert_eq!(&b.adc[k..], &a.adc[..a.adc.len() - k]);
        assert!(b.adc[..k].iter().all(|&v| v == a.adc[0]));
    }
}
