//! The trusted convolution at cost ∝ r: conv(U_b V_b, W) = conv(V_b as an r × H × W image, W'_b) with
//! W'_b[m, j'] = Σ_j U_b[j, j'] · W[m, j], and its weight gradient mapped back through U_b.
//!
//! Per sample that route costs M·k²·r·(N + P) multiply-adds (P = OH·OW): the conv of V_b, plus building W'_b.
//! On small maps with a large r (r > N·P / (N + P), e.g. a 4 × 4 map at r ≥ 16 with 512 channels) building
//! W'_b costs more than the conv itself; there X_T,b = U_b V_b (N·r·H·W) is rebuilt and convolved with W
//! directly (M·k²·N·P), so Conv_T never costs much more than the full conv. Both routes give the same result.

use super::BatchLowRank;
use crate::error::{CoreError, Result};
use crate::gemm::{sgemm, sgemm_ld, Mat};
use crate::layers::{out_size, winograd, Conv2d};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Per-worker scratch: im2col of V_b (or X_T,b), W'_b in two layouts, and the partial ∇W.
#[derive(Default)]
struct Scratch {
    col: Vec<f32>,
    /// [N, H·W]: X_T,b = U_b V_b (direct route).
    xt: Vec<f32>,
    /// [r, M·kk]: Uᵀ·W in the layout the GEMM writes.
    z: Vec<f32>,
    /// [M, r·kk]: W'_b (forward) or ∇W'_b (backward).
    wp: Vec<f32>,
    /// This worker's part of ∇W_T: [N, M·kk] (Σ_b U_b · ∇W'_b) or, on the direct route, [M, N·kk].
    dwt: Vec<f32>,
    /// Backward through W': z_b [r × M·kk] of the chunk's samples stacked, and their U_b side by side
    /// [N × nb·r].
    zall: Vec<f32>,
    ucat: Vec<f32>,
    /// W'_b transformed for Winograd [M, 16, r], and the transforms' buffers (the conv of V_b by Winograd).
    wino_u: Vec<f32>,
    /// Backward: V_b [r × H·W] of the sample at hand, made again from the input.
    vb: Vec<f32>,
    wino: winograd::Work,
}

impl Scratch {
    /// wp [M × r·kk] (+)= ∇W'_b = ∇Y_b · col(V_b)ᵀ (`accumulate`: add to wp), v: V_b [r, H·W].
    fn add_wp_grad(&mut self, g: &Geo, dyb: &[f32], v: &[f32], accumulate: bool, gt: usize) {
        // By bands: the im2col of V_b is r·kk × 2048 values, not r·kk × P (20 MB at VGG16-224's second conv,
        // r = 11).
        g.corr_bands(dyb, v, g.r, &mut self.wp, &mut self.col, accumulate, gt);
    }

    /// dwt [N × M·kk] (+)= U · z with z [r × M·kk] = wp [M, r, kk] permuted: ∇W'_b mapped back through U.
    fn map_back(&mut self, g: &Geo, u: &[f32], accumulate: bool, gt: usize) {
        let (n, m, r, kk) = (g.n, g.m, g.r, g.k * g.k);
        self.z.resize(r * m * kk, 0.0);
        permute(&self.wp, &mut self.z, m, r, kk);
        sgemm(
            n,
            m * kk,
            r,
            Mat::rm(u, r),
            Mat::rm(&self.z, m * kk),
            &mut self.dwt,
            accumulate,
            gt,
        );
    }
}

/// Conv_T of the split: keeps its scratch (per worker, and W permuted) across calls.
#[derive(Default)]
pub struct TrustedConv {
    scratch: Vec<Scratch>,
    /// W as [M·kk, N] (forward): W'_b in the layout [M, kk, r] is then one GEMM with U_b.
    wk: Vec<f32>,
    /// With a shared basis: wk·U [M·kk × r] and W' [M × r·kk], once per batch.
    shared_z: Vec<f32>,
    shared_wp: Vec<f32>,
    /// With a shared basis and the conv of V by Winograd: W' transformed, once per batch.
    shared_wino_u: Vec<f32>,
    /// The direct route by Winograd: X_T of the whole batch, W transformed, the transforms' buffers.
    xt_all: Tensor,
    wino_u: Vec<f32>,
    wino: winograd::Work,
    /// The batched direct route on small maps: im2col of X_T for the batch [N·kk × B·P], the product
    /// [M × B·P], and ∇Y gathered the same way.
    col_all: Vec<f32>,
    out_all: Vec<f32>,
}

/// How [`TrustedConv::forward`] computes conv(U_b V_b, W) (see [`Geo::forward_route`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fwd {
    /// X_T of the batch rebuilt, then the full conv by Winograd.
    DirectWinograd,
    /// X_T rebuilt, the full conv by im2col, one GEMM over the batch's columns (small maps).
    DirectBatched,
    /// X_T rebuilt per sample, the full conv by im2col.
    Direct,
    /// W'_b = W ×_channels U_b, then the conv of V_b by W'_b (by Winograd or im2col).
    ThroughV { winograd: bool },
}

/// Geometry of one application: V_b is an r × H × W image, the kernel k × k.
#[derive(Clone, Copy)]
struct Geo {
    b: usize,
    m: usize,
    n: usize,
    r: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    /// One U for every sample: W' (and ∇W' → ∇W) mapped once per batch.
    shared: bool,
}

impl Geo {
    /// The geometry of `conv` (weight shape, stride, padding) over the decomposed input `lr`.
    fn of(conv: &Conv2d, lr: &BatchLowRank) -> Result<Geo> {
        Geo::check(&conv.weight.value.shape, conv.stride, conv.pad, lr)
    }

