//! The fused ULD kernel ([`crate::baselines::uld`] gives the function): per row, both
//! softmaxes sorted, the L1 distance, and its sign pattern back through the permutation and
//! the softmax in closed form.

use crate::baselines::UldOutput;
use crate::host::{Real, Surrogate, host_vec};
use burn::tensor::Tensor;
use evl_models::device::{Precision, tensor_like};

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

/// [`crate::baselines::uld_loss`]'s fused form in the inputs' precision.
pub(crate) fn uld_fused(zs: &Tensor<2>, zt: &Tensor<2>, ts: f64, tt: f64) -> UldOutput {
    match evl_models::device::precision_of(zs) {
        Precision::F32 => uld_in::<f32>(zs, zt, ts, tt),
        Precision::F64 => uld_in::<f64>(zs, zt, ts, tt),
    }
}

/// The fused ULD loss in `T`, rows in parallel.
fn uld_in<T: Real>(zs: &Tensor<2>, zt: &Tensor<2>, ts: f64, tt: f64) -> UldOutput {
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
