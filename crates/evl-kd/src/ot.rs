//! OT visual-feature matching, `L_ot` (method.md 2.1; fixtures family `sinkhorn_ot`).
//!
//! Teacher visual tokens are mapped to the student width by a learnable linear projector
//! ([`OtAlign`]), both sets are L2-normalised per token, and the loss is the transport cost
//! `sum_ij P*_ij C_ij` of the entropic plan between the two uniform token measures, with
//! `C_ij = ||t_i - s_j||^2`, averaged over the batch.
//!
//! The fused host form lives in `host/ot.rs`; this file holds the settings, the tensor-op
//! form and the choice between them ([`OtLossConfig::kernel`]).
//!
//! Default gradient (detached plan): the plan comes from [`sinkhorn_host`] outside the graph
//! and only `sum(P * C)` is differentiated. Since `P` is constant,
//! `sum_ij P_ij C_ij = sum_i r_i |t_i|^2 + sum_j c_j |s_j|^2 - 2 sum(T (.) P S)` with `r`,
//! `c` the plan's row and column sums, so the backward pass is two matrix products and never
//! materialises `C` in the graph. The forward value is the host's exact `sum P C`.

use crate::Kernel;
use crate::sinkhorn::{
    MASKED_LOG, PAPER_EPS, PlanGradient, Problem, Stop, sinkhorn_host, sinkhorn_log_plan,
};
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};
use evl_models::device::{tensor_like, to_vec_bool, to_vec_f64};
use evl_models::ops::{l2_normalize, with_gram_gradient};
use serde::{Deserialize, Serialize};

/// Settings of the OT loss.
///
/// Serialisable (every field has its default when absent), so a job file can carry every
/// Sinkhorn setting, e.g. in TOML:
/// `eps = 0.1`, `stop = { tolerance = { tol = 1e-6, max_iter = 10000 } }`,
/// `gradient = "unrolled"`, `kernel = "graph"`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OtLossConfig {
    /// Entropic regularisation `eps` (POT's `reg`); default [`PAPER_EPS`].
    pub eps: f64,
    /// Stopping rule; default 100 iterations.
    pub stop: Stop,
    /// Gradient convention; default detached plan.
    pub gradient: PlanGradient,
    /// Floor on token norms before normalisation (PyTorch `F.normalize`), 1e-12.
    pub norm_eps: f64,
    /// Fused host kernel or burn tensor ops ([`Kernel`]); default [`Kernel::Auto`].
    pub kernel: Kernel,
}

impl Default for OtLossConfig {
    fn default() -> Self {
        Self {
            eps: PAPER_EPS,
            stop: Stop::Iterations(100),
            gradient: PlanGradient::Detached,
            norm_eps: 1e-12,
            kernel: Kernel::Auto,
        }
    }
}

/// Everything the OT loss computed, for logging and figures.
#[derive(Clone, Debug)]
pub struct OtOutput {
    /// Batch-mean transport cost (scalar, differentiable).
    pub loss: Tensor<1>,
    /// Cost matrices `[batch, v_t, v_s]` on the host (explicit differences).
    pub cost: Vec<f64>,
    /// Transport plans `[batch, v_t, v_s]` on the host.
    pub plan: Vec<f64>,
    /// Sinkhorn iterations used per item.
    pub n_iter: Vec<usize>,
    /// L1 error of the student marginal per item at the stop.
    pub marginal_error: Vec<f64>,
    /// Shape `[batch, v_t, v_s]`.
    pub dims: [usize; 3],
}

