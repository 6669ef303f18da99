//! The fused cross-attention (method.md 2.2; [`crate::mhca`] gives the function): its
//! forward pass and exact backward pass on row-major buffers in the inputs' precision `T`
//! (f32 or f64), parallel over batch items, and the fused pass over loss terms on its
//! output ([`fused_terms`]) that the objective and [`crate::mhca::mhca_align_loss`] run.
//!
//! On burn's `flex` backend the graph form spends most of its time outside the matrix
//! products (a two-`exp` softmax over `[B, h, L_s, L_t]`, fresh buffers for every
//! intermediate, the layout copies of head splitting); see BENCHMARKS.md.

use crate::host::{Real, Surrogate, gemm, host_vec, mul_into, view, view_mut};
use crate::mhca::MhcaWeights;
use burn::tensor::{Bool, Tensor};
use evl_models::device::{Precision, precision_of, to_vec_bool};
use rayon::prelude::*;

/// Shapes of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub ls: usize,
    pub ds: usize,
    pub lt: usize,
    pub dt: usize,
    pub heads: usize,
    pub dk: usize,
}

impl Dims {
    fn hdk(&self) -> usize {
        self.heads * self.dk
    }
}

/// The weights, row-major: `wq` `[ds, h dk]`, `wkv` = `[W_K | W_V]` `[dt, 2 h dk]`, `wo`
/// `[h dk, ds]`.
/// `wq_t` and `wo_t` are `W_Q^T` and `W_O^T`, for the backward products.
pub(crate) struct Weights<T> {
    pub wq: Vec<T>,
    pub wkv: Vec<T>,
    pub wo: Vec<T>,
    pub wq_t: Vec<T>,
    pub wo_t: Vec<T>,
}

impl<T: Real> Weights<T> {
    /// Joins `W_K` and `W_V` column-wise so both projections are one product, and
    /// keeps transposed copies of `W_Q` and `W_O`: the backward pass multiplies by
    /// `W_Q^T` and `W_O^T`, and `gemm` runs a transposed (column-major) right operand
    /// at about 94 instead of 114 GFLOP/s on this project's CI machine; the copies are
    /// made once per call, the products once per item.
    pub(crate) fn new(wq: Vec<T>, wk: &[T], wv: &[T], wo: Vec<T>, hdk: usize) -> Self {
        let mut wkv = Vec::with_capacity(wk.len() + wv.len());
        for (k, v) in wk.chunks_exact(hdk).zip(wv.chunks_exact(hdk)) {
            wkv.extend_from_slice(k);
            wkv.extend_from_slice(v);
        }
        let ds = wq.len() / hdk.max(1);
        let (wq_t, wo_t) = rayon::join(
            || crate::host::transpose(&wq, ds, hdk),
            || crate::host::transpose(&wo, hdk, ds),
        );
        Self {
            wq,
            wkv,
            wo,
            wq_t,
            wo_t,
        }
    }
}

/// The inputs of one call, row-major.
pub(crate) struct Inputs<'a, T> {
    pub hs: &'a [T],
    pub ht: &'a [T],
    pub w: &'a Weights<T>,
    pub key_mask: Option<&'a [bool]>,
    pub dims: Dims,
}

/// Per-item forward state.
pub(crate) struct Item<T> {
    q: Vec<T>,
    /// `K` and `V` head by head, `[h, lt, dk]` each (see [`forward_item`]).
    k: Vec<T>,
    v: Vec<T>,
    /// Attention probabilities per head, `[h, ls, lt]`.
    attn: Vec<T>,
    ctx: Vec<T>,
    /// Whether any key is valid (else attention is uniform and constant, as in the
    /// graph form's finite mask fill).
    keys: bool,
}

