//! `evl-ecg bench train`: one SFT optimiser step of the built-in teacher and student, ours
//! (burn `flex`) against the same model, weights, batch and optimiser in PyTorch.
//!
//! A step is what `evl_train::train::sft` runs per batch: the forward pass, the answer-token
//! cross-entropy ([`evl_train::train::sft_loss`]), the backward pass and AdamW with per-tensor
//! gradient clipping ([`evl_train::train::adamw`]). Both sides run the same fixed batch (the
//! preset's SFT batch: 16 rows, every question about a drawn record together), at a constant
//! learning rate; batch preparation is outside the timing on both. The loss of every step is
//! compared: equal losses at the first step show the same model and batch, close ones later
//! show the same optimiser.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::config::Config;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use evl_infer::input::{Sample, samples_from_records};
use evl_infer::text::TextTokenizer;
use evl_kd::task::masked_token_ce;
use evl_models::vlm::{EcgVlm, EcgVlmConfig};
use evl_ops::job::{JobConfig, Role};
use evl_train::train::{OptimConfig, adamw, batch_indices, sft_loss};

use crate::args::TrainArgs;

/// One measured model.
struct Case {
    name: String,
    /// A bundle directory PyTorch reads.
    dir: PathBuf,
    model: EcgVlm,
    optim: OptimConfig,
    samples: Vec<Sample>,
    tok: TextTokenizer,
}

/// What one side measured.
#[derive(Debug, Clone)]
struct Side {
    median_ms: f64,
    losses: Vec<f64>,
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// Synthetic records rendered for `spec` (the benchmark's batch source).
fn synthetic(n: usize, seed: u64, spec: &evl_infer::input::InputSpec) -> Result<Vec<Sample>> {
    let tmp = tempfile::tempdir()?;
    let synth = ecg_synth::SynthConfig::default();
    ecg_synth::write_dataset(tmp.path(), &synth, seed, n)?;
    let recs = ecg_data::labelled::load_labelled(tmp.path(), Default::default())?;
    Ok(samples_from_records(recs, spec, seed)?)
}

/// A model to measure: the bundle at `dir`, or (no `dir`) a freshly initialised model of the
/// `zoo` preset's architecture for `role`, with a tokenizer trained on the records, written
/// as a bundle under `tmp` for PyTorch to read.
fn case(
    role: Role,
    dir: Option<&Path>,
    records: usize,
    tmp: &Path,
    device: &Device,
) -> Result<Case> {
    let job = JobConfig::zoo();
    let sec = match role {
        Role::Teacher => &job.teacher,
        Role::Student => &job.student,
    };
    let optim = sec.optim.clone();
    let name = format!("{role:?}").to_lowercase();
    match dir {
        Some(d) => {
            let cfg = EcgVlmConfig::load(d.join("config.json"))
                .map_err(|e| anyhow::anyhow!("{}: {e}", d.join("config.json").display()))?;
            let spec: evl_infer::input::InputSpec = serde_json::from_str(
                &std::fs::read_to_string(d.join("input.json"))
                    .with_context(|| format!("reading {}", d.join("input.json").display()))?,
            )
            .with_context(|| format!("{}", d.join("input.json").display()))?;
            let tok = TextTokenizer::load(&d.join("tokenizer.json"))?;
            let model =
                evl_infer::bundle::load_weights(cfg.init(device), &d.join("model.safetensors"))?;
            Ok(Case {
                name: format!("{name} ({})", d.display()),
                dir: d.to_path_buf(),
                model,
                optim,
                samples: synthetic(records, 11, &spec)?,
                tok,
            })
        }
        None => {
            let samples = synthetic(records, 11, &job.input)?;
            let tok = TextTokenizer::train(&evl_infer::input::corpus(&samples), sec.vocab)?;
            let mut arch = job.arch(role)?;
            arch.vocab = tok.vocab_size();
            device.seed(0);
            let model = arch.init(device);
            let out = tmp.join(&name);
            evl_infer::bundle::save_bundle(
                &out,
                &model,
                &arch,
                &tok,
                &job.input,
                &evl_infer::text::superclass_space(),
            )?;
            Ok(Case {
                name: format!("{name} (zoo preset, fresh)"),
                dir: out,
                model,
                optim,
                samples,
                tok,
            })
        }
    }
}

/// How our side runs a step.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// The encoder on every step, burn autodiff.
    Full,
    /// The frozen encoder's visual tokens computed once before the steps, burn autodiff.
    Cached,
    /// Cached tokens and the fused host kernels ([`evl_models::fused`]): what `sft` runs on
    /// the CPU.
    Fused,
    /// The frozen encoder on every step, once per drawn record (the fused kernels' forward
    /// pass, or burn's where they do not cover it), then the fused step: what `sft` runs on
    /// the CPU when the tokens do not fit its cache.
    FullFused,
    /// The encoder learns (`freeze_vision = false`), burn autodiff.
    Trained,
    /// The encoder learns, fused kernels from the raw input (every built-in encoder but a
    /// signal one with a stem), as `sft`, `distill` and vision pre-training run it on the CPU.
    TrainedFused,
}

