//! The fused OT loss (method.md 2.1, detached plan; [`crate::ot`] gives the function): one
//! host pass normalises the tokens and builds the costs, the Sinkhorn solver
//! ([`crate::host::sinkhorn`]) finds the plans, and a second pass writes the closed-form
//! gradient `dL/dt_i = 2 (r_i t^_i - (P s^)_i)` back through the normalisation.

use crate::host::{Real, Surrogate, gemm, host_vec};
use crate::ot::{OtLossConfig, OtMasks, OtOutput, transport_value};
use crate::sinkhorn::sinkhorn_host;
use burn::tensor::{Bool, Tensor};
use evl_models::device::Precision;

/// Rows of `x` (`d` wide) divided by `sqrt(max(|x|^2, eps^2))` as `evl_models::ops::l2_normalize` does;
/// also the divisor and whether the norm was above the floor (differentiated then).
fn normalise_rows<T: Real>(x: &[T], d: usize, eps: T) -> (Vec<T>, Vec<T>, Vec<bool>) {
    let mut xn = Vec::with_capacity(x.len());
    let (mut norm, mut live) = (Vec::new(), Vec::new());
    for row in x.chunks_exact(d.max(1)) {
        let sq = crate::host::dot(row, row);
        let on = sq > eps * eps;
        let n = if on { sq.sqrt() } else { eps };
        xn.extend(row.iter().map(|&v| v / n));
        norm.push(n);
        live.push(on);
    }
    (xn, norm, live)
}

/// One item's normalised tokens and cost matrix (see [`ot_loss_fused`]).
struct ItemPrep<T> {
    tn: Vec<T>,
    t_norm: Vec<T>,
    t_live: Vec<bool>,
    sn: Vec<T>,
    s_norm: Vec<T>,
    s_live: Vec<bool>,
    cost: Vec<f64>,
}

/// Back through `x^ = x / n` for each row of `g` (`d` wide): `(g - x^ (x^ . g)) / n` where
/// the norm is above the floor, `g / eps` below it.
fn unnormalise<T: Real>(g: &mut [T], xn: &[T], norm: &[T], live: &[bool], d: usize) {
    for (k, gr) in g.chunks_exact_mut(d.max(1)).enumerate() {
        let x = &xn[k * d..(k + 1) * d];
        let proj = if live[k] {
            crate::host::dot(gr, x)
        } else {
            T::zero()
        };
        for (gv, &xv) in gr.iter_mut().zip(x) {
            *gv = (*gv - xv * proj) / norm[k];
        }
    }
}

/// [`crate::ot::ot_loss`]'s fused form (detached plan only), in the inputs' precision.
pub(crate) fn ot_loss_fused(
    t: &Tensor<3>,
    s: &Tensor<3>,
    t_mask: Option<&Tensor<2, Bool>>,
    s_mask: Option<&Tensor<2, Bool>>,
    cfg: &OtLossConfig,
) -> OtOutput {
    match evl_models::device::precision_of(t) {
        Precision::F32 => ot_loss_in::<f32>(t, s, t_mask, s_mask, cfg),
        Precision::F64 => ot_loss_in::<f64>(t, s, t_mask, s_mask, cfg),
    }
}

