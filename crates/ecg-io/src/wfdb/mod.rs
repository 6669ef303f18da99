//! WFDB records: headers, signal files (including PhysioNet/CinC MATLAB v4 `.mat` signal
//! files), annotation files, and a writer.

pub mod annotation;
pub mod format;
pub mod header;
pub mod mat;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use header::{Header, SignalSpec};

use crate::error::{Error, Result};
use crate::record::{Channel, Record};

/// How strictly to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Compare each signal's 16-bit sum with the header checksum (default on).
    pub verify_checksum: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            verify_checksum: true,
        }
    }
}

/// Path of the header for `record`, which may name the `.hea`, the `.dat`/`.mat`, or the
/// record without extension.
pub fn header_path(record: &Path) -> PathBuf {
    match record.extension().and_then(|e| e.to_str()) {
        Some("hea") => record.to_path_buf(),
        Some("dat") | Some("mat") => record.with_extension("hea"),
        _ => {
            let mut p = record.as_os_str().to_owned();
            p.push(".hea");
            PathBuf::from(p)
        }
    }
}

/// Read a WFDB record (header plus signal files).
///
/// A path ending in `.h5` is read as an SPH HDF5 record instead (see [`crate::sph`]).
pub fn read_record(record: &Path, opts: ReadOptions) -> Result<Record> {
    if record.extension().is_some_and(|e| e == "h5") {
        return crate::sph::read_sph(record);
    }
    let hpath = header_path(record);
    let header = Header::read(&hpath)?;
    read_signals(&hpath, &header, opts)
}

/// Read the signal files a parsed header points to.
pub fn read_signals(hpath: &Path, header: &Header, opts: ReadOptions) -> Result<Record> {
    let dir = Header::dir(hpath);
    for (i, s) in header.signals.iter().enumerate() {
        if !format::is_supported(s.format) {
            return Err(Error::UnsupportedFormat {
                path: hpath.to_path_buf(),
                signal: i,
                format: s.format,
            });
        }
        if s.samples_per_frame != 1 {
            return Err(Error::Unsupported {
                path: hpath.to_path_buf(),
                what: format!("signal {i}: {} samples per frame", s.samples_per_frame),
            });
        }
    }
    // Group signals by file, keeping the order of first appearance.
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut first_of: Vec<(String, usize)> = Vec::new();
    for (i, s) in header.signals.iter().enumerate() {
        let g = match first_of.iter().find(|(f, _)| f == &s.file) {
            Some((_, g)) => *g,
            None => {
                first_of.push((s.file.clone(), i));
                i
            }
        };
        groups.entry(g).or_default().push(i);
    }
    let mut adc: Vec<Vec<i32>> = vec![Vec::new(); header.signals.len()];
    let mut n_samples = header.n_samples;
    for (g, members) in &groups {
        let spec = &header.signals[*g];
        for &m in members {
            let o = &header.signals[m];
            if o.format != spec.format || o.byte_offset != spec.byte_offset {
                return Err(Error::Header {
                    path: hpath.to_path_buf(),
                    line: m + 2,
                    field: "format",
                    expected: format!(
                        "the format and offset of the other signals in `{}` ({}+{})",
                        spec.file, spec.format, spec.byte_offset
                    ),
                    found: format!("{}+{}", o.format, o.byte_offset),
                });
            }
        }
        let fpath = dir.join(&spec.file);
        let bytes = std::fs::read(&fpath).map_err(|e| Error::io(&fpath, e))?;
        let offset = spec.byte_offset;
        let is_mat = spec.file.to_ascii_lowercase().ends_with(".mat");
        let mut data_len = (bytes.len() as u64).saturating_sub(offset);
        if is_mat {
            let m = mat::MatHeader::parse(&bytes, &fpath)?;
            m.check_against(&fpath, members.len(), header.n_samples, offset)?;
            data_len = data_len.min(m.data_bytes());
        }
        let nsig = members.len() as u64;
        let frames = match n_samples {
            Some(n) => n as u64,
            None => format::samples_in(spec.format, data_len) / nsig,
        };
        // A header can claim any sample count: overflow means "more than any file holds".
        let need = frames
            .checked_mul(nsig)
            .filter(|&s| s.checked_mul(4).is_some())
            .map_or(u64::MAX, |s| format::bytes_for(spec.format, s));
        // Accept padding shorter than one frame (packed formats round up); anything else
        // means the header and the file disagree. An offset past the end holds nothing.
        let frame_bytes = format::bytes_for(spec.format, nsig).max(1);
        if offset > bytes.len() as u64 || data_len < need || data_len - need >= frame_bytes {
            return Err(Error::SampleCount {
                path: fpath,
                record: header.record.clone(),
                offset,
                n_samples: frames as usize,
                n_signals: members.len(),
                format: spec.format,
                expected_bytes: need,
                found_bytes: data_len,
            });
        }
        n_samples = Some(frames as usize);
        let start = offset as usize;
        let k = members.len();
        let mut chans: Vec<Vec<i32>> = Vec::with_capacity(k);
        if spec.format == 16 {
            // Fast path for the most common format: one strided pass per channel straight
            // from the bytes (no intermediate stream).
            let frame_len = 2 * k;
            let data = &bytes[start..start + frames as usize * frame_len];
            for j in 0..k {
                let c: Vec<i32> = data
                    .chunks_exact(frame_len)
                    .map(|f| i16::from_le_bytes([f[2 * j], f[2 * j + 1]]) as i32)
                    .collect();
                chans.push(c);
            }
        } else {
            chans.extend((0..k).map(|_| Vec::with_capacity(frames as usize)));
            let mut stream = Vec::new();
            format::decode(
                spec.format,
                &bytes[start..],
                (frames * nsig) as usize,
                &mut stream,
            );
            for frame in stream.chunks_exact(k) {
                for (c, &v) in chans.iter_mut().zip(frame) {
                    c.push(v);
                }
            }
        }
        for (&m, c) in members.iter().zip(chans) {
            adc[m] = c;
        }
        if opts.verify_checksum {
            for &m in members {
                let s = &header.signals[m];
                if let Some(expected) = s.checksum {
                    let sum: i64 = adc[m].iter().map(|&v| v as i64).sum();
                    let found = wrap16(sum);
                    if found != wrap16(expected as i64) {
                        return Err(Error::Checksum {
                            path: dir.join(&s.file),
                            record: header.record.clone(),
                            signal: m,
                            lead: s.description.clone(),
                            expected,
                            found,
                        });
                    }
                }
            }
        }
    }
    let n_samples = n_samples.unwrap_or(0);
    let channels = header
        .signals
        .iter()
        .zip(adc)
        .map(|(s, a)| Channel {
            lead: s.lead.clone(),
            description: s.description.clone(),
            gain: s.gain,
            baseline: s.baseline,
            units: s.units.clone(),
            adc: a,
            invalid: Some(format::invalid_value(s.format)),
        })
        .collect();
    // Early CinC headers write the record name as `E00015.mat`; use the file stem.
    let name = header
        .record
        .strip_suffix(".mat")
        .unwrap_or(&header.record)
        .to_string();
    Ok(Record {
        name,
        fs: header.fs,
        n_samples,
        channels,
        comments: header.comments.clone(),
        base_time: header.base_time.clone(),
    })
}

