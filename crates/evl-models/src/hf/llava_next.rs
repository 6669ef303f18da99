//! LLaVA-NeXT (the paper's teacher family: PULSE-7B is llava-v1.6-vicuna-7b tuned on
//! ECGInstruct) in burn, loaded from either naming of its checkpoint.
//!
//! CLIP vision tower (patch convolution without bias, a class token, learned positions,
//! pre-LayerNorm, quick-GELU MLPs) run on the base view and each anyres tile; the features of
//! the configured layer (the second-to-last for LLaVA-1.6) without the class token go through
//! the `mlp2x_gelu` projector; the tiles' feature maps are stitched into one grid, the padding
//! the preprocessor added is cut away (`unpad`), an `image_newline` column is appended to
//! every row, and the base view's tokens come first. The decoder is the LLaMA-2 of
//! [`super::decoder`].

use super::decoder::{KvCache, TextModel, attention, causal_mask, ids_tensor};
use super::io::{Exporter, Loader};
use super::{HfError, Result};
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Bool, Int, Tensor, TensorData, activation};
use evl_hf::config::{ClipVisionConfig, LlavaNextConfig, Naming};
use evl_hf::preprocess::{anyres_grid_shape, unpad_region};

#[derive(Module, Debug)]
struct ClipLayer {
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * activation::sigmoid(x * 1.702)
}

impl ClipLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let hd = d / self.heads;
        let h = self.layer_norm1.forward(x.clone());
        let split = |t: Tensor<3>| t.reshape([b, n, self.heads, hd]).swap_dims(1, 2);
        let a = attention(
            split(self.q_proj.forward(h.clone())),
            split(self.k_proj.forward(h.clone())),
            split(self.v_proj.forward(h)),
            None,
        )
        .swap_dims(1, 2)
        .reshape([b, n, d]);
        let x = x + self.out_proj.forward(a);
        let h = self.fc2.forward(quick_gelu(
            self.fc1.forward(self.layer_norm2.forward(x.clone())),
        ));
        x + h
    }
}

/// The CLIP vision transformer.
#[derive(Module, Debug)]
pub struct ClipVision {
    patch_embedding: Linear,
    class_embedding: Param<Tensor<1>>,
    position_embedding: Param<Tensor<2>>,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    /// Loaded so that the checkpoint round-trips; LLaVA never reads the pooled output.
    post_layernorm: LayerNorm,
    patch: usize,
    channels: usize,
}

