//! Model-side building blocks of evl-ecg on [burn](https://burn.dev) 0.22.1.
//!
//! This crate is one of the three places in the workspace that see burn (with `evl-kd` and the
//! training crate), so that a breaking burn release is a contained edit. It owns:
//!
//! - [`ops`]: tensor operations burn lacks (max-shifted `logsumexp`, explicit-difference
//!   squared distances, masked means, L2 normalisation with PyTorch's floor), each tested once;
//! - [`device`]: choosing the compute device (`flex` on CPU, `cuda` behind the cargo feature)
//!   and the float precision, plus host <-> tensor conversion helpers.
//!
//! The ECG teacher and student models (issue #4) will live here too.

pub mod device;
pub mod ops;

pub use burn;
pub use device::{DeviceSpec, Precision};
