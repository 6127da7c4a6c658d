//! The block decomposition: the top-r subspace of X (N × C) from matrix products instead of the lightweight
//! SVD's per-component vector passes (Halko, Martinsson & Tropp 2011, randomized subspace iteration with a
//! Rayleigh–Ritz step).
//!
//! With Q (N × l, l = r + p, orthonormal columns) an estimate of the dominant column space of X:
//!
//! 1. start from a Gaussian Q₀ (fixed seed: the result is a function of X), then `steps` times
//!    Q ← orth(X Xᵀ Q), either through the N × N Gram matrix G = X Xᵀ formed once by one product (the **Gram
//!    route**: each step then costs O(N²·l) instead of reading X) or directly as X (Xᵀ Q) (the **direct
//!    route**: two skinny products per step, no O(N²·C) Gram); with N small the Gram route instead takes the
//!    exact eigendecomposition of G (the **full** route, exact top-r subspace);
//! 2. Rayleigh–Ritz: the l × l matrix T = Qᵀ X Xᵀ Q, its eigendecomposition T = W Λ Wᵀ, Q ← Q W (the Ritz
//!    vectors, by descending Ritz value λ_j = ‖Xᵀ q_j‖², a lower bound of the j-th eigenvalue of X Xᵀ);
//! 3. the first r Ritz vectors: V = Qᵣᵀ X (one product), s_j = ‖v_j‖, then u_j = q_j·s_j and v_j / s_j (as
//!    `exact_low_rank`: U carries the singular values, V has unit rows), and X_U = X − U V (one product).
//!
//! U's columns are orthogonal, so X_T = U V is the orthogonal projection of X onto span(U) and
//! ‖X‖² = ‖X_T‖² + ‖X_U‖² (what `LowRank::energy` assumes). X_U is formed explicitly, so the split
//! X_T + X_U = X is exact up to f32 round-off whatever the quality of the basis.
//!
//! X may be a list of blocks [X_1 … X_K] (N × C each, side by side): the batch-shared basis uses the whole
//! batch as one N × B·HW matrix without copying it (G = Σ_k X_k X_kᵀ, X Xᵀ Q = Σ_k X_k (X_kᵀ Q)).

use super::svd::sumsq;
use crate::error::CoreError;
use crate::freivalds::dot64;
use crate::gemm::{sgemm, sgemm_ld, Mat};
use crate::rng::Rng;
use nalgebra::{DMatrix, SymmetricEigen};
use std::fmt;
use std::str::FromStr;

/// How the block method reaches its basis (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BlockRoute {
    /// The cheaper of the other two by the FLOP model of [`block_svd_flops`] (the direct route's skinny
    /// products counted 1.5 times).
    #[default]
    Auto,
    /// Form G = X Xᵀ once, then subspace iteration on G (or its exact eigendecomposition when N ≤ 64 or
    /// 2·l ≥ N).
    Gram,
    /// Subspace iteration through X: Q ← orth(X (Xᵀ Q)), never forming G.
    Direct,
}

impl fmt::Display for BlockRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockRoute::Auto => "auto",
            BlockRoute::Gram => "gram",
            BlockRoute::Direct => "direct",
        })
    }
}

/// Parameters of the block method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSvd {
    /// Applications of X Xᵀ before the Rayleigh–Ritz step on the direct route (≥ 1; 0 counts as 1). The Gram
    /// route takes at least [`GRAM_STEPS`], each costing O(N²·l) only.
    pub power: usize,
    /// Oversampling: the basis has l = min(N, r + p) columns, p = oversample on the Gram route and
    /// min(oversample, max(r, 2)) on the direct route (whose products over X cost ∝ l).
    pub oversample: usize,
    /// Gram, direct, or chosen by cost.
    pub route: BlockRoute,
}

/// Subspace steps on the Gram route (cheap there: O(N²·l) each, X is not read).
pub const GRAM_STEPS: usize = 6;

impl Default for BlockSvd {
    /// power 1, oversampling 8, route chosen by cost.
    fn default() -> Self {
        BlockSvd {
            power: 1,
            oversample: 8,
            route: BlockRoute::Auto,
        }
    }
}

/// Which SVD the decomposition runs ([`super::decompose_batch_with`]).
///
/// Strings (`FromStr`, case-insensitive): `light` (= `light:1`), `light:I` (I ≥ 1 rounds of Algorithm 1),
/// `block` (the defaults of [`BlockSvd`]), `block:Q`, `block:Q:P`, `block:Q:P:ROUTE` (Q ≥ 1 power steps,
/// P oversampling, ROUTE `auto`, `gram` or `direct`). `Display` gives a form that parses back to the same
/// method (`light`, `light:2`, `block`, `block:2:8:auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvdMethod {
    /// The paper's lightweight SVD (Algorithm 1) with `iters` rounds per component (1 or 2 in the paper).
    Light { iters: usize },
    /// The block method of this module.
    Block(BlockSvd),
}

impl SvdMethod {
    /// Algorithm 1 with `iters` rounds.
    pub fn light(iters: usize) -> Self {
        SvdMethod::Light { iters }
    }
    /// The block method with its defaults.
    pub fn block() -> Self {
        SvdMethod::Block(BlockSvd::default())
    }
}

impl Default for SvdMethod {
    /// `light:1`, the decomposition's historical default.
    fn default() -> Self {
        SvdMethod::Light { iters: 1 }
    }
}

impl fmt::Display for SvdMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SvdMethod::Light { iters: 1 } => f.write_str("light"),
            SvdMethod::Light { iters } => write!(f, "light:{iters}"),
            SvdMethod::Block(b) if *b == BlockSvd::default() => f.write_str("block"),
            SvdMethod::Block(b) => write!(f, "block:{}:{}:{}", b.power, b.oversample, b.route),
        }
    }
}

