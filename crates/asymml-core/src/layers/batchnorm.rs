//! BatchNorm2d: batch statistics and running averages in training, running averages in evaluation.

use super::{sum8, Param};
use crate::error::{CoreError, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// A per-channel map y = x·scale[c] + shift[c], then ReLU where `relu`: what [`BatchNorm2d::forward`] computes in
/// inference, given to a conv's executor so that it can apply it as it writes the conv's output
/// ([`crate::models::ConvExec::conv_forward_mapped`]). The arithmetic is BatchNorm's own (a product, then a sum,
/// each rounded), so the values are the same bit for bit.
#[derive(Clone, Copy, Debug)]
pub struct ChannelMap<'a> {
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub relu: bool,
}

impl ChannelMap<'_> {
    /// The map of channel `c` applied to `v`.
    #[inline(always)]
    pub fn apply(&self, c: usize, v: f32) -> f32 {
        let y = v * self.scale[c] + self.shift[c];
        if self.relu {
            y.max(0.0)
        } else {
            y
        }
    }

    /// The number of channels.
    pub fn channels(&self) -> usize {
        self.scale.len().min(self.shift.len())
    }
}

/// BatchNorm2d over channels of an NCHW tensor: weight γ [C], bias β [C], running mean/var [C]; with `relu`
/// set, BatchNorm2d followed by ReLU in one pass (backward recomputes the ReLU mask from the input).
pub struct BatchNorm2d {
    pub channels: usize,
    /// Apply ReLU to the output (BN+ReLU fused).
    pub relu: bool,
    pub eps: f32,
    pub momentum: f32,
    pub weight: Param,
    pub bias: Param,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: i64,
    /// Per-channel mean and 1/sqrt(var + eps) used by the last forward (batch or running statistics).
    mean: Vec<f32>,
    invstd: Vec<f32>,
    /// Whether the last forward used batch statistics.
    batch_stats: bool,
    /// Per-channel affine map of the last forward: y = x·scale + shift (before the ReLU if fused).
    scale: Vec<f32>,
    shift: Vec<f32>,
    /// Per-channel sums for backward.
    sum_dy: Vec<f32>,
    sum_dy_xhat: Vec<f32>,
}

/// Per-plane (sum, sum of squared deviations from the plane mean) of x: [B·C planes of HW], merged per
/// channel with Chan's parallel formula into (mean, biased variance) in f64.
fn channel_stats(x: &[f32], cn: usize, hw: usize) -> Vec<(f64, f64)> {
    let planes: Vec<(f64, f64)> = x
        .par_chunks(hw)
        .map(|pl| {
            let s = sum8(pl, |v| v);
            let m = s / hw as f32;
            let m2 = sum8(pl, |v| (v - m) * (v - m));
            (s as f64, m2 as f64)
        })
        .collect();
    let n = hw as f64;
    (0..cn)
        .map(|c| {
            let (mut count, mut mean, mut m2) = (0.0f64, 0.0f64, 0.0f64);
            for &(s, pm2) in planes.iter().skip(c).step_by(cn) {
                let pm = s / n;
                let tot = count + n;
                let d = pm - mean;
                mean += d * n / tot;
                m2 += pm2 + d * d * count * n / tot;
                count = tot;
            }
            (mean, m2 / count.max(1.0))
        })
        .collect()
}

/// g where the fused ReLU passed x (x·a + b > 0, or always without `relu`), else 0 — as a bit mask, not a
/// branch: on activations the condition is a coin flip. (Measured at [8, 64, 224, 224], 2 threads: the fused
/// backward took 104 ms with a branch, 64 ms with this mask inside the sums, 19 ms with the mask in a loop of
/// its own; the plain backward 16 ms.)
#[inline(always)]
fn masked(g: f32, x: f32, a: f32, b: f32, relu: bool) -> f32 {
    let keep = (!relu | (x * a + b > 0.0)) as u32;
    f32::from_bits(g.to_bits() & keep.wrapping_neg())
}

