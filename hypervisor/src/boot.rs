//! What the boot loader handed over, read with `nk_boot` through the identity map: the
//! memory map, the command line and its options, the guest modules and the ACPI RSDP.

use alloc::vec::Vec;
use core::fmt;

use nk_boot::cmdline::{self, Diagnostic, LogLevel, Options};
use nk_boot::memory::{PhysRange, UsableRanges};
use nk_boot::{BootInfo, BootSource, MemoryKind, PhysMemory};

use crate::guest::GuestSpec;
use crate::memory::IDENTITY_MAPPED_LIMIT;
use crate::smp::AP_TRAMPOLINE_BASE;

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Physical memory below 4 GiB, identity-mapped for the hypervisor's whole life.
struct IdentityMapped;

impl PhysMemory for IdentityMapped {
    fn bytes(&self, paddr: u64, len: usize) -> Option<&[u8]> {
        let end = paddr.checked_add(len as u64)?;
        if paddr == 0 || end > IDENTITY_MAPPED_LIMIT {
            return None;
        }
        // SAFETY: the range is non-null and identity-mapped; boot information, modules
        // and firmware tables are reserved from the allocators, so nothing writes them
        // while the returned borrow lives.
        Some(unsafe { core::slice::from_raw_parts(paddr as *const u8, len) })
    }
}

static LOW_MEMORY: IdentityMapped = IdentityMapped;

/// A range the allocators never hand out, with what it holds.
#[derive(Debug, Clone, Copy)]
pub struct Reserved {
    pub start: u64,
    pub end: u64,
    pub label: &'static str,
}

/// Why a `memmap=` range was refused: not available RAM below 4 GiB, or over a reserved
/// range.
#[derive(Debug, Clone, Copy)]
pub struct MemmapRefusal {
    range: cmdline::PmemEmulation,
    reserved: Option<Reserved>,
}

impl fmt::Display for MemmapRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}) ", self.range.start, self.range.end())?;
        match self.reserved {
            None => f.write_str("is not available RAM below 4 GiB"),
            Some(r) => write!(f, "overlaps the {} [{:#x}, {:#x})", r.label, r.start, r.end),
        }
    }
}

/// The boot information, parsed and checked.
pub struct Boot {
    info: BootInfo<'static>,
    parsed: cmdline::Parsed<'static>,
    image: PhysRange,
    usable: UsableRanges,
    /// The options of the hypervisor's command line.
    pub options: Options<'static>,
    /// Physical address of the ACPI RSDP, if the loader passed one.
    pub rsdp_paddr: Option<u64>,
}

impl fmt::Debug for Boot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Boot").field("cmdline", &self.info.command_line()).finish_non_exhaustive()
    }
}

/// Why the boot information could not be used.
#[derive(Debug)]
pub enum BootError {
    Info(nk_boot::BootInfoError),
    Memory(nk_boot::memory::MemoryError),
    Image,
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Info(e) => write!(f, "{e}"),
            BootError::Memory(e) => write!(f, "memory map: {e}"),
            BootError::Image => write!(f, "the hypervisor image has no valid address range"),
        }
    }
}

/// Reads the boot information the loader left at `info_paddr` (`magic` says which kind).
pub fn load(magic: u64, info_paddr: u64) -> Result<Boot, BootError> {
    let info = nk_boot::parse(magic, info_paddr, &LOW_MEMORY).map_err(BootError::Info)?;
    // SAFETY: linker-script symbols; only their addresses are taken.
    let (start, end) = unsafe { (&__image_start as *const u8 as u64, &__image_end as *const u8 as u64) };
    let image = PhysRange::new(start, end).ok_or(BootError::Image)?;
    let usable = info.usable_memory(image).map_err(BootError::Memory)?;
    let parsed = cmdline::parse(info.command_line());
    let options = parsed.options;
    let rsdp_paddr = info.rsdp().and_then(|rsdp| rsdp.physical_address(info_paddr));
    Ok(Boot { info, parsed, image, usable, options, rsdp_paddr })
}

impl Boot {
    /// Names the loader (its own name, or the protocol).
    pub fn loader(&self) -> &str {
        match (self.info.bootloader_name(), self.info.source()) {
            (Some(name), _) => name,
            (None, BootSource::Pvh) => "a PVH loader",
            (None, _) => "a Multiboot2 loader",
        }
    }

    /// Returns the hypervisor's command line.
    pub fn cmdline(&self) -> &str {
        self.info.command_line()
    }

    /// Returns the `log=` level as a `log` filter.
    pub fn log_level(&self) -> log::LevelFilter {
        match self.options.log {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }

    /// Returns the command-line problems, one line each.
    pub fn diagnostics(&self) -> impl Iterator<Item = Diagnostic<'static>> + '_ {
        self.parsed.diagnostics()
    }

    /// Prints the memory map, one `mem: region` line per entry (docs/emulator-protocol.md).
    pub fn log_memory_map(&self) {
        for region in self.info.memory_map() {
            log::info!(target: "mem", "region {region}");
        }
    }

    /// Returns the usable ranges `[start, end)`: available RAM minus everything reserved.
    pub fn usable_ranges(&self) -> impl Iterator<Item = (u64, u64)> + Clone + '_ {
        self.usable.iter().map(|r| (r.start(), r.end()))
    }