impl FromStr for SvdMethod {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, CoreError> {
        let t = s.trim().to_ascii_lowercase();
        let bad = |why: &str| {
            CoreError::Invalid(format!(
                "svd method {s:?}: {why} (expected light, light:I, block, block:Q, block:Q:P or block:Q:P:ROUTE)"
            ))
        };
        let mut parts = t.split(':').map(str::trim);
        let kind = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let count = |a: &str, what: &str, min: usize| -> Result<usize, CoreError> {
            match a.parse::<usize>() {
                Ok(v) if v >= min => Ok(v),
                Ok(_) => Err(bad(&format!("{what} must be at least {min}"))),
                Err(_) => Err(bad(&format!("{what} {a:?} is not a whole number"))),
            }
        };
        match kind {
            "light" => match args.as_slice() {
                [] => Ok(SvdMethod::Light { iters: 1 }),
                [i] => Ok(SvdMethod::Light {
                    iters: count(i, "the number of rounds", 1)?,
                }),
                _ => Err(bad("light takes at most one number")),
            },
            "block" => {
                let mut b = BlockSvd::default();
                if args.len() > 3 {
                    return Err(bad("block takes at most three arguments"));
                }
                if let Some(q) = args.first() {
                    b.power = count(q, "the number of power steps", 1)?;
                }
                if let Some(p) = args.get(1) {
                    b.oversample = count(p, "the oversampling", 0)?;
                }
                if let Some(r) = args.get(2) {
                    b.route = match *r {
                        "auto" => BlockRoute::Auto,
                        "gram" => BlockRoute::Gram,
                        "direct" => BlockRoute::Direct,
                        _ => return Err(bad("the route must be auto, gram or direct")),
                    };
                }
                Ok(SvdMethod::Block(b))
            }
            _ => Err(bad("unknown method")),
        }
    }
}

/// N up to which the Gram route takes the exact eigendecomposition of G (f64, O(N³): 0.4 ms at N = 64,
/// 2.7 ms at 128, 19 ms at 256 on the development machine, against a few ms for the subspace steps).
const FULL_EIG_MAX_N: usize = 64;

/// The route actually taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Full,
    Gram,
    Direct,
}

/// Basis columns l = min(N, r + p) for rank r on the direct route, with p = min(oversample, max(r, 2)):
/// small ranks get fewer extra columns (the cost of its every product over X is ∝ l).
fn columns(n: usize, r: usize, m: &BlockSvd) -> usize {
    (r + m.oversample.min(r.max(2))).min(n)
}

/// Basis columns on the Gram route: l = min(N, r + oversample) (the extra columns cost O(N²) per step only).
fn gram_columns(n: usize, r: usize, m: &BlockSvd) -> usize {
    (r + m.oversample).min(n)
}

/// The Gram route's subspace steps.
fn gram_steps(m: &BlockSvd) -> usize {
    m.power.max(GRAM_STEPS)
}

/// FLOPs of the basis by each route for an N × C matrix and l columns: (gram incl. forming G, direct).
fn basis_flops(n: usize, c: usize, l: usize, m: &BlockSvd) -> (f64, f64) {
    let (n, c, l) = (n as f64, c as f64, l as f64);
    let ortho = 4.0 * n * l * l;
    let gram = 2.0 * n * n * c + (gram_steps(m) as f64 + 1.0) * (2.0 * n * n * l + ortho);
    // The first step multiplies l rows of X by Xᵀ; each further one costs two products.
    let steps = m.power.max(1) as f64;
    let direct = 2.0 * n * l * c
        + (steps - 1.0) * 4.0 * n * l * c
        + steps * ortho
        + 2.0 * n * l * c
        + 2.0 * l * l * c;
    (gram, direct)
}

/// The weight of the direct route's FLOPs against the Gram route's: its products are skinny (l columns),
/// which the GEMM runs at a lower rate than the square Gram product.
const DIRECT_WEIGHT: f64 = 1.5;

/// The route for rank r of an N × C matrix.
pub(crate) fn route(n: usize, c: usize, r: usize, m: &BlockSvd) -> Route {
    let (l, lg) = (columns(n, r, m), gram_columns(n, r, m));
    let gram = if n <= FULL_EIG_MAX_N || 2 * lg >= n {
        Route::Full
    } else {
        Route::Gram
    };
    match m.route {
        BlockRoute::Gram => gram,
        BlockRoute::Direct => Route::Direct,
        BlockRoute::Auto => {
            let (g, d) = (basis_flops(n, c, lg, m).0, basis_flops(n, c, l, m).1);
            if DIRECT_WEIGHT * d < g {
                Route::Direct
            } else {
                gram
            }
        }
    }
}

/// Floating-point operations of the block method on B samples of N × HW at rank r (per-sample bases):
/// the basis by the route `Auto`/`Gram`/`Direct` takes (forming G: 2N²·HW; the full route's
/// eigendecomposition counted as 9·N³; the direct route's first step 2·N·HW·l, each further one 4·N·HW·l,
/// its Ritz step 2·N·HW·l + 2·l²·HW; the orthonormalisations 4·N·l² each), then V (2·N·HW·r, or 2·l·HW·r
/// from the direct route's Ritz product) and X_U = X − U V (2·N·HW·r). Zero at r = N (U = I, V = X).
pub fn block_svd_flops(b: usize, n: usize, hw: usize, r: usize, m: &BlockSvd) -> f64 {
    let r = r.min(n);
    if n == 0 || hw == 0 || r == 0 || r == n {
        return 0.0;
    }
    let l = columns(n, r, m);
    let (g, d) = (
        basis_flops(n, hw, gram_columns(n, r, m), m).0,
        basis_flops(n, hw, l, m).1,
    );
    let nf = n as f64;
    let (hwf, rf) = (hw as f64, r as f64);
    if thin_shape(n, hw) {
        // K = Xᵀ X, its eigendecomposition, Wᵀ Xᵀ; then V = Qᵀ X.
        let basis = 4.0 * nf * hwf * hwf + 9.0 * hwf * hwf * hwf;
        return b as f64 * (basis + 4.0 * nf * hwf * rf);
    }
    let (basis, v) = match route(n, hw, r, m) {
        Route::Full => (
            2.0 * nf * nf * hwf + 9.0 * nf * nf * nf,
            2.0 * nf * hwf * rf,
        ),
        Route::Gram => (g, 2.0 * nf * hwf * rf),
        // V = Wᵣᵀ (Qᵀ X) from the Ritz step's product.
        Route::Direct => (d, 2.0 * l as f64 * hwf * rf),
    };
    b as f64 * (basis + v + 2.0 * nf * hwf * rf)
}

