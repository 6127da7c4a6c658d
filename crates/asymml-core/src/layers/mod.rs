//! Layers, each with `forward` and `backward` side by side. Shapes are in each method's doc comment; buffers
//! (cached activations, scratch) live in the layer and are reused across steps.
//!
//! Gradients of parameters are *accumulated* into `Param::grad` (as in PyTorch); call `zero_grad` between steps.

pub mod activation;
pub mod batchnorm;
pub mod conv;
pub mod dropout;
pub mod linear;
pub mod loss;
pub mod pool;
mod winograd;

pub use activation::Relu;
pub use batchnorm::BatchNorm2d;
pub use conv::Conv2d;
pub use dropout::Dropout;
pub use linear::Linear;
pub use loss::SoftmaxCrossEntropy;
pub use pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};

use crate::tensor::Tensor;

/// A trainable parameter and its gradient (same shape).
#[derive(Clone, Debug, Default)]
pub struct Param {
    pub value: Tensor,
    pub grad: Tensor,
}

impl Param {
    /// A parameter holding `value`, with a zero gradient.
    pub fn new(value: Tensor) -> Self {
        let grad = Tensor::zeros(&value.shape);
        Param { value, grad }
    }
    /// Sets the gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.zero();
    }
}

/// Number of threads of the current rayon pool.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Output size of a window of `k` with `stride` and `pad` over `n` inputs (floor mode), or `None` if empty.
pub fn out_size(n: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    let padded = n + 2 * pad;
    if padded < k || stride == 0 {
        None
    } else {
        Some((padded - k) / stride + 1)
    }
}
