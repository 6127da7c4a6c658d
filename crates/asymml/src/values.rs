//! Typed values of the command-line flags, parsed by clap where the flags are read: a bad value is an error
//! that names its flag (`invalid value 'x' for '--flag': reason`) before any work starts. (The module is
//! private: its types are public only so that they may appear in the public argument structs.)

use crate::data::{Augment, DatasetKind};
use asymml_core::decomp::{RankPolicy, SvdMethod};
use asymml_core::models::ModelSpec;
use asymml_core::optim::LrSchedule;
use asymml_protocol::Address;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// `--accelerator`: where the untrusted accelerator runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceleratorSpec {
    /// `inproc`: a thread of this process.
    InProc,
    /// `process`: a child process over a Unix socket.
    Process,
    /// `tcp://HOST:PORT` or `unix:PATH`: a server started with `asymml accelerator --listen`.
    Remote(Address),
}

impl FromStr for AcceleratorSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inproc" => Ok(AcceleratorSpec::InProc),
            "process" => Ok(AcceleratorSpec::Process),
            other => other
                .parse()
                .map(AcceleratorSpec::Remote)
                .map_err(|e| match e {
                    // The address parser's own hint names only the two address forms.
                    asymml_protocol::ProtocolError::Address { address, .. }
                        if !other.contains(':') =>
                    {
                        format!(
                            "{address:?}: expected inproc, process, tcp://HOST:PORT or unix:PATH"
                        )
                    }
                    e => e.to_string(),
                }),
        }
    }
}

impl fmt::Display for AcceleratorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcceleratorSpec::InProc => f.write_str("inproc"),
            AcceleratorSpec::Process => f.write_str("process"),
            AcceleratorSpec::Remote(addr) => addr.fmt(f),
        }
    }
}

/// `--listen`: `HOST:PORT` (TCP), `tcp://HOST:PORT` or `unix:PATH`.
pub(crate) fn parse_listen(s: &str) -> Result<Address, asymml_protocol::ProtocolError> {
    if s.contains("://") || s.starts_with("unix:") {
        s.parse()
    } else {
        format!("tcp://{s}").parse()
    }
}

/// `--svd`: a decomposition method (`light`, `light:I`, `block`, `block:Q[:P[:ROUTE]]`).
pub(crate) fn parse_svd_method(s: &str) -> Result<SvdMethod, String> {
    s.parse().map_err(|e: asymml_core::CoreError| e.to_string())
}

pub(crate) fn parse_basis(s: &str) -> Result<asymml_trusted::split::Basis, String> {
    s.parse()
}

/// The decomposition `--svd` and `--svd-iters` ask for: the block SVD unless `--svd light` is given or
/// `--svd-iters` (which counts the light method's rounds) is; `--svd-iters` with a block method is refused.
pub(crate) fn svd_method(
    svd: Option<SvdMethod>,
    iters: Option<usize>,
) -> Result<SvdMethod, String> {
    match (svd, iters) {
        (None, None) => Ok(SvdMethod::block()),
        (None | Some(SvdMethod::Light { .. }), Some(i)) => Ok(SvdMethod::light(i)),
        (Some(m), None) => Ok(m),
        (Some(SvdMethod::Block(_)), Some(_)) => Err(
            "--svd-iters counts the rounds of --svd light; the block SVD takes its power steps as block:Q"
                .into(),
        ),
    }
}

/// `--svd-iters`: lightweight-SVD iterations per component, 1 or 2.
pub(crate) fn parse_svd_iters(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=2) => Ok(n),
        _ => Err("must be 1 or 2".into()),
    }
}

/// `--noise`: a finite non-negative noise-to-signal ratio.
pub(crate) fn parse_noise(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("must be a non-negative number".into()),
    }
}

// ---- Limits of the numeric flags ----
//
// Every number on the command line is checked here, where clap reads it, against a range that is generous
// for real use and small enough that no value can make a command allocate without bound, spawn threads
// without bound or wait forever. The README's flag table states the same limits.

