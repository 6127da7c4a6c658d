//! Transports: how encoded frames travel between the two sides.
//!
//! Every transport carries the same frames (a `u32` little-endian body length, then the body; see
//! [`codec`](crate::codec)), so one code path serves every deployment: [`InProcTransport`] (two channels between
//! threads of one process, the default), [`UnixTransport`] (another process on the same machine) and
//! [`TlsTransport`] (another machine: mutual TLS 1.3 with pinned certificates; [`TcpTransport`] is the same in
//! plaintext, for loopback experiments). [`connect_with`] gives the trusted runtime each socket as a
//! [`QueuedTransport`] (a writer and a reader thread of its own, so that requests and replies queue both
//! ways). [`Address`] parses `tcp://HOST:PORT` and `unix:PATH`; [`connect_with`]
//! and [`Listener::bind_with`] open the socket transports from one, `tcp://` secured as [`TcpSecurity`] says.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
#[cfg(unix)]
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::codec::LEN_PREFIX;
use crate::error::{ProtocolError, Result};
use crate::message::MAX_MESSAGE;
pub use crate::queued::QueuedTransport;
use crate::tls::{PinnedTls, TlsTransport};

/// A bidirectional carrier of frames (length prefix included).
pub trait Transport {
    /// Sends one complete frame.
    fn send(&mut self, frame: &[u8]) -> Result<()>;

    /// Sends the frame held in `frame`. A transport may take the buffer instead of copying it (leaving `frame`
    /// empty); the default copies through [`send`](Self::send) and leaves it as it was.
    fn send_vec(&mut self, frame: &mut Vec<u8>) -> Result<()> {
        self.send(frame)
    }

    /// Receives one complete frame into `buf`, replacing its contents (and reusing its allocation where the
    /// transport reads bytes). A frame whose length prefix exceeds the maximum message size is refused before
    /// anything is allocated for it.
    fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()>;

    /// Receives one complete frame.
    fn recv(&mut self) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.recv_into(&mut buf)?;
        Ok(buf)
    }

    /// The largest body accepted by [`recv_into`](Self::recv_into) (after the handshake: the negotiated one).
    fn max_message(&self) -> u32;

    /// Sets the largest body accepted by [`recv_into`](Self::recv_into).
    fn set_max_message(&mut self, max: u32);

    /// The peer, for messages (e.g. `tcp://127.0.0.1:7000`).
    fn peer(&self) -> String;

    /// Sets the longest time one whole frame may take to arrive, counted from the start of each
    /// [`recv_into`](Self::recv_into) (`None`: no such bound; the read timeout alone applies). A read timeout
    /// bounds the wait for the next bytes only, so a peer sending one byte a second outlives it; this bounds
    /// the frame. The default ignores it (a transport without a clock of its own).
    fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        let _ = timeout;
    }

    /// The reply to the frame sent next may be at most `max` bytes (body). A transport that takes replies
    /// off the connection ahead of [`recv_into`](Self::recv_into) ([`QueuedTransport`]) holds that reply to
    /// it as its length prefix arrives; the others check each frame against the maximum of
    /// [`set_max_message`](Self::set_max_message) when it is received. The default does nothing.
    fn expect_reply(&mut self, max: u32) {
        let _ = max;
    }

    /// Drops the frame buffers the transport keeps for reuse (see [`Client::release_buffers`]
    /// (crate::Client::release_buffers)); they grow again to the size of the frames that follow. The default
    /// keeps none.
    fn release_buffers(&mut self) {}

    /// True when a send never waits for the peer to read (frames queue without bound): then several requests
    /// may be outstanding while the peer writes its replies. A plain byte stream is not such a transport:
    /// with both sides writing more than the socket buffers hold and neither reading, both would wait for
    /// good, so over one the trusted runtime keeps one request outstanding; [`QueuedTransport`] is a socket's
    /// end that queues. The default says no.
    fn queues_frames(&self) -> bool {
        false
    }
}

/// `Transport` for a pointer to a transport (`&mut T`, `Box<T>`): every method goes to the pointee.
macro_rules! forward_transport {
    ($($ptr:ty),*) => {$(
        impl<T: Transport + ?Sized> Transport for $ptr {
            fn expect_reply(&mut self, max: u32) {
                (**self).expect_reply(max)
            }
            fn release_buffers(&mut self) {
                (**self).release_buffers()
            }
            fn queues_frames(&self) -> bool {
                (**self).queues_frames()
            }
            fn send(&mut self, frame: &[u8]) -> Result<()> {
                (**self).send(frame)
            }
            fn send_vec(&mut self, frame: &mut Vec<u8>) -> Result<()> {
                (**self).send_vec(frame)
            }
            fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
                (**self).recv_into(buf)
            }
            fn max_message(&self) -> u32 {
                (**self).max_message()
            }
            fn set_max_message(&mut self, max: u32) {
                (**self).set_max_message(max)
            }
            fn peer(&self) -> String {
                (**self).peer()
            }
            fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
                (**self).set_frame_timeout(timeout)
            }
        }
    )*};
}

