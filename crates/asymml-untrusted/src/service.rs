//! The accelerator service: answers the trusted runtime's requests with its conv backend (CPU or CUDA). It is
//! passive: it only ever replies, and an error in a request becomes an `Error` reply, never a crash (a panic
//! inside a backend included: it is caught, answered with an error, and every later request is refused).

use crate::backend::{BackendError, ConvBackend, ConvLayer, DeviceStats};
use crate::device::{open_backend, Device};
use asymml_core::models::{LocalExec, ModelSpec, Net, StateMut};
use asymml_core::optim::{Optimizer, OptimizerKind};
use asymml_core::{error_chain, Tensor};
use asymml_protocol::declassify::{accelerator_result, accelerator_result_owned};
use asymml_protocol::{
    serve, ConvLayerSpec, OptimizerSpec, ProtocolError, Reply, Request, Transport, WireTensor,
};

/// The service state: the conv backend (split mode), or a whole network with its optimizer (untrusted-only,
/// on the CPU only).
pub struct Service {
    backend: Box<dyn ConvBackend>,
    device: Device,
    net: Option<(Net, Optimizer)>,
    pool: rayon::ThreadPool,
    /// Set when a request panicked: the backend's state is unknown, so every later request is refused.
    failed: bool,
}

fn optimizer_of(spec: OptimizerSpec) -> (OptimizerKind, f32) {
    match spec {
        OptimizerSpec::Sgd {
            momentum,
            nesterov,
            weight_decay,
        } => (OptimizerKind::Sgd { momentum, nesterov }, weight_decay),
        OptimizerSpec::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => (OptimizerKind::AdamW { beta1, beta2, eps }, weight_decay),
    }
}

fn wire_in(t: WireTensor, shape: &[usize]) -> Result<Tensor, BackendError> {
    t.into_tensor_checked(shape)
        .map_err(|e| BackendError::Invalid(e.to_string()))
}

impl Service {
    /// A service on the CPU backend with `threads` worker threads (0: all cores).
    pub fn new(threads: usize) -> Result<Self, BackendError> {
        Self::with_device(Device::Cpu, threads)
    }

    /// A service whose split-mode convolutions run on `device`; `threads` sizes the CPU thread pool (the CPU
    /// backend's, and the untrusted-only mode's). A CUDA device that this binary or this machine cannot use
    /// is an error that says why.
    pub fn with_device(device: Device, threads: usize) -> Result<Self, BackendError> {
        let backend = open_backend(device, threads)?;
        // The untrusted-only mode's pool; a CUDA service never uses it, so it gets one thread.
        let pool_threads = if device == Device::Cpu { threads } else { 1 };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(pool_threads)
            .start_handler(|_| crate::thread_started())
            .build()
            .map_err(|e| BackendError::Pool(e.to_string()))?;
        Ok(Service {
            backend,
            device,
            net: None,
            pool,
            failed: false,
        })
    }

    /// The device of the split-mode convolutions.
    pub fn device(&self) -> Device {
        self.device
    }

    /// A short description of the backend ("cpu (8 thread(s))", "cuda:0 (NVIDIA H100 …)").
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The backend's copy and kernel time and bytes moved (`None` on the CPU).
    pub fn stats(&self) -> Option<DeviceStats> {
        self.backend.stats()
    }

    fn layer(&self, layer: u32) -> Result<ConvLayer, BackendError> {
        self.backend
            .layer(layer)
            .ok_or(BackendError::UnknownLayer(layer))
    }

