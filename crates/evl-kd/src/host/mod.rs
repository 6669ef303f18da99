//! The fused host kernels of every loss ([`crate::Kernel::Fused`], and
//! [`crate::Kernel::Auto`] on the CPU), and the pieces they share: matrix products in the
//! inputs' precision, SIMD dispatch, and the scalar "surrogate" that carries a
//! host-computed gradient into burn's autodiff graph.
//!
//! Why fused host kernels: on burn's `flex` CPU backend a loss written as a chain of tensor
//! ops pays per-op dispatch and materialises every intermediate (BENCHMARKS.md, issue 3).
//! For the losses whose forward and backward we can write in closed form, one host pass
//! computes the value and the exact gradient with a few GEMMs, and [`Surrogate`] hands the
//! gradient to autodiff. This tree is the only place that knows the trick; the tensor-op
//! ("graph") forms stay in the family files ([`crate::ot`], [`crate::mhca`],
//! [`crate::relation`], [`crate::sinkhorn`], [`crate::baselines`]), which choose between the
//! two through [`crate::Kernel::fused_for`].
//!
//! The kernels read their inputs back to host memory and build their outputs on the inputs'
//! device, so they run on any device (off the CPU at the cost of that round trip).
//!
//! - [`sinkhorn`]: the batched, masked log-domain Sinkhorn solver;
//! - [`ot`]: the detached-plan OT loss (normalisation, cost, plan, gradient);
//! - [`mhca`]: the cross-attention forward and backward pass, and the fused pass over loss
//!   terms on its output;
//! - [`relation`]: the distance and angle relation kernel;
//! - [`objective`]: `L_mhca` and `L_rel` of the objective in one cross-attention pass;
//! - [`kd`], [`uld`], [`multilevel_ot`]: the baselines' kernels.

pub(crate) mod kd;
pub(crate) mod mhca;
pub(crate) mod multilevel_ot;
pub(crate) mod objective;
pub(crate) mod ot;
pub(crate) mod relation;
pub(crate) mod sinkhorn;
pub(crate) mod uld;

use burn::tensor::Tensor;
use evl_models::device::{Precision, tensor_like};
use ndarray::{ArrayView2, ArrayViewMut2};

/// `C (m x n) = A (m x k) B^T` where `B` is `n x k`, all row-major `f64` on input and output,
/// multiplied in `prec` (f32 GEMM for f32 tensors: twice the throughput; the caller keeps
/// every cancellation-prone quantity out of the product, see [`SqDistsItem`]).
#[inline(always)] // its conversions vectorise inside the caller's SIMD dispatch
pub(crate) fn matmul_nt(
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
    prec: Precision,
) -> Vec<f64> {
    // `mul_into`'s gemm kernels on host buffers; burn's own flex matmul through temporary
    // tensors measured 25% slower here (relation, paper shapes: the tensor round trips).
    match prec {
        Precision::F64 => gemm(a, (m, k), false, b, (n, k), true),
        Precision::F32 => {
            let narrow = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            gemm(&narrow(a), (m, k), false, &narrow(b), (n, k), true)
                .into_iter()
                .map(f64::from)
                .collect()
        }
    }
}

/// The upper block triangle of the Gram matrix `X X^T` (`x` is `n x d`, row-major): diagonal
/// and upper blocks of `GRAM_BLOCK` rows are exact, blocks below the diagonal are left zero.
/// A Gram matrix is symmetric, so its users read the upper triangle only; skipping the lower
/// blocks saves up to half of the product (`gemm` has no symmetric rank-k update; 128-row
/// blocks keep each product large enough to run at full speed).
#[inline(always)]
pub(crate) fn gram_upper<T: Real>(x: &[T], n: usize, d: usize) -> Vec<T> {
    let mut c = vec![T::zero(); n * n];
    if n == 0 || d == 0 {
        return c;
    }
    // X^T stored: `gemm` runs a row-major right operand faster than a transposed view
    // (gemm_probe)
    let xt = transpose(x, n, d);
    for i0 in (0..n).step_by(GRAM_BLOCK) {
        let bi = GRAM_BLOCK.min(n - i0);
        let a = view(x, bi, d, d, i0 * d);
        // rows i0.. against every row block from i0 on, in one product per row block
        let cols = n - i0;
        let b = view(&xt, d, cols, n, i0);
        mul_into(&a, &b, &mut view_mut(&mut c, bi, cols, n, i0 * n + i0));
    }
    c
}

