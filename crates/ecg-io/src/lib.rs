//! Readers and writers for the ECG data users bring: WFDB records (`.hea` + `.dat` in every
//! format wfdb-python reads, FLAC included, skew, samples per frame, multi-segment;
//! PhysioNet/CinC MATLAB v4 `.mat`), EDF/EDF+ files, WFDB annotations (`.atr`, `.qrs`, ...),
//! SPH HDF5, PTB-XL metadata, SNOMED-CT mapping tables and ECGInstruct conversations.
//!
//! Nothing here knows about models or tensors: a reader turns files into a [`Record`] (raw ADC
//! samples plus gain and baseline) and labels, or into an [`Error`] naming file, line and
//! field.

pub mod conversation;
pub mod csv;
pub mod edf;
pub mod error;
pub mod labels;
pub mod lead;
pub mod record;
pub mod sph;
pub mod wfdb;

pub use error::{Error, Result};
pub use lead::Lead;
pub use record::{Channel, Record, Span};
pub use wfdb::{ReadOptions, read_record, write_record};
