//! Networks as explicit lists of layers (no autograd): VGG and ResNet in CIFAR and ImageNet styles, and
//! `vgg-small`. Parameter names follow torchvision (`features.0.weight`, `layer1.0.conv1.weight`, …).
//!
//! Convolutions run through a [`ConvExec`], so that the same network can compute its convolutions locally
//! (`trusted-only`) or split them across the trust boundary.

mod net;
mod resnet;
mod spec;
mod vgg;

pub use net::{
    ConvExec, Layer, LocalExec, Net, Node, ParamVisitor, StateMut, StateRef, StateVisitor,
    StreamPart,
};
pub use resnet::BasicBlock;
pub use spec::{Arch, ModelSpec, Style};
