//! ECG-Bench parity scoring: the semantics of PULSE's `evaluation/evaluate_ecgbench.py`
//! (method.md section 6), reimplemented so numbers are comparable with the paper's tables.
//!
//! Faithful on purpose, quirks included:
//! - labels are the label-space strings found as case-sensitive substrings of the text, so
//!   "ABNORMAL" also yields NORM and (CODE-15%) "ST" matches inside "STD";
//! - CODE-15%: only the text after the last `Answer:` counts; NORM only if "ABNORMAL" is absent;
//! - labels are binarised with the classes seen in gold (sorted), predictions outside them are
//!   dropped; "AUC" is the mean over classes of ROC AUC computed on 0/1 predictions
//!   (= balanced accuracy), NaN for a class whose gold column has one value, and the plain
//!   mean then becomes NaN;
//! - multiple choice: the letter cascade of the script; an unparsable answer becomes a letter
//!   drawn by CPython's `random.choice` after `random.seed(42)` (our run seeds once, as if the
//!   script scored only this file); `strict` counts it wrong instead;
//! - ECG-QA: candidates from the prompt after `Options:`; predicted = candidates found in the
//!   lower-cased answer; correct on exact set match with the gold value. When the gold value
//!   is a JSON string the script compares against the set of its *characters*; parity mode
//!   keeps that, `strict` splits it on commas instead.
//!
//! Where the script would crash or silently reuse the previous line's value (a line without
//! `text`/`response`, an ECG-QA line without `prompt`, a question id missing from gold), we
//! return an error naming the file and line instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::pyrandom::PyRandom;

/// ECG-Bench subsets this scorer handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// PTB-XL superclasses (multi-label).
    Ptb,
    /// CPSC-2018 nine classes (multi-label).
    Cpsc,
    /// CODE-15% (multi-label with NORM/ABNORMAL handling).
    Code15,
    /// CSN multiple choice (8 options).
    Csn,
    /// G12EC multiple choice (8 options).
    G12,
    /// MMMU-ECG multiple choice (fallback over 4 options).
    Mmmu,
    /// ECG-QA (set match).
    Ecgqa,
}

impl Task {
    /// Parse a task name.
    pub fn parse(s: &str) -> Option<Task> {
        Some(match s {
            "ptb" => Task::Ptb,
            "cpsc" => Task::Cpsc,
            "code15" => Task::Code15,
            "csn" => Task::Csn,
            "g12" => Task::G12,
            "mmmu" => Task::Mmmu,
            "ecgqa" => Task::Ecgqa,
            _ => return None,
        })
    }

    /// Label space of the multi-label tasks.
    pub fn label_space(self) -> &'static [&'static str] {
        match self {
            Task::Ptb => &["NORM", "MI", "STTC", "CD", "HYP"],
            Task::Cpsc => &[
                "NORM", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE",
            ],
            Task::Code15 => &["1dAVb", "RBBB", "LBBB", "SB", "ST", "AF"],
            _ => &[],
        }
    }

    /// Number of items the script insists on (it skips files with another count).
    pub fn expected_items(self) -> Option<usize> {
        match self {
            Task::Csn => Some(1611),
            Task::G12 => Some(2026),
            Task::Mmmu => Some(200),
            _ => None,
        }
    }
}

/// Errors of reading predictions and gold files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScoreError {
    /// File access.
    #[error("cannot read {}", .path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// JSON that does not parse.
    #[error("{}:{line}: malformed JSON", .path.display())]
    Json {
        /// File.
        path: PathBuf,
        /// 1-based line (0 for a whole-file JSON document).
        line: usize,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// Valid JSON of the other kind: a predictions file where gold was expected, or the
    /// reverse (the two files swapped).
    #[error(
        "{}: this is {found}, not {expected}; were the prediction and gold files swapped?",
        .path.display()
    )]
    WrongKind {
        /// File.
        path: PathBuf,
        /// What was expected.
        expected: &'static str,
        /// What the file is.
        found: &'static str,
    },
    /// A structurally valid item missing what the scorer needs.
    #[error("{}:{line}: {what}", .path.display())]
    Item {
        /// File.
        path: PathBuf,
        /// 1-based line (JSONL) or item index (JSON).
        line: usize,
        /// Problem.
        what: String,
    },
}

