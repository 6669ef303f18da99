//! The prompt and token side of the paper's two vision-language families, exact against
//! Hugging Face `transformers` 5.25 (the processors' `input_ids`, `attention_mask`,
//! `mm_token_type_ids` and Qwen3-VL's `position_ids`).
//!
//! - [`HfTokenizer`]: `tokenizer.json` of a checkpoint folder (through the `tokenizers` crate,
//!   no network) plus the special tokens named in `tokenizer_config.json` and
//!   `generation_config.json`: BOS (and whether it is added: LLaMA-2 / Vicuna adds `<s>` = 1,
//!   Qwen3 adds nothing), EOS ids for stopping, PAD; encoding and decoding (SentencePiece `▁`
//!   metaspace and byte-level BPE both decode with their spaces).
//! - [`PromptFormat`] / [`Prompter`]: the two conversation formats with one image in the first
//!   user turn, single- and multi-turn:
//!   - Qwen3-VL chat (ChatML): `<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n`;
//!   - LLaVA `llava_v1` (the `vicuna_v1` conversation, PULSE-7B's):
//!     `{system} USER: <image>\n{question} ASSISTANT:`, answers closed by `</s>`.
//!
//!   The image placeholder is expanded to one token per visual token, and the positions of
//!   the assistant's answers are returned for training with cross-entropy on answers only
//!   ([`TokenizedConversation::labels`]).
//! - [`qwen3_vl_rope_index`]: Qwen3-VL's multimodal RoPE position ids `[3, seq]` and the
//!   `rope_delta` that generation adds to later positions.
//! - [`qwen3_vl_image_token_count`]: how many tokens one Qwen3-VL image becomes (LLaVA-NeXT's
//!   count, which depends on anyres unpadding, is `preprocess::llava_next_num_image_tokens`).
//!
//! # The original LLaVA form and the image token id
//!
//! The original LLaVA repository (`LlavaLlamaForCausalLM`, as PULSE-7B is published) tokenises
//! the text around the literal `<image>` and inserts `IMAGE_TOKEN_INDEX = -200` once; its model
//! then replaces that one id by the image's features. Here token ids are `u32`, so the original
//! form is given the SAME final id sequence as the transformers form: the text chunks are
//! tokenised separately (as the original repository does) and the `-200` is replaced by N
//! copies of the tokenizer's `<image>` id (32000 for the LLaVA-NeXT vocabularies). A tokenizer
//! without an `<image>` token (a LLaMA-2 tokenizer of exactly 32,000 entries) gets the first id
//! past its vocabulary, which is again 32000: see [`PromptFormat::llava_v1_original`]. The
//! model must splice image features at these positions (they are listed in
//! [`TokenizedPrompt::image_spans`] and flagged in [`TokenizedPrompt::mm_token_type_ids`])
//! and must not look that sentinel up in a table that lacks it.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A token id, as the `tokenizers` crate gives it.
pub type TokenId = u32;

/// A token's byte range `(start, end)` in the text it was encoded from.
pub type ByteRange = (usize, usize);

/// The label value that cross-entropy ignores (PyTorch's and transformers' `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// The original LLaVA repository's `IMAGE_TOKEN_INDEX`: the id it inserts once for `<image>`.
/// This module never emits it; it emits the `<image>` token id instead (see the module docs).
pub const ORIGINAL_LLAVA_IMAGE_TOKEN_INDEX: i64 = -200;

/// The system message of LLaVA's `llava_v1` / `vicuna_v1` conversation.
pub const VICUNA_V1_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// Qwen3-VL's image placeholder (expanded to one token per merged visual token).
pub const QWEN_IMAGE_PAD: &str = "<|image_pad|>";
/// Qwen3-VL's token opening a vision block.
pub const QWEN_VISION_START: &str = "<|vision_start|>";
/// Qwen3-VL's token closing a vision block.
pub const QWEN_VISION_END: &str = "<|vision_end|>";
/// LLaVA's image placeholder.
pub const LLAVA_IMAGE: &str = "<image>";

/// Errors of the tokenizer, the prompt formats and the RoPE index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not JSON.
    #[error("{path}: not valid JSON: {source}")]
    Json {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// `tokenizer.json` could not be loaded by the `tokenizers` crate.
    #[error("{path}: cannot load the tokenizer: {message}")]
    TokenizerLoad {
        /// File.
        path: PathBuf,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// A file's content is unusable (a field of the wrong type, a token not in the vocabulary).
    #[error("{path}: {what}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The tokenizer failed on a text or on ids.
    #[error("tokenizer {path}: {what}: {message}")]
    Tokenizer {
        /// The tokenizer's `tokenizer.json`.
        path: PathBuf,
        /// `encoding` or `decoding`.
        what: &'static str,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// A prompt has no image placeholder, though these formats carry one image.
    #[error(
        "the prompt has no image placeholder `{placeholder}` ({format}): put one where the image goes, e.g. with the format's question/conversation builders"
    )]
    NoImagePlaceholder {
        /// The placeholder text.
        placeholder: String,
        /// The format's name.
        format: &'static str,
    },
    /// The number of image placeholders and of image token counts given differ.
    #[error(
        "the prompt has {found} image placeholder(s) `{placeholder}` but {given} image token count(s) were given"
    )]
    ImageCount {
        /// The placeholder text.
        placeholder: String,
        /// Placeholders in the prompt.
        found: usize,
        /// Counts given.
        given: usize,
    },
    /// A conversation is malformed (order of roles, an empty turn list, ...).
    #[error("conversation: {0}")]
    Conversation(String),
    /// The inputs to the multimodal RoPE index or to an image token count are inconsistent.
    #[error("{0}")]
    Positions(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

// ---------------------------------------------------------------------------------------------
// JSON helpers
// ---------------------------------------------------------------------------------------------

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

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn invalid(path: &Path, what: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// A token named in `tokenizer_config.json`: a string, `{"content": ...}` (the older
/// `AddedToken` form) or `null`.
fn config_token(cfg: &Value, key: &str, path: &Path) -> Result<Option<String>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(m)) => match m.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid(
                path,
                format!("field `{key}`: an object without a string `content`"),
            )),
        },
        Some(other) => Err(invalid(
            path,
            format!("field `{key}`: expected a token string, found {other}"),
        )),
    }
}

fn config_bool(cfg: &Value, key: &str, path: &Path) -> Result<Option<bool>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(
            path,
            format!("field `{key}`: expected true or false, found {other}"),
        )),
    }
}

fn json_id(v: &Value, key: &str, path: &Path) -> Result<TokenId> {
    v.as_u64()
        .and_then(|x| TokenId::try_from(x).ok())
        .ok_or_else(|| {
            invalid(
                path,
                format!("field `{key}`: expected a token id, found {v}"),
            )
        })
}

/// A token id field that may be an integer, a list of integers or `null`.
fn config_ids(cfg: &Value, key: &str, path: &Path) -> Result<Vec<TokenId>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(|v| json_id(v, key, path)).collect(),
        Some(v) => Ok(vec![json_id(v, key, path)?]),
    }
}

fn config_id(cfg: &Value, key: &str, path: &Path) -> Result<Option<TokenId>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => json_id(v, key, path).map(Some),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// A checkpoint's tokenizer: `tokenizer.json` plus the special tokens of
/// `tokenizer_config.json` and `generation_config.json`.
///
/// Encoding splits the tokenizer's added tokens (`<|im_start|>`, `<image>`, `</s>`, ...) out
/// of the text as transformers does; [`encode`](Self::encode) with `add_special_tokens` adds
/// what the family adds around a sequence (LLaMA-2: `<s>` in front; Qwen3: nothing).
pub struct HfTokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
    bos: Option<TokenId>,
    eos: Vec<TokenId>,
    pad: Option<TokenId>,
    prefix: Vec<TokenId>,
    suffix: Vec<TokenId>,
    special: HashSet<TokenId>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("prefix", &self.prefix)
            .field("suffix", &self.suffix)
            .finish()
    }
}

