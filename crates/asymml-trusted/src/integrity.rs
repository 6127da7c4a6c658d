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
//!           + (√K + B) · ‖(Σ_b c_b X_U_b) patch_p‖ · ‖Σ_m s_m W_m‖        rounding of the check itself
//!           + √(Σ_b Σ_m (c_b s_m Y_U[b, m, p])²) )                        the bias add, the combination
//! ```
//!
//! with κ = [`KAPPA`] (and the same form for ∇X and ∇W_U). A result is refused when any |difference| > τ.
//! **Detection threshold**: since |c_b s_m| ≥ 1, an error e in any one element of Y_U at pixel p is caught by
//! each repetition when |e| > 2·τ_p; several wrong elements can cancel only for coefficient draws of
//! vanishing probability, and each of the `reps` repetitions (2 by default) draws new coefficients.

use asymml_core::layers::Conv2d;
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
/// The largest |difference| / τ seen on honest runs (see the tests and the README).
pub const MEASURED_WORST: f64 = 0.05;
/// Repetitions per check (each with fresh coefficients).
pub const DEFAULT_REPS: usize = 2;
/// Input channels accumulated in f32 before a partial sum is added to the f64 total.
const BLOCK: usize = 16;

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
    /// the checked values: a single wrong element off by more than this fraction of the values' RMS is
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
/// projection Σ_j t_j X_U[b, j] ([B, H·W]) and Σ_j t_j²‖X_U[:, j]‖².
#[derive(Clone, Debug, Default)]
pub struct Projection {
    shape: [usize; 4],
    reps: Vec<(Vec<f64>, Vec<f64>, f64)>,
}

/// Geometry of one conv application.
#[derive(Clone, Copy, Debug)]
struct Geo {
    b: usize,
    n: usize,
    h: usize,
    w: usize,
    m: usize,
    k: usize,
    s: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geo {
    fn of(conv: &Conv2d, x_shape: &[usize]) -> Result<Geo, CoreError> {
        let &[b, n, h, w] = x_shape else {
            return Err(CoreError::Shape(format!(
                "integrity: input {x_shape:?} is not [B, N, H, W]"
            )));
        };
        let out = conv.out_shape(x_shape)?;
        Ok(Geo {
            b,
            n,
            h,
            w,
            m: conv.out_ch,
            k: conv.k,
            s: conv.stride,
            pad: conv.pad,
            oh: out[2],
            ow: out[3],
        })
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// The output columns ox whose input column ox·s + kx − pad lies in [0, w).
    fn cols(&self, kx: usize) -> (usize, usize) {
        let lo = if self.pad > kx {
            (self.pad - kx).div_ceil(self.s)
        } else {
            0
        };
        let hi = if self.w + self.pad > kx {
            ((self.w + self.pad - kx - 1) / self.s + 1).min(self.ow)
        } else {
            0
        };
        (lo, hi.max(lo))
    }

    /// The input row of output row oy at kernel row ky, if inside.
    fn row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.s + ky)
            .checked_sub(self.pad)
            .filter(|&iy| iy < self.h)
    }
}

