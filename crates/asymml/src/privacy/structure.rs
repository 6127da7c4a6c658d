//! Structural leakage: does X_U show the image's edges? Pixel-pair mutual information misses what a person
//! sees (a colour-difference picture of a photograph has low rel_mi and is plainly recognisable), so beside it
//! we compare edge maps.
//!
//! The image's edge map: each channel area-resized to X_U's resolution, its Sobel gradient magnitude, the
//! RMS over channels. X_U's candidate edge maps (an attacker may pick the channel it looks at, and denoise):
//! the RMS and the maximum over channels of each channel's gradient magnitude, the gradient magnitude of X_U's
//! first principal channel (u₁ᵀ X_U, u₁ the top left singular vector of the centred C × HW matrix), and that
//! of each of the [`TOP_CHANNELS`] channels of largest variance; then, against noise (which averages out over
//! channels and neighbouring pixels), the gradient magnitude of the channel mean and of the principal channel
//! after a Gaussian blur of σ = 1 and 2 px, each compared with the edge map of the image blurred alike. Every
//! map is scaled by its 99th percentile and clipped to [0, 1]; the edge SSIM of an image is the largest SSIM
//! (Gaussian window 11, σ 1.5) of a candidate against the image's map. The same score against another
//! image's map is the chance level of that maximum.

use super::attack::ssim;
use anyhow::{bail, Result};
use asymml_core::Tensor;
use rayon::prelude::*;

/// Channels of largest variance tried one by one.
pub(crate) const TOP_CHANNELS: usize = 4;

/// Edge SSIM above its chance level ([`EdgeScore::excess`]) at or above which a person recognises the image
/// in X_U's grid tiles (chosen by looking at the grids; see docs/security.md, What "recognisable" means).
pub(crate) const EDGE_SSIM_RECOGNISABLE: f64 = 0.1;
/// SSIM gain of the best attack over the mean image at or above which its reconstruction is recognisable.
pub(crate) const SSIM_GAIN_RECOGNISABLE: f64 = 0.1;

/// Edge SSIM of a stream, over the images.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct EdgeScore {
    /// Mean over the images of the best candidate's SSIM against the image's own edge map.
    pub mean: f64,
    /// The largest over the images.
    pub max: f64,
    /// Mean of the same best-candidate score against another image's edge map (the chance level).
    pub chance: f64,
}

impl EdgeScore {
    /// The edge SSIM above its chance level (the structural measure; the mean itself with one image).
    pub(crate) fn excess(&self) -> f64 {
        if self.chance.is_finite() {
            self.mean - self.chance
        } else {
            self.mean
        }
    }
}

/// Area-resizes an h × w plane to oh × ow (each output pixel the mean of the input pixels it covers).
fn area_resize(p: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    if (oh, ow) == (h, w) {
        return p.to_vec();
    }
    let mut out = vec![0f32; oh * ow];
    for i in 0..oh {
        let (i0, i1) = (i * h / oh, ((i + 1) * h).div_ceil(oh).max(i * h / oh + 1));
        for j in 0..ow {
            let (j0, j1) = (j * w / ow, ((j + 1) * w).div_ceil(ow).max(j * w / ow + 1));
            let mut s = 0f32;
            for a in i0..i1.min(h) {
                for b in j0..j1.min(w) {
                    s += p[a * w + b];
                }
            }
            out[i * ow + j] = s / ((i1.min(h) - i0) * (j1.min(w) - j0)).max(1) as f32;
        }
    }
    out
}

/// Sobel gradient magnitude of an h × w plane (edges replicated).
fn grad_mag(p: &[f32], h: usize, w: usize) -> Vec<f32> {
    let at = |i: isize, j: isize| {
        let i = i.clamp(0, h as isize - 1) as usize;
        let j = j.clamp(0, w as isize - 1) as usize;
        p[i * w + j]
    };
    let mut out = vec![0f32; h * w];
    for i in 0..h as isize {
        for j in 0..w as isize {
            let gx = (at(i - 1, j + 1) + 2.0 * at(i, j + 1) + at(i + 1, j + 1))
                - (at(i - 1, j - 1) + 2.0 * at(i, j - 1) + at(i + 1, j - 1));
            let gy = (at(i + 1, j - 1) + 2.0 * at(i + 1, j) + at(i + 1, j + 1))
                - (at(i - 1, j - 1) + 2.0 * at(i - 1, j) + at(i - 1, j + 1));
            out[i as usize * w + j as usize] = (gx * gx + gy * gy).sqrt();
        }
    }
    out
}

