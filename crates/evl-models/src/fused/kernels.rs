//! The fused kernels' numerical building blocks: strided matrix products (the `gemm` crate),
//! bias and LayerNorm passes, GELU with its derivative, and grouped causal or bidirectional
//! attention with its backward pass. Nothing here knows the model's parameters.

use rayon::prelude::*;

use super::{Group, Layout};
use crate::native::{dot, exp, gelu_and_grad, sum8};

/// A view of a row-major (or transposed) matrix inside a slice: element `(i, j)` at
/// `off + i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
pub(super) struct View {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
    pub(super) off: usize,
}

impl View {
    /// Row-major `rows x cols` at `off` with row stride `rs`.
    pub(super) fn rm(rows: usize, cols: usize, rs: usize, off: usize) -> View {
        View {
            rows,
            cols,
            rs,
            cs: 1,
            off,
        }
    }
    /// The transpose.
    pub(super) fn t(self) -> View {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            off: self.off,
        }
    }
    /// The largest index read plus one (0 for an empty view).
    pub(super) fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.off;
        }
        self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
    }
}

/// `C = A B` (or `C += A B` with `acc`) for matrices given as [`View`]s into slices, by the
/// `gemm` crate (both cores when called outside a rayon task).
///
/// # Panics
/// When the shapes do not chain or a view reaches past its slice.
pub(super) fn mm(c: &mut [f32], cv: View, a: &[f32], av: View, b: &[f32], bv: View, acc: bool) {
    assert!(
        av.rows == cv.rows && av.cols == bv.rows && bv.cols == cv.cols,
        "matrix product {}x{} by {}x{} into {}x{}",
        av.rows,
        av.cols,
        bv.rows,
        bv.cols,
        cv.rows,
        cv.cols
    );
    assert!(cv.end() <= c.len() && av.end() <= a.len() && bv.end() <= b.len());
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    if av.cols == 0 {
        if !acc {
            for i in 0..cv.rows {
                for j in 0..cv.cols {
                    c[cv.off + i * cv.rs + j * cv.cs] = 0.0;
                }
            }
        }
        return;
    }
    let par = if rayon::current_thread_index().is_some() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // SAFETY: `gemm` reads `av.rows x av.cols` elements of A at `a + off + i * rs + j * cs`,
    // likewise B, and reads (with `acc`) and writes `cv.rows x cv.cols` of C. The assertions
    // above keep every such offset inside its slice (strides are non-negative, so the largest
    // offset is `end() - 1`). C is borrowed mutably, so it aliases neither A nor B; with
    // `acc = false` C's old contents are not read.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            cv.rows,
            cv.cols,
            av.cols,
            c.as_mut_ptr().add(cv.off),
            cv.cs as isize,
            cv.rs as isize,
            acc,
            a.as_ptr().add(av.off),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr().add(bv.off),
            bv.cs as isize,
            bv.rs as isize,
            if acc { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `C = A^T B` for row-major `a[k, m]` and `b[k, n]` into `c[m, n]`: a weight gradient,
/// summed over `k` rows. The gemm crate parallelises over blocks of C, so with a small C
/// (a convolution's 32 x 144 weight) and a long reduction (14,400 positions) one core did
/// all the work; here a long reduction is split into a part per core, and the parts summed
/// (measured: 1.18 -> 0.70 ms for that shape on 2 cores).
pub(super) fn mm_at_b(c: &mut [f32], a: &[f32], m: usize, b: &[f32], n: usize, k: usize) {
    let threads = if rayon::current_thread_index().is_some() {
        1
    } else {
        rayon::current_num_threads()
    };
    let parts = threads.min(k / 1024).max(1);
    let part = |lo: usize, hi: usize, out: &mut [f32]| {
        mm(
            out,
            View::rm(m, n, n, 0),
            a,
            View::rm(hi - lo, m, m, lo * m).t(),
            b,
            View::rm(hi - lo, n, n, lo * n),
            false,
        );
    };
    if parts == 1 {
        part(0, k, c);
        return;
    }
    let chunk = k.div_ceil(parts);
    let sums: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut out = vec![0.0f32; m * n];
            part(p * chunk, ((p + 1) * chunk).min(k), &mut out);
            out
        })
        .collect();
    c.copy_from_slice(&sums[0]);
    for s in &sums[1..] {
        c.iter_mut().zip(s).for_each(|(o, &v)| *o += v);
    }
}

