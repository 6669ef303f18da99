//! WFDB records: headers, signal files (including PhysioNet/CinC MATLAB v4 `.mat` signal
//! files), annotation files, and a writer.

pub mod annotation;
pub mod flac;
pub mod format;
pub mod header;
pub mod mat;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use header::{Header, Segment, SignalSpec};

use crate::error::{Error, Result};
use crate::record::{Channel, Record};

/// How a signal with several samples per frame (`16x2` in the header) is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Frames {
    /// One value per frame: the mean of the frame's samples, truncated to an integer ADC
    /// value as wfdb-python's default (`smooth_frames=True`) does; the record's rate is the
    /// frame rate.
    #[default]
    Smooth,
    /// Every sample: each signal repeated up to the least common multiple of the samples per
    /// frame, so that all share one rate (the frame rate times that multiple). The distinct
    /// samples are wfdb-python's `smooth_frames=False` values.
    Expand,
}

/// How strictly to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Compare each signal's 16-bit sum with the header checksum (default on).
    pub verify_checksum: bool,
    /// Signals with several samples per frame: averaged (default) or expanded.
    pub frames: Frames,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            verify_checksum: true,
            frames: Frames::Smooth,
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
/// A path ending in `.h5` is read as an SPH HDF5 record instead (see [`crate::sph`]), one
/// ending in `.edf` as EDF/EDF+ (see [`crate::edf`]).
pub fn read_record(record: &Path, opts: ReadOptions) -> Result<Record> {
    if record.extension().is_some_and(|e| e == "h5") {
        return crate::sph::read_sph(record);
    }
    if record
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("edf"))
    {
        return crate::edf::read_edf(record, opts);
    }
    let hpath = header_path(record);
    let header = Header::read(&hpath)?;
    if header.segments.is_empty() {
        read_signals(&hpath, &header, opts)
    } else {
        read_segments(&hpath, &header, opts)
    }
}

/// A multi-segment record as one record, as wfdb-python's `rdrecord` returns it (`m2s`):
/// the signals of the layout segment (variable layout: first segment of length 0) or of
/// the first segment (fixed layout), each segment's samples appended in order with that
/// segment's own gain, baseline and format ([`crate::record::Span`]); a signal a segment
/// lacks (matched by name in a variable layout, by position in a fixed one) and every
/// sample of a null segment (`~`) are missing (NaN).
pub fn read_segments(hpath: &Path, header: &Header, opts: ReadOptions) -> Result<Record> {
    let dir = Header::dir(hpath);
    let seg_header = |name: &str| -> Result<(PathBuf, Header)> {
        let p = dir.join(format!("{name}.hea"));
        let h = Header::read(&p)?;
        if !h.segments.is_empty() {
            return Err(Error::Header {
                path: p,
                line: 1,
                field: "record name",
                expected: "a single-segment record (segments do not nest)".into(),
                found: format!("{}/{}", h.record, h.segments.len()),
            });
        }
        Ok((p, h))
    };
    let variable = header.segments.first().is_some_and(|s| s.n_samples == 0);
    let layout = match header.segments.iter().find(|s| s.name != "~") {
        Some(s) => seg_header(&s.name)?.1,
        None => {
            return Err(Error::Unsupported {
                path: hpath.to_path_buf(),
                what: "a multi-segment record of null segments only".into(),
            });
        }
    };
    let mut channels: Vec<Channel> = layout
        .signals
        .iter()
        .map(|s| Channel {
            lead: s.lead.clone(),
            description: s.description.clone(),
            gain: s.gain,
            baseline: s.baseline as f64,
            units: s.units.clone(),
            adc: Vec::new(),
            invalid: format::invalid_value(s.format),
            spans: Vec::new(),
        })
        .collect();
    let mut rate: Option<f64> = None;
    for (k, seg) in header.segments.iter().enumerate() {
        if variable && k == 0 {
            continue;
        }
        let start = channels.first().map_or(0, |c| c.adc.len());
        let part = if seg.name == "~" {
            None
        } else {
            let (p, h) = seg_header(&seg.name)?;
            if h.fs != header.fs {
                return Err(Error::Header {
                    path: p,
                    line: 1,
                    field: "sampling frequency",
                    expected: format!("{} Hz, the record's", header.fs),
                    found: format!("{} Hz", h.fs),
                });
            }
            Some((p.clone(), read_signals(&p, &h, opts)?))
        };
        // Samples per frame expanded: every segment must share one rate.
        let seg_len = match &part {
            Some((_, r)) => {
                if rate.is_some_and(|f| f != r.fs) {
                    return Err(Error::Unsupported {
                        path: hpath.to_path_buf(),
                        what: format!(
                            "segment `{}` expands to {} Hz, an earlier one to {} Hz",
                            seg.name,
                            r.fs,
                            rate.unwrap_or(0.0)
                        ),
                    });
                }
                rate = Some(r.fs);
                r.n_samples
            }
            None => {
                let per = rate.map_or(1.0, |f| f / header.fs).round() as usize;
                seg.n_samples * per.max(1)
            }
        };
        for (j, ch) in channels.iter_mut().enumerate() {
            let src = part.as_ref().and_then(|(p, r)| {
                let found = if variable {
                    r.channels.iter().find(|c| c.description == ch.description)
                } else {
                    r.channels.get(j)
                };
                found.map(|c| (p, c))
            });
            match src {
                Some((p, c)) => {
                    if c.units != ch.units {
                        return Err(Error::Unsupported {
                            path: p.clone(),
                            what: format!(
                                "signal `{}` in {}, the record's layout says {}",
                                c.description, c.units, ch.units
                            ),
                        });
                    }
                    let own = (ch.gain, ch.baseline, ch.invalid);
                    let current = ch
                        .spans
                        .last()
                        .map_or(own, |s| (s.gain, s.baseline, s.invalid));
                    if (c.gain, c.baseline, c.invalid) != current {
                        ch.spans.push(crate::record::Span {
                            start,
                            gain: c.gain,
                            baseline: c.baseline,
                            invalid: c.invalid,
                        });
                    }
                    ch.adc.extend_from_slice(&c.adc[..seg_len.min(c.adc.len())]);
                }
                None => {
                    // Missing here: the marker of a span of its own.
                    ch.spans.push(crate::record::Span {
                        start,
                        gain: 1.0,
                        baseline: 0.0,
                        invalid: Some(i32::MIN),
                    });
                    ch.adc.resize(start + seg_len, i32::MIN);
                }
            }
        }
    }
    let n_samples = channels.first().map_or(0, |c| c.adc.len());
    Ok(Record {
        name: header.record.clone(),
        fs: rate.unwrap_or(header.fs),
        n_samples,
        channels,
        comments: header.comments.clone(),
        base_time: header.base_time.clone(),
    })
}

