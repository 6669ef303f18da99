//! ecg-io integration tests: every record under ../shared/data against wfdb-python's values,
//! label tables, annotations, malformed input.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod malformed;
mod real_data;
mod round_trip;
mod wfdb_corpus;

use std::path::PathBuf;

/// `../shared/data`, or `None` (skipped loudly; a failure under CI=true).
pub fn data_dir() -> Option<PathBuf> {
    evl_testkit::shared_dir().map(|d| d.join("data"))
}
