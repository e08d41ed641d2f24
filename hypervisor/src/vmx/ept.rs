//! The hypervisor's side of `nk_paging`: EPT tables live in frames from the frame
//! allocator, touched through the identity map.

use core::sync::atomic::AtomicU64;

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

    fn table(&mut self, paddr: u64) -> &[AtomicU64; 512] {
        assert!(
            paddr.is_multiple_of(memory::PAGE_SIZE) && paddr < memory::IDENTITY_MAPPED_LIMIT,
            "bad table frame {paddr:#x}"
        );
        // SAFETY: `paddr` is a table frame this allocator handed out (nk_paging only walks
        // frames it got from `alloc_table` or read from entries it wrote), identity-mapped,
        // 4 KiB aligned (AtomicU64 needs 8), and used only by the one EPT that owns it. The
        // CPU may write its entries while a guest runs, which is why they are atomics;
        // AtomicU64 has the layout of u64.
        unsafe { &*(paddr as *const [AtomicU64; 512]) }
    }
}

/// A guest's EPT in frames of this CPU's allocator. Dropping it invalidates the EPT's
/// cached translations on this CPU (INVEPT, SDM Vol. 3 §29.4.3.3) before its tables go
/// back to the allocator; if the CPU cannot invalidate, the tables are kept (leaked)
/// rather than handed to another owner with stale translations pointing through them.
///
/// Drop it on the CPU that ran the guest: a vCPU never migrates, so that is the only CPU
/// that can hold its translations (docs/tlb.md).
#[derive(Debug)]
pub struct GuestEpt {
    builder: Option<nk_paging::EptBuilder>,
    eptp: u64,
}

impl GuestEpt {
    /// Creates an empty EPT with the page sizes and A/D setting of `caps`.
    pub fn new(caps: &super::caps::VmxCaps) -> Result<Self, nk_paging::EptError> {
        let builder = nk_paging::EptBuilder::new(&mut FrameTables, caps.ept_2m, caps.ept_1g)?;
        let eptp = builder.eptp(caps.ept_ad);
        Ok(Self { builder: Some(builder), eptp })
    }

    /// Returns the EPT pointer for the VMCS.
    pub fn eptp(&self) -> u64 {
        self.eptp
    }

    /// Maps `[gpa, gpa + len)` to `[hpa, hpa + len)` (see `EptBuilder::map_range`).
    pub fn map_range(
        &mut self,
        gpa: u64,
        hpa: u64,
        len: u64,
        perms: nk_paging::EptPerms,
    ) -> Result<(), nk_paging::EptError> {
        match self.builder.as_mut() {
            Some(builder) => builder.map_range(&mut FrameTables, gpa, hpa, len, perms),
            None => Err(nk_paging::EptError::OutOfTables),
        }
    }
}

impl GuestEpt {
    /// Unmaps every page in `[gpa, gpa + len)` (pages not mapped are skipped). The caller
    /// invalidates (INVEPT) before the frames are reused.
    pub fn unmap_range(&mut self, gpa: u64, len: u64) {
        let Some(builder) = self.builder.as_mut() else { return };
        let mut at = gpa;
        while at < gpa.saturating_add(len) {
            let step = builder.unmap(&mut FrameTables, at).map_or(nk_paging::PAGE_4K, nk_paging::PageSize::bytes);
            at += step;
        }
    }

    /// Reads and clears the dirty flag of the page containing `gpa`; returns it and the
    /// page's size (a 4 KiB step where nothing is mapped).
    pub fn take_dirty(&mut self, gpa: u64) -> (bool, u64) {
        let Some(builder) = self.builder.as_mut() else { return (false, nk_paging::PAGE_4K) };
        let size = builder.translate(&mut FrameTables, gpa).map_or(nk_paging::PAGE_4K, |t| t.size.bytes());
        (builder.take_dirty(&mut FrameTables, gpa).unwrap_or(false), size)
    }

    /// Reads and clears the dirty flags of `pages` 4 KiB pages from `gpa`
    /// (`EptBuilder::take_dirty_pages`: `mark(first, count)` per dirty run).
    pub fn take_dirty_pages(&mut self, gpa: u64, pages: u64, mark: &mut dyn FnMut(u64, u64)) {
        if let Some(builder) = self.builder.as_mut() {
            builder.take_dirty_pages(&mut FrameTables, gpa, pages, mark);
        }
    }

    /// Reads the dirty flag of the page containing `gpa` without clearing it; returns it
    /// and the page's size (a 4 KiB step where nothing is mapped).
    pub fn peek_dirty(&mut self, gpa: u64) -> (bool, u64) {
        let Some(builder) = self.builder.as_mut() else { return (false, nk_paging::PAGE_4K) };
        builder
            .peek_dirty(&mut FrameTables, gpa)
            .map_or((false, nk_paging::PAGE_4K), |(dirty, size)| (dirty, size.bytes()))
    }

    /// Maps `[gpa, gpa + len)` to `[hpa, hpa + len)` with 4 KiB pages only (so dirty flags
    /// are per 4 KiB page); on error the pages mapped so far are unmapped again.
    pub fn map_range_4k(
        &mut self,
        gpa: u64,
        hpa: u64,
        len: u64,
        perms: nk_paging::EptPerms,
    ) -> Result<(), nk_paging::EptError> {
        let builder = self.builder.as_mut().ok_or(nk_paging::EptError::OutOfTables)?;
        let mut offset = 0;
        while offset < len {
            let mapped = builder.map(&mut FrameTables, gpa + offset, hpa + offset, nk_paging::PageSize::Size4K, perms);
            if let Err(e) = mapped {
                let mut undo = 0;
                while undo < offset {
                    let _ = builder.unmap(&mut FrameTables, gpa + undo);
                    undo += nk_paging::PAGE_4K;
                }
                return Err(e);
            }
            offset += nk_paging::PAGE_4K;
        }
        Ok(())
    }

    /// Tells whether the EPT pointer enables the accessed and dirty flags (bit 6).
    pub fn has_dirty_flags(&self) -> bool {
        self.eptp & (1 << 6) != 0
    }

    /// Sets the permissions of every page in `[gpa, gpa + len)` to `perms`.
    pub fn protect_range(&mut self, gpa: u64, len: u64, perms: nk_paging::EptPerms) {
        let Some(builder) = self.builder.as_mut() else { return };
        let mut at = gpa;
        while at < gpa.saturating_add(len) {
            let step = match builder.translate(&mut FrameTables, at) {
                Ok(t) => {
                    let _ = builder.protect(&mut FrameTables, at, perms);
                    t.size.bytes()
                }
                Err(_) => nk_paging::PAGE_4K,
            };
            at += step;
        }
    }
}

impl Drop for GuestEpt {
    fn drop(&mut self) {
        let Some(builder) = self.builder.take() else { return };
        match super::tlb::flush_ept(&super::capabilities(), self.eptp) {
            Ok(()) => builder.destroy(&mut FrameTables),
            Err(e) => {
                log::error!(target: "vmx", "INVEPT of EPTP {:#x} failed: {e}; its tables are not reused", self.eptp)
            }
        }
    }
}
