//! Transcript recording: what crossed the boundary, frame by frame.
//!
//! [`Recording`] wraps any transport and keeps, for every frame sent and received, its direction, its decoded
//! message kind, its layer and its tensor payloads, so a test can check the leakage ledger: per convolution and
//! batch only `X_U`, `∇Y`, `∇W_T` (and the public weights) leave the trusted runtime.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::codec::decode_message;
use crate::error::Result;
use crate::message::MessageKind;
use crate::transport::Transport;

/// Direction of a recorded frame, seen from the wrapped end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Sent,
    Received,
}

/// A tensor payload of a recorded frame.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedTensor {
    /// The message field: `x_u`, `dy`, `dw_t`, `w`, `b` (requests), `y_u`, `dx`, `w`, `b` (replies).
    pub field: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One recorded frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub direction: Direction,
    /// The decoded kind; `None` when the frame did not decode (see `error`).
    pub kind: Option<MessageKind>,
    /// The layer the message is about, if any.
    pub layer: Option<u32>,
    /// Frame size in bytes, length prefix included.
    pub bytes: usize,
    /// The tensor payloads, in message order.
    pub tensors: Vec<RecordedTensor>,
    /// Why the frame did not decode.
    pub error: Option<String>,
}

/// A shared handle on a recording's transcript; stays readable after the [`Recording`] moved into a client.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    records: Arc<Mutex<Vec<Record>>>,
}

impl Transcript {
    /// A copy of the records so far.
    pub fn records(&self) -> Vec<Record> {
        self.lock().clone()
    }

    /// Takes the records so far, leaving the transcript empty.
    pub fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.lock())
    }

    /// Number of records so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Record>> {
        // A panic while pushing cannot leave the Vec inconsistent; keep recording.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, direction: Direction, frame: &[u8]) {
        let rec = match decode_message(frame, u32::MAX) {
            Ok(msg) => Record {
                direction,
                kind: Some(msg.kind()),
                layer: msg.layer(),
                bytes: frame.len(),
                tensors: msg
                    .into_tensors()
                    .into_iter()
                    .map(|(field, t)| RecordedTensor {
                        field,
                        shape: t.shape().to_vec(),
                        data: t.data().to_vec(),
                    })
                    .collect(),
                error: None,
            },
            Err(e) => Record {
                direction,
                kind: None,
                layer: None,
                bytes: frame.len(),
                tensors: Vec::new(),
                error: Some(e.to_string()),
            },
        };
        self.lock().push(rec);
    }
}

/// A transport that records every frame it carries (see the module documentation).
pub struct Recording<T: Transport> {
    inner: T,
    transcript: Transcript,
}

impl<T: Transport> Recording<T> {
    /// Wraps `inner` with an empty transcript.
    pub fn new(inner: T) -> Self {
        Recording {
            inner,
            transcript: Transcript::default(),
        }
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<Record> {
        self.transcript.records()
    }

    /// A shared handle on the transcript.
    pub fn transcript(&self) -> Transcript {
        self.transcript.clone()
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, unwrapped.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Transport> Transport for Recording<T> {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        self.transcript.push(Direction::Sent, frame);
        self.inner.send(frame)
    }

    fn send_vec(&mut self, frame: &mut Vec<u8>) -> Result<()> {
        self.transcript.push(Direction::Sent, frame);
        self.inner.send_vec(frame)
    }

    fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.recv_into(buf)?;
        self.transcript.push(Direction::Received, buf);
        Ok(())
    }

    fn release_buffers(&mut self) {
        self.inner.release_buffers()
    }

    fn expect_reply(&mut self, max: u32) {
        self.inner.expect_reply(max)
    }

    fn queues_frames(&self) -> bool {
        self.inner.queues_frames()
    }

    fn max_message(&self) -> u32 {
        self.inner.max_message()
    }

    fn set_max_message(&mut self, max: u32) {
        self.inner.set_max_message(max)
    }

    fn peer(&self) -> String {
        self.inner.peer()
    }
    fn set_frame_timeout(&mut self, timeout: Option<std::time::Duration>) {
        self.inner.set_frame_timeout(timeout)
    }
}
