//! Vanilla knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531; fixtures
//! family `kd_vanilla`).
//!
//! `L = T^2 * sum_{n,c} p_t (log p_t - log p_s) / N` with `p = softmax(z / T)`: KL(teacher ||
//! student) with PyTorch's `batchmean` (divide by rows). Sequences `[batch, len, vocab]` are
//! flattened to rows first. The teacher's logits are *not* detached here (the fixtures check
//! both gradients); a frozen teacher simply has no parameters to update.
//!
//! Different vocabularies: vanilla KD needs one. [`SharedVocab`] maps the two tokenizers onto
//! the tokens whose surface strings are identical (after removing the BPE word-boundary
//! markers `Ġ`/`▁` and lower-casing nothing); each model's logits are gathered onto that
//! shared list and the softmaxes are renormalised over it. Positions are aligned by index
//! over the answer tokens, truncated to the shorter answer. This is the common "exact match"
//! mapping of cross-tokenizer KD papers (e.g. MinED's baseline); tokens outside the
//! intersection carry no KD signal, which is exactly the weakness ULD/MultiLevelOT/EVL-ECG
//! address.

use crate::host::{Real, Surrogate, host_vec, sum};
use burn::tensor::{Int, Tensor, activation};
use std::collections::HashMap;

/// `T^2 * KL(softmax(zt/T) || softmax(zs/T))`, summed over classes, averaged over rows.
///
/// On the CPU one fused pass per row computes the value and both gradients in closed form
/// (`dL/dzs = T (p_s - p_t) / n`, `dL/dzt = T p_t (log p_t - log p_s - KL_row) / n`);
/// elsewhere it is [`kd_vanilla_graph`].
///
/// # Shapes
/// - `zs`, `zt`: `[n, c]`
pub fn kd_vanilla(zs: Tensor<2>, zt: Tensor<2>, temperature: f64) -> Tensor<1> {
    if !evl_models::device::on_host(&zs) {
        return kd_vanilla_graph(zs, zt, temperature);
    }
    match evl_models::device::precision_of(&zs) {
        evl_models::device::Precision::F32 => kd_host::<f32>(&zs, &zt, temperature),
        evl_models::device::Precision::F64 => kd_host::<f64>(&zs, &zt, temperature),
    }
}

/// `softmax(z / T)` into `out` (vectorised exp); returns the log of the normaliser including
/// the max shift, so `log p_k = z_k / T - that`.
#[inline(always)] // into `simd`'s dispatch (`KdRow`)
fn softmax_into<T: Real>(z: &[T], out: &mut [T], inv_t: T) -> T {
    let m = z.iter().fold(T::neg_infinity(), |m, &x| m.max(x * inv_t));
    for (o, &x) in out.iter_mut().zip(z) {
        *o = (x * inv_t - m).exp_fast();
    }
    let s = sum(out);
    let inv = T::one() / s;
    out.iter_mut().for_each(|o| *o *= inv);
    m + s.ln()
}

/// One row of the fused KD kernel: the row's KL, with the student's (and, if `want_t`, the
/// teacher's) gradient written over `gs` (`gt`), compiled for this CPU's vector width
/// (`crate::host::simd`).
struct KdRow<'a, T> {
    za: &'a [T],
    zb: &'a [T],
    gs: &'a mut [T],
    gt: &'a mut [T],
    inv_t: T,
    scale: T,
    want_t: bool,
}

impl<T: Real> pulp::WithSimd for KdRow<'_, T> {
    type Output = T;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> T {
        let Self {
            za,
            zb,
            gs,
            gt,
            inv_t,
            scale,
            want_t,
        } = self;
        let c = za.len();
        let (la, lb) = (softmax_into(za, gs, inv_t), softmax_into(zb, gt, inv_t));
        // log p_t - log p_s, exact from the logits
        let shift = la - lb;
        let mut kl = T::zero();
        for k in 0..c {
            kl += gt[k] * ((zb[k] - za[k]) * inv_t + shift);
        }
        for k in 0..c {
            gs[k] = scale * (gs[k] - gt[k]);
        }
        if want_t {
            for k in 0..c {
                gt[k] = scale * gt[k] * ((zb[k] - za[k]) * inv_t + shift - kl);
            }
        }
        kl
    }
}

