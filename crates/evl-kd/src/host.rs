//! Host-side pieces shared by the fused loss kernels: matrix products in the inputs'
//! precision, and the scalar "surrogate" that carries a host-computed gradient into burn's
//! autodiff graph.
//!
//! Why fused host kernels: on burn's `flex` CPU backend a loss written as a chain of tensor
//! ops pays per-op dispatch and materialises every intermediate (BENCHMARKS.md, issue 3).
//! For the losses whose forward and backward we can write in closed form (relation, OT), one
//! host pass computes the value and the exact gradient with a few GEMMs, and
//! [`Surrogate`] hands the gradient to autodiff. This is the only place that knows the trick.

use burn::tensor::Tensor;
use evl_models::device::{Precision, tensor_like};
use ndarray::{ArrayView2, ArrayViewMut2, linalg::general_mat_mul};

/// `C (m x n) = A (m x k) B^T` where `B` is `n x k`, all row-major `f64` on input and output,
/// multiplied in `prec` (f32 GEMM for f32 tensors: twice the throughput; the callers keep
/// every cancellation-prone quantity out of the product, see `relation`).
pub(crate) fn matmul_nt(
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
    prec: Precision,
) -> Vec<f64> {
    gemm(a, b, m, k, n, true, prec)
}

/// `C (m x n) = A (m x k) B` where `B` is `k x n`.
pub(crate) fn matmul_nn(
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
    prec: Precision,
) -> Vec<f64> {
    gemm(a, b, m, k, n, false, prec)
}

fn gemm(
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
    b_transposed: bool,
    prec: Precision,
) -> Vec<f64> {
    // ndarray's matrixmultiply (runtime-dispatched AVX2/FMA kernels). burn's own flex matmul
    // through temporary tensors measured 25% slower here (relation, paper shapes).
    let b_shape = if b_transposed { (n, k) } else { (k, n) };
    match prec {
        Precision::F64 => {
            let mut c = vec![0.0; m * n];
            mm(a, b, (m, k), b_shape, b_transposed, &mut c);
            c
        }
        Precision::F32 => {
            let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
            let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            let mut c = vec![0.0f32; m * n];
            mm(&a32, &b32, (m, k), b_shape, b_transposed, &mut c);
            c.into_iter().map(f64::from).collect()
        }
    }
}

fn mm<T: ndarray::LinalgScalar>(
    a: &[T],
    b: &[T],
    a_shape: (usize, usize),
    b_shape: (usize, usize),
    b_transposed: bool,
    c: &mut [T],
) {
    let a = ArrayView2::from_shape(a_shape, a).expect("A matches its shape");
    let b = ArrayView2::from_shape(b_shape, b).expect("B matches its shape");
    let b = if b_transposed { b.t() } else { b };
    let mut c = ArrayViewMut2::from_shape((a_shape.0, b.ncols()), c).expect("C matches");
    general_mat_mul(T::one(), &a, &b, T::zero(), &mut c);
}

/// A scalar whose forward value is computed on the host and whose gradient with respect to
/// each registered tensor is a host-computed array: `value + sum_k (x_k . g_k) - detach(same)`.
/// The added term is exactly zero in the forward pass and has gradient `g_k` with respect to
/// `x_k`, so burn's autodiff routes the host gradient (times any upstream factor) into `x_k`.
pub(crate) struct Surrogate {
    value: f64,
    like: Tensor<1>,
    acc: Option<Tensor<1>>,
}

impl Surrogate {
    /// A surrogate holding `value` (dtype and device of `like`).
    pub(crate) fn new<const D: usize>(value: f64, like: &Tensor<D>) -> Self {
        Self {
            value,
            like: tensor_like(&[0.0], [1], like),
            acc: None,
        }
    }

    /// Registers `grad` (same shape as `x`, row-major) as the gradient with respect to `x`;
    /// ignored when `x` is not tracked by autodiff.
    pub(crate) fn grad<const D: usize>(&mut self, x: &Tensor<D>, grad: &[f64]) {
        if !x.is_tracked() {
            return;
        }
        let g = tensor_like(grad, x.dims(), x);
        let term = (x.clone() * g).sum();
        self.acc = Some(match self.acc.take() {
            Some(a) => a + term,
            None => term,
        });
    }

    /// The differentiable scalar `[1]`.
    pub(crate) fn finish(self) -> Tensor<1> {
        let value = tensor_like(&[self.value], [1], &self.like);
        match self.acc {
            Some(acc) => value + (acc.clone() - acc.detach()),
            None => value,
        }
    }
}
