//! `evl-ecg train teacher|student` and `evl-ecg distill`: the paper's two stages as resumable
//! jobs over a user's dataset, configured by a TOML file (every field optional; the defaults
//! are the paper's settings and the quickstart's architectures) plus command-line overrides.
//!
//! Layout of an output directory: `model/` (a bundle `evaluate`/`interpret`/`distill` load),
//! `checkpoint/` (resumable state), `metrics.jsonl` (one line per step), `config.toml` (the
//! resolved configuration), `val_metrics.json` (scores on the validation split, when the data
//! has one).

use std::path::{Path, PathBuf};

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Device;
use ecg_io::labels::ptbxl::Split;
use evl_kd::{Kernel, SinkhornSettings};
use evl_models::vlm::{EcgVlm, EcgVlmConfig, InputKind};

use crate::{Error, Result};
use evl_infer::dataset::load_labelled;
use evl_infer::eval::{EvalScores, evaluate};
use evl_infer::input::{InputSpec, Sample, samples_from_records};
use evl_infer::text::TextTokenizer;
use evl_train::train::{
    Ablation, DistillConfig, Method, OptimConfig, StepLog, Teacher, cache_teacher_at, distill, sft,
};

/// Which model a `train` job builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The large model.
    Teacher,
    /// The small model.
    Student,
}

/// One model's settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `image` (rendered ECG paper) or `signal` (raw 12 leads).
    pub input: String,
    /// BPE vocabulary size of its tokenizer.
    pub vocab: usize,
    /// Architecture override (an `EcgVlmConfig` as JSON-like TOML); default: the built-in
    /// teacher or student for `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<serde_json::Value>,
    /// Channels of the built-in encoder's convolutional stem (0 = linear patch embedding; see
    /// `EcgVlmConfig::stem_channels`: two 1-D convolutions over the signal, or a strided
    /// 2-D stem over the page).
    #[serde(default)]
    pub stem_channels: usize,
    /// SFT optimisation.
    pub optim: OptimConfig,
    /// Vision pre-training before SFT (built-in models; `steps = 0` skips it): the encoder
    /// learns the labels through a linear probe on its mean visual token, as real VLMs'
    /// towers are trained before the language model reads them (`evl_train::pretrain`).
    #[serde(default = "default_pretrain")]
    pub pretrain: OptimConfig,
}

/// The vision pre-training stage's defaults: 300 steps of 32 records at 2e-3 (measured on
/// 1,200 synthetic records at mixed difficulty, 100 Hz signal teacher: probe validation macro
/// AUC 0.975 in 80 s on 2 cores).
pub fn default_pretrain() -> OptimConfig {
    OptimConfig {
        steps: 300,
        batch_size: 32,
        lr: 2e-3,
        warmup: 30,
        checkpoint_every: 100,
        ..OptimConfig::default()
    }
}

/// SFT after vision pre-training: the encoder frozen, every question about a drawn record in
/// one batch (see the quickstart's presets for the measurements).
fn sft_defaults(o: OptimConfig) -> OptimConfig {
    OptimConfig {
        turns_per_record: 6,
        freeze_vision: true,
        ..o
    }
}

/// Distillation settings (paper defaults).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// `evl`, `ce`, `kl`, `uld`, `multilevel-ot`, `tinybert`, `dskd`, `emkd`, or
    /// `evl-no-TERM`.
    pub method: Method,
    /// EVL-ECG terms switched off (`ot`, `mhca`, `rel`), added to those the method names.
    pub ablate: Vec<Ablation>,
    /// `a`, the weight of the distillation term of every method (`1 - a` weighs the CE).
    pub alpha: f64,
    /// `lm`.
    pub lambda_mhca: f64,
    /// `lr`.
    pub lambda_rel: f64,
    /// `lot`.
    pub lambda_ot: f64,
    /// MHCA heads.
    pub heads: usize,
    /// Fused host kernels or burn tensor ops for EVL-ECG's terms: `auto` (fused on the
    /// CPU), `fused`, `graph`.
    pub kernel: Kernel,
    /// Sinkhorn settings of `L_ot` (`[distill.sinkhorn]`: eps, iterations, tolerance,
    /// max_iter, unrolled).
    pub sinkhorn: SinkhornSettings,
    /// KD temperature (`kl`).
    pub temperature: f64,
    /// Run the teacher on every step's batch instead of caching its outputs once.
    pub online: bool,
    /// Divide teacher hidden states by their RMS before `L_mhca` / TinyBERT (not in the paper;
    /// see `DistillConfig::teacher_hidden_rms`).
    pub teacher_hidden_rms: bool,
    /// The teacher's hidden states `L_mhca` / `L_rel` (and the hidden-state baselines) read,
    /// as an index into transformers' `hidden_states` (0 = the decoder's input, k = after
    /// decoder layer k, -1 = after the final norm, the paper's and the default, -2 = the last
    /// layer before it). Built-in models and real checkpoints alike.
    #[serde(default = "last_layer")]
    pub teacher_layer: i64,
    /// The student's, as `teacher_layer`.
    #[serde(default = "last_layer")]
    pub student_layer: i64,
    /// Optimisation.
    pub optim: OptimConfig,
}

