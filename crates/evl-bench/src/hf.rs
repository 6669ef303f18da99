//! `bench hf`: the paper's real architectures in burn against transformers on the same CPU,
//! same threads, same weights and inputs: forward, a training step (forward, answer CE,
//! backward, AdamW), greedy generation, peak memory, and a check that both computed the same
//! logits.
//!
//! `--size tiny` times the checkpoint as it is; `--size mid` builds a randomly initialised
//! model of the checkpoint's family at a mid size (Qwen3-VL: text 512 wide, 8 layers, 8 heads
//! / 4 KV of 64, MLP 1536; vision 256 wide, 6 blocks, DeepStack [1, 3, 5]) and writes it as a
//! checkpoint both sides load.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use evl_hf::HfConfig;
use evl_hf::weights::WeightDtype;
use evl_infer::hf::{HfBundle, HfExample};
use evl_models::hf::HfModel;
use evl_train::hf::{encode_examples, hf_sft};
use evl_train::train::OptimConfig;

use crate::data::{run_python, shared_data};

/// Arguments of `bench hf`.
#[derive(Debug, clap::Args)]
pub struct HfArgs {
    /// Checkpoint folder (default ../shared/hf/qwen3_vl_tiny); with --size mid, the family,
    /// tokenizer and processor it lends the mid-size model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `tiny`: the checkpoint as it is; `mid`: a random Qwen3-VL of mid size.
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "mid"])]
    pub size: String,
    /// ECG image (default: a PTB-XL page from ../shared/data).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Timed repetitions of each phase (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Tokens generated per timed generation.
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Threads on both sides.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Do not run the PyTorch reference.
    #[arg(long)]
    pub no_torch: bool,
    /// Python interpreter with torch and transformers (bench/requirements-hf.txt).
    #[arg(long, default_value = "python3")]
    pub python: String,
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A mid-size Qwen3-VL written as a checkpoint into `out`, borrowing `base`'s tokenizer and
/// processor files.
fn mid_checkpoint(base: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(base.join("config.json"))
        .with_context(|| format!("reading {}", base.join("config.json").display()))?;
    let mut c: serde_json::Value = serde_json::from_str(&text)?;
    if c["model_type"] != "qwen3_vl" {
        bail!(
            "--size mid builds a Qwen3-VL; {} is not one",
            base.display()
        );
    }
    let t = &mut c["text_config"];
    for (k, v) in [
        ("hidden_size", 512),
        ("num_hidden_layers", 8),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 4),
        ("head_dim", 64),
        ("intermediate_size", 1536),
    ] {
        t[k] = v.into();
    }
    for key in ["rope_parameters", "rope_scaling"] {
        if t[key].is_object() {
            t[key]["mrope_section"] = serde_json::json!([12, 10, 10]);
        }
    }
    let v = &mut c["vision_config"];
    for (k, val) in [
        ("hidden_size", 256),
        ("depth", 6),
        ("num_heads", 4),
        ("intermediate_size", 1024),
        ("out_hidden_size", 512),
    ] {
        v[k] = val.into();
    }
    v["deepstack_visual_indexes"] = serde_json::json!([1, 3, 5]);
    std::fs::create_dir_all(out)?;
    for entry in std::fs::read_dir(base)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_file()
            && name.ends_with(".json")
            && name != "config.json"
            && name != "case.json"
            && !name.ends_with(".index.json")
        {
            std::fs::copy(&p, out.join(name))?;
        }
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&c)?)?;
    let cfg = HfConfig::from_dir(out)?;
    let model = HfModel::init(&cfg, 7, &Device::flex())?;
    evl_hf::weights::save(
        &out.join("model.safetensors"),
        &model.export(),
        WeightDtype::F32,
    )?;
    Ok(())
}