impl HfTokenizer {
    /// Loads `dir/tokenizer.json` (required), `dir/tokenizer_config.json` and
    /// `dir/generation_config.json` (both optional).
    ///
    /// - BOS: `bos_token` of `tokenizer_config.json`, else `bos_token_id` of
    ///   `generation_config.json`.
    /// - EOS ids: `eos_token_id` of `generation_config.json` (an id or a list), then
    ///   `eos_token` of `tokenizer_config.json` if not already among them.
    /// - PAD: `pad_token` of `tokenizer_config.json`, else `pad_token_id` of
    ///   `generation_config.json`.
    /// - What [`encode`](Self::encode) adds around a sequence: read off the post-processor of
    ///   `tokenizer.json` (transformers 5 does the same), then `add_bos_token` /
    ///   `add_eos_token` of `tokenizer_config.json` where they are given.
    ///
    /// Every token named in these files must be in the vocabulary.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::TokenizerLoad {
                path: path.clone(),
                message: e.to_string(),
            })?;
        // Prompts are never cut or padded behind the caller's back.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::TokenizerLoad {
                path: path.clone(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        let special: HashSet<TokenId> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();

        let tc_path = dir.join("tokenizer_config.json");
        let gc_path = dir.join("generation_config.json");
        let tc = read_json_if_present(&tc_path)?.unwrap_or(Value::Null);
        let gc = read_json_if_present(&gc_path)?.unwrap_or(Value::Null);

        let lookup = |name: &str, file: &Path, key: &str| -> Result<TokenId> {
            tokenizer.token_to_id(name).ok_or_else(|| {
                invalid(
                    file,
                    format!(
                        "field `{key}`: token `{name}` is not in the vocabulary of {}",
                        path.display()
                    ),
                )
            })
        };
        let check = |id: TokenId, file: &Path, key: &str| -> Result<TokenId> {
            match tokenizer.id_to_token(id) {
                Some(_) => Ok(id),
                None => Err(invalid(
                    file,
                    format!(
                        "field `{key}`: id {id} is not in the vocabulary of {}",
                        path.display()
                    ),
                )),
            }
        };

        let bos = match config_token(&tc, "bos_token", &tc_path)? {
            Some(name) => Some(lookup(&name, &tc_path, "bos_token")?),
            None => match config_id(&gc, "bos_token_id", &gc_path)? {
                Some(id) => Some(check(id, &gc_path, "bos_token_id")?),
                None => None,
            },
        };
        let mut eos = Vec::new();
        for id in config_ids(&gc, "eos_token_id", &gc_path)? {
            let id = check(id, &gc_path, "eos_token_id")?;
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        if let Some(name) = config_token(&tc, "eos_token", &tc_path)? {
            let id = lookup(&name, &tc_path, "eos_token")?;
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let pad = match config_token(&tc, "pad_token", &tc_path)? {
            Some(name) => Some(lookup(&name, &tc_path, "pad_token")?),
            None => match config_id(&gc, "pad_token_id", &gc_path)? {
                Some(id) => Some(check(id, &gc_path, "pad_token_id")?),
                None => None,
            },
        };

        // What the post-processor adds around one sequence.
        let probe = "a";
        let encode_probe = |add: bool| -> Result<Vec<TokenId>> {
            tokenizer
                .encode(probe, add)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer {
                    path: path.clone(),
                    what: "encoding",
                    message: e.to_string(),
                })
        };
        let with = encode_probe(true)?;
        let without = encode_probe(false)?;
        let at = (0..=with.len().saturating_sub(without.len()))
            .find(|&i| with.get(i..i + without.len()) == Some(&without[..]))
            .ok_or_else(|| {
                invalid(
                    &path,
                    "the post-processor changes a sequence's own tokens (only tokens added around it are supported)",
                )
            })?;
        let mut prefix = with[..at].to_vec();
        let mut suffix = with[at + without.len()..].to_vec();
        if let Some(add) = config_bool(&tc, "add_bos_token", &tc_path)? {
            prefix = match (add, bos) {
                (true, Some(b)) => vec![b],
                (true, None) => {
                    return Err(invalid(
                        &tc_path,
                        "`add_bos_token` is true but no BOS token is named",
                    ));
                }
                (false, _) => Vec::new(),
            };
        }
        if let Some(add) = config_bool(&tc, "add_eos_token", &tc_path)? {
            suffix = match (add, eos.last()) {
                (true, Some(&e)) => vec![e],
                (true, None) => {
                    return Err(invalid(
                        &tc_path,
                        "`add_eos_token` is true but no EOS token is named",
                    ));
                }
                (false, _) => Vec::new(),
            };
        }

        Ok(Self {
            tokenizer,
            path,
            bos,
            eos,
            pad,
            prefix,
            suffix,
            special,
        })
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Number of ids, added tokens included (Qwen3: 151,669; LLaVA-NeXT's LLaMA: 32,002).
    /// Model embedding tables may be larger (Qwen3-VL: 151,936; LLaVA-NeXT: 32,064).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of a token (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.tokenizer.token_to_id(token)
    }

    /// The token of an id.
    pub fn id_to_token(&self, id: TokenId) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Whether `id` is a special token (skipped by [`decode`](Self::decode)).
    pub fn is_special(&self, id: TokenId) -> bool {
        self.special.contains(&id)
    }

    /// The BOS id, if the tokenizer names one.
    pub fn bos_token_id(&self) -> Option<TokenId> {
        self.bos
    }

    /// The ids that end generation (generation config's first, then the tokenizer's).
    pub fn eos_token_ids(&self) -> &[TokenId] {
        &self.eos
    }

    /// The PAD id, if one is named.
    pub fn pad_token_id(&self) -> Option<TokenId> {
        self.pad
    }

    /// Whether [`encode`](Self::encode) with special tokens puts BOS in front.
    pub fn adds_bos(&self) -> bool {
        self.bos.is_some() && self.prefix.first() == self.bos.as_ref()
    }

    /// The ids added in front of / after a sequence when special tokens are added.
    pub fn added_around(&self) -> (&[TokenId], &[TokenId]) {
        (&self.prefix, &self.suffix)
    }

    fn encode_err(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            what: "encoding",
            message: e.to_string(),
        }
    }

    /// Encodes `text`; with `add_special_tokens`, what the family adds around a sequence is
    /// added (LLaMA-2: `<s>` in front). Added tokens in the text (`<|im_start|>`, `</s>`, ...)
    /// become their ids either way.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.0)
    }

    /// [`encode`](Self::encode) with each token's byte range in `text` (tokens added around
    /// the sequence get the empty range `(0, 0)`).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<TokenId>, Vec<ByteRange>)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.encode_err(e))?;
        let n_pre = if add_special_tokens {
            self.prefix.len()
        } else {
            0
        };
        let n_suf = if add_special_tokens {
            self.suffix.len()
        } else {
            0
        };
        let mut ids = Vec::with_capacity(enc.get_ids().len() + n_pre + n_suf);
        let mut offsets = Vec::with_capacity(ids.capacity());
        if add_special_tokens {
            ids.extend_from_slice(&self.prefix);
            offsets.extend(std::iter::repeat_n((0, 0), n_pre));
        }
        ids.extend_from_slice(enc.get_ids());
        offsets.extend_from_slice(enc.get_offsets());
        if add_special_tokens {
            ids.extend_from_slice(&self.suffix);
            offsets.extend(std::iter::repeat_n((0, 0), n_suf));
        }
        Ok((ids, offsets))
    }

    /// Decodes ids to text; with `skip_special_tokens`, special tokens (`<s>`, `</s>`,
    /// `<|im_end|>`, `<image>`, ...) are left out. Ids outside the tokenizer's vocabulary
    /// (rows of a model's padded embedding table) are left out too, as transformers does.
    /// Byte-level tokens that do not form whole UTF-8 characters decode to U+FFFD.
    pub fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                what: "decoding",
                message: e.to_string(),
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Prompt formats
// ---------------------------------------------------------------------------------------------

/// The conversation format of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatStyle {
    /// Qwen3-VL's chat template (ChatML, no default system message).
    Qwen3Vl,
    /// LLaVA's `llava_v1` (`vicuna_v1`): `{system} USER: ... ASSISTANT: ...</s>`.
    VicunaV1,
}

/// How the image placeholder becomes image tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagePlaceholder {
    /// The placeholder is an added token of the vocabulary: the whole prompt is tokenised and
    /// each placeholder id is replaced by N copies (transformers' processors).
    AddedToken,
    /// The text is tokenised in chunks around the literal placeholder, which becomes N copies
    /// of the image token id (the original LLaVA repository's `tokenizer_image_token`).
    SplitText,
}

/// Who speaks a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A system message (only as the first turn; replaces `llava_v1`'s default one).
    System,
    /// The user (the first user turn carries the image).
    User,
    /// The assistant (its text and end-of-turn token are the answer a model learns).
    Assistant,
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// Speaker.
    pub role: Role,
    /// Text, without any image placeholder (the format puts the image in the first user turn).
    pub text: String,
}

