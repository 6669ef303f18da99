//! MultiLevelOT (Cui et al., "Multi-Level Optimal Transport for Universal Cross-Tokenizer
//! Knowledge Distillation on Language Models", arXiv:2412.14528, AAAI 2025).
//!
//! Token level: each aligned position's softmax is sorted in decreasing order and truncated
//! to its top `k` entries (vocabularies of any size become comparable), then
//! - an L1 term `sum_k |p_s,(k) - p_t,(k)|` (as ULD, restricted to the top k), and
//! - a cross-entropy-style term `-sum_k p_t,(k) log p_s,(k)`.
//!
//! Sequence level: an entropic OT between the student's and the teacher's token positions
//! with the L1 cost between their sorted top-k vectors (Sinkhorn, uniform marginals,
//! detached plan as in our EVL OT loss); the loss is `<P, C>`.
//!
//! `L = w_tok (L1 + CE) + w_seq L_seq`. Choices where the paper leaves room: token positions
//! for the token-level terms are paired by index over the answer, truncated to the shorter
//! sequence (as ULD); the sequence-level term uses all valid positions of both sequences,
//! so it needs no pairing; `k = 50`, `eps = 0.1`, 100 iterations by default.

use crate::sinkhorn::{Problem, Stop, sinkhorn_host};
use burn::tensor::Tensor;
use evl_models::device::{tensor_like, to_vec_f64};

/// Settings of MultiLevelOT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MultiLevelOtConfig {
    /// Number of sorted probabilities kept per token.
    pub top_k: usize,
    /// Softmax temperature (both models).
    pub temperature: f64,
    /// Sinkhorn regularisation for the sequence level.
    pub eps: f64,
    /// Sinkhorn iterations.
    pub n_iter: usize,
    /// Weight of the token-level terms.
    pub w_token: f64,
    /// Weight of the sequence-level term.
    pub w_sequence: f64,
}

impl Default for MultiLevelOtConfig {
    fn default() -> Self {
        Self {
            top_k: 50,
            temperature: 1.0,
            eps: 0.1,
            n_iter: 100,
            w_token: 1.0,
            w_sequence: 1.0,
        }
    }
}

/// Terms of MultiLevelOT.
#[derive(Clone, Debug)]
pub struct MultiLevelOtOutput {
    /// Weighted total.
    pub loss: Tensor<1>,
    /// Token-level L1 on sorted top-k probabilities.
    pub token_l1: Tensor<1>,
    /// Token-level cross-entropy-style term.
    pub token_ce: Tensor<1>,
    /// Sequence-level OT cost.
    pub sequence_ot: Tensor<1>,
}

/// Sorted (decreasing) top-k probabilities `[batch, len, k]`.
fn sorted_topk(z: Tensor<3>, temperature: f64, k: usize) -> Tensor<3> {
    let [_, _, v] = z.dims();
    let p = evl_models::ops::softmax(z.mul_scalar(1.0 / temperature), 2);
    let idx = p.clone().detach().argsort_descending(2);
    let [b, l, _] = p.dims();
    let k = k.min(v);
    p.gather(2, idx.slice([0..b, 0..l, 0..k]))
}

/// MultiLevelOT between student logits `[batch, l_s, v_s]` and teacher logits
/// `[batch, l_t, v_t]` (any vocabularies and lengths).
///
/// On the CPU the sequence-level cost `[batch, l_t, l_s]` and its detached-plan gradient
/// (`sum_i P_ij sign(p_s,jk - p_t,ik)`) are computed on the host, without materialising the
/// `[batch, l_t, l_s, k]` difference tensor of [`multilevel_ot_loss_graph`]; the token-level
/// terms are the same tensor ops in both. Both compute the same function.
pub fn multilevel_ot_loss(
    zs: Tensor<3>,
    zt: Tensor<3>,
    cfg: &MultiLevelOtConfig,
) -> MultiLevelOtOutput {
    let host = evl_models::device::on_host(&zs);
    multilevel_ot_impl(zs, zt, cfg, host)
}

/// [`multilevel_ot_loss`] as burn tensor ops throughout (what runs off the CPU).
pub fn multilevel_ot_loss_graph(
    zs: Tensor<3>,
    zt: Tensor<3>,
    cfg: &MultiLevelOtConfig,
) -> MultiLevelOtOutput {
    multilevel_ot_impl(zs, zt, cfg, false)
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
fn sequence_term_host(
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

fn multilevel_ot_impl(
    zs: Tensor<3>,
    zt: Tensor<3>,
    cfg: &MultiLevelOtConfig,
    host: bool,
) -> MultiLevelOtOutput {
    let k = cfg.top_k.min(zs.dims()[2]).min(zt.dims()[2]);
    let ps = sorted_topk(zs, cfg.temperature, k); // [b, ls, k]
    let pt = sorted_topk(zt, cfg.temperature, k); // [b, lt, k]
    let [b, ls, _] = ps.dims();
    let [_, lt, _] = pt.dims();
    let l = ls.min(lt);
    let ps_al = ps.clone().slice([0..b, 0..l, 0..k]);
    let pt_al = pt.clone().slice([0..b, 0..l, 0..k]);
    let n_tok = (b * l).max(1) as f64;
    let token_l1 = (ps_al.clone() - pt_al.clone())
        .abs()
        .sum()
        .mul_scalar(1.0 / n_tok);
    let token_ce = (pt_al * ps_al.clamp_min(1e-30).log())
        .sum()
        .mul_scalar(-1.0 / n_tok);
    // Sequence level: C[b, i, j] = || pt_i - ps_j ||_1 over the sorted top-k vectors.
    let problem = Problem {
        batch: b,
        n: lt,
        m: ls,
        row_mask: None,
        col_mask: None,
    };
    let sequence_ot = if host {
        let (psv, ptv) = (
            to_vec_f64(ps.clone().detach()),
            to_vec_f64(pt.clone().detach()),
        );
        let cost = l1_cost(&ptv, &psv, [b, lt, ls, k]);
        let plan = sinkhorn_host(&cost, problem, cfg.eps, Stop::Iterations(cfg.n_iter));
        sequence_term_host(&ps, &pt, &psv, &ptv, &plan.plan, &cost, [b, lt, ls, k])
    } else {
        let cost = (pt.reshape([b, lt, 1, k]) - ps.reshape([b, 1, ls, k]))
            .abs()
            .sum_dim(3)
            .reshape([b, lt, ls]);
        let plan = sinkhorn_host(
            &to_vec_f64(cost.clone()),
            problem,
            cfg.eps,
            Stop::Iterations(cfg.n_iter),
        );
        let plan = tensor_like(&plan.plan, [b, lt, ls], &cost);
        (plan * cost).sum().mul_scalar(1.0 / b as f64)
    };
    let loss = (token_l1.clone() + token_ce.clone()).mul_scalar(cfg.w_token)
        + sequence_ot.clone().mul_scalar(cfg.w_sequence);
    MultiLevelOtOutput {
        loss,
        token_l1,
        token_ce,
        sequence_ot,
    }
}
