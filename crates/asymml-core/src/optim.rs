//! Optimizers (SGD with momentum, weight decay and Nesterov; AdamW) and learning-rate schedules, with
//! PyTorch's update rules.

use crate::layers::Param;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Which update rule, with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum OptimizerKind {
    /// torch.optim.SGD (dampening 0).
    Sgd { momentum: f32, nesterov: bool },
    /// torch.optim.AdamW.
    AdamW { beta1: f32, beta2: f32, eps: f32 },
}

/// An optimizer over a fixed, ordered list of parameters (the order of `Net::visit_params`).
#[derive(Clone, Debug)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub weight_decay: f32,
    /// Number of steps taken (AdamW's bias correction uses it).
    pub steps: u64,
    /// Per parameter: SGD [momentum buffer]; AdamW [m, v]. Empty until the first step.
    pub state: Vec<Vec<Tensor>>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f32) -> Self {
        Optimizer {
            kind,
            weight_decay,
            steps: 0,
            state: Vec::new(),
        }
    }

    /// Names of the per-parameter state slots, in `state[i]` order.
    pub fn slot_names(&self) -> &'static [&'static str] {
        match self.kind {
            OptimizerKind::Sgd { .. } => &["momentum"],
            OptimizerKind::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }

    /// Starts a step: call before `update` for each parameter in order.
    pub fn begin_step(&mut self) {
        self.steps += 1;
    }

    /// Updates parameter number `i` (in the fixed order) from its gradient with learning rate `lr`.
    pub fn update(&mut self, i: usize, p: &mut Param, lr: f32) {
        let slots = self.slot_names().len();
        while self.state.len() <= i {
            self.state.push(Vec::new());
        }
        if self.state[i].len() != slots || self.state[i][0].shape != p.value.shape {
            self.state[i] = (0..slots).map(|_| Tensor::zeros(&p.value.shape)).collect();
        }
        let wd = self.weight_decay;
        let (w, g) = (&mut p.value.data, &p.grad.data);
        match self.kind {
            OptimizerKind::Sgd { momentum, nesterov } => {
                let buf = &mut self.state[i][0].data;
                for ((w, &g), b) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
                    let mut d = g + wd * *w;
                    if momentum != 0.0 {
                        // First step: buf = d (a zero buffer gives the same with dampening 0).
                        *b = momentum * *b + d;
                        d = if nesterov { d + momentum * *b } else { *b };
                    }
                    *w -= lr * d;
                }
            }
            OptimizerKind::AdamW { beta1, beta2, eps } => {
                let t = self.steps.max(1) as i32;
                let bc1 = 1.0 - beta1.powi(t);
                let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
                let step = lr / bc1;
                let (ms, vs) = self.state[i].split_at_mut(1);
                let (m, v) = (&mut ms[0].data, &mut vs[0].data);
                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *w *= 1.0 - lr * wd;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *w -= step * *m / (v.sqrt() / bc2_sqrt + eps);
                }
            }
        }
    }
}

/// A learning-rate schedule, evaluated per optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    Constant,
    /// Multiply by `gamma` every `every` steps (torch StepLR).
    Step {
        every: u64,
        gamma: f32,
    },
    /// Cosine annealing from the base rate to `min_lr` over `total` steps (torch CosineAnnealingLR).
    Cosine {
        total: u64,
        min_lr: f32,
    },
}

impl LrSchedule {
    /// Learning rate at step `t` (0-based) for base rate `base`.
    pub fn lr(&self, base: f32, t: u64) -> f32 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every, gamma } => base * gamma.powi((t / every.max(1)) as i32),
            LrSchedule::Cosine { total, min_lr } => {
                let frac = t as f64 / total.max(1) as f64;
                (min_lr as f64
                    + (base - min_lr) as f64 * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()))
                    as f32
            }
        }
    }
}
