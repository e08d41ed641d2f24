//! `cargo xtask bench bypass`: layer bypass against the Linux storage path, from one Linux
//! process (`nkctl bench`, guests/nkctl/src/bench.rs) in one Bochs run: a 4 KiB update
//! persisted through the NVRAM AM (stores into the mapped region, then `commit` by
//! `VMCALL` from ring 3) and a null hypercall from ring 3, in emulated instructions.
//!
//! `linux_fsync_4k_instructions`: `pwrite` + `fsync` of 4 KiB to a file on the VM's
//! virtio block device (`disk=`, an ext2 file system on /mnt; each request a block-AM
//! operation on the VM's range of the same emulated NVRAM ATA disk), and `bypass_speedup`,
//! their ratio.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::{Emulator, Profile};
use crate::emulator::{self, RunSpec};
use crate::image::{self, BuildOutput, ImageKind, Module};
use crate::linux;
use crate::workspace::Workspace;

/// Why the fsync figure can be missing: the run printed no line for it.
pub const FSYNC_BLOCKED: &str =
    "the run printed no linux_fsync_4k_instructions line (no /mnt: the virtio block device did not mount)";

/// The Linux VM's disk (`disk=`) and the NVRAM area that holds it and the NVRAM AM's regions.
const DISK_MIB: u32 = 4;
const AREA_MIB: u32 = 8;

/// The metrics `nkctl bench` prints (`nk-bench: <metric> <value>`).
const METRICS: &[&str] = &["ring3_null_call_instructions", "bypass_commit_4k_instructions"];

/// Boots Linux with `nkctl bench` and writes target/bench/bypass.json.
pub fn bench_bypass(workspace: &Workspace) -> Result<()> {
    crate::setup::install_missing(workspace, crate::setup::Mode::Quiet)?;
    let files = linux::ensure(workspace)?;
    let elf = image::build_hypervisor(workspace, ImageKind::Normal, Profile::Release, BuildOutput::Summary)?;
    let modules = vec![
        Module {
            path: files.kernel.clone(),
            cmdline: format!(
                "linux mem=128M cpu=0 modules=initramfs nvram disk={DISK_MIB}M -- {} -- nk-run nkctl bench --fsync /mnt/bench",
                linux::KERNEL_CMDLINE
            ),
        },
        Module { path: files.initramfs.clone(), cmdline: "initramfs data".into() },
    ];
    let iso = image::make_iso(workspace, &elf, "", &modules)?;
    let disk = workspace.target().join("nvram").join("bench").join("bypass.img");
    crate::nvram_disk::create(&disk, AREA_MIB)?;
    let spec = RunSpec {
        name: "bench-bypass".into(),
        emulator: Emulator::Bochs,
        iso,
        cpus: 1,
        megs: linux::MIN_MEGS,
        cpu_model: Some("corei7_skylake_x".into()),
        timeout: Duration::from_secs(600),
        dir: workspace.runs().join("bench-bypass"),
        ips: linux::IPS,
        disk: Some(disk),
        pmem: None,
        gdb_port: None,
        gdb_client: None,
    };
    println!("xtask: bench: booting {} (Linux, nkctl bench)", emulator::describe(&spec));
    let result = emulator::run(&spec, |_| {})?;
    let value = |metric: &str| {
        result.serial.lines().find_map(|l| {
            let rest = l.split("nk-bench: ").nth(1)?;
            let mut words = rest.split_whitespace();
            (words.next()? == metric).then(|| words.next()?.parse::<u64>().ok()).flatten()
        })
    };
    let mut json = String::from("{\n");
    println!("xtask: bench: layer bypass from a Linux process, emulated instructions (process-side RDTSC):");
    for metric in METRICS {
        let v = value(metric).with_context(|| {
            format!("the run printed no `nk-bench: {metric}` line; see {}", workspace.display(&result.serial_path))
        })?;
        println!("  {metric:<34} {v:>10}");
        json.push_str(&format!("  \"{metric}\": {{\"value\": {v}, \"unit\": \"instructions\"}},\n"));
    }
    match value("linux_fsync_4k_instructions") {
        Some(fsync) => {
            let commit = value("bypass_commit_4k_instructions").unwrap_or(1).max(1);
            let speedup = fsync as f64 / commit as f64;
            println!("  {:<34} {fsync:>10}\n  {:<34} {speedup:>10.1}", "linux_fsync_4k_instructions", "bypass_speedup");
            json.push_str(&format!(
                "  \"linux_fsync_4k_instructions\": {{\"value\": {fsync}, \"unit\": \"instructions\"}},\n"
            ));
            json.push_str(&format!("  \"bypass_speedup\": {{\"value\": {speedup:.2}, \"unit\": \"ratio\"}},\n"));
        }
        None => {
            println!("  linux_fsync_4k_instructions and bypass_speedup: not measured ({FSYNC_BLOCKED})");
            let why = FSYNC_BLOCKED.replace('"', "'");
            json.push_str(&format!(
                "  \"linux_fsync_4k_instructions\": {{\"value\": null, \"unit\": \"instructions\", \"blocked\": \"{why}\"}},\n"
            ));
            json.push_str("  \"bypass_speedup\": {\"value\": null, \"unit\": \"ratio\"},\n");
        }
    }
    json.push_str(&format!(
        "  \"context\": {{\"emulator\": \"bochs\", \"cpu_model\": \"corei7_skylake_x\", \"bochs_ips\": {}, \"kernel\": \"{}\", \"method\": \"minimum of 9 process-side RDTSC deltas, RDTSC overhead subtracted; commit: 512 8-byte stores filling one page of a 16 KiB region mapped through /dev/mem, then commit (one dirty page, diffed in 256-byte blocks, on the emulated NVRAM ATA disk)\"}}\n}}\n",
        linux::IPS,
        files.kernel.display()
    ));
    let dir = workspace.target().join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bypass.json"), json)?;
    Ok(())
}
