//! `cargo xtask run`: build, boot in an emulator, show the serial console live.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use crate::cli::{Emulator, RunArgs};
use crate::emulator::{self, Ending, RunSpec};
use crate::image::{self, BuildOutput, ImageKind, Module};
use crate::setup;
use crate::tools;
use crate::workspace::Workspace;

/// The guests `cargo xtask run` boots: the test guest's hypercall checks (ring 0 and
/// ring 3), a guest doing counter work, and a guest that touches a port it was not
/// granted and is stopped while the others go on. (The worker runs long enough to
/// outlive the checks guest, which delegates to it near its end, while the library OS
/// guests share CPU 0 with it.) With 2 or more CPUs the last two share
/// CPU 1 in time slices.
const DEFAULT_GUESTS: &[&str] = &["checks cpu=0 -- checks 2", WORKER, "intruder cpu=1 -- misbehave badport"];

/// The worker's line, and its line with Linux on CPU 0: the checks guest then gets half
/// its CPU, so the worker it delegates to near its end must run longer to outlive it.
const WORKER: &str = "worker cpu=1 -- survivor 20000";
const WORKER_BESIDE_LINUX: &str = "worker cpu=1 -- survivor 150000";

/// Then the library OS on the exo AM (guests/libos, VMs 4-6): one grows its heap from exo
/// frames and snapshots a key-value map through the dirty bits; one lends a page to the
/// last, which reads it until the lender revokes the loan and is then stopped.
const LIBOS_GUESTS: &[&str] = &["libos cpu=0 -- kv", "lender cpu=0 -- share 6", "borrower cpu=1 -- peer"];

/// Then the light-weight contexts' demonstrations (VM 7, docs/lwc.md): snapshot and
/// rollback, the key compartment and the reference monitor, one after the other.
const LWC_GUESTS: &[&str] = &["lwcdemo cpu=1 lwc -- lwc-demos"];

/// The least RAM (MiB) `cargo xtask run` gives the machine with its default guests.
const DEFAULT_GUESTS_MEGS: u32 = 96;

fn default_guests(workspace: &Workspace, args: &RunArgs) -> Result<Vec<Module>> {
    let guest = image::build_package(workspace, "nk-testguest", &[], args.profile.profile(), BuildOutput::Summary)?;
    let libos = image::build_package(workspace, "nk-libos", &[], args.profile.profile(), BuildOutput::Summary)?;
    let line = |cmdline: &str| match args.linux && cmdline == WORKER {
        true => WORKER_BESIDE_LINUX.to_string(),
        false => cmdline.to_string(),
    };
    let tests = DEFAULT_GUESTS.iter().map(|cmdline| Module { path: guest.clone(), cmdline: line(cmdline) });
    let libos = LIBOS_GUESTS.iter().map(|cmdline| Module { path: libos.clone(), cmdline: (*cmdline).to_string() });
    let lwc = LWC_GUESTS.iter().map(|cmdline| Module { path: guest.clone(), cmdline: (*cmdline).to_string() });
    Ok(tests.chain(libos).chain(lwc).collect())
}