/// Gold answer of one item.
#[derive(Debug, Clone, PartialEq)]
pub enum GoldValue {
    /// A string (the usual case).
    Text(String),
    /// A list of strings (ECG-QA answers).
    List(Vec<String>),
}

/// One prediction line.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Question id.
    pub id: String,
    /// Generated text.
    pub text: String,
    /// Prompt text (ECG-QA needs it).
    pub prompt: Option<String>,
}

fn id_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether `text` is JSON Lines whose first object has a `question_id` and a `text` (what
/// [`read_predictions`] reads).
fn looks_like_predictions(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .is_some_and(|v| v.get("question_id").is_some() && v.get("text").is_some())
}

/// Read ECG-Bench gold items (`id` or `No`, `conversations[1].value`).
pub fn read_gold(path: &Path) -> Result<HashMap<String, GoldValue>, ScoreError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|source| {
        if looks_like_predictions(&text) {
            ScoreError::WrongKind {
                path: path.to_path_buf(),
                expected: "a gold file (a JSON array of items)",
                found: "a predictions file (JSON Lines with `question_id` and `text`)",
            }
        } else {
            ScoreError::Json {
                path: path.to_path_buf(),
                line: 0,
                source,
            }
        }
    })?;
    let mut out = HashMap::new();
    for (i, it) in items.iter().enumerate() {
        let bad = |what: &str| ScoreError::Item {
            path: path.to_path_buf(),
            line: i,
            what: what.to_string(),
        };
        // Raw ECG-QA items (`answer` list) are accepted as gold too, keyed by `sample_id`
        // (ECG-QA's `question_id` names the template question and repeats across samples).
        if it.get("conversations").is_none()
            && let (Some(qid), Some(serde_json::Value::Array(ans))) =
                (it.get("sample_id").and_then(id_string), it.get("answer"))
        {
            let list = ans
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("`answer` holds a non-string"))?;
            out.insert(qid, GoldValue::List(list));
            continue;
        }
        let id = it
            .get("id")
            .or_else(|| it.get("No"))
            .and_then(id_string)
            .ok_or_else(|| bad("item has no `id` (or `No`)"))?;
        let conv = it
            .get("conversations")
            .or_else(|| it.get("conversation"))
            .and_then(|c| c.as_array())
            .ok_or_else(|| bad("item has no `conversations` array"))?;
        let v = conv
            .get(1)
            .and_then(|t| t.get("value"))
            .ok_or_else(|| bad("`conversations[1].value` is missing"))?;
        let g = match v {
            serde_json::Value::String(s) => GoldValue::Text(s.clone()),
            serde_json::Value::Array(a) => GoldValue::List(
                a.iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("gold list holds a non-string"))?,
            ),
            _ => return Err(bad("gold value is neither a string nor a list")),
        };
        out.insert(id, g);
    }
    Ok(out)
}

/// Read PULSE output JSONL (`question_id` or `id`; `text` or `response`; `prompt` as a
/// string or `{"prompt": ...}`).
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>, ScoreError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|source| {
            if matches!(
                serde_json::from_str::<serde_json::Value>(&text),
                Ok(serde_json::Value::Array(_))
            ) {
                ScoreError::WrongKind {
                    path: path.to_path_buf(),
                    expected: "a predictions file (JSON Lines)",
                    found: "a gold file (one JSON array of items)",
                }
            } else {
                ScoreError::Json {
                    path: path.to_path_buf(),
                    line: i + 1,
                    source,
                }
            }
        })?;
        let bad = |what: &str| ScoreError::Item {
            path: path.to_path_buf(),
            line: i + 1,
            what: what.to_string(),
        };
        let id = v
            .get("question_id")
            .or_else(|| v.get("id"))
            .and_then(id_string)
            .ok_or_else(|| bad("no `question_id` or `id`"))?;
        let text = v
            .get("text")
            .or_else(|| v.get("response"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad("no `text` or `response` string"))?
            .to_string();
        let prompt = match v.get("prompt") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                o.get("prompt").and_then(|p| p.as_str()).map(str::to_string)
            }
            _ => None,
        };
        out.push(Prediction { id, text, prompt });
    }
    Ok(out)
}

