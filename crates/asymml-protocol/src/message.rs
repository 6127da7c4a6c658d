//! The messages that cross the trust boundary.
//!
//! Conversation per convolution layer and batch: the trusted runtime sends `ConvForward` with the residual `X_U`
//! and gets `ConvOutput` with `Y_U = conv(X_U, W) (+ bias)`; it sends `ConvBackward` with `∇Y` and gets
//! `ConvGrads` with `∇X = conv_transpose(∇Y, W)` and `∇W_U = corr(X_U, ∇Y)` from the `X_U` the accelerator
//! cached. The trusted runtime checks both (Freivalds), adds its own `∇W_T`, applies the optimizer to its own,
//! authoritative copy of the weights and sends the new weights with `SetWeights`: the accelerator is never
//! trusted to update or report them.

use crate::declassify::WireTensor;
use crate::error::{ProtocolError, Result};

/// Version of the wire format; both sides must speak the same.
pub const PROTOCOL_VERSION: u32 = 2;

/// Default largest message body, in bytes (1 GiB). The handshake takes the minimum of both sides' values.
pub const MAX_MESSAGE: u32 = 1 << 30;

/// Largest tensor rank on the wire.
pub const MAX_RANK: usize = 8;

/// A convolution layer held by the accelerator. Weights have shape `[out_ch, in_ch, k, k]`, the bias `[out_ch]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvLayerSpec {
    pub id: u32,
    pub in_ch: u32,
    pub out_ch: u32,
    pub k: u32,
    pub stride: u32,
    pub pad: u32,
    pub bias: bool,
}

impl ConvLayerSpec {
    /// `[out_ch, in_ch, k, k]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_ch as usize,
            self.in_ch as usize,
            self.k as usize,
            self.k as usize,
        ]
    }

    /// `[out_ch]`.
    pub fn bias_shape(&self) -> [usize; 1] {
        [self.out_ch as usize]
    }
}

/// The optimizer of an `untrusted-only` network held by the accelerator (the learning rate comes with each
/// `Step`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerSpec {
    /// SGD with momentum, optional Nesterov, L2 weight decay.
    Sgd {
        momentum: f32,
        nesterov: bool,
        weight_decay: f32,
    },
    /// AdamW with decoupled weight decay.
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

