//! Vanilla knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531; fixtures
//! family `kd_vanilla`).
//!
//! `L = T^2 * sum_{n,c} p_t (log p_t - log p_s) / N` with `p = softmax(z / T)`: KL(teacher ||
//! student) with PyTorch's `batchmean` (divide by rows). Sequences `[batch, len, vocab]` are
//! flattened to rows first. The teacher's logits are *not* detached here (the fixtures check
//! both gradients); a frozen teacher simply has no parameters to update.
//!
//! Different vocabularies: vanilla KD needs one. [`SharedVocab`] maps the two tokenizers onto
//! the tokens whose surface strings are identical (after removing the BPE word-boundary
//! markers `Ġ`/`▁` and lower-casing nothing); each model's logits are gathered onto that
//! shared list and the softmaxes are renormalised over it. Positions are aligned by index
//! over the answer tokens, truncated to the shorter answer. This is the common "exact match"
//! mapping of cross-tokenizer KD papers (e.g. MinED's baseline); tokens outside the
//! intersection carry no KD signal, which is exactly the weakness ULD/MultiLevelOT/EVL-ECG
//! address.
//!
//! The fused kernel is in `host/kd.rs`; [`kd_vanilla_with`] chooses the form ([`Kernel`]).

use crate::Kernel;
use burn::tensor::{Int, Tensor, activation};
use std::collections::HashMap;

/// `T^2 * KL(softmax(zt/T) || softmax(zs/T))`, summed over classes, averaged over rows, in
/// the default form ([`Kernel::Auto`]; see [`kd_vanilla_with`]).
///
/// # Shapes
/// - `zs`, `zt`: `[n, c]`
pub fn kd_vanilla(zs: Tensor<2>, zt: Tensor<2>, temperature: f64) -> Tensor<1> {
    kd_vanilla_with(zs, zt, temperature, Kernel::Auto)
}

/// [`kd_vanilla`] in the form `kernel` chooses: fused (the default on the CPU), one host
/// pass per row computes the value and both gradients in closed form
/// (`dL/dzs = T (p_s - p_t) / n`, `dL/dzt = T p_t (log p_t - log p_s - KL_row) / n`);
/// graph, log-softmaxes as burn tensor ops.
///
/// # Shapes
/// - `zs`, `zt`: `[n, c]`
pub fn kd_vanilla_with(
    zs: Tensor<2>,
    zt: Tensor<2>,
    temperature: f64,
    kernel: Kernel,
) -> Tensor<1> {
    if kernel.fused_for(&zs) {
        crate::host::kd::kd_fused(&zs, &zt, temperature)
    } else {
        kd_graph(zs, zt, temperature)
    }
}

/// [`kd_vanilla`] as burn tensor ops ([`Kernel::Graph`], and `Auto` off the CPU).
fn kd_graph(zs: Tensor<2>, zt: Tensor<2>, temperature: f64) -> Tensor<1> {
    let [n, _] = zs.dims();
    let log_ps = activation::log_softmax(zs.mul_scalar(1.0 / temperature), 1);
    let log_pt = activation::log_softmax(zt.mul_scalar(1.0 / temperature), 1);
    let pt = log_pt.clone().exp();
    (pt * (log_pt - log_ps))
        .sum()
        .mul_scalar(temperature * temperature / n as f64)
}

/// Token ids of the two vocabularies that share a surface string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedVocab {
    /// Student ids, one per shared token.
    pub student_ids: Vec<i64>,
    /// Teacher ids, aligned with `student_ids`.
    pub teacher_ids: Vec<i64>,
}

fn surface(token: &str) -> String {
    token.replace(['Ġ', '▁'], " ")
}

impl SharedVocab {
    /// Intersects two vocabularies given as id -> token string lists.
    pub fn new(student_vocab: &[String], teacher_vocab: &[String]) -> Self {
        let teacher: HashMap<String, usize> = teacher_vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (surface(t), i))
            .collect();
        let (mut student_ids, mut teacher_ids) = (Vec::new(), Vec::new());
        for (i, t) in student_vocab.iter().enumerate() {
            if let Some(&j) = teacher.get(&surface(t)) {
                student_ids.push(i as i64);
                teacher_ids.push(j as i64);
            }
        }
        Self {
            student_ids,
            teacher_ids,
        }
    }

    /// Number of shared tokens.
    pub fn len(&self) -> usize {
        self.student_ids.len()
    }

    /// True when the vocabularies share nothing.
    pub fn is_empty(&self) -> bool {
        self.student_ids.is_empty()
    }

    /// Gathers `[n, vocab]` logits onto the shared list (`[n, len]`).
    pub fn gather(logits: Tensor<2>, ids: &[i64]) -> Tensor<2> {
        let idx = Tensor::<1, Int>::from_data(
            burn::tensor::TensorData::new(ids.to_vec(), [ids.len()]),
            &logits.device(),
        );
        logits.select(1, idx)
    }

    /// Vanilla KD over the shared vocabulary ([`kd_vanilla`], default kernel).
    ///
    /// # Shapes
    /// - `zs`: `[n, v_s]`, `zt`: `[n, v_t]`
    pub fn kd(&self, zs: Tensor<2>, zt: Tensor<2>, temperature: f64) -> Tensor<1> {
        self.kd_with(zs, zt, temperature, Kernel::Auto)
    }

    /// [`Self::kd`] in the form `kernel` chooses ([`kd_vanilla_with`]).
    ///
    /// # Shapes
    /// - `zs`: `[n, v_s]`, `zt`: `[n, v_t]`
    pub fn kd_with(
        &self,
        zs: Tensor<2>,
        zt: Tensor<2>,
        temperature: f64,
        kernel: Kernel,
    ) -> Tensor<1> {
        kd_vanilla_with(
            Self::gather(zs, &self.student_ids),
            Self::gather(zt, &self.teacher_ids),
            temperature,
            kernel,
        )
    }
}
