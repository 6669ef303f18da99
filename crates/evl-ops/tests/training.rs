//! Tiny end-to-end checks of the training path: a distillation run stopped after a
//! checkpoint resumes to the same final weights as an uninterrupted run with the same seed;
//! every method trains and evaluates.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use burn::module::Module;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use evl_infer::input::{InputSpec, Sample, image_of, signal_of};
use evl_infer::text::{TextTokenizer, conversations};
use evl_ops::quickstart::{Preset, QuickstartConfig};
use evl_train::train::{
    DistillConfig, Method, OptimConfig, Teacher, TeacherCache, cache_teacher, distill,
};

/// burn's `flex` RNG is process-global (`Device::seed`) and parameters draw from it lazily:
/// tests that seed or build models run one at a time, or a parallel test reseeds another's
/// stream mid-run (seen as a flaky resume check before this lock).
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn samples(n: usize) -> Vec<Sample> {
    let spec = InputSpec::default();
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
            let e = ecg_synth::generate(&ecg_synth::SynthConfig::default(), 3, i);
            Sample {
                id: e.record.name.clone(),
                image: image_of(&r, &e.record, &spec).unwrap(),
                signal: signal_of(&e.record, &spec).unwrap(),
                labels: e.truth.superclasses.clone(),
                findings: e.truth.findings.clone(),
                turns: conversations(&e.truth.superclasses, &e.truth.findings, &space, i as u64),
            }
        })
        .collect()
}

/// Parameters by name (tensor bytes), independent of file metadata order.
fn weights(m: &impl Module) -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    let mut store = SafetensorsStore::from_file(&p);
    m.save_into(&mut store).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

/// The parameters whose names start with `prefix` (one part of the model).
fn part(m: &evl_models::vlm::EcgVlm, prefix: &str) -> Vec<(String, Vec<u8>)> {
    weights(m)
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .collect()
}

/// What a distillation test starts from: `n` synthetic records, two tokenizers of different
/// vocabularies (120 for the teacher, 90 for the student), the tiny preset's teacher (after
/// `adjust`) drawn with seed `seeds.0` and cached, and its student drawn with seed `seeds.1`
/// on the autodiff device.
struct DistillSetup {
    device: Device,
    train_dev: Device,
    data: Vec<Sample>,
    t_tok: TextTokenizer,
    s_tok: TextTokenizer,
    teacher: evl_models::vlm::EcgVlm,
    cache: TeacherCache,
    student: evl_models::vlm::EcgVlm,
}

fn distill_setup(
    n: usize,
    adjust: impl FnOnce(&mut QuickstartConfig),
    seeds: (u64, u64),
) -> DistillSetup {
    let device = Device::flex();
    let train_dev = device.clone().autodiff();
    let data = samples(n);
    let texts = evl_infer::input::corpus(&data);
    let t_tok = TextTokenizer::train(&texts, 120).unwrap();
    let s_tok = TextTokenizer::train(&texts, 90).unwrap();
    let mut qc = QuickstartConfig::preset(Preset::Tiny);
    adjust(&mut qc);
    let mut tc = qc.teacher_model();
    tc.vocab = t_tok.vocab_size();
    let mut sc = qc.student_model();
    sc.vocab = s_tok.vocab_size();
    device.seed(seeds.0);
    let teacher = tc.init(&device);
    let cache = cache_teacher(&teacher, &data, &t_tok, &device);
    train_dev.seed(seeds.1);
    let student = sc.init(&train_dev);
    DistillSetup {
        device,
        train_dev,
        data,
        t_tok,
        s_tok,
        teacher,
        cache,
        student,
    }
}

