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
/// has `ceil(len * fs_out / fs_in)` samples; sample 0 stays at time 0. For many signals at
/// the same rates (a record's leads), build one [`Resampler`] instead: the filter is designed
/// once.
pub fn resample(x: &[f32], fs_in: u32, fs_out: u32) -> Vec<f32> {
    Resampler::new(fs_in, fs_out).apply(x)
}

/// A designed resampling filter from one rate to another, for any number of signals.
#[derive(Clone, Debug)]
pub struct Resampler {
    up: usize,
    down: usize,
    half: usize,
    /// The polyphase filter: phase r's taps h[r], h[r + up], ... stored reversed.
    phases: Vec<Vec<f64>>,
    /// For whole-number downsampling (`up == 1`), the reversed taps in f32 (see
    /// [`Resampler::decimate`]).
    taps32: Vec<f32>,
}

impl Resampler {
    /// The filter from `fs_in` to `fs_out` Hz (both positive; equal rates copy).
    ///
    /// # Panics
    /// A rate of 0.
    pub fn new(fs_in: u32, fs_out: u32) -> Resampler {
        assert!(fs_in > 0 && fs_out > 0, "sampling rates are positive");
        let g = gcd(fs_in as usize, fs_out as usize);
        let (up, down) = (fs_out as usize / g, fs_in as usize / g);
        if up == down {
            return Resampler {
                up,
                down,
                half: 0,
                phases: Vec::new(),
                taps32: Vec::new(),
            };
        }
        let h = design(up, down);
        // Polyphase form: output m sits at `pos = m * down + half` in the upsampled domain
        // and takes the input samples n with `0 <= pos - n * up < h.len()`. With
        // `r = pos % up`, those taps are h[r], h[r + up], ... against x[base], x[base - 1],
        // ... where `base = pos / up`; each phase's taps are stored reversed, so every output
        // is one dot product of two contiguous runs (which vectorises; the direct form's
        // strided, descending indexing did not).
        let phases: Vec<Vec<f64>> = (0..up)
            .map(|r| h.iter().skip(r).step_by(up).rev().copied().collect())
            .collect();
        let taps32 = if up == 1 {
            phases[0].iter().map(|&c| c as f32).collect()
        } else {
            Vec::new()
        };
        Resampler {
            up,
            down,
            half: (h.len() - 1) / 2,
            phases,
            taps32,
        }
    }

    /// `x` at the new rate: `ceil(len * fs_out / fs_in)` samples.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        if self.phases.is_empty() || x.is_empty() {
            return x.to_vec();
        }
        // Under pulp's dispatch the dot products use the CPU's widest f64 lanes (AVX2 or
        // AVX-512 where present; the crate itself is built for baseline x86-64).
        struct Op<'a>(&'a Resampler, &'a [f32]);
        impl pulp::WithSimd for Op<'_> {
            type Output = Vec<f32>;
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) -> Vec<f32> {
                self.0.apply_scalar(self.1)
            }
        }
        pulp::Arch::new().dispatch(Op(self, x))
    }

    #[inline(always)]
    fn apply_scalar(&self, x: &[f32]) -> Vec<f32> {
        if self.up == 1 {
            return self.decimate(x);
        }
        let (up, down) = (self.up, self.down);
        let xs: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let n_out = (x.len() * up).div_ceil(down);
        let last = xs.len() - 1;
        let mut y = Vec::with_capacity(n_out);
        for m in 0..n_out {
            let pos = m * down + self.half;
            let taps = &self.phases[pos % up];
            let base = pos / up;
            // Taps cover x[base + 1 - taps.len() ..= base], clipped to the signal.
            let first = (base + 1).saturating_sub(taps.len());
            let end = base.min(last);
            if first > end {
                y.push(0.0);
                continue;
            }
            let skip = first + taps.len() - (base + 1);
            y.push(dot8(&taps[skip..skip + end + 1 - first], &xs[first..=end]) as f32);
        }
        y
    }
}

