//! `evl-ecg train teacher|student` and `evl-ecg distill`.

use anyhow::{Context, Result};
use evl_ops::job::{JobConfig, JobOutcome, Role, TrainData, distill_job, train};
use evl_train::train::{OptimConfig, StepLog};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{DistillArgs, JobArgs, TrainArgs};

fn data(a: &JobArgs) -> TrainData<'_> {
    match &a.image_root {
        Some(root) => TrainData::Conversations {
            file: &a.data,
            image_root: root,
        },
        None => TrainData::Labelled(&a.data),
    }
}

fn config(a: &JobArgs) -> Result<JobConfig> {
    match &a.config {
        Some(p) => JobConfig::from_toml(p).with_context(|| format!("reading {}", p.display())),
        None => Ok(JobConfig::default()),
    }
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
            println!("{}", serde_json::json!({"type": "step", "data": l}));
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

fn finish(o: &JobOutcome, json: bool) {
    if json {
        println!("{}", serde_json::json!({"type": "summary", "data": o}));
        return;
    }
    if o.stopped {
        println!(
            "stopped after step {} with a checkpoint in {}/checkpoint; run the same command with --resume to continue",
            o.steps,
            o.out.display()
        );
        return;
    }
    println!(
        "{} steps, {} parameters; model in {}/model",
        o.steps,
        o.params,
        o.out.display()
    );
    if let Some(v) = &o.val {
        println!(
            "validation: macro ROC AUC {}, parity F1 {:.3} ({} records)",
            v.macro_auc.map_or("n/a".into(), |x| format!("{x:.3}")),
            v.parity_f1,
            v.n
        );
    }
}

/// `train teacher|student`.
pub fn run_train(role: Role, a: &TrainArgs, json: bool) -> Result<()> {
    let mut cfg = config(&a.job)?;
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
        apply(&mut sec.optim, &a.job);
    }
    if a.job.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let steps = match role {
        Role::Teacher => cfg.teacher.optim.steps,
        Role::Student => cfg.student.optim.steps,
    };
    let (tdev, idev) = devices(&a.job)?;
    let (bar, cb) = progress(steps, json);
    let o = train(
        role,
        &cfg,
        data(&a.job),
        &a.job.out,
        a.job.resume,
        &tdev,
        &idev,
        cb,
    )
    .with_context(|| format!("training the {role:?} into {}", a.job.out.display()))?;
    bar.finish_and_clear();
    finish(&o, json);
    Ok(())
}

/// `distill`.
pub fn run_distill(a: &DistillArgs, json: bool) -> Result<()> {
    let mut cfg = config(&a.job)?;
    if let Some(m) = &a.method {
        cfg.distill.method = m.clone();
    }
    if !a.ablate.is_empty() {
        cfg.distill.ablate = a.ablate.clone();
    }
    if a.online {
        cfg.distill.online = true;
    }
    apply(&mut cfg.distill.optim, &a.job);
    if a.job.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let (tdev, idev) = devices(&a.job)?;
    let (bar, cb) = progress(cfg.distill.optim.steps, json);
    let o = distill_job(
        &cfg,
        &a.teacher,
        &a.student,
        data(&a.job),
        &a.job.out,
        a.job.resume,
        &tdev,
        &idev,
        cb,
    )
    .with_context(|| format!("distilling into {}", a.job.out.display()))?;
    bar.finish_and_clear();
    finish(&o, json);
    Ok(())
}
