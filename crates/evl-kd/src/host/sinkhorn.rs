//! The fused Sinkhorn solver: log-domain entropic OT on host `f64` slices, parallel over
//! the batch (method.md 2.1). It needs no autodiff graph, so it runs outside burn for the
//! *detached* plan (the losses then differentiate only `sum(P * C)`, envelope theorem);
//! [`crate::sinkhorn`] holds the settings and the same iteration as burn tensor ops, and
//! re-exports this solver.
//!
//! We write Sinkhorn ourselves because no maintained Rust crate offers a batched, masked,
//! log-domain solver with per-example stopping (and none on burn tensors).

use crate::host::Real;
use crate::sinkhorn::Stop;
use rayon::prelude::*;

/// Result of [`sinkhorn_host`] for a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct HostPlan {
    /// Transport plans, `[batch, n, m]` row-major; zero on masked rows and columns.
    pub plan: Vec<f64>,
    /// Iterations used per item.
    pub n_iter: Vec<usize>,
    /// L1 error of the column marginal per item at the stop.
    pub marginal_error: Vec<f64>,
}

/// Shape and validity masks of a batch of cost matrices.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a> {
    /// Batch size.
    pub batch: usize,
    /// Rows (teacher tokens) per item.
    pub n: usize,
    /// Columns (student tokens) per item.
    pub m: usize,
    /// Optional `[batch, n]` row validity (true = a real token).
    pub row_mask: Option<&'a [bool]>,
    /// Optional `[batch, m]` column validity.
    pub col_mask: Option<&'a [bool]>,
}

/// Numerically stable `log(sum(exp(x)))` of a slice (max shift).
#[inline]
fn lse(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let mx = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return mx;
    }
    let s: f64 = values.map(|v| (v - mx).exp()).sum();
    mx + s.ln()
}

/// Scalings leave `[1/ABSORB, ABSORB]` -> they are folded into the log potentials and the
/// kernel is recomputed. At 1e50 a plan entry of the kernel's smallest scale is ~1e-100 times
/// the scalings' product, far above f64's underflow, and absorptions stay rare (a handful
/// per solve at eps = 0.01).
const ABSORB: f64 = 1e50;

/// Denominators below this (or non-finite) mean the kernel underflowed on a whole row or
/// column: that half-step is done in the log domain instead.
const TINY: f64 = 1e-280;

/// Buffers of one batch item (sized on first use, reused afterwards).
#[derive(Clone, Debug, Default)]
struct ItemWork {
    rows: Vec<usize>,
    cols: Vec<usize>,
    /// `-C/eps` on the valid sub-matrix, row-major `nv x mv`.
    logk: Vec<f64>,
    /// `exp(logk_ij + alpha_i + beta_j)`.
    kernel: Vec<f64>,
    alpha: Vec<f64>,
    beta: Vec<f64>,
    u: Vec<f64>,
    v: Vec<f64>,
    /// `K v` (rows) and `K^T u` (columns).
    kv: Vec<f64>,
    ktu: Vec<f64>,
}

/// Reusable memory of [`sinkhorn_host_into`]: once it has seen a problem of a given size,
/// solving problems up to that size allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct SinkhornWorkspace {
    items: Vec<ItemWork>,
}

impl SinkhornWorkspace {
    /// An empty workspace (grows on first use).
    pub fn new() -> Self {
        Self::default()
    }
}

fn resize<T: Clone>(v: &mut Vec<T>, n: usize, x: T) {
    v.clear();
    v.resize(n, x);
}

/// `kernel = exp(logk + alpha_i + beta_j)`.
fn rebuild_kernel(w: &mut ItemWork) {
    let mv = w.beta.len();
    for ((krow, lrow), &a) in w
        .kernel
        .chunks_exact_mut(mv)
        .zip(w.logk.chunks_exact(mv))
        .zip(&w.alpha)
    {
        for ((k, &l), &b) in krow.iter_mut().zip(lrow).zip(&w.beta) {
            *k = (l + a + b).exp_fast();
        }
    }
}

