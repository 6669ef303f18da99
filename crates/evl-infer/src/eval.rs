//! Evaluating a model on labelled samples, two ways kept apart:
//! - continuous: per-label probability = p("yes") / (p("yes") + p("no")) for the verification
//!   question of that label, scored by macro ROC AUC (classes with one gold value skipped and
//!   listed), macro F1 at 0.5, Hamming loss, subset accuracy;
//! - ECG-Bench parity: the greedy answer to the diagnosis question, labels read from it with
//!   the benchmark's substring rule, scored by PULSE's F1 / "AUC of 0/1 answers" / Hamming.
//!
//! It also writes predictions in PULSE's output format so `evl-ecg score ecgbench` reads them.

use burn::tensor::Device;
use evl_models::vlm::EcgVlm;

use crate::input::{Sample, encode_prompt, pixels, text_tensors};
use crate::text::{DIAGNOSIS_PROMPT, EOS, TextTokenizer, verify_prompt};

pub use evl_run::{EvalScores, PredLine};

fn first_token(tok: &TextTokenizer, word: &str) -> i64 {
    tok.encode(word).0.first().copied().unwrap_or(EOS)
}

/// Evaluate `model` (inference mode, on `device`) on `samples` over `space`.
pub fn evaluate(
    model: &EcgVlm,
    tok: &TextTokenizer,
    samples: &[Sample],
    space: &[String],
    device: &Device,
) -> (EvalScores, Vec<PredLine>) {
    let input = model.input();
    let (yes, no) = (first_token(tok, "yes"), first_token(tok, "no"));
    let k = space.len();
    let mut probs = vec![0.0f64; samples.len() * k];
    let prompts: Vec<Vec<i64>> = space
        .iter()
        .map(|l| encode_prompt(tok, &verify_prompt(l)))
        .collect();
    let chunk = (64 / k.max(1)).max(1);
    let dprompt = encode_prompt(tok, DIAGNOSIS_PROMPT);
    let mut lines = Vec::with_capacity(samples.len());
    for (ci, group) in samples.chunks(chunk).enumerate() {
        // One encoder pass per record, shared by its k questions and its generation.
        let refs: Vec<&Sample> = group.iter().collect();
        let visual = model.encode(pixels(&refs, &input, device));
        let [n, v, d] = visual.dims();
        let mut rows = Vec::new();
        for _ in group {
            for p in &prompts {
                // Logit row j predicts token j (from position j - 1), so the first answer
                // token's distribution sits one past the prompt: append a placeholder token
                // (causal attention keeps it from influencing that prediction).
                let mut ids = p.clone();
                ids.push(EOS);
                rows.push((ids, vec![false; p.len() + 1]));
            }
        }
        let lens: Vec<usize> = rows.iter().map(|r| r.0.len() - 1).collect();
        let (text, pad, _, _) = text_tensors(rows, device);
        let repeated = visual
            .clone()
            .unsqueeze_dim::<4>(1)
            .expand([n, k, v, d])
            .reshape([n * k, v, d]);
        let z = model.text_logits(repeated, text, pad);
        let [_, t, vocab] = z.dims();
        let logits: Vec<f32> = z.into_data().iter::<f32>().collect();
        for (r, len) in lens.iter().enumerate() {
            let base = (r * t + len) * vocab;
            let (ly, ln) = (
                logits[base + yes as usize] as f64,
                logits[base + no as usize] as f64,
            );
            let m = ly.max(ln);
            let p = (ly - m).exp() / ((ly - m).exp() + (ln - m).exp());
            let (si, li) = (r / k, r % k);
            probs[(ci * chunk + si) * k + li] = p;
        }
        for (si, s) in group.iter().enumerate() {
            let i = ci * chunk + si;
            let one = visual.clone().slice([si..si + 1, 0..v, 0..d]);
            let ids = model.generate_from_visual(one, &dprompt, EOS, 16);
            lines.push(PredLine {
                question_id: s.id.clone(),
                prompt: DIAGNOSIS_PROMPT.to_string(),
                text: tok.decode(&ids),
                probs: probs[i * k..(i + 1) * k].to_vec(),
                gold: s.labels.clone(),
            });
        }
    }
    (score_lines(&lines, space), lines)
}

