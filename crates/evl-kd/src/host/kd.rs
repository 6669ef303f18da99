//! The fused vanilla-KD kernel ([`crate::baselines::kd`] gives the function): per row, both
//! softmaxes, the KL and both gradients in closed form, in the inputs' precision.

use crate::host::{Real, Surrogate, host_vec, sum};
use burn::tensor::Tensor;
use evl_models::device::Precision;

/// `softmax(z / T)` into `out` (vectorised exp); returns the log of the normaliser including
/// the max shift, so `log p_k = z_k / T - that`.
#[inline(always)] // into `simd`'s dispatch (`KdRow`)
fn softmax_into<T: Real>(z: &[T], out: &mut [T], inv_t: T) -> T {
    let m = z.iter().fold(T::neg_infinity(), |m, &x| m.max(x * inv_t));
    for (o, &x) in out.iter_mut().zip(z) {
        *o = (x * inv_t - m).exp_fast();
    }
    let s = sum(out);
    let inv = T::one() / s;
    out.iter_mut().for_each(|o| *o *= inv);
    m + s.ln()
}

/// One row of the fused KD kernel: the row's KL, with the student's (and, if `want_t`, the
/// teacher's) gradient written over `gs` (`gt`), compiled for this CPU's vector width
/// (`crate::host::simd`).
struct KdRow<'a, T> {
    za: &'a [T],
    zb: &'a [T],
    gs: &'a mut [T],
    gt: &'a mut [T],
    inv_t: T,
    scale: T,
    want_t: bool,
}

impl<T: Real> pulp::WithSimd for KdRow<'_, T> {
    type Output = T;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> T {
        let Self {
            za,
            zb,
            gs,
            gt,
            inv_t,
            scale,
            want_t,
        } = self;
        let c = za.len();
        let (la, lb) = (softmax_into(za, gs, inv_t), softmax_into(zb, gt, inv_t));
        // log p_t - log p_s, exact from the logits
        let shift = la - lb;
        let mut kl = T::zero();
        for k in 0..c {
            kl += gt[k] * ((zb[k] - za[k]) * inv_t + shift);
        }
        for k in 0..c {
            gs[k] = scale * (gs[k] - gt[k]);
        }
        if want_t {
            for k in 0..c {
                gt[k] = scale * gt[k] * ((zb[k] - za[k]) * inv_t + shift - kl);
            }
        }
        kl
    }
}

/// [`crate::baselines::kd_vanilla`]'s fused form in the inputs' precision.
pub(crate) fn kd_fused(zs: &Tensor<2>, zt: &Tensor<2>, temperature: f64) -> Tensor<1> {
    match evl_models::device::precision_of(zs) {
        Precision::F32 => kd_in::<f32>(zs, zt, temperature),
        Precision::F64 => kd_in::<f64>(zs, zt, temperature),
    }
}

/// The fused KD loss in `T`, rows in parallel.
fn kd_in<T: Real>(zs: &Tensor<2>, zt: &Tensor<2>, temperature: f64) -> Tensor<1> {
    use rayon::prelude::*;
    let [n, c] = zs.dims();
    assert_eq!(
        zs.dims(),
        zt.dims(),
        "kd_vanilla: logits of different shapes"
    );
    let (a, b) = (host_vec::<T, 2>(zs), host_vec::<T, 2>(zt));
    // the teacher's gradient only when it is tracked (DSKD passes detached targets)
    let want_t = zt.is_tracked();
    let mut gs = vec![T::zero(); n * c];
    let mut gt = vec![T::zero(); n * c];
    let inv_t = T::of(1.0 / temperature);
    let scale = T::of(temperature / n.max(1) as f64);
    let rows: f64 = gs
        .par_chunks_mut(c.max(1))
        .zip(gt.par_chunks_mut(c.max(1)))
        .enumerate()
        .map(|(r, (gs, gt))| {
            crate::host::simd(KdRow {
                za: &a[r * c..(r + 1) * c],
                zb: &b[r * c..(r + 1) * c],
                gs,
                gt,
                inv_t,
                scale,
                want_t,
            })
            .wide()
        })
        .sum();
    let mut sg = Surrogate::new(rows * temperature * temperature / n.max(1) as f64, zs);
    sg.grad_vec(zs, gs);
    sg.grad_vec(zt, gt);
    sg.finish()
}
