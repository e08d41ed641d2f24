//! `nk`: the null-Kernel's operations for Linux user space.
//!
//! An ordinary process of an unmodified Linux holds capabilities to the null-Kernel's AMs
//! and invokes them with `VMCALL` from ring 3, bypassing Linux (seed
//! null-kernel-ptx-lwc-thesis.txt §5.2.2, "Layer Bypassing"): the instruction exits to the
//! hypervisor whatever the CPL, and the hypervisor checks the capabilities like any other
//! caller's. Registers, selectors and status codes are the shared `nk-abi` crate's, the
//! same the bare-metal guests use; this crate adds safe, typed wrappers and errors in
//! words.
//!
//! Outside the null-Kernel `VMCALL` raises #UD (SIGILL); [`present`] checks the CPUID
//! hypervisor leaf first, and every call here returns [`Error::NotUnderNullKernel`]
//! instead of executing it.
//!
//! Listing capabilities (`INITIAL`, `RECEIVED`) from ring 3 is `NOT_PERMITTED` unless the
//! VM's module line says `ring3-caps` (README); the other operations need only a name
//! the process learnt.

use std::fmt;
use std::str::FromStr;

pub use nk_abi::{
    counter_op, exo_access, exo_op, nk_op, nvram_op, nvram_rights, NameWords, Selector, Status, NULL_KERNEL_AM,
};
use nk_abi::{Call, Reply};

/// The CPUID signature of the null-Kernel (leaf 0x40000000, EBX:ECX:EDX).
pub const SIGNATURE: &[u8; 12] = b"NullKernelHV";

/// Says whether this process runs in a VM of the null-Kernel (CPUID leaf 0x40000000).
pub fn present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 1 ECX bit 31: a hypervisor is present; only then is 0x40000000 defined.
        let leaf1 = std::arch::x86_64::__cpuid(1);
        if leaf1.ecx & (1 << 31) == 0 {
            return false;
        }
        let sig = std::arch::x86_64::__cpuid(0x4000_0000);
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&sig.ebx.to_le_bytes());
        bytes[4..8].copy_from_slice(&sig.ecx.to_le_bytes());
        bytes[8..].copy_from_slice(&sig.edx.to_le_bytes());
        &bytes == SIGNATURE
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A capability name (128 bits). Written as 32 hex digits, high word first.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Cap(pub NameWords);

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.0.high, self.0.low)
    }
}

impl FromStr for Cap {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let digits = text.strip_prefix("0x").unwrap_or(text);
        if digits.is_empty() || digits.len() > 32 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "'{text}' is not a capability name: write up to 32 hex digits as `nkctl caps` prints them"
            ));
        }
        let value = u128::from_str_radix(digits, 16).map_err(|e| format!("'{text}': {e}"))?;
        Ok(Cap(NameWords { low: value as u64, high: (value >> 64) as u64 }))
    }
}

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The process does not run under the null-Kernel (no CPUID signature).
    NotUnderNullKernel,
    /// The null-Kernel refused the call `op` with `status`.
    Refused { op: &'static str, status: Status },
}

impl Error {
    /// Returns the status the null-Kernel answered, if it answered.
    pub fn status(&self) -> Option<Status> {
        match self {
            Error::NotUnderNullKernel => None,
            Error::Refused { status, .. } => Some(*status),
        }
    }
}

impl Error {
    /// Says what went wrong, without the operation's name (for tools that name it).
    pub fn reason(&self) -> String {
        match self {
            Error::NotUnderNullKernel => self.to_string(),
            Error::Refused { op, status } => {
                let hint = match status.code() {
                    Status::NOT_PERMITTED if matches!(*op, "initial" | "received") => {
                        " (outside ring 0 the VM's module line must say ring3-caps)"
                    }
                    Status::NOT_PERMITTED if *op == "bind" => " (a bearer capability cannot be bound to a process)",
                    Status::WRONG_HOLDER => " (another VM's, or bound to another process of this one)",
                    _ => "",
                };
                format!("{status}{hint}")
            }
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotUnderNullKernel => f.write_str(
                "not running under the null-Kernel (CPUID leaf 0x40000000 lacks its signature); \
                 hypercalls would raise SIGILL here",
            ),
            Error::Refused { op, .. } => write!(f, "{op}: {}", self.reason()),
        }
    }
}

