//! Labelled synthetic 12-lead ECGs: SYNTHETIC data, labelled as such everywhere it goes.
//!
//! A cardiac-dipole model ([`model`]) gives each beat; classes edit the beat (pathological Q
//! waves, ST shifts, T inversion, bundle-branch blocks, AV block, hypertrophy), rhythms
//! place the beats (sinus with heart-rate variability, brady/tachycardia, atrial
//! fibrillation with f-waves, premature atrial and ventricular beats), and [`noise`] adds
//! baseline wander, muscle noise, powerline interference and electrode motion at the
//! electrodes, so the lead relations stay physical. Deterministic by seed: record `i` of
//! seed `s` is the same on every machine and thread count.

pub mod model;
pub mod noise;

use std::path::Path;

use ecg_io::{Channel, Lead, Record};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use model::{BeatShape, Wave, add, dot, project, scale, unit};

/// Errors of dataset writing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Writing a record failed.
    #[error("writing synthetic record {index}")]
    Write {
        /// Record index.
        index: usize,
        /// Cause.
        #[source]
        source: ecg_io::Error,
    },
    /// Writing the labels file failed.
    #[error("cannot write {}", .path.display())]
    Io {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value out of range.
    #[error("synthesis option `{field}`: {what}")]
    Config {
        /// Option.
        field: &'static str,
        /// Problem.
        what: String,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// PTB-XL diagnostic superclasses.
pub const SUPERCLASSES: [&str; 5] = ["NORM", "MI", "STTC", "CD", "HYP"];

/// Specific findings the generator can produce (the CPSC-2018 and CODE-15% label spaces are
/// derived from these).
pub const FINDINGS: [&str; 16] = [
    "SR", "SBRAD", "STACH", "AF", "PAC", "PVC", "IAVB", "RBBB", "LBBB", "LVH", "IMI", "AMI", "LMI",
    "STE", "STD", "TINV",
];

/// How pronounced abnormal findings are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Difficulty {
    /// Textbook-size findings.
    Obvious,
    /// Findings near the diagnostic thresholds.
    Subtle,
    /// Half and half.
    Mixed,
}

/// Generator settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SynthConfig {
    /// Sampling frequency, Hz.
    pub fs: u32,
    /// Record length, s.
    pub duration_s: f64,
    /// Relative weights of NORM, MI, STTC, CD, HYP as the primary class.
    pub class_weights: [f64; 5],
    /// Probability that an abnormal record gets a second superclass.
    pub p_multilabel: f64,
    /// Probability of each non-sinus rhythm finding (AF, SBRAD, STACH, PAC, PVC), checked in
    /// that order; at most one rhythm and one ectopy type per record.
    pub p_rhythm: [f64; 5],
    /// Finding size.
    pub difficulty: Difficulty,
    /// Noise scale (0 = clean, 1 = typical resting ECG).
    pub noise: f64,
    /// Mains frequency for powerline interference, Hz.
    pub mains_hz: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            fs: 500,
            duration_s: 10.0,
            class_weights: [0.4, 0.15, 0.15, 0.15, 0.15],
            p_multilabel: 0.25,
            p_rhythm: [0.08, 0.06, 0.06, 0.06, 0.06],
            difficulty: Difficulty::Mixed,
            noise: 1.0,
            mains_hz: 50.0,
        }
    }
}

/// Ground truth of one generated record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Truth {
    /// Superclasses (NORM alone, or any of MI, STTC, CD, HYP).
    pub superclasses: Vec<String>,
    /// Specific findings (see [`FINDINGS`]).
    pub findings: Vec<String>,
    /// Mean heart rate, beats/min.
    pub heart_rate: f64,
    /// QRS duration of sinus beats, s.
    pub qrs_s: f64,
    /// QT at the mean RR, s.
    pub qt_s: f64,
    /// PR interval, s (None without P waves).
    pub pr_s: Option<f64>,
    /// Sample index of each QRS onset.
    pub qrs_onsets: Vec<usize>,
}

