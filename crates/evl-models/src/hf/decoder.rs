//! The LLaMA-family decoder both real models share: LLaMA-2/Vicuna (PULSE-7B's) and Qwen3
//! (Qwen3-VL's). Pre-RMSNorm blocks; GQA attention with rotary positions (1-D, or Qwen3-VL's
//! multimodal sections, chunked or interleaved), optional q/k RMSNorm per head (Qwen3); SwiGLU
//! MLP; a KV cache for generation; tied or separate output head.
//!
//! Numerics follow transformers' eager path in f32: RoPE frequencies are computed in f32 as
//! PyTorch does (`1 / theta^(2i/d)`, then `position * inv_freq`), the softmax is a plain
//! max-shifted softmax over keys, masked keys get `-inf` before it.

use super::io::{Exporter, Loader};
use burn::module::Module;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData, activation};
use evl_hf::config::TextConfig;
use evl_hf::weights::Error;

type Result<T> = std::result::Result<T, Error>;

/// Rotary position tables for one forward pass: `cos`, `sin` `[b, s, head_dim]`.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// Cosines.
    pub cos: Tensor<3>,
    /// Sines.
    pub sin: Tensor<3>,
}

/// Rotary positions of the language model.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    mrope: Option<([usize; 3], bool)>,
}

impl Rope {
    /// From the text configuration.
    pub fn new(cfg: &TextConfig) -> Self {
        Rope {
            inv_freq: inv_freq(cfg.rope_theta, cfg.head_dim),
            mrope: cfg.mrope,
        }
    }

    /// Which position axis (0 temporal, 1 height, 2 width) drives each rotary pair.
    pub fn axis_of_pairs(&self) -> Vec<usize> {
        let half = self.inv_freq.len();
        let axis_of = |j: usize| -> usize {
            match self.mrope {
                None => 0,
                Some((sec, true)) => {
                    // Interleaved: pair j takes H when j % 3 == 1 (below 3*sec[1]), W when
                    // j % 3 == 2 (below 3*sec[2]), T otherwise.
                    if j % 3 == 1 && j < 3 * sec[1] {
                        1
                    } else if j % 3 == 2 && j < 3 * sec[2] {
                        2
                    } else {
                        0
                    }
                }
                Some((sec, false)) => {
                    if j < sec[0] {
                        0
                    } else if j < sec[0] + sec[1] {
                        1
                    } else {
                        2
                    }
                }
            }
        };
        (0..half).map(axis_of).collect()
    }

    /// Tables for positions given per axis: one axis (`[b*s]`) for 1-D RoPE, three
    /// (temporal, height, width) for multimodal RoPE; a single axis is used for all three.
    pub fn tables(&self, axes: &[Vec<i64>], b: usize, s: usize, device: &Device) -> RopeTables {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * s * half * 2);
        let mut sin = Vec::with_capacity(b * s * half * 2);
        let axis_for = self.axis_of_pairs();
        for p in 0..b * s {
            let mut row = Vec::with_capacity(half);
            for (j, f) in self.inv_freq.iter().enumerate() {
                let axis = axis_for[j].min(axes.len() - 1);
                // f32 product, as PyTorch's float32 `inv_freq @ position_ids`.
                let angle = axes[axis][p] as f32 * f;
                row.push(angle);
            }
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        let t = |v: Vec<f32>| {
            Tensor::<3>::from_data(TensorData::new(v, [b, s, half * 2]), (device, DType::F32))
        };
        RopeTables {
            cos: t(cos),
            sin: t(sin),
        }
    }
}

/// `1 / theta^(2i / dim)` for `i < dim / 2`, in f32 as PyTorch computes it.
pub fn inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// `x * cos + rotate_half(x) * sin` for `x` `[b, h, s, d]`, tables `[b, s, d]`.
pub fn apply_rope(x: Tensor<4>, t: &RopeTables) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * t.cos.clone().unsqueeze_dim(1) + rotated * t.sin.clone().unsqueeze_dim(1)
}

/// Scaled dot-product attention with an optional additive mask `[b, 1, s_q, s_k]`
/// (`q` `[b, h, s_q, d]`, `k`, `v` `[b, h, s_k, d]`).
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Option<&Tensor<4>>) -> Tensor<4> {
    let d = q.dims()[3];
    let mut scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
    if let Some(m) = mask {
        scores = scores + m.clone();
    }
    activation::softmax(scores, 3).matmul(v)
}

