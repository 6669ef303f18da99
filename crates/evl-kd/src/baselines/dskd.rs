//! Dual-Space Knowledge Distillation, cross-tokenizer variant (Zhang et al., "Dual-Space
//! Knowledge Distillation for Large Language Models", EMNLP 2024, section 3.3 "cross-model
//! attention").
//!
//! The two sequences are aligned by a learned cross-model attention: teacher positions
//! query student positions (`A_ts = softmax(Q_t K_s^T / sqrt(d))`, `[l_t, l_s]`) and, in the
//! other direction, `A_st = A_ts^T` renormalised over teacher positions. Hidden states are
//! then projected into the other model's space and read out with that model's (frozen)
//! output head:
//! - teacher space: `z_{s->t} = (A_ts H_s W_{s->t}) E_t` must match the teacher's own
//!   distribution: `KL(p_t || softmax(z_{s->t}))` at teacher positions;
//! - student space: `z_{t->s} = (A_st H_t W_{t->s}) E_s` is a teacher distribution expressed
//!   in the student's vocabulary. As in the paper (and its code), the projection is trained
//!   by the ground truth: `CE(z_{t->s}, y)` at the answer positions; and it teaches the student
//!   only where it predicts the ground truth: `KL(p_{t->s} || p_s)` (target detached)
//!   averaged over the answer positions whose `argmax z_{t->s}` is the answer token.
//!
//! `L = KL_t + CE_{t->s} + KL_s`. Choices: queries come from teacher
//! hidden states and keys from student hidden states (the paper uses embeddings plus target
//! embeddings; hidden states carry the same information in our models and need no access to
//! embedding tables); no temperature.

use super::kd::kd_vanilla;
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use evl_models::ops::softmax;

/// Configuration of the trainable DSKD projections.
#[derive(Config, Debug)]
pub struct DskdConfig {
    /// Student hidden width.
    pub d_student: usize,
    /// Teacher hidden width.
    pub d_teacher: usize,
    /// Width of the cross-model attention.
    #[config(default = 64)]
    pub d_attn: usize,
}

impl DskdConfig {
    /// Builds the projections.
    pub fn init(&self, device: &Device) -> Dskd {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Dskd {
            query: lin(self.d_teacher, self.d_attn),
            key: lin(self.d_student, self.d_attn),
            s_to_t: lin(self.d_student, self.d_teacher),
            t_to_s: lin(self.d_teacher, self.d_student),
        }
    }
}

/// DSKD's learned cross-model attention and projections.
#[derive(Module, Debug)]
pub struct Dskd {
    /// Teacher hidden -> attention queries.
    pub query: Linear,
    /// Student hidden -> attention keys.
    pub key: Linear,
    /// Student hidden -> teacher space.
    pub s_to_t: Linear,
    /// Teacher hidden -> student space.
    pub t_to_s: Linear,
}

/// Terms of DSKD.
#[derive(Clone, Debug)]
pub struct DskdOutput {
    /// `KL_t + CE_{t->s} + KL_s`.
    pub loss: Tensor<1>,
    /// KL in the teacher's output space (target: the teacher's own distribution).
    pub kl_teacher_space: Tensor<1>,
    /// Cross-entropy of the projected teacher against the ground truth (trains the
    /// projection and the attention).
    pub ce_projected: Tensor<1>,
    /// KL in the student's output space (target: the projected teacher, detached), over the
    /// positions where the projection predicts the ground truth (0 when there is none).
    pub kl_student_space: Tensor<1>,
    /// The projected teacher's logits in the student's vocabulary, `[batch l_s, v_s]`
    /// (detached; for diagnostics: where its argmax is the ground truth, it teaches).
    pub teacher_in_student_space: Tensor<2>,
}

/// A linear layer on `[b, l, d]` as one 2-D product (burn's rank-3 `Linear::forward`
/// broadcasts the weight into a batched product).
fn flat_linear(layer: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, l, d] = x.dims();
    let y = layer.forward(x.reshape([b * l, d]));
    let [_, o] = y.dims();
    y.reshape([b, l, o])
}

/// `[b, l, d]` as `[b l, d]` rows.
fn rows(x: Tensor<3>) -> Tensor<2> {
    let [b, l, d] = x.dims();
    x.reshape([b * l, d])
}

