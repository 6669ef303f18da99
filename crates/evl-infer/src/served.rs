//! One interface over the two kinds of model a service runs on the CPU: the toolkit's own
//! bundles (`train` / `distill` / `model quantize` output) on the framework-free native
//! engine, and the paper's real architectures (a Hugging Face or original-LLaVA checkpoint
//! of Qwen3-VL or LLaVA-NeXT) on burn's CPU backend.
//!
//! A caller prepares an input once ([`ServedModel::prepare`] for a record,
//! [`ServedModel::prepare_image`] for an uploaded image) and reads it
//! ([`ServedModel::read`]): per-label probabilities, the generated answer and the question
//! it answers, whatever the model kind. Both kinds ask the same questions (the verification
//! prompt per label, the diagnosis prompt by default).

use std::path::{Path, PathBuf};

use crate::bundle::{Engine, Reading};
use crate::hf::{HfBundle, PreparedImage};
use crate::input::Sample;
use crate::text::DIAGNOSIS_PROMPT;
use crate::{Error, Result};

/// A loaded model of either kind.
#[derive(Debug)]
pub enum ServedModel {
    /// A toolkit bundle on the native engine (f32 or int8).
    Native(Box<Engine>),
    /// A Hugging Face / LLaVA checkpoint on burn's CPU backend.
    Checkpoint(Box<HfBundle>),
}

/// An input prepared for one [`ServedModel`].
#[derive(Debug)]
pub enum Prepared {
    /// For the native engine.
    Native(Sample),
    /// For a checkpoint: its processor's pixels, with the record's name.
    Checkpoint(String, PreparedImage),
}

impl ServedModel {
    /// Load `dir`: a checkpoint when [`crate::hf::is_checkpoint`] says so, otherwise a
    /// toolkit bundle. Every file is read and checked here; errors name the file.
    ///
    /// # Errors
    /// A missing or malformed file of either kind.
    pub fn load(dir: &Path) -> Result<ServedModel> {
        if crate::hf::is_checkpoint(dir) {
            let device = cpu()?;
            Ok(ServedModel::Checkpoint(Box::new(HfBundle::load(
                dir, &device,
            )?)))
        } else {
            Ok(ServedModel::Native(Box::new(Engine::load(dir)?)))
        }
    }

