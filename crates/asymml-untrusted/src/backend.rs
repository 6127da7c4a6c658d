//! The CPU backend: conv layers with their weights, the residual inputs cached for backward, and the
//! optimizer of the conv weights, run on the service's own thread pool.

use asymml_core::layers::Conv2d;
use asymml_core::optim::{Optimizer, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_core::{CoreError, Tensor};
use thiserror::Error;

/// Errors of the accelerator backend (they become error replies to the trusted side).
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("no model registered")]
    NotRegistered,
    #[error("unknown conv layer {0}")]
    UnknownLayer(u32),
    #[error("layer {0}: backward before any forward (no cached residual)")]
    NoCachedInput(u32),
    #[error("layer {layer}: {source}")]
    Core {
        layer: u32,
        #[source]
        source: CoreError,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("thread pool: {0}")]
    Pool(String),
}

/// Shape description of one conv layer (public model structure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvLayer {
    pub in_ch: usize,
    pub out_ch: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub bias: bool,
}

struct Slot {
    conv: Conv2d,
    /// The residual X_U of the last training forward (∇W_U needs it).
    cached: Option<Tensor>,
}

/// Conv layers, their cached residuals and their optimizer.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    layers: Vec<Slot>,
    opt: Option<Optimizer>,
    registered: bool,
}

