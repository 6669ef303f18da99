//! Rational resampling with a Kaiser-windowed sinc anti-aliasing filter applied polyphase
//! (the method of scipy's `resample_poly`): band-limited, linear-phase, delay compensated.

/// Greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Zeroth-order modified Bessel function of the first kind (series; converges fast for the
/// Kaiser betas used here).
fn bessel_i0(x: f64) -> f64 {
    let mut sum = 1.0;
    let mut term = 1.0;
    let q = x * x / 4.0;
    for k in 1..200 {
        term *= q / (k as f64 * k as f64);
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    sum
}

/// Low-pass FIR prototype for up/down resampling: cutoff at the lower of the two Nyquist
/// rates, `2 * half_len * max(up, down) + 1` taps, Kaiser beta 5 (scipy's defaults), gain
/// `up` so that zero-stuffing keeps the amplitude.
fn design(up: usize, down: usize) -> Vec<f64> {
    let m = up.max(down);
    let half = 10 * m;
    let n = 2 * half + 1;
    let cutoff = 1.0 / m as f64; // fraction of the upsampled Nyquist
    let beta = 5.0;
    let i0b = bessel_i0(beta);
    (0..n)
        .map(|k| {
            let t = k as f64 - half as f64;
            let sinc = if t == 0.0 {
                cutoff
            } else {
                (std::f64::consts::PI * cutoff * t).sin() / (std::f64::consts::PI * t)
            };
            let r = t / half as f64;
            let w = bessel_i0(beta * (1.0 - r * r).max(0.0).sqrt()) / i0b;
            sinc * w * up as f64
        })
        .collect()
}

/// Resample `x` from `fs_in` to `fs_out` Hz (both integers, as ECG rates are). The output
/// has `ceil(len * fs_out / fs_in)` samples; sample 0 stays at time 0.
pub fn resample(x: &[f32], fs_in: u32, fs_out: u32) -> Vec<f32> {
    assert!(fs_in > 0 && fs_out > 0, "sampling rates are positive");
    if fs_in == fs_out || x.is_empty() {
        return x.to_vec();
    }
    let g = gcd(fs_in as usize, fs_out as usize);
    let (up, down) = (fs_out as usize / g, fs_in as usize / g);
    let h = design(up, down);
    let half = (h.len() - 1) / 2;
    let n_out = (x.len() * up).div_ceil(down);
    let n_in = x.len() as isize;
    let mut y = Vec::with_capacity(n_out);
    for m in 0..n_out {
        // Upsampled-domain position of output m, centred on the filter.
        let pos = (m * down + half) as isize;
        // Input samples n with 0 <= pos - n*up < len(h).
        let n_hi = (pos / up as isize).min(n_in - 1);
        let n_lo = ((pos - h.len() as isize + 1).max(0) as usize).div_ceil(up) as isize;
        let mut acc = 0.0f64;
        let mut n = n_lo;
        while n <= n_hi {
            acc += h[(pos - n * up as isize) as usize] * x[n as usize] as f64;
            n += 1;
        }
        y.push(acc as f32);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(fs: f64, n: usize, f: f64) -> Vec<f32> {
        (0..n)
            .map(|k| (2.0 * std::f64::consts::PI * f * k as f64 / fs).sin() as f32)
            .collect()
    }

    /// Resampling a 5 Hz sine between every pair of ECG rates reproduces the sine sampled at
    /// the new rate (away from the first and last 0.2 s, where the filter sees zeros).
    #[test]
    fn sine_between_all_ecg_rates() {
        let rates = [100u32, 200, 250, 360, 400, 500, 1000];
        for &a in &rates {
            for &b in &rates {
                let x = sine(a as f64, (4 * a) as usize, 5.0);
                let y = resample(&x, a, b);
                assert_eq!(y.len(), (4 * b) as usize, "{a}->{b}");
                let want = sine(b as f64, y.len(), 5.0);
                let edge = (b / 5) as usize;
                let err = y[edge..y.len() - edge]
                    .iter()
                    .zip(&want[edge..want.len() - edge])
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 2e-3, "{a}->{b}: max error {err}");
            }
        }
    }

    /// Content above the new Nyquist rate is removed, not aliased.
    #[test]
    fn downsampling_removes_what_would_alias() {
        let x = sine(500.0, 2000, 70.0); // above 50 Hz, the Nyquist rate of 100 Hz
        let y = resample(&x, 500, 100);
        let rms = (y[40..360].iter().map(|v| v * v).sum::<f32>() / 320.0).sqrt();
        assert!(rms < 0.01, "aliased rms {rms}");
    }
}
