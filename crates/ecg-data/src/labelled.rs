//! Labelled records from whatever a user points a command at: format detection in one place.
//!
//! A data spec is one of
//! - an index file (`*.jsonl`, written by `evl-ecg data import`), with splits;
//! - a directory written by `evl-ecg data synth` (it has `labels.csv`), with splits;
//! - any directory of WFDB records labelled in their headers (`# Labels:` or `#Dx:` with
//!   PTB-XL superclass names, as in PTB-XL's Challenge preparation); no splits.
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
    /// Split of an index or synthetic directory (`None` = every entry). A plain directory of
    /// records has no splits and is read whole whatever this says (TODO(#16): that lets
    /// `eval` choose thresholds on the records it reports; refuse or split it there).
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

/// Records of a data spec with their labels (see the module docs for the kinds).
///
/// # Errors
/// [`Error::Spec`] when `spec` is no data spec, a
/// record's header carries no usable labels (named, with what to do), or nothing matches;
/// [`Error::Entry`] / [`Error::Io`] naming the record that cannot be read.
pub fn load_labelled(spec: &Path, opts: LoadOptions) -> Result<Vec<Labelled>> {
    let read = ecg_io::ReadOptions {
        verify_checksum: opts.verify_checksum,
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
            for hea in crate::walk(spec, "hea").into_iter().take(cap) {
                let rec = ecg_io::read_record(&hea, read)?;
                let labels = header_labels(&rec.comments).ok_or_else(|| Error::Spec {
                    path: hea.clone(),
                    what: "has no `# Labels:` or `#Dx:` comment to take gold labels from".into(),
                })?;
                if labels.superclasses.is_empty()
                    && !labels.other.is_empty()
                    && labels
                        .other
                        .iter()
                        .all(|t| t.chars().all(|c| c.is_ascii_digit()))
                {
                    return Err(Error::Spec {
                        path: hea.clone(),
                        what: format!(
                            "`#Dx:` holds SNOMED-CT codes ({}), as PhysioNet/CinC headers do; \
                             these commands read PTB-XL superclass names (NORM, MI, STTC, CD, \
                             HYP): write them in a `# Labels:` comment, or list the records \
                             with their labels in an index file (`evl-ecg data import`)",
                            labels.other.join(", ")
                        ),
                    });
                }
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
