//! Integration tests of evl-kd beyond the reference fixtures: finite-difference gradient
//! checks of the baselines (f64), hand-worked cases, and robustness at extreme inputs.

mod fused;
mod gradcheck;
mod hand;
mod robustness;
