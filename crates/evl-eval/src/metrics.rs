//! Multi-label and multiple-choice metrics (scikit-learn semantics).

use crate::{Error, Result};

/// ROC AUC of one class by the Mann–Whitney statistic, ties counting 1/2.
///
/// Returns `None` when `y_true` holds a single value (AUC undefined).
pub fn roc_auc(y_true: &[bool], score: &[f64]) -> Option<f64> {
    let n_pos = y_true.iter().filter(|&&y| y).count();
    let n_neg = y_true.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    // Average ranks over tied scores (1-based), then U = sum of positive ranks - n_pos(n_pos+1)/2.
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && score[idx[j + 1]] == score[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg_rank * idx[i..=j].iter().filter(|&&k| y_true[k]).count() as f64;
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// F1 of one class; 0 when there are no true and no predicted positives
/// (`zero_division=0`).
pub fn f1_binary(y_true: &[bool], y_pred: &[bool]) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    for (&t, &p) in y_true.iter().zip(y_pred) {
        match (t, p) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fn_ += 1,
            _ => {}
        }
    }
    let denom = 2 * tp + fp + fn_;
    if denom == 0 {
        0.0
    } else {
        2.0 * tp as f64 / denom as f64
    }
}

/// Multi-label metrics over `n` rows and `c` classes.
#[derive(Debug, Clone, PartialEq)]
pub struct MultilabelMetrics {
    /// Mean ROC AUC over the classes with both label values; `None` if there are none.
    pub macro_auc: Option<f64>,
    /// Per-class ROC AUC (`None` = skipped: the gold column holds one value).
    pub per_class_auc: Vec<Option<f64>>,
    /// Indices of the skipped classes.
    pub auc_skipped_classes: Vec<usize>,
    /// Mean per-class F1 on `y_pred` (`zero_division=0`).
    pub macro_f1: f64,
    /// Per-class F1 on `y_pred`.
    pub per_class_f1: Vec<f64>,
    /// Fraction of wrong entries of the `n x c` prediction matrix.
    pub hamming_loss: f64,
    /// Fraction of rows predicted exactly.
    pub subset_accuracy: f64,
}

fn check_binary(field: &'static str, v: &[i64]) -> Result<Vec<bool>> {
    v.iter()
        .enumerate()
        .map(|(index, &value)| match value {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::NotBinary {
                field,
                index,
                value,
            }),
        })
        .collect()
}

/// Computes [`MultilabelMetrics`] from row-major `(n, c)` arrays.
///
/// AUCs rank `y_score`; F1, Hamming loss and subset accuracy use `y_pred`.
///
/// # Errors
/// Mismatched lengths, or labels outside {0, 1}.
pub fn multilabel_metrics(
    y_true: &[i64],
    y_score: &[f64],
    y_pred: &[i64],
    n_classes: usize,
) -> Result<MultilabelMetrics> {
    let total = y_true.len();
    for (field, found) in [("y_score", y_score.len()), ("y_pred", y_pred.len())] {
        if found != total {
            return Err(Error::Shape {
                field,
                expected: total,
                found,
            });
        }
    }
    if n_classes == 0 || !total.is_multiple_of(n_classes) {
        return Err(Error::Shape {
            field: "y_true",
            expected: n_classes,
            found: total,
        });
    }
    let yt = check_binary("y_true", y_true)?;
    let yp = check_binary("y_pred", y_pred)?;
    let n = total / n_classes;
    let col =
        |v: &[bool], c: usize| -> Vec<bool> { (0..n).map(|r| v[r * n_classes + c]).collect() };
    let mut per_class_auc = Vec::with_capacity(n_classes);
    let mut per_class_f1 = Vec::with_capacity(n_classes);
    let mut skipped = Vec::new();
    for c in 0..n_classes {
        let t = col(&yt, c);
        let s: Vec<f64> = (0..n).map(|r| y_score[r * n_classes + c]).collect();
        let auc = roc_auc(&t, &s);
        if auc.is_none() {
            skipped.push(c);
        }
        per_class_auc.push(auc);
        per_class_f1.push(f1_binary(&t, &col(&yp, c)));
    }
    let kept: Vec<f64> = per_class_auc.iter().flatten().copied().collect();
    let macro_auc = (!kept.is_empty()).then(|| kept.iter().sum::<f64>() / kept.len() as f64);
    let wrong = yt.iter().zip(&yp).filter(|(a, b)| a != b).count();
    let exact = (0..n)
        .filter(|&r| (0..n_classes).all(|c| yt[r * n_classes + c] == yp[r * n_classes + c]))
        .count();
    Ok(MultilabelMetrics {
        macro_auc,
        per_class_auc,
        auc_skipped_classes: skipped,
        macro_f1: per_class_f1.iter().sum::<f64>() / n_classes as f64,
        per_class_f1,
        hamming_loss: if total == 0 {
            0.0
        } else {
            wrong as f64 / total as f64
        },
        subset_accuracy: if n == 0 { 0.0 } else { exact as f64 / n as f64 },
    })
}

/// Multiple-choice accuracy; `y_pred = -1` (unparsable answer) always counts as wrong.
///
/// # Errors
/// Mismatched lengths.
pub fn multiple_choice_accuracy(y_true: &[i64], y_pred: &[i64]) -> Result<f64> {
    if y_true.len() != y_pred.len() {
        return Err(Error::Shape {
            field: "y_pred",
            expected: y_true.len(),
            found: y_pred.len(),
        });
    }
    if y_true.is_empty() {
        return Ok(0.0);
    }
    let right = y_true
        .iter()
        .zip(y_pred)
        .filter(|(t, p)| *p >= &0 && t == p)
        .count();
    Ok(right as f64 / y_true.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_hand_worked() {
        // sklearn: roc_auc_score([0,0,1,1],[0.1,0.4,0.35,0.8]) == 0.75
        let auc = roc_auc(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]);
        assert_eq!(auc, Some(0.75));
        // ties count 1/2: hard predictions -> balanced accuracy
        let auc = roc_auc(&[false, true, true, false], &[0.0, 1.0, 0.0, 0.0]);
        assert_eq!(auc, Some(0.75));
        assert_eq!(roc_auc(&[true, true], &[0.1, 0.2]), None);
    }

    #[test]
    fn f1_zero_division_is_zero() {
        assert_eq!(f1_binary(&[false, false], &[false, false]), 0.0);
        assert_eq!(f1_binary(&[true, false], &[true, true]), 2.0 / 3.0);
    }

    #[test]
    fn rejects_non_binary_and_shape() {
        assert_eq!(
            multilabel_metrics(&[0, 2], &[0.0, 0.0], &[0, 0], 2).unwrap_err(),
            Error::NotBinary {
                field: "y_true",
                index: 1,
                value: 2
            }
        );
        assert!(multiple_choice_accuracy(&[0], &[]).is_err());
        assert_eq!(
            multiple_choice_accuracy(&[0, 1, 2], &[0, -1, 1]),
            Ok(1.0 / 3.0)
        );
    }
}