    /// The architecture: `evl-ecg` for a toolkit bundle, the checkpoint family otherwise
    /// (`qwen3_vl`, `llava_next`).
    pub fn architecture(&self) -> &'static str {
        match self {
            ServedModel::Native(_) => "evl-ecg",
            ServedModel::Checkpoint(b) => b.family(),
        }
    }

    /// What the model reads: `image` (ECG paper) or `signal` (the leads themselves).
    pub fn input(&self) -> &'static str {
        match self {
            ServedModel::Native(e) => match e.input() {
                evl_models::vlm::InputKind::Image { .. } => "image",
                evl_models::vlm::InputKind::Signal { .. } => "signal",
            },
            ServedModel::Checkpoint(_) => "image",
        }
    }

    /// The labels it gives probabilities for, in order.
    pub fn labels(&self) -> &[String] {
        match self {
            ServedModel::Native(e) => &e.space,
            ServedModel::Checkpoint(b) => &b.space,
        }
    }

    /// How the weights are stored and run: the int8 scheme of a quantized bundle, `f32`
    /// for the others, the checkpoint's storage dtype (run in f32) for a checkpoint.
    pub fn precision(&self) -> String {
        match self {
            ServedModel::Native(e) => match e.native.quantization() {
                Some(q) => q.scheme.clone(),
                None => "f32".into(),
            },
            ServedModel::Checkpoint(b) => match b.dtype {
                evl_hf::weights::WeightDtype::Bf16 => "bf16 weights, f32 compute".into(),
                evl_hf::weights::WeightDtype::F16 => "f16 weights, f32 compute".into(),
                evl_hf::weights::WeightDtype::F32 => "f32".into(),
            },
        }
    }

    /// The weight files of `dir` as [`ServedModel::load`] reads them, in a fixed order (for
    /// a version digest): `model.safetensors`, or the shards the index names
    /// ([`evl_hf::weights::weight_files`]).
    ///
    /// # Errors
    /// An unreadable or malformed `model.safetensors.index.json`, or no weights at all.
    pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
        evl_hf::weights::weight_files(dir)
            .map(|(_, files)| files)
            .map_err(|e| Error::Checkpoint {
                path: dir.to_path_buf(),
                what: e.to_string(),
            })
    }

    /// The model input of a record: what the native engine reads, or the record rendered
    /// as 12-lead ECG paper for a checkpoint.
    ///
    /// # Errors
    /// A record that cannot be resampled or drawn.
    pub fn prepare(&self, record: &ecg_io::Record) -> Result<Prepared> {
        match self {
            ServedModel::Native(e) => e.prepare(record).map(Prepared::Native),
            ServedModel::Checkpoint(b) => Ok(Prepared::Checkpoint(
                record.name.clone(),
                b.prepare_record(record)?,
            )),
        }
    }

    /// The model input of an encoded image of ECG paper (PNG, JPEG), decoded with bounded
    /// size and allocation ([`ecg_render::decode_image`]).
    ///
    /// # Errors
    /// Bytes that are not a supported image, or a model that reads signals (the message
    /// says "reads signals").
    pub fn prepare_image(&self, name: &str, bytes: &[u8]) -> Result<Prepared> {
        match self {
            ServedModel::Native(e) => e.prepare_image(name, bytes).map(Prepared::Native),
            ServedModel::Checkpoint(b) => {
                let rgb = ecg_render::decode_image(name, bytes).map_err(|e| Error::Config {
                    field: "image",
                    what: e.to_string(),
                })?;
                Ok(Prepared::Checkpoint(name.to_string(), b.prepare_rgb(&rgb)?))
            }
        }
    }

    /// Probabilities per label and the greedy answer to `question` (the diagnosis
    /// question when `None`).
    ///
    /// # Errors
    /// An input prepared for the other kind of model, or a checkpoint's tokenisation or
    /// shape error.
    pub fn read(&self, input: &Prepared, question: Option<&str>) -> Result<Reading> {
        let q = question.unwrap_or(DIAGNOSIS_PROMPT);
        match (self, input) {
            (ServedModel::Native(e), Prepared::Native(s)) => Ok(e.read(s, question)),
            (ServedModel::Checkpoint(b), Prepared::Checkpoint(name, image)) => {
                let device = cpu()?;
                let r = b.interpret(name, image, q, &b.space, &device)?;
                Ok(Reading {
                    probabilities: r.probabilities,
                    answer: r.answer,
                    question: q.to_string(),
                })
            }
            _ => Err(Error::Config {
                field: "input",
                what: "an input prepared for another kind of model".into(),
            }),
        }
    }
}

fn cpu() -> Result<evl_models::device::Device> {
    evl_models::DeviceSpec::Cpu
        .device()
        .map_err(|e| Error::Config {
            field: "device",
            what: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send_sync<T: Send + Sync>() {}

    #[test]
    fn a_served_model_can_be_shared_by_worker_threads() {
        is_send_sync::<ServedModel>();
        is_send_sync::<Prepared>();
    }

    #[test]
    fn weight_files_follow_the_index_in_name_order_and_name_a_bad_index() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#,
        )
        .unwrap();
        let files = ServedModel::weight_files(dir.path()).unwrap();
        assert_eq!(
            files,
            vec![
                dir.path().join("m-1.safetensors"),
                dir.path().join("m-2.safetensors")
            ]
        );
        std::fs::write(dir.path().join("model.safetensors"), b"x").unwrap();
        assert_eq!(
            ServedModel::weight_files(dir.path()).unwrap(),
            vec![dir.path().join("model.safetensors")]
        );
        let other = tempfile::tempdir().unwrap();
        std::fs::write(
            other.path().join("model.safetensors.index.json"),
            r#"{"weights": {}}"#,
        )
        .unwrap();
        let e = ServedModel::weight_files(other.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.safetensors.index.json"), "{e}");
    }
}