    fn check(w_shape: &[usize], stride: usize, pad: usize, lr: &BatchLowRank) -> Result<Geo> {
        let &[m, n, k, k2] = w_shape else {
            return Err(CoreError::Shape(format!(
                "trusted conv: weight must be [M, N, k, k], got {w_shape:?}"
            )));
        };
        if k != k2 || n != lr.n {
            return Err(CoreError::Shape(format!(
                "trusted conv: weight {w_shape:?} does not fit a square kernel over {} channels",
                lr.n
            )));
        }
        let (h, w, r) = (lr.h, lr.w, lr.r);
        // (V let go by `drop_v` is empty until it is made again.)
        let v_len = if lr.has_v() { r * h * w } else { 0 };
        for (i, s) in lr.samples.iter().enumerate() {
            if s.n != n || s.hw != h * w || s.r != r || s.u.len() != n * r || s.v.len() != v_len {
                return Err(CoreError::Shape(format!(
                    "trusted conv: sample {i} is not a rank-{r} factorisation of {n}×{h}×{w} \
                     (n {}, hw {}, r {}, |u| {}, |v| {})",
                    s.n,
                    s.hw,
                    s.r,
                    s.u.len(),
                    s.v.len()
                )));
            }
        }
        match (out_size(h, k, stride, pad), out_size(w, k, stride, pad)) {
            (Some(oh), Some(ow)) => Ok(Geo {
                b: lr.samples.len(),
                m,
                n,
                r,
                h,
                w,
                k,
                s: stride,
                pad,
                oh,
                ow,
                shared: lr.shared,
            }),
            _ => Err(CoreError::Shape(format!(
                "trusted conv: input {h}×{w} does not fit a {k}×{k} kernel with stride {stride}, padding {pad}"
            ))),
        }
    }

    /// Multiply-adds ×2 of Conv_T's forward pass for the batch, on the route it takes (the direct route by
    /// Winograd counted as direct-convolution FLOPs, as the trusted-only convs are).
    fn forward_flops(&self) -> f64 {
        self.flops_on(!matches!(self.forward_route(), Fwd::ThroughV { .. }))
    }

    /// Multiply-adds ×2 of Conv_T for the batch (forward; the weight gradient costs the same).
    fn flops(&self) -> f64 {
        self.flops_on(self.direct())
    }

    /// Multiply-adds ×2 of Conv_T for the batch on the direct route (`direct`) or through W'.
    fn flops_on(&self, direct: bool) -> f64 {
        let (kk, p) = ((self.k * self.k) as f64, (self.oh * self.ow) as f64);
        let (m, n, r, hw) = (
            self.m as f64,
            self.n as f64,
            self.r as f64,
            (self.h * self.w) as f64,
        );
        let b = self.b as f64;
        2.0 * if direct {
            b * (m * kk * n * p + n * r * hw)
        } else if self.shared {
            b * m * kk * r * p + m * kk * r * n
        } else {
            b * m * kk * r * (n + p)
        }
    }

    fn pointwise(&self) -> bool {
        self.k == 1 && self.s == 1 && self.pad == 0
    }

    /// True when the conv of V_b (r channels) by W'_b goes by Winograd F(2×2, 3×3): where it suits, from
    /// [`V_WINOGRAD_MIN_R`] channels.
    fn v_winograd(&self) -> bool {
        self.r >= V_WINOGRAD_MIN_R
            && winograd::suits(self.k, self.s, self.pad, self.r, self.h, self.w)
    }

    /// The forward pass's route. Costs are weighed as multiply-adds at the speeds measured here: GEMMs over
    /// im2col columns count 3 per multiply-add, Winograd's transform-domain GEMMs (1.5× faster in effect:
    /// trusted-only convs ~150 against ~100 GFLOP/s) 2. Through W': building W'_b (M·k²·r·N per sample, once
    /// per batch with a shared basis) and the conv of V_b (M·k²·r·P, by Winograd where it suits); directly:
    /// rebuilding X_T (N·r·H·W) and the full conv (M·k²·N·P, by Winograd where it suits). Deep layers of
    /// small maps (VGG16 at 224 px, 7×7 and 14×14) go direct: there W'_b costs more than the conv itself.
    fn forward_route(&self) -> Fwd {
        let (kk, p) = (self.k * self.k, self.oh * self.ow);
        let n_per = if self.shared {
            self.n.div_ceil(self.b.max(1))
        } else {
            self.n
        };
        let v_wino = self.v_winograd();
        let through_v = 3 * self.m * kk * self.r * n_per
            + if v_wino { 2 } else { 3 } * self.m * kk * self.r * p;
        let rebuild = 3 * self.n * self.r * self.h * self.w;
        if !self.shared && winograd::suits(self.k, self.s, self.pad, self.n, self.h, self.w) {
            if 2 * self.m * kk * self.n * p + rebuild < through_v {
                return Fwd::DirectWinograd;
            }
        } else if 3 * self.m * kk * self.n * p + rebuild < through_v {
            return if p < BATCHED_P {
                Fwd::DirectBatched
            } else {
                Fwd::Direct
            };
        }
        Fwd::ThroughV { winograd: v_wino }
    }

    /// True when rebuilding X_T and convolving it with W costs fewer multiply-adds than going through W'.
    fn direct(&self) -> bool {
        let (kk, p) = (self.k * self.k, self.oh * self.ow);
        // With a shared basis, W' costs M·kk·r·N once per batch instead of per sample.
        let n_per = if self.shared {
            self.n.div_ceil(self.b.max(1))
        } else {
            self.n
        };
        let through_v = self.m * kk * self.r * (n_per + p);
        let direct = self.m * kk * self.n * p + self.n * self.r * self.h * self.w;
        direct < through_v
    }

