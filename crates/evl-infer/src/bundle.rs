//! A trained model on disk and its use on one record: `model.safetensors` + `config.json`
//! (the architecture) + `input.json` (image/signal preprocessing) + `tokenizer.json` +
//! `labels.json` (the label space it was trained on).

use std::path::Path;
use std::time::Instant;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Device;
/// What a model reads (an image of ECG paper or the signals).
pub use evl_models::vlm::InputKind;
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
    pub engine: Engine,
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

/// Write an int8 copy of the bundle in `src` to `out` (`model.safetensors` with int8 linear
/// weights, `quantization.json`, the other files as they are); `out` must not exist yet.
pub fn quantize_bundle(src: &Path, out: &Path) -> Result<evl_models::native::Quantization> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    if Engine::load(src)?.native.quantization().is_some() {
        return Err(Error::Checkpoint {
            path: src.join("quantization.json"),
            what: "already an int8 bundle".into(),
        });
    }
    if out.exists() {
        return Err(Error::Config {
            field: "out",
            what: format!("{} exists; choose a new directory", out.display()),
        });
    }
    let weights = src.join("model.safetensors");
    let bytes = std::fs::read(&weights).map_err(io(&weights))?;
    let (qbytes, layers) =
        evl_models::native::quantize_weights(&bytes, &weights).map_err(|e| Error::Checkpoint {
            path: e.path.clone(),
            what: e.what,
        })?;
    use sha2::Digest;
    let q = evl_models::native::Quantization {
        scheme: evl_models::native::INT8_SCHEME.into(),
        layers,
        source_sha256: format!("{:x}", sha2::Sha256::digest(&bytes)),
    };
    // Written into a sibling directory and renamed at the end: a half-written bundle never
    // sits at `out`.
    let tmp = out.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    for f in ["config.json", "input.json", "labels.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.join(f)).map_err(io(&src.join(f)))?;
    }
    std::fs::write(tmp.join("model.safetensors"), qbytes).map_err(io(&tmp))?;
    let text = serde_json::to_string_pretty(&q).expect("plain data");
    std::fs::write(tmp.join("quantization.json"), text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(q)
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

/// The framework-free CPU engine of a model directory and everything needed to read one
/// record with it: no burn model, so it is `Send + Sync` and one copy serves every thread of
/// a service.
#[derive(Debug)]
pub struct Engine {
    /// Native weights.
    pub native: evl_models::native::NativeVlm,
    /// Tokenizer.
    pub tok: TextTokenizer,
    /// Input preprocessing.
    pub spec: InputSpec,
    /// Label space of the per-label probabilities.
    pub space: Vec<String>,
    /// The architecture (`config.json`).
    pub config: EcgVlmConfig,
    /// The questions every record is asked, tokenised once at load.
    asked: Asked,
}

/// Token ids of the fixed questions: each label's verification prompt, the diagnosis
/// prompt, and the first tokens of `yes` and `no`.
#[derive(Debug)]
struct Asked {
    verify: Vec<Vec<i64>>,
    diagnosis: Vec<i64>,
    yes: i64,
    no: i64,
}

impl Asked {
    fn new(tok: &TextTokenizer, space: &[String]) -> Asked {
        let first = |w: &str| tok.encode(w).0.first().copied().unwrap_or(EOS);
        Asked {
            verify: space
                .iter()
                .map(|l| encode_prompt(tok, &verify_prompt(l)))
                .collect(),
            diagnosis: encode_prompt(tok, DIAGNOSIS_PROMPT),
            yes: first("yes"),
            no: first("no"),
        }
    }
}

/// What one record gives, with the inputs it was prepared from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reading {
    /// The verification probability of each label of the space, in order.
    pub probabilities: Vec<(String, f64)>,
    /// The generated answer to the question (the diagnosis question when none is given).
    pub answer: String,
    /// The question answered by generation.
    pub question: String,
}

