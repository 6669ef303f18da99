//! Running a trained model on ECG records, without any training machinery: tokenizers and
//! prompts ([`text`]), records -> model inputs ([`input`]), the model bundle a run directory
//! holds with its `interpret` path ([`bundle`]), evaluation of a model on labelled samples
//! ([`eval`]) and on a user's dataset with robustness perturbations ([`dataset`]).
//!
//! Training (`evl-train`) builds on this crate; a service or a device only needs this one.

pub mod bundle;
pub mod dataset;
pub mod eval;
pub mod hf;
pub mod input;
pub mod served;
pub mod text;

/// Errors of inference and evaluation.
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
    #[error("cannot prepare the records")]
    Data(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A model file could not be written or read.
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
    /// A dataset could not be found, recognised or read.
    #[error(transparent)]
    Dataset(#[from] ecg_data::Error),
    /// Invalid settings.
    #[error("setting `{field}`: {what}")]
    Config {
        /// Setting.
        field: &'static str,
        /// Problem.
        what: String,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
