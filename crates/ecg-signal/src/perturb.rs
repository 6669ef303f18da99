//! Clinical perturbations of a record, for robustness evaluation: white noise at a given SNR,
//! baseline wander, powerline interference, electrode-motion artefacts, lead dropout,
//! amplitude scaling and time shift.
//!
//! Each perturbation rewrites the record's ADC samples (physical value -> perturbed value ->
//! ADC with the channel's own gain and baseline), so every later stage (rendering, model input)
//! sees it exactly as it would see a recording with that artefact. Random parts are drawn from
//! a ChaCha8 stream seeded per (seed, record name), so a run is reproducible and independent
//! of thread count and record order.
//!
//! The electrode-motion artefact is SYNTHETIC: the MIT-BIH Noise Stress Test Database `em`
//! record is not bundled, so we model its character (low-frequency, large, bursty baseline
//! excursions that overlap the QRS band) as band-limited 0.5-8 Hz noise gated into bursts of
//! 0.3-1.5 s, scaled to the requested SNR. SNR is per lead: `10 log10(P_signal / P_noise)`
//! with `P_signal` the variance of the clean lead.

use std::fmt;
use std::str::FromStr;

use ecg_io::{Lead, Record};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::filter::{bandpass, filtfilt};

/// One perturbation.
#[derive(Debug, Clone, PartialEq)]
pub enum Perturbation {
    /// Additive white Gaussian noise at this SNR (dB) per lead.
    Noise {
        /// Signal-to-noise ratio, dB.
        snr_db: f64,
    },
    /// Baseline wander: respiration-like and slower sinusoids (0.05-0.5 Hz) with this peak
    /// amplitude (mV), common to all leads up to a random per-lead gain in 0.5..1.
    Wander {
        /// Peak amplitude, mV.
        mv: f64,
    },
    /// Powerline interference: a sinusoid at `hz` with amplitude `mv` (random phase per lead).
    Powerline {
        /// Mains frequency, Hz.
        hz: f64,
        /// Amplitude, mV.
        mv: f64,
    },
    /// SYNTHETIC electrode-motion artefact at this SNR (dB) per lead (see the module docs).
    ElectrodeMotion {
        /// Signal-to-noise ratio, dB.
        snr_db: f64,
    },
    /// These leads are lost: their samples become a flat 0 mV line, as a disconnected
    /// electrode reads after the amplifier's lead-off clamp.
    LeadDropout {
        /// Leads removed.
        leads: Vec<Lead>,
    },
    /// Every lead multiplied by this factor.
    Amplitude {
        /// Scale factor.
        scale: f64,
    },
    /// The signal moved later by `ms` (earlier when negative); the uncovered edge repeats the
    /// first (last) sample, the length stays the same.
    TimeShift {
        /// Shift, milliseconds.
        ms: f64,
    },
}

/// A perturbation spec that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("perturbation `{spec}`: {what}")]
pub struct PerturbError {
    /// The spec as given.
    pub spec: String,
    /// What is wrong.
    pub what: String,
}

impl FromStr for Perturbation {
    type Err = PerturbError;

    /// `noise:SNR_DB`, `wander[:MV]` (0.5), `powerline[:HZ[:MV]]` (50, 0.1),
    /// `electrode-motion[:SNR_DB]` (6), `lead-dropout:LEAD,LEAD..`, `amplitude:S`,
    /// `time-shift:MS`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |what: String| PerturbError {
            spec: s.to_string(),
            what,
        };
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let args: Vec<&str> = parts.map(str::trim).collect();
        let num = |i: usize, name: &str, default: Option<f64>| -> Result<f64, PerturbError> {
            match args.get(i) {
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| bad(format!("{name} `{a}` is not a finite number"))),
                None => default.ok_or_else(|| bad(format!("needs {name}, e.g. `{kind}:10`"))),
            }
        };
        let max_args = |n: usize| {
            if args.len() > n {
                Err(bad(format!("takes at most {n} argument(s)")))
            } else {
                Ok(())
            }
        };
        let p = match kind.as_str() {
            "noise" => {
                max_args(1)?;
                Perturbation::Noise {
                    snr_db: num(0, "an SNR in dB", None)?,
                }
            }
            "wander" => {
                max_args(1)?;
                Perturbation::Wander {
                    mv: num(0, "an amplitude in mV", Some(0.5))?,
                }
            }
            "powerline" => {
                max_args(2)?;
                let hz = num(0, "a frequency in Hz", Some(50.0))?;
                if hz <= 0.0 {
                    return Err(bad("the frequency must be positive".into()));
                }
                Perturbation::Powerline {
                    hz,
                    mv: num(1, "an amplitude in mV", Some(0.1))?,
                }
            }
            "electrode-motion" | "em" => {
                max_args(1)?;
                Perturbation::ElectrodeMotion {
                    snr_db: num(0, "an SNR in dB", Some(6.0))?,
                }
            }
            "lead-dropout" => {
                max_args(1)?;
                let list = args
                    .first()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| bad("needs leads, e.g. `lead-dropout:V1,V2`".into()))?;
                let leads: Vec<Lead> = list.split(',').map(|l| Lead::parse(l.trim())).collect();
                if let Some(Lead::Other(name)) = leads.iter().find(|l| matches!(l, Lead::Other(_)))
                {
                    return Err(bad(format!(
                        "`{name}` is not one of the twelve standard leads"
                    )));
                }
                Perturbation::LeadDropout { leads }
            }
            "amplitude" => {
                max_args(1)?;
                Perturbation::Amplitude {
                    scale: num(0, "a scale factor", None)?,
                }
            }
            "time-shift" => {
                max_args(1)?;
                Perturbation::TimeShift {
                    ms: num(0, "a shift in ms", None)?,
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown kind `{other}` (noise, wander, powerline, electrode-motion, \
                     lead-dropout, amplitude, time-shift)"
                )));
            }
        };
        Ok(p)
    }
}

