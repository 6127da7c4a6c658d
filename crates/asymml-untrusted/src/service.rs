//! The accelerator service: answers the trusted runtime's requests with its conv backend (CPU or CUDA). It is
//! passive: it only ever replies, and an error in a request becomes an `Error` reply, never a crash (a panic
//! inside a backend included: it is caught, answered with an error, and every later request is refused).
//!
//! Every registration is checked against the geometry limits of [`backend`](crate::backend) and every request
//! against its registered layer; a session's memory is kept under [`Limits::max_session_bytes`]: before work
//! is done, the bytes it needs (its output, the input cached for backward, the work space) are added to what
//! the session holds (weights, gradients, optimizer state, cached inputs, work space kept), and work over the
//! budget is refused with an error reply (the session goes on). The backend and its threads are started at
//! the first registration, not with the connection.

use crate::backend::{product, BackendError, ConvBackend, ConvLayer, DeviceStats, MAX_CHANNELS};
use crate::device::{open_backend, Device};
use asymml_core::models::{LocalExec, ModelSpec, Net, StateMut};
use asymml_core::optim::{Optimizer, OptimizerKind};
use asymml_core::{error_chain, Tensor};
use asymml_protocol::declassify::{accelerator_result, accelerator_result_owned};
use asymml_protocol::{
    serve, serve_opts, ConvLayerSpec, OptimizerSpec, ProtocolError, Reply, Request, ServeOptions,
    Transport, WireTensor,
};

/// The limits of one session (one connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The bytes a session may hold and use at once (an estimate made before the work; see the module doc).
    pub max_session_bytes: u64,
}

impl Default for Limits {
    /// 8 GiB per session.
    fn default() -> Self {
        Limits {
            max_session_bytes: 8 << 30,
        }
    }
}

/// Bytes per parameter a registration keeps: the value, its gradient and (untrusted-only: the optimizer is
/// here) up to two optimizer moments — counted for both modes, an upper bound in split mode.
const BYTES_PER_PARAM: u64 = 4 * 4;

/// What one registered conv layer holds beyond its parameters.
#[derive(Clone, Copy, Debug, Default)]
struct LayerUse {
    /// The shape of the input cached for backward (and for a shortcut conv reading it), if any.
    cached: Option<[usize; 4]>,
    /// The work space the layer keeps (the most any of its passes needed).
    scratch: u64,
    /// Bytes kept between a `ConvInputGrad` and its `ConvWeightGrad` (∇Y, or ∇W_U already computed).
    kept: u64,
}

/// A conv pass, for the budget.
#[derive(Clone, Copy)]
enum Pass {
    Forward,
    Backward {
        need_dx: bool,
    },
    /// The first half of a backward, ∇X alone; ∇Y is kept for the second.
    InputGrad,
    /// The second half, ∇W_U alone, from the ∇Y kept.
    WeightGrad,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "a conv forward pass",
            Pass::Backward { .. } | Pass::InputGrad | Pass::WeightGrad => "a conv backward pass",
        }
    }
}

/// What a layer keeps between a `ConvInputGrad` and its `ConvWeightGrad`.
enum Kept {
    /// ∇Y, for a backend that computes ∇W_U apart.
    OutputGrad(Tensor),
    /// ∇W_U, computed with ∇X by a backend that does not.
    WeightGrad(Tensor),
}

/// The bytes a session holds, as the budget counts them.
#[derive(Debug, Default)]
struct Ledger {
    /// Parameters with gradients and optimizer state (all registered layers, or the whole network).
    params: u64,
    layers: Vec<LayerUse>,
}

/// Bytes of a float tensor of `shape`.
fn tensor_bytes(shape: &[usize]) -> Option<u64> {
    product(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>())?.checked_mul(4)
}

impl Ledger {
    /// What the session holds apart from `layer`'s cached input and work space.
    fn held_without(&self, layer: usize) -> Option<u64> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != layer)
            .try_fold(self.params, |a, (_, u)| {
                let cached = u.cached.map_or(Some(0), |s| tensor_bytes(&s))?;
                a.checked_add(cached)?
                    .checked_add(u.scratch)?
                    .checked_add(u.kept)
            })
    }
}

/// The service state: the conv backend (split mode), or a whole network with its optimizer (untrusted-only,
/// on the CPU only).
pub struct Service {
    /// The conv backend, opened at the first registration (or at once by [`Service::with_device`]).
    backend: Option<Box<dyn ConvBackend>>,
    device: Device,
    threads: usize,
    limits: Limits,
    ledger: Ledger,
    net: Option<(Net, Optimizer)>,
    /// The untrusted-only mode's pool, made at `RegisterNet`.
    pool: Option<rayon::ThreadPool>,
    /// Set when a request panicked: the backend's state is unknown, so every later request is refused.
    failed: bool,
    /// Per layer, the batch being assembled from `ConvForwardPart`s: the whole batch's X_U (its shape is the
    /// batch's) and the samples received so far.
    parts: Vec<Option<(Tensor, usize)>>,
    /// Per layer, what its last `ConvInputGrad` kept for its `ConvWeightGrad`.
    kept: Vec<Option<Kept>>,
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

