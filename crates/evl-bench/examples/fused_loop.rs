//! A loop of fused training steps of the `zoo` teacher's architecture with its encoder
//! learning (random weights, pages and texts), for profiling `evl_models::fused` with `perf`:
//! `cargo build --release -p evl-bench --example fused_loop && perf record -g
//! target/release/examples/fused_loop`. `EVL_LOOP=frozen` freezes the encoder;
//! `EVL_LOOP_OPTIM=1` times the parts of a whole optimiser step instead.
//!
//! This binary runs on the system allocator, not the `evl-ecg` binary's mimalloc. Under
//! glibc the step time depends on what the process freed earlier: glibc's mmap threshold
//! rises only after a large block is freed, and below it every large buffer is a fresh
//! mapping, paid for in page faults. Measured: 50 or 64 ms per step for the same kernels,
//! depending only on whether building the parameter buffer had freed a few megabytes. For
//! numbers that do not depend on that, fix the thresholds:
//! `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824`.

use burn::tensor::Device;
use evl_models::fused::{FusedLm, LmRow};

fn main() {
    let job = evl_ops::job::JobConfig::zoo();
    let mut arch = job.arch(evl_ops::job::Role::Teacher).expect("zoo teacher");
    arch.vocab = 147;
    let device = Device::flex().autodiff();
    device.seed(1);
    let frozen = std::env::var("EVL_LOOP").is_ok_and(|v| v == "frozen");
    let model = arch.init(&device).with_vision_trainable(!frozen);
    let fused = FusedLm::with_encoder(&model).expect("covered encoder");
    let (h, w) = (job.input.height, job.input.width);
    let mut state = 7u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pages: Vec<f32> = (0..3 * h * w)
        .map(|_| (next() % 1000) as f32 / 1000.0)
        .collect();
    let rows: Vec<(usize, Vec<i64>, Vec<bool>)> = (0..16)
        .map(|r| {
            let ids: Vec<i64> = (0..20).map(|_| (next() % 147) as i64).collect();
            let answer: Vec<bool> = (0..20).map(|i| i >= 17).collect();
            (r / 6, ids, answer)
        })
        .collect();
    let lm: Vec<LmRow<'_>> = rows
        .iter()
        .map(|(record, ids, answer)| LmRow {
            record: *record,
            ids,
            answer,
        })
        .collect();
    // With `EVL_LOOP_OPTIM=1`, each step is the whole optimiser step `bench train` times
    // (parameters read from the model, gradients handed back, AdamW), timed per part.
    if std::env::var("EVL_LOOP_OPTIM").is_ok() {
        let optim_cfg = job.teacher.optim.clone();
        let mut optim = evl_train::train::adamw(&optim_cfg);
        let plain = device.clone().without_autodiff();
        let mut model = model;
        let mut parts = [0.0f64; 4];
        let n = 20;
        for i in 0..n + 3 {
            let t = std::time::Instant::now();
            let fused = FusedLm::with_encoder(&model).expect("covered encoder");
            let t1 = t.elapsed().as_secs_f64();
            let step = fused.step_from_input(&pages, &lm).expect("step");
            let t2 = t.elapsed().as_secs_f64();
            let grads = fused.gradients(&step, 1.0, &plain);
            let t3 = t.elapsed().as_secs_f64();
            model = optim.step(optim_cfg.lr, model, grads);
            let t4 = t.elapsed().as_secs_f64();
            if i < 3 {
                continue; // warm-up
            }
            for (p, v) in parts.iter_mut().zip([t1, t2 - t1, t3 - t2, t4 - t3]) {
                *p += v * 1e3 / n as f64;
            }
        }
        println!(
            "ms per step: read parameters {:.2}, kernels {:.2}, gradients to burn {:.2}, AdamW {:.2}",
            parts[0], parts[1], parts[2], parts[3]
        );
        return;
    }
    let t = std::time::Instant::now();
    let n = 40;
    for _ in 0..n {
        let step = fused.step_from_input(&pages, &lm).expect("step");
        std::hint::black_box(step.loss);
    }
    println!(
        "{:.2} ms per step (encoder {})",
        t.elapsed().as_secs_f64() * 1e3 / n as f64,
        if frozen { "frozen" } else { "learning" }
    );
}
