//! Guests' access to I/O ports: denied by default (every bit of a VM's I/O bitmaps set, so
//! every `in`/`out` exits), granted only through the exo AM's capabilities. The AM emits
//! effects; this module applies them to the VM's bitmaps (SDM Vol. 3 §25.6.4) and keeps
//! the grants that allow only one direction, which the exit handler performs for the
//! guest, since the hardware bitmap cannot tell `in` from `out`.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use nk_am::{port_access, Effect};
use nk_caps::VmId;
use spin::Mutex;

use crate::arch::port;
use crate::memory::{self, HostPhysAddr, PAGE_SIZE};

/// One VM's bitmaps (A: ports 0-0x7FFF, B: 0x8000-0xFFFF, contiguous) and grants.
#[derive(Debug)]
struct VmPorts {
    bitmaps: HostPhysAddr,
    grants: Vec<(u16, u32, u8)>,
}

static PORTS: Mutex<BTreeMap<u32, VmPorts>> = Mutex::new(BTreeMap::new());

/// A VM's I/O bitmaps, allocated with every port denied. Freed (and the VM's grants
/// forgotten) on drop.
#[derive(Debug)]
pub struct IoBitmaps {
    vm: VmId,
    frames: HostPhysAddr,
}

impl IoBitmaps {
    /// Allocates the two bitmaps of `vm`, every port denied.
    pub fn new(vm: VmId) -> Option<Self> {
        let frames = memory::alloc_frames(2)?;
        // SAFETY: two freshly allocated, identity-mapped frames owned by this VM.
        unsafe { core::ptr::write_bytes(frames.as_u64() as *mut u8, 0xFF, 2 * PAGE_SIZE as usize) };
        PORTS.lock().insert(vm.raw(), VmPorts { bitmaps: frames, grants: Vec::new() });
        Some(Self { vm, frames })
    }

    /// Returns the address of bitmap A (B follows it) for the VMCS.
    pub fn address(&self) -> u64 {
        self.frames.as_u64()
    }
}

impl Drop for IoBitmaps {
    fn drop(&mut self) {
        PORTS.lock().remove(&self.vm.raw());
        memory::free_frames(self.frames, 2);
    }
}

fn set_exiting(bitmaps: HostPhysAddr, port: u32, exiting: bool) {
    let byte = (bitmaps.as_u64() + u64::from(port / 8)) as *mut u8;
    let mask = 1u8 << (port % 8);
    // SAFETY: `port` < 0x10000, so the byte lies in the VM's two bitmap frames, which live
    // as long as its PORTS entry (removed before they are freed, under the same lock).
    unsafe {
        let value = byte.read_volatile();
        byte.write_volatile(if exiting { value | mask } else { value & !mask });
    }
}

/// Applies an effect an AM emitted. An effect for a VM that is gone is dropped.
pub fn apply(effect: Effect) {
    let Effect::IoPorts { vm, first, count, access, allow } = effect;
    let mut ports = PORTS.lock();
    let Some(vm_ports) = ports.get_mut(&vm.raw()) else { return };
    let end = u32::from(first) + count;
    if allow {
        vm_ports.grants.push((first, count, access));
    } else if let Some(i) = vm_ports.grants.iter().position(|&g| g == (first, count, access)) {
        vm_ports.grants.swap_remove(i);
    }
    // Recompute the range: a port is passed through only while a grant gives both
    // directions.
    let both = port_access::IN | port_access::OUT;
    for port in u32::from(first)..end.min(0x1_0000) {
        let open = vm_ports
            .grants
            .iter()
            .any(|&(f, c, a)| a & both == both && u32::from(f) <= port && port < u32::from(f) + c);
        set_exiting(vm_ports.bitmaps, port, !open);
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
        grants.iter().any(|&(f, c, a)| a & needed != 0 && u32::from(f) <= u32::from(port) && last < u32::from(f) + c);
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