/// Softmax of one score row in place over the valid keys, `exp((s - max) * scale)`;
/// uniform when no key is valid. `valid` is `None` when every key is (the common case:
/// branch-free loops the compiler vectorises).
#[inline(always)] // into `simd`'s dispatch (`SoftmaxRows`)
fn softmax_row<T: Real>(row: &mut [T], valid: Option<&[bool]>, any_valid: bool, scale: T) {
    if !any_valid {
        row.fill(T::one() / T::of(row.len() as f64));
        return;
    }
    match valid {
        None => {
            let mx = crate::host::max(row);
            for x in row.iter_mut() {
                *x = ((*x - mx) * scale).exp_fast();
            }
        }
        Some(valid) => {
            let mut mx = T::neg_infinity();
            for (&x, &v) in row.iter().zip(valid) {
                if v && x > mx {
                    mx = x;
                }
            }
            for (x, &v) in row.iter_mut().zip(valid) {
                let e = ((*x - mx) * scale).exp_fast();
                *x = if v { e } else { T::zero() };
            }
        }
    }
    let inv = T::one() / crate::host::sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `dS = A (dA - <dA, A>) * scale` in place over the valid keys. Softmax gradients sum to
/// zero, so the winner's is set to minus the others' sum: a sum of small accurate terms
/// instead of a cancelling difference (nearly one-hot rows; see
/// `evl_models::ops::log_softmax`).
#[inline(always)] // into `simd`'s dispatch (`SoftmaxGradRows`)
fn softmax_row_grad<T: Real>(drow: &mut [T], arow: &[T], valid: Option<&[bool]>, scale: T) {
    let s = crate::host::dot(drow, arow);
    for (d, &p) in drow.iter_mut().zip(arow) {
        *d = p * (*d - s) * scale;
    }
    if let Some(valid) = valid {
        for (d, &v) in drow.iter_mut().zip(valid) {
            if !v {
                *d = T::zero();
            }
        }
    }
    // the first largest probability (a packed max, then a short scan)
    let top = crate::host::max(arow);
    let arg = arow.iter().position(|&p| p == top).unwrap_or(0);
    drow[arg] = T::zero();
    let rest = crate::host::sum(drow);
    drow[arg] = -rest;
}

/// The softmax of every `lt`-wide row of `a`, in place ([`softmax_row`]), compiled for
/// this CPU's vector width (`crate::host::simd`).
struct SoftmaxRows<'a, T> {
    a: &'a mut [T],
    lt: usize,
    valid: Option<&'a [bool]>,
    keys: bool,
    scale: T,
}

impl<T: Real> pulp::WithSimd for SoftmaxRows<'_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for arow in self.a.chunks_exact_mut(self.lt) {
            softmax_row(arow, self.valid, self.keys, self.scale);
        }
    }
}

/// [`softmax_row_grad`] over every row of `d` (with the attention rows of `a`), compiled
/// for this CPU's vector width.
struct SoftmaxGradRows<'a, T> {
    d: &'a mut [T],
    a: &'a [T],
    lt: usize,
    valid: Option<&'a [bool]>,
    scale: T,
}

impl<T: Real> pulp::WithSimd for SoftmaxGradRows<'_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let rows = self
            .d
            .chunks_exact_mut(self.lt)
            .zip(self.a.chunks_exact(self.lt));
        for (drow, arow) in rows {
            softmax_row_grad(drow, arow, self.valid, self.scale);
        }
    }
}

