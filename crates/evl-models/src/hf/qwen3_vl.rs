//! Qwen3-VL (the paper's student, Qwen3-VL-2B-Instruct) in burn, loaded from a Hugging Face
//! checkpoint folder.
//!
//! Vision: a Conv3d patch embedding whose kernel equals its stride (so a linear map over the
//! flattened `[C, T, P, P]` patch), learned position embeddings on a square grid bilinearly
//! interpolated to the image's patch grid, 2-D rotary attention (row and column frequencies
//! side by side), a 2x2 patch merger to the LM width, and DeepStack mergers whose outputs are
//! added to the first decoder layers' hidden states at the image positions. Text: the Qwen3
//! decoder of [`super::decoder`] with q/k norms, GQA and interleaved multimodal RoPE.
//!
//! Patches arrive in the processor's order: merge windows of `merge x merge` neighbouring
//! patches are consecutive, so merging is a reshape.

use super::decoder::{
    Injections, KvCache, RopeTables, TextModel, apply_rope, attention, causal_mask, ids_tensor,
    inv_freq,
};
use super::io::{Exporter, Loader};
use super::{HfError, Result};
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData, activation};
use evl_hf::config::{Qwen3VisionConfig, Qwen3VlConfig};

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
fn gelu_tanh(x: Tensor<2>) -> Tensor<2> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * c;
    x * (inner.tanh() + 1.0) * 0.5
}

#[derive(Module, Debug)]
struct VisionBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl VisionBlock {
    fn forward(&self, x: Tensor<2>, rope: &RopeTables) -> Tensor<2> {
        let [n, d] = x.dims();
        let hd = d / self.heads;
        let qkv = self
            .qkv
            .forward(self.norm1.forward(x.clone()))
            .reshape([n, 3, self.heads, hd]);
        let part = |i: usize| {
            qkv.clone()
                .slice([0..n, i..i + 1, 0..self.heads, 0..hd])
                .reshape([1, n, self.heads, hd])
                .swap_dims(1, 2)
        };
        let q = apply_rope(part(0), rope);
        let k = apply_rope(part(1), rope);
        let a = attention(q, k, part(2), None)
            .swap_dims(1, 2)
            .reshape([n, d]);
        let x = x + self.proj.forward(a);
        let h = self
            .fc2
            .forward(gelu_tanh(self.fc1.forward(self.norm2.forward(x.clone()))));
        x + h
    }
}

/// A patch merger: LayerNorm (per patch, or over the concatenated window when `postshuffle`),
/// then `Linear -> GELU -> Linear` from `merge^2 * width` to the LM width.
#[derive(Module, Debug)]
struct Merger {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    postshuffle: bool,
    unit: usize,
}

impl Merger {
    fn load(l: &mut Loader, p: &str, v: &Qwen3VisionConfig, postshuffle: bool) -> Result<Self> {
        let unit = v.hidden_size * v.spatial_merge_size * v.spatial_merge_size;
        let norm_d = if postshuffle { unit } else { v.hidden_size };
        Ok(Merger {
            norm: l.layer_norm(&format!("{p}.norm"), norm_d, 1e-6)?,
            fc1: l.linear(&format!("{p}.linear_fc1"), unit, unit, true)?,
            fc2: l.linear(&format!("{p}.linear_fc2"), unit, v.out_hidden_size, true)?,
            postshuffle,
            unit,
        })
    }

    fn export(&self, e: &mut Exporter, p: &str) {
        e.layer_norm(&format!("{p}.norm"), &self.norm);
        e.linear(&format!("{p}.linear_fc1"), &self.fc1);
        e.linear(&format!("{p}.linear_fc2"), &self.fc2);
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, d] = x.dims();
        let groups = n * d / self.unit;
        let x = if self.postshuffle {
            self.norm.forward(x.reshape([groups, self.unit]))
        } else {
            self.norm.forward(x).reshape([groups, self.unit])
        };
        self.fc2.forward(activation::gelu(self.fc1.forward(x)))
    }
}

/// The vision tower.
#[derive(Module, Debug)]
pub struct Qwen3Vision {
    patch_embed: Linear,
    pos_embed: Param<Tensor<2>>,
    blocks: Vec<VisionBlock>,
    merger: Merger,
    deepstack: Vec<Merger>,
    deepstack_at: Vec<usize>,
    merge: usize,
    side: usize,
    heads: usize,
    patch_shape: Vec<usize>,
}

