//! Which distillation method a run uses, and how its terms are mixed with the student's own
//! cross-entropy: the one place every method's loss is chosen and weighted.
//!
//! The training loop gives [`distill_loss`] one micro-batch as tensors ([`KdBatch`]: the
//! student's [`DistillView`], the frozen teacher's outputs, the answer logits aligned across
//! the two tokenizers) and the trainable heads; it returns the total and every term by name.
//! Nothing here knows of files, tokenizers or records: the alignment of answer tokens is the
//! caller's (it needs both tokenizers), the losses are this crate's.

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use evl_models::vlm::DistillView;

use crate::baselines::kd::SharedVocab;
use crate::baselines::{Dskd, DskdConfig, MultiLevelOtConfig};
use crate::{EvlInputs, EvlLoss, EvlLossConfig};

/// A term of the EVL-ECG objective that an ablation switches off.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Ablation {
    /// `L_ot`, the transport cost between visual tokens (method.md 2.1).
    Ot,
    /// `L_mhca`, the cross-attention alignment (2.2).
    Mhca,
    /// `L_rel`, the relation matching (2.3).
    Rel,
}

impl Ablation {
    /// Every term, in the paper's order of presentation.
    pub const ALL: [Ablation; 3] = [Ablation::Ot, Ablation::Mhca, Ablation::Rel];

    /// The term's name (`ot`, `mhca`, `rel`).
    pub fn name(self) -> &'static str {
        match self {
            Ablation::Ot => "ot",
            Ablation::Mhca => "mhca",
            Ablation::Rel => "rel",
        }
    }
}

impl fmt::Display for Ablation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown method or ablation name, or an ablation given to a method that has none.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MethodError {
    /// Not a method name.
    #[error("unknown method `{0}` (expected one of: {names})", names = Method::NAMES.join(", "))]
    UnknownMethod(String),
    /// Not a term name.
    #[error("unknown ablation `{0}` (expected ot, mhca or rel)")]
    UnknownAblation(String),
    /// Ablations apply to EVL-ECG only.
    #[error("ablations apply to evl only, not `{0}`")]
    AblationOfBaseline(String),
}

impl FromStr for Ablation {
    type Err = MethodError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ablation::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| MethodError::UnknownAblation(s.to_string()))
    }
}

/// Distillation method. Serialised (TOML, JSON) as its [`Method::name`]: `evl`,
/// `evl-no-ot`, `kl`, `multilevel-ot`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// Cross-entropy only (SFT continued for the same steps: the control).
    Ce,
    /// Vanilla KD over the shared vocabulary.
    Kl,
    /// EVL-ECG with the listed terms switched off.
    Evl {
        /// Ablated terms (sorted, no repeats).
        ablate: Vec<Ablation>,
    },
    /// ULD: sorted-probability L1 at aligned answer tokens.
    Uld,
    /// MultiLevelOT at the aligned answer tokens of each example.
    MultiLevelOt,
    /// TinyBERT-style hidden-state MSE through a learned projection.
    TinyBert,
    /// DSKD, cross-tokenizer variant (cross-model attention, dual-space KL).
    Dskd,
    /// EM-KD: Hungarian-matched vision tokens inside the LM, affinity smooth-L1, reverse KL.
    Emkd,
}

impl Default for Method {
    /// EVL-ECG with every term (the paper's method).
    fn default() -> Self {
        Method::evl()
    }
}

impl Method {
    /// The method names [`Method::parse`] accepts (before ablations).
    pub const NAMES: [&'static str; 8] = [
        "evl",
        "ce",
        "kl",
        "uld",
        "multilevel-ot",
        "tinybert",
        "dskd",
        "emkd",
    ];

    /// EVL-ECG with every term.
    pub fn evl() -> Method {
        Method::Evl { ablate: Vec::new() }
    }

    /// The leave-one-out ablation: EVL-ECG without each term in turn (`evl-no-ot`,
    /// `evl-no-mhca`, `evl-no-rel`).
    pub fn leave_one_out() -> Vec<Method> {
        Ablation::ALL
            .iter()
            .map(|&a| Method::Evl { ablate: vec![a] })
            .collect()
    }

