//! Pooling: max (optionally fused with a preceding ReLU), average, and adaptive average.

use super::out_size;
use crate::error::{CoreError, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;

fn nchw(x: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    x.nchw(what)
}

pub(crate) fn pooled(
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    what: &str,
) -> Result<(usize, usize)> {
    if p * 2 > k {
        return Err(CoreError::Shape(format!(
            "{what}: padding {p} exceeds half the window {k}"
        )));
    }
    match (out_size(h, k, s, p), out_size(w, k, s, p)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(CoreError::Shape(format!(
            "{what}: input {h}×{w} is smaller than the {k}×{k} window"
        ))),
    }
}

/// One plane of a max pool, any window: y and the argmax of every output (NONE where no input gets the
/// gradient).
fn max_general(
    xp: &[f32],
    (h, w): (usize, usize),
    (k, s, p): (usize, usize, isize),
    (oh, ow): (usize, usize),
    relu: bool,
    yp: &mut [f32],
    ap: &mut [u32],
) {
    for oy in 0..oh {
        for ox in 0..ow {
            let mut best = f32::NEG_INFINITY;
            let mut arg = NONE;
            for_window((oy, ox), (k, s, p), (h, w), |idx| {
                let v = xp[idx];
                if v > best || v.is_nan() {
                    best = v;
                    arg = idx as u32;
                }
            });
            if relu && best <= 0.0 {
                // relu(x) is 0 over the whole window: the gradient reaches no input.
                best = 0.0;
                arg = NONE;
            }
            yp[oy * ow + ox] = best;
            ap[oy * ow + ox] = arg;
        }
    }
}

/// One plane of a 2×2 stride-2 max pool (VGG's): the general loop's result — the window scanned row by
/// row, a value taken when greater than the best so far or NaN — without bounds checks or branches on the
/// data, which random-looking activations would mispredict.
fn max2x2(xp: &[f32], w: usize, oh: usize, ow: usize, relu: bool, yp: &mut [f32], ap: &mut [u32]) {
    #[inline(always)]
    fn take(best: &mut f32, arg: &mut u32, v: f32, i: usize) {
        let t = v > *best || v.is_nan();
        *best = if t { v } else { *best };
        *arg = if t { i as u32 } else { *arg };
    }
    for oy in 0..oh {
        let (i0, i1) = (2 * oy * w, (2 * oy + 1) * w);
        let (r0, r1) = (&xp[i0..i0 + 2 * ow], &xp[i1..i1 + 2 * ow]);
        let (yr, ar) = (
            &mut yp[oy * ow..(oy + 1) * ow],
            &mut ap[oy * ow..(oy + 1) * ow],
        );
        for (ox, ((y, a), (p0, p1))) in yr
            .iter_mut()
            .zip(ar.iter_mut())
            .zip(r0.chunks_exact(2).zip(r1.chunks_exact(2)))
            .enumerate()
        {
            let (mut best, mut arg) = (f32::NEG_INFINITY, NONE);
            take(&mut best, &mut arg, p0[0], i0 + 2 * ox);
            take(&mut best, &mut arg, p0[1], i0 + 2 * ox + 1);
            take(&mut best, &mut arg, p1[0], i1 + 2 * ox);
            take(&mut best, &mut arg, p1[1], i1 + 2 * ox + 1);
            if relu && best <= 0.0 {
                // relu(x) is 0 over the whole window: the gradient reaches no input.
                best = 0.0;
                arg = NONE;
            }
            *y = best;
            *a = arg;
        }
    }
}

/// MaxPool2d(k, stride, pad) with -∞ padding; with `relu` set, computes maxpool(relu(x)) in one pass
/// (ReLU+MaxPool fused). Keeps the argmax of every output for backward.
pub struct MaxPool2d {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub relu: bool,
    argmax: Vec<u32>,
    /// The fused BatchNorm→ReLU→MaxPool path's argmax: per output, the index within its window
    /// (row-major, `ki·k + kj`), [`WINDOW_NONE`] where no input gets the gradient (see `layers::fused`).
    pub(crate) window_arg: Vec<u8>,
}

/// `window_arg` of an output whose gradient reaches no input.
pub(crate) const WINDOW_NONE: u8 = u8::MAX;

const NONE: u32 = u32::MAX;

impl MaxPool2d {
    pub fn new(k: usize, stride: usize, pad: usize, relu: bool) -> Self {
        MaxPool2d {
            k,
            stride,
            pad,
            relu,
            argmax: Vec::new(),
            window_arg: Vec::new(),
        }
    }

    /// Output shape for an NCHW input shape.
    pub fn out_shape(&self, x: &Tensor) -> Result<[usize; 4]> {
        let (b, c, h, w) = nchw(x, "maxpool")?;
        let (oh, ow) = pooled(h, w, self.k, self.stride, self.pad, "maxpool")?;
        Ok([b, c, oh, ow])
    }

    /// x: [B, C, H, W] → y: [B, C, OH, OW]; y = max over each window (of relu(x) when fused).
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        let [b, c, oh, ow] = self.out_shape(x)?;
        let (h, w) = (x.shape[2], x.shape[3]);
        y.resize(&[b, c, oh, ow]);
        self.argmax.resize(b * c * oh * ow, NONE);
        let (k, s, p, relu) = (self.k, self.stride, self.pad as isize, self.relu);
        y.data
            .par_chunks_mut(oh * ow)
            .zip(self.argmax.par_chunks_mut(oh * ow))
            .zip(x.data.par_chunks(h * w))
            .for_each(|((yp, ap), xp)| {
                if (k, s, p) == (2, 2, 0) {
                    max2x2(xp, w, oh, ow, relu, yp, ap);
                } else {
                    max_general(xp, (h, w), (k, s, p), (oh, ow), relu, yp, ap);
                }
            });
        Ok(())
    }

    /// dy: [B, C, OH, OW] → dx: [B, C, H, W] with the shape of the forward input `x_shape`.
    pub fn backward(&mut self, x_shape: &[usize], dy: &Tensor, dx: &mut Tensor) {
        dx.resize(x_shape);
        let hw = x_shape[2] * x_shape[3];
        let ohw = dy.shape[2] * dy.shape[3];
        dx.data
            .par_chunks_mut(hw)
            .zip(dy.data.par_chunks(ohw).zip(self.argmax.par_chunks(ohw)))
            .for_each(|(dxp, (dyp, ap))| {
                dxp.iter_mut().for_each(|v| *v = 0.0);
                for (&g, &a) in dyp.iter().zip(ap) {
                    if a != NONE {
                        dxp[a as usize] += g;
                    }
                }
            });
    }
}