/// What the vision tower produces for one image.
pub struct VisionOut {
    /// Tower output before merging `[patches, width]`.
    pub last_hidden: Tensor<2>,
    /// Merged visual tokens `[tokens, lm width]`.
    pub embeds: Tensor<2>,
    /// DeepStack features, one `[tokens, lm width]` per injected layer.
    pub deepstack: Vec<Tensor<2>>,
}

impl Qwen3Vision {
    fn load(l: &mut Loader, p: &str, v: &Qwen3VisionConfig) -> Result<Self> {
        let d = v.hidden_size;
        let patch_shape = vec![
            d,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ];
        let blocks = (0..v.depth)
            .map(|i| {
                let b = format!("{p}.blocks.{i}");
                Ok(VisionBlock {
                    norm1: l.layer_norm(&format!("{b}.norm1"), d, 1e-6)?,
                    norm2: l.layer_norm(&format!("{b}.norm2"), d, 1e-6)?,
                    qkv: l.linear(&format!("{b}.attn.qkv"), d, 3 * d, true)?,
                    proj: l.linear(&format!("{b}.attn.proj"), d, d, true)?,
                    fc1: l.linear(&format!("{b}.mlp.linear_fc1"), d, v.intermediate_size, true)?,
                    fc2: l.linear(&format!("{b}.mlp.linear_fc2"), v.intermediate_size, d, true)?,
                    heads: v.num_heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Qwen3Vision {
            patch_embed: l.linear_from(&format!("{p}.patch_embed.proj"), &patch_shape, true)?,
            pos_embed: l.param(
                &format!("{p}.pos_embed.weight"),
                [v.num_position_embeddings, d],
            )?,
            blocks,
            merger: Merger::load(l, &format!("{p}.merger"), v, false)?,
            deepstack: (0..v.deepstack_visual_indexes.len())
                .map(|i| Merger::load(l, &format!("{p}.deepstack_merger_list.{i}"), v, true))
                .collect::<Result<Vec<_>>>()?,
            deepstack_at: v.deepstack_visual_indexes.clone(),
            merge: v.spatial_merge_size,
            side: (v.num_position_embeddings as f64).sqrt() as usize,
            heads: v.num_heads,
            patch_shape,
        })
    }

    fn export(&self, e: &mut Exporter, p: &str) {
        e.linear_as(
            &format!("{p}.patch_embed.proj"),
            &self.patch_embed,
            &self.patch_shape,
        );
        e.tensor(&format!("{p}.pos_embed.weight"), self.pos_embed.val());
        for (i, b) in self.blocks.iter().enumerate() {
            let q = format!("{p}.blocks.{i}");
            e.layer_norm(&format!("{q}.norm1"), &b.norm1);
            e.layer_norm(&format!("{q}.norm2"), &b.norm2);
            e.linear(&format!("{q}.attn.qkv"), &b.qkv);
            e.linear(&format!("{q}.attn.proj"), &b.proj);
            e.linear(&format!("{q}.mlp.linear_fc1"), &b.fc1);
            e.linear(&format!("{q}.mlp.linear_fc2"), &b.fc2);
        }
        self.merger.export(e, &format!("{p}.merger"));
        for (i, m) in self.deepstack.iter().enumerate() {
            m.export(e, &format!("{p}.deepstack_merger_list.{i}"));
        }
    }

    /// Patch coordinates `(row, col)` in the processor's merge-window order.
    fn coords(&self, [t, h, w]: [usize; 3]) -> Vec<(usize, usize)> {
        let m = self.merge;
        let mut out = Vec::with_capacity(t * h * w);
        for _ in 0..t {
            for bh in 0..h / m {
                for bw in 0..w / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            out.push((bh * m + ih, bw * m + iw));
                        }
                    }
                }
            }
        }
        out
    }

