//! VGG with BatchNorm (torchvision `vgg*_bn` names) and `vgg-small`.

use super::net::{Layer, Node};
use super::spec::Style;
use crate::layers::{
    AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Dropout, Linear, MaxPool2d, Relu,
};
use crate::rng::Rng;

/// torchvision's VGG configurations: channel counts, 0 for a 2×2 max pool.
pub fn config(depth: u32) -> Option<&'static [usize]> {
    const M: usize = 0;
    Some(match depth {
        11 => &[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
        13 => &[
            64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M,
        ],
        16 => &[
            64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M,
        ],
        19 => &[
            64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512,
            512, M,
        ],
        _ => return None,
    })
}

/// `features.*`: conv3×3(+bias) → BN → ReLU per entry, the ReLU fused into the BN; before a pool entry the
/// ReLU is fused into the pool instead (ReLU+MaxPool). torchvision's indices are kept: conv i, bn i+1,
/// relu i+2, pool i+3.
/// Widths are scaled by `width / 64`. Returns the nodes and the output channel count.
pub fn features(cfg: &[usize], in_ch: usize, width: usize, rng: &mut Rng) -> (Vec<Node>, usize) {
    let mut nodes: Vec<Node> = Vec::new();
    let mut c = in_ch;
    let mut idx = 0;
    for (ci, &v) in cfg.iter().enumerate() {
        if v == 0 {
            // Fuse with the ReLU just pushed: replace it by a ReLU+MaxPool node named after the pool.
            let fused = matches!(nodes.last().map(|n| &n.layer), Some(Layer::Relu(_)));
            if fused {
                nodes.pop();
            }
            nodes.push(Node {
                name: format!("features.{idx}"),
                layer: Layer::MaxPool(MaxPool2d::new(2, 2, 0, fused)),
            });
            idx += 1;
        } else {
            let out = (v * width / 64).max(1);
            nodes.push(Node {
                name: format!("features.{idx}"),
                layer: Layer::Conv(Conv2d::new(
                    c,
                    out,
                    3,
                    Conv2dConfig {
                        stride: 1,
                        padding: 1,
                        bias: true,
                    },
                    rng,
                )),
            });
            // features.{idx + 2}, the ReLU, is fused into the BN (or, before a pool, into the pool)
            let before_pool = cfg.get(ci + 1) == Some(&0);
            nodes.push(Node {
                name: format!("features.{}", idx + 1),
                layer: Layer::BatchNorm(BatchNorm2d::new(out).with_relu(!before_pool)),
            });
            if before_pool {
                nodes.push(Node {
                    name: format!("features.{}", idx + 2),
                    layer: Layer::Relu(Relu),
                });
            }
            idx += 3;
            c = out;
        }
    }
    (nodes, c)
}

/// A VGG in the given style. CIFAR: features, `avgpool` (adaptive, 1×1), flatten, `classifier` Linear(C, K).
/// ImageNet: features, `avgpool` (adaptive, 7×7), flatten, `classifier.0/3/6` Linear layers with ReLU and
/// dropout (hidden width 4096·width/64), as torchvision.
pub fn vgg(
    cfg: &[usize],
    style: Style,
    in_ch: usize,
    classes: usize,
    width: usize,
    rng: &mut Rng,
) -> Vec<Node> {
    let (mut nodes, c) = features(cfg, in_ch, width, rng);
    let node = |name: &str, layer| Node {
        name: name.to_string(),
        layer,
    };
    match style {
        Style::Cifar => {
            nodes.push(node(
                "avgpool",
                Layer::AdaptiveAvgPool(AdaptiveAvgPool2d { out: 1 }),
            ));
            nodes.push(node("flatten", Layer::Flatten));
            nodes.push(node(
                "classifier",
                Layer::Linear(Linear::new(c, classes, rng)),
            ));
        }
        Style::ImageNet => {
            let hidden = (4096 * width / 64).max(1);
            nodes.push(node(
                "avgpool",
                Layer::AdaptiveAvgPool(AdaptiveAvgPool2d { out: 7 }),
            ));
            nodes.push(node("flatten", Layer::Flatten));
            nodes.push(node(
                "classifier.0",
                Layer::Linear(Linear::new(c * 49, hidden, rng)),
            ));
            nodes.push(node("classifier.1", Layer::Relu(Relu)));
            nodes.push(node("classifier.2", Layer::Dropout(Dropout::new(0.5))));
            nodes.push(node(
                "classifier.3",
                Layer::Linear(Linear::new(hidden, hidden, rng)),
            ));
            nodes.push(node("classifier.4", Layer::Relu(Relu)));
            nodes.push(node("classifier.5", Layer::Dropout(Dropout::new(0.5))));
            nodes.push(node(
                "classifier.6",
                Layer::Linear(Linear::new(hidden, classes, rng)),
            ));
        }
    }
    nodes
}

/// `vgg-small` for 28×28 grey images: three conv3×3–BN–ReLU–MaxPool stages (32, 64, 64 channels), then
/// `classifier.0` Linear(64·(S/8)², 128), ReLU, `classifier.2` Linear(128, K). About 0.2 M parameters.
pub fn vgg_small(in_ch: usize, classes: usize, input_size: usize, rng: &mut Rng) -> Vec<Node> {
    const M: usize = 0;
    let (mut nodes, c) = features(&[32, M, 64, M, 64, M], in_ch, 64, rng);
    let s = input_size / 8;
    let node = |name: &str, layer| Node {
        name: name.to_string(),
        layer,
    };
    nodes.push(node("flatten", Layer::Flatten));
    nodes.push(node(
        "classifier.0",
        Layer::Linear(Linear::new(c * s * s, 128, rng)),
    ));
    nodes.push(node("classifier.1", Layer::Relu(Relu)));
    nodes.push(node(
        "classifier.2",
        Layer::Linear(Linear::new(128, classes, rng)),
    ));
    nodes
}
