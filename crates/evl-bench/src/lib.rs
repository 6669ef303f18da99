//! `evl-ecg bench`: speed measured against a reference in the same run, never alone.
//!
//! - [`losses`]: every distillation loss forward + backward, ours (burn) against PyTorch, and
//!   the Sinkhorn plan against POT;
//! - [`data`]: records read per second against wfdb-python, images rendered per second
//!   against matplotlib;
//! - [`infer`]: student inference latency and memory against the same model in PyTorch;
//! - [`train`]: an SFT optimiser step of the built-in teacher and student against PyTorch;
//! - [`serve`]: the HTTP service under load against the same engine called directly.
//!
//! The reference scripts are compiled in ([`scripts`]). This crate is a measuring harness that
//! reports to a person: like the binary, it prints its tables and uses `anyhow` for errors,
//! which is why it is a crate of its own rather than part of a library below it.

mod args;
pub mod data;
pub mod hf;
pub mod infer;
pub mod losses;
pub mod scripts;
pub mod serve;
pub mod train;

pub use args::{InferArgs, IoArgs, LossesArgs, RenderArgs, ShapePreset, TrainArgs};
