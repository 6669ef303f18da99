//! `config.json` of the two families the paper distils between, read into one typed form.
//!
//! - **Qwen3-VL** (`Qwen3VLForConditionalGeneration`, the student): a `text_config` and a
//!   `vision_config`. The multimodal RoPE settings are read from `rope_parameters`
//!   (transformers 5) or from `rope_theta` + `rope_scaling` (the form the released
//!   Qwen3-VL-2B-Instruct ships).
//! - **LLaVA-NeXT** (the teacher family, PULSE-7B's), in two forms:
//!   - transformers' `LlavaNextForConditionalGeneration` (`text_config` + `vision_config`;
//!     fields a published config leaves out take `LlamaConfig` / `CLIPVisionConfig`'s
//!     defaults, as transformers does);
//!   - the original LLaVA repository's `LlavaLlamaForCausalLM` (flat LLaMA fields plus `mm_*`
//!     keys), whose vision tower is named by `mm_vision_tower`: a local folder with a CLIP
//!     `config.json`, or `openai/clip-vit-large-patch14-336`, which is built in because real
//!     PULSE-7B configs name it and no download happens at run time.
//!
//! Every field that is read and absent (without a documented default) is an error naming the
//! file and the field.

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Errors reading a checkpoint's configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path}: not valid JSON: {source}")]
    Json {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A field is missing or has the wrong type or value.
    #[error("{path}: field `{field}`: {what}")]
    Field {
        /// File.
        path: PathBuf,
        /// Dotted field name.
        field: String,
        /// What is wrong.
        what: String,
    },
    /// The checkpoint is of an architecture evl-ecg does not load.
    #[error(
        "{path}: architecture `{found}` is not one evl-ecg loads (Qwen3VLForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaLlamaForCausalLM)"
    )]
    Architecture {
        /// File.
        path: PathBuf,
        /// What the file says.
        found: String,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// Where each part of a checkpoint's tensors lives: the two LLaVA namings differ only in
/// prefixes, so the model builder asks this table instead of hard-coding either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// The Hugging Face hub's transformers layout.
    Transformers,
    /// The original LLaVA repository's layout (`LlavaLlamaForCausalLM`).
    OriginalLlava,
}

/// A decoder-only language model of the LLaMA family (LLaMA-2/Vicuna, Qwen3): pre-RMSNorm
/// blocks, GQA attention with rotary positions, SwiGLU MLP.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: a divisor of `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Multimodal RoPE sections (temporal, height, width) in rotary frequency pairs, and
    /// whether they are interleaved (Qwen3-VL) rather than chunked; `None` = 1-D RoPE.
    pub mrope: Option<([usize; 3], bool)>,
    /// RMSNorm on each head's queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Bias on the q/k/v/o projections.
    pub attention_bias: bool,
    /// Output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// Qwen3-VL's vision transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3VisionConfig {
    /// Blocks.
    pub depth: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Heads.
    pub num_heads: usize,
    /// Patch side, pixels.
    pub patch_size: usize,
    /// Frames per temporal patch (an image is repeated this many times).
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one visual token.
    pub spatial_merge_size: usize,
    /// Rows of the learned position table (a square grid of this many cells).
    pub num_position_embeddings: usize,
    /// Width of the merged visual tokens (the LM width).
    pub out_hidden_size: usize,
    /// Blocks whose outputs feed the DeepStack mergers, in order.
    pub deepstack_visual_indexes: Vec<usize>,
    /// Input channels.
    pub in_channels: usize,
}

/// A CLIP vision transformer (LLaVA's tower).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    /// Width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Heads.
    pub num_heads: usize,
    /// Patch side, pixels.
    pub patch_size: usize,
    /// Input side, pixels.
    pub image_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Input channels.
    pub num_channels: usize,
}

