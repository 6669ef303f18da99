//! The [`crate::vlm::EcgVlm`] forward pass in plain Rust loops, for CPU inference of small
//! students.
//!
//! Why it exists: a student of ~100k parameters does microseconds of arithmetic per layer, so
//! in a tensor framework its latency is per-op dispatch (measured: ~1 ms per decoder pass in
//! burn's `flex` backend, 2x slower than PyTorch). Here the same weights run without a
//! framework, and the structure of the question is used: under causal attention the visual
//! prefix's keys and values do not depend on the text, so they are computed once per record
//! and shared by every question and by generation (a KV cache), and generation extends the
//! cache one token at a time instead of recomputing the sequence.
//!
//! It reads a model directory's `config.json` and `model.safetensors` (burn's parameter names
//! and layouts: Linear weights `[in, out]`, pre-norm layers whose attention path uses `norm_2`
//! and feed-forward path `norm_1`, exact GELU, LayerNorm eps 1e-5) and is tested against the
//! burn model to float tolerance.

use std::collections::HashMap;
use std::path::Path;

use crate::vlm::{EcgVlmConfig, InputKind};

/// Errors of loading a model for native inference.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}", .path.display())]
pub struct NativeError {
    /// File.
    pub path: std::path::PathBuf,
    /// Problem.
    pub what: String,
}

/// A linear layer's weights: f32 as trained, or int8 with one scale per output channel.
enum Weights {
    /// `[din, dout]`, burn's layout.
    F32(Vec<f32>),
    /// `q[din, dout]` with `w[i, o] ~= q[i, o] * scale[o]` (one scale per output channel).
    Int8 { q: Vec<i8>, scale: Vec<f32> },
}

struct Lin {
    w: Weights,
    b: Option<Vec<f32>>,
    din: usize,
    dout: usize,
}

/// Symmetric int8 codes of `x` with one scale, `x ~= code * scale` (scale 0 for all-zero x).
fn quantize_row(x: &[f32], out: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        out.iter_mut().for_each(|c| *c = 0);
        return 0.0;
    }
    let inv = 127.0 / amax;
    for (c, v) in out.iter_mut().zip(x) {
        *c = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// `y[r, o] = scale[o] * sum_i x[r, i] q[i, o]` for every row and output channel: int8
/// weights, f32 activations (weight-only quantisation, "W8A32"). Each weight code is widened
/// to f32 as it is loaded, and the per-channel scale is applied once per output. Four input
/// rows share each loaded weight row; the inner loop runs along the output channels (no
/// horizontal sums, which dominate dot products of these short rows), through pulp's
/// dispatch so it is compiled for the CPU's widest SIMD level (the default x86-64 target has
/// only SSE2). Why not int8 activations too: tried (dynamic per-row quantisation, i16
/// products, i32 sums); on these widths it was slower than f32 (the activation quantisation
/// and widening cost more than the cheaper multiplies saved) and it made a few outlier
/// records' probabilities move by up to 0.86 on the teacher.
///
/// With f32 weights (`T = f32`, all scales 1) the same loops serve the f32 engine's products
/// of a few rows (generation, one token at a time), where a GEMM's packing of the weight
/// matrix costs more than the product.
struct RowProduct<'a, T> {
    x: &'a [f32],
    /// `[din, dout]`.
    q: &'a [T],
    /// One per output channel; `None` for 1.
    scale: Option<&'a [f32]>,
    din: usize,
    y: &'a mut [f32],
}

impl<T: Copy + Into<f32>> pulp::WithSimd for RowProduct<'_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            x,
            q,
            scale,
            din,
            y,
        } = self;
        let rows = x.len() / din.max(1);
        let dout = y.len() / rows.max(1);
        const R: usize = 4;
        let mut acc = vec![0.0f32; R * dout];
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(R);
            acc.iter_mut().for_each(|a| *a = 0.0);
            if nr == R {
                let (a0, rest) = acc.split_at_mut(dout);
                let (a1, rest) = rest.split_at_mut(dout);
                let (a2, a3) = rest.split_at_mut(dout);
                for (i, qr) in q.chunks_exact(dout).enumerate() {
                    let xv = |r: usize| x[(r0 + r) * din + i];
                    let (x0, x1, x2, x3) = (xv(0), xv(1), xv(2), xv(3));
                    let lanes = a0.iter_mut().zip(a1.iter_mut()).zip(a2.iter_mut());
                    for ((w, ((o0, o1), o2)), o3) in qr.iter().zip(lanes).zip(a3.iter_mut()) {
                        let w: f32 = (*w).into();
                        *o0 += x0 * w;
                        *o1 += x1 * w;
                        *o2 += x2 * w;
                        *o3 += x3 * w;
                    }
                }
            } else {
                for r in 0..nr {
                    let a = &mut acc[r * dout..(r + 1) * dout];
                    let xr = &x[(r0 + r) * din..(r0 + r + 1) * din];
                    for (&xi, qr) in xr.iter().zip(q.chunks_exact(dout)) {
                        for (a, &w) in a.iter_mut().zip(qr) {
                            *a += xi * w.into();
                        }
                    }
                }
            }
            for r in 0..nr {
                let yr = &mut y[(r0 + r) * dout..(r0 + r + 1) * dout];
                let ar = &acc[r * dout..(r + 1) * dout];
                match scale {
                    Some(scale) => {
                        for ((o, &a), &s) in yr.iter_mut().zip(ar).zip(scale) {
                            *o = a * s;
                        }
                    }
                    None => yr.copy_from_slice(ar),
                }
            }
            r0 += nr;
        }
    }
}

/// `w[i, o] = q[i, o] * scale[o]` into `out`, compiled for the CPU's SIMD level.
struct Dequantize<'a> {
    q: &'a [i8],
    scale: &'a [f32],
    out: &'a mut Vec<f32>,
}

impl pulp::WithSimd for Dequantize<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self { q, scale, out } = self;
        out.clear();
        out.resize(q.len(), 0.0);
        for (orow, qrow) in out
            .chunks_exact_mut(scale.len())
            .zip(q.chunks_exact(scale.len()))
        {
            for ((o, &c), &s) in orow.iter_mut().zip(qrow).zip(scale) {
                *o = f32::from(c) * s;
            }
        }
    }
}

/// Products of at most this many rows skip the GEMM (see [`RowProduct`]).
const FEW_ROWS: usize = 4;