/// Largest `--input-size` in pixels (the largest input a model takes).
pub(crate) const MAX_INPUT_SIZE: usize = 4096;
/// Largest `--threads` / `--accelerator-threads` (a fixed ceiling, whatever the machine's cores).
pub(crate) const MAX_THREADS: usize = 1024;
/// Largest `--batch-size`.
pub(crate) const MAX_BATCH: usize = 65_536;
/// Largest `--epochs` (and `privacy --tradeoff-epochs`).
pub(crate) const MAX_EPOCHS: usize = 100_000;
/// Largest step counts: `bench --steps` / `--warmup`, `privacy --decoder-steps`.
pub(crate) const MAX_STEPS: usize = 1_000_000;
/// Largest image counts: `--limit-train`, `privacy --samples` / `--public` / `--tradeoff-train` /
/// `--mi-points`.
pub(crate) const MAX_IMAGES: usize = 10_000_000;
/// Largest `--channels` (verify, bench, infer).
pub(crate) const MAX_CHANNELS: usize = 64;
/// Largest `--classes` (verify, bench, infer).
pub(crate) const MAX_CLASSES: usize = 100_000;
/// `--accelerator-timeout`'s default (the flag's `default_value` says the same: 600 s).
pub(crate) const DEFAULT_ACCELERATOR_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(600);
/// Largest `--accelerator-timeout` in seconds (about 11.6 days).
pub(crate) const MAX_TIMEOUT_S: f64 = 1e6;
/// Largest batch of one layer's activations: batch × max(channels, first conv's width) × size² × 4 bytes,
/// checked before any batch is allocated ([`check_batch_bytes`]).
pub(crate) const MAX_BATCH_BYTES: u64 = 8 << 30;

/// A whole number in `lo..=hi`.
fn whole_in(s: &str, lo: usize, hi: usize) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from {lo} to {hi}")),
    }
}

/// `--input-size`: pixels per side, 1 to [`MAX_INPUT_SIZE`] (each model states its own minimum).
pub(crate) fn parse_input_size(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_INPUT_SIZE)
}

/// `--threads`, `--accelerator-threads`: 1 to [`MAX_THREADS`].
pub(crate) fn parse_threads(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_THREADS)
}

/// `--batch-size`: 1 to [`MAX_BATCH`].
pub(crate) fn parse_batch_size(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_BATCH)
}

/// `--epochs`: 1 to [`MAX_EPOCHS`].
pub(crate) fn parse_epochs(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_EPOCHS)
}

/// `bench --steps`, `privacy --decoder-steps`: 1 to [`MAX_STEPS`].
pub(crate) fn parse_steps(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_STEPS)
}

/// `bench --warmup`: 0 to [`MAX_STEPS`].
pub(crate) fn parse_warmup(s: &str) -> Result<usize, String> {
    whole_in(s, 0, MAX_STEPS)
}

/// `bench --repeat`: 1 to 1000 rounds.
pub(crate) fn parse_repeat(s: &str) -> Result<usize, String> {
    whole_in(s, 1, 1000)
}

/// An image count of at least one: 1 to [`MAX_IMAGES`].
pub(crate) fn parse_image_count(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_IMAGES)
}

/// An image count that may be zero: 0 to [`MAX_IMAGES`].
pub(crate) fn parse_image_count0(s: &str) -> Result<usize, String> {
    whole_in(s, 0, MAX_IMAGES)
}

/// `--channels`: 1 to [`MAX_CHANNELS`].
pub(crate) fn parse_channels(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_CHANNELS)
}

/// `--classes`: 2 to [`MAX_CLASSES`].
pub(crate) fn parse_classes(s: &str) -> Result<usize, String> {
    whole_in(s, 2, MAX_CLASSES)
}