impl Turn {
    /// A turn.
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            text: text.into(),
        }
    }

    /// A user turn.
    pub fn user(text: impl Into<String>) -> Self {
        Self::new(Role::User, text)
    }

    /// An assistant turn.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::new(Role::Assistant, text)
    }

    /// A system turn.
    pub fn system(text: impl Into<String>) -> Self {
        Self::new(Role::System, text)
    }
}

/// A family's prompt format: conversation style, image placeholder and its ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptFormat {
    /// Conversation style.
    pub style: ChatStyle,
    /// How the placeholder is tokenised.
    pub placeholder_mode: ImagePlaceholder,
    /// The placeholder text (`<|image_pad|>` or `<image>`).
    pub placeholder: String,
    /// The id every image token gets after expansion.
    pub image_token_id: TokenId,
    /// Qwen3-VL's `<|vision_start|>` id (what [`qwen3_vl_rope_index`] needs).
    pub vision_start_token_id: Option<TokenId>,
}

/// A formatted conversation: the prompt string and the byte ranges of the assistant's answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormattedConversation {
    /// The prompt string (one image placeholder, in the first user turn).
    pub text: String,
    /// For each assistant turn, the bytes of its text and its end-of-turn marker
    /// (`<|im_end|>` / `</s>`) in `text`; for vicuna_v1 also the space that separates it
    /// from `ASSISTANT:` (the `▁` that SentencePiece puts in front of the answer's first
    /// token; the original LLaVA's `instruction_len - 2` also counts it to the answer).
    pub answers: Vec<Range<usize>>,
}

fn token_id_in(tok: &HfTokenizer, token: &str) -> Result<TokenId> {
    tok.token_to_id(token).ok_or_else(|| {
        invalid(
            tok.path(),
            format!("token `{token}` is not in the vocabulary"),
        )
    })
}

impl PromptFormat {
    /// Qwen3-VL: ChatML with `<|vision_start|><|image_pad|><|vision_end|>`; ids from the
    /// tokenizer.
    pub fn qwen3_vl(tok: &HfTokenizer) -> Result<Self> {
        let image = token_id_in(tok, QWEN_IMAGE_PAD)?;
        let start = token_id_in(tok, QWEN_VISION_START)?;
        token_id_in(tok, QWEN_VISION_END)?;
        Ok(Self {
            style: ChatStyle::Qwen3Vl,
            placeholder_mode: ImagePlaceholder::AddedToken,
            placeholder: QWEN_IMAGE_PAD.to_string(),
            image_token_id: image,
            vision_start_token_id: Some(start),
        })
    }

    /// LLaVA `llava_v1` in the transformers form: `<image>` is an added token of the
    /// vocabulary (32000 for LLaVA-NeXT) and is expanded in the ids.
    pub fn llava_v1(tok: &HfTokenizer) -> Result<Self> {
        Ok(Self {
            style: ChatStyle::VicunaV1,
            placeholder_mode: ImagePlaceholder::AddedToken,
            placeholder: LLAVA_IMAGE.to_string(),
            image_token_id: token_id_in(tok, LLAVA_IMAGE)?,
            vision_start_token_id: None,
        })
    }

    /// LLaVA `llava_v1` in the original repository's form: the text is tokenised around the
    /// literal `<image>`; where the original inserts [`ORIGINAL_LLAVA_IMAGE_TOKEN_INDEX`]
    /// once, this inserts N copies of the tokenizer's `<image>` id, or, for a tokenizer
    /// without `<image>`, of the first id past its vocabulary (32000 for LLaMA-2). The final
    /// ids equal [`llava_v1`](Self::llava_v1)'s.
    pub fn llava_v1_original(tok: &HfTokenizer) -> Result<Self> {
        let image = match tok.token_to_id(LLAVA_IMAGE) {
            Some(id) => id,
            None => TokenId::try_from(tok.vocab_size())
                .map_err(|_| invalid(tok.path(), "vocabulary too large for u32 ids"))?,
        };
        Ok(Self {
            style: ChatStyle::VicunaV1,
            placeholder_mode: ImagePlaceholder::SplitText,
            placeholder: LLAVA_IMAGE.to_string(),
            image_token_id: image,
            vision_start_token_id: None,
        })
    }

    /// The format of the checkpoint whose `config.json` is in `dir`, checked against `tok`:
    /// `Qwen3VLForConditionalGeneration` (`image_token_id` must be `<|image_pad|>`'s id),
    /// `LlavaNextForConditionalGeneration` / `LlavaForConditionalGeneration`
    /// (`image_token_index` or `image_token_id`, default 32000, must be `<image>`'s id) or
    /// the original `LlavaLlamaForCausalLM`.
    pub fn from_dir(dir: impl AsRef<Path>, tok: &HfTokenizer) -> Result<Self> {
        let path = dir.as_ref().join("config.json");
        let cfg = read_json(&path)?;
        let arch = cfg
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("");
        let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
        let is_qwen = arch == "Qwen3VLForConditionalGeneration" || model_type == "qwen3_vl";
        let is_original = arch == "LlavaLlamaForCausalLM"
            || (model_type == "llava" && cfg.get("mm_vision_tower").is_some());
        let is_hf_llava = matches!(
            arch,
            "LlavaNextForConditionalGeneration" | "LlavaForConditionalGeneration"
        ) || matches!(model_type, "llava_next" | "llava");
        let agree = |format: &Self, key: &str, id: Option<TokenId>| -> Result<()> {
            match id {
                Some(id) if id != format.image_token_id => Err(invalid(
                    &path,
                    format!(
                        "field `{key}` = {id} but the tokenizer's `{}` is {}",
                        format.placeholder, format.image_token_id
                    ),
                )),
                _ => Ok(()),
            }
        };
        if is_qwen {
            let f = Self::qwen3_vl(tok)?;
            agree(
                &f,
                "image_token_id",
                config_id(&cfg, "image_token_id", &path)?,
            )?;
            if let (Some(c), Some(t)) = (
                config_id(&cfg, "vision_start_token_id", &path)?,
                f.vision_start_token_id,
            ) && c != t
            {
                return Err(invalid(
                    &path,
                    format!(
                        "field `vision_start_token_id` = {c} but the tokenizer's `{QWEN_VISION_START}` is {t}"
                    ),
                ));
            }
            Ok(f)
        } else if is_original {
            Self::llava_v1_original(tok)
        } else if is_hf_llava {
            let f = Self::llava_v1(tok)?;
            let key = if cfg.get("image_token_index").is_some() {
                "image_token_index"
            } else {
                "image_token_id"
            };
            agree(&f, key, config_id(&cfg, key, &path)?)?;
            Ok(f)
        } else {
            Err(invalid(
                &path,
                format!(
                    "architecture `{arch}` (model_type `{model_type}`) has no prompt format here (Qwen3VLForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaLlamaForCausalLM)"
                ),
            ))
        }
    }

