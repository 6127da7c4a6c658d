//! Freivalds checks of the accelerator's results, inside the trusted runtime, before they are used.
//!
//! The accelerator is hostile: every number it returns is checked against the trusted runtime's own copy of
//! the weights with fresh secret random vectors (drawn here for each check, never sent), at a small fraction
//! of the work it checks (Freivalds 1977; Slalom, Tramèr & Boneh 2019, does the same for inference):
//!
//! - `Y_U = conv(X_U, W) + b`, [B, M, OH, OW]: for random c (over the batch) and s (over output channels),
//!   `Σ_b Σ_m c_b s_m Y_U[b, m] = conv(Σ_b c_b X_U[b], Σ_m s_m W[m]) + (Σ_m s_m b_m)(Σ_b c_b)` at every output
//!   pixel — a conv with one output channel (1/(B·M) of the accelerator's work);
//! - `∇X = conv_transposed(∇Y, W)`, [B, N, H, W]: with c over the batch and t over input channels,
//!   `Σ_b Σ_j c_b t_j ∇X[b, j] = conv_transposed(Σ_b c_b ∇Y[b], Σ_j t_j W[:, j])` at every input pixel;
//! - `∇W_U = corr(X_U, ∇Y)`, [M, N, k, k]: with s over output and t over input channels,
//!   `Σ_m Σ_j s_m t_j ∇W_U[m, j] = corr(Σ_j t_j X_U, Σ_m s_m ∇Y)` at every kernel offset (the projection of
//!   X_U with t is taken when X_U is sent, and kept until the backward pass).
//!
//! Each coefficient is a random sign times a uniform magnitude in [1, 2), so a wrong element always moves the
//! combination by at least its own error. Both sides compute in f32; the checks accumulate in f64 and accept
//! a difference up to a tolerance derived from the magnitudes involved: an f32 dot product of length K
//! rounds to within about u·√K·‖x‖·‖w‖ (u = 2⁻²⁴; x and w the two vectors), and the random signs make the
//! combination of B·M such errors a Rademacher sum, so at pixel p
//!
//! ```text
//! τ_p = κ·u·( √K · √(Σ_b c_b²‖X_U patch_b,p‖²) · √(Σ_m s_m²‖W_m‖²)      honest rounding of Y_U
//!           + (√K + √B) · ‖(Σ_b c_b X_U_b) patch_p‖ · ‖Σ_m s_m W_m‖       rounding of the check's right side
//!           + (1 + √BLOCK) · √(Σ_b Σ_m (c_b s_m Y_U[b, m, p])²) )         the bias add; the check's f32
//! ```                                                                     partial sums over BLOCK planes
//!
//! with κ = [`KAPPA`] (and the same form for ∇X and ∇W_U).
//!
//! The work is a few passes over the big tensors, each for every repetition at once (the kernels are in
//! `asymml_core::freivalds`, compiled for AVX2 + FMA where present): one over X_U that forms each
//! repetition's Σ_b c_b X_U[b] one tile of pixels at a time and contracts it with Σ_m s_m W[m] at every kernel
//! offset while the tile is in cache (in training it also takes the projection Σ_j t_j X_U[b, j] for the
//! ∇W_U check); one over Y_U that also writes the merged output Y = Y_T + Y_U (the split's merge, so the
//! check reads Y_U no extra time); in backward one over ∇Y for both ∇X's and ∇W_U's checks and one over ∇X. A result is refused when any |difference| > τ.
//! **Detection threshold**: since |c_b s_m| ≥ 1, an error e in any one element of Y_U at pixel p is caught by
//! each repetition when |e| > 2·τ_p; several wrong elements can cancel only for coefficient draws of
//! vanishing probability, and each of the `reps` repetitions (2 by default) draws new coefficients.

use asymml_core::freivalds::{
    column_squares, combine_pass, combine_pass_range, combine_rows, gather_offsets_rows, lhs_pass,
    lhs_pass_range, merge_into_lhs_pass_range, merge_lhs_pass_range, period_dot,
    scatter_offsets_rows, sum_squares, weight_grad_rows, Combined, Geo, Lhs, BLOCK,
};
use asymml_core::layers::{ChannelMap, Conv2d};
use asymml_core::rng::Rng;
use asymml_core::CoreError;
use std::time::Instant;

/// Unit round-off of f32.
const U: f64 = 1.0 / 16_777_216.0;
/// The smallest normal f32: below it f32 loses relative precision (subnormals), so every tolerance has an
/// absolute floor of this size per combined term — far below any value that matters.
const TINY: f64 = f32::MIN_POSITIVE as f64;
/// Multiple of the rounding model a difference may reach before a check fails. The model (u·√K·‖x‖·‖w‖ per
/// element, Rademacher-combined) is an estimate, not a bound; κ covers summation orders (blocked GEMM,
/// Winograd's transforms) that round more. Honest runs measured at most [`MEASURED_WORST`] of it.
pub const KAPPA: f64 = 16.0;
/// The largest |difference| / τ seen on honest runs (see the tests and docs/security.md, Integrity).
pub const MEASURED_WORST: f64 = 0.07;
/// The rounding of a check's own combination of the checked values, per unit of √Σ(coefficient·value)²:
/// one rounding of each value (the honest side's last addition), and the check's f32 partial sums over
/// [`BLOCK`] values before they are added in f64 (a random walk of √BLOCK roundings).
fn own_rounding() -> f64 {
    1.0 + (BLOCK as f64).sqrt()
}
/// The per-pixel sums of a band of ∇Y's pass in the ∇X check ([`Checker::check_input_grad`]) stay within this
/// many bytes (f64): the band's rows are as many as fit, at least one.
const BAND_BYTES: usize = 1 << 19;
/// Repetitions per check (each with fresh coefficients).
pub const DEFAULT_REPS: usize = 2;

/// Counters of the checks made.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IntegrityStats {
    /// Checks made (one per quantity, layer, step and repetition).
    pub checks: u64,
    /// Checks failed.
    pub failures: u64,
    /// Seconds spent checking (part of the trusted runtime's time).
    pub seconds: f64,
    /// The largest |difference| / τ of a passed check (how close honest results come to the tolerance).
    pub worst_ratio: f64,
    /// Per quantity (Y_U, ∇X, ∇W_U), the largest detection threshold 2·max τ met, relative to the RMS of
    /// the checked values (for Y_U and ∇X weighted by the squared coefficients, each in [1, 4)): a single wrong element off by more than this fraction of the values' RMS is
    /// always caught.
    pub threshold_rel: [f64; 3],
}

/// What a check is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    /// Y_U of a forward.
    Output,
    /// ∇X of a backward.
    InputGrad,
    /// ∇W_U of a backward.
    WeightGrad,
}

impl Quantity {
    pub fn name(self) -> &'static str {
        match self {
            Quantity::Output => "Y_U",
            Quantity::InputGrad => "∇X",
            Quantity::WeightGrad => "∇W_U",
        }
    }
}

/// A failed check: the worst position, its difference and its tolerance.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub quantity: Quantity,
    /// Flat index of the worst position in the checked map (pixel, or kernel offset for ∇W_U).
    pub index: usize,
    pub diff: f64,
    pub tol: f64,
}

impl Failure {
    /// The error naming conv `conv`.
    pub fn into_error(self, conv: &str) -> CoreError {
        CoreError::Integrity {
            conv: conv.to_string(),
            what: format!(
                "{} from the accelerator is wrong: Freivalds check differs by {:.3e} (tolerance {:.3e}) \
                 at position {}; the result was not used",
                self.quantity.name(),
                self.diff,
                self.tol,
                self.index
            ),
        }
    }
}

/// What a forward keeps for the ∇W_U check of its backward: per repetition, t over input channels, the
/// projection Σ_j t_j X_U[b, j] ([B, H·W]) and Σ_j t_j²‖X_U[:, j]‖². The projection is summed in f64 and kept
/// in f32 (half the memory, held from the forward to the backward): rounding it moves the check's right side
/// by at most u·‖Σ_m s_m ∇Y‖·‖projection‖, about 1/(κ·√(B·OH·OW)) of the check's tolerance.
#[derive(Clone, Debug, Default)]
pub struct Projection {
    shape: [usize; 4],
    reps: Vec<(Vec<f64>, Vec<f32>, f64)>,
}

impl Projection {
    /// An empty projection of a batch of `shape` for coefficients `t` (r repetitions of N), filled part by
    /// part by the forward check.
    fn start(&mut self, shape: [usize; 4], t: &[f64], r: usize) {
        let (n, hw) = (shape[1], shape[2] * shape[3]);
        self.shape = shape;
        self.reps = (0..r)
            .map(|ri| {
                let tr = t[ri * n..(ri + 1) * n].to_vec();
                (tr, vec![0.0; shape[0] * hw], 0.0)
            })
            .collect();
    }

    /// A projection made from the pixels a 1 × 1 conv of stride s reads (shape [B, N, OH, OW]) spread over the
    /// whole input map of `x_shape` [B, N, H, W]: the values at pixels (s·oy, s·ox), zero elsewhere. The
    /// norms stay those of the pixels read, the only ones the conv's ∇W sums over.
    fn spread(&mut self, x_shape: &[usize], s: usize) -> Result<(), CoreError> {
        let &[b, n, h, w] = x_shape else {
            return Err(CoreError::Shape(format!(
                "integrity: input {x_shape:?} is not [B, N, H, W]"
            )));
        };
        let [pb, pn, oh, ow] = self.shape;
        if pb != b || pn != n || s == 0 || oh != h.div_ceil(s) || ow != w.div_ceil(s) {
            return Err(CoreError::Shape(format!(
                "integrity: a projection of {:?} is not of the pixels a stride-{s} conv reads of {x_shape:?}",
                self.shape
            )));
        }
        for (_, map, _) in &mut self.reps {
            let mut whole = vec![0f32; b * h * w];
            for (src, dst) in map.chunks_exact(oh * ow).zip(whole.chunks_exact_mut(h * w)) {
                for (oy, row) in src.chunks_exact(ow).enumerate() {
                    let out = &mut dst[oy * s * w..][..w];
                    for (ox, &v) in row.iter().enumerate() {
                        out[ox * s] = v;
                    }
                }
            }
            *map = whole;
        }
        self.shape = [b, n, h, w];
        Ok(())
    }
}

/// A forward check's draws ([`Checker::draw_forward`]): the geometry of the part, c over its samples ([R, B]),
/// the weight side, t over input channels (training), the whole batch's shape and the part's first sample.
struct ForwardDraw {
    g: Geo,
    c: Vec<f64>,
    side: WeightSide,
    t: Option<Vec<f64>>,
    whole: [usize; 4],
    first: usize,
}

