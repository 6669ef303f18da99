//! Multi-head cross-attention alignment, `L_mhca` (method.md 2.2; fixtures family `mhca`).
//!
//! Student hidden states are queries, teacher hidden states keys and values:
//! `head_i = softmax((H_s W_Q^i)(H_t W_K^i)^T / sqrt(d_k)) (H_t W_V^i)`,
//! `Hhat_t = concat(head_1..head_h) W_O`, and the loss is the squared L2 distance between
//! `H_s` and `Hhat_t` summed over the width and averaged over valid student tokens. Heads are
//! contiguous column blocks of the projections; there are no biases. `H_s` is differentiated
//! both as the target and as the query (no stop-gradient), as in the fixtures.
//!
//! This file holds the tensor-op form; the fused host kernel is in `host/mhca.rs`, and
//! [`mhca_align_loss_with`] chooses between them ([`Kernel`]).

use crate::Kernel;
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};

/// Key-mask fill: a large finite negative instead of `-inf`, so a fully padded row yields a
/// uniform (finite) attention rather than NaN.
const MASK_SCORE: f64 = -1e30;

/// Projection weights of the cross-attention, as plain tensors.
#[derive(Clone, Debug)]
pub struct MhcaWeights {
    /// `[d_s, h*d_k]` query projection.
    pub wq: Tensor<2>,
    /// `[d_t, h*d_k]` key projection.
    pub wk: Tensor<2>,
    /// `[d_t, h*d_k]` value projection.
    pub wv: Tensor<2>,
    /// `[h*d_k, d_s]` output projection.
    pub wo: Tensor<2>,
}

fn project(x: Tensor<3>, w: Tensor<2>) -> Tensor<3> {
    let [b, l, d] = x.dims();
    let [_, o] = w.dims();
    x.reshape([b * l, d]).matmul(w).reshape([b, l, o])
}

/// The attention-weighted teacher context `Hhat_t`.
///
/// # Shapes
/// - `hs`: `[batch, l_s, d_s]`, `ht`: `[batch, l_t, d_t]`, `key_mask`: `[batch, l_t]`
///   (true = valid key) -> `[batch, l_s, d_s]`
///
/// # Panics
/// If the weight shapes do not fit the inputs or `h*d_k` is not divisible by `n_heads`.
pub fn mhca_forward(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w: &MhcaWeights,
    n_heads: usize,
    key_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<3> {
    let [b, ls, _] = hs.dims();
    let [_, lt, _] = ht.dims();
    let [_, hdk] = w.wq.dims();
    assert!(
        n_heads > 0 && hdk % n_heads == 0,
        "mhca: width {hdk} is not divisible into {n_heads} heads"
    );
    let dk = hdk / n_heads;
    let heads = |x: Tensor<3>, l: usize| x.reshape([b, l, n_heads, dk]).swap_dims(1, 2); // [b, h, l, dk]
    let q = heads(project(hs, w.wq.clone()), ls);
    let k = heads(project(ht.clone(), w.wk.clone()), lt);
    let v = heads(project(ht, w.wv.clone()), lt);
    let mut scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (dk as f64).sqrt()); // [b, h, ls, lt]
    if let Some(mask) = key_mask {
        let invalid = mask
            .clone()
            .bool_not()
            .reshape([b, 1, 1, lt])
            .expand([b, n_heads, ls, lt]);
        scores = scores.mask_fill(invalid, MASK_SCORE);
    }
    let attn = evl_models::ops::softmax(scores, 3);
    let ctx = attn.matmul(v).swap_dims(1, 2).reshape([b, ls, hdk]); // [b, ls, h*dk]
    project(ctx, w.wo.clone())
}

/// `sum over valid student tokens ||H_s - Hhat_t||^2 / N_valid` (0 when nothing is valid).
///
/// # Shapes
/// - `hs`, `hhat_t`: `[batch, l_s, d_s]`, `student_mask`: `[batch, l_s]`
pub fn mhca_loss(
    hs: Tensor<3>,
    hhat_t: Tensor<3>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    let [b, ls, _] = hs.dims();
    let per_token = (hs - hhat_t).square().sum_dim(2).reshape([b, ls]); // [b, ls]
    match student_mask {
        None => per_token.sum().mul_scalar(1.0 / (b * ls) as f64),
        Some(m) => evl_models::ops::masked_mean(per_token, m.clone()),
    }
}

