//! Malformed input gives a typed error naming file and field; never a panic.

use std::path::Path;

use ecg_io::{Error, ReadOptions, read_record};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn header(nsamp: usize, fmt: &str, gain: &str) -> String {
    format!("r 2 100 {nsamp}\nr.dat {fmt} {gain} 16 0 0 0 0 I\nr.dat {fmt} {gain} 16 0 0 0 0 II\n")
}

fn dat16(frames: usize) -> Vec<u8> {
    vec![0u8; frames * 4]
}

#[test]
fn truncated_dat() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "r.hea", header(10, "16", "200").as_bytes());
    write(d.path(), "r.dat", &dat16(7));
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    match &e {
        Error::SampleCount {
            expected_bytes: 40,
            found_bytes: 28,
            record,
            ..
        } => assert_eq!(record, "r"),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("r.dat"), "{e}");
}

#[test]
fn wrong_sample_count_too_many() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "r.hea", header(10, "16", "200").as_bytes());
    write(d.path(), "r.dat", &dat16(12));
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::SampleCount { .. }), "{e}");
}

#[test]
fn bad_gain() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "r.hea", header(10, "16", "abc/mV").as_bytes());
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Header {
                field: "gain",
                line: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("r.hea:2"), "{e}");
}

#[test]
fn unknown_format() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "r.hea", header(10, "999", "200").as_bytes());
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedFormat {
                format: 999,
                signal: 0,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn header_missing_fields() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "r.hea", b"r 2 100 10\nr.dat\nr.dat 16\n");
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Header {
                field: "format",
                line: 2,
                ..
            }
        ),
        "{e}"
    );
    write(d.path(), "r.hea", b"# only a comment\n");
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Header {
                field: "record line",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn latin1_comment_reads_as_latin1() {
    let d = tempfile::tempdir().unwrap();
    let mut h = header(10, "16", "200").into_bytes();
    h.extend(b"# Diagnose: \xe9l\xe9vation\n");
    write(d.path(), "r.hea", &h);
    write(d.path(), "r.dat", &dat16(10));
    let r = read_record(&d.path().join("r"), ReadOptions::default()).unwrap();
    assert!(
        r.comments
            .iter()
            .any(|c| c == "Diagnose: \u{e9}l\u{e9}vation"),
        "{:?}",
        r.comments
    );
}

#[test]
fn checksum_mismatch_and_no_verify() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "r.hea", b"r 1 100 2\nr.dat 16 200 16 0 1 3 0 I\n");
    write(d.path(), "r.dat", &[1, 0, 1, 0]); // samples 1, 1: sum 2, header says 3
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Checksum {
                expected: 3,
                found: 2,
                signal: 0,
                ..
            }
        ),
        "{e}"
    );
    let r = read_record(
        &d.path().join("r"),
        ReadOptions {
            verify_checksum: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.channels[0].adc, vec![1, 1]);
}

#[test]
fn mat_with_wrong_shape() {
    let d = tempfile::tempdir().unwrap();
    // MAT v4 header: type 30, 3 rows x 4 cols, real, name "val\0"; the .hea says 2 signals.
    let mut m = Vec::new();
    for w in [30i32, 3, 4, 0, 4] {
        m.extend(w.to_le_bytes());
    }
    m.extend(b"val\0");
    m.extend(vec![0u8; 2 * 12]);
    write(d.path(), "r.mat", &m);
    write(
        d.path(),
        "r.hea",
        b"r 2 500 4\nr.mat 16+24 1000/mV 16 0 0 0 0 I\nr.mat 16+24 1000/mV 16 0 0 0 0 II\n",
    );
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Mat { field: "shape", .. }), "{e}");
    // A double-precision matrix is refused by type.
    m[0..4].copy_from_slice(&0i32.to_le_bytes());
    write(d.path(), "r.mat", &m);
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Mat { field: "type", .. }), "{e}");
}

#[test]
fn missing_signal_file() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "r.hea", header(10, "16", "200").as_bytes());
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("r.dat"), "{e}");
}