/// Read the signal files a parsed header points to.
///
/// Per signal file: the frames are decoded (a frame holds `samples_per_frame` samples of each
/// of its signals, in order), format 8's differences are added up from the initial values,
/// each signal's skew is applied (sample `i` is frame `i + skew`; past the end of the
/// record, invalid, as wfdb-python pads), the checksum is compared over the stored samples,
/// and frames are averaged or expanded as [`ReadOptions::frames`] says.
pub fn read_signals(hpath: &Path, header: &Header, opts: ReadOptions) -> Result<Record> {
    let dir = Header::dir(hpath);
    for (i, s) in header.signals.iter().enumerate() {
        if s.format != format::NULL && !format::is_supported(s.format) {
            return Err(Error::UnsupportedFormat {
                path: hpath.to_path_buf(),
                signal: i,
                format: s.format,
            });
        }
    }
    // Group signals by file, keeping the order of first appearance.
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut first_of: Vec<(String, usize)> = Vec::new();
    for (i, s) in header.signals.iter().enumerate() {
        // A null signal (format 0) has no file.
        if s.format == format::NULL {
            continue;
        }
        let g = match first_of.iter().find(|(f, _)| f == &s.file) {
            Some((_, g)) => *g,
            None => {
                first_of.push((s.file.clone(), i));
                i
            }
        };
        groups.entry(g).or_default().push(i);
    }
    // Each signal's samples, every sample of every frame (skew applied).
    let mut expanded: Vec<Vec<i32>> = vec![Vec::new(); header.signals.len()];
    let mut n_frames = header.n_samples;
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
        let spf: Vec<u64> = members
            .iter()
            .map(|&m| header.signals[m].samples_per_frame as u64)
            .collect();
        let max_skew = members
            .iter()
            .map(|&m| header.signals[m].skew as u64)
            .max()
            .unwrap_or(0);
        let (mut chans, frames) = if format::is_flac(spec.format) {
            flac::read_group(
                &fpath,
                spec.format,
                spec.byte_offset,
                &spf,
                n_frames,
                max_skew,
            )?
        } else {
            read_packed(&fpath, header, spec, &spf, n_frames, max_skew)?
        };
        n_frames = Some(frames as usize);
        if spec.format == 8 {
            // First differences from the header's initial value (0 when absent).
            for (c, &m) in chans.iter_mut().zip(members) {
                let mut v = header.signals[m].initial_value.unwrap_or(0) as i32;
                for x in c.iter_mut() {
                    v = v.wrapping_add(*x);
                    *x = v;
                }
            }
        }
        if opts.verify_checksum {
            for (c, &m) in chans.iter().zip(members) {
                let s = &header.signals[m];
                if let Some(expected) = s.checksum {
                    let n = (frames * s.samples_per_frame as u64) as usize;
                    let sum: i64 = c[..n.min(c.len())].iter().map(|&v| v as i64).sum();
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
        for (mut c, &m) in chans.into_iter().zip(members) {
            let s = &header.signals[m];
            let k = s.samples_per_frame as usize;
            let skip = (s.skew as usize * k).min(c.len());
            c.drain(..skip);
            let want = frames as usize * k;
            c.truncate(want);
            let pad = format::invalid_value(s.format).unwrap_or(0);
            c.resize(want, pad);
            expanded[m] = c;
        }
    }
    let n_frames = n_frames.unwrap_or(0);
    if n_frames == 0 && header.n_samples == Some(0) {
        // wfdb-python refuses these too (a multi-segment record's layout header is one).
        return Err(Error::Header {
            path: hpath.to_path_buf(),
            line: 1,
            field: "number of samples",
            expected: "at least one sample (a layout segment holds no signal data; read the \
                       multi-segment record's own header)"
                .into(),
            found: "0".into(),
        });
    }
    // Null signals: every sample missing (WFDB's invalid sample), as many as the record has.
    for (m, s) in header.signals.iter().enumerate() {
        if s.format == format::NULL {
            expanded[m] = vec![i32::MIN; n_frames * s.samples_per_frame as usize];
        }
    }
    let lcm = header
        .signals
        .iter()
        .map(|s| s.samples_per_frame as usize)
        .fold(1, lcm);
    let mut channels = Vec::with_capacity(header.signals.len());
    for (s, e) in header.signals.iter().zip(expanded) {
        let k = s.samples_per_frame as usize;
        let invalid = format::invalid_value(s.format);
        let mut ch = Channel {
            lead: s.lead.clone(),
            description: s.description.clone(),
            gain: s.gain,
            baseline: s.baseline as f64,
            units: s.units.clone(),
            adc: e,
            invalid,
            spans: Vec::new(),
        };
        if k > 1 {
            match opts.frames {
                Frames::Smooth => smooth(&mut ch, k),
                Frames::Expand => {}
            }
        }
        if opts.frames == Frames::Expand && lcm / k > 1 {
            let r = lcm / k;
            ch.adc = ch
                .adc
                .iter()
                .flat_map(|&v| std::iter::repeat_n(v, r))
                .collect();
        }
        channels.push(ch);
    }
    let (fs, n_samples) = match opts.frames {
        Frames::Smooth => (header.fs, n_frames),
        Frames::Expand => (header.fs * lcm as f64, n_frames * lcm),
    };
    // Early CinC headers write the record name as `E00015.mat`; use the file stem.
    let name = header
        .record
        .strip_suffix(".mat")
        .unwrap_or(&header.record)
        .to_string();
    Ok(Record {
        name,
        fs,
        n_samples,
        channels,
        comments: header.comments.clone(),
        base_time: header.base_time.clone(),
    })
}

/// The signals of one signal file in a byte-packed format (every format but FLAC): each
/// signal's samples (every sample of every frame) for the record's frames plus up to
/// `max_skew` more where the file holds them, and the record's frame count.
fn read_packed(
    fpath: &Path,
    header: &Header,
    spec: &SignalSpec,
    spf: &[u64],
    n_frames: Option<usize>,
    max_skew: u64,
) -> Result<(Vec<Vec<i32>>, u64)> {
    let bytes = std::fs::read(fpath).map_err(|e| Error::io(fpath, e))?;
    let offset = spec.byte_offset;
    let is_mat = spec.file.to_ascii_lowercase().ends_with(".mat");
    let mut data_len = (bytes.len() as u64).saturating_sub(offset);
    if is_mat {
        let m = mat::MatHeader::parse(&bytes, fpath)?;
        m.check_against(fpath, spf.len(), header.n_samples, offset)?;
        data_len = data_len.min(m.data_bytes());
    }
    let per_frame: u64 = spf.iter().sum();
    let stored = format::samples_in(spec.format, data_len) / per_frame;
    let frames = n_frames.map_or(stored, |n| n as u64);
    // A header can claim any sample count: overflow means "more than any file holds".
    let need = frames
        .checked_mul(per_frame)
        .filter(|&s| s.checked_mul(4).is_some())
        .map_or(u64::MAX, |s| format::bytes_for(spec.format, s));
    // Accept padding shorter than one frame (packed formats round up), and the extra
    // frames a skewed signal reads past the record's end; anything else means the header
    // and the file disagree. An offset past the end holds nothing.
    let frame_bytes = format::bytes_for(spec.format, per_frame).max(1);
    let slack = frame_bytes.saturating_mul(max_skew + 1);
    if offset > bytes.len() as u64 || data_len < need || data_len - need >= slack {
        return Err(Error::SampleCount {
            path: fpath.to_path_buf(),
            record: header.record.clone(),
            offset,
            n_samples: frames as usize,
            n_signals: spf.len(),
            format: spec.format,
            expected_bytes: need,
            found_bytes: data_len,
        });
    }
    // Decode the record's frames and, for skewed signals, up to `max_skew` more.
    let decoded = (frames + max_skew).min(stored.max(frames));
    let start = offset as usize;
    let mut chans: Vec<Vec<i32>> = spf
        .iter()
        .map(|&k| Vec::with_capacity((decoded * k) as usize))
        .collect();
    if spec.format == 16 && per_frame == spf.len() as u64 {
        // Fast path for the most common layout: one strided pass per signal straight
        // from the bytes (no intermediate stream).
        let k = spf.len();
        let frame_len = 2 * k;
        let data = &bytes[start..start + decoded as usize * frame_len];
        for (j, c) in chans.iter_mut().enumerate() {
            c.extend(
                data.chunks_exact(frame_len)
                    .map(|f| i16::from_le_bytes([f[2 * j], f[2 * j + 1]]) as i32),
            );
        }
    } else {
        let mut stream = Vec::new();
        format::decode(
            spec.format,
            &bytes[start..],
            (decoded * per_frame) as usize,
            &mut stream,
        );
        for frame in stream.chunks_exact(per_frame as usize) {
            let mut at = 0;
            for (c, &k) in chans.iter_mut().zip(spf) {
                c.extend_from_slice(&frame[at..at + k as usize]);
                at += k as usize;
            }
        }
    }
    Ok((chans, frames))
}

/// One value per frame from a channel's `k` samples per frame, as wfdb-python 4.3.1's
/// `smooth_frames` computes it: the integer mean of the frame's digital samples, truncated
/// toward zero (its sum in 64 bits divided by `k` and stored in an integer array); the frame
/// is invalid only when that mean equals the format's invalid value.
fn smooth(ch: &mut Channel, k: usize) {
    ch.adc = ch
        .adc
        .chunks_exact(k)
        .map(|f| {
            // The mean of i32 samples fits an i32.
            (f.iter().map(|&v| v as i64).sum::<i64>() / k as i64) as i32
        })
        .collect();
}

/// Greatest common divisor (samples per frame, EDF's rates).
pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Least common multiple (the rate every signal is expanded to).
pub(crate) fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

/// WFDB's checksum: the sum of the samples as a signed 16-bit value.
pub fn wrap16(sum: i64) -> i32 {
    sum.rem_euclid(65536) as u16 as i16 as i32
}

/// Write `record` as `<dir>/<name>.hea` + `<dir>/<name>.dat`, all channels interleaved in one
/// file in `format`, with checksums and initial values. Temporary files are renamed into
/// place so a reader never sees half a record.
pub fn write_record(dir: &Path, record: &Record, format: u32) -> Result<()> {
    if !format::is_supported(format) || format == 8 || format::is_flac(format) {
        return Err(Error::Write {
            record: record.name.clone(),
            signal: 0,
            what: format!("format {format} is not supported for writing"),
        });
    }
    if let Some((i, _)) = record
        .channels
        .iter()
        .enumerate()
        .find(|(_, c)| !c.spans.is_empty())
    {
        return Err(Error::Write {
            record: record.name.clone(),
            signal: i,
            what: "its segments have different gains or formats; write it as CSV".into(),
        });
    }
    if let Some((i, c)) = record
        .channels
        .iter()
        .enumerate()
        .find(|(_, c)| c.baseline.fract() != 0.0 || c.baseline.abs() > 9.0e15)
    {
        return Err(Error::Write {
            record: record.name.clone(),
            signal: i,
            what: format!(
                "baseline {} is not an integer ADC value (an EDF scaling); write it as CSV",
                c.baseline
            ),
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
                skew: 0,
                gain: c.gain,
                baseline: c.baseline as i64,
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
        segments: Vec::new(),
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
