//! The exact reference: singular values and rank-r truncations from the eigendecomposition of the N × N Gram
//! matrix X Xᵀ in f64, and the spectrum helpers behind the rank policies (kept energy, SVD-channel entropy).
//!
//! Cost O(N²·HW + N³) per sample: a reference and the entropy policy's input, not a hot path.

use super::svd::LowRank;
use nalgebra::{DMatrix, SymmetricEigen};

/// The Gram matrix X Xᵀ (N × N, f64) of x: N × HW.
fn gram(x: &[f32], n: usize, hw: usize) -> DMatrix<f64> {
    assert_eq!(
        x.len(),
        n * hw,
        "gram: x has {} values, not {n}×{hw}",
        x.len()
    );
    // Column-major HW × N storage of the row-major N × HW data is Xᵀ, without a copy in another order.
    let xt = DMatrix::from_iterator(hw, n, x.iter().map(|&v| v as f64));
    xt.tr_mul(&xt)
}

/// Singular values of x: N × HW (N of them, zeros included), descending, as √λ of the eigenvalues λ of the
/// smaller Gram matrix, X Xᵀ (N × N) or XᵀX (HW × HW), which share their non-zero eigenvalues (negative
/// round-off clamped to 0). Cost O(N·HW·min(N, HW) + min(N, HW)³). Panics if `x.len() != n·hw`.
pub fn singular_values(x: &[f32], n: usize, hw: usize) -> Vec<f64> {
    assert_eq!(
        x.len(),
        n * hw,
        "singular values: x has {} values, not {n}×{hw}",
        x.len()
    );
    if n == 0 || hw == 0 {
        return vec![0.0; n];
    }
    let g = if hw < n {
        let xt = DMatrix::from_iterator(hw, n, x.iter().map(|&v| v as f64));
        &xt * xt.transpose()
    } else {
        gram(x, n, hw)
    };
    let mut s: Vec<f64> = g
        .symmetric_eigenvalues()
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .collect();
    s.resize(n, 0.0);
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// The exact rank-r truncation of x: N × HW (r clamped to N): `out` gets U·S (column j = q_j·s_j) and V (row
/// j = the right singular vector Xᵀq_j / s_j, zero when s_j = 0), with q_j the eigenvectors of X Xᵀ by
/// descending eigenvalue and s_j = ‖Xᵀq_j‖; `residual` = X − U V. Panics if `x.len() != n·hw`.
pub fn exact_low_rank(
    x: &[f32],
    n: usize,
    hw: usize,
    r: usize,
    out: &mut LowRank,
    residual: &mut Vec<f32>,
) {
    *out = LowRank::new(n, hw);
    residual.clear();
    residual.extend_from_slice(x);
    let r = r.min(n);
    if r == 0 {
        return;
    }
    let eig = SymmetricEigen::new(gram(x, n, hw));
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    out.r = r;
    out.u = vec![0.0; n * r];
    out.v = vec![0.0; r * hw];
    let mut xtq = vec![0f64; hw];
    for (j, &k) in order.iter().take(r).enumerate() {
        let q = eig.eigenvectors.column(k);
        xtq.iter_mut().for_each(|v| *v = 0.0);
        for (i, row) in x.chunks_exact(hw.max(1)).enumerate() {
            xtq.iter_mut()
                .zip(row)
                .for_each(|(a, &b)| *a += q[i] * b as f64);
        }
        let s = xtq.iter().map(|v| v * v).sum::<f64>().sqrt();
        for i in 0..n {
            out.u[i * r + j] = (q[i] * s) as f32;
        }
        if s > 0.0 {
            for (o, &a) in out.v[j * hw..(j + 1) * hw].iter_mut().zip(&xtq) {
                *o = (a / s) as f32;
            }
        }
    }
    let mut xt = vec![0.0; n * hw];
    out.reconstruct(&mut xt);
    residual.iter_mut().zip(&xt).for_each(|(a, b)| *a -= b);
}

/// Fraction of the energy kept by the first r singular values: Σ_{i<r} s_i² / Σ s_i² (1 for a zero spectrum).
pub fn energy_kept(s: &[f64], r: usize) -> f64 {
    let total: f64 = s.iter().map(|v| v * v).sum();
    if total <= 0.0 {
        return 1.0;
    }
    s.iter().take(r).map(|v| v * v).sum::<f64>() / total
}

/// The smallest r (≥ 1, ≤ len) whose first r singular values keep ≥ e of the energy; 1 for a zero spectrum.
pub fn rank_for_energy(s: &[f64], e: f64) -> usize {
    let total: f64 = s.iter().map(|v| v * v).sum();
    if total <= 0.0 {
        return 1;
    }
    let mut kept = 0.0;
    for (i, v) in s.iter().enumerate() {
        kept += v * v;
        if kept >= e * total {
            return i + 1;
        }
    }
    s.len().max(1)
}

/// The SVD-channel entropy μ = −log2 Σ_j s̄_j² with s̄ = s / Σ s (0 for a zero spectrum): 0 for one non-zero
/// value, log2 k for k equal ones.
pub fn svd_entropy(s: &[f64]) -> f64 {
    let sum: f64 = s.iter().sum();
    if sum <= 0.0 {
        return 0.0;
    }
    let p: f64 = s.iter().map(|v| (v / sum) * (v / sum)).sum();
    (-p.log2()).max(0.0)
}

/// The entropy rank ⌈2^μ⌉ (≥ 1), with a relative tolerance of 1e-9 so that k equal values give k, not k + 1.
pub fn entropy_rank(s: &[f64]) -> usize {
    let x = svd_entropy(s).exp2();
    ((x * (1.0 - 1e-9)).ceil() as usize).max(1)
}
