//! The AsymML decomposition of a conv input (see DESIGN.md): per sample, X (N × HW, channels × pixels) =
//! X_T + X_U with X_T = U V of rank r kept trusted and the residual X_U sent to the accelerator; the trusted
//! convolution of X_T at cost ∝ r; the rank policies; the optional noise on X_U.
//!
//! - [`light_svd`] and friends: the paper's lightweight SVD (Algorithm 1), O(r·N·HW) per sample.
//! - [`SvdMethod`], [`decompose_batch_with`]: the choice between it and the block method (randomized subspace
//!   iteration / Gram eigendecomposition made of matrix products, see [`BlockSvd`]).
//! - [`singular_values`], [`exact_low_rank`]: the exact reference (f64 eigendecomposition of X Xᵀ).
//! - [`RankPolicy`], [`decompose_batch`]: one r per conv and batch, every sample decomposed in parallel.
//! - [`TrustedConv`]: conv(U_b V_b, W) and its weight gradient through (U_b, V_b) only.
//! - [`add_noise`]: X_U + n, n ~ N(0, (nsr·rms(X))²).
//!
//! The split is exact whatever the quality of the lightweight SVD: X_U is exactly what deflation left, so
//! X_T + X_U = X up to f32 round-off and conv(X_T, W) + conv(X_U, W) = conv(X, W).

mod block;
mod exact;
mod policy;
mod svd;
mod table;
mod trusted;

pub use block::{block_svd_flops, BlockRoute, BlockSvd, SvdMethod, GRAM_STEPS};
pub use exact::{
    energy_kept, entropy_rank, exact_low_rank, rank_for_energy, singular_values, svd_entropy,
};
pub use policy::{schedule_rank, RankPolicy, SCHEDULE_MAX_RANK};
pub use svd::{light_svd, light_svd_energy, light_svd_extend, EnergyStop, LowRank};
pub use table::{RankTable, TableEntry, TableRank, TrustedRoute};

/// Stop at energy fraction `e`, or at all `n` components.
fn all_of(e: f64, n: usize) -> EnergyStop {
    EnergyStop {
        fraction: e,
        max_rank: n,
    }
}
pub use trusted::TrustedConv;

use crate::error::{CoreError, Result};
use crate::gemm::{sgemm_ld, Mat};
use crate::rng::Rng;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::ops::Range;

/// A batch [B, N, H, W] borrowed from a tensor: all of it or a range of its samples.
#[derive(Clone, Copy)]
struct Batch<'a> {
    data: &'a [f32],
    shape: [usize; 4],
}

impl<'a> Batch<'a> {
    fn of(x: &'a Tensor) -> Result<Self> {
        let (b, n, h, w) = x.nchw("decompose")?;
        Ok(Batch {
            data: &x.data,
            shape: [b, n, h, w],
        })
    }

    fn samples(x: &'a Tensor, samples: Range<usize>) -> Result<Self> {
        let (b, n, h, w) = x.nchw("decompose")?;
        if samples.start >= samples.end || samples.end > b {
            return Err(CoreError::Shape(format!(
                "decompose: samples {samples:?} of a batch of {b}"
            )));
        }
        let per = n * h * w;
        Ok(Batch {
            data: &x.data[samples.start * per..samples.end * per],
            shape: [samples.len(), n, h, w],
        })
    }
}

/// The factorisations of one batch: every sample b has U_b (N × r) and V_b (r × H·W) with the same r.
#[derive(Clone, Debug, Default)]
pub struct BatchLowRank {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub r: usize,
    pub samples: Vec<LowRank>,
    /// Every sample has the same U (a basis shared by the batch, see [`decompose_batch_shared`]).
    pub shared: bool,
    /// The batch-shared basis's factorisation of the batch as one N × B·HW matrix.
    whole_lr: LowRank,
    /// Every U_b V_b is the orthogonal projection of X_b onto span(U_b) (the block method: V_b = U_bᵀ X_b with
    /// each row j divided by ‖u_j‖²), so V can be let go and made again from X ([`BatchLowRank::drop_v`]).
    projection: bool,
    /// V was let go ([`BatchLowRank::drop_v`]) and not made again since.
    v_dropped: bool,
}