/// Cross-attention forward pass of batch item `bi`: its cache and its `Hhat_t` rows.
pub(crate) fn forward_item<T: Real>(inp: &Inputs<'_, T>, bi: usize) -> (Item<T>, Vec<T>) {
    let Inputs {
        hs,
        ht,
        w,
        key_mask,
        dims,
    } = *inp;
    let Dims {
        ls,
        ds,
        lt,
        dt,
        heads,
        dk,
        ..
    } = dims;
    let hdk = dims.hdk();
    let scale = T::of(1.0 / (dk as f64).sqrt());
    let hs_b = &hs[bi * ls * ds..(bi + 1) * ls * ds];
    let ht_b = &ht[bi * lt * dt..(bi + 1) * lt * dt];
    let valid: Vec<bool> = (0..lt)
        .map(|j| key_mask.is_none_or(|m| m[bi * lt + j]))
        .collect();
    let keys = valid.iter().any(|&v| v);
    let masked = !valid.iter().all(|&v| v);
    let q = gemm(hs_b, (ls, ds), false, &w.wq, (ds, hdk), false);
    let kv = gemm(ht_b, (lt, dt), false, &w.wkv, (dt, 2 * hdk), false);
    // K and V split head by head into contiguous `[lt, dk]` blocks: as the transposed
    // operand of a 64-deep product (the scores, and dA in the backward pass), a column
    // block of the joint `[lt, 2 h dk]` matrix runs about 20% slower in `gemm` (its row
    // stride is 4 KiB at paper widths: cache-set aliasing); the copy costs a pass over K, V
    let by_head = |c0: usize| -> Vec<T> {
        let mut out = Vec::with_capacity(lt * hdk);
        for h in 0..heads {
            for row in kv.chunks_exact(2 * hdk) {
                out.extend_from_slice(&row[c0 + h * dk..c0 + (h + 1) * dk]);
            }
        }
        out
    };
    let (k, v) = (by_head(0), by_head(hdk));
    drop(kv);
    let mut attn = vec![T::zero(); heads * ls * lt];
    let mut ctx = vec![T::zero(); ls * hdk];
    for h in 0..heads {
        let qh = view(&q, ls, dk, hdk, h * dk);
        let kh = view(&k, lt, dk, dk, h * lt * dk);
        let vh = view(&v, lt, dk, dk, h * lt * dk);
        let a = &mut attn[h * ls * lt..(h + 1) * ls * lt];
        // scores straight into the attention buffer, then softmax in place
        mul_into(&qh, &kh.t(), &mut view_mut(a, ls, lt, lt, 0));
        crate::host::simd(SoftmaxRows {
            a: &mut *a,
            lt,
            valid: masked.then_some(&valid[..]),
            keys,
            scale,
        });
        let a = view(a, ls, lt, lt, 0);
        mul_into(&a, &vh, &mut view_mut(&mut ctx, ls, dk, hdk, h * dk));
    }
    let hhat = gemm(&ctx, (ls, hdk), false, &w.wo, (hdk, ds), false);
    (
        Item {
            q,
            k,
            v,
            attn,
            ctx,
            keys,
        },
        hhat,
    )
}

/// Gradients of a scalar with respect to every input, row-major like the inputs.
pub(crate) struct Grads<T> {
    pub hs: Vec<T>,
    /// Empty unless asked for.
    pub ht: Vec<T>,
    pub wq: Vec<T>,
    pub wk: Vec<T>,
    pub wv: Vec<T>,
    pub wo: Vec<T>,
}

fn add<T: Real>(acc: &mut [T], x: &[T]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += *b);
}

/// One item's gradients (see [`backward_item`]); the weight gradients are its shares.
pub(crate) struct Part<T> {
    pub hs: Vec<T>,
    pub ht: Vec<T>,
    pub wq: Vec<T>,
    pub wkv: Vec<T>,
    pub wo: Vec<T>,
}

