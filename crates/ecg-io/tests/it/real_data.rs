use std::collections::BTreeMap;
use std::path::Path;

use ecg_io::labels::{LabelSpace, ptbxl, snomed};
use ecg_io::wfdb::annotation::read_annotations;
use ecg_io::{Lead, ReadOptions, read_record};

use crate::data_dir;

#[derive(serde::Deserialize)]
struct Reference {
    records: BTreeMap<String, serde_json::Value>,
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

/// Every WFDB/CinC record in ../shared/data loads and matches wfdb-python's physical values
/// (sums, sums of squares, first/last samples; see reference/make_wfdb_reference.py).
#[test]
fn every_record_matches_wfdb_python() {
    let Some(data) = data_dir() else { return };
    let text = include_str!("reference/wfdb_reference.json");
    let reference: Reference = serde_json::from_str(text).unwrap();
    let mut checked = 0;
    let mut values = 0;
    for (rel, exp) in &reference.records {
        let path = data.join(rel);
        let rec =
            read_record(&path, ReadOptions::default()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        if exp.get("error").is_some() {
            // wfdb-python rejects the early-release CinC headers whose record line names
            // `E00015.mat`; we read them (the name is the file stem).
            assert!(
                rel.contains("quirks"),
                "{rel}: wfdb-python failed on a non-quirk record"
            );
            assert!(!rec.name.ends_with(".mat"));
            checked += 1;
            continue;
        }
        assert_eq!(rec.fs, exp["fs"].as_f64().unwrap(), "{rel} fs");
        assert_eq!(
            rec.n_samples as u64,
            exp["n_samples"].as_u64().unwrap(),
            "{rel} n"
        );
        let names: Vec<String> = serde_json::from_value(exp["sig_name"].clone()).unwrap();
        assert_eq!(rec.channels.len(), names.len(), "{rel} leads");
        for (j, c) in rec.channels.iter().enumerate() {
            assert_eq!(c.description, names[j], "{rel} lead {j}");
            assert_eq!(c.lead, Lead::parse(&names[j]));
            let p = c.physical();
            let sum: f64 = p.iter().filter(|v| !v.is_nan()).sum();
            let sumsq: f64 = p.iter().filter(|v| !v.is_nan()).map(|v| v * v).sum();
            let tol = 1e-9;
            assert!(
                close(sum, exp["sum"][j].as_f64().unwrap(), tol),
                "{rel} lead {j} sum"
            );
            assert!(
                close(sumsq, exp["sumsq"][j].as_f64().unwrap(), tol),
                "{rel} lead {j} sumsq"
            );
            assert_eq!(
                p[0],
                exp["first"][j].as_f64().unwrap(),
                "{rel} lead {j} first"
            );
            assert_eq!(
                *p.last().unwrap(),
                exp["last"][j].as_f64().unwrap(),
                "{rel} lead {j} last"
            );
            values += 4;
        }
        checked += 1;
    }
    assert!(checked > 250, "only {checked} records checked");
    eprintln!("checked {checked} records, {values} values against wfdb-python");
}

/// No .hea in ../shared/data is missing from the reference list (so a new record is noticed).
#[test]
fn reference_covers_every_header() {
    let Some(data) = data_dir() else { return };
    let reference: Reference =
        serde_json::from_str(include_str!("reference/wfdb_reference.json")).unwrap();
    let mut stack = vec![data.clone()];
    let mut n = 0;
    // wfdb-python's own sample corpus has its own reference and test (wfdb_corpus.rs:
    // every record, both frame modes, refusals); it is left out of this list by name.
    let corpus = data.join("wfdb_python_sample");
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p == corpus {
                eprintln!("note: {} is checked by wfdb_corpus.rs", p.display());
            } else if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "hea") {
                let rel = p.strip_prefix(&data).unwrap().with_extension("");
                let key = rel.to_string_lossy().replace('\\', "/");
                assert!(
                    reference.records.contains_key(&key),
                    "{key} not in reference"
                );
                n += 1;
            }
        }
    }
    assert_eq!(n, reference.records.len());
}

