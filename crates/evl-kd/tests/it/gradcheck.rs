//! Central finite differences (f64) against autodiff, for the losses without fixtures.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use evl_kd::baselines::{
    Dskd, MultiLevelOtConfig, SharedVocab, emkd_loss, multilevel_ot_loss, rkd_loss,
    tinybert_hidden_loss, uld_loss,
};
use evl_models::device::{Precision, bool_tensor, tensor_from_f64, to_vec_f64};

/// Deterministic pseudo-normal values.
pub fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            (u - 0.5) * 3.0
        })
        .collect()
}

/// Checks d loss / d input for every input of `f` (given as host values and shapes).
fn check<const D: usize>(
    inputs: &[(Vec<f64>, [usize; D])],
    f: impl Fn(&[Tensor<D>]) -> Tensor<1>,
    rtol: f64,
) {
    check_inputs(inputs, f, rtol, &(0..inputs.len()).collect::<Vec<_>>());
}

/// As [`check`], for the inputs listed in `which` only (the others may feed detached paths).
fn check_inputs<const D: usize>(
    inputs: &[(Vec<f64>, [usize; D])],
    f: impl Fn(&[Tensor<D>]) -> Tensor<1>,
    rtol: f64,
    which: &[usize],
) {
    let dev = Device::flex().autodiff();
    let ts: Vec<Tensor<D>> = inputs
        .iter()
        .map(|(v, s)| tensor_from_f64(v, *s, &dev, Precision::F64).require_grad())
        .collect();
    let loss = f(&ts);
    let g = loss.backward();
    let plain = Device::flex();
    let eval = |vals: &[Vec<f64>]| -> f64 {
        let ts: Vec<Tensor<D>> = vals
            .iter()
            .zip(inputs)
            .map(|(v, (_, s))| tensor_from_f64(v, *s, &plain, Precision::F64))
            .collect();
        to_vec_f64(f(&ts))[0]
    };
    let h = 1e-6;
    for (k, t) in ts.iter().enumerate().filter(|(k, _)| which.contains(k)) {
        let grad = to_vec_f64(t.grad(&g).unwrap_or_else(|| t.zeros_like()));
        for i in 0..grad.len() {
            let mut vals: Vec<Vec<f64>> = inputs.iter().map(|(v, _)| v.clone()).collect();
            vals[k][i] += h;
            let up = eval(&vals);
            vals[k][i] -= 2.0 * h;
            let down = eval(&vals);
            let fd = (up - down) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() <= 1e-7 + rtol * fd.abs(),
                "input {k} element {i}: autodiff {} vs finite difference {fd}",
                grad[i]
            );
        }
    }
}

#[test]
fn tinybert_hidden_gradient() {
    let inputs = [
        (values(2 * 5 * 3, 1), [2, 5, 3]),
        (values(2 * 7 * 4, 2), [2, 7, 4]),
    ];
    let w = values(12, 3);
    check(
        &inputs,
        |t| {
            let w = tensor_from_f64(&w, [3, 4], &t[0].device(), Precision::F64);
            tinybert_hidden_loss(t[0].clone(), t[1].clone(), w, None)
        },
        1e-6,
    );
}

#[test]
fn rkd_gradient() {
    let inputs = [
        (values(2 * 4 * 3, 4), [2, 4, 3]),
        (values(2 * 4 * 3, 5), [2, 4, 3]),
    ];
    check(
        &inputs,
        |t| rkd_loss(t[0].clone(), t[1].clone(), 1.0, 2.0),
        1e-5,
    );
}

#[test]
fn multilevel_ot_token_terms_gradient() {
    // The sequence-level term uses a detached plan (not the gradient of the re-solved OT),
    // so the finite-difference check covers the token-level terms.
    let inputs = [
        (values(2 * 3 * 6, 6), [2, 3, 6]),
        (values(2 * 4 * 5, 7), [2, 4, 5]),
    ];
    let cfg = MultiLevelOtConfig {
        top_k: 4,
        w_sequence: 0.0,
        ..MultiLevelOtConfig::default()
    };
    check(
        &inputs,
        |t| multilevel_ot_loss(t[0].clone(), t[1].clone(), &cfg).loss,
        1e-5,
    );
}

#[test]
fn multilevel_ot_sequence_term_is_transport_cost() {
    let dev = Device::flex();
    let z = tensor_from_f64(&values(12, 8), [1, 3, 4], &dev, Precision::F64);
    // Identical sequences: sorted vectors coincide pairwise, but the entropic plan spreads
    // mass, so the cost is small yet positive; the token terms reduce to the self-entropy.
    let out = multilevel_ot_loss(
        z.clone(),
        z,
        &MultiLevelOtConfig {
            top_k: 4,
            ..Default::default()
        },
    );
    assert_eq!(to_vec_f64(out.token_l1)[0], 0.0);
    let seq = to_vec_f64(out.sequence_ot)[0];
    assert!(seq >= 0.0 && seq.is_finite());
}

#[test]
fn uld_gradient_matches_finite_differences() {
    let inputs = [(values(3 * 5, 9), [3, 5]), (values(3 * 7, 10), [3, 7])];
    check(
        &inputs,
        |t| uld_loss(t[0].clone(), t[1].clone(), 1.5, 1.0).loss,
        1e-5,
    );
}