impl CpuBackend {
    /// A backend with `threads` worker threads (0: all cores).
    pub fn new(threads: usize) -> Result<Self, BackendError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("accel-{i}"))
            .build()
            .map_err(|e| BackendError::Pool(e.to_string()))?;
        Ok(CpuBackend {
            pool,
            layers: Vec::new(),
            opt: None,
            registered: false,
        })
    }

    /// Registers the model's conv layers with their initial weights (and biases) and the optimizer.
    pub fn register(
        &mut self,
        layers: &[ConvLayer],
        weights: Vec<(Tensor, Option<Tensor>)>,
        optimizer: OptimizerKind,
        weight_decay: f32,
    ) -> Result<(), BackendError> {
        if layers.len() != weights.len() {
            return Err(BackendError::Invalid(format!(
                "{} layers but {} weight sets",
                layers.len(),
                weights.len()
            )));
        }
        let mut rng = Rng::new(0);
        let mut slots = Vec::with_capacity(layers.len());
        for (i, (l, (w, b))) in layers.iter().zip(weights).enumerate() {
            let mut conv = Conv2d::new(l.in_ch, l.out_ch, l.k, l.stride, l.pad, l.bias, &mut rng);
            conv.id = i;
            if w.shape != conv.weight.value.shape {
                return Err(BackendError::Invalid(format!(
                    "layer {i}: weight shape {:?}, expected {:?}",
                    w.shape, conv.weight.value.shape
                )));
            }
            conv.weight.value = w;
            match (conv.bias.as_mut(), b) {
                (Some(p), Some(b)) if b.shape == p.value.shape => p.value = b,
                (None, None) => {}
                _ => {
                    return Err(BackendError::Invalid(format!(
                        "layer {i}: bias does not match the layer"
                    )))
                }
            }
            slots.push(Slot { conv, cached: None });
        }
        self.layers = slots;
        self.opt = Some(Optimizer::new(optimizer, weight_decay));
        self.registered = true;
        Ok(())
    }

    fn slot(&mut self, layer: u32) -> Result<&mut Slot, BackendError> {
        self.parts(layer).map(|(_, s)| s)
    }

    /// The thread pool and one layer's slot, borrowed together.
    fn parts(&mut self, layer: u32) -> Result<(&rayon::ThreadPool, &mut Slot), BackendError> {
        if !self.registered {
            return Err(BackendError::NotRegistered);
        }
        let slot = self
            .layers
            .get_mut(layer as usize)
            .ok_or(BackendError::UnknownLayer(layer))?;
        Ok((&self.pool, slot))
    }

    /// The layer's description.
    pub fn layer(&self, layer: u32) -> Option<ConvLayer> {
        self.layers.get(layer as usize).map(|s| ConvLayer {
            in_ch: s.conv.in_ch,
            out_ch: s.conv.out_ch,
            k: s.conv.k,
            stride: s.conv.stride,
            pad: s.conv.pad,
            bias: s.conv.bias.is_some(),
        })
    }

    /// Number of registered layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// x_u: [B, C, H, W] → Y_U = conv(X_U, W) + b: [B, M, OH, OW]. In training the residual is kept for ∇W_U.
    pub fn forward(
        &mut self,
        layer: u32,
        x_u: Tensor,
        train: bool,
    ) -> Result<Tensor, BackendError> {
        let (pool, slot) = self.parts(layer)?;
        let mut y = Tensor::default();
        pool.install(|| slot.conv.forward(&x_u, &mut y))
            .map_err(|source| BackendError::Core { layer, source })?;
        // Kept in inference too: a ResNet shortcut conv reads the residual of its block's first conv.
        let _ = train;
        slot.cached = Some(x_u);
        Ok(y)
    }

    /// Forward of `layer` on the residual cached for `from` (a ResNet shortcut conv reading its block's input).
    pub fn forward_shared(
        &mut self,
        layer: u32,
        from: u32,
        train: bool,
    ) -> Result<Tensor, BackendError> {
        let x_u = self
            .slot(from)?
            .cached
            .clone()
            .ok_or(BackendError::NoCachedInput(from))?;
        self.forward(layer, x_u, train)
    }

    /// dy: [B, M, OH, OW] → ∇X = conv_transpose(∇Y, W) if `need_dx`; sets the layer's gradient to
    /// ∇W_U = corr(X_U, ∇Y) and ∇b = Σ ∇Y (the trusted part ∇W_T is added by [`CpuBackend::add_weight_grad`]).
    pub fn backward(
        &mut self,
        layer: u32,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<Option<Tensor>, BackendError> {
        let (pool, slot) = self.parts(layer)?;
        let x_u = slot
            .cached
            .as_ref()
            .ok_or(BackendError::NoCachedInput(layer))?;
        slot.conv.weight.zero_grad();
        if let Some(b) = slot.conv.bias.as_mut() {
            b.zero_grad();
        }
        let mut dx = need_dx.then(Tensor::default);
        pool.install(|| slot.conv.backward(x_u, dy, dx.as_mut()))
            .map_err(|source| BackendError::Core { layer, source })?;
        Ok(dx)
    }

    /// Adds the trusted side's ∇W_T to the layer's weight gradient.
    pub fn add_weight_grad(&mut self, layer: u32, dw_t: &Tensor) -> Result<(), BackendError> {
        let slot = self.slot(layer)?;
        if dw_t.shape != slot.conv.weight.grad.shape {
            return Err(BackendError::Invalid(format!(
                "layer {layer}: ∇W_T shape {:?}, expected {:?}",
                dw_t.shape, slot.conv.weight.grad.shape
            )));
        }
        slot.conv
            .weight
            .grad
            .data
            .iter_mut()
            .zip(&dw_t.data)
            .for_each(|(g, v)| *g += v);
        Ok(())
    }

    /// One optimizer step on every conv weight with learning rate `lr`.
    pub fn step(&mut self, lr: f32) -> Result<(), BackendError> {
        if !self.registered {
            return Err(BackendError::NotRegistered);
        }
        let opt = self.opt.as_mut().ok_or(BackendError::NotRegistered)?;
        opt.begin_step();
        let mut i = 0;
        for slot in &mut self.layers {
            opt.update(i, &mut slot.conv.weight, lr);
            i += 1;
            if let Some(b) = slot.conv.bias.as_mut() {
                opt.update(i, b, lr);
            }
            i += 1;
        }
        Ok(())
    }

    /// The layer's current weight and bias gradients (∇W_U + ∇W_T, ∇b).
    pub fn grads(&mut self, layer: u32) -> Result<(Tensor, Option<Tensor>), BackendError> {
        let slot = self.slot(layer)?;
        Ok((
            slot.conv.weight.grad.clone(),
            slot.conv.bias.as_ref().map(|b| b.grad.clone()),
        ))
    }

    /// The layer's current weight and bias.
    pub fn weights(&mut self, layer: u32) -> Result<(Tensor, Option<Tensor>), BackendError> {
        let slot = self.slot(layer)?;
        Ok((
            slot.conv.weight.value.clone(),
            slot.conv.bias.as_ref().map(|b| b.value.clone()),
        ))
    }
}
