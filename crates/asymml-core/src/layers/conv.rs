//! 2-D convolution (cross-correlation, as in PyTorch) through im2col + GEMM, parallel over the batch; 3×3
//! stride-1 pad-1 convs use Winograd F(2×2, 3×3) for the forward pass and ∇X (∇W stays im2col + GEMM).

use super::winograd;
use super::{out_size, sum8, threads, Param};
use crate::error::{CoreError, Result};
use crate::gemm::{sgemm, Mat};
use crate::rng::Rng;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Per-worker scratch: the im2col matrix of one image, its gradient, and partial weight/bias gradients.
#[derive(Default)]
struct Scratch {
    col: Vec<f32>,
    dcol: Vec<f32>,
    db: Vec<f32>,
    dyg: Vec<f32>,
    wk: winograd::Work,
}

/// How a batch is split into work (see `Conv2d::plan`).
struct Plan {
    per: usize,
    chunks: usize,
    group: usize,
    gemm_threads: usize,
}

/// Conv2d: weight [M, C, k, k], optional bias [M]; stride and zero padding equal in both directions.
pub struct Conv2d {
    pub in_ch: usize,
    pub out_ch: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub weight: Param,
    pub bias: Option<Param>,
    /// Index of this conv in its network (execution order), used by conv executors.
    pub id: usize,
    scratch: Vec<Scratch>,
    /// Partial weight gradients of workers 1.. (worker 0 accumulates into the gradient itself).
    dw_parts: Vec<Vec<f32>>,
    /// Use Winograd F(2×2, 3×3) where it applies (on by default; off forces im2col + GEMM).
    pub winograd: bool,
    /// Winograd weight transforms: [M, 16, C] for the forward pass, [C, 16, M] (flipped) for ∇X.
    wino_u: Vec<f32>,
}

/// Stride, zero padding and bias of a [`Conv2d`]; the default is PyTorch's: stride 1, no padding, a bias.
///
/// Named fields keep stride and padding from being swapped at a call site:
/// `Conv2dConfig { padding: 1, bias: false, ..Default::default() }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Step between output pixels, in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Whether the conv has a bias (initialised to zero).
    pub bias: bool,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Conv2dConfig {
            stride: 1,
            padding: 0,
            bias: true,
        }
    }
}

impl Conv2d {
    /// A `k`×`k` conv from `in_ch` to `out_ch` channels with Kaiming-normal weights (fan-out, ReLU gain, as
    /// torchvision) and zero bias.
    pub fn new(in_ch: usize, out_ch: usize, k: usize, cfg: Conv2dConfig, rng: &mut Rng) -> Self {
        let Conv2dConfig {
            stride,
            padding: pad,
            bias,
        } = cfg;
        let fan_out = (out_ch * k * k) as f32;
        let std = (2.0 / fan_out).sqrt();
        let n = out_ch * in_ch * k * k;
        let w: Vec<f32> = (0..n).map(|_| rng.normal() * std).collect();
        Conv2d {
            in_ch,
            out_ch,
            k,
            stride,
            pad,
            weight: Param::new(Tensor {
                shape: vec![out_ch, in_ch, k, k],
                data: w,
            }),
            bias: bias.then(|| Param::new(Tensor::zeros(&[out_ch]))),
            id: 0,
            scratch: Vec::new(),
            dw_parts: Vec::new(),
            winograd: true,
            wino_u: Vec::new(),
        }
    }

    /// Output shape for an input of shape [B, C, H, W], or an error if the input does not fit this conv.
    pub fn out_shape(&self, x: &[usize]) -> Result<[usize; 4]> {
        let &[b, c, h, w] = x else {
            return Err(CoreError::Shape(format!(
                "conv: expected NCHW input, got {x:?}"
            )));
        };
        if c != self.in_ch {
            return Err(CoreError::Shape(format!(
                "conv: input has {c} channels, layer expects {}",
                self.in_ch
            )));
        }
        match (
            out_size(h, self.k, self.stride, self.pad),
            out_size(w, self.k, self.stride, self.pad),
        ) {
            (Some(oh), Some(ow)) => Ok([b, self.out_ch, oh, ow]),
            _ => Err(CoreError::Shape(format!(
                "conv: input {h}×{w} is smaller than the {k}×{k} kernel (padding {p})",
                k = self.k,
                p = self.pad
            ))),
        }
    }

