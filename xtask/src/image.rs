//! Building the hypervisor and its boot images: `cargo build` for the bare-metal target,
//! a copy of the ELF under target/images/, and a GRUB ISO per (ELF, command line, modules),
//! cached by a hash of those so repeated runs reuse it (shared/PLATFORM.md "Boot images").

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};

use crate::cli::{BuildArgs, Profile};
use crate::tools;
use crate::workspace::Workspace;

/// The hypervisor's package name.
pub const HYPERVISOR_PACKAGE: &str = "nk-hypervisor";
/// The target every bare-metal image is built for.
pub const TARGET: &str = "x86_64-unknown-none";
/// The GRUB modules the ISO needs: Multiboot2 loading from an El Torito CD, nothing else.
const GRUB_MODULES: &str = "multiboot2 normal configfile iso9660 biosdisk part_msdos boot";
/// Bumped when the ISO layout changes, so cached ISOs of the old layout are not reused.
const ISO_LAYOUT_VERSION: u64 = 1;
/// How many ISOs the cache keeps (the newest).
const ISO_CACHE_KEEP: usize = 40;

/// The two hypervisor builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// The image users run.
    Normal,
    /// Built with feature `test-harness`: runs the in-emulator test cases.
    Test,
    /// The normal image of a workspace copy with an AM made by `cargo xtask new-am`
    /// (xtask's new-am check, new_am_check.rs).
    #[serde(rename = "new-am")]
    NewAm,
}

impl ImageKind {
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Normal => "normal",
            ImageKind::Test => "test",
            ImageKind::NewAm => "new-am",
        }
    }
}

/// How much of cargo's output a build shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildOutput {
    /// Cargo's output goes straight to the terminal (`cargo xtask build`).
    Full,
    /// Only a summary, and cargo's output when the build fails (`run`, `test`).
    Summary,
}

/// A file loaded beside the hypervisor as a Multiboot2 module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub path: PathBuf,
    /// The module's string in the Multiboot2 information (its name and arguments).
    pub cmdline: String,
}

/// `cargo xtask build`.
pub fn build_command(workspace: &Workspace, args: &BuildArgs) -> Result<()> {
    let kind = if args.test_harness { ImageKind::Test } else { ImageKind::Normal };
    let elf = build_hypervisor(workspace, kind, args.profile.profile(), BuildOutput::Full)?;
    let iso = make_iso(workspace, &elf, &args.cmdline, &[])?;
    println!("xtask: build: ELF {}", workspace.display(&elf));
    println!("xtask: build: ISO {} (command line \"{}\")", workspace.display(&iso), args.cmdline);
    Ok(())
}

/// Builds the hypervisor and copies its ELF to target/images/; returns the copy's path.
pub fn build_hypervisor(
    workspace: &Workspace,
    kind: ImageKind,
    profile: Profile,
    output: BuildOutput,
) -> Result<PathBuf> {
    let features: &[&str] = match kind {
        ImageKind::Normal | ImageKind::NewAm => &[],
        ImageKind::Test => &["test-harness"],
    };
    let built = build_package(workspace, HYPERVISOR_PACKAGE, features, profile, output)?;
    let mut name = String::from(HYPERVISOR_PACKAGE);
    if kind == ImageKind::Test {
        name.push_str("-test");
    }
    if profile == Profile::Debug {
        name.push_str("-debug");
    }
    name.push_str(".elf");
    let images = workspace.images();
    std::fs::create_dir_all(&images).with_context(|| format!("cannot create {}", images.display()))?;
    let copy = images.join(name);
    copy_if_changed(&built, &copy)?;
    Ok(copy)
}

