//! Single-thread f32 throughput of the `gemm` crate on the products the fused kernels run at
//! paper shapes (L = 512, h = 8, d_k = 64, D_t = 1024), with the operand layouts they use.
//! It shows why the cross-attention keeps K and V head by head and multiplies by stored
//! transposes: a transposed (column-major) right operand runs slower, and much slower with
//! a 4 KiB column stride.
//! `cargo run --release -p evl-kd --example gemm_probe`.
#![allow(unsafe_code)]

use std::time::Instant;

/// One product `C (m x n) = A (m x k) B (k x n)`; strides are in elements, `(row, column)`.
struct Case {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a: (usize, usize),
    b: (usize, usize),
}

impl Case {
    fn run(&self) {
        let Case { m, n, k, a, b, .. } = *self;
        // buffers large enough for every index the strides reach
        let extent = |rows: usize, cols: usize, (rs, cs): (usize, usize)| {
            (rows - 1) * rs + (cols - 1) * cs + 1
        };
        let av: Vec<f32> = (0..extent(m, k, a))
            .map(|i| (i % 13) as f32 * 0.1)
            .collect();
        let bv: Vec<f32> = (0..extent(k, n, b)).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let reps = 100;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..reps {
                // SAFETY: `av` holds every A(i, p) at i * a.0 + p * a.1 for i < m, p < k
                // (sized by `extent`), `bv` likewise for B, and `c` is a separate m x n
                // row-major buffer; `read_dst = false`, so C's old contents are not read.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        av.as_ptr(),
                        a.1 as isize,
                        a.0 as isize,
                        bv.as_ptr(),
                        b.1 as isize,
                        b.0 as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            best = best.min(start.elapsed().as_secs_f64() / reps as f64);
        }
        println!(
            "{:<44} {:>8.1} us {:>7.1} GFLOP/s",
            self.name,
            best * 1e6,
            2.0 * (m * n * k) as f64 / best / 1e9
        );
    }
}

fn main() {
    let (l, dk, hdk) = (512, 64, 512);
    let cases = [
        Case {
            name: "scores Q_h K_h^T, K_h a column block of K|V",
            m: l,
            n: l,
            k: dk,
            a: (hdk, 1),
            b: (1, 2 * hdk),
        },
        Case {
            name: "scores Q_h K_h^T, K_h contiguous",
            m: l,
            n: l,
            k: dk,
            a: (hdk, 1),
            b: (1, dk),
        },
        Case {
            name: "ctx A V_h (row-major right operand)",
            m: l,
            n: dk,
            k: l,
            a: (l, 1),
            b: (2 * hdk, 1),
        },
        Case {
            name: "dctx g W_O^T as a transposed view",
            m: l,
            n: hdk,
            k: l,
            a: (l, 1),
            b: (1, l),
        },
        Case {
            name: "dctx g W_O^T from a stored transpose",
            m: l,
            n: hdk,
            k: l,
            a: (l, 1),
            b: (hdk, 1),
        },
        Case {
            name: "K|V projection H_t W_KV",
            m: l,
            n: 2 * hdk,
            k: 1024,
            a: (1024, 1),
            b: (2 * hdk, 1),
        },
    ];
    for c in &cases {
        c.run();
    }
}
