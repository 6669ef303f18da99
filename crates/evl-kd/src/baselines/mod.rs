//! Baseline distillation losses the paper compares against (method.md 3). Each file's
//! docs name its source and the choices made where the source leaves room.

pub mod kd;
pub mod uld;

pub use kd::{SharedVocab, kd_vanilla};
pub use uld::{UldOutput, uld_loss};