impl BatchLowRank {
    /// Number of samples B.
    pub fn batch(&self) -> usize {
        self.samples.len()
    }

    /// Bytes of decomposition scratch these factorisations still hold (0 once a decomposition has returned:
    /// only U and V are kept between a conv's forward and its backward).
    pub fn scratch_bytes(&self) -> usize {
        self.samples
            .iter()
            .chain(std::iter::once(&self.whole_lr))
            .map(LowRank::scratch_bytes)
            .sum()
    }

    /// Lets every sample's V go, where it can be made again from X ([`BatchLowRank::restore_v`]: the block
    /// method's factorisations); returns whether it did. V is as large as r/N of X: a split conv keeps only U
    /// (N × r) from its forward to its backward.
    pub fn drop_v(&mut self) -> bool {
        if !self.projection || self.v_dropped {
            return self.v_dropped;
        }
        for s in &mut self.samples {
            s.v = Vec::new();
        }
        self.v_dropped = true;
        true
    }

    /// Whether V is there (not let go by [`BatchLowRank::drop_v`]).
    pub fn has_v(&self) -> bool {
        !self.v_dropped
    }

    /// An error (naming `what`) unless x has the shape [B, N, H, W] these factorisations were made of.
    pub(crate) fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        let (b, n, h, w) = x.nchw(what)?;
        if b != self.samples.len() || n != self.n || (h, w) != (self.h, self.w) {
            return Err(CoreError::Shape(format!(
                "{what}: an input of shape {:?} for factorisations of [{}, {}, {}, {}]",
                x.shape,
                self.samples.len(),
                self.n,
                self.h,
                self.w
            )));
        }
        Ok(())
    }

    /// Makes V again after [`BatchLowRank::drop_v`], from x — the very input [B, N, H, W] that was decomposed:
    /// V_b = U_bᵀ X_b with row j divided by ‖u_j‖² (0 where u_j is zero), which is the V of the decomposition up
    /// to float32 rounding, so U V is X's projection as before. Nothing to do when V is there.
    pub fn restore_v(&mut self, x: &Tensor) -> Result<()> {
        if !self.v_dropped {
            return Ok(());
        }
        self.check_input(x, "restore V")?;
        let (n, hw) = (self.n, self.h * self.w);
        if let Some(s) = self
            .samples
            .iter()
            .find(|s| s.n != n || s.hw != hw || s.u.len() != n * s.r)
        {
            return Err(CoreError::Shape(format!(
                "restore V: a factorisation of {}×{} at rank {} with {} values of U, for [{n}, {hw}]",
                s.n,
                s.hw,
                s.r,
                s.u.len()
            )));
        }
        self.samples
            .par_iter_mut()
            .zip(x.data.par_chunks(n * hw))
            .for_each(|(s, xb)| {
                let mut v = std::mem::take(&mut s.v);
                s.v_from(xb, &mut v);
                s.v = v;
            });
        self.v_dropped = false;
        Ok(())
    }

    /// out: [B, N, P] ← pixels `p0 .. p0 + P` of the residual X_U = X − U_b V_b per sample, for x the very
    /// input [B, N, H, W] that was decomposed. The same values, made the same way, as the residual
    /// [`decompose_batch_with`] gives: X's rows copied, then −U_b V_b added by a matrix product. Where V was let
    /// go ([`BatchLowRank::drop_v`]), each sample's columns of V are made first from those pixels of X
    /// ([`LowRank::v_from`]'s formula, r × P), so the batch's V is never needed whole.
    pub fn residual_slab(&self, x: &Tensor, p0: usize, p: usize, out: &mut Vec<f32>) -> Result<()> {
        let (b, n, h, w) = x.nchw("residual slab")?;
        let hw = h * w;
        let dropped = self.v_dropped;
        let fits = |s: &LowRank| {
            s.n == n && s.hw == hw && s.u.len() == n * s.r && (dropped || s.v.len() == s.r * hw)
        };
        if b != self.samples.len()
            || (n, h, w) != (self.n, self.h, self.w)
            || p0 + p > hw
            || (dropped && !self.projection)
            || !self.samples.iter().all(fits)
        {
            return Err(CoreError::Shape(format!(
                "residual slab: pixels {p0}..{} of an input of shape {:?} for factorisations of [{}, {}, {}, {}]",
                p0 + p,
                x.shape,
                self.samples.len(),
                self.n,
                self.h,
                self.w,
            )));
        }
        out.clear();
        out.resize(b * n * p, 0.0);
        if b * n * p == 0 {
            return Ok(());
        }
        out.par_chunks_mut(n * p)
            .zip(x.data.par_chunks(n * hw))
            .zip(self.samples.par_iter())
            .for_each(|((ob, xb), s)| {
                for (orow, xrow) in ob.chunks_exact_mut(p).zip(xb.chunks_exact(hw)) {
                    orow.copy_from_slice(&xrow[p0..p0 + p]);
                }
                if s.r == 0 {
                    return;
                }
                let negu: Vec<f32> = s.u.iter().map(|&v| -v).collect();
                let mut cols = Vec::new();
                let (v, ld, j0) = if dropped {
                    s.v_cols(xb, p0, p, &mut cols);
                    (&cols[..], p, 0)
                } else {
                    (&s.v[..], hw, p0)
                };
                sgemm_ld(
                    n,
                    p,
                    s.r,
                    Mat::rm(&negu, s.r),
                    Mat::rm_from(v, ld, j0),
                    ob,
                    p,
                    true,
                    1,
                );
            });
        Ok(())
    }

    /// x_t: [B, N, H, W] ← U_b V_b per sample (the trusted part X_T).
    pub fn reconstruct(&self, x_t: &mut Tensor) {
        let nhw = self.n * self.h * self.w;
        x_t.resize(&[self.samples.len(), self.n, self.h, self.w]);
        if nhw == 0 {
            return;
        }
        x_t.data
            .par_chunks_mut(nhw)
            .zip(self.samples.par_iter())
            .for_each(|(xb, s)| s.reconstruct(xb));
    }
}

