//! An ECG vision-language model family: a patch encoder over the rendered ECG paper image (or,
//! for the edge student, over the raw 12-lead signal) -> a projector -> a decoder-only
//! transformer language model over `[visual tokens; prompt tokens; answer tokens]`, trained with
//! next-token cross-entropy on the answer tokens, with greedy generation.
//!
//! The shapes follow LLaVA (CLIP ViT patch tokens -> MLP projector -> causal LM over image
//! tokens prepended to the text) and Qwen3-VL (ViT with merged patches -> LM); the
//! [`Distillable`] view exposes what distillation needs from either: visual tokens, hidden
//! states of a chosen layer, logits, masks.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::conv::{Conv1d, Conv1dConfig, Conv2d, Conv2dConfig};
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{
    Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig, PaddingConfig1d, PaddingConfig2d,
};
use burn::tensor::{Bool, Device, Distribution, Int, Tensor, activation};

/// What the encoder reads.
#[derive(Config, Debug, PartialEq)]
pub enum InputKind {
    /// A grayscale image `[batch, 1, height, width]` cut into `patch x patch` squares.
    Image {
        /// Image height, pixels.
        height: usize,
        /// Image width, pixels.
        width: usize,
        /// Patch side, pixels.
        patch: usize,
    },
    /// A multi-lead signal `[batch, leads, samples]` cut into windows of `patch` samples.
    Signal {
        /// Leads.
        leads: usize,
        /// Samples per lead.
        samples: usize,
        /// Samples per token.
        patch: usize,
    },
}

impl InputKind {
    /// Number of visual tokens.
    pub fn n_tokens(&self) -> usize {
        match self {
            InputKind::Image {
                height,
                width,
                patch,
            } => (height / patch) * (width / patch),
            InputKind::Signal { samples, patch, .. } => samples / patch,
        }
    }

    /// Values per token before the patch embedding.
    pub fn patch_dim(&self) -> usize {
        match self {
            InputKind::Image { patch, .. } => patch * patch,
            InputKind::Signal { leads, patch, .. } => leads * patch,
        }
    }
}

/// Configuration of an [`EcgVlm`].
#[derive(Config, Debug)]
pub struct EcgVlmConfig {
    /// Encoder input.
    pub input: InputKind,
    /// Width of the visual encoder (`D_vis`).
    pub d_vision: usize,
    /// Visual encoder layers.
    pub vision_layers: usize,
    /// Visual encoder heads.
    pub vision_heads: usize,
    /// Width of the language model (`D`).
    pub d_model: usize,
    /// Language model layers.
    pub layers: usize,
    /// Language model heads.
    pub heads: usize,
    /// Vocabulary size of the model's tokenizer.
    pub vocab: usize,
    /// Longest text (prompt + answer) in tokens.
    pub max_text: usize,
    /// Feed-forward width as a multiple of the model width.
    #[config(default = 4)]
    pub ff_mult: usize,
    /// Channels of a convolutional stem before the input is cut into tokens; 0 = plain linear
    /// patch embedding. Signal: two same-length kernel-7 convolutions with GELU, as ECG CNNs
    /// start. Image: a strided stem (see [`ImageStem`]) whose last layer has this many
    /// channels, one position per `patch x patch` square (the patch must be a multiple of 8).
    #[config(default = 0)]
    pub stem_channels: usize,
}

/// Two same-length 1-D convolutions over the leads (local waveform features such as QRS
/// slopes and ST shape) before tokenisation.
#[derive(Module, Debug)]
pub struct ConvStem {
    conv1: Conv1d,
    conv2: Conv1d,
}

impl ConvStem {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = activation::gelu(self.conv1.forward(x));
        activation::gelu(self.conv2.forward(x))
    }
}

/// Groups of the image stem's group norms.
pub const STEM_GROUPS: usize = 8;

