//! The forward and backward pass of [`EcgVlm`]'s language model as fused host kernels, for
//! supervised fine-tuning on a frozen encoder's visual tokens.
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
}

#[derive(Debug, Clone, Copy)]
struct Group {
    qs: usize,
    qn: usize,
    ss: usize,
    sn: usize,
    /// Offset of this group's attention weights (all heads).
    p_off: usize,
}

impl Group {
    /// Attention weights per head.
    fn per_head(&self) -> usize {
        self.qn * self.sn + self.qn * (self.qn + 1) / 2
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

fn host<const D: usize>(p: &Param<Tensor<D>>) -> (ParamId, Vec<usize>, Vec<f32>) {
    let t = p.val();
    let shape = t.dims().to_vec();
    let v = t
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("float parameter");
    (p.id, shape, v)
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
        let mut values = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        let mut push = |(id, shape, v): (ParamId, Vec<usize>, Vec<f32>)| {
            slots.push(Slot {
                id,
                shape,
                off: values.len(),
                len: v.len(),
            });
            values.extend(v);
            slots.len() - 1
        };
        fn lin(
            push: &mut impl FnMut((ParamId, Vec<usize>, Vec<f32>)) -> usize,
            l: &Linear,
        ) -> (usize, usize) {
            let w = push(host(&l.weight));
            let b = push(host(
                l.bias.as_ref().expect("linear layers here have a bias"),
            ));
            (w, b)
        }
        fn norm(
            push: &mut impl FnMut((ParamId, Vec<usize>, Vec<f32>)) -> usize,
            n: &LayerNorm,
        ) -> (usize, usize) {
            let g = push(host(&n.gamma));
            let b = push(host(n.beta.as_ref().expect("layer norms here have a bias")));
            (g, b)
        }
        let projector = lin(&mut push, &model.projector);
        let tok_emb = push(host(&model.tok_emb.weight));
        let pos = push(host(&model.pos));
        let mut layers = Vec::new();
        for l in &model.decoder.layers {
            // burn's pre-norm layer: `norm_2` before attention, `norm_1` before the MLP.
            layers.push(LayerSlots {
                ln_attn: norm(&mut push, &l.norm_2),
                q: lin(&mut push, &l.mha.query),
                k: lin(&mut push, &l.mha.key),
                v: lin(&mut push, &l.mha.value),
                o: lin(&mut push, &l.mha.output),
                ln_ffn: norm(&mut push, &l.norm_1),
                inner: lin(&mut push, &l.pwff.linear_inner),
                outer: lin(&mut push, &l.pwff.linear_outer),
            });
        }
        let final_norm = norm(&mut push, &model.norm);
        let head = push(host(&model.lm_head.weight));
        let (dv, d) = (slots[projector.0].shape[0], slots[projector.0].shape[1]);
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
        }
    }

    fn p(&self, slot: usize) -> &[f32] {
        let s = &self.slots[slot];
        &self.values[s.off..s.off + s.len]
    }

    /// Parameters the step covers.
    pub fn n_params(&self) -> usize {
        self.values.len()
    }