/// Scratch of the block method, kept in a [`super::LowRank`] between calls and between the two phases of the
/// energy and entropy policies (spectrum, then the factors at the batch's r).
#[derive(Clone, Debug, Default)]
pub(crate) struct BlockScratch {
    /// G = X Xᵀ (N × N), valid when `has_g`.
    g: Vec<f32>,
    has_g: bool,
    /// The basis: l rows of N (orthonormal); after [`ritz`], the Ritz vectors by descending Ritz value.
    qt: Vec<f64>,
    q32: Vec<f32>,
    /// Ritz values (l), descending.
    pub(crate) ritz: Vec<f64>,
    /// Basis size (0: no basis yet).
    pub(crate) l: usize,
    /// ‖X‖² (f64).
    pub(crate) total: f64,
    /// Squared norms of X's N rows (summed over the blocks), from the same pass as `total`.
    norms: Vec<f64>,
    /// Products: Qᵀ A (l × N), Qᵀ X_k (l × C), T (l × l), −U (N × r).
    yt: Vec<f32>,
    zt: Vec<f32>,
    t32: Vec<f32>,
    negu: Vec<f32>,
    /// The direct route's last zt = Q_oldᵀ X (one block) and Wᵀ (l × l, row j = the j-th Ritz vector's
    /// coefficients), valid when `z_valid`: then V = Wᵣᵀ zt.
    z_valid: bool,
    wt32: Vec<f32>,
    /// The basis holds every component of X with a nonzero singular value (the thin route): no rank needs
    /// more columns than `l`.
    complete: bool,
}

impl BlockScratch {
    /// Starts on a new matrix of `n` rows: ‖X‖² and its rows' squared norms (one pass), no Gram, no basis.
    pub(crate) fn start(&mut self, xs: &[&[f32]], n: usize) {
        self.norms.clear();
        self.norms.resize(n, 0.0);
        for x in xs {
            let c = x.len().checked_div(n).unwrap_or(0).max(1);
            for (nrm, row) in self.norms.iter_mut().zip(x.chunks_exact(c)) {
                *nrm += sumsq(row);
            }
        }
        self.total = self.norms.iter().sum();
        self.has_g = false;
        self.z_valid = false;
        self.complete = false;
        self.l = 0;
        self.ritz.clear();
    }

    /// Lets go of one decomposition's buffers (G, the basis, the products): called once the factors are made,
    /// so that a layer's factorisation does not keep O(N² + l·C) scratch per sample until its next step
    /// (every split layer's at once, in the trusted runtime's peak). The next decomposition regrows them.
    pub(crate) fn release(&mut self) {
        *self = BlockScratch::default();
    }

    /// Bytes held by the buffers.
    pub(crate) fn bytes(&self) -> usize {
        8 * (self.qt.capacity() + self.ritz.capacity() + self.norms.capacity())
            + 4 * (self.g.capacity()
                + self.q32.capacity()
                + self.yt.capacity()
                + self.zt.capacity()
                + self.t32.capacity()
                + self.negu.capacity()
                + self.wt32.capacity())
    }

    /// Once an energy policy's rank is found: lets go of the products (above all Qᵀ X, l × C) where they hold
    /// more than `max_bytes`, keeping the basis (and G, while within). The factors then take V = Qᵣᵀ X, one
    /// product more, instead of Wᵣᵀ (Qᵀ X): a batch's samples each keep their scratch from the rank to the
    /// factors, and these products are the bulk of it (VGG16 at 224 px, second conv, asym1: 4.8 MB a sample).
    /// `own_rank`: the sample's energy rank (the basis keeps at least that many rows).
    pub(crate) fn keep_basis_within(&mut self, max_bytes: usize, own_rank: usize) {
        let products = 4
            * (self.zt.capacity()
                + self.yt.capacity()
                + self.t32.capacity()
                + self.negu.capacity()
                + self.wt32.capacity());
        if products > max_bytes {
            self.zt = Vec::new();
            self.yt = Vec::new();
            self.t32 = Vec::new();
            self.negu = Vec::new();
            self.wt32 = Vec::new();
            self.z_valid = false;
        }
        // Still over (many channels on a small map: G is N × N, and the full routes' basis N × N): G goes, and
        // the basis keeps the rows that fit, the largest Ritz values first, and at least the sample's own rank
        // of them (whose Ritz values keep its energy). The factors need the batch's rank of them; a sample whose
        // basis falls short of it is made one again ([`ensure_rank`]), as where its basis was smaller.
        if self.bytes() > max_bytes && self.has_g {
            self.g = Vec::new();
            self.has_g = false;
        }
        let n = self.norms.len();
        if self.bytes() > max_bytes && n > 0 && self.l > 0 {
            let basis = 8 * self.qt.capacity() + 4 * self.q32.capacity();
            let room = max_bytes.saturating_sub(self.bytes() - basis);
            let keep = (room / (12 * n)).max(own_rank).min(self.l);
            self.qt.truncate(keep * n);
            self.qt.shrink_to_fit();
            self.q32.truncate(keep * n);
            self.q32.shrink_to_fit();
            self.ritz.truncate(keep);
            self.l = keep;
            self.complete = false;
        }
    }

    /// False when X is zero or not finite: no component is worth computing.
    pub(crate) fn worth(&self) -> bool {
        self.total > 0.0 && self.total.is_finite()
    }
}

/// G ← Σ_k X_k X_kᵀ.
fn form_gram(xs: &[&[f32]], n: usize, c: usize, s: &mut BlockScratch, threads: usize) {
    s.g.clear();
    s.g.resize(n * n, 0.0);
    for (k, x) in xs.iter().enumerate() {
        sgemm(
            n,
            n,
            c,
            Mat::rm(x, c),
            Mat::rm_t(x, c),
            &mut s.g,
            k > 0,
            threads,
        );
    }
    s.has_g = true;
}

/// Rows of qt (l × n) ← an orthonormal basis of their span, by classical Gram–Schmidt twice; a row that is
/// (numerically) in the span of the previous ones is replaced by a unit vector orthogonal to them, so the
/// result always has l orthonormal rows (l ≤ n).
fn orthonormalize(qt: &mut [f64], l: usize, n: usize) {
    for j in 0..l {
        let (done, rest) = qt.split_at_mut(j * n);
        let v = &mut rest[..n];
        let norm0 = dot64(v, v).sqrt();
        let project = |v: &mut [f64]| {
            for _ in 0..2 {
                for qk in done.chunks_exact(n) {
                    let c = dot64(qk, v);
                    v.iter_mut().zip(qk).for_each(|(a, &b)| *a -= c * b);
                }
            }
        };
        project(v);
        let mut norm = dot64(v, v).sqrt();
        if !(norm.is_finite() && norm0.is_finite() && norm > 1e-9 * norm0 && norm > 0.0) {
            // Replace by the standard basis vector farthest from the span (one exists since j < n).
            for e in 0..n {
                v.fill(0.0);
                v[e] = 1.0;
                project(v);
                norm = dot64(v, v).sqrt();
                if norm > 0.5 {
                    break;
                }
            }
        }
        v.iter_mut().for_each(|a| *a /= norm);
    }
}

