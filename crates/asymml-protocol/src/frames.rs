//! Where the memory of frames is accounted. In a TEE the frames that cross the boundary live outside the
//! protected memory (an SGX enclave writes them to untrusted memory; a confidential VM to pages it shares with
//! the host), so a program that measures the trusted runtime's memory may count them apart: it sets a hook
//! that [`Client`](crate::Client) and the [`serve`](crate::serve) loop call around every allocation or growth of
//! a frame buffer (encoding a message into it, receiving one into it, and the transport's own buffers).
//!
//! Data read from a frame is either copied into the reader's memory first (the decoder) or read once per value
//! ([`ReceivedTensor`](crate::ReceivedTensor)'s users), so that a frame changed while it is read cannot show the
//! reader two different values.

use std::sync::OnceLock;

static HOOK: OnceLock<fn(bool)> = OnceLock::new();

/// Sets the hook: called with `true` before a frame buffer may be allocated on the calling thread and with
/// `false` after. It can be set once per process; false if it was set already.
pub fn set_frame_hook(hook: fn(bool)) -> bool {
    HOOK.set(hook).is_ok()
}

/// Runs `f`, which may allocate frame buffers, inside the hook's calls (if a hook is set).
pub(crate) fn framing<R>(f: impl FnOnce() -> R) -> R {
    match HOOK.get() {
        Some(hook) => {
            hook(true);
            let r = f();
            hook(false);
            r
        }
        None => f(),
    }
}
