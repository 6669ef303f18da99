//! The EVL-ECG objective (method.md 2; fixtures family `total`):
//!
//! `L_total = (1 - a) L_CE + a (lm L_mhca + lr L_rel + lot L_ot)`
//!
//! with the paper's defaults `a = 0.3, lm = 1.0, lr = 0.03, lot = 0.1, h = 8, eps = 0.1`
//! ([`crate::sinkhorn::PAPER_EPS`]).
//! `Hhat_t` from the cross-attention feeds both `L_mhca` and `L_rel`. Any term can be switched
//! off for ablations (it is then neither computed nor added), and every term is returned
//! separately for logging.

use crate::Kernel;
use crate::method::Ablation;
use crate::mhca::{MhcaAlign, MhcaAlignConfig, MhcaWeights, mhca_forward, mhca_loss};
use crate::ot::{OtAlign, OtAlignConfig, OtLossConfig, OtOutput, ot_loss};
use crate::relation::{RelationConfig, relation_loss};
use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use evl_models::device::tensor_like;

/// Weights and switches of the objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvlWeights {
    /// `a`: share of the distillation terms (paper: 0.3).
    pub alpha: f64,
    /// `lm`: weight of `L_mhca` (1.0).
    pub lambda_mhca: f64,
    /// `lr`: weight of `L_rel` (0.03).
    pub lambda_rel: f64,
    /// `lot`: weight of `L_ot` (0.1).
    pub lambda_ot: f64,
    /// Compute and add `L_mhca`.
    pub use_mhca: bool,
    /// Compute and add `L_rel` (needs `Hhat_t`, so it computes the cross-attention even
    /// when `use_mhca` is off).
    pub use_rel: bool,
    /// Compute and add `L_ot`.
    pub use_ot: bool,
    /// Fused host kernels or burn tensor ops for every term ([`Kernel`]; default `Auto`).
    pub kernel: Kernel,
}

impl Default for EvlWeights {
    fn default() -> Self {
        Self {
            alpha: 0.3,
            lambda_mhca: 1.0,
            lambda_rel: 0.03,
            lambda_ot: 0.1,
            use_mhca: true,
            use_rel: true,
            use_ot: true,
            kernel: Kernel::Auto,
        }
    }
}

/// Inputs of one distillation step.
#[derive(Clone, Debug)]
pub struct EvlInputs {
    /// The student's own cross-entropy (scalar).
    pub l_ce: Tensor<1>,
    /// Student hidden states `[batch, l_s, d_s]`.
    pub hs: Tensor<3>,
    /// Teacher hidden states `[batch, l_t, d_t]` (frozen).
    pub ht: Tensor<3>,
    /// Valid student positions `[batch, l_s]`.
    pub student_mask: Option<Tensor<2, Bool>>,
    /// Valid teacher positions `[batch, l_t]`.
    pub teacher_mask: Option<Tensor<2, Bool>>,
    /// Teacher visual tokens, already projected to the student width `[batch, v_t, d_s]`.
    pub t_vis: Tensor<3>,
    /// Student visual tokens `[batch, v_s, d_s]`.
    pub s_vis: Tensor<3>,
    /// Valid teacher visual tokens `[batch, v_t]`.
    pub t_vis_mask: Option<Tensor<2, Bool>>,
    /// Valid student visual tokens `[batch, v_s]`.
    pub s_vis_mask: Option<Tensor<2, Bool>>,
}

impl EvlInputs {
    /// Inputs without padding masks (every token valid).
    pub fn unmasked(
        l_ce: Tensor<1>,
        hs: Tensor<3>,
        ht: Tensor<3>,
        t_vis: Tensor<3>,
        s_vis: Tensor<3>,
    ) -> Self {
        Self {
            l_ce,
            hs,
            ht,
            student_mask: None,
            teacher_mask: None,
            t_vis,
            s_vis,
            t_vis_mask: None,
            s_vis_mask: None,
        }
    }
}

/// Every term of the objective (switched-off terms are `None`).
#[derive(Clone, Debug)]
pub struct EvlTerms {
    /// `L_total`.
    pub total: Tensor<1>,
    /// `L_CE` as given.
    pub ce: Tensor<1>,
    /// `L_mhca`.
    pub mhca: Option<Tensor<1>>,
    /// `L_rel`.
    pub rel: Option<Tensor<1>>,
    /// `L_ot` with its plan and diagnostics.
    pub ot: Option<OtOutput>,
}

