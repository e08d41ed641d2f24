use super::*;
use std::collections::HashMap;
use std::sync::Arc;

type Table = Arc<[AtomicU64; 512]>;

/// An emulated memory of table frames at made-up host addresses.
#[derive(Default)]
struct FakeMemory {
    /// Shared, so a test thread can play the CPU that sets A/D flags.
    tables: HashMap<u64, Table>,
    next: u64,
    limit: Option<usize>,
    freed: usize,
}

impl FakeMemory {
    fn new() -> Self {
        Self { next: 0x1000_0000, ..Default::default() }
    }
}

impl TableMemory for FakeMemory {
    fn alloc_table(&mut self) -> Option<u64> {
        if self.limit.is_some_and(|l| self.tables.len() >= l) {
            return None;
        }
        let paddr = self.next;
        self.next += PAGE_4K;
        self.tables.insert(paddr, Arc::new(std::array::from_fn(|_| AtomicU64::new(0))));
        Some(paddr)
    }
    fn free_table(&mut self, paddr: u64) {
        assert!(self.tables.remove(&paddr).is_some(), "double free of table {paddr:#x}");
        self.freed += 1;
    }
    fn table(&mut self, paddr: u64) -> &[AtomicU64; 512] {
        self.tables.get(&paddr).expect("walk reached a frame that is not a table")
    }
}

fn ept(mem: &mut FakeMemory) -> EptBuilder {
    EptBuilder::new(mem, true, true).unwrap()
}

#[test]
fn maps_and_translates_every_page_size() {
    let mut mem = FakeMemory::new();
    let mut e = ept(&mut mem);
    e.map(&mut mem, 0x1000, 0x5000, PageSize::Size4K, EptPerms::RW).unwrap();
    e.map(&mut mem, 0x20_0000, 0x40_0000, PageSize::Size2M, EptPerms::RWX).unwrap();
    e.map(&mut mem, 0x4000_0000, 0x8000_0000, PageSize::Size1G, EptPerms::READ).unwrap();
    let t = e.translate(&mut mem, 0x1234).unwrap();
    assert_eq!((t.host_phys, t.size, t.perms), (0x5234, PageSize::Size4K, EptPerms::RW));
    let t = e.translate(&mut mem, 0x21_2345).unwrap();
    assert_eq!((t.host_phys, t.size), (0x41_2345, PageSize::Size2M));
    let t = e.translate(&mut mem, 0x4123_4567).unwrap();
    assert_eq!((t.host_phys, t.size, t.perms), (0x8123_4567, PageSize::Size1G, EptPerms::READ));
    assert_eq!(e.translate(&mut mem, 0x3000), Err(EptError::NotMapped));
}

#[test]
fn refuses_overlap_misalignment_and_bad_permissions_without_changes() {
    let mut mem = FakeMemory::new();
    let mut e = ept(&mut mem);
    e.map(&mut mem, 0x20_0000, 0x40_0000, PageSize::Size2M, EptPerms::RW).unwrap();
    let tables = mem.tables.len();
    assert_eq!(e.map(&mut mem, 0x20_1000, 0x1000, PageSize::Size4K, EptPerms::RW), Err(EptError::AlreadyMapped));
    assert_eq!(e.map(&mut mem, 0x20_0000, 0x1000, PageSize::Size2M, EptPerms::RW), Err(EptError::Misaligned));
    assert_eq!(e.map(&mut mem, 0, 0, PageSize::Size1G, EptPerms::RW), Err(EptError::AlreadyMapped));
    assert_eq!(e.map(&mut mem, 0x1000, 0x1000, PageSize::Size4K, EptPerms::WRITE), Err(EptError::BadPermissions));
    assert_eq!(e.map(&mut mem, 1 << 48, 0x1000, PageSize::Size4K, EptPerms::RW), Err(EptError::OutOfRange));
    assert_eq!(mem.tables.len(), tables, "a refused map allocated tables");
}

#[test]
fn unsupported_sizes_are_refused() {
    let mut mem = FakeMemory::new();
    let mut e = EptBuilder::new(&mut mem, false, false).unwrap();
    assert_eq!(e.map(&mut mem, 0, 0, PageSize::Size2M, EptPerms::RW), Err(EptError::UnsupportedPageSize));
    e.map_range(&mut mem, 0, 0x20_0000, 4 * PAGE_2M, EptPerms::RW).unwrap();
    assert_eq!(e.translate(&mut mem, 0x30_0000).unwrap().size, PageSize::Size4K);
}

