//! Guests' access to I/O ports and MSRs: denied by default (every bit of a VM's I/O and
//! MSR bitmaps set, so every `in`/`out`/`rdmsr`/`wrmsr` exits), granted only through the
//! exo AM's capabilities. The AM emits effects; this module applies them to the VM's
//! bitmaps (SDM Vol. 3 §25.6.4, §25.6.9) and keeps the port grants that allow only one
//! direction, which the exit handler performs for the guest, since the hardware I/O
//! bitmap cannot tell `in` from `out`.
//!
//! Only MSRs the VMCS switches per guest may be assigned ([`MSR_ASSIGNABLE`]): passing one
//! of them through cannot touch host state or leak between guests sharing a CPU.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use nk_am::{msr_access, port_access, Effect};
use nk_caps::VmId;
use spin::Mutex;

use crate::arch::port;
use crate::memory::{self, HostPhysAddr, PAGE_SIZE};

/// MSRs a VM may be given: IA32_SYSENTER_CS/ESP/EIP and IA32_FS_BASE/GS_BASE, whose guest
/// values live in the VMCS guest-state area (SDM Vol. 3 §25.4).
pub const MSR_ASSIGNABLE: [u32; 5] = [0x174, 0x175, 0x176, 0xC000_0100, 0xC000_0101];

/// One VM's bitmaps (I/O A: ports 0-0x7FFF, I/O B: 0x8000-0xFFFF, then the MSR bitmap,
/// contiguous) and port grants.
///
/// Grants are counted: the same (first, count, access) allowed twice is one entry with two
/// references, so the list is as long as the distinct openings the exo AM allows a VM
/// (`nk_am_exo::OPENED_PER_VM`), and the bitmap is touched only when a grant first appears
/// or its last reference goes.
#[derive(Debug)]
struct VmPorts {
    bitmaps: HostPhysAddr,
    grants: Vec<PortGrant>,
}

/// Ports `[first, first + count)` allowed for `access`, by `refs` openings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortGrant {
    first: u16,
    count: u32,
    access: u8,
    refs: u32,
}

impl PortGrant {
    fn end(&self) -> u32 {
        u32::from(self.first) + self.count
    }
}

static PORTS: Mutex<BTreeMap<u32, VmPorts>> = Mutex::new(BTreeMap::new());

const BITMAP_PAGES: usize = 3;

/// A VM's I/O and MSR bitmaps, allocated with every port and MSR denied. Freed (and the
/// VM's grants forgotten) on drop.
#[derive(Debug)]
pub struct IoBitmaps {
    vm: VmId,
    frames: HostPhysAddr,
}

impl IoBitmaps {
    /// Allocates the bitmaps of `vm`, every port and MSR denied.
    pub fn new(vm: VmId) -> Option<Self> {
        let frames = memory::alloc_frames(BITMAP_PAGES)?;
        // SAFETY: freshly allocated, identity-mapped frames owned by this VM.
        unsafe { core::ptr::write_bytes(frames.as_u64() as *mut u8, 0xFF, BITMAP_PAGES * PAGE_SIZE as usize) };
        PORTS.lock().insert(vm.raw(), VmPorts { bitmaps: frames, grants: Vec::new() });
        Some(Self { vm, frames })
    }

    /// Returns the address of I/O bitmap A (B follows it) for the VMCS.
    pub fn address(&self) -> u64 {
        self.frames.as_u64()
    }

    /// Returns the address of the MSR bitmap for the VMCS.
    pub fn msr_bitmap(&self) -> u64 {
        self.frames.as_u64() + 2 * PAGE_SIZE
    }
}

impl Drop for IoBitmaps {
    fn drop(&mut self) {
        PORTS.lock().remove(&self.vm.raw());
        memory::free_frames(self.frames, BITMAP_PAGES);
    }
}

/// Sets or clears bit `bit` of the VM's bitmap pages (`bit` < 3 * 4096 * 8).
fn set_exiting(bitmaps: HostPhysAddr, bit: u32, exiting: bool) {
    debug_assert!((bit as u64) < BITMAP_PAGES as u64 * PAGE_SIZE * 8);
    let byte = (bitmaps.as_u64() + u64::from(bit / 8)) as *mut u8;
    let mask = 1u8 << (bit % 8);
    // SAFETY: callers pass a port (< 0x10000) or an MSR-bitmap bit (< 4096 * 8, offset by
    // two pages), so the byte lies in the VM's bitmap frames, which live as long as its
    // PORTS entry (removed before they are freed, under the same lock).
    unsafe {
        let value = byte.read_volatile();
        byte.write_volatile(if exiting { value | mask } else { value & !mask });
    }
}

/// Returns the MSR bitmap's bit offsets (read, write) of `msr`, within the bitmap page
/// (SDM Vol. 3 §25.6.9: read-low, read-high, write-low, write-high quarters).
fn msr_bits(msr: u32) -> Option<(u32, u32)> {
    let (quarter, index) = match msr {
        0..=0x1FFF => (0, msr),
        0xC000_0000..=0xC000_1FFF => (1, msr - 0xC000_0000),
        _ => return None,
    };
    let read = quarter * 1024 * 8 + index;
    Some((read, read + 2048 * 8))
}

