//! The fuzz targets of evl-ecg as plain functions: each takes arbitrary bytes, feeds them to
//! one reader of outside data, and must return (an `Ok` or an error naming the problem)
//! without panicking, hanging or allocating without bound. `fuzz/` runs them under
//! cargo-fuzz (libFuzzer, coverage-guided); `tests/replay.rs` runs every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through them on stable Rust, so CI
//! replays the corpus and every crash ever found without a nightly toolchain.

use std::path::{Path, PathBuf};

use ecg_io::ReadOptions;

/// The targets, by the name of their corpus directory.
pub const TARGETS: [&str; 8] = [
    "wfdb_header",
    "wfdb_record",
    "cinc_mat",
    "edf",
    "annotations",
    "csv",
    "image",
    "request",
];

/// Run target `name` on `data`; true when the reader accepted the input (the corpus replay
/// checks that seeds reach past the first error). Unknown names panic (a caller bug).
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "wfdb_header" => wfdb_header(data),
        "wfdb_record" => wfdb_record(data),
        "cinc_mat" => cinc_mat(data),
        "edf" => edf(data),
        "annotations" => annotations(data),
        "csv" => csv(data),
        "image" => image(data),
        "request" => request(data),
        other => panic!("no fuzz target `{other}`"),
    }
}

/// A scratch directory for readers that read files, one per process (fuzzing runs one input
/// at a time per process), emptied before each input.
fn scratch() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("evl-fuzz-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a scratch directory: {e}"))
    })
    .path()
}

fn fresh(files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    for (name, bytes) in files {
        // A name the file system refuses (too long, say) is left unwritten: the reader then
        // meets a missing file, as it would on a user's disk.
        let _ = std::fs::write(dir.join(name), bytes);
    }
    dir.to_path_buf()
}

/// WFDB header text.
pub fn wfdb_header(data: &[u8]) -> bool {
    ecg_io::wfdb::Header::parse_bytes(data, Path::new("f.hea")).is_ok()
}

/// A whole WFDB record: the bytes before the first NUL are the header `f.hea`, the rest is
/// the signal file, stored under the name the header's first signal gives (when it is a
/// plain name), so every format, skew, offset and samples-per-frame path can be reached.
pub fn wfdb_record(data: &[u8]) -> bool {
    let (head, signal) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(h) = ecg_io::wfdb::Header::parse_bytes(head, Path::new("f.hea")) else {
        return false;
    };
    let sig_name = h
        .signals
        .first()
        .map(|s| s.file.clone())
        .filter(|n| n != "f.hea")
        .unwrap_or_else(|| "f.dat".into());
    let dir = fresh(&[("f.hea", head), (&sig_name, signal)]);
    ecg_io::read_record(&dir.join("f"), ReadOptions::default()).is_ok()
}

/// A CinC MATLAB v4 `.mat` under a fixed 12-lead header (500 Hz, 500 samples: the Challenge
/// records' layout, shortened).
pub fn cinc_mat(data: &[u8]) -> bool {
    let _ = ecg_io::wfdb::mat::MatHeader::parse(data, Path::new("A.mat"));
    let mut head = String::from("A 12 500 500\n");
    for lead in [
        "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
    ] {
        head.push_str(&format!("A.mat 16+24 1000/mV 16 0 0 0 0 {lead}\n"));
    }
    let dir = fresh(&[("A.hea", head.as_bytes()), ("A.mat", data)]);
    // The fixed header has no real checksums: not verified, so fuzzing reaches the samples.
    let opts = ReadOptions {
        verify_checksum: false,
        ..Default::default()
    };
    ecg_io::read_record(&dir.join("A"), opts).is_ok()
}

/// An EDF or EDF+ file.
pub fn edf(data: &[u8]) -> bool {
    let dir = fresh(&[("f.edf", data)]);
    ecg_io::edf::read_edf(&dir.join("f.edf"), ReadOptions::default()).is_ok()
}

/// A WFDB annotation file (MIT format).
pub fn annotations(data: &[u8]) -> bool {
    ecg_io::wfdb::annotation::parse_annotations(data, Path::new("f.atr")).is_ok()
}

/// A CSV record (the `data convert` layout) at 500 Hz.
pub fn csv(data: &[u8]) -> bool {
    ecg_io::csv::parse_csv(Path::new("f.csv"), "f", data, 500.0).is_ok()
}

/// An encoded image (PNG, JPEG) through the bounded decoder.
pub fn image(data: &[u8]) -> bool {
    ecg_render::decode_image("f.png", data).is_ok()
}

/// The boundary the `request` target's bodies use (its seeds are written with it).
pub const BOUNDARY: &str = "evlFuzzBoundary";

/// A `POST /v1/interpret` body: the multipart parser, then (when it parses) the upload
/// reader with the service's default limits, as a worker runs them.
pub fn request(data: &[u8]) -> bool {
    let limits = evl_serve::Limits::default();
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    match evl_serve::upload::parse_multipart(&ct, data, &limits) {
        Ok(up) => evl_serve::upload::read_upload(&up, &limits).is_ok(),
        Err(_) => false,
    }
}