fn last_layer() -> i64 {
    -1
}

impl DistillSection {
    /// The run's settings: this section with `method` (its ablations applied) and the hidden
    /// layers resolved against the two models ([`hidden_index`]).
    pub fn run_config(
        &self,
        method: Method,
        teacher_layer: Option<usize>,
        student_layer: Option<usize>,
    ) -> DistillConfig {
        DistillConfig {
            method,
            optim: self.optim.clone(),
            alpha: self.alpha,
            temperature: self.temperature,
            heads: self.heads,
            lambdas: (self.lambda_mhca, self.lambda_rel, self.lambda_ot),
            sinkhorn: self.sinkhorn,
            kernel: self.kernel,
            teacher_hidden_rms: self.teacher_hidden_rms,
            teacher_layer,
            student_layer,
        }
    }
}

/// A hidden-states index of a decoder of `n_layers` layers (`n_layers + 1` entries, Python's
/// negative indices allowed) as a layer for the models' views: `None` for the last entry
/// (after the final norm), else the entry.
///
/// # Errors
/// [`Error::Config`] naming `flag` when `k` is outside the entries.
pub fn hidden_index(k: i64, n_layers: usize, flag: &'static str) -> Result<Option<usize>> {
    let entries = n_layers as i64 + 1;
    let i = if k < 0 { entries + k } else { k };
    if !(0..entries).contains(&i) {
        return Err(Error::Config {
            field: flag,
            what: format!(
                "{k}: the model has hidden_states 0..={} (or -1..=-{entries})",
                entries - 1
            ),
        });
    }
    Ok((i != entries - 1).then_some(i as usize))
}

/// The whole job configuration (`--config FILE.toml`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// Model input sizes.
    pub input: InputSpec,
    /// Teacher.
    pub teacher: ModelSection,
    /// Student.
    pub student: ModelSection,
    /// Distillation.
    pub distill: DistillSection,
}

impl Default for JobConfig {
    fn default() -> Self {
        let o = |steps: usize, lr: f64| OptimConfig {
            steps,
            lr,
            warmup: (steps / 10).max(1),
            checkpoint_every: 50,
            ..OptimConfig::default()
        };
        JobConfig {
            input: InputSpec::default(),
            teacher: ModelSection {
                input: "signal".into(),
                vocab: 320,
                arch: None,
                stem_channels: 0,
                optim: sft_defaults(o(500, 3e-3)),
                pretrain: default_pretrain(),
            },
            student: ModelSection {
                input: "signal".into(),
                vocab: 56,
                arch: None,
                stem_channels: 0,
                optim: sft_defaults(o(200, 3e-3)),
                pretrain: default_pretrain(),
            },
            // The paper's settings, written once in evl-kd and DistillConfig::paper.
            distill: {
                let p = DistillConfig::paper(Method::evl(), o(80, 1e-3));
                DistillSection {
                    method: p.method,
                    ablate: Vec::new(),
                    alpha: p.alpha,
                    lambda_mhca: p.lambdas.0,
                    lambda_rel: p.lambdas.1,
                    lambda_ot: p.lambdas.2,
                    heads: p.heads,
                    kernel: p.kernel,
                    sinkhorn: p.sinkhorn,
                    temperature: p.temperature,
                    online: false,
                    teacher_hidden_rms: p.teacher_hidden_rms,
                    teacher_layer: -1,
                    student_layer: -1,
                    optim: p.optim,
                }
            },
        }
    }
}