/// Distillation of a signal student on the CPU runs the student by the fused host kernels
/// (its encoder learning too) and the method's loss in burn: for every method, the same
/// losses and weights as burn's autodiff through the whole student, with hidden states read
/// after the final norm and at an inner layer.
#[test]
fn fused_distillation_equals_autodiff() {
    let _rng = rng_lock();
    let DistillSetup {
        train_dev,
        data,
        t_tok,
        s_tok,
        cache,
        student,
        ..
    } = distill_setup(12, |qc| qc.student_input = "signal".into(), (1, 2));
    // Materialise the lazily initialised weights (a trained student's are).
    let _ = weights(&student);
    let methods = [
        (Method::Evl { ablate: vec![] }, None),
        (Method::Evl { ablate: vec![] }, Some(1)),
        (Method::Kl, None),
        (Method::Ce, None),
        (Method::Uld, None),
        (Method::MultiLevelOt, None),
        (Method::TinyBert, None),
        (Method::Dskd, None),
        (Method::Emkd, None),
    ];
    for (method, layer) in methods {
        let run = |host_kernels: bool| {
            let optim = OptimConfig {
                steps: 3,
                batch_size: 4,
                warmup: 1,
                seed: 5,
                host_kernels,
                ..OptimConfig::default()
            };
            let cfg = DistillConfig {
                student_layer: layer,
                ..DistillConfig::paper(method.clone(), optim)
            };
            distill(
                student.clone(),
                &data,
                &s_tok,
                &t_tok,
                Teacher::Cached(&cache),
                &cfg,
                None,
                &train_dev,
                |_| {},
            )
            .unwrap()
        };
        let (a, la) = run(false);
        let (b, lb) = run(true);
        for (x, y) in la.iter().zip(&lb) {
            assert!(
                (x.total - y.total).abs() < 1e-4 * x.total.abs().max(1.0),
                "{method:?} layer {layer:?}, step {}: loss {} by autodiff, {} fused",
                x.step,
                x.total,
                y.total
            );
        }
        assert_same_weights(
            &weights(&a.student),
            &weights(&b.student),
            2e-4,
            &format!("{method:?} layer {layer:?}"),
        );
        // The encoder learnt in both.
        assert_ne!(
            part(&b.student, "patch_embed"),
            part(&student, "patch_embed")
        );
    }
}

/// SFT of a signal student whose encoder learns runs on the fused kernels on the CPU: the
/// same losses and weights (encoder included) as burn's autodiff.
#[test]
fn fused_sft_with_a_learning_encoder_equals_autodiff() {
    let _rng = rng_lock();
    let device = Device::flex();
    let train_dev = device.clone().autodiff();
    let data = samples(10);
    let texts = evl_infer::input::corpus(&data);
    let tok = TextTokenizer::train(&texts, 90).unwrap();
    let mut qc = QuickstartConfig::preset(Preset::Tiny);
    qc.student_input = "signal".into();
    let mut arch = qc.student_model();
    arch.vocab = tok.vocab_size();
    let run = |host_kernels: bool| {
        train_dev.seed(9);
        let model = arch.init(&train_dev);
        let cfg = OptimConfig {
            steps: 4,
            batch_size: 6,
            warmup: 1,
            lr: 3e-3,
            turns_per_record: 3,
            freeze_vision: false,
            host_kernels,
            ..OptimConfig::default()
        };
        evl_train::train::sft(model, &data, &tok, &cfg, None, &train_dev, |_| {}).unwrap()
    };
    let (a, la) = run(false);
    let (b, lb) = run(true);
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            (x.total - y.total).abs() < 1e-5 * x.total.abs().max(1.0),
            "step {}: loss {} by autodiff, {} fused",
            x.step,
            x.total,
            y.total
        );
    }
    assert_same_weights(&weights(&a), &weights(&b), 1e-4, "SFT");
}

/// Two lists of the same model's weights ([`weights`], [`part`]) name the same tensors and
/// differ by less than `tol` in every value (panics naming the tensor otherwise).
fn assert_same_weights(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)], tol: f32, what: &str) {
    let f = |b: &[u8]| -> Vec<f32> {
        b.chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    assert_eq!(a.len(), b.len(), "{what}");
    for ((k, x), (k2, y)) in a.iter().zip(b) {
        assert_eq!(k, k2, "{what}");
        let diff = f(x)
            .iter()
            .zip(f(y))
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < tol, "{what}: {k} differs by {diff}");
    }
}

