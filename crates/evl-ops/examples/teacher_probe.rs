//! How fast does a teacher (or student) architecture learn the synthetic superclasses?
//! `cargo run --release -p evl-train --example teacher_probe` with env STEPS, LR, BATCH,
//! INPUT (image|signal), ROLE (teacher|student), N (records). Prints validation macro AUC
//! every EVAL_EVERY steps. A development probe, not part of the product.
#![allow(clippy::unwrap_used)]

use burn::module::Module;
use burn::tensor::Device;
use evl_infer::input::samples_from_records;
use evl_infer::text::TextTokenizer;
use evl_ops::quickstart::{Preset, QuickstartConfig};
use evl_train::train::{OptimConfig, sft};

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() {
    let steps: usize = env("STEPS", 400);
    let lr: f64 = env("LR", 1e-3);
    let batch: usize = env("BATCH", 16);
    let n: usize = env("N", 500);
    let every: usize = env("EVAL_EVERY", 100);
    let input: String = env("INPUT", "signal".to_string());
    let role: String = env("ROLE", "teacher".to_string());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = QuickstartConfig::preset(Preset::Quick);
    cfg.teacher_input = input.clone();
    cfg.student_input = input.clone();
    ecg_synth::write_dataset(
        dir.path(),
        &ecg_synth::SynthConfig {
            difficulty: if env("OBVIOUS", 0) == 1 {
                ecg_synth::Difficulty::Obvious
            } else {
                ecg_synth::Difficulty::Mixed
            },
            ..Default::default()
        },
        7,
        n,
    )
    .unwrap();
    let train_recs = evl_infer::dataset::load_labelled(
        dir.path(),
        Some(ecg_io::labels::ptbxl::Split::Train),
        None,
        false,
    )
    .unwrap();
    let val_recs = evl_infer::dataset::load_labelled(
        dir.path(),
        Some(ecg_io::labels::ptbxl::Split::Val),
        None,
        false,
    )
    .unwrap();
    let train = samples_from_records(train_recs, &cfg.input, 1).unwrap();
    let val = samples_from_records(val_recs, &cfg.input, 2).unwrap();
    let texts = evl_infer::input::corpus(&train);
    let (vocab, mut mcfg) = if role == "teacher" {
        (cfg.teacher_vocab, cfg.teacher_model())
    } else {
        (cfg.student_vocab, cfg.student_model())
    };
    let tok = TextTokenizer::train(&texts, vocab).unwrap();
    mcfg.vocab = tok.vocab_size();
    mcfg.stem_channels = env("STEM", 0);
    let dev = Device::flex();
    let tdev = dev.clone().autodiff();
    tdev.seed(7);
    let mut model = mcfg.init(&tdev);
    let space: Vec<String> = ecg_synth::SUPERCLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let t = std::time::Instant::now();
    let pre: usize = env("PRETRAIN", 0);
    if pre > 0 {
        let o = OptimConfig {
            steps: pre,
            lr: env("PRE_LR", 1e-3),
            batch_size: batch,
            warmup: (pre / 10).max(1),
            ..OptimConfig::default()
        };
        let (m, probe, logs) =
            evl_train::pretrain::pretrain_encoder(model, &train, &space, &o, None, &tdev, |_| {})
                .unwrap();
        let (mi, pi) = evl_train::pretrain::inference(&m, &probe);
        let probs = evl_train::pretrain::probe_probabilities(&mi, &pi, &val, &dev);
        let yt: Vec<i64> = val
            .iter()
            .flat_map(|s| space.iter().map(|c| i64::from(s.labels.contains(c))))
            .collect();
        let ys: Vec<f64> = probs.concat();
        let yp: Vec<i64> = ys.iter().map(|&p| i64::from(p >= 0.5)).collect();
        let mm = evl_eval::multilabel_metrics(&yt, &ys, &yp, space.len()).unwrap();
        let recent: f64 = logs.iter().rev().take(20).map(|l| l.total).sum::<f64>() / 20.0;
        println!(
            "pretrain {pre} steps: bce {recent:.3}, probe val macro AUC {:?} ({:.0} s)",
            mm.macro_auc,
            t.elapsed().as_secs_f64()
        );
        model = m;
    }
    let mut done = 0;
    while done < steps {
        let o = OptimConfig {
            steps,
            lr,
            batch_size: batch,
            warmup: steps / 10,
            stop_after: None,
            turns_per_record: env("TPR", 1),
            freeze_vision: env("FREEZE", 0) == 1,
            ..OptimConfig::default()
        };
        let run = dir.path().join("run");
        let upto = (done + every).min(steps);
        let o2 = OptimConfig {
            stop_after: if upto < steps { Some(upto) } else { None },
            ..o
        };
        let (m, logs) = sft(model, &train, &tok, &o2, Some(&run), &tdev, |_| {}).unwrap();
        model = m;
        done = upto;
        let (s, _) = evl_infer::eval::evaluate(&model.valid(), &tok, &val, &space, &dev);
        let recent: f64 = logs.iter().rev().take(20).map(|l| l.total).sum::<f64>() / 20.0;
        let inf = model.valid();
        for s in val.iter().take(2) {
            for q in [
                evl_infer::text::DIAGNOSIS_PROMPT.to_string(),
                "What is the rhythm? Options: SR, SBRAD, STACH, AF.".to_string(),
                evl_infer::text::verify_prompt("MI"),
            ] {
                let ids = inf.generate(
                    evl_infer::input::pixels(&[s], &inf.input(), &dev),
                    &evl_infer::input::encode_prompt(&tok, &q),
                    evl_infer::text::EOS,
                    12,
                );
                println!(
                    "  {} gold {:?}: {q} -> {:?}",
                    s.id,
                    s.labels,
                    tok.decode(&ids)
                );
            }
        }
        println!(
            "{role} {input} step {done}: loss {recent:.3}  val macro AUC {:?}  per class {:?}  ({:.0} s)",
            s.macro_auc.map(|a| (a * 1000.0).round() / 1000.0),
            s.per_class_auc
                .iter()
                .map(|a| a.map(|a| (a * 100.0).round() / 100.0))
                .collect::<Vec<_>>(),
            t.elapsed().as_secs_f64()
        );
    }
}