impl JobConfig {
    /// The `zoo` preset: the settings of the teacher the project ships (`zoo/teacher`, see its
    /// model card), reading the rendered page as PULSE does. The encoder gets the strided
    /// convolutional stem (128 channels; without it the image teacher stayed at chance),
    /// a long vision pre-training (1,500 steps of 32 records) and then SFT on the frozen
    /// encoder (2,000 steps of 16 records, every question about a record in one batch),
    /// checkpointed every 100 steps so that the hours-long run on 2 cores resumes
    /// (`--resume`) after an interruption. The shipped teacher then had three more stages
    /// through `--init`: 1,500 SFT steps of 64 on the frozen encoder, 500 steps of 32
    /// fine-tuning the whole model at 3e-4, then twice 600 more pre-training steps and 1,000
    /// SFT steps of 64, on 8,000 and on 16,000 records (`zoo/README.md`; `zoo/reproduce.sh`
    /// runs all five).
    ///
    /// The student (`zoo/student`, one command: `train student --preset zoo`) reads the raw
    /// signal: 600 steps of vision pre-training, then 1,000 SFT steps of 64 examples on the
    /// frozen encoder. Measured on 3,000 synthetic records: the default 200 steps of 16 reach
    /// validation macro AUC 0.64, 1,000 of 64 reach 0.90, 2,000 of 64 reach 0.905: the
    /// language model must see many examples to read the encoder out, not the encoder (its
    /// probe: 0.90) that limits it. Distillation keeps the defaults.
    pub fn zoo() -> JobConfig {
        // (steps, batch, lr, warm-up), checkpointed every 100 steps.
        let stage = |steps, batch_size, lr, warmup| OptimConfig {
            steps,
            batch_size,
            lr,
            warmup,
            checkpoint_every: 100,
            ..OptimConfig::default()
        };
        let mut c = JobConfig::default();
        c.teacher.input = "image".into();
        c.teacher.stem_channels = 128;
        c.teacher.pretrain = stage(1500, 32, 2e-3, 100);
        c.teacher.optim = sft_defaults(stage(2000, 16, 2e-3, 100));
        c.student.pretrain = stage(600, 32, 2e-3, 60);
        c.student.optim = sft_defaults(stage(1000, 64, 3e-3, 50));
        c
    }

    /// Read a TOML file: every key is optional (missing ones keep the defaults, section by
    /// section, so `[distill]\nlambda_ot = 0.2` is a whole config); unknown keys are errors
    /// that name the key.
    pub fn from_toml(path: &Path) -> Result<JobConfig> {
        JobConfig::default().overlay_toml(path)
    }

    /// This configuration with the keys of a TOML file laid over it (what `--config` does
    /// on top of a `--preset`).
    pub fn overlay_toml(&self, path: &Path) -> Result<JobConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.overlay_toml_str(&text).map_err(|what| Error::Config {
            field: "config",
            what: format!("{}: {what}", path.display()),
        })
    }

    /// [`JobConfig::from_toml`] on a string.
    pub fn from_toml_str(text: &str) -> std::result::Result<JobConfig, String> {
        JobConfig::default().overlay_toml_str(text)
    }

    /// [`JobConfig::overlay_toml`] on a string.
    pub fn overlay_toml_str(&self, text: &str) -> std::result::Result<JobConfig, String> {
        let user: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut base: toml::Table = toml::from_str(&self.to_toml()).expect("config serialises");
        merge(&mut base, user);
        toml::Value::Table(base)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())
    }

    /// This configuration with `KEY=VALUE` overrides (`--set distill.sinkhorn.eps=0.05`):
    /// KEY is a dotted path into the TOML layout `--print-config` shows, VALUE a TOML value
    /// (a bare word that is not one is taken as a string: `distill.kernel=graph`). Unknown
    /// keys and ill-typed values are errors naming the override.
    pub fn with_overrides(&self, sets: &[String]) -> std::result::Result<JobConfig, String> {
        if sets.is_empty() {
            return Ok(self.clone());
        }
        let mut base: toml::Table = toml::from_str(&self.to_toml()).expect("config serialises");
        for set in sets {
            let (key, value) = set
                .split_once('=')
                .ok_or_else(|| format!("--set `{set}`: expected KEY=VALUE"))?;
            let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
                Ok(mut t) => t.remove("v").expect("parsed key"),
                Err(_) => toml::Value::String(value.to_string()),
            };
            let mut user = toml::Table::new();
            let parts: Vec<&str> = key.trim().split('.').collect();
            if parts.iter().any(|p| p.is_empty()) {
                return Err(format!("--set `{set}`: `{key}` is not a dotted key"));
            }
            let mut node = &mut user;
            for p in &parts[..parts.len() - 1] {
                node = node
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .expect("just inserted a table");
            }
            node.insert(parts[parts.len() - 1].to_string(), value);
            merge(&mut base, user);
            toml::Value::Table(base.clone())
                .try_into::<JobConfig>()
                .map_err(|e| format!("--set `{set}`: {e}"))?;
        }
        toml::Value::Table(base)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("plain data")
    }

    /// Architecture of a role.
    pub fn arch(&self, role: Role) -> Result<EcgVlmConfig> {
        let sec = match role {
            Role::Teacher => &self.teacher,
            Role::Student => &self.student,
        };
        if let Some(a) = &sec.arch {
            let arch: EcgVlmConfig =
                serde_json::from_value(a.clone()).map_err(|e| Error::Config {
                    field: "arch",
                    what: format!("[{role:?}.arch] is not an EcgVlmConfig: {e}"),
                })?;
            return check_stem(arch, role);
        }
        let kind = |patch_img: usize, patch_sig: usize, half: bool| match sec.input.as_str() {
            "signal" => Ok(InputKind::Signal {
                leads: 12,
                samples: self.input.signal_len,
                patch: patch_sig,
            }),
            "image" => Ok(InputKind::Image {
                height: if half {
                    self.input.height / 2
                } else {
                    self.input.height
                },
                width: if half {
                    self.input.width / 2
                } else {
                    self.input.width
                },
                patch: patch_img,
            }),
            other => Err(Error::Config {
                field: "input",
                what: format!("`{other}` (expected image or signal)"),
            }),
        };
        let arch = match role {
            Role::Teacher => teacher_arch(kind(40, 20, false)?, sec.vocab),
            Role::Student => student_arch(kind(40, 80, true)?, sec.vocab),
        };
        check_stem(arch.with_stem_channels(sec.stem_channels), role)
    }
}