#[test]
fn ptbxl_superclasses_from_database_and_headers() {
    let Some(data) = data_dir() else { return };
    let root = data.join("ptbxl_subset");
    let tree = ptbxl::PtbxlTree::open(&root, Some("ptbxl_database_excerpt.csv")).unwrap();
    assert_eq!(tree.rows.len(), 18);
    assert_eq!(tree.statements.by_code.len(), 71);
    // ecg_id 1: {'NORM': 100.0, 'LVOLT': 0.0, 'SR': 0.0} -> NORM (LVOLT is not diagnostic).
    let r1 = &tree.rows[0];
    assert_eq!(tree.statements.superclasses(&r1.scp_codes), vec!["NORM"]);
    assert_eq!(ptbxl::Split::from_fold(r1.strat_fold), ptbxl::Split::Train);
    // Headers agree with the database recipe wherever both exist.
    let mut compared = 0;
    for row in &tree.rows {
        let hea = root.join(format!("{}.hea", row.filename_hr));
        if !hea.exists() {
            continue;
        }
        let rec = read_record(&hea, ReadOptions::default()).unwrap();
        let mut from_header = ptbxl::header_labels(&rec.comments).unwrap().superclasses;
        from_header.sort();
        let mut from_db = tree.statements.superclasses(&row.scp_codes);
        from_db.sort();
        assert_eq!(from_header, from_db, "ecg_id {}", row.ecg_id);
        compared += 1;
    }
    assert!(compared >= 10, "{compared}");
    // Superclass counts over all 33 headers as documented in the subset's README.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut n = 0;
    for e in walk(&root.join("records500")) {
        if e.extension().is_some_and(|x| x == "hea") {
            let h = ecg_io::wfdb::Header::read(&e).unwrap();
            for s in ptbxl::header_labels(&h.comments).unwrap().superclasses {
                *counts.entry(s).or_default() += 1;
            }
            n += 1;
        }
    }
    assert_eq!(n, 33);
    let want: BTreeMap<String, usize> =
        [("NORM", 23), ("MI", 2), ("STTC", 6), ("CD", 5), ("HYP", 5)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(counts, want);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

/// CinC `#Dx:` codes map through the Challenge tables, and agree with the derived index.
#[test]
fn cinc_dx_codes_map_to_names_and_cpsc_classes() {
    let Some(data) = data_dir() else { return };
    let base = data.join("cinc2021_subset");
    let map = snomed::DxMap::load(&base.join("challenge2021_evaluation")).unwrap();
    assert!(map.len() > 100);
    assert_eq!(map.get(164889003).unwrap().abbreviation, "AF");
    let mut rdr = csv::Reader::from_path(base.join("labels_from_headers.csv")).unwrap();
    let mut n = 0;
    for row in rdr.records() {
        let row = row.unwrap();
        let rec = read_record(&base.join(&row[0]), ReadOptions::default()).unwrap();
        let codes = snomed::parse_dx(rec.comment_value("Dx").unwrap()).unwrap();
        let want: Vec<u64> = row[7].split('|').map(|c| c.parse().unwrap()).collect();
        assert_eq!(codes, want, "{}", &row[0]);
        let abbr: Vec<String> = codes
            .iter()
            .map(|c| map.get(*c).map_or("?".into(), |d| d.abbreviation.clone()))
            .collect();
        assert_eq!(abbr.join("|"), &row[8], "{}", &row[0]);
        n += 1;
    }
    assert!(n >= 70);
    // CPSC-2018 records: every one has at least one of the nine classes.
    let space = LabelSpace::cpsc2018();
    for e in walk(&base.join("cpsc2018")) {
        if e.extension().is_some_and(|x| x == "hea") {
            let h = ecg_io::wfdb::Header::read(&e).unwrap();
            let codes = snomed::parse_dx(ecg_io::record::comment_value(&h.comments, "Dx").unwrap())
                .unwrap();
            let (v, _) = space.encode(codes.iter().filter_map(|c| snomed::cpsc2018_class(*c)));
            assert!(v.contains(&1), "{}", e.display());
        }
    }
}

/// MIT-BIH 100 and CPSC-2021 annotations agree with wfdb-python's `rdann` (2274 annotations
/// in 100.atr: '+', N, A, V; rhythm aux strings in CPSC-2021).
#[test]
fn annotations_read() {
    let Some(data) = data_dir() else { return };
    let a = read_annotations(&data.join("physionet_misc/100.atr")).unwrap();
    assert_eq!(a.len(), 2274);
    assert_eq!(a[0].symbol(), "+");
    assert_eq!(a[0].aux, "(N");
    let beats = a.iter().filter(|x| x.is_beat()).count();
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for x in &a {
        *by.entry(x.symbol()).or_default() += 1;
    }
    // PhysioNet's table for record 100: 2239 N, 33 A, 1 V.
    assert_eq!((by["N"], by["A"], by["V"]), (2239, 33, 1));
    assert_eq!(beats, 2273);
    let c = read_annotations(&data.join("cpsc2021_af/data_101_6.atr")).unwrap();
    assert_eq!(c.len(), 204);
    let rhythms: Vec<&str> = c
        .iter()
        .filter(|x| !x.aux.is_empty())
        .map(|x| x.aux.as_str())
        .collect();
    assert_eq!(&rhythms[..2], ["(AFIB", "(N"]);
}

#[test]
fn conversations_read() {
    let Some(data) = data_dir() else { return };
    let items = ecg_io::conversation::read_conversations(
        &data.join("ecgbench_formats/pulse_ptb_report_generation_test.json"),
    )
    .unwrap();
    assert_eq!(items.len(), 500);
    let ex = items[0].exchanges();
    assert_eq!(ex.len(), 1);
    assert!(ex[0].1.contains("Sinus rhythm"));
}

/// SPH HDF5 records (float16 mV) against h5py: exact first/last values, sums to 1e-9.
#[test]
fn sph_records_match_h5py() {
    let Some(data) = data_dir() else { return };
    let reference: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(include_str!("reference/sph_reference.json")).unwrap();
    assert_eq!(reference.len(), 10);
    for (file, exp) in &reference {
        let rec = read_record(&data.join("sph_subset").join(file), ReadOptions::default()).unwrap();
        assert_eq!(
            rec.n_samples as u64,
            exp["shape"][1].as_u64().unwrap(),
            "{file}"
        );
        assert_eq!(rec.leads(), Lead::STANDARD_12.to_vec());
        for (j, c) in rec.channels.iter().enumerate() {
            let p = c.physical();
            assert_eq!(p[0], exp["first"][j].as_f64().unwrap(), "{file} lead {j}");
            assert_eq!(
                *p.last().unwrap(),
                exp["last"][j].as_f64().unwrap(),
                "{file} lead {j}"
            );
            let sum: f64 = p.iter().sum();
            assert!(
                close(sum, exp["sum"][j].as_f64().unwrap(), 1e-9),
                "{file} lead {j}"
            );
        }
    }
}
