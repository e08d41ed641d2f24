//! `cargo xtask bench linux`: Debian's Linux booted to its /init's `LINUX-OK` under the
//! hypervisor (a VM on the virtual PC) and on bare Bochs (GRUB's `linux`/`initrd`), same
//! kernel, initramfs and Bochs speed, with the VM's exits by reason.
//!
//! The common measure is the kernel's own clock: /init writes `nk-init: LINUX-OK reached`
//! to /dev/kmsg, whose timestamp counts from the kernel's TSC set-up; times the TSC rate
//! the kernel detected (`tsc: Detected <f> MHz`) it gives instructions in both runs
//! (Bochs's TSC counts instructions). Under the hypervisor the VM's power-on to `LINUX-OK`
//! is also measured exactly by the hypervisor's TSC.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::{Emulator, Profile};
use crate::emulator::{self, RunSpec};
use crate::image::{self, BuildOutput, ImageKind};
use crate::linux;
use crate::tools;
use crate::workspace::Workspace;

const KERNEL_ARGS: &str = "console=ttyS0 nokaslr tsc=reliable panic=-1 mitigations=off init_on_alloc=0 maxcpus=1";

/// Reads `[ <seconds>] nk-init: LINUX-OK reached` and `tsc: Detected <f> MHz` from a log;
/// returns the instructions on the kernel's clock.
fn kernel_clock_instructions(log: &str) -> Option<(f64, f64)> {
    let seconds = log.lines().find(|l| l.contains("nk-init: LINUX-OK reached")).and_then(|l| {
        let before = &l[..l.find("nk-init: LINUX-OK")?];
        let open = before.rfind('[')?;
        let close = before[open..].find(']')? + open;
        before[open + 1..close].trim().parse::<f64>().ok()
    })?;
    // The TSC's own line ("... MHz TSC") when the kernel prints one, else the processor's.
    let detected = |suffix: &str| {
        log.lines().filter(|l| l.contains(suffix)).find_map(|l| {
            let rest = l.split("tsc: Detected ").nth(1)?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
    };
    let mhz = detected("MHz TSC").or_else(|| detected("MHz processor"))?;
    Some((seconds * mhz * 1e6, mhz))
}

/// Parses the hypervisor's `exits by reason: A=n B=m ...;` line.
fn exits_by_reason(log: &str) -> BTreeMap<String, u64> {
    let mut exits = BTreeMap::new();
    if let Some(line) = log.lines().find(|l| l.contains("exits by reason:")) {
        let list = line.split("exits by reason:").nth(1).unwrap_or("").split(';').next().unwrap_or("");
        for pair in list.split_whitespace() {
            if let Some((name, n)) = pair.split_once('=') {
                if let Ok(n) = n.parse() {
                    exits.insert(name.replace(['-', '/'], "_").to_lowercase(), n);
                }
            }
        }
    }
    exits
}

fn bare_iso(workspace: &Workspace, files: &linux::LinuxFiles) -> Result<std::path::PathBuf> {
    let dir = workspace.images().join("linux-bare");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("stage/boot/grub"))?;
    std::fs::copy(&files.kernel, dir.join("stage/boot/vmlinuz"))?;
    std::fs::copy(&files.initramfs, dir.join("stage/boot/initramfs.cpio"))?;
    // Bochs's own CPUID 0x15/0x16 claim a 3.5 GHz TSC while its TSC counts instructions:
    // tsc_early_khz gives the bare kernel the true rate, as CPUID does under the hypervisor,
    // so both kernels' delays and timer ticks cost the same instructions.
    let khz = linux::IPS / 1000;
    let cfg = format!(
        "set timeout=0\nlinux /boot/vmlinuz {KERNEL_ARGS} tsc_early_khz={khz} -- nk-run true\ninitrd /boot/initramfs.cpio\nboot\n"
    );
    std::fs::write(dir.join("stage/boot/grub/grub.cfg"), cfg)?;
    let iso = dir.join("linux-bare.iso");
    tools::output_checked(
        Command::new("grub-mkrescue")
            .arg("-o")
            .arg(&iso)
            .arg(dir.join("stage"))
            .arg("--install-modules=linux normal configfile iso9660 biosdisk part_msdos boot")
            .args(["--fonts=", "--locales=", "--themes="]),
        "grub-mkrescue",
    )?;
    Ok(iso)
}

/// Runs the benchmark and writes target/bench/linux.json.
pub fn bench_linux(workspace: &Workspace) -> Result<()> {
    crate::setup::install_missing(workspace, crate::setup::Mode::Quiet)?;
    let files = linux::ensure(workspace)?;
    let elf = image::build_hypervisor(workspace, ImageKind::Normal, Profile::Release, BuildOutput::Summary)?;
    let modules = linux::modules(&files, "true");
    let iso = image::make_iso(workspace, &elf, "", &modules)?;
    let spec = |name: &str, iso| RunSpec {
        name: name.into(),
        emulator: Emulator::Bochs,
        iso,
        cpus: 1,
        megs: linux::MIN_MEGS,
        cpu_model: Some("corei7_skylake_x".into()),
        timeout: Duration::from_secs(900),
        dir: workspace.runs().join(name),
        ips: linux::IPS,
        disk: None,
        pmem: None,
        gdb_port: None,
        gdb_client: None,
    };
    println!("xtask: bench: Linux under the hypervisor ...");
    let hv = emulator::run(&spec("bench-linux-hypervisor", iso), |_| {})?;
    println!("xtask: bench: Linux on bare Bochs (GRUB) ...");
    let bare = emulator::run(&spec("bench-linux-bare", bare_iso(workspace, &files)?), |_| {})?;

    let poweron = hv
        .serial
        .lines()
        .find_map(|l| l.split("LINUX-OK after ").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .context("the hypervisor run printed no `LINUX-OK after <n> instructions` line")?;
    let (hv_kernel, hv_mhz) = kernel_clock_instructions(&hv.serial)
        .context("the hypervisor run has no `nk-init: LINUX-OK reached` or `tsc: Detected` line")?;
    let (bare_kernel, bare_mhz) = kernel_clock_instructions(&bare.serial).with_context(|| {
        format!(
            "the bare run has no `nk-init: LINUX-OK reached` or `tsc: Detected` line (log {})",
            bare.serial_path.display()
        )
    })?;
    let exits = exits_by_reason(&hv.serial);
    let ratio = hv_kernel / bare_kernel;

    println!("{:<48} {:>16}", "metric", "value");
    println!("{:<48} {:>16.0} instructions", "linux_boot_instructions_hypervisor", hv_kernel);
    println!("{:<48} {:>16.0} instructions", "linux_boot_instructions_bare", bare_kernel);
    println!("{:<48} {:>16.3}", "linux_boot_overhead", ratio);
    println!("{:<48} {:>16} instructions", "linux_poweron_to_linux_ok_instructions_hypervisor", poweron);
    for (reason, n) in &exits {
        println!("{:<48} {:>16}", format!("exits_{reason}"), n);
    }
    let mut json = String::from("{\n");
    json.push_str(&format!(
        "  \"linux_boot_instructions_hypervisor\": {{\"value\": {hv_kernel:.0}, \"unit\": \"instructions\"}},\n"
    ));
    json.push_str(&format!(
        "  \"linux_boot_instructions_bare\": {{\"value\": {bare_kernel:.0}, \"unit\": \"instructions\"}},\n"
    ));
    json.push_str(&format!("  \"linux_boot_overhead\": {{\"value\": {ratio:.4}, \"unit\": \"ratio\"}},\n"));
    json.push_str(&format!(
        "  \"linux_poweron_to_linux_ok_instructions_hypervisor\": {{\"value\": {poweron}, \"unit\": \"instructions\"}},\n"
    ));
    for (reason, n) in &exits {
        json.push_str(&format!("  \"exits_{reason}\": {{\"value\": {n}, \"unit\": \"exits\"}},\n"));
    }
    json.push_str(&format!(
        "  \"context\": {{\"kernel\": \"{}\", \"bochs_ips\": {}, \"cpu_model\": \"corei7_skylake_x\", \"tsc_mhz_seen_by_linux_hypervisor\": {hv_mhz}, \"tsc_mhz_seen_by_linux_bare\": {bare_mhz}, \"measure\": \"kernel clock from TSC set-up to /init's LINUX-OK, times the TSC rate the kernel detected\", \"wall_seconds_hypervisor\": {:.1}, \"wall_seconds_bare\": {:.1}}}\n",
        files.kernel.display(),
        linux::IPS,
        hv.elapsed.as_secs_f64(),
        bare.elapsed.as_secs_f64()
    ));
    json.push_str("}\n");
    let dir = workspace.target().join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("linux.json"), json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernel_clock_and_exits() {
        let log = "[cpu0 INFO ] guest: vm1/linux: [    0.000000] tsc: Detected 3500.000 MHz processor\n\
                   [cpu0 INFO ] guest: vm1/linux: [    0.000000] tsc: Detected 50.000 MHz TSC\n\
                   [cpu0 INFO ] guest: vm1/linux: [   26.500000] nk-init: LINUX-OK reached\n\
                   [cpu0 INFO ] guest: vm1/linux: Linux bzImage: exits by reason: I/O=10 preemption-timer=3; 1 interrupts injected\n";
        let (n, mhz) = kernel_clock_instructions(log).unwrap();
        assert_eq!(mhz, 50.0);
        assert_eq!(n.round(), 1_325_000_000.0);
        let exits = exits_by_reason(log);
        assert_eq!(exits["i_o"], 10);
        assert_eq!(exits["preemption_timer"], 3);
    }
}