impl Mode {
    fn trains_encoder(self) -> bool {
        matches!(self, Mode::Trained | Mode::TrainedFused)
    }
    fn fused(self) -> bool {
        matches!(self, Mode::Fused | Mode::FullFused | Mode::TrainedFused)
    }
}

/// Our side: `warmup + steps` optimiser steps on one batch (`records[i]`: the batch's record
/// of row `i`, for the fused kernels' shared prefixes).
fn ours(
    c: &Case,
    b: &evl_train::batch::Batch,
    records: &[usize],
    lr: f64,
    warmup: usize,
    steps: usize,
    mode: Mode,
) -> Result<Side> {
    let mut model = c
        .model
        .clone()
        .with_vision_trainable(mode.trains_encoder() || !c.optim.freeze_vision);
    let mut optim = adamw(&c.optim);
    let visual = matches!(mode, Mode::Cached | Mode::Fused).then(|| model.encode(b.pixels.clone()));
    // Fused: each record's input once (its first row's), rows pointing at them.
    let n_rec = records.iter().max().map_or(0, |m| m + 1);
    let first: Vec<usize> = (0..n_rec)
        .map(|r| records.iter().position(|&x| x == r).expect("record used"))
        .collect();
    let first_rows = |all: Vec<f32>| -> Vec<f32> {
        let per = all.len() / records.len().max(1);
        first
            .iter()
            .flat_map(|&i| all[i * per..(i + 1) * per].to_vec())
            .collect()
    };
    let px_first = (mode == Mode::FullFused).then(|| {
        let first: Vec<i64> = first.iter().map(|&i| i as i64).collect();
        let dev = b.pixels.device();
        b.pixels.clone().select(
            0,
            burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(first, [n_rec]),
                &dev,
            ),
        )
    });
    let host_raw: Vec<f32> = match mode {
        Mode::TrainedFused | Mode::FullFused => {
            first_rows(b.pixels.clone().into_data().iter::<f32>().collect())
        }
        _ => Vec::new(),
    };
    let host_visual: Vec<f32> = match (&visual, mode) {
        (Some(v), Mode::Fused) => first_rows(v.clone().into_data().iter::<f32>().collect()),
        _ => Vec::new(),
    };
    let lm_rows: Vec<evl_models::fused::LmRow<'_>> = b
        .rows
        .iter()
        .zip(records)
        .map(|((ids, answer), &record)| evl_models::fused::LmRow {
            record,
            ids,
            answer,
        })
        .collect();
    let plain = model.devices()[0].clone().without_autodiff();
    let mut losses = Vec::new();
    let mut times = Vec::new();
    for step in 0..warmup + steps {
        let t = Instant::now();
        let (value, grads) = if mode == Mode::Fused {
            let fused = evl_models::fused::FusedLm::from_model(&model);
            let out = fused.step(&host_visual, &lm_rows)?;
            (out.loss as f32, fused.gradients(&out, 1.0, &plain))
        } else if mode == Mode::FullFused
            && let Some(fused) = evl_models::fused::FusedLm::with_encoder(&model)
        {
            // The frozen encoder on the fused kernels too (its backward pass skipped).
            let out = fused.step_from_input(&host_raw, &lm_rows)?;
            (out.loss as f32, fused.gradients(&out, 1.0, &plain))
        } else if mode == Mode::FullFused {
            let tokens: Vec<f32> = model
                .encode(px_first.clone().expect("first rows' pixels"))
                .into_data()
                .iter::<f32>()
                .collect();
            let fused = evl_models::fused::FusedLm::from_model(&model);
            let out = fused.step(&tokens, &lm_rows)?;
            (out.loss as f32, fused.gradients(&out, 1.0, &plain))
        } else if mode == Mode::TrainedFused {
            let fused = evl_models::fused::FusedLm::with_encoder(&model)
                .ok_or_else(|| anyhow::anyhow!("no fused kernels for this encoder"))?;
            let out = fused.step_from_input(&host_raw, &lm_rows)?;
            (out.loss as f32, fused.gradients(&out, 1.0, &plain))
        } else {
            let loss = match &visual {
                Some(v) => {
                    let view =
                        model.view_from_visual(v.clone(), b.text.clone(), b.pad.clone(), None);
                    masked_token_ce(view.logits, b.text.clone(), b.answer.clone())
                }
                None => sft_loss(&model, b.clone()),
            };
            let value = loss
                .clone()
                .into_data()
                .iter::<f32>()
                .next()
                .unwrap_or(f32::NAN);
            (value, GradientsParams::from_grads(loss.backward(), &model))
        };
        model = optim.step(lr, model, grads);
        if step >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        losses.push(value as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(Side {
        median_ms: times[times.len() / 2],
        losses,
    })
}

/// `bench train`.
pub fn run(a: &TrainArgs, json: bool) -> Result<()> {
    if a.steps == 0 || a.records == 0 {
        bail!("--steps and --records must be at least 1");
    }
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    let device = evl_models::DeviceSpec::Cpu
        .device()
        .map_err(|e| anyhow::anyhow!("cpu device: {e}"))?
        .autodiff();
    let tmp = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for role in [Role::Student, Role::Teacher] {
        let name = format!("{role:?}").to_lowercase();
        if a.only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        let dir = match role {
            Role::Teacher => a.teacher.as_deref(),
            Role::Student => a.student.as_deref(),
        };
        let c = case(role, dir, a.records, tmp.path(), &device)?;
        let idx = batch_indices(&c.samples, &c.optim, 0);
        let ss: Vec<&Sample> = idx.iter().map(|&(i, _)| &c.samples[i]).collect();
        let turns: Vec<usize> = idx.iter().map(|&(_, k)| k).collect();
        let input = c.model.input();
        let b = evl_train::batch::make_batch(&ss, &turns, &c.tok, &input, &device);
        let params = c.model.num_params();
        let lr = c.optim.lr;
        let mut variants = if c.optim.freeze_vision {
            vec![Mode::Full, Mode::FullFused, Mode::Cached, Mode::Fused]
        } else {
            vec![Mode::Trained]
        };
        // The encoder learning (vision pre-training, distillation, SFT with
        // `freeze_vision = false`): autodiff, and the fused kernels where they cover it.
        if c.optim.freeze_vision {
            variants.push(Mode::Trained);
        }
        if evl_models::fused::FusedLm::covers_encoder(&c.model) {
            variants.push(Mode::TrainedFused);
        }
        // Rows' records numbered by first appearance.
        let mut seen: Vec<usize> = Vec::new();
        let records: Vec<usize> = idx
            .iter()
            .map(|&(i, _)| match seen.iter().position(|&s| s == i) {
                Some(r) => r,
                None => {
                    seen.push(i);
                    seen.len() - 1
                }
            })
            .collect();
        for &mode in &variants {
            let cached = matches!(mode, Mode::Cached | Mode::Fused);
            let rss_before = peak_rss_mib();
            let us = ours(&c, &b, &records, lr, a.warmup, a.steps, mode)?;
            let rss = peak_rss_mib();
            let reference = if a.no_torch {
                None
            } else {
                let shape = b.pixels.dims();
                let data: Vec<f32> = b.pixels.clone().into_data().iter::<f32>().collect();
                let px_path = tmp.path().join("pixels.f32");
                let mut f = std::fs::File::create(&px_path)?;
                for v in &data {
                    f.write_all(&v.to_le_bytes())?;
                }
                let width = b.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
                let ids: Vec<Vec<i64>> = b
                    .rows
                    .iter()
                    .map(|(r, _)| {
                        let mut r = r.clone();
                        r.resize(width, 0);
                        r
                    })
                    .collect();
                let answer: Vec<Vec<bool>> = b
                    .rows
                    .iter()
                    .map(|(_, m)| {
                        let mut m = m.clone();
                        m.resize(width, false);
                        m
                    })
                    .collect();
                let job = serde_json::json!({
                    "model": std::fs::canonicalize(&c.dir)?,
                    "pixels": px_path, "pixels_shape": shape, "ids": ids, "answer": answer,
                    "freeze_vision": c.optim.freeze_vision && !mode.trains_encoder(), "lr": lr,
                    "weight_decay": c.optim.weight_decay, "clip_norm": c.optim.clip_norm,
                    "warmup": a.warmup, "steps": a.steps, "cache_visual": cached,
                    "shared_prefix": mode.fused(), "records": records,
                });
                let job_path = tmp.path().join("train-job.json");
                std::fs::write(&job_path, job.to_string())?;
                match crate::infer::run_torch_vlm(&a.python, &job_path, threads, true)? {
                    Ok(v) => Some(v),
                    Err(e) => {
                        eprintln!(
                            "note: PyTorch reference not run ({e}); pip install -r crates/evl-bench/scripts/requirements.txt"
                        );
                        None
                    }
                }
            };
            let name = match mode {
                Mode::Full => c.name.clone(),
                Mode::Cached => format!("{}, visual tokens computed once, autodiff", c.name),
                Mode::Fused => format!(
                    "{}, visual tokens computed once, fused kernels with one prefix per record \
                     (what sft runs on the CPU); PyTorch with the same shared prefix",
                    c.name
                ),
                Mode::FullFused => format!(
                    "{}, frozen encoder run once per drawn record, fused kernels (what sft \
                     runs on the CPU when the tokens exceed its cache); PyTorch with the same \
                     sharing",
                    c.name
                ),
                Mode::Trained => format!("{}, encoder learning, autodiff", c.name),
                Mode::TrainedFused => format!(
                    "{}, encoder learning, fused kernels with one encoder pass and prefix per \
                     record (what sft and distill run on the CPU); PyTorch with the same sharing",
                    c.name
                ),
            };
            rows.push((
                name,
                params,
                c.optim.freeze_vision && !mode.trains_encoder(),
                b.rows.len(),
                us,
                rss_before,
                rss,
                reference,
            ));
        }
    }
    if json {
        let data: Vec<_> = rows
            .iter()
            .map(|(name, params, frozen, batch, us, _, rss, r)| {
                serde_json::json!({
                    "case": name, "params": params, "frozen_encoder": frozen, "batch": batch,
                    "threads": threads, "ours_ms": us.median_ms, "ours_losses": us.losses,
                    "ours_peak_rss_mib": rss,
                    "torch_ms": r.as_ref().map(|v| v["median_ms"].clone()),
                    "torch_losses": r.as_ref().map(|v| v["losses"].clone()),
                    "torch_peak_rss_mib": r.as_ref().map(|v| v["peak_rss_mib"].clone()),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"type": "bench", "data": {"case": "SFT training step", "rows": data}})
        );
        return Ok(());
    }
    println!(
        "SFT optimiser step (forward, answer CE, backward, AdamW), one fixed batch, {threads} thread(s), median of {} steps after {} warm-up",
        a.steps, a.warmup
    );
    for (name, params, frozen, batch, us, before, rss, r) in &rows {
        println!(
            "{name}: {params} parameters, batch {batch}, encoder {}",
            if *frozen {
                "frozen (as the preset's SFT)"
            } else {
                "trained"
            }
        );
        println!(
            "  evl-ecg {:10} {:9.2} ms/step  (process peak RSS {:.0} MiB, {:.0} before the steps)",
            if name.contains("fused") {
                "fused"
            } else {
                "burn flex"
            },
            us.median_ms,
            rss.unwrap_or(f64::NAN),
            before.unwrap_or(f64::NAN)
        );
        if let Some(v) = r {
            let t = v["median_ms"].as_f64().unwrap_or(f64::NAN);
            println!(
                "  PyTorch {:10} {t:9.2} ms/step  (process peak RSS {:.0} MiB)",
                v["torch"].as_str().unwrap_or("?"),
                v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
            );
            println!("  speed-up vs PyTorch: {:.2}x", t / us.median_ms);
            let theirs: Vec<f64> = v["losses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_f64())
                .collect();
            let first = (us.losses[0] - theirs.first().copied().unwrap_or(f64::NAN)).abs();
            let worst = us
                .losses
                .iter()
                .zip(&theirs)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            println!(
                "  same computation: step-1 loss {:.6} vs {:.6} (|d| {first:.1e}); largest |d| over {} steps {worst:.1e}; last {:.6} vs {:.6}",
                us.losses[0],
                theirs.first().copied().unwrap_or(f64::NAN),
                theirs.len(),
                us.losses.last().copied().unwrap_or(f64::NAN),
                theirs.last().copied().unwrap_or(f64::NAN),
            );
        }
    }
    Ok(())
}