    /// A service whose split-mode convolutions run on `device`, opened now; `threads` sizes the CPU thread
    /// pool (the CPU backend's, and the untrusted-only mode's; see [`pool_threads`](crate::pool_threads)). A
    /// CUDA device that this binary or this machine cannot use is an error that says why. The default
    /// [`Limits`] apply.
    pub fn with_device(device: Device, threads: usize) -> Result<Self, BackendError> {
        Self::with_device_limits(device, threads, Limits::default())
    }

    /// As [`Service::with_device`], with `limits`.
    pub fn with_device_limits(
        device: Device,
        threads: usize,
        limits: Limits,
    ) -> Result<Self, BackendError> {
        let mut s = Self::with_limits(device, threads, limits)?;
        s.backend = Some(open_backend(device, threads)?);
        Ok(s)
    }

    /// A service with `limits` whose backend (and its threads) is opened at the first registration: a
    /// connection that never registers costs no pool and no device context. Only whether this binary can
    /// use `device` at all is checked now.
    pub fn with_limits(
        device: Device,
        threads: usize,
        limits: Limits,
    ) -> Result<Self, BackendError> {
        device.check_compiled_in()?;
        Ok(Service {
            backend: None,
            device,
            threads,
            limits,
            ledger: Ledger::default(),
            net: None,
            pool: None,
            failed: false,
            parts: Vec::new(),
            kept: Vec::new(),
        })
    }

    /// The session's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The backend, opened on first use.
    fn backend(&mut self) -> Result<&mut Box<dyn ConvBackend>, BackendError> {
        if self.backend.is_none() {
            self.backend = Some(open_backend(self.device, self.threads)?);
        }
        self.backend.as_mut().ok_or(BackendError::NotRegistered)
    }

    /// The backend of a registered model.
    fn registered(&mut self) -> Result<&mut Box<dyn ConvBackend>, BackendError> {
        self.backend.as_mut().ok_or(BackendError::NotRegistered)
    }

    /// Refuses `what` when the session would hold more than its budget: `need` bytes on top of everything
    /// held apart from `layer`'s cached input and work space (`None` sizes overflowed).
    fn admit(&self, what: &str, layer: usize, need: Option<u64>) -> Result<(), BackendError> {
        let budget = self.limits.max_session_bytes;
        let total = need.and_then(|n| self.ledger.held_without(layer)?.checked_add(n));
        match total {
            Some(t) if t <= budget => Ok(()),
            _ => Err(BackendError::Budget {
                what: what.to_string(),
                need: total.unwrap_or(u64::MAX),
                budget,
            }),
        }
    }

    /// Checks a conv pass of `layer` over an input of `x` = [B, C, H, W] against the layer and the budget:
    /// the input it caches, the work space it keeps and its answer (the output [B, M, OH, OW] of a forward
    /// pass, ∇X of a backward pass that asks for it) held twice (the tensor and its encoded reply). Returns
    /// the layer's use after the pass and the output's shape.
    fn plan_pass(
        &self,
        pass: Pass,
        layer: u32,
        l: &ConvLayer,
        x: &[usize],
    ) -> Result<(LayerUse, [usize; 4]), BackendError> {
        let bad = |detail: String| BackendError::Invalid(format!("layer {layer}: {detail}"));
        let x: [usize; 4] = x
            .try_into()
            .map_err(|_| bad(format!("input shape {x:?} is not [B, C, H, W]")))?;
        if x[1] != l.in_ch || x[0] == 0 {
            return Err(bad(format!(
                "input shape {x:?} does not fit a conv with {} input channels",
                l.in_ch
            )));
        }
        let (oh, ow) = l
            .output_hw(x[2], x[3])
            .ok_or_else(|| bad(format!("a {}×{} kernel does not fit input {x:?}", l.k, l.k)))?;
        let out = [x[0], l.out_ch, oh, ow];
        let i = layer as usize;
        let old = self.ledger.layers.get(i).copied().unwrap_or_default();
        let scratch = l
            .scratch_bytes(x, crate::pool_threads(self.threads))
            .map(|s| s.max(old.scratch));
        let answer = match pass {
            Pass::Forward => tensor_bytes(&out),
            Pass::Backward { need_dx: true } | Pass::InputGrad => tensor_bytes(&x),
            Pass::Backward { need_dx: false } | Pass::WeightGrad => Some(0),
        };
        // ∇Y, kept from the first half of a split backward to the end of the second.
        let kept = match pass {
            Pass::InputGrad | Pass::WeightGrad => tensor_bytes(&out),
            _ => Some(0),
        };
        let need = (|| {
            tensor_bytes(&x)?
                .checked_add(scratch?)?
                .checked_add(answer?.checked_mul(2)?)?
                .checked_add(kept?)
        })();
        self.admit(pass.name(), i, need)?;
        let u = LayerUse {
            cached: Some(x),
            scratch: scratch.unwrap_or(0),
            kept: match pass {
                Pass::InputGrad => kept.unwrap_or(0),
                _ => 0,
            },
        };
        Ok((u, out))
    }

