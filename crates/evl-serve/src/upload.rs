//! What a client sends, from raw bytes to a record: the multipart body parsed (files and
//! form fields), the kind of upload recognised (WFDB, CinC `.hea` + `.mat`, EDF, CSV, image),
//! its files written under a fresh temporary directory that is removed afterwards, and the
//! record read with the same readers the command line uses, within the service's limits.
//!
//! The service reads only what the client sent: file names are reduced to plain names (a
//! name with a directory, `..` or a NUL is refused), and every file a header names must be in
//! the upload (`ecg_io` refuses headers that reach outside their directory).

use std::collections::BTreeMap;
use std::path::Path;

use ecg_io::wfdb::Header;
use ecg_io::{ReadOptions, Record};

use crate::error::ApiError;

/// The service's limits on one request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Most files in one upload.
    pub max_files: usize,
    /// Longest record, seconds.
    pub max_duration_s: f64,
    /// Most signals (leads) in a record.
    pub max_leads: usize,
    /// Highest sampling rate, Hz.
    pub max_fs: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 32 << 20,
            max_files: 64,
            max_duration_s: 300.0,
            max_leads: 16,
            max_fs: 10_000.0,
        }
    }
}

/// One uploaded file.
#[derive(Debug, Clone)]
pub struct UploadFile {
    /// Its plain file name.
    pub name: String,
    /// Its contents.
    pub bytes: Vec<u8>,
}

/// A parsed upload: files and form fields.
#[derive(Debug, Clone, Default)]
pub struct Upload {
    /// The files, in the order sent.
    pub files: Vec<UploadFile>,
    /// The question to answer by generation (the diagnosis question when absent).
    pub question: Option<String>,
    /// Sampling rate of a CSV record, Hz.
    pub fs: Option<f64>,
    /// Which record of several headers to read (its name).
    pub record: Option<String>,
    /// Whether to return the record rendered as 12-lead ECG paper (PNG, base64).
    pub render: bool,
}

/// The kinds of upload the service reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A WFDB record: `.hea` + signal files (any format the reader decodes, multi-segment).
    Wfdb,
    /// A PhysioNet/CinC record: `.hea` + MATLAB v4 `.mat`.
    Cinc,
    /// An EDF or EDF+ file.
    Edf,
    /// A CSV in the `data convert` layout (needs `fs`).
    Csv,
    /// An image of ECG paper (PNG, JPEG).
    Image,
}

/// The upload read: a record, or an image for an image model.
#[derive(Debug)]
pub enum Input {
    /// A record and the kind it came as.
    Record(Box<Record>, Kind),
    /// An encoded image and its file name.
    Image(UploadFile),
}

/// Longest question accepted, characters.
pub const MAX_QUESTION: usize = 2_000;

