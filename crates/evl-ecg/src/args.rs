//! clap types only.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Distil large ECG vision-language models into small students (EVL-ECG, ICML 2026).
#[derive(Debug, Parser)]
#[command(name = "evl-ecg", version, about, long_about = None)]
pub struct Cli {
    /// Emit JSON Lines on stdout (`{"type", "data"}`, ending in a `summary`).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub noun: Noun,
}

/// Top-level nouns.
#[derive(Debug, Subcommand)]
pub enum Noun {
    /// Measure speed against reference implementations run in the same invocation.
    #[command(subcommand)]
    Bench(BenchVerb),
}

/// `evl-ecg bench <verb>`.
#[derive(Debug, Subcommand)]
pub enum BenchVerb {
    /// Forward+backward time of every distillation loss, ours (burn, flex CPU) vs PyTorch,
    /// and the Sinkhorn plan vs POT's `sinkhorn_log`, with ratios.
    ///
    /// The PyTorch/POT side runs `bench/torch_losses.py` with the same shapes and thread
    /// count (install with `python3 -m pip install -r bench/requirements.txt`). Without
    /// PyTorch the command says so and reports our times alone.
    Losses(BenchLossesArgs),
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
pub struct BenchLossesArgs {
    /// Which shapes to measure.
    #[arg(long, value_enum, default_value = "both")]
    pub preset: ShapePreset,
    /// Timed repetitions per measurement (median reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
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
}
