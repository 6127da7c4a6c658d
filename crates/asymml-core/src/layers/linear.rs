//! Fully connected layer.

use super::{threads, Param};
use crate::error::{CoreError, Result};
use crate::gemm::{sgemm, Mat};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Linear: weight [O, I], bias [O]; y = x Wᵀ + b.
pub struct Linear {
    pub in_f: usize,
    pub out_f: usize,
    pub weight: Param,
    pub bias: Param,
}

impl Linear {
    /// PyTorch's default initialisation: W and b uniform in ±1/√I.
    pub fn new(in_f: usize, out_f: usize, rng: &mut Rng) -> Self {
        let bound = 1.0 / (in_f as f32).sqrt();
        let mut u = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                .collect()
        };
        let w = u(out_f * in_f);
        let b = u(out_f);
        Linear {
            in_f,
            out_f,
            weight: Param::new(Tensor {
                shape: vec![out_f, in_f],
                data: w,
            }),
            bias: Param::new(Tensor {
                shape: vec![out_f],
                data: b,
            }),
        }
    }

    fn batch(&self, x: &Tensor) -> Result<usize> {
        let b = x.shape.first().copied().unwrap_or(0);
        if x.shape.len() != 2 || x.shape[1] != self.in_f {
            return Err(CoreError::Shape(format!(
                "linear: expected input [B, {}], got {:?}",
                self.in_f, x.shape
            )));
        }
        Ok(b)
    }

    /// x: [B, I] → y: [B, O].
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        let b = self.batch(x)?;
        y.resize(&[b, self.out_f]);
        for row in y.data.chunks_mut(self.out_f) {
            row.copy_from_slice(&self.bias.value.data);
        }
        let (i, o) = (self.in_f, self.out_f);
        sgemm(
            b,
            o,
            i,
            Mat::rm(&x.data, i),
            Mat::rm_t(&self.weight.value.data, i),
            &mut y.data,
            true,
            threads(),
        );
        Ok(())
    }

    /// x: [B, I], dy: [B, O] → dx: [B, I] (if asked); accumulates ∇W = dyᵀx and ∇b = Σ dy.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>) -> Result<()> {
        let b = self.batch(x)?;
        let (i, o) = (self.in_f, self.out_f);
        if dy.shape != [b, o] {
            return Err(CoreError::Shape(format!(
                "linear backward: ∇Y {:?}, expected [{b}, {o}]",
                dy.shape
            )));
        }
        let t = threads();
        sgemm(
            o,
            i,
            b,
            Mat::rm_t(&dy.data, o),
            Mat::rm(&x.data, i),
            &mut self.weight.grad.data,
            true,
            t,
        );
        for row in dy.data.chunks(o) {
            self.bias
                .grad
                .data
                .iter_mut()
                .zip(row)
                .for_each(|(g, v)| *g += v);
        }
        if let Some(dx) = dx {
            dx.resize(&[b, i]);
            sgemm(
                b,
                i,
                o,
                Mat::rm(&dy.data, o),
                Mat::rm(&self.weight.value.data, i),
                &mut dx.data,
                false,
                t,
            );
        }
        Ok(())
    }
}
