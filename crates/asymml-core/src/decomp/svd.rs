//! The lightweight SVD of the AsymML paper (Algorithm 1): a few rounds of alternating least squares per
//! component from a warm start, then deflation. Cost O(r·N·HW) for r components of an N × HW matrix.

use crate::gemm::{sgemm, Mat};

/// A rank-r factorisation X_T = U · V of one sample's N × HW matrix (channels × pixels).
///
/// `u` is N × r row-major (column j = u_j, which carries the scale), `v` is r × HW row-major (row j = v_j).
/// The private fields are scratch reused across calls.
#[derive(Clone, Debug, Default)]
pub struct LowRank {
    pub n: usize,
    pub hw: usize,
    pub r: usize,
    pub u: Vec<f32>,
    pub v: Vec<f32>,
    /// Uᵀ (r × N row-major, row j = u_j), the layout the extraction appends to.
    ut: Vec<f32>,
    /// Squared norms of the residual's rows (the warm-start candidates and the residual energy).
    norms: Vec<f64>,
    /// Gram route ([`gram_start`]): the residual's Gram matrix R Rᵀ (N × N), the rows a_j (r × N) with
    /// v_j = Xᵀ a_j, and scratch.
    gram: Vec<f64>,
    coef: Vec<f64>,
    g32: Vec<f32>,
    gw: Vec<f64>,
    w: Vec<f64>,
    /// Scratch of the block method (`super::block`).
    pub(crate) blk: super::block::BlockScratch,
}

impl LowRank {
    /// v [r × HW] ← V made again from xb, the very N × HW matrix a block decomposition factorised: Uᵀ xb
    /// with row j divided by ‖u_j‖² (0 where u_j is zero), the decomposition's V up to f32 rounding (U's
    /// columns are orthogonal; see [`super::BatchLowRank::restore_v`]).
    pub(crate) fn v_from(&self, xb: &[f32], v: &mut Vec<f32>) {
        self.v_cols(xb, 0, self.hw, v);
    }

    /// v [r × P] ← columns `p0 .. p0 + P` of the V that [`LowRank::v_from`] makes (from those columns of xb).
    pub(crate) fn v_cols(&self, xb: &[f32], p0: usize, p: usize, v: &mut Vec<f32>) {
        let (n, r, hw) = (self.n, self.r, self.hw);
        v.clear();
        v.resize(r * p, 0.0);
        if r * p == 0 {
            return;
        }
        sgemm(
            r,
            p,
            n,
            Mat::rm_t(&self.u, r),
            Mat::rm_from(xb, hw, p0),
            v,
            false,
            1,
        );
        for (j, row) in v.chunks_exact_mut(p).enumerate() {
            let nn: f64 = (0..n).map(|i| (self.u[i * r + j] as f64).powi(2)).sum();
            let inv = if nn > 0.0 && (1.0 / nn).is_finite() {
                (1.0 / nn) as f32
            } else {
                0.0
            };
            row.iter_mut().for_each(|a| *a *= inv);
        }
    }

    /// An empty factorisation (r = 0) of an N × HW matrix.
    pub fn new(n: usize, hw: usize) -> Self {
        LowRank {
            n,
            hw,
            ..Default::default()
        }
    }

    /// Resets to r = 0 for an N × HW matrix, keeping the allocations.
    fn reset(&mut self, n: usize, hw: usize) {
        self.n = n;
        self.hw = hw;
        self.r = 0;
        self.u.clear();
        self.v.clear();
        self.ut.clear();
    }

    /// Lets go of the scratch of the decomposition that made these factors (the Gram route's N × N matrices,
    /// the block method's basis and products), keeping U and V: a layer's factorisation then holds no
    /// O(N²) scratch per sample until its next step. The next decomposition regrows it.
    pub(crate) fn release_scratch(&mut self) {
        self.gram = Vec::new();
        self.coef = Vec::new();
        self.g32 = Vec::new();
        self.gw = Vec::new();
        self.w = Vec::new();
        self.blk.release();
    }

    /// Bytes of decomposition scratch held (see [`LowRank::release_scratch`]).
    pub fn scratch_bytes(&self) -> usize {
        8 * (self.gram.capacity() + self.coef.capacity() + self.gw.capacity() + self.w.capacity())
            + 4 * self.g32.capacity()
            + self.blk.bytes()
    }

