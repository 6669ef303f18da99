//! Hand-worked values for the baselines without reference fixtures: tiny inputs whose loss
//! is derived in the comments (finite differences check gradients against the value; these
//! check the value itself).

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use evl_kd::baselines::{
    Dskd, MultiLevelOtConfig, emkd_loss, multilevel_ot_loss, rkd_loss, tinybert_hidden_loss,
};
use evl_models::device::{Precision, bool_tensor, tensor_from_f64, to_vec_f64};

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

#[test]
fn tinybert_hidden_by_hand() {
    // H_s = [[1], [2]] (one item, two positions, width 1), H_t = [[1, 0]] (one teacher
    // position: both student positions resample to it), W_h = [1, 1].
    // Projections [1, 1] and [2, 2]; residuals [0, 1] and [1, 2]; squared norms 1 and 5;
    // per token / d_t = 0.5 and 2.5. Mean 1.5; with position 1 masked out, 0.5.
    let dev = Device::flex();
    let hs = tensor_from_f64(&[1.0, 2.0], [1, 2, 1], &dev, Precision::F64);
    let ht = tensor_from_f64(&[1.0, 0.0], [1, 1, 2], &dev, Precision::F64);
    let w = tensor_from_f64(&[1.0, 1.0], [1, 2], &dev, Precision::F64);
    let m = bool_tensor(&[true, false], [1, 2], &dev);
    let plain = tinybert_hidden_loss(hs.clone(), ht.clone(), w.clone(), None);
    close(to_vec_f64(plain)[0], 1.5, "unmasked");
    let masked = tinybert_hidden_loss(hs, ht, w, Some(&m));
    close(to_vec_f64(masked)[0], 0.5, "masked");
}

#[test]
fn rkd_by_hand() {
    // Teacher: collinear (0,0), (1,0), (2,0); student: (0,0), (1,0), (0,1).
    // Distances: teacher 1, 2, 1 (mean of the 6 off-diagonal entries mu = 4/3, so psi_D =
    // 3/4, 3/2, 3/4); student 1, 1, sqrt 2 (mu = (2 + sqrt 2)/3). Differences -0.12868,
    // 0.62132, -0.49264, each twice in the 3x3 matrix, all below 1 so Huber is d^2/2:
    // L_D = (d1^2 + d2^2 + d3^2) / 9 = 0.0716991411...
    // Angles <e_ij, e_kj> over the 27 triplets (e_jj = 0): teacher entries are 0 or +-1,
    // student ones 0, +-1 or 1/sqrt 2; L_A = 3.5 / 27 (numpy, independently).
    let dev = Device::flex();
    let t = tensor_from_f64(
        &[0.0, 0.0, 1.0, 0.0, 2.0, 0.0],
        [1, 3, 2],
        &dev,
        Precision::F64,
    );
    let s = tensor_from_f64(
        &[0.0, 0.0, 1.0, 0.0, 0.0, 1.0],
        [1, 3, 2],
        &dev,
        Precision::F64,
    );
    let mu_s = (2.0 + 2f64.sqrt()) / 3.0;
    let d = [
        0.75 - 1.0 / mu_s,
        1.5 - 1.0 / mu_s,
        0.75 - 2f64.sqrt() / mu_s,
    ];
    let l_d: f64 = d.iter().map(|x| x * x).sum::<f64>() / 9.0;
    close(l_d, 0.071_699_141_100_893_57, "distance term (derivation)");
    let l_a = 3.5 / 27.0;
    close(
        to_vec_f64(rkd_loss(t.clone(), s.clone(), 1.0, 0.0))[0],
        l_d,
        "L_D",
    );
    close(
        to_vec_f64(rkd_loss(t.clone(), s.clone(), 0.0, 1.0))[0],
        l_a,
        "L_A",
    );
    close(
        to_vec_f64(rkd_loss(t.clone(), s, 1.0, 2.0))[0],
        l_d + 2.0 * l_a,
        "paper weights",
    );
    // A scaled, shifted copy has the same relations: zero loss.
    let s2: Vec<f64> = [0.0, 0.0, 1.0, 0.0, 2.0, 0.0]
        .iter()
        .enumerate()
        .map(|(k, &v)| 2.0 * v + if k % 2 == 0 { 3.0 } else { -1.0 })
        .collect();
    let s2 = tensor_from_f64(&s2, [1, 3, 2], &dev, Precision::F64);
    assert!(to_vec_f64(rkd_loss(t, s2, 1.0, 2.0))[0].abs() < 1e-12);
}