/// `y[r, :] += b` for every row.
pub(super) fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (o, &v) in row.iter_mut().zip(b) {
            *o += v;
        }
    }
}

/// `g += sum over rows of x` (the gradient of a bias), rows of width `g.len()` at row stride
/// `rs` starting at `off`.
pub(super) fn col_sums(g: &mut [f32], x: &[f32], rows: usize, rs: usize, off: usize) {
    let w = g.len();
    for r in 0..rows {
        let row = &x[off + r * rs..off + r * rs + w];
        for (o, &v) in g.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// LayerNorm (eps 1e-5, biased variance, as burn's) of rows of width `g.len()`: returns
/// `(x_hat, 1 / std, y)`.
pub(super) fn ln_forward(x: &[f32], g: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = g.len();
    let n = x.len() / d;
    let mut xhat = vec![0.0f32; x.len()];
    let mut inv = vec![0.0f32; n];
    let mut y = vec![0.0f32; x.len()];
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let mean = sum8(xr, 0.0, false) / d as f32;
        let var = sum8(xr, mean, true) / d as f32;
        let s = 1.0 / (var + 1e-5).sqrt();
        inv[r] = s;
        let (hr, yr) = (&mut xhat[r * d..(r + 1) * d], &mut y[r * d..(r + 1) * d]);
        for i in 0..d {
            let h = (xr[i] - mean) * s;
            hr[i] = h;
            yr[i] = h * g[i] + b[i];
        }
    }
    (xhat, inv, y)
}

/// LayerNorm's backward pass: from `dy`, adds the gradients of gamma and beta to `dg`, `db`
/// and `d x` to `dx`.
pub(super) fn ln_backward(
    dy: &[f32],
    xhat: &[f32],
    inv: &[f32],
    g: &[f32],
    dg: &mut [f32],
    db: &mut [f32],
    dx: &mut [f32],
) {
    let d = g.len();
    let mut dh = vec![0.0f32; d];
    for (r, &s) in inv.iter().enumerate() {
        let (dyr, hr) = (&dy[r * d..(r + 1) * d], &xhat[r * d..(r + 1) * d]);
        for i in 0..d {
            dg[i] += dyr[i] * hr[i];
            db[i] += dyr[i];
            dh[i] = dyr[i] * g[i];
        }
        let m1 = sum8(&dh, 0.0, false) / d as f32;
        let m2 = dot(&dh, hr) / d as f32;
        let dxr = &mut dx[r * d..(r + 1) * d];
        for i in 0..d {
            dxr[i] += s * (dh[i] - m1 - hr[i] * m2);
        }
    }
}

/// `y += a x` on SIMD lanes.
#[inline(always)]
pub(super) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Runs `f` compiled for the CPU's widest SIMD level (pulp's dispatch; the default x86-64
/// target has only SSE2). `f` must be inlined (`#[inline(always)]` on the closure) for its
/// loops to be vectorised at that level.
#[inline(always)]
pub(super) fn simd<R>(f: impl FnOnce() -> R) -> R {
    struct Op<F>(F);
    impl<R, F: FnOnce() -> R> pulp::WithSimd for Op<F> {
        type Output = R;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> R {
            (self.0)()
        }
    }
    pulp::Arch::new().dispatch(Op(f))
}

/// Elements per task in the element-wise passes.
const LANES_PER_TASK: usize = 16 * 1024;

/// GELU of every element, on the widest SIMD level, across the cores.
pub(super) fn gelu_forward(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(LANES_PER_TASK)
        .zip(x.par_chunks(LANES_PER_TASK))
        .for_each(|(y, x)| {
            simd(
                #[inline(always)]
                || {
                    for (o, &v) in y.iter_mut().zip(x) {
                        *o = gelu_and_grad(v).0;
                    }
                },
            );
        });
}

/// `dy *= gelu'(x)` element-wise, on the widest SIMD level, across the cores.
pub(super) fn gelu_backward(x: &[f32], dy: &mut [f32]) {
    dy.par_chunks_mut(LANES_PER_TASK)
        .zip(x.par_chunks(LANES_PER_TASK))
        .for_each(|(dy, x)| {
            simd(
                #[inline(always)]
                || {
                    for (o, &v) in dy.iter_mut().zip(x) {
                        *o *= gelu_and_grad(v).1;
                    }
                },
            );
        });
}

/// Causal attention of every group: weights into `p` (group, head, query, visible key) and
/// outputs into `ctx`. `qkv` rows are `[q | k | v]`, heads side by side in each.
pub(super) fn attention_forward(
    qkv: &[f32],
    lay: &Layout,
    d: usize,
    heads: usize,
    p: &mut [f32],
    ctx: &mut [f32],
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    struct Run<'a> {
        g: Group,
        qkv: &'a [f32],
        p: &'a mut [f32],
        ctx: &'a mut [f32],
        d: usize,
        heads: usize,
        scale: f32,
    }
    impl pulp::WithSimd for Run<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let Run {
                g,
                qkv,
                p,
                ctx,
                d,
                heads,
                scale,
            } = self;
            let dh = d / heads;
            let per = g.per_head();
            for h in 0..heads {
                for j in 0..g.qn {
                    let qr = g.qs + j;
                    let q = &qkv[qr * 3 * d + h * dh..][..dh];
                    let c = g.visible(j);
                    let w = &mut p[h * per + g.weights_at(j)..][..c];
                    let mut max = f32::NEG_INFINITY;
                    for (k, wk) in w.iter_mut().enumerate() {
                        let kr = g.key_row(k);
                        *wk = dot(q, &qkv[kr * 3 * d + d + h * dh..][..dh]) * scale;
                        max = max.max(*wk);
                    }
                    let mut sum = 0.0f32;
                    for wk in w.iter_mut() {
                        *wk = exp(*wk - max);
                        sum += *wk;
                    }
                    let inv = 1.0 / sum;
                    let out = &mut ctx[j * d + h * dh..][..dh];
                    out.iter_mut().for_each(|o| *o = 0.0);
                    for (k, wk) in w.iter_mut().enumerate() {
                        *wk *= inv;
                        let kr = g.key_row(k);
                        axpy(out, *wk, &qkv[kr * 3 * d + 2 * d + h * dh..][..dh]);
                    }
                }
            }
        }
    }
    // Groups own disjoint query rows and weight ranges, in row order: split both and run
    // the groups in parallel.
    let mut jobs = Vec::with_capacity(lay.groups.len());
    let (mut p_rest, mut ctx_rest) = (p, ctx);
    let mut row = 0;
    for g in &lay.groups {
        let (_, c) = std::mem::take(&mut ctx_rest).split_at_mut((g.qs - row) * d);
        let (cg, c) = c.split_at_mut(g.qn * d);
        ctx_rest = c;
        row = g.qs + g.qn;
        let (pg, pr) = std::mem::take(&mut p_rest).split_at_mut(g.per_head() * heads);
        p_rest = pr;
        jobs.push(Run {
            g: *g,
            qkv,
            p: pg,
            ctx: cg,
            d,
            heads,
            scale,
        });
    }
    jobs.into_par_iter()
        .for_each(|run| pulp::Arch::new().dispatch(run));
}