/// The script's letter-extraction cascade.
pub fn extract_choice(text: &str) -> Option<char> {
    const L: [char; 8] = ['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H'];
    let mut it = text.chars();
    if let (Some(c), None) = (it.next(), it.next())
        && L.contains(&c)
    {
        return Some(c);
    }
    for c in L {
        if text.contains(&format!("{c}.")) {
            return Some(c);
        }
    }
    const OPT: &str = "The correct option is ";
    if text.contains(OPT) {
        let last = text.rsplit(OPT).next().unwrap_or("");
        // The script indexes [0]; on an empty tail it would raise. We call it unparsable.
        return last.chars().next().filter(|c| L.contains(c));
    }
    if text.contains("Answer:") {
        let answer = text.rsplit("Answer:").next().unwrap_or("").trim();
        return L.into_iter().find(|c| answer.contains(*c));
    }
    None
}

/// Labels of `space` found as case-sensitive substrings of `text`, in space order.
pub fn find_labels(space: &[&str], text: &str) -> Vec<String> {
    space
        .iter()
        .filter(|l| text.contains(**l))
        .map(|l| l.to_string())
        .collect()
}

/// Per-class row of a multi-label score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    /// Class name.
    pub class: String,
    /// Gold positives.
    pub support: usize,
    /// F1 (0 when undefined).
    pub f1: f64,
    /// ROC AUC of the 0/1 predictions; `None` (NaN in the script) when gold has one value.
    pub auc_binary: Option<f64>,
}

/// Result of a parity scoring run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParityScore {
    /// Task.
    pub task: Task,
    /// Items scored.
    pub n: usize,
    /// Multi-label: macro F1 (per-class F1 averaged).
    pub f1: Option<f64>,
    /// Multi-label: mean per-class ROC AUC of 0/1 predictions; `None` stands for NaN.
    pub auc_binary: Option<f64>,
    /// Multi-label: Hamming loss.
    pub hamming_loss: Option<f64>,
    /// Multiple choice / ECG-QA accuracy.
    pub accuracy: Option<f64>,
    /// Multi-label classes (sorted, as the binariser fitted on gold has them).
    pub classes: Vec<ClassScore>,
    /// Answers no rule could parse (multiple choice).
    pub unparsable: usize,
    /// Of those, answers replaced by a seeded random letter (0 in strict mode).
    pub random_fallbacks: usize,
    /// Whether strict mode was used.
    pub strict: bool,
    /// What "AUC" means here.
    pub auc_kind: &'static str,
    /// Notes (item-count mismatch the script would skip, quirks hit).
    pub notes: Vec<String>,
}

/// Which AUC the parity scorer reports.
pub const AUC_KIND: &str = "ECG-Bench parity AUC: mean over classes of ROC AUC computed on 0/1 \
     predictions (equals balanced accuracy; NaN if any class has one gold value). Not a \
     probability-based ROC AUC.";

/// numpy's `np.mean` for the short vectors used here (pairwise summation for n >= 8, plain
/// left-to-right otherwise), so the means agree to the last bit in the usual cases.
fn np_mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let sum = if v.len() < 8 {
        v.iter().fold(0.0, |a, b| a + b)
    } else {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&v[..8]);
        let mut i = 8;
        while i + 8 <= v.len() {
            for k in 0..8 {
                r[k] += v[i + k];
            }
            i += 8;
        }
        let mut s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for x in &v[i..] {
            s += x;
        }
        s
    };
    sum / v.len() as f64
}