#[test]
fn multilevel_ot_by_hand() {
    // One position. Student probabilities (0.5, 0.3, 0.2); teacher (0.1, 0.6, 0.25, 0.05),
    // a larger vocabulary in another order. Top 3 sorted: student (0.5, 0.3, 0.2), teacher
    // (0.6, 0.25, 0.1).
    // L1 = 0.1 + 0.05 + 0.1 = 0.25; CE = -(0.6 ln 0.5 + 0.25 ln 0.3 + 0.1 ln 0.2);
    // with one position on each side the plan is the single unit cell, so the sequence term
    // is the L1 cost 0.25.
    let dev = Device::flex();
    let ln = |p: &[f64]| p.iter().map(|x| x.ln()).collect::<Vec<f64>>();
    let zs = tensor_from_f64(&ln(&[0.5, 0.3, 0.2]), [1, 1, 3], &dev, Precision::F64);
    let zt = tensor_from_f64(
        &ln(&[0.1, 0.6, 0.25, 0.05]),
        [1, 1, 4],
        &dev,
        Precision::F64,
    );
    let out = multilevel_ot_loss(
        zs,
        zt,
        &MultiLevelOtConfig {
            top_k: 3,
            ..MultiLevelOtConfig::default()
        },
    );
    let ce = -(0.6 * 0.5f64.ln() + 0.25 * 0.3f64.ln() + 0.1 * 0.2f64.ln());
    close(to_vec_f64(out.token_l1)[0], 0.25, "token L1");
    close(to_vec_f64(out.token_ce)[0], ce, "token CE");
    close(to_vec_f64(out.sequence_ot)[0], 0.25, "sequence OT");
    close(to_vec_f64(out.loss)[0], 0.25 + ce + 0.25, "total");
}

#[test]
fn dskd_by_hand() {
    // One item, l_t = 1 teacher position, l_s = 2 student positions, widths 1, vocabularies 2.
    // W_query = 0, so every cross-model score is 0 and A_ts = [1/2, 1/2]; A_st (renormalised
    // over the single teacher position) is [1, 1]^T.
    // Teacher space: H_s W_{s->t} = [1, 3], averaged: 2; head_t = [1, 0] gives logits (2, 0)
    // against the teacher's own (0, 0): KL((1/2, 1/2) || softmax(2, 0))
    //   = ln(1 + e^2) - 1 - ln 2.
    // Student space: H_t W_{t->s} = 2 at both student positions; head_s = [1, -1] gives the
    // target logits (2, -2), p = (s, 1 - s) with s = sigmoid(4). Student logits (0, 0) give
    // KL = ln 2 - H(p); student logits (4, 0) are p itself, KL = 0. Mean (ln 2 - H(p)) / 2.
    let dev = Device::flex();
    let f = |v: &[f64], shape: [usize; 3]| tensor_from_f64(v, shape, &dev, Precision::F64);
    let lin = |w: f64| Linear {
        weight: Param::from_tensor(tensor_from_f64(&[w], [1, 1], &dev, Precision::F64)),
        bias: None,
    };
    let m = Dskd {
        query: lin(0.0),
        key: lin(0.7),
        s_to_t: lin(1.0),
        t_to_s: lin(1.0),
    };
    // Ground truth: token 0 at the first student position (the projection's argmax: right),
    // token 1 at the second (wrong). The projection's CE averages -ln p over both; the
    // student-space KL counts only the first position, where the student's (0, 0) is
    // KL = ln 2 - H(p) (the old, unmasked mean would be half of that).
    let out = m.forward(
        f(&[1.0, 3.0], [1, 2, 1]),
        f(&[2.0], [1, 1, 1]),
        f(&[0.0, 0.0, 4.0, 0.0], [1, 2, 2]),
        f(&[0.0, 0.0], [1, 1, 2]),
        tensor_from_f64(&[1.0, -1.0], [1, 2], &dev, Precision::F64),
        tensor_from_f64(&[1.0, 0.0], [1, 2], &dev, Precision::F64),
        Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1], [1, 2]), &dev),
        bool_tensor(&[true, true], [1, 2], &dev),
    );
    let kl_t = (1.0 + 2f64.exp()).ln() - 1.0 - 2f64.ln();
    let s = 1.0 / (1.0 + (-4f64).exp());
    let entropy = -(s * s.ln() + (1.0 - s) * (1.0 - s).ln());
    let kl_s = 2f64.ln() - entropy;
    let ce = -(s.ln() + (1.0 - s).ln()) / 2.0;
    close(to_vec_f64(out.ce_projected)[0], ce, "projection CE");
    close(
        to_vec_f64(out.kl_teacher_space)[0],
        kl_t,
        "teacher-space KL",
    );
    close(
        to_vec_f64(out.kl_student_space)[0],
        kl_s,
        "student-space KL",
    );
    close(to_vec_f64(out.loss)[0], kl_t + ce + kl_s, "total");
}