    /// Learned positions bilinearly interpolated from the `side x side` table to an `h x w`
    /// grid (`linspace(0, side-1, h)` sample points, truncated to the cell below), in patch
    /// order.
    fn positions(&self, grid: [usize; 3], device: &Device) -> Tensor<2> {
        let side = self.side;
        let lin = |n: usize| -> Vec<f32> {
            // torch.linspace in f32: start + i * step for the first half, end - (n-1-i) * step
            // for the second.
            let end = (side - 1) as f32;
            if n == 1 {
                return vec![0.0];
            }
            let step = end / (n - 1) as f32;
            (0..n)
                .map(|i| {
                    if i < n / 2 {
                        i as f32 * step
                    } else {
                        end - (n - 1 - i) as f32 * step
                    }
                })
                .collect()
        };
        let (hs, ws) = (lin(grid[1]), lin(grid[2]));
        let coords = self.coords(grid);
        let n = coords.len();
        let mut idx: [Vec<i64>; 4] = std::array::from_fn(|_| Vec::with_capacity(n));
        let mut wt: [Vec<f32>; 4] = std::array::from_fn(|_| Vec::with_capacity(n));
        for &(r, c) in &coords {
            let (y, x) = (hs[r], ws[c]);
            let (y0, x0) = (y as usize, x as usize);
            let (y1, x1) = ((y0 + 1).min(side - 1), (x0 + 1).min(side - 1));
            let (dy, dx) = (y - y0 as f32, x - x0 as f32);
            let cells = [(y0, x0), (y0, x1), (y1, x0), (y1, x1)];
            let weights = [
                (1.0 - dy) * (1.0 - dx),
                (1.0 - dy) * dx,
                dy * (1.0 - dx),
                dy * dx,
            ];
            for k in 0..4 {
                idx[k].push((cells[k].0 * side + cells[k].1) as i64);
                wt[k].push(weights[k]);
            }
        }
        let table = self.pos_embed.val();
        let mut sum: Option<Tensor<2>> = None;
        for k in 0..4 {
            let rows = table.clone().select(
                0,
                Tensor::<1, Int>::from_data(TensorData::new(idx[k].clone(), [n]), device),
            );
            let w = Tensor::<2>::from_data(
                TensorData::new(wt[k].clone(), [n, 1]),
                (device, DType::F32),
            );
            let term = rows * w;
            sum = Some(match sum {
                None => term,
                Some(s) => s + term,
            });
        }
        sum.unwrap_or_else(|| Tensor::zeros([n, table.dims()[1]], device))
    }

    /// 2-D rotary tables `[1, patches, head_dim]`: the first half of each head's rotary pairs
    /// follow the row, the second half the column.
    fn rope(&self, grid: [usize; 3], head_dim: usize, device: &Device) -> RopeTables {
        let f = inv_freq(10000.0, head_dim / 2);
        let coords = self.coords(grid);
        let n = coords.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(n * head_dim),
            Vec::with_capacity(n * head_dim),
        );
        for &(r, c) in &coords {
            let row: Vec<f32> = f
                .iter()
                .map(|fi| r as f32 * fi)
                .chain(f.iter().map(|fi| c as f32 * fi))
                .collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        let t = |v: Vec<f32>| {
            Tensor::<3>::from_data(TensorData::new(v, [1, n, head_dim]), (device, DType::F32))
        };
        RopeTables {
            cos: t(cos),
            sin: t(sin),
        }
    }

    /// Encodes one image's patches `[t*h*w, C*T*P*P]` with grid `(t, h, w)` in patches.
    pub fn forward(&self, pixels: Tensor<2>, grid: [usize; 3]) -> VisionOut {
        let device = pixels.device();
        let x = self.patch_embed.forward(pixels);
        let d = x.dims()[1];
        let mut x = x + self.positions(grid, &device);
        let rope = self.rope(grid, d / self.heads, &device);
        let mut deepstack = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(x, &rope);
            if let Some(k) = self.deepstack_at.iter().position(|&j| j == i) {
                deepstack.push(self.deepstack[k].forward(x.clone()));
            }
        }
        VisionOut {
            embeds: self.merger.forward(x.clone()),
            last_hidden: x,
            deepstack,
        }
    }
}

/// The whole Qwen3-VL model.
#[derive(Module, Debug)]
pub struct Qwen3Vl {
    visual: Qwen3Vision,
    text: TextModel,
    image_token_id: i64,
    vision_start_token_id: i64,
    merge: usize,
    patch_dim: usize,
}

/// One image's processor output: patches in merge-window order and the grid.
#[derive(Clone, Debug)]
pub struct QwenImage {
    /// `[patches, C*T*P*P]`.
    pub pixels: Tensor<2>,
    /// `(t, h, w)` in patches.
    pub grid: [usize; 3],
}

/// A forward pass's outputs.
pub struct Qwen3VlOutput {
    /// Final normed hidden states `[b, s, d]`.
    pub last: Tensor<3>,
    /// `hidden_states.0 ..= L` when collected.
    pub hidden: Vec<Tensor<3>>,
    /// Per image: the tower's output before merging, merged tokens, DeepStack features.
    pub vision: Vec<VisionOut>,
    /// Image positions `[b, s]`.
    pub visual_mask: Tensor<2, Bool>,
    /// Multimodal RoPE positions per sample `[3][s]` (padding positions get 1).
    pub positions: Vec<[Vec<i64>; 3]>,
    /// Per sample: `max position + 1 - length`, the offset of generated tokens' positions.
    pub rope_deltas: Vec<i64>,
}

