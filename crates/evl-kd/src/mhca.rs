//! Multi-head cross-attention alignment, `L_mhca` (method.md 2.2; fixtures family `mhca`).
//!
//! Student hidden states are queries, teacher hidden states keys and values:
//! `head_i = softmax((H_s W_Q^i)(H_t W_K^i)^T / sqrt(d_k)) (H_t W_V^i)`,
//! `Hhat_t = concat(head_1..head_h) W_O`, and the loss is the squared L2 distance between
//! `H_s` and `Hhat_t` summed over the width and averaged over valid student tokens. Heads are
//! contiguous column blocks of the projections; there are no biases. `H_s` is differentiated
//! both as the target and as the query (no stop-gradient), as in the fixtures.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};

/// Key-mask fill: a large finite negative instead of `-inf`, so a fully padded row yields a
/// uniform (finite) attention rather than NaN.
const MASK_SCORE: f64 = -1e30;

/// Projection weights of the cross-attention, as plain tensors.
#[derive(Clone, Debug)]
pub struct MhcaWeights {
    /// `[d_s, h*d_k]` query projection.
    pub wq: Tensor<2>,
    /// `[d_t, h*d_k]` key projection.
    pub wk: Tensor<2>,
    /// `[d_t, h*d_k]` value projection.
    pub wv: Tensor<2>,
    /// `[h*d_k, d_s]` output projection.
    pub wo: Tensor<2>,
}

fn project(x: Tensor<3>, w: Tensor<2>) -> Tensor<3> {
    let [b, l, d] = x.dims();
    let [_, o] = w.dims();
    x.reshape([b * l, d]).matmul(w).reshape([b, l, o])
}

/// The attention-weighted teacher context `Hhat_t`.
///
/// # Shapes
/// - `hs`: `[batch, l_s, d_s]`, `ht`: `[batch, l_t, d_t]`, `key_mask`: `[batch, l_t]`
///   (true = valid key) -> `[batch, l_s, d_s]`
///
/// # Panics
/// If the weight shapes do not fit the inputs or `h*d_k` is not divisible by `n_heads`.
pub fn mhca_forward(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w: &MhcaWeights,
    n_heads: usize,
    key_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<3> {
    let [b, ls, _] = hs.dims();
    let [_, lt, _] = ht.dims();
    let [_, hdk] = w.wq.dims();
    assert!(
        n_heads > 0 && hdk % n_heads == 0,
        "mhca: width {hdk} is not divisible into {n_heads} heads"
    );
    let dk = hdk / n_heads;
    let heads = |x: Tensor<3>, l: usize| x.reshape([b, l, n_heads, dk]).swap_dims(1, 2); // [b, h, l, dk]
    let q = heads(project(hs, w.wq.clone()), ls);
    let k = heads(project(ht.clone(), w.wk.clone()), lt);
    let v = heads(project(ht, w.wv.clone()), lt);
    let mut scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (dk as f64).sqrt()); // [b, h, ls, lt]
    if let Some(mask) = key_mask {
        let invalid = mask
            .clone()
            .bool_not()
            .reshape([b, 1, 1, lt])
            .expand([b, n_heads, ls, lt]);
        scores = scores.mask_fill(invalid, MASK_SCORE);
    }
    let attn = evl_models::ops::softmax(scores, 3);
    let ctx = attn.matmul(v).swap_dims(1, 2).reshape([b, ls, hdk]); // [b, ls, h*dk]
    project(ctx, w.wo.clone())
}

/// `sum over valid student tokens ||H_s - Hhat_t||^2 / N_valid` (0 when nothing is valid).
///
/// # Shapes
/// - `hs`, `hhat_t`: `[batch, l_s, d_s]`, `student_mask`: `[batch, l_s]`
pub fn mhca_loss(
    hs: Tensor<3>,
    hhat_t: Tensor<3>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    let [b, ls, _] = hs.dims();
    let per_token = (hs - hhat_t).square().sum_dim(2).reshape([b, ls]); // [b, ls]
    match student_mask {
        None => per_token.sum().mul_scalar(1.0 / (b * ls) as f64),
        Some(m) => evl_models::ops::masked_mean(per_token, m.clone()),
    }
}