/// Parse a `multipart/form-data` body. Fields: `file` (repeatable; any field carrying a file
/// name counts as a file), `question`, `fs`, `record`, `render`. Unknown text fields are
/// refused so a misspelt option is not silently ignored.
pub fn parse_multipart(
    content_type: &str,
    body: &[u8],
    limits: &Limits,
) -> Result<Upload, ApiError> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| {
        ApiError::bad_upload(format!(
            "expected a multipart/form-data body with a boundary (Content-Type `{content_type}`): {e}"
        ))
    })?;
    let stream = futures_util::stream::once(std::future::ready(Ok::<_, std::io::Error>(
        bytes::Bytes::copy_from_slice(body),
    )));
    let mut mp = multer::Multipart::new(stream, boundary);
    // The body is already in memory, so every future below is ready at once.
    futures_executor::block_on(async move {
        let mut up = Upload::default();
        let mut seen = std::collections::BTreeSet::new();
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(ApiError::bad_upload(format!(
                        "malformed multipart body: {e}"
                    )));
                }
            };
            let field_name = field.name().unwrap_or("").to_string();
            let file_name = field.file_name().map(str::to_string);
            let data = field.bytes().await.map_err(|e| {
                ApiError::bad_upload(format!("malformed multipart field `{field_name}`: {e}"))
            })?;
            if let Some(raw) = file_name {
                let name = plain_name(&raw)?;
                if !seen.insert(name.clone()) {
                    return Err(ApiError::bad_upload(format!("file `{name}` is sent twice")));
                }
                if up.files.len() == limits.max_files {
                    return Err(ApiError::over_limit(format!(
                        "more than {} files in one upload",
                        limits.max_files
                    )));
                }
                up.files.push(UploadFile {
                    name,
                    bytes: data.to_vec(),
                });
                continue;
            }
            let text = std::str::from_utf8(&data)
                .map_err(|_| {
                    ApiError::bad_upload(format!("field `{field_name}` is not UTF-8 text"))
                })?
                .trim()
                .to_string();
            match field_name.as_str() {
                "question" => {
                    if text.chars().count() > MAX_QUESTION {
                        return Err(ApiError::over_limit(format!(
                            "field `question`: longer than {MAX_QUESTION} characters"
                        )));
                    }
                    up.question = (!text.is_empty()).then_some(text);
                }
                "fs" => {
                    if !text.is_empty() {
                        let v: f64 = text
                            .parse()
                            .ok()
                            .filter(|v: &f64| v.is_finite() && *v > 0.0)
                            .ok_or_else(|| {
                                ApiError::bad_upload(format!(
                                    "field `fs`: expected a sampling rate in Hz, found `{text}`"
                                ))
                            })?;
                        up.fs = Some(v);
                    }
                }
                "record" => up.record = (!text.is_empty()).then_some(text),
                "render" => {
                    up.render = match text.to_ascii_lowercase().as_str() {
                        "" | "0" | "false" | "no" | "off" => false,
                        "1" | "true" | "yes" | "on" => true,
                        _ => {
                            return Err(ApiError::bad_upload(format!(
                                "field `render`: expected true or false, found `{text}`"
                            )));
                        }
                    }
                }
                "file" => {
                    return Err(ApiError::bad_upload(
                        "field `file` has no file name (send it as a file part, with a filename)",
                    ));
                }
                other => {
                    return Err(ApiError::bad_upload(format!(
                        "unknown field `{other}` (known: file, question, fs, record, render)"
                    )));
                }
            }
        }
        if up.files.is_empty() {
            return Err(ApiError::bad_upload(
                "no file in the upload: send the record's files as `file` parts",
            ));
        }
        Ok(up)
    })
}

/// The plain name of an uploaded file: browsers send plain names, but a client may send a
/// path; anything that is not a plain name in one directory is refused.
pub fn plain_name(raw: &str) -> Result<String, ApiError> {
    let ok = !raw.is_empty()
        && raw.len() <= 255
        && raw != "."
        && raw != ".."
        && !raw.contains(['/', '\\', '\0', ':'])
        && !raw.chars().any(char::is_control);
    if ok {
        Ok(raw.to_string())
    } else {
        Err(ApiError::bad_upload(format!(
            "file name `{}` is not a plain file name (no directories, `..`, `:` or control \
             characters)",
            raw.escape_debug()
        )))
    }
}