impl ClipVisionConfig {
    /// `openai/clip-vit-large-patch14-336`, the tower PULSE-7B and LLaVA-1.6 name.
    pub fn vit_large_patch14_336() -> Self {
        ClipVisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_layers: 24,
            num_heads: 16,
            patch_size: 14,
            image_size: 336,
            layer_norm_eps: 1e-5,
            num_channels: 3,
        }
    }

    /// Patches per side of one tile.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// The Qwen3-VL model.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3VlConfig {
    /// The language model.
    pub text: TextConfig,
    /// The vision tower.
    pub vision: Qwen3VisionConfig,
    /// `<|image_pad|>`.
    pub image_token_id: i64,
    /// `<|vision_start|>`.
    pub vision_start_token_id: i64,
    /// `<|vision_end|>`.
    pub vision_end_token_id: i64,
}

/// The LLaVA-NeXT model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaNextConfig {
    /// The language model.
    pub text: TextConfig,
    /// The CLIP tower.
    pub vision: ClipVisionConfig,
    /// Which tower layer's output is used (Python indexing into the hidden-state list, whose
    /// entry 0 is the embeddings: -2 = the second-to-last layer).
    pub vision_feature_layer: i64,
    /// Drop the class token (`default` / `patch`) or keep it (`full` / `cls_patch`).
    pub drop_cls: bool,
    /// Projector: `Linear(vision, text) -> GELU -> Linear(text, text)` (`mlp2x_gelu`).
    pub projector_bias: bool,
    /// Anyres grid pinpoints, `(height, width)` pixels.
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    /// The token id that marks image positions in `input_ids`.
    pub image_token_index: i64,
    /// Tensor naming of the checkpoint.
    pub naming: Naming,
}

/// A checkpoint's configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum HfConfig {
    /// Qwen3-VL.
    Qwen3Vl(Qwen3VlConfig),
    /// LLaVA-NeXT, either naming.
    LlavaNext(LlavaNextConfig),
}

impl HfConfig {
    /// Reads `dir/config.json` (and, for the original LLaVA form, the vision tower's).
    ///
    /// # Errors
    /// Unreadable files, missing or mistyped fields, an architecture evl-ecg does not load.
    pub fn from_dir(dir: &Path) -> Result<HfConfig> {
        let path = dir.join("config.json");
        let root = read_json(&path)?;
        let f = Fields {
            path: &path,
            obj: as_object(&path, "", &root)?,
            prefix: String::new(),
        };
        let arch = match f.obj.get("architectures") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_str).unwrap_or("").to_string(),
            _ => String::new(),
        };
        let model_type = f
            .obj
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        match (arch.as_str(), model_type) {
            ("Qwen3VLForConditionalGeneration", _) | ("", "qwen3_vl") => {
                Ok(HfConfig::Qwen3Vl(qwen3_vl(&f)?))
            }
            ("LlavaNextForConditionalGeneration", _) | ("", "llava_next") => {
                Ok(HfConfig::LlavaNext(llava_next_hf(&f)?))
            }
            ("LlavaLlamaForCausalLM", _) => Ok(HfConfig::LlavaNext(llava_original(&f, dir)?)),
            _ => Err(Error::Architecture {
                path: path.clone(),
                found: if arch.is_empty() {
                    format!("model_type {model_type}")
                } else {
                    arch
                },
            }),
        }
    }

    /// The language model's configuration.
    pub fn text(&self) -> &TextConfig {
        match self {
            HfConfig::Qwen3Vl(c) => &c.text,
            HfConfig::LlavaNext(c) => &c.text,
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn as_object<'a>(path: &Path, field: &str, v: &'a Value) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| Error::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        what: "expected a JSON object".into(),
    })
}

