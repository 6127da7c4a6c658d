//! The binary encoding of messages.
//!
//! A frame is a `u32` little-endian body length followed by the body: one type byte (see [`MessageKind::code`])
//! and the fields in order, little-endian. Scalars: `u32`, `f32`, `bool` as one byte 0/1. A string is a `u32`
//! byte length and UTF-8 bytes. An `Option<T>` is a byte 0 (none) or 1 followed by `T`. A list is a `u32` count
//! followed by the items. A tensor is a `u8` rank (at most [`MAX_RANK`]), `rank` `u32` dimensions, then the
//! row-major values as little-endian `f32` (bulk-copied: a single memcpy on little-endian hosts).
//!
//! | type | message        | fields                                                                      |
//! |------|----------------|-----------------------------------------------------------------------------|
//! | 0x01 | Hello          | version u32, max_message u32                                                |
//! | 0x02 | Register       | layers [id, in_ch, out_ch, k, stride, pad u32, bias bool], weights [tensor, Option tensor] |
//! | 0x03 | ConvForward    | layer u32, x_u tensor, train bool                                           |
//! | 0x04 | ConvBackward   | layer u32, dy tensor, need_dx bool                                          |
//! | 0x05 | SetWeights     | layer u32, w tensor, b Option tensor                                        |
//! | 0x06 | Step           | lr f32                                                                      |
//! | 0x07 | FetchWeights   | layer u32                                                                   |
//! | 0x08 | Shutdown       |                                                                             |
//! | 0x09 | ConvForwardShared | layer u32, from_layer u32, train bool                                   |
//! | 0x0f | ConvForwardPart | layer u32, first u32, batch u32, x_u tensor, train bool                   |
//! | 0x10 | ConvInputGrad  | layer u32, dy tensor                                                        |
//! | 0x11 | ConvWeightGrad | layer u32                                                                   |
//! | 0x81 | HelloAck       | version u32, max_message u32                                                |
//! | 0x82 | Ok             |                                                                             |
//! | 0x83 | ConvOutput     | layer u32, y_u tensor                                                       |
//! | 0x84 | ConvGrads      | layer u32, dx Option tensor, dw tensor                                      |
//! | 0x85 | Weights        | layer u32, w tensor, b Option tensor                                        |
//! | 0x86 | Error          | message string                                                              |
//! | 0x89 | InputGrad      | layer u32, dx tensor                                                        |
//! | 0x8a | WeightGrad     | layer u32, dw tensor                                                        |
//!
//! The optimizer is a byte 0 (SGD: momentum f32, nesterov bool, weight_decay f32) or 1 (AdamW: beta1, beta2,
//! eps, weight_decay f32).
//!
//! Decoding is total: every malformed input gives a [`ProtocolError`] naming the fault, and no allocation is
//! larger than the bytes that justify it.

use crate::declassify::{ReceivedTensor, WireTensor};
use crate::error::{ProtocolError, Result};
use crate::message::{
    ConvLayerSpec, Message, MessageKind, OptimizerSpec, Reply, Request, MAX_RANK,
};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

const OPT_SGD: u8 = 0;
const OPT_ADAMW: u8 = 1;

// ---------------------------------------------------------------------------------------------------------------
// Encoding

