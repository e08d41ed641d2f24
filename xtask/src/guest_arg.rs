//! `cargo xtask run --guest PATH[:MODULE-LINE]`: any guest image, with its module line,
//! beside (or, with `--no-guests`, instead of) the default guests.
//!
//! The module line is checked by the hypervisor's own parser (`nk_boot::module`), and the
//! image's kind by the hypervisor's own recogniser (`nk_loader::ImageKind`), so a line or
//! file the hypervisor would refuse at boot is refused here first, with one line that says
//! what to write instead.

use std::path::{Path, PathBuf};

use nk_loader::image::ImageKind;

use crate::image::Module;

/// What `--guest` asks for: an image and its module line, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestArg {
    pub path: PathBuf,
    /// The module line: the given one, or the file's name when none was given.
    pub cmdline: String,
}

const EXAMPLE: &str = "--guest target/my-guest.elf:\"mine cpu=1 mem=8M -- hello\"";

/// Parses `PATH[:MODULE-LINE]` (clap's value parser for `--guest`). The path is split at
/// the first ':'; a path that itself contains ':' must be given with a module line.
pub fn parse(text: &str) -> Result<GuestArg, String> {
    let (path, line) = match text.split_once(':') {
        Some((path, line)) => (path.trim(), Some(line.trim())),
        None => (text.trim(), None),
    };
    if path.is_empty() {
        return Err(format!("'{text}' names no file; write PATH[:MODULE-LINE], e.g. {EXAMPLE}"));
    }
    let path = PathBuf::from(path);
    let cmdline = match line {
        Some(line) if !line.is_empty() => line.to_string(),
        Some(_) => {
            return Err(format!(
                "'{text}' has an empty module line after ':'; drop the ':' or write one, e.g. {EXAMPLE}"
            ))
        }
        None => default_name(&path)?,
    };
    crate::image::check_cmdline(&cmdline).map_err(|why| format!("the module line of --guest {text}: {why}"))?;
    nk_boot::module::parse(&cmdline).map_err(|why| format!("the module line '{cmdline}' of --guest: {why}"))?;
    Ok(GuestArg { path, cmdline })
}

/// A module name from the file's name: its stem, with characters outside `[A-Za-z0-9_-]`
/// made '-'.
fn default_name(path: &Path) -> Result<String, String> {
    let stem = path.file_stem().and_then(|stem| stem.to_str()).unwrap_or("");
    let name: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' }).collect();
    if name.is_empty() {
        Err(format!("cannot name a guest after '{}'; give a module line, e.g. {EXAMPLE}", path.display()))
    } else {
        Ok(name)
    }
}

/// Reads the image and checks that the hypervisor can boot it (data modules, `data` in
/// the module line, may hold anything); returns the module to put on the ISO.
pub fn resolve(guest: &GuestArg) -> Result<Module, String> {
    let shown = guest.path.display();
    let bytes = std::fs::read(&guest.path).map_err(|why| {
        format!("--guest {shown}: cannot read it ({why}); give the path of an existing image, e.g. {EXAMPLE}")
    })?;
    if bytes.is_empty() {
        return Err(format!("--guest {shown}: the file is empty; give a built image, e.g. {EXAMPLE}"));
    }
    let data = nk_boot::module::parse(&guest.cmdline).map(|spec| spec.data).unwrap_or(false);
    if !data && ImageKind::detect(&bytes) == ImageKind::Unknown {
        return Err(format!(
            "--guest {shown}: not an image the hypervisor boots (a 64-bit ELF guest built on guests/lib, a Linux \
             bzImage, or a Multiboot v1/v2 kernel); for a file another guest reads, add `data` to its module line, \
             e.g. --guest {shown}:\"initrd data\""
        ));
    }
    Ok(Module { path: guest.path.clone(), cmdline: guest.cmdline.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_alone_takes_the_file_stem_as_name() {
        let arg = parse("target/x/my.guest.elf").unwrap();
        assert_eq!(arg.path, PathBuf::from("target/x/my.guest.elf"));
        assert_eq!(arg.cmdline, "my-guest");
    }

    #[test]
    fn module_line_is_kept_and_checked_by_the_hypervisor_parser() {
        let arg = parse("g.elf:mine cpu=1 mem=8M -- hello").unwrap();
        assert_eq!(arg.cmdline, "mine cpu=1 mem=8M -- hello");
        let bad = parse("g.elf:mine mem=3M").unwrap_err();
        assert!(bad.contains("mem="), "{bad}");
        let unknown = parse("g.elf:mine colour=red").unwrap_err();
        assert!(unknown.contains("unknown module option"), "{unknown}");
    }

    #[test]
    fn empty_parts_say_what_to_write() {
        assert!(parse(":mine").unwrap_err().contains("PATH[:MODULE-LINE]"));
        assert!(parse("g.elf:").unwrap_err().contains("empty module line"));
        assert!(parse("g.elf:mine \"quoted\"").unwrap_err().contains("command line cannot contain"));
    }

    #[test]
    fn resolve_refuses_missing_empty_and_unknown_files() {
        let dir = std::env::temp_dir().join(format!("nk-guest-arg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = resolve(&parse(dir.join("nope.elf").to_str().unwrap()).unwrap()).unwrap_err();
        assert!(missing.contains("cannot read it"), "{missing}");
        let empty = dir.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        assert!(resolve(&parse(empty.to_str().unwrap()).unwrap()).unwrap_err().contains("empty"));
        let text = dir.join("notes.txt");
        std::fs::write(&text, b"just some text, no kernel here").unwrap();
        let unknown = resolve(&parse(text.to_str().unwrap()).unwrap()).unwrap_err();
        assert!(unknown.contains("not an image"), "{unknown}");
        let data = format!("{}:notes data", text.display());
        assert_eq!(resolve(&parse(&data).unwrap()).unwrap().cmdline, "notes data");
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(64, 0);
        let elf_path = dir.join("tiny.elf");
        std::fs::write(&elf_path, &elf).unwrap();
        assert_eq!(resolve(&parse(elf_path.to_str().unwrap()).unwrap()).unwrap().cmdline, "tiny");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
