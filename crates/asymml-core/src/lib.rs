//! asymml-core: tensors, CPU kernels, layers (forward and backward side by side), optimizers, learning-rate
//! schedules, the VGG/ResNet model specs and safetensors weight files with torchvision's parameter names.
//!
//! Layers follow the llm.c style: an explicit struct per layer holding its parameters, gradients and cached
//! activations, `forward` and `backward` next to each other, buffers allocated once per shape and reused.
//! There is no general autograd.

#[macro_use]
mod simd;

pub mod chunks;
pub mod decomp;
pub mod dp;
pub mod error;
pub mod freivalds;
pub mod gemm;
pub mod layers;
pub mod models;
pub mod optim;
pub mod rng;
pub mod tensor;
pub mod weights;

pub use error::{error_chain, CoreError, Result};
pub use tensor::Tensor;