impl fmt::Display for Perturbation {
    /// The canonical spec, which parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Perturbation::Noise { snr_db } => write!(f, "noise:{snr_db}"),
            Perturbation::Wander { mv } => write!(f, "wander:{mv}"),
            Perturbation::Powerline { hz, mv } => write!(f, "powerline:{hz}:{mv}"),
            Perturbation::ElectrodeMotion { snr_db } => write!(f, "electrode-motion:{snr_db}"),
            Perturbation::LeadDropout { leads } => {
                let names: Vec<&str> = leads.iter().map(Lead::name).collect();
                write!(f, "lead-dropout:{}", names.join(","))
            }
            Perturbation::Amplitude { scale } => write!(f, "amplitude:{scale}"),
            Perturbation::TimeShift { ms } => write!(f, "time-shift:{ms}"),
        }
    }
}

fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller; u1 in (0, 1] so the log is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn variance(x: &[f64]) -> f64 {
    let (mut n, mut sum, mut sq) = (0.0, 0.0, 0.0);
    for &v in x.iter().filter(|v| v.is_finite()) {
        n += 1.0;
        sum += v;
        sq += v * v;
    }
    if n == 0.0 {
        return 0.0;
    }
    let m = sum / n;
    (sq / n - m * m).max(0.0)
}

/// Scale `noise` so that `10 log10(var(signal) / var(noise)) = snr_db`, then add it.
fn add_at_snr(signal: &mut [f64], noise: &[f64], snr_db: f64) {
    let (ps, pn) = (variance(signal), variance(noise));
    if pn == 0.0 {
        return;
    }
    let g = (ps / (pn * 10f64.powf(snr_db / 10.0))).sqrt();
    for (s, n) in signal.iter_mut().zip(noise) {
        *s += g * n;
    }
}

fn electrode_motion(n: usize, fs: f64, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let white: Vec<f32> = (0..n).map(|_| gaussian(rng) as f32).collect();
    let hi = (8.0f64).min(0.45 * fs);
    let band: Vec<f64> = if n > 30 && hi > 0.6 {
        filtfilt(&bandpass(fs, 0.5, hi, 2), &white)
            .into_iter()
            .map(f64::from)
            .collect()
    } else {
        white.into_iter().map(f64::from).collect()
    };
    // Gate into bursts covering about 40 % of the record, with 50 ms raised-cosine edges.
    let mut gate = vec![0.0f64; n];
    let edge = ((0.05 * fs) as usize).max(1);
    let mut covered = 0usize;
    let mut guard = 0;
    while covered < (2 * n) / 5 && guard < 64 {
        guard += 1;
        let len = ((rng.random_range(0.3..1.5) * fs) as usize).clamp(1, n);
        let start = rng.random_range(0..=(n - len));
        for k in 0..len {
            let ramp_in = ((k as f64 + 0.5) / edge as f64).min(1.0);
            let ramp_out = (((len - k) as f64 - 0.5) / edge as f64).min(1.0);
            let w = 0.5 - 0.5 * (std::f64::consts::PI * ramp_in.min(ramp_out)).cos();
            if gate[start + k] == 0.0 {
                covered += 1;
            }
            gate[start + k] = gate[start + k].max(w);
        }
    }
    band.iter().zip(&gate).map(|(b, g)| b * g).collect()
}

