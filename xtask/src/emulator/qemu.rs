//! QEMU: KVM with the host's CPU (nested VT-x) when the host offers it, TCG (no VMX)
//! otherwise (shared/PLATFORM.md "QEMU").

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::{Launch, RunSpec};
use crate::tools;

/// How QEMU will execute the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceleration {
    /// `-enable-kvm -cpu host`: the hypervisor gets real VT-x through nested KVM.
    KvmNested,
    /// Software emulation; the reason KVM is not used.
    Tcg(&'static str),
}

impl Acceleration {
    /// KVM when /dev/kvm exists and the host CPU has the `vmx` flag (an AMD host's KVM
    /// cannot give the guest VMX).
    pub fn detect() -> Self {
        if !Path::new("/dev/kvm").exists() {
            return Acceleration::Tcg("no /dev/kvm");
        }
        let has_vmx = std::fs::read_to_string("/proc/cpuinfo")
            .map(|info| {
                info.lines()
                    .filter(|line| line.starts_with("flags"))
                    .any(|line| line.split_whitespace().any(|flag| flag == "vmx"))
            })
            .unwrap_or(false);
        if has_vmx {
            Acceleration::KvmNested
        } else {
            Acceleration::Tcg("the host CPU has no vmx flag")
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Acceleration::KvmNested => "KVM -cpu host (nested VT-x)".into(),
            Acceleration::Tcg(why) => format!("TCG without VMX ({why}; boot smoke test only)"),
        }
    }
}

/// Says whether nested VT-x is switched on in the host's kvm_intel module, when known.
fn nested_disabled() -> bool {
    std::fs::read_to_string("/sys/module/kvm_intel/parameters/nested")
        .map(|value| matches!(value.trim(), "N" | "0"))
        .unwrap_or(false)
}

pub(super) fn launch(spec: &RunSpec) -> Result<Launch> {
    if tools::find_program("qemu-system-x86_64").is_none() {
        anyhow::bail!("qemu-system-x86_64 is missing: run `cargo xtask setup` (package qemu-system-x86)");
    }
    let serial = spec.dir.join("serial.txt");
    let mut command = Command::new("qemu-system-x86_64");
    let memory = match &spec.pmem {
        None => spec.megs.to_string(),
        // An NVDIMM sits in the hot-pluggable device memory above RAM: it needs a slot
        // and room under maxmem.
        Some(file) => {
            let mib = std::fs::metadata(file).map(|m| m.len() >> 20).unwrap_or(0);
            format!("{}M,slots=2,maxmem={}M", spec.megs, u64::from(spec.megs) + mib.max(1) + 1024)
        }
    };
    command
        .arg("-cdrom")
        .arg(&spec.iso)
        .args(["-m", &memory, "-smp", &spec.cpus.to_string()])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(
            spec.gdb_port
                .map(|port| ["-serial".to_string(), format!("tcp:localhost:{port},server=on,wait=on")])
                .into_iter()
                .flatten(),
        )
        .arg("-debugcon")
        .arg(format!("file:{}", spec.dir.join("e9.txt").display()))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none", "-no-reboot"]);
    if let Some(disk) = &spec.disk {
        // IDE index 1 is the primary channel's slave, as in Bochs (the CD-ROM is index 2).
        command.arg("-drive").arg(format!("file={},format=raw,if=ide,index=1,media=disk", disk.display()));
    }
    if let Some(file) = &spec.pmem {
        // Persistent memory the firmware lists in the NFIT (ACPI 6.5 §5.2.26); share=on
        // makes every store reach the file, so what survives the emulator is what the
        // guest stored.
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        command
            .args(["-machine", "pc,nvdimm=on", "-object"])
            .arg(format!("memory-backend-file,id=pmem0,share=on,mem-path={},size={size}", file.display()))
            .args(["-device", "nvdimm,id=nvdimm0,memdev=pmem0"]);
    }
    match Acceleration::detect() {
        Acceleration::KvmNested => {
            if nested_disabled() {
                println!(
                    "xtask: qemu: warning: /sys/module/kvm_intel/parameters/nested is off, so the guest sees no VMX; \
                     reload kvm_intel with nested=1"
                );
            }
            command.arg("-enable-kvm");
            command.args(["-cpu", spec.cpu_model.as_deref().unwrap_or("host")]);
        }
        Acceleration::Tcg(_) => {
            if let Some(model) = &spec.cpu_model {
                command.args(["-cpu", model]);
            }
        }
    }
    Ok(Launch { command, serial, console: spec.dir.join("qemu.out"), log: None })
}

/// The end of what QEMU printed (its errors go to stderr).
pub(super) fn notes(console: &Path) -> Vec<String> {
    let text = std::fs::read(console).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
    tools::last_lines(&text, 6).lines().map(|line| format!("qemu: {line}")).collect()
}