/// A model configuration `init` can build (see `EcgVlmConfig::problem`).
fn check_stem(arch: EcgVlmConfig, role: Role) -> Result<EcgVlmConfig> {
    match arch.problem() {
        Some(what) => Err(Error::Config {
            field: "stem_channels",
            what: format!("the {role:?}: {what}"),
        }),
        None => Ok(arch),
    }
}

/// Overlay `user` onto `base`, recursing into tables (so unknown keys survive to be refused
/// by the typed parse).
fn merge(base: &mut toml::Table, user: toml::Table) {
    for (k, v) in user {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The built-in teacher: width 192, 2+2 layers, 4 heads.
pub fn teacher_arch(input: InputKind, vocab: usize) -> EcgVlmConfig {
    EcgVlmConfig::new(input, 192, 2, 4, 192, 2, 4, vocab, 192)
}

/// The built-in student: widths 32/48, 1+2 layers, 2 heads.
pub fn student_arch(input: InputKind, vocab: usize) -> EcgVlmConfig {
    EcgVlmConfig::new(input, 32, 1, 2, 48, 2, 2, vocab, 192)
}

/// Where a job's files go.
#[derive(Debug, Clone)]
pub struct JobDirs {
    /// Output root.
    pub out: PathBuf,
}

impl JobDirs {
    /// Model bundle.
    pub fn model(&self) -> PathBuf {
        self.out.join("model")
    }
    /// Resumable state.
    pub fn checkpoint(&self) -> PathBuf {
        self.out.join("checkpoint")
    }
}

/// What a job reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobOutcome {
    /// Output directory.
    pub out: PathBuf,
    /// Steps run in total.
    pub steps: usize,
    /// Final step's loss terms.
    pub final_log: Option<StepLog>,
    /// Validation scores (when the data has a validation split).
    pub val: Option<EvalScores>,
    /// Model parameters.
    pub params: usize,
    /// Stopped before the last step (checkpoint written, run again to resume).
    pub stopped: bool,
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn load_split(data: &Path, split: Split, spec: &InputSpec, seed: u64) -> Result<Vec<Sample>> {
    Ok(samples_from_records(
        load_labelled(data, Some(split), None, false)?,
        spec,
        seed,
    )?)
}

/// Where training data comes from.
#[derive(Debug, Clone, Copy)]
pub enum TrainData<'a> {
    /// Labelled records (`data synth` directory or `data import` index) with splits; the
    /// conversations are generated from the labels.
    Labelled(&'a Path),
    /// ECGInstruct-style conversations (JSON/JSONL) with their images under a root; every item
    /// trains, no validation split.
    Conversations {
        /// The conversation file.
        file: &'a Path,
        /// Image root.
        image_root: &'a Path,
    },
}

impl TrainData<'_> {
    fn train(&self, spec: &InputSpec) -> Result<Vec<Sample>> {
        match self {
            TrainData::Labelled(d) => load_split(d, Split::Train, spec, 1),
            TrainData::Conversations { file, image_root } => Ok(
                evl_infer::input::conversation_samples(file, image_root, spec)?,
            ),
        }
    }

    fn labelled(&self) -> Option<&Path> {
        match self {
            TrainData::Labelled(d) => Some(d),
            TrainData::Conversations { .. } => None,
        }
    }
}

fn validate(
    model: &EcgVlm,
    tok: &TextTokenizer,
    data: &Path,
    spec: &InputSpec,
    out: &Path,
    device: &Device,
) -> Result<Option<EvalScores>> {
    let Ok(val) = load_split(data, Split::Val, spec, 2) else {
        return Ok(None);
    };
    let (scores, _) = evaluate(
        model,
        tok,
        &val,
        &evl_infer::text::superclass_space(),
        device,
    );
    evl_run::write_json(&evl_run::TrainRunDir::new(out).val_metrics(), &scores)?;
    Ok(Some(scores))
}

/// Supervised fine-tuning of a teacher or student on `data`'s training split. With `resume`,
/// continues the run checkpointed in `out/checkpoint` (same settings, same result as an
/// uninterrupted run); without it, a checkpoint there is an error rather than overwritten.
#[allow(clippy::too_many_arguments)]
pub fn train(
    role: Role,
    cfg: &JobConfig,
    data: TrainData<'_>,
    out: &Path,
    resume: bool,
    train_device: &Device,
    infer_device: &Device,
    on_step: impl FnMut(&StepLog),
) -> Result<JobOutcome> {
    check_resume(out, resume)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let cfg_path = out.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(io(&cfg_path))?;
    let sec = match role {
        Role::Teacher => &cfg.teacher,
        Role::Student => &cfg.student,
    };
    let samples = data.train(&cfg.input)?;
    let tok_path = out.join("tokenizer.json");
    // The tokenizer is part of the resumable state: train it once.
    let tok = if tok_path.is_file() {
        TextTokenizer::load(&tok_path)?
    } else {
        let texts = evl_infer::input::corpus(&samples);
        let t = TextTokenizer::train(&texts, sec.vocab)?;
        t.save(&tok_path)?;
        t
    };
    let mut arch = cfg.arch(role)?;
    arch.vocab = tok.vocab_size();
    train_device.seed(sec.optim.seed);
    let model = arch.init(train_device);
    // Pre-training reads labels: conversation files train without it.
    let pre = if data.labelled().is_some() {
        sec.pretrain.steps
    } else {
        0
    };
    // A randomly initialised encoder is never frozen: without pre-training it must learn.
    let sft_cfg = OptimConfig {
        freeze_vision: sec.optim.freeze_vision && pre > 0,
        ..sec.optim.clone()
    };
    let plan = Stages {
        sec,
        pre,
        sft: &sft_cfg,
        arch: &arch,
        spec: &cfg.input,
    };
    plan.run(
        model,
        &samples,
        &tok,
        data,
        out,
        (train_device, infer_device),
        on_step,
    )
}

/// Vision pre-training of `model`'s encoder on `samples` with `sec.pretrain` (checkpointed
/// in `out/pretrain`, log in `out/pretrain_metrics.jsonl`, the probe's validation score in
/// `out/pretrain.json`): the model, or the outcome of a run stopped inside the stage.
#[allow(clippy::too_many_arguments)]
fn pretrain_stage(
    model: EcgVlm,
    samples: &[Sample],
    sec: &ModelSection,
    data: TrainData<'_>,
    spec: &InputSpec,
    out: &Path,
    infer_device: &Device,
    train_device: &Device,
    on_step: &mut impl FnMut(&StepLog),
) -> Result<std::result::Result<EcgVlm, JobOutcome>> {
    let (model, probe, plogs) = evl_train::pretrain::pretrain_encoder(
        model,
        samples,
        &evl_infer::text::superclass_space(),
        &sec.pretrain,
        Some(&out.join("pretrain")),
        train_device,
        |l| {
            on_step(&StepLog {
                terms: vec![("pretrain_bce".into(), l.total)],
                ..l.clone()
            })
        },
    )?;
    evl_run::write_jsonl(&out.join("pretrain_metrics.jsonl"), &plogs)?;
    if plogs.len() < sec.pretrain.steps {
        // Stopped inside pre-training (`stop_after`): resume continues it.
        return Ok(Err(JobOutcome {
            out: out.to_path_buf(),
            steps: 0,
            final_log: plogs.last().cloned(),
            val: None,
            params: model.num_params(),
            stopped: true,
        }));
    }
    if let Some(d) = data.labelled() {
        probe_report(&model, &probe, d, spec, out, infer_device)?;
    }
    Ok(Ok(model))
}

/// The stages of a `train` run after its model is built: vision pre-training (`pre` steps of
/// `sec.pretrain`, skipped at 0), SFT with `sft`, then the bundle and validation
/// ([`finish`]).
struct Stages<'a> {
    sec: &'a ModelSection,
    pre: usize,
    sft: &'a OptimConfig,
    arch: &'a EcgVlmConfig,
    spec: &'a InputSpec,
}

