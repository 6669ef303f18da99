//! A trained model on disk and its use on one record: `model.safetensors` + `config.json`
//! (the architecture) + `input.json` (image/signal preprocessing) + `tokenizer.json` +
//! `labels.json` (the label space it was trained on).

use std::path::Path;
use std::time::Instant;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Device;
use evl_models::vlm::{EcgVlm, EcgVlmConfig};

use crate::input::encode_prompt;
use crate::input::{InputSpec, Sample, image_of, signal_of};
use crate::text::TextTokenizer;
use crate::text::{DIAGNOSIS_PROMPT, EOS, verify_prompt};
use crate::{Error, Result};

/// A model ready for inference.
#[derive(Debug)]
pub struct ModelBundle {
    /// The model (inference mode).
    pub model: EcgVlm,
    /// Its tokenizer.
    pub tok: TextTokenizer,
    /// Input preprocessing.
    pub spec: InputSpec,
    /// The label space its per-label probabilities are over (`labels.json`).
    pub space: Vec<String>,
    /// The same weights for framework-free CPU inference (`interpret` uses it).
    pub native: evl_models::native::NativeVlm,
}

/// What the model says about one record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Interpretation {
    /// Record name.
    pub record: String,
    /// Generated answer to the diagnosis question.
    pub answer: String,
    /// Per-label probabilities (from the verification question's yes/no likelihoods).
    pub probabilities: Vec<(String, f64)>,
    /// Time spent after loading (rendering + model), ms.
    pub ms: f64,
}

/// Write a model directory.
pub fn save_bundle(
    dir: &Path,
    model: &EcgVlm,
    cfg: &EcgVlmConfig,
    tok: &TextTokenizer,
    spec: &InputSpec,
    space: &[String],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    cfg.save(dir.join("config.json"))
        .map_err(|source| Error::Io {
            path: dir.join("config.json"),
            source,
        })?;
    let spec_text = serde_json::to_string_pretty(spec).expect("plain data");
    std::fs::write(dir.join("input.json"), spec_text).map_err(|source| Error::Io {
        path: dir.join("input.json"),
        source,
    })?;
    let labels = serde_json::to_string(space).expect("plain data");
    std::fs::write(dir.join("labels.json"), labels).map_err(|source| Error::Io {
        path: dir.join("labels.json"),
        source,
    })?;
    tok.save(&dir.join("tokenizer.json"))?;
    let path = dir.join("model.safetensors");
    let mut store = burn::store::SafetensorsStore::from_file(&path).overwrite(true);
    use burn::store::ModuleSnapshot;
    model.save_into(&mut store).map_err(|e| Error::Checkpoint {
        path,
        what: e.to_string(),
    })
}

/// Load parameters from a safetensors file into `model`; a missing, unexpected or mis-shaped
/// tensor is an error naming the file.
pub fn load_weights<M: Module>(mut model: M, path: &Path) -> Result<M> {
    use burn::store::{ModuleSnapshot, SafetensorsStore};
    let mut store = SafetensorsStore::from_file(path);
    model.load_from(&mut store).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    Ok(model)
}

impl ModelBundle {
    /// The native engine's answers for one prepared sample: `p(yes)` per label of the
    /// bundle's space and the greedy diagnosis (the same questions `evaluate` asks).
    pub fn answer(&self, sample: &Sample) -> evl_models::native::NativeAnswer {
        let input = crate::input::model_input(sample, &self.model.input());
        let prompts: Vec<Vec<i64>> = self
            .space
            .iter()
            .map(|l| encode_prompt(&self.tok, &verify_prompt(l)))
            .collect();
        let first = |w: &str| self.tok.encode(w).0.first().copied().unwrap_or(EOS);
        let generate_prompt = encode_prompt(&self.tok, DIAGNOSIS_PROMPT);
        self.native.answer(
            &input,
            &evl_models::native::Questions {
                verify_prompts: &prompts,
                yes: first("yes"),
                no: first("no"),
                generate_prompt: &generate_prompt,
                eos: EOS,
                max_new: 16,
            },
        )
    }