/// A finite number for which `ok` holds; `rule` says which in the error.
fn finite_where(s: &str, ok: fn(f32) -> bool, rule: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(v) if v.is_finite() && ok(v) => Ok(v),
        _ => Err(format!("must be {rule}")),
    }
}

/// `--lr`: a finite positive learning rate.
pub(crate) fn parse_lr(s: &str) -> Result<f32, String> {
    finite_where(s, |v| v > 0.0, "a finite number above 0")
}

/// `--momentum`: in [0, 1).
pub(crate) fn parse_momentum(s: &str) -> Result<f32, String> {
    finite_where(
        s,
        |v| (0.0..1.0).contains(&v),
        "a number from 0 up to (not including) 1",
    )
}

/// `--weight-decay`: a finite non-negative number.
pub(crate) fn parse_weight_decay(s: &str) -> Result<f32, String> {
    finite_where(s, |v| v >= 0.0, "a finite number of at least 0")
}

/// `--accelerator-timeout`: seconds, finite, above 0 and at most [`MAX_TIMEOUT_S`].
pub(crate) fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= MAX_TIMEOUT_S => {
            Ok(std::time::Duration::from_secs_f64(v))
        }
        _ => Err(format!(
            "must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}"
        )),
    }
}

/// Refuses a batch whose largest activation — `batch` images of `channels` planes, or of the first conv's
/// `width` output channels, of `size`×`size` f32 values — would exceed [`MAX_BATCH_BYTES`], before anything
/// is allocated.
pub(crate) fn check_batch_bytes(
    batch: usize,
    channels: usize,
    width: usize,
    size: usize,
) -> anyhow::Result<()> {
    let planes = channels.max(width);
    let bytes = [batch, planes, size, size, 4]
        .iter()
        .try_fold(1u128, |acc, &n| acc.checked_mul(n as u128))
        .unwrap_or(u128::MAX);
    if bytes > u128::from(MAX_BATCH_BYTES) {
        anyhow::bail!(
            "a batch of {batch} images of {size}×{size} px needs {:.1} GiB per activation ({planes} channels), \
             above the limit of {} GiB: use a smaller --batch-size or --input-size",
            bytes as f64 / (1u64 << 30) as f64,
            MAX_BATCH_BYTES >> 30
        );
    }
    Ok(())
}

/// A model name (`vgg16`, `resnet18-cifar`, `vgg-small`, …), checked against the known models; the full spec
/// also needs the data's channels, classes and input size ([`ModelName::spec`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelName(String);

impl ModelName {
    /// The model as written on the command line.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The spec of this model for inputs of `in_ch` channels and `size` pixels, with `classes` outputs.
    pub(crate) fn spec(
        &self,
        in_ch: usize,
        classes: usize,
        size: usize,
    ) -> asymml_core::Result<ModelSpec> {
        ModelSpec::parse(&self.0, in_ch, classes, size)
    }
}

impl Default for ModelName {
    /// `vgg-small`, the model of the embedded Fashion-MNIST sample.
    fn default() -> Self {
        ModelName("vgg-small".into())
    }
}