impl Stages<'_> {
    #[allow(clippy::too_many_arguments)] // the run's data, output and devices
    fn run(
        &self,
        model: EcgVlm,
        samples: &[Sample],
        tok: &TextTokenizer,
        data: TrainData<'_>,
        out: &Path,
        (train_device, infer_device): (&Device, &Device),
        mut on_step: impl FnMut(&StepLog),
    ) -> Result<JobOutcome> {
        let model = if self.pre > 0 {
            let stage = pretrain_stage(
                model,
                samples,
                self.sec,
                data,
                self.spec,
                out,
                infer_device,
                train_device,
                &mut on_step,
            )?;
            match stage {
                Ok(model) => model,
                Err(stopped) => return Ok(stopped),
            }
        } else {
            model
        };
        let dirs = JobDirs {
            out: out.to_path_buf(),
        };
        let (model, logs) = sft(
            model,
            samples,
            tok,
            self.sft,
            Some(&dirs.checkpoint()),
            train_device,
            |l| {
                on_step(&StepLog {
                    step: l.step + self.pre,
                    ..l.clone()
                })
            },
        )?;
        finish(
            out,
            &logs,
            self.sft.steps,
            model.valid(),
            (self.arch, tok, self.spec),
            data,
            infer_device,
        )
    }
}

