//! Evaluation for evl-ecg: continuous-score metrics (and, later, ECG-Bench parity scoring).
//!
//! This crate sees no tensors and no models: it scores arrays of labels, scores and
//! predictions, so it can score any model's output. scikit-learn is the reference for every
//! metric here; `../shared/fixtures/README.md` section 7 fixes the conventions, notably that a
//! class whose gold column holds one value is *skipped* (and listed) by the macro ROC AUC
//! instead of turning it into NaN.
//!
//! Entry points: [`multilabel_metrics`], [`multiple_choice_accuracy`], [`roc_auc`].

pub mod continuous;
pub mod ecgbench;
pub mod metrics;
pub mod pyrandom;

pub use metrics::{
    MultilabelMetrics, f1_binary, multilabel_metrics, multiple_choice_accuracy, roc_auc,
};

/// Errors from malformed metric inputs.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Two inputs that must have the same shape do not.
    #[error("`{field}` has {found} entries, expected {expected}")]
    Shape {
        /// The offending input.
        field: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// A label outside {0, 1}.
    #[error("`{field}`[{index}] = {value}: expected 0 or 1")]
    NotBinary {
        /// The offending input.
        field: &'static str,
        /// Flat index.
        index: usize,
        /// The value found.
        value: i64,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