/// q32 ← qt (the first l rows).
fn sync32(s: &mut BlockScratch, n: usize) {
    s.q32.clear();
    s.q32.extend(s.qt[..s.l * n].iter().map(|&v| v as f32));
}

/// yt (l × N) ← Qᵀ A with A = G (Gram) or X Xᵀ (direct), A symmetric.
fn apply(xs: &[&[f32]], n: usize, c: usize, s: &mut BlockScratch, gram: bool, threads: usize) {
    let l = s.l;
    s.yt.clear();
    s.yt.resize(l * n, 0.0);
    if gram {
        sgemm(
            l,
            n,
            n,
            Mat::rm(&s.q32, n),
            Mat::rm(&s.g, n),
            &mut s.yt,
            false,
            threads,
        );
        return;
    }
    s.zt.resize(l * c, 0.0);
    for (k, x) in xs.iter().enumerate() {
        // Zₖ = Qᵀ X_k (l × C), then Y += Zₖ X_kᵀ.
        sgemm(
            l,
            c,
            n,
            Mat::rm(&s.q32, n),
            Mat::rm(x, c),
            &mut s.zt,
            false,
            threads,
        );
        sgemm(
            l,
            n,
            c,
            Mat::rm(&s.zt, c),
            Mat::rm_t(x, c),
            &mut s.yt,
            k > 0,
            threads,
        );
    }
}

/// yt (l × N) ← Q₀ᵀ X Xᵀ with Q₀ the unit vectors of the l rows of X of largest norm (ties: the first), that
/// is those rows of X times Xᵀ (summed over the blocks).
fn apply_rows(xs: &[&[f32]], n: usize, c: usize, s: &mut BlockScratch, threads: usize) {
    let l = s.l;
    // (The rows' norms are those `start` took.)
    let norms = &s.norms;
    let mut rows: Vec<usize> = (0..n).collect();
    rows.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
    rows.truncate(l);
    s.yt.clear();
    s.yt.resize(l * n, 0.0);
    s.zt.resize(l * c, 0.0);
    for (k, x) in xs.iter().enumerate() {
        for (z, &i) in s.zt.chunks_exact_mut(c).zip(&rows) {
            z.copy_from_slice(&x[i * c..(i + 1) * c]);
        }
        sgemm(
            l,
            n,
            c,
            Mat::rm(&s.zt, c),
            Mat::rm_t(x, c),
            &mut s.yt,
            k > 0,
            threads,
        );
    }
}

/// The Rayleigh–Ritz step: T = Qᵀ A Q, Q ← Q W by descending eigenvalue of T. False if T is not finite or
/// its eigendecomposition fails.
fn ritz(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    s: &mut BlockScratch,
    gram: bool,
    threads: usize,
) -> bool {
    let l = s.l;
    let mut t = DMatrix::<f64>::zeros(l, l);
    if gram {
        apply(xs, n, c, s, true, threads);
        let y64: Vec<f64> = s.yt.iter().map(|&v| v as f64).collect();
        for (i, yi) in y64.chunks_exact(n).enumerate() {
            for (j, qj) in s.qt.chunks_exact(n).take(l).enumerate() {
                t[(i, j)] = dot64(yi, qj);
            }
        }
        // Symmetrise the round-off.
        t = (&t + t.transpose()) * 0.5;
    } else {
        s.t32.clear();
        s.t32.resize(l * l, 0.0);
        s.zt.resize(l * c, 0.0);
        for (k, x) in xs.iter().enumerate() {
            sgemm(
                l,
                c,
                n,
                Mat::rm(&s.q32, n),
                Mat::rm(x, c),
                &mut s.zt,
                false,
                threads,
            );
            sgemm(
                l,
                l,
                c,
                Mat::rm(&s.zt, c),
                Mat::rm_t(&s.zt, c),
                &mut s.t32,
                k > 0,
                threads,
            );
        }
        for i in 0..l {
            for j in 0..l {
                t[(i, j)] = 0.5 * (s.t32[i * l + j] as f64 + s.t32[j * l + i] as f64);
            }
        }
    }
    let Some(eig) = eigen(t) else {
        return false;
    };
    let mut order: Vec<usize> = (0..l).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let mut rotated = vec![0f64; l * n];
    for (j, &k) in order.iter().enumerate() {
        let w = eig.eigenvectors.column(k);
        let out = &mut rotated[j * n..(j + 1) * n];
        for (i, qi) in s.qt.chunks_exact(n).take(l).enumerate() {
            let wi = w[i];
            out.iter_mut().zip(qi).for_each(|(o, &q)| *o += wi * q);
        }
    }
    // (W is orthogonal to f64 round-off, so Q W keeps orthonormal rows.)
    s.qt[..l * n].copy_from_slice(&rotated);
    // On the direct route with one block, zt = Q_oldᵀ X is still there: V = Wᵀ zt costs r·l·C instead of
    // r·N·C (see `finish`).
    s.z_valid = !gram && xs.len() == 1;
    if s.z_valid {
        s.wt32.clear();
        for &k in &order {
            s.wt32
                .extend(eig.eigenvectors.column(k).iter().map(|&v| v as f32));
        }
    }
    s.ritz.clear();
    s.ritz
        .extend(order.iter().map(|&k| eig.eigenvalues[k].max(0.0)));
    sync32(s, n);
    true
}

/// The eigendecomposition of a finite symmetric matrix (None if not finite or not converged).
fn eigen(t: DMatrix<f64>) -> Option<SymmetricEigen<f64, nalgebra::Dyn>> {
    if !t.iter().all(|v| v.is_finite()) {
        return None;
    }
    SymmetricEigen::try_new(t, f64::EPSILON, 10_000)
}

/// Whether the thin route suits X (one block of C columns, N rows): at most half as many columns as rows and
/// few enough for an exact C × C eigendecomposition ([`FULL_EIG_MAX_N`]) — small maps of many channels (VGG's
/// and ResNet's last convs at 32 px: 4 × 4 or 2 × 2 maps of 512 channels), where X Xᵀ (N × N) and its
/// eigendecomposition would cost far more than X itself.
fn thin_suits(xs: &[&[f32]], n: usize, c: usize) -> bool {
    xs.len() == 1 && thin_shape(n, c)
}

