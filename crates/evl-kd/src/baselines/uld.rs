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
//!
//! The fused kernel is in `host/uld.rs`; [`uld_loss_with`] chooses the form ([`Kernel`]).

use crate::Kernel;
use burn::tensor::Tensor;

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

/// The ULD loss for `n` aligned token positions, in the default form ([`Kernel::Auto`]:
/// fused on every device; see [`uld_loss_with`]).
///
/// # Shapes
/// - `zs`: `[n, v_s]`, `zt`: `[n, v_t]`
pub fn uld_loss(zs: Tensor<2>, zt: Tensor<2>, t_student: f64, t_teacher: f64) -> UldOutput {
    uld_loss_with(zs, zt, t_student, t_teacher, Kernel::Auto)
}

/// [`uld_loss`] in the form `kernel` chooses.
///
/// Fused: one host pass per row sorts both distributions, takes the L1 distance and
/// back-propagates its sign pattern through the permutation and the softmax in closed form
/// (`ps_sorted`/`pt_sorted` are then values, not differentiable). `Auto` runs it on every
/// device: burn 0.22 has no GPU sort (its `sort`/`argsort` read the tensor back and sort on
/// the host), so on a GPU the tensor-op form pays the same round trip plus a slow generic
/// sort (measured on an H100 through Vulkan: 1.0 s at 2048 x 4096 logits). Graph: softmax,
/// host argsort and a differentiable `gather` as burn tensor ops.
///
/// # Shapes
/// - `zs`: `[n, v_s]`, `zt`: `[n, v_t]`
pub fn uld_loss_with(
    zs: Tensor<2>,
    zt: Tensor<2>,
    t_student: f64,
    t_teacher: f64,
    kernel: Kernel,
) -> UldOutput {
    // `Auto` is fused on every device here (see above)
    if kernel.fused_if_auto(true) {
        crate::host::uld::uld_fused(&zs, &zt, t_student, t_teacher)
    } else {
        uld_graph(zs, zt, t_student, t_teacher)
    }
}

/// [`uld_loss`] as burn tensor ops ([`Kernel::Graph`]).
fn uld_graph(zs: Tensor<2>, zt: Tensor<2>, t_student: f64, t_teacher: f64) -> UldOutput {
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