    fn name(&self) -> &'static str {
        match (self.style, self.placeholder_mode) {
            (ChatStyle::Qwen3Vl, _) => "Qwen3-VL chat",
            (ChatStyle::VicunaV1, ImagePlaceholder::AddedToken) => "LLaVA llava_v1",
            (ChatStyle::VicunaV1, ImagePlaceholder::SplitText) => "LLaVA llava_v1 (original form)",
        }
    }

    /// The image as it is written into the first user turn.
    fn image_text(&self) -> String {
        match self.style {
            ChatStyle::Qwen3Vl => {
                format!("{QWEN_VISION_START}{}{QWEN_VISION_END}", self.placeholder)
            }
            ChatStyle::VicunaV1 => format!("{}\n", self.placeholder),
        }
    }

    /// The single-turn prompt for a question about one image, ending where the assistant's
    /// answer starts (the generation prompt).
    pub fn question(&self, question: &str) -> String {
        match self.style {
            ChatStyle::Qwen3Vl => format!(
                "<|im_start|>user\n{}{question}<|im_end|>\n<|im_start|>assistant\n",
                self.image_text()
            ),
            ChatStyle::VicunaV1 => format!(
                "{VICUNA_V1_SYSTEM} USER: {}{question} ASSISTANT:",
                self.image_text()
            ),
        }
    }

    /// A conversation with one image in the first user turn: an optional system turn, then
    /// user and assistant turns alternating from a user turn. With `add_generation_prompt`
    /// the last turn must be a user turn and the prompt ends where the next answer starts;
    /// without it the conversation is closed as it is (for training, ending on an answer).
    ///
    /// Qwen3-VL: `<|im_start|>{role}\n{text}<|im_end|>\n` per turn; vicuna_v1: `{system} ` then
    /// `USER: {text} ` and `ASSISTANT: {text}</s>`, the generation prompt `ASSISTANT:`.
    pub fn conversation(
        &self,
        turns: &[Turn],
        add_generation_prompt: bool,
    ) -> Result<FormattedConversation> {
        let (system, rest) = match turns.split_first() {
            Some((first, rest)) if first.role == Role::System => (Some(first.text.as_str()), rest),
            _ => (None, turns),
        };
        if rest.is_empty() {
            return Err(Error::Conversation(
                "no user turn (the first user turn carries the image)".into(),
            ));
        }
        for (i, t) in rest.iter().enumerate() {
            let want = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            if t.role != want {
                return Err(Error::Conversation(format!(
                    "turn {} is {:?} but {want:?} was expected: an optional system turn first, then user and assistant alternating from a user turn",
                    i + usize::from(system.is_some()),
                    t.role
                )));
            }
        }
        let ends_on_user = rest.len() % 2 == 1;
        if add_generation_prompt && !ends_on_user {
            return Err(Error::Conversation(
                "a generation prompt follows a user turn, but the conversation ends on an answer"
                    .into(),
            ));
        }

        let mut text = String::new();
        let mut answers = Vec::new();
        match self.style {
            ChatStyle::Qwen3Vl => {
                if let Some(s) = system {
                    text.push_str("<|im_start|>system\n");
                    text.push_str(s);
                    text.push_str("<|im_end|>\n");
                }
                for (i, t) in rest.iter().enumerate() {
                    if t.role == Role::User {
                        text.push_str("<|im_start|>user\n");
                        if i == 0 {
                            text.push_str(&self.image_text());
                        }
                        text.push_str(&t.text);
                        text.push_str("<|im_end|>\n");
                    } else {
                        text.push_str("<|im_start|>assistant\n");
                        let start = text.len();
                        text.push_str(&t.text);
                        text.push_str("<|im_end|>");
                        answers.push(start..text.len());
                        text.push('\n');
                    }
                }
                if add_generation_prompt {
                    text.push_str("<|im_start|>assistant\n");
                }
            }
            ChatStyle::VicunaV1 => {
                text.push_str(system.unwrap_or(VICUNA_V1_SYSTEM));
                text.push(' ');
                for (i, t) in rest.iter().enumerate() {
                    if t.role == Role::User {
                        text.push_str("USER: ");
                        if i == 0 {
                            text.push_str(&self.image_text());
                        }
                        text.push_str(&t.text);
                        text.push(' ');
                    } else {
                        text.push_str("ASSISTANT:");
                        // The answer owns the space before it: SentencePiece writes it as the
                        // `▁` of the answer's first token (or as a lone `▁` before digits).
                        let start = text.len();
                        text.push(' ');
                        text.push_str(&t.text);
                        text.push_str("</s>");
                        answers.push(start..text.len());
                    }
                }
                if add_generation_prompt {
                    text.push_str("ASSISTANT:");
                }
            }
        }
        Ok(FormattedConversation { text, answers })
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenised prompts
// ---------------------------------------------------------------------------------------------

/// A tokenised prompt with its image placeholders expanded: the processor's outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Token ids, one image token id per visual token.
    pub input_ids: Vec<TokenId>,
    /// All ones (one unpadded sequence).
    pub attention_mask: Vec<u32>,
    /// 1 at image tokens, 0 elsewhere (Qwen3-VL's `mm_token_type_ids`).
    pub mm_token_type_ids: Vec<u32>,
    /// Each image's token positions, in order.
    pub image_spans: Vec<Range<usize>>,
}

impl TokenizedPrompt {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// A tokenised conversation and which positions are the assistant's answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedConversation {
    /// The ids (as [`Prompter::tokenize_prompt`] gives them for the conversation's text).
    pub prompt: TokenizedPrompt,
    /// The conversation's text.
    pub text: String,
    /// For each assistant turn, the positions of its tokens in `prompt.input_ids`: the
    /// answer's text and its end-of-turn token (`<|im_end|>` / `</s>`), so that a model also
    /// learns to stop: every token overlapping [`FormattedConversation::answers`] (for
    /// vicuna_v1 that includes the `▁` of the separating space). The template around it
    /// (`assistant\n`, `ASSISTANT:`, Qwen's `\n` after `<|im_end|>`) does not.
    pub answer_spans: Vec<Range<usize>>,
    /// Byte range of each token in `text` (empty for expanded image tokens): where a token's
    /// characters are, for aligning two tokenizers' answers.
    pub offsets: Vec<ByteRange>,
}

impl TokenizedConversation {
    /// Labels aligned with `input_ids` (transformers' convention: the model shifts them):
    /// the id at answer positions, [`IGNORE_INDEX`] elsewhere.
    pub fn labels(&self) -> Vec<i64> {
        let mut labels = vec![IGNORE_INDEX; self.prompt.input_ids.len()];
        for span in &self.answer_spans {
            for p in span.clone() {
                if let (Some(l), Some(&id)) = (labels.get_mut(p), self.prompt.input_ids.get(p)) {
                    *l = i64::from(id);
                }
            }
        }
        labels
    }
}

/// A checkpoint's tokenizer and prompt format together.
#[derive(Debug)]
pub struct Prompter {
    /// The tokenizer.
    pub tokenizer: HfTokenizer,
    /// The prompt format.
    pub format: PromptFormat,
}

/// Ids before expansion, with byte offsets and the placeholders' positions.
struct Unexpanded {
    ids: Vec<TokenId>,
    offsets: Vec<ByteRange>,
    placeholders: Vec<usize>,
}

