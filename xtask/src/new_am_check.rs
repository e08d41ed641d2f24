//! The hypervisor of scenario kind `image = "new-am"`: what a newcomer gets from
//! `cargo xtask new-am`, checked end to end. A copy of the workspace (its tracked and
//! untracked, not ignored files, under target/new-am-check/ws) gets an AM made by
//! `new-am probe`, exactly as a user's tree would, and its hypervisor is built there (in
//! its own target directory, kept between runs so rebuilds are incremental). The scenario
//! then boots that hypervisor with the test guest's `newam` mode, which calls the new AM.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cli::Profile;
use crate::image::{self, BuildOutput, ImageKind};
use crate::workspace::Workspace;

/// The AM's name in the copy.
pub const PROBE: &str = "probe";

/// Refreshes the copy, generates the AM in it, builds its hypervisor; returns the ELF.
pub fn build(workspace: &Workspace) -> Result<PathBuf> {
    let base = workspace.target().join("new-am-check");
    let root = base.join("ws");
    println!(
        "xtask: new-am check: copying the workspace to {} and running new-am {PROBE} there",
        workspace.display(&root)
    );
    sync_copy(workspace.root(), &root)?;
    let generated = root.join("am").join(PROBE);
    if generated.exists() {
        std::fs::remove_dir_all(&generated).with_context(|| format!("cannot remove {}", generated.display()))?;
    }
    let copy = Workspace::at(root, base.join("target"));
    crate::new_am::generate(&copy, PROBE).context("cargo xtask new-am in the copy")?;
    image::build_hypervisor(&copy, ImageKind::Normal, Profile::Release, BuildOutput::Summary)
        .context("the hypervisor with the new AM did not build")
}

/// Makes `to` hold the files git lists for `from` (tracked, and untracked but not
/// ignored), writing only files whose contents differ, so cargo sees unchanged files as
/// unchanged.
fn sync_copy(from: &Path, to: &Path) -> Result<()> {
    let out = Command::new("git")
        .current_dir(from)
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .output()
        .context("cannot run git (the new-am check copies the files git lists)")?;
    if !out.status.success() {
        bail!("git ls-files failed in {}: {}", from.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut copied = 0;
    for name in out.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = Path::new(std::str::from_utf8(name).context("a file name that is not UTF-8")?);
        let source = from.join(name);
        let Ok(bytes) = std::fs::read(&source) else { continue }; // deleted but still tracked
        let target = to.join(name);
        if std::fs::read(&target).ok().as_deref() != Some(&bytes[..]) {
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(&target, &bytes).with_context(|| format!("cannot write {}", target.display()))?;
            copied += 1;
        }
    }
    println!("xtask: new-am check: {copied} file(s) refreshed in the copy");
    Ok(())
}