/// Encodes `req` as a complete frame (length prefix included) into `buf`, replacing its contents and reusing its
/// allocation. Errors when a tensor cannot be encoded or the body would exceed `max_message`.
pub fn encode_request(req: &Request, max_message: u32, buf: &mut Vec<u8>) -> Result<()> {
    let body = request_body_len(req)?;
    let mut w = Writer::start(buf, body, max_message)?;
    w.u8(req.kind().code());
    match req {
        Request::Hello {
            version,
            max_message,
        } => {
            w.u32(*version);
            w.u32(*max_message);
        }
        Request::Register { layers, weights } => {
            w.count(layers.len(), "layers")?;
            for l in layers {
                w.u32(l.id);
                w.u32(l.in_ch);
                w.u32(l.out_ch);
                w.u32(l.k);
                w.u32(l.stride);
                w.u32(l.pad);
                w.bool(l.bias);
            }
            w.count(weights.len(), "weights")?;
            for (wt, b) in weights {
                w.tensor(wt);
                w.opt_tensor(b.as_ref());
            }
        }
        Request::ConvForward { layer, x_u, train } => {
            w.u32(*layer);
            w.tensor(x_u);
            w.bool(*train);
        }
        Request::ConvForwardPart {
            layer,
            first,
            batch,
            x_u,
            train,
        } => {
            w.u32(*layer);
            w.u32(*first);
            w.u32(*batch);
            w.tensor(x_u);
            w.bool(*train);
        }
        Request::ConvBackward { layer, dy, need_dx } => {
            w.u32(*layer);
            w.tensor(dy);
            w.bool(*need_dx);
        }
        Request::ConvInputGrad { layer, dy } => {
            w.u32(*layer);
            w.tensor(dy);
        }
        Request::ConvWeightGrad { layer } => w.u32(*layer),
        Request::SetWeights { layer, w: wt, b } => {
            w.u32(*layer);
            w.tensor(wt);
            w.opt_tensor(b.as_ref());
        }
        Request::Step { lr } => w.f32(*lr),
        Request::FetchWeights { layer } => w.u32(*layer),
        Request::Shutdown => {}
        Request::ConvForwardShared {
            layer,
            from_layer,
            train,
        } => {
            w.u32(*layer);
            w.u32(*from_layer);
            w.bool(*train);
        }
        Request::RegisterNet {
            spec,
            state,
            optimizer,
        } => {
            w.string(spec, "spec")?;
            w.named_tensors(state)?;
            w.optimizer(optimizer);
        }
        Request::NetForward { x, train } => {
            w.tensor(x);
            w.bool(*train);
        }
        Request::NetBackward { dlogits } => w.tensor(dlogits),
        Request::FetchState => {}
    }
    w.finish();
    Ok(())
}

/// Encodes `rep` as a complete frame (length prefix included) into `buf`, replacing its contents and reusing its
/// allocation. Errors when a tensor cannot be encoded or the body would exceed `max_message`.
pub fn encode_reply(rep: &Reply, max_message: u32, buf: &mut Vec<u8>) -> Result<()> {
    let body = reply_body_len(rep)?;
    let mut w = Writer::start(buf, body, max_message)?;
    w.u8(rep.kind().code());
    match rep {
        Reply::HelloAck {
            version,
            max_message,
        } => {
            w.u32(*version);
            w.u32(*max_message);
        }
        Reply::Ok => {}
        Reply::ConvOutput { layer, y_u } => {
            w.u32(*layer);
            w.tensor(y_u);
        }
        Reply::ConvGrads { layer, dx, dw } => {
            w.u32(*layer);
            w.opt_tensor(dx.as_ref());
            w.tensor(dw);
        }
        Reply::InputGrad { layer, dx: t } | Reply::WeightGrad { layer, dw: t } => {
            w.u32(*layer);
            w.tensor(t);
        }
        Reply::Weights { layer, w: wt, b } => {
            w.u32(*layer);
            w.tensor(wt);
            w.opt_tensor(b.as_ref());
        }
        Reply::Error { message } => w.string(message, "error message")?,
        Reply::NetOutput { logits } => w.tensor(logits),
        Reply::State { entries } => w.named_tensors(entries)?,
    }
    w.finish();
    Ok(())
}

/// Body length (type byte included, length prefix excluded) of the encoded request; checks that every tensor is
/// encodable.
pub fn request_body_len(req: &Request) -> Result<u64> {
    let tensors: u64 = req
        .tensors()
        .iter()
        .map(|(_, t)| tensor_len(t))
        .sum::<Result<u64>>()?;
    let fixed: u64 = match req {
        Request::Hello { .. } => 8,
        Request::Register { layers, weights } => {
            // Per layer six u32 and a bool; per weight entry an option tag (tensors are counted above).
            4 + 25 * layers.len() as u64 + 4 + weights.len() as u64
        }
        Request::ConvForward { .. } | Request::ConvBackward { .. } => 5,
        Request::ConvForwardPart { .. } => 13,
        Request::SetWeights { .. } => 5,
        Request::Step { .. }
        | Request::FetchWeights { .. }
        | Request::ConvInputGrad { .. }
        | Request::ConvWeightGrad { .. } => 4,
        Request::Shutdown => 0,
        Request::ConvForwardShared { .. } => 9,
        Request::RegisterNet {
            spec,
            state,
            optimizer,
        } => 4 + spec.len() as u64 + names_len(state) + opt_len(optimizer),
        Request::NetForward { .. } => 1,
        Request::NetBackward { .. } | Request::FetchState => 0,
    };
    Ok(1 + fixed + tensors)
}

