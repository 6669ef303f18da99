//! `evl-ecg bench infer`: per-record student inference, ours vs the same weights in PyTorch.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use evl_infer::eval::evaluate;
use evl_infer::input::{encode_prompt, pixels, samples_from_records};
use evl_infer::text::{DIAGNOSIS_PROMPT, EOS, verify_prompt};

use crate::args::InferArgs as BenchInferArgs;
use crate::data::{run_python, shared_data};

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// Run `torch_vlm.py` on a job file (`--train`: optimiser steps, else inference) with
/// `threads` threads; `Ok(Err(why))` when Python or PyTorch is not there.
pub(crate) fn run_torch_vlm(
    python: &str,
    job: &std::path::Path,
    threads: usize,
    train: bool,
) -> Result<std::result::Result<serde_json::Value, String>> {
    let scripts = crate::scripts::Scripts::write()?;
    let script = scripts.path(crate::scripts::TORCH_VLM);
    let threads = threads.to_string();
    let mut args = vec![
        script.to_str().unwrap_or_default(),
        "--job",
        job.to_str().unwrap_or_default(),
        "--threads",
        &threads,
    ];
    if train {
        args.push("--train");
    }
    Ok(run_python(python, &args, None))
}

/// `bench infer`.
pub fn run(a: &BenchInferArgs, json: bool) -> Result<()> {
    if a.reps == 0 || a.n == 0 {
        bail!("--reps and --n must be at least 1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()
        .ok();
    let device = a
        .device
        .device()
        .map_err(|e| anyhow::anyhow!("--device {}: {e}", a.device))?;
    let bundle = evl_infer::bundle::ModelBundle::load(&a.model, &device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let dir = match &a.data {
        Some(d) => d.clone(),
        None => shared_data()
            .map(|d| d.join("ptbxl_subset/records500"))
            .context("no --data and ../shared/data is not here")?,
    };
    let mut records = Vec::new();
    for hea in ecg_data::walk(&dir, "hea").into_iter().take(a.n) {
        let rec = ecg_io::read_record(&hea, ecg_io::ReadOptions::default())
            .with_context(|| format!("reading {}", hea.display()))?;
        records.push((rec, Vec::new(), Vec::new()));
    }
    if records.is_empty() {
        bail!("no records under {}", dir.display());
    }
    let recs: Vec<ecg_io::Record> = records.iter().map(|r| r.0.clone()).collect();
    let samples = samples_from_records(records, &bundle.spec, 0)?;
    // End to end: from the record as read (its own rate) through `interpret` (resampling
    // or rendering, the model, decoding the answer), median over the same passes.
    let end_to_end = |e: &evl_infer::bundle::Engine| -> Result<f64> {
        let mut times = Vec::new();
        for rep in 0..=a.reps {
            for r in &recs {
                let t = Instant::now();
                std::hint::black_box(e.interpret(r)?);
                if rep > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let space = &bundle.space;
    // Ours: one record at a time, as `interpret` does.
    let mut times = Vec::new();
    let mut ours = Vec::new();
    for rep in 0..=a.reps {
        for s in &samples {
            let t = Instant::now();
            let (_, lines) = evaluate(
                &bundle.model,
                &bundle.tok,
                std::slice::from_ref(s),
                space,
                &device,
            );
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if rep == 0 {
                ours.push(lines.into_iter().next().expect("one line"));
            } else {
                times.push(ms);
            }
        }
    }
    times.sort_by(f64::total_cmp);
    let burn_ms = times[times.len() / 2];
    // The native engine (what `interpret` uses).
    let mut ntimes = Vec::new();
    let mut native = Vec::new();
    for rep in 0..=a.reps {
        for s in &samples {
            let t = Instant::now();
            let ans = bundle.answer(s);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if rep == 0 {
                native.push(ans);
            } else {
                ntimes.push(ms);
            }
        }
    }
    ntimes.sort_by(f64::total_cmp);
    let our_ms = ntimes[ntimes.len() / 2];
    let our_e2e_ms = end_to_end(&bundle.engine)?;
    // Native and burn compute the same thing.
    let mut native_diff = 0.0f64;
    let mut native_same = 0;
    for (n, o) in native.iter().zip(&ours) {
        for (p, q) in n.probs.iter().zip(&o.probs) {
            native_diff = native_diff.max((p - q).abs());
        }
        native_same += (bundle.tok.decode(&n.generated) == o.text) as usize;
    }
    // The int8 engine, timed the same way, compared with the f32 engine.
    let int8 = match &a.int8 {
        Some(dir) => {
            let e = evl_infer::bundle::Engine::load(dir)
                .with_context(|| format!("loading {}", dir.display()))?;
            let mut t8 = Vec::new();
            let mut answers = Vec::new();
            for rep in 0..=a.reps {
                for s in &samples {
                    let t = Instant::now();
                    let ans = e.answer(s, None);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    if rep == 0 {
                        answers.push(ans);
                    } else {
                        t8.push(ms);
                    }
                }
            }
            t8.sort_by(f64::total_cmp);
            let mut diff = 0.0f64;
            let mut same = 0;
            for (q, n) in answers.iter().zip(&native) {
                for (p, r) in q.probs.iter().zip(&n.probs) {
                    diff = diff.max((p - r).abs());
                }
                same += usize::from(q.generated == n.generated);
            }
            let bytes = (bundle.engine.native.weight_bytes(), e.native.weight_bytes());
            Some((t8[t8.len() / 2], diff, same, bytes, end_to_end(&e)?))
        }
        None => None,
    };
    let our_rss = peak_rss_mib();
    let params = bundle.model.facts().params;
    let mut reference = None;
    if !a.no_torch {
        let tmp = tempfile::tempdir()?;
        let input = bundle.model.input();
        let refs: Vec<&evl_infer::input::Sample> = samples.iter().collect();
        let px = pixels(&refs, &input, &device);
        let shape = px.dims();
        let data: Vec<f32> = px.into_data().iter::<f32>().collect();
        let px_path = tmp.path().join("pixels.f32");
        let mut f = std::fs::File::create(&px_path)?;
        for v in &data {
            f.write_all(&v.to_le_bytes())?;
        }
        let first = |w: &str| bundle.tok.encode(w).0.first().copied().unwrap_or(EOS);
        let job = serde_json::json!({
            "model": std::fs::canonicalize(&a.model)?,
            "pixels": px_path,
            "pixels_shape": shape,
            "verify_prompts": space.iter().map(|l| encode_prompt(&bundle.tok, &verify_prompt(l))).collect::<Vec<_>>(),
            "diagnosis_prompt": encode_prompt(&bundle.tok, DIAGNOSIS_PROMPT),
            "yes": first("yes"), "no": first("no"), "eos": EOS, "reps": a.reps,
        });
        let job_path = tmp.path().join("job.json");
        std::fs::write(&job_path, job.to_string())?;
        match run_torch_vlm(&a.python, &job_path, a.threads, false)? {
            Ok(v) => {
                // Same computation? Probabilities to float tolerance, answers exactly.
                let mut max_diff = 0.0f64;
                let mut same_answers = 0;
                for (o, r) in ours
                    .iter()
                    .zip(v["outputs"].as_array().into_iter().flatten())
                {
                    for (p, q) in o
                        .probs
                        .iter()
                        .zip(r["probs"].as_array().into_iter().flatten())
                    {
                        max_diff = max_diff.max((p - q.as_f64().unwrap_or(f64::NAN)).abs());
                    }
                    let ids: Vec<i64> = r["ids"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_i64())
                        .collect();
                    same_answers += (bundle.tok.decode(&ids) == o.text) as usize;
                }
                reference = Some((v, max_diff, same_answers));
            }
            Err(e) => eprintln!(
                "note: PyTorch reference not run ({e}); pip install -r crates/evl-bench/scripts/requirements.txt"
            ),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"type": "bench", "data": {
                "case": "student inference per record", "records": samples.len(), "params": params,
                "ours_ms": our_ms, "ours_end_to_end_ms": our_e2e_ms, "ours_burn_ms": burn_ms, "ours_peak_rss_mib": our_rss,
                "native_vs_burn_max_prob_diff": native_diff, "native_vs_burn_same_answers": native_same,
                "torch_ms": reference.as_ref().map(|r| r.0["median_ms"].clone()),
                "torch_peak_rss_mib": reference.as_ref().map(|r| r.0["peak_rss_mib"].clone()),
                "max_prob_diff": reference.as_ref().map(|r| r.1),
                "same_answers": reference.as_ref().map(|r| r.2),
                "int8_ms": int8.as_ref().map(|r| r.0),
                "int8_end_to_end_ms": int8.as_ref().map(|r| r.4),
                "int8_vs_f32_max_prob_diff": int8.as_ref().map(|r| r.1),
                "int8_vs_f32_same_answers": int8.as_ref().map(|r| r.2),
                "weight_bytes_f32": int8.as_ref().map(|r| r.3.0),
                "weight_bytes_int8": int8.as_ref().map(|r| r.3.1),
            }})
        );
        return Ok(());
    }
    println!(
        "student ({params} parameters), {} records, {} label questions + greedy diagnosis per record, {} thread(s)",
        samples.len(),
        space.len(),
        a.threads
    );
    println!(
        "  evl-ecg native       {our_ms:8.3} ms/record  (what interpret runs; process peak RSS {:.0} MiB)",
        our_rss.unwrap_or(f64::NAN)
    );
    println!(
        "  evl-ecg native       {our_e2e_ms:8.3} ms/record end to end (the record as read: \
         resampling, model, decoding)"
    );
    println!(
        "  evl-ecg burn {:8}{burn_ms:8.3} ms/record",
        a.device.to_string()
    );
    println!(
        "  native vs burn: max |dp| = {native_diff:.2e}, answers identical on {native_same}/{}",
        samples.len()
    );
    if let Some((ms, diff, same, (b32, b8), e2e)) = &int8 {
        println!(
            "  evl-ecg native int8  {ms:8.3} ms/record  ({:.2}x the f32 engine; weights in memory {:.0} KiB vs {:.0} KiB)",
            our_ms / ms,
            *b8 as f64 / 1024.0,
            *b32 as f64 / 1024.0
        );
        println!("  evl-ecg native int8  {e2e:8.3} ms/record end to end");
        println!(
            "  int8 vs f32: max |dp| = {diff:.2e}, answers identical on {same}/{}",
            samples.len()
        );
    }
    if let Some((v, diff, same)) = &reference {
        let t = v["median_ms"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  PyTorch {:14} {t:8.3} ms/record  (process peak RSS {:.0} MiB)",
            v["torch"].as_str().unwrap_or("?"),
            v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "  speed-up vs PyTorch: native {:.2}x, burn {:.2}x{}",
            t / our_ms,
            t / burn_ms,
            int8.as_ref()
                .map_or(String::new(), |r| format!(", native int8 {:.2}x", t / r.0))
        );
        println!(
            "  same computation: max |p_ours - p_torch| = {diff:.2e}; generated answers identical on {same}/{}",
            samples.len()
        );
    }
    Ok(())
}
