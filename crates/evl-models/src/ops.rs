//! Tensor operations burn 0.22 lacks, written once and tested here.
//!
//! Two numerical rules run through this module (see `../shared/fixtures/README.md`):
//! squared distances take their *value* from explicit differences `sum_d (x_d - y_d)^2`, which
//! stay exact for close points and large magnitudes where the Gram form cancels; and every
//! normalisation floors a norm the way PyTorch's `F.normalize` does.

use burn::tensor::{Bool, Tensor};

/// Max-shifted log-sum-exp along `dim`, keeping the reduced dimension (size 1).
///
/// The shift is detached (it cancels exactly in value and gradient), and a slice whose
/// entries are all `-inf` yields `-inf` rather than NaN.
pub fn logsumexp<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let m = x.clone().detach().max_dim(dim);
    let m = m.clone().mask_fill(m.clone().is_inf(), 0.0);
    (x - m.clone()).exp().sum_dim(dim).log() + m
}

/// Softmax along `dim` as `exp(log_softmax(x))`; see [`log_softmax`] for why it is written
/// by hand.
pub fn softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    log_softmax(x, dim).exp()
}

/// Log-softmax along `dim`, accurate in its gradient for saturated rows.
///
/// The shift is the row maximum *with* its gradient (not detached). The function is
/// shift-invariant, so the value is unchanged, but back-propagation then forms the gradient
/// of the winning entry as minus the sum of the others' gradients: a sum of small, accurate
/// terms instead of the difference `g_max - <g, p>` of two nearly equal numbers. For a nearly
/// one-hot attention row this cancellation otherwise costs `eps_machine / (1 - p_max)` relative
/// accuracy (17% in f32 on the large-magnitude MHCA fixture). A row of `-inf` stays `-inf`.
pub fn log_softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let m = x.clone().max_dim(dim);
    let m = m.clone().mask_fill(m.clone().is_inf(), 0.0);
    let shifted = x - m; // max entry exactly 0
    let lse = shifted.clone().exp().sum_dim(dim).log();
    shifted - lse
}

/// `x / max(||x||_2, eps)` along the last dimension (PyTorch `F.normalize`).
///
/// The norm is computed as `sqrt(max(sum x^2, eps^2))`, which has the same value and the same
/// gradient as clamping the norm, and stays finite for an all-zero vector.
pub fn l2_normalize<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    let norm = x
        .clone()
        .square()
        .sum_dim(D - 1)
        .clamp_min(eps * eps)
        .sqrt();
    x / norm
}

/// Squared Euclidean distances between the rows of `x` and `y`, batched, *without* gradient,
/// from explicit differences (exact for close points; see the module docs).
///
/// # Shapes
/// - `x`: `[batch, n, d]`, `y`: `[batch, m, d]` -> `[batch, n, m]`
pub fn sq_dist_explicit(x: Tensor<3>, y: Tensor<3>) -> Tensor<3> {
    use rayon::prelude::*;
    if !crate::device::on_host(&x) {
        return sq_dist_explicit_device(x.detach(), y.detach(), 1 << 26);
    }
    let [b, n, d] = x.dims();
    let [_, m, _] = y.dims();
    let like = x.clone();
    // Host loop in f64 (rayon over rows): one pass, no [b, n, m, d] temporary, and more
    // accurate than the tensor dtype for f32 inputs.
    let xv = crate::device::to_vec_f64(x.detach());
    let yv = crate::device::to_vec_f64(y.detach());
    let mut out = vec![0.0; b * n * m];
    out.par_chunks_mut(m.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, i) = (row / n.max(1), row % n.max(1));
            let xi = &xv[(bi * n + i) * d..(bi * n + i + 1) * d];
            for (j, oj) in o.iter_mut().enumerate() {
                let yj = &yv[(bi * m + j) * d..(bi * m + j + 1) * d];
                *oj = xi.iter().zip(yj).map(|(a, c)| (a - c) * (a - c)).sum();
            }
        });
    crate::device::tensor_like(&out, [b, n, m], &like).detach()
}