/// Back-propagates item `bi`'s `g_b = dL/dHhat_t[bi]` (`[ls, ds]`) through its cache.
pub(crate) fn backward_item<T: Real>(
    inp: &Inputs<'_, T>,
    it: &Item<T>,
    bi: usize,
    g_b: &[T],
    want_ht: bool,
) -> Part<T> {
    let Dims {
        ls,
        ds,
        lt,
        dt,
        heads,
        dk,
        ..
    } = inp.dims;
    let (hdk, w) = (inp.dims.hdk(), inp.w);
    let scale = T::of(1.0 / (dk as f64).sqrt());
    let hs_b = &inp.hs[bi * ls * ds..(bi + 1) * ls * ds];
    let ht_b = &inp.ht[bi * lt * dt..(bi + 1) * lt * dt];
    let valid: Vec<bool> = (0..lt)
        .map(|j| inp.key_mask.is_none_or(|m| m[bi * lt + j]))
        .collect();
    let masked = !valid.iter().all(|&v| v);
    let wo_g = gemm(&it.ctx, (ls, hdk), true, g_b, (ls, ds), false);
    let dctx = gemm(g_b, (ls, ds), false, &w.wo_t, (ds, hdk), false);
    let mut dq = vec![T::zero(); ls * hdk];
    let mut dkv = vec![T::zero(); lt * 2 * hdk];
    let mut d_s = vec![T::zero(); ls * lt];
    for h in 0..heads {
        let a = &it.attn[h * ls * lt..(h + 1) * ls * lt];
        let av = view(a, ls, lt, lt, 0);
        let dch = view(&dctx, ls, dk, hdk, h * dk);
        let vh = view(&it.v, lt, dk, dk, h * lt * dk);
        mul_into(
            &av.t(),
            &dch,
            &mut view_mut(&mut dkv, lt, dk, 2 * hdk, hdk + h * dk),
        );
        if !it.keys {
            continue; // constant attention: no gradient to Q or K
        }
        // dA, then dS in place
        mul_into(&dch, &vh.t(), &mut view_mut(&mut d_s, ls, lt, lt, 0));
        crate::host::simd(SoftmaxGradRows {
            d: &mut d_s,
            a,
            lt,
            valid: masked.then_some(&valid[..]),
            scale,
        });
        let qh = view(&it.q, ls, dk, hdk, h * dk);
        let kh = view(&it.k, lt, dk, dk, h * lt * dk);
        let dsv = view(&d_s, ls, lt, lt, 0);
        mul_into(&dsv, &kh, &mut view_mut(&mut dq, ls, dk, hdk, h * dk));
        mul_into(
            &dsv.t(),
            &qh,
            &mut view_mut(&mut dkv, lt, dk, 2 * hdk, h * dk),
        );
    }
    Part {
        hs: gemm(&dq, (ls, hdk), false, &w.wq_t, (hdk, ds), false),
        ht: if want_ht {
            gemm(&dkv, (lt, 2 * hdk), false, &w.wkv, (dt, 2 * hdk), true)
        } else {
            Vec::new()
        },
        wq: gemm(hs_b, (ls, ds), true, &dq, (ls, hdk), false),
        wkv: gemm(ht_b, (lt, dt), true, &dkv, (lt, 2 * hdk), false),
        wo: wo_g,
    }
}

/// The weight gradients summed over the items' parts in parallel over row blocks, W_K and
/// W_V read straight out of the joint `[W_K | W_V]` block (no column-split copy); `hs` and
/// `ht` are the input gradients as the caller assembled them.
pub(crate) fn weight_grads<T: Real>(
    dims: Dims,
    parts: &[Part<T>],
    hs: Vec<T>,
    ht: Vec<T>,
) -> Grads<T> {
    let (ds, dt, hdk) = (dims.ds, dims.dt, dims.hdk());
    let sum_parts = |get: fn(&Part<T>) -> &[T], rows: usize, stride: usize, c0: usize, w: usize| {
        let mut acc = vec![T::zero(); rows * w];
        let block = (1 << 14) / w.max(1) + 1; // rows per task
        acc.par_chunks_mut(block * w)
            .enumerate()
            .for_each(|(c, chunk)| {
                for p in parts {
                    let src = get(p);
                    for (r, dst) in chunk.chunks_exact_mut(w).enumerate() {
                        let row = (c * block + r) * stride + c0;
                        add(dst, &src[row..row + w]);
                    }
                }
            });
        acc
    };
    Grads {
        hs,
        ht,
        wq: sum_parts(|p| &p.wq, ds, hdk, 0, hdk),
        wk: sum_parts(|p| &p.wkv, dt, 2 * hdk, 0, hdk),
        wv: sum_parts(|p| &p.wkv, dt, 2 * hdk, hdk, hdk),
        wo: sum_parts(|p| &p.wo, hdk, ds, 0, ds),
    }
}