    /// The paper's cumulative ablation (its Table 6), the terms added one by one on top of
    /// the SFT student's CE: `+L_ot` (`evl-no-mhca-rel`), `+L_ot +L_mhca` (`evl-no-rel`), all
    /// three (`evl`), each with its row label. Its first row, CE alone, is [`Method::Ce`].
    pub fn cumulative() -> Vec<(&'static str, Method)> {
        vec![
            ("CE (SFT)", Method::Ce),
            (
                "+ OT",
                Method::Evl {
                    ablate: vec![Ablation::Mhca, Ablation::Rel],
                },
            ),
            (
                "+ OT + MHCA",
                Method::Evl {
                    ablate: vec![Ablation::Rel],
                },
            ),
            ("+ OT + MHCA + REL", Method::evl()),
        ]
    }

    /// Short name for tables and files (`evl`, `evl-no-ot`, `evl-no-mhca-rel`, `kl`, ...).
    pub fn name(&self) -> String {
        match self {
            Method::Ce => "ce".into(),
            Method::Kl => "kl".into(),
            Method::Evl { ablate } if ablate.is_empty() => "evl".into(),
            Method::Evl { ablate } => format!(
                "evl-no-{}",
                ablate
                    .iter()
                    .map(|a| a.name())
                    .collect::<Vec<_>>()
                    .join("-")
            ),
            Method::Uld => "uld".into(),
            Method::MultiLevelOt => "multilevel-ot".into(),
            Method::TinyBert => "tinybert".into(),
            Method::Dskd => "dskd".into(),
            Method::Emkd => "emkd".into(),
        }
    }

    /// A method from its name and extra ablations (`ablate` applies to `evl` only).
    ///
    /// # Errors
    /// An unknown name, an unknown term, or an ablation of a baseline.
    pub fn parse(name: &str, ablate: &[Ablation]) -> Result<Method, MethodError> {
        let mut m: Method = name.parse()?;
        if ablate.is_empty() {
            return Ok(m);
        }
        match &mut m {
            Method::Evl { ablate: a } => {
                a.extend_from_slice(ablate);
                a.sort();
                a.dedup();
                Ok(m)
            }
            _ => Err(MethodError::AblationOfBaseline(name.to_string())),
        }
    }

    /// The EVL-ECG terms this method switches off (none for the baselines).
    pub fn ablated(&self) -> &[Ablation] {
        match self {
            Method::Evl { ablate } => ablate,
            _ => &[],
        }
    }

    /// Whether this is EVL-ECG (with or without ablations).
    pub fn is_evl(&self) -> bool {
        matches!(self, Method::Evl { .. })
    }

    /// Which teacher outputs the method reads: what [`KdBatch`] must carry for it.
    pub fn needs(&self) -> Needs {
        let none = Needs::default();
        match self {
            Method::Ce => none,
            Method::Kl | Method::Uld | Method::MultiLevelOt => Needs {
                aligned_answers: true,
                ..none
            },
            Method::Evl { .. } => Needs {
                teacher_hidden: true,
                teacher_visual: true,
                ..none
            },
            Method::TinyBert => Needs {
                teacher_hidden: true,
                ..none
            },
            Method::Dskd => Needs {
                teacher_hidden: true,
                teacher_head: true,
                ..none
            },
            Method::Emkd => Needs {
                teacher_hidden: true,
                teacher_head: true,
                teacher_visual_hidden: true,
                ..none
            },
        }
    }

    /// Whether the method reads logits over the vocabulary the two tokenizers share.
    pub fn needs_shared_vocab(&self) -> bool {
        matches!(self, Method::Kl | Method::Emkd)
    }
}