/// The convolutional stem of the image encoder (the "early convolutions" of hybrid ViTs):
/// three stride-2 convolutions, each with a group norm and GELU (16, 32 and 64 channels;
/// kernel 4 then 3; group norm rather than batch norm so that training, a frozen encoder
/// and inference compute the same function) bring
/// thin ECG traces, a pixel or two wide, into features at 1/8 of the resolution, and a last
/// convolution with kernel and stride `patch / 8` gives one token per `patch x patch`
/// square. A linear embedding of raw 40-pixel patches sees a trace as a few scattered
/// pixels: measured, the same teacher stayed at chance (macro AUC 0.50) after 400 steps;
/// a small CNN of this shape in PyTorch reached 0.98 on the same 240x320 pages.
#[derive(Module, Debug)]
pub struct ImageStem {
    pub(crate) convs: Vec<Conv2d>,
    pub(crate) norms: Vec<GroupNorm>,
}

impl ImageStem {
    fn new(patch: usize, channels: usize, device: &Device) -> ImageStem {
        assert!(
            patch.is_multiple_of(8) && patch >= 8,
            "an image stem needs a patch that is a multiple of 8 pixels, got {patch}"
        );
        let conv = |i: usize, o: usize, k: usize, st: usize, pad: usize| {
            Conv2dConfig::new([i, o], [k, k])
                .with_stride([st, st])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .init(device)
        };
        let last = patch / 8;
        ImageStem {
            convs: vec![
                conv(1, 16, 4, 2, 1),
                conv(16, 32, 3, 2, 1),
                conv(32, 64, 3, 2, 1),
                conv(64, channels, last, last, 0),
            ],
            norms: [16, 32, 64]
                .map(|c| GroupNormConfig::new(STEM_GROUPS, c).init(device))
                .to_vec(),
        }
    }

    /// `[b, 1, h, w]` -> `[b, channels, h / patch, w / patch]`.
    fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for (c, n) in self.convs.iter().zip(&self.norms) {
            x = activation::gelu(n.forward(c.forward(x)));
        }
        self.convs[self.convs.len() - 1].forward(x)
    }
}

/// The model.
#[derive(Module, Debug)]
pub struct EcgVlm {
    pub(crate) stem: Option<ConvStem>,
    pub(crate) image_stem: Option<ImageStem>,
    pub(crate) patch_embed: Linear,
    pub(crate) vis_pos: Param<Tensor<2>>,
    pub(crate) vision: TransformerEncoder,
    pub(crate) vis_norm: LayerNorm,
    pub(crate) projector: Linear,
    pub(crate) tok_emb: Embedding,
    pub(crate) pos: Param<Tensor<2>>,
    pub(crate) decoder: TransformerEncoder,
    pub(crate) norm: LayerNorm,
    pub(crate) lm_head: Linear,
    // The input kind as plain constants (module fields must be modules or primitives):
    // image (height, width, patch) or signal (leads, samples, patch).
    is_signal: bool,
    in_a: usize,
    in_b: usize,
    in_patch: usize,
    n_visual: usize,
}

/// The distillation view of one forward pass.
#[derive(Debug, Clone)]
pub struct DistillView {
    /// Visual tokens after the visual encoder `[batch, v, d_vision]`.
    pub visual: Tensor<3>,
    /// Language-model hidden states at the text positions `[batch, t, d_model]`.
    pub hidden: Tensor<3>,
    /// Valid (non-padding) text positions `[batch, t]`.
    pub text_mask: Tensor<2, Bool>,
    /// Next-token logits at the text positions `[batch, t, vocab]`: position `i` predicts
    /// text token `i`.
    pub logits: Tensor<3>,
    /// Language-model hidden states at the visual positions `[batch, v, d_model]` (EM-KD's
    /// vision tokens inside the LM).
    pub visual_hidden: Tensor<3>,
    /// The output head `[d_model, vocab]` (DSKD reads hidden states out in the other model's
    /// vocabulary; bias not included).
    pub head: Tensor<2>,
    /// Valid visual tokens `[batch, v]` when their number varies per example (Qwen3-VL's
    /// dynamic resolution pads each image's merged tokens to the batch maximum); `None` when
    /// every example has all `v` (fixed-size encoders such as ours and LLaVA's CLIP).
    pub visual_mask: Option<Tensor<2, Bool>>,
}

/// Facts about a model that reports need (heterogeneity of teacher and student).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelFacts {
    /// Trainable parameters.
    pub params: usize,
    /// Visual tokens per example.
    pub visual_tokens: usize,
    /// Visual encoder width.
    pub d_vision: usize,
    /// Language model width.
    pub d_model: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Encoder input kind.
    pub input: String,
}