#[test]
fn malformed_ptbxl_and_json() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "db.csv",
        b"ecg_id,age,sex,scp_codes,strat_fold,filename_lr,filename_hr\n1,50,0,\"{'NORM' 100}\",3,a,b\n",
    );
    let e = ecg_io::labels::ptbxl::read_database(&d.path().join("db.csv")).unwrap_err();
    assert!(
        matches!(&e, Error::Table { row: 1, field, .. } if field == "scp_codes"),
        "{e}"
    );
    write(
        d.path(),
        "c.jsonl",
        b"{\"id\": \"a\", \"conversations\": []}\n{\"id\": 3}\n",
    );
    let e = ecg_io::conversation::read_conversations(&d.path().join("c.jsonl")).unwrap_err();
    assert!(matches!(e, Error::Json { line: 2, .. }), "{e}");
}

/// A byte offset past the end of the file and an absurd sample count are errors, not panics.
#[test]
fn offset_past_end_and_huge_sample_count() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "r.dat", &dat16(2));
    write(
        d.path(),
        "r.hea",
        b"r 1 100 0\nr.dat 16+999 200 16 0 0 0 0 I\n",
    );
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::SampleCount { offset: 999, .. }), "{e}");
    write(
        d.path(),
        "r.hea",
        b"r 2 100 18446744073709551615\nr.dat 16 200 16 0 0 0 0 I\nr.dat 16 200 16 0 0 0 0 II\n",
    );
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::SampleCount { .. }), "{e}");
}

/// A FLAC signal file that is not FLAC, or is cut short, is an error naming it.
#[test]
fn corrupt_flac_is_named() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "r.hea",
        b"r 1 100 10\nr.dat 516 200 16 0 0 0 0 I\n",
    );
    write(d.path(), "r.dat", &[0u8; 64]);
    let e = read_record(&d.path().join("r"), ReadOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::Flac { .. }) && e.to_string().contains("r.dat"),
        "{e}"
    );
    // A real FLAC stream from the corpus, truncated mid-stream.
    let Some(data) = crate::data_dir() else {
        return;
    };
    let src = data.join("wfdb_python_sample");
    let bytes = std::fs::read(src.join("flacformats.d1")).unwrap();
    write(
        d.path(),
        "f.hea",
        b"f 1 200 499\nf.dat 516 200/mV 16 0 -32766 -750 0 sig\n",
    );
    write(d.path(), "f.dat", &bytes[..bytes.len() / 2]);
    let e = read_record(&d.path().join("f"), ReadOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::Flac { .. }) && e.to_string().contains("f.dat"),
        "{e}"
    );
}

/// A multi-segment record whose segment header is missing names that header; a segment
/// name that climbs out of the directory is refused at the header.
#[test]
fn multi_segment_missing_segment_is_named() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "m.hea", b"m/2 1 100 20\nm_1 10\nm_2 10\n");
    write(
        d.path(),
        "m_1.hea",
        b"m_1 1 100 10\nm_1.dat 16 200 16 0 0 0 0 I\n",
    );
    write(d.path(), "m_1.dat", &[0u8; 20]);
    let e = read_record(&d.path().join("m"), ReadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("m_2.hea"), "{e}");
    write(d.path(), "x.hea", b"x/1 1 100 10\n../m_1 10\n");
    let e = read_record(&d.path().join("x"), ReadOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Header {
                field: "segment name",
                ..
            }
        ),
        "{e}"
    );
}

