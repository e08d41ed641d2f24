//! Parses a guest module's command line:
//! `<name> [mem=<size>] [cpu=<index>] [ports=<first>[-<last>]] [msrs=<msr>,...] [unsafe-ports]
//! [ring3-caps] [modules=<name>,...] [input=<name>] [manages=<name>,...] [images=<name>,...]
//! [frames=<size>] [vcpus=<n>] [data] [image] [nvram] [disk=<size>] [lwc] [gdb] [-- <args>]`.
//!
//! `data` marks a module that is not a guest but data another guest's `modules=` names (a
//! Linux initramfs, a Multiboot kernel's modules); for a Linux guest the words after `--`
//! are the kernel command line. `input=` names a data module whose bytes a guest OS reads
//! from its serial port, as if typed. `manages=` names other guests this one starts with a
//! capability to (the guest-OS AM's `vm` objects: inspect, stop, start, destroy).
//! `image` marks a guest OS module (a Linux bzImage or a Multiboot kernel, with its own
//! `modules=`, `input=` and `-- <args>`) that is not started at boot but becomes an image
//! of the guest-OS AM, which guests whose `images=` names it may create VMs from at run
//! time. `frames=` sets the VM's exo AM frame quota (how much memory it may allocate, e.g.
//! to lend as a created VM's RAM).
//! `vcpus=` gives a bare-metal guest several vCPUs (1 to [`MAX_VCPUS`]), all on its CPU
//! (docs/multi-vcpu.md); it is refused beside `image` or `gdb` (a guest OS has one vCPU,
//! and the debugger serves one).
//! `disk=` gives a guest OS a virtio block device of that size (a multiple of 2 MiB): a
//! range of the durable device the block AM grants the VM at creation (docs/linux-disk.md).
//! `gdb` makes the guest the one the hypervisor's debugger stub serves on COM2
//! (docs/gdb.md): it waits, stopped before its first instruction, for gdb to attach.
//!
//! Options are described by one table ([`MODULE_OPTIONS`]): adding an option is one entry
//! there, one field in [`ModuleSpec`] and the function that sets it. Unlike the hypervisor
//! command line, a bad module line is refused as a whole ([`ModuleError`], one log line that
//! names the option and what to write instead) and the module is skipped: a guest started
//! with other resources than its author wrote would be worse than no guest.
//!
//! `ports=` may not name an I/O port the hypervisor or the platform's integrity depends on
//! ([`RESERVED_PORTS`]: the PCI configuration ports, reset ports, PICs, PIT, COM1, COM2 (the
//! guest debugger's), the debug console, the power-off ports) unless the module also says `unsafe-ports`.

use core::fmt;

use crate::fixed::FixedList;

/// Guest memory when the module's command line names none.
pub const DEFAULT_GUEST_MEMORY: u64 = 4 << 20;
/// The most memory a guest gets.
pub const MAX_GUEST_MEMORY: u64 = 1 << 30;
/// Guest memory comes in multiples of this (a 2 MiB EPT page).
pub const GUEST_MEMORY_GRANULE: u64 = 2 << 20;
/// The most CPUs a `cpu=` may name (as `cpus=` and `place=` on the hypervisor line).
pub const MAX_CPU_INDEX: usize = crate::cmdline::MAX_CPUS as usize - 1;
/// MSRs a VM may be given: IA32_SYSENTER_CS/ESP/EIP and IA32_FS_BASE/GS_BASE, whose guest
/// values live in the VMCS guest-state area (SDM Vol. 3 §25.4), so passing them through
/// touches neither host state nor another guest's.
pub const ASSIGNABLE_MSRS: [u32; 5] = [0x174, 0x175, 0x176, 0xC000_0100, 0xC000_0101];
/// The most MSRs one `msrs=` names.
pub const MAX_MSRS: usize = 8;
/// The most modules one `modules=` names.
pub const MAX_MODULES: usize = 4;
/// The most guests one `manages=` names.
pub const MAX_MANAGED: usize = 8;
/// The most vCPUs a module's `vcpus=` may give its guest (nk-abi's `vcpu::MAX_VCPUS`).
pub const MAX_VCPUS: u8 = 4;

