//! Mutual information I(X;Y) between paired samples of two continuous variables, in nats.
//!
//! Samples are row-major flat slices: `x` holds n samples of `dx` values each, `y` n samples of `dy` values.
//!
//! - [`ksg`]: the k-nearest-neighbour estimators of Kraskov, Stögbauer and Grassberger (Phys. Rev. E 69,
//!   066138, 2004), both variants, with the max-norm in the joint space Z = (X, Y):
//!   - variant 1: I = ψ(k) + ψ(N) − ⟨ψ(n_x + 1) + ψ(n_y + 1)⟩, where ε_i is the distance from z_i to its k-th
//!     neighbour and n_x counts the j ≠ i with ‖x_j − x_i‖ < ε_i (strictly);
//!   - variant 2: I = ψ(k) − 1/k + ψ(N) − ⟨ψ(n_x) + ψ(n_y)⟩, where ε_x,i is the x-extent of the k neighbours
//!     (the largest ‖x_j − x_i‖ among them) and n_x counts the j ≠ i with ‖x_j − x_i‖ ≤ ε_x,i.
//! - [`ksg_lnc`], [`ksg_lnc_detailed`]: KSG with the local non-uniformity correction (LNC) of Gao, Ver Steeg
//!   and Galstyan, "Efficient estimation of mutual information for strongly dependent variables" (AISTATS
//!   2015). KSG assumes the density is uniform in the box around each point; for strongly dependent variables
//!   the k neighbours fill only a thin diagonal sliver of it, and KSG underestimates I by about the log of the
//!   empty fraction. LNC takes the point and its k neighbours, centred on the point, finds their principal
//!   axes (PCA of Σ z zᵀ), and compares the volume V̄ of the PCA-aligned box that bounds them with the volume
//!   V of the KSG box; where V̄/V < α it adds log(V/V̄): I_LNC = I_KSG − (1/N) Σ_{i: V̄_i/V_i < α} log(V̄_i/V_i).
//!   As in the paper's reference code, the base estimate is KSG variant 2 and V is its rectangle,
//!   (2ε_x)^dx (2ε_y)^dy; variant 1 with V = (2ε)^(dx+dy) is available through [`ksg_lnc_detailed`].
//! - [`gaussian_mi_1d`]: −½ ln(1 − ρ²) from the sample correlation, exact for jointly Gaussian 1-D X and Y
//!   and a jitter-free reference.
//! - [`linfoot`]: Linfoot's informational coefficient of correlation √(1 − e^(−2I)) ∈ [0, 1].
//! - [`jitter`]: seeded Gaussian noise to break ties (the kNN estimators assume no two samples coincide).
//! - [`digamma`]: ψ(x), asymptotic series after upward recurrence.
//!
//! Neighbour searches: the joint k-nearest neighbours and the multi-dimensional marginal counts use
//! [`kiddo`]'s immutable kd-tree with the Chebyshev (max) metric for up to 8 dimensions (brute force, O(N²),
//! above); 1-D marginal counts use a sorted copy and binary search. The per-point loops run on rayon's pool;
//! results do not depend on the number of threads. All comparisons of a distance with a radius use the same
//! floating-point expression |a − b| as the radius itself, so that the point that defines ε is counted
//! consistently (strictly excluded in variant 1, included in variant 2).
//!
//! The estimators are not scale-free on finite samples (the max-norm mixes the units of X and Y): standardise
//! the marginals first when their scales differ by much.

use std::num::NonZeroUsize;

use kiddo::{Chebyshev, ImmutableKdTree};
use nalgebra::{DMatrix, SymmetricEigen};
use rayon::prelude::*;
use thiserror::Error;

use asymml_core::rng::Rng;

/// Errors of the estimators: inputs that do not describe a valid sample, or parameters out of range.
#[derive(Debug, Clone, PartialEq, Error)]
pub(crate) enum MiError {
    /// No samples at all.
    #[error("no samples")]
    Empty,
    /// A dimension of 0.
    #[error("{which}: the dimension per sample must be at least 1")]
    ZeroDim { which: &'static str },
    /// A flat slice whose length is not a multiple of its dimension.
    #[error("{which}: {len} values are not a whole number of {dim}-dimensional samples")]
    Ragged {
        which: &'static str,
        len: usize,
        dim: usize,
    },
    /// x and y hold different numbers of samples.
    #[error("x has {nx} samples but y has {ny}")]
    LengthMismatch { nx: usize, ny: usize },
    /// A NaN or an infinity in the data.
    #[error("{which}[{index}] = {value} is not finite")]
    NonFinite {
        which: &'static str,
        index: usize,
        value: f64,
    },
    /// k outside 1..n.
    #[error("k = {k} must be at least 1 and less than the number of samples n = {n}")]
    InvalidK { k: usize, n: usize },
    /// Fewer samples than the estimator needs.
    #[error("{n} samples are too few (at least {min} needed)")]
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "only the Gaussian reference (a test cross-check) needs it"
        )
    )]
    TooFewSamples { n: usize, min: usize },
    /// More samples than the kd-tree's u32 indices can address.
    #[error("{n} samples are too many (at most 2^32 - 1)")]
    TooManySamples { n: usize },
    /// The LNC threshold outside (0, 1).
    #[error("the LNC threshold alpha = {0} must lie in (0, 1)")]
    InvalidAlpha(f64),
    /// LNC with fewer neighbours than dimensions: the local PCA box would be flat.
    #[error("LNC needs k >= dx + dy = {d} neighbours (k = {k})")]
    TooFewNeighbours { k: usize, d: usize },
    /// A constant variable (its correlation with anything is undefined).
    #[error("{which} is constant")]
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "only the Gaussian reference (a test cross-check) needs it"
        )
    )]
    ZeroVariance { which: &'static str },
    /// LNC found a neighbourhood of positive KSG volume whose points lie exactly in a lower-dimensional
    /// subspace (an exact functional relation): the correction would be infinite. Jitter the data.
    #[error("the neighbourhood of sample {index} is flat (points on a lower-dimensional subspace); jitter the data")]
    FlatNeighbourhood { index: usize },
    /// The local PCA (symmetric eigendecomposition) did not converge.
    #[error("the local PCA of sample {index} did not converge")]
    Pca { index: usize },
    /// The kd-tree could not be built.
    #[error("kd-tree: {0}")]
    KdTree(String),
}

