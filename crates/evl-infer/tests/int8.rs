//! The int8 bundle (`quantize_bundle`): weights within half a quantisation step of the f32
//! ones, the shipped teacher's answers nearly unchanged (per-label probabilities and macro
//! ROC AUC on fresh SYNTHETIC records), and bundles that mix the two refused by name.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use evl_infer::bundle::{Engine, ModelBundle, quantize_bundle};

fn zoo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../zoo/teacher/model")
}

fn f32s(view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn int8_weights_are_within_half_a_step_per_output_channel() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int8");
    let q = quantize_bundle(&zoo(), &out).unwrap();
    assert!(q.layers.iter().any(|l| l == "lm_head"), "{:?}", q.layers);
    assert!(q.layers.iter().any(|l| l.ends_with("mha.query")));
    assert!(!q.layers.iter().any(|l| l.starts_with("tok_emb")));
    let a = std::fs::read(zoo().join("model.safetensors")).unwrap();
    let b = std::fs::read(out.join("model.safetensors")).unwrap();
    // The linear layers shrink 4x; the image stem's convolutions stay f32.
    assert!(b.len() * 2 < a.len(), "{} vs {} bytes", b.len(), a.len());
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    for layer in &q.layers {
        let w = a.tensor(&format!("{layer}.weight")).unwrap();
        let (din, dout) = (w.shape()[0], w.shape()[1]);
        let w = f32s(&w);
        let codes = b.tensor(&format!("{layer}.weight_q")).unwrap();
        assert_eq!(codes.shape(), &[dout, din]);
        assert_eq!(codes.dtype(), safetensors::Dtype::I8);
        let scale = f32s(&b.tensor(&format!("{layer}.weight_scale")).unwrap());
        for o in 0..dout {
            let amax = (0..din)
                .map(|i| w[i * dout + o].abs())
                .fold(0.0f32, f32::max);
            assert!(
                (scale[o] - amax / 127.0).abs() <= 1e-6 * amax.max(1.0),
                "{layer}[{o}]"
            );
            for i in 0..din {
                let c = codes.data()[o * din + i] as i8;
                let back = c as f32 * scale[o];
                assert!(
                    (back - w[i * dout + o]).abs() <= 0.5 * scale[o] * (1.0 + 1e-5),
                    "{layer}[{i}, {o}]: {} -> {back}",
                    w[i * dout + o]
                );
            }
        }
    }
    // Every other tensor is carried over unchanged.
    for name in a.names() {
        if !name.ends_with(".weight") || !q.layers.iter().any(|l| format!("{l}.weight") == *name) {
            assert_eq!(
                a.tensor(name).unwrap().data(),
                b.tensor(name).unwrap().data(),
                "{name}"
            );
        }
    }
}

#[test]
fn the_shipped_teacher_in_int8_answers_as_in_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int8");
    quantize_bundle(&zoo(), &out).unwrap();
    let f = Engine::load(&zoo()).unwrap();
    let q = Engine::load(&out).unwrap();
    assert!(f.native.quantization().is_none());
    assert_eq!(q.native.quantization().unwrap().scheme, "int8");
    let cfg = ecg_synth::SynthConfig {
        difficulty: ecg_synth::Difficulty::Mixed,
        ..Default::default()
    };
    let n = 60;
    let (mut pf, mut pq, mut truth) = (Vec::new(), Vec::new(), Vec::new());
    let (mut max_dp, mut sum_dp, mut count) = (0.0f64, 0.0f64, 0usize);
    for i in 0..n {
        let e = ecg_synth::generate(&cfg, 0x1e8_2026, i);
        let s = f.prepare(&e.record).unwrap();
        let (a, b) = (f.read(&s, None), q.read(&s, None));
        for ((_, x), (_, y)) in a.probabilities.iter().zip(&b.probabilities) {
            max_dp = max_dp.max((x - y).abs());
            sum_dp += (x - y).abs();
            count += 1;
        }
        pf.push(a.probabilities);
        pq.push(b.probabilities);
        truth.push(e.truth.superclasses);
    }
    let macro_auc = |p: &[Vec<(String, f64)>]| {
        let mut aucs = Vec::new();
        for (k, label) in f.space.iter().enumerate() {
            let y: Vec<bool> = truth.iter().map(|t| t.contains(label)).collect();
            let s: Vec<f64> = p.iter().map(|r| r[k].1).collect();
            if let Some(a) = evl_eval::metrics::roc_auc(&y, &s) {
                aucs.push(a);
            }
        }
        aucs.iter().sum::<f64>() / aucs.len() as f64
    };
    let (af, aq) = (macro_auc(&pf), macro_auc(&pq));
    let mean_dp = sum_dp / count as f64;
    evl_testkit::say(&format!(
        "shipped teacher f32 vs int8 on {n} SYNTHETIC records: macro AUC {af:.4} vs {aq:.4}, \
         mean |dp| {mean_dp:.4}, max |dp| {max_dp:.4}"
    ));
    // A broken quantiser (wrong scale, layout or rounding) moves every probability.
    assert!(
        mean_dp < 0.02,
        "int8 moves probabilities by {mean_dp} on average"
    );
    assert!(
        (af - aq).abs() <= 0.01,
        "macro AUC {af:.4} (f32) vs {aq:.4} (int8)"
    );
    assert!(af > 0.7, "the f32 teacher itself reads ECGs: {af}");
}

#[test]
fn mixed_or_unknown_bundles_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int8");
    quantize_bundle(&zoo(), &out).unwrap();
    // The burn model needs f32 weights.
    let e = ModelBundle::load(&out, &burn::tensor::Device::flex()).unwrap_err();
    assert!(e.to_string().contains("quantization.json"), "{e}");
    // Quantising twice, or over an existing directory.
    assert!(quantize_bundle(&out, &tmp.path().join("again")).is_err());
    assert!(quantize_bundle(&zoo(), &out).is_err());
    // int8 tensors without quantization.json.
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in [
        "config.json",
        "input.json",
        "labels.json",
        "tokenizer.json",
        "model.safetensors",
    ] {
        std::fs::copy(out.join(f), bare.join(f)).unwrap();
    }
    let e = Engine::load(&bare).unwrap_err();
    assert!(
        e.to_string()
            .contains("I8 only in a bundle whose quantization.json"),
        "{e}"
    );
    // An unknown scheme.
    std::fs::write(
        bare.join("quantization.json"),
        r#"{"scheme": "int4", "layers": [], "source_sha256": ""}"#,
    )
    .unwrap();
    let e = Engine::load(&bare).unwrap_err();
    assert!(e.to_string().contains("`int4`"), "{e}");
}