forward_transport!(&mut T, Box<T>);

/// Settings of a transport. `None` timeouts wait forever.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// Longest wait for the next bytes of a frame (the whole frame for [`InProcTransport`]).
    pub read_timeout: Option<Duration>,
    /// Longest wait for the peer to take the bytes of a frame (socket transports).
    pub write_timeout: Option<Duration>,
    /// Longest wait to connect (socket transports).
    pub connect_timeout: Option<Duration>,
    /// Longest time one whole frame may take to arrive (see [`Transport::set_frame_timeout`]).
    pub frame_timeout: Option<Duration>,
    /// Largest body accepted before the handshake negotiates one.
    pub max_message: u32,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            read_timeout: None,
            write_timeout: None,
            connect_timeout: Some(Duration::from_secs(30)),
            frame_timeout: None,
            max_message: MAX_MESSAGE,
        }
    }
}

impl TransportOptions {
    /// Options with the same read, write, connect and frame timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        TransportOptions {
            read_timeout: Some(timeout),
            frame_timeout: Some(timeout),
            write_timeout: Some(timeout),
            connect_timeout: Some(timeout),
            ..TransportOptions::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// In-process

/// Spare frame buffers an in-process end keeps.
const SPARES: usize = 2;

/// The longest wait for a frame that arrives whole (from a queue): the read and the frame timeout bound the same
/// wait.
pub(crate) fn whole_frame_wait(
    read: Option<Duration>,
    frame: Option<Duration>,
) -> Option<Duration> {
    match (read, frame) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Refuses a whole frame whose length prefix is above `max`.
pub(crate) fn check_prefix(frame: &[u8], max: u32) -> Result<()> {
    match frame.first_chunk::<LEN_PREFIX>() {
        Some(&p) if u32::from_le_bytes(p) > max => Err(ProtocolError::TooLarge {
            len: u64::from(u32::from_le_bytes(p)),
            max: u64::from(max),
        }),
        _ => Ok(()),
    }
}

/// The frame buffers a sending end keeps for reuse: those its peer (or its writer thread) is done with.
#[derive(Default)]
pub(crate) struct Spares {
    /// At most [`SPARES`], largest first.
    kept: Vec<Vec<u8>>,
    /// The longest frame sent since the last [`Spares::release`]: a buffer given back that is more than twice
    /// as large is dropped, not kept (the frames of a registration are not a size to keep).
    recent_max: usize,
}

impl Spares {
    /// A frame of `len` bytes is being sent.
    pub(crate) fn note(&mut self, len: usize) {
        self.recent_max = self.recent_max.max(len);
    }

    /// After a send (which took `frame`'s buffer): keeps the few largest buffers given `back`, and puts the
    /// largest, emptied, into `frame` for the next frame to be encoded into, so that a large frame finds room
    /// even when the last one's buffer has not come back yet (a fresh 100 MB buffer cost up to 0.3 s in page
    /// faults and copies).
    pub(crate) fn refill(&mut self, frame: &mut Vec<u8>, back: impl Iterator<Item = Vec<u8>>) {
        let keep = 2 * self.recent_max;
        self.kept.extend(back.filter(|b| b.capacity() <= keep));
        self.kept.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        self.kept.truncate(SPARES);
        if !self.kept.is_empty() {
            let mut spare = self.kept.remove(0);
            spare.clear();
            *frame = spare;
        }
    }

    /// Lets go of every buffer kept and of those given `back` since.
    pub(crate) fn release(&mut self, back: impl Iterator<Item = Vec<u8>>) {
        self.kept = Vec::new();
        back.for_each(drop);
        self.recent_max = 0;
    }
}

/// One end of an in-process transport: frames travel as `Vec<u8>` over two std mpsc channels, moved without a
/// copy by [`Transport::send_vec`]. A receiver hands the buffer of the frame it is done with back to the
/// sender, whose next frame is encoded into it: in steady state no frame buffer is allocated (large fresh
/// allocations cost a page fault per 4 KiB).
pub struct InProcTransport {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    /// Buffers given back to the peer, and received back from it.
    spare_tx: Sender<Vec<u8>>,
    spare_rx: Receiver<Vec<u8>>,
    /// Buffers received back and not yet reused.
    spares: Spares,
    read_timeout: Option<Duration>,
    frame_timeout: Option<Duration>,
    max_message: u32,
    name: &'static str,
}

/// A connected pair of in-process ends: `(client end, server end)`. Either can move to another thread.
pub fn inproc_pair() -> (InProcTransport, InProcTransport) {
    inproc_pair_with(&TransportOptions::default())
}

/// [`inproc_pair`] with options (the read timeout and the maximum message size apply to both ends).
pub fn inproc_pair_with(opts: &TransportOptions) -> (InProcTransport, InProcTransport) {
    let (tx_a, rx_b) = mpsc::channel();
    let (tx_b, rx_a) = mpsc::channel();
    let (spare_tx_a, spare_rx_b) = mpsc::channel();
    let (spare_tx_b, spare_rx_a) = mpsc::channel();
    let end = |tx, rx, spare_tx, spare_rx, name| InProcTransport {
        tx,
        rx,
        spare_tx,
        spare_rx,
        spares: Spares::default(),
        read_timeout: opts.read_timeout,
        frame_timeout: opts.frame_timeout,
        max_message: opts.max_message,
        name,
    };
    (
        end(tx_a, rx_a, spare_tx_a, spare_rx_a, "inproc:accelerator"),
        end(tx_b, rx_b, spare_tx_b, spare_rx_b, "inproc:trusted"),
    )
}

impl InProcTransport {
    /// Sets the longest wait for a frame (`None`: forever).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }

    fn closed(&self, detail: &str) -> ProtocolError {
        ProtocolError::Closed {
            detail: format!("{} ({})", detail, self.name),
            mid_frame: false,
        }
    }
}

impl Transport for InProcTransport {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        self.send_vec(&mut frame.to_vec())
    }

    fn send_vec(&mut self, frame: &mut Vec<u8>) -> Result<()> {
        self.spares.note(frame.len());
        self.tx
            .send(std::mem::take(frame))
            .map_err(|_| self.closed("peer is gone, cannot send"))?;
        self.spares.refill(frame, self.spare_rx.try_iter());
        Ok(())
    }

    fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let timeout = whole_frame_wait(self.read_timeout, self.frame_timeout);
        let frame = match timeout {
            None => self
                .rx
                .recv()
                .map_err(|_| self.closed("peer closed before replying"))?,
            Some(t) => self.rx.recv_timeout(t).map_err(|e| match e {
                RecvTimeoutError::Timeout => ProtocolError::Timeout {
                    detail: format!("no frame within {t:?} ({})", self.name),
                },
                RecvTimeoutError::Disconnected => self.closed("peer closed before replying"),
            })?,
        };
        check_prefix(&frame, self.max_message)?;
        let done = std::mem::replace(buf, frame);
        if done.capacity() > 0 {
            // The peer encodes its next frame into it (ignored if the peer is gone).
            let _ = self.spare_tx.send(done);
        }
        Ok(())
    }

