//! Model specifications: which architecture, which style, how many channels and classes, which input size.

use super::net::{Layer, Net, Node};
use super::resnet::BasicBlock;
use super::vgg;
use crate::error::{CoreError, Result};
use crate::layers::{AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Linear, MaxPool2d};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// Network family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// VGG11/13/16/19 with BatchNorm.
    Vgg(u32),
    /// ResNet18/34 (BasicBlock).
    ResNet(u32),
    /// A small VGG-style net for 28×28 grey images.
    VggSmall,
}

/// CIFAR style (3×3 stem, no stem pooling, classifier on the final features; inputs up to 64 px) or
/// torchvision's ImageNet style (7×7 stride-2 stem with max pooling for ResNet, 7×7 average pool and a
/// 3-layer classifier for VGG; 224 px).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Style {
    Cifar,
    ImageNet,
}

/// A complete model description; `build` makes the network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub style: Style,
    pub in_ch: usize,
    pub classes: usize,
    pub input_size: usize,
    /// Base width (64 in the papers); smaller values give narrow nets for tests.
    pub width: usize,
}

/// The model names `parse` accepts.
pub const MODEL_NAMES: &str = "vgg-small, vgg11, vgg13, vgg16, vgg19, resnet18, resnet34 (optionally with a -cifar or -imagenet suffix)";

impl ModelSpec {
    /// Parses a model name (`vgg16`, `resnet18-cifar`, `vgg-small`, …). Without a suffix the style follows
    /// the input size: CIFAR up to 64 px, ImageNet above.
    pub fn parse(name: &str, in_ch: usize, classes: usize, input_size: usize) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        let (base, style) = if let Some(b) = lower.strip_suffix("-cifar") {
            (b, Some(Style::Cifar))
        } else if let Some(b) = lower.strip_suffix("-imagenet") {
            (b, Some(Style::ImageNet))
        } else {
            (lower.as_str(), None)
        };
        let arch = match base {
            "vgg-small" | "vgg_small" | "vggsmall" => Arch::VggSmall,
            _ => {
                let num = |p: &str| base.strip_prefix(p).and_then(|d| d.parse::<u32>().ok());
                match (num("vgg"), num("resnet")) {
                    (Some(d @ (11 | 13 | 16 | 19)), _) => Arch::Vgg(d),
                    (_, Some(d @ (18 | 34))) => Arch::ResNet(d),
                    _ => {
                        return Err(CoreError::Model(format!(
                            "unknown model '{name}'; known models: {MODEL_NAMES}"
                        )))
                    }
                }
            }
        };
        let style = style.unwrap_or(if input_size <= 64 {
            Style::Cifar
        } else {
            Style::ImageNet
        });
        let spec = ModelSpec {
            arch,
            style,
            in_ch,
            classes,
            input_size,
            width: 64,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The canonical name (`vgg16-cifar`, `resnet18-imagenet`, `vgg-small`).
    pub fn name(&self) -> String {
        let style = match self.style {
            Style::Cifar => "cifar",
            Style::ImageNet => "imagenet",
        };
        match self.arch {
            Arch::Vgg(d) => format!("vgg{d}-{style}"),
            Arch::ResNet(d) => format!("resnet{d}-{style}"),
            Arch::VggSmall => "vgg-small".into(),
        }
    }

    /// Checks that channels, classes and the input size fit the architecture.
    pub fn validate(&self) -> Result<()> {
        if self.in_ch == 0 || self.classes < 2 || self.width == 0 {
            return Err(CoreError::Model(format!(
                "{}: needs at least 1 input channel and 2 classes (got {} and {})",
                self.name(),
                self.in_ch,
                self.classes
            )));
        }
        let min = match (self.arch, self.style) {
            (Arch::Vgg(_), _) => 32,  // five 2×2 poolings
            (Arch::VggSmall, _) => 8, // three 2×2 poolings
            (Arch::ResNet(_), Style::Cifar) => 8,
            (Arch::ResNet(_), Style::ImageNet) => 32,
        };
        if self.input_size < min {
            return Err(CoreError::Model(format!(
                "{} needs an input size of at least {min} px, got {}",
                self.name(),
                self.input_size
            )));
        }
        if self.input_size > 4096 {
            return Err(CoreError::Model(format!(
                "input size {} is too large",
                self.input_size
            )));
        }
        Ok(())
    }

    /// Builds the network with seeded random weights.
    pub fn build(&self, seed: u64) -> Result<Net> {
        self.validate()?;
        let mut rng = Rng::new(seed);
        let nodes = match self.arch {
            Arch::Vgg(d) => {
                let cfg = vgg::config(d).ok_or_else(|| CoreError::Model(format!("no VGG{d}")))?;
                vgg::vgg(
                    cfg,
                    self.style,
                    self.in_ch,
                    self.classes,
                    self.width,
                    &mut rng,
                )
            }
            Arch::VggSmall => vgg::vgg_small(self.in_ch, self.classes, self.input_size, &mut rng),
            Arch::ResNet(d) => self.resnet(d, &mut rng)?,
        };
        Ok(Net::new(self.clone(), nodes, seed))
    }

    fn resnet(&self, depth: u32, rng: &mut Rng) -> Result<Vec<Node>> {
        let blocks: [usize; 4] = match depth {
            18 => [2, 2, 2, 2],
            34 => [3, 4, 6, 3],
            _ => return Err(CoreError::Model(format!("no ResNet{depth}"))),
        };
        let w = self.width;
        let node = |name: &str, layer| Node {
            name: name.to_string(),
            layer,
        };
        let mut nodes = Vec::new();
        match self.style {
            Style::Cifar => {
                nodes.push(node(
                    "conv1",
                    Layer::Conv(Conv2d::new(
                        self.in_ch,
                        w,
                        3,
                        Conv2dConfig {
                            stride: 1,
                            padding: 1,
                            bias: false,
                        },
                        rng,
                    )),
                ));
                // bn1 with the stem's ReLU fused
                let bn1 = BatchNorm2d::new(w).with_relu(true);
                nodes.push(node("bn1", Layer::BatchNorm(bn1)));
            }
            Style::ImageNet => {
                nodes.push(node(
                    "conv1",
                    Layer::Conv(Conv2d::new(
                        self.in_ch,
                        w,
                        7,
                        Conv2dConfig {
                            stride: 2,
                            padding: 3,
                            bias: false,
                        },
                        rng,
                    )),
                ));
                nodes.push(node("bn1", Layer::BatchNorm(BatchNorm2d::new(w))));
                nodes.push(node(
                    "maxpool",
                    Layer::MaxPool(MaxPool2d::new(3, 2, 1, true)),
                ));
            }
        }
        let mut c = w;
        for (li, &n) in blocks.iter().enumerate() {
            let out = w << li;
            for bi in 0..n {
                let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                let blk = BasicBlock::new(c, out, stride, rng);
                nodes.push(node(
                    &format!("layer{}.{bi}", li + 1),
                    Layer::Block(Box::new(blk)),
                ));
                c = out;
            }
        }
        nodes.push(node(
            "avgpool",
            Layer::AdaptiveAvgPool(AdaptiveAvgPool2d { out: 1 }),
        ));
        nodes.push(node("flatten", Layer::Flatten));
        nodes.push(node("fc", Layer::Linear(Linear::new(c, self.classes, rng))));
        Ok(nodes)
    }
}