    /// Returns the loader's memory map.
    pub fn memory_map(&self) -> impl Iterator<Item = nk_boot::MemoryRegion> + '_ {
        self.info.memory_map().iter().copied()
    }

    /// Returns the `memory::init` ranges: the usable ones without the RAM `memmap=` sets
    /// aside as emulated persistent memory ([`Boot::pmem_emulation`]), so it never becomes
    /// hypervisor RAM.
    pub fn usable_ranges_without_pmem(&self) -> impl Iterator<Item = (u64, u64)> + Clone + '_ {
        let hole = self.pmem_emulation().map_or((0, 0), |r| (r.start, r.end()));
        self.usable_ranges()
            .flat_map(move |(start, end)| {
                if hole.1 <= start || end <= hole.0 {
                    [Some((start, end)), None]
                } else {
                    [(start < hole.0).then_some((start, hole.0)), (hole.1 < end).then_some((hole.1, end))]
                }
            })
            .flatten()
    }

    /// Returns the `memmap=` range if it can be used, else why not: it must lie in RAM the
    /// memory map calls available, below 4 GiB, clear of everything reserved (the first
    /// MiB, the image, the boot information, the modules). It runs before the heap exists:
    /// it allocates nothing.
    pub fn check_pmem_emulation(&self) -> Result<Option<cmdline::PmemEmulation>, MemmapRefusal> {
        let Some(range) = self.options.memmap else { return Ok(None) };
        if range.end() > IDENTITY_MAPPED_LIMIT || !self.is_available(range.start, range.end()) {
            return Err(MemmapRefusal { range, reserved: None });
        }
        if let Some(reserved) = self.reserved().find(|r| r.start < range.end() && range.start < r.end) {
            return Err(MemmapRefusal { range, reserved: Some(reserved) });
        }
        Ok(Some(range))
    }

    /// Returns the `memmap=` range when it can be used ([`Boot::check_pmem_emulation`]).
    pub fn pmem_emulation(&self) -> Option<cmdline::PmemEmulation> {
        self.check_pmem_emulation().ok().flatten()
    }

    /// Returns every range the allocators must never hand out.
    pub fn reserved(&self) -> impl Iterator<Item = Reserved> + '_ {
        let fixed = [
            Reserved { start: 0, end: nk_boot::memory::FIRST_MIB.end(), label: "first MiB (firmware, AP trampoline)" },
            Reserved { start: self.image.start(), end: self.image.end(), label: "hypervisor image" },
        ];
        let boot_data = self.info.boot_data().iter().map(|r| Reserved {
            start: r.start(),
            end: r.end(),
            label: "boot information",
        });
        let modules = self.info.modules().iter().map(|m| Reserved { start: m.start, end: m.end, label: "boot module" });
        fixed.into_iter().chain(boot_data).chain(modules)
    }

    /// Tells whether `[start, end)` lies in memory the map calls available.
    pub fn is_available(&self, start: u64, end: u64) -> bool {
        self.info.memory_map().iter().any(|r| r.kind == MemoryKind::Available && r.start <= start && end <= r.end())
    }

    /// Tells what occupies the AP trampoline's page, if anything from the loader does.
    pub fn trampoline_conflict(&self) -> Option<Reserved> {
        let page = (AP_TRAMPOLINE_BASE, AP_TRAMPOLINE_BASE + 0x1000);
        self.reserved().skip(2).find(|r| r.start < page.1 && page.0 < r.end)
    }

    /// Returns the guests the modules describe and the images (`image` modules, which the
    /// guest-OS AM creates VMs from at run time); a module with a bad command line is
    /// reported and skipped.
    pub fn guests(&self) -> (Vec<GuestSpec>, Vec<GuestSpec>) {
        let mut specs = Vec::new();
        for module in self.info.modules() {
            log::info!(target: "boot", "module {:#x}-{:#x} '{}'", module.start, module.end, module.cmdline);
            let len = module.end.saturating_sub(module.start) as usize;
            if module.start < self.image.end() && self.image.start() < module.end {
                // The image holds unmapped stack guard pages: reading it would fault.
                log::error!(target: "boot", "module '{}' at {:#x}-{:#x} overlaps the hypervisor image; skipped",
                    module.cmdline, module.start, module.end);
                continue;
            }
            let Some(image) = LOW_MEMORY.bytes(module.start, len) else {
                log::error!(target: "boot", "module '{}' at {:#x} is not in low memory; skipped", module.cmdline, module.start);
                continue;
            };
            match GuestSpec::from_cmdline(module.cmdline, image) {
                Ok(spec) => specs.push(spec),
                Err(why) => log::error!(target: "boot", "module '{}': {why}; skipped", module.cmdline),
            }
        }
        // Data modules are not guests: they go to the guests whose `modules=` names them.
        let (data, mut guests): (Vec<GuestSpec>, Vec<GuestSpec>) = specs.into_iter().partition(|s| s.data);
        guests.retain_mut(|guest| {
            for name in &guest.module_names {
                match data.iter().find(|d| &d.name == name) {
                    Some(d) => guest.modules.push((d.name.clone(), d.image)),
                    None => {
                        log::error!(target: "boot", "module '{}': modules= names '{name}', but no boot module is 'data' with that name; skipped",
                            guest.name);
                        return false;
                    }
                }
            }
            if let Some(name) = guest.input_name.clone() {
                match data.iter().find(|d| d.name == name) {
                    Some(d) => guest.input = Some(d.image),
                    None => {
                        log::error!(target: "boot", "module '{}': input= names '{name}', but no boot module is 'data' with that name; skipped",
                            guest.name);
                        return false;
                    }
                }
            }
            true
        });
        let (images, guests): (Vec<GuestSpec>, Vec<GuestSpec>) = guests.into_iter().partition(|s| s.image_module);
        for image in &images {
            log::info!(target: "boot", "module '{}' is an image: not started, VMs are created from it at run time", image.name);
        }
        (guests, images)
    }
}
