//! The error type of asymml-protocol.

use thiserror::Error;

/// Errors of the protocol: malformed frames, failed handshakes, transports that time out or close, replies that
/// do not validate. Every decoding fault is one of these, never a panic.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The frame ended before a field was complete.
    #[error("truncated frame: {what} needs {needed} bytes, {available} left")]
    Truncated {
        what: String,
        needed: u64,
        available: u64,
    },
    /// The message type byte names no known message.
    #[error("unknown {family} type byte 0x{byte:02x}")]
    UnknownType { family: &'static str, byte: u8 },
    /// A frame (or a message to encode) is longer than the negotiated maximum.
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    /// The length prefix disagrees with the bytes that came with it.
    #[error("frame length prefix says {prefix} body bytes, the frame holds {actual}")]
    LengthMismatch { prefix: u64, actual: u64 },
    /// Bytes left over after the last field of a message.
    #[error("{count} trailing bytes after a complete {message} message")]
    TrailingBytes { count: usize, message: &'static str },
    /// A tensor of a rank above [`MAX_RANK`](crate::MAX_RANK).
    #[error("tensor rank {rank} exceeds the maximum of {max}")]
    Rank { rank: usize, max: usize },
    /// Tensor dimensions whose element count (or byte count) does not fit in 64 bits / the address space.
    #[error("tensor dims {dims:?} overflow the element count")]
    DimsOverflow { dims: Vec<u64> },
    /// Tensor dimensions that need more payload bytes than the frame holds.
    #[error("tensor {field} of shape {shape:?} needs {needed} payload bytes, the frame has {available} left")]
    TensorLength {
        field: &'static str,
        shape: Vec<u64>,
        needed: u64,
        available: u64,
    },
    /// A string field that is not UTF-8.
    #[error("bad UTF-8 in {what}: {detail}")]
    Utf8 { what: &'static str, detail: String },
    /// A field with a value outside its domain (a bool byte that is neither 0 nor 1, an unknown optimizer kind).
    #[error("invalid {what}: {detail}")]
    InvalidValue { what: &'static str, detail: String },
    /// The two sides speak different protocol versions.
    #[error("protocol version mismatch: this side speaks version {ours}, the peer speaks version {theirs}")]
    Version { ours: u32, theirs: u32 },
    /// The handshake failed for another reason (the peer refused it, or answered something other than HelloAck).
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// A message that cannot be encoded (a dimension above u32::MAX, a rank above the maximum).
    #[error("cannot encode: {0}")]
    Encode(String),
    /// A received tensor that does not validate (shape, length, finiteness).
    #[error("invalid tensor: {0}")]
    Tensor(String),
    /// The connection closed, at a frame boundary (`mid_frame == false`: the peer hung up between messages) or
    /// in the middle of a frame.
    #[error("connection closed: {detail}")]
    Closed { detail: String, mid_frame: bool },
    /// A read or write timed out.
    #[error("connection timed out: {detail}")]
    Timeout { detail: String },
    /// Any other I/O failure.
    #[error("i/o error while {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An address that is neither `tcp://HOST:PORT` nor `unix:PATH`.
    #[error("bad address {address:?}: {detail}")]
    Address { address: String, detail: String },
    /// The peer answered with `Reply::Error`.
    #[error("the accelerator answered: {0}")]
    Remote(String),
    /// The peer answered with a reply of the wrong kind.
    #[error("unexpected reply: expected {expected}, got {got}")]
    UnexpectedReply { expected: String, got: String },
    /// The client was used out of order (a reply awaited with no request outstanding).
    #[error("protocol misuse: {0}")]
    Misuse(String),
    /// An error with the operation (and layer) that met it.
    #[error("{op}")]
    Context {
        op: String,
        #[source]
        source: Box<ProtocolError>,
    },
}

impl ProtocolError {
    /// Wraps the error with the operation that met it, e.g. `"ConvForward(layer 3)"`.
    pub fn context(self, op: impl Into<String>) -> Self {
        ProtocolError::Context {
            op: op.into(),
            source: Box::new(self),
        }
    }

    /// The error under any [`ProtocolError::Context`] layers.
    pub fn root(&self) -> &ProtocolError {
        match self {
            ProtocolError::Context { source, .. } => source.root(),
            e => e,
        }
    }

    /// True when the connection closed (possibly under context layers).
    pub fn is_closed(&self) -> bool {
        matches!(self.root(), ProtocolError::Closed { .. })
    }
}

/// Result with [`ProtocolError`].
pub type Result<T> = std::result::Result<T, ProtocolError>;
