//! Continuous-score metrics beyond ROC AUC: average precision (PR AUC, scikit-learn's
//! step-wise definition), per-class decision thresholds chosen on a validation split, Fmax
//! (the protein-centric maximum F of the PTB-XL benchmark, Strodthoff et al. 2021), expected
//! calibration error with its reliability bins, and seeded percentile bootstrap confidence
//! intervals.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::metrics::f1_binary;

/// Average precision of one class: `sum_n (R_n - R_{n-1}) P_n` over the distinct scores in
/// decreasing order (scikit-learn's `average_precision_score`). `None` without positives.
pub fn average_precision(y_true: &[bool], score: &[f64]) -> Option<f64> {
    let pts = pr_curve(y_true, score)?;
    Some(pts.windows(2).map(|w| (w[1].0 - w[0].0) * w[1].1).sum())
}

/// Points of a curve swept over the distinct scores in decreasing order: `(tp, fp)` after all
/// samples tied at each score have entered.
fn sweep(y_true: &[bool], score: &[f64]) -> Vec<(usize, usize)> {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut out = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let s = score[idx[i]];
        while i < idx.len() && score[idx[i]] == s {
            if y_true[idx[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        out.push((tp, fp));
    }
    out
}

/// ROC curve `(false positive rate, true positive rate)` from `(0, 0)` through every distinct
/// score threshold to `(1, 1)`. `None` when the class has one gold value. Its trapezoidal area
/// is the ROC AUC.
pub fn roc_curve(y_true: &[bool], score: &[f64]) -> Option<Vec<(f64, f64)>> {
    let p = y_true.iter().filter(|&&y| y).count();
    let n = y_true.len() - p;
    if p == 0 || n == 0 {
        return None;
    }
    let mut pts = vec![(0.0, 0.0)];
    pts.extend(
        sweep(y_true, score)
            .into_iter()
            .map(|(tp, fp)| (fp as f64 / n as f64, tp as f64 / p as f64)),
    );
    Some(pts)
}

/// Precision-recall curve `(recall, precision)` at every distinct score threshold, in
/// increasing recall, starting at `(0, 1)` as scikit-learn draws it. `None` without positives.
/// Its step-wise area (`sum (R_n - R_{n-1}) P_n`) is the average precision.
pub fn pr_curve(y_true: &[bool], score: &[f64]) -> Option<Vec<(f64, f64)>> {
    let p = y_true.iter().filter(|&&y| y).count();
    if p == 0 {
        return None;
    }
    let mut pts = vec![(0.0, 1.0)];
    pts.extend(
        sweep(y_true, score)
            .into_iter()
            .map(|(tp, fp)| (tp as f64 / p as f64, tp as f64 / (tp + fp) as f64)),
    );
    Some(pts)
}

/// Column `c` of a row-major `(n, k)` matrix.
fn column<T: Copy>(m: &[T], k: usize, c: usize) -> Vec<T> {
    m.iter().skip(c).step_by(k).copied().collect()
}

/// Macro average precision over classes with at least one positive, and the per-class values.
pub fn macro_average_precision(
    y_true: &[bool],
    score: &[f64],
    k: usize,
) -> (Option<f64>, Vec<Option<f64>>) {
    let per: Vec<Option<f64>> = (0..k)
        .map(|c| average_precision(&column(y_true, k, c), &column(score, k, c)))
        .collect();
    let v: Vec<f64> = per.iter().flatten().copied().collect();
    (
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
        per,
    )
}

/// Per-class thresholds that maximise F1 on a validation split (candidate thresholds: the
/// validation scores themselves; ties broken towards the lower threshold; 0.5 for a class
/// without positives).
pub fn best_thresholds(y_true: &[bool], score: &[f64], k: usize) -> Vec<f64> {
    (0..k)
        .map(|c| {
            let (t, s) = (column(y_true, k, c), column(score, k, c));
            if !t.iter().any(|&x| x) {
                return 0.5;
            }
            let mut cands = s.clone();
            cands.sort_by(f64::total_cmp);
            cands.dedup();
            let mut best = (f64::NEG_INFINITY, 0.5);
            for th in cands {
                let pred: Vec<bool> = s.iter().map(|&x| x >= th).collect();
                let f = f1_binary(&t, &pred);
                if f > best.0 {
                    best = (f, th);
                }
            }
            best.1
        })
        .collect()
}

/// Macro F1 with per-class thresholds (`score >= threshold`).
pub fn macro_f1_at(y_true: &[bool], score: &[f64], thresholds: &[f64]) -> f64 {
    let k = thresholds.len();
    let f: Vec<f64> = (0..k)
        .map(|c| {
            let pred: Vec<bool> = column(score, k, c)
                .iter()
                .map(|&x| x >= thresholds[c])
                .collect();
            f1_binary(&column(y_true, k, c), &pred)
        })
        .collect();
    f.iter().sum::<f64>() / k.max(1) as f64
}

/// Fmax: over thresholds 0.00, 0.01, ..., 1.00, precision averaged over the samples with at
/// least one predicted label, recall averaged over all samples, F = 2PR/(P+R); the maximum.
pub fn fmax(y_true: &[bool], score: &[f64], k: usize) -> f64 {
    let n = y_true.len() / k.max(1);
    let mut best = 0.0f64;
    for step in 0..=100 {
        let t = step as f64 / 100.0;
        let (mut p_sum, mut p_n, mut r_sum) = (0.0, 0usize, 0.0);
        for i in 0..n {
            let (mut tp, mut pred, mut pos) = (0usize, 0usize, 0usize);
            for c in 0..k {
                let (y, p) = (y_true[i * k + c], score[i * k + c] >= t);
                tp += (y && p) as usize;
                pred += p as usize;
                pos += y as usize;
            }
            if pred > 0 {
                p_sum += tp as f64 / pred as f64;
                p_n += 1;
            }
            if pos > 0 {
                r_sum += tp as f64 / pos as f64;
            }
        }
        if p_n == 0 {
            continue;
        }
        let (p, r) = (p_sum / p_n as f64, r_sum / n as f64);
        if p + r > 0.0 {
            best = best.max(2.0 * p * r / (p + r));
        }
    }
    best
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReliabilityBin {
    /// Lower edge.
    pub lo: f64,
    /// Upper edge.
    pub hi: f64,
    /// Predictions in the bin.
    pub count: usize,
    /// Mean predicted probability.
    pub confidence: f64,
    /// Fraction of positives.
    pub frequency: f64,
}

/// Expected calibration error of binary probabilities with `n_bins` equal-width bins
/// (`[0, 1/b), ..., [1 - 1/b, 1]`): `sum_b |B|/N |frequency_b - confidence_b|`.
pub fn expected_calibration_error(
    y_true: &[bool],
    prob: &[f64],
    n_bins: usize,
) -> (f64, Vec<ReliabilityBin>) {
    let mut count = vec![0usize; n_bins];
    let mut conf = vec![0.0f64; n_bins];
    let mut pos = vec![0usize; n_bins];
    for (&y, &p) in y_true.iter().zip(prob) {
        let b = ((p * n_bins as f64) as usize).min(n_bins - 1);
        count[b] += 1;
        conf[b] += p;
        pos[b] += y as usize;
    }
    let n = y_true.len().max(1) as f64;
    let mut ece = 0.0;
    let bins = (0..n_bins)
        .map(|b| {
            let c = count[b].max(1) as f64;
            let (cf, fr) = (conf[b] / c, pos[b] as f64 / c);
            ece += count[b] as f64 / n * (fr - cf).abs();
            ReliabilityBin {
                lo: b as f64 / n_bins as f64,
                hi: (b + 1) as f64 / n_bins as f64,
                count: count[b],
                confidence: cf,
                frequency: fr,
            }
        })
        .collect();
    (ece, bins)
}

/// A percentile bootstrap confidence interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BootstrapCi {
    /// The metric on the full sample.
    pub estimate: Option<f64>,
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
    /// Resamples drawn.
    pub resamples: usize,
    /// Resamples where the metric was undefined (left out of the percentiles).
    pub undefined: usize,
}

/// Percentile bootstrap over rows: `metric(rows)` on `resamples` seeded resamples with
/// replacement of `0..n`, `(1 - level)/2` and `(1 + level)/2` percentiles (linear
/// interpolation, as numpy's default).
pub fn bootstrap_ci(
    n: usize,
    metric: impl Fn(&[usize]) -> Option<f64>,
    resamples: usize,
    level: f64,
    seed: u64,
) -> BootstrapCi {
    bootstrap_ci_many(n, 1, |rows| vec![metric(rows)], resamples, level, seed)
        .pop()
        .expect("one metric")
}

/// [`bootstrap_ci`] for `k` metrics computed together by `metrics(rows)` (a vector of `k`),
/// on the same resamples: each resample is evaluated once for all of them, and every
/// interval equals what `bootstrap_ci` gives for that metric alone with the same seed.
pub fn bootstrap_ci_many(
    n: usize,
    k: usize,
    metrics: impl Fn(&[usize]) -> Vec<Option<f64>>,
    resamples: usize,
    level: f64,
    seed: u64,
) -> Vec<BootstrapCi> {
    let all: Vec<usize> = (0..n).collect();
    let estimates = metrics(&all);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut vals: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); k];
    let mut undefined = vec![0usize; k];
    let mut rows = vec![0usize; n];
    for _ in 0..resamples {
        for r in rows.iter_mut() {
            *r = rng.random_range(0..n.max(1));
        }
        for (m, v) in metrics(&rows).into_iter().enumerate().take(k) {
            match v {
                Some(v) if v.is_finite() => vals[m].push(v),
                _ => undefined[m] += 1,
            }
        }
    }
    vals.into_iter()
        .zip(undefined)
        .zip(estimates)
        .map(|((mut vals, undefined), estimate)| {
            vals.sort_by(f64::total_cmp);
            let pct = |q: f64| -> f64 {
                if vals.is_empty() {
                    return f64::NAN;
                }
                let pos = q * (vals.len() - 1) as f64;
                let (i, f) = (pos.floor() as usize, pos - pos.floor());
                if i + 1 < vals.len() {
                    vals[i] * (1.0 - f) + vals[i + 1] * f
                } else {
                    vals[i]
                }
            };
            BootstrapCi {
                estimate,
                lo: pct((1.0 - level) / 2.0),
                hi: pct((1.0 + level) / 2.0),
                resamples,
                undefined,
            }
        })
        .collect()
}