/// The OT loss between already projected teacher tokens `t` and student tokens `s`.
///
/// Masks (`true` = real token) give padded tokens zero mass; marginals are uniform over the
/// valid tokens. An item with no valid token on one side has an all-zero plan and is left out
/// of the batch mean (the loss is 0 when every item is empty).
///
/// [`OtLossConfig::kernel`] chooses the form ([`Kernel`]). Fused (the default on the CPU),
/// one host pass normalises the tokens, builds the cost, solves the plan and writes the
/// closed-form gradient (`dL/dt_i = 2 (r_i t^_i - (P s^)_i)` taken back through the
/// normalisation), handed to autodiff as a surrogate. Graph, the normalisation and the
/// detached plan's gradient are burn tensor ops (the cost and the plan are still solved on
/// the host). The unrolled plan ([`PlanGradient::Unrolled`]) differentiates through the
/// iterations, which only the graph form can: it runs the graph form under every kernel.
/// Both forms compute the same function.
///
/// # Shapes
/// - `t`: `[batch, v_t, d]`, `s`: `[batch, v_s, d]`, masks `[batch, v_t]` / `[batch, v_s]`
///
/// # Panics
/// If shapes disagree (a caller bug).
pub fn ot_loss(
    t: Tensor<3>,
    s: Tensor<3>,
    t_mask: Option<&Tensor<2, Bool>>,
    s_mask: Option<&Tensor<2, Bool>>,
    cfg: &OtLossConfig,
) -> OtOutput {
    check_shapes(&t, &s);
    // the unrolled plan has no fused form (see [`Kernel`])
    if cfg.gradient == PlanGradient::Detached && cfg.kernel.fused_for(&t) {
        crate::host::ot::ot_loss_fused(&t, &s, t_mask, s_mask, cfg)
    } else {
        ot_loss_graph(t, s, t_mask, s_mask, cfg)
    }
}

pub(crate) fn check_shapes(t: &Tensor<3>, s: &Tensor<3>) {
    let ([b, _, d], [bs, _, ds]) = (t.dims(), s.dims());
    assert!(
        b == bs && d == ds,
        "ot_loss: teacher {:?} vs student {:?}",
        t.dims(),
        s.dims()
    );
}

/// The token masks on the host and each item's weight in the batch mean (both OT forms).
pub(crate) struct OtMasks {
    pub(crate) rows: Option<Vec<bool>>,
    pub(crate) cols: Option<Vec<bool>>,
    pub(crate) weight: Vec<f64>,
    pub(crate) dims: [usize; 3],
}

impl OtMasks {
    /// Reads the masks back to the host and weighs the items.
    pub(crate) fn read(
        t_mask: Option<&Tensor<2, Bool>>,
        s_mask: Option<&Tensor<2, Bool>>,
        dims: [usize; 3],
    ) -> Self {
        let rows = t_mask.map(|m| to_vec_bool(m.clone()));
        let cols = s_mask.map(|m| to_vec_bool(m.clone()));
        let weight = batch_weights(rows.as_deref(), cols.as_deref(), dims);
        Self {
            rows,
            cols,
            weight,
            dims,
        }
    }

    /// The Sinkhorn problem over these masks.
    pub(crate) fn problem(&self) -> Problem<'_> {
        let [batch, n, m] = self.dims;
        Problem {
            batch,
            n,
            m,
            row_mask: self.rows.as_deref(),
            col_mask: self.cols.as_deref(),
        }
    }
}

/// Per-item weight in the batch mean: `1 / (items with valid tokens on both sides)`, 0 for
/// an item with none on one side.
fn batch_weights(
    rows: Option<&[bool]>,
    cols: Option<&[bool]>,
    [b, vt, vs]: [usize; 3],
) -> Vec<f64> {
    let valid: Vec<bool> = (0..b)
        .map(|i| {
            rows.is_none_or(|r| r[i * vt..(i + 1) * vt].iter().any(|&x| x))
                && cols.is_none_or(|c| c[i * vs..(i + 1) * vs].iter().any(|&x| x))
        })
        .collect();
    let n_valid = valid.iter().filter(|&&v| v).count();
    valid
        .iter()
        .map(|&v| if v { 1.0 / n_valid as f64 } else { 0.0 })
        .collect()
}

/// `sum_b w_b sum_ij P_ij C_ij` over per-item blocks of `plan` and `cost`.
pub(crate) fn transport_value(plan: &[f64], cost: &[f64], weight: &[f64]) -> f64 {
    let block = plan.len() / weight.len().max(1);
    plan.chunks(block.max(1))
        .zip(cost.chunks(block.max(1)))
        .zip(weight)
        .map(|((p, c), w)| w * p.iter().zip(c).map(|(p, c)| p * c).sum::<f64>())
        .sum()
}

