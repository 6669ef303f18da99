//! EM-KD (Feng et al., "EM-KD: Distilling Efficient Multimodal Large Language Model with
//! Unbalanced Vision Tokens", AAAI 2025).
//!
//! 1. Vision tokens are paired by Hungarian matching: each of the student's `v_s` tokens gets
//!    a distinct teacher token (`v_s <= v_t`) minimising the total Manhattan (L1) distance
//!    between the student tokens and the (projected, detached) teacher tokens.
//! 2. Vision-affinity distillation (VAD): the text-to-vision affinity matrices
//!    `A = norm(H_text) norm(H_vis)^T` of student (`[l, v_s]`) and teacher (matched columns,
//!    `[l, v_s]`) are compared with smooth-L1.
//! 3. Vision-semantic distillation (VSD): reverse KL `KL(p_s || p_t)` between the output
//!    distributions (vocabulary logits) at matched vision-token positions.
//!
//! `L = w_vad VAD + w_vsd VSD`. Choices: text positions are paired by index over the answer,
//! truncated to the shorter (cross-tokenizer; EM-KD assumes one tokenizer); VSD needs one
//! vocabulary, so both models' vision logits are first gathered onto a shared vocabulary by
//! the caller (see `SharedVocab`), and the matching runs on host memory per item.

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
    /// Smooth-L1 between affinity matrices.
    pub vad: Tensor<1>,
    /// Reverse KL between matched vision-token distributions.
    pub vsd: Tensor<1>,
    /// Teacher token matched to each student vision token, per item.
    pub matching: Vec<Vec<usize>>,
}

/// Hungarian matching on L1 distance, per batch item: `[batch][v_s]` teacher indices.
pub fn match_vision_tokens(t_vis: Tensor<3>, s_vis: Tensor<3>) -> Vec<Vec<usize>> {
    let [b, vt, d] = t_vis.dims();
    let [_, vs, _] = s_vis.dims();
    let cost = (s_vis.detach().reshape([b, vs, 1, d]) - t_vis.detach().reshape([b, 1, vt, d]))
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
/// - `t_vis`: `[batch, v_t, d]` (teacher vision tokens projected to the student width),
///   `s_vis`: `[batch, v_s, d]`, `t_text`: `[batch, l_t, d]`, `s_text`: `[batch, l_s, d]`,
///   `t_vis_logits`: `[batch, v_t, v]`, `s_vis_logits`: `[batch, v_s, v]` (shared vocabulary)
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
    let matching = match_vision_tokens(t_vis.clone(), s_vis.clone());
    let flat: Vec<i64> = matching.iter().flatten().map(|&j| j as i64).collect();
    let [_, _, d] = t_vis.dims();
    let [_, _, v] = t_vis_logits.dims();
    let idx = Tensor::<3, Int>::from_data(TensorData::new(flat, [b, vs, 1]), &t_vis.device());
    let t_vis_m = t_vis.gather(1, idx.clone().expand([b, vs, d])); // [b, vs, d]
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
