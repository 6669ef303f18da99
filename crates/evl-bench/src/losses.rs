//! `evl-ecg bench losses`: our losses (burn, `flex` CPU, f32) against the PyTorch/POT
//! reference script `crates/evl-bench/scripts/torch_losses.py`, run in the same invocation on the same shapes.

use crate::args::{LossesArgs as BenchLossesArgs, ShapePreset};
use anyhow::{Context, Result};
use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use evl_kd::baselines::{
    Dskd, MultiLevelOtConfig, kd_vanilla, multilevel_ot_loss, rkd_loss, tinybert_hidden_loss,
    uld_loss,
};
use evl_kd::sinkhorn::{Problem, Stop, sinkhorn_host};
use evl_kd::{
    EvlInputs, EvlWeights, MhcaWeights, OtLossConfig, RelationConfig, evl_objective,
    mhca_align_loss, ot_loss, relation_loss,
};
use evl_models::DeviceSpec;
use evl_models::device::{Precision, tensor_from_f64};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::time::Instant;

/// Shapes of one benchmark configuration (method.md symbols).
#[derive(Clone, Debug, Serialize)]
struct Shapes {
    name: &'static str,
    b: usize,
    v_t: usize,
    v_s: usize,
    l_t: usize,
    l_s: usize,
    d_t: usize,
    d_s: usize,
    heads: usize,
    vocab_s: usize,
    vocab_t: usize,
    n_iter: usize,
    eps: f64,
    /// Tokens per item for RKD (at most `l_s`, see `rkd_len`).
    rkd_len: usize,
}

fn presets(p: ShapePreset, quick: bool) -> Vec<Shapes> {
    let small = Shapes {
        name: "small",
        b: 8,
        v_t: 64,
        v_s: 16,
        l_t: 96,
        l_s: 64,
        d_t: 256,
        d_s: 128,
        heads: 8,
        vocab_s: 512,
        vocab_t: 1024,
        n_iter: 100,
        eps: evl_kd::PAPER_EPS,
        rkd_len: 64,
    };
    let paper = Shapes {
        name: "paper-cpu",
        b: 4,
        v_t: 576,
        v_s: 144,
        l_t: 512,
        l_s: 512,
        d_t: 1024,
        d_s: 512,
        heads: 8,
        vocab_s: 4096,
        vocab_t: 2048,
        n_iter: 100,
        eps: evl_kd::PAPER_EPS,
        rkd_len: 64,
    };
    if quick {
        return vec![Shapes {
            name: "quick",
            b: 2,
            v_t: 8,
            v_s: 4,
            l_t: 6,
            l_s: 5,
            d_t: 16,
            d_s: 8,
            heads: 2,
            vocab_s: 12,
            vocab_t: 10,
            n_iter: 10,
            eps: evl_kd::PAPER_EPS,
            rkd_len: 5,
        }];
    }
    match p {
        ShapePreset::Small => vec![small],
        ShapePreset::Paper => vec![paper],
        ShapePreset::Both => vec![small, paper],
    }
}

/// Deterministic standard normals (splitmix64 + Box–Muller): the inputs' values do not
/// matter for timing, only that both runs see well-scaled data.
fn randn(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| (-2.0 * (next().max(1e-300)).ln()).sqrt() * (std::f64::consts::TAU * next()).cos())
        .collect()
}

/// Tokens per item for RKD (its triplet-angle tensor is `[B, L, L, L]`).
fn rkd_len(s: &Shapes) -> usize {
    s.rkd_len.min(s.l_s)
}

/// A bias-free linear layer holding `w` (`[d_in, d_out]`).
fn lin(w: burn::tensor::Tensor<2>) -> Linear {
    Linear {
        weight: Param::from_tensor(w),
        bias: None,
    }
}

