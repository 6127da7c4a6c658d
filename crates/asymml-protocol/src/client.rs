//! The two ends of a conversation: [`Client`] (the trusted runtime) and [`serve`] (the accelerator).

use std::collections::VecDeque;
use std::time::Duration;

use crate::codec::{
    decode_conv_output_view, decode_grads_view, decode_reply, decode_request, encode_reply,
    encode_request, encode_tensor_request,
};
use crate::declassify::ReceivedTensor;
use crate::error::{ProtocolError, Result};
use crate::frames::framing;
use crate::message::{MessageKind, Reply, Request, MAX_MESSAGE, PROTOCOL_VERSION};
use crate::transport::Transport;

/// The largest reply body accepted for a request answered by `Ok` (or by an error message), and the slack
/// allowed above a reply's tensor payload for its header.
pub const SMALL_REPLY: u32 = 64 * 1024;

/// A received `ConvOutput` reply, kept whole in its frame buffer (see [`Client::recv_conv_output`]).
pub struct ConvOutputFrame {
    buf: Vec<u8>,
    shape: Vec<usize>,
    /// Where `Y_U`'s values start in `buf`.
    start: usize,
}

impl ConvOutputFrame {
    /// `Y_U`, read in place.
    pub fn y_u(&self) -> ReceivedTensor<'_> {
        let (words, _) = self
            .buf
            .get(self.start..)
            .unwrap_or_default()
            .as_chunks::<4>();
        ReceivedTensor::from_frame(self.shape.clone(), words)
    }
}

/// A received backward reply (`ConvGrads`, `InputGrad` or `WeightGrad`), kept whole in its frame buffer (see
/// [`Client::recv_grads`]).
pub struct ConvGradsFrame {
    buf: Vec<u8>,
    kind: MessageKind,
    max: u32,
}

impl ConvGradsFrame {
    /// Bytes of tensor data the reply holds.
    pub fn payload_bytes(&self) -> u64 {
        self.grads().map_or(0, |(dx, dw)| {
            let n = |t: &ReceivedTensor<'_>| 4 * t.shape().iter().product::<usize>() as u64;
            dx.as_ref().map_or(0, n) + dw.as_ref().map_or(0, n)
        })
    }

    /// (`∇X`, `∇W_U`) as far as the reply holds them, read in place.
    #[allow(clippy::type_complexity)]
    pub fn grads(&self) -> Result<(Option<ReceivedTensor<'_>>, Option<ReceivedTensor<'_>>)> {
        match decode_grads_view(&self.buf, self.kind, self.max)? {
            Some(v) => Ok((v.dx, v.dw)),
            None => Err(ProtocolError::Misuse(format!("not a {} frame", self.kind))),
        }
    }
}

/// A request frame (a `ConvForward`, a `ConvBackward` or a `ConvInputGrad`) whose one tensor the sender writes
/// in place, through
/// [`declassify_residual_into`](crate::declassify_residual_into) or
/// [`declassify_output_grad_into`](crate::declassify_output_grad_into): a large tensor goes into the frame
/// straight from where it is made or kept, not through a copy of its own first, and the frame is not
/// cleared first either. Made by [`Client::start_conv_forward`], [`Client::start_conv_backward`] or
/// [`Client::start_input_grad`]; sent by
/// [`Client::send_frame_expecting`] once every value has been written (the writes may come in any order).
pub struct TensorFrame {
    /// The frame up to the values (its length), with room for all of it (its capacity).
    buf: Vec<u8>,
    kind: MessageKind,
    layer: u32,
    shape: Vec<usize>,
    /// The number of values.
    n: usize,
    /// The flag byte after the values (`train` or `need_dx`), where the request has one.
    flag: Option<bool>,
    /// The values written so far.
    written: Written,
}