/// Binarise, then F1 / AUC-of-0/1 / Hamming exactly as the script's `compute_f1_auc`.
pub fn compute_f1_auc(
    pred: &[Vec<String>],
    gold: &[Vec<String>],
) -> (f64, f64, f64, Vec<ClassScore>) {
    let classes: Vec<String> = gold
        .iter()
        .flatten()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let n = gold.len();
    let k = classes.len();
    let idx: BTreeMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let bin = |rows: &[Vec<String>]| -> Vec<Vec<bool>> {
        rows.iter()
            .map(|r| {
                let mut v = vec![false; k];
                for l in r {
                    if let Some(&i) = idx.get(l.as_str()) {
                        v[i] = true;
                    }
                }
                v
            })
            .collect()
    };
    let (yt, yp) = (bin(gold), bin(pred));
    let diff: usize = yt
        .iter()
        .zip(&yp)
        .map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count())
        .sum();
    let hl = diff as f64 / (n * k) as f64;
    let mut rows = Vec::with_capacity(k);
    for (c, name) in classes.iter().enumerate() {
        let (mut tp, mut fp, mut fneg, mut tn) = (0usize, 0usize, 0usize, 0usize);
        for i in 0..n {
            match (yt[i][c], yp[i][c]) {
                (true, true) => tp += 1,
                (false, true) => fp += 1,
                (true, false) => fneg += 1,
                (false, false) => tn += 1,
            }
        }
        let denom = (2 * tp + fp + fneg) as f64;
        let f1 = if denom > 0.0 {
            2.0 * tp as f64 / denom
        } else {
            0.0
        };
        let (pos, neg) = (tp + fneg, fp + tn);
        let auc = if pos == 0 || neg == 0 {
            None
        } else {
            // sklearn's ROC curve through (0,0), (fpr, tpr) at threshold 1, (1,1), integrated
            // by the trapezoid rule.
            let fpr = fp as f64 / neg as f64;
            let tpr = tp as f64 / pos as f64;
            Some(fpr * tpr / 2.0 + (1.0 - fpr) * (1.0 + tpr) / 2.0)
        };
        rows.push(ClassScore {
            class: name.clone(),
            support: pos,
            f1,
            auc_binary: auc,
        });
    }
    let f1 = np_mean(&rows.iter().map(|r| r.f1).collect::<Vec<_>>());
    let auc = np_mean(
        &rows
            .iter()
            .map(|r| r.auc_binary.unwrap_or(f64::NAN))
            .collect::<Vec<_>>(),
    );
    (f1, auc, hl, rows)
}

fn gold_text(g: &GoldValue) -> String {
    match g {
        GoldValue::Text(s) => s.clone(),
        GoldValue::List(v) => v.join(", "),
    }
}

fn score_error(path: &Path, line: usize, what: String) -> ScoreError {
    ScoreError::Item {
        path: path.to_path_buf(),
        line,
        what,
    }
}

