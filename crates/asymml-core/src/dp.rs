//! Formal accounting of the noise on the residual X_U: clipping with calibrated Gaussian noise, and a Rényi-DP
//! accountant (composition, conversion to (ε, δ)).
//!
//! # The mechanism
//!
//! [`clip_and_noise_batch`] takes one conv's residual for a batch, `[B, N, H, W]`, and for every sample b
//! treats its residual as one vector of d = N·H·W values: it is scaled down to ℓ₂ norm at most C
//! (`x ← x · min(1, C/‖x‖)`), then every coordinate gets independent Gaussian noise of standard deviation
//!
//! ```text
//! σ = nsr · C / √d
//! ```
//!
//! i.e. `nsr` keeps its meaning of the unclipped `--noise`: the noise's RMS over the RMS of a residual that
//! sits on the clipping sphere (C/√d).
//!
//! # What is guaranteed
//!
//! Local DP of one example's residual: any two inputs x, x' of the mechanism are neighbours (the local model,
//! where the mechanism sees one example only), so the ℓ₂ sensitivity of the clipped residual is the diameter
//! of the ball, Δ = 2C. One release is the Gaussian mechanism with noise multiplier
//!
//! ```text
//! z = σ / Δ = nsr / (2 √d)
//! ```
//!
//! whose Rényi DP of order α is exactly α / (2 z²) (Mironov 2017, "Rényi Differential Privacy", Prop. 7).
//! Releases compose by adding their RDP at each order (Mironov 2017, Prop. 1), and an RDP curve gives (ε, δ)
//! by minimising a conversion over the orders: the classic ε = ρ(α) + log(1/δ)/(α−1) (Mironov 2017,
//! Prop. 3) or the tighter ε = ρ(α) + log((α−1)/α) − (log δ + log α)/(α−1) (Balle et al. 2020, "Hypothesis
//! testing interpretations and Renyi differential privacy", Thm. 21; Canonne, Kamath, Steinke 2020,
//! Prop. 12). The subsampled Gaussian (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the
//! Sampled Gaussian Mechanism", Sec. 3.3) is here for central-DP accounting (q < 1, integer orders); local
//! DP of one example uses q = 1, where it reduces to the plain Gaussian.
//!
//! The guarantee assumes exact real arithmetic: the f32/f64 Gaussian sampling is not hardened against
//! floating-point attacks (Mironov 2012, "On significance of the least significant bits for differential
//! privacy").

use crate::error::{CoreError, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// What [`clip_and_noise_batch`] did to one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClipStats {
    /// Samples in the batch.
    pub samples: usize,
    /// Values per sample (d = N·H·W).
    pub d: usize,
    /// Samples whose residual was scaled down (its norm exceeded the clip).
    pub clipped: usize,
    /// Mean and largest ℓ₂ norm of the residuals before clipping.
    pub mean_norm: f64,
    pub max_norm: f64,
    /// The noise's standard deviation per coordinate, σ = nsr·C/√d.
    pub sigma: f32,
}

/// σ = nsr · C / √d, the per-coordinate noise standard deviation for a clip C on d values.
pub fn noise_std(clip: f32, nsr: f32, d: usize) -> f32 {
    if d == 0 {
        return 0.0;
    }
    (nsr as f64 * clip as f64 / (d as f64).sqrt()) as f32
}

/// z = σ / (2C) = nsr / (2√d): the noise multiplier of one release under local DP (replace-one, ℓ₂
/// sensitivity 2C). Infinite when d = 0 (nothing is released).
pub fn local_noise_multiplier(nsr: f64, d: usize) -> f64 {
    if d == 0 {
        return f64::INFINITY;
    }
    nsr / (2.0 * (d as f64).sqrt())
}

fn check_clip(clip: f32, nsr: f32) -> Result<()> {
    if !(clip.is_finite() && clip > 0.0) {
        return Err(CoreError::Invalid(format!(
            "clip must be finite and above 0 (got {clip})"
        )));
    }
    if !(nsr.is_finite() && nsr >= 0.0) {
        return Err(CoreError::Invalid(format!(
            "noise-to-signal ratio must be finite and at least 0 (got {nsr})"
        )));
    }
    Ok(())
}

/// Clips one sample's residual to ℓ₂ norm `clip` and adds N(0, sigma²) to every value. Returns its norm
/// before clipping. A residual with a non-finite value is refused (its norm cannot be bounded).
pub fn clip_and_noise(x_u: &mut [f32], clip: f32, sigma: f32, rng: &mut Rng) -> Result<f64> {
    let sumsq: f64 = x_u.iter().map(|&v| v as f64 * v as f64).sum();
    let norm = sumsq.sqrt();
    if !norm.is_finite() {
        return Err(CoreError::Invalid(
            "clip: the residual holds a non-finite value".into(),
        ));
    }
    if norm > clip as f64 {
        // The factor is shrunk by 2⁻²² so that the f32-rounded result stays within the clip: each value's
        // rounding moves the norm by at most 2⁻²⁴ of it.
        let f = (clip as f64 / norm * (1.0 - 2f64.powi(-22))) as f32;
        x_u.iter_mut().for_each(|v| *v *= f);
    }
    if sigma > 0.0 && sigma.is_finite() {
        x_u.iter_mut().for_each(|v| *v += sigma * rng.normal());
    }
    Ok(norm)
}

