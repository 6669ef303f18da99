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
//! so it needs no pairing; `k = 50`, `eps = 0.1` ([`PAPER_EPS`]), 100 iterations by default.
//!
//! The fused sequence-level kernel is in `host/multilevel_ot.rs`;
//! [`MultiLevelOtConfig::kernel`] chooses the form.

use crate::Kernel;
use crate::sinkhorn::{PAPER_EPS, Problem, Stop, sinkhorn_host};
use burn::tensor::Tensor;
use evl_models::device::{tensor_like, to_vec_f64};

/// Settings of MultiLevelOT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MultiLevelOtConfig {
    /// Number of sorted probabilities kept per token.
    pub top_k: usize,
    /// Softmax temperature (both models).
    pub temperature: f64,
    /// Sinkhorn regularisation for the sequence level; default [`PAPER_EPS`].
    pub eps: f64,
    /// Sinkhorn iterations.
    pub n_iter: usize,
    /// Weight of the token-level terms.
    pub w_token: f64,
    /// Weight of the sequence-level term.
    pub w_sequence: f64,
    /// Fused host kernel or burn tensor ops for the sequence level ([`Kernel`]); default
    /// [`Kernel::Auto`].
    pub kernel: Kernel,
}

impl Default for MultiLevelOtConfig {
    fn default() -> Self {
        Self {
            top_k: 50,
            temperature: 1.0,
            eps: PAPER_EPS,
            n_iter: 100,
            w_token: 1.0,
            w_sequence: 1.0,
            kernel: Kernel::Auto,
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
/// [`MultiLevelOtConfig::kernel`] chooses the form of the sequence level ([`Kernel`]).
/// Fused (the default on the CPU), the cost `[batch, l_t, l_s]` and its detached-plan
/// gradient (`sum_i P_ij sign(p_s,jk - p_t,ik)`) are computed on the host, without
/// materialising the `[batch, l_t, l_s, k]` difference tensor of the graph form. The
/// token-level terms are the same tensor ops in both, and the plan is solved on the host in
/// both. Both compute the same function.
pub fn multilevel_ot_loss(
    zs: Tensor<3>,
    zt: Tensor<3>,
    cfg: &MultiLevelOtConfig,
) -> MultiLevelOtOutput {
    let fused = cfg.kernel.fused_for(&zs);
    multilevel_ot_impl(zs, zt, cfg, fused)
}

fn multilevel_ot_impl(
    zs: Tensor<3>,
    zt: Tensor<3>,
    cfg: &MultiLevelOtConfig,
    fused: bool,
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
    let sequence_ot = if fused {
        crate::host::multilevel_ot::sequence_term_fused(&ps, &pt, problem, cfg)
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