/// The shape condition of [`thin_suits`]: 0 < C ≤ min(N/2, [`FULL_EIG_MAX_N`]).
fn thin_shape(n: usize, c: usize) -> bool {
    c > 0 && 2 * c <= n && c <= FULL_EIG_MAX_N
}

/// The thin route: the exact SVD of X [N × C] from K = Xᵀ X (C × C) = W Λ Wᵀ: qt ← q_j = X w_j / √λ_j by
/// descending λ_j (l = C; re-orthonormalised in f64, so a null direction becomes some unit vector orthogonal
/// to the rest: a zero component), Ritz values ← λ (exact up to K's f32 accumulation, as G's on the Gram
/// route). On failure (a non-finite K) leaves l = 0.
fn thin(x: &[f32], n: usize, c: usize, s: &mut BlockScratch, threads: usize) {
    s.l = 0;
    s.z_valid = false;
    s.t32.clear();
    s.t32.resize(c * c, 0.0);
    sgemm(
        c,
        c,
        n,
        Mat::rm_t(x, c),
        Mat::rm(x, c),
        &mut s.t32,
        false,
        threads,
    );
    let k = DMatrix::<f64>::from_fn(c, c, |i, j| {
        0.5 * (s.t32[i * c + j] as f64 + s.t32[j * c + i] as f64)
    });
    let Some(eig) = eigen(k) else {
        return;
    };
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    // Wᵀ by descending λ (row j = w_j), then Wᵀ Xᵀ (C × N): row j = (X w_j)ᵀ.
    s.wt32.clear();
    for &kk in &order {
        s.wt32
            .extend(eig.eigenvectors.column(kk).iter().map(|&v| v as f32));
    }
    s.yt.clear();
    s.yt.resize(c * n, 0.0);
    sgemm(
        c,
        n,
        c,
        Mat::rm(&s.wt32, c),
        Mat::rm_t(x, c),
        &mut s.yt,
        false,
        threads,
    );
    s.qt.clear();
    s.qt.resize(c * n, 0.0);
    for (j, &kk) in order.iter().enumerate() {
        let lam = eig.eigenvalues[kk];
        if lam > 0.0 && lam.is_finite() {
            let inv = 1.0 / lam.sqrt();
            for (q, &y) in s.qt[j * n..(j + 1) * n].iter_mut().zip(&s.yt[j * n..]) {
                *q = y as f64 * inv;
            }
        }
    }
    s.l = c;
    orthonormalize(&mut s.qt, c, n);
    s.ritz.clear();
    s.ritz
        .extend(order.iter().map(|&kk| eig.eigenvalues[kk].max(0.0)));
    s.complete = true;
    sync32(s, n);
}

/// The full route: qt ← every eigenvector of G by descending eigenvalue (l = N). False on failure.
fn full(n: usize, s: &mut BlockScratch) -> bool {
    let g = DMatrix::<f64>::from_fn(n, n, |i, j| {
        0.5 * (s.g[i * n + j] as f64 + s.g[j * n + i] as f64)
    });
    let Some(eig) = eigen(g) else {
        return false;
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    s.qt.clear();
    s.qt.resize(n * n, 0.0);
    for (j, &k) in order.iter().enumerate() {
        s.qt[j * n..(j + 1) * n].copy_from_slice(eig.eigenvectors.column(k).as_slice());
    }
    s.l = n;
    orthonormalize(&mut s.qt, n, n);
    s.ritz.clear();
    s.ritz
        .extend(order.iter().map(|&k| eig.eigenvalues[k].max(0.0)));
    sync32(s, n);
    true
}

/// Computes a basis of `l` Ritz vectors of X by `route` (forming G first if the route needs it and it is not
/// there). On failure (non-finite products) leaves l = 0.
#[allow(clippy::too_many_arguments)]
fn basis(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    l: usize,
    route: Route,
    m: &BlockSvd,
    s: &mut BlockScratch,
    threads: usize,
) {
    let l = l.min(n);
    s.l = 0;
    s.z_valid = false;
    if l == 0 || !s.worth() {
        return;
    }
    if route != Route::Direct && !s.has_g {
        form_gram(xs, n, c, s, threads);
    }
    if route == Route::Full || (route == Route::Gram && 2 * l >= n) {
        if !full(n, s) {
            s.l = 0;
        }
        return;
    }
    let gram = route == Route::Gram;
    let steps = if gram { gram_steps(m) } else { m.power.max(1) };
    s.l = l;
    let first = if gram {
        // Gaussian start; the seed depends only on the shape, so the result is a function of X.
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ ((n as u64) << 32) ^ l as u64);
        s.qt.clear();
        s.qt.extend((0..l * n).map(|_| rng.normal() as f64));
        orthonormalize(&mut s.qt, l, n);
        sync32(s, n);
        0
    } else {
        // Start from the l rows of largest norm (Q₀ = those unit vectors, the lightweight SVD's warm start
        // for l components at once): the first X Xᵀ Q₀ is those rows times Xᵀ, one product.
        apply_rows(xs, n, c, s, threads);
        1
    };
    for step in 0..steps {
        if step >= first {
            apply(xs, n, c, s, gram, threads);
        }
        if !s.yt.iter().all(|v| v.is_finite()) {
            s.l = 0;
            return;
        }
        s.qt.clear();
        s.qt.extend(s.yt.iter().map(|&v| v as f64));
        orthonormalize(&mut s.qt, l, n);
        sync32(s, n);
    }
    if !ritz(xs, n, c, s, gram, threads) {
        s.l = 0;
    }
}

/// The basis for a fixed rank r: l = r + p columns by the route [`route`] picks, or every component by the
/// thin route where it suits ([`thin_suits`]).
pub(crate) fn basis_for_rank(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    r: usize,
    m: &BlockSvd,
    s: &mut BlockScratch,
    threads: usize,
) {
    if thin_suits(xs, n, c) {
        s.l = 0;
        if s.worth() {
            thin(xs[0], n, c, s, threads);
        }
        return;
    }
    let rt = route(n, c * xs.len(), r, m);
    let l = if rt == Route::Direct {
        columns(n, r, m)
    } else {
        gram_columns(n, r, m)
    };
    basis(xs, n, c, l, rt, m, s, threads);
}

/// An eigendecomposition of a k × k symmetric matrix (nalgebra, f64, with vectors) counted as this many
/// times k³ FLOPs of GEMM work: measured on the development machine, 51 µs at k = 32, 273 µs at 64 and
/// 1.7 ms at 128, against GEMMs at about 80 GFLOP/s.
const EIG_FLOPS_PER_K3: f64 = 80.0;

