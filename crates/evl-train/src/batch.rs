//! Training batches: sampled (example, turn) pairs as tensors on the training device.

use burn::tensor::{Bool, Device, Int, Tensor};
use evl_infer::input::{Sample, encode_turn, pixels, text_tensors};
use evl_infer::text::TextTokenizer;
use evl_models::vlm::InputKind;

/// A batch on a device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Encoder input `[b, c, n]`.
    pub pixels: Tensor<3>,
    /// Token ids `[b, t]`.
    pub text: Tensor<2, Int>,
    /// Padding `[b, t]` (true at padding).
    pub pad: Tensor<2, Bool>,
    /// Answer positions `[b, t]`.
    pub answer: Tensor<2, Bool>,
    /// Host copies: ids and answer masks per row (unpadded).
    pub rows: Vec<(Vec<i64>, Vec<bool>)>,
}

/// The text half of a batch (ids, padding, answer positions), for steps whose visual tokens
/// come from elsewhere (a frozen encoder's cache).
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// Token ids `[b, t]`.
    pub text: Tensor<2, Int>,
    /// Padding `[b, t]` (true at padding).
    pub pad: Tensor<2, Bool>,
    /// Answer positions `[b, t]`.
    pub answer: Tensor<2, Bool>,
    /// Host copies: ids and answer masks per row (unpadded).
    pub rows: Vec<(Vec<i64>, Vec<bool>)>,
}

/// The text of sample `i`'s turn `turn_of[i]`, as tensors.
pub fn make_text_batch(
    samples: &[&Sample],
    turn_of: &[usize],
    tok: &TextTokenizer,
    device: &Device,
) -> TextBatch {
    let rows: Vec<(Vec<i64>, Vec<bool>)> = samples
        .iter()
        .zip(turn_of)
        .map(|(s, &k)| {
            let (ids, mask, _) = encode_turn(tok, &s.turns[k]);
            (ids, mask)
        })
        .collect();
    let (text, pad, answer, rows) = text_tensors(rows, device);
    TextBatch {
        text,
        pad,
        answer,
        rows,
    }
}

/// A training batch: sample `i` with its turn `turn_of[i]`.
pub fn make_batch(
    samples: &[&Sample],
    turn_of: &[usize],
    tok: &TextTokenizer,
    input: &InputKind,
    device: &Device,
) -> Batch {
    let t = make_text_batch(samples, turn_of, tok, device);
    Batch {
        pixels: pixels(samples, input, device),
        text: t.text,
        pad: t.pad,
        answer: t.answer,
        rows: t.rows,
    }
}
