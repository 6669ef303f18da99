//! The image encoder's convolutional stem ([`crate::vlm::ImageStem`]) forward and backward:
//! each convolution as im2col and one GEMM over the whole batch, each group norm fused with
//! the GELU after it. Activations are laid out position-major (`[images * height * width,
//! channels]`), the GEMM's natural output, so a convolution's output is the next one's input
//! unchanged. im2col's columns run `(ky, kx, channel)`, so that a window's row is a few
//! contiguous copies of the input; the weights are permuted to match (they are small).
//!
//! Measured on the `zoo` teacher (three 240x320 pages, 2 cores): this layout, the fused
//! norm passes across both cores and recomputing the normalised values in the backward pass
//! instead of storing them took the stem from 30 to 16 ms per step (forward 16 -> 7,
//! backward 14 -> 9).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::FusedLm;
use super::kernels::{View, col_sums, mm, mm_at_b, simd};
use crate::native::gelu_and_grad;

/// Rows per task in the norm and bias passes.
const BLOCK_ROWS: usize = 256;

/// One convolution: slots of its weight `[out, in, k, k]` and bias, and its geometry.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvSpec {
    pub(super) w: usize,
    pub(super) b: usize,
    pub(super) cin: usize,
    pub(super) cout: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
}

impl ConvSpec {
    fn out(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad - self.k) / self.stride + 1,
            (w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }

    /// Columns of an im2col row: `k * k * cin`.
    fn width(&self) -> usize {
        self.k * self.k * self.cin
    }

    /// The weight `[out, in, ky, kx]` permuted to im2col's column order `[out, ky, kx, in]`.
    fn permuted(&self, w: &[f32]) -> Vec<f32> {
        let (k, cin) = (self.k, self.cin);
        let mut p = vec![0.0f32; w.len()];
        for (src, dst) in w
            .chunks_exact(self.width())
            .zip(p.chunks_exact_mut(self.width()))
        {
            for ci in 0..cin {
                for kk in 0..k * k {
                    dst[kk * cin + ci] = src[ci * k * k + kk];
                }
            }
        }
        p
    }

    /// [`ConvSpec::permuted`]'s inverse, added: `g[out, in, ky, kx] += gp[out, ky, kx, in]`.
    fn add_unpermuted(&self, g: &mut [f32], gp: &[f32]) {
        let (k, cin) = (self.k, self.cin);
        for (dst, src) in g
            .chunks_exact_mut(self.width())
            .zip(gp.chunks_exact(self.width()))
        {
            for ci in 0..cin {
                for kk in 0..k * k {
                    dst[ci * k * k + kk] += src[kk * cin + ci];
                }
            }
        }
    }
}

/// The stem's slots: convolutions, and a group norm (with GELU) after each but the last.
#[derive(Debug, Clone)]
pub(super) struct StemSlots {
    pub(super) convs: Vec<ConvSpec>,
    pub(super) norms: Vec<(usize, usize)>,
    pub(super) groups: usize,
}

/// What a group norm's backward pass reads: its input, and its statistics per (image, group).
struct NormTape {
    x: Vec<f32>,
    mean: Vec<f32>,
    inv: Vec<f32>,
}

/// What the stem's backward pass reads.
pub(super) struct StemTape {
    /// Per convolution: its im2col matrix, input size and permuted weight.
    cols: Vec<(Vec<f32>, usize, usize, Vec<f32>)>,
    norms: Vec<NormTape>,
    images: usize,
}

