//! asymml-untrusted: the accelerator service. It holds the public conv weights and their optimizer state and
//! computes Conv_U, ∇X and ∇W_U on residuals it is sent; it never sees a private tensor.
//!
//! Not implemented yet: the engine runs in `trusted-only` mode.
