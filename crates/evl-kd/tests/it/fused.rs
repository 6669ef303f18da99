//! The fused host kernels compute the same function as the tensor-op (graph) forms they
//! replace on the CPU: values, potentials and every gradient, with masks, near-duplicate and
//! identical tokens, a zero token, a large common offset (anisotropic "hidden states"),
//! detached teacher and combined-gradient mode, in f64 and f32; the same for the fused MHCA
//! loss (key and student masks), the fused objective (masks, ablations, detached teacher) and
//! the fused OT loss (masks, an empty item, a zero token). Each test runs one public entry
//! point twice, with `Kernel::Fused` and `Kernel::Graph`.

use burn::tensor::{Device, Tensor};
use evl_kd::{
    EvlInputs, EvlWeights, Kernel, MhcaWeights, OtLossConfig, RelationConfig, evl_objective,
    mhca_align_loss_with, relation_loss,
};
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
/// large offset (cosines near 1, the Gram form's worst case) except token 5, which is tiny
/// (an ill-conditioned token for the centred cosine, whose angle terms come from raw
/// products).
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
        let tiny = randn(d, seed + 7);
        for k in 0..d {
            x[(l + 5) * d + k] = 1e-3 * tiny[k];
        }
    }
    x
}

fn run(
    kernel: Kernel,
    x: &[f64],
    y: &[f64],
    shape: [usize; 3],
    mask: Option<&[bool]>,
    cfg: &RelationConfig,
    p: Precision,
) -> Vec<(String, Vec<f64>)> {
    let dev = Device::flex().autodiff();
    let cfg = &RelationConfig { kernel, ..*cfg };
    let m = mask.map(|m| bool_tensor(m, [shape[0], shape[1]], &dev));
    let inputs = || {
        (
            tensor_from_f64(x, shape, &dev, p).require_grad(),
            tensor_from_f64(y, shape, &dev, p).require_grad(),
        )
    };
    let (xt, yt) = inputs();
    let out = relation_loss(xt, yt, m.as_ref(), cfg);
    let mut res = vec![
        (
            "psi_d_t".to_string(),
            to_vec_f64(out.psi_d_t.expect("asked for")),
        ),
        (
            "psi_d_s".into(),
            to_vec_f64(out.psi_d_s.expect("asked for")),
        ),
        (
            "psi_a_t".into(),
            to_vec_f64(out.psi_a_t.expect("asked for")),
        ),
        (
            "psi_a_s".into(),
            to_vec_f64(out.psi_a_s.expect("asked for")),
        ),
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
        let out = relation_loss(xt.clone(), yt.clone(), m.as_ref(), cfg);
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
    // item 1 fully padded, item 2 a single valid token: no pairs, potentials 0
    let sparse: Vec<bool> = (0..b * l).map(|k| k / l == 0 || k == 2 * l + 3).collect();
    for p in [Precision::F64, Precision::F32] {
        let tol = if p == Precision::F64 { 1e-9 } else { 1e-4 };
        for (masked, mask) in [(false, &mask), (true, &mask), (true, &sparse)] {
            for (detach, terms) in [(false, true), (true, true), (false, false)] {
                let cfg = RelationConfig {
                    detach_teacher: detach,
                    term_gradients: terms,
                    potentials: true,
                    ..RelationConfig::default()
                };
                let m = masked.then_some(mask.as_slice());
                let fused = run(Kernel::Fused, &x, &y, [b, l, d], m, &cfg, p);
                let graph = run(Kernel::Graph, &x, &y, [b, l, d], m, &cfg, p);
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

fn weights(ds: usize, dt: usize, hdk: usize, dev: &Device, p: Precision, seed: u64) -> MhcaWeights {
    let w = |r: usize, c: usize, s: u64| {
        let v: Vec<f64> = randn(r * c, s)
            .iter()
            .map(|x| x / (r as f64).sqrt())
            .collect();
        tensor_from_f64(&v, [r, c], dev, p).require_grad()
    };
    MhcaWeights {
        wq: w(ds, hdk, seed),
        wk: w(dt, hdk, seed + 1),
        wv: w(dt, hdk, seed + 2),
        wo: w(hdk, ds, seed + 3),
    }
}

/// Loss and every gradient of one objective call, fresh inputs each time.
#[allow(clippy::type_complexity)]
fn objective_run(
    kernel: Kernel,
    p: Precision,
    masks: bool,
    w: &EvlWeights,
    rel: &RelationConfig,
) -> Vec<(String, Vec<f64>)> {
    let (b, ls, lt, ds, dt, h, vt, vs) = (2, 6, 7, 8, 12, 2, 5, 3);
    let dev = Device::flex().autodiff();
    let t = |shape: [usize; 3], seed| {
        tensor_from_f64(&randn(shape.iter().product(), seed), shape, &dev, p).require_grad()
    };
    let (hs, ht) = (t([b, ls, ds], 1), t([b, lt, dt], 2));
    let (tv, sv) = (t([b, vt, ds], 3), t([b, vs, ds], 4));
    let l_ce = tensor_from_f64(&[1.5], [1], &dev, p).require_grad();
    let wts = weights(ds, dt, 8, &dev, p, 10);
    let mut inputs =
        EvlInputs::unmasked(l_ce.clone(), hs.clone(), ht.clone(), tv.clone(), sv.clone());
    if masks {
        let sm: Vec<bool> = (0..b * ls).map(|k| k % ls < 4 || k < ls).collect();
        let km: Vec<bool> = (0..b * lt).map(|k| k % lt != 2 && k != lt + 5).collect();
        inputs.student_mask = Some(bool_tensor(&sm, [b, ls], &dev));
        inputs.teacher_mask = Some(bool_tensor(&km, [b, lt], &dev));
    }
    let w = &EvlWeights { kernel, ..*w };
    let terms = evl_objective(inputs, &wts, h, w, &OtLossConfig::default(), rel);
    let mut out = vec![
        ("total".to_string(), to_vec_f64(terms.total.clone())),
        (
            "mhca".into(),
            terms.mhca.map(to_vec_f64).unwrap_or_default(),
        ),
        ("rel".into(), terms.rel.map(to_vec_f64).unwrap_or_default()),
    ];
    let g = terms.total.backward();
    let named: [(&str, Option<Tensor<3>>); 4] = [
        ("hs", Some(hs)),
        ("ht", Some(ht)),
        ("tv", Some(tv)),
        ("sv", Some(sv)),
    ];
    for (name, x) in named {
        let x = x.expect("set");
        out.push((
            format!("d{name}"),
            x.grad(&g).map(to_vec_f64).unwrap_or_default(),
        ));
    }
    for (name, x) in [
        ("wq", wts.wq),
        ("wk", wts.wk),
        ("wv", wts.wv),
        ("wo", wts.wo),
    ] {
        out.push((
            format!("d{name}"),
            x.grad(&g).map(to_vec_f64).unwrap_or_default(),
        ));
    }
    out.push((
        "dce".into(),
        l_ce.grad(&g).map(to_vec_f64).unwrap_or_default(),
    ));
    out
}

fn assert_close(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)], tol: f64, what: &str) {
    for ((name, u), (_, v)) in a.iter().zip(b) {
        assert_eq!(u.len(), v.len(), "{what} {name}: lengths");
        let scale = v.iter().fold(1e-3f64, |s, x| s.max(x.abs()));
        for (k, (x, y)) in u.iter().zip(v).enumerate() {
            assert!(
                (x - y).abs() <= tol * scale,
                "{what} {name}[{k}]: fused {x} vs graph {y}"
            );
        }
    }
}

#[test]
fn fused_objective_equals_graph_form_with_masks_ablations_and_detach() {
    for p in [Precision::F64, Precision::F32] {
        let tol = if p == Precision::F64 { 1e-9 } else { 1e-4 };
        for masks in [false, true] {
            for (ablate, detach) in [("", false), ("", true), ("mhca", false), ("rel", false)] {
                let w = EvlWeights {
                    use_mhca: ablate != "mhca",
                    use_rel: ablate != "rel",
                    ..EvlWeights::default()
                };
                let rel = RelationConfig {
                    detach_teacher: detach,
                    ..RelationConfig::default()
                };
                let what = format!("{p:?} masks={masks} ablate={ablate} detach={detach}");
                assert_close(
                    &objective_run(Kernel::Fused, p, masks, &w, &rel),
                    &objective_run(Kernel::Graph, p, masks, &w, &rel),
                    tol,
                    &what,
                );
            }
        }
    }
}

#[test]
fn fused_mhca_loss_equals_graph_form_with_masks() {
    let (b, ls, lt, ds, dt, h) = (3, 5, 6, 8, 10, 4);
    for p in [Precision::F64, Precision::F32] {
        let tol = if p == Precision::F64 { 1e-9 } else { 1e-4 };
        let run = |kernel: Kernel| {
            let dev = Device::flex().autodiff();
            let t = |shape: [usize; 3], seed| {
                let v: Vec<f64> = randn(shape.iter().product(), seed)
                    .iter()
                    .map(|x| 3.0 * x)
                    .collect();
                tensor_from_f64(&v, shape, &dev, p).require_grad()
            };
            let (hs, ht) = (t([b, ls, ds], 5), t([b, lt, dt], 6));
            let w = weights(ds, dt, 8, &dev, p, 20);
            // item 2 has a single valid key; item 1 a single valid student token
            let km: Vec<bool> = (0..b * lt).map(|k| k / lt != 2 || k % lt == 3).collect();
            let sm: Vec<bool> = (0..b * ls).map(|k| k / ls != 1 || k % ls == 0).collect();
            let (km, sm) = (
                bool_tensor(&km, [b, lt], &dev),
                bool_tensor(&sm, [b, ls], &dev),
            );
            let loss =
                mhca_align_loss_with(hs.clone(), ht.clone(), &w, h, Some(&km), Some(&sm), kernel);
            let mut out = vec![("loss".to_string(), to_vec_f64(loss.clone()))];
            let g = loss.backward();
            for (n, x) in [("hs", hs), ("ht", ht)] {
                out.push((n.into(), x.grad(&g).map(to_vec_f64).unwrap_or_default()));
            }
            for (n, x) in [("wq", w.wq), ("wk", w.wk), ("wv", w.wv), ("wo", w.wo)] {
                out.push((n.into(), x.grad(&g).map(to_vec_f64).unwrap_or_default()));
            }
            out
        };
        assert_close(
            &run(Kernel::Fused),
            &run(Kernel::Graph),
            tol,
            &format!("mhca {p:?}"),
        );
    }
}

#[test]
fn fused_ot_equals_graph_form() {
    use evl_kd::ot_loss;
    let dev = Device::flex().autodiff();
    let (b, vt, vs, d) = (3, 6, 4, 5);
    for p in [Precision::F64, Precision::F32] {
        let tol = if p == Precision::F64 { 1e-10 } else { 1e-4 };
        for masked in [false, true] {
            let run = |kernel: Kernel| {
                let mut tv = randn(b * vt * d, 11);
                tv[..d].fill(0.0); // a zero token: the normalisation's floor
                let t = tensor_from_f64(&tv, [b, vt, d], &dev, p).require_grad();
                let s = tensor_from_f64(&randn(b * vs * d, 12), [b, vs, d], &dev, p).require_grad();
                // item 2 has no valid student token (left out of the mean); item 0 partly
                let tm: Vec<bool> = (0..b * vt).map(|k| k % vt != 3).collect();
                let sm: Vec<bool> = (0..b * vs).map(|k| k / vs != 2 && k != 1).collect();
                let (tm, sm) = (
                    bool_tensor(&tm, [b, vt], &dev),
                    bool_tensor(&sm, [b, vs], &dev),
                );
                let (tm, sm) = if masked {
                    (Some(&tm), Some(&sm))
                } else {
                    (None, None)
                };
                let cfg = OtLossConfig {
                    kernel,
                    ..OtLossConfig::default()
                };
                let out = ot_loss(t.clone(), s.clone(), tm, sm, &cfg);
                let mut res = vec![
                    ("loss".to_string(), to_vec_f64(out.loss.clone())),
                    ("cost".into(), out.cost),
                    ("plan".into(), out.plan),
                ];
                let g = out.loss.backward();
                res.push(("t".into(), t.grad(&g).map(to_vec_f64).unwrap_or_default()));
                res.push(("s".into(), s.grad(&g).map(to_vec_f64).unwrap_or_default()));
                res
            };
            let (a, bb) = (run(Kernel::Fused), run(Kernel::Graph));
            assert!(a.iter().all(|(_, v)| !v.is_empty()), "every output present");
            assert_close(&a, &bb, tol, &format!("ot {p:?} masked={masked}"));
        }
    }
}

#[test]
fn fused_multilevel_ot_equals_graph_form() {
    use evl_kd::baselines::{MultiLevelOtConfig, multilevel_ot_loss};
    let dev = Device::flex().autodiff();
    let (b, ls, lt, vs, vt) = (2, 5, 7, 9, 11);
    let cfg = MultiLevelOtConfig {
        top_k: 6,
        ..MultiLevelOtConfig::default()
    };
    for p in [Precision::F64, Precision::F32] {
        let tol = if p == Precision::F64 { 1e-10 } else { 1e-4 };
        let run = |kernel: Kernel| {
            let zs = tensor_from_f64(&randn(b * ls * vs, 31), [b, ls, vs], &dev, p).require_grad();
            let zt = tensor_from_f64(&randn(b * lt * vt, 32), [b, lt, vt], &dev, p).require_grad();
            let cfg = MultiLevelOtConfig { kernel, ..cfg };
            let out = multilevel_ot_loss(zs.clone(), zt.clone(), &cfg);
            let mut res = vec![
                ("loss".to_string(), to_vec_f64(out.loss.clone())),
                ("sequence_ot".into(), to_vec_f64(out.sequence_ot)),
            ];
            let g = out.loss.backward();
            res.push(("zs".into(), zs.grad(&g).map(to_vec_f64).unwrap_or_default()));
            res.push(("zt".into(), zt.grad(&g).map(to_vec_f64).unwrap_or_default()));
            res
        };
        let (a, bb) = (run(Kernel::Fused), run(Kernel::Graph));
        assert!(a.iter().all(|(_, v)| !v.is_empty()), "every output present");
        assert_close(&a, &bb, tol, &format!("multilevel_ot {p:?}"));
    }
}