/// Rows per block of [`gram_upper`].
const GRAM_BLOCK: usize = 128;

#[allow(clippy::too_many_arguments)]
fn mm<T: Real>(
    a: &[T],
    a_shape: (usize, usize),
    a_t: bool,
    b: &[T],
    b_shape: (usize, usize),
    b_t: bool,
    c: &mut [T],
    c_shape: (usize, usize),
) {
    let a = ArrayView2::from_shape(a_shape, a).expect("A matches its shape");
    let b = ArrayView2::from_shape(b_shape, b).expect("B matches its shape");
    let a = if a_t { a.t() } else { a };
    let b = if b_t { b.t() } else { b };
    let mut c = ArrayViewMut2::from_shape(c_shape, c).expect("C matches its shape");
    mul_into(&a, &b, &mut c);
}

/// The float types the fused kernels run in: `f32` and `f64`.
pub(crate) trait Real: ndarray::NdFloat + burn::tensor::Element {
    /// `x` rounded to this type.
    fn of(x: f64) -> Self;
    /// IEEE total order (`f32::total_cmp`).
    fn total_cmp_(&self, other: Self) -> std::cmp::Ordering;
    /// Exact widening to `f64`.
    fn wide(self) -> f64;
    /// `e^x` to about one ulp, branch-free so loops over it vectorise (libm's `exp` is a
    /// scalar call per element: 40% of the KD kernel's time). Subnormal results are computed
    /// (within one subnormal step), 0 below them, `+inf` above the largest finite result;
    /// NaN stays NaN.
    fn exp_fast(self) -> Self;
    /// This type as a [`Precision`].
    const PRECISION: Precision;
}

