//! Baseline distillation losses the paper compares against (method.md 3). Each file's
//! docs name its source and the choices made where the source leaves room. Vanilla KD, ULD
//! and MultiLevelOT have a fused host form (in `host/`) beside their tensor-op form and take
//! a [`crate::Kernel`]; the others are tensor ops only.

pub mod dskd;
pub mod emkd;
pub mod hungarian;
pub mod kd;
pub mod multilevel_ot;
pub mod rkd;
pub mod tinybert;
pub mod uld;

pub use dskd::{Dskd, DskdConfig, DskdOutput};
pub use emkd::{EmkdOutput, emkd_loss, match_vision_tokens};
pub use kd::{SharedVocab, kd_vanilla, kd_vanilla_with};
pub use multilevel_ot::{MultiLevelOtConfig, MultiLevelOtOutput, multilevel_ot_loss};
pub use rkd::rkd_loss;
pub use tinybert::{tinybert_attention_loss, tinybert_hidden_loss};
pub use uld::{UldOutput, uld_loss, uld_loss_with};