/// A model that can be distilled from or into: the built-in family ([`EcgVlm`], a batch of
/// fixed-size pixels and padded text) and the paper's real families
/// ([`crate::hf::HfModel`]: Qwen3-VL and LLaVA-NeXT, a batch of token ids with image
/// placeholders and per-image pixels). What they return:
/// - built-in: `visual` = the encoder's tokens, the LM sequence is `[visual; text]`;
/// - LLaVA-NeXT: `visual` = the projected, unpadded anyres tiles with their newline tokens as
///   spliced into the LM at the `<image>` placeholder, so `hidden`/`logits` are the LM states
///   at the non-image positions and `visual_hidden` those at the image positions; the count
///   depends on the image's size: padded to the batch maximum with `visual_mask`;
/// - Qwen3-VL: `visual` = the patch merger's output (2x2 merged patches projected to the LM
///   width), a count per image from its `grid_thw`, padded likewise; the merged tokens replace
///   `<|image_pad|>` runs inside the text (M-RoPE positions and DeepStack injections stay
///   inside the model), so again `hidden`/`logits` are gathered at text positions.
///
/// The losses only ever see these tensors and masks, never the layout of the sequence.
pub trait Distillable {
    /// What one forward pass reads.
    type Batch<'a>
    where
        Self: 'a;
    /// Why a batch cannot be read (an impossible case for the built-in family).
    type Error: std::error::Error;
    /// One forward pass with everything distillation needs.
    ///
    /// # Errors
    /// A batch the model cannot take (image placeholders that do not match the images).
    fn distill_view(&self, batch: Self::Batch<'_>) -> Result<DistillView, Self::Error>;
    /// Size facts.
    fn facts(&self) -> ModelFacts;
}

impl EcgVlmConfig {
    /// What would stop [`EcgVlmConfig::init`] from building this model, in words (`None`
    /// when it builds): an image stem needs a patch that is a multiple of 8 pixels.
    pub fn problem(&self) -> Option<String> {
        match self.input {
            InputKind::Image { patch, .. }
                if self.stem_channels > 0 && (patch < 8 || !patch.is_multiple_of(8)) =>
            {
                Some(format!(
                    "stem_channels: an image stem needs a patch that is a multiple of 8 \
                     pixels, the patch is {patch} (set stem_channels = 0 or another patch)"
                ))
            }
            _ => None,
        }
    }

