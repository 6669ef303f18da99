//! Geometric intra-architecture relation matching, `L_rel` (method.md 2.3; fixtures family
//! `relation`).
//!
//! Per example, the distance potential `psi_D` is the pairwise Euclidean distance matrix over
//! the mean of its off-diagonal entries (RKD, Park et al. 2019), and the angle potential
//! `psi_A` the pairwise cosine-similarity matrix. `L_k = sum (psi_k(Hhat_t) - psi_k(H_s))^2
//! / (B L_s^2)` over the full matrix including the diagonal, and `L_rel = (L_D + L_A) / 2`.
//! Squared distances are clamped at `1e-12` (zero gradient where clamped) and the diagonal
//! distance is 0 with zero gradient. The mean normaliser is differentiated.
//!
//! Padding (a choice method.md 2.4 leaves open): with a student mask, only pairs of valid
//! tokens enter, the distance mean is over valid off-diagonal pairs of each item, and the
//! normaliser is the number of valid pairs `sum_b n_b^2` (= `B L_s^2` without padding).

use crate::host::{Surrogate, dot, gram_upper, matmul_nn, mirror_upper, near_fraction, sum};
use burn::tensor::{Bool, Tensor};
use evl_models::device::{Precision, on_host, precision_of, tensor_like, to_vec_bool, to_vec_f64};
use evl_models::ops::{l2_normalize, sq_dist};
use rayon::prelude::*;

/// Tokens whose norm is small next to `|x_i - mean| + |mean|` by more than this factor get
/// their cosines (and angle-gradient columns) from explicit products: the centred Gram form
/// of `x_i . x_j` is accurate relative to `(|xc_i| + |m|)(|xc_j| + |m|)`, not to
/// `|x_i| |x_j|`.
fn max_condition(prec: Precision) -> f64 {
    match prec {
        Precision::F32 => 2.0,
        Precision::F64 => 1e3,
    }
}

/// Settings of the relation loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RelationConfig {
    /// Clamp on squared distances (1e-12).
    pub dist_sq_clamp: f64,
    /// Norm floor for the cosine potential (1e-12).
    pub norm_eps: f64,
    /// Treat `Hhat_t` as a fixed target (no gradient into the aligner through `L_rel`).
    /// Default false, as in the fixtures.
    pub detach_teacher: bool,
    /// Give `L_D` and `L_A` their own gradients (one more matrix product per input). Off,
    /// only `L_rel` is differentiable and the two terms are reported as values: what the
    /// training objective needs. Default false.
    pub term_gradients: bool,
    /// Return the four potentials in [`RelationOutput`] (the fixtures check them; useful
    /// for plots). Off, the fused CPU kernel does not materialise them: the loss needs them
    /// only inside each item. Default false.
    pub potentials: bool,
}

impl Default for RelationConfig {
    fn default() -> Self {
        Self {
            dist_sq_clamp: 1e-12,
            norm_eps: 1e-12,
            detach_teacher: false,
            term_gradients: false,
            potentials: false,
        }
    }
}

/// Terms of the relation loss.
#[derive(Clone, Debug)]
pub struct RelationOutput {
    /// Distance term `L_D`.
    pub l_d: Tensor<1>,
    /// Angle term `L_A`.
    pub l_a: Tensor<1>,
    /// `L_rel = (L_D + L_A) / 2`.
    pub l_rel: Tensor<1>,
    /// `psi_D(Hhat_t)`, `[batch, l_s, l_s]`; `None` unless [`RelationConfig::potentials`].
    pub psi_d_t: Option<Tensor<3>>,
    /// `psi_D(H_s)`.
    pub psi_d_s: Option<Tensor<3>>,
    /// `psi_A(Hhat_t)`.
    pub psi_a_t: Option<Tensor<3>>,
    /// `psi_A(H_s)`.
    pub psi_a_s: Option<Tensor<3>>,
}