fn kd_host<T: Real>(zs: &Tensor<2>, zt: &Tensor<2>, temperature: f64) -> Tensor<1> {
    use rayon::prelude::*;
    let [n, c] = zs.dims();
    assert_eq!(
        zs.dims(),
        zt.dims(),
        "kd_vanilla: logits of different shapes"
    );
    let (a, b) = (host_vec::<T, 2>(zs), host_vec::<T, 2>(zt));
    // the teacher's gradient only when it is tracked (DSKD passes detached targets)
    let want_t = zt.is_tracked();
    let mut gs = vec![T::zero(); n * c];
    let mut gt = vec![T::zero(); n * c];
    let inv_t = T::of(1.0 / temperature);
    let scale = T::of(temperature / n.max(1) as f64);
    let rows: f64 = gs
        .par_chunks_mut(c.max(1))
        .zip(gt.par_chunks_mut(c.max(1)))
        .enumerate()
        .map(|(r, (gs, gt))| {
            crate::host::simd(KdRow {
                za: &a[r * c..(r + 1) * c],
                zb: &b[r * c..(r + 1) * c],
                gs,
                gt,
                inv_t,
                scale,
                want_t,
            })
            .wide()
        })
        .sum();
    let mut sg = Surrogate::new(rows * temperature * temperature / n.max(1) as f64, zs);
    sg.grad_vec(zs, gs);
    sg.grad_vec(zt, gt);
    sg.finish()
}

/// [`kd_vanilla`] as burn tensor ops (what runs off the CPU).
pub fn kd_vanilla_graph(zs: Tensor<2>, zt: Tensor<2>, temperature: f64) -> Tensor<1> {
    let [n, _] = zs.dims();
    let log_ps = activation::log_softmax(zs.mul_scalar(1.0 / temperature), 1);
    let log_pt = activation::log_softmax(zt.mul_scalar(1.0 / temperature), 1);
    let pt = log_pt.clone().exp();
    (pt * (log_pt - log_ps))
        .sum()
        .mul_scalar(temperature * temperature / n as f64)
}

/// Token ids of the two vocabularies that share a surface string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedVocab {
    /// Student ids, one per shared token.
    pub student_ids: Vec<i64>,
    /// Teacher ids, aligned with `student_ids`.
    pub teacher_ids: Vec<i64>,
}

fn surface(token: &str) -> String {
    token.replace(['Ġ', '▁'], " ")
}

impl SharedVocab {
    /// Intersects two vocabularies given as id -> token string lists.
    pub fn new(student_vocab: &[String], teacher_vocab: &[String]) -> Self {
        let teacher: HashMap<String, usize> = teacher_vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (surface(t), i))
            .collect();
        let (mut student_ids, mut teacher_ids) = (Vec::new(), Vec::new());
        for (i, t) in student_vocab.iter().enumerate() {
            if let Some(&j) = teacher.get(&surface(t)) {
                student_ids.push(i as i64);
                teacher_ids.push(j as i64);
            }
        }
        Self {
            student_ids,
            teacher_ids,
        }
    }

    /// Number of shared tokens.
    pub fn len(&self) -> usize {
        self.student_ids.len()
    }

    /// True when the vocabularies share nothing.
    pub fn is_empty(&self) -> bool {
        self.student_ids.is_empty()
    }

    /// Gathers `[n, vocab]` logits onto the shared list (`[n, len]`).
    pub fn gather(logits: Tensor<2>, ids: &[i64]) -> Tensor<2> {
        let idx = Tensor::<1, Int>::from_data(
            burn::tensor::TensorData::new(ids.to_vec(), [ids.len()]),
            &logits.device(),
        );
        logits.select(1, idx)
    }

    /// Vanilla KD over the shared vocabulary.
    ///
    /// # Shapes
    /// - `zs`: `[n, v_s]`, `zt`: `[n, v_t]`
    pub fn kd(&self, zs: Tensor<2>, zt: Tensor<2>, temperature: f64) -> Tensor<1> {
        kd_vanilla(
            Self::gather(zs, &self.student_ids),
            Self::gather(zt, &self.teacher_ids),
            temperature,
        )
    }
}
