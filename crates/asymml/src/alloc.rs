//! A counting global allocator: live and peak heap bytes per domain — the trusted runtime (every thread by
//! default) and the in-process accelerator (its threads call [`enter_accelerator`]). Each block carries its
//! domain in a header, so a block freed by another thread (a tensor handed across the boundary) is debited
//! to the domain that allocated it. The `asymml` binary installs it; `asymml bench` reports the peaks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Who allocated: the trusted runtime or the accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    Trusted = 0,
    Accelerator = 1,
}

thread_local! {
    static DOMAIN: Cell<u8> = const { Cell::new(0) };
}

static LIVE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static PEAK: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Marks the calling thread as the accelerator's: what it allocates from now on counts there.
pub fn enter_accelerator() {
    DOMAIN.with(|d| d.set(Domain::Accelerator as u8));
}

/// Whether the counting allocator is the global allocator of this process (false in library tests).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Live heap bytes of a domain.
pub fn live(d: Domain) -> usize {
    LIVE[d as usize].load(Ordering::Relaxed)
}

/// Peak heap bytes of a domain since the last [`reset_peak`].
pub fn peak(d: Domain) -> usize {
    PEAK[d as usize].load(Ordering::Relaxed)
}

/// Sets each domain's peak to its live bytes.
pub fn reset_peak() {
    for d in 0..2 {
        PEAK[d].store(LIVE[d].load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// The counting allocator (over the system allocator).
pub struct Counting;

/// Header bytes in front of each block: at least 16, and the block's alignment.
fn header(layout: &Layout) -> usize {
    layout.align().max(16)
}

fn add(d: usize, n: usize) {
    let now = LIVE[d].fetch_add(n, Ordering::Relaxed) + n;
    PEAK[d].fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every block handed out is `header` bytes into a System block of `size + header` bytes with the
// caller's alignment (the header is a multiple of it), and is given back to System with the same layout.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        let h = header(&layout);
        let Ok(full) = Layout::from_size_align(layout.size() + h, h) else {
            return std::ptr::null_mut();
        };
        let base = System.alloc(full);
        if base.is_null() {
            return base;
        }
        let d = DOMAIN.try_with(|d| d.get()).unwrap_or(0);
        base.add(h - 1).write(d);
        add(d as usize, layout.size());
        base.add(h)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header(&layout);
        let d = ptr.sub(1).read() as usize & 1;
        LIVE[d].fetch_sub(layout.size(), Ordering::Relaxed);
        let full = Layout::from_size_align_unchecked(layout.size() + h, h);
        System.dealloc(ptr.sub(h), full);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let h = header(&layout);
        let d = ptr.sub(1).read() as usize & 1;
        let full = Layout::from_size_align_unchecked(layout.size() + h, h);
        let base = System.realloc(ptr.sub(h), full, new_size + h);
        if base.is_null() {
            return base;
        }
        LIVE[d].fetch_sub(layout.size(), Ordering::Relaxed);
        add(d, new_size);
        base.add(h)
    }
}