    /// Bands of output rows [oy0, oy1) of about [`COL_BLOCK`] output pixels each (at least one row), in order.
    fn bands(&self) -> impl Iterator<Item = (usize, usize)> {
        let (oh, rows) = (self.oh, (COL_BLOCK / self.ow.max(1)).max(1));
        (0..oh)
            .step_by(rows)
            .map(move |oy0| (oy0, (oy0 + rows).min(oh)))
    }

    /// The im2col of output rows oy0..oy1 of the c-channel image `x` ([c, H, W]): [c·k·k × (oy1 − oy0)·OW],
    /// in `col`; the image's own pixels (columns of [c × P]) when the conv is pointwise.
    fn col_band<'a>(
        &self,
        x: &'a [f32],
        c: usize,
        oy0: usize,
        oy1: usize,
        col: &'a mut Vec<f32>,
    ) -> Mat<'a> {
        let nb = (oy1 - oy0) * self.ow;
        if self.pointwise() {
            return Mat::rm_from(x, self.oh * self.ow, oy0 * self.ow);
        }
        col.resize(c * self.k * self.k * nb, 0.0);
        im2col_rows(x, c, self, oy0, oy1, col);
        Mat::rm(col, nb)
    }

    /// y [M × P] = a [M × c·k·k] · col(x), x a c-channel image [c, H, W]: a band of output rows at a time
    /// ([`Geo::bands`]), only the band's im2col made (in `col`).
    fn conv_bands(
        &self,
        a: &[f32],
        x: &[f32],
        c: usize,
        y: &mut [f32],
        col: &mut Vec<f32>,
        gt: usize,
    ) {
        let (ck, p) = (c * self.k * self.k, self.oh * self.ow);
        for (oy0, oy1) in self.bands() {
            let (j0, nb) = (oy0 * self.ow, (oy1 - oy0) * self.ow);
            let band = self.col_band(x, c, oy0, oy1, col);
            sgemm_ld(
                self.m,
                nb,
                ck,
                Mat::rm(a, ck),
                band,
                &mut y[j0..],
                p,
                false,
                gt,
            );
        }
    }

    /// out [M × c·k·k] (+)= dy [M × P] · col(x)ᵀ, x a c-channel image [c, H, W] (`accumulate`: add to out):
    /// the weight gradient of `conv_bands`, summed over the bands of output rows, only a band's im2col made.
    #[allow(clippy::too_many_arguments)]
    fn corr_bands(
        &self,
        dy: &[f32],
        x: &[f32],
        c: usize,
        out: &mut [f32],
        col: &mut Vec<f32>,
        accumulate: bool,
        gt: usize,
    ) {
        let (ck, p) = (c * self.k * self.k, self.oh * self.ow);
        for (i, (oy0, oy1)) in self.bands().enumerate() {
            let (j0, nb) = (oy0 * self.ow, (oy1 - oy0) * self.ow);
            let band = self.col_band(x, c, oy0, oy1, col);
            sgemm(
                self.m,
                ck,
                nb,
                Mat::rm_from(dy, p, j0),
                band.t(),
                out,
                accumulate || i > 0,
                gt,
            );
        }
    }

    /// col [c·k·k × P] of the c-channel image `x` ([c, H, W]); the image itself when the conv is pointwise.
    fn col<'a>(&self, x: &'a [f32], c: usize, col: &'a mut Vec<f32>) -> &'a [f32] {
        if self.pointwise() {
            return x;
        }
        col.resize(c * self.k * self.k * self.oh * self.ow, 0.0);
        im2col(x, c, self, col);
        col
    }
}

/// An error unless `grad` has the shape of `conv`'s weight [M, N, k, k] (a ∇W to add into).
fn check_grad(conv: &Conv2d, grad: &Tensor) -> Result<()> {
    let w_shape = &conv.weight.value.shape[..];
    if grad.shape != w_shape || grad.len() != w_shape.iter().product::<usize>() {
        return Err(CoreError::Shape(format!(
            "trusted conv backward: ∇W has shape {:?}, expected {w_shape:?}",
            grad.shape
        )));
    }
    Ok(())
}

/// An error when `lr` has let V go ([`BatchLowRank::drop_v`]) and `what` needs it.
fn no_v_refused(lr: &BatchLowRank, what: &str) -> Result<()> {
    if lr.has_v() {
        return Ok(());
    }
    Err(CoreError::Invalid(format!(
        "trusted conv {what}: the factorisations have let V go (make it again with restore_v)"
    )))
}

/// xt: [N, H·W] ← U_b V_b.
fn rebuild(s: &super::LowRank, xt: &mut Vec<f32>) {
    xt.resize(s.n * s.hw, 0.0);
    s.reconstruct(xt);
}

/// Work split of a batch: `per` samples per worker chunk, `chunks` chunks, each GEMM's thread count.
fn plan(scratch: &mut Vec<Scratch>, b: usize) -> (usize, usize, usize) {
    let t = rayon::current_num_threads().max(1);
    let chunks = t.min(b).max(1);
    let per = b.div_ceil(chunks).max(1);
    let chunks = b.div_ceil(per).max(1);
    if scratch.len() < chunks {
        scratch.resize_with(chunks, Scratch::default);
    }
    (per, chunks, (t / chunks).max(1))
}

impl TrustedConv {
    /// A trusted conv with empty scratch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Floating-point operations of [`TrustedConv::forward`] (and of [`TrustedConv::weight_grad`], the same)
    /// for these shapes, on the route it takes.
    pub fn flops(conv: &Conv2d, lr: &BatchLowRank) -> Result<f64> {
        Ok(Geo::of(conv, lr)?.flops())
    }

    /// Floating-point operations of [`TrustedConv::forward`] on the route it takes (see `flops`; the same
    /// except where the forward pass convolves X_T by Winograd).
    pub fn forward_flops(conv: &Conv2d, lr: &BatchLowRank) -> Result<f64> {
        Ok(Geo::of(conv, lr)?.forward_flops())
    }