impl std::error::Error for Error {}

/// What `inspect` tells about a capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// The AM whose object it names (0: the null-Kernel).
    pub am: u16,
    /// The object's kind within that AM.
    pub kind: u32,
    /// The object's id within that AM.
    pub object: u64,
    /// The rights bits (named by the AM's kind).
    pub rights: u64,
    /// The holder: a VM id, or an AM's id when `holder_is_am`.
    pub holder: u64,
    /// Whether an AM, not a VM, holds it.
    pub holder_is_am: bool,
    /// Whether any holder may use it (bearer) rather than only `holder`.
    pub bearer: bool,
    /// Whether it is bound to one process of its holder VM ([`bind`]).
    pub process_bound: bool,
}

impl Info {
    fn decode(r: [u64; 4]) -> Self {
        Info {
            am: (r[0] >> 32) as u16,
            kind: r[0] as u32,
            object: r[1],
            rights: r[2],
            holder: (r[3] & !(3 << 62)) >> 1,
            holder_is_am: r[3] >> 63 == 1,
            bearer: r[3] & 1 == 1,
            process_bound: (r[3] >> 62) & 1 == 1,
        }
    }
}

/// One capability of the caller's lists (`INITIAL` or `RECEIVED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listed {
    pub cap: Cap,
    /// The AM of its object.
    pub am: u16,
    /// For a received capability, who sent it: Some(VM id), or None when an AM did.
    pub sender: Option<u64>,
}

/// Where Linux shows the NKCP table (root only, mode 0400).
pub const NKCP_PATH: &str = "/sys/firmware/acpi/tables/NKCP";

/// One capability the VM's operator handed to this process through the NKCP table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handed {
    pub cap: Cap,
    /// The AM of its object.
    pub am: u16,
    /// Its kind within that AM.
    pub kind: u32,
    /// `<am>/<kind>`, e.g. `exo/frames`.
    pub label: String,
}

/// Reads the capabilities the hypervisor lists in the VM's NKCP ACPI table
/// (`nk_abi::nkcp`: the channel by which a guest OS's operator hands capability names to
/// the processes it chooses). Fails with a sentence when the table cannot be read (not
/// root, or not under the null-Kernel) or is damaged.
pub fn handed_caps() -> Result<Vec<Handed>, String> {
    let bytes = std::fs::read(NKCP_PATH).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            format!("cannot read {NKCP_PATH}: only root may (the VM's operator hands capabilities to root's processes)")
        } else {
            format!("cannot read {NKCP_PATH}: {e} (is this a guest-OS VM of the null-Kernel?)")
        }
    })?;
    parse_handed(&bytes)
}

/// Parses an NKCP table's bytes (see [`handed_caps`]).
pub fn parse_handed(bytes: &[u8]) -> Result<Vec<Handed>, String> {
    let entries = nk_abi::nkcp::entries(bytes).map_err(|e| format!("{NKCP_PATH}: {e}"))?;
    Ok(entries.map(|e| Handed { cap: Cap(e.name), am: e.am, kind: e.kind, label: e.label().to_string() }).collect())
}

/// Calls operation `op` of AM `am`: the generic form every wrapper uses, for AMs this
/// crate has no wrapper for. `name` names the call in errors.
pub fn call(name: &'static str, am: u16, op: u32, caps: &[Cap], args: &[u64]) -> Result<Reply, Error> {
    // CPUID exits to the hypervisor too: ask once per process.
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*PRESENT.get_or_init(present) {
        return Err(Error::NotUnderNullKernel);
    }
    let mut call = Call { selector: Selector::new(am, op).encode(), ..Call::default() };
    for (slot, cap) in call.caps.iter_mut().zip(caps) {
        *slot = cap.0;
    }
    for (slot, arg) in call.args.iter_mut().zip(args) {
        *slot = *arg;
    }
    let reply = nk_abi::hypercall(&call);
    if reply.status().is_ok() {
        Ok(reply)
    } else {
        Err(Error::Refused { op: name, status: reply.status() })
    }
}