/// An `Energy(e)` policy needs e in (0, 1].
fn check_energy(policy: RankPolicy) -> Result<()> {
    match policy {
        RankPolicy::Energy(e) if !(e > 0.0 && e <= 1.0) => Err(CoreError::Invalid(format!(
            "decompose: energy fraction {e} is not in (0, 1]"
        ))),
        _ => Ok(()),
    }
}

/// r clamped to [1, N] (0 when N = 0).
fn clamp_rank(r: usize, n: usize) -> usize {
    r.max(1).min(n)
}

/// x: [B, N, H, W] → `out` (U_b: N × r, V_b: r × H·W per sample, one r for the batch) and residual:
/// [B, N, H, W] = X − X_T per sample; returns r.
///
/// r by `policy`, clamped to [1, N]: `Fixed(r)`; `Schedule` → [`schedule_rank`]`(schedule_step)` (0 at the
/// first conv; the next conv index in VGG, the residual-block index in ResNet); `Energy(e)` → the largest
/// over the batch of the lightweight SVD's smallest r keeping ≥ e of ‖X_b‖² (cost ∝ r; ≥ the exact
/// spectrum's rank, see [`light_svd_energy`]), the other samples then extended to it; `Entropy` → the
/// largest ⌈2^μ⌉ over the batch from the exact spectra (cost O(N²·HW + N³) per sample). The lightweight SVD
/// runs `iters` rounds (1 or 2). Parallel over samples.
pub fn decompose_batch(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    iters: usize,
    out: &mut BatchLowRank,
    residual: &mut Tensor,
) -> Result<usize> {
    decompose_light(Batch::of(x)?, policy, schedule_step, iters, out, residual)
}

