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

use burn::module::{Param, ParamId};
use burn::nn::{LayerNorm, Linear};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

use crate::native::{dot, exp, gelu_and_grad, sum8};
use crate::vlm::EcgVlm;

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
    leads: usize,
    samples: usize,
    patch: usize,
    /// Some encoder parameter learns (else its backward pass is skipped).
    train: bool,
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

/// A view of a row-major (or transposed) matrix inside a slice: element `(i, j)` at
/// `off + i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
struct View {
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    off: usize,
}

impl View {
    /// Row-major `rows x cols` at `off` with row stride `rs`.
    fn rm(rows: usize, cols: usize, rs: usize, off: usize) -> View {
        View {
            rows,
            cols,
            rs,
            cs: 1,
            off,
        }
    }
    /// The transpose.
    fn t(self) -> View {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            off: self.off,
        }
    }
    /// The largest index read plus one (0 for an empty view).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.off;
        }
        self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
    }
}

/// `C = A B` (or `C += A B` with `acc`) for matrices given as [`View`]s into slices, by the
/// `gemm` crate (both cores when called outside a rayon task).
///
/// # Panics
/// When the shapes do not chain or a view reaches past its slice.
fn mm(c: &mut [f32], cv: View, a: &[f32], av: View, b: &[f32], bv: View, acc: bool) {
    assert!(
        av.rows == cv.rows && av.cols == bv.rows && bv.cols == cv.cols,
        "matrix product {}x{} by {}x{} into {}x{}",
        av.rows,
        av.cols,
        bv.rows,
        bv.cols,
        cv.rows,
        cv.cols
    );
    assert!(cv.end() <= c.len() && av.end() <= a.len() && bv.end() <= b.len());
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    if av.cols == 0 {
        if !acc {
            for i in 0..cv.rows {
                for j in 0..cv.cols {
                    c[cv.off + i * cv.rs + j * cv.cs] = 0.0;
                }
            }
        }
        return;
    }
    let par = if rayon::current_thread_index().is_some() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // SAFETY: `gemm` reads `av.rows x av.cols` elements of A at `a + off + i * rs + j * cs`,
    // likewise B, and reads (with `acc`) and writes `cv.rows x cv.cols` of C. The assertions
    // above keep every such offset inside its slice (strides are non-negative, so the largest
    // offset is `end() - 1`). C is borrowed mutably, so it aliases neither A nor B; with
    // `acc = false` C's old contents are not read.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            cv.rows,
            cv.cols,
            av.cols,
            c.as_mut_ptr().add(cv.off),
            cv.cs as isize,
            cv.rs as isize,
            acc,
            a.as_ptr().add(av.off),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr().add(bv.off),
            bv.cs as isize,
            bv.rs as isize,
            if acc { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y[r, :] += b` for every row.
fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (o, &v) in row.iter_mut().zip(b) {
            *o += v;
        }
    }
}

/// `g += sum over rows of x` (the gradient of a bias), rows of width `g.len()` at row stride
/// `rs` starting at `off`.
fn col_sums(g: &mut [f32], x: &[f32], rows: usize, rs: usize, off: usize) {
    let w = g.len();
    for r in 0..rows {
        let row = &x[off + r * rs..off + r * rs + w];
        for (o, &v) in g.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// LayerNorm (eps 1e-5, biased variance, as burn's) of rows of width `g.len()`: returns
/// `(x_hat, 1 / std, y)`.
fn ln_forward(x: &[f32], g: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = g.len();
    let n = x.len() / d;
    let mut xhat = vec![0.0f32; x.len()];
    let mut inv = vec![0.0f32; n];
    let mut y = vec![0.0f32; x.len()];
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let mean = sum8(xr, 0.0, false) / d as f32;
        let var = sum8(xr, mean, true) / d as f32;
        let s = 1.0 / (var + 1e-5).sqrt();
        inv[r] = s;
        let (hr, yr) = (&mut xhat[r * d..(r + 1) * d], &mut y[r * d..(r + 1) * d]);
        for i in 0..d {
            let h = (xr[i] - mean) * s;
            hr[i] = h;
            yr[i] = h * g[i] + b[i];
        }
    }
    (xhat, inv, y)
}

/// LayerNorm's backward pass: from `dy`, adds the gradients of gamma and beta to `dg`, `db`
/// and `d x` to `dx`.
fn ln_backward(
    dy: &[f32],
    xhat: &[f32],
    inv: &[f32],
    g: &[f32],
    dg: &mut [f32],
    db: &mut [f32],
    dx: &mut [f32],
) {
    let d = g.len();
    let mut dh = vec![0.0f32; d];
    for (r, &s) in inv.iter().enumerate() {
        let (dyr, hr) = (&dy[r * d..(r + 1) * d], &xhat[r * d..(r + 1) * d]);
        for i in 0..d {
            dg[i] += dyr[i] * hr[i];
            db[i] += dyr[i];
            dh[i] = dyr[i] * g[i];
        }
        let m1 = sum8(&dh, 0.0, false) / d as f32;
        let m2 = dot(&dh, hr) / d as f32;
        let dxr = &mut dx[r * d..(r + 1) * d];
        for i in 0..d {
            dxr[i] += s * (dh[i] - m1 - hr[i] * m2);
        }
    }
}

/// `y += a x` on SIMD lanes.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
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

/// A parameter on the host: id, shape, values, trainable.
type HostParam = (ParamId, Vec<usize>, Vec<f32>, bool);

fn host<const D: usize>(p: &Param<Tensor<D>>) -> HostParam {
    let t = p.val();
    let shape = t.dims().to_vec();
    let v = t
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("float parameter");
    (p.id, shape, v, p.is_require_grad())
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
    /// ([`FusedLm::view_forward`] with [`ViewInput::Signals`]). `None` when the encoder is not
    /// one these kernels cover: they cover a signal read in windows without a convolutional
    /// stem (the built-in student); image encoders and stems stay on burn.
    pub fn with_encoder(model: &EcgVlm) -> Option<FusedLm> {
        FusedLm::covers_encoder(model).then(|| FusedLm::build(model, true))
    }

    /// Whether [`FusedLm::with_encoder`] covers `model`'s encoder (a signal read in windows,
    /// no stem), without copying anything.
    pub fn covers_encoder(model: &EcgVlm) -> bool {
        matches!(model.input(), crate::vlm::InputKind::Signal { .. })
            && model.stem.is_none()
            && model.image_stem.is_none()
    }

    fn build(model: &EcgVlm, encoder: bool) -> FusedLm {
        let mut values = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        let mut push = |(id, shape, v, train): HostParam| {
            slots.push(Slot {
                id,
                shape,
                off: values.len(),
                len: v.len(),
                train,
            });
            values.extend(v);
            slots.len() - 1
        };
        let enc = encoder.then(|| {
            let embed = lin(&mut push, &model.patch_embed);
            let pos = push(host(&model.vis_pos));
            let layers: Vec<LayerSlots> = model
                .vision
                .layers
                .iter()
                .map(|l| layer_slots(&mut push, l))
                .collect();
            let norm = norm(&mut push, &model.vis_norm);
            let (leads, samples, patch) = match model.input() {
                crate::vlm::InputKind::Signal {
                    leads,
                    samples,
                    patch,
                } => (leads, samples, patch),
                crate::vlm::InputKind::Image { .. } => unreachable!("checked by with_encoder"),
            };
            let first = model.vision.layers.first();
            (
                embed,
                pos,
                layers,
                norm,
                first.map_or(1, |l| l.mha.n_heads),
                leads,
                samples,
                patch,
            )
        });
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
        let enc = enc.map(
            |(embed, pos, layers, norm, heads, leads, samples, patch)| EncSlots {
                dims: Dims {
                    d: dv,
                    heads,
                    ff: layers.first().map_or(0, |l| slots[l.inner.0].shape[1]),
                },
                embed,
                pos,
                layers,
                norm,
                leads,
                samples,
                patch,
                train: slots[..projector.0].iter().any(|s| s.train),
            },
        );
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
                _ => out.register::<2>(s.id, Tensor::from_data(data, device)),
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
        let mut att = vec![0.0f32; n * d];
        mm(
            &mut att,
            View::rm(n, d, d, 0),
            &ctx,
            View::rm(n, d, d, 0),
            self.p(ls.o.0),
            View::rm(d, d, d, 0),
            false,
        );
        add_bias(&mut att, self.p(ls.o.1));
        for (a, b) in x.iter_mut().zip(&att) {
            *a += b;
        }
        let (xhat2, inv2, h2) = ln_forward(x, self.p(ls.ln_ffn.0), self.p(ls.ln_ffn.1));
        let mut pre = vec![0.0f32; n * ff];
        mm(
            &mut pre,
            View::rm(n, ff, ff, 0),
            &h2,
            View::rm(n, d, d, 0),
            self.p(ls.inner.0),
            View::rm(d, ff, ff, 0),
            false,
        );
        add_bias(&mut pre, self.p(ls.inner.1));
        let mut act = vec![0.0f32; n * ff];
        gelu_forward(&pre, &mut act);
        let mut out = vec![0.0f32; n * d];
        mm(
            &mut out,
            View::rm(n, d, d, 0),
            &act,
            View::rm(n, ff, ff, 0),
            self.p(ls.outer.0),
            View::rm(ff, d, d, 0),
            false,
        );
        add_bias(&mut out, self.p(ls.outer.1));
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
        let mut dpre = vec![0.0f32; n * ff];
        mm(
            &mut dpre,
            View::rm(n, ff, ff, 0),
            dx,
            View::rm(n, d, d, 0),
            self.p(ls.outer.0),
            View::rm(ff, d, d, 0).t(),
            false,
        );
        gelu_backward(&a.pre, &mut dpre);
        self.linear_grads(grads, ls.inner, &a.h2, n, &dpre, View::rm(n, ff, ff, 0));
        let mut dh = vec![0.0f32; n * d];
        mm(
            &mut dh,
            View::rm(n, d, d, 0),
            &dpre,
            View::rm(n, ff, ff, 0),
            self.p(ls.inner.0),
            View::rm(d, ff, ff, 0).t(),
            false,
        );
        {
            let (dg, db) = self.two_grads(grads, ls.ln_ffn.0, ls.ln_ffn.1);
            ln_backward(&dh, &a.xhat2, &a.inv2, self.p(ls.ln_ffn.0), dg, db, dx);
        }
        // Attention: att = ctx Wo + bo, added to the stream.
        self.linear_grads(grads, ls.o, &a.ctx, n, dx, View::rm(n, d, d, 0));
        let mut dctx = vec![0.0f32; n * d];
        mm(
            &mut dctx,
            View::rm(n, d, d, 0),
            dx,
            View::rm(n, d, d, 0),
            self.p(ls.o.0),
            View::rm(d, d, d, 0).t(),
            false,
        );
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

/// What the encoder side of a view pass reads.
#[derive(Debug, Clone, Copy)]
pub enum ViewInput<'a> {
    /// A frozen encoder's tokens, `[records, v, d_vision]`.
    Tokens(&'a [f32]),
    /// Signals `[records, leads, samples]` through the encoder, which learns
    /// ([`FusedLm::with_encoder`]).
    Signals(&'a [f32]),
}

/// The outputs of a view pass, as [`EcgVlm::view_layer`] returns them on a padded batch:
/// `rows` rows, `t` text positions (the longest row); positions past a row's end are zero
/// (burn computes them from padding; the losses mask them).
#[derive(Debug, Clone)]
pub struct ViewOut {
    /// Rows.
    pub rows: usize,
    /// Text positions.
    pub t: usize,
    /// Visual tokens `[rows, v, d_vision]`.
    pub visual: Vec<f32>,
    /// Hidden states at the text positions, at the layer asked `[rows, t, d]`.
    pub hidden: Vec<f32>,
    /// Next-token logits at the text positions `[rows, t, vocab]`.
    pub logits: Vec<f32>,
    /// Final hidden states at the visual positions `[rows, v, d]`.
    pub visual_hidden: Vec<f32>,
    /// The output head `[d, vocab]`.
    pub head: Vec<f32>,
}

/// Gradients of a loss with respect to a [`ViewOut`]'s tensors (`None`: the loss does not
/// read it).
#[derive(Debug, Clone, Copy, Default)]
pub struct ViewGrads<'a> {
    /// Of `visual`.
    pub visual: Option<&'a [f32]>,
    /// Of `hidden`.
    pub hidden: Option<&'a [f32]>,
    /// Of `logits`.
    pub logits: Option<&'a [f32]>,
    /// Of `visual_hidden`.
    pub visual_hidden: Option<&'a [f32]>,
    /// Of `head`.
    pub head: Option<&'a [f32]>,
}

/// The encoder's part of a view pass, kept for its backward pass.
struct EncTape {
    lay: Layout,
    patches: Vec<f32>,
    acts: Vec<LayerActs>,
    xhat: Vec<f32>,
    inv: Vec<f32>,
}

/// What a view pass keeps for [`FusedLm::view_backward`].
pub struct ViewTape {
    lay: Layout,
    enc: Option<EncTape>,
    /// The language model's visual input per record block `[blocks * v, d_vision]`.
    vis: Vec<f32>,
    acts: Vec<LayerActs>,
    xhat_f: Vec<f32>,
    inv_f: Vec<f32>,
    hf: Vec<f32>,
    layer: Option<usize>,
    /// Per logit row: (input row, text position, the layout row it is read from).
    lsrc: Vec<(usize, usize, usize)>,
    t: usize,
}

impl std::fmt::Debug for ViewTape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ViewTape({} rows, {} layers)",
            self.lay.n,
            self.acts.len()
        )
    }
}

impl FusedLm {
    /// The encoder's forward pass over each block's record: `signals[records, leads,
    /// samples]` -> tokens `[blocks * v, d_vision]`.
    fn encoder_forward(
        &self,
        enc: &EncSlots,
        blocks: &[(usize, usize)],
        signals: &[f32],
    ) -> (Vec<f32>, EncTape) {
        let (v, dv) = (self.n_visual, self.dv);
        let (leads, samples, patch) = (enc.leads, enc.samples, enc.patch);
        let pd = leads * patch;
        let nb = blocks.len();
        // Token p of a record reads window p of every lead: feature l * patch + k.
        let mut patches = vec![0.0f32; nb * v * pd];
        for (b, &(_, rec)) in blocks.iter().enumerate() {
            let sig = &signals[rec * leads * samples..(rec + 1) * leads * samples];
            for p in 0..v {
                let row = &mut patches[(b * v + p) * pd..(b * v + p + 1) * pd];
                for l in 0..leads {
                    row[l * patch..(l + 1) * patch].copy_from_slice(
                        &sig[l * samples + p * patch..l * samples + (p + 1) * patch],
                    );
                }
            }
        }
        let n = nb * v;
        let mut x = vec![0.0f32; n * dv];
        mm(
            &mut x,
            View::rm(n, dv, dv, 0),
            &patches,
            View::rm(n, pd, pd, 0),
            self.p(enc.embed.0),
            View::rm(pd, dv, dv, 0),
            false,
        );
        add_bias(&mut x, self.p(enc.embed.1));
        let pos = self.p(enc.pos);
        for row in x.chunks_exact_mut(v * dv) {
            for (o, &e) in row.iter_mut().zip(pos) {
                *o += e;
            }
        }
        // Every token sees every token of its record.
        let mut lay = Layout {
            n,
            pos: Vec::new(),
            token: Vec::new(),
            blocks: (0..nb).map(|b| (b * v, b)).collect(),
            groups: Vec::new(),
            targets: Vec::new(),
            rows_at: Vec::new(),
        };
        let mut p_off = 0;
        for b in 0..nb {
            let g = Group {
                qs: b * v,
                qn: v,
                ss: b * v,
                sn: v,
                causal: false,
                p_off,
            };
            p_off += g.per_head() * enc.dims.heads;
            lay.groups.push(g);
        }
        let acts = enc
            .layers
            .iter()
            .map(|ls| self.layer_forward(ls, enc.dims, &lay, &mut x))
            .collect();
        let (xhat, inv, y) = ln_forward(&x, self.p(enc.norm.0), self.p(enc.norm.1));
        (
            y,
            EncTape {
                lay,
                patches,
                acts,
                xhat,
                inv,
            },
        )
    }

    /// The encoder's backward pass from `dy`, d loss / d tokens `[blocks * v, d_vision]`.
    fn encoder_backward(&self, enc: &EncSlots, tape: &EncTape, dy: &[f32], grads: &mut [f32]) {
        let (v, dv) = (self.n_visual, self.dv);
        let n = tape.lay.n;
        let mut dx = vec![0.0f32; n * dv];
        {
            let (dg, db) = self.two_grads(grads, enc.norm.0, enc.norm.1);
            ln_backward(
                dy,
                &tape.xhat,
                &tape.inv,
                self.p(enc.norm.0),
                dg,
                db,
                &mut dx,
            );
        }
        for (ls, a) in enc.layers.iter().zip(&tape.acts).rev() {
            self.layer_backward(ls, enc.dims, &tape.lay, a, &mut dx, grads);
        }
        let s = &self.slots[enc.pos];
        let gpos = &mut grads[s.off..s.off + s.len];
        for row in dx.chunks_exact(v * dv) {
            for (o, &g) in gpos.iter_mut().zip(row) {
                *o += g;
            }
        }
        self.linear_grads(
            grads,
            enc.embed,
            &tape.patches,
            n,
            &dx,
            View::rm(n, dv, dv, 0),
        );
    }

    /// The forward pass of [`EcgVlm::view_layer`] (`input` = signals) or
    /// [`EcgVlm::view_from_visual`] (`input` = tokens), with hidden states at `layer`
    /// (`None` or the number of layers: after the final norm), keeping what
    /// [`FusedLm::view_backward`] needs. Rows about the same record share its prefix.
    ///
    /// # Errors
    /// As [`FusedLm::step`], and signals given to a model built without its encoder.
    pub fn view_forward(
        &self,
        input: ViewInput<'_>,
        rows: &[LmRow<'_>],
        layer: Option<usize>,
    ) -> Result<(ViewOut, ViewTape), FusedError> {
        let (v, d, dv, vocab) = (self.n_visual, self.d, self.dv, self.vocab);
        let n_layers = self.layers.len();
        let layer = layer.filter(|&k| k < n_layers);
        let per_record = match (input, &self.enc) {
            (ViewInput::Tokens(_), _) => v * dv,
            (ViewInput::Signals(_), Some(e)) => e.leads * e.samples,
            (ViewInput::Signals(_), None) => {
                return Err(FusedError::Visual(
                    "signals given, but the kernels were built without the encoder".into(),
                ));
            }
        };
        let data = match input {
            ViewInput::Tokens(x) | ViewInput::Signals(x) => x,
        };
        if per_record == 0 || !data.len().is_multiple_of(per_record) {
            return Err(FusedError::Visual(format!(
                "{} values are not a whole number of records of {per_record}",
                data.len()
            )));
        }
        let records = data.len() / per_record;
        let lay = self.layout(records, rows, true)?;
        let nb = lay.blocks.len();
        let (vis, enc) = match (input, &self.enc) {
            (ViewInput::Signals(sig), Some(e)) => {
                let (y, tape) = self.encoder_forward(e, &lay.blocks, sig);
                (y, Some(tape))
            }
            _ => {
                let mut vis = Vec::with_capacity(nb * v * dv);
                for &(_, rec) in &lay.blocks {
                    vis.extend_from_slice(&data[rec * v * dv..(rec + 1) * v * dv]);
                }
                (vis, None)
            }
        };
        let mut x = self.embed(&lay, &vis);
        let mut acts = Vec::with_capacity(n_layers);
        let mut at = None;
        for (i, ls) in self.layers.iter().enumerate() {
            if layer == Some(i) {
                at = Some(x.clone());
            }
            acts.push(self.layer_forward(ls, self.lm_dims(), &lay, &mut x));
        }
        let (ng, nbeta) = self.norm;
        let (xhat_f, inv_f, hf) = ln_forward(&x, self.p(ng), self.p(nbeta));
        let b = rows.len();
        let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let mut out = ViewOut {
            rows: b,
            t,
            visual: vec![0.0; b * v * dv],
            hidden: vec![0.0; b * t * d],
            logits: vec![0.0; b * t * vocab],
            visual_hidden: vec![0.0; b * v * d],
            head: self.p(self.head).to_vec(),
        };
        let block_of = |start: usize| lay.blocks.iter().position(|&(s, _)| s == start);
        let mut lsrc = Vec::new();
        for (r, &(start, qs, len)) in lay.rows_at.iter().enumerate() {
            let bi = block_of(start).expect("every row has a block");
            out.visual[r * v * dv..(r + 1) * v * dv]
                .copy_from_slice(&vis[bi * v * dv..(bi + 1) * v * dv]);
            out.visual_hidden[r * v * d..(r + 1) * v * d]
                .copy_from_slice(&hf[start * d..(start + v) * d]);
            let src = at.as_ref().unwrap_or(&hf);
            out.hidden[r * t * d..(r * t + len) * d].copy_from_slice(&src[qs * d..(qs + len) * d]);
            // Position v - 1 + i predicts token i; the last real position predicts the
            // token after the row (a real value in burn's padded batch too).
            for i in 0..t.min(len + 1) {
                lsrc.push((r, i, if i == 0 { start + v - 1 } else { qs + i - 1 }));
            }
        }
        let m = lsrc.len();
        let mut hsrc = vec![0.0f32; m * d];
        for (k, &(_, _, src)) in lsrc.iter().enumerate() {
            hsrc[k * d..(k + 1) * d].copy_from_slice(&hf[src * d..(src + 1) * d]);
        }
        let mut logits = vec![0.0f32; m * vocab];
        mm(
            &mut logits,
            View::rm(m, vocab, vocab, 0),
            &hsrc,
            View::rm(m, d, d, 0),
            self.p(self.head),
            View::rm(d, vocab, vocab, 0),
            false,
        );
        for (k, &(r, i, _)) in lsrc.iter().enumerate() {
            out.logits[(r * t + i) * vocab..(r * t + i + 1) * vocab]
                .copy_from_slice(&logits[k * vocab..(k + 1) * vocab]);
        }
        let tape = ViewTape {
            lay,
            enc,
            vis,
            acts,
            xhat_f,
            inv_f,
            hf,
            layer,
            lsrc,
            t,
        };
        Ok((out, tape))
    }

    /// The backward pass of [`FusedLm::view_forward`]: the gradient of every parameter from
    /// the loss's gradients with respect to the outputs (the returned step's `loss` is NaN:
    /// the loss was computed elsewhere).
    ///
    /// # Panics
    /// When a gradient's length is not its output's.
    pub fn view_backward(&self, tape: &ViewTape, g: ViewGrads<'_>) -> FusedStep {
        let (v, d, dv, vocab) = (self.n_visual, self.d, self.dv, self.vocab);
        let lay = &tape.lay;
        let (n, t) = (lay.n, tape.t);
        let b = lay.rows_at.len();
        let mut grads = vec![0.0f32; self.values.len()];
        let mut dhf = vec![0.0f32; n * d];
        if let Some(gl) = g.logits {
            assert_eq!(gl.len(), b * t * vocab, "logits gradient");
            let m = tape.lsrc.len();
            let mut dl = vec![0.0f32; m * vocab];
            let mut hsrc = vec![0.0f32; m * d];
            for (k, &(r, i, src)) in tape.lsrc.iter().enumerate() {
                dl[k * vocab..(k + 1) * vocab]
                    .copy_from_slice(&gl[(r * t + i) * vocab..(r * t + i + 1) * vocab]);
                hsrc[k * d..(k + 1) * d].copy_from_slice(&tape.hf[src * d..(src + 1) * d]);
            }
            let s = &self.slots[self.head];
            mm(
                &mut grads[s.off..s.off + s.len],
                View::rm(d, vocab, vocab, 0),
                &hsrc,
                View::rm(m, d, d, 0).t(),
                &dl,
                View::rm(m, vocab, vocab, 0),
                false,
            );
            let mut dsrc = vec![0.0f32; m * d];
            mm(
                &mut dsrc,
                View::rm(m, d, d, 0),
                &dl,
                View::rm(m, vocab, vocab, 0),
                self.p(self.head),
                View::rm(d, vocab, vocab, 0).t(),
                false,
            );
            for (k, &(_, _, src)) in tape.lsrc.iter().enumerate() {
                axpy(
                    &mut dhf[src * d..(src + 1) * d],
                    1.0,
                    &dsrc[k * d..(k + 1) * d],
                );
            }
        }
        if let Some(gh) = g.head {
            let s = &self.slots[self.head];
            axpy(&mut grads[s.off..s.off + s.len], 1.0, gh);
        }
        if let Some(gv) = g.visual_hidden {
            assert_eq!(gv.len(), b * v * d, "visual_hidden gradient");
            for (r, &(start, _, _)) in lay.rows_at.iter().enumerate() {
                axpy(
                    &mut dhf[start * d..(start + v) * d],
                    1.0,
                    &gv[r * v * d..(r + 1) * v * d],
                );
            }
        }
        let add_hidden = |dx: &mut [f32], gh: &[f32]| {
            assert_eq!(gh.len(), b * t * d, "hidden gradient");
            for (r, &(_, qs, len)) in lay.rows_at.iter().enumerate() {
                axpy(
                    &mut dx[qs * d..(qs + len) * d],
                    1.0,
                    &gh[r * t * d..(r * t + len) * d],
                );
            }
        };
        if tape.layer.is_none()
            && let Some(gh) = g.hidden
        {
            add_hidden(&mut dhf, gh);
        }
        let mut dx = vec![0.0f32; n * d];
        {
            let (ng, nbeta) = self.norm;
            let (dg, db) = self.two_grads(&mut grads, ng, nbeta);
            ln_backward(&dhf, &tape.xhat_f, &tape.inv_f, self.p(ng), dg, db, &mut dx);
        }
        for (i, (ls, a)) in self.layers.iter().zip(&tape.acts).enumerate().rev() {
            self.layer_backward(ls, self.lm_dims(), lay, a, &mut dx, &mut grads);
            if tape.layer == Some(i)
                && let Some(gh) = g.hidden
            {
                add_hidden(&mut dx, gh);
            }
        }
        let dvis = self.embed_backward(lay, &tape.vis, &dx, &mut grads);
        if let (Some(enc), Some(et)) = (&self.enc, &tape.enc)
            && enc.train
        {
            let mut dvis = dvis;
            if let Some(gv) = g.visual {
                assert_eq!(gv.len(), b * v * dv, "visual gradient");
                for (r, &(start, _, _)) in lay.rows_at.iter().enumerate() {
                    let bi = lay
                        .blocks
                        .iter()
                        .position(|&(s, _)| s == start)
                        .expect("every row has a block");
                    axpy(
                        &mut dvis[bi * v * dv..(bi + 1) * v * dv],
                        1.0,
                        &gv[r * v * dv..(r + 1) * v * dv],
                    );
                }
            }
            self.encoder_backward(enc, et, &dvis, &mut grads);
        }
        FusedStep {
            loss: f64::NAN,
            grads,
        }
    }

    /// The SFT loss of a batch and its gradients with the encoder learning too: `signals`
    /// `[records, leads, samples]` through the encoder ([`FusedLm::with_encoder`]), then
    /// [`FusedLm::view_forward`], the answer-token cross-entropy and
    /// [`FusedLm::view_backward`] (which skips the encoder's backward pass when none of its
    /// parameters learns; [`FusedLm::step`] on cached tokens is faster then).
    ///
    /// # Errors
    /// As [`FusedLm::view_forward`], and a batch without answer tokens.
    pub fn step_from_signals(
        &self,
        signals: &[f32],
        rows: &[LmRow<'_>],
    ) -> Result<FusedStep, FusedError> {
        let (out, tape) = self.view_forward(ViewInput::Signals(signals), rows, None)?;
        let (t, vocab) = (out.t, self.vocab);
        let m = rows
            .iter()
            .map(|r| r.answer.iter().filter(|&&a| a).count())
            .sum::<usize>();
        if m == 0 {
            return Err(FusedError::NoAnswer);
        }
        let inv_m = 1.0 / m as f32;
        let mut dl = vec![0.0f32; out.logits.len()];
        let mut loss = 0.0f64;
        for (r, row) in rows.iter().enumerate() {
            for (i, (&id, _)) in row
                .ids
                .iter()
                .zip(row.answer)
                .enumerate()
                .filter(|x| *x.1.1)
            {
                let z = &out.logits[(r * t + i) * vocab..(r * t + i + 1) * vocab];
                let g = &mut dl[(r * t + i) * vocab..(r * t + i + 1) * vocab];
                let max = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0.0f32;
                for (o, &v) in g.iter_mut().zip(z) {
                    *o = exp(v - max);
                    sum += *o;
                }
                let target = id as usize;
                loss += f64::from(sum.ln()) - f64::from(g[target].ln());
                let k = inv_m / sum;
                g.iter_mut().for_each(|o| *o *= k);
                g[target] -= inv_m;
            }
        }
        let mut step = self.view_backward(
            &tape,
            ViewGrads {
                logits: Some(&dl),
                ..ViewGrads::default()
            },
        );
        step.loss = loss / m as f64;
        Ok(step)
    }

    /// The decoder's input: projected visual tokens `vis[blocks * v, d_vision]` at each
    /// block's visual rows, token embeddings at text rows, plus positions.
    fn embed(&self, lay: &Layout, vis: &[f32]) -> Vec<f32> {
        let (v, d, dv) = (self.n_visual, self.d, self.dv);
        let nb = lay.blocks.len();
        let mut proj = vec![0.0f32; nb * v * d];
        let (pw, pb) = self.projector;
        mm(
            &mut proj,
            View::rm(nb * v, d, d, 0),
            vis,
            View::rm(nb * v, dv, dv, 0),
            self.p(pw),
            View::rm(dv, d, d, 0),
            false,
        );
        add_bias(&mut proj, self.p(pb));
        let mut x = vec![0.0f32; lay.n * d];
        for (b, &(start, _)) in lay.blocks.iter().enumerate() {
            x[start * d..(start + v) * d].copy_from_slice(&proj[b * v * d..(b + 1) * v * d]);
        }
        let (emb, pos) = (self.p(self.tok_emb), self.p(self.pos));
        for r in 0..lay.n {
            let xr = &mut x[r * d..(r + 1) * d];
            if let Some(t) = lay.token[r] {
                xr.copy_from_slice(&emb[t * d..(t + 1) * d]);
            }
            let p = lay.pos[r];
            for (o, &e) in xr.iter_mut().zip(&pos[p * d..(p + 1) * d]) {
                *o += e;
            }
        }
        x
    }

    /// [`FusedLm::embed`] backwards: position, token embedding and projector gradients from
    /// `dx`; returns d loss / d `vis`.
    fn embed_backward(&self, lay: &Layout, vis: &[f32], dx: &[f32], grads: &mut [f32]) -> Vec<f32> {
        let (v, d, dv) = (self.n_visual, self.d, self.dv);
        {
            let s = &self.slots[self.pos];
            let gpos = &mut grads[s.off..s.off + s.len];
            for r in 0..lay.n {
                let p = lay.pos[r];
                axpy(&mut gpos[p * d..(p + 1) * d], 1.0, &dx[r * d..(r + 1) * d]);
            }
        }
        {
            let s = &self.slots[self.tok_emb];
            let gemb = &mut grads[s.off..s.off + s.len];
            for r in 0..lay.n {
                if let Some(t) = lay.token[r] {
                    axpy(&mut gemb[t * d..(t + 1) * d], 1.0, &dx[r * d..(r + 1) * d]);
                }
            }
        }
        let nb = lay.blocks.len();
        let mut dproj = vec![0.0f32; nb * v * d];
        for (b, &(start, _)) in lay.blocks.iter().enumerate() {
            dproj[b * v * d..(b + 1) * v * d].copy_from_slice(&dx[start * d..(start + v) * d]);
        }
        self.linear_grads(
            grads,
            self.projector,
            vis,
            nb * v,
            &dproj,
            View::rm(nb * v, d, d, 0),
        );
        let mut dvis = vec![0.0f32; nb * v * dv];
        if self.enc.as_ref().is_some_and(|e| e.train) {
            mm(
                &mut dvis,
                View::rm(nb * v, dv, dv, 0),
                &dproj,
                View::rm(nb * v, d, d, 0),
                self.p(self.projector.0),
                View::rm(dv, d, d, 0).t(),
                false,
            );
        }
        dvis
    }
}

/// GELU of every element, on the widest SIMD level (pulp's dispatch).
fn gelu_forward(x: &[f32], y: &mut [f32]) {
    struct Op<'a>(&'a [f32], &'a mut [f32]);
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            for (o, &v) in self.1.iter_mut().zip(self.0) {
                *o = gelu_and_grad(v).0;
            }
        }
    }
    pulp::Arch::new().dispatch(Op(x, y));
}

/// `dy *= gelu'(x)` element-wise, on the widest SIMD level.
fn gelu_backward(x: &[f32], dy: &mut [f32]) {
    struct Op<'a>(&'a [f32], &'a mut [f32]);
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            for (o, &v) in self.1.iter_mut().zip(self.0) {
                *o *= gelu_and_grad(v).1;
            }
        }
    }
    pulp::Arch::new().dispatch(Op(x, dy));
}