simd_fn! {
/// One plane's (Σ g, Σ g·(x − m)) with g = dy, masked by [x·a + b > 0] when `relu` (BN+ReLU fused: a, b the
/// forward's affine map), in 8 partial sums each, into `out`.
pub(crate) fn plane_grad_sums(xp: &[f32], gp: &[f32], m: f32, a: f32, b: f32, relu: bool, out: &mut [f32; 2]) {
    let (mut s, mut sx) = ([0f32; 8], [0f32; 8]);
    let (mut ts, mut tsx) = (0f32, 0f32);
    // Blocks of 256: the mask is applied in a loop of its own (a select inside the sums does not vectorise).
    let mut buf = [0f32; 256];
    for (xb, gb) in xp.chunks(256).zip(gp.chunks(256)) {
        let g = &mut buf[..gb.len()];
        if relu {
            for ((o, &xv), &gv) in g.iter_mut().zip(xb).zip(gb) {
                *o = masked(gv, xv, a, b, true);
            }
        } else {
            g.copy_from_slice(gb);
        }
        let (xc, gc) = (xb.chunks_exact(8), g.chunks_exact(8));
        for (&xv, &gv) in xc.remainder().iter().zip(gc.remainder()) {
            ts += gv;
            tsx += gv * (xv - m);
        }
        for (x, g) in xc.zip(gc) {
            for l in 0..8 {
                s[l] += g[l];
                sx[l] += g[l] * (x[l] - m);
            }
        }
    }
    let fold = |v: [f32; 8]| ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
    out[0] = fold(s) + ts;
    out[1] = fold(sx) + tsx;
}
}

simd_fn! {
/// One plane of ∇X: dx = c1·g + c3·x + c2 with g = dy masked as in [`plane_grad_sums`].
pub(crate) fn plane_dx(dxp: &mut [f32], xp: &[f32], gp: &[f32], a: f32, b: f32, relu: bool, c: [f32; 3]) {
    let [c1, c2, c3] = c;
    if relu {
        for ((d, &xv), &gv) in dxp.iter_mut().zip(xp).zip(gp) {
            *d = c1 * masked(gv, xv, a, b, true) + c3 * xv + c2;
        }
    } else {
        for ((d, &xv), &gv) in dxp.iter_mut().zip(xp).zip(gp) {
            *d = c1 * gv + c3 * xv + c2;
        }
    }
}
}

/// Per channel (Σ dy, Σ dy·x̂) with x̂ = (x − mean)·invstd, summed per plane in f32 and across planes in f64.
/// With `relu` (BN+ReLU fused; scale, shift: the forward's per-channel affine map), dy is first masked by
/// [x·scale + shift > 0].
fn grad_sums(
    x: &[f32],
    dy: &[f32],
    cn: usize,
    hw: usize,
    mean: &[f32],
    invstd: &[f32],
    relu: Option<(&[f32], &[f32])>,
) -> Vec<(f32, f32)> {
    let planes: Vec<(f64, f64)> = x
        .par_chunks(hw)
        .zip(dy.par_chunks(hw))
        .enumerate()
        .map(|(i, (xp, gp))| {
            let c = i % cn;
            let (a, b) = relu.map_or((1.0, 0.0), |(scale, shift)| (scale[c], shift[c]));
            let mut out = [0f32; 2];
            plane_grad_sums(xp, gp, mean[c], a, b, relu.is_some(), &mut out);
            (out[0] as f64, out[1] as f64 * invstd[c] as f64)
        })
        .collect();
    merge_planes(&planes, cn)
}

/// Per channel (Σ dy, Σ dy·x̂) from per-plane sums (planes in NCHW order), added across planes in f64.
pub(crate) fn merge_planes(planes: &[(f64, f64)], cn: usize) -> Vec<(f32, f32)> {
    (0..cn)
        .map(|c| {
            let (mut s, mut sx) = (0.0f64, 0.0f64);
            for &(a, b) in planes.iter().skip(c).step_by(cn) {
                s += a;
                sx += b;
            }
            (s as f32, sx as f32)
        })
        .collect()
}

impl BatchNorm2d {
    /// γ = 1, β = 0, running mean 0, running var 1; PyTorch's eps 1e-5 and momentum 0.1.
    pub fn new(channels: usize) -> Self {
        BatchNorm2d {
            channels,
            relu: false,
            eps: 1e-5,
            momentum: 0.1,
            weight: Param::new(Tensor {
                shape: vec![channels],
                data: vec![1.0; channels],
            }),
            bias: Param::new(Tensor::zeros(&[channels])),
            running_mean: Tensor::zeros(&[channels]),
            running_var: Tensor {
                shape: vec![channels],
                data: vec![1.0; channels],
            },
            num_batches_tracked: 0,
            mean: vec![],
            invstd: vec![],
            batch_stats: false,
            scale: vec![],
            shift: vec![],
            sum_dy: vec![],
            sum_dy_xhat: vec![],
        }
    }

    /// This BN with the following ReLU fused into it (`relu`) or not.
    pub fn with_relu(mut self, relu: bool) -> Self {
        self.relu = relu;
        self
    }

