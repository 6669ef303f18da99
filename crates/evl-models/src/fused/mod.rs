//! The forward and backward pass of [`EcgVlm`] as fused host kernels, for training on the
//! CPU: supervised fine-tuning on a frozen encoder's visual tokens ([`FusedLm::step`]), and
//! view passes ([`FusedLm::view_forward`] / [`FusedLm::view_backward`]) that give
//! distillation every output it reads and take the loss's gradients with respect to them
//! back through the language model and, for a signal student, its encoder.
//!
//! Why it exists: burn's autodiff runs a training step op by op, materialising every
//! intermediate, through GEMMs tuned for other shapes (measured: 0.4-0.5x the same step in
//! PyTorch, see `BENCHMARKS.md`). Here the step is written out by hand: a handful of GEMMs per
//! layer (the `gemm` crate, with the transposes of the backward pass given as strides, never
//! copied), attention, LayerNorm, GELU and the cross-entropy as plain loops, every
//! activation the backward pass needs kept from the forward pass.
//!
//! It also uses the structure of a batch. Under causal attention the visual prefix of a
//! sequence does not depend on the text after it, so rows that ask about the same record
//! (SFT draws several questions per record) share one prefix: it runs once per record, and
//! its gradient collects every question's. Text after a row's last answer token can change no
//! loss term, and padding is never computed. The loss and gradients are those of
//! [`EcgVlm::view_from_visual`] followed by the answer-token cross-entropy on the padded batch
//! (to float rounding; test `fused_step_matches_autodiff`).
//!
//! Parameters are read from the model on every step ([`FusedLm::from_model`]) and gradients
//! handed back keyed by burn's parameter ids ([`FusedLm::gradients`]), so the optimiser,
//! checkpoints and resumption stay burn's.

use crate::native::exp;
use crate::vlm::EcgVlm;
use burn::module::{Param, ParamId};
use burn::nn::{LayerNorm, Linear};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

mod kernels;
mod stem;
mod view;

use kernels::{
    View, add_bias, attention_backward, attention_forward, col_sums, gelu_backward, gelu_forward,
    ln_backward, ln_forward, mm,
};
pub use view::{EncodeTape, ViewGrads, ViewInput, ViewOut, ViewTape};

/// Why a batch cannot be run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FusedError {
    /// A row names a record outside the visual tokens given.
    #[error("row {row}: record {record} of {records} with visual tokens")]
    Record {
        /// Row.
        row: usize,
        /// Its record.
        record: usize,
        /// Records given.
        records: usize,
    },
    /// A token id outside the vocabulary.
    #[error("row {row}, token {pos}: id {id} outside the vocabulary of {vocab}")]
    Token {
        /// Row.
        row: usize,
        /// Position in the row.
        pos: usize,
        /// The id.
        id: i64,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A row longer than the position table, or whose mask does not match its ids.
    #[error("row {row}: {what}")]
    Row {
        /// Row.
        row: usize,
        /// Problem.
        what: String,
    },
    /// The visual tokens are not `records x v x d_vision`.
    #[error("visual tokens: {0}")]
    Visual(String),
    /// No row has an answer token (the mean cross-entropy is undefined).
    #[error("the batch has no answer tokens")]
    NoAnswer,
}

/// One training text: token ids and which of them are answer tokens (the targets), about
/// record `record` of the batch's visual tokens.
#[derive(Debug, Clone, Copy)]
pub struct LmRow<'a> {
    /// Index into the batch's records.
    pub record: usize,
    /// Token ids (prompt then answer, no padding).
    pub ids: &'a [i64],
    /// True at answer tokens (`ids.len()` entries).
    pub answer: &'a [bool],
}

/// Where one parameter lives in the flat parameter (and gradient) vector.
#[derive(Debug, Clone)]
struct Slot {
    id: ParamId,
    shape: Vec<usize>,
    off: usize,
    len: usize,
    /// Trainable (an optimiser gets its gradient).
    train: bool,
}

/// Slot indices and sizes of the visual encoder (a signal read in windows, no stem).
#[derive(Debug, Clone)]
struct EncSlots {
    embed: (usize, usize),
    pos: usize,
    layers: Vec<LayerSlots>,
    norm: (usize, usize),
    dims: Dims,
    input: EncInput,
    /// Some encoder parameter learns (else its backward pass is skipped).
    train: bool,
}

/// The encoder's slots as read from the model: patch embedding, positions, layers, final
/// norm, heads, input.
type EncParts = (
    (usize, usize),
    usize,
    Vec<LayerSlots>,
    (usize, usize),
    usize,
    EncInput,
);

/// [`EncSlots`] from the encoder's parts; its slots are the first `n_enc`.
fn enc_slots(
    (embed, pos, layers, norm, heads, input): EncParts,
    slots: &[Slot],
    n_enc: usize,
) -> EncSlots {
    EncSlots {
        dims: Dims {
            d: slots[embed.0].shape[1],
            heads,
            ff: layers.first().map_or(0, |l| slots[l.inner.0].shape[1]),
        },
        embed,
        pos,
        layers,
        norm,
        input,
        train: slots[..n_enc].iter().any(|s| s.train),
    }
}

/// What the encoder reads, per record.
#[derive(Debug, Clone)]
enum EncInput {
    /// `[leads, samples]`, cut into windows of `patch` samples.
    Signal {
        leads: usize,
        samples: usize,
        patch: usize,
    },
    /// A page `[height, width]`, cut into `patch x patch` squares, through the stem if any.
    Image {
        height: usize,
        width: usize,
        patch: usize,
        stem: Option<stem::StemSlots>,
    },
}

impl EncInput {
    /// Values per record.
    fn per_record(&self) -> usize {
        match self {
            EncInput::Signal { leads, samples, .. } => leads * samples,
            EncInput::Image { height, width, .. } => height * width,
        }
    }
}

/// Slot indices of one decoder layer.
#[derive(Debug, Clone, Copy)]
struct LayerSlots {
    ln_attn: (usize, usize),
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    o: (usize, usize),
    ln_ffn: (usize, usize),
    inner: (usize, usize),
    outer: (usize, usize),
}

/// The trainable parameters of an [`EcgVlm`]'s language model (projector, token and position
/// embeddings, decoder layers, final norm, output head), copied to the host, with the fused
/// forward and backward pass of the SFT loss.
#[derive(Debug, Clone)]
pub struct FusedLm {
    values: Vec<f32>,
    slots: Vec<Slot>,
    projector: (usize, usize),
    tok_emb: usize,
    pos: usize,
    layers: Vec<LayerSlots>,
    norm: (usize, usize),
    head: usize,
    d: usize,
    dv: usize,
    heads: usize,
    ff: usize,
    vocab: usize,
    n_pos: usize,
    n_visual: usize,
    enc: Option<EncSlots>,
}