/// Supervised fine-tuning that starts from a trained model bundle `init` (a `model/` folder a
/// `train` run wrote, such as `zoo/teacher/model`) instead of a new model: its architecture,
/// weights, tokenizer and input settings are kept, vision pre-training is skipped (its encoder
/// has learnt already), and the encoder stays frozen when the role's `optim.freeze_vision`
/// says so. The role's `input`, `vocab` and `stem_channels` settings do not apply (the bundle
/// fixes them); `cfg.input` is replaced by the bundle's in the `config.toml` written to `out`.
/// With `pretrain`, the encoder's pre-training continues first (the role's `pretrain`
/// settings, a new probe; labelled data only), as `train` runs it.
/// `resume` as in [`train`]: the checkpoint in `out/checkpoint` replaces the bundle's weights.
#[allow(clippy::too_many_arguments)]
pub fn train_from(
    role: Role,
    cfg: &JobConfig,
    init: &Path,
    pretrain: bool,
    data: TrainData<'_>,
    out: &Path,
    resume: bool,
    train_device: &Device,
    infer_device: &Device,
    on_step: impl FnMut(&StepLog),
) -> Result<JobOutcome> {
    let flag = "init";
    check_bundle(flag, init)?;
    // Everything loads before anything is written: a wrong folder leaves no half-made --out.
    let spec = evl_infer::bundle::Engine::load(init)?.spec;
    let (model, arch, tok) = load_trainable(init, train_device)?;
    check_resume(out, resume)?;
    let mut cfg = cfg.clone();
    cfg.input = spec;
    let sec = match role {
        Role::Teacher => &cfg.teacher,
        Role::Student => &cfg.student,
    };
    let samples = data.train(&spec)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let cfg_path = out.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(io(&cfg_path))?;
    tok.save(&out.join("tokenizer.json"))?;
    let pre = if pretrain && data.labelled().is_some() {
        sec.pretrain.steps
    } else {
        0
    };
    let plan = Stages {
        sec,
        pre,
        sft: &sec.optim,
        arch: &arch,
        spec: &spec,
    };
    plan.run(
        model,
        &samples,
        &tok,
        data,
        out,
        (train_device, infer_device),
        on_step,
    )
}

/// Refuse to overwrite a run in `out` unless `resume` asks to continue it.
pub(crate) fn check_resume(out: &Path, resume: bool) -> Result<()> {
    for ck in [out.join("checkpoint"), out.join("pretrain")] {
        if !resume && let Some(state) = evl_train::checkpoint::load_state(&ck)? {
            return Err(Error::Config {
                field: "resume",
                what: format!(
                    "{} holds a run at step {}; pass --resume to continue it, or choose another \
                     --out",
                    ck.display(),
                    state.step
                ),
            });
        }
    }
    Ok(())
}