/// [`decompose_batch`] of a borrowed batch.
fn decompose_light(
    x: Batch<'_>,
    policy: RankPolicy,
    schedule_step: usize,
    iters: usize,
    out: &mut BatchLowRank,
    residual: &mut Tensor,
) -> Result<usize> {
    let [b, n, h, w] = x.shape;
    check_energy(policy)?;
    let (hw, nhw) = (h * w, n * h * w);
    residual.resize(&x.shape);
    out.n = n;
    out.h = h;
    out.w = w;
    out.samples.resize_with(b, LowRank::default);
    out.shared = false;
    let fixed = |r: usize| clamp_rank(r, n);
    let r = if nhw == 0 {
        // Nothing to decompose: zero components of the clamped rank.
        let r = match policy {
            RankPolicy::Fixed(r) => fixed(r),
            RankPolicy::Schedule => fixed(schedule_rank(schedule_step)),
            _ => fixed(1),
        };
        for s in &mut out.samples {
            svd::light_svd_into(&[], n, hw, r, iters, s, &mut []);
        }
        r
    } else {
        // r components of one sample, by the cheaper of the two routes (the same result).
        let one = |xb: &[f32], s: &mut LowRank, res: &mut [f32], r: usize| {
            if svd::gram_pays(n, hw, r) {
                svd::light_svd_gram_into(xb, n, hw, r, iters, s, res);
            } else {
                svd::light_svd_into(xb, n, hw, r, iters, s, res);
            }
        };
        // (sample's factorisation, its residual, its input) in parallel.
        macro_rules! samples {
            () => {
                out.samples
                    .par_iter_mut()
                    .zip(residual.data.par_chunks_mut(nhw))
                    .zip(x.data.par_chunks(nhw))
            };
        }
        match policy {
            RankPolicy::Fixed(_) | RankPolicy::Schedule => {
                let r = match policy {
                    RankPolicy::Fixed(r) => fixed(r),
                    _ => fixed(schedule_rank(schedule_step)),
                };
                samples!().for_each(|((s, res), xb)| one(xb, s, res, r));
                r
            }
            RankPolicy::Energy(e) => {
                let r = samples!()
                    .map(|((s, res), xb)| {
                        svd::light_svd_energy_into(xb, n, hw, all_of(e, n), iters, s, res)
                    })
                    .max()
                    .unwrap_or(1);
                let r = fixed(r);
                out.samples
                    .par_iter_mut()
                    .zip(residual.data.par_chunks_mut(nhw))
                    .for_each(|(s, res)| light_svd_extend(s, res, r, iters));
                r
            }
            RankPolicy::Entropy => {
                let r = x
                    .data
                    .par_chunks(nhw)
                    .map(|xb| entropy_rank(&singular_values(xb, n, hw)))
                    .max()
                    .unwrap_or(1);
                let r = fixed(r);
                samples!().for_each(|((s, res), xb)| one(xb, s, res, r));
                r
            }
        }
    };
    if r == n {
        // Full rank: X_T = X. What deflation left is only round-off, and round-off is a function of X:
        // send exact zeros instead (measured by `asymml privacy`: the round-off residual of a 3-channel
        // image carries about 1 % of I(X;X)).
        residual.data.iter_mut().for_each(|v| *v = 0.0);
    }
    out.samples.iter_mut().for_each(LowRank::release_scratch);
    out.r = r;
    Ok(r)
}

/// Floating-point operations of the lightweight SVD of B samples of N × HW at rank r with `iters` rounds:
/// the row norms (2·N·HW), then per component and round X·v and Xᵀ·u (4·N·HW), and the deflation with the
/// norms' refresh (4·N·HW).
pub fn light_svd_flops(b: usize, n: usize, hw: usize, r: usize, iters: usize) -> f64 {
    let nhw = (n * hw) as f64;
    b as f64 * (2.0 * nhw + r as f64 * (4.0 * iters.max(1) as f64 + 4.0) * nhw)
}