#[test]
fn emkd_by_hand() {
    // Teacher (width 3) vision tokens t0 = (1, 0, 0), t1 = (0, 1, 0); student (width 2)
    // s0 = (0, 2), s1 = (3, 0). Vision logits: teacher t0 (0, 0), t1 (ln 3, 0); student
    // s0 (0, ln 3), s1 (ln 3, 0).
    // Matching on the logits' L1 distance: s0-t0 ln 3, s0-t1 2 ln 3, s1-t0 ln 3, s1-t1 0, so
    // Hungarian keeps s0-t0, s1-t1 (total ln 3 against 3 ln 3). Matching the hidden states
    // instead would swap them (L1 s0-t1 + s1-t0 = 3 + 3 < 3 + 5 in any common width).
    // VLAD, each model in its own space: student text (1, 1)/sqrt 2 against s0, s1 normalised
    // ((0, 1), (1, 0)): affinities (r, r), r = 1/sqrt 2; teacher text (0, 1, 0) against the
    // matched t0, t1: (0, 1). Differences r and r - 1, both below 1: smooth-L1 = mean d^2 / 2.
    // VSD: s0 softmax(0, ln 3) = (1/4, 3/4) against t0's (1/2, 1/2): reverse KL(p_s || p_t) =
    // (1/4) ln(1/2) + (3/4) ln(3/2) = (3/4) ln 3 - ln 2 (the forward KL would be
    // ln 2 - (ln 3) / 2); s1 and t1 have the same distribution: 0. Mean over the two tokens.
    let dev = Device::flex();
    let f = |v: &[f64], shape: [usize; 3]| tensor_from_f64(v, shape, &dev, Precision::F64);
    let ln3 = 3f64.ln();
    let out = emkd_loss(
        f(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [1, 2, 3]),
        f(&[0.0, 2.0, 3.0, 0.0], [1, 2, 2]),
        f(&[0.0, 1.0, 0.0], [1, 1, 3]),
        f(&[1.0, 1.0], [1, 1, 2]),
        f(&[0.0, 0.0, ln3, 0.0], [1, 2, 2]),
        f(&[0.0, ln3, ln3, 0.0], [1, 2, 2]),
        1.0,
        2.0,
    );
    assert_eq!(out.matching, vec![vec![0, 1]]);
    let r = 0.5f64.sqrt();
    let vad = (r * r / 2.0 + (r - 1.0).powi(2) / 2.0) / 2.0;
    close(to_vec_f64(out.vad)[0], vad, "VLAD");
    let vsd = (0.75 * ln3 - 2f64.ln()) / 2.0;
    close(to_vec_f64(out.vsd)[0], vsd, "VSD");
    close(to_vec_f64(out.loss)[0], vad + 2.0 * vsd, "weighted total");
}