thread_local! {
    /// One layer's int8 weights widened to f32 for a product of many rows: a buffer reused
    /// from layer to layer, so the resident weights stay int8.
    static DEQUANTIZED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x[n, din] w[din, dout]` by ndarray's `dot` (matrixmultiply's sgemm with runtime-detected
/// AVX2/FMA kernels, pure Rust, a safe API).
fn gemm(x: &[f32], w: &[f32], n: usize, din: usize, dout: usize) -> Vec<f32> {
    let xa = ndarray::ArrayView2::from_shape((n, din), x).expect("n * din inputs");
    let wa = ndarray::ArrayView2::from_shape((din, dout), w).expect("din * dout");
    xa.dot(&wa).into_raw_vec_and_offset().0
}

impl Lin {
    /// `y[n, dout] = x[n, din] W + b`: [`RowProduct`] for up to [`FEW_ROWS`] rows (int8
    /// weights widened as they are read), else the GEMM (int8 weights widened first into a
    /// reused buffer: widening a layer costs a few percent of its product at these row
    /// counts; a hand-written int8 kernel measured 2x slower than the f32 GEMM here).
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = match &self.w {
            Weights::F32(w) if n <= FEW_ROWS => {
                let mut y = vec![0.0f32; n * self.dout];
                pulp::Arch::new().dispatch(RowProduct {
                    x,
                    q: w,
                    scale: None,
                    din: self.din,
                    y: &mut y,
                });
                y
            }
            Weights::F32(w) => gemm(x, w, n, self.din, self.dout),
            Weights::Int8 { q, scale } if n > FEW_ROWS => DEQUANTIZED.with_borrow_mut(|buf| {
                pulp::Arch::new().dispatch(Dequantize { q, scale, out: buf });
                gemm(x, buf, n, self.din, self.dout)
            }),
            Weights::Int8 { q, scale } => {
                let mut y = vec![0.0f32; n * self.dout];
                pulp::Arch::new().dispatch(RowProduct {
                    x,
                    q,
                    scale: Some(scale),
                    din: self.din,
                    y: &mut y,
                });
                y
            }
        };
        if let Some(b) = &self.b {
            for row in y.chunks_exact_mut(self.dout) {
                for (o, &bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
        y
    }
}

impl Lin {
    /// `y[c] = x W[:, c] + b[c]` for one input row and only the output channels `cols`:
    /// the two answer logits of a verification question, without the rest of the vocabulary.
    fn forward_cols(&self, x: &[f32], cols: &[usize]) -> Vec<f32> {
        let bias = |c: usize| self.b.as_ref().map_or(0.0, |b| b[c]);
        match &self.w {
            Weights::F32(w) => cols
                .iter()
                .map(|&c| {
                    x.iter()
                        .enumerate()
                        .map(|(i, &xi)| xi * w[i * self.dout + c])
                        .sum::<f32>()
                        + bias(c)
                })
                .collect(),
            Weights::Int8 { q, scale } => cols
                .iter()
                .map(|&c| {
                    x.iter()
                        .enumerate()
                        .map(|(i, &xi)| xi * f32::from(q[i * self.dout + c]))
                        .sum::<f32>()
                        * scale[c]
                        + bias(c)
                })
                .collect(),
        }
    }
}

struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.g.len();
        let mut y = vec![0.0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mean = sum8(xr, 0.0, false) / d as f32;
            let var = sum8(xr, mean, true) / d as f32;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for i in 0..d {
                yr[i] = (xr[i] - mean) * inv * self.g[i] + self.b[i];
            }
        }
        y
    }
}

/// `sum x[i]`, or `sum (x[i] - m)^2` when `squares`, in eight interleaved partial sums (see
/// [`dot`]) so that it vectorises.
#[inline(always)]
pub(crate) fn sum8(x: &[f32], m: f32, squares: bool) -> f32 {
    let f = |v: f32| if squares { (v - m) * (v - m) } else { v };
    let mut acc = [0.0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().map(|&v| f(v)).sum();
    for ch in c {
        for l in 0..8 {
            acc[l] += f(ch[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

struct Layer {
    norm_attn: Norm,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    norm_ffn: Norm,
    inner: Lin,
    outer: Lin,
}

/// Keys and values of one layer for the positions processed so far.
#[derive(Clone, Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// `e^x` without a libm call, branch-free so that loops over it vectorise: `x = n ln 2 + r`
/// with |r| <= ln 2 / 2 (Cody-Waite, ln 2 in two parts), `e^r` by its degree-6 Taylor
/// polynomial (relative error < 2e-7 on that interval), `2^n` put in the exponent bits. `x`
/// is clamped to [-87, 88], where `e^x` is a normal f32: below, results under 1.6e-38 become
/// that instead of 0, which is what the callers (softmax weights, GELU's tail) can afford,
/// and libm's slow path for underflow, most of the engine's time at one point, is never taken.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Exact-form GELU `x/2 (1 + erf(x/sqrt 2))` with erf from Abramowitz & Stegun 7.1.26
/// (absolute error <= 1.5e-7, below f32 resolution of the result) and [`exp`]: no libm call,
/// which was most of the native engine's time (50k calls per record), and no branch, so
/// [`gelu_slice`] runs it on SIMD lanes. (The derivative [`gelu_and_grad`] also computes is
/// dead code here once inlined.)
#[inline(always)]
fn gelu(x: f32) -> f32 {
    gelu_and_grad(x).0
}

/// GELU ([`gelu`]) and its derivative `Phi(x) + x phi(x)` at `x`, one erf and one
/// exponential for both (`e^(-x^2/2)` is shared by erf's approximation and the normal
/// density), for inference and the fused training kernels' forward and backward passes.
#[inline(always)]
pub(crate) fn gelu_and_grad(x: f32) -> (f32, f32) {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let e = exp(-z * z);
    let cdf = 0.5 * (1.0 + (1.0 - poly * e).copysign(x));
    // 1 / sqrt(2 pi)
    (x * cdf, cdf + x * e * 0.398_942_3)
}

/// [`gelu`] on every element, compiled for the CPU's widest SIMD level (pulp's dispatch; the
/// default x86-64 target has only SSE2).
fn gelu_slice(xs: &mut [f32]) {
    struct Op<'a>(&'a mut [f32]);
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            self.0.iter_mut().for_each(|v| *v = gelu(*v));
        }
    }
    pulp::Arch::new().dispatch(Op(xs));
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_a_few_ulps_and_never_underflows() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = f64::from(x).exp();
            let got = f64::from(super::exp(x));
            assert!(((got - want) / want).abs() < 4e-7, "{x}: {got} vs {want}");
        }
        for x in [-88.0f32, -200.0, -1e30, f32::NEG_INFINITY] {
            let got = super::exp(x);
            assert!(got > 0.0 && got < 2e-38, "{x}: {got}");
        }
    }

    #[test]
    fn common_start_leaves_every_prompt_its_last_token() {
        use super::common_start;
        assert_eq!(common_start(&[&[1, 5, 6, 7, 2], &[1, 5, 6, 8, 2]]), 3);
        assert_eq!(common_start(&[&[1, 5, 6, 7], &[1, 5, 6, 8], &[1, 5, 9]]), 2);
        // Identical prompts share all but the last token.
        assert_eq!(common_start(&[&[1, 5, 6], &[1, 5, 6]]), 2);
        assert_eq!(common_start(&[&[1, 5], &[1, 5, 6, 7]]), 1);
        assert_eq!(common_start(&[&[4, 5, 6], &[1, 5, 6]]), 0);
        assert_eq!(common_start(&[&[1, 5, 6]]), 0);
        assert_eq!(common_start(&[]), 0);
    }

    #[test]
    fn gelu_matches_the_erf_form() {
        // Reference erf by its Taylor series in f64 (converges well for |x| <= 3) and 1 beyond.
        let erf = |x: f64| -> f64 {
            if x.abs() > 5.0 {
                return x.signum();
            }
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        };
        for i in -800..=800 {
            let x = i as f64 / 100.0;
            let want = 0.5 * x * (1.0 + erf(x / 2f64.sqrt()));
            let got = super::gelu(x as f32) as f64;
            assert!(
                (got - want).abs() < 2e-6 * (1.0 + x.abs()),
                "{x}: {got} vs {want}"
            );
        }
    }
}

impl Layer {
    /// Process `n` new positions `x[n, d]` that attend to the cached positions and causally to
    /// each other; appends their keys/values to `cache`. `causal = false` lets every position
    /// see every other (the vision encoder).
    fn forward(&self, x: &mut [f32], n: usize, heads: usize, cache: &mut LayerCache, causal: bool) {
        let past = cache.k.len() / self.q.dout;
        let (k, v) = self.forward_segments(x, &[Segment { rows: n, past }], heads, cache, causal);
        cache.k.extend(k);
        cache.v.extend(v);
    }

    /// Process new rows `x[n, d]` made of independent segments (several questions after one
    /// visual prefix, run as one batch): a segment attends to the first `past` positions of
    /// `past`, which all segments share, and to its own rows (causally if `causal`), never to
    /// another segment's. Returns the new rows' keys and values `[n, d]`; `past` is left as
    /// it is.
    fn forward_segments(
        &self,
        x: &mut [f32],
        segs: &[Segment],
        heads: usize,
        past: &LayerCache,
        causal: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = self.q.dout;
        let n = x.len() / d;
        let h = self.norm_attn.forward(x);
        let q = self.q.forward(&h, n);
        let k = self.k.forward(&h, n);
        let v = self.v.forward(&h, n);
        let attention = Attention {
            q: &q,
            k: &k,
            v: &v,
            past,
            segs,
            heads,
            d,
            causal,
        };
        let ctx = if n <= FEW_ROWS {
            pulp::Arch::new().dispatch(attention)
        } else {
            pulp::Arch::new().dispatch(ByGemm(attention))
        };
        let att = self.o.forward(&ctx, n);
        for (a, b) in x.iter_mut().zip(&att) {
            *a += b;
        }
        let h = self.norm_ffn.forward(x);
        let mut mid = self.inner.forward(&h, n);
        gelu_slice(&mut mid);
        let out = self.outer.forward(&mid, n);
        for (a, b) in x.iter_mut().zip(&out) {
            *a += b;
        }
        (k, v)
    }
}

/// `sum a[i] b[i]` in eight interleaved partial sums, so that it runs on SIMD lanes (a plain
/// left-to-right sum is a chain of dependent scalar adds).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A run of new rows that attend to each other and to the first `past` cached positions.
#[derive(Clone, Copy, Debug)]
struct Segment {
    rows: usize,
    past: usize,
}

/// Scaled dot-product attention of new rows over shared past positions and their own
/// segment (see [`Layer::forward_segments`]); returns the context `[n, d]` before the output
/// projection. Run through pulp's dispatch so that its loops use the CPU's SIMD width.
struct Attention<'a> {
    q: &'a [f32],
    /// The new rows' keys and values `[n, d]`.
    k: &'a [f32],
    v: &'a [f32],
    past: &'a LayerCache,
    segs: &'a [Segment],
    heads: usize,
    d: usize,
    causal: bool,
}

impl pulp::WithSimd for Attention<'_> {
    type Output = Vec<f32>;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Vec<f32> {
        let Self {
            q,
            k,
            v,
            past,
            segs,
            heads,
            d,
            causal,
        } = self;
        let n = q.len() / d;
        let dk = d / heads;
        let n_past = past.k.len() / d;
        let scale = 1.0 / (dk as f32).sqrt();
        let mut ctx = vec![0.0f32; n * d];
        let longest = segs.iter().map(|g| g.rows).max().unwrap_or(0);
        let mut scores = vec![0.0f32; n_past + longest];
        let at = |j: usize, hd: usize| j * d + hd * dk..j * d + (hd + 1) * dk;
        let mut s0 = 0;
        for &Segment {
            rows: len,
            past: seen,
        } in segs
        {
            for i in s0..s0 + len {
                // Visible: the segment's past positions, then its rows up to `i` (causal) or
                // all of them.
                let own = if causal { i + 1 - s0 } else { len };
                let visible = seen + own;
                let (kv_past, kv_own) = (0..seen, s0..s0 + own);
                for hd in 0..heads {
                    let qi = &q[at(i, hd)];
                    let keys = kv_past
                        .clone()
                        .map(|j| &past.k[at(j, hd)])
                        .chain(kv_own.clone().map(|j| &k[at(j, hd)]));
                    let mut max = f32::MIN;
                    for (s, kj) in scores.iter_mut().zip(keys) {
                        *s = dot(qi, kj) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0.0f32;
                    for s in scores[..visible].iter_mut() {
                        *s = exp(*s - max);
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    let values = kv_past
                        .clone()
                        .map(|j| &past.v[at(j, hd)])
                        .chain(kv_own.clone().map(|j| &v[at(j, hd)]));
                    let out = &mut ctx[at(i, hd)];
                    for (&s, vj) in scores.iter().zip(values) {
                        let w = s * inv;
                        for (o, &vv) in out.iter_mut().zip(vj) {
                            *o += w * vv;
                        }
                    }
                }
            }
            s0 += len;
        }
        ctx
    }
}

/// [`Attention::by_gemm`] under pulp's dispatch (its softmax loops use the CPU's SIMD width).
struct ByGemm<'a>(Attention<'a>);

impl pulp::WithSimd for ByGemm<'_> {
    type Output = Vec<f32>;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Vec<f32> {
        self.0.by_gemm()
    }
}

impl Attention<'_> {
    /// The same attention for many rows as matrix products per head (ndarray's GEMM over
    /// strided views of the `[n, d]` buffers, no copies): the scores of every row against
    /// the shared past in one product, each segment's scores against its own rows in one
    /// more, a row softmax over both (causal positions zeroed), then the weighted values. At
    /// the hundreds of rows of a record's batched questions this is several times faster
    /// than the row-by-row loop, which stays for generation's single rows.
    #[inline(always)]
    fn by_gemm(&self) -> Vec<f32> {
        use ndarray::linalg::general_mat_mul;
        use ndarray::{Array2, ArrayView2, ArrayViewMut2, s};
        let d = self.d;
        let n = self.q.len() / d;
        let dk = d / self.heads;
        let n_past = self.past.k.len() / d;
        let scale = 1.0 / (dk as f32).sqrt();
        fn view(x: &[f32], rows: usize, d: usize) -> ArrayView2<'_, f32> {
            ArrayView2::from_shape((rows, d), x).expect("rows * d values")
        }
        let (q, k, v) = (view(self.q, n, d), view(self.k, n, d), view(self.v, n, d));
        let (pk, pv) = (view(&self.past.k, n_past, d), view(&self.past.v, n_past, d));
        let mut ctx = vec![0.0f32; n * d];
        let mut cv = ArrayViewMut2::from_shape((n, d), &mut ctx).expect("n * d");
        let longest = self.segs.iter().map(|g| g.rows).max().unwrap_or(0);
        let mut past_scores = Array2::<f32>::zeros((n, n_past));
        let mut own_scores = Array2::<f32>::zeros((longest, longest));
        for h in 0..self.heads {
            let cols = s![.., h * dk..(h + 1) * dk];
            let (qh, kh, vh) = (q.slice(cols), k.slice(cols), v.slice(cols));
            if n_past > 0 {
                general_mat_mul(scale, &qh, &pk.slice(cols).t(), 0.0, &mut past_scores);
            }
            let mut s0 = 0;
            for &Segment {
                rows: len,
                past: seen,
            } in self.segs
            {
                let rows = s![s0..s0 + len, ..];
                let mut own = own_scores.slice_mut(s![..len, ..len]);
                general_mat_mul(scale, &qh.slice(rows), &kh.slice(rows).t(), 0.0, &mut own);
                for r in 0..len {
                    let visible = if self.causal { r + 1 } else { len };
                    let mut past_row = past_scores.row_mut(s0 + r);
                    let mut own_row = own.row_mut(r);
                    let past_row = past_row.as_slice_mut().expect("a standard-layout row");
                    let own_row = own_row.as_slice_mut().expect("a contiguous row");
                    let (seen_row, unseen_row) = past_row.split_at_mut(seen);
                    unseen_row.fill(0.0);
                    softmax_pair(seen_row, own_row, visible);
                }
                general_mat_mul(
                    1.0,
                    &own,
                    &vh.slice(rows),
                    0.0,
                    &mut cv.slice_mut(s![s0..s0 + len, h * dk..(h + 1) * dk]),
                );
                s0 += len;
            }
            if n_past > 0 {
                general_mat_mul(
                    1.0,
                    &past_scores,
                    &pv.slice(cols),
                    1.0,
                    &mut cv.slice_mut(cols),
                );
            }
        }
        ctx
    }
}

/// Softmax over one row's scores, split in two parts (the shared past, then the row's own
/// segment, of which the first `visible` are seen): in place, weights summing to 1, the
/// unseen positions set to 0. Each part is a plain slice loop with eight partial maxima and
/// sums, so that the caller's SIMD dispatch vectorises it.
#[inline(always)]
fn softmax_pair(past: &mut [f32], own: &mut [f32], visible: usize) {
    #[inline(always)]
    fn max8(x: &[f32]) -> f32 {
        let mut m = [f32::MIN; 8];
        let c = x.chunks_exact(8);
        let tail = c.remainder().iter().fold(f32::MIN, |a, &b| a.max(b));
        for ch in c {
            for l in 0..8 {
                m[l] = m[l].max(ch[l]);
            }
        }
        m.iter().fold(tail, |a, &b| a.max(b))
    }
    #[inline(always)]
    fn exp_sum8(x: &mut [f32], max: f32) -> f32 {
        for v in x.iter_mut() {
            *v = exp(*v - max);
        }
        let mut acc = [0.0f32; 8];
        let c = x.chunks_exact(8);
        let tail: f32 = c.remainder().iter().sum();
        for ch in c {
            for l in 0..8 {
                acc[l] += ch[l];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
    let (seen, unseen) = own.split_at_mut(visible);
    let max = max8(past).max(max8(seen));
    let inv = 1.0 / (exp_sum8(past, max) + exp_sum8(seen, max));
    for v in past.iter_mut() {
        *v *= inv;
    }
    for v in seen.iter_mut() {
        *v *= inv;
    }
    unseen.fill(0.0);
}

struct Conv {
    w: Vec<f32>, // [out, in, k]
    b: Vec<f32>,
    cin: usize,
    cout: usize,
    k: usize,
}

impl Conv {
    /// Same-length convolution (padding k/2) of `x[cin, len]`, then GELU.
    fn forward_gelu(&self, x: &[f32], len: usize) -> Vec<f32> {
        let pad = self.k / 2;
        let mut y = vec![0.0f32; self.cout * len];
        for o in 0..self.cout {
            let yr = &mut y[o * len..(o + 1) * len];
            yr.iter_mut().for_each(|v| *v = self.b[o]);
            for c in 0..self.cin {
                let xr = &x[c * len..(c + 1) * len];
                for t in 0..self.k {
                    let w = self.w[(o * self.cin + c) * self.k + t];
                    // y[i] += w * x[i + t - pad] where in range.
                    let lo = pad.saturating_sub(t);
                    let hi = (len + pad).saturating_sub(t).min(len);
                    for i in lo..hi {
                        yr[i] += w * xr[i + t - pad];
                    }
                }
            }
            gelu_slice(yr);
        }
        y
    }
}

/// A 2-D convolution `[out, in, k, k]` with square stride and padding (the image stem's).
struct Conv2 {
    w: Vec<f32>,
    b: Vec<f32>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Conv2 {
    /// `x[cin, h, w]` -> (`y[cout, h', w']`, h', w').
    fn forward(&self, x: &[f32], h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let oh = (h + 2 * self.pad - self.k) / self.stride + 1;
        let ow = (w + 2 * self.pad - self.k) / self.stride + 1;
        let mut y = vec![0.0f32; self.cout * oh * ow];
        for o in 0..self.cout {
            let yo = &mut y[o * oh * ow..(o + 1) * oh * ow];
            yo.iter_mut().for_each(|v| *v = self.b[o]);
            for c in 0..self.cin {
                let xc = &x[c * h * w..(c + 1) * h * w];
                for ky in 0..self.k {
                    for kx in 0..self.k {
                        let wt = self.w[((o * self.cin + c) * self.k + ky) * self.k + kx];
                        for oy in 0..oh {
                            let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let xr = &xc[iy as usize * w..(iy as usize + 1) * w];
                            let yr = &mut yo[oy * ow..(oy + 1) * ow];
                            for (ox, yv) in yr.iter_mut().enumerate() {
                                let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                                if ix >= 0 && ix < w as isize {
                                    *yv += wt * xr[ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, oh, ow)
    }
}

/// Group norm over `x[c, n]` (biased variance, eps 1e-5, per-channel affine): burn's
/// `GroupNorm` as the image stem uses it.
struct GroupNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    groups: usize,
}

impl GroupNorm {
    /// Normalise `x[c, n]` in place, then GELU.
    fn forward_gelu(&self, x: &mut [f32], n: usize) {
        let c = self.gamma.len();
        let per = c / self.groups;
        for g in 0..self.groups {
            let xs = &mut x[g * per * n..(g + 1) * per * n];
            let m = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / xs.len() as f64;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for (k, row) in xs.chunks_mut(n).enumerate() {
                let (ga, be) = (self.gamma[g * per + k], self.beta[g * per + k]);
                for v in row {
                    *v = gelu(((f64::from(*v) - m) * inv) as f32 * ga + be);
                }
            }
        }
    }
}

/// Named tensors of a safetensors file, taken one by one.
struct Store {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    int8: HashMap<String, (Vec<usize>, Vec<i8>)>,
    path: std::path::PathBuf,
}

impl Store {
    fn take(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>), NativeError> {
        self.tensors.remove(name).ok_or_else(|| NativeError {
            path: self.path.clone(),
            what: format!("missing tensor `{name}`"),
        })
    }

    /// A linear layer: `{name}.weight` (f32 `[in, out]`), or in an int8 bundle
    /// `{name}.weight_q` (i8 `[out, in]`) with `{name}.weight_scale` (f32 `[out]`).
    fn lin(&mut self, name: &str, bias: bool) -> Result<Lin, NativeError> {
        let (w, din, dout) = match self.int8.remove(&format!("{name}.weight_q")) {
            Some((shape, q)) => {
                let scale = self.take(&format!("{name}.weight_scale"))?.1;
                if shape.len() != 2 || scale.len() != shape[0] {
                    return Err(NativeError {
                        path: self.path.clone(),
                        what: format!(
                            "`{name}.weight_scale` has {} scales for {:?} int8 weights",
                            scale.len(),
                            shape
                        ),
                    });
                }
                // Stored a row per output channel; multiplied as `[in, out]`.
                let (dout, din) = (shape[0], shape[1]);
                let mut t = vec![0i8; q.len()];
                for o in 0..dout {
                    for i in 0..din {
                        t[i * dout + o] = q[o * din + i];
                    }
                }
                (Weights::Int8 { q: t, scale }, din, dout)
            }
            None => {
                let (shape, w) = self.take(&format!("{name}.weight"))?;
                (Weights::F32(w), shape[0], shape[1])
            }
        };
        let b = if bias {
            Some(self.take(&format!("{name}.bias"))?.1)
        } else {
            None
        };
        Ok(Lin { w, b, din, dout })
    }

    fn norm(&mut self, name: &str) -> Result<Norm, NativeError> {
        Ok(Norm {
            g: self.take(&format!("{name}.gamma"))?.1,
            b: self.take(&format!("{name}.beta"))?.1,
        })
    }

    fn conv(&mut self, name: &str) -> Result<Conv, NativeError> {
        let (shape, w) = self.take(&format!("{name}.weight"))?;
        Ok(Conv {
            w,
            b: self.take(&format!("{name}.bias"))?.1,
            cout: shape[0],
            cin: shape[1],
            k: shape[2],
        })
    }

    fn conv2(&mut self, name: &str, stride: usize, pad: usize) -> Result<Conv2, NativeError> {
        let (shape, w) = self.take(&format!("{name}.weight"))?;
        Ok(Conv2 {
            w,
            b: self.take(&format!("{name}.bias"))?.1,
            cout: shape[0],
            cin: shape[1],
            k: shape[2],
            stride,
            pad,
        })
    }

    fn layers(&mut self, prefix: &str, n: usize) -> Result<Vec<Layer>, NativeError> {
        (0..n)
            .map(|i| {
                let p = format!("{prefix}.layers.{i}");
                Ok(Layer {
                    norm_attn: self.norm(&format!("{p}.norm_2"))?,
                    q: self.lin(&format!("{p}.mha.query"), true)?,
                    k: self.lin(&format!("{p}.mha.key"), true)?,
                    v: self.lin(&format!("{p}.mha.value"), true)?,
                    o: self.lin(&format!("{p}.mha.output"), true)?,
                    norm_ffn: self.norm(&format!("{p}.norm_1"))?,
                    inner: self.lin(&format!("{p}.pwff.linear_inner"), true)?,
                    outer: self.lin(&format!("{p}.pwff.linear_outer"), true)?,
                })
            })
            .collect()
    }
}

/// A model ready for native inference.
pub struct NativeVlm {
    cfg: EcgVlmConfig,
    quant: Option<Quantization>,
    stem: Option<(Conv, Conv)>,
    image_stem: Vec<Conv2>,
    stem_norms: Vec<GroupNorm>,
    patch_embed: Lin,
    vis_pos: Vec<f32>,
    vision: Vec<Layer>,
    vis_norm: Norm,
    projector: Lin,
    tok_emb: Vec<f32>,
    pos: Vec<f32>,
    decoder: Vec<Layer>,
    norm: Norm,
    lm_head: Lin,
}

impl std::fmt::Debug for NativeVlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeVlm")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// What `quantization.json` says about an int8 bundle (`evl-ecg model quantize` writes it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quantization {
    /// `int8`: every linear layer's weights as int8 with one scale per output channel
    /// (symmetric); the engine multiplies them with f32 activations; everything else f32.
    pub scheme: String,
    /// The linear layers stored as int8.
    pub layers: Vec<String>,
    /// sha256 of the f32 `model.safetensors` it was made from.
    pub source_sha256: String,
}

/// The scheme this engine runs.
pub const INT8_SCHEME: &str = "int8";

impl Quantization {
    /// `dir/quantization.json`, if the bundle has one; an unknown scheme is an error.
    pub fn read(dir: &Path) -> Result<Option<Quantization>, NativeError> {
        let path = dir.join("quantization.json");
        if !path.is_file() {
            return Ok(None);
        }
        let err = |what: String| NativeError {
            path: path.clone(),
            what,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let q: Quantization = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if q.scheme != INT8_SCHEME {
            return Err(err(format!(
                "quantization scheme `{}` is not one this engine runs (`{INT8_SCHEME}`)",
                q.scheme
            )));
        }
        Ok(Some(q))
    }
}

/// The questions asked about one record (token ids in the model's tokenizer).
#[derive(Debug, Clone)]
pub struct Questions<'a> {
    /// `[BOS] prompt [SEP]` of each verification question.
    pub verify_prompts: &'a [Vec<i64>],
    /// Token of the answer `yes`.
    pub yes: i64,
    /// Token of the answer `no`.
    pub no: i64,
    /// `[BOS] prompt [SEP]` of the question answered by generation.
    pub generate_prompt: &'a [i64],
    /// End of answer.
    pub eos: i64,
    /// Longest answer generated.
    pub max_new: usize,
}

/// What one record's questions give.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeAnswer {
    /// `p(yes) / (p(yes) + p(no))` at the first answer token of each verification prompt.
    pub probs: Vec<f64>,
    /// Greedy continuation of the generation prompt (without EOS).
    pub generated: Vec<i64>,
}

/// The decoder's state after the visual prefix, shared by every question about a record.
#[derive(Clone)]
struct Prefix {
    caches: Vec<LayerCache>,
    len: usize,
}

impl NativeVlm {
    /// Bytes the weights take in memory (int8 codes count one byte each).
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Lin| {
            let w = match &l.w {
                Weights::F32(w) => 4 * w.len(),
                Weights::Int8 { q, scale } => q.len() + 4 * scale.len(),
            };
            w + 4 * l.b.as_ref().map_or(0, Vec::len)
        };
        let norm = |n: &Norm| 4 * (n.g.len() + n.b.len());
        let layer = |l: &Layer| {
            [&l.q, &l.k, &l.v, &l.o, &l.inner, &l.outer]
                .into_iter()
                .map(lin)
                .sum::<usize>()
                + norm(&l.norm_attn)
                + norm(&l.norm_ffn)
        };
        let conv = |c: &Conv| 4 * (c.w.len() + c.b.len());
        let conv2 = |c: &Conv2| 4 * (c.w.len() + c.b.len());
        self.stem.as_ref().map_or(0, |(a, b)| conv(a) + conv(b))
            + self.image_stem.iter().map(conv2).sum::<usize>()
            + self
                .stem_norms
                .iter()
                .map(|g| 4 * (g.gamma.len() + g.beta.len()))
                .sum::<usize>()
            + lin(&self.patch_embed)
            + 4 * self.vis_pos.len()
            + self.vision.iter().map(layer).sum::<usize>()
            + norm(&self.vis_norm)
            + lin(&self.projector)
            + 4 * (self.tok_emb.len() + self.pos.len())
            + self.decoder.iter().map(layer).sum::<usize>()
            + norm(&self.norm)
            + lin(&self.lm_head)
    }

    /// The bundle's quantisation (`None`: f32 weights).
    pub fn quantization(&self) -> Option<&Quantization> {
        self.quant.as_ref()
    }

    /// Load `config.json` + `model.safetensors` from a model directory.
    pub fn load(dir: &Path) -> Result<NativeVlm, NativeError> {
        let err = |path: &Path, what: String| NativeError {
            path: path.to_path_buf(),
            what,
        };
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| err(&cfg_path, e.to_string()))?;
        let cfg: EcgVlmConfig =
            serde_json::from_str(&text).map_err(|e| err(&cfg_path, e.to_string()))?;
        let st_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&st_path).map_err(|e| err(&st_path, e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| err(&st_path, e.to_string()))?;
        let quant = Quantization::read(dir)?;
        let mut tensors = HashMap::new();
        let mut int8 = HashMap::new();
        for (name, view) in st.tensors() {
            match view.dtype() {
                safetensors::Dtype::F32 => {
                    let data = view
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    tensors.insert(name, (view.shape().to_vec(), data));
                }
                safetensors::Dtype::I8 if quant.is_some() => {
                    let data = view.data().iter().map(|&b| b as i8).collect();
                    int8.insert(name, (view.shape().to_vec(), data));
                }
                other => {
                    return Err(err(
                        &st_path,
                        format!(
                            "`{name}` is {other:?}, expected F32{}",
                            if quant.is_some() {
                                " or I8"
                            } else {
                                " (I8 only in a bundle whose quantization.json says int8)"
                            }
                        ),
                    ));
                }
            }
        }
        if quant.is_some() && int8.is_empty() {
            return Err(err(
                &st_path,
                "quantization.json says int8 but the weights hold no int8 tensor".into(),
            ));
        }
        let mut s = Store {
            tensors,
            int8,
            path: st_path,
        };
        let stem = if cfg.stem_channels > 0 && matches!(cfg.input, InputKind::Signal { .. }) {
            Some((s.conv("stem.conv1")?, s.conv("stem.conv2")?))
        } else {
            None
        };
        // The image stem's layout, as `crate::vlm::ImageStem` builds it.
        let image_stem = match cfg.input {
            InputKind::Image { patch, .. } if cfg.stem_channels > 0 => vec![
                s.conv2("image_stem.convs.0", 2, 1)?,
                s.conv2("image_stem.convs.1", 2, 1)?,
                s.conv2("image_stem.convs.2", 2, 1)?,
                s.conv2("image_stem.convs.3", patch / 8, 0)?,
            ],
            _ => Vec::new(),
        };
        let stem_norms = (0..image_stem.len().saturating_sub(1))
            .map(|i| {
                Ok(GroupNorm {
                    gamma: s.take(&format!("image_stem.norms.{i}.gamma"))?.1,
                    beta: s.take(&format!("image_stem.norms.{i}.beta"))?.1,
                    groups: crate::vlm::STEM_GROUPS,
                })
            })
            .collect::<Result<Vec<_>, NativeError>>()?;
        Ok(NativeVlm {
            stem,
            image_stem,
            stem_norms,
            patch_embed: s.lin("patch_embed", true)?,
            vis_pos: s.take("vis_pos")?.1,
            vision: s.layers("vision", cfg.vision_layers)?,
            vis_norm: s.norm("vis_norm")?,
            projector: s.lin("projector", true)?,
            tok_emb: s.take("tok_emb.weight")?.1,
            pos: s.take("pos")?.1,
            decoder: s.layers("decoder", cfg.layers)?,
            norm: s.norm("norm")?,
            lm_head: s.lin("lm_head", false)?,
            cfg,
            quant,
        })
    }

    /// Visual tokens `[v, d_vision]` of one input (`[leads * samples]` signal or `[h * w]`
    /// image, as [`crate::vlm::EcgVlm::encode`] reads it).
    fn encode(&self, x: &[f32]) -> (Vec<f32>, usize) {
        let (patches, n) = match &self.cfg.input {
            InputKind::Signal {
                leads,
                samples,
                patch,
            } => {
                let n = samples / patch;
                let len = n * patch;
                let mut sig: Vec<f32> = (0..*leads)
                    .flat_map(|l| x[l * samples..l * samples + len].iter().copied())
                    .collect();
                let mut c = *leads;
                if let Some((c1, c2)) = &self.stem {
                    sig = c2.forward_gelu(&c1.forward_gelu(&sig, len), len);
                    c = c2.cout;
                }
                // Token t: for each channel, its `patch` samples.
                let mut p = Vec::with_capacity(n * c * patch);
                for t in 0..n {
                    for ch in 0..c {
                        p.extend_from_slice(&sig[ch * len + t * patch..ch * len + (t + 1) * patch]);
                    }
                }
                (p, n)
            }
            InputKind::Image {
                height: _,
                width,
                patch,
            } => {
                let (gh, gw) = (self.cfg.input.n_tokens() / (width / patch), width / patch);
                if !self.image_stem.is_empty() {
                    // The page cropped to whole patches, through the stem: channel-major
                    // `[c, gh, gw]`, read out token-major.
                    let (ch, cw) = (gh * patch, gw * patch);
                    let mut a: Vec<f32> = (0..ch)
                        .flat_map(|y| x[y * width..y * width + cw].iter().copied())
                        .collect();
                    let (mut h, mut w) = (ch, cw);
                    let last = self.image_stem.len() - 1;
                    for (c, gn) in self.image_stem.iter().zip(&self.stem_norms) {
                        (a, h, w) = c.forward(&a, h, w);
                        gn.forward_gelu(&mut a, h * w);
                    }
                    (a, h, w) = self.image_stem[last].forward(&a, h, w);
                    let c = self.image_stem[last].cout;
                    let n = h * w;
                    let p = (0..n)
                        .flat_map(|t| (0..c).map(move |k| (k, t)))
                        .map(|(k, t)| a[k * n + t])
                        .collect();
                    return self.embed_visual(p, n);
                }
                let mut p = Vec::with_capacity(gh * gw * patch * patch);
                for gy in 0..gh {
                    for gx in 0..gw {
                        for y in 0..*patch {
                            let row = (gy * patch + y) * width + gx * patch;
                            p.extend_from_slice(&x[row..row + patch]);
                        }
                    }
                }
                (p, gh * gw)
            }
        };
        self.embed_visual(patches, n)
    }

    /// Patch embedding, positions, the vision layers and norm over `n` token inputs.
    fn embed_visual(&self, patches: Vec<f32>, n: usize) -> (Vec<f32>, usize) {
        let mut h = self.patch_embed.forward(&patches, n);
        for (a, b) in h.iter_mut().zip(&self.vis_pos) {
            *a += b;
        }
        for l in &self.vision {
            let mut cache = LayerCache::default();
            l.forward(&mut h, n, self.cfg.vision_heads, &mut cache, false);
        }
        (self.vis_norm.forward(&h), n)
    }

    /// Run `x[n, d]` (already embedded, positions added) through the decoder, extending
    /// `caches`; returns the final-norm hidden states.
    fn decode(&self, mut x: Vec<f32>, n: usize, caches: &mut [LayerCache]) -> Vec<f32> {
        for (l, c) in self.decoder.iter().zip(caches.iter_mut()) {
            l.forward(&mut x, n, self.cfg.heads, c, true);
        }
        self.norm.forward(&x)
    }

    fn embed_tokens(&self, ids: &[i64], start: usize) -> Vec<f32> {
        let d = self.cfg.d_model;
        let mut x = Vec::with_capacity(ids.len() * d);
        for (i, &id) in ids.iter().enumerate() {
            let e = &self.tok_emb[id as usize * d..(id as usize + 1) * d];
            let p = &self.pos[(start + i) * d..(start + i + 1) * d];
            x.extend(e.iter().zip(p).map(|(a, b)| a + b));
        }
        x
    }

    fn prefix(&self, input: &[f32]) -> Prefix {
        let (vis, v) = self.encode(input);
        let d = self.cfg.d_model;
        let mut x = self.projector.forward(&vis, v);
        for (a, b) in x.iter_mut().zip(&self.pos[..v * d]) {
            *a += b;
        }
        let mut caches = vec![LayerCache::default(); self.decoder.len()];
        self.decode(x, v, &mut caches);
        Prefix { caches, len: v }
    }

    /// Longest text the position table covers.
    fn max_text(&self) -> usize {
        self.pos.len() / self.cfg.d_model - self.cfg.input.n_tokens()
    }

    /// What `interpret` asks of one record: `p(yes)` for each verification prompt and the
    /// greedy answer to the generation prompt, with one encoder pass and one visual-prefix
    /// pass shared by all of them. The verification prompts' common beginning (`<bos>Does
    /// this ECG show`) runs once after the prefix; their remainders and the generation
    /// prompt then run as one batch of segments (a remainder sees the prefix, the common
    /// beginning and itself; the generation prompt sees the prefix and itself), and a
    /// verification prompt's last position computes only the `yes` and `no` logits, not the
    /// whole vocabulary. Every position sees exactly what it would in its prompt alone.
    pub fn answer(&self, input: &[f32], q: &Questions<'_>) -> NativeAnswer {
        let Prefix { mut caches, len } = self.prefix(input);
        let d = self.cfg.d_model;
        let vocab = self.lm_head.dout;
        let verify: Vec<&[i64]> = q.verify_prompts.iter().map(Vec::as_slice).collect();
        let common = common_start(&verify);
        if common > 0 {
            let mut x = self.embed_tokens(&verify[0][..common], len);
            for (l, c) in self.decoder.iter().zip(caches.iter_mut()) {
                l.forward(&mut x, common, self.cfg.heads, c, true);
            }
        }
        let shared = len + common;
        let mut segs: Vec<Segment> = verify
            .iter()
            .map(|p| Segment {
                rows: p.len() - common,
                past: shared,
            })
            .collect();
        segs.push(Segment {
            rows: q.generate_prompt.len(),
            past: len,
        });
        let mut x: Vec<f32> = verify
            .iter()
            .flat_map(|p| self.embed_tokens(&p[common..], shared))
            .chain(self.embed_tokens(q.generate_prompt, len))
            .collect();
        // The generation prompt is the last segment: its keys and values extend the prefix's
        // cache for generation, without the verification prompts' common beginning.
        let gen_start = segs[..segs.len() - 1].iter().map(|g| g.rows).sum::<usize>();
        for (l, c) in self.decoder.iter().zip(caches.iter_mut()) {
            let (k, v) = l.forward_segments(&mut x, &segs, self.cfg.heads, c, true);
            c.k.truncate(len * d);
            c.v.truncate(len * d);
            c.k.extend_from_slice(&k[gen_start * d..]);
            c.v.extend_from_slice(&v[gen_start * d..]);
        }
        // Final norm and head at each segment's last row only.
        let last_row = |end: usize| self.norm.forward(&x[(end - 1) * d..end * d]);
        let mut end = 0;
        let (yes, no) = (q.yes as usize, q.no as usize);
        let probs = segs[..segs.len() - 1]
            .iter()
            .map(|g| {
                end += g.rows;
                let z = self.lm_head.forward_cols(&last_row(end), &[yes, no]);
                let (ly, ln) = (f64::from(z[0]), f64::from(z[1]));
                1.0 / (1.0 + (ln - ly).exp())
            })
            .collect();
        let mut h = last_row(x.len() / d);
        let mut generated = Vec::new();
        for pos in (q.generate_prompt.len()..).take(q.max_new) {
            let z = self.lm_head.forward(&h, 1);
            // First maximum, as argmax does.
            let mut best = 0;
            for (i, &v) in z.iter().enumerate().take(vocab) {
                if v > z[best] {
                    best = i;
                }
            }
            let next = best as i64;
            if next == q.eos || pos + 1 >= self.max_text() {
                break;
            }
            generated.push(next);
            h = self.decode(self.embed_tokens(&[next], len + pos), 1, &mut caches);
        }
        NativeAnswer { probs, generated }
    }
}