/// `[batch, l, l]` 0/1 weights of valid pairs, and the same without the diagonal.
fn pair_masks(like: &Tensor<3>, mask: Option<&[bool]>) -> (Tensor<3>, Tensor<3>) {
    let [b, l, _] = like.dims();
    let mut pairs = vec![0.0; b * l * l];
    let mut off = vec![0.0; b * l * l];
    for bi in 0..b {
        for i in 0..l {
            for j in 0..l {
                let ok = mask.is_none_or(|m| m[bi * l + i] && m[bi * l + j]);
                if ok {
                    pairs[(bi * l + i) * l + j] = 1.0;
                    if i != j {
                        off[(bi * l + i) * l + j] = 1.0;
                    }
                }
            }
        }
    }
    (
        tensor_like(&pairs, [b, l, l], like),
        tensor_like(&off, [b, l, l], like),
    )
}

/// Distance potential `psi_D` given the off-diagonal valid-pair weights.
fn psi_distance(x: Tensor<3>, off: &Tensor<3>, clamp: f64) -> Tensor<3> {
    let d = sq_dist(x.clone(), x).clamp_min(clamp).sqrt() * off.clone(); // [b, l, l], diag 0
    let count = off.clone().sum_dim(2).sum_dim(1).clamp_min(1.0); // [b, 1, 1]
    // Every off-diagonal distance is >= sqrt(clamp) > 0, so the floor only acts on items with
    // fewer than two valid tokens (no pair: mu = 0), whose potential is then 0 instead of NaN.
    let mu = (d.clone().sum_dim(2).sum_dim(1) / count).clamp_min(clamp);
    d / mu
}

/// Angle potential `psi_A`: pairwise cosine similarities, zero on padded pairs.
fn psi_angle(x: Tensor<3>, pairs: &Tensor<3>, norm_eps: f64) -> Tensor<3> {
    let xn = l2_normalize(x, norm_eps);
    xn.clone().matmul(xn.swap_dims(1, 2)) * pairs.clone()
}

/// The relation loss as burn tensor ops (used off the CPU, where a host round trip would
/// cost more than it saves; also the reference the fused kernel is tested against).
pub fn relation_loss_graph(
    hhat_t: Tensor<3>,
    hs: Tensor<3>,
    student_mask: Option<&Tensor<2, Bool>>,
    cfg: &RelationConfig,
) -> RelationOutput {
    let hhat_t = if cfg.detach_teacher {
        hhat_t.detach()
    } else {
        hhat_t
    };
    let mask = student_mask.map(|m| evl_models::device::to_vec_bool(m.clone()));
    let (pairs, off) = pair_masks(&hs, mask.as_deref());
    let n_pairs = pairs.clone().sum().clamp_min(1.0);
    let psi_d_t = psi_distance(hhat_t.clone(), &off, cfg.dist_sq_clamp);
    let psi_d_s = psi_distance(hs.clone(), &off, cfg.dist_sq_clamp);
    let psi_a_t = psi_angle(hhat_t, &pairs, cfg.norm_eps);
    let psi_a_s = psi_angle(hs, &pairs, cfg.norm_eps);
    let l_d = (psi_d_t.clone() - psi_d_s.clone()).square().sum() / n_pairs.clone();
    let l_a = (psi_a_t.clone() - psi_a_s.clone()).square().sum() / n_pairs;
    let l_rel = (l_d.clone() + l_a.clone()).mul_scalar(0.5);
    RelationOutput {
        l_d,
        l_a,
        l_rel,
        psi_d_t: cfg.potentials.then_some(psi_d_t),
        psi_d_s: cfg.potentials.then_some(psi_d_s),
        psi_a_t: cfg.potentials.then_some(psi_a_t),
        psi_a_s: cfg.potentials.then_some(psi_a_s),
    }
}