impl TensorFrame {
    /// The kind of request.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The layer the request is for.
    pub fn layer(&self) -> u32 {
        self.layer
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of the tensor's values.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when the tensor has no value.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Writes `values` as the tensor's values `offset ..` (row-major), for the `declassify_*_into` functions
    /// only. A range past the tensor's end is an error (nothing is written).
    pub(crate) fn put(&mut self, offset: usize, values: &[f32]) -> Result<()> {
        let n = self.n;
        let end = match offset.checked_add(values.len()) {
            Some(end) if end <= n => end,
            _ => {
                return Err(ProtocolError::Misuse(format!(
                    "values {offset}..{} written into a tensor of {n}",
                    offset.saturating_add(values.len())
                )))
            }
        };
        let room = &mut self.buf.spare_capacity_mut()[4 * offset..4 * end];
        #[cfg(target_endian = "little")]
        // SAFETY: `room` is 4·len(values) bytes of the buffer's spare capacity (writable, apart from
        // `values`: the buffer is ours), MaybeUninit<u8> has u8's layout, and f32 is 4 plain bytes without
        // padding: on a little-endian host these are the wire bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr().cast::<u8>(),
                room.as_mut_ptr().cast::<u8>(),
                room.len(),
            );
        }
        #[cfg(not(target_endian = "little"))]
        for (dst, v) in room.chunks_exact_mut(4).zip(values) {
            for (d, b) in dst.iter_mut().zip(v.to_le_bytes()) {
                d.write(b);
            }
        }
        self.written.mark(offset, end);
        Ok(())
    }

    /// The whole frame, once every value has been written (else an error naming the first value that was
    /// not).
    fn into_bytes(mut self) -> Result<Vec<u8>> {
        if let Some(i) = self.written.first_unset(self.n) {
            return Err(ProtocolError::Misuse(format!(
                "value {i} of {} was not written",
                self.n
            )));
        }
        let len = self.buf.len();
        if let Some(flag) = self.flag {
            self.buf.spare_capacity_mut()[4 * self.n].write(u8::from(flag));
        }
        let end = len + 4 * self.n + usize::from(self.flag.is_some());
        // SAFETY: the capacity holds the whole frame (`encode_tensor_request`); the bytes up to `len` were
        // initialised by the encoder, every value's 4 bytes after them by `put` (a range joins `written` only
        // once its values' bytes are written, and `written` covers every value), and the flag byte (if any) just
        // above.
        unsafe { self.buf.set_len(end) };
        Ok(self.buf)
    }
}

/// The ranges of values written into a frame: sorted, disjoint and not touching (touching ranges are merged),
/// so that values written in order keep a few ranges whatever the tensor's size (one bit per value would be
/// 1/32 of the tensor: 3.2 MB for the X_U of VGG16-224's second conv at batch 8).
#[derive(Debug, Default)]
struct Written(Vec<(usize, usize)>);

impl Written {
    /// Values `from .. to` are written.
    fn mark(&mut self, from: usize, to: usize) {
        if from >= to {
            return;
        }
        let v = &mut self.0;
        // The ranges that overlap or touch `from .. to` are v[i .. j].
        let i = v.partition_point(|&(_, end)| end < from);
        let j = v.partition_point(|&(start, _)| start <= to);
        if i == j {
            v.insert(i, (from, to));
        } else {
            v[i] = (v[i].0.min(from), v[j - 1].1.max(to));
            v.drain(i + 1..j);
        }
    }

    /// The first of values `0 .. n` not written.
    fn first_unset(&self, n: usize) -> Option<usize> {
        let first = match self.0.first() {
            Some(&(0, end)) => end,
            _ => 0,
        };
        (first < n).then_some(first)
    }
}

/// The trusted runtime's end of a conversation with the accelerator.
///
/// Requests and replies are split ([`send_request`](Self::send_request), [`recv_reply`](Self::recv_reply)) so the
/// trusted side can compute while the accelerator works; replies come in request order. Errors carry the request
/// they belong to, e.g. `ConvForward(layer 3): connection closed: …`.
pub struct Client<T: Transport> {
    transport: T,
    max_message: u32,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    /// The requests sent and not yet answered, oldest first: their description and the largest reply body
    /// accepted for each.
    pending: VecDeque<(String, u32)>,
    last_decode_s: f64,
}

impl<T: Transport> Client<T> {
    /// Performs the handshake with [`MAX_MESSAGE`] as this side's largest message.
    pub fn connect(transport: T) -> Result<Self> {
        Self::connect_with(transport, MAX_MESSAGE)
    }