    fn queues_frames(&self) -> bool {
        // Unbounded channels.
        true
    }

    fn release_buffers(&mut self) {
        self.spares.release(self.spare_rx.try_iter());
    }

    fn max_message(&self) -> u32 {
        self.max_message
    }

    fn set_max_message(&mut self, max: u32) {
        self.max_message = max;
    }

    fn peer(&self) -> String {
        self.name.to_string()
    }

    fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.frame_timeout = timeout;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Byte streams (TCP, Unix sockets)

/// How far a frame body's buffer may grow ahead of the bytes that arrived: a length prefix alone never makes
/// the reader allocate more than this (plus what the buffer already held).
pub const READ_CHUNK: usize = 1 << 20;

/// A byte stream whose read timeout can be changed between reads (sockets; byte slices in tests).
pub(crate) trait TimedRead: Read {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for TcpStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

#[cfg(unix)]
impl TimedRead for UnixStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

#[cfg(test)]
impl TimedRead for &[u8] {
    fn set_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// The waits of one frame read: the socket's read timeout (for the next bytes) and the frame's deadline.
#[derive(Clone, Copy)]
pub(crate) struct Waits {
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) frame_timeout: Option<Duration>,
}

/// Reads one frame from a byte stream into `buf`. The length prefix is checked against `max`; the body's
/// buffer then grows as its bytes arrive, at most [`READ_CHUNK`] ahead of them (a reused `buf` keeps its
/// allocation, and its old bytes are overwritten without zeroing). With a frame timeout the whole frame must
/// arrive within it.
pub(crate) fn read_frame<S: TimedRead>(
    s: &mut S,
    buf: &mut Vec<u8>,
    max: u32,
    peer: &str,
    waits: Waits,
) -> Result<()> {
    let mut r = FrameReader {
        deadline: waits.frame_timeout.map(|t| (Instant::now() + t, t)),
        waits,
        peer,
    };
    let mut prefix = [0u8; LEN_PREFIX];
    let mut got = 0;
    while got < LEN_PREFIX {
        match r.read_some(s, &mut prefix[got..], got == 0)? {
            0 => return Err(r.closed(got, LEN_PREFIX, "the length prefix", got == 0)),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(prefix);
    if len > max {
        return Err(ProtocolError::TooLarge {
            len: u64::from(len),
            max: u64::from(max),
        });
    }
    let body = len as usize;
    buf.truncate(LEN_PREFIX + body);
    if buf.len() < LEN_PREFIX {
        buf.resize(LEN_PREFIX, 0);
    }
    buf[..LEN_PREFIX].copy_from_slice(&prefix);
    let mut got = 0;
    while got < body {
        let at = LEN_PREFIX + got;
        if buf.len() <= at {
            buf.resize(at + (body - got).min(READ_CHUNK), 0);
        }
        let end = buf.len();
        match r.read_some(s, &mut buf[at..end], false)? {
            0 => return Err(r.closed(got, body, "the frame body", false)),
            n => got += n,
        }
    }
    Ok(())
}

/// The state of one frame read: its deadline (with the timeout it came from) and the socket read timeout.
struct FrameReader<'a> {
    deadline: Option<(Instant, Duration)>,
    waits: Waits,
    peer: &'a str,
}

impl FrameReader<'_> {
    /// One read into `out` (0: the peer closed). `at_boundary`: nothing of the frame has arrived yet.
    fn read_some<S: TimedRead>(
        &mut self,
        s: &mut S,
        out: &mut [u8],
        at_boundary: bool,
    ) -> Result<usize> {
        loop {
            if let Some((at, t)) = self.deadline {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(self.late(t));
                }
                let wait = self.waits.read_timeout.map_or(left, |r| r.min(left));
                s.set_timeout(Some(wait))
                    .map_err(|e| setup_error(e, "setting the read timeout"))?;
            }
            match s.read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let timed_out = matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    );
                    if let Some((at, t)) = self.deadline {
                        if timed_out && Instant::now() >= at {
                            return Err(self.late(t));
                        }
                    }
                    return Err(io_error(e, self.peer, "reading a frame", !at_boundary));
                }
            }
        }
    }

    fn late(&self, t: Duration) -> ProtocolError {
        ProtocolError::Timeout {
            detail: format!("no complete frame within {t:?} ({})", self.peer),
        }
    }

    /// The close met after `got` of `need` bytes of `what` (clean: at the frame boundary).
    fn closed(&self, got: usize, need: usize, what: &str, clean: bool) -> ProtocolError {
        let peer = self.peer;
        let detail = if clean {
            format!("{peer} closed the connection")
        } else {
            format!("{peer} closed the connection mid-frame ({got} of {need} bytes of {what})")
        };
        ProtocolError::Closed {
            detail,
            mid_frame: !clean,
        }
    }
}

