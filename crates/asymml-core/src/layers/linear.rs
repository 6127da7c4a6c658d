//! Fully connected layer.

use super::{threads, Param};
use crate::error::{CoreError, Result};
use crate::gemm::{sgemm, Mat};
use crate::rng::Rng;
use crate::tensor::Tensor;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
#[path = "linear_x86.rs"]
mod x86;

/// Linear: weight [O, I], bias [O]; y = x Wᵀ + b.
pub struct Linear {
    pub in_f: usize,
    pub out_f: usize,
    pub weight: Param,
    pub bias: Param,
}

impl Linear {
    /// PyTorch's default initialisation: W and b uniform in ±1/√I.
    pub fn new(in_f: usize, out_f: usize, rng: &mut Rng) -> Self {
        let bound = 1.0 / (in_f as f32).sqrt();
        let mut u = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                .collect()
        };
        let w = u(out_f * in_f);
        let b = u(out_f);
        Linear {
            in_f,
            out_f,
            weight: Param::new(Tensor {
                shape: vec![out_f, in_f],
                data: w,
            }),
            bias: Param::new(Tensor {
                shape: vec![out_f],
                data: b,
            }),
        }
    }

    fn batch(&self, x: &Tensor) -> Result<usize> {
        let b = x.shape.first().copied().unwrap_or(0);
        if x.shape.len() != 2 || x.shape[1] != self.in_f {
            return Err(CoreError::Shape(format!(
                "linear: expected input [B, {}], got {:?}",
                self.in_f, x.shape
            )));
        }
        Ok(b)
    }

    /// x: [B, I] → y: [B, O].
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        let b = self.batch(x)?;
        y.resize(&[b, self.out_f]);
        if b <= SMALL_B && self.out_f > 0 && self.in_f > 0 {
            self.forward_small(x, y, b);
            return Ok(());
        }
        for row in y.data.chunks_mut(self.out_f) {
            row.copy_from_slice(&self.bias.value.data);
        }
        let (i, o) = (self.in_f, self.out_f);
        sgemm(
            b,
            o,
            i,
            Mat::rm(&x.data, i),
            Mat::rm_t(&self.weight.value.data, i),
            &mut y.data,
            true,
            threads(),
        );
        Ok(())
    }

    /// x: [B, I], dy: [B, O] → dx: [B, I] (if asked); accumulates ∇W = dyᵀx and ∇b = Σ dy.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>) -> Result<()> {
        let b = self.batch(x)?;
        let (i, o) = (self.in_f, self.out_f);
        if dy.shape != [b, o] {
            return Err(CoreError::Shape(format!(
                "linear backward: ∇Y {:?}, expected [{b}, {o}]",
                dy.shape
            )));
        }
        if b <= SMALL_B && o > 0 && i > 0 {
            self.backward_small(x, dy, dx, b);
            return Ok(());
        }
        let t = threads();
        sgemm(
            o,
            i,
            b,
            Mat::rm_t(&dy.data, o),
            Mat::rm(&x.data, i),
            &mut self.weight.grad.data,
            true,
            t,
        );
        for row in dy.data.chunks(o) {
            self.bias
                .grad
                .data
                .iter_mut()
                .zip(row)
                .for_each(|(g, v)| *g += v);
        }
        if let Some(dx) = dx {
            dx.resize(&[b, i]);
            sgemm(
                b,
                i,
                o,
                Mat::rm(&dy.data, o),
                Mat::rm(&self.weight.value.data, i),
                &mut dx.data,
                false,
                t,
            );
        }
        Ok(())
    }
}

/// Batches up to this size take the streaming kernels: one pass over W (and ∇W). At small batch a fully
/// connected layer is bound by reading its weights (VGG16's classifier.0: 411 MB for 8 rows); a general GEMM
/// packs W first, which reads and writes it once more.
const SMALL_B: usize = 8;
/// Inputs per block in forward: a block of a weight row (16 KiB) stays in L1 while the batch rows pass over
/// it, and is long enough for the hardware prefetcher to stream W.
const FWD_BLOCK: usize = 4096;
/// Inputs per block in backward: the blocks of W, ∇W and the batch's x and ∇x stay in L2.
const BWD_BLOCK: usize = 2048;
/// Output rows per parallel task in forward.
const ROWS_PER_TASK: usize = 16;