    /// True when the conv is a plain per-pixel matrix product (1×1, stride 1, no padding): no im2col needed.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// True when Winograd F(2×2, 3×3) computes this conv with `c_in` input channels (the GEMMs' inner
    /// dimension: C for the forward pass, M for ∇X); see [`winograd::suits`].
    fn use_winograd(&self, c_in: usize, h: usize, w: usize) -> bool {
        self.winograd && winograd::suits(self.k, self.stride, self.pad, c_in, h, w)
    }

    /// How to cut a batch of `b` images with `p` output pixels each into work: `per` images per worker
    /// chunk, `group` images per GEMM (so that GEMMs have at least ~`TARGET` columns when the maps are small),
    /// and the GEMM's own thread count.
    /// Lets go of the buffers the conv's own forward and backward keep between calls (its im2col and Winograd
    /// scratch, the weight transforms, the workers' partial gradients); they grow again at the next call. For
    /// an executor that computes this conv another way from now on (the split route).
    pub fn release_buffers(&mut self) {
        self.scratch = Vec::new();
        self.dw_parts = Vec::new();
        self.wino_u = Vec::new();
    }

    fn plan(&mut self, b: usize, p: usize) -> Plan {
        // Measured on VGG16/ResNet18-CIFAR at batch 32 (examples/conv_shapes.rs): 384–768 columns do
        // equally well; without grouping the 4×4 and 2×2 maps ran 2–3× slower.
        let target: usize = 512;
        let t = threads();
        let want_group = target.div_ceil(p.max(1)).min(b).max(1);
        // One chunk of images per thread; GEMMs parallelise internally only when there are fewer images
        // than threads.
        let chunks = t.min(b).max(1);
        let per = b.div_ceil(chunks.max(1));
        let chunks = b.div_ceil(per);
        if self.scratch.len() < chunks {
            self.scratch.resize_with(chunks, Scratch::default);
        }
        Plan {
            per,
            chunks,
            group: want_group.min(per),
            gemm_threads: (t / chunks).max(1),
        }
    }

    fn geometry(&self, x: &[usize], oh: usize, ow: usize) -> Geometry {
        Geometry {
            c: x[1],
            h: x[2],
            w: x[3],
            k: self.k,
            s: self.stride,
            pad: self.pad,
            oh,
            ow,
        }
    }