/// The rank the direct route's energy search tries first (doubled after each try that falls short).
const ENERGY_FIRST_RANK: usize = 4;

/// The energy policy's rank of X: the smallest r whose first r Ritz values keep ≥ e·‖X‖².
///
/// Ritz values are lower bounds of the exact eigenvalues and each is the energy its Ritz vector keeps
/// (λ_j = ‖Xᵀ q_j‖²), so the factors at this r keep ≥ e·‖X‖² whatever the basis, and r is ≥ the exact
/// spectrum's `rank_for_energy` (equal once the Ritz values have converged).
///
/// First, by [`energy_rank_direct`], the direct route at small bases (cheap where the rank is small: the
/// paper's Asym2 keeps 2 to 6 of 64 to 512 channels at 32 px); where that falls short or would cost more
/// than the Gram route, the thin route (exact) or the Gram route (G formed once) with l growing from
/// r₀ = 8 + p (doubling, the exact eigendecomposition once 2·l ≥ N) until r ≤ l − p (or l = N); the full
/// route is exact up to G being accumulated in f32. Leaves the basis in `s` (at least r columns); returns
/// r ∈ [1, N].
pub(crate) fn energy_rank(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    e: f64,
    m: &BlockSvd,
    s: &mut BlockScratch,
    threads: usize,
) -> usize {
    if !s.worth() || n == 0 {
        return 1;
    }
    if let Some(r) = energy_rank_direct(xs, n, c, e, m, s, threads) {
        return r;
    }
    if thin_suits(xs, n, c) {
        // Exact: every nonzero component is in the basis.
        basis_for_rank(xs, n, c, 1, m, s, threads);
        return ritz_rank(s, s.l, e).unwrap_or(n);
    }
    let full_now = n <= FULL_EIG_MAX_N;
    let mut l = if full_now { n } else { gram_columns(n, 8, m) };
    loop {
        let rt = if full_now || 2 * l >= n {
            Route::Full
        } else {
            Route::Gram
        };
        basis(xs, n, c, l, rt, m, s, threads);
        if s.l == 0 {
            return n;
        }
        let trusted = if s.l == n {
            n
        } else {
            s.l.saturating_sub(m.oversample).max(1)
        };
        if let Some(r) = ritz_rank(s, trusted, e) {
            return r;
        }
        if s.l == n {
            return n;
        }
        l = (2 * l).min(n);
    }
}

/// FLOPs of the other routes to an energy rank of at least r₀ (what [`energy_rank`] does after the direct
/// route): the thin route's Xᵀ X and its eigendecomposition where it suits; else forming G, then with
/// N ≤ [`FULL_EIG_MAX_N`] its eigendecomposition, or the Gram route's tries at l = 8 + p, doubling, until
/// l − p ≥ r₀ (the exact eigendecomposition once 2·l ≥ N). Eigendecompositions count
/// [`EIG_FLOPS_PER_K3`]·k³.
fn energy_other_flops(xs: &[&[f32]], n: usize, c: usize, r0: usize, m: &BlockSvd) -> f64 {
    let (nf, cf) = (n as f64, (c * xs.len()) as f64);
    let eig = |k: f64| EIG_FLOPS_PER_K3 * k * k * k;
    if thin_suits(xs, n, c) {
        return 2.0 * nf * cf * cf + eig(cf);
    }
    let mut total = 2.0 * nf * nf * cf;
    if n <= FULL_EIG_MAX_N {
        return total + eig(nf);
    }
    let mut l = gram_columns(n, 8, m);
    loop {
        if 2 * l >= n {
            return total + eig(nf);
        }
        let lf = l as f64;
        total += (gram_steps(m) as f64 + 1.0) * (2.0 * nf * nf * lf + 4.0 * nf * lf * lf) + eig(lf);
        if l.saturating_sub(m.oversample) >= r0 {
            return total;
        }
        l = (2 * l).min(n);
    }
}

/// The energy rank by the direct route (see [`energy_rank`]): bases for r₀ = [`ENERGY_FIRST_RANK`], 2·r₀, …
/// (l = r₀ + p columns each, started afresh from X's rows of largest norm), each accepted when its first r₀
/// Ritz values keep ≥ e·‖X‖². With the route `Auto`, a try is made only while the tries up to it cost less
/// than the other routes would to reach the same r₀ ([`energy_other_flops`]; the direct route's products
/// counted [`DIRECT_WEIGHT`] times, as in [`route`]); with `Direct`, until l = N. None when it gives up (or its products
/// are not finite): the basis in `s` is then not to be used.
fn energy_rank_direct(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    e: f64,
    m: &BlockSvd,
    s: &mut BlockScratch,
    threads: usize,
) -> Option<usize> {
    let forced = match m.route {
        BlockRoute::Gram => return None,
        BlockRoute::Direct => true,
        BlockRoute::Auto => false,
    };
    let cols = c * xs.len();
    let mut spent = 0.0;
    let mut r0 = ENERGY_FIRST_RANK.min(n);
    loop {
        let l = columns(n, r0, m);
        if !forced {
            spent += DIRECT_WEIGHT * basis_flops(n, cols, l, m).1
                + EIG_FLOPS_PER_K3 * (l * l * l) as f64;
            if spent > energy_other_flops(xs, n, c, r0, m) {
                return None;
            }
        }
        basis(xs, n, c, l, Route::Direct, m, s, threads);
        if s.l == 0 {
            return None;
        }
        let first = if s.l == n { n } else { r0.min(s.l) };
        if let Some(r) = ritz_rank(s, first, e) {
            return Some(r);
        }
        if s.l == n {
            return Some(n);
        }
        r0 = (2 * r0).min(n);
    }
}

