//! `evl-ecg eval`: a saved model over a labelled dataset, optionally under perturbations.
//!
//! Writes what a user needs to compare models: the predictions in PULSE's output format (so
//! `evl-ecg score ecgbench --task ptb` reads them), gold items in ECG-Bench's format, and a
//! metrics JSON with the continuous metrics, per-class rows, the reliability diagram, per-class
//! thresholds chosen on the validation split, and for each perturbation the change of every
//! metric with a paired bootstrap interval (the same resampled records on both sides).

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use ecg_io::labels::ptbxl::Split;
use ecg_signal::perturb::Perturbation;
use evl_eval::continuous;

use crate::bundle::ModelBundle;
use crate::eval::{PredLine, evaluate};
use crate::input::{Labelled, samples_from_records};
use crate::{Error, Result};

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Split of an index / synthetic directory (`None` = every entry).
    pub split: Option<Split>,
    /// At most this many records (in the dataset's order).
    pub limit: Option<usize>,
    /// Perturbations, each evaluated separately against the clean run.
    pub perturb: Vec<Perturbation>,
    /// Seed of the perturbations' random parts and of the bootstrap.
    pub seed: u64,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// Accept records whose checksum does not match.
    pub no_verify: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            split: Some(Split::Test),
            limit: None,
            perturb: Vec::new(),
            seed: 0,
            resamples: 1000,
            no_verify: false,
        }
    }
}

pub use evl_run::{ClassRow, DatasetEval, Delta, PerturbResult};

/// Records of a data spec with their labels (see [`ecg_data::labelled`] for what a spec can be).
pub fn load_labelled(
    spec: &Path,
    split: Option<Split>,
    limit: Option<usize>,
    no_verify: bool,
) -> Result<Vec<Labelled>> {
    Ok(ecg_data::labelled::load_labelled(
        spec,
        ecg_data::labelled::LoadOptions {
            split,
            limit,
            verify_checksum: !no_verify,
        },
    )?)
}

/// The metrics compared under perturbation, on a subset of rows.
fn metric_values(lines: &[PredLine], rows: &[usize], space: &[String]) -> Vec<Option<f64>> {
    let sub: Vec<PredLine> = rows.iter().map(|&r| lines[r].clone()).collect();
    let k = space.len();
    let mut y_true = Vec::with_capacity(sub.len() * k);
    let mut y_score = Vec::with_capacity(sub.len() * k);
    let mut y_pred = Vec::with_capacity(sub.len() * k);
    for l in &sub {
        for (j, c) in space.iter().enumerate() {
            y_true.push(l.gold.contains(c) as i64);
            y_score.push(l.probs[j]);
            y_pred.push((l.probs[j] >= 0.5) as i64);
        }
    }
    let yb: Vec<bool> = y_true.iter().map(|&v| v == 1).collect();
    let m = evl_eval::multilabel_metrics(&y_true, &y_score, &y_pred, k).ok();
    let sp: Vec<&str> = space.iter().map(String::as_str).collect();
    let pred: Vec<Vec<String>> = sub
        .iter()
        .map(|l| evl_eval::ecgbench::find_labels(&sp, &l.text))
        .collect();
    let gold: Vec<Vec<String>> = sub
        .iter()
        .map(|l| evl_eval::ecgbench::find_labels(&sp, &l.gold.join(", ")))
        .collect();
    let (f1, _, _, _) = evl_eval::ecgbench::compute_f1_auc(&pred, &gold);
    vec![
        m.as_ref().and_then(|m| m.macro_auc),
        continuous::macro_average_precision(&yb, &y_score, k).0,
        Some(continuous::fmax(&yb, &y_score, k)),
        m.as_ref().map(|m| m.macro_f1),
        Some(continuous::expected_calibration_error(&yb, &y_score, 10).0),
        Some(f1),
    ]
}

const METRICS: [&str; 6] = [
    "macro_auc",
    "macro_ap",
    "fmax",
    "macro_f1_at_05",
    "ece",
    "parity_f1",
];

/// Paired bootstrap of every metric's change between two prediction sets of the same records.
pub fn paired_deltas(
    clean: &[PredLine],
    pert: &[PredLine],
    space: &[String],
    resamples: usize,
    seed: u64,
) -> Vec<Delta> {
    let all: Vec<usize> = (0..clean.len()).collect();
    let (c0, p0) = (
        metric_values(clean, &all, space),
        metric_values(pert, &all, space),
    );
    // One pass per resample for every metric (same draws as a per-metric bootstrap).
    let cis = continuous::bootstrap_ci_many(
        clean.len(),
        METRICS.len(),
        |rows| {
            let (a, b) = (
                metric_values(clean, rows, space),
                metric_values(pert, rows, space),
            );
            a.into_iter().zip(b).map(|(a, b)| Some(b? - a?)).collect()
        },
        resamples,
        0.95,
        seed,
    );
    METRICS
        .iter()
        .zip(cis)
        .enumerate()
        .map(|(i, (name, ci))| Delta {
            metric: name.to_string(),
            clean: c0[i],
            perturbed: p0[i],
            delta: c0[i].zip(p0[i]).map(|(a, b)| b - a),
            ci95: (ci.lo.is_finite() && ci.hi.is_finite()).then_some((ci.lo, ci.hi)),
        })
        .collect()
}