#[test]
fn map_range_uses_large_pages_where_aligned() {
    let mut mem = FakeMemory::new();
    let mut e = ept(&mut mem);
    e.map_range(&mut mem, 0x1F_F000, 0x1F_F000, PAGE_4K + PAGE_2M + PAGE_4K, EptPerms::RWX).unwrap();
    assert_eq!(e.translate(&mut mem, 0x1F_F000).unwrap().size, PageSize::Size4K);
    assert_eq!(e.translate(&mut mem, 0x20_0000).unwrap().size, PageSize::Size2M);
    assert_eq!(e.translate(&mut mem, 0x40_0000).unwrap().size, PageSize::Size4K);
}

#[test]
fn out_of_tables_changes_nothing() {
    let mut mem = FakeMemory::new();
    let mut e = ept(&mut mem);
    mem.limit = Some(2);
    assert_eq!(e.map(&mut mem, 0x1000, 0x1000, PageSize::Size4K, EptPerms::RW), Err(EptError::OutOfTables));
    assert_eq!(mem.tables.len(), 1);
    assert_eq!(e.translate(&mut mem, 0x1000), Err(EptError::NotMapped));
}

#[test]
fn failed_map_range_rolls_back() {
    let mut mem = FakeMemory::new();
    let mut e = ept(&mut mem);
    e.map(&mut mem, 0x3000, 0x3000, PageSize::Size4K, EptPerms::RW).unwrap();
    assert_eq!(e.map_range(&mut mem, 0x1000, 0x1000, 3 * PAGE_4K, EptPerms::RW), Err(EptError::AlreadyMapped));
    assert_eq!(e.translate(&mut mem, 0x1000), Err(EptError::NotMapped));
    assert_eq!(e.translate(&mut mem, 0x2000), Err(EptError::NotMapped));
    assert!(e.translate(&mut mem, 0x3000).is_ok());
}

#[test]
fn unmap_protect_dirty_and_destroy() {
    let mut mem = FakeMemory::new();
    let mut e = ept(&mut mem);
    e.map(&mut mem, 0x1000, 0x9000, PageSize::Size4K, EptPerms::RWX).unwrap();
    e.protect(&mut mem, 0x1000, EptPerms::READ).unwrap();
    assert_eq!(e.translate(&mut mem, 0x1000).unwrap().perms, EptPerms::READ);
    // The CPU would set the dirty bit; emulate it.
    let pt = leaf_table(&mut mem, &e);
    pt[1].fetch_or(DIRTY, Ordering::SeqCst);
    // A peek reads the flag and leaves it set; the take after it still finds it.
    assert_eq!(e.peek_dirty(&mut mem, 0x1000), Ok((true, PageSize::Size4K)));
    assert_eq!(e.peek_dirty(&mut mem, 0x1000), Ok((true, PageSize::Size4K)));
    assert!(e.take_dirty(&mut mem, 0x1000).unwrap());
    assert_eq!(e.peek_dirty(&mut mem, 0x1000), Ok((false, PageSize::Size4K)));
    assert!(!e.take_dirty(&mut mem, 0x1000).unwrap());
    assert_eq!(e.unmap(&mut mem, 0x1000), Ok(PageSize::Size4K));
    assert_eq!(e.unmap(&mut mem, 0x1000), Err(EptError::NotMapped));
    e.destroy(&mut mem);
    assert!(mem.tables.is_empty(), "tables leaked: {}", mem.tables.len());
}