/// A streamed forward check in progress ([`Checker::begin_forward_stream`]): the conv, its input's shape, the
/// pixels whose slabs were added, and the draws; the X_U side of the output rows made so far, the per-pixel sums
/// of the input rows that the output rows still to be made read (a window), and in training the projection
/// of the map for the ∇W_U check.
struct Streamed {
    id: usize,
    shape: Vec<usize>,
    done: usize,
    draw: ForwardDraw,
    xs: XSide,
    /// Output rows whose X_U side is in `xs`.
    next_oy: usize,
    /// The sums of the pass over X_U ([`Combined`]'s `contracted`, `comb_sq` and `bsq`) for the input rows from
    /// `row0` on, each of their rows `cap` pixels long.
    win: Combined,
    cap: usize,
    row0: usize,
    /// (Training) per repetition, Σ_j t_j X_U[b, j] ([B, H·W], in f32 as [`Projection`] keeps it);
    /// Σ_b Σ_p X_U[b, j, p]² per channel ([N]).
    proj: Vec<Vec<f32>>,
    chn2: Vec<f64>,
}

/// The X_U side of a forward check at every output pixel, per repetition ([R, P] each): conv(Σ_b c_b X_U[b],
/// Σ_m s_m W[m]) (`z`), and the part of the pixel's tolerance that X_U gives (`tx`, before the factor κ·u; f32
/// is plenty for a tolerance): √K·√(pq·Σ_m s_m²‖W_m‖²) + (√K + √B)·√pxc·‖Σ_m s_m W[m]‖, where pq is the k × k
/// window sum of Σ_b c_b² Σ_j X_U[b, j]² and pxc that of Σ_j (Σ_b c_b X_U[b, j])² (the first two terms of
/// [`tolerance_in_place`]). `w`: per repetition, Σ_m s_m²‖W_m‖² and ‖Σ_m s_m W[m]‖.
#[derive(Default)]
struct XSide {
    z: Vec<f64>,
    tx: Vec<f32>,
    w: Vec<(f64, f64)>,
}

impl XSide {
    fn new(r: usize, g: &Geo, side: &WeightSide) -> Self {
        let (n, kk, m) = (g.n, g.k * g.k, g.m);
        let w = (0..r)
            .map(|ri| {
                let s = &side.s[ri * m..(ri + 1) * m];
                let wn2: f64 = s.iter().zip(&side.wnorm).map(|(sm, w)| sm * sm * w).sum();
                let ws = &side.ws[ri * n * kk..(ri + 1) * n * kk];
                (wn2, ws.iter().map(|v| v * v).sum::<f64>().sqrt())
            })
            .collect();
        XSide {
            z: vec![0.0; r * g.p()],
            tx: vec![0.0; r * g.p()],
            w,
        }
    }

    /// Adds output rows `rows` from a pass's sums `comb` over the input rows from `row0` on (its rows `win`
    /// pixels long, covering every input row those output rows read), for batch coefficients `c` ([R, B]).
    fn add_rows(
        &mut self,
        comb: &Combined,
        (win, row0): (usize, usize),
        g: &Geo,
        c: &[f64],
        rows: (usize, usize),
    ) {
        let (p, kk) = (g.p(), g.k * g.k);
        let kdot = ((g.n * kk) as f64).sqrt();
        let right = kdot + (g.b as f64).sqrt();
        let at = |ri: usize| ri * p + rows.0 * g.ow..ri * p + rows.1 * g.ow;
        let n = (rows.1 - rows.0) * g.ow;
        let (mut pq, mut pxc) = (vec![0f64; n], vec![0f64; n]);
        for (ri, cr) in c.chunks_exact(g.b).enumerate() {
            let contracted = &comb.contracted[ri * kk * win..(ri + 1) * kk * win];
            gather_offsets_rows(contracted, (win, row0), g, rows, &mut self.z[at(ri)]);
            pq.fill(0.0);
            pxc.fill(0.0);
            box_sum_rows(&comb.weighted_bsq(cr, win), row0, g, rows, &mut pq);
            let comb_sq = &comb.comb_sq[ri * win..(ri + 1) * win];
            box_sum_rows(comb_sq, row0, g, rows, &mut pxc);
            let (w2, wc) = self.w[ri];
            for ((t, q), x) in self.tx[at(ri)].iter_mut().zip(&pq).zip(&pxc) {
                *t = (kdot * (q * w2).sqrt() + right * x.sqrt() * wc) as f32;
            }
        }
    }
}

/// Where a forward check's projection for the ∇W_U check comes from, with the channel norms ([N]): a pass's
/// sums ([R, B, H·W]) to copy, or a streamed check's maps (per repetition [B, H·W]) to move.
enum XProj<'a> {
    Copy(&'a [f64], &'a [f64]),
    Move(Vec<Vec<f32>>, Vec<f64>),
}

/// One check's comparison gathered over its positions, possibly a band at a time: the largest tolerance,
/// and the position with the largest |difference| / tolerance (its index, ratio, |difference| and tolerance).
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    max_tol: f64,
    index: usize,
    ratio: f64,
    diff: f64,
    tol: f64,
}

impl Tally {
    /// Adds positions `offset ..` with these differences and tolerances.
    fn add(&mut self, diff: &[f64], tol: &[f64], offset: usize) {
        for (i, (d, &t)) in diff.iter().zip(tol).enumerate() {
            self.max_tol = self.max_tol.max(t);
            let r = d.abs() / t;
            // A NaN ratio (a non-finite value slipped through) counts as the worst.
            let r = if r.is_nan() { f64::INFINITY } else { r };
            if r > self.ratio {
                (self.index, self.ratio, self.diff, self.tol) = (offset + i, r, d.abs(), t);
            }
        }
    }

    /// A position's difference is above its tolerance.
    fn failed(&self) -> bool {
        self.ratio > 1.0
    }
}

/// The checker: secret randomness, the number of repetitions, counters.
pub struct Checker {
    rng: Rng,
    reps: usize,
    stats: IntegrityStats,
    /// The largest τ of the last check (the threshold it applied is twice that).
    last_max_tol: f64,
    /// Scratch of the passes over the big tensors (reused: no allocation once the shapes are seen).
    comb: Combined,
    lhs: Lhs,
    /// The weight side of the last forward check, for the next part of the same batch.
    weight_side: Option<WeightSide>,
    /// The streamed forward check in progress, and the scratch of its slabs' passes.
    stream: Option<Streamed>,
    slab: Combined,
    /// What the ∇X check of a backward keeps for its ∇W_U check, when that comes later
    /// ([`Checker::check_input_grad`]).
    weight_check: Option<WeightCheck>,
    /// The bytes of per-pixel sums a band of the ∇X check's pass holds ([`BAND_BYTES`]; tests set fewer).
    band_bytes: usize,
}

/// The right side of a backward's ∇W_U check, made in the pass over ∇Y that the ∇X check makes (from ∇Y and
/// the forward's projection of X_U, both trusted): the conv, its geometry, and `None` for an empty backward
/// (nothing to check).
struct WeightCheck {
    id: usize,
    g: Geo,
    sides: Option<WeightRhs>,
}

/// Per repetition: s over output channels ([R, M]), corr(Σ_j t_j X_U, Σ_m s_m ∇Y) at every kernel offset
/// ([R, k·k]), Σ_m s_m²‖∇Y[:, m]‖² and Σ_j t_j²‖X_U[:, j]‖² ([R] each), and t over input channels ([R, N]).
struct WeightRhs {
    s: Vec<f64>,
    rhs: Vec<f64>,
    dyn2: Vec<f64>,
    xnorm2: Vec<f64>,
    t: Vec<f64>,
}

/// The weight side of a forward check: s over output channels, per repetition Σ_m s_m W[m] ([N, k, k]) in
/// f64 and as contraction weights ([k·k, N]) in f32, and every output channel's ‖W_m‖². `key`: the conv, its
/// weight buffer and the repetitions it was made for.
struct WeightSide {
    key: (usize, usize, usize, usize),
    s: Vec<f64>,
    ws: Vec<f64>,
    wc: Vec<f32>,
    wnorm: Vec<f64>,
}

impl WeightSide {
    fn new(key: (usize, usize, usize, usize), s: Vec<f64>, w: &[f32], g: &Geo, r: usize) -> Self {
        let kk = g.k * g.k;
        let mut ws = vec![0f64; r * g.n * kk];
        combine_rows(w, g.m, g.n * kk, &s, r, &mut ws);
        let mut wc = vec![0f32; r * kk * g.n];
        for ri in 0..r {
            let wsr = &ws[ri * g.n * kk..(ri + 1) * g.n * kk];
            by_offset(wsr, kk, &mut wc[ri * kk * g.n..(ri + 1) * kk * g.n]);
        }
        let wnorm = w.chunks_exact((g.n * kk).max(1)).map(sum_squares).collect();
        WeightSide {
            key,
            s,
            ws,
            wc,
            wnorm,
        }
    }
}

