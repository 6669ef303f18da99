//! The paper's real model families in burn, loaded from their Hugging Face / LLaVA checkpoint
//! folders (read by the framework-free `evl-hf`):
//!
//! - [`qwen3_vl`]: Qwen3-VL, the student family (Qwen3-VL-2B-Instruct);
//! - [`llava_next`]: LLaVA-NeXT, the teacher family (PULSE-7B = llava-v1.6-vicuna-7b tuned on
//!   ECGInstruct), in the transformers and the original LLaVA naming;
//! - [`decoder`]: the LLaMA-family decoder both share (RMSNorm, GQA with a KV cache, rotary
//!   positions incl. multimodal sections, SwiGLU);
//! - [`io`]: checkpoint tensors <-> burn parameters by their checkpoint names.

pub mod decoder;
pub mod io;
pub mod llava_next;
pub mod qwen3_vl;

use burn::tensor::Tensor;

/// Errors of the real models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HfError {
    /// A configuration problem.
    #[error(transparent)]
    Config(#[from] evl_hf::config::Error),
    /// A weights problem.
    #[error(transparent)]
    Weights(#[from] evl_hf::weights::Error),
    /// Inputs that do not fit the model (placeholders vs images, shapes).
    #[error("{0}")]
    Input(String),
    /// A tokenizer or prompt problem.
    #[error(transparent)]
    Prompt(#[from] evl_hf::PromptError),
    /// An image that cannot be read or prepared.
    #[error(transparent)]
    Image(#[from] evl_hf::PreprocessError),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, HfError>;

/// The argmax of the last position's logits `[1, 1, vocab]`, with `banned` ids excluded.
pub fn greedy_pick(logits: Tensor<3>, banned: &[i64]) -> i64 {
    let v = logits.dims()[2];
    let values = crate::device::to_vec_f64(logits.reshape([v]));
    let mut best = (f64::NEG_INFINITY, 0usize);
    for (i, &x) in values.iter().enumerate() {
        if banned.contains(&(i as i64)) {
            continue;
        }
        // First maximum wins, as torch.argmax.
        if x > best.0 {
            best = (x, i);
        }
    }
    best.1 as i64
}

use crate::vlm::{DistillView, ModelFacts};
use burn::module::Module;
use burn::tensor::{Bool, Device, Int, TensorData};
use decoder::KvCache;
use evl_hf::HfConfig;
use evl_hf::weights::{Checkpoint, HostTensor};
use llava_next::{LlavaImage, LlavaNext};
use qwen3_vl::{Qwen3Vl, QwenImage};
use std::path::Path;

/// A loaded real model of either family.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one model per process: no collections of these to shrink
pub enum HfModel {
    /// Qwen3-VL.
    Qwen3Vl(Qwen3Vl),
    /// LLaVA-NeXT.
    LlavaNext(LlavaNext),
}

/// A batch of a real model: right-padded token ids with image placeholders, one image per
/// row, and the hidden-state layer `hidden` reads (see [`HfModel::view`]).
#[derive(Clone, Copy, Debug)]
pub struct HfBatch<'a> {
    /// Token ids per row.
    pub ids: &'a [Vec<i64>],
    /// The image of each row.
    pub images: &'a [Option<HfImage>],
    /// transformers' `hidden_states` index (None = after the final norm).
    pub layer: Option<usize>,
}

impl crate::vlm::Distillable for HfModel {
    type Batch<'a> = HfBatch<'a>;
    type Error = HfError;

    fn distill_view(&self, b: HfBatch<'_>) -> Result<DistillView> {
        Ok(self.view(b.ids, b.images, b.layer)?.0)
    }

    fn facts(&self) -> ModelFacts {
        HfModel::facts(self)
    }
}

/// One image prepared for its model family.
#[derive(Clone, Debug)]
pub enum HfImage {
    /// Qwen3-VL patches and grid.
    Qwen(QwenImage),
    /// LLaVA-NeXT base view and tiles.
    Llava(LlavaImage),
}

/// A forward pass of either family.
struct Forward {
    last: Tensor<3>,
    hidden: Vec<Tensor<3>>,
    /// Visual tokens as spliced into the LM, per image.
    visual: Vec<Tensor<2>>,
}

impl HfModel {
    /// Loads `dir` (config.json + weights) onto `device`; every tensor must be used.
    ///
    /// # Errors
    /// Bad configuration, missing/unexpected/mis-shaped tensors, unreadable files.
    pub fn load(dir: &Path, device: &Device) -> Result<(HfModel, HfConfig)> {
        let cfg = HfConfig::from_dir(dir)?;
        let mut ckpt = Checkpoint::open(dir)?;
        let model = Self::build(&cfg, &mut ckpt, device)?;
        ckpt.finish()?;
        Ok((model, cfg))
    }

    /// A randomly initialised model of the architecture `cfg` describes (norm weights 1,
    /// biases 0, other weights N(0, 0.02) from `seed`): for benchmarks and tests at sizes no
    /// checkpoint exists for. [`HfModel::export`] writes it as a checkpoint.
    ///
    /// # Errors
    /// A configuration the model cannot be built from.
    pub fn init(cfg: &HfConfig, seed: u64, device: &Device) -> Result<HfModel> {
        Self::build(cfg, &mut Checkpoint::synthetic(seed), device)
    }

    fn build(cfg: &HfConfig, ckpt: &mut Checkpoint, device: &Device) -> Result<HfModel> {
        let mut l = io::Loader::new(ckpt, device);
        Ok(match cfg {
            HfConfig::Qwen3Vl(c) => HfModel::Qwen3Vl(Qwen3Vl::load(&mut l, c)?),
            HfConfig::LlavaNext(c) => HfModel::LlavaNext(LlavaNext::load(&mut l, c)?),
        })
    }

    /// Every parameter under its checkpoint name and layout.
    pub fn export(&self) -> Vec<(String, HostTensor)> {
        let mut e = io::Exporter::default();
        match self {
            HfModel::Qwen3Vl(m) => m.export(&mut e),
            HfModel::LlavaNext(m) => m.export(&mut e),
        }
        e.tensors
    }

    /// The language model.
    pub fn text(&self) -> &decoder::TextModel {
        match self {
            HfModel::Qwen3Vl(m) => m.text(),
            HfModel::LlavaNext(m) => m.text(),
        }
    }

    /// The id marking image positions in `input_ids`.
    pub fn image_token(&self) -> i64 {
        match self {
            HfModel::Qwen3Vl(m) => m.image_token_id(),
            HfModel::LlavaNext(m) => m.image_token_index(),
        }
    }

    /// Size facts (visual tokens of a typical image are not fixed: reported as 0).
    pub fn facts(&self) -> ModelFacts {
        let head = self.text().head();
        let [d, vocab] = head.dims();
        ModelFacts {
            params: self.num_params(),
            visual_tokens: 0,
            d_vision: d,
            d_model: d,
            vocab,
            input: match self {
                HfModel::Qwen3Vl(_) => "qwen3-vl image".into(),
                HfModel::LlavaNext(_) => "llava-next anyres image".into(),
            },
        }
    }

    fn forward(
        &self,
        ids: &[Vec<i64>],
        images: &[Option<HfImage>],
        collect: bool,
    ) -> Result<Forward> {
        let mut cache = KvCache::default();
        match self {
            HfModel::Qwen3Vl(m) => {
                let imgs = images
                    .iter()
                    .map(|i| match i {
                        None => Ok(None),
                        Some(HfImage::Qwen(q)) => Ok(Some(q.clone())),
                        Some(HfImage::Llava(_)) => Err(HfError::Input(
                            "a LLaVA-NeXT image given to Qwen3-VL".into(),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let o = m.forward(ids, &imgs, &mut cache, collect)?;
                Ok(Forward {
                    last: o.last,
                    hidden: o.hidden,
                    visual: o.vision.into_iter().map(|v| v.embeds).collect(),
                })
            }
            HfModel::LlavaNext(m) => {
                let imgs = images
                    .iter()
                    .map(|i| match i {
                        None => Ok(None),
                        Some(HfImage::Llava(q)) => Ok(Some(q.clone())),
                        Some(HfImage::Qwen(_)) => Err(HfError::Input(
                            "a Qwen3-VL image given to LLaVA-NeXT".into(),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let o = m.forward(ids, &imgs, &mut cache, collect)?;
                Ok(Forward {
                    last: o.last,
                    hidden: o.hidden,
                    visual: o.image_embeds,
                })
            }
        }
    }

    /// Logits of every position `[b, s, vocab]` (right-padded batch).
    ///
    /// # Errors
    /// Placeholders that do not match the images.
    pub fn logits(&self, ids: &[Vec<i64>], images: &[Option<HfImage>]) -> Result<Tensor<3>> {
        let f = self.forward(ids, images, false)?;
        Ok(self.text().logits(f.last))
    }

    /// The distillation view of a right-padded batch (see [`crate::vlm::Distillable`]):
    /// `visual` = the visual tokens as spliced into the LM (Qwen3-VL's merger output,
    /// LLaVA-NeXT's projected, unpadded tiles with their newline tokens), padded to the
    /// batch's largest image with `visual_mask`; `hidden` and `logits` at the text positions
    /// (every non-image position, in order; logits at text position `i` predict text token
    /// `i`); `visual_hidden` the LM states at the image positions. `layer`: which hidden
    /// states `hidden` reads (`None` = after the final norm, `Some(k)` = transformers'
    /// `hidden_states[k]`).
    ///
    /// Also returns the token ids at the text positions `[b, t]` (padded with 0).
    ///
    /// # Errors
    /// Placeholders that do not match the images, a layer beyond the model's.
    pub fn view(
        &self,
        ids: &[Vec<i64>],
        images: &[Option<HfImage>],
        layer: Option<usize>,
    ) -> Result<(DistillView, Tensor<2, Int>)> {
        let f = self.forward(ids, images, layer.is_some())?;
        let hid = match layer {
            None => f.last.clone(),
            Some(k) => f.hidden.get(k).cloned().ok_or_else(|| {
                HfError::Input(format!(
                    "hidden layer {k} requested; the model has {} entries",
                    f.hidden.len()
                ))
            })?,
        };
        let [b, s, d] = f.last.dims();
        let device = f.last.device();
        let image = self.image_token();
        let text_pos: Vec<Vec<usize>> = ids
            .iter()
            .map(|r| (0..r.len()).filter(|&j| r[j] != image).collect())
            .collect();
        let vis_pos: Vec<Vec<usize>> = ids
            .iter()
            .map(|r| (0..r.len()).filter(|&j| r[j] == image).collect())
            .collect();
        let t = text_pos.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let v = vis_pos.iter().map(Vec::len).max().unwrap_or(0);
        let gather = |x: Tensor<3>, rows: &[Vec<usize>], n: usize, shift: bool| -> Tensor<3> {
            let mut idx = Vec::with_capacity(b * n);
            for (r, pos) in rows.iter().enumerate() {
                for q in 0..n {
                    let j = pos.get(q).copied().unwrap_or(0);
                    let j = if shift { j.saturating_sub(1) } else { j };
                    idx.push((r * s + j) as i64);
                }
            }
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [b * n]), &device);
            x.reshape([b * s, d]).select(0, idx).reshape([b, n, d])
        };
        let hidden = gather(hid, &text_pos, t, false);
        let logits = self
            .text()
            .logits(gather(f.last.clone(), &text_pos, t, true));
        let mut text_ids = Vec::with_capacity(b * t);
        let mut text_mask = Vec::with_capacity(b * t);
        for (r, pos) in text_pos.iter().enumerate() {
            for q in 0..t {
                text_ids.push(pos.get(q).map_or(0, |&j| ids[r][j]));
                text_mask.push(q < pos.len());
            }
        }
        let text_ids = Tensor::<2, Int>::from_data(TensorData::new(text_ids, [b, t]), &device);
        let text_mask = Tensor::<2, Bool>::from_data(TensorData::new(text_mask, [b, t]), &device);
        let v1 = v.max(1);
        let visual_hidden = gather(f.last, &vis_pos, v1, false);
        let dv = f.visual.first().map_or(d, |x| x.dims()[1]);
        let mut per_row = Vec::with_capacity(b);
        let mut valid = Vec::with_capacity(b * v1);
        let mut k = 0;
        for pos in &vis_pos {
            let n = pos.len();
            let mut parts = Vec::new();
            if n > 0 {
                parts.push(f.visual[k].clone());
                k += 1;
            }
            if n < v1 {
                parts.push(Tensor::zeros([v1 - n, dv], &device));
            }
            per_row.push(Tensor::cat(parts, 0).unsqueeze_dim::<3>(0));
            valid.extend((0..v1).map(|q| q < n));
        }
        let varying = vis_pos.iter().any(|p| p.len() != v);
        let visual_mask =
            varying.then(|| Tensor::<2, Bool>::from_data(TensorData::new(valid, [b, v1]), &device));
        Ok((
            DistillView {
                visual: Tensor::cat(per_row, 0),
                hidden,
                text_mask,
                logits,
                visual_hidden,
                head: self.text().head(),
                visual_mask,
            },
            text_ids,
        ))
    }

    /// Greedy decoding of one sequence (see [`qwen3_vl::Qwen3Vl::generate`]).
    ///
    /// # Errors
    /// Placeholders that do not match the image, an image of the other family.
    pub fn generate(
        &self,
        ids: &[i64],
        image: Option<HfImage>,
        max_new: usize,
        eos: &[i64],
    ) -> Result<Vec<i64>> {
        match (self, image) {
            (HfModel::Qwen3Vl(m), Some(HfImage::Qwen(i))) => {
                m.generate(ids, Some(i), max_new, 0, eos)
            }
            (HfModel::Qwen3Vl(m), None) => m.generate(ids, None, max_new, 0, eos),
            (HfModel::LlavaNext(m), Some(HfImage::Llava(i))) => {
                m.generate(ids, Some(i), max_new, 0, eos)
            }
            (HfModel::LlavaNext(m), None) => m.generate(ids, None, max_new, 0, eos),
            _ => Err(HfError::Input(
                "an image prepared for the other model family".into(),
            )),
        }
    }
}
