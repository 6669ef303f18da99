//! Training for evl-ecg: the supervised fine-tuning and distillation loops ([`train`]),
//! vision pre-training ([`pretrain`]), training batches ([`batch`]), the frozen teacher's cached outputs ([`cache`]) and
//! checkpoints that survive interruption ([`checkpoint`]).
//!
//! Which loss a method uses and how it is mixed is `evl-kd`'s ([`evl_kd::method`]); record
//! preparation, tokenizers, evaluation and the model bundle are `evl-infer`'s; jobs and the
//! quickstart are `evl-ops`'s.

pub mod batch;
pub mod cache;
pub mod checkpoint;
pub mod hf;
pub mod pretrain;
pub mod train;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Preparing records, tokenizing or evaluating failed.
    #[error(transparent)]
    Infer(Box<evl_infer::Error>),
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
    /// A checkpoint could not be written or read.
    #[error("checkpoint {}: {what}", .path.display())]
    Checkpoint {
        /// Path.
        path: std::path::PathBuf,
        /// Problem.
        what: String,
    },
    /// A run-directory file could not be written or read.
    #[error(transparent)]
    Run(#[from] evl_run::Error),
    /// Invalid settings.
    #[error("setting `{field}`: {what}")]
    Config {
        /// Setting.
        field: &'static str,
        /// Problem.
        what: String,
    },
}

impl From<evl_infer::Error> for Error {
    fn from(e: evl_infer::Error) -> Self {
        Error::Infer(Box::new(e))
    }
}

impl From<evl_kd::MethodError> for Error {
    fn from(e: evl_kd::MethodError) -> Self {
        Error::Config {
            field: "method",
            what: e.to_string(),
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
