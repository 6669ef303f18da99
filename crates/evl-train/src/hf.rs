//! SFT and distillation of the paper's real checkpoints (a Qwen3-VL student, a LLaVA-NeXT /
//! PULSE teacher, or any two [`HfModel`]s): the same losses, mixing, optimiser, batching and
//! checkpoints as the built-in models ([`crate::train`]), fed from [`HfBundle`]s.
//!
//! What differs from the built-in family, and how it is met:
//! - each model has its own tokenizer and chat format: every (example, turn) is tokenised once
//!   per model ([`encode_examples`]); answer tokens are aligned across the two tokenizers by
//!   byte spans relative to the answer text (a student token goes with the teacher token that
//!   covers its first byte; end-of-turn with end-of-turn), as the built-in loop does;
//! - the visual tokens are those spliced into the language model (Qwen3-VL's merger output,
//!   LLaVA-NeXT's projected, unpadded tiles with their newline tokens), whose number depends
//!   on the image's size: both sides carry masks when it varies;
//! - `hidden` is read at a configurable layer of each model (transformers' `hidden_states[k]`,
//!   default the final norm's output).

use std::path::Path;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use evl_infer::hf::{EncodedTurn, HfBundle, PreparedImage};
use evl_kd::method::{AlignedAnswers, KdBatch};
use evl_kd::task::masked_token_ce;
use evl_models::hf::HfModel;
use evl_models::vlm::DistillView;

use crate::cache::{TeacherCache, TeacherOut};
use crate::train::{
    DistillConfig, DistillModel, DistillRun, OptimConfig, Part, StepLog, batch_indices_by_turns,
    step_loop, teacher_batch,
};
use crate::{Error, Result};

pub use evl_infer::hf::HfExample;

/// Examples encoded for one checkpoint: prepared images and tokenised turns.
#[derive(Debug, Clone)]
pub struct HfEncoded {
    /// Example ids (for messages).
    pub ids: Vec<String>,
    /// One prepared image per example.
    pub images: Vec<PreparedImage>,
    /// Visual tokens of each example's image.
    pub image_tokens: Vec<usize>,
    /// Tokenised turns per example.
    pub turns: Vec<Vec<EncodedTurn>>,
}

impl HfEncoded {
    /// Number of turns of every example (what batching draws from).
    pub fn turn_counts(&self) -> Vec<usize> {
        self.turns.iter().map(Vec::len).collect()
    }
}

/// Prepares every example's image and tokenises every turn for `bundle`'s model.
///
/// # Errors
/// An unreadable image or a turn that cannot be tokenised, naming the example.
pub fn encode_examples(bundle: &HfBundle, examples: &[HfExample]) -> Result<HfEncoded> {
    let mut out = HfEncoded {
        ids: Vec::with_capacity(examples.len()),
        images: Vec::with_capacity(examples.len()),
        image_tokens: Vec::with_capacity(examples.len()),
        turns: Vec::with_capacity(examples.len()),
    };
    let named = |id: &str, e: evl_infer::Error| Error::Config {
        field: "data",
        what: format!("example `{id}`: {e}"),
    };
    for ex in examples {
        let img = bundle
            .prepare_path(&ex.image)
            .map_err(|e| named(&ex.id, e))?;
        let n = bundle.image_tokens(&img).map_err(|e| named(&ex.id, e))?;
        let turns = ex
            .turns
            .iter()
            .map(|(q, a)| bundle.encode_turn(q, a, n))
            .collect::<evl_infer::Result<Vec<_>>>()
            .map_err(|e| named(&ex.id, e))?;
        if turns.is_empty() {
            return Err(Error::Config {
                field: "data",
                what: format!("example `{}` has no (question, answer) turn", ex.id),
            });
        }
        out.ids.push(ex.id.clone());
        out.images.push(img);
        out.image_tokens.push(n);
        out.turns.push(turns);
    }
    Ok(out)
}

/// One micro-batch through a real model: its distillation view, the text-position targets,
/// answer mask, text lengths, and each row's answer positions (text coordinates).
struct HfStep {
    view: DistillView,
    targets: Tensor<2, Int>,
    answer: Tensor<2, Bool>,
    lens: Vec<usize>,
    answer_pos: Vec<Vec<usize>>,
}

