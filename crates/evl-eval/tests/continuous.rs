//! Average precision against scikit-learn's values (tests/reference/make_ap.py).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

#[test]
fn average_precision_matches_sklearn() {
    let text = include_str!("reference/ap_reference.json");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for c in cases {
        let y: Vec<bool> = c["y"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64() == Some(1))
            .collect();
        let s: Vec<f64> = c["score"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let got = evl_eval::continuous::average_precision(&y, &s).unwrap();
        let want = c["ap"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-12,
            "n={} got {got} want {want}",
            y.len()
        );
    }
}

/// The curves the report draws integrate to the metrics we report: trapezoids under the ROC
/// curve give `roc_auc`, steps under the PR curve give `average_precision` (on random data with
/// ties, 50 draws).
#[test]
fn curves_integrate_to_their_metrics() {
    use evl_eval::continuous::{average_precision, pr_curve, roc_curve};
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f64 / (1u64 << 31) as f64
    };
    for _ in 0..50 {
        let n = 5 + (next() * 40.0) as usize;
        let y: Vec<bool> = (0..n).map(|_| next() < 0.4).collect();
        // Coarse scores so that ties occur.
        let s: Vec<f64> = (0..n).map(|_| (next() * 6.0).floor() / 6.0).collect();
        let roc = roc_curve(&y, &s);
        match evl_eval::roc_auc(&y, &s) {
            Some(auc) => {
                let r = roc.unwrap();
                let area: f64 = r
                    .windows(2)
                    .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
                    .sum();
                assert!((area - auc).abs() < 1e-12, "{area} vs {auc}");
                assert_eq!(*r.last().unwrap(), (1.0, 1.0));
            }
            None => assert!(roc.is_none()),
        }
        match average_precision(&y, &s) {
            Some(ap) => {
                let p = pr_curve(&y, &s).unwrap();
                let area: f64 = p.windows(2).map(|w| (w[1].0 - w[0].0) * w[1].1).sum();
                assert!((area - ap).abs() < 1e-12, "{area} vs {ap}");
            }
            None => assert!(pr_curve(&y, &s).is_none()),
        }
    }
}

/// Several metrics bootstrapped together get exactly the intervals each gets alone.
#[test]
fn bootstrap_many_equals_one_at_a_time() {
    use evl_eval::continuous::{bootstrap_ci, bootstrap_ci_many};
    let x: Vec<f64> = (0..40).map(|i| ((i * 37) % 11) as f64).collect();
    let mean = |r: &[usize]| Some(r.iter().map(|&i| x[i]).sum::<f64>() / r.len() as f64);
    let max = |r: &[usize]| r.iter().map(|&i| x[i]).reduce(f64::max);
    let many = bootstrap_ci_many(40, 2, |r| vec![mean(r), max(r)], 300, 0.9, 5);
    assert_eq!(many[0], bootstrap_ci(40, mean, 300, 0.9, 5));
    assert_eq!(many[1], bootstrap_ci(40, max, 300, 0.9, 5));
}