simd_fn! {
/// acc[r] += Σ_j w[j]·x[r·stride + j] for the batch rows r < acc.len(), over j < w.len(): four rows at a
/// time, each with its own 8-lane accumulator (four independent chains per loaded vector of w).
fn dot_rows(w: &[f32], x: &[f32], stride: usize, acc: &mut [f32]) {
    let len = w.len();
    let fold = |v: [f32; 8]| ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
    let mut r0 = 0;
    while r0 < acc.len() {
        let nr = (acc.len() - r0).min(4);
        // Rows past the batch repeat its last row (their sums are dropped).
        let row = |q: usize| {
            let r = r0 + q.min(nr - 1);
            &x[r * stride..r * stride + len]
        };
        let (x0, x1, x2, x3) = (row(0), row(1), row(2), row(3));
        let mut s = [[0f32; 8]; 4];
        let n8 = len / 8 * 8;
        for ((((wv, a), b), c), d) in w[..n8]
            .chunks_exact(8)
            .zip(x0[..n8].chunks_exact(8))
            .zip(x1[..n8].chunks_exact(8))
            .zip(x2[..n8].chunks_exact(8))
            .zip(x3[..n8].chunks_exact(8))
        {
            for l in 0..8 {
                s[0][l] += wv[l] * a[l];
                s[1][l] += wv[l] * b[l];
                s[2][l] += wv[l] * c[l];
                s[3][l] += wv[l] * d[l];
            }
        }
        let xs = [x0, x1, x2, x3];
        for q in 0..nr {
            let tail: f32 = (n8..len).map(|j| w[j] * xs[q][j]).sum();
            acc[r0 + q] += fold(s[q]) + tail;
        }
        r0 += 4;
    }
}
}

/// acc [nr × b] += rows [nr × I] · x [b × I]ᵀ (b ≤ 8 batch rows of I values), a block of [`FWD_BLOCK_X86`]
/// inputs at a time: three weight rows against four batch rows per kernel call ([`x86::rows_dot`]), batch rows
/// past the batch repeating its last one (their sums are dropped).
#[cfg(target_arch = "x86_64")]
fn block_rows_x86(rows: &[f32], x: &[f32], (i, b): (usize, usize), acc: &mut [f32]) {
    let nr = rows.len() / i;
    for i0 in (0..i).step_by(FWD_BLOCK_X86) {
        let len = FWD_BLOCK_X86.min(i - i0);
        let wrow = |r: usize| &rows[r * i + i0..r * i + i0 + len];
        for q0 in (0..b).step_by(4) {
            let nq = (b - q0).min(4);
            let xrow = |q: usize| {
                let r = q0 + q.min(nq - 1);
                &x[r * i + i0..r * i + i0 + len]
            };
            let xs = [xrow(0), xrow(1), xrow(2), xrow(3)];
            let mut add = |r0: usize, sums: &[[f32; 4]]| {
                for (g, s) in sums.iter().enumerate() {
                    for (q, &v) in s.iter().take(nq).enumerate() {
                        acc[(r0 + g) * b + q0 + q] += v;
                    }
                }
            };
            let mut r0 = 0;
            while r0 < nr {
                // `block_rows_x86` runs only where `x86::available()` said AVX2 and FMA are there.
                match nr - r0 {
                    1 => {
                        let mut s = [[0f32; 4]; 1];
                        // SAFETY: AVX2 and FMA are there (above).
                        unsafe { x86::rows_dot([wrow(r0)], xs, &mut s) };
                        add(r0, &s);
                        r0 += 1;
                    }
                    2 => {
                        let mut s = [[0f32; 4]; 2];
                        // SAFETY: AVX2 and FMA are there (above).
                        unsafe { x86::rows_dot([wrow(r0), wrow(r0 + 1)], xs, &mut s) };
                        add(r0, &s);
                        r0 += 2;
                    }
                    _ => {
                        let mut s = [[0f32; 4]; 3];
                        // SAFETY: AVX2 and FMA are there (above).
                        unsafe {
                            x86::rows_dot([wrow(r0), wrow(r0 + 1), wrow(r0 + 2)], xs, &mut s)
                        };
                        add(r0, &s);
                        r0 += 3;
                    }
                }
            }
        }
    }
}