pub(crate) fn write_frame<S: Write>(s: &mut S, frame: &[u8], peer: &str) -> Result<()> {
    s.write_all(frame)
        .and_then(|_| s.flush())
        .map_err(|e| io_error(e, peer, "sending a frame", true))
}

pub(crate) fn io_error(e: io::Error, peer: &str, doing: &str, mid_frame: bool) -> ProtocolError {
    use io::ErrorKind as K;
    match e.kind() {
        K::WouldBlock | K::TimedOut => ProtocolError::Timeout {
            detail: format!("{doing} ({peer})"),
        },
        K::UnexpectedEof
        | K::BrokenPipe
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected => ProtocolError::Closed {
            detail: format!("{e} while {doing} ({peer})"),
            mid_frame,
        },
        _ => ProtocolError::Io {
            context: format!("{doing} ({peer})"),
            source: e,
        },
    }
}

pub(crate) fn setup_error(e: io::Error, what: &str) -> ProtocolError {
    ProtocolError::Io {
        context: what.to_string(),
        source: e,
    }
}

/// A TCP connection (TCP_NODELAY set).
pub struct TcpTransport {
    stream: TcpStream,
    max_message: u32,
    waits: Waits,
    peer: String,
}

impl TcpTransport {
    /// Connects to `HOST:PORT` (without the `tcp://` scheme). Plaintext: see [`TlsTransport`] for the
    /// authenticated, encrypted connection.
    pub fn connect(host_port: &str, opts: &TransportOptions) -> Result<Self> {
        Self::from_stream(tcp_connect(host_port, opts)?, opts)
    }