impl Engine {
    /// Load a model directory: `config.json`, `input.json`, `labels.json`, `tokenizer.json`
    /// and `model.safetensors`; any missing or malformed file is an error naming it.
    pub fn load(dir: &Path) -> Result<Engine> {
        let config =
            EcgVlmConfig::load(dir.join("config.json")).map_err(|e| Error::Checkpoint {
                path: dir.join("config.json"),
                what: e.to_string(),
            })?;
        if let Some(what) = config.problem() {
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
        let native = evl_models::native::NativeVlm::load(dir).map_err(|e| Error::Checkpoint {
            path: e.path.clone(),
            what: e.what,
        })?;
        Ok(Engine {
            native,
            asked: Asked::new(&tok, &space),
            tok,
            spec,
            space,
            config,
        })
    }

    /// What the model reads.
    pub fn input(&self) -> evl_models::vlm::InputKind {
        self.config.input.clone()
    }

    /// The model input of a record: rendered as ECG paper for an image model, resampled
    /// leads for a signal model (only what the model reads is prepared).
    pub fn prepare(&self, record: &ecg_io::Record) -> Result<Sample> {
        let (image, signal) = match self.input() {
            evl_models::vlm::InputKind::Image { .. } => {
                let renderer = ecg_render::Renderer::new(ecg_render::RenderConfig {
                    dpi: self.spec.dpi,
                    grid: self.spec.grid,
                    ..Default::default()
                })
                .map_err(|e| Error::Data(Box::new(e)))?;
                let image = image_of(&renderer, record, &self.spec)
                    .map_err(|e| Error::Data(Box::new(e)))?;
                (image, Vec::new())
            }
            evl_models::vlm::InputKind::Signal { .. } => {
                (Vec::new(), signal_of(record, &self.spec)?)
            }
        };
        Ok(Sample {
            id: record.name.clone(),
            image,
            signal,
            labels: Vec::new(),
            findings: Vec::new(),
            turns: Vec::new(),
        })
    }

    /// The model input of an encoded image of ECG paper (PNG, JPEG): only an image model
    /// reads one; decoding is bounded ([`crate::input::image_bytes`]).
    pub fn prepare_image(&self, name: &str, bytes: &[u8]) -> Result<Sample> {
        if let evl_models::vlm::InputKind::Signal { .. } = self.input() {
            return Err(Error::Config {
                field: "image",
                what: format!(
                    "{name}: this model reads signals, not images of ECG paper; send the \
                     record itself (WFDB, CinC .hea + .mat, EDF or CSV)"
                ),
            });
        }
        Ok(Sample {
            id: name.to_string(),
            image: crate::input::image_bytes(name, bytes, &self.spec)?,
            signal: Vec::new(),
            labels: Vec::new(),
            findings: Vec::new(),
            turns: Vec::new(),
        })
    }

    /// The native engine's answers for one prepared sample: `p(yes)` per label of the
    /// space and the greedy answer to `question` (the diagnosis question when `None`; the
    /// same questions `evaluate` asks).
    pub fn answer(
        &self,
        sample: &Sample,
        question: Option<&str>,
    ) -> evl_models::native::NativeAnswer {
        let input = crate::input::model_input(sample, &self.input());
        let a = &self.asked;
        let asked;
        let generate_prompt = match question {
            Some(q) => {
                asked = encode_prompt(&self.tok, q);
                &asked
            }
            None => &a.diagnosis,
        };
        self.native.answer(
            &input,
            &evl_models::native::Questions {
                verify_prompts: &a.verify,
                yes: a.yes,
                no: a.no,
                generate_prompt,
                eos: EOS,
                max_new: 16,
            },
        )
    }

    /// Probabilities and decoded answer for one prepared sample.
    pub fn read(&self, sample: &Sample, question: Option<&str>) -> Reading {
        let a = self.answer(sample, question);
        Reading {
            probabilities: self.space.iter().cloned().zip(a.probs).collect(),
            answer: self.tok.decode(&a.generated),
            question: question.unwrap_or(DIAGNOSIS_PROMPT).to_string(),
        }
    }

    /// Interpret one record (the diagnosis question).
    pub fn interpret(&self, record: &ecg_io::Record) -> Result<Interpretation> {
        let t = Instant::now();
        let sample = self.prepare(record)?;
        let r = self.read(&sample, None);
        Ok(Interpretation {
            record: record.name.clone(),
            answer: r.answer,
            probabilities: r.probabilities,
            ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }
}

impl ModelBundle {
    /// The native engine's answers for one prepared sample: `p(yes)` per label of the
    /// bundle's space and the greedy diagnosis (the same questions `evaluate` asks).
    pub fn answer(&self, sample: &Sample) -> evl_models::native::NativeAnswer {
        self.engine.answer(sample, None)
    }

    /// Load a model directory onto `device`. An int8 bundle is refused: its weights run on
    /// the native engine only ([`Engine`]).
    pub fn load(dir: &Path, device: &Device) -> Result<ModelBundle> {
        let engine = Engine::load(dir)?;
        if engine.native.quantization().is_some() {
            return Err(Error::Checkpoint {
                path: dir.join("quantization.json"),
                what: "an int8 bundle runs on the native CPU engine only (interpret, serve, \
                       eval); train, distil or use a GPU with the f32 bundle it was made from"
                    .into(),
            });
        }
        let model =
            load_weights(engine.config.init(device), &dir.join("model.safetensors"))?.valid();
        Ok(ModelBundle {
            model,
            tok: engine.tok.clone(),
            spec: engine.spec,
            space: engine.space.clone(),
            engine,
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

    /// Interpret one record (with the native engine).
    pub fn interpret(&self, record: &ecg_io::Record) -> Result<Interpretation> {
        self.engine.interpret(record)
    }
}