/// The objective from explicit weights (the functional form the fixtures exercise).
///
/// [`EvlWeights::kernel`] chooses the form of every term ([`Kernel`]); the `kernel` fields
/// of `ot_cfg` and `rel_cfg` are ignored. Fused (the default on the CPU), `L_mhca` and
/// `L_rel` run as one host computation ([`crate::mhca::mhca_align_loss`]'s kernel feeding
/// `Hhat_t` to the relation kernel, then a single backward pass through the cross-attention
/// for both terms); the returned `mhca`/`rel` terms are then values for logging and `total`
/// carries every gradient. Graph, every term is burn tensor ops and differentiable on its
/// own. Both compute the same function.
pub fn evl_objective(
    inputs: EvlInputs,
    mhca: &MhcaWeights,
    n_heads: usize,
    weights: &EvlWeights,
    ot_cfg: &OtLossConfig,
    rel_cfg: &RelationConfig,
) -> EvlTerms {
    // one kernel for every term
    let kernel = weights.kernel;
    let ot_cfg = &OtLossConfig { kernel, ..*ot_cfg };
    let rel_cfg = &RelationConfig { kernel, ..*rel_cfg };
    if !((weights.use_mhca || weights.use_rel) && kernel.fused_for(&inputs.hs)) {
        return objective_graph(inputs, mhca, n_heads, weights, ot_cfg, rel_cfg);
    }
    let EvlInputs {
        l_ce,
        hs,
        ht,
        student_mask,
        teacher_mask,
        t_vis,
        s_vis,
        t_vis_mask,
        s_vis_mask,
    } = inputs;
    let ([v_mhca, v_rel], align) = crate::host::objective::align_terms_fused(
        (&hs, &ht),
        (student_mask.as_ref(), teacher_mask.as_ref()),
        mhca,
        n_heads,
        weights,
        rel_cfg,
    );
    let l_mhca = weights.use_mhca.then_some(v_mhca);
    let l_rel = weights.use_rel.then_some(v_rel);
    let ot = weights.use_ot.then(|| {
        ot_loss(
            t_vis,
            s_vis,
            t_vis_mask.as_ref(),
            s_vis_mask.as_ref(),
            ot_cfg,
        )
    });
    let mut kd = align;
    if let Some(o) = &ot {
        kd = kd + o.loss.clone().mul_scalar(weights.lambda_ot);
    }
    let total = l_ce.clone().mul_scalar(1.0 - weights.alpha) + kd.mul_scalar(weights.alpha);
    let constant = |v: f64| tensor_like(&[v], [1], &hs);
    EvlTerms {
        total,
        ce: l_ce,
        mhca: l_mhca.map(constant),
        rel: l_rel.map(constant),
        ot,
    }
}

/// [`evl_objective`] term by term, each differentiable on its own: the cross-attention as
/// burn tensor ops, `L_rel` and `L_ot` in the form their configurations (the objective's
/// kernel) choose. The graph form, and what runs when neither `L_mhca` nor `L_rel` is on.
fn objective_graph(
    inputs: EvlInputs,
    mhca: &MhcaWeights,
    n_heads: usize,
    weights: &EvlWeights,
    ot_cfg: &OtLossConfig,
    rel_cfg: &RelationConfig,
) -> EvlTerms {
    let EvlInputs {
        l_ce,
        hs,
        ht,
        student_mask,
        teacher_mask,
        t_vis,
        s_vis,
        t_vis_mask,
        s_vis_mask,
    } = inputs;
    let hhat = (weights.use_mhca || weights.use_rel)
        .then(|| mhca_forward(hs.clone(), ht, mhca, n_heads, teacher_mask.as_ref()));
    let l_mhca = weights.use_mhca.then(|| {
        mhca_loss(
            hs.clone(),
            hhat.clone().expect("computed"),
            student_mask.as_ref(),
        )
    });
    let l_rel = weights.use_rel.then(|| {
        relation_loss(
            hhat.clone().expect("computed"),
            hs,
            student_mask.as_ref(),
            rel_cfg,
        )
        .l_rel
    });
    let ot = weights.use_ot.then(|| {
        ot_loss(
            t_vis,
            s_vis,
            t_vis_mask.as_ref(),
            s_vis_mask.as_ref(),
            ot_cfg,
        )
    });
    let mut kd: Option<Tensor<1>> = None;
    let mut add = |t: Option<&Tensor<1>>, w: f64| {
        if let Some(t) = t {
            let term = t.clone().mul_scalar(w);
            kd = Some(match kd.take() {
                Some(k) => k + term,
                None => term,
            });
        }
    };
    add(l_mhca.as_ref(), weights.lambda_mhca);
    add(l_rel.as_ref(), weights.lambda_rel);
    add(ot.as_ref().map(|o| &o.loss), weights.lambda_ot);
    let mut total = l_ce.clone().mul_scalar(1.0 - weights.alpha);
    if let Some(kd) = kd {
        total = total + kd.mul_scalar(weights.alpha);
    }
    EvlTerms {
        total,
        ce: l_ce,
        mhca: l_mhca,
        rel: l_rel,
        ot,
    }
}

