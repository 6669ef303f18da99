//! QRS detection after Pan & Tompkins (IEEE TBME 1985): 5-15 Hz band-pass, derivative,
//! squaring, 150 ms moving-window integration, adaptive signal/noise thresholds with
//! search-back and T-wave rejection. Every stage is zero-phase here (filtfilt, centred
//! derivative and window), so no group-delay bookkeeping is needed.

use crate::filter::{bandpass, filtfilt};

/// Detector settings (defaults are the published ones).
#[derive(Debug, Clone)]
pub struct QrsConfig {
    /// Band-pass edges in Hz.
    pub band: (f64, f64),
    /// Integration window in seconds.
    pub window_s: f64,
    /// Refractory period in seconds.
    pub refractory_s: f64,
    /// Peaks closer than this to the previous QRS are tested for being T waves.
    pub t_wave_s: f64,
}

impl Default for QrsConfig {
    fn default() -> Self {
        QrsConfig {
            band: (5.0, 15.0),
            window_s: 0.150,
            refractory_s: 0.200,
            t_wave_s: 0.360,
        }
    }
}

/// Feature signal: integrated squared slope summed over the given leads.
fn feature(leads: &[&[f32]], fs: f64, cfg: &QrsConfig) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = leads.first().map_or(0, |l| l.len());
    let bp = bandpass(fs, cfg.band.0, cfg.band.1, 2);
    let mut energy = vec![0.0f64; n];
    let mut slope_abs = vec![0.0f64; n];
    let mut filt_abs = vec![0.0f64; n];
    for lead in leads {
        let f = filtfilt(&bp, lead);
        for k in 2..n.saturating_sub(2) {
            let d =
                (2.0 * f[k + 2] as f64 + f[k + 1] as f64 - f[k - 1] as f64 - 2.0 * f[k - 2] as f64)
                    * fs
                    / 8.0;
            energy[k] += d * d;
            slope_abs[k] += d.abs();
        }
        for k in 0..n {
            filt_abs[k] += (f[k] as f64).abs();
        }
    }
    let w = ((cfg.window_s * fs).round() as usize).max(1);
    let half = w / 2;
    let mut prefix = vec![0.0f64; n + 1];
    for k in 0..n {
        prefix[k + 1] = prefix[k] + energy[k];
    }
    let integ = (0..n)
        .map(|k| {
            let lo = k.saturating_sub(half);
            let hi = (k + w - half).min(n);
            (prefix[hi] - prefix[lo]) / w as f64
        })
        .collect();
    (integ, slope_abs, filt_abs)
}