fn stream(seed: u64, record: &str, salt: u64) -> ChaCha8Rng {
    // FNV-1a of the record name: the stream does not depend on record order.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in record.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ h ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

impl Perturbation {
    /// Apply to `record` in place. Random parts come from `seed` and the record's name.
    /// Channels in non-voltage units are left alone by the additive perturbations.
    pub fn apply(&self, record: &mut Record, seed: u64) {
        let fs = record.fs;
        let name = record.name.clone();
        let mut rng = stream(seed, &name, 1);
        // Shared parts drawn once per record, so every lead sees the same artefact shape.
        let wander: Vec<(f64, f64)> = (0..3)
            .map(|_| {
                (
                    rng.random_range(0.05..0.5),
                    rng.random_range(0.0..std::f64::consts::TAU),
                )
            })
            .collect();
        for ch in record.channels.iter_mut() {
            let to_mv = ch.mv_factor();
            let mut x: Vec<f64> = ch.physical();
            let n = x.len();
            if n == 0 {
                continue;
            }
            let voltage = to_mv.is_some();
            // Millivolts expressed in the channel's units.
            let mv = 1.0 / to_mv.unwrap_or(1.0);
            match self {
                Perturbation::Noise { snr_db } if voltage => {
                    let noise: Vec<f64> = (0..n).map(|_| gaussian(&mut rng)).collect();
                    add_at_snr(&mut x, &noise, *snr_db);
                }
                Perturbation::Wander { mv: amp } if voltage => {
                    let g = rng.random_range(0.5..1.0);
                    // The three components' peaks add up to at most `amp`.
                    for (k, v) in x.iter_mut().enumerate() {
                        let t = k as f64 / fs;
                        let w: f64 = wander
                            .iter()
                            .map(|(f, p)| (std::f64::consts::TAU * f * t + p).sin())
                            .sum::<f64>()
                            / 3.0;
                        *v += amp * mv * g * w;
                    }
                }
                Perturbation::Powerline { hz, mv: amp } if voltage => {
                    let ph = rng.random_range(0.0..std::f64::consts::TAU);
                    for (k, v) in x.iter_mut().enumerate() {
                        let t = k as f64 / fs;
                        *v += amp * mv * (std::f64::consts::TAU * hz * t + ph).sin();
                    }
                }
                Perturbation::ElectrodeMotion { snr_db } if voltage => {
                    let noise = electrode_motion(n, fs, &mut rng);
                    add_at_snr(&mut x, &noise, *snr_db);
                }
                Perturbation::LeadDropout { leads } if leads.contains(&ch.lead) => {
                    x.iter_mut()
                        .filter(|v| v.is_finite())
                        .for_each(|v| *v = 0.0);
                }
                Perturbation::Amplitude { scale } => x.iter_mut().for_each(|v| *v *= scale),
                Perturbation::TimeShift { ms } => {
                    let shift = (ms * 1e-3 * fs).round() as i64;
                    let src = x.clone();
                    for (k, v) in x.iter_mut().enumerate() {
                        let j = (k as i64 - shift).clamp(0, n as i64 - 1);
                        *v = src[j as usize];
                    }
                }
                _ => {}
            }
            let (b, g) = (ch.baseline, ch.gain);
            // Every sample is written back with the channel's own parameters, so the
            // stretches of a multi-segment record (other gains) no longer apply; a missing
            // sample stays missing under the channel's own marker.
            let spans = !ch.spans.is_empty();
            for (a, v) in ch.adc.iter_mut().zip(&x) {
                if v.is_finite() {
                    *a = (v * g + b)
                        .round()
                        .clamp(i32::MIN as f64 + 1.0, i32::MAX as f64)
                        as i32;
                } else if spans {
                    *a = ch.invalid.unwrap_or(i32::MIN);
                }
            }
            if spans {
                if ch.invalid.is_none() {
                    ch.invalid = Some(i32::MIN);
                }
                ch.spans.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_bad_specs_say_why() {
        for s in [
            "noise:20",
            "wander:0.5",
            "powerline:60:0.2",
            "electrode-motion:6",
            "lead-dropout:V1,aVR",
            "amplitude:0.5",
            "time-shift:-40",
        ] {
            let p: Perturbation = s.parse().expect(s);
            assert_eq!(p.to_string().parse::<Perturbation>().expect(s), p);
        }
        assert_eq!(
            "powerline".parse::<Perturbation>().expect("defaults"),
            Perturbation::Powerline { hz: 50.0, mv: 0.1 }
        );
        for (s, frag) in [
            ("noise", "needs an SNR"),
            ("noise:abc", "not a finite number"),
            ("lead-dropout:V7", "`V7`"),
            ("shake:3", "unknown kind"),
            ("amplitude:1:2", "at most 1"),
        ] {
            let e = s.parse::<Perturbation>().expect_err(s).to_string();
            assert!(e.contains(frag) && e.contains(s), "{s}: {e}");
        }
    }

    #[test]
    fn an_empty_record_is_left_alone() {
        let mut r = Record {
            name: "empty".into(),
            fs: 500.0,
            n_samples: 0,
            channels: vec![ecg_io::Channel {
                lead: Lead::II,
                description: "II".into(),
                gain: 1000.0,
                baseline: 0.0,
                units: "mV".into(),
                adc: Vec::new(),
                invalid: None,
                spans: Vec::new(),
            }],
            comments: Vec::new(),
            base_time: None,
        };
        for spec in [
            "electrode-motion:0",
            "time-shift:40",
            "noise:5",
            "wander",
            "powerline",
        ] {
            spec.parse::<Perturbation>().expect(spec).apply(&mut r, 1);
        }
        assert!(r.channels[0].adc.is_empty());
    }
}