    /// x: [B, C, H, W] → y: [B, M, OH, OW]; y = conv(x, W) + b.
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        let os = self.out_shape(&x.shape)?;
        y.resize(&os);
        let [b, m, oh, ow] = os;
        let geo = self.geometry(&x.shape, oh, ow);
        let (p, ckk, xlen) = (oh * ow, geo.c * self.k * self.k, geo.c * geo.h * geo.w);
        let plan = self.plan(b, p);
        let pointwise = self.is_pointwise();
        let wt = &self.weight.value.data;
        let bias = self.bias.as_ref().map(|b| &b.value.data[..]);
        if self.use_winograd(geo.c, geo.h, geo.w) {
            winograd::transform_weights(wt, m, geo.c, false, &mut self.wino_u);
            let (th, tw) = winograd::tiles(geo.h, geo.w);
            let plan = Plan {
                group: WINO_TARGET.div_ceil(th * tw).min(plan.per),
                ..plan
            };
            let u = &self.wino_u;
            y.data
                .par_chunks_mut(plan.per * m * p)
                .zip(x.data.par_chunks(plan.per * xlen))
                .zip(self.scratch.par_iter_mut())
                .for_each(|((yc, xc), sc)| {
                    for (yg, xg) in yc
                        .chunks_mut(plan.group * m * p)
                        .zip(xc.chunks(plan.group * xlen))
                    {
                        let g = xg.len() / xlen;
                        let shape = winograd::Group {
                            g,
                            c: geo.c,
                            h: geo.h,
                            w: geo.w,
                            m,
                        };
                        winograd::conv(xg, shape, u, yg, bias, &mut sc.wk, plan.gemm_threads);
                    }
                });
            return Ok(());
        }
        y.data
            .par_chunks_mut(plan.per * m * p)
            .zip(x.data.par_chunks(plan.per * xlen))
            .zip(self.scratch.par_iter_mut())
            .for_each(|((yc, xc), sc)| {
                for (yg, xg) in yc
                    .chunks_mut(plan.group * m * p)
                    .zip(xc.chunks(plan.group * xlen))
                {
                    let g = xg.len() / xlen;
                    let n = g * p;
                    if g == 1 && pointwise {
                        sgemm(
                            m,
                            p,
                            ckk,
                            Mat::rm(wt, ckk),
                            Mat::rm(xg, p),
                            yg,
                            false,
                            plan.gemm_threads,
                        );
                    } else {
                        sc.col.resize(ckk * n, 0.0);
                        for (i, xb) in xg.chunks(xlen).enumerate() {
                            im2col(xb, &geo, &mut sc.col, n, i * p);
                        }
                        if g == 1 {
                            sgemm(
                                m,
                                p,
                                ckk,
                                Mat::rm(wt, ckk),
                                Mat::rm(&sc.col, p),
                                yg,
                                false,
                                plan.gemm_threads,
                            );
                        } else {
                            // Y_grp [M × g·P], then scattered image by image into NCHW.
                            sc.dcol.resize(m * n, 0.0);
                            sgemm(
                                m,
                                n,
                                ckk,
                                Mat::rm(wt, ckk),
                                Mat::rm(&sc.col, n),
                                &mut sc.dcol,
                                false,
                                plan.gemm_threads,
                            );
                            scatter(&sc.dcol, yg, m, p, g);
                        }
                    }
                    if let Some(bias) = bias {
                        for (row, &bv) in yg.chunks_mut(p).zip(bias.iter().cycle()) {
                            row.iter_mut().for_each(|v| *v += bv);
                        }
                    }
                }
            });
        Ok(())
    }

    /// x: [B, C, H, W], dy: [B, M, OH, OW] → dx: [B, C, H, W] (if asked); accumulates ∇W and ∇b.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>) -> Result<()> {
        self.backward_parts(x, dy, dx, true)
    }

    /// As [`Conv2d::backward`], with ∇W and ∇b accumulated only when `weights` (∇X alone reads neither x's
    /// values nor an im2col of them; ∇W alone is `dx: None`): the two halves of a backward, run apart.
    pub fn backward_parts(
        &mut self,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
        weights: bool,
    ) -> Result<()> {
        let os = self.out_shape(&x.shape)?;
        if dy.shape != os {
            return Err(CoreError::Shape(format!(
                "conv backward: ∇Y has shape {:?}, expected {os:?}",
                dy.shape
            )));
        }
        let [b, m, oh, ow] = os;
        let geo = self.geometry(&x.shape, oh, ow);
        let (p, ckk, xlen) = (oh * ow, geo.c * self.k * self.k, geo.c * geo.h * geo.w);
        let plan = self.plan(b, p);
        let pointwise = self.is_pointwise();
        let has_bias = weights && self.bias.is_some();
        let want_dx = dx.is_some();
        if self.use_winograd(geo.c.min(m), geo.h, geo.w) {
            return self.backward_winograd(x, dy, dx, &geo, m, weights);
        }
        let wt = &self.weight.value.data;
        // Without ∇X, each worker gets a one-element dummy slice so that one code path serves both cases.
        let mut dummy = vec![0.0f32; plan.chunks];
        let (dx_data, dx_chunk): (&mut [f32], usize) = match dx {
            Some(d) => {
                d.resize(&x.shape);
                (&mut d.data, plan.per * xlen)
            }
            None => (&mut dummy, 1),
        };
        let gt = plan.gemm_threads;
        // Worker 0 accumulates straight into ∇W; the others write partial sums (no zeroing pass: their first
        // GEMM overwrites) that are added afterwards.
        let dw_workers = if weights { plan.chunks } else { 0 };
        self.dw_parts
            .resize_with(dw_workers.saturating_sub(1), Vec::new);
        for part in &mut self.dw_parts {
            if part.len() != m * ckk {
                part.resize(m * ckk, 0.0);
            }
        }
        // Without ∇W, each worker gets an empty target (never written).
        let dw_targets: Vec<&mut [f32]> = if weights {
            std::iter::once(&mut self.weight.grad.data[..])
                .chain(self.dw_parts.iter_mut().map(|v| &mut v[..]))
                .collect()
        } else {
            (0..plan.chunks).map(|_| <&mut [f32]>::default()).collect()
        };
        x.data
            .par_chunks(plan.per * xlen)
            .zip(dy.data.par_chunks(plan.per * m * p))
            .zip(self.scratch[..plan.chunks].par_iter_mut())
            .zip(dx_data.par_chunks_mut(dx_chunk))
            .zip(dw_targets.into_par_iter().enumerate())
            .for_each(|((((xc, dyc), sc), dxc), (worker, dw))| {
                if has_bias {
                    sc.db.clear();
                    sc.db.resize(m, 0.0);
                    for (i, row) in dyc.chunks(p).enumerate() {
                        sc.db[i % m] += sum8(row, |v| v);
                    }
                }
                let groups = xc
                    .chunks(plan.group * xlen)
                    .zip(dyc.chunks(plan.group * m * p));
                for (gi, (xg, dyg)) in groups.enumerate() {
                    let g = xg.len() / xlen;
                    let n = g * p;
                    // ∇Y_grp [M × g·P]
                    let dyw: &[f32] = if g == 1 {
                        dyg
                    } else {
                        sc.dyg.resize(m * n, 0.0);
                        gather(dyg, &mut sc.dyg, m, p, g);
                        &sc.dyg
                    };
                    if weights {
                        // col_grp [CKK × g·P] (or the image itself when pointwise and alone)
                        let col: &[f32] = if g == 1 && pointwise {
                            xg
                        } else {
                            sc.col.resize(ckk * n, 0.0);
                            for (i, xb) in xg.chunks(xlen).enumerate() {
                                im2col(xb, &geo, &mut sc.col, n, i * p);
                            }
                            &sc.col
                        };
                        // ∇W [M × CKK] += ∇Y_grp · col_grpᵀ (a partial sum's first group overwrites)
                        let accumulate = worker == 0 || gi > 0;
                        sgemm(
                            m,
                            ckk,
                            n,
                            Mat::rm(dyw, n),
                            Mat::rm_t(col, n),
                            dw,
                            accumulate,
                            gt,
                        );
                    }
                    if !want_dx {
                        continue;
                    }
                    let dxg = &mut dxc[gi * plan.group * xlen..][..g * xlen];
                    if g == 1 && pointwise {
                        sgemm(
                            ckk,
                            p,
                            m,
                            Mat::rm_t(wt, ckk),
                            Mat::rm(dyw, p),
                            dxg,
                            false,
                            gt,
                        );
                    } else {
                        // ∇col_grp [CKK × g·P] = Wᵀ · ∇Y_grp, then col2im per image
                        sc.dcol.resize(ckk * n, 0.0);
                        sgemm(
                            ckk,
                            n,
                            m,
                            Mat::rm_t(wt, ckk),
                            Mat::rm(dyw, n),
                            &mut sc.dcol,
                            false,
                            gt,
                        );
                        for (i, dxb) in dxg.chunks_mut(xlen).enumerate() {
                            col2im(&sc.dcol, &geo, dxb, n, i * p);
                        }
                    }
                }
            });
        if !weights {
            return Ok(());
        }
        for part in &self.dw_parts {
            add_into(&mut self.weight.grad.data, part);
        }
        for sc in &self.scratch[..plan.chunks] {
            if let Some(bp) = self.bias.as_mut() {
                add_into(&mut bp.grad.data, &sc.db);
            }
        }
        Ok(())
    }

    /// Backward of a Winograd conv (3×3, stride 1, pad 1; see [`Conv2d::backward`]): per group of images,
    /// ∇W in the transform domain and ∇X = conv3×3(∇Y, flipped Wᵀ, pad 1).
    fn backward_winograd(
        &mut self,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
        geo: &Geometry,
        m: usize,
        weights: bool,
    ) -> Result<()> {
        let b = x.shape[0];
        let (c, h, w) = (geo.c, geo.h, geo.w);
        let (xlen, ylen) = (c * h * w, m * h * w);
        let (th, tw) = winograd::tiles(h, w);
        let plan = self.plan(b, h * w);
        let plan = Plan {
            group: WINO_TARGET.div_ceil(th * tw).min(plan.per),
            ..plan
        };
        let has_bias = weights && self.bias.is_some();
        let want_dx = dx.is_some();
        if want_dx {
            winograd::transform_weights(&self.weight.value.data, m, c, true, &mut self.wino_u);
        }
        let ut = &self.wino_u;
        let mut dummy = vec![0.0f32; plan.chunks];
        let (dx_data, dx_chunk): (&mut [f32], usize) = match dx {
            Some(d) => {
                d.resize(&x.shape);
                (&mut d.data, plan.per * xlen)
            }
            None => (&mut dummy, 1),
        };
        let gt = plan.gemm_threads;
        x.data
            .par_chunks(plan.per * xlen)
            .zip(dy.data.par_chunks(plan.per * ylen))
            .zip(self.scratch[..plan.chunks].par_iter_mut())
            .zip(dx_data.par_chunks_mut(dx_chunk))
            .for_each(|(((xc, dyc), sc), dxc)| {
                if has_bias {
                    sc.db.clear();
                    sc.db.resize(m, 0.0);
                    for (i, row) in dyc.chunks(h * w).enumerate() {
                        sc.db[i % m] += sum8(row, |v| v);
                    }
                }
                let groups = xc
                    .chunks(plan.group * xlen)
                    .zip(dyc.chunks(plan.group * ylen));
                for (gi, (xg, dyg)) in groups.enumerate() {
                    let g = xg.len() / xlen;
                    let shape = winograd::Group { g, c, h, w, m };
                    if weights {
                        winograd::grad_weights(xg, dyg, shape, &mut sc.wk, gi > 0, gt);
                    }
                    if want_dx {
                        // ∇X: the transposed conv, from M channels back to C.
                        let dxg = &mut dxc[gi * plan.group * xlen..][..g * xlen];
                        let back = winograd::Group {
                            c: m,
                            m: c,
                            ..shape
                        };
                        winograd::conv(dyg, back, ut, dxg, None, &mut sc.wk, gt);
                    }
                }
            });
        if !weights {
            return Ok(());
        }
        let parts: Vec<&[f32]> = self.scratch[..plan.chunks]
            .iter()
            .map(|sc| &sc.wk.du[..])
            .collect();
        winograd::finish_grad(&parts, m, c, &mut self.weight.grad.data);
        for sc in &self.scratch[..plan.chunks] {
            if let Some(bp) = self.bias.as_mut() {
                add_into(&mut bp.grad.data, &sc.db);
            }
        }
        Ok(())
    }

    /// Multiply–add count of one forward pass on input shape `x` (0 if the shape does not fit).
    pub fn macs(&self, x: &[usize]) -> u64 {
        match self.out_shape(x) {
            Ok([b, m, oh, ow]) => (b * m * oh * ow * self.in_ch * self.k * self.k) as u64,
            Err(_) => 0,
        }
    }
}

