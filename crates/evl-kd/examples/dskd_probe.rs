//! Profiling probe: DSKD forward + backward at the bench's small shapes (B=8, L_t=96,
//! L_s=64, D_t=256, D_s=128, vocabularies 1024/512).
//! `cargo run --release -p evl-kd --example dskd_probe`.
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use evl_kd::baselines::dskd::DskdConfig;
use evl_models::device::{Precision, tensor_from_f64};
use std::time::Instant;

// the same allocator as the `evl-ecg` binary

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let dev = Device::flex().autodiff();
    let (b, lt, ls, dt, ds, vt, vs) = (8, 96, 64, 256, 128, 1024, 512);
    let r = |n: usize, s: f64| -> Vec<f64> {
        (0..n)
            .map(|k| ((k * 7919 % 1000) as f64 / 500.0 - 1.0) * s)
            .collect()
    };
    let t = |shape: [usize; 3], grad: bool| {
        let x = tensor_from_f64(&r(shape.iter().product(), 1.0), shape, &dev, Precision::F32);
        if grad { x.require_grad() } else { x }
    };
    let m = DskdConfig::new(ds, dt).init(&dev);
    let (hs, ht) = (t([b, ls, ds], true), t([b, lt, dt], false));
    let (zs, zt) = (t([b, ls, vs], true), t([b, lt, vt], false));
    let head = |d: usize, v: usize| {
        tensor_from_f64(
            &r(d * v, 1.0 / (d as f64).sqrt()),
            [d, v],
            &dev,
            Precision::F32,
        )
    };
    let (head_s, head_t) = (head(ds, vs), head(dt, vt));
    let targets = Tensor::<2, Int>::from_data(
        TensorData::new(
            (0..(b * ls) as i64).map(|i| i % vs as i64).collect(),
            [b, ls],
        ),
        &dev,
    );
    let answer = Tensor::<2, Bool>::from_data(TensorData::new(vec![true; b * ls], [b, ls]), &dev);
    for _ in 0..5 {
        let s = Instant::now();
        for _ in 0..20 {
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
            std::hint::black_box(hs.grad(&g));
        }
        println!("{:.2} ms per call", s.elapsed().as_secs_f64() * 1e3 / 20.0);
    }
}
