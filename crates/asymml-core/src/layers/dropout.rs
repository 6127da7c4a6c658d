//! Dropout (inverted: kept values are scaled by 1/(1−p) in training; identity in evaluation).

use crate::rng::Rng;
use crate::tensor::Tensor;

/// Dropout with probability `p`; keeps its mask for backward.
pub struct Dropout {
    pub p: f32,
    mask: Vec<f32>,
    active: bool,
}

impl Dropout {
    pub fn new(p: f32) -> Self {
        Dropout {
            p,
            mask: Vec::new(),
            active: false,
        }
    }

    /// x: [*] → y: [*]. In training each element is zeroed with probability p, others scaled by 1/(1−p).
    pub fn forward(&mut self, x: &Tensor, y: &mut Tensor, train: bool, rng: &mut Rng) {
        y.copy_from(x);
        self.active = train && self.p > 0.0;
        if !self.active {
            return;
        }
        let scale = if self.p < 1.0 {
            1.0 / (1.0 - self.p)
        } else {
            0.0
        };
        self.mask.clear();
        self.mask
            .extend((0..x.len()).map(|_| if rng.uniform() < self.p { 0.0 } else { scale }));
        y.data.iter_mut().zip(&self.mask).for_each(|(v, m)| *v *= m);
    }

    /// dy: [*] → dx: [*]; the forward mask applied to dy.
    pub fn backward(&mut self, dy: &Tensor, dx: &mut Tensor) {
        dx.copy_from(dy);
        if self.active {
            dx.data
                .iter_mut()
                .zip(&self.mask)
                .for_each(|(v, m)| *v *= m);
        }
    }
}
