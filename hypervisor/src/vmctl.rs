//! VMs as objects of the guest-OS AM (`am/guest-os`): the board of VM records the AM's
//! `inspect` reads (state, CPU, exits, published here at slice boundaries), and the
//! control requests (`Effect::VmControl`: stop, start, destroy) its operations emit.
//!
//! An effect is applied on the caller's CPU, before its call returns: it records the
//! request for the VM and raises the flag of the VM's CPU; if that is another CPU, the
//! wake-up IPI (the doorbell's vector) makes an idle CPU notice, and a CPU running a guest
//! takes the request at its next slice boundary (a slice is at most `TIME_SLICE_TICKS`).
//! The scheduler of the VM's CPU then applies it (`sched`): a stopped VM gets no slices
//! until started; a destroyed VM ends as a guest ends, its capabilities dying on every
//! kernel, once any cross-kernel operation it is parked on has finished.
//!
//! Only a running VM can start a stopped one: when every VM is stopped or ended, the
//! stopped ones can never run again and are ended (each with a line saying so), so a run
//! always finishes.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nk_am::VmAction;
use nk_am_guest_os::{state, VmBoard, VmRecord};
use nk_caps::VmId;
use spin::{Mutex, Once};

use crate::arch::apic;
use crate::percpu::{self, MAX_CPUS};

static BOARD: Once<Arc<VmBoard>> = Once::new();
/// The request waiting for each VM (at most one: a later one replaces it, but nothing
/// replaces a destroy), with the VM that asked.
static REQUESTS: Mutex<Vec<(VmId, VmAction, VmId)>> = Mutex::new(Vec::new());
/// A CPU has requests for its VMs.
static PENDING: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// VMs that are neither stopped nor ended (created ones count: they will run). When none
/// is left, no VM can ever start a stopped one again.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Makes the board of the VMs the boot modules describe (VM i+1 is module i), with
/// their CPU unknown until placed; the AM gets a reference to it.
pub fn install(records: Vec<VmRecord>) -> Arc<VmBoard> {
    BOARD
        .call_once(|| {
            ACTIVE.store(records.len(), Ordering::Release);
            Arc::new(VmBoard::new(records))
        })
        .clone()
}

fn record(vm: VmId) -> Option<&'static VmRecord> {
    BOARD.get().and_then(|board| board.get(vm))
}

/// Publishes the CPU a VM was placed on.
pub fn placed(vm: VmId, cpu: usize) {
    if let Some(r) = record(vm) {
        r.set_cpu(cpu as u32);
    }
}

/// Publishes a VM's state (`nk_am_guest_os::state`) and counts the active VMs; when the
/// last active VM stops or ends while some are stopped, every CPU is told (`orphaned`).
pub fn set_state(vm: VmId, new: u8) {
    let Some(r) = record(vm) else { return };
    let old = r.set_state(new);
    let active = |s: u8| s == state::CREATED || s == state::RUNNING;
    if active(old) == active(new) || old == state::ENDED {
        return;
    }
    if active(new) {
        ACTIVE.fetch_add(1, Ordering::AcqRel);
    } else if ACTIVE.fetch_sub(1, Ordering::AcqRel) == 1 {
        let board = BOARD.get().expect("records exist only on the board");
        let mut cpus = 0u64;
        for stopped in board.records().iter().filter(|r| r.state() == state::STOPPED) {
            cpus |= 1 << stopped.cpu().min(63);
        }
        let me = percpu::current_index() as usize;
        while cpus != 0 {
            let cpu = cpus.trailing_zeros() as usize;
            cpus &= cpus - 1;
            if cpu >= MAX_CPUS {
                continue;
            }
            PENDING[cpu].store(true, Ordering::Release);
            if cpu != me {
                let _ = apic::send_wakeup(percpu::get(cpu).map_or(0, |c| c.apic_id()));
            }
        }
    }
}

/// Tells whether no VM is active any more (all stopped or ended): then nothing can start
/// a stopped VM again. Read before [`take`], so every request an active VM made before it
/// stopped or ended is among those taken.
pub fn orphaned() -> bool {
    ACTIVE.load(Ordering::Acquire) == 0
}

/// Publishes a VM's exit count (at the end of each of its slices).
pub fn set_exits(vm: VmId, exits: u64) {
    if let Some(r) = record(vm) {
        r.set_exits(exits);
    }
}

/// Publishes that a VM ended.
pub fn ended(vm: VmId) {
    set_state(vm, state::ENDED);
}

/// Applies an `Effect::VmControl`: records the request and makes the VM's CPU notice it.
pub fn apply(vm: VmId, action: VmAction, by: VmId) {
    let Some(r) = record(vm) else {
        log::error!(target: "guest", "vm{}: control request from vm{} for an unknown VM ignored", vm.raw(), by.raw());
        return;
    };
    let cpu = r.cpu() as usize;
    if cpu >= MAX_CPUS {
        return;
    }
    {
        let mut requests = REQUESTS.lock();
        match requests.iter_mut().find(|(v, _, _)| *v == vm) {
            Some((_, VmAction::Destroy, _)) => {}
            Some(request) => *request = (vm, action, by),
            None => requests.push((vm, action, by)),
        }
    }
    PENDING[cpu].store(true, Ordering::Release);
    if cpu != percpu::current_index() as usize {
        let apic_id = percpu::get(cpu).map_or(0, |c| c.apic_id());
        if !apic::send_wakeup(apic_id) {
            log::error!(target: "guest", "cpu {cpu} did not accept the wake-up for vm{}'s control request", vm.raw());
        }
    }
}

/// Tells whether requests wait for `cpu`'s VMs (one atomic load: cheap at every slice).
pub fn pending(cpu: usize) -> bool {
    PENDING[cpu].load(Ordering::Acquire)
}

/// Takes the requests for `cpu`'s VMs, in the order they came.
pub fn take(cpu: usize) -> Vec<(VmId, VmAction, VmId)> {
    if !PENDING[cpu].swap(false, Ordering::AcqRel) {
        return Vec::new();
    }
    let mut requests = REQUESTS.lock();
    let mine = requests.iter().filter(|(vm, _, _)| record(*vm).is_some_and(|r| r.cpu() as usize == cpu)).copied();
    let taken: Vec<_> = mine.collect();
    requests.retain(|request| !taken.contains(request));
    taken
}

/// Returns a VM's name for log lines (`?` if unknown).
pub fn name(vm: VmId) -> &'static str {
    record(vm).map_or("?", VmRecord::name)
}