    /// Answers one request.
    pub fn handle(&mut self, req: Request) -> Reply {
        if self.failed {
            return Reply::error("the accelerator failed on an earlier request; restart it");
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.try_handle(req))) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Reply::error(error_chain(&e)),
            Err(p) => {
                self.failed = true;
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Reply::error(format!("internal error in the accelerator: {msg}"))
            }
        }
    }

    fn try_handle(&mut self, req: Request) -> Result<Reply, BackendError> {
        Ok(match req {
            Request::Hello { .. } => Reply::error("unexpected Hello"),
            Request::Register {
                layers,
                weights,
                optimizer,
            } => self.register(&layers, weights, optimizer)?,
            Request::ConvForward { layer, x_u, train } => {
                let l = self.layer(layer)?;
                let shape = x_u.shape().to_vec();
                if shape.len() != 4 || shape[1] != l.in_ch {
                    return Err(BackendError::Invalid(format!(
                        "X_U shape {shape:?} does not fit a conv with {} input channels",
                        l.in_ch
                    )));
                }
                let x = wire_in(x_u, &shape)?;
                let y = self.backend.forward(layer, x, train)?;
                conv_output(layer, y)
            }
            Request::ConvForwardShared {
                layer,
                from_layer,
                train,
            } => conv_output(
                layer,
                self.backend.forward_shared(layer, from_layer, train)?,
            ),
            Request::ConvBackward { layer, dy, need_dx } => {
                let shape = dy.shape().to_vec();
                let dy = wire_in(dy, &shape)?;
                let dx = self.backend.backward(layer, &dy, need_dx)?;
                Reply::InputGrad {
                    layer,
                    dx: dx.map(accelerator_result_owned),
                }
            }
            Request::WeightGradPart { layer, dw_t } => {
                let l = self.layer(layer)?;
                let dw = wire_in(dw_t, &l.weight_shape())?;
                self.backend.add_weight_grad(layer, &dw)?;
                Reply::Ok
            }
            Request::Step { lr } => self.step(lr)?,
            Request::RegisterNet {
                spec,
                state,
                optimizer,
            } => self.register_net(&spec, state, optimizer)?,
            Request::NetForward { x, train } => self.net_forward(x, train)?,
            Request::NetBackward { dlogits } => self.net_backward(dlogits)?,
            Request::FetchState => self.fetch_state()?,
            Request::FetchWeights { layer } => weights_reply(layer, self.backend.weights(layer)?),
            Request::FetchGrads { layer } => weights_reply(layer, self.backend.grads(layer)?),
            Request::Shutdown => Reply::Ok,
        })
    }

    /// `Register`: the conv layers (split mode), their weights and the conv optimizer.
    fn register(
        &mut self,
        layers: &[ConvLayerSpec],
        weights: Vec<(WireTensor, Option<WireTensor>)>,
        optimizer: OptimizerSpec,
    ) -> Result<Reply, BackendError> {
        let specs: Vec<ConvLayer> = layers
            .iter()
            .map(|l| ConvLayer {
                in_ch: l.in_ch as usize,
                out_ch: l.out_ch as usize,
                k: l.k as usize,
                stride: l.stride as usize,
                pad: l.pad as usize,
                bias: l.bias,
            })
            .collect();
        if layers.len() != weights.len() {
            return Err(BackendError::Invalid(
                "one weight set per layer expected".into(),
            ));
        }
        let mut ws = Vec::with_capacity(weights.len());
        for (l, (w, b)) in specs.iter().zip(weights) {
            let w = wire_in(w, &l.weight_shape())?;
            let b = b.map(|b| wire_in(b, &l.bias_shape())).transpose()?;
            ws.push((w, b));
        }
        let (kind, wd) = optimizer_of(optimizer);
        self.backend.register(&specs, ws, kind, wd)?;
        Ok(Reply::Ok)
    }

    /// `Step`: one optimizer step of the whole network (untrusted-only) or of the conv weights (split).
    fn step(&mut self, lr: f32) -> Result<Reply, BackendError> {
        if !lr.is_finite() {
            return Err(BackendError::Invalid(format!("learning rate {lr}")));
        }
        match self.net.as_mut() {
            Some((net, opt)) => {
                opt.begin_step();
                let mut i = 0;
                net.visit_params(&mut |_, p| {
                    opt.update(i, p, lr);
                    i += 1;
                });
            }
            None => self.backend.step(lr)?,
        }
        Ok(Reply::Ok)
    }

    /// `RegisterNet` (untrusted-only): the whole network from its spec and state dict, with its optimizer.
    fn register_net(
        &mut self,
        spec: &str,
        state: Vec<(String, WireTensor)>,
        optimizer: OptimizerSpec,
    ) -> Result<Reply, BackendError> {
        if self.device != Device::Cpu {
            return Err(BackendError::Invalid(format!(
                "the untrusted-only mode (the whole network on the accelerator) runs on the CPU \
                 backend only, and this accelerator uses {}; start it with --accelerator-device cpu",
                self.device
            )));
        }
        let spec: ModelSpec = serde_json::from_str(spec)
            .map_err(|e| BackendError::Invalid(format!("model spec: {e}")))?;
        let mut net = spec
            .build(0)
            .map_err(|source| BackendError::Core { layer: 0, source })?;
        let mut values: std::collections::HashMap<String, WireTensor> = state.into_iter().collect();
        net.try_visit_state(&mut |name, s| {
            let t = values
                .remove(&name)
                .ok_or_else(|| BackendError::Invalid(format!("missing {name}")))?;
            match s {
                StateMut::Tensor(dst) => {
                    let shape = dst.shape.clone();
                    t.copy_into_checked(&shape, dst)
                        .map_err(|e| BackendError::Invalid(format!("{name}: {e}")))?;
                }
                StateMut::Counter(c) => *c = t.data().first().copied().unwrap_or(0.0) as i64,
            }
            Ok(())
        })?;
        let (kind, wd) = optimizer_of(optimizer);
        self.net = Some((net, Optimizer::new(kind, wd)));
        Ok(Reply::Ok)
    }

    /// `NetForward` (untrusted-only): x → logits.
    fn net_forward(&mut self, x: WireTensor, train: bool) -> Result<Reply, BackendError> {
        let (net, _) = self.net.as_mut().ok_or(BackendError::NotRegistered)?;
        let shape = x.shape().to_vec();
        let x = wire_in(x, &shape)?;
        net.zero_grad();
        let logits = self
            .pool
            .install(|| net.forward(&x, train, &mut LocalExec).cloned())
            .map_err(|source| BackendError::Core { layer: 0, source })?;
        Ok(Reply::NetOutput {
            logits: accelerator_result(&logits),
        })
    }

    /// `NetBackward` (untrusted-only): backward from ∇logits.
    fn net_backward(&mut self, dlogits: WireTensor) -> Result<Reply, BackendError> {
        let (net, _) = self.net.as_mut().ok_or(BackendError::NotRegistered)?;
        let shape = net.logits().shape.clone();
        let g = wire_in(dlogits, &shape)?;
        self.pool
            .install(|| net.backward_from(g, &mut LocalExec, false))
            .map_err(|source| BackendError::Core { layer: 0, source })?;
        Ok(Reply::Ok)
    }

    /// `FetchState` (untrusted-only): the whole state dict.
    fn fetch_state(&mut self) -> Result<Reply, BackendError> {
        let (net, _) = self.net.as_mut().ok_or(BackendError::NotRegistered)?;
        let mut entries = Vec::new();
        net.visit_state(&mut |name, s| {
            let t = match s {
                StateMut::Tensor(t) => accelerator_result(t),
                StateMut::Counter(c) => accelerator_result(&Tensor {
                    shape: vec![],
                    data: vec![*c as f32],
                }),
            };
            entries.push((name, t));
        });
        Ok(Reply::State { entries })
    }

    /// Serves one connection until it shuts down or closes.
    pub fn serve<T: Transport>(&mut self, transport: T) -> Result<(), ProtocolError> {
        serve(transport, &mut |req| self.handle(req))
    }
}

/// The reply to a conv forward: Y_U of `layer`.
fn conv_output(layer: u32, y: Tensor) -> Reply {
    Reply::ConvOutput {
        layer,
        y_u: accelerator_result_owned(y),
    }
}

/// The reply carrying a conv's weights (or gradients) and bias.
fn weights_reply(layer: u32, (w, b): (Tensor, Option<Tensor>)) -> Reply {
    Reply::Weights {
        layer,
        w: accelerator_result(&w),
        b: b.as_ref().map(accelerator_result),
    }
}
