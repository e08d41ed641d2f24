//! The hypervisor's own page tables: the boot tables' identity map of the low 4 GiB (the
//! top GiB, MMIO, uncached), made W^X with execute-disable in place (SDM Vol. 3 §4.5, §4.6): the image's `.text` is read-only and
//! executable, the boot header and `.rodata` read-only, and everything else (data, `.bss`,
//! heap, frames, stacks, firmware areas, MMIO) writable and never executable. The only
//! executable page outside `.text` is the AP trampoline, and only until the APs started.
//!
//! Every stack has an unmapped guard page below it (the boot stack, the BSP's IST stacks,
//! and each AP's stack and IST stacks): an overflow takes a page fault and, with no stack
//! left to push on, a double fault on its own IST stack, whose handler prints the register
//! dump. Guard pages inside 2 MiB mappings split them into 4 KiB pages.

use alloc::vec::Vec;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use spin::Mutex;

use crate::memory::{self, IDENTITY_MAPPED_LIMIT, PAGE_SIZE};
use crate::percpu::MAX_CPUS;
use crate::smp::AP_TRAMPOLINE_BASE;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const EXECUTE_DISABLE: u64 = 1 << 63;
const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
const LARGE_PAGE: u64 = 2 << 20;
const MSR_EFER: u32 = 0xC000_0080;
const EFER_NXE: u64 = 1 << 11;

unsafe extern "C" {
    static __image_start: u8;
    static __text_start: u8;
    static __rodata_start: u8;
    static __data_start: u8;
    static __image_end: u8;
    static nk_boot_stack_guard: u8;
    static nk_boot_pml4: u8;
}

/// How many 2 MiB regions at the bottom of memory get 4 KiB pages (the image must end
/// within them).
const SMALL_PAGE_REGIONS: usize = 2;

/// The page tables of the small-page regions, in .bss: the map is built in the boot tables
/// without taking frames, so it does not change what the allocators hand out.
#[repr(C, align(4096))]
struct SmallPageTables(core::cell::UnsafeCell<[[u64; 512]; SMALL_PAGE_REGIONS]>);

// SAFETY: written only by `install` on the BSP before any other CPU runs; afterwards only
// the page walker and `CHANGES`-serialised updates touch them, through raw pointers.
unsafe impl Sync for SmallPageTables {}

static SMALL_PAGE_TABLES: SmallPageTables =
    SmallPageTables(core::cell::UnsafeCell::new([[0; 512]; SMALL_PAGE_REGIONS]));

/// Every guard page unmapped so far (4 per CPU), for the self-test.
static GUARDS: [AtomicU64; 4 * MAX_CPUS] = [const { AtomicU64::new(0) }; 4 * MAX_CPUS];
static GUARD_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Serialises changes to the live tables.
static CHANGES: Mutex<()> = Mutex::new(());

fn symbol(s: &u8) -> u64 {
    s as *const u8 as u64
}

fn record_guard(page: u64) {
    let index = GUARD_COUNT.fetch_add(1, Ordering::AcqRel);
    if let Some(slot) = GUARDS.get(index) {
        slot.store(page, Ordering::Release);
    }
}

/// Returns whether this CPU runs with EFER.NXE (set by the long-mode entry where the CPU
/// has execute-disable).
pub fn nx_enabled() -> bool {
    // SAFETY: IA32_EFER exists on every CPU in long mode.
    unsafe { x86::msr::rdmsr(MSR_EFER) & EFER_NXE != 0 }
}