/// The relation loss between the aligned teacher `hhat_t` and the student `hs`.
///
/// On the CPU this is one fused host pass per batch item (see [`relation_host`]): value and
/// exact gradient from two matrix products per input, instead of the graph's `[B, L, L]`
/// chains. Elsewhere it is [`relation_loss_graph`]. Both compute the same function.
///
/// # Shapes
/// - `hhat_t`, `hs`: `[batch, l_s, d_s]`; `student_mask`: `[batch, l_s]`
///
/// # Panics
/// If the two inputs differ in shape.
pub fn relation_loss(
    hhat_t: Tensor<3>,
    hs: Tensor<3>,
    student_mask: Option<&Tensor<2, Bool>>,
    cfg: &RelationConfig,
) -> RelationOutput {
    assert_eq!(
        hhat_t.dims(),
        hs.dims(),
        "relation_loss: Hhat_t and H_s must have the same shape"
    );
    if !on_host(&hs) {
        return relation_loss_graph(hhat_t, hs, student_mask, cfg);
    }
    let [b, l, d] = hs.dims();
    let mask = student_mask.map(|m| to_vec_bool(m.clone()));
    let x = to_vec_f64(hhat_t.clone().detach());
    let y = to_vec_f64(hs.clone().detach());
    let want_x = hhat_t.is_tracked() && !cfg.detach_teacher;
    let want_y = hs.is_tracked();
    let h = relation_host(
        &x,
        &y,
        [b, l, d],
        mask.as_deref(),
        cfg,
        precision_of(&hs),
        RelationWant {
            grad_x: want_x,
            grad_y: want_y,
            psi: cfg.potentials,
        },
    );
    let psi = |v: &[f64]| cfg.potentials.then(|| tensor_like(v, [b, l, l], &hs));
    let scalar = |value: f64, gx: &[f64], gy: &[f64]| {
        let mut sg = Surrogate::new(value, &hs);
        if want_x {
            sg.grad(&hhat_t, gx);
        }
        if want_y {
            sg.grad(&hs, gy);
        }
        sg.finish()
    };
    let (l_d, l_a, l_rel) = if cfg.term_gradients {
        let l_d = scalar(h.l_d, &h.grad_x[0], &h.grad_y[0]);
        let l_a = scalar(h.l_a, &h.grad_x[1], &h.grad_y[1]);
        let l_rel = (l_d.clone() + l_a.clone()).mul_scalar(0.5);
        (l_d, l_a, l_rel)
    } else {
        let l_rel = scalar(0.5 * (h.l_d + h.l_a), &h.grad_x[0], &h.grad_y[0]);
        (
            tensor_like(&[h.l_d], [1], &hs),
            tensor_like(&[h.l_a], [1], &hs),
            l_rel,
        )
    };
    RelationOutput {
        l_d,
        l_a,
        l_rel,
        psi_d_t: psi(&h.psi_d[0]),
        psi_d_s: psi(&h.psi_d[1]),
        psi_a_t: psi(&h.psi_a[0]),
        psi_a_s: psi(&h.psi_a[1]),
    }
}

/// What [`relation_host`] returns beyond the loss values.
#[derive(Clone, Copy, Debug)]
pub struct RelationWant {
    /// The gradient with respect to the teacher input `x`.
    pub grad_x: bool,
    /// The gradient with respect to the student input `y`.
    pub grad_y: bool,
    /// The four potentials, `[b, l, l]` each (the fused objective does not need them, and
    /// scattering them is a serial pass over `4 b l^2` values).
    pub psi: bool,
}

/// Result of [`relation_host`]; arrays are row-major over the full (padded) shapes.
#[derive(Clone, Debug)]
pub struct RelationHost {
    /// `L_D`.
    pub l_d: f64,
    /// `L_A`.
    pub l_a: f64,
    /// `psi_D` of the teacher and of the student, `[batch, l, l]` each (empty unless
    /// asked for).
    pub psi_d: [Vec<f64>; 2],
    /// `psi_A` of the teacher and of the student.
    pub psi_a: [Vec<f64>; 2],
    /// Gradients with respect to the teacher input, `[batch, l, d]`: `[dL_D, dL_A]` with
    /// term gradients, else `[dL_rel, empty]`. Empty when not requested.
    pub grad_x: [Vec<f64>; 2],
    /// The same for the student input.
    pub grad_y: [Vec<f64>; 2],
}

