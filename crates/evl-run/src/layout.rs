//! Where each file of a run directory lives: the one place file names are written.

use std::path::{Path, PathBuf};

/// The output directory of `evl-ecg quickstart` or `evl-ecg eval --out`.
///
/// ```text
/// results.json            Results (quickstart)
/// report.md               Markdown tables (quickstart)
/// analysis.json           Analysis (quickstart)
/// metrics.json            DatasetEval (eval --out)
/// predictions.jsonl       PredLine per record (eval --out)
/// predictions/NAME.jsonl  PredLine per record, one file per model (quickstart)
/// runs/NAME/              metrics.jsonl and the checkpoint files of one distillation (quickstart)
/// model/                  the model bundle of the headline student
/// data/                   the synthetic records (quickstart)
/// report/                 the HTML report
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// A run directory at `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }
    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `results.json`.
    pub fn results(&self) -> PathBuf {
        self.root.join("results.json")
    }
    /// `report.md`.
    pub fn report_md(&self) -> PathBuf {
        self.root.join("report.md")
    }
    /// `analysis.json`.
    pub fn analysis(&self) -> PathBuf {
        self.root.join("analysis.json")
    }
    /// `metrics.json` (an evaluation's [`crate::DatasetEval`]).
    pub fn eval_metrics(&self) -> PathBuf {
        self.root.join("metrics.json")
    }
    /// `predictions.jsonl` (an evaluation's clean predictions).
    pub fn eval_predictions(&self) -> PathBuf {
        self.root.join("predictions.jsonl")
    }
    /// `predictions-SPEC.jsonl`: predictions under one perturbation.
    pub fn perturbed_predictions(&self, file_stem: &str) -> PathBuf {
        self.root.join(format!("predictions-{file_stem}.jsonl"))
    }
    /// `gold.json`: gold labels in ECG-Bench's form.
    pub fn gold(&self) -> PathBuf {
        self.root.join("gold.json")
    }
    /// `predictions/NAME.jsonl`: one model's predictions in a quickstart.
    pub fn predictions(&self, name: &str) -> PathBuf {
        self.root.join("predictions").join(format!("{name}.jsonl"))
    }
    /// `runs/`.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }
    /// `runs/NAME/`: one training run.
    pub fn run(&self, name: &str) -> TrainRunDir {
        TrainRunDir::new(self.runs_dir().join(name))
    }
    /// `model/`: the headline model bundle.
    pub fn model(&self) -> PathBuf {
        self.root.join("model")
    }
    /// `data/`: the synthetic records of a quickstart.
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    /// `report/`: the HTML report's default place.
    pub fn report(&self) -> PathBuf {
        self.root.join("report")
    }
}

/// One training run (`evl-ecg train`, `evl-ecg distill`, or a quickstart's `runs/NAME/`).
///
/// ```text
/// metrics.jsonl       StepLog per optimiser step
/// val_metrics.json    EvalScores on the validation split (jobs, when the data has one)
/// config.toml         the resolved job configuration (jobs)
/// model/              the trained model bundle (jobs)
/// checkpoint/         resumable state: model.safetensors, model.bpk, optimizer.bpk, state.json
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainRunDir {
    root: PathBuf,
}

impl TrainRunDir {
    /// A training run directory at `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        TrainRunDir { root: root.into() }
    }
    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `metrics.jsonl`.
    pub fn step_logs(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// `val_metrics.json`.
    pub fn val_metrics(&self) -> PathBuf {
        self.root.join("val_metrics.json")
    }
    /// `config.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// `model/`.
    pub fn model(&self) -> PathBuf {
        self.root.join("model")
    }
    /// `checkpoint/`.
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    /// `checkpoint/state.json` inside a checkpoint directory `dir`.
    pub fn state_in(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }
}