impl ClipVision {
    fn load(l: &mut Loader, p: &str, v: &ClipVisionConfig) -> Result<Self> {
        let d = v.hidden_size;
        let eps = v.layer_norm_eps;
        let n_pos = v.grid() * v.grid() + 1;
        let layers = (0..v.num_layers)
            .map(|i| {
                let q = format!("{p}.encoder.layers.{i}");
                Ok(ClipLayer {
                    layer_norm1: l.layer_norm(&format!("{q}.layer_norm1"), d, eps)?,
                    layer_norm2: l.layer_norm(&format!("{q}.layer_norm2"), d, eps)?,
                    q_proj: l.linear(&format!("{q}.self_attn.q_proj"), d, d, true)?,
                    k_proj: l.linear(&format!("{q}.self_attn.k_proj"), d, d, true)?,
                    v_proj: l.linear(&format!("{q}.self_attn.v_proj"), d, d, true)?,
                    out_proj: l.linear(&format!("{q}.self_attn.out_proj"), d, d, true)?,
                    fc1: l.linear(&format!("{q}.mlp.fc1"), d, v.intermediate_size, true)?,
                    fc2: l.linear(&format!("{q}.mlp.fc2"), v.intermediate_size, d, true)?,
                    heads: v.num_heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVision {
            patch_embedding: l.linear_from(
                &format!("{p}.embeddings.patch_embedding"),
                &[d, v.num_channels, v.patch_size, v.patch_size],
                false,
            )?,
            class_embedding: l.param(&format!("{p}.embeddings.class_embedding"), [d])?,
            position_embedding: l.param(
                &format!("{p}.embeddings.position_embedding.weight"),
                [n_pos, d],
            )?,
            pre_layrnorm: l.layer_norm(&format!("{p}.pre_layrnorm"), d, eps)?,
            layers,
            post_layernorm: l.layer_norm(&format!("{p}.post_layernorm"), d, eps)?,
            patch: v.patch_size,
            channels: v.num_channels,
        })
    }

    fn export(&self, e: &mut Exporter, p: &str) {
        let d = self.class_embedding.dims()[0];
        e.linear_as(
            &format!("{p}.embeddings.patch_embedding"),
            &self.patch_embedding,
            &[d, self.channels, self.patch, self.patch],
        );
        e.tensor(
            &format!("{p}.embeddings.class_embedding"),
            self.class_embedding.val(),
        );
        e.tensor(
            &format!("{p}.embeddings.position_embedding.weight"),
            self.position_embedding.val(),
        );
        e.layer_norm(&format!("{p}.pre_layrnorm"), &self.pre_layrnorm);
        for (i, c) in self.layers.iter().enumerate() {
            let q = format!("{p}.encoder.layers.{i}");
            e.layer_norm(&format!("{q}.layer_norm1"), &c.layer_norm1);
            e.layer_norm(&format!("{q}.layer_norm2"), &c.layer_norm2);
            e.linear(&format!("{q}.self_attn.q_proj"), &c.q_proj);
            e.linear(&format!("{q}.self_attn.k_proj"), &c.k_proj);
            e.linear(&format!("{q}.self_attn.v_proj"), &c.v_proj);
            e.linear(&format!("{q}.self_attn.out_proj"), &c.out_proj);
            e.linear(&format!("{q}.mlp.fc1"), &c.fc1);
            e.linear(&format!("{q}.mlp.fc2"), &c.fc2);
        }
        e.layer_norm(&format!("{p}.post_layernorm"), &self.post_layernorm);
    }

    /// Hidden states after `layers` encoder layers (`0` = the embeddings after the
    /// pre-LayerNorm, transformers' `hidden_states[0]`) for tiles `[n, C, H, W]`:
    /// `[n, 1 + patches, d]`.
    pub fn features(&self, tiles: Tensor<4>, layers: usize) -> Tensor<3> {
        let [n, c, h, w] = tiles.dims();
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        // Cut into patches in row-major order, each flattened as (C, P, P) like the conv kernel.
        let patches = tiles
            .reshape([n, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([n * gh * gw, c * p * p]);
        let d = self.class_embedding.dims()[0];
        let x = self
            .patch_embedding
            .forward(patches)
            .reshape([n, gh * gw, d]);
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .expand([n, 1, d]);
        let x = Tensor::cat(vec![cls, x], 1) + self.position_embedding.val().unsqueeze_dim(0);
        let mut x = self.pre_layrnorm.forward(x);
        for layer in self.layers.iter().take(layers) {
            x = layer.forward(x);
        }
        x
    }

    /// Encoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// The whole LLaVA-NeXT model.
#[derive(Module, Debug)]
pub struct LlavaNext {
    vision: ClipVision,
    linear_1: Linear,
    linear_2: Linear,
    image_newline: Param<Tensor<1>>,
    text: TextModel,
    /// Vision layers to run for the features (Python's index resolved).
    feature_layers: usize,
    drop_cls: bool,
    image_token_index: i64,
    tile: usize,
    /// Anyres pinpoints as `[h0, w0, h1, w1, ...]`.
    pinpoints: Vec<usize>,
    naming_original: bool,
    /// The CLIP tower's tensors lack the `vision_model.` level (how some `save_pretrained`
    /// versions write it); kept so export writes the names it read.
    vision_flat: bool,
}

/// One image's processor output.
#[derive(Clone, Debug)]
pub struct LlavaImage {
    /// Base view then anyres tiles `[tiles, C, side, side]`.
    pub tiles: Tensor<4>,
    /// The original image size `(height, width)`.
    pub size: (usize, usize),
}

/// A forward pass's outputs.
pub struct LlavaOutput {
    /// Final normed hidden states `[b, s, d]`.
    pub last: Tensor<3>,
    /// `hidden_states.0 ..= L` when collected.
    pub hidden: Vec<Tensor<3>>,
    /// Per image: the visual tokens as spliced into the sequence `[tokens, d]`.
    pub image_embeds: Vec<Tensor<2>>,
    /// Per image: the selected vision-tower features of all tiles, class token dropped
    /// `[tiles * patches, d_vision]` (what distillation aligns before the projector).
    pub vision_features: Vec<Tensor<2>>,
    /// Image positions `[b, s]`.
    pub visual_mask: Tensor<2, Bool>,
}

struct Names {
    vision: &'static str,
    proj1: &'static str,
    proj2: &'static str,
    newline: &'static str,
    model: &'static str,
    head: &'static str,
}

fn names(n: Naming) -> Names {
    match n {
        Naming::Transformers => Names {
            vision: "vision_tower.vision_model",
            proj1: "multi_modal_projector.linear_1",
            proj2: "multi_modal_projector.linear_2",
            newline: "image_newline",
            model: "language_model.model",
            head: "language_model.lm_head.weight",
        },
        Naming::OriginalLlava => Names {
            vision: "model.vision_tower.vision_tower.vision_model",
            proj1: "model.mm_projector.0",
            proj2: "model.mm_projector.2",
            newline: "model.image_newline",
            model: "model",
            head: "lm_head.weight",
        },
    }
}

impl LlavaNext {
    /// Loads the model in the naming `c.naming` says.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(l: &mut Loader, c: &LlavaNextConfig) -> Result<Self> {
        let n = names(c.naming);
        let dv = c.vision.hidden_size;
        let d = c.text.hidden_size;
        let layers = c.vision.num_layers as i64;
        // hidden_states has layers + 1 entries; Python indexing.
        let feature_layers = if c.vision_feature_layer < 0 {
            layers + 1 + c.vision_feature_layer
        } else {
            c.vision_feature_layer
        } as usize;
        let mut pinpoints = Vec::new();
        for &(h, w) in &c.image_grid_pinpoints {
            pinpoints.extend([h, w]);
        }
        let flat = n.vision.trim_end_matches(".vision_model");
        let vision_flat = !l.has(&format!("{}.embeddings.class_embedding", n.vision))
            && l.has(&format!("{flat}.embeddings.class_embedding"));
        let vision_prefix = if vision_flat { flat } else { n.vision };
        Ok(LlavaNext {
            vision: ClipVision::load(l, vision_prefix, &c.vision)?,
            linear_1: l.linear(n.proj1, dv, d, c.projector_bias)?,
            linear_2: l.linear(n.proj2, d, d, c.projector_bias)?,
            image_newline: l.param(n.newline, [d])?,
            text: TextModel::load(l, n.model, n.head, &c.text)?,
            feature_layers,
            drop_cls: c.drop_cls,
            image_token_index: c.image_token_index,
            tile: c.vision.image_size,
            pinpoints,
            naming_original: c.naming == Naming::OriginalLlava,
            vision_flat,
        })
    }

    /// The parameters under the names [`LlavaNext::load`] read.
    pub fn export(&self, e: &mut Exporter) {
        let n = names(if self.naming_original {
            Naming::OriginalLlava
        } else {
            Naming::Transformers
        });
        let flat = n.vision.trim_end_matches(".vision_model");
        self.vision
            .export(e, if self.vision_flat { flat } else { n.vision });
        e.linear(n.proj1, &self.linear_1);
        e.linear(n.proj2, &self.linear_2);
        e.tensor(n.newline, self.image_newline.val());
        self.text.export(e, n.model, n.head);
    }

    /// The language model.
    pub fn text(&self) -> &TextModel {
        &self.text
    }

    /// The token id marking image positions.
    pub fn image_token_index(&self) -> i64 {
        self.image_token_index
    }

    fn pinpoints(&self) -> Vec<(usize, usize)> {
        self.pinpoints.chunks(2).map(|p| (p[0], p[1])).collect()
    }

    /// Number of visual tokens for an image of `(height, width)`.
    pub fn image_tokens(&self, size: (usize, usize)) -> Option<usize> {
        let g = self.tile / self.vision.patch;
        let (rows, cols) = anyres_grid_shape(size, &self.pinpoints(), self.tile)?;
        let u = unpad_region(size, (rows * g, cols * g));
        Some(g * g + u.rows * (u.cols + 1))
    }

    /// Encodes one image: `(visual tokens [n, d], tower features [tiles * patches, d_vision])`.
    ///
    /// # Errors
    /// A tile count that does not fit the anyres grid of the image's size.
    pub fn encode_image(&self, image: &LlavaImage) -> Result<(Tensor<2>, Tensor<2>)> {
        let [tiles, _, _, _] = image.tiles.dims();
        let feats = self
            .vision
            .features(image.tiles.clone(), self.feature_layers);
        let [_, n1, dv] = feats.dims();
        let feats = if self.drop_cls {
            feats.slice([0..tiles, 1..n1, 0..dv])
        } else {
            feats
        };
        let per = feats.dims()[1];
        let flat_feats = feats.clone().reshape([tiles * per, dv]);
        let x = self
            .linear_2
            .forward(activation::gelu(self.linear_1.forward(feats)));
        let d = x.dims()[2];
        if tiles == 1 {
            let base = x.reshape([per, d]);
            let nl = self.image_newline.val().reshape([1, d]);
            return Ok((Tensor::cat(vec![base, nl], 0), flat_feats));
        }
        let g = (per as f64).sqrt() as usize;
        if g * g != per {
            return Err(HfError::Input(format!(
                "{per} features per tile is not a square grid (a class token kept?)"
            )));
        }
        let (rows, cols) =
            anyres_grid_shape(image.size, &self.pinpoints(), self.tile).ok_or_else(|| {
                HfError::Input(format!("no anyres grid for an image of {:?}", image.size))
            })?;
        if rows * cols + 1 != tiles {
            return Err(HfError::Input(format!(
                "{tiles} tiles given, but an image of {:?} is cut into {rows} x {cols} tiles plus the base view",
                image.size
            )));
        }
        let base = x.clone().slice([0..1, 0..per, 0..d]).reshape([per, d]);
        // [rows, cols, g, g, d] -> [rows, g, cols, g, d] -> grid [rows*g, cols*g, d].
        let grid = x
            .slice([1..tiles, 0..per, 0..d])
            .reshape([rows, cols, g, g, d])
            .permute([0, 2, 1, 3, 4])
            .reshape([rows * g, cols * g, d]);
        let u = unpad_region(image.size, (rows * g, cols * g));
        let grid = grid.slice([
            u.row_offset..u.row_offset + u.rows,
            u.col_offset..u.col_offset + u.cols,
            0..d,
        ]);
        let nl = self
            .image_newline
            .val()
            .reshape([1, 1, d])
            .expand([u.rows, 1, d]);
        let grid = Tensor::cat(vec![grid, nl], 1).reshape([u.rows * (u.cols + 1), d]);
        Ok((Tensor::cat(vec![base, grid], 0), flat_feats))
    }

    /// A forward pass over a batch: `ids[i]` (unpadded, with one `image_token_index` per
    /// visual token) and `images[i]`. Right-padded; padded keys masked.
    ///
    /// # Errors
    /// Placeholder counts that do not match the images' token counts.
    pub fn forward(
        &self,
        ids: &[Vec<i64>],
        images: &[Option<LlavaImage>],
        cache: &mut KvCache,
        collect: bool,
    ) -> Result<LlavaOutput> {
        let b = ids.len();
        let s = ids.iter().map(Vec::len).max().unwrap_or(0);
        let device = self.text.head().device();
        let mut embeds = Vec::new();
        let mut vision_features = Vec::new();
        let mut flat = vec![0i64; b * s];
        let mut rows = vec![-1i64; b * s];
        let mut offset = 0i64;
        for (i, seq) in ids.iter().enumerate() {
            let n_img = seq.iter().filter(|&&t| t == self.image_token_index).count();
            let have = match images.get(i).and_then(|o| o.as_ref()) {
                Some(im) => {
                    let (e, f) = self.encode_image(im)?;
                    let n = e.dims()[0];
                    embeds.push(e);
                    vision_features.push(f);
                    n
                }
                None => 0,
            };
            if n_img != have {
                return Err(HfError::Input(format!(
                    "sequence {i} has {n_img} image placeholders but its image gives {have} visual tokens"
                )));
            }
            let mut k = 0;
            for (j, &t) in seq.iter().enumerate() {
                if t == self.image_token_index {
                    rows[i * s + j] = offset + k;
                    k += 1;
                } else {
                    flat[i * s + j] = t;
                }
            }
            offset += k;
        }
        let mut x = self.text.embed(ids_tensor(&flat, b, s, &device));
        let d = x.dims()[2];
        let visual: Vec<bool> = rows.iter().map(|&r| r >= 0).collect();
        let visual_mask = Tensor::<2, Bool>::from_data(TensorData::new(visual, [b, s]), &device);
        if offset > 0 {
            let idx: Vec<i64> = rows
                .iter()
                .map(|&r| if r >= 0 { r } else { offset })
                .collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [b * s]), &device);
            let mut parts = embeds.clone();
            parts.push(Tensor::zeros([1, d], &device));
            let dense = Tensor::cat(parts, 0).select(0, idx).reshape([b, s, d]);
            let m3 = visual_mask.clone().unsqueeze_dim::<3>(2).expand([b, s, d]);
            x = x.mask_where(m3, dense);
        }
        let past = cache.len();
        let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
        let axis: Vec<i64> = lens
            .iter()
            .flat_map(|&n| (0..s).map(move |j| (past + j.min(n.max(1) - 1)) as i64))
            .collect();
        let rope = self.text.rope().tables(&[axis], b, s, &device);
        let valid: Option<Vec<Vec<bool>>> = (lens.iter().any(|&n| n < s)).then(|| {
            lens.iter()
                .map(|&n| (0..past + s).map(|j| j < past + n).collect())
                .collect()
        });
        let mask = causal_mask(b, s, past, valid.as_deref(), &device);
        let out = self
            .text
            .forward(x, &rope, mask.as_ref(), cache, None, collect);
        Ok(LlavaOutput {
            last: out.last,
            hidden: out.all,
            image_embeds: embeds,
            vision_features,
            visual_mask,
        })
    }

    /// Greedy decoding of one sequence with the KV cache (see
    /// [`super::qwen3_vl::Qwen3Vl::generate`] for `min_new` and `eos`).
    ///
    /// # Errors
    /// Placeholder counts that do not match the image.
    pub fn generate(
        &self,
        ids: &[i64],
        image: Option<LlavaImage>,
        max_new: usize,
        min_new: usize,
        eos: &[i64],
    ) -> Result<Vec<i64>> {
        let mut cache = KvCache::default();
        let out = self.forward(&[ids.to_vec()], &[image], &mut cache, false)?;
        let s = ids.len();
        let device = out.last.device();
        let mut last = out.last.slice([0..1, s - 1..s]);
        let rope = self.text.rope();
        let mut produced = Vec::new();
        while produced.len() < max_new {
            let next = super::greedy_pick(
                self.text.logits(last),
                if produced.len() < min_new { eos } else { &[] },
            );
            produced.push(next);
            if (eos.contains(&next) && produced.len() >= min_new) || produced.len() == max_new {
                break;
            }
            let tables = rope.tables(&[vec![cache.len() as i64]], 1, 1, &device);
            let x = self.text.embed(ids_tensor(&[next], 1, 1, &device));
            last = self
                .text
                .forward(x, &tables, None, &mut cache, None, false)
                .last;
        }
        Ok(produced)
    }
}