/// An EDF header that lies about its length, or a record count the file does not hold, is
/// an error naming the field.
#[test]
fn edf_header_that_lies_is_named() {
    fn edf(header_bytes: usize, n_records: i64, data: usize) -> Vec<u8> {
        let mut h = String::new();
        let pad = |s: &str, w: usize| format!("{s:<w$}");
        h += &pad("0", 8);
        h += &pad("patient", 80);
        h += &pad("recording", 80);
        h += &pad("01.01.20", 8);
        h += &pad("10.00.00", 8);
        h += &pad(&header_bytes.to_string(), 8);
        h += &pad("", 44);
        h += &pad(&n_records.to_string(), 8);
        h += &pad("1", 8);
        h += &pad("1", 4);
        for (v, w) in [
            ("ECG", 16),
            ("", 80),
            ("uV", 8),
            ("-3200", 8),
            ("3200", 8),
            ("-32768", 8),
            ("32767", 8),
            ("", 80),
            ("10", 8),
            ("", 32),
        ] {
            h += &pad(v, w);
        }
        let mut b = h.into_bytes();
        b.extend(vec![0u8; data]);
        b
    }
    let d = tempfile::tempdir().unwrap();
    let ok = d.path().join("ok.edf");
    std::fs::write(&ok, edf(512, 2, 40)).unwrap();
    let r = read_record(&ok, ReadOptions::default()).unwrap();
    assert_eq!((r.n_samples, r.fs, r.channels.len()), (20, 10.0, 1));
    // (0 - (-32768)) / gain - 3200 = 0.0488... for a zero sample.
    assert!((r.channels[0].physical()[0] - 3200.0 / 65535.0).abs() < 1e-9);
    for (name, bytes, field) in [
        ("len.edf", edf(700, 2, 40), "header bytes"),
        ("count.edf", edf(512, 5, 40), "number of data records"),
        ("short.edf", edf(512, 2, 0)[..300].to_vec(), "header"),
        ("tiny.edf", edf(512, 2, 0)[..100].to_vec(), "header"),
    ] {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = read_record(&p, ReadOptions::default()).unwrap_err();
        match &e {
            Error::Edf { field: f, .. } => assert_eq!(*f, field, "{name}: {e}"),
            other => panic!("{name}: {other}"),
        }
        assert!(e.to_string().contains(name), "{e}");
    }
    // The number of signals must be a whole number from 0 to 4096.
    for ns in ["-1", "1.5", "5000", "x"] {
        let mut b = edf(512, 2, 40);
        b[252..256].copy_from_slice(format!("{ns:<4}").as_bytes());
        let p = d.path().join("ns.edf");
        std::fs::write(&p, b).unwrap();
        let e = read_record(&p, ReadOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Edf {
                    field: "number of signals",
                    ..
                }
            ),
            "ns {ns}: {e}"
        );
    }
    // A header of exactly 256 bytes: no signals, no data records, an empty record.
    let mut b = edf(256, 0, 0)[..256].to_vec();
    b[252..256].copy_from_slice(b"0   ");
    let p = d.path().join("empty.edf");
    std::fs::write(&p, b).unwrap();
    let r = read_record(&p, ReadOptions::default()).unwrap();
    assert_eq!((r.channels.len(), r.n_samples), (0, 0));
}

/// A null signal (format 0, no file) reads as all missing beside the stored ones; wfdb-python
/// 4.3.1 raises a KeyError on such a single-segment record.
#[test]
fn null_format_signal_is_all_missing() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "r.hea",
        b"r 2 100 5\nr.dat 16 200 16 0 1 15 0 I\n~ 0 200 16 0 0 0 0 II\n",
    );
    let dat: Vec<u8> = [1i16, 2, 3, 4, 5]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write(d.path(), "r.dat", &dat);
    let r = read_record(&d.path().join("r"), ReadOptions::default()).unwrap();
    assert_eq!(r.n_samples, 5);
    assert_eq!(r.channels[0].physical(), [0.005, 0.01, 0.015, 0.02, 0.025]);
    assert!(r.channels[1].physical().iter().all(|v| v.is_nan()));
    assert_eq!(r.channels[1].physical().len(), 5);
}

