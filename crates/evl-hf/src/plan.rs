//! Sizing a distillation run before renting a GPU: parameter counts read off `config.json`
//! (no weights loaded, so the real 2B and 7B checkpoints are sized in microseconds) and the
//! memory and compute of one distillation step, by component.
//!
//! The parameter counts are exact (a test checks them against every tensor of the tiny
//! checkpoints). The step figures are estimates with their assumptions written here:
//!
//! - **Student training state**, mixed precision AdamW: bf16 weights (2 bytes), bf16
//!   gradients (2), fp32 master weights (4) and the two fp32 moments (8): 16 bytes per
//!   trainable parameter; the distillation head (MHCA aligner, OT projector) is counted with
//!   the student.
//! - **Teacher**: frozen bf16 weights when it runs online; with the offline cache (this
//!   toolkit's default) no weights on the GPU, and the cache's size per example is reported.
//! - **Activations** kept for the backward pass, bf16, per layer and token: the layer input
//!   and norm outputs (`4 d`), queries, keys and values (`(h + 2 kv) hd`), the attention
//!   output (`h hd`), the MLP's gate, up, activation and product (`4 I`, 2 I for the vision
//!   tower's plain MLP), plus `2 h s` for the scores and probabilities with eager attention
//!   (none with a fused/flash kernel).
//! - **Logits**: the student's text-position logits in fp32 with their gradient
//!   (`8 b s_text V` bytes); the teacher's answer logits in fp32.
//! - **Compute**: a forward pass costs `2 P` FLOPs per token (embeddings excluded, the head
//!   included; the vision tower's parameters over its own tokens) plus attention's
//!   `4 L s^2 d`; the student's training step three forwards (the backward costs two), the
//!   online teacher's one; time = FLOPs / (peak x utilisation).

use std::path::Path;

use crate::HfConfig;
use crate::config::{ClipVisionConfig, Qwen3VisionConfig, TextConfig};
use crate::preprocess::{LlavaNextImageProcessor, QwenImageProcessor, llava_next_num_image_tokens};

/// Parameters by component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    /// Vision tower (Qwen3-VL: with the patch mergers and DeepStack mergers).
    pub vision: u64,
    /// LLaVA-NeXT's projector and `image_newline` (0 for Qwen3-VL, whose merger is counted
    /// with the tower).
    pub projector: u64,
    /// Decoder layers and final norm.
    pub decoder: u64,
    /// Token embeddings.
    pub embeddings: u64,
    /// Untied output head (0 when tied to the embeddings).
    pub head: u64,
    /// Everything.
    pub total: u64,
}

fn ln(d: usize) -> u64 {
    2 * d as u64
}

fn linear(i: usize, o: usize, bias: bool) -> u64 {
    (i * o + if bias { o } else { 0 }) as u64
}

/// Decoder layers + final norm of a LLaMA-family language model.
fn decoder(t: &TextConfig) -> u64 {
    let (d, hd, b) = (t.hidden_size, t.head_dim, t.attention_bias);
    let attn = linear(d, t.num_heads * hd, b)
        + 2 * linear(d, t.num_kv_heads * hd, b)
        + linear(t.num_heads * hd, d, b)
        + if t.qk_norm { 2 * hd as u64 } else { 0 };
    let mlp = 3 * (d * t.intermediate_size) as u64;
    t.num_layers as u64 * (attn + mlp + 2 * d as u64) + d as u64
}

fn qwen_vision(v: &Qwen3VisionConfig) -> u64 {
    let d = v.hidden_size;
    let patch = linear(
        v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size,
        d,
        true,
    );
    let block = 2 * ln(d)
        + linear(d, 3 * d, true)
        + linear(d, d, true)
        + linear(d, v.intermediate_size, true)
        + linear(v.intermediate_size, d, true);
    let unit = d * v.spatial_merge_size * v.spatial_merge_size;
    let merger = |norm_d: usize| {
        ln(norm_d) + linear(unit, unit, true) + linear(unit, v.out_hidden_size, true)
    };
    patch
        + (v.num_position_embeddings * d) as u64
        + v.depth as u64 * block
        + merger(d)
        + v.deepstack_visual_indexes.len() as u64 * merger(unit)
}