/// Body length (type byte included, length prefix excluded) of the encoded reply; checks that every tensor is
/// encodable.
pub fn reply_body_len(rep: &Reply) -> Result<u64> {
    let tensors: u64 = rep
        .tensors()
        .iter()
        .map(|(_, t)| tensor_len(t))
        .sum::<Result<u64>>()?;
    let fixed: u64 = match rep {
        Reply::HelloAck { .. } => 8,
        Reply::Ok => 0,
        Reply::ConvOutput { .. } | Reply::InputGrad { .. } | Reply::WeightGrad { .. } => 4,
        Reply::ConvGrads { .. } => 5,
        Reply::Weights { .. } => 5,
        Reply::Error { message } => 4 + message.len() as u64,
        Reply::NetOutput { .. } => 0,
        Reply::State { entries } => names_len(entries),
    };
    Ok(1 + fixed + tensors)
}

/// Encoded size of an optimizer spec.
fn opt_len(o: &OptimizerSpec) -> u64 {
    match o {
        OptimizerSpec::Sgd { .. } => 1 + 4 + 1 + 4,
        OptimizerSpec::AdamW { .. } => 1 + 4 * 4,
    }
}

/// Encoded size of a named tensor list without the tensors themselves (counted separately): the count and
/// each name with its length.
fn names_len(entries: &[(String, WireTensor)]) -> u64 {
    4 + entries.iter().map(|(n, _)| 4 + n.len() as u64).sum::<u64>()
}

/// Encoded size of a tensor; errors on a rank above [`MAX_RANK`] or a dimension above `u32::MAX`.
fn tensor_len(t: &WireTensor) -> Result<u64> {
    let n = shape_values(t.shape())?;
    if n != t.len() as u64 {
        return Err(ProtocolError::Encode(format!(
            "tensor of shape {:?} needs {n} values, holds {}",
            t.shape(),
            t.len()
        )));
    }
    Ok(1 + 4 * t.shape().len() as u64 + 4 * n)
}

/// The number of values of a tensor of `shape`; errors on a rank above [`MAX_RANK`], a dimension above
/// `u32::MAX` or an overflow.
fn shape_values(shape: &[usize]) -> Result<u64> {
    if shape.len() > MAX_RANK {
        return Err(ProtocolError::Encode(format!(
            "tensor of shape {shape:?} has rank {} > {MAX_RANK}",
            shape.len()
        )));
    }
    if let Some(d) = shape.iter().find(|&&d| u32::try_from(d).is_err()) {
        return Err(ProtocolError::Encode(format!(
            "tensor of shape {shape:?}: dimension {d} exceeds u32::MAX"
        )));
    }
    shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .ok_or_else(|| ProtocolError::Encode(format!("tensor of shape {shape:?} overflows")))
}

/// Starts, in `buf`, the frame of a `ConvForward`, a `ConvBackward` or a `ConvInputGrad` of `layer` whose
/// tensor has `shape`: the bytes [`encode_request`] gives for that request up to the tensor's values, in a
/// buffer whose capacity holds the whole frame (the values, then the request's one flag byte where it has one:
/// `train` or `need_dx`). Gives where the values start (`buf.len()`) and how many there are; the caller writes
/// the rest in place (`TensorFrame`).
pub(crate) fn encode_tensor_request(
    kind: MessageKind,
    layer: u32,
    shape: &[usize],
    max_message: u32,
    buf: &mut Vec<u8>,
) -> Result<(usize, usize)> {
    let flag = match kind {
        MessageKind::ConvForward | MessageKind::ConvBackward => 1,
        MessageKind::ConvInputGrad => 0,
        _ => {
            return Err(ProtocolError::Misuse(format!(
                "{kind} is not written in place"
            )))
        }
    };
    // n < 2^64 / 8 whenever the frame fits a u32 body: larger ones saturate and are refused by `start`.
    let n = shape_values(shape)?.min(u64::MAX / 8);
    let body = (4 * n).saturating_add(6 + flag + 4 * shape.len() as u64);
    let mut w = Writer::start(buf, body, max_message)?;
    w.u8(kind.code());
    w.u32(layer);
    w.u8(shape.len() as u8);
    for &d in shape {
        w.u32(d as u32);
    }
    // n ≤ body ≤ max_message: it fits usize.
    Ok((w.buf.len(), n as usize))
}

struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    expected_end: usize,
}

impl<'a> Writer<'a> {
    fn start(buf: &'a mut Vec<u8>, body: u64, max_message: u32) -> Result<Self> {
        if body > u64::from(max_message) {
            return Err(ProtocolError::TooLarge {
                len: body,
                max: u64::from(max_message),
            });
        }
        // body <= max_message <= u32::MAX, so it fits the prefix and usize.
        let body32 = body as u32;
        buf.clear();
        if buf.capacity() < LEN_PREFIX + body as usize {
            // A fresh buffer: growing the old one would copy its stale bytes.
            *buf = Vec::with_capacity(LEN_PREFIX + body as usize);
        }
        buf.extend_from_slice(&body32.to_le_bytes());
        Ok(Writer {
            expected_end: LEN_PREFIX + body as usize,
            buf,
        })
    }

    fn finish(self) {
        debug_assert_eq!(
            self.buf.len(),
            self.expected_end,
            "body length precomputed wrongly"
        );
    }

    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn f32(&mut self, v: f32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn count(&mut self, n: usize, what: &str) -> Result<()> {
        let n = u32::try_from(n)
            .map_err(|_| ProtocolError::Encode(format!("{what}: {n} items exceed u32::MAX")))?;
        self.u32(n);
        Ok(())
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// Writes a tensor whose rank and dims [`tensor_len`] has checked.
    fn tensor(&mut self, t: &WireTensor) {
        self.u8(t.shape().len() as u8);
        for &d in t.shape() {
            self.u32(d as u32);
        }
        put_f32s(self.buf, t.data());
    }

    fn string(&mut self, s: &str, what: &str) -> Result<()> {
        self.count(s.len(), what)?;
        self.bytes(s.as_bytes());
        Ok(())
    }

    fn named_tensors(&mut self, entries: &[(String, WireTensor)]) -> Result<()> {
        self.count(entries.len(), "named tensors")?;
        for (name, t) in entries {
            self.string(name, "tensor name")?;
            self.tensor(t);
        }
        Ok(())
    }

    fn optimizer(&mut self, optimizer: &OptimizerSpec) {
        match *optimizer {
            OptimizerSpec::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                self.u8(OPT_SGD);
                self.f32(momentum);
                self.bool(nesterov);
                self.f32(weight_decay);
            }
            OptimizerSpec::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                self.u8(OPT_ADAMW);
                self.f32(beta1);
                self.f32(beta2);
                self.f32(eps);
                self.f32(weight_decay);
            }
        }
    }

    fn opt_tensor(&mut self, t: Option<&WireTensor>) {
        match t {
            None => self.u8(0),
            Some(t) => {
                self.u8(1);
                self.tensor(t);
            }
        }
    }
}

/// Values per thread below which a tensor is copied in or out of a frame on one thread.
const PAR_VALUES: usize = 1 << 20;

thread_local! {
    static COPY_THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}

/// Lets this thread's encoding and decoding copy a large tensor on up to `n` threads (at most
/// [`MAX_COPY_THREADS`](asymml_core::chunks::MAX_COPY_THREADS); the default is 1: the calling thread alone).
/// Each side sets its own thread budget here (`--threads` for the trusted runtime, the accelerator's for its
/// service), so that a copy never takes more cores than its side was given.
pub fn set_copy_threads(n: usize) {
    COPY_THREADS.with(|c| c.set(n.clamp(1, asymml_core::chunks::MAX_COPY_THREADS)));
}

/// This thread's [`set_copy_threads`].
fn copy_threads() -> usize {
    COPY_THREADS.with(|c| c.get())
}