/// EDF+D: each data record starts at the onset of its time-keeping annotation; the gap
/// between records is missing (NaN); the other annotations become comments.
#[test]
fn edf_plus_discontinuous_places_records_at_their_onsets() {
    let pad = |s: &str, w: usize| format!("{s:<w$}");
    let mut h = String::new();
    for (v, w) in [
        ("0", 8),
        ("X X X X", 80),
        ("Startdate X X X X", 80),
        ("01.02.20", 8),
        ("10.00.00", 8),
        ("768", 8),
        ("EDF+D", 44),
        ("2", 8),
        ("1", 8),
        ("2", 4),
    ] {
        h += &pad(v, w);
    }
    let per_signal: [[&str; 2]; 10] = [
        ["ECG", "EDF Annotations"],
        ["", ""],
        ["mV", ""],
        ["-3.2", "-1"],
        ["3.2", "1"],
        ["-32768", "-32768"],
        ["32767", "32767"],
        ["", ""],
        ["10", "30"],
        ["", ""],
    ];
    let widths = [16, 80, 8, 8, 8, 8, 8, 80, 8, 32];
    for (vals, w) in per_signal.iter().zip(widths) {
        for v in vals {
            h += &pad(v, w);
        }
    }
    let mut b = h.into_bytes();
    assert_eq!(b.len(), 768);
    let tal = |text: &[u8]| {
        let mut t = text.to_vec();
        t.resize(60, 0);
        t
    };
    for (r, tals) in [
        (0i16, tal(b"+0\x14\x14\0+0.5\x150.2\x14beat\x14\0")),
        (1, tal(b"+3\x14\x14\0")),
    ] {
        for k in 0..10i16 {
            b.extend((r * 10 + k + 1).to_le_bytes());
        }
        b.extend(tals);
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("d.edf");
    std::fs::write(&p, b).unwrap();
    let r = read_record(&p, ReadOptions::default()).unwrap();
    assert_eq!((r.fs, r.n_samples, r.channels.len()), (10.0, 40, 1));
    let x = r.channels[0].physical();
    let g = 65535.0 / 6.4;
    assert!(
        (x[0] - ((1.0 + 32768.0) / g - 3.2)).abs() < 1e-9,
        "{}",
        x[0]
    );
    assert!(x[10..30].iter().all(|v| v.is_nan()));
    assert!(
        (x[30] - ((11.0 + 32768.0) / g - 3.2)).abs() < 1e-9,
        "{}",
        x[30]
    );
    assert!(x[39].is_finite());
    assert_eq!(r.base_time.as_deref(), Some("10:00:00 01/02/2020"));
    assert!(
        r.comments
            .iter()
            .any(|c| c == "annotation: +0.5 s [0.2 s]: beat"),
        "{:?}",
        r.comments
    );
}

/// A header whose signal file is an absolute path, climbs with `..` or names a directory is
/// refused at the header, before any file is opened: a record reads only files beside its
/// header (the reader is used by the service on uploads).
#[test]
fn signal_file_outside_the_header_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    // A real, readable signal file one level up and one level down: neither may be reached.
    write(d.path(), "up.dat", &[0u8; 20]);
    write(&sub, "down.dat", &[0u8; 20]);
    for name in [
        "../up.dat",
        "../../../../etc/passwd",
        "/etc/passwd",
        "sub/down.dat",
        "sub\\down.dat",
        "..",
        "C:passwd",
    ] {
        let text = format!("r 1 100 10\n{name} 16 200 16 0 0 0 0 I\n");
        write(&sub, "r.hea", text.as_bytes());
        let e = read_record(&sub.join("r"), ReadOptions::default()).unwrap_err();
        match &e {
            Error::Header { field, found, .. } => {
                assert_eq!(*field, "signal file name", "{name}: {e}");
                assert_eq!(found, name);
            }
            other => panic!("{name}: expected a header error, got {other}"),
        }
        assert!(e.to_string().contains("r.hea"), "{e}");
    }
    // The same record with the file beside its header reads.
    write(&sub, "r.hea", b"r 1 100 10\ndown.dat 16 200 16 0 0 0 0 I\n");
    let r = read_record(&sub.join("r"), ReadOptions::default()).unwrap();
    assert_eq!(r.channels[0].adc.len(), 10);
}
