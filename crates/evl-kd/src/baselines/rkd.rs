//! The original Relational Knowledge Distillation (Park, Kim, Lu & Cho, CVPR 2019), offered
//! as an option beside EVL-ECG's relation loss.
//!
//! Distance-wise: `psi_D(i,j) = ||x_i - x_j|| / mu` (mu = mean of the off-diagonal
//! distances), penalised with the Huber (smooth-L1, delta 1) loss. Angle-wise: the *triplet*
//! angle `psi_A(i,j,k) = <e_ij, e_kj>` with `e_ij = (x_i - x_j)/||x_i - x_j||`, also Huber.
//! `L = w_d L_D + w_a L_A` (the paper's weights: 1 and 2). Per batch item over its tokens;
//! the angle term is O(L^3) memory, so keep L small (it is a baseline, not a default).

use burn::tensor::Tensor;
use evl_models::ops::{l2_normalize, sq_dist};

/// Huber / smooth-L1 with delta 1, averaged.
pub fn smooth_l1<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<1> {
    let d = (a - b).abs();
    let quad = d.clone().clamp_max(1.0);
    // 0.5 q^2 + (|d| - q): equals 0.5 d^2 for |d| < 1 and |d| - 0.5 beyond.
    (quad.clone().square().mul_scalar(0.5) + (d - quad)).mean()
}

fn distance_potential(x: Tensor<3>) -> Tensor<3> {
    let [b, l, _] = x.dims();
    let off: Vec<f64> = (0..b * l * l)
        .map(|k| if (k / l) % l == k % l { 0.0 } else { 1.0 })
        .collect();
    let off = evl_models::device::tensor_like(&off, [b, l, l], &x);
    let d = sq_dist(x.clone(), x).clamp_min(1e-12).sqrt() * off;
    let mu = d
        .clone()
        .sum_dim(2)
        .sum_dim(1)
        .mul_scalar(1.0 / ((l * (l - 1)).max(1) as f64));
    d / mu
}

fn angle_potential(x: Tensor<3>) -> Tensor<4> {
    let [b, l, d] = x.dims();
    // e[b, i, j] = normalize(x_i - x_j): [b, l, l, d]
    let e = l2_normalize(
        x.clone().reshape([b, l, 1, d]) - x.reshape([b, 1, l, d]),
        1e-12,
    );
    // psi[b, j, i, k] = <e_ij, e_kj>
    let ej = e.swap_dims(1, 2); // [b, j, i, d]
    ej.clone().matmul(ej.swap_dims(2, 3)) // [b, j, i, k]
}

/// RKD loss between teacher and student embeddings of the same tokens.
///
/// # Shapes
/// - `t`: `[batch, l, d_t]`, `s`: `[batch, l, d_s]` (widths may differ: only relations compare)
pub fn rkd_loss(t: Tensor<3>, s: Tensor<3>, w_distance: f64, w_angle: f64) -> Tensor<1> {
    let ld = smooth_l1(distance_potential(t.clone()), distance_potential(s.clone()));
    let la = smooth_l1(angle_potential(t), angle_potential(s));
    ld.mul_scalar(w_distance) + la.mul_scalar(w_angle)
}
