//! WFDB's FLAC signal files (formats 508, 516 and 524: FLAC streams of at most 8, 16 or 24
//! bits per sample). One FLAC stream per signal file and one FLAC channel per signal, in
//! header order; a signal with `k` samples per frame has `k` FLAC samples per frame (every
//! signal of the file has the same `k`, as WFDB requires). The byte offset of the format
//! field counts samples per channel. Decoded by `claxon`, a pure-Rust FLAC decoder.

use std::path::Path;

use crate::error::{Error, Result};

/// The signals of one FLAC signal file: every sample of each signal for the record's frames
/// and up to `max_skew` more where the stream holds them, and the record's frame count
/// (`n_frames`, or what the stream holds when the header gives none).
pub fn read_group(
    path: &Path,
    format: u32,
    sample_offset: u64,
    spf: &[u64],
    n_frames: Option<usize>,
    max_skew: u64,
) -> Result<(Vec<Vec<i32>>, u64)> {
    let err = |what: String| Error::Flac {
        path: path.to_path_buf(),
        what,
    };
    let k = spf[0];
    if spf.iter().any(|&s| s != k) {
        return Err(err(format!(
            "its signals have {spf:?} samples per frame; a FLAC signal file needs the same \
             number for every signal"
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = claxon::FlacReader::new(std::io::BufReader::new(file))
        .map_err(|e| err(format!("not a readable FLAC stream ({e})")))?;
    let info = reader.streaminfo();
    let max_bits = format - 500;
    if info.bits_per_sample > max_bits {
        return Err(err(format!(
            "{} bits per sample, format {format} holds at most {max_bits}",
            info.bits_per_sample
        )));
    }
    if info.channels as usize != spf.len() {
        return Err(err(format!(
            "{} channels, the header gives {} signals in this file",
            info.channels,
            spf.len()
        )));
    }
    let n = spf.len();
    let total = info.samples.unwrap_or(0) as usize;
    let mut chans: Vec<Vec<i32>> = (0..n).map(|_| Vec::with_capacity(total)).collect();
    // Whole FLAC blocks at a time (a per-sample iterator measured several times slower).
    let mut blocks = reader.blocks();
    let mut buffer = Vec::new();
    loop {
        let done = chans[0].len();
        match blocks.read_next_or_eof(std::mem::take(&mut buffer)) {
            Ok(Some(block)) => {
                for (j, c) in chans.iter_mut().enumerate() {
                    c.extend_from_slice(block.channel(j as u32));
                }
                buffer = block.into_buffer();
            }
            Ok(None) => break,
            Err(e) => return Err(err(format!("corrupt stream after sample {done} ({e})"))),
        }
    }
    if chans.iter().any(|c| c.len() != chans[0].len()) {
        return Err(err("channels of different lengths".into()));
    }
    let off = sample_offset as usize;
    for c in &mut chans {
        c.drain(..off.min(c.len()));
    }
    let stored = chans[0].len() as u64 / k;
    let frames = n_frames.map_or(stored, |f| f as u64);
    if stored < frames {
        return Err(err(format!(
            "{stored} frames after the offset of {off} samples, the header gives {frames}"
        )));
    }
    let keep = ((frames + max_skew).min(stored) * k) as usize;
    for c in &mut chans {
        c.truncate(keep);
    }
    Ok((chans, frames))
}
