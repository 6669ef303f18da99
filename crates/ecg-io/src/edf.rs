//! EDF and EDF+ files (European Data Format: a 256-byte ASCII header, one 256-byte header per
//! signal, then data records of 16-bit little-endian samples), read into the same [`Record`]
//! as WFDB.
//!
//! - Physical values use the scaling EDF defines,
//!   `phys_min + (d - dig_min) * (phys_max - phys_min) / (dig_max - dig_min)`, held as a gain
//!   and a (fractional) baseline.
//! - EDF+ annotation signals (`EDF Annotations`) are not channels: their time-stamped
//!   annotation lists (TALs) become comment lines `annotation: +ONSET s [DURATION s]: TEXT`.
//! - EDF+D (discontinuous): each data record starts at the onset its first TAL gives; the
//!   gaps between records are missing samples (NaN).
//! - Signals at different rates share one frame rate (the greatest common divisor of the
//!   samples per data record): averaged over each frame by default (the exact mean), or
//!   expanded to the least common multiple with [`crate::wfdb::Frames::Expand`], as WFDB
//!   records with several samples per frame.
//!
//! No maintained Rust crate reads EDF+ annotations and discontinuous records into a WFDB-like
//! record, so the format lives here; values are checked against MNE-Python and pyedflib in
//! the corpus test.

use std::path::Path;

use crate::Lead;
use crate::error::{Error, Result};
use crate::record::{Channel, Record};
use crate::wfdb::{Frames, ReadOptions, gcd, lcm};

/// The label of an EDF+ annotation signal.
const ANNOTATIONS: &str = "EDF Annotations";

fn err(path: &Path, field: &'static str, what: String) -> Error {
    Error::Edf {
        path: path.to_path_buf(),
        field,
        what,
    }
}

/// Field `i` of width `w` from `bytes` at `at`, as text (Latin-1), trimmed.
fn text(bytes: &[u8], at: usize, w: usize) -> String {
    bytes[at..at + w]
        .iter()
        .map(|&b| b as char)
        .collect::<String>()
        .trim()
        .to_string()
}

