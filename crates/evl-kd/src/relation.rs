//! Geometric intra-architecture relation matching, `L_rel` (method.md 2.3; fixtures family
//! `relation`).
//!
//! Per example, the distance potential `psi_D` is the pairwise Euclidean distance matrix over
//! the mean of its off-diagonal entries (RKD, Park et al. 2019), and the angle potential
//! `psi_A` the pairwise cosine-similarity matrix. `L_k = sum (psi_k(Hhat_t) - psi_k(H_s))^2
//! / (B L_s^2)` over the full matrix including the diagonal, and `L_rel = (L_D + L_A) / 2`.
//! Squared distances are clamped at `1e-12` (zero gradient where clamped) and the diagonal
//! distance is 0 with zero gradient. The mean normaliser is differentiated.
//!
//! Padding (a choice method.md 2.4 leaves open): with a student mask, only pairs of valid
//! tokens enter, the distance mean is over valid off-diagonal pairs of each item, and the
//! normaliser is the number of valid pairs `sum_b n_b^2` (= `B L_s^2` without padding).
//!
//! The fused host kernel ([`relation_host`]) lives in `host/relation.rs`; this file holds the
//! settings, the tensor-op form and the choice between them ([`RelationConfig::kernel`]).

use crate::Kernel;
use burn::tensor::{Bool, Tensor};
use evl_models::device::tensor_like;
use evl_models::ops::{l2_normalize, sq_dist};

pub use crate::host::relation::{RelationHost, RelationWant, relation_host};

/// Settings of the relation loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RelationConfig {
    /// Clamp on squared distances (1e-12).
    pub dist_sq_clamp: f64,
    /// Norm floor for the cosine potential (1e-12).
    pub norm_eps: f64,
    /// Treat `Hhat_t` as a fixed target (no gradient into the aligner through `L_rel`).
    /// Default false, as in the fixtures.
    pub detach_teacher: bool,
    /// Give `L_D` and `L_A` their own gradients (one more matrix product per input). Off,
    /// only `L_rel` is differentiable and the two terms are reported as values: what the
    /// training objective needs. Default false.
    pub term_gradients: bool,
    /// Return the four potentials in [`RelationOutput`] (the fixtures check them; useful
    /// for plots). Off, the fused CPU kernel does not materialise them: the loss needs them
    /// only inside each item. Default false.
    pub potentials: bool,
    /// Fused host kernel or burn tensor ops ([`Kernel`]); default [`Kernel::Auto`].
    pub kernel: Kernel,
}

impl Default for RelationConfig {
    fn default() -> Self {
        Self {
            dist_sq_clamp: 1e-12,
            norm_eps: 1e-12,
            detach_teacher: false,
            term_gradients: false,
            potentials: false,
            kernel: Kernel::Auto,
        }
    }
}

/// Terms of the relation loss.
#[derive(Clone, Debug)]
pub struct RelationOutput {
    /// Distance term `L_D`.
    pub l_d: Tensor<1>,
    /// Angle term `L_A`.
    pub l_a: Tensor<1>,
    /// `L_rel = (L_D + L_A) / 2`.
    pub l_rel: Tensor<1>,
    /// `psi_D(Hhat_t)`, `[batch, l_s, l_s]`; `None` unless [`RelationConfig::potentials`].
    pub psi_d_t: Option<Tensor<3>>,
    /// `psi_D(H_s)`.
    pub psi_d_s: Option<Tensor<3>>,
    /// `psi_A(Hhat_t)`.
    pub psi_a_t: Option<Tensor<3>>,
    /// `psi_A(H_s)`.
    pub psi_a_s: Option<Tensor<3>>,
}

/// `[batch, l, l]` 0/1 weights of valid pairs, and the same without the diagonal.
fn pair_masks(like: &Tensor<3>, mask: Option<&[bool]>) -> (Tensor<3>, Tensor<3>) {
    let [b, l, _] = like.dims();
    let mut pairs = vec![0.0; b * l * l];
    let mut off = vec![0.0; b * l * l];
    for bi in 0..b {
        for i in 0..l {
            for j in 0..l {
                let ok = mask.is_none_or(|m| m[bi * l + i] && m[bi * l + j]);
                if ok {
                    pairs[(bi * l + i) * l + j] = 1.0;
                    if i != j {
                        off[(bi * l + i) * l + j] = 1.0;
                    }
                }
            }
        }
    }
    (
        tensor_like(&pairs, [b, l, l], like),
        tensor_like(&off, [b, l, l], like),
    )
}

