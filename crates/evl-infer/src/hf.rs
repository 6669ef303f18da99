//! The paper's real checkpoints as a user meets them: a Hugging Face (or original LLaVA)
//! folder with `config.json`, safetensors weights, the tokenizer and the processor files.
//!
//! [`HfBundle`] holds the model ([`HfModel`], Qwen3-VL or LLaVA-NeXT) with its prompt format
//! and image processor, and does what training and inference need of them: an image file or a
//! rendered record to the model's pixels, a (question, answer) exchange to token ids with the
//! answer's positions and character spans (for aligning two tokenizers), greedy answers, and
//! writing trained weights back in the layout they came in (same tensor names, same dtype,
//! the tokenizer and processor files beside them), so `from_pretrained` loads the result.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor, TensorData};
use evl_hf::HfConfig;
use evl_hf::preprocess::{
    LlavaNextImageProcessor, LlavaNextPixels, QwenImageProcessor, QwenPixels,
};
use evl_hf::prompt::{Prompter, Turn};
use evl_hf::weights::{Checkpoint, HostTensor, WeightDtype};
use evl_models::hf::llava_next::LlavaImage;
use evl_models::hf::qwen3_vl::QwenImage;
use evl_models::hf::{HfError, HfImage, HfModel};

use crate::{Error, Result};

/// Whether `dir` holds a Hugging Face / LLaVA checkpoint (a `config.json` naming an
/// `architectures` list or a `model_type`) rather than one of this toolkit's own bundles
/// (which carry `input.json`).
pub fn is_checkpoint(dir: &Path) -> bool {
    if dir.join("input.json").is_file() {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .map(|v| v.get("architectures").is_some() || v.get("model_type").is_some())
        .unwrap_or(false)
}

/// The image processor of a checkpoint's family.
#[derive(Debug)]
pub enum HfProcessor {
    /// Qwen's `smart_resize` + patchify, with the merger's size (tokens = patches / merge^2).
    Qwen {
        /// The processor.
        processor: QwenImageProcessor,
        /// `spatial_merge_size`.
        merge: usize,
    },
    /// LLaVA-NeXT's anyres tiles.
    Llava(LlavaNextImageProcessor),
}

/// An image prepared for a family, on the host (prepared once, reused every epoch).
#[derive(Clone, Debug)]
pub enum PreparedImage {
    /// Qwen3-VL patches.
    Qwen(QwenPixels),
    /// LLaVA-NeXT views.
    Llava(LlavaNextPixels),
}

impl PreparedImage {
    /// The model input on `device`.
    pub fn to_model(&self, device: &Device) -> HfImage {
        match self {
            PreparedImage::Qwen(p) => HfImage::Qwen(QwenImage {
                pixels: Tensor::from_data(
                    TensorData::new(p.values.clone(), [p.n_patches, p.patch_dim]),
                    (device, DType::F32),
                ),
                grid: p.grid_thw,
            }),
            PreparedImage::Llava(p) => HfImage::Llava(LlavaImage {
                tiles: Tensor::from_data(
                    TensorData::new(
                        p.values.clone(),
                        [p.n_tiles, 3, p.tile_size.0, p.tile_size.1],
                    ),
                    (device, DType::F32),
                ),
                size: p.image_size,
            }),
        }
    }
}

/// One (question, answer) exchange tokenised for a checkpoint, with its image expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedTurn {
    /// Token ids of the whole conversation (image tokens included).
    pub ids: Vec<i64>,
    /// True at the answer's tokens (its text and the end-of-turn token).
    pub answer: Vec<bool>,
    /// Byte span of each answer token, relative to the start of the answer text; tokens
    /// after the text (the end-of-turn token) start at or after the answer's length, a token
    /// before it (LLaMA's lone `▁`) is `(0, 0)`.
    pub answer_spans: Vec<(usize, usize)>,
    /// The answer text's length in bytes.
    pub answer_len: usize,
}

impl EncodedTurn {
    /// [`EncodedTurn::answer_spans`] spread over every position (`(0, 0)` outside the answer).
    fn answer_spans_padded(&self) -> Vec<(usize, usize)> {
        let mut out = vec![(0, 0); self.ids.len()];
        let mut k = 0;
        for (j, &m) in self.answer.iter().enumerate() {
            if m {
                out[j] = self.answer_spans[k];
                k += 1;
            }
        }
        out
    }
}

