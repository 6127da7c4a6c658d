//! A socket transport whose sends and receives never wait on each other: the trusted runtime's end of a Unix
//! socket or a TCP connection (TLS or plaintext), with a writer thread and a reader thread of its own (over
//! TLS they share the session: see `TlsTransport::connect_queued`).
//!
//! Over a plain byte stream a side that writes a large frame waits until the peer reads it. The accelerator
//! answers one request at a time and writes its reply before it reads the next request, so a trusted runtime
//! that sent several requests before reading a reply would wait for good (both sides writing, neither reading).
//! Here [`Transport::send`] hands the frame to the writer thread and returns, and the reader thread takes every
//! reply off the socket as it comes and queues it: the frames queue as they do in-process
//! ([`Transport::queues_frames`]), so a micro-batched forward streams its parts through the network over a
//! socket too. The reader reads one frame per request sent (every request has one reply), never ahead: a
//! hostile accelerator that sends frames nobody asked for fills its socket's buffers, not this side's memory.
//! So the queues hold what this side asked for and what it is sending. Each reply's length prefix is checked,
//! before anything is allocated for it, against the bound its request was sent with
//! ([`Transport::expect_reply`]; else the maximum message size as it was then): the bound that the
//! caller sets for the receive itself would come too late for a frame read ahead.

use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{ProtocolError, Result};
use crate::transport::{
    check_prefix, read_frame, whole_frame_wait, write_frame, Spares, TimedRead, Transport, Waits,
};

/// A connected socket that can be cloned into a reader and a writer, and shut down from either.
pub(crate) trait Duplex: TimedRead + Write + Send + 'static {
    fn clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
    fn shut(&self);
    /// Says goodbye before the socket is shut (TLS: close_notify); nothing by default.
    fn goodbye(&mut self) {}
}

/// Rewrites an error of the connection in words that say why (TLS: a refused certificate), given whether a
/// frame had arrived before it.
pub(crate) type Explain = Box<dyn Fn(ProtocolError, bool) -> ProtocolError + Send>;

impl Duplex for TcpStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

#[cfg(unix)]
impl Duplex for UnixStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// The trusted runtime's end of a socket, with its own writer and reader threads (see the module docs).
pub struct QueuedTransport {
    /// Frames for the writer thread (`None` once dropped: the writer then finishes and shuts the socket).
    to_writer: Option<Sender<Vec<u8>>>,
    /// Buffers the writer is done with, for the next frames to be encoded into.
    written: Receiver<Vec<u8>>,
    /// The writer's failure, reported by the next send (or receive).
    write_error: Arc<Mutex<Option<ProtocolError>>>,
    /// Frames the reader thread took off the socket, or its failure (then it stops).
    from_reader: Receiver<Result<Vec<u8>>>,
    /// Buffers given back to the reader thread for the frames it reads next.
    to_reader: Sender<Vec<u8>>,
    /// One token per frame sent, with its reply's bound: the reader reads a frame only for a token.
    credits: Sender<u32>,
    /// The bound of the reply to the frame sent next ([`Transport::expect_reply`]).
    next_bound: Option<u32>,
    spares: Spares,
    max_message: u32,
    read_timeout: Option<Duration>,
    frame_timeout: Option<Duration>,
    /// The reader's failure, once taken: every later receive reports it again.
    failed: Option<String>,
    /// Whether a frame has arrived (for `explain`).
    heard: bool,
    explain: Option<Explain>,
    peer: String,
}

