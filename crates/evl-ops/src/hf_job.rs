//! Jobs on the paper's real checkpoints (Hugging Face / original-LLaVA folders of Qwen3-VL
//! and LLaVA-NeXT): SFT from a checkpoint (`train student --init DIR`) and distillation
//! between two checkpoints (`distill --teacher DIR --student DIR`). The run directory has the
//! same shape as the built-in models' jobs (`config.toml`, `checkpoint/` for resuming,
//! `metrics.jsonl`), and `model/` is a checkpoint in the layout the student came in.

use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;
use evl_hf::HfConfig;
use evl_infer::hf::{HfBundle, HfExample, conversation_examples};
use evl_train::hf::{HfTeacher, encode_examples, hf_distill, hf_sft, hf_teacher_cache};
use evl_train::train::{Method, StepLog};

use crate::job::{JobConfig, JobOutcome, Role, TrainData, check_resume, io};
use crate::{Error, Result};

/// Whether `dir` is a real checkpoint rather than one of this toolkit's bundles.
pub fn is_hf_checkpoint(dir: &Path) -> bool {
    evl_infer::hf::is_checkpoint(dir)
}

/// The examples a real checkpoint trains on: ECGInstruct-style conversations over images.
fn examples(data: TrainData<'_>) -> Result<Vec<HfExample>> {
    match data {
        TrainData::Conversations { file, image_root } => {
            Ok(conversation_examples(file, image_root)?)
        }
        TrainData::Labelled(d) => Err(Error::Config {
            field: "data",
            what: format!(
                "{}: a Hugging Face checkpoint trains on ECGInstruct-style conversations over \
                 ECG images; pass the conversation file as --data and the images' folder as \
                 --image-root",
                d.display()
            ),
        }),
    }
}

/// A `hidden_states` index (Python's negative indexing; -1 = after the final norm) as the
/// model's layer argument, checked against its depth.
pub fn layer_of(k: i64, cfg: &HfConfig, flag: &'static str) -> Result<Option<usize>> {
    crate::job::hidden_index(k, cfg.text().num_layers, flag)
}

fn load(role: &'static str, dir: &Path, device: &Device) -> Result<HfBundle> {
    HfBundle::load(dir, device).map_err(|e| Error::Config {
        field: role,
        what: format!("{}: {e}", dir.display()),
    })
}

/// Writes what every job writes before training: `config.toml`.
fn start(cfg: &JobConfig, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let p = out.join("config.toml");
    std::fs::write(&p, cfg.to_toml()).map_err(io(&p))
}

/// The step log, and unless the run stopped early, the trained model in `out/model` in its
/// checkpoint's layout.
fn end(
    out: &Path,
    logs: &[StepLog],
    steps: usize,
    bundle: &HfBundle,
    model: &evl_models::hf::HfModel,
) -> Result<JobOutcome> {
    evl_run::write_jsonl(&evl_run::TrainRunDir::new(out).step_logs(), logs)?;
    let stopped = logs.len() < steps;
    if !stopped {
        bundle.save(model, &out.join("model"))?;
    }
    Ok(JobOutcome {
        out: out.to_path_buf(),
        steps: logs.len(),
        final_log: logs.last().cloned(),
        val: None,
        params: model.num_params(),
        stopped,
    })
}

/// SFT of the checkpoint in `init` (the role's `optim` settings) on conversations.
#[allow(clippy::too_many_arguments)]
pub fn hf_train(
    role: Role,
    cfg: &JobConfig,
    init: &Path,
    data: TrainData<'_>,
    out: &Path,
    resume: bool,
    train_device: &Device,
    on_step: impl FnMut(&StepLog),
) -> Result<JobOutcome> {
    check_resume(out, resume)?;
    let optim = match role {
        Role::Teacher => &cfg.teacher.optim,
        Role::Student => &cfg.student.optim,
    };
    let bundle = load("init", init, train_device)?;
    let ex = examples(data)?;
    let enc = encode_examples(&bundle, &ex)?;
    start(cfg, out)?;
    let (model, logs) = hf_sft(
        bundle.model.clone(),
        &enc,
        optim,
        Some(&out.join("checkpoint")),
        train_device,
        on_step,
    )?;
    end(out, &logs, optim.steps, &bundle, &model)
}

/// Distils the student checkpoint from the teacher checkpoint with `cfg.distill`.
#[allow(clippy::too_many_arguments)]
pub fn hf_distill_job(
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
    let t = load("teacher", teacher, infer_device)?;
    let s = load("student", student, train_device)?;
    let t_layer = layer_of(d.teacher_layer, &t.config, "distill.teacher_layer")?;
    let s_layer = layer_of(d.student_layer, &s.config, "distill.student_layer")?;
    let ex = examples(data)?;
    let t_enc = encode_examples(&t, &ex)?;
    let s_enc = encode_examples(&s, &ex)?;
    start(cfg, out)?;
    let cache = if d.online {
        None
    } else {
        Some(hf_teacher_cache(
            &t.model,
            &t_enc,
            None,
            t_layer,
            infer_device,
        )?)
    };
    let source = match &cache {
        Some(c) => HfTeacher::Cached(c),
        None => HfTeacher::Online {
            model: &t.model,
            enc: &t_enc,
            device: infer_device,
        },
    };
    let dcfg = d.run_config(method, t_layer, s_layer);
    let (dm, logs) = hf_distill(
        s.model.clone(),
        &s_enc,
        &s.vocab_strings(),
        &t.vocab_strings(),
        source,
        &dcfg,
        Some(&out.join("checkpoint")),
        train_device,
        on_step,
    )?;
    end(out, &logs, d.optim.steps, &s, &dm.student)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_index_like_python() {
        let dir = evl_testkit::shared_dir();
        let Some(dir) = dir else { return };
        let cfg = HfConfig::from_dir(&dir.join("hf/qwen3_vl_tiny")).expect("config");
        let l = cfg.text().num_layers;
        assert_eq!(layer_of(-1, &cfg, "x").expect("last"), None);
        assert_eq!(layer_of(l as i64, &cfg, "x").expect("last"), None);
        assert_eq!(layer_of(-2, &cfg, "x").expect("-2"), Some(l - 1));
        assert_eq!(layer_of(0, &cfg, "x").expect("0"), Some(0));
        let e = layer_of(l as i64 + 1, &cfg, "distill.student_layer").expect_err("too deep");
        assert!(e.to_string().contains("distill.student_layer"), "{e}");
        assert!(layer_of(-(l as i64) - 2, &cfg, "x").is_err());
    }
}