/// Configuration of [`MhcaAlign`].
#[derive(Config, Debug)]
pub struct MhcaAlignConfig {
    /// Student hidden width `D_s` (queries and output).
    pub d_student: usize,
    /// Teacher hidden width `D_t` (keys and values).
    pub d_teacher: usize,
    /// Number of heads `h` (paper: 8).
    #[config(default = 8)]
    pub n_heads: usize,
    /// Width per head `d_k`; default `D_s / h`.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
}

impl MhcaAlignConfig {
    /// Builds the module with freshly initialised projections.
    pub fn init(&self, device: &Device) -> MhcaAlign {
        let dk = self
            .head_dim
            .unwrap_or((self.d_student / self.n_heads).max(1));
        let hdk = dk * self.n_heads;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        MhcaAlign {
            wq: lin(self.d_student, hdk),
            wk: lin(self.d_teacher, hdk),
            wv: lin(self.d_teacher, hdk),
            wo: lin(hdk, self.d_student),
            n_heads: self.n_heads,
        }
    }
}

/// Trainable cross-attention aligner (`W_Q`, `W_K`, `W_V`, `W_O`), method.md 2.2.
#[derive(Module, Debug)]
pub struct MhcaAlign {
    /// Query projection `D_s -> h d_k`.
    pub wq: Linear,
    /// Key projection `D_t -> h d_k`.
    pub wk: Linear,
    /// Value projection `D_t -> h d_k`.
    pub wv: Linear,
    /// Output projection `h d_k -> D_s`.
    pub wo: Linear,
    /// Number of heads.
    pub n_heads: usize,
}

impl MhcaAlign {
    /// The current weights as tensors.
    pub fn weights(&self) -> MhcaWeights {
        MhcaWeights {
            wq: self.wq.weight.val(),
            wk: self.wk.weight.val(),
            wv: self.wv.weight.val(),
            wo: self.wo.weight.val(),
        }
    }

    /// `Hhat_t` for student queries `hs` over teacher states `ht`.
    ///
    /// # Shapes
    /// - `hs`: `[batch, l_s, d_s]`, `ht`: `[batch, l_t, d_t]` -> `[batch, l_s, d_s]`
    pub fn forward(
        &self,
        hs: Tensor<3>,
        ht: Tensor<3>,
        key_mask: Option<&Tensor<2, Bool>>,
    ) -> Tensor<3> {
        mhca_forward(hs, ht, &self.weights(), self.n_heads, key_mask)
    }
}

/// `L_mhca` of the cross-attention aligner in one call (forward pass, loss and gradients),
/// the same function as `mhca_loss(hs, mhca_forward(hs, ht, w, ..), student_mask)`, in the
/// default form ([`Kernel::Auto`]; see [`mhca_align_loss_with`]).
pub fn mhca_align_loss(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w: &MhcaWeights,
    n_heads: usize,
    key_mask: Option<&Tensor<2, Bool>>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    mhca_align_loss_with(hs, ht, w, n_heads, key_mask, student_mask, Kernel::Auto)
}

/// [`mhca_align_loss`] in the form `kernel` chooses: the fused host kernel (in
/// `host/mhca.rs`; exact gradients handed to autodiff, the default on the CPU) or the
/// tensor-op form `mhca_loss(hs, mhca_forward(..), ..)`.
pub fn mhca_align_loss_with(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w: &MhcaWeights,
    n_heads: usize,
    key_mask: Option<&Tensor<2, Bool>>,
    student_mask: Option<&Tensor<2, Bool>>,
    kernel: Kernel,
) -> Tensor<1> {
    if kernel.fused_for(&hs) {
        crate::host::mhca::align_loss_fused(hs, ht, w, n_heads, key_mask, student_mask)
    } else {
        let hhat = mhca_forward(hs.clone(), ht, w, n_heads, key_mask);
        mhca_loss(hs, hhat, student_mask)
    }
}
