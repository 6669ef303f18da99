//! The paper's real model families in burn, loaded from their Hugging Face / LLaVA checkpoint
//! folders (read by the framework-free `evl-hf`):
//!
//! - [`qwen3_vl`]: Qwen3-VL, the student family (Qwen3-VL-2B-Instruct);
//! - [`llava_next`]: LLaVA-NeXT, the teacher family (PULSE-7B = llava-v1.6-vicuna-7b tuned on
//!   ECGInstruct), in the transformers and the original LLaVA naming;
//! - [`decoder`]: the LLaMA-family decoder both share (RMSNorm, GQA with a KV cache, rotary
//!   positions incl. multimodal sections, SwiGLU);
//! - [`io`]: checkpoint tensors <-> burn parameters by their checkpoint names.

pub mod decoder;
pub mod io;
pub mod llava_next;
pub mod qwen3_vl;

use burn::tensor::Tensor;

/// Errors of the real models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HfError {
    /// A configuration problem.
    #[error(transparent)]
    Config(#[from] evl_hf::config::Error),
    /// A weights problem.
    #[error(transparent)]
    Weights(#[from] evl_hf::weights::Error),
    /// Inputs that do not fit the model (placeholders vs images, shapes).
    #[error("{0}")]
    Input(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, HfError>;

/// The argmax of the last position's logits `[1, 1, vocab]`, with `banned` ids excluded.
pub fn greedy_pick(logits: Tensor<3>, banned: &[i64]) -> i64 {
    let v = logits.dims()[2];
    let values = crate::device::to_vec_f64(logits.reshape([v]));
    let mut best = (f64::NEG_INFINITY, 0usize);
    for (i, &x) in values.iter().enumerate() {
        if banned.contains(&(i as i64)) {
            continue;
        }
        // First maximum wins, as torch.argmax.
        if x > best.0 {
            best = (x, i);
        }
    }
    best.1 as i64
}
