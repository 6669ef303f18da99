//! PTB-XL metadata: `ptbxl_database.csv`, `scp_statements.csv`, the diagnostic superclasses and
//! the recommended stratified folds; plus the label comments of PTB-XL headers as prepared for
//! the PhysioNet Challenge 2024 (`#Dx: NORM`, `# Labels: Old MI, STTC`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One SCP-ECG statement of `scp_statements.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// Description.
    pub description: String,
    /// Whether it is a diagnostic statement.
    pub diagnostic: bool,
    /// Whether it is a form statement.
    pub form: bool,
    /// Whether it is a rhythm statement.
    pub rhythm: bool,
    /// Diagnostic superclass (NORM, MI, STTC, CD, HYP) for diagnostic statements.
    pub diagnostic_class: Option<String>,
    /// Diagnostic subclass.
    pub diagnostic_subclass: Option<String>,
}

/// `scp_statements.csv`: statement code -> statement.
#[derive(Debug, Clone, Default)]
pub struct ScpStatements {
    /// By code.
    pub by_code: BTreeMap<String, Statement>,
}

fn csv_err(path: &Path) -> impl Fn(csv::Error) -> Error + '_ {
    move |source| Error::Csv {
        path: path.to_path_buf(),
        source,
    }
}

fn columns(path: &Path, headers: &csv::StringRecord, names: &[&str]) -> Result<Vec<usize>> {
    names
        .iter()
        .map(|n| {
            headers
                .iter()
                .position(|h| h == *n)
                .ok_or_else(|| Error::Table {
                    path: path.to_path_buf(),
                    row: 0,
                    field: n.to_string(),
                    what: "column missing".into(),
                })
        })
        .collect()
}

impl ScpStatements {
    /// Read `scp_statements.csv` (first column is the code, unnamed).
    pub fn read(path: &Path) -> Result<ScpStatements> {
        let mut rdr = csv::Reader::from_path(path).map_err(csv_err(path))?;
        let headers = rdr.headers().map_err(csv_err(path))?.clone();
        let c = columns(
            path,
            &headers,
            &[
                "description",
                "diagnostic",
                "form",
                "rhythm",
                "diagnostic_class",
                "diagnostic_subclass",
            ],
        )?;
        let flag = |s: &str| s.trim() == "1.0" || s.trim() == "1";
        let opt = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        let mut by_code = BTreeMap::new();
        for row in rdr.records() {
            let row = row.map_err(csv_err(path))?;
            let g = |i: usize| row.get(c[i]).unwrap_or("");
            by_code.insert(
                row.get(0).unwrap_or("").to_string(),
                Statement {
                    description: g(0).to_string(),
                    diagnostic: flag(g(1)),
                    form: flag(g(2)),
                    rhythm: flag(g(3)),
                    diagnostic_class: opt(g(4)),
                    diagnostic_subclass: opt(g(5)),
                },
            );
        }
        Ok(ScpStatements { by_code })
    }

    /// Diagnostic superclasses of a record's statements: every diagnostic statement maps to
    /// its class whatever its likelihood (the standard PTB-XL recipe). Sorted, unique.
    pub fn superclasses(&self, scp_codes: &[(String, f64)]) -> Vec<String> {
        let set: BTreeSet<String> = scp_codes
            .iter()
            .filter_map(|(code, _)| self.by_code.get(code))
            .filter(|s| s.diagnostic)
            .filter_map(|s| s.diagnostic_class.clone())
            .collect();
        set.into_iter().collect()
    }
}

/// Data split of PTB-XL's recommended folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Folds 1-8.
    Train,
    /// Fold 9.
    Val,
    /// Fold 10.
    Test,
}

