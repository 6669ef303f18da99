//! Labelled records from whatever a user points a command at: format detection in one place.
//!
//! A data spec is one of
//! - an index file (`*.jsonl`, written by `evl-ecg data import`), with splits;
//! - a directory written by `evl-ecg data synth` (it has `labels.csv`), with splits;
//! - any directory of WFDB records labelled in their headers (`# Labels:` or `#Dx:` with
//!   PTB-XL superclass names, as in PTB-XL's Challenge preparation); split deterministically
//!   by patient where the header names one (`# Patient ID:`), else by record
//!   ([`folder_split`]): 80% train, 10% validation, 10% test, as PTB-XL's ten folds.
//!
//! Each record comes with its superclass labels and its other findings.

use std::path::Path;

use ecg_io::Record;
use ecg_io::labels::ptbxl::{Split, header_labels};

use crate::{Dataset, Error, Result};

/// A record with its superclass labels and its other findings.
pub type Labelled = (Record, Vec<String>, Vec<String>);

/// Which records of a data spec to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Split to read (`None` = every entry): an index's or synthetic directory's own, or for
    /// a plain directory of records the deterministic [`folder_split`].
    pub split: Option<Split>,
    /// At most this many records, in the dataset's order.
    pub limit: Option<usize>,
    /// Check WFDB signal checksums.
    pub verify_checksum: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            split: None,
            limit: None,
            verify_checksum: true,
        }
    }
}

/// What kind of data spec `spec` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecKind {
    /// An index file.
    Index,
    /// An `evl-ecg data synth` directory.
    Synth,
    /// A directory of WFDB records labelled in their headers.
    Headers,
}

/// Tell what `spec` is, or say why it is none of the supported kinds.
///
/// # Errors
/// [`Error::Spec`] for a missing path, an image, or a single record given where a dataset is
/// expected, each with what to give instead.
pub fn spec_kind(spec: &Path) -> Result<SpecKind> {
    let bad = |what: String| Error::Spec {
        path: spec.to_path_buf(),
        what,
    };
    if spec.is_file() {
        let ext = spec
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        return match ext.as_deref() {
            Some("jsonl") => Ok(SpecKind::Index),
            Some("hea" | "dat" | "mat") => Err(bad(
                "is one record, not a dataset: give its directory (records labelled in their \
                 headers) or an index file (`evl-ecg data import`)"
                    .into(),
            )),
            Some("png" | "jpg" | "jpeg") => Err(bad(
                "is an image, not a dataset of labelled records: give a directory of records \
                 or an index file"
                    .into(),
            )),
            _ => Err(bad(
                "is not an index file (`*.jsonl`, written by `evl-ecg data import`)".into(),
            )),
        };
    }
    if spec.join("labels.csv").is_file() {
        return Ok(SpecKind::Synth);
    }
    if spec.is_dir() {
        return Ok(SpecKind::Headers);
    }
    Err(bad(
        "does not exist (expected an index file or a directory of records)".into(),
    ))
}

/// The split of a record in a plain directory of records: decided by its patient (`# Patient
/// ID:`, `# Patient:` or `# patient_id:` in the header) when the header names one, so no
/// patient is on both sides, else by the record's name (the versions of one ECG at two
/// sampling rates, PTB-XL's `NNNNN_lr` and `NNNNN_hr`, count as one record; so do records of
/// one name in different sub-folders). A stable hash (FNV-1a,
/// the same on every machine and release) of that key, modulo 10: 0-7 train, 8 validation,
/// 9 test. Adding or removing records never moves another record between splits.
pub fn folder_split(hea: &Path, header_text: &str) -> Split {
    let key = patient_of(header_text).unwrap_or_else(|| {
        // The record's name; PTB-XL's `_lr` / `_hr` versions of one ECG share it.
        let stem = hea
            .file_stem()
            .map_or(String::new(), |s| s.to_string_lossy().into_owned());
        let name = stem
            .strip_suffix("_lr")
            .or_else(|| stem.strip_suffix("_hr"))
            .unwrap_or(&stem);
        format!("record:{name}")
    });
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    match h % 10 {
        8 => Split::Val,
        9 => Split::Test,
        _ => Split::Train,
    }
}

