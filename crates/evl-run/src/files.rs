//! One type per file of a run directory (see [`crate::RunDir`] for where each lives).
//!
//! Every struct refuses unknown fields and has no field defaults, so that a field renamed on
//! one side is an error on the other. The schema version is not a field: [`crate::write_json`]
//! and [`crate::write_jsonl`] add it and the readers check it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use evl_eval::continuous::ReliabilityBin;
use serde::{Deserialize, Serialize};

use crate::RunFile;

/// JSON has no NaN: serde_json writes a NaN `f64` as `null` and then refuses to read `null`
/// back as an `f64`. A diverged loss or an undefined timing is a legitimate NaN, so these
/// fields write NaN as `null` and read `null` as NaN.
mod nan {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_nan() {
            s.serialize_none()
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    /// The same for named terms (`[["ce", 0.4], ["ot", null]]`).
    pub mod terms {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        pub fn serialize<S: Serializer>(v: &[(String, f64)], s: S) -> Result<S::Ok, S::Error> {
            let out: Vec<(&str, Option<f64>)> = v
                .iter()
                .map(|(k, x)| (k.as_str(), (!x.is_nan()).then_some(*x)))
                .collect();
            out.serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<(String, f64)>, D::Error> {
            let v = Vec::<(String, Option<f64>)>::deserialize(d)?;
            Ok(v.into_iter()
                .map(|(k, x)| (k, x.unwrap_or(f64::NAN)))
                .collect())
        }
    }
}

/// One optimiser step: a line of `metrics.jsonl`, also kept in [`CheckpointState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepLog {
    /// Step (1-based).
    pub step: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Total loss (NaN when it diverged).
    #[serde(with = "nan")]
    pub total: f64,
    /// Cross-entropy term.
    #[serde(with = "nan")]
    pub ce: f64,
    /// Other terms by name (`mhca`, `rel`, `ot`, `kd`, a baseline's name).
    #[serde(with = "nan::terms")]
    pub terms: Vec<(String, f64)>,
    /// Wall time of the step, ms.
    pub ms: f64,
}

impl RunFile for StepLog {
    const KIND: &'static str = "step log";
}

/// `checkpoint/state.json`: the resumable part of a run besides the weights and the
/// optimiser state (written last, so its presence marks a complete checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// Completed optimiser steps.
    pub step: usize,
    /// Logs so far.
    pub logs: Vec<StepLog>,
}

impl RunFile for CheckpointState {
    const KIND: &'static str = "checkpoint state";
}

/// One prediction: a line of `predictions*.jsonl` (PULSE's output format, `question_id`,
/// `prompt`, `text`, plus our per-label probabilities and the gold labels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredLine {
    /// Question id (the record id).
    pub question_id: String,
    /// Prompt.
    pub prompt: String,
    /// Generated answer.
    pub text: String,
    /// Per-label probabilities (label space order).
    pub probs: Vec<f64>,
    /// Gold labels.
    pub gold: Vec<String>,
}

impl RunFile for PredLine {
    const KIND: &'static str = "prediction";
}

/// Scores of one evaluation (`val_metrics.json` of a training job; inside [`DatasetEval`]
/// and [`RunResult`]). Continuous-score and ECG-Bench parity metrics are kept apart by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalScores {
    /// Examples.
    pub n: usize,
    /// Macro ROC AUC over probabilities (None if no class has both values).
    pub macro_auc: Option<f64>,
    /// Per-class ROC AUC (None = skipped).
    pub per_class_auc: Vec<Option<f64>>,
    /// Macro F1 of probabilities thresholded at 0.5.
    #[serde(with = "nan")]
    pub macro_f1_at_05: f64,
    /// Subset accuracy at 0.5.
    #[serde(with = "nan")]
    pub subset_accuracy: f64,
    /// ECG-Bench parity F1 of the generated answers.
    #[serde(with = "nan")]
    pub parity_f1: f64,
    /// ECG-Bench parity "AUC" of 0/1 answers (None = NaN in the script).
    pub parity_auc_binary: Option<f64>,
    /// ECG-Bench parity Hamming loss.
    #[serde(with = "nan")]
    pub parity_hamming: f64,
    /// Macro average precision (PR AUC) over classes with positives.
    pub macro_ap: Option<f64>,
    /// Fmax over thresholds 0..1 (PTB-XL benchmark definition).
    #[serde(with = "nan")]
    pub fmax: f64,
    /// Expected calibration error of the per-label probabilities (10 bins).
    #[serde(with = "nan")]
    pub ece: f64,
    /// 95% percentile bootstrap interval of the macro ROC AUC (1000 resamples of records,
    /// seed 0).
    pub macro_auc_ci95: Option<(f64, f64)>,
    /// The largest per-class standard deviation of the probabilities across records (None
    /// with fewer than two records). Below
    /// [`INPUT_INDEPENDENT_SD`](evl_eval::continuous::INPUT_INDEPENDENT_SD) the model gives
    /// every record the same answer: see [`EvalScores::ignores_input`].
    #[serde(default)]
    pub prob_spread: Option<f64>,
}