/// One synthetic ECG.
#[derive(Debug, Clone)]
pub struct SynthEcg {
    /// 12-lead record (gain 1000 adu/mV, format-16 range).
    pub record: Record,
    /// What was generated.
    pub truth: Truth,
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller; one draw per call keeps the stream simple to reason about.
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// A normal sinus beat with physiological jitter.
fn normal_beat(rng: &mut ChaCha8Rng) -> BeatShape {
    let qrs = uniform(rng, 0.080, 0.100);
    let axis = uniform(rng, 10.0, 75.0).to_radians();
    let amp = uniform(rng, 1.0, 1.5);
    let r = [
        amp * axis.cos(),
        amp * axis.sin(),
        amp * uniform(rng, 0.25, 0.45),
    ];
    let qrs_waves = vec![
        Wave {
            t: 0.12 * qrs,
            sigma: 0.075 * qrs,
            v: [-0.08, 0.0, -0.14],
        },
        Wave {
            t: 0.45 * qrs,
            sigma: 0.10 * qrs,
            v: r,
        },
        Wave {
            t: 0.78 * qrs,
            sigma: 0.085 * qrs,
            v: [-0.25, -0.15, 0.4],
        },
    ];
    let tdir = unit(add(unit(r), [0.1, 0.0, -0.55]));
    BeatShape {
        pr: Some(uniform(rng, 0.13, 0.19)),
        qrs,
        qtc: uniform(rng, 0.38, 0.43),
        qrs_waves,
        p: [0.09, 0.13, -0.02],
        t: scale(tdir, uniform(rng, 0.28, 0.45)),
        st: [0.0; 3],
    }
}

fn main_r(b: &BeatShape) -> [f64; 3] {
    b.qrs_waves
        .iter()
        .max_by(|a, c| dot(a.v, a.v).total_cmp(&dot(c.v, c.v)))
        .map_or([1.0, 0.0, 0.0], |w| w.v)
}

/// Apply a superclass to a beat; returns the findings it adds.
fn apply_class(class: &str, b: &mut BeatShape, s: f64, rng: &mut ChaCha8Rng) -> Vec<&'static str> {
    match class {
        "MI" => {
            let (u, name): ([f64; 3], &str) = match rng.random_range(0..3) {
                0 => ([0.0, 1.0, 0.0], "IMI"),
                1 => ([0.0, 0.0, -1.0], "AMI"),
                _ => (unit([1.0, -0.3, 0.0]), "LMI"),
            };
            // Necrosis: the infarcted wall stops pulling the QRS towards itself, and an
            // initial vector points away from it (pathological Q >= 40 ms).
            for w in b.qrs_waves.iter_mut() {
                let along = dot(w.v, u);
                if along > 0.0 {
                    w.v = add(w.v, scale(u, -0.7 * along));
                }
            }
            b.qrs_waves.insert(
                0,
                Wave {
                    t: 0.02,
                    sigma: 0.011,
                    v: scale(u, -uniform(rng, 0.35, 0.6) * s),
                },
            );
            let mut f = vec!["MI", name];
            if rng.random_bool(0.5) {
                // Acute: injury current, ST elevation over the territory.
                b.st = add(b.st, scale(u, uniform(rng, 0.18, 0.35) * s));
                f.push("STE");
            } else {
                // Old: T inversion over the territory.
                let along = dot(b.t, u);
                b.t = add(b.t, scale(u, -(along + uniform(rng, 0.15, 0.3) * s)));
                f.push("TINV");
            }
            f
        }
        "STTC" => {
            let r = unit(main_r(b));
            let mut f = vec!["STTC"];
            if rng.random_bool(0.6) {
                b.st = add(b.st, scale(r, -uniform(rng, 0.1, 0.2) * s));
                f.push("STD");
            }
            if f.len() == 1 || rng.random_bool(0.5) {
                let k = uniform(rng, -0.8, 0.15) * s + (1.0 - s) * 0.3;
                b.t = scale(b.t, k.min(0.2));
                f.push("TINV");
            }
            f
        }
        "CD" => {
            let mut f = vec!["CD"];
            match rng.random_range(0..3) {
                0 => {
                    // RBBB: late rightward-anterior forces (rsR' in V1, wide S in I/V6).
                    b.qrs = uniform(rng, 0.125, 0.15);
                    for w in b.qrs_waves.iter_mut() {
                        w.t *= 0.85;
                    }
                    b.qrs_waves.push(Wave {
                        t: b.qrs - 0.03,
                        sigma: 0.016,
                        v: scale([-0.45, 0.05, -0.75], (0.7 + 0.3 * s) * 1.0),
                    });
                    b.t = add(b.t, [0.05, 0.0, 0.12]);
                    f.push("RBBB");
                }
                1 => {
                    // LBBB: no septal q, broad notched leftward-posterior R, discordant ST-T.
                    b.qrs = uniform(rng, 0.135, 0.165);
                    let amp = uniform(rng, 1.2, 1.7);
                    let dir = unit([1.0, 0.25, 0.85]);
                    b.qrs_waves = vec![
                        Wave {
                            t: 0.35 * b.qrs,
                            sigma: 0.14 * b.qrs,
                            v: scale(dir, amp * 0.8),
                        },
                        Wave {
                            t: 0.68 * b.qrs,
                            sigma: 0.13 * b.qrs,
                            v: scale(dir, amp),
                        },
                    ];
                    b.t = scale(dir, -uniform(rng, 0.25, 0.4));
                    b.st = scale(dir, -0.08);
                    f.push("LBBB");
                }
                _ => {
                    // First-degree AV block: PR > 200 ms.
                    b.pr = Some(uniform(rng, 0.21, 0.24) + 0.08 * s);
                    f.push("IAVB");
                }
            }
            f
        }
        "HYP" => {
            // LVH: increased leftward-posterior voltage with strain (lateral ST-T opposite
            // to the QRS).
            // Sokolow-Lyon S(V1) + R(V5) > 3.5 mV at the obvious setting; the axis turns
            // leftwards as the left ventricle dominates.
            let k = 1.0 + uniform(rng, 1.1, 1.5) * s;
            for w in b.qrs_waves.iter_mut() {
                if w.v[0] > 0.15 {
                    w.v = [
                        w.v[0].max(0.75) * k * 1.2,
                        w.v[1] * k * 0.8,
                        (w.v[2] + 0.35) * k,
                    ];
                }
            }
            let r = unit(main_r(b));
            b.t = scale(r, -uniform(rng, 0.2, 0.35) * s);
            b.st = add(b.st, scale(r, -0.06 * s));
            vec!["HYP", "LVH"]
        }
        _ => vec![],
    }
}