impl FromStr for Method {
    type Err = MethodError;
    /// `evl`, `ce`, `kl`, `uld`, `multilevel-ot`, `tinybert`, `dskd`, `emkd`, or
    /// `evl-no-TERM[-TERM...]` (the form [`Method::name`] writes).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "evl" => Method::evl(),
            "ce" => Method::Ce,
            "kl" => Method::Kl,
            "uld" => Method::Uld,
            "multilevel-ot" => Method::MultiLevelOt,
            "tinybert" => Method::TinyBert,
            "dskd" => Method::Dskd,
            "emkd" => Method::Emkd,
            other => match other.strip_prefix("evl-no-") {
                Some(rest) => {
                    let mut ablate = rest
                        .split('-')
                        .map(str::parse)
                        .collect::<Result<Vec<Ablation>, _>>()?;
                    ablate.sort();
                    ablate.dedup();
                    Method::Evl { ablate }
                }
                None => return Err(MethodError::UnknownMethod(other.to_string())),
            },
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which teacher outputs a method reads ([`Method::needs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// Teacher hidden states at the text positions.
    pub teacher_hidden: bool,
    /// Teacher visual tokens.
    pub teacher_visual: bool,
    /// Teacher LM hidden states at the visual positions.
    pub teacher_visual_hidden: bool,
    /// The teacher's output head.
    pub teacher_head: bool,
    /// Answer-token logits of both models, aligned across the tokenizers.
    pub aligned_answers: bool,
}

/// Trainable parts of the baselines that have some (each used by its method only).
#[derive(Module, Debug)]
pub struct BaselineHeads {
    /// TinyBERT's `W_h: D_s -> D_t`.
    pub hidden_proj: Linear,
    /// DSKD's cross-model attention and projections.
    pub dskd: Dskd,
}

impl BaselineHeads {
    /// Freshly initialised heads for a student of LM width `d_student` and a teacher of
    /// `d_teacher`.
    pub fn init(d_student: usize, d_teacher: usize, device: &Device) -> BaselineHeads {
        let lin = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
        BaselineHeads {
            hidden_proj: lin(d_student, d_teacher),
            dskd: DskdConfig::new(d_student, d_teacher).init(device),
        }
    }
}

/// Answer-token logits of the two models, paired across their tokenizers.
#[derive(Debug, Clone)]
pub struct AlignedAnswers {
    /// Student logits at answer positions `[n, vocab_s]` (in the graph).
    pub student: Tensor<2>,
    /// The teacher logit row aligned to each `[n, vocab_t]`.
    pub teacher: Tensor<2>,
    /// Batch row of each pair.
    pub row_of: Vec<usize>,
}

/// The frozen teacher's outputs for one micro-batch (`None` where the method does not need
/// them, see [`Method::needs`]).
#[derive(Debug, Clone)]
pub struct TeacherBatch {
    /// Hidden states at the text positions, padded `[batch, l_t, d_t]`.
    pub hidden: Option<Tensor<3>>,
    /// Valid positions of `hidden` `[batch, l_t]`.
    pub hidden_mask: Option<Tensor<2, Bool>>,
    /// Unpadded length of each row of `hidden`.
    pub lens: Vec<usize>,
    /// Visual tokens `[batch, v_t, d_vis_t]`.
    pub visual: Option<Tensor<3>>,
    /// Valid teacher visual tokens `[batch, v_t]` when their number varies by example (a
    /// LLaVA-NeXT teacher's anyres tiles depend on the image's size); `None` when all are.
    pub visual_mask: Option<Tensor<2, Bool>>,
    /// LM hidden states at the visual positions `[batch, v_t, d_t]`.
    pub visual_hidden: Option<Tensor<3>>,
    /// Output head `[d_t, vocab_t]`.
    pub head: Option<Tensor<2>>,
    /// Root mean square of the teacher's text hidden states over the whole training set.
    pub hidden_rms: f64,
}

/// Everything a method's loss reads for one micro-batch.
#[derive(Debug, Clone)]
pub struct KdBatch<'a> {
    /// The student's forward pass (in the graph).
    pub student: &'a DistillView,
    /// Unpadded text length of each student row.
    pub student_lens: Vec<usize>,
    /// The student's own cross-entropy on the answer tokens (scalar).
    pub ce: Tensor<1>,
    /// The token each student text position predicts `[batch, t]` (the CE's targets).
    pub targets: Tensor<2, Int>,
    /// The answer positions the CE trains `[batch, t]`.
    pub answer: Tensor<2, Bool>,
    /// The teacher's outputs.
    pub teacher: TeacherBatch,
    /// Aligned answer logits (`None` when the batch has no answer token or the method does
    /// not need them).
    pub answers: Option<AlignedAnswers>,
}

/// Settings of the distillation loss that are not EVL-ECG's own ([`EvlLossConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MixConfig {
    /// `a`: the weight of every method's distillation term, `1 - a` the CE's (see
    /// [`distill_loss`]).
    pub alpha: f64,
    /// KD temperature (vanilla KD, ULD).
    pub temperature: f64,
    /// Divide the teacher's text hidden states by their RMS before the MSE-type terms
    /// (EVL-ECG's `L_mhca`, TinyBERT). Not in the paper; `false` is the paper-literal setting.
    pub teacher_hidden_rms: bool,
}

/// The total loss of one micro-batch and its terms by name (values for logging; the total
/// carries every gradient).
#[derive(Debug, Clone)]
pub struct MethodLoss {
    /// What is back-propagated.
    pub total: Tensor<1>,
    /// Distillation terms by name (`kd`, `mhca`, `rel`, `ot`, or the baseline's name).
    pub terms: Vec<(&'static str, Tensor<1>)>,
}

/// The method's loss on one micro-batch, mixed with the student's CE.
///
/// - `ce`: `L = L_CE`;
/// - EVL-ECG: `L = (1 - a) L_CE + a (lm L_mhca + lr L_rel + lot L_ot)` ([`crate::evl_objective`]);
/// - every baseline: `L = (1 - a) L_CE + a L_method`.
///
/// One convention for every method, the paper's (its Eq. for `L_total`, and "all baseline KD
/// methods ... start from this same checkpoint for fair comparison"): `a` is the weight of the
/// distillation term and `1 - a` that of the CE, so at the paper's `a = 0.3` every method
/// gives its distillation term 0.3 and the CE 0.7. (Until this was unified the baselines got
/// `a L_CE + (1 - a) L_method`, i.e. 0.7 of distillation against EVL-ECG's 0.3.)
///
/// # Panics
/// If `batch` lacks an output [`Method::needs`] says the method reads (a caller bug).
pub fn distill_loss(
    method: &Method,
    batch: KdBatch<'_>,
    mix: &MixConfig,
    evl: (&EvlLoss, &EvlLossConfig),
    heads: &BaselineHeads,
    shared: &SharedVocab,
) -> MethodLoss {
    let device = batch.ce.device();
    let zero = || Tensor::<1>::zeros([1], &device);
    let baseline = |ce: Tensor<1>, name: &'static str, l: Tensor<1>| MethodLoss {
        total: ce.mul_scalar(1.0 - mix.alpha) + l.clone().mul_scalar(mix.alpha),
        terms: vec![(name, l)],
    };
    let rms_scale = if mix.teacher_hidden_rms {
        1.0 / batch.teacher.hidden_rms
    } else {
        1.0
    };
    match method {
        Method::Ce => MethodLoss {
            total: batch.ce,
            terms: Vec::new(),
        },
        Method::Kl => {
            let kd = match &batch.answers {
                Some(a) => shared.kd(a.student.clone(), a.teacher.clone(), mix.temperature),
                None => zero(),
            };
            baseline(batch.ce, "kd", kd)
        }
        Method::Evl { .. } => {
            let t = &batch.teacher;
            let ht = t.hidden.clone().expect("evl reads teacher hidden states");
            let v = batch.student;
            let inputs = EvlInputs {
                l_ce: batch.ce,
                hs: v.hidden.clone(),
                ht: if mix.teacher_hidden_rms {
                    ht.mul_scalar(rms_scale)
                } else {
                    ht
                },
                student_mask: Some(v.text_mask.clone()),
                teacher_mask: t.hidden_mask.clone(),
                t_vis: t.visual.clone().expect("evl reads teacher visual tokens"),
                s_vis: v.visual.clone(),
                t_vis_mask: t.visual_mask.clone(),
                s_vis_mask: v.visual_mask.clone(),
            };
            let out = evl.0.forward(inputs, evl.1);
            let mut terms = Vec::new();
            if let Some(m) = out.mhca {
                terms.push(("mhca", m));
            }
            if let Some(r) = out.rel {
                terms.push(("rel", r));
            }
            if let Some(ot) = out.ot {
                terms.push(("ot", ot.loss));
            }
            MethodLoss {
                total: out.total,
                terms,
            }
        }
        Method::Uld | Method::MultiLevelOt => {
            let l = match &batch.answers {
                None => zero(),
                Some(a) if *method == Method::Uld => {
                    crate::baselines::uld_loss(
                        a.student.clone(),
                        a.teacher.clone(),
                        mix.temperature,
                        mix.temperature,
                    )
                    .loss
                }
                Some(a) => multilevel_ot_per_example(a, batch.student_lens.len(), &device),
            };
            let name = if *method == Method::Uld {
                "uld"
            } else {
                "multilevel-ot"
            };
            baseline(batch.ce, name, l)
        }
        Method::TinyBert => {
            let w = heads.hidden_proj.weight.val();
            let per = (0..batch.student_lens.len())
                .map(|r| {
                    crate::baselines::tinybert_hidden_loss(
                        student_hidden(&batch, r),
                        teacher_hidden(&batch, r).mul_scalar(rms_scale),
                        w.clone(),
                        None,
                    )
                })
                .collect();
            let l = mean(per, &device);
            baseline(batch.ce, "tinybert", l)
        }
        Method::Dskd => {
            let head_t = batch
                .teacher
                .head
                .clone()
                .expect("dskd reads the teacher head");
            let head_s = batch.student.head.clone();
            let per = (0..batch.student_lens.len())
                .map(|r| {
                    let (hs, ht) = (student_hidden(&batch, r), teacher_hidden(&batch, r));
                    let zs = hs.clone().matmul(head_s.clone().unsqueeze::<3>());
                    let zt = ht.clone().matmul(head_t.clone().unsqueeze::<3>());
                    let l = batch.student_lens[r];
                    heads
                        .dskd
                        .forward(
                            hs,
                            ht,
                            zs,
                            zt,
                            head_s.clone(),
                            head_t.clone(),
                            batch.targets.clone().slice([r..r + 1, 0..l]),
                            batch.answer.clone().slice([r..r + 1, 0..l]),
                        )
                        .loss
                })
                .collect();
            let l = mean(per, &device);
            baseline(batch.ce, "dskd", l)
        }
        Method::Emkd => {
            let t = &batch.teacher;
            let head_t = t.head.clone().expect("emkd reads the teacher head");
            let vis_t = t
                .visual_hidden
                .clone()
                .expect("emkd reads teacher visual hidden states");
            let head_s = batch.student.head.clone();
            let [_, vs, ds] = batch.student.visual_hidden.dims();
            let [_, vt, dt] = vis_t.dims();
            let per = (0..batch.student_lens.len())
                .map(|r| {
                    let t_vis = vis_t.clone().slice([r..r + 1, 0..vt, 0..dt]);
                    let s_vis = batch
                        .student
                        .visual_hidden
                        .clone()
                        .slice([r..r + 1, 0..vs, 0..ds]);
                    let t_logits = SharedVocab::gather(
                        t_vis.clone().reshape([vt, dt]).matmul(head_t.clone()),
                        &shared.teacher_ids,
                    )
                    .unsqueeze::<3>();
                    let s_logits = SharedVocab::gather(
                        s_vis.clone().reshape([vs, ds]).matmul(head_s.clone()),
                        &shared.student_ids,
                    )
                    .unsqueeze::<3>();
                    crate::baselines::emkd_loss(
                        t_vis,
                        s_vis,
                        teacher_hidden(&batch, r),
                        student_hidden(&batch, r),
                        t_logits,
                        s_logits,
                        1.0,
                        1.0,
                    )
                    .loss
                })
                .collect();
            let l = mean(per, &device);
            baseline(batch.ce, "emkd", l)
        }
    }
}

/// Student hidden states of row `r` without padding `[1, l_s, d_s]`.
fn student_hidden(batch: &KdBatch<'_>, r: usize) -> Tensor<3> {
    let [_, _, d] = batch.student.hidden.dims();
    let l = batch.student_lens[r];
    batch.student.hidden.clone().slice([r..r + 1, 0..l, 0..d])
}

/// Teacher hidden states of row `r` without padding `[1, l_t, d_t]`.
fn teacher_hidden(batch: &KdBatch<'_>, r: usize) -> Tensor<3> {
    let h = batch
        .teacher
        .hidden
        .as_ref()
        .expect("the method reads teacher hidden states");
    let [_, _, d] = h.dims();
    let l = batch.teacher.lens[r];
    h.clone().slice([r..r + 1, 0..l, 0..d])
}

fn mean(terms: Vec<Tensor<1>>, device: &Device) -> Tensor<1> {
    let n = terms.len();
    match terms.into_iter().reduce(|a, b| a + b) {
        Some(t) => t.mul_scalar(1.0 / n as f64),
        None => Tensor::<1>::zeros([1], device),
    }
}

/// MultiLevelOT per example: each example's aligned answer tokens form its sequence; the
/// loss is the mean over examples that have any.
fn multilevel_ot_per_example(a: &AlignedAnswers, rows: usize, device: &Device) -> Tensor<1> {
    let cfg = MultiLevelOtConfig::default();
    let per: Vec<Tensor<1>> = (0..rows)
        .filter_map(|r| {
            let sel: Vec<i64> = a
                .row_of
                .iter()
                .enumerate()
                .filter(|(_, x)| **x == r)
                .map(|(q, _)| q as i64)
                .collect();
            (!sel.is_empty()).then(|| {
                let n = sel.len();
                let ix = Tensor::<1, Int>::from_data(TensorData::new(sel, [n]), device);
                let zs_r = a.student.clone().select(0, ix.clone()).unsqueeze::<3>();
                let zt_r = a.teacher.clone().select(0, ix).unsqueeze::<3>();
                crate::baselines::multilevel_ot_loss(zs_r, zt_r, &cfg).loss
            })
        })
        .collect();
    mean(per, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_parse_and_serde() {
        let all = [
            Method::evl(),
            Method::Evl {
                ablate: vec![Ablation::Ot],
            },
            Method::Evl {
                ablate: vec![Ablation::Mhca, Ablation::Rel],
            },
            Method::Ce,
            Method::Kl,
            Method::Uld,
            Method::MultiLevelOt,
            Method::TinyBert,
            Method::Dskd,
            Method::Emkd,
        ];
        let names: Vec<String> = all.iter().map(Method::name).collect();
        assert_eq!(
            names,
            [
                "evl",
                "evl-no-ot",
                "evl-no-mhca-rel",
                "ce",
                "kl",
                "uld",
                "multilevel-ot",
                "tinybert",
                "dskd",
                "emkd"
            ]
        );
        for m in &all {
            assert_eq!(&m.name().parse::<Method>().expect("parses"), m);
            let json = serde_json::to_string(m).expect("serialises");
            assert_eq!(json, format!("\"{}\"", m.name()));
            assert_eq!(&serde_json::from_str::<Method>(&json).expect("reads"), m);
        }
        assert_eq!(Method::default().name(), "evl");
        assert!(Method::default().is_evl());
    }

    #[test]
    fn parse_sorts_ablations_and_refuses_bad_names() {
        let m = Method::parse("evl", &[Ablation::Rel, Ablation::Ot, Ablation::Rel]).expect("valid");
        assert_eq!(m.ablated(), [Ablation::Ot, Ablation::Rel]);
        assert_eq!(m.name(), "evl-no-ot-rel");
        assert_eq!(
            Method::parse("kl", &[Ablation::Ot]),
            Err(MethodError::AblationOfBaseline("kl".into()))
        );
        let e = "tiny-bert".parse::<Method>().expect_err("unknown");
        assert!(e.to_string().contains("multilevel-ot, tinybert"), "{e}");
        assert_eq!(
            "evl-no-otx".parse::<Method>(),
            Err(MethodError::UnknownAblation("otx".into()))
        );
        assert_eq!("ot".parse::<Ablation>(), Ok(Ablation::Ot));
        assert_eq!(
            serde_json::to_string(&[Ablation::Mhca]).expect("serialises"),
            "[\"mhca\"]"
        );
    }

    #[test]
    fn needs_match_what_each_loss_reads() {
        assert_eq!(Method::Ce.needs(), Needs::default());
        assert!(Method::Kl.needs().aligned_answers && !Method::Kl.needs().teacher_hidden);
        let e = Method::evl().needs();
        assert!(e.teacher_hidden && e.teacher_visual && !e.aligned_answers);
        let m = Method::Emkd.needs();
        assert!(m.teacher_visual_hidden && m.teacher_head && m.teacher_hidden);
        assert!(Method::Kl.needs_shared_vocab() && Method::Emkd.needs_shared_vocab());
        assert!(!Method::Dskd.needs_shared_vocab());
    }

    /// Every method's total is `(1 - a) CE + a * (its distillation term)`, with the terms it
    /// reports: one convention, the paper's, for EVL-ECG and every baseline (the baselines
    /// used to get `a CE + (1 - a) L`).
    #[test]
    fn every_method_mixes_ce_and_distillation_the_same_way() {
        use crate::{MhcaAlignConfig, OtAlignConfig};
        use burn::tensor::Distribution;
        let dev = Device::flex();
        dev.seed(11);
        let (b, t, vs, vt, ds, dt, nvs, nvt) = (2, 5, 3, 4, 8, 6, 10, 12);
        let r =
            |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let view = DistillView {
            visual: r([b, vs, ds]),
            hidden: r([b, t, ds]),
            text_mask: Tensor::<2, Bool>::from_data(
                TensorData::new(vec![true; b * t], [b, t]),
                &dev,
            ),
            logits: r([b, t, nvs]),
            visual_hidden: r([b, vs, ds]),
            head: Tensor::<2>::random([ds, nvs], Distribution::Normal(0.0, 1.0), &dev),
            visual_mask: None,
        };
        let teacher = TeacherBatch {
            hidden: Some(r([b, t + 1, dt])),
            hidden_mask: Some(Tensor::<2, Bool>::from_data(
                TensorData::new(vec![true; b * (t + 1)], [b, t + 1]),
                &dev,
            )),
            lens: vec![t + 1; b],
            visual: Some(r([b, vt, dt])),
            visual_mask: None,
            visual_hidden: Some(r([b, vt, dt])),
            head: Some(Tensor::<2>::random(
                [dt, nvt],
                Distribution::Normal(0.0, 1.0),
                &dev,
            )),
            hidden_rms: 1.0,
        };
        let answers = AlignedAnswers {
            student: r([1, 4, nvs]).reshape([4, nvs]),
            teacher: r([1, 4, nvt]).reshape([4, nvt]),
            row_of: vec![0, 0, 1, 1],
        };
        let words = |n: usize, off: usize| -> Vec<String> {
            (0..n).map(|i| format!("w{}", i + off)).collect()
        };
        let shared = SharedVocab::new(&words(nvs, 0), &words(nvt, 3));
        let a = 0.3;
        let mix = MixConfig {
            alpha: a,
            temperature: 2.0,
            teacher_hidden_rms: false,
        };
        let cfg = EvlLossConfig::new(MhcaAlignConfig::new(ds, dt), OtAlignConfig::new(dt, ds))
            .with_alpha(a);
        let head = cfg.init(&dev);
        let heads = BaselineHeads::init(ds, dt, &dev);
        let ce = 1.7f64;
        let value = |x: &Tensor<1>| x.clone().into_data().iter::<f32>().next().unwrap() as f64;
        for name in Method::NAMES {
            let method = Method::parse(name, &[]).unwrap();
            let batch = KdBatch {
                student: &view,
                student_lens: vec![t; b],
                ce: Tensor::<1>::from_data(TensorData::new(vec![ce as f32], [1]), &dev),
                targets: Tensor::<2, Int>::from_data(
                    TensorData::new(
                        (0..(b * t) as i64).map(|i| i % nvs as i64).collect(),
                        [b, t],
                    ),
                    &dev,
                ),
                answer: Tensor::<2, Bool>::from_data(
                    TensorData::new((0..b * t).map(|i| i % t >= 2).collect(), [b, t]),
                    &dev,
                ),
                teacher: teacher.clone(),
                answers: Some(answers.clone()),
            };
            let out = distill_loss(&method, batch, &mix, (&head, &cfg), &heads, &shared);
            let kd: f64 = out
                .terms
                .iter()
                .map(|(k, v)| {
                    let w = match *k {
                        "mhca" => cfg.lambda_mhca,
                        "rel" => cfg.lambda_rel,
                        "ot" => cfg.lambda_ot,
                        _ => 1.0,
                    };
                    w * value(v)
                })
                .sum();
            let want = if name == "ce" {
                ce
            } else {
                (1.0 - a) * ce + a * kd
            };
            let got = value(&out.total);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{name}: total {got}, (1 - a) CE + a L = {want} (terms {:?})",
                out.terms
                    .iter()
                    .map(|(k, v)| (*k, value(v)))
                    .collect::<Vec<_>>()
            );
            if name != "ce" {
                assert!(kd.abs() > 1e-6, "{name}: no distillation term");
            }
        }
    }
}