/// What pre-training reached: the probe's macro ROC AUC on the validation split, written to
/// `pretrain.json` (`{"steps", "val_records", "val_probe_macro_auc"}`).
fn probe_report(
    model: &EcgVlm,
    probe: &burn::nn::Linear,
    data: &Path,
    spec: &InputSpec,
    out: &Path,
    infer_device: &Device,
) -> Result<()> {
    let Ok(val) = load_split(data, Split::Val, spec, 2) else {
        return Ok(());
    };
    let (m, p) = evl_train::pretrain::inference(model, probe);
    let probs = evl_train::pretrain::probe_probabilities(&m, &p, &val, infer_device);
    let space = evl_infer::text::superclass_space();
    let yt: Vec<bool> = val
        .iter()
        .flat_map(|s| space.iter().map(|c| s.labels.contains(c)))
        .collect();
    let auc = evl_eval::continuous::macro_roc_auc(&yt, &probs.concat(), space.len());
    let path = out.join("pretrain.json");
    let v = serde_json::json!({"val_records": val.len(), "val_probe_macro_auc": auc});
    std::fs::write(&path, v.to_string()).map_err(io(&path))
}

/// The end of a job: the step log; then, unless it stopped early (`stop_after`: the
/// checkpoint is written, no bundle yet), the model bundle and the validation scores.
fn finish(
    out: &Path,
    logs: &[StepLog],
    steps: usize,
    model: EcgVlm,
    (arch, tok, spec): (&EcgVlmConfig, &TextTokenizer, &InputSpec),
    data: TrainData<'_>,
    infer_device: &Device,
) -> Result<JobOutcome> {
    evl_run::write_jsonl(&evl_run::TrainRunDir::new(out).step_logs(), logs)?;
    let stopped = logs.len() < steps;
    let val = if stopped {
        None
    } else {
        let space = evl_infer::text::superclass_space();
        evl_infer::bundle::save_bundle(&out.join("model"), &model, arch, tok, spec, &space)?;
        match data.labelled() {
            Some(d) => validate(&model, tok, d, spec, out, infer_device)?,
            None => None,
        }
    };
    Ok(JobOutcome {
        out: out.to_path_buf(),
        steps: logs.len(),
        final_log: logs.last().cloned(),
        val,
        params: model.num_params(),
        stopped,
    })
}

/// Load a model bundle's weights onto the training device (trainable).
/// `dir` is a model bundle (`config.json` beside the weights), else an error that names the
/// role's flag and, for a training run's folder, the `model/` inside it.
pub(crate) fn check_bundle(role: &'static str, dir: &Path) -> Result<()> {
    if dir.join("config.json").is_file() {
        return Ok(());
    }
    let what = if dir.join("model/config.json").is_file() {
        format!(
            "{} is a training run, not a model: pass its model folder, --{role} {}",
            dir.display(),
            dir.join("model").display()
        )
    } else if dir.is_dir() {
        format!(
            "{} is not a model folder (no config.json): pass the `model/` folder a \
             `train {role}` run wrote",
            dir.display()
        )
    } else {
        format!("{} does not exist", dir.display())
    };
    Err(Error::Config { field: role, what })
}

pub(crate) fn load_trainable(
    dir: &Path,
    device: &Device,
) -> Result<(EcgVlm, EcgVlmConfig, TextTokenizer)> {
    let cfg = EcgVlmConfig::load(dir.join("config.json")).map_err(|e| Error::Checkpoint {
        path: dir.join("config.json"),
        what: e.to_string(),
    })?;
    let tok = TextTokenizer::load(&dir.join("tokenizer.json"))?;
    let model = evl_train::checkpoint::load_module(
        cfg.init(device),
        &dir.join("model.safetensors"),
        device,
    )?;
    Ok((model, cfg, tok))
}

