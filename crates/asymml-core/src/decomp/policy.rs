//! How many components r each conv layer keeps in the trusted runtime.

use crate::error::CoreError;
use std::fmt;
use std::str::FromStr;

/// The largest rank of the paper's schedule.
pub const SCHEDULE_MAX_RANK: usize = 32;

/// Rank policy of a conv layer; every policy's r is clamped to [1, N] (N = the layer's input channels).
///
/// Strings (`FromStr`, case-insensitive): `fixed:R` (R ≥ 1), `schedule`, `energy:E` (0 < E ≤ 1),
/// `asym1` (= `energy:0.97`), `asym2` (= `energy:0.8`), `entropy`. `Display` gives the canonical form
/// (`fixed:R`, `schedule`, `energy:E`, `entropy`), which parses back to the same policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankPolicy {
    /// The same r at every conv.
    Fixed(usize),
    /// The paper's schedule: r = min(2^step, 32), see [`schedule_rank`].
    Schedule,
    /// The smallest r keeping ≥ E of ‖X‖² (lightweight-SVD energy), the maximum over the batch.
    Energy(f64),
    /// r = ⌈2^μ⌉ from the exact spectrum's SVD-channel entropy μ, the maximum over the batch.
    Entropy,
}

impl RankPolicy {
    /// "Asym1" of the paper: keep ≥ 97 % of the energy.
    pub const ASYM1: RankPolicy = RankPolicy::Energy(0.97);
    /// "Asym2" of the paper: keep ≥ 80 % of the energy.
    pub const ASYM2: RankPolicy = RankPolicy::Energy(0.80);
}

/// The paper's schedule: r = 1 at the first conv (step 0), doubled at each further step (the next conv in
/// VGG, the next residual block in ResNet), at most 32.
pub fn schedule_rank(step: usize) -> usize {
    if step >= 5 {
        SCHEDULE_MAX_RANK
    } else {
        (1usize << step).min(SCHEDULE_MAX_RANK)
    }
}

impl fmt::Display for RankPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankPolicy::Fixed(r) => write!(f, "fixed:{r}"),
            RankPolicy::Schedule => write!(f, "schedule"),
            RankPolicy::Energy(e) => write!(f, "energy:{e}"),
            RankPolicy::Entropy => write!(f, "entropy"),
        }
    }
}

impl FromStr for RankPolicy {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, CoreError> {
        let t = s.trim().to_ascii_lowercase();
        let bad = |why: String| {
            CoreError::Invalid(format!(
                "rank policy {s:?}: {why} (expected fixed:R, schedule, energy:E, asym1, asym2 or entropy)"
            ))
        };
        match t.as_str() {
            "schedule" => return Ok(RankPolicy::Schedule),
            "entropy" => return Ok(RankPolicy::Entropy),
            "asym1" => return Ok(RankPolicy::ASYM1),
            "asym2" => return Ok(RankPolicy::ASYM2),
            _ => {}
        }
        let Some((kind, arg)) = t.split_once(':') else {
            return Err(bad("unknown policy".into()));
        };
        match kind {
            "fixed" => match arg.trim().parse::<usize>() {
                Ok(r) if r >= 1 => Ok(RankPolicy::Fixed(r)),
                Ok(_) => Err(bad("the rank must be at least 1".into())),
                Err(_) => Err(bad(format!("{arg:?} is not a whole number"))),
            },
            "energy" => match arg.trim().parse::<f64>() {
                Ok(e) if e > 0.0 && e <= 1.0 => Ok(RankPolicy::Energy(e)),
                Ok(_) => Err(bad("the energy fraction must be in (0, 1]".into())),
                Err(_) => Err(bad(format!("{arg:?} is not a number"))),
            },
            _ => Err(bad("unknown policy".into())),
        }
    }
}