/// Sample indices of detected QRS complexes (at the band-passed signal's peak) in one or
/// more time-aligned leads.
pub fn detect_qrs(leads: &[&[f32]], fs: f64, cfg: &QrsConfig) -> Vec<usize> {
    let n = leads.first().map_or(0, |l| l.len());
    if n < (fs * 0.5) as usize {
        return Vec::new();
    }
    let (integ, slope, filt_abs) = feature(leads, fs, cfg);
    let refractory = (cfg.refractory_s * fs) as usize;
    let t_wave = (cfg.t_wave_s * fs) as usize;
    // Candidate peaks: local maxima of the integrated signal, at least 200 ms apart
    // (keep the larger of two close maxima).
    let mut cands: Vec<usize> = Vec::new();
    for k in 1..n - 1 {
        if integ[k] > integ[k - 1] && integ[k] >= integ[k + 1] {
            match cands.last() {
                Some(&p) if k - p < refractory => {
                    if integ[k] > integ[p] {
                        *cands.last_mut().expect("non-empty") = k;
                    }
                }
                _ => cands.push(k),
            }
        }
    }
    // Learning phase: first 2 s.
    let learn = ((2.0 * fs) as usize).min(n);
    let max0 = integ[..learn].iter().cloned().fold(0.0, f64::max);
    let mean0 = integ[..learn].iter().sum::<f64>() / learn as f64;
    let mut spki = 0.25 * max0;
    let mut npki = 0.5 * mean0;
    let max_slope = |k: usize| -> f64 {
        let lo = k.saturating_sub(refractory / 2);
        let hi = (k + refractory / 2).min(n);
        slope[lo..hi].iter().cloned().fold(0.0, f64::max)
    };
    let mut qrs: Vec<usize> = Vec::new();
    let mut last_slope = 0.0;
    let mut rr: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < cands.len() {
        let k = cands[i];
        let thr = npki + 0.25 * (spki - npki);
        let mut accepted = false;
        if integ[k] > thr {
            let is_t = qrs
                .last()
                .is_some_and(|&p| k - p < t_wave && max_slope(k) < 0.5 * last_slope);
            if !is_t {
                accepted = true;
                spki = 0.125 * integ[k] + 0.875 * spki;
            } else {
                npki = 0.125 * integ[k] + 0.875 * npki;
            }
        } else {
            npki = 0.125 * integ[k] + 0.875 * npki;
        }
        if accepted {
            // Search back over a missed beat: no QRS for 1.66 x the mean RR.
            if let (Some(&p), true) = (qrs.last(), rr.len() >= 2) {
                let mean_rr =
                    rr.iter().rev().take(8).sum::<usize>() as f64 / rr.len().min(8) as f64;
                if (k - p) as f64 > 1.66 * mean_rr {
                    let best = cands[..i]
                        .iter()
                        .rev()
                        .take_while(|&&c| c > p)
                        .filter(|&&c| c - p >= refractory && k - c >= refractory)
                        .filter(|&&c| integ[c] > 0.5 * thr)
                        .max_by(|&&a, &&b| integ[a].total_cmp(&integ[b]));
                    if let Some(&c) = best {
                        spki = 0.25 * integ[c] + 0.75 * spki;
                        rr.push(c - p);
                        qrs.push(c);
                    }
                }
            }
            if let Some(&p) = qrs.last() {
                rr.push(k - p);
            }
            last_slope = max_slope(k);
            qrs.push(k);
        }
        i += 1;
    }
    // Fiducial point: the band-passed peak within +-75 ms of the integrator peak.
    let h = (0.075 * fs) as usize;
    qrs.iter()
        .map(|&k| {
            let lo = k.saturating_sub(h);
            let hi = (k + h + 1).min(n);
            (lo..hi)
                .max_by(|&a, &b| filt_abs[a].total_cmp(&filt_abs[b]))
                .unwrap_or(k)
        })
        .collect()
}

/// Heart rate in beats/min from the median RR interval, `None` with fewer than two beats.
pub fn heart_rate_bpm(qrs: &[usize], fs: f64) -> Option<f64> {
    if qrs.len() < 2 {
        return None;
    }
    let mut rr: Vec<usize> = qrs.windows(2).map(|w| w[1] - w[0]).collect();
    rr.sort_unstable();
    let m = rr.len();
    let med = if m % 2 == 1 {
        rr[m / 2] as f64
    } else {
        (rr[m / 2 - 1] + rr[m / 2]) as f64 / 2.0
    };
    Some(60.0 * fs / med)
}

/// Beat-by-beat agreement of detections with reference annotations: each reference beat is
/// matched to at most one detection within `tolerance` samples (greedy in time order).
/// Returns (true positives, false negatives, false positives).
pub fn match_beats(
    reference: &[usize],
    detected: &[usize],
    tolerance: usize,
) -> (usize, usize, usize) {
    let (mut i, mut j) = (0, 0);
    let (mut tp, mut fneg, mut fpos) = (0, 0, 0);
    while i < reference.len() && j < detected.len() {
        let (r, d) = (reference[i], detected[j]);
        if r.abs_diff(d) <= tolerance {
            tp += 1;
            i += 1;
            j += 1;
        } else if d < r {
            fpos += 1;
            j += 1;
        } else {
            fneg += 1;
            i += 1;
        }
    }
    fneg += reference.len() - i;
    fpos += detected.len() - j;
    (tp, fneg, fpos)
}
