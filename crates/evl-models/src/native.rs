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

struct Lin {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    din: usize,
    dout: usize,
}

impl Lin {
    /// `y[n, dout] = x[n, din] W + b`, through ndarray's `dot` (matrixmultiply's sgemm with
    /// runtime-detected AVX2/FMA kernels, pure Rust, a safe API).
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let xa = ndarray::ArrayView2::from_shape((n, self.din), x).expect("n * din inputs");
        let wa =
            ndarray::ArrayView2::from_shape((self.din, self.dout), &self.w).expect("din * dout");
        let mut y = xa.dot(&wa);
        if let Some(b) = &self.b {
            for mut row in y.rows_mut() {
                for (o, &bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
        y.into_raw_vec_and_offset().0
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
    path: std::path::PathBuf,
}

impl Store {
    fn take(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>), NativeError> {
        self.tensors.remove(name).ok_or_else(|| NativeError {
            path: self.path.clone(),
            what: format!("missing tensor `{name}`"),
        })
    }

    fn lin(&mut self, name: &str, bias: bool) -> Result<Lin, NativeError> {
        let (shape, w) = self.take(&format!("{name}.weight"))?;
        let b = if bias {
            Some(self.take(&format!("{name}.bias"))?.1)
        } else {
            None
        };
        Ok(Lin {
            w,
            b,
            din: shape[0],
            dout: shape[1],
        })
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
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(err(
                    &st_path,
                    format!("`{name}` is {:?}, expected F32", view.dtype()),
                ));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        let mut s = Store {
            tensors,
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