impl Dskd {
    /// The DSKD loss.
    ///
    /// # Shapes
    /// - `hs`: `[batch, l_s, d_s]`, `ht`: `[batch, l_t, d_t]`, `zs`: `[batch, l_s, v_s]`,
    ///   `zt`: `[batch, l_t, v_t]`, `head_s`: `[d_s, v_s]`, `head_t`: `[d_t, v_t]`,
    ///   `targets`: `[batch, l_s]` the student token each position predicts, `answer`:
    ///   `[batch, l_s]` the positions the ground truth trains (the answer tokens)
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hs: Tensor<3>,
        ht: Tensor<3>,
        zs: Tensor<3>,
        zt: Tensor<3>,
        head_s: Tensor<2>,
        head_t: Tensor<2>,
        targets: Tensor<2, Int>,
        answer: Tensor<2, Bool>,
    ) -> DskdOutput {
        let [_, d_attn] = self.query.weight.val().dims();
        let q = flat_linear(&self.query, ht.clone()); // [b, lt, da]
        let k = flat_linear(&self.key, hs.clone()); // [b, ls, da]
        let scores = q
            .matmul(k.swap_dims(1, 2))
            .mul_scalar(1.0 / (d_attn as f64).sqrt()); // [b, lt, ls]
        let a_ts = softmax(scores.clone(), 2);
        let a_st = softmax(scores.swap_dims(1, 2), 2); // [b, ls, lt]
        let hs_in_t = a_ts.matmul(flat_linear(&self.s_to_t, hs)); // [b, lt, dt]
        let ht_in_s = a_st.matmul(flat_linear(&self.t_to_s, ht)); // [b, ls, ds]
        // The shared output heads as one `[b l, d] x [d, v]` product each; each KL term is
        // vanilla KD at T = 1 on the flattened rows (same function as a row-wise
        // `sum p (log p - log q)` averaged over positions, through KD's fused CPU kernel).
        let z_s_to_t = rows(hs_in_t).matmul(head_t); // [b lt, vt]
        let z_t_to_s = rows(ht_in_s).matmul(head_s); // [b ls, vs]
        let kl_t = kd_vanilla(z_s_to_t, rows(zt).detach(), 1.0);
        // Ground truth for the projected teacher, at the answer positions.
        let [n, _] = z_t_to_s.dims();
        let device = z_t_to_s.device();
        let y: Vec<i64> = targets.reshape([n]).into_data().iter::<i64>().collect();
        let m: Vec<bool> = answer.reshape([n]).into_data().iter::<bool>().collect();
        let pred: Vec<i64> = z_t_to_s
            .clone()
            .argmax(1)
            .reshape([n])
            .into_data()
            .iter::<i64>()
            .collect();
        let answer_rows: Vec<i64> = (0..n).filter(|&i| m[i]).map(|i| i as i64).collect();
        let right_rows: Vec<i64> = (0..n)
            .filter(|&i| m[i] && pred[i] == y[i])
            .map(|i| i as i64)
            .collect();
        let pick = |x: Tensor<2>, idx: &[i64]| {
            x.select(
                0,
                Tensor::<1, Int>::from_data(TensorData::new(idx.to_vec(), [idx.len()]), &device),
            )
        };
        // Zeros stay in the graph and in the inputs' precision (a default-float constant
        // would not add to an f64 loss).
        let ce = if answer_rows.is_empty() {
            z_t_to_s.clone().sum().mul_scalar(0.0)
        } else {
            let k = answer_rows.len();
            let logp = log_softmax(pick(z_t_to_s.clone(), &answer_rows), 1);
            let yk: Vec<i64> = answer_rows.iter().map(|&i| y[i as usize]).collect();
            let yk = Tensor::<2, Int>::from_data(TensorData::new(yk, [k, 1]), &device);
            logp.gather(1, yk).sum().neg().mul_scalar(1.0 / k as f64)
        };
        let projected = z_t_to_s.clone().detach();
        let kl_s = if right_rows.is_empty() {
            // A zero that still belongs to the graph (the student's logits), so a caller's
            // backward through it is well defined.
            rows(zs).sum().mul_scalar(0.0)
        } else {
            kd_vanilla(
                pick(rows(zs), &right_rows),
                pick(z_t_to_s, &right_rows).detach(),
                1.0,
            )
        };
        DskdOutput {
            loss: kl_t.clone() + ce.clone() + kl_s.clone(),
            kl_teacher_space: kl_t,
            ce_projected: ce,
            kl_student_space: kl_s,
            teacher_in_student_space: projected,
        }
    }
}