/// A premature ventricular beat: no P wave, wide bizarre QRS, discordant T.
fn pvc_beat(rng: &mut ChaCha8Rng) -> BeatShape {
    let dir = unit([
        uniform(rng, -1.0, 1.0),
        uniform(rng, -1.0, 0.5),
        uniform(rng, -1.0, 1.0),
    ]);
    let amp = uniform(rng, 1.5, 2.2);
    let qrs = uniform(rng, 0.13, 0.16);
    BeatShape {
        pr: None,
        qrs,
        qtc: 0.44,
        qrs_waves: vec![
            Wave {
                t: 0.4 * qrs,
                sigma: 0.17 * qrs,
                v: scale(dir, amp),
            },
            Wave {
                t: 0.75 * qrs,
                sigma: 0.12 * qrs,
                v: scale(dir, 0.4 * amp),
            },
        ],
        p: [0.0; 3],
        t: scale(dir, -0.45),
        st: scale(dir, -0.1),
    }
}

/// Generate record `index` of the dataset seeded by `seed`.
pub fn generate(cfg: &SynthConfig, seed: u64, index: usize) -> SynthEcg {
    // One independent stream per record: generation order and thread count do not matter.
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let fs = cfg.fs as f64;
    let n = (cfg.duration_s * fs).round() as usize;
    let s = match cfg.difficulty {
        Difficulty::Obvious => uniform(&mut rng, 0.9, 1.25),
        Difficulty::Subtle => uniform(&mut rng, 0.4, 0.6),
        Difficulty::Mixed => {
            if rng.random_bool(0.5) {
                uniform(&mut rng, 0.9, 1.25)
            } else {
                uniform(&mut rng, 0.4, 0.6)
            }
        }
    };
    // Classes.
    let total: f64 = cfg.class_weights.iter().sum();
    let mut pick = uniform(&mut rng, 0.0, total);
    let mut primary = 0;
    for (i, w) in cfg.class_weights.iter().enumerate() {
        if pick < *w {
            primary = i;
            break;
        }
        pick -= w;
    }
    let mut classes = vec![SUPERCLASSES[primary]];
    if primary != 0 && rng.random_bool(cfg.p_multilabel) {
        let second = loop {
            let c = rng.random_range(1..5);
            if c != primary {
                break c;
            }
        };
        classes.push(SUPERCLASSES[second]);
    }
    let mut beat = normal_beat(&mut rng);
    let mut findings: Vec<&'static str> = Vec::new();
    for c in &classes {
        findings.extend(apply_class(c, &mut beat, s, &mut rng));
    }
    findings.retain(|f| !SUPERCLASSES.contains(f));
    // Rhythm.
    let [p_af, p_brady, p_tachy, p_pac, p_pvc] = cfg.p_rhythm;
    let u: f64 = rng.random();
    let rhythm = if u < p_af {
        "AF"
    } else if u < p_af + p_brady {
        "SBRAD"
    } else if u < p_af + p_brady + p_tachy {
        "STACH"
    } else {
        "SR"
    };
    let hr = match rhythm {
        "SBRAD" => uniform(&mut rng, 42.0, 56.0),
        "STACH" => uniform(&mut rng, 105.0, 140.0),
        "AF" => uniform(&mut rng, 70.0, 125.0),
        _ => uniform(&mut rng, 60.0, 95.0),
    };
    findings.insert(0, rhythm);
    let ectopy = {
        let v: f64 = rng.random();
        if rhythm != "AF" && v < p_pac {
            Some("PAC")
        } else if v < p_pac + p_pvc {
            Some("PVC")
        } else {
            None
        }
    };
    if let Some(e) = ectopy {
        findings.push(e);
    }
    if rhythm == "AF" {
        beat.pr = None;
    }
    let rr0 = 60.0 / hr;
    // Beat times: HRV from Mayer waves (~0.1 Hz) and respiratory sinus arrhythmia (~0.25 Hz).
    let (a_m, a_r) = (
        uniform(&mut rng, 0.015, 0.035),
        uniform(&mut rng, 0.015, 0.04),
    );
    let (ph_m, ph_r) = (
        uniform(&mut rng, 0.0, std::f64::consts::TAU),
        uniform(&mut rng, 0.0, std::f64::consts::TAU),
    );
    let f_r = uniform(&mut rng, 0.2, 0.3);
    let mut t = -uniform(&mut rng, 0.0, rr0) - 0.3;
    let mut beats: Vec<(f64, f64, bool)> = Vec::new(); // (QRS onset, RR, ectopic)
    let mut ectopic_slots: Vec<usize> = Vec::new();
    let expected_beats = (cfg.duration_s / rr0) as usize + 2;
    if ectopy.is_some() {
        let k = rng.random_range(1..=2.min(expected_beats.saturating_sub(3)).max(1));
        for _ in 0..k {
            ectopic_slots.push(rng.random_range(2..expected_beats.max(4) - 1));
        }
    }
    let mut idx = 0;
    while t < cfg.duration_s + 1.0 {
        let mut rr = if rhythm == "AF" {
            rr0 * (1.0 + uniform(&mut rng, 0.15, 0.25) * normal(&mut rng)).clamp(0.55, 1.7)
        } else {
            rr0 * (1.0
                + a_m * (std::f64::consts::TAU * 0.1 * t + ph_m).sin()
                + a_r * (std::f64::consts::TAU * f_r * t + ph_r).sin()
                + 0.01 * normal(&mut rng))
        };
        let is_ect = ectopic_slots.contains(&idx);
        if is_ect {
            rr *= uniform(&mut rng, 0.6, 0.72);
        }
        beats.push((t, rr, is_ect));
        t += rr;
        if is_ect && ectopy == Some("PVC") {
            // Compensatory pause: the sinus node is not reset.
            t += rr0 * 2.0 - 2.0 * rr;
        }
        idx += 1;
    }
    // Synthesize the VCG.
    let mut vcg = vec![[0.0f64; 3]; n];
    let pvc = pvc_beat(&mut rng);
    let mut pac = beat.clone();
    pac.p = [-0.05, -0.08, 0.06];
    pac.pr = Some(beat.pr.unwrap_or(0.15) * 0.85);
    let mut onsets = Vec::new();
    for &(onset, rr, ect) in beats.iter().skip(1) {
        let shape = match (ect, ectopy) {
            (true, Some("PVC")) => &pvc,
            (true, _) => &pac,
            _ => &beat,
        };
        // The RR preceding this beat sets its QT; the onset is where the beat starts.
        let start = onset;
        if start >= 0.0 && start < cfg.duration_s {
            onsets.push((start * fs).round() as usize);
        }
        for w in shape.waves(rr) {
            let c = start + w.t;
            let lo = (((c - 5.0 * w.sigma) * fs).floor().max(0.0)) as usize;
            let hi = ((((c + 5.0 * w.sigma) * fs).ceil()).max(0.0) as usize).min(n);
            for (k, v) in vcg.iter_mut().enumerate().take(hi).skip(lo) {
                let d = (k as f64 / fs - c) / w.sigma;
                let g = (-0.5 * d * d).exp();
                v[0] += w.v[0] * g;
                v[1] += w.v[1] * g;
                v[2] += w.v[2] * g;
            }
        }
    }
    let mut leads = vec![vec![0.0f64; n]; 12];
    for (k, v) in vcg.iter().enumerate() {
        for (j, x) in project(*v).iter().enumerate() {
            leads[j][k] = *x;
        }
    }
    if rhythm == "AF" {
        noise::add_fibrillatory_waves(&mut leads, fs, &mut rng);
    }
    if cfg.noise > 0.0 {
        noise::add_noise(&mut leads, fs, cfg.noise, cfg.mains_hz, &mut rng);
    }
    let mut superclasses: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
    superclasses.sort_by_key(|c| SUPERCLASSES.iter().position(|s| s == c));
    let mut fset: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    fset.sort_by_key(|f| FINDINGS.iter().position(|s| s == f));
    fset.dedup();
    let mean_rr = {
        let in_range: Vec<f64> = beats.iter().map(|b| b.1).collect();
        in_range.iter().sum::<f64>() / in_range.len() as f64
    };
    let truth = Truth {
        superclasses,
        findings: fset,
        heart_rate: 60.0 / mean_rr,
        qrs_s: beat.qrs,
        qt_s: beat.qt(mean_rr),
        pr_s: beat.pr,
        qrs_onsets: onsets,
    };
    let name = format!("synth{index:06}");
    let record = to_record(&name, cfg.fs, &leads, &truth);
    SynthEcg { record, truth }
}

