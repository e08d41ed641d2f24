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
/// Bytes of frames each VM may allocate through the exo AM at a time.
const EXO_FRAME_QUOTA: u64 = 4 << 20;

/// One AM: its name (for logs), its quota and how to make it for the boot's guests.
pub struct AmLine {
    pub name: &'static str,
    pub quota: u32,
    pub make: fn(&[GuestSpec]) -> Box<dyn AbstractMachine + Send>,
}

/// Every AM, in registration order.
pub static AMS: &[AmLine] = &[
    AmLine { name: "counter", quota: AM_QUOTA, make: |_| Box::new(nk_am_counter::CounterAm::new()) },
    AmLine { name: "exo", quota: AM_QUOTA, make: |guests| Box::new(exo_am(guests)) },
    AmLine { name: "guest-os", quota: AM_QUOTA, make: |guests| Box::new(vm_objects(guests)) },
    // cargo xtask new-am adds new AMs' lines above this one.
];

/// The exo AM, told which port range and MSRs each guest (VM i+1) may open and where its
/// memory lies.
fn exo_am(guests: &[GuestSpec]) -> nk_am_exo::ExoAm {
    let assignments = guests
        .iter()
        .enumerate()
        .map(|(i, g)| nk_am_exo::VmAssignment {
            vm: Some(nk_caps::VmId::new(i as u32 + 1)),
            ports: g.ports.and_then(|(first, count)| nk_am_exo::PortRange::new(first, count)),
            msrs: g.msrs.clone(),
            memory: Some(nk_am_exo::VmMemory {
                gpa_base: 0,
                gpa_limit: EXO_GPA_LIMIT,
                frame_quota: EXO_FRAME_QUOTA,
                initial_bytes: g.memory,
                initial_hpa: None,
            }),
        })
        .collect();
    nk_am_exo::ExoAm::new(assignments)
}

/// Makes every guest (VM i+1) an object of the guest-OS AM: its record on the board the
/// AM's `inspect` reads, and for each `manages=` name a capability its holder starts with.
/// A name that is no guest's is reported and skipped.
fn vm_objects(guests: &[GuestSpec]) -> nk_am_guest_os::GuestOsAm {
    use nk_am_guest_os::{image, VmGrant, VmRecord};
    use nk_caps::VmId;
    use nk_loader::image::ImageKind;
    let records = guests
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let kind = match ImageKind::detect(g.image) {
                ImageKind::Elf64 => image::BARE_METAL,
                ImageKind::BzImage => image::LINUX,
                ImageKind::Multiboot1 { .. } => image::MULTIBOOT,
                ImageKind::Multiboot2 { .. } => image::MULTIBOOT2,
                ImageKind::Unknown => image::UNKNOWN,
            };
            VmRecord::new(VmId::new(i as u32 + 1), &g.name, kind, g.memory, u32::MAX)
        })
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
    nk_am_guest_os::GuestOsAm::new(board, grants)
}
