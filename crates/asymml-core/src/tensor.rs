//! An owned, contiguous f32 tensor with its shape (NCHW for images, [B, F] for features).

use crate::error::{CoreError, Result};

/// Owned f32 tensor, row-major (the last dimension is contiguous).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// A tensor from data; errors if `data.len()` is not the product of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(CoreError::Shape(format!(
                "shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Resizes to `shape`, keeping the allocation when it is large enough. Contents are unspecified afterwards
    /// (callers overwrite them); use `zero()` when zeros are needed.
    pub fn resize(&mut self, shape: &[usize]) {
        if self.shape != shape {
            self.shape.clear();
            self.shape.extend_from_slice(shape);
            let n: usize = shape.iter().product();
            self.data.resize(n, 0.0);
        }
    }

    /// Resizes to `shape` and fills with zeros.
    pub fn resize_zero(&mut self, shape: &[usize]) {
        self.resize(shape);
        self.zero();
    }

    /// Sets every element to zero.
    pub fn zero(&mut self) {
        self.data.iter_mut().for_each(|v| *v = 0.0);
    }

    /// Copies shape and data from `other`, reusing this tensor's allocation.
    pub fn copy_from(&mut self, other: &Tensor) {
        self.resize(&other.shape);
        self.data.copy_from_slice(&other.data);
    }

    /// Dimension `i` of an NCHW tensor (panics on a lower rank: internal use with checked shapes).
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    /// (N, C, H, W) of a rank-4 tensor, or a shape error naming `what`.
    pub fn nchw(&self, what: &str) -> Result<(usize, usize, usize, usize)> {
        match self.shape.as_slice() {
            &[n, c, h, w] => Ok((n, c, h, w)),
            s => Err(CoreError::Shape(format!(
                "{what}: expected an NCHW tensor, got shape {s:?}"
            ))),
        }
    }

    /// True when every element is finite.
    pub fn all_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }
}