    /// Whether [`TrustedConv::forward`] would rebuild X_T and convolve all N of its channels (rank r too high
    /// for these shapes to go through V): the split's trusted side then costs a whole conv plus the
    /// decomposition, more than the conv run wholly in the trusted runtime.
    pub fn convolves_every_channel(conv: &Conv2d, lr: &BatchLowRank) -> Result<bool> {
        Ok(!matches!(
            Geo::of(conv, lr)?.forward_route(),
            Fwd::ThroughV { .. }
        ))
    }

    /// conv's W: [M, N, k, k], lr: B × (U_b [N × r], V_b [r × H·W]) → y_t: [B, M, OH, OW] = conv(U_b V_b, W)
    /// per sample (cross-correlation with the conv's stride and zero padding), without bias: the caller adds
    /// it once to Y_T + Y_U. Cost per sample: M·k²·min(r·(N + P), N·P) (+ N·r·H·W on the direct route),
    /// P = OH·OW.
    pub fn forward(&mut self, conv: &Conv2d, lr: &BatchLowRank, y_t: &mut Tensor) -> Result<()> {
        no_v_refused(lr, "forward")?;
        self.forward_to(conv, lr, None, y_t)
    }

    /// [`TrustedConv::forward`] for factorisations that may have let V go ([`BatchLowRank::drop_v`],
    /// [`crate::decomp::decompose_factors_lean_with`]), x being the very input [B, N, H, W] that was
    /// decomposed. Through W', each worker makes its samples' V_b from x one at a time (r × H·W, not the batch's
    /// r × B·H·W at once); the direct routes, which rebuild X_T from every V_b, make V again for the batch
    /// first and let it go after.
    pub fn forward_from(
        &mut self,
        conv: &Conv2d,
        lr: &mut BatchLowRank,
        x: &Tensor,
        y_t: &mut Tensor,
    ) -> Result<()> {
        if lr.has_v() {
            return self.forward(conv, lr, y_t);
        }
        let g = Geo::of(conv, lr)?;
        if !matches!(g.forward_route(), Fwd::ThroughV { .. }) {
            lr.restore_v(x)?;
            let done = self.forward(conv, lr, y_t);
            lr.drop_v();
            return done;
        }
        lr.check_input(x, "trusted conv forward")?;
        let done = self.forward_to(conv, lr, Some(x), y_t);
        for sc in &mut self.scratch {
            sc.vb = Vec::new();
        }
        done
    }

