//! Minimum-cost assignment (Hungarian / Kuhn–Munkres with potentials, O(n^2 m)).
//!
//! Written here because the kept Rust crates (`pathfinding::kuhn_munkres`) require an `Ord`
//! integer-like weight type, and EM-KD matches on real-valued Manhattan distances; scaling
//! to integers would lose ties and precision. Tested against brute force below.

/// Assigns each of the `n` rows to a distinct column of the `n x m` cost matrix (`n <= m`),
/// minimising the total cost. Returns the column of each row.
///
/// # Panics
/// If `n > m` or `cost.len() != n * m` (caller bugs), or if a cost is not finite.
pub fn assign_min_cost(cost: &[f64], n: usize, m: usize) -> Vec<usize> {
    assert!(n <= m, "assignment needs rows <= columns, got {n} x {m}");
    assert_eq!(cost.len(), n * m, "cost has the wrong length");
    assert!(
        cost.iter().all(|c| c.is_finite()),
        "assignment costs must be finite"
    );
    // 1-based potentials formulation: u over rows, v over columns, p[j] = row matched to col j.
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; m + 1];
    let mut p = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0usize;
            for j in 1..=m {
                if !used[j] {
                    let cur = cost[(i0 - 1) * m + (j - 1)] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut out = vec![0usize; n];
    for j in 1..=m {
        if p[j] != 0 {
            out[p[j] - 1] = j - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(cost: &[f64], n: usize, m: usize) -> f64 {
        fn rec(cost: &[f64], n: usize, m: usize, i: usize, used: &mut Vec<bool>) -> f64 {
            if i == n {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..m {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost[i * m + j] + rec(cost, n, m, i + 1, used));
                    used[j] = false;
                }
            }
            best
        }
        rec(cost, n, m, 0, &mut vec![false; m])
    }

    #[test]
    fn matches_brute_force() {
        let mut state = 12345u64;
        for (n, m) in [(1, 1), (3, 3), (3, 5), (4, 6), (5, 5)] {
            let cost: Vec<f64> = (0..n * m)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 33) as f64 / (1u64 << 31) as f64
                })
                .collect();
            let a = assign_min_cost(&cost, n, m);
            let mut cols = a.clone();
            cols.sort();
            cols.dedup();
            assert_eq!(cols.len(), n, "columns must be distinct");
            let total: f64 = a.iter().enumerate().map(|(i, &j)| cost[i * m + j]).sum();
            assert!((total - brute(&cost, n, m)).abs() < 1e-12);
        }
    }
}
