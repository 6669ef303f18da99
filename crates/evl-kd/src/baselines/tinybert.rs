//! TinyBERT-style intermediate-layer distillation (Jiao et al., "TinyBERT: Distilling BERT
//! for Natural Language Understanding", Findings of EMNLP 2020).
//!
//! Hidden states: `MSE(H_s W_h, H_t)` with a learned projection `W_h: D_s -> D_t` (TinyBERT's
//! eq. 8). Attention maps: `MSE(A_s, A_t)` over heads (eq. 7), only where the two models have
//! the same number of heads and sequence length; otherwise it is not defined and
//! [`tinybert_attention_loss`] returns `None`.
//!
//! DEVIATION (heterogeneous tokenizers, not in TinyBERT, which shares its teacher's
//! tokenizer): when `L_s != L_t`, teacher position `floor(i * L_t / L_s)` is paired with
//! student position `i` (uniform index resampling), so both sequences span the same
//! conversation. The MSE averages over valid student positions and the teacher width.

use burn::tensor::{Bool, Int, Tensor, TensorData};

/// Teacher indices paired with each of `l_s` student positions.
pub fn resample_index(l_s: usize, l_t: usize) -> Vec<i64> {
    (0..l_s)
        .map(|i| ((i * l_t) / l_s.max(1)).min(l_t.saturating_sub(1)) as i64)
        .collect()
}

/// Hidden-state MSE through the projection `w_h` (`[d_s, d_t]`).
///
/// # Shapes
/// - `hs`: `[batch, l_s, d_s]`, `ht`: `[batch, l_t, d_t]`, `student_mask`: `[batch, l_s]`
pub fn tinybert_hidden_loss(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w_h: Tensor<2>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    let [b, ls, ds] = hs.dims();
    let [_, lt, dt] = ht.dims();
    let idx =
        Tensor::<1, Int>::from_data(TensorData::new(resample_index(ls, lt), [ls]), &ht.device());
    let ht = ht.select(1, idx); // [b, ls, dt]
    let proj = hs.reshape([b * ls, ds]).matmul(w_h).reshape([b, ls, dt]);
    let per_token = (proj - ht)
        .square()
        .sum_dim(2)
        .reshape([b, ls])
        .mul_scalar(1.0 / dt as f64);
    match student_mask {
        Some(m) => evl_models::ops::masked_mean(per_token, m.clone()),
        None => per_token.mean(),
    }
}

/// Attention-map MSE, defined only for equal shapes `[batch, heads, l, l]`.
pub fn tinybert_attention_loss(attn_s: Tensor<4>, attn_t: Tensor<4>) -> Option<Tensor<1>> {
    (attn_s.dims() == attn_t.dims()).then(|| (attn_s - attn_t).square().mean())
}