fn nk(name: &'static str, op: u32, caps: &[Cap], args: &[u64]) -> Result<Reply, Error> {
    call(name, NULL_KERNEL_AM, op, caps, args)
}

/// The empty round trip.
pub fn null() -> Result<(), Error> {
    nk("null", nk_op::NULL, &[], &[]).map(|_| ())
}

fn listed(name: &'static str, op: u32, index: u64) -> Result<Option<Listed>, Error> {
    match nk(name, op, &[], &[index]) {
        Ok(reply) => {
            let sender = (op == nk_op::RECEIVED && reply.results[2] >> 63 == 0).then_some(reply.results[2] >> 1);
            Ok(Some(Listed { cap: Cap(reply.name), am: reply.results[0] as u16, sender }))
        }
        Err(Error::Refused { status, .. }) if status.code() == Status::BAD_ARGUMENT => Ok(None),
        Err(error) => Err(error),
    }
}

/// The caller's `index`-th initial capability, or None past the last.
pub fn initial(index: u64) -> Result<Option<Listed>, Error> {
    listed("initial", nk_op::INITIAL, index)
}

/// The `index`-th capability in the caller's inbox, or None past the last.
pub fn received(index: u64) -> Result<Option<Listed>, Error> {
    listed("received", nk_op::RECEIVED, index)
}

/// Every initial capability, then every received one, in order (at most 4,096 of each).
pub fn all_caps() -> Result<(Vec<Listed>, Vec<Listed>), Error> {
    let collect = |get: fn(u64) -> Result<Option<Listed>, Error>| -> Result<Vec<Listed>, Error> {
        let mut list = Vec::new();
        for index in 0..4096 {
            match get(index)? {
                Some(entry) => list.push(entry),
                None => break,
            }
        }
        Ok(list)
    };
    Ok((collect(initial)?, collect(received)?))
}

/// What `cap` names, with which rights, held by whom.
pub fn inspect(cap: Cap) -> Result<Info, Error> {
    nk("inspect", nk_op::INSPECT, &[cap], &[]).map(|reply| Info::decode(reply.results))
}

/// A child of `cap` with the rights in `mask` (at most `cap`'s).
pub fn derive(cap: Cap, mask: u64) -> Result<Cap, Error> {
    nk("derive", nk_op::DERIVE, &[cap], &[mask]).map(|reply| Cap(reply.name))
}

/// A child of `cap` with `mask`, delegated to VM `target` (bound to it, or a bearer
/// capability).
pub fn delegate(cap: Cap, target: u32, mask: u64, bearer: bool) -> Result<Cap, Error> {
    nk("delegate", nk_op::DELEGATE, &[cap], &[mask, u64::from(target), u64::from(bearer)]).map(|reply| Cap(reply.name))
}

/// Revokes `cap` and its whole subtree, on every kernel instance; returns how many
/// capabilities died.
pub fn revoke(cap: Cap) -> Result<u64, Error> {
    nk("revoke", nk_op::REVOKE, &[cap], &[]).map(|reply| reply.results[0])
}

/// Binds `cap`, which this VM holds, to this process (its page-table root, which the
/// null-Kernel reads at the call): from then on only this process may present it, and
/// another process of this Linux that presents the name is refused as another VM would
/// be (`WRONG_HOLDER`). One-way (no unbind); children [`derive`]d from it are bound to
/// this process too. Returns the root it is bound to (`nk_abi::process_root`). The
/// binding dies with nothing but the capability: a later process that gets the same root
/// (after this one exits) could use it, so delete or revoke it before exiting.
pub fn bind(cap: Cap) -> Result<u64, Error> {
    nk("bind", nk_op::BIND, &[cap], &[]).map(|reply| reply.results[0])
}

/// Deletes `cap` (its children stay).
pub fn delete(cap: Cap) -> Result<(), Error> {
    nk("delete", nk_op::DELETE, &[cap], &[]).map(|_| ())
}