fn clip_vision(v: &ClipVisionConfig) -> u64 {
    let d = v.hidden_size;
    let patches = (v.image_size / v.patch_size).pow(2);
    let layer = 2 * ln(d)
        + 4 * linear(d, d, true)
        + linear(d, v.intermediate_size, true)
        + linear(v.intermediate_size, d, true);
    d as u64
        + (v.num_channels * v.patch_size * v.patch_size * d) as u64
        + ((patches + 1) * d) as u64
        + 2 * ln(d)
        + v.num_layers as u64 * layer
}

/// The parameters `cfg` describes, by component.
pub fn param_counts(cfg: &HfConfig) -> ParamCounts {
    let t = cfg.text();
    let (vision, projector) = match cfg {
        HfConfig::Qwen3Vl(c) => (qwen_vision(&c.vision), 0),
        HfConfig::LlavaNext(c) => (
            clip_vision(&c.vision),
            linear(c.vision.hidden_size, t.hidden_size, c.projector_bias)
                + linear(t.hidden_size, t.hidden_size, c.projector_bias)
                + t.hidden_size as u64,
        ),
    };
    let embeddings = (t.vocab_size * t.hidden_size) as u64;
    let head = if t.tie_word_embeddings { 0 } else { embeddings };
    let dec = decoder(t);
    ParamCounts {
        vision,
        projector,
        decoder: dec,
        embeddings,
        head,
        total: vision + projector + dec + embeddings + head,
    }
}

/// Visual tokens the checkpoint in `dir` makes of an image of `(height, width)` pixels
/// (read from its processor files), and the vision tower's tokens before any merging.
///
/// # Errors
/// A missing or unreadable processor file, or an image its processor cannot size.
pub fn image_tokens(
    cfg: &HfConfig,
    dir: &Path,
    size: (usize, usize),
) -> Result<(usize, usize), crate::PreprocessError> {
    match cfg {
        HfConfig::Qwen3Vl(c) => {
            let p = QwenImageProcessor::from_dir(dir)?;
            let (h, w) = p.resized_size(size.0, size.1)?;
            let patches = (h / c.vision.patch_size) * (w / c.vision.patch_size);
            let m = c.vision.spatial_merge_size;
            Ok((patches / (m * m), patches))
        }
        HfConfig::LlavaNext(c) => {
            let p = LlavaNextImageProcessor::from_dir(dir)?;
            let tile = p.tile_side();
            let tokens = llava_next_num_image_tokens(
                size,
                &c.image_grid_pinpoints,
                tile,
                c.vision.patch_size,
            )
            .unwrap_or(0);
            let (rows, cols) =
                crate::preprocess::anyres_grid_shape(size, &c.image_grid_pinpoints, tile)
                    .unwrap_or((0, 0));
            let per_tile = (tile / c.vision.patch_size).pow(2) + 1;
            Ok((tokens, (1 + rows * cols) * per_tile))
        }
    }
}

/// The shape of one distillation step.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct StepShape {
    /// Examples per step (per GPU).
    pub batch: usize,
    /// Text tokens per example (prompt + answer), per tokenizer.
    pub text_tokens: usize,
    /// Answer tokens per example.
    pub answer_tokens: usize,
    /// Image `(height, width)` in pixels.
    pub image: (usize, usize),
    /// The teacher runs on every step (else its outputs are cached once).
    pub online: bool,
    /// Attention kept as scores and probabilities (eager) rather than a fused kernel.
    pub eager_attention: bool,
}

/// One model's part of a step.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelPlan {
    /// Parameters.
    pub params: ParamCounts,
    /// Visual tokens in the LM per image.
    pub visual_tokens: usize,
    /// Vision-tower tokens per image (before merging; all tiles).
    pub tower_tokens: usize,
    /// LM sequence length (visual + text).
    pub seq: usize,
}