/// Turns the boot page tables (entry.S: the low 4 GiB in 2 MiB pages, all RWX) into the
/// hypervisor's W^X map, in place, on the BSP before any AP runs: the 2 MiB regions that
/// hold the image get 4 KiB pages with the image's permissions, every other region
/// execute-disable. `bsp_guards` are the guard pages of the BSP's IST stacks. Returns why
/// it could not (the boot tables stay as they were then).
pub fn install(bsp_guards: &[u64]) -> Result<(), &'static str> {
    let nx = if nx_enabled() { EXECUTE_DISABLE } else { 0 };
    // SAFETY: linker-script and entry.S symbols; only their addresses are taken.
    let (image_start, text, rodata, data, image_end, boot_guard, pml4) = unsafe {
        (
            symbol(&__image_start),
            symbol(&__text_start),
            symbol(&__rodata_start),
            symbol(&__data_start),
            symbol(&__image_end),
            symbol(&nk_boot_stack_guard),
            symbol(&nk_boot_pml4),
        )
    };
    let small_pages_end = image_end.next_multiple_of(LARGE_PAGE);
    if small_pages_end > SMALL_PAGE_REGIONS as u64 * LARGE_PAGE {
        return Err("the image ends past the regions with small-page tables");
    }
    if current_pml4() != pml4 {
        return Err("not running on the boot page tables");
    }
    let guards = || bsp_guards.iter().copied().chain([boot_guard]);
    let page_flags = |pa: u64| -> u64 {
        if guards().any(|guard| guard == pa) {
            0
        } else if pa == AP_TRAMPOLINE_BASE {
            PRESENT | WRITABLE
        } else if (text..rodata).contains(&pa) {
            PRESENT
        } else if (image_start..text).contains(&pa) || (rodata..data).contains(&pa) {
            PRESENT | nx
        } else {
            PRESENT | WRITABLE | nx
        }
    };
    let pdpt = read_entry(pml4, 0) & ADDRESS;
    let tables = SMALL_PAGE_TABLES.0.get() as u64;
    for gib in 0..(IDENTITY_MAPPED_LIMIT >> 30) as usize {
        let pd = read_entry(pdpt, gib) & ADDRESS;
        for index in 0..512 {
            let base = ((gib as u64) << 30) + index as u64 * LARGE_PAGE;
            let entry = read_entry(pd, index);
            let new = if base < small_pages_end {
                let pt = tables + (base / LARGE_PAGE) * PAGE_SIZE;
                for page in 0..512 {
                    let pa = base + page as u64 * PAGE_SIZE;
                    let flags = page_flags(pa);
                    write_entry(pt, page, if flags == 0 { 0 } else { pa | flags });
                }
                pt | PRESENT | WRITABLE
            } else {
                entry | nx
            };
            write_entry(pd, index, new);
        }
    }
    guards().for_each(record_guard);
    // SAFETY: the tables still map the low 4 GiB to the same frames with the same cache
    // attributes; only permissions changed and the guard pages, which nothing uses yet, went
    // away. The code running now is in .text (present, executable) and its stack is the
    // boot stack (writable). Reloading CR3 drops the old translations of this CPU, the
    // only one running.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
    Ok(())
}

fn write_entry(table: u64, index: usize, value: u64) {
    debug_assert!(index < 512);
    // SAFETY: `table` is a page-table frame of the hypervisor (identity-mapped, writable),
    // and `index` is below 512.
    unsafe { ((table + index as u64 * 8) as *mut u64).write_volatile(value) };
}

fn read_entry(table: u64, index: usize) -> u64 {
    // SAFETY: as in `write_entry`.
    unsafe { ((table + index as u64 * 8) as *const u64).read_volatile() }
}

fn current_pml4() -> u64 {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    cr3 & ADDRESS
}

fn indices(va: u64) -> [usize; 4] {
    [(va >> 39) as usize & 511, (va >> 30) as usize & 511, (va >> 21) as usize & 511, (va >> 12) as usize & 511]
}

/// What the live tables say about one address.
#[cfg_attr(not(feature = "test-harness"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageInfo {
    pub present: bool,
    pub writable: bool,
    pub executable: bool,
}

/// Walks this CPU's page tables for `va` (permissions combined over every level, SDM
/// Vol. 3 §4.6.1).
#[cfg_attr(not(feature = "test-harness"), allow(dead_code))]
pub fn page_info(va: u64) -> PageInfo {
    let mut table = current_pml4();
    let (mut writable, mut executable) = (true, true);
    for (level, index) in indices(va).into_iter().enumerate() {
        let entry = read_entry(table, index);
        if entry & PRESENT == 0 {
            return PageInfo { present: false, writable: false, executable: false };
        }
        writable &= entry & WRITABLE != 0;
        executable &= entry & EXECUTE_DISABLE == 0 || !nx_enabled();
        if level == 3 || (level > 0 && entry & HUGE != 0) {
            break;
        }
        table = entry & ADDRESS;
    }
    PageInfo { present: true, writable, executable }
}

