//! Reconstruction attacks: decoders that an attacker with public data learns from a stream (X_U of a conv)
//! back to the image, and the PSNR/SSIM of their reconstructions of held-out private images.

use anyhow::{bail, Result};
use asymml_core::gemm::{sgemm, Mat};
use asymml_core::layers::{Conv2d, Conv2dConfig, Relu};
use asymml_core::optim::{Optimizer, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use nalgebra::{DMatrix, DVector};

/// Normalisation of the images (per channel, 0..1 units), to turn decoder outputs back into pixels.
#[derive(Clone, Debug)]
pub(crate) struct PixelScale {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl PixelScale {
    /// One normalised image [c, H, W] → pixels in [0, 1].
    pub(crate) fn to_unit(&self, img: &[f32], c: usize) -> Vec<f32> {
        let hw = img.len() / c.max(1);
        img.iter()
            .enumerate()
            .map(|(i, v)| {
                let ch = (i / hw.max(1)).min(self.mean.len().saturating_sub(1));
                (v * self.std[ch] + self.mean[ch]).clamp(0.0, 1.0)
            })
            .collect()
    }
}

/// The shape of one image or stream: `c` planes of h × w.
#[derive(Clone, Copy, Debug)]
struct Chw {
    c: usize,
    h: usize,
    w: usize,
}

impl Chw {
    fn len(self) -> usize {
        self.c * self.h * self.w
    }
}

/// A decoder's training pairs: `n` streams of shape `stream` and their images of shape `image`, each image
/// `fct` times the stream's size.
struct Layout {
    n: usize,
    stream: Chw,
    image: Chw,
    fct: usize,
}

impl Layout {
    /// The layout of streams s: [n, C, h, w] and images img: [n, c, H, W]; `what` names the decoder in errors.
    fn of(s: &Tensor, img: &Tensor, what: &str) -> Result<Layout> {
        let (n, c, h, w) = s.nchw(what)?;
        let (_, ic, ih, iw) = img.nchw(what)?;
        if h == 0 || ih % h != 0 || iw % w != 0 || ih / h != iw / w {
            bail!("a {h}×{w} stream does not tile a {ih}×{iw} image");
        }
        Ok(Layout {
            n,
            stream: Chw { c, h, w },
            image: Chw {
                c: ic,
                h: ih,
                w: iw,
            },
            fct: ih / h,
        })
    }
}

/// Features of position (i, j): the 3×3 window of every channel (zero outside), into `f` (9·C values).
fn window(x: &[f32], shape: Chw, (i, j): (usize, usize), f: &mut [f32]) {
    let Chw { c, h, w } = shape;
    let mut o = 0;
    for ch in 0..c {
        let plane = &x[ch * h * w..][..h * w];
        for di in 0..3 {
            for dj in 0..3 {
                let (si, sj) = (i as isize + di as isize - 1, j as isize + dj as isize - 1);
                f[o] = if si >= 0 && sj >= 0 && (si as usize) < h && (sj as usize) < w {
                    plane[si as usize * w + sj as usize]
                } else {
                    0.0
                };
                o += 1;
            }
        }
    }
}

/// The target of position (i, j): the f×f block of every image channel (c·f² values).
fn block(img: &[f32], shape: Chw, fct: usize, (i, j): (usize, usize), t: &mut [f32]) {
    let Chw { c, h: ih, w: iw } = shape;
    let mut o = 0;
    for ch in 0..c {
        for a in 0..fct {
            for b in 0..fct {
                t[o] = img[ch * ih * iw + (i * fct + a) * iw + j * fct + b];
                o += 1;
            }
        }
    }
}

/// A ridge-regression decoder: each f×f image block (all channels) from the 3×3 window of the stream around
/// the corresponding position; features standardised, λ = 1e-3 on their correlation matrix.
pub(crate) struct Ridge {
    mean_f: Vec<f64>,
    mean_t: Vec<f64>,
    /// D × P, on the raw (centred) features.
    w: Vec<f64>,
    d: usize,
    p: usize,
    fct: usize,
}

/// Most stream positions in the ridge decoder's normal equations; larger training sets use this many
/// positions spread evenly over all of them (see [`super::lowrank::spread`]).
pub(crate) const RIDGE_MAX_POSITIONS: usize = 32768;

/// The sums of the ridge system over the stream positions (at most [`RIDGE_MAX_POSITIONS`]): FᵀF (D × D), FᵀT (D × P), ΣF and ΣT, for the
/// D = 9·C window features F and the P = c·f² block targets T.
struct Sums {
    d: usize,
    p: usize,
    ff: Vec<f64>,
    ft: Vec<f64>,
    f: Vec<f64>,
    t: Vec<f64>,
    positions: usize,
}

impl Sums {
    /// Accumulates over every position of the streams s and their images img, in chunks of 4096 positions
    /// (f32 GEMMs, f64 sums).
    fn accumulate(s: &Tensor, img: &Tensor, lay: &Layout, threads: usize) -> Sums {
        let (st, im) = (lay.stream, lay.image);
        let (d, p) = (9 * st.c, im.c * lay.fct * lay.fct);
        let rows_per_chunk = 4096usize;
        let picked = super::lowrank::spread(lay.n * st.h * st.w, RIDGE_MAX_POSITIONS);
        let positions = picked.len();
        let mut sums = Sums {
            d,
            p,
            ff: vec![0f64; d * d],
            ft: vec![0f64; d * p],
            f: vec![0f64; d],
            t: vec![0f64; p],
            positions,
        };
        let (mut fa, mut ta) = (Vec::new(), Vec::new());
        let (mut aa, mut ab) = (vec![0f32; d * d], vec![0f32; d * p]);
        let mut start = 0;
        while start < positions {
            let rows = rows_per_chunk.min(positions - start);
            fa.resize(rows * d, 0.0);
            ta.resize(rows * p, 0.0);
            for r in 0..rows {
                let pos = picked[start + r];
                let (b, ij) = (pos / (st.h * st.w), pos % (st.h * st.w));
                let at = (ij / st.w, ij % st.w);
                window(
                    &s.data[b * st.len()..][..st.len()],
                    st,
                    at,
                    &mut fa[r * d..][..d],
                );
                let image = &img.data[b * im.len()..][..im.len()];
                block(image, im, lay.fct, at, &mut ta[r * p..][..p]);
            }
            let ft = Mat::rm_t(&fa, d);
            sgemm(d, d, rows, ft, Mat::rm(&fa, d), &mut aa, false, threads);
            sgemm(d, p, rows, ft, Mat::rm(&ta, p), &mut ab, false, threads);
            sums.ff
                .iter_mut()
                .zip(&aa)
                .for_each(|(x, v)| *x += *v as f64);
            sums.ft
                .iter_mut()
                .zip(&ab)
                .for_each(|(x, v)| *x += *v as f64);
            for r in 0..rows {
                sums.f
                    .iter_mut()
                    .zip(&fa[r * d..][..d])
                    .for_each(|(x, v)| *x += *v as f64);
                sums.t
                    .iter_mut()
                    .zip(&ta[r * p..][..p])
                    .for_each(|(x, v)| *x += *v as f64);
            }
            start += rows;
        }
        sums
    }

    /// The ridge weights (D × P, on the raw centred features), from the covariances of the standardised
    /// features; `mean_f`, `mean_t`: the means of the features and targets.
    fn solve(&self, mean_f: &[f64], mean_t: &[f64]) -> Result<Vec<f64>> {
        let (d, p) = (self.d, self.p);
        let m = self.positions.max(1) as f64;
        let scale: Vec<f64> = (0..d)
            .map(|i| {
                let var = self.ff[i * d + i] / m - mean_f[i] * mean_f[i];
                if var > 1e-30 {
                    var.sqrt()
                } else {
                    0.0
                }
            })
            .collect();
        let mut cxx = DMatrix::<f64>::zeros(d, d);
        for i in 0..d {
            for j in 0..d {
                let cov = self.ff[i * d + j] / m - mean_f[i] * mean_f[j];
                let si = if scale[i] > 0.0 { scale[i] } else { 1.0 };
                let sj = if scale[j] > 0.0 { scale[j] } else { 1.0 };
                cxx[(i, j)] = if scale[i] > 0.0 && scale[j] > 0.0 {
                    cov / (si * sj)
                } else {
                    0.0
                };
            }
            cxx[(i, i)] += 1e-3;
        }
        let mut cxy = DMatrix::<f64>::zeros(d, p);
        for i in (0..d).filter(|&i| scale[i] > 0.0) {
            for j in 0..p {
                cxy[(i, j)] = (self.ft[i * p + j] / m - mean_f[i] * mean_t[j]) / scale[i];
            }
        }
        let chol = cxx.cholesky().ok_or_else(|| {
            anyhow::anyhow!("ridge: the normal equations are not positive definite")
        })?;
        let sol = chol.solve(&cxy);
        let mut w = vec![0f64; d * p];
        for i in (0..d).filter(|&i| scale[i] > 0.0) {
            for j in 0..p {
                w[i * p + j] = sol[(i, j)] / scale[i];
            }
        }
        Ok(w)
    }
}

impl Ridge {
    /// Fits on public streams s: [n, C, h, w] and their images: [n, c, H, W].
    pub(crate) fn fit(s: &Tensor, img: &Tensor, threads: usize) -> Result<Ridge> {
        let lay = Layout::of(s, img, "ridge")?;
        let sums = Sums::accumulate(s, img, &lay, threads);
        let m = sums.positions.max(1) as f64;
        let mean_f: Vec<f64> = sums.f.iter().map(|v| v / m).collect();
        let mean_t: Vec<f64> = sums.t.iter().map(|v| v / m).collect();
        let w = sums.solve(&mean_f, &mean_t)?;
        Ok(Ridge {
            mean_f,
            mean_t,
            w,
            d: sums.d,
            p: sums.p,
            fct: lay.fct,
        })
    }

    /// Reconstructs images [n, c, H, W] from streams [n, C, h, w] (shaped like the fitted ones).
    pub(crate) fn predict(&self, s: &Tensor, c: usize) -> Result<Tensor> {
        let (n, ch, h, w) = s.nchw("ridge")?;
        if 9 * ch != self.d || c * self.fct * self.fct != self.p {
            bail!(
                "ridge: stream shape {:?} differs from the fitted one",
                s.shape
            );
        }
        let (ih, iw) = (h * self.fct, w * self.fct);
        let mut out = Tensor::zeros(&[n, c, ih, iw]);
        let mut f = vec![0f32; self.d];
        let mut y = DVector::<f64>::zeros(self.p);
        for b in 0..n {
            let shape = Chw { c: ch, h, w };
            let sb = &s.data[b * shape.len()..][..shape.len()];
            for i in 0..h {
                for j in 0..w {
                    window(sb, shape, (i, j), &mut f);
                    y.iter_mut().zip(&self.mean_t).for_each(|(v, m)| *v = *m);
                    for (k, fv) in f.iter().enumerate() {
                        let dv = *fv as f64 - self.mean_f[k];
                        if dv != 0.0 {
                            let row = &self.w[k * self.p..][..self.p];
                            y.iter_mut().zip(row).for_each(|(v, wv)| *v += dv * wv);
                        }
                    }
                    let mut o = 0;
                    for cc in 0..c {
                        for a in 0..self.fct {
                            for bb in 0..self.fct {
                                let idx =
                                    ((b * c + cc) * ih + i * self.fct + a) * iw + j * self.fct + bb;
                                out.data[idx] = y[o] as f32;
                                o += 1;
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// How a conv decoder is trained, sized to the stream: small streams (up to [`SMALL_STREAM`]² positions, as
/// CIFAR-10's or Fashion-MNIST's) train on whole streams, 48 channels wide, in batches of 32 images for 300
/// steps; larger ones on random [`CROP`]×[`CROP`] crops of the stream (and the image blocks under them),
/// 24 channels wide, 8 crops per step, for 150 steps, so that a 224 px stream costs about what a 64 px one
/// does. `--decoder-steps` overrides the steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecoderBudget {
    /// Channels of the hidden layers.
    pub width: usize,
    /// Side of the stream crops trained on (None: whole streams).
    pub crop: Option<usize>,
    /// Streams (or crops) per step.
    pub batch: usize,
    pub steps: usize,
}

/// Largest stream side trained on whole (see [`DecoderBudget`]).
pub(crate) const SMALL_STREAM: usize = 64;
/// Side of the crops of larger streams.
pub(crate) const CROP: usize = 32;

impl DecoderBudget {
    /// The budget for streams of h × w positions; `steps` overrides the default steps.
    pub(crate) fn for_stream(h: usize, w: usize, steps: Option<usize>) -> DecoderBudget {
        if h * w <= SMALL_STREAM * SMALL_STREAM {
            DecoderBudget {
                width: 48,
                crop: None,
                batch: 32,
                steps: steps.unwrap_or(300),
            }
        } else {
            DecoderBudget {
                width: 24,
                crop: Some(CROP),
                batch: 8,
                steps: steps.unwrap_or(150),
            }
        }
    }
}
/// The decoder's convs: 3×3, stride 1, padding 1 (size-preserving), with a bias.
const DECODER_CONV: Conv2dConfig = Conv2dConfig {
    stride: 1,
    padding: 1,
    bias: true,
};

/// A small conv decoder: conv3×3 (C→48), ReLU, conv3×3 (48→48), ReLU, conv3×3 (48→c·f²), then depth-to-space
/// by f; trained with AdamW (lr 1e-3 for the first half of the steps, then 3e-4; no weight decay) on the
/// mean squared error, on batches drawn from the public set, inputs scaled by 1/RMS of the public streams.
pub(crate) struct ConvDecoder {
    c1: Conv2d,
    c2: Conv2d,
    c3: Conv2d,
    r: Relu,
    fct: usize,
    out_c: usize,
    input_scale: f32,
    // Activations and gradients, reused.
    a1: Tensor,
    h1: Tensor,
    a2: Tensor,
    h2: Tensor,
    a3: Tensor,
    g: Tensor,
    g2: Tensor,
}

/// Calls `each(lo, hi)` for every element: `lo` its index in [n, c·f², h, w], `hi` in [n, c, h·f, w·f].
fn sub_pixel_pairs(
    n: usize,
    c: usize,
    f: usize,
    h: usize,
    w: usize,
    mut each: impl FnMut(usize, usize),
) {
    let (ih, iw) = (h * f, w * f);
    for b in 0..n {
        for cc in 0..c {
            for a in 0..f {
                for bb in 0..f {
                    let q = (cc * f + a) * f + bb;
                    for i in 0..h {
                        for j in 0..w {
                            each(
                                ((b * c * f * f + q) * h + i) * w + j,
                                ((b * c + cc) * ih + i * f + a) * iw + j * f + bb,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// x: [n, c·f², h, w] → out: [n, c, h·f, w·f] (sub-pixel rearrangement).
fn depth_to_space(x: &Tensor, c: usize, f: usize, out: &mut Tensor) {
    let (n, h, w) = (x.shape[0], x.shape[2], x.shape[3]);
    out.resize(&[n, c, h * f, w * f]);
    sub_pixel_pairs(n, c, f, h, w, |lo, hi| out.data[hi] = x.data[lo]);
}

/// y: [n, c, H, W] → out: [n, c·f², H/f, W/f], the inverse of [`depth_to_space`].
fn space_to_depth(y: &Tensor, c: usize, f: usize, out: &mut Tensor) {
    let (n, h, w) = (y.shape[0], y.shape[2] / f, y.shape[3] / f);
    out.resize(&[n, c * f * f, h, w]);
    sub_pixel_pairs(n, c, f, h, w, |lo, hi| out.data[lo] = y.data[hi]);
}

impl ConvDecoder {
    fn new(in_c: usize, out_c: usize, fct: usize, width: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        ConvDecoder {
            c1: Conv2d::new(in_c, width, 3, DECODER_CONV, &mut rng),
            c2: Conv2d::new(width, width, 3, DECODER_CONV, &mut rng),
            c3: Conv2d::new(width, out_c * fct * fct, 3, DECODER_CONV, &mut rng),
            r: Relu,
            fct,
            out_c,
            input_scale: 1.0,
            a1: Tensor::default(),
            h1: Tensor::default(),
            a2: Tensor::default(),
            h2: Tensor::default(),
            a3: Tensor::default(),
            g: Tensor::default(),
            g2: Tensor::default(),
        }
    }

    fn forward(&mut self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        self.c1.forward(x, &mut self.a1)?;
        self.r.forward(&self.a1, &mut self.h1);
        self.c2.forward(&self.h1, &mut self.a2)?;
        self.r.forward(&self.a2, &mut self.h2);
        self.c3.forward(&self.h2, &mut self.a3)?;
        depth_to_space(&self.a3, self.out_c, self.fct, out);
        Ok(())
    }

    /// dy: the gradient of the loss at the decoder's output; accumulates every parameter's gradient.
    fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Result<()> {
        let mut g3 = Tensor::default();
        space_to_depth(dy, self.out_c, self.fct, &mut g3);
        self.c3.backward(&self.h2, &g3, Some(&mut self.g))?;
        self.r.backward(&self.h2, &self.g, &mut self.g2);
        self.c2.backward(&self.h1, &self.g2, Some(&mut self.g))?;
        self.r.backward(&self.h1, &self.g, &mut self.g2);
        self.c1.backward(x, &self.g2, None)?;
        Ok(())
    }

    fn params(&mut self) -> Vec<&mut asymml_core::layers::Param> {
        let mut v = Vec::new();
        for c in [&mut self.c1, &mut self.c2, &mut self.c3] {
            v.push(&mut c.weight);
            if let Some(b) = c.bias.as_mut() {
                v.push(b);
            }
        }
        v
    }

    /// Trains on public streams s: [n, C, h, w] and images [n, c, H, W] as `budget` says (batches of whole
    /// streams, or of random crops).
    pub(crate) fn fit(s: &Tensor, img: &Tensor, budget: DecoderBudget, seed: u64) -> Result<Self> {
        let lay = Layout::of(s, img, "conv decoder")?;
        let (n, Chw { c, h, w }) = (lay.n, lay.stream);
        let (fct, ic) = (lay.fct, lay.image.c);
        let mut dec = ConvDecoder::new(c, ic, fct, budget.width.max(1), seed);
        let var = s
            .data
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            / s.len().max(1) as f64;
        dec.input_scale = if var > 0.0 {
            (1.0 / var.sqrt()) as f32
        } else {
            1.0
        };
        let mut opt = Optimizer::new(
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            0.0,
        );
        // The crop (whole streams without one).
        let (ch, cw) = match budget.crop {
            Some(k) => (k.clamp(1, h), k.clamp(1, w)),
            None => (h, w),
        };
        let (ih, iw) = (ch * fct, cw * fct);
        let mut rng = Rng::new(seed ^ 0xDEC0);
        let (mut xb, mut yb, mut dy) = (Tensor::default(), Tensor::default(), Tensor::default());
        let batch = if budget.crop.is_some() {
            budget.batch.max(1)
        } else {
            budget.batch.max(1).min(n.max(1))
        };
        let mut target = vec![0f32; batch * ic * ih * iw];
        let mut order: Vec<usize> = Vec::new();
        let steps = budget.steps;
        for step in 0..steps {
            while order.len() < batch {
                let mut more: Vec<usize> = (0..n).collect();
                rng.shuffle(&mut more);
                order.extend(more);
            }
            let idx: Vec<usize> = order.drain(..batch).collect();
            let lr = if step < steps / 2 { 1e-3 } else { 3e-4 };
            xb.resize(&[batch, c, ch, cw]);
            for (k, &i) in idx.iter().enumerate() {
                let (i0, j0) = (rng.below(h - ch + 1), rng.below(w - cw + 1));
                for cc in 0..c {
                    for a in 0..ch {
                        let src = &s.data[((i * c + cc) * h + i0 + a) * w + j0..][..cw];
                        let dst = &mut xb.data[((k * c + cc) * ch + a) * cw..][..cw];
                        dst.iter_mut()
                            .zip(src)
                            .for_each(|(d, v)| *d = v * dec.input_scale);
                    }
                }
                let (bh, bw) = (lay.image.h, lay.image.w);
                for cc in 0..ic {
                    for a in 0..ih {
                        let src =
                            &img.data[((i * ic + cc) * bh + i0 * fct + a) * bw + j0 * fct..][..iw];
                        target[((k * ic + cc) * ih + a) * iw..][..iw].copy_from_slice(src);
                    }
                }
            }
            dec.forward(&xb, &mut yb)?;
            dy.resize(&yb.shape);
            let scale = 2.0 / yb.len() as f32;
            dy.data
                .iter_mut()
                .zip(yb.data.iter().zip(&target))
                .for_each(|(g, (y, t))| *g = scale * (y - t));
            for p in dec.params() {
                p.zero_grad();
            }
            dec.backward(&xb, &dy)?;
            opt.begin_step();
            for (i, p) in dec.params().into_iter().enumerate() {
                opt.update(i, p, lr);
            }
        }
        Ok(dec)
    }

    /// Reconstructs images from streams shaped like the training ones.
    pub(crate) fn predict(&mut self, s: &Tensor) -> Result<Tensor> {
        let mut x = s.clone();
        x.data.iter_mut().for_each(|v| *v *= self.input_scale);
        let mut out = Tensor::default();
        self.forward(&x, &mut out)?;
        Ok(out)
    }
}

/// Peak signal-to-noise ratio (dB) of two images in [0, 1] (capped at 100 dB).
pub(crate) fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse <= 1e-10 {
        100.0
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

/// Structural similarity of two [c, h, w] images in [0, 1] (data range 1): Gaussian window of 11 (σ 1.5;
/// smaller for images under 11 px), K1 = 0.01, K2 = 0.03, mean over the valid positions and the channels.
pub(crate) fn ssim(a: &[f32], b: &[f32], c: usize, h: usize, w: usize) -> f64 {
    let win = 11.min(h).min(w);
    let win = if win % 2 == 0 { win - 1 } else { win };
    if win == 0 {
        return 0.0;
    }
    let half = (win / 2) as f64;
    let g: Vec<f64> = (0..win)
        .map(|i| (-((i as f64 - half).powi(2)) / (2.0 * 1.5 * 1.5)).exp())
        .collect();
    let gs: f64 = g.iter().sum();
    let g: Vec<f64> = g.iter().map(|v| v / gs).collect();
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let (oh, ow) = (h - win + 1, w - win + 1);
    let mut total = 0.0;
    // The Gaussian window is separable: filter the rows, then the columns, of x, y, x², y², xy.
    let mut rows = vec![[0f64; 5]; h * ow];
    for ch in 0..c {
        let (pa, pb) = (&a[ch * h * w..][..h * w], &b[ch * h * w..][..h * w]);
        for i in 0..h {
            for j in 0..ow {
                let mut acc = [0f64; 5];
                for (v, &wt) in g.iter().enumerate() {
                    let (x, y) = (pa[i * w + j + v] as f64, pb[i * w + j + v] as f64);
                    acc[0] += wt * x;
                    acc[1] += wt * y;
                    acc[2] += wt * x * x;
                    acc[3] += wt * y * y;
                    acc[4] += wt * x * y;
                }
                rows[i * ow + j] = acc;
            }
        }
        for i in 0..oh {
            for j in 0..ow {
                let mut m = [0f64; 5];
                for (u, &wt) in g.iter().enumerate() {
                    let r = &rows[(i + u) * ow + j];
                    for k in 0..5 {
                        m[k] += wt * r[k];
                    }
                }
                let [mx, my, sxx, syy, sxy] = m;
                let (vx, vy, cxy) = (sxx - mx * mx, syy - my * my, sxy - mx * my);
                total += ((2.0 * mx * my + c1) * (2.0 * cxy + c2))
                    / ((mx * mx + my * my + c1) * (vx + vy + c2));
            }
        }
    }
    total / (c * oh * ow).max(1) as f64
}

/// Mean PSNR and SSIM of reconstructions against the private images (both normalised [n, c, H, W]).
pub(crate) fn quality(recon: &Tensor, truth: &Tensor, scale: &PixelScale) -> Result<(f64, f64)> {
    let (n, c, h, w) = truth.nchw("quality")?;
    if recon.shape != truth.shape {
        bail!(
            "reconstruction shape {:?} differs from {:?}",
            recon.shape,
            truth.shape
        );
    }
    let per = c * h * w;
    let (mut p, mut s) = (0.0, 0.0);
    for i in 0..n {
        let a = scale.to_unit(&truth.data[i * per..][..per], c);
        let b = scale.to_unit(&recon.data[i * per..][..per], c);
        p += psnr(&a, &b);
        s += ssim(&a, &b, c, h, w);
    }
    Ok((p / n.max(1) as f64, s / n.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_and_psnr_of_identical_and_different_images() {
        let mut rng = Rng::new(3);
        let a: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.uniform()).collect();
        assert!((ssim(&a, &a, 3, 16, 16) - 1.0).abs() < 1e-9);
        assert_eq!(psnr(&a, &a), 100.0);
        let b: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.uniform()).collect();
        assert!(ssim(&a, &b, 3, 16, 16) < 0.2);
        // Uniform noise against uniform noise: MSE = 1/6, PSNR ≈ 7.8 dB.
        assert!((psnr(&a, &b) - 7.78).abs() < 0.5, "{}", psnr(&a, &b));
    }

    /// SSIM with the 2-D window summed directly (the definition the separable [`ssim`] must match).
    fn ssim_direct(a: &[f32], b: &[f32], c: usize, h: usize, w: usize) -> f64 {
        let win = 11.min(h).min(w);
        let win = if win % 2 == 0 { win - 1 } else { win };
        let half = (win / 2) as f64;
        let g: Vec<f64> = (0..win)
            .map(|i| (-((i as f64 - half).powi(2)) / (2.0 * 1.5 * 1.5)).exp())
            .collect();
        let gs: f64 = g.iter().sum();
        let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
        let (mut total, mut count) = (0.0, 0usize);
        for ch in 0..c {
            let (pa, pb) = (&a[ch * h * w..][..h * w], &b[ch * h * w..][..h * w]);
            for i in 0..=(h - win) {
                for j in 0..=(w - win) {
                    let (mut mx, mut my, mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
                    for u in 0..win {
                        for v in 0..win {
                            let wt = g[u] * g[v] / (gs * gs);
                            let x = pa[(i + u) * w + j + v] as f64;
                            let y = pb[(i + u) * w + j + v] as f64;
                            mx += wt * x;
                            my += wt * y;
                            sxx += wt * x * x;
                            syy += wt * y * y;
                            sxy += wt * x * y;
                        }
                    }
                    let (vx, vy, cxy) = (sxx - mx * mx, syy - my * my, sxy - mx * my);
                    total += ((2.0 * mx * my + c1) * (2.0 * cxy + c2))
                        / ((mx * mx + my * my + c1) * (vx + vy + c2));
                    count += 1;
                }
            }
        }
        total / count.max(1) as f64
    }

    #[test]
    fn separable_ssim_matches_the_direct_window() {
        let mut rng = Rng::new(11);
        for (c, h, w) in [(3, 16, 20), (1, 7, 9), (2, 12, 12)] {
            let a: Vec<f32> = (0..c * h * w).map(|_| rng.uniform()).collect();
            let b: Vec<f32> = a.iter().map(|v| 0.7 * v + 0.3 * rng.uniform()).collect();
            let (s, d) = (ssim(&a, &b, c, h, w), ssim_direct(&a, &b, c, h, w));
            assert!((s - d).abs() < 1e-9, "{s} vs {d}");
        }
    }

    #[test]
    fn decoder_budget_follows_the_stream_size() {
        let small = DecoderBudget::for_stream(32, 32, None);
        assert_eq!((small.width, small.crop, small.steps), (48, None, 300));
        let large = DecoderBudget::for_stream(224, 224, None);
        assert_eq!(
            (large.width, large.crop, large.steps),
            (24, Some(CROP), 150)
        );
        assert_eq!(DecoderBudget::for_stream(224, 224, Some(7)).steps, 7);
    }

    #[test]
    fn conv_decoder_trained_on_crops_inverts_a_scaled_copy() {
        let mut rng = Rng::new(9);
        let n = 6;
        let img = Tensor::from_vec(
            &[n, 1, 24, 24],
            (0..n * 576).map(|_| rng.normal()).collect(),
        )
        .unwrap();
        let mut s = img.clone();
        s.data.iter_mut().for_each(|v| *v *= 2.0);
        let budget = DecoderBudget {
            width: 16,
            crop: Some(8),
            batch: 8,
            steps: 200,
        };
        let mut dec = ConvDecoder::fit(&s, &img, budget, 2).unwrap();
        let rec = dec.predict(&s).unwrap();
        assert_eq!(rec.shape, img.shape);
        let mse = rec
            .data
            .iter()
            .zip(&img.data)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / img.len() as f32;
        assert!(mse < 0.3, "mse {mse} on unit-variance images");
    }

    #[test]
    fn ridge_recovers_a_linear_downsampled_stream() {
        // The stream is each 2×2 block's pixels as 4 channels (a lossless linear code): ridge inverts it.
        let mut rng = Rng::new(5);
        let (n, h) = (6, 8);
        let img = Tensor::from_vec(
            &[n, 1, 2 * h, 2 * h],
            (0..n * 4 * h * h).map(|_| rng.normal()).collect(),
        )
        .unwrap();
        let mut s = Tensor::default();
        space_to_depth(&img, 1, 2, &mut s);
        let fit = Ridge::fit(&s, &img, 1).unwrap();
        let rec = fit.predict(&s, 1).unwrap();
        let err = rec
            .data
            .iter()
            .zip(&img.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 0.05, "{err}");
    }

    #[test]
    fn conv_decoder_learns_to_invert_a_scaled_copy() {
        let mut rng = Rng::new(7);
        let n = 24;
        let img =
            Tensor::from_vec(&[n, 1, 8, 8], (0..n * 64).map(|_| rng.normal()).collect()).unwrap();
        let mut s = img.clone();
        s.data.iter_mut().for_each(|v| *v *= -3.0);
        let mean_sq = img.data.iter().map(|v| v * v).sum::<f32>() / img.len() as f32;
        let budget = DecoderBudget {
            width: 48,
            crop: None,
            batch: 8,
            steps: 180,
        };
        let mut dec = ConvDecoder::fit(&s, &img, budget, 1).unwrap();
        let rec = dec.predict(&s).unwrap();
        let mse = rec
            .data
            .iter()
            .zip(&img.data)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / img.len() as f32;
        assert!(mse < 0.2 * mean_sq, "mse {mse} vs signal {mean_sq}");
    }
}
