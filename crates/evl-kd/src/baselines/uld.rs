//! Universal Logit Distillation (Boizard et al., "Towards cross-tokenizer distillation: the
//! universal logit distillation loss for LLMs", TMLR 2025; reference code `llm-recipes`;
//! fixtures family `uld`).
//!
//! Each softmax vector (`p_s = softmax(z_s/T_s)`, `p_t = softmax(z_t/T_t)`) is sorted in
//! decreasing order, the shorter vocabulary is zero-padded on the right, and the loss is the
//! per-token L1 distance between the sorted vectors, averaged over tokens. Sorting is done by
//! host-side argsort of detached probabilities followed by a differentiable `gather`, so the
//! gradient flows to the logits through the permutation (as in PyTorch's `sort`). The full
//! objective is `(1 - r) CE + r ULD`, combined by the trainer. Sequences of different lengths
//! are aligned by index over the answer tokens, truncated to the shorter (as the reference code).

use crate::host::{Real, Surrogate, host_vec};
use burn::tensor::Tensor;
use evl_models::device::tensor_like;

/// Probabilities sorted in decreasing order and zero-padded to `width` columns.
fn sorted_padded(z: Tensor<2>, temperature: f64, width: usize) -> Tensor<2> {
    let [n, v] = z.dims();
    let p = evl_models::ops::softmax(z.mul_scalar(1.0 / temperature), 1);
    let idx = p.clone().detach().argsort_descending(1);
    let sorted = p.gather(1, idx);
    if width > v {
        let pad = Tensor::<2>::zeros([n, width - v], (&sorted.device(), sorted.dtype()));
        Tensor::cat(vec![sorted, pad], 1)
    } else {
        sorted
    }
}

/// ULD outputs: the loss and, for inspection, the sorted padded distributions.
#[derive(Clone, Debug)]
pub struct UldOutput {
    /// Mean over tokens of `sum_k |p_s,sorted - p_t,sorted|`.
    pub loss: Tensor<1>,
    /// Student's sorted, padded probabilities `[n, max(v_s, v_t)]`.
    pub ps_sorted: Tensor<2>,
    /// Teacher's sorted, padded probabilities.
    pub pt_sorted: Tensor<2>,
}

/// The ULD loss for `n` aligned token positions.
///
/// One fused host pass per row sorts both distributions, takes the L1 distance and
/// back-propagates its sign pattern through the permutation and the softmax in closed form
/// (`ps_sorted`/`pt_sorted` are then values, not differentiable). This runs on every device:
/// burn 0.22 has no GPU sort (its `sort`/`argsort` read the tensor back and sort on the host),
/// so on a GPU the tensor-op form [`uld_loss_graph`] pays the same round trip plus a slow
/// generic sort (measured on an H100 through Vulkan: 1.0 s at 2048 x 4096 logits).
///
/// # Shapes
/// - `zs`: `[n, v_s]`, `zt`: `[n, v_t]`
pub fn uld_loss(zs: Tensor<2>, zt: Tensor<2>, t_student: f64, t_teacher: f64) -> UldOutput {
    match evl_models::device::precision_of(&zs) {
        evl_models::device::Precision::F32 => uld_host::<f32>(&zs, &zt, t_student, t_teacher),
        evl_models::device::Precision::F64 => uld_host::<f64>(&zs, &zt, t_student, t_teacher),
    }
}

/// Softmax of `z / temp` into `p` and the permutation sorting it in decreasing order.
fn softmax_sorted<T: Real>(z: &[T], temp: f64, p: &mut [T], order: &mut [u32]) {
    let inv = T::of(1.0 / temp);
    let m = z.iter().fold(T::neg_infinity(), |m, &x| m.max(x * inv));
    for (pk, &x) in p.iter_mut().zip(z) {
        *pk = (x * inv - m).exp_fast();
    }
    let r = T::one() / crate::host::sum(p);
    p.iter_mut().for_each(|x| *x *= r);
    for (k, o) in order.iter_mut().enumerate() {
        *o = k as u32;
    }
    order.sort_unstable_by(|&i, &j| p[j as usize].total_cmp_(p[i as usize]));
}

