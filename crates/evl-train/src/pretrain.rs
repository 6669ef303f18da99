//! Vision pre-training: the stage real VLMs have before their language model ever sees an
//! image (CLIP's tower is trained on image-text pairs before LLaVA is assembled; Qwen's ViT
//! likewise). Ours is supervised on our own labelled records: a linear probe on the mean of
//! the encoder's visual tokens predicts the multi-label superclasses with BCE, and the
//! encoder is trained through it. The probe is thrown away afterwards; SFT then starts from
//! an encoder whose tokens already separate the classes, instead of learning to read ECGs
//! through the sparse signal of answer tokens alone.

use std::path::Path;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use evl_infer::input::{Sample, pixels};
use evl_kd::task::bce_with_logits;
use evl_models::vlm::EcgVlm;

use crate::Result;
use crate::train::{Objective, OptimConfig, Part, StepLog, batch_indices, step_loop};
use burn::optim::GradientsParams;
use evl_models::fused::FusedLm;

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
    on_step: impl FnMut(&StepLog),
) -> Result<(EcgVlm, Linear, Vec<StepLog>)> {
    evl_infer::input::check_inputs(samples, &model.input())?;
    let d_vis = model.facts().d_vision;
    device.seed(cfg.seed ^ 0x9E0B);
    let probe = LinearConfig::new(d_vis, space.len()).init(device);
    let input = model.input();
    let (m, logs) = step_loop(
        EncoderProbe { model, probe },
        cfg,
        run_dir,
        device,
        on_step,
        |m| m,
        |m, micro| {
            let idx = batch_indices(samples, cfg, micro);
            let ss: Vec<&Sample> = idx.iter().map(|&(i, _)| &samples[i]).collect();
            if cfg.host_kernels
                && evl_models::device::is_host(device)
                && FusedLm::covers_encoder(&m.model)
            {
                return fused_part(m, &ss, space, &input, device);
            }
            Ok(Part::single(bce_with_logits(
                m.logits(pixels(&ss, &input, device)),
                targets(&ss, space, device),
            )))
        },
    )?;
    Ok((m.model, m.probe, logs))
}

/// One pre-training micro-batch with the encoder on the fused host kernels
/// ([`evl_models::fused`]): its tokens are a graph leaf, the probe and the loss stay burn's,
/// and the loss's gradient with respect to the tokens goes back through the encoder on the
/// host.
fn fused_part(
    m: &EncoderProbe,
    ss: &[&Sample],
    space: &[String],
    input: &evl_models::vlm::InputKind,
    device: &Device,
) -> Result<Part> {
    let f = FusedLm::encoder_only(&m.model).expect("checked by covers_encoder");
    let raw: Vec<f32> = ss
        .iter()
        .flat_map(|s| evl_infer::input::model_input(s, input))
        .collect();
    let (tokens, tape) = f.encode(&raw).map_err(|e| crate::Error::Config {
        field: "batch",
        what: e.to_string(),
    })?;
    let (b, v, d) = (ss.len(), m.model.n_visual(), f.d_vision());
    let leaf = Tensor::<3>::from_data(TensorData::new(tokens, [b, v, d]), device).require_grad();
    let logits = m.probe.forward(leaf.clone().mean_dim(1).reshape([b, d]));
    let loss = bce_with_logits(logits, targets(ss, space, device));
    let value = loss
        .clone()
        .into_data()
        .iter::<f32>()
        .next()
        .map_or(f64::NAN, f64::from);
    let model = m.clone();
    let plain = device.clone().without_autodiff();
    Ok(Part {
        loss: Objective::Host {
            value,
            grads: Box::new(move |scale| {
                let mut g = loss.mul_scalar(scale).backward();
                let dt: Vec<f32> = leaf
                    .grad(&g)
                    .map(|t| t.into_data().iter::<f32>().collect())
                    .unwrap_or_else(|| vec![0.0; b * v * d]);
                let mut out = GradientsParams::from_module(&mut g, &model);
                let step = f.encode_backward(&tape, &dt);
                f.register(&mut out, &step, 1.0, &plain);
                out
            }),
        },
        ce: None,
        terms: Vec::new(),
    })
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
