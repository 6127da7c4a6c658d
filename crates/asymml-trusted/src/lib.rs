//! asymml-trusted: the trusted runtime. It owns the dataset, the labels, every activation, the nonlinearities
//! and the loss, and drives training and inference.
//!
//! Execution modes: `trusted-only` runs every layer here on the CPU layers of `asymml-core` (the TEE-only
//! baseline). The split runtime, which sends residuals to the untrusted accelerator, is built on the same
//! [`Session`] through `asymml_core::models::ConvExec`.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod integrity;
pub mod remote;
pub mod session;
pub mod split;

pub use session::{Mode, Session, SessionError, TrainConfig};
