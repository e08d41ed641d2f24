//! Installs what a fresh Debian machine lacks to build, boot and test the hypervisor:
//! the emulators, GRUB's ISO tools and the bare-metal Rust target (shared/PLATFORM.md).
//! Everything is checked first, so a machine that has it all costs no apt call.

use std::process::Command;

use anyhow::{Context, Result};

use crate::tools;
use crate::workspace::Workspace;

/// The Debian packages the project needs, each with why.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    // bochs depends on one display package; naming bochs-term satisfies that dependency
    // with a small one instead of apt's first choice, bochs-wx and its GTK stack. Runs use
    // the rfb display, which the bochs package itself ships.
    ("bochs-term", "a light display plugin that satisfies bochs's GUI dependency"),
    ("bochs", "the emulator with VT-x, EPT and SMP: the test platform"),
    ("bochsbios", "the Bochs BIOS"),
    ("vgabios", "the Bochs VGA BIOS"),
    ("grub-pc-bin", "GRUB's BIOS modules for the boot ISO"),
    ("grub-common", "grub-mkrescue"),
    ("xorriso", "the ISO writer grub-mkrescue uses"),
    ("mtools", "the FAT tools grub-mkrescue uses"),
    ("qemu-system-x86", "QEMU: fast boot smoke tests, nested VT-x with KVM on Intel hosts"),
    ("gdb", "the debugger of `cargo xtask run --gdb VM` and of the gdb-session scenario"),
];

/// The Rust target the hypervisor is built for.
const BARE_METAL_TARGET: &str = "x86_64-unknown-none";

/// How much `install_missing` says when nothing is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cargo xtask setup`: every item with its state.
    Verbose,
    /// Before `run` and `test`: one line.
    Quiet,
}

/// Checks the packages and the Rust target, and installs what is missing (as root with
/// apt), or fails with the exact commands to run.
pub fn install_missing(workspace: &Workspace, mode: Mode) -> Result<()> {
    let missing_packages = missing_debian_packages()?;
    let target_missing = !rust_target_installed(workspace)?;
    if mode == Mode::Verbose {
        for (package, why) in DEBIAN_PACKAGES {
            let state = if missing_packages.iter().any(|m| m == package) { "missing" } else { "installed" };
            println!("xtask: setup: {package:<20} {state:<9} ({why})");
        }
        let state = if target_missing { "missing" } else { "installed" };
        println!("xtask: setup: {BARE_METAL_TARGET:<20} {state:<9} (Rust target of the hypervisor)");
    }
    if missing_packages.is_empty() && !target_missing {
        println!(
            "xtask: setup: all tools present ({} Debian packages, Rust target {BARE_METAL_TARGET})",
            DEBIAN_PACKAGES.len()
        );
        return Ok(());
    }
    if !missing_packages.is_empty() {
        install_debian_packages(&missing_packages)?;
    }
    if target_missing {
        add_rust_target(workspace)?;
    }
    println!("xtask: setup: done");
    Ok(())
}

/// The packages of [`DEBIAN_PACKAGES`] that are not installed, asking dpkg once.
fn missing_debian_packages() -> Result<Vec<String>> {
    let names: Vec<&str> = DEBIAN_PACKAGES.iter().map(|(name, _)| *name).collect();
    if tools::find_program("dpkg-query").is_none() {
        return missing_without_dpkg();
    }
    // dpkg-query exits 1 when a package is unknown; its stdout still lists the others.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\\n"])
        .args(&names)
        .output()
        .context("cannot run dpkg-query to check the installed packages")?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once(' ')?;
            status.starts_with("ii").then_some(name.split(':').next().unwrap_or(name))
        })
        .collect();
    Ok(names.iter().filter(|name| !installed.contains(name)).map(|name| name.to_string()).collect())
}

/// Without dpkg (not Debian): checks for the programs and firmware files themselves, and
/// fails with what to install if any is absent, since xtask cannot install them here.
fn missing_without_dpkg() -> Result<Vec<String>> {
    let programs = ["bochs", "grub-mkrescue", "xorriso", "mformat", "qemu-system-x86_64", "gdb"];
    let files = ["/usr/share/bochs/BIOS-bochs-latest", "/usr/share/vgabios/vgabios.bin"];
    let mut absent: Vec<String> =
        programs.iter().filter(|program| tools::find_program(program).is_none()).map(|p| p.to_string()).collect();
    absent.extend(files.iter().filter(|file| !std::path::Path::new(file).is_file()).map(|f| f.to_string()));
    if absent.is_empty() {
        return Ok(Vec::new());
    }
    anyhow::bail!(
        "this machine has no dpkg, so xtask cannot install what is missing: {}.\n\
         Install the equivalents of the Debian packages {} with your package manager.",
        absent.join(", "),
        DEBIAN_PACKAGES.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(" ")
    )
}

fn install_debian_packages(missing: &[String]) -> Result<()> {
    let list = missing.join(" ");
    let commands = format!(
        "  sudo apt-get update\n  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {list}"
    );
    if tools::find_program("apt-get").is_none() {
        anyhow::bail!("missing Debian packages: {list}, and apt-get is not available. Install them with:\n{commands}");
    }
    if !running_as_root() {
        anyhow::bail!("missing Debian packages: {list}. xtask is not root, so run:\n{commands}\nthen try again.");
    }
    println!("xtask: setup: installing {list}");
    apt_get_update()?;
    tools::status_checked(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null()),
        "apt-get install",
    )?;
    let still_missing = missing_debian_packages()?;
    if !still_missing.is_empty() {
        anyhow::bail!("apt-get finished but these packages are still not installed: {}", still_missing.join(" "));
    }
    Ok(())
}

/// Runs `apt-get update` without questions (stdin closed).
pub(crate) fn apt_get_update() -> Result<()> {
    tools::status_checked(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null()),
        "apt-get update",
    )
}

pub(crate) fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether the toolchain the workspace uses has the bare-metal target's standard library.
fn rust_target_installed(workspace: &Workspace) -> Result<bool> {
    if tools::find_program("rustup").is_some() {
        let output = tools::output_checked(
            Command::new("rustup").args(["target", "list", "--installed"]).current_dir(workspace.root()),
            "rustup target list --installed",
        )?;
        return Ok(String::from_utf8_lossy(&output.stdout).lines().any(|line| line.trim() == BARE_METAL_TARGET));
    }
    // No rustup: look for the target's library directory in rustc's sysroot.
    let output = tools::output_checked(
        Command::new("rustc").args(["--print", "sysroot"]).current_dir(workspace.root()),
        "rustc --print sysroot",
    )?;
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Ok(std::path::Path::new(&sysroot).join("lib/rustlib").join(BARE_METAL_TARGET).is_dir())
}

fn add_rust_target(workspace: &Workspace) -> Result<()> {
    if tools::find_program("rustup").is_none() {
        anyhow::bail!(
            "the Rust target {BARE_METAL_TARGET} is missing and there is no rustup to add it; \
             install Rust with rustup, then run: rustup target add {BARE_METAL_TARGET}"
        );
    }
    println!("xtask: setup: rustup target add {BARE_METAL_TARGET}");
    tools::status_checked(
        Command::new("rustup").args(["target", "add", BARE_METAL_TARGET]).current_dir(workspace.root()),
        "rustup target add",
    )
}