/// Median wall time of `f` in milliseconds; each call ends with a device sync, so work a GPU
/// queued is counted (on the CPU the sync returns at once).
fn median_ms(dev: &Device, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut run = || {
        f();
        dev.sync().expect("device sync after a timed run");
    };
    run(); // warm-up
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            run();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn our_times(s: &Shapes, reps: usize, device: &Device) -> BTreeMap<String, f64> {
    let dev = device.clone().autodiff();
    let t = |shape: [usize; 3], seed| {
        tensor_from_f64(
            &randn(shape.iter().product(), seed),
            shape,
            &dev,
            Precision::F32,
        )
        .require_grad()
    };
    let w = |shape: [usize; 2], seed: u64| {
        let scale = 1.0 / (shape[0] as f64).sqrt();
        let v: Vec<f64> = randn(shape[0] * shape[1], seed)
            .iter()
            .map(|x| x * scale)
            .collect();
        tensor_from_f64(&v, shape, &dev, Precision::F32).require_grad()
    };
    let dk = s.d_s / s.heads;
    let weights = || MhcaWeights {
        wq: w([s.d_s, s.heads * dk], 3),
        wk: w([s.d_t, s.heads * dk], 4),
        wv: w([s.d_t, s.heads * dk], 5),
        wo: w([s.heads * dk, s.d_s], 6),
    };
    let ot_cfg = OtLossConfig {
        eps: s.eps,
        stop: Stop::Iterations(s.n_iter),
        ..OtLossConfig::default()
    };
    let mut out = BTreeMap::new();

    let cost: Vec<f64> = randn(s.b * s.v_t * s.v_s, 7)
        .iter()
        .map(|x| x.abs().min(4.0))
        .collect();
    out.insert(
        "sinkhorn_plan".into(),
        median_ms(&dev, reps, || {
            let p = sinkhorn_host(
                &cost,
                Problem {
                    batch: s.b,
                    n: s.v_t,
                    m: s.v_s,
                    row_mask: None,
                    col_mask: None,
                },
                s.eps,
                Stop::Iterations(s.n_iter),
            );
            std::hint::black_box(p);
        }),
    );
    out.insert("ot_loss".into(), {
        let (tv, sv) = (t([s.b, s.v_t, s.d_s], 1), t([s.b, s.v_s, s.d_s], 2));
        median_ms(&dev, reps, || {
            let o = ot_loss(tv.clone(), sv.clone(), None, None, &ot_cfg);
            let g = o.loss.backward();
            std::hint::black_box((tv.grad(&g), sv.grad(&g)));
        })
    });
    // The teacher's hidden states are a frozen input (no gradient), as in distillation; the
    // PyTorch reference does the same.
    let frozen = |shape: [usize; 3], seed| {
        tensor_from_f64(
            &randn(shape.iter().product(), seed),
            shape,
            &dev,
            Precision::F32,
        )
    };
    out.insert("mhca".into(), {
        let (hs, ht, wts) = (
            t([s.b, s.l_s, s.d_s], 8),
            frozen([s.b, s.l_t, s.d_t], 9),
            weights(),
        );
        median_ms(&dev, reps, || {
            let loss = mhca_align_loss(hs.clone(), ht.clone(), &wts, s.heads, None, None);
            let g = loss.backward();
            std::hint::black_box((hs.grad(&g), wts.wq.grad(&g)));
        })
    });
    out.insert("relation".into(), {
        let (a, b) = (t([s.b, s.l_s, s.d_s], 10), t([s.b, s.l_s, s.d_s], 11));
        median_ms(&dev, reps, || {
            let r = relation_loss(a.clone(), b.clone(), None, &RelationConfig::default());
            let g = r.l_rel.backward();
            std::hint::black_box((a.grad(&g), b.grad(&g)));
        })
    });
    out.insert("evl_total".into(), {
        let (hs, ht, wts) = (
            t([s.b, s.l_s, s.d_s], 8),
            frozen([s.b, s.l_t, s.d_t], 9),
            weights(),
        );
        let (tv, sv) = (t([s.b, s.v_t, s.d_s], 1), t([s.b, s.v_s, s.d_s], 2));
        let l_ce = tensor_from_f64(&[2.0], [1], &dev, Precision::F32).require_grad();
        median_ms(&dev, reps, || {
            let inputs =
                EvlInputs::unmasked(l_ce.clone(), hs.clone(), ht.clone(), tv.clone(), sv.clone());
            let terms = evl_objective(
                inputs,
                &wts,
                s.heads,
                &EvlWeights::default(),
                &ot_cfg,
                &RelationConfig::default(),
            );
            let g = terms.total.backward();
            std::hint::black_box((hs.grad(&g), sv.grad(&g)));
        })
    });
    // Baselines (method.md 3). The teacher's states and logits are frozen inputs.
    let wmat = |r: usize, c: usize, seed: u64| w([r, c], seed);
    out.insert("tinybert_hidden".into(), {
        let (hs, ht, wh) = (
            t([s.b, s.l_s, s.d_s], 20),
            frozen([s.b, s.l_t, s.d_t], 21),
            wmat(s.d_s, s.d_t, 22),
        );
        median_ms(&dev, reps, || {
            let g = tinybert_hidden_loss(hs.clone(), ht.clone(), wh.clone(), None).backward();
            std::hint::black_box((hs.grad(&g), wh.grad(&g)));
        })
    });
    // RKD's triplet angles are O(L^3 D): measured on the first `rkd_len` tokens.
    let rl = rkd_len(s);
    out.insert("rkd".into(), {
        let (tt, ss) = (frozen([s.b, rl, s.d_t], 23), t([s.b, rl, s.d_s], 24));
        median_ms(&dev, reps, || {
            let g = rkd_loss(tt.clone(), ss.clone(), 1.0, 2.0).backward();
            std::hint::black_box(ss.grad(&g));
        })
    });
    out.insert("multilevel_ot".into(), {
        let zs = t([s.b, s.l_s, s.vocab_s], 25);
        let zt = frozen([s.b, s.l_t, s.vocab_t], 26);
        let cfg = MultiLevelOtConfig {
            n_iter: s.n_iter,
            eps: s.eps,
            ..MultiLevelOtConfig::default()
        };
        median_ms(&dev, reps, || {
            let g = multilevel_ot_loss(zs.clone(), zt.clone(), &cfg)
                .loss
                .backward();
            std::hint::black_box(zs.grad(&g));
        })
    });
    out.insert("dskd".into(), {
        let m = Dskd {
            query: lin(wmat(s.d_t, 64, 27)),
            key: lin(wmat(s.d_s, 64, 28)),
            s_to_t: lin(wmat(s.d_s, s.d_t, 29)),
            t_to_s: lin(wmat(s.d_t, s.d_s, 30)),
        };
        let (hs, ht) = (t([s.b, s.l_s, s.d_s], 31), frozen([s.b, s.l_t, s.d_t], 32));
        let (zs, zt) = (
            t([s.b, s.l_s, s.vocab_s], 33),
            frozen([s.b, s.l_t, s.vocab_t], 34),
        );
        let unit = |r: usize, c: usize, seed: u64| {
            let v: Vec<f64> = randn(r * c, seed)
                .iter()
                .map(|x| x / (r as f64).sqrt())
                .collect();
            tensor_from_f64(&v, [r, c], &dev, Precision::F32)
        };
        let (head_s, head_t) = (unit(s.d_s, s.vocab_s, 35), unit(s.d_t, s.vocab_t, 36));
        // Every position an answer token, the same targets as the PyTorch side.
        let n = s.b * s.l_s;
        let targets = Tensor::<2, Int>::from_data(
            TensorData::new(
                (0..n as i64).map(|i| i % s.vocab_s as i64).collect(),
                [s.b, s.l_s],
            ),
            &dev,
        );
        let answer =
            Tensor::<2, Bool>::from_data(TensorData::new(vec![true; n], [s.b, s.l_s]), &dev);
        median_ms(&dev, reps, || {
            let o = m.forward(
                hs.clone(),
                ht.clone(),
                zs.clone(),
                zt.clone(),
                head_s.clone(),
                head_t.clone(),
                targets.clone(),
                answer.clone(),
            );
            let g = o.loss.backward();
            std::hint::black_box((hs.grad(&g), zs.grad(&g)));
        })
    });
    let n = s.b * s.l_s;
    let t2 = |shape: [usize; 2], seed| {
        tensor_from_f64(
            &randn(shape[0] * shape[1], seed),
            shape,
            &dev,
            Precision::F32,
        )
        .require_grad()
    };
    out.insert("kd_vanilla".into(), {
        let (zs, zt) = (t2([n, s.vocab_s], 12), t2([n, s.vocab_s], 13));
        median_ms(&dev, reps, || {
            let g = kd_vanilla(zs.clone(), zt.clone(), 2.0).backward();
            std::hint::black_box(zs.grad(&g));
        })
    });
    out.insert("uld".into(), {
        let (zs, zt) = (t2([n, s.vocab_s], 12), t2([n, s.vocab_t], 13));
        median_ms(&dev, reps, || {
            let g = uld_loss(zs.clone(), zt.clone(), 1.0, 1.0).loss.backward();
            std::hint::black_box(zs.grad(&g));
        })
    });
    out
}

fn torch_times(
    python: &str,
    s: &Shapes,
    reps: usize,
    threads: usize,
    torch_device: &str,
) -> Result<BTreeMap<String, f64>, String> {
    let dir = crate::scripts::Scripts::write().map_err(|e| e.to_string())?;
    let script = dir.path(crate::scripts::TORCH_LOSSES);
    let shapes = serde_json::to_string(s).map_err(|e| e.to_string())?;
    let out = Command::new(python)
        .arg(&script)
        .args([
            "--shapes",
            &shapes,
            "--reps",
            &reps.to_string(),
            "--threads",
            &threads.to_string(),
            "--device",
            torch_device,
        ])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or("failed")
            .to_string());
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("unreadable output of {}: {e}", script.display()))
}