/// One item's share of `L_mhca` (the masked mean of `||H_s - Hhat_t||^2` over the
/// batch's `n_valid` valid student tokens), adding `weight` times its gradients into
/// `g_hhat` and `g_hs`. `hs`, `hhat` are the item's `[ls, ds]` rows, `valid` its student
/// mask row. Each row's squared error is summed in eight lanes, the rows in token order.
pub(crate) fn loss_item(
    (hs, hhat): (&[f64], &[f64]),
    ds: usize,
    valid: Option<&[bool]>,
    n_valid: usize,
    weight: f64,
    (g_hhat, g_hs): (&mut [f64], &mut [f64]),
) -> f64 {
    if n_valid == 0 {
        return 0.0;
    }
    let n = n_valid as f64;
    let rows = hs
        .chunks_exact(ds.max(1))
        .zip(hhat.chunks_exact(ds.max(1)))
        .zip(g_hs.chunks_exact_mut(ds.max(1)))
        .zip(g_hhat.chunks_exact_mut(ds.max(1)));
    let mut total = 0.0;
    for (t, (((h, hh), gs), gh)) in rows.enumerate() {
        if valid.is_some_and(|v| !v[t]) {
            continue;
        }
        let mut acc = [0.0; 8];
        for (k, (((&a, &b), s), o)) in h
            .iter()
            .zip(hh)
            .zip(gs.iter_mut())
            .zip(gh.iter_mut())
            .enumerate()
        {
            let e = a - b;
            let g = weight * (2.0 * e / n);
            *s += g;
            *o -= g;
            acc[k % 8] += e * e;
        }
        total += acc.iter().sum::<f64>();
    }
    total / n
}

/// What a fused pass computes on each item's `Hhat_t`: `(bi, (H_s rows, Hhat_t rows),
/// (dL/dHhat_t, dL/dH_s))` -> the item's shares of up to two loss terms, with their weighted
/// gradients added into the two (zeroed, `[ls, ds]`, f64) gradient buffers.
pub(crate) type ItemTerms<'a> =
    dyn Fn(usize, (&[f64], &[f64]), (&mut [f64], &mut [f64])) -> [f64; 2] + Sync + 'a;

/// The fused CPU pass over the cross-attention and loss terms on its output, one batch item
/// at a time, items in parallel: forward, `terms` on the item's `Hhat_t` and `H_s` (in f64),
/// back-propagation of their gradient through the item's cache, all before the next item,
/// so no batch-wide intermediate is ever built. Returns the two terms' values (summed over
/// items, in item order) and the differentiable scalar `lambdas . values`, which carries
/// the exact gradients into autodiff.
pub(crate) fn fused_terms(
    (hs, ht): (&Tensor<3>, &Tensor<3>),
    w: &MhcaWeights,
    n_heads: usize,
    key_mask: Option<&Tensor<2, Bool>>,
    lambdas: [f64; 2],
    terms: &ItemTerms<'_>,
) -> ([f64; 2], Tensor<1>) {
    let [b, ls, ds] = hs.dims();
    let [bt, lt, dt] = ht.dims();
    let [_, hdk] = w.wq.dims();
    assert!(
        b == bt && n_heads > 0 && hdk % n_heads == 0,
        "mhca: batch {b} vs {bt}, width {hdk} into {n_heads} heads"
    );
    let dims = Dims {
        b,
        ls,
        ds,
        lt,
        dt,
        heads: n_heads,
        dk: hdk / n_heads,
    };
    let key_mask = key_mask.map(|m| to_vec_bool(m.clone()));
    let args = ((hs, ht), w, key_mask.as_deref(), dims, lambdas, terms);
    match precision_of(hs) {
        Precision::F32 => fused_typed::<f32>(args),
        Precision::F64 => fused_typed::<f64>(args),
    }
}

type FusedArgs<'a, 'b> = (
    (&'a Tensor<3>, &'a Tensor<3>),
    &'a MhcaWeights,
    Option<&'a [bool]>,
    Dims,
    [f64; 2],
    &'a ItemTerms<'b>,
);