/// A loaded checkpoint with its prompt format and image processor.
#[derive(Debug)]
pub struct HfBundle {
    /// The folder it was loaded from.
    pub dir: PathBuf,
    /// The model.
    pub model: HfModel,
    /// Its configuration.
    pub config: HfConfig,
    /// Tokenizer and prompt format.
    pub prompter: Prompter,
    /// Image processor.
    pub processor: HfProcessor,
    /// The weights' storage dtype (what [`HfBundle::save`] writes).
    pub dtype: WeightDtype,
    /// Labels `eval` and `interpret` ask about (PTB-XL's diagnostic superclasses).
    pub space: Vec<String>,
}

fn hf(e: impl Into<HfError>, dir: &Path) -> Error {
    Error::Checkpoint {
        path: dir.to_path_buf(),
        what: e.into().to_string(),
    }
}

impl HfBundle {
    /// Loads the checkpoint in `dir` onto `device`: configuration, every weight (none left
    /// over, none missing), tokenizer, prompt format and image processor.
    ///
    /// # Errors
    /// What is wrong, naming the file: another architecture, a missing or truncated shard, a
    /// missing tensor, an unreadable tokenizer or processor file.
    pub fn load(dir: &Path, device: &Device) -> Result<HfBundle> {
        let (model, config) = HfModel::load(dir, device).map_err(|e| hf(e, dir))?;
        let dtype = Checkpoint::open(dir)
            .map_err(|e| hf(e, dir))?
            .dtype()
            .unwrap_or(WeightDtype::F32);
        let prompter = Prompter::from_dir(dir).map_err(|e| hf(e, dir))?;
        let processor = match &config {
            HfConfig::Qwen3Vl(c) => HfProcessor::Qwen {
                processor: QwenImageProcessor::from_dir(dir).map_err(|e| hf(e, dir))?,
                merge: c.vision.spatial_merge_size,
            },
            HfConfig::LlavaNext(_) => {
                HfProcessor::Llava(LlavaNextImageProcessor::from_dir(dir).map_err(|e| hf(e, dir))?)
            }
        };
        Ok(HfBundle {
            dir: dir.to_path_buf(),
            model,
            config,
            prompter,
            processor,
            dtype,
            space: crate::text::superclass_space(),
        })
    }

