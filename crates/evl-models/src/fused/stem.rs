//! The image encoder's convolutional stem ([`crate::vlm::ImageStem`]) forward and backward:
//! each convolution as im2col and one GEMM over the whole batch, group norm and GELU as
//! loops. Activations are laid out position-major (`[images * height * width, channels]`),
//! the GEMM's natural output, so a convolution's output is the next one's input unchanged.

use rayon::prelude::*;

use super::FusedLm;
use super::kernels::{View, col_sums, gelu_backward, gelu_forward, mm};

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
}

/// The stem's slots: convolutions, and a group norm (with GELU) after each but the last.
#[derive(Debug, Clone)]
pub(super) struct StemSlots {
    pub(super) convs: Vec<ConvSpec>,
    pub(super) norms: Vec<(usize, usize)>,
    pub(super) groups: usize,
}

/// What the stem's backward pass reads.
pub(super) struct StemTape {
    /// Per convolution: its im2col matrix and input size.
    cols: Vec<(Vec<f32>, usize, usize)>,
    /// Per group norm: normalised values, `1 / std` per (image, group), output before GELU.
    norms: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    images: usize,
}

/// `x[images * h * w, cin]` -> rows `[images * oh * ow, cin * k * k]` (columns in the
/// weight's `(in, ky, kx)` order), zero outside the image.
fn im2col(x: &[f32], images: usize, h: usize, w: usize, c: &ConvSpec) -> Vec<f32> {
    let (oh, ow) = c.out(h, w);
    let kk = c.k * c.k;
    let width = c.cin * kk;
    let mut col = vec![0.0f32; images * oh * ow * width];
    // One output row (image, oy) per task: they write disjoint parts of `col`.
    col.par_chunks_mut(ow * width)
        .enumerate()
        .for_each(|(r, rows)| {
            let (img, oy) = (r / oh, r % oh);
            {
                for ox in 0..ow {
                    let row = &mut rows[ox * width..(ox + 1) * width];
                    for ky in 0..c.k {
                        let iy = (oy * c.stride + ky) as isize - c.pad as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..c.k {
                            let ix = (ox * c.stride + kx) as isize - c.pad as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let src = ((img * h + iy as usize) * w + ix as usize) * c.cin;
                            for ci in 0..c.cin {
                                row[ci * kk + ky * c.k + kx] = x[src + ci];
                            }
                        }
                    }
                }
            }
        });
    col
}