/// The loss of a batch and the gradient of every parameter (flat, in [`FusedLm`]'s layout).
#[derive(Debug, Clone)]
pub struct FusedStep {
    /// Mean cross-entropy over the batch's answer tokens.
    pub loss: f64,
    grads: Vec<f32>,
}

/// Rows of the batch as one matrix: record blocks, each its `v` visual positions followed by
/// the text rows of every question about it.
#[derive(Debug)]
struct Layout {
    /// Rows in all.
    n: usize,
    /// Per row: index into the position table.
    pos: Vec<usize>,
    /// Per row: token id (`None` at visual positions).
    token: Vec<Option<usize>>,
    /// Per record block: (its first row, the record).
    blocks: Vec<(usize, usize)>,
    /// Attention groups: query rows `qs..qs + qn` see the shared rows `ss..ss + sn` and
    /// themselves causally.
    groups: Vec<Group>,
    /// Per answer token: (the row whose output predicts it, the target id).
    targets: Vec<(usize, usize)>,
    /// Per input row: (its record block's first row, its first text row, text rows).
    rows_at: Vec<(usize, usize, usize)>,
}

#[derive(Debug, Clone, Copy)]
struct Group {
    qs: usize,
    qn: usize,
    ss: usize,
    sn: usize,
    /// Each query also sees the group's own rows up to itself (false: only the shared rows,
    /// which for the encoder's groups are the group's own rows, all of them).
    causal: bool,
    /// Offset of this group's attention weights (all heads).
    p_off: usize,
}

impl Group {
    /// Attention weights per head.
    fn per_head(&self) -> usize {
        (0..self.qn).map(|j| self.visible(j)).sum()
    }
    /// Keys query `j` sees.
    #[inline(always)]
    fn visible(&self, j: usize) -> usize {
        self.sn + if self.causal { j + 1 } else { 0 }
    }
    /// Offset of query `j`'s weights within one head's.
    #[inline(always)]
    fn weights_at(&self, j: usize) -> usize {
        j * self.sn + if self.causal { j * (j + 1) / 2 } else { 0 }
    }
    /// Row of key `k` of this group.
    #[inline(always)]
    fn key_row(&self, k: usize) -> usize {
        if k < self.sn {
            self.ss + k
        } else {
            self.qs + k - self.sn
        }
    }
}

/// Width, heads and feed-forward width of a stack of layers.
#[derive(Debug, Clone, Copy)]
struct Dims {
    d: usize,
    heads: usize,
    ff: usize,
}

/// Activations of one decoder layer kept for the backward pass.
struct LayerActs {
    xhat1: Vec<f32>,
    inv1: Vec<f32>,
    h1: Vec<f32>,
    qkv: Vec<f32>,
    p: Vec<f32>,
    ctx: Vec<f32>,
    xhat2: Vec<f32>,
    inv2: Vec<f32>,
    h2: Vec<f32>,
    pre: Vec<f32>,
    act: Vec<f32>,
}

/// A parameter read from the model: id, shape, values, trainable.
type HostParam = (ParamId, Vec<usize>, TensorData, bool);

fn host<const D: usize>(p: &Param<Tensor<D>>) -> HostParam {
    let t = p.val();
    let shape = t.dims().to_vec();
    (
        p.id,
        shape,
        t.into_data().convert::<f32>(),
        p.is_require_grad(),
    )
}

fn lin(push: &mut impl FnMut(HostParam) -> usize, l: &Linear) -> (usize, usize) {
    let w = push(host(&l.weight));
    let b = push(host(
        l.bias.as_ref().expect("linear layers here have a bias"),
    ));
    (w, b)
}

fn norm(push: &mut impl FnMut(HostParam) -> usize, n: &LayerNorm) -> (usize, usize) {
    let g = push(host(&n.gamma));
    let b = push(host(n.beta.as_ref().expect("layer norms here have a bias")));
    (g, b)
}

/// One pre-norm layer's slots, read in burn's forward order.
fn layer_slots(
    push: &mut impl FnMut(HostParam) -> usize,
    l: &burn::nn::transformer::TransformerEncoderLayer,
) -> LayerSlots {
    // burn's pre-norm layer: `norm_2` before attention, `norm_1` before the MLP.
    LayerSlots {
        ln_attn: norm(push, &l.norm_2),
        q: lin(push, &l.mha.query),
        k: lin(push, &l.mha.key),
        v: lin(push, &l.mha.value),
        o: lin(push, &l.mha.output),
        ln_ffn: norm(push, &l.norm_1),
        inner: lin(push, &l.pwff.linear_inner),
        outer: lin(push, &l.pwff.linear_outer),
    }
}

impl FusedLm {
    /// Copy the language model's parameters of `model` to the host.
    ///
    /// They are read in the order of burn's forward pass (projector, token and position
    /// embeddings, then per layer the attention norm, query, key, value, output, the MLP norm
    /// and its two layers, then the final norm and the head; weight before bias): burn
    /// initialises a parameter lazily, from the device's random stream, when it is first
    /// read, so this order keeps a seeded model's initial weights the same with these
    /// kernels and without them (test `caching_a_frozen_encoder_changes_no_loss`).
    pub fn from_model(model: &EcgVlm) -> FusedLm {
        FusedLm::build(model, false)
    }

    /// [`FusedLm::from_model`] with the visual encoder too (its parameters read first, as
    /// burn's forward pass reads them), for passes that train it from raw input
    /// ([`FusedLm::view_forward`] with [`ViewInput::Raw`]). `None` when the encoder is not
    /// one these kernels cover: they cover a signal read in windows without a convolutional
    /// stem (the built-in student); image encoders and stems stay on burn.
    pub fn with_encoder(model: &EcgVlm) -> Option<FusedLm> {
        FusedLm::covers_encoder(model).then(|| FusedLm::build(model, true))
    }

    /// Whether [`FusedLm::with_encoder`] covers `model`'s encoder (a signal read in windows,
    /// no stem), without copying anything.
    pub fn covers_encoder(model: &EcgVlm) -> bool {
        let stem_ok = model.image_stem.as_ref().is_none_or(|st| {
            st.convs.iter().all(|c| {
                let square = c.stride[0] == c.stride[1]
                    && c.kernel_size[0] == c.kernel_size[1]
                    && c.dilation == [1, 1]
                    && c.groups == 1
                    && c.bias.is_some();
                let pad = match c.padding {
                    burn::nn::PaddingConfig2d::Explicit(a, b, cc, d) => {
                        a == b && b == cc && cc == d
                    }
                    burn::nn::PaddingConfig2d::Valid => true,
                    _ => false,
                };
                square && pad
            }) && st.norms.len() + 1 == st.convs.len()
        });
        model.stem.is_none() && stem_ok
    }