/// Configuration of [`MhcaAlign`].
#[derive(Config, Debug)]
pub struct MhcaAlignConfig {
    /// Student hidden width `D_s` (queries and output).
    pub d_student: usize,
    /// Teacher hidden width `D_t` (keys and values).
    pub d_teacher: usize,
    /// Number of heads `h` (paper: 8).
    #[config(default = 8)]
    pub n_heads: usize,
    /// Width per head `d_k`; default `D_s / h`.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
}

impl MhcaAlignConfig {
    /// Builds the module with freshly initialised projections.
    pub fn init(&self, device: &Device) -> MhcaAlign {
        let dk = self
            .head_dim
            .unwrap_or((self.d_student / self.n_heads).max(1));
        let hdk = dk * self.n_heads;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        MhcaAlign {
            wq: lin(self.d_student, hdk),
            wk: lin(self.d_teacher, hdk),
            wv: lin(self.d_teacher, hdk),
            wo: lin(hdk, self.d_student),
            n_heads: self.n_heads,
        }
    }
}

/// Trainable cross-attention aligner (`W_Q`, `W_K`, `W_V`, `W_O`), method.md 2.2.
#[derive(Module, Debug)]
pub struct MhcaAlign {
    /// Query projection `D_s -> h d_k`.
    pub wq: Linear,
    /// Key projection `D_t -> h d_k`.
    pub wk: Linear,
    /// Value projection `D_t -> h d_k`.
    pub wv: Linear,
    /// Output projection `h d_k -> D_s`.
    pub wo: Linear,
    /// Number of heads.
    pub n_heads: usize,
}

impl MhcaAlign {
    /// The current weights as tensors.
    pub fn weights(&self) -> MhcaWeights {
        MhcaWeights {
            wq: self.wq.weight.val(),
            wk: self.wk.weight.val(),
            wv: self.wv.weight.val(),
            wo: self.wo.weight.val(),
        }
    }

    /// `Hhat_t` for student queries `hs` over teacher states `ht`.
    ///
    /// # Shapes
    /// - `hs`: `[batch, l_s, d_s]`, `ht`: `[batch, l_t, d_t]` -> `[batch, l_s, d_s]`
    pub fn forward(
        &self,
        hs: Tensor<3>,
        ht: Tensor<3>,
        key_mask: Option<&Tensor<2, Bool>>,
    ) -> Tensor<3> {
        mhca_forward(hs, ht, &self.weights(), self.n_heads, key_mask)
    }
}

/// Host-side MHCA: the cross-attention forward pass and its exact backward pass on row-major
/// `f64` buffers with matrix products in the inputs' precision, parallel over batch items.
///
/// Used by the fused CPU objective and [`mhca_align_loss`]: on burn's `flex` backend the
/// graph form spends most of its time outside the matrix products (a two-`exp` softmax over
/// `[B, h, L_s, L_t]`, fresh buffers for every intermediate, the layout copies of head
/// splitting); see BENCHMARKS.md.
pub(crate) mod host {
    use crate::host::{matmul, matmul_nn, matmul_nt};
    use evl_models::device::Precision;
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
    pub(crate) struct Weights {
        pub wq: Vec<f64>,
        pub wkv: Vec<f64>,
        pub wo: Vec<f64>,
    }

    impl Weights {
        /// Joins `W_K` and `W_V` column-wise so both projections are one product.
        pub(crate) fn new(wq: Vec<f64>, wk: &[f64], wv: &[f64], wo: Vec<f64>, hdk: usize) -> Self {
            let wkv = wk
                .chunks_exact(hdk)
                .zip(wv.chunks_exact(hdk))
                .flat_map(|(k, v)| k.iter().chain(v).copied())
                .collect();
            Self { wq, wkv, wo }
        }
    }