impl Resampler {
    /// The whole-number downsampling case (`up == 1`: 500 -> 100 Hz, 1000 -> 250 Hz, ...),
    /// vectorised across outputs rather than along each output's taps. With the input
    /// zero-padded by `half` in front (so out-of-range samples contribute nothing, as in the
    /// general form), output m is `sum_u taps[u] z[m * down + u]`; splitting u as
    /// `down * j + p` and z into its `down` phases `z_p[k] = z[k * down + p]` makes each tap
    /// one contiguous multiply-add over all outputs: `y[..] += taps[u] * z_p[j..j + n_out]`.
    /// In f32 (twice the lanes of f64; the test bounds its difference from the f64 direct
    /// form at 2e-6 of the signal's scale, far below any ECG's quantisation step).
    #[inline(always)]
    fn decimate(&self, x: &[f32]) -> Vec<f32> {
        let (d, taps) = (self.down, &self.taps32);
        let n_out = x.len().div_ceil(d);
        let k_len = n_out + taps.len().div_ceil(d);
        let mut z = vec![vec![0.0f32; k_len]; d];
        // Sample i goes to position k = i + half: phase k % d, index k / d. Filled phase by
        // phase (a strided read, a contiguous write).
        for (p, zp) in z.iter_mut().enumerate() {
            let i0 = (p + d - self.half % d) % d;
            let q0 = (i0 + self.half) / d;
            for (dst, &v) in zp[q0..].iter_mut().zip(x.iter().skip(i0).step_by(d)) {
                *dst = v;
            }
        }
        let mut y = vec![0.0f32; n_out];
        let run = |u: usize| {
            let (j, p) = (u / d, u % d);
            &z[p][j..j + n_out]
        };
        // Four taps per pass over the outputs: a quarter of the loads and stores of `y`.
        let mut u = 0;
        while u + 4 <= taps.len() {
            let (c0, c1, c2, c3) = (taps[u], taps[u + 1], taps[u + 2], taps[u + 3]);
            let (r0, r1, r2, r3) = (run(u), run(u + 1), run(u + 2), run(u + 3));
            for m in 0..n_out {
                y[m] += c0 * r0[m] + c1 * r1[m] + c2 * r2[m] + c3 * r3[m];
            }
            u += 4;
        }
        for (u, &c) in taps.iter().enumerate().skip(u) {
            for (o, &v) in y.iter_mut().zip(run(u)) {
                *o += c * v;
            }
        }
        y
    }
}

/// `sum a[i] b[i]` in eight interleaved partial sums (SIMD lanes; see the caller).
#[inline(always)]
fn dot8(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (p, q) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += p[l] * q[l];
        }
    }
    acc.iter().sum::<f64>() + tail
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

    /// The polyphase loops compute the direct form's sum (every tap against every input
    /// sample it reaches, descending, in f64), for every pair of ECG rates and odd lengths:
    /// to float rounding (2e-6 on signals within +-0.5; the downsampling path sums in f32).
    #[test]
    fn polyphase_equals_the_direct_form() {
        fn direct(x: &[f32], fs_in: u32, fs_out: u32) -> Vec<f32> {
            let g = gcd(fs_in as usize, fs_out as usize);
            let (up, down) = (fs_out as usize / g, fs_in as usize / g);
            let h = design(up, down);
            let half = (h.len() - 1) / 2;
            let n_out = (x.len() * up).div_ceil(down);
            (0..n_out)
                .map(|m| {
                    let pos = m * down + half;
                    (0..x.len())
                        .filter(|&n| n * up <= pos && pos - n * up < h.len())
                        .map(|n| h[pos - n * up] * f64::from(x[n]))
                        .sum::<f64>() as f32
                })
                .collect()
        }
        let rates = [100u32, 250, 257, 360, 500, 1000];
        let mut seed = 12345u64;
        for &a in &rates {
            for &b in &rates {
                if a == b {
                    continue;
                }
                for len in [1usize, 7, 333] {
                    let x: Vec<f32> = (0..len)
                        .map(|_| {
                            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                        })
                        .collect();
                    let (got, want) = (resample(&x, a, b), direct(&x, a, b));
                    assert_eq!(got.len(), want.len(), "{a}->{b}, {len}");
                    for (i, (p, q)) in got.iter().zip(&want).enumerate() {
                        assert!((p - q).abs() <= 2e-6, "{a}->{b}, {len}, [{i}]: {p} vs {q}");
                    }
                }
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
