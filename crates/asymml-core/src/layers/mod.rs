//! Layers, each with `forward` and `backward` side by side. Shapes are in each method's doc comment; buffers
//! (cached activations, scratch) live in the layer and are reused across steps.
//!
//! Gradients of parameters are *accumulated* into `Param::grad` (as in PyTorch); call `zero_grad` between steps.

pub mod activation;
pub mod batchnorm;
pub mod conv;
pub mod dropout;
pub mod fused;
pub mod linear;
pub mod loss;
pub mod pool;
pub(crate) mod winograd;

pub use activation::Relu;
pub use batchnorm::{BatchNorm2d, ChannelMap};
pub use conv::{Conv2d, Conv2dConfig};
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

/// Σ f(a_i, b_i) over two equally long slices with 8 independent partial sums, so that the loop vectorises
/// instead of waiting on one serial chain of additions (the summation order differs from a serial sum).
#[inline(always)]
pub(crate) fn sum8_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += f(x[l], y[l]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Σ f(a_i) with 8 independent partial sums (see [`sum8_zip`]).
#[inline(always)]
pub(crate) fn sum8(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum8_zip(a, a, |x, _| f(x))
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