    pub(crate) struct Item {
        q: Vec<f64>,
        kv: Vec<f64>,
        /// Attention probabilities per head, `[h, ls, lt]`.
        attn: Vec<f64>,
        ctx: Vec<f64>,
        /// Whether any key is valid (else attention is uniform and constant, as in the
        /// graph form's finite mask fill).
        keys: bool,
    }

    /// The inputs of one call, row-major.
    pub(crate) struct Inputs<'a> {
        pub hs: &'a [f64],
        pub ht: &'a [f64],
        pub w: &'a Weights,
        pub key_mask: Option<&'a [bool]>,
        pub dims: Dims,
        pub prec: Precision,
    }

    /// Forward results and what the backward pass needs.
    pub(crate) struct Cache {
        pub items: Vec<Item>,
        /// `Hhat_t`, `[b, ls, ds]`.
        pub hhat: Vec<f64>,
    }

    /// Columns `[c0, c0 + w)` of a row-major matrix with `cols` columns, as a contiguous copy.
    fn columns(x: &[f64], cols: usize, c0: usize, w: usize) -> Vec<f64> {
        x.chunks_exact(cols)
            .flat_map(|r| r[c0..c0 + w].iter().copied())
            .collect()
    }

    fn put_columns(x: &mut [f64], cols: usize, c0: usize, src: &[f64]) {
        let w = src.len() / (x.len() / cols).max(1);
        for (r, s) in x.chunks_exact_mut(cols).zip(src.chunks_exact(w.max(1))) {
            r[c0..c0 + w].copy_from_slice(s);
        }
    }

    /// Cross-attention forward pass.
    pub(crate) fn forward(inp: &Inputs<'_>) -> Cache {
        let Inputs {
            hs,
            ht,
            w,
            key_mask,
            dims,
            prec,
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
        let scale = 1.0 / (dk as f64).sqrt();
        let items: Vec<(Item, Vec<f64>)> = (0..dims.b)
            .into_par_iter()
            .map(|bi| {
                let hs_b = &hs[bi * ls * ds..(bi + 1) * ls * ds];
                let ht_b = &ht[bi * lt * dt..(bi + 1) * lt * dt];
                let valid = |j: usize| key_mask.is_none_or(|m| m[bi * lt + j]);
                let keys = (0..lt).any(valid);
                let q = matmul_nn(hs_b, &w.wq, ls, ds, hdk, prec);
                let kv = matmul_nn(ht_b, &w.wkv, lt, dt, 2 * hdk, prec);
                let mut attn = vec![0.0; heads * ls * lt];
                let mut ctx = vec![0.0; ls * hdk];
                for h in 0..heads {
                    let qh = columns(&q, hdk, h * dk, dk);
                    let kh = columns(&kv, 2 * hdk, h * dk, dk);
                    let vh = columns(&kv, 2 * hdk, hdk + h * dk, dk);
                    let s = matmul_nt(&qh, &kh, ls, dk, lt, prec);
                    let a = &mut attn[h * ls * lt..(h + 1) * ls * lt];
                    for (arow, srow) in a.chunks_exact_mut(lt).zip(s.chunks_exact(lt)) {
                        if !keys {
                            arow.fill(1.0 / lt as f64);
                            continue;
                        }
                        let mx = (0..lt)
                            .filter(|&j| valid(j))
                            .map(|j| srow[j])
                            .fold(f64::NEG_INFINITY, f64::max);
                        let mut z = 0.0;
                        for j in 0..lt {
                            arow[j] = if valid(j) {
                                ((srow[j] - mx) * scale).exp()
                            } else {
                                0.0
                            };
                            z += arow[j];
                        }
                        arow.iter_mut().for_each(|v| *v /= z);
                    }
                    let oh = matmul_nn(a, &vh, ls, lt, dk, prec);
                    put_columns(&mut ctx, hdk, h * dk, &oh);
                }
                let hhat = matmul_nn(&ctx, &w.wo, ls, hdk, ds, prec);
                (
                    Item {
                        q,
                        kv,
                        attn,
                        ctx,
                        keys,
                    },
                    hhat,
                )
            })
            .collect();
        let mut hhat = Vec::with_capacity(dims.b * ls * ds);
        let items = items
            .into_iter()
            .map(|(it, h)| {
                hhat.extend(h);
                it
            })
            .collect();
        Cache { items, hhat }
    }

    /// Gradients of a scalar with respect to every input, row-major like the inputs.
    pub(crate) struct Grads {
        pub hs: Vec<f64>,
        /// Empty unless asked for.
        pub ht: Vec<f64>,
        pub wq: Vec<f64>,
        pub wk: Vec<f64>,
        pub wv: Vec<f64>,
        pub wo: Vec<f64>,
    }

    fn add(acc: &mut [f64], x: &[f64]) {
        acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
    }

    /// Back-propagates `g = dL/dHhat_t` (`[b, ls, ds]`).
    pub(crate) fn backward(inp: &Inputs<'_>, c: &Cache, g: &[f64], want_ht: bool) -> Grads {
        let Dims {
            ls,
            ds,
            lt,
            dt,
            heads,
            dk,
            ..
        } = inp.dims;
        let (hdk, prec, w) = (inp.dims.hdk(), inp.prec, inp.w);
        let scale = 1.0 / (dk as f64).sqrt();
        struct Part {
            hs: Vec<f64>,
            ht: Vec<f64>,
            wq: Vec<f64>,
            wkv: Vec<f64>,
            wo: Vec<f64>,
        }
        let parts: Vec<Part> = c
            .items
            .par_iter()
            .enumerate()
            .map(|(bi, it)| {
                let g_b = &g[bi * ls * ds..(bi + 1) * ls * ds];
                let hs_b = &inp.hs[bi * ls * ds..(bi + 1) * ls * ds];
                let ht_b = &inp.ht[bi * lt * dt..(bi + 1) * lt * dt];
                let valid = |j: usize| inp.key_mask.is_none_or(|m| m[bi * lt + j]);
                let wo_g = matmul(&it.ctx, (ls, hdk), true, g_b, (ls, ds), false, prec);
                let dctx = matmul_nt(g_b, &w.wo, ls, ds, hdk, prec);
                let mut dq = vec![0.0; ls * hdk];
                let mut dkv = vec![0.0; lt * 2 * hdk];
                for h in 0..heads {
                    let a = &it.attn[h * ls * lt..(h + 1) * ls * lt];
                    let dch = columns(&dctx, hdk, h * dk, dk);
                    let vh = columns(&it.kv, 2 * hdk, hdk + h * dk, dk);
                    let dvh = matmul(a, (ls, lt), true, &dch, (ls, dk), false, prec);
                    put_columns(&mut dkv, 2 * hdk, hdk + h * dk, &dvh);
                    if !it.keys {
                        continue; // constant attention: no gradient to Q or K
                    }
                    let mut ds_ = matmul_nt(&dch, &vh, ls, dk, lt, prec); // dA, then dS
                    for (drow, arow) in ds_.chunks_exact_mut(lt).zip(a.chunks_exact(lt)) {
                        let s: f64 = drow.iter().zip(arow).map(|(d, p)| d * p).sum();
                        let mut arg = 0;
                        for j in 0..lt {
                            drow[j] = if valid(j) {
                                arow[j] * (drow[j] - s) * scale
                            } else {
                                0.0
                            };
                            if arow[j] > arow[arg] {
                                arg = j;
                            }
                        }
                        // Softmax gradients sum to zero: the winner's is minus the others' sum,
                        // a sum of small accurate terms instead of a cancelling difference
                        // (nearly one-hot rows; see `evl_models::ops::log_softmax`).
                        drow[arg] = 0.0;
                        drow[arg] = -drow.iter().sum::<f64>();
                    }
                    let qh = columns(&it.q, hdk, h * dk, dk);
                    let kh = columns(&it.kv, 2 * hdk, h * dk, dk);
                    let dqh = matmul_nn(&ds_, &kh, ls, lt, dk, prec);
                    let dkh = matmul(&ds_, (ls, lt), true, &qh, (ls, dk), false, prec);
                    put_columns(&mut dq, hdk, h * dk, &dqh);
                    put_columns(&mut dkv, 2 * hdk, h * dk, &dkh);
                }
                Part {
                    hs: matmul_nt(&dq, &w.wq, ls, hdk, ds, prec),
                    ht: if want_ht {
                        matmul_nt(&dkv, &w.wkv, lt, 2 * hdk, dt, prec)
                    } else {
                        Vec::new()
                    },
                    wq: matmul(hs_b, (ls, ds), true, &dq, (ls, hdk), false, prec),
                    wkv: matmul(ht_b, (lt, dt), true, &dkv, (lt, 2 * hdk), false, prec),
                    wo: wo_g,
                }
            })
            .collect();
        let mut wq = vec![0.0; ds * hdk];
        let mut wkv = vec![0.0; dt * 2 * hdk];
        let mut wo = vec![0.0; hdk * ds];
        let (mut hs, mut ht) = (Vec::new(), Vec::new());
        for p in parts {
            add(&mut wq, &p.wq);
            add(&mut wkv, &p.wkv);
            add(&mut wo, &p.wo);
            hs.extend(p.hs);
            ht.extend(p.ht);
        }
        let wk = columns(&wkv, 2 * hdk, 0, hdk);
        let wv = columns(&wkv, 2 * hdk, hdk, hdk);
        Grads {
            hs,
            ht,
            wq,
            wk,
            wv,
            wo,
        }
    }

    /// `L_mhca` (masked mean of `||H_s - Hhat_t||^2` over valid student tokens) and its
    /// gradients: `(value, dL/dHhat_t, direct dL/dH_s)`.
    pub(crate) fn loss(
        hs: &[f64],
        hhat: &[f64],
        ds: usize,
        student_mask: Option<&[bool]>,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let ok = |t: usize| student_mask.is_none_or(|m| m[t]);
        let n_tok = hs.len() / ds.max(1);
        let n = (0..n_tok).filter(|&t| ok(t)).count();
        let mut g_hhat = vec![0.0; hs.len()];
        let mut g_hs = vec![0.0; hs.len()];
        if n == 0 {
            return (0.0, g_hhat, g_hs);
        }
        let mut value = 0.0;
        for t in (0..n_tok).filter(|&t| ok(t)) {
            for k in t * ds..(t + 1) * ds {
                let e = hs[k] - hhat[k];
                value += e * e;
                g_hs[k] = 2.0 * e / n as f64;
                g_hhat[k] = -g_hs[k];
            }
        }
        (value / n as f64, g_hhat, g_hs)
    }
}

