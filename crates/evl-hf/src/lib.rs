//! The paper's real checkpoints as files: everything about a Hugging Face / LLaVA checkpoint
//! folder that needs no tensor framework.
//!
//! - [`config`]: `config.json` of Qwen3-VL and LLaVA-NeXT, in the transformers form and the
//!   original LLaVA repository's form (`LlavaLlamaForCausalLM`, as PULSE-7B is published);
//! - [`weights`]: one or sharded safetensors files in bf16, f16 or f32, widened to f32 on the
//!   host, with every tensor accounted for (missing, unexpected and mis-shaped are errors
//!   naming the tensor and the file);
//! - [`preprocess`]: the image processors (Qwen's `smart_resize` + patchify, LLaVA-NeXT's
//!   anyres tiles), with PyTorch's 8-bit bicubic resize reproduced so `pixel_values` match
//!   transformers exactly;
//! - [`prompt`]: the checkpoint's tokenizer and chat format (Qwen3-VL's, `llava_v1`), image
//!   placeholders expanded to the visual token count, answer spans, Qwen3-VL's multimodal RoPE
//!   index.
//!
//! The burn models built from these live in `evl-models::hf`.
//!
//! Why one crate of about 5.9k lines (4.5k without unit tests; over the workspace's ~3k guide):
//! each module is one file format or one transformers processor, reproduced to the exact
//! value (the bicubic resize alone is PyTorch's 8-bit kernel, the prompt module both
//! families' chat templates and Qwen3-VL's RoPE index). Split further, every crate would hold
//! one module and depend on the same `config`; together they are what "a checkpoint folder,
//! read without a tensor framework" means, and the layering check keeps them burn-free.

pub mod config;
pub mod plan;
pub mod preprocess;
pub mod prompt;
pub mod weights;

pub use config::{Error as ConfigError, HfConfig};
pub use preprocess::Error as PreprocessError;
pub use prompt::Error as PromptError;
