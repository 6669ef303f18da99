//! WFDB header (`.hea`) parsing, after the WFDB "header(5)" specification.
//!
//! Written here rather than taken from a crate: the Rust WFDB crates we found read only a
//! subset (no byte offsets, no checksum, no comments interleaved with signal lines), and the
//! error messages must name line and field.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::lead::Lead;

/// The record line and signal lines of a WFDB header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Record name as written on the record line.
    pub record: String,
    /// Sampling frequency in Hz (WFDB default 250 when absent).
    pub fs: f64,
    /// Samples per signal; `None` when the header leaves it to the file size.
    pub n_samples: Option<usize>,
    /// Base time and date as written (free text, kept verbatim).
    pub base_time: Option<String>,
    /// One entry per signal, in file order.
    pub signals: Vec<SignalSpec>,
    /// Comment lines without the leading `#` and one optional space, in order.
    pub comments: Vec<String>,
    /// A multi-segment record's segments (`name/n` on the record line), in order; empty for
    /// a single-segment record (then `signals` describes the signals).
    pub segments: Vec<Segment>,
}

/// One segment line of a multi-segment header.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Record name of the segment (`~` for a null segment: no data, every sample missing).
    pub name: String,
    /// Samples (frames) in the segment; 0 for the layout segment.
    pub n_samples: usize,
}

/// One signal line.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalSpec {
    /// Signal file name, relative to the header's directory.
    pub file: String,
    /// Storage format code (16, 212, ...).
    pub format: u32,
    /// Samples per frame (1 unless the header writes `16x2`).
    pub samples_per_frame: u32,
    /// Byte offset of the first sample in the file (`16+24` -> 24).
    pub byte_offset: u64,
    /// Skew in frames (`212:3` -> 3): sample `i` of this signal is stored in frame `i + skew`
    /// of the file.
    pub skew: u32,
    /// ADC units per physical unit (200 when the header gives 0 or nothing).
    pub gain: f64,
    /// ADC value of physical zero (defaults to `adc_zero`).
    pub baseline: i64,
    /// Physical units (default `mV`).
    pub units: String,
    /// ADC resolution in bits (0 = unspecified).
    pub adc_resolution: u32,
    /// ADC zero.
    pub adc_zero: i64,
    /// First sample value, when given.
    pub initial_value: Option<i64>,
    /// 16-bit signed sum of all samples, when given.
    pub checksum: Option<i32>,
    /// Block size (0 = not a block device).
    pub block_size: u64,
    /// Description (the lead name for ECGs).
    pub description: String,
    /// Normalised lead.
    pub lead: Lead,
}

/// WFDB's default gain when the header gives 0 or none (`DEFGAIN`).
pub const DEFAULT_GAIN: f64 = 200.0;
/// WFDB's default sampling frequency (`DEFFREQ`).
pub const DEFAULT_FS: f64 = 250.0;

