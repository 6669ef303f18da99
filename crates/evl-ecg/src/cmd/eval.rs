//! `evl-ecg eval`.

use anyhow::{Context, Result, bail};
use ecg_io::labels::ptbxl::Split;
use ecg_signal::perturb::Perturbation;
use evl_infer::dataset::{EvalOptions, eval_dataset};

use crate::args::EvalArgs;

/// `eval`.
pub fn run(a: &EvalArgs, json: bool) -> Result<()> {
    let split = match a.split.as_str() {
        "train" => Some(Split::Train),
        "val" => Some(Split::Val),
        "test" => Some(Split::Test),
        "all" => None,
        other => bail!("--split `{other}`: expected train, val, test or all"),
    };
    let perturb = a
        .perturb
        .iter()
        .map(|s| s.parse::<Perturbation>())
        .collect::<Result<Vec<_>, _>>()
        .context("--perturb")?;
    let device = crate::cmd::device(a.device)?;
    let opts = EvalOptions {
        split,
        limit: a.limit,
        perturb,
        seed: a.seed,
        resamples: a.resamples,
        no_verify: a.no_verify,
    };
    let say = |m: &str| {
        if !json {
            eprintln!("{m}");
        }
    };
    let out = a.out.as_deref();
    let r = if evl_infer::hf::is_checkpoint(&a.model) {
        let bundle = evl_infer::hf::HfBundle::load(&a.model, &device)
            .with_context(|| format!("loading checkpoint {}", a.model.display()))?;
        eval_dataset(&bundle, &a.model, &a.data, &opts, out, &device, say)
    } else if a.model.join("quantization.json").is_file() {
        // An int8 bundle runs on the native engine only.
        let engine = evl_infer::bundle::Engine::load(&a.model)
            .with_context(|| format!("loading model {}", a.model.display()))?;
        eval_dataset(&engine, &a.model, &a.data, &opts, out, &device, say)
    } else {
        let bundle = evl_infer::bundle::ModelBundle::load(&a.model, &device)
            .with_context(|| format!("loading model {}", a.model.display()))?;
        eval_dataset(&bundle, &a.model, &a.data, &opts, out, &device, say)
    }
    .with_context(|| format!("evaluating {} on {}", a.model.display(), a.data.display()))?;
    if json {
        out!("{}", serde_json::json!({"type": "summary", "data": r}));
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.3}"));
    let s = &r.scores;
    out!(
        "{} records ({} split), label space {:?}",
        r.n,
        r.split,
        r.space
    );
    if r.outside_space > 0 {
        out!(
            "  note: {} record(s) carry no label of this space (scored as all-negative)",
            r.outside_space
        );
    }
    out!(
        "  macro ROC AUC {} (95% CI {}), macro PR AUC {}, Fmax {:.3}, ECE {:.3}",
        f(s.macro_auc),
        s.macro_auc_ci95
            .map_or("n/a".into(), |(a, b)| format!("{a:.3}..{b:.3}")),
        f(s.macro_ap),
        s.fmax,
        s.ece
    );
    out!(
        "  macro F1 at 0.5 {:.3}, at validation thresholds {} ({} val records); subset accuracy {:.3}",
        s.macro_f1_at_05,
        f(r.macro_f1_at_val_thresholds),
        r.n_val,
        s.subset_accuracy
    );
    out!(
        "  ECG-Bench parity of the generated answers: F1 {:.3}, \"AUC\" of 0/1 answers {}, Hamming {:.3}",
        s.parity_f1,
        f(s.parity_auc_binary),
        s.parity_hamming
    );
    for c in &r.per_class {
        out!(
            "  {:6} positives {:4}  AUC {}  AP {}",
            c.label,
            c.positives,
            f(c.auc),
            f(c.ap)
        );
    }
    for p in &r.perturbations {
        out!("{}:", p.spec);
        for d in &p.deltas {
            out!(
                "  {:15} {} -> {}  change {}{}",
                d.metric,
                f(d.clean),
                f(d.perturbed),
                d.delta.map_or("n/a".into(), |x| format!("{x:+.3}")),
                d.ci95.map_or(String::new(), |(a, b)| format!(
                    " (95% CI {a:+.3} .. {b:+.3})"
                ))
            );
        }
    }
    out!("  {:.1} ms per record (model only)", r.ms_per_record);
    if let Some(o) = &a.out {
        out!(
            "wrote {}/metrics.json, predictions.jsonl, gold.json",
            o.display()
        );
    }
    Ok(())
}
