//! clap types only.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Distil large ECG vision-language models into small students (EVL-ECG, ICML 2026).
#[derive(Debug, Parser)]
#[command(name = "evl-ecg", version, about, long_about = None)]
pub struct Cli {
    /// Emit JSON Lines on stdout (`{"type", "data"}`, ending in a `summary`).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub noun: Noun,
}

/// Top-level nouns.
#[derive(Debug, Subcommand)]
pub enum Noun {
    /// Read, convert, synthesize and import ECG data (WFDB, PhysioNet/CinC, PTB-XL).
    #[command(subcommand)]
    Data(DataVerb),
    /// Draw a record as ECG paper (3x4 leads + lead II rhythm strip) into a PNG.
    ///
    /// Example: evl-ecg render ../shared/data/ptbxl_subset/records500/00000/00001_hr --out ecg.png
    Render(RenderArgs),
    /// Run the whole method on this machine: synthesize ECGs, train a teacher, SFT a
    /// heterogeneous student, distil it with EVL-ECG, vanilla KD and CE only (and EVL
    /// ablations) over 3 seeds, evaluate on synthetic and real PTB-XL records, write a report.
    ///
    /// Writes DIR/report.md and DIR/results.json (every number, per seed), plus data,
    /// tokenizers, checkpoints (resumable), per-step metrics and predictions in PULSE's format.
    Quickstart(QuickstartArgs),
    /// Supervised fine-tuning of a teacher or a student on a dataset's training split
    /// (the paper's first stage). Resumable: after a kill, run the same command with --resume.
    ///
    /// Example: evl-ecg train teacher --data synth-dir --out runs/teacher
    #[command(subcommand)]
    Train(TrainVerb),
    /// Distil a student (its SFT bundle) from a teacher bundle with EVL-ECG or a baseline
    /// (the paper's second stage). Resumable with --resume; offline teacher cache by default,
    /// --online runs the teacher on every batch.
    ///
    /// Example: evl-ecg distill --method evl --teacher runs/teacher/model
    ///   --student runs/student/model --data synth-dir --out runs/evl
    #[command(verbatim_doc_comment)]
    Distill(DistillArgs),
    /// Read a WFDB or CinC record and print the student's answer and per-label probabilities.
    ///
    /// Example: evl-ecg interpret ../shared/data/ptbxl_subset/records500/00000/00001_hr
    ///   --model quickstart-out/model
    #[command(verbatim_doc_comment)]
    Interpret(InterpretArgs),
    /// Run a saved model over a labelled dataset: predictions in PULSE's format, gold in
    /// ECG-Bench's format, and metrics.json (macro/per-class ROC AUC and PR AUC, Fmax, F1 at 0.5
    /// and at thresholds chosen on the validation split, ECE with the reliability diagram,
    /// bootstrap CIs, and the ECG-Bench parity scores of the generated answers).
    ///
    /// With --perturb (repeatable) each perturbation is evaluated on the same records and every
    /// metric's change is reported with a 95% paired bootstrap interval:
    ///   noise:SNR_DB            white Gaussian noise at this SNR per lead
    ///   wander[:MV]             baseline wander, peak amplitude (0.5 mV)
    ///   powerline[:HZ[:MV]]     mains interference (50 Hz, 0.1 mV)
    ///   electrode-motion[:SNR]  SYNTHETIC electrode-motion bursts (6 dB)
    ///   lead-dropout:LEADS      these leads flat, e.g. V1,V2,V3
    ///   amplitude:S             every lead times S
    ///   time-shift:MS           signal moved later by MS (earlier if negative)
    ///
    /// Example: evl-ecg eval --model quickstart-out/model --data quickstart-out/data
    ///   --perturb noise:10 --perturb lead-dropout:V1,V2 --out eval-out
    #[command(verbatim_doc_comment)]
    Eval(EvalArgs),
    /// Write an offline HTML report (index.html + figures/) for a quickstart or eval run:
    /// tables, training curves per loss term, ROC and PR curves per class, reliability diagram,
    /// the Sinkhorn transport plan (paper Fig. 2), feature spectra (Fig. 3), and a rendered ECG
    /// with the model's answer.
    ///
    /// Example: evl-ecg report quickstart-out   (writes quickstart-out/report/index.html)
    Report(ReportArgs),
    /// Size a distillation run from two checkpoints' config.json before renting a GPU:
    /// parameters by component, visual tokens per image, the memory one step needs (training
    /// state, teacher weights, activations, logits) and its FLOPs and estimated time.
    ///
    /// Example (the paper's models, from their published configs):
    ///   evl-ecg plan --teacher docs/configs/pulse-7b --student docs/configs/qwen3-vl-2b-instruct
    #[command(verbatim_doc_comment)]
    Plan(PlanArgs),
    /// Operate on a model bundle: `model quantize` writes an int8 copy for the CPU engine.
    #[command(subcommand)]
    Model(ModelVerb),
    /// Serve a model over HTTP: `POST /v1/interpret` (a WFDB record, a CinC .hea + .mat, an
    /// EDF file, a CSV with `fs`, or an image of ECG paper, as multipart), a web page at `/`
    /// to upload a record and see the rendered ECG with the findings, `/healthz`, `/readyz`
    /// and Prometheus `/metrics`. Ctrl-C (or SIGTERM) stops accepting and finishes the
    /// requests already accepted.
    ///
    /// Example: evl-ecg serve --model zoo/teacher/model --addr 127.0.0.1:8080
    ///   curl -F file=@00001_hr.hea -F file=@00001_hr.dat http://127.0.0.1:8080/v1/interpret
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
    /// Score model answers: ECG-Bench parity (PULSE's scorer, quirks included).
    #[command(subcommand)]
    Score(ScoreVerb),
    /// Measure speed against reference implementations run in the same invocation.
    #[command(subcommand)]
    Bench(BenchVerb),
}