    /// Performs the handshake: sends `Hello` and expects `HelloAck` with the same protocol version. The
    /// negotiated maximum message size is the minimum of both sides'.
    pub fn connect_with(mut transport: T, max_message: u32) -> Result<Self> {
        let hs = |e: ProtocolError| e.context("handshake");
        transport.set_max_message(max_message);
        let mut buf = Vec::new();
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            max_message,
        };
        encode_request(&hello, max_message, &mut buf).map_err(hs)?;
        transport.send_vec(&mut buf).map_err(hs)?;
        transport.recv_into(&mut buf).map_err(hs)?;
        let negotiated = match decode_reply(&buf, max_message).map_err(hs)? {
            Reply::HelloAck {
                version,
                max_message: theirs,
            } => {
                if version != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    });
                }
                theirs.min(max_message)
            }
            Reply::Error { message } => return Err(ProtocolError::Handshake(message)),
            other => {
                return Err(ProtocolError::Handshake(format!(
                    "expected HelloAck, got {}",
                    other.describe()
                )))
            }
        };
        transport.set_max_message(negotiated);
        Ok(Client {
            transport,
            max_message: negotiated,
            send_buf: Vec::new(),
            recv_buf: buf,
            pending: VecDeque::new(),
            last_decode_s: 0.0,
        })
    }

    /// Sends a request without waiting for its reply. A request answered by `Ok` accepts a reply of at most
    /// [`SMALL_REPLY`] bytes; any other, up to the negotiated maximum (see
    /// [`send_request_expecting`](Self::send_request_expecting) to bound it).
    pub fn send_request(&mut self, req: &Request) -> Result<()> {
        let bound = match req {
            Request::Register { .. }
            | Request::RegisterNet { .. }
            | Request::SetWeights { .. }
            | Request::Step { .. }
            | Request::NetBackward { .. }
            | Request::Shutdown => SMALL_REPLY,
            _ => self.max_message,
        };
        self.send_bounded(req, bound)
    }

    /// Sends a request whose reply carries at most `payload_bytes` bytes of tensor data: a reply frame larger
    /// than that (plus [`SMALL_REPLY`] for its header or an error message) is refused as it arrives, before
    /// its body is read. The trusted side knows the shape of every reply it asks for.
    pub fn send_request_expecting(&mut self, req: &Request, payload_bytes: u64) -> Result<()> {
        self.send_bounded(req, self.reply_bound(payload_bytes))
    }

    /// The largest reply body accepted for a reply of `payload_bytes` bytes of tensor data: that and
    /// [`SMALL_REPLY`] for its header (or an error message), at most the negotiated maximum.
    fn reply_bound(&self, payload_bytes: u64) -> u32 {
        payload_bytes
            .saturating_add(u64::from(SMALL_REPLY))
            .min(u64::from(self.max_message)) as u32
    }

    /// A `ConvForward` of `layer` (`train` as in [`Request::ConvForward`]) whose `X_U` of `shape` is written in
    /// place ([`declassify_residual_into`](crate::declassify_residual_into)) before it is sent.
    pub fn start_conv_forward(
        &mut self,
        layer: u32,
        shape: &[usize],
        train: bool,
    ) -> Result<TensorFrame> {
        self.start_frame(MessageKind::ConvForward, layer, shape, Some(train))
    }

    /// A `ConvBackward` of `layer` (`need_dx` as in [`Request::ConvBackward`]) whose `∇Y` of `shape` is written
    /// in place ([`declassify_output_grad_into`](crate::declassify_output_grad_into)) before it is sent.
    pub fn start_conv_backward(
        &mut self,
        layer: u32,
        shape: &[usize],
        need_dx: bool,
    ) -> Result<TensorFrame> {
        self.start_frame(MessageKind::ConvBackward, layer, shape, Some(need_dx))
    }

    /// A `ConvInputGrad` of `layer` whose `∇Y` of `shape` is written in place
    /// ([`declassify_output_grad_into`](crate::declassify_output_grad_into)) before it is sent.
    pub fn start_input_grad(&mut self, layer: u32, shape: &[usize]) -> Result<TensorFrame> {
        self.start_frame(MessageKind::ConvInputGrad, layer, shape, None)
    }

    fn start_frame(
        &mut self,
        kind: MessageKind,
        layer: u32,
        shape: &[usize],
        flag: Option<bool>,
    ) -> Result<TensorFrame> {
        let max = self.max_message;
        let (_, n) = framing(|| encode_tensor_request(kind, layer, shape, max, &mut self.send_buf))
            .map_err(|e| e.context(format!("{kind}(layer {layer})")))?;
        Ok(TensorFrame {
            buf: std::mem::take(&mut self.send_buf),
            kind,
            layer,
            shape: shape.to_vec(),
            n,
            flag,
            written: Written::default(),
        })
    }

    /// Sends a frame from [`start_conv_forward`](Self::start_conv_forward) or
    /// [`start_conv_backward`](Self::start_conv_backward), its values written; its reply may carry at most
    /// `payload_bytes` bytes of tensor data (as [`send_request_expecting`](Self::send_request_expecting)).
    pub fn send_frame_expecting(&mut self, frame: TensorFrame, payload_bytes: u64) -> Result<()> {
        let bound = self.reply_bound(payload_bytes);
        let op = format!("{}(layer {})", frame.kind, frame.layer);
        self.send_buf = frame.into_bytes().map_err(|e| e.context(op.clone()))?;
        self.transport.expect_reply(bound.min(self.max_message));
        framing(|| self.transport.send_vec(&mut self.send_buf))
            .map_err(|e| e.context(op.clone()))?;
        self.pending.push_back((op, bound.min(self.max_message)));
        Ok(())
    }

    fn send_bounded(&mut self, req: &Request, bound: u32) -> Result<()> {
        let op = req.describe();
        self.transport.expect_reply(bound.min(self.max_message));
        framing(|| {
            encode_request(req, self.max_message, &mut self.send_buf)
                .and_then(|_| self.transport.send_vec(&mut self.send_buf))
        })
        .map_err(|e| e.context(op.clone()))?;
        self.pending.push_back((op, bound.min(self.max_message)));
        Ok(())
    }

    /// Receives the reply to the oldest unanswered request. A `Reply::Error` comes back as
    /// [`ProtocolError::Remote`] (with the request as context); other replies are returned as they came, for the
    /// caller to validate (see [`Reply::into_conv_output`] and friends, and
    /// [`WireTensor::into_tensor_checked`](crate::WireTensor::into_tensor_checked)).
    pub fn recv_reply(&mut self) -> Result<Reply> {
        let op = self.recv_frame("recv_reply")?;
        let t0 = std::time::Instant::now();
        let r = decode_reply(&self.recv_buf, self.max_message);
        self.last_decode_s = t0.elapsed().as_secs_f64();
        r.and_then(|r| match r {
            Reply::Error { message } => Err(ProtocolError::Remote(message)),
            r => Ok(r),
        })
        .map_err(|e| e.context(op))
    }

    /// Receives the next frame into the receive buffer, bounded by what its request accepts; gives the request's
    /// description (errors carry it as context).
    fn recv_frame(&mut self, caller: &str) -> Result<String> {
        let (op, bound) = self.pending.pop_front().ok_or_else(|| {
            ProtocolError::Misuse(format!("{caller} called with no request outstanding"))
        })?;
        self.transport.set_max_message(bound);
        let got = framing(|| self.transport.recv_into(&mut self.recv_buf));
        self.transport.set_max_message(self.max_message);
        self.last_decode_s = 0.0;
        got.map_err(|e| e.context(op.clone()))?;
        Ok(op)
    }

    /// A reply that is not the one expected: decoded whole, to say what it was.
    fn refuse_other(
        &self,
        expected: &str,
        check: impl FnOnce(Reply) -> Result<()>,
    ) -> ProtocolError {
        match decode_reply(&self.recv_buf, self.max_message).and_then(check) {
            Ok(()) => ProtocolError::Misuse(format!("a {expected} was not recognised")),
            Err(e) => e,
        }
    }

    /// Receives the reply to the oldest unanswered request, which must be a `ConvOutput` for `layer`, without
    /// copying `Y_U` out of the frame: the caller reads it in place ([`ConvOutputFrame::y_u`]) and then gives
    /// the frame back ([`reuse_frame`](Self::reuse_frame)). Any other reply is an error naming what came
    /// (`Reply::Error` as [`ProtocolError::Remote`]), with the request as context.
    pub fn recv_conv_output(&mut self, layer: u32) -> Result<ConvOutputFrame> {
        let op = self.recv_frame("recv_conv_output")?;
        let base = self.recv_buf.as_ptr() as usize;
        let found = match decode_conv_output_view(&self.recv_buf, self.max_message) {
            Ok(Some((l, y_u))) if l == layer => Ok((y_u.shape().to_vec(), y_u.address() - base)),
            Ok(_) => Err(
                self.refuse_other(&format!("ConvOutput for layer {layer}"), |r| {
                    r.into_conv_output(layer).map(drop)
                }),
            ),
            Err(e) => Err(e),
        };
        let (shape, start) = found.map_err(|e| e.context(op))?;
        Ok(ConvOutputFrame {
            buf: std::mem::take(&mut self.recv_buf),
            shape,
            start,
        })
    }

    /// Receives the reply to the oldest unanswered request, which must be a `kind` reply (`ConvGrads`,
    /// `InputGrad` or `WeightGrad`) for `layer`, without copying its tensors out of the frame
    /// ([`ConvGradsFrame::grads`]); otherwise as [`recv_conv_output`](Self::recv_conv_output).
    pub fn recv_grads(&mut self, kind: MessageKind, layer: u32) -> Result<ConvGradsFrame> {
        let op = self.recv_frame("recv_grads")?;
        let max = self.max_message;
        let found = match decode_grads_view(&self.recv_buf, kind, max) {
            Ok(Some(v)) if v.layer == layer => Ok(()),
            Ok(_) => Err(
                self.refuse_other(&format!("{kind} for layer {layer}"), |r| match kind {
                    MessageKind::InputGrad => r.into_input_grad(layer).map(drop),
                    MessageKind::WeightGrad => r.into_weight_grad(layer).map(drop),
                    _ => r.into_conv_grads(layer).map(drop),
                }),
            ),
            Err(e) => Err(e),
        };
        found.map_err(|e| e.context(op))?;
        Ok(ConvGradsFrame {
            buf: std::mem::take(&mut self.recv_buf),
            kind,
            max,
        })
    }

    /// Takes back the buffer of a frame from [`recv_conv_output`](Self::recv_conv_output): the next reply is
    /// received into it (no fresh allocation, no page faults).
    pub fn reuse_frame(&mut self, frame: ConvOutputFrame) {
        self.reuse_buffer(frame.buf);
    }

    /// Takes back the buffer of a frame from [`recv_grads`](Self::recv_grads).
    pub fn reuse_grads_frame(&mut self, frame: ConvGradsFrame) {
        self.reuse_buffer(frame.buf);
    }

    fn reuse_buffer(&mut self, buf: Vec<u8>) {
        if buf.capacity() > self.recv_buf.capacity() {
            self.recv_buf = buf;
        }
    }

    /// Gives back the frame buffers, the client's and those the transport keeps for reuse (they grow again to
    /// the next messages' size): after messages far larger than the ones that follow (the weights at
    /// registration), so that their size is not kept for good.
    pub fn release_buffers(&mut self) {
        self.send_buf = Vec::new();
        self.recv_buf = Vec::new();
        self.transport.release_buffers();
    }

    /// Seconds the last [`Client::recv_reply`] spent decoding the reply (after the frame arrived).
    pub fn last_decode_s(&self) -> f64 {
        self.last_decode_s
    }

    /// Sends a request and waits for its reply (after the replies of requests sent before).
    pub fn call(&mut self, req: &Request) -> Result<Reply> {
        if !self.pending.is_empty() {
            return Err(ProtocolError::Misuse(format!(
                "call({}) with {} replies outstanding",
                req.describe(),
                self.pending.len()
            )));
        }
        self.send_request(req)?;
        self.recv_reply()
    }

    /// Sends `Shutdown`, waits for its acknowledgement and gives the transport back.
    pub fn shutdown(mut self) -> Result<T> {
        self.call(&Request::Shutdown)?.into_ok()?;
        Ok(self.transport)
    }

    /// Number of requests sent and not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The negotiated maximum message body size.
    pub fn max_message(&self) -> u32 {
        self.max_message
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, mutably.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The transport, ending the conversation without a `Shutdown`.
    pub fn into_transport(self) -> T {
        self.transport
    }
}