/// Quantise to 1 uV (gain 1000 adu/mV) in a 12-lead record whose comments carry the labels.
fn to_record(name: &str, fs: u32, leads: &[Vec<f64>], truth: &Truth) -> Record {
    let channels = Lead::STANDARD_12
        .iter()
        .zip(leads)
        .map(|(l, x)| Channel {
            lead: l.clone(),
            description: l.name().to_string(),
            gain: 1000.0,
            baseline: 0.0,
            units: "mV".into(),
            adc: x
                .iter()
                .map(|v| (v * 1000.0).round().clamp(-32767.0, 32767.0) as i32)
                .collect(),
            invalid: Some(-32768),
            spans: Vec::new(),
        })
        .collect();
    Record {
        name: name.to_string(),
        fs: fs as f64,
        n_samples: leads[0].len(),
        channels,
        comments: vec![
            "SYNTHETIC ECG generated by evl-ecg ecg-synth (not a patient recording)".into(),
            format!("Labels: {}", truth.superclasses.join(", ")),
            format!("Findings: {}", truth.findings.join(", ")),
        ],
        base_time: None,
    }
}

/// Generate `n` records in parallel (same result for any thread count).
pub fn generate_many(cfg: &SynthConfig, seed: u64, n: usize) -> Vec<SynthEcg> {
    (0..n)
        .into_par_iter()
        .map(|i| generate(cfg, seed, i))
        .collect()
}