#[test]
fn distillation_resumes_to_the_same_weights() {
    let _rng = rng_lock();
    let DistillSetup {
        train_dev,
        data,
        t_tok,
        s_tok,
        cache,
        student,
        ..
    } = distill_setup(12, |_| {}, (1, 2));
    assert_ne!(t_tok.vocab_size(), s_tok.vocab_size());
    let w0 = weights(&student);
    let optim = OptimConfig {
        steps: 6,
        batch_size: 4,
        warmup: 2,
        seed: 5,
        ..OptimConfig::default()
    };
    let cfg = DistillConfig::paper(Method::Evl { ablate: vec![] }, optim.clone());
    let dir = tempfile::tempdir().unwrap();
    // Materialise the lazily initialised weights before the runs (a trained student is).
    // Uninterrupted.
    let (a, logs_a) = distill(
        student.clone(),
        &data,
        &s_tok,
        &t_tok,
        Teacher::Cached(&cache),
        &cfg,
        Some(&dir.path().join("a")),
        &train_dev,
        |_| {},
    )
    .unwrap();
    // Killed after step 3 (checkpoint written), then resumed with the same settings.
    let killed = DistillConfig {
        optim: OptimConfig {
            stop_after: Some(3),
            ..optim.clone()
        },
        ..cfg.clone()
    };
    let (_, logs_k) = distill(
        student.clone(),
        &data,
        &s_tok,
        &t_tok,
        Teacher::Cached(&cache),
        &killed,
        Some(&dir.path().join("b")),
        &train_dev,
        |_| {},
    )
    .unwrap();
    assert_eq!(logs_k.len(), 3);
    let (a2, logs_a2) = distill(
        student.clone(),
        &data,
        &s_tok,
        &t_tok,
        Teacher::Cached(&cache),
        &cfg,
        Some(&dir.path().join("a2")),
        &train_dev,
        |_| {},
    )
    .unwrap();
    // A repeated uninterrupted run is bit-identical (the precondition of the resume check).
    assert_eq!(
        logs_a2.iter().map(|l| l.total).collect::<Vec<_>>(),
        logs_a.iter().map(|l| l.total).collect::<Vec<_>>()
    );
    assert!(weights(&a2) == weights(&a));
    assert!(
        weights(&student) == w0,
        "distillation must not change the caller's student"
    );
    let (b, logs_b) = distill(
        student,
        &data,
        &s_tok,
        &t_tok,
        Teacher::Cached(&cache),
        &cfg,
        Some(&dir.path().join("b")),
        &train_dev,
        |_| {},
    )
    .unwrap();
    assert_eq!(logs_b.len(), 6);
    assert_eq!(logs_a.last().unwrap().total, logs_b.last().unwrap().total);
    assert!(
        weights(&a) == weights(&b),
        "resumed weights differ from the uninterrupted run"
    );
}