/// `e^x` for f32: `2^k e^r`, `k = round(x log2 e)` by the 1.5 * 2^23 rounding trick,
/// `r = x - k ln 2` (Cody-Waite split), `e^r` by its degree-7 Taylor polynomial
/// (`|r| <= ln2 / 2`: truncation < 5e-9 relative), `2^k` assembled in the exponent bits.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -104.0;
    const HI: f32 = 88.72;
    let xc = x.clamp(LO, HI);
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let kf = xc * std::f32::consts::LOG2_E + MAGIC;
    let k = kf - MAGIC;
    // the integer sits in the low mantissa bits: a bit cast, no (saturating, scalar)
    // float -> int conversion, so the loop stays vectorised
    let ki = kf.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = (xc - k * 0.693_145_75) - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^k as two normal factors, so results down into the subnormals and up to f32::MAX
    // come out right
    let (k1, k2) = (ki >> 1, ki - (ki >> 1));
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * pow2(k1) * pow2(k2);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `e^x` for f64, as [`exp_f32`] with the 1.5 * 2^52 trick and a degree-12 polynomial
/// (truncation < 2e-16 relative).
#[inline(always)]
fn exp_f64(x: f64) -> f64 {
    const LO: f64 = -745.2;
    const HI: f64 = 709.78;
    let xc = x.clamp(LO, HI);
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    let kf = xc * std::f64::consts::LOG2_E + MAGIC;
    let k = kf - MAGIC;
    let ki = kf.to_bits() as i64 - MAGIC.to_bits() as i64;
    // fdlibm's split of ln 2: the high part has trailing zero bits, so k * LN2_HI is exact
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 479_001_600.0;
    for c in [
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let (k1, k2) = (ki >> 1, ki - (ki >> 1));
    let pow2 = |e: i64| f64::from_bits(((e + 1023) as u64) << 52);
    let y = p * pow2(k1) * pow2(k2);
    if x < LO {
        0.0
    } else if x > HI {
        f64::INFINITY
    } else {
        y
    }
}

impl Real for f32 {
    const PRECISION: Precision = Precision::F32;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn total_cmp_(&self, other: Self) -> std::cmp::Ordering {
        self.total_cmp(&other)
    }
    fn wide(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}

impl Real for f64 {
    const PRECISION: Precision = Precision::F64;
    fn of(x: f64) -> Self {
        x
    }
    fn total_cmp_(&self, other: Self) -> std::cmp::Ordering {
        self.total_cmp(&other)
    }
    fn wide(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f64(self)
    }
}

/// Runs `op` compiled for the widest SIMD level this CPU offers (AVX-512, else AVX2 + FMA,
/// else the baseline), picked at run time by pulp's dispatch, as the `gemm` crate does for
/// its kernels. The default x86-64 target has only SSE2, so plain loops vectorise two f64
/// wide; inside `simd` the same loops vectorise to the machine's width. Only code inlined
/// into the dispatched function benefits: `op`'s `with_simd` and the kernels it calls are
/// `#[inline(always)]` (a closure would not do: LLVM compiles a large closure body as its own
/// function, without the target features). Results are bit for bit those of the baseline
/// build: the vectoriser keeps every operation and its order (no reassociation, no fused
/// multiply-add contraction).
#[inline(always)]
pub(crate) fn simd<Op: pulp::WithSimd>(op: Op) -> Op::Output {
    pulp::Arch::new().dispatch(op)
}

/// Maximum over `x` with sixteen independent lanes (`v > m ? v : m` per lane compiles to a
/// packed max; a single running maximum is a serial chain of compares). NaN entries never
/// win, as in the scalar fold; `-inf` for an empty or all-NaN slice.
#[inline(always)]
pub(crate) fn max<T: Real>(x: &[T]) -> T {
    let pick = |m: T, v: T| if v > m { v } else { m };
    let mut acc = [T::neg_infinity(); 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &v| pick(m, v));
    for ch in chunks {
        for l in 0..16 {
            acc[l] = pick(acc[l], ch[l]);
        }
    }
    acc.iter().fold(tail, |m, &v| pick(m, v))
}

/// Sum with eight independent accumulators (vectorises; a single running sum is a serial
/// dependency chain).
#[inline(always)]
pub(crate) fn sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(T::zero(), |a, &v| a + v);
    for ch in chunks {
        for l in 0..8 {
            acc[l] += ch[l];
        }
    }
    acc.iter().fold(tail, |a, &v| a + v)
}

/// Dot product with eight independent accumulators, as [`sum`].
#[inline(always)]
pub(crate) fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (cx, cy) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .fold(T::zero(), |a, (&u, &v)| a + u * v);
    for (u, v) in cx.zip(cy) {
        for l in 0..8 {
            acc[l] += u[l] * v[l];
        }
    }
    acc.iter().fold(tail, |a, &v| a + v)
}

/// A tensor's values on the host in `T` (a cast when the dtype differs), detached.
pub(crate) fn host_vec<T: Real, const D: usize>(t: &Tensor<D>) -> Vec<T> {
    t.clone()
        .detach()
        .into_data()
        .convert::<T>()
        .try_into_vec::<T>()
        .expect("reading a float tensor back to the host")
}

/// `op(A) op(B)` in `T` for row-major `A` (`a_shape`) and `B` (`b_shape`).
pub(crate) fn gemm<T: Real>(
    a: &[T],
    a_shape: (usize, usize),
    a_t: bool,
    b: &[T],
    b_shape: (usize, usize),
    b_t: bool,
) -> Vec<T> {
    let m = if a_t { a_shape.1 } else { a_shape.0 };
    let n = if b_t { b_shape.0 } else { b_shape.1 };
    let mut c = vec![T::zero(); m * n];
    mm(a, a_shape, a_t, b, b_shape, b_t, &mut c, (m, n));
    c
}