/// x_u: [B, …], every sample's residual (d = len/B values) ← clip to ℓ₂ norm `clip`, then + N(0, σ²) per
/// value with σ = nsr·clip/√d ([`noise_std`]). `clip` must be finite and above 0, `nsr` finite and ≥ 0 (with
/// nsr = 0 nothing is added: clipping alone gives no privacy, ε = ∞).
pub fn clip_and_noise_batch(
    x_u: &mut Tensor,
    clip: f32,
    nsr: f32,
    rng: &mut Rng,
) -> Result<ClipStats> {
    check_clip(clip, nsr)?;
    let Some(&b) = x_u.shape.first() else {
        return Err(CoreError::Shape(
            "clip: the residual has no batch dimension".into(),
        ));
    };
    if b == 0 || x_u.is_empty() {
        return Ok(ClipStats {
            samples: b,
            ..Default::default()
        });
    }
    let d = x_u.len() / b;
    let sigma = noise_std(clip, nsr, d);
    let mut st = ClipStats {
        samples: b,
        d,
        sigma,
        ..Default::default()
    };
    for s in x_u.data.chunks_mut(d) {
        let norm = clip_and_noise(s, clip, sigma, rng)?;
        st.mean_norm += norm / b as f64;
        st.max_norm = st.max_norm.max(norm);
        if norm > clip as f64 {
            st.clipped += 1;
        }
    }
    Ok(st)
}

// ---- Rényi DP ----

/// RDP of order α > 1 of the Gaussian mechanism with noise multiplier z = σ/Δ: α / (2z²) (Mironov 2017,
/// Prop. 7). z = 0 gives ∞, z = ∞ gives 0.
pub fn gaussian_rdp(z: f64, alpha: f64) -> f64 {
    if z == 0.0 {
        return f64::INFINITY;
    }
    alpha / (2.0 * z * z)
}

/// log(e^a + e^b) without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// RDP of integer order α ≥ 2 of the sampled Gaussian mechanism (each record in with probability q, noise
/// multiplier z): log(A_α)/(α−1) with A_α = Σ_{k=0}^{α} C(α,k) (1−q)^{α−k} q^k exp((k²−k)/(2z²)) (Mironov,
/// Talwar, Zhang 2019, Sec. 3.3), summed in log space. q = 1 is the plain Gaussian, q = 0 releases nothing.
pub fn sampled_gaussian_rdp(q: f64, z: f64, alpha: u32) -> Result<f64> {
    if !(0.0..=1.0).contains(&q) {
        return Err(CoreError::Invalid(format!(
            "sampling rate must be in [0, 1] (got {q})"
        )));
    }
    if z.is_nan() || z < 0.0 {
        return Err(CoreError::Invalid(format!(
            "noise multiplier must be at least 0 (got {z})"
        )));
    }
    if alpha < 2 {
        return Err(CoreError::Invalid(format!(
            "the sampled-Gaussian formula needs an integer order ≥ 2 (got {alpha})"
        )));
    }
    if q == 0.0 || z == f64::INFINITY {
        return Ok(0.0);
    }
    if q == 1.0 {
        return Ok(gaussian_rdp(z, alpha as f64));
    }
    if z == 0.0 {
        return Ok(f64::INFINITY);
    }
    let a = alpha as f64;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let inv = 1.0 / (2.0 * z * z);
    let mut log_binom = 0.0f64; // log C(α, 0)
    let mut log_a = f64::NEG_INFINITY;
    for k in 0..=alpha {
        if k > 0 {
            log_binom += ((a - k as f64 + 1.0) / k as f64).ln();
        }
        let kf = k as f64;
        let term = log_binom + (a - kf) * l1q + kf * lq + (kf * kf - kf) * inv;
        log_a = log_add(log_a, term);
    }
    // A_α ≥ 1 in exact arithmetic (it is E[(p/q)^α] ≥ 1); rounding may leave it a hair below.
    Ok((log_a / (a - 1.0)).max(0.0))
}

/// How an RDP curve is turned into (ε, δ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// ε = ρ(α) + log(1/δ)/(α−1) (Mironov 2017, Prop. 3).
    Classic,
    /// ε = ρ(α) + log((α−1)/α) − (log δ + log α)/(α−1) (Balle et al. 2020, Thm. 21; Canonne, Kamath,
    /// Steinke 2020), never larger than the classic one.
    Tight,
}