    /// Writes `u` (N × r) from `ut` (r × N).
    fn finish(&mut self) {
        let (n, r) = (self.n, self.r);
        self.u.clear();
        self.u.resize(n * r, 0.0);
        for (j, uj) in self.ut.chunks_exact(n.max(1)).take(r).enumerate() {
            for (i, &x) in uj.iter().enumerate() {
                self.u[i * r + j] = x;
            }
        }
    }

    /// out: N × HW ← U · V (the trusted part X_T).
    pub fn reconstruct(&self, out: &mut [f32]) {
        let (n, hw, r) = (self.n, self.hw, self.r);
        assert!(out.len() >= n * hw, "reconstruct: output too small");
        crate::gemm::sgemm(
            n,
            hw,
            r,
            crate::gemm::Mat::rm(&self.u, r),
            crate::gemm::Mat::rm(&self.v, hw),
            out,
            false,
            1,
        );
    }

    /// Energy ‖U V‖² of the factorisation, as Σ_j ‖u_j‖²‖v_j‖² (exact here because the columns of U are
    /// orthogonal: each component is the projection of the then residual onto u_j).
    pub fn energy(&self) -> f64 {
        (0..self.r)
            .map(|j| {
                let uj: f64 = (0..self.n)
                    .map(|i| (self.u[i * self.r + j] as f64).powi(2))
                    .sum();
                uj * sumsq(&self.v[j * self.hw..(j + 1) * self.hw])
            })
            .sum()
    }
}

// Vector kernels. The crate is built for baseline x86-64 (SSE2), so on x86-64 each kernel is compiled a
// second time with AVX2 enabled and picked at run time; elsewhere the portable loop runs.

/// Σ a_i b_i in f64 (eight independent accumulators, so the loop vectorises).
#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f64 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum();
    let mut acc = [0f64; 8];
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// y += alpha · x.
#[inline(always)]
fn axpy_impl(y: &mut [f32], alpha: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += alpha * x);
}

/// y −= alpha · x, then Σ y² in f64.
#[inline(always)]
fn deflate_impl(y: &mut [f32], alpha: f32, x: &[f32]) -> f64 {
    axpy_impl(y, -alpha, x);
    dot_impl(y, y)
}

/// The portable loops compiled with AVX2. Safe functions with a target feature: calling one is unsafe unless
/// the caller has checked the CPU for AVX2 (`super::avx2()`); their bodies assume nothing else.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f64 {
        super::dot_impl(a, b)
    }
    #[target_feature(enable = "avx2")]
    pub(super) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        super::axpy_impl(y, alpha, x)
    }
    #[target_feature(enable = "avx2")]
    pub(super) fn deflate(y: &mut [f32], alpha: f32, x: &[f32]) -> f64 {
        super::deflate_impl(y, alpha, x)
    }
}

/// True when the AVX2 kernels may run (the detection is cached by std).
#[inline]
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Σ a_i b_i, accumulated in f64.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: `avx2::dot` needs only the AVX2 feature, which `avx2()` just detected on this CPU.
        return unsafe { avx2::dot(a, b) };
    }
    dot_impl(a, b)
}

/// Σ a_i², accumulated in f64.
pub(crate) fn sumsq(a: &[f32]) -> f64 {
    dot(a, a)
}

/// y += alpha · x.
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: `avx2::axpy` needs only the AVX2 feature, which `avx2()` just detected on this CPU.
        return unsafe { avx2::axpy(y, alpha, x) };
    }
    axpy_impl(y, alpha, x)
}

/// y −= alpha · x, returning Σ y² (f64): one deflation step of a row and its new squared norm.
fn deflate(y: &mut [f32], alpha: f32, x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: `avx2::deflate` needs only the AVX2 feature, which `avx2()` just detected on this CPU.
        return unsafe { avx2::deflate(y, alpha, x) };
    }
    deflate_impl(y, alpha, x)
}

