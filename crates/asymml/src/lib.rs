//! The `asymml` command-line tool: datasets, commands, reports and plots. Public are only what the binary
//! (`main.rs`) and the integration tests use: the command-line definitions, the commands' entry points, the
//! counting allocator and the dataset readers.

pub mod accelerator;
pub mod alloc;
pub mod bench;
pub mod cli;
pub mod data;
pub mod evaluate;
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
