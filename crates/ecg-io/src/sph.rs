//! The Shandong Provincial Hospital (SPH) 12-lead database: one HDF5 file per record with a
//! dataset `ecg` of shape `(12, N)`, float16 millivolts, 500 Hz, leads in the standard order;
//! labels (AHA codes, SNOMED-CT) in `metadata.csv`. Read with `rust-hdf5` (pure Rust; the
//! files are chunked and gzip-compressed).
//!
//! Samples are stored losslessly as integers: every float16 value is a multiple of 2^-24, so
//! with a gain of 2^24 adu/mV the ADC integer is exact (values up to +-127 mV fit in i32).

use std::path::Path;

use crate::error::{Error, Result};
use crate::lead::Lead;
use crate::record::{Channel, Record};

/// Gain that represents every float16 millivolt value exactly.
pub const SPH_GAIN: f64 = 16_777_216.0;

/// Sampling frequency of the SPH database (not stored in the files).
pub const SPH_FS: f64 = 500.0;

fn h5err(path: &Path, what: impl Into<String>) -> Error {
    Error::Hdf5 {
        path: path.to_path_buf(),
        dataset: "ecg".into(),
        what: what.into(),
    }
}

/// Read one SPH `.h5` record.
pub fn read_sph(path: &Path) -> Result<Record> {
    let file =
        rust_hdf5::H5File::open(path).map_err(|e| h5err(path, format!("cannot open: {e:?}")))?;
    let ds = file
        .dataset("ecg")
        .map_err(|e| h5err(path, format!("missing: {e:?}")))?;
    let shape = ds.shape();
    if shape.len() != 2 || shape[0] != 12 {
        return Err(h5err(path, format!("shape {shape:?}, expected (12, N)")));
    }
    let n = shape[1];
    let bits = ds
        .read_raw::<u16>()
        .map_err(|e| h5err(path, format!("cannot read as float16: {e:?}")))?;
    if bits.len() != 12 * n {
        return Err(h5err(
            path,
            format!("{} values for shape {shape:?}", bits.len()),
        ));
    }
    let mut channels = Vec::with_capacity(12);
    for (j, lead) in Lead::STANDARD_12.iter().enumerate() {
        let mut adc = Vec::with_capacity(n);
        for (k, &b) in bits[j * n..(j + 1) * n].iter().enumerate() {
            let v = half::f16::from_bits(b).to_f64();
            let a = v * SPH_GAIN;
            if !a.is_finite() || a.abs() > i32::MAX as f64 {
                return Err(h5err(
                    path,
                    format!(
                        "lead {}, sample {k}: value {v} mV is not finite or beyond +-127 mV",
                        lead.name()
                    ),
                ));
            }
            adc.push(a as i32);
        }
        channels.push(Channel {
            lead: lead.clone(),
            description: lead.name().to_string(),
            gain: SPH_GAIN,
            baseline: 0.0,
            units: "mV".into(),
            adc,
            invalid: None,
            spans: Vec::new(),
        });
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(Record {
        name,
        fs: SPH_FS,
        n_samples: n,
        channels,
        comments: vec!["SPH database record (HDF5); labels in metadata.csv".into()],
        base_time: None,
    })
}