/// The additive mask of a causal pass over `s` new positions after `past` cached ones, with
/// key padding: `valid[b][j]` (over `past + s` keys) false = masked. `None` when nothing is
/// masked (one new token and no padding).
pub fn causal_mask(
    b: usize,
    s: usize,
    past: usize,
    valid: Option<&[Vec<bool>]>,
    device: &Device,
) -> Option<Tensor<4>> {
    let k = past + s;
    if s == 1 && valid.is_none() {
        return None;
    }
    let mut m = vec![0f32; b * s * k];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..k {
                let future = j > past + i;
                let pad = valid.is_some_and(|v| !v[bi][j]);
                if future || pad {
                    m[(bi * s + i) * k + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Some(Tensor::from_data(
        TensorData::new(m, [b, 1, s, k]),
        (device, DType::F32),
    ))
}

/// Repeats each key/value head `rep` times: `[b, kvh, s, d]` -> `[b, kvh * rep, s, d]`.
fn repeat_kv(x: Tensor<4>, rep: usize) -> Tensor<4> {
    if rep == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, rep, s, d])
        .reshape([b, kvh * rep, s, d])
}

/// GQA self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// One layer's cached keys and values `[b, kv_heads, s, head_dim]` (after RoPE).
pub type LayerCache = Option<(Tensor<4>, Tensor<4>)>;

impl Attention {
    fn load(l: &mut Loader, p: &str, c: &TextConfig) -> Result<Self> {
        let (d, hd) = (c.hidden_size, c.head_dim);
        let bias = c.attention_bias;
        Ok(Attention {
            q_proj: l.linear(&format!("{p}.q_proj"), d, c.num_heads * hd, bias)?,
            k_proj: l.linear(&format!("{p}.k_proj"), d, c.num_kv_heads * hd, bias)?,
            v_proj: l.linear(&format!("{p}.v_proj"), d, c.num_kv_heads * hd, bias)?,
            o_proj: l.linear(&format!("{p}.o_proj"), c.num_heads * hd, d, bias)?,
            q_norm: if c.qk_norm {
                Some(l.rms_norm(&format!("{p}.q_norm.weight"), hd, c.rms_norm_eps)?)
            } else {
                None
            },
            k_norm: if c.qk_norm {
                Some(l.rms_norm(&format!("{p}.k_norm.weight"), hd, c.rms_norm_eps)?)
            } else {
                None
            },
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: hd,
        })
    }

    fn export(&self, e: &mut Exporter, p: &str) {
        e.linear(&format!("{p}.q_proj"), &self.q_proj);
        e.linear(&format!("{p}.k_proj"), &self.k_proj);
        e.linear(&format!("{p}.v_proj"), &self.v_proj);
        e.linear(&format!("{p}.o_proj"), &self.o_proj);
        if let Some(n) = &self.q_norm {
            e.rms_norm(&format!("{p}.q_norm.weight"), n);
        }
        if let Some(n) = &self.k_norm {
            e.rms_norm(&format!("{p}.k_norm.weight"), n);
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        mask: Option<&Tensor<4>>,
        cache: &mut LayerCache,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let hd = self.head_dim;
        let split = |t: Tensor<3>, h: usize, norm: &Option<RmsNorm>| {
            let t = t.reshape([b, s, h, hd]);
            let t = match norm {
                Some(n) => n.forward(t),
                None => t,
            };
            t.swap_dims(1, 2)
        };
        let q = apply_rope(
            split(self.q_proj.forward(x.clone()), self.heads, &self.q_norm),
            rope,
        );
        let mut k = apply_rope(
            split(self.k_proj.forward(x.clone()), self.kv_heads, &self.k_norm),
            rope,
        );
        let mut v = split(self.v_proj.forward(x), self.kv_heads, &None);
        if let Some((pk, pv)) = cache.take() {
            k = Tensor::cat(vec![pk, k], 2);
            v = Tensor::cat(vec![pv, v], 2);
        }
        *cache = Some((k.clone(), v.clone()));
        let rep = self.heads / self.kv_heads;
        let out = attention(q, repeat_kv(k, rep), repeat_kv(v, rep), mask);
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, self.heads * hd]))
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGlu {
    fn load(l: &mut Loader, p: &str, d: usize, inner: usize) -> Result<Self> {
        Ok(SwiGlu {
            gate_proj: l.linear(&format!("{p}.gate_proj"), d, inner, false)?,
            up_proj: l.linear(&format!("{p}.up_proj"), d, inner, false)?,
            down_proj: l.linear(&format!("{p}.down_proj"), inner, d, false)?,
        })
    }

    fn export(&self, e: &mut Exporter, p: &str) {
        e.linear(&format!("{p}.gate_proj"), &self.gate_proj);
        e.linear(&format!("{p}.up_proj"), &self.up_proj);
        e.linear(&format!("{p}.down_proj"), &self.down_proj);
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let g = activation::silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(g * self.up_proj.forward(x))
    }
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: SwiGlu,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        mask: Option<&Tensor<4>>,
        cache: &mut LayerCache,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// Features added to the hidden states at chosen positions after the first layers
/// (Qwen3-VL's DeepStack): `features[i]` `[b, s, d]` (zero elsewhere) after layer `i`.
pub struct Injections {
    /// One dense `[b, s, d]` addend per early layer.
    pub features: Vec<Tensor<3>>,
}

/// What [`TextModel::forward`] returns.
pub struct TextOutput {
    /// Hidden states after the final norm `[b, s, d]`.
    pub last: Tensor<3>,
    /// `hidden_states.0 ..= L` in transformers' convention when requested: the input
    /// embeddings, each layer's output (before a DeepStack addition, as transformers records
    /// them), and the final normed states as the last entry.
    pub all: Vec<Tensor<3>>,
}

/// The decoder language model.
#[derive(Module, Debug)]
pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    rope_theta: f64,
    head_dim: usize,
    /// Multimodal RoPE sections (empty: 1-D RoPE).
    mrope_sections: Vec<usize>,
    mrope_interleaved: bool,
}

/// The KV cache of a [`TextModel`].
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|c| c.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TextModel {
    /// Loads the decoder whose tensors are `{model}.embed_tokens.weight`,
    /// `{model}.layers.N.*`, `{model}.norm.weight`, and `head` (ignored when tied).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(l: &mut Loader, model: &str, head: &str, c: &TextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let layers = (0..c.num_layers)
            .map(|i| {
                let p = format!("{model}.layers.{i}");
                Ok(DecoderLayer {
                    self_attn: Attention::load(l, &format!("{p}.self_attn"), c)?,
                    mlp: SwiGlu::load(l, &format!("{p}.mlp"), d, c.intermediate_size)?,
                    input_layernorm: l.rms_norm(
                        &format!("{p}.input_layernorm.weight"),
                        d,
                        c.rms_norm_eps,
                    )?,
                    post_attention_layernorm: l.rms_norm(
                        &format!("{p}.post_attention_layernorm.weight"),
                        d,
                        c.rms_norm_eps,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = l.embedding(&format!("{model}.embed_tokens.weight"), c.vocab_size, d)?;
        let norm = l.rms_norm(&format!("{model}.norm.weight"), d, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still store the head (a copy); it is the same matrix.
            if l.has(head) {
                let _ = l.tensor::<2>(head, [c.vocab_size, d])?;
            }
            None
        } else {
            Some(l.linear(head.trim_end_matches(".weight"), d, c.vocab_size, false)?)
        };
        let (mrope_sections, mrope_interleaved) = match c.mrope {
            Some((sec, inter)) => (sec.to_vec(), inter),
            None => (Vec::new(), false),
        };
        Ok(TextModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_theta: c.rope_theta,
            head_dim: c.head_dim,
            mrope_sections,
            mrope_interleaved,
        })
    }

    /// Writes the tensors back under the names [`TextModel::load`] read.
    pub fn export(&self, e: &mut Exporter, model: &str, head: &str) {
        e.tensor(
            &format!("{model}.embed_tokens.weight"),
            self.embed_tokens.weight.val(),
        );
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("{model}.layers.{i}");
            layer.self_attn.export(e, &format!("{p}.self_attn"));
            layer.mlp.export(e, &format!("{p}.mlp"));
            e.rms_norm(
                &format!("{p}.input_layernorm.weight"),
                &layer.input_layernorm,
            );
            e.rms_norm(
                &format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            );
        }
        e.rms_norm(&format!("{model}.norm.weight"), &self.norm);
        if let Some(h) = &self.lm_head {
            e.linear(head.trim_end_matches(".weight"), h);
        }
    }

    /// Token embeddings `[b, s, d]`; ids outside the vocabulary (placeholders that will be
    /// replaced, such as LLaVA's `-200`) must be mapped by the caller first.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.embed_tokens.forward(ids)
    }

    /// The rotary position tables' generator.
    pub fn rope(&self) -> Rope {
        Rope {
            inv_freq: inv_freq(self.rope_theta, self.head_dim),
            mrope: match self.mrope_sections[..] {
                [t, h, w] => Some(([t, h, w], self.mrope_interleaved)),
                _ => None,
            },
        }
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs the decoder over embeddings `x` `[b, s, d]`, appending to `cache`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        mask: Option<&Tensor<4>>,
        cache: &mut KvCache,
        inject: Option<&Injections>,
        collect: bool,
    ) -> TextOutput {
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let n = self.layers.len();
        let mut all = Vec::new();
        let mut h = x;
        if collect {
            all.push(h.clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h, rope, mask, &mut cache.layers[i]);
            // transformers records each layer's own output (before a DeepStack addition);
            // the last layer's entry is the final normed state instead.
            if collect && i + 1 < n {
                all.push(h.clone());
            }
            if let Some(f) = inject.and_then(|inj| inj.features.get(i)) {
                h = h + f.clone();
            }
        }
        let last = self.norm.forward(h);
        if collect {
            all.push(last.clone());
        }
        TextOutput { last, all }
    }

    /// Logits `[b, s, vocab]` of hidden states.
    pub fn logits(&self, h: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(l) => l.forward(h),
            None => {
                let [b, s, d] = h.dims();
                let w = self.embed_tokens.weight.val();
                let v = w.dims()[0];
                let h = h.reshape([b * s, d]);
                // Decoding a few rows: `E h^T`, transposed back (a copy of `[vocab, rows]`),
                // is faster on flex than `h E^T` over the transposed table (measured with
                // `bench hf`: 24.5 -> 27.5 tokens/s at mid size); for whole sequences the
                // direct product wins (forward 383 -> 325 ms).
                if b * s <= 8 {
                    w.matmul(h.transpose()).transpose().reshape([b, s, v])
                } else {
                    h.matmul(w.transpose()).reshape([b, s, v])
                }
            }
        }
    }

    /// The output head as `[d, vocab]`.
    pub fn head(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(l) => l.weight.val(),
            None => self.embed_tokens.weight.val().transpose(),
        }
    }
}