/// The checker: secret randomness, the number of repetitions, counters.
pub struct Checker {
    rng: Rng,
    reps: usize,
    stats: IntegrityStats,
    /// The largest τ of the last check (the threshold it applied is twice that).
    last_max_tol: f64,
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
        }
    }

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
        self.stats.checks += 1;
        let max_tol = tol.iter().cloned().fold(0.0, f64::max);
        self.last_max_tol = max_tol;
        // (Values at f32's subnormal scale have only the absolute floor for a threshold: not counted.)
        if rms > 1e-30 {
            let rel = &mut self.stats.threshold_rel[q as usize];
            *rel = rel.max(2.0 * max_tol / rms);
        }
        let mut worst = (0usize, 0.0f64);
        for (i, (d, t)) in diff.iter().zip(tol).enumerate() {
            let r = d.abs() / t;
            // A NaN ratio (a non-finite value slipped through) counts as the worst.
            let r = if r.is_nan() { f64::INFINITY } else { r };
            if r > worst.1 {
                worst = (i, r);
            }
        }
        if worst.1 > 1.0 {
            self.stats.failures += 1;
            return Err(Failure {
                quantity: q,
                index: worst.0,
                diff: diff[worst.0].abs(),
                tol: tol[worst.0],
            });
        }
        self.stats.worst_ratio = self.stats.worst_ratio.max(worst.1);
        Ok(())
    }

    /// Checks `y_u` ([B, M, OH, OW]) = conv(x_u, W) + b for `conv` with the trusted copy of its weights;
    /// `x_u` ([B, N, H, W]) is the residual exactly as it was sent.
    pub fn check_forward(
        &mut self,
        conv: &Conv2d,
        x_u: &[f32],
        x_shape: &[usize],
        y_u: &[f32],
    ) -> Result<Result<(), Failure>, CoreError> {
        let t0 = Instant::now();
        let g = Geo::of(conv, x_shape)?;
        let (hw, p, kk) = (g.hw(), g.p(), g.k * g.k);
        if x_u.len() != g.b * g.n * hw || y_u.len() != g.b * g.m * p {
            return Err(CoreError::Shape("integrity: forward sizes differ".into()));
        }
        if g.b * g.n * hw * g.m * p == 0 {
            // An empty tensor on either side: nothing to compare (its shape was checked on receipt).
            return Ok(Ok(()));
        }
        let w = &conv.weight.value.data;
        let kdot = (g.n * kk) as f64;
        let mut out = Ok(());
        for _ in 0..self.reps {
            let c = self.coefs(g.b);
            let s = self.coefs(g.m);
            // Σ_b c_b X_U[b], Σ_b c_b² Σ_j X_U[b, j]², and Σ_j (Σ_b c_b X_U[b, j])², per pixel.
            let (xc, q, xsq) = combine_batch(x_u, g.n, hw, &c);
            // Σ_m s_m W[m] and Σ_m s_m²‖W_m‖².
            let mut ws = vec![0f64; g.n * kk];
            let mut wn2 = 0.0;
            for (mi, wm) in w.chunks_exact(g.n * kk).enumerate() {
                let sm = s[mi];
                let mut nm = 0.0;
                for (a, &v) in ws.iter_mut().zip(wm) {
                    *a += sm * v as f64;
                    nm += (v as f64) * (v as f64);
                }
                wn2 += sm * sm * nm;
            }
            let wsn = ws.iter().map(|v| v * v).sum::<f64>().sqrt();
            let mut z = vec![0f64; p];
            conv_one(&xc, &ws, &g, &mut z);
            let pq = box_sum(&q, &g);
            let pxc = box_sum(&xsq, &g);
            // Σ_b Σ_m c_b s_m Y_U[b, m] and Σ (c_b s_m Y_U)² per pixel.
            let mut lhs = vec![0f64; p];
            let mut ysq = vec![0f64; p];
            for (bi, yb) in y_u.chunks_exact(g.m * p).enumerate() {
                for (mi, ym) in yb.chunks_exact(p).enumerate() {
                    let cs = c[bi] * s[mi];
                    for ((l, sq), &v) in lhs.iter_mut().zip(ysq.iter_mut()).zip(ym) {
                        let t = cs * v as f64;
                        *l += t;
                        *sq += t * t;
                    }
                }
            }
            let bias = conv.bias.as_ref().map_or(0.0, |b| {
                let sb: f64 = b
                    .value
                    .data
                    .iter()
                    .zip(&s)
                    .map(|(&v, sm)| v as f64 * sm)
                    .sum();
                sb * c.iter().sum::<f64>()
            });
            let floor = 4.0 * TINY * (kdot * (g.b * g.m) as f64).sqrt();
            let diff: Vec<f64> = (0..p).map(|i| lhs[i] - z[i] - bias).collect();
            let tol: Vec<f64> = (0..p)
                .map(|i| {
                    KAPPA
                        * U
                        * (kdot.sqrt() * (pq[i] * wn2).sqrt()
                            + (kdot.sqrt() + (g.b as f64).sqrt()) * pxc[i].sqrt() * wsn
                            + ysq[i].sqrt()
                            + floor)
                })
                .collect();
            if let Err(f) = self.record(Quantity::Output, &diff, &tol, rms(y_u)) {
                out = Err(f);
                break;
            }
        }
        self.stats.seconds += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Takes, from the residual `x_u` ([B, N, H, W]) as it is sent, what the ∇W_U check of the same conv's
    /// backward needs (fresh t per repetition).
    pub fn project_residual(
        &mut self,
        x_u: &[f32],
        x_shape: &[usize],
        out: &mut Projection,
    ) -> Result<(), CoreError> {
        let t0 = Instant::now();
        let &[b, n, h, w] = x_shape else {
            return Err(CoreError::Shape(format!(
                "integrity: input {x_shape:?} is not [B, N, H, W]"
            )));
        };
        let hw = h * w;
        if x_u.len() != b * n * hw {
            return Err(CoreError::Shape("integrity: residual size differs".into()));
        }
        // (An empty residual gives empty projections, which `chunks_exact` below must not see.)
        let hw_or_1 = hw.max(1);
        out.shape = [b, n, h, w];
        out.reps.clear();
        for _ in 0..self.reps {
            let t = self.coefs(n);
            let mut xt = vec![0f64; b * hw];
            let mut ch2 = vec![0f64; n];
            let per = (n * hw).max(1);
            for (xtb, xb) in xt.chunks_exact_mut(hw_or_1).zip(x_u.chunks_exact(per)) {
                for ((&tj, c2), xj) in t.iter().zip(ch2.iter_mut()).zip(xb.chunks_exact(hw_or_1)) {
                    let mut acc = 0f64;
                    for (a, &v) in xtb.iter_mut().zip(xj) {
                        let v = v as f64;
                        *a += tj * v;
                        acc += v * v;
                    }
                    *c2 += acc;
                }
            }
            let norm2 = t.iter().zip(&ch2).map(|(tj, c2)| tj * tj * c2).sum();
            out.reps.push((t, xt, norm2));
        }
        self.stats.seconds += t0.elapsed().as_secs_f64();
        Ok(())
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
        let t0 = Instant::now();
        let g = Geo::of(conv, &proj.shape)?;
        let (hw, p, kk) = (g.hw(), g.p(), g.k * g.k);
        if dy.len() != g.b * g.m * p
            || dw.len() != g.m * g.n * kk
            || dx.is_some_and(|d| d.len() != g.b * g.n * hw)
            || proj.reps.len() < self.reps
        {
            return Err(CoreError::Shape(
                "integrity: backward sizes differ from the last training forward's".into(),
            ));
        }
        if g.b * g.n * hw * g.m * p == 0 {
            return Ok(Ok(()));
        }
        let w = &conv.weight.value.data;
        let mut out = Ok(());
        for rep in 0..self.reps {
            if let Some(dx) = dx {
                if let Err(f) = self.check_input_grad(&g, w, dy, dx) {
                    out = Err(f);
                    break;
                }
            }
            if let Err(f) = self.check_weight_grad(&g, &proj.reps[rep], dy, dw) {
                out = Err(f);
                break;
            }
        }
        self.stats.seconds += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    fn check_input_grad(
        &mut self,
        g: &Geo,
        w: &[f32],
        dy: &[f32],
        dx: &[f32],
    ) -> Result<(), Failure> {
        let (hw, p, kk) = (g.hw(), g.p(), g.k * g.k);
        let c = self.coefs(g.b);
        let t = self.coefs(g.n);
        // Σ_b c_b ∇Y[b], Σ_b c_b² Σ_m ∇Y[b, m]², and Σ_m (Σ_b c_b ∇Y[b, m])², per output pixel.
        let (dyc, e, dsq) = combine_batch(dy, g.m, p, &c);
        // Σ_j t_j W[:, j] ([M, k, k]) and Σ_j t_j²‖W[:, j]‖².
        let mut wt = vec![0f64; g.m * kk];
        let mut col2 = vec![0f64; g.n];
        for (mi, wm) in w.chunks_exact(g.n * kk).enumerate() {
            for (j, wj) in wm.chunks_exact(kk).enumerate() {
                for (o, &v) in wj.iter().enumerate() {
                    wt[mi * kk + o] += t[j] * v as f64;
                    col2[j] += (v as f64) * (v as f64);
                }
            }
        }
        let wn2: f64 = t.iter().zip(&col2).map(|(tj, c2)| tj * tj * c2).sum();
        let wtn = wt.iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut rhs = vec![0f64; hw];
        conv_transposed_one(&dyc, &wt, g, &mut rhs);
        let pe = scatter_sum(&e, g);
        let pd = scatter_sum(&dsq, g);
        let mut lhs = vec![0f64; hw];
        let mut xsq = vec![0f64; hw];
        for (bi, xb) in dx.chunks_exact(g.n * hw).enumerate() {
            for (j, xj) in xb.chunks_exact(hw).enumerate() {
                let ct = c[bi] * t[j];
                for ((l, sq), &v) in lhs.iter_mut().zip(xsq.iter_mut()).zip(xj) {
                    let a = ct * v as f64;
                    *l += a;
                    *sq += a * a;
                }
            }
        }
        let kdot = ((g.m * kk) as f64 / (g.s * g.s) as f64).max(1.0);
        let floor = 4.0 * TINY * (kdot * (g.b * g.n) as f64).sqrt();
        let diff: Vec<f64> = (0..hw).map(|i| lhs[i] - rhs[i]).collect();
        let tol: Vec<f64> = (0..hw)
            .map(|i| {
                KAPPA
                    * U
                    * (kdot.sqrt() * (pe[i] * wn2).sqrt()
                        + (kdot.sqrt() + (g.b as f64).sqrt()) * pd[i].sqrt() * wtn
                        + xsq[i].sqrt()
                        + floor)
            })
            .collect();
        self.record(Quantity::InputGrad, &diff, &tol, rms(dx))
    }

    fn check_weight_grad(
        &mut self,
        g: &Geo,
        rep: &(Vec<f64>, Vec<f64>, f64),
        dy: &[f32],
        dw: &[f32],
    ) -> Result<(), Failure> {
        let (hw, p, kk) = (g.hw(), g.p(), g.k * g.k);
        let (t, xt, xnorm2) = rep;
        let s = self.coefs(g.m);
        // Σ_m s_m ∇Y[b, m] ([B, P]) and Σ_m s_m²‖∇Y[:, m]‖².
        let mut dys = vec![0f64; g.b * p];
        let mut dyn2 = 0.0;
        for (dsb, db) in dys.chunks_exact_mut(p).zip(dy.chunks_exact(g.m * p)) {
            for (&sm, dm) in s.iter().zip(db.chunks_exact(p)) {
                let mut acc = 0f64;
                for (a, &v) in dsb.iter_mut().zip(dm) {
                    let v = v as f64;
                    *a += sm * v;
                    acc += v * v;
                }
                dyn2 += sm * sm * acc;
            }
        }
        // rhs[off] = Σ_b Σ_p dys[b, p] · xt[b, p·s + off − pad].
        let mut rhs = vec![0f64; kk];
        for (dsb, xtb) in dys.chunks_exact(p).zip(xt.chunks_exact(hw)) {
            for ky in 0..g.k {
                for kx in 0..g.k {
                    let (lo, hi) = g.cols(kx);
                    let mut acc = 0f64;
                    for oy in 0..g.oh {
                        let Some(iy) = g.row(oy, ky) else { continue };
                        let drow = &dsb[oy * g.ow..(oy + 1) * g.ow];
                        let xrow = &xtb[iy * g.w..(iy + 1) * g.w];
                        for ox in lo..hi {
                            acc += drow[ox] * xrow[ox * g.s + kx - g.pad];
                        }
                    }
                    rhs[ky * g.k + kx] += acc;
                }
            }
        }
        let mut lhs = vec![0f64; kk];
        let mut wsq = vec![0f64; kk];
        for (mi, wm) in dw.chunks_exact(g.n * kk).enumerate() {
            for (j, wj) in wm.chunks_exact(kk).enumerate() {
                let st = s[mi] * t[j];
                for ((l, sq), &v) in lhs.iter_mut().zip(wsq.iter_mut()).zip(wj) {
                    let a = st * v as f64;
                    *l += a;
                    *sq += a * a;
                }
            }
        }
        let len = (g.b * p) as f64;
        let floor = 4.0 * TINY * (len * (g.m * g.n) as f64).sqrt();
        let diff: Vec<f64> = (0..kk).map(|i| lhs[i] - rhs[i]).collect();
        let tol: Vec<f64> = (0..kk)
            .map(|i| KAPPA * U * (len.sqrt() * (dyn2 * xnorm2).sqrt() + wsq[i].sqrt() + floor))
            .collect();
        self.record(Quantity::WeightGrad, &diff, &tol, rms(dw))
    }
}

/// data: [B, C, P] with coefficients c [B] → (Σ_b c_b data[b] as [C, P]; per pixel Σ_b c_b² Σ_ch data[b, ch]²;
/// per pixel Σ_ch (Σ_b c_b data[b, ch])²), in one pass over `data`.
fn combine_batch(data: &[f32], ch: usize, p: usize, c: &[f64]) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let mut comb = vec![0f32; ch * p];
    let mut sq = vec![0f64; p];
    for (bi, db) in data.chunks_exact(ch * p).enumerate() {
        let (cb, cb2) = (c[bi] as f32, c[bi] * c[bi]);
        for (cm, dm) in comb.chunks_exact_mut(p).zip(db.chunks_exact(p)) {
            for ((a, &v), e) in cm.iter_mut().zip(dm).zip(sq.iter_mut()) {
                *a += cb * v;
                *e += cb2 * (v as f64) * (v as f64);
            }
        }
    }
    let mut comb_sq = vec![0f64; p];
    for cm in comb.chunks_exact(p) {
        comb_sq
            .iter_mut()
            .zip(cm)
            .for_each(|(a, &v)| *a += (v as f64) * (v as f64));
    }
    (comb, sq, comb_sq)
}