/// A row-major matrix view of `rows x cols` entries starting at `x[offset]`, consecutive rows
/// `stride` apart (a column block of a wider matrix without copying it).
pub(crate) fn view<T>(
    x: &[T],
    rows: usize,
    cols: usize,
    stride: usize,
    offset: usize,
) -> ArrayView2<'_, T> {
    use ndarray::ShapeBuilder;
    ArrayView2::from_shape((rows, cols).strides((stride, 1)), &x[offset..])
        .expect("view fits its buffer")
}

/// The mutable counterpart of [`view`].
pub(crate) fn view_mut<T>(
    x: &mut [T],
    rows: usize,
    cols: usize,
    stride: usize,
    offset: usize,
) -> ArrayViewMut2<'_, T> {
    use ndarray::ShapeBuilder;
    ArrayViewMut2::from_shape((rows, cols).strides((stride, 1)), &mut x[offset..])
        .expect("view fits its buffer")
}

/// `c = a b` on views of any strides (transpose a view with `.t()`).
///
/// Every host kernel's matrix product goes through here. It calls the `gemm` crate, the
/// same crate and version burn's `flex` backend uses, whose kernels are chosen at run time
/// (AVX-512 where present): about 1.2x matrixmultiply's throughput per core on this
/// project's CI machine (BENCHMARKS.md). Inside a rayon worker (the kernels parallelise
/// over batch items) the product runs on the calling thread; called from outside one, it
/// spreads over rayon's pool.
///
/// # Panics
/// When the shapes do not chain (`a` is `m x k`, `b` `k x n`, `c` `m x n`).
pub(crate) fn mul_into<T: Real>(
    a: &ArrayView2<'_, T>,
    b: &ArrayView2<'_, T>,
    c: &mut ArrayViewMut2<'_, T>,
) {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert!(
        k == k2 && c.dim() == (m, n),
        "matrix product: {m}x{k} times {k2}x{n} into {:?}",
        c.dim()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(T::zero());
        return;
    }
    let par = if rayon::current_thread_index().is_some() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    let (sa, sb) = (a.strides(), b.strides());
    let sc = [c.strides()[0], c.strides()[1]];
    // SAFETY: `gemm` reads `m x k` elements of A at `a_ptr + i * sa[0] + p * sa[1]`, `k x n`
    // of B likewise, and writes `m x n` of C at `c_ptr + i * sc[0] + j * sc[1]`. ndarray's
    // views guarantee those offsets lie in their buffers for every index below `dim()` (the
    // dimensions were checked above, and are non-zero); C is a unique (`&mut`) view, so it
    // aliases neither A nor B; `read_dst = false` so C's old contents (initialised `T`s)
    // are not read. `T` is `f32` or `f64`, both handled by `gemm`.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            sc[1],
            sc[0],
            false,
            a.as_ptr(),
            sa[1],
            sa[0],
            b.as_ptr(),
            sb[1],
            sb[0],
            T::zero(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
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
        self.grad_vec(x, grad.to_vec());
    }

    /// [`Self::grad`] from a gradient already in the kernel's precision `T` (no `f64`
    /// round trip).
    pub(crate) fn grad_vec<T: Real, const D: usize>(&mut self, x: &Tensor<D>, grad: Vec<T>) {
        self.add(Self::term(x, grad));
    }

    /// The term `sum(x . grad)` that [`Self::grad_vec`] registers, built on its own: burn's
    /// element-wise ops run on the calling thread, so callers with several large gradients
    /// build their terms on different threads and [`Self::add`] them in a fixed order.
    pub(crate) fn term<T: Real, const D: usize>(x: &Tensor<D>, grad: Vec<T>) -> Option<Tensor<1>> {
        x.is_tracked().then(|| {
            let g = evl_models::device::tensor_from_vec(grad, x.dims(), x);
            (x.clone() * g).sum()
        })
    }

    /// Registers a term made by [`Self::term`] (`None`: an untracked input).
    pub(crate) fn add(&mut self, term: Option<Tensor<1>>) {
        if let Some(term) = term {
            self.acc = Some(match self.acc.take() {
                Some(a) => a + term,
                None => term,
            });
        }
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

/// The transpose (`cols x rows`) of the row-major `rows x cols` matrix `m`, in 16 x 16
/// tiles: each full tile is read as sixteen row segments into a fixed-size buffer and
/// written as sixteen contiguous segments of `out`'s rows (fixed trip counts, no index
/// arithmetic per element); edge tiles entry by entry.
pub(crate) fn transpose<T: Copy + Default>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 16;
    let mut out = vec![T::default(); rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            if r0 + TILE <= rows && c0 + TILE <= cols {
                let mut buf = [[T::default(); TILE]; TILE];
                for (r, src) in m[r0 * cols + c0..].chunks(cols).take(TILE).enumerate() {
                    let src: &[T; TILE] = src[..TILE].try_into().expect("full tile");
                    for c in 0..TILE {
                        buf[c][r] = src[c];
                    }
                }
                for (c, b) in buf.iter().enumerate() {
                    let at = (c0 + c) * rows + r0;
                    out[at..at + TILE].copy_from_slice(b);
                }
            } else {
                for r in r0..(r0 + TILE).min(rows) {
                    for c in c0..(c0 + TILE).min(cols) {
                        out[c * rows + r] = m[r * cols + c];
                    }
                }
            }
        }
    }
    out
}