/// Gold items in ECG-Bench's format (`id`, `conversations`), for `score ecgbench`.
fn write_gold(path: &Path, lines: &[PredLine]) -> Result<()> {
    let items: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            serde_json::json!({
                "id": l.question_id,
                "conversations": [
                    {"from": "human", "value": l.prompt},
                    {"from": "gpt", "value": l.gold.join(", ")},
                ],
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&items).expect("plain data");
    Ok(evl_run::atomic_write(path, text.as_bytes())?)
}

fn file_name(spec: &str) -> String {
    spec.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A model `eval_dataset` can score: its label space and its predictions (per-label
/// probabilities and the greedy diagnosis) for labelled records.
pub trait Scorable {
    /// The labels it gives probabilities for.
    fn space(&self) -> &[String];
    /// One prediction line per record, in order.
    ///
    /// # Errors
    /// A record that cannot be prepared for the model.
    fn predict(&self, records: Vec<Labelled>, device: &Device) -> Result<Vec<PredLine>>;
}

impl Scorable for ModelBundle {
    fn space(&self) -> &[String] {
        &self.space
    }

    fn predict(&self, records: Vec<Labelled>, device: &Device) -> Result<Vec<PredLine>> {
        let samples = samples_from_records(records, &self.spec, 2)?;
        Ok(evaluate(&self.model, &self.tok, &samples, &self.space, device).1)
    }
}

/// The native engine (f32 or int8 weights): the same questions as [`ModelBundle`]'s burn
/// path, records prepared and answered in parallel on the CPU.
impl Scorable for crate::bundle::Engine {
    fn space(&self) -> &[String] {
        &self.space
    }

    fn predict(&self, records: Vec<Labelled>, _device: &Device) -> Result<Vec<PredLine>> {
        use rayon::prelude::*;
        let samples = samples_from_records(records, &self.spec, 2)?;
        Ok(samples
            .par_iter()
            .map(|s| {
                let r = self.read(s, None);
                PredLine {
                    question_id: s.id.clone(),
                    prompt: r.question,
                    text: r.answer,
                    probs: r.probabilities.into_iter().map(|(_, p)| p).collect(),
                    gold: s.labels.clone(),
                }
            })
            .collect())
    }
}

impl Scorable for crate::hf::HfBundle {
    fn space(&self) -> &[String] {
        &self.space
    }

    /// Each record rendered as ECG paper, asked the same questions as the built-in models.
    fn predict(&self, records: Vec<Labelled>, device: &Device) -> Result<Vec<PredLine>> {
        records
            .into_iter()
            .map(|(rec, labels, _)| {
                let image = self.prepare_record(&rec)?;
                let r = self.interpret(
                    &rec.name,
                    &image,
                    crate::text::DIAGNOSIS_PROMPT,
                    &self.space,
                    device,
                )?;
                Ok(PredLine {
                    question_id: rec.name.clone(),
                    prompt: crate::text::DIAGNOSIS_PROMPT.to_string(),
                    text: r.answer,
                    probs: r.probabilities.into_iter().map(|(_, p)| p).collect(),
                    gold: labels,
                })
            })
            .collect()
    }
}

/// Evaluate `bundle` on `data`; with `out`, write `predictions.jsonl`, `gold.json`,
/// `predictions-<perturbation>.jsonl` and `metrics.json` there.
pub fn eval_dataset<B: Scorable>(
    bundle: &B,
    model_dir: &Path,
    data: &Path,
    opts: &EvalOptions,
    out: Option<&Path>,
    device: &Device,
    mut say: impl FnMut(&str),
) -> Result<DatasetEval> {
    let space = &bundle.space().to_vec();
    let records = load_labelled(data, opts.split, opts.limit, opts.no_verify)?;
    let outside_space = records
        .iter()
        .filter(|(_, l, _)| !l.iter().any(|x| space.contains(x)))
        .count();
    if outside_space == records.len() {
        return Err(Error::Config {
            field: "data",
            what: format!(
                "none of the {} records of {} carries a label of the model's label space {:?} \
                 (labels seen: {:?}); nothing can be scored",
                records.len(),
                data.display(),
                space,
                records
                    .iter()
                    .flat_map(|(_, l, _)| l.iter().cloned())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .take(8)
                    .collect::<Vec<_>>()
            ),
        });
    }
    if let Some(o) = out {
        std::fs::create_dir_all(o).map_err(|source| Error::Io {
            path: o.to_path_buf(),
            source,
        })?;
    }
    // Thresholds from the validation split, when the data has one and the test split is asked.
    let (mut thresholds, mut n_val) = (None, 0);
    if opts.split == Some(Split::Test)
        && let Ok(val) = load_labelled(data, Some(Split::Val), opts.limit, opts.no_verify)
    {
        n_val = val.len();
        let vl = bundle.predict(val, device)?;
        let (yt, ys) = flat(&vl, space);
        thresholds = Some(continuous::best_thresholds(&yt, &ys, space.len()));
        say(&format!("thresholds chosen on {n_val} validation records"));
    }
    let t = Instant::now();
    let lines = bundle.predict(records.clone(), device)?;
    let scores = crate::eval::score_lines(&lines, space);
    let ms_per_record = t.elapsed().as_secs_f64() * 1e3 / lines.len().max(1) as f64;
    say(&format!(
        "clean: {} records, macro AUC {}, parity F1 {:.3}",
        lines.len(),
        fmt_opt(scores.macro_auc),
        scores.parity_f1
    ));
    if scores.ignores_input() {
        say(&format!(
            "WARNING: the model's probabilities do not depend on the record (largest per-class \
             sd across {} records {:.1e} < {:.0e}): it answers every ECG alike, so its scores \
             measure ties, not reading; check its training (and that --data is what it reads)",
            lines.len(),
            scores.prob_spread.unwrap_or(0.0),
            evl_eval::continuous::INPUT_INDEPENDENT_SD
        ));
    }
    let (yt, ys) = flat(&lines, space);
    let k = space.len();
    let (_, per_ap) = continuous::macro_average_precision(&yt, &ys, k);
    let per_class = space
        .iter()
        .enumerate()
        .map(|(c, label)| ClassRow {
            label: label.clone(),
            positives: (0..lines.len()).filter(|&r| yt[r * k + c]).count(),
            auc: scores.per_class_auc.get(c).copied().flatten(),
            ap: per_ap.get(c).copied().flatten(),
            val_threshold: thresholds.as_ref().map(|t| t[c]),
        })
        .collect();
    let macro_f1_at_val_thresholds = thresholds
        .as_ref()
        .map(|t| continuous::macro_f1_at(&yt, &ys, t));
    let (_, reliability) = continuous::expected_calibration_error(&yt, &ys, 10);
    if let Some(o) = out {
        let dir = evl_run::RunDir::new(o);
        evl_run::write_jsonl(&dir.eval_predictions(), &lines)?;
        write_gold(&dir.gold(), &lines)?;
    }
    let mut perturbations = Vec::new();
    for p in &opts.perturb {
        let spec = p.to_string();
        let recs: Vec<Labelled> = records
            .iter()
            .map(|(r, l, f)| {
                let mut r = r.clone();
                p.apply(&mut r, opts.seed);
                (r, l.clone(), f.clone())
            })
            .collect();
        let plines = bundle.predict(recs, device)?;
        let pscores = crate::eval::score_lines(&plines, space);
        let deltas = paired_deltas(&lines, &plines, space, opts.resamples, opts.seed);
        let predictions = match out {
            Some(o) => {
                let path = evl_run::RunDir::new(o).perturbed_predictions(&file_name(&spec));
                evl_run::write_jsonl(&path, &plines)?;
                Some(path)
            }
            None => None,
        };
        let d = &deltas[0];
        say(&format!(
            "{spec}: macro AUC {} (change {}{})",
            fmt_opt(pscores.macro_auc),
            fmt_opt(d.delta),
            d.ci95.map_or(String::new(), |(a, b)| format!(
                ", 95% CI {a:+.3} .. {b:+.3}"
            ))
        ));
        perturbations.push(PerturbResult {
            spec,
            scores: pscores,
            deltas,
            predictions,
        });
    }
    let result = DatasetEval {
        model: model_dir.to_path_buf(),
        data: data.to_path_buf(),
        split: opts.split.map_or("all".into(), |s| s.name().to_string()),
        space: space.clone(),
        n: lines.len(),
        outside_space,
        scores,
        per_class,
        macro_f1_at_val_thresholds,
        n_val,
        reliability,
        perturbations,
        ms_per_record,
    };
    if let Some(o) = out {
        evl_run::write_json(&evl_run::RunDir::new(o).eval_metrics(), &result)?;
    }
    Ok(result)
}

fn flat(lines: &[PredLine], space: &[String]) -> (Vec<bool>, Vec<f64>) {
    let mut yt = Vec::with_capacity(lines.len() * space.len());
    let mut ys = Vec::with_capacity(lines.len() * space.len());
    for l in lines {
        for (j, c) in space.iter().enumerate() {
            yt.push(l.gold.contains(c));
            ys.push(l.probs[j]);
        }
    }
    (yt, ys)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.3}"))
}