/// Winograd GEMM columns (tiles) per group of images.
const WINO_TARGET: usize = 128;

/// dy: [B, M, OH, OW] → db [M] += Σ_b Σ_p ∇Y[b, m, p], summed the way [`Conv2d::backward`] sums it (each row in
/// 8 lanes, then per image), for a conv whose backward runs elsewhere (the split runtime's bias gradient).
pub fn add_bias_grad(dy: &Tensor, db: &mut Tensor) -> Result<()> {
    let (_, m, oh, ow) = dy.nchw("bias gradient")?;
    if db.shape != [m] {
        *db = Tensor::zeros(&[m]);
    }
    let p = oh * ow;
    if p == 0 {
        return Ok(());
    }
    let mut part = vec![0f32; m];
    for (i, row) in dy.data.chunks(p).enumerate() {
        part[i % m] += sum8(row, |v| v);
    }
    add_into(&mut db.data, &part);
    Ok(())
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// grp: [M, g·P] → y: [g, M, P].
fn scatter(grp: &[f32], y: &mut [f32], m: usize, p: usize, g: usize) {
    for (i, yb) in y.chunks_mut(m * p).take(g).enumerate() {
        for (r, row) in yb.chunks_mut(p).enumerate() {
            row.copy_from_slice(&grp[r * g * p + i * p..][..p]);
        }
    }
}

/// y: [g, M, P] → grp: [M, g·P].
fn gather(y: &[f32], grp: &mut [f32], m: usize, p: usize, g: usize) {
    for (i, yb) in y.chunks(m * p).take(g).enumerate() {
        for (r, row) in yb.chunks(p).enumerate() {
            grp[r * g * p + i * p..][..p].copy_from_slice(row);
        }
    }
}

/// Geometry of one conv application to one image.
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// For kernel column offset `kj`: the range of output columns whose input column is inside the image.
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        // input col = ow*s + kj - pad must be in [0, w)
        let lo = if kj >= self.pad {
            0
        } else {
            (self.pad - kj).div_ceil(self.s)
        };
        let hi = if self.w + self.pad > kj {
            ((self.w + self.pad - kj - 1) / self.s + 1).min(self.ow)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// x: [C, H, W] → columns `off..off + OH·OW` of col: [C·k·k, ld].
fn im2col(x: &[f32], g: &Geometry, col: &mut [f32], ld: usize, off: usize) {
    let p = g.oh * g.ow;
    for c in 0..g.c {
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.k {
            for kj in 0..g.k {
                let row = &mut col[((c * g.k + ki) * g.k + kj) * ld + off..][..p];
                let (lo, hi) = g.valid_cols(kj);
                for oy in 0..g.oh {
                    let out = &mut row[oy * g.ow..(oy + 1) * g.ow];
                    let iy = (oy * g.s + ki) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize || lo >= hi {
                        out.iter_mut().for_each(|v| *v = 0.0);
                        continue;
                    }
                    let xrow = &xc[iy as usize * g.w..(iy as usize + 1) * g.w];
                    out[..lo].iter_mut().for_each(|v| *v = 0.0);
                    out[hi..].iter_mut().for_each(|v| *v = 0.0);
                    let x0 = lo * g.s + kj - g.pad;
                    if g.s == 1 {
                        out[lo..hi].copy_from_slice(&xrow[x0..x0 + (hi - lo)]);
                    } else {
                        for (o, v) in out[lo..hi].iter_mut().enumerate() {
                            *v = xrow[x0 + o * g.s];
                        }
                    }
                }
            }
        }
    }
}

/// Columns `off..off + OH·OW` of col: [C·k·k, ld] → dx: [C, H, W] (overwritten with the sum of the
/// overlapping contributions).
fn col2im(col: &[f32], g: &Geometry, dx: &mut [f32], ld: usize, off: usize) {
    dx.iter_mut().for_each(|v| *v = 0.0);
    let p = g.oh * g.ow;
    for c in 0..g.c {
        let dxc = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.k {
            for kj in 0..g.k {
                let row = &col[((c * g.k + ki) * g.k + kj) * ld + off..][..p];
                let (lo, hi) = g.valid_cols(kj);
                if lo >= hi {
                    continue;
                }
                for oy in 0..g.oh {
                    let iy = (oy * g.s + ki) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let src = &row[oy * g.ow..(oy + 1) * g.ow];
                    let drow = &mut dxc[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let x0 = lo * g.s + kj - g.pad;
                    if g.s == 1 {
                        add_into(&mut drow[x0..x0 + (hi - lo)], &src[lo..hi]);
                    } else {
                        for (o, v) in src[lo..hi].iter().enumerate() {
                            drow[x0 + o * g.s] += v;
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

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum();
        let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// Winograd (forward, ∇X) against im2col + GEMM on the same conv, for shapes where it applies and
    /// shapes where it falls back (other kernels, strides, paddings, few channels).
    #[test]
    fn winograd_matches_im2col() {
        let mut rng = Rng::new(3);
        for &(b, c, m, h, w, k, s, p) in &[
            (1, 8, 8, 1, 1, 3, 1, 1),
            (1, 8, 16, 5, 7, 3, 1, 1),
            (3, 16, 8, 9, 9, 3, 1, 1),
            (5, 12, 20, 8, 8, 3, 1, 1),
            (4, 32, 32, 2, 2, 3, 1, 1),
            (2, 16, 16, 4, 4, 3, 1, 1),
            (2, 16, 16, 5, 5, 3, 1, 1),
            (2, 64, 24, 16, 16, 3, 1, 1),
            (2, 1, 8, 6, 6, 3, 1, 1),
            (2, 8, 1, 6, 6, 3, 1, 1),
            (2, 8, 8, 7, 7, 3, 2, 1),
            (2, 8, 8, 7, 7, 3, 1, 0),
            (2, 8, 8, 7, 7, 1, 1, 0),
        ] {
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut conv = Conv2d::new(
                        c,
                        m,
                        k,
                        Conv2dConfig {
                            stride: s,
                            padding: p,
                            bias: true,
                        },
                        &mut rng,
                    );
                    for v in conv.bias.as_mut().unwrap().value.data.iter_mut() {
                        *v = rng.normal();
                    }
                    let x = Tensor {
                        shape: vec![b, c, h, w],
                        data: (0..b * c * h * w).map(|_| rng.normal()).collect(),
                    };
                    let mut out = Vec::new();
                    for wino in [true, false] {
                        conv.winograd = wino;
                        conv.weight.zero_grad();
                        conv.bias.as_mut().unwrap().zero_grad();
                        let mut y = Tensor::default();
                        conv.forward(&x, &mut y).unwrap();
                        let dy = Tensor {
                            shape: y.shape.clone(),
                            data: (0..y.len())
                                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
                                .collect(),
                        };
                        let mut dx = Tensor::default();
                        conv.backward(&x, &dy, Some(&mut dx)).unwrap();
                        let (dw, db) = (
                            conv.weight.grad.clone(),
                            conv.bias.as_ref().unwrap().grad.clone(),
                        );
                        // The two halves run apart give the same values; ∇X alone leaves ∇W and ∇b alone.
                        let mut dx_alone = Tensor::default();
                        conv.backward_parts(&x, &dy, Some(&mut dx_alone), false)
                            .unwrap();
                        assert_eq!(dx_alone.data, dx.data, "∇X alone (winograd {wino})");
                        assert_eq!(conv.weight.grad.data, dw.data);
                        conv.weight.zero_grad();
                        conv.bias.as_mut().unwrap().zero_grad();
                        conv.backward_parts(&x, &dy, None, true).unwrap();
                        assert_eq!(conv.weight.grad.data, dw.data, "∇W alone (winograd {wino})");
                        assert_eq!(conv.bias.as_ref().unwrap().grad.data, db.data);
                        out.push((y, dx, dw));
                    }
                    let what = format!("b{b} c{c} m{m} {h}×{w} k{k} s{s} p{p} threads {threads}");
                    let (a, r) = (&out[0], &out[1]);
                    let e = rel_err(&a.0.data, &r.0.data);
                    assert!(e < 1e-5, "{what}: y rel err {e}");
                    let e = rel_err(&a.1.data, &r.1.data);
                    assert!(e < 1e-5, "{what}: ∇X rel err {e}");
                    let e = rel_err(&a.2.data, &r.2.data);
                    assert!(e < 1e-5, "{what}: ∇W rel err {e}");
                });
            }
        }
    }
}