/// The per-label probability is read where training puts the answer: p(yes) / (p(yes) + p(no))
/// of the logit row that the CE trains for the first answer token of the full verification
/// turn `[BOS] prompt [SEP] yes [EOS]`. (An off-by-one here once read the prediction of SEP.)
#[test]
fn label_probability_is_read_at_the_trained_answer_position() {
    let _rng = rng_lock();
    let device = Device::flex();
    let data = samples(3);
    let texts = evl_infer::input::corpus(&data);
    let tok = TextTokenizer::train(&texts, 120).unwrap();
    let mut cfg = QuickstartConfig::preset(Preset::Tiny).student_model();
    cfg.vocab = tok.vocab_size();
    device.seed(4);
    let model = cfg.init(&device);
    let space: Vec<String> = ecg_synth::SUPERCLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (_, lines) = evl_infer::eval::evaluate(&model, &tok, &data, &space, &device);
    let yes = tok.encode("yes").0[0] as usize;
    let no = tok.encode("no").0[0] as usize;
    for (s, line) in data.iter().zip(&lines) {
        for (j, label) in space.iter().enumerate() {
            let turn = evl_infer::text::Turn {
                prompt: evl_infer::text::verify_prompt(label),
                answer: "yes".into(),
                template: "verify".into(),
            };
            let (ids, mask, _) = evl_infer::input::encode_turn(&tok, &turn);
            let first_answer = mask.iter().position(|&m| m).unwrap();
            let (text, pad, _, _) = evl_infer::input::text_tensors(vec![(ids, mask)], &device);
            let px = evl_infer::input::pixels(&[s], &model.input(), &device);
            let v = model.view(px, text, pad);
            let [_, t, vocab] = v.logits.dims();
            let z: Vec<f32> = v.logits.into_data().iter::<f32>().collect();
            assert!(first_answer < t);
            let row = &z[first_answer * vocab..(first_answer + 1) * vocab];
            let (ly, ln) = (row[yes] as f64, row[no] as f64);
            let p = 1.0 / (1.0 + (ln - ly).exp());
            assert!(
                (p - line.probs[j]).abs() < 1e-5,
                "{label}: {p} vs {}",
                line.probs[j]
            );
        }
    }
}

/// Every method (EVL-ECG, its ablations and the seven baselines) trains: finite losses, its
/// own term logged, and the student's weights move.
#[test]
fn every_method_trains() {
    let _rng = rng_lock();
    let DistillSetup {
        device,
        train_dev,
        data,
        t_tok,
        s_tok,
        teacher,
        cache,
        student,
    } = distill_setup(6, |_| {}, (1, 2));
    let optim = OptimConfig {
        steps: 2,
        batch_size: 3,
        warmup: 1,
        ..OptimConfig::default()
    };
    let w0 = weights(&student);
    for name in [
        "ce",
        "kl",
        "evl",
        "uld",
        "multilevel-ot",
        "tinybert",
        "dskd",
        "emkd",
    ] {
        let m = Method::parse(name, &[]).unwrap();
        let cfg = DistillConfig::paper(m.clone(), optim.clone());
        let (dm, logs) = distill(
            student.clone(),
            &data,
            &s_tok,
            &t_tok,
            Teacher::Cached(&cache),
            &cfg,
            None,
            &train_dev,
            |_| {},
        )
        .unwrap();
        assert_eq!(logs.len(), 2, "{name}");
        for l in &logs {
            assert!(l.total.is_finite() && l.ce.is_finite(), "{name}: {l:?}");
            for (k, v) in &l.terms {
                assert!(v.is_finite(), "{name}: {k} = {v}");
            }
        }
        let own = match name {
            "ce" => None,
            "kl" => Some("kd"),
            "evl" => Some("mhca"),
            other => Some(other),
        };
        if let Some(t) = own {
            assert!(
                logs[0].terms.iter().any(|(k, _)| k == t),
                "{name}: {:?}",
                logs[0].terms
            );
        }
        assert!(
            weights(&dm.student) != w0,
            "{name}: the student did not change"
        );
    }
    // The hidden-state layer is a setting: an inner teacher layer changes what L_mhca reads;
    // a cache of another layer than the run asks for is refused by name.
    let inner = DistillConfig {
        teacher_layer: Some(1),
        student_layer: Some(1),
        ..DistillConfig::paper(Method::evl(), optim.clone())
    };
    let e = distill(
        student.clone(),
        &data,
        &s_tok,
        &t_tok,
        Teacher::Cached(&cache),
        &inner,
        None,
        &train_dev,
        |_| {},
    )
    .map(|_| ())
    .expect_err("cache of the final layer")
    .to_string();
    assert!(e.contains("teacher_layer"), "{e}");
    let cache1 = evl_train::train::cache_teacher_at(&teacher, &data, &t_tok, Some(1), &device);
    assert_ne!(cache1.outs[0][0].hidden, cache.outs[0][0].hidden);
    let run = |cfg: &DistillConfig, c| {
        distill(
            student.clone(),
            &data,
            &s_tok,
            &t_tok,
            Teacher::Cached(c),
            cfg,
            None,
            &train_dev,
            |_| {},
        )
        .unwrap()
        .1[0]
            .terms
            .clone()
    };
    let mhca = |t: Vec<(String, f64)>| t.into_iter().find(|(k, _)| k == "mhca").unwrap().1;
    let final_cfg = DistillConfig::paper(Method::evl(), optim.clone());
    assert_ne!(mhca(run(&inner, &cache1)), mhca(run(&final_cfg, &cache)));
    assert!(Method::parse("uld", &[evl_train::train::Ablation::Ot]).is_err());
    assert!("bogus".parse::<evl_train::train::Ablation>().is_err());
}

