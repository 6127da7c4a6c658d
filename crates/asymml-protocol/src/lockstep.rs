//! A trusted end that lets its peer work only while it waits: each frame is held until the reply before it has
//! come and a reply is waited for, and then sent alone. The two sides then never compute at once.
//!
//! This is a measurement aid (`asymml bench --lockstep`). On a machine whose cores the two sides share, each
//! slows the other down while both run: they compete for the memory bus and the shared cache. With a GPU (or
//! another machine) as the accelerator they do not, and what the trusted runtime's own work costs is its time
//! measured alone. Every request still has exactly one reply, in order, so the protocol is unchanged; only the
//! moments at which frames leave differ.

use crate::error::Result;
use crate::transport::Transport;
use std::collections::VecDeque;
use std::time::Duration;

/// Frames held at most before the oldest is sent anyway (so that a caller sending many requests without
/// waiting cannot make this end hold them all).
const MOST_HELD: usize = 64;

/// Wraps the trusted end `T` of a transport (see the module documentation).
pub struct LockstepTransport<T: Transport> {
    inner: T,
    /// Frames given to send and not sent yet, oldest first, each with the bound of its reply.
    held: VecDeque<(Vec<u8>, Option<u32>)>,
    /// The bound [`Transport::expect_reply`] gave for the frame sent next.
    bound: Option<u32>,
    /// Frames sent whose replies have not been received.
    outstanding: usize,
    /// Buffers the inner end gave back for reuse, handed to the caller's next frame.
    spares: Vec<Vec<u8>>,
}

impl<T: Transport> LockstepTransport<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: VecDeque::new(),
            bound: None,
            outstanding: 0,
            spares: Vec::new(),
        }
    }

    /// Sends the oldest held frame.
    fn release_one(&mut self) -> Result<()> {
        let Some((mut frame, bound)) = self.held.pop_front() else {
            return Ok(());
        };
        if let Some(b) = bound {
            self.inner.expect_reply(b);
        }
        self.inner.send_vec(&mut frame)?;
        self.outstanding += 1;
        if frame.capacity() > 0 {
            frame.clear();
            self.spares.push(frame);
        }
        Ok(())
    }
}

impl<T: Transport> Transport for LockstepTransport<T> {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        self.send_vec(&mut frame.to_vec())
    }

    fn send_vec(&mut self, frame: &mut Vec<u8>) -> Result<()> {
        let bound = self.bound.take();
        self.held.push_back((std::mem::take(frame), bound));
        if self.held.len() > MOST_HELD {
            self.release_one()?;
        }
        // The caller's next frame is encoded into a buffer the peer is done with, as the inner end would give.
        if let Some(spare) = self.spares.pop() {
            *frame = spare;
        }
        Ok(())
    }

    fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        // The peer gets the request whose reply is waited for now, and only it.
        if self.outstanding == 0 {
            self.release_one()?;
        }
        self.inner.recv_into(buf)?;
        self.outstanding = self.outstanding.saturating_sub(1);
        Ok(())
    }

    fn max_message(&self) -> u32 {
        self.inner.max_message()
    }

    fn set_max_message(&mut self, max: u32) {
        self.inner.set_max_message(max)
    }

    fn peer(&self) -> String {
        format!("{} (lockstep)", self.inner.peer())
    }

    fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_frame_timeout(timeout)
    }

    fn expect_reply(&mut self, max: u32) {
        self.bound = Some(max);
    }

    fn release_buffers(&mut self) {
        self.spares = Vec::new();
        self.inner.release_buffers()
    }

    fn queues_frames(&self) -> bool {
        // Frames are held here without waiting for the peer.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::inproc_pair;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// The peer sees each request only once the trusted end waits for its reply, one at a time, and every
    /// reply comes back to the request it answers, in order.
    #[test]
    fn the_peer_gets_each_frame_only_when_its_reply_is_waited_for() {
        let (mut peer, trusted) = inproc_pair();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let server = std::thread::spawn(move || {
            while let Ok(frame) = peer.recv() {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut reply = frame.clone();
                reply[4] = b'r';
                if peer.send(&reply).is_err() {
                    break;
                }
            }
        });
        let mut t = LockstepTransport::new(trusted);
        let frame = |i: u8| {
            let body = [b'q', i];
            let mut f = (body.len() as u32).to_le_bytes().to_vec();
            f.extend_from_slice(&body);
            f
        };
        for i in 0..3 {
            t.send(&frame(i)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            seen.load(Ordering::SeqCst),
            0,
            "nothing leaves before a reply is waited for"
        );
        for i in 0..3u8 {
            let reply = t.recv().unwrap();
            let mut want = frame(i);
            want[4] = b'r';
            assert_eq!(reply, want, "reply {i} answers request {i}");
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(
                seen.load(Ordering::SeqCst),
                i as usize + 1,
                "one request at a time"
            );
        }
        drop(t);
        server.join().unwrap();
    }
}