/// Builds `[b, s]` token ids from host values.
pub fn ids_tensor(ids: &[i64], b: usize, s: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [b, s]), device)
}

/// A `[b, s]` boolean tensor from host values.
pub fn bool_2d(v: &[bool], b: usize, s: usize, device: &Device) -> Tensor<2, Bool> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, s]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(sections: [usize; 3], interleaved: bool) -> Rope {
        Rope {
            inv_freq: vec![1.0; sections.iter().sum()],
            mrope: Some((sections, interleaved)),
        }
    }

    /// The reference model is too small to notice a wrong interleave (a swapped H/W layout
    /// moves its hidden states by 3e-5, inside the 1e-4 tolerance), so the layout is pinned
    /// here: transformers' `apply_interleaved_mrope` (T H W T H W ..., the tail T) and
    /// Qwen2-VL's chunked sections.
    #[test]
    fn multimodal_rope_axis_layout() {
        assert_eq!(
            rope([4, 2, 2], true).axis_of_pairs(),
            vec![0, 1, 2, 0, 1, 2, 0, 0]
        );
        let real = rope([24, 20, 20], true).axis_of_pairs();
        assert_eq!(&real[..7], &[0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(real.iter().filter(|&&a| a == 1).count(), 20);
        assert_eq!(real.iter().filter(|&&a| a == 2).count(), 20);
        assert_eq!(&real[58..], &[1, 2, 0, 0, 0, 0]);
        assert_eq!(rope([2, 1, 1], false).axis_of_pairs(), vec![0, 0, 1, 2]);
    }
}
