//! The hypervisor's side of `nk_paging`: EPT tables live in frames from the frame
//! allocator, touched through the identity map.

use nk_paging::TableMemory;

use crate::memory::{self, HostPhysAddr};

/// Table memory backed by the hypervisor's frame allocator.
#[derive(Debug, Default)]
pub struct FrameTables;

impl TableMemory for FrameTables {
    fn alloc_table(&mut self) -> Option<u64> {
        memory::alloc_zeroed_frame().map(HostPhysAddr::as_u64)
    }

    fn free_table(&mut self, paddr: u64) {
        if let Some(frame) = HostPhysAddr::new(paddr) {
            memory::free_frame(frame);
        }
    }

    fn table(&mut self, paddr: u64) -> &mut [u64; 512] {
        assert!(
            paddr.is_multiple_of(memory::PAGE_SIZE) && paddr < memory::IDENTITY_MAPPED_LIMIT,
            "bad table frame {paddr:#x}"
        );
        // SAFETY: `paddr` is a table frame this allocator handed out (nk_paging only walks
        // frames it got from `alloc_table` or read from entries it wrote), identity-mapped,
        // 4 KiB aligned, and used only by the one EPT that owns it; the borrow ends before
        // any other table is touched.
        unsafe { &mut *(paddr as *mut [u64; 512]) }
    }
}