pub fn run_command(workspace: &Workspace, args: &RunArgs) -> Result<ExitCode> {
    if args.emu == Emulator::Bochs {
        emulator::check_bochs_cpus(args.cpus).map_err(anyhow::Error::msg)?;
        if let Some(model) = &args.cpu_model {
            match emulator::check_cpu_model(model) {
                Ok(None) => {}
                Ok(Some(warning)) => println!("xtask: run: warning: {warning}"),
                Err(why) => anyhow::bail!("{why}"),
            }
        }
    }
    // The --guest images are checked before anything is built, so a wrong path fails fast.
    let extra =
        args.guest.iter().map(crate::guest_arg::resolve).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    setup::install_missing(workspace, setup::Mode::Quiet)?;
    let kind = if args.test_harness { ImageKind::Test } else { ImageKind::Normal };
    let elf = image::build_hypervisor(workspace, kind, args.profile.profile(), BuildOutput::Summary)?;
    let mut modules = if args.no_guests { Vec::new() } else { default_guests(workspace, args)? };
    modules.extend(extra);
    let mut megs = args.megs;
    if !args.no_guests {
        // Seven default guests of 4 MiB each with their images and tables need more than 64.
        megs = megs.max(DEFAULT_GUESTS_MEGS);
    }
    let mut ips = crate::emulator::DEFAULT_IPS;
    if args.linux {
        let files = crate::linux::ensure(workspace)?;
        let keeper =
            image::build_package(workspace, "nk-testguest", &[], args.profile.profile(), BuildOutput::Summary)?;
        modules.extend(crate::linux::demo_modules(&files, &keeper, args.cpus));
        megs = megs.max(crate::linux::MIN_MEGS);
        ips = crate::linux::IPS;
    }
    if let Some(vm) = &args.gdb {
        let mut lines: Vec<&mut String> = modules.iter_mut().map(|m| &mut m.cmdline).collect();
        crate::gdb::mark_module(&mut lines, vm).map_err(anyhow::Error::msg)?;
        let module = modules.iter().find(|m| crate::gdb::has_flag(&m.cmdline)).expect("just marked");
        println!(
            "xtask: run: {vm} waits for gdb; the emulator starts once it connects:\n  \
             gdb -ex 'target remote localhost:{}' {}",
            args.gdb_port,
            workspace.display(&module.path)
        );
    }
    let iso = image::make_iso(workspace, &elf, &args.cmdline, &modules)?;
    let disk = if args.no_nvram {
        None
    } else {
        let path = crate::nvram_disk::run_image(workspace);
        // The Linux demo's virtio disk takes a range at the device's end (docs/linux-disk.md).
        let mib = if args.linux { args.nvram_mib.max(crate::linux::DEMO_NVRAM_MIB) } else { args.nvram_mib };
        let how = crate::nvram_disk::ensure(&path, mib, args.fresh_nvram)?;
        println!("xtask: run: NVRAM disk {} ({mib} MiB) {how}", workspace.display(&path));
        Some(path)
    };
    let pmem = match args.pmem_mib {
        None => None,
        Some(_) if args.emu != crate::cli::Emulator::Qemu => {
            anyhow::bail!(
                "--pmem-mib needs --emu qemu (Bochs has no NVDIMM: emulate one with --cmdline \"memmap=16M!96M\")"
            )
        }
        Some(mib) => {
            let path = crate::pmem_file::run_file(workspace);
            let how = crate::pmem_file::ensure(&path, mib, args.fresh_nvram)?;
            println!("xtask: run: NVDIMM {} ({mib} MiB) {how}", workspace.display(&path));
            Some(path)
        }
    };

    let spec = RunSpec {
        name: "run".into(),
        emulator: args.emu,
        iso,
        cpus: args.cpus,
        megs,
        cpu_model: args.cpu_model.clone(),
        // Linux takes about 30 s to its /init in Bochs, the demo as long again.
        // The Linux demo with its disk takes about 330 s of Bochs (2 CPUs) to power off.
        timeout: Duration::from_secs(if args.linux { args.timeout.max(600) } else { args.timeout }),
        dir: workspace.runs().join(format!("run-{}", args.emu.name())),
        ips,
        disk,
        pmem,
        gdb_port: args.gdb.as_ref().map(|_| args.gdb_port),
        gdb_client: None,
    };
    println!(
        "xtask: run: booting in {} (timeout {} s); serial log {}",
        emulator::describe(&spec),
        spec.timeout.as_secs(),
        workspace.display(&spec.dir.join("serial.txt"))
    );
    let result = emulator::run(&spec, |line| println!("{line}"))?;
    let ended = result.ending_text(spec.timeout);
    println!("xtask: run: {ended} after {}", tools::secs(result.elapsed));
    for note in &result.emulator_notes {
        println!("xtask: run:   {note}");
    }
    if result.serial.is_empty() {
        println!(
            "xtask: run: the hypervisor printed nothing; see {} for the emulator's view",
            workspace.display(&spec.dir)
        );
    }
    Ok(if result.ending == Ending::Shutdown { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