/// Arguments of `interpret`.
#[derive(Debug, Args)]
pub struct InterpretArgs {
    /// Record path(s).
    #[arg(required = true)]
    pub records: Vec<PathBuf>,
    /// Model directory (config.json, input.json, tokenizer.json, model.safetensors), or a
    /// Hugging Face checkpoint folder (Qwen3-VL, LLaVA-NeXT / PULSE-7B), which also reads
    /// ECG images (PNG, JPEG) in place of records.
    #[arg(long, default_value = "quickstart-out/model")]
    pub model: PathBuf,
    /// The question whose greedy answer is printed (Hugging Face checkpoints; evl-ecg
    /// bundles always ask for the diagnostic superclasses).
    #[arg(long)]
    pub question: Option<String>,
    /// Also write the tensors of the question's forward pass (input_ids, attention_mask,
    /// pixel_values, image_grid_thw or image_sizes, logits) to this safetensors file, to
    /// check a checkpoint against transformers with bench/hf_from_pretrained.py (Hugging Face
    /// checkpoints, one record).
    #[arg(long, value_name = "FILE")]
    pub save_inputs: Option<PathBuf>,
    /// Load even if a checksum does not match.
    #[arg(long)]
    pub no_verify: bool,
    /// Device: cpu (the framework-free engine, the fastest on a CPU), cuda:N or vulkan:N
    /// (the burn model on that GPU; needs the `cuda` / `vulkan` cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: evl_models::DeviceSpec,
}

/// Verbs of `model`.
#[derive(Debug, Subcommand)]
pub enum ModelVerb {
    /// Write an int8 copy of a bundle: every linear layer's weights as int8 with one scale per
    /// output channel (norms, embeddings, stems and biases stay f32); the engine multiplies
    /// them with f32 activations. It runs on the native CPU engine (interpret, serve, eval) and is
    /// compared with the f32 bundle on SYNTHETIC records before the command returns.
    ///
    /// Example: evl-ecg model quantize --model quickstart-out/model --out quickstart-out/model-int8
    #[command(verbatim_doc_comment)]
    Quantize(QuantizeArgs),
}