/// One input's geometry on one batch item (valid tokens only).
struct Geometry {
    n: usize,
    d: usize,
    /// Centred tokens `x - mean`, `n x d`.
    xc: Vec<f64>,
    mean: Vec<f64>,
    /// Raw tokens, `n x d`.
    x: Vec<f64>,
    /// `max(|x_i|, norm_eps)` and whether the floor was active.
    r: Vec<f64>,
    floored: Vec<bool>,
    /// Ill-conditioned tokens for the centred cosine (see `max_condition`).
    bad: Vec<bool>,
    /// Distances `d_ij` (clamped, diagonal 0) and whether `sq_ij` exceeded the clamp.
    dist: Vec<f64>,
    live: Vec<bool>,
    /// Pairs `i < j` recomputed from explicit differences.
    near: Vec<(usize, usize)>,
    /// Distance mean `mu` and whether it is above its floor (differentiated then).
    mu: f64,
    mu_live: bool,
    /// Cosines `x_i . x_j / (r_i r_j)`, `n x n`.
    cos: Vec<f64>,
}

#[inline(always)] // into the item's SIMD dispatch (`RelationItem`)
fn geometry(x: Vec<f64>, n: usize, d: usize, cfg: &RelationConfig, prec: Precision) -> Geometry {
    let mut mean = vec![0.0; d];
    for row in x.chunks_exact(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let xc: Vec<f64> = x
        .chunks_exact(d)
        .flat_map(|row| row.iter().zip(&mean).map(|(v, m)| v - m))
        .collect();
    // Centring removes the tokens' common direction (large in real hidden states), so the
    // Gram form below cancels far less; distances do not change.
    // only the strict upper triangle is read below
    let gram = gram_upper(&xc, n, d, prec);
    let sqn = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
    let q: Vec<f64> = xc.chunks_exact(d).map(sqn).collect();
    let norm: Vec<f64> = x.chunks_exact(d).map(|r| sqn(r).sqrt()).collect();
    let r: Vec<f64> = norm.iter().map(|&v| v.max(cfg.norm_eps)).collect();
    let floored: Vec<bool> = norm.iter().map(|&v| v <= cfg.norm_eps).collect();
    let p: Vec<f64> = xc
        .chunks_exact(d)
        .map(|row| row.iter().zip(&mean).map(|(a, m)| a * m).sum())
        .collect();
    let mm = sqn(&mean);
    let bad: Vec<bool> = (0..n)
        .map(|i| (q[i].sqrt() + mm.sqrt()) > max_condition(prec) * r[i])
        .collect();
    let frac = near_fraction(prec);
    let clamp = cfg.dist_sq_clamp;
    let bad_idx: Vec<usize> = (0..n).filter(|&j| bad[j]).collect();
    let row_of = |i: usize| &x[i * d..(i + 1) * d];
    let explicit_sq = |i: usize, j: usize| -> f64 {
        row_of(i)
            .iter()
            .zip(row_of(j))
            .map(|(a, b)| (a - b) * (a - b))
            .sum()
    };
    let explicit_dot =
        |i: usize, j: usize| -> f64 { row_of(i).iter().zip(row_of(j)).map(|(a, b)| a * b).sum() };
    // The upper triangle row by row, then mirrored in tiles. Each row is three branch-free
    // passes that vectorise (squared distances and cosines from the Gram entries, the cosines
    // written over them; then distances, clamp flags and their sum in eight lanes), with the
    // rare near pairs and ill-conditioned tokens patched from explicit products in between.
    let mut cos = gram;
    let mut dist = vec![0.0; n * n];
    let mut live = vec![false; n * n];
    let mut near = Vec::new();
    let (mut lanes, mut tail) = ([0.0; 8], 0.0);
    for i in 0..n {
        let (row, lo) = (i * n, i + 1);
        let (qi, pi, ri) = (q[i], p[i], r[i]);
        let cr = &mut cos[row + lo..row + n];
        let dr = &mut dist[row + lo..row + n];
        let mut any_near = false;
        for ((c, dv), (&qj, (&pj, &rj))) in cr
            .iter_mut()
            .zip(dr.iter_mut())
            .zip(q[lo..].iter().zip(p[lo..].iter().zip(&r[lo..])))
        {
            let g = *c;
            let sq = qi + qj - 2.0 * g;
            any_near |= sq < frac * (qi + qj);
            *dv = sq;
            *c = (g + pi + pj + mm) / (ri * rj);
        }
        if any_near {
            for (k, dv) in dr.iter_mut().enumerate() {
                let j = lo + k;
                if *dv < frac * (qi + q[j]) {
                    *dv = explicit_sq(i, j);
                    near.push((i, j));
                }
            }
        }
        if bad[i] {
            for (k, c) in cr.iter_mut().enumerate() {
                *c = explicit_dot(i, lo + k) / (ri * r[lo + k]);
            }
        } else {
            for &j in bad_idx.iter().filter(|&&j| j > i) {
                cr[j - lo] = explicit_dot(i, j) / (ri * r[j]);
            }
        }
        let lr = &mut live[row + lo..row + n];
        let mut dch = dr.chunks_exact_mut(8);
        let mut lch = lr.chunks_exact_mut(8);
        for (dv, lv) in (&mut dch).zip(&mut lch) {
            for l in 0..8 {
                let sq = dv[l];
                lv[l] = sq > clamp;
                dv[l] = sq.max(clamp).sqrt();
                lanes[l] += 2.0 * dv[l];
            }
        }
        for (dv, lv) in dch.into_remainder().iter_mut().zip(lch.into_remainder()) {
            *lv = *dv > clamp;
            *dv = dv.max(clamp).sqrt();
            tail += 2.0 * *dv;
        }
        cos[row + i] = norm[i] * norm[i] / (ri * ri);
    }
    let sum = lanes.iter().fold(tail, |a, &v| a + v);
    mirror_upper(&mut dist, n);
    mirror_upper(&mut live, n);
    mirror_upper(&mut cos, n);
    let off = (n * n.saturating_sub(1)).max(1) as f64;
    let mu_raw = sum / off;
    Geometry {
        n,
        d,
        xc,
        mean,
        x,
        r,
        floored,
        bad,
        dist,
        live,
        near,
        mu: mu_raw.max(cfg.dist_sq_clamp),
        mu_live: mu_raw > cfg.dist_sq_clamp,
        cos,
    }
}

/// Gradient of `wd * sum(gd . psi_D) + wa * sum(ga . psi_A)` with respect to one input's
/// tokens, where `gd`, `ga` (`n x n`) are the upstream gradients of its two potentials. One
/// `n x n` by `n x d` product; near pairs' distance terms are added from explicit differences.
#[inline(always)] // into the item's SIMD dispatch (`RelationItem`)
fn potential_grad(
    g: &Geometry,
    gd: &[f64],
    ga: &[f64],
    (wd, wa): (f64, f64),
    prec: Precision,
) -> Vec<f64> {
    let (n, d) = (g.n, g.d);
    // dL/dd_ij, through psi_D = d / mu with mu differentiated.
    let t = dot(gd, &g.dist);
    let off = (n * n.saturating_sub(1)).max(1) as f64;
    let shift = if g.mu_live {
        t / (g.mu * g.mu * off)
    } else {
        0.0
    };
    // With E_ij = gd_ij / mu - shift (= dL/dd_ij), W_ij = (E_ij + E_ji) / d_ij on live
    // off-diagonal pairs, and grad_i = sum_j W_ij (x_i - x_j).
    // `gd` and `ga` are symmetric (bit for bit: both sides' potentials are), so
    // `E_ij + E_ji = 2 E_ij` exactly and no column-order (cache-missing) read is needed.
    debug_assert!((0..n * n).all(|k| gd[k] == gd[(k % n) * n + k / n]));
    debug_assert!((0..n * n).all(|k| ga[k] == ga[(k % n) * n + k / n]));
    // Row slices and selects instead of index arithmetic and branches, so the divisions
    // vectorise. `live` is false on the diagonal, which keeps `W_ii = 0`.
    // (rows appended, not written over a zeroed buffer: a memset of every n x n array was 8%
    // of the kernel)
    // (reciprocals multiplied instead of divisions repeated over n x n entries: a vector
    // division costs about twenty multiplications here, and the results differ by an ulp)
    let inv_mu = 1.0 / g.mu;
    let mut w = Vec::with_capacity(n * n);
    for (gdr, (dr, lr)) in gd
        .chunks_exact(n)
        .zip(g.dist.chunks_exact(n).zip(g.live.chunks_exact(n)))
    {
        w.extend(gdr.iter().zip(dr).zip(lr).map(|((&gv, &dv), &l)| {
            let wij = wd * (2.0 * (gv * inv_mu - shift)) / dv;
            if l { wij } else { 0.0 }
        }));
    }
    let mut near_w = Vec::with_capacity(g.near.len());
    for &(i, j) in &g.near {
        near_w.push(w[i * n + j]);
        w[i * n + j] = 0.0;
        w[j * n + i] = 0.0;
    }
    // Angle: S = G_A + G_A^T, dL/dxn_i = sum_j S_ij xn_j, then through the normalisation.
    let mut pmat = Vec::with_capacity(n * n);
    let mut diag = vec![0.0; n]; // coefficient of x_i
    let mut mcoef = vec![0.0; n]; // coefficient of the mean
    let mut wsum = vec![0.0; n]; // rowsum(W)
    let mut s = vec![0.0; n];
    let mut mrow = vec![0.0; n];
    // 1 / r_j, and 0 for ill-conditioned columns (added from raw tokens after the product)
    let inv_r: Vec<f64> =
        g.r.iter()
            .zip(&g.bad)
            .map(|(&r, &bad)| if bad { 0.0 } else { 1.0 / r })
            .collect();
    for i in 0..n {
        let row = i * n..(i + 1) * n;
        let (gar, wr) = (&ga[row.clone()], &w[row.clone()]);
        for (((sv, mv), &gv), &ir) in s.iter_mut().zip(mrow.iter_mut()).zip(gar).zip(&inv_r) {
            *sv = wa * (2.0 * gv);
            *mv = *sv * ir;
        }
        let ri = g.r[i];
        let iri = 1.0 / ri;
        pmat.extend(wr.iter().zip(&mrow).map(|(&wij, &mij)| -wij + mij * iri));
        let c = dot(&s, &g.cos[row]);
        wsum[i] = sum(wr);
        diag[i] = wsum[i];
        if !g.floored[i] {
            diag[i] -= c / (ri * ri);
        }
        mcoef[i] = sum(&mrow) / ri;
    }
    let prod = matmul_nn(&pmat, &g.xc, n, n, d, prec);
    let mut out = Vec::with_capacity(n * d);
    for i in 0..n {
        let (pr, x) = (&prod[i * d..(i + 1) * d], &g.x[i * d..(i + 1) * d]);
        // grad_i = (P Xc)_i + (angle's mean share) m + diag_i x_i - rowsum(W)_i m, where the
        // last term turns rowsum(W) x_i - (W X)_i into the cancellation-free
        // rowsum(W) xc_i - (W Xc)_i.
        let (mc, dg) = (mcoef[i] - wsum[i], diag[i]);
        out.extend(
            pr.iter()
                .zip(&g.mean)
                .zip(x)
                .map(|((&p, &m), &xv)| p + mc * m + dg * xv),
        );
    }
    for j in (0..n).filter(|&j| g.bad[j]) {
        let xj = &g.x[j * d..(j + 1) * d];
        for i in 0..n {
            let c = wa * (2.0 * ga[i * n + j]) / (g.r[j] * g.r[i]);
            for (o, &v) in out[i * d..(i + 1) * d].iter_mut().zip(xj) {
                *o += c * v;
            }
        }
    }
    for (&(i, j), &wij) in g.near.iter().zip(&near_w) {
        for k in 0..d {
            let diff = g.x[i * d + k] - g.x[j * d + k];
            out[i * d + k] += wij * diff;
            out[j * d + k] -= wij * diff;
        }
    }
    out
}

/// One batch item's share of [`relation_host`].
pub(crate) struct Item {
    /// Its valid token positions.
    pub idx: Vec<usize>,
    /// Its squared-difference sums of the two potentials (`L_D`, `L_A` before the division
    /// by the number of pairs).
    pub sums: (f64, f64),
    psi: [Vec<f64>; 4],
    /// Gradients, one row per valid token, as [`RelationHost`]'s.
    pub grads: [[Vec<f64>; 2]; 2],
}

/// One batch item (`l x d` rows of each input), compiled for this CPU's vector width
/// (`crate::host::simd`): everything it runs outside the matrix products is inlined into
/// the dispatch.
pub(crate) struct RelationItem<'a> {
    /// The teacher's rows of the item, `[l, d]`.
    pub x: &'a [f64],
    /// The student's rows.
    pub y: &'a [f64],
    /// The valid token positions.
    pub idx: Vec<usize>,
    /// Row width.
    pub d: usize,
    /// The batch's number of valid pairs (the loss normaliser).
    pub n_pairs: f64,
    /// Settings.
    pub cfg: &'a RelationConfig,
    /// Precision of the products.
    pub prec: Precision,
    /// What to compute.
    pub want: RelationWant,
}