/// [`sq_dist_explicit`] on a GPU: the same explicit differences as tensor ops, in row blocks
/// whose `[batch, rows, m, d]` temporary stays near `budget` elements (2^26 in use; a host
/// round trip of the inputs would cost more than the arithmetic there).
fn sq_dist_explicit_device(x: Tensor<3>, y: Tensor<3>, budget: usize) -> Tensor<3> {
    let [b, n, d] = x.dims();
    let [_, m, _] = y.dims();
    if n == 0 || m == 0 {
        return Tensor::zeros([b, n, m], (&x.device(), x.dtype()));
    }
    let rows = (budget / (b * m * d).max(1)).clamp(1, n.max(1));
    let yb = y.unsqueeze_dim::<4>(1); // [b, 1, m, d]
    let blocks: Vec<Tensor<3>> = (0..n)
        .step_by(rows)
        .map(|start| {
            let end = (start + rows).min(n);
            let xi = x
                .clone()
                .slice([0..b, start..end, 0..d])
                .unsqueeze_dim::<4>(2); // [b, r, 1, d]
            (xi - yb.clone()).square().sum_dim(3).squeeze_dim::<3>(3) // [b, r, m]
        })
        .collect();
    Tensor::cat(blocks, 1)
}

/// Gram-form squared distances `|x|^2 + |y|^2 - 2 x.y` (differentiable, cheap, but
/// inexact for close points: use only for gradients, see [`sq_dist`]).
///
/// # Shapes
/// - `x`: `[batch, n, d]`, `y`: `[batch, m, d]` -> `[batch, n, m]`
pub fn sq_dist_gram(x: Tensor<3>, y: Tensor<3>) -> Tensor<3> {
    let xn = x.clone().square().sum_dim(2); // [b, n, 1]
    let yn = y.clone().square().sum_dim(2).swap_dims(1, 2); // [b, 1, m]
    xn + yn - x.matmul(y.swap_dims(1, 2)).mul_scalar(2.0)
}

/// Differentiable squared distances whose value comes from explicit differences and whose
/// gradient is the analytic `2 (x_i - y_j)`, routed through the Gram form.
///
/// `value + (gram - detach(gram))` adds an exact zero in the forward pass (a float minus
/// itself), so the value is the explicit one bit for bit, while back-propagation sees the
/// Gram form, whose gradient equals the explicit form's. This keeps autodiff memory at
/// `[batch, n, m]` instead of `[batch, n, m, d]`.
///
/// # Shapes
/// - `x`: `[batch, n, d]`, `y`: `[batch, m, d]` -> `[batch, n, m]`
pub fn sq_dist(x: Tensor<3>, y: Tensor<3>) -> Tensor<3> {
    let value = sq_dist_explicit(x.clone(), y.clone());
    with_gram_gradient(value, x, y)
}

/// `value` (the explicit squared distances of `x` and `y`, computed by the caller) with the
/// gradient of [`sq_dist`]: lets a caller that already holds the values skip recomputing them.
///
/// # Shapes
/// - `value`: `[batch, n, m]`, `x`: `[batch, n, d]`, `y`: `[batch, m, d]`
pub fn with_gram_gradient(value: Tensor<3>, x: Tensor<3>, y: Tensor<3>) -> Tensor<3> {
    if !(x.is_tracked() || y.is_tracked()) {
        return value;
    }
    let gram = sq_dist_gram(x, y);
    value + (gram.clone() - gram.detach())
}