/// Arguments of `model quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The f32 bundle.
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write the int8 bundle (a new directory).
    #[arg(long)]
    pub out: PathBuf,
    /// SYNTHETIC records (mixed difficulty) the two bundles are compared on.
    #[arg(long, default_value_t = 200)]
    pub check: usize,
}

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model directory, as `train`, `distill`, `quickstart` and `model quantize` write
    /// them, or a Hugging Face / LLaVA checkpoint folder of Qwen3-VL or LLaVA-NeXT (it reads
    /// records rendered as ECG paper, and images).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (loopback by default; the service has no authentication or TLS,
    /// so put it behind a proxy that has before exposing it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Inference worker threads (default: one per CPU core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Requests that may wait for a worker; one more is answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body, MiB.
    #[arg(long, default_value_t = 32)]
    pub max_body_mib: usize,
    /// Longest record accepted, seconds.
    #[arg(long, default_value_t = 300.0)]
    pub max_duration: f64,
    /// Most leads (signals) in a record.
    #[arg(long, default_value_t = 16)]
    pub max_leads: usize,
    /// Seconds to wait for an answer once the upload has arrived (queue + model); then 504.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Seconds to receive a request body; then 408.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Most open connections.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
}

/// Arguments of `plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Teacher checkpoint folder (config.json and processor files; weights not needed).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Student checkpoint folder (as --teacher).
    #[arg(long)]
    pub student: PathBuf,
    /// Examples per step per GPU.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Text tokens per example (prompt and answer).
    #[arg(long, default_value_t = 256)]
    pub text_tokens: usize,
    /// Answer tokens per example.
    #[arg(long, default_value_t = 64)]
    pub answer_tokens: usize,
    /// ECG image size in pixels, WIDTHxHEIGHT (default: a PTB-XL page as ECG-Bench renders it).
    #[arg(long, default_value = "2200x1700")]
    pub image: String,
    /// The teacher runs on every step (its bf16 weights on the GPU) instead of being cached.
    #[arg(long)]
    pub online: bool,
    /// Eager attention (scores kept for the backward pass) instead of a fused kernel.
    #[arg(long)]
    pub eager: bool,
    /// GPU peak dense bf16 TFLOP/s (H100 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// Fraction of the peak reached (model FLOPs utilisation).
    #[arg(long, default_value_t = 0.4)]
    pub mfu: f64,
}

/// Arguments of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model directory (as written by `quickstart` or `distill`).
    #[arg(long)]
    pub model: PathBuf,
    /// Data: an index file (.jsonl, from `data import`), a `data synth` directory, or a
    /// directory of WFDB records whose headers carry `# Labels:` / `#Dx:` (PTB-XL superclasses).
    #[arg(long)]
    pub data: PathBuf,
    /// Split: train, val, test or all. An index or synthetic directory has its own; a plain
    /// directory of records is split 80/10/10 by patient (`# Patient ID:`) or by record name,
    /// the same on every run. Thresholds are chosen on `val`, never on the records reported;
    /// `all` for data no model trained on (e.g. real records after synthetic training).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Device: cpu, cuda:N or vulkan:N (GPU kinds need the `cuda` / `vulkan` cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: evl_models::DeviceSpec,
    /// Evaluate at most N records.
    #[arg(long)]
    pub limit: Option<usize>,
    /// A perturbation to evaluate against the clean run (repeatable; see above).
    #[arg(long = "perturb", value_name = "SPEC")]
    pub perturb: Vec<String>,
    /// Seed of the perturbations and of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Write predictions.jsonl, gold.json and metrics.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Load records even if a checksum does not match.
    #[arg(long)]
    pub no_verify: bool,
}

/// `evl-ecg train <role>`.
#[derive(Debug, Subcommand)]
pub enum TrainVerb {
    /// Train the teacher (default: width 192, 50 signal tokens or 48 image tokens).
    Teacher(TrainArgs),
    /// Train the student (default: width 32/48, 12 visual tokens, a smaller tokenizer).
    Student(TrainArgs),
}

