//! Datasets: one abstraction over synthetic records, PTB-XL, PhysioNet/CinC directories and
//! conversation files. A [`Dataset`] is an index of [`Entry`]s (record path, split, labels
//! over a named [`LabelSpace`], optional conversation), stored as JSON Lines so it can be
//! written once by `evl-ecg data import` and read by every later command. Loading applies a
//! [`Preprocess`] (resample, filter, crop/pad, standardise, lead order) in parallel, and a
//! [`SignalCache`] keeps the result in a safetensors file so an epoch does not re-parse text
//! headers.

pub mod cache;
pub mod labelled;

use std::path::{Path, PathBuf};

pub use cache::SignalCache;

/// The project's shared records (`../shared/data` beside a checkout): the directory named by
/// `EVL_SHARED_DATA` when set, else `../shared/data` from the working directory (commands are
/// run from the repository root). `None` when that is not a directory. Looked up at run time:
/// a binary carries no path of the machine it was built on.
pub fn shared_data() -> Option<PathBuf> {
    let d = std::env::var_os("EVL_SHARED_DATA")
        .map_or_else(|| PathBuf::from("../shared/data"), PathBuf::from);
    d.is_dir().then_some(d)
}
use ecg_io::labels::ptbxl::{PtbxlTree, Split, header_labels};
use ecg_io::labels::{LabelSpace, snomed};
use ecg_io::{Lead, ReadOptions};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

/// Errors of dataset handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A record or table could not be read.
    #[error("dataset entry `{id}`")]
    Entry {
        /// Entry id.
        id: String,
        /// Cause (boxed: reader errors carry paths and messages).
        #[source]
        source: Box<ecg_io::Error>,
    },
    /// A reader error outside any entry (tables).
    #[error(transparent)]
    Io(Box<ecg_io::Error>),
    /// The index file is malformed.
    #[error("{}:{line}: {what}", .path.display())]
    Index {
        /// Index file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Problem.
        what: String,
    },
    /// File system error.
    #[error("cannot access {}", .path.display())]
    File {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The record cannot be preprocessed as asked.
    #[error("dataset entry `{id}`: {what}")]
    Preprocess {
        /// Entry id.
        id: String,
        /// Problem.
        what: String,
    },
    /// A data spec that is no dataset, or whose records cannot be labelled.
    #[error("{}: {what}", .path.display())]
    Spec {
        /// The path given (or the record's header).
        path: PathBuf,
        /// What is wrong and what to give instead.
        what: String,
    },
    /// Cache file problems.
    #[error("cache {}: {what}", .path.display())]
    Cache {
        /// Cache file.
        path: PathBuf,
        /// Problem.
        what: String,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<ecg_io::Error> for Error {
    fn from(e: ecg_io::Error) -> Self {
        Error::Io(Box::new(e))
    }
}

/// One example of a dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Unique id.
    pub id: String,
    /// Record path (relative paths are relative to the index file's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<PathBuf>,
    /// Image path, for conversation items that come with rendered images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// Split.
    pub split: Split,
    /// Labels in the dataset's label space.
    pub labels: Vec<String>,
    /// Further findings (rhythm, specific statements), not scored by the label space.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
    /// Where the entry came from (`synthetic`, `ptbxl`, `cinc`, `conversation`).
    pub source: String,
    /// Conversation turns, for instruction data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Vec<ecg_io::conversation::Turn>>,
}

/// A dataset: entries over a label space, rooted at a directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Directory relative record paths are resolved against.
    pub root: PathBuf,
    /// Label space of `Entry::labels`.
    pub space: LabelSpace,
    /// Entries.
    pub entries: Vec<Entry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct IndexHeader {
    evl_ecg_dataset: u32,
    space: LabelSpace,
    n: usize,
}

/// Signal preprocessing applied when loading.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    /// Target rate, Hz.
    pub fs: u32,
    /// Samples per lead after crop/pad.
    pub len: usize,
    /// Lead order (absent leads are zeros and flagged in [`Example::lead_mask`]).
    pub leads: Vec<String>,
    /// Zero-phase band-pass (low, high) in Hz.
    pub bandpass: Option<(f64, f64)>,
    /// Powerline notch frequency.
    pub notch: Option<f64>,
    /// Per-lead zero mean, unit variance.
    pub standardize: bool,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            fs: 100,
            len: 1000,
            leads: Lead::STANDARD_12
                .iter()
                .map(|l| l.name().to_string())
                .collect(),
            bandpass: Some((0.5, 40.0)),
            notch: None,
            standardize: false,
        }
    }
}

