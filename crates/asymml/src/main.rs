//! The `asymml` command.

use asymml_cli::cli::{Cli, Command};
use clap::Parser;

#[global_allocator]
static ALLOC: asymml_cli::alloc::Counting = asymml_cli::alloc::Counting;

/// Keeps large blocks in the heap once freed instead of returning them to the kernel: the network's
/// activations and the messages of every step have the same sizes, and a fresh mapping costs a page fault
/// per 4 KiB each time.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two ints (libc's parameter constants and plain values) and touches no memory of
    // ours: it only changes glibc's allocation policy. Called first thing in main, before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() {
    keep_freed_memory();
    // Frame buffers are counted apart from the trusted runtime's memory (in a TEE they are untrusted memory).
    asymml_protocol::set_frame_hook(asymml_cli::alloc::frame_hook);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => asymml_cli::train::run(a),
        Command::Eval(a) => asymml_cli::evaluate::run_eval(a),
        Command::Infer(a) => asymml_cli::evaluate::run_infer(a),
        Command::Bench(a) => asymml_cli::bench::run(a),
        Command::Accelerator(a) => asymml_cli::accelerator::run(a),
        Command::Keygen(a) => asymml_cli::keygen::run(a),
        Command::Privacy(a) => asymml_cli::privacy::run(a),
        Command::Verify(a) => match asymml_cli::verify::run(a) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        if asymml_cli::is_integrity_failure(&e) {
            eprintln!(
                "the accelerator returned a wrong result (or the connection to it was tampered with); it was \
                 not used, and the last checkpoint is intact"
            );
            std::process::exit(asymml_cli::EXIT_INTEGRITY);
        }
        std::process::exit(2);
    }
}