/// `x[images * h * w, cin]` -> rows `[images * oh * ow, k * k * cin]` (columns in `(ky, kx,
/// in)` order), zero outside the image. Every element is written once, so the matrix is
/// not zeroed first (at the `zoo` teacher's sizes the zeroing alone cost as much as the
/// copies).
fn im2col(x: &[f32], images: usize, h: usize, w: usize, c: &ConvSpec) -> Vec<f32> {
    let (oh, ow) = c.out(h, w);
    let (k, cin, width) = (c.k, c.cin, c.width());
    let len = images * oh * ow * width;
    let mut col: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return col;
    }
    // One output row (image, oy) per task: they write disjoint parts of `col`.
    col.spare_capacity_mut()[..len]
        .par_chunks_mut(ow * width)
        .enumerate()
        .for_each(|(r, rows)| {
            let (img, oy) = (r / oh, r % oh);
            for (ox, row) in rows.chunks_exact_mut(width).enumerate() {
                let x0 = (ox * c.stride) as isize - c.pad as isize;
                for (ky, dst) in row.chunks_exact_mut(k * cin).enumerate() {
                    let iy = (oy * c.stride + ky) as isize - c.pad as isize;
                    if iy < 0 || iy >= h as isize {
                        put_zeros(dst);
                        continue;
                    }
                    let line = (img * h + iy as usize) * w;
                    if x0 >= 0 && x0 as usize + k <= w {
                        // The window's row lies inside the image: one copy.
                        let src = (line + x0 as usize) * cin;
                        put(dst, &x[src..src + k * cin]);
                        continue;
                    }
                    for (kx, d) in dst.chunks_exact_mut(cin).enumerate() {
                        let ix = x0 + kx as isize;
                        if ix < 0 || ix >= w as isize {
                            put_zeros(d);
                        } else {
                            let src = (line + ix as usize) * cin;
                            put(d, &x[src..src + cin]);
                        }
                    }
                }
            }
        });
    // SAFETY: the tasks above cover the first `len` elements (rows of `ow * width`, each
    // split into `width`-long windows, each into `k` runs of `k * cin`), and every run is
    // written whole, by a copy or with zeros, so all `len` elements are initialised.
    #[allow(unsafe_code)]
    unsafe {
        col.set_len(len);
    }
    col
}