/// A message from the trusted runtime to the accelerator.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// Opens the conversation: the protocol version and the largest message this side accepts.
    Hello { version: u32, max_message: u32 },
    /// The convolution layers and their public weights (and biases, one per layer in order). With no
    /// weights at all, every layer starts at zero and its weights follow with `SetWeights`, one layer per
    /// message (what the trusted runtime does: no message then holds more than one layer's weights).
    Register {
        layers: Vec<ConvLayerSpec>,
        weights: Vec<(WireTensor, Option<WireTensor>)>,
    },
    /// `Y_U = conv(X_U, W) (+ b)`; with `train` the accelerator keeps `X_U` for the weight gradient.
    ConvForward {
        layer: u32,
        x_u: WireTensor,
        train: bool,
    },
    /// One part of a batch's `ConvForward` (micro-batch pipelining): `x_u` holds samples `first ..
    /// first + x_u.shape[0]` of a batch of `batch` samples. Parts come in order and without gaps; the
    /// accelerator answers each with `ConvOutput` (`Y_U` of those samples) and, once the last has come, holds
    /// the whole batch's `X_U` as a `ConvForward` of it would (for the backward and a shortcut conv).
    ConvForwardPart {
        layer: u32,
        first: u32,
        batch: u32,
        x_u: WireTensor,
        train: bool,
    },
    /// Backward from `∇Y`: the accelerator returns `∇W_U` and, when `need_dx`, `∇X` (`ConvGrads`).
    ConvBackward {
        layer: u32,
        dy: WireTensor,
        need_dx: bool,
    },
    /// The first half of a `ConvBackward`, for a backward that overlaps the two sides: `∇X =
    /// conv_transpose(∇Y, W)` alone (`InputGrad`). The accelerator keeps `∇Y` for the layer's next
    /// `ConvWeightGrad`, so the trusted runtime goes on with `∇X` while `∇W_U` is still being computed.
    ConvInputGrad { layer: u32, dy: WireTensor },
    /// The second half: `∇W_U = corr(X_U, ∇Y)` (`WeightGrad`) from the layer's cached `X_U` and the `∇Y` of its
    /// last `ConvInputGrad`, which is then let go.
    ConvWeightGrad { layer: u32 },
    /// The layer's new weights (and bias), computed and owned by the trusted runtime.
    SetWeights {
        layer: u32,
        w: WireTensor,
        b: Option<WireTensor>,
    },
    /// `untrusted-only`: one optimizer step on the whole network, then the gradients are cleared.
    Step { lr: f32 },
    /// The current weights (and bias) of a layer.
    FetchWeights { layer: u32 },
    /// `Y_U` of `layer` computed on the residual already sent for `from_layer` (a ResNet shortcut conv reads
    /// its block's input, so its decomposition and its `X_U` transfer are shared with the block's first conv).
    ConvForwardShared {
        layer: u32,
        from_layer: u32,
        train: bool,
    },
    /// `untrusted-only` mode (no privacy): the whole network — its spec as JSON and its state dict — and the
    /// optimizer of every parameter.
    RegisterNet {
        spec: String,
        state: Vec<(String, WireTensor)>,
        optimizer: OptimizerSpec,
    },
    /// `untrusted-only`: the network's forward on the raw input, answered with `NetOutput` (the logits).
    NetForward { x: WireTensor, train: bool },
    /// `untrusted-only`: backward from the gradient of the loss w.r.t. the logits (the loss stays trusted).
    NetBackward { dlogits: WireTensor },
    /// `untrusted-only`: the network's state dict, answered with `State`.
    FetchState,
    /// Ends the conversation; the accelerator answers `Ok` and stops.
    Shutdown,
}

/// A message from the accelerator to the trusted runtime.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Accepts the handshake: the accelerator's version and the negotiated maximum message size.
    HelloAck { version: u32, max_message: u32 },
    /// Done (Register, SetWeights, Step, Shutdown).
    Ok,
    /// `Y_U` of a `ConvForward`.
    ConvOutput { layer: u32, y_u: WireTensor },
    /// `∇X` of a `ConvBackward` (`None` when it was not asked for) and `∇W_U = corr(X_U, ∇Y)`.
    ConvGrads {
        layer: u32,
        dx: Option<WireTensor>,
        dw: WireTensor,
    },
    /// `∇X` of a `ConvInputGrad`.
    InputGrad { layer: u32, dx: WireTensor },
    /// `∇W_U` of a `ConvWeightGrad`.
    WeightGrad { layer: u32, dw: WireTensor },
    /// The weights (and bias) of a layer as the accelerator holds them (`FetchWeights`; never believed by the
    /// trusted runtime, which owns the weights).
    Weights {
        layer: u32,
        w: WireTensor,
        b: Option<WireTensor>,
    },
    /// The request failed on the accelerator.
    Error { message: String },
    /// The logits of a `NetForward`.
    NetOutput { logits: WireTensor },
    /// The state dict of the network (`FetchState`).
    State { entries: Vec<(String, WireTensor)> },
}

/// The kind of a message, with its type byte on the wire. Requests use 0x01..=0x7f, replies 0x81..=0xff, so a
/// frame names its direction and new kinds can be added without changing the old ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Hello,
    Register,
    ConvForward,
    ConvForwardPart,
    ConvBackward,
    ConvInputGrad,
    ConvWeightGrad,
    SetWeights,
    Step,
    FetchWeights,
    Shutdown,
    ConvForwardShared,
    RegisterNet,
    NetForward,
    NetBackward,
    FetchState,
    NetOutput,
    State,
    HelloAck,
    Ok,
    ConvOutput,
    ConvGrads,
    InputGrad,
    WeightGrad,
    Weights,
    Error,
}