impl FromStr for ModelName {
    type Err = asymml_core::CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only the name decides whether the model is known: 3 channels, 10 classes and 224 px fit every
        // architecture.
        ModelSpec::parse(s, 3, 10, 224)?;
        Ok(ModelName(s.to_string()))
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The rank policy `train`, `infer`, `verify` and `bench` use without `--rank`: the guard (see
/// [`GUARD_SIDE`]), chosen from the privacy measurements in docs/security.md
/// ("The default, and why").
pub(crate) const DEFAULT_RANK: &str = "guard";

/// `guard`'s default: convs whose input map is at least this fraction of the network input's side run wholly
/// in the trusted runtime.
pub(crate) const GUARD_SIDE: f32 = 0.125;

/// A rank policy as written on the command line: reports show the text (`asym1`), the split uses the policy.
/// `table:FILE` reads a rank table (one route per conv, e.g. from `asymml privacy --calibrate`); its policy is
/// then `schedule`, used by no conv once the table is checked to cover the model
/// ([`RankArg::check_covers`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RankArg {
    pub policy: RankPolicy,
    pub text: String,
    /// The rank table of `table:FILE`.
    pub table: Option<std::sync::Arc<asymml_core::decomp::RankTable>>,
    /// `guard` / `guard:F`: convs whose input map is at least F × the network input's side run wholly in the
    /// trusted runtime, the others by `policy` (`asym1`).
    pub guard: Option<f32>,
}

impl FromStr for RankArg {
    type Err = asymml_core::CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim().to_string();
        if let Some(file) = text.strip_prefix("table:") {
            if file.is_empty() {
                return Err(asymml_core::CoreError::Invalid(
                    "table:FILE needs a file (a rank table JSON, e.g. from `asymml privacy --calibrate`)"
                        .into(),
                ));
            }
            let table = asymml_core::decomp::RankTable::load(std::path::Path::new(file))?;
            return Ok(RankArg {
                policy: RankPolicy::Schedule,
                text,
                table: Some(std::sync::Arc::new(table)),
                guard: None,
            });
        }
        let lower = text.to_ascii_lowercase();
        if lower == "guard" || lower.starts_with("guard:") {
            let f = match lower.strip_prefix("guard:") {
                None => GUARD_SIDE,
                Some(v) => match v.trim().parse::<f32>() {
                    Ok(f) if f > 0.0 && f <= 1.0 => f,
                    _ => {
                        return Err(asymml_core::CoreError::Invalid(format!(
                            "rank policy {text:?}: guard:F needs a fraction F in (0, 1] of the input's side"
                        )))
                    }
                },
            };
            return Ok(RankArg {
                policy: RankPolicy::ASYM1,
                text,
                table: None,
                guard: Some(f),
            });
        }
        let policy = text.parse::<RankPolicy>().map_err(|e| {
            asymml_core::CoreError::Invalid(e.to_string().replace(
                "(expected fixed:R,",
                "(expected guard, guard:F, table:FILE, fixed:R,",
            ))
        })?;
        Ok(RankArg {
            policy,
            text,
            table: None,
            guard: None,
        })
    }
}

impl RankArg {
    /// A named policy (no table).
    pub(crate) fn named(policy: RankPolicy) -> RankArg {
        RankArg {
            policy,
            text: policy.to_string(),
            table: None,
            guard: None,
        }
    }

    /// Sets the split's rank policy, table and guard from this argument.
    pub(crate) fn apply(&self, cfg: &mut asymml_trusted::split::SplitConfig) {
        cfg.policy = self.policy;
        cfg.table = self.table.clone();
        cfg.guard = self.guard;
    }

    /// With a table: every conv of `convs` (names) is listed and every entry names one of them.
    pub(crate) fn check_covers<'a>(
        &self,
        convs: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        match &self.table {
            Some(t) => t
                .check_covers(convs)
                .map_err(|e| format!("--rank {}: {e}", self.text)),
            None => Ok(()),
        }
    }
}