impl Checker {
    /// A checker with `reps` repetitions per check, seeded from the operating system's randomness (never from
    /// the run's seed, which is not secret).
    pub fn new(reps: usize) -> Result<Self, CoreError> {
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).map_err(|e| {
            CoreError::Invalid(format!(
                "integrity checks need the operating system's randomness: {e}"
            ))
        })?;
        Ok(Self::with_seed(u64::from_le_bytes(seed), reps))
    }

    /// A checker with a given seed (tests).
    pub fn with_seed(seed: u64, reps: usize) -> Self {
        Checker {
            rng: Rng::new(seed),
            reps: reps.max(1),
            stats: IntegrityStats::default(),
            last_max_tol: 0.0,
            comb: Combined::default(),
            lhs: Lhs::default(),
            weight_side: None,
            stream: None,
            slab: Combined::default(),
            weight_check: None,
            band_bytes: BAND_BYTES,
        }
    }

    /// Forgets a ∇W_U check begun by [`Checker::check_input_grad`] and never made (its backward failed
    /// before): the next backward's check starts afresh.
    pub fn drop_weight_check(&mut self) {
        self.weight_check = None;
    }

    /// Lets go of the scratch of the passes (it grows again at the next check).
    pub fn release_buffers(&mut self) {
        self.comb = Combined::default();
        self.lhs = Lhs::default();
        self.weight_side = None;
        self.stream = None;
        self.slab = Combined::default();
    }

    /// The checks made so far.
    pub fn stats(&self) -> &IntegrityStats {
        &self.stats
    }

    /// The largest tolerance τ of the last check made (an error above 2τ in one element is always caught).
    pub fn last_max_tol(&self) -> f64 {
        self.last_max_tol
    }

    /// Random signs times magnitudes in [1, 2).
    fn coefs(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let mag = 1.0 + self.rng.uniform_f64();
                if self.rng.next_u64() & 1 == 0 {
                    mag
                } else {
                    -mag
                }
            })
            .collect()
    }

    /// Records one check's outcome.
    fn record(&mut self, q: Quantity, diff: &[f64], tol: &[f64], rms: f64) -> Result<(), Failure> {
        let mut tally = Tally::default();
        tally.add(diff, tol, 0);
        self.settle(q, &tally, rms)
    }

    /// Records one check's outcome from its positions' tally (`rms`: of the checked values, for the
    /// threshold's statistics).
    fn settle(&mut self, q: Quantity, tally: &Tally, rms: f64) -> Result<(), Failure> {
        self.stats.checks += 1;
        self.last_max_tol = tally.max_tol;
        // (Values at f32's subnormal scale have only the absolute floor for a threshold: not counted.)
        if rms > 1e-30 {
            let rel = &mut self.stats.threshold_rel[q as usize];
            *rel = rel.max(2.0 * tally.max_tol / rms);
        }
        if tally.failed() {
            self.stats.failures += 1;
            return Err(Failure {
                quantity: q,
                index: tally.index,
                diff: tally.diff,
                tol: tally.tol,
            });
        }
        self.stats.worst_ratio = self.stats.worst_ratio.max(tally.ratio);
        Ok(())
    }

    /// Checks `y_u` ([B, M, OH, OW]) = conv(x_u, W) + b for `conv` with the trusted copy of its weights;
    /// `x_u` ([B, N, H, W]) is the residual exactly as it was sent. With `proj` (a training forward), the
    /// same pass over `x_u` also keeps what the ∇W_U check of this conv's backward needs; with
    /// `merge: Some(y_t)`, the pass over `y_u` also adds y_t to it in place, after reading it (the caller must
    /// not use the sum unless the check passes). Without, `y_u` is only read.
    pub fn check_forward(
        &mut self,
        conv: &Conv2d,
        x_u: &[f32],
        x_shape: &[usize],
        y_u: &mut [f32],
        proj: Option<&mut Projection>,
        merge: Option<&[f32]>,
    ) -> Result<Result<(), Failure>, CoreError> {
        let b = x_shape.first().copied().unwrap_or(0);
        self.check_forward_part(conv, x_u, x_shape, y_u, proj, merge, (0, b))
    }

    /// [`check_forward`](Self::check_forward) of one part of a micro-batched forward: `x_u` and `y_u` hold
    /// samples `first .. first + B` (B = x_shape[0]) of a batch of `batch`. The check is the part's own; the
    /// projection for the ∇W_U check is the whole batch's, built part by part (from the first part, which
    /// draws its secret coefficients, to the last; parts come in order).
    #[allow(clippy::too_many_arguments)]
    pub fn check_forward_part(
        &mut self,
        conv: &Conv2d,
        x_u: &[f32],
        x_shape: &[usize],
        y_u: &mut [f32],
        proj: Option<&mut Projection>,
        merge: Option<&[f32]>,
        part: (usize, usize),
    ) -> Result<Result<(), Failure>, CoreError> {
        let ys = match merge {
            Some(y_t) => YSide::MergeInPlace(y_u, y_t),
            None => YSide::Read(y_u),
        };
        self.check_forward_side(conv, x_u, x_shape, ys, proj, part, None)
    }

    /// [`check_forward`](Self::check_forward) of `Y_U` as received (little-endian words in its frame, read in
    /// place), adding it into `y` (which holds Y_T, and then Y = Y_T + Y_U) in the check's pass over it; with
    /// `map`, y then holds map(Y) (BatchNorm in inference, applied in the same pass). `y` must not be used if
    /// the check fails.
    #[allow(clippy::too_many_arguments)]
    pub fn check_forward_into(
        &mut self,
        conv: &Conv2d,
        x_u: &[f32],
        x_shape: &[usize],
        y_u: &[[u8; 4]],
        proj: Option<&mut Projection>,
        y: &mut [f32],
        map: Option<ChannelMap<'_>>,
    ) -> Result<Result<(), Failure>, CoreError> {
        let b = x_shape.first().copied().unwrap_or(0);
        let ys = YSide::MergeInto(y_u, y, map);
        self.check_forward_side(conv, x_u, x_shape, ys, proj, (0, b), None)
    }

    /// [`check_forward_into`](Self::check_forward_into) of one part of a micro-batched forward (samples
    /// `first .. first + B` of a batch of `batch`, as [`check_forward_part`](Self::check_forward_part)); `y`
    /// holds those samples' Y_T, and then their Y.
    #[allow(clippy::too_many_arguments)]
    pub fn check_forward_part_into(
        &mut self,
        conv: &Conv2d,
        x_u: &[f32],
        x_shape: &[usize],
        y_u: &[[u8; 4]],
        proj: Option<&mut Projection>,
        y: &mut [f32],
        part: (usize, usize),
    ) -> Result<Result<(), Failure>, CoreError> {
        let ys = YSide::MergeInto(y_u, y, None);
        self.check_forward_side(conv, x_u, x_shape, ys, proj, part, None)
    }

    /// [`check_forward_into`](Self::check_forward_into) for a 1 × 1 conv without padding and of stride s, from
    /// only the pixels of X_U it reads: `x_u_read` is X_U (of `x_shape`, [B, N, H, W]) at every s-th row and
    /// column, [B, N, OH, OW] (a ResNet shortcut's check then keeps a quarter of its block input's X_U). The
    /// check is the same: the conv of those pixels by 1 × 1 windows at stride 1. The projection for the ∇W_U
    /// check comes out spread over the whole map (zero at the pixels the conv does not read), as the
    /// backward's check of the conv itself expects it.
    pub fn check_forward_read_into(
        &mut self,
        conv: &Conv2d,
        x_u_read: &[f32],
        x_shape: &[usize],
        y_u: &[[u8; 4]],
        mut proj: Option<&mut Projection>,
        y: &mut [f32],
    ) -> Result<Result<(), Failure>, CoreError> {
        let b = x_shape.first().copied().unwrap_or(0);
        let ys = YSide::MergeInto(y_u, y, None);
        let read = Some(conv.stride);
        let out = self.check_forward_side(
            conv,
            x_u_read,
            x_shape,
            ys,
            proj.as_deref_mut(),
            (0, b),
            read,
        )?;
        if let (Ok(()), Some(pr)) = (&out, proj) {
            pr.spread(x_shape, conv.stride)?;
        }
        Ok(out)
    }

    /// `read`: X_U is given only at the pixels a 1 × 1 conv of this stride reads
    /// ([`check_forward_read_into`](Self::check_forward_read_into)).
    #[allow(clippy::too_many_arguments)]
    fn check_forward_side(
        &mut self,
        conv: &Conv2d,
        x_u: &[f32],
        x_shape: &[usize],
        ys: YSide<'_>,
        proj: Option<&mut Projection>,
        part: (usize, usize),
        read: Option<usize>,
    ) -> Result<Result<(), Failure>, CoreError> {
        let t0 = Instant::now();
        let d = self.draw_forward(conv, x_shape, proj.as_deref(), part, read)?;
        let g = d.g;
        if x_u.len() != g.b * g.n * g.hw() || !ys.sizes_are(g.b * g.m * g.p()) {
            return Err(CoreError::Shape("integrity: forward sizes differ".into()));
        }
        if g.b * g.n * g.hw() * g.m * g.p() == 0 {
            // An empty tensor on either side: nothing to compare (its shape was checked on receipt).
            ys.merge_only(g.p());
            if let (Some(pr), Some(t)) = (proj, &d.t) {
                if part.0 == 0 {
                    pr.start(d.whole, t, self.reps);
                }
            }
            return Ok(Ok(()));
        }
        let mut comb = std::mem::take(&mut self.comb);
        // One pass over X_U for every repetition: Σ_b c_b X_U[b] contracted with Σ_m s_m W[m] at every kernel
        // offset, Σ_j X_U[b, j]² per sample and pixel, Σ_j (Σ_b c_b X_U[b, j])², and (training)
        // Σ_j t_j X_U[b, j] with the channel norms.
        combine_pass(
            x_u,
            g.b,
            g.n,
            g.hw(),
            self.reps,
            Some((&d.c, &d.side.wc, g.k * g.k)),
            d.t.as_deref(),
            &mut comb,
        );
        let mut xs = XSide::new(self.reps, &g, &d.side);
        xs.add_rows(&comb, (g.hw(), 0), &g, &d.c, (0, g.oh));
        let xproj = XProj::Copy(&comb.proj, &comb.chn2);
        let out = self.finish_forward(conv, d, &xs, xproj, ys, proj, t0);
        self.comb = comb;
        out
    }

    /// A forward check's secret draws for conv `conv` on an input of `x_shape` (a part of samples
    /// `first .. first + B` of a batch of `batch`): c over the part's samples, the weight side (s over output
    /// channels: drawn at a batch's first part, kept for its other parts), and with `proj` (training) t over
    /// input channels (drawn at the first part, the same for the others).
    fn draw_forward(
        &mut self,
        conv: &Conv2d,
        x_shape: &[usize],
        proj: Option<&Projection>,
        (first, batch): (usize, usize),
        read: Option<usize>,
    ) -> Result<ForwardDraw, CoreError> {
        let mut g = Geo::of(conv, x_shape)?;
        if let Some(s) = read {
            if g.k != 1 || g.pad != 0 || g.s != s {
                return Err(CoreError::Invalid(format!(
                    "integrity: a check from the pixels read needs a 1 × 1 conv without padding (conv {}: \
                     {k} × {k}, stride {}, padding {})",
                    conv.id,
                    g.s,
                    g.pad,
                    k = g.k
                )));
            }
            // The same conv as 1 × 1 windows at stride 1 over the pixels read.
            (g.h, g.w, g.s) = (g.oh, g.ow, 1);
        }
        if first + g.b > batch {
            return Err(CoreError::Shape(format!(
                "integrity: samples {first}..{} of a batch of {batch}",
                first + g.b
            )));
        }
        let r = self.reps;
        let c = self.coefs(r * g.b);
        let w = &conv.weight.value.data;
        let key = (conv.id, w.as_ptr() as usize, w.len(), r);
        let side = match self.weight_side.take() {
            Some(ws) if first > 0 && ws.key == key => ws,
            _ => {
                let s = self.coefs(r * g.m);
                WeightSide::new(key, s, w, &g, r)
            }
        };
        let whole = [batch, g.n, g.h, g.w];
        let t = match proj {
            None => None,
            Some(_) if first == 0 => Some(self.coefs(r * g.n)),
            Some(pr) if pr.shape == whole && pr.reps.len() == r => Some(
                pr.reps
                    .iter()
                    .flat_map(|(t, _, _)| t.iter().copied())
                    .collect(),
            ),
            Some(_) => {
                return Err(CoreError::Shape(
                    "integrity: a part of a batch whose first part was not checked".into(),
                ))
            }
        };
        Ok(ForwardDraw {
            g,
            c,
            side,
            t,
            whole,
            first,
        })
    }

    /// The rest of a forward check once its pass over X_U has made its X_U side `xs` (and in training the
    /// projection `xproj`): the pass over Y_U (merging as `ys` says), the comparison, and (training) the part's
    /// projection kept in `proj`.
    #[allow(clippy::too_many_arguments)]
    fn finish_forward(
        &mut self,
        conv: &Conv2d,
        d: ForwardDraw,
        xs: &XSide,
        xproj: XProj<'_>,
        ys: YSide<'_>,
        proj: Option<&mut Projection>,
        t0: Instant,
    ) -> Result<Result<(), Failure>, CoreError> {
        let ForwardDraw {
            g,
            c,
            side,
            t,
            whole,
            first,
        } = d;
        let (hw, p, kk, r) = (g.hw(), g.p(), g.k * g.k, self.reps);
        let s = &side.s;
        let mut lhs = std::mem::take(&mut self.lhs);
        // Σ_b Σ_m c_b s_m Y_U[b, m] and Σ (c_b s_m Y_U[b, m])² per pixel, from one pass over Y_U made a band of
        // output rows at a time (merging as `ys` says): each band's differences and tolerances are compared
        // as it is made, and only the worst so far is kept.
        let k: Vec<f64> = (0..r)
            .flat_map(|ri| {
                let (c, s) = (&c[ri * g.b..(ri + 1) * g.b], &s[ri * g.m..(ri + 1) * g.m]);
                c.iter().flat_map(move |cb| s.iter().map(move |sm| cb * sm))
            })
            .collect();
        let bias: Vec<f64> = (0..r)
            .map(|ri| {
                let (c, s) = (&c[ri * g.b..(ri + 1) * g.b], &s[ri * g.m..(ri + 1) * g.m]);
                conv.bias.as_ref().map_or(0.0, |b| {
                    let sb: f64 = b
                        .value
                        .data
                        .iter()
                        .zip(s)
                        .map(|(&v, sm)| v as f64 * sm)
                        .sum();
                    sb * c.iter().sum::<f64>()
                })
            })
            .collect();
        let kdot = (g.n * kk) as f64;
        let floor = 4.0 * TINY * (kdot * (g.b * g.m) as f64).sqrt();
        let own = own_rounding();
        // Per pixel of a band: the left side and its squares for every repetition, a difference and a tolerance.
        let rows = (self.band_bytes / (8 * (2 * r + 2) * g.ow).max(1)).max(1);
        let mut ys = ys;
        let mut tallies = vec![Tally::default(); r];
        let (mut diff, mut tol) = (Vec::new(), Vec::new());
        let mut sq0 = 0.0;
        let mut range = None;
        'bands: for oy0 in (0..g.oh).step_by(rows) {
            let px = (p, oy0 * g.ow, (oy0 + rows).min(g.oh) * g.ow - oy0 * g.ow);
            let n = px.2;
            match &mut ys {
                YSide::MergeInPlace(y_u, y_t) => {
                    merge_lhs_pass_range(y_u, y_t, g.b, g.m, px, r, &k, &mut lhs)
                }
                YSide::MergeInto(y_u, y, map) => {
                    merge_into_lhs_pass_range(y_u, y, g.b, g.m, px, r, &k, &mut lhs, *map)
                }
                YSide::Read(y_u) => lhs_pass_range(y_u, g.b, g.m, px, r, &k, &mut lhs),
            }
            sq0 += lhs.sq[..n].iter().sum::<f64>();
            for (ri, tally) in tallies.iter_mut().enumerate() {
                let at = ri * p + px.1..ri * p + px.1 + n;
                let (z, tx) = (&xs.z[at.clone()], &xs.tx[at]);
                let (l, ysq) = (&lhs.lhs[ri * n..][..n], &lhs.sq[ri * n..][..n]);
                diff.clear();
                diff.extend(l.iter().zip(z).map(|(l, z)| l - z - bias[ri]));
                tol.clear();
                tol.extend(
                    tx.iter()
                        .zip(ysq)
                        .map(|(&t, q)| KAPPA * U * (t as f64 + own * q.sqrt() + floor)),
                );
                if let Some(e) = unbounded(&tol, Quantity::Output) {
                    range = Some(e);
                    break 'bands;
                }
                tally.add(&diff, &tol, px.1);
                if tally.failed() {
                    break 'bands;
                }
            }
        }
        // The RMS of Y_U weighted by the squared coefficients (each in [1, 4)), from the left side's squares.
        let y_rms = weighted_rms_of(sq0, p, &c[..g.b], &s[..g.m]);
        let mut out = Ok(());
        if range.is_none() {
            for tally in &tallies {
                if let Err(f) = self.settle(Quantity::Output, tally, y_rms) {
                    out = Err(f);
                    break;
                }
            }
        }
        if let (Some(pr), Some(t)) = (proj, t) {
            let chn2 = match xproj {
                XProj::Copy(sums, chn2) => {
                    if first == 0 {
                        pr.start(whole, &t, r);
                    }
                    for (ri, (_, xt, _)) in pr.reps.iter_mut().enumerate() {
                        let src = &sums[ri * g.b * hw..(ri + 1) * g.b * hw];
                        let dst = &mut xt[first * hw..(first + g.b) * hw];
                        dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v as f32);
                    }
                    chn2.to_vec()
                }
                XProj::Move(maps, chn2) => {
                    // (A streamed check is of a whole batch: its maps are the projection.)
                    pr.shape = whole;
                    pr.reps = t
                        .chunks_exact(g.n)
                        .zip(maps)
                        .map(|(tr, xt)| (tr.to_vec(), xt, 0.0))
                        .collect();
                    chn2
                }
            };
            for (tr, _, norm2) in pr.reps.iter_mut() {
                *norm2 += tr.iter().zip(&chn2).map(|(tj, n)| tj * tj * n).sum::<f64>();
            }
        }
        self.lhs = lhs;
        self.weight_side = Some(side);
        self.stats.seconds += t0.elapsed().as_secs_f64();
        match range {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Starts a forward check of `conv` on a whole batch of `x_shape` whose X_U is not held whole: its pass
    /// over X_U is made slab of pixels by slab as X_U is made ([`Checker::add_forward_slab`]) and the check is
    /// finished when Y_U comes ([`Checker::finish_forward_stream_into`]). `train`: the ∇W_U check's projection
    /// is taken too. The draws are secret and made here, as for [`Checker::check_forward`]. An empty tensor is
    /// refused (its check has nothing to stream).
    pub fn begin_forward_stream(
        &mut self,
        conv: &Conv2d,
        x_shape: &[usize],
        train: bool,
    ) -> Result<(), CoreError> {
        self.stream = None;
        let b = x_shape.first().copied().unwrap_or(0);
        let blank = Projection::default();
        let d = self.draw_forward(conv, x_shape, train.then_some(&blank), (0, b), None)?;
        let g = d.g;
        if g.b * g.n * g.hw() * g.m * g.p() == 0 {
            return Err(CoreError::Shape(
                "integrity: an empty forward is not checked slab by slab".into(),
            ));
        }
        let (r, hw) = (self.reps, g.hw());
        self.stream = Some(Streamed {
            id: conv.id,
            shape: x_shape.to_vec(),
            done: 0,
            xs: XSide::new(r, &g, &d.side),
            next_oy: 0,
            win: Combined::default(),
            cap: 0,
            row0: 0,
            proj: if train {
                vec![vec![0.0; g.b * hw]; r]
            } else {
                Vec::new()
            },
            chn2: vec![0.0; if train { g.n } else { 0 }],
            draw: d,
        });
        Ok(())
    }

    /// Whether a streamed forward check of conv `id` was begun and not finished: its Y_U's check is the
    /// streamed one's end ([`Checker::finish_forward_stream_into`]).
    pub fn streaming(&self, id: usize) -> bool {
        self.stream.as_ref().is_some_and(|st| st.id == id)
    }

    /// Adds pixels `p0 .. p0 + P` of X_U ([B, N, P]: every sample and channel, those pixels) to the streamed
    /// forward check begun by [`Checker::begin_forward_stream`]. Slabs come in order and cover the pixels
    /// once.
    pub fn add_forward_slab(&mut self, slab: &[f32], p0: usize) -> Result<(), CoreError> {
        let Some(st) = self.stream.as_mut() else {
            return Err(CoreError::Invalid(
                "integrity: a slab of X_U with no streamed check begun".into(),
            ));
        };
        let g = st.draw.g;
        let (hw, rows) = (g.hw(), g.b * g.n);
        let sp = slab.len() / rows.max(1);
        if p0 != st.done || sp == 0 || sp * rows != slab.len() || p0 + sp > hw {
            return Err(CoreError::Shape(format!(
                "integrity: a slab of {} values at pixel {p0} (expected pixel {} of {hw}, {rows} rows)",
                slab.len(),
                st.done
            )));
        }
        let t0 = Instant::now();
        let (r, kk) = (self.reps, g.k * g.k);
        let d = &st.draw;
        let sc = &mut self.slab;
        combine_pass(
            slab,
            g.b,
            g.n,
            sp,
            r,
            Some((&d.c, &d.side.wc, kk)),
            d.t.as_deref(),
            sc,
        );
        // The slab's sums join the window of input rows (grown if they do not fit) ...
        let held = st.done - st.row0 * g.w;
        if held + sp > st.cap {
            let cap = held + sp + g.w;
            let win = &mut st.win;
            for (v, rows) in [
                (&mut win.contracted, r * kk),
                (&mut win.comb_sq, r),
                (&mut win.bsq, g.b),
            ] {
                let mut grown = vec![0f64; rows * cap];
                for i in 0..rows {
                    grown[i * cap..][..held].copy_from_slice(&v[i * st.cap..][..held]);
                }
                *v = grown;
            }
            st.cap = cap;
        }
        let cap = st.cap;
        let place = |dst: &mut [f64], src: &[f64], rows: usize, stride: usize, at: usize| {
            for i in 0..rows {
                dst[i * stride + at..][..sp].copy_from_slice(&src[i * sp..][..sp]);
            }
        };
        place(&mut st.win.contracted, &sc.contracted, r * kk, cap, held);
        place(&mut st.win.comb_sq, &sc.comb_sq, r, cap, held);
        place(&mut st.win.bsq, &sc.bsq, g.b, cap, held);
        if d.t.is_some() {
            for (i, src) in sc.proj.chunks_exact(sp).enumerate() {
                let dst = &mut st.proj[i / g.b][(i % g.b) * hw + p0..][..sp];
                dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v as f32);
            }
            st.chn2.iter_mut().zip(&sc.chn2).for_each(|(a, v)| *a += v);
        }
        st.done += sp;
        // ... the output rows whose input rows are all in make their X_U side ...
        let complete = if st.done == hw { g.h } else { st.done / g.w };
        let ready =
            |oy: usize| complete == g.h || (oy * g.s + g.k - 1).saturating_sub(g.pad) < complete;
        let mut oy1 = st.next_oy;
        while oy1 < g.oh && ready(oy1) {
            oy1 += 1;
        }
        if oy1 > st.next_oy {
            st.xs
                .add_rows(&st.win, (cap, st.row0), &g, &d.c, (st.next_oy, oy1));
            st.next_oy = oy1;
        }
        // ... and the input rows no output row still to be made reads leave the window.
        let keep = if st.next_oy == g.oh {
            complete
        } else {
            (st.next_oy * g.s).saturating_sub(g.pad).min(complete)
        };
        if keep > st.row0 {
            let (gone, held) = ((keep - st.row0) * g.w, st.done - st.row0 * g.w);
            let win = &mut st.win;
            for v in [&mut win.contracted, &mut win.comb_sq, &mut win.bsq] {
                for row in v.chunks_exact_mut(cap) {
                    row.copy_within(gone..held, 0);
                }
            }
            st.row0 = keep;
        }
        if st.done == hw {
            // Every output row's X_U side is made: the window and the slabs' scratch go now, not when Y_U comes
            // (the trusted conv runs in between).
            st.win = Combined::default();
            st.cap = 0;
            self.slab = Combined::default();
        }
        self.stats.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Finishes the streamed forward check of `conv` (begun on `x_shape`, every pixel's slab added) with Y_U
    /// as received (little-endian words in its frame, read in place), adding it into `y` (which holds Y_T,
    /// and then Y, or map(Y) with `map`) in the check's pass over it, as [`Checker::check_forward_into`] does.
    /// `proj`: the training forward's projection for the ∇W_U check (required when the stream was begun with
    /// `train`).
    pub fn finish_forward_stream_into(
        &mut self,
        conv: &Conv2d,
        x_shape: &[usize],
        y_u: &[[u8; 4]],
        proj: Option<&mut Projection>,
        y: &mut [f32],
        map: Option<ChannelMap<'_>>,
    ) -> Result<Result<(), Failure>, CoreError> {
        let t0 = Instant::now();
        let st = match self.stream.take() {
            Some(st) if st.id == conv.id && st.shape == x_shape && st.done == st.draw.g.hw() => st,
            _ => {
                return Err(CoreError::Invalid(format!(
                    "integrity: no complete streamed check of conv {} on {x_shape:?}",
                    conv.id
                )))
            }
        };
        let g = st.draw.g;
        if st.draw.t.is_some() != proj.is_some() {
            return Err(CoreError::Invalid(
                "integrity: a streamed check finished with or without its projection unlike it began".into(),
            ));
        }
        let ys = YSide::MergeInto(y_u, y, map);
        if !ys.sizes_are(g.b * g.m * g.p()) || st.next_oy != g.oh {
            return Err(CoreError::Shape("integrity: forward sizes differ".into()));
        }
        // The slabs' scratch goes (it is small, and held between convs it would add to their peak memory).
        self.slab = Combined::default();
        let Streamed {
            draw,
            xs,
            proj: maps,
            chn2,
            ..
        } = st;
        let out = self.finish_forward(conv, draw, &xs, XProj::Move(maps, chn2), ys, proj, t0);
        // So do the per-pixel sums of Y_U's pass (VGG16-224's second conv: 2 MB in f64): kept, they would sit
        // on top of the training forward's activations and the backward's gradients until the next check,
        // which makes its own.
        self.lhs = Lhs::default();
        out
    }

    /// Checks ∇X (`dx`, [B, N, H, W], when given) = conv_transposed(∇Y, W) and ∇W_U (`dw`, [M, N, k, k]) =
    /// corr(X_U, ∇Y) against `dy` ([B, M, OH, OW]), the trusted weights, and the projection the forward kept.
    pub fn check_backward(
        &mut self,
        conv: &Conv2d,
        proj: &Projection,
        dy: &[f32],
        dx: Option<&[f32]>,
        dw: &[f32],
    ) -> Result<Result<(), Failure>, CoreError> {
        let g = Geo::of(conv, &proj.shape)?;
        if dw.len() != g.m * g.n * g.k * g.k {
            return Err(CoreError::Shape(
                "integrity: backward sizes differ from the last training forward's".into(),
            ));
        }
        match self.check_input_grad(conv, proj, dy, dx)? {
            Ok(()) => self.check_weight_grad(conv.id, dw),
            Err(f) => {
                self.weight_check = None;
                Ok(Err(f))
            }
        }
    }

    /// The first half of [`Checker::check_backward`], for a backward whose ∇W_U comes later: checks ∇X (when
    /// given) and, in the same pass over `dy`, makes the right side of the ∇W_U check from `dy` and the
    /// forward's projection `proj` (its last use: the caller may let it go), kept until
    /// [`Checker::check_weight_grad`] of the same conv (one at a time: a second before it is an error).
    pub fn check_input_grad(
        &mut self,
        conv: &Conv2d,
        proj: &Projection,
        dy: &[f32],
        dx: Option<&[f32]>,
    ) -> Result<Result<(), Failure>, CoreError> {
        if let Some(w) = &self.weight_check {
            return Err(CoreError::Invalid(format!(
                "integrity: the ∇W_U check of conv {} was not made before conv {}'s backward",
                w.id, conv.id
            )));
        }
        let t0 = Instant::now();
        let g = Geo::of(conv, &proj.shape)?;
        let (hw, p, kk, r) = (g.hw(), g.p(), g.k * g.k, self.reps);
        if dy.len() != g.b * g.m * p
            || dx.is_some_and(|d| d.len() != g.b * g.n * hw)
            || proj.reps.len() < r
        {
            return Err(CoreError::Shape(
                "integrity: backward sizes differ from the last training forward's".into(),
            ));
        }
        if g.b * g.n * hw * g.m * p == 0 {
            self.weight_check = Some(WeightCheck {
                id: conv.id,
                g,
                sides: None,
            });
            return Ok(Ok(()));
        }
        let (mut comb, mut lhs) = (
            std::mem::take(&mut self.comb),
            std::mem::take(&mut self.lhs),
        );
        // ∇X: c over the batch, t over input channels; ∇W_U: s over output channels (t is the forward's).
        let c = dx.map(|_| self.coefs(r * g.b));
        let t = dx.map(|_| self.coefs(r * g.n));
        let s = self.coefs(r * g.m);
        let w = &conv.weight.value.data;
        // Per repetition, Σ_j t_j W[:, j] ([M, k, k]), and the same as contraction weights [k·k, M] in f32.
        let mut wt = vec![0f64; if t.is_some() { r * g.m * kk } else { 0 }];
        let mut wc = vec![0f32; if t.is_some() { r * kk * g.m } else { 0 }];
        if let Some(t) = &t {
            // Each row of W is read once (from L1 for the second repetition).
            let tks: Vec<Vec<f64>> = t.chunks_exact(g.n).map(|tr| repeated(tr, kk)).collect();
            for (mi, wm) in w.chunks_exact(g.n * kk).enumerate() {
                for (ri, tk) in tks.iter().enumerate() {
                    period_dot(wm, tk, kk, false, &mut wt[(ri * g.m + mi) * kk..][..kk]);
                }
            }
            for ri in 0..r {
                let wtr = &wt[ri * g.m * kk..(ri + 1) * g.m * kk];
                by_offset(wtr, kk, &mut wc[ri * kk * g.m..(ri + 1) * kk * g.m]);
            }
        }
        // One pass over ∇Y for both quantities and every repetition, a band of output rows at a time: each
        // band's contraction, scattered to the input pixels it reaches, and its squares go into per-input-pixel
        // sums, and its Σ_m s_m ∇Y[b, m] is correlated with the forward's projection of X_U (the right side of
        // the ∇W_U check: k·k values). Nothing of the size of the map is kept but the ∇X check's own sums (at
        // VGG16-224's second conv the whole map's were 18 MB in f64 on top of the backward's gradients).
        let batch = c.as_deref().map(|c| (c, wc.as_slice(), kk));
        let mut wrhs = vec![0f64; r * kk];
        let mut chn2 = vec![0f64; g.m];
        let whole = if c.is_some() { r * hw } else { 0 };
        let (mut rhs, mut pe, mut pd) = (vec![0f64; whole], vec![0f64; whole], vec![0f64; whole]);
        let per_pixel = if c.is_some() { r * kk + r } else { 0 } + g.b + r * g.b;
        let rows = (self.band_bytes / (8 * per_pixel * g.ow).max(1)).clamp(1, g.oh.max(1));
        for oy0 in (0..g.oh).step_by(rows) {
            let band = (oy0, (oy0 + rows).min(g.oh));
            let (q0, pl) = (oy0 * g.ow, (band.1 - oy0) * g.ow);
            combine_pass_range(dy, g.b, g.m, (p, q0, pl), r, batch, Some(&s), &mut comb);
            for (ri, rhs) in wrhs.chunks_exact_mut(kk).enumerate() {
                let dys = &comb.proj[ri * g.b * pl..(ri + 1) * g.b * pl];
                weight_grad_rows(dys, &proj.reps[ri].1, &g, band, rhs);
            }
            chn2.iter_mut().zip(&comb.chn2).for_each(|(a, v)| *a += v);
            if let Some(c) = &c {
                for ri in 0..r {
                    let at = ri * hw..(ri + 1) * hw;
                    let cr = &c[ri * g.b..(ri + 1) * g.b];
                    let contracted = &comb.contracted[ri * kk * pl..(ri + 1) * kk * pl];
                    scatter_offsets_rows(contracted, &g, band, &mut rhs[at.clone()]);
                    scatter_sum_rows(&comb.weighted_bsq(cr, pl), &g, band, &mut pe[at.clone()]);
                    let comb_sq = &comb.comb_sq[ri * pl..(ri + 1) * pl];
                    scatter_sum_rows(comb_sq, &g, band, &mut pd[at]);
                }
            }
        }
        let mut out = Ok(());
        let mut range = None;
        if let (Some(dx), Some(c), Some(t)) = (dx, &c, &t) {
            let k: Vec<f64> = (0..r)
                .flat_map(|ri| {
                    let (c, t) = (&c[ri * g.b..(ri + 1) * g.b], &t[ri * g.n..(ri + 1) * g.n]);
                    c.iter().flat_map(move |cb| t.iter().map(move |tj| cb * tj))
                })
                .collect();
            // (The bands' scratch is done with: it goes before the pass over ∇X makes its sums.)
            comb = Combined::default();
            lhs_pass(dx, g.b, g.n, hw, r, &k, &mut lhs);
            let dx_rms = weighted_rms(&lhs.sq[..hw], &c[..g.b], &t[..g.n]);
            // ‖W[:, j]‖² per input channel: the squares summed over the rows m, then over each kernel.
            let mut sq = vec![0f64; g.n * kk];
            column_squares(w, g.n * kk, &mut sq);
            let col2: Vec<f64> = sq.chunks_exact(kk).map(|c| c.iter().sum()).collect();
            let kdot = ((g.m * kk) as f64 / (g.s * g.s) as f64).max(1.0);
            let floor = 4.0 * TINY * (kdot * (g.b * g.n) as f64).sqrt();
            for ri in 0..r {
                let t = &t[ri * g.n..(ri + 1) * g.n];
                // Σ_j t_j²‖W[:, j]‖², ‖Σ_j t_j W[:, j]‖, and conv_transposed(Σ_b c_b ∇Y[b], Σ_j t_j W[:, j]).
                let wn2: f64 = t.iter().zip(&col2).map(|(tj, c2)| tj * tj * c2).sum();
                let wtn = wt[ri * g.m * kk..(ri + 1) * g.m * kk]
                    .iter()
                    .map(|v| v * v)
                    .sum::<f64>()
                    .sqrt();
                let at = ri * hw..(ri + 1) * hw;
                let (lhs_r, xsq) = (
                    &lhs.lhs[ri * hw..(ri + 1) * hw],
                    &lhs.sq[ri * hw..(ri + 1) * hw],
                );
                // The differences and the tolerances take the places of the right side and of its squares'
                // window sums (no map-sized buffer more).
                let diff = &mut rhs[at.clone()];
                diff.iter_mut().zip(lhs_r).for_each(|(d, l)| *d = l - *d);
                let tol = &mut pe[at.clone()];
                tolerance_in_place(kdot, g.b, (tol, wn2), (&pd[at], wtn), xsq, floor);
                let (diff, tol) = (&*diff, &*tol);
                if let Some(e) = unbounded(tol, Quantity::InputGrad) {
                    range = Some(e);
                    break;
                }
                if let Err(f) = self.record(Quantity::InputGrad, diff, tol, dx_rms) {
                    out = Err(f);
                    break;
                }
            }
        }
        if out.is_ok() && range.is_none() {
            // The ∇Y side of the ∇W_U check leaves with the check (the next pass makes new ones).
            let sides = WeightRhs {
                dyn2: s
                    .chunks_exact(g.m)
                    .map(|s| s.iter().zip(&chn2).map(|(sm, n)| sm * sm * n).sum())
                    .collect(),
                xnorm2: proj.reps[..r].iter().map(|rep| rep.2).collect(),
                t: proj.reps[..r]
                    .iter()
                    .flat_map(|rep| rep.0.iter().copied())
                    .collect(),
                s,
                rhs: wrhs,
            };
            self.weight_check = Some(WeightCheck {
                id: conv.id,
                g,
                sides: Some(sides),
            });
        }
        (self.comb, self.lhs) = (comb, lhs);
        self.stats.seconds += t0.elapsed().as_secs_f64();
        match range {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The second half of [`Checker::check_backward`]: checks ∇W_U (`dw`, [M, N, k, k]) of conv `id` against
    /// the right side its [`Checker::check_input_grad`] made.
    pub fn check_weight_grad(
        &mut self,
        id: usize,
        dw: &[f32],
    ) -> Result<Result<(), Failure>, CoreError> {
        let wc = match self.weight_check.take() {
            Some(wc) if wc.id == id => wc,
            other => {
                return Err(CoreError::Invalid(format!(
                    "integrity: a ∇W_U check of conv {id} with {} begun",
                    other.map_or("none".to_string(), |w| format!("conv {}'s", w.id))
                )))
            }
        };
        let t0 = Instant::now();
        let (g, r) = (wc.g, self.reps);
        let (p, kk) = (g.p(), g.k * g.k);
        if dw.len() != g.m * g.n * kk {
            return Err(CoreError::Shape(
                "integrity: backward sizes differ from the last training forward's".into(),
            ));
        }
        let Some(side) = wc.sides else {
            return Ok(Ok(()));
        };
        let s = &side.s;
        let mut out = Ok(());
        let mut range = None;
        let dw_rms = (sum_squares(dw) / dw.len() as f64).sqrt();
        let len = (g.b * p) as f64;
        let floor = 4.0 * TINY * (len * (g.m * g.n) as f64).sqrt();
        // One read of ∇W_U for every repetition: Σ_m s_m ∇W_U[m] ([R, N·k·k]), and Σ_m ∇W_U[m]² per column
        // (the left side's rounding is bounded with s_m² < 4, so the squares are shared by the repetitions).
        let mut sdw = vec![0f64; r * g.n * kk];
        combine_rows(dw, g.m, g.n * kk, s, r, &mut sdw);
        let mut dsq = vec![0f64; g.n * kk];
        column_squares(dw, g.n * kk, &mut dsq);
        for ri in 0..r {
            let t = &side.t[ri * g.n..(ri + 1) * g.n];
            let (dyn2, xnorm2) = (side.dyn2[ri], side.xnorm2[ri]);
            let rhs = &side.rhs[ri * kk..(ri + 1) * kk];
            // Σ_j t_j Σ_m s_m ∇W[m, j] and 4·Σ_j t_j² Σ_m ∇W[m, j]² ≥ Σ_m s_m² Σ_j t_j² ∇W[m, j]² per offset.
            let mut lhs = vec![0f64; kk];
            let mut wsq = vec![0f64; kk];
            let sdw = &sdw[ri * g.n * kk..(ri + 1) * g.n * kk];
            for ((&tj, row), sq) in t.iter().zip(sdw.chunks_exact(kk)).zip(dsq.chunks_exact(kk)) {
                let tj2 = 4.0 * tj * tj;
                for o in 0..kk {
                    lhs[o] += tj * row[o];
                    wsq[o] += tj2 * sq[o];
                }
            }
            let diff: Vec<f64> = (0..kk).map(|i| lhs[i] - rhs[i]).collect();
            let tol: Vec<f64> = (0..kk)
                .map(|i| KAPPA * U * (len.sqrt() * (dyn2 * xnorm2).sqrt() + wsq[i].sqrt() + floor))
                .collect();
            if let Some(e) = unbounded(&tol, Quantity::WeightGrad) {
                range = Some(e);
                break;
            }
            if let Err(f) = self.record(Quantity::WeightGrad, &diff, &tol, dw_rms) {
                out = Err(f);
                break;
            }
        }
        // The passes' scratch goes (each check makes its own again): held from one conv's backward to the next,
        // sized by the largest map checked, it would sit on top of the backward's gradients.
        self.comb = Combined::default();
        self.lhs = Lhs::default();
        self.stats.seconds += t0.elapsed().as_secs_f64();
        match range {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// Each value of `v` repeated `k` times.
/// The forward check's `Y_U`, and where the merge Y = Y_T + Y_U goes (in the check's pass over it).
enum YSide<'a> {
    /// Only read.
    Read(&'a [f32]),
    /// Y_T (the second) is added into the received values.
    MergeInPlace(&'a mut [f32], &'a [f32]),
    /// The received values, as words of their frame, are added into Y_T's buffer (and the sums then go through
    /// the channel map, where there is one).
    MergeInto(&'a [[u8; 4]], &'a mut [f32], Option<ChannelMap<'a>>),
}

impl YSide<'_> {
    fn sizes_are(&self, n: usize) -> bool {
        match self {
            YSide::Read(y) => y.len() == n,
            YSide::MergeInPlace(y, t) => y.len() == n && t.len() == n,
            YSide::MergeInto(y, t, _) => y.len() == n && t.len() == n,
        }
    }

    /// The merge alone (no values to check), of planes of `plane` values ([B, M, plane]).
    fn merge_only(self, plane: usize) {
        match self {
            YSide::Read(_) => {}
            YSide::MergeInPlace(y, t) => y.iter_mut().zip(t).for_each(|(o, t)| *o += t),
            YSide::MergeInto(y, t, map) => {
                for (o, w) in t.iter_mut().zip(y) {
                    *o += f32::from_le_bytes(*w);
                }
                if let Some(m) = map {
                    for (i, row) in t.chunks_exact_mut(plane.max(1)).enumerate() {
                        let c = i % m.channels().max(1);
                        row.iter_mut().for_each(|v| *v = m.apply(c, *v));
                    }
                }
            }
        }
    }
}

fn repeated(v: &[f64], k: usize) -> Vec<f64> {
    v.iter().flat_map(|&x| std::iter::repeat_n(x, k)).collect()
}

/// One-channel weights `w` ([C, k·k], f64) as the contraction weights `out` ([k·k, C], f32) that
/// `combine_pass` takes.
fn by_offset(w: &[f64], kk: usize, out: &mut [f32]) {
    let ch = out.len() / kk.max(1);
    for (j, wj) in w.chunks_exact(kk).enumerate() {
        for (o, &v) in wj.iter().enumerate() {
            out[o * ch + j] = v as f32;
        }
    }
}

/// The error for a tolerance the check cannot state: the checked values are so large that sums of their
/// squares overflow float32 (|v| above about 1e19 — a diverged run). Not an integrity failure: nothing shows
/// that the result is wrong, but it cannot be verified either, so it is not used.
fn unbounded(tol: &[f64], q: Quantity) -> Option<CoreError> {
    tol.iter().any(|t| !t.is_finite()).then(|| {
        CoreError::Invalid(format!(
            "the values of {} are too large to verify (sums of their squares are non-finite in float32; \
             values above about 1e19), so it was not used: the run has diverged (lower the learning rate), \
             or the accelerator sent values out of range",
            q.name()
        ))
    })
}

/// √(Σ_{b,m,p} (c_b s_m v)² / Σ_{b,m,p} (c_b s_m)²): the RMS of the checked values v weighted by their
/// squared coefficients, from the per-position sums `sq` of one repetition's left side.
fn weighted_rms(sq: &[f64], c: &[f64], s: &[f64]) -> f64 {
    weighted_rms_of(sq.iter().sum(), sq.len(), c, s)
}

/// [`weighted_rms`] from the sum `sum` of the per-position squares over `n` positions (a check made band by
/// band adds them up as it goes).
fn weighted_rms_of(sum: f64, n: usize, c: &[f64], s: &[f64]) -> f64 {
    let w: f64 = c.iter().map(|v| v * v).sum::<f64>() * s.iter().map(|v| v * v).sum::<f64>();
    (sum / (w * n as f64).max(f64::MIN_POSITIVE)).sqrt()
}

/// The tolerance τ at every position of a conv-shaped check (∇X here; Y_U's is the same, its first two terms
/// made with its X_U side, see [`XSide`] and the module docs), written over `pq`: from the squared patch norms
/// `pq` of the checked conv's input with Σ c²‖W‖² = `w2` (its honest rounding), the patch norms `pc` of the
/// batch combination with ‖Σ s W‖ = `wc` (the check's right side), the combined squares `sq` of the checked
/// values (the check's left side), and an absolute `floor`.
fn tolerance_in_place(
    kdot: f64,
    b: usize,
    (pq, w2): (&mut [f64], f64),
    (pc, wc): (&[f64], f64),
    sq: &[f64],
    floor: f64,
) {
    let own = own_rounding();
    let right = kdot.sqrt() + (b as f64).sqrt();
    for ((q, &c), &y) in pq.iter_mut().zip(pc).zip(sq) {
        *q = KAPPA
            * U
            * (kdot.sqrt() * (*q * w2).sqrt() + right * c.sqrt() * wc + own * y.sqrt() + floor);
    }
}

/// Per output pixel of rows `oy0 .. oy1`, the sum of `map` over the pixel's k × k window (zero outside), added
/// into `out` ([(oy1 − oy0)·OW]); `map` holds the input rows from `row0` on (every row those output rows read).
fn box_sum_rows(map: &[f64], row0: usize, g: &Geo, (oy0, oy1): (usize, usize), out: &mut [f64]) {
    for oy in oy0..oy1 {
        let orow = &mut out[(oy - oy0) * g.ow..][..g.ow];
        for ky in 0..g.k {
            let Some(iy) = g.row(oy, ky) else { continue };
            let irow = &map[(iy - row0) * g.w..][..g.w];
            for kx in 0..g.k {
                let (lo, hi) = g.cols(kx);
                for ox in lo..hi {
                    orow[ox] += irow[ox * g.s + kx - g.pad];
                }
            }
        }
    }
}

/// Per input pixel, the sum of `map` over the output pixels of rows `oy0 .. oy1` (`map` holds those rows,
/// [(oy1 − oy0)·OW]) whose window covers it, added into `out` ([H·W]).
fn scatter_sum_rows(map: &[f64], g: &Geo, (oy0, oy1): (usize, usize), out: &mut [f64]) {
    for oy in oy0..oy1 {
        let row = &map[(oy - oy0) * g.ow..][..g.ow];
        for ky in 0..g.k {
            let Some(iy) = g.row(oy, ky) else { continue };
            for kx in 0..g.k {
                let (lo, hi) = g.cols(kx);
                for ox in lo..hi {
                    out[iy * g.w + ox * g.s + kx - g.pad] += row[ox];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use asymml_core::layers::Conv2dConfig;
    use asymml_core::Tensor;

    fn setup(
        n: usize,
        m: usize,
        k: usize,
        stride: usize,
        pad: usize,
        hw: usize,
    ) -> (Conv2d, Tensor, Tensor) {
        let mut rng = Rng::new(7);
        let cfg = Conv2dConfig {
            stride,
            padding: pad,
            bias: true,
        };
        let mut conv = Conv2d::new(n, m, k, cfg, &mut rng);
        if let Some(b) = conv.bias.as_mut() {
            b.value.data.iter_mut().for_each(|v| *v = rng.normal());
        }
        let x = Tensor::from_vec(
            &[3, n, hw, hw],
            (0..3 * n * hw * hw).map(|_| rng.normal()).collect(),
        )
        .unwrap();
        let mut y = Tensor::default();
        conv.forward(&x, &mut y).unwrap();
        (conv, x, y)
    }

    /// `perturbed` with one element moved by `factor` × the threshold the honest check applied (2τ), checked
    /// by a checker with the same seed (so with the same coefficients).
    fn caught(
        seed: u64,
        factor: f64,
        len: usize,
        check: impl Fn(&mut Checker, Option<(usize, f32)>) -> Result<(), Failure>,
    ) -> bool {
        let mut honest = Checker::with_seed(seed, 1);
        assert_eq!(check(&mut honest, None), Ok(()), "an honest result failed");
        let e = (factor * 2.0 * honest.last_max_tol()) as f32;
        let mut ch = Checker::with_seed(seed, 1);
        check(&mut ch, Some(((seed as usize * 7919) % len, e))).is_err()
    }

    fn moved(v: &[f32], p: Option<(usize, f32)>) -> Vec<f32> {
        let mut v = v.to_vec();
        if let Some((i, e)) = p {
            v[i] += e;
        }
        v
    }

    /// Two ways of one check both passed, merged alike, with the same largest tolerance.
    fn same_check(
        (r1, r2): (Result<(), Failure>, Result<(), Failure>),
        (out1, out2): (&[f32], &[f32]),
        (c1, c2): (&Checker, &Checker),
    ) {
        assert_eq!((r1, r2), (Ok(()), Ok(())));
        assert_eq!(out1, out2, "the merge");
        let (t1, t2) = (c1.last_max_tol(), c2.last_max_tol());
        assert!(
            (t1 - t2).abs() <= 1e-6 * t1,
            "the same tolerances: {t1} {t2}"
        );
    }

    /// X ([B, N, H·W]) as slabs of `sp` pixels: [B, N, sp] each, with the pixel each starts at.
    fn slabs(x: &Tensor, sp: usize) -> Vec<(usize, Vec<f32>)> {
        let (b, n) = (x.shape[0], x.shape[1]);
        let hw = x.len() / (b * n);
        (0..hw)
            .step_by(sp)
            .map(|p0| {
                let w = sp.min(hw - p0);
                let rows = x.data.chunks_exact(hw);
                (p0, rows.flat_map(|r| r[p0..p0 + w].to_vec()).collect())
            })
            .collect()
    }

    #[test]
    fn a_check_streamed_slab_by_slab_is_the_whole_check_and_catches_the_same_errors() {
        for &(n, m, k, s, pad, hw, sp) in &[
            (3, 8, 3, 1, 1, 9, 10),
            (16, 32, 3, 1, 1, 8, 64),
            (8, 16, 1, 2, 0, 7, 5),
            (4, 6, 7, 2, 3, 11, 1),
            (5, 7, 3, 2, 1, 23, 37),
            (2, 3, 5, 1, 0, 17, 40),
        ] {
            let (conv, x, y) = setup(n, m, k, s, pad, hw);
            let words = |v: &[f32]| -> Vec<[u8; 4]> { v.iter().map(|v| v.to_le_bytes()).collect() };
            let y_t: Vec<f32> = (0..y.len()).map(|i| (i % 3) as f32 - 1.0).collect();
            for train in [false, true] {
                let (mut whole, mut streamed) =
                    (Checker::with_seed(5, 2), Checker::with_seed(5, 2));
                let (mut p1, mut p2) = (Projection::default(), Projection::default());
                let mut out1 = y_t.clone();
                let r1 = whole
                    .check_forward_into(
                        &conv,
                        &x.data,
                        &x.shape,
                        &words(&y.data),
                        train.then_some(&mut p1),
                        &mut out1,
                        None,
                    )
                    .unwrap();
                streamed
                    .begin_forward_stream(&conv, &x.shape, train)
                    .unwrap();
                for (p0, slab) in slabs(&x, sp) {
                    streamed.add_forward_slab(&slab, p0).unwrap();
                }
                let mut out2 = y_t.clone();
                let r2 = streamed
                    .finish_forward_stream_into(
                        &conv,
                        &x.shape,
                        &words(&y.data),
                        train.then_some(&mut p2),
                        &mut out2,
                        None,
                    )
                    .unwrap();
                same_check((r1, r2), (&out1, &out2), (&whole, &streamed));
                assert_eq!(p1.shape, p2.shape);
                for (a, b) in p1.reps.iter().zip(&p2.reps) {
                    // (f32 partial sums: the kernel's lanes fall differently in a slab than in the whole.)
                    assert_eq!(a.0, b.0, "the coefficients");
                    let scale = a.1.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(
                        a.1.iter()
                            .zip(&b.1)
                            .all(|(u, v)| (u - v).abs() <= 1e-6 * scale),
                        "the projection"
                    );
                    assert!((a.2 - b.2).abs() <= 1e-6 * a.2.abs(), "the channel norms");
                }
            }
            // A wrong element of Y_U just above the threshold is caught, as by the whole check.
            for seed in 1..4 {
                let fwd = |ch: &mut Checker, p: Option<(usize, f32)>| {
                    ch.begin_forward_stream(&conv, &x.shape, false).unwrap();
                    for (p0, slab) in slabs(&x, sp) {
                        ch.add_forward_slab(&slab, p0).unwrap();
                    }
                    let mut out = y_t.clone();
                    ch.finish_forward_stream_into(
                        &conv,
                        &x.shape,
                        &words(&moved(&y.data, p)),
                        None,
                        &mut out,
                        None,
                    )
                    .unwrap()
                };
                assert!(caught(seed, 1.05, y.len(), fwd), "Y_U");
            }
            // Misuse: slabs out of order, a finish before the last slab, a finish of another shape.
            let mut ch = Checker::with_seed(1, 2);
            assert!(ch.add_forward_slab(&x.data, 0).is_err(), "no stream begun");
            ch.begin_forward_stream(&conv, &x.shape, false).unwrap();
            let all = slabs(&x, sp);
            if all.len() > 1 {
                assert!(
                    ch.add_forward_slab(&all[1].1, all[1].0).is_err(),
                    "out of order"
                );
                ch.add_forward_slab(&all[0].1, 0).unwrap();
                let mut out = y_t.clone();
                assert!(
                    ch.finish_forward_stream_into(
                        &conv,
                        &x.shape,
                        &words(&y.data),
                        None,
                        &mut out,
                        None
                    )
                    .is_err(),
                    "unfinished"
                );
            }
        }
    }

    #[test]
    fn a_check_from_the_pixels_a_strided_1x1_conv_reads_is_the_whole_check() {
        for &(n, m, s, hw) in &[(8, 16, 2, 7), (4, 6, 2, 8), (3, 5, 3, 10)] {
            let (mut conv, x, y) = setup(n, m, 1, s, 0, hw);
            let oh = hw.div_ceil(s);
            // X at the pixels the conv reads: [B, N, OH, OW].
            let read: Vec<f32> = x
                .data
                .chunks_exact(hw * hw)
                .flat_map(|plane| {
                    (0..oh).flat_map(move |oy| (0..oh).map(move |ox| plane[(oy * s) * hw + ox * s]))
                })
                .collect();
            let words = |v: &[f32]| -> Vec<[u8; 4]> { v.iter().map(|v| v.to_le_bytes()).collect() };
            let y_t: Vec<f32> = (0..y.len()).map(|i| (i % 5) as f32 - 2.0).collect();
            for train in [false, true] {
                let (mut whole, mut part) = (Checker::with_seed(4, 2), Checker::with_seed(4, 2));
                let (mut p1, mut p2) = (Projection::default(), Projection::default());
                let (mut out1, mut out2) = (y_t.clone(), y_t.clone());
                let r1 = whole
                    .check_forward_into(
                        &conv,
                        &x.data,
                        &x.shape,
                        &words(&y.data),
                        train.then_some(&mut p1),
                        &mut out1,
                        None,
                    )
                    .unwrap();
                let r2 = part
                    .check_forward_read_into(
                        &conv,
                        &read,
                        &x.shape,
                        &words(&y.data),
                        train.then_some(&mut p2),
                        &mut out2,
                    )
                    .unwrap();
                same_check((r1, r2), (&out1, &out2), (&whole, &part));
                if !train {
                    continue;
                }
                // The projection: the whole check's at the pixels read, zero elsewhere, over the whole map.
                assert_eq!(p1.shape, p2.shape);
                for (a, b) in p1.reps.iter().zip(&p2.reps) {
                    assert_eq!(a.0, b.0, "the coefficients");
                    for (i, (u, v)) in a.1.iter().zip(&b.1).enumerate() {
                        let (py, px) = ((i / hw) % hw, i % hw);
                        let want = if py % s == 0 && px % s == 0 { *u } else { 0.0 };
                        assert!(
                            (want - v).abs() <= 1e-5 * (1.0 + u.abs()),
                            "pixel {i}: {want} {v}"
                        );
                    }
                    assert!(b.2 <= a.2 && b.2 > 0.0, "the norms of the pixels read");
                }
                // The backward's checks of the conv itself take it: honest results pass, a wrong ∇W_U is caught.
                let mut rng = Rng::new(11);
                let dy = Tensor::from_vec(&y.shape, (0..y.len()).map(|_| rng.normal()).collect())
                    .unwrap();
                conv.weight.zero_grad();
                let mut dx = Tensor::default();
                conv.backward(&x, &dy, Some(&mut dx)).unwrap();
                let dw = conv.weight.grad.data.clone();
                for seed in 1..4 {
                    let bwd = |ch: &mut Checker, p: Option<(usize, f32)>| {
                        ch.check_backward(&conv, &p2, &dy.data, Some(&dx.data), &moved(&dw, p))
                            .unwrap()
                    };
                    assert!(caught(seed, 4.0, dw.len(), bwd), "∇W_U");
                }
            }
            // A wrong element of Y_U just above the threshold is caught, as by the whole check.
            for seed in 1..4 {
                let fwd = |ch: &mut Checker, p: Option<(usize, f32)>| {
                    let mut out = y_t.clone();
                    let y_u = words(&moved(&y.data, p));
                    ch.check_forward_read_into(&conv, &read, &x.shape, &y_u, None, &mut out)
                        .unwrap()
                };
                assert!(caught(seed, 1.05, y.len(), fwd), "Y_U");
            }
        }
        // Only a 1 × 1 conv without padding of the given stride reads so few pixels.
        let (conv, x, y) = setup(4, 6, 3, 2, 1, 8);
        let words: Vec<[u8; 4]> = y.data.iter().map(|v| v.to_le_bytes()).collect();
        let mut out = y.data.clone();
        let err = Checker::with_seed(1, 1).check_forward_read_into(
            &conv,
            &x.data[..4 * 16 * 3],
            &x.shape,
            &words,
            None,
            &mut out,
        );
        assert!(err.is_err(), "a 3 × 3 conv");
    }

    /// An honest training forward of `conv` on x (with its output y), checked with `reps` repetitions (its
    /// projection kept), and the backward of a random ∇Y (from `seed`): the projection, ∇Y, ∇X and ∇W.
    fn honest_backward(
        conv: &mut Conv2d,
        x: &Tensor,
        y: &Tensor,
        reps: usize,
        seed: u64,
    ) -> (Projection, Tensor, Tensor, Vec<f32>) {
        let mut proj = Projection::default();
        let fwd = Checker::with_seed(9, reps)
            .check_forward(
                conv,
                &x.data,
                &x.shape,
                &mut y.data.clone(),
                Some(&mut proj),
                None,
            )
            .unwrap();
        assert_eq!(fwd, Ok(()), "the honest forward failed");
        let mut rng = Rng::new(seed);
        let dy = Tensor::from_vec(&y.shape, (0..y.len()).map(|_| rng.normal()).collect()).unwrap();
        conv.weight.zero_grad();
        let mut dx = Tensor::default();
        conv.backward(x, &dy, Some(&mut dx)).unwrap();
        (proj, dy, dx, conv.weight.grad.data.clone())
    }

    #[test]
    fn honest_results_pass_and_errors_above_the_threshold_are_caught() {
        for &(n, m, k, s, pad, hw) in &[
            (3, 8, 3, 1, 1, 9),
            (16, 32, 3, 1, 1, 8),
            (8, 16, 1, 2, 0, 7),
            (4, 6, 7, 2, 3, 11),
            (5, 7, 3, 2, 1, 6),
        ] {
            let (mut conv, x, y) = setup(n, m, k, s, pad, hw);
            let (proj, dy, dx, dw) = honest_backward(&mut conv, &x, &y, 1, 3);
            for seed in 1..6 {
                // Just above the threshold, and well above it: always caught.
                for (factor, expect) in [(1.05, true), (4.0, true)] {
                    let fwd = |ch: &mut Checker, p| {
                        ch.check_forward(
                            &conv,
                            &x.data,
                            &x.shape,
                            &mut moved(&y.data, p),
                            None,
                            None,
                        )
                        .unwrap()
                    };
                    assert_eq!(caught(seed, factor, y.len(), fwd), expect, "Y_U {factor}");
                    // Y_U read from its frame's words and added into Y_T's buffer in the check's pass.
                    let y_t: Vec<f32> = (0..y.len()).map(|i| (i % 5) as f32 * 0.25).collect();
                    let fwd_into = |ch: &mut Checker, p: Option<(usize, f32)>| {
                        let got = moved(&y.data, p);
                        let words: Vec<[u8; 4]> = got.iter().map(|v| v.to_le_bytes()).collect();
                        let mut out = y_t.clone();
                        let r = ch
                            .check_forward_into(
                                &conv, &x.data, &x.shape, &words, None, &mut out, None,
                            )
                            .unwrap();
                        let sums = got.iter().zip(&y_t).map(|(a, b)| a + b);
                        assert!(out.iter().copied().eq(sums), "the merge");
                        r
                    };
                    assert_eq!(
                        caught(seed, factor, y.len(), fwd_into),
                        expect,
                        "Y_U from its frame {factor}"
                    );
                    let bwd_dx = |ch: &mut Checker, p| {
                        let bad = moved(&dx.data, p);
                        let r = ch.check_backward(&conv, &proj, &dy.data, Some(&bad), &dw);
                        r.unwrap()
                    };
                    assert_eq!(
                        caught(seed, factor, dx.len(), bwd_dx),
                        expect,
                        "∇X {factor}"
                    );
                    let bwd_dw = |ch: &mut Checker, p| {
                        let bad = moved(&dw, p);
                        ch.check_backward(&conv, &proj, &dy.data, None, &bad)
                            .unwrap()
                    };
                    assert_eq!(
                        caught(seed, factor, dw.len(), bwd_dw),
                        expect,
                        "∇W {factor}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_forward_check_band_by_band_is_the_whole_check_and_catches_the_same_errors() {
        for &(n, m, k, s, pad, hw) in &[
            (3, 8, 3, 1, 1, 9),
            (8, 16, 1, 2, 0, 7),
            (4, 6, 7, 2, 3, 11),
            (5, 7, 3, 1, 1, 16),
        ] {
            let (conv, x, y) = setup(n, m, k, s, pad, hw);
            let y_t: Vec<f32> = (0..y.len()).map(|i| (i % 5) as f32 - 2.0).collect();
            let sum: Vec<f32> = y.data.iter().zip(&y_t).map(|(a, b)| a + b).collect();
            // One output row a band, and the whole map in one band.
            let banded = |seed: u64| {
                let mut ch = Checker::with_seed(seed, 2);
                ch.band_bytes = 1;
                ch
            };
            for seed in 1..4 {
                // Each way the Y_U side can go: only read, Y_T added in place, added into Y_T's buffer.
                let run = |ch: &mut Checker, y_u: &[f32], how: usize| {
                    let words: Vec<[u8; 4]> = y_u.iter().map(|v| v.to_le_bytes()).collect();
                    let (mut out, mut proj) = (y_u.to_vec(), Projection::default());
                    let res = match how {
                        0 => ch.check_forward(&conv, &x.data, &x.shape, &mut out, None, None),
                        1 => ch.check_forward(
                            &conv,
                            &x.data,
                            &x.shape,
                            &mut out,
                            Some(&mut proj),
                            Some(&y_t),
                        ),
                        _ => {
                            out.clone_from(&y_t);
                            ch.check_forward_into(
                                &conv, &x.data, &x.shape, &words, None, &mut out, None,
                            )
                        }
                    };
                    (res.unwrap(), out)
                };
                for how in 0..3 {
                    let (mut whole, mut bands) = (Checker::with_seed(seed, 2), banded(seed));
                    let (r1, o1) = run(&mut whole, &y.data, how);
                    let (r2, o2) = run(&mut bands, &y.data, how);
                    assert_eq!((r1, r2), (Ok(()), Ok(())));
                    assert_eq!(o1, o2, "the same merge");
                    if how > 0 {
                        assert_eq!(o2, sum);
                    }
                    let (t1, t2) = (whole.last_max_tol(), bands.last_max_tol());
                    assert!(
                        (t1 - t2).abs() <= 1e-6 * t1,
                        "the same tolerances: {t1} {t2}"
                    );
                    // A wrong element just above the threshold is caught band by band, and named.
                    let at = (seed as usize * 7919) % y.len();
                    let bad = moved(&y.data, Some((at, (2.1 * t2) as f32)));
                    let (f1, f2) = (
                        run(&mut Checker::with_seed(seed, 2), &bad, how).0,
                        run(&mut banded(seed), &bad, how).0,
                    );
                    let (f1, f2) = (f1.unwrap_err(), f2.unwrap_err());
                    assert_eq!(f1.index, f2.index);
                    assert_eq!(f2.index, at % (y.len() / (x.shape[0] * m)));
                }
            }
        }
    }

    #[test]
    fn a_check_of_the_input_grad_band_by_band_is_the_whole_check_and_catches_the_same_errors() {
        for &(n, m, k, s, pad, hw) in &[
            (3, 8, 3, 1, 1, 9),
            (8, 16, 1, 2, 0, 7),
            (4, 6, 7, 2, 3, 11),
            (5, 7, 3, 2, 1, 13),
        ] {
            let (mut conv, x, y) = setup(n, m, k, s, pad, hw);
            let (proj, dy, dx, dw) = honest_backward(&mut conv, &x, &y, 2, 4);
            // One output row a band (every band boundary), and the whole map in one band.
            let banded = |seed: u64| {
                let mut ch = Checker::with_seed(seed, 2);
                ch.band_bytes = 1;
                ch
            };
            for seed in 1..4 {
                let (mut whole, mut bands) = (Checker::with_seed(seed, 2), banded(seed));
                let r1 = whole.check_backward(&conv, &proj, &dy.data, Some(&dx.data), &dw);
                let t1 = whole.last_max_tol();
                let r2 = bands.check_backward(&conv, &proj, &dy.data, Some(&dx.data), &dw);
                assert_eq!((r1.unwrap(), r2.unwrap()), (Ok(()), Ok(())));
                // (The ∇W_U check came last: its tolerance comes from the ∇Y side the bands made, whose channel
                // norms are f32 partial sums that fall differently in bands.)
                let t2 = bands.last_max_tol();
                assert!(
                    (t1 - t2).abs() <= 1e-6 * t1,
                    "the same tolerances: {t1} {t2}"
                );
                let (mut whole, mut bands) = (Checker::with_seed(seed, 2), banded(seed));
                whole
                    .check_input_grad(&conv, &proj, &dy.data, Some(&dx.data))
                    .unwrap()
                    .unwrap();
                bands
                    .check_input_grad(&conv, &proj, &dy.data, Some(&dx.data))
                    .unwrap()
                    .unwrap();
                let (t1, t2) = (whole.last_max_tol(), bands.last_max_tol());
                assert!(
                    (t1 - t2).abs() <= 1e-6 * t1,
                    "the same ∇X tolerances: {t1} {t2}"
                );
                // A wrong element of ∇X or ∇W_U just above the threshold is caught band by band.
                let threshold = |bad: &dyn Fn(&mut Checker) -> Result<(), Failure>| {
                    let mut honest = banded(seed);
                    assert_eq!(bad(&mut honest), Ok(()));
                    honest.last_max_tol()
                };
                let at = (seed as usize * 7919) % dx.len();
                let e = 2.1
                    * threshold(&|ch: &mut Checker| {
                        ch.check_input_grad(&conv, &proj, &dy.data, Some(&dx.data))
                            .unwrap()
                    });
                let bad = moved(&dx.data, Some((at, e as f32)));
                let mut ch = banded(seed);
                assert!(ch
                    .check_input_grad(&conv, &proj, &dy.data, Some(&bad))
                    .unwrap()
                    .is_err());
                let at = (seed as usize * 7919) % dw.len();
                let e = 2.1
                    * threshold(&|ch: &mut Checker| {
                        ch.check_backward(&conv, &proj, &dy.data, None, &dw)
                            .unwrap()
                    });
                let bad = moved(&dw, Some((at, e as f32)));
                let mut ch = banded(seed);
                assert!(ch
                    .check_backward(&conv, &proj, &dy.data, None, &bad)
                    .unwrap()
                    .is_err());
            }
        }
    }
}
