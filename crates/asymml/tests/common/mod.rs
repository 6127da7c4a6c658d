//! What the end-to-end tests share: running the `asymml` binary and reading its output.
// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `asymml` with `args` (two rayon threads, as on CI) and returns its output.
pub fn asymml(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_asymml"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run asymml")
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
