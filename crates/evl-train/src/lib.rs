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

/// Write `items` as JSON Lines, atomically (parent directories created).
pub(crate) fn write_jsonl<T: serde::Serialize>(path: &std::path::Path, items: &[T]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let text: String = items
        .iter()
        .map(|l| serde_json::to_string(l).expect("plain data") + "\n")
        .collect();
    ecg_io::wfdb::atomic_write(path, text.as_bytes()).map_err(|e| Error::Data(Box::new(e)))
}