/// ∇W [nr × I] += d · x and ∇x [b × I] += dᵀ · W for the weight rows `w` (nr × I) and their ∇W `dw`, `d(r)` the
/// batch's ∇y of row r (b ≤ 8 values): a block of [`BWD_BLOCK`] inputs at a time, four weight rows per kernel call
/// ([`x86::rows_grad`]). Only where `x86::available()`.
#[cfg(target_arch = "x86_64")]
fn block_grad_x86(
    w: &[f32],
    dw: &mut [f32],
    (x, dx): (&[f32], &mut [f32]),
    (i, b): (usize, usize),
    d: &dyn Fn(usize) -> [f32; SMALL_B],
) {
    /// The kernel on weight rows r0 .. r0 + R (their ∇W rows the next R of `rows`), inputs i0 .. i0 + len.
    fn group<'a, const R: usize>(
        (w, rows): (&[f32], &mut impl Iterator<Item = &'a mut [f32]>),
        (x, dx): (&[f32], &mut [f32]),
        (i, b, i0, len, r0): (usize, usize, usize, usize, usize),
        d: &dyn Fn(usize) -> [f32; SMALL_B],
    ) {
        let ws: [&[f32]; R] = std::array::from_fn(|g| &w[(r0 + g) * i + i0..][..len]);
        let gs: [&mut [f32]; R] = std::array::from_fn(|_| {
            let row = rows.next().expect("a ∇W row per weight row");
            &mut row[i0..i0 + len]
        });
        let ds: [[f32; SMALL_B]; R] = std::array::from_fn(|g| d(r0 + g));
        // SAFETY: AVX2 and FMA are there (`x86::available()`, checked by the caller); x and ∇x hold b rows of
        // I values, and the block i0 .. i0 + len of each is within its row.
        unsafe { x86::rows_grad(ws, gs, (&x[i0..], &mut dx[i0..], i), &ds, b) };
    }
    let nr = w.len() / i;
    for i0 in (0..i).step_by(BWD_BLOCK) {
        let len = BWD_BLOCK.min(i - i0);
        let mut rows = dw.chunks_exact_mut(i);
        let mut r0 = 0;
        while r0 < nr {
            let at = (i, b, i0, len, r0);
            let step = (nr - r0).min(4);
            match step {
                1 => group::<1>((w, &mut rows), (x, dx), at, d),
                2 => group::<2>((w, &mut rows), (x, dx), at, d),
                3 => group::<3>((w, &mut rows), (x, dx), at, d),
                _ => group::<4>((w, &mut rows), (x, dx), at, d),
            }
            r0 += step;
        }
    }
}

/// Inputs per block of the x86 kernel: three weight rows' blocks (96 KiB) and the batch's (8 rows: 256 KiB)
/// stay in L2 between the batch's groups of four rows. (VGG16's classifier.0 at batch 8, one thread: 42.5 ms
/// at 8192 and 42.6 ms at 32768, 44.8 ms at 2048; the portable kernel 69.8 ms.)
#[cfg(target_arch = "x86_64")]
const FWD_BLOCK_X86: usize = 8192;

simd_fn! {
/// One weight row's block in backward, for the batch rows r < d.len(): dw[j] += Σ_r d[r]·x[r·stride + j]
/// (∇W) and dx[r·stride + j] += d[r]·w[j] (∇x), for j < w.len(); axpys over cache-resident blocks.
fn row_grad(w: &[f32], dw: &mut [f32], x: &[f32], dx: &mut [f32], stride: usize, d: &[f32]) {
    let len = w.len();
    let dw = &mut dw[..len];
    for (r, &dr) in d.iter().enumerate() {
        let xr = &x[r * stride..r * stride + len];
        for (o, &xv) in dw.iter_mut().zip(xr) {
            *o += dr * xv;
        }
        let dst = &mut dx[r * stride..r * stride + len];
        for (o, &wv) in dst.iter_mut().zip(w) {
            *o += dr * wv;
        }
    }
}
}

