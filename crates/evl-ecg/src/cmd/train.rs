//! `evl-ecg train teacher|student` and `evl-ecg distill`.

use std::path::Path;

use anyhow::{Context, Result};
use evl_ops::hf_job;
use evl_ops::job::{JobConfig, JobOutcome, Role, TrainData, distill_job, train, train_from};
use evl_train::train::{OptimConfig, StepLog};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{DistillArgs, JobArgs, TrainArgs, TrainPreset};

/// `--data` and `--out` (clap requires both unless --print-config).
fn paths(a: &JobArgs) -> Result<(TrainData<'_>, &Path)> {
    let (Some(data), Some(out)) = (&a.data, &a.out) else {
        anyhow::bail!("--data and --out are required to run a job");
    };
    let data = match &a.image_root {
        Some(root) => TrainData::Conversations {
            file: data,
            image_root: root,
        },
        None => TrainData::Labelled(data),
    };
    Ok((data, out))
}

fn config(a: &JobArgs, preset: TrainPreset) -> Result<JobConfig> {
    let base = match preset {
        TrainPreset::Default => JobConfig::default(),
        TrainPreset::Zoo => JobConfig::zoo(),
    };
    let cfg = match &a.config {
        Some(p) => base
            .overlay_toml(p)
            .with_context(|| format!("reading {}", p.display()))?,
        None => base,
    };
    cfg.with_overrides(&a.set).map_err(|e| anyhow::anyhow!(e))
}

fn apply(o: &mut OptimConfig, a: &JobArgs) {
    if let Some(v) = a.steps {
        o.steps = v;
        o.warmup = o.warmup.min(v);
    }
    if let Some(v) = a.lr {
        o.lr = v;
    }
    if let Some(v) = a.batch_size {
        o.batch_size = v;
    }
    if let Some(v) = a.seed {
        o.seed = v;
    }
    o.stop_after = a.stop_after;
}

fn devices(a: &JobArgs) -> Result<(evl_models::device::Device, evl_models::device::Device)> {
    let d = crate::cmd::device(a.device)?;
    Ok((d.clone().autodiff(), d))
}

/// A progress bar on stderr with every loss term, or JSON progress lines with `--json`.
fn progress(steps: usize, json: bool) -> (ProgressBar, impl FnMut(&StepLog)) {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(steps as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("static template"),
        );
        b
    };
    let b2 = bar.clone();
    let cb = move |l: &StepLog| {
        if json {
            progress!("{}", serde_json::json!({"type": "step", "data": l}));
            return;
        }
        let mut msg = format!("loss {:.3} ce {:.3}", l.total, l.ce);
        for (k, v) in &l.terms {
            msg.push_str(&format!(" {k} {v:.3}"));
        }
        msg.push_str(&format!(" ({:.0} ms/step)", l.ms));
        b2.set_position(l.step as u64);
        b2.set_message(msg);
    };
    (bar, cb)
}

fn finish(o: &JobOutcome, json: bool) -> anyhow::Result<()> {
    if json {
        out!("{}", serde_json::json!({"type": "summary", "data": o}));
        return Ok(());
    }
    if o.stopped {
        out!(
            "stopped after step {} with a checkpoint in {}/checkpoint; run the same command with --resume to continue",
            o.steps,
            o.out.display()
        );
        return Ok(());
    }
    out!(
        "{} steps, {} parameters; model in {}/model",
        o.steps,
        o.params,
        o.out.display()
    );
    if let Some(v) = &o.val {
        out!(
            "validation: macro ROC AUC {}, parity F1 {:.3} ({} records)",
            v.macro_auc.map_or("n/a".into(), |x| format!("{x:.3}")),
            v.parity_f1,
            v.n
        );
    }
    Ok(())
}