/// Distance potential `psi_D` given the off-diagonal valid-pair weights.
fn psi_distance(x: Tensor<3>, off: &Tensor<3>, clamp: f64) -> Tensor<3> {
    let d = sq_dist(x.clone(), x).clamp_min(clamp).sqrt() * off.clone(); // [b, l, l], diag 0
    let count = off.clone().sum_dim(2).sum_dim(1).clamp_min(1.0); // [b, 1, 1]
    // Every off-diagonal distance is >= sqrt(clamp) > 0, so the floor only acts on items with
    // fewer than two valid tokens (no pair: mu = 0), whose potential is then 0 instead of NaN.
    let mu = (d.clone().sum_dim(2).sum_dim(1) / count).clamp_min(clamp);
    d / mu
}

/// Angle potential `psi_A`: pairwise cosine similarities, zero on padded pairs.
fn psi_angle(x: Tensor<3>, pairs: &Tensor<3>, norm_eps: f64) -> Tensor<3> {
    let xn = l2_normalize(x, norm_eps);
    xn.clone().matmul(xn.swap_dims(1, 2)) * pairs.clone()
}

/// The relation loss as burn tensor ops ([`crate::Kernel::Graph`]; what `Auto` runs off the
/// CPU, where a host round trip would cost more than it saves).
fn relation_loss_graph(
    hhat_t: Tensor<3>,
    hs: Tensor<3>,
    student_mask: Option<&Tensor<2, Bool>>,
    cfg: &RelationConfig,
) -> RelationOutput {
    let hhat_t = if cfg.detach_teacher {
        hhat_t.detach()
    } else {
        hhat_t
    };
    let mask = student_mask.map(|m| evl_models::device::to_vec_bool(m.clone()));
    let (pairs, off) = pair_masks(&hs, mask.as_deref());
    let n_pairs = pairs.clone().sum().clamp_min(1.0);
    let psi_d_t = psi_distance(hhat_t.clone(), &off, cfg.dist_sq_clamp);
    let psi_d_s = psi_distance(hs.clone(), &off, cfg.dist_sq_clamp);
    let psi_a_t = psi_angle(hhat_t, &pairs, cfg.norm_eps);
    let psi_a_s = psi_angle(hs, &pairs, cfg.norm_eps);
    let l_d = (psi_d_t.clone() - psi_d_s.clone()).square().sum() / n_pairs.clone();
    let l_a = (psi_a_t.clone() - psi_a_s.clone()).square().sum() / n_pairs;
    let l_rel = (l_d.clone() + l_a.clone()).mul_scalar(0.5);
    RelationOutput {
        l_d,
        l_a,
        l_rel,
        psi_d_t: cfg.potentials.then_some(psi_d_t),
        psi_d_s: cfg.potentials.then_some(psi_d_s),
        psi_a_t: cfg.potentials.then_some(psi_a_t),
        psi_a_s: cfg.potentials.then_some(psi_a_s),
    }
}

/// The relation loss between the aligned teacher `hhat_t` and the student `hs`.
///
/// [`RelationConfig::kernel`] chooses the form ([`crate::Kernel`]): the fused host pass per
/// batch item (value and exact gradient from two matrix products per input, instead of the
/// graph's `[B, L, L]` chains; the default on the CPU) or burn tensor ops. Both compute the
/// same function.
///
/// # Shapes
/// - `hhat_t`, `hs`: `[batch, l_s, d_s]`; `student_mask`: `[batch, l_s]`
///
/// # Panics
/// If the two inputs differ in shape.
pub fn relation_loss(
    hhat_t: Tensor<3>,
    hs: Tensor<3>,
    student_mask: Option<&Tensor<2, Bool>>,
    cfg: &RelationConfig,
) -> RelationOutput {
    assert_eq!(
        hhat_t.dims(),
        hs.dims(),
        "relation_loss: Hhat_t and H_s must have the same shape"
    );
    if cfg.kernel.fused_for(&hs) {
        crate::host::relation::relation_loss_fused(hhat_t, hs, student_mask, cfg)
    } else {
        relation_loss_graph(hhat_t, hs, student_mask, cfg)
    }
}
