//! `evl-ecg plan`.

use anyhow::{Context, Result, bail};
use evl_hf::plan::{StepShape, plan_step};

use crate::args::PlanArgs;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn billions(n: u64) -> String {
    if n >= 100_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.2} M", n as f64 / 1e6)
    }
}

/// `plan`.
pub fn run(a: &PlanArgs, json: bool) -> Result<()> {
    let Some((w, h)) = a.image.split_once(['x', 'X']) else {
        bail!(
            "--image `{}`: expected WIDTHxHEIGHT, e.g. 2200x1700",
            a.image
        );
    };
    let (w, h): (usize, usize) = (
        w.trim()
            .parse()
            .with_context(|| format!("--image width `{w}`"))?,
        h.trim()
            .parse()
            .with_context(|| format!("--image height `{h}`"))?,
    );
    if !(a.mfu > 0.0 && a.mfu <= 1.0) || a.peak_tflops <= 0.0 {
        bail!("--mfu must be in (0, 1] and --peak-tflops positive");
    }
    let shape = StepShape {
        batch: a.batch,
        text_tokens: a.text_tokens,
        answer_tokens: a.answer_tokens,
        image: (h, w),
        online: a.online,
        eager_attention: a.eager,
    };
    let p = plan_step(&a.teacher, &a.student, &shape).map_err(|e| anyhow::anyhow!(e))?;
    let seconds = p.flops / (a.peak_tflops * 1e12 * a.mfu);
    if json {
        out!(
            "{}",
            serde_json::json!({"type": "summary", "data": {
                "plan": p, "shape": shape, "seconds_per_step": seconds,
                "peak_tflops": a.peak_tflops, "mfu": a.mfu,
            }})
        );
        return Ok(());
    }
    for (role, m, dir) in [
        ("teacher", &p.teacher, &a.teacher),
        ("student", &p.student, &a.student),
    ] {
        let c = &m.params;
        out!(
            "{role} {}: {} parameters (vision {}, projector {}, decoder {}, embeddings {}, head {})",
            dir.display(),
            billions(c.total),
            billions(c.vision),
            billions(c.projector),
            billions(c.decoder),
            billions(c.embeddings),
            billions(c.head)
        );
        out!(
            "  a {w}x{h} image: {} visual tokens in the LM ({} in the vision tower); sequence {}",
            m.visual_tokens,
            m.tower_tokens,
            m.seq
        );
    }
    out!(
        "one step, batch {} ({}), {} attention:",
        a.batch,
        if a.online {
            "teacher online"
        } else {
            "teacher cached"
        },
        if a.eager { "eager" } else { "fused" }
    );
    out!(
        "  student + head training state (bf16 weights and grads, fp32 master and AdamW moments, {} head parameters): {:.1} GiB",
        billions(p.head_params),
        gib(p.training_state)
    );
    out!(
        "  teacher weights (bf16): {:.1} GiB",
        gib(p.teacher_weights)
    );
    out!("  student activations: {:.1} GiB", gib(p.activations));
    out!("  logits: {:.1} GiB", gib(p.logits));
    out!("  total: {:.1} GiB", gib(p.total));
    if !a.online {
        out!(
            "  teacher cache: {:.1} MiB per example (f32), kept off the GPU",
            p.cache_per_example as f64 / (1u64 << 20) as f64
        );
    }
    out!(
        "  {:.1} TFLOP per step: about {seconds:.2} s at {} TFLOP/s x {:.0}% utilisation",
        p.flops / 1e12,
        a.peak_tflops,
        a.mfu * 100.0
    );
    out!(
        "  (an estimate; the paper reports 56.4 GB and 8.54 s per step on one H100 for its 7B -> 2B run)"
    );
    Ok(())
}