impl fmt::Display for RankArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `--optimizer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerChoice {
    Sgd,
    Adamw,
}

/// `--schedule`: the learning rate over the epochs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// `constant`.
    Constant,
    /// `cosine`: cosine annealing to 0 over the whole run.
    Cosine,
    /// `step:EPOCHS:GAMMA`: multiply by `gamma` every `epochs` epochs.
    Step { epochs: u64, gamma: f32 },
}

impl Schedule {
    /// The per-step schedule of a run of `epochs` epochs of `steps_per_epoch` steps.
    pub(crate) fn per_step(self, steps_per_epoch: u64, epochs: usize) -> LrSchedule {
        match self {
            Schedule::Constant => LrSchedule::Constant,
            Schedule::Cosine => LrSchedule::Cosine {
                total: steps_per_epoch * epochs as u64,
                min_lr: 0.0,
            },
            Schedule::Step { epochs, gamma } => LrSchedule::Step {
                every: epochs * steps_per_epoch,
                gamma,
            },
        }
    }
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["constant"] => Ok(Schedule::Constant),
            ["cosine"] => Ok(Schedule::Cosine),
            ["step", e, g] => {
                let epochs: u64 = e
                    .parse()
                    .map_err(|_| "step schedule: EPOCHS must be a whole number")?;
                let gamma: f32 = g
                    .parse()
                    .map_err(|_| "step schedule: GAMMA must be a number")?;
                if epochs == 0 || !(gamma.is_finite() && gamma > 0.0) {
                    return Err("step schedule: EPOCHS must be ≥ 1 and GAMMA positive".into());
                }
                Ok(Schedule::Step { epochs, gamma })
            }
            _ => Err(format!(
                "unknown schedule '{s}': use constant, cosine or step:EPOCHS:GAMMA"
            )),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Constant => f.write_str("constant"),
            Schedule::Cosine => f.write_str("cosine"),
            Schedule::Step { epochs, gamma } => write!(f, "step:{epochs}:{gamma}"),
        }
    }
}

/// `--augment`: the training augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AugmentChoice {
    None,
    Crop,
    Flip,
    #[value(name = "crop+flip", alias = "flip+crop")]
    #[serde(rename = "crop+flip", alias = "flip+crop")]
    CropFlip,
}

impl AugmentChoice {
    /// The default for a dataset: crop+flip for CIFAR-10 and folders, none for MNIST-style data.
    pub(crate) fn default_for(kind: DatasetKind) -> Self {
        match kind {
            DatasetKind::Cifar10 | DatasetKind::Folder => AugmentChoice::CropFlip,
            DatasetKind::Mnist | DatasetKind::FashionMnist => AugmentChoice::None,
        }
    }

    /// The augmentation of `size`-pixel images (crops pad by `size / 8`, at least 1 px).
    pub(crate) fn augment(self, size: usize) -> Option<Augment> {
        let pad = (size / 8).max(1);
        match self {
            AugmentChoice::None => None,
            AugmentChoice::Crop => Some(Augment { pad, hflip: false }),
            AugmentChoice::Flip => Some(Augment {
                pad: 0,
                hflip: true,
            }),
            AugmentChoice::CropFlip => Some(Augment { pad, hflip: true }),
        }
    }
}

/// `bench --phase`: what one timed step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    /// A forward pass in evaluation mode.
    Infer,
    /// Forward, loss, backward and the optimizer step.
    Train,
}

impl Phase {
    /// The name in reports: `infer` or `train`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Infer => "infer",
            Phase::Train => "train",
        }
    }
}

/// Serde as text: a value written with `Display` and read back with `FromStr` (`#[serde(with = "as_text")]`),
/// so that stored settings stay the strings given on the command line.
pub(crate) mod as_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub(crate) fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(crate) fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// `--max-session-bytes`: a byte count, plain or with a K, M, G or T suffix (powers of 1024; a trailing `B`
/// or `iB` is allowed: `8G`, `512MiB`, `1048576`), above 0.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?}: expected a size in bytes above 0, e.g. 1048576, 512M or 8G");
    let t = s.trim().to_ascii_uppercase();
    let t = t
        .strip_suffix("IB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(&t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K')) => (&t[..i], 10),
        Some((i, 'M')) => (&t[..i], 20),
        Some((i, 'G')) => (&t[..i], 30),
        Some((i, 'T')) => (&t[..i], 40),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match n.checked_mul(1 << shift) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(bad()),
    }
}

impl std::fmt::Display for RouteChoice {
    /// The flag's value: `auto`, `auto-wall` or `split`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteChoice::Auto => "auto",
            RouteChoice::AutoWall => "auto-wall",
            RouteChoice::Split => "split",
        })
    }
}

