//! Model-side building blocks of evl-ecg on [burn](https://burn.dev) 0.22.1.
//!
//! burn is a direct dependency of the crates that build tensors (this one, `evl-kd`,
//! `evl-infer`, `evl-train`, `evl-ops`, `evl-bench`) and of no other; nothing re-exports it
//! (the binary holds a [`device::Device`] and names no burn item). It owns:
//!
//! - [`ops`]: tensor operations burn lacks (max-shifted `logsumexp`, explicit-difference
//!   squared distances, masked means, L2 normalisation with PyTorch's floor), each tested once;
//! - [`device`]: choosing the compute device (`flex` on CPU, `cuda` behind the cargo feature)
//!   and the float precision, plus host <-> tensor conversion helpers.
//!
//! - [`vlm`]: the ECG vision-language model family (image or signal encoder -> projector ->
//!   decoder LM) and the [`vlm::Distillable`] view distillation reads;
//! - [`fused`]: the language model's SFT forward and backward pass as host kernels (plain
//!   loops and GEMMs, a shared visual prefix per record), for fast CPU training steps;
//! - [`native`]: the same forward pass without a framework (plain loops, KV cache), for fast
//!   CPU inference of small students;
//! - [`hf`]: the paper's real architectures (Qwen3-VL, LLaVA-NeXT and its original LLaVA
//!   naming) in burn, sharing one decoder.
//!
//! Why one crate of about 7.5k lines (well over the workspace's ~3k guide): it is every model
//! the project runs, and the models share the decoder blocks, device and precision handling
//! and the [`vlm::Distillable`] view that distillation reads. [`native`] and [`fused`] are
//! the built-in family's forward and training passes without burn: they read its parameters
//! where burn keeps them (the model's private fields), which a separate crate could only do
//! through a public copy of every field. A crate per family would re-export the shared pieces
//! to each other; the file formats they load already live apart, in `evl-hf`.

pub mod device;
pub mod fused;
pub mod hf;
pub mod native;
pub mod ops;
pub mod vlm;

pub use device::{DeviceSpec, Precision};
