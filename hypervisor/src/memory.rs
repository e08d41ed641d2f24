//! Physical memory: the hypervisor's heap and its frame allocator, both fed only from
//! memory the boot loader reported available, minus the hypervisor image, the boot
//! information, the modules and the first MiB (firmware, the AP trampoline).
//!
//! Memory below 4 GiB is identity-mapped by the boot page tables, so a frame's physical
//! address is also the address the hypervisor uses to touch it.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use buddy_system_allocator::{FrameAllocator, LockedHeap};
use spin::Mutex;

/// Size of a page frame.
pub const PAGE_SIZE: u64 = 4096;
/// The boot page tables map this much; frames above it are not used yet.
pub const IDENTITY_MAPPED_LIMIT: u64 = 4 << 30;
/// The most bytes given to the heap; the rest of memory becomes frames.
const HEAP_MAX: u64 = 16 << 20;

/// A host-physical address (below 2^52, as the architecture allows).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPhysAddr(u64);

impl HostPhysAddr {
    /// Wraps `addr`, or returns None if it exceeds the 52-bit physical address space.
    pub const fn new(addr: u64) -> Option<Self> {
        if addr < (1 << 52) {
            Some(Self(addr))
        } else {
            None
        }
    }

    /// Returns the address as a number.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for HostPhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HPA({:#x})", self.0)
    }
}

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

static FRAMES: Mutex<FrameAllocator<32>> = Mutex::new(FrameAllocator::new());

/// Frames the allocator holds (runs counted as the allocator rounds them: a power of two).
static FREE_FRAMES: AtomicU64 = AtomicU64::new(0);

/// Returns how many frames the allocator holds now (logged at the start and the end of a
/// run: equal counts mean nothing leaked).
pub fn free_frame_count() -> u64 {
    FREE_FRAMES.load(Ordering::Relaxed)
}

/// Counts of what the allocators were given.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStats {
    pub heap_bytes: u64,
    pub frames_total: u64,
    pub ignored_above_4g: u64,
}

/// Gives the heap and the frame allocator the usable ranges `[start, end)` (page-aligned,
/// disjoint, already stripped of everything reserved). The heap takes the first range that
/// can hold a quarter of all usable memory (at most 16 MiB).
pub fn init(usable: impl Iterator<Item = (u64, u64)> + Clone) -> MemoryStats {
    let mut stats = MemoryStats {
        ignored_above_4g: usable.clone().map(|(start, end)| end.saturating_sub(start.max(IDENTITY_MAPPED_LIMIT))).sum(),
        ..MemoryStats::default()
    };
    let clipped = usable.filter_map(|(start, end)| {
        let end = end.min(IDENTITY_MAPPED_LIMIT);
        (start < end).then_some((start, end))
    });
    let total: u64 = clipped.clone().map(|(s, e)| e - s).sum();
    let heap_target = (total / 4).min(HEAP_MAX) & !(PAGE_SIZE - 1);

    // The heap first: the frame allocator keeps its free lists on it.
    let heap_range = clipped.clone().find(|&(start, end)| heap_target > 0 && end - start >= heap_target);
    if let Some((start, _)) = heap_range {
        // SAFETY: [start, start + heap_target) is available RAM that nothing else owns
        // (the caller removed every reserved range), identity-mapped, and is handed to
        // the heap exactly once.
        unsafe { HEAP.lock().add_to_heap(start as usize, (start + heap_target) as usize) };
        stats.heap_bytes = heap_target;
    }
    let mut frames = FRAMES.lock();
    for (start, end) in clipped {
        let frame_start = match heap_range {
            Some((heap_start, _)) if heap_start == start => start + heap_target,
            _ => start,
        };
        if frame_start < end {
            frames.add_frame((frame_start / PAGE_SIZE) as usize, (end / PAGE_SIZE) as usize);
            stats.frames_total += (end - frame_start) / PAGE_SIZE;
            FREE_FRAMES.fetch_add((end - frame_start) / PAGE_SIZE, Ordering::Relaxed);
        }
    }
    stats
}

/// Allocates `count` contiguous frames (aligned to the next power of two).
pub fn alloc_frames(count: usize) -> Option<HostPhysAddr> {
    let frame = FRAMES.lock().alloc(count)?;
    FREE_FRAMES.fetch_sub(count.next_power_of_two() as u64, Ordering::Relaxed);
    HostPhysAddr::new(frame as u64 * PAGE_SIZE)
}

/// Allocates one frame.
pub fn alloc_frame() -> Option<HostPhysAddr> {
    alloc_frames(1)
}

/// Allocates one frame filled with zeroes.
pub fn alloc_zeroed_frame() -> Option<HostPhysAddr> {
    let frame = alloc_frame()?;
    // SAFETY: the frame was just allocated (nobody else holds it) and is identity-mapped.
    unsafe { core::ptr::write_bytes(frame.as_u64() as *mut u8, 0, PAGE_SIZE as usize) };
    Some(frame)
}

/// Returns `count` frames starting at `frame` (as allocated by `alloc_frames`).
pub fn free_frames(frame: HostPhysAddr, count: usize) {
    FRAMES.lock().dealloc((frame.as_u64() / PAGE_SIZE) as usize, count);
    FREE_FRAMES.fetch_add(count.next_power_of_two() as u64, Ordering::Relaxed);
}

/// Returns one frame.
pub fn free_frame(frame: HostPhysAddr) {
    free_frames(frame, 1);
}

/// Returns the heap's (requested, total) bytes.
#[cfg_attr(not(feature = "test-harness"), allow(dead_code))]
pub fn heap_usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.stats_alloc_user(), heap.stats_total_bytes())
}