/// Settings shared by `train` and `distill`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Training data: an index file (.jsonl) or a `data synth` directory (train/val splits),
    /// a directory of labelled records (split 80/10/10 by patient or record name: trains on
    /// train, validates on val, never touches test), or with --image-root an ECGInstruct-style conversation file (JSON/JSONL, LLaVA format).
    #[arg(long, required_unless_present = "print_config")]
    pub data: Option<PathBuf>,
    /// Image root of a conversation file's `image` paths (a path missing there is looked up
    /// by file name below the root).
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    /// Output directory (model/, checkpoint/, metrics.jsonl, config.toml, val_metrics.json).
    #[arg(long, required_unless_present = "print_config")]
    pub out: Option<PathBuf>,
    /// TOML configuration (every key optional; `evl-ecg train teacher --print-config` shows
    /// the defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the resolved configuration as TOML and exit (needs no --data or --out).
    #[arg(long)]
    pub print_config: bool,
    /// Override one configuration key, as a dotted path into the layout --print-config shows
    /// (repeatable; applied after --config, before the flags below). Examples:
    /// `--set distill.sinkhorn.eps=0.05`, `--set distill.kernel=graph`,
    /// `--set student.optim.warmup=5`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Optimiser steps (overrides the config).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate of the optimiser (overrides the config; not the relation-loss
    /// weight `lr` of the paper, which is --lambda-rel).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Examples per step (overrides the config).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed (overrides the config).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this step with a checkpoint (continue later with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Continue the run checkpointed in OUT (same settings; the result equals an
    /// uninterrupted run). Without it an existing checkpoint is an error.
    #[arg(long)]
    pub resume: bool,
    /// Device: cpu, cuda:N or vulkan:N (GPU kinds need the `cuda` / `vulkan` cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: evl_models::DeviceSpec,
}

/// Arguments of `train teacher|student`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Settings to start from (--config, --set and the flags apply on top). `zoo`: the
    /// shipped models' recipes, checkpointed every 100 steps (continue with --resume). For
    /// `train teacher`: an image teacher with a convolutional stem, 1,500 steps of vision
    /// pre-training and 2,000 of SFT (an hour or more on 2 cores; the shipped teacher then had
    /// four more stages through --init, see zoo/README.md). For `train student`: the signal
    /// student, 600 steps of pre-training and 1,000 SFT steps of 64 examples (minutes).
    #[arg(long, value_enum, default_value = "default")]
    pub preset: TrainPreset,
    /// Encoder input: image (rendered paper) or signal (raw 12 leads).
    #[arg(long)]
    pub input: Option<String>,
    /// Tokenizer vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Steps of vision pre-training before SFT (built-in models; default 300, 0 skips it):
    /// the encoder first learns the labels through a linear probe on its visual tokens, as
    /// real VLMs' vision towers are pre-trained; `OUT/pretrain.json` holds the probe's
    /// validation macro AUC. With --init on a model folder this toolkit wrote, pre-training
    /// is skipped unless this flag is given: then the encoder's pre-training continues for
    /// this many steps (a new probe) before the SFT.
    #[arg(long)]
    pub pretrain_steps: Option<usize>,
    /// Start from a trained model instead of a new one. Either a Hugging Face checkpoint
    /// folder: Qwen3-VL or LLaVA-NeXT as downloaded (config.json, safetensors, tokenizer,
    /// processor files), or PULSE-7B in the original LLaVA layout; it trains on --data (an
    /// ECGInstruct-style conversation file) with --image-root, and OUT/model is written in
    /// the checkpoint's own layout, loadable by transformers' from_pretrained. Or a model
    /// folder this toolkit wrote (such as zoo/teacher/model): SFT continues from its weights,
    /// tokenizer and input settings, without vision pre-training unless --pretrain-steps
    /// asks for it (--input and --vocab do not apply).
    ///
    /// Example: evl-ecg train student --init Qwen3-VL-2B-Instruct
    ///   --data ecginstruct.json --image-root images --out runs/student
    ///          evl-ecg train teacher --init zoo/teacher/model --data my-records
    ///   --steps 500 --out runs/teacher
    #[arg(long, verbatim_doc_comment)]
    pub init: Option<PathBuf>,
}

/// Starting settings of `train teacher|student`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TrainPreset {
    /// The built-in defaults (`--print-config` shows them).
    Default,
    /// The shipped teacher's and student's recipes (`JobConfig::zoo`).
    Zoo,
}

