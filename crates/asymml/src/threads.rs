//! The worker threads of the trusted runtime's CPU kernels (rayon's global pool).

use anyhow::{bail, Result};

/// Builds the global rayon pool with `threads` workers (all cores when `None`); returns the pool's size.
pub(crate) fn init(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if n == 0 {
        bail!("--threads must be at least 1");
    }
    // A second call (tests) keeps the first pool; that is fine.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    // Frames of large tensors are filled and read on as many threads (this thread's, the trusted runtime's).
    asymml_protocol::codec::set_copy_threads(n);
    Ok(rayon::current_num_threads())
}

/// Runs `f` on one of the global pool's workers (this thread waits): the trusted runtime's own work then runs
/// on the pool's threads only, as its kernels do, so no product called from it keeps a GEMM packing buffer on
/// a thread of its own, and no parallel loop is handed from this thread to the pool. `threads`: the copy
/// threads of [`init`], set again on that worker (they are the thread's own).
pub(crate) fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| {
        asymml_protocol::codec::set_copy_threads(threads);
        f()
    })
}