/// Distil the student bundle in `student` from the teacher bundle in `teacher` on `data`'s
/// training split with `cfg.distill`. `resume` as in [`train`].
#[allow(clippy::too_many_arguments)]
pub fn distill_job(
    cfg: &JobConfig,
    teacher: &Path,
    student: &Path,
    data: TrainData<'_>,
    out: &Path,
    resume: bool,
    train_device: &Device,
    infer_device: &Device,
    on_step: impl FnMut(&StepLog),
) -> Result<JobOutcome> {
    let d = &cfg.distill;
    check_resume(out, resume)?;
    let method = Method::parse(&d.method.name(), &d.ablate)?;
    // Both models load before anything is written, so a wrong path leaves no half-made --out.
    check_bundle("teacher", teacher)?;
    check_bundle("student", student)?;
    let t = evl_infer::bundle::ModelBundle::load(teacher, infer_device)?;
    let (s_model, s_cfg, s_tok) = load_trainable(student, train_device)?;
    let s_spec = evl_infer::bundle::ModelBundle::load(student, infer_device)?.spec;
    if s_spec != t.spec {
        return Err(Error::Config {
            field: "input",
            what: format!(
                "teacher and student were trained on different input settings ({:?} vs {:?})",
                t.spec, s_spec
            ),
        });
    }
    let samples = data.train(&t.spec)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let cfg_path = out.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(io(&cfg_path))?;
    let t_layer = hidden_index(d.teacher_layer, t.model.n_layers(), "distill.teacher_layer")?;
    let s_layer = hidden_index(d.student_layer, s_model.n_layers(), "distill.student_layer")?;
    let cache =
        (!d.online).then(|| cache_teacher_at(&t.model, &samples, &t.tok, t_layer, infer_device));
    let source = match &cache {
        Some(c) => Teacher::Cached(c),
        None => Teacher::Online {
            model: &t.model,
            device: infer_device,
        },
    };
    let dcfg = d.run_config(method, t_layer, s_layer);
    let (dm, logs) = distill(
        s_model,
        &samples,
        &s_tok,
        &t.tok,
        source,
        &dcfg,
        Some(&out.join("checkpoint")),
        train_device,
        on_step,
    )?;
    finish(
        out,
        &logs,
        d.optim.steps,
        dm.student.valid(),
        (&s_cfg, &s_tok, &t.spec),
        data,
        infer_device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_keys_are_optional_and_unknown_ones_are_named() {
        let c =
            JobConfig::from_toml_str("[distill]\nlambda_ot = 0.2\n[student.optim]\nsteps = 7\n")
                .expect("partial config");
        assert_eq!(c.distill.lambda_ot, 0.2);
        assert_eq!(c.distill.method, Method::evl());
        let m = JobConfig::from_toml_str("[distill]\nmethod = \"evl-no-ot\"\nablate = [\"rel\"]\n")
            .expect("typed method");
        assert_eq!(m.distill.method.ablated(), [Ablation::Ot]);
        assert_eq!(m.distill.ablate, [Ablation::Rel]);
        let e = JobConfig::from_toml_str("[distill]\nmethod = \"tiny-bert\"\n").expect_err("bad");
        assert!(e.contains("tiny-bert") && e.contains("tinybert"), "{e}");
        assert_eq!(c.student.optim.steps, 7);
        assert_eq!(c.student.vocab, JobConfig::default().student.vocab);
        assert_eq!(
            c.teacher.optim.steps,
            JobConfig::default().teacher.optim.steps
        );
        let e = JobConfig::from_toml_str("[distill]\nlamda_ot = 0.2\n").expect_err("typo");
        assert!(e.contains("lamda_ot"), "{e}");
        // Every Sinkhorn and kernel setting is reachable from TOML and from --set.
        let k = JobConfig::from_toml_str(
            "[distill]\nkernel = \"graph\"\n[distill.sinkhorn]\neps = 0.05\ntolerance = 1e-6\n",
        )
        .expect("sinkhorn section");
        assert_eq!(k.distill.kernel, evl_kd::Kernel::Graph);
        assert_eq!(k.distill.sinkhorn.eps, 0.05);
        assert_eq!(k.distill.sinkhorn.tolerance, Some(1e-6));
        assert_eq!(
            k.distill.sinkhorn.iterations, 100,
            "unset keys keep the default"
        );
        let o = JobConfig::default()
            .with_overrides(&[
                "distill.sinkhorn.iterations=30".into(),
                "distill.kernel=fused".into(),
                "distill.sinkhorn.unrolled=true".into(),
            ])
            .expect("overrides");
        assert_eq!(o.distill.sinkhorn.iterations, 30);
        assert_eq!(o.distill.kernel, evl_kd::Kernel::Fused);
        assert!(o.distill.sinkhorn.unrolled);
        let e = JobConfig::default()
            .with_overrides(&["distill.sinkhorn.epsilon=0.2".into()])
            .expect_err("unknown key");
        assert!(
            e.contains("distill.sinkhorn.epsilon=0.2") && e.contains("epsilon"),
            "{e}"
        );
        let e = JobConfig::default()
            .with_overrides(&["distill.kernel=gpu".into()])
            .expect_err("bad kernel");
        assert!(e.contains("gpu"), "{e}");
        // The printed defaults read back to the same configuration.
        let d = JobConfig::default();
        let back = JobConfig::from_toml_str(&d.to_toml()).expect("round trip");
        assert_eq!(back.to_toml(), d.to_toml());
    }
}