    /// Build the model with random weights (panics on a configuration with a
    /// [`EcgVlmConfig::problem`]; check it first where the configuration comes from a user).
    pub fn init(&self, device: &Device) -> EcgVlm {
        let n_vis = self.input.n_tokens();
        let enc = |d: usize, layers: usize, heads: usize| {
            TransformerEncoderConfig::new(d, d * self.ff_mult, heads, layers)
                .with_norm_first(true)
                .with_dropout(0.0)
                .init(device)
        };
        let pos = |n: usize, d: usize| {
            Param::from_tensor(Tensor::<2>::random(
                [n, d],
                Distribution::Normal(0.0, 0.02),
                device,
            ))
        };
        let signal = matches!(self.input, InputKind::Signal { .. });
        let stem = (signal && self.stem_channels > 0).then(|| {
            let conv = |i: usize, o: usize| {
                Conv1dConfig::new(i, o, 7)
                    .with_padding(PaddingConfig1d::Explicit(3, 3))
                    .init(device)
            };
            let leads = match self.input {
                InputKind::Signal { leads, .. } => leads,
                InputKind::Image { .. } => 1,
            };
            ConvStem {
                conv1: conv(leads, self.stem_channels),
                conv2: conv(self.stem_channels, self.stem_channels),
            }
        });
        let image_stem = match self.input {
            InputKind::Image { patch, .. } if self.stem_channels > 0 => {
                Some(ImageStem::new(patch, self.stem_channels, device))
            }
            _ => None,
        };
        let patch_dim = match (&self.input, stem.is_some(), image_stem.is_some()) {
            (InputKind::Signal { patch, .. }, true, _) => self.stem_channels * patch,
            (InputKind::Image { .. }, _, true) => self.stem_channels,
            _ => self.input.patch_dim(),
        };
        EcgVlm {
            stem,
            image_stem,
            patch_embed: LinearConfig::new(patch_dim, self.d_vision).init(device),
            vis_pos: pos(n_vis, self.d_vision),
            vision: enc(self.d_vision, self.vision_layers, self.vision_heads),
            vis_norm: LayerNormConfig::new(self.d_vision).init(device),
            projector: LinearConfig::new(self.d_vision, self.d_model).init(device),
            tok_emb: EmbeddingConfig::new(self.vocab, self.d_model).init(device),
            pos: pos(n_vis + self.max_text, self.d_model),
            decoder: enc(self.d_model, self.layers, self.heads),
            norm: LayerNormConfig::new(self.d_model).init(device),
            lm_head: LinearConfig::new(self.d_model, self.vocab)
                .with_bias(false)
                .init(device),
            is_signal: matches!(self.input, InputKind::Signal { .. }),
            in_a: match self.input {
                InputKind::Image { height, .. } => height,
                InputKind::Signal { leads, .. } => leads,
            },
            in_b: match self.input {
                InputKind::Image { width, .. } => width,
                InputKind::Signal { samples, .. } => samples,
            },
            in_patch: match self.input {
                InputKind::Image { patch, .. } | InputKind::Signal { patch, .. } => patch,
            },
            n_visual: n_vis,
        }
    }
}

impl EcgVlm {
    /// The encoder input this model reads.
    pub fn input(&self) -> InputKind {
        if self.is_signal {
            InputKind::Signal {
                leads: self.in_a,
                samples: self.in_b,
                patch: self.in_patch,
            }
        } else {
            InputKind::Image {
                height: self.in_a,
                width: self.in_b,
                patch: self.in_patch,
            }
        }
    }

    /// Visual tokens `[b, v, d_vision]` from the input (see [`EcgVlm::view`]).
    pub fn encode(&self, pixels: Tensor<3>) -> Tensor<3> {
        let [b, _, _] = pixels.dims();
        let patches = match &self.input() {
            InputKind::Image {
                height,
                width,
                patch,
            } => {
                let (gh, gw) = (height / patch, width / patch);
                let page = pixels.reshape([b, *height, *width]).slice([
                    0..b,
                    0..gh * patch,
                    0..gw * patch,
                ]);
                match &self.image_stem {
                    Some(stem) => {
                        let y = stem.forward(page.reshape([b, 1, gh * patch, gw * patch]));
                        let c = y.dims()[1];
                        y.reshape([b, c, gh * gw]).swap_dims(1, 2)
                    }
                    None => page
                        .reshape([b, gh, *patch, gw, *patch])
                        .swap_dims(2, 3)
                        .reshape([b, gh * gw, patch * patch]),
                }
            }
            InputKind::Signal {
                leads,
                samples,
                patch,
            } => {
                let n = samples / patch;
                let x = pixels.slice([0..b, 0..*leads, 0..n * patch]);
                let (x, leads) = match &self.stem {
                    Some(stem) => {
                        let y = stem.forward(x);
                        let c = y.dims()[1];
                        (y, c)
                    }
                    None => (x, *leads),
                };
                x.reshape([b, leads, n, *patch])
                    .swap_dims(1, 2)
                    .reshape([b, n, leads * *patch])
            }
        };
        let x = self.patch_embed.forward(patches);
        let [_, v, d] = x.dims();
        let x = x + self.vis_pos.val().reshape([1, v, d]);
        self.vis_norm
            .forward(self.vision.forward(TransformerEncoderInput::new(x)))
    }

    /// Language-model pass over `[visual; text]`; returns final hidden states of the whole
    /// sequence `[b, v + t, d_model]`.
    fn decode(
        &self,
        visual: Tensor<3>,
        text: Tensor<2, Int>,
        text_pad: Tensor<2, Bool>,
    ) -> Tensor<3> {
        self.decode_at(visual, text, text_pad, None).0
    }