/// `turns_per_record` groups distinct questions about the same record in a batch; 1 keeps
/// independent draws. Both are pure functions of the seed.
#[test]
fn batches_group_turns_per_record_when_asked() {
    let _rng = rng_lock();
    use evl_train::train::batch_indices;
    let data = samples(5);
    let mut cfg = OptimConfig {
        batch_size: 16,
        turns_per_record: 4,
        ..OptimConfig::default()
    };
    let b = batch_indices(&data, &cfg, 3);
    assert_eq!(b.len(), 16);
    assert_eq!(b, batch_indices(&data, &cfg, 3));
    for chunk in b.chunks(4) {
        assert!(chunk.iter().all(|&(i, _)| i == chunk[0].0), "{chunk:?}");
        let mut ks: Vec<usize> = chunk.iter().map(|&(_, k)| k).collect();
        ks.sort();
        ks.dedup();
        assert_eq!(ks.len(), 4, "turns repeat within a record: {chunk:?}");
    }
    cfg.turns_per_record = 1;
    let b1 = batch_indices(&data, &cfg, 3);
    assert_eq!(b1.len(), 16);
    assert!(b1.windows(2).any(|w| w[0].0 != w[1].0));
}

/// Vision pre-training trains the encoder (and only it) to separate the labels: the probe's
/// macro AUC on the records it trained on rises well above chance, the language model's
/// weights stay as they were.
#[test]
fn pretraining_teaches_the_encoder_only() {
    let _rng = rng_lock();
    let device = Device::flex();
    let train_dev = device.clone().autodiff();
    let data = samples(48);
    let space: Vec<String> = ecg_synth::SUPERCLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let qc = QuickstartConfig::preset(Preset::Quick);
    let mut sc = qc.student_model();
    sc.vocab = 60;
    train_dev.seed(3);
    let model = sc.init(&train_dev);
    let (head0, enc0) = (part(&model, "lm_head"), part(&model, "patch_embed"));
    assert!(!head0.is_empty() && !enc0.is_empty());
    let cfg = OptimConfig {
        steps: 60,
        batch_size: 16,
        lr: 3e-3,
        warmup: 5,
        ..OptimConfig::default()
    };
    let (m, probe, logs) =
        evl_train::pretrain::pretrain_encoder(model, &data, &space, &cfg, None, &train_dev, |_| {})
            .unwrap();
    assert_eq!(logs.len(), 60);
    let first: f64 = logs[..10].iter().map(|l| l.total).sum::<f64>() / 10.0;
    let last: f64 = logs[50..].iter().map(|l| l.total).sum::<f64>() / 10.0;
    assert!(last < first * 0.8, "BCE {first:.3} -> {last:.3}");
    assert_eq!(part(&m, "lm_head"), head0, "the language model moved");
    assert_ne!(part(&m, "patch_embed"), enc0, "the encoder did not move");
    let (mi, pi) = evl_train::pretrain::inference(&m, &probe);
    let probs = evl_train::pretrain::probe_probabilities(&mi, &pi, &data, &device);
    let yt: Vec<bool> = data
        .iter()
        .flat_map(|s| space.iter().map(|c| s.labels.contains(c)))
        .collect();
    let auc = evl_eval::continuous::macro_roc_auc(&yt, &probs.concat(), space.len()).unwrap();
    assert!(
        auc > 0.85,
        "probe macro AUC {auc:.3} on its training records"
    );
}