/// The batch-shared basis's energy rank: the smallest r ≥ `r0` at which the first r basis vectors in `s` keep
/// ≥ e of every block's own energy ‖X_k‖² (each sample keeps at least what the energy policy asks of its own
/// basis, where the batch's Ritz values alone would let a sample of less energy than the rest keep less). Grows
/// the basis (doubling, [`ensure_rank`]) while a block falls short within it; N where it cannot (the basis is
/// every direction, or its products are not finite): every channel is kept. Blocks that are zero or not finite
/// set no bound. One product Qᵀ X_k (l × C) a block per try.
#[allow(clippy::too_many_arguments)]
pub(crate) fn each_energy_rank(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    e: f64,
    r0: usize,
    m: &BlockSvd,
    s: &mut BlockScratch,
    threads: usize,
) -> usize {
    if !s.worth() || n == 0 {
        return r0.clamp(1, n.max(1));
    }
    let totals: Vec<f64> = xs.iter().map(|x| sumsq(x)).collect();
    let mut p = Vec::new();
    loop {
        let l = s.l;
        if l == 0 {
            return n;
        }
        let mut need = r0.min(l);
        let mut short = false;
        p.clear();
        p.resize(l * c, 0.0);
        for (x, &total) in xs.iter().zip(&totals) {
            if !(total > 0.0 && total.is_finite()) {
                continue;
            }
            sgemm(
                l,
                c,
                n,
                Mat::rm(&s.q32[..l * n], n),
                Mat::rm(x, c),
                &mut p,
                false,
                threads,
            );
            let mut kept = 0.0;
            let own = p.chunks_exact(c.max(1)).position(|row| {
                kept += sumsq(row);
                kept >= e * total
            });
            match own {
                Some(j) => need = need.max(j + 1),
                None => short = true,
            }
        }
        if !short {
            return need;
        }
        if l >= n || s.complete {
            return n;
        }
        ensure_rank(xs, n, c, (2 * l).min(n), m, s, threads);
        if s.l <= l {
            return n;
        }
    }
}

/// The smallest r ≤ `first` whose first r Ritz values in `s` keep ≥ e·‖X‖², if there is one.
fn ritz_rank(s: &BlockScratch, first: usize, e: f64) -> Option<usize> {
    let mut kept = 0.0;
    for (i, &v) in s.ritz.iter().take(first).enumerate() {
        kept += v;
        if kept >= e * s.total {
            return Some(i + 1);
        }
    }
    None
}

/// The entropy policy's rank ⌈2^μ⌉ from the eigenvalues of G (every one of them: O(N³)). Leaves G in `s`.
pub(crate) fn entropy_rank(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    s: &mut BlockScratch,
    threads: usize,
) -> usize {
    if !s.worth() || n == 0 {
        return 1;
    }
    form_gram(xs, n, c, s, threads);
    let g = DMatrix::<f64>::from_fn(n, n, |i, j| {
        0.5 * (s.g[i * n + j] as f64 + s.g[j * n + i] as f64)
    });
    if !g.iter().all(|v| v.is_finite()) {
        return n;
    }
    let sv: Vec<f64> = match SymmetricEigen::try_new(g, f64::EPSILON, 10_000) {
        Some(eig) => eig.eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).collect(),
        None => return n,
    };
    let mut sv = sv;
    sv.sort_by(|a, b| b.total_cmp(a));
    super::exact::entropy_rank(&sv)
}

/// Makes sure `s` holds a basis of at least r columns (recomputing it on the Gram route when G is there, by
/// [`route`] otherwise).
pub(crate) fn ensure_rank(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    r: usize,
    m: &BlockSvd,
    s: &mut BlockScratch,
    threads: usize,
) {
    if s.l >= r.min(n) || s.complete || !s.worth() {
        return;
    }
    if s.has_g {
        let l = gram_columns(n, r, m);
        let rt = if n <= FULL_EIG_MAX_N || 2 * l >= n {
            Route::Full
        } else {
            Route::Gram
        };
        basis(xs, n, c, l, rt, m, s, threads);
    } else {
        basis_for_rank(xs, n, c, r, m, s, threads);
    }
}

/// The factors at rank r from the basis in `s`: u (N × r, column j = q_j·s_j), for each block k
/// v_k (r × C, row j = q_jᵀ X_k / s_j with s_j² = Σ_k ‖q_jᵀ X_k‖²) and res_k = X_k − U V_k (not made where
/// res_k is empty). Components past the basis, with s_j = 0, or all of them when X is zero or not finite, are
/// zero (res_k = X_k there).
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish(
    xs: &[&[f32]],
    n: usize,
    c: usize,
    r: usize,
    s: &mut BlockScratch,
    u: &mut Vec<f32>,
    parts: &mut [(&mut Vec<f32>, &mut [f32])],
    threads: usize,
) {
    u.clear();
    u.resize(n * r, 0.0);
    let live = r.min(s.l);
    for (v, _) in parts.iter_mut() {
        v.clear();
        v.resize(r * c, 0.0);
    }
    if live == 0 {
        for ((_, res), x) in parts.iter_mut().zip(xs) {
            // (An empty `res`: the residual is not made here.)
            if !res.is_empty() {
                res.copy_from_slice(x);
            }
        }
        return;
    }
    for ((v, _), x) in parts.iter_mut().zip(xs) {
        if s.z_valid && xs.len() == 1 {
            let l = s.l;
            sgemm(
                live,
                c,
                l,
                Mat::rm(&s.wt32[..live * l], l),
                Mat::rm(&s.zt[..l * c], c),
                v,
                false,
                threads,
            );
        } else {
            sgemm(
                live,
                c,
                n,
                Mat::rm(&s.q32[..live * n], n),
                Mat::rm(x, c),
                v,
                false,
                threads,
            );
        }
    }
    let mut sj = vec![0f64; live];
    for (v, _) in parts.iter() {
        for (j, row) in v.chunks_exact(c.max(1)).take(live).enumerate() {
            sj[j] += sumsq(row);
        }
    }
    for (j, s2) in sj.iter_mut().enumerate() {
        let sv = s2.sqrt();
        let ok = sv > 0.0 && sv.is_finite() && (1.0 / sv).is_finite();
        *s2 = if ok { sv } else { 0.0 };
        for i in 0..n {
            u[i * r + j] = if ok {
                (s.qt[j * n + i] * sv) as f32
            } else {
                0.0
            };
        }
    }
    s.negu.clear();
    s.negu.extend(u.iter().map(|&v| -v));
    // Columns per block of the residual: X_k's block copied, then − U V added while it is in cache (one
    // pass over X and X_U instead of a copy and a product over the whole of them).
    let cb = (RES_BLOCK_FLOATS / n.max(1)).clamp(64, c.max(64));
    for ((v, res), x) in parts.iter_mut().zip(xs) {
        for (row, &sv) in v.chunks_exact_mut(c.max(1)).zip(&sj) {
            if sv > 0.0 {
                let inv = (1.0 / sv) as f32;
                row.iter_mut().for_each(|a| *a *= inv);
            } else {
                row.fill(0.0);
            }
        }
        if res.is_empty() {
            continue;
        }
        for j0 in (0..c).step_by(cb) {
            let w = cb.min(c - j0);
            for (rrow, xrow) in res.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                rrow[j0..j0 + w].copy_from_slice(&xrow[j0..j0 + w]);
            }
            sgemm_ld(
                n,
                w,
                r,
                Mat::rm(&s.negu, r),
                Mat::rm_from(v, c, j0),
                &mut res[j0..],
                c,
                true,
                threads,
            );
        }
    }
}