/// [`im2col`]'s adjoint: scatter-add `dcol` back onto `dx[images * h * w, cin]`.
fn col2im(dcol: &[f32], images: usize, h: usize, w: usize, c: &ConvSpec) -> Vec<f32> {
    let (oh, ow) = c.out(h, w);
    let kk = c.k * c.k;
    let width = c.cin * kk;
    let mut dx = vec![0.0f32; images * h * w * c.cin];
    // Windows overlap within an image, never across: one image per task.
    dx.par_chunks_mut(h * w * c.cin)
        .enumerate()
        .for_each(|(img, dx)| {
            for oy in 0..oh {
                for ox in 0..ow {
                    let row = &dcol[((img * oh + oy) * ow + ox) * width..][..width];
                    for ky in 0..c.k {
                        let iy = (oy * c.stride + ky) as isize - c.pad as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..c.k {
                            let ix = (ox * c.stride + kx) as isize - c.pad as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let dst = (iy as usize * w + ix as usize) * c.cin;
                            for ci in 0..c.cin {
                                dx[dst + ci] += row[ci * kk + ky * c.k + kx];
                            }
                        }
                    }
                }
            }
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
            let width = c.cin * c.k * c.k;
            let col = im2col(&x, images, h, w, c);
            let mut y = vec![0.0f32; n * c.cout];
            mm(
                &mut y,
                View::rm(n, c.cout, c.cout, 0),
                &col,
                View::rm(n, width, width, 0),
                self.p(c.w),
                View::rm(c.cout, width, width, 0).t(),
                false,
            );
            let bias = self.p(c.b);
            for row in y.chunks_exact_mut(c.cout) {
                for (o, &b) in row.iter_mut().zip(bias) {
                    *o += b;
                }
            }
            cols.push((col, h, w));
            (h, w) = (oh, ow);
            x = match st.norms.get(i) {
                Some(&(g, b)) => {
                    let (xhat, inv, z) =
                        group_norm(&y, images, c.cout, st.groups, self.p(g), self.p(b));
                    let mut a = vec![0.0f32; z.len()];
                    gelu_forward(&z, &mut a);
                    norms.push((xhat, inv, z));
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
            if let Some(&(g, b)) = st.norms.get(i) {
                let (xhat, inv, z) = &tape.norms[i];
                gelu_backward(z, &mut d);
                let (dg, db) = self.two_grads(grads, g, b);
                d = group_norm_backward(
                    &d,
                    xhat,
                    inv,
                    tape.images,
                    c.cout,
                    st.groups,
                    self.p(g),
                    dg,
                    db,
                );
            }
            let (col, h, w) = &tape.cols[i];
            let (oh, ow) = c.out(*h, *w);
            let n = tape.images * oh * ow;
            let width = c.cin * c.k * c.k;
            {
                let (gw, gb) = self.two_grads(grads, c.w, c.b);
                mm(
                    gw,
                    View::rm(c.cout, width, width, 0),
                    &d,
                    View::rm(n, c.cout, c.cout, 0).t(),
                    col,
                    View::rm(n, width, width, 0),
                    false,
                );
                col_sums(gb, &d, n, c.cout, 0);
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
                self.p(c.w),
                View::rm(c.cout, width, width, 0),
                false,
            );
            d = col2im(&dcol, tape.images, *h, *w, c);
        }
    }
}

/// Group norm (biased variance, eps 1e-5, per-channel affine, burn's) of
/// `x[images * positions, channels]`, each image's channel groups over all its positions:
/// returns (normalised values, `1 / std` per (image, group), output). The statistics are
/// summed per channel along whole rows (a group here has only a few channels, so loops over
/// a group's channels would be a few elements long), in f64, then combined per group.
fn group_norm(
    x: &[f32],
    images: usize,
    channels: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let per = channels / groups;
    let positions = x.len() / (images * channels);
    let count = (positions * per) as f64;
    let mut xhat = vec![0.0f32; x.len()];
    let mut y = vec![0.0f32; x.len()];
    let mut inv = vec![0.0f32; images * groups];
    let (mut s, mut ss) = (vec![0.0f64; channels], vec![0.0f64; channels]);
    let (mut mean_c, mut inv_c) = (vec![0.0f32; channels], vec![0.0f32; channels]);
    for img in 0..images {
        let range = img * positions * channels..(img + 1) * positions * channels;
        s.iter_mut().chain(ss.iter_mut()).for_each(|v| *v = 0.0);
        for row in x[range.clone()].chunks_exact(channels) {
            for ((a, b), &v) in s.iter_mut().zip(ss.iter_mut()).zip(row) {
                let v = f64::from(v);
                *a += v;
                *b += v * v;
            }
        }
        for g in 0..groups {
            let sum: f64 = s[g * per..(g + 1) * per].iter().sum();
            let sq: f64 = ss[g * per..(g + 1) * per].iter().sum();
            let mean = sum / count;
            let r = 1.0 / ((sq / count - mean * mean).max(0.0) + 1e-5).sqrt();
            inv[img * groups + g] = r as f32;
            mean_c[g * per..(g + 1) * per].fill(mean as f32);
            inv_c[g * per..(g + 1) * per].fill(r as f32);
        }
        let block = 256 * channels;
        x[range.clone()]
            .par_chunks(block)
            .zip(xhat[range.clone()].par_chunks_mut(block))
            .zip(y[range].par_chunks_mut(block))
            .for_each(|((xb, hb), yb)| {
                let rows = xb
                    .chunks_exact(channels)
                    .zip(hb.chunks_exact_mut(channels))
                    .zip(yb.chunks_exact_mut(channels));
                for ((xr, hr), yr) in rows {
                    for c in 0..channels {
                        let h = (xr[c] - mean_c[c]) * inv_c[c];
                        hr[c] = h;
                        yr[c] = h * gamma[c] + beta[c];
                    }
                }
            });
    }
    (xhat, inv, y)
}

/// [`group_norm`] backwards: from `dy`, adds gamma's and beta's gradients to `dg`, `db` and
/// returns d loss / d x (sums per channel along rows, as the forward pass).
#[allow(clippy::too_many_arguments)] // the forward pass's saved values and shapes
fn group_norm_backward(
    dy: &[f32],
    xhat: &[f32],
    inv: &[f32],
    images: usize,
    channels: usize,
    groups: usize,
    gamma: &[f32],
    dg: &mut [f32],
    db: &mut [f32],
) -> Vec<f32> {
    let per = channels / groups;
    let positions = dy.len() / (images * channels);
    let count = (positions * per) as f64;
    let mut dx = vec![0.0f32; dy.len()];
    let (mut sdy, mut sdyh) = (vec![0.0f64; channels], vec![0.0f64; channels]);
    let (mut m1c, mut m2c, mut rc) = (
        vec![0.0f32; channels],
        vec![0.0f32; channels],
        vec![0.0f32; channels],
    );
    for img in 0..images {
        let range = img * positions * channels..(img + 1) * positions * channels;
        sdy.iter_mut().chain(sdyh.iter_mut()).for_each(|v| *v = 0.0);
        for (drow, hrow) in dy[range.clone()]
            .chunks_exact(channels)
            .zip(xhat[range.clone()].chunks_exact(channels))
        {
            for c in 0..channels {
                sdy[c] += f64::from(drow[c]);
                sdyh[c] += f64::from(drow[c] * hrow[c]);
            }
        }
        for c in 0..channels {
            dg[c] += sdyh[c] as f32;
            db[c] += sdy[c] as f32;
        }
        for g in 0..groups {
            let cs = g * per..(g + 1) * per;
            // Sums of d x_hat = dy gamma, and of d x_hat * x_hat, over the group.
            let m1: f64 = cs
                .clone()
                .map(|c| sdy[c] * f64::from(gamma[c]))
                .sum::<f64>()
                / count;
            let m2: f64 = cs
                .clone()
                .map(|c| sdyh[c] * f64::from(gamma[c]))
                .sum::<f64>()
                / count;
            m1c[cs.clone()].fill(m1 as f32);
            m2c[cs.clone()].fill(m2 as f32);
            rc[cs].fill(inv[img * groups + g]);
        }
        let block = 256 * channels;
        dy[range.clone()]
            .par_chunks(block)
            .zip(xhat[range.clone()].par_chunks(block))
            .zip(dx[range].par_chunks_mut(block))
            .for_each(|((db_, hb), xb)| {
                let rows = db_
                    .chunks_exact(channels)
                    .zip(hb.chunks_exact(channels))
                    .zip(xb.chunks_exact_mut(channels));
                for ((drow, hrow), xr) in rows {
                    for c in 0..channels {
                        xr[c] = rc[c] * (drow[c] * gamma[c] - m1c[c] - hrow[c] * m2c[c]);
                    }
                }
            });
    }
    dx
}