/// One JSON object of a config file, with typed getters that name the file and field.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, what: impl Into<String>) -> Error {
        Error::Field {
            path: self.path.to_path_buf(),
            field: format!("{}{field}", self.prefix),
            what: what.into(),
        }
    }

    fn child(&self, field: &str) -> Result<Fields<'a>> {
        let v = self
            .obj
            .get(field)
            .ok_or_else(|| self.err(field, "missing"))?;
        Ok(Fields {
            path: self.path,
            obj: as_object(self.path, &format!("{}{field}", self.prefix), v)?,
            prefix: format!("{}{field}.", self.prefix),
        })
    }

    fn opt_child(&self, field: &str) -> Result<Option<Fields<'a>>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.child(field).map(Some),
        }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "missing"))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        self.err(field, format!("expected a non-negative integer, found {v}"))
                    })
            })
            .transpose()
    }

    fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(field)?.unwrap_or(default))
    }

    fn i64_or(&self, field: &str, default: i64) -> Result<i64> {
        self.get(field)
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| self.err(field, format!("expected an integer, found {v}")))
            })
            .transpose()
            .map(|o| o.unwrap_or(default))
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        self.get(field)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(field, format!("expected a number, found {v}")))
            })
            .transpose()
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(field)?.unwrap_or(default))
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        self.get(field)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(field, format!("expected true or false, found {v}")))
            })
            .transpose()
    }

    fn str_or(&self, field: &str, default: &'a str) -> Result<&'a str> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    fn usize_list(&self, field: &str) -> Result<Vec<usize>> {
        let v = self.get(field).ok_or_else(|| self.err(field, "missing"))?;
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                self.err(
                    field,
                    format!("expected a list of non-negative integers, found {v}"),
                )
            })
    }

    fn pinpoints(&self, field: &str) -> Result<Vec<(usize, usize)>> {
        let v = self.get(field).ok_or_else(|| self.err(field, "missing"))?;
        let bad = || {
            self.err(
                field,
                format!("expected a list of [height, width] pairs, found {v}"),
            )
        };
        let list = v.as_array().ok_or_else(bad)?;
        let pins = list
            .iter()
            .map(|p| {
                let p = p.as_array()?;
                match p.as_slice() {
                    [h, w] => Some((h.as_u64()? as usize, w.as_u64()? as usize)),
                    _ => None,
                }
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        if pins.is_empty() {
            return Err(self.err(field, "no pinpoints"));
        }
        Ok(pins)
    }

    fn expect_act(&self, field: &str, default: &str, allowed: &[&str]) -> Result<()> {
        let act = self.str_or(field, default)?;
        if allowed.contains(&act) {
            Ok(())
        } else {
            Err(self.err(
                field,
                format!(
                    "activation `{act}` is not supported here (expected {})",
                    allowed.join(" or ")
                ),
            ))
        }
    }
}

/// The LLaMA decoder's fields; `defaults` are `LlamaConfig`'s (used by llava-hf configs that
/// leave fields out), `None` where the field must be present.
fn text_config(f: &Fields, llama_defaults: bool, tie_default: bool) -> Result<TextConfig> {
    let d = |v: usize| if llama_defaults { Some(v) } else { None };
    let req = |field: &str, default: Option<usize>| -> Result<usize> {
        match (f.opt_usize(field)?, default) {
            (Some(v), _) | (None, Some(v)) => Ok(v),
            (None, None) => Err(f.err(field, "missing")),
        }
    };
    let hidden_size = req("hidden_size", d(4096))?;
    let num_heads = req("num_attention_heads", d(32))?;
    let num_kv_heads = f.usize_or("num_key_value_heads", num_heads)?;
    let head_dim = f.usize_or("head_dim", hidden_size / num_heads.max(1))?;
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(f.err(
            "num_key_value_heads",
            format!("{num_kv_heads} key/value heads do not divide {num_heads} query heads"),
        ));
    }
    f.expect_act("hidden_act", "silu", &["silu"])?;
    // RoPE: transformers 5 nests it in `rope_parameters`; earlier configs (and the released
    // Qwen3-VL-2B) have `rope_theta` beside `rope_scaling`.
    let rope = f.opt_child("rope_parameters")?;
    let scaling = f.opt_child("rope_scaling")?;
    let rope_theta = match (&rope, f.opt_f64("rope_theta")?) {
        (Some(r), _) if r.opt_f64("rope_theta")?.is_some() => r.f64_or("rope_theta", 10000.0)?,
        (_, Some(t)) => t,
        _ => 10000.0,
    };
    let mut mrope = None;
    for r in [&rope, &scaling].into_iter().flatten() {
        let kind = r.str_or("rope_type", r.str_or("type", "default")?)?;
        if !matches!(kind, "default" | "mrope") {
            return Err(r.err(
                "rope_type",
                format!(
                    "RoPE scaling `{kind}` is not supported (only the default rotary positions)"
                ),
            ));
        }
        if r.get("mrope_section").is_some() {
            let s = r.usize_list("mrope_section")?;
            let [t, h, w] = s[..] else {
                return Err(r.err("mrope_section", "expected three sections (t, h, w)"));
            };
            if t + h + w != head_dim / 2 {
                return Err(r.err(
                    "mrope_section",
                    format!(
                        "sections sum to {} but a head has {} rotary pairs",
                        t + h + w,
                        head_dim / 2
                    ),
                ));
            }
            mrope = Some(([t, h, w], r.opt_bool("mrope_interleaved")?.unwrap_or(false)));
        }
    }
    Ok(TextConfig {
        hidden_size,
        intermediate_size: req("intermediate_size", d(11008))?,
        num_layers: req("num_hidden_layers", d(32))?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: req("vocab_size", d(32000))?,
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta,
        mrope,
        qk_norm: false,
        attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(tie_default),
    })
}