/// As [`decompose_batch`], but with one basis U (N × r) for the whole batch: the lightweight SVD of the
/// N × B·HW matrix [X_1 … X_B] (channels × every pixel of every sample), V_b its columns of sample b. The
/// trusted convolution then builds W' = Uᵀ·W once per batch instead of once per sample; the basis fits each
/// sample less well, so it keeps less energy at the same r. r by `policy` on the whole batch's matrix
/// (`Entropy`: ⌈2^μ⌉ of its exact spectrum).
pub fn decompose_batch_shared(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    iters: usize,
    out: &mut BatchLowRank,
    residual: &mut Tensor,
) -> Result<usize> {
    let (b, n, h, w) = x.nchw("decompose")?;
    let hw = h * w;
    if b * n * hw == 0 {
        out.shared = false;
        return decompose_batch(x, policy, schedule_step, iters, out, residual);
    }
    check_energy(policy)?;
    let bhw = b * hw;
    // [B, N, HW] → [N, B·HW]
    // The batch as one matrix, and its residual: scratch of this call only (two copies of X, let go at its
    // end rather than held by the layer until its next step).
    let mut all = vec![0f32; n * bhw];
    let mut lr = std::mem::take(&mut out.whole_lr);
    let mut res_all = vec![0f32; n * bhw];
    all.par_chunks_mut(bhw).enumerate().for_each(|(j, row)| {
        for s in 0..b {
            row[s * hw..(s + 1) * hw].copy_from_slice(&x.data[(s * n + j) * hw..][..hw]);
        }
    });
    // r, and whether the factorisation at that r is already made (the energy policy's extraction).
    let (r, made) = match policy {
        RankPolicy::Fixed(r) => (clamp_rank(r, n), false),
        RankPolicy::Schedule => (clamp_rank(schedule_rank(schedule_step), n), false),
        RankPolicy::Energy(e) => {
            let r = svd::light_svd_energy_into(
                &all,
                n,
                bhw,
                all_of(e, n),
                iters,
                &mut lr,
                &mut res_all,
            );
            (clamp_rank(r, n), clamp_rank(r, n) == lr.r)
        }
        RankPolicy::Entropy => (
            clamp_rank(entropy_rank(&singular_values(&all, n, bhw)), n),
            false,
        ),
    };
    if !made {
        svd::light_svd_into(&all, n, bhw, r, iters, &mut lr, &mut res_all);
    }
    out.n = n;
    out.h = h;
    out.w = w;
    out.r = r;
    out.shared = true;
    out.samples.resize_with(b, LowRank::default);
    for (s, sample) in out.samples.iter_mut().enumerate() {
        sample.n = n;
        sample.hw = hw;
        sample.r = r;
        sample.u.clear();
        sample.u.extend_from_slice(&lr.u);
        sample.v.resize(r * hw, 0.0);
        for j in 0..r {
            sample.v[j * hw..(j + 1) * hw].copy_from_slice(&lr.v[j * bhw + s * hw..][..hw]);
        }
    }
    residual.resize(&x.shape);
    if r == n {
        residual.data.iter_mut().for_each(|v| *v = 0.0);
    } else {
        residual
            .data
            .par_chunks_mut(n * hw)
            .enumerate()
            .for_each(|(s, rb)| {
                for j in 0..n {
                    rb[j * hw..(j + 1) * hw].copy_from_slice(&res_all[j * bhw + s * hw..][..hw]);
                }
            });
    }
    lr.release_scratch();
    out.whole_lr = lr;
    Ok(r)
}

/// [`decompose_batch`] with the SVD chosen by `method`: `Light { iters }` is exactly `decompose_batch` with
/// those rounds; `Block(m)` fills `out` and `residual` the same way (U_b: N × r with orthogonal columns
/// carrying the singular values, V_b: r × H·W with unit rows; residual = X − U_b V_b, exactly zero when
/// r = N, where U_b = I and V_b = X_b) by the block method of [`BlockSvd`], parallel over samples.
///
/// r by `policy` as in `decompose_batch`, but from the block method's spectrum: `Energy(e)` → the largest
/// over the batch of the smallest r whose Ritz values keep ≥ e of ‖X_b‖² (≥ the exact spectrum's
/// [`rank_for_energy`], equal when the Ritz values have converged — always for N ≤ 64, where the
/// eigendecomposition of X Xᵀ is exact); `Entropy` → the largest ⌈2^μ⌉ from the eigenvalues of the f32 Gram
/// matrix. One pass: the spectrum, then r, then U and V at that r (the basis is kept between the two).
pub fn decompose_batch_with(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
    residual: &mut Tensor,
) -> Result<usize> {
    decompose_batch_within(x, policy, schedule_step, method, out, residual, usize::MAX)
}

/// [`decompose_batch_with`] whose energy policy holds at most `max_scratch_bytes` of the batch's scratch from
/// the samples' ranks to their factors (a sample over its share keeps only its basis, and at least its own
/// rank of it: see [`decompose_factors_lean_with`]).
pub fn decompose_batch_within(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
    residual: &mut Tensor,
    max_scratch_bytes: usize,
) -> Result<usize> {
    decompose_block(
        Batch::of(x)?,
        policy,
        schedule_step,
        method,
        out,
        Some(residual),
        max_scratch_bytes,
    )
}