    /// Conv_T into y_t; with `x` (the decomposed input, of the checked shape), the route through W' makes each
    /// V_b from it instead of reading the factorisation's.
    fn forward_to(
        &mut self,
        conv: &Conv2d,
        lr: &BatchLowRank,
        x: Option<&Tensor>,
        y_t: &mut Tensor,
    ) -> Result<()> {
        let w = &conv.weight.value;
        if w.len() != w.shape.iter().product::<usize>() {
            return Err(CoreError::Shape("trusted conv: weight data/shape".into()));
        }
        let g = Geo::of(conv, lr)?;
        let (m, n, r, kk, p) = (g.m, g.n, g.r, g.k * g.k, g.oh * g.ow);
        y_t.resize(&[g.b, m, g.oh, g.ow]);
        if g.b == 0 || m == 0 {
            return Ok(());
        }
        let (per, _, gt) = plan(&mut self.scratch, g.b);
        let route = g.forward_route();
        if route == Fwd::DirectWinograd {
            // X_T of the batch, then the full conv by Winograd (one weight transform, GEMMs over all tiles).
            lr.reconstruct(&mut self.xt_all);
            winograd::transform_weights(&w.data, m, n, false, &mut self.wino_u);
            let threads = rayon::current_num_threads();
            let shape = winograd::Group {
                g: g.b,
                c: n,
                h: g.h,
                w: g.w,
                m,
            };
            winograd::conv(
                &self.xt_all.data,
                shape,
                &self.wino_u,
                &mut y_t.data,
                None,
                &mut self.wino,
                threads,
            );
            return Ok(());
        }
        if route == Fwd::DirectBatched {
            // Small maps: one GEMM over the batch's columns, Y [M × B·P] = W · [col(X_T,1) … col(X_T,B)].
            self.batched_cols(&g, lr);
            let (ck, bp) = (n * kk, g.b * p);
            self.out_all.resize(m * bp, 0.0);
            let threads = rayon::current_num_threads();
            let (wd, cols) = (&w.data, &self.col_all);
            sgemm(
                m,
                bp,
                ck,
                Mat::rm(wd, ck),
                Mat::rm(cols, bp),
                &mut self.out_all,
                false,
                threads,
            );
            for (b, yb) in y_t.data.chunks_mut(m * p).enumerate() {
                for (mi, row) in yb.chunks_mut(p).enumerate() {
                    row.copy_from_slice(&self.out_all[mi * bp + b * p..][..p]);
                }
            }
            return Ok(());
        }
        if route == Fwd::Direct {
            // Y_b [M × P] = W [M × N·kk] · col(U_b V_b)
            let wd = &w.data;
            y_t.data
                .par_chunks_mut(per * m * p)
                .zip(lr.samples.par_chunks(per))
                .zip(self.scratch.par_iter_mut())
                .for_each(|((yc, sams), sc)| {
                    for (yb, s) in yc.chunks_mut(m * p).zip(sams) {
                        rebuild(s, &mut sc.xt);
                        g.conv_bands(wd, &sc.xt, n, yb, &mut sc.col, gt);
                    }
                });
            return Ok(());
        }
        let Fwd::ThroughV { winograd: wino } = route else {
            unreachable!("every other route returned above")
        };
        // W [M, N, kk] → wk [M·kk, N], shared by every sample.
        self.wk.resize(m * kk * n, 0.0);
        for (wm, km) in w.data.chunks(n * kk).zip(self.wk.chunks_mut(kk * n)) {
            transpose(wm, km, n, kk);
        }
        // With a shared basis, W' [M × r·kk] once for the batch (and its Winograd transform).
        if g.shared {
            let u = &lr.samples[0].u;
            self.shared_wp.resize(m * r * kk, 0.0);
            w_prime(&self.wk, u, &g, &mut self.shared_z, &mut self.shared_wp, 1);
            if wino {
                winograd::transform_weights(&self.shared_wp, m, r, false, &mut self.shared_wino_u);
            }
        }
        let wk = &self.wk;
        let shared = g.shared.then_some((&self.shared_wp, &self.shared_wino_u));
        let nhw = n * g.h * g.w;
        y_t.data
            .par_chunks_mut(per * m * p)
            .zip(lr.samples.par_chunks(per))
            .zip(self.scratch.par_iter_mut())
            .enumerate()
            .for_each(|(ci, ((yc, sams), sc))| {
                for (j, (yb, s)) in yc.chunks_mut(m * p).zip(sams).enumerate() {
                    let xb = x.map(|x| {
                        let bi = ci * per + j;
                        &x.data[bi * nhw..(bi + 1) * nhw]
                    });
                    // V_b: the factorisation's, or made from the input in this worker's buffer (by Winograd, a
                    // few rows at a time as the conv reads them, below).
                    if let (Some(xb), false) = (xb, wino) {
                        s.v_from(xb, &mut sc.vb);
                    }
                    let v: &[f32] = if x.is_some() { &sc.vb } else { &s.v };
                    let (wp, wino_u): (&[f32], &[f32]) = match shared {
                        Some((wp, u)) => (wp, u),
                        None => {
                            sc.wp.resize(m * r * kk, 0.0);
                            w_prime(wk, &s.u, &g, &mut sc.z, &mut sc.wp, gt);
                            if wino {
                                winograd::transform_weights(&sc.wp, m, r, false, &mut sc.wino_u);
                            }
                            (&sc.wp, &sc.wino_u)
                        }
                    };
                    if wino {
                        // Y_b = conv3×3(V_b, W'_b) by Winograd.
                        let shape = winograd::Group {
                            g: 1,
                            c: r,
                            h: g.h,
                            w: g.w,
                            m,
                        };
                        let Some(xb) = xb else {
                            winograd::conv(v, shape, wino_u, yb, None, &mut sc.wino, gt);
                            continue;
                        };
                        // V_b made from X_b for the rows each band of tiles reads ([r, rows·W] as the product
                        // gives them, laid out [rows, r, W]): r × H·W is never held (2.2 MB at VGG16-224's
                        // second conv, r = 11), nor the transforms of more than a band of tiles.
                        let mut made = std::mem::take(&mut sc.vb);
                        let mut fill = |rows: std::ops::Range<usize>, out: &mut [f32]| {
                            let pw = rows.len() * g.w;
                            s.v_cols(xb, rows.start * g.w, pw, &mut made);
                            for (vj, vr) in made.chunks_exact(pw).enumerate() {
                                for (i, seg) in vr.chunks_exact(g.w).enumerate() {
                                    out[(i * r + vj) * g.w..][..g.w].copy_from_slice(seg);
                                }
                            }
                        };
                        winograd::conv_rows(
                            shape,
                            wino_u,
                            yb,
                            None,
                            &mut sc.wino,
                            gt,
                            V_BAND_TILES,
                            &mut fill,
                        );
                        sc.vb = made;
                        continue;
                    }
                    // Y_b [M × P] = W'_b · col(V_b), a band of output rows at a time: with r·kk small the
                    // product is bound by writing Y, which stays in cache per band (VGG16 at 224 px, 64
                    // channels, r = 2: 19 → 60 GFLOP/s), and only the band's im2col is made.
                    g.conv_bands(wp, v, r, yb, &mut sc.col, gt);
                }
            });
        Ok(())
    }

    /// conv's W: [M, N, k, k] (only its shape is read), lr as in `forward`, dy: [B, M, OH, OW] → dw_t:
    /// [M, N, k, k] (overwritten) = ∇W_T = Σ_b Σ_j' U_b[:, j'] ⊗ corr(V_b[j'], ∇Y_b): the weight gradient of
    /// conv(V_b, W'_b) w.r.t. W'_b, mapped back through U_b. Same cost as `forward`.
    pub fn weight_grad(
        &mut self,
        conv: &Conv2d,
        lr: &BatchLowRank,
        dy: &Tensor,
        dw_t: &mut Tensor,
    ) -> Result<()> {
        self.weight_grad_to(conv, lr, None, dy, dw_t, false)
    }

    /// [`TrustedConv::weight_grad`] added into `grad` (a conv's ∇W, of W's shape [M, N, k, k]) instead of
    /// written to a buffer of its own: the split's backward accumulates ∇W_T straight into the parameter.
    pub fn add_weight_grad(
        &mut self,
        conv: &Conv2d,
        lr: &BatchLowRank,
        dy: &Tensor,
        grad: &mut Tensor,
    ) -> Result<()> {
        check_grad(conv, grad)?;
        let done = self.weight_grad_to(conv, lr, None, dy, grad, true);
        self.release_backward_scratch();
        done
    }