impl MessageKind {
    /// Every kind, requests first.
    pub const ALL: [MessageKind; 26] = [
        MessageKind::Hello,
        MessageKind::Register,
        MessageKind::ConvForward,
        MessageKind::ConvForwardPart,
        MessageKind::ConvBackward,
        MessageKind::ConvInputGrad,
        MessageKind::ConvWeightGrad,
        MessageKind::SetWeights,
        MessageKind::Step,
        MessageKind::FetchWeights,
        MessageKind::Shutdown,
        MessageKind::ConvForwardShared,
        MessageKind::RegisterNet,
        MessageKind::NetForward,
        MessageKind::NetBackward,
        MessageKind::FetchState,
        MessageKind::HelloAck,
        MessageKind::Ok,
        MessageKind::ConvOutput,
        MessageKind::ConvGrads,
        MessageKind::InputGrad,
        MessageKind::WeightGrad,
        MessageKind::Weights,
        MessageKind::Error,
        MessageKind::NetOutput,
        MessageKind::State,
    ];

    /// The type byte.
    pub fn code(self) -> u8 {
        match self {
            MessageKind::Hello => 0x01,
            MessageKind::Register => 0x02,
            MessageKind::ConvForward => 0x03,
            MessageKind::ConvBackward => 0x04,
            MessageKind::SetWeights => 0x05,
            MessageKind::Step => 0x06,
            MessageKind::FetchWeights => 0x07,
            MessageKind::Shutdown => 0x08,
            MessageKind::ConvForwardShared => 0x09,
            MessageKind::RegisterNet => 0x0b,
            MessageKind::NetForward => 0x0c,
            MessageKind::NetBackward => 0x0d,
            MessageKind::FetchState => 0x0e,
            MessageKind::ConvForwardPart => 0x0f,
            MessageKind::ConvInputGrad => 0x10,
            MessageKind::ConvWeightGrad => 0x11,
            MessageKind::NetOutput => 0x87,
            MessageKind::State => 0x88,
            MessageKind::InputGrad => 0x89,
            MessageKind::WeightGrad => 0x8a,
            MessageKind::HelloAck => 0x81,
            MessageKind::Ok => 0x82,
            MessageKind::ConvOutput => 0x83,
            MessageKind::ConvGrads => 0x84,
            MessageKind::Weights => 0x85,
            MessageKind::Error => 0x86,
        }
    }