/// Copies the strict upper triangle of the row-major `n x n` matrix `m` onto its lower
/// triangle. Tiled so that both the reads and the column-order writes stay in L1: writing
/// each mirrored entry as it is computed misses the cache on every element once the rows
/// outgrow it (`n = 512` f64 rows are 4 KiB apart).
pub(crate) fn mirror_upper<T: Copy + Default>(m: &mut [T], n: usize) {
    const TILE: usize = 32;
    // each tile is read row by row into a transposed local copy, then written out as
    // contiguous row segments (no per-element column indexing)
    let mut buf = [[T::default(); TILE]; TILE];
    for ib in (0..n).step_by(TILE) {
        let ie = (ib + TILE).min(n);
        for jb in (ib..n).step_by(TILE) {
            let je = (jb + TILE).min(n);
            for i in ib..ie {
                for (jj, &v) in m[i * n + jb..i * n + je].iter().enumerate() {
                    buf[jj][i - ib] = v;
                }
            }
            // row j receives columns i < j of the tile (all of them off the diagonal tile)
            for j in jb..je {
                let hi = ie.min(j);
                if hi > ib {
                    m[j * n + ib..j * n + hi].copy_from_slice(&buf[j - jb][..hi - ib]);
                }
            }
        }
    }
}

/// Pairs whose Gram-form squared distance falls below this fraction of
/// `|x_i - m|^2 + |y_j - m|^2` (centred by the item's mean `m`) are recomputed from explicit
/// differences: there the Gram form would lose more than ~1e-5 (f32) or ~1e-10 (f64) of the
/// value to cancellation.
pub(crate) fn near_fraction(prec: Precision) -> f64 {
    match prec {
        Precision::F32 => 0.1,
        Precision::F64 => 1e-5,
    }
}