/// Lightweight SVD of one sample. x: N × HW (row-major, one NCHW image) → `out` with r = min(r, N)
/// components (U: N × r, V: r × HW) and `residual` = X_U = X − U V, exactly what remains after deflation.
///
/// For each component: the warm start is v = the row (channel) of the residual with the largest norm — a
/// deterministic choice that lies in the row space, so the first `u = X v / ‖v‖²` already has u_i = 1 at
/// that row; then `iters` rounds (at least 1; the paper uses 1–2) of `u = X v / ‖v‖²`, `v = Xᵀ u / ‖u‖²`;
/// then deflation `X ← X − u vᵀ`. Since the last v is the least-squares fit for u, every component is the
/// projection of the residual onto u: the columns of U are orthogonal and ‖X‖² = ‖U V‖² + ‖X_U‖².
/// A residual that is zero (or underflows) gives zero components and leaves X_U unchanged: never NaN.
///
/// Accuracy: the power iteration converges like (s_2/s_1)^(4·iters), so with a small spectral gap a warm-start
/// row with little weight on the top singular vector is not corrected in 1–2 rounds. On random matrices with
/// singular values 0.7^i, 2 rounds keep ≥ 99 % of the exact top-r energy for the median matrix at r = 1…8,
/// but the worst of 300 keeps only ~50 % at r = 1 and ~88 % at r = 2 (tests/decomp.rs, `energy_table`).
/// The split is exact regardless; only how much energy stays trusted depends on it.
/// Panics if `x.len() != n·hw`.
pub fn light_svd(
    x: &[f32],
    n: usize,
    hw: usize,
    r: usize,
    iters: usize,
    out: &mut LowRank,
    residual: &mut Vec<f32>,
) {
    residual.resize(x.len(), 0.0);
    light_svd_into(x, n, hw, r, iters, out, residual);
}

/// [`light_svd`] into a residual slice of N·HW values.
pub(crate) fn light_svd_into(
    x: &[f32],
    n: usize,
    hw: usize,
    r: usize,
    iters: usize,
    out: &mut LowRank,
    residual: &mut [f32],
) {
    start(x, n, hw, out, residual);
    extract(residual, iters, out, r.min(n), None);
    out.finish();
}

/// As [`light_svd`], but extracts components until the kept energy ‖U V‖² reaches `e`·‖X‖² (measured as
/// ‖X‖² − ‖X_U‖², both in f64) or r = min(max_r, N); at least one component when N ≥ 1. Returns r.
///
/// This is the lightweight SVD's energy, not the exact spectrum's: by Ky Fan's theorem a rank-r projection
/// keeps at most the exact top-r energy, so the r found here is ≥ the exact `rank_for_energy`; in
/// tests/decomp.rs (spectra 0.7^i and 0.9^i, E = 0.5…0.97) it is larger by at most one, with 1 or 2 rounds.
pub fn light_svd_energy(
    x: &[f32],
    n: usize,
    hw: usize,
    stop: EnergyStop,
    iters: usize,
    out: &mut LowRank,
    residual: &mut Vec<f32>,
) -> usize {
    residual.resize(x.len(), 0.0);
    light_svd_energy_into(x, n, hw, stop, iters, out, residual)
}

/// When [`light_svd_energy`] stops: once the kept energy reaches `fraction` of ‖X‖², or at `max_rank`
/// components.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EnergyStop {
    /// The fraction of ‖X‖² to keep, in (0, 1].
    pub fraction: f64,
    /// The most components to extract (clamped to [1, N]).
    pub max_rank: usize,
}

/// [`light_svd_energy`] into a residual slice of N·HW values.
pub(crate) fn light_svd_energy_into(
    x: &[f32],
    n: usize,
    hw: usize,
    stop: EnergyStop,
    iters: usize,
    out: &mut LowRank,
    residual: &mut [f32],
) -> usize {
    let EnergyStop {
        fraction: e,
        max_rank: max_r,
    } = stop;
    start(x, n, hw, out, residual);
    let total: f64 = out.norms.iter().sum();
    let stop = total - e * total;
    let r_max = max_r.clamp(1, n.max(1)).min(n);
    extract(residual, iters, out, r_max, Some(stop));
    out.finish();
    out.r
}

