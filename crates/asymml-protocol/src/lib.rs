//! asymml-protocol: the messages that cross the trust boundary between the trusted runtime and the untrusted
//! accelerator, their binary encoding and the transports (in-process, Unix socket, TCP).
//!
//! - [`declassify`]: the only way tensor data gets onto the wire ([`WireTensor`] and the `declassify_*`
//!   functions), and the validating way back ([`WireTensor::into_tensor_checked`]).
//! - [`message`]: [`Request`] and [`Reply`], the whole vocabulary of the boundary.
//! - [`codec`]: the binary frame format; decoding is total (every malformed frame is a [`ProtocolError`]).
//! - [`transport`]: the [`Transport`] trait and its in-process, Unix socket and TCP implementations.
//! - [`tls`]: mutual TLS 1.3 over TCP with pinned certificates ([`TlsTransport`], [`PinnedTls`]).
//! - [`client`]: the trusted side's [`Client`] and the accelerator's [`serve`] loop, with the handshake.
//! - [`frames`]: a hook to account the memory of frame buffers apart (in a TEE they are untrusted memory).
//! - [`recording`]: a transport wrapper that records every frame, for the leakage-ledger test.
//! - [`lockstep`]: a trusted end that lets the accelerator compute only while it waits (a measurement aid).

pub mod client;
pub mod codec;
pub mod declassify;
pub mod error;
pub mod frames;
pub mod lockstep;
pub mod message;
mod queued;
pub mod recording;
pub mod tls;
pub mod transport;

pub use client::{
    serve, serve_opts, serve_with, Client, ConvGradsFrame, ConvOutputFrame, ServeOptions,
    TensorFrame, MAX_HELLO, SMALL_REPLY,
};
pub use codec::{
    decode_conv_output_view, decode_grads_view, decode_message, decode_reply, decode_request,
    encode_reply, encode_request, GradsView,
};
pub use declassify::{
    accelerator_result, declassify_input_untrusted_only, declassify_logit_grad,
    declassify_output_grad, declassify_output_grad_into, declassify_residual,
    declassify_residual_into, declassify_residual_owned, declassify_updated_weights,
    declassify_updated_weights_owned, public_weights, ReceivedTensor, WireTensor,
};
pub use error::{ProtocolError, Result};
pub use frames::set_frame_hook;
pub use lockstep::LockstepTransport;
pub use message::{
    ConvLayerSpec, Message, MessageKind, OptimizerSpec, Reply, Request, MAX_MESSAGE, MAX_RANK,
    PROTOCOL_VERSION,
};
pub use recording::{Direction, Record, RecordedTensor, Recording, Transcript};
pub use tls::{PinnedTls, Role, TlsTransport};
#[cfg(unix)]
pub use transport::UnixTransport;
pub use transport::{
    connect, connect_with, inproc_pair, inproc_pair_with, Accepted, Address, InProcTransport,
    Listener, QueuedTransport, TcpSecurity, TcpTransport, Transport, TransportOptions, READ_CHUNK,
};