/// Read an EDF or EDF+ file.
pub fn read_edf(path: &Path, opts: ReadOptions) -> Result<Record> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() < 256 {
        return Err(err(
            path,
            "header",
            format!("{} bytes, an EDF header alone is 256", bytes.len()),
        ));
    }
    if bytes[0] == 0xFF {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "BDF (24-bit EDF)".into(),
        });
    }
    let version = text(&bytes, 0, 8);
    if version != "0" {
        return Err(err(path, "version", format!("`{version}`, EDF writes `0`")));
    }
    let num = |at: usize, w: usize, field: &'static str| -> Result<f64> {
        let t = text(&bytes, at, w);
        t.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| err(path, field, format!("`{t}` is not a number")))
    };
    let patient = text(&bytes, 8, 80);
    let recording = text(&bytes, 88, 80);
    let date = text(&bytes, 168, 8);
    let time = text(&bytes, 176, 8);
    let header_bytes = num(184, 8, "header bytes")? as usize;
    let reserved = text(&bytes, 192, 44);
    let n_records = num(236, 8, "number of data records")?;
    let duration = num(244, 8, "duration of a data record")?;
    let ns = num(252, 4, "number of signals")?;
    if ns < 0.0 || ns.fract() != 0.0 || ns > 4096.0 {
        return Err(err(path, "number of signals", format!("{ns}")));
    }
    let ns = ns as usize;
    if header_bytes != 256 * (ns + 1) {
        return Err(err(
            path,
            "header bytes",
            format!(
                "{header_bytes}, but {ns} signals need a header of {} bytes",
                256 * (ns + 1)
            ),
        ));
    }
    if bytes.len() < header_bytes {
        return Err(err(
            path,
            "header",
            format!(
                "the file ends at byte {} inside its {header_bytes}-byte header",
                bytes.len()
            ),
        ));
    }
    // Per-signal fields, each an array of `ns` fixed-width entries.
    let mut at = 256;
    let mut field = |w: usize| -> Vec<String> {
        let v = (0..ns).map(|i| text(&bytes, at + i * w, w)).collect();
        at += ns * w;
        v
    };
    let labels = field(16);
    let _transducer = field(80);
    let dims = field(8);
    let pmin = field(8);
    let pmax = field(8);
    let dmin = field(8);
    let dmax = field(8);
    let _prefilter = field(80);
    let samples = field(8);
    let parse = |v: &str, field: &'static str, i: usize| -> Result<f64> {
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| {
                err(
                    path,
                    field,
                    format!("signal {i} (`{}`): `{v}` is not a number", labels[i]),
                )
            })
    };
    let mut per_record = Vec::with_capacity(ns);
    for (i, s) in samples.iter().enumerate() {
        let n = parse(s, "samples per data record", i)?;
        if n < 1.0 || n.fract() != 0.0 {
            return Err(err(
                path,
                "samples per data record",
                format!("signal {i}: {s}"),
            ));
        }
        per_record.push(n as usize);
    }
    let record_bytes: usize = per_record.iter().sum::<usize>() * 2;
    let data = &bytes[header_bytes..];
    let stored = data.len() / record_bytes.max(1);
    let n_rec = if n_records < 0.0 {
        stored
    } else {
        let n = n_records as usize;
        if n > stored {
            return Err(err(
                path,
                "number of data records",
                format!("{n}, the file holds {stored} of {record_bytes} bytes"),
            ));
        }
        n
    };
    if duration <= 0.0 && n_rec > 0 && ns > 0 {
        // EDF+ allows 0 for annotation-only files; a signal needs a duration.
        if labels.iter().any(|l| l != ANNOTATIONS) {
            return Err(err(
                path,
                "duration of a data record",
                format!("{duration}"),
            ));
        }
    }
    let discontinuous = reserved.starts_with("EDF+D");
    // Annotations: every record's TALs.
    let sample = |r: usize, offset: usize, k: usize| -> i16 {
        let at = r * record_bytes + 2 * (offset + k);
        i16::from_le_bytes([data[at], data[at + 1]])
    };
    let offsets: Vec<usize> = per_record
        .iter()
        .scan(0, |acc, &n| {
            let o = *acc;
            *acc += n;
            Some(o)
        })
        .collect();
    let mut comments = Vec::new();
    if !patient.is_empty() {
        comments.push(format!("patient: {patient}"));
    }
    if !recording.is_empty() {
        comments.push(format!("recording: {recording}"));
    }
    let mut onsets: Vec<f64> = (0..n_rec).map(|r| r as f64 * duration).collect();
    for (i, label) in labels.iter().enumerate() {
        if label != ANNOTATIONS {
            continue;
        }
        for (r, onset) in onsets.iter_mut().enumerate() {
            let raw: Vec<u8> = (0..per_record[i])
                .flat_map(|k| sample(r, offsets[i], k).to_le_bytes())
                .collect();
            let tals = parse_tals(&raw)
                .map_err(|what| err(path, "EDF Annotations", format!("data record {r}: {what}")))?;
            for (k, t) in tals.iter().enumerate() {
                if k == 0 && t.texts.is_empty() {
                    // The record's time-keeping TAL.
                    *onset = t.onset;
                    continue;
                }
                for x in &t.texts {
                    let dur = t.duration.map_or(String::new(), |d| format!(" [{d} s]"));
                    comments.push(format!("annotation: {:+} s{dur}: {x}", t.onset));
                }
            }
        }
    }
    let signals: Vec<usize> = (0..ns).filter(|&i| labels[i] != ANNOTATIONS).collect();
    let g = signals.iter().map(|&i| per_record[i]).fold(0, gcd);
    let frames_per_record = g.max(1);
    let fs = if duration > 0.0 {
        frames_per_record as f64 / duration
    } else {
        1.0
    };
    // Where each record's first frame goes (EDF+D: at its onset; gaps are missing).
    let start_of = |r: usize| -> usize {
        if discontinuous {
            (onsets[r] * fs).round().max(0.0) as usize
        } else {
            r * frames_per_record
        }
    };
    let n_frames = (0..n_rec)
        .map(|r| start_of(r) + frames_per_record)
        .max()
        .unwrap_or(0);
    let lcm = signals
        .iter()
        .map(|&i| per_record[i] / frames_per_record)
        .fold(1, lcm);
    let mut channels = Vec::with_capacity(signals.len());
    for &i in &signals {
        let (p0, p1) = (
            parse(&pmin[i], "physical minimum", i)?,
            parse(&pmax[i], "physical maximum", i)?,
        );
        let (d0, d1) = (
            parse(&dmin[i], "digital minimum", i)?,
            parse(&dmax[i], "digital maximum", i)?,
        );
        if p1 == p0 || d1 == d0 {
            return Err(err(
                path,
                "physical/digital range",
                format!(
                    "signal {i} (`{}`): an empty range ({p0}..{p1}, {d0}..{d1})",
                    labels[i]
                ),
            ));
        }
        let gain = (d1 - d0) / (p1 - p0);
        let k = per_record[i] / frames_per_record;
        let mut adc = vec![i32::MIN; n_frames * k];
        for r in 0..n_rec {
            let s0 = start_of(r) * k;
            for j in 0..per_record[i] {
                adc[s0 + j] = sample(r, offsets[i], j) as i32;
            }
        }
        let mut ch = Channel {
            lead: Lead::parse(&labels[i]),
            description: labels[i].clone(),
            gain,
            baseline: d0 - p0 * gain,
            units: dims[i].clone(),
            adc,
            invalid: Some(i32::MIN),
            spans: Vec::new(),
        };
        match opts.frames {
            Frames::Smooth if k > 1 => {
                // The exact mean: the frame's sum, with gain and baseline times k.
                ch.adc = ch
                    .adc
                    .chunks_exact(k)
                    .map(|f| {
                        if f.contains(&i32::MIN) {
                            i32::MIN
                        } else {
                            f.iter().map(|&v| v as i64).sum::<i64>() as i32
                        }
                    })
                    .collect();
                ch.gain *= k as f64;
                ch.baseline *= k as f64;
            }
            Frames::Expand if lcm / k > 1 => {
                let rep = lcm / k;
                ch.adc = ch
                    .adc
                    .iter()
                    .flat_map(|&v| std::iter::repeat_n(v, rep))
                    .collect();
            }
            _ => {}
        }
        channels.push(ch);
    }
    let (fs, n_samples) = match opts.frames {
        Frames::Smooth => (fs, n_frames),
        Frames::Expand => (fs * lcm as f64, n_frames * lcm),
    };
    let name = path
        .file_stem()
        .map_or(String::new(), |s| s.to_string_lossy().into_owned());
    Ok(Record {
        name,
        fs,
        n_samples: if channels.is_empty() { 0 } else { n_samples },
        channels,
        comments,
        base_time: base_time(&date, &time),
    })
}