/// Scales a non-negative map by its 99th percentile and clips it to [0, 1] (all zeros stay zeros).
fn unit_scale(mut m: Vec<f32>) -> Vec<f32> {
    let mut sorted: Vec<f32> = m.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return vec![0.0; m.len()];
    }
    sorted.sort_unstable_by(f32::total_cmp);
    let p99 = sorted[((sorted.len() - 1) as f64 * 0.99) as usize];
    let scale = if p99 > 0.0 {
        p99
    } else {
        *sorted.last().unwrap_or(&0.0)
    };
    m.iter_mut().for_each(|v| {
        *v = if scale > 0.0 && v.is_finite() {
            (*v / scale).clamp(0.0, 1.0)
        } else {
            0.0
        }
    });
    m
}

/// Blur widths (σ, px) of the candidates; 0: none.
const BLURS: [f32; 3] = [0.0, 1.0, 2.0];

/// Separable Gaussian blur of an h × w plane (edges replicated); σ = 0 returns it unchanged.
fn blur(p: &[f32], h: usize, w: usize, sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return p.to_vec();
    }
    let r = (3.0 * sigma).ceil() as isize;
    let k: Vec<f32> = (-r..=r)
        .map(|d| (-((d * d) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let ks: f32 = k.iter().sum();
    let pass = |src: &[f32], along_rows: bool| -> Vec<f32> {
        let mut out = vec![0f32; h * w];
        for i in 0..h {
            for j in 0..w {
                let mut acc = 0f32;
                for (t, kv) in k.iter().enumerate() {
                    let d = t as isize - r;
                    let (a, b) = if along_rows {
                        (i, (j as isize + d).clamp(0, w as isize - 1) as usize)
                    } else {
                        ((i as isize + d).clamp(0, h as isize - 1) as usize, j)
                    };
                    acc += kv * src[a * w + b];
                }
                out[i * w + j] = acc / ks;
            }
        }
        out
    };
    pass(&pass(p, true), false)
}

/// RMS over channels of the channels' gradient magnitudes (`grads`: c maps of hw values).
fn rms(grads: &[Vec<f32>], hw: usize) -> Vec<f32> {
    let c = grads.len().max(1) as f32;
    (0..hw)
        .map(|p| (grads.iter().map(|g| g[p] * g[p]).sum::<f32>() / c).sqrt())
        .collect()
}

/// The edge maps of an image [c, h, w] at oh × ow, one per blur of [`BLURS`]: the RMS over channels of the
/// gradient magnitude of each area-resized (and blurred) channel, in [0, 1].
pub(crate) fn image_edges(
    img: &[f32],
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<Vec<f32>> {
    let planes: Vec<Vec<f32>> = img
        .chunks(h * w)
        .take(c)
        .map(|p| area_resize(p, h, w, oh, ow))
        .collect();
    BLURS
        .iter()
        .map(|&sg| {
            let grads: Vec<Vec<f32>> = planes
                .iter()
                .map(|p| grad_mag(&blur(p, oh, ow, sg), oh, ow))
                .collect();
            unit_scale(rms(&grads, oh * ow))
        })
        .collect()
}

/// The first principal channel u₁ᵀ X of a c × hw matrix (channels centred), by power iteration.
fn principal_channel(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
    let centred: Vec<Vec<f64>> = x
        .chunks(hw)
        .take(c)
        .map(|p| {
            let m = p.iter().map(|&v| v as f64).sum::<f64>() / hw.max(1) as f64;
            p.iter().map(|&v| v as f64 - m).collect()
        })
        .collect();
    // A fixed, non-symmetric start so that no eigenvector is orthogonal to it by construction.
    let mut u: Vec<f64> = (0..c)
        .map(|i| 1.0 + 0.37 * ((i * 7919) % 13) as f64)
        .collect();
    let mut proj = vec![0f64; hw];
    for _ in 0..40 {
        proj.iter_mut().for_each(|v| *v = 0.0);
        for (ui, row) in u.iter().zip(&centred) {
            proj.iter_mut().zip(row).for_each(|(p, r)| *p += ui * r);
        }
        let next: Vec<f64> = centred
            .iter()
            .map(|row| row.iter().zip(&proj).map(|(r, p)| r * p).sum())
            .collect();
        let norm = next.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm <= 1e-30 {
            return vec![0.0; hw];
        }
        u = next.iter().map(|v| v / norm).collect();
    }
    proj.iter_mut().for_each(|v| *v = 0.0);
    for (ui, row) in u.iter().zip(&centred) {
        proj.iter_mut().zip(row).for_each(|(p, r)| *p += ui * r);
    }
    proj.into_iter().map(|v| v as f32).collect()
}

/// The candidate edge maps of one sample of a stream [c, h, w] (see the module's documentation), each in
/// [0, 1], with the index into [`BLURS`] of its blur.
pub(crate) fn stream_edges(s: &[f32], c: usize, h: usize, w: usize) -> Vec<(usize, Vec<f32>)> {
    let hw = h * w;
    let grads: Vec<Vec<f32>> = s.chunks(hw).take(c).map(|p| grad_mag(p, h, w)).collect();
    let mut out = vec![(0, unit_scale(rms(&grads, hw)))];
    let combos = if c > 1 {
        let mean: Vec<f32> = (0..hw)
            .map(|p| (0..c).map(|ch| s[ch * hw + p]).sum::<f32>() / c as f32)
            .collect();
        vec![mean, principal_channel(s, c, hw)]
    } else {
        vec![s[..hw].to_vec()]
    };
    if c > 1 {
        let max: Vec<f32> = (0..hw)
            .map(|p| grads.iter().map(|g| g[p]).fold(0f32, f32::max))
            .collect();
        out.push((0, unit_scale(max)));
        out.push((0, unit_scale(grad_mag(&combos[1], h, w))));
        let mut var: Vec<(usize, f64)> = s
            .chunks(hw)
            .take(c)
            .enumerate()
            .map(|(i, p)| {
                let m = p.iter().map(|&v| v as f64).sum::<f64>() / hw.max(1) as f64;
                (i, p.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>())
            })
            .collect();
        var.sort_by(|a, b| b.1.total_cmp(&a.1));
        for &(i, _) in var.iter().take(TOP_CHANNELS) {
            out.push((0, unit_scale(grads[i].clone())));
        }
    }
    for (bi, &sg) in BLURS.iter().enumerate().skip(1) {
        for m in &combos {
            out.push((bi, unit_scale(grad_mag(&blur(m, h, w, sg), h, w))));
        }
    }
    out
}

/// The largest SSIM of a candidate against the edge map of the same blur in `targets` (h × w each).
fn best_ssim(cands: &[(usize, Vec<f32>)], targets: &[Vec<f32>], h: usize, w: usize) -> f64 {
    cands
        .iter()
        .map(|(b, m)| ssim(m, &targets[*b], 1, h, w))
        .fold(f64::NEG_INFINITY, f64::max)
}

/// Edge SSIM of the stream s [n, c', h', w'] about the images [n, c, h, w] (both normalised as the model
/// sees them; h' ≤ h). Samples in parallel.
pub(crate) fn edge_ssim(images: &Tensor, s: &Tensor) -> Result<EdgeScore> {
    let (n, c, h, w) = images.nchw("edge ssim")?;
    let (sn, sc, sh, sw) = s.nchw("edge ssim")?;
    if sn != n || sh == 0 || sw == 0 || sh > h || sw > w {
        bail!(
            "edge ssim: stream {:?} does not fit the images {:?}",
            s.shape,
            images.shape
        );
    }
    let (per, sper) = (c * h * w, sc * sh * sw);
    let targets: Vec<Vec<Vec<f32>>> = (0..n)
        .into_par_iter()
        .map(|i| image_edges(&images.data[i * per..][..per], c, h, w, sh, sw))
        .collect();
    let scores: Vec<(f64, f64)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let cands = stream_edges(&s.data[i * sper..][..sper], sc, sh, sw);
            let own = best_ssim(&cands, &targets[i], sh, sw);
            let other = if n > 1 {
                best_ssim(&cands, &targets[(i + 1) % n], sh, sw)
            } else {
                f64::NAN
            };
            (own, other)
        })
        .collect();
    let k = n.max(1) as f64;
    Ok(EdgeScore {
        mean: scores.iter().map(|s| s.0).sum::<f64>() / k,
        max: scores.iter().map(|s| s.0).fold(f64::NEG_INFINITY, f64::max),
        chance: scores.iter().map(|s| s.1).sum::<f64>() / k,
    })
}

/// For the first `max` images: the image's edge map and X_U's best candidate edge map (both at X_U's
/// resolution, h' × w'), for the edge grids.
pub(crate) fn edge_views(
    images: &Tensor,
    s: &Tensor,
    max: usize,
) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let (n, c, h, w) = images.nchw("edge views")?;
    let (sn, sc, sh, sw) = s.nchw("edge views")?;
    if sn != n || sh == 0 || sw == 0 || sh > h || sw > w {
        bail!(
            "edge views: stream {:?} does not fit the images {:?}",
            s.shape,
            images.shape
        );
    }
    let (per, sper) = (c * h * w, sc * sh * sw);
    Ok((0..n.min(max))
        .map(|i| {
            let targets = image_edges(&images.data[i * per..][..per], c, h, w, sh, sw);
            let cands = stream_edges(&s.data[i * sper..][..sper], sc, sh, sw);
            let best = cands
                .into_iter()
                .map(|(b, m)| (ssim(&m, &targets[b], 1, sh, sw), b, m))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, b, m)| (b, m))
                .unwrap_or_default();
            (targets[best.0].clone(), best.1)
        })
        .collect())
}