/// √(Σ v² / n) (0 when empty).
fn rms(v: &[f32]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() / v.len() as f64).sqrt()
}

/// z [OH·OW] += conv of xc [N, H, W] with the single output channel ws [N, k, k] (f32 partial sums over
/// [`BLOCK`] channels, added in f64).
fn conv_one(xc: &[f32], ws: &[f64], g: &Geo, z: &mut [f64]) {
    let (hw, kk) = (g.hw(), g.k * g.k);
    let mut part = vec![0f32; g.ow];
    for oy in 0..g.oh {
        let zrow = &mut z[oy * g.ow..(oy + 1) * g.ow];
        for j0 in (0..g.n).step_by(BLOCK) {
            part.iter_mut().for_each(|v| *v = 0.0);
            for j in j0..(j0 + BLOCK).min(g.n) {
                for ky in 0..g.k {
                    let Some(iy) = g.row(oy, ky) else { continue };
                    let row = &xc[j * hw + iy * g.w..j * hw + (iy + 1) * g.w];
                    for kx in 0..g.k {
                        let wv = ws[j * kk + ky * g.k + kx] as f32;
                        let (lo, hi) = g.cols(kx);
                        if lo >= hi {
                            continue;
                        }
                        if g.s == 1 {
                            let start = lo + kx - g.pad;
                            for (a, &v) in part[lo..hi].iter_mut().zip(&row[start..start + hi - lo])
                            {
                                *a += wv * v;
                            }
                        } else {
                            for (ox, a) in part.iter_mut().enumerate().take(hi).skip(lo) {
                                *a += wv * row[ox * g.s + kx - g.pad];
                            }
                        }
                    }
                }
            }
            zrow.iter_mut()
                .zip(&part)
                .for_each(|(a, &v)| *a += v as f64);
        }
    }
}

