//! The abstract machines this hypervisor runs: one line each in [`AMS`], in registration
//! order (an AM's id is its position + 1; AM id 0 is the null-Kernel itself), with the
//! capability quota of its roots on every kernel instance and how it is made from the
//! boot modules' settings. `cargo xtask new-am NAME` adds a crate's line here (and its
//! dependency in Cargo.toml); docs/writing-an-am.md.

use alloc::boxed::Box;

use nk_am::AbstractMachine;

use crate::guest::GuestSpec;
use crate::vmctl;

/// How many root capabilities (one per object it hands out) an AM may hold on each
/// kernel instance.
const AM_QUOTA: u32 = 4096;
/// Guest-physical addresses below this may hold exo mappings (the bare-metal guests'
/// page tables identity-map the first GiB).
const EXO_GPA_LIMIT: u64 = 1 << 30;
/// Bytes of frames each VM may allocate through the exo AM at a time, unless its module
/// says `frames=`.
pub const EXO_FRAME_QUOTA: u64 = 4 << 20;
/// Where the NVRAM AM maps regions (guest-physical 1-2 GiB, above the exo AM's range);
/// the exo AM may read, never clear, the dirty flags there (`exo_dirty::KEEP`).
const NVRAM_WINDOW: (u64, u64) = (1 << 30, 2 << 30);