#[test]
fn dskd_gradient() {
    // Projections as f64 parameters (modules initialise in the device's default f32).
    let lin = |i: usize, o: usize, seed: u64, d: &Device| Linear {
        weight: Param::from_tensor(tensor_from_f64(
            &values(i * o, seed),
            [i, o],
            d,
            Precision::F64,
        )),
        bias: None,
    };
    let head_s = values(4 * 6, 11);
    let head_t = values(5 * 7, 12);
    let inputs = [
        (values(2 * 3 * 4, 13), [2, 3, 4]),
        (values(2 * 4 * 5, 14), [2, 4, 5]),
        (values(2 * 3 * 6, 15), [2, 3, 6]),
        (values(2 * 4 * 7, 16), [2, 4, 7]),
    ];
    let run_with = |t: &[Tensor<3>], y: &[i64]| {
        let d = t[0].device();
        let m = Dskd {
            query: lin(5, 3, 30, &d),
            key: lin(4, 3, 31, &d),
            s_to_t: lin(4, 5, 32, &d),
            t_to_s: lin(5, 4, 33, &d),
        };
        let hs_ = tensor_from_f64(&head_s, [4, 6], &d, Precision::F64);
        let ht_ = tensor_from_f64(&head_t, [5, 7], &d, Precision::F64);
        m.forward(
            t[0].clone(),
            t[1].clone(),
            t[2].clone(),
            t[3].clone(),
            hs_,
            ht_,
            Tensor::<2, Int>::from_data(TensorData::new(y.to_vec(), [2, 3]), &d),
            bool_tensor(&[true, true, false, true, true, true], [2, 3], &d),
        )
    };
    // Ground truth: the projection's own prediction at rows 0, 3 and 4 (they teach), another
    // token at rows 1 and 5 (they do not), row 2 outside the answer.
    let d0 = Device::flex();
    let t0: Vec<Tensor<3>> = inputs
        .iter()
        .map(|(v, s)| tensor_from_f64(v, *s, &d0, Precision::F64))
        .collect();
    let pred: Vec<i64> = run_with(&t0, &[0; 6])
        .teacher_in_student_space
        .argmax(1)
        .into_data()
        .iter::<i64>()
        .collect();
    let y: Vec<i64> = (0..6)
        .map(|i| {
            if [1, 5].contains(&i) {
                (pred[i] + 1) % 6
            } else {
                pred[i]
            }
        })
        .collect();
    let run = |t: &[Tensor<3>]| run_with(t, &y);
    // The projection's ground-truth CE: gradient into the student and teacher hidden
    // states (through the attention and the projections).
    check_inputs(&inputs, |t| run(t).ce_projected, 1e-5, &[0, 1]);
    // Teacher-space KL: its target (teacher logits, input 3) is detached.
    check_inputs(&inputs, |t| run(t).kl_teacher_space, 1e-5, &[0, 1]);
    // Student-space KL: its target (projected teacher) is detached; only zs carries gradient.
    check_inputs(&inputs, |t| run(t).kl_student_space, 1e-5, &[2]);
}

#[test]
fn emkd_gradient_and_matching() {
    // Teacher width 4, student width 3: each affinity stays in its own model's space.
    let inputs = [
        (values(5 * 4, 17), [1, 5, 4]),
        (values(3 * 3, 18), [1, 3, 3]),
        (values(4 * 4, 19), [1, 4, 4]),
        (values(2 * 3, 20), [1, 2, 3]),
        (values(5 * 6, 21), [1, 5, 6]),
        (values(3 * 6, 22), [1, 3, 6]),
    ];
    check(
        &inputs,
        |t| {
            emkd_loss(
                t[0].clone(),
                t[1].clone(),
                t[2].clone(),
                t[3].clone(),
                t[4].clone(),
                t[5].clone(),
                1.0,
                1.0,
            )
            .loss
        },
        1e-5,
    );
    // Matching reads the vision logits: a student token whose logits equal teacher token 3's
    // is matched to it.
    let dev = Device::flex();
    let mut tv = values(5 * 6, 23);
    tv[18..24].copy_from_slice(&[10.0, -2.0, 3.0, 10.0, 0.5, 1.0]);
    let t = tensor_from_f64(&tv, [1, 5, 6], &dev, Precision::F64);
    let s = tensor_from_f64(&tv[18..24], [1, 1, 6], &dev, Precision::F64);
    assert_eq!(evl_kd::baselines::match_vision_tokens(t, s), vec![vec![3]]);
}

#[test]
fn shared_vocab_maps_equal_surface_strings() {
    let s: Vec<String> = ["<pad>", "Ġnormal", "ST", "x"].map(String::from).to_vec();
    let t: Vec<String> = ["▁normal", "ST", "<unk>"].map(String::from).to_vec();
    let v = SharedVocab::new(&s, &t);
    assert_eq!(v.student_ids, vec![1, 2]);
    assert_eq!(v.teacher_ids, vec![0, 1]);
    // Identical logits on the shared tokens: KD is zero whatever the other tokens say.
    let dev = Device::flex();
    let zs = tensor_from_f64(&[9.0, 1.0, 2.0, -3.0], [1, 4], &dev, Precision::F64);
    let zt = tensor_from_f64(&[1.0, 2.0, 5.0], [1, 3], &dev, Precision::F64);
    assert!(to_vec_f64(v.kd(zs, zt, 1.0))[0].abs() < 1e-15);
}