fn hf_step(
    model: &HfModel,
    enc: &HfEncoded,
    idx: &[(usize, usize)],
    layer: Option<usize>,
    device: &Device,
) -> Result<HfStep> {
    let image_id = model.image_token();
    let ids: Vec<Vec<i64>> = idx
        .iter()
        .map(|&(i, k)| enc.turns[i][k].ids.clone())
        .collect();
    let images: Vec<_> = idx
        .iter()
        .map(|&(i, _)| Some(enc.images[i].to_model(device)))
        .collect();
    let (view, targets) = model
        .view(&ids, &images, layer)
        .map_err(|e| Error::Config {
            field: "data",
            what: format!(
                "examples {:?}: {e}",
                idx.iter().map(|&(i, _)| &enc.ids[i]).collect::<Vec<_>>()
            ),
        })?;
    let t = targets.dims()[1];
    let mut mask = vec![false; idx.len() * t];
    let mut lens = Vec::with_capacity(idx.len());
    let mut answer_pos = Vec::with_capacity(idx.len());
    for (r, &(i, k)) in idx.iter().enumerate() {
        let turn = &enc.turns[i][k];
        let mut q = 0;
        let mut pos = Vec::new();
        for (j, &id) in turn.ids.iter().enumerate() {
            if id == image_id {
                continue;
            }
            if turn.answer[j] {
                mask[r * t + q] = true;
                pos.push(q);
            }
            q += 1;
        }
        lens.push(q);
        answer_pos.push(pos);
    }
    let answer = Tensor::<2, Bool>::from_data(TensorData::new(mask, [idx.len(), t]), device);
    Ok(HfStep {
        view,
        targets,
        answer,
        lens,
        answer_pos,
    })
}

/// Supervised fine-tuning of a real checkpoint on its answers (next-token CE on the answer
/// tokens and the end-of-turn token). Resumes from `run_dir` if it holds a checkpoint.
///
/// # Errors
/// A batch the model cannot take (named), checkpoint I/O.
pub fn hf_sft(
    model: HfModel,
    enc: &HfEncoded,
    cfg: &OptimConfig,
    run_dir: Option<&Path>,
    device: &Device,
    on_step: impl FnMut(&StepLog),
) -> Result<(HfModel, Vec<StepLog>)> {
    let counts = enc.turn_counts();
    step_loop(
        model,
        cfg,
        run_dir,
        device,
        on_step,
        |m| m,
        |model, micro| {
            let idx = batch_indices_by_turns(&counts, cfg, micro);
            let s = hf_step(model, enc, &idx, None, device)?;
            Ok(Part::single(masked_token_ce(
                s.view.logits,
                s.targets,
                s.answer,
            )))
        },
    )
}