/// WFDB's checksum: the sum of the samples as a signed 16-bit value.
pub fn wrap16(sum: i64) -> i32 {
    sum.rem_euclid(65536) as u16 as i16 as i32
}

/// Write `record` as `<dir>/<name>.hea` + `<dir>/<name>.dat`, all channels interleaved in one
/// file in `format`, with checksums and initial values. Temporary files are renamed into
/// place so a reader never sees half a record.
pub fn write_record(dir: &Path, record: &Record, format: u32) -> Result<()> {
    if !format::is_supported(format) {
        return Err(Error::Write {
            record: record.name.clone(),
            signal: 0,
            what: format!("format {format} is not supported for writing"),
        });
    }
    let (lo, hi) = format::value_range(format);
    let n = record.n_samples;
    let k = record.channels.len();
    let mut stream = Vec::with_capacity(n * k);
    for (i, c) in record.channels.iter().enumerate() {
        if c.adc.len() != n {
            return Err(Error::Write {
                record: record.name.clone(),
                signal: i,
                what: format!("{} samples, the record has {n}", c.adc.len()),
            });
        }
        if let Some(bad) = c.adc.iter().find(|&&v| (v as i64) < lo || (v as i64) > hi) {
            return Err(Error::Write {
                record: record.name.clone(),
                signal: i,
                what: format!("value {bad} does not fit format {format} ({lo}..={hi})"),
            });
        }
    }
    for t in 0..n {
        for c in &record.channels {
            stream.push(c.adc[t]);
        }
    }
    let dat_name = format!("{}.dat", record.name);
    let header = Header {
        record: record.name.clone(),
        fs: record.fs,
        n_samples: Some(n),
        base_time: record.base_time.clone(),
        signals: record
            .channels
            .iter()
            .map(|c| SignalSpec {
                file: dat_name.clone(),
                format,
                samples_per_frame: 1,
                byte_offset: 0,
                gain: c.gain,
                baseline: c.baseline,
                units: c.units.clone(),
                adc_resolution: match format {
                    80 => 8,
                    212 => 12,
                    310 | 311 => 10,
                    24 => 24,
                    32 => 32,
                    _ => 16,
                },
                adc_zero: 0,
                initial_value: Some(c.adc.first().copied().unwrap_or(0) as i64),
                checksum: Some(wrap16(c.adc.iter().map(|&v| v as i64).sum())),
                block_size: 0,
                description: c.description.clone(),
                lead: c.lead.clone(),
            })
            .collect(),
        comments: record.comments.clone(),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    atomic_write(&dir.join(&dat_name), &format::encode(format, &stream))?;
    atomic_write(
        &dir.join(format!("{}.hea", record.name)),
        header.to_text().as_bytes(),
    )?;
    Ok(())
}

/// Write a file through a temporary sibling and a rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