/// One AM: its name (for logs), its quota and how to make it for the boot's guests.
pub struct AmLine {
    pub name: &'static str,
    pub quota: u32,
    /// Whether this boot needs the AM ([`always`] for most: an AM nobody can reach still
    /// costs every capability lookup a little).
    pub when: fn(&BootModules<'_>) -> bool,
    pub make: fn(&BootModules<'_>) -> Box<dyn AbstractMachine + Send>,
}

/// What the boot modules asked for: the guests (VM i+1 is `guests[i]`) and the images
/// (modules marked `image`) the guest-OS AM creates VMs from.
pub struct BootModules<'a> {
    pub guests: &'a [GuestSpec],
    pub images: &'a [GuestSpec],
}

/// Every AM, in registration order.
pub static AMS: &[AmLine] = &[
    AmLine { name: "counter", quota: AM_QUOTA, when: always, make: |_| Box::new(nk_am_counter::CounterAm::new()) },
    AmLine { name: "exo", quota: AM_QUOTA, when: always, make: |boot| Box::new(exo_am(boot.guests)) },
    AmLine {
        name: "guest-os",
        quota: AM_QUOTA,
        when: always,
        make: |boot| Box::new(vm_objects(boot.guests, boot.images.to_vec())),
    },
    // The block AM (am/block, the seed's d-AM): the durable device as block-range
    // capabilities, granted to the NVRAM AM on each kernel instance at start-up, and a
    // range at the device's end to each guest whose module says `disk=` (its virtio block
    // device, osvm.rs); only when the NVRAM AM runs or a guest has a disk.
    AmLine {
        name: "block",
        quota: AM_QUOTA,
        when: |boot| boot.guests.iter().any(|g| g.nvram || g.disk.is_some()),
        make: |boot| Box::new(nk_am_block::BlockAm::new(disk_grants(boot.guests)).serving("nvram")),
    },
    // Only when a guest's module says `nvram` (one more AM principal made derive 16
    // instructions longer in `cargo xtask bench hypercall`).
    AmLine {
        name: "nvram",
        quota: AM_QUOTA,
        when: |boot| boot.guests.iter().any(|g| g.nvram),
        make: |boot| Box::new(nvram_am(boot.guests)),
    },
    // Light-weight contexts (am/lwc, docs/lwc.md): a guest whose module says `lwc` gets
    // its root lwC as its last initial capability. Only then, as the NVRAM AM's line, so
    // boots without lwCs keep their hypercall cost.
    AmLine {
        name: "lwc",
        quota: AM_QUOTA,
        when: |boot| boot.guests.iter().any(|g| g.lwc),
        make: |boot| {
            let vms = boot.guests.iter().enumerate().filter(|(_, g)| g.lwc);
            Box::new(nk_am_lwc::LwcAm::for_vms(vms.map(|(i, g)| (nk_caps::VmId::new(i as u32 + 1), g.memory))))
        },
    },
    // cargo xtask new-am adds new AMs' lines above this one.
];

/// The block AM's grants: for each guest whose module says `disk=<size>` (VM i+1), a range
/// of that size at the end of the durable device, the first such guest's last; the NVRAM
/// AM gets what lies below them. Without a durable device, or when the disks do not fit
/// in half of it, a guest gets no range (its device then fails every request) and the
/// log says why.
fn disk_grants(guests: &[GuestSpec]) -> alloc::vec::Vec<nk_am_block::BlockGrant> {
    let mut size = 0;
    let durable = crate::storage::with_media(|media| size = media.size()).is_some();
    let size = size - size % nk_am_block::UNIT;
    let mut end = size;
    let mut grants = alloc::vec::Vec::new();
    for (i, g) in guests.iter().enumerate() {
        let Some(bytes) = g.disk else { continue };
        let vm = nk_caps::VmId::new(i as u32 + 1);
        if !durable || end.saturating_sub(bytes) < size / 2 {
            log::error!(target: "boot", "vm{}/{}: disk={} MiB: {}; its virtio block device fails every request",
                vm.raw(), g.name, bytes >> 20,
                if durable { "does not fit in half of the durable device" } else { "the machine has no durable device (an NVRAM disk)" });
            continue;
        }
        end -= bytes;
        log::info!(target: "boot", "vm{}/{}: disk: block-AM range [{end:#x}, {:#x}) of the durable device ({} MiB)",
            vm.raw(), g.name, end + bytes, bytes >> 20);
        grants.push(nk_am_block::BlockGrant { vm, first: end, bytes });
    }
    grants
}

/// Every boot runs the AM.
pub fn always(_: &BootModules<'_>) -> bool {
    true
}

/// Bytes of the NVRAM device when it is RAM (no durable device installed).
const NVRAM_RAM_BYTES: u64 = 4 << 20;

/// Makes the NVRAM AM (when some guest's module says `nvram`): a factory for each such guest, its owner
/// number the FNV-1a hash of the guest's name (so a restarted guest of the same name finds
/// its regions); regions map at guest-physical 1-2 GiB, above the exo AM's range. Installs
/// RAM as the device unless one is installed already (a durable device goes in first).
fn nvram_am(guests: &[GuestSpec]) -> nk_am_nvram::NvramAm {
    let grants: alloc::vec::Vec<_> = guests
        .iter()
        .enumerate()
        .filter(|(_, g)| g.nvram)
        .map(|(i, g)| nk_am_nvram::NvramGrant::for_guest(nk_caps::VmId::new(i as u32 + 1), &g.name))
        .collect();
    if !nk_am::MediaSource::with_media(&crate::nvram::DEVICE, &mut |_| {}) {
        match crate::nvram::RamMedia::allocate(NVRAM_RAM_BYTES) {
            Some(ram) => crate::nvram::install(alloc::boxed::Box::new(ram)),
            None => log::error!(target: "nvram", "no frames for a RAM device: NVRAM calls will fail"),
        }
    }
    nk_am_nvram::NvramAm::new(grants).with_window(NVRAM_WINDOW.0, NVRAM_WINDOW.1)
}

/// The exo AM, told which port range and MSRs each guest (VM i+1) may open and where its
/// memory lies.
fn exo_am(guests: &[GuestSpec]) -> nk_am_exo::ExoAm {
    let mut assignments: alloc::vec::Vec<_> = guests
        .iter()
        .enumerate()
        .map(|(i, g)| nk_am_exo::VmAssignment {
            vm: Some(nk_caps::VmId::new(i as u32 + 1)),
            ports: g.ports.and_then(|(first, count)| nk_am_exo::PortRange::new(first, count)),
            msrs: g.msrs.clone(),
            memory: Some(nk_am_exo::VmMemory {
                gpa_base: 0,
                gpa_limit: EXO_GPA_LIMIT,
                frame_quota: g.frames.unwrap_or(EXO_FRAME_QUOTA),
                initial_bytes: g.memory,
                initial_hpa: None,
            }),
        })
        .collect();
    // The boot principal allocates the RAM of every boot VM that is a guest OS (vmctl.rs,
    // "boot VMs"): its frame quota is exactly what their modules' `mem=` add up to.
    let boot_ram = guests.iter().filter(|g| is_guest_os(g)).map(|g| g.memory).sum();
    assignments.push(nk_am_exo::VmAssignment {
        vm: Some(vmctl::BOOT_PRINCIPAL),
        ports: None,
        msrs: alloc::vec::Vec::new(),
        memory: Some(nk_am_exo::VmMemory {
            gpa_base: 0,
            gpa_limit: EXO_GPA_LIMIT,
            frame_quota: boot_ram,
            initial_bytes: 0,
            initial_hpa: None,
        }),
    });
    nk_am_exo::ExoAm::new(assignments).with_dirty_keep_window(NVRAM_WINDOW.0, NVRAM_WINDOW.1)
}

/// Returns the guest-OS AM's code for the kind of image `bytes` holds.
fn image_code(bytes: &[u8]) -> u8 {
    use nk_am_guest_os::image;
    use nk_loader::image::ImageKind;
    match ImageKind::detect(bytes) {
        ImageKind::Elf64 => image::BARE_METAL,
        ImageKind::BzImage => image::LINUX,
        ImageKind::Multiboot1 { .. } => image::MULTIBOOT,
        ImageKind::Multiboot2 { .. } => image::MULTIBOOT2,
        ImageKind::Unknown => image::UNKNOWN,
    }
}

/// Tells whether a boot module is a guest OS (a Linux bzImage or a Multiboot kernel): its VM
/// is built through the guest-OS AM's `create` at boot (vmctl.rs, "boot VMs").
pub fn is_guest_os(spec: &GuestSpec) -> bool {
    use nk_am_guest_os::image;
    matches!(image_code(spec.image), image::LINUX | image::MULTIBOOT | image::MULTIBOOT2)
}

/// Makes every guest (VM i+1) an object of the guest-OS AM: its record on the board the
/// AM's `inspect` reads, and for each `manages=` name a capability its holder starts with;
/// and every `image` module an image object, with a capability for each guest whose
/// `images=` names it. A name that is no guest's (no image's) is reported and skipped; so
/// is an image that is not a guest OS (only a Linux bzImage or a Multiboot kernel can be).
fn vm_objects(guests: &[GuestSpec], images: alloc::vec::Vec<GuestSpec>) -> nk_am_guest_os::GuestOsAm {
    use nk_am_guest_os::{image, Image, ImageGrant, Images, VmGrant, VmRecord};
    use nk_caps::VmId;
    let records = guests
        .iter()
        .enumerate()
        .map(|(i, g)| VmRecord::new(VmId::new(i as u32 + 1), &g.name, image_code(g.image), g.memory, u32::MAX))
        .collect();
    let board = vmctl::install(records);
    let mut grants = alloc::vec::Vec::new();
    for (i, g) in guests.iter().enumerate() {
        let holder = VmId::new(i as u32 + 1);
        for name in &g.manages {
            match board.find(name) {
                Some(target) if target != holder => grants.push(VmGrant { holder, target }),
                Some(_) => {
                    log::error!(target: "boot", "vm{}/{}: manages={name}: a guest cannot manage itself; skipped", holder.raw(), g.name)
                }
                None => {
                    log::error!(target: "boot", "vm{}/{}: manages={name}: no guest has that name; skipped", holder.raw(), g.name)
                }
            }
        }
    }
    let images: alloc::vec::Vec<_> = images
        .into_iter()
        .filter(|spec| match image_code(spec.image) {
            image::LINUX | image::MULTIBOOT | image::MULTIBOOT2 => true,
            _ => {
                log::error!(target: "boot", "module '{}': an image must be a Linux bzImage or a Multiboot kernel; skipped", spec.name);
                false
            }
        })
        .collect();
    let mut image_grants = alloc::vec::Vec::new();
    for (i, g) in guests.iter().enumerate() {
        let holder = VmId::new(i as u32 + 1);
        for name in &g.images {
            match images.iter().position(|image| &image.name == name) {
                Some(index) => image_grants.push(ImageGrant { holder, image: index as u32 }),
                None => {
                    log::error!(target: "boot", "vm{}/{}: images={name}: no module is an image with that name; skipped", holder.raw(), g.name)
                }
            }
        }
    }
    // Every boot module that is a guest OS is an image too, after the `image` modules: the
    // boot principal holds it and builds the VM from it with `create` (vmctl.rs).
    let mut images = images;
    let mut boot = alloc::vec::Vec::new();
    for (i, g) in guests.iter().enumerate().filter(|(_, g)| is_guest_os(g)) {
        let image = images.len() as u32;
        boot.push(nk_am_guest_os::BootVm { vm: VmId::new(i as u32 + 1), image });
        image_grants.push(ImageGrant { holder: vmctl::BOOT_PRINCIPAL, image });
        images.push(g.clone());
    }
    let online_cpus =
        crate::percpu::all().filter(|c| c.in_vmx_root()).fold(0u64, |mask, c| mask | 1 << (c.index() % 64));
    let catalogue = Images {
        images: images.iter().map(|spec| Image { name: spec.name.clone(), kind: image_code(spec.image) }).collect(),
        grants: image_grants,
        online_cpus,
        fits: vmctl::image_fits,
        boot: boot.clone(),
        boot_principal: Some(vmctl::BOOT_PRINCIPAL),
    };
    vmctl::install_images(images, boot);
    nk_am_guest_os::GuestOsAm::new(board, grants).with_images(catalogue)
}
