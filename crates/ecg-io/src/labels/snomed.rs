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

/// The PTB-XL diagnostic superclass (MI, STTC, CD, HYP) of a PhysioNet/CinC SNOMED-CT code,
/// for scoring models trained on PTB-XL's superclasses on CinC records. NORM is not a
/// code's class but a record's: see [`ptbxl_superclasses`].
///
/// Our mapping, following PTB-XL's `scp_statements.csv` (`diagnostic_class`) statement by
/// statement where the two vocabularies name the same finding: myocardial infarction, old,
/// acute and anterior MI -> MI (AMI, IMI, PMI); ischaemia of any territory, non-specific ST-T
/// abnormality and long QT -> STTC (ISC_, ISCAN, ISCIN, ISCLA, NST_, LNGQT); bundle branch,
/// fascicular and AV blocks, WPW and non-specific intraventricular block -> CD; ventricular
/// hypertrophy and atrial enlargement -> HYP. Three approximations, where PTB-XL codes the
/// finding as a form statement without a class: T-wave abnormality and inversion and ST
/// depression/elevation -> STTC (PTB-XL's NDT and NST_ are their diagnostic reading).
/// Rhythm, ectopy, axis and voltage codes have no superclass.
pub fn ptbxl_superclass(code: u64) -> Option<&'static str> {
    Some(match code {
        164865005 | 164867002 | 54329005 | 57054005 => "MI",
        164861001 | 426434006 | 425419005 | 425623009 | 428750005 | 111975006 | 164934002
        | 59931005 | 429622005 | 164931005 | 164930006 | 704997005 => "STTC",
        59118001 | 713427006 | 713426002 | 164909002 | 733534002 | 6374002 | 270492004
        | 195042002 | 27885002 | 445118002 | 445211001 | 698252002 | 74390002 => "CD",
        164873001 | 89792004 | 67741000119109 | 446813000 | 253352002 | 446358003 | 253339007
        | 266249003 => "HYP",
        _ => return None,
    })
}

/// Sinus rhythm.
const SINUS_RHYTHM: u64 = 426783006;

/// A record's PTB-XL superclasses from its `#Dx:` codes ([`ptbxl_superclass`] of each, in
/// MI, STTC, CD, HYP order), and NORM for a record in sinus rhythm with none of them.
pub fn ptbxl_superclasses(codes: &[u64]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = ["MI", "STTC", "CD", "HYP"]
        .into_iter()
        .filter(|s| codes.iter().any(|&c| ptbxl_superclass(c) == Some(*s)))
        .collect();
    if out.is_empty() && codes.contains(&SINUS_RHYTHM) {
        out.push("NORM");
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-worked from dx_mapping_scored.csv / unscored.csv and PTB-XL's scp_statements.csv.
    #[test]
    fn cinc_codes_as_ptbxl_superclasses() {
        // JS00001: AF, RBBB, T-wave abnormal.
        assert_eq!(
            ptbxl_superclasses(&[164889003, 59118001, 164934002]),
            ["STTC", "CD"]
        );
        // Sinus rhythm alone is NORM; with LVH it is not.
        assert_eq!(ptbxl_superclasses(&[426783006]), ["NORM"]);
        assert_eq!(ptbxl_superclasses(&[426783006, 164873001]), ["HYP"]);
        // Old MI and 1st-degree AV block, listed in class order.
        assert_eq!(ptbxl_superclasses(&[270492004, 164867002]), ["MI", "CD"]);
        // A rhythm without sinus rhythm or findings: no superclass.
        assert!(ptbxl_superclasses(&[164889003]).is_empty());
        assert!(ptbxl_superclasses(&[426177001]).is_empty());
    }
}
