//! The small-batch forward of a fully connected layer on x86-64 with AVX2 and FMA: a few weight rows against
//! four batch rows at a time, each loaded vector of x used by every weight row of the group (the portable
//! kernel, one weight row against the batch, loads x once per multiply-add and is bound by it).

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