/// Builds one binary package for the bare-metal target; returns the path cargo wrote.
pub fn build_package(
    workspace: &Workspace,
    package: &str,
    features: &[&str],
    profile: Profile,
    output: BuildOutput,
) -> Result<PathBuf> {
    let mut command = Command::new(workspace.cargo());
    command
        .current_dir(workspace.root())
        .env("CARGO_TARGET_DIR", workspace.target())
        .args(["build", "-p", package, "--target", TARGET]);
    if profile == Profile::Release {
        command.arg("--release");
    }
    if !features.is_empty() {
        command.arg("--features").arg(features.join(","));
    }
    let what = if features.is_empty() { String::new() } else { format!(", features {}", features.join(",")) };
    println!("xtask: build: {package} ({}{what}) ...", profile.name());
    let started = Instant::now();
    match output {
        BuildOutput::Full => tools::status_checked(&mut command, &format!("building {package}"))?,
        BuildOutput::Summary => {
            let result = command
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("cannot start cargo to build {package}"))?;
            let stderr = String::from_utf8_lossy(&result.stderr);
            if !result.status.success() {
                eprint!("{stderr}");
                anyhow::bail!(
                    "building {package} failed (cargo's messages are above); command: {}",
                    tools::describe(&command)
                );
            }
            let warnings =
                stderr.lines().filter(|line| line.starts_with("warning:") && !line.contains("generated")).count();
            if warnings > 0 {
                let mut again = String::from("cargo xtask build");
                if profile == Profile::Debug {
                    again.push_str(" --debug");
                }
                if features.contains(&"test-harness") {
                    again.push_str(" --test-harness");
                }
                if package != HYPERVISOR_PACKAGE {
                    again = tools::describe(&command);
                }
                println!("xtask: build: {package}: {warnings} compiler warning(s); `{again}` shows them");
            }
        }
    }
    println!("xtask: build: {package} done in {}", tools::secs(started.elapsed()));
    let built = workspace.target().join(TARGET).join(profile.name()).join(package);
    if !built.is_file() {
        anyhow::bail!("cargo reported success but {} does not exist", built.display());
    }
    Ok(built)
}

fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let new = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    if std::fs::read(to).ok().as_deref() == Some(&new[..]) {
        return Ok(());
    }
    // Write beside and rename, so a run reading the old copy never sees half a file.
    let partial = to.with_extension("elf.partial");
    std::fs::write(&partial, &new).with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, to).with_context(|| format!("cannot rename {} to {}", partial.display(), to.display()))
}

/// Checks that a command line can be passed through grub.cfg unchanged; the error says
/// what to write instead.
pub fn check_cmdline(cmdline: &str) -> Result<(), String> {
    if let Some(bad) = cmdline.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ') || matches!(c, '\'' | '\\' | '"'))
    {
        return Err(format!(
            "the command line cannot contain {bad:?}: use printable ASCII words separated by spaces, \
             without quotes or backslashes, e.g. \"log=debug cpus=2\""
        ));
    }
    if cmdline.len() > 1024 {
        return Err(format!("the command line has {} characters; keep it under 1024", cmdline.len()));
    }
    Ok(())
}

/// The grub.cfg that boots `elf_name` with `cmdline` and `modules` right away. Every word
/// is single-quoted, so GRUB's shell passes it unchanged (no variables, no wildcards).
fn grub_cfg(elf_name: &str, cmdline: &str, modules: &[(String, &Module)]) -> String {
    let quote = |text: &str| text.split_whitespace().map(|word| format!(" '{word}'")).collect::<String>();
    let mut cfg = String::from("# Generated by cargo xtask.\nset timeout=0\n");
    cfg.push_str(&format!("multiboot2 /boot/{elf_name}{}\n", quote(cmdline)));
    for (file, module) in modules {
        cfg.push_str(&format!("module2 /boot/modules/{file}{}\n", quote(&module.cmdline)));
    }
    cfg.push_str("boot\n");
    cfg
}