impl Linear {
    /// Forward for b ≤ 8 rows: y = x Wᵀ + b with W streamed once (parallel over blocks of output rows).
    fn forward_small(&self, x: &Tensor, y: &mut Tensor, b: usize) {
        let (i, o) = (self.in_f, self.out_f);
        let w = &self.weight.value.data;
        // Per task: up to ROWS_PER_TASK outputs × b batch rows, output-major.
        let parts: Vec<Vec<f32>> = w
            .par_chunks(ROWS_PER_TASK * i)
            .map(|rows| {
                let nr = rows.len() / i;
                let mut acc = vec![0f32; nr * b];
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    block_rows_x86(rows, &x.data, (i, b), &mut acc);
                    return acc;
                }
                for i0 in (0..i).step_by(FWD_BLOCK) {
                    let len = FWD_BLOCK.min(i - i0);
                    for (r, a) in acc.chunks_exact_mut(b).enumerate() {
                        dot_rows(&rows[r * i + i0..r * i + i0 + len], &x.data[i0..], i, a);
                    }
                }
                acc
            })
            .collect();
        let bias = &self.bias.value.data;
        for (t, part) in parts.iter().enumerate() {
            for (r, a) in part.chunks_exact(b).enumerate() {
                let oo = t * ROWS_PER_TASK + r;
                for (bb, &v) in a.iter().enumerate() {
                    y.data[bb * o + oo] = bias[oo] + v;
                }
            }
        }
    }

    /// Backward for b ≤ 8 rows: ∇W += dyᵀx, ∇b += Σ dy and ∇x = dy W in one pass over W and ∇W (parallel over
    /// blocks of output rows, each with its own partial ∇x, added at the end).
    fn backward_small(&mut self, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>, b: usize) {
        let (i, o) = (self.in_f, self.out_f);
        for row in dy.data.chunks(o) {
            self.bias
                .grad
                .data
                .iter_mut()
                .zip(row)
                .for_each(|(g, v)| *g += v);
        }
        let rows_per = o.div_ceil(threads()).max(ROWS_PER_TASK);
        let w = &self.weight.value.data;
        // Without ∇x the axpys into it still run (into a scratch buffer): ∇W's pass dominates.
        let partial_dx: Vec<Vec<f32>> = w
            .par_chunks(rows_per * i)
            .zip(self.weight.grad.data.par_chunks_mut(rows_per * i))
            .enumerate()
            .map(|(t, (wr, dwr))| {
                let nr = wr.len() / i;
                let mut dxp = vec![0f32; b * i];
                // The batch's ∇y of this task's weight row r.
                let dyt = |r: usize| {
                    let mut d = [0f32; SMALL_B];
                    for (bb, dv) in d.iter_mut().enumerate().take(b) {
                        *dv = dy.data[bb * o + t * rows_per + r];
                    }
                    d
                };
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    block_grad_x86(wr, dwr, (&x.data, &mut dxp), (i, b), &dyt);
                    return dxp;
                }
                for i0 in (0..i).step_by(BWD_BLOCK) {
                    let len = BWD_BLOCK.min(i - i0);
                    for r in 0..nr {
                        let d = dyt(r);
                        let span = r * i + i0..r * i + i0 + len;
                        row_grad(
                            &wr[span.clone()],
                            &mut dwr[span],
                            &x.data[i0..],
                            &mut dxp[i0..],
                            i,
                            &d[..b],
                        );
                    }
                }
                dxp
            })
            .collect();
        if let Some(dx) = dx {
            dx.resize(&[b, i]);
            let mut parts = partial_dx.into_iter();
            if let Some(first) = parts.next() {
                dx.data.copy_from_slice(&first);
            }
            for p in parts {
                dx.data.iter_mut().zip(&p).for_each(|(a, v)| *a += v);
            }
        }
    }
}
