//! Bochs: the configuration that boots the ISO headless and fast (shared/PLATFORM.md
//! "Bochs"), and what its log says when a run fails.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::{Launch, RunSpec};

/// The model with every VMX feature the hypervisor uses (EPT, VPID, VMFUNC, PML, ...).
pub const DEFAULT_CPU_MODEL: &str = "corei7_skylake_x";

/// What a Bochs CPU model offers the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Support {
    /// VMX with EPT, with the features noted.
    Vmx(&'static str),
    /// VMX without EPT, which the hypervisor's guests need.
    VmxWithoutEpt,
    /// 64-bit but without VMX: the hypervisor reports that and stops.
    NoVmx(&'static str),
    /// 32-bit only: the 64-bit hypervisor cannot start (Bochs stops on a triple fault).
    No64Bit,
}

/// Every CPU model of Bochs 2.7 (`bochs --help cpu`), as measured by booting the
/// hypervisor on each (the `vmx:` line it prints).
const CPU_MODELS: &[(&str, Support)] = &[
    (
        "corei7_skylake_x",
        Support::Vmx("EPT with A/D, VPID, unrestricted guest, VMFUNC, PML, VMCS shadowing; the default"),
    ),
    ("tigerlake", Support::Vmx("as corei7_skylake_x, plus sub-page write permissions")),
    ("corei7_icelake_u", Support::Vmx("EPT with A/D, VPID, unrestricted guest, VMFUNC, PML")),
    ("corei3_cnl", Support::Vmx("EPT with A/D, VPID, unrestricted guest, VMFUNC, no PML")),
    ("broadwell_ult", Support::Vmx("EPT with A/D, VPID, unrestricted guest, VMFUNC, no PML")),
    ("corei7_haswell_4770", Support::Vmx("EPT with A/D, VPID, unrestricted guest, VMFUNC, no PML")),
    ("corei7_ivy_bridge_3770k", Support::Vmx("EPT without A/D, VPID, unrestricted guest")),
    ("corei7_sandy_bridge_2600k", Support::Vmx("EPT without A/D, VPID, unrestricted guest")),
    ("corei5_arrandale_m520", Support::Vmx("EPT without A/D, VPID, unrestricted guest")),
    ("corei5_lynnfield_750", Support::Vmx("EPT without A/D, VPID, no unrestricted guest")),
    ("core2_penryn_t9600", Support::VmxWithoutEpt),
    ("bx_generic", Support::VmxWithoutEpt),
    ("ryzen", Support::NoVmx("AMD: SVM, no VMX")),
    ("trinity_apu", Support::NoVmx("AMD: SVM, no VMX")),
    ("zambezi", Support::NoVmx("AMD: SVM, no VMX")),
    ("phenom_8650_toliman", Support::NoVmx("AMD: SVM, no VMX")),
    ("turion64_tyler", Support::NoVmx("AMD, no VMX")),
    ("athlon64_venice", Support::NoVmx("AMD, no VMX")),
    ("athlon64_clawhammer", Support::NoVmx("AMD, no VMX")),
    ("p4_prescott_celeron_336", Support::NoVmx("Pentium 4, no VMX")),
    ("atom_n270", Support::No64Bit),
    ("core_duo_t2400_yonah", Support::No64Bit),
    ("p4_willamette", Support::No64Bit),
    ("p3_katmai", Support::No64Bit),
    ("p2_klamath", Support::No64Bit),
    ("amd_k6_2_chomper", Support::No64Bit),
    ("pentium_mmx", Support::No64Bit),
    ("pentium", Support::No64Bit),
];

/// Checks a Bochs CPU model name. `Ok(Some(warning))` for a model Bochs knows on which
/// the hypervisor cannot run VMX; `Err` says what to write instead.
pub fn check_cpu_model(name: &str) -> Result<Option<String>, String> {
    match CPU_MODELS.iter().find(|(model, _)| *model == name).map(|(_, support)| *support) {
        Some(Support::VmxWithoutEpt) => {
            Ok(Some(format!("Bochs CPU model '{name}' has VMX but no EPT, which the hypervisor's guests need")))
        }
        Some(Support::Vmx(_)) => Ok(None),
        Some(Support::NoVmx(why)) => Ok(Some(format!(
            "Bochs CPU model '{name}' has no VMX ({why}): the hypervisor will report that VT-x is not available \
             and stop; models with VMX: {}",
            vmx_model_names()
        ))),
        Some(Support::No64Bit) => Ok(Some(format!(
            "Bochs CPU model '{name}' is 32-bit only: the 64-bit hypervisor cannot start on it (expect a triple \
             fault); models with VMX: {}",
            vmx_model_names()
        ))),
        None => Err(format!(
            "Bochs has no CPU model '{name}'; write one with VMX: {} (e.g. --cpu-model {DEFAULT_CPU_MODEL})",
            vmx_model_names()
        )),
    }
}

fn vmx_model_names() -> String {
    CPU_MODELS
        .iter()
        .filter(|(_, support)| matches!(support, Support::Vmx(_) | Support::VmxWithoutEpt))
        .map(|(model, _)| *model)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bochs 2.7 stops with `register_timer: too many registered timers` above this many CPUs
/// (measured: 15 boot, 16 do not).
const MAX_CPUS: u32 = 15;

/// Checks a CPU count against what Bochs can emulate; the error says what to write instead.
pub fn check_cpus(cpus: u32) -> Result<(), String> {
    if cpus > MAX_CPUS {
        return Err(format!(
            "Bochs runs at most {MAX_CPUS} CPUs (with more it stops: 'register_timer: too many registered timers'); \
             ask for {MAX_CPUS} or fewer, or use QEMU"
        ));
    }
    Ok(())
}

const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";

/// Writes bochsrc and the debugger script into the run directory and returns the command.
pub(super) fn launch(spec: &RunSpec) -> Result<Launch> {
    for firmware in [BIOS, VGA_BIOS] {
        if !Path::new(firmware).is_file() {
            anyhow::bail!("{firmware} is missing: run `cargo xtask setup` (packages bochsbios, vgabios)");
        }
    }
    let model = spec.cpu_model.as_deref().unwrap_or(DEFAULT_CPU_MODEL);
    check_cpu_model(model).map_err(anyhow::Error::msg)?;
    check_cpus(spec.cpus).map_err(anyhow::Error::msg)?;
    let serial = spec.dir.join("serial.txt");
    let log = spec.dir.join("bochs.log");
    let config = bochsrc(spec, model, &serial, &log);
    let rc = spec.dir.join("bochsrc");
    std::fs::write(&rc, config).with_context(|| format!("cannot write {}", rc.display()))?;
    // Bochs's debugger stops at a prompt: continue, then quit when the simulation ends.
    let script = spec.dir.join("debugger.rc");
    std::fs::write(&script, "c\nquit\n").with_context(|| format!("cannot write {}", script.display()))?;

    let mut command = Command::new("bochs");
    command.arg("-q").arg("-f").arg(&rc).arg("-rc").arg(&script);
    Ok(Launch { command, serial, console: spec.dir.join("bochs.out"), log: Some(log) })
}

/// The configuration of shared/PLATFORM.md "A configuration that worked", with this run's
/// RAM, CPUs, image and files. The rfb display needs no client (`timeout=0`); parallel
/// runs each bind the next free port from 5900 up.
fn bochsrc(spec: &RunSpec, model: &str, serial: &Path, log: &Path) -> String {
    let mut rc = String::new();
    let _ = writeln!(rc, "# Generated by cargo xtask for run '{}'.", spec.name);
    let _ = writeln!(rc, "megs: {}", spec.megs);
    let _ = writeln!(rc, "romimage: file={BIOS}, options=fastboot");
    let _ = writeln!(rc, "vgaromimage: file={VGA_BIOS}");
    let _ = writeln!(rc, "display_library: rfb, options=\"timeout=0\"");
    let _ = writeln!(rc, "ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14");
    let _ = writeln!(rc, "ata0-master: type=cdrom, path=\"{}\", status=inserted", spec.iso.display());
    if let Some(disk) = &spec.disk {
        // A flat image of any size: Bochs takes its geometry from the file's size.
        let _ = writeln!(rc, "ata0-slave: type=disk, mode=flat, path=\"{}\"", disk.display());
    }
    let _ = writeln!(rc, "boot: cdrom");
    let _ = writeln!(rc, "clock: sync=none, time0=local");
    let _ = writeln!(rc, "log: {}", log.display());
    let _ = writeln!(rc, "panic: action=fatal");
    let _ = writeln!(rc, "error: action=report");
    let _ = writeln!(rc, "info: action=report");
    let _ = writeln!(rc, "debug: action=ignore");
    let _ = writeln!(rc, "com1: enabled=1, mode=file, dev={}", serial.display());
    if let Some(port) = spec.gdb_port {
        // The guest debugger's COM2 (docs/gdb.md): Bochs waits for gdb to connect.
        let _ = writeln!(rc, "com2: enabled=1, mode=socket-server, dev=localhost:{port}");
    }
    let _ = writeln!(rc, "port_e9_hack: enabled=1");
    let _ = writeln!(rc, "speaker: enabled=0");
    let _ = writeln!(rc, "sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy");
    let _ = writeln!(rc, "cpu: model={model}, count={}, ips={}, reset_on_triple_fault=0", spec.cpus, spec.ips);
    rc
}

/// Bochs's errors and panics from its log (a failed VM entry is explained there), or else
/// the end of what it printed past its banner (e.g. a configuration error).
pub(super) fn notes(log: Option<&Path>, console: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(text) = log.and_then(|log| std::fs::read_to_string(log).ok()) {
        let errors: Vec<&str> = text.lines().filter(|line| is_error_line(line)).collect();
        let start = errors.len().saturating_sub(8);
        notes.extend(errors[start..].iter().map(|line| format!("bochs.log: {line}")));
    }
    if notes.is_empty() {
        if let Ok(text) = std::fs::read(console) {
            let text = String::from_utf8_lossy(&text);
            let printed: Vec<&str> = text.lines().filter(|line| !is_banner_line(line)).collect();
            let start = printed.len().saturating_sub(6);
            notes.extend(printed[start..].iter().map(|line| format!("bochs: {}", line.trim())));
        }
    }
    notes
}

/// The lines Bochs prints on every start: its banner, info messages from before its log
/// file opens, and the debugger's first stop.
fn is_banner_line(line: &str) -> bool {
    let line = line.trim();
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    line.is_empty()
        || (digits > 0 && line.as_bytes().get(digits..digits + 2) == Some(b"i["))
        || line.starts_with("====")
        || line.starts_with("Bochs x86 Emulator")
        || line.starts_with("Built from")
        || line.starts_with("Timestamp:")
        || line.starts_with("Next at t=0")
        || line.starts_with("(0) [0x0000fffffff0]")
        || line.starts_with("<bochs:")
}

/// Bochs log lines look like `00014040000e[CPU0  ] message`: the letter after the time
/// stamp is the level (`e` error, `p` panic).
fn is_error_line(line: &str) -> bool {
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && matches!(line.as_bytes().get(digits..digits + 2), Some(b"e[") | Some(b"p["))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_models_are_checked() {
        assert_eq!(check_cpu_model("corei7_skylake_x"), Ok(None));
        assert!(check_cpu_model("ryzen").expect("known").expect("warning").contains("no VMX"));
        assert!(check_cpu_model("skylake").unwrap_err().contains("corei7_skylake_x"));
    }

    #[test]
    fn error_lines_are_recognised() {
        assert!(is_error_line("00014040000e[CPU0  ] VMENTER FAIL: VMCS guest incorrect TR type"));
        assert!(is_error_line("00000000000p[      ] >>PANIC<< something"));
        assert!(!is_error_line("00000000000i[      ] reading configuration"));
        assert!(!is_error_line("e[ no time stamp"));
    }
}
