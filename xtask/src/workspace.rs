//! Where things are: the workspace root, cargo's target directory and xtask's own
//! directories under it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The workspace xtask works on, and the directories it writes to.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
    target: PathBuf,
}

impl Workspace {
    /// Finds the workspace from xtask's own manifest directory (xtask/ sits in the root).
    /// Honours `CARGO_TARGET_DIR` as cargo does, so images land beside the build.
    pub fn locate() -> Result<Self> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .context("xtask's manifest directory has no parent: xtask must live in <workspace>/xtask")?
            .to_path_buf();
        if !root.join("Cargo.toml").is_file() {
            anyhow::bail!("no Cargo.toml in {}: run xtask from the project's workspace", root.display());
        }
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => {
                let dir = PathBuf::from(dir);
                if dir.is_absolute() {
                    dir
                } else {
                    root.join(dir)
                }
            }
            _ => root.join("target"),
        };
        Ok(Workspace { root, target })
    }

    /// A workspace at `root` building into `target` (a copy xtask makes for a check).
    pub fn at(root: PathBuf, target: PathBuf) -> Self {
        Workspace { root, target }
    }

    /// The workspace root (where the root Cargo.toml is).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Cargo's target directory.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Where built ELF files and ISO images go: `target/images/`.
    pub fn images(&self) -> PathBuf {
        self.target.join("images")
    }

    /// Where each emulator run keeps its configuration and logs: `target/runs/`.
    pub fn runs(&self) -> PathBuf {
        self.target.join("runs")
    }

    /// The emulator scenario file.
    pub fn scenario_file(&self) -> PathBuf {
        self.root.join("tests").join("emulator.toml")
    }

    /// Shows `path` relative to the workspace root when it lies inside it.
    pub fn display(&self, path: &Path) -> String {
        path.strip_prefix(&self.root).unwrap_or(path).display().to_string()
    }

    /// The cargo executable that runs xtask (the same toolchain), or `cargo`.
    pub fn cargo(&self) -> std::ffi::OsString {
        std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
    }
}
