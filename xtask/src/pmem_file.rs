//! NVDIMM backing files for QEMU (`pmem_mib` scenarios): persistent memory the firmware
//! describes in its ACPI NFIT, which the hypervisor picks as the NVRAM AM's device
//! (hypervisor/src/storage/pmem.rs). The file is the memory's contents: zeroed when made,
//! kept across a scenario's boots, so a later boot sees what an earlier one stored.

use std::fs::OpenOptions;
use std::path::Path;

use anyhow::{Context, Result};

/// The largest NVDIMM a scenario may ask for.
pub const MAX_MIB: u32 = 1024;

/// Where `cargo xtask run --pmem-mib` keeps its NVDIMM file.
pub fn run_file(workspace: &crate::workspace::Workspace) -> std::path::PathBuf {
    workspace.target().join("nvram").join("run.pmem")
}

/// Keeps `path` when it is a file of `mib` MiB and `fresh` is false, else makes it anew;
/// says which.
pub fn ensure(path: &Path, mib: u32, fresh: bool) -> Result<&'static str> {
    let kept = std::fs::metadata(path).is_ok_and(|m| m.len() == u64::from(mib) << 20);
    if kept && !fresh {
        return Ok("kept from the last run");
    }
    create(path, mib)?;
    Ok("made fresh (zeroed)")
}

/// Creates (or replaces) `path` as a zeroed NVDIMM backing file of `mib` MiB (sparse where
/// the file system allows).
pub fn create(path: &Path, mib: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create the NVDIMM file {}", path.display()))?;
    file.set_len(u64::from(mib) << 20).with_context(|| format!("cannot size {}", path.display()))?;
    Ok(())
}
