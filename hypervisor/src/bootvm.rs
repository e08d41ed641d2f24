//! Boot modules that are guest OSes (Linux, Multiboot) come into being through the guest-OS
//! AM, as a VM created at run time does: one way for a VM to come into being.
//!
//! At boot, before any guest runs, the hypervisor's boot principal
//! ([`vmctl::BOOT_PRINCIPAL`], registered on CPU 0's kernel instance) holds one `image`
//! capability per such module (the guest-OS AM made each module an image) and an exo AM
//! address space whose frame quota is the sum of those modules' `mem=`. For each module
//! it makes three ordinary calls, checked like any guest's:
//!
//! 1. exo `alloc(aspace, pages, large)`: the VM's RAM, charged to the boot principal
//!    (2 MiB pages where `mem=` is a multiple of 2 MiB);
//! 2. guest-os `create(image, frames, cpu, vm)`: the AM lends the frames to the VM, the
//!    hypervisor loads the image into them and registers the VM's EPT (`vmctl::create`),
//!    and the boot principal gets a `vm` capability; the fourth argument names the VM id
//!    the boot gave the module (only the boot principal may, once, with the VM's own
//!    image);
//! 3. guest-os `start(vm)`: the VM's CPU adopts it and runs it.
//!
//! **Who pays.** The boot principal, not the VM: the VM cannot pay before it exists, and
//! its own exo frame quota (`frames=`) stays what it may allocate at run time, as for
//! every VM. The boot principal never runs, so nothing but the VM itself touches the
//! frames; its quota is exactly the modules' memory, so it cannot allocate more.
//!
//! **Lifetime.** The boot principal holds each boot VM's frames and `vm` capability until
//! every guest has ended; then it is removed ([`retire`]), its capabilities die, and the
//! exo AM gives the frames back (the `none leaked` line counts them). The VM keeps its
//! initial capabilities from its module line (the VM was registered at boot, before the
//! calls), and its NKCP table is written when its CPU adopts it.

use alloc::format;
use alloc::string::String;

use nk_abi::{Call, NameWords, Reply, Selector};
use nk_caps::{AmId, Principal, VmId};
use nk_core::Dispatched;

use crate::guest::GuestSpec;
use crate::mesh::Mesh;
use crate::vmctl::BOOT_PRINCIPAL;

/// The kernel instance the boot principal lives on (the BSP's).
const BOOT_CPU: usize = 0;
/// Capabilities the boot principal may hold: an image, frames and a VM per boot VM, and
/// its initial ones.
const BOOT_QUOTA: u32 = 4096;

/// The boot principal's capabilities the calls use.
pub struct BootPrincipal {
    exo: AmId,
    aspace: NameWords,
    guest_os: AmId,
}

/// Registers the boot principal on CPU 0's kernel instance (its AMs grant it its address
/// space and the boot images) and finds its exo address space.
pub fn register(mesh: &Mesh) -> Result<BootPrincipal, String> {
    let mut kernel = mesh.instance(BOOT_CPU).kernel.lock();
    kernel.add_vm(BOOT_PRINCIPAL, BOOT_QUOTA).map_err(|e| format!("the boot principal: {e:?}"))?;
    let registry = kernel.table().registry();
    let (mut exo, mut guest_os) = (None, None);
    for &(am, name) in kernel.initial_caps(BOOT_PRINCIPAL) {
        let Ok(info) = kernel.table().inspect(Principal::Vm(BOOT_PRINCIPAL), name) else { continue };
        match (registry.am_name(am), registry.kind_name(am, info.object.kind)) {
            (Some("exo"), Some("aspace")) => exo = Some((am, nk_core::words_of(name))),
            (Some("guest-os"), Some("image")) => guest_os = Some(am),
            _ => {}
        }
    }
    let (Some((exo, aspace)), Some(guest_os)) = (exo, guest_os) else {
        return Err(String::from("the boot principal holds no exo address space or no image"));
    };
    Ok(BootPrincipal { exo, aspace, guest_os })
}

impl BootPrincipal {
    /// Makes one call as the boot principal on CPU 0's instance; its effects are applied
    /// before it returns. The boot principal's calls involve no other instance.
    fn call(&self, mesh: &Mesh, am: AmId, op: u32, cap: NameWords, args: [u64; 5]) -> Result<Reply, String> {
        let mut call = Call { selector: Selector::new(am.raw(), op).encode(), args, ..Call::default() };
        call.caps[0] = cap;
        match mesh.hypercall(BOOT_CPU, BOOT_PRINCIPAL, &call) {
            Dispatched::Reply(reply) if reply.status().is_ok() => Ok(reply),
            Dispatched::Reply(reply) => Err(format!("{}", reply.status())),
            Dispatched::Pending(_) => Err(String::from("waits for another kernel instance")),
        }
    }

    /// Builds boot VM `vm` (module `spec`, on `cpu`) from image `image` with the guest-OS
    /// AM's calls, and starts it; a refusal is one line's reason.
    pub fn create(&self, mesh: &Mesh, vm: VmId, spec: &GuestSpec, cpu: usize, image: u32) -> Result<(), String> {
        let image_cap = self.image_cap(mesh, image).ok_or("the boot principal holds no capability to its image")?;
        const LARGE: u64 = 2 << 20;
        let (pages, large) = match spec.memory % LARGE {
            0 => (spec.memory / LARGE, 1),
            _ => (spec.memory.div_ceil(0x1000), 0),
        };
        let frames = self
            .call(mesh, self.exo, nk_abi::exo_op::ALLOC, self.aspace, [pages, large, 0, 0, 0])
            .map_err(|e| format!("exo alloc of its {} MiB: {e}", spec.memory >> 20))?
            .name;
        let args = [frames.low, frames.high, cpu as u64, u64::from(vm.raw()), 0];
        let created = self
            .call(mesh, self.guest_os, nk_abi::guest_os_op::CREATE, image_cap, args)
            .map_err(|e| format!("guest-OS create: {e}"))?;
        self.call(mesh, self.guest_os, nk_abi::guest_os_op::START, created.name, [0; 5])
            .map_err(|e| format!("guest-OS start: {e}"))?;
        Ok(())
    }

    /// Returns the boot principal's capability to image `image`.
    fn image_cap(&self, mesh: &Mesh, image: u32) -> Option<NameWords> {
        let kernel = mesh.instance(BOOT_CPU).kernel.lock();
        kernel.initial_caps(BOOT_PRINCIPAL).iter().find_map(|&(am, name)| {
            let info = kernel.table().inspect(Principal::Vm(BOOT_PRINCIPAL), name).ok()?;
            (am == self.guest_os && info.object.id.raw() == u64::from(image)).then(|| nk_core::words_of(name))
        })
    }
}

/// Removes the boot principal once every guest has ended: its capabilities die, the exo
/// AM gives the boot VMs' frames back.
pub fn retire(mesh: &Mesh) {
    match mesh.remove_vm(BOOT_CPU, BOOT_PRINCIPAL) {
        Ok(_) | Err(nk_caps::PrincipalError::UnknownPrincipal) => {}
        Err(e) => log::error!(target: "guest", "the boot principal could not be removed: {e:?}"),
    }
}