    /// [`TrustedConv::add_weight_grad`] for factorisations that may have let V go
    /// ([`BatchLowRank::drop_v`]), x being the very input [B, N, H, W] that was decomposed. Through W', each
    /// worker makes its samples' V_b from x one at a time (r × H·W, not the batch's r × B·H·W at once); the
    /// direct routes, which rebuild X_T from every V_b, make V again for the batch first and let it go after.
    pub fn add_weight_grad_from(
        &mut self,
        conv: &Conv2d,
        lr: &mut BatchLowRank,
        x: &Tensor,
        dy: &Tensor,
        grad: &mut Tensor,
    ) -> Result<()> {
        if lr.has_v() {
            return self.add_weight_grad(conv, lr, dy, grad);
        }
        let g = Geo::of(conv, lr)?;
        if g.direct() {
            lr.restore_v(x)?;
            let done = self.add_weight_grad(conv, lr, dy, grad);
            lr.drop_v();
            return done;
        }
        lr.check_input(x, "trusted conv backward")?;
        check_grad(conv, grad)?;
        let done = self.weight_grad_to(conv, lr, Some(x), dy, grad, true);
        self.release_backward_scratch();
        done
    }

    /// Lets the forward's scratch go: every worker's im2col band, W'_b and its Winograd transform and buffers,
    /// and the direct routes' whole-batch buffers (they grow again at the next forward). The split calls it when
    /// a training step's backward begins: the forward's scratch (the largest split conv's) would otherwise be
    /// held through the backward, where the trusted runtime's memory peaks.
    pub fn release_forward_scratch(&mut self) {
        for sc in &mut self.scratch {
            sc.col = Vec::new();
            sc.z = Vec::new();
            sc.wp = Vec::new();
            sc.wino_u = Vec::new();
            sc.vb = Vec::new();
            sc.xt = Vec::new();
            sc.wino = winograd::Work::default();
        }
        self.wk = Vec::new();
        self.xt_all = Tensor::default();
        self.wino_u = Vec::new();
        self.wino = winograd::Work::default();
        self.col_all = Vec::new();
        self.out_all = Vec::new();
        self.shared_z = Vec::new();
        self.shared_wp = Vec::new();
        self.shared_wino_u = Vec::new();
    }

    /// Lets the backward's scratch go (see [`TrustedConv::add_weight_grad`]).
    fn release_backward_scratch(&mut self) {
        // The backward's scratch goes: its im2col (r·k² × P per worker), its part of ∇W_T (W's size per worker)
        // and the stacked U_b and ∇W'_b. A forward does not need them, and kept by every split conv they would
        // add up in the peak memory (each conv's backward uses its own for an instant).
        for sc in &mut self.scratch {
            sc.col = Vec::new();
            sc.dwt = Vec::new();
            sc.zall = Vec::new();
            sc.ucat = Vec::new();
            sc.vb = Vec::new();
        }
    }

    /// ∇W_T into `dw_t` (`add`: added to it, which has W's shape). With `x` (the decomposed input, of the
    /// checked shape), the route through W' makes each V_b from it instead of reading the factorisation's.
    fn weight_grad_to(
        &mut self,
        conv: &Conv2d,
        lr: &BatchLowRank,
        x: Option<&Tensor>,
        dy: &Tensor,
        dw_t: &mut Tensor,
        add: bool,
    ) -> Result<()> {
        let w_shape = &conv.weight.value.shape[..];
        let g = Geo::of(conv, lr)?;
        if x.is_none() || g.direct() {
            no_v_refused(lr, "weight gradient")?;
        }
        let (m, n, r, kk, p) = (g.m, g.n, g.r, g.k * g.k, g.oh * g.ow);
        let want = [g.b, m, g.oh, g.ow];
        if dy.shape != want || dy.len() != want.iter().product::<usize>() {
            return Err(CoreError::Shape(format!(
                "trusted conv backward: ∇Y has shape {:?}, expected {want:?}",
                dy.shape
            )));
        }
        if g.b == 0 || m == 0 {
            if !add {
                dw_t.resize_zero(w_shape);
            }
            return Ok(());
        }
        let (per, chunks, gt) = plan(&mut self.scratch, g.b);
        let direct = g.direct();
        if direct && p < BATCHED_P {
            // Small maps: ∇W [M × N·kk] = [∇Y_1 … ∇Y_B] [M × B·P] · [col(X_T,1) … col(X_T,B)]ᵀ, one GEMM.
            self.batched_cols(&g, lr);
            let (ck, bp) = (n * kk, g.b * p);
            self.out_all.resize(m * bp, 0.0);
            for (b, dyb) in dy.data.chunks(m * p).enumerate() {
                for (mi, row) in dyb.chunks(p).enumerate() {
                    self.out_all[mi * bp + b * p..][..p].copy_from_slice(row);
                }
            }
            if !add {
                dw_t.resize(w_shape);
            }
            let threads = rayon::current_num_threads();
            let (dys, cols) = (&self.out_all, &self.col_all);
            sgemm(
                m,
                ck,
                bp,
                Mat::rm(dys, bp),
                Mat::rm_t(cols, bp),
                &mut dw_t.data,
                add,
                threads,
            );
            return Ok(());
        }
        let shared = g.shared && !direct;
        let nhw = g.n * g.h * g.w;
        dy.data
            .par_chunks(per * m * p)
            .zip(lr.samples.par_chunks(per))
            .zip(self.scratch[..chunks].par_iter_mut())
            .enumerate()
            .for_each(|(ci, ((dyc, sams), sc))| {
                // V_b of the chunk's bi-th sample made from x in the worker's buffer (None: the
                // factorisation's own is read).
                let v_of = |sc: &mut Scratch, bi: usize, s: &super::LowRank| {
                    x.map(|x| {
                        let mut vb = std::mem::take(&mut sc.vb);
                        s.v_from(&x.data[(ci * per + bi) * nhw..][..nhw], &mut vb);
                        vb
                    })
                };
                sc.dwt.clear();
                sc.dwt.resize(n * m * kk, 0.0);
                if shared {
                    // Σ_b ∇W'_b [M × r·kk] over the chunk, then dwt [N × M·kk] = U · z once.
                    sc.wp.clear();
                    sc.wp.resize(m * r * kk, 0.0);
                    for (bi, (dyb, s)) in dyc.chunks(m * p).zip(sams).enumerate() {
                        let vb = v_of(sc, bi, s);
                        sc.add_wp_grad(&g, dyb, vb.as_deref().unwrap_or(&s.v), true, gt);
                        sc.vb = vb.unwrap_or_default();
                    }
                    if let Some(s) = sams.first() {
                        sc.map_back(&g, &s.u, false, gt);
                    }
                    return;
                }
                if !direct {
                    // dwt [N × M·kk] = Σ_b U_b · z_b as one product over the chunk's samples:
                    // [U_1 … U_nb] [N × nb·r] · [z_1; …; z_nb] [nb·r × M·kk] (one pass over dwt instead of one
                    // rank-r update of it per sample).
                    let nb = sams.len();
                    let zl = r * m * kk;
                    sc.zall.resize(nb * zl, 0.0);
                    sc.ucat.resize(n * nb * r, 0.0);
                    for (bi, (dyb, s)) in dyc.chunks(m * p).zip(sams).enumerate() {
                        sc.wp.resize(m * r * kk, 0.0);
                        let vb = v_of(sc, bi, s);
                        sc.add_wp_grad(&g, dyb, vb.as_deref().unwrap_or(&s.v), false, gt);
                        sc.vb = vb.unwrap_or_default();
                        permute(&sc.wp, &mut sc.zall[bi * zl..][..zl], m, r, kk);
                        for (dst, src) in sc.ucat.chunks_mut(nb * r).zip(s.u.chunks(r)) {
                            dst[bi * r..][..r].copy_from_slice(src);
                        }
                    }
                    sgemm(
                        n,
                        m * kk,
                        nb * r,
                        Mat::rm(&sc.ucat, nb * r),
                        Mat::rm(&sc.zall, m * kk),
                        &mut sc.dwt,
                        false,
                        gt,
                    );
                    return;
                }
                for (dyb, s) in dyc.chunks(m * p).zip(sams) {
                    // ∇W [M × N·kk] += ∇Y_b · col(U_b V_b)ᵀ, a band of output rows at a time.
                    rebuild(s, &mut sc.xt);
                    g.corr_bands(dyb, &sc.xt, n, &mut sc.dwt, &mut sc.col, true, gt);
                }
            });
        // Sum the workers' parts into the first's, then (route through W') permute [N, M·kk] into [M, N, k, k].
        let (first, rest) = self.scratch[..chunks].split_at_mut(1);
        let sum = &mut first[0].dwt;
        for sc in rest {
            sum.iter_mut().zip(&sc.dwt).for_each(|(a, b)| *a += b);
        }
        if !add {
            dw_t.resize(w_shape);
        }
        match (direct, add) {
            (true, false) => dw_t.data.copy_from_slice(sum),
            (true, true) => dw_t
                .data
                .iter_mut()
                .zip(sum.iter())
                .for_each(|(a, b)| *a += b),
            (false, false) => permute(sum, &mut dw_t.data, n, m, kk),
            (false, true) => permute_add(sum, &mut dw_t.data, n, m, kk),
        }
        Ok(())
    }
}