    /// The model with its visual encoder (stem, patch embedding, positions, encoder layers,
    /// norm) marked trainable or not. A frozen encoder builds no autodiff graph at all
    /// (detaching its output instead would leave every step's encoder graph alive, never
    /// consumed by a backward pass: measured, 27 MB per step).
    pub fn with_vision_trainable(mut self, trainable: bool) -> Self {
        self.stem = self.stem.map(|s| s.set_require_grad(trainable));
        self.image_stem = self.image_stem.map(|s| s.set_require_grad(trainable));
        self.patch_embed = self.patch_embed.set_require_grad(trainable);
        self.vis_pos = self.vis_pos.set_require_grad(trainable);
        self.vision = self.vision.set_require_grad(trainable);
        self.vis_norm = self.vis_norm.set_require_grad(trainable);
        self
    }

    /// Number of decoder layers.
    pub fn n_layers(&self) -> usize {
        self.decoder.layers.len()
    }

    /// [`EcgVlm::decode`], also returning the hidden states entry `layer` of the sequence
    /// (transformers' `hidden_states` numbering: 0 = the decoder's input, `k` = after decoder
    /// layer `k`, `n_layers` or `None` = after the final norm, the same as the first output).
    fn decode_at(
        &self,
        visual: Tensor<3>,
        text: Tensor<2, Int>,
        text_pad: Tensor<2, Bool>,
        layer: Option<usize>,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let [b, v, _] = visual.dims();
        let [_, t] = text.dims();
        let device = visual.device();
        let x = Tensor::cat(
            vec![self.projector.forward(visual), self.tok_emb.forward(text)],
            1,
        );
        let d = x.dims()[2];
        let x = x + self
            .pos
            .val()
            .slice([0..v + t, 0..d])
            .reshape([1, v + t, d]);
        let vis_pad = Tensor::<2, Bool>::from_data(
            burn::tensor::TensorData::new(vec![false; b * v], [b, v]),
            &device,
        );
        let pad = Tensor::cat(vec![vis_pad, text_pad], 1);
        let causal = generate_autoregressive_mask(b, v + t, &device);
        let mut at = None;
        let h = match layer {
            // The library's own loop when no inner state is asked for.
            None => self.decoder.forward(
                TransformerEncoderInput::new(x)
                    .mask_pad(pad)
                    .mask_attn(causal),
            ),
            Some(k) => {
                let mut h = x;
                for (i, l) in self.decoder.layers.iter().enumerate() {
                    if i == k {
                        at = Some(h.clone());
                    }
                    h = l.forward(h, Some(pad.clone()), Some(causal.clone()));
                }
                h
            }
        };
        let h = self.norm.forward(h);
        if layer.is_some() && at.is_none() {
            at = Some(h.clone());
        }
        (h, at)
    }

    /// The output head's weights, row-major `[d_model, vocab]`, on the host.
    pub fn head_weights(&self) -> Vec<f32> {
        self.lm_head
            .weight
            .val()
            .into_data()
            .iter::<f32>()
            .collect()
    }

    /// Number of visual tokens.
    pub fn n_visual(&self) -> usize {
        self.n_visual
    }

    /// Longest text (prompt + answer, with specials) the position table covers.
    pub fn max_text(&self) -> usize {
        self.pos.dims()[0] - self.n_visual
    }

    /// Next-token logits at the text positions `[b, t, vocab]` (row `i` predicts token `i`)
    /// from visual tokens already encoded (`[b, v, d_vision]`): several questions about one
    /// record share one encoder pass.
    pub fn text_logits(
        &self,
        visual: Tensor<3>,
        text: Tensor<2, Int>,
        text_pad: Tensor<2, Bool>,
    ) -> Tensor<3> {
        let [b, v, _] = visual.dims();
        let [_, t] = text.dims();
        let h = self.decode(visual, text, text_pad);
        let d = h.dims()[2];
        self.lm_head
            .forward(h.slice([0..b, v - 1..v + t - 1, 0..d]))
    }

    /// Greedy generation of up to `max_new` tokens after `prompt` (one example), stopping at
    /// `eos`. Recomputes the full sequence per token (models here are small).
    pub fn generate(
        &self,
        pixels: Tensor<3>,
        prompt: &[i64],
        eos: i64,
        max_new: usize,
    ) -> Vec<i64> {
        self.generate_from_visual(self.encode(pixels), prompt, eos, max_new)
    }