/// Finds (splitting a 2 MiB page if needed) the 4 KiB entry of `va`; returns the table
/// that holds it and the index. Only for identity-mapped low memory.
fn leaf_entry(va: u64) -> Result<(u64, usize), &'static str> {
    if va >= IDENTITY_MAPPED_LIMIT {
        return Err("address above the identity map");
    }
    let [i4, i3, i2, i1] = indices(va);
    let pdpt = read_entry(current_pml4(), i4) & ADDRESS;
    let pd = read_entry(pdpt, i3) & ADDRESS;
    let pde = read_entry(pd, i2);
    if pde & HUGE == 0 {
        return Ok((pde & ADDRESS, i1));
    }
    let pt = memory::alloc_zeroed_frame().ok_or("no memory for a page table")?.as_u64();
    let base = pde & ADDRESS & !(LARGE_PAGE - 1);
    let flags = pde & (PRESENT | WRITABLE | WRITE_THROUGH | CACHE_DISABLE | EXECUTE_DISABLE);
    for page in 0..512 {
        write_entry(pt, page, (base + page as u64 * PAGE_SIZE) | flags);
    }
    write_entry(pd, i2, pt | PRESENT | WRITABLE);
    invalidate(va);
    Ok((pt, i1))
}

fn invalidate(va: u64) {
    // SAFETY: INVLPG only drops translations.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}

/// Unmaps the page at `va` so that a stack growing into it faults. Other CPUs may keep a
/// stale translation of it until their next CR3 load: callers pass pages no CPU has used
/// (a new AP's stacks, before it starts).
pub fn unmap_guard(va: u64) -> Result<(), &'static str> {
    let _changes = CHANGES.lock();
    let (table, index) = leaf_entry(va & !(PAGE_SIZE - 1))?;
    write_entry(table, index, 0);
    invalidate(va);
    record_guard(va & !(PAGE_SIZE - 1));
    Ok(())
}

/// Makes the AP trampoline page non-executable once every AP has left it.
pub fn seal_trampoline() {
    let _changes = CHANGES.lock();
    if let Ok((table, index)) = leaf_entry(AP_TRAMPOLINE_BASE) {
        let nx = if nx_enabled() { EXECUTE_DISABLE } else { 0 };
        write_entry(table, index, AP_TRAMPOLINE_BASE | PRESENT | WRITABLE | nx);
        invalidate(AP_TRAMPOLINE_BASE);
    }
}

/// Returns every guard page (for the self-test).
#[cfg_attr(not(feature = "test-harness"), allow(dead_code))]
pub fn guards() -> Vec<u64> {
    let count = GUARD_COUNT.load(Ordering::Acquire).min(GUARDS.len());
    GUARDS[..count].iter().map(|g| g.load(Ordering::Acquire)).collect()
}

/// Returns the address of the page table of this CPU, for the AP trampoline.
pub fn root() -> u64 {
    current_pml4()
}

/// Identity-maps `[start, start + size)`, which lies above the boot tables' 4 GiB (e.g.
/// persistent memory the NFIT places there), writable, write-back cacheable and
/// non-executable, with 2 MiB pages in new page directories from the frame allocator
/// (SDM Vol. 3 §4.5). Both bounds must be 2 MiB-aligned and the range must end within
/// the first PML4 entry's 512 GiB. Call it before the APs start: they load the same root,
/// and the new entries were not present before, so no CPU caches a stale translation.
pub fn map_above_identity(start: u64, size: u64) -> Result<(), &'static str> {
    let end = start.checked_add(size).ok_or("the range wraps")?;
    if start < IDENTITY_MAPPED_LIMIT
        || !start.is_multiple_of(LARGE_PAGE)
        || !size.is_multiple_of(LARGE_PAGE)
        || size == 0
    {
        return Err("the range is not 2 MiB-aligned above 4 GiB");
    }
    if end > 512 << 30 {
        return Err("the range ends above 512 GiB");
    }
    let _changes = CHANGES.lock();
    let nx = if nx_enabled() { EXECUTE_DISABLE } else { 0 };
    let pml4 = current_pml4();
    let pml4e = read_entry(pml4, 0);
    if pml4e & PRESENT == 0 {
        return Err("the first PML4 entry is not present");
    }
    let pdpt = pml4e & ADDRESS;
    let mut page = start;
    while page < end {
        let [_, gib, index, _] = indices(page);
        let pdpte = read_entry(pdpt, gib);
        let pd = if pdpte & PRESENT == 0 {
            let pd = memory::alloc_zeroed_frame().ok_or("no memory for a page directory")?.as_u64();
            write_entry(pdpt, gib, pd | PRESENT | WRITABLE);
            pd
        } else if pdpte & HUGE != 0 {
            return Err("a 1 GiB page already maps part of the range");
        } else {
            pdpte & ADDRESS
        };
        if read_entry(pd, index) & PRESENT == 0 {
            write_entry(pd, index, page | PRESENT | WRITABLE | HUGE | nx);
        }
        page += LARGE_PAGE;
    }
    Ok(())
}