/// Softmax backward in place: `g <- (p (g - <g, p>)) / temp`.
fn softmax_back<T: Real>(g: &mut [T], p: &[T], temp: f64) {
    let dot = g.iter().zip(p).fold(T::zero(), |acc, (a, b)| acc + *a * *b);
    let inv = T::of(1.0 / temp);
    for (gk, &pk) in g.iter_mut().zip(p) {
        *gk = pk * (*gk - dot) * inv;
    }
}

fn uld_host<T: Real>(zs: &Tensor<2>, zt: &Tensor<2>, ts: f64, tt: f64) -> UldOutput {
    use rayon::prelude::*;
    let [n, vs] = zs.dims();
    let [nt, vt] = zt.dims();
    assert_eq!(n, nt, "uld: {n} student rows vs {nt} teacher rows");
    let width = vs.max(vt);
    let (a, b) = (host_vec::<T, 2>(zs), host_vec::<T, 2>(zt));
    let mut gs = vec![T::zero(); n * vs];
    let mut gt = vec![T::zero(); n * vt];
    let mut ps_sorted = vec![T::zero(); n * width];
    let mut pt_sorted = vec![T::zero(); n * width];
    let inv_n = T::of(1.0 / n.max(1) as f64);
    let total: f64 = gs
        .par_chunks_mut(vs.max(1))
        .zip(gt.par_chunks_mut(vt.max(1)))
        .zip(ps_sorted.par_chunks_mut(width.max(1)))
        .zip(pt_sorted.par_chunks_mut(width.max(1)))
        .enumerate()
        .map(|(r, (((gs, gt), pss), pts))| {
            let (mut ps, mut pt) = (vec![T::zero(); vs], vec![T::zero(); vt]);
            let (mut os, mut ot) = (vec![0u32; vs], vec![0u32; vt]);
            softmax_sorted(&a[r * vs..(r + 1) * vs], ts, &mut ps, &mut os);
            softmax_sorted(&b[r * vt..(r + 1) * vt], tt, &mut pt, &mut ot);
            let mut l1 = T::zero();
            for k in 0..width {
                let x = if k < vs {
                    ps[os[k] as usize]
                } else {
                    T::zero()
                };
                let y = if k < vt {
                    pt[ot[k] as usize]
                } else {
                    T::zero()
                };
                pss[k] = x;
                pts[k] = y;
                l1 += (x - y).abs();
                // d|x - y| = sign(x - y) (0 at a tie, as autodiff's abs)
                let sign = if x > y {
                    T::one()
                } else if x < y {
                    -T::one()
                } else {
                    T::zero()
                };
                if k < vs {
                    gs[os[k] as usize] = sign * inv_n;
                }
                if k < vt {
                    gt[ot[k] as usize] = -sign * inv_n;
                }
            }
            softmax_back(gs, &ps, ts);
            softmax_back(gt, &pt, tt);
            l1.wide()
        })
        .sum();
    let widen = |v: Vec<T>| v.into_iter().map(|x| x.wide()).collect::<Vec<f64>>();
    let mut sg = Surrogate::new(total / n.max(1) as f64, zs);
    sg.grad(zs, &widen(gs));
    sg.grad(zt, &widen(gt));
    UldOutput {
        loss: sg.finish(),
        ps_sorted: tensor_like(&widen(ps_sorted), [n, width], zs),
        pt_sorted: tensor_like(&widen(pt_sorted), [n, width], zs),
    }
}

/// [`uld_loss`] as burn tensor ops (what runs off the CPU).
pub fn uld_loss_graph(zs: Tensor<2>, zt: Tensor<2>, t_student: f64, t_teacher: f64) -> UldOutput {
    let [n, vs] = zs.dims();
    let [_, vt] = zt.dims();
    let width = vs.max(vt);
    let ps = sorted_padded(zs, t_student, width);
    let pt = sorted_padded(zt, t_teacher, width);
    let loss = (ps.clone() - pt.clone())
        .abs()
        .sum()
        .mul_scalar(1.0 / n.max(1) as f64);
    UldOutput {
        loss,
        ps_sorted: ps,
        pt_sorted: pt,
    }
}
