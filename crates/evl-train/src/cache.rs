//! The frozen teacher's outputs, computed once per (example, turn) before distillation
//! (offline KD) or per batch (online): visual tokens, hidden states at the text positions,
//! answer logits with their character spans, LM states at the visual positions, the output
//! head.

use burn::tensor::Device;
use evl_infer::input::{Sample, encode_turn, pixels, text_tensors};
use evl_infer::text::TextTokenizer;
use evl_models::vlm::EcgVlm;

/// The frozen teacher's outputs for one (example, turn).
#[derive(Debug, Clone)]
pub struct TeacherOut {
    /// Visual tokens `[v_t * d_vis_t]`.
    pub visual: Vec<f32>,
    /// Hidden states at the text positions `[l_t * d_t]`.
    pub hidden: Vec<f32>,
    /// Text length `l_t`.
    pub len: usize,
    /// Logits at the answer positions `[n_answer * vocab_t]`.
    pub answer_logits: Vec<f32>,
    /// Answer-token character spans (answer tokens then EOS at the end).
    pub answer_spans: Vec<(usize, usize)>,
}

/// Teacher outputs for every (sample, turn), computed once (offline KD).
pub struct TeacherCache {
    /// By sample, then turn.
    pub outs: Vec<Vec<TeacherOut>>,
    /// Visual tokens and width.
    pub v: usize,
    /// Visual width.
    pub d_vis: usize,
    /// Hidden width.
    pub d: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Output head `[d * vocab]` (row-major `[d, vocab]`, bias not included).
    pub head: Vec<f32>,
    /// LM hidden states at the visual positions, per sample `[v * d]` (the same for every
    /// turn: causal attention keeps the text from reaching them).
    pub vis_hidden: Vec<Vec<f32>>,
    /// Root mean square of every cached text hidden-state value (the scale MSE targets are
    /// divided by when `DistillConfig::teacher_hidden_rms` is on).
    pub hidden_rms: f64,
    /// The hidden-states entry `hidden` holds (`None` = after the final norm; see
    /// [`EcgVlm::view_layer`]).
    pub layer: Option<usize>,
}

/// Where distillation gets the frozen teacher's outputs.
pub enum Teacher<'a> {
    /// Computed once for every (sample, turn) before training (offline KD, the default).
    Cached(&'a TeacherCache),
    /// Computed for each step's batch by running the teacher (online KD: no memory for the
    /// cache, and the place to add per-step input augmentation).
    Online {
        /// The teacher (inference mode).
        model: &'a EcgVlm,
        /// Device it runs on.
        device: &'a Device,
    },
}

/// The teacher's outputs for every turn of one sample.
fn teacher_outs(
    teacher: &EcgVlm,
    s: &Sample,
    tok: &TextTokenizer,
    layer: Option<usize>,
    device: &Device,
) -> (Vec<TeacherOut>, Vec<f32>) {
    let vocab = teacher.facts().vocab;
    let input = teacher.input();
    let rows: Vec<(Vec<i64>, Vec<bool>)> = s
        .turns
        .iter()
        .map(|t| {
            let (ids, mask, _) = encode_turn(tok, t);
            (ids, mask)
        })
        .collect();
    let spans: Vec<Vec<(usize, usize)>> = s.turns.iter().map(|t| encode_turn(tok, t).2).collect();
    let n = rows.len();
    let (text, pad, _, rows) = text_tensors(rows, device);
    // One encoder pass per record, shared by its turns (the encoder does not see the text).
    let visual = teacher
        .encode(pixels(&[s], &input, device))
        .repeat_dim(0, n);
    let v = teacher.view_from_visual(visual, text, pad, layer);
    let [_, vt, dv] = v.visual.dims();
    let [_, t, d] = v.hidden.dims();
    let vis_hidden: Vec<f32> = v
        .visual_hidden
        .slice([0..1, 0..vt, 0..d])
        .into_data()
        .iter::<f32>()
        .collect();
    let visual: Vec<f32> = v.visual.into_data().iter::<f32>().collect();
    let hidden: Vec<f32> = v.hidden.into_data().iter::<f32>().collect();
    let logits: Vec<f32> = v.logits.into_data().iter::<f32>().collect();
    let mut per = Vec::with_capacity(n);
    for (r, (ids, mask)) in rows.iter().enumerate() {
        let len = ids.len();
        let mut al = Vec::new();
        for (j, &m) in mask.iter().enumerate() {
            if m {
                let base = (r * t + j) * vocab;
                al.extend_from_slice(&logits[base..base + vocab]);
            }
        }
        per.push(TeacherOut {
            visual: visual[r * vt * dv..(r + 1) * vt * dv].to_vec(),
            hidden: hidden[r * t * d..r * t * d + len * d].to_vec(),
            len,
            answer_logits: al,
            answer_spans: spans[r].clone(),
        });
    }
    (per, vis_hidden)
}

/// Teacher outputs for the samples in `which` (others left empty), or all when `None`.
pub(crate) fn teacher_cache(
    teacher: &EcgVlm,
    samples: &[Sample],
    which: Option<&[usize]>,
    tok: &TextTokenizer,
    layer: Option<usize>,
    device: &Device,
) -> TeacherCache {
    let facts = teacher.facts();
    let (outs, vis_hidden): (Vec<Vec<TeacherOut>>, Vec<Vec<f32>>) = samples
        .iter()
        .enumerate()
        .map(|(i, s)| match which {
            Some(w) if !w.contains(&i) => (Vec::new(), Vec::new()),
            _ => teacher_outs(teacher, s, tok, layer, device),
        })
        .unzip();
    let (mut sq, mut n) = (0.0f64, 0usize);
    for o in outs.iter().flatten() {
        sq += o
            .hidden
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>();
        n += o.hidden.len();
    }
    TeacherCache {
        hidden_rms: if n > 0 && sq > 0.0 {
            (sq / n as f64).sqrt()
        } else {
            1.0
        },
        outs,
        layer,
        v: facts.visual_tokens,
        d_vis: facts.d_vision,
        d: facts.d_model,
        vocab: facts.vocab,
        head: teacher.head_weights(),
        vis_hidden,
    }
}

/// Run the teacher over every (sample, turn) on the inference device, keeping its final
/// hidden states.
pub fn cache_teacher(
    teacher: &EcgVlm,
    samples: &[Sample],
    tok: &TextTokenizer,
    device: &Device,
) -> TeacherCache {
    teacher_cache(teacher, samples, None, tok, None, device)
}

/// [`cache_teacher`] keeping the hidden states of entry `layer` (see
/// [`EcgVlm::view_layer`]; `None` = final); a distillation run reading it must ask for the
/// same `DistillConfig::teacher_layer`.
pub fn cache_teacher_at(
    teacher: &EcgVlm,
    samples: &[Sample],
    tok: &TextTokenizer,
    layer: Option<usize>,
    device: &Device,
) -> TeacherCache {
    teacher_cache(teacher, samples, None, tok, layer, device)
}