/// `bench hf`.
pub fn run(a: &HfArgs, json: bool) -> Result<()> {
    if a.reps == 0 || a.gen_tokens == 0 {
        bail!("--reps and --gen-tokens must be at least 1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()
        .ok();
    let shared = || {
        shared_data().context(
            "no ../shared/data: pass --model (a checkpoint folder) and --image (an ECG image)",
        )
    };
    let base = match &a.model {
        Some(m) => m.clone(),
        None => shared()?.join("../hf/qwen3_vl_tiny"),
    };
    let image_path = match &a.image {
        Some(p) => p.clone(),
        None => shared()?.join("ptbxl_subset/records100/00000/00004_lr-0.png"),
    };
    let tmp = tempfile::tempdir()?;
    let dir = if a.size == "mid" {
        let d = tmp.path().join("mid");
        mid_checkpoint(&base, &d)?;
        d
    } else {
        base.clone()
    };
    let device = Device::flex();
    let bundle = HfBundle::load(&dir, &device)?;
    let params = bundle.model.num_params();
    let example = HfExample {
        id: "bench".into(),
        image: image_path.clone(),
        turns: vec![(
            "Which diagnostic superclasses does this ECG show?".into(),
            "Sinus rhythm. Normal ECG. NORM.".into(),
        )],
    };
    let enc = encode_examples(&bundle, std::slice::from_ref(&example))?;
    let turn = &enc.turns[0][0];
    let image = enc.images[0].to_model(&device);
    // Forward.
    let forward = || -> Result<burn::tensor::Tensor<3>> {
        Ok(bundle
            .model
            .logits(std::slice::from_ref(&turn.ids), &[Some(image.clone())])?)
    };
    let logits = forward()?;
    let mut fwd = Vec::new();
    for _ in 0..a.reps {
        let t = Instant::now();
        let z = forward()?;
        let [_, s, _] = z.dims();
        let _ = z.slice([0..1, s - 1..s, 0..1]).into_data();
        fwd.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Training steps: forward, answer CE, backward, AdamW (the first step is the warm-up).
    let train_device = device.clone().autodiff();
    let trainable = HfBundle::load(&dir, &train_device)?;
    let cfg = OptimConfig {
        steps: a.reps + 1,
        batch_size: 1,
        accumulate: 1,
        lr: 1e-5,
        warmup: 0,
        weight_decay: 0.01,
        clip_norm: f64::MAX,
        ..OptimConfig::default()
    };
    let (_, logs) = hf_sft(trainable.model, &enc, &cfg, None, &train_device, |_| {})?;
    let train_ms = median(logs[1..].iter().map(|l| l.ms).collect());
    let peak = peak_rss_mib();
    // Greedy generation of exactly gen_tokens tokens.
    let prompt = bundle.question_ids(&example.turns[0].0, enc.image_tokens[0])?;
    let mut gen_rates = Vec::new();
    for r in 0..=a.reps.div_ceil(2) {
        let t = Instant::now();
        let out = bundle
            .model
            .generate(&prompt, Some(image.clone()), a.gen_tokens, &[])?;
        let secs = t.elapsed().as_secs_f64();
        if r > 0 {
            gen_rates.push(out.len() as f64 / secs);
        }
    }
    let ours = serde_json::json!({
        "forward_ms": median(fwd),
        "train_step_ms": train_ms,
        "gen_tokens_per_s": median(gen_rates),
        "peak_rss_mib": peak,
        "loss": logs[0].total,
    });
    let mut reference = None;
    if !a.no_torch {
        let inputs = tmp.path().join("inputs.safetensors");
        let mut tensors = bundle.reference_inputs_for(&turn.ids, &enc.images[0], &device)?;
        tensors.push((
            "labels_mask".into(),
            evl_hf::weights::HostTensor {
                shape: vec![1, turn.ids.len()],
                data: turn
                    .answer
                    .iter()
                    .map(|&m| f32::from(u8::from(m)))
                    .collect(),
            },
        ));
        evl_hf::weights::save(&inputs, &tensors, WeightDtype::F32)?;
        let job = serde_json::json!({
            "model": std::fs::canonicalize(&dir)?, "inputs": inputs,
            "reps": a.reps, "gen_tokens": a.gen_tokens,
        });
        let job_path = tmp.path().join("job.json");
        std::fs::write(&job_path, job.to_string())?;
        let scripts = crate::scripts::Scripts::write()?;
        let script = scripts.path(crate::scripts::TORCH_HF);
        match run_python(
            &a.python,
            &[
                script.to_str().unwrap_or_default(),
                "--job",
                job_path.to_str().unwrap_or_default(),
                "--threads",
                &a.threads.to_string(),
            ],
            None,
        ) {
            Ok(v) => reference = Some(v),
            Err(e) => eprintln!(
                "note: PyTorch reference not run ({e}); install bench/requirements-hf.txt and pass --python"
            ),
        }
    }
    drop(logits);
    let ratio = |k: &str, higher_better: bool| -> Option<f64> {
        let r = reference.as_ref()?[k].as_f64()?;
        let o = ours[k].as_f64()?;
        Some(if higher_better { o / r } else { r / o })
    };
    let summary = serde_json::json!({
        "case": format!("{} {} ({} parameters)", bundle.family(), a.size, params),
        "threads": a.threads, "seq": turn.ids.len(), "image_tokens": enc.image_tokens[0],
        "ours": ours, "torch": reference,
        "speedup_forward": ratio("forward_ms", false),
        "speedup_train_step": ratio("train_step_ms", false),
        "speedup_generation": ratio("gen_tokens_per_s", true),
    });
    if json {
        println!("{}", serde_json::json!({"type": "bench", "data": summary}));
        return Ok(());
    }
    let f = |v: &serde_json::Value| v.as_f64().map_or("n/a".into(), |x| format!("{x:.1}"));
    let x = |v: Option<f64>| v.map_or("n/a".into(), |x| format!("{x:.2}x"));
    println!(
        "{}; {} tokens ({} visual), {} threads",
        summary["case"].as_str().unwrap_or(""),
        turn.ids.len(),
        enc.image_tokens[0],
        a.threads
    );
    let r = reference.clone().unwrap_or_default();
    println!(
        "  forward            ours {:>9} ms  torch {:>9} ms  ({} ours faster)",
        f(&ours["forward_ms"]),
        f(&r["forward_ms"]),
        x(ratio("forward_ms", false))
    );
    println!(
        "  training step      ours {:>9} ms  torch {:>9} ms  ({})",
        f(&ours["train_step_ms"]),
        f(&r["train_step_ms"]),
        x(ratio("train_step_ms", false))
    );
    println!(
        "  generation         ours {:>9} tok/s torch {:>9} tok/s ({})",
        f(&ours["gen_tokens_per_s"]),
        f(&r["gen_tokens_per_s"]),
        x(ratio("gen_tokens_per_s", true))
    );
    if r.get("forward_ms_sdpa").is_some() {
        println!(
            "  torch with its fused attention (sdpa; ours is the eager form): forward {} ms, training step {} ms",
            f(&r["forward_ms_sdpa"]),
            f(&r["train_step_ms_sdpa"])
        );
    }
    println!(
        "  peak RSS           ours {:>9} MiB torch {:>9} MiB",
        f(&ours["peak_rss_mib"]),
        f(&r["peak_rss_mib"])
    );
    if let Some(d) = r.get("logits_max_abs_diff") {
        println!("  same computation: max |logits ours - torch| = {d}");
    }
    Ok(())
}
