//! Usable-range arithmetic: overlaps, covering reservations, unaligned and adjacent regions.

use crate::memory::{total_bytes, usable_ranges, MemoryError, PhysRange, FIRST_MIB, MAX_USABLE_RANGES, PAGE_SIZE};
use crate::{MemoryKind, MemoryRegion};

fn region(start: u64, len: u64, kind: MemoryKind) -> MemoryRegion {
    MemoryRegion { start, len, kind }
}

fn ram(start: u64, len: u64) -> MemoryRegion {
    region(start, len, MemoryKind::Available)
}

fn range(start: u64, end: u64) -> PhysRange {
    PhysRange::new(start, end).unwrap()
}

fn usable(map: &[MemoryRegion], reserved: &[PhysRange]) -> Vec<(u64, u64)> {
    usable_ranges(map, reserved.iter().copied()).unwrap().iter().map(|r| (r.start(), r.end())).collect()
}

#[test]
fn phys_range_constructors_are_checked() {
    assert_eq!(PhysRange::new(2, 1), None);
    assert!(PhysRange::new(1, 1).unwrap().is_empty());
    assert_eq!(PhysRange::from_start_len(u64::MAX, 1), None);
    assert_eq!(PhysRange::from_start_len(u64::MAX - 1, 1), Some(range(u64::MAX - 1, u64::MAX)));
    assert_eq!(PhysRange::saturating(u64::MAX - 1, 10).end(), u64::MAX);
    let r = range(0x1000, 0x3000);
    assert_eq!(r.len(), 0x2000);
    assert!(r.contains(0x1000) && r.contains(0x2fff) && !r.contains(0x3000) && !r.contains(0xfff));
    assert!(r.overlaps(range(0x2fff, 0x4000)) && !r.overlaps(range(0x3000, 0x4000)) && !r.overlaps(range(0, 0x1000)));
    assert_eq!(range(0x1001, 0x2fff).page_aligned_inward(), None);
    assert_eq!(range(0x1001, 0x3001).page_aligned_inward(), Some(range(0x2000, 0x3000)));
    assert_eq!(range(u64::MAX - 5, u64::MAX).page_aligned_inward(), None);
    assert_eq!(r.to_string(), "[0x1000, 0x3000)");
}

#[test]
fn only_available_regions_are_usable() {
    let map = [
        ram(0x10_0000, 0x10_0000),
        region(0x20_0000, 0x10_0000, MemoryKind::Reserved),
        region(0x30_0000, 0x10_0000, MemoryKind::AcpiReclaimable),
        region(0x40_0000, 0x10_0000, MemoryKind::AcpiNvs),
        region(0x50_0000, 0x10_0000, MemoryKind::Defective),
        region(0x60_0000, 0x10_0000, MemoryKind::Other(7)),
        ram(0x70_0000, 0x10_0000),
    ];
    assert_eq!(usable(&map, &[]), [(0x10_0000, 0x20_0000), (0x70_0000, 0x80_0000)]);
}

#[test]
fn overlapping_reserved_ranges_are_removed() {
    let map = [ram(0x10_0000, 0x100_0000)];
    let reserved = [range(0x20_0000, 0x40_0000), range(0x30_0000, 0x50_0000), range(0x48_0000, 0x49_0000)];
    assert_eq!(usable(&map, &reserved), [(0x10_0000, 0x20_0000), (0x50_0000, 0x110_0000)]);
}

#[test]
fn reserved_range_covering_a_whole_region_removes_it() {
    let map = [ram(0x10_0000, 0x10_0000), ram(0x80_0000, 0x1000)];
    assert_eq!(usable(&map, &[range(0x7f_f000, 0x80_1000)]), [(0x10_0000, 0x20_0000)]);
    assert_eq!(usable(&map, &[range(0, u64::MAX)]), []);
}

#[test]
fn unaligned_regions_shrink_to_whole_pages() {
    let map = [ram(0x10_0123, 0x2000), ram(0x20_0000, 0xfff), ram(0x30_0001, 0x1fff)];
    assert_eq!(usable(&map, &[]), [(0x10_1000, 0x10_2000), (0x30_1000, 0x30_2000)]);
}

#[test]
fn unaligned_reserved_ranges_remove_every_page_they_touch() {
    let map = [ram(0x10_0000, 0x10_000)];
    assert_eq!(usable(&map, &[range(0x10_1800, 0x10_2800)]), [(0x10_0000, 0x10_1000), (0x10_3000, 0x11_0000)]);
    assert_eq!(usable(&map, &[range(0x10_1fff, 0x10_2001)]), [(0x10_0000, 0x10_1000), (0x10_3000, 0x11_0000)]);
}