impl pulp::WithSimd for RelationItem<'_> {
    type Output = Item;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Item {
        relation_item(self)
    }
}

#[inline(always)] // into `RelationItem`'s dispatch
fn relation_item(it: RelationItem<'_>) -> Item {
    let RelationItem {
        x,
        y,
        idx,
        d,
        n_pairs,
        cfg,
        prec,
        want,
    } = it;
    let n = idx.len();
    let gather = |src: &[f64]| -> Vec<f64> {
        let mut out = Vec::with_capacity(n * d);
        for &i in &idx {
            out.extend_from_slice(&src[i * d..(i + 1) * d]);
        }
        out
    };
    let (gx, gy) = (
        geometry(gather(x), n, d, cfg, prec),
        geometry(gather(y), n, d, cfg, prec),
    );
    // differences of the potentials (psi_D = d / mu, 0 on the diagonal where the distance
    // is stored as 0), their squared sums, then the upstream gradients in place (separate
    // passes vectorise; one loop with two running sums does not)
    // (one pass each, scaled as they are made: the sums are taken of the scaled values and
    // unscaled once; reciprocals multiplied rather than an n x n division each)
    let (rx, ry, c) = (1.0 / gx.mu, 1.0 / gy.mu, 2.0 / n_pairs);
    let gd: Vec<f64> = gx
        .dist
        .iter()
        .zip(&gy.dist)
        .map(|(&a, &b)| c * (a * rx - b * ry))
        .collect();
    let ga: Vec<f64> = gx
        .cos
        .iter()
        .zip(&gy.cos)
        .map(|(&a, &b)| c * (a - b))
        .collect();
    let sums = (dot(&gd, &gd) / (c * c), dot(&ga, &ga) / (c * c));
    let weights: &[(f64, f64)] = if cfg.term_gradients {
        &[(1.0, 0.0), (0.0, 1.0)]
    } else {
        &[(0.5, 0.5)]
    };
    // The student's upstream gradients are the teacher's negated: the gradient is linear in
    // them, so the sign goes on the term weights (exact: negation is). A plain loop, not a
    // closure, so that `potential_grad` is inlined into this dispatch.
    let mut grads: [[Vec<f64>; 2]; 2] = Default::default();
    for (side, (g, sign, on)) in [(&gx, 1.0, want.grad_x), (&gy, -1.0, want.grad_y)]
        .into_iter()
        .enumerate()
    {
        if on && n > 0 {
            for (o, &(wd, wa)) in grads[side].iter_mut().zip(weights) {
                *o = potential_grad(g, &gd, &ga, (sign * wd, sign * wa), prec);
            }
        }
    }
    let psi = if want.psi {
        let full = |g: &Geometry| g.dist.iter().map(|&v| v / g.mu).collect();
        [full(&gx), full(&gy), gx.cos, gy.cos]
    } else {
        Default::default()
    };
    Item {
        idx,
        sums,
        psi,
        grads,
    }
}