/// [`decompose_batch_with`] without the residual: `out` gets the factorisations and r, and X_U is made later,
/// a slab of pixels at a time, by [`BatchLowRank::residual_slab`] (the split writes it straight into the
/// frame that carries it).
pub fn decompose_factors_with(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
) -> Result<usize> {
    decompose_factors_lean_with(x, policy, schedule_step, method, out, usize::MAX)
}

/// [`decompose_factors_with`] that lets each sample's V go as soon as its factors are made, when the batch's V
/// (4·r·B·H·W bytes at the rank chosen) would exceed `max_v_bytes` and V can be made again from X (the block
/// method): the batch's V is then never held at once, and `out` says so ([`BatchLowRank::has_v`]).
/// [`BatchLowRank::residual_slab`] and [`TrustedConv::forward_from`] make the V they need from X as they go.
/// An energy policy's samples, which each hold their scratch from the rank to the factors, keep only their
/// basis there where their products would pass the same budget (V is then made by one product more).
pub fn decompose_factors_lean_with(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
    max_v_bytes: usize,
) -> Result<usize> {
    decompose_block(
        Batch::of(x)?,
        policy,
        schedule_step,
        method,
        out,
        None,
        max_v_bytes,
    )
}

/// [`decompose_batch_with`] of samples `samples` of x ([B, N, H, W]) only: `out` and `residual` then hold
/// those samples' factorisations and residual ([len, N, H, W]), r chosen by the policy over them alone (a
/// micro-batch of a pipelined forward).
pub fn decompose_samples_with(
    x: &Tensor,
    samples: Range<usize>,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
    residual: &mut Tensor,
) -> Result<usize> {
    let part = Batch::samples(x, samples)?;
    decompose_block(
        part,
        policy,
        schedule_step,
        method,
        out,
        Some(residual),
        usize::MAX,
    )
}

/// [`decompose_batch_with`] of a borrowed batch (without `residual`, the block method makes none; the light
/// one makes it in scratch). Without `residual`, the block method lets each sample's V go once its factors
/// are made where the batch's would exceed `max_v_bytes` ([`decompose_factors_lean_with`]).
fn decompose_block(
    x: Batch<'_>,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
    residual: Option<&mut Tensor>,
    max_v_bytes: usize,
) -> Result<usize> {
    (out.projection, out.v_dropped) = (false, false);
    let mut scratch = Tensor::default();
    let [b, n, h, w] = x.shape;
    let (hw, nhw) = (h * w, n * h * w);
    let m = match method {
        SvdMethod::Block(m) if b * nhw > 0 => m,
        SvdMethod::Light { iters } => {
            let res = residual.unwrap_or(&mut scratch);
            return decompose_light(x, policy, schedule_step, iters, out, res);
        }
        SvdMethod::Block(_) => {
            // Nothing to decompose: the light path's zero components of the clamped rank.
            check_energy(policy)?;
            let res = residual.unwrap_or(&mut scratch);
            return decompose_light(x, policy, schedule_step, 1, out, res);
        }
    };
    check_energy(policy)?;
    out.projection = true;
    // Without a residual, each sample's part of it is an empty slice.
    let has_residual = residual.is_some();
    let mut res_parts: Vec<&mut [f32]> = match residual {
        Some(res) => {
            res.resize(&x.shape);
            res.data.chunks_mut(nhw).collect()
        }
        None => (0..b).map(|_| &mut [][..]).collect(),
    };
    out.n = n;
    out.h = h;
    out.w = w;
    out.samples.resize_with(b, LowRank::default);
    out.shared = false;
    macro_rules! samples {
        () => {
            out.samples
                .par_iter_mut()
                .zip(res_parts.par_iter_mut())
                .zip(x.data.par_chunks(nhw))
        };
    }
    let fixed = |r: usize| clamp_rank(r, n);
    let r = match policy {
        RankPolicy::Fixed(r) => fixed(r),
        RankPolicy::Schedule => fixed(schedule_rank(schedule_step)),
        RankPolicy::Energy(e) => fixed(
            samples!()
                .map(|((s, _), xb)| {
                    s.blk.start(&[xb], n);
                    let r = block::energy_rank(&[xb], n, hw, e, &m, &mut s.blk, 1);
                    // (Every sample's scratch is held until the factors: within its share of the budget.)
                    s.blk.keep_basis_within(max_v_bytes / b.max(1), r);
                    r
                })
                .max()
                .unwrap_or(1),
        ),
        RankPolicy::Entropy => fixed(
            samples!()
                .map(|((s, _), xb)| {
                    s.blk.start(&[xb], n);
                    block::entropy_rank(&[xb], n, hw, &mut s.blk, 1)
                })
                .max()
                .unwrap_or(1),
        ),
    };
    let spectrum_done = matches!(policy, RankPolicy::Energy(_) | RankPolicy::Entropy);
    let lean = !has_residual && (4 * r).saturating_mul(b * hw) > max_v_bytes;
    samples!().for_each(|((s, res), xb)| {
        let res: &mut [f32] = res;
        let xs = [xb];
        (s.n, s.hw, s.r) = (n, hw, r);
        if r == n {
            block::identity(&xs, n, &mut s.u, &mut [(&mut s.v, res)]);
            s.release_scratch();
            if lean {
                s.v = Vec::new();
            }
            return;
        }
        if spectrum_done {
            block::ensure_rank(&xs, n, hw, r, &m, &mut s.blk, 1);
        } else {
            s.blk.start(&xs, n);
            block::basis_for_rank(&xs, n, hw, r, &m, &mut s.blk, 1);
        }
        block::finish(
            &xs,
            n,
            hw,
            r,
            &mut s.blk,
            &mut s.u,
            &mut [(&mut s.v, res)],
            1,
        );
        s.release_scratch();
        if lean {
            s.v = Vec::new();
        }
    });
    out.r = r;
    out.v_dropped = lean;
    Ok(r)
}

