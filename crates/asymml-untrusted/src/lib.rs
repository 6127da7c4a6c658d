//! asymml-untrusted: the accelerator service. It holds the public conv weights and their optimizer state and
//! computes Conv_U = conv(X_U, W), ∇X = conv_transpose(∇Y, W) and ∇W_U = corr(X_U, ∇Y) on the residuals it
//! is sent; it never sees a private tensor. Backends, behind [`backend::ConvBackend`]: `cpu`
//! ([`backend::CpuBackend`]) and, with the `cuda` feature, `cuda:N` (`cuda::CudaBackend`: cuDNN on a GPU).

pub mod backend;
#[cfg(test)]
mod conformance;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod service;

pub use backend::{BackendError, ConvBackend, ConvLayer, CpuBackend, DeviceStats};
#[cfg(feature = "cuda")]
pub use cuda::CudaBackend;
pub use device::{open_backend, Device};
pub use service::Service;

static THREAD_START: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers a function that every worker thread of an accelerator's pools calls when it starts (the CLI
/// uses it to count the accelerator's memory apart from the trusted runtime's). The first call wins.
pub fn on_thread_start(f: fn()) {
    let _ = THREAD_START.set(f);
}

/// Called by each pool thread as it starts.
pub(crate) fn thread_started() {
    if let Some(f) = THREAD_START.get() {
        f();
    }
}