/// An I/O port range a guest may not be given without `unsafe-ports`, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedPorts {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
    /// What the ports are and what a guest could do with them.
    pub why: &'static str,
}

/// Ports the hypervisor uses or that reach the whole machine. Sorted by `first`.
pub static RESERVED_PORTS: [ReservedPorts; 18] = [
    ReservedPorts {
        first: 0x20,
        last: 0x21,
        why: "master PIC: the hypervisor masks it; a guest could unmask or remap IRQs",
    },
    ReservedPorts { first: 0x40, last: 0x43, why: "PIT: the hypervisor's timer for AP start-up waits" },
    ReservedPorts { first: 0x61, last: 0x61, why: "PIT gate (system control port B): the hypervisor's waits" },
    ReservedPorts { first: 0x64, last: 0x64, why: "keyboard controller: a write of 0xFE resets the machine" },
    ReservedPorts { first: 0x92, last: 0x92, why: "system control port A: its bit 0 resets the machine" },
    ReservedPorts {
        first: 0xA0,
        last: 0xA1,
        why: "slave PIC: the hypervisor masks it; a guest could unmask or remap IRQs",
    },
    ReservedPorts {
        first: 0xE9,
        last: 0xE9,
        why: "debug console: the hypervisor's log (guests print through an exit)",
    },
    ReservedPorts { first: 0xF4, last: 0xF4, why: "QEMU debug-exit port: ends the whole run" },
    ReservedPorts {
        first: 0x170,
        last: 0x177,
        why: "secondary ATA channel: the hypervisor's NVRAM disk may be there (a guest could overwrite it)",
    },
    ReservedPorts {
        first: 0x1F0,
        last: 0x1F7,
        why: "primary ATA channel: the hypervisor's NVRAM disk may be there (a guest could overwrite it)",
    },
    ReservedPorts { first: 0x2F8, last: 0x2FF, why: "COM2: the hypervisor's guest debugger (a module's `gdb` option)" },
    ReservedPorts {
        first: 0x376,
        last: 0x376,
        why: "secondary ATA device control: a guest could reset the channel of the NVRAM disk",
    },
    ReservedPorts {
        first: 0x3F6,
        last: 0x3F6,
        why: "primary ATA device control: a guest could reset the channel of the NVRAM disk",
    },
    ReservedPorts { first: 0x3F8, last: 0x3FF, why: "COM1: the hypervisor's console" },
    ReservedPorts {
        first: 0x600,
        last: 0x67F,
        why: "ACPI power management (QEMU q35, port 0x604): powers the machine off",
    },
    ReservedPorts {
        first: 0xCF8,
        last: 0xCFF,
        why: "PCI configuration space (0xCF9 also resets): device set-up gives DMA to all memory, there is no IOMMU",
    },
    ReservedPorts { first: 0x8900, last: 0x8900, why: "Bochs shutdown port: ends the whole run" },
    ReservedPorts {
        first: 0xB000,
        last: 0xB03F,
        why: "ACPI power management (PIIX4, port 0xB004): powers the machine off",
    },
];

/// Returns the first reserved range that `first..first + count` overlaps.
pub fn reserved_overlap(first: u16, count: u32) -> Option<(u16, &'static ReservedPorts)> {
    let last = u32::from(first).saturating_add(count.max(1)).saturating_sub(1);
    RESERVED_PORTS.iter().find_map(|r| {
        let lo = u32::from(first).max(u32::from(r.first));
        let hi = last.min(u32::from(r.last));
        (lo <= hi).then_some((lo as u16, r))
    })
}