/// Metrics of prediction lines.
pub fn score_lines(lines: &[PredLine], space: &[String]) -> EvalScores {
    let k = space.len();
    let mut y_true = Vec::with_capacity(lines.len() * k);
    let mut y_score = Vec::with_capacity(lines.len() * k);
    let mut y_pred = Vec::with_capacity(lines.len() * k);
    for l in lines {
        for (j, c) in space.iter().enumerate() {
            y_true.push(l.gold.contains(c) as i64);
            y_score.push(l.probs[j]);
            y_pred.push((l.probs[j] >= 0.5) as i64);
        }
    }
    let m =
        evl_eval::multilabel_metrics(&y_true, &y_score, &y_pred, k).expect("shapes built above");
    let sp: Vec<&str> = space.iter().map(String::as_str).collect();
    let pred: Vec<Vec<String>> = lines
        .iter()
        .map(|l| evl_eval::ecgbench::find_labels(&sp, &l.text))
        .collect();
    let gold: Vec<Vec<String>> = lines
        .iter()
        .map(|l| evl_eval::ecgbench::find_labels(&sp, &l.gold.join(", ")))
        .collect();
    let (f1, auc, hl, _) = evl_eval::ecgbench::compute_f1_auc(&pred, &gold);
    let yb: Vec<bool> = y_true.iter().map(|&v| v == 1).collect();
    let (macro_ap, _) = evl_eval::continuous::macro_average_precision(&yb, &y_score, k);
    let fmax = evl_eval::continuous::fmax(&yb, &y_score, k);
    let (ece, _) = evl_eval::continuous::expected_calibration_error(&yb, &y_score, 10);
    let ci = evl_eval::continuous::bootstrap_ci(
        lines.len(),
        |rows| {
            let (mut t, mut sc, mut p) = (Vec::new(), Vec::new(), Vec::new());
            for &r in rows {
                t.extend_from_slice(&y_true[r * k..(r + 1) * k]);
                sc.extend_from_slice(&y_score[r * k..(r + 1) * k]);
                p.extend_from_slice(&y_pred[r * k..(r + 1) * k]);
            }
            evl_eval::multilabel_metrics(&t, &sc, &p, k)
                .ok()
                .and_then(|m| m.macro_auc)
        },
        1000,
        0.95,
        0,
    );
    EvalScores {
        macro_ap,
        fmax,
        ece,
        macro_auc_ci95: (ci.lo.is_finite() && ci.hi.is_finite()).then_some((ci.lo, ci.hi)),
        n: lines.len(),
        macro_auc: m.macro_auc,
        per_class_auc: m.per_class_auc,
        macro_f1_at_05: m.macro_f1,
        subset_accuracy: m.subset_accuracy,
        parity_f1: f1,
        parity_auc_binary: (!auc.is_nan()).then_some(auc),
        parity_hamming: hl,
        prob_spread: evl_eval::continuous::probability_spread(&y_score, k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize, probs: Vec<f64>, gold: &str) -> PredLine {
        PredLine {
            question_id: format!("r{i}"),
            prompt: String::new(),
            text: gold.into(),
            probs,
            gold: vec![gold.into()],
        }
    }

    /// A model answering every record alike (the teacher: NORM between 0.38086 and
    /// 0.38096 on every record) is flagged; one whose probabilities follow the record is not.
    #[test]
    fn a_model_that_ignores_its_input_is_flagged() {
        let space: Vec<String> = vec!["NORM".into(), "MI".into()];
        let gold = |i: usize| if i.is_multiple_of(2) { "NORM" } else { "MI" };
        let flat: Vec<PredLine> = (0..40)
            .map(|i| line(i, vec![0.38086 + 1e-5 * (i % 3) as f64, 0.31], gold(i)))
            .collect();
        let s = score_lines(&flat, &space);
        assert!(s.ignores_input(), "{:?}", s.prob_spread);
        let reading: Vec<PredLine> = (0..40)
            .map(|i| {
                let p = if i % 2 == 0 { 0.8 } else { 0.3 };
                line(i, vec![p, 1.0 - p], gold(i))
            })
            .collect();
        let s = score_lines(&reading, &space);
        assert!(!s.ignores_input(), "{:?}", s.prob_spread);
    }
}
