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
        // Round half away from zero (as `f32::round`) by truncation, without a libm call.
        let t = (v * inv).clamp(-127.0, 127.0);
        *c = (t + 0.5f32.copysign(t)) as i8;
    }
    amax / 127.0
}

/// `y[r, o] = (sum_i xq[r, i] q[i, o]) * sx[r] * scale[o]` for every row and output channel:
/// the int8 product, accumulated in i32 across the output channels (one broadcast input
/// code times a row of weight codes per step: no horizontal sums, which dominate dot
/// products of these short rows), run through pulp's dispatch so the loops are compiled for
/// the widest SIMD level of the CPU (the default x86-64 target has only SSE2). Integer sums
/// are exact, so any order gives the same result.
struct Int8Product<'a> {
    xq: &'a [i8],
    sx: &'a [f32],
    /// `[din, dout]`.
    q: &'a [i8],
    scale: &'a [f32],
    din: usize,
    y: &'a mut [f32],
}

impl pulp::WithSimd for Int8Product<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            xq,
            sx,
            q,
            scale,
            din,
            y,
        } = self;
        let dout = scale.len();
        // Four rows at a time share each weight row (four times the work per load); the
        // leftover rows go one by one.
        const R: usize = 4;
        let mut acc = vec![0i32; R * dout];
        let rows = sx.len();
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(R);
            acc.iter_mut().for_each(|a| *a = 0);
            if nr == R {
                let (a0, rest) = acc.split_at_mut(dout);
                let (a1, rest) = rest.split_at_mut(dout);
                let (a2, a3) = rest.split_at_mut(dout);
                for (i, qr) in q.chunks_exact(dout).enumerate() {
                    let x = |r: usize| i16::from(xq[(r0 + r) * din + i]);
                    let (x0, x1, x2, x3) = (x(0), x(1), x(2), x(3));
                    for o in 0..dout {
                        let w = i16::from(qr[o]);
                        a0[o] += i32::from(x0 * w);
                        a1[o] += i32::from(x1 * w);
                        a2[o] += i32::from(x2 * w);
                        a3[o] += i32::from(x3 * w);
                    }
                }
            } else {
                for r in 0..nr {
                    let a = &mut acc[r * dout..(r + 1) * dout];
                    let xr = &xq[(r0 + r) * din..(r0 + r + 1) * din];
                    for (&xi, qr) in xr.iter().zip(q.chunks_exact(dout)) {
                        // |code| <= 127, so a product fits in i16 (16-bit multiplies are the
                        // cheap ones); the sum is kept in i32.
                        let xi = i16::from(xi);
                        for (a, &w) in a.iter_mut().zip(qr) {
                            *a += i32::from(xi * i16::from(w));
                        }
                    }
                }
            }
            for r in 0..nr {
                let yr = &mut y[(r0 + r) * dout..(r0 + r + 1) * dout];
                let s_row = sx[r0 + r];
                for ((o, &a), &s_out) in yr.iter_mut().zip(&acc[r * dout..]).zip(scale) {
                    *o = a as f32 * (s_row * s_out);
                }
            }
            r0 += nr;
        }
    }
}