/// Makes (or reuses) the GRUB ISO booting `elf` with `cmdline` and `modules`.
pub fn make_iso(workspace: &Workspace, elf: &Path, cmdline: &str, modules: &[Module]) -> Result<PathBuf> {
    check_cmdline(cmdline).map_err(anyhow::Error::msg)?;
    for module in modules {
        check_cmdline(&module.cmdline).map_err(|why| anyhow::anyhow!("module {}: {why}", module.path.display()))?;
    }
    let elf_name = "nk-hypervisor.elf";
    let module_files: Vec<(String, &Module)> = modules
        .iter()
        .enumerate()
        .map(|(index, module)| {
            let stem = module.path.file_name().map(|name| name.to_string_lossy().into_owned());
            (format!("{index}-{}", stem.unwrap_or_else(|| "module".into())), module)
        })
        .collect();
    let cfg = grub_cfg(elf_name, cmdline, &module_files);

    let mut hasher = DefaultHasher::new();
    hasher.write_u64(ISO_LAYOUT_VERSION);
    hash_bytes(&mut hasher, cfg.as_bytes());
    hash_bytes(&mut hasher, &std::fs::read(elf).with_context(|| format!("cannot read {}", elf.display()))?);
    for module in modules {
        let bytes =
            std::fs::read(&module.path).with_context(|| format!("cannot read the module {}", module.path.display()))?;
        hash_bytes(&mut hasher, &bytes);
    }
    let hash = hasher.finish();

    let cache = workspace.images().join("iso");
    std::fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let stem = elf.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let iso = cache.join(format!("{stem}-{hash:016x}.iso"));
    let mut shown_cmdline =
        if cmdline.is_empty() { "empty command line".to_string() } else { format!("\"{cmdline}\"") };
    if !modules.is_empty() {
        shown_cmdline.push_str(&format!(", {} module(s)", modules.len()));
    }
    in_use().insert(iso.clone());
    if iso.is_file() {
        println!("xtask: image: {} ({shown_cmdline}, cached)", workspace.display(&iso));
        return Ok(iso);
    }

    let started = Instant::now();
    let stage = cache.join(format!(".stage-{hash:016x}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    let boot = stage.join("boot");
    std::fs::create_dir_all(boot.join("grub")).with_context(|| format!("cannot create {}", boot.display()))?;
    std::fs::copy(elf, boot.join(elf_name)).with_context(|| format!("cannot copy {}", elf.display()))?;
    if !module_files.is_empty() {
        std::fs::create_dir_all(boot.join("modules"))?;
        for (file, module) in &module_files {
            std::fs::copy(&module.path, boot.join("modules").join(file))
                .with_context(|| format!("cannot copy the module {}", module.path.display()))?;
        }
    }
    std::fs::write(boot.join("grub/grub.cfg"), &cfg).context("cannot write grub.cfg")?;

    let partial = iso.with_extension(format!("iso.partial-{}", std::process::id()));
    let result = tools::output_checked(
        Command::new("grub-mkrescue")
            .arg("-o")
            .arg(&partial)
            .arg(&stage)
            .arg(format!("--install-modules={GRUB_MODULES}"))
            .args(["--fonts=", "--locales=", "--themes="]),
        "grub-mkrescue (is `cargo xtask setup` done?)",
    );
    let _ = std::fs::remove_dir_all(&stage);
    result?;
    std::fs::rename(&partial, &iso).with_context(|| format!("cannot move the ISO to {}", iso.display()))?;
    println!("xtask: image: {} ({shown_cmdline}, made in {})", workspace.display(&iso), tools::secs(started.elapsed()));
    prune_cache(&cache);
    Ok(iso)
}

fn hash_bytes(hasher: &mut DefaultHasher, bytes: &[u8]) {
    hasher.write_u64(bytes.len() as u64);
    hasher.write(bytes);
}

/// The ISOs this xtask process has handed out (made or found cached): pruning never
/// removes them, since a scenario that has not started yet may still boot one (a test run
/// makes every scenario's ISO before the emulators start).
fn in_use() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<PathBuf>> {
    static IN_USE: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    IN_USE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keeps the newest [`ISO_CACHE_KEEP`] ISOs besides those this process uses; failures only
/// leave more files behind.
fn prune_cache(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    let mut isos: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "iso"))
        .filter(|path| !in_use().contains(path))
        .filter_map(|path| Some((path.metadata().ok()?.modified().ok()?, path)))
        .collect();
    if isos.len() <= ISO_CACHE_KEEP {
        return;
    }
    isos.sort();
    for (_, path) in &isos[..isos.len() - ISO_CACHE_KEEP] {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_rejects_quotes_and_control_characters() {
        assert!(check_cmdline("log=info bogus=1 cpus=abc").is_ok());
        assert!(check_cmdline("test=guest_*").is_ok());
        assert!(check_cmdline("").is_ok());
        assert!(check_cmdline("a='b'").unwrap_err().contains("printable ASCII"));
        assert!(check_cmdline("a\nb").is_err());
    }

    #[test]
    fn grub_cfg_quotes_every_word() {
        let module = Module { path: "guest.elf".into(), cmdline: "guest one".into() };
        let cfg = grub_cfg("nk.elf", "log=info  test=*", &[("0-guest.elf".into(), &module)]);
        assert!(cfg.contains("set timeout=0\n"));
        assert!(cfg.contains("multiboot2 /boot/nk.elf 'log=info' 'test=*'\n"));
        assert!(cfg.contains("module2 /boot/modules/0-guest.elf 'guest' 'one'\n"));
        assert!(cfg.ends_with("boot\n"));
    }
}
