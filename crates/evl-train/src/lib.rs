//! Training for evl-ecg: tokenizers and conversations ([`text`]), batching records into model
//! inputs ([`batch`]), supervised fine-tuning and distillation with EVL-ECG or a baseline
//! ([`train`]), checkpoints that survive interruption ([`checkpoint`]), evaluation
//! ([`eval`]) and the end-to-end quickstart ([`quickstart`]).

pub mod analysis;
pub mod batch;
pub mod checkpoint;
pub mod dataset_eval;
pub mod eval;
pub mod infer;
pub mod job;
pub mod quickstart;
pub mod text;
pub mod train;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Tokenizer training, loading or saving failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
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