/// Fused relation loss on host memory: values, potentials and gradients (module docs give
/// the function). `x` is the teacher `Hhat_t`, `y` the student `H_s`, both `[b, l, d]`;
/// `want` says which gradients and whether the potentials to return. Items are processed in
/// parallel.
///
/// Exactness: squared distances come from the centred Gram form except for pairs closer than
/// a small fraction of their norms, which are recomputed (with their gradient) from explicit
/// differences, as the fixtures' convention requires; products run in `prec`.
pub fn relation_host(
    x: &[f64],
    y: &[f64],
    [b, l, d]: [usize; 3],
    mask: Option<&[bool]>,
    cfg: &RelationConfig,
    prec: Precision,
    want: RelationWant,
) -> RelationHost {
    let valid = |bi: usize| -> Vec<usize> {
        (0..l)
            .filter(|&i| mask.is_none_or(|m| m[bi * l + i]))
            .collect()
    };
    let n_pairs: f64 = (0..b)
        .map(|bi| (valid(bi).len() as f64).powi(2))
        .sum::<f64>()
        .max(1.0);
    let items: Vec<Item> = (0..b)
        .into_par_iter()
        .map(|bi| {
            crate::host::simd(RelationItem {
                x: &x[bi * l * d..(bi + 1) * l * d],
                y: &y[bi * l * d..(bi + 1) * l * d],
                idx: valid(bi),
                d,
                n_pairs,
                cfg,
                prec,
                want,
            })
        })
        .collect();
    let scatter_pairs = |which: usize| -> Vec<f64> {
        if !want.psi {
            return Vec::new();
        }
        let mut out = vec![0.0; b * l * l];
        for (bi, it) in items.iter().enumerate() {
            let n = it.idx.len();
            for (a, &i) in it.idx.iter().enumerate() {
                for (c, &j) in it.idx.iter().enumerate() {
                    out[(bi * l + i) * l + j] = it.psi[which][a * n + c];
                }
            }
        }
        out
    };
    let scatter_tokens = |side: usize, term: usize| -> Vec<f64> {
        if items.iter().all(|it| it.grads[side][term].is_empty()) {
            return Vec::new();
        }
        let mut out = vec![0.0; b * l * d];
        out.par_chunks_mut(l * d.max(1))
            .zip(&items)
            .for_each(|(o, it)| {
                let g = &it.grads[side][term];
                if g.is_empty() {
                    return;
                }
                for (a, &i) in it.idx.iter().enumerate() {
                    o[i * d..(i + 1) * d].copy_from_slice(&g[a * d..(a + 1) * d]);
                }
            });
        out
    };
    let (sd, sa) = items
        .iter()
        .fold((0.0, 0.0), |acc, it| (acc.0 + it.sums.0, acc.1 + it.sums.1));
    RelationHost {
        l_d: sd / n_pairs,
        l_a: sa / n_pairs,
        psi_d: [scatter_pairs(0), scatter_pairs(1)],
        psi_a: [scatter_pairs(2), scatter_pairs(3)],
        grad_x: [scatter_tokens(0, 0), scatter_tokens(0, 1)],
        grad_y: [scatter_tokens(1, 0), scatter_tokens(1, 1)],
    }
}