#[test]
fn take_dirty_pages_reads_a_leaf_table_in_one_pass_and_clears_what_it_reports() {
    let mut mem = FakeMemory::new();
    let mut e = ept(&mut mem);
    // Pages 1..4 mapped (page 3 not), near the end of the first leaf table a page at
    // 511 and, in the next table, one at 512; a 2 MiB page at 4 MiB.
    for gpa in [0x1000, 0x2000, 0x4000, 511 * PAGE_4K, 512 * PAGE_4K] {
        e.map(&mut mem, gpa, gpa + 0x10_0000_0000, PageSize::Size4K, EptPerms::RW).unwrap();
    }
    e.map(&mut mem, 0x40_0000, 0x80_0000, PageSize::Size2M, EptPerms::RW).unwrap();
    let pt = leaf_table(&mut mem, &e);
    for slot in [2, 4, 511] {
        pt[slot].fetch_or(DIRTY, Ordering::SeqCst);
    }
    // An unmapped entry's stray dirty bit is not a dirty page.
    pt[3].fetch_or(DIRTY, Ordering::SeqCst);
    let mut seen = Vec::new();
    e.take_dirty_pages(&mut mem, 0x1000, 600, &mut |first, count| seen.push((first, count)));
    assert_eq!(seen, [(1, 1), (3, 1), (510, 1)]);
    assert_eq!(e.peek_dirty(&mut mem, 0x2000), Ok((false, PageSize::Size4K)), "cleared");
    // The next table's page and the large page, which counts for the pages left.
    e.take_dirty(&mut mem, 512 * PAGE_4K).unwrap();
    let pml4 = mem.table(e.root())[0].load(Ordering::SeqCst) & ADDR_MASK;
    let pdpt = mem.table(pml4)[0].load(Ordering::SeqCst) & ADDR_MASK;
    let pd = mem.tables[&pdpt].clone();
    pd[2].fetch_or(DIRTY, Ordering::SeqCst);
    let pt = leaf_table(&mut mem, &e);
    pt[1].fetch_or(DIRTY, Ordering::SeqCst);
    seen.clear();
    e.take_dirty_pages(&mut mem, 0x1000, 0x400 + 3, &mut |first, count| seen.push((first, count)));
    assert_eq!(seen, [(0, 1), (0x3FF, 4)]);
    seen.clear();
    e.take_dirty_pages(&mut mem, 0x1000, 0x403, &mut |first, count| seen.push((first, count)));
    assert!(seen.is_empty(), "{seen:?}");
}

#[test]
fn eptp_encodes_memory_type_walk_length_and_ad() {
    let mut mem = FakeMemory::new();
    let e = ept(&mut mem);
    assert_eq!(e.eptp(false), e.root() | 0x1E);
    assert_eq!(e.eptp(true), e.root() | 0x5E);
}

/// The page table (level 1) that maps GPAs 0..2 MiB.
fn leaf_table(mem: &mut FakeMemory, e: &EptBuilder) -> Table {
    let pml4 = mem.table(e.root())[0].load(Ordering::SeqCst) & ADDR_MASK;
    let pdpt = mem.table(pml4)[0].load(Ordering::SeqCst) & ADDR_MASK;
    let pt = mem.table(pdpt)[0].load(Ordering::SeqCst) & ADDR_MASK;
    mem.tables[&pt].clone()
}

/// A "CPU" thread sets the accessed and dirty flags of a live entry while the hypervisor
/// changes its permissions and harvests its dirty flag over and over: no flag it set may
/// be lost (each `take_dirty` that returns true accounts for one set; the rest must still
/// be in the entry) and the permissions are the last ones written.
#[test]
fn live_entry_updates_never_lose_flags_the_cpu_sets() {
    const ROUNDS: u32 = 200_000;
    let mut mem = FakeMemory::new();
    let mut e = ept(&mut mem);
    e.map(&mut mem, 0x1000, 0x9000, PageSize::Size4K, EptPerms::RWX).unwrap();
    let pt = leaf_table(&mut mem, &e);
    let start = Arc::new(std::sync::Barrier::new(2));
    let go = start.clone();
    let cpu = std::thread::spawn(move || {
        go.wait();
        let mut sets = 0u64;
        for _ in 0..ROUNDS {
            // The CPU sets DIRTY only on a clean entry, as a guest write would.
            if pt[1].fetch_or(ACCESSED | DIRTY, Ordering::SeqCst) & DIRTY == 0 {
                sets += 1;
            }
            std::hint::spin_loop();
        }
        sets
    });
    let mut harvested = 0u64;
    let mut last = EptPerms::RWX;
    start.wait();
    for round in 0..ROUNDS {
        last = if round % 2 == 0 { EptPerms::READ } else { EptPerms::RW };
        e.protect(&mut mem, 0x1000, last).unwrap();
        if e.take_dirty(&mut mem, 0x1000).unwrap() {
            harvested += 1;
        }
    }
    let sets = cpu.join().unwrap();
    let t = e.translate(&mut mem, 0x1000).unwrap();
    harvested += u64::from(t.dirty);
    assert_eq!(harvested, sets, "dirty flags set {sets}, harvested {harvested}");
    assert!(t.accessed, "the accessed flag was lost");
    assert_eq!(t.perms, last);
}