fn field_err(path: &Path, line: usize, field: &'static str, expected: &str, found: &str) -> Error {
    Error::Header {
        path: path.to_path_buf(),
        line,
        field,
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

impl Header {
    /// Read and parse a header file.
    pub fn read(path: &Path) -> Result<Header> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Header::parse_bytes(&bytes, path)
    }

    /// Parse header bytes; `path` is used in error messages only.
    pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Header> {
        let mut lines = Vec::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            // UTF-8, or else Latin-1 (every byte is one character), as older PhysioNet
            // headers are written (`µV` as the single byte 0xB5).
            let text = match std::str::from_utf8(raw) {
                Ok(t) => t.to_string(),
                Err(_) => raw.iter().map(|&b| b as char).collect(),
            };
            let _ = i;
            lines.push(text);
        }
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        Header::parse_lines(&lines, path)
    }

    fn parse_lines(lines: &[&str], path: &Path) -> Result<Header> {
        let mut comments = Vec::new();
        let mut record_line: Option<(usize, &str)> = None;
        let mut signal_lines: Vec<(usize, &str)> = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            if let Some(c) = t.strip_prefix('#') {
                comments.push(c.strip_prefix(' ').unwrap_or(c).trim_end().to_string());
                continue;
            }
            if t.is_empty() {
                continue;
            }
            if record_line.is_none() {
                record_line = Some((i + 1, t));
            } else {
                signal_lines.push((i + 1, t));
            }
        }
        let (rl, rtext) = record_line
            .ok_or_else(|| field_err(path, 1, "record line", "`name nsig [fs [nsamp ...]]`", ""))?;
        let mut it = rtext.split_whitespace();
        let name_field = it.next().unwrap_or("");
        let (name_field, n_seg) = match name_field.split_once('/') {
            Some((n, k)) => (
                n,
                Some(k.parse::<usize>().map_err(|_| {
                    field_err(
                        path,
                        rl,
                        "number of segments",
                        "`name/segments`",
                        name_field,
                    )
                })?),
            ),
            None => (name_field, None),
        };
        let n_sig_text = it.next().unwrap_or("");
        let n_sig: usize = n_sig_text
            .parse()
            .map_err(|_| field_err(path, rl, "number of signals", "an integer", n_sig_text))?;
        let fs = match it.next() {
            None => DEFAULT_FS,
            Some(f) => {
                // `fs[/counter_freq[(base_counter)]]`: only fs matters here.
                let fpart = f.split('/').next().unwrap_or(f);
                let v: f64 = fpart.parse().map_err(|_| {
                    field_err(path, rl, "sampling frequency", "a positive number", f)
                })?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(field_err(
                        path,
                        rl,
                        "sampling frequency",
                        "a positive number",
                        f,
                    ));
                }
                v
            }
        };
        let n_samples = match it.next() {
            None => None,
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                field_err(path, rl, "number of samples", "a non-negative integer", n)
            })?),
        };
        let rest: Vec<&str> = it.collect();
        let base_time = (!rest.is_empty()).then(|| rest.join(" "));
        if let Some(k) = n_seg {
            if signal_lines.len() != k {
                return Err(field_err(
                    path,
                    signal_lines.get(k).map_or(lines.len(), |l| l.0),
                    "segment lines",
                    &format!("{k} segment lines (the record line says {k} segments)"),
                    &format!("{} lines", signal_lines.len()),
                ));
            }
            let mut segments = Vec::with_capacity(k);
            for (line, text) in &signal_lines {
                let mut f = text.split_whitespace();
                let name = f.next().unwrap_or("").to_string();
                let n = f.next().unwrap_or("");
                let n_samples = n.parse::<usize>().map_err(|_| {
                    field_err(path, *line, "segment length", "a non-negative integer", n)
                })?;
                if name != "~" && !is_plain_file_name(&name) {
                    return Err(field_err(
                        path,
                        *line,
                        "segment name",
                        "a record name",
                        &name,
                    ));
                }
                segments.push(Segment { name, n_samples });
            }
            return Ok(Header {
                record: name_field.to_string(),
                fs,
                n_samples,
                base_time,
                signals: Vec::new(),
                comments,
                segments,
            });
        }
        if signal_lines.len() != n_sig {
            let (line, found) = signal_lines
                .get(n_sig)
                .map(|(l, t)| (*l, t.to_string()))
                .unwrap_or((lines.len(), format!("{} signal lines", signal_lines.len())));
            return Err(field_err(
                path,
                line,
                "signal lines",
                &format!("{n_sig} signal lines (the record line says {n_sig} signals)"),
                &found,
            ));
        }
        let mut signals = Vec::with_capacity(n_sig);
        for (index, (line, text)) in signal_lines.iter().enumerate() {
            signals.push(parse_signal_line(path, *line, index, text)?);
        }
        Ok(Header {
            record: name_field.to_string(),
            fs,
            n_samples,
            base_time,
            signals,
            comments,
            segments: Vec::new(),
        })
    }

    /// Directory holding the header; signal files are looked up relative to it.
    pub fn dir(path: &Path) -> PathBuf {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// Serialise back to WFDB header text (every field written explicitly).
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{} {} {}",
            self.record,
            self.signals.len(),
            fmt_num(self.fs)
        );
        if let Some(n) = self.n_samples {
            s.push_str(&format!(" {n}"));
            if let Some(t) = &self.base_time {
                s.push_str(&format!(" {t}"));
            }
        }
        s.push('\n');
        for sig in &self.signals {
            let mut fmtfield = sig.format.to_string();
            if sig.samples_per_frame != 1 {
                fmtfield.push_str(&format!("x{}", sig.samples_per_frame));
            }
            if sig.skew != 0 {
                fmtfield.push_str(&format!(":{}", sig.skew));
            }
            if sig.byte_offset != 0 {
                fmtfield.push_str(&format!("+{}", sig.byte_offset));
            }
            s.push_str(&format!(
                "{} {} {}({})/{} {} {} {} {} {} {}\n",
                sig.file,
                fmtfield,
                fmt_num(sig.gain),
                sig.baseline,
                sig.units,
                sig.adc_resolution,
                sig.adc_zero,
                sig.initial_value.unwrap_or(0),
                sig.checksum.unwrap_or(0),
                sig.block_size,
                sig.description
            ));
        }
        for c in &self.comments {
            s.push_str(&format!("# {c}\n"));
        }
        s
    }
}

