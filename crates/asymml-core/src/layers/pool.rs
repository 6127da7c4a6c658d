//! Pooling: max (optionally fused with a preceding ReLU), average, and adaptive average.

use super::out_size;
use crate::error::{CoreError, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;

fn nchw(x: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    x.nchw(what)
}

fn pooled(h: usize, w: usize, k: usize, s: usize, p: usize, what: &str) -> Result<(usize, usize)> {
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

/// MaxPool2d(k, stride, pad) with -∞ padding; with `relu` set, computes maxpool(relu(x)) in one pass
/// (ReLU+MaxPool fused). Keeps the argmax of every output for backward.
pub struct MaxPool2d {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub relu: bool,
    argmax: Vec<u32>,
}

const NONE: u32 = u32::MAX;

impl MaxPool2d {
    pub fn new(k: usize, stride: usize, pad: usize, relu: bool) -> Self {
        MaxPool2d {
            k,
            stride,
            pad,
            relu,
            argmax: Vec::new(),
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
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut best = f32::NEG_INFINITY;
                        let mut arg = NONE;
                        for ki in 0..k {
                            let iy = (oy * s + ki) as isize - p;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kj in 0..k {
                                let ix = (ox * s + kj) as isize - p;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let idx = iy as usize * w + ix as usize;
                                let v = xp[idx];
                                if v > best || v.is_nan() {
                                    best = v;
                                    arg = idx as u32;
                                }
                            }
                        }
                        if relu && best <= 0.0 {
                            // relu(x) is 0 over the whole window: the gradient reaches no input.
                            best = 0.0;
                            arg = NONE;
                        }
                        yp[oy * ow + ox] = best;
                        ap[oy * ow + ox] = arg;
                    }
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
                        for_window(oy, ox, k, s, p, h, w, |idx| sum += xp[idx]);
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
                        for_window(oy, ox, k, s, p, h, w, |idx| dxp[idx] += g);
                    }
                }
            });
    }
}

/// Calls `f(index)` for each in-image input position of the window of output (oy, ox).
#[allow(clippy::too_many_arguments)]
#[inline]
fn for_window(
    oy: usize,
    ox: usize,
    k: usize,
    s: usize,
    p: isize,
    h: usize,
    w: usize,
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
