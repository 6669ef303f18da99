//! The run directory as a typed contract, shared by the crates that write it (training,
//! evaluation, the quickstart) and the ones that read it (`evl-report`, `evl-ecg report`).
//!
//! Every file has one type here, with serde derive ([`files`]), and one path ([`RunDir`]).
//! Documents are written through [`write_json`] / [`write_jsonl`], which add a
//! `schema_version` field to each document or line and write atomically (temporary file in the
//! same directory, then rename); [`read_json`] / [`read_jsonl`] check that version and parse
//! strictly (unknown or missing fields are errors), so a renamed field or a file from another
//! version fails with the file, line and field named instead of showing up as "n/a".
//!
//! Knows nothing of tensors, models or plotting: burn-free, below training and reporting.

pub mod files;
mod layout;

pub use files::*;
pub use layout::{RunDir, TrainRunDir};

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Version of every file's schema; bumped when a field changes meaning, is renamed or removed.
pub const SCHEMA_VERSION: u32 = 1;

/// The key that carries [`SCHEMA_VERSION`] in each document and each JSON Lines line.
pub const SCHEMA_KEY: &str = "schema_version";

/// Errors of reading and writing run files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// File access.
    #[error("cannot access {}", .path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file (or one line of a JSON Lines file) that does not parse as its type.
    #[error("{}{}: not a valid {kind}: {what}", .path.display(), line_suffix(*.line))]
    Parse {
        /// Path.
        path: PathBuf,
        /// Line (1-based) of a JSON Lines file; 0 for a whole document.
        line: usize,
        /// The file's kind (`step log`, `predictions`, ...).
        kind: &'static str,
        /// What serde said (names the field).
        what: String,
    },
    /// A file written by another schema version (or by a version before schemas existed).
    #[error(
        "{}{}: {kind} has schema version {found}, this build reads version {SCHEMA_VERSION}; \
         re-run the command that wrote it with this build",
        .path.display(), line_suffix(*.line),
        found = .found.map_or("none".to_string(), |v| v.to_string())
    )]
    Schema {
        /// Path.
        path: PathBuf,
        /// Line (1-based) of a JSON Lines file; 0 for a whole document.
        line: usize,
        /// The file's kind.
        kind: &'static str,
        /// Version found (`None`: the field is missing).
        found: Option<u64>,
    },
}

fn line_suffix(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A type that is one file (or one line of a JSON Lines file) of a run directory.
pub trait RunFile: Serialize + DeserializeOwned {
    /// What the file is, for error messages (`step log`, `predictions`, `results`, ...).
    const KIND: &'static str;
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `value` as a JSON object with the schema version added.
fn versioned<T: RunFile>(value: &T) -> serde_json::Value {
    let v = serde_json::to_value(value).expect("run files serialise to JSON");
    let serde_json::Value::Object(fields) = v else {
        panic!(
            "run file type `{}` does not serialise to an object",
            T::KIND
        );
    };
    let mut out = fields;
    out.insert(SCHEMA_KEY.into(), SCHEMA_VERSION.into());
    serde_json::Value::Object(out)
}

/// Parse one document or line: check and drop the version, then the strict typed parse.
fn parse<T: RunFile>(text: &str, path: &Path, line: usize) -> Result<T> {
    let parse_err = |what: String| Error::Parse {
        path: path.to_path_buf(),
        line,
        kind: T::KIND,
        what,
    };
    let mut v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| parse_err(e.to_string()))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(parse_err("expected a JSON object".into()));
    };
    let found = obj.remove(SCHEMA_KEY).map(|x| x.as_u64());
    if found != Some(Some(u64::from(SCHEMA_VERSION))) {
        return Err(Error::Schema {
            path: path.to_path_buf(),
            line,
            kind: T::KIND,
            found: found.flatten(),
        });
    }
    serde_json::from_value(v).map_err(|e| parse_err(e.to_string()))
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, flushed to
/// disk, then renamed over `path` (parent directories are created). A reader never sees a
/// half-written file, and a run killed mid-write keeps the previous version.
///
/// # Errors
/// [`Error::Io`] naming the directory or file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d,
        None => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    tmp.write_all(bytes).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// Write one document (pretty-printed, with its schema version), atomically.
///
/// # Errors
/// [`Error::Io`].
pub fn write_json<T: RunFile>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(&versioned(value)).expect("plain data") + "\n";
    atomic_write(path, text.as_bytes())
}