/// Shortest text that parses back to the same f64.
fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// A name that stays in the header's directory: not empty, no path separator (either OS's),
/// not `.` or `..`, no drive prefix or NUL.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', ':', '\0'])
}

fn parse_signal_line(path: &Path, line: usize, index: usize, text: &str) -> Result<SignalSpec> {
    let mut it = text.split_whitespace();
    let file = it.next().unwrap_or("").to_string();
    if !is_plain_file_name(&file) {
        // A header names files beside itself. An absolute path, `..` or a directory would
        // make the reader open a file the record's owner did not give (in a service, a file
        // disclosure), so they are refused rather than followed.
        return Err(field_err(
            path,
            line,
            "signal file name",
            "a file name in the header's own directory (no `/`, `\\`, `..` or absolute path)",
            &file,
        ));
    }
    let fmt_text = it.next().ok_or_else(|| {
        field_err(
            path,
            line,
            "format",
            "a WFDB format code such as 16 or 212",
            "",
        )
    })?;
    // format[xsamples_per_frame][:skew][+byte_offset]
    let (fmt_main, offset_text) = match fmt_text.split_once('+') {
        Some((a, b)) => (a, Some(b)),
        None => (fmt_text, None),
    };
    let (fmt_main, skew) = match fmt_main.split_once(':') {
        Some((a, b)) => (
            a,
            b.parse::<u32>()
                .map_err(|_| field_err(path, line, "skew", "a non-negative integer", fmt_text))?,
        ),
        None => (fmt_main, 0),
    };
    let (code_text, spf_text) = match fmt_main.split_once('x') {
        Some((a, b)) => (a, Some(b)),
        None => (fmt_main, None),
    };
    let format: u32 = code_text
        .parse()
        .map_err(|_| field_err(path, line, "format", "an integer format code", fmt_text))?;
    let samples_per_frame: u32 = match spf_text {
        None => 1,
        Some(t) => t.parse().map_err(|_| {
            field_err(
                path,
                line,
                "samples per frame",
                "a positive integer",
                fmt_text,
            )
        })?,
    };
    if samples_per_frame == 0 {
        return Err(field_err(
            path,
            line,
            "samples per frame",
            "a positive integer",
            fmt_text,
        ));
    }
    let byte_offset: u64 = match offset_text {
        None => 0,
        Some(t) => t.parse().map_err(|_| {
            field_err(
                path,
                line,
                "byte offset",
                "a non-negative integer",
                fmt_text,
            )
        })?,
    };
    // gain[(baseline)][/units]
    let gain_text = it.next();
    let (gain, baseline_opt, units) = match gain_text {
        None => (DEFAULT_GAIN, None, "mV".to_string()),
        Some(g) => {
            let (g_main, units) = match g.split_once('/') {
                Some((a, u)) => (a, u.to_string()),
                None => (g, "mV".to_string()),
            };
            let (g_num, base) = match g_main.split_once('(') {
                Some((a, b)) => {
                    let b = b
                        .strip_suffix(')')
                        .ok_or_else(|| field_err(path, line, "baseline", "`gain(baseline)`", g))?;
                    let bv: i64 = b.parse().map_err(|_| {
                        field_err(path, line, "baseline", "an integer ADC value", g)
                    })?;
                    (a, Some(bv))
                }
                None => (g_main, None),
            };
            let gv: f64 = g_num.parse().map_err(|_| {
                field_err(
                    path,
                    line,
                    "gain",
                    "a positive number (ADC units per mV)",
                    g,
                )
            })?;
            if !gv.is_finite() {
                return Err(field_err(
                    path,
                    line,
                    "gain",
                    "a positive number (ADC units per mV)",
                    g,
                ));
            }
            let gv = if gv == 0.0 { DEFAULT_GAIN } else { gv };
            (gv, base, units)
        }
    };
    let int_field = |v: Option<&str>, field: &'static str| -> Result<Option<i64>> {
        match v {
            None => Ok(None),
            Some(t) => t
                .parse::<i64>()
                .map(Some)
                .map_err(|_| field_err(path, line, field, "an integer", t)),
        }
    };
    let adc_resolution = int_field(it.next(), "ADC resolution")?.unwrap_or(0);
    let adc_zero = int_field(it.next(), "ADC zero")?.unwrap_or(0);
    let initial_value = int_field(it.next(), "initial value")?;
    let checksum = int_field(it.next(), "checksum")?;
    let block_size = int_field(it.next(), "block size")?.unwrap_or(0);
    if adc_resolution < 0 || block_size < 0 {
        return Err(field_err(
            path,
            line,
            "ADC resolution/block size",
            "non-negative",
            text,
        ));
    }
    let checksum = match checksum {
        None => None,
        Some(c) if (-32768..=65535).contains(&c) => Some(c as i32),
        Some(c) => {
            return Err(field_err(
                path,
                line,
                "checksum",
                "a 16-bit value",
                &c.to_string(),
            ));
        }
    };
    let description: Vec<&str> = it.collect();
    let description = if description.is_empty() {
        format!("signal {index}")
    } else {
        description.join(" ")
    };
    Ok(SignalSpec {
        file,
        format,
        samples_per_frame,
        byte_offset,
        skew,
        gain,
        baseline: baseline_opt.unwrap_or(adc_zero),
        units,
        adc_resolution: adc_resolution as u32,
        adc_zero,
        initial_value,
        checksum,
        block_size: block_size as u64,
        lead: Lead::parse(&description),
        description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Header> {
        Header::parse_bytes(s.as_bytes(), Path::new("t.hea"))
    }

    #[test]
    fn full_signal_line() {
        let h = parse(
            "A0001 12 500 7500 12-May-2020 12:33:59\n\
             A0001.mat 16x1+24 1000.0(-5)/uV 16 3 28 -1716 0 aVR\n"
                .replace(" 12 500", " 1 500")
                .as_str(),
        )
        .unwrap();
        let s = &h.signals[0];
        assert_eq!(h.n_samples, Some(7500));
        assert_eq!(h.base_time.as_deref(), Some("12-May-2020 12:33:59"));
        assert_eq!((s.format, s.samples_per_frame, s.byte_offset), (16, 1, 24));
        assert_eq!((s.gain, s.baseline, s.units.as_str()), (1000.0, -5, "uV"));
        assert_eq!((s.adc_resolution, s.adc_zero), (16, 3));
        assert_eq!((s.initial_value, s.checksum), (Some(28), Some(-1716)));
        assert_eq!(s.lead, Lead::AVR);
    }

    #[test]
    fn defaults_and_comments_anywhere() {
        let h = parse("r 1\n# a comment\nr.dat 212\n#Dx: 1,2\n").unwrap();
        assert_eq!(h.fs, DEFAULT_FS);
        assert_eq!(h.n_samples, None);
        assert_eq!(h.signals[0].gain, DEFAULT_GAIN);
        assert_eq!(h.signals[0].baseline, 0);
        assert_eq!(h.comments, vec!["a comment", "Dx: 1,2"]);
    }

    #[test]
    fn bad_fields_are_named() {
        let e = parse("r 1 500 10\nr.dat 16 abc 16 0\n").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Header {
                    field: "gain",
                    line: 2,
                    ..
                }
            ),
            "{e}"
        );
        // A negative gain is kept (an inverted channel, as wfdb-python reads it).
        assert_eq!(
            parse("r 1 500 10\nr.dat 16 -3 16 0\n").unwrap().signals[0].gain,
            -3.0
        );
        let e = parse("r 1 500 10\nr.dat 16 inf 16 0\n").unwrap_err();
        assert!(matches!(e, Error::Header { field: "gain", .. }), "{e}");
        let e = parse("r 2 500 10\nr.dat 16 200 16 0\n").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Header {
                    field: "signal lines",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse("r x 500\n").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Header {
                    field: "number of signals",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse("r/3 1 500\n").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Header {
                    field: "segment lines",
                    ..
                }
            ),
            "{e}"
        );
        let h = parse("r/2 1 500 30\nr_1 10\n~ 20\n").unwrap();
        assert_eq!(h.segments.len(), 2);
        assert_eq!(
            (h.segments[1].name.as_str(), h.segments[1].n_samples),
            ("~", 20)
        );
        // Not UTF-8: read as Latin-1, byte for character.
        let h = Header::parse_bytes(
            b"r 1 500 10\n#\xb5V\nr.dat 16 200/\xb5V\n",
            Path::new("t.hea"),
        )
        .unwrap();
        assert_eq!(h.comments, ["\u{b5}V"]);
        assert_eq!(h.signals[0].units, "\u{b5}V");
    }

    #[test]
    fn text_round_trip() {
        let h = parse("rec 2 360 100\nrec.dat 16 200(3)/mV 16 0 5 -7 0 MLII\nrec.dat 16 1000.5(0)/mV 12 0 1 2 0 V5\n# hello\n")
            .unwrap();
        assert_eq!(parse(&h.to_text()).unwrap(), h);
    }
}