    /// [`EcgVlm::generate`] from visual tokens already encoded (`[1, v, d_vision]`).
    pub fn generate_from_visual(
        &self,
        visual: Tensor<3>,
        prompt: &[i64],
        eos: i64,
        max_new: usize,
    ) -> Vec<i64> {
        let device = visual.device();
        let mut ids: Vec<i64> = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let t = ids.len();
            let text = Tensor::<2, Int>::from_data(
                burn::tensor::TensorData::new(ids.clone(), [1, t]),
                &device,
            );
            let pad = Tensor::<2, Bool>::from_data(
                burn::tensor::TensorData::new(vec![false; t], [1, t]),
                &device,
            );
            let h = self.decode(visual.clone(), text, pad);
            let v = self.n_visual;
            let last = h.slice([0..1, v + t - 1..v + t]);
            let logits = self
                .lm_head
                .forward(last)
                .reshape([self.lm_head.weight.dims()[1]]);
            let next = logits
                .argmax(0)
                .into_data()
                .iter::<i64>()
                .next()
                .expect("argmax gives one integer");
            if next == eos || ids.len() + 1 >= self.pos.dims()[0] - self.n_visual {
                break;
            }
            out.push(next);
            ids.push(next);
        }
        out
    }
}

impl Distillable for EcgVlm {
    /// `(pixels, text, text_pad)` as [`EcgVlm::view`] reads them.
    type Batch<'a> = (Tensor<3>, Tensor<2, Int>, Tensor<2, Bool>);
    type Error = std::convert::Infallible;

    fn distill_view(&self, (p, t, pad): Self::Batch<'_>) -> Result<DistillView, Self::Error> {
        Ok(self.view(p, t, pad))
    }

    fn facts(&self) -> ModelFacts {
        EcgVlm::facts(self)
    }
}

impl EcgVlm {
    /// The distillation view (see [`Distillable`]).
    ///
    /// # Shapes
    /// - `pixels`: image `[b, 1, h, w]` or signal `[b, leads, samples]` flattened to 3-D
    ///   `[b, c, n]` (images are passed as `[b, 1, h * w]`)
    /// - `text`: `[b, t]` token ids (prompt then answer, padded), `text_pad`: `[b, t]`, true at
    ///   padding
    pub fn view(
        &self,
        pixels: Tensor<3>,
        text: Tensor<2, Int>,
        text_pad: Tensor<2, Bool>,
    ) -> DistillView {
        self.view_layer(pixels, text, text_pad, None)
    }

    /// [`EcgVlm::view`] with `hidden` taken from hidden-states entry `layer` (transformers'
    /// numbering: 0 = the decoder's input, `k` = after decoder layer `k`; `None` = after the
    /// final norm, the default). Logits and `visual_hidden` stay the final ones.
    ///
    /// # Panics
    /// If `layer` is beyond [`EcgVlm::n_layers`] (callers check it against the model).
    pub fn view_layer(
        &self,
        pixels: Tensor<3>,
        text: Tensor<2, Int>,
        text_pad: Tensor<2, Bool>,
        layer: Option<usize>,
    ) -> DistillView {
        self.view_from_visual(self.encode(pixels), text, text_pad, layer)
    }

    /// [`EcgVlm::view_layer`] from visual tokens already computed by [`EcgVlm::encode`]
    /// (a frozen encoder's tokens, computed once per record and reused on every step).
    ///
    /// # Panics
    /// If `layer` is beyond [`EcgVlm::n_layers`] (callers check it against the model).
    pub fn view_from_visual(
        &self,
        visual: Tensor<3>,
        text: Tensor<2, Int>,
        text_pad: Tensor<2, Bool>,
        layer: Option<usize>,
    ) -> DistillView {
        assert!(
            layer.is_none_or(|k| k <= self.n_layers()),
            "hidden layer beyond the decoder"
        );
        let [b, v, _] = visual.dims();
        let [_, t] = text.dims();
        let (h, at) = self.decode_at(visual.clone(), text, text_pad.clone(), layer);
        let d = h.dims()[2];
        // Position v - 1 + i predicts text token i.
        let pred_pos = h.clone().slice([0..b, v - 1..v + t - 1, 0..d]);
        let logits = self.lm_head.forward(pred_pos);
        let hidden = at
            .unwrap_or_else(|| h.clone())
            .slice([0..b, v..v + t, 0..d]);
        DistillView {
            visual,
            hidden,
            text_mask: text_pad.bool_not(),
            logits,
            visual_hidden: h.slice([0..b, 0..v, 0..d]),
            head: self.lm_head.weight.val(),
            visual_mask: None,
        }
    }