/// The loss-kernel and Sinkhorn flags of `distill` and `quickstart`.
#[derive(Debug, Args)]
pub struct SinkhornArgs {
    /// Loss kernels: auto (fused host kernels on the CPU, tensor ops elsewhere), fused, graph.
    #[arg(long)]
    pub kernel: Option<evl_kd::Kernel>,
    /// Sinkhorn entropic regularisation eps (paper: 0.1; overrides the config).
    #[arg(long)]
    pub eps: Option<f64>,
    /// Fixed Sinkhorn iterations (paper: 100; overrides the config).
    #[arg(long)]
    pub sinkhorn_iters: Option<usize>,
    /// Stop Sinkhorn on this student-marginal L1 error instead of a fixed count.
    #[arg(long)]
    pub sinkhorn_tol: Option<f64>,
    /// Differentiate through the Sinkhorn iterations instead of detaching the plan.
    #[arg(long)]
    pub unrolled: bool,
}

impl SinkhornArgs {
    /// Overlay the flags given onto a configuration's kernel and Sinkhorn settings.
    pub fn apply(&self, kernel: &mut evl_kd::Kernel, s: &mut evl_kd::SinkhornSettings) {
        if let Some(k) = self.kernel {
            *kernel = k;
        }
        if let Some(e) = self.eps {
            s.eps = e;
        }
        if let Some(n) = self.sinkhorn_iters {
            s.iterations = n;
        }
        if let Some(t) = self.sinkhorn_tol {
            s.tolerance = Some(t);
        }
        if self.unrolled {
            s.unrolled = true;
        }
    }
}

/// Arguments of `distill`.
#[derive(Debug, Args)]
pub struct DistillArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Method: evl (EVL-ECG), ce (SFT continued), kl (vanilla KD over shared tokens), uld,
    /// multilevel-ot, tinybert, dskd, emkd (baselines). Every method mixes as (1-a)*CE + a*L,
    /// the paper's convention: --alpha is the weight of the distillation term.
    #[arg(long)]
    pub method: Option<evl_kd::Method>,
    /// EVL-ECG terms to switch off, comma separated: ot, mhca, rel.
    #[arg(long, value_delimiter = ',')]
    pub ablate: Vec<evl_kd::Ablation>,
    /// Teacher model directory (the `model/` folder a `train teacher` run writes), or a
    /// Hugging Face checkpoint folder (LLaVA-NeXT / PULSE-7B, Qwen3-VL) when the student is
    /// one too: then --data is a conversation file with --image-root, and the distilled
    /// student is written in its checkpoint layout.
    #[arg(long, required_unless_present = "print_config")]
    pub teacher: Option<PathBuf>,
    /// Student model directory (the `model/` folder a `train student` run writes), or a
    /// Hugging Face checkpoint folder (see --teacher).
    #[arg(long, required_unless_present = "print_config")]
    pub student: Option<PathBuf>,
    /// `a` of the paper (overrides the config).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// `lm`, weight of L_mhca (overrides the config).
    #[arg(long)]
    pub lambda_mhca: Option<f64>,
    /// `lr`, weight of L_rel (overrides the config).
    #[arg(long)]
    pub lambda_rel: Option<f64>,
    /// `lot`, weight of L_ot (overrides the config).
    #[arg(long)]
    pub lambda_ot: Option<f64>,
    #[command(flatten)]
    pub sinkhorn: SinkhornArgs,
    /// Run the teacher on each batch instead of caching its outputs once.
    #[arg(long)]
    pub online: bool,
}

/// Arguments of `report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directory (`quickstart --out` or `eval --out`).
    pub run: PathBuf,
    /// Output directory (default RUN/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Quickstart sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// Seconds (a smoke test).
    Tiny,
    /// About 10 minutes on 2 CPU cores (default).
    Quick,
    /// More data and steps (tens of minutes).
    Full,
}

