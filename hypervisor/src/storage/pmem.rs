//! Persistent memory as the NVRAM AM's durable device (issue 12, device (1)); the logic
//! (journal, unit atomicity, the flush choice, the NFIT parser) is `nk_storage::pmem` and
//! `nk_storage::nfit`, host-tested; this file finds the range, maps it and executes the
//! instructions.
//!
//! Where the range comes from, first found wins:
//! 1. the ACPI NFIT's first SPA range of type persistent memory (QEMU's `-device nvdimm`
//!    with `-machine nvdimm=on`; QEMU lists it in no E820 entry);
//! 2. the first E820 (Multiboot2 memory map) entry of type 7, persistent memory;
//! 3. `memmap=<size>!<start>`: available RAM set aside before the allocators start
//!    (`Boot::usable_ranges_without`), so it never becomes hypervisor RAM. It is volatile
//!    (an emulation: lost at power off), and the boot line says so. Bochs has no NVDIMM,
//!    so this is how its scenarios run the persistent-memory path with the real
//!    write-back instructions.
//!
//! A firmware range that overlaps RAM the memory map calls available is refused (it
//! could already be in the allocators). A range above 4 GiB is identity-mapped with
//! `hostmap::map_above_identity`, write-back cacheable. When a range is found, it is the
//! device and the ATA disk is not probed: persistent memory wins over emulated NVRAM.
//!
//! Flushing: CPUID picks CLWB, else CLFLUSHOPT, else CLFLUSH (`FlushKind::choose`); every
//! line a write stores is written back with it, and each ordering point of the NVRAM
//! store (`Media::fence`) and of the journal is one SFENCE (nk_storage::pmem's docs).

use alloc::format;
use alloc::string::String;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use nk_am::{Media, MediaError};
use nk_boot::MemoryKind;
use nk_storage::nfit::Nfit;
use nk_storage::pmem::{FlushKind, Mounted, PersistentMemory, PmemMedia, CACHE_LINE, JOURNAL_BYTES};
use spin::Mutex;

use crate::boot::Boot;
use crate::memory::IDENTITY_MAPPED_LIMIT;

/// The device once found: persistent memory behind the journal.
pub(super) static DEVICE: Mutex<Option<PmemDevice>> = Mutex::new(None);

/// `nvram-crash-after=`: the write after which the power is cut (0: never).
static CRASH_AFTER: AtomicU64 = AtomicU64::new(0);

/// The range, identity-mapped, and the write-back instruction.
#[derive(Debug)]
pub struct Hardware {
    base: u64,
    len: u64,
    flush: FlushKind,
}

impl PersistentMemory for Hardware {
    fn len(&self) -> u64 {
        self.len
    }

    fn load(&self, offset: u64, buf: &mut [u8]) {
        // SAFETY: `PmemMedia` passes only offsets inside the range (it checks them against
        // `len`); the range is identity-mapped and owned by this device alone (never in
        // the allocators), and no Rust reference aliases it.
        unsafe { core::ptr::copy_nonoverlapping((self.base + offset) as *const u8, buf.as_mut_ptr(), buf.len()) };
    }

    fn store(&mut self, offset: u64, data: &[u8]) {
        // SAFETY: as in `load`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), (self.base + offset) as *mut u8, data.len()) };
    }

    fn write_back(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (self.base + offset) & !(CACHE_LINE - 1);
        let end = self.base + offset + len;
        let mut line = first;
        while line < end {
            // SAFETY: the line holds bytes of the mapped range (checked by the caller);
            // the instructions only write it back (and may invalidate it), they change no
            // data, and CPUID said the CPU has the one chosen.
            unsafe {
                match self.flush {
                    FlushKind::Clwb => asm!("clwb [{}]", in(reg) line, options(nostack, preserves_flags)),
                    FlushKind::Clflushopt => asm!("clflushopt [{}]", in(reg) line, options(nostack, preserves_flags)),
                    FlushKind::Clflush => asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags)),
                }
            }
            line += CACHE_LINE;
        }
    }

    fn sfence(&mut self) {
        // SAFETY: SFENCE only orders stores and write-backs.
        unsafe { asm!("sfence", options(nostack, preserves_flags)) };
    }
}

/// The device: the journaled media, and the crash injection of `nvram-crash-after=`.
#[derive(Debug)]
pub struct PmemDevice {
    media: PmemMedia<Hardware>,
}

impl PmemDevice {
    /// Returns the journaled media (its counters; the self-test's simulated cuts).
    pub fn media(&mut self) -> &mut PmemMedia<Hardware> {
        &mut self.media
    }

    /// Mounts the memory again, as a reboot after a power cut would (the self-test's
    /// in-boot cuts); returns what mounting found.
    #[cfg_attr(not(feature = "test-harness"), allow(dead_code))]
    pub fn remount(&mut self) -> Result<Mounted, String> {
        let hardware =
            Hardware { base: self.media.memory().base, len: self.media.memory().len, flush: self.media.memory().flush };
        let description = String::from(self.media.describe());
        let media = PmemMedia::mount(hardware, description).map_err(|why| format!("{why}"))?;
        let mounted = media.mounted();
        self.media = media;
        Ok(mounted)
    }
}

impl Media for PmemDevice {
    fn describe(&self) -> &str {
        self.media.describe()
    }

