//! The heap: Rust's global allocator over exo frames. It starts empty at `HEAP_BASE` and
//! grows by allocating frames and mapping them at its end; freed blocks are not reused
//! (a bump allocator: enough for a map that mostly grows).

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::exo::{Exo, PAGE};
use crate::HEAP_BASE;

/// Frames are mapped this many pages at a time.
const CHUNK_PAGES: u64 = 16;

struct ExoHeap {
    /// The next free byte and the end of what is mapped.
    next: AtomicU64,
    end: AtomicU64,
    /// The exo AM id and the address-space capability (low, high), once `init` ran.
    am: AtomicU64,
    aspace_low: AtomicU64,
    aspace_high: AtomicU64,
}

#[global_allocator]
static HEAP: ExoHeap = ExoHeap {
    next: AtomicU64::new(HEAP_BASE),
    end: AtomicU64::new(HEAP_BASE),
    am: AtomicU64::new(0),
    aspace_low: AtomicU64::new(0),
    aspace_high: AtomicU64::new(0),
};

/// Gives the heap the capabilities it grows with.
pub fn init(exo: Exo) {
    HEAP.am.store(u64::from(exo.am), Ordering::Relaxed);
    HEAP.aspace_low.store(exo.aspace.low, Ordering::Relaxed);
    HEAP.aspace_high.store(exo.aspace.high, Ordering::Relaxed);
}

/// Returns the bytes mapped for the heap.
pub fn mapped() -> u64 {
    HEAP.end.load(Ordering::Relaxed) - HEAP_BASE
}

/// Returns the end of the mapped heap.
pub fn end() -> u64 {
    HEAP.end.load(Ordering::Relaxed)
}

impl ExoHeap {
    fn exo(&self) -> Exo {
        Exo {
            am: self.am.load(Ordering::Relaxed) as u16,
            aspace: nk_guest::nk::Cap {
                low: self.aspace_low.load(Ordering::Relaxed),
                high: self.aspace_high.load(Ordering::Relaxed),
            },
        }
    }

    /// Maps frames until `[.., want)` is mapped; false when the exo AM refuses.
    fn grow_to(&self, want: u64) -> bool {
        while self.end.load(Ordering::Relaxed) < want {
            let end = self.end.load(Ordering::Relaxed);
            let missing = (want - end).div_ceil(PAGE);
            let pages = missing.div_ceil(CHUNK_PAGES) * CHUNK_PAGES;
            if self.exo().alloc_map(pages, end).is_err() {
                return false;
            }
            self.end.store(end + pages * PAGE, Ordering::Relaxed);
        }
        true
    }
}

// SAFETY: single-threaded guest (one vCPU, no interrupts): the atomics only make the
// statics Sync. Blocks are carved from mapped, otherwise unused memory, aligned as asked,
// and never handed out twice.
unsafe impl GlobalAlloc for ExoHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let next = self.next.load(Ordering::Relaxed);
        let start = next.next_multiple_of(layout.align() as u64);
        let Some(end) = start.checked_add(layout.size() as u64) else { return core::ptr::null_mut() };
        if !self.grow_to(end) {
            return core::ptr::null_mut();
        }
        self.next.store(end, Ordering::Relaxed);
        start as *mut u8
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}