/// Squared Euclidean distances between the rows of `x` (`[b, n, d]`) and `y` (`[b, m, d]`),
/// `[b, n, m]`, with the accuracy of explicit differences where it matters (the fixtures'
/// convention) at the cost of a matrix product elsewhere: per item, both sets are centred by
/// their joint mean (distances do not change; the Gram form then cancels far less for
/// clustered tokens), `|x_i|^2 + |y_j|^2 - 2 x_i . y_j` comes from one product in `prec`, and
/// pairs closer than [`near_fraction`] of their centred norms are recomputed explicitly in f64.
pub(crate) fn sq_dists(
    x: &[f64],
    y: &[f64],
    [b, n, m, d]: [usize; 4],
    prec: Precision,
) -> Vec<f64> {
    use rayon::prelude::*;
    let mut out = vec![0.0; b * n * m];
    out.par_chunks_mut((n * m).max(1))
        .enumerate()
        .for_each(|(bi, o)| {
            let xb = &x[bi * n * d..(bi + 1) * n * d];
            let yb = &y[bi * m * d..(bi + 1) * m * d];
            o.copy_from_slice(&simd(SqDistsItem { xb, yb, d, prec }));
        });
    out
}

/// One item of [`sq_dists`] (`xb` is `n x d`, `yb` `m x d`), compiled for this CPU's vector
/// width: `n x m` squared distances.
pub(crate) struct SqDistsItem<'a> {
    /// Rows of the first set.
    pub xb: &'a [f64],
    /// Rows of the second set.
    pub yb: &'a [f64],
    /// Row width.
    pub d: usize,
    /// Precision of the product.
    pub prec: Precision,
}