/// [`ot_loss`] with the normalisation and the detached plan's gradient as burn tensor ops
/// ([`Kernel::Graph`], `Auto` off the CPU, and the unrolled plan everywhere).
fn ot_loss_graph(
    t: Tensor<3>,
    s: Tensor<3>,
    t_mask: Option<&Tensor<2, Bool>>,
    s_mask: Option<&Tensor<2, Bool>>,
    cfg: &OtLossConfig,
) -> OtOutput {
    check_shapes(&t, &s);
    let [b, vt, _] = t.dims();
    let [_, vs, d] = s.dims();
    let tn = l2_normalize(t, cfg.norm_eps);
    let sn = l2_normalize(s, cfg.norm_eps);
    // Exact-where-it-matters distances: the Gram product, explicit differences for close pairs.
    let cost = crate::host::sq_dists(
        &to_vec_f64(tn.clone().detach()),
        &to_vec_f64(sn.clone().detach()),
        [b, vt, vs, d],
        evl_models::device::precision_of(&tn),
    );
    let masks = OtMasks::read(t_mask, s_mask, [b, vt, vs]);
    let problem = masks.problem();
    let OtMasks {
        rows, cols, weight, ..
    } = &masks;

    let needs_host =
        cfg.gradient == PlanGradient::Detached || matches!(cfg.stop, Stop::Tolerance { .. });
    let host = needs_host.then(|| sinkhorn_host(&cost, problem, cfg.eps, cfg.stop));

    match cfg.gradient {
        PlanGradient::Detached => {
            let host = host.expect("computed above for the detached plan");
            let value = transport_value(&host.plan, &cost, weight);
            let loss = detached_plan_loss(value, &host.plan, weight, tn, sn);
            OtOutput {
                loss,
                cost,
                plan: host.plan,
                n_iter: host.n_iter,
                marginal_error: host.marginal_error,
                dims: [b, vt, vs],
            }
        }
        PlanGradient::Unrolled => {
            // [b, vt, vs]: the host's explicit values, differentiable through the Gram form
            let c = with_gram_gradient(tensor_like(&cost, [b, vt, vs], &tn), tn, sn);
            let iters: Vec<usize> = match (&host, cfg.stop) {
                (Some(h), _) => h.n_iter.clone(),
                (None, Stop::Iterations(k)) => vec![k; b],
                (None, Stop::Tolerance { .. }) => {
                    unreachable!("tolerance mode always runs the host solver")
                }
            };
            let (logk, log_a, log_b) =
                masked_log_terms(&c, cfg.eps, rows.as_deref(), cols.as_deref(), [b, vt, vs]);
            let plan = if iters.iter().all(|&k| k == iters[0]) {
                sinkhorn_log_plan(logk, log_a, log_b, iters[0])
            } else {
                // Per-item stopping: unroll each item for its own iteration count.
                let parts = (0..b)
                    .map(|i| {
                        let sl =
                            |x: Tensor<3>, d1: usize, d2: usize| x.slice([i..i + 1, 0..d1, 0..d2]);
                        sinkhorn_log_plan(
                            sl(logk.clone(), vt, vs),
                            sl(log_a.clone(), vt, 1),
                            sl(log_b.clone(), 1, vs),
                            iters[i],
                        )
                    })
                    .collect();
                Tensor::cat(parts, 0)
            };
            let w = tensor_like(weight, [b, 1, 1], &c);
            let loss = (plan.clone() * c * w).sum();
            let plan_host = to_vec_f64(plan);
            let err = marginal_errors(&plan_host, [b, vt, vs], cols.as_deref());
            OtOutput {
                loss,
                cost,
                plan: plan_host,
                n_iter: iters,
                marginal_error: err,
                dims: [b, vt, vs],
            }
        }
    }
}

/// `value` in the forward pass, gradient of `sum_b w_b sum_ij P_ij ||t_i - s_j||^2` with `P`
/// constant in the backward pass (see the module docs).
fn detached_plan_loss(
    value: f64,
    plan: &[f64],
    weight: &[f64],
    tn: Tensor<3>,
    sn: Tensor<3>,
) -> Tensor<1> {
    let [b, vt, _] = tn.dims();
    let [_, vs, _] = sn.dims();
    let const_loss = tensor_like(&[value], [1], &tn);
    if !(tn.is_tracked() || sn.is_tracked()) {
        return const_loss;
    }
    let wp: Vec<f64> = plan
        .chunks(vt * vs)
        .zip(weight)
        .flat_map(|(p, &w)| p.iter().map(move |x| x * w))
        .collect();
    let mut r = vec![0.0; b * vt];
    let mut c = vec![0.0; b * vs];
    for bi in 0..b {
        for i in 0..vt {
            for j in 0..vs {
                let p = wp[(bi * vt + i) * vs + j];
                r[bi * vt + i] += p;
                c[bi * vs + j] += p;
            }
        }
    }
    let p = tensor_like(&wp, [b, vt, vs], &tn);
    let r = tensor_like(&r, [b, vt, 1], &tn);
    let c = tensor_like(&c, [b, vs, 1], &tn);
    let surrogate = (tn.clone().square() * r).sum() + (sn.clone().square() * c).sum()
        - (tn * p.matmul(sn)).sum().mul_scalar(2.0);
    const_loss + (surrogate.clone() - surrogate.detach())
}