/// The backward pass of [`attention_forward`]: from `dctx`, writes d loss / d `[q | k | v]`
/// into `dqkv` (zeroed by the caller).
pub(super) fn attention_backward(
    qkv: &[f32],
    p: &[f32],
    dctx: &[f32],
    lay: &Layout,
    d: usize,
    heads: usize,
    dqkv: &mut [f32],
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    // A record block's groups write the key and value gradients of its visual rows, so a
    // (block, head) pair is the unit of parallel work: it writes head `h`'s columns of the
    // block's rows into its own buffer `[rows, q | k | v, dh]`, added into `dqkv` after.
    // (Blocks alone were three tasks for two cores in a three-record batch.)
    struct Job<'a> {
        start: usize,
        h: usize,
        groups: &'a [Group],
        qkv: &'a [f32],
        p: &'a [f32],
        dctx: &'a [f32],
        out: &'a mut [f32],
        d: usize,
        heads: usize,
        scale: f32,
    }
    impl pulp::WithSimd for Job<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let Job {
                start,
                h,
                groups,
                qkv,
                p,
                dctx,
                out,
                d,
                heads,
                scale,
            } = self;
            let dh = d / heads;
            let mut dp = Vec::new();
            let mut dq = vec![0.0f32; dh];
            for g in groups {
                let per = g.per_head();
                for j in 0..g.qn {
                    let qr = g.qs + j;
                    let c = g.visible(j);
                    let w = &p[g.p_off + h * per + g.weights_at(j)..][..c];
                    let dc = &dctx[qr * d + h * dh..][..dh];
                    dp.clear();
                    let mut s = 0.0f32;
                    for (k, &wk) in w.iter().enumerate() {
                        let kr = g.key_row(k);
                        let x = dot(dc, &qkv[kr * 3 * d + 2 * d + h * dh..][..dh]);
                        s += wk * x;
                        dp.push(x);
                    }
                    let q = &qkv[qr * 3 * d + h * dh..][..dh];
                    dq.iter_mut().for_each(|v| *v = 0.0);
                    for (k, (&wk, &x)) in w.iter().zip(&dp).enumerate() {
                        let kr = g.key_row(k);
                        let ds = wk * (x - s) * scale;
                        axpy(&mut dq, ds, &qkv[kr * 3 * d + d + h * dh..][..dh]);
                        let row = &mut out[(kr - start) * 3 * dh..(kr - start + 1) * 3 * dh];
                        axpy(&mut row[dh..2 * dh], ds, q);
                        axpy(&mut row[2 * dh..], wk, dc);
                    }
                    let qrow = &mut out[(qr - start) * 3 * dh..][..dh];
                    for (o, &v) in qrow.iter_mut().zip(&dq) {
                        *o += v;
                    }
                }
            }
        }
    }
    let mut spans = Vec::with_capacity(lay.blocks.len());
    let mut gi = 0;
    for (b, &(start, _)) in lay.blocks.iter().enumerate() {
        let end = lay.blocks.get(b + 1).map_or(lay.n, |&(s, _)| s);
        let g0 = gi;
        while gi < lay.groups.len() && lay.groups[gi].qs < end {
            gi += 1;
        }
        spans.push((start, end, g0, gi));
    }
    let mut bufs: Vec<Vec<f32>> = spans
        .iter()
        .flat_map(|&(start, end, ..)| (0..heads).map(move |_| vec![0.0f32; (end - start) * 3 * dh]))
        .collect();
    let jobs: Vec<Job<'_>> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, out)| {
            let (start, _, g0, g1) = spans[i / heads];
            Job {
                start,
                h: i % heads,
                groups: &lay.groups[g0..g1],
                qkv,
                p,
                dctx,
                out,
                d,
                heads,
                scale,
            }
        })
        .collect();
    jobs.into_par_iter()
        .for_each(|job| pulp::Arch::new().dispatch(job));
    // Each block's rows, in order: add its heads' buffers into their columns.
    let mut rest = dqkv;
    for (b, &(start, end, ..)) in spans.iter().enumerate() {
        let (mine, r) = std::mem::take(&mut rest).split_at_mut((end - start) * 3 * d);
        rest = r;
        for (h, buf) in bufs[b * heads..(b + 1) * heads].iter().enumerate() {
            for (row, src) in mine.chunks_exact_mut(3 * d).zip(buf.chunks_exact(3 * dh)) {
                for (part, s) in src.chunks_exact(dh).enumerate() {
                    let dst = &mut row[part * d + h * dh..part * d + (h + 1) * dh];
                    dst.iter_mut().zip(s).for_each(|(o, &v)| *o += v);
                }
            }
        }
    }
}