    fn check(&self, x: &Tensor) -> Result<(usize, usize, usize)> {
        let (b, c, h, w) = x.nchw("batchnorm")?;
        if c != self.channels {
            return Err(CoreError::Shape(format!(
                "batchnorm: input has {c} channels, layer expects {}",
                self.channels
            )));
        }
        Ok((b, c, h * w))
    }

    /// x: [B, C, H, W] → y: [B, C, H, W]. `train`: normalise with batch statistics and update the running
    /// averages (unbiased variance, as PyTorch); otherwise use the running averages.
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor, train: bool) -> Result<()> {
        let (cn, hw) = self.prepare(x, train)?;
        y.resize(&x.shape);
        let (scale, shift, relu) = (&self.scale, &self.shift, self.relu);
        y.data
            .par_chunks_mut(hw)
            .zip(x.data.par_chunks(hw))
            .enumerate()
            .for_each(|(i, (yp, xp))| {
                let (a, b) = (scale[i % cn], shift[i % cn]);
                if relu {
                    yp.iter_mut()
                        .zip(xp)
                        .for_each(|(o, &v)| *o = (v * a + b).max(0.0));
                } else {
                    yp.iter_mut().zip(xp).for_each(|(o, &v)| *o = v * a + b);
                }
            });
        Ok(())
    }

    /// The statistics part of [`BatchNorm2d::forward`]: batch statistics (and the running averages' update)
    /// in training, the running averages otherwise, then the per-channel affine map ([`BatchNorm2d::affine_map`]).
    /// Returns (C, H·W).
    pub(crate) fn prepare(&mut self, x: &Tensor, train: bool) -> Result<(usize, usize)> {
        let (b, cn, hw) = self.check(x)?;
        let n = b * hw;
        if train && n <= 1 {
            return Err(CoreError::Shape(
                "batchnorm: training needs more than one value per channel (batch of 1 with a 1×1 map)".into(),
            ));
        }
        self.batch_stats = train;
        if train {
            let stats: Vec<(f32, f32)> = channel_stats(&x.data, cn, hw)
                .into_iter()
                .map(|(m, v)| (m as f32, v as f32))
                .collect();
            self.mean = stats.iter().map(|s| s.0).collect();
            self.invstd = stats
                .iter()
                .map(|s| 1.0 / (s.1 + self.eps).sqrt())
                .collect();
            let m = self.momentum;
            let unbias = n as f32 / (n - 1) as f32;
            for (c, (mean, var)) in stats.into_iter().enumerate() {
                self.running_mean.data[c] = (1.0 - m) * self.running_mean.data[c] + m * mean;
                self.running_var.data[c] = (1.0 - m) * self.running_var.data[c] + m * var * unbias;
            }
            self.num_batches_tracked += 1;
        } else {
            self.running_stats();
        }
        self.affine();
        Ok((cn, hw))
    }

    /// The per-channel (scale, shift) of the last forward: y = x·scale + shift (before the fused ReLU).
    pub(crate) fn affine_map(&self) -> (&[f32], &[f32]) {
        (&self.scale, &self.shift)
    }

    /// The inference forward's map ([`BatchNorm2d::forward`] with `train` false, as a [`ChannelMap`]): the
    /// statistics are the running averages, made ready as that forward would make them.
    pub fn inference_map(&mut self) -> ChannelMap<'_> {
        self.batch_stats = false;
        self.running_stats();
        self.affine();
        ChannelMap {
            scale: &self.scale,
            shift: &self.shift,
            relu: self.relu,
        }
    }

    /// The statistics of an inference forward: the running averages.
    fn running_stats(&mut self) {
        self.mean = self.running_mean.data.clone();
        self.invstd = self
            .running_var
            .data
            .iter()
            .map(|v| 1.0 / (v + self.eps).sqrt())
            .collect();
    }

    /// Per-channel y = x·scale + shift of the current statistics and γ, β.
    fn affine(&mut self) {
        let (g, bt) = (&self.weight.value.data, &self.bias.value.data);
        self.scale.clear();
        self.shift.clear();
        for c in 0..self.channels {
            let scale = g[c] * self.invstd[c];
            self.scale.push(scale);
            self.shift.push(bt[c] - self.mean[c] * scale);
        }
    }

    /// x: [B, C, H, W] (forward input), dy: [B, C, H, W] → dx: [B, C, H, W]; accumulates ∇γ, ∇β.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let (b, cn, hw) = self.check(x)?;
        if dy.shape != x.shape || self.mean.len() != cn {
            return Err(CoreError::Shape(
                "batchnorm backward: shapes differ from forward".into(),
            ));
        }
        let n = (b * hw) as f64;
        let relu = self.relu.then_some((&self.scale[..], &self.shift[..]));
        let sums = grad_sums(&x.data, &dy.data, cn, hw, &self.mean, &self.invstd, relu);
        let coefs = self.grad_coefs(&sums, n);
        dx.resize(&x.shape);
        let (scale, shift, relu) = (&self.scale, &self.shift, self.relu);
        dx.data
            .par_chunks_mut(hw)
            .zip(x.data.par_chunks(hw).zip(dy.data.par_chunks(hw)))
            .enumerate()
            .for_each(|(i, (dxp, (xp, dyp)))| {
                let c = i % cn;
                plane_dx(dxp, xp, dyp, scale[c], shift[c], relu, coefs[c]);
            });
        Ok(())
    }

    /// The mean and 1/sqrt(var + eps) per channel of the last forward.
    pub(crate) fn stats(&self) -> (&[f32], &[f32]) {
        (&self.mean, &self.invstd)
    }

    /// From the per-channel (Σ g, Σ g·x̂) of the gradient g reaching the BN output (`n` values per channel):
    /// accumulates ∇γ, ∇β and returns per channel the coefficients [c1, c2, c3] of ∇x = c1·g + c3·x + c2.
    pub(crate) fn grad_coefs(&mut self, sums: &[(f32, f32)], n: f64) -> Vec<[f32; 3]> {
        let cn = self.channels;
        self.sum_dy = sums.iter().map(|s| s.0).collect();
        self.sum_dy_xhat = sums.iter().map(|s| s.1).collect();
        for c in 0..cn {
            self.bias.grad.data[c] += self.sum_dy[c];
            self.weight.grad.data[c] += self.sum_dy_xhat[c];
        }
        let g = &self.weight.value.data;
        let (mean, invstd) = (&self.mean, &self.invstd);
        let (sdy, sdyx) = (&self.sum_dy, &self.sum_dy_xhat);
        (0..cn)
            .map(|c| {
                let k = g[c] * invstd[c];
                if self.batch_stats {
                    // dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂)), x̂ = (x − mean)·invstd
                    let mdy = (sdy[c] as f64 / n) as f32;
                    let mdyx = (sdyx[c] as f64 / n) as f32;
                    let kx = k * invstd[c] * mdyx;
                    [k, kx * mean[c] - k * mdy, -kx]
                } else {
                    [k, 0.0, 0.0]
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Relu;
    use crate::rng::Rng;

    /// BN with ReLU fused ≡ BN then ReLU, forward and backward, with batch and running statistics.
    #[test]
    fn fused_relu_matches_bn_then_relu() {
        let mut rng = Rng::new(5);
        // 15 pixels per plane (less than a vector block), and 23×29 = 667 (several blocks and a tail).
        for shape in [[3, 4, 5, 3], [2, 4, 23, 29]] {
            fused_case(&mut rng, shape);
        }
    }

    fn fused_case(rng: &mut Rng, shape: [usize; 4]) {
        let n: usize = shape.iter().product();
        let x = Tensor::from_vec(&shape, (0..n).map(|_| rng.normal()).collect()).unwrap();
        let dy = Tensor::from_vec(&shape, (0..n).map(|_| rng.normal()).collect()).unwrap();
        for train in [true, false] {
            let mut plain = BatchNorm2d::new(4);
            let mut fused = BatchNorm2d::new(4).with_relu(true);
            for bn in [&mut plain, &mut fused] {
                for (c, v) in bn.weight.value.data.iter_mut().enumerate() {
                    *v = 0.5 + c as f32;
                }
                for (c, v) in bn.bias.value.data.iter_mut().enumerate() {
                    *v = 0.3 * c as f32 - 0.5;
                }
            }
            let (mut t, mut y, mut yf) = (Tensor::default(), Tensor::default(), Tensor::default());
            plain.forward(&x, &mut t, train).unwrap();
            Relu.forward(&t, &mut y);
            fused.forward(&x, &mut yf, train).unwrap();
            assert_eq!(y.data, yf.data, "forward, train {train}");
            let (mut g, mut dx, mut dxf) =
                (Tensor::default(), Tensor::default(), Tensor::default());
            Relu.backward(&y, &dy, &mut g);
            plain.backward(&x, &g, &mut dx).unwrap();
            fused.backward(&x, &dy, &mut dxf).unwrap();
            for (a, b) in dx.data.iter().zip(&dxf.data) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
                    "∇x, train {train}: {a} vs {b}"
                );
            }
            assert_eq!(plain.weight.grad.data, fused.weight.grad.data);
            assert_eq!(plain.bias.grad.data, fused.bias.grad.data);
        }
    }
}