/// `-C/eps` and log marginals with masked entries at [`MASKED_LOG`].
fn masked_log_terms(
    c: &Tensor<3>,
    eps: f64,
    rows: Option<&[bool]>,
    cols: Option<&[bool]>,
    [b, vt, vs]: [usize; 3],
) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
    let count = |mask: Option<&[bool]>, i: usize, n: usize| {
        mask.map_or(n, |m| m[i * n..(i + 1) * n].iter().filter(|&&x| x).count())
    };
    let log_w = |mask: Option<&[bool]>, n: usize| -> Vec<f64> {
        (0..b)
            .flat_map(|i| {
                let k = count(mask, i, n).max(1) as f64;
                (0..n).map(move |j| {
                    if mask.is_none_or(|m| m[i * n + j]) {
                        -k.ln()
                    } else {
                        MASKED_LOG
                    }
                })
            })
            .collect()
    };
    let log_a = tensor_like(&log_w(rows, vt), [b, vt, 1], c);
    let log_b = tensor_like(&log_w(cols, vs), [b, 1, vs], c);
    let mut logk = c.clone().mul_scalar(-1.0 / eps);
    if rows.is_some() || cols.is_some() {
        let pen: Vec<f64> = (0..b * vt * vs)
            .map(|k| {
                let (bi, i, j) = (k / (vt * vs), (k / vs) % vt, k % vs);
                let ok = rows.is_none_or(|r| r[bi * vt + i]) && cols.is_none_or(|m| m[bi * vs + j]);
                if ok { 0.0 } else { MASKED_LOG }
            })
            .collect();
        logk = logk + tensor_like(&pen, [b, vt, vs], c);
    }
    (logk, log_a, log_b)
}

fn marginal_errors(plan: &[f64], [b, vt, vs]: [usize; 3], cols: Option<&[bool]>) -> Vec<f64> {
    (0..b)
        .map(|bi| {
            let nv = cols.map_or(vs, |m| {
                m[bi * vs..(bi + 1) * vs].iter().filter(|&&x| x).count()
            });
            (0..vs)
                .filter(|&j| cols.is_none_or(|m| m[bi * vs + j]))
                .map(|j| {
                    ((0..vt).map(|i| plan[(bi * vt + i) * vs + j]).sum::<f64>() - 1.0 / nv as f64)
                        .abs()
                })
                .sum()
        })
        .collect()
}

/// Configuration of [`OtAlign`]: the learnable teacher -> student projector plus the loss.
#[derive(Config, Debug)]
pub struct OtAlignConfig {
    /// Width of a teacher visual token (`D_t`).
    pub d_teacher: usize,
    /// Width of a student visual token (`D_s`).
    pub d_student: usize,
    /// Entropic regularisation; default [`PAPER_EPS`].
    #[config(default = "PAPER_EPS")]
    pub eps: f64,
    /// Fixed Sinkhorn iterations; ignored when `tol` is set.
    #[config(default = 100)]
    pub n_iter: usize,
    /// Stop on the student-marginal L1 error instead of a fixed count.
    #[config(default = "None")]
    pub tol: Option<f64>,
    /// Iteration cap in tolerance mode.
    #[config(default = 10000)]
    pub max_iter: usize,
    /// Differentiate through the iterations instead of detaching the plan.
    #[config(default = false)]
    pub unrolled: bool,
    /// Fused host kernel or burn tensor ops ([`Kernel`]).
    #[config(default = "Kernel::Auto")]
    pub kernel: Kernel,
}