    /// The visual encoder's parameters only ([`FusedLm::encode`]), for vision pre-training:
    /// the language model's are not read, so burn initialises them (lazily) where it would
    /// have. `None` when the encoder is not covered ([`FusedLm::covers_encoder`]).
    pub fn encoder_only(model: &EcgVlm) -> Option<FusedLm> {
        FusedLm::covers_encoder(model).then(|| FusedLm::build_parts(model, true, false))
    }

    fn build(model: &EcgVlm, encoder: bool) -> FusedLm {
        FusedLm::build_parts(model, encoder, true)
    }

    fn build_parts(model: &EcgVlm, encoder: bool, lm: bool) -> FusedLm {
        // Read on every step: the values are copied once, from the tensor's data into one
        // buffer sized for the whole model.
        let mut values = Vec::with_capacity(burn::module::Module::num_params(model));
        let mut slots: Vec<Slot> = Vec::new();
        let mut push = |(id, shape, data, train): HostParam| {
            let v = data.as_slice::<f32>().expect("float parameter");
            slots.push(Slot {
                id,
                shape,
                off: values.len(),
                len: v.len(),
                train,
            });
            values.extend_from_slice(v);
            slots.len() - 1
        };
        let enc = encoder.then(|| {
            let stem = model.image_stem.as_ref().map(|st| {
                let mut convs = Vec::new();
                let mut norms = Vec::new();
                for (i, c) in st.convs.iter().enumerate() {
                    let (w, b) = (
                        push(host(&c.weight)),
                        push(host(
                            c.bias.as_ref().expect("stem convolutions have a bias"),
                        )),
                    );
                    let [cout, cin, k, _] = c.weight.dims();
                    let pad = match c.padding {
                        burn::nn::PaddingConfig2d::Explicit(p, ..) => p,
                        _ => 0,
                    };
                    convs.push(stem::ConvSpec {
                        w,
                        b,
                        cin,
                        cout,
                        k,
                        stride: c.stride[0],
                        pad,
                    });
                    if let Some(n) = st.norms.get(i) {
                        let g = push(host(n.gamma.as_ref().expect("affine group norm")));
                        let b = push(host(n.beta.as_ref().expect("affine group norm")));
                        norms.push((g, b));
                    }
                }
                stem::StemSlots {
                    convs,
                    norms,
                    groups: crate::vlm::STEM_GROUPS,
                }
            });
            let embed = lin(&mut push, &model.patch_embed);
            let pos = push(host(&model.vis_pos));
            let layers: Vec<LayerSlots> = model
                .vision
                .layers
                .iter()
                .map(|l| layer_slots(&mut push, l))
                .collect();
            let norm = norm(&mut push, &model.vis_norm);
            let input = match model.input() {
                crate::vlm::InputKind::Signal {
                    leads,
                    samples,
                    patch,
                } => EncInput::Signal {
                    leads,
                    samples,
                    patch,
                },
                crate::vlm::InputKind::Image {
                    height,
                    width,
                    patch,
                } => EncInput::Image {
                    height,
                    width,
                    patch,
                    stem,
                },
            };
            let first = model.vision.layers.first();
            (
                embed,
                pos,
                layers,
                norm,
                first.map_or(1, |l| l.mha.n_heads),
                input,
            )
        });
        // The encoder's slots come first; its final norm's bias is the last of them.
        let n_enc = enc.as_ref().map_or(0, |e| e.3.1 + 1);
        if !lm {
            let enc = enc_slots(
                enc.expect("an encoder-only build reads the encoder"),
                &slots,
                n_enc,
            );
            let dv = enc.dims.d;
            // No language model: its slot indices are never read.
            return FusedLm {
                values,
                slots,
                projector: (usize::MAX, usize::MAX),
                tok_emb: usize::MAX,
                pos: usize::MAX,
                layers: Vec::new(),
                norm: (usize::MAX, usize::MAX),
                head: usize::MAX,
                d: 0,
                dv,
                heads: 1,
                ff: 0,
                vocab: 0,
                n_pos: 0,
                n_visual: model.n_visual(),
                enc: Some(enc),
            };
        }
        let projector = lin(&mut push, &model.projector);
        let tok_emb = push(host(&model.tok_emb.weight));
        let pos = push(host(&model.pos));
        let layers: Vec<LayerSlots> = model
            .decoder
            .layers
            .iter()
            .map(|l| layer_slots(&mut push, l))
            .collect();
        let final_norm = norm(&mut push, &model.norm);
        let head = push(host(&model.lm_head.weight));
        let (dv, d) = (slots[projector.0].shape[0], slots[projector.0].shape[1]);
        let enc = enc.map(|parts| enc_slots(parts, &slots, n_enc));
        let ff = layers.first().map_or(0, |l| slots[l.inner.0].shape[1]);
        let heads = model.decoder.layers.first().map_or(1, |l| l.mha.n_heads);
        let vocab = slots[head].shape[1];
        let n_pos = slots[pos].shape[0];
        FusedLm {
            values,
            slots,
            projector,
            tok_emb,
            pos,
            layers,
            norm: final_norm,
            head,
            d,
            dv,
            heads,
            ff,
            vocab,
            n_pos,
            n_visual: model.n_visual(),
            enc,
        }
    }

    fn lm_dims(&self) -> Dims {
        Dims {
            d: self.d,
            heads: self.heads,
            ff: self.ff,
        }
    }

    fn p(&self, slot: usize) -> &[f32] {
        let s = &self.slots[slot];
        &self.values[s.off..s.off + s.len]
    }

    /// Positions of the position table (visual tokens plus the longest text).
    pub fn n_pos(&self) -> usize {
        self.n_pos
    }

    /// Visual tokens per record.
    pub fn n_visual(&self) -> usize {
        self.n_visual
    }

    /// Width of the visual tokens.
    pub fn d_vision(&self) -> usize {
        self.dv
    }

