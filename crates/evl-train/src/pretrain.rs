//! Vision pre-training: the stage real VLMs have before their language model ever sees an
//! image (CLIP's tower is trained on image-text pairs before LLaVA is assembled; Qwen's ViT
//! likewise). Ours is supervised on our own labelled records: a linear probe on the mean of
//! the encoder's visual tokens predicts the multi-label superclasses with BCE, and the
//! encoder is trained through it. The probe is thrown away afterwards; SFT then starts from
//! an encoder whose tokens already separate the classes, instead of learning to read ECGs
//! through the sparse signal of answer tokens alone.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use evl_infer::input::{Sample, pixels};
use evl_kd::task::bce_with_logits;
use evl_models::vlm::EcgVlm;

use crate::Result;
use crate::train::{
    OptimConfig, StepLog, after_step, batch_indices, lr_at, scalar, start_or_resume,
};

/// The encoder being pre-trained and its linear probe (what a pre-training checkpoint holds).
#[derive(Module, Debug)]
pub struct EncoderProbe {
    /// The whole model; only its visual encoder receives gradients.
    pub model: EcgVlm,
    /// `d_vision -> classes` on the mean visual token.
    pub probe: Linear,
}

impl EncoderProbe {
    /// Class logits `[b, classes]` of a batch of model inputs.
    pub fn logits(&self, input: Tensor<3>) -> Tensor<2> {
        let vis = self.model.encode(input); // [b, v, d]
        let [b, _, d] = vis.dims();
        self.probe.forward(vis.mean_dim(1).reshape([b, d]))
    }
}

/// Multi-hot targets `[b, classes]` of `samples` over `space`.
fn targets(samples: &[&Sample], space: &[String], device: &Device) -> Tensor<2> {
    let v: Vec<f32> = samples
        .iter()
        .flat_map(|s| space.iter().map(|c| f32::from(s.labels.contains(c))))
        .collect();
    Tensor::from_data(TensorData::new(v, [samples.len(), space.len()]), device)
}

/// Pre-train `model`'s visual encoder on `samples`' labels over `space` (see the module
/// docs). Resumes from `run_dir` when it holds a checkpoint of this stage. Returns the model
/// (encoder trained, everything else as given), the trained probe and the per-step log
/// (`total` = `ce` = the BCE).
///
/// # Errors
/// Inputs the model cannot read; checkpoint I/O.
pub fn pretrain_encoder(
    model: EcgVlm,
    samples: &[Sample],
    space: &[String],
    cfg: &OptimConfig,
    run_dir: Option<&Path>,
    device: &Device,
    mut on_step: impl FnMut(&StepLog),
) -> Result<(EcgVlm, Linear, Vec<StepLog>)> {
    evl_infer::input::check_inputs(samples, &model.input())?;
    let d_vis = model.facts().d_vision;
    device.seed(cfg.seed ^ 0x9E0B);
    let probe = LinearConfig::new(d_vis, space.len()).init(device);
    let mut m = EncoderProbe { model, probe };
    let (resumed, mut optim, start, mut logs) = start_or_resume(m, cfg, run_dir, device)?;
    m = resumed;
    let input = m.model.input();
    for step in start..cfg.steps {
        let t0 = Instant::now();
        let lr = lr_at(cfg, step);
        let mut accum = GradientsAccumulator::new();
        let mut total = 0.0;
        for a in 0..cfg.accumulate {
            let idx = batch_indices(samples, cfg, step * cfg.accumulate + a);
            let ss: Vec<&Sample> = idx.iter().map(|&(i, _)| &samples[i]).collect();
            let loss = bce_with_logits(
                m.logits(pixels(&ss, &input, device)),
                targets(&ss, space, device),
            )
            .mul_scalar(1.0 / cfg.accumulate as f64);
            total += scalar(loss.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            accum.accumulate(&m, grads);
        }
        m = optim.step(lr, m, accum.grads());
        let log = StepLog {
            step: step + 1,
            lr,
            total,
            ce: total,
            terms: Vec::new(),
            ms: t0.elapsed().as_secs_f64() * 1e3,
        };
        on_step(&log);
        logs.push(log);
        if after_step(run_dir, cfg, step, &m, &optim, &logs)? {
            return Ok((m.model, m.probe, logs));
        }
    }
    if let Some(dir) = run_dir {
        crate::checkpoint::save(dir, &m, &optim, cfg.steps, &logs)?;
    }
    Ok((m.model, m.probe, logs))
}

/// Per-label probabilities `[n][classes]` of the probe on `samples` (inference: pass the
/// model and probe through `valid()` first), batched by 32.
pub fn probe_probabilities(
    model: &EcgVlm,
    probe: &Linear,
    samples: &[Sample],
    device: &Device,
) -> Vec<Vec<f64>> {
    let m = EncoderProbe {
        model: model.clone(),
        probe: probe.clone(),
    };
    let input = model.input();
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(32) {
        let ss: Vec<&Sample> = chunk.iter().collect();
        let z = burn::tensor::activation::sigmoid(m.logits(pixels(&ss, &input, device)));
        let k = z.dims()[1];
        let v: Vec<f64> = z.into_data().iter::<f32>().map(f64::from).collect();
        out.extend(v.chunks(k).map(<[f64]>::to_vec));
    }
    out
}

/// `valid()` of a pre-trained pair, for [`probe_probabilities`].
pub fn inference(model: &EcgVlm, probe: &Linear) -> (EcgVlm, Linear) {
    let m = EncoderProbe {
        model: model.clone(),
        probe: probe.clone(),
    }
    .valid();
    (m.model, m.probe)
}