/// Memory (bytes) and compute of one distillation step.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepPlan {
    /// The student.
    pub student: ModelPlan,
    /// The teacher.
    pub teacher: ModelPlan,
    /// Distillation head parameters (MHCA aligner + OT projector).
    pub head_params: u64,
    /// Student (and head) weights, gradients and AdamW state.
    pub training_state: u64,
    /// Teacher weights on the GPU (0 with the offline cache).
    pub teacher_weights: u64,
    /// Student activations kept for the backward pass (LM + vision tower).
    pub activations: u64,
    /// Student logits and their gradient, teacher answer logits.
    pub logits: u64,
    /// The sum.
    pub total: u64,
    /// The offline cache per example (teacher visual tokens, text hidden states, answer
    /// logits, in f32).
    pub cache_per_example: u64,
    /// FLOPs of the step.
    pub flops: f64,
}

fn lm_activations(t: &TextConfig, tokens: usize, seq: usize, eager: bool) -> u64 {
    let per_token = 4 * t.hidden_size
        + (2 * t.num_heads + 2 * t.num_kv_heads) * t.head_dim
        + 4 * t.intermediate_size
        + if eager { 2 * t.num_heads * seq } else { 0 };
    2 * (t.num_layers * tokens * per_token) as u64
}

fn tower_activations(cfg: &HfConfig, tokens: usize, eager: bool) -> u64 {
    let (d, heads, inter, layers, seq) = match cfg {
        HfConfig::Qwen3Vl(c) => (
            c.vision.hidden_size,
            c.vision.num_heads,
            c.vision.intermediate_size,
            c.vision.depth,
            tokens,
        ),
        HfConfig::LlavaNext(c) => (
            c.vision.hidden_size,
            c.vision.num_heads,
            c.vision.intermediate_size,
            c.vision.num_layers,
            (c.vision.image_size / c.vision.patch_size).pow(2) + 1,
        ),
    };
    let per_token = 4 * d + 4 * d + 2 * inter + if eager { 2 * heads * seq } else { 0 };
    2 * (layers * tokens * per_token) as u64
}

fn model_plan(cfg: &HfConfig, dir: &Path, shape: &StepShape) -> Result<ModelPlan, String> {
    let (visual_tokens, tower_tokens) =
        image_tokens(cfg, dir, shape.image).map_err(|e| format!("{}: {e}", dir.display()))?;
    if visual_tokens == 0 {
        return Err(format!(
            "{}: an image of {}x{} fits none of its anyres pinpoints",
            dir.display(),
            shape.image.1,
            shape.image.0
        ));
    }
    Ok(ModelPlan {
        params: param_counts(cfg),
        visual_tokens,
        tower_tokens,
        seq: visual_tokens + shape.text_tokens,
    })
}

/// Forward FLOPs of one example: `2 P` per token for the language model (its head's product
/// counted whether or not it is tied) over the LM sequence and for the vision tower over its
/// tokens, plus attention's `4 L s^2 d` (Qwen3-VL's tower attends over the whole image,
/// CLIP over each 336-pixel view).
fn forward_flops(cfg: &HfConfig, m: &ModelPlan) -> f64 {
    let t = cfg.text();
    let p = &m.params;
    let lm = (p.decoder + (t.vocab_size * t.hidden_size) as u64) as f64;
    let mut f = 2.0 * lm * m.seq as f64
        + 2.0 * (p.vision + p.projector) as f64 * m.tower_tokens as f64
        + 4.0 * (t.num_layers * m.seq * m.seq * t.hidden_size) as f64;
    f += match cfg {
        HfConfig::Qwen3Vl(c) => {
            4.0 * (c.vision.depth * m.tower_tokens * m.tower_tokens * c.vision.hidden_size) as f64
        }
        HfConfig::LlavaNext(c) => {
            let view = (c.vision.image_size / c.vision.patch_size).pow(2) + 1;
            4.0 * (c.vision.num_layers * m.tower_tokens * view * c.vision.hidden_size) as f64
        }
    };
    f
}

