//! Low-rank structure of conv inputs: singular-value spectra, energy kept, SVD-channel entropy, and the
//! entropy of k×k patch channels (the paper's kernel-size study).

use asymml_core::decomp::{energy_kept, entropy_rank, singular_values, svd_entropy};
use asymml_core::Tensor;
use rayon::prelude::*;
use serde::Serialize;

/// The spectra of one conv layer's inputs, one per sample (exact, f64, descending).
pub(crate) struct LayerSpectra {
    pub spectra: Vec<Vec<f64>>,
}

impl LayerSpectra {
    /// x: [B, N, H, W] → the singular values of each sample's N × HW matrix.
    pub(crate) fn of(x: &Tensor) -> Self {
        if x.shape.len() != 4 || x.is_empty() {
            return LayerSpectra {
                spectra: Vec::new(),
            };
        }
        let (n, hw) = (x.shape[1], x.shape[2] * x.shape[3]);
        let spectra = x
            .data
            .par_chunks(n * hw)
            .map(|xb| singular_values(xb, n, hw))
            .collect();
        LayerSpectra { spectra }
    }

    fn mean_of(&self, f: impl Fn(&[f64]) -> f64) -> f64 {
        if self.spectra.is_empty() {
            return 0.0;
        }
        self.spectra.iter().map(|s| f(s)).sum::<f64>() / self.spectra.len() as f64
    }

    /// Mean over samples of the optimal energy fraction kept by rank r.
    pub(crate) fn energy_kept(&self, r: usize) -> f64 {
        self.mean_of(|s| energy_kept(s, r))
    }

    /// Mean SVD-channel entropy μ (bits).
    pub(crate) fn entropy(&self) -> f64 {
        self.mean_of(svd_entropy)
    }

    /// The largest ⌈2^μ⌉ over the samples (what the entropy policy picks for this batch).
    pub(crate) fn entropy_rank_max(&self) -> usize {
        self.spectra
            .iter()
            .map(|s| entropy_rank(s))
            .max()
            .unwrap_or(1)
    }

    /// Mean spectrum normalised by its largest value, first `max_len` values.
    pub(crate) fn mean_normalised(&self, max_len: usize) -> Vec<f64> {
        let len = self.spectra.first().map_or(0, |s| s.len()).min(max_len);
        let mut out = vec![0.0; len];
        for s in &self.spectra {
            let top = s.first().copied().unwrap_or(0.0);
            if top <= 0.0 {
                continue;
            }
            for (o, v) in out.iter_mut().zip(s) {
                *o += v / top;
            }
        }
        let n = self.spectra.len().max(1) as f64;
        out.iter_mut().for_each(|v| *v /= n);
        out
    }

    /// Mean cumulative energy fraction kept by r = 1..=max_len.
    pub(crate) fn energy_curve(&self, max_len: usize) -> Vec<f64> {
        let len = self.spectra.first().map_or(0, |s| s.len()).min(max_len);
        (1..=len).map(|r| self.energy_kept(r)).collect()
    }
}

/// One row of the kernel-size study.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct KernelEntropy {
    pub kernel: usize,
    /// Mean SVD entropy μ (bits) of the k² patch channels, over every image and channel plane.
    pub entropy: f64,
    /// ⌈2^μ⌉ of the mean μ.
    pub entropy_rank: usize,
}

/// Most patch positions (columns) per plane in the kernel-size study: larger planes use this many positions
/// spread evenly over the plane (see [`spread`]).
pub(crate) const KERNEL_STUDY_POSITIONS: usize = 4096;

/// `m` indices spread evenly over 0..n (all of them when n ≤ m), ascending.
pub(crate) fn spread(n: usize, m: usize) -> Vec<usize> {
    if n <= m {
        return (0..n).collect();
    }
    (0..m).map(|i| i * n / m).collect()
}

