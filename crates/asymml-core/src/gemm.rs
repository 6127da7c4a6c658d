//! Single-precision matrix products through the `gemm` crate, with explicit strides so that transposed operands
//! need no copy.

use gemm::Parallelism;

/// A strided view of a row-major matrix: element (i, j) is at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix (row stride `cols`).
    pub fn rm(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The columns from `j0` on of a row-major matrix with row stride `rs` (a block of its columns).
    pub fn rm_from(data: &'a [f32], rs: usize, j0: usize) -> Self {
        Mat {
            data: &data[j0..],
            rs,
            cs: 1,
        }
    }
    /// This matrix transposed (the same data, strides swapped).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// The transpose of a row-major `rows × cols` matrix, seen as `cols × rows`.
    pub fn rm_t(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// `c[m × n] = (accumulate ? c : 0) + a[m × k] · b[k × n]`, with `c` row-major (row stride `n`).
/// `threads > 1` lets the GEMM split the work over the rayon pool.
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    sgemm_ld(m, n, k, a, b, c, n, accumulate, threads);
}

#[allow(clippy::too_many_arguments)]
/// As [`sgemm`], with `c`'s row stride `ldc ≥ n`: the product fills columns 0..n of m rows of a wider
/// row-major matrix (a block of its columns).
pub fn sgemm_ld(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n, "gemm: output row stride below its width");
    assert!(
        (m - 1)
            .checked_mul(ldc)
            .and_then(|i| i.checked_add(n))
            .is_some_and(|len| len <= c.len()),
        "gemm: output too small"
    );
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc)
                .take(m)
                .for_each(|row| row[..n].iter_mut().for_each(|v| *v = 0.0));
        }
        return;
    }
    // The index of element (r − 1, cl − 1) of `x`, the farthest the kernel reads (checked: a wrapped index
    // would pass the asserts below and let the kernel read past the slice).
    let inside = |x: Mat, r: usize, cl: usize| {
        (r - 1)
            .checked_mul(x.rs)
            .zip((cl - 1).checked_mul(x.cs))
            .and_then(|(i, j)| i.checked_add(j))
            .is_some_and(|last| last < x.data.len())
    };
    assert!(inside(a, m, k), "gemm: lhs too small");
    assert!(inside(b, k, n), "gemm: rhs too small");
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: m, n, k ≥ 1 here. The kernel writes `c` at i·ldc + j (column stride 1, row stride ldc) for
    // i < m, j < n, all below (m − 1)·ldc + n ≤ c.len() (checked without overflow); it reads `a` at i·rs + p·cs and `b` at p·rs + j·cs for p < k, all at most
    // the last index that `inside` checked against the slice (no arithmetic wrapped). Each stride is then at
    // most a slice length (≤ isize::MAX) wherever it is multiplied by a non-zero index, so the `as isize` casts
    // keep their values. `c` is a `&mut` borrow, so it cannot overlap `a` or `b`, and `read_dst` (= accumulate)
    // only reads `c` where it writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    s += a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn matches_naive_with_transposes() {
        let (m, n, k) = (17, 23, 31);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        for (am, bm) in [
            (Mat::rm(&a, k), Mat::rm(&b, n)),
            (Mat::rm_t(&a, m), Mat::rm_t(&b, k)),
        ] {
            let want = naive(m, n, k, am, bm);
            for threads in [1, 2] {
                let mut c = vec![1.0; m * n];
                sgemm(m, n, k, am, bm, &mut c, false, threads);
                assert_eq!(c, want);
                sgemm(m, n, k, am, bm, &mut c, true, threads);
                let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
                assert_eq!(c, twice);
            }
        }
    }

    #[test]
    fn a_block_of_columns_lands_in_a_wider_output() {
        let (m, n, k, ldc) = (5, 7, 3, 11);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 - 4.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32).collect();
        let want = naive(m, n, k, Mat::rm(&a, k), Mat::rm(&b, n));
        let mut c = vec![-1.0; (m - 1) * ldc + n];
        sgemm_ld(
            m,
            n,
            k,
            Mat::rm(&a, k),
            Mat::rm(&b, n),
            &mut c,
            ldc,
            false,
            1,
        );
        for i in 0..m {
            assert_eq!(&c[i * ldc..][..n], &want[i * n..][..n]);
            if i + 1 < m {
                assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == -1.0));
            }
        }
    }
}
