//! The crate's one error type. Every variant names the file and, where it applies, the line,
//! the record, the signal and the field, so a user can find the bad byte without a debugger.

use std::path::PathBuf;

/// Errors raised while reading or writing ECG data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be opened, read or written.
    #[error("cannot access {}", .path.display())]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A header line has a field that is missing or does not parse.
    #[error("{}:{line}: field `{field}`: expected {expected}, found `{found}`", .path.display())]
    Header {
        /// Header file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Name of the field (as the WFDB spec calls it).
        field: &'static str,
        /// What a valid value looks like.
        expected: String,
        /// What the file holds.
        found: String,
    },
    /// A header has a comment or field that is not valid UTF-8.
    #[error("{}:{line}: not valid UTF-8 text", .path.display())]
    NotUtf8 {
        /// Header file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A WFDB storage format this crate does not decode.
    #[error(
        "{}: signal {signal} is in format {format}; supported: 8, 16, 24, 32, 61, 80, 160, 212, 310, 311, 508, 516, 524",
        .path.display()
    )]
    UnsupportedFormat {
        /// Header file.
        path: PathBuf,
        /// 0-based signal index.
        signal: usize,
        /// Format code found.
        format: u32,
    },
    /// A header feature this crate does not read (multi-segment records, several samples per
    /// frame).
    #[error("{}: {what} is not supported", .path.display())]
    Unsupported {
        /// Header file.
        path: PathBuf,
        /// The feature.
        what: String,
    },
    /// The signal file holds fewer or more samples than the header declares.
    #[error(
        "{}: record `{record}`: signal file holds {found_bytes} bytes after offset {offset}, \
         the header's {n_samples} samples x {n_signals} signals in format {format} need {expected_bytes}",
        .path.display()
    )]
    SampleCount {
        /// Signal file.
        path: PathBuf,
        /// Record name.
        record: String,
        /// Byte offset where samples start.
        offset: u64,
        /// Samples per signal declared by the header.
        n_samples: usize,
        /// Signals stored in this file.
        n_signals: usize,
        /// Storage format.
        format: u32,
        /// Bytes needed.
        expected_bytes: u64,
        /// Bytes present.
        found_bytes: u64,
    },
    /// A decoded signal does not sum to the header's checksum.
    #[error(
        "{}: record `{record}`, signal {signal} (`{lead}`): checksum {found} differs from the \
         header's {expected} (the data may be corrupt; pass --no-verify to load anyway)",
        .path.display()
    )]
    Checksum {
        /// Signal file.
        path: PathBuf,
        /// Record name.
        record: String,
        /// 0-based signal index.
        signal: usize,
        /// Lead description.
        lead: String,
        /// Checksum in the header.
        expected: i32,
        /// Checksum of the samples read.
        found: i32,
    },
    /// A MATLAB v4 file whose header does not describe what the WFDB header says.
    #[error("{}: MATLAB v4 field `{field}`: expected {expected}, found {found}", .path.display())]
    Mat {
        /// The .mat file.
        path: PathBuf,
        /// Field of the MAT header.
        field: &'static str,
        /// Expected value.
        expected: String,
        /// Value found.
        found: String,
    },
    /// A CSV record (the `data convert --to csv` layout) with a cell, row or header that
    /// does not parse.
    #[error("{}:{line}: column `{column}`: {what}", .path.display())]
    CsvRecord {
        /// The CSV file (or the name it was uploaded under).
        path: PathBuf,
        /// 1-based line number (1 is the header row).
        line: usize,
        /// Column name as in the header row (or its 1-based number).
        column: String,
        /// Problem.
        what: String,
    },
    /// An EDF/EDF+ file whose header or data disagree with the format or with each other.
    #[error("{}: EDF field `{field}`: {what}", .path.display())]
    Edf {
        /// The file.
        path: PathBuf,
        /// The header field (or `header`, `EDF Annotations`).
        field: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A FLAC signal file (WFDB formats 508/516/524) that cannot be decoded or does not hold
    /// what the header says.
    #[error("{}: FLAC: {what}", .path.display())]
    Flac {
        /// The signal file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A WFDB annotation file that ends mid-record or holds an impossible code.
    #[error("{}: annotation {index} at byte {byte}: {what}", .path.display())]
    Annotation {
        /// The annotation file.
        path: PathBuf,
        /// 0-based annotation index.
        index: usize,
        /// Byte offset.
        byte: u64,
        /// What is wrong.
        what: String,
    },
    /// A CSV or JSON table with a bad row or field.
    #[error("{}: row {row}, field `{field}`: {what}", .path.display())]
    Table {
        /// The file.
        path: PathBuf,
        /// 1-based row (data rows, header excluded) or item index.
        row: usize,
        /// Column or JSON key.
        field: String,
        /// What is wrong.
        what: String,
    },
    /// A CSV file that the `csv` crate could not parse.
    #[error("{}: malformed CSV", .path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// Parser error.
        #[source]
        source: csv::Error,
    },
    /// A JSON file that does not parse.
    #[error("{}: malformed JSON (line {line})", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line (for JSONL, the item's line).
        line: usize,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// An HDF5 file (SPH) without the expected dataset, type or shape.
    #[error("{}: HDF5 dataset `{dataset}`: {what}", .path.display())]
    Hdf5 {
        /// The file.
        path: PathBuf,
        /// Dataset name.
        dataset: String,
        /// Problem.
        what: String,
    },
    /// A value that cannot be written in the requested format.
    #[error("record `{record}`, signal {signal}: {what}")]
    Write {
        /// Record name.
        record: String,
        /// 0-based signal index.
        signal: usize,
        /// What is wrong.
        what: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
