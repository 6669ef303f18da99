//! The fused relation kernel (method.md 2.3; [`crate::relation`] gives the function and the
//! padding convention): per batch item, value, potentials and exact gradients of `L_D` and
//! `L_A` from centred Gram products on host buffers, with close pairs and ill-conditioned
//! cosines recomputed explicitly.

use crate::host::{Real, Surrogate, dot, gemm, gram_upper, mirror_upper, near_fraction, sum};
use crate::relation::{RelationConfig, RelationOutput};
use burn::tensor::{Bool, Tensor};
use evl_models::device::{Precision, precision_of, tensor_like, to_vec_bool, to_vec_f64};
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

/// [`crate::relation::relation_loss`]'s fused form: one host pass per batch item (see
/// [`relation_host`]), value and exact gradient from two matrix products per input instead
/// of the graph's `[B, L, L]` chains, handed to autodiff as surrogates.
pub(crate) fn relation_loss_fused(
    hhat_t: Tensor<3>,
    hs: Tensor<3>,
    student_mask: Option<&Tensor<2, Bool>>,
    cfg: &RelationConfig,
) -> RelationOutput {
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

/// Start of row `i` in the packed strict upper triangle of an `n x n` matrix (row `i` holds
/// columns `i + 1..n`). The relation kernel stores its pair quantities this way: they are
/// symmetric, so half the memory traffic, and no mirroring of the potentials.
#[inline(always)]
fn upper_start(n: usize, i: usize) -> usize {
    i * (2 * n - i - 1) / 2
}

/// The full symmetric `n x n` matrix from its packed strict upper triangle and diagonal.
fn unpack_symmetric(upper: &[f64], diag: &[f64], n: usize) -> Vec<f64> {
    let mut full = vec![0.0; n * n];
    for i in 0..n {
        let o = upper_start(n, i);
        full[i * n + i + 1..(i + 1) * n].copy_from_slice(&upper[o..o + n - i - 1]);
        full[i * n + i] = diag[i];
    }
    mirror_upper(&mut full, n);
    full
}

/// One input's geometry on one batch item (valid tokens only). Pair quantities are packed
/// strict upper triangles (`upper_start`).
struct Geometry<T> {
    n: usize,
    d: usize,
    /// Centred tokens `x - mean`, `n x d`, in the products' precision `T`.
    xc: Vec<T>,
    mean: Vec<f64>,
    /// Raw tokens, `n x d`.
    x: Vec<f64>,
    /// `max(|x_i|, norm_eps)` and whether the floor was active.
    r: Vec<f64>,
    floored: Vec<bool>,
    /// Ill-conditioned tokens for the centred cosine (see `max_condition`).
    bad: Vec<bool>,
    /// Distances `d_ij`, `i < j` (clamped), and whether `sq_ij` exceeded the clamp (the
    /// diagonal distance is 0 with zero gradient).
    dist: Vec<f64>,
    live: Vec<bool>,
    /// Pairs `i < j` recomputed from explicit differences, in row order.
    near: Vec<(usize, usize)>,
    /// Distance mean `mu` and whether it is above its floor (differentiated then).
    mu: f64,
    mu_live: bool,
    /// Cosines `x_i . x_j / (r_i r_j)`, `i < j`, and the diagonal `|x_i|^2 / r_i^2`.
    cos: Vec<f64>,
    cos_diag: Vec<f64>,
}

#[inline(always)] // into the item's SIMD dispatch (`RelationItem`)
fn geometry<T: Real>(x: Vec<f64>, n: usize, d: usize, cfg: &RelationConfig) -> Geometry<T> {
    let prec = T::PRECISION;
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
    // Gram form below cancels far less; distances do not change. Only the Gram matrix's
    // strict upper triangle is read below.
    let xc_t: Vec<T> = xc.iter().map(|&v| T::of(v)).collect();
    let gram = gram_upper(&xc_t, n, d);
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
    // The upper triangle row by row, packed. Each row is two branch-free passes that
    // vectorise (squared distances and cosines from the Gram entries; then distances, clamp
    // flags and their sum in eight lanes), with the rare near pairs and ill-conditioned
    // tokens patched from explicit products in between.
    let m_pairs = n * n.saturating_sub(1) / 2;
    let mut cos = Vec::with_capacity(m_pairs);
    let mut dist = Vec::with_capacity(m_pairs);
    let mut live = Vec::with_capacity(m_pairs);
    let mut near = Vec::new();
    let (mut lanes, mut tail) = ([0.0; 8], 0.0);
    for i in 0..n {
        let (lo, o) = (i + 1, upper_start(n, i));
        let (qi, pi, ri) = (q[i], p[i], r[i]);
        let grow = &gram[i * n + lo..(i + 1) * n];
        let mut any_near = false;
        cos.extend(
            grow.iter()
                .zip(p[lo..].iter().zip(&r[lo..]))
                .map(|(&g, (&pj, &rj))| (g.wide() + pi + pj + mm) / (ri * rj)),
        );
        dist.extend(grow.iter().zip(&q[lo..]).map(|(&g, &qj)| {
            let sq = qi + qj - 2.0 * g.wide();
            any_near |= sq < frac * (qi + qj);
            sq
        }));
        let (cr, dr) = (&mut cos[o..], &mut dist[o..]);
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
        live.extend(dr.iter().map(|&sq| sq > clamp));
        let mut dch = dr.chunks_exact_mut(8);
        for dv in &mut dch {
            for l in 0..8 {
                dv[l] = dv[l].max(clamp).sqrt();
                lanes[l] += 2.0 * dv[l];
            }
        }
        for dv in dch.into_remainder() {
            *dv = dv.max(clamp).sqrt();
            tail += 2.0 * *dv;
        }
    }
    let cos_diag: Vec<f64> = norm
        .iter()
        .zip(&r)
        .map(|(&v, &ri)| v * v / (ri * ri))
        .collect();
    let sum = lanes.iter().fold(tail, |a, &v| a + v);
    let off = (n * n.saturating_sub(1)).max(1) as f64;
    let mu_raw = sum / off;
    Geometry {
        n,
        d,
        xc: xc_t,
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
        cos_diag,
    }
}

/// Gradient of `wd * sum(gd . psi_D) + wa * sum(ga . psi_A)` with respect to one input's
/// tokens, where `gd`, `ga` are the upstream gradients of its two potentials (symmetric:
/// packed strict upper triangles, and `ga`'s diagonal; `gd`'s is 0). One `n x n` by `n x d`
/// product; near pairs' distance terms are added from explicit differences.
#[inline(always)] // into the item's SIMD dispatch (`RelationItem`)
fn potential_grad<T: Real>(
    g: &Geometry<T>,
    (gd, ga, ga_diag): (&[f64], &[f64], &[f64]),
    (wd, wa): (f64, f64),
) -> Vec<f64> {
    let (n, d) = (g.n, g.d);
    // dL/dd_ij, through psi_D = d / mu with mu differentiated (the full-matrix sum is twice
    // the upper triangle's: the diagonal distance is 0)
    let t = 2.0 * dot(gd, &g.dist);
    let off = (n * n.saturating_sub(1)).max(1) as f64;
    let shift = if g.mu_live {
        t / (g.mu * g.mu * off)
    } else {
        0.0
    };
    // With E_ij = gd_ij / mu - shift (= dL/dd_ij), W_ij = (E_ij + E_ji) / d_ij = 2 E_ij / d_ij
    // on live off-diagonal pairs (gd is symmetric), and grad_i = sum_j W_ij (x_i - x_j).
    // Angle: S = G_A + G_A^T = 2 ga, dL/dxn_i = sum_j S_ij xn_j, then through the
    // normalisation. Both go into one matrix P (the product's left operand):
    //   P_ij = -W_ij + S_ij / (r_i r_j)   (0 / r_j for ill-conditioned columns j, whose
    //                                       angle terms are added from raw tokens instead)
    // P is symmetric apart from those columns: each row of the upper triangle is made once,
    // the full matrix by a tiled mirror, and the rare ill-conditioned columns rewritten.
    // Row sums need whole rows: each upper row adds its own sum and, by symmetry, one entry
    // to every later row's running sum (a contiguous vector add).
    // (reciprocals multiplied instead of divisions repeated over n x n entries: a vector
    // division costs about twenty multiplications here, and the results differ by an ulp)
    let inv_mu = 1.0 / g.mu;
    let inv_r: Vec<f64> = g.r.iter().map(|&r| 1.0 / r).collect();
    // 1 / r_j, and 0 for ill-conditioned columns
    let inv_rb: Vec<f64> = inv_r
        .iter()
        .zip(&g.bad)
        .map(|(&v, &bad)| if bad { 0.0 } else { v })
        .collect();
    let any_bad = g.bad.iter().any(|&b| b);
    // P is made in the product's precision `T` (f32 for f32 tensors), entry by entry from
    // f64 arithmetic: the same rounding as narrowing a finished f64 matrix, one pass fewer
    let mut pmat = vec![T::zero(); n * n];
    let mut w_upper = if any_bad {
        Vec::with_capacity(gd.len())
    } else {
        Vec::new()
    };
    let mut wsum = vec![0.0; n]; // rowsum(W)
    let mut csum = vec![0.0; n]; // sum_j S_ij cos_ij
    let mut msum = vec![0.0; n]; // sum_j S_ij / r_j over well-conditioned j
    let mut wrow = vec![0.0; n];
    let mut srow = vec![0.0; n];
    let mut near_w = Vec::with_capacity(g.near.len());
    let mut nk = 0;
    for i in 0..n {
        let (lo, o) = (i + 1, upper_start(n, i));
        let len = n - lo;
        let (gdr, dr, lr) = (&gd[o..o + len], &g.dist[o..o + len], &g.live[o..o + len]);
        let (gar, cr) = (&ga[o..o + len], &g.cos[o..o + len]);
        let (wr, sr) = (&mut wrow[..len], &mut srow[..len]);
        for (((w, &gv), &dv), &l) in wr.iter_mut().zip(gdr).zip(dr).zip(lr) {
            let wij = wd * (2.0 * (gv * inv_mu - shift)) / dv;
            *w = if l { wij } else { 0.0 };
        }
        while nk < g.near.len() && g.near[nk].0 == i {
            let k = g.near[nk].1 - lo;
            near_w.push(wr[k]);
            wr[k] = 0.0;
            nk += 1;
        }
        for (sv, &gv) in sr.iter_mut().zip(gar) {
            *sv = wa * (2.0 * gv);
        }
        let iri = inv_r[i];
        // `iri * inv_r[j]` is the same product as `inv_r[j] * iri` bit for bit, so the
        // mirror below makes exactly the lower entries this formula would
        for (((pv, &w), &sv), &irj) in pmat[i * n + lo..(i + 1) * n]
            .iter_mut()
            .zip(wr.iter())
            .zip(sr.iter())
            .zip(&inv_r[lo..])
        {
            *pv = T::of(-w + sv * (iri * irj));
        }
        let s_ii = wa * (2.0 * ga_diag[i]);
        pmat[i * n + i] = T::of(s_ii * (iri * iri));
        let irbi = inv_rb[i];
        for ((((ws, cs), ms), (&w, &sv)), &c) in wsum[lo..]
            .iter_mut()
            .zip(csum[lo..].iter_mut())
            .zip(msum[lo..].iter_mut())
            .zip(wr.iter().zip(sr.iter()))
            .zip(cr)
        {
            *ws += w;
            *cs += sv * c;
            *ms += sv * irbi;
        }
        wsum[i] += sum(wr);
        csum[i] += dot(sr, cr) + s_ii * g.cos_diag[i];
        msum[i] += dot(sr, &inv_rb[lo..]) + s_ii * irbi;
        if any_bad {
            w_upper.extend_from_slice(wr);
        }
    }
    mirror_upper(&mut pmat, n);
    if any_bad {
        // ill-conditioned column j: P_ij = -W_ij (W_jj = 0)

        for j in (0..n).filter(|&j| g.bad[j]) {
            for i in 0..n {
                pmat[i * n + j] = T::of(match i.cmp(&j) {
                    std::cmp::Ordering::Less => -w_upper[upper_start(n, i) + j - i - 1],
                    std::cmp::Ordering::Greater => -w_upper[upper_start(n, j) + i - j - 1],
                    std::cmp::Ordering::Equal => 0.0,
                });
            }
        }
    }
    let prod = gemm(&pmat, (n, n), false, &g.xc, (n, d), false);
    let mut out = Vec::with_capacity(n * d);
    for i in 0..n {
        let (pr, x) = (&prod[i * d..(i + 1) * d], &g.x[i * d..(i + 1) * d]);
        // grad_i = (P Xc)_i + (angle's mean share) m + diag_i x_i - rowsum(W)_i m, where the
        // last term turns rowsum(W) x_i - (W X)_i into the cancellation-free
        // rowsum(W) xc_i - (W Xc)_i.
        let ri = g.r[i];
        let mut dg = wsum[i];
        if !g.floored[i] {
            dg -= csum[i] / (ri * ri);
        }
        let mc = msum[i] / ri - wsum[i];
        out.extend(
            pr.iter()
                .zip(&g.mean)
                .zip(x)
                .map(|((&p, &m), &xv)| p.wide() + mc * m + dg * xv),
        );
    }
    for j in (0..n).filter(|&j| g.bad[j]) {
        let xj = &g.x[j * d..(j + 1) * d];
        for i in 0..n {
            let gaij = match i.cmp(&j) {
                std::cmp::Ordering::Less => ga[upper_start(n, i) + j - i - 1],
                std::cmp::Ordering::Greater => ga[upper_start(n, j) + i - j - 1],
                std::cmp::Ordering::Equal => ga_diag[i],
            };
            let c = wa * (2.0 * gaij) / (g.r[j] * g.r[i]);
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
    match prec {
        Precision::F32 => relation_item_in::<f32>(x, y, idx, d, n_pairs, cfg, want),
        Precision::F64 => relation_item_in::<f64>(x, y, idx, d, n_pairs, cfg, want),
    }
}

/// [`relation_item`] with its products in `T`.
#[allow(clippy::too_many_arguments)]
#[inline(always)] // into `RelationItem`'s dispatch
fn relation_item_in<T: Real>(
    x: &[f64],
    y: &[f64],
    idx: Vec<usize>,
    d: usize,
    n_pairs: f64,
    cfg: &RelationConfig,
    want: RelationWant,
) -> Item {
    let n = idx.len();
    let gather = |src: &[f64]| -> Vec<f64> {
        let mut out = Vec::with_capacity(n * d);
        for &i in &idx {
            out.extend_from_slice(&src[i * d..(i + 1) * d]);
        }
        out
    };
    let (gx, gy) = (
        geometry::<T>(gather(x), n, d, cfg),
        geometry::<T>(gather(y), n, d, cfg),
    );
    // differences of the potentials (psi_D = d / mu, 0 on the diagonal where the distance
    // is stored as 0), their squared sums, then the upstream gradients in place (separate
    // passes vectorise; one loop with two running sums does not)
    // (one pass each over the packed upper triangles, scaled as they are made: the sums are
    // taken of the scaled values and unscaled once; reciprocals multiplied rather than a
    // division per pair). Full-matrix sums: twice the upper triangle, plus the angle
    // potential's diagonal (the distance potential's is 0 on both sides).
    let (rx, ry, c) = (1.0 / gx.mu, 1.0 / gy.mu, 2.0 / n_pairs);
    let gd: Vec<f64> = gx
        .dist
        .iter()
        .zip(&gy.dist)
        .map(|(&a, &b)| c * (a * rx - b * ry))
        .collect();
    let scaled_diff = |x: &[f64], y: &[f64]| -> Vec<f64> {
        x.iter().zip(y).map(|(&a, &b)| c * (a - b)).collect()
    };
    let ga = scaled_diff(&gx.cos, &gy.cos);
    let ga_diag = scaled_diff(&gx.cos_diag, &gy.cos_diag);
    let sums = (
        2.0 * dot(&gd, &gd) / (c * c),
        (2.0 * dot(&ga, &ga) + dot(&ga_diag, &ga_diag)) / (c * c),
    );
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
                *o = potential_grad(g, (&gd, &ga, &ga_diag), (sign * wd, sign * wa));
            }
        }
    }
    let psi = if want.psi {
        let psi_d = |g: &Geometry<T>| {
            let scaled: Vec<f64> = g.dist.iter().map(|&v| v / g.mu).collect();
            unpack_symmetric(&scaled, &vec![0.0; n], n)
        };
        let psi_a = |g: &Geometry<T>| unpack_symmetric(&g.cos, &g.cos_diag, n);
        [psi_d(&gx), psi_d(&gy), psi_a(&gx), psi_a(&gy)]
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