/// Fewest channels of V_b for which its conv goes by Winograd rather than by im2col bands. Winograd does 2.25
/// times fewer multiply-adds, but its 16 transform-domain products of r-channel GEMMs per tile of four outputs
/// are written and read again; with few channels that traffic costs more than the multiply-adds saved. Conv_T
/// at batch 8, one thread, Winograd against im2col bands (`tconv_speed`, least of 30 calls, runs alternated):
/// 128 → 128 channels at 112², r = 8: 32.4–43.9 against 23.4–24.6 ms; 128 → 256 at 56², r = 16: 29.3–32.6
/// against 23.9–34.3 ms (24.6 against 27.7–28.1 at 256 → 256); r = 24: alike (36.6 against 36.7–40.7 ms at
/// 56², 22.6–34.2 against 23.3–34.5 at 28²); r = 32: Winograd faster (38.4–43.7 against 47.6–48.4 ms at 56²,
/// 26.5–28.3 against 29.8–34.9 at 28²).
const V_WINOGRAD_MIN_R: usize = 24;

/// Output columns per GEMM of the conv of V_b through W' (see `forward`).
const COL_BLOCK: usize = 2048;

/// Tiles per band of Conv_T by Winograd where V_b is made from X as the bands read it: the transform buffers
/// are 16·(r + M) floats a tile (1.1 MB at M = 64, r = 11).
const V_BAND_TILES: usize = 256;

/// Maps with fewer output pixels than this take the direct route with one GEMM for the whole batch: per
/// sample, a GEMM with P columns runs far below speed (VGG16 at 32 px, batch 8, 2×2 maps: Conv_T took
/// 6.5–7.7 ms per layer, the trusted-only conv of the same FLOPs 2 ms; batched, 3.5–4.5 ms on a loaded
/// machine). At 4×4 (P = 16) both ways measured alike.
const BATCHED_P: usize = 64;

impl TrustedConv {
    /// `col_all` [N·kk × B·P] ← im2col of X_T,b = U_b V_b, sample b in columns b·P .. (b + 1)·P.
    fn batched_cols(&mut self, g: &Geo, lr: &BatchLowRank) {
        let (n, kk, p) = (g.n, g.k * g.k, g.oh * g.ow);
        let (ck, bp) = (n * kk, g.b * p);
        lr.reconstruct(&mut self.xt_all);
        self.col_all.resize(ck * bp, 0.0);
        let nhw = n * g.h * g.w;
        let sc = &mut self.scratch[0];
        for (b, xb) in self.xt_all.data.chunks(nhw).enumerate() {
            let col = g.col(xb, n, &mut sc.col);
            for (k, row) in col.chunks(p).enumerate() {
                self.col_all[k * bp + b * p..][..p].copy_from_slice(row);
            }
        }
    }
}