/// The two estimators of Kraskov, Stögbauer and Grassberger (2004). Variant 1 has the smaller statistical
/// error, variant 2 the smaller bias for strong dependence (and it is the base of the LNC correction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum KsgVariant {
    /// I = ψ(k) + ψ(N) − ⟨ψ(n_x + 1) + ψ(n_y + 1)⟩, marginal counts strictly inside the joint k-NN distance.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the privacy report uses KSG 2; KSG 1 is a test cross-check"
        )
    )]
    One,
    /// I = ψ(k) − 1/k + ψ(N) − ⟨ψ(n_x) + ψ(n_y)⟩, marginal counts within the neighbours' marginal extents.
    Two,
}

/// The result of [`ksg_lnc_detailed`]: the KSG estimate and the LNC correction computed on the same
/// neighbourhoods.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LncEstimate {
    /// The uncorrected KSG estimate (nats).
    pub ksg: f64,
    /// The correction −(1/N) Σ log(V̄_i/V_i) over the points with V̄_i/V_i < α (≥ 0, nats).
    pub correction: f64,
    /// How many points had V̄_i/V_i < α.
    pub corrected_points: usize,
}

impl LncEstimate {
    /// I_LNC = I_KSG + correction.
    pub(crate) fn mi(&self) -> f64 {
        self.ksg + self.correction
    }
}

/// Kraskov–Stögbauer–Grassberger estimate of I(X;Y) in nats, max-norm in the joint space.
///
/// `x`: n samples of `dx` values (row-major), `y`: n samples of `dy` values; `k` in 1..n (3–10 is usual;
/// larger k lowers the variance and raises the bias). Ties (repeated values) bias the estimate: [`jitter`]
/// discrete or rounded data first.
#[cfg(test)]
pub(crate) fn ksg(
    x: &[f64],
    dx: usize,
    y: &[f64],
    dy: usize,
    k: usize,
    variant: KsgVariant,
) -> Result<f64, MiError> {
    let n = check_pair(x, dx, y, dy)?;
    check_k(k, n)?;
    let nbh = Neighbourhoods::new(x, dx, y, dy, k)?;
    ksg_from(x, dx, y, dy, &nbh, variant)
}

/// KSG with the local non-uniformity correction (Gao, Ver Steeg, Galstyan 2015), in nats.
///
/// As in the paper and its reference code, the base is KSG variant 2, the neighbourhood of a point is the
/// point and its k joint nearest neighbours, centred on the point, and V is the KSG rectangle; see
/// [`ksg_lnc_detailed`] for variant 1 and for the parts of the estimate. `alpha` ∈ (0, 1) is the threshold on
/// V̄/V below which a neighbourhood counts as non-uniform: the paper tunes it to k and d so that uniform
/// neighbourhoods rarely fall below it. It grows with k (the box of more uniform points is more nearly full)
/// and shrinks with dx + dy: 0.25 for k = 5 in two dimensions (the reference code's default), about 0.5–0.7
/// for k = 50 in two dimensions, about 0.1–0.2 for k = 10 in four. Requires k ≥ dx + dy.
pub(crate) fn ksg_lnc(
    x: &[f64],
    dx: usize,
    y: &[f64],
    dy: usize,
    k: usize,
    alpha: f64,
) -> Result<f64, MiError> {
    ksg_lnc_detailed(x, dx, y, dy, k, alpha, KsgVariant::Two).map(|e| e.mi())
}

/// KSG of the given variant with the LNC correction, returned in parts. With [`KsgVariant::One`] the KSG
/// volume is the max-norm hypercube V = (2ε)^(dx+dy), with [`KsgVariant::Two`] the rectangle
/// (2ε_x)^dx (2ε_y)^dy; V̄ is the volume of the box aligned with the principal axes of the point's k
/// neighbours (centred on the point) that bounds them.
pub(crate) fn ksg_lnc_detailed(
    x: &[f64],
    dx: usize,
    y: &[f64],
    dy: usize,
    k: usize,
    alpha: f64,
    variant: KsgVariant,
) -> Result<LncEstimate, MiError> {
    let n = check_pair(x, dx, y, dy)?;
    check_k(k, n)?;
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(MiError::InvalidAlpha(alpha));
    }
    if k < dx + dy {
        return Err(MiError::TooFewNeighbours { k, d: dx + dy });
    }
    let nbh = Neighbourhoods::new(x, dx, y, dy, k)?;
    let ksg = ksg_from(x, dx, y, dy, &nbh, variant)?;
    let (correction, corrected_points) = lnc_correction(x, dx, y, dy, &nbh, alpha, variant)?;
    Ok(LncEstimate {
        ksg,
        correction,
        corrected_points,
    })
}

/// Gaussian (linear) mutual information of 1-D `x` and `y` from their sample correlation ρ: −½ ln(1 − ρ²).
/// Exact for jointly Gaussian variables, a lower bound of I for any pair with that correlation; +∞ when
/// |ρ| = 1. Needs at least 2 samples and neither variable constant.
#[cfg(test)]
pub(crate) fn gaussian_mi_1d(x: &[f64], y: &[f64]) -> Result<f64, MiError> {
    let n = check_pair(x, 1, y, 1)?;
    if n < 2 {
        return Err(MiError::TooFewSamples { n, min: 2 });
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n as f64;
    let (mx, my) = (mean(x), mean(y));
    let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (u, v) = (a - mx, b - my);
        sxx += u * u;
        syy += v * v;
        sxy += u * v;
    }
    if sxx <= 0.0 || !sxx.is_finite() {
        return Err(MiError::ZeroVariance { which: "x" });
    }
    if syy <= 0.0 || !syy.is_finite() {
        return Err(MiError::ZeroVariance { which: "y" });
    }
    let rho = sxy / (sxx.sqrt() * syy.sqrt());
    let rho2 = (rho * rho).min(1.0);
    Ok(-0.5 * (-rho2).ln_1p())
}

/// Linfoot's informational coefficient of correlation √(1 − e^(−2I)) of a mutual information `i_nats`, in
/// [0, 1]; |ρ| for jointly Gaussian variables. Negative estimates give 0, +∞ gives 1, NaN stays NaN.
pub(crate) fn linfoot(i_nats: f64) -> f64 {
    if i_nats.is_nan() {
        return f64::NAN;
    }
    if i_nats <= 0.0 {
        return 0.0;
    }
    (-(-2.0 * i_nats).exp_m1()).sqrt().min(1.0)
}