/// `L_mhca` of the cross-attention aligner in one call (forward pass, loss and gradients),
/// the same function as `mhca_loss(hs, mhca_forward(hs, ht, w, ..), student_mask)`.
///
/// On the CPU it runs the fused host kernel (`host` module above) and hands its exact
/// gradients to autodiff; elsewhere it is the tensor-op form.
pub fn mhca_align_loss(
    hs: Tensor<3>,
    ht: Tensor<3>,
    w: &MhcaWeights,
    n_heads: usize,
    key_mask: Option<&Tensor<2, Bool>>,
    student_mask: Option<&Tensor<2, Bool>>,
) -> Tensor<1> {
    if !evl_models::device::on_host(&hs) {
        let hhat = mhca_forward(hs.clone(), ht, w, n_heads, key_mask);
        return mhca_loss(hs, hhat, student_mask);
    }
    let fused = FusedMhca::run(&hs, &ht, w, n_heads, key_mask);
    let [_, _, ds] = hs.dims();
    let sm = student_mask.map(|m| evl_models::device::to_vec_bool(m.clone()));
    let (value, g_hhat, g_hs) = host::loss(&fused.hs, fused.hhat(), ds, sm.as_deref());
    fused.finish(value, &g_hhat, &g_hs, &hs, &ht, w)
}