/// wp [M, r, kk] ← W'_b = W ×_channels U_b, from wk: W as [M·kk, N] and u: U_b [N × r], by one GEMM
/// z [M·kk × r] = wk · U_b (tall and skinny: twice the speed of Uᵀ · W here) and a transpose per output channel.
fn w_prime(wk: &[f32], u: &[f32], g: &Geo, z: &mut Vec<f32>, wp: &mut [f32], gt: usize) {
    let (m, n, r, kk) = (g.m, g.n, g.r, g.k * g.k);
    z.resize(m * kk * r, 0.0);
    sgemm(m * kk, r, n, Mat::rm(wk, n), Mat::rm(u, r), z, false, gt);
    for (zm, wm) in z.chunks(kk * r).zip(wp.chunks_mut(r * kk)) {
        transpose(zm, wm, kk, r);
    }
}

/// a: [R, C] → t: [C, R].
fn transpose(a: &[f32], t: &mut [f32], rows: usize, cols: usize) {
    for (i, row) in a.chunks(cols).take(rows).enumerate() {
        for (j, v) in row.iter().enumerate() {
            t[j * rows + i] = *v;
        }
    }
}

/// a: [A, B, kk] → t: [B, A, kk].
fn permute(a: &[f32], t: &mut [f32], na: usize, nb: usize, kk: usize) {
    for i in 0..na {
        for j in 0..nb {
            t[(j * na + i) * kk..][..kk].copy_from_slice(&a[(i * nb + j) * kk..][..kk]);
        }
    }
}

/// t [B, A, kk] += a [A, B, kk] permuted as in [`permute`].
fn permute_add(a: &[f32], t: &mut [f32], na: usize, nb: usize, kk: usize) {
    for i in 0..na {
        for j in 0..nb {
            let (dst, src) = (
                &mut t[(j * na + i) * kk..][..kk],
                &a[(i * nb + j) * kk..][..kk],
            );
            dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
        }
    }
}

/// v: [C, H, W] → col: [C·k·k, OH·OW] (zero padding outside the image).
fn im2col(v: &[f32], channels: usize, g: &Geo, col: &mut [f32]) {
    im2col_rows(v, channels, g, 0, g.oh, col);
}

/// v: [C, H, W] → col: [C·k·k, (oy1 − oy0)·OW], the columns of output rows oy0..oy1 (zero padding outside
/// the image).
fn im2col_rows(v: &[f32], channels: usize, g: &Geo, oy0: usize, oy1: usize, col: &mut [f32]) {
    let (h, w, k, s, pad, ow) = (g.h, g.w, g.k, g.s, g.pad, g.ow);
    let p = (oy1 - oy0) * ow;
    for c in 0..channels {
        let vc = &v[c * h * w..(c + 1) * h * w];
        for ki in 0..k {
            for kj in 0..k {
                let row = &mut col[((c * k + ki) * k + kj) * p..][..p];
                // Output columns whose input column ox·s + kj − pad lies in [0, W).
                let lo = pad.saturating_sub(kj).div_ceil(s).min(ow);
                let hi = if w + pad > kj {
                    ((w + pad - kj - 1) / s + 1).min(ow)
                } else {
                    0
                }
                .max(lo);
                for (i, oy) in (oy0..oy1).enumerate() {
                    let out = &mut row[i * ow..(i + 1) * ow];
                    let iy = (oy * s + ki) as isize - pad as isize;
                    if iy < 0 || iy >= h as isize || lo == hi {
                        out.fill(0.0);
                        continue;
                    }
                    let vrow = &vc[iy as usize * w..(iy as usize + 1) * w];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    let x0 = lo * s + kj - pad;
                    if s == 1 {
                        out[lo..hi].copy_from_slice(&vrow[x0..x0 + (hi - lo)]);
                    } else {
                        for (o, x) in out[lo..hi].iter_mut().enumerate() {
                            *x = vrow[x0 + o * s];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3 × 3 stride-1 pad-1 conv from `n` to `m` channels over `b` samples of H = W = `side`, at rank `r`.
    fn geo(b: usize, n: usize, m: usize, side: usize, r: usize) -> Geo {
        Geo {
            b,
            m,
            n,
            r,
            h: side,
            w: side,
            k: 3,
            s: 1,
            pad: 1,
            oh: side,
            ow: side,
            shared: false,
        }
    }

    #[test]
    fn the_conv_of_v_goes_by_winograd_only_from_its_least_rank() {
        let through = |winograd| Fwd::ThroughV { winograd };
        // VGG16 at 224 px, the schedule's ranks: im2col bands below V_WINOGRAD_MIN_R channels of V.
        assert_eq!(geo(8, 128, 128, 112, 8).forward_route(), through(false));
        assert_eq!(geo(8, 128, 256, 56, 16).forward_route(), through(false));
        assert_eq!(geo(8, 256, 256, 56, 32).forward_route(), through(true));
        assert_eq!(geo(8, 256, 512, 28, 32).forward_route(), through(true));
        assert_eq!(
            geo(8, 256, 256, 56, V_WINOGRAD_MIN_R).forward_route(),
            through(true)
        );
        assert_eq!(
            geo(8, 256, 256, 56, V_WINOGRAD_MIN_R - 1).forward_route(),
            through(false)
        );
        // The shapes `tests/decomp.rs` takes through each way (conv_t_through_w_prime_by_winograd_...).
        assert_eq!(geo(2, 32, 16, 12, 24).forward_route(), through(true));
        assert_eq!(geo(2, 32, 8, 41, 24).forward_route(), through(true));
        assert_eq!(geo(2, 32, 16, 12, 8).forward_route(), through(false));
        // A map too small for Winograd stays on im2col whatever the rank.
        assert_eq!(geo(8, 64, 64, 1, 32).forward_route(), Fwd::DirectBatched);
    }
}