/// AvgPool2d(k, stride, pad) with zero padding counted in the divisor (PyTorch's count_include_pad=True).
pub struct AvgPool2d {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl AvgPool2d {
    /// x: [B, C, H, W] → y: [B, C, OH, OW].
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        let (b, c, h, w) = nchw(x, "avgpool")?;
        let (oh, ow) = pooled(h, w, self.k, self.stride, self.pad, "avgpool")?;
        y.resize(&[b, c, oh, ow]);
        let (k, s, p) = (self.k, self.stride, self.pad as isize);
        let inv = 1.0 / (k * k) as f32;
        y.data
            .par_chunks_mut(oh * ow)
            .zip(x.data.par_chunks(h * w))
            .for_each(|(yp, xp)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut sum = 0.0;
                        for_window((oy, ox), (k, s, p), (h, w), |idx| sum += xp[idx]);
                        yp[oy * ow + ox] = sum * inv;
                    }
                }
            });
        Ok(())
    }

    /// dy: [B, C, OH, OW] → dx: [B, C, H, W] (shape `x_shape`).
    pub fn backward(&mut self, x_shape: &[usize], dy: &Tensor, dx: &mut Tensor) {
        dx.resize(x_shape);
        let (h, w) = (x_shape[2], x_shape[3]);
        let (oh, ow) = (dy.shape[2], dy.shape[3]);
        let (k, s, p) = (self.k, self.stride, self.pad as isize);
        let inv = 1.0 / (k * k) as f32;
        dx.data
            .par_chunks_mut(h * w)
            .zip(dy.data.par_chunks(oh * ow))
            .for_each(|(dxp, dyp)| {
                dxp.iter_mut().for_each(|v| *v = 0.0);
                for oy in 0..oh {
                    for ox in 0..ow {
                        let g = dyp[oy * ow + ox] * inv;
                        for_window((oy, ox), (k, s, p), (h, w), |idx| dxp[idx] += g);
                    }
                }
            });
    }
}

