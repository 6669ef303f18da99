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