    /// The shape of the input cached for `layer`.
    fn cached(&self, layer: u32) -> Result<[usize; 4], BackendError> {
        self.ledger
            .layers
            .get(layer as usize)
            .and_then(|u| u.cached)
            .ok_or(BackendError::NoCachedInput(layer))
    }

    /// Records a layer's use after its pass succeeded.
    fn record(&mut self, layer: u32, u: LayerUse) {
        if let Some(slot) = self.ledger.layers.get_mut(layer as usize) {
            *slot = u;
        }
    }

    /// The device of the split-mode convolutions.
    pub fn device(&self) -> Device {
        self.device
    }

    /// A short description of the backend ("cpu (8 thread(s))", "cuda:0 (NVIDIA H100 …)"; the device alone
    /// before the backend is opened).
    pub fn describe(&self) -> String {
        match &self.backend {
            Some(b) => b.describe(),
            None => self.device.to_string(),
        }
    }

    /// The backend's copy and kernel time and bytes moved (`None` on the CPU, or before the backend opened).
    pub fn stats(&self) -> Option<DeviceStats> {
        self.backend.as_ref().and_then(|b| b.stats())
    }

    fn layer(&self, layer: u32) -> Result<ConvLayer, BackendError> {
        self.backend
            .as_ref()
            .ok_or(BackendError::NotRegistered)?
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
            Request::Register { layers, weights } => self.register(&layers, weights)?,
            Request::ConvForward { layer, x_u, train } => {
                self.drop_parts(layer);
                self.drop_kept(layer);
                let l = self.layer(layer)?;
                let shape = x_u.shape().to_vec();
                let (u, _) = self.plan_pass(Pass::Forward, layer, &l, &shape)?;
                let x = wire_in(x_u, &shape)?;
                let y = self.registered()?.forward(layer, x, train)?;
                self.record(layer, u);
                conv_output(layer, y)
            }
            Request::ConvForwardPart {
                layer,
                first,
                batch,
                x_u,
                train,
            } => self.forward_part(layer, first, batch, x_u, train)?,
            Request::ConvForwardShared {
                layer,
                from_layer,
                train,
            } => {
                self.drop_kept(layer);
                let l = self.layer(layer)?;
                self.layer(from_layer)?;
                let x = self.cached(from_layer)?;
                let (u, _) = self.plan_pass(Pass::Forward, layer, &l, &x)?;
                let y = self
                    .registered()?
                    .forward_shared(layer, from_layer, train)?;
                self.record(layer, u);
                conv_output(layer, y)
            }
            Request::ConvBackward { layer, dy, need_dx } => {
                self.drop_kept(layer);
                let l = self.layer(layer)?;
                let x = self.cached(layer)?;
                // ∇Y must have the output's shape.
                let (u, out) = self.plan_pass(Pass::Backward { need_dx }, layer, &l, &x)?;
                let dy = wire_in(dy, &out)?;
                let (dx, dw) = self.registered()?.backward(layer, &dy, need_dx)?;
                self.record(layer, u);
                Reply::ConvGrads {
                    layer,
                    dx: dx.map(accelerator_result_owned),
                    dw: accelerator_result_owned(dw),
                }
            }
            Request::ConvInputGrad { layer, dy } => self.input_grad(layer, dy)?,
            Request::ConvWeightGrad { layer } => self.weight_grad(layer)?,
            Request::SetWeights { layer, w, b } => {
                let l = self.layer(layer)?;
                let w = wire_in(w, &l.weight_shape())?;
                let b = match (l.bias, b) {
                    (true, Some(b)) => Some(wire_in(b, &l.bias_shape())?),
                    (false, None) => None,
                    _ => {
                        return Err(BackendError::Invalid(format!(
                            "layer {layer}: the bias does not match the layer"
                        )))
                    }
                };
                self.registered()?.set_weights(layer, w, b)?;
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
            Request::FetchWeights { layer } => {
                weights_reply(layer, self.registered()?.weights(layer)?)
            }
            Request::Shutdown => Reply::Ok,
        })
    }

    /// Forgets a batch being assembled for `layer` (a whole-batch forward replaces it).
    fn drop_parts(&mut self, layer: u32) {
        if let Some(p) = self.parts.get_mut(layer as usize) {
            *p = None;
        }
    }

    /// Forgets what `layer`'s last `ConvInputGrad` kept (a new forward or backward of the layer makes it
    /// stale).
    fn drop_kept(&mut self, layer: u32) {
        let i = layer as usize;
        if let Some(k) = self.kept.get_mut(i) {
            *k = None;
        }
        if let Some(u) = self.ledger.layers.get_mut(i) {
            u.kept = 0;
        }
    }

    /// `ConvInputGrad`: ∇X alone, ∇Y kept for the layer's `ConvWeightGrad` (or, where the backend computes
    /// both at once, ∇W_U kept).
    fn input_grad(&mut self, layer: u32, dy: WireTensor) -> Result<Reply, BackendError> {
        self.drop_kept(layer);
        let l = self.layer(layer)?;
        let x = self.cached(layer)?;
        let (u, out) = self.plan_pass(Pass::InputGrad, layer, &l, &x)?;
        let dy = wire_in(dy, &out)?;
        let backend = self.registered()?;
        let (dx, kept) = if backend.splits_backward() {
            (backend.input_grad(layer, &dy)?, Kept::OutputGrad(dy))
        } else {
            let (dx, dw) = backend.backward(layer, &dy, true)?;
            let dx = dx.ok_or_else(|| {
                BackendError::Invalid(format!("layer {layer}: the backend gave no ∇X"))
            })?;
            (dx, Kept::WeightGrad(dw))
        };
        let i = layer as usize;
        if self.kept.len() <= i {
            self.kept.resize_with(i + 1, || None);
        }
        self.kept[i] = Some(kept);
        self.record(layer, u);
        Ok(Reply::InputGrad {
            layer,
            dx: accelerator_result_owned(dx),
        })
    }

    /// `ConvWeightGrad`: ∇W_U from the layer's cached X_U and the ∇Y its last `ConvInputGrad` kept.
    fn weight_grad(&mut self, layer: u32) -> Result<Reply, BackendError> {
        let l = self.layer(layer)?;
        let x = self.cached(layer)?;
        let kept = self
            .kept
            .get_mut(layer as usize)
            .and_then(Option::take)
            .ok_or_else(|| {
                BackendError::Invalid(format!(
                    "layer {layer}: ConvWeightGrad without a ConvInputGrad of the layer before it"
                ))
            })?;
        let (u, _) = self.plan_pass(Pass::WeightGrad, layer, &l, &x)?;
        let dw = match kept {
            Kept::OutputGrad(dy) => self.registered()?.weight_grad(layer, &dy)?,
            Kept::WeightGrad(dw) => dw,
        };
        self.record(layer, u);
        Ok(Reply::WeightGrad {
            layer,
            dw: accelerator_result_owned(dw),
        })
    }

    /// `ConvForwardPart`: Y_U of samples `first ..` of a batch of `batch`, the part added to the batch's X_U,
    /// which the backend caches once the last part came. Parts must come in order and without gaps; the budget
    /// counts the whole batch's X_U from the first part on.
    fn forward_part(
        &mut self,
        layer: u32,
        first: u32,
        batch: u32,
        x_u: WireTensor,
        train: bool,
    ) -> Result<Reply, BackendError> {
        self.drop_kept(layer);
        let l = self.layer(layer)?;
        let bad = |detail: String| BackendError::Invalid(format!("layer {layer}: {detail}"));
        let shape = x_u.shape().to_vec();
        let &[pb, c, h, w] = shape.as_slice() else {
            return Err(bad(format!("input shape {shape:?} is not [B, C, H, W]")));
        };
        let (first, batch) = (first as usize, batch as usize);
        if pb == 0 || first.checked_add(pb).is_none_or(|end| end > batch) {
            return Err(bad(format!(
                "a part of {pb} sample(s) from sample {first} does not fit a batch of {batch}"
            )));
        }
        let full = [batch, c, h, w];
        let i = layer as usize;
        if self.parts.len() <= i {
            self.parts.resize_with(i + 1, || None);
        }
        let received = match &self.parts[i] {
            _ if first == 0 => 0,
            Some((t, n)) if t.shape == full => *n,
            Some((t, _)) => {
                return Err(bad(format!(
                    "a part of shape {shape:?} does not belong to the batch of shape {:?} being received",
                    t.shape
                )))
            }
            None => return Err(bad(format!("a part from sample {first} came before sample 0"))),
        };
        if first != received {
            return Err(bad(format!(
                "the part from sample {first} does not follow the {received} sample(s) received"
            )));
        }
        // The whole batch's X_U is what the layer will cache.
        let (u, _) = self.plan_pass(Pass::Forward, layer, &l, &full)?;
        let x = wire_in(x_u, &shape)?;
        if first == 0 {
            // The buffer of the last batch's X_U, if the backend gives it back, else a new one.
            let mut t = self.registered()?.take_cached(layer).unwrap_or_default();
            t.resize(&full);
            self.parts[i] = Some((t, 0));
        }
        let per = c * h * w;
        if let Some((t, n)) = self.parts[i].as_mut() {
            t.data[first * per..(first + pb) * per].copy_from_slice(&x.data);
            *n += pb;
        }
        let y = self.registered()?.forward(layer, x, train);
        let y = match y {
            Ok(y) => y,
            Err(e) => {
                self.parts[i] = None;
                return Err(e);
            }
        };
        if matches!(&self.parts[i], Some((_, n)) if *n == batch) {
            if let Some((t, _)) = self.parts[i].take() {
                self.registered()?.set_cached(layer, t)?;
            }
        }
        self.record(layer, u);
        Ok(conv_output(layer, y))
    }

    /// `Register`: the conv layers (split mode) and their weights.
    fn register(
        &mut self,
        layers: &[ConvLayerSpec],
        weights: Vec<(WireTensor, Option<WireTensor>)>,
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
        if !weights.is_empty() && layers.len() != weights.len() {
            return Err(BackendError::Invalid(
                "one weight set per layer expected (or none: zeros until SetWeights)".into(),
            ));
        }
        // Geometry and memory before anything is built: the new registration replaces the old one.
        crate::backend::check_layers(&specs)?;
        let params = specs
            .iter()
            .try_fold(0u64, |a, l| a.checked_add(l.params()?))
            .and_then(|p| p.checked_mul(BYTES_PER_PARAM));
        self.ledger = Ledger::default();
        self.admit("the registration", 0, params)?;
        let mut ws = Vec::with_capacity(specs.len());
        if weights.is_empty() {
            // Zeros until the trusted runtime sends each layer's weights (SetWeights), one layer per message.
            for l in &specs {
                let b = l.bias.then(|| Tensor::zeros(&l.bias_shape()));
                ws.push((Tensor::zeros(&l.weight_shape()), b));
            }
        }
        for (l, (w, b)) in specs.iter().zip(weights) {
            let w = wire_in(w, &l.weight_shape())?;
            let b = b.map(|b| wire_in(b, &l.bias_shape())).transpose()?;
            ws.push((w, b));
        }
        self.backend()?.register(&specs, ws)?;
        self.parts.clear();
        self.ledger = Ledger {
            params: params.unwrap_or(0),
            layers: vec![LayerUse::default(); specs.len()],
        };
        Ok(Reply::Ok)
    }

    /// `Step`: one optimizer step of the whole network (untrusted-only); refused in split mode, where the trusted
    /// runtime owns the conv weights.
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
            None => {
                return Err(BackendError::Invalid(
                    "Step is for the untrusted-only network; in split mode the trusted runtime owns the \
                     conv weights and sends them with SetWeights"
                        .into(),
                ))
            }
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
        // The widest layer has 8 × width channels; the state sent holds every parameter, so it sizes them.
        if spec.in_ch > MAX_CHANNELS || spec.classes > MAX_CHANNELS || spec.width > MAX_CHANNELS / 8
        {
            return Err(BackendError::Invalid(format!(
                "model spec: {} input channels, {} classes, width {}: at most {MAX_CHANNELS}, \
                 {MAX_CHANNELS} and {}",
                spec.in_ch,
                spec.classes,
                spec.width,
                MAX_CHANNELS / 8
            )));
        }
        let params = state
            .iter()
            .try_fold(0u64, |a, (_, t)| {
                a.checked_add(product(
                    &t.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(),
                )?)
            })
            .and_then(|p| p.checked_mul(BYTES_PER_PARAM));
        self.ledger = Ledger::default();
        self.net = None;
        self.admit("the network's registration", 0, params)?;
        if self.pool.is_none() {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(crate::pool_threads(self.threads))
                .start_handler(|_| crate::thread_started())
                .build()
                .map_err(|e| BackendError::Pool(e.to_string()))?;
            self.pool = Some(pool);
        }
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
        self.ledger.params = params.unwrap_or(0);
        Ok(Reply::Ok)
    }

    /// `NetForward` (untrusted-only): x → logits.
    fn net_forward(&mut self, x: WireTensor, train: bool) -> Result<Reply, BackendError> {
        let (net, _) = self.net.as_mut().ok_or(BackendError::NotRegistered)?;
        let shape = x.shape().to_vec();
        let x = wire_in(x, &shape)?;
        net.zero_grad();
        let pool = self.pool.as_ref().ok_or(BackendError::NotRegistered)?;
        let logits = pool
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
        let pool = self.pool.as_ref().ok_or(BackendError::NotRegistered)?;
        pool.install(|| net.backward_from(g, &mut LocalExec, false))
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

    /// Serves one connection with the loop's limits `opts` (handshake and idle timeouts, frame sizes).
    pub fn serve_opts<T: Transport>(
        &mut self,
        transport: T,
        opts: &ServeOptions,
    ) -> Result<(), ProtocolError> {
        serve_opts(transport, opts, &mut |req| self.handle(req))
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

#[cfg(test)]
mod tests {
    use super::*;
    use asymml_protocol::{declassify_output_grad, declassify_residual, public_weights};

    fn spec(in_ch: u32, out_ch: u32, k: u32, stride: u32, pad: u32) -> ConvLayerSpec {
        ConvLayerSpec {
            id: 0,
            in_ch,
            out_ch,
            k,
            stride,
            pad,
            bias: false,
        }
    }

    /// A `Register` of one layer with weights of its shape (or a tiny stand-in when the shape is absurd).
    fn register(l: ConvLayerSpec) -> Request {
        let shape = l.weight_shape();
        let n: usize = shape.iter().product();
        let w = if n <= 1 << 20 {
            Tensor::zeros(&shape)
        } else {
            Tensor::zeros(&[1, 1, 1, 1])
        };
        Request::Register {
            layers: vec![l],
            weights: vec![(public_weights(&w), None)],
        }
    }

    fn forward(shape: &[usize]) -> Request {
        Request::ConvForward {
            layer: 0,
            x_u: declassify_residual(&Tensor::zeros(shape)),
            train: true,
        }
    }

    fn error_of(r: Reply) -> String {
        match r {
            Reply::Error { message } => message,
            other => panic!("expected an error, got {}", other.describe()),
        }
    }

    fn service(budget: u64) -> Service {
        Service::with_limits(
            Device::Cpu,
            1,
            Limits {
                max_session_bytes: budget,
            },
        )
        .unwrap()
    }

    #[test]
    fn parts_of_a_batch_give_the_whole_batch_s_outputs_and_backward() {
        let mut rng = asymml_core::rng::Rng::new(4);
        let mut t = |shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_vec(shape, (0..n).map(|_| rng.normal()).collect()).unwrap()
        };
        let l = spec(3, 4, 3, 1, 1);
        let (w, x, dy) = (t(&l.weight_shape()), t(&[5, 3, 6, 6]), t(&[5, 4, 6, 6]));
        let reg = Request::Register {
            layers: vec![l],
            weights: vec![(public_weights(&w), None)],
        };
        let per = 3 * 36;
        let part = |a: usize, b: usize| Request::ConvForwardPart {
            layer: 0,
            first: a as u32,
            batch: 5,
            x_u: declassify_residual(
                &Tensor::from_vec(&[b - a, 3, 6, 6], x.data[a * per..b * per].to_vec()).unwrap(),
            ),
            train: true,
        };
        let backward = Request::ConvBackward {
            layer: 0,
            dy: declassify_output_grad(&dy),
            need_dx: true,
        };
        let out = |r: Reply| r.into_conv_output(0).unwrap().data().to_vec();
        // The whole batch at once.
        let mut whole = Service::new(1).unwrap();
        assert_eq!(whole.handle(reg.clone()), Reply::Ok);
        let y = out(whole.handle(Request::ConvForward {
            layer: 0,
            x_u: declassify_residual(&x),
            train: true,
        }));
        let grads = whole.handle(backward.clone());
        // In parts, twice (the second batch reuses the first's buffer).
        let mut parts = Service::new(1).unwrap();
        assert_eq!(parts.handle(reg), Reply::Ok);
        for _ in 0..2 {
            let mut got = Vec::new();
            for (a, b) in [(0, 2), (2, 3), (3, 5)] {
                got.extend(out(parts.handle(part(a, b))));
            }
            assert_eq!(got, y);
            assert_eq!(parts.handle(backward.clone()), grads);
        }
        // Out of order, with a gap, past the batch, or of another shape: refused, and the session goes on.
        for (bad, needle) in [
            (vec![part(2, 3)], "came before sample 0"),
            (
                vec![part(0, 2), part(3, 5)],
                "does not follow the 2 sample(s)",
            ),
            (
                vec![part(0, 2), part(2, 3), part(2, 3)],
                "does not follow the 3 sample(s)",
            ),
        ] {
            let n = bad.len();
            for (i, req) in bad.into_iter().enumerate() {
                let r = parts.handle(req);
                if i + 1 == n {
                    assert!(error_of(r).contains(needle), "{needle}");
                }
            }
        }
        let past = Request::ConvForwardPart {
            layer: 0,
            first: 4,
            batch: 5,
            x_u: declassify_residual(&Tensor::zeros(&[2, 3, 6, 6])),
            train: false,
        };
        assert!(error_of(parts.handle(past)).contains("does not fit a batch of 5"));
        let _ = parts.handle(part(0, 2));
        let other = Request::ConvForwardPart {
            layer: 0,
            first: 2,
            batch: 5,
            x_u: declassify_residual(&Tensor::zeros(&[1, 3, 7, 7])),
            train: false,
        };
        assert!(error_of(parts.handle(other)).contains("does not belong to the batch"));
        // Sample 0 starts a new batch.
        let mut got = Vec::new();
        for (a, b) in [(0, 2), (2, 3), (3, 5)] {
            got.extend(out(parts.handle(part(a, b))));
        }
        assert_eq!(got, y);
    }

    #[test]
    fn a_backward_in_two_halves_gives_the_whole_backward_s_gradients() {
        let mut rng = asymml_core::rng::Rng::new(5);
        let mut t = |shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_vec(shape, (0..n).map(|_| rng.normal()).collect()).unwrap()
        };
        // A Winograd conv and an im2col one (stride 2).
        for l in [spec(3, 4, 3, 1, 1), spec(4, 6, 3, 2, 1)] {
            let w = t(&l.weight_shape());
            let x = t(&[3, l.in_ch as usize, 8, 8]);
            let (oh, _) = ConvLayer {
                in_ch: l.in_ch as usize,
                out_ch: l.out_ch as usize,
                k: 3,
                stride: l.stride as usize,
                pad: 1,
                bias: false,
            }
            .output_hw(8, 8)
            .unwrap();
            let dy = t(&[3, l.out_ch as usize, oh, oh]);
            let mut sv = Service::new(1).unwrap();
            let reg = Request::Register {
                layers: vec![l],
                weights: vec![(public_weights(&w), None)],
            };
            assert_eq!(sv.handle(reg), Reply::Ok);
            let fwd = Request::ConvForward {
                layer: 0,
                x_u: declassify_residual(&x),
                train: true,
            };
            sv.handle(fwd.clone()).into_conv_output(0).unwrap();
            let (dx, dw) = sv
                .handle(Request::ConvBackward {
                    layer: 0,
                    dy: declassify_output_grad(&dy),
                    need_dx: true,
                })
                .into_conv_grads(0)
                .unwrap();
            let half = Request::ConvInputGrad {
                layer: 0,
                dy: declassify_output_grad(&dy),
            };
            for _ in 0..2 {
                let got = sv.handle(half.clone()).into_input_grad(0).unwrap();
                assert_eq!(got.data(), dx.as_ref().unwrap().data());
                let got = sv
                    .handle(Request::ConvWeightGrad { layer: 0 })
                    .into_weight_grad(0)
                    .unwrap();
                assert_eq!(got.data(), dw.data());
                // ∇Y is let go with its ∇W_U: a second ConvWeightGrad is refused.
                let e = error_of(sv.handle(Request::ConvWeightGrad { layer: 0 }));
                assert!(e.contains("without a ConvInputGrad"), "{e}");
            }
            // A forward in between makes the kept ∇Y stale: it is let go.
            let _ = sv.handle(half.clone());
            sv.handle(fwd).into_conv_output(0).unwrap();
            let e = error_of(sv.handle(Request::ConvWeightGrad { layer: 0 }));
            assert!(e.contains("without a ConvInputGrad"), "{e}");
            // ∇Y of the wrong shape is refused, and nothing is kept.
            let bad = Request::ConvInputGrad {
                layer: 0,
                dy: declassify_output_grad(&Tensor::zeros(&[3, 1, oh, oh])),
            };
            assert!(error_of(sv.handle(bad)).contains("shape"));
            assert!(error_of(sv.handle(Request::ConvWeightGrad { layer: 0 })).contains("without"));
        }
        // With no training forward first, both halves are refused.
        let mut sv = Service::new(1).unwrap();
        assert_eq!(sv.handle(register(spec(3, 4, 3, 1, 1))), Reply::Ok);
        let half = Request::ConvInputGrad {
            layer: 0,
            dy: declassify_output_grad(&Tensor::zeros(&[1, 4, 8, 8])),
        };
        assert!(matches!(sv.handle(half), Reply::Error { .. }));
        assert!(matches!(
            sv.handle(Request::ConvWeightGrad { layer: 0 }),
            Reply::Error { .. }
        ));
    }

    #[test]
    fn work_over_the_budget_counts_the_kept_output_grad() {
        // X_U and ∇Y of [8, 16, 32, 32] are 512 KiB each: a forward needs what a whole backward with ∇X does
        // (the answer has the input's size), and the first half of a split backward 512 KiB more (∇Y kept).
        let l = spec(16, 16, 3, 1, 1);
        let needs = |e: String| -> u64 {
            let after = e.split("needs about ").nth(1).expect("a budget error");
            after.split(' ').next().unwrap().parse().unwrap()
        };
        let mut probe = service(1 << 20);
        assert_eq!(probe.handle(register(l)), Reply::Ok);
        let forward_needs = needs(error_of(probe.handle(forward(&[8, 16, 32, 32]))));
        let mut sv = service(forward_needs);
        assert_eq!(sv.handle(register(l)), Reply::Ok);
        sv.handle(forward(&[8, 16, 32, 32]))
            .into_conv_output(0)
            .unwrap();
        let dy = declassify_output_grad(&Tensor::zeros(&[8, 16, 32, 32]));
        let whole = Request::ConvBackward {
            layer: 0,
            dy: dy.clone(),
            need_dx: true,
        };
        sv.handle(whole).into_conv_grads(0).unwrap();
        let e = error_of(sv.handle(Request::ConvInputGrad { layer: 0, dy }));
        assert_eq!(needs(e), forward_needs + (512 << 10));
    }

    #[test]
    fn absurd_geometry_is_refused_before_anything_is_built() {
        let mut s = service(1 << 30);
        for (l, says) in [
            (spec(1, 1, 3, 1, 1_000_000), "padding"),
            (spec(1, 1, 3, 1, 3), "padding"),
            (spec(1, 1_000_000, 1, 1, 0), "channels"),
            (spec(100_000, 1, 1, 1, 0), "channels"),
            (spec(1, 1, 16, 1, 0), "kernel size"),
            (spec(1, 1, 3, 16, 0), "stride"),
            (spec(1, 1, 0, 1, 0), "positive"),
        ] {
            let e = error_of(s.handle(register(l)));
            assert!(e.contains(says), "{l:?}: {e}");
        }
        // Nothing was started for them.
        assert_eq!(s.describe(), "cpu");
        // A sane layer still registers and computes.
        assert!(matches!(s.handle(register(spec(2, 4, 3, 1, 1))), Reply::Ok));
        assert!(s.describe().starts_with("cpu ("), "{}", s.describe());
        assert!(matches!(
            s.handle(forward(&[1, 2, 5, 5])),
            Reply::ConvOutput { .. }
        ));
    }

    #[test]
    fn a_registration_without_weights_holds_zeros_until_set_weights() {
        let mut s = service(1 << 30);
        let l = spec(2, 3, 1, 1, 0);
        let no_weights = Request::Register {
            layers: vec![l],
            weights: Vec::new(),
        };
        assert!(matches!(s.handle(no_weights), Reply::Ok));
        let ones = |s: &mut Service| {
            let x = Tensor::from_vec(&[1, 2, 2, 2], vec![1.0; 8]).unwrap();
            let req = Request::ConvForward {
                layer: 0,
                x_u: declassify_residual(&x),
                train: false,
            };
            match s.handle(req) {
                Reply::ConvOutput { y_u, .. } => y_u.checked_data(&[1, 3, 2, 2]).unwrap().to_vec(),
                other => panic!("expected an output, got {}", other.describe()),
            }
        };
        assert!(ones(&mut s).iter().all(|&v| v == 0.0));
        let w = Tensor::from_vec(&[3, 2, 1, 1], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let set = Request::SetWeights {
            layer: 0,
            w: public_weights(&w),
            b: None,
        };
        assert!(matches!(s.handle(set), Reply::Ok));
        assert_eq!(
            ones(&mut s),
            [3.0, 3.0, 3.0, 3.0, 7.0, 7.0, 7.0, 7.0, 11.0, 11.0, 11.0, 11.0]
        );
        // Some weights but not one set per layer is still refused.
        let two = Request::Register {
            layers: vec![l, ConvLayerSpec { id: 1, ..l }],
            weights: vec![(public_weights(&Tensor::zeros(&[3, 2, 1, 1])), None)],
        };
        assert!(error_of(s.handle(two)).contains("one weight set per layer"));
    }

    #[test]
    fn work_over_the_budget_is_refused_and_the_session_goes_on() {
        let mut s = service(1 << 20);
        // A registration whose parameters alone exceed the budget.
        let e = error_of(s.handle(register(spec(256, 256, 3, 1, 1))));
        assert!(e.contains("budget of 1048576 bytes"), "{e}");
        assert!(matches!(
            s.handle(register(spec(1, 64, 1, 1, 0))),
            Reply::Ok
        ));
        // 64 output channels of 64×64: 1 MiB of output, held twice.
        let e = error_of(s.handle(forward(&[1, 1, 64, 64])));
        assert!(e.contains("over its budget"), "{e}");
        assert!(matches!(
            s.handle(forward(&[1, 1, 8, 8])),
            Reply::ConvOutput { .. }
        ));
        // Backward: ∇Y must have the output's shape.
        let bad = Request::ConvBackward {
            layer: 0,
            dy: declassify_output_grad(&Tensor::zeros(&[1, 64, 4, 4])),
            need_dx: true,
        };
        assert!(error_of(s.handle(bad)).contains("shape"));
        let good = Request::ConvBackward {
            layer: 0,
            dy: declassify_output_grad(&Tensor::zeros(&[1, 64, 8, 8])),
            need_dx: true,
        };
        assert!(matches!(
            s.handle(good),
            Reply::ConvGrads { dx: Some(_), .. }
        ));
    }

    #[test]
    fn requests_are_checked_against_the_registered_layer() {
        let mut s = service(1 << 30);
        assert!(error_of(s.handle(forward(&[1, 2, 5, 5]))).contains("no model registered"));
        assert!(matches!(s.handle(register(spec(2, 4, 3, 2, 0))), Reply::Ok));
        for (shape, says) in [
            (vec![1, 3, 5, 5], "input channels"),
            (vec![2, 5, 5], "[B, C, H, W]"),
            (vec![1, 2, 2, 2], "does not fit"),
        ] {
            let e = error_of(s.handle(forward(&shape)));
            assert!(e.contains(says), "{shape:?}: {e}");
        }
        let back = Request::ConvBackward {
            layer: 0,
            dy: declassify_output_grad(&Tensor::zeros(&[1, 4, 2, 2])),
            need_dx: false,
        };
        assert!(error_of(s.handle(back)).contains("no cached residual"));
        let shared = Request::ConvForwardShared {
            layer: 0,
            from_layer: 3,
            train: false,
        };
        assert!(error_of(s.handle(shared)).contains("unknown conv layer 3"));
    }

    #[test]
    fn sizes_overflowing_u64_are_refused() {
        let l = ConvLayer {
            in_ch: usize::MAX,
            out_ch: usize::MAX,
            k: 15,
            stride: 1,
            pad: 0,
            bias: true,
        };
        assert!(l.check_geometry().is_err());
        assert_eq!(l.params(), None);
        assert_eq!(l.output_hw(usize::MAX, 3), None);
        assert_eq!(l.scratch_bytes([usize::MAX, 1, 64, 64], 4), None);
    }
}