impl pulp::WithSimd for SqDistsItem<'_> {
    type Output = Vec<f64>;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Vec<f64> {
        let SqDistsItem { xb, yb, d, prec } = self;
        let (n, m) = (xb.len() / d.max(1), yb.len() / d.max(1));
        let mut mean = vec![0.0; d];
        for row in xb.chunks_exact(d).chain(yb.chunks_exact(d)) {
            mean.iter_mut().zip(row).for_each(|(a, v)| *a += v);
        }
        mean.iter_mut().for_each(|a| *a /= (n + m).max(1) as f64);
        let centre = |z: &[f64]| -> Vec<f64> {
            let mut out = Vec::with_capacity(z.len());
            for r in z.chunks_exact(d) {
                out.extend(r.iter().zip(&mean).map(|(v, a)| v - a));
            }
            out
        };
        let (xc, yc) = (centre(xb), centre(yb));
        let sq = |z: &[f64]| -> Vec<f64> { z.chunks_exact(d).map(|r| dot(r, r)).collect() };
        let (qx, qy) = (sq(&xc), sq(&yc));
        let mut g = matmul_nt(&xc, &yc, n, d, m, prec);
        let frac = near_fraction(prec);
        // the Gram form row by row in place (a branch-free pass that vectorises), then the
        // rare near pairs recomputed from explicit differences
        for (i, row) in g.chunks_exact_mut(m.max(1)).enumerate() {
            let qi = qx[i];
            let mut any_near = false;
            for (v, &qj) in row.iter_mut().zip(&qy) {
                let s = qi + qj;
                let e = s - 2.0 * *v;
                any_near |= e < frac * s;
                *v = e;
            }
            if any_near {
                let xi = &xb[i * d..(i + 1) * d];
                for (j, v) in row.iter_mut().enumerate() {
                    if *v < frac * (qi + qy[j]) {
                        let yj = &yb[j * d..(j + 1) * d];
                        *v = xi.iter().zip(yj).map(|(a, c)| (a - c) * (a - c)).sum();
                    }
                }
            }
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_upper_copies_the_upper_triangle_and_nothing_else() {
        for n in [0, 1, 2, 31, 32, 33, 70] {
            let mut m: Vec<f64> = (0..n * n).map(|k| k as f64).collect();
            mirror_upper(&mut m, n);
            for i in 0..n {
                for j in 0..n {
                    let want = if j >= i { i * n + j } else { j * n + i };
                    assert_eq!(m[i * n + j], want as f64, "n = {n}, ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn lane_max_equals_the_running_maximum() {
        let scalar = |x: &[f32]| {
            x.iter()
                .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
        };
        for n in [0, 1, 5, 15, 16, 17, 33, 64, 100] {
            // values with the maximum in every position, NaN sprinkled in
            let x: Vec<f32> = (0..n)
                .map(|k| match k % 7 {
                    3 => f32::NAN,
                    _ => ((k * 37 % 23) as f32 - 11.0) * 0.5,
                })
                .collect();
            assert_eq!(max(&x).to_bits(), scalar(&x).to_bits(), "n = {n}");
            for top in 0..n {
                let mut y = x.clone();
                y[top] = 1e3;
                assert_eq!(max(&y), 1e3, "n = {n}, max at {top}");
            }
        }
        assert_eq!(max::<f64>(&[f64::NAN; 20]), f64::NEG_INFINITY);
    }

    #[test]
    fn mul_into_matches_a_plain_triple_loop_on_strided_and_transposed_views() {
        // column blocks of wider matrices (row stride > width), transposed views, a
        // column-block destination, outside and inside a rayon worker, and empty shapes
        let (m, k, n) = (37, 19, 23);
        let a: Vec<f64> = (0..m * (k + 5))
            .map(|i| ((i * 7919) % 97) as f64 - 48.0)
            .collect();
        let b: Vec<f64> = (0..n * (k + 3))
            .map(|i| ((i * 104_729) % 89) as f64 - 44.0)
            .collect();
        let av = view(&a, m, k, k + 5, 2); // m x k
        let bt = view(&b, n, k, k + 3, 1); // n x k, used transposed
        let mut want = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|p| av[[i, p]] * bt[[j, p]]).sum();
            }
        }
        for inside_pool in [false, true] {
            let mut c = vec![f64::NAN; m * (n + 4)]; // NaN: must be overwritten, never read
            let mut run = || mul_into(&av, &bt.t(), &mut view_mut(&mut c, m, n, n + 4, 3));
            if inside_pool {
                rayon::scope(|_| run());
            } else {
                run();
            }
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(c[i * (n + 4) + 3 + j], want[i * n + j], "({i}, {j})");
                }
            }
        }
        // A^T B with A stored k x m
        let at: Vec<f32> = (0..k * m).map(|i| (i % 13) as f32 - 6.0).collect();
        let bb: Vec<f32> = (0..k * n).map(|i| (i % 11) as f32 - 5.0).collect();
        let got = gemm(&at, (k, m), true, &bb, (k, n), false);
        for i in 0..m {
            for j in 0..n {
                let w: f32 = (0..k).map(|p| at[p * m + i] * bb[p * n + j]).sum();
                assert_eq!(got[i * n + j], w);
            }
        }
        // k = 0: the product is all zeros; m = 0 or n = 0: nothing to write
        let mut z = vec![1.0f64; 6];
        let (e1, e2) = (
            ndarray::Array2::<f64>::zeros((2, 0)),
            ndarray::Array2::<f64>::zeros((0, 3)),
        );
        mul_into(&e1.view(), &e2.view(), &mut view_mut(&mut z, 2, 3, 3, 0));
        assert_eq!(z, vec![0.0; 6]);
        assert!(gemm::<f64>(&[], (0, 4), false, &[0.0; 8], (4, 2), false).is_empty());
    }

    #[test]
    fn fast_exp_is_within_a_few_ulps_of_libm_over_the_whole_range() {
        let mut worst32 = 0.0f64;
        let mut worst64 = 0.0f64;
        for i in 0..=200_000 {
            let x = -800.0 + 1600.0 * i as f64 / 200_000.0;
            let (e, g) = (x.exp(), exp_f64(x));
            if e.is_normal() {
                worst64 = worst64.max(((g - e) / e).abs());
            } else if e.is_finite() {
                assert!((g - e).abs() <= 2.0 * 4.9e-324, "{x}: {g:e} vs {e:e}");
            } else {
                assert_eq!(g, e, "{x}");
            }
            let x32 = x as f32;
            let (e, g) = (x32.exp(), exp_f32(x32));
            if e.is_normal() {
                worst32 = worst32.max(((g - e) / e).abs() as f64);
            } else if e.is_finite() {
                assert!((g - e).abs() <= 2.0 * 1.5e-45, "{x32}: {g:e} vs {e:e}");
            } else {
                assert_eq!(g, e, "{x32}");
            }
        }
        assert!(worst64 < 6e-16, "f64 worst relative error {worst64:e}");
        assert!(worst32 < 2.4e-7, "f32 worst relative error {worst32:e}");
        assert!(exp_f64(f64::NAN).is_nan() && exp_f32(f32::NAN).is_nan());
        assert_eq!(
            (exp_f64(f64::NEG_INFINITY), exp_f32(f32::NEG_INFINITY)),
            (0.0, 0.0)
        );
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn transpose_moves_every_entry_across_tile_edges() {
        for (rows, cols) in [(0, 3), (1, 1), (3, 70), (33, 31), (64, 65)] {
            let m: Vec<usize> = (0..rows * cols).collect();
            let t = transpose(&m, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], m[r * cols + c], "{rows}x{cols} ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn gram_upper_matches_explicit_dots_on_and_above_the_diagonal() {
        // sizes around the block edge (128), and a single row
        for n in [1, 5, 127, 128, 129, 300] {
            let d = 9;
            let x: Vec<f64> = (0..n * d)
                .map(|k| ((k * 7919 % 1013) as f64 / 1013.0 - 0.5) * 3.0)
                .collect();
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            for prec in [Precision::F64, Precision::F32] {
                let g: Vec<f64> = match prec {
                    Precision::F64 => gram_upper(&x, n, d),
                    Precision::F32 => gram_upper(&x32, n, d).into_iter().map(f64::from).collect(),
                };
                assert_eq!(g.len(), n * n);
                let tol = match prec {
                    Precision::F64 => 1e-12,
                    Precision::F32 => 1e-5,
                };
                for i in 0..n {
                    for j in i..n {
                        let want: f64 = (0..d).map(|k| x[i * d + k] * x[j * d + k]).sum();
                        let got = g[i * n + j];
                        assert!(
                            (got - want).abs() <= tol * (1.0 + want.abs()),
                            "n {n} {prec:?} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sq_dists_match_explicit_differences_for_clustered_and_identical_tokens() {
        let (b, n, m, d) = (2, 7, 5, 33);
        // tokens on a far-away cluster (offset 1e3, spread 1e-2), one exact duplicate pair
        let mut s = 7u64;
        let mut r = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let x: Vec<f64> = (0..b * n * d)
            .map(|k| 1e3 * (k % d) as f64 + 1e-2 * r())
            .collect();
        let mut y: Vec<f64> = (0..b * m * d)
            .map(|k| 1e3 * (k % d) as f64 + 1e-2 * r())
            .collect();
        y[..d].copy_from_slice(&x[..d]);
        for prec in [Precision::F64, Precision::F32] {
            let got = sq_dists(&x, &y, [b, n, m, d], prec);
            for bi in 0..b {
                for i in 0..n {
                    for j in 0..m {
                        let xi = &x[(bi * n + i) * d..(bi * n + i + 1) * d];
                        let yj = &y[(bi * m + j) * d..(bi * m + j + 1) * d];
                        let e: f64 = xi.iter().zip(yj).map(|(a, c)| (a - c) * (a - c)).sum();
                        let g = got[(bi * n + i) * m + j];
                        let tol = if prec == Precision::F64 { 1e-9 } else { 1e-4 };
                        assert!((g - e).abs() <= tol * e + 1e-300, "{prec:?} {g} vs {e}");
                    }
                }
            }
            assert_eq!(sq_dists(&x, &y, [b, n, m, d], prec)[0], 0.0);
        }
    }
}
