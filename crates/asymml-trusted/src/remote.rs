//! `untrusted-only` mode — the "GPU-only" baseline, with no privacy: the whole network runs on the accelerator.
//! The raw input leaves through `declassify_input_untrusted_only`; the labels and the loss stay here (the
//! accelerator gets the gradient of the loss w.r.t. the logits).

use asymml_core::models::{Net, StateMut};
use asymml_core::optim::OptimizerKind;
use asymml_core::{CoreError, Tensor};
use asymml_protocol::OptimizerSpec;
use asymml_protocol::{
    declassify_input_untrusted_only, declassify_logit_grad, public_weights, Client, ProtocolError,
    Request, Transport,
};
use std::time::Instant;

/// A reply to `what` that failed validation (errors of the client's own calls name their request already).
fn bad_reply(what: &str, e: ProtocolError) -> CoreError {
    CoreError::accelerator(e.context(what))
}

/// The wire form of an optimizer configuration.
pub(crate) fn optimizer_spec(kind: OptimizerKind, weight_decay: f32) -> OptimizerSpec {
    match kind {
        OptimizerKind::Sgd { momentum, nesterov } => OptimizerSpec::Sgd {
            momentum,
            nesterov,
            weight_decay,
        },
        OptimizerKind::AdamW { beta1, beta2, eps } => OptimizerSpec::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        },
    }
}

/// The network, run remotely.
pub trait RemoteNet: Send {
    /// x: [B, C, H, W] → logits [B, K].
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor, CoreError>;
    /// Backward from ∇logits (accumulates the accelerator's gradients).
    fn backward(&mut self, dlogits: &Tensor) -> Result<(), CoreError>;
    /// One optimizer step of every parameter.
    fn step(&mut self, lr: f32) -> Result<(), CoreError>;
    /// Copies the accelerator's state dict into `net` (for checkpoints and weight files).
    fn sync(&mut self, net: &mut Net) -> Result<(), CoreError>;
    /// Seconds spent waiting for replies so far.
    fn wait_s(&self) -> f64;
}

/// A client of the accelerator's whole-network service.
pub struct RemoteClient<T: Transport> {
    client: Client<T>,
    logits_shape: Vec<usize>,
    wait_s: f64,
}

impl<T: Transport + Send> RemoteClient<T> {
    /// Connects and registers the network (spec and state dict) with the optimizer.
    pub fn connect(
        transport: T,
        net: &mut Net,
        optimizer: OptimizerKind,
        weight_decay: f32,
    ) -> Result<Self, CoreError> {
        let mut client = Client::connect(transport).map_err(CoreError::accelerator)?;
        let spec =
            serde_json::to_string(&net.spec).map_err(|e| CoreError::Invalid(e.to_string()))?;
        let mut state = Vec::new();
        net.visit_state(&mut |name, s| {
            let t = match s {
                StateMut::Tensor(t) => public_weights(t),
                StateMut::Counter(c) => public_weights(&Tensor {
                    shape: vec![],
                    data: vec![*c as f32],
                }),
            };
            state.push((name, t));
        });
        let optimizer = optimizer_spec(optimizer, weight_decay);
        client
            .call(&Request::RegisterNet {
                spec,
                state,
                optimizer,
            })
            .map_err(CoreError::accelerator)?
            .into_ok()
            .map_err(|e| bad_reply("RegisterNet", e))?;
        Ok(RemoteClient {
            client,
            logits_shape: Vec::new(),
            wait_s: 0.0,
        })
    }

    fn call(&mut self, req: &Request) -> Result<asymml_protocol::Reply, CoreError> {
        let t0 = Instant::now();
        let r = self.client.call(req).map_err(CoreError::accelerator);
        self.wait_s += t0.elapsed().as_secs_f64();
        r
    }
}

impl<T: Transport + Send> RemoteNet for RemoteClient<T> {
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor, CoreError> {
        let req = Request::NetForward {
            x: declassify_input_untrusted_only(x),
            train,
        };
        let logits = self
            .call(&req)?
            .into_net_output()
            .map_err(|e| bad_reply("NetForward", e))?;
        let shape = logits.shape().to_vec();
        if shape.len() != 2 || shape[0] != x.shape[0] {
            return Err(bad_reply(
                "NetForward",
                ProtocolError::Tensor(format!(
                    "logits of shape {shape:?} for a batch of {}",
                    x.shape[0]
                )),
            ));
        }
        self.logits_shape = shape.clone();
        logits
            .into_tensor_checked(&shape)
            .map_err(|e| bad_reply("NetForward", e))
    }

    fn backward(&mut self, dlogits: &Tensor) -> Result<(), CoreError> {
        let req = Request::NetBackward {
            dlogits: declassify_logit_grad(dlogits),
        };
        self.call(&req)?
            .into_ok()
            .map_err(|e| bad_reply("NetBackward", e))
    }

    fn step(&mut self, lr: f32) -> Result<(), CoreError> {
        self.call(&Request::Step { lr })?
            .into_ok()
            .map_err(|e| bad_reply("Step", e))
    }

    fn sync(&mut self, net: &mut Net) -> Result<(), CoreError> {
        let entries = self
            .call(&Request::FetchState)?
            .into_state()
            .map_err(|e| bad_reply("FetchState", e))?;
        let mut map: std::collections::HashMap<String, asymml_protocol::WireTensor> =
            entries.into_iter().collect();
        net.try_visit_state(&mut |name, s| {
            let what = format!("FetchState {name}");
            let t = map.remove(&name).ok_or_else(|| {
                bad_reply(
                    &what,
                    ProtocolError::Tensor("missing from the reply".into()),
                )
            })?;
            match s {
                StateMut::Tensor(dst) => {
                    let shape = dst.shape.clone();
                    t.copy_into_checked(&shape, dst)
                        .map_err(|e| bad_reply(&what, e))?;
                }
                StateMut::Counter(c) => *c = t.data().first().copied().unwrap_or(0.0) as i64,
            }
            Ok(())
        })
    }

    fn wait_s(&self) -> f64 {
        self.wait_s
    }
}