/// The frozen teacher's outputs for the examples in `which` (all when `None`): visual
/// tokens as spliced into its LM, hidden states at the text positions (at `layer`), answer
/// logits with their byte spans, LM states at the image positions, its output head.
///
/// # Errors
/// An example the teacher cannot take, named.
pub fn hf_teacher_cache(
    teacher: &HfModel,
    enc: &HfEncoded,
    which: Option<&[usize]>,
    layer: Option<usize>,
    device: &Device,
) -> Result<TeacherCache> {
    let head = teacher.text().head();
    let [d, vocab] = head.dims();
    let mut outs = Vec::with_capacity(enc.ids.len());
    let mut vis_hidden = Vec::with_capacity(enc.ids.len());
    let (mut sq, mut n_sq, mut v_max) = (0.0f64, 0usize, 0usize);
    for i in 0..enc.ids.len() {
        if which.is_some_and(|w| !w.contains(&i)) {
            outs.push(Vec::new());
            vis_hidden.push(Vec::new());
            continue;
        }
        let idx: Vec<(usize, usize)> = (0..enc.turns[i].len()).map(|k| (i, k)).collect();
        let s = hf_step(teacher, enc, &idx, layer, device)?;
        let nv = enc.image_tokens[i];
        v_max = v_max.max(nv);
        let [_, vt, dv] = s.view.visual.dims();
        let [_, t, _] = s.view.hidden.dims();
        let visual: Vec<f32> = s.view.visual.into_data().iter::<f32>().collect();
        let hidden: Vec<f32> = s.view.hidden.into_data().iter::<f32>().collect();
        let logits: Vec<f32> = s.view.logits.into_data().iter::<f32>().collect();
        let vh: Vec<f32> = s.view.visual_hidden.into_data().iter::<f32>().collect();
        let vhv = vh.len() / idx.len() / d;
        vis_hidden.push(vh[..nv.min(vhv) * d].to_vec());
        let mut per = Vec::with_capacity(idx.len());
        for (r, &(_, k)) in idx.iter().enumerate() {
            let len = s.lens[r];
            let h = hidden[r * t * d..r * t * d + len * d].to_vec();
            sq += h.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
            n_sq += h.len();
            let mut al = Vec::with_capacity(s.answer_pos[r].len() * vocab);
            for &q in &s.answer_pos[r] {
                let base = (r * t + q) * vocab;
                al.extend_from_slice(&logits[base..base + vocab]);
            }
            per.push(TeacherOut {
                visual: visual[r * vt * dv..(r * vt + nv.min(vt)) * dv].to_vec(),
                hidden: h,
                len,
                answer_logits: al,
                answer_spans: enc.turns[i][k].answer_spans.clone(),
            });
        }
        outs.push(per);
    }
    // Visual tokens are read where they enter the LM: the LM's width.
    let d_vis = d;
    Ok(TeacherCache {
        outs,
        layer,
        v: v_max.max(1),
        d_vis,
        d,
        vocab,
        head: head.into_data().iter::<f32>().collect(),
        vis_hidden,
        hidden_rms: if n_sq > 0 && sq > 0.0 {
            (sq / n_sq as f64).sqrt()
        } else {
            1.0
        },
    })
}

/// Where HF distillation gets the frozen teacher's outputs.
pub enum HfTeacher<'a> {
    /// Computed once for every (example, turn) before training.
    Cached(&'a TeacherCache),
    /// Computed for each micro-batch's examples.
    Online {
        /// The teacher (inference mode).
        model: &'a HfModel,
        /// Its examples.
        enc: &'a HfEncoded,
        /// Its device.
        device: &'a Device,
    },
}

/// Distil `student` (trainable) from the teacher. `s_enc` are the examples encoded for the
/// student (the teacher's cache or encoding holds the same examples in the same order);
/// `s_vocab` / `t_vocab` the two vocabularies in id order ([`HfBundle::vocab_strings`]).
///
/// # Errors
/// A method that needs shared tokens when there are none, a batch a model cannot take,
/// checkpoint I/O.
#[allow(clippy::too_many_arguments)]
pub fn hf_distill(
    student: HfModel,
    s_enc: &HfEncoded,
    s_vocab: &[String],
    t_vocab: &[String],
    teacher: HfTeacher<'_>,
    cfg: &DistillConfig,
    run_dir: Option<&Path>,
    device: &Device,
    on_step: impl FnMut(&StepLog),
) -> Result<(DistillModel<HfModel>, Vec<StepLog>)> {
    let c = cfg;
    if let HfTeacher::Cached(t) = &teacher
        && t.layer != c.teacher_layer
    {
        return Err(Error::Config {
            field: "teacher_layer",
            what: format!(
                "the teacher cache holds hidden states {:?}, the run asks for {:?} (None = final)",
                t.layer, c.teacher_layer
            ),
        });
    }
    let s_d = student.text().head().dims()[0];
    let (t_d, t_dv) = match &teacher {
        HfTeacher::Cached(t) => (t.d, t.d_vis),
        HfTeacher::Online { model, .. } => {
            let d = model.text().head().dims()[0];
            (d, d)
        }
    };
    let (model, run) = DistillRun::new(
        student,
        [s_d, s_d, t_d, t_dv],
        (s_vocab, t_vocab),
        c,
        device,
    )?;
    let counts = s_enc.turn_counts();
    step_loop(
        model,
        &c.optim,
        run_dir,
        device,
        on_step,
        |m| m,
        |model, micro| {
            let idx = batch_indices_by_turns(&counts, &c.optim, micro);
            let online;
            let cache = match &teacher {
                HfTeacher::Cached(c) => *c,
                HfTeacher::Online { model, enc, device } => {
                    let which: Vec<usize> = idx.iter().map(|&(i, _)| i).collect();
                    online = hf_teacher_cache(model, enc, Some(&which), c.teacher_layer, device)?;
                    &online
                }
            };
            let s = hf_step(&model.student, s_enc, &idx, c.student_layer, device)?;
            // The CE reads the final norm's logits whatever layer `hidden` comes from.
            let ce = masked_token_ce(s.view.logits.clone(), s.targets.clone(), s.answer.clone());
            let needs = c.method.needs();
            let answers = if needs.aligned_answers {
                aligned_answers(&s.view.logits, &s.answer_pos, &idx, s_enc, cache, device)
            } else {
                None
            };
            let batch = KdBatch {
                student: &s.view,
                student_lens: s.lens.clone(),
                ce: ce.clone(),
                targets: s.targets,
                answer: s.answer,
                teacher: teacher_batch(&idx, cache, needs, device),
                answers,
            };
            Ok(run.part(model, batch, ce))
        },
    )
}