/// Adds independent N(0, σ²) noise to every value of `v`, deterministically from `seed` (xoshiro256**,
/// Box–Muller in f64), to break ties before a kNN estimate. A `sigma` that is not a positive finite number
/// leaves `v` unchanged.
pub(crate) fn jitter(v: &mut [f64], sigma: f64, seed: u64) {
    if !(sigma > 0.0 && sigma.is_finite()) {
        return;
    }
    let mut rng = Rng::new(seed);
    for pair in v.chunks_mut(2) {
        let (z0, z1) = normal_pair(&mut rng);
        pair[0] += sigma * z0;
        if let Some(b) = pair.get_mut(1) {
            *b += sigma * z1;
        }
    }
}

/// Two independent standard normal samples (Box–Muller on 53-bit uniforms).
fn normal_pair(rng: &mut Rng) -> (f64, f64) {
    let u1 = 1.0 - rng.uniform_f64(); // (0, 1]
    let u2 = rng.uniform_f64();
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

/// The digamma function ψ(x) = Γ'(x)/Γ(x): upward recurrence ψ(x) = ψ(x + 1) − 1/x to x ≥ 10, then the
/// asymptotic series ln x − 1/(2x) − Σ B₂ₙ/(2n x²ⁿ) to x⁻¹⁰ (error < 1e-13); reflection for negative x.
/// NaN at the poles 0, −1, −2, … and for NaN.
pub(crate) fn digamma(x: f64) -> f64 {
    if x.is_nan() || (x <= 0.0 && x == x.floor()) {
        return f64::NAN;
    }
    if x < 0.0 {
        // ψ(x) = ψ(1 − x) − π cot(πx)
        let pi = std::f64::consts::PI;
        return digamma(1.0 - x) - pi / (pi * x).tan();
    }
    let mut x = x;
    let mut acc = 0.0;
    while x < 10.0 {
        acc -= 1.0 / x;
        x += 1.0;
    }
    let inv = 1.0 / x;
    let inv2 = inv * inv;
    let series = inv2
        * (1.0 / 12.0
            - inv2 * (1.0 / 120.0 - inv2 * (1.0 / 252.0 - inv2 * (1.0 / 240.0 - inv2 / 132.0))));
    acc + x.ln() - 0.5 * inv - series
}

// ---------------------------------------------------------------------------------------------------------
// Input checks

/// The number of samples of a flat slice of `dim`-dimensional samples, all values finite.
fn check_samples(which: &'static str, v: &[f64], dim: usize) -> Result<usize, MiError> {
    if dim == 0 {
        return Err(MiError::ZeroDim { which });
    }
    if !v.len().is_multiple_of(dim) {
        return Err(MiError::Ragged {
            which,
            len: v.len(),
            dim,
        });
    }
    if let Some(index) = v.iter().position(|a| !a.is_finite()) {
        return Err(MiError::NonFinite {
            which,
            index,
            value: v[index],
        });
    }
    Ok(v.len() / dim)
}

/// The common number of samples of x and y (at least 1, at most u32::MAX).
fn check_pair(x: &[f64], dx: usize, y: &[f64], dy: usize) -> Result<usize, MiError> {
    let nx = check_samples("x", x, dx)?;
    let ny = check_samples("y", y, dy)?;
    if nx != ny {
        return Err(MiError::LengthMismatch { nx, ny });
    }
    if nx == 0 {
        return Err(MiError::Empty);
    }
    if nx > u32::MAX as usize {
        return Err(MiError::TooManySamples { n: nx });
    }
    Ok(nx)
}

fn check_k(k: usize, n: usize) -> Result<(), MiError> {
    if k == 0 || k >= n {
        return Err(MiError::InvalidK { k, n });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Neighbourhoods in the joint space

/// Max-norm distance between two points of the same dimension.
#[inline]
fn cheb(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .fold(0.0, |m: f64, (&u, &v)| m.max((u - v).abs()))
}

/// The k nearest neighbours (max-norm, self excluded) of every joint sample and the extents of each
/// neighbourhood: ε (joint), ε_x and ε_y (marginal), each the largest |·| distance to one of the k.
struct Neighbourhoods {
    k: usize,
    /// n × k neighbour indices, nearest first.
    nb: Vec<u32>,
    eps: Vec<f64>,
    eps_x: Vec<f64>,
    eps_y: Vec<f64>,
}

impl Neighbourhoods {
    fn new(x: &[f64], dx: usize, y: &[f64], dy: usize, k: usize) -> Result<Self, MiError> {
        let n = x.len() / dx;
        let d = dx + dy;
        let mut joint = vec![0.0; n * d];
        for (i, z) in joint.chunks_exact_mut(d).enumerate() {
            z[..dx].copy_from_slice(&x[i * dx..(i + 1) * dx]);
            z[dx..].copy_from_slice(&y[i * dy..(i + 1) * dy]);
        }
        let nb = knn(&joint, d, k)?;
        let mut ext = vec![(0.0, 0.0); n];
        ext.par_iter_mut()
            .zip(nb.par_chunks(k))
            .enumerate()
            .for_each(|(i, (e, nbi))| {
                let (xi, yi) = (&x[i * dx..(i + 1) * dx], &y[i * dy..(i + 1) * dy]);
                for &j in nbi {
                    let j = j as usize;
                    e.0 = f64::max(e.0, cheb(xi, &x[j * dx..(j + 1) * dx]));
                    e.1 = f64::max(e.1, cheb(yi, &y[j * dy..(j + 1) * dy]));
                }
            });
        Ok(Neighbourhoods {
            k,
            nb,
            eps: ext.iter().map(|&(a, b)| a.max(b)).collect(),
            eps_x: ext.iter().map(|e| e.0).collect(),
            eps_y: ext.iter().map(|e| e.1).collect(),
        })
    }
}

/// Copies row-major `D`-dimensional points into arrays (kiddo's point type).
fn as_arrays<const D: usize>(pts: &[f64]) -> Vec<[f64; D]> {
    pts.chunks_exact(D)
        .map(|c| {
            let mut a = [0.0; D];
            a.copy_from_slice(c);
            a
        })
        .collect()
}

/// Calls `$f::<D>($args)` for the run-time dimension `$d` in 1..=8 (the dimensions searched with a kd-tree),
/// `$fallback` (brute force) otherwise.
macro_rules! dispatch_dim {
    ($d:expr, $f:ident ($($arg:expr),*), $fallback:expr) => {
        match $d {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            _ => $fallback,
        }
    };
}

/// n × k indices of the k nearest neighbours (max-norm, self excluded) of each of the n `d`-dimensional
/// points. Needs k < n.
fn knn(pts: &[f64], d: usize, k: usize) -> Result<Vec<u32>, MiError> {
    dispatch_dim!(d, knn_tree(pts, k), Ok(knn_brute(pts, d, k)))
}

/// Fills `out` with the first `out.len()` items of `found` other than `i`.
#[inline]
fn take_neighbours(i: usize, found: impl Iterator<Item = u32>, out: &mut [u32]) {
    let mut m = 0;
    for j in found {
        if m == out.len() {
            break;
        }
        if j as usize != i {
            out[m] = j;
            m += 1;
        }
    }
}

fn knn_tree<const D: usize>(pts: &[f64], k: usize) -> Result<Vec<u32>, MiError> {
    let arr = as_arrays::<D>(pts);
    let tree = ImmutableKdTree::<f64, D>::new_from_slice(&arr)
        .map_err(|e| MiError::KdTree(e.to_string()))?;
    // k + 1 results: the point itself (distance 0) and its k neighbours. With coincident points the point
    // may be missing from the k + 1; the first k others are then as near as any.
    let qty = NonZeroUsize::MIN.saturating_add(k);
    let mut nb = vec![0u32; arr.len() * k];
    nb.par_chunks_mut(k).enumerate().for_each(|(i, out)| {
        let found = tree
            .query(&arr[i])
            .nearest_n::<Chebyshev<f64>>(qty)
            .execute();
        take_neighbours(i, found.iter().map(|r| r.item), out);
    });
    Ok(nb)
}

fn knn_brute(pts: &[f64], d: usize, k: usize) -> Vec<u32> {
    let n = pts.len() / d;
    let mut nb = vec![0u32; n * k];
    nb.par_chunks_mut(k).enumerate().for_each_init(
        || Vec::with_capacity(n),
        |buf: &mut Vec<(f64, u32)>, (i, out)| {
            let pi = &pts[i * d..(i + 1) * d];
            buf.clear();
            buf.extend(
                (0..n)
                    .filter(|&j| j != i)
                    .map(|j| (cheb(pi, &pts[j * d..(j + 1) * d]), j as u32)),
            );
            // k ≤ n − 1 = buf.len()
            buf.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
            buf[..k].sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            take_neighbours(i, buf[..k].iter().map(|e| e.1), out);
        },
    );
    nb
}

// ---------------------------------------------------------------------------------------------------------
// Marginal counts

/// For each sample i of the `dim`-dimensional samples `v`: how many j ≠ i have ‖v_j − v_i‖∞ < radius[i]
/// (`strict`) or ≤ radius[i].
fn marginal_counts(
    v: &[f64],
    dim: usize,
    radius: &[f64],
    strict: bool,
) -> Result<Vec<u32>, MiError> {
    if dim == 1 {
        return Ok(counts_sorted(v, radius, strict));
    }
    dispatch_dim!(
        dim,
        counts_tree(v, radius, strict),
        Ok(counts_brute(v, dim, radius, strict))
    )
}

/// 1-D counts by binary search in a sorted copy. The points within the radius of v_i form one run of the
/// sorted values; its ends are found with the same |a − b| comparisons as everywhere else (v_i − a for a
/// below v_i, a − v_i above, both monotone in a), so there is no rounding mismatch at the boundary.
fn counts_sorted(v: &[f64], radius: &[f64], strict: bool) -> Vec<u32> {
    let mut s = v.to_vec();
    s.sort_unstable_by(f64::total_cmp);
    let mut counts = vec![0u32; v.len()];
    counts.par_iter_mut().enumerate().for_each(|(i, c)| {
        let (vi, r) = (v[i], radius[i]);
        if strict && r <= 0.0 {
            return; // nothing is closer than 0
        }
        let inside = |dist: f64| if strict { dist < r } else { dist <= r };
        let lo = s.partition_point(|&a| a < vi && !inside(vi - a));
        let hi = s.partition_point(|&a| a <= vi || inside(a - vi));
        // [lo, hi) holds v_i itself
        *c = (hi - lo).saturating_sub(1) as u32;
    });
    counts
}

fn counts_tree<const D: usize>(
    v: &[f64],
    radius: &[f64],
    strict: bool,
) -> Result<Vec<u32>, MiError> {
    let arr = as_arrays::<D>(v);
    let tree = ImmutableKdTree::<f64, D>::new_from_slice(&arr)
        .map_err(|e| MiError::KdTree(e.to_string()))?;
    let mut counts = vec![0u32; arr.len()];
    counts.par_iter_mut().enumerate().for_each(|(i, c)| {
        let r = radius[i];
        let mut m = 0usize;
        if strict {
            if r <= 0.0 {
                return;
            }
            tree.query(&arr[i])
                .within::<Chebyshev<f64>>(r)
                .unsorted()
                .exclusive_boundaries()
                .visit(|_| m += 1);
        } else {
            tree.query(&arr[i])
                .within::<Chebyshev<f64>>(r)
                .unsorted()
                .visit(|_| m += 1);
        }
        *c = m.saturating_sub(1) as u32; // the point itself
    });
    Ok(counts)
}

fn counts_brute(v: &[f64], dim: usize, radius: &[f64], strict: bool) -> Vec<u32> {
    let n = v.len() / dim;
    let mut counts = vec![0u32; n];
    counts.par_iter_mut().enumerate().for_each(|(i, c)| {
        let (vi, r) = (&v[i * dim..(i + 1) * dim], radius[i]);
        *c = (0..n)
            .filter(|&j| {
                let dist = cheb(vi, &v[j * dim..(j + 1) * dim]);
                j != i && if strict { dist < r } else { dist <= r }
            })
            .count() as u32;
    });
    counts
}

// ---------------------------------------------------------------------------------------------------------
// Estimates

fn ksg_from(
    x: &[f64],
    dx: usize,
    y: &[f64],
    dy: usize,
    nbh: &Neighbourhoods,
    variant: KsgVariant,
) -> Result<f64, MiError> {
    let n = nbh.eps.len();
    let k = nbh.k as f64;
    let nf = n as f64;
    // Sequential sums over per-point terms: the result does not depend on the thread count.
    let mean_psi = |cx: &[u32], cy: &[u32], offset: u32| {
        let s: f64 = cx
            .iter()
            .zip(cy)
            .map(|(&a, &b)| {
                digamma(((a + offset).max(1)) as f64) + digamma(((b + offset).max(1)) as f64)
            })
            .sum();
        s / nf
    };
    Ok(match variant {
        KsgVariant::One => {
            let cx = marginal_counts(x, dx, &nbh.eps, true)?;
            let cy = marginal_counts(y, dy, &nbh.eps, true)?;
            digamma(k) + digamma(nf) - mean_psi(&cx, &cy, 1)
        }
        KsgVariant::Two => {
            let cx = marginal_counts(x, dx, &nbh.eps_x, false)?;
            let cy = marginal_counts(y, dy, &nbh.eps_y, false)?;
            digamma(k) - 1.0 / k + digamma(nf) - mean_psi(&cx, &cy, 0)
        }
    })
}

/// The LNC correction (1/N) Σ_{i: V̄_i/V_i < α} log(V_i/V̄_i) and the number of corrected points.
fn lnc_correction(
    x: &[f64],
    dx: usize,
    y: &[f64],
    dy: usize,
    nbh: &Neighbourhoods,
    alpha: f64,
    variant: KsgVariant,
) -> Result<(f64, usize), MiError> {
    let n = nbh.eps.len();
    let (k, d) = (nbh.k, dx + dy);
    let ln_alpha = alpha.ln();
    let mut terms: Vec<Result<f64, MiError>> = vec![Ok(0.0); n];
    terms.par_iter_mut().enumerate().for_each_init(
        || vec![0.0; k * d],
        |z, (i, t)| {
            // The log of the half-side product of the KSG box (the 2^d cancels in V̄/V).
            let log_v = match variant {
                KsgVariant::One => d as f64 * nbh.eps[i].ln(),
                KsgVariant::Two => dx as f64 * nbh.eps_x[i].ln() + dy as f64 * nbh.eps_y[i].ln(),
            };
            if log_v == f64::NEG_INFINITY {
                return; // coincident points: no box to compare with
            }
            // The k neighbours relative to the point (the point itself is the origin of the box).
            let (xi, yi) = (&x[i * dx..(i + 1) * dx], &y[i * dy..(i + 1) * dy]);
            for (zj, &j) in z.chunks_exact_mut(d).zip(&nbh.nb[i * k..(i + 1) * k]) {
                let j = j as usize;
                for (o, (a, b)) in zj[..dx]
                    .iter_mut()
                    .zip(x[j * dx..(j + 1) * dx].iter().zip(xi))
                {
                    *o = a - b;
                }
                for (o, (a, b)) in zj[dx..]
                    .iter_mut()
                    .zip(y[j * dy..(j + 1) * dy].iter().zip(yi))
                {
                    *o = a - b;
                }
            }
            *t = match pca_log_box(z, d) {
                None => Err(MiError::Pca { index: i }),
                Some(f64::NEG_INFINITY) => Err(MiError::FlatNeighbourhood { index: i }),
                Some(log_vbar) if log_vbar < log_v + ln_alpha => Ok(log_v - log_vbar),
                Some(_) => Ok(0.0),
            };
        },
    );
    let mut sum = 0.0;
    let mut corrected = 0;
    for t in terms {
        let t = t?;
        if t > 0.0 {
            sum += t;
            corrected += 1;
        }
    }
    Ok((sum / n as f64, corrected))
}

/// ln of the product of the half-extents max_j |a·z_j| of the points z (row-major, `d` per point) along the
/// principal axes a of Σ z zᵀ (the box is centred on the origin). None if the eigendecomposition fails.
fn pca_log_box(z: &[f64], d: usize) -> Option<f64> {
    let extent = |axis: &[f64]| {
        z.chunks_exact(d)
            .map(|zj| zj.iter().zip(axis).map(|(a, b)| a * b).sum::<f64>().abs())
            .fold(0.0, f64::max)
    };
    if d == 2 {
        // Closed form: the principal axes of [[a, b], [b, c]] are at angle θ = ½ atan2(2b, a − c).
        let (mut a, mut b, mut c) = (0.0, 0.0, 0.0);
        for zj in z.chunks_exact(2) {
            a += zj[0] * zj[0];
            b += zj[0] * zj[1];
            c += zj[1] * zj[1];
        }
        let (s, co) = (0.5 * (2.0 * b).atan2(a - c)).sin_cos();
        return Some(extent(&[co, s]).ln() + extent(&[-s, co]).ln());
    }
    let mut cov = DMatrix::<f64>::zeros(d, d);
    for zj in z.chunks_exact(d) {
        for r in 0..d {
            for c in 0..d {
                cov[(r, c)] += zj[r] * zj[c];
            }
        }
    }
    let eig = SymmetricEigen::try_new(cov, f64::EPSILON, 10_000)?;
    Some(
        eig.eigenvectors
            .column_iter()
            .map(|axis| extent(axis.as_slice()).ln())
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// n samples of (X, Y), each `d`-dimensional, X ~ N(0, I), Y = ρX + √(1 − ρ²) N(0, I):
    /// I(X;Y) = −(d/2) ln(1 − ρ²).
    fn gaussian_blocks(n: usize, d: usize, rho: f64, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = Rng::new(seed);
        let s = (1.0 - rho * rho).sqrt();
        let (mut x, mut y) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
        for _ in 0..n * d {
            let (a, b) = normal_pair(&mut rng);
            x.push(a);
            y.push(rho * a + s * b);
        }
        (x, y)
    }

    fn gaussian_truth(d: usize, rho: f64) -> f64 {
        -0.5 * d as f64 * (1.0 - rho * rho).ln()
    }

    /// Like [`gaussian_blocks`] with the per-component noise scale σ = e^(−I₁) given instead of ρ, so that
    /// I(X;Y) = d·I₁ exactly even when ρ rounds to 1.
    fn gaussian_blocks_by_mi(
        n: usize,
        d: usize,
        mi_per_dim: f64,
        seed: u64,
    ) -> (Vec<f64>, Vec<f64>) {
        let s = (-mi_per_dim).exp();
        let rho = (1.0 - s * s).sqrt();
        let mut rng = Rng::new(seed);
        let (mut x, mut y) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
        for _ in 0..n * d {
            let (a, b) = normal_pair(&mut rng);
            x.push(a);
            y.push(rho * a + s * b);
        }
        (x, y)
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn digamma_matches_known_values() {
        let cases = [
            (1.0, -0.577_215_664_901_532_9),
            (0.5, -1.963_510_026_021_423_5),
            (10.0, 2.251_752_589_066_721),
            (2.0, 0.422_784_335_098_467_1),
            (100.0, 4.600_161_852_738_087),
            (1e-3, -1_000.575_571_931_810_3), // −1/x − γ + ζ(2)x − ζ(3)x² + …
            (-0.5, 0.036_489_973_978_576_52),
        ];
        for (x, want) in cases {
            let got = digamma(x);
            assert!(
                close(got, want, 1e-10 * want.abs().max(1.0)),
                "psi({x}) = {got}, want {want}"
            );
        }
        // ψ(x + 1) = ψ(x) + 1/x on both sides of the switch to the series at 10
        for x in [0.3, 1.5, 3.7, 8.9999, 9.5, 10.0, 12.5, 777.25] {
            let err = digamma(x + 1.0) - digamma(x) - 1.0 / x;
            assert!(err.abs() < 1e-12, "recurrence at {x}: {err}");
        }
        for x in [0.0, -1.0, -7.0, f64::NAN] {
            assert!(digamma(x).is_nan(), "psi({x}) should be NaN");
        }
    }

    #[test]
    fn linfoot_inverts_the_gaussian_mi() {
        for rho in [-0.95f64, -0.3, 0.0, 0.1, 0.6, 0.9, 0.99, 0.999_999] {
            let i = -0.5 * (-(rho * rho)).ln_1p();
            let r = linfoot(i);
            assert!(close(r, rho.abs(), 1e-12), "rho {rho}: linfoot {r}");
        }
        assert_eq!(linfoot(-0.3), 0.0);
        assert_eq!(linfoot(f64::INFINITY), 1.0);
        assert!(linfoot(f64::NAN).is_nan());
        assert!((0.0..=1.0).contains(&linfoot(40.0)));
    }

    #[test]
    fn gaussian_mi_1d_matches_the_correlation() {
        // ρ = 0.8 exactly: I = −½ ln 0.36
        let got = gaussian_mi_1d(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!(close(got, -0.5 * 0.36f64.ln(), 1e-12), "{got}");
        let line: Vec<f64> = (0..10).map(|i| i as f64).collect();
        let twice: Vec<f64> = line.iter().map(|v| 3.0 - 2.0 * v).collect();
        assert_eq!(gaussian_mi_1d(&line, &twice).unwrap(), f64::INFINITY);
        for rho in [0.1, 0.6, 0.9, 0.99] {
            let (x, y) = gaussian_blocks(10_000, 1, rho, 21);
            let (got, want) = (gaussian_mi_1d(&x, &y).unwrap(), gaussian_truth(1, rho));
            eprintln!(
                "gaussian_mi_1d rho {rho}: {got:.4} (true {want:.4}, error {:+.4})",
                got - want
            );
            assert!(close(got, want, 0.02), "rho {rho}: {got} vs {want}");
        }
    }

    #[test]
    fn ksg_on_bivariate_gaussians() {
        for rho in [0.1, 0.6, 0.9] {
            let (x, y) = gaussian_blocks(10_000, 1, rho, 11);
            let want = gaussian_truth(1, rho);
            let k1 = ksg(&x, 1, &y, 1, 5, KsgVariant::One).unwrap();
            let k2 = ksg(&x, 1, &y, 1, 5, KsgVariant::Two).unwrap();
            let lnc = ksg_lnc(&x, 1, &y, 1, 5, 0.25).unwrap();
            eprintln!(
                "rho {rho} (I = {want:.4}), n 10000, k 5: errors KSG1 {:+.4}, KSG2 {:+.4}, LNC(0.25) {:+.4}",
                k1 - want,
                k2 - want,
                lnc - want
            );
            for (name, got) in [("KSG1", k1), ("KSG2", k2), ("LNC", lnc)] {
                assert!(close(got, want, 0.03), "rho {rho}: {name} {got} vs {want}");
            }
        }
    }

    /// At ρ = 0.99 (I ≈ 1.96 nats) n = 10000 samples are plenty: KSG is accurate and LNC must not spoil it.
    #[test]
    fn ksg_and_lnc_at_rho_0_99() {
        let rho = 0.99;
        let (x, y) = gaussian_blocks(10_000, 1, rho, 11);
        let want = gaussian_truth(1, rho);
        let k1 = ksg(&x, 1, &y, 1, 5, KsgVariant::One).unwrap();
        let lnc = ksg_lnc_detailed(&x, 1, &y, 1, 5, 0.25, KsgVariant::Two).unwrap();
        eprintln!(
            "rho 0.99 (I = {want:.4}), n 10000, k 5: errors KSG1 {:+.4}, KSG2 {:+.4}, LNC(0.25) {:+.4} ({} points corrected)",
            k1 - want,
            lnc.ksg - want,
            lnc.mi() - want,
            lnc.corrected_points
        );
        for (name, got) in [("KSG1", k1), ("KSG2", lnc.ksg), ("LNC", lnc.mi())] {
            assert!(close(got, want, 0.05), "{name} {got} vs {want}");
        }
    }

    /// Where KSG needs exponentially many samples (I = 10 nats from 5000 samples) it underestimates by
    /// several nats; the local non-uniformity correction recovers I.
    #[test]
    fn lnc_recovers_very_strong_dependence() {
        let want = 10.0;
        let (x, y) = gaussian_blocks_by_mi(5_000, 1, want, 5);
        for variant in [KsgVariant::One, KsgVariant::Two] {
            let e = ksg_lnc_detailed(&x, 1, &y, 1, 5, 0.25, variant).unwrap();
            eprintln!(
                "1+1, I = {want}, n 5000, k 5, alpha 0.25, base {variant:?}: error KSG {:+.4}, LNC {:+.4} ({} points corrected)",
                e.ksg - want,
                e.mi() - want,
                e.corrected_points
            );
            assert!(e.ksg < want - 2.0, "KSG {} should underestimate", e.ksg);
            assert!(close(e.mi(), want, 0.2), "LNC {} vs {want}", e.mi());
            assert!((e.mi() - want).abs() < 0.1 * (e.ksg - want).abs());
        }
        // 2 + 2 dimensions (general-d PCA): I = 2 × 5 nats
        let (x, y) = gaussian_blocks_by_mi(5_000, 2, 5.0, 9);
        let e = ksg_lnc_detailed(&x, 2, &y, 2, 10, 0.2, KsgVariant::Two).unwrap();
        eprintln!(
            "2+2, I = 10, n 5000, k 10, alpha 0.2: error KSG {:+.4}, LNC {:+.4} ({} points corrected)",
            e.ksg - 10.0,
            e.mi() - 10.0,
            e.corrected_points
        );
        assert!(e.ksg < 7.0, "KSG {}", e.ksg);
        assert!(close(e.mi(), 10.0, 0.3), "LNC {}", e.mi());
    }

    #[test]
    fn ksg_on_3d_gaussians() {
        for (rho, tol) in [(0.3, 0.03), (0.6, 0.05)] {
            let (x, y) = gaussian_blocks(10_000, 3, rho, 12);
            let want = gaussian_truth(3, rho);
            let k1 = ksg(&x, 3, &y, 3, 5, KsgVariant::One).unwrap();
            let k2 = ksg(&x, 3, &y, 3, 5, KsgVariant::Two).unwrap();
            eprintln!(
                "3+3, rho {rho} (I = {want:.4}), n 10000, k 5: errors KSG1 {:+.4}, KSG2 {:+.4}",
                k1 - want,
                k2 - want
            );
            assert!(close(k1, want, tol), "rho {rho}: KSG1 {k1} vs {want}");
            assert!(close(k2, want, tol), "rho {rho}: KSG2 {k2} vs {want}");
        }
    }

    #[test]
    fn independent_variables_give_zero() {
        let (x, _) = gaussian_blocks(10_000, 1, 0.0, 31);
        let (y, _) = gaussian_blocks(10_000, 1, 0.0, 32);
        let (x3, _) = gaussian_blocks(5_000, 3, 0.0, 33);
        let (y2, _) = gaussian_blocks(5_000, 2, 0.0, 34);
        let cases = [
            ("1+1 KSG1", ksg(&x, 1, &y, 1, 5, KsgVariant::One).unwrap()),
            ("1+1 KSG2", ksg(&x, 1, &y, 1, 5, KsgVariant::Two).unwrap()),
            ("1+1 LNC(0.25)", ksg_lnc(&x, 1, &y, 1, 5, 0.25).unwrap()),
            ("3+2 KSG1", ksg(&x3, 3, &y2, 2, 5, KsgVariant::One).unwrap()),
            ("3+2 KSG2", ksg(&x3, 3, &y2, 2, 5, KsgVariant::Two).unwrap()),
        ];
        for (name, got) in cases {
            eprintln!("independent, {name}: {got:+.4}");
            assert!(got.abs() < 0.02, "{name}: {got}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = [0.1, 0.5, 0.3, 0.9];
        let y = [1.0, 0.2, 0.7, 0.4];
        let v = KsgVariant::One;
        assert_eq!(ksg(&[], 1, &[], 1, 1, v), Err(MiError::Empty));
        assert_eq!(
            ksg(&x, 0, &y, 1, 1, v),
            Err(MiError::ZeroDim { which: "x" })
        );
        assert_eq!(
            ksg(&x, 1, &y, 0, 1, v),
            Err(MiError::ZeroDim { which: "y" })
        );
        assert_eq!(
            ksg(&x, 3, &y, 1, 1, v),
            Err(MiError::Ragged {
                which: "x",
                len: 4,
                dim: 3
            })
        );
        assert_eq!(
            ksg(&x, 1, &y[..3], 1, 1, v),
            Err(MiError::LengthMismatch { nx: 4, ny: 3 })
        );
        assert_eq!(
            ksg(&x, 2, &y, 1, 1, v),
            Err(MiError::LengthMismatch { nx: 2, ny: 4 })
        );
        for k in [0, 4, 9] {
            assert_eq!(ksg(&x, 1, &y, 1, k, v), Err(MiError::InvalidK { k, n: 4 }));
        }
        let mut bad = y;
        bad[2] = f64::NAN;
        assert!(matches!(
            ksg(&x, 1, &bad, 1, 1, v),
            Err(MiError::NonFinite {
                which: "y",
                index: 2,
                ..
            })
        ));
        bad[2] = f64::NEG_INFINITY;
        assert!(matches!(
            ksg_lnc(&bad, 1, &y, 1, 2, 0.3),
            Err(MiError::NonFinite { which: "x", .. })
        ));
        for alpha in [0.0, 1.0, -0.5, 2.0, f64::NAN] {
            assert!(matches!(
                ksg_lnc(&x, 1, &y, 1, 2, alpha),
                Err(MiError::InvalidAlpha(_))
            ));
        }
        assert_eq!(
            ksg_lnc(&x, 1, &y, 1, 1, 0.3),
            Err(MiError::TooFewNeighbours { k: 1, d: 2 })
        );
        assert_eq!(
            ksg_lnc(&x, 1, &y, 1, 4, 0.3),
            Err(MiError::InvalidK { k: 4, n: 4 })
        );
        assert_eq!(
            gaussian_mi_1d(&[1.0], &[2.0]),
            Err(MiError::TooFewSamples { n: 1, min: 2 })
        );
        assert_eq!(gaussian_mi_1d(&[], &[]), Err(MiError::Empty));
        assert_eq!(
            gaussian_mi_1d(&x, &y[..2]),
            Err(MiError::LengthMismatch { nx: 4, ny: 2 })
        );
        assert_eq!(
            gaussian_mi_1d(&[2.0; 4], &y),
            Err(MiError::ZeroVariance { which: "x" })
        );
        assert_eq!(
            gaussian_mi_1d(&x, &[2.0; 4]),
            Err(MiError::ZeroVariance { which: "y" })
        );
        assert!(matches!(
            gaussian_mi_1d(&x, &bad),
            Err(MiError::NonFinite { .. })
        ));
        // the smallest valid problem works
        assert!(ksg(&x, 1, &y, 1, 3, KsgVariant::Two).unwrap().is_finite());
        assert!(ksg_lnc(&x, 1, &y, 1, 3, 0.5).unwrap().is_finite());
        assert!(MiError::Empty.to_string().contains("no samples"));
    }

    /// Exact ties, including whole neighbourhoods of coincident points: finite estimates (or, for LNC, a flat
    /// neighbourhood error), never a panic.
    #[test]
    fn ties_do_not_panic() {
        let mut rng = Rng::new(41);
        let x: Vec<f64> = (0..2_000).map(|_| rng.below(7) as f64).collect();
        let y: Vec<f64> = x.iter().map(|&v| v + rng.below(3) as f64).collect();
        for variant in [KsgVariant::One, KsgVariant::Two] {
            let got = ksg(&x, 1, &y, 1, 5, variant).unwrap();
            assert!(got.is_finite(), "{variant:?}: {got}");
            match ksg_lnc_detailed(&x, 1, &y, 1, 5, 0.3, variant) {
                Ok(e) => assert!(e.mi().is_finite()),
                Err(e) => assert!(matches!(e, MiError::FlatNeighbourhood { .. }), "{e}"),
            }
        }
        let same = vec![1.5; 50];
        assert!(ksg(&same, 1, &same, 1, 3, KsgVariant::One)
            .unwrap()
            .is_finite());
        assert!(ksg(&same, 1, &same, 1, 3, KsgVariant::Two)
            .unwrap()
            .is_finite());
        assert!(ksg_lnc(&same, 1, &same, 1, 3, 0.3).unwrap().is_finite());
        // jittered, the ties are gone and the data are continuous again
        let (mut xj, mut yj) = (x.clone(), y.clone());
        jitter(&mut xj, 1e-3, 1);
        jitter(&mut yj, 1e-3, 2);
        assert!(ksg(&xj, 1, &yj, 1, 5, KsgVariant::One).unwrap().is_finite());
    }

    #[test]
    fn jitter_is_seeded_gaussian_noise() {
        let base: Vec<f64> = (0..100_001).map(|i| i as f64).collect();
        let (mut a, mut b, mut c) = (base.clone(), base.clone(), base.clone());
        jitter(&mut a, 0.5, 7);
        jitter(&mut b, 0.5, 7);
        jitter(&mut c, 0.5, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let noise: Vec<f64> = a.iter().zip(&base).map(|(u, v)| u - v).collect();
        let n = noise.len() as f64;
        let mean = noise.iter().sum::<f64>() / n;
        let sd = (noise.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!(close(sd, 0.5, 0.01), "sd {sd}");
        for sigma in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut d = base[..10].to_vec();
            jitter(&mut d, sigma, 3);
            assert_eq!(d, &base[..10]);
        }
    }

    /// The kd-tree searches, the sorted 1-D counts and the brute-force fallbacks agree exactly, ties and
    /// boundary radii included.
    #[test]
    fn tree_sorted_and_brute_force_agree() {
        let mut rng = Rng::new(51);
        let n = 600;
        // coarse values: many exact ties and exact boundary distances
        let pts: Vec<f64> = (0..n * 3).map(|_| (rng.below(40) as f64) * 0.25).collect();
        let k = 7;
        let kth = |nb: &[u32]| -> Vec<f64> {
            (0..n)
                .map(|i| {
                    nb[i * k..(i + 1) * k]
                        .iter()
                        .map(|&j| {
                            cheb(
                                &pts[i * 3..i * 3 + 3],
                                &pts[j as usize * 3..j as usize * 3 + 3],
                            )
                        })
                        .fold(0.0, f64::max)
                })
                .collect()
        };
        let tree = knn_tree::<3>(&pts, k).unwrap();
        let brute = knn_brute(&pts, 3, k);
        assert_eq!(kth(&tree), kth(&brute));
        for i in 0..n {
            assert!(tree[i * k..(i + 1) * k].iter().all(|&j| j as usize != i));
        }
        // radii: 0, distances to other points (on the boundary), and in between
        let radius: Vec<f64> = (0..n)
            .map(|i| match i % 3 {
                0 => 0.0,
                1 => cheb(
                    &pts[i * 3..i * 3 + 3],
                    &pts[((i * 7) % n) * 3..((i * 7) % n) * 3 + 3],
                ),
                _ => 0.3 + 0.1 * (i % 17) as f64,
            })
            .collect();
        let one_d: Vec<f64> = pts.iter().step_by(3).copied().collect();
        let two_d: Vec<f64> = pts.chunks_exact(3).flat_map(|p| [p[0], p[1]]).collect();
        for strict in [true, false] {
            assert_eq!(
                counts_sorted(&one_d, &radius, strict),
                counts_brute(&one_d, 1, &radius, strict),
                "1-D, strict {strict}"
            );
            assert_eq!(
                counts_tree::<2>(&two_d, &radius, strict).unwrap(),
                counts_brute(&two_d, 2, &radius, strict),
                "2-D, strict {strict}"
            );
            assert_eq!(
                counts_tree::<3>(&pts, &radius, strict).unwrap(),
                counts_brute(&pts, 3, &radius, strict),
                "3-D, strict {strict}"
            );
        }
    }

    /// Constant extra coordinates do not change max-norm distances, so padding x routes the searches through
    /// the kd-tree (joint 4-D, marginal 3-D) and brute force (joint 10-D, marginal 9-D) with the same result
    /// as the sorted 1-D path.
    #[test]
    fn every_search_path_gives_the_same_estimate() {
        let (x, y) = gaussian_blocks(2_000, 1, 0.7, 61);
        let pad = |dx: usize| -> Vec<f64> {
            x.iter()
                .flat_map(|&v| std::iter::once(v).chain(std::iter::repeat_n(0.0, dx - 1)))
                .collect()
        };
        for variant in [KsgVariant::One, KsgVariant::Two] {
            let base = ksg(&x, 1, &y, 1, 4, variant).unwrap();
            for dx in [3, 9] {
                let got = ksg(&pad(dx), dx, &y, 1, 4, variant).unwrap();
                assert!(
                    close(got, base, 1e-12),
                    "{variant:?}, dx {dx}: {got} vs {base}"
                );
            }
        }
        // the padded box is flat in the constant directions: LNC refuses it
        let padded = pad(3);
        assert!(matches!(
            ksg_lnc(&padded, 3, &y, 1, 4, 0.3),
            Err(MiError::FlatNeighbourhood { .. })
        ));
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (x, y) = gaussian_blocks(3_000, 2, 0.5, 71);
        let run = || {
            (
                ksg(&x, 2, &y, 2, 6, KsgVariant::One).unwrap(),
                ksg_lnc(&x, 2, &y, 2, 6, 0.2).unwrap(),
            )
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(one, three);
    }

    /// The workload of the privacy experiments: n = 20000 2-D points, k = 50. Prints the single-thread time.
    #[test]
    fn timing_n20000_k50_single_thread() {
        let rho = 0.6;
        let (x, y) = gaussian_blocks(20_000, 1, rho, 3);
        let want = gaussian_truth(1, rho);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            for variant in [KsgVariant::One, KsgVariant::Two] {
                let t = std::time::Instant::now();
                let got = ksg(&x, 1, &y, 1, 50, variant).unwrap();
                eprintln!(
                    "n 20000, k 50, 2-D, 1 thread: KSG {variant:?} {:.3} s, error {:+.4}",
                    t.elapsed().as_secs_f64(),
                    got - want
                );
                assert!(close(got, want, 0.03));
            }
            for alpha in [0.5, 0.7] {
                let t = std::time::Instant::now();
                let e = ksg_lnc_detailed(&x, 1, &y, 1, 50, alpha, KsgVariant::Two).unwrap();
                eprintln!(
                    "n 20000, k 50, 2-D, 1 thread: LNC alpha {alpha} {:.3} s, error {:+.4} ({} points corrected)",
                    t.elapsed().as_secs_f64(),
                    e.mi() - want,
                    e.corrected_points
                );
                assert!(close(e.mi(), want, 0.03));
            }
        });
    }
}