    /// Load a model directory onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<ModelBundle> {
        let cfg = EcgVlmConfig::load(dir.join("config.json")).map_err(|e| Error::Checkpoint {
            path: dir.join("config.json"),
            what: e.to_string(),
        })?;
        if let Some(what) = cfg.problem() {
            return Err(Error::Checkpoint {
                path: dir.join("config.json"),
                what,
            });
        }
        let spec_path = dir.join("input.json");
        let text = std::fs::read_to_string(&spec_path).map_err(|source| Error::Io {
            path: spec_path.clone(),
            source,
        })?;
        let spec: InputSpec = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: spec_path,
            what: e.to_string(),
        })?;
        let labels_path = dir.join("labels.json");
        let text = std::fs::read_to_string(&labels_path).map_err(|source| Error::Io {
            path: labels_path.clone(),
            source,
        })?;
        let space: Vec<String> = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: labels_path,
            what: format!("expected a JSON list of label names: {e}"),
        })?;
        let tok = TextTokenizer::load(&dir.join("tokenizer.json"))?;
        let model = load_weights(cfg.init(device), &dir.join("model.safetensors"))?.valid();
        let native = evl_models::native::NativeVlm::load(dir).map_err(|e| Error::Checkpoint {
            path: e.path.clone(),
            what: e.what,
        })?;
        Ok(ModelBundle {
            model,
            tok,
            spec,
            space,
            native,
        })
    }

    /// Interpret one record on `device`: on the CPU with the framework-free engine (what
    /// [`ModelBundle::interpret`] runs), elsewhere with the burn model on that device (the
    /// same questions through [`crate::eval::evaluate`]).
    pub fn interpret_on(&self, record: &ecg_io::Record, device: &Device) -> Result<Interpretation> {
        if evl_models::device::DeviceSpec::Cpu.device().ok().as_ref() == Some(device) {
            return self.interpret(record);
        }
        let t = Instant::now();
        let samples = crate::input::samples_from_records(
            vec![(record.clone(), Vec::new(), Vec::new())],
            &self.spec,
            0,
        )?;
        let (_, lines) =
            crate::eval::evaluate(&self.model, &self.tok, &samples, &self.space, device);
        let line = lines.into_iter().next().ok_or_else(|| Error::Config {
            field: "record",
            what: format!("record `{}` gave no prediction", record.name),
        })?;
        Ok(Interpretation {
            record: record.name.clone(),
            answer: line.text,
            probabilities: self.space.iter().cloned().zip(line.probs).collect(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Interpret one record.
    pub fn interpret(&self, record: &ecg_io::Record) -> Result<Interpretation> {
        let space = &self.space;
        let t = Instant::now();
        // Only the input this model reads is prepared (rendering is skipped for signal models).
        let image = match self.model.input() {
            evl_models::vlm::InputKind::Image { .. } => {
                let renderer = ecg_render::Renderer::new(ecg_render::RenderConfig {
                    dpi: self.spec.dpi,
                    grid: self.spec.grid,
                    ..Default::default()
                })
                .map_err(|e| Error::Data(Box::new(e)))?;
                image_of(&renderer, record, &self.spec).map_err(|e| Error::Data(Box::new(e)))?
            }
            evl_models::vlm::InputKind::Signal { .. } => Vec::new(),
        };
        let signal = match self.model.input() {
            evl_models::vlm::InputKind::Signal { .. } => signal_of(record, &self.spec)?,
            evl_models::vlm::InputKind::Image { .. } => Vec::new(),
        };
        let sample = Sample {
            id: record.name.clone(),
            image,
            signal,
            labels: Vec::new(),
            findings: Vec::new(),
            turns: Vec::new(),
        };
        let a = self.answer(&sample);
        Ok(Interpretation {
            record: record.name.clone(),
            answer: self.tok.decode(&a.generated),
            probabilities: space.iter().cloned().zip(a.probs).collect(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }
}