fn qwen3_vl(f: &Fields) -> Result<Qwen3VlConfig> {
    let t = f.child("text_config")?;
    let mut text = text_config(&t, false, false)?;
    text.qk_norm = true;
    // The top-level flag is the one transformers ties by.
    if let Some(tie) = f.opt_bool("tie_word_embeddings")? {
        text.tie_word_embeddings = tie;
    }
    if text.mrope.is_none() {
        return Err(t.err(
            "rope_parameters.mrope_section",
            "missing (Qwen3-VL needs multimodal RoPE sections)",
        ));
    }
    let v = f.child("vision_config")?;
    v.expect_act("hidden_act", "gelu_pytorch_tanh", &["gelu_pytorch_tanh"])?;
    let vision = Qwen3VisionConfig {
        depth: v.usize("depth")?,
        hidden_size: v.usize("hidden_size")?,
        intermediate_size: v.usize("intermediate_size")?,
        num_heads: v.usize("num_heads")?,
        patch_size: v.usize("patch_size")?,
        temporal_patch_size: v.usize_or("temporal_patch_size", 2)?,
        spatial_merge_size: v.usize_or("spatial_merge_size", 2)?,
        num_position_embeddings: v.usize("num_position_embeddings")?,
        out_hidden_size: v.usize("out_hidden_size")?,
        deepstack_visual_indexes: v.usize_list("deepstack_visual_indexes")?,
        in_channels: v.usize_or("in_channels", 3)?,
    };
    if let Some(&bad) = vision
        .deepstack_visual_indexes
        .iter()
        .find(|&&i| i >= vision.depth)
    {
        return Err(v.err(
            "deepstack_visual_indexes",
            format!("block {bad} is beyond the {} blocks", vision.depth),
        ));
    }
    if vision.deepstack_visual_indexes.len() > text.num_layers {
        return Err(v.err(
            "deepstack_visual_indexes",
            "more DeepStack features than decoder layers",
        ));
    }
    let side = (vision.num_position_embeddings as f64).sqrt() as usize;
    if side * side != vision.num_position_embeddings {
        return Err(v.err("num_position_embeddings", "not a square number"));
    }
    if !vision.hidden_size.is_multiple_of(vision.num_heads)
        || !(vision.hidden_size / vision.num_heads).is_multiple_of(4)
    {
        return Err(v.err(
            "num_heads",
            "the head width must be a multiple of 4 (2-D rotary halves)",
        ));
    }
    if vision.out_hidden_size != text.hidden_size {
        return Err(v.err(
            "out_hidden_size",
            format!(
                "{} differs from the text width {}",
                vision.out_hidden_size, text.hidden_size
            ),
        ));
    }
    Ok(Qwen3VlConfig {
        text,
        vision,
        image_token_id: f.i64_or("image_token_id", 151655)?,
        vision_start_token_id: f.i64_or("vision_start_token_id", 151652)?,
        vision_end_token_id: f.i64_or("vision_end_token_id", 151653)?,
    })
}