/// Macro ROC AUC (mean over classes with both values) of row-major `score` (records x `k`).
pub fn macro_roc_auc(y_true: &[bool], score: &[f64], k: usize) -> Option<f64> {
    let aucs: Vec<f64> = (0..k)
        .filter_map(|c| {
            let t: Vec<bool> = y_true.iter().skip(c).step_by(k).copied().collect();
            let s: Vec<f64> = score.iter().skip(c).step_by(k).copied().collect();
            crate::metrics::roc_auc(&t, &s)
        })
        .collect();
    (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64)
}

/// The paired difference of macro ROC AUC between two models scored on the same records
/// (`score_b - score_a`, both row-major records x `k`), with its percentile bootstrap
/// interval: each resample draws records with replacement and scores both models on the
/// same draw, so the record-to-record variation both share cancels.
pub fn paired_macro_auc_delta(
    y_true: &[bool],
    score_a: &[f64],
    score_b: &[f64],
    k: usize,
    resamples: usize,
    seed: u64,
) -> BootstrapCi {
    let n = y_true.len() / k.max(1);
    let pick = |v: &[f64], rows: &[usize]| -> Vec<f64> {
        rows.iter()
            .flat_map(|&r| v[r * k..(r + 1) * k].iter().copied())
            .collect()
    };
    let delta = |rows: &[usize]| {
        let t: Vec<bool> = rows
            .iter()
            .flat_map(|&r| y_true[r * k..(r + 1) * k].iter().copied())
            .collect();
        Some(
            macro_roc_auc(&t, &pick(score_b, rows), k)?
                - macro_roc_auc(&t, &pick(score_a, rows), k)?,
        )
    };
    let mut ci = bootstrap_ci(n, delta, resamples, 0.95, seed);
    let all: Vec<usize> = (0..n).collect();
    ci.estimate = delta(&all);
    ci
}