impl Split {
    /// Split of a `strat_fold` value.
    pub fn from_fold(fold: u8) -> Split {
        match fold {
            9 => Split::Val,
            10 => Split::Test,
            _ => Split::Train,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// One row of `ptbxl_database.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct PtbxlRow {
    /// ecg_id.
    pub ecg_id: u32,
    /// Age in years, if given.
    pub age: Option<f64>,
    /// 0 = male, 1 = female (PTB-XL's coding).
    pub sex: Option<u8>,
    /// SCP statements with likelihoods.
    pub scp_codes: Vec<(String, f64)>,
    /// Stratified fold 1-10.
    pub strat_fold: u8,
    /// Record path of the 100 Hz version, relative to the PTB-XL root.
    pub filename_lr: String,
    /// Record path of the 500 Hz version.
    pub filename_hr: String,
}

/// Read `ptbxl_database.csv`.
pub fn read_database(path: &Path) -> Result<Vec<PtbxlRow>> {
    let mut rdr = csv::Reader::from_path(path).map_err(csv_err(path))?;
    let headers = rdr.headers().map_err(csv_err(path))?.clone();
    let c = columns(
        path,
        &headers,
        &[
            "ecg_id",
            "age",
            "sex",
            "scp_codes",
            "strat_fold",
            "filename_lr",
            "filename_hr",
        ],
    )?;
    let mut out = Vec::new();
    for (i, row) in rdr.records().enumerate() {
        let row = row.map_err(csv_err(path))?;
        let g = |k: usize| row.get(c[k]).unwrap_or("").trim();
        let bad = |field: &str, what: String| Error::Table {
            path: path.to_path_buf(),
            row: i + 1,
            field: field.to_string(),
            what,
        };
        let num = |k: usize, field: &str| -> Result<Option<f64>> {
            let t = g(k);
            if t.is_empty() {
                return Ok(None);
            }
            t.parse::<f64>()
                .map(Some)
                .map_err(|_| bad(field, format!("`{t}` is not a number")))
        };
        let ecg_id = num(0, "ecg_id")?.ok_or_else(|| bad("ecg_id", "empty".into()))?;
        let fold = num(4, "strat_fold")?.ok_or_else(|| bad("strat_fold", "empty".into()))?;
        if !(1.0..=10.0).contains(&fold) || fold.fract() != 0.0 {
            return Err(bad("strat_fold", format!("{fold} is not a fold 1-10")));
        }
        let scp_codes = parse_scp_codes(g(3)).map_err(|w| bad("scp_codes", w))?;
        out.push(PtbxlRow {
            ecg_id: ecg_id as u32,
            age: num(1, "age")?,
            sex: num(2, "sex")?.map(|s| s as u8),
            scp_codes,
            strat_fold: fold as u8,
            filename_lr: g(5).to_string(),
            filename_hr: g(6).to_string(),
        });
    }
    Ok(out)
}

/// Parse the Python-dict text of `scp_codes` (`{'NORM': 100.0, 'SR': 0.0}`).
pub fn parse_scp_codes(text: &str) -> std::result::Result<Vec<(String, f64)>, String> {
    let t = text.trim();
    let inner = t
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or_else(|| format!("`{t}` is not a {{'CODE': likelihood}} dict"))?;
    let mut out = Vec::new();
    for item in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once(':')
            .ok_or_else(|| format!("`{item}` is not `'CODE': likelihood`"))?;
        let k = k.trim();
        let key = k
            .strip_prefix('\'')
            .and_then(|s| s.strip_suffix('\''))
            .or_else(|| k.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
            .ok_or_else(|| format!("key `{k}` is not quoted"))?;
        let val: f64 = v
            .trim()
            .parse()
            .map_err(|_| format!("likelihood `{}` of {key} is not a number", v.trim()))?;
        out.push((key.to_string(), val));
    }
    Ok(out)
}

/// Labels read from a Challenge-2024 PTB-XL header comment: superclasses plus the extra
/// rhythm/ectopy labels of the final variant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderLabels {
    /// Superclasses among NORM, MI, STTC, CD, HYP (Acute MI / Old MI -> MI).
    pub superclasses: Vec<String>,
    /// Other labels (PAC, PVC, AFIB/AFL, TACHY, BRADY) and the MI split, verbatim.
    pub other: Vec<String>,
}

/// Parse `# Labels:` or `#Dx:` of a header: PTB-XL superclass names (Challenge-2024
/// preparation), or PhysioNet/CinC SNOMED-CT codes, read as superclasses through
/// [`super::snomed::ptbxl_superclasses`] with the codes kept in `other`. `None` when neither
/// comment is present.
pub fn header_labels(comments: &[String]) -> Option<HeaderLabels> {
    let value = crate::record::comment_value(comments, "Labels")
        .or_else(|| crate::record::comment_value(comments, "Dx"))?;
    if let Ok(codes) = super::snomed::parse_dx(value)
        && !codes.is_empty()
    {
        return Some(HeaderLabels {
            superclasses: super::snomed::ptbxl_superclasses(&codes)
                .into_iter()
                .map(str::to_string)
                .collect(),
            other: codes.iter().map(u64::to_string).collect(),
        });
    }
    let mut out = HeaderLabels::default();
    for t in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let sup = match t {
            "NORM" | "STTC" | "CD" | "HYP" | "MI" => Some(t),
            "Acute MI" | "Old MI" => Some("MI"),
            _ => None,
        };
        if let Some(s) = sup
            && !out.superclasses.iter().any(|x| x == s)
        {
            out.superclasses.push(s.to_string());
        }
        if sup != Some(t) {
            out.other.push(t.to_string());
        }
    }
    Some(out)
}

/// A PTB-XL tree on disk (`ptbxl_database.csv`, `scp_statements.csv`, `records100/`,
/// `records500/`).
#[derive(Debug, Clone)]
pub struct PtbxlTree {
    /// Root directory.
    pub root: PathBuf,
    /// Database rows.
    pub rows: Vec<PtbxlRow>,
    /// Statements.
    pub statements: ScpStatements,
}

impl PtbxlTree {
    /// Open a tree. `database` overrides the database file name (the shared excerpt is
    /// `ptbxl_database_excerpt.csv`).
    pub fn open(root: &Path, database: Option<&str>) -> Result<PtbxlTree> {
        let db = root.join(database.unwrap_or("ptbxl_database.csv"));
        Ok(PtbxlTree {
            root: root.to_path_buf(),
            rows: read_database(&db)?,
            statements: ScpStatements::read(&root.join("scp_statements.csv"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scp_dict() {
        let v = parse_scp_codes("{'NORM': 100.0, 'LVOLT': 0.0, 'SR': 0.0}").unwrap();
        assert_eq!(v[0], ("NORM".into(), 100.0));
        assert_eq!(v.len(), 3);
        assert_eq!(parse_scp_codes("{}").unwrap(), vec![]);
        assert!(parse_scp_codes("NORM").is_err());
        assert!(parse_scp_codes("{'NORM': x}").is_err());
    }

    #[test]
    fn header_label_variants() {
        let l = header_labels(&["Labels: Old MI, STTC, CD, PVC".to_string()]).unwrap();
        assert_eq!(l.superclasses, vec!["MI", "STTC", "CD"]);
        assert_eq!(l.other, vec!["Old MI", "PVC"]);
        let l = header_labels(&["Dx: NORM".to_string()]).unwrap();
        assert_eq!(l.superclasses, vec!["NORM"]);
        assert!(header_labels(&["Age: 3".to_string()]).is_none());
    }
}