impl QueuedTransport {
    /// Takes over a connected socket (its timeouts as set: the writer keeps the write timeout; the reader
    /// waits without one, and a receive waits at most the read or frame timeout given here).
    pub(crate) fn start<S: Duplex>(
        stream: S,
        peer: String,
        max_message: u32,
        waits: Waits,
    ) -> Result<Self> {
        let setup = |e| ProtocolError::Io {
            context: format!("cloning the socket of {peer}"),
            source: e,
        };
        let mut reader = stream.clone_stream().map_err(setup)?;
        reader
            .set_timeout(None)
            .map_err(|e| crate::transport::setup_error(e, "clearing the read timeout"))?;
        let write_error = Arc::new(Mutex::new(None));
        let (to_writer, writer_rx) = mpsc::channel::<Vec<u8>>();
        let (written_tx, written) = mpsc::channel();
        let (reader_tx, from_reader) = mpsc::channel();
        let (to_reader, reader_spares) = mpsc::channel::<Vec<u8>>();
        let (credits, reader_credits) = mpsc::channel::<u32>();
        let (werr, wpeer) = (Arc::clone(&write_error), peer.clone());
        let mut writer = stream;
        std::thread::Builder::new()
            .name("asymml-send".into())
            .spawn(move || {
                for frame in writer_rx {
                    if let Err(e) = write_frame(&mut writer, &frame, &wpeer) {
                        *werr.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        break;
                    }
                    let _ = written_tx.send(frame);
                }
                // Everything asked for is written (or the socket failed): the reader stops too.
                writer.goodbye();
                writer.shut();
            })
            .map_err(|e| crate::transport::setup_error(e, "starting the sending thread"))?;
        let rpeer = peer.clone();
        std::thread::Builder::new()
            .name("asymml-recv".into())
            .spawn(move || loop {
                // A reply is due only for a request sent (none once this end is dropped).
                let Ok(bound) = reader_credits.recv() else {
                    // This end was dropped: the writer shuts the socket once it has written what is queued.
                    return;
                };
                let mut buf = reader_spares.try_iter().last().unwrap_or_default();
                let none = Waits {
                    read_timeout: None,
                    frame_timeout: None,
                };
                let r = read_frame(&mut reader, &mut buf, bound, &rpeer, none);
                let stop = r.is_err();
                if reader_tx.send(r.map(|()| buf)).is_err() || stop {
                    reader.shut();
                    return;
                }
            })
            .map_err(|e| crate::transport::setup_error(e, "starting the receiving thread"))?;
        Ok(QueuedTransport {
            to_writer: Some(to_writer),
            written,
            write_error,
            from_reader,
            to_reader,
            credits,
            next_bound: None,
            spares: Spares::default(),
            max_message,
            read_timeout: waits.read_timeout,
            frame_timeout: waits.frame_timeout,
            failed: None,
            heard: false,
            explain: None,
            peer,
        })
    }

    /// Errors of the connection are passed through `explain` first.
    pub(crate) fn with_explain(mut self, explain: Explain) -> Self {
        self.explain = Some(explain);
        self
    }

    fn explained(&self, e: ProtocolError) -> ProtocolError {
        match &self.explain {
            Some(f) => f(e, self.heard),
            None => e,
        }
    }

    fn take_write_error(&self) -> Option<ProtocolError> {
        self.write_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn closed(&self, detail: &str) -> ProtocolError {
        ProtocolError::Closed {
            detail: format!("{detail} ({})", self.peer),
            mid_frame: false,
        }
    }
}

impl Transport for QueuedTransport {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        self.send_vec(&mut frame.to_vec())
    }

    fn send_vec(&mut self, frame: &mut Vec<u8>) -> Result<()> {
        if let Some(e) = self.take_write_error() {
            return Err(self.explained(e));
        }
        self.spares.note(frame.len());
        let sent = self
            .to_writer
            .as_ref()
            .is_some_and(|tx| tx.send(std::mem::take(frame)).is_ok());
        if !sent {
            let e = self
                .take_write_error()
                .unwrap_or_else(|| self.closed("the connection is closed, cannot send"));
            return Err(self.explained(e));
        }
        let bound = self.next_bound.take().unwrap_or(self.max_message);
        let _ = self.credits.send(bound);
        self.spares.refill(frame, self.written.try_iter());
        Ok(())
    }

    fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        if let Some(detail) = &self.failed {
            return Err(self.closed(&format!("no more replies: {detail}")));
        }
        let timeout = whole_frame_wait(self.read_timeout, self.frame_timeout);
        let got = match timeout {
            None => self
                .from_reader
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
            Some(t) => self.from_reader.recv_timeout(t),
        };
        let frame = match got {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => {
                // A failed write explains a closed connection better than the read it caused.
                let e = self.explained(self.take_write_error().unwrap_or(e));
                self.failed = Some(e.to_string());
                return Err(e);
            }
            Err(RecvTimeoutError::Timeout) => {
                let t = timeout.unwrap_or_default();
                return Err(ProtocolError::Timeout {
                    detail: format!("no frame within {t:?} ({})", self.peer),
                });
            }
            Err(RecvTimeoutError::Disconnected) => {
                let e = self
                    .take_write_error()
                    .unwrap_or_else(|| self.closed("the connection closed before replying"));
                return Err(self.explained(e));
            }
        };
        self.heard = true;
        // The caller's own bound for this receive too (the reader held the frame to its request's).
        if let Err(e) = check_prefix(&frame, self.max_message) {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        let done = std::mem::replace(buf, frame);
        if done.capacity() > 0 {
            let _ = self.to_reader.send(done);
        }
        Ok(())
    }

    fn queues_frames(&self) -> bool {
        true
    }

    fn release_buffers(&mut self) {
        self.spares.release(self.written.try_iter());
    }

    fn max_message(&self) -> u32 {
        self.max_message
    }

    fn set_max_message(&mut self, max: u32) {
        self.max_message = max;
    }

    fn expect_reply(&mut self, max: u32) {
        self.next_bound = Some(max);
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }

    fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.frame_timeout = timeout;
    }
}

impl Drop for QueuedTransport {
    fn drop(&mut self) {
        // The writer writes what is queued, then shuts the socket down, which ends the reader.
        self.to_writer = None;
    }
}
