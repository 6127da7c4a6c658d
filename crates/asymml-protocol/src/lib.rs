//! asymml-protocol: the messages that cross the trust boundary between the trusted runtime and the untrusted
//! accelerator, their binary encoding and the transports (in-process, Unix socket, TCP).
//!
//! Nothing lives here yet: the engine runs in `trusted-only` mode, where no message crosses the boundary.