/// A capability together with the AM whose object it names: what the AM wrappers
/// ([`exo`], [`nvram`]) take, so a call needs no `inspect` first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Obj {
    pub cap: Cap,
    pub am: u16,
}

impl Obj {
    /// Finds `cap`'s AM with one `inspect` call.
    pub fn of(cap: Cap) -> Result<Obj, Error> {
        Ok(Obj { cap, am: inspect(cap)?.am })
    }
}

/// The exo AM's memory operations (`nk_abi::exo_op`): frame sets, mappings into the VM's
/// own guest-physical space (below 1 GiB), and the EPT dirty bits.
pub mod exo {
    use super::{call, exo_op, Cap, Error, Obj};

    /// Allocates `pages` 4 KiB pages (2 MiB ones when `large`) with the address space's
    /// `alloc` right; returns the frame set (every right).
    pub fn alloc(aspace: Obj, pages: u64, large: bool) -> Result<Obj, Error> {
        let reply = call("exo alloc", aspace.am, exo_op::ALLOC, &[aspace.cap], &[pages, u64::from(large)])?;
        Ok(Obj { cap: Cap(reply.name), am: aspace.am })
    }

    /// Maps frame set `frames` at guest-physical `gpa` with `access` (`exo_access` bits).
    pub fn map(frames: Obj, aspace: Obj, gpa: u64, access: u64) -> Result<(), Error> {
        call("exo map", aspace.am, exo_op::MAP, &[frames.cap, aspace.cap], &[gpa, access]).map(|_| ())
    }

    /// Removes the mapping that starts at `gpa`.
    pub fn unmap(aspace: Obj, gpa: u64) -> Result<(), Error> {
        call("exo unmap", aspace.am, exo_op::UNMAP, &[aspace.cap], &[gpa]).map(|_| ())
    }

    /// Changes the access of the mapping that starts at `gpa`.
    pub fn protect(aspace: Obj, gpa: u64, access: u64) -> Result<(), Error> {
        call("exo protect", aspace.am, exo_op::PROTECT, &[aspace.cap], &[gpa, access]).map(|_| ())
    }

    /// Gives a frame set back.
    pub fn free(frames: Obj) -> Result<(), Error> {
        call("exo free", frames.am, exo_op::FREE, &[frames.cap], &[]).map(|_| ())
    }

    /// Reads and clears the EPT dirty flags of `pages` pages from `gpa` into a bitmap
    /// (bit i % 8 of byte i / 8 = page i) at byte `offset` of frame set `bitmap`, which
    /// the caller reads where it mapped the set.
    pub fn dirty(aspace: Obj, bitmap: Obj, gpa: u64, pages: u64, offset: u64) -> Result<(), Error> {
        call("exo dirty", aspace.am, exo_op::DIRTY, &[aspace.cap, bitmap.cap], &[gpa, pages, offset]).map(|_| ())
    }

    /// Reads the EPT dirty flags like [`dirty`] without clearing them (`exo_op::DIRTY`'s
    /// flag `DIRTY_KEEP`), which the exo AM allows also in the NVRAM window, whose flags
    /// are the NVRAM AM's write set.
    pub fn dirty_keep(aspace: Obj, bitmap: Obj, gpa: u64, pages: u64, offset: u64) -> Result<(), Error> {
        let args = [gpa, pages, offset, nk_abi::exo_dirty::KEEP];
        call("exo dirty", aspace.am, exo_op::DIRTY, &[aspace.cap, bitmap.cap], &args).map(|_| ())
    }

    /// The pages a bitmap marks dirty, as page indexes.
    pub fn dirty_pages(bitmap: &[u8], pages: u64) -> Vec<u64> {
        (0..pages).filter(|&i| bitmap.get((i / 8) as usize).is_some_and(|b| b >> (i % 8) & 1 == 1)).collect()
    }
}

/// The NVRAM AM's operations (`nk_abi::nvram_op`): persistent regions mapped into the
/// VM's own guest-physical space (1-2 GiB), committed atomically.
pub mod nvram {
    use super::{call, nvram_op, Cap, Error, Obj};