/// Folds the scalings into the potentials (`alpha += ln u`, `u = 1`, same for `v`) and
/// rebuilds the kernel.
fn absorb(w: &mut ItemWork) {
    for (a, u) in w.alpha.iter_mut().zip(w.u.iter_mut()) {
        *a += u.ln();
        *u = 1.0;
    }
    for (b, v) in w.beta.iter_mut().zip(w.v.iter_mut()) {
        *b += v.ln();
        *v = 1.0;
    }
    rebuild_kernel(w);
}

/// `out = K^T u` (accumulated row by row: contiguous, vectorises).
#[inline(always)] // into `simd`'s dispatch (`SolveItem`)
fn kernel_t_times(kernel: &[f64], u: &[f64], out: &mut [f64]) {
    out.fill(0.0);
    let mv = out.len();
    for (krow, &ui) in kernel.chunks_exact(mv).zip(u) {
        for (o, &k) in out.iter_mut().zip(krow) {
            *o += k * ui;
        }
    }
}

/// Dot product with eight independent accumulators, so the compiler can keep it in vector
/// registers (a single running sum is a serial dependency chain).
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `out = K v`.
#[inline(always)] // into `simd`'s dispatch (`SolveItem`)
fn kernel_times(kernel: &[f64], v: &[f64], out: &mut [f64]) {
    let mv = v.len();
    for (o, krow) in out.iter_mut().zip(kernel.chunks_exact(mv)) {
        *o = dot(krow, v);
    }
}

fn bad(x: f64) -> bool {
    !(x > TINY && x.is_finite())
}

/// Column half-step `v = b / (K^T u)` from a precomputed `ktu`, or in the log domain when a
/// column's kernel underflowed.
#[inline(always)] // into `simd`'s dispatch (`SolveItem`)
fn column_step(w: &mut ItemWork, log_b: f64) {
    if w.ktu.iter().any(|&s| bad(s)) {
        absorb(w);
        let (nv, mv) = (w.alpha.len(), w.beta.len());
        for j in 0..mv {
            let z = lse((0..nv).map(|i| w.logk[i * mv + j] + w.alpha[i]));
            w.beta[j] = log_b - z;
        }
        rebuild_kernel(w);
        return;
    }
    let b = log_b.exp();
    for (v, &s) in w.v.iter_mut().zip(&w.ktu) {
        *v = b / s;
    }
}

/// Row half-step `u = a / (K v)`, or in the log domain on underflow.
#[inline(always)] // into `simd`'s dispatch (`SolveItem`)
fn row_step(w: &mut ItemWork, log_a: f64) {
    kernel_times(&w.kernel, &w.v, &mut w.kv);
    if w.kv.iter().any(|&s| bad(s)) {
        absorb(w);
        let mv = w.beta.len();
        for (i, a) in w.alpha.iter_mut().enumerate() {
            let z = lse(w.logk[i * mv..(i + 1) * mv]
                .iter()
                .zip(&w.beta)
                .map(|(l, b)| l + b));
            *a = log_a - z;
        }
        rebuild_kernel(w);
        return;
    }
    let a = log_a.exp();
    for (u, &s) in w.u.iter_mut().zip(&w.kv) {
        *u = a / s;
    }
}

fn out_of_range(x: &[f64]) -> bool {
    x.iter().any(|&s| !(s < ABSORB && s > 1.0 / ABSORB))
}