/// A guest module's settings, read from its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSpec<'a> {
    /// The guest's name: the first word, without any directory part.
    pub name: &'a str,
    /// Guest memory in bytes (`mem=`): a multiple of 2 MiB, at most 1 GiB.
    pub memory: u64,
    /// The CPU to run on (`cpu=`; None: the hypervisor chooses).
    pub cpu: Option<usize>,
    /// The I/O ports the VM may open with the exo AM (`ports=`), as (first, count).
    pub ports: Option<(u16, u32)>,
    /// The MSRs the VM may open with the exo AM (`msrs=`), each one of [`ASSIGNABLE_MSRS`].
    pub msrs: FixedList<u32, MAX_MSRS>,
    /// `unsafe-ports`: `ports=` may name a port of [`RESERVED_PORTS`].
    pub unsafe_ports: bool,
    /// `ring3-caps`: every ring of the guest, not only ring 0, may enumerate its
    /// capabilities (`INITIAL`, `RECEIVED`).
    pub ring3_caps: bool,
    /// The data modules handed to this guest (`modules=`), by name.
    pub modules: FixedList<&'a str, MAX_MODULES>,
    /// `data`: this module is not a guest, only data for others.
    pub data: bool,
    /// `nvram`: the guest starts with an NVRAM factory (the NVRAM AM), whose regions are
    /// found again by the guest's name after a restart.
    pub nvram: bool,
    /// `lwc`: the guest starts with its root light-weight context's capability (the lwC
    /// AM, registered only when some module says `lwc`).
    pub lwc: bool,
    /// `disk=`: the bytes of the guest OS's virtio block device, a block-AM range of the
    /// durable device granted to the VM at creation.
    pub disk: Option<u64>,
    /// The data module typed into a guest OS's serial port (`input=`), by name.
    pub input: Option<&'a str>,
    /// The guests this one manages (`manages=`), by name: it starts with a capability
    /// to each (the guest-OS AM).
    pub manages: FixedList<&'a str, MAX_MANAGED>,
    /// The exo AM frame quota (`frames=`): how many bytes of frames the VM may allocate at
    /// a time, a multiple of 2 MiB up to 1 GiB (None: the hypervisor's default).
    pub frames: Option<u64>,
    /// `image`: this module is not started at boot; it is an image VMs are created from.
    pub image: bool,
    /// The images this guest may create VMs from (`images=`), by name: it starts with a
    /// capability to each (the guest-OS AM's `image` objects).
    pub images: FixedList<&'a str, MAX_MANAGED>,
    /// `gdb`: the guest is debugged over COM2 (the first module that says it, if several).
    pub gdb: bool,
    /// How many vCPUs the guest has (`vcpus=`, 1 to [`MAX_VCPUS`]; 1 when not given).
    pub vcpus: u8,
    /// The words after `--`, handed to the guest.
    pub args: &'a str,
}

impl ModuleSpec<'_> {
    /// Returns the reserved port the accepted `ports=` includes (only possible with
    /// `unsafe-ports`), for a warning at boot.
    pub fn reserved_port(&self) -> Option<(u16, &'static ReservedPorts)> {
        self.ports.and_then(|(first, count)| reserved_overlap(first, count))
    }
}

