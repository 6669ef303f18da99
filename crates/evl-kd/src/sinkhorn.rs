//! Entropic optimal transport by log-domain Sinkhorn iterations (method.md 2.1): the
//! settings, the paper's regularisation [`PAPER_EPS`], and the two implementations of the
//! same iteration, in POT's `sinkhorn_log` order (column update, then row update, from zero
//! potentials):
//!
//! - [`sinkhorn_host`] (in `host/sinkhorn.rs`, the fused kernels' tree): a fused solver on
//!   host `f64` slices, parallel over the batch, used for the default *detached* plan. It
//!   needs no autodiff graph, so it runs outside burn on every device and kernel; the loss
//!   then differentiates only `sum(P * C)` (envelope theorem).
//! - [`sinkhorn_log_plan`]: the same iteration as burn tensor ops, used when the gradient must
//!   flow through the iterations (`PlanGradient::Unrolled`).

use burn::tensor::Tensor;
use evl_models::ops::logsumexp;
use serde::{Deserialize, Serialize};

pub use crate::host::sinkhorn::{
    HostPlan, Problem, SinkhornWorkspace, sinkhorn_host, sinkhorn_host_into,
};

/// The entropic regularisation `eps` of the paper (method.md 2.1; POT's `reg`): the default
/// of every Sinkhorn setting in this crate ([`crate::OtLossConfig`], [`crate::OtAlignConfig`],
/// [`crate::baselines::MultiLevelOtConfig`]).
pub const PAPER_EPS: f64 = 0.1;

/// How the iterations stop.
///
/// Serialised in lowercase: `{ iterations = 100 }` or
/// `{ tolerance = { tol = 1e-6, max_iter = 10000 } }` in TOML.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stop {
    /// Exactly this many iterations (default 100).
    Iterations(usize),
    /// Iterate each batch item independently until the L1 error of the student (column)
    /// marginal, `sum_j |sum_i P_ij - b_j|`, drops below `tol`, checked after every
    /// iteration, or until `max_iter`.
    Tolerance {
        /// Stopping threshold on the L1 column-marginal error.
        tol: f64,
        /// Upper bound on iterations per item.
        max_iter: usize,
    },
}

impl Default for Stop {
    fn default() -> Self {
        Stop::Iterations(100)
    }
}

/// How gradients treat the transport plan.
///
/// Serialised in lowercase (`"detached"`, `"unrolled"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanGradient {
    /// The plan is a constant in back-propagation (envelope/Danskin): the default.
    #[default]
    Detached,
    /// Differentiate through every Sinkhorn iteration (burn tensor ops only: no fused form,
    /// whatever the [`crate::Kernel`]).
    Unrolled,
}

/// Large negative log-weight standing in for `log 0` on masked entries: finite, so masked
/// rows never produce `-inf - -inf = NaN` in the unrolled graph, and `exp` of it is exactly 0.
pub const MASKED_LOG: f64 = -1e30;

/// Log-domain Sinkhorn as differentiable burn tensor ops, for a fixed number of iterations.
///
/// `logk` is `-C/eps` with [`MASKED_LOG`] added on masked entries, `log_a`/`log_b` are the
/// log marginals (masked entries [`MASKED_LOG`]). Returns the plan.
///
/// # Shapes
/// - `logk`: `[batch, n, m]`, `log_a`: `[batch, n, 1]`, `log_b`: `[batch, 1, m]` -> `[batch, n, m]`
pub fn sinkhorn_log_plan(
    logk: Tensor<3>,
    log_a: Tensor<3>,
    log_b: Tensor<3>,
    n_iter: usize,
) -> Tensor<3> {
    let mut log_u = log_a.zeros_like();
    let mut log_v = log_b.zeros_like();
    for _ in 0..n_iter {
        log_v = log_b.clone() - logsumexp(logk.clone() + log_u.clone(), 1);
        log_u = log_a.clone() - logsumexp(logk.clone() + log_v.clone(), 2);
    }
    (logk + log_u + log_v).exp()
}