/// `CLIPVisionConfig` with its defaults (ViT-B/32's), from either a vision config or a full
/// CLIP config with a `vision_config` inside.
fn clip_vision(f: &Fields) -> Result<ClipVisionConfig> {
    if let Some(inner) = f.opt_child("vision_config")? {
        return clip_vision(&inner);
    }
    f.expect_act("hidden_act", "quick_gelu", &["quick_gelu"])?;
    let c = ClipVisionConfig {
        hidden_size: f.usize_or("hidden_size", 768)?,
        intermediate_size: f.usize_or("intermediate_size", 3072)?,
        num_layers: f.usize_or("num_hidden_layers", 12)?,
        num_heads: f.usize_or("num_attention_heads", 12)?,
        patch_size: f.usize_or("patch_size", 32)?,
        image_size: f.usize_or("image_size", 224)?,
        layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
        num_channels: f.usize_or("num_channels", 3)?,
    };
    if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
        return Err(f.err("patch_size", "does not divide image_size"));
    }
    if c.num_heads == 0 || !c.hidden_size.is_multiple_of(c.num_heads) {
        return Err(f.err("num_attention_heads", "does not divide hidden_size"));
    }
    Ok(c)
}

fn check_layer(f: &Fields, field: &str, layer: i64, layers: usize) -> Result<()> {
    // Python indexing into `layers + 1` hidden states.
    let n = layers as i64 + 1;
    if layer >= n || layer < -n {
        return Err(f.err(
            field,
            format!("layer {layer} is outside the tower's {layers} layers"),
        ));
    }
    Ok(())
}

fn llava_next_hf(f: &Fields) -> Result<LlavaNextConfig> {
    let text = text_config(&f.child("text_config")?, true, false)?;
    let v = f.child("vision_config")?;
    let vision = clip_vision(&v)?;
    f.expect_act("projector_hidden_act", "gelu", &["gelu"])?;
    let vision_feature_layer = f.i64_or("vision_feature_layer", -2)?;
    check_layer(
        f,
        "vision_feature_layer",
        vision_feature_layer,
        vision.num_layers,
    )?;
    let drop_cls = match f.str_or("vision_feature_select_strategy", "default")? {
        "default" => true,
        "full" => false,
        other => {
            return Err(f.err(
                "vision_feature_select_strategy",
                format!("`{other}` (expected default or full)"),
            ));
        }
    };
    let mut text = text;
    if let Some(tie) = f.opt_bool("tie_word_embeddings")? {
        text.tie_word_embeddings = tie;
    }
    Ok(LlavaNextConfig {
        text,
        vision,
        vision_feature_layer,
        drop_cls,
        projector_bias: f.opt_bool("multimodal_projector_bias")?.unwrap_or(true),
        image_grid_pinpoints: f.pinpoints("image_grid_pinpoints")?,
        image_token_index: f.i64_or("image_token_index", 32000)?,
        naming: Naming::Transformers,
    })
}

/// The image placeholder id of an original-form LLaVA checkpoint in evl-ecg's `input_ids`.
///
/// The original repository splits the prompt at `<image>` and marks the spot with the
/// in-memory sentinel `IMAGE_TOKEN_INDEX = -200`; its tokenizer (LLaMA-2's 32,000 tokens) has no
/// `<image>`. evl-ecg expands the placeholder to one id per visual token like the transformers
/// form does, using the tokenizer's `<image>` id where it has one and else the first id past
/// its vocabulary: 32000 either way for LLaMA-2-based LLaVA (see `prompt`). The id is never
/// looked up in the embedding table (image positions take the visual tokens), so it may lie
/// beyond it.
pub const LLAVA_ORIGINAL_IMAGE_ID: i64 = 32000;

