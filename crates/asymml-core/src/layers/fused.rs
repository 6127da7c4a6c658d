//! BatchNorm2d → ReLU → MaxPool2d in one pass (VGG's conv → BN → ReLU → pool, ResNet's ImageNet stem).
//!
//! Forward reads the BN input once and writes only the pooled output (and, when recording for backward, one
//! byte per output: the argmax's index within its window); the BN output before pooling is never stored.
//! Backward takes the pooled gradient straight to ∇x: per plane the pool's scatter goes to a plane-sized
//! scratch buffer (cache resident) instead of a full tensor, then BN's two reductions and its final pass.
//!
//! The arithmetic is the unfused layers' own (BN's `x·scale + shift`, the pool's scan order, ties and NaN
//! rule, BN backward's per-plane sums and final formula), so results equal the unfused path bit for bit.

use super::batchnorm::{merge_planes, plane_dx, plane_grad_sums};
use super::pool::{pooled, WINDOW_NONE};
use super::{BatchNorm2d, MaxPool2d};
use crate::error::{CoreError, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Window geometry of a max pool over one plane.
#[derive(Clone, Copy)]
struct Geom {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl Geom {
    fn is_2x2(&self) -> bool {
        (self.k, self.s, self.p) == (2, 2, 0)
    }

    /// Calls `f(slot, input index)` for the window slots of output (oy, ox) inside the image, row-major.
    #[inline(always)]
    fn window(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
        for ki in 0..self.k {
            let Some(iy) = (oy * self.s + ki).checked_sub(self.p) else {
                continue;
            };
            if iy >= self.h {
                break;
            }
            for kj in 0..self.k {
                let Some(ix) = (ox * self.s + kj).checked_sub(self.p) else {
                    continue;
                };
                if ix >= self.w {
                    break;
                }
                f(ki * self.k + kj, iy * self.w + ix);
            }
        }
    }

    /// Input index of window slot `j` (= ki·k + kj) of output (oy, ox), if inside the image.
    #[inline(always)]
    fn input(&self, oy: usize, ox: usize, j: usize) -> Option<usize> {
        let iy = (oy * self.s + j / self.k).checked_sub(self.p)?;
        let ix = (ox * self.s + j % self.k).checked_sub(self.p)?;
        (iy < self.h && ix < self.w).then_some(iy * self.w + ix)
    }
}

/// True when `bn` followed by `pool` can run fused: a BN without its own ReLU followed by a max pool with
/// the ReLU fused in (the pattern the model builders make), with a window of fewer than 255 slots.
pub fn can_fuse(bn: &BatchNorm2d, pool: &MaxPool2d) -> bool {
    !bn.relu
        && pool.relu
        && pool.k >= 1
        && pool.k * pool.k < WINDOW_NONE as usize
        && pool.stride > 0
}

/// The pool's `take` rule: v replaces the best so far when greater or NaN (the scan is row-major).
#[inline(always)]
fn take(best: &mut f32, arg: &mut u8, v: f32, j: u8) {
    let t = v > *best || v.is_nan();
    *best = if t { v } else { *best };
    *arg = if t { j } else { *arg };
}

/// One plane, any window, recording the argmax slot of each output.
fn plane_general(xp: &[f32], g: Geom, a: f32, b: f32, yp: &mut [f32], ap: &mut [u8]) {
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let (mut best, mut arg) = (f32::NEG_INFINITY, WINDOW_NONE);
            g.window(oy, ox, |j, idx| {
                take(&mut best, &mut arg, xp[idx] * a + b, j as u8)
            });
            if best <= 0.0 {
                // relu is 0 over the whole window: the gradient reaches no input.
                best = 0.0;
                arg = WINDOW_NONE;
            }
            yp[oy * g.ow + ox] = best;
            ap[oy * g.ow + ox] = arg;
        }
    }
}

/// One plane of a 2×2 stride-2 pool, recording the argmax slot of each output (branch-free selects).
fn plane_2x2(xp: &[f32], g: Geom, a: f32, b: f32, yp: &mut [f32], ap: &mut [u8]) {
    let (w, ow) = (g.w, g.ow);
    for oy in 0..g.oh {
        let i0 = 2 * oy * w;
        let (r0, r1) = (&xp[i0..i0 + 2 * ow], &xp[i0 + w..i0 + w + 2 * ow]);
        let yr = &mut yp[oy * ow..(oy + 1) * ow];
        let ar = &mut ap[oy * ow..(oy + 1) * ow];
        for ((y, arg_out), (p0, p1)) in yr
            .iter_mut()
            .zip(ar.iter_mut())
            .zip(r0.chunks_exact(2).zip(r1.chunks_exact(2)))
        {
            let (mut best, mut arg) = (f32::NEG_INFINITY, WINDOW_NONE);
            take(&mut best, &mut arg, p0[0] * a + b, 0);
            take(&mut best, &mut arg, p0[1] * a + b, 1);
            take(&mut best, &mut arg, p1[0] * a + b, 2);
            take(&mut best, &mut arg, p1[1] * a + b, 3);
            if best <= 0.0 {
                best = 0.0;
                arg = WINDOW_NONE;
            }
            *y = best;
            *arg_out = arg;
        }
    }
}