/// Solves one item whose valid sub-problem is already in `w.logk`. Returns (iterations,
/// column L1 error).
///
/// Stabilised scaling-domain Sinkhorn (Schmitzer 2019, "Stabilized sparse scaling
/// algorithms for entropy regularized transport problems"): the plan is
/// `P = diag(u) exp(logk + alpha + beta) diag(v)`, one iteration is two matrix-vector
/// products (no `exp` in the loop), and the scalings are folded into the log potentials
/// `alpha`, `beta` whenever they leave `[1e-50, 1e50]`. In exact arithmetic every step is
/// the log-domain step of POT's `sinkhorn_log` (same order, same start), so fixed-iteration
/// results agree with it to rounding.
#[inline(always)] // into `simd`'s dispatch (`SolveItem`)
fn solve_item(w: &mut ItemWork, stop: Stop) -> (usize, f64) {
    let (nv, mv) = (w.rows.len(), w.cols.len());
    let log_a = -(nv as f64).ln();
    let log_b = -(mv as f64).ln();
    let b = 1.0 / mv as f64;
    w.alpha.fill(0.0);
    w.beta.fill(0.0);
    w.u.fill(1.0);
    w.v.fill(1.0);
    rebuild_kernel(w);
    let (max_iter, tol) = match stop {
        Stop::Iterations(k) => (k, None),
        Stop::Tolerance { tol, max_iter } => (max_iter, Some(tol)),
    };
    let column_error =
        |w: &ItemWork| -> f64 { w.v.iter().zip(&w.ktu).map(|(v, s)| (v * s - b).abs()).sum() };
    // `ktu` always holds K^T u for the current u and kernel at the top of the loop.
    kernel_t_times(&w.kernel, &w.u, &mut w.ktu);
    let mut it = 0;
    let mut err = f64::NAN;
    while it < max_iter {
        column_step(w, log_b);
        row_step(w, log_a);
        if out_of_range(&w.u) || out_of_range(&w.v) {
            absorb(w);
        }
        kernel_t_times(&w.kernel, &w.u, &mut w.ktu);
        it += 1;
        if let Some(tol) = tol {
            err = column_error(w);
            if err < tol {
                break;
            }
        }
    }
    if tol.is_none() {
        err = column_error(w);
    }
    (it, err)
}

/// [`solve_item`] compiled for this CPU's vector width (`crate::host::simd`): its two
/// matrix-vector products per iteration are the whole loop.
struct SolveItem<'a> {
    w: &'a mut ItemWork,
    stop: Stop,
}

impl pulp::WithSimd for SolveItem<'_> {
    type Output = (usize, f64);
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> (usize, f64) {
        solve_item(self.w, self.stop)
    }
}

/// Log-domain Sinkhorn on host memory for a batch of cost matrices `[batch, n, m]`.
///
/// Marginals are uniform over the valid rows (`1/n_valid`) and columns (`1/m_valid`);
/// masked tokens get zero mass. An item with no valid row or no valid column gets an all-zero
/// plan, `n_iter = 0` and a marginal error of 0. Allocates its result and a workspace; use
/// [`sinkhorn_host_into`] to reuse both across calls.
///
/// # Panics
/// If `cost` or a mask does not match the problem's shape (a caller bug).
pub fn sinkhorn_host(cost: &[f64], problem: Problem<'_>, eps: f64, stop: Stop) -> HostPlan {
    let mut out = HostPlan {
        plan: Vec::new(),
        n_iter: Vec::new(),
        marginal_error: Vec::new(),
    };
    sinkhorn_host_into(
        cost,
        problem,
        eps,
        stop,
        &mut SinkhornWorkspace::new(),
        &mut out,
    );
    out
}