    /// Width of the language model.
    pub fn d_model(&self) -> usize {
        self.d
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Parameters the step covers.
    pub fn n_params(&self) -> usize {
        self.values.len()
    }

    /// The gradients of `step` as burn tensors on `device`, scaled by `scale`, keyed by the
    /// ids of the parameters they were read from (what an optimiser steps with).
    pub fn gradients(&self, step: &FusedStep, scale: f32, device: &Device) -> GradientsParams {
        let mut out = GradientsParams::new();
        self.register(&mut out, step, scale, device);
        out
    }

    /// Add the gradients of `step` (scaled by `scale`) of every trainable parameter to `out`.
    pub fn register(
        &self,
        out: &mut GradientsParams,
        step: &FusedStep,
        scale: f32,
        device: &Device,
    ) {
        for s in self.slots.iter().filter(|s| s.train) {
            let g: Vec<f32> = step.grads[s.off..s.off + s.len]
                .iter()
                .map(|v| v * scale)
                .collect();
            let data = TensorData::new(g, s.shape.clone());
            match s.shape.len() {
                1 => out.register::<1>(s.id, Tensor::from_data(data, device)),
                2 => out.register::<2>(s.id, Tensor::from_data(data, device)),
                _ => out.register::<4>(s.id, Tensor::from_data(data, device)),
            }
        }
    }

    /// The gradient of the parameter with burn id `id` in `step`, flat (tests and checks).
    pub fn gradient_of(&self, step: &FusedStep, id: ParamId) -> Option<Vec<f32>> {
        let s = self.slots.iter().find(|s| s.id == id)?;
        Some(step.grads[s.off..s.off + s.len].to_vec())
    }

    /// The burn ids of the parameters the step covers.
    pub fn param_ids(&self) -> Vec<ParamId> {
        self.slots.iter().map(|s| s.id).collect()
    }

    /// The rows of a batch; `full`: every row and every token (a view pass, whose outputs are
    /// read at every position), else only rows with answer tokens, up to their last one.
    fn layout(&self, records: usize, rows: &[LmRow<'_>], full: bool) -> Result<Layout, FusedError> {
        let v = self.n_visual;
        let mut by_record: Vec<Vec<usize>> = vec![Vec::new(); records];
        let mut order: Vec<usize> = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            if row.record >= records {
                return Err(FusedError::Record {
                    row: r,
                    record: row.record,
                    records,
                });
            }
            if row.ids.len() != row.answer.len() {
                return Err(FusedError::Row {
                    row: r,
                    what: format!(
                        "{} ids but {} answer flags",
                        row.ids.len(),
                        row.answer.len()
                    ),
                });
            }
            if v + row.ids.len() > self.n_pos {
                return Err(FusedError::Row {
                    row: r,
                    what: format!(
                        "{} tokens after {v} visual ones, the position table has {}",
                        row.ids.len(),
                        self.n_pos
                    ),
                });
            }
            for (pos, &id) in row.ids.iter().enumerate() {
                if id < 0 || id as usize >= self.vocab {
                    return Err(FusedError::Token {
                        row: r,
                        pos,
                        id,
                        vocab: self.vocab,
                    });
                }
            }
            if full || row.answer.iter().any(|&a| a) {
                if by_record[row.record].is_empty() {
                    order.push(row.record);
                }
                by_record[row.record].push(r);
            }
        }
        let mut lay = Layout {
            n: 0,
            pos: Vec::new(),
            token: Vec::new(),
            blocks: Vec::new(),
            groups: Vec::new(),
            targets: Vec::new(),
            rows_at: vec![(0, 0, 0); rows.len()],
        };
        let mut p_off = 0;
        let mut group = |lay: &mut Layout, qs: usize, qn: usize, ss: usize, sn: usize| {
            let g = Group {
                qs,
                qn,
                ss,
                sn,
                causal: true,
                p_off,
            };
            p_off += g.per_head() * self.heads;
            lay.groups.push(g);
        };
        for rec in order {
            let start = lay.n;
            lay.blocks.push((start, rec));
            for p in 0..v {
                lay.pos.push(p);
                lay.token.push(None);
            }
            lay.n += v;
            group(&mut lay, start, v, 0, 0);
            for &r in &by_record[rec] {
                let row = rows[r];
                // Tokens after the last answer token are never read by a loss term.
                let last = match full {
                    true => row.ids.len(),
                    false => row.answer.iter().rposition(|&a| a).expect("has an answer"),
                };
                let qs = lay.n;
                lay.rows_at[r] = (start, qs, last);
                for j in 0..last {
                    lay.pos.push(v + j);
                    lay.token.push(Some(row.ids[j] as usize));
                }
                lay.n += last;
                for (i, _) in row.answer.iter().enumerate().filter(|(_, a)| **a) {
                    // Position v - 1 + i predicts text token i.
                    let src = if i == 0 { start + v - 1 } else { qs + i - 1 };
                    lay.targets.push((src, row.ids[i] as usize));
                }
                group(&mut lay, qs, last, start, v);
            }
        }
        if lay.targets.is_empty() && !full {
            return Err(FusedError::NoAnswer);
        }
        Ok(lay)
    }

    /// The SFT loss of a batch and its gradients: `visual` holds the frozen encoder's tokens
    /// of `records` records (`[records, v, d_vision]`), each row a text about one of them.
    ///
    /// # Errors
    /// A row naming a missing record, an id outside the vocabulary, a text longer than the
    /// position table, or a batch without answer tokens.
    pub fn step(&self, visual: &[f32], rows: &[LmRow<'_>]) -> Result<FusedStep, FusedError> {
        let (v, d, dv) = (self.n_visual, self.d, self.dv);
        if dv == 0 || v == 0 || !visual.len().is_multiple_of(v * dv) {
            return Err(FusedError::Visual(format!(
                "{} values are not a whole number of {v} x {dv} records",
                visual.len()
            )));
        }
        let records = visual.len() / (v * dv);
        let lay = self.layout(records, rows, false)?;
        let n = lay.n;
        let mut grads = vec![0.0f32; self.values.len()];

        // Embeddings: projected visual tokens and token embeddings, plus positions.
        let mut vis = Vec::with_capacity(lay.blocks.len() * v * dv);
        for &(_, rec) in &lay.blocks {
            vis.extend_from_slice(&visual[rec * v * dv..(rec + 1) * v * dv]);
        }
        let mut x = self.embed(&lay, &vis);

        let mut acts = Vec::with_capacity(self.layers.len());
        for ls in &self.layers {
            acts.push(self.layer_forward(ls, self.lm_dims(), &lay, &mut x));
        }

        // Final norm at the rows that predict answer tokens, head, cross-entropy.
        let m = lay.targets.len();
        let mut hsrc = vec![0.0f32; m * d];
        for (t, &(src, _)) in lay.targets.iter().enumerate() {
            hsrc[t * d..(t + 1) * d].copy_from_slice(&x[src * d..(src + 1) * d]);
        }
        let (ng, nbeta) = self.norm;
        let (xhat_f, inv_f, hf) = ln_forward(&hsrc, self.p(ng), self.p(nbeta));
        let vocab = self.vocab;
        let mut logits = vec![0.0f32; m * vocab];
        mm(
            &mut logits,
            View::rm(m, vocab, vocab, 0),
            &hf,
            View::rm(m, d, d, 0),
            self.p(self.head),
            View::rm(d, vocab, vocab, 0),
            false,
        );
        let mut loss = 0.0f64;
        let inv_m = 1.0 / m as f32;
        for (t, &(_, target)) in lay.targets.iter().enumerate() {
            let row = &mut logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            for z in row.iter_mut() {
                *z = exp(*z - max);
                sum += *z;
            }
            loss += f64::from(sum.ln()) - f64::from((row[target]).ln());
            let k = inv_m / sum;
            for z in row.iter_mut() {
                *z *= k;
            }
            row[target] -= inv_m;
        }
        loss /= m as f64;
        // `logits` now holds d loss / d logits.
        let slot = &self.slots[self.head];
        mm(
            &mut grads[slot.off..slot.off + slot.len],
            View::rm(d, vocab, vocab, 0),
            &hf,
            View::rm(m, d, d, 0).t(),
            &logits,
            View::rm(m, vocab, vocab, 0),
            false,
        );
        let mut dhf = vec![0.0f32; m * d];
        mm(
            &mut dhf,
            View::rm(m, d, d, 0),
            &logits,
            View::rm(m, vocab, vocab, 0),
            self.p(self.head),
            View::rm(d, vocab, vocab, 0).t(),
            false,
        );
        let mut dsrc = vec![0.0f32; m * d];
        {
            let (dg, db) = self.two_grads(&mut grads, ng, nbeta);
            ln_backward(&dhf, &xhat_f, &inv_f, self.p(ng), dg, db, &mut dsrc);
        }
        let mut dx = vec![0.0f32; n * d];
        for (t, &(src, _)) in lay.targets.iter().enumerate() {
            for (o, &g) in dx[src * d..(src + 1) * d]
                .iter_mut()
                .zip(&dsrc[t * d..(t + 1) * d])
            {
                *o += g;
            }
        }

        for (ls, a) in self.layers.iter().zip(&acts).rev() {
            self.layer_backward(ls, self.lm_dims(), &lay, a, &mut dx, &mut grads);
        }

        self.embed_backward(&lay, &vis, &dx, &mut grads);
        Ok(FusedStep { loss, grads })
    }

    /// Mutable gradient slices of two different slots.
    fn two_grads<'g>(
        &self,
        grads: &'g mut [f32],
        a: usize,
        b: usize,
    ) -> (&'g mut [f32], &'g mut [f32]) {
        let (sa, sb) = (&self.slots[a], &self.slots[b]);
        assert!(sa.off + sa.len <= sb.off, "slots in order");
        let (lo, hi) = grads.split_at_mut(sb.off);
        (&mut lo[sa.off..sa.off + sa.len], &mut hi[..sb.len])
    }

    /// One decoder layer on `x` (in place), keeping what its backward pass needs.
    fn layer_forward(&self, ls: &LayerSlots, dims: Dims, lay: &Layout, x: &mut [f32]) -> LayerActs {
        let (n, d, ff, heads) = (lay.n, dims.d, dims.ff, dims.heads);
        let (xhat1, inv1, h1) = ln_forward(x, self.p(ls.ln_attn.0), self.p(ls.ln_attn.1));
        let mut qkv = vec![0.0f32; n * 3 * d];
        for (part, (w, b)) in [ls.q, ls.k, ls.v].into_iter().enumerate() {
            mm(
                &mut qkv,
                View::rm(n, d, 3 * d, part * d),
                &h1,
                View::rm(n, d, d, 0),
                self.p(w),
                View::rm(d, d, d, 0),
                false,
            );
            let bias = self.p(b);
            for row in qkv.chunks_exact_mut(3 * d) {
                for (o, &bv) in row[part * d..(part + 1) * d].iter_mut().zip(bias) {
                    *o += bv;
                }
            }
        }
        let total_p = lay
            .groups
            .last()
            .map_or(0, |g| g.p_off + g.per_head() * heads);
        let mut p = vec![0.0f32; total_p];
        let mut ctx = vec![0.0f32; n * d];
        attention_forward(&qkv, lay, d, heads, &mut p, &mut ctx);
        let att = self.linear(ls.o, &ctx, n);
        for (a, b) in x.iter_mut().zip(&att) {
            *a += b;
        }
        let (xhat2, inv2, h2) = ln_forward(x, self.p(ls.ln_ffn.0), self.p(ls.ln_ffn.1));
        let pre = self.linear(ls.inner, &h2, n);
        let mut act = vec![0.0f32; n * ff];
        gelu_forward(&pre, &mut act);
        let out = self.linear(ls.outer, &act, n);
        for (a, b) in x.iter_mut().zip(&out) {
            *a += b;
        }
        LayerActs {
            xhat1,
            inv1,
            h1,
            qkv,
            p,
            ctx,
            xhat2,
            inv2,
            h2,
            pre,
            act,
        }
    }

    /// d loss / d input `dy[n, out] W^T` of the linear layer with weight slot `w`.
    fn linear_dx(&self, w: usize, dy: &[f32], n: usize) -> Vec<f32> {
        let (din, dout) = (self.slots[w].shape[0], self.slots[w].shape[1]);
        assert_eq!(dy.len(), n * dout, "linear layer output of width {dout}");
        let mut dx = vec![0.0f32; n * din];
        mm(
            &mut dx,
            View::rm(n, din, din, 0),
            dy,
            View::rm(n, dout, dout, 0),
            self.p(w),
            View::rm(din, dout, dout, 0).t(),
            false,
        );
        dx
    }

    /// `x[n, in] W + b` for the linear layer in slots `(w, b)` (`W` stored `[in, out]`):
    /// [`FusedLm::linear_grads`]'s forward pass.
    fn linear(&self, (w, b): (usize, usize), x: &[f32], n: usize) -> Vec<f32> {
        let (din, dout) = (self.slots[w].shape[0], self.slots[w].shape[1]);
        assert_eq!(x.len(), n * din, "linear layer input of width {din}");
        let mut y = vec![0.0f32; n * dout];
        mm(
            &mut y,
            View::rm(n, dout, dout, 0),
            x,
            View::rm(n, din, din, 0),
            self.p(w),
            View::rm(din, dout, dout, 0),
            false,
        );
        add_bias(&mut y, self.p(b));
        y
    }

    /// Weight gradient `dW (+)= x^T dy` and bias gradient for a linear layer `(w, b)` whose
    /// input is `x[n, din]` and output gradient `dy` (a view of `n x dout`).
    #[allow(clippy::too_many_arguments)] // the two operands as slices with their views
    fn linear_grads(
        &self,
        grads: &mut [f32],
        (w, b): (usize, usize),
        x: &[f32],
        n: usize,
        dy: &[f32],
        dy_view: View,
    ) {
        let (din, dout) = (self.slots[w].shape[0], self.slots[w].shape[1]);
        let (gw, gb) = self.two_grads(grads, w, b);
        mm(
            gw,
            View::rm(din, dout, dout, 0),
            x,
            View::rm(n, din, din, 0).t(),
            dy,
            dy_view,
            false,
        );
        col_sums(gb, dy, n, dy_view.rs, dy_view.off);
    }

    /// One decoder layer backwards: `dx` holds d loss / d output and becomes d loss / d input.
    fn layer_backward(
        &self,
        ls: &LayerSlots,
        dims: Dims,
        lay: &Layout,
        a: &LayerActs,
        dx: &mut [f32],
        grads: &mut [f32],
    ) {
        let (n, d, ff, heads) = (lay.n, dims.d, dims.ff, dims.heads);
        // MLP: out = gelu(h2 W1 + b1) W2 + b2, added to the stream.
        self.linear_grads(grads, ls.outer, &a.act, n, dx, View::rm(n, d, d, 0));
        let mut dpre = self.linear_dx(ls.outer.0, dx, n);
        gelu_backward(&a.pre, &mut dpre);
        self.linear_grads(grads, ls.inner, &a.h2, n, &dpre, View::rm(n, ff, ff, 0));
        let mut dh = self.linear_dx(ls.inner.0, &dpre, n);
        {
            let (dg, db) = self.two_grads(grads, ls.ln_ffn.0, ls.ln_ffn.1);
            ln_backward(&dh, &a.xhat2, &a.inv2, self.p(ls.ln_ffn.0), dg, db, dx);
        }
        // Attention: att = ctx Wo + bo, added to the stream.
        self.linear_grads(grads, ls.o, &a.ctx, n, dx, View::rm(n, d, d, 0));
        let dctx = self.linear_dx(ls.o.0, dx, n);
        let mut dqkv = vec![0.0f32; n * 3 * d];
        attention_backward(&a.qkv, &a.p, &dctx, lay, d, heads, &mut dqkv);
        for (part, wb) in [ls.q, ls.k, ls.v].into_iter().enumerate() {
            self.linear_grads(grads, wb, &a.h1, n, &dqkv, View::rm(n, d, 3 * d, part * d));
            mm(
                &mut dh,
                View::rm(n, d, d, 0),
                &dqkv,
                View::rm(n, d, 3 * d, part * d),
                self.p(wb.0),
                View::rm(d, d, d, 0).t(),
                part > 0,
            );
        }
        let (dg, db) = self.two_grads(grads, ls.ln_attn.0, ls.ln_attn.1);
        ln_backward(&dh, &a.xhat1, &a.inv1, self.p(ls.ln_attn.0), dg, db, dx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vlm::{EcgVlmConfig, InputKind};
    use burn::tensor::{Bool, Distribution, Int, activation};

    fn model(layers: usize, heads: usize) -> (EcgVlm, Device) {
        let device = Device::flex().autodiff();
        device.seed(7);
        let cfg = EcgVlmConfig::new(
            InputKind::Signal {
                leads: 12,
                samples: 200,
                patch: 20,
            },
            16,
            1,
            2,
            24 * heads / 2,
            layers,
            heads,
            30,
            16 + 20 * (heads / 4),
        );
        (cfg.init(&device), device)
    }

    /// Every parameter's gradient in `step` equals burn's in `grads`, within 2e-4 of the
    /// parameter's largest gradient entry (at least `floor`).
    fn assert_grads(
        fused: &FusedLm,
        step: &FusedStep,
        grads: &GradientsParams,
        floor: f32,
        what: &str,
    ) {
        for s in &fused.slots {
            let want: Vec<f32> = match s.shape.len() {
                1 => grads
                    .get::<1>(s.id)
                    .unwrap()
                    .into_data()
                    .try_to_vec()
                    .unwrap(),
                2 => grads
                    .get::<2>(s.id)
                    .unwrap()
                    .into_data()
                    .try_to_vec()
                    .unwrap(),
                _ => grads
                    .get::<4>(s.id)
                    .unwrap()
                    .into_data()
                    .try_to_vec()
                    .unwrap(),
            };
            let got = fused.gradient_of(step, s.id).unwrap();
            let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs())).max(floor);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-4 * scale,
                    "{what}: parameter {:?} at {}, element {i}: fused {g} vs autodiff {w}",
                    s.shape,
                    s.off
                );
            }
        }
    }

    /// A padded batch as burn reads it: each row's record's input (a row of `per_record`),
    /// ids padded with 0, padding and answer masks.
    fn padded(
        rows: &[(usize, Vec<i64>, Vec<bool>)],
        per_record: &Tensor<3>,
        device: &Device,
    ) -> (Tensor<3>, Tensor<2, Int>, Tensor<2, Bool>, Tensor<2, Bool>) {
        let b = rows.len();
        let t = rows.iter().map(|r| r.1.len()).max().unwrap();
        let (mut ids, mut pad, mut ans) = (Vec::new(), Vec::new(), Vec::new());
        for (_, i, a) in rows {
            for k in 0..t {
                ids.push(i.get(k).copied().unwrap_or(0));
                pad.push(k >= i.len());
                ans.push(a.get(k).copied().unwrap_or(false));
            }
        }
        let recs: Vec<i64> = rows.iter().map(|r| r.0 as i64).collect();
        let x = per_record.clone().select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(recs, [b]), device),
        );
        (
            x,
            Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), device),
            Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, t]), device),
            Tensor::<2, Bool>::from_data(TensorData::new(ans, [b, t]), device),
        )
    }

    /// The answer-token cross-entropy of `logits` `[b, t, vocab]` as burn computes it.
    fn answer_ce(logits: Tensor<3>, text: Tensor<2, Int>, ans: Tensor<2, Bool>) -> Tensor<1> {
        let [b, t, _] = logits.dims();
        let nll = activation::log_softmax(logits, 2)
            .gather(2, text.reshape([b, t, 1]))
            .reshape([b, t])
            .neg();
        crate::ops::masked_mean(nll, ans)
    }

    /// burn's loss of the same batch: rows padded with id 0, visual tokens per row, the
    /// model's own forward pass and the answer-token cross-entropy.
    fn burn_loss(
        m: &EcgVlm,
        visual: &Tensor<3>,
        rows: &[(usize, Vec<i64>, Vec<bool>)],
        device: &Device,
    ) -> Tensor<1> {
        let (vis, text, pad, ans) = padded(rows, visual, device);
        let logits = m.view_from_visual(vis, text.clone(), pad, None).logits;
        answer_ce(logits, text, ans)
    }

    fn check(layers: usize, heads: usize, rows: &[(usize, Vec<i64>, Vec<bool>)]) {
        let (m, device) = model(layers, heads);
        let visual = Tensor::<3>::random([3, 10, 16], Distribution::Normal(0.0, 1.0), &device);
        let vis_host: Vec<f32> = visual.clone().into_data().try_to_vec().unwrap();
        let loss = burn_loss(&m, &visual, rows, &device);
        let want_loss: f32 = loss.clone().into_data().try_to_vec::<f32>().unwrap()[0];
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let fused = FusedLm::from_model(&m);
        let lm_rows: Vec<LmRow<'_>> = rows
            .iter()
            .map(|(r, i, a)| LmRow {
                record: *r,
                ids: i,
                answer: a,
            })
            .collect();
        let step = fused.step(&vis_host, &lm_rows).unwrap();
        assert!(
            (step.loss - f64::from(want_loss)).abs() < 1e-5,
            "loss {} vs {want_loss}",
            step.loss
        );
        assert_grads(&fused, &step, &grads, 1e-3, "SFT");
    }

    /// The loss and every gradient equal burn's autodiff of the padded batch: several
    /// questions about one record (a shared prefix), texts of different lengths, a row
    /// without answer tokens, text after the last answer token, and an answer at the first
    /// text position (predicted from the last visual position).
    #[test]
    fn fused_step_matches_autodiff() {
        let rows = vec![
            (
                0,
                vec![1, 5, 6, 7, 8, 2],
                vec![false, false, false, true, true, true],
            ),
            (2, vec![1, 9, 10, 2], vec![false, false, true, false]),
            (
                0,
                vec![1, 5, 11, 12, 2],
                vec![false, false, true, true, true],
            ),
            (1, vec![3, 4, 2], vec![true, false, true]),
            (0, vec![1, 13, 2], vec![false; 3]),
            (2, vec![1, 14, 15, 16, 17, 18, 19, 2], {
                let mut a = vec![false; 8];
                a[4] = true;
                a[7] = true;
                a
            }),
        ];
        check(2, 2, &rows);
        check(1, 3, &rows);
        // Longer texts, as the character-level student's, at a larger width.
        let long: Vec<_> = rows
            .iter()
            .map(|(r, ids, a)| {
                let n = ids.len() * 4;
                let ids: Vec<i64> = (0..n)
                    .map(|i| ids[i % ids.len()] + (i / 7) as i64)
                    .collect();
                let a: Vec<bool> = (0..n).map(|i| a[i % a.len()] && i > n / 2).collect();
                (*r, ids, a)
            })
            .collect();
        check(2, 4, &long);
    }

    /// The view pass (every output distillation reads) and its backward pass equal burn's
    /// `view_layer` and autodiff, with the encoder learning from raw signals, for hidden
    /// states after the final norm and at inner layers. The loss is a fixed random linear
    /// function of every output at the positions a row has (burn fills the rest from padding).
    #[test]
    fn view_pass_matches_autodiff() {
        let rows: Vec<(usize, Vec<i64>, Vec<bool>)> = vec![
            (
                1,
                vec![1, 5, 6, 7, 8, 2],
                vec![false, false, false, true, true, true],
            ),
            (0, vec![1, 9, 10, 2], vec![false, false, true, false]),
            (1, vec![1, 5, 11], vec![false; 3]),
            (2, vec![3, 4, 2, 7, 7, 7, 7, 9], vec![true; 8]),
        ];
        for layer in [None, Some(0), Some(1), Some(2)] {
            let (m, device) = model(2, 2);
            let (b, leads, samples) = (rows.len(), 12, 200);
            let signals =
                Tensor::<3>::random([3, leads, samples], Distribution::Normal(0.0, 1.0), &device);
            let sig_host: Vec<f32> = signals.clone().into_data().try_to_vec().unwrap();
            let t = rows.iter().map(|r| r.1.len()).max().unwrap();
            let (px, text, padt, _) = padded(&rows, &signals, &device);
            let view = m.view_layer(px, text, padt, layer);
            let (v, d, dv, vocab) = (10, 24, 16, 30);
            // Random weights, zero where a row has no position.
            let weights = |len: usize, per_pos: usize, valid: &dyn Fn(usize, usize) -> bool| {
                let mut rng = 0x2545_f491_4f6c_dd1du64.wrapping_add(len as u64);
                (0..len)
                    .map(|k| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let pos = k / per_pos;
                        let (r, i) = (pos / t.max(1), pos % t.max(1));
                        if valid(r, i) {
                            (rng % 2001) as f32 / 1000.0 - 1.0
                        } else {
                            0.0
                        }
                    })
                    .collect::<Vec<f32>>()
            };
            let all = |_: usize, _: usize| true;
            let wv = weights(b * v * dv, 1, &all);
            let wh = weights(b * t * d, d, &|r, i| i < rows[r].1.len());
            let wl = weights(b * t * vocab, vocab, &|r, i| i <= rows[r].1.len());
            let wvh = weights(b * v * d, 1, &all);
            let whd = weights(d * vocab, 1, &all);
            let dot3 = |x: Tensor<3>, w: &[f32]| {
                let dims = x.dims();
                (x * Tensor::<3>::from_data(TensorData::new(w.to_vec(), dims), &device)).sum()
            };
            let loss = dot3(view.visual.clone(), &wv)
                + dot3(view.hidden.clone(), &wh)
                + dot3(view.logits.clone(), &wl)
                + dot3(view.visual_hidden.clone(), &wvh)
                + (view.head.clone()
                    * Tensor::<2>::from_data(TensorData::new(whd.clone(), [d, vocab]), &device))
                .sum();
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let fused = FusedLm::with_encoder(&m).unwrap();
            let lm_rows: Vec<LmRow<'_>> = rows
                .iter()
                .map(|(r, i, a)| LmRow {
                    record: *r,
                    ids: i,
                    answer: a,
                })
                .collect();
            let (out, tape) = fused
                .view_forward(ViewInput::Raw(&sig_host), &lm_rows, layer)
                .unwrap();
            let host = |x: Tensor<3>| -> Vec<f32> { x.into_data().try_to_vec().unwrap() };
            let close = |what: &str, got: &[f32], want: &[f32], w: &[f32]| {
                assert_eq!(got.len(), want.len(), "{what}");
                for (k, ((g, x), w)) in got.iter().zip(want).zip(w).enumerate() {
                    if *w != 0.0 {
                        assert!(
                            (g - x).abs() < 2e-4 * (1.0 + x.abs()),
                            "{what}[{k}]: {g} vs {x}"
                        );
                    }
                }
            };
            close("visual", &out.visual, &host(view.visual), &wv);
            close("hidden", &out.hidden, &host(view.hidden), &wh);
            close("logits", &out.logits, &host(view.logits), &wl);
            close(
                "visual_hidden",
                &out.visual_hidden,
                &host(view.visual_hidden),
                &wvh,
            );
            let step = fused.view_backward(
                &tape,
                ViewGrads {
                    visual: Some(&wv),
                    hidden: Some(&wh),
                    logits: Some(&wl),
                    visual_hidden: Some(&wvh),
                    head: Some(&whd),
                },
            );
            assert!(fused.slots.iter().filter(|s| s.train).count() > 30);
            // The floor covers the key bias, whose gradient is zero in exact arithmetic (a
            // softmax does not move when every score of a query moves by the same amount).
            assert_grads(&fused, &step, &grads, 1e-2, &format!("layer {layer:?}"));
        }
    }

    /// SFT with the encoder learning from signals equals burn's `view_layer`, answer-token
    /// cross-entropy and autodiff.
    #[test]
    fn signal_sft_step_matches_autodiff() {
        let (m, device) = model(2, 2);
        let signals = Tensor::<3>::random([3, 12, 200], Distribution::Normal(0.0, 1.0), &device);
        sft_from_input_matches_autodiff(&m, &signals, &device);
    }

    /// The same for an image encoder with its convolutional stem (the teacher's kind), the
    /// page cropped to whole patches (64 x 84 -> 64 x 80).
    #[test]
    fn image_sft_step_matches_autodiff() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let cfg = EcgVlmConfig::new(
            InputKind::Image {
                height: 64,
                width: 84,
                patch: 16,
            },
            16,
            1,
            2,
            24,
            2,
            2,
            30,
            16,
        )
        .with_stem_channels(8);
        let mut m = cfg.init(&device);
        // Group norms start as the identity (gamma 1, beta 0); other values make every
        // affine term count.
        let stem = m.image_stem.as_mut().expect("a stem");
        for n in &mut stem.norms {
            let c = n.num_channels;
            let (g, b) = (
                Tensor::<1>::random([c], Distribution::Uniform(0.5, 1.5), &device),
                Tensor::<1>::random([c], Distribution::Uniform(-0.5, 0.5), &device),
            );
            n.gamma = Some(Param::from_tensor(g));
            n.beta = Some(Param::from_tensor(b));
        }
        assert!(FusedLm::covers_encoder(&m));
        let pages = Tensor::<3>::random([3, 1, 64 * 84], Distribution::Uniform(0.0, 1.0), &device);
        sft_from_input_matches_autodiff(&m, &pages, &device);
    }

    fn sft_from_input_matches_autodiff(m: &EcgVlm, per_record: &Tensor<3>, device: &Device) {
        let rows: Vec<(usize, Vec<i64>, Vec<bool>)> = vec![
            (
                1,
                vec![1, 5, 6, 7, 8, 2],
                vec![false, false, false, true, true, true],
            ),
            (0, vec![1, 9, 10, 2], vec![false, false, true, false]),
            (1, vec![1, 5, 11], vec![false; 3]),
            (2, vec![3, 4, 2, 7, 9], vec![true, false, true, true, false]),
        ];
        let sig_host: Vec<f32> = per_record.clone().into_data().try_to_vec().unwrap();
        let (px, text, padt, anst) = padded(&rows, per_record, device);
        let logits = m.view_layer(px, text.clone(), padt, None).logits;
        let loss = answer_ce(logits, text, anst);
        let want_loss: f32 = loss.clone().into_data().try_to_vec::<f32>().unwrap()[0];
        let grads = GradientsParams::from_grads(loss.backward(), m);
        let fused = FusedLm::with_encoder(m).unwrap();
        let lm_rows: Vec<LmRow<'_>> = rows
            .iter()
            .map(|(r, i, a)| LmRow {
                record: *r,
                ids: i,
                answer: a,
            })
            .collect();
        let step = fused.step_from_input(&sig_host, &lm_rows).unwrap();
        assert!((step.loss - f64::from(want_loss)).abs() < 1e-5);
        assert_grads(&fused, &step, &grads, 1e-3, "SFT");
        // A frozen encoder: no gradient registered for it, the rest unchanged.
        let frozen = FusedLm::with_encoder(&m.clone().with_vision_trainable(false)).unwrap();
        let step2 = frozen.step_from_input(&sig_host, &lm_rows).unwrap();
        let g = frozen.gradients(&step2, 1.0, &Device::flex());
        assert_eq!(g.len(), frozen.slots.iter().filter(|s| s.train).count());
        assert!(g.len() < fused.slots.len());
    }

    #[test]
    fn bad_rows_are_named() {
        let (m, _) = model(1, 2);
        let f = FusedLm::from_model(&m);
        let vis = vec![0.0f32; 2 * 10 * 16];
        let ok = [1i64, 2];
        let yes = [false, true];
        let row = |record, ids: &'static [i64], answer: &'static [bool]| LmRow {
            record,
            ids,
            answer,
        };
        assert!(matches!(
            f.step(&vis, &[row(2, &[1, 2], &[false, true])]),
            Err(FusedError::Record { record: 2, .. })
        ));
        assert!(matches!(
            f.step(&vis, &[row(0, &[1, 40], &[false, true])]),
            Err(FusedError::Token { id: 40, .. })
        ));
        assert!(matches!(
            f.step(&vis, &[row(0, &[1, 2], &[false])]),
            Err(FusedError::Row { .. })
        ));
        assert_eq!(
            f.step(&vis, &[row(0, &[1, 2], &[false, false])])
                .unwrap_err(),
            FusedError::NoAnswer
        );
        assert!(matches!(
            f.step(
                &vis[1..],
                &[LmRow {
                    record: 0,
                    ids: &ok,
                    answer: &yes
                }]
            ),
            Err(FusedError::Visual(_))
        ));
        let long: Vec<i64> = vec![1; 17];
        let mask = vec![true; 17];
        assert!(matches!(
            f.step(
                &vis,
                &[LmRow {
                    record: 0,
                    ids: &long,
                    answer: &mask
                }]
            ),
            Err(FusedError::Row { .. })
        ));
    }
}