/// `train teacher|student`.
pub fn run_train(role: Role, a: &TrainArgs, json: bool) -> Result<()> {
    let mut cfg = config(&a.job, a.preset)?;
    {
        let sec = match role {
            Role::Teacher => &mut cfg.teacher,
            Role::Student => &mut cfg.student,
        };
        if let Some(i) = &a.input {
            sec.input = i.clone();
        }
        if let Some(v) = a.vocab {
            sec.vocab = v;
        }
        if let Some(n) = a.pretrain_steps {
            sec.pretrain.steps = n;
            sec.pretrain.warmup = sec.pretrain.warmup.min(n / 10).max(1);
        }
        apply(&mut sec.optim, &a.job);
    }
    if a.job.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let sec = match role {
        Role::Teacher => &cfg.teacher,
        Role::Student => &cfg.student,
    };
    // Pre-training's steps come first on the bar (real checkpoints skip it).
    // With --init, pre-training runs only when asked for (--pretrain-steps, own models).
    let steps = sec.optim.steps
        + if a.init.is_none() || a.pretrain_steps.is_some() {
            sec.pretrain.steps
        } else {
            0
        };
    let (data, out) = paths(&a.job)?;
    let (tdev, idev) = devices(&a.job)?;
    // --init: a Hugging Face checkpoint, or a model folder this toolkit wrote.
    let own = a
        .init
        .as_ref()
        .is_some_and(|i| !hf_job::is_hf_checkpoint(i));
    if let Some(init) = &a.init
        && own
        && !init.join("input.json").is_file()
    {
        anyhow::bail!(
            "--init {}: neither a Hugging Face checkpoint folder (a config.json with \
             `architectures` or `model_type`, beside the safetensors weights) nor a model folder \
             written by `evl-ecg train` (config.json, input.json, tokenizer.json, \
             model.safetensors; for a training run, pass its model/ folder)",
            init.display()
        );
    }
    let (bar, cb) = progress(steps, json);
    let o = match &a.init {
        Some(init) if own => {
            let pretrain = a.pretrain_steps.is_some();
            train_from(
                role,
                &cfg,
                init,
                pretrain,
                data,
                out,
                a.job.resume,
                &tdev,
                &idev,
                cb,
            )
        }
        Some(init) => hf_job::hf_train(role, &cfg, init, data, out, a.job.resume, &tdev, cb),
        None => train(role, &cfg, data, out, a.job.resume, &tdev, &idev, cb),
    }
    .with_context(|| format!("training the {role:?} into {}", out.display()))?;
    bar.finish_and_clear();
    finish(&o, json)?;
    Ok(())
}

/// `distill`.
pub fn run_distill(a: &DistillArgs, json: bool) -> Result<()> {
    let mut cfg = config(&a.job, TrainPreset::Default)?;
    if let Some(m) = &a.method {
        cfg.distill.method = m.clone();
    }
    if !a.ablate.is_empty() {
        cfg.distill.ablate = a.ablate.clone();
    }
    if a.online {
        cfg.distill.online = true;
    }
    let d = &mut cfg.distill;
    a.sinkhorn.apply(&mut d.kernel, &mut d.sinkhorn);
    for (flag, field) in [
        (a.alpha, &mut d.alpha),
        (a.lambda_mhca, &mut d.lambda_mhca),
        (a.lambda_rel, &mut d.lambda_rel),
        (a.lambda_ot, &mut d.lambda_ot),
    ] {
        if let Some(v) = flag {
            *field = v;
        }
    }
    apply(&mut cfg.distill.optim, &a.job);
    if a.job.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let (data, out) = paths(&a.job)?;
    let (Some(teacher), Some(student)) = (&a.teacher, &a.student) else {
        anyhow::bail!("--teacher and --student are required to distil");
    };
    let (tdev, idev) = devices(&a.job)?;
    let real = (
        hf_job::is_hf_checkpoint(teacher),
        hf_job::is_hf_checkpoint(student),
    );
    if real.0 != real.1 {
        let (hf, ours) = if real.0 {
            (("teacher", teacher), ("student", student))
        } else {
            (("student", student), ("teacher", teacher))
        };
        anyhow::bail!(
            "--{} {} is a Hugging Face checkpoint but --{} {} is an evl-ecg bundle: distil \
             between two checkpoints, or between two bundles",
            hf.0,
            hf.1.display(),
            ours.0,
            ours.1.display()
        );
    }
    let (bar, cb) = progress(cfg.distill.optim.steps, json);
    let run = if real.0 {
        hf_job::hf_distill_job
    } else {
        distill_job
    };
    let o = run(
        &cfg,
        teacher,
        student,
        data,
        out,
        a.job.resume,
        &tdev,
        &idev,
        cb,
    )
    .with_context(|| format!("distilling into {}", out.display()))?;
    bar.finish_and_clear();
    finish(&o, json)?;
    Ok(())
}