/// [`decompose_batch_shared`] with the SVD chosen by `method` (see [`decompose_batch_with`]): `Block(m)` finds
/// one basis for the N × B·HW matrix [X_1 … X_B] without copying it (its Gram matrix is Σ_b X_b X_bᵀ), the
/// matrix products spread over the rayon pool. With `Block`, an energy policy's rank keeps ≥ E of every
/// sample's own energy, not only of the batch's (`block::each_energy_rank`): no sample keeps less in the
/// trusted runtime than its own basis would keep at the policy's energy. (`Light` keeps the batch's.)
pub fn decompose_batch_shared_with(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
    residual: &mut Tensor,
) -> Result<usize> {
    decompose_shared(x, policy, schedule_step, method, out, Some(residual))
}

/// [`decompose_batch_shared_with`] without X_U (the factors only: the block method makes no residual, the
/// light one makes it in scratch); X_U is then made from the factors a slab at a time
/// ([`BatchLowRank::residual_slab`]).
pub fn decompose_shared_factors_with(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
) -> Result<usize> {
    decompose_shared(x, policy, schedule_step, method, out, None)
}

fn decompose_shared(
    x: &Tensor,
    policy: RankPolicy,
    schedule_step: usize,
    method: SvdMethod,
    out: &mut BatchLowRank,
    residual: Option<&mut Tensor>,
) -> Result<usize> {
    (out.projection, out.v_dropped) = (false, false);
    let mut scratch = Tensor::default();
    let m = match method {
        SvdMethod::Light { iters } => {
            let res = residual.unwrap_or(&mut scratch);
            return decompose_batch_shared(x, policy, schedule_step, iters, out, res);
        }
        SvdMethod::Block(m) => m,
    };
    let (b, n, h, w) = x.nchw("decompose")?;
    let (hw, nhw) = (h * w, n * h * w);
    if b * nhw == 0 {
        out.shared = false;
        let res = residual.unwrap_or(&mut scratch);
        return decompose_batch(x, policy, schedule_step, 1, out, res);
    }
    out.projection = true;
    check_energy(policy)?;
    let threads = rayon::current_num_threads();
    let xs: Vec<&[f32]> = x.data.chunks(nhw).collect();
    let mut lr = std::mem::take(&mut out.whole_lr);
    lr.blk.start(&xs, n);
    let fixed = |r: usize| clamp_rank(r, n);
    let r = match policy {
        RankPolicy::Fixed(r) => fixed(r),
        RankPolicy::Schedule => fixed(schedule_rank(schedule_step)),
        RankPolicy::Energy(e) => {
            let batch = fixed(block::energy_rank(&xs, n, hw, e, &m, &mut lr.blk, threads));
            fixed(block::each_energy_rank(
                &xs,
                n,
                hw,
                e,
                batch,
                &m,
                &mut lr.blk,
                threads,
            ))
        }
        RankPolicy::Entropy => fixed(block::entropy_rank(&xs, n, hw, &mut lr.blk, threads)),
    };
    let mut no_residual: Vec<f32> = Vec::new();
    let residual: &mut [f32] = match residual {
        Some(t) => {
            t.resize(&x.shape);
            &mut t.data
        }
        None => &mut no_residual,
    };
    out.n = n;
    out.h = h;
    out.w = w;
    out.r = r;
    out.shared = true;
    out.samples.resize_with(b, LowRank::default);
    {
        let mut parts: Vec<(&mut Vec<f32>, &mut [f32])> = out
            .samples
            .iter_mut()
            .zip(
                residual
                    .chunks_mut(nhw)
                    .chain(std::iter::repeat_with(|| &mut [][..])),
            )
            .map(|(s, res)| (&mut s.v, res))
            .collect();
        if r == n {
            block::identity(&xs, n, &mut lr.u, &mut parts);
        } else {
            block::ensure_rank(&xs, n, hw, r, &m, &mut lr.blk, threads);
            block::finish(&xs, n, hw, r, &mut lr.blk, &mut lr.u, &mut parts, threads);
        }
        lr.release_scratch();
    }
    for s in &mut out.samples {
        (s.n, s.hw, s.r) = (n, hw, r);
        s.u.clear();
        s.u.extend_from_slice(&lr.u);
    }
    (lr.n, lr.hw, lr.r) = (n, b * hw, r);
    out.whole_lr = lr;
    Ok(r)
}