/// Applies an effect an AM emitted. An effect for a VM that is gone is dropped.
pub fn apply(effect: Effect) {
    match effect {
        Effect::IoPorts { vm, first, count, access, allow } => apply_ports(vm, first, count, access, allow),
        Effect::Msr { vm, msr, access, allow } => apply_msr(vm, msr, access, allow),
        Effect::MapFrames { .. }
        | Effect::UnmapFrames { .. }
        | Effect::ProtectFrames { .. }
        | Effect::FreeFrames { .. }
        | Effect::TakeDirty { .. }
        | Effect::PmlEnable { .. }
        | Effect::PmlDrain { .. } => crate::exomem::apply(effect),
        Effect::VmControl { vm, action, by } => crate::vmctl::apply(vm, action, by),
        Effect::CreateVm { vm, image, cpu, hpa, bytes, by, caps } => {
            crate::vmctl::create(vm, image, cpu, (hpa, bytes), (by, caps))
        }
        Effect::LwcCreate { .. }
        | Effect::LwcSwitch { .. }
        | Effect::LwcDestroy { .. }
        | Effect::LwcOverlay { .. }
        | Effect::LwcSyscall { .. }
        | Effect::LwcCapGone { .. }
        | Effect::LwcRange { .. } => crate::lwc::apply(effect),
        // NullKernel::apply_effects delegated the copies: nothing for the hypervisor.
        Effect::LwcImport { .. } => {}
        // The null-Kernel's own: NullKernel::apply_effects hands on only a root another
        // instance holds, which that instance retires.
        Effect::Retire { am, root } => {
            if let Some(mesh) = crate::mesh::get() {
                mesh.forward_retire(am, root);
            }
        }
    }
}

fn apply_msr(vm: VmId, msr: u32, access: u8, allow: bool) {
    if !MSR_ASSIGNABLE.contains(&msr) {
        log::error!(target: "guest", "vm{}: MSR {msr:#x} is not assignable; grant ignored", vm.raw());
        return;
    }
    let ports = PORTS.lock();
    let (Some(vm_ports), Some((read, write))) = (ports.get(&vm.raw()), msr_bits(msr)) else { return };
    let msr_page = (2 * PAGE_SIZE * 8) as u32;
    if access & msr_access::READ != 0 {
        set_exiting(vm_ports.bitmaps, msr_page + read, !allow);
    }
    if access & msr_access::WRITE != 0 {
        set_exiting(vm_ports.bitmaps, msr_page + write, !allow);
    }
}

fn apply_ports(vm: VmId, first: u16, count: u32, access: u8, allow: bool) {
    let mut ports = PORTS.lock();
    let Some(vm_ports) = ports.get_mut(&vm.raw()) else { return };
    let end = (u32::from(first) + count).min(0x1_0000);
    let both = port_access::IN | port_access::OUT;
    let found = vm_ports.grants.iter().position(|g| (g.first, g.count, g.access) == (first, count, access));
    if allow {
        if let Some(i) = found {
            vm_ports.grants[i].refs += 1;
            return;
        }
        if vm_ports.grants.try_reserve(1).is_err() {
            log::error!(target: "guest", "vm{}: no memory for a port grant; the ports stay closed", vm.raw());
            return;
        }
        vm_ports.grants.push(PortGrant { first, count, access, refs: 1 });
        // A port is passed through while a grant gives both directions: a new grant can
        // only open more.
        if access & both == both {
            for port in u32::from(first)..end {
                set_exiting(vm_ports.bitmaps, port, false);
            }
        }
        return;
    }
    let Some(i) = found else { return };
    vm_ports.grants[i].refs -= 1;
    if vm_ports.grants[i].refs > 0 || access & both != both {
        return;
    }
    vm_ports.grants.swap_remove(i);
    // Close the range, then reopen what the other two-way grants still cover: linear in
    // the range and the (bounded) grants, not their product.
    for port in u32::from(first)..end {
        set_exiting(vm_ports.bitmaps, port, true);
    }
    for grant in vm_ports.grants.iter().filter(|g| g.access & both == both) {
        for port in u32::from(first).max(u32::from(grant.first))..end.min(grant.end()) {
            set_exiting(vm_ports.bitmaps, port, false);
        }
    }
}

/// Performs an exiting `in`/`out` of `size` bytes on `port` for `vm` if a grant allows
/// that direction; returns the value read for `in`, or None if not granted.
pub fn emulate(vm: VmId, port: u16, size: u8, is_in: bool, value: u64) -> Option<u64> {
    let needed = if is_in { port_access::IN } else { port_access::OUT };
    let ports = PORTS.lock();
    let grants = &ports.get(&vm.raw())?.grants;
    let last = u32::from(port) + u32::from(size) - 1;
    let granted =
        grants.iter().any(|g| g.access & needed != 0 && u32::from(g.first) <= u32::from(port) && last < g.end());
    if !granted {
        return None;
    }
    Some(match (is_in, size) {
        (true, 1) => u64::from(port::inb(port)),
        (true, 2) => u64::from(port::inw(port)),
        (true, _) => u64::from(port::inl(port)),
        (false, 1) => {
            port::outb(port, value as u8);
            0
        }
        (false, 2) => {
            port::outw(port, value as u16);
            0
        }
        (false, _) => {
            port::outl(port, value as u32);
            0
        }
    })
}