/// Host copies of the MHCA inputs and the forward cache, for fused losses.
pub(crate) struct FusedMhca {
    pub(crate) hs: Vec<f64>,
    ht: Vec<f64>,
    weights: host::Weights,
    key_mask: Option<Vec<bool>>,
    dims: host::Dims,
    prec: evl_models::device::Precision,
    cache: host::Cache,
}

impl FusedMhca {
    /// Runs the forward pass on host copies of the inputs.
    pub(crate) fn run(
        hs: &Tensor<3>,
        ht: &Tensor<3>,
        w: &MhcaWeights,
        n_heads: usize,
        key_mask: Option<&Tensor<2, Bool>>,
    ) -> Self {
        use evl_models::device::{precision_of, to_vec_bool, to_vec_f64};
        let [b, ls, ds] = hs.dims();
        let [bt, lt, dt] = ht.dims();
        let [_, hdk] = w.wq.dims();
        assert!(
            b == bt && n_heads > 0 && hdk % n_heads == 0,
            "mhca: batch {b} vs {bt}, width {hdk} into {n_heads} heads"
        );
        let dims = host::Dims {
            b,
            ls,
            ds,
            lt,
            dt,
            heads: n_heads,
            dk: hdk / n_heads,
        };
        let host_vec = |t: &Tensor<2>| to_vec_f64(t.clone().detach());
        let weights = host::Weights::new(
            host_vec(&w.wq),
            &host_vec(&w.wk),
            &host_vec(&w.wv),
            host_vec(&w.wo),
            hdk,
        );
        let mut me = Self {
            hs: to_vec_f64(hs.clone().detach()),
            ht: to_vec_f64(ht.clone().detach()),
            weights,
            key_mask: key_mask.map(|m| to_vec_bool(m.clone())),
            dims,
            prec: precision_of(hs),
            cache: host::Cache {
                items: Vec::new(),
                hhat: Vec::new(),
            },
        };
        me.cache = host::forward(&me.inputs());
        me
    }