/// The patient a header's comments name, as `patient:<id>`.
fn patient_of(header_text: &str) -> Option<String> {
    header_text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('#'))
        .find_map(|c| {
            let (k, v) = c.split_once(':')?;
            let k = k.trim().to_ascii_lowercase().replace(['_', ' '], "");
            let v = v.trim();
            (matches!(k.as_str(), "patientid" | "patient") && !v.is_empty())
                .then(|| format!("patient:{v}"))
        })
}

/// Records of a data spec with their labels (see the module docs for the kinds).
///
/// # Errors
/// [`Error::Spec`] when `spec` is no data spec, a
/// record's header carries no usable labels (named, with what to do), or nothing matches;
/// [`Error::Entry`] / [`Error::Io`] naming the record that cannot be read.
pub fn load_labelled(spec: &Path, opts: LoadOptions) -> Result<Vec<Labelled>> {
    let read = ecg_io::ReadOptions {
        verify_checksum: opts.verify_checksum,
        ..Default::default()
    };
    let kind = spec_kind(spec)?;
    let cap = opts.limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    match kind {
        SpecKind::Index | SpecKind::Synth => {
            let ds = if kind == SpecKind::Index {
                Dataset::read_index(spec)?
            } else {
                Dataset::from_synth_dir(spec)?
            };
            for e in ds
                .entries
                .iter()
                .filter(|e| opts.split.is_none_or(|s| e.split == s))
                .take(cap)
            {
                let path = ds.record_path(e).ok_or_else(|| Error::Spec {
                    path: spec.to_path_buf(),
                    what: format!("entry `{}` has no record (image-only items)", e.id),
                })?;
                let rec = ecg_io::read_record(&path, read).map_err(|source| Error::Entry {
                    id: e.id.clone(),
                    source: Box::new(source),
                })?;
                out.push((rec, e.labels.clone(), e.findings.clone()));
            }
        }
        SpecKind::Headers => {
            let mut taken = 0;
            for hea in crate::walk(spec, "hea") {
                if taken == cap {
                    break;
                }
                if let Some(want) = opts.split {
                    let text = std::fs::read_to_string(&hea).map_err(|source| Error::File {
                        path: hea.clone(),
                        source,
                    })?;
                    if folder_split(&hea, &text) != want {
                        continue;
                    }
                }
                taken += 1;
                let rec = ecg_io::read_record(&hea, read)?;
                let labels = header_labels(&rec.comments).ok_or_else(|| Error::Spec {
                    path: hea.clone(),
                    what: "has no `# Labels:` or `#Dx:` comment to take gold labels from".into(),
                })?;
                out.push((rec, labels.superclasses, labels.other));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Spec {
            path: spec.to_path_buf(),
            what: format!(
                "holds no records{}",
                opts.split
                    .map_or(String::new(), |s| format!(" in split `{}`", s.name()))
            ),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_that_are_no_dataset_say_what_they_are() {
        let dir = tempfile::tempdir().expect("temp dir");
        let png = dir.path().join("ecg.png");
        std::fs::write(&png, b"\x89PNG").expect("write");
        let e = spec_kind(&png).expect_err("image").to_string();
        assert!(e.contains("ecg.png") && e.contains("is an image"), "{e}");
        let hea = dir.path().join("r.hea");
        std::fs::write(&hea, "r 1 100 10\n").expect("write");
        let e = spec_kind(&hea).expect_err("record").to_string();
        assert!(e.contains("is one record"), "{e}");
        let e = spec_kind(&dir.path().join("missing")).expect_err("missing");
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert_eq!(spec_kind(dir.path()).expect("dir"), SpecKind::Headers);
        std::fs::write(dir.path().join("x.jsonl"), "").expect("write");
        assert_eq!(
            spec_kind(&dir.path().join("x.jsonl")).expect("index"),
            SpecKind::Index
        );
    }

    #[test]
    fn an_empty_directory_says_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = load_labelled(dir.path(), LoadOptions::default()).expect_err("empty");
        assert!(e.to_string().contains("holds no records"), "{e}");
    }
}
