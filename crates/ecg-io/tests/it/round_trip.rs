use ecg_io::wfdb::format::SUPPORTED;
use ecg_io::{Channel, Lead, ReadOptions, Record, read_record, write_record};

fn record(n: usize, lo: i32, hi: i32) -> Record {
    let channels = Lead::STANDARD_12
        .iter()
        .enumerate()
        .map(|(j, l)| Channel {
            lead: l.clone(),
            description: l.name().to_string(),
            gain: 1000.0,
            baseline: j as f64 - 3.0,
            units: "mV".into(),
            adc: (0..n)
                .map(|k| lo + ((k * 7919 + j * 104729) % ((hi - lo) as usize + 1)) as i32)
                .collect(),
            invalid: None,
            spans: Vec::new(),
        })
        .collect();
    Record {
        name: "synthetic".into(),
        fs: 500.0,
        n_samples: n,
        channels,
        comments: vec!["Labels: NORM".into()],
        base_time: None,
    }
}

/// Every supported format writes and reads back to the same ADC values, odd lengths included
/// (packed formats pad their last group).
#[test]
fn write_read_every_format() {
    let dir = tempfile::tempdir().unwrap();
    // Format 8 (first differences) is read, not written.
    for &f in SUPPORTED.iter().filter(|&&f| f != 8) {
        let (lo, hi) = ecg_io::wfdb::format::value_range(f);
        let lo = lo.max(-40000) as i32 + 1; // keep the invalid marker out
        let hi = hi.min(40000) as i32;
        for n in [1usize, 5, 1000] {
            let mut rec = record(n, lo, hi);
            let sub = dir.path().join(format!("f{f}_{n}"));
            write_record(&sub, &rec, f).unwrap();
            let back = read_record(&sub.join("synthetic"), ReadOptions::default()).unwrap();
            for c in &mut rec.channels {
                c.invalid = ecg_io::wfdb::format::invalid_value(f);
            }
            assert_eq!(back, rec, "format {f}, n {n}");
        }
    }
}

#[test]
fn out_of_range_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rec = record(10, -3000, 3000);
    let e = write_record(dir.path(), &rec, 212).unwrap_err();
    assert!(matches!(e, ecg_io::Error::Write { .. }), "{e}");
}

/// Each format's invalid-sample marker reads as NaN and writes back as the marker: a record
/// with missing samples survives a write and read in every writable format, and the value
/// one above the marker is an ordinary sample.
#[test]
fn invalid_samples_read_as_nan_and_write_back() {
    let dir = tempfile::tempdir().unwrap();
    for &f in SUPPORTED.iter().filter(|&&f| f != 8) {
        let inv = ecg_io::wfdb::format::invalid_value(f).expect("formats but 8 have a marker");
        let mut rec = record(9, 0, 100);
        for c in &mut rec.channels {
            c.invalid = Some(inv);
            c.adc[2] = inv;
            c.adc[5] = inv + 1;
        }
        let sub = dir.path().join(format!("nan{f}"));
        write_record(&sub, &rec, f).unwrap();
        let back = read_record(&sub.join("synthetic"), ReadOptions::default()).unwrap();
        assert_eq!(back, rec, "format {f}");
        for c in &back.channels {
            let p = c.physical();
            assert!(
                p[2].is_nan(),
                "format {f}: the marker {inv} did not read as NaN"
            );
            assert!(p[5].is_finite(), "format {f}: {} read as NaN", inv + 1);
            assert_eq!(p.iter().filter(|v| v.is_nan()).count(), 1, "format {f}");
        }
    }
}
