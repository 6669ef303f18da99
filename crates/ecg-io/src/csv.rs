//! ECG records as CSV, the layout `evl-ecg data convert --to csv` writes: a header row of
//! signal names (`I,II,V1,...`), then one row per sample of physical values in millivolts,
//! `nan` for a missing sample. CSV has no place for the sampling rate, so the caller gives it.
//!
//! Values are stored as integer ADC counts of 1 uV (gain 1000 per mV), finer than any ECG
//! front end digitises, so a record written by `data convert` reads back to within 0.5 uV.

use std::path::{Path, PathBuf};

use crate::lead::Lead;
use crate::record::{Channel, Record};
use crate::{Error, Result};

/// ADC counts per millivolt of a record read from CSV.
pub const CSV_GAIN: f64 = 1000.0;

/// Largest magnitude accepted, in mV (beyond it a value is not an ECG and would overflow the
/// i32 counts).
const MAX_MV: f64 = 1.0e6;

/// Read a CSV record from a file.
pub fn read_csv(path: &Path, fs: f64) -> Result<Record> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("record")
        .to_string();
    parse_csv(path, &name, &bytes, fs)
}

/// Parse CSV bytes as record `name`; `path` is only used to name the source in errors (an
/// uploaded file's name in a service).
pub fn parse_csv(path: &Path, name: &str, bytes: &[u8], fs: f64) -> Result<Record> {
    let err = |line: usize, column: String, what: String| Error::CsvRecord {
        path: PathBuf::from(path),
        line,
        column,
        what,
    };
    if !(fs.is_finite() && fs > 0.0) {
        return Err(err(
            1,
            "-".into(),
            format!("the sampling rate must be a positive number of Hz, not {fs}"),
        ));
    }
    let mut rdr = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(::csv::Trim::All)
        .from_reader(bytes);
    let headers = rdr
        .headers()
        .map_err(|e| err(1, "-".into(), format!("no header row of signal names: {e}")))?
        .clone();
    if headers.is_empty() || headers.iter().all(str::is_empty) {
        return Err(err(
            1,
            "-".into(),
            "no header row of signal names (expected e.g. `I,II,V1`)".into(),
        ));
    }
    let names: Vec<String> = headers
        .iter()
        .enumerate()
        .map(|(j, h)| {
            if h.is_empty() {
                format!("{}", j + 1)
            } else {
                h.to_string()
            }
        })
        .collect();
    let mut adc: Vec<Vec<i32>> = vec![Vec::new(); names.len()];
    let mut row = ::csv::StringRecord::new();
    let mut line = 1;
    loop {
        line += 1;
        match rdr.read_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line() as usize);
                let what = match e.kind() {
                    ::csv::ErrorKind::UnequalLengths { len, .. } => format!(
                        "{len} values in the row, the header names {} signals",
                        names.len()
                    ),
                    _ => e.to_string(),
                };
                return Err(err(line, "-".into(), what));
            }
        }
        for (j, cell) in row.iter().enumerate() {
            let v: f64 = if cell.eq_ignore_ascii_case("nan") || cell.is_empty() {
                f64::NAN
            } else {
                cell.parse().map_err(|_| {
                    err(
                        line,
                        names[j].clone(),
                        format!("expected a number of mV or `nan`, found `{cell}`"),
                    )
                })?
            };
            let count = if v.is_nan() {
                i32::MIN
            } else if v.abs() <= MAX_MV {
                (v * CSV_GAIN).round() as i32
            } else {
                return Err(err(
                    line,
                    names[j].clone(),
                    format!("{cell} mV is not an ECG value (magnitude above {MAX_MV} mV)"),
                ));
            };
            adc[j].push(count);
        }
    }
    let n_samples = adc[0].len();
    if n_samples == 0 {
        return Err(err(2, "-".into(), "no samples after the header row".into()));
    }
    let channels = names
        .into_iter()
        .zip(adc)
        .map(|(description, adc)| Channel {
            lead: Lead::parse(&description),
            description,
            gain: CSV_GAIN,
            baseline: 0.0,
            units: "mV".into(),
            adc,
            invalid: Some(i32::MIN),
            spans: Vec::new(),
        })
        .collect();
    Ok(Record {
        name: name.to_string(),
        fs,
        n_samples,
        channels,
        comments: Vec::new(),
        base_time: None,
    })
}

/// Write a record in this layout: physical values in the channels' own units (the shortest
/// text that reads back to the same f64, `nan` for missing), or raw ADC counts with `adc`.
pub fn write_csv(r: &Record, adc: bool, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let names: Vec<&str> = r.channels.iter().map(|c| c.description.as_str()).collect();
    writeln!(out, "{}", names.join(","))?;
    let mut line = String::new();
    for k in 0..r.n_samples {
        line.clear();
        for (j, c) in r.channels.iter().enumerate() {
            if j > 0 {
                line.push(',');
            }
            if adc {
                line.push_str(&c.adc[k].to_string());
            } else {
                let v = c.physical_at(k);
                if v.is_nan() {
                    line.push_str("nan");
                } else {
                    line.push_str(&format!("{v}"));
                }
            }
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_convert_layout_and_names_bad_cells() {
        let p = Path::new("x.csv");
        let r = parse_csv(p, "x", b"I,II\n0.125,-1.5\nnan,2\n", 500.0).unwrap();
        assert_eq!(r.n_samples, 2);
        assert_eq!(r.fs, 500.0);
        assert_eq!(r.channels[0].lead, Lead::parse("I"));
        assert_eq!(r.channels[1].physical(), vec![-1.5, 2.0]);
        assert!(r.channels[0].physical_at(1).is_nan());
        assert_eq!(r.channels[0].physical_at(0), 0.125);

        let e = parse_csv(p, "x", b"I,II\n0.1,abc\n", 500.0).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("x.csv:2") && m.contains("`II`") && m.contains("abc"),
            "{m}"
        );
        let e = parse_csv(p, "x", b"I,II\n0.1\n", 500.0).unwrap_err();
        assert!(e.to_string().contains("1 values in the row"), "{e}");
        let e = parse_csv(p, "x", b"I,II\n", 500.0).unwrap_err();
        assert!(e.to_string().contains("no samples"), "{e}");
        let e = parse_csv(p, "x", b"I\n1e300\n", 500.0).unwrap_err();
        assert!(e.to_string().contains("not an ECG value"), "{e}");
        let e = parse_csv(p, "x", b"I\n1\n", 0.0).unwrap_err();
        assert!(e.to_string().contains("sampling rate"), "{e}");
        let e = parse_csv(p, "x", b"", 500.0).unwrap_err();
        assert!(e.to_string().contains("header row"), "{e}");
    }

    #[test]
    fn what_write_csv_writes_reads_back() {
        let r = parse_csv(
            Path::new("x.csv"),
            "x",
            b"I,V1\n0.125,-1.5\nnan,2.001\n",
            360.0,
        )
        .unwrap();
        let mut out = Vec::new();
        write_csv(&r, false, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "I,V1\n0.125,-1.5\nnan,2.001\n"
        );
        let back = parse_csv(Path::new("x.csv"), "x", &out, 360.0).unwrap();
        assert_eq!(back.channels[1].adc, r.channels[1].adc);
    }
}
