//! EM-KD (Feng et al., "EM-KD: Distilling Efficient Multimodal Large Language Model with
//! Unbalanced Vision Tokens", AAAI 2025), as its paper defines it.
//!
//! 1. Vision tokens are paired by Hungarian matching on their *vision logits*: the output
//!    head applied to each vision token's hidden state. Each of the student's `v_s` tokens
//!    gets a distinct teacher token (`v_s <= v_t`) minimising the total Manhattan (L1)
//!    distance between the two tokens' logit vectors (no gradient through the matching).
//! 2. Vision-language affinity distillation (VLAD): within each model, the cosine affinity
//!    of every text token with every (matched) vision token, `A = norm(H_text)
//!    norm(H_vis)^T` (`[l, v_s]`); the student's and the teacher's are compared with
//!    smooth-L1. Each affinity lives in its own model's space, so no projection between the
//!    widths is needed (or learnt).
//! 3. Vision semantic distillation (VSD): reverse KL `KL(p_s || p_t)` between the matched
//!    vision tokens' output distributions.
//!
//! `L = w_vad VLAD + w_vsd VSD`. Choices where the two models differ in tokenizer (EM-KD
//! assumes one): both models' vision logits are first gathered onto a shared vocabulary by
//! the caller (see `SharedVocab`), for the matching and for VSD; text positions are paired
//! by index over the answer, truncated to the shorter. The matching runs on host memory per
//! item.

use super::hungarian::assign_min_cost;
use super::rkd::smooth_l1;
use burn::tensor::{Int, Tensor, TensorData};
use evl_models::device::to_vec_f64;
use evl_models::ops::{l2_normalize, log_softmax};

/// Terms of EM-KD.
#[derive(Clone, Debug)]
pub struct EmkdOutput {
    /// Weighted total.
    pub loss: Tensor<1>,
    /// Smooth-L1 between the vision-language affinity matrices (VLAD).
    pub vad: Tensor<1>,
    /// Reverse KL between matched vision-token distributions.
    pub vsd: Tensor<1>,
    /// Teacher token matched to each student vision token, per item.
    pub matching: Vec<Vec<usize>>,
}

/// Hungarian matching on the L1 distance between vision logits, per batch item: `[batch][v_s]`
/// teacher indices. `t_logits`: `[batch, v_t, v]`, `s_logits`: `[batch, v_s, v]` over one
/// vocabulary.
pub fn match_vision_tokens(t_logits: Tensor<3>, s_logits: Tensor<3>) -> Vec<Vec<usize>> {
    let [b, vt, v] = t_logits.dims();
    let [_, vs, _] = s_logits.dims();
    let cost = (s_logits.detach().reshape([b, vs, 1, v])
        - t_logits.detach().reshape([b, 1, vt, v]))
    .abs()
    .sum_dim(3);
    let cost = to_vec_f64(cost);
    (0..b)
        .map(|i| assign_min_cost(&cost[i * vs * vt..(i + 1) * vs * vt], vs, vt))
        .collect()
}

/// EM-KD loss.
///
/// # Shapes
/// - `t_vis`: `[batch, v_t, d_t]` and `t_text`: `[batch, l_t, d_t]` (teacher hidden states at
///   its vision tokens and at the text positions), `s_vis`: `[batch, v_s, d_s]`, `s_text`:
///   `[batch, l_s, d_s]` (the student's), `t_vis_logits`: `[batch, v_t, v]`,
///   `s_vis_logits`: `[batch, v_s, v]` (the vision tokens' logits on a shared vocabulary)
#[allow(clippy::too_many_arguments)]
pub fn emkd_loss(
    t_vis: Tensor<3>,
    s_vis: Tensor<3>,
    t_text: Tensor<3>,
    s_text: Tensor<3>,
    t_vis_logits: Tensor<3>,
    s_vis_logits: Tensor<3>,
    w_vad: f64,
    w_vsd: f64,
) -> EmkdOutput {
    let [b, vs, _] = s_vis.dims();
    let matching = match_vision_tokens(t_vis_logits.clone(), s_vis_logits.clone());
    let flat: Vec<i64> = matching.iter().flatten().map(|&j| j as i64).collect();
    let [_, _, d] = t_vis.dims();
    let [_, _, v] = t_vis_logits.dims();
    let idx = Tensor::<3, Int>::from_data(TensorData::new(flat, [b, vs, 1]), &t_vis.device());
    let t_vis_m = t_vis.gather(1, idx.clone().expand([b, vs, d])); // [b, vs, d_t]
    let t_logit_m = t_vis_logits.gather(1, idx.expand([b, vs, v])); // [b, vs, v]
    let l = s_text.dims()[1].min(t_text.dims()[1]);
    let cut = |x: Tensor<3>| {
        let [bb, _, dd] = x.dims();
        x.slice([0..bb, 0..l, 0..dd])
    };
    let aff = |text: Tensor<3>, vis: Tensor<3>| {
        l2_normalize(text, 1e-12).matmul(l2_normalize(vis, 1e-12).swap_dims(1, 2))
    };
    let vad = smooth_l1(aff(cut(s_text), s_vis), aff(cut(t_text), t_vis_m));
    let log_ps = log_softmax(s_vis_logits, 2);
    let log_pt = log_softmax(t_logit_m, 2);
    let vsd = (log_ps.clone().exp() * (log_ps - log_pt))
        .sum()
        .mul_scalar(1.0 / (b * vs).max(1) as f64);
    let loss = vad.clone().mul_scalar(w_vad) + vsd.clone().mul_scalar(w_vsd);
    EmkdOutput {
        loss,
        vad,
        vsd,
        matching,
    }
}