    fn inputs(&self) -> host::Inputs<'_> {
        host::Inputs {
            hs: &self.hs,
            ht: &self.ht,
            w: &self.weights,
            key_mask: self.key_mask.as_deref(),
            dims: self.dims,
            prec: self.prec,
        }
    }

    /// `Hhat_t` on the host, `[b, ls, ds]`.
    pub(crate) fn hhat(&self) -> &[f64] {
        &self.cache.hhat
    }

    /// The differentiable scalar with forward `value`, given `dL/dHhat_t` and the direct
    /// `dL/dH_s`; back-propagates through the cross-attention on the host.
    pub(crate) fn finish(
        &self,
        value: f64,
        g_hhat: &[f64],
        g_hs_direct: &[f64],
        hs: &Tensor<3>,
        ht: &Tensor<3>,
        w: &MhcaWeights,
    ) -> Tensor<1> {
        let grads = host::backward(&self.inputs(), &self.cache, g_hhat, ht.is_tracked());
        let mut g_hs = grads.hs;
        g_hs.iter_mut().zip(g_hs_direct).for_each(|(a, b)| *a += b);
        let mut sg = crate::host::Surrogate::new(value, hs);
        sg.grad(hs, &g_hs);
        sg.grad(ht, &grads.ht);
        sg.grad(&w.wq, &grads.wq);
        sg.grad(&w.wk, &grads.wk);
        sg.grad(&w.wv, &grads.wv);
        sg.grad(&w.wo, &grads.wo);
        sg.finish()
    }
}
