//! OT visual-feature matching, `L_ot` (method.md 2.1; fixtures family `sinkhorn_ot`).
//!
//! Teacher visual tokens are mapped to the student width by a learnable linear projector
//! ([`OtAlign`]), both sets are L2-normalised per token, and the loss is the transport cost
//! `sum_ij P*_ij C_ij` of the entropic plan between the two uniform token measures, with
//! `C_ij = ||t_i - s_j||^2`, averaged over the batch.
//!
//! Default gradient (detached plan): the plan comes from [`sinkhorn_host`] outside the graph
//! and only `sum(P * C)` is differentiated. Since `P` is constant,
//! `sum_ij P_ij C_ij = sum_i r_i |t_i|^2 + sum_j c_j |s_j|^2 - 2 sum(T (.) P S)` with `r`,
//! `c` the plan's row and column sums, so the backward pass is two matrix products and never
//! materialises `C` in the graph. The forward value is the host's exact `sum P C`.

use crate::host::{Real, Surrogate, gemm, host_vec};
use crate::sinkhorn::{MASKED_LOG, PlanGradient, Problem, Stop, sinkhorn_host, sinkhorn_log_plan};
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};
use evl_models::device::{Precision, tensor_like, to_vec_bool, to_vec_f64};
use evl_models::ops::{l2_normalize, with_gram_gradient};

/// Settings of the OT loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OtLossConfig {
    /// Entropic regularisation `eps` (POT's `reg`); paper default 0.1.
    pub eps: f64,
    /// Stopping rule; default 100 iterations.
    pub stop: Stop,
    /// Gradient convention; default detached plan.
    pub gradient: PlanGradient,
    /// Floor on token norms before normalisation (PyTorch `F.normalize`), 1e-12.
    pub norm_eps: f64,
}

impl Default for OtLossConfig {
    fn default() -> Self {
        Self {
            eps: 0.1,
            stop: Stop::Iterations(100),
            gradient: PlanGradient::Detached,
            norm_eps: 1e-12,
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
/// On the CPU with the detached plan (the default) one host pass normalises the tokens,
/// builds the cost, solves the plan and writes the closed-form gradient
/// (`dL/dt_i = 2 (r_i t^_i - (P s^)_i)` taken back through the normalisation), handed to
/// autodiff as a surrogate; elsewhere, and for the unrolled plan, it is [`ot_loss_graph`].
/// Both compute the same function.
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
    if cfg.gradient != PlanGradient::Detached || !evl_models::device::on_host(&t) {
        return ot_loss_graph(t, s, t_mask, s_mask, cfg);
    }
    match evl_models::device::precision_of(&t) {
        Precision::F32 => ot_loss_host::<f32>(&t, &s, t_mask, s_mask, cfg),
        Precision::F64 => ot_loss_host::<f64>(&t, &s, t_mask, s_mask, cfg),
    }
}

fn check_shapes(t: &Tensor<3>, s: &Tensor<3>) {
    let ([b, _, d], [bs, _, ds]) = (t.dims(), s.dims());
    assert!(
        b == bs && d == ds,
        "ot_loss: teacher {:?} vs student {:?}",
        t.dims(),
        s.dims()
    );
}

/// The token masks on the host and each item's weight in the batch mean (both OT forms).
struct OtMasks {
    rows: Option<Vec<bool>>,
    cols: Option<Vec<bool>>,
    weight: Vec<f64>,
    dims: [usize; 3],
}

impl OtMasks {
    /// Reads the masks back to the host and weighs the items.
    fn read(
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
    fn problem(&self) -> Problem<'_> {
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
fn transport_value(plan: &[f64], cost: &[f64], weight: &[f64]) -> f64 {
    let block = plan.len() / weight.len().max(1);
    plan.chunks(block.max(1))
        .zip(cost.chunks(block.max(1)))
        .zip(weight)
        .map(|((p, c), w)| w * p.iter().zip(c).map(|(p, c)| p * c).sum::<f64>())
        .sum()
}

/// Rows of `x` (`d` wide) divided by `sqrt(max(|x|^2, eps^2))` as [`l2_normalize`] does;
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

/// One item's normalised tokens and cost matrix (see [`ot_loss_host`]).
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

/// The detached-plan OT loss on host memory in the inputs' precision `T`. Items run in
/// parallel before the (batched, itself parallel) Sinkhorn solve, normalising their tokens
/// and building their cost matrices, and after it, building their gradients.
fn ot_loss_host<T: Real>(
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

/// [`ot_loss`] with the normalisation and the detached plan's gradient as burn tensor ops
/// (what runs off the CPU, and the unrolled plan everywhere).
pub fn ot_loss_graph(
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
    /// Entropic regularisation (paper: 0.1).
    #[config(default = 0.1)]
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
}

impl OtAlignConfig {
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