/// Vision pre-training on the fused kernels (the encoder on the host, the probe and BCE in
/// burn) gives the same losses, encoder and probe as burn's autodiff, for a signal student,
/// an image student and an image encoder with a convolutional stem.
#[test]
fn fused_pretraining_equals_autodiff() {
    let _rng = rng_lock();
    let device = Device::flex();
    let train_dev = device.clone().autodiff();
    let data = samples(12);
    let space: Vec<String> = ecg_synth::SUPERCLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut qc = QuickstartConfig::preset(Preset::Tiny);
    let image_student = qc.student_model();
    qc.student_input = "signal".into();
    let signal_student = qc.student_model();
    let stem_teacher = qc.teacher_model().with_stem_channels(16);
    for mut arch in [signal_student, image_student, stem_teacher] {
        arch.vocab = 60;
        let run = |host_kernels: bool| {
            train_dev.seed(3);
            let model = arch.init(&train_dev);
            let cfg = OptimConfig {
                steps: 3,
                batch_size: 4,
                lr: 3e-3,
                warmup: 1,
                host_kernels,
                ..OptimConfig::default()
            };
            evl_train::pretrain::pretrain_encoder(
                model,
                &data,
                &space,
                &cfg,
                None,
                &train_dev,
                |_| {},
            )
            .unwrap()
        };
        let (ma, pa, la) = run(false);
        let (mb, pb, lb) = run(true);
        for (x, y) in la.iter().zip(&lb) {
            assert!(
                (x.total - y.total).abs() < 1e-5 * x.total.abs().max(1.0),
                "{:?}: step {} BCE {} by autodiff, {} fused",
                arch.input,
                x.step,
                x.total,
                y.total
            );
        }
        let what = format!("{:?}", arch.input);
        assert_same_weights(&weights(&ma), &weights(&mb), 1e-4, &what);
        let probe = |p: &burn::nn::Linear| -> Vec<f32> {
            p.weight.val().into_data().iter::<f32>().collect()
        };
        let d = probe(&pa)
            .iter()
            .zip(probe(&pb))
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(d < 1e-4, "{:?}: probe differs by {d}", arch.input);
    }
}

/// SFT with `freeze_vision` leaves the encoder exactly as it was and trains the rest; a
/// later stage on the returned model trains the encoder again.
#[test]
fn frozen_vision_sft_trains_the_language_model_only() {
    let _rng = rng_lock();
    let device = Device::flex();
    let train_dev = device.clone().autodiff();
    let data = samples(8);
    let texts = evl_infer::input::corpus(&data);
    let tok = TextTokenizer::train(&texts, 90).unwrap();
    let qc = QuickstartConfig::preset(Preset::Quick);
    let mut sc = qc.student_model();
    sc.vocab = tok.vocab_size();
    train_dev.seed(4);
    let model = sc.init(&train_dev);
    let (enc0, head0) = (part(&model, "patch_embed"), part(&model, "lm_head"));
    let cfg = OptimConfig {
        steps: 3,
        batch_size: 4,
        warmup: 1,
        freeze_vision: true,
        ..OptimConfig::default()
    };
    let (m, _) = evl_train::train::sft(model, &data, &tok, &cfg, None, &train_dev, |_| {}).unwrap();
    assert_eq!(part(&m, "patch_embed"), enc0, "the frozen encoder moved");
    assert_ne!(
        part(&m, "lm_head"),
        head0,
        "the language model did not learn"
    );
    // A later unfrozen stage moves the encoder.
    let cfg = OptimConfig {
        freeze_vision: false,
        steps: 1,
        ..cfg
    };
    let (m2, _) = evl_train::train::sft(m, &data, &tok, &cfg, None, &train_dev, |_| {}).unwrap();
    assert_ne!(part(&m2, "patch_embed"), enc0);
}