/// Write JSON Lines (one line per item, each with its schema version), atomically.
///
/// # Errors
/// [`Error::Io`].
pub fn write_jsonl<T: RunFile>(path: &Path, items: &[T]) -> Result<()> {
    let text: String = items
        .iter()
        .map(|l| serde_json::to_string(&versioned(l)).expect("plain data") + "\n")
        .collect();
    atomic_write(path, text.as_bytes())
}

/// Read one document written by [`write_json`].
///
/// # Errors
/// [`Error::Io`] when it cannot be read, [`Error::Schema`] for another schema version,
/// [`Error::Parse`] naming the field when it does not match its type.
pub fn read_json<T: RunFile>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse(&text, path, 0)
}

/// Read JSON Lines written by [`write_jsonl`] (blank lines skipped).
///
/// # Errors
/// As [`read_json`], with the 1-based line number of the first bad line.
pub fn read_jsonl<T: RunFile>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse(l, path, i + 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: usize) -> StepLog {
        StepLog {
            step,
            lr: 1e-3,
            total: 1.5,
            ce: 1.0,
            terms: vec![("ot".into(), 0.5)],
            ms: 3.0,
        }
    }

    #[test]
    fn jsonl_round_trips_with_a_version_on_every_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a/metrics.jsonl");
        let logs = vec![step(1), step(2)];
        write_jsonl(&path, &logs).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            assert_eq!(v[SCHEMA_KEY], 1, "{l}");
        }
        let back: Vec<StepLog> = read_jsonl(&path).expect("read back");
        assert_eq!(back, logs);
    }

    #[test]
    fn a_renamed_field_is_an_error_naming_it_and_the_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("metrics.jsonl");
        write_jsonl(&path, &[step(1), step(2)]).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        let mut lines: Vec<&str> = text.lines().collect();
        let renamed = lines[1].replace("\"total\"", "\"loss\"");
        lines[1] = &renamed;
        std::fs::write(&path, lines.join("\n")).expect("write");
        let e = read_jsonl::<StepLog>(&path).expect_err("renamed field");
        let msg = e.to_string();
        assert!(msg.contains("metrics.jsonl:2"), "{msg}");
        assert!(msg.contains("loss") || msg.contains("total"), "{msg}");
    }

    #[test]
    fn nan_losses_and_timings_read_back_as_nan() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("metrics.jsonl");
        let mut log = step(1);
        log.total = f64::NAN;
        log.terms = vec![("ot".into(), f64::NAN), ("rel".into(), 0.25)];
        write_jsonl(&path, &[log]).expect("write");
        let back: Vec<StepLog> = read_jsonl(&path).expect("NaN reads back");
        assert!(back[0].total.is_nan());
        assert!(back[0].terms[0].1.is_nan());
        assert_eq!(back[0].terms[1], ("rel".to_string(), 0.25));
        assert_eq!(back[0].ce, 1.0);
    }

    #[test]
    fn another_or_missing_version_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.json");
        write_json(
            &path,
            &CheckpointState {
                step: 3,
                logs: vec![step(1)],
            },
        )
        .expect("write");
        let back: CheckpointState = read_json(&path).expect("read");
        assert_eq!(back.step, 3);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(
            &path,
            text.replace("\"schema_version\": 1", "\"schema_version\": 2"),
        )
        .expect("write");
        let e = read_json::<CheckpointState>(&path).expect_err("version 2");
        assert!(matches!(e, Error::Schema { found: Some(2), .. }), "{e}");
        std::fs::write(&path, r#"{"step": 3, "logs": []}"#).expect("write");
        let e = read_json::<CheckpointState>(&path).expect_err("no version");
        assert!(matches!(e, Error::Schema { found: None, .. }), "{e}");
        assert!(e.to_string().contains("schema version none"), "{e}");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.json");
        atomic_write(&path, b"one").expect("write");
        atomic_write(&path, b"two").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
