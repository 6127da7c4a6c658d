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
    /// A failure talking to the accelerator, or a reply that failed validation (the split runtime). The
    /// source says what failed: the request and the protocol's (or the accelerator's own) error.
    #[error("accelerator{}", at_conv(.conv))]
    Accelerator {
        /// The conv layer (its name in the network) the failed request was about, when there is one.
        conv: Option<String>,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A result or weight of the accelerator failed the trusted runtime's integrity (Freivalds) check: it is
    /// wrong, and was not used.
    #[error("integrity check failed at conv {conv}: {what}")]
    Integrity {
        /// The conv layer (its name in the network).
        conv: String,
        /// The quantity (`Y_U`, `∇X`, `∇W_U`) and by how much it missed.
        what: String,
    },
    #[error("i/o error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl CoreError {
    /// An accelerator failure about no layer in particular (`source`: what failed, e.g. a protocol error
    /// with the request as context, or a message).
    pub fn accelerator(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        CoreError::Accelerator {
            conv: None,
            source: source.into(),
        }
    }

    /// Names conv `name` as the layer of an accelerator failure that names none yet; other errors pass.
    pub fn at_conv(self, name: &str) -> Self {
        match self {
            CoreError::Accelerator { conv: None, source } => CoreError::Accelerator {
                conv: Some(name.to_string()),
                source,
            },
            other => other,
        }
    }
}

fn at_conv(conv: &Option<String>) -> String {
    conv.as_ref()
        .map(|c| format!(" (conv {c})"))
        .unwrap_or_default()
}

/// An error and its sources on one line, `outer: inner: …`, for the places that must pass an error on as text
/// (a reply to the other side, a log line). Each error's own message names only itself; its cause is its
/// source, so this says each thing once.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Result with [`CoreError`].
pub type Result<T> = std::result::Result<T, CoreError>;
