//! A counting global allocator: live and peak heap bytes per domain — the trusted runtime (every thread by
//! default), the in-process accelerator (its threads call [`enter_accelerator`]) and the frames that cross the
//! boundary (allocated inside [`frame_hook`]'s calls, which the protocol makes around every frame buffer: in a
//! TEE they are untrusted memory, not the trusted runtime's). Each block carries its domain in a header, so a
//! block freed by another thread (a tensor handed across the boundary) is debited to the domain that
//! allocated it. The `asymml` binary installs it; `asymml bench` reports the peaks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Who allocated: the trusted runtime or the accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    Trusted = 0,
    Accelerator = 1,
    /// Frame buffers, of either side.
    Frames = 2,
}

const DOMAINS: usize = 3;

thread_local! {
    static DOMAIN: Cell<u8> = const { Cell::new(0) };
    /// The thread's domain before [`frame_hook`]'s `true`.
    static SAVED: Cell<u8> = const { Cell::new(0) };
}

static LIVE: [AtomicUsize; DOMAINS] = [const { AtomicUsize::new(0) }; DOMAINS];
static PEAK: [AtomicUsize; DOMAINS] = [const { AtomicUsize::new(0) }; DOMAINS];
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Marks the calling thread as the accelerator's: what it allocates from now on counts there.
pub fn enter_accelerator() {
    DOMAIN.with(|d| d.set(Domain::Accelerator as u8));
}

/// The protocol's frame hook (see `asymml_protocol::set_frame_hook`): `true` counts what the calling thread
/// allocates next to [`Domain::Frames`], `false` goes back to its domain before.
pub fn frame_hook(enter: bool) {
    let _ = DOMAIN.try_with(|d| {
        if enter {
            let _ = SAVED.try_with(|s| s.set(d.get()));
            d.set(Domain::Frames as u8);
        } else {
            d.set(SAVED.try_with(|s| s.get()).unwrap_or(0));
        }
    });
}

/// Domain index of a block's tag byte.
fn domain_of(tag: u8) -> usize {
    (tag as usize).min(DOMAINS - 1)
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
    for d in 0..DOMAINS {
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

/// A block for `layout` from `system` (System's `alloc` or `alloc_zeroed`), `header` bytes into a System block
/// whose last header byte tags the calling thread's domain, counted to that domain; null if System fails.
///
/// # Safety
/// `system` must be one of System's allocation functions (it is given a valid, non-zero-sized layout).
unsafe fn tagged(layout: Layout, system: unsafe fn(&System, Layout) -> *mut u8) -> *mut u8 {
    INSTALLED.store(true, Ordering::Relaxed);
    let h = header(&layout);
    // No overflow: a Layout's size is at most isize::MAX − (align − 1), and h is the align or 16.
    let Ok(full) = Layout::from_size_align(layout.size() + h, h) else {
        return std::ptr::null_mut();
    };
    // SAFETY: `full` has a non-zero size (h ≥ 16), and `system` is System's (the caller's contract).
    let base = unsafe { system(&System, full) };
    if base.is_null() {
        return base;
    }
    let d = DOMAIN.try_with(|d| d.get()).unwrap_or(0);
    // SAFETY: `base` points to `layout.size() + h` writable bytes with h ≥ 16, so the tag byte at h − 1 and
    // the caller's block at h (aligned to h, hence to `layout.align()`) both lie inside it.
    let block = unsafe {
        base.add(h - 1).write(d);
        base.add(h)
    };
    add(domain_of(d), layout.size());
    block
}

// SAFETY: every block handed out is `header` bytes into a System block of `size + header` bytes aligned to the
// header (a power of two, a multiple of the caller's alignment), whose last header byte tags the domain; it is
// given back to System with that same layout (its size follows `realloc`, which keeps the header).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: System's `alloc` is a valid system allocation for `tagged`.
        unsafe { tagged(layout, <System as GlobalAlloc>::alloc) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // System's zeroed allocation (calloc): fresh pages are zero already and stay untouched — a zero
        // gradient or buffer that is never written costs no resident memory.
        // SAFETY: System's `alloc_zeroed` is a valid system allocation for `tagged`.
        unsafe { tagged(layout, <System as GlobalAlloc>::alloc_zeroed) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header(&layout);
        // SAFETY: GlobalAlloc's contract: `ptr` came from this allocator with this `layout`, so it is h bytes
        // into a live System block whose domain tag is at `ptr − 1`, made with the valid layout
        // (`layout.size() + h`, h).
        let d = domain_of(unsafe { ptr.sub(1).read() });
        LIVE[d].fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as just above: this gives the System block back with the layout it was made with.
        unsafe {
            let full = Layout::from_size_align_unchecked(layout.size() + h, h);
            System.dealloc(ptr.sub(h), full);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let h = header(&layout);
        // System's precondition: the new size, rounded up to h, must not overflow isize::MAX. The caller only
        // promises it for `layout.align()`, which may be smaller than h, so check it (null: the old block stays).
        if new_size
            .checked_add(h)
            .is_none_or(|n| Layout::from_size_align(n, h).is_err())
        {
            return std::ptr::null_mut();
        }
        // SAFETY: as in `dealloc`, `ptr − h` starts a live System block of layout (`layout.size() + h`, h) with
        // its domain tag at `ptr − 1`; `new_size + h` is non-zero and valid for alignment h (checked above).
        let (d, base) = unsafe {
            let d = domain_of(ptr.sub(1).read());
            let full = Layout::from_size_align_unchecked(layout.size() + h, h);
            (d, System.realloc(ptr.sub(h), full, new_size + h))
        };
        if base.is_null() {
            return base;
        }
        LIVE[d].fetch_sub(layout.size(), Ordering::Relaxed);
        add(d, new_size);
        // SAFETY: the new System block holds `new_size + h` bytes (the header was copied with the rest), so
        // offset h is inside it, aligned to h.
        unsafe { base.add(h) }
    }
}