/// Qwen3-VL's multimodal RoPE index of one sequence (`evl_hf::prompt`'s, which checks each
/// image run against its grid): the three axes and `max + 1 - len`.
///
/// # Errors
/// Ids outside the vocabulary's range, image runs that do not match the grids.
pub fn rope_index(
    ids: &[i64],
    image_token: i64,
    vision_start: i64,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<([Vec<i64>; 3], i64)> {
    let to_u32 = |v: i64| {
        u32::try_from(v).map_err(|_| HfError::Input(format!("token id {v} is not a vocabulary id")))
    };
    let ids = ids
        .iter()
        .map(|&v| to_u32(v))
        .collect::<Result<Vec<u32>>>()?;
    let m = evl_hf::prompt::qwen3_vl_rope_index(
        &ids,
        None,
        to_u32(image_token)?,
        to_u32(vision_start)?,
        grids,
        merge,
    )
    .map_err(|e| HfError::Input(e.to_string()))?;
    let [t, h, w] = m.rows();
    Ok(([t.to_vec(), h.to_vec(), w.to_vec()], m.rope_delta))
}

impl Qwen3Vl {
    /// Loads the model from a checkpoint with the hub's naming (`model.visual.*`,
    /// `model.language_model.*`, `lm_head.weight` unless tied).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(l: &mut Loader, c: &Qwen3VlConfig) -> Result<Self> {
        let v = &c.vision;
        Ok(Qwen3Vl {
            visual: Qwen3Vision::load(l, "model.visual", v)?,
            text: TextModel::load(l, "model.language_model", "lm_head.weight", &c.text)?,
            image_token_id: c.image_token_id,
            vision_start_token_id: c.vision_start_token_id,
            merge: v.spatial_merge_size,
            patch_dim: v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size,
        })
    }

    /// The parameters under the names [`Qwen3Vl::load`] read.
    pub fn export(&self, e: &mut Exporter) {
        self.visual.export(e, "model.visual");
        self.text
            .export(e, "model.language_model", "lm_head.weight");
    }

    /// The language model.
    pub fn text(&self) -> &TextModel {
        &self.text
    }

    /// Values per patch (`C * T * P * P`).
    pub fn patch_dim(&self) -> usize {
        self.patch_dim
    }

    /// The image placeholder id.
    pub fn image_token_id(&self) -> i64 {
        self.image_token_id
    }

    /// `<|vision_start|>`.
    pub fn vision_start_token_id(&self) -> i64 {
        self.vision_start_token_id
    }

    /// Encodes one image.
    pub fn encode_image(&self, image: &QwenImage) -> VisionOut {
        self.visual.forward(image.pixels.clone(), image.grid)
    }

    /// A forward pass over a batch: `ids[i]` (unpadded; each image's placeholder run
    /// expanded) with `images[i]` (one per sample, or none for text-only). Sequences are
    /// right-padded to the longest; padded keys are masked.
    ///
    /// # Errors
    /// Placeholder runs that do not match the images.
    pub fn forward(
        &self,
        ids: &[Vec<i64>],
        images: &[Option<QwenImage>],
        cache: &mut KvCache,
        collect: bool,
    ) -> Result<Qwen3VlOutput> {
        let b = ids.len();
        let s = ids.iter().map(Vec::len).max().unwrap_or(0);
        let device = self.text.head().device();
        let vision: Vec<Option<VisionOut>> = images
            .iter()
            .map(|im| im.as_ref().map(|im| self.encode_image(im)))
            .collect();
        let mut flat = vec![0i64; b * s];
        let mut rows = vec![-1i64; b * s];
        let mut positions = Vec::with_capacity(b);
        let mut deltas = Vec::with_capacity(b);
        let mut offset = 0i64;
        for (i, seq) in ids.iter().enumerate() {
            let grids: Vec<[usize; 3]> = images
                .get(i)
                .and_then(|o| o.as_ref())
                .map(|im| vec![im.grid])
                .unwrap_or_default();
            let (axes, delta) = rope_index(
                seq,
                self.image_token_id,
                self.vision_start_token_id,
                &grids,
                self.merge,
            )?;
            let mut k = 0;
            for (j, &t) in seq.iter().enumerate() {
                if t == self.image_token_id {
                    rows[i * s + j] = offset + k;
                    k += 1;
                } else {
                    flat[i * s + j] = t;
                }
            }
            offset += k;
            let pad = |a: &Vec<i64>| {
                let mut v = a.clone();
                v.resize(s, 1);
                v
            };
            positions.push([pad(&axes[0]), pad(&axes[1]), pad(&axes[2])]);
            deltas.push(delta);
        }
        let mut x = self.text.embed(ids_tensor(&flat, b, s, &device));
        let d = x.dims()[2];
        let visual_host: Vec<bool> = rows.iter().map(|&r| r >= 0).collect();
        let visual_mask =
            Tensor::<2, Bool>::from_data(TensorData::new(visual_host.clone(), [b, s]), &device);
        let present: Vec<&VisionOut> = vision.iter().flatten().collect();
        let mut inject = None;
        if offset > 0 {
            // Gather rows of the concatenated visual features (plus one zero row for text
            // positions) into a dense [b, s, d] tensor.
            let zero_row = offset;
            let idx: Vec<i64> = rows
                .iter()
                .map(|&r| if r >= 0 { r } else { zero_row })
                .collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [b * s]), &device);
            let dense = |parts: Vec<Tensor<2>>| {
                let mut parts = parts;
                parts.push(Tensor::zeros([1, d], &device));
                Tensor::cat(parts, 0)
                    .select(0, idx.clone())
                    .reshape([b, s, d])
            };
            let m3 = visual_mask.clone().unsqueeze_dim::<3>(2).expand([b, s, d]);
            x = x.mask_where(
                m3,
                dense(present.iter().map(|v| v.embeds.clone()).collect()),
            );
            let layers = present.first().map_or(0, |v| v.deepstack.len());
            inject = Some(Injections {
                features: (0..layers)
                    .map(|k| dense(present.iter().map(|v| v.deepstack[k].clone()).collect()))
                    .collect(),
            });
        }
        let past = cache.len();
        let axes: Vec<Vec<i64>> = (0..3)
            .map(|a| positions.iter().flat_map(|p| p[a].clone()).collect())
            .collect();
        let rope = self.text.rope().tables(&axes, b, s, &device);
        let valid: Option<Vec<Vec<bool>>> = (b > 1 || ids.iter().any(|v| v.len() < s)).then(|| {
            ids.iter()
                .map(|v| (0..past + s).map(|j| j < past + v.len()).collect())
                .collect()
        });
        let mask = causal_mask(b, s, past, valid.as_deref(), &device);
        let out = self
            .text
            .forward(x, &rope, mask.as_ref(), cache, inject.as_ref(), collect);
        Ok(Qwen3VlOutput {
            last: out.last,
            hidden: out.all,
            vision: vision.into_iter().flatten().collect(),
            visual_mask,
            positions,
            rope_deltas: deltas,
        })
    }

    /// Greedy decoding of one sequence with the KV cache: at most `max_new` tokens, stopping
    /// at any of `eos` once `min_new` have been produced (before that, `eos` is suppressed as
    /// transformers' `min_new_tokens` does).
    ///
    /// # Errors
    /// Placeholder runs that do not match the image.
    pub fn generate(
        &self,
        ids: &[i64],
        image: Option<QwenImage>,
        max_new: usize,
        min_new: usize,
        eos: &[i64],
    ) -> Result<Vec<i64>> {
        let mut cache = KvCache::default();
        let out = self.forward(&[ids.to_vec()], &[image], &mut cache, false)?;
        let delta = out.rope_deltas[0];
        let s = ids.len();
        let device = out.last.device();
        let mut last = out.last.slice([0..1, s - 1..s]);
        let mut produced = Vec::new();
        let rope = self.text.rope();
        while produced.len() < max_new {
            let logits = self.text.logits(last);
            let next = super::greedy_pick(logits, if produced.len() < min_new { eos } else { &[] });
            produced.push(next);
            if eos.contains(&next) && produced.len() >= min_new {
                break;
            }
            if produced.len() == max_new {
                break;
            }
            let pos = (cache.len() as i64) + delta;
            let tables = rope.tables(&[vec![pos]], 1, 1, &device);
            let x = self.text.embed(ids_tensor(&[next], 1, 1, &device));
            last = self
                .text
                .forward(x, &tables, None, &mut cache, None, false)
                .last;
        }
        Ok(produced)
    }
}