    /// The kind of a type byte, if known.
    pub fn from_code(code: u8) -> Option<Self> {
        MessageKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// True for requests (trusted runtime → accelerator).
    pub fn is_request(self) -> bool {
        self.code() < 0x80
    }

    /// The variant name.
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Hello => "Hello",
            MessageKind::Register => "Register",
            MessageKind::ConvForward => "ConvForward",
            MessageKind::ConvForwardPart => "ConvForwardPart",
            MessageKind::ConvBackward => "ConvBackward",
            MessageKind::ConvInputGrad => "ConvInputGrad",
            MessageKind::ConvWeightGrad => "ConvWeightGrad",
            MessageKind::SetWeights => "SetWeights",
            MessageKind::Step => "Step",
            MessageKind::FetchWeights => "FetchWeights",
            MessageKind::Shutdown => "Shutdown",
            MessageKind::ConvForwardShared => "ConvForwardShared",
            MessageKind::RegisterNet => "RegisterNet",
            MessageKind::NetForward => "NetForward",
            MessageKind::NetBackward => "NetBackward",
            MessageKind::FetchState => "FetchState",
            MessageKind::NetOutput => "NetOutput",
            MessageKind::State => "State",
            MessageKind::HelloAck => "HelloAck",
            MessageKind::Ok => "Ok",
            MessageKind::ConvOutput => "ConvOutput",
            MessageKind::ConvGrads => "ConvGrads",
            MessageKind::InputGrad => "InputGrad",
            MessageKind::WeightGrad => "WeightGrad",
            MessageKind::Weights => "Weights",
            MessageKind::Error => "Error",
        }
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Request {
    /// The message kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Request::Hello { .. } => MessageKind::Hello,
            Request::Register { .. } => MessageKind::Register,
            Request::ConvForward { .. } => MessageKind::ConvForward,
            Request::ConvForwardPart { .. } => MessageKind::ConvForwardPart,
            Request::ConvBackward { .. } => MessageKind::ConvBackward,
            Request::ConvInputGrad { .. } => MessageKind::ConvInputGrad,
            Request::ConvWeightGrad { .. } => MessageKind::ConvWeightGrad,
            Request::SetWeights { .. } => MessageKind::SetWeights,
            Request::Step { .. } => MessageKind::Step,
            Request::FetchWeights { .. } => MessageKind::FetchWeights,
            Request::Shutdown => MessageKind::Shutdown,
            Request::ConvForwardShared { .. } => MessageKind::ConvForwardShared,
            Request::RegisterNet { .. } => MessageKind::RegisterNet,
            Request::NetForward { .. } => MessageKind::NetForward,
            Request::NetBackward { .. } => MessageKind::NetBackward,
            Request::FetchState => MessageKind::FetchState,
        }
    }

    /// The layer the request is about, if any.
    pub fn layer(&self) -> Option<u32> {
        match self {
            Request::ConvForward { layer, .. }
            | Request::ConvForwardPart { layer, .. }
            | Request::ConvBackward { layer, .. }
            | Request::ConvInputGrad { layer, .. }
            | Request::ConvWeightGrad { layer }
            | Request::SetWeights { layer, .. }
            | Request::FetchWeights { layer }
            | Request::ConvForwardShared { layer, .. } => Some(*layer),
            _ => None,
        }
    }

    /// A short description for error messages, e.g. `ConvForward(layer 3)`.
    pub fn describe(&self) -> String {
        describe(self.kind(), self.layer())
    }

    /// The tensors the request carries, with their field names (`x_u`, `dy`, `w`, `b`).
    pub fn tensors(&self) -> Vec<(&'static str, &WireTensor)> {
        match self {
            Request::Register { weights, .. } => weights
                .iter()
                .flat_map(|(w, b)| std::iter::once(("w", w)).chain(b.iter().map(|b| ("b", b))))
                .collect(),
            Request::ConvForward { x_u, .. } | Request::ConvForwardPart { x_u, .. } => {
                vec![("x_u", x_u)]
            }
            Request::ConvBackward { dy, .. } | Request::ConvInputGrad { dy, .. } => {
                vec![("dy", dy)]
            }
            Request::SetWeights { w, b, .. } => std::iter::once(("w", w))
                .chain(b.iter().map(|b| ("b", b)))
                .collect(),
            Request::RegisterNet { state, .. } => state.iter().map(|(_, t)| ("state", t)).collect(),
            Request::NetForward { x, .. } => vec![("x", x)],
            Request::NetBackward { dlogits } => vec![("dlogits", dlogits)],
            _ => Vec::new(),
        }
    }

    /// The tensors the request carries, by value, with their field names.
    pub fn into_tensors(self) -> Vec<(&'static str, WireTensor)> {
        match self {
            Request::Register { weights, .. } => weights
                .into_iter()
                .flat_map(|(w, b)| std::iter::once(("w", w)).chain(b.map(|b| ("b", b))))
                .collect(),
            Request::ConvForward { x_u, .. } | Request::ConvForwardPart { x_u, .. } => {
                vec![("x_u", x_u)]
            }
            Request::ConvBackward { dy, .. } | Request::ConvInputGrad { dy, .. } => {
                vec![("dy", dy)]
            }
            Request::SetWeights { w, b, .. } => std::iter::once(("w", w))
                .chain(b.map(|b| ("b", b)))
                .collect(),
            Request::RegisterNet { state, .. } => {
                state.into_iter().map(|(_, t)| ("state", t)).collect()
            }
            Request::NetForward { x, .. } => vec![("x", x)],
            Request::NetBackward { dlogits } => vec![("dlogits", dlogits)],
            _ => Vec::new(),
        }
    }
}