/// Appends the values as little-endian f32: on a little-endian host a plain copy, on several threads when
/// the tensor is large and this thread may (a VGG16 step at 224 px and batch 32 sends about a gigabyte of
/// residuals).
fn put_f32s(buf: &mut Vec<u8>, data: &[f32]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 is 4 plain bytes without padding, every byte is initialised, u8 has alignment 1 and the
        // slice covers exactly the memory of `data`. On a little-endian host these are the wire bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        };
        let start = buf.len();
        buf.reserve(bytes.len());
        asymml_core::chunks::zip_parts(
            &mut buf.spare_capacity_mut()[..bytes.len()],
            bytes,
            copy_threads(),
            4 * PAR_VALUES,
            |d, v| {
                // SAFETY: `d` and `v` have the same length (matching parts of equal lengths), `d` is spare
                // capacity of `buf` (writable, apart from `data`), and MaybeUninit<u8> has u8's layout.
                unsafe {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), d.as_mut_ptr().cast::<u8>(), v.len())
                }
            },
        );
        // SAFETY: the parts above initialised every byte of `start .. start + bytes.len()`, within capacity.
        unsafe { buf.set_len(start + bytes.len()) };
    }
    #[cfg(not(target_endian = "little"))]
    for v in data {
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// Reads one little-endian f32 from each 4-byte word (one value per word, so the length is right by
/// construction), on several threads when the tensor is large and this thread may. Safe code: the compiler
/// turns each part into a plain copy on a little-endian host.
fn get_f32s(words: &[[u8; 4]]) -> Vec<f32> {
    let threads = copy_threads();
    if asymml_core::chunks::parts(words.len(), threads, PAR_VALUES) == 1 {
        return words.iter().map(|&w| f32::from_le_bytes(w)).collect();
    }
    let mut out = vec![0f32; words.len()];
    asymml_core::chunks::zip_parts(&mut out, words, threads, PAR_VALUES, |d, w| {
        for (x, &b) in d.iter_mut().zip(w) {
            *x = f32::from_le_bytes(b);
        }
    });
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Decoding

/// The body of a frame (after the length prefix), after checking the prefix against `max_message` and against
/// the bytes that follow it.
pub fn frame_body(frame: &[u8], max_message: u32) -> Result<&[u8]> {
    if frame.len() < LEN_PREFIX {
        return Err(ProtocolError::Truncated {
            what: "length prefix".into(),
            needed: LEN_PREFIX as u64,
            available: frame.len() as u64,
        });
    }
    let prefix = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
    if prefix > max_message {
        return Err(ProtocolError::TooLarge {
            len: u64::from(prefix),
            max: u64::from(max_message),
        });
    }
    let body = &frame[LEN_PREFIX..];
    if body.len() as u64 != u64::from(prefix) {
        return Err(ProtocolError::LengthMismatch {
            prefix: u64::from(prefix),
            actual: body.len() as u64,
        });
    }
    Ok(body)
}

/// Decodes a request frame (length prefix included). A reply's type byte is refused before its fields are read.
pub fn decode_request(frame: &[u8], max_message: u32) -> Result<Request> {
    match decode_family(frame, max_message, Some(true))? {
        Message::Request(r) => Ok(r),
        Message::Reply(_) => unreachable!("reply type bytes are refused first"),
    }
}

/// Decodes a reply frame (length prefix included). A request's type byte is refused before its fields are read.
pub fn decode_reply(frame: &[u8], max_message: u32) -> Result<Reply> {
    match decode_family(frame, max_message, Some(false))? {
        Message::Reply(r) => Ok(r),
        Message::Request(_) => unreachable!("request type bytes are refused first"),
    }
}

/// Decodes a request or a reply frame (length prefix included), telling them apart by the type byte.
pub fn decode_message(frame: &[u8], max_message: u32) -> Result<Message> {
    decode_family(frame, max_message, None)
}

fn decode_family(frame: &[u8], max_message: u32, want_request: Option<bool>) -> Result<Message> {
    let body = frame_body(frame, max_message)?;
    let family = match want_request {
        Some(true) => "request",
        Some(false) => "reply",
        None => "message",
    };
    if let Some(&code) = body.first() {
        match MessageKind::from_code(code) {
            Some(k) if want_request.is_none_or(|w| w == k.is_request()) => {}
            _ => return Err(ProtocolError::UnknownType { family, byte: code }),
        }
    }
    decode_body(body)
}

/// A `ConvOutput` reply frame (length prefix included) decoded without copying its values: the layer and `Y_U`
/// as a view of the frame. `Ok(None)` when the frame holds another reply (for [`decode_reply`] to decode, and
/// the caller to refuse); any malformed `ConvOutput` is the same error [`decode_reply`] gives.
pub fn decode_conv_output_view(
    frame: &[u8],
    max_message: u32,
) -> Result<Option<(u32, ReceivedTensor<'_>)>> {
    let body = frame_body(frame, max_message)?;
    if body.first() != Some(&MessageKind::ConvOutput.code()) {
        return Ok(None);
    }
    let mut r = Reader { buf: body, pos: 1 };
    let layer = r.u32("ConvOutput.layer")?;
    let (shape, words) = r.tensor_words("y_u")?;
    if r.remaining() != 0 {
        return Err(ProtocolError::TrailingBytes {
            count: r.remaining(),
            message: MessageKind::ConvOutput.name(),
        });
    }
    Ok(Some((layer, ReceivedTensor::from_frame(shape, words))))
}

/// The gradients of a backward reply, as views of its frame (see [`decode_grads_view`]).
pub struct GradsView<'a> {
    pub layer: u32,
    /// `∇X`, when the reply holds it.
    pub dx: Option<ReceivedTensor<'a>>,
    /// `∇W_U`, when the reply holds it.
    pub dw: Option<ReceivedTensor<'a>>,
}

/// A `kind` reply frame (`ConvGrads`, `InputGrad` or `WeightGrad`) decoded without copying its values: the
/// layer and its gradients as views of the frame. `Ok(None)` when the frame holds another reply, as for
/// [`decode_conv_output_view`].
pub fn decode_grads_view(
    frame: &[u8],
    kind: MessageKind,
    max_message: u32,
) -> Result<Option<GradsView<'_>>> {
    if !matches!(
        kind,
        MessageKind::ConvGrads | MessageKind::InputGrad | MessageKind::WeightGrad
    ) {
        return Err(ProtocolError::Misuse(format!("{kind} holds no gradients")));
    }
    let body = frame_body(frame, max_message)?;
    if body.first() != Some(&kind.code()) {
        return Ok(None);
    }
    let mut r = Reader { buf: body, pos: 1 };
    let layer = r.u32("layer")?;
    let mut view = GradsView {
        layer,
        dx: None,
        dw: None,
    };
    let tag = match kind {
        MessageKind::ConvGrads => r.u8("dx")?,
        MessageKind::InputGrad => 1,
        _ => 0,
    };
    match tag {
        0 => {}
        1 => {
            let (shape, words) = r.tensor_words("dx")?;
            view.dx = Some(ReceivedTensor::from_frame(shape, words));
        }
        b => {
            return Err(ProtocolError::InvalidValue {
                what: "dx",
                detail: format!("option tag {b} (expected 0 or 1)"),
            })
        }
    }
    if kind != MessageKind::InputGrad {
        let (shape, words) = r.tensor_words("dw")?;
        view.dw = Some(ReceivedTensor::from_frame(shape, words));
    }
    if r.remaining() != 0 {
        return Err(ProtocolError::TrailingBytes {
            count: r.remaining(),
            message: kind.name(),
        });
    }
    Ok(Some(view))
}

