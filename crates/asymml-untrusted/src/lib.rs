//! asymml-untrusted: the accelerator service. It holds the conv weights the trusted runtime sends (at
//! registration and after each of its optimizer steps) and computes Conv_U = conv(X_U, W),
//! ∇X = conv_transpose(∇Y, W) and ∇W_U = corr(X_U, ∇Y) on the residuals it is sent; it never sees a private
//! tensor. Backends, behind [`backend::ConvBackend`]: `cpu`
//! ([`backend::CpuBackend`]) and, with the `cuda` feature, `cuda:N` (`cuda::CudaBackend`: cuDNN on a GPU).

pub mod backend;
#[cfg(test)]
mod conformance;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod service;

pub use backend::{
    BackendError, ConvBackend, ConvLayer, CpuBackend, DeviceStats, MAX_CHANNELS, MAX_KERNEL,
    MAX_LAYERS, MAX_STRIDE,
};
#[cfg(feature = "cuda")]
pub use cuda::CudaBackend;
pub use device::{open_backend, Device};
pub use service::{Limits, Service};

/// The most worker threads one pool of the accelerator gets, whatever is asked.
pub const MAX_POOL_THREADS: usize = 256;

/// The size of a worker pool asked for `requested` threads (0: all cores): at most the cores and at most
/// [`MAX_POOL_THREADS`].
pub fn pool_threads(requested: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = if requested == 0 {
        cores
    } else {
        requested.min(cores)
    };
    n.clamp(1, MAX_POOL_THREADS)
}

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