    /// What `allocate` returns.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Region {
        pub region: Obj,
        pub bytes: u64,
        /// The last committed sequence number (0: nothing committed yet).
        pub seq: u64,
        /// Whether the region was created (false: restored from the device).
        pub created: bool,
    }

    /// Allocates (or finds again, by `key`) a region of `bytes` with the factory.
    pub fn allocate(factory: Obj, bytes: u64, key: u64) -> Result<Region, Error> {
        let reply = call("nvram allocate", factory.am, nvram_op::ALLOCATE, &[factory.cap], &[bytes, key])?;
        Ok(Region {
            region: Obj { cap: Cap(reply.name), am: factory.am },
            bytes: reply.results[0],
            seq: reply.results[1],
            created: reply.results[2] == 1,
        })
    }

    /// Maps the region's working copy at guest-physical `gpa` (read, or read-write).
    pub fn map(region: Obj, gpa: u64, write: bool) -> Result<(), Error> {
        let access = if write { 3 } else { 1 };
        call("nvram map", region.am, nvram_op::MAP, &[region.cap], &[gpa, access]).map(|_| ())
    }

    /// Removes the region's mapping at `gpa`.
    pub fn unmap(region: Obj, gpa: u64) -> Result<(), Error> {
        call("nvram unmap", region.am, nvram_op::UNMAP, &[region.cap], &[gpa]).map(|_| ())
    }

    /// Opens a transaction; returns the committed seq.
    pub fn begin(region: Obj) -> Result<u64, Error> {
        call("nvram begin", region.am, nvram_op::BEGIN, &[region.cap], &[]).map(|r| r.results[0])
    }

    /// What `commit` did.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Committed {
        pub seq: u64,
        pub blocks: u64,
        pub device_bytes: u64,
        pub dirty_pages: u64,
    }

    /// Makes every write since the last commit or restore durable, atomically.
    pub fn commit(region: Obj) -> Result<Committed, Error> {
        let r = call("nvram commit", region.am, nvram_op::COMMIT, &[region.cap], &[])?.results;
        Ok(Committed { seq: r[0], blocks: r[1], device_bytes: r[2], dirty_pages: r[3] })
    }

    /// Puts the working copy back to the last commit; returns its seq.
    pub fn restore(region: Obj) -> Result<u64, Error> {
        call("nvram restore", region.am, nvram_op::RESTORE, &[region.cap], &[]).map(|r| r.results[0])
    }

    /// `(committed seq, bytes, transaction open)`.
    pub fn seq(region: Obj) -> Result<(u64, u64, bool), Error> {
        let r = call("nvram seq", region.am, nvram_op::SEQ, &[region.cap], &[])?.results;
        Ok((r[0], r[1], r[2] == 1))
    }
}

/// The counter AM's operations (`nk_abi::counter_op`): a counter another VM delegates
/// serves as a doorbell between a process and that VM (`nkctl demo`).
pub mod counter {
    use super::{call, counter_op, Error, Obj};

    /// Creates a counter with a counter factory.
    pub fn create(factory: Obj) -> Result<Obj, Error> {
        let reply = call("counter create", factory.am, counter_op::CREATE, &[factory.cap], &[])?;
        Ok(Obj { cap: super::Cap(reply.name), am: factory.am })
    }

    /// The counter's value.
    pub fn read(counter: Obj) -> Result<u64, Error> {
        call("counter read", counter.am, counter_op::READ, &[counter.cap], &[]).map(|r| r.results[0])
    }

    /// Adds `amount`; returns the new value.
    pub fn add(counter: Obj, amount: u64) -> Result<u64, Error> {
        call("counter add", counter.am, counter_op::ADD, &[counter.cap], &[amount]).map(|r| r.results[0])
    }
}

