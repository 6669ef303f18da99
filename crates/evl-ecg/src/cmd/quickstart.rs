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
        cfg.teacher_checkpoint = None;
    }
    if a.train_teacher {
        cfg.teacher_checkpoint = None;
    }
    if let Some(d) = &a.teacher_checkpoint {
        cfg.teacher_checkpoint = Some(d.clone());
    }
    if let Some(t) = &a.student_input {
        cfg.student_input = t.clone();
        cfg.student_checkpoint = None;
    }
    if a.train_student {
        cfg.student_checkpoint = None;
    }
    if let Some(d) = &a.student_checkpoint {
        cfg.student_checkpoint = Some(d.clone());
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
            progress!("{}", serde_json::json!({"type": "progress", "data": {"message": msg, "seconds": t.elapsed().as_secs_f64()}}));
        } else {
            eprintln!("[{:6.1}s] {msg}", t.elapsed().as_secs_f64());
        }
    })
    .with_context(|| format!("quickstart into {}", a.out.display()))?;
    let w = evl_report::write_report(&a.out, None)
        .with_context(|| format!("writing the report of {}", a.out.display()))?;
    if json {
        out!(
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
    if evl_infer::hf::is_checkpoint(&a.model) {
        return interpret_hf(a, json, &device);
    }
    if a.question.is_some() || a.save_inputs.is_some() {
        anyhow::bail!(
            "--question and --save-inputs are for Hugging Face checkpoints; {} is an evl-ecg bundle",
            a.model.display()
        );
    }
    let t = std::time::Instant::now();
    // On the CPU only the native engine is needed (and an int8 bundle has nothing else).
    let on_cpu = evl_models::DeviceSpec::Cpu.device().ok().as_ref() == Some(&device);
    let model = if on_cpu {
        Ok(evl_infer::bundle::Engine::load(&a.model)
            .with_context(|| format!("loading model {}", a.model.display()))?)
    } else {
        Err(evl_infer::bundle::ModelBundle::load(&a.model, &device)
            .with_context(|| format!("loading model {}", a.model.display()))?)
    };
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    for path in &a.records {
        let rec = crate::cmd::data::load(path, a.no_verify)?;
        // `Ok`: the native engine (CPU); `Err`: the burn model on a GPU.
        let r = match &model {
            Ok(engine) => engine.interpret(&rec),
            Err(bundle) => bundle.interpret_on(&rec, &device),
        }
        .with_context(|| format!("interpreting {}", path.display()))?;
        if json {
            out!(
                "{}",
                serde_json::json!({"type": "interpretation", "data": r})
            );
        } else {
            out!(
                "{}: {}",
                r.record,
                if r.answer.is_empty() {
                    "(empty answer)"
                } else {
                    &r.answer
                }
            );
            for (l, p) in &r.probabilities {
                out!("  {l:5} {p:.3}");
            }
            out!("  ({:.0} ms after a {:.0} ms model load)", r.ms, load_ms);
        }
    }
    Ok(())
}

fn print_interpretation(
    r: &evl_infer::bundle::Interpretation,
    json: bool,
    load_ms: f64,
) -> anyhow::Result<()> {
    if json {
        out!(
            "{}",
            serde_json::json!({"type": "interpretation", "data": r})
        );
        return Ok(());
    }
    out!(
        "{}: {}",
        r.record,
        if r.answer.is_empty() {
            "(empty answer)"
        } else {
            &r.answer
        }
    );
    for (l, p) in &r.probabilities {
        out!("  {l:5} {p:.3}");
    }
    out!("  ({:.0} ms after a {:.0} ms model load)", r.ms, load_ms);
    Ok(())
}

/// `interpret` with a Hugging Face checkpoint: records are rendered as ECG paper, images are
/// read as they are.
fn interpret_hf(a: &InterpretArgs, json: bool, device: &evl_models::device::Device) -> Result<()> {
    let t = std::time::Instant::now();
    let bundle = evl_infer::hf::HfBundle::load(&a.model, device)
        .with_context(|| format!("loading checkpoint {}", a.model.display()))?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    if a.save_inputs.is_some() && a.records.len() != 1 {
        anyhow::bail!("--save-inputs writes one record's tensors: give one record");
    }
    let question = a
        .question
        .clone()
        .unwrap_or_else(|| evl_infer::text::DIAGNOSIS_PROMPT.to_string());
    let labels = evl_infer::text::superclass_space();
    for path in &a.records {
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"));
        let (name, image) = if is_image {
            let name = path
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            (name, bundle.prepare_path(path)?)
        } else {
            let rec = crate::cmd::data::load(path, a.no_verify)?;
            let img = bundle
                .prepare_record(&rec)
                .with_context(|| format!("rendering {}", path.display()))?;
            (rec.name.clone(), img)
        };
        let r = bundle
            .interpret(&name, &image, &question, &labels, device)
            .with_context(|| format!("interpreting {}", path.display()))?;
        print_interpretation(&r, json, load_ms)?;
        if let Some(file) = &a.save_inputs {
            let tensors = bundle.reference_inputs(&image, &question, device)?;
            evl_hf::weights::save(file, &tensors, evl_hf::weights::WeightDtype::F32)
                .with_context(|| format!("writing {}", file.display()))?;
        }
    }
    Ok(())
}
