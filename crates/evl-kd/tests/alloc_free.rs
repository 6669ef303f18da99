//! The detached-plan Sinkhorn kernel performs no heap allocation once its workspace is sized
//! (issue 3: "a fused, allocation-free kernel"). `allocation_counter` (a counting global
//! allocator) observes every allocation made on the solving thread.

use evl_kd::sinkhorn::{HostPlan, Problem, SinkhornWorkspace, Stop, sinkhorn_host_into};
#[test]
fn warm_workspace_solves_without_allocating() {
    let (batch, n, m) = (3, 57, 14);
    let cost: Vec<f64> = (0..batch * n * m)
        .map(|k| ((k * 7919) % 1000) as f64 / 250.0)
        .collect();
    let rows: Vec<bool> = (0..batch * n).map(|k| k % 11 != 3).collect();
    let cols: Vec<bool> = (0..batch * m).map(|k| k % 5 != 1).collect();
    let problem = Problem {
        batch,
        n,
        m,
        row_mask: Some(&rows),
        col_mask: Some(&cols),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    pool.install(|| {
        let mut ws = SinkhornWorkspace::new();
        let mut out = HostPlan {
            plan: vec![],
            n_iter: vec![],
            marginal_error: vec![],
        };
        // eps 0.005 also takes the log-domain fallback and absorption paths.
        for eps in [0.1, 0.005] {
            let stop = Stop::Tolerance {
                tol: 1e-9,
                max_iter: 20_000,
            };
            let cold = allocation_counter::measure(|| {
                sinkhorn_host_into(&cost, problem, eps, stop, &mut ws, &mut out);
            });
            if eps == 0.1 {
                // the first call sizes the buffers: proves the counter sees this thread
                assert!(cold.count_total > 0);
            }
            let info = allocation_counter::measure(|| {
                sinkhorn_host_into(&cost, problem, eps, stop, &mut ws, &mut out);
            });
            assert_eq!(info.count_total, 0, "eps {eps}: the warm solve allocated");
            assert!(out.plan.iter().all(|v| v.is_finite()));
            assert!(out.n_iter.iter().all(|&k| k > 0));
        }
    });
}