impl EvalScores {
    /// True when the probabilities do not depend on the record (a model that did not learn
    /// to read the ECG); its AUC measures nothing but ties.
    pub fn ignores_input(&self) -> bool {
        self.prob_spread
            .is_some_and(|s| s < evl_eval::continuous::INPUT_INDEPENDENT_SD)
    }
}

impl RunFile for EvalScores {
    const KIND: &'static str = "evaluation scores";
}

/// One class's row of [`DatasetEval`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRow {
    /// Label.
    pub label: String,
    /// Records with the label.
    pub positives: usize,
    /// ROC AUC of the probabilities (None when the class has one gold value).
    pub auc: Option<f64>,
    /// Average precision (None without positives).
    pub ap: Option<f64>,
    /// Threshold chosen on the validation split (None without one).
    pub val_threshold: Option<f64>,
}

/// A metric's change under a perturbation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    /// Metric name.
    pub metric: String,
    /// Clean value.
    pub clean: Option<f64>,
    /// Perturbed value.
    pub perturbed: Option<f64>,
    /// perturbed - clean.
    pub delta: Option<f64>,
    /// 95% paired percentile bootstrap interval of the change.
    pub ci95: Option<(f64, f64)>,
}

/// One perturbation's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerturbResult {
    /// Canonical spec.
    pub spec: String,
    /// Scores under the perturbation.
    pub scores: EvalScores,
    /// Every metric's change.
    pub deltas: Vec<Delta>,
    /// Predictions file written.
    pub predictions: Option<PathBuf>,
}

/// `metrics.json` of `evl-ecg eval --out`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEval {
    /// Model directory.
    pub model: PathBuf,
    /// Data spec.
    pub data: PathBuf,
    /// Split evaluated (`all` when none).
    pub split: String,
    /// Label space.
    pub space: Vec<String>,
    /// Records evaluated.
    pub n: usize,
    /// Records none of whose labels is in the label space (scored as all-negative).
    pub outside_space: usize,
    /// Clean scores.
    pub scores: EvalScores,
    /// Per-class rows.
    pub per_class: Vec<ClassRow>,
    /// Macro F1 at the per-class thresholds chosen on the validation split.
    pub macro_f1_at_val_thresholds: Option<f64>,
    /// Records of the validation split used for thresholds.
    pub n_val: usize,
    /// Reliability diagram of all per-label probabilities (10 bins).
    pub reliability: Vec<ReliabilityBin>,
    /// Perturbation results.
    pub perturbations: Vec<PerturbResult>,
    /// Mean model time per record (rendering excluded), ms.
    #[serde(with = "nan")]
    pub ms_per_record: f64,
}

impl RunFile for DatasetEval {
    const KIND: &'static str = "evaluation (metrics.json)";
}

/// One distillation run's outcome (a row of [`Results`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunResult {
    /// Method name.
    pub method: String,
    /// Seed.
    pub seed: u64,
    /// Synthetic test scores.
    pub synthetic: EvalScores,
    /// Real PTB-XL scores (None without ../shared).
    pub real: Option<EvalScores>,
    /// Mean wall time per optimiser step, ms (NaN for the reference rows, which are not
    /// distillation runs).
    #[serde(with = "nan")]
    pub ms_per_step: f64,
    /// Peak resident memory of the process after the run, MiB (monotonic, process-wide).
    pub peak_rss_mib: Option<f64>,
    /// Final loss terms.
    #[serde(with = "nan::terms")]
    pub final_terms: Vec<(String, f64)>,
}