/// The detached-plan OT loss on host memory in the inputs' precision `T`. Items run in
/// parallel before the (batched, itself parallel) Sinkhorn solve, normalising their tokens
/// and building their cost matrices, and after it, building their gradients.
fn ot_loss_in<T: Real>(
    t: &Tensor<3>,
    s: &Tensor<3>,
    t_mask: Option<&Tensor<2, Bool>>,
    s_mask: Option<&Tensor<2, Bool>>,
    cfg: &OtLossConfig,
) -> OtOutput {
    use rayon::prelude::*;
    let [b, vt, d] = t.dims();
    let [_, vs, _] = s.dims();
    let eps = T::of(cfg.norm_eps);
    let prec = evl_models::device::precision_of(t);
    let (th, sh) = rayon::join(|| host_vec::<T, 3>(t), || host_vec::<T, 3>(s));
    let preps: Vec<ItemPrep<T>> = (0..b)
        .into_par_iter()
        .map(|i| {
            let (tn, t_norm, t_live) = normalise_rows(&th[i * vt * d..(i + 1) * vt * d], d, eps);
            let (sn, s_norm, s_live) = normalise_rows(&sh[i * vs * d..(i + 1) * vs * d], d, eps);
            let wide = |v: &[T]| v.iter().map(|x| x.wide()).collect::<Vec<f64>>();
            let cost = crate::host::simd(crate::host::SqDistsItem {
                xb: &wide(&tn),
                yb: &wide(&sn),
                d,
                prec,
            });
            ItemPrep {
                tn,
                t_norm,
                t_live,
                sn,
                s_norm,
                s_live,
                cost,
            }
        })
        .collect();
    let block = vt * vs;
    let mut cost = vec![0.0; b * block];
    cost.par_chunks_mut(block.max(1))
        .zip(&preps)
        .for_each(|(c, p)| c.copy_from_slice(&p.cost));
    let masks = OtMasks::read(t_mask, s_mask, [b, vt, vs]);
    let weight = &masks.weight;
    let host = sinkhorn_host(&cost, masks.problem(), cfg.eps, cfg.stop);
    let value = transport_value(&host.plan, &cost, weight);
    let mut sg = Surrogate::new(value, t);
    if t.is_tracked() || s.is_tracked() {
        // Per item, with P the weighted plan, r and c its row and column sums:
        // dL/dt^ = 2 (r t^ - P s^), dL/ds^ = 2 (c s^ - P^T t^), then through t^ = t / n.
        let mut gt = vec![T::zero(); b * vt * d];
        let mut gs = vec![T::zero(); b * vs * d];
        gt.par_chunks_mut((vt * d).max(1))
            .zip(gs.par_chunks_mut((vs * d).max(1)))
            .zip(&preps)
            .enumerate()
            .for_each(|(i, ((gt, gs), p))| {
                let wp: Vec<T> = host.plan[i * block..(i + 1) * block]
                    .iter()
                    .map(|&v| T::of(v * weight[i]))
                    .collect();
                let (ti, si) = (&p.tn[..], &p.sn[..]);
                let mut ps = gemm(&wp, (vt, vs), false, si, (vs, d), false);
                let mut pt = gemm(&wp, (vt, vs), true, ti, (vt, d), false);
                let mut col = vec![T::zero(); vs];
                for (k, row) in wp.chunks_exact(vs.max(1)).enumerate() {
                    let r = crate::host::sum(row);
                    col.iter_mut().zip(row).for_each(|(c, &p)| *c += p);
                    let g = &mut ps[k * d..(k + 1) * d];
                    for (gv, &x) in g.iter_mut().zip(&ti[k * d..(k + 1) * d]) {
                        *gv = T::of(2.0) * (r * x - *gv);
                    }
                }
                for (k, &c) in col.iter().enumerate() {
                    let g = &mut pt[k * d..(k + 1) * d];
                    for (gv, &x) in g.iter_mut().zip(&si[k * d..(k + 1) * d]) {
                        *gv = T::of(2.0) * (c * x - *gv);
                    }
                }
                unnormalise(&mut ps, ti, &p.t_norm, &p.t_live, d);
                unnormalise(&mut pt, si, &p.s_norm, &p.s_live, d);
                gt.copy_from_slice(&ps);
                gs.copy_from_slice(&pt);
            });
        sg.grad_vec(t, gt);
        sg.grad_vec(s, gs);
    }
    OtOutput {
        loss: sg.finish(),
        cost,
        plan: host.plan,
        n_iter: host.n_iter,
        marginal_error: host.marginal_error,
        dims: [b, vt, vs],
    }
}