/// Arguments of `quickstart`.
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Output directory.
    #[arg(long, default_value = "quickstart-out")]
    pub out: PathBuf,
    /// Size preset.
    #[arg(long, value_enum, default_value = "quick")]
    pub preset: PresetArg,
    /// Device: cpu, cuda:N or vulkan:N (GPU kinds need the `cuda` / `vulkan` cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: evl_models::DeviceSpec,
    /// Teacher encoder input: image (rendered ECG paper, as the paper) or signal. Trains the
    /// teacher in the run (no --teacher-checkpoint).
    #[arg(long, value_parser = ["image", "signal"], conflicts_with = "teacher_checkpoint")]
    pub teacher_input: Option<String>,
    /// Load this trained teacher (a model directory, e.g. the shipped `zoo/teacher/model`)
    /// instead of training one in the run.
    #[arg(long)]
    pub teacher_checkpoint: Option<PathBuf>,
    /// Train the teacher in the run even where the preset loads a shipped one.
    #[arg(long, conflicts_with = "teacher_checkpoint")]
    pub train_teacher: bool,
    /// Student encoder input: image, or signal (image-teacher -> signal-student is the
    /// paper's open question and the edge option). Trains the student in the run (no
    /// --student-checkpoint).
    #[arg(long, value_parser = ["image", "signal"], conflicts_with = "student_checkpoint")]
    pub student_input: Option<String>,
    /// Distil into this SFT'd student (a model directory, e.g. the shipped
    /// `zoo/student/model`) instead of pre-training and SFT'ing one in the run.
    #[arg(long)]
    pub student_checkpoint: Option<PathBuf>,
    /// Pre-train and SFT the student in the run even where the preset loads a shipped one.
    #[arg(long, conflicts_with = "student_checkpoint")]
    pub train_student: bool,
    /// Finding size of the synthetic data.
    #[arg(long, value_enum)]
    pub difficulty: Option<DifficultyArg>,
    #[command(flatten)]
    pub sinkhorn: SinkhornArgs,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// `evl-ecg score <verb>`.
#[derive(Debug, Subcommand)]
pub enum ScoreVerb {
    /// Reproduce PULSE's evaluation/evaluate_ecgbench.py on one prediction file.
    ///
    /// Multi-label tasks (ptb, cpsc, code15) report macro F1, Hamming loss and the parity
    /// "AUC": the mean of per-class ROC AUC computed on 0/1 answers (balanced accuracy, NaN if
    /// a class has one gold value) - comparable with the paper, not a probability AUC.
    /// Multiple choice (csn, g12, mmmu) reports accuracy; unparsable answers become letters
    /// drawn from CPython's random.seed(42) stream as the script does (--strict counts them
    /// wrong). ecgqa scores exact set matches of the options named in the prompt.
    ///
    /// Example: evl-ecg score ecgbench --task ecgqa
    ///   --gold ../shared/data/ecgbench_formats/ecgqa/ecgqa_items_for_local_ptbxl_records.json
    ///   --pred examples/ecgbench/ecgqa_first_option.jsonl
    Ecgbench(ScoreEcgbenchArgs),
}

/// ECG-Bench subsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EcgbenchTask {
    /// PTB-XL superclasses.
    Ptb,
    /// CPSC-2018 nine classes.
    Cpsc,
    /// CODE-15% with NORM/ABNORMAL handling.
    Code15,
    /// CSN multiple choice.
    Csn,
    /// G12EC multiple choice.
    G12,
    /// MMMU-ECG multiple choice.
    Mmmu,
    /// ECG-QA set match.
    Ecgqa,
}

/// Arguments of `score ecgbench`.
#[derive(Debug, Args)]
pub struct ScoreEcgbenchArgs {
    /// Task.
    #[arg(long, value_enum)]
    pub task: EcgbenchTask,
    /// Predictions: PULSE output JSONL (`question_id`/`id`, `text`/`response`, `prompt`).
    #[arg(long)]
    pub pred: PathBuf,
    /// Gold: ECG-Bench item JSON (`id`, `conversations`), or raw ECG-QA items.
    #[arg(long)]
    pub gold: PathBuf,
    /// Count unparsable answers wrong instead of drawing a random letter.
    #[arg(long)]
    pub strict: bool,
}