#[test]
fn adjacent_and_overlapping_available_regions_merge() {
    // Unaligned on their own, but together they cover whole pages.
    let map = [ram(0x10_0800, 0x800), ram(0x10_1000, 0x800), ram(0x10_1800, 0x800)];
    assert_eq!(usable(&map, &[]), [(0x10_1000, 0x10_2000)]);
    let map = [ram(0x20_0000, 0x2000), ram(0x10_0000, 0x10_1000), ram(0x10_0000, 0x1000)];
    assert_eq!(usable(&map, &[]), [(0x10_0000, 0x20_2000)]);
}

#[test]
fn results_are_sorted_whatever_the_map_order() {
    let map = [ram(0x90_0000, 0x1000), ram(0x10_0000, 0x1000), ram(0x50_0000, 0x1000)];
    assert_eq!(usable(&map, &[]), [(0x10_0000, 0x10_1000), (0x50_0000, 0x50_1000), (0x90_0000, 0x90_1000)]);
}

#[test]
fn reserved_kind_overlapping_available_wins() {
    let map = [ram(0x10_0000, 0x10_0000), region(0x18_0000, 0x100, MemoryKind::AcpiNvs)];
    assert_eq!(usable(&map, &[]), [(0x10_0000, 0x18_0000), (0x18_1000, 0x20_0000)]);
}

#[test]
fn empty_reserved_ranges_change_nothing() {
    let map = [ram(0x10_0000, 0x1000)];
    assert_eq!(usable(&map, &[range(0x10_0800, 0x10_0800)]), [(0x10_0000, 0x10_1000)]);
}

#[test]
fn region_reaching_the_top_of_memory_is_handled() {
    let map = [ram(u64::MAX - 0x2fff, 0x3000)];
    assert_eq!(usable(&map, &[]), [(u64::MAX - 0x2fff, u64::MAX - 0xfff)]);
}

#[test]
fn too_many_ranges_are_refused() {
    let map = [ram(0, 4 * PAGE_SIZE * (MAX_USABLE_RANGES as u64 + 1))];
    let holes: Vec<PhysRange> =
        (0..=MAX_USABLE_RANGES as u64).map(|i| range(i * 4 * PAGE_SIZE, i * 4 * PAGE_SIZE + 1)).collect();
    assert_eq!(usable_ranges(&map, holes[..MAX_USABLE_RANGES].iter().copied()).unwrap().len(), MAX_USABLE_RANGES);
    let holes: Vec<PhysRange> =
        holes.iter().map(|h| range(h.start() + 2 * PAGE_SIZE, h.end() + 2 * PAGE_SIZE)).collect();
    assert_eq!(
        usable_ranges(&map, holes.iter().copied()).unwrap_err(),
        MemoryError::TooManyRanges { capacity: MAX_USABLE_RANGES }
    );
}

#[test]
fn total_bytes_adds_up() {
    let map = [ram(0, 0x9_fc00), ram(0x10_0000, 0x7ee_0000)];
    let ranges = usable_ranges(&map, [FIRST_MIB, range(0x10_0000, 0x20_0000)]).unwrap();
    assert_eq!(ranges.as_slice(), [range(0x20_0000, 0x7fe_0000)]);
    assert_eq!(total_bytes(&ranges), 0x7fe_0000 - 0x20_0000);
    assert_eq!(total_bytes(&[range(0, u64::MAX), range(0, 5)]), u64::MAX);
}

#[test]
fn boot_info_usable_memory_sets_aside_image_boot_data_and_modules() {
    let (mbi, _) = super::mb2::full_mbi();
    let base = 0x9000;
    let mut memory = super::VecMemory::new(base, 0x1000);
    memory.write(base, &mbi);
    let info = crate::multiboot2::parse_at(&memory, base).unwrap();
    let image = range(0x10_0000, 0x18_0000);
    let ranges = info.usable_memory(image).unwrap();
    // RAM 0x10_0000..0x7fe_0000 minus the image and the two modules (0x20_0000..0x20_1234,
    // an empty one at 0x30_0000); the MBI lies in the first MiB.
    assert_eq!(ranges.as_slice(), [range(0x18_0000, 0x20_0000), range(0x20_2000, 0x7fe_0000)]);
}
