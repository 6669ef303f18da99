//! MATLAB v4 files as the PhysioNet/CinC Challenges 2020-2021 ship them: one variable `val`,
//! int16, `n_signals x n_samples`, column-major, so the data is frame-interleaved format 16
//! at byte offset 20 + name length (24 for `val\0`). We check the MAT header against the
//! WFDB header and let the format-16 decoder read the data.

use std::path::Path;

use crate::error::{Error, Result};

/// The fixed 20-byte header of a MATLAB v4 matrix plus its name.
#[derive(Debug, Clone, PartialEq)]
pub struct MatHeader {
    /// `MOPT` type code (30 = little-endian int16 full matrix).
    pub type_code: i32,
    /// Rows (signals).
    pub rows: usize,
    /// Columns (samples).
    pub cols: usize,
    /// Whether an imaginary part follows.
    pub imaginary: bool,
    /// Variable name.
    pub name: String,
    /// Byte offset of the data.
    pub data_offset: u64,
}

impl MatHeader {
    /// Parse the header at the start of `bytes`.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<MatHeader> {
        let err = |field: &'static str, expected: &str, found: String| Error::Mat {
            path: path.to_path_buf(),
            field,
            expected: expected.to_string(),
            found,
        };
        if bytes.len() < 20 {
            return Err(err(
                "header",
                "at least 20 bytes",
                format!("{} bytes", bytes.len()),
            ));
        }
        let word = |i: usize| {
            i32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ])
        };
        let (t, m, n, imagf, namelen) = (word(0), word(1), word(2), word(3), word(4));
        if !(0..=4052).contains(&t) {
            return Err(err(
                "type",
                "a little-endian MATLAB v4 type code (0..4052)",
                t.to_string(),
            ));
        }
        if m < 0 || n < 0 || !(1..=64).contains(&namelen) {
            return Err(err(
                "dimensions",
                "non-negative rows/cols and a name of 1-64 bytes",
                format!("{m} x {n}, name length {namelen}"),
            ));
        }
        let end = 20 + namelen as usize;
        if bytes.len() < end {
            return Err(err("name", "a name after the header", "end of file".into()));
        }
        let name = String::from_utf8_lossy(&bytes[20..end])
            .trim_end_matches('\0')
            .to_string();
        Ok(MatHeader {
            type_code: t,
            rows: m as usize,
            cols: n as usize,
            imaginary: imagf != 0,
            name,
            data_offset: end as u64,
        })
    }

    /// Bytes of the data block (int16 only).
    pub fn data_bytes(&self) -> u64 {
        2 * self.rows as u64 * self.cols as u64
    }

    /// Check that this is the `n_signals x n_samples` int16 matrix the WFDB header expects,
    /// starting at `offset`.
    pub fn check_against(
        &self,
        path: &Path,
        n_signals: usize,
        n_samples: Option<usize>,
        offset: u64,
    ) -> Result<()> {
        let err = |field: &'static str, expected: String, found: String| Error::Mat {
            path: path.to_path_buf(),
            field,
            expected,
            found,
        };
        if self.type_code != 30 || self.imaginary {
            return Err(err(
                "type",
                "30 (little-endian int16, real)".into(),
                format!("{} (imaginary: {})", self.type_code, self.imaginary),
            ));
        }
        if self.rows != n_signals || n_samples.is_some_and(|n| n != self.cols) {
            return Err(err(
                "shape",
                format!(
                    "{n_signals} x {} (signals x samples, from the .hea)",
                    n_samples.map_or("?".into(), |n| n.to_string())
                ),
                format!("{} x {}", self.rows, self.cols),
            ));
        }
        if self.data_offset != offset {
            return Err(err(
                "data offset",
                format!("{offset} (the .hea byte offset)"),
                self.data_offset.to_string(),
            ));
        }
        Ok(())
    }
}
