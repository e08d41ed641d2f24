//! NVRAM disk images: the ATA disk whose durable area the hypervisor mirrors as emulated
//! NVRAM (hypervisor/src/storage). Sector 0 holds the label (`nk_storage::label`) that
//! marks the disk as NVRAM and gives the area's size; the area follows, zeroed when the
//! image is made. `cargo xtask run` keeps one image across runs (so the NVRAM demo shows
//! restore); test scenarios get a fresh one each.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nk_storage::{label, SECTOR_SIZE};

use crate::workspace::Workspace;

/// The durable area's size when no flag says otherwise, in MiB: the mirror takes as much
/// of the machine's RAM, and `cargo xtask run`'s six guests need most of its 64 MiB.
pub const DEFAULT_MIB: u32 = 4;
/// The largest area, in MiB: the hypervisor mirrors all of it in RAM.
pub const MAX_MIB: u32 = 1024;

/// Where `cargo xtask run` keeps its NVRAM disk image.
pub fn run_image(workspace: &Workspace) -> PathBuf {
    workspace.target().join("nvram").join("run.img")
}

/// Creates (or replaces) `path` as an NVRAM disk with an area of `mib` MiB, all zero.
pub fn create(path: &Path, mib: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let area = u64::from(mib) << 20;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create the NVRAM disk {}", path.display()))?;
    file.write_all(&label::encode(area)).with_context(|| format!("cannot write {}", path.display()))?;
    // The area reads as zeros (a sparse file where the file system allows).
    file.set_len(SECTOR_SIZE as u64 + area).with_context(|| format!("cannot size {}", path.display()))?;
    Ok(())
}

/// Returns the area size of an existing NVRAM disk image, or why it is not one.
pub fn area_bytes(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let sector: &[u8; SECTOR_SIZE] = bytes
        .get(..SECTOR_SIZE)
        .and_then(|s| s.try_into().ok())
        .with_context(|| format!("{} is shorter than one sector", path.display()))?;
    label::decode(sector, bytes.len() as u64 / SECTOR_SIZE as u64)
        .map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))
}

/// Removes the lock file Bochs keeps beside a disk image while it runs (`<image>.lock`):
/// a Bochs killed from outside leaves it, and the next Bochs would refuse the image
/// ("image locked"). Only for images xtask alone uses.
pub fn remove_stale_lock(path: &Path) -> Result<()> {
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    match std::fs::remove_file(&lock) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("cannot remove Bochs's stale lock {}", lock.to_string_lossy())),
    }
}

/// Flips every bit of the byte at `offset` of the durable area of the NVRAM disk `path`
/// (a corruption between boots, `flip_byte` in a scenario's boot).
pub fn flip_byte(path: &Path, offset: u64) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let area = area_bytes(path)?;
    anyhow::ensure!(offset < area, "flip_byte = {offset}: the durable area has {area} bytes");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let at = SECTOR_SIZE as u64 + offset;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut byte)?;
    byte[0] ^= 0xFF;
    file.seek(SeekFrom::Start(at))?;
    file.write_all(&byte)?;
    Ok(())
}

/// Makes sure `path` is an NVRAM disk of `mib` MiB: keeps an existing one of that size
/// unless `fresh`, else creates it. Returns a phrase saying which, for a progress line.
pub fn ensure(path: &Path, mib: u32, fresh: bool) -> Result<&'static str> {
    remove_stale_lock(path)?;
    if !fresh && path.exists() {
        match area_bytes(path) {
            Ok(area) if area == u64::from(mib) << 20 => return Ok("kept"),
            Ok(_) => {
                create(path, mib)?;
                return Ok("made anew (another size was asked for)");
            }
            Err(_) => {
                create(path, mib)?;
                return Ok("made anew (the old one had no label of this format, e.g. an older version's)");
            }
        }
    }
    create(path, mib)?;
    Ok(if fresh { "made fresh" } else { "made" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_labelled_kept_and_remade() {
        let dir = std::env::temp_dir().join(format!("nk-nvram-test-{}", std::process::id()));
        let path = dir.join("a.img");
        assert_eq!(ensure(&path, 1, false).expect("made"), "made");
        assert_eq!(area_bytes(&path).expect("labelled"), 1 << 20);
        assert_eq!(std::fs::metadata(&path).expect("exists").len(), (1 << 20) + 512);
        let mut data = std::fs::read(&path).expect("reads");
        data[512] = 0x42;
        std::fs::write(&path, &data).expect("writes");
        assert_eq!(ensure(&path, 1, false).expect("kept"), "kept");
        assert_eq!(std::fs::read(&path).expect("reads")[512], 0x42, "a kept image keeps its data");
        assert_eq!(ensure(&path, 2, false).expect("remade"), "made anew (another size was asked for)");
        assert_eq!(ensure(&path, 2, true).expect("fresh"), "made fresh");
        assert_eq!(std::fs::read(&path).expect("reads")[512], 0);
        let lock = dir.join("a.img.lock");
        std::fs::write(&lock, "").expect("writes");
        assert_eq!(ensure(&path, 2, false).expect("kept"), "kept");
        assert!(!lock.exists(), "a stale Bochs lock is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
