//! Distillation losses of evl-ecg on burn 0.22.1: EVL-ECG's three losses and the baselines.
//!
//! The losses take tensors and masks and know nothing of files, tokenizers or models. Each is
//! available as a function of plain tensors (what the reference fixtures in
//! `../shared/fixtures` exercise) and, where it has trainable parts, as a burn module built
//! from a `*Config`.
//!
//! - [`ot`]: entropic OT matching of visual tokens (method.md 2.1) on [`sinkhorn`];
//! - [`mhca`]: multi-head cross-attention alignment (2.2);
//! - [`relation`]: geometric distance + angle relation matching (2.3);
//! - [`objective`]: the weighted total with ablation switches (2);
//! - [`method`]: the typed choice of method and ablations, and the one place each method's
//!   terms are computed and mixed with the student's cross-entropy;
//! - [`task`]: BCE, softmax and token cross-entropy;
//! - [`baselines`]: vanilla KD, TinyBERT-style, ULD, MultiLevelOT, DSKD, EM-KD, RKD.
//!
//! All functions work in `f32` and `f64` (the dtype of the inputs) on any burn device.
//!
//! Losses with a closed-form gradient exist twice: a fused host kernel (the private `host`
//! module tree) and burn tensor ops. Their configurations carry a [`Kernel`] choosing the
//! form; the default, [`Kernel::Auto`], runs the fused kernels on the CPU device and the
//! tensor ops elsewhere.
//!
//! Why one crate of about 6.5k lines (over the workspace's ~3k guide): every loss is here
//! twice on purpose, and the two forms must stay side by side. The graph forms are the
//! readable definitions (and what runs on a GPU); the fused host kernels under `host/` (about
//! half the crate) are the CPU speed (BENCHMARKS.md) and are checked element by element
//! against the graph forms and the fixtures by the same tests. Splitting the kernels into a
//! crate of their own would put the definition of a loss and its fast form, and the one
//! [`Kernel`] switch between them, on two sides of a crate boundary for no user's gain; the
//! crate still has one job (losses: tensors in, a differentiable scalar out).

pub mod baselines;
mod host;
pub mod kernel;
pub mod method;
pub mod mhca;
pub mod objective;
pub mod ot;
pub mod relation;
pub mod sinkhorn;
pub mod task;

pub use kernel::{Kernel, KernelParseError};
pub use method::{Ablation, Method, MethodError};
pub use mhca::{
    MhcaAlign, MhcaAlignConfig, MhcaWeights, mhca_align_loss, mhca_align_loss_with, mhca_forward,
    mhca_loss,
};
pub use objective::{EvlInputs, EvlLoss, EvlLossConfig, EvlTerms, EvlWeights, evl_objective};
pub use ot::{OtAlign, OtAlignConfig, OtLossConfig, OtOutput, SinkhornSettings, ot_loss};
pub use relation::{RelationConfig, RelationOutput, relation_loss};
pub use sinkhorn::{PAPER_EPS, PlanGradient, Stop};
