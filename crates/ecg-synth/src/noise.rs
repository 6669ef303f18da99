//! Noise at the electrodes (RA, LA, LL, V1-V6), turned into lead noise by the lead
//! definitions, so I + III = II and the augmented leads stay consistent under noise:
//! baseline wander (respiration and movement, < 0.5 Hz), muscle (EMG, broadband), powerline
//! interference, and electrode-motion artefacts (a step with exponential recovery).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

fn u(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

#[allow(clippy::needless_range_loop)] // indexes electrodes and leads in step
/// Add noise of overall scale `level` (1 = a typical resting ECG) to the 12 leads (order I,
/// II, III, aVR, aVL, aVF, V1-V6).
pub fn add_noise(leads: &mut [Vec<f64>], fs: f64, level: f64, mains: f64, rng: &mut ChaCha8Rng) {
    let n = leads[0].len();
    // Electrodes: 0 RA, 1 LA, 2 LL, 3..9 V1..V6.
    let mut e = vec![vec![0.0f64; n]; 9];
    let resp_f = u(rng, 0.15, 0.35);
    let resp_ph = u(rng, 0.0, std::f64::consts::TAU);
    let line_ph = u(rng, 0.0, std::f64::consts::TAU);
    let line_amp = level * u(rng, 0.0, 0.02);
    for sig in e.iter_mut() {
        let wander: Vec<(f64, f64, f64)> = (0..2)
            .map(|_| {
                (
                    u(rng, 0.05, 0.45),
                    level * u(rng, 0.01, 0.08),
                    u(rng, 0.0, std::f64::consts::TAU),
                )
            })
            .collect();
        let resp_amp = level * u(rng, 0.0, 0.06);
        let emg = level * u(rng, 0.003, 0.015);
        let line_gain = u(rng, 0.5, 1.5);
        let mut prev = 0.0f64;
        for (k, v) in sig.iter_mut().enumerate() {
            let t = k as f64 / fs;
            let mut x = resp_amp * (std::f64::consts::TAU * resp_f * t + resp_ph).sin();
            for (f, a, p) in &wander {
                x += a * (std::f64::consts::TAU * f * t + p).sin();
            }
            // EMG: white noise through a light first-order smoother (energy 20-150 Hz).
            let w = emg * (rng.random::<f64>() * 2.0 - 1.0) * 1.7;
            prev = 0.6 * prev + 0.4 * w;
            x += prev;
            x += line_amp * line_gain * (std::f64::consts::TAU * mains * t + line_ph).sin();
            *v = x;
        }
    }
    // Electrode motion: with probability 0.3 per record, one electrode jumps and recovers.
    if rng.random_bool((0.3 * level).min(1.0)) {
        let which = rng.random_range(0..9);
        let t0 = rng.random_range(0..n);
        let amp = level * u(rng, 0.15, 0.5) * if rng.random_bool(0.5) { 1.0 } else { -1.0 };
        let tau = u(rng, 0.2, 0.6) * fs;
        for k in t0..n {
            e[which][k] += amp * (-((k - t0) as f64) / tau).exp();
        }
    }
    for k in 0..n {
        let (ra, la, ll) = (e[0][k], e[1][k], e[2][k]);
        let wct = (ra + la + ll) / 3.0;
        let add = [
            la - ra,
            ll - ra,
            ll - la,
            ra - (la + ll) / 2.0,
            la - (ra + ll) / 2.0,
            ll - (ra + la) / 2.0,
            e[3][k] - wct,
            e[4][k] - wct,
            e[5][k] - wct,
            e[6][k] - wct,
            e[7][k] - wct,
            e[8][k] - wct,
        ];
        for (j, a) in add.iter().enumerate() {
            leads[j][k] += a;
        }
    }
}

#[allow(clippy::needless_range_loop)] // time index drives the waveform
/// Atrial fibrillation's f-waves: a chaotic 4-9 Hz atrial dipole, largest in V1 and the
/// inferior leads.
pub fn add_fibrillatory_waves(leads: &mut [Vec<f64>], fs: f64, rng: &mut ChaCha8Rng) {
    let n = leads[0].len();
    let comps: Vec<(f64, f64, [f64; 3])> = (0..3)
        .map(|_| {
            (
                u(rng, 4.0, 9.0),
                u(rng, 0.0, std::f64::consts::TAU),
                [
                    u(rng, -0.02, 0.02),
                    u(rng, 0.01, 0.04),
                    u(rng, -0.06, -0.02),
                ],
            )
        })
        .collect();
    for k in 0..n {
        let t = k as f64 / fs;
        let mut v = [0.0f64; 3];
        for (f, p, a) in &comps {
            // Slow frequency drift makes the waves irregular.
            let s = (std::f64::consts::TAU * f * t + p + 0.8 * (0.7 * t).sin()).sin();
            for d in 0..3 {
                v[d] += a[d] * s;
            }
        }
        for (j, x) in crate::model::project(v).iter().enumerate() {
            leads[j][k] += x;
        }
    }
}
