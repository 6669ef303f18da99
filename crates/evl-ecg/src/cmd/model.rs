//! `model quantize`.

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::args::QuantizeArgs;

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `model quantize`.
pub fn quantize(a: &QuantizeArgs, json: bool) -> Result<()> {
    let q = evl_infer::bundle::quantize_bundle(&a.model, &a.out)
        .with_context(|| format!("quantizing {} into {}", a.model.display(), a.out.display()))?;
    let f32_engine = evl_infer::bundle::Engine::load(&a.model)?;
    let int8_engine = evl_infer::bundle::Engine::load(&a.out)?;
    // The two on the same SYNTHETIC records: largest probability change, answers that differ.
    let cfg = ecg_synth::SynthConfig {
        difficulty: ecg_synth::Difficulty::Mixed,
        ..Default::default()
    };
    let diffs: Vec<(f64, bool)> = (0..a.check)
        .into_par_iter()
        .map(|i| -> Result<(f64, bool)> {
            let rec = ecg_synth::generate(&cfg, 0x5eed_0008, i).record;
            let s = f32_engine.prepare(&rec)?;
            let (x, y) = (f32_engine.read(&s, None), int8_engine.read(&s, None));
            let d = x
                .probabilities
                .iter()
                .zip(&y.probabilities)
                .map(|((_, p), (_, r))| (p - r).abs())
                .fold(0.0, f64::max);
            Ok((d, x.answer == y.answer))
        })
        .collect::<Result<_>>()?;
    let max_dp = diffs.iter().map(|d| d.0).fold(0.0, f64::max);
    let mean_dp = diffs.iter().map(|d| d.0).sum::<f64>() / diffs.len().max(1) as f64;
    let same = diffs.iter().filter(|d| d.1).count();
    let (b0, b1) = (dir_bytes(&a.model), dir_bytes(&a.out));
    if json {
        out!(
            "{}",
            serde_json::json!({"type": "summary", "data": {
                "out": a.out, "scheme": q.scheme, "layers": q.layers,
                "bytes_f32": b0, "bytes_int8": b1,
                "synthetic_records": a.check, "max_abs_dp": max_dp, "mean_max_abs_dp": mean_dp,
                "same_answer": same,
            }})
        );
    } else {
        out!(
            "wrote {} ({} linear layers int8): {:.1} KiB -> {:.1} KiB",
            a.out.display(),
            q.layers.len(),
            b0 as f64 / 1024.0,
            b1 as f64 / 1024.0
        );
        out!(
            "on {} SYNTHETIC records: largest per-label probability change {max_dp:.4} (mean of \
             per-record maxima {mean_dp:.4}); same generated answer on {same}",
            a.check
        );
        out!(
            "(measure its accuracy on your data with `evl-ecg eval --model {}`)",
            a.out.display()
        );
    }
    Ok(())
}
