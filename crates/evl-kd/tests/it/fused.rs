//! The fused host kernels compute the same function as the tensor-op (graph) forms they
//! replace on the CPU: values, potentials and every gradient, with masks, near-duplicate and
//! identical tokens, a zero token, a large common offset (anisotropic "hidden states"),
//! detached teacher and combined-gradient mode, in f64 and f32.

use evl_kd::relation::relation_loss_graph;
use evl_kd::{RelationConfig, RelationOutput, relation_loss};
use evl_models::burn::tensor::{Bool, Device, Tensor};
use evl_models::device::{Precision, bool_tensor, tensor_from_f64, to_vec_f64};

fn randn(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut u = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| (-2.0 * u().max(1e-300).ln()).sqrt() * (std::f64::consts::TAU * u()).cos())
        .collect()
}

/// Tokens with hard cases planted: item 0 token 1 = token 0 + 1e-7 noise (near pair), token 2
/// = token 0 exactly (identical), token 3 = 0 (zero norm); every token of item 1 shares a
/// large offset (cosines near 1, the Gram form's worst case).
fn tokens(b: usize, l: usize, d: usize, seed: u64) -> Vec<f64> {
    let mut x = randn(b * l * d, seed);
    for k in 0..d {
        x[d + k] = x[k] + 1e-7 * x[4 * d + k];
        x[2 * d + k] = x[k];
        x[3 * d + k] = 0.0;
    }
    if b > 1 {
        let off = randn(d, seed + 99);
        for i in 0..l {
            for k in 0..d {
                x[(l + i) * d + k] = 0.05 * x[(l + i) * d + k] + 30.0 * off[k];
            }
        }
    }
    x
}

fn run(
    f: fn(Tensor<3>, Tensor<3>, Option<&Tensor<2, Bool>>, &RelationConfig) -> RelationOutput,
    x: &[f64],
    y: &[f64],
    shape: [usize; 3],
    mask: Option<&[bool]>,
    cfg: &RelationConfig,
    p: Precision,
) -> Vec<(String, Vec<f64>)> {
    let dev = Device::flex().autodiff();
    let m = mask.map(|m| bool_tensor(m, [shape[0], shape[1]], &dev));
    let inputs = || {
        (
            tensor_from_f64(x, shape, &dev, p).require_grad(),
            tensor_from_f64(y, shape, &dev, p).require_grad(),
        )
    };
    let (xt, yt) = inputs();
    let out = f(xt, yt, m.as_ref(), cfg);
    let mut res = vec![
        ("psi_d_t".to_string(), to_vec_f64(out.psi_d_t)),
        ("psi_d_s".into(), to_vec_f64(out.psi_d_s)),
        ("psi_a_t".into(), to_vec_f64(out.psi_a_t)),
        ("psi_a_s".into(), to_vec_f64(out.psi_a_s)),
        ("l_d".into(), to_vec_f64(out.l_d)),
        ("l_a".into(), to_vec_f64(out.l_a)),
        ("l_rel".into(), to_vec_f64(out.l_rel)),
    ];
    let terms: &[&str] = if cfg.term_gradients {
        &["l_rel", "l_d", "l_a"]
    } else {
        &["l_rel"]
    };
    for &name in terms {
        // burn consumes the tape on backward: one fresh forward pass per gradient
        let (xt, yt) = inputs();
        let out = f(xt.clone(), yt.clone(), m.as_ref(), cfg);
        let t = match name {
            "l_d" => out.l_d,
            "l_a" => out.l_a,
            _ => out.l_rel,
        };
        let g = t.backward();
        res.push((
            format!("{name} dx"),
            xt.grad(&g).map(to_vec_f64).unwrap_or_default(),
        ));
        res.push((
            format!("{name} dy"),
            yt.grad(&g).map(to_vec_f64).unwrap_or_default(),
        ));
    }
    res
}

#[test]
fn fused_relation_equals_graph_form() {
    let (b, l, d) = (3, 9, 16);
    let x = tokens(b, l, d, 1);
    let y = tokens(b, l, d, 2);
    let mask: Vec<bool> = (0..b * l)
        .map(|k| k != 5 && k / l != 2 || k % l < 4)
        .collect();
    for p in [Precision::F64, Precision::F32] {
        let tol = if p == Precision::F64 { 1e-9 } else { 1e-4 };
        for masked in [false, true] {
            for (detach, terms) in [(false, true), (true, true), (false, false)] {
                let cfg = RelationConfig {
                    detach_teacher: detach,
                    term_gradients: terms,
                    ..RelationConfig::default()
                };
                let m = masked.then_some(mask.as_slice());
                let fused = run(relation_loss, &x, &y, [b, l, d], m, &cfg, p);
                let graph = run(relation_loss_graph, &x, &y, [b, l, d], m, &cfg, p);
                for ((name, a), (_, g)) in fused.iter().zip(&graph) {
                    assert_eq!(a.len(), g.len(), "{name}: shapes ({p:?})");
                    let scale = g.iter().fold(1e-3f64, |s, v| s.max(v.abs()));
                    for (k, (u, v)) in a.iter().zip(g).enumerate() {
                        assert!(
                            (u - v).abs() <= tol * scale,
                            "{name}[{k}] {p:?} masked={masked} detach={detach}: fused {u} vs graph {v}"
                        );
                    }
                }
            }
        }
    }
}