    /// The gradients of `step` as burn tensors on `device`, scaled by `scale`, keyed by the
    /// ids of the parameters they were read from (what an optimiser steps with).
    pub fn gradients(&self, step: &FusedStep, scale: f32, device: &Device) -> GradientsParams {
        let mut out = GradientsParams::new();
        for s in &self.slots {
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
        out
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

    fn layout(&self, records: usize, rows: &[LmRow<'_>]) -> Result<Layout, FusedError> {
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
            if row.answer.iter().any(|&a| a) {
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
        };
        let mut p_off = 0;
        let mut group = |lay: &mut Layout, qs: usize, qn: usize, ss: usize, sn: usize| {
            let g = Group {
                qs,
                qn,
                ss,
                sn,
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
                let last = row.answer.iter().rposition(|&a| a).expect("has an answer");
                let qs = lay.n;
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
        if lay.targets.is_empty() {
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
        let lay = self.layout(records, rows)?;
        let n = lay.n;
        let mut grads = vec![0.0f32; self.values.len()];

        // Embeddings: projected visual tokens and token embeddings, plus positions.
        let nb = lay.blocks.len();
        let mut vis = Vec::with_capacity(nb * v * dv);
        for &(_, rec) in &lay.blocks {
            vis.extend_from_slice(&visual[rec * v * dv..(rec + 1) * v * dv]);
        }
        let mut proj = vec![0.0f32; nb * v * d];
        let (pw, pb) = self.projector;
        mm(
            &mut proj,
            View::rm(nb * v, d, d, 0),
            &vis,
            View::rm(nb * v, dv, dv, 0),
            self.p(pw),
            View::rm(dv, d, d, 0),
            false,
        );
        add_bias(&mut proj, self.p(pb));
        let mut x = vec![0.0f32; n * d];
        for (b, &(start, _)) in lay.blocks.iter().enumerate() {
            x[start * d..(start + v) * d].copy_from_slice(&proj[b * v * d..(b + 1) * v * d]);
        }
        let (emb, pos) = (self.p(self.tok_emb), self.p(self.pos));
        for r in 0..n {
            let xr = &mut x[r * d..(r + 1) * d];
            if let Some(t) = lay.token[r] {
                xr.copy_from_slice(&emb[t * d..(t + 1) * d]);
            }
            let p = lay.pos[r];
            for (o, &e) in xr.iter_mut().zip(&pos[p * d..(p + 1) * d]) {
                *o += e;
            }
        }

        let mut acts = Vec::with_capacity(self.layers.len());
        for ls in &self.layers {
            acts.push(self.layer_forward(ls, &lay, &mut x));
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
            self.layer_backward(ls, &lay, a, &mut dx, &mut grads);
        }

        // Embedding gradients.
        {
            let s = &self.slots[self.pos];
            let gpos = &mut grads[s.off..s.off + s.len];
            for r in 0..n {
                let p = lay.pos[r];
                for (o, &g) in gpos[p * d..(p + 1) * d].iter_mut().zip(&dx[r * d..]) {
                    *o += g;
                }
            }
        }
        {
            let s = &self.slots[self.tok_emb];
            let gemb = &mut grads[s.off..s.off + s.len];
            for r in 0..n {
                if let Some(t) = lay.token[r] {
                    for (o, &g) in gemb[t * d..(t + 1) * d].iter_mut().zip(&dx[r * d..]) {
                        *o += g;
                    }
                }
            }
        }
        let mut dproj = vec![0.0f32; nb * v * d];
        for (b, &(start, _)) in lay.blocks.iter().enumerate() {
            dproj[b * v * d..(b + 1) * v * d].copy_from_slice(&dx[start * d..(start + v) * d]);
        }
        {
            let s = &self.slots[pw];
            mm(
                &mut grads[s.off..s.off + s.len],
                View::rm(dv, d, d, 0),
                &vis,
                View::rm(nb * v, dv, dv, 0).t(),
                &dproj,
                View::rm(nb * v, d, d, 0),
                false,
            );
            let s = &self.slots[pb];
            col_sums(&mut grads[s.off..s.off + s.len], &dproj, nb * v, d, 0);
        }
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
    fn layer_forward(&self, ls: &LayerSlots, lay: &Layout, x: &mut [f32]) -> LayerActs {
        let (n, d, ff, heads) = (lay.n, self.d, self.ff, self.heads);
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
        lay: &Layout,
        a: &LayerActs,
        dx: &mut [f32],
        grads: &mut [f32],
    ) {
        let (n, d, ff, heads) = (lay.n, self.d, self.ff, self.heads);
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
                    let c = g.sn + j + 1;
                    let w = &mut p[h * per + j * g.sn + j * (j + 1) / 2..][..c];
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
                        let c = g.sn + j + 1;
                        let w = &p[g.p_off + h * per + j * g.sn + j * (j + 1) / 2..][..c];
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
    let _ = dh;
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

    /// burn's loss of the same batch: rows padded with id 0, visual tokens per row, the
    /// model's own forward pass and the answer-token cross-entropy.
    fn burn_loss(
        m: &EcgVlm,
        visual: &Tensor<3>,
        rows: &[(usize, Vec<i64>, Vec<bool>)],
        device: &Device,
    ) -> Tensor<1> {
        let t = rows.iter().map(|r| r.1.len()).max().unwrap();
        let b = rows.len();
        let (mut ids, mut pad, mut ans) = (Vec::new(), Vec::new(), Vec::new());
        for (_, i, a) in rows {
            for k in 0..t {
                ids.push(i.get(k).copied().unwrap_or(0));
                pad.push(k >= i.len());
                ans.push(a.get(k).copied().unwrap_or(false));
            }
        }
        let recs: Vec<i64> = rows.iter().map(|r| r.0 as i64).collect();
        let vis = visual.clone().select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(recs, [b]), device),
        );
        let text = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), device);
        let pad = Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, t]), device);
        let ans = Tensor::<2, Bool>::from_data(TensorData::new(ans, [b, t]), device);
        let logits = m.view_from_visual(vis, text.clone(), pad, None).logits;
        let nll = activation::log_softmax(logits, 2)
            .gather(2, text.reshape([b, t, 1]))
            .reshape([b, t])
            .neg();
        crate::ops::masked_mean(nll, ans)
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
            let got = fused.gradient_of(&step, s.id).unwrap();
            let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs())).max(1e-3);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-4 * scale,
                    "parameter {:?} {:?}, element {i}: fused {g} vs autodiff {w}",
                    s.shape,
                    s.off
                );
            }
        }
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
