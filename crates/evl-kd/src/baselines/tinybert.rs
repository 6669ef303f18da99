//! TinyBERT-style intermediate-layer distillation (Jiao et al., "TinyBERT: Distilling BERT
//! for Natural Language Understanding", Findings of EMNLP 2020).
//!
//! Hidden states: `MSE(H_s W_h, H_t)` with a learned projection `W_h: D_s -> D_t` (TinyBERT's
//! eq. 8). Attention maps: `MSE(A_s, A_t)` over heads (eq. 7), only where the two models have
//! the same number of heads and sequence length; otherwise it is not defined and
//! [`tinybert_attention_loss`] returns `None`.
//!
//! DEVIATION (heterogeneous tokenizers, not in TinyBERT, which shares its teacher's
//! tokenizer): when `L_s != L_t`, teacher position `floor(i * L_t / L_s)` is paired with
//! student position `i` (uniform index resampling), so both sequences span the same
//! conversation. The MSE averages over valid student positions and the teacher width.

use crate::host::{Real, Surrogate, gemm, host_vec};
use burn::tensor::{Bool, Int, Tensor, TensorData};

/// Teacher indices paired with each of `l_s` student positions.
pub fn resample_index(l_s: usize, l_t: usize) -> Vec<i64> {
    (0..l_s)
        .map(|i| ((i * l_t) / l_s.max(1)).min(l_t.saturating_sub(1)) as i64)
        .collect()
}

/// Hidden-state MSE through the projection `w_h` (`[d_s, d_t]`).
///
/// On the CPU one fused host pass computes the value and the closed-form gradients
/// (`R = H_s W_h - H_t[idx]`, `dL/dR = 2 R / (d_t n)` on valid positions, then one product
/// each for `H_s`, `W_h`, and a scatter into `H_t`), parallel over batch items; elsewhere,
/// and for an empty batch, it is [`tinybert_hidden_loss_graph`]. Both compute the same
/// function.
///
/// # Shapes
/// - `hs`: `[batch, l_s, d_s]`, `ht`: `[batch, l_t, d_t]`, `student_mask`: `[batch, l_s]`
pub fn tinybert_hidden_loss(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w_h: Tensor<2>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    let [b, ls, _] = hs.dims();
    if b * ls == 0 || !evl_models::device::on_host(&hs) {
        return tinybert_hidden_loss_graph(hs, ht, w_h, student_mask);
    }
    match evl_models::device::precision_of(&hs) {
        evl_models::device::Precision::F32 => tinybert_host::<f32>(&hs, &ht, &w_h, student_mask),
        evl_models::device::Precision::F64 => tinybert_host::<f64>(&hs, &ht, &w_h, student_mask),
    }
}

fn tinybert_host<T: Real>(
    hs: &Tensor<3>,
    ht: &Tensor<3>,
    w_h: &Tensor<2>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    use rayon::prelude::*;
    let [b, ls, ds] = hs.dims();
    let [bt, lt, dt] = ht.dims();
    assert_eq!(b, bt, "tinybert_hidden_loss: batch {b} vs {bt}");
    assert_eq!(
        w_h.dims(),
        [ds, dt],
        "tinybert_hidden_loss: projection must be [d_s, d_t]"
    );
    let idx = resample_index(ls, lt);
    let (x, y, w) = (
        host_vec::<T, 3>(hs),
        host_vec::<T, 3>(ht),
        host_vec::<T, 2>(w_h),
    );
    let mask = student_mask.map(|m| evl_models::device::to_vec_bool(m.clone()));
    let valid = |bi: usize, i: usize| mask.as_ref().is_none_or(|m| m[bi * ls + i]);
    // masked_mean's denominator (clamped at 1); the plain mean's is every position
    let n = match &mask {
        Some(m) => m.iter().filter(|&&v| v).count().max(1),
        None => b * ls,
    };
    let (want_t, want_w) = (ht.is_tracked(), w_h.is_tracked());
    let g_scale = T::of(2.0 / (dt * n) as f64);
    struct Part<T> {
        sq: f64,
        gx: Vec<T>,
        gw: Vec<T>,
        /// `dL/dR` on this item (the teacher's gradient is its negation, scattered).
        gr: Vec<T>,
    }
    let parts: Vec<Part<T>> = (0..b)
        .into_par_iter()
        .map(|bi| {
            let xb = &x[bi * ls * ds..(bi + 1) * ls * ds];
            let mut r = gemm(xb, (ls, ds), false, &w, (ds, dt), false);
            let mut sq = 0.0;
            for (i, row) in r.chunks_exact_mut(dt).enumerate() {
                if !valid(bi, i) {
                    row.fill(T::zero());
                    continue;
                }
                let yrow = &y[(bi * lt + idx[i] as usize) * dt..][..dt];
                let mut acc = T::zero();
                for (v, &t) in row.iter_mut().zip(yrow) {
                    *v -= t;
                    acc += *v * *v;
                }
                sq += acc.wide();
                row.iter_mut().for_each(|v| *v *= g_scale);
            }
            Part {
                sq,
                gx: gemm(&r, (ls, dt), false, &w, (ds, dt), true),
                gw: if want_w {
                    gemm(xb, (ls, ds), true, &r, (ls, dt), false)
                } else {
                    Vec::new()
                },
                gr: r,
            }
        })
        .collect();
    let value = parts.iter().map(|p| p.sq).sum::<f64>() / (dt * n) as f64;
    let mut gx = Vec::with_capacity(b * ls * ds);
    let mut gw = vec![T::zero(); if want_w { ds * dt } else { 0 }];
    let mut gt = vec![T::zero(); if want_t { b * lt * dt } else { 0 }];
    for (bi, p) in parts.into_iter().enumerate() {
        gx.extend(p.gx);
        gw.iter_mut().zip(&p.gw).for_each(|(a, &v)| *a += v);
        if want_t {
            for (i, row) in p.gr.chunks_exact(dt).enumerate() {
                let dst = &mut gt[(bi * lt + idx[i] as usize) * dt..][..dt];
                dst.iter_mut().zip(row).for_each(|(a, &v)| *a -= v);
            }
        }
    }
    let mut sg = Surrogate::new(value, hs);
    sg.grad_vec(hs, gx);
    sg.grad_vec(w_h, gw);
    sg.grad_vec(ht, gt);
    sg.finish()
}

/// [`tinybert_hidden_loss`] as burn tensor ops (what runs off the CPU).
pub fn tinybert_hidden_loss_graph(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w_h: Tensor<2>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    let [b, ls, ds] = hs.dims();
    let [_, lt, dt] = ht.dims();
    let idx =
        Tensor::<1, Int>::from_data(TensorData::new(resample_index(ls, lt), [ls]), &ht.device());
    let ht = ht.select(1, idx); // [b, ls, dt]
    let proj = hs.reshape([b * ls, ds]).matmul(w_h).reshape([b, ls, dt]);
    let per_token = (proj - ht)
        .square()
        .sum_dim(2)
        .reshape([b, ls])
        .mul_scalar(1.0 / dt as f64);
    match student_mask {
        Some(m) => evl_models::ops::masked_mean(per_token, m.clone()),
        None => per_token.mean(),
    }
}

/// Attention-map MSE, defined only for equal shapes `[batch, heads, l, l]`.
pub fn tinybert_attention_loss(attn_s: Tensor<4>, attn_t: Tensor<4>) -> Option<Tensor<1>> {
    (attn_s.dims() == attn_t.dims()).then(|| (attn_s - attn_t).square().mean())
}
