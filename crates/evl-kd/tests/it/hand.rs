//! Hand-worked values for the baselines without reference fixtures: tiny inputs whose loss
//! is derived in the comments (finite differences check gradients against the value; these
//! check the value itself).

use evl_kd::baselines::{MultiLevelOtConfig, multilevel_ot_loss, rkd_loss, tinybert_hidden_loss};
use evl_models::burn::tensor::Device;
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
