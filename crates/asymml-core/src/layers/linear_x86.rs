//! The small-batch forward and backward of a fully connected layer on x86-64 with AVX2 and FMA: a few weight
//! rows against the batch rows at a time, each loaded vector of x (and in backward of ∇x) used by every weight
//! row of the group (the portable kernels, one weight row against the batch, load x once per multiply-add and
//! are bound by it).

use std::arch::x86_64::*;

/// Whether the CPU has AVX2 and FMA (what [`rows_dot`] needs).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// acc[g][q] += Σ_j w[g][j]·x[q][j] for the R weight rows w (each of `len` values) and four batch rows x (each at
/// least `len` values): R × 4 accumulators of 8 lanes, one loaded vector of each weight row and of each batch
/// row a step.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn rows_dot<const R: usize>(
    w: [&[f32]; R],
    x: [&[f32]; 4],
    acc: &mut [[f32; 4]; R],
) {
    let len = w.iter().map(|r| r.len()).min().unwrap_or(0);
    let len = x.iter().map(|r| r.len()).fold(len, usize::min);
    let n8 = len / 8 * 8;
    let mut s = [[_mm256_setzero_ps(); 4]; R];
    let mut j = 0;
    while j < n8 {
        let mut wv = [_mm256_setzero_ps(); R];
        for (v, row) in wv.iter_mut().zip(&w) {
            // SAFETY: j + 8 ≤ n8 ≤ len ≤ row.len().
            *v = unsafe { _mm256_loadu_ps(row.as_ptr().add(j)) };
        }
        for (q, row) in x.iter().enumerate() {
            // SAFETY: as above, j + 8 ≤ row.len().
            let xv = unsafe { _mm256_loadu_ps(row.as_ptr().add(j)) };
            for g in 0..R {
                s[g][q] = _mm256_fmadd_ps(wv[g], xv, s[g][q]);
            }
        }
        j += 8;
    }
    for g in 0..R {
        for q in 0..4 {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s[g][q]) };
            let folded = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            let tail: f32 = (n8..len).map(|t| w[g][t] * x[q][t]).sum();
            acc[g][q] += folded + tail;
        }
    }
}

/// The small-batch backward over R weight rows' blocks: dw[g][j] += Σ_q d[g][q]·x[q][j] (∇W) and
/// dx[q][j] += Σ_g d[g][q]·w[g][j] (∇x), for the batch rows q < `rows` ≤ 8 and j < the blocks' length. Each loaded
/// vector of x and of ∇x serves every weight row of the group, and ∇W's vectors stay in registers across the
/// batch (the portable kernel, one weight row at a time, loads and stores ∇W and ∇x once per multiply-add).
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`available`]); `x` and `dx` hold `rows` rows at `stride` values apart, each
/// at least as long as the weight rows' blocks.
#[target_feature(enable = "avx2,fma")]
// (The batch row q indexes the R rows' broadcasts, x and ∇x alike.)
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn rows_grad<const R: usize>(
    w: [&[f32]; R],
    dw: [&mut [f32]; R],
    (x, dx, stride): (&[f32], &mut [f32], usize),
    d: &[[f32; 8]; R],
    rows: usize,
) {
    let len = w.iter().map(|r| r.len()).min().unwrap_or(0);
    let len = dw.iter().map(|r| r.len()).fold(len, usize::min);
    let rows = rows.min(8);
    if rows == 0 || len == 0 {
        return;
    }
    assert!(
        x.len() >= (rows - 1) * stride + len && dx.len() >= (rows - 1) * stride + len,
        "rows_grad: batch rows shorter than the weight rows' blocks"
    );
    let n8 = len / 8 * 8;
    let dv: [[__m256; 8]; R] = std::array::from_fn(|g| d[g].map(|v| _mm256_set1_ps(v)));
    let (xp, dxp) = (x.as_ptr(), dx.as_mut_ptr());
    let mut j = 0;
    while j < n8 {
        let mut wv = [_mm256_setzero_ps(); R];
        let mut gv = [_mm256_setzero_ps(); R];
        for g in 0..R {
            // SAFETY: j + 8 ≤ n8 ≤ len ≤ the rows' lengths.
            unsafe {
                wv[g] = _mm256_loadu_ps(w[g].as_ptr().add(j));
                gv[g] = _mm256_loadu_ps(dw[g].as_ptr().add(j));
            }
        }
        for q in 0..rows {
            // SAFETY: q·stride + j + 8 ≤ (rows − 1)·stride + len ≤ x.len(), dx.len() (asserted above).
            unsafe {
                let xv = _mm256_loadu_ps(xp.add(q * stride + j));
                let mut dxv = _mm256_loadu_ps(dxp.add(q * stride + j));
                for g in 0..R {
                    gv[g] = _mm256_fmadd_ps(dv[g][q], xv, gv[g]);
                    dxv = _mm256_fmadd_ps(dv[g][q], wv[g], dxv);
                }
                _mm256_storeu_ps(dxp.add(q * stride + j), dxv);
            }
        }
        for g in 0..R {
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(dw[g].as_mut_ptr().add(j), gv[g]) };
        }
        j += 8;
    }
    for t in n8..len {
        for q in 0..rows {
            let xv = x[q * stride + t];
            let mut acc = dx[q * stride + t];
            for g in 0..R {
                acc += d[g][q] * w[g][t];
            }
            dx[q * stride + t] = acc;
            for g in 0..R {
                dw[g][t] += d[g][q] * xv;
            }
        }
    }
}