/// Why a module line was refused; `Display` renders one log line that names the option and
/// what to write instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleError<'a> {
    /// A word that no [`ModuleOption`] names.
    UnknownOption { word: &'a str },
    /// A value the option does not accept.
    BadValue { option: &'static ModuleOption, value: &'a str },
    /// `mem=` names more than the hypervisor can represent (more than 2^64 bytes).
    MemoryTooLarge { value: &'a str },
    /// An option that needs a value was given as a bare word.
    MissingValue { option: &'static ModuleOption },
    /// A flag option was given a value.
    UnexpectedValue { option: &'static ModuleOption, value: &'a str },
    /// `ports=` includes a reserved port and the module did not say `unsafe-ports`.
    ReservedPort { value: &'a str, port: u16, reserved: &'static ReservedPorts },
    /// `msrs=` names an MSR the VMCS does not switch per guest.
    MsrNotAssignable { msr: u32 },
    /// `msrs=` names more than [`MAX_MSRS`] MSRs.
    TooManyMsrs,
    /// `modules=` names more than [`MAX_MODULES`] modules.
    TooManyModules,
    /// `manages=` names more than [`MAX_MANAGED`] guests.
    TooManyManaged,
    /// `images=` names more than [`MAX_MANAGED`] images.
    TooManyImages,
    /// `vcpus=` above 1 beside an option that serves one vCPU only (`image`, `gdb`).
    VcpusWith { vcpus: u8, option: &'static str },
}

impl fmt::Display for ModuleError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ModuleError::UnknownOption { word } => {
                write!(f, "unknown module option '{word}' (known: ")?;
                for (index, option) in MODULE_OPTIONS.iter().enumerate() {
                    let separator = if index == 0 { "" } else { ", " };
                    write!(f, "{separator}{}", option.syntax)?;
                }
                f.write_str(", -- <guest args>)")
            }
            ModuleError::BadValue { option, value } => {
                write!(f, "bad {} '{value}' for {}=: {}, e.g. {}", option.noun, option.name, option.expected, option.example)
            }
            ModuleError::MemoryTooLarge { value } => write!(
                f,
                "bad size '{value}' for mem=: too large (more than 2^64 bytes); a multiple of 2M up to 1G, e.g. mem=8M"
            ),
            ModuleError::MissingValue { option } => {
                write!(f, "missing value for {}=: {}, e.g. {}", option.name, option.expected, option.example)
            }
            ModuleError::UnexpectedValue { option, value } => {
                write!(f, "{} takes no value (got '{value}'): write just {}", option.name, option.name)
            }
            ModuleError::ReservedPort { value, port, reserved } => write!(
                f,
                "ports={value} includes port {port:#x}, reserved: {}; give ports outside {:#x}-{:#x} (e.g. ports=0x80), \
                 or add unsafe-ports to give it anyway",
                reserved.why, reserved.first, reserved.last
            ),
            ModuleError::MsrNotAssignable { msr } => write!(
                f,
                "MSR {msr:#x} in msrs= cannot be given to a guest: only those the VMCS switches per guest may \
                 (0x174, 0x175, 0x176, 0xc0000100, 0xc0000101)"
            ),
            ModuleError::TooManyMsrs => write!(f, "too many MSRs in msrs=: at most {MAX_MSRS}, e.g. msrs=0x174,0x175"),
            ModuleError::TooManyModules => {
                write!(f, "too many modules in modules=: at most {MAX_MODULES}, e.g. modules=initramfs")
            }
            ModuleError::TooManyManaged => {
                write!(f, "too many guests in manages=: at most {MAX_MANAGED}, e.g. manages=worker,linux")
            }
            ModuleError::VcpusWith { vcpus, option } => write!(
                f,
                "vcpus={vcpus} cannot go with {option}: a guest OS image has one vCPU and the debugger serves one; \
                 drop {option} or write vcpus=1"
            ),
            ModuleError::TooManyImages => {
                write!(f, "too many images in images=: at most {MAX_MANAGED}, e.g. images=mbkernel")
            }
        }
    }
}

/// Describes one module option: its name, how the known-options list shows it, what its
/// value must be, and how it sets [`ModuleSpec`].
#[derive(Clone, Copy)]
pub struct ModuleOption {
    /// The key before `=` (or the whole word of a flag).
    pub name: &'static str,
    /// How the list of known options shows it.
    pub syntax: &'static str,
    /// What the value is ("size", "value"), for "bad <noun> '...'".
    pub noun: &'static str,
    /// What a valid value is.
    pub expected: &'static str,
    /// A valid word.
    pub example: &'static str,
    /// Whether the option takes `=<value>` (false: a flag).
    pub takes_value: bool,
    /// Stores the value in the spec.
    apply: for<'a> fn(&mut ModuleSpec<'a>, &'a str) -> Result<(), ModuleError<'a>>,
}

impl fmt::Debug for ModuleOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleOption").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PartialEq for ModuleOption {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for ModuleOption {}