/// rhs [H·W] += the transposed conv of dyc [M, OH, OW] with the single input channel wt [M, k, k].
fn conv_transposed_one(dyc: &[f32], wt: &[f64], g: &Geo, rhs: &mut [f64]) {
    let (p, kk) = (g.p(), g.k * g.k);
    let mut part = vec![0f32; g.hw()];
    for m0 in (0..g.m).step_by(BLOCK) {
        part.iter_mut().for_each(|v| *v = 0.0);
        for mi in m0..(m0 + BLOCK).min(g.m) {
            let dm = &dyc[mi * p..(mi + 1) * p];
            for ky in 0..g.k {
                for kx in 0..g.k {
                    let wv = wt[mi * kk + ky * g.k + kx] as f32;
                    let (lo, hi) = g.cols(kx);
                    if lo >= hi {
                        continue;
                    }
                    for oy in 0..g.oh {
                        let Some(iy) = g.row(oy, ky) else { continue };
                        let drow = &dm[oy * g.ow..(oy + 1) * g.ow];
                        let prow = &mut part[iy * g.w..(iy + 1) * g.w];
                        if g.s == 1 {
                            let start = lo + kx - g.pad;
                            for (a, &v) in
                                prow[start..start + hi - lo].iter_mut().zip(&drow[lo..hi])
                            {
                                *a += wv * v;
                            }
                        } else {
                            for ox in lo..hi {
                                prow[ox * g.s + kx - g.pad] += wv * drow[ox];
                            }
                        }
                    }
                }
            }
        }
        rhs.iter_mut().zip(&part).for_each(|(a, &v)| *a += v as f64);
    }
}