/// Score predictions against gold. `pred_path` is used in error messages.
pub fn score(
    task: Task,
    preds: &[Prediction],
    gold: &HashMap<String, GoldValue>,
    strict: bool,
    pred_path: &Path,
) -> Result<ParityScore, ScoreError> {
    let mut out = ParityScore {
        task,
        n: preds.len(),
        f1: None,
        auc_binary: None,
        hamming_loss: None,
        accuracy: None,
        classes: Vec::new(),
        unparsable: 0,
        random_fallbacks: 0,
        strict,
        auc_kind: AUC_KIND,
        notes: Vec::new(),
    };
    let gold_of = |i: usize, p: &Prediction| {
        gold.get(&p.id).ok_or_else(|| {
            score_error(
                pred_path,
                i + 1,
                format!("question id `{}` is not in the gold file", p.id),
            )
        })
    };
    match task {
        Task::Ptb | Task::Cpsc | Task::Code15 => {
            let space = task.label_space();
            let mut pl = Vec::with_capacity(preds.len());
            let mut gl = Vec::with_capacity(preds.len());
            for (i, p) in preds.iter().enumerate() {
                let g = gold_text(gold_of(i, p)?);
                if task == Task::Code15 {
                    gl.push(match g.as_str() {
                        "NORM" => vec!["NORM".to_string()],
                        "ABNORMAL" => vec!["ABNORMAL".to_string()],
                        _ => find_labels(space, &g),
                    });
                    let t = match p.text.rsplit_once("Answer:") {
                        Some((_, tail)) => tail,
                        None => p.text.as_str(),
                    };
                    let mut v = Vec::new();
                    if t.contains("NORM") && !t.contains("ABNORMAL") {
                        v.push("NORM".to_string());
                    } else if t.contains("ABNORMAL") {
                        v.push("ABNORMAL".to_string());
                    }
                    v.extend(find_labels(space, t));
                    pl.push(v);
                } else {
                    gl.push(find_labels(space, &g));
                    pl.push(find_labels(space, &p.text));
                }
            }
            let (f1, auc, hl, rows) = compute_f1_auc(&pl, &gl);
            out.f1 = Some(f1);
            out.auc_binary = (!auc.is_nan()).then_some(auc);
            out.hamming_loss = Some(hl);
            if auc.is_nan() {
                out.notes.push(
                    "AUC is NaN: at least one class has a single gold value (the script's plain mean propagates NaN)"
                        .into(),
                );
            }
            out.classes = rows;
        }
        Task::Csn | Task::G12 | Task::Mmmu => {
            let letters = ['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H'];
            let pool: &[char] = if task == Task::Mmmu {
                &letters[..4]
            } else {
                &letters
            };
            let mut rng = PyRandom::seed(42);
            let mut correct = 0usize;
            for (i, p) in preds.iter().enumerate() {
                let g = gold_of(i, p)?;
                let golden: String = match (task, g) {
                    (Task::Mmmu, GoldValue::Text(s)) => s.clone(),
                    (_, GoldValue::Text(s)) => {
                        s.chars().next().map(String::from).unwrap_or_default()
                    }
                    (_, GoldValue::List(v)) => v.first().cloned().unwrap_or_default(),
                };
                let pred = match extract_choice(&p.text) {
                    Some(c) => Some(c),
                    None => {
                        out.unparsable += 1;
                        if strict {
                            None
                        } else {
                            out.random_fallbacks += 1;
                            Some(*rng.choice(pool))
                        }
                    }
                };
                if pred.is_some_and(|c| golden == c.to_string()) {
                    correct += 1;
                }
            }
            out.accuracy = Some(correct as f64 / preds.len().max(1) as f64);
            if let Some(want) = task.expected_items()
                && want != preds.len()
            {
                out.notes.push(format!(
                    "{} items; the published script silently skips files that do not hold exactly {want}",
                    preds.len()
                ));
            }
        }
        Task::Ecgqa => {
            const TAIL: &str = "Only answer based on the given Options without any explanation.";
            let mut pass = 0usize;
            for (i, p) in preds.iter().enumerate() {
                let g = gold_of(i, p)?;
                let prompt = p.prompt.as_deref().ok_or_else(|| {
                    score_error(
                        pred_path,
                        i + 1,
                        "ECG-QA prediction has no `prompt` (candidates come from it)".into(),
                    )
                })?;
                let opts = prompt
                    .rsplit("Options:")
                    .next()
                    .unwrap_or("")
                    .replace(TAIL, "");
                let cands: Vec<&str> = opts.split(',').map(str::trim).collect();
                let lower = p.text.to_lowercase();
                let predicted: BTreeSet<String> = cands
                    .iter()
                    .filter(|c| lower.contains(**c))
                    .map(|c| c.to_string())
                    .collect();
                let golden: BTreeSet<String> = match g {
                    GoldValue::List(v) => v.iter().cloned().collect(),
                    GoldValue::Text(s) if strict => {
                        s.split(',').map(|x| x.trim().to_string()).collect()
                    }
                    // Python's set(str): the set of characters.
                    GoldValue::Text(s) => s.chars().map(String::from).collect(),
                };
                if predicted == golden {
                    pass += 1;
                }
            }
            out.accuracy = Some(pass as f64 / preds.len().max(1) as f64);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_cascade() {
        assert_eq!(extract_choice("C"), Some('C'));
        assert_eq!(extract_choice("I think B. is right"), Some('B'));
        assert_eq!(extract_choice("A. foo and C. bar"), Some('A'));
        assert_eq!(extract_choice("The correct option is D"), Some('D'));
        assert_eq!(extract_choice("The correct option is x"), None);
        assert_eq!(extract_choice("The correct option is "), None);
        assert_eq!(extract_choice("Answer: maybe E or B"), Some('B'));
        assert_eq!(extract_choice("no idea"), None);
    }

    #[test]
    fn substring_quirks() {
        let ptb = Task::Ptb.label_space();
        assert_eq!(find_labels(ptb, "ABNORMAL ECG"), vec!["NORM"]);
        let code = Task::Code15.label_space();
        assert_eq!(find_labels(code, "STD"), vec!["ST"]);
    }
}