/// Mean of `x` over the entries where `mask` is true; `0` when no entry is.
pub fn masked_mean<const D: usize>(x: Tensor<D>, mask: Tensor<D, Bool>) -> Tensor<1> {
    let w = mask.float().cast(x.dtype());
    let n = w.clone().sum().clamp_min(1.0);
    (x * w).sum() / n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Precision, tensor_from_f64, to_vec_f64};
    use burn::tensor::Device;

    fn t3(v: &[f64], s: [usize; 3]) -> Tensor<3> {
        tensor_from_f64(v, s, &Device::flex(), Precision::F64)
    }

    #[test]
    fn logsumexp_matches_direct_and_handles_neg_inf() {
        let x = tensor_from_f64(
            &[1.0, 2.0, 3.0, f64::NEG_INFINITY],
            [2, 2],
            &Device::flex(),
            Precision::F64,
        );
        let l = to_vec_f64(logsumexp(x, 1));
        assert!((l[0] - (1f64.exp() + 2f64.exp()).ln()).abs() < 1e-14);
        assert!((l[1] - 3.0).abs() < 1e-14);
        let x = tensor_from_f64(
            &[f64::NEG_INFINITY; 2],
            [1, 2],
            &Device::flex(),
            Precision::F64,
        );
        assert_eq!(to_vec_f64(logsumexp(x, 1)), vec![f64::NEG_INFINITY]);
    }

    #[test]
    fn device_form_of_explicit_distances_matches_the_host_loop() {
        // (n, m, d, budget): one block, several blocks (budget 100 -> 2 rows of 7 per block),
        // one row per block, and no rows.
        for (n, m, d, budget) in [
            (3, 4, 5, 1 << 26),
            (7, 5, 5, 100),
            (4, 3, 9, 1),
            (0, 3, 2, 8),
        ] {
            let xs: Vec<f64> = (0..2 * n * d)
                .map(|i| ((i * 37 % 101) as f64) * 0.25 - 12.0)
                .collect();
            let ys: Vec<f64> = (0..2 * m * d)
                .map(|i| ((i * 53 % 97) as f64) * 0.5 - 20.0)
                .collect();
            let (x, y) = (t3(&xs, [2, n, d]), t3(&ys, [2, m, d]));
            let host = to_vec_f64(sq_dist_explicit(x.clone(), y.clone()));
            let dev = sq_dist_explicit_device(x, y, budget);
            assert_eq!(dev.dims(), [2, n, m]);
            let dev = to_vec_f64(dev);
            for (a, b) in host.iter().zip(&dev) {
                assert!((a - b).abs() <= 1e-12 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn explicit_distance_is_exact_for_identical_large_points() {
        // Gram form: 1e8 + 1e8 - 2e8 cancels to noise; explicit differences give exact 0.
        let x = t3(&[1e4 + 0.1, 3e4, 1e4 + 0.1, 3e4, 1.0, 2.0], [1, 3, 2]);
        let d = to_vec_f64(sq_dist_explicit(x.clone(), x));
        assert_eq!(d[1], 0.0);
        assert_eq!(d[3], 0.0);
        assert!((d[2] - ((1e4 + 0.1 - 1.0f64).powi(2) + (3e4 - 2.0f64).powi(2))).abs() < 1e-6);
    }

    #[test]
    fn sq_dist_gradient_is_analytic() {
        let dev = Device::flex().autodiff();
        let x = tensor_from_f64(&[0.5, -1.0, 2.0, 0.25], [1, 2, 2], &dev, Precision::F64)
            .require_grad();
        let y = tensor_from_f64(&[1.0, 1.0], [1, 1, 2], &dev, Precision::F64);
        let g = sq_dist(x.clone(), y).sum().backward();
        let gx = to_vec_f64(x.grad(&g).expect("grad"));
        assert_eq!(gx, vec![2.0 * -0.5, 2.0 * -2.0, 2.0 * 1.0, 2.0 * -0.75]);
    }

    #[test]
    fn l2_normalize_zero_vector_is_finite() {
        let x = tensor_from_f64(
            &[0.0, 0.0, 3.0, 4.0],
            [2, 2],
            &Device::flex(),
            Precision::F64,
        );
        assert_eq!(to_vec_f64(l2_normalize(x, 1e-12)), vec![0.0, 0.0, 0.6, 0.8]);
    }
}
