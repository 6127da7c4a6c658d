//! ReLU.

use crate::tensor::Tensor;
use rayon::prelude::*;

const GRAIN: usize = 1 << 14;

/// ReLU, elementwise; keeps nothing but uses the output for backward.
#[derive(Default)]
pub struct Relu;

impl Relu {
    /// x: [*] → y: [*]; y = max(x, 0).
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor) {
        y.resize(&x.shape);
        y.data
            .par_chunks_mut(GRAIN)
            .zip(x.data.par_chunks(GRAIN))
            .for_each(|(yc, xc)| yc.iter_mut().zip(xc).for_each(|(o, &v)| *o = v.max(0.0)));
    }

    /// y: [*] (the forward output), dy: [*] → dx: [*]; dx = dy · [y > 0].
    pub fn backward(&mut self, y: &Tensor, dy: &Tensor, dx: &mut Tensor) {
        dx.resize(&y.shape);
        dx.data
            .par_chunks_mut(GRAIN)
            .zip(y.data.par_chunks(GRAIN).zip(dy.data.par_chunks(GRAIN)))
            .for_each(|(dc, (yc, gc))| {
                for ((d, &v), &g) in dc.iter_mut().zip(yc).zip(gc) {
                    *d = if v > 0.0 { g } else { 0.0 };
                }
            });
    }
}

/// Residual add with ReLU: out = max(a + b, 0), in place on `a`. a, b: [*].
pub fn add_relu_inplace(a: &mut Tensor, b: &Tensor) {
    a.data
        .par_chunks_mut(GRAIN)
        .zip(b.data.par_chunks(GRAIN))
        .for_each(|(ac, bc)| {
            ac.iter_mut()
                .zip(bc)
                .for_each(|(x, &y)| *x = (*x + y).max(0.0))
        });
}

/// In-place gradient of ReLU given its output: g = g · [y > 0]. y, g: [*].
pub fn relu_backward_inplace(y: &Tensor, g: &mut Tensor) {
    g.data
        .par_chunks_mut(GRAIN)
        .zip(y.data.par_chunks(GRAIN))
        .for_each(|(gc, yc)| {
            gc.iter_mut().zip(yc).for_each(|(d, &v)| {
                if v <= 0.0 {
                    *d = 0.0
                }
            })
        });
}

/// a += b, elementwise. a, b: [*].
pub fn add_inplace(a: &mut Tensor, b: &Tensor) {
    a.data
        .par_chunks_mut(GRAIN)
        .zip(b.data.par_chunks(GRAIN))
        .for_each(|(ac, bc)| ac.iter_mut().zip(bc).for_each(|(x, &y)| *x += y));
}
