//! What the end-to-end tests share: running the `asymml` binary and reading its output.
// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `asymml` with `args` (two rayon threads, as on CI) and returns its output.
pub fn asymml(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_asymml"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run asymml")
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One end of a connection that hands every frame it sends to `hook` first, which may change it or take its
/// time (a lying accelerator, a slow link); the rest goes to `inner` as is.
pub struct SendHook<T, F> {
    pub inner: T,
    pub hook: F,
}

impl<T: asymml_protocol::Transport, F: FnMut(&mut Vec<u8>)> asymml_protocol::Transport
    for SendHook<T, F>
{
    fn send(&mut self, frame: &[u8]) -> asymml_protocol::Result<()> {
        let mut v = frame.to_vec();
        self.send_vec(&mut v)
    }

    fn send_vec(&mut self, frame: &mut Vec<u8>) -> asymml_protocol::Result<()> {
        (self.hook)(frame);
        self.inner.send_vec(frame)
    }

    fn recv_into(&mut self, buf: &mut Vec<u8>) -> asymml_protocol::Result<()> {
        self.inner.recv_into(buf)
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
}
