//! Incremental snapshots of the heap through the EPT dirty bits (the exo AM's `dirty`):
//! each snapshot copies only the pages written since the last one.

use nk_guest::nk::Cap;

use crate::exo::{why, Exo, Why, PAGE};
use crate::{heap, HEAP_BASE, SNAPSHOT_BASE};

/// Where the dirty bitmap is mapped (one page: 32,768 pages of heap).
const BITMAP: u64 = 0x3800_0000;
const MAX_PAGES: u64 = 8 * PAGE;

pub struct Snapshot {
    exo: Exo,
    bitmap: Cap,
    /// The end of the snapshot region mapped so far (mirrors the heap's end).
    end: u64,
    taken: u64,
    /// Whether the dirty pages come from the PML log (else from an A/D scan).
    pml: bool,
}

impl Snapshot {
    pub fn new(exo: Exo) -> Result<Self, Why> {
        let bitmap = exo.alloc_map(1, BITMAP).map_err(|s| why(format_args!("bitmap: {s}")))?;
        Ok(Self { exo, bitmap, end: SNAPSHOT_BASE, taken: 0, pml: false })
    }

    /// From now on finds the dirty pages in the PML log (SDM Vol. 3 §29.3.6): turns PML on
    /// for the largest heap, right after a snapshot (so no write falls between the two
    /// ways of tracking).
    pub fn switch_to_pml(&mut self) -> Result<(), Why> {
        self.exo.pml_enable(HEAP_BASE, MAX_PAGES).map_err(|s| why(format_args!("pml-enable: {s}")))?;
        self.pml = true;
        Ok(())
    }

    /// Names how the dirty pages are found.
    pub fn method(&self) -> &'static str {
        if self.pml {
            "PML"
        } else {
            "A/D scan"
        }
    }

    /// Takes a snapshot: grows the copy to the heap's size, reads and clears the heap's
    /// dirty bits, and copies the dirty pages (every page the first time). Returns (pages
    /// copied, heap pages).
    pub fn take(&mut self) -> Result<(u64, u64), Why> {
        let heap_bytes = heap::end() - HEAP_BASE;
        let want = SNAPSHOT_BASE + heap_bytes;
        if want > self.end {
            let pages = (want - self.end) / PAGE;
            self.exo.alloc_map(pages, self.end).map_err(|s| why(format_args!("grow the snapshot: {s}")))?;
            self.end = want;
        }
        let pages = heap_bytes / PAGE;
        if pages == 0 || pages > MAX_PAGES {
            return Err(why(format_args!("{pages} heap pages")));
        }
        if self.pml {
            self.exo.pml_drain(self.bitmap).map_err(|s| why(format_args!("pml-drain: {s}")))?;
        } else {
            self.exo.dirty(self.bitmap, HEAP_BASE, pages).map_err(|s| why(format_args!("dirty: {s}")))?;
        }
        let first = self.taken == 0;
        self.taken += 1;
        let mut copied = 0;
        for page in 0..pages {
            // SAFETY: the bitmap page is mapped at BITMAP and holds `pages` bits.
            let byte = unsafe { core::ptr::read_volatile((BITMAP + page / 8) as *const u8) };
            if first || byte & (1 << (page % 8)) != 0 {
                let (from, to) = (HEAP_BASE + page * PAGE, SNAPSHOT_BASE + page * PAGE);
                // SAFETY: both pages are mapped (the heap up to its end, the copy grown to
                // match above) and do not overlap; nothing else uses the copy.
                unsafe { core::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, PAGE as usize) };
                copied += 1;
            }
        }
        Ok((copied, pages))
    }

    /// Tells whether the copy equals the live heap byte for byte.
    pub fn equals_live(&self) -> bool {
        let bytes = heap::end() - HEAP_BASE;
        (0..bytes / 8).all(|word| {
            // SAFETY: both ranges are mapped (see `take`); reads only.
            let (live, copy) = unsafe {
                (
                    core::ptr::read_volatile((HEAP_BASE + word * 8) as *const u64),
                    core::ptr::read_volatile((SNAPSHOT_BASE + word * 8) as *const u64),
                )
            };
            live == copy
        })
    }
}
