//! The `asymml` command-line tool: datasets, commands, reports and plots. Public are only what the binary
//! (`main.rs`) and the integration tests use: the command-line definitions, the commands' entry points, the
//! counting allocator and the dataset readers.

pub mod accelerator;
pub mod alloc;
pub mod bench;
pub mod cli;
pub mod data;
pub mod evaluate;
pub mod keygen;
pub mod privacy;
pub mod train;
pub mod verify;

mod batch;
mod plot;
mod progress;
mod setup;
mod threads;
mod values;
mod weightfile;

/// Exit code of a command stopped by a failed integrity check of the accelerator's results.
pub const EXIT_INTEGRITY: i32 = 3;

/// True when `e` (or any error in its chain) is a failed integrity check.
pub fn is_integrity_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<asymml_core::CoreError>(),
            Some(asymml_core::CoreError::Integrity { .. })
        ) || matches!(
            c.downcast_ref::<asymml_trusted::SessionError>(),
            Some(asymml_trusted::SessionError::Core(
                asymml_core::CoreError::Integrity { .. }
            ))
        )
    })
}