/// `evl-ecg data <verb>`.
#[derive(Debug, Subcommand)]
pub enum DataVerb {
    /// Print a record's header facts (rate, length, leads, gains, labels) and checksum status.
    ///
    /// RECORD is a WFDB or CinC record path with or without extension, e.g.
    /// ../shared/data/physionet_misc/100 or ../shared/data/cinc2021_subset/cpsc2018/A0001.hea.
    Inspect(InspectArgs),
    /// Write a record's physical signal as CSV: a header row of the signal names as the header
    /// writes them, one column per signal in that signal's own units (mV, uV, mmHg, ... as
    /// `data inspect` lists them), one row per sample, values with full f64 precision
    /// (compare with wfdb-python).
    Convert(ConvertArgs),
    /// Generate labelled SYNTHETIC 12-lead ECGs (WFDB format 16 + labels.csv).
    ///
    /// Records carry their labels in the header (`# Labels:`, `# Findings:`) and in labels.csv
    /// (superclasses NORM/MI/STTC/CD/HYP, findings such as AF, RBBB, PVC, measured-by-design
    /// heart rate, QRS, QT, PR). Same seed, same files, on any machine and thread count.
    Synth(SynthArgs),
    /// Index an existing dataset into the project's dataset format (index.jsonl).
    #[command(subcommand)]
    Import(ImportVerb),
}

/// Dataset kinds `data import` understands.
#[derive(Debug, Subcommand)]
pub enum ImportVerb {
    /// A PTB-XL tree (ptbxl_database.csv, scp_statements.csv, records100/, records500/).
    Ptbxl(ImportPtbxlArgs),
}

/// Arguments of `data import ptbxl`.
#[derive(Debug, Args)]
pub struct ImportPtbxlArgs {
    /// PTB-XL root directory.
    pub dir: PathBuf,
    /// Sampling rate of the records to index (100 or 500).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Database file name inside DIR (the shared subset ships ptbxl_database_excerpt.csv).
    #[arg(long, default_value = "ptbxl_database.csv")]
    pub database: String,
    /// Also index records that have no database row, labelled from their header comments.
    #[arg(long)]
    pub headers: bool,
    /// Output index file (JSON Lines).
    #[arg(long)]
    pub out: PathBuf,
    /// Skip checksum verification.
    #[arg(long)]
    pub no_verify: bool,
}

/// Arguments of `data inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Record path(s).
    #[arg(required = true)]
    pub records: Vec<PathBuf>,
    /// Load even if the per-lead checksum does not match the header.
    #[arg(long)]
    pub no_verify: bool,
}

/// Output formats of `data convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConvertTo {
    /// Comma-separated values, each signal in its own physical units.
    Csv,
    /// WFDB format 16 (re-encode; `--out` names the output directory).
    Wfdb,
}

/// Arguments of `data convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Record path (WFDB .hea/.dat or CinC .hea/.mat).
    pub record: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "csv")]
    pub to: ConvertTo,
    /// Output file (`-` for stdout).
    #[arg(long)]
    pub out: PathBuf,
    /// Load even if the per-lead checksum does not match the header.
    #[arg(long)]
    pub no_verify: bool,
    /// Signals with several samples per frame (`16x4` in the header): write every sample,
    /// each signal repeated up to the least common multiple of the samples per frame so all
    /// columns share one rate. Default: one value per frame, the integer mean of its samples
    /// (wfdb-python's default, `smooth_frames=True`).
    #[arg(long)]
    pub expand_frames: bool,
    /// Raw ADC values instead of physical units.
    #[arg(long)]
    pub adc: bool,
}

/// Finding size of synthetic records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DifficultyArg {
    /// Textbook-size findings.
    Obvious,
    /// Near diagnostic thresholds.
    Subtle,
    /// Half and half.
    Mixed,
}

/// Arguments of `data synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Number of records.
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    /// Seed (record i of seed s is always the same ECG).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Sampling frequency, Hz.
    #[arg(long, default_value_t = 500)]
    pub fs: u32,
    /// Record length, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// How pronounced findings are.
    #[arg(long, value_enum, default_value = "mixed")]
    pub difficulty: DifficultyArg,
    /// Noise scale (0 = clean, 1 = typical resting ECG).
    #[arg(long, default_value_t = 1.0)]
    pub noise: f64,
    /// Class weights NORM,MI,STTC,CD,HYP.
    #[arg(long, value_delimiter = ',', num_args = 5, default_values_t = [0.4, 0.15, 0.15, 0.15, 0.15])]
    pub class_weights: Vec<f64>,
    /// Mains frequency of powerline interference (50 or 60).
    #[arg(long, default_value_t = 50.0)]
    pub mains: f64,
}