/// The teacher answer token aligned with each student answer token: the one whose byte span
/// covers the student token's first byte (else the last that starts before it); a student
/// token past the answer text (end of turn) goes with the teacher's last answer token.
pub fn align_answer_tokens(
    student: &[(usize, usize)],
    student_len: usize,
    teacher: &[(usize, usize)],
) -> Vec<usize> {
    let last = teacher.len().saturating_sub(1);
    student
        .iter()
        .map(|&(c, _)| {
            if c >= student_len {
                last
            } else {
                teacher
                    .iter()
                    .position(|&(a, b)| a <= c && c < b)
                    .or_else(|| teacher.iter().rposition(|&(a, b)| a <= c && a < b))
                    .unwrap_or(0)
            }
        })
        .collect()
}

/// Student answer-logit rows and the aligned teacher rows ([`align_answer_tokens`]).
fn aligned_answers(
    logits: &Tensor<3>,
    answer_pos: &[Vec<usize>],
    idx: &[(usize, usize)],
    s_enc: &HfEncoded,
    cache: &TeacherCache,
    device: &Device,
) -> Option<AlignedAnswers> {
    let [b, t, vs] = logits.dims();
    let (mut pos, mut row_of, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for (r, &(i, k)) in idx.iter().enumerate() {
        let o = &cache.outs[i][k];
        let n_t = o.answer_logits.len() / cache.vocab;
        if n_t == 0 {
            continue;
        }
        let st = &s_enc.turns[i][k];
        let map = align_answer_tokens(&st.answer_spans, st.answer_len, &o.answer_spans);
        for (&q, &tj) in answer_pos[r].iter().zip(&map) {
            let tj = tj.min(n_t - 1);
            pos.push((r * t + q) as i64);
            row_of.push(r);
            rows.extend_from_slice(&o.answer_logits[tj * cache.vocab..(tj + 1) * cache.vocab]);
        }
    }
    let n = pos.len();
    if n == 0 {
        return None;
    }
    let sel = Tensor::<1, Int>::from_data(TensorData::new(pos, [n]), device);
    let student = logits.clone().reshape([b * t, vs]).select(0, sel);
    let teacher = Tensor::<2>::from_data(TensorData::new(rows, [n, cache.vocab]), device);
    Some(AlignedAnswers {
        student,
        teacher,
        row_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_tokens_align_by_first_byte() {
        // "Sinus rhythm." split differently; the student's end token maps to the teacher's.
        let s = [(0, 5), (5, 12), (12, 13), (13, 13)];
        let t = [(0, 0), (0, 3), (3, 5), (5, 8), (8, 13), (13, 17)];
        assert_eq!(align_answer_tokens(&s, 13, &t), vec![1, 3, 4, 5]);
        // A lone leading-space student token goes with the teacher's first word.
        assert_eq!(align_answer_tokens(&[(0, 0), (0, 5)], 5, &t), vec![1, 1]);
        // A byte no teacher token covers: the last teacher token starting before it.
        assert_eq!(
            align_answer_tokens(&[(9, 10)], 13, &[(0, 5), (6, 8)]),
            vec![1]
        );
    }
}