/// Model facts in `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactsJson {
    /// Parameters.
    pub params: usize,
    /// Visual tokens.
    pub visual_tokens: usize,
    /// Visual width.
    pub d_vision: usize,
    /// LM width.
    pub d_model: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Input.
    pub input: String,
    /// Mean answer length in tokens over the diagnosis answers of the training set.
    pub mean_answer_tokens: f64,
    /// Mean text length (prompt + answer + specials) over every training turn.
    pub mean_text_tokens: f64,
}

/// `results.json` of the quickstart. `C` is the configuration echoed back: the writer's own
/// typed configuration; a reader that does not need it (the report) reads it as
/// [`serde_json::Value`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Results<C = serde_json::Value> {
    /// Settings.
    pub config: C,
    /// The label space every per-label probability of the run is over.
    pub space: Vec<String>,
    /// Teacher facts.
    pub teacher: FactsJson,
    /// Student facts.
    pub student: FactsJson,
    /// Reference rows: teacher and the student after SFT.
    pub references: Vec<RunResult>,
    /// Distillation runs.
    pub runs: Vec<RunResult>,
    /// Wall time of each stage, s.
    pub stage_seconds: BTreeMap<String, f64>,
    /// Training turns whose teacher and student token counts differ, and all turns.
    pub length_differs: (usize, usize),
    /// Total wall time, s.
    pub wall_seconds: f64,
    /// Notes.
    pub notes: Vec<String>,
    /// Paired comparisons of methods on the same synthetic test records, per seed.
    #[serde(default)]
    pub comparisons: Vec<Comparison>,
    /// The validation search of EVL-ECG's loss weights, every point tried (empty: none ran).
    #[serde(default)]
    pub search: Vec<SearchTrial>,
}

/// One point of the grid search of EVL-ECG's loss weights: a distillation run with these
/// weights scored on the validation records (never the test records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchTrial {
    /// `lm`.
    pub lambda_mhca: f64,
    /// `lr`.
    pub lambda_rel: f64,
    /// `lot`.
    pub lambda_ot: f64,
    /// Seed of the run.
    pub seed: u64,
    /// Validation records scored.
    pub n_val: usize,
    /// Macro ROC AUC on them.
    pub val_macro_auc: Option<f64>,
    /// The point every EVL-ECG run of the comparison then used.
    pub chosen: bool,
}

/// One method against a reference, both trained with the same seed and scored on the same
/// records: the difference of macro ROC AUC with its paired bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Comparison {
    /// The method.
    pub method: String,
    /// The reference it is compared with.
    pub reference: String,
    /// Seed of both runs.
    pub seed: u64,
    /// Test records both were scored on.
    pub n: usize,
    /// Macro ROC AUC of the method minus that of the reference.
    pub delta_macro_auc: Option<f64>,
    /// 95% paired percentile bootstrap interval of the difference (records resampled, both
    /// models scored on each draw).
    pub ci95: Option<(f64, f64)>,
    /// Resamples drawn.
    pub resamples: usize,
}

impl<C: Serialize + serde::de::DeserializeOwned> RunFile for Results<C> {
    const KIND: &'static str = "quickstart results";
}

/// A transport plan for one example (the paper's Figure 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFigure {
    /// Example (record) id.
    pub example: String,
    /// Teacher visual tokens (rows).
    pub rows: usize,
    /// Student visual tokens (columns).
    pub cols: usize,
    /// Row-major plan entries (sum 1).
    pub plan: Vec<f64>,
    /// Sinkhorn entropic regularisation the plan was solved with.
    pub eps: f64,
    /// Sinkhorn iterations used.
    pub n_iter: usize,
    /// Transport cost `sum(P * C)`.
    #[serde(with = "nan")]
    pub cost: f64,
}

/// Normalised singular values of a model's visual features (the paper's Figure 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spectrum {
    /// Model name.
    pub model: String,
    /// Feature width.
    pub width: usize,
    /// Token rows stacked.
    pub rows: usize,
    /// Singular values of the centred `[rows, width]` matrix, descending, divided by the
    /// largest.
    pub singular_values: Vec<f64>,
    /// Effective rank `exp(H(p))`, `p = s / sum(s)` (Roy & Vetterli).
    pub effective_rank: f64,
}

/// `analysis.json`: the data behind the report's method figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// The transport plan figure.
    pub plan: Option<PlanFigure>,
    /// Spectra.
    pub spectra: Vec<Spectrum>,
}

impl RunFile for Analysis {
    const KIND: &'static str = "analysis";
}