/// The entropy of the k×k patch channels: per image and channel plane (H × W), the k² × P matrix of its
/// zero-padded k×k patches (one row per offset in the window) at P = min(HW, [`KERNEL_STUDY_POSITIONS`])
/// positions spread evenly over the plane, its singular values, μ = −log2 Σ (s/Σs)².
/// x: [B, C, H, W]; `k` odd.
pub(crate) fn kernel_entropy(x: &Tensor, k: usize) -> KernelEntropy {
    let (b, c, h, w) = match x.shape[..] {
        [b, c, h, w] => (b, c, h, w),
        _ => (0, 0, 0, 0),
    };
    let hw = h * w;
    let pad = k / 2;
    let planes = b * c;
    let cols = spread(hw, KERNEL_STUDY_POSITIONS);
    let p = cols.len();
    let total: f64 = x
        .data
        .par_chunks(hw.max(1))
        .take(planes)
        .map(|plane| {
            let mut m = vec![0f32; k * k * p];
            for dy in 0..k {
                for dx in 0..k {
                    let row = &mut m[(dy * k + dx) * p..][..p];
                    for (o, &q) in row.iter_mut().zip(&cols) {
                        let (i, j) = (q / w, q % w);
                        let si = i as isize + dy as isize - pad as isize;
                        let sj = j as isize + dx as isize - pad as isize;
                        if si >= 0 && si < h as isize && sj >= 0 && sj < w as isize {
                            *o = plane[si as usize * w + sj as usize];
                        }
                    }
                }
            }
            svd_entropy(&singular_values(&m, k * k, p))
        })
        .sum();
    let entropy = if planes == 0 {
        0.0
    } else {
        total / planes as f64
    };
    KernelEntropy {
        kernel: k,
        entropy,
        entropy_rank: ((entropy.exp2() * (1.0 - 1e-9)).ceil() as usize).max(1),
    }
}

/// What the split's decomposition kept of each image: 1 − ‖X_U‖²/‖X‖², averaged over the images (NaN when the
/// shapes differ).
pub(crate) fn energy_kept_light(x: &Tensor, xu: &Tensor) -> f64 {
    let n = x.shape.first().copied().unwrap_or(0);
    if n == 0 || x.len() != xu.len() {
        return f64::NAN;
    }
    let per = x.len() / n;
    let mut total = 0.0;
    for i in 0..n {
        let sq = |v: &[f32]| v.iter().map(|a| (*a as f64) * (*a as f64)).sum::<f64>();
        let (ex, eu) = (
            sq(&x.data[i * per..][..per]),
            sq(&xu.data[i * per..][..per]),
        );
        total += if ex > 0.0 { 1.0 - eu / ex } else { 1.0 };
    }
    total / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_planes_have_one_patch_channel_and_k1_has_zero_entropy() {
        // A constant image away from the border: every patch is the same up to the padding.
        let x = Tensor::from_vec(&[1, 1, 4, 4], vec![1.0; 16]).unwrap();
        assert_eq!(kernel_entropy(&x, 1).entropy, 0.0);
        // Independent noise spreads the energy over the k² channels: μ close to log2 9.
        let mut rng = asymml_core::rng::Rng::new(1);
        let data: Vec<f32> = (0..64 * 64).map(|_| rng.normal()).collect();
        let x = Tensor::from_vec(&[1, 1, 64, 64], data).unwrap();
        let e = kernel_entropy(&x, 3);
        assert!(e.entropy > 3.0 && e.entropy <= 9f64.log2() + 1e-9, "{e:?}");
        assert_eq!(e.entropy_rank, 9);
    }

    #[test]
    fn spread_indices_cover_the_range_evenly() {
        assert_eq!(spread(5, 10), vec![0, 1, 2, 3, 4]);
        assert_eq!(spread(10, 5), vec![0, 2, 4, 6, 8]);
        let s = spread(50176, 4096);
        assert_eq!(s.len(), 4096);
        assert!(s.windows(2).all(|w| w[1] > w[0]));
        assert!(*s.last().unwrap() < 50176 && *s.last().unwrap() >= 50176 - 13);
    }

    #[test]
    fn spectra_of_a_rank_one_input() {
        // X = u vᵀ per sample: one non-zero singular value, all energy at r = 1, μ = 0.
        let (n, hw) = (4, 9);
        let data: Vec<f32> = (0..n * hw)
            .map(|i| ((i / hw) as f32 + 1.0) * ((i % hw) as f32 - 3.0))
            .collect();
        let s = LayerSpectra::of(&Tensor::from_vec(&[1, n, 3, 3], data).unwrap());
        assert!((s.energy_kept(1) - 1.0).abs() < 1e-9);
        assert!(s.entropy() < 1e-6);
        assert_eq!(s.entropy_rank_max(), 1);
        assert_eq!(s.energy_curve(10).len(), 4);
        assert!((s.mean_normalised(10)[0] - 1.0).abs() < 1e-12);
    }
}