/// How many leading tokens all of `prompts` share, leaving each at least its last token
/// (whose logits are its answer); 0 for fewer than two prompts.
fn common_start(prompts: &[&[i64]]) -> usize {
    let Some((first, rest)) = prompts.split_first() else {
        return 0;
    };
    if rest.is_empty() {
        return 0;
    }
    let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
    let mut n = 0;
    while n + 1 < shortest && rest.iter().all(|p| p[n] == first[n]) {
        n += 1;
    }
    n
}

/// Quantise the weights of a model's `model.safetensors` for the int8 engine: every linear
/// layer's weight (each 2-D `*.weight` but the token embedding) becomes `*.weight_q` (i8,
/// `[out, in]`, symmetric, one scale per output channel: `max |w| / 127`) and
/// `*.weight_scale` (f32 `[out]`); every other tensor is kept as it is. Returns the new file's
/// bytes and the quantised layers' names. `path` names the source in errors.
pub fn quantize_weights(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, Vec<String>), NativeError> {
    let err = |what: String| NativeError {
        path: path.to_path_buf(),
        what,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| err(e.to_string()))?;
    let mut out: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut layers = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| err(e.to_string()))?;
        let shape = view.shape().to_vec();
        let linear = name.ends_with(".weight") && shape.len() == 2 && name != "tok_emb.weight";
        if !linear {
            out.push((name, view.dtype(), shape, view.data().to_vec()));
            continue;
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(err(format!("`{name}` is {:?}, expected F32", view.dtype())));
        }
        let w: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (din, dout) = (shape[0], shape[1]);
        let mut q = vec![0u8; din * dout];
        let mut scales = Vec::with_capacity(dout * 4);
        let mut col = vec![0.0f32; din];
        let mut codes = vec![0i8; din];
        for o in 0..dout {
            for (i, c) in col.iter_mut().enumerate() {
                *c = w[i * dout + o];
            }
            let s = quantize_row(&col, &mut codes);
            for (dst, &c) in q[o * din..(o + 1) * din].iter_mut().zip(&codes) {
                *dst = c as u8;
            }
            scales.extend_from_slice(&s.to_le_bytes());
        }
        let base = name.trim_end_matches(".weight").to_string();
        out.push((
            format!("{base}.weight_q"),
            safetensors::Dtype::I8,
            vec![dout, din],
            q,
        ));
        out.push((
            format!("{base}.weight_scale"),
            safetensors::Dtype::F32,
            vec![dout],
            scales,
        ));
        layers.push(base);
    }
    let views = out
        .iter()
        .map(|(n, dt, shape, data)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| err(e.to_string()))?;
    Ok((bytes, layers))
}
#[cfg(test)]
mod simd_level {
    /// On a CPU with AVX2 the dispatch must not fall back to the SSE2 baseline (pulp's
    /// `x86-v3` level must be enabled: with `x86-v4` alone an AVX2-only CPU got `Scalar`).
    #[test]
    fn dispatch_uses_avx2_where_the_cpu_has_it() {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert!(
                !matches!(pulp::Arch::new(), pulp::Arch::Scalar),
                "pulp dispatches to its scalar baseline on an AVX2 CPU"
            );
        }
    }
}