/// Arguments of `render`.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Record path (WFDB or CinC).
    pub record: PathBuf,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Resolution in dots per inch (PULSE used about 200; 50-100 for training).
    #[arg(long, default_value_t = 200.0)]
    pub dpi: f32,
    /// Paper width in mm (US letter landscape by default; A4 is 297).
    #[arg(long, default_value_t = 279.4)]
    pub width_mm: f32,
    /// Paper height in mm (A4 is 210).
    #[arg(long, default_value_t = 215.9)]
    pub height_mm: f32,
    /// Gray levels instead of red paper.
    #[arg(long)]
    pub grayscale: bool,
    /// No grid.
    #[arg(long)]
    pub no_grid: bool,
    /// Maximum random rotation, degrees.
    #[arg(long, default_value_t = 0.0)]
    pub rotate: f32,
    /// Pixel noise standard deviation (0-255 scale).
    #[arg(long, default_value_t = 0.0)]
    pub noise: f32,
    /// Maximum relative colour change per channel.
    #[arg(long, default_value_t = 0.0)]
    pub color_jitter: f32,
    /// Number of crease lines.
    #[arg(long, default_value_t = 0)]
    pub creases: u32,
    /// Box-blur radius, pixels.
    #[arg(long, default_value_t = 0)]
    pub blur: u32,
    /// Seed of the distortions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Load even if the checksum does not match.
    #[arg(long)]
    pub no_verify: bool,
}

/// `evl-ecg bench <verb>`.
#[derive(Debug, Subcommand)]
pub enum BenchVerb {
    /// Forward+backward time of every distillation loss, ours (burn, flex CPU) vs PyTorch,
    /// and the Sinkhorn plan vs POT's `sinkhorn_log`, with ratios.
    ///
    /// The PyTorch/POT side runs `crates/evl-bench/scripts/torch_losses.py` with the same shapes and thread
    /// count (install with `python3 -m pip install -r crates/evl-bench/scripts/requirements.txt`). Without
    /// PyTorch the command says so and reports our times alone.
    Losses(evl_bench::LossesArgs),
    /// Records read per second: ours vs wfdb-python's `rdrecord` on the same files.
    Io(evl_bench::IoArgs),
    /// Images rendered per second: ours vs a matplotlib ECG-paper renderer in the same run.
    Render(evl_bench::RenderArgs),
    /// Student inference latency per record (what `interpret` runs: every label's
    /// verification question, batched, plus greedy generation of the diagnosis) and peak
    /// memory: ours vs the same model and weights in PyTorch (`crates/evl-bench/scripts/torch_vlm.py`), with a
    /// check that both computed the same probabilities and answers.
    Infer(evl_bench::InferArgs),
    /// Training-step time and peak memory of the built-in teacher and student: one SFT
    /// optimiser step (forward, answer CE, backward, AdamW with per-tensor clipping) on a
    /// fixed batch, ours vs the same model, weights, batch and optimiser in PyTorch
    /// (`crates/evl-bench/scripts/torch_vlm.py --train`), with every step's loss compared.
    Train(evl_bench::TrainArgs),
    /// The paper's real architectures (Qwen3-VL, LLaVA-NeXT) in burn vs transformers on the
    /// same CPU, threads, weights and inputs: forward, a training step (forward, answer CE,
    /// backward, AdamW), greedy tokens/s, peak memory, and the logits' largest difference.
    /// --size mid builds a random Qwen3-VL of mid size (text 512 wide, 8 layers; vision 256
    /// wide, 6 blocks). The PyTorch side needs bench/requirements-hf.txt (pass its --python).
    Hf(evl_bench::hf::HfArgs),
    /// The service under load on loopback: throughput and p50/p99 latency below and above
    /// saturation (only 503s allowed there), resident memory over a soak, against the same
    /// engine called directly on the same number of threads.
    Serve(evl_bench::serve::ServeArgs),
}