/// Extends a factorisation made by [`light_svd`] / [`light_svd_energy`] (and its residual) to
/// r = min(r, N) components, continuing the same deflation: the result is what `light_svd` with the larger r
/// would have given. Does nothing if `out.r >= r`. Panics if `residual.len() != out.n·out.hw`.
pub fn light_svd_extend(out: &mut LowRank, residual: &mut [f32], r: usize, iters: usize) {
    let (n, hw) = (out.n, out.hw);
    assert_eq!(residual.len(), n * hw, "light_svd_extend: residual size");
    let r = r.min(n);
    if out.r >= r {
        return;
    }
    // Rebuild the scratch from the public fields (they may have been changed by the caller).
    out.ut.clear();
    out.ut.resize(out.r * n, 0.0);
    for i in 0..n {
        for j in 0..out.r {
            out.ut[j * n + i] = out.u[i * out.r + j];
        }
    }
    out.v.truncate(out.r * hw);
    out.norms.clear();
    out.norms
        .extend(residual.chunks_exact(hw.max(1)).take(n).map(sumsq));
    out.norms.resize(n, 0.0);
    extract(residual, iters, out, r, None);
    out.finish();
}

/// Copies x into the residual and computes its row norms; r = 0.
fn start(x: &[f32], n: usize, hw: usize, out: &mut LowRank, residual: &mut [f32]) {
    assert_eq!(
        x.len(),
        n * hw,
        "light_svd: x has {} values, not {n}×{hw}",
        x.len()
    );
    assert_eq!(residual.len(), n * hw, "light_svd: residual size");
    out.reset(n, hw);
    residual.copy_from_slice(x);
    out.norms.clear();
    out.norms
        .extend(x.chunks_exact(hw.max(1)).take(n).map(sumsq));
    out.norms.resize(n, 0.0);
}

/// Appends components to `out.ut` / `out.v` (deflating `res` and refreshing `out.norms`) until r = `r_max`,
/// or, with `stop = Some(t)`, until r ≥ 1 and the residual energy is ≤ t.
fn extract(res: &mut [f32], iters: usize, out: &mut LowRank, r_max: usize, stop: Option<f64>) {
    let (n, hw) = (out.n, out.hw);
    while out.r < r_max {
        if let Some(t) = stop {
            if out.r >= 1 && out.norms.iter().sum::<f64>() <= t {
                break;
            }
        }
        let j = out.r;
        out.ut.resize((j + 1) * n, 0.0);
        out.v.resize((j + 1) * hw, 0.0);
        let uj = &mut out.ut[j * n..];
        let vj = &mut out.v[j * hw..];
        if !component(res, n, hw, iters.max(1), &out.norms, uj, vj) {
            uj.fill(0.0);
            vj.fill(0.0);
        } else {
            // Deflate X ← X − u vᵀ and refresh the row norms.
            for ((row, &ui), nrm) in res.chunks_exact_mut(hw).zip(uj.iter()).zip(&mut out.norms) {
                if ui != 0.0 {
                    *nrm = deflate(row, ui, vj);
                }
            }
        }
        out.r += 1;
    }
}

/// One component (u: N, v: HW) of the residual `res` (N × HW) with row norms `norms`; false if it is zero.
fn component(
    res: &[f32],
    n: usize,
    hw: usize,
    iters: usize,
    norms: &[f64],
    u: &mut [f32],
    v: &mut [f32],
) -> bool {
    // Warm start: the row of largest norm (the first one on ties).
    let (mut best, mut vv) = (0, 0.0f64);
    for (i, &nrm) in norms.iter().enumerate() {
        if nrm > vv {
            (best, vv) = (i, nrm);
        }
    }
    if !(vv > 0.0 && vv.is_finite()) || hw == 0 || n == 0 {
        return false;
    }
    v.copy_from_slice(&res[best * hw..(best + 1) * hw]);
    for _ in 0..iters {
        // u = X v / ‖v‖²
        for (ui, row) in u.iter_mut().zip(res.chunks_exact(hw)) {
            *ui = (dot(row, v) / vv) as f32;
        }
        let uu = sumsq(u);
        if !(uu > 0.0 && uu.is_finite()) {
            return false;
        }
        // v = Xᵀ u / ‖u‖²
        v.fill(0.0);
        for (&ui, row) in u.iter().zip(res.chunks_exact(hw)) {
            if ui != 0.0 {
                axpy(v, (ui as f64 / uu) as f32, row);
            }
        }
        vv = sumsq(v);
        if !(vv > 0.0 && vv.is_finite()) {
            return false;
        }
    }
    true
}