/// The normalised SSIM gain of the best attack over the mean image: (s − s₀)/(1 − s₀), 0 when the attack is
/// no better than the mean image, 1 for a perfect reconstruction (negative when worse).
pub(crate) fn ssim_gain(best_ssim: f64, mean_image_ssim: f64) -> f64 {
    let room = 1.0 - mean_image_ssim;
    if room <= 1e-9 {
        0.0
    } else {
        (best_ssim - mean_image_ssim) / room
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use asymml_core::rng::Rng;

    /// A smooth test image with shapes: a disc and a bar on a gradient, `c` channels.
    fn shapes(c: usize, h: usize, w: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(c * h * w);
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    let (y, x) = (i as f32 / h as f32, j as f32 / w as f32);
                    let disc = ((y - 0.4).powi(2) + (x - 0.35).powi(2) < 0.04) as u8 as f32;
                    let bar = ((0.7..0.8).contains(&y) && x > 0.2) as u8 as f32;
                    out.push(0.3 * x + disc * (1.0 + ch as f32 * 0.2) - bar * 0.8);
                }
            }
        }
        out
    }

    #[test]
    fn an_image_against_itself_scores_one() {
        let (c, h, w) = (3, 32, 32);
        let img =
            Tensor::from_vec(&[2, c, h, w], [shapes(c, h, w), shapes(c, h, w)].concat()).unwrap();
        let e = edge_ssim(&img, &img).unwrap();
        assert!((e.mean - 1.0).abs() < 1e-6, "{e:?}");
        assert!((e.max - 1.0).abs() < 1e-6, "{e:?}");
    }

    #[test]
    fn noise_scores_near_zero_and_a_downsampled_copy_high() {
        let (c, h, w) = (3, 32, 32);
        let img = Tensor::from_vec(&[1, c, h, w], shapes(c, h, w)).unwrap();
        let mut rng = Rng::new(5);
        let noise = Tensor::from_vec(
            &[1, 16, h, w],
            (0..16 * h * w).map(|_| rng.normal()).collect(),
        )
        .unwrap();
        let e = edge_ssim(&img, &noise).unwrap();
        assert!(e.mean.abs() < 0.15, "noise: {e:?}");
        // Half resolution, one channel (a sign-flipped grey copy): still the image's edges.
        let small: Vec<f32> = (0..h / 2 * w / 2)
            .map(|p| {
                let (i, j) = (p / (w / 2), p % (w / 2));
                -(0..c)
                    .map(|ch| shapes(c, h, w)[ch * h * w + 2 * i * w + 2 * j])
                    .sum::<f32>()
            })
            .collect();
        let small = Tensor::from_vec(&[1, 1, h / 2, w / 2], small).unwrap();
        let e = edge_ssim(&img, &small).unwrap();
        assert!(e.mean > 0.6, "downsampled copy: {e:?}");
    }

    #[test]
    fn zero_stream_and_gain() {
        let (c, h, w) = (3, 24, 24);
        let img = Tensor::from_vec(&[1, c, h, w], shapes(c, h, w)).unwrap();
        let zero = Tensor::zeros(&[1, 8, h, w]);
        let e = edge_ssim(&img, &zero).unwrap();
        assert!(e.mean < 0.05, "zeros: {e:?}");
        assert!(edge_ssim(&img, &Tensor::zeros(&[2, 8, h, w])).is_err());
        assert!((ssim_gain(0.25, 0.25)).abs() < 1e-12);
        assert!((ssim_gain(1.0, 0.25) - 1.0).abs() < 1e-12);
        assert!((ssim_gain(0.625, 0.25) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn principal_channel_finds_the_shared_pattern() {
        // Two channels, both a multiple of one pattern: the principal channel is that pattern (up to sign).
        let hw = 64;
        let pat: Vec<f32> = (0..hw).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let x: Vec<f32> = pat
            .iter()
            .map(|v| 2.0 * v)
            .chain(pat.iter().map(|v| -v))
            .collect();
        let pc = principal_channel(&x, 2, hw);
        let mean = pat.iter().sum::<f32>() / hw as f32;
        let dot: f32 = pc.iter().zip(&pat).map(|(a, b)| a * (b - mean)).sum();
        let (na, nb) = (
            pc.iter().map(|a| a * a).sum::<f32>().sqrt(),
            pat.iter()
                .map(|b| (b - mean) * (b - mean))
                .sum::<f32>()
                .sqrt(),
        );
        assert!((dot.abs() / (na * nb) - 1.0).abs() < 1e-4);
    }
}