/// Floats of X_U per block of `finish`'s residual pass (256 KB).
const RES_BLOCK_FLOATS: usize = 1 << 16;

/// The exact factorisation at r = N: U = I, V_k = X_k, every residual zero.
pub(crate) fn identity(
    xs: &[&[f32]],
    n: usize,
    u: &mut Vec<f32>,
    parts: &mut [(&mut Vec<f32>, &mut [f32])],
) {
    u.clear();
    u.resize(n * n, 0.0);
    for i in 0..n {
        u[i * n + i] = 1.0;
    }
    for ((v, res), x) in parts.iter_mut().zip(xs) {
        v.clear();
        v.extend_from_slice(x);
        res.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// X = Σ_j s_j a_j b_jᵀ (N × C) with Gaussian a_j (N) and b_j (C) scaled to unit length: a spectrum close
    /// to `s` (the directions are nearly, not exactly, orthogonal).
    fn decaying(rng: &mut Rng, n: usize, c: usize, s: &[f64]) -> Vec<f32> {
        let mut x = vec![0f64; n * c];
        for &sj in s {
            let unit = |rng: &mut Rng, k: usize| {
                let v: Vec<f64> = (0..k).map(|_| rng.normal() as f64).collect();
                let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
                v.into_iter().map(|a| a / norm).collect::<Vec<_>>()
            };
            let (a, b) = (unit(rng, n), unit(rng, c));
            for (i, &ai) in a.iter().enumerate() {
                for (xv, &bv) in x[i * c..(i + 1) * c].iter_mut().zip(&b) {
                    *xv += sj * ai * bv;
                }
            }
        }
        x.into_iter().map(|v| v as f32).collect()
    }

    /// The exact energy rank of X (the full route on G).
    fn exact_rank(x: &[f32], n: usize, c: usize, e: f64) -> usize {
        let mut s = BlockScratch::default();
        s.start(&[x], n);
        basis(&[x], n, c, n, Route::Full, &BlockSvd::default(), &mut s, 1);
        ritz_rank(&s, n, e).unwrap_or(n)
    }

    fn direct(route: BlockRoute) -> BlockSvd {
        BlockSvd {
            route,
            ..BlockSvd::default()
        }
    }

    #[test]
    fn the_direct_energy_rank_keeps_what_it_reports_and_is_never_below_the_exact_rank() {
        let mut rng = Rng::new(5);
        for (n, c, decay) in [
            (64, 1024, 0.6),
            (128, 256, 0.8),
            (96, 300, 0.9),
            (40, 900, 0.7),
        ] {
            let s: Vec<f64> = (0..n).map(|j| f64::powi(decay, j as i32)).collect();
            let x = decaying(&mut rng, n, c, &s);
            for e in [0.5, 0.8, 0.97] {
                let want = exact_rank(&x, n, c, e);
                let mut sc = BlockScratch::default();
                sc.start(&[&x], n);
                let m = direct(BlockRoute::Direct);
                let r = energy_rank_direct(&[&x], n, c, e, &m, &mut sc, 1)
                    .expect("the forced direct route always gives a rank");
                assert!(
                    r >= want,
                    "N {n} E {e}: direct rank {r} below the exact {want}"
                );
                // Its factors keep at least e of ‖X‖² (the Ritz values are the kept energies).
                let (mut u, mut v, mut res) = (Vec::new(), Vec::new(), vec![0f32; n * c]);
                finish(
                    &[&x],
                    n,
                    c,
                    r,
                    &mut sc,
                    &mut u,
                    &mut [(&mut v, &mut res[..])],
                    1,
                );
                let total: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
                let left: f64 = res.iter().map(|&a| (a as f64).powi(2)).sum();
                assert!(
                    1.0 - left / total >= e - 1e-5,
                    "N {n} E {e} r {r}: keeps {}",
                    1.0 - left / total
                );
                // On these spectra it is at most a few components above the exact rank.
                assert!(
                    r <= want + want / 4 + 2,
                    "N {n} E {e}: rank {r} against {want}"
                );
            }
        }
    }

    #[test]
    fn small_ranks_take_the_direct_route_and_large_ones_of_small_matrices_leave_it() {
        let mut rng = Rng::new(6);
        let auto = direct(BlockRoute::Auto);
        // A few strong components in 128 channels × 256 pixels (a 16 × 16 map): the direct route finds the
        // rank with a basis of 8 columns.
        let x = decaying(&mut rng, 128, 256, &[10.0, 6.0, 3.0, 0.05, 0.04, 0.03]);
        let mut sc = BlockScratch::default();
        sc.start(&[&x], 128);
        let r = energy_rank_direct(&[&x], 128, 256, 0.9, &auto, &mut sc, 1);
        assert_eq!(r, Some(exact_rank(&x, 128, 256, 0.9)));
        assert!(sc.l <= 8, "basis of {} columns", sc.l);
        // Noise keeps 97 % only at a large rank: on 48 channels × 96 pixels the exact eigendecomposition of
        // G (48 × 48) costs less than the direct route's growing bases, which gives up.
        let noise: Vec<f32> = (0..48 * 96).map(|_| rng.normal()).collect();
        let mut sc = BlockScratch::default();
        sc.start(&[&noise], 48);
        assert_eq!(
            energy_rank_direct(&[&noise], 48, 96, 0.97, &auto, &mut sc, 1),
            None
        );
        // The whole policy then still gives the exact rank (by the full route).
        let mut sc = BlockScratch::default();
        sc.start(&[&noise], 48);
        assert_eq!(
            energy_rank(&[&noise], 48, 96, 0.97, &auto, &mut sc, 1),
            exact_rank(&noise, 48, 96, 0.97)
        );
        // With the Gram route chosen, the direct search is not made.
        let mut sc = BlockScratch::default();
        sc.start(&[&x], 128);
        assert_eq!(
            energy_rank_direct(&[&x], 128, 256, 0.9, &direct(BlockRoute::Gram), &mut sc, 1),
            None
        );
    }
}
