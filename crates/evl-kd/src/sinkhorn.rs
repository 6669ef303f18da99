//! Entropic optimal transport by log-domain Sinkhorn iterations (method.md 2.1).
//!
//! Two implementations of the same iteration, in POT's `sinkhorn_log` order (column update,
//! then row update, from zero potentials):
//!
//! - [`sinkhorn_host`]: a fused kernel on host `f64` slices, parallel over the batch, used for
//!   the default *detached* plan. It needs no autodiff graph, so it runs outside burn; the loss
//!   then differentiates only `sum(P * C)` (envelope theorem).
//! - [`sinkhorn_log_plan`]: the same iteration as burn tensor ops, used when the gradient must
//!   flow through the iterations (`PlanGradient::Unrolled`).
//!
//! We write Sinkhorn ourselves because no maintained Rust crate offers a batched, masked,
//! log-domain solver with per-example stopping (and none on burn tensors).

use burn::tensor::Tensor;
use evl_models::ops::logsumexp;
use rayon::prelude::*;

/// How the iterations stop.
#[derive(Clone, Copy, Debug, PartialEq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PlanGradient {
    /// The plan is a constant in back-propagation (envelope/Danskin): the default.
    #[default]
    Detached,
    /// Differentiate through every Sinkhorn iteration.
    Unrolled,
}

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

/// Numerically stable `log(sum(exp(x)))` over an iterator of values (two passes, max shift).
#[inline]
fn lse(values: &[f64]) -> f64 {
    let mx = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return mx;
    }
    let s: f64 = values.iter().map(|&v| (v - mx).exp()).sum();
    mx + s.ln()
}

/// Solves one item on its valid rows/columns. `logk` is `-C/eps`, `n x m` row-major, and
/// `logk_t` its transpose. Returns `(log_u, log_v, iterations, column L1 error)`.
fn solve_one(
    logk: &[f64],
    logk_t: &[f64],
    n: usize,
    m: usize,
    stop: Stop,
) -> (Vec<f64>, Vec<f64>, usize, f64) {
    let log_a = -(n as f64).ln();
    let log_b = -(m as f64).ln();
    let b = 1.0 / m as f64;
    let mut log_u = vec![0.0; n];
    let mut log_v = vec![0.0; m];
    let mut scratch = vec![0.0; n.max(m)];
    let (max_iter, tol) = match stop {
        Stop::Iterations(k) => (k, None),
        Stop::Tolerance { tol, max_iter } => (max_iter, Some(tol)),
    };
    let mut it = 0;
    let mut err = f64::NAN;
    while it < max_iter {
        for j in 0..m {
            let col = &logk_t[j * n..(j + 1) * n];
            for i in 0..n {
                scratch[i] = col[i] + log_u[i];
            }
            log_v[j] = log_b - lse(&scratch[..n]);
        }
        for i in 0..n {
            let row = &logk[i * m..(i + 1) * m];
            for j in 0..m {
                scratch[j] = row[j] + log_v[j];
            }
            log_u[i] = log_a - lse(&scratch[..m]);
        }
        it += 1;
        if let Some(tol) = tol {
            err = column_error(logk_t, &log_u, &log_v, n, m, b);
            if err < tol {
                break;
            }
        }
    }
    if tol.is_none() {
        err = column_error(logk_t, &log_u, &log_v, n, m, b);
    }
    (log_u, log_v, it, err)
}

fn column_error(logk_t: &[f64], log_u: &[f64], log_v: &[f64], n: usize, m: usize, b: f64) -> f64 {
    (0..m)
        .map(|j| {
            let col = &logk_t[j * n..(j + 1) * n];
            let mut s = 0.0;
            for i in 0..n {
                s += (col[i] + log_u[i] + log_v[j]).exp();
            }
            (s - b).abs()
        })
        .sum()
}

/// Log-domain Sinkhorn on host memory for a batch of cost matrices `[batch, n, m]`.
///
/// Marginals are uniform over the valid rows (`1/n_valid`) and columns (`1/m_valid`);
/// masked tokens get zero mass. An item with no valid row or no valid column gets an all-zero
/// plan, `n_iter = 0` and a marginal error of 0.
///
/// # Panics
/// If `cost` or a mask does not match the problem's shape (a caller bug).
pub fn sinkhorn_host(cost: &[f64], problem: Problem<'_>, eps: f64, stop: Stop) -> HostPlan {
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
    let mut plan = vec![0.0; batch * n * m];
    let results: Vec<(usize, f64)> = plan
        .par_chunks_mut((n * m).max(1))
        .enumerate()
        .map(|(bi, out)| {
            let rows: Vec<usize> = (0..n)
                .filter(|&i| row_mask.is_none_or(|r| r[bi * n + i]))
                .collect();
            let cols: Vec<usize> = (0..m)
                .filter(|&j| col_mask.is_none_or(|c| c[bi * m + j]))
                .collect();
            let (nv, mv) = (rows.len(), cols.len());
            if nv == 0 || mv == 0 {
                return (0, 0.0);
            }
            let c = &cost[bi * n * m..(bi + 1) * n * m];
            let mut logk = vec![0.0; nv * mv];
            let mut logk_t = vec![0.0; nv * mv];
            for (ii, &i) in rows.iter().enumerate() {
                for (jj, &j) in cols.iter().enumerate() {
                    let v = -c[i * m + j] / eps;
                    logk[ii * mv + jj] = v;
                    logk_t[jj * nv + ii] = v;
                }
            }
            let (log_u, log_v, it, err) = solve_one(&logk, &logk_t, nv, mv, stop);
            for (ii, &i) in rows.iter().enumerate() {
                for (jj, &j) in cols.iter().enumerate() {
                    out[i * m + j] = (logk[ii * mv + jj] + log_u[ii] + log_v[jj]).exp();
                }
            }
            (it, err)
        })
        .collect();
    HostPlan {
        plan,
        n_iter: results.iter().map(|r| r.0).collect(),
        marginal_error: results.iter().map(|r| r.1).collect(),
    }
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