    /// Wraps a connected stream: sets TCP_NODELAY and the timeouts of `opts`.
    pub fn from_stream(stream: TcpStream, opts: &TransportOptions) -> Result<Self> {
        let peer = tcp_peer(&stream);
        tcp_prepare(&stream, opts)?;
        Ok(TcpTransport {
            stream,
            max_message: opts.max_message,
            waits: Waits {
                read_timeout: opts.read_timeout,
                frame_timeout: opts.frame_timeout,
            },
            peer,
        })
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// This connection with a writer and a reader thread of its own, so that frames queue both ways (see
    /// [`QueuedTransport`]): the trusted runtime's end.
    pub fn queued(self) -> Result<QueuedTransport> {
        QueuedTransport::start(self.stream, self.peer, self.max_message, self.waits)
    }
}

/// `tcp://ADDRESS` of the peer of `stream`.
pub(crate) fn tcp_peer(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| format!("tcp://{a}"))
        .unwrap_or_else(|_| "tcp peer".to_string())
}

/// Sets TCP_NODELAY and the read and write timeouts of `opts` on `stream`.
pub(crate) fn tcp_prepare(stream: &TcpStream, opts: &TransportOptions) -> Result<()> {
    stream
        .set_nodelay(true)
        .map_err(|e| setup_error(e, "setting TCP_NODELAY"))?;
    stream
        .set_read_timeout(opts.read_timeout)
        .map_err(|e| setup_error(e, "setting the read timeout"))?;
    stream
        .set_write_timeout(opts.write_timeout)
        .map_err(|e| setup_error(e, "setting the write timeout"))
}

/// Opens a TCP connection to `HOST:PORT`, trying each of its addresses within the connect timeout.
pub(crate) fn tcp_connect(host_port: &str, opts: &TransportOptions) -> Result<TcpStream> {
    let what = format!("connecting to tcp://{host_port}");
    let addrs: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .map_err(|e| setup_error(e, &what))?
        .collect();
    let mut last = None;
    for a in &addrs {
        let r = match opts.connect_timeout {
            Some(t) => TcpStream::connect_timeout(a, t),
            None => TcpStream::connect(a),
        };
        match r {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(setup_error(
        last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")),
        &what,
    ))
}

impl Transport for TcpTransport {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        write_frame(&mut self.stream, frame, &self.peer)
    }
    fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        read_frame(
            &mut self.stream,
            buf,
            self.max_message,
            &self.peer,
            self.waits,
        )
    }
    fn max_message(&self) -> u32 {
        self.max_message
    }
    fn set_max_message(&mut self, max: u32) {
        self.max_message = max;
    }
    fn peer(&self) -> String {
        self.peer.clone()
    }
    fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.waits.frame_timeout = timeout;
        // A frame read under a deadline leaves a shorter socket timeout behind; without one, the read timeout
        // applies again.
        let _ = self.stream.set_timeout(self.waits.read_timeout);
    }
}

/// A Unix domain socket connection.
#[cfg(unix)]
pub struct UnixTransport {
    stream: UnixStream,
    max_message: u32,
    waits: Waits,
    peer: String,
}

#[cfg(unix)]
impl UnixTransport {
    /// Connects to the socket at `path`.
    pub fn connect(path: impl AsRef<std::path::Path>, opts: &TransportOptions) -> Result<Self> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .map_err(|e| setup_error(e, &format!("connecting to unix:{}", path.display())))?;
        let mut t = Self::from_stream(stream, opts)?;
        t.peer = format!("unix:{}", path.display());
        Ok(t)
    }

    /// Wraps a connected stream and sets the timeouts of `opts`.
    pub fn from_stream(stream: UnixStream, opts: &TransportOptions) -> Result<Self> {
        let peer = stream
            .peer_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
            .unwrap_or_else(|| "unix socket peer".to_string());
        stream
            .set_read_timeout(opts.read_timeout)
            .map_err(|e| setup_error(e, "setting the read timeout"))?;
        stream
            .set_write_timeout(opts.write_timeout)
            .map_err(|e| setup_error(e, "setting the write timeout"))?;
        Ok(UnixTransport {
            stream,
            max_message: opts.max_message,
            waits: Waits {
                read_timeout: opts.read_timeout,
                frame_timeout: opts.frame_timeout,
            },
            peer,
        })
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// This connection with a writer and a reader thread of its own, so that frames queue both ways (see
    /// [`QueuedTransport`]): the trusted runtime's end.
    pub fn queued(self) -> Result<QueuedTransport> {
        QueuedTransport::start(self.stream, self.peer, self.max_message, self.waits)
    }
}

