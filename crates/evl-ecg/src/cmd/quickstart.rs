//! `evl-ecg quickstart`.

use anyhow::{Context, Result};
use evl_ops::quickstart::{Preset, QuickstartConfig, run as run_quickstart};

use crate::args::{DifficultyArg, InterpretArgs, PresetArg, QuickstartArgs};

/// `quickstart`.
pub fn run(a: &QuickstartArgs, json: bool) -> Result<()> {
    let preset = match a.preset {
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::Quick => Preset::Quick,
        PresetArg::Full => Preset::Full,
    };
    let mut cfg = QuickstartConfig::preset(preset);
    if let Some(t) = &a.teacher_input {
        cfg.teacher_input = t.clone();
    }
    if let Some(t) = &a.student_input {
        cfg.student_input = t.clone();
    }
    if let Some(d) = a.difficulty {
        cfg.difficulty = match d {
            DifficultyArg::Obvious => ecg_synth::Difficulty::Obvious,
            DifficultyArg::Subtle => ecg_synth::Difficulty::Subtle,
            DifficultyArg::Mixed => ecg_synth::Difficulty::Mixed,
        };
    }
    a.sinkhorn.apply(&mut cfg.kernel, &mut cfg.sinkhorn);
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let device = crate::cmd::device(a.device)?;
    let train_device = device.clone().autodiff();
    let shared = ecg_data::shared_data();
    if shared.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            anyhow::bail!(
                "../shared/data is not here (CI=true): the real-record evaluation cannot be \
                 skipped under CI; run from the repository root or set EVL_SHARED_DATA"
            );
        }
        eprintln!(
            "note: ../shared/data not found from {} (set EVL_SHARED_DATA to point at it); \
             the real-record evaluation is skipped",
            std::env::current_dir().map_or("here".into(), |d| d.display().to_string())
        );
    }
    let t = std::time::Instant::now();
    let r = run_quickstart(&a.out, &cfg, shared.as_deref(), &train_device, &device, |msg| {
        if json {
            println!("{}", serde_json::json!({"type": "progress", "data": {"message": msg, "seconds": t.elapsed().as_secs_f64()}}));
        } else {
            eprintln!("[{:6.1}s] {msg}", t.elapsed().as_secs_f64());
        }
    })
    .with_context(|| format!("quickstart into {}", a.out.display()))?;
    let w = evl_report::write_report(&a.out, None)
        .with_context(|| format!("writing the report of {}", a.out.display()))?;
    if json {
        println!(
            "{}",
            serde_json::json!({"type": "summary", "data": {"out": a.out, "wall_seconds": r.wall_seconds, "html": w.html}})
        );
    } else {
        eprintln!(
            "wrote {}/report.md, results.json and {} in {:.0} s",
            a.out.display(),
            w.html.display(),
            r.wall_seconds
        );
    }
    Ok(())
}

/// `interpret`.
pub fn interpret(a: &InterpretArgs, json: bool) -> Result<()> {
    let device = crate::cmd::device(a.device)?;
    let t = std::time::Instant::now();
    let bundle = evl_infer::bundle::ModelBundle::load(&a.model, &device)
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    for path in &a.records {
        let rec = crate::cmd::data::load(path, a.no_verify)?;
        let r = bundle
            .interpret_on(&rec, &device)
            .with_context(|| format!("interpreting {}", path.display()))?;
        if json {
            println!(
                "{}",
                serde_json::json!({"type": "interpretation", "data": r})
            );
        } else {
            println!(
                "{}: {}",
                r.record,
                if r.answer.is_empty() {
                    "(empty answer)"
                } else {
                    &r.answer
                }
            );
            for (l, p) in &r.probabilities {
                println!("  {l:5} {p:.3}");
            }
            println!("  ({:.0} ms after a {:.0} ms model load)", r.ms, load_ms);
        }
    }
    Ok(())
}