// The Gram route: the same algorithm carried out on the N × N Gram matrix instead of the N × HW matrix.
//
// Every v the algorithm forms lies in the row space of the current residual R: the warm start is a row of R
// (v = Rᵀ e_c) and each v = Rᵀ u / ‖u‖² = Rᵀ w. So with G = R Rᵀ, u = R v / ‖v‖² = G w / ‖v‖² and
// ‖v‖² = wᵀ G w; the deflation R ← R − u vᵀ becomes the rank-2 update
// G ← G − (G w) uᵀ − u (G w)ᵀ + ‖v‖² u uᵀ, and the row norms are its diagonal. Since R_j = X − Σ_{k<j} u_k v_kᵀ,
// v_j = R_jᵀ w = Xᵀ a_j with a_j = w − Σ_{k<j} a_k (u_kᵀ w). X is read three times (G = X Xᵀ, V = A X,
// X_U = X − U V), all as matrix products, instead of about four times per component as vector operations;
// the components cost O(N²) each. In exact arithmetic the result is the deflation route's; in floating point
// the components holding more than ~1e-4 of the energy agree to ~1e-3 (G is accumulated in f32, so far
// smaller ones are resolved less precisely). X_U = X − U V is formed explicitly, so the split stays exact.

/// True when the Gram route is the cheaper way to extract `r` components of an N × HW matrix. Measured per
/// sample on one core of the development machine (random data, one round): the deflation route reads X about
/// four times per component, fast while X stays in cache (N = 256, HW = 3136, r = 32: 10.9 ms, the same as
/// the Gram route) and slower once it does not (N = 128, HW = 12544: r = 16, 14.7 against 8.8 ms; r = 8,
/// 7.6 against 6.6 ms; but N = 64, HW = 50176, r = 2: 9.6 against 12.3 ms). G costs N²·HW multiply-adds
/// whatever r is, so large ranks (r ≥ N/4) always go the Gram way; N ≤ HW/4 keeps the O(r·N²) component
/// work small next to the products.
pub(crate) fn gram_pays(n: usize, hw: usize, r: usize) -> bool {
    let out_of_cache = n * hw * 4 > 4 << 20;
    4 * n <= hw && (4 * r >= n || (out_of_cache && n <= 16 * r))
}

/// Starts the Gram route on x (N × HW): G = X Xᵀ (accumulated in f32 by the matrix product, kept in f64),
/// the row norms its diagonal; r = 0.
fn gram_start(x: &[f32], n: usize, hw: usize, out: &mut LowRank) {
    assert_eq!(
        x.len(),
        n * hw,
        "light_svd: x has {} values, not {n}×{hw}",
        x.len()
    );
    out.reset(n, hw);
    out.coef.clear();
    out.g32.resize(n * n, 0.0);
    crate::gemm::sgemm(
        n,
        n,
        hw,
        crate::gemm::Mat::rm(x, hw),
        crate::gemm::Mat::rm_t(x, hw),
        &mut out.g32,
        false,
        1,
    );
    out.gram.clear();
    out.gram.extend(out.g32.iter().map(|&v| v as f64));
    out.norms.clear();
    out.norms
        .extend((0..n).map(|i| out.gram[i * n + i].max(0.0)));
}