#[cfg(unix)]
impl Transport for UnixTransport {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        write_frame(&mut self.stream, frame, &self.peer)
    }
    fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        read_frame(
            &mut self.stream,
            buf,
            self.max_message,
            &self.peer,
            self.waits,
        )
    }
    fn max_message(&self) -> u32 {
        self.max_message
    }
    fn set_max_message(&mut self, max: u32) {
        self.max_message = max;
    }
    fn peer(&self) -> String {
        self.peer.clone()
    }
    fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.waits.frame_timeout = timeout;
        // A frame read under a deadline leaves a shorter socket timeout behind; without one, the read timeout
        // applies again.
        let _ = self.stream.set_timeout(self.waits.read_timeout);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Addresses, connecting and listening

/// Where an accelerator listens: `tcp://HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `HOST:PORT` (a name, an IPv4 address or a bracketed IPv6 address).
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl Address {
    /// Parses `tcp://HOST:PORT` or `unix:PATH` (also `unix://PATH`).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |detail: &str| ProtocolError::Address {
            address: s.to_string(),
            detail: detail.to_string(),
        };
        if let Some(hp) = s.strip_prefix("tcp://") {
            let (host, port) = hp
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp://HOST:PORT"))?;
            if host.is_empty() || host == "[]" {
                return Err(bad("empty host"));
            }
            if host.contains('/')
                || host.contains(':') && !(host.starts_with('[') && host.ends_with(']'))
            {
                return Err(bad(
                    "bad host (write IPv6 addresses in brackets: tcp://[::1]:7000)",
                ));
            }
            port.parse::<u16>()
                .map_err(|_| bad(&format!("bad port {port:?} (expected 0..=65535)")))?;
            Ok(Address::Tcp(hp.to_string()))
        } else if let Some(p) = s.strip_prefix("unix:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if p.is_empty() {
                return Err(bad("empty socket path"));
            }
            Ok(Address::Unix(PathBuf::from(p)))
        } else {
            Err(bad("expected tcp://HOST:PORT or unix:PATH"))
        }
    }
}