/// Below this largest per-class standard deviation of the probabilities across records, a
/// model is said to ignore its input: a model that reads the ECG moves its probabilities by
/// far more than 0.001 between a normal and an infarct record; one that gives every record
/// the same answer (a prior learnt from the text alone) moves them by rounding noise.
pub const INPUT_INDEPENDENT_SD: f64 = 1e-3;

/// How much a model's per-label probabilities depend on the record: for each of the `k`
/// classes the standard deviation of `score` (row-major, records x classes) across records,
/// and the largest of them. `None` with fewer than two records.
pub fn probability_spread(score: &[f64], k: usize) -> Option<f64> {
    let n = score.len().checked_div(k)?;
    if n < 2 {
        return None;
    }
    (0..k)
        .map(|c| {
            let col = score.iter().skip(c).step_by(k);
            let mean = col.clone().sum::<f64>() / n as f64;
            (col.map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        })
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ap_by_hand_and_ties() {
        // Scores 0.9 (+), 0.8 (-), 0.7 (+): AP = 0.5*1 + 0.5*(2/3).
        let ap = average_precision(&[true, false, true], &[0.9, 0.8, 0.7]).unwrap();
        assert!((ap - (0.5 + 1.0 / 3.0)).abs() < 1e-15);
        // All tied: AP = prevalence.
        let ap = average_precision(&[true, false, false, true], &[0.5; 4]).unwrap();
        assert!((ap - 0.5).abs() < 1e-15);
        assert!(average_precision(&[false, false], &[0.1, 0.2]).is_none());
    }

    #[test]
    fn ece_and_fmax_by_hand() {
        // One bin at 0.55 with half positives: ECE = 0.05.
        let (e, bins) =
            expected_calibration_error(&[true, false, true, false], &[0.55, 0.55, 0.55, 0.55], 10);
        assert!((e - 0.05).abs() < 1e-12);
        assert_eq!(bins[5].count, 4);
        // Perfect ranking with a threshold that separates: Fmax = 1.
        let f = fmax(&[true, false, false, true], &[0.9, 0.1, 0.2, 0.8], 2);
        assert!((f - 1.0).abs() < 1e-12);
    }

    #[test]
    fn thresholds_and_bootstrap() {
        let y = [true, false, true, false, true, false];
        let s = [0.3, 0.2, 0.35, 0.1, 0.4, 0.25];
        let t = best_thresholds(&y, &s, 1);
        assert_eq!(t, vec![0.3]);
        assert!((macro_f1_at(&y, &s, &t) - 1.0).abs() < 1e-12);
        let m = |rows: &[usize]| {
            let yt: Vec<bool> = rows.iter().map(|&i| y[i]).collect();
            let sc: Vec<f64> = rows.iter().map(|&i| s[i]).collect();
            crate::metrics::roc_auc(&yt, &sc)
        };
        let a = bootstrap_ci(6, m, 200, 0.95, 1);
        assert_eq!(a, bootstrap_ci(6, m, 200, 0.95, 1));
        assert_eq!(a.estimate, Some(1.0));
        assert!(a.lo <= 1.0 && a.hi == 1.0 && a.undefined > 0);
    }

    #[test]
    fn spread_sees_a_constant_model() {
        // 3 records x 2 classes: class 0 constant, class 1 moves.
        let s = [0.3, 0.1, 0.3, 0.5, 0.3, 0.9];
        let sd = probability_spread(&s, 2).unwrap();
        assert!((sd - 0.4).abs() < 1e-12, "{sd}");
        let flat = [0.38086, 0.2, 0.38096, 0.2, 0.38090, 0.2];
        assert!(probability_spread(&flat, 2).unwrap() < INPUT_INDEPENDENT_SD);
        assert_eq!(probability_spread(&[0.5, 0.5], 2), None);
    }

    #[test]
    fn paired_delta_is_the_difference_and_its_interval_is_tight_for_a_shift() {
        // 60 records, 1 class; model b = model a with the ranking of 6 pairs repaired.
        let y: Vec<bool> = (0..60).map(|i| i % 3 == 0).collect();
        let a: Vec<f64> = (0..60).map(|i| ((i * 37) % 60) as f64 / 60.0).collect();
        let b: Vec<f64> = a
            .iter()
            .zip(&y)
            .map(|(&s, &t)| if t { s + 0.2 } else { s })
            .collect();
        let ci = paired_macro_auc_delta(&y, &a, &b, 1, 300, 1);
        let want =
            crate::metrics::roc_auc(&y, &b).unwrap() - crate::metrics::roc_auc(&y, &a).unwrap();
        assert!((ci.estimate.unwrap() - want).abs() < 1e-12);
        assert!(
            want > 0.0 && ci.lo > 0.0 && ci.lo <= want && want <= ci.hi,
            "{ci:?}"
        );
        // Identical models: a zero difference with a zero-width interval.
        let same = paired_macro_auc_delta(&y, &a, &a, 1, 100, 1);
        assert_eq!((same.estimate, same.lo, same.hi), (Some(0.0), 0.0, 0.0));
    }
}