/// Plans one distillation step of the student checkpoint in `student` from the teacher in
/// `teacher` (each a folder with `config.json` and its processor files).
///
/// # Errors
/// A configuration or processor file that cannot be read, named.
pub fn plan_step(teacher: &Path, student: &Path, shape: &StepShape) -> Result<StepPlan, String> {
    let tc = HfConfig::from_dir(teacher).map_err(|e| e.to_string())?;
    let sc = HfConfig::from_dir(student).map_err(|e| e.to_string())?;
    let t = model_plan(&tc, teacher, shape)?;
    let s = model_plan(&sc, student, shape)?;
    let (ts, tt) = (sc.text(), tc.text());
    let b = shape.batch as u64;
    // MHCA: query/key/value/output maps between the widths; OT: teacher -> student visual.
    let head_params =
        4 * (ts.hidden_size * tt.hidden_size) as u64 + (tt.hidden_size * ts.hidden_size) as u64;
    let trainable = s.params.total + head_params;
    let training_state = 16 * trainable;
    let teacher_weights = if shape.online { 2 * t.params.total } else { 0 };
    let activations = b
        * (lm_activations(ts, s.seq, s.seq, shape.eager_attention)
            + tower_activations(&sc, s.tower_tokens, shape.eager_attention));
    let logits = b
        * (8 * (shape.text_tokens * ts.vocab_size) as u64
            + 4 * (shape.answer_tokens * tt.vocab_size) as u64);
    let cache_per_example = 4
        * ((t.visual_tokens * tt.hidden_size)
            + shape.text_tokens * tt.hidden_size
            + shape.answer_tokens * tt.vocab_size) as u64;
    let s_flops = forward_flops(&sc, &s);
    let t_flops = if shape.online {
        forward_flops(&tc, &t)
    } else {
        0.0
    };
    Ok(StepPlan {
        total: training_state + teacher_weights + activations + logits,
        student: s,
        teacher: t,
        head_params,
        training_state,
        teacher_weights,
        activations,
        logits,
        cache_per_example,
        // Backward costs twice the forward.
        flops: b as f64 * (3.0 * s_flops + t_flops),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case folder of `$EVL_HF_DIR`, else of `../shared/hf`.
    fn cases() -> Vec<std::path::PathBuf> {
        let root = match std::env::var_os("EVL_HF_DIR") {
            Some(d) => std::path::PathBuf::from(d),
            None => match evl_testkit::shared_dir() {
                Some(s) => s.join("hf"),
                None => return Vec::new(),
            },
        };
        let mut out: Vec<_> = std::fs::read_dir(&root)
            .expect("hf dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("config.json").is_file())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn counts_equal_the_checkpoints_tensors() {
        let cases = cases();
        for dir in &cases {
            let cfg = HfConfig::from_dir(dir).expect("config");
            let stored: u64 = crate::weights::read_all_f64(&dir.join("model.safetensors"))
                .expect("weights")
                .values()
                .map(|r| r.0.iter().product::<usize>() as u64)
                .sum();
            let c = param_counts(&cfg);
            assert_eq!(c.total, stored, "{}: {c:?}", dir.display());
            assert_eq!(
                c.total,
                c.vision + c.projector + c.decoder + c.embeddings + c.head
            );
        }
        evl_testkit::say(&format!(
            "plan: parameter counts checked on {} checkpoints",
            cases.len()
        ));
    }

    #[test]
    fn a_step_plan_adds_up_and_the_cache_frees_the_teacher() {
        let Some(shared) = evl_testkit::shared_dir() else {
            return;
        };
        let (t, s) = (
            shared.join("hf/llava_next_tiny"),
            shared.join("hf/qwen3_vl_tiny"),
        );
        let mut shape = StepShape {
            batch: 2,
            text_tokens: 100,
            answer_tokens: 20,
            image: (1700, 2200),
            online: false,
            eager_attention: false,
        };
        let off = plan_step(&t, &s, &shape).expect("plan");
        // The Qwen processor's own count for this image (the shared case's 63 tokens are
        // from the same 2200x1700 PNG).
        assert_eq!(off.student.visual_tokens, 63);
        assert_eq!(off.teacher.visual_tokens, 2438);
        assert_eq!(off.teacher_weights, 0);
        assert_eq!(off.total, off.training_state + off.activations + off.logits);
        shape.online = true;
        let on = plan_step(&t, &s, &shape).expect("plan");
        assert_eq!(on.teacher_weights, 2 * on.teacher.params.total);
        assert!(on.flops > off.flops);
        shape.eager_attention = true;
        let eager = plan_step(&t, &s, &shape).expect("plan");
        assert!(eager.activations > on.activations);
        let e = plan_step(&t, &shared.join("data"), &shape).expect_err("not a checkpoint");
        assert!(e.contains("config.json"), "{e}");
    }
}
