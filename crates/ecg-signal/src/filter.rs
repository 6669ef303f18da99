//! Butterworth IIR filters as cascades of biquads (bilinear transform with pre-warping), run
//! forward and backward (`filtfilt`) for zero phase, with odd-extension edge padding as scipy.

use std::f64::consts::PI;

/// One second-order section `b0 + b1 z^-1 + b2 z^-2 / 1 + a1 z^-1 + a2 z^-2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Biquad {
    /// Numerator.
    pub b: [f64; 3],
    /// Denominator (a0 = 1 implied).
    pub a: [f64; 2],
}

/// A cascade of sections.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cascade(pub Vec<Biquad>);

impl Biquad {
    fn lowpass(fs: f64, f0: f64, q: f64) -> Biquad {
        let w = 2.0 * PI * f0 / fs;
        let (s, c) = w.sin_cos();
        let alpha = s / (2.0 * q);
        let a0 = 1.0 + alpha;
        Biquad {
            b: [(1.0 - c) / 2.0 / a0, (1.0 - c) / a0, (1.0 - c) / 2.0 / a0],
            a: [-2.0 * c / a0, (1.0 - alpha) / a0],
        }
    }

    fn highpass(fs: f64, f0: f64, q: f64) -> Biquad {
        let w = 2.0 * PI * f0 / fs;
        let (s, c) = w.sin_cos();
        let alpha = s / (2.0 * q);
        let a0 = 1.0 + alpha;
        Biquad {
            b: [(1.0 + c) / 2.0 / a0, -(1.0 + c) / a0, (1.0 + c) / 2.0 / a0],
            a: [-2.0 * c / a0, (1.0 - alpha) / a0],
        }
    }

    /// Magnitude response at `f` Hz.
    pub fn gain_at(&self, fs: f64, f: f64) -> f64 {
        let w = 2.0 * PI * f / fs;
        let z1 = (w.cos(), -w.sin());
        let z2 = ((2.0 * w).cos(), -(2.0 * w).sin());
        let num = (
            self.b[0] + self.b[1] * z1.0 + self.b[2] * z2.0,
            self.b[1] * z1.1 + self.b[2] * z2.1,
        );
        let den = (
            1.0 + self.a[0] * z1.0 + self.a[1] * z2.0,
            self.a[0] * z1.1 + self.a[1] * z2.1,
        );
        (num.0.hypot(num.1)) / (den.0.hypot(den.1))
    }
}

/// Q factors of the biquads of an even-order Butterworth filter.
fn butterworth_qs(order: usize) -> Vec<f64> {
    assert!(order >= 2 && order.is_multiple_of(2), "even orders only");
    (0..order / 2)
        .map(|k| 1.0 / (2.0 * (PI * (2 * k + 1) as f64 / (2 * order) as f64).sin()))
        .collect()
}

/// Even-order Butterworth low-pass at `cutoff` Hz.
pub fn lowpass(fs: f64, cutoff: f64, order: usize) -> Cascade {
    Cascade(
        butterworth_qs(order)
            .into_iter()
            .map(|q| Biquad::lowpass(fs, cutoff, q))
            .collect(),
    )
}

/// Even-order Butterworth high-pass at `cutoff` Hz (baseline-wander removal at 0.5 Hz).
pub fn highpass(fs: f64, cutoff: f64, order: usize) -> Cascade {
    Cascade(
        butterworth_qs(order)
            .into_iter()
            .map(|q| Biquad::highpass(fs, cutoff, q))
            .collect(),
    )
}

/// Band-pass as high-pass then low-pass, each Butterworth of `order`.
pub fn bandpass(fs: f64, low: f64, high: f64, order: usize) -> Cascade {
    let mut c = highpass(fs, low, order);
    c.0.extend(lowpass(fs, high, order).0);
    c
}

/// Notch at `f0` Hz with quality `q` (30 leaves neighbouring ECG content intact).
pub fn notch(fs: f64, f0: f64, q: f64) -> Cascade {
    let w = 2.0 * PI * f0 / fs;
    let (s, c) = w.sin_cos();
    let alpha = s / (2.0 * q);
    let a0 = 1.0 + alpha;
    Cascade(vec![Biquad {
        b: [1.0 / a0, -2.0 * c / a0, 1.0 / a0],
        a: [-2.0 * c / a0, (1.0 - alpha) / a0],
    }])
}