    /// The family's name (`qwen3_vl` or `llava_next`).
    pub fn family(&self) -> &'static str {
        match self.config {
            HfConfig::Qwen3Vl(_) => "qwen3_vl",
            HfConfig::LlavaNext(_) => "llava_next",
        }
    }

    /// An image file prepared for the model.
    ///
    /// # Errors
    /// A file that is not an image (named), or one the processor cannot size.
    pub fn prepare_path(&self, path: &Path) -> Result<PreparedImage> {
        let img = evl_hf::preprocess::load_rgb(path).map_err(|e| hf(e, &self.dir))?;
        self.prepare_rgb(&img)
            .map_err(|e| with_path(e, &format!("image {}", path.display())))
    }

    /// An RGB image (e.g. a rendered record) prepared for the model.
    ///
    /// # Errors
    /// An image the processor cannot size.
    pub fn prepare_rgb(&self, rgb: &image::RgbImage) -> Result<PreparedImage> {
        Ok(match &self.processor {
            HfProcessor::Qwen { processor, .. } => PreparedImage::Qwen(
                processor
                    .preprocess_rgb(rgb)
                    .map_err(|e| hf(e, &self.dir))?,
            ),
            HfProcessor::Llava(p) => {
                PreparedImage::Llava(p.preprocess_rgb(rgb).map_err(|e| hf(e, &self.dir))?)
            }
        })
    }

    /// Visual tokens the model makes of `image`.
    ///
    /// # Errors
    /// An image of the other family, or a size outside the anyres grid.
    pub fn image_tokens(&self, image: &PreparedImage) -> Result<usize> {
        match (&self.processor, image, &self.model) {
            (HfProcessor::Qwen { merge, .. }, PreparedImage::Qwen(p), _) => {
                Ok(p.n_image_tokens(*merge))
            }
            (HfProcessor::Llava(_), PreparedImage::Llava(p), HfModel::LlavaNext(m)) => {
                m.image_tokens(p.image_size).ok_or_else(|| Error::Config {
                    field: "image",
                    what: format!(
                        "an image of {}x{} does not fit {}'s anyres grid",
                        p.image_size.1,
                        p.image_size.0,
                        self.dir.display()
                    ),
                })
            }
            _ => Err(Error::Config {
                field: "image",
                what: format!(
                    "an image prepared for the other model family given to {}",
                    self.dir.display()
                ),
            }),
        }
    }

    /// Tokenises one exchange about an image of `image_tokens` visual tokens, in the
    /// checkpoint's chat format (the image in the user turn), marking the answer.
    ///
    /// # Errors
    /// A question or answer the tokenizer cannot encode, or an answer without tokens.
    pub fn encode_turn(
        &self,
        question: &str,
        answer: &str,
        image_tokens: usize,
    ) -> Result<EncodedTurn> {
        let conv = self
            .prompter
            .tokenize_conversation(
                &[Turn::user(question), Turn::assistant(answer)],
                image_tokens,
                false,
            )
            .map_err(|e| hf(e, &self.dir))?;
        let span = conv
            .answer_spans
            .first()
            .cloned()
            .ok_or_else(|| Error::Config {
                field: "conversations",
                what: format!("answer `{answer}` has no tokens"),
            })?;
        // The answer is the last text in the conversation (only end-of-turn markup after it).
        let a0 = conv.text.rfind(answer).unwrap_or(conv.text.len());
        let mut mask = vec![false; conv.prompt.input_ids.len()];
        mask[span.clone()].fill(true);
        let answer_spans = span
            .map(|p| {
                let (s, e) = conv.offsets[p];
                (s.saturating_sub(a0), e.saturating_sub(a0))
            })
            .collect();
        Ok(EncodedTurn {
            ids: conv
                .prompt
                .input_ids
                .iter()
                .map(|&i| i64::from(i))
                .collect(),
            answer: mask,
            answer_spans,
            answer_len: answer.len(),
        })
    }

    /// Token ids of the generation prompt for `question` about an image.
    ///
    /// # Errors
    /// A question the tokenizer cannot encode.
    pub fn question_ids(&self, question: &str, image_tokens: usize) -> Result<Vec<i64>> {
        let p = self
            .prompter
            .tokenize_question(question, image_tokens)
            .map_err(|e| hf(e, &self.dir))?;
        Ok(p.input_ids.iter().map(|&i| i64::from(i)).collect())
    }

    /// The greedy answer of `model` (this bundle's or a trained copy) to `question` about
    /// `image`, at most `max_new` tokens, decoded without special tokens.
    ///
    /// # Errors
    /// Tokenisation or shape errors.
    pub fn answer_with(
        &self,
        model: &HfModel,
        image: &PreparedImage,
        question: &str,
        max_new: usize,
        device: &Device,
    ) -> Result<String> {
        let ids = self.question_ids(question, self.image_tokens(image)?)?;
        let eos: Vec<i64> = self
            .prompter
            .tokenizer
            .eos_token_ids()
            .iter()
            .map(|&i| i64::from(i))
            .chain(self.end_of_turn())
            .collect();
        let out = model
            .generate(&ids, Some(image.to_model(device)), max_new, &eos)
            .map_err(|e| hf(e, &self.dir))?;
        // `generate` returns the new tokens only.
        let new: Vec<u32> = out.iter().map(|&i| i as u32).collect();
        let text = self
            .prompter
            .tokenizer
            .decode(&new, true)
            .map_err(|e| hf(e, &self.dir))?;
        Ok(text.trim().to_string())
    }

    /// [`HfBundle::answer_with`] with the loaded model.
    ///
    /// # Errors
    /// As [`HfBundle::answer_with`].
    pub fn answer(
        &self,
        image: &PreparedImage,
        question: &str,
        max_new: usize,
        device: &Device,
    ) -> Result<String> {
        self.answer_with(&self.model, image, question, max_new, device)
    }

    /// A record rendered as 12-lead ECG paper (the default layout of `evl-ecg render`) and
    /// prepared for the model.
    ///
    /// # Errors
    /// A record the renderer cannot draw.
    pub fn prepare_record(&self, record: &ecg_io::Record) -> Result<PreparedImage> {
        let renderer = ecg_render::Renderer::new(ecg_render::RenderConfig::default())
            .map_err(|e| Error::Data(Box::new(e)))?;
        let rgb = renderer
            .render(record)
            .map_err(|e| Error::Data(Box::new(e)))?;
        self.prepare_rgb(&rgb)
    }

    /// The first token of `word` as the model's answer (after the chat format's answer
    /// prefix; a lone leading-space token is skipped).
    fn answer_token(&self, word: &str) -> Result<i64> {
        let e = self.encode_turn("?", word, 1)?;
        let first = e
            .ids
            .iter()
            .zip(&e.answer)
            .zip(&e.answer_spans_padded())
            .find(|((_, m), sp)| **m && sp.1 > sp.0)
            .map(|((&id, _), _)| id);
        first.ok_or_else(|| Error::Config {
            field: "tokenizer",
            what: format!("`{word}` has no token of its own"),
        })
    }

    /// `p(yes)` of the verification question of each label (yes against no, first answer
    /// token), from one batched forward pass of `model`.
    ///
    /// # Errors
    /// Tokenisation or shape errors.
    pub fn label_probabilities(
        &self,
        model: &HfModel,
        image: &PreparedImage,
        labels: &[String],
        device: &Device,
    ) -> Result<Vec<f64>> {
        if labels.is_empty() {
            return Ok(Vec::new());
        }
        let n = self.image_tokens(image)?;
        let rows = labels
            .iter()
            .map(|l| self.question_ids(&crate::text::verify_prompt(l), n))
            .collect::<Result<Vec<_>>>()?;
        let (yes, no) = (self.answer_token("yes")?, self.answer_token("no")?);
        let img = image.to_model(device);
        let images = vec![Some(img); rows.len()];
        let logits = model.logits(&rows, &images).map_err(|e| hf(e, &self.dir))?;
        let [_, s, v] = logits.dims();
        let flat: Vec<f32> = logits.into_data().iter::<f32>().collect();
        Ok(rows
            .iter()
            .enumerate()
            .map(|(r, ids)| {
                let base = (r * s + ids.len() - 1) * v;
                let (zy, zn) = (
                    f64::from(flat[base + yes as usize]),
                    f64::from(flat[base + no as usize]),
                );
                1.0 / (1.0 + (zn - zy).exp())
            })
            .collect())
    }

    /// What the model says about one ECG image: the greedy answer to `question` and `p(yes)`
    /// per label.
    ///
    /// # Errors
    /// Tokenisation or shape errors.
    pub fn interpret(
        &self,
        name: &str,
        image: &PreparedImage,
        question: &str,
        labels: &[String],
        device: &Device,
    ) -> Result<crate::bundle::Interpretation> {
        let t = std::time::Instant::now();
        let probs = self.label_probabilities(&self.model, image, labels, device)?;
        let answer = self.answer(image, question, 64, device)?;
        Ok(crate::bundle::Interpretation {
            record: name.to_string(),
            answer,
            probabilities: labels.iter().cloned().zip(probs).collect(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The tensors of one forward pass on the generation prompt for `question`, named as
    /// transformers' processor and model name them (`input_ids`, `attention_mask`,
    /// `pixel_values`, `image_grid_thw` or `image_sizes`, `logits` of every position): what
    /// `bench/hf_from_pretrained.py` compares with transformers.
    ///
    /// # Errors
    /// Tokenisation or shape errors.
    pub fn reference_inputs(
        &self,
        image: &PreparedImage,
        question: &str,
        device: &Device,
    ) -> Result<Vec<(String, HostTensor)>> {
        let ids = self.question_ids(question, self.image_tokens(image)?)?;
        self.reference_inputs_for(&ids, image, device)
    }

    /// [`HfBundle::reference_inputs`] for given token ids (e.g. a whole conversation).
    ///
    /// # Errors
    /// Ids whose image placeholders do not match the image.
    pub fn reference_inputs_for(
        &self,
        ids: &[i64],
        image: &PreparedImage,
        device: &Device,
    ) -> Result<Vec<(String, HostTensor)>> {
        let ids = ids.to_vec();
        let logits = self
            .model
            .logits(std::slice::from_ref(&ids), &[Some(image.to_model(device))])
            .map_err(|e| hf(e, &self.dir))?;
        let [_, s, v] = logits.dims();
        let host = |shape: Vec<usize>, data: Vec<f32>| HostTensor { shape, data };
        let mut out = vec![
            (
                "input_ids".to_string(),
                host(vec![1, s], ids.iter().map(|&i| i as f32).collect()),
            ),
            ("attention_mask".to_string(), host(vec![1, s], vec![1.0; s])),
        ];
        match image {
            PreparedImage::Qwen(p) => {
                out.push((
                    "pixel_values".into(),
                    host(vec![p.n_patches, p.patch_dim], p.values.clone()),
                ));
                out.push((
                    "image_grid_thw".into(),
                    host(vec![1, 3], p.grid_thw.iter().map(|&g| g as f32).collect()),
                ));
            }
            PreparedImage::Llava(p) => {
                out.push((
                    "pixel_values".into(),
                    host(
                        vec![1, p.n_tiles, 3, p.tile_size.0, p.tile_size.1],
                        p.values.clone(),
                    ),
                ));
                out.push((
                    "image_sizes".into(),
                    host(
                        vec![1, 2],
                        vec![p.image_size.0 as f32, p.image_size.1 as f32],
                    ),
                ));
            }
        }
        out.push((
            "logits".into(),
            host(vec![1, s, v], logits.into_data().iter::<f32>().collect()),
        ));
        Ok(out)
    }

    /// The chat format's end-of-turn token when it is not an EOS (`<|im_end|>`).
    fn end_of_turn(&self) -> Option<i64> {
        match self.config {
            HfConfig::Qwen3Vl(_) => self
                .prompter
                .tokenizer
                .token_to_id("<|im_end|>")
                .map(i64::from),
            HfConfig::LlavaNext(_) => None,
        }
    }

    /// The vocabulary in id order, spelled so that two tokenizers' entries for the same text
    /// compare equal: byte-level BPE's `Ġ` (a leading space) written as SentencePiece's `▁`.
    /// Ids with no entry are empty strings.
    pub fn vocab_strings(&self) -> Vec<String> {
        let tok = &self.prompter.tokenizer;
        let n = self.model.text().head().dims()[1];
        let byte_level = tok.token_to_id("Ġthe").is_some() || tok.token_to_id("Ġ").is_some();
        (0..n)
            .map(|i| {
                let s = tok.id_to_token(i as u32).unwrap_or_default();
                if byte_level {
                    s.replace('Ġ', "▁")
                } else {
                    s
                }
            })
            .collect()
    }

    /// Writes `model` (this bundle's architecture, e.g. after training) to `out` in the
    /// layout the bundle was loaded from: every file of the source folder except its weights
    /// (config, tokenizer, processor files, an original-LLaVA `vision_tower/` folder), then
    /// `model.safetensors` with the checkpoint's tensor names in its dtype, written
    /// atomically.
    ///
    /// # Errors
    /// `out` being the source folder, or I/O errors naming the file.
    pub fn save(&self, model: &HfModel, out: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(out).map_err(io(out))?;
        if std::fs::canonicalize(out).ok() == std::fs::canonicalize(&self.dir).ok() {
            return Err(Error::Config {
                field: "out",
                what: format!(
                    "{} is the checkpoint's own folder; write the trained model elsewhere",
                    out.display()
                ),
            });
        }
        copy_tree(&self.dir, out, true)?;
        let tensors = model.valid().export();
        let path = out.join("model.safetensors");
        evl_hf::weights::save(&path, &tensors, self.dtype).map_err(|e| hf(e, &path))?;
        Ok(())
    }
}

/// Prefix an error's message with what was being read.
fn with_path(e: Error, what: &str) -> Error {
    match e {
        Error::Checkpoint { path, what: w } => Error::Checkpoint {
            path,
            what: format!("{what}: {w}"),
        },
        other => other,
    }
}

/// Copies `from` into `to` recursively; at the top level, weight files and the reference
/// files of a parity case (`expected.safetensors`, `case.json`) are left out.
fn copy_tree(from: &Path, to: &Path, top: bool) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        let src = entry.path();
        let dst = to.join(&name);
        if src.is_dir() {
            std::fs::create_dir_all(&dst).map_err(io(&dst))?;
            copy_tree(&src, &dst, false)?;
            continue;
        }
        if top
            && (name_s.ends_with(".safetensors")
                || name_s.ends_with(".safetensors.index.json")
                || name_s == "case.json")
        {
            continue;
        }
        std::fs::copy(&src, &dst).map_err(io(&dst))?;
    }
    Ok(())
}

/// One training or evaluation example for a real checkpoint: an ECG image file and its
/// (question, answer) exchanges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfExample {
    /// Item id.
    pub id: String,
    /// The image file.
    pub image: PathBuf,
    /// (question, answer) exchanges, `<image>` placeholders removed (the chat format places
    /// the image itself).
    pub turns: Vec<(String, String)>,
}

/// The items of an ECGInstruct-style conversation file (JSON or JSONL, LLaVA format) as
/// examples, their images resolved under `image_root` as
/// [`crate::input::conversation_images`] does.
///
/// # Errors
/// An unreadable file, a missing image, an item without an exchange, each named.
pub fn conversation_examples(path: &Path, image_root: &Path) -> Result<Vec<HfExample>> {
    crate::input::conversation_images(path, image_root)?
        .into_iter()
        .map(|(it, image)| {
            let turns: Vec<(String, String)> = it
                .exchanges()
                .into_iter()
                .map(|(q, a)| {
                    (
                        q.replace("<image>", "").trim().to_string(),
                        a.trim().to_string(),
                    )
                })
                .collect();
            if turns.is_empty() {
                return Err(Error::Config {
                    field: "conversations",
                    what: format!(
                        "{}: item `{}` has no user/assistant exchange",
                        path.display(),
                        it.id
                    ),
                });
            }
            Ok(HfExample {
                id: it.id.clone(),
                image,
                turns,
            })
        })
        .collect()
}
