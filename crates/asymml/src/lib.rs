//! The `asymml` command-line tool: datasets, commands, reports and plots.

pub mod accelerator;
pub mod alloc;
pub mod bench;
pub mod cli;
pub mod common;
pub mod data;
pub mod evaluate;
pub mod plot;
pub mod privacy;
pub mod train;
pub mod verify;