/// The pool's rule on two values in scan order: q when greater than p or NaN, else p.
#[inline(always)]
fn sel(p: f32, q: f32) -> f32 {
    if q > p || q.is_nan() {
        q
    } else {
        p
    }
}

simd_fn! {
/// One plane of a 2×2 stride-2 pool without the argmax (evaluation): per row pair, the affine map and the
/// vertical maximum in one vectorised loop over a block of columns, then the horizontal pairs and the ReLU.
/// The maximum over a window is the same value in any order (NaN wins; a ±0 tie becomes +0 at the ReLU).
fn plane_2x2_eval(xp: &[f32], w: usize, oh: usize, ow: usize, a: f32, b: f32, yp: &mut [f32]) {
    const BLK: usize = 128;
    let mut m = [0f32; 2 * BLK];
    for oy in 0..oh {
        let i0 = 2 * oy * w;
        let (r0, r1) = (&xp[i0..i0 + 2 * ow], &xp[i0 + w..i0 + w + 2 * ow]);
        let yr = &mut yp[oy * ow..(oy + 1) * ow];
        for ((yb, c0), c1) in yr
            .chunks_mut(BLK)
            .zip(r0.chunks(2 * BLK))
            .zip(r1.chunks(2 * BLK))
        {
            let mb = &mut m[..c0.len()];
            for ((o, &u), &v) in mb.iter_mut().zip(c0).zip(c1) {
                *o = sel(u * a + b, v * a + b);
            }
            for (y, pair) in yb.iter_mut().zip(mb.chunks_exact(2)) {
                let best = sel(pair[0], pair[1]);
                *y = if best <= 0.0 { 0.0 } else { best };
            }
        }
    }
}
}

/// One plane, any window, without the argmax (evaluation).
fn plane_general_eval(xp: &[f32], g: Geom, a: f32, b: f32, yp: &mut [f32]) {
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let mut best = f32::NEG_INFINITY;
            g.window(oy, ox, |_, idx| best = sel(best, xp[idx] * a + b));
            yp[oy * g.ow + ox] = if best <= 0.0 { 0.0 } else { best };
        }
    }
}

fn geometry(pool: &MaxPool2d, x: &Tensor) -> Result<(usize, usize, Geom)> {
    let (b, c, h, w) = x.nchw("batchnorm+maxpool")?;
    let (oh, ow) = pooled(h, w, pool.k, pool.stride, pool.pad, "maxpool")?;
    let g = Geom {
        h,
        w,
        oh,
        ow,
        k: pool.k,
        s: pool.stride,
        p: pool.pad,
    };
    Ok((b, c, g))
}

/// x: [B, C, H, W] → y = maxpool(relu(bn(x))): [B, C, OH, OW], in one pass over x. `train` selects batch
/// statistics (and updates the running averages) as [`BatchNorm2d::forward`]; `record` keeps the argmax of
/// each output for [`bn_relu_maxpool_backward`] (needed in training; evaluation can skip it).
/// Requires [`can_fuse`].
pub fn bn_relu_maxpool_forward(
    bn: &mut BatchNorm2d,
    pool: &mut MaxPool2d,
    x: &Tensor,
    y: &mut Tensor,
    train: bool,
    record: bool,
) -> Result<()> {
    if !can_fuse(bn, pool) {
        return Err(CoreError::Invalid(
            "batchnorm+maxpool: these layers cannot run fused".into(),
        ));
    }
    let (b, c, g) = geometry(pool, x)?;
    let (cn, hw) = bn.prepare(x, train)?;
    let ohw = g.oh * g.ow;
    y.resize(&[b, c, g.oh, g.ow]);
    let (scale, shift) = bn.affine_map();
    if record {
        pool.window_arg.resize(b * c * ohw, WINDOW_NONE);
        y.data
            .par_chunks_mut(ohw)
            .zip(pool.window_arg.par_chunks_mut(ohw))
            .zip(x.data.par_chunks(hw))
            .enumerate()
            .for_each(|(i, ((yp, ap), xp))| {
                let (a, sh) = (scale[i % cn], shift[i % cn]);
                if g.is_2x2() {
                    plane_2x2(xp, g, a, sh, yp, ap);
                } else {
                    plane_general(xp, g, a, sh, yp, ap);
                }
            });
    } else {
        // No argmax: a later backward recomputes it from x.
        pool.window_arg.clear();
        y.data
            .par_chunks_mut(ohw)
            .zip(x.data.par_chunks(hw))
            .enumerate()
            .for_each(|(i, (yp, xp))| {
                let (a, sh) = (scale[i % cn], shift[i % cn]);
                if g.is_2x2() {
                    plane_2x2_eval(xp, g.w, g.oh, g.ow, a, sh, yp);
                } else {
                    plane_general_eval(xp, g, a, sh, yp);
                }
            });
    }
    Ok(())
}