/// Causal attention of every group: weights into `p` (group, head, query, visible key) and
/// outputs into `ctx`. `qkv` rows are `[q | k | v]`, heads side by side in each.
fn attention_forward(
    qkv: &[f32],
    lay: &Layout,
    d: usize,
    heads: usize,
    p: &mut [f32],
    ctx: &mut [f32],
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    struct Run<'a> {
        g: Group,
        qkv: &'a [f32],
        p: &'a mut [f32],
        ctx: &'a mut [f32],
        d: usize,
        heads: usize,
        scale: f32,
    }
    impl pulp::WithSimd for Run<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let Run {
                g,
                qkv,
                p,
                ctx,
                d,
                heads,
                scale,
            } = self;
            let dh = d / heads;
            let per = g.per_head();
            for h in 0..heads {
                for j in 0..g.qn {
                    let qr = g.qs + j;
                    let q = &qkv[qr * 3 * d + h * dh..][..dh];
                    let c = g.visible(j);
                    let w = &mut p[h * per + g.weights_at(j)..][..c];
                    let mut max = f32::NEG_INFINITY;
                    for (k, wk) in w.iter_mut().enumerate() {
                        let kr = g.key_row(k);
                        *wk = dot(q, &qkv[kr * 3 * d + d + h * dh..][..dh]) * scale;
                        max = max.max(*wk);
                    }
                    let mut sum = 0.0f32;
                    for wk in w.iter_mut() {
                        *wk = exp(*wk - max);
                        sum += *wk;
                    }
                    let inv = 1.0 / sum;
                    let out = &mut ctx[j * d + h * dh..][..dh];
                    out.iter_mut().for_each(|o| *o = 0.0);
                    for (k, wk) in w.iter_mut().enumerate() {
                        *wk *= inv;
                        let kr = g.key_row(k);
                        axpy(out, *wk, &qkv[kr * 3 * d + 2 * d + h * dh..][..dh]);
                    }
                }
            }
        }
    }
    // Groups own disjoint query rows and weight ranges, in row order: split both and run
    // the groups in parallel.
    let mut jobs = Vec::with_capacity(lay.groups.len());
    let (mut p_rest, mut ctx_rest) = (p, ctx);
    let mut row = 0;
    for g in &lay.groups {
        let (_, c) = std::mem::take(&mut ctx_rest).split_at_mut((g.qs - row) * d);
        let (cg, c) = c.split_at_mut(g.qn * d);
        ctx_rest = c;
        row = g.qs + g.qn;
        let (pg, pr) = std::mem::take(&mut p_rest).split_at_mut(g.per_head() * heads);
        p_rest = pr;
        jobs.push(Run {
            g: *g,
            qkv,
            p: pg,
            ctx: cg,
            d,
            heads,
            scale,
        });
    }
    jobs.into_par_iter()
        .for_each(|run| pulp::Arch::new().dispatch(run));
}