/// As `extract` without a stop, on the Gram matrix: appends components until r = `r_max`. (The energy
/// policies stay on the deflation route: on real images their ranks are small, where it is cheaper.)
fn gram_extract(out: &mut LowRank, iters: usize, r_max: usize) {
    let n = out.n;
    while out.r < r_max {
        let j = out.r;
        out.ut.resize((j + 1) * n, 0.0);
        out.coef.resize((j + 1) * n, 0.0);
        out.gw.resize(n, 0.0);
        out.w.resize(n, 0.0);
        if let Some(vv) = gram_component(out, iters.max(1)) {
            let (g, gw, w) = (&mut out.gram, &out.gw, &out.w);
            let u = &out.ut[j * n..(j + 1) * n];
            // a_j = w − Σ_{k<j} a_k (u_kᵀ w)
            let (prev, aj) = out.coef.split_at_mut(j * n);
            aj.copy_from_slice(w);
            for (ak, uk) in prev.chunks_exact(n).zip(out.ut.chunks_exact(n)) {
                let c: f64 = uk.iter().zip(w).map(|(&a, &b)| a as f64 * b).sum();
                aj.iter_mut().zip(ak).for_each(|(a, &b)| *a -= c * b);
            }
            // G ← G − gw uᵀ − u gwᵀ + vv u uᵀ
            for (i, row) in g.chunks_exact_mut(n).enumerate() {
                let (ui, gi) = (u[i] as f64, gw[i]);
                for ((gv, &uk), &gk) in row.iter_mut().zip(u).zip(gw) {
                    let uk = uk as f64;
                    *gv += -gi * uk - ui * gk + vv * ui * uk;
                }
            }
            for (i, nrm) in out.norms.iter_mut().enumerate() {
                *nrm = g[i * n + i].max(0.0);
            }
        } else {
            out.ut[j * n..].fill(0.0);
            out.coef[j * n..].fill(0.0);
        }
        out.r += 1;
    }
}

/// One component on the Gram matrix: writes u_j (f32) into `out.ut`, and leaves w (v = Rᵀ w) in `out.w`
/// and G w in `out.gw`; returns ‖v‖², or None if the component is zero.
fn gram_component(out: &mut LowRank, iters: usize) -> Option<f64> {
    let n = out.n;
    let (mut best, mut vv) = (0, 0.0f64);
    for (i, &nrm) in out.norms.iter().enumerate() {
        if nrm > vv {
            (best, vv) = (i, nrm);
        }
    }
    if !(vv > 0.0 && vv.is_finite()) || out.hw == 0 || n == 0 {
        return None;
    }
    let g = &out.gram;
    // w = e_best: v = row `best` of R, and G w = column `best` of G.
    out.w.fill(0.0);
    out.w[best] = 1.0;
    for (gw, row) in out.gw.iter_mut().zip(g.chunks_exact(n)) {
        *gw = row[best];
    }
    let j = out.r;
    for _ in 0..iters {
        // u = R v / ‖v‖² = G w / ‖v‖²
        let u = &mut out.ut[j * n..(j + 1) * n];
        u.iter_mut()
            .zip(&out.gw)
            .for_each(|(u, &gw)| *u = (gw / vv) as f32);
        let uu: f64 = u.iter().map(|&v| v as f64 * v as f64).sum();
        if !(uu > 0.0 && uu.is_finite()) {
            return None;
        }
        // v = Rᵀ u / ‖u‖²: w = u / ‖u‖², ‖v‖² = wᵀ G w
        out.w
            .iter_mut()
            .zip(u.iter())
            .for_each(|(w, &u)| *w = u as f64 / uu);
        for (gw, row) in out.gw.iter_mut().zip(g.chunks_exact(n)) {
            *gw = row.iter().zip(&out.w).map(|(&a, &b)| a * b).sum();
        }
        vv = out.w.iter().zip(&out.gw).map(|(&a, &b)| a * b).sum();
        if !(vv > 0.0 && vv.is_finite()) {
            return None;
        }
    }
    Some(vv)
}

/// Ends the Gram route: V = A X, the residual X_U = X − U V, and U from Uᵀ.
fn gram_finish(x: &[f32], out: &mut LowRank, residual: &mut [f32]) {
    let (n, hw, r) = (out.n, out.hw, out.r);
    assert_eq!(residual.len(), n * hw, "light_svd: residual size");
    out.finish();
    out.g32.clear();
    out.g32.extend(out.coef.iter().map(|&v| v as f32));
    out.v.resize(r * hw, 0.0);
    use crate::gemm::{sgemm, Mat};
    sgemm(
        r,
        hw,
        n,
        Mat::rm(&out.g32, n),
        Mat::rm(x, hw),
        &mut out.v,
        false,
        1,
    );
    residual.copy_from_slice(x);
    // X_U = X − U V, as X + (−U) V
    out.g32.clear();
    out.g32.extend(out.u.iter().map(|&v| -v));
    sgemm(
        n,
        hw,
        r,
        Mat::rm(&out.g32, r),
        Mat::rm(&out.v, hw),
        residual,
        true,
        1,
    );
}