/// The options a module line knows, in the order the known-options list shows them.
pub static MODULE_OPTIONS: [ModuleOption; 18] = [
    ModuleOption {
        name: "mem",
        syntax: "mem=<size>",
        noun: "size",
        expected: "a multiple of 2M up to 1G",
        example: "mem=8M",
        takes_value: true,
        apply: apply_mem,
    },
    ModuleOption {
        name: "cpu",
        syntax: "cpu=<index>",
        noun: "value",
        expected: "write a CPU index from 0 to 255",
        example: "cpu=1",
        takes_value: true,
        apply: apply_cpu,
    },
    ModuleOption {
        name: "ports",
        syntax: "ports=<first>[-<last>]",
        noun: "value",
        expected: "write a port or a range (hexadecimal with 0x, or decimal)",
        example: "ports=0x80 or ports=0x2e8-0x2ef",
        takes_value: true,
        apply: apply_ports,
    },
    ModuleOption {
        name: "msrs",
        syntax: "msrs=<msr>[,<msr>]",
        noun: "value",
        expected: "write hexadecimal MSR numbers",
        example: "msrs=0xc0000100",
        takes_value: true,
        apply: apply_msrs,
    },
    ModuleOption {
        name: "unsafe-ports",
        syntax: "unsafe-ports",
        noun: "value",
        expected: "a flag",
        example: "unsafe-ports",
        takes_value: false,
        apply: |spec, _| {
            spec.unsafe_ports = true;
            Ok(())
        },
    },
    ModuleOption {
        name: "ring3-caps",
        syntax: "ring3-caps",
        noun: "value",
        expected: "a flag",
        example: "ring3-caps",
        takes_value: false,
        apply: |spec, _| {
            spec.ring3_caps = true;
            Ok(())
        },
    },
    ModuleOption {
        name: "modules",
        syntax: "modules=<name>[,<name>]",
        noun: "value",
        expected: "write the names of data modules, separated by commas",
        example: "modules=initramfs",
        takes_value: true,
        apply: apply_modules,
    },
    ModuleOption {
        name: "input",
        syntax: "input=<name>",
        noun: "value",
        expected: "write the name of a data module",
        example: "input=keys",
        takes_value: true,
        apply: |spec, value| {
            if value.is_empty() {
                return Err(ModuleError::BadValue { option: option("input"), value });
            }
            spec.input = Some(value);
            Ok(())
        },
    },
    ModuleOption {
        name: "manages",
        syntax: "manages=<name>[,<name>]",
        noun: "value",
        expected: "write the names of other guests, separated by commas",
        example: "manages=worker",
        takes_value: true,
        apply: apply_manages,
    },
    ModuleOption {
        name: "data",
        syntax: "data",
        noun: "value",
        expected: "a flag",
        example: "data",
        takes_value: false,
        apply: |spec, _| {
            spec.data = true;
            Ok(())
        },
    },
    ModuleOption {
        name: "images",
        syntax: "images=<name>[,<name>]",
        noun: "value",
        expected: "write the names of image modules, separated by commas",
        example: "images=mbkernel",
        takes_value: true,
        apply: apply_images,
    },
    ModuleOption {
        name: "frames",
        syntax: "frames=<size>",
        noun: "size",
        expected: "a multiple of 2M up to 1G",
        example: "frames=128M",
        takes_value: true,
        apply: apply_frames,
    },
    ModuleOption {
        name: "vcpus",
        syntax: "vcpus=<n>",
        noun: "value",
        expected: "write how many vCPUs, from 1 to 4",
        example: "vcpus=2",
        takes_value: true,
        apply: apply_vcpus,
    },
    ModuleOption {
        name: "image",
        syntax: "image",
        noun: "value",
        expected: "a flag",
        example: "image",
        takes_value: false,
        apply: |spec, _| {
            spec.image = true;
            Ok(())
        },
    },
    ModuleOption {
        name: "nvram",
        syntax: "nvram",
        noun: "value",
        expected: "a flag",
        example: "nvram",
        takes_value: false,
        apply: |spec, _| {
            spec.nvram = true;
            Ok(())
        },
    },
    ModuleOption {
        name: "disk",
        syntax: "disk=<size>",
        noun: "size",
        expected: "a multiple of 2M up to 1G",
        example: "disk=8M",
        takes_value: true,
        apply: apply_disk,
    },
    ModuleOption {
        name: "lwc",
        syntax: "lwc",
        noun: "value",
        expected: "a flag",
        example: "lwc",
        takes_value: false,
        apply: |spec, _| {
            spec.lwc = true;
            Ok(())
        },
    },
    ModuleOption {
        name: "gdb",
        syntax: "gdb",
        noun: "value",
        expected: "a flag",
        example: "gdb",
        takes_value: false,
        apply: |spec, _| {
            spec.gdb = true;
            Ok(())
        },
    },
];