/// Configuration of the trainable EVL-ECG distillation head ([`EvlLoss`]).
#[derive(Config, Debug)]
pub struct EvlLossConfig {
    /// Cross-attention aligner (`W_Q, W_K, W_V, W_O`).
    pub mhca: MhcaAlignConfig,
    /// Visual-token projector and Sinkhorn settings.
    pub ot: OtAlignConfig,
    /// `a` (0.3).
    #[config(default = 0.3)]
    pub alpha: f64,
    /// `lm` (1.0).
    #[config(default = 1.0)]
    pub lambda_mhca: f64,
    /// `lr` (0.03).
    #[config(default = 0.03)]
    pub lambda_rel: f64,
    /// `lot` (0.1).
    #[config(default = 0.1)]
    pub lambda_ot: f64,
    /// Terms switched off (ablations).
    #[config(default = "Vec::new()")]
    pub ablate: Vec<Ablation>,
    /// Treat `Hhat_t` as a fixed target in `L_rel`.
    #[config(default = false)]
    pub rel_detach_teacher: bool,
    /// Fused host kernels or burn tensor ops for every term ([`Kernel`]); it overrides
    /// `ot.kernel` in [`EvlLoss::forward`].
    #[config(default = "Kernel::Auto")]
    pub kernel: Kernel,
}

impl EvlLossConfig {
    /// The weights and switches this configuration describes.
    pub fn weights(&self) -> EvlWeights {
        let on = |term: Ablation| !self.ablate.contains(&term);
        EvlWeights {
            alpha: self.alpha,
            lambda_mhca: self.lambda_mhca,
            lambda_rel: self.lambda_rel,
            lambda_ot: self.lambda_ot,
            use_mhca: on(Ablation::Mhca),
            use_rel: on(Ablation::Rel),
            use_ot: on(Ablation::Ot),
            kernel: self.kernel,
        }
    }

    /// Builds the trainable modules.
    pub fn init(&self, device: &Device) -> EvlLoss {
        EvlLoss {
            mhca: self.mhca.init(device),
            ot: self.ot.init(device),
        }
    }
}

/// The trainable parts of the EVL-ECG objective: cross-attention aligner and visual projector.
#[derive(Module, Debug)]
pub struct EvlLoss {
    /// Cross-attention aligner.
    pub mhca: MhcaAlign,
    /// Teacher visual-token projector.
    pub ot: OtAlign,
}

impl EvlLoss {
    /// Computes every term. `inputs.t_vis` is the *raw* teacher visual tokens
    /// `[batch, v_t, d_teacher_vis]`; the module projects them.
    pub fn forward(&self, mut inputs: EvlInputs, cfg: &EvlLossConfig) -> EvlTerms {
        inputs.t_vis = self.ot.proj.forward(inputs.t_vis);
        let rel = RelationConfig {
            detach_teacher: cfg.rel_detach_teacher,
            ..RelationConfig::default()
        };
        evl_objective(
            inputs,
            &self.mhca.weights(),
            self.mhca.n_heads,
            &cfg.weights(),
            &cfg.ot.loss_config(),
            &rel,
        )
    }
}