/// [`light_svd_into`] by the Gram route (the same components up to rounding).
pub(crate) fn light_svd_gram_into(
    x: &[f32],
    n: usize,
    hw: usize,
    r: usize,
    iters: usize,
    out: &mut LowRank,
    residual: &mut [f32],
) {
    gram_start(x, n, hw, out);
    gram_extract(out, iters, r.min(n));
    gram_finish(x, out, residual);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An N × HW matrix with singular values 0.6^i (and a little noise).
    fn spectrum(n: usize, hw: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut x = vec![0f32; n * hw];
        for i in 0..n {
            let s = 0.6f32.powi(i as i32) * 10.0;
            let a: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..hw).map(|_| rng.normal()).collect();
            for (p, &ap) in a.iter().enumerate() {
                for (q, &bq) in b.iter().enumerate() {
                    x[p * hw + q] += s * ap * bq / (n * hw) as f32;
                }
            }
        }
        x
    }

    /// |a − b| ≤ tol · max|b| elementwise (or tol · max|x| when given: a residual is measured against X).
    fn close_to(what: &str, a: &[f32], b: &[f32], tol: f32, x: Option<&[f32]>) {
        let scale = x
            .unwrap_or(b)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-20);
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() <= tol * scale, "{what}[{i}]: {p} vs {q}");
        }
    }

    #[test]
    fn gram_route_gives_the_deflation_routes_components() {
        for (n, hw, seed) in [(6, 40, 1), (16, 80, 2), (12, 200, 3)] {
            let x = spectrum(n, hw, seed);
            for iters in [1, 2] {
                for r in [1, 2, 5, n] {
                    let (mut a, mut b) = (LowRank::default(), LowRank::default());
                    let (mut ra, mut rb) = (vec![0f32; n * hw], vec![0f32; n * hw]);
                    light_svd_into(&x, n, hw, r, iters, &mut a, &mut ra);
                    light_svd_gram_into(&x, n, hw, r, iters, &mut b, &mut rb);
                    let what = format!("{n}×{hw} r {r} iters {iters}");
                    assert_eq!((a.r, b.r), (r.min(n), r.min(n)), "{what}");
                    // Components down to 0.6^8 ≈ 1.7 % of the top singular value (3e-4 of its energy):
                    // G = X Xᵀ accumulated in f32 resolves the far smaller ones less precisely.
                    let k = r.min(n).min(8);
                    let cols = |lr: &LowRank| -> Vec<f32> {
                        (0..n)
                            .flat_map(|i| lr.u[i * lr.r..i * lr.r + k].to_vec())
                            .collect()
                    };
                    close_to(&format!("{what} U"), &cols(&b), &cols(&a), 1e-3, None);
                    close_to(
                        &format!("{what} V"),
                        &b.v[..k * hw],
                        &a.v[..k * hw],
                        1e-3,
                        None,
                    );
                    close_to(&format!("{what} X_U"), &rb, &ra, 1e-4, Some(&x));
                    let e: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
                    let kept = b.energy() + rb.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
                    assert!((kept - e).abs() < 1e-3 * e, "{what}: energy {kept} vs {e}");
                }
            }
        }
    }

    #[test]
    fn gram_route_on_zero_and_rank_one_matrices() {
        let (mut lr, mut res) = (LowRank::default(), vec![0f32; 12]);
        light_svd_gram_into(&[0.0; 12], 3, 4, 2, 2, &mut lr, &mut res);
        assert!(lr.u.iter().chain(&lr.v).chain(&res).all(|v| *v == 0.0));
        let x: Vec<f32> = (0..3)
            .flat_map(|i| (0..4).map(move |p| (i + 1) as f32 * (p as f32 - 1.5)))
            .collect();
        light_svd_gram_into(&x, 3, 4, 3, 2, &mut lr, &mut res);
        assert!(lr.u.iter().chain(&lr.v).all(|v| v.is_finite()));
        assert!(res.iter().all(|v| v.abs() < 1e-5), "{res:?}");
    }
}