/// [`fused_terms`] in the inputs' precision `T`.
fn fused_typed<T: Real>(
    ((hs, ht), w, key_mask, dims, lambdas, terms): FusedArgs<'_, '_>,
) -> ([f64; 2], Tensor<1>) {
    let hdk = dims.heads * dims.dk;
    // the read-backs are serial copies inside burn: the teacher's states (the largest)
    // on one thread while the rest are read on the other
    let ((ht_h, hs_h), weights) = rayon::join(
        || (host_vec::<T, 3>(ht), host_vec::<T, 3>(hs)),
        || {
            Weights::new(
                host_vec(&w.wq),
                &host_vec(&w.wk),
                &host_vec(&w.wv),
                host_vec(&w.wo),
                hdk,
            )
        },
    );
    let inp = Inputs {
        hs: &hs_h,
        ht: &ht_h,
        w: &weights,
        key_mask,
        dims,
    };
    let want_ht = ht.is_tracked();
    let (ls, ds) = (dims.ls, dims.ds);
    let items: Vec<([f64; 2], Part<T>)> = (0..dims.b)
        .into_par_iter()
        .map(|bi| {
            let (item, hhat) = forward_item(&inp, bi);
            let wide = |v: &[T]| v.iter().map(|x| x.wide()).collect::<Vec<f64>>();
            let hs_w = wide(&hs_h[bi * ls * ds..(bi + 1) * ls * ds]);
            let hhat_w = wide(&hhat);
            drop(hhat);
            let (mut g_hhat, mut g_hs) = (vec![0.0; ls * ds], vec![0.0; ls * ds]);
            let values = terms(bi, (&hs_w, &hhat_w), (&mut g_hhat, &mut g_hs));
            let g: Vec<T> = g_hhat.iter().map(|&x| T::of(x)).collect();
            let mut part = backward_item(&inp, &item, bi, &g, want_ht);
            // H_s's two paths summed in f64 and rounded once, as a tensor built from f64
            // values would be
            for (a, &d) in part.hs.iter_mut().zip(&g_hs) {
                *a = T::of(a.wide() + d);
            }
            (values, part)
        })
        .collect();
    let values = items
        .iter()
        .fold([0.0; 2], |acc, (v, _)| [acc[0] + v[0], acc[1] + v[1]]);
    let parts: Vec<Part<T>> = items.into_iter().map(|(_, p)| p).collect();
    let concat = |get: fn(&Part<T>) -> &[T]| -> Vec<T> {
        let mut out = Vec::with_capacity(parts.iter().map(|p| get(p).len()).sum());
        for p in &parts {
            out.extend_from_slice(get(p));
        }
        out
    };
    let (g_hs, g_ht) = (concat(|p| &p.hs), concat(|p| &p.ht));
    let g = weight_grads(dims, &parts, g_hs, g_ht);
    let value = lambdas[0] * values[0] + lambdas[1] * values[1];
    // the terms built two at a time (burn's element-wise ops are single-threaded), added in
    // a fixed order
    let Grads {
        hs: g_hs,
        ht: g_ht,
        wq,
        wk,
        wv,
        wo,
    } = g;
    let ((t_hs, t_wq), ((t_wk, t_wo), (t_wv, t_ht))) = rayon::join(
        || (Surrogate::term(hs, g_hs), Surrogate::term(&w.wq, wq)),
        || {
            rayon::join(
                || (Surrogate::term(&w.wk, wk), Surrogate::term(&w.wo, wo)),
                || (Surrogate::term(&w.wv, wv), Surrogate::term(ht, g_ht)),
            )
        },
    );
    let mut sg = Surrogate::new(value, hs);
    for t in [t_hs, t_ht, t_wq, t_wk, t_wv, t_wo] {
        sg.add(t);
    }
    (values, sg.finish())
}

/// [`crate::mhca::mhca_align_loss`]'s fused form: [`fused_terms`] with `L_mhca` as the only
/// term.
pub(crate) fn align_loss_fused(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w: &MhcaWeights,
    n_heads: usize,
    key_mask: Option<&Tensor<2, Bool>>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    let [_, ls, ds] = hs.dims();
    let sm = student_mask.map(|m| to_vec_bool(m.clone()));
    let n_valid = sm
        .as_ref()
        .map_or(hs.dims()[0] * ls, |m| m.iter().filter(|&&v| v).count());
    let terms = |bi: usize, rows: (&[f64], &[f64]), grads: (&mut [f64], &mut [f64])| {
        let valid = sm.as_deref().map(|m| &m[bi * ls..(bi + 1) * ls]);
        [loss_item(rows, ds, valid, n_valid, 1.0, grads), 0.0]
    };
    fused_terms((&hs, &ht), w, n_heads, key_mask, [1.0, 0.0], &terms).1
}
