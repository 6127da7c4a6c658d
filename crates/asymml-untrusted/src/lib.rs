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