impl Lin {
    /// `y[n, dout] = x[n, din] W + b`. f32: ndarray's `dot` (matrixmultiply's sgemm with
    /// runtime-detected AVX2/FMA kernels, pure Rust, a safe API). int8: each input row is
    /// quantised to int8 with its own scale (dynamic quantisation), multiplied with the
    /// int8 weight rows in i32, and rescaled by the row's and the output channel's scales.
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = match &self.w {
            Weights::F32(w) => {
                let xa = ndarray::ArrayView2::from_shape((n, self.din), x).expect("n * din inputs");
                let wa = ndarray::ArrayView2::from_shape((self.din, self.dout), w.as_slice())
                    .expect("din * dout");
                xa.dot(&wa).into_raw_vec_and_offset().0
            }
            Weights::Int8 { q, scale } => {
                let mut y = vec![0.0f32; n * self.dout];
                let mut xq = vec![0i8; n * self.din];
                let sx: Vec<f32> = x
                    .chunks_exact(self.din)
                    .zip(xq.chunks_exact_mut(self.din))
                    .map(|(xr, qr)| quantize_row(xr, qr))
                    .collect();
                pulp::Arch::new().dispatch(Int8Product {
                    xq: &xq,
                    sx: &sx,
                    q,
                    scale,
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

struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.g.len();
        let mut y = vec![0.0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for i in 0..d {
                yr[i] = (xr[i] - mean) * inv * self.g[i] + self.b[i];
            }
        }
        y
    }
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

/// Exact-form GELU `x/2 (1 + erf(x/sqrt 2))` with erf from Abramowitz & Stegun 7.1.26
/// (absolute error <= 1.5e-7, below f32 resolution of the result): one `exp` instead of a
/// libm `erf` call, which was most of the native engine's time (50k calls per record).
fn gelu(x: f32) -> f32 {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * (-z * z).exp();
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

#[cfg(test)]
mod tests {
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
        let d = self.q.dout;
        let dk = d / heads;
        let h = self.norm_attn.forward(x);
        let q = self.q.forward(&h, n);
        cache.k.extend(self.k.forward(&h, n));
        cache.v.extend(self.v.forward(&h, n));
        let total = cache.k.len() / d;
        let past = total - n;
        let scale = 1.0 / (dk as f32).sqrt();
        let mut ctx = vec![0.0f32; n * d];
        let mut scores = vec![0.0f32; total];
        for i in 0..n {
            let visible = if causal { past + i + 1 } else { total };
            for hd in 0..heads {
                let qi = &q[i * d + hd * dk..i * d + (hd + 1) * dk];
                let mut max = f32::MIN;
                for (j, s) in scores.iter_mut().enumerate().take(visible) {
                    let kj = &cache.k[j * d + hd * dk..j * d + (hd + 1) * dk];
                    *s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0f32;
                for s in scores.iter_mut().take(visible) {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let out = &mut ctx[i * d + hd * dk..i * d + (hd + 1) * dk];
                for (j, s) in scores.iter().enumerate().take(visible) {
                    let w = s / sum;
                    let vj = &cache.v[j * d + hd * dk..j * d + (hd + 1) * dk];
                    for (o, &vv) in out.iter_mut().zip(vj) {
                        *o += w * vv;
                    }
                }
            }
        }
        let att = self.o.forward(&ctx, n);
        for (a, b) in x.iter_mut().zip(&att) {
            *a += b;
        }
        let h = self.norm_ffn.forward(x);
        let mut mid = self.inner.forward(&h, n);
        mid.iter_mut().for_each(|v| *v = gelu(*v));
        let out = self.outer.forward(&mid, n);
        for (a, b) in x.iter_mut().zip(&out) {
            *a += b;
        }
    }
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
            yr.iter_mut().for_each(|v| *v = gelu(*v));
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
    /// (symmetric), activations quantised per row at run time; everything else f32.
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
    /// pass shared by all of them.
    pub fn answer(&self, input: &[f32], q: &Questions<'_>) -> NativeAnswer {
        let prefix = self.prefix(input);
        let d = self.cfg.d_model;
        let vocab = self.lm_head.dout;
        let last_logits = |h: &[f32], n: usize| self.lm_head.forward(&h[(n - 1) * d..n * d], 1);
        let probs = q
            .verify_prompts
            .iter()
            .map(|p| {
                let mut caches = prefix.caches.clone();
                let h = self.decode(self.embed_tokens(p, prefix.len), p.len(), &mut caches);
                let z = last_logits(&h, p.len());
                let (ly, ln) = (z[q.yes as usize] as f64, z[q.no as usize] as f64);
                1.0 / (1.0 + (ln - ly).exp())
            })
            .collect();
        let mut caches = prefix.caches.clone();
        let mut h = self.decode(
            self.embed_tokens(q.generate_prompt, prefix.len),
            q.generate_prompt.len(),
            &mut caches,
        );
        let mut n_new = q.generate_prompt.len();
        let mut generated = Vec::new();
        for len in (q.generate_prompt.len()..).take(q.max_new) {
            let z = last_logits(&h, n_new);
            // First maximum, as argmax does.
            let mut best = 0;
            for (i, &v) in z.iter().enumerate().take(vocab) {
                if v > z[best] {
                    best = i;
                }
            }
            let next = best as i64;
            if next == q.eos || len + 1 >= self.max_text() {
                break;
            }
            generated.push(next);
            h = self.decode(self.embed_tokens(&[next], prefix.len + len), 1, &mut caches);
            n_new = 1;
        }
        NativeAnswer { probs, generated }
    }
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