impl Cascade {
    /// Magnitude response at `f` Hz (one pass).
    pub fn gain_at(&self, fs: f64, f: f64) -> f64 {
        self.0.iter().map(|b| b.gain_at(fs, f)).product()
    }

    /// Run forward once, in place, from steady state for the first value (`lfilter_zi`).
    fn run(&self, x: &mut [f64]) {
        for bq in &self.0 {
            let [b0, b1, b2] = bq.b;
            let [a1, a2] = bq.a;
            // Steady-state direct-form-II-transposed state for a constant input x[0].
            let x0 = x.first().copied().unwrap_or(0.0);
            let dc = (b0 + b1 + b2) / (1.0 + a1 + a2);
            let y0 = dc * x0;
            let mut z2 = b2 * x0 - a2 * y0;
            let mut z1 = b1 * x0 - a1 * y0 + z2;
            for v in x.iter_mut() {
                let xi = *v;
                let yi = b0 * xi + z1;
                z1 = b1 * xi - a1 * yi + z2;
                z2 = b2 * xi - a2 * yi;
                *v = yi;
            }
        }
    }
}

/// Zero-phase filtering: odd extension of `3 * (2 * sections + 1)` samples at each end (as
/// scipy's `filtfilt` pads), forward pass, backward pass, trim.
pub fn filtfilt(c: &Cascade, x: &[f32]) -> Vec<f32> {
    let n = x.len();
    if n == 0 || c.0.is_empty() {
        return x.to_vec();
    }
    let pad = (3 * (2 * c.0.len() + 1)).min(n - 1);
    let mut buf = Vec::with_capacity(n + 2 * pad);
    let (first, last) = (x[0] as f64, x[n - 1] as f64);
    for k in (1..=pad).rev() {
        buf.push(2.0 * first - x[k] as f64);
    }
    buf.extend(x.iter().map(|&v| v as f64));
    for k in 1..=pad {
        buf.push(2.0 * last - x[n - 1 - k] as f64);
    }
    c.run(&mut buf);
    buf.reverse();
    c.run(&mut buf);
    buf.reverse();
    buf[pad..pad + n].iter().map(|&v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(fs: f64, n: usize, f: f64, a: f64) -> Vec<f32> {
        (0..n)
            .map(|k| (a * (2.0 * PI * f * k as f64 / fs).sin()) as f32)
            .collect()
    }

    fn rms(x: &[f32]) -> f64 {
        (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    }

    #[test]
    fn butterworth_is_3db_at_cutoff() {
        let lp = lowpass(500.0, 40.0, 4);
        assert!((lp.gain_at(500.0, 40.0) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9);
        assert!((lp.gain_at(500.0, 1.0) - 1.0).abs() < 1e-6);
        let hp = highpass(500.0, 0.5, 2);
        assert!((hp.gain_at(500.0, 0.5) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9);
    }

    #[test]
    fn zero_phase_bandpass_keeps_inband_and_removes_wander_and_mains() {
        let fs = 500.0;
        let n = 5000;
        let ecg_band = sine(fs, n, 10.0, 1.0);
        let wander = sine(fs, n, 0.1, 2.0);
        let mains = sine(fs, n, 50.0, 0.3);
        let x: Vec<f32> = (0..n).map(|k| ecg_band[k] + wander[k] + mains[k]).collect();
        let y = filtfilt(&bandpass(fs, 0.5, 40.0, 2), &x);
        let y = filtfilt(&notch(fs, 50.0, 30.0), &y);
        let mid = 500..4500;
        let err: Vec<f32> = mid.clone().map(|k| y[k] - ecg_band[k]).collect();
        // Zero phase: the 10 Hz component is neither shifted nor attenuated noticeably.
        assert!(rms(&err) < 0.02, "residual rms {}", rms(&err));
    }

    #[test]
    fn constant_input_has_no_edge_transient_through_lowpass() {
        let x = vec![1.5f32; 300];
        let y = filtfilt(&lowpass(500.0, 40.0, 4), &x);
        assert!(y.iter().all(|v| (v - 1.5).abs() < 1e-5));
    }
}
