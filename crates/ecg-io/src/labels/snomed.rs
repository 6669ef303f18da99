//! SNOMED-CT codes of the PhysioNet/CinC Challenges 2020-2021 (`#Dx:` header comments), with
//! the Challenge's mapping tables (`dx_mapping_scored.csv`, `dx_mapping_unscored.csv`).

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// One SNOMED-CT diagnosis of the Challenge tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    /// SNOMED-CT concept id.
    pub code: u64,
    /// Name (`atrial fibrillation`).
    pub name: String,
    /// Abbreviation (`AF`).
    pub abbreviation: String,
    /// Whether the 2021 Challenge scored it.
    pub scored: bool,
}

/// SNOMED-CT code -> diagnosis.
#[derive(Debug, Clone, Default)]
pub struct DxMap {
    by_code: HashMap<u64, Diagnosis>,
}

impl DxMap {
    /// Load `dx_mapping_scored.csv` and `dx_mapping_unscored.csv` from `dir`.
    pub fn load(dir: &Path) -> Result<DxMap> {
        let mut map = DxMap::default();
        for (file, scored) in [
            ("dx_mapping_scored.csv", true),
            ("dx_mapping_unscored.csv", false),
        ] {
            let path = dir.join(file);
            let mut rdr = csv::Reader::from_path(&path).map_err(|source| Error::Csv {
                path: path.clone(),
                source,
            })?;
            let headers = rdr
                .headers()
                .map_err(|source| Error::Csv {
                    path: path.clone(),
                    source,
                })?
                .clone();
            let col = |name: &str| -> Result<usize> {
                headers
                    .iter()
                    .position(|h| h == name)
                    .ok_or_else(|| Error::Table {
                        path: path.clone(),
                        row: 0,
                        field: name.to_string(),
                        what: "column missing".into(),
                    })
            };
            let (c_dx, c_code, c_abbr) = (col("Dx")?, col("SNOMEDCTCode")?, col("Abbreviation")?);
            for (i, row) in rdr.records().enumerate() {
                let row = row.map_err(|source| Error::Csv {
                    path: path.clone(),
                    source,
                })?;
                let code_text = row.get(c_code).unwrap_or("");
                let code: u64 = code_text.trim().parse().map_err(|_| Error::Table {
                    path: path.clone(),
                    row: i + 1,
                    field: "SNOMEDCTCode".into(),
                    what: format!("`{code_text}` is not a SNOMED-CT id"),
                })?;
                map.by_code.insert(
                    code,
                    Diagnosis {
                        code,
                        name: row.get(c_dx).unwrap_or("").to_string(),
                        abbreviation: row.get(c_abbr).unwrap_or("").to_string(),
                        scored,
                    },
                );
            }
        }
        Ok(map)
    }

    /// Look a code up.
    pub fn get(&self, code: u64) -> Option<&Diagnosis> {
        self.by_code.get(&code)
    }

    /// Number of codes known.
    pub fn len(&self) -> usize {
        self.by_code.len()
    }

    /// Whether no code is known.
    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }
}

/// Parse a `#Dx:` value (`164889003,59118001`). Returns the codes, or the first token that
/// is not a number.
pub fn parse_dx(value: &str) -> std::result::Result<Vec<u64>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u64>().map_err(|_| t.to_string()))
        .collect()
}

/// The CPSC-2018 class (as ECG-Bench names it) a SNOMED-CT code belongs to. Codes the 2021
/// Challenge scores as equivalent (CRBBB/RBBB, CLBBB/LBBB, SVPB/PAC, VPB/PVC/VEB) map to the
/// same class.
pub fn cpsc2018_class(code: u64) -> Option<&'static str> {
    Some(match code {
        426783006 => "NORM",
        164889003 => "AF",
        270492004 => "I-AVB",
        164909002 | 733534002 => "LBBB",
        59118001 | 713427006 => "RBBB",
        284470004 | 63593006 => "PAC",
        164884008 | 427172004 | 17338001 => "PVC",
        429622005 => "STD",
        164931005 => "STE",
        _ => return None,
    })
}
