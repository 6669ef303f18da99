//! What the `evl-ecg` binary runs, as library calls (cargo's `cargo::ops` is the model): the
//! resumable training and distillation jobs over a user's dataset with their typed TOML
//! configuration ([`job`]), the end-to-end quickstart with its Markdown report
//! ([`quickstart`]), and the data behind the report's method figures ([`analysis`]).
//!
//! Orchestrates the crates below it; owns no model, loss or file format of its own.

pub mod analysis;
pub mod hf_job;
pub mod job;
pub mod quickstart;

/// Errors of jobs and the quickstart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// File access.
    #[error("cannot access {}", .path.display())]
    Io {
        /// Path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Data loading or preprocessing failed.
    #[error("data")]
    Data(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A model or checkpoint could not be written or read.
    #[error("checkpoint {}: {what}", .path.display())]
    Checkpoint {
        /// Path.
        path: std::path::PathBuf,
        /// Problem.
        what: String,
    },
    /// Invalid settings.
    #[error("setting `{field}`: {what}")]
    Config {
        /// Setting.
        field: &'static str,
        /// Problem.
        what: String,
    },
    /// Training failed.
    #[error(transparent)]
    Train(#[from] evl_train::Error),
    /// Inference or evaluation failed.
    #[error(transparent)]
    Infer(#[from] evl_infer::Error),
    /// A run-directory file could not be written or read.
    #[error(transparent)]
    Run(#[from] evl_run::Error),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<evl_kd::MethodError> for Error {
    fn from(e: evl_kd::MethodError) -> Self {
        Error::Config {
            field: "method",
            what: e.to_string(),
        }
    }
}