/// Serves requests on `transport` with [`MAX_MESSAGE`] as this side's largest message; see [`serve_with`].
pub fn serve<T: Transport>(transport: T, handler: &mut dyn FnMut(Request) -> Reply) -> Result<()> {
    serve_with(transport, MAX_MESSAGE, handler)
}

/// The largest frame body accepted before the handshake (a `Hello` takes 9 bytes).
pub const MAX_HELLO: u32 = 4096;

/// Limits of the accelerator's loop ([`serve_opts`]). `None` timeouts wait forever.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// This side's largest message body after the handshake.
    pub max_message: u32,
    /// The largest frame body accepted before the handshake ([`MAX_HELLO`]).
    pub max_hello: u32,
    /// The whole `Hello` frame must arrive within this, from the start of the loop.
    pub handshake_timeout: Option<Duration>,
    /// After the handshake, each request frame must arrive whole within this, counted from the previous
    /// reply (or the handshake's).
    pub idle_timeout: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message: MAX_MESSAGE,
            max_hello: MAX_HELLO,
            handshake_timeout: None,
            idle_timeout: None,
        }
    }
}

/// [`serve_opts`] with `max_message` as this side's largest message and no timeouts.
pub fn serve_with<T: Transport>(
    transport: T,
    max_message: u32,
    handler: &mut dyn FnMut(Request) -> Reply,
) -> Result<()> {
    let opts = ServeOptions {
        max_message,
        ..ServeOptions::default()
    };
    serve_opts(transport, &opts, handler)
}