fn apply_modules<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    let mut modules = FixedList::new();
    for name in value.split(',') {
        if name.is_empty() {
            return Err(ModuleError::BadValue { option: option("modules"), value });
        }
        modules.push(name).map_err(|_| ModuleError::TooManyModules)?;
    }
    spec.modules = modules;
    Ok(())
}

fn apply_manages<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    let mut managed = FixedList::new();
    for name in value.split(',') {
        if name.is_empty() {
            return Err(ModuleError::BadValue { option: option("manages"), value });
        }
        managed.push(name).map_err(|_| ModuleError::TooManyManaged)?;
    }
    spec.manages = managed;
    Ok(())
}

fn apply_images<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    let mut images = FixedList::new();
    for name in value.split(',') {
        if name.is_empty() {
            return Err(ModuleError::BadValue { option: option("images"), value });
        }
        images.push(name).map_err(|_| ModuleError::TooManyImages)?;
    }
    spec.images = images;
    Ok(())
}

fn option(name: &str) -> &'static ModuleOption {
    MODULE_OPTIONS.iter().find(|o| o.name == name).unwrap_or(&MODULE_OPTIONS[0])
}

/// Reads a size with an optional K, M or G suffix (M when none).
fn apply_mem<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    spec.memory = size("mem", value)?;
    Ok(())
}

fn apply_disk<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    spec.disk = Some(size("disk", value)?);
    Ok(())
}

fn apply_frames<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    spec.frames = Some(size("frames", value)?);
    Ok(())
}

/// Reads a size for option `name`: a multiple of 2 MiB up to 1 GiB.
fn size<'a>(name: &str, value: &'a str) -> Result<u64, ModuleError<'a>> {
    let bad = ModuleError::BadValue { option: option(name), value };
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let shift = match unit {
        "K" | "k" => 10,
        "M" | "m" | "" => 20,
        "G" | "g" => 30,
        _ => return Err(bad),
    };
    if digits.is_empty() {
        return Err(bad);
    }
    // Digits only, so a parse error is an overflow of u64; the multiplication must not
    // lose bits either (a shift would: 2^44 + 2 megabytes would read as 2M).
    let bytes = digits.parse::<u64>().ok().and_then(|n| n.checked_mul(1 << shift));
    match bytes {
        None if name == "mem" => Err(ModuleError::MemoryTooLarge { value }),
        Some(n) if n > 0 && n % GUEST_MEMORY_GRANULE == 0 && n <= MAX_GUEST_MEMORY => Ok(n),
        None | Some(_) => Err(bad),
    }
}

fn apply_vcpus<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    let digits = !value.is_empty() && value.len() <= 3 && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<u8>().ok().filter(|&n| digits && (1..=MAX_VCPUS).contains(&n)) {
        Some(n) => {
            spec.vcpus = n;
            Ok(())
        }
        None => Err(ModuleError::BadValue { option: option("vcpus"), value }),
    }
}