impl Preprocess {
    /// A short stable text key of the settings (for cache file names).
    pub fn key(&self) -> String {
        let text = serde_json::to_string(self).expect("plain data serialises");
        // FNV-1a: stable across runs and platforms, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// A loaded, preprocessed example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Entry index in the dataset.
    pub index: usize,
    /// Signal `[leads][len]`, flattened lead-major, mV (or standardised units).
    pub signal: Vec<f32>,
    /// Which leads were present in the record.
    pub lead_mask: Vec<bool>,
    /// Multi-hot labels over the dataset's space.
    pub labels: Vec<f32>,
}

impl Dataset {
    /// Resolve an entry's record path.
    pub fn record_path(&self, e: &Entry) -> Option<PathBuf> {
        e.record.as_ref().map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                self.root.join(p)
            }
        })
    }

    /// Indices of the entries of a split.
    pub fn split_indices(&self, split: Split) -> Vec<usize> {
        (0..self.entries.len())
            .filter(|&i| self.entries[i].split == split)
            .collect()
    }

    /// Multi-hot label vector of entry `i`.
    pub fn label_vector(&self, i: usize) -> Vec<f32> {
        let (v, _) = self
            .space
            .encode(self.entries[i].labels.iter().map(String::as_str));
        v.into_iter().map(f32::from).collect()
    }

    /// A deterministic permutation of `indices` for `(seed, epoch)`.
    pub fn shuffled(&self, indices: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
        let mut v = indices.to_vec();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003) ^ epoch);
        v.shuffle(&mut rng);
        v
    }

    /// Write the index as JSON Lines: a header line (format version, label space, count),
    /// then one entry per line. Written atomically.
    pub fn write_index(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string(&IndexHeader {
            evl_ecg_dataset: 1,
            space: self.space.clone(),
            n: self.entries.len(),
        })
        .expect("plain data");
        text.push('\n');
        for e in &self.entries {
            text.push_str(&serde_json::to_string(e).expect("plain data"));
            text.push('\n');
        }
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|source| Error::File {
                path: d.to_path_buf(),
                source,
            })?;
        }
        ecg_io::wfdb::atomic_write(path, text.as_bytes())?;
        Ok(())
    }

    /// Read an index written by [`Dataset::write_index`].
    pub fn read_index(path: &Path) -> Result<Dataset> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |line: usize, what: String| Error::Index {
            path: path.to_path_buf(),
            line,
            what,
        };
        let mut lines = text.lines().enumerate();
        let (_, first) = lines.next().ok_or_else(|| bad(1, "empty index".into()))?;
        let header: IndexHeader = serde_json::from_str(first)
            .map_err(|e| bad(1, format!("not an evl-ecg dataset header: {e}")))?;
        if header.evl_ecg_dataset != 1 {
            return Err(bad(
                1,
                format!(
                    "format version {} (this build reads 1)",
                    header.evl_ecg_dataset
                ),
            ));
        }
        let mut entries = Vec::with_capacity(header.n);
        for (i, l) in lines {
            if l.trim().is_empty() {
                continue;
            }
            entries.push(serde_json::from_str(l).map_err(|e| bad(i + 1, e.to_string()))?);
        }
        if entries.len() != header.n {
            return Err(bad(
                text.lines().count(),
                format!(
                    "header says {} entries, file has {} (truncated?)",
                    header.n,
                    entries.len()
                ),
            ));
        }
        Ok(Dataset {
            root: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            space: header.space,
            entries,
        })
    }

    /// A directory written by `evl-ecg data synth` (labels.csv + records).
    pub fn from_synth_dir(dir: &Path) -> Result<Dataset> {
        let path = dir.join("labels.csv");
        let mut rdr = csv::Reader::from_path(&path).map_err(|source| {
            Error::from(ecg_io::Error::Csv {
                path: path.clone(),
                source,
            })
        })?;
        let mut entries = Vec::new();
        for (i, row) in rdr.records().enumerate() {
            let row = row.map_err(|source| {
                Error::from(ecg_io::Error::Csv {
                    path: path.clone(),
                    source,
                })
            })?;
            let get = |k: usize| row.get(k).unwrap_or("").to_string();
            let split = match row.get(1).unwrap_or("") {
                "train" => Split::Train,
                "val" => Split::Val,
                "test" => Split::Test,
                other => {
                    return Err(Error::Index {
                        path: path.clone(),
                        line: i + 2,
                        what: format!("split `{other}` is not train/val/test"),
                    });
                }
            };
            let list = |s: String| -> Vec<String> {
                s.split('|')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            entries.push(Entry {
                id: get(0),
                record: Some(PathBuf::from(get(0))),
                image: None,
                split,
                labels: list(get(2)),
                findings: list(get(3)),
                source: "synthetic".into(),
                conversation: None,
            });
        }
        Ok(Dataset {
            root: dir.to_path_buf(),
            space: LabelSpace::ptbxl_super(),
            entries,
        })
    }

    /// A PTB-XL tree: labels by the standard superclass recipe from `scp_codes`, splits from
    /// `strat_fold`. With `headers_too`, records present on disk but absent from the database
    /// are added with labels from their header comments (split: train).
    pub fn from_ptbxl(tree: &PtbxlTree, rate: u32, headers_too: bool) -> Result<Dataset> {
        let mut entries = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for row in &tree.rows {
            let rel = if rate == 100 {
                &row.filename_lr
            } else {
                &row.filename_hr
            };
            if !tree.root.join(format!("{rel}.hea")).exists() {
                continue;
            }
            seen.insert(rel.clone());
            entries.push(Entry {
                id: format!("ptbxl-{}", row.ecg_id),
                record: Some(PathBuf::from(rel)),
                image: None,
                split: Split::from_fold(row.strat_fold),
                labels: tree.statements.superclasses(&row.scp_codes),
                findings: row.scp_codes.iter().map(|(c, _)| c.clone()).collect(),
                source: "ptbxl".into(),
                conversation: None,
            });
        }
        if headers_too {
            let sub = if rate == 100 {
                "records100"
            } else {
                "records500"
            };
            for hea in walk(&tree.root.join(sub), "hea") {
                let rel = hea
                    .strip_prefix(&tree.root)
                    .expect("walked under root")
                    .with_extension("");
                let key = rel.to_string_lossy().to_string();
                if seen.contains(&key) {
                    continue;
                }
                let h = ecg_io::wfdb::Header::read(&hea)?;
                let labels = header_labels(&h.comments).unwrap_or_default();
                entries.push(Entry {
                    id: format!("ptbxl-{}", h.record),
                    record: Some(rel),
                    image: None,
                    split: Split::Train,
                    labels: labels.superclasses,
                    findings: labels.other,
                    source: "ptbxl-header".into(),
                    conversation: None,
                });
            }
        }
        Ok(Dataset {
            root: tree.root.clone(),
            space: LabelSpace::ptbxl_super(),
            entries,
        })
    }

    /// A directory of PhysioNet/CinC records (searched recursively), labelled in the CPSC-2018
    /// space from `#Dx:` SNOMED-CT codes; all codes' abbreviations go to `findings`.
    pub fn from_cinc_dir(dir: &Path, dx: &snomed::DxMap) -> Result<Dataset> {
        let mut entries = Vec::new();
        for hea in walk(dir, "hea") {
            let h = ecg_io::wfdb::Header::read(&hea)?;
            let codes = match ecg_io::record::comment_value(&h.comments, "Dx") {
                Some(v) => snomed::parse_dx(v).map_err(|tok| {
                    Error::from(ecg_io::Error::Header {
                        path: hea.clone(),
                        line: 0,
                        field: "Dx",
                        expected: "comma-separated SNOMED-CT codes".into(),
                        found: tok,
                    })
                })?,
                None => Vec::new(),
            };
            let mut labels: Vec<String> = codes
                .iter()
                .filter_map(|c| snomed::cpsc2018_class(*c))
                .map(str::to_string)
                .collect();
            labels.dedup();
            let findings = codes
                .iter()
                .map(|c| dx.get(*c).map_or(c.to_string(), |d| d.abbreviation.clone()))
                .collect();
            let rel = hea
                .strip_prefix(dir)
                .expect("walked under dir")
                .with_extension("");
            entries.push(Entry {
                id: format!("cinc-{}", rel.to_string_lossy().replace('/', "-")),
                record: Some(rel),
                image: None,
                split: Split::Test,
                labels,
                findings,
                source: "cinc".into(),
                conversation: None,
            });
        }
        Ok(Dataset {
            root: dir.to_path_buf(),
            space: LabelSpace::cpsc2018(),
            entries,
        })
    }

    /// ECGInstruct/ECG-Bench conversations (JSON or JSONL); images resolved against
    /// `image_root`. Labels are empty (the conversation carries the supervision).
    pub fn from_conversations(path: &Path, image_root: &Path) -> Result<Dataset> {
        let items = ecg_io::conversation::read_conversations(path)?;
        let entries = items
            .into_iter()
            .map(|it| Entry {
                id: it.id,
                record: None,
                image: it.image.map(PathBuf::from),
                split: Split::Test,
                labels: Vec::new(),
                findings: Vec::new(),
                source: "conversation".into(),
                conversation: Some(it.conversations),
            })
            .collect();
        Ok(Dataset {
            root: image_root.to_path_buf(),
            space: LabelSpace::new("none", &[]),
            entries,
        })
    }

    /// Load and preprocess entry `i`.
    pub fn load(&self, i: usize, p: &Preprocess) -> Result<Example> {
        let e = &self.entries[i];
        let path = self.record_path(e).ok_or_else(|| Error::Preprocess {
            id: e.id.clone(),
            what: "entry has no record (conversation-only item)".into(),
        })?;
        let rec =
            ecg_io::read_record(&path, ReadOptions::default()).map_err(|source| Error::Entry {
                id: e.id.clone(),
                source: Box::new(source),
            })?;
        let leads: Vec<Lead> = p.leads.iter().map(|l| Lead::parse(l)).collect();
        let (sig, mask) = ecg_signal::select_leads(&rec, &leads);
        let fs_in = rec.fs.round() as u32;
        if (rec.fs - fs_in as f64).abs() > 1e-9 {
            return Err(Error::Preprocess {
                id: e.id.clone(),
                what: format!("sampling rate {} Hz is not an integer", rec.fs),
            });
        }
        let mut signal = Vec::with_capacity(leads.len() * p.len);
        for (lead, present) in sig.iter().zip(&mask) {
            if !present {
                signal.extend(std::iter::repeat_n(0.0, p.len));
                continue;
            }
            let mut x: Vec<f32> = lead
                .iter()
                .map(|v| if v.is_finite() { *v } else { 0.0 })
                .collect();
            if let Some((lo, hi)) = p.bandpass {
                x = ecg_signal::filtfilt(
                    &ecg_signal::bandpass(rec.fs, lo, hi.min(0.45 * rec.fs), 2),
                    &x,
                );
            }
            if let Some(f) = p.notch.filter(|f| *f < rec.fs / 2.0) {
                x = ecg_signal::filtfilt(&ecg_signal::notch(rec.fs, f, 30.0), &x);
            }
            let mut x = ecg_signal::resample(&x, fs_in, p.fs);
            if p.standardize {
                ecg_signal::standardize(&mut x);
            }
            signal.extend(ecg_signal::crop_or_pad(&x, p.len));
        }
        Ok(Example {
            index: i,
            signal,
            lead_mask: mask,
            labels: self.label_vector(i),
        })
    }

    /// Load many entries in parallel, in the given order; the first error wins (the caller
    /// can instead call [`Dataset::load`] per entry to collect every failure).
    pub fn load_many(&self, indices: &[usize], p: &Preprocess) -> Result<Vec<Example>> {
        indices.par_iter().map(|&i| self.load(i, p)).collect()
    }
}

/// Files with extension `ext` under `dir`, sorted.
pub fn walk(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
