//! Task losses written by hand because burn's versions take integer targets only or lack
//! masking: BCE with logits on soft targets, softmax cross-entropy, and token-level LM
//! cross-entropy with a mask (fixtures families `bce_with_logits`, `softmax_ce`).

use burn::tensor::{Bool, Int, Tensor, activation};

/// `mean(max(x,0) - x y + log(1 + exp(-|x|)))` over every element (PyTorch
/// `BCEWithLogitsLoss()`); targets may be soft values in [0, 1].
///
/// # Shapes
/// - `logits`, `targets`: `[n, c]`
pub fn bce_with_logits(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let softplus_neg_abs = logits.clone().abs().neg().exp().log1p();
    (logits.clone().clamp_min(0.0) - logits * targets + softplus_neg_abs).mean()
}

/// `mean_n -log softmax(z_n)[y_n]` (PyTorch `CrossEntropyLoss()`).
///
/// # Shapes
/// - `logits`: `[n, c]`, `labels`: `[n]`
pub fn softmax_ce(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let logp = activation::log_softmax(logits, 1);
    logp.gather(1, labels.reshape([n, 1])).neg().mean()
}

/// Next-token cross-entropy averaged over the positions where `mask` is true (answer
/// tokens); 0 when none is.
///
/// # Shapes
/// - `logits`: `[batch, len, vocab]`, `targets`: `[batch, len]`, `mask`: `[batch, len]`
pub fn masked_token_ce(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    mask: Tensor<2, Bool>,
) -> Tensor<1> {
    let [b, l, _] = logits.dims();
    let logp = activation::log_softmax(logits, 2);
    let nll = logp
        .gather(2, targets.reshape([b, l, 1]))
        .reshape([b, l])
        .neg();
    evl_models::ops::masked_mean(nll, mask)
}
