//! The error type of asymml-core.

use thiserror::Error;

/// Errors of the core library: shapes that do not fit, weight files that do not match a model, bad model specs.
#[derive(Debug, Error)]
pub enum CoreError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("model: {0}")]
    Model(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("{0}")]
    Invalid(String),
    /// A failure talking to the accelerator or a reply that failed validation (the split runtime).
    #[error("accelerator: {0}")]
    Accelerator(String),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`CoreError`].
pub type Result<T> = std::result::Result<T, CoreError>;
