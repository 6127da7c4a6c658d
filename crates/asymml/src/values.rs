//! Typed values of the command-line flags, parsed by clap where the flags are read: a bad value is an error
//! that names its flag (`invalid value 'x' for '--flag': reason`) before any work starts. (The module is
//! private: its types are public only so that they may appear in the public argument structs.)

use crate::data::{Augment, DatasetKind};
use asymml_core::decomp::RankPolicy;
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
                .map_err(|e| format!("{e} (use inproc, process, tcp://HOST:PORT or unix:PATH)")),
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

/// A rank policy as written on the command line: reports show the text (`asym1`), the split uses the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct RankArg {
    pub policy: RankPolicy,
    pub text: String,
}

impl FromStr for RankArg {
    type Err = asymml_core::CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(RankArg {
            policy: s.parse()?,
            text: s.trim().to_string(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(e.contains("use inproc, process"), "{e}");
        assert_eq!(
            parse_listen("127.0.0.1:0").unwrap().to_string(),
            "tcp://127.0.0.1:0"
        );
    }

    #[test]
    fn names_keep_their_text() {
        let r: RankArg = " asym1".parse().unwrap();
        assert_eq!((r.text.as_str(), r.policy), ("asym1", RankPolicy::ASYM1));
        assert!("vgg7".parse::<ModelName>().is_err());
        assert_eq!("VGG16".parse::<ModelName>().unwrap().as_str(), "VGG16");
    }
}
