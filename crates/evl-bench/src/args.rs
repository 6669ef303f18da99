//! The options of each benchmark, as `evl-ecg bench <verb>` takes them (the binary flattens
//! these into its command line).
#![allow(missing_docs)] // clap turns each field's doc comment into its --help text.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// Arguments of `bench infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model directory.
    #[arg(long, default_value = "quickstart-out/model")]
    pub model: PathBuf,
    /// Directory of WFDB records (default: ../shared/data/ptbxl_subset/records500).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Records timed.
    #[arg(long, default_value_t = 20)]
    pub n: usize,
    /// Timed passes over the records (after one warm-up pass).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Threads on both sides.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Do not run the PyTorch reference.
    #[arg(long)]
    pub no_torch: bool,
    /// Also time an int8 copy of the model (`evl-ecg model quantize` writes one) on the same
    /// records, and compare its answers with the f32 engine's.
    #[arg(long, value_name = "DIR")]
    pub int8: Option<PathBuf>,
    /// Python interpreter.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Device of the burn model: cpu, cuda:N or vulkan:N (GPU kinds need their cargo
    /// feature). The framework-free engine always runs on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: evl_models::DeviceSpec,
}

/// Arguments of `bench train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Teacher bundle to train (default: a fresh model of the `zoo` preset's teacher
    /// architecture, the shipped teacher's: image stem, width 192).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Student bundle to train (default: a fresh model of the presets' student architecture).
    #[arg(long)]
    pub student: Option<PathBuf>,
    /// Measure one model only: `teacher` or `student`.
    #[arg(long, value_parser = ["teacher", "student"])]
    pub only: Option<String>,
    /// Synthetic records the batch is drawn from.
    #[arg(long, default_value_t = 32)]
    pub records: usize,
    /// Timed optimiser steps (median reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Threads on both sides (0 = all cores, as training runs).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Do not run the PyTorch reference.
    #[arg(long)]
    pub no_torch: bool,
    /// Python interpreter.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// Arguments of `bench io`.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Directory searched recursively for .hea records (default: ../shared/data).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Passes over all records (best pass reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Do not run wfdb-python.
    #[arg(long)]
    pub no_python: bool,
    /// Python interpreter.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Threads for the parallel measurement (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Arguments of `bench render`.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Resolution (training resolution by default).
    #[arg(long, default_value_t = 100.0)]
    pub dpi: f32,
    /// Images per measurement.
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Do not run the matplotlib reference.
    #[arg(long)]
    pub no_python: bool,
    /// Python interpreter.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// Shape presets of the loss benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShapePreset {
    /// The default small student/teacher pair (B=8, V_t=64, V_s=16, L=96/64, D=256/128).
    Small,
    /// Paper-like shapes scaled to CPU (B=4, V_t=576, V_s=144, L=512, D_t=1024, D_s=512).
    Paper,
    /// Both.
    Both,
}

/// Arguments of `bench losses`.
#[derive(Debug, Args)]
pub struct LossesArgs {
    /// Which shapes to measure.
    #[arg(long, value_enum, default_value = "both")]
    pub preset: ShapePreset,
    /// Timed repetitions per measurement (median reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Measure both sides this many times, alternating ours and the reference, and keep each
    /// side's fastest median. On a shared machine other tenants only ever add time, so the
    /// least disturbed round is the better estimate; alternating keeps a slow spell from
    /// landing on one side only. The same rule applies to both sides.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Tiny shapes and one repetition: checks the command end to end, times mean nothing.
    #[arg(long)]
    pub quick: bool,
    /// Do not run the PyTorch/POT reference.
    #[arg(long)]
    pub no_torch: bool,
    /// Python interpreter for the reference script.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Append the results table (Markdown) to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Device for our side: cpu, cuda:N or vulkan:N (GPU kinds need their cargo feature).
    /// On a GPU the losses run as tensor ops and each timing ends with a device sync; the
    /// PyTorch reference then runs on CUDA device 0.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}
