//! The framework-free inference engine computes what the burn model computes: per-label
//! probabilities to float tolerance and identical greedy answers, for signal models with and
//! without a conv stem and for image models with and without one.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use burn::tensor::Device;
use evl_infer::bundle::{ModelBundle, save_bundle};
use evl_infer::input::{InputSpec, Sample, image_of, signal_of};
use evl_infer::text::{TextTokenizer, conversations};
use evl_models::vlm::{EcgVlmConfig, InputKind};

fn samples(n: usize, spec: &InputSpec) -> Vec<Sample> {
    let r = ecg_render::Renderer::new(ecg_render::RenderConfig {
        dpi: spec.dpi,
        grid: spec.grid,
        ..Default::default()
    })
    .unwrap();
    let space: Vec<String> = ecg_synth::SUPERCLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    (0..n)
        .map(|i| {
            let e = ecg_synth::generate(&ecg_synth::SynthConfig::default(), 11, i);
            Sample {
                id: e.record.name.clone(),
                image: image_of(&r, &e.record, spec).unwrap(),
                signal: signal_of(&e.record, spec).unwrap(),
                labels: e.truth.superclasses.clone(),
                findings: e.truth.findings.clone(),
                turns: conversations(&e.truth.superclasses, &e.truth.findings, &space, i as u64),
            }
        })
        .collect()
}

#[test]
fn native_engine_matches_the_burn_model() {
    let device = Device::flex();
    let spec = InputSpec::default();
    let data = samples(4, &spec);
    let texts = evl_infer::input::corpus(&data);
    let tok = TextTokenizer::train(&texts, 90).unwrap();
    let space: Vec<String> = ecg_synth::SUPERCLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let signal = InputKind::Signal {
        leads: 12,
        samples: spec.signal_len,
        patch: 80,
    };
    let image = InputKind::Image {
        height: spec.height / 2,
        width: spec.width / 2,
        patch: 40,
    };
    let archs = [
        EcgVlmConfig::new(signal.clone(), 32, 1, 2, 48, 2, 2, tok.vocab_size(), 192),
        EcgVlmConfig::new(signal, 24, 2, 2, 40, 1, 4, tok.vocab_size(), 192).with_stem_channels(6),
        EcgVlmConfig::new(image.clone(), 32, 1, 2, 48, 2, 2, tok.vocab_size(), 192),
        EcgVlmConfig::new(image, 24, 1, 2, 40, 1, 2, tok.vocab_size(), 192).with_stem_channels(12),
    ];
    for (a, cfg) in archs.iter().enumerate() {
        device.seed(20 + a as u64);
        let model = cfg.init(&device);
        let dir = tempfile::tempdir().unwrap();
        save_bundle(dir.path(), &model, cfg, &tok, &spec, &space).unwrap();
        let bundle = ModelBundle::load(dir.path(), &device).unwrap();
        let (_, lines) = evl_infer::eval::evaluate(&bundle.model, &tok, &data, &space, &device);
        for (s, line) in data.iter().zip(&lines) {
            let got = bundle.answer(s);
            for (p, q) in got.probs.iter().zip(&line.probs) {
                assert!((p - q).abs() < 2e-5, "arch {a}, {}: {p} vs {q}", s.id);
            }
            assert_eq!(tok.decode(&got.generated), line.text, "arch {a}, {}", s.id);
        }
    }
}

/// A model directory whose config.json asks for an image stem it cannot build (patch not a
/// multiple of 8) is refused by name, not a panic.
#[test]
fn an_unbuildable_config_is_named() {
    let device = Device::flex();
    let spec = InputSpec::default();
    let data = samples(2, &spec);
    let tok = TextTokenizer::train(&evl_infer::input::corpus(&data), 90).unwrap();
    let space: Vec<String> = vec!["NORM".into()];
    let image = InputKind::Image {
        height: spec.height / 2,
        width: spec.width / 2,
        patch: 40,
    };
    let cfg =
        EcgVlmConfig::new(image, 24, 1, 2, 40, 1, 2, tok.vocab_size(), 192).with_stem_channels(12);
    let dir = tempfile::tempdir().unwrap();
    save_bundle(dir.path(), &cfg.init(&device), &cfg, &tok, &spec, &space).unwrap();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"patch\": 40", "\"patch\": 12")).unwrap();
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"patch\": 12")
    );
    let err = ModelBundle::load(dir.path(), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("multiple of 8"),
        "{err}"
    );
}