fn ext(name: &str) -> String {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn stem(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

/// Whether bytes start like an image this build decodes.
fn looks_like_image(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x89PNG\r\n\x1a\n") || bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Recognise the upload and read its record (or image), within `limits`. Files are written
/// under a fresh temporary directory, removed when this returns.
pub fn read_upload(up: &Upload, limits: &Limits) -> Result<Input, ApiError> {
    let files: BTreeMap<&str, &UploadFile> =
        up.files.iter().map(|f| (f.name.as_str(), f)).collect();
    let headers: Vec<&UploadFile> = up.files.iter().filter(|f| ext(&f.name) == "hea").collect();
    if !headers.is_empty() {
        return read_wfdb(up, &files, &headers, limits);
    }
    if up.files.len() != 1 {
        let names: Vec<&str> = up.files.iter().map(|f| f.name.as_str()).collect();
        return Err(ApiError::bad_upload(format!(
            "{} files without a `.hea` header ({}): send one EDF, CSV or image file, or a \
             WFDB/CinC record's header with its signal files",
            names.len(),
            names.join(", ")
        )));
    }
    let f = &up.files[0];
    match ext(&f.name).as_str() {
        "edf" | "rec" => read_edf(f, limits),
        "csv" => {
            let fs = up.fs.ok_or_else(|| {
                ApiError::bad_upload(format!(
                    "{}: a CSV record needs its sampling rate: send the `fs` field (Hz)",
                    f.name
                ))
            })?;
            if fs > limits.max_fs {
                return Err(ApiError::over_limit(format!(
                    "field `fs`: {fs} Hz is above the limit of {} Hz",
                    limits.max_fs
                )));
            }
            let r = ecg_io::csv::parse_csv(Path::new(&f.name), stem(&f.name), &f.bytes, fs)
                .map_err(|e| ApiError::bad_record(e.to_string()))?;
            check_record(&r, &f.name, limits)?;
            Ok(Input::Record(Box::new(r), Kind::Csv))
        }
        "png" | "jpg" | "jpeg" => {
            if !looks_like_image(&f.bytes) {
                return Err(ApiError::bad_record(format!(
                    "{}: the contents are not a PNG or JPEG image",
                    f.name
                )));
            }
            Ok(Input::Image(f.clone()))
        }
        "dat" | "mat" => Err(ApiError::bad_upload(format!(
            "{}: a signal file needs its `.hea` header in the same upload",
            f.name
        ))),
        _ if looks_like_image(&f.bytes) => Ok(Input::Image(f.clone())),
        e => Err(ApiError::unsupported(format!(
            "{}: files of type `.{e}` are not read; send a WFDB record (.hea + signal files), \
             a CinC record (.hea + .mat), an EDF file, a CSV (with `fs`) or a PNG/JPEG image",
            f.name
        ))),
    }
}

fn parse_header(f: &UploadFile) -> Result<Header, ApiError> {
    Header::parse_bytes(&f.bytes, Path::new(&f.name))
        .map_err(|e| ApiError::bad_record(e.to_string()))
}

fn read_wfdb(
    up: &Upload,
    files: &BTreeMap<&str, &UploadFile>,
    headers: &[&UploadFile],
    limits: &Limits,
) -> Result<Input, ApiError> {
    let parsed: Vec<(&UploadFile, Header)> = headers
        .iter()
        .map(|f| parse_header(f).map(|h| (*f, h)))
        .collect::<Result<_, _>>()?;
    // The record read: the one named, else the only header, else the one multi-segment
    // header (the others being its segments).
    let main = if let Some(name) = &up.record {
        parsed
            .iter()
            .find(|(f, _)| stem(&f.name) == name)
            .ok_or_else(|| {
                ApiError::bad_upload(format!(
                    "field `record`: no header `{name}.hea` in the upload"
                ))
            })?
    } else if parsed.len() == 1 {
        &parsed[0]
    } else {
        let multi: Vec<_> = parsed
            .iter()
            .filter(|(_, h)| !h.segments.is_empty())
            .collect();
        match multi.as_slice() {
            [one] => *one,
            _ => {
                return Err(ApiError::bad_upload(format!(
                    "{} headers in the upload: name the record to read in the `record` field",
                    parsed.len()
                )));
            }
        }
    };
    let (hfile, header) = main;
    let need_file = |name: &str, by: &str| -> Result<(), ApiError> {
        if files.contains_key(name) {
            Ok(())
        } else {
            Err(ApiError::bad_upload(format!(
                "{by} names `{name}`, which is not in the upload (send every file the record \
                 needs)"
            )))
        }
    };
    let mut kind = Kind::Wfdb;
    let mut check_signals = |h: &Header, by: &str| -> Result<(), ApiError> {
        for s in &h.signals {
            need_file(&s.file, by)?;
            if ext(&s.file) == "mat" {
                kind = Kind::Cinc;
            }
        }
        Ok(())
    };
    if header.segments.is_empty() {
        check_signals(header, &hfile.name)?;
    } else {
        for seg in header.segments.iter().filter(|s| s.name != "~") {
            let seg_file = format!("{}.hea", seg.name);
            need_file(&seg_file, &hfile.name)?;
            let (_, h) = parsed
                .iter()
                .find(|(f, _)| f.name == seg_file)
                .ok_or_else(|| ApiError::bad_upload(format!("{seg_file} is missing")))?;
            check_signals(h, &seg_file)?;
        }
    }
    // Limits from the header, before any signal is decoded.
    let n_sig = if header.segments.is_empty() {
        header.signals.len()
    } else {
        parsed
            .iter()
            .filter(|(f, _)| f.name != hfile.name)
            .map(|(_, h)| h.signals.len())
            .max()
            .unwrap_or(0)
    };
    if n_sig > limits.max_leads {
        return Err(ApiError::over_limit(format!(
            "{}: {n_sig} signals; the limit is {}",
            hfile.name, limits.max_leads
        )));
    }
    if header.fs > limits.max_fs {
        return Err(ApiError::over_limit(format!(
            "{}: sampling frequency {} Hz; the limit is {} Hz",
            hfile.name, header.fs, limits.max_fs
        )));
    }
    if let Some(n) = header.n_samples {
        let d = n as f64 / header.fs;
        if d > limits.max_duration_s {
            return Err(ApiError::over_limit(format!(
                "{}: {n} samples at {} Hz is {d:.1} s; the limit is {} s",
                hfile.name, header.fs, limits.max_duration_s
            )));
        }
    }
    let dir = write_files(&up.files)?;
    let rec = ecg_io::read_record(&dir.path().join(stem(&hfile.name)), ReadOptions::default())
        .map_err(|e| ApiError::bad_record(strip_dir(&e.to_string(), dir.path())))?;
    check_record(&rec, &hfile.name, limits)?;
    Ok(Input::Record(Box::new(rec), kind))
}

fn read_edf(f: &UploadFile, limits: &Limits) -> Result<Input, ApiError> {
    let dir = write_files(std::slice::from_ref(f))?;
    let rec = ecg_io::edf::read_edf(&dir.path().join(&f.name), ReadOptions::default())
        .map_err(|e| ApiError::bad_record(strip_dir(&e.to_string(), dir.path())))?;
    check_record(&rec, &f.name, limits)?;
    Ok(Input::Record(Box::new(rec), Kind::Edf))
}

/// The uploaded files under a fresh private temporary directory (removed when dropped).
fn write_files(files: &[UploadFile]) -> Result<tempfile::TempDir, ApiError> {
    let dir = tempfile::Builder::new()
        .prefix("evl-serve-")
        .tempdir()
        .map_err(|e| ApiError::internal(format!("cannot create a temporary directory: {e}")))?;
    for f in files {
        // `create_new`: a name can only be written once, and never through an existing link.
        let path = dir.path().join(&f.name);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| ApiError::internal(format!("cannot store upload `{}`: {e}", f.name)))?;
        std::io::Write::write_all(&mut out, &f.bytes)
            .map_err(|e| ApiError::internal(format!("cannot store upload `{}`: {e}", f.name)))?;
    }
    Ok(dir)
}

/// An error message with the server's temporary directory taken out of its paths: the
/// client sees its own file names only.
fn strip_dir(message: &str, dir: &Path) -> String {
    let d = dir.display().to_string();
    message
        .replace(&format!("{d}/"), "")
        .replace(&d, "(upload)")
}

/// The limits a read record must be within (for formats whose size is only known once read).
fn check_record(r: &Record, name: &str, limits: &Limits) -> Result<(), ApiError> {
    if r.channels.len() > limits.max_leads {
        return Err(ApiError::over_limit(format!(
            "{name}: {} signals; the limit is {}",
            r.channels.len(),
            limits.max_leads
        )));
    }
    if r.fs > limits.max_fs {
        return Err(ApiError::over_limit(format!(
            "{name}: sampling frequency {} Hz; the limit is {} Hz",
            r.fs, limits.max_fs
        )));
    }
    if r.duration_s() > limits.max_duration_s {
        return Err(ApiError::over_limit(format!(
            "{name}: {:.1} s long; the limit is {} s",
            r.duration_s(),
            limits.max_duration_s
        )));
    }
    if r.n_samples == 0 || r.channels.is_empty() {
        return Err(ApiError::bad_record(format!(
            "{name}: the record holds no samples"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
        let b = "XyZboundary42";
        let mut out = Vec::new();
        for (name, file, data) in parts {
            out.extend_from_slice(format!("--{b}\r\n").as_bytes());
            match file {
                Some(f) => out.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{b}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={b}"), out)
    }

    #[test]
    fn fields_and_files_parse_and_bad_names_are_refused() {
        let l = Limits::default();
        let (ct, b) = body(&[
            ("file", Some("a.csv"), b"I\n1\n"),
            ("fs", None, b"250"),
            ("question", None, b"  what rhythm?  "),
            ("render", None, b"true"),
        ]);
        let up = parse_multipart(&ct, &b, &l).unwrap();
        assert_eq!(up.files[0].name, "a.csv");
        assert_eq!(up.fs, Some(250.0));
        assert_eq!(up.question.as_deref(), Some("what rhythm?"));
        assert!(up.render);

        for bad in ["../x.hea", "/etc/passwd", "a\\b.dat", "..", "C:x"] {
            let (ct, b) = body(&[("file", Some(bad), b"x")]);
            let e = parse_multipart(&ct, &b, &l).unwrap_err();
            assert_eq!(e.kind, "bad_upload", "{bad}: {e}");
            assert!(e.message.contains("not a plain file name"), "{bad}: {e}");
        }
        let (ct, b) = body(&[("file", Some("a.csv"), b"1"), ("fz", None, b"250")]);
        assert!(
            parse_multipart(&ct, &b, &l)
                .unwrap_err()
                .message
                .contains("unknown field `fz`")
        );
        let (ct, b) = body(&[("fs", None, b"250")]);
        assert!(
            parse_multipart(&ct, &b, &l)
                .unwrap_err()
                .message
                .contains("no file")
        );
        let (ct, b) = body(&[("file", Some("a.csv"), b"1"), ("fs", None, b"-3")]);
        assert!(
            parse_multipart(&ct, &b, &l)
                .unwrap_err()
                .message
                .contains("field `fs`")
        );
        let (ct, b) = body(&[("file", Some("a.csv"), b"1"), ("file", Some("a.csv"), b"2")]);
        assert!(
            parse_multipart(&ct, &b, &l)
                .unwrap_err()
                .message
                .contains("sent twice")
        );
        assert_eq!(
            parse_multipart("text/plain", b"x", &l).unwrap_err().kind,
            "bad_upload"
        );
        let e = parse_multipart(&ct, &b[..b.len() / 2], &l).unwrap_err();
        assert_eq!(e.kind, "bad_upload", "{e}");
    }

    fn files(list: &[(&str, &[u8])]) -> Upload {
        Upload {
            files: list
                .iter()
                .map(|(n, b)| UploadFile {
                    name: n.to_string(),
                    bytes: b.to_vec(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_header_naming_a_file_not_sent_is_refused_by_name() {
        let l = Limits::default();
        let up = files(&[(
            "r.hea",
            b"r 1 100 10\n../../../../etc/passwd 16 200 16 0 0 0 0 I\n",
        )]);
        let e = read_upload(&up, &l).unwrap_err();
        assert!(e.message.contains("signal file name"), "{e}");
        let up = files(&[("r.hea", b"r 1 100 10\nr.dat 16 200 16 0 0 0 0 I\n")]);
        let e = read_upload(&up, &l).unwrap_err();
        assert!(
            e.message.contains("`r.dat`, which is not in the upload"),
            "{e}"
        );
        let up = files(&[
            ("r.hea", b"r 1 100 10\nr.dat 16 200 16 0 0 0 0 I\n"),
            ("r.dat", &[0u8; 20]),
        ]);
        match read_upload(&up, &l).unwrap() {
            Input::Record(r, Kind::Wfdb) => assert_eq!(r.n_samples, 10),
            other => panic!("{other:?}"),
        }
        // A signal file of the wrong size: the error names the file, not the server's path.
        let up = files(&[
            ("r.hea", b"r 1 100 10\nr.dat 16 200 16 0 0 0 0 I\n"),
            ("r.dat", &[0u8; 7]),
        ]);
        let e = read_upload(&up, &l).unwrap_err();
        assert_eq!(e.kind, "bad_record");
        assert!(
            e.message.starts_with("r.dat") && !e.message.contains("evl-serve-"),
            "{e}"
        );
    }

    #[test]
    fn limits_are_checked_from_the_header_before_reading() {
        let l = Limits {
            max_duration_s: 60.0,
            max_leads: 2,
            ..Default::default()
        };
        // 10^9 samples claimed, no signal file sent: refused on the header's word alone.
        let up = files(&[
            ("r.hea", b"r 1 100 1000000000\nr.dat 16 200 16 0 0 0 0 I\n"),
            ("r.dat", &[0u8; 2]),
        ]);
        let e = read_upload(&up, &l).unwrap_err();
        assert_eq!(e.kind, "over_limit", "{e}");
        assert!(e.message.contains("the limit is 60 s"), "{e}");
        let up = files(&[("r.hea", b"r 3 100 10\nr.dat 16 200 16 0 0 0 0 I\nr.dat 16 200 16 0 0 0 0 II\nr.dat 16 200 16 0 0 0 0 III\n"), ("r.dat", &[0u8; 60])]);
        assert!(
            read_upload(&up, &l)
                .unwrap_err()
                .message
                .contains("3 signals")
        );
        let up = files(&[("x.csv", b"I\n1\n")]);
        assert!(read_upload(&up, &l).unwrap_err().message.contains("`fs`"));
        let up = files(&[("x.txt", b"hello")]);
        assert_eq!(read_upload(&up, &l).unwrap_err().status, 415);
        let up = files(&[("x.png", b"not a png")]);
        assert_eq!(read_upload(&up, &l).unwrap_err().kind, "bad_record");
    }
}
