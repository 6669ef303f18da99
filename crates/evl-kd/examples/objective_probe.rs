//! Profiling probe: the EVL-ECG objective (forward + backward) at paper shapes (B=4,
//! L=512, V_t=576, V_s=144, D_t=1024, D_s=512, h=8), teacher frozen.
//! `cargo run --release -p evl-kd --example objective_probe [-- mhca|relation|ot] [small] [graph]`.
use burn::tensor::Device;
use evl_kd::{
    EvlInputs, EvlWeights, MhcaWeights, OtLossConfig, RelationConfig, evl_objective,
    mhca_align_loss, relation_loss,
};
use evl_models::device::{Precision, tensor_from_f64};
use std::time::Instant;

// the same allocator as the `evl-ecg` binary

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let dev = Device::flex().autodiff();
    let small = std::env::args().any(|a| a == "small");
    let (b, l, dt, ds, h, vt, vs) = if small {
        (8, 64, 256, 128, 8, 64, 16)
    } else {
        (4, 512, 1024, 512, 8, 576, 144)
    };
    // `PROBE_BATCH` overrides the batch size (fewer items than cores)
    let b = std::env::var("PROBE_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(b);
    let r = |n: usize, s: f64| -> Vec<f64> {
        (0..n)
            .map(|k| {
                // splitmix64: pseudo-random values in [-1, 1), no repeating pattern (a
                // periodic pattern makes many tokens near-identical, an unusual case)
                let mut z = (k as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 11) as f64 / (1u64 << 52) as f64 - 1.0) * s
            })
            .collect()
    };
    let t = |shape: [usize; 3], grad: bool| {
        let x = tensor_from_f64(&r(shape.iter().product(), 1.0), shape, &dev, Precision::F32);
        if grad { x.require_grad() } else { x }
    };
    let w = |shape: [usize; 2]| {
        let s = 1.0 / (shape[0] as f64).sqrt();
        tensor_from_f64(&r(shape[0] * shape[1], s), shape, &dev, Precision::F32).require_grad()
    };
    let wts = MhcaWeights {
        wq: w([ds, ds]),
        wk: w([dt, ds]),
        wv: w([dt, ds]),
        wo: w([ds, ds]),
    };
    let (hs, ht) = (t([b, l, ds], true), t([b, l, dt], false));
    let (tv, sv) = (t([b, vt, ds], true), t([b, vs, ds], true));
    let ce = tensor_from_f64(&[2.0], [1], &dev, Precision::F32).require_grad();
    let only_mhca = std::env::args().any(|a| a == "mhca");
    let only_rel = std::env::args().any(|a| a == "relation");
    let only_ot = std::env::args().any(|a| a == "ot");
    let sv2 = t([b, l, ds], true);
    let iters = std::env::var("PROBE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if small { 400 } else { 6 });
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let s = Instant::now();
        let loss = if only_mhca {
            mhca_align_loss(hs.clone(), ht.clone(), &wts, h, None, None)
        } else if only_ot {
            evl_kd::ot_loss(tv.clone(), sv.clone(), None, None, &OtLossConfig::default()).loss
        } else if only_rel {
            relation_loss(sv2.clone(), hs.clone(), None, &RelationConfig::default()).l_rel
        } else {
            let inputs =
                EvlInputs::unmasked(ce.clone(), hs.clone(), ht.clone(), tv.clone(), sv.clone());
            // `graph`: every term as burn tensor ops (`Kernel::Graph`)
            let kernel = if std::env::args().any(|a| a == "graph") {
                evl_kd::Kernel::Graph
            } else {
                evl_kd::Kernel::Auto
            };
            evl_objective(
                inputs,
                &wts,
                h,
                &EvlWeights {
                    kernel,
                    ..EvlWeights::default()
                },
                &OtLossConfig::default(),
                &RelationConfig::default(),
            )
            .total
        };
        let f = s.elapsed();
        let g = loss.backward();
        std::hint::black_box((wts.wq.grad(&g), sv.grad(&g)));
        times.push(s.elapsed().as_secs_f64() * 1e3);
        if small {
            continue;
        }
        println!(
            "fwd {:.1} ms, total {:.1} ms",
            f.as_secs_f64() * 1e3,
            s.elapsed().as_secs_f64() * 1e3
        );
    }
    times.sort_by(f64::total_cmp);
    if let (Some(min), Some(med)) = (times.first(), times.get(times.len() / 2)) {
        println!("{} steps: median {med:.3} ms, min {min:.3} ms", times.len());
    }
}