/// `--route`: where a conv the rank policy would split runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteChoice {
    /// Measured per conv: the split or the whole conv in the trusted runtime, whichever costs it less.
    Auto,
    /// As `auto`, but a conv's cost also counts the time the trusted runtime waits for the accelerator: the
    /// route of the shorter step.
    AutoWall,
    /// Always as the rank policy says.
    Split,
}

/// A switch: `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    pub fn is_on(self) -> bool {
        self == OnOff::On
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_svd_is_the_default_and_svd_iters_means_the_light_one() {
        let light = |i| Ok(SvdMethod::light(i));
        assert_eq!(svd_method(None, None), Ok(SvdMethod::block()));
        assert_eq!(svd_method(None, Some(2)), light(2));
        assert_eq!(svd_method(Some(SvdMethod::light(1)), Some(2)), light(2));
        assert_eq!(svd_method(Some(SvdMethod::light(2)), None), light(2));
        let b: SvdMethod = "block:2".parse().unwrap();
        assert_eq!(svd_method(Some(b), None), Ok(b));
        assert!(svd_method(Some(b), Some(1))
            .unwrap_err()
            .contains("--svd light"));
        assert!(parse_svd_method("lite")
            .unwrap_err()
            .contains("unknown method"));
    }

    #[test]
    fn schedules_parse_and_print_back() {
        for s in ["constant", "cosine", "step:3:0.5"] {
            assert_eq!(s.parse::<Schedule>().unwrap().to_string(), s);
        }
        assert!("linear"
            .parse::<Schedule>()
            .unwrap_err()
            .contains("unknown schedule"));
        assert!("step:0:0.5".parse::<Schedule>().is_err());
        assert!("step:2:-1".parse::<Schedule>().is_err());
        assert_eq!(
            "step:2:0.1".parse::<Schedule>().unwrap().per_step(10, 5),
            LrSchedule::Step {
                every: 20,
                gamma: 0.1
            }
        );
    }

    #[test]
    fn accelerator_specs() {
        assert_eq!("inproc".parse(), Ok(AcceleratorSpec::InProc));
        assert_eq!("process".parse(), Ok(AcceleratorSpec::Process));
        let remote: AcceleratorSpec = "tcp://127.0.0.1:7000".parse().unwrap();
        assert_eq!(remote.to_string(), "tcp://127.0.0.1:7000");
        let e = "gpu".parse::<AcceleratorSpec>().unwrap_err();
        assert!(e.contains("expected inproc, process"), "{e}");
        assert_eq!(
            parse_listen("127.0.0.1:0").unwrap().to_string(),
            "tcp://127.0.0.1:0"
        );
    }

    #[test]
    fn numbers_are_checked_at_the_edge() {
        assert_eq!(parse_input_size("28"), Ok(28));
        for bad in ["0", "4097", "100000", "-1", "x", ""] {
            assert!(parse_input_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_threads("1024"), Ok(1024));
        assert!(parse_threads("100000").unwrap_err().contains("1 to 1024"));
        assert!(parse_threads("0").is_err());
        assert!(parse_batch_size("0").is_err() && parse_batch_size("65537").is_err());
        assert!(parse_epochs("0").is_err() && parse_epochs("100001").is_err());
        assert_eq!(parse_warmup("0"), Ok(0));
        assert!(parse_steps("0").is_err());
        assert!(parse_repeat("0").is_err() && parse_repeat("1001").is_err());
        assert_eq!(parse_repeat("3"), Ok(3));
        assert!(parse_classes("1").is_err() && parse_channels("65").is_err());
        assert_eq!(parse_momentum("0"), Ok(0.0));
        assert_eq!(parse_momentum("0.9"), Ok(0.9));
        for bad in ["nan", "NaN", "1", "1.5", "-0.1", "inf"] {
            assert!(parse_momentum(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_lr("1e30"), Ok(1e30));
        for bad in ["0", "-1", "nan", "inf", "1e39"] {
            assert!(parse_lr(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_weight_decay("0"), Ok(0.0));
        assert!(parse_weight_decay("-1e-4").is_err() && parse_weight_decay("nan").is_err());
    }

    #[test]
    fn timeouts_are_finite_and_positive() {
        assert_eq!(
            parse_timeout("600"),
            Ok(DEFAULT_ACCELERATOR_TIMEOUT),
            "the flag's default"
        );
        assert_eq!(
            parse_timeout("0.25"),
            Ok(std::time::Duration::from_millis(250))
        );
        for bad in ["0", "-1", "nan", "inf", "1e7", "x"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn batch_memory_is_bounded() {
        // vgg16 at 224 px, batch 64: 64 × 64 × 224² × 4 B = 0.8 GiB.
        assert!(check_batch_bytes(64, 3, 64, 224).is_ok());
        // 4096 px, batch 64: 256 GiB for the first conv's output.
        let e = check_batch_bytes(64, 3, 64, 4096).unwrap_err().to_string();
        assert!(e.contains("above the limit of 8 GiB"), "{e}");
        // No overflow on absurd values.
        assert!(check_batch_bytes(usize::MAX, usize::MAX, 1, usize::MAX).is_err());
    }

    #[test]
    fn the_guard_parses_with_its_fraction() {
        let g: RankArg = "guard".parse().unwrap();
        assert_eq!((g.guard, g.policy), (Some(GUARD_SIDE), RankPolicy::ASYM1));
        let g: RankArg = "guard:0.5".parse().unwrap();
        assert_eq!((g.guard, g.text.as_str()), (Some(0.5), "guard:0.5"));
        assert_eq!(
            DEFAULT_RANK.parse::<RankArg>().unwrap().guard,
            Some(GUARD_SIDE)
        );
        for bad in ["guard:0", "guard:1.5", "guard:x", "guard:"] {
            let e = bad.parse::<RankArg>().unwrap_err().to_string();
            assert!(e.contains("guard:F needs a fraction"), "{bad}: {e}");
        }
        let e = "sched".parse::<RankArg>().unwrap_err().to_string();
        assert!(
            e.contains("expected guard, guard:F, table:FILE, fixed:R"),
            "{e}"
        );
        assert!("schedule".parse::<RankArg>().unwrap().guard.is_none());
    }

    #[test]
    fn rank_tables_parse_and_check_the_model() {
        let path =
            std::env::temp_dir().join(format!("asymml-rank-table-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"model":"m","layers":[{"conv":"a","rank":"trusted"},{"conv":"b","rank":4}]}"#,
        )
        .unwrap();
        let r: RankArg = format!("table:{}", path.display()).parse().unwrap();
        let t = r.table.as_ref().expect("a table");
        assert_eq!(t.layers.len(), 2);
        assert!(r.check_covers(["a", "b"]).is_ok());
        let err = r.check_covers(["a", "c"]).unwrap_err();
        assert!(
            err.contains("missing convs [\"c\"]") && err.contains("unknown convs [\"b\"]"),
            "{err}"
        );
        std::fs::write(&path, r#"{"layers":[{"conv":"a","rank":0}]}"#).unwrap();
        assert!(format!("table:{}", path.display())
            .parse::<RankArg>()
            .is_err());
        std::fs::remove_file(&path).ok();
        assert!("table:".parse::<RankArg>().is_err());
        assert!("table:/nonexistent/t.json".parse::<RankArg>().is_err());
        let named: RankArg = "asym2".parse().unwrap();
        assert!(named.table.is_none() && named.check_covers(["x"]).is_ok());
    }

    #[test]
    fn names_keep_their_text() {
        let r: RankArg = " asym1".parse().unwrap();
        assert_eq!((r.text.as_str(), r.policy), ("asym1", RankPolicy::ASYM1));
        assert!("vgg7".parse::<ModelName>().is_err());
        assert_eq!("VGG16".parse::<ModelName>().unwrap().as_str(), "VGG16");
    }
}