/// Folds one round's times into the best so far (per case, the smaller).
fn keep_fastest(best: &mut BTreeMap<String, f64>, round: BTreeMap<String, f64>) {
    for (case, ms) in round {
        best.entry(case)
            .and_modify(|b| *b = b.min(ms))
            .or_insert(ms);
    }
}

/// Runs the loss benchmark and prints a table (or JSON Lines).
pub fn losses(a: &BenchLossesArgs, json: bool) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let reps = if a.quick { 1 } else { a.reps };
    let spec: DeviceSpec = a
        .device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let device = spec
        .device()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let (torch_device, where_) = match spec {
        DeviceSpec::Cpu => ("cpu".to_string(), format!("{threads} threads")),
        _ => (
            "cuda".to_string(),
            format!("{}, tensor-op forms; PyTorch on cuda:0", a.device),
        ),
    };
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    for s in presets(a.preset, a.quick) {
        // Each preset's table is written as soon as it is measured (a long GPU run that is
        // cut short keeps what it finished).
        let mut md = String::new();
        eprintln!(
            "bench losses: {} shapes {:?}, {threads} threads, median of {reps}, best of {} round(s)",
            s.name,
            s,
            if a.quick { 1 } else { a.rounds }
        );
        let rounds = if a.quick { 1 } else { a.rounds };
        let mut ours = BTreeMap::new();
        let mut reference = if a.no_torch {
            Err("skipped (--no-torch)".to_string())
        } else {
            Ok(BTreeMap::new())
        };
        for round in 1..=rounds {
            if rounds > 1 {
                eprintln!("bench losses: {} round {round}/{rounds}", s.name);
            }
            keep_fastest(&mut ours, our_times(&s, reps, &device));
            if let Ok(best) = &mut reference {
                match torch_times(&a.python, &s, reps, threads, &torch_device) {
                    Ok(r) => keep_fastest(best, r),
                    Err(e) => reference = Err(e),
                }
            }
        }
        if let Err(e) = &reference {
            eprintln!(
                "note: PyTorch/POT reference not measured: {e}\n      install it with `python3 -m pip install -r crates/evl-bench/scripts/requirements.txt`"
            );
        }
        let refs = reference.unwrap_or_default();
        md.push_str(&format!("\n### {} (B={}, V_t={}, V_s={}, L_t={}, L_s={}, D_t={}, D_s={}, h={}, {where_}{})\n\n| loss (fwd+bwd, f32) | evl-ecg ms | reference | reference ms | speed-up |\n|---|---:|---|---:|---:|\n", s.name, s.b, s.v_t, s.v_s, s.l_t, s.l_s, s.d_t, s.d_s, s.heads, if rounds > 1 { format!(", best of {rounds} rounds") } else { String::new() }));
        for (case, ms) in &ours {
            let ref_name = if case == "sinkhorn_plan" {
                "POT sinkhorn_log"
            } else {
                "PyTorch"
            };
            let r = refs.get(case).copied();
            let ratio = r.map(|r| r / ms);
            if json {
                let line = serde_json::json!({"type": "bench", "data": {"preset": s.name, "case": case, "ours_ms": ms, "reference": ref_name, "reference_ms": r, "speedup": ratio}});
                writeln!(w, "{line}")?;
            }
            md.push_str(&format!(
                "| {case} | {ms:.3} | {ref_name} | {} | {} |\n",
                r.map_or("-".into(), |r| format!("{r:.3}")),
                ratio.map_or("-".into(), |x| format!("{x:.2}x"))
            ));
        }
        if !json {
            write!(w, "{md}")?;
            w.flush()?;
        }
        if let Some(path) = &a.markdown {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            f.write_all(md.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if json {
        writeln!(
            w,
            "{}",
            serde_json::json!({"type": "summary", "data": {"ok": true}})
        )?;
    }
    Ok(())
}