/// `hh:mm:ss dd/mm/yyyy` from EDF's `dd.mm.yy` and `hh.mm.ss` (years 85-99 are 19xx).
fn base_time(date: &str, time: &str) -> Option<String> {
    let d: Vec<&str> = date.split('.').collect();
    let t: Vec<&str> = time.split('.').collect();
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    let yy: u32 = d[2].parse().ok()?;
    let year = if yy >= 85 { 1900 + yy } else { 2000 + yy };
    Some(format!(
        "{}:{}:{} {}/{}/{year}",
        t[0], t[1], t[2], d[0], d[1]
    ))
}

/// One time-stamped annotation list.
#[derive(Debug, Clone, PartialEq)]
struct Tal {
    onset: f64,
    duration: Option<f64>,
    texts: Vec<String>,
}

/// The TALs of one data record's annotation bytes: `+onset[\x15duration]\x14text\x14...\x14\0`,
/// padded with zeros.
fn parse_tals(raw: &[u8]) -> std::result::Result<Vec<Tal>, String> {
    let mut out = Vec::new();
    for chunk in raw.split(|&b| b == 0) {
        if chunk.is_empty() {
            continue;
        }
        let mut parts = chunk.split(|&b| b == 0x14);
        let head = parts.next().unwrap_or_default();
        let (on, dur) = match head.iter().position(|&b| b == 0x15) {
            Some(p) => (&head[..p], Some(&head[p + 1..])),
            None => (head, None),
        };
        let as_num = |b: &[u8]| -> std::result::Result<f64, String> {
            let s = String::from_utf8_lossy(b);
            s.trim()
                .parse::<f64>()
                .map_err(|_| format!("TAL onset or duration `{s}` is not a number"))
        };
        let onset = as_num(on)?;
        let duration = dur.map(as_num).transpose()?;
        let texts = parts
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        out.push(Tal {
            onset,
            duration,
            texts,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tals_with_and_without_duration() {
        let raw = b"+0\x14\x14\0+30\x1530\x14Sleep stage W\x14\0\0\0";
        let t = parse_tals(raw).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t[0].texts.is_empty() && t[0].onset == 0.0);
        assert_eq!((t[1].onset, t[1].duration), (30.0, Some(30.0)));
        assert_eq!(t[1].texts, ["Sleep stage W"]);
        assert!(parse_tals(b"+x\x14\x14\0").is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(
            base_time("10.12.09", "12.44.02").as_deref(),
            Some("12:44:02 10/12/2009")
        );
        assert_eq!(
            base_time("01.01.85", "00.00.00").as_deref(),
            Some("00:00:00 01/01/1985")
        );
    }
}