fn llava_original(f: &Fields, dir: &Path) -> Result<LlavaNextConfig> {
    let text = text_config(f, false, false)?;
    let tower = f.str_or("mm_vision_tower", "")?;
    if tower.is_empty() {
        return Err(f.err("mm_vision_tower", "missing"));
    }
    let local = dir.join(tower);
    let vision = if local.join("config.json").is_file() {
        let path = local.join("config.json");
        let root = read_json(&path)?;
        clip_vision(&Fields {
            path: &path,
            obj: as_object(&path, "", &root)?,
            prefix: String::new(),
        })?
    } else if tower == "openai/clip-vit-large-patch14-336" {
        ClipVisionConfig::vit_large_patch14_336()
    } else {
        return Err(f.err(
            "mm_vision_tower",
            format!(
                "`{tower}` is neither a folder with a config.json beside this file nor the built-in openai/clip-vit-large-patch14-336"
            ),
        ));
    };
    if let Some(mm) = f.opt_usize("mm_hidden_size")?
        && mm != vision.hidden_size
    {
        return Err(f.err(
            "mm_hidden_size",
            format!("{mm} but the vision tower is {} wide", vision.hidden_size),
        ));
    }
    match f.str_or("mm_projector_type", "linear")? {
        "mlp2x_gelu" => {}
        other => {
            return Err(f.err(
                "mm_projector_type",
                format!("`{other}` is not supported (mlp2x_gelu is)"),
            ));
        }
    }
    match f.str_or("mm_patch_merge_type", "flat")? {
        "spatial_unpad" => {}
        other => {
            return Err(f.err(
                "mm_patch_merge_type",
                format!("`{other}` is not supported (spatial_unpad is)"),
            ));
        }
    }
    match f.str_or("image_aspect_ratio", "square")? {
        "anyres" => {}
        other => {
            return Err(f.err(
                "image_aspect_ratio",
                format!("`{other}` is not supported (anyres is)"),
            ));
        }
    }
    let drop_cls = match f.str_or("mm_vision_select_feature", "patch")? {
        "patch" => true,
        "cls_patch" => false,
        other => {
            return Err(f.err(
                "mm_vision_select_feature",
                format!("`{other}` (expected patch or cls_patch)"),
            ));
        }
    };
    let vision_feature_layer = f.i64_or("mm_vision_select_layer", -2)?;
    check_layer(
        f,
        "mm_vision_select_layer",
        vision_feature_layer,
        vision.num_layers,
    )?;
    Ok(LlavaNextConfig {
        text,
        vision,
        vision_feature_layer,
        drop_cls,
        projector_bias: true,
        image_grid_pinpoints: f.pinpoints("image_grid_pinpoints")?,
        image_token_index: LLAVA_ORIGINAL_IMAGE_ID,
        naming: Naming::OriginalLlava,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(dir: &Path, text: &str) {
        std::fs::write(dir.join("config.json"), text).unwrap();
    }

    #[test]
    fn shared_checkpoints_parse() {
        let Some(hf) = evl_testkit::shared_dir().map(|d| d.join("hf")) else {
            return;
        };
        let HfConfig::Qwen3Vl(q) = HfConfig::from_dir(&hf.join("qwen3_vl_tiny")).unwrap() else {
            panic!("qwen3_vl_tiny is Qwen3-VL")
        };
        assert_eq!(q.text.mrope, Some(([4, 2, 2], true)));
        assert_eq!(
            (q.text.num_heads, q.text.num_kv_heads, q.text.head_dim),
            (4, 2, 16)
        );
        assert!(q.text.tie_word_embeddings && q.text.qk_norm);
        assert_eq!(q.vision.deepstack_visual_indexes, vec![0, 1]);
        let HfConfig::LlavaNext(a) = HfConfig::from_dir(&hf.join("llava_next_tiny")).unwrap()
        else {
            panic!()
        };
        let HfConfig::LlavaNext(b) = HfConfig::from_dir(&hf.join("llava_original_tiny")).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.text, b.text);
        assert_eq!(a.vision, b.vision);
        assert_eq!(a.image_grid_pinpoints, b.image_grid_pinpoints);
        assert_eq!((a.vision_feature_layer, a.drop_cls), (-2, true));
        assert_eq!(
            (a.naming, b.naming),
            (Naming::Transformers, Naming::OriginalLlava)
        );
        assert_eq!(a.text.rms_norm_eps, 1e-5);
    }

    #[test]
    fn released_forms_and_bad_configs_are_named() {
        let tmp = tempdir();
        // The llava-hf 1.6 vicuna config leaves most fields to LlamaConfig / CLIPVisionConfig.
        write(
            tmp.path(),
            r#"{"architectures":["LlavaNextForConditionalGeneration"],"image_grid_pinpoints":[[336,672]],
                "text_config":{"model_type":"llama","vocab_size":32064,"rms_norm_eps":1e-5},
                "vision_config":{"hidden_size":1024,"image_size":336,"intermediate_size":4096,
                  "num_attention_heads":16,"num_hidden_layers":24,"patch_size":14}}"#,
        );
        let HfConfig::LlavaNext(c) = HfConfig::from_dir(tmp.path()).unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                c.text.hidden_size,
                c.text.num_layers,
                c.text.intermediate_size
            ),
            (4096, 32, 11008)
        );
        assert_eq!(c.vision, ClipVisionConfig::vit_large_patch14_336());
        // Original form naming the hub tower: the built-in preset.
        write(
            tmp.path(),
            r#"{"architectures":["LlavaLlamaForCausalLM"],"hidden_size":4096,"intermediate_size":11008,
                "num_hidden_layers":32,"num_attention_heads":32,"vocab_size":32000,
                "mm_vision_tower":"openai/clip-vit-large-patch14-336","mm_projector_type":"mlp2x_gelu",
                "mm_patch_merge_type":"spatial_unpad","image_aspect_ratio":"anyres","mm_hidden_size":1024,
                "image_grid_pinpoints":[[336,672],[672,336]]}"#,
        );
        let HfConfig::LlavaNext(c) = HfConfig::from_dir(tmp.path()).unwrap() else {
            panic!()
        };
        assert_eq!(c.vision, ClipVisionConfig::vit_large_patch14_336());
        assert_eq!(c.image_token_index, LLAVA_ORIGINAL_IMAGE_ID);
        // Qwen3-VL-2B's released form: rope_theta beside rope_scaling.
        write(
            tmp.path(),
            r#"{"architectures":["Qwen3VLForConditionalGeneration"],"tie_word_embeddings":true,
                "text_config":{"hidden_size":2048,"intermediate_size":6144,"num_hidden_layers":28,
                  "num_attention_heads":16,"num_key_value_heads":8,"head_dim":128,"vocab_size":151936,
                  "rope_theta":5000000,"rope_scaling":{"mrope_interleaved":true,"mrope_section":[24,20,20],"rope_type":"default"}},
                "vision_config":{"depth":24,"hidden_size":1024,"intermediate_size":4096,"num_heads":16,
                  "patch_size":16,"num_position_embeddings":2304,"out_hidden_size":2048,
                  "deepstack_visual_indexes":[5,11,17],"hidden_act":"gelu_pytorch_tanh"}}"#,
        );
        let HfConfig::Qwen3Vl(q) = HfConfig::from_dir(tmp.path()).unwrap() else {
            panic!()
        };
        assert_eq!(
            (q.text.rope_theta, q.text.mrope),
            (5e6, Some(([24, 20, 20], true)))
        );
        // Errors name the file and field.
        write(tmp.path(), r#"{"architectures":["BertModel"]}"#);
        let e = HfConfig::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("BertModel"), "{e}");
        write(
            tmp.path(),
            r#"{"architectures":["Qwen3VLForConditionalGeneration"],"text_config":{"hidden_size":64}}"#,
        );
        let e = HfConfig::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("text_config.num_attention_heads") && e.contains("missing"),
            "{e}"
        );
        write(
            tmp.path(),
            r#"{"architectures":["LlavaLlamaForCausalLM"],"hidden_size":64,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":4,"vocab_size":10,"mm_vision_tower":"nowhere/tower"}"#,
        );
        let e = HfConfig::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("mm_vision_tower") && e.contains("nowhere/tower"),
            "{e}"
        );
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }
}