/// Maps `bytes` of guest-physical memory at `gpa` into this process through `/dev/mem`
/// (root; Linux's STRICT_DEVMEM allows it only outside System RAM, e.g. where the NVRAM or
/// exo AM mapped frames above the VM's RAM), for plain loads and stores.
#[cfg(target_os = "linux")]
pub fn map_phys(gpa: u64, bytes: usize) -> Result<&'static mut [u8], String> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
        .map_err(|e| format!("cannot open /dev/mem: {e} (only root may)"))?;
    let offset = i64::try_from(gpa).map_err(|_| format!("{gpa:#x} is out of range"))?;
    // SAFETY: a fresh shared mapping of `bytes` at no fixed address; the kernel checks the
    // offset against /dev/mem's rules and the result is checked below. The slice lives as
    // long as the mapping, which is never unmapped (it ends with the process).
    let ptr = unsafe { libc_mmap(std::ptr::null_mut(), bytes, 3, 1, file.as_raw_fd(), offset) };
    if ptr as isize == -1 || ptr.is_null() {
        return Err(format!(
            "mmap of /dev/mem at {gpa:#x} failed: {} (STRICT_DEVMEM refuses System RAM)",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `ptr` is a live read-write mapping of `bytes` bytes owned by nothing else.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), bytes) })
}

#[cfg(target_os = "linux")]
extern "C" {
    #[link_name = "mmap"]
    fn libc_mmap(
        addr: *mut core::ffi::c_void,
        len: usize,
        prot: i32,
        flags: i32,
        fd: i32,
        off: i64,
    ) -> *mut core::ffi::c_void;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_print_and_parse_back() {
        let cap = Cap(NameWords { low: 0x1234, high: 0xABCD_0000_0000_0001 });
        let text = cap.to_string();
        assert_eq!(text, "abcd0000000000010000000000001234");
        assert_eq!(text.parse::<Cap>(), Ok(cap));
        assert_eq!("0x10".parse::<Cap>(), Ok(Cap(NameWords { low: 16, high: 0 })));
        assert!("xyz".parse::<Cap>().unwrap_err().contains("hex digits"));
        assert!("1".repeat(33).parse::<Cap>().is_err());
    }

    #[test]
    fn handed_caps_parse_from_a_table() {
        // The layout's own tests are nk-abi's; here: a damaged table is a sentence.
        let err = parse_handed(b"NKCP\x10\0\0\0").unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(parse_handed(b"").unwrap_err().contains(NKCP_PATH));
    }

    #[test]
    fn dirty_bitmaps_list_their_pages() {
        assert_eq!(exo::dirty_pages(&[0b1000_0101, 0b1], 9), [0, 2, 7, 8]);
        assert_eq!(exo::dirty_pages(&[0xff], 3), [0, 1, 2]);
        assert!(exo::dirty_pages(&[], 4).is_empty());
    }

    #[test]
    fn inspect_results_decode() {
        let info = Info::decode([(2 << 32) | 1, 7, 0b1011, (3 << 1) | 1]);
        assert_eq!(
            info,
            Info {
                am: 2,
                kind: 1,
                object: 7,
                rights: 0b1011,
                holder: 3,
                holder_is_am: false,
                bearer: true,
                process_bound: false
            }
        );
        let bound = Info::decode([0, 0, 0, (1 << 62) | (5 << 1)]);
        assert!(bound.process_bound && !bound.bearer && !bound.holder_is_am);
        assert_eq!(bound.holder, 5);
    }

    #[test]
    fn errors_say_what_went_wrong() {
        let denied = Error::Refused { op: "initial", status: Status::new(Status::NOT_PERMITTED, None) };
        assert!(denied.to_string().contains("ring3-caps"), "{denied}");
        let rights = Error::Refused { op: "revoke", status: Status::new(Status::UNKNOWN_NAME, Some(0)) };
        assert_eq!(rights.to_string(), "revoke: unknown capability name (capability argument 0)");
        let other = Error::Refused { op: "inspect", status: Status::new(Status::WRONG_HOLDER, Some(0)) };
        assert!(other.to_string().contains("bound to another process"), "{other}");
    }

    #[test]
    fn calls_outside_the_null_kernel_do_not_execute_vmcall() {
        // The host running the tests is no null-Kernel VM: every call must refuse before
        // VMCALL (which would raise SIGILL here).
        if !present() {
            assert_eq!(null(), Err(Error::NotUnderNullKernel));
            assert!(Error::NotUnderNullKernel.to_string().contains("SIGILL"));
        }
    }
}