    /// Size facts.
    pub fn facts(&self) -> ModelFacts {
        ModelFacts {
            params: self.num_params(),
            visual_tokens: self.n_visual,
            d_vision: self.patch_embed.weight.dims()[1],
            d_model: self.projector.weight.dims()[1],
            vocab: self.lm_head.weight.dims()[1],
            input: match &self.input() {
                InputKind::Image {
                    height,
                    width,
                    patch,
                } => format!("image {height}x{width}, patch {patch}"),
                InputKind::Signal {
                    leads,
                    samples,
                    patch,
                } => format!("signal {leads}x{samples}, patch {patch}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal_model(stem: usize) -> (EcgVlm, Device) {
        let device = Device::flex();
        let cfg = EcgVlmConfig::new(
            InputKind::Signal {
                leads: 12,
                samples: 200,
                patch: 20,
            },
            16,
            1,
            2,
            24,
            1,
            2,
            30,
            16,
        )
        .with_stem_channels(stem);
        (cfg.init(&device), device)
    }

    /// The hidden-state layer distillation reads: `None` and `n_layers` are the final
    /// states, 0 is the decoder's input, an inner layer differs from both; logits never move.
    #[test]
    fn view_at_a_layer() {
        let device = Device::flex();
        let m = EcgVlmConfig::new(
            InputKind::Signal {
                leads: 12,
                samples: 200,
                patch: 20,
            },
            16,
            1,
            2,
            24,
            3,
            2,
            30,
            16,
        )
        .init(&device);
        let x = Tensor::<3>::random([2, 12, 200], Distribution::Normal(0.0, 1.0), &device);
        let text = Tensor::<2, Int>::from_data(
            burn::tensor::TensorData::new(vec![1i64, 5, 6, 7, 1, 8, 9, 0], [2, 4]),
            &device,
        );
        let pad = text.clone().equal_elem(0);
        let v = |l| m.view_layer(x.clone(), text.clone(), pad.clone(), l);
        let flat = |t: Tensor<3>| -> Vec<f32> { t.into_data().iter::<f32>().collect() };
        let fin = v(None);
        let base = flat(m.view(x.clone(), text.clone(), pad.clone()).hidden);
        assert_eq!(flat(fin.hidden.clone()), base);
        assert_eq!(flat(v(Some(3)).hidden), base);
        let (h0, h1) = (v(Some(0)), v(Some(1)));
        assert_ne!(flat(h0.hidden.clone()), base);
        assert_ne!(flat(h1.hidden.clone()), base);
        assert_ne!(flat(h0.hidden), flat(h1.hidden.clone()));
        assert_eq!(flat(h1.logits), flat(fin.logits));
        assert_eq!(m.n_layers(), 3);
    }

    #[test]
    fn signal_tokens_with_and_without_a_conv_stem() {
        let (m0, device) = signal_model(0);
        let (m8, _) = signal_model(8);
        let x = Tensor::<3>::random([2, 12, 200], Distribution::Normal(0.0, 1.0), &device);
        assert_eq!(m0.encode(x.clone()).dims(), [2, 10, 16]);
        assert_eq!(m8.encode(x).dims(), [2, 10, 16]);
        assert!(m0.stem.is_none() && m8.stem.is_some());
        // Stem: 12->8 and 8->8 kernel-7 convolutions with bias; the patch embedding then reads
        // 8 x 20 values instead of 12 x 20.
        let stem = (12 * 8 * 7 + 8) + (8 * 8 * 7 + 8);
        let embed_change = (8 * 20 - 12 * 20) * 16;
        assert_eq!(
            m8.num_params() as i64,
            m0.num_params() as i64 + stem as i64 + embed_change as i64
        );
    }
}