fn decode_body(body: &[u8]) -> Result<Message> {
    let mut r = Reader { buf: body, pos: 0 };
    let code = r.u8("message type")?;
    let kind = MessageKind::from_code(code).ok_or(ProtocolError::UnknownType {
        family: "message",
        byte: code,
    })?;
    let msg = match kind {
        MessageKind::Hello => Message::Request(Request::Hello {
            version: r.u32("Hello.version")?,
            max_message: r.u32("Hello.max_message")?,
        }),
        MessageKind::Register => {
            let n = r.u32("Register.layers count")? as usize;
            let mut layers = Vec::with_capacity(n.min(r.remaining() / 25));
            for _ in 0..n {
                layers.push(ConvLayerSpec {
                    id: r.u32("ConvLayerSpec.id")?,
                    in_ch: r.u32("ConvLayerSpec.in_ch")?,
                    out_ch: r.u32("ConvLayerSpec.out_ch")?,
                    k: r.u32("ConvLayerSpec.k")?,
                    stride: r.u32("ConvLayerSpec.stride")?,
                    pad: r.u32("ConvLayerSpec.pad")?,
                    bias: r.bool("ConvLayerSpec.bias")?,
                });
            }
            let n = r.u32("Register.weights count")? as usize;
            // The smallest entry is 6 bytes (a rank-0 tensor and an absent bias): the capacity reserved is at
            // most 16× the frame (an entry is 96 bytes in memory).
            let mut weights = Vec::with_capacity(n.min(r.remaining() / 6));
            for _ in 0..n {
                let w = r.tensor("w")?;
                let b = r.opt_tensor("b")?;
                weights.push((w, b));
            }
            Message::Request(Request::Register { layers, weights })
        }
        MessageKind::ConvForward => Message::Request(Request::ConvForward {
            layer: r.u32("ConvForward.layer")?,
            x_u: r.tensor("x_u")?,
            train: r.bool("ConvForward.train")?,
        }),
        MessageKind::ConvForwardPart => Message::Request(Request::ConvForwardPart {
            layer: r.u32("ConvForwardPart.layer")?,
            first: r.u32("ConvForwardPart.first")?,
            batch: r.u32("ConvForwardPart.batch")?,
            x_u: r.tensor("x_u")?,
            train: r.bool("ConvForwardPart.train")?,
        }),
        MessageKind::ConvBackward => Message::Request(Request::ConvBackward {
            layer: r.u32("ConvBackward.layer")?,
            dy: r.tensor("dy")?,
            need_dx: r.bool("ConvBackward.need_dx")?,
        }),
        MessageKind::ConvInputGrad => Message::Request(Request::ConvInputGrad {
            layer: r.u32("ConvInputGrad.layer")?,
            dy: r.tensor("dy")?,
        }),
        MessageKind::ConvWeightGrad => Message::Request(Request::ConvWeightGrad {
            layer: r.u32("ConvWeightGrad.layer")?,
        }),
        MessageKind::SetWeights => Message::Request(Request::SetWeights {
            layer: r.u32("SetWeights.layer")?,
            w: r.tensor("w")?,
            b: r.opt_tensor("b")?,
        }),
        MessageKind::Step => Message::Request(Request::Step {
            lr: r.f32("Step.lr")?,
        }),
        MessageKind::FetchWeights => Message::Request(Request::FetchWeights {
            layer: r.u32("FetchWeights.layer")?,
        }),
        MessageKind::Shutdown => Message::Request(Request::Shutdown),
        MessageKind::ConvForwardShared => Message::Request(Request::ConvForwardShared {
            layer: r.u32("ConvForwardShared.layer")?,
            from_layer: r.u32("ConvForwardShared.from_layer")?,
            train: r.bool("ConvForwardShared.train")?,
        }),
        MessageKind::RegisterNet => Message::Request(Request::RegisterNet {
            spec: r.string("RegisterNet.spec")?,
            state: r.named_tensors()?,
            optimizer: r.optimizer()?,
        }),
        MessageKind::NetForward => Message::Request(Request::NetForward {
            x: r.tensor("x")?,
            train: r.bool("NetForward.train")?,
        }),
        MessageKind::NetBackward => Message::Request(Request::NetBackward {
            dlogits: r.tensor("dlogits")?,
        }),
        MessageKind::FetchState => Message::Request(Request::FetchState),
        MessageKind::NetOutput => Message::Reply(Reply::NetOutput {
            logits: r.tensor("logits")?,
        }),
        MessageKind::State => Message::Reply(Reply::State {
            entries: r.named_tensors()?,
        }),
        MessageKind::HelloAck => Message::Reply(Reply::HelloAck {
            version: r.u32("HelloAck.version")?,
            max_message: r.u32("HelloAck.max_message")?,
        }),
        MessageKind::Ok => Message::Reply(Reply::Ok),
        MessageKind::ConvOutput => Message::Reply(Reply::ConvOutput {
            layer: r.u32("ConvOutput.layer")?,
            y_u: r.tensor("y_u")?,
        }),
        MessageKind::ConvGrads => Message::Reply(Reply::ConvGrads {
            layer: r.u32("ConvGrads.layer")?,
            dx: r.opt_tensor("dx")?,
            dw: r.tensor("dw")?,
        }),
        MessageKind::InputGrad => Message::Reply(Reply::InputGrad {
            layer: r.u32("InputGrad.layer")?,
            dx: r.tensor("dx")?,
        }),
        MessageKind::WeightGrad => Message::Reply(Reply::WeightGrad {
            layer: r.u32("WeightGrad.layer")?,
            dw: r.tensor("dw")?,
        }),
        MessageKind::Weights => Message::Reply(Reply::Weights {
            layer: r.u32("Weights.layer")?,
            w: r.tensor("w")?,
            b: r.opt_tensor("b")?,
        }),
        MessageKind::Error => Message::Reply(Reply::Error {
            message: r.string("Error.message")?,
        }),
    };
    if r.remaining() != 0 {
        return Err(ProtocolError::TrailingBytes {
            count: r.remaining(),
            message: kind.name(),
        });
    }
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(ProtocolError::Truncated {
                what: what.to_string(),
                needed: n as u64,
                available: self.remaining() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn f32(&mut self, what: &str) -> Result<f32> {
        Ok(f32::from_le_bytes(self.array(what)?))
    }

    fn bool(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(ProtocolError::InvalidValue {
                what,
                detail: format!("bool byte {b} (expected 0 or 1)"),
            }),
        }
    }

    fn named_tensors(&mut self) -> Result<Vec<(String, WireTensor)>> {
        let n = self.u32("named tensors count")? as usize;
        // The smallest entry is 9 bytes (a 4-byte name length and a rank-0 tensor).
        let mut out = Vec::with_capacity(n.min(self.remaining() / 9));
        for _ in 0..n {
            let name = self.string("tensor name")?;
            out.push((name, self.tensor("state")?));
        }
        Ok(out)
    }

    fn optimizer(&mut self) -> Result<OptimizerSpec> {
        Ok(match self.u8("optimizer kind")? {
            OPT_SGD => OptimizerSpec::Sgd {
                momentum: self.f32("Sgd.momentum")?,
                nesterov: self.bool("Sgd.nesterov")?,
                weight_decay: self.f32("Sgd.weight_decay")?,
            },
            OPT_ADAMW => OptimizerSpec::AdamW {
                beta1: self.f32("AdamW.beta1")?,
                beta2: self.f32("AdamW.beta2")?,
                eps: self.f32("AdamW.eps")?,
                weight_decay: self.f32("AdamW.weight_decay")?,
            },
            other => {
                return Err(ProtocolError::InvalidValue {
                    what: "optimizer kind",
                    detail: format!("{other} (expected 0 = SGD or 1 = AdamW)"),
                })
            }
        })
    }

    fn string(&mut self, what: &'static str) -> Result<String> {
        let n = self.u32(what)? as usize;
        // take() checks n against the bytes present before anything is allocated.
        let bytes = self.take(n, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| ProtocolError::Utf8 {
                what,
                detail: e.to_string(),
            })
    }

    fn tensor(&mut self, field: &'static str) -> Result<WireTensor> {
        let (shape, words) = self.tensor_words(field)?;
        Ok(WireTensor::from_decoded(shape, get_f32s(words)))
    }

    /// A tensor's shape and its values as the frame holds them (little-endian words), checked against the
    /// bytes present.
    fn tensor_words(&mut self, field: &'static str) -> Result<(Vec<usize>, &'a [[u8; 4]])> {
        let rank = self.u8(field)? as usize;
        if rank > MAX_RANK {
            return Err(ProtocolError::Rank {
                rank,
                max: MAX_RANK,
            });
        }
        let mut dims = [0u64; MAX_RANK];
        for d in dims.iter_mut().take(rank) {
            *d = u64::from(self.u32(field)?);
        }
        let dims = &dims[..rank];
        let bytes = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| ProtocolError::DimsOverflow {
                dims: dims.to_vec(),
            })?;
        // Checked against the bytes present before the payload is allocated.
        if bytes > self.remaining() as u64 {
            return Err(ProtocolError::TensorLength {
                field,
                shape: dims.to_vec(),
                needed: bytes,
                available: self.remaining() as u64,
            });
        }
        // `bytes` is 4 × the element count: the payload splits into exactly that many 4-byte words, none left.
        let (words, _) = self.take(bytes as usize, field)?.as_chunks::<4>();
        let shape = dims.iter().map(|&d| d as usize).collect();
        Ok((shape, words))
    }

    fn opt_tensor(&mut self, field: &'static str) -> Result<Option<WireTensor>> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => Ok(Some(self.tensor(field)?)),
            b => Err(ProtocolError::InvalidValue {
                what: field,
                detail: format!("option tag {b} (expected 0 or 1)"),
            }),
        }
    }
}