    fn size(&self) -> u64 {
        self.media.size()
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        self.media.read(offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        self.media.write(offset, data)?;
        let writes = self.media.stats().writes;
        if writes == CRASH_AFTER.load(Ordering::Relaxed) {
            crate::power::power_cut(format_args!("power cut after write {writes}"));
        }
        Ok(())
    }

    fn fence(&mut self) -> Result<(), MediaError> {
        self.media.fence()
    }
}

/// Tells whether the machine's durable device is persistent memory.
pub fn present() -> bool {
    DEVICE.lock().is_some()
}

/// Lends the device to `f` (locked for the call); `None` when there is none.
pub fn with_device<R>(f: impl FnOnce(&mut PmemDevice) -> R) -> Option<R> {
    DEVICE.lock().as_mut().map(f)
}

/// Where a range came from.
enum Source {
    Nfit { index: u16 },
    E820,
    Emulated,
}

/// Returns the first persistent range with its source (module docs), or why there is
/// none (`Err` names what was refused, `Ok(None)`: nothing was offered).
fn find(boot: &Boot) -> Result<Option<(u64, u64, Source)>, String> {
    let overlaps_ram = |start: u64, end: u64| {
        boot.memory_map().any(|r| r.kind == MemoryKind::Available && r.start < end && start < r.end())
    };
    if let Some(bytes) = crate::acpi::nfit(boot.rsdp_paddr) {
        match Nfit::parse(bytes) {
            Ok(nfit) => {
                if let Some(range) = nfit.persistent_ranges().next() {
                    let end = range.end().unwrap_or(u64::MAX);
                    if overlaps_ram(range.base, end) {
                        return Err(format!(
                            "NFIT SPA range {} [{:#x}, {end:#x}) overlaps available RAM",
                            range.index, range.base
                        ));
                    }
                    return Ok(Some((range.base, range.length, Source::Nfit { index: range.index })));
                }
            }
            Err(why) => log::warn!(target: "nvram", "the NFIT is malformed ({why}); its ranges are not used"),
        }
    }
    if let Some(region) = boot.memory_map().find(|r| r.kind == MemoryKind::Other(7)) {
        return Ok(Some((region.start, region.len, Source::E820)));
    }
    if let Some(emulated) = boot.pmem_emulation() {
        return Ok(Some((emulated.start, emulated.size, Source::Emulated)));
    }
    Ok(None)
}

/// Finds persistent memory, maps it, mounts it and prints the one `nvram: device:` line.
/// Returns whether it is the device (then the ATA disk is not probed).
pub fn init(boot: &Boot) -> bool {
    CRASH_AFTER.store(boot.options.nvram_crash_after.unwrap_or(0), Ordering::Relaxed);
    let (start, size, source) = match find(boot) {
        Ok(Some(found)) => found,
        Ok(None) => return false,
        Err(why) => {
            log::warn!(target: "nvram", "persistent memory refused: {why}");
            return false;
        }
    };
    let leaf1 = x86::cpuid::cpuid!(1);
    let leaf7 = x86::cpuid::cpuid!(7, 0);
    let Some(flush) = FlushKind::choose(leaf1.edx, leaf7.ebx) else {
        log::warn!(target: "nvram", "persistent memory at {start:#x} refused: the CPU has no CLWB, CLFLUSHOPT or CLFLUSH");
        return false;
    };
    let end = start.saturating_add(size);
    if end > IDENTITY_MAPPED_LIMIT {
        if let Err(why) = crate::hostmap::map_above_identity(start, size) {
            log::warn!(target: "nvram", "persistent memory [{start:#x}, {end:#x}) refused: cannot map it: {why}");
            return false;
        }
    }
    let what = match source {
        Source::Nfit { index } => format!("persistent memory (ACPI NFIT SPA range {index})"),
        Source::E820 => String::from("persistent memory (E820 type 7)"),
        Source::Emulated => String::from(
            "persistent memory EMULATED in RAM (memmap=: volatile, lost at power off; the real write-back instructions run)",
        ),
    };
    let description = format!(
        "{what}, {} KiB at {start:#x} ({} KiB journal), durable with {} + SFENCE at each ordering point",
        size.saturating_sub(JOURNAL_BYTES) / 1024,
        JOURNAL_BYTES / 1024,
        flush.mnemonic()
    );
    let offered: alloc::vec::Vec<&str> = [
        (leaf7.ebx & nk_storage::pmem::CPUID7_EBX_CLWB != 0, "CLWB"),
        (leaf7.ebx & nk_storage::pmem::CPUID7_EBX_CLFLUSHOPT != 0, "CLFLUSHOPT"),
        (leaf1.edx & nk_storage::pmem::CPUID1_EDX_CLFSH != 0, "CLFLUSH"),
    ]
    .into_iter()
    .filter_map(|(has, name)| has.then_some(name))
    .collect();
    log::info!(target: "nvram", "persistent memory: the CPU offers {}; the best is used", offered.join(", "));
    let crash = boot.options.nvram_crash_after.map(|k| format!("; nvram-crash-after={k} armed")).unwrap_or_default();
    match PmemMedia::mount(Hardware { base: start, len: size, flush }, description) {
        Ok(media) => {
            let mounted = match media.mounted() {
                Mounted::Formatted => String::from("no label: formatted"),
                Mounted::Clean => String::from("labelled, journal clean"),
                Mounted::Replayed { units } => format!("labelled, journal replayed ({units} units)"),
            };
            log::info!(target: "nvram", "device: {}; {mounted}{crash}", media.describe());
            *DEVICE.lock() = Some(PmemDevice { media });
            true
        }
        Err(why) => {
            log::warn!(target: "nvram", "persistent memory [{start:#x}, {end:#x}) refused: {why}");
            false
        }
    }
}