/// Write `n` records to `dir` as WFDB format 16 plus `labels.csv` (record, split,
/// superclasses, findings, heart_rate, qrs_ms, qt_ms, pr_ms). Splits: 80/10/10 by index hash.
pub fn write_dataset(dir: &Path, cfg: &SynthConfig, seed: u64, n: usize) -> Result<Vec<Truth>> {
    if cfg.fs == 0 || cfg.duration_s <= 0.0 {
        return Err(Error::Config {
            field: "fs/duration",
            what: "must be positive".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let out: Vec<Result<Truth>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let e = generate(cfg, seed, i);
            ecg_io::write_record(dir, &e.record, 16)
                .map_err(|source| Error::Write { index: i, source })?;
            Ok(e.truth)
        })
        .collect();
    let truths: Vec<Truth> = out.into_iter().collect::<Result<_>>()?;
    let mut csv =
        String::from("record,split,superclasses,findings,heart_rate,qrs_ms,qt_ms,pr_ms\n");
    for (i, t) in truths.iter().enumerate() {
        csv.push_str(&format!(
            "synth{i:06},{},{},{},{:.1},{:.0},{:.0},{}\n",
            split_of(seed, i),
            t.superclasses.join("|"),
            t.findings.join("|"),
            t.heart_rate,
            t.qrs_s * 1000.0,
            t.qt_s * 1000.0,
            t.pr_s
                .map_or(String::new(), |p| format!("{:.0}", p * 1000.0)),
        ));
    }
    let path = dir.join("labels.csv");
    ecg_io::wfdb::atomic_write(&path, csv.as_bytes()).map_err(|e| match e {
        ecg_io::Error::Io { path, source } => Error::Io { path, source },
        other => Error::Write {
            index: 0,
            source: other,
        },
    })?;
    Ok(truths)
}

/// Deterministic 80/10/10 split of record `i`.
pub fn split_of(seed: u64, i: usize) -> &'static str {
    let mut h = seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= h >> 32;
    h = h.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= h >> 32;
    match h % 10 {
        8 => "val",
        9 => "test",
        _ => "train",
    }
}