/// The accelerator's loop: does the handshake, then answers every request with `handler`'s reply until
/// `Shutdown` (answered with the handler's reply too, then `Ok(())`) or until the peer closes the connection
/// between two messages (`Ok(())`). The handler never sees `Hello`.
///
/// Before the handshake only frames of at most `opts.max_hello` bytes are read, and the `Hello` must arrive
/// within `opts.handshake_timeout`; afterwards each request frame must arrive within `opts.idle_timeout`.
/// A malformed request is answered with `Reply::Error` naming the fault and the loop goes on; a broken
/// connection (a close mid-frame, a timeout) ends it with the error, and so does a frame over the maximum size
/// (after an Error reply saying so). A version mismatch is answered with `Reply::Error` naming both versions
/// and returned as [`ProtocolError::Version`].
pub fn serve_opts<T: Transport>(
    mut transport: T,
    opts: &ServeOptions,
    handler: &mut dyn FnMut(Request) -> Reply,
) -> Result<()> {
    let max_message = opts.max_message;
    let mut buf = Vec::new();
    let mut out = Vec::new();

    // Handshake: a tiny frame, within the handshake timeout.
    transport.set_max_message(opts.max_hello.min(max_message));
    transport.set_frame_timeout(opts.handshake_timeout);
    match transport.recv_into(&mut buf) {
        Ok(()) => {}
        Err(ProtocolError::Closed {
            mid_frame: false, ..
        }) => return Ok(()),
        Err(e) => return Err(refuse_frame(&mut transport, e, &mut out).context("handshake")),
    }
    let negotiated = match decode_request(&buf, max_message) {
        Ok(Request::Hello {
            version,
            max_message: theirs,
        }) => {
            if version != PROTOCOL_VERSION {
                let message = format!(
                    "protocol version mismatch: the accelerator speaks version {PROTOCOL_VERSION}, \
                     the client speaks version {version}"
                );
                send_reply(
                    &mut transport,
                    &Reply::error(message),
                    max_message,
                    &mut out,
                )?;
                return Err(ProtocolError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            theirs.min(max_message)
        }
        Ok(other) => {
            let message = format!("expected Hello first, got {}", other.describe());
            send_reply(
                &mut transport,
                &Reply::error(message.clone()),
                max_message,
                &mut out,
            )?;
            return Err(ProtocolError::Handshake(message));
        }
        Err(e) => {
            let message = format!("malformed Hello: {e}");
            send_reply(
                &mut transport,
                &Reply::error(message.clone()),
                max_message,
                &mut out,
            )?;
            return Err(ProtocolError::Handshake(message));
        }
    };
    let ack = Reply::HelloAck {
        version: PROTOCOL_VERSION,
        max_message: negotiated,
    };
    send_reply(&mut transport, &ack, max_message, &mut out)?;
    transport.set_max_message(negotiated);
    transport.set_frame_timeout(opts.idle_timeout);

    loop {
        match framing(|| transport.recv_into(&mut buf)) {
            Ok(()) => {}
            Err(ProtocolError::Closed {
                mid_frame: false, ..
            }) => return Ok(()),
            Err(e) => return Err(refuse_frame(&mut transport, e, &mut out)),
        }
        let (reply, last) = match decode_request(&buf, negotiated) {
            Ok(Request::Hello { .. }) => (Reply::error("handshake already done"), false),
            Ok(Request::Shutdown) => (handler(Request::Shutdown), true),
            Ok(req) => (handler(req), false),
            Err(e) => (Reply::error(format!("malformed request: {e}")), false),
        };
        framing(|| {
            if let Err(e) = encode_reply(&reply, negotiated, &mut out) {
                let kind = reply.describe();
                drop(reply);
                encode_reply(
                    &Reply::error(format!("the {kind} reply cannot be sent: {e}")),
                    negotiated,
                    &mut out,
                )?;
            }
            transport.send_vec(&mut out)
        })?;
        if last {
            return Ok(());
        }
    }
}

/// The end of a conversation whose frame could not be read: a frame over the size limit is answered with an
/// Error reply naming the limit (best effort: the connection closes next either way); `e` is returned.
fn refuse_frame<T: Transport>(
    transport: &mut T,
    e: ProtocolError,
    out: &mut Vec<u8>,
) -> ProtocolError {
    if let ProtocolError::TooLarge { .. } = e {
        let _ = send_reply(transport, &Reply::error(e.to_string()), MAX_HELLO, out);
    }
    e
}

fn send_reply<T: Transport>(
    transport: &mut T,
    reply: &Reply,
    max_message: u32,
    out: &mut Vec<u8>,
) -> Result<()> {
    encode_reply(reply, max_message, out)?;
    transport.send_vec(out)
}

#[cfg(test)]
mod tests {
    use super::Written;

    /// `Written` against one flag per value, for writes in order, out of order, overlapping and touching.
    #[test]
    fn written_ranges_say_what_one_flag_per_value_says() {
        let n = 97;
        let cases: [&[(usize, usize)]; 6] = [
            &[(0, 40), (40, 97)],
            &[(50, 97), (0, 10), (10, 50)],
            &[(5, 9), (20, 30), (8, 21), (0, 5), (30, 96)],
            &[(3, 3), (0, 0), (0, 1), (2, 97)],
            &[(10, 20), (30, 40), (0, 97)],
            &[(0, 97), (4, 8)],
        ];
        for writes in cases {
            let (mut w, mut flags) = (Written::default(), vec![false; n]);
            for &(from, to) in writes {
                w.mark(from, to);
                flags[from..to].iter_mut().for_each(|f| *f = true);
                assert_eq!(
                    w.first_unset(n),
                    flags.iter().position(|f| !f),
                    "{writes:?}"
                );
                assert!(
                    w.0.windows(2).all(|p| p[0].1 < p[1].0) && w.0.iter().all(|r| r.0 < r.1),
                    "sorted, disjoint, not touching: {:?}",
                    w.0
                );
                let covered: usize = w.0.iter().map(|r| r.1 - r.0).sum();
                assert_eq!(covered, flags.iter().filter(|f| **f).count());
            }
        }
        assert_eq!(Written::default().first_unset(0), None);
    }
}