/// SFT on a frozen encoder computes its visual tokens once per record (the cache) instead of
/// once per step, and on the CPU runs the language model by the fused host kernels (without
/// the cache too: the encoder then runs once per drawn record): the same losses and the same
/// trained weights as running the encoder on every step through burn's autodiff, for the
/// signal student and the image teacher, with the kernels and without.
#[test]
fn caching_a_frozen_encoder_changes_no_loss() {
    let _rng = rng_lock();
    let device = Device::flex();
    let train_dev = device.clone().autodiff();
    let data = samples(10);
    let texts = evl_infer::input::corpus(&data);
    let tok = TextTokenizer::train(&texts, 90).unwrap();
    let mut qc = QuickstartConfig::preset(Preset::Tiny);
    qc.teacher_input = "image".into();
    for mut arch in [qc.student_model(), qc.teacher_model()] {
        arch.vocab = tok.vocab_size();
        let cfg = OptimConfig {
            steps: 4,
            batch_size: 4,
            warmup: 1,
            lr: 3e-3,
            turns_per_record: 2,
            freeze_vision: true,
            ..OptimConfig::default()
        };
        let run = |cache: usize, host_kernels: bool| {
            train_dev.seed(9);
            let model = arch.init(&train_dev);
            evl_train::train::sft_with_cache(
                model,
                &data,
                &tok,
                &OptimConfig {
                    host_kernels,
                    ..cfg.clone()
                },
                None,
                &train_dev,
                |_| {},
                cache,
            )
            .unwrap()
        };
        let (m0, l0) = run(0, false);
        for (what, (m1, l1)) in [
            ("the cache and autodiff", run(usize::MAX, false)),
            ("the cache and fused kernels", run(usize::MAX, true)),
            ("fused kernels without the cache", run(0, true)),
        ] {
            assert_eq!(l0.len(), l1.len());
            for (a, b) in l0.iter().zip(&l1) {
                assert!(
                    (a.total - b.total).abs() < 1e-5 * a.total.abs().max(1.0),
                    "{:?}: step {} loss {} without the cache, {} with {what}",
                    arch.input,
                    a.step,
                    a.total,
                    b.total
                );
            }
            for name in ["lm_head", "decoder", "projector", "tok_emb"] {
                assert_same_weights(
                    &part(&m0, name),
                    &part(&m1, name),
                    1e-4,
                    &format!("{:?} with {what}", arch.input),
                );
            }
        }
    }
}

/// Offline KD (the teacher cache, one encoder pass per record shared by its turns) and online
/// KD (the teacher run on every batch) give the same losses, for an image teacher.
#[test]
fn cached_and_online_teacher_give_the_same_losses() {
    let _rng = rng_lock();
    let DistillSetup {
        device,
        train_dev,
        data,
        t_tok,
        s_tok,
        teacher,
        cache,
        student,
    } = distill_setup(8, |qc| qc.teacher_input = "image".into(), (11, 12));
    // Materialise the lazily initialised weights: both runs start from the same student.
    let _ = weights(&student);
    let optim = OptimConfig {
        steps: 3,
        batch_size: 4,
        warmup: 1,
        seed: 3,
        ..OptimConfig::default()
    };
    for method in [Method::Evl { ablate: vec![] }, Method::Kl] {
        let cfg = DistillConfig::paper(method.clone(), optim.clone());
        let run = |t: Teacher<'_>| {
            distill(
                student.clone(),
                &data,
                &s_tok,
                &t_tok,
                t,
                &cfg,
                None,
                &train_dev,
                |_| {},
            )
            .unwrap()
            .1
        };
        let cached = run(Teacher::Cached(&cache));
        let online = run(Teacher::Online {
            model: &teacher,
            device: &device,
        });
        for (a, b) in cached.iter().zip(&online) {
            assert!(
                (a.total - b.total).abs() < 1e-4 * a.total.abs().max(1.0),
                "{}: step {} cached {} online {}",
                method.name(),
                a.step,
                a.total,
                b.total
            );
        }
    }
}
