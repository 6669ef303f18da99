//! Profiling probe: vanilla KD forward + backward on `[512, 512]` logits (the small bench
//! shape). `cargo run --release -p evl-kd --example kd_probe`.
use burn::tensor::Device;
use evl_kd::baselines::kd_vanilla;
use evl_models::device::{Precision, tensor_from_f64};
use std::time::Instant;

fn main() {
    let dev = Device::flex().autodiff();
    let v: Vec<f64> = (0..512 * 512)
        .map(|k| ((k * 7919) % 1000) as f64 / 300.0)
        .collect();
    let zs = tensor_from_f64(&v, [512, 512], &dev, Precision::F32).require_grad();
    let zt = tensor_from_f64(&v, [512, 512], &dev, Precision::F32).require_grad();
    let s = Instant::now();
    for _ in 0..400 {
        let g = kd_vanilla(zs.clone(), zt.clone(), 2.0).backward();
        std::hint::black_box(zs.grad(&g));
    }
    println!("{:.3} ms per call", s.elapsed().as_secs_f64() * 1e3 / 400.0);
}