/// The Sinkhorn settings of `L_ot` without the token widths: what a job configuration
/// (TOML, command line) carries. Defaults are [`OtAlignConfig`]'s, written there once.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkhornSettings {
    /// Entropic regularisation `eps` (paper: 0.1).
    pub eps: f64,
    /// Fixed iterations; ignored when `tolerance` is set.
    pub iterations: usize,
    /// Stop when the student-marginal L1 error falls below this instead of a fixed count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// Iteration cap in tolerance mode.
    pub max_iter: usize,
    /// Differentiate through the iterations instead of detaching the plan.
    pub unrolled: bool,
}

impl Default for SinkhornSettings {
    fn default() -> Self {
        let d = OtAlignConfig::new(0, 0);
        SinkhornSettings {
            eps: d.eps,
            iterations: d.n_iter,
            tolerance: d.tol,
            max_iter: d.max_iter,
            unrolled: d.unrolled,
        }
    }
}

impl OtAlignConfig {
    /// This configuration with the Sinkhorn settings `s`.
    pub fn with_sinkhorn(self, s: &SinkhornSettings) -> Self {
        self.with_eps(s.eps)
            .with_n_iter(s.iterations)
            .with_tol(s.tolerance)
            .with_max_iter(s.max_iter)
            .with_unrolled(s.unrolled)
    }

    /// The loss settings this configuration describes.
    pub fn loss_config(&self) -> OtLossConfig {
        OtLossConfig {
            eps: self.eps,
            stop: match self.tol {
                Some(tol) => Stop::Tolerance {
                    tol,
                    max_iter: self.max_iter,
                },
                None => Stop::Iterations(self.n_iter),
            },
            gradient: if self.unrolled {
                PlanGradient::Unrolled
            } else {
                PlanGradient::Detached
            },
            norm_eps: 1e-12,
            kernel: self.kernel,
        }
    }

    /// Builds the module with a freshly initialised projector (no bias).
    pub fn init(&self, device: &Device) -> OtAlign {
        OtAlign {
            proj: LinearConfig::new(self.d_teacher, self.d_student)
                .with_bias(false)
                .init(device),
        }
    }
}

/// Learnable teacher -> student projection of visual tokens with the OT loss.
#[derive(Module, Debug)]
pub struct OtAlign {
    /// `D_t -> D_s` linear map (no bias: the loss normalises tokens anyway).
    pub proj: Linear,
}

impl OtAlign {
    /// Projects teacher tokens and computes `L_ot` against the student's.
    ///
    /// # Shapes
    /// - `t_vis`: `[batch, v_t, d_teacher]`, `s_vis`: `[batch, v_s, d_student]`
    pub fn forward(
        &self,
        t_vis: Tensor<3>,
        s_vis: Tensor<3>,
        t_mask: Option<&Tensor<2, Bool>>,
        s_mask: Option<&Tensor<2, Bool>>,
        cfg: &OtLossConfig,
    ) -> OtOutput {
        ot_loss(self.proj.forward(t_vis), s_vis, t_mask, s_mask, cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_config_round_trips_through_serde_with_defaults_for_absent_fields() {
        let cfg = OtLossConfig {
            eps: 0.05,
            stop: Stop::Tolerance {
                tol: 1e-6,
                max_iter: 500,
            },
            gradient: PlanGradient::Unrolled,
            norm_eps: 1e-12,
            kernel: Kernel::Graph,
        };
        let json = serde_json::to_string(&cfg).expect("serialises");
        assert_eq!(
            serde_json::from_str::<OtLossConfig>(&json).expect("parses"),
            cfg
        );
        assert!(json.contains(r#""gradient":"unrolled""#), "{json}");
        assert!(json.contains(r#""tolerance":{"tol""#), "{json}");
        assert!(json.contains(r#""kernel":"graph""#), "{json}");
        let partial: OtLossConfig =
            serde_json::from_str(r#"{"stop": {"iterations": 7}}"#).expect("parses");
        assert_eq!(
            partial,
            OtLossConfig {
                stop: Stop::Iterations(7),
                ..OtLossConfig::default()
            }
        );
        assert_eq!(OtLossConfig::default().eps, PAPER_EPS);
        let align = OtAlignConfig::new(4, 3);
        assert_eq!(align.eps, PAPER_EPS);
        assert_eq!(align.loss_config(), OtLossConfig::default());
    }
}
