//! MultiLevelOT's fused sequence level ([`crate::baselines::multilevel_ot`] gives the
//! function): the L1 cost between sorted top-k vectors, the detached Sinkhorn plan and the
//! plan's gradient `sum_i P_ij sign(p_s,jk - p_t,ik)` on host buffers, without the
//! `[batch, l_t, l_s, k]` difference tensor.

use crate::baselines::MultiLevelOtConfig;
use crate::sinkhorn::{Problem, Stop, sinkhorn_host};
use burn::tensor::Tensor;
use evl_models::device::to_vec_f64;

/// The sequence-level term `sum_ij P_ij C_ij / b` between the sorted top-k probabilities
/// `ps` `[b, l_s, k]` and `pt` `[b, l_t, k]`, differentiable through a surrogate.
pub(crate) fn sequence_term_fused(
    ps: &Tensor<3>,
    pt: &Tensor<3>,
    problem: Problem<'_>,
    cfg: &MultiLevelOtConfig,
) -> Tensor<1> {
    let [b, ls, k] = ps.dims();
    let [_, lt, _] = pt.dims();
    let (psv, ptv) = (
        to_vec_f64(ps.clone().detach()),
        to_vec_f64(pt.clone().detach()),
    );
    let cost = l1_cost(&ptv, &psv, [b, lt, ls, k]);
    let plan = sinkhorn_host(&cost, problem, cfg.eps, Stop::Iterations(cfg.n_iter));
    sequence_term(ps, pt, &psv, &ptv, &plan.plan, &cost, [b, lt, ls, k])
}

/// `C[b, i, j] = sum_k |pt[b, i, k] - ps[b, j, k]|` on row-major host buffers.
fn l1_cost(pt: &[f64], ps: &[f64], [b, lt, ls, k]: [usize; 4]) -> Vec<f64> {
    use rayon::prelude::*;
    let mut c = vec![0.0; b * lt * ls];
    c.par_chunks_mut((lt * ls).max(1))
        .enumerate()
        .for_each(|(bi, cb)| {
            for (i, row) in cb.chunks_exact_mut(ls.max(1)).enumerate() {
                let ti = &pt[(bi * lt + i) * k..(bi * lt + i + 1) * k];
                for (j, cij) in row.iter_mut().enumerate() {
                    let sj = &ps[(bi * ls + j) * k..(bi * ls + j + 1) * k];
                    *cij = ti.iter().zip(sj).map(|(a, b)| (a - b).abs()).sum();
                }
            }
        });
    c
}

/// `sum_ij P_ij C_ij / b` with the plan constant, as a surrogate carrying the gradients
/// `dL/dps_jk = sum_i P_ij sign(ps_jk - pt_ik) / b` (and the negated sum for `pt` when it is
/// tracked); `sign(0) = 0`, as the graph form's `abs` has it.
fn sequence_term(
    ps: &Tensor<3>,
    pt: &Tensor<3>,
    psv: &[f64],
    ptv: &[f64],
    plan: &[f64],
    cost: &[f64],
    [b, lt, ls, k]: [usize; 4],
) -> Tensor<1> {
    use rayon::prelude::*;
    let inv_b = 1.0 / b.max(1) as f64;
    let value = plan.iter().zip(cost).map(|(p, c)| p * c).sum::<f64>() * inv_b;
    let mut sg = crate::host::Surrogate::new(value, ps);
    let want_t = pt.is_tracked();
    let parts: Vec<(Vec<f64>, Vec<f64>)> = (0..b)
        .into_par_iter()
        .map(|bi| {
            let mut gs = vec![0.0; ls * k];
            let mut gt = vec![0.0; if want_t { lt * k } else { 0 }];
            for i in 0..lt {
                let ti = &ptv[(bi * lt + i) * k..(bi * lt + i + 1) * k];
                for j in 0..ls {
                    let p = plan[(bi * lt + i) * ls + j] * inv_b;
                    if p == 0.0 {
                        continue;
                    }
                    let sj = &psv[(bi * ls + j) * k..(bi * ls + j + 1) * k];
                    for kk in 0..k {
                        let d = sj[kk] - ti[kk];
                        let sgn = if d > 0.0 {
                            p
                        } else if d < 0.0 {
                            -p
                        } else {
                            0.0
                        };
                        gs[j * k + kk] += sgn;
                        if want_t {
                            gt[i * k + kk] -= sgn;
                        }
                    }
                }
            }
            (gs, gt)
        })
        .collect();
    let (mut gs, mut gt) = (Vec::new(), Vec::new());
    for (a, c) in parts {
        gs.extend(a);
        gt.extend(c);
    }
    sg.grad(ps, &gs);
    sg.grad(pt, &gt);
    sg.finish()
}