impl Reply {
    /// An error reply.
    pub fn error(message: impl Into<String>) -> Self {
        Reply::Error {
            message: message.into(),
        }
    }

    /// The message kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Reply::HelloAck { .. } => MessageKind::HelloAck,
            Reply::Ok => MessageKind::Ok,
            Reply::ConvOutput { .. } => MessageKind::ConvOutput,
            Reply::ConvGrads { .. } => MessageKind::ConvGrads,
            Reply::InputGrad { .. } => MessageKind::InputGrad,
            Reply::WeightGrad { .. } => MessageKind::WeightGrad,
            Reply::Weights { .. } => MessageKind::Weights,
            Reply::Error { .. } => MessageKind::Error,
            Reply::NetOutput { .. } => MessageKind::NetOutput,
            Reply::State { .. } => MessageKind::State,
        }
    }

    /// The layer the reply is about, if any.
    pub fn layer(&self) -> Option<u32> {
        match self {
            Reply::ConvOutput { layer, .. }
            | Reply::ConvGrads { layer, .. }
            | Reply::InputGrad { layer, .. }
            | Reply::WeightGrad { layer, .. }
            | Reply::Weights { layer, .. } => Some(*layer),
            _ => None,
        }
    }

    /// A short description for error messages, e.g. `ConvOutput(layer 3)`.
    pub fn describe(&self) -> String {
        describe(self.kind(), self.layer())
    }

    /// The tensors the reply carries, with their field names (`y_u`, `dx`, `dw`, `w`, `b`).
    pub fn tensors(&self) -> Vec<(&'static str, &WireTensor)> {
        match self {
            Reply::ConvOutput { y_u, .. } => vec![("y_u", y_u)],
            Reply::InputGrad { dx, .. } => vec![("dx", dx)],
            Reply::WeightGrad { dw, .. } => vec![("dw", dw)],
            Reply::ConvGrads { dx, dw, .. } => dx
                .iter()
                .map(|d| ("dx", d))
                .chain(std::iter::once(("dw", dw)))
                .collect(),
            Reply::Weights { w, b, .. } => std::iter::once(("w", w))
                .chain(b.iter().map(|b| ("b", b)))
                .collect(),
            Reply::NetOutput { logits } => vec![("logits", logits)],
            Reply::State { entries } => entries.iter().map(|(_, t)| ("state", t)).collect(),
            _ => Vec::new(),
        }
    }

    /// The tensors the reply carries, by value, with their field names.
    pub fn into_tensors(self) -> Vec<(&'static str, WireTensor)> {
        match self {
            Reply::ConvOutput { y_u, .. } => vec![("y_u", y_u)],
            Reply::InputGrad { dx, .. } => vec![("dx", dx)],
            Reply::WeightGrad { dw, .. } => vec![("dw", dw)],
            Reply::ConvGrads { dx, dw, .. } => dx
                .into_iter()
                .map(|d| ("dx", d))
                .chain(std::iter::once(("dw", dw)))
                .collect(),
            Reply::Weights { w, b, .. } => std::iter::once(("w", w))
                .chain(b.map(|b| ("b", b)))
                .collect(),
            Reply::NetOutput { logits } => vec![("logits", logits)],
            Reply::State { entries } => entries.into_iter().map(|(_, t)| ("state", t)).collect(),
            _ => Vec::new(),
        }
    }

    /// `Ok(())` for `Reply::Ok`; an error naming what came otherwise.
    pub fn into_ok(self) -> Result<()> {
        match self {
            Reply::Ok => Ok(()),
            other => Err(unexpected("Ok", other)),
        }
    }

    /// `Y_U` of a `ConvOutput` for `layer`; an error naming what came otherwise.
    pub fn into_conv_output(self, layer: u32) -> Result<WireTensor> {
        match self {
            Reply::ConvOutput { layer: l, y_u } if l == layer => Ok(y_u),
            other => Err(unexpected(
                &describe(MessageKind::ConvOutput, Some(layer)),
                other,
            )),
        }
    }

    /// (`∇X`, `∇W_U`) of a `ConvGrads` for `layer`; an error naming what came otherwise.
    pub fn into_conv_grads(self, layer: u32) -> Result<(Option<WireTensor>, WireTensor)> {
        match self {
            Reply::ConvGrads { layer: l, dx, dw } if l == layer => Ok((dx, dw)),
            other => Err(unexpected(
                &describe(MessageKind::ConvGrads, Some(layer)),
                other,
            )),
        }
    }

    /// `∇X` of an `InputGrad` for `layer`; an error naming what came otherwise.
    pub fn into_input_grad(self, layer: u32) -> Result<WireTensor> {
        match self {
            Reply::InputGrad { layer: l, dx } if l == layer => Ok(dx),
            other => Err(unexpected(
                &describe(MessageKind::InputGrad, Some(layer)),
                other,
            )),
        }
    }

    /// `∇W_U` of a `WeightGrad` for `layer`; an error naming what came otherwise.
    pub fn into_weight_grad(self, layer: u32) -> Result<WireTensor> {
        match self {
            Reply::WeightGrad { layer: l, dw } if l == layer => Ok(dw),
            other => Err(unexpected(
                &describe(MessageKind::WeightGrad, Some(layer)),
                other,
            )),
        }
    }

    /// The logits of a `NetOutput` reply; an error naming what came otherwise.
    pub fn into_net_output(self) -> Result<WireTensor> {
        match self {
            Reply::NetOutput { logits } => Ok(logits),
            other => Err(unexpected("NetOutput", other)),
        }
    }

    /// The entries of a `State` reply; an error naming what came otherwise.
    pub fn into_state(self) -> Result<Vec<(String, WireTensor)>> {
        match self {
            Reply::State { entries } => Ok(entries),
            other => Err(unexpected("State", other)),
        }
    }

    /// Weights and bias of a `Weights` reply for `layer`; an error naming what came otherwise.
    pub fn into_weights(self, layer: u32) -> Result<(WireTensor, Option<WireTensor>)> {
        match self {
            Reply::Weights { layer: l, w, b } if l == layer => Ok((w, b)),
            other => Err(unexpected(
                &describe(MessageKind::Weights, Some(layer)),
                other,
            )),
        }
    }
}

fn unexpected(expected: &str, got: Reply) -> ProtocolError {
    match got {
        Reply::Error { message } => ProtocolError::Remote(message),
        other => ProtocolError::UnexpectedReply {
            expected: expected.to_string(),
            got: other.describe(),
        },
    }
}

fn describe(kind: MessageKind, layer: Option<u32>) -> String {
    match layer {
        Some(l) => format!("{kind}(layer {l})"),
        None => kind.name().to_string(),
    }
}

/// A request or a reply: what a frame holds, told apart by its type byte.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Request(Request),
    Reply(Reply),
}

impl Message {
    /// The message kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Request(r) => r.kind(),
            Message::Reply(r) => r.kind(),
        }
    }

    /// The layer the message is about, if any.
    pub fn layer(&self) -> Option<u32> {
        match self {
            Message::Request(r) => r.layer(),
            Message::Reply(r) => r.layer(),
        }
    }

    /// The tensors the message carries, by value, with their field names.
    pub fn into_tensors(self) -> Vec<(&'static str, WireTensor)> {
        match self {
            Message::Request(r) => r.into_tensors(),
            Message::Reply(r) => r.into_tensors(),
        }
    }
}
