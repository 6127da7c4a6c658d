//! Mutual information between the private values and a stream the accelerator sees, per image, with the
//! paper's protocol: the pixel pairs (x, s) at the same position as 2-D samples, KSG with the local
//! non-uniformity correction, normalised by I(X;X).

use super::mi::{jitter, ksg_lnc, linfoot};
use anyhow::{bail, Result};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use serde::Serialize;

/// Settings of the estimator.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct MiConfig {
    /// Neighbours.
    pub k: usize,
    /// LNC threshold.
    pub alpha: f64,
    /// Pixel pairs per image (a seeded sample when there are more).
    pub points: usize,
    /// Tie-breaking jitter, as a fraction of each variable's standard deviation.
    pub jitter: f64,
    pub seed: u64,
}

/// Leakage of one stream, averaged over the images.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Leak {
    /// Mean I(X;S) in nats.
    pub mi_nats: f64,
    /// Mean of I(X;S)/I(X;X) per image.
    pub rel_mi: f64,
    /// Mean Linfoot coefficient √(1 − e^(−2 I(X;S))).
    pub linfoot: f64,
}

/// The sample positions of image `b` (the same for every stream, so that I(X;X) is reused): `cfg.points`
/// distinct positions of 0..len drawn uniformly (seeded by `b`), ascending; all of them when there are fewer.
fn positions(len: usize, cfg: &MiConfig, b: usize) -> Vec<usize> {
    if len <= cfg.points {
        return (0..len).collect();
    }
    let mut rng = Rng::new(cfg.seed ^ 0x5EED ^ (b as u64).wrapping_mul(0x9E37_79B9));
    let mut idx = sample_distinct(len, cfg.points, &mut rng);
    idx.sort_unstable();
    idx
}

/// `m` distinct indices of 0..n drawn uniformly (m ≤ n): the first m steps of a Fisher–Yates shuffle of
/// 0..n, with only the moved entries stored (O(m) time and memory however large n is).
pub(crate) fn sample_distinct(n: usize, m: usize, rng: &mut Rng) -> Vec<usize> {
    let mut moved: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(m.min(n));
    for i in 0..m.min(n) {
        let j = i + rng.below(n - i);
        let at_j = moved.get(&j).copied().unwrap_or(j);
        let at_i = moved.get(&i).copied().unwrap_or(i);
        moved.insert(j, at_i);
        out.push(at_j);
    }
    out
}

/// The values at `pos`, in f64, with jitter of `cfg.jitter` × their standard deviation (seeded by `stream`).
fn sample(v: &[f32], pos: &[usize], cfg: &MiConfig, stream: u64) -> Vec<f64> {
    let mut out: Vec<f64> = pos.iter().map(|&i| v[i] as f64).collect();
    let n = out.len().max(1) as f64;
    let mean = out.iter().sum::<f64>() / n;
    let std = (out.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    let sigma = if std > 0.0 { cfg.jitter * std } else { 1e-12 };
    jitter(
        &mut out,
        sigma,
        cfg.seed ^ stream.wrapping_mul(0xA24B_AED4_963E_E407),
    );
    out
}

fn per_image(t: &Tensor) -> Result<(usize, usize)> {
    let b = *t.shape.first().unwrap_or(&0);
    if b == 0 || t.is_empty() {
        bail!("empty stream");
    }
    Ok((b, t.len() / b))
}

/// Per image, I(X;X) of the private values x: [B, ...] (the normaliser of [`leak`]).
pub(crate) fn self_information(x: &Tensor, cfg: &MiConfig) -> Result<Vec<f64>> {
    let (b, per) = per_image(x)?;
    (0..b)
        .map(|i| {
            let pos = positions(per, cfg, i);
            let xv = &x.data[i * per..][..per];
            let a = sample(xv, &pos, cfg, 1);
            let c = sample(xv, &pos, cfg, 2);
            Ok(ksg_lnc(&a, 1, &c, 1, cfg.k, cfg.alpha)?)
        })
        .collect()
}

/// Leakage of the stream s about x (both [B, ...] with the same size per image), normalised per image by
/// `self_mi` (from [`self_information`]).
pub(crate) fn leak(x: &Tensor, s: &Tensor, self_mi: &[f64], cfg: &MiConfig) -> Result<Leak> {
    let (b, per) = per_image(x)?;
    if s.len() != x.len() || self_mi.len() != b {
        bail!(
            "stream of {} values against {} private values",
            s.len(),
            x.len()
        );
    }
    let mut out = Leak::default();
    for (i, &self_i) in self_mi.iter().enumerate() {
        let pos = positions(per, cfg, i);
        let a = sample(&x.data[i * per..][..per], &pos, cfg, 1);
        let c = sample(&s.data[i * per..][..per], &pos, cfg, 3);
        let mi = ksg_lnc(&a, 1, &c, 1, cfg.k, cfg.alpha)?;
        out.mi_nats += mi;
        out.rel_mi += if self_i > 0.0 { mi / self_i } else { 0.0 };
        out.linfoot += linfoot(mi.max(0.0));
    }
    let n = b as f64;
    out.mi_nats /= n;
    out.rel_mi /= n;
    out.linfoot /= n;
    Ok(out)
}

/// x: [B, C, H, W] → [B, M, H, W] holding the channel mean of x in each of the M planes (pairs the image
/// with every channel of a first-conv output gradient of the same spatial size).
pub(crate) fn channel_mean_repeated(x: &Tensor, m: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.nchw("privacy")?;
    let hw = h * w;
    let mut out = Tensor::zeros(&[b, m, h, w]);
    for i in 0..b {
        let mut g = vec![0f32; hw];
        for ch in 0..c {
            let plane = &x.data[(i * c + ch) * hw..][..hw];
            g.iter_mut()
                .zip(plane)
                .for_each(|(a, v)| *a += v / c as f32);
        }
        for j in 0..m {
            out.data[(i * m + j) * hw..][..hw].copy_from_slice(&g);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_samples_are_distinct_in_range_and_seeded() {
        let draw = |seed| sample_distinct(3_000_000, 4096, &mut Rng::new(seed));
        let a = draw(1);
        assert_eq!(a.len(), 4096);
        assert!(a.iter().all(|&i| i < 3_000_000));
        let mut s = a.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), 4096);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        // m = n: a permutation.
        let mut p = sample_distinct(50, 50, &mut Rng::new(3));
        p.sort_unstable();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
        // Uniform: the mean of many draws is near the middle of the range.
        let mean = a.iter().map(|&i| i as f64).sum::<f64>() / a.len() as f64;
        assert!((mean / 3e6 - 0.5).abs() < 0.03, "{mean}");
    }
}