/// [`sinkhorn_host`] writing into `out` and using `ws` for every temporary: after a first
/// call of the same (or larger) size it performs no heap allocation when it runs on one
/// thread (batch of 1, or a one-thread rayon pool); otherwise items are solved in parallel
/// over rayon, whose scheduling is its own.
///
/// The iteration is a stabilised scaling-domain Sinkhorn (see `solve_item`), the same
/// sequence of updates as the log-domain `sinkhorn_log`, with two matrix-vector products per
/// iteration instead of two `exp` per matrix entry.
///
/// # Panics
/// If `cost` or a mask does not match the problem's shape (a caller bug).
pub fn sinkhorn_host_into(
    cost: &[f64],
    problem: Problem<'_>,
    eps: f64,
    stop: Stop,
    ws: &mut SinkhornWorkspace,
    out: &mut HostPlan,
) {
    let Problem {
        batch,
        n,
        m,
        row_mask,
        col_mask,
    } = problem;
    assert_eq!(cost.len(), batch * n * m, "cost has the wrong length");
    row_mask.inspect(|r| assert_eq!(r.len(), batch * n, "row mask has the wrong length"));
    col_mask.inspect(|c| assert_eq!(c.len(), batch * m, "column mask has the wrong length"));
    resize(&mut out.plan, batch * n * m, 0.0);
    resize(&mut out.n_iter, batch, 0);
    resize(&mut out.marginal_error, batch, 0.0);
    if ws.items.len() < batch {
        ws.items.resize_with(batch, ItemWork::default);
    }
    let solve = |bi: usize, w: &mut ItemWork, plan: &mut [f64]| -> (usize, f64) {
        w.rows.clear();
        w.rows
            .extend((0..n).filter(|&i| row_mask.is_none_or(|r| r[bi * n + i])));
        w.cols.clear();
        w.cols
            .extend((0..m).filter(|&j| col_mask.is_none_or(|c| c[bi * m + j])));
        let (nv, mv) = (w.rows.len(), w.cols.len());
        if nv == 0 || mv == 0 {
            return (0, 0.0);
        }
        let c = &cost[bi * n * m..(bi + 1) * n * m];
        w.logk.clear();
        for &i in &w.rows {
            w.logk.extend(w.cols.iter().map(|&j| -c[i * m + j] / eps));
        }
        resize(&mut w.kernel, nv * mv, 0.0);
        resize(&mut w.alpha, nv, 0.0);
        resize(&mut w.u, nv, 1.0);
        resize(&mut w.kv, nv, 0.0);
        resize(&mut w.beta, mv, 0.0);
        resize(&mut w.v, mv, 1.0);
        resize(&mut w.ktu, mv, 0.0);
        let res = crate::host::simd(SolveItem { w: &mut *w, stop });
        for (ii, &i) in w.rows.iter().enumerate() {
            let (ui, krow) = (w.u[ii], &w.kernel[ii * mv..(ii + 1) * mv]);
            for (jj, &j) in w.cols.iter().enumerate() {
                plan[i * m + j] = ui * krow[jj] * w.v[jj];
            }
        }
        res
    };
    let chunk = (n * m).max(1);
    let items = &mut ws.items[..batch];
    let serial = batch <= 1 || rayon::current_num_threads() <= 1;
    if serial {
        for (bi, ((w, plan), (it, err))) in items
            .iter_mut()
            .zip(out.plan.chunks_mut(chunk))
            .zip(out.n_iter.iter_mut().zip(out.marginal_error.iter_mut()))
            .enumerate()
        {
            (*it, *err) = solve(bi, w, plan);
        }
    } else {
        items
            .par_iter_mut()
            .zip(out.plan.par_chunks_mut(chunk))
            .zip(
                out.n_iter
                    .par_iter_mut()
                    .zip(out.marginal_error.par_iter_mut()),
            )
            .enumerate()
            .for_each(|(bi, ((w, plan), (it, err)))| {
                (*it, *err) = solve(bi, w, plan);
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_costs_give_uniform_plan() {
        let cost = vec![0.0; 12];
        let p = sinkhorn_host(
            &cost,
            Problem {
                batch: 1,
                n: 3,
                m: 4,
                row_mask: None,
                col_mask: None,
            },
            0.1,
            Stop::Iterations(10),
        );
        for v in p.plan {
            assert!((v - 1.0 / 12.0).abs() < 1e-15);
        }
    }

    #[test]
    fn masked_tokens_get_no_mass_and_empty_items_are_zero() {
        let cost: Vec<f64> = (0..2 * 2 * 3).map(|k| (k % 5) as f64 * 0.3).collect();
        let rows = [true, false, false, false];
        let cols = [true, true, false, true, true, true];
        let p = sinkhorn_host(
            &cost,
            Problem {
                batch: 2,
                n: 2,
                m: 3,
                row_mask: Some(&rows),
                col_mask: Some(&cols),
            },
            0.1,
            Stop::Tolerance {
                tol: 1e-12,
                max_iter: 10_000,
            },
        );
        assert_eq!(p.plan[2], 0.0);
        assert!(p.plan[3..6].iter().all(|&v| v == 0.0));
        assert!((p.plan[0] + p.plan[1] - 1.0).abs() < 1e-12);
        assert!((p.plan[0] - 0.5).abs() < 1e-9);
        assert!(p.plan[6..].iter().all(|&v| v == 0.0));
        assert_eq!(p.n_iter[1], 0);
    }

    #[test]
    fn tiny_eps_stays_finite() {
        let cost: Vec<f64> = (0..20).map(|k| ((k * 7) % 11) as f64 / 3.0).collect();
        let p = sinkhorn_host(
            &cost,
            Problem {
                batch: 1,
                n: 4,
                m: 5,
                row_mask: None,
                col_mask: None,
            },
            0.005,
            Stop::Iterations(200),
        );
        assert!(p.plan.iter().all(|v| v.is_finite()));
        let total: f64 = p.plan.iter().sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}

#[cfg(test)]
mod scaling_tests {
    use super::*;

    /// The plain log-domain iteration (POT's `sinkhorn_log`), unmasked, as a reference.
    fn log_domain(cost: &[f64], n: usize, m: usize, eps: f64, iters: usize) -> Vec<f64> {
        let (la, lb) = (-(n as f64).ln(), -(m as f64).ln());
        let (mut fu, mut fv) = (vec![0.0; n], vec![0.0; m]);
        for _ in 0..iters {
            for j in 0..m {
                fv[j] = lb - lse((0..n).map(|i| -cost[i * m + j] / eps + fu[i]));
            }
            for i in 0..n {
                fu[i] = la - lse((0..m).map(|j| -cost[i * m + j] / eps + fv[j]));
            }
        }
        (0..n * m)
            .map(|k| (-cost[k] / eps + fu[k / m] + fv[k % m]).exp())
            .collect()
    }

    fn costs(len: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 11) as f64 / (1u64 << 53) as f64 * scale
            })
            .collect()
    }

    #[test]
    fn scaling_iteration_equals_log_domain_down_to_small_eps() {
        // eps 0.005 on costs in [0, 4]: exp(-C/eps) reaches e^-800, below f64's range, so
        // this exercises the log-domain fallback and the absorptions.
        for (eps, iters) in [(0.1, 100), (0.01, 300), (0.005, 300)] {
            let (n, m) = (23, 9);
            let cost = costs(n * m, 11, 4.0);
            let p = sinkhorn_host(
                &cost,
                Problem {
                    batch: 1,
                    n,
                    m,
                    row_mask: None,
                    col_mask: None,
                },
                eps,
                Stop::Iterations(iters),
            );
            let r = log_domain(&cost, n, m, eps, iters);
            for (a, b) in p.plan.iter().zip(&r) {
                assert!(
                    (a - b).abs() <= 1e-12 + 1e-9 * b.abs(),
                    "eps {eps}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn reused_workspace_gives_identical_results_across_sizes() {
        let mut ws = SinkhornWorkspace::new();
        let mut out = HostPlan {
            plan: vec![],
            n_iter: vec![],
            marginal_error: vec![],
        };
        for (batch, n, m) in [(3, 40, 12), (2, 7, 5), (3, 40, 12)] {
            let cost = costs(batch * n * m, 5, 2.0);
            let problem = Problem {
                batch,
                n,
                m,
                row_mask: None,
                col_mask: None,
            };
            let stop = Stop::Tolerance {
                tol: 1e-10,
                max_iter: 5000,
            };
            sinkhorn_host_into(&cost, problem, 0.05, stop, &mut ws, &mut out);
            assert_eq!(out, sinkhorn_host(&cost, problem, 0.05, stop));
            assert!(out.marginal_error.iter().all(|&e| e < 1e-10));
        }
    }
}