/// Per output pixel, the sum of `map` ([H·W]) over the pixel's k × k window (zero outside).
fn box_sum(map: &[f64], g: &Geo) -> Vec<f64> {
    let mut out = vec![0f64; g.p()];
    for oy in 0..g.oh {
        for ky in 0..g.k {
            let Some(iy) = g.row(oy, ky) else { continue };
            for kx in 0..g.k {
                let (lo, hi) = g.cols(kx);
                for ox in lo..hi {
                    out[oy * g.ow + ox] += map[iy * g.w + ox * g.s + kx - g.pad];
                }
            }
        }
    }
    out
}

/// Per input pixel, the sum of `map` ([OH·OW]) over the output pixels whose window covers it.
fn scatter_sum(map: &[f64], g: &Geo) -> Vec<f64> {
    let mut out = vec![0f64; g.hw()];
    for oy in 0..g.oh {
        for ky in 0..g.k {
            let Some(iy) = g.row(oy, ky) else { continue };
            for kx in 0..g.k {
                let (lo, hi) = g.cols(kx);
                for ox in lo..hi {
                    out[iy * g.w + ox * g.s + kx - g.pad] += map[oy * g.ow + ox];
                }
            }
        }
    }
    out
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
            let mut proj = Projection::default();
            Checker::with_seed(9, 1)
                .project_residual(&x.data, &x.shape, &mut proj)
                .unwrap();
            let mut rng = Rng::new(3);
            let dy =
                Tensor::from_vec(&y.shape, (0..y.len()).map(|_| rng.normal()).collect()).unwrap();
            conv.weight.zero_grad();
            let mut dx = Tensor::default();
            conv.backward(&x, &dy, Some(&mut dx)).unwrap();
            let dw = conv.weight.grad.data.clone();
            for seed in 1..6 {
                // Just above the threshold, and well above it: always caught.
                for (factor, expect) in [(1.05, true), (4.0, true)] {
                    let fwd = |ch: &mut Checker, p| {
                        ch.check_forward(&conv, &x.data, &x.shape, &moved(&y.data, p))
                            .unwrap()
                    };
                    assert_eq!(caught(seed, factor, y.len(), fwd), expect, "Y_U {factor}");
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
}