/// ε at one order α > 1 for a given RDP value ρ and δ in (0, 1) (never below 0).
pub fn rdp_to_eps(rdp: f64, alpha: f64, delta: f64, conv: Conversion) -> f64 {
    if rdp.is_nan() || alpha.is_nan() || alpha <= 1.0 {
        return f64::INFINITY;
    }
    let eps = match conv {
        Conversion::Classic => rdp - delta.ln() / (alpha - 1.0),
        Conversion::Tight => {
            rdp + ((alpha - 1.0) / alpha).ln() - (delta.ln() + alpha.ln()) / (alpha - 1.0)
        }
    };
    eps.max(0.0)
}

/// The default orders: α − 1 on a log grid from 10⁻⁶ to 10⁴ (20 per decade), and every integer from 2 to 256
/// with a few larger ones (the integers serve the sampled Gaussian, which is computed at integer orders only).
pub fn default_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (-120..=80)
        .map(|i| 1.0 + 10f64.powf(i as f64 / 20.0))
        .collect();
    v.extend((2..=256).map(|a| a as f64));
    v.extend([320.0, 384.0, 512.0, 768.0, 1024.0]);
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

/// An (ε, δ) pair and the order that gave it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpsDelta {
    pub eps: f64,
    pub delta: f64,
    /// The RDP order α the minimum was found at (NaN when ε = ∞ at every order).
    pub order: f64,
}

/// A Rényi-DP accountant: the RDP of everything released so far, at each of a fixed set of orders.
#[derive(Clone, Debug)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        RdpAccountant { orders, rdp }
    }
}

impl RdpAccountant {
    /// An accountant at these orders (each finite and above 1).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self> {
        if orders.is_empty() || orders.iter().any(|a| !(a.is_finite() && *a > 1.0)) {
            return Err(CoreError::Invalid(
                "RDP orders must be finite and above 1".into(),
            ));
        }
        let rdp = vec![0.0; orders.len()];
        Ok(RdpAccountant { orders, rdp })
    }

    /// The orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The accumulated RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Adds `count` releases of the Gaussian mechanism with noise multiplier `z` (= σ/Δ; ≥ 0, ∞ allowed).
    pub fn compose_gaussian(&mut self, z: f64, count: u64) -> Result<()> {
        if z.is_nan() || z < 0.0 {
            return Err(CoreError::Invalid(format!(
                "noise multiplier must be at least 0 (got {z})"
            )));
        }
        if count == 0 {
            return Ok(());
        }
        for (a, r) in self.orders.iter().zip(&mut self.rdp) {
            *r += count as f64 * gaussian_rdp(z, *a);
        }
        Ok(())
    }

    /// Adds `count` releases of the sampled Gaussian mechanism (rate q, noise multiplier z). With q < 1
    /// only integer orders are computed; the others become ∞ (unusable), as the formula is for integers.
    pub fn compose_sampled_gaussian(&mut self, q: f64, z: f64, count: u64) -> Result<()> {
        if q == 1.0 {
            return self.compose_gaussian(z, count);
        }
        if count == 0 {
            // Still check the parameters.
            sampled_gaussian_rdp(q, z, 2)?;
            return Ok(());
        }
        for (a, r) in self.orders.iter().zip(&mut self.rdp) {
            if a.fract() == 0.0 && *a <= u32::MAX as f64 {
                *r += count as f64 * sampled_gaussian_rdp(q, z, *a as u32)?;
            } else {
                sampled_gaussian_rdp(q, z, 2)?;
                *r = f64::INFINITY;
            }
        }
        Ok(())
    }

    /// Adds another accountant's releases (same orders).
    pub fn compose(&mut self, other: &RdpAccountant) -> Result<()> {
        if other.orders != self.orders {
            return Err(CoreError::Invalid(
                "RDP accountants with different orders".into(),
            ));
        }
        self.rdp
            .iter_mut()
            .zip(&other.rdp)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// The smallest ε over the orders for `delta` in (0, 1).
    pub fn epsilon(&self, delta: f64, conv: Conversion) -> Result<EpsDelta> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(CoreError::Invalid(format!(
                "delta must be in (0, 1) (got {delta})"
            )));
        }
        let mut best = EpsDelta {
            eps: f64::INFINITY,
            delta,
            order: f64::NAN,
        };
        if self.rdp.iter().all(|r| *r == 0.0) {
            // Nothing released (or only infinitely noisy releases): (0, 0)-DP, whatever the order.
            best.eps = 0.0;
            return Ok(best);
        }
        for (a, r) in self.orders.iter().zip(&self.rdp) {
            let e = rdp_to_eps(*r, *a, delta, conv);
            if e < best.eps {
                best.eps = e;
                best.order = *a;
            }
        }
        Ok(best)
    }
}

/// (ε, δ) of `count` releases of the Gaussian mechanism with noise multiplier z, composed (tight conversion,
/// default orders).
pub fn gaussian_epsilon(z: f64, count: u64, delta: f64) -> Result<EpsDelta> {
    let mut acc = RdpAccountant::default();
    acc.compose_gaussian(z, count)?;
    acc.epsilon(delta, Conversion::Tight)
}