/// Scatters one plane's pooled gradient to the window inputs its outputs took: g = 0, then g[arg] += dy.
fn scatter(gp: &mut [f32], dyp: &[f32], ap: &[u8], g: Geom) {
    if g.is_2x2() {
        // Disjoint windows: every window is written whole (dy at its argmax, 0 elsewhere), without branches
        // on the data; only the row and column a floor-mode pool leaves out are zeroed apart.
        let (w, ow) = (g.w, g.ow);
        for oy in 0..g.oh {
            let (r0, r1) = gp[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
            let (dr, ar) = (&dyp[oy * ow..(oy + 1) * ow], &ap[oy * ow..(oy + 1) * ow]);
            for (((p0, p1), &d), &a) in r0
                .chunks_exact_mut(2)
                .zip(r1.chunks_exact_mut(2))
                .zip(dr)
                .zip(ar)
            {
                p0[0] = if a == 0 { d } else { 0.0 };
                p0[1] = if a == 1 { d } else { 0.0 };
                p1[0] = if a == 2 { d } else { 0.0 };
                p1[1] = if a == 3 { d } else { 0.0 };
            }
            if w % 2 == 1 {
                r0[w - 1] = 0.0;
                r1[w - 1] = 0.0;
            }
        }
        gp[2 * g.oh * w..].iter_mut().for_each(|v| *v = 0.0);
    } else {
        gp.iter_mut().for_each(|v| *v = 0.0);
        for (o, (&d, &a)) in dyp.iter().zip(ap).enumerate() {
            if a != WINDOW_NONE {
                if let Some(idx) = g.input(o / g.ow, o % g.ow, a as usize) {
                    gp[idx] += d;
                }
            }
        }
    }
}

/// x: [B, C, H, W] (the forward input), dy: [B, C, OH, OW] (∇ of the pooled output) → dx: [B, C, H, W];
/// accumulates BN's ∇γ, ∇β. After a forward that did not record the argmax, it is first recomputed from x
/// with the statistics of that forward.
pub fn bn_relu_maxpool_backward(
    bn: &mut BatchNorm2d,
    pool: &mut MaxPool2d,
    x: &Tensor,
    dy: &Tensor,
    dx: &mut Tensor,
) -> Result<()> {
    let (b, c, g) = geometry(pool, x)?;
    let ohw = g.oh * g.ow;
    let (mean_len, _) = bn.stats();
    if dy.shape != [b, c, g.oh, g.ow] || mean_len.len() != c || c != bn.channels {
        return Err(CoreError::Shape(
            "batchnorm+maxpool backward: shapes differ from forward".into(),
        ));
    }
    let hw = g.h * g.w;
    if pool.window_arg.len() != b * c * ohw {
        // The forward ran without recording: recompute the argmax with the same affine map.
        let (scale, shift) = bn.affine_map();
        pool.window_arg.resize(b * c * ohw, WINDOW_NONE);
        pool.window_arg
            .par_chunks_mut(ohw)
            .zip(x.data.par_chunks(hw))
            .enumerate()
            .for_each_init(
                || vec![0f32; ohw],
                |yp, (i, (ap, xp))| {
                    let (a, sh) = (scale[i % c], shift[i % c]);
                    if g.is_2x2() {
                        plane_2x2(xp, g, a, sh, yp, ap);
                    } else {
                        plane_general(xp, g, a, sh, yp, ap);
                    }
                },
            );
    }
    let (mean, invstd) = bn.stats();
    let args = &pool.window_arg;
    // Pass 1: BN's per-plane sums over the scattered gradient.
    let planes: Vec<(f64, f64)> = x
        .data
        .par_chunks(hw)
        .zip(dy.data.par_chunks(ohw).zip(args.par_chunks(ohw)))
        .enumerate()
        .map_init(
            || vec![0f32; hw],
            |gp, (i, (xp, (dyp, ap)))| {
                let ch = i % c;
                scatter(gp, dyp, ap, g);
                let mut out = [0f32; 2];
                plane_grad_sums(xp, gp, mean[ch], 1.0, 0.0, false, &mut out);
                (out[0] as f64, out[1] as f64 * invstd[ch] as f64)
            },
        )
        .collect();
    let sums = merge_planes(&planes, c);
    let coefs = bn.grad_coefs(&sums, (b * hw) as f64);
    // Pass 2: ∇x = c1·g + c3·x + c2 with g scattered again.
    dx.resize(&x.shape);
    let args = &pool.window_arg;
    dx.data
        .par_chunks_mut(hw)
        .zip(x.data.par_chunks(hw))
        .zip(dy.data.par_chunks(ohw).zip(args.par_chunks(ohw)))
        .enumerate()
        .for_each_init(
            || vec![0f32; hw],
            |gp, (i, ((dxp, xp), (dyp, ap)))| {
                scatter(gp, dyp, ap, g);
                plane_dx(dxp, xp, gp, 1.0, 0.0, false, coefs[i % c]);
            },
        );
    Ok(())
}