/// RMS √(Σ x² / len) of a slice, accumulated in f64 (0 for an empty one).
pub fn rms(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    (svd::sumsq(x) / x.len() as f64).sqrt() as f32
}

/// x_u: one sample's residual (N·H·W values) ← x_u + n, n ~ N(0, (nsr · rms_of_x)²) elementwise, where
/// `rms_of_x` is the RMS of that sample's layer input X (not of X_U). Draws nothing when the standard
/// deviation is 0 (or not finite).
pub fn add_noise(x_u: &mut [f32], nsr: f32, rms_of_x: f32, rng: &mut Rng) {
    let std = nsr * rms_of_x;
    if !(std > 0.0 && std.is_finite()) {
        return;
    }
    x_u.iter_mut().for_each(|v| *v += std * rng.normal());
}

/// x: [B, ...] (the layer input), x_u: the same shape (its residual) ← x_u + noise, per sample with that
/// sample's rms(X), as [`add_noise`].
pub fn add_noise_batch(x: &Tensor, x_u: &mut Tensor, nsr: f32, rng: &mut Rng) -> Result<()> {
    if x.shape != x_u.shape || x.shape.is_empty() {
        return Err(CoreError::Shape(format!(
            "noise: residual shape {:?} differs from the input's {:?}",
            x_u.shape, x.shape
        )));
    }
    add_noise_samples(&x.data, x_u, nsr, rng)
}

/// [`add_noise_batch`] with the layer input's samples given as values: `x` holds as many values as x_u, in
/// the same layout (the samples of a micro-batch).
pub fn add_noise_samples(x: &[f32], x_u: &mut Tensor, nsr: f32, rng: &mut Rng) -> Result<()> {
    if x.len() != x_u.len() || x_u.shape.is_empty() {
        return Err(CoreError::Shape(format!(
            "noise: a residual of shape {:?} for {} input values",
            x_u.shape,
            x.len()
        )));
    }
    let per = x.len() / x_u.shape[0].max(1);
    if per == 0 {
        return Ok(());
    }
    for (xb, ub) in x.chunks(per).zip(x_u.data.chunks_mut(per)) {
        add_noise(ub, nsr, rms(xb), rng);
    }
    Ok(())
}