/// Calls `f(index)` for each in-image input position of the window of output (oy, ox).
#[inline]
fn for_window(
    (oy, ox): (usize, usize),
    (k, s, p): (usize, usize, isize),
    (h, w): (usize, usize),
    mut f: impl FnMut(usize),
) {
    for ki in 0..k {
        let iy = (oy * s + ki) as isize - p;
        if iy < 0 || iy >= h as isize {
            continue;
        }
        for kj in 0..k {
            let ix = (ox * s + kj) as isize - p;
            if ix >= 0 && ix < w as isize {
                f(iy as usize * w + ix as usize);
            }
        }
    }
}

/// AdaptiveAvgPool2d to `out`×`out`, with PyTorch's bins: [⌊i·H/O⌋, ⌈(i+1)·H/O⌉).
pub struct AdaptiveAvgPool2d {
    pub out: usize,
}

fn bin(i: usize, n: usize, o: usize) -> (usize, usize) {
    (i * n / o, ((i + 1) * n).div_ceil(o))
}

impl AdaptiveAvgPool2d {
    /// x: [B, C, H, W] → y: [B, C, O, O].
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        let (b, c, h, w) = nchw(x, "adaptive avgpool")?;
        let o = self.out;
        if o == 0 || h == 0 || w == 0 {
            return Err(CoreError::Shape(
                "adaptive avgpool: empty input or output".into(),
            ));
        }
        y.resize(&[b, c, o, o]);
        y.data
            .par_chunks_mut(o * o)
            .zip(x.data.par_chunks(h * w))
            .for_each(|(yp, xp)| {
                for oy in 0..o {
                    let (y0, y1) = bin(oy, h, o);
                    for ox in 0..o {
                        let (x0, x1) = bin(ox, w, o);
                        let mut sum = 0.0;
                        for iy in y0..y1 {
                            sum += xp[iy * w + x0..iy * w + x1].iter().sum::<f32>();
                        }
                        yp[oy * o + ox] = sum / ((y1 - y0) * (x1 - x0)) as f32;
                    }
                }
            });
        Ok(())
    }

    /// dy: [B, C, O, O] → dx: [B, C, H, W] (shape `x_shape`).
    pub fn backward(&mut self, x_shape: &[usize], dy: &Tensor, dx: &mut Tensor) {
        dx.resize(x_shape);
        let (h, w, o) = (x_shape[2], x_shape[3], self.out);
        dx.data
            .par_chunks_mut(h * w)
            .zip(dy.data.par_chunks(o * o))
            .for_each(|(dxp, dyp)| {
                dxp.iter_mut().for_each(|v| *v = 0.0);
                for oy in 0..o {
                    let (y0, y1) = bin(oy, h, o);
                    for ox in 0..o {
                        let (x0, x1) = bin(ox, w, o);
                        let g = dyp[oy * o + ox] / ((y1 - y0) * (x1 - x0)) as f32;
                        for iy in y0..y1 {
                            dxp[iy * w + x0..iy * w + x1]
                                .iter_mut()
                                .for_each(|v| *v += g);
                        }
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max2x2_matches_the_general_loop() {
        let mut rng = crate::rng::Rng::new(5);
        for (h, w) in [(2, 2), (6, 7), (7, 6), (9, 11), (32, 32)] {
            let mut x: Vec<f32> = (0..h * w).map(|_| rng.normal()).collect();
            // Ties, NaN, ±∞ and all-negative windows.
            x[0] = f32::NAN;
            x[w - 1] = f32::NEG_INFINITY;
            x[w - 2] = f32::NEG_INFINITY;
            x[2 * w - 1] = f32::NEG_INFINITY;
            x[2 * w - 2] = f32::NEG_INFINITY;
            if h * w > 20 {
                x[3] = x[2];
                x[w + 2] = f32::INFINITY;
                x[w + 5] = f32::NAN;
                x[w + 4] = f32::NAN;
            }
            let (oh, ow) = (h / 2, w / 2);
            for relu in [false, true] {
                let (mut y1, mut a1) = (vec![0.0; oh * ow], vec![0; oh * ow]);
                let (mut y2, mut a2) = (vec![0.0; oh * ow], vec![0; oh * ow]);
                max2x2(&x, w, oh, ow, relu, &mut y1, &mut a1);
                max_general(&x, (h, w), (2, 2, 0), (oh, ow), relu, &mut y2, &mut a2);
                assert_eq!(a1, a2, "{h}×{w} relu {relu}");
                for (p, q) in y1.iter().zip(&y2) {
                    assert!(p == q || (p.is_nan() && q.is_nan()), "{h}×{w}: {p} vs {q}");
                }
            }
        }
    }
}