impl std::str::FromStr for Address {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self> {
        Address::parse(s)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(hp) => write!(f, "tcp://{hp}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How a `tcp://` connection is secured. (Unix sockets and in-process transports are always plain: the
/// operating system protects them.)
#[derive(Clone, Debug)]
pub enum TcpSecurity {
    /// Mutual TLS 1.3: this side presents its own certificate and accepts only the peer's pinned one.
    Tls(PinnedTls),
    /// No encryption, no authentication: anyone on the path reads and alters every message. For loopback
    /// experiments and tests only.
    InsecurePlaintext,
}

/// Connects to an accelerator at `addr` (`tcp://` in plaintext: see [`connect_with`]).
pub fn connect(addr: &Address, opts: &TransportOptions) -> Result<Box<dyn Transport + Send>> {
    connect_with(addr, opts, &TcpSecurity::InsecurePlaintext)
}

/// Connects to an accelerator at `addr`, a `tcp://` one secured by `tcp`. With TLS, the handshake (and the
/// check of the peer's pinned certificate) completes within `opts.connect_timeout`.
pub fn connect_with(
    addr: &Address,
    opts: &TransportOptions,
    tcp: &TcpSecurity,
) -> Result<Box<dyn Transport + Send>> {
    match (addr, tcp) {
        (Address::Tcp(hp), TcpSecurity::Tls(tls)) => {
            Ok(Box::new(TlsTransport::connect_queued(hp, opts, tls)?))
        }
        (Address::Tcp(hp), TcpSecurity::InsecurePlaintext) => {
            Ok(Box::new(TcpTransport::connect(hp, opts)?.queued()?))
        }
        #[cfg(unix)]
        (Address::Unix(p), _) => Ok(Box::new(UnixTransport::connect(p, opts)?.queued()?)),
        #[cfg(not(unix))]
        (Address::Unix(_), _) => Err(ProtocolError::Address {
            address: addr.to_string(),
            detail: "Unix sockets are not available on this platform".into(),
        }),
    }
}

/// A listening socket that hands out connected transports (the accelerator side).
pub struct Listener {
    inner: ListenerInner,
    opts: TransportOptions,
    tcp: TcpSecurity,
}

enum ListenerInner {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix(UnixListener, PathBuf),
}

/// A connection accepted by a [`Listener`] and not yet ready: [`establish`](Self::establish) completes it
/// (for TLS: the handshake, which may take up to the connect timeout, so a server calls it on the
/// connection's own thread).
pub struct Accepted {
    inner: AcceptedInner,
    opts: TransportOptions,
    peer: String,
}

enum AcceptedInner {
    Tcp(TcpStream),
    Tls(TcpStream, PinnedTls),
    #[cfg(unix)]
    Unix(UnixStream),
}

impl Accepted {
    /// The peer, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The transport, after the TLS handshake where the listener asks for TLS: the handshake, and the check
    /// of the client's pinned certificate, must complete within the listener's connect timeout (a
    /// [`ProtocolError::Timeout`] after it); no frame is read before it has.
    pub fn establish(self) -> Result<Box<dyn Transport + Send>> {
        match self.inner {
            AcceptedInner::Tcp(s) => Ok(Box::new(TcpTransport::from_stream(s, &self.opts)?)),
            AcceptedInner::Tls(s, tls) => Ok(Box::new(TlsTransport::accept(s, &self.opts, &tls)?)),
            #[cfg(unix)]
            AcceptedInner::Unix(s) => Ok(Box::new(UnixTransport::from_stream(s, &self.opts)?)),
        }
    }
}

impl Listener {
    /// Listens at `addr` (`tcp://HOST:0` picks a free port; see [`local_address`](Self::local_address)). A Unix
    /// socket file is removed when the listener is dropped. `tcp://` connections are plaintext: see
    /// [`bind_with`](Self::bind_with).
    pub fn bind(addr: &Address, opts: TransportOptions) -> Result<Self> {
        Self::bind_with(addr, opts, TcpSecurity::InsecurePlaintext)
    }

    /// [`bind`](Self::bind) with `tcp://` connections secured by `tcp`; the TLS handshake of each connection
    /// must complete within `opts.connect_timeout` (see [`Accepted::establish`]).
    pub fn bind_with(addr: &Address, opts: TransportOptions, tcp: TcpSecurity) -> Result<Self> {
        let inner = match addr {
            Address::Tcp(hp) => ListenerInner::Tcp(
                TcpListener::bind(hp.as_str())
                    .map_err(|e| setup_error(e, &format!("listening on {addr}")))?,
            ),
            #[cfg(unix)]
            Address::Unix(p) => ListenerInner::Unix(
                UnixListener::bind(p)
                    .map_err(|e| setup_error(e, &format!("listening on {addr}")))?,
                p.clone(),
            ),
            #[cfg(not(unix))]
            Address::Unix(_) => {
                return Err(ProtocolError::Address {
                    address: addr.to_string(),
                    detail: "Unix sockets are not available on this platform".into(),
                })
            }
        };
        Ok(Listener { inner, opts, tcp })
    }

    /// The address actually listened on (with the port chosen for `tcp://HOST:0`).
    pub fn local_address(&self) -> Result<Address> {
        match &self.inner {
            ListenerInner::Tcp(l) => Ok(Address::Tcp(
                l.local_addr()
                    .map_err(|e| setup_error(e, "reading the local address"))?
                    .to_string(),
            )),
            #[cfg(unix)]
            ListenerInner::Unix(_, p) => Ok(Address::Unix(p.clone())),
        }
    }

    /// True when `tcp://` connections are secured by TLS.
    pub fn is_tls(&self) -> bool {
        matches!(
            (&self.inner, &self.tcp),
            (ListenerInner::Tcp(_), TcpSecurity::Tls(_))
        )
    }

    /// Waits for the next connection and returns it before any handshake: [`Accepted::establish`] completes
    /// it (on the connection's own thread, so that a slow handshake delays no other connection).
    pub fn accept_pending(&self) -> Result<Accepted> {
        let opts = self.opts.clone();
        match &self.inner {
            ListenerInner::Tcp(l) => {
                let (s, _) = l.accept().map_err(|e| setup_error(e, "accepting"))?;
                s.set_nonblocking(false)
                    .map_err(|e| setup_error(e, "setting the connection blocking"))?;
                let peer = tcp_peer(&s);
                let inner = match &self.tcp {
                    TcpSecurity::Tls(tls) => AcceptedInner::Tls(s, tls.clone()),
                    TcpSecurity::InsecurePlaintext => AcceptedInner::Tcp(s),
                };
                Ok(Accepted { inner, opts, peer })
            }
            #[cfg(unix)]
            ListenerInner::Unix(l, p) => {
                let (s, _) = l.accept().map_err(|e| setup_error(e, "accepting"))?;
                s.set_nonblocking(false)
                    .map_err(|e| setup_error(e, "setting the connection blocking"))?;
                let peer = format!("unix:{} peer", p.display());
                Ok(Accepted {
                    inner: AcceptedInner::Unix(s),
                    opts,
                    peer,
                })
            }
        }
    }

    /// Waits for the next connection (and, with TLS, completes its handshake on this thread).
    pub fn accept(&self) -> Result<Box<dyn Transport + Send>> {
        self.accept_pending()?.establish()
    }

    /// Waits at most `timeout` for the next connection (a [`ProtocolError::Timeout`] after it); a TLS
    /// handshake then has the connect timeout.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Box<dyn Transport + Send>> {
        self.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let r = loop {
            match self.accept_pending() {
                Err(ProtocolError::Io { source, .. })
                    if source.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(ProtocolError::Io { source, .. })
                    if source.kind() == io::ErrorKind::WouldBlock =>
                {
                    break Err(ProtocolError::Timeout {
                        detail: format!("no connection within {timeout:?}"),
                    })
                }
                other => break other,
            }
        };
        self.set_nonblocking(false)?;
        r?.establish()
    }

    fn set_nonblocking(&self, on: bool) -> Result<()> {
        let r = match &self.inner {
            ListenerInner::Tcp(l) => l.set_nonblocking(on),
            #[cfg(unix)]
            ListenerInner::Unix(l, _) => l.set_nonblocking(on),
        };
        r.map_err(|e| setup_error(e, "setting the listener (non)blocking"))
    }
}

#[cfg(unix)]
impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix(_, p) = &self.inner {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_WAITS: Waits = Waits {
        read_timeout: None,
        frame_timeout: None,
    };

    #[test]
    fn parses_addresses() {
        assert_eq!(
            Address::parse("tcp://127.0.0.1:7000").unwrap(),
            Address::Tcp("127.0.0.1:7000".into())
        );
        assert_eq!(
            Address::parse("tcp://accel.local:0").unwrap(),
            Address::Tcp("accel.local:0".into())
        );
        assert_eq!(
            Address::parse("tcp://[::1]:7000").unwrap(),
            Address::Tcp("[::1]:7000".into())
        );
        assert_eq!(
            Address::parse("unix:/tmp/a.sock").unwrap(),
            Address::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            Address::parse("unix:///tmp/a.sock").unwrap(),
            Address::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            Address::parse("unix:rel.sock").unwrap(),
            Address::Unix("rel.sock".into())
        );
        for a in ["tcp://127.0.0.1:7000", "unix:/tmp/a.sock", "tcp://[::1]:1"] {
            assert_eq!(Address::parse(a).unwrap().to_string(), a);
            assert_eq!(a.parse::<Address>().unwrap().to_string(), a);
        }
        for bad in [
            "",
            "127.0.0.1:7000",
            "tcp://",
            "tcp://host",
            "tcp://:7000",
            "tcp://host:port",
            "tcp://host:70000",
            "tcp://::1:7000",
            "unix:",
            "http://x:1",
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert!(matches!(e, ProtocolError::Address { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn read_frame_reads_bodies_of_many_chunks_into_a_reused_buffer() {
        let frame = |n: usize| {
            let mut f = (n as u32).to_le_bytes().to_vec();
            f.extend((0..n).map(|i| (i % 251) as u8));
            f
        };
        let mut buf = Vec::new();
        for n in [2 * READ_CHUNK + 17, 5, READ_CHUNK, 0, 3 * READ_CHUNK] {
            let f = frame(n);
            read_frame(&mut &f[..], &mut buf, u32::MAX, "peer", NO_WAITS).unwrap();
            assert!(buf == f, "a frame of {n} body bytes");
        }
    }

    #[test]
    fn read_frame_tells_clean_close_from_mid_frame() {
        let mut buf = Vec::new();
        let e = read_frame(&mut &[][..], &mut buf, 100, "peer", NO_WAITS).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::Closed {
                    mid_frame: false,
                    ..
                }
            ),
            "{e}"
        );
        let e = read_frame(&mut &[5u8, 0][..], &mut buf, 100, "peer", NO_WAITS).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::Closed {
                    mid_frame: true,
                    ..
                }
            ),
            "{e}"
        );
        let e = read_frame(
            &mut &[5u8, 0, 0, 0, 1, 2][..],
            &mut buf,
            100,
            "peer",
            NO_WAITS,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::Closed {
                    mid_frame: true,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("2 of 5 bytes of the frame body"),
            "{e}"
        );
        read_frame(
            &mut &[2u8, 0, 0, 0, 7, 8][..],
            &mut buf,
            100,
            "peer",
            NO_WAITS,
        )
        .unwrap();
        assert_eq!(buf, [2, 0, 0, 0, 7, 8]);
        // Over the maximum: refused from the prefix alone, the buffer is not grown.
        let mut small = Vec::new();
        let e = read_frame(
            &mut &[0xff, 0xff, 0xff, 0xff][..],
            &mut small,
            100,
            "peer",
            NO_WAITS,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::TooLarge {
                    len: 0xffff_ffff,
                    max: 100
                }
            ),
            "{e}"
        );
        assert_eq!(small.capacity(), 0);
    }
}