fn apply_cpu<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<usize>().ok().filter(|&cpu| digits && cpu <= MAX_CPU_INDEX) {
        Some(cpu) => {
            spec.cpu = Some(cpu);
            Ok(())
        }
        None => Err(ModuleError::BadValue { option: option("cpu"), value }),
    }
}

/// Reads a port: hexadecimal with `0x`, or decimal.
fn port_number(text: &str) -> Option<u16> {
    match text.strip_prefix("0x") {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => u16::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => text.parse::<u16>().ok(),
        None => None,
    }
}

fn apply_ports<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    let (first, last) = match value.split_once('-') {
        Some((first, last)) => (port_number(first), port_number(last)),
        None => (port_number(value), port_number(value)),
    };
    match (first, last) {
        (Some(first), Some(last)) if first <= last => {
            spec.ports = Some((first, u32::from(last - first) + 1));
            Ok(())
        }
        _ => Err(ModuleError::BadValue { option: option("ports"), value }),
    }
}

fn apply_msrs<'a>(spec: &mut ModuleSpec<'a>, value: &'a str) -> Result<(), ModuleError<'a>> {
    let mut msrs = FixedList::new();
    for text in value.split(',') {
        let msr = text
            .strip_prefix("0x")
            .filter(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u32::from_str_radix(hex, 16).ok());
        match msr {
            Some(msr) if ASSIGNABLE_MSRS.contains(&msr) => {
                msrs.push(msr).map_err(|_| ModuleError::TooManyMsrs)?;
            }
            Some(msr) => return Err(ModuleError::MsrNotAssignable { msr }),
            None => return Err(ModuleError::BadValue { option: option("msrs"), value: text }),
        }
    }
    spec.msrs = msrs;
    Ok(())
}

/// Parses a module command line. The first word names the guest (its directory part
/// dropped; `guest` when the line is empty); everything after ` -- ` goes to the guest.
/// An option given twice keeps its last value. Returns the first problem found.
pub fn parse(cmdline: &str) -> Result<ModuleSpec<'_>, ModuleError<'_>> {
    let (options, args) = match cmdline.split_once(" -- ") {
        Some((options, args)) => (options, args.trim()),
        None => (cmdline.strip_suffix(" --").unwrap_or(cmdline), ""),
    };
    let mut words = options.split_ascii_whitespace();
    let name = words.next().map(|path| path.rsplit('/').next().unwrap_or(path)).unwrap_or("guest");
    let mut spec = ModuleSpec {
        name,
        memory: DEFAULT_GUEST_MEMORY,
        cpu: None,
        ports: None,
        msrs: FixedList::new(),
        unsafe_ports: false,
        ring3_caps: false,
        gdb: false,
        vcpus: 1,
        modules: FixedList::new(),
        data: false,
        nvram: false,
        lwc: false,
        disk: None,
        input: None,
        manages: FixedList::new(),
        frames: None,
        image: false,
        images: FixedList::new(),
        args,
    };
    let mut ports_value = "";
    for word in words {
        let (key, value) = match word.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (word, None),
        };
        let Some(option) = MODULE_OPTIONS.iter().find(|o| o.name == key) else {
            return Err(ModuleError::UnknownOption { word });
        };
        match (option.takes_value, value) {
            (true, None) => return Err(ModuleError::MissingValue { option }),
            (false, Some(value)) => return Err(ModuleError::UnexpectedValue { option, value }),
            (_, value) => (option.apply)(&mut spec, value.unwrap_or(""))?,
        }
        if key == "ports" {
            ports_value = value.unwrap_or("");
        }
    }
    for (set, option) in [(spec.image, "image"), (spec.gdb, "gdb")] {
        if set && spec.vcpus > 1 {
            return Err(ModuleError::VcpusWith { vcpus: spec.vcpus, option });
        }
    }
    if let (Some((port, reserved)), false) = (spec.reserved_port(), spec.unsafe_ports) {
        return Err(ModuleError::ReservedPort { value: ports_value, port, reserved });
    }
    Ok(spec)
}
