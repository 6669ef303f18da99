//! No NaN or Inf at the edges: tiny eps, huge inputs, one token, identical tokens, fully
//! masked rows, batch 1; in f32 and f64, detached and unrolled.

use crate::gradcheck::values;
use burn::tensor::{Device, Tensor};
use evl_kd::sinkhorn::{PlanGradient, Stop};
use evl_kd::{
    MhcaWeights, OtLossConfig, RelationConfig, mhca_forward, mhca_loss, ot_loss, relation_loss,
};
use evl_models::device::{Precision, bool_tensor, tensor_from_f64, to_vec_f64};

fn finite(v: &[f64]) -> bool {
    v.iter().all(|x| x.is_finite())
}

fn ot_case(
    t: &[f64],
    ts: [usize; 3],
    s: &[f64],
    ss: [usize; 3],
    eps: f64,
    masks: Option<(&[bool], &[bool])>,
) -> Vec<(f64, bool)> {
    let mut out = Vec::new();
    for p in [Precision::F32, Precision::F64] {
        for gradient in [PlanGradient::Detached, PlanGradient::Unrolled] {
            let dev = Device::flex().autodiff();
            let tt = tensor_from_f64(t, ts, &dev, p).require_grad();
            let st = tensor_from_f64(s, ss, &dev, p).require_grad();
            let m = masks.map(|(a, b)| {
                (
                    bool_tensor(a, [ts[0], ts[1]], &dev),
                    bool_tensor(b, [ss[0], ss[1]], &dev),
                )
            });
            let cfg = OtLossConfig {
                eps,
                stop: Stop::Iterations(200),
                gradient,
                norm_eps: 1e-12,
                ..OtLossConfig::default()
            };
            let o = ot_loss(
                tt.clone(),
                st.clone(),
                m.as_ref().map(|m| &m.0),
                m.as_ref().map(|m| &m.1),
                &cfg,
            );
            let g = o.loss.backward();
            let loss = to_vec_f64(o.loss)[0];
            let ok = loss.is_finite()
                && finite(&to_vec_f64(tt.grad(&g).expect("grad t")))
                && finite(&to_vec_f64(st.grad(&g).expect("grad s")))
                && finite(&o.plan);
            out.push((loss, ok));
        }
    }
    out
}

#[test]
fn ot_tiny_eps_and_large_inputs_stay_finite() {
    let t = values(2 * 6 * 4, 1);
    let s = values(2 * 3 * 4, 2);
    for (loss, ok) in ot_case(&t, [2, 6, 4], &s, [2, 3, 4], 0.005, None) {
        assert!(ok && (0.0..=4.0).contains(&loss), "eps 0.005: loss {loss}");
    }
    let big: Vec<f64> = t.iter().map(|x| x * 1e4).collect();
    for (loss, ok) in ot_case(&big, [2, 6, 4], &s, [2, 3, 4], 0.1, None) {
        assert!(ok && loss.is_finite());
    }
}

#[test]
fn ot_one_token_and_identical_tokens() {
    // One token on each side: the plan is 1 and the loss is the cost.
    let t = [1.0, 0.0];
    let s = [0.0, 2.0];
    for (loss, ok) in ot_case(&t, [1, 1, 2], &s, [1, 1, 2], 0.1, None) {
        assert!(ok && (loss - 2.0).abs() < 1e-5, "one token: {loss}");
    }
    // Identical directions: zero cost.
    let t = [1.0, 2.0, 2.0, 4.0, 3.0, 6.0];
    let s = [0.5, 1.0, 5.0, 10.0];
    for (loss, ok) in ot_case(&t, [1, 3, 2], &s, [1, 2, 2], 0.1, None) {
        assert!(ok && loss.abs() < 1e-6, "identical: {loss}");
    }
}

#[test]
fn ot_fully_masked_item_is_left_out_of_the_mean() {
    let t = values(2 * 3 * 2, 3);
    let s = values(2 * 2 * 2, 4);
    let tm = [true, true, false, false, false, false]; // item 1: no teacher token
    let sm = [true, true, true, false];
    let masked = ot_case(&t, [2, 3, 2], &s, [2, 2, 2], 0.1, Some((&tm, &sm)));
    let alone = ot_case(&t[..4], [1, 2, 2], &s[..4], [1, 2, 2], 0.1, None);
    for ((lm, okm), (la, oka)) in masked.iter().zip(&alone) {
        assert!(*okm && *oka);
        assert!(
            (lm - la).abs() < 1e-5,
            "masked batch {lm} vs the valid item alone {la}"
        );
    }
    // Everything masked: loss 0, gradients 0, no NaN.
    let none = [false; 6];
    let nones = [false; 4];
    for (loss, ok) in ot_case(&t, [2, 3, 2], &s, [2, 2, 2], 0.1, Some((&none, &nones))) {
        assert!(ok && loss == 0.0);
    }
}

#[test]
fn mhca_and_relation_edges_stay_finite() {
    for p in [Precision::F32, Precision::F64] {
        let dev = Device::flex().autodiff();
        let t = |v: Vec<f64>, s: [usize; 3]| tensor_from_f64(&v, s, &dev, p).require_grad();
        let w = |s: [usize; 2], seed| {
            tensor_from_f64(&values(s[0] * s[1], seed), s, &dev, p).require_grad()
        };
        let hs = t(
            values(2 * 3 * 4, 5).iter().map(|x| x * 1e4).collect(),
            [2, 3, 4],
        );
        let ht = t(values(2 * 2 * 6, 6), [2, 2, 6]);
        let wts = MhcaWeights {
            wq: w([4, 4], 7),
            wk: w([6, 4], 8),
            wv: w([6, 4], 9),
            wo: w([4, 4], 10),
        };
        let keys = bool_tensor(&[true, true, false, false], [2, 2], &dev); // item 1: no valid key
        let hhat = mhca_forward(hs.clone(), ht.clone(), &wts, 2, Some(&keys));
        let loss = mhca_loss(hs.clone(), hhat.clone(), None);
        let rel = relation_loss(hhat, hs.clone(), None, &RelationConfig::default());
        let total: Tensor<1> = loss.clone() + rel.l_rel;
        let g = total.backward();
        assert!(finite(&to_vec_f64(total)) && finite(&to_vec_f64(hs.grad(&g).expect("grad"))));
        // No valid student token: the loss is 0.
        let none = bool_tensor(&[false; 6], [2, 3], &dev);
        assert_eq!(
            to_vec_f64(mhca_loss(
                hs.clone(),
                hs.clone().mul_scalar(0.5),
                Some(&none)
            )),
            vec![0.0]
        );
        // Identical tokens and a single token in the relation loss.
        let same = t(vec![1.0; 3 * 4], [1, 3, 4]);
        let r = relation_loss(same.clone(), same.clone(), None, &RelationConfig::default());
        let g = r.l_rel.backward();
        assert!(finite(&to_vec_f64(r.l_rel)) && finite(&to_vec_f64(same.grad(&g).expect("grad"))));
        let one = t(vec![1.0, 2.0], [1, 1, 2]);
        let r = relation_loss(
            one.clone(),
            one.clone().mul_scalar(3.0),
            None,
            &RelationConfig::default(),
        );
        assert!(finite(&to_vec_f64(r.l_rel)));
    }
}
