//! Dataset index, sources, shuffling, preprocessing and the safetensors cache.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use ecg_data::{Dataset, Preprocess, SignalCache};
use ecg_io::labels::ptbxl::{PtbxlTree, Split};

#[test]
fn synthetic_dir_index_round_trip_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ecg_synth::SynthConfig::default();
    ecg_synth::write_dataset(dir.path(), &cfg, 5, 30).unwrap();
    let ds = Dataset::from_synth_dir(dir.path()).unwrap();
    assert_eq!(ds.entries.len(), 30);
    let idx = dir.path().join("index.jsonl");
    ds.write_index(&idx).unwrap();
    let back = Dataset::read_index(&idx).unwrap();
    assert_eq!(back, ds);
    // Deterministic shuffling, different per epoch.
    let all: Vec<usize> = (0..30).collect();
    assert_eq!(ds.shuffled(&all, 1, 0), ds.shuffled(&all, 1, 0));
    assert_ne!(ds.shuffled(&all, 1, 0), ds.shuffled(&all, 1, 1));
    // Preprocess: 500 Hz, 10 s -> 100 Hz, 1000 samples, 12 leads.
    let p = Preprocess::default();
    let ex = ds.load(3, &p).unwrap();
    assert_eq!(ex.signal.len(), 12 * 1000);
    assert!(ex.lead_mask.iter().all(|&m| m));
    assert_eq!(ex.labels, ds.label_vector(3));
    // Cache: built once, then read back identical.
    let cdir = dir.path().join("cache");
    let (c1, path, hit1) = SignalCache::open_or_build(&cdir, "synth", &ds, &p).unwrap();
    let (c2, _, hit2) = SignalCache::open_or_build(&cdir, "synth", &ds, &p).unwrap();
    assert!(!hit1 && hit2);
    assert_eq!(c1, c2);
    assert_eq!(c1.signal(3), ex.signal.as_slice());
    // Different settings miss the cache.
    let p2 = Preprocess {
        standardize: true,
        ..p.clone()
    };
    assert!(SignalCache::load(&path, &ds, &p2).unwrap().is_none());
}

#[test]
fn truncated_index_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    ecg_synth::write_dataset(dir.path(), &ecg_synth::SynthConfig::default(), 5, 3).unwrap();
    let ds = Dataset::from_synth_dir(dir.path()).unwrap();
    let idx = dir.path().join("index.jsonl");
    ds.write_index(&idx).unwrap();
    let text = std::fs::read_to_string(&idx).unwrap();
    let cut: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(&idx, cut.join("\n")).unwrap();
    let e = Dataset::read_index(&idx).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn ptbxl_and_cinc_sources() {
    let Some(shared) = evl_testkit::shared_dir() else {
        return;
    };
    let root = shared.join("data/ptbxl_subset");
    let tree = PtbxlTree::open(&root, Some("ptbxl_database_excerpt.csv")).unwrap();
    let ds = Dataset::from_ptbxl(&tree, 500, true).unwrap();
    assert_eq!(ds.entries.len(), 33);
    // Each entry's split is its row's `strat_fold` through PTB-XL's recipe (9 val, 10 test),
    // and the excerpt holds rows of every split (this once read `any(test|val) || all(train)`,
    // which no split assignment could fail).
    // (Entries found only through headers have no database row.)
    let mut from_rows = 0;
    for e in &ds.entries {
        if let Some(row) = tree
            .rows
            .iter()
            .find(|r| format!("ptbxl-{}", r.ecg_id) == e.id)
        {
            assert_eq!(e.split, Split::from_fold(row.strat_fold), "{}", e.id);
            from_rows += 1;
        }
    }
    assert!(
        from_rows >= 10,
        "only {from_rows} entries from database rows"
    );
    for s in [Split::Train, Split::Val, Split::Test] {
        assert!(ds.entries.iter().any(|e| e.split == s), "no {s:?} entry");
    }
    let ex = ds.load_many(&[0, 1, 2], &Preprocess::default()).unwrap();
    assert_eq!(ex[0].signal.len(), 12_000);
    let dx = ecg_io::labels::snomed::DxMap::load(
        &shared.join("data/cinc2021_subset/challenge2021_evaluation"),
    )
    .unwrap();
    let cinc = Dataset::from_cinc_dir(&shared.join("data/cinc2021_subset/cpsc2018"), &dx).unwrap();
    assert_eq!(cinc.entries.len(), 10);
    assert!(cinc.entries.iter().all(|e| !e.labels.is_empty()));
    let conv = Dataset::from_conversations(
        &shared.join("data/ecgbench_formats/pulse_ptb_report_generation_test.json"),
        &shared.join("data"),
    )
    .unwrap();
    assert_eq!(conv.entries.len(), 500);
    assert!(conv.load(0, &Preprocess::default()).is_err());
}

/// A plain directory of records is split deterministically, by patient where the headers
/// name one, else by record; the three splits are disjoint and cover the directory, and the
/// two sampling rates of one PTB-XL ECG never fall on both sides.
#[test]
fn folder_without_splits_is_split_by_patient_or_record() {
    use ecg_data::labelled::{LoadOptions, folder_split, load_labelled};
    use std::path::Path;
    // Patient beats record name; the same patient in two records shares a split.
    let a = folder_split(Path::new("x/r1.hea"), "r1 1 100 10\n# Patient ID: 42\n");
    let b = folder_split(
        Path::new("y/other.hea"),
        "other 1 100 10\n#patient_id: 42\n",
    );
    assert_eq!(a, b);
    // Over many patients, about 80/10/10.
    let mut n = [0usize; 3];
    for i in 0..10_000 {
        let s = folder_split(Path::new("r.hea"), &format!("#Patient ID: {i}\n"));
        n[s as usize] += 1;
    }
    assert!(
        (7_700..8_300).contains(&n[0]) && (800..1_200).contains(&n[1]),
        "{n:?}"
    );
    // PTB-XL's _lr and _hr versions of one ECG share a split.
    for id in 0..200 {
        let lr = folder_split(Path::new(&format!("records100/{id:05}_lr.hea")), "");
        let hr = folder_split(Path::new(&format!("records500/{id:05}_hr.hea")), "");
        assert_eq!(lr, hr);
    }
    let Some(shared) = evl_testkit::shared_dir() else {
        return;
    };
    let dir = shared.join("data/ptbxl_subset");
    let read = |split| {
        let opts = LoadOptions {
            split,
            ..LoadOptions::default()
        };
        let mut names: Vec<String> = load_labelled(&dir, opts)
            .unwrap()
            .into_iter()
            .map(|(r, _, _)| r.name)
            .collect();
        names.sort();
        names
    };
    let all = read(None);
    let parts = [
        read(Some(Split::Train)),
        read(Some(Split::Val)),
        read(Some(Split::Test)),
    ];
    let key = |n: &str| {
        n.trim_end_matches("_lr")
            .trim_end_matches("_hr")
            .to_string()
    };
    for (i, p) in parts.iter().enumerate() {
        assert!(!p.is_empty(), "split {i} of {} records is empty", all.len());
        for q in &parts[i + 1..] {
            assert!(
                p.iter().all(|n| q.iter().all(|m| key(n) != key(m))),
                "splits overlap"
            );
        }
    }
    let mut union: Vec<String> = parts.concat();
    union.sort();
    assert_eq!(union, all);
    evl_testkit::say(&format!(
        "ptbxl_subset: {} records -> train {}, val {}, test {}",
        all.len(),
        parts[0].len(),
        parts[1].len(),
        parts[2].len()
    ));
}
