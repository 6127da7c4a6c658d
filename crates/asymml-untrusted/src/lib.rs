//! asymml-untrusted: the accelerator service. It holds the public conv weights and their optimizer state and
//! computes Conv_U = conv(X_U, W), ∇X = conv_transpose(∇Y, W) and ∇W_U = corr(X_U, ∇Y) on the residuals it
//! is sent; it never sees a private tensor. Backends: `cpu` (this crate's [`backend::CpuBackend`]).

pub mod backend;
pub mod service;

pub use backend::{BackendError, ConvLayer, CpuBackend};
pub use service::Service;