/// The backward pass of [`attention_forward`]: from `dctx`, writes d loss / d `[q | k | v]`
/// into `dqkv` (zeroed by the caller).
fn attention_backward(
    qkv: &[f32],
    p: &[f32],
    dctx: &[f32],
    lay: &Layout,
    d: usize,
    heads: usize,
    dqkv: &mut [f32],
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    // A record block's groups write the key and value gradients of its visual rows, so
    // blocks (not groups) are the unit of parallel work; each owns its rows of `dqkv`.
    struct Block<'a> {
        start: usize,
        groups: &'a [Group],
        qkv: &'a [f32],
        p: &'a [f32],
        dctx: &'a [f32],
        dqkv: &'a mut [f32],
        d: usize,
        heads: usize,
        scale: f32,
    }
    impl pulp::WithSimd for Block<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let Block {
                start,
                groups,
                qkv,
                p,
                dctx,
                dqkv,
                d,
                heads,
                scale,
            } = self;
            let dh = d / heads;
            let mut dp = Vec::new();
            for g in groups {
                let per = g.per_head();
                for h in 0..heads {
                    for j in 0..g.qn {
                        let qr = g.qs + j;
                        let c = g.visible(j);
                        let w = &p[g.p_off + h * per + g.weights_at(j)..][..c];
                        let dc = &dctx[qr * d + h * dh..][..dh];
                        dp.clear();
                        let mut s = 0.0f32;
                        for (k, &wk) in w.iter().enumerate() {
                            let kr = g.key_row(k);
                            let x = dot(dc, &qkv[kr * 3 * d + 2 * d + h * dh..][..dh]);
                            s += wk * x;
                            dp.push(x);
                        }
                        let q = &qkv[qr * 3 * d + h * dh..][..dh];
                        let mut dq = vec![0.0f32; dh];
                        for (k, (&wk, &x)) in w.iter().zip(&dp).enumerate() {
                            let kr = g.key_row(k) - start;
                            let ds = wk * (x - s) * scale;
                            axpy(&mut dq, ds, &qkv[(kr + start) * 3 * d + d + h * dh..][..dh]);
                            let row = &mut dqkv[kr * 3 * d..(kr + 1) * 3 * d];
                            axpy(&mut row[d + h * dh..d + (h + 1) * dh], ds, q);
                            axpy(&mut row[2 * d + h * dh..2 * d + (h + 1) * dh], wk, dc);
                        }
                        let qrow = &mut dqkv[(qr - start) * 3 * d + h * dh..][..dh];
                        for (o, &v) in qrow.iter_mut().zip(&dq) {
                            *o += v;
                        }
                    }
                }
            }
        }
    }
    let mut jobs = Vec::with_capacity(lay.blocks.len());
    let mut rest = dqkv;
    let mut gi = 0;
    for (b, &(start, _)) in lay.blocks.iter().enumerate() {
        let end = lay.blocks.get(b + 1).map_or(lay.n, |&(s, _)| s);
        let (mine, r) = std::mem::take(&mut rest).split_at_mut((end - start) * 3 * d);
        rest = r;
        let g0 = gi;
        while gi < lay.groups.len() && lay.groups[gi].qs < end {
            gi += 1;
        }
        jobs.push(Block {
            start,
            groups: &lay.groups[g0..gi],
            qkv,
            p,
            dctx,
            dqkv: mine,
            d,
            heads,
            scale,
        });
    }
    jobs.into_par_iter()
        .for_each(|job| pulp::Arch::new().dispatch(job));
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
                _ => grads
                    .get::<2>(s.id)
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
                .view_forward(ViewInput::Signals(&sig_host), &lm_rows, layer)
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
        let (m, device) = model(2, 2);
        let signals = Tensor::<3>::random([3, 12, 200], Distribution::Normal(0.0, 1.0), &device);
        let sig_host: Vec<f32> = signals.clone().into_data().try_to_vec().unwrap();
        let (px, text, padt, anst) = padded(&rows, &signals, &device);
        let logits = m.view_layer(px, text.clone(), padt, None).logits;
        let loss = answer_ce(logits, text, anst);
        let want_loss: f32 = loss.clone().into_data().try_to_vec::<f32>().unwrap()[0];
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
        let step = fused.step_from_signals(&sig_host, &lm_rows).unwrap();
        assert!((step.loss - f64::from(want_loss)).abs() < 1e-5);
        assert_grads(&fused, &step, &grads, 1e-3, "SFT");
        // A frozen encoder: no gradient registered for it, the rest unchanged.
        let frozen = FusedLm::with_encoder(&m.clone().with_vision_trainable(false)).unwrap();
        let step2 = frozen.step_from_signals(&sig_host, &lm_rows).unwrap();
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