/// Writes `src` into `dst` (same length).
fn put(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// Writes zeros into `dst`.
fn put_zeros(dst: &mut [MaybeUninit<f32>]) {
    for d in dst {
        d.write(0.0);
    }
}

/// [`im2col`]'s adjoint: `dx[images * h * w, cin]`, each input pixel the sum of the columns
/// that read it. Gathered one input row per task (windows overlap across output rows, so
/// scattering by output row would race).
fn col2im(dcol: &[f32], images: usize, h: usize, w: usize, c: &ConvSpec) -> Vec<f32> {
    let (oh, ow) = c.out(h, w);
    let (k, cin, width) = (c.k, c.cin, c.width());
    let mut dx = vec![0.0f32; images * h * w * cin];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(w * cin)
        .enumerate()
        .for_each(|(r, line)| {
            let (img, iy) = (r / h, r % h);
            simd(
                #[inline(always)]
                || {
                    for ky in 0..k {
                        let t = (iy + c.pad) as isize - ky as isize;
                        if t < 0
                            || !(t as usize).is_multiple_of(c.stride)
                            || t as usize / c.stride >= oh
                        {
                            continue;
                        }
                        let oy = t as usize / c.stride;
                        for ox in 0..ow {
                            let src = &dcol[((img * oh + oy) * ow + ox) * width + ky * k * cin..]
                                [..k * cin];
                            for (kx, s) in src.chunks_exact(cin).enumerate() {
                                let ix = (ox * c.stride + kx) as isize - c.pad as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let d = &mut line[ix as usize * cin..(ix as usize + 1) * cin];
                                for (o, &v) in d.iter_mut().zip(s) {
                                    *o += v;
                                }
                            }
                        }
                    }
                },
            );
        });
    dx
}

impl FusedLm {
    /// The stem on `pages[images, h, w]` (one channel): returns its output
    /// `[images * gh * gw, channels]` (one row per token, in burn's token order) and the tape.
    pub(super) fn stem_forward(
        &self,
        st: &StemSlots,
        pages: &[f32],
        images: usize,
        (mut h, mut w): (usize, usize),
    ) -> (Vec<f32>, StemTape) {
        let mut x = pages.to_vec();
        let mut cols = Vec::with_capacity(st.convs.len());
        let mut norms = Vec::with_capacity(st.norms.len());
        for (i, c) in st.convs.iter().enumerate() {
            let (oh, ow) = c.out(h, w);
            let n = images * oh * ow;
            let width = c.width();
            let col = im2col(&x, images, h, w, c);
            let wp = c.permuted(self.p(c.w));
            let mut y = vec![0.0f32; n * c.cout];
            mm(
                &mut y,
                View::rm(n, c.cout, c.cout, 0),
                &col,
                View::rm(n, width, width, 0),
                &wp,
                View::rm(c.cout, width, width, 0).t(),
                false,
            );
            let bias = self.p(c.b);
            y.par_chunks_mut(BLOCK_ROWS * c.cout).for_each(|block| {
                for row in block.chunks_exact_mut(c.cout) {
                    for (o, &b) in row.iter_mut().zip(bias) {
                        *o += b;
                    }
                }
            });
            cols.push((col, h, w, wp));
            (h, w) = (oh, ow);
            x = match st.norms.get(i) {
                Some(&(g, b)) => {
                    let (a, mean, inv) =
                        norm_gelu(&y, images, c.cout, st.groups, self.p(g), self.p(b));
                    norms.push(NormTape { x: y, mean, inv });
                    a
                }
                None => y,
            };
        }
        (
            x,
            StemTape {
                cols,
                norms,
                images,
            },
        )
    }

    /// The stem backwards from `dy` (d loss / d its output): its parameters' gradients.
    pub(super) fn stem_backward(
        &self,
        st: &StemSlots,
        tape: &StemTape,
        dy: &[f32],
        grads: &mut [f32],
    ) {
        let mut d = dy.to_vec();
        for (i, c) in st.convs.iter().enumerate().rev() {
            let (col, h, w, wp) = &tape.cols[i];
            let (oh, ow) = c.out(*h, *w);
            let n = tape.images * oh * ow;
            let width = c.width();
            {
                let bias_grad = match st.norms.get(i) {
                    Some(&(g, b)) => {
                        let (dg, db) = self.two_grads(grads, g, b);
                        Some(norm_gelu_backward(
                            &mut d,
                            &tape.norms[i],
                            tape.images,
                            st.groups,
                            self.p(g),
                            self.p(b),
                            dg,
                            db,
                        ))
                    }
                    None => None,
                };
                let (gw, gb) = self.two_grads(grads, c.w, c.b);
                match bias_grad {
                    Some(sums) => gb.iter_mut().zip(sums).for_each(|(o, s)| *o += s as f32),
                    None => col_sums(gb, &d, n, c.cout, 0),
                }
                let mut gp = vec![0.0f32; c.cout * width];
                mm_at_b(&mut gp, &d, c.cout, col, width, n);
                c.add_unpermuted(gw, &gp);
            }
            if i == 0 {
                break; // The page itself needs no gradient.
            }
            let mut dcol = vec![0.0f32; n * width];
            mm(
                &mut dcol,
                View::rm(n, width, width, 0),
                &d,
                View::rm(n, c.cout, c.cout, 0),
                wp,
                View::rm(c.cout, width, width, 0),
                false,
            );
            d = col2im(&dcol, tape.images, *h, *w, c);
        }
    }
}

/// Rows of a tile: the per-channel factors of the norm passes are repeated this many times,
/// so that their loops run flat over `TILE_ROWS * channels` elements. (Loops over one row's
/// 16 channels were too short for the compiler's unrolled SIMD loop and ran scalar.)
const TILE_ROWS: usize = 64;

/// `v` (one value per channel) repeated for [`TILE_ROWS`] rows.
fn tiled(v: &[f32]) -> Vec<f32> {
    v.repeat(TILE_ROWS)
}

/// Per channel, the sum over the rows of a tile-shaped accumulator.
fn fold_tile(acc: &[f64], channels: usize) -> Vec<f64> {
    let mut s = vec![0.0f64; channels];
    for row in acc.chunks_exact(channels) {
        s.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
    }
    s
}

/// Sums per channel of `x` and of its square over a block of rows, in f64: `[sums, squares]`.
fn channel_sums(x: &[f32], channels: usize) -> Vec<f64> {
    let tile = TILE_ROWS * channels;
    let (mut a, mut b) = (vec![0.0f64; tile], vec![0.0f64; tile]);
    simd(
        #[inline(always)]
        || {
            for chunk in x.chunks(tile) {
                for ((a, b), &v) in a.iter_mut().zip(b.iter_mut()).zip(chunk) {
                    let v = f64::from(v);
                    *a += v;
                    *b += v * v;
                }
            }
        },
    );
    let mut s = fold_tile(&a, channels);
    s.extend(fold_tile(&b, channels));
    s
}

/// Element-wise sum of two equally long vectors (a reduction's combiner).
fn add(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    a
}

/// Per group, the mean and `1 / std`, from per-channel sums and squares over `positions`
/// rows (biased variance, eps 1e-5, as burn's group norm).
fn group_stats(sums: &[f64], channels: usize, groups: usize, positions: usize) -> Vec<(f64, f64)> {
    let per = channels / groups;
    let count = (positions * per) as f64;
    (0..groups)
        .map(|g| {
            let s: f64 = sums[g * per..(g + 1) * per].iter().sum();
            let q: f64 = sums[channels + g * per..channels + (g + 1) * per]
                .iter()
                .sum();
            let mean = s / count;
            (
                mean,
                1.0 / ((q / count - mean * mean).max(0.0) + 1e-5).sqrt(),
            )
        })
        .collect()
}

/// Group norm (per-channel affine, as burn's) of `x[images * positions, channels]`, each
/// image's channel groups over all its positions, then GELU: returns the output, and the
/// mean and `1 / std` per (image, group). The statistics are summed per channel along whole
/// rows (a group has only a few channels), in f64, then combined per group.
fn norm_gelu(
    x: &[f32],
    images: usize,
    channels: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let per = channels / groups;
    let size = x.len() / images.max(1);
    let positions = size / channels;
    let mut out = vec![0.0f32; x.len()];
    let (mut mean, mut inv) = (vec![0.0f32; images * groups], vec![0.0f32; images * groups]);
    let block = BLOCK_ROWS * channels;
    for img in 0..images {
        let xi = &x[img * size..(img + 1) * size];
        let sums = xi
            .par_chunks(block)
            .map(|b| channel_sums(b, channels))
            .reduce(|| vec![0.0f64; 2 * channels], add);
        let stats = group_stats(&sums, channels, groups, positions);
        // z = (x - mean) * inv * gamma + beta = x * scale + shift, per channel.
        let (mut scale, mut shift) = (vec![0.0f32; channels], vec![0.0f32; channels]);
        for (g, &(m, r)) in stats.iter().enumerate() {
            mean[img * groups + g] = m as f32;
            inv[img * groups + g] = r as f32;
            for c in g * per..(g + 1) * per {
                let sc = r * f64::from(gamma[c]);
                scale[c] = sc as f32;
                shift[c] = (f64::from(beta[c]) - m * sc) as f32;
            }
        }
        let (scale, shift) = (tiled(&scale), tiled(&shift));
        xi.par_chunks(block)
            .zip(out[img * size..(img + 1) * size].par_chunks_mut(block))
            .for_each(|(xb, ob)| {
                simd(
                    #[inline(always)]
                    || {
                        for (xt, ot) in xb.chunks(scale.len()).zip(ob.chunks_mut(scale.len())) {
                            let lanes = ot.iter_mut().zip(xt).zip(&scale).zip(&shift);
                            for (((o, &v), &sc), &sh) in lanes {
                                *o = gelu_and_grad(v * sc + sh).0;
                            }
                        }
                    },
                );
            });
    }
    (out, mean, inv)
}

/// [`norm_gelu`] backwards, in place: `d` (d loss / d output) becomes d loss / d input.
/// Adds gamma's and beta's gradients to `dg`, `db`, and returns the sums of d loss / d input
/// per channel (the gradient of the preceding convolution's bias). The normalised values
/// are recomputed from the input rather than stored.
#[allow(clippy::too_many_arguments)] // the forward pass's saved values and parameters
fn norm_gelu_backward(
    d: &mut [f32],
    tape: &NormTape,
    images: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    dg: &mut [f32],
    db: &mut [f32],
) -> Vec<f64> {
    let channels = gamma.len();
    let per = channels / groups;
    let size = d.len() / images.max(1);
    let count = (size / channels * per) as f64;
    let block = BLOCK_ROWS * channels;
    let tile = TILE_ROWS * channels;
    let mut bias = vec![0.0f64; channels];
    for img in 0..images {
        let xi = &tape.x[img * size..(img + 1) * size];
        let di = &mut d[img * size..(img + 1) * size];
        // Per channel: x_hat = x * r + c0, z = x_hat * gamma + beta = x * za + zb.
        let (mut r, mut c0, mut za, mut zb) = (
            vec![0.0f32; channels],
            vec![0.0f32; channels],
            vec![0.0f32; channels],
            vec![0.0f32; channels],
        );
        for c in 0..channels {
            let (m, inv) = (
                tape.mean[img * groups + c / per],
                tape.inv[img * groups + c / per],
            );
            r[c] = inv;
            c0[c] = -m * inv;
            za[c] = inv * gamma[c];
            zb[c] = beta[c] - m * inv * gamma[c];
        }
        let (rt, c0t, zat, zbt) = (tiled(&r), tiled(&c0), tiled(&za), tiled(&zb));
        // d z = d out * gelu'(z), kept in `d`; sums per channel of d z and of d z * x_hat.
        let sums = di
            .par_chunks_mut(block)
            .zip(xi.par_chunks(block))
            .map(|(db_, xb)| {
                let (mut s1, mut s2) = (vec![0.0f64; tile], vec![0.0f64; tile]);
                simd(
                    #[inline(always)]
                    || {
                        for (dt, xt) in db_.chunks_mut(tile).zip(xb.chunks(tile)) {
                            let lanes = dt.iter_mut().zip(xt).zip(&zat).zip(&zbt);
                            for (((o, &x), &a), &b) in lanes {
                                *o *= gelu_and_grad(x * a + b).1;
                            }
                            let lanes = s1.iter_mut().zip(s2.iter_mut()).zip(&*dt).zip(xt);
                            for ((((a, b), &g), &x), (&r, &c)) in lanes.zip(rt.iter().zip(&c0t)) {
                                *a += f64::from(g);
                                *b += f64::from(g * (x * r + c));
                            }
                        }
                    },
                );
                let mut s = fold_tile(&s1, channels);
                s.extend(fold_tile(&s2, channels));
                s
            })
            .reduce(|| vec![0.0f64; 2 * channels], add);
        let (s1, s2) = sums.split_at(channels);
        for c in 0..channels {
            dg[c] += s2[c] as f32;
            db[c] += s1[c] as f32;
        }
        // d x = inv * (d z * gamma - mean over the group of d x_hat - x_hat * mean of
        // d x_hat * x_hat), with d x_hat = d z * gamma:
        // d x = d z * p - q - x_hat * u, with p = inv gamma, q = inv m1, u = inv m2.
        let (mut pc, mut qc, mut uc) = (
            vec![0.0f32; channels],
            vec![0.0f32; channels],
            vec![0.0f32; channels],
        );
        for g in 0..groups {
            let cs = g * per..(g + 1) * per;
            let m1: f64 = cs.clone().map(|c| s1[c] * f64::from(gamma[c])).sum::<f64>() / count;
            let m2: f64 = cs.clone().map(|c| s2[c] * f64::from(gamma[c])).sum::<f64>() / count;
            for c in cs {
                pc[c] = r[c] * gamma[c];
                qc[c] = r[c] * m1 as f32;
                uc[c] = r[c] * m2 as f32;
            }
        }
        let (pt, qt, ut) = (tiled(&pc), tiled(&qc), tiled(&uc));
        let sums = di
            .par_chunks_mut(block)
            .zip(xi.par_chunks(block))
            .map(|(db_, xb)| {
                let mut s = vec![0.0f64; tile];
                simd(
                    #[inline(always)]
                    || {
                        for (dt, xt) in db_.chunks_mut(tile).zip(xb.chunks(tile)) {
                            let lanes = dt.iter_mut().zip(xt).zip(rt.iter().zip(&c0t));
                            for (((o, &x), (&r, &c)), ((&p, &q), &u)) in
                                lanes.zip(pt.iter().zip(&qt).zip(&ut))
                            {
                                *o = *o * p - q - (x * r + c) * u;
                            }
                            for (a, &v) in s.iter_mut().zip(&*dt) {
                                *a += f64::from(v);
                            }
                        }
                    },
                );
                fold_tile(&s, channels)
            })
            .reduce(|| vec![0.0f64; channels], add);
        bias.iter_mut().zip(sums).for_each(|(o, s)| *o += s);
    }
    bias
}