impl Prompter {
    /// Loads the tokenizer and the prompt format of a checkpoint folder (see
    /// [`HfTokenizer::from_dir`] and [`PromptFormat::from_dir`]).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let tokenizer = HfTokenizer::from_dir(dir.as_ref())?;
        let format = PromptFormat::from_dir(dir.as_ref(), &tokenizer)?;
        Ok(Self { tokenizer, format })
    }

    /// Pairs a tokenizer with a format.
    pub fn new(tokenizer: HfTokenizer, format: PromptFormat) -> Self {
        Self { tokenizer, format }
    }

    fn unexpanded(&self, prompt: &str) -> Result<Unexpanded> {
        let f = &self.format;
        match f.placeholder_mode {
            ImagePlaceholder::AddedToken => {
                let (ids, offsets) = self.tokenizer.encode_with_offsets(prompt, true)?;
                let placeholders = ids
                    .iter()
                    .enumerate()
                    .filter(|&(_, &id)| id == f.image_token_id)
                    .map(|(i, _)| i)
                    .collect();
                Ok(Unexpanded {
                    ids,
                    offsets,
                    placeholders,
                })
            }
            ImagePlaceholder::SplitText => {
                let tok = &self.tokenizer;
                let (prefix, suffix) = tok.added_around();
                let mut ids = prefix.to_vec();
                let mut offsets = vec![(0, 0); prefix.len()];
                let mut placeholders = Vec::new();
                let mut chunk_start = 0;
                let push_chunk = |chunk: Range<usize>,
                                  ids: &mut Vec<TokenId>,
                                  offsets: &mut Vec<ByteRange>|
                 -> Result<()> {
                    let (c_ids, c_off) = tok.encode_with_offsets(&prompt[chunk.clone()], false)?;
                    ids.extend(c_ids);
                    offsets.extend(
                        c_off
                            .into_iter()
                            .map(|(s, e)| (s + chunk.start, e + chunk.start)),
                    );
                    Ok(())
                };
                for (at, m) in prompt.match_indices(f.placeholder.as_str()) {
                    push_chunk(chunk_start..at, &mut ids, &mut offsets)?;
                    placeholders.push(ids.len());
                    ids.push(f.image_token_id);
                    offsets.push((at, at + m.len()));
                    chunk_start = at + m.len();
                }
                push_chunk(chunk_start..prompt.len(), &mut ids, &mut offsets)?;
                ids.extend_from_slice(suffix);
                offsets.extend(std::iter::repeat_n((0, 0), suffix.len()));
                Ok(Unexpanded {
                    ids,
                    offsets,
                    placeholders,
                })
            }
        }
    }

    /// Tokenises and expands: returns the prompt and, per token, its byte range in `prompt`
    /// (image tokens: the placeholder's range).
    fn tokenize_with_offsets(
        &self,
        prompt: &str,
        image_tokens: &[usize],
    ) -> Result<(TokenizedPrompt, Vec<ByteRange>)> {
        let f = &self.format;
        let u = self.unexpanded(prompt)?;
        if u.placeholders.is_empty() {
            return Err(Error::NoImagePlaceholder {
                placeholder: f.placeholder.clone(),
                format: f.name(),
            });
        }
        if u.placeholders.len() != image_tokens.len() {
            return Err(Error::ImageCount {
                placeholder: f.placeholder.clone(),
                found: u.placeholders.len(),
                given: image_tokens.len(),
            });
        }
        if let Some(i) = image_tokens.iter().position(|&n| n == 0) {
            return Err(Error::Positions(format!(
                "image {i} was given 0 image tokens"
            )));
        }
        let extra: usize = image_tokens.iter().map(|n| n - 1).sum();
        let total = u.ids.len() + extra;
        let mut input_ids = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(total);
        let mut mm = Vec::with_capacity(total);
        let mut image_spans = Vec::with_capacity(image_tokens.len());
        let mut next_image = 0;
        for (i, (&id, &off)) in u.ids.iter().zip(&u.offsets).enumerate() {
            if u.placeholders.get(next_image) == Some(&i) {
                let n = image_tokens[next_image];
                let start = input_ids.len();
                input_ids.extend(std::iter::repeat_n(f.image_token_id, n));
                offsets.extend(std::iter::repeat_n(off, n));
                mm.extend(std::iter::repeat_n(1, n));
                image_spans.push(start..start + n);
                next_image += 1;
            } else {
                input_ids.push(id);
                offsets.push(off);
                mm.push(0);
            }
        }
        let attention_mask = vec![1; input_ids.len()];
        Ok((
            TokenizedPrompt {
                input_ids,
                attention_mask,
                mm_token_type_ids: mm,
                image_spans,
            },
            offsets,
        ))
    }

    /// Tokenises a prompt string holding image placeholders and expands placeholder `k` to
    /// `image_tokens[k]` image tokens (BOS added where the family adds it). A prompt without a
    /// placeholder is [`Error::NoImagePlaceholder`]; a count mismatch is [`Error::ImageCount`].
    pub fn tokenize_prompt(&self, prompt: &str, image_tokens: &[usize]) -> Result<TokenizedPrompt> {
        Ok(self.tokenize_with_offsets(prompt, image_tokens)?.0)
    }

    /// The single-turn prompt for `question` ([`PromptFormat::question`]), tokenised with its
    /// image expanded to `image_tokens` tokens.
    pub fn tokenize_question(
        &self,
        question: &str,
        image_tokens: usize,
    ) -> Result<TokenizedPrompt> {
        self.tokenize_prompt(&self.format.question(question), &[image_tokens])
    }

    /// A conversation ([`PromptFormat::conversation`]) tokenised with its image expanded to
    /// `image_tokens` tokens, and the positions of each answer.
    pub fn tokenize_conversation(
        &self,
        turns: &[Turn],
        image_tokens: usize,
        add_generation_prompt: bool,
    ) -> Result<TokenizedConversation> {
        let conv = self.format.conversation(turns, add_generation_prompt)?;
        let (prompt, offsets) = self.tokenize_with_offsets(&conv.text, &[image_tokens])?;
        let mut answer_spans = Vec::with_capacity(conv.answers.len());
        for (k, region) in conv.answers.iter().enumerate() {
            let inside = |p: usize| {
                let (s, e) = offsets[p];
                prompt.mm_token_type_ids[p] == 0 && s < e && s < region.end && e > region.start
            };
            let first = (0..prompt.len()).find(|&p| inside(p));
            let last = (0..prompt.len()).rev().find(|&p| inside(p));
            let (Some(first), Some(last)) = (first, last) else {
                return Err(Error::Conversation(format!(
                    "answer {k} has no tokens (bytes {region:?} of the prompt)"
                )));
            };
            if let Some(p) = (first..=last).find(|&p| !inside(p)) {
                return Err(Error::Conversation(format!(
                    "answer {k}'s tokens are not contiguous (token {p} inside it lies outside)"
                )));
            }
            answer_spans.push(first..last + 1);
        }
        Ok(TokenizedConversation {
            prompt,
            text: conv.text,
            answer_spans,
            offsets,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Image token counts
// ---------------------------------------------------------------------------------------------

/// Qwen3-VL: tokens of one image with patch grid `[t, h, w]` (`image_grid_thw`) after the
/// `merge x merge` patch merger: `t * h * w / merge^2`.
pub fn qwen3_vl_image_token_count(
    grid_thw: [usize; 3],
    spatial_merge_size: usize,
) -> Result<usize> {
    let [t, h, w] = grid_thw;
    let m = spatial_merge_size;
    if m == 0 || h % m != 0 || w % m != 0 || t == 0 {
        return Err(Error::Positions(format!(
            "image grid {grid_thw:?} is not divisible by spatial_merge_size {m}"
        )));
    }
    Ok(t * (h / m) * (w / m))
}

// ---------------------------------------------------------------------------------------------
// Qwen3-VL multimodal RoPE index
// ---------------------------------------------------------------------------------------------

/// Qwen3-VL's multimodal RoPE positions of one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MropePositions {
    /// `[3, seq_len]` row-major: temporal, height, width rows.
    pub position_ids: Vec<i64>,
    /// Sequence length (padding included).
    pub seq_len: usize,
    /// `max position + 1 - seq_len`: a token at sequence index `i >= seq_len` generated later
    /// gets position `i + rope_delta` on all three rows.
    pub rope_delta: i64,
}

impl MropePositions {
    /// The temporal, height and width rows, each `seq_len` long.
    pub fn rows(&self) -> [&[i64]; 3] {
        let n = self.seq_len;
        let row = |a: usize| self.position_ids.get(a * n..(a + 1) * n).unwrap_or(&[]);
        [row(0), row(1), row(2)]
    }

    /// The position (on all three rows) of a text token at sequence index `index` past the
    /// prompt, as generation with a KV cache gives it.
    pub fn position_after(&self, index: usize) -> i64 {
        index as i64 + self.rope_delta
    }
}

/// Qwen3-VL's multimodal RoPE index (transformers' `Qwen3VLModel.get_rope_index`, images):
/// text tokens get one running index on all three rows; image `k`'s block (its
/// `image_grid_thw[k] = [t, h, w]` gives `t * h/m * w/m` tokens, `m = spatial_merge_size`,
/// which must directly follow a `<|vision_start|>`) gets its grid coordinates
/// `(t, h/m, w/m)` plus the running index, and text after it continues from the block's
/// largest position + 1. Any number of images; text before, between and after.
///
/// With an `attention_mask` (padding = 0), padded positions are left out of the count and
/// get position 1, as transformers gives them; `rope_delta` counts them in `seq_len`.
pub fn qwen3_vl_rope_index(
    input_ids: &[TokenId],
    attention_mask: Option<&[u32]>,
    image_token_id: TokenId,
    vision_start_token_id: TokenId,
    image_grid_thw: &[[usize; 3]],
    spatial_merge_size: usize,
) -> Result<MropePositions> {
    let seq = input_ids.len();
    if let Some(mask) = attention_mask
        && mask.len() != seq
    {
        return Err(Error::Positions(format!(
            "rope index: attention_mask has {} entries for {seq} tokens",
            mask.len()
        )));
    }
    let kept: Vec<usize> = match attention_mask {
        Some(mask) => (0..seq).filter(|&i| mask[i] != 0).collect(),
        None => (0..seq).collect(),
    };
    if kept.is_empty() {
        return Err(Error::Positions(
            "rope index: no token is attended to".into(),
        ));
    }
    let tokens: Vec<TokenId> = kept.iter().map(|&i| input_ids[i]).collect();
    let n = tokens.len();
    let mut pos = [vec![0i64; n], vec![0i64; n], vec![0i64; n]];
    let mut next: i64 = 0;
    let mut image = 0;
    let mut i = 0;
    while i < n {
        if tokens[i] != image_token_id {
            for row in &mut pos {
                row[i] = next;
            }
            next += 1;
            i += 1;
            continue;
        }
        let Some(&grid) = image_grid_thw.get(image) else {
            return Err(Error::Positions(format!(
                "rope index: image block {} at position {} but only {} image_grid_thw entries",
                image + 1,
                kept[i],
                image_grid_thw.len()
            )));
        };
        if i == 0 || tokens[i - 1] != vision_start_token_id {
            return Err(Error::Positions(format!(
                "rope index: image block {image} at position {} does not follow <|vision_start|> ({vision_start_token_id})",
                kept[i]
            )));
        }
        let count = qwen3_vl_image_token_count(grid, spatial_merge_size)?;
        let run = tokens[i..]
            .iter()
            .take_while(|&&t| t == image_token_id)
            .count();
        if run != count {
            return Err(Error::Positions(format!(
                "rope index: image block {image} at position {} has {run} image tokens but its grid {grid:?} with merge {spatial_merge_size} gives {count}",
                kept[i]
            )));
        }
        let [t, h, w] = grid;
        let (lh, lw) = (h / spatial_merge_size, w / spatial_merge_size);
        let mut p = i;
        for ti in 0..t {
            for hi in 0..lh {
                for wi in 0..lw {
                    pos[0][p] = next + ti as i64;
                    pos[1][p] = next + hi as i64;
                    pos[2][p] = next + wi as i64;
                    p += 1;
                }
            }
        }
        next += t.max(lh).max(lw) as i64;
        image += 1;
        i += count;
    }
    if image != image_grid_thw.len() {
        return Err(Error::Positions(format!(
            "rope index: {} image_grid_thw entries but {image} image blocks in the sequence",
            image_grid_thw.len()
        )));
    }
    let mut position_ids = vec![1i64; 3 * seq];
    let mut max = i64::MIN;
    for (axis, row) in pos.iter().enumerate() {
        for (k, &j) in kept.iter().enumerate() {
            position_ids[axis * seq + j] = row[k];
            max = max.max(row[k]);
        }
    }
    Ok(MropePositions {
        position_ids,
        seq_len: seq,
        rope_delta: max + 1 - seq as i64,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    const QUESTION: &str = "What are the main features in this ECG image?";

    /// `/work/shared` seen from this crate (`crates/evl-hf` of the workspace): skipped loudly
    /// when missing, a failure under `CI=true`.
    fn shared() -> Option<PathBuf> {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"));
        if dir.is_dir() {
            return Some(dir.to_path_buf());
        }
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI=true but {} is missing", dir.display());
        }
        // Past the harness's capture, so that the skip is seen.
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED: {} not found; this test needs the project's shared data",
            dir.display()
        );
        None
    }

    fn hf(case: &str) -> Option<PathBuf> {
        shared().map(|s| s.join("hf").join(case))
    }

    fn case_json(dir: &Path) -> Value {
        read_json(&dir.join("case.json")).unwrap()
    }

    /// An int64 tensor of a safetensors file: shape and values.
    fn ints(path: &Path, key: &str) -> (Vec<usize>, Vec<i64>) {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(key).unwrap();
        assert_eq!(
            t.dtype(),
            safetensors::Dtype::I64,
            "{key} in {}",
            path.display()
        );
        let vals = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), vals)
    }

    fn widen(v: &[u32]) -> Vec<i64> {
        v.iter().map(|&x| i64::from(x)).collect()
    }

    fn narrow(v: &[i64]) -> Vec<u32> {
        v.iter().map(|&x| u32::try_from(x).unwrap()).collect()
    }

    /// Builds the prompt from case.json and from the question, tokenises both and compares
    /// with the processor's outputs in `expected`.
    fn check_prompt(
        p: &Prompter,
        case: &Value,
        expected: &Path,
        image_tokens: usize,
    ) -> TokenizedPrompt {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(p.format.question(QUESTION), prompt);
        assert_eq!(image_tokens as u64, case["image_tokens"].as_u64().unwrap());
        let from_case = p.tokenize_prompt(prompt, &[image_tokens]).unwrap();
        let from_question = p.tokenize_question(QUESTION, image_tokens).unwrap();
        assert_eq!(from_case, from_question);
        let (shape, ids) = ints(expected, "input_ids");
        let seq = case["sequence_length"].as_u64().unwrap() as usize;
        assert_eq!(shape, vec![1, seq]);
        assert_eq!(widen(&from_case.input_ids), ids, "input_ids");
        let (_, mask) = ints(expected, "attention_mask");
        assert_eq!(widen(&from_case.attention_mask), mask, "attention_mask");
        let n_img = from_case
            .input_ids
            .iter()
            .filter(|&&t| t == p.format.image_token_id)
            .count();
        assert_eq!(n_img, image_tokens);
        assert_eq!(from_case.image_spans.len(), 1);
        assert_eq!(from_case.image_spans[0].len(), image_tokens);
        from_case
    }

    #[test]
    fn qwen3_vl_prompt_ids_exact() {
        let Some(dir) = hf("qwen3_vl_tiny") else {
            return;
        };
        let expected = dir.join("expected.safetensors");
        let p = Prompter::from_dir(&dir).unwrap();
        assert_eq!(p.format.style, ChatStyle::Qwen3Vl);
        assert_eq!(p.format.image_token_id, 151655);
        assert_eq!(p.format.vision_start_token_id, Some(151652));
        let (_, thw) = ints(&expected, "image_grid_thw");
        let grid = [thw[0] as usize, thw[1] as usize, thw[2] as usize];
        let n = qwen3_vl_image_token_count(grid, 2).unwrap();
        let got = check_prompt(&p, &case_json(&dir), &expected, n);
        let (_, mm) = ints(&expected, "mm_token_type_ids");
        assert_eq!(widen(&got.mm_token_type_ids), mm, "mm_token_type_ids");
        assert!(!p.tokenizer.adds_bos());
    }

    #[test]
    fn qwen3_vl_rope_index_exact() {
        let Some(dir) = hf("qwen3_vl_tiny") else {
            return;
        };
        let expected = dir.join("expected.safetensors");
        let (_, ids) = ints(&expected, "input_ids");
        let (_, mask) = ints(&expected, "attention_mask");
        let (_, thw) = ints(&expected, "image_grid_thw");
        let (shape, want) = ints(&expected, "position_ids");
        let grid = [thw[0] as usize, thw[1] as usize, thw[2] as usize];
        let cfg = read_json(&dir.join("config.json")).unwrap();
        let merge = cfg["vision_config"]["spatial_merge_size"].as_u64().unwrap() as usize;
        let image = cfg["image_token_id"].as_u64().unwrap() as u32;
        let start = cfg["vision_start_token_id"].as_u64().unwrap() as u32;
        let got = qwen3_vl_rope_index(
            &narrow(&ids),
            Some(&narrow(&mask)),
            image,
            start,
            &[grid],
            merge,
        )
        .unwrap();
        assert_eq!(shape, vec![3, ids.len()]);
        assert_eq!(got.position_ids, want);
        let max = *want.iter().max().unwrap();
        assert_eq!(got.rope_delta, max + 1 - ids.len() as i64);
        assert_eq!(got.rope_delta, -54);
        assert_eq!(got.position_after(ids.len()), max + 1);
        // Without a mask: the same.
        let plain = qwen3_vl_rope_index(&narrow(&ids), None, image, start, &[grid], merge).unwrap();
        assert_eq!(plain, got);
    }

    #[test]
    fn llava_next_prompt_ids_exact() {
        let Some(dir) = hf("llava_next_tiny") else {
            return;
        };
        let expected = dir.join("expected.safetensors");
        let p = Prompter::from_dir(&dir).unwrap();
        assert_eq!(p.format.style, ChatStyle::VicunaV1);
        assert_eq!(p.format.placeholder_mode, ImagePlaceholder::AddedToken);
        assert_eq!(p.format.image_token_id, 32000);
        assert!(p.tokenizer.adds_bos());
        // The anyres count itself (2438 for 1700 x 2200) is `preprocess`'s; here the
        // expansion must reproduce the processor's ids with case.json's count.
        let case = case_json(&dir);
        let n = case["image_tokens"].as_u64().unwrap() as usize;
        assert_eq!(n, 2438);
        let got = check_prompt(&p, &case, &expected, n);
        assert_eq!(got.input_ids[0], 1, "BOS");
    }

    #[test]
    fn llava_original_prompt_ids_equal_transformers_form() {
        let Some(dir) = hf("llava_original_tiny") else {
            return;
        };
        let expected = dir.join("../llava_next_tiny/expected.safetensors");
        let p = Prompter::from_dir(&dir).unwrap();
        assert_eq!(p.format.placeholder_mode, ImagePlaceholder::SplitText);
        assert_eq!(p.format.image_token_id, 32000);
        let case = case_json(&dir);
        check_prompt(&p, &case, &expected, 2438);

        // The same ids with a tokenizer lacking `<image>` (LLaMA-2's 32,000 entries):
        // the sentinel is the first id past the vocabulary, 32000 again.
        let Some(shared) = shared() else { return };
        let llama = HfTokenizer::from_dir(shared.join("tokenizers/llama2")).unwrap();
        assert_eq!(llama.token_to_id(LLAVA_IMAGE), None);
        let f = PromptFormat::llava_v1_original(&llama).unwrap();
        assert_eq!(f.image_token_id, 32000);
        let q = Prompter::new(llama, f);
        let got = q
            .tokenize_prompt(case["prompt"].as_str().unwrap(), &[2438])
            .unwrap();
        let (_, ids) = ints(&expected, "input_ids");
        assert_eq!(widen(&got.input_ids), ids);
    }

    #[test]
    fn generated_ids_decode_to_generated_text() {
        for (case, exp) in [
            ("qwen3_vl_tiny", "qwen3_vl_tiny"),
            ("llava_next_tiny", "llava_next_tiny"),
            ("llava_original_tiny", "llava_next_tiny"),
        ] {
            let Some(dir) = hf(case) else { return };
            let tok = HfTokenizer::from_dir(&dir).unwrap();
            let expected = dir.join("..").join(exp).join("expected.safetensors");
            let (shape, generated) = ints(&expected, "generated_ids");
            assert_eq!(shape, vec![12]);
            let text = tok.decode(&narrow(&generated), true).unwrap();
            let want = case_json(&dir)["generated_text"]
                .as_str()
                .unwrap()
                .to_string();
            assert_eq!(text, want, "{case}");
        }
    }

    #[test]
    fn real_tokenizers_and_special_tokens() {
        let Some(shared) = shared() else { return };
        let hf = shared.join("hf");
        // Qwen3: 151,643 BPE tokens + 26 added (special and not).
        let q = HfTokenizer::from_dir(hf.join("qwen3_vl_tiny")).unwrap();
        assert_eq!(q.inner().get_vocab_size(false), 151_643);
        assert_eq!(q.vocab_size(), 151_669);
        for (name, id) in [
            ("<|endoftext|>", 151643),
            ("<|im_start|>", 151644),
            ("<|im_end|>", 151645),
            ("<|vision_start|>", 151652),
            ("<|vision_end|>", 151653),
            ("<|image_pad|>", 151655),
        ] {
            assert_eq!(q.token_to_id(name), Some(id), "{name}");
            assert!(q.is_special(id));
        }
        assert!(!q.is_special(151667), "<think> is not special");
        assert_eq!(q.bos_token_id(), None);
        assert_eq!(q.eos_token_ids(), &[151645]);
        assert_eq!(q.pad_token_id(), Some(151643));
        assert_eq!(q.added_around(), (&[][..], &[][..]));
        // LLaVA-NeXT's LLaMA: 32,000 + `<image>` 32000 + `<pad>` 32001; `<s>` added in front.
        let l = HfTokenizer::from_dir(hf.join("llava_next_tiny")).unwrap();
        assert_eq!(l.inner().get_vocab_size(false), 32_000);
        assert_eq!(l.vocab_size(), 32_002);
        assert_eq!(l.token_to_id("<image>"), Some(32000));
        assert_eq!(l.token_to_id("<pad>"), Some(32001));
        assert_eq!(
            (l.bos_token_id(), l.eos_token_ids(), l.pad_token_id()),
            (Some(1), &[2][..], Some(32001))
        );
        assert_eq!(l.added_around(), (&[1][..], &[][..]));
        // The stand-alone tokenizers: the same vocabularies, add_bos_token read from
        // tokenizer_config.json.
        let l2 = HfTokenizer::from_dir(shared.join("tokenizers/llama2")).unwrap();
        assert_eq!(l2.vocab_size(), 32_000);
        assert!(l2.adds_bos() && l2.pad_token_id().is_none());
        let q2 = HfTokenizer::from_dir(shared.join("tokenizers/qwen3")).unwrap();
        assert_eq!(q2.vocab_size(), 151_669);
        assert!(!q2.adds_bos());

        // Round trips keep spaces: SentencePiece `▁` and byte-level BPE.
        let text = "Sinus rhythm, 72 bpm.  Normal  axis;\nno ST-elevation (V1-V3).";
        for t in [&q, &l, &l2, &q2] {
            let ids = t.encode(text, true).unwrap();
            assert_eq!(
                t.decode(&ids, true).unwrap(),
                text,
                "{}",
                t.path().display()
            );
        }
        assert_eq!(l.encode("Hello", true).unwrap()[0], 1);
        assert_eq!(
            l.encode("Hello", false).unwrap().first(),
            l.encode("Hello", true).unwrap().get(1)
        );
        // Special tokens in text become their ids; decode can keep or skip them.
        let ids = q.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
        assert_eq!(ids.first(), Some(&151644));
        assert_eq!(ids.last(), Some(&151645));
        assert_eq!(q.decode(&ids, true).unwrap(), "user\nHi");
        assert_eq!(
            q.decode(&ids, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>"
        );
    }

    fn ecg_conversation() -> Vec<Turn> {
        vec![
            Turn::user("What is the rhythm?"),
            Turn::assistant("Sinus rhythm at 72 bpm."),
            Turn::user("Any ST elevation?"),
            Turn::assistant("No ST elevation is seen."),
        ]
    }

    /// The answers' positions, computed independently: the token count of the text up to
    /// `cut_start(answer)` gives the first answer position, that up to the answer's end the
    /// position past it (both cuts fall on boundaries the tokenizer keeps).
    fn spans_by_prefix(
        p: &Prompter,
        conv: &FormattedConversation,
        n_img: usize,
        cut_start: impl Fn(usize) -> usize,
    ) -> Vec<Range<usize>> {
        let len = |s: &str| p.tokenize_prompt(s, &[n_img]).unwrap().len();
        conv.answers
            .iter()
            .map(|r| len(&conv.text[..cut_start(r.start)])..len(&conv.text[..r.end]))
            .collect()
    }

    #[test]
    fn conversation_answer_spans_qwen() {
        let Some(dir) = hf("qwen3_vl_tiny") else {
            return;
        };
        let p = Prompter::from_dir(&dir).unwrap();
        let turns = ecg_conversation();
        let n_img = 63;
        let got = p.tokenize_conversation(&turns, n_img, false).unwrap();
        let conv = p.format.conversation(&turns, false).unwrap();
        assert_eq!(got.text, conv.text);
        assert_eq!(
            conv.text,
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is the rhythm?<|im_end|>\n\
             <|im_start|>assistant\nSinus rhythm at 72 bpm.<|im_end|>\n\
             <|im_start|>user\nAny ST elevation?<|im_end|>\n\
             <|im_start|>assistant\nNo ST elevation is seen.<|im_end|>\n"
        );
        // The whole text tokenised at once gives the same ids.
        assert_eq!(got.prompt, p.tokenize_prompt(&conv.text, &[n_img]).unwrap());
        assert_eq!(got.answer_spans, spans_by_prefix(&p, &conv, n_img, |s| s));
        let ids = &got.prompt.input_ids;
        let nl = p.tokenizer.encode("\n", false).unwrap();
        assert_eq!(nl, vec![198]);
        for (span, turn) in got.answer_spans.iter().zip([&turns[1], &turns[3]]) {
            // Starts right after `assistant\n`, ends on `<|im_end|>`, followed by `\n`.
            assert_eq!(ids[span.start - 1], 198);
            assert_eq!(
                ids[span.start - 2],
                p.tokenizer.token_to_id("assistant").unwrap()
            );
            assert_eq!(ids[span.end - 1], 151645);
            assert_eq!(ids[span.end], 198);
            assert_eq!(
                p.tokenizer.decode(&ids[span.clone()], false).unwrap(),
                format!("{}<|im_end|>", turn.text)
            );
        }
        let labels = got.labels();
        let n_labelled = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        assert_eq!(
            n_labelled,
            got.answer_spans.iter().map(|s| s.len()).sum::<usize>()
        );
        assert_eq!(labels[got.answer_spans[0].start - 1], IGNORE_INDEX);
        assert_eq!(
            labels[got.answer_spans[0].start],
            i64::from(ids[got.answer_spans[0].start])
        );
        assert_eq!(labels[got.answer_spans[1].end - 1], 151645);
        assert_eq!(labels[got.answer_spans[1].end], IGNORE_INDEX);

        // With a generation prompt after a user turn: ends like the single-turn prompt.
        let open = p.format.conversation(&turns[..3], true).unwrap();
        assert!(
            open.text
                .ends_with("Any ST elevation?<|im_end|>\n<|im_start|>assistant\n")
        );
        assert_eq!(open.answers.len(), 1);
        let single = p
            .format
            .conversation(&[Turn::user(QUESTION)], true)
            .unwrap();
        assert_eq!(single.text, p.format.question(QUESTION));
        // A system turn.
        let sys = p
            .format
            .conversation(
                &[Turn::system("You are a cardiologist."), Turn::user("Hi")],
                true,
            )
            .unwrap();
        assert!(sys.text.starts_with("<|im_start|>system\nYou are a cardiologist.<|im_end|>\n<|im_start|>user\n<|vision_start|>"));
    }

    #[test]
    fn conversation_answer_spans_vicuna() {
        let Some(shared) = shared() else { return };
        let turns = ecg_conversation();
        let n_img = 2438;
        let mut results = Vec::new();
        for case in ["llava_next_tiny", "llava_original_tiny"] {
            let p = Prompter::from_dir(shared.join("hf").join(case)).unwrap();
            let got = p.tokenize_conversation(&turns, n_img, false).unwrap();
            let conv = p.format.conversation(&turns, false).unwrap();
            assert_eq!(
                conv.text,
                format!(
                    "{VICUNA_V1_SYSTEM} USER: <image>\nWhat is the rhythm? ASSISTANT: Sinus rhythm at 72 bpm.</s>\
                     USER: Any ST elevation? ASSISTANT: No ST elevation is seen.</s>"
                )
            );
            // `ASSISTANT: Sinus`: the answer's region starts at the space (`▁` of `▁Sin...`).
            let a0 = conv.answers[0].start;
            assert_eq!(&conv.text[a0 - 10..a0 + 2], "ASSISTANT: S");
            assert_eq!(got.answer_spans, spans_by_prefix(&p, &conv, n_img, |s| s));
            let ids = &got.prompt.input_ids;
            let colon = p.tokenizer.token_to_id(":").unwrap();
            for (k, (span, turn)) in got
                .answer_spans
                .iter()
                .zip([&turns[1], &turns[3]])
                .enumerate()
            {
                assert_eq!(
                    ids[span.start - 1],
                    colon,
                    "answer {k} follows `ASSISTANT:`"
                );
                assert_eq!(ids[span.end - 1], 2, "answer {k} ends on </s>");
                assert_eq!(
                    p.tokenizer.decode(&ids[span.clone()], false).unwrap(),
                    format!("{}</s>", turn.text)
                );
                let first = p.tokenizer.id_to_token(ids[span.start]).unwrap();
                assert!(first.starts_with('\u{2581}'), "{first}");
            }
            // After the first `</s>` the next user turn starts, outside the answers.
            let after = got.answer_spans[0].end;
            assert_eq!(
                p.tokenizer.decode(&ids[after..after + 2], false).unwrap(),
                "USER"
            );
            assert_eq!(got.answer_spans[1].end, ids.len());
            // An answer starting with digits: the separating space is a lone `▁`, still the
            // answer's first token.
            let digits = [Turn::user("Rate?"), Turn::assistant("72 bpm.")];
            let d = p.tokenize_conversation(&digits, n_img, false).unwrap();
            let span = d.answer_spans[0].clone();
            let dids = &d.prompt.input_ids;
            assert_eq!(dids[span.start - 1], colon);
            assert_eq!(
                p.tokenizer.id_to_token(dids[span.start]).unwrap(),
                "\u{2581}"
            );
            assert_eq!(
                p.tokenizer.decode(&dids[span], false).unwrap(),
                "72 bpm.</s>"
            );
            results.push(got);
        }
        // Both forms: identical ids and spans.
        assert_eq!(results[0].prompt, results[1].prompt);
        assert_eq!(results[0].answer_spans, results[1].answer_spans);
    }

    #[test]
    fn prompt_without_image_is_an_error() {
        let Some(shared) = shared() else { return };
        for case in ["qwen3_vl_tiny", "llava_next_tiny", "llava_original_tiny"] {
            let p = Prompter::from_dir(shared.join("hf").join(case)).unwrap();
            let text = p
                .format
                .question(QUESTION)
                .replace(&p.format.placeholder, "");
            let err = p.tokenize_prompt(&text, &[5]).unwrap_err();
            assert!(
                matches!(err, Error::NoImagePlaceholder { .. }),
                "{case}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("no image placeholder") && msg.contains(&p.format.placeholder),
                "{msg}"
            );
            // Two placeholders but one count.
            let two = format!("{}{}", p.format.placeholder, p.format.question(QUESTION));
            let err = p.tokenize_prompt(&two, &[5]).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::ImageCount {
                        found: 2,
                        given: 1,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(p.tokenize_prompt(&two, &[5, 7]).is_ok());
        }
    }

    #[test]
    fn conversation_order_is_checked() {
        let Some(dir) = hf("qwen3_vl_tiny") else {
            return;
        };
        let p = Prompter::from_dir(dir).unwrap();
        let f = &p.format;
        assert!(matches!(
            f.conversation(&[], true),
            Err(Error::Conversation(_))
        ));
        assert!(f.conversation(&[Turn::assistant("x")], false).is_err());
        assert!(
            f.conversation(&[Turn::user("a"), Turn::user("b")], false)
                .is_err()
        );
        assert!(
            f.conversation(&[Turn::user("a"), Turn::assistant("b")], true)
                .is_err()
        );
        assert!(
            f.conversation(&[Turn::user("a"), Turn::system("b")], true)
                .is_err()
        );
    }

    #[test]
    fn missing_files_are_named() {
        let err = HfTokenizer::from_dir("/nonexistent-evl-dir").unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent-evl-dir/tokenizer.json"),
            "{err}"
        );
        let Some(shared) = shared() else { return };
        // A tokenizer folder has no config.json: the prompt format says which file.
        let tok = HfTokenizer::from_dir(shared.join("tokenizers/qwen3")).unwrap();
        let err = PromptFormat::from_dir(shared.join("tokenizers/qwen3"), &tok).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
        // A Qwen tokenizer with a LLaVA format: `<image>` is not in it.
        let err = PromptFormat::llava_v1(&tok).unwrap_err();
        assert!(err.to_string().contains("`<image>`"), "{err}");
    }

    #[test]
    fn rope_index_several_images_padding_and_text_only() {
        const IMG: u32 = 9;
        const VS: u32 = 7;
        const VE: u32 = 8;
        // pad, pad | t t VS [img 2x3 merged from 4x6] VE t | VS [img 1x2 from 2x4, t=2] VE t t
        let mut ids = vec![0, 0, 1, 2, VS];
        ids.extend([IMG; 6]);
        ids.extend([VE, 3, VS]);
        ids.extend([IMG; 4]);
        ids.extend([VE, 4, 5]);
        let mut mask = vec![1u32; ids.len()];
        mask[0] = 0;
        mask[1] = 0;
        let got =
            qwen3_vl_rope_index(&ids, Some(&mask), IMG, VS, &[[1, 4, 6], [2, 2, 4]], 2).unwrap();
        // Text 0 1 2; image 1 at 3: t 3, h 3..4, w 3..5; then 6 7 8; image 2 at 9:
        // t 9..10, h 9, w 9..10; then 11 12 13.
        let t = [
            1, 1, 0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9, 9, 10, 10, 11, 12, 13,
        ];
        let h = [
            1, 1, 0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9, 9, 9, 9, 11, 12, 13,
        ];
        let w = [
            1, 1, 0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10, 9, 10, 11, 12, 13,
        ];
        assert_eq!(got.rows(), [&t[..], &h[..], &w[..]]);
        assert_eq!(got.rope_delta, 14 - ids.len() as i64);
        // Text only: 0..n on all rows, delta 0.
        let plain = qwen3_vl_rope_index(&[5, 6, 7], None, IMG, VS, &[], 2).unwrap();
        assert_eq!(plain.position_ids, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(plain.rope_delta, 0);
        // Inconsistencies are errors.
        assert!(qwen3_vl_rope_index(&ids, Some(&mask), IMG, VS, &[[1, 4, 6]], 2).is_err());
        assert!(
            qwen3_vl_rope_index(&ids, Some(&mask), IMG, VS, &[[1, 4, 6], [1, 2, 4]], 2).is_err()
        );
        assert!(qwen3_vl_rope_index(&[1, IMG, IMG], None, IMG, VS, &[[1, 2, 4]], 2).is_err());
        assert!(qwen3_vl_rope_index(&[1, 2], Some(&[1]), IMG, VS, &[], 2).is_err());
    }

    #[test]
    fn qwen3_vl_token_counts() {
        assert_eq!(qwen3_vl_image_token_count([1, 14, 18], 2).unwrap(), 63);
        assert_eq!(qwen3_vl_image_token_count([2, 4, 6], 2).unwrap(), 12);
        assert!(qwen3_vl_image_token_count([1, 13, 18], 2).is_err());
        assert!(qwen3_vl_image_token_count([1, 14, 18], 0).is_err());
    }
}
