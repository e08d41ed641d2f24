//! The Linux guest's files: Debian's `linux-image-cloud-amd64` kernel and `busybox-static`,
//! fetched with `apt-get download` (the only network access) and unpacked with
//! `dpkg-deb -x` into target/linux/, and the initramfs, a newc cpio written here: busybox,
//! the device nodes the kernel needs before devtmpfs, and an /init shell script that
//! mounts proc/sys/dev, prints `LINUX-OK <uname -r> cpus=<N>`, runs the command list the
//! kernel command line gives it (the words after `-- nk-run`), and powers off.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::tools;
use crate::workspace::Workspace;

/// The kernel metapackage; its dependency names the versioned image package.
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";

/// What the VM's /init runs (a busybox sh script).
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
echo "LINUX-OK $(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"
# The same moment on the kernel's clock, for `cargo xtask bench linux`.
echo "nk-init: LINUX-OK reached" > /dev/kmsg
# A virtio block device (the module's `disk=`, an ACPI LNRO0005 device): load Debian's
# modules for it, and mount it on /mnt (formatting it as ext2 first if it holds none).
if [ -e /sys/bus/acpi/devices/LNRO0005:00 ]; then
    for m in virtio_ring virtio virtio_mmio virtio_blk; do insmod /lib/modules/$m.ko; done
    n=0; while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
    mkdir -p /mnt
    if mount -t ext4 /dev/vda /mnt 2>/dev/null; then
        echo "nk-init: disk: /dev/vda ($(cat /sys/block/vda/size) sectors) mounted on /mnt"
    elif mke2fs -q /dev/vda && mount -t ext4 /dev/vda /mnt; then
        echo "nk-init: disk: /dev/vda ($(cat /sys/block/vda/size) sectors) formatted (ext2) and mounted on /mnt"
    else
        echo "nk-init: disk: /dev/vda cannot be mounted"
    fi
fi
# The kernel passes /init the words after its `--` (and any parameter it does not know,
# e.g. nokaslr): the commands are the words after the marker `nk-run`.
while [ $# -gt 0 ] && [ "$1" != nk-run ]; do shift; done
[ $# -gt 0 ] && shift
if [ $# -gt 0 ]; then
    echo "nk-init: running: $*"
    eval "$*"
    echo "nk-init: commands done (status $?)"
fi
if grep -q " /mnt " /proc/mounts; then umount /mnt && echo "nk-init: disk: unmounted"; fi
poweroff -f
"#;

/// `/bin/nkctl-demo`: layer bypass from a Linux shell, one step at a time (a script in the
/// initramfs, since Linux passes /init at most 32 words). A root process reads the
/// capabilities the VM's operator handed over in the NKCP ACPI table and inspects one
/// with VMCALL from ring 3; a process of another user cannot read the table; a forged
/// name, a label that was not handed over and an unknown command are refused in words.
pub const NKCTL_DEMO: &str = r#"#!/bin/busybox sh
echo "nkctl-demo: as root"
nkctl caps
nkctl inspect guest-os/vm
echo "nkctl-demo: as nobody"
su -s /bin/sh nobody -c "nkctl inspect guest-os/vm"
echo "nkctl-demo: refusals"
nkctl inspect 0x99
nkctl revoke exo/frames#5
nkctl frobnicate 2>&1 | head -1
nkctl null
echo "nkctl-demo: process binding"
nkctl bind-check counter/factory
nkctl bind counter/factory -- inspect counter/factory
"#;

/// `/bin/nkctl-bypass`: memory through the layer bypass (issue 13). A root process
/// allocates (or, on a later boot of the same NVRAM disk, finds again) an NVRAM region,
/// maps it at guest-physical 1 GiB (above Linux's RAM, so /dev/mem may map it), and works
/// on it with plain stores and loads through /dev/mem: on the boot that created it, it
/// writes a record, commits (the write set from the EPT dirty bits), writes a second one
/// and aborts it with restore; on a later boot it reads the record back. Then it maps an
/// exo frame set below 1 GiB, writes one of its pages and reads the dirty bits through
/// the exo AM; last it revokes the region's capability, and its next call is refused.
pub const NKCTL_BYPASS: &str = r#"#!/bin/busybox sh
R=$(nkctl nvram alloc nvram/nvram-factory 16384 13) || exit 1
echo "nkctl-bypass: $R"
N=$(echo "$R" | cut -d' ' -f2)
nkctl nvram map $N 0x40000000 || exit 1
case "$R" in
*created*)
  nkctl mem write 0x40001000 "bypass-record:answer=42"
  nkctl dirty 0x40000000 4
  nkctl nvram commit $N
  nkctl mem write 0x40003000 "never-committed"
  nkctl nvram restore $N
  echo "nkctl-bypass: after restore [$(nkctl mem read 0x40003000 15)]"
  ;;
*)
  echo "nkctl-bypass: found [$(nkctl mem read 0x40001000 23)]"
  echo "nkctl-bypass: aborted one [$(nkctl mem read 0x40003000 15)]"
  ;;
esac
F=$(nkctl exo alloc exo/aspace 4) || exit 1
nkctl exo map $F exo/aspace 0x3ff00000
nkctl dirty 0x3ff00000 4
nkctl mem write 0x3ff02000 "dirty-me"
nkctl dirty 0x3ff00000 4
nkctl exo unmap exo/aspace 0x3ff00000
nkctl exo free $F
nkctl nvram unmap $N 0x40000000
nkctl revoke $N
nkctl nvram seq $N
echo "nkctl-bypass: done"
"#;

/// `/bin/nkctl-isolation`: issue 13's isolation checks from Linux processes. A process
/// without a mapping finds nothing at 1 GiB + 1 MiB through /dev/mem (the hypervisor
/// answers unmapped addresses above the VM's RAM as an open bus: all ones); two processes
/// commit their own NVRAM regions 20 times each at the same time, every commit writing
/// exactly its one dirty page; afterwards (unmapped) nothing is there again; a name bound
/// to another VM (`$1`) is refused and changes nothing.
pub const NKCTL_ISOLATION: &str = r#"#!/bin/busybox sh
nkctl probe 0x40100000
nkctl stress 21 0x40100000 20 &
nkctl stress 22 0x40200000 20 &
wait
nkctl probe 0x40100000
nkctl probe 0x40200000
nkctl foreign ${1:-auto} 23
nkctl probe 0x40300000
echo "nkctl-isolation: done"
"#;

/// `/bin/nk-disk`: the virtio block device across boots (issue 13's Linux disk). The
/// first boot of a disk image (/init formatted and mounted it) writes a record to a file
/// on it and syncs; a later boot of the same image reads the record back. Both print the
/// file system's size.
pub const NK_DISK: &str = r#"#!/bin/busybox sh
if [ -f /mnt/record ]; then
  echo "nk-disk: found [$(cat /mnt/record)]"
else
  echo "durable-record:answer=42" > /mnt/record
  sync && echo "nk-disk: wrote the record and synced"
fi
echo "nk-disk: $(df -k /mnt | tail -1)"
"#;

/// `/bin/nk-disk-attack`: malformed virtqueues from a root process (`nkctl
/// virtio-attack`) at the virtio block device's registers (guest-physical 0xd0000000)
/// once Linux's driver let go of it, with the rings in the reserved page at 0xf8000;
/// afterwards Linux's driver takes the device again (its probe resets it) and mounts it.
pub const NK_DISK_ATTACK: &str = r#"#!/bin/busybox sh
umount /mnt
rmmod virtio_blk
rmmod virtio_mmio
nkctl virtio-attack 0xd0000000 0xf8000
insmod /lib/modules/virtio_mmio.ko
insmod /lib/modules/virtio_blk.ko
n=0; while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
mount -t ext4 /dev/vda /mnt && echo "nk-disk-attack: mounted again: [$(cat /mnt/record)]"
"#;

/// The unpacked Linux guest files.
#[derive(Debug, Clone)]
pub struct LinuxFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// The kernel command line of the Linux VM: serial console, no KASLR (the decompressor
/// must stay below the VM's memory), the TSC trusted (its rate comes from CPUID 0x15),
/// no IO-APIC (the MADT has none), reboot on panic, one CPU, fewer boot-time costs.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 earlyprintk=serial nokaslr noapic tsc=reliable panic=-1 \
    mitigations=off init_on_alloc=0 maxcpus=1";
/// The commands `cargo xtask run --linux` gives /init: a few words from Linux, the record
/// on its durable virtio disk (`nk-disk`: written on the disk's first run, read back on
/// later ones), then the layer-bypass demo (`nkctl demo`, with the keeper guest [`demo_modules`] adds) after the
/// isolation checks (`/bin/nkctl-isolation`, against the keeper's VM).
pub const DEMO_COMMANDS: &str =
    "echo hello-from-linux > /tmp/f ; cat /tmp/f ; nk-disk ; nkctl-isolation auto ; nkctl demo";
/// The virtio disk of the demo's Linux VM (`disk=`, docs/linux-disk.md): a block-AM range
/// at the end of the run's durable device, where /init keeps an ext2 file system from run
/// to run and `nk-disk` its record.
pub const DEMO_DISK: &str = "4M";
/// The smallest durable device a run with the demo needs: the disk's range may take at
/// most half of it, and the NVRAM AM's regions (the keeper's and the isolation checks')
/// fit in the other half.
pub const DEMO_NVRAM_MIB: u32 = 8;
/// Bochs's instructions per second for runs with a Linux VM: Linux's timer tick (HZ=250)
/// and RCU's stall detector assume a CPU that does far more than 4,000 instructions a tick,
/// as the 1 MHz default would give; the hypervisor measures the rate and reports it in
/// CPUID 0x15/0x16, so Linux's view of time stays consistent.
pub const IPS: u32 = 50_000_000;
/// The machine RAM a run with the Linux VM needs: the VM takes 128 MiB in one naturally
/// aligned block of the buddy allocator.
pub const MIN_MEGS: u32 = 512;

/// The two boot modules of a Linux VM running `commands` on CPU 0.
pub fn modules(files: &LinuxFiles, commands: &str) -> Vec<crate::image::Module> {
    vec![
        crate::image::Module {
            path: files.kernel.clone(),
            cmdline: format!("linux mem=128M cpu=0 modules=initramfs -- {KERNEL_CMDLINE} -- nk-run {commands}"),
        },
        crate::image::Module { path: files.initramfs.clone(), cmdline: "initramfs data".into() },
    ]
}

/// The modules of `cargo xtask run --linux`: the Linux VM on CPU 0 running
/// [`DEMO_COMMANDS`], with an NVRAM factory of its own and `ring3-caps` (its root process
/// lists the inbox the keeper delegates to), and the keeper of the layer-bypass demo (the
/// test guest at `testguest` in mode `bypasskeep`: it holds NVRAM region 42 and revokes
/// Linux's capability to it from outside once the demo rings its doorbell), on CPU 1 when
/// there is one. The NVRAM disk target/nvram/run.img keeps the region across runs.
pub fn demo_modules(files: &LinuxFiles, testguest: &Path, cpus: u32) -> Vec<crate::image::Module> {
    let mut modules = modules(files, DEMO_COMMANDS);
    let extra = format!("modules=initramfs nvram ring3-caps disk={DEMO_DISK}");
    modules[0].cmdline = modules[0].cmdline.replacen("modules=initramfs", &extra, 1);
    let cpu = if cpus > 1 { " cpu=1" } else { "" };
    modules.push(crate::image::Module {
        path: testguest.to_path_buf(),
        cmdline: format!("keeper{cpu} nvram manages=linux -- bypasskeep 42"),
    });
    modules
}

/// Where everything lives.
pub fn dir(workspace: &Workspace) -> PathBuf {
    workspace.target().join("linux")
}

/// Fetches and unpacks the packages if target/linux/ lacks them, and (re)writes the
/// initramfs if its contents changed.
pub fn ensure(workspace: &Workspace) -> Result<LinuxFiles> {
    let dir = dir(workspace);
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
    let kernel = dir.join("vmlinuz");
    let busybox = dir.join("busybox");
    if !kernel.is_file() || !busybox.is_file() {
        fetch(&debs)?;
        unpack(&debs, &dir, &kernel, &busybox)?;
    }
    write_broken_kernels(&dir, &kernel)?;
    let initramfs = dir.join("initramfs.cpio");
    let busybox_bytes = std::fs::read(&busybox).with_context(|| format!("cannot read {}", busybox.display()))?;
    let nkctl = build_nkctl(workspace)?;
    let kernel_modules = kernel_modules(&dir, &debs)?;
    let cpio = initramfs_cpio(&busybox_bytes, &nkctl, &kernel_modules);
    if std::fs::read(&initramfs).ok().as_deref() != Some(&cpio[..]) {
        std::fs::write(&initramfs, &cpio).with_context(|| format!("cannot write {}", initramfs.display()))?;
        println!("xtask: linux: wrote {} ({} bytes)", workspace.display(&initramfs), cpio.len());
    }
    Ok(LinuxFiles { kernel, initramfs })
}

/// The Debian kernel modules the initramfs carries, in load order: the virtio block device
/// on the virtio-mmio transport (the module's `disk=`; ext4, which mounts ext2, is built in).
const KERNEL_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
];

/// Returns the [`KERNEL_MODULES`] (file name, bytes), unpacking them from the kernel
/// package in `debs` into `dir`/modules the first time.
fn kernel_modules(dir: &Path, debs: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let out = dir.join("modules");
    let name = |m: &str| m.rsplit('/').next().unwrap_or(m).to_string();
    if !KERNEL_MODULES.iter().all(|m| out.join(name(m)).is_file()) {
        let deb = std::fs::read_dir(debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("linux-image-")))
            .with_context(|| format!("no linux-image-*.deb in {}", debs.display()))?;
        let root = dir.join("modules-root");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        tools::status_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root), "dpkg-deb -x")?;
        let lib = root.join("lib/modules");
        let version = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .next()
            .with_context(|| format!("the kernel package has no {}", lib.display()))?;
        std::fs::create_dir_all(&out)?;
        for m in KERNEL_MODULES {
            let from = version.join("kernel").join(m);
            std::fs::copy(&from, out.join(name(m))).with_context(|| format!("cannot copy {}", from.display()))?;
        }
        let _ = std::fs::remove_dir_all(&root);
        println!("xtask: linux: kernel modules {} -> {}", KERNEL_MODULES.len(), out.display());
    }
    KERNEL_MODULES
        .iter()
        .map(|m| {
            let path = out.join(name(m));
            Ok((name(m), std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?))
        })
        .collect()
}

/// The Linux target `nkctl` is built for: the host's own, linked statically (glibc's
/// static libraries come with the C toolchain every Rust build needs), so the binary
/// runs in the busybox initramfs, which has no shared libraries.
const LINUX_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds `guests/nkctl` (layer bypass from a Linux process) as a static, stripped
/// binary and returns its bytes.
fn build_nkctl(workspace: &Workspace) -> Result<Vec<u8>> {
    let mut command = Command::new(workspace.cargo());
    command
        .current_dir(workspace.root())
        .args(["build", "-q", "-p", "nkctl", "--release", "--target", LINUX_TARGET])
        // Only the target's crates get these flags (build scripts run on the host).
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C target-feature=+crt-static -C strip=symbols");
    tools::status_checked(&mut command, "building nkctl (static, for the Linux guest)")?;
    let binary = workspace.target().join(LINUX_TARGET).join("release").join("nkctl");
    std::fs::read(&binary).with_context(|| format!("cannot read {}", binary.display()))
}

/// The versioned kernel package the metapackage depends on.
fn kernel_package() -> Result<String> {
    let depends = |update: bool| -> Result<Option<String>> {
        if update {
            println!("xtask: linux: apt-get update (the package lists do not know {KERNEL_META})");
            crate::setup::apt_get_update()?;
        }
        let out = Command::new("apt-cache").args(["depends", KERNEL_META]).output().context("cannot run apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").map(|p| p.trim().to_string()))
            .filter(|p| p.starts_with("linux-image-")))
    };
    if let Some(p) = depends(false)? {
        return Ok(p);
    }
    if crate::setup::running_as_root() {
        if let Some(p) = depends(true)? {
            return Ok(p);
        }
    }
    anyhow::bail!("apt-cache does not know {KERNEL_META}: run `sudo apt-get update` (Debian bookworm) and try again")
}

fn fetch(debs: &Path) -> Result<()> {
    if tools::find_program("apt-get").is_none() || tools::find_program("dpkg-deb").is_none() {
        anyhow::bail!(
            "the Linux guest needs apt-get and dpkg-deb (a Debian machine) to fetch {KERNEL_META} and {BUSYBOX}"
        );
    }
    let kernel = kernel_package()?;
    println!("xtask: linux: apt-get download {kernel} {BUSYBOX} into {}", debs.display());
    tools::status_checked(
        Command::new("apt-get")
            .args(["download", &kernel, BUSYBOX])
            .current_dir(debs)
            .stdin(std::process::Stdio::null()),
        "apt-get download",
    )
}

fn unpack(debs: &Path, dir: &Path, kernel: &Path, busybox: &Path) -> Result<()> {
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for entry in std::fs::read_dir(debs)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            tools::status_checked(Command::new("dpkg-deb").arg("-x").arg(&path).arg(&root), "dpkg-deb -x")?;
        }
    }
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("the kernel package left no {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .context("no vmlinuz-* in the kernel package")?;
    std::fs::copy(&vmlinuz, kernel).with_context(|| format!("cannot copy {}", vmlinuz.display()))?;
    std::fs::copy(root.join("bin/busybox"), busybox).context("no bin/busybox in busybox-static")?;
    println!("xtask: linux: {} -> {}", vmlinuz.display(), kernel.display());
    // The modules tree is large and the guest needs four of it (`kernel_modules`): drop it.
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// Writes the two broken kernels the tests boot: `vmlinuz-truncated` (its first 60%, so the
/// setup header promises more than the file holds) and `vmlinuz-corrupt` (whole, but the
/// first 512 bytes of its compressed payload, at the header's payload_offset, zeroed: the
/// decompressor refuses it).
fn write_broken_kernels(dir: &Path, kernel: &Path) -> Result<()> {
    let truncated = dir.join("vmlinuz-truncated");
    let corrupt = dir.join("vmlinuz-corrupt");
    if truncated.is_file() && corrupt.is_file() {
        return Ok(());
    }
    let bytes = std::fs::read(kernel).with_context(|| format!("cannot read {}", kernel.display()))?;
    std::fs::write(&truncated, &bytes[..bytes.len() * 3 / 5])?;
    let setup_sects = match bytes.get(0x1F1) {
        Some(0) | None => 4,
        Some(&n) => usize::from(n),
    };
    let word = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
    let payload = (setup_sects + 1) * 512 + word(0x248).context("no payload_offset in the kernel's setup header")?;
    let mut broken = bytes.clone();
    let end = (payload + 512).min(broken.len());
    broken[payload.min(end)..end].fill(0);
    std::fs::write(&corrupt, &broken)?;
    Ok(())
}

/// One file of a newc ("070701") cpio archive (the format the kernel's initramfs
/// unpacker reads, Documentation/driver-api/early-userspace/buffer-format.rst).
struct CpioWriter {
    out: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl CpioWriter {
    fn new() -> Self {
        Self { out: Vec::new(), ino: 1 }
    }

    fn pad4(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & S_IFDIR == S_IFDIR && mode & S_IFREG == 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
        self.out.extend_from_slice(data);
        self.pad4();
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, (0, 0), data);
    }
    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }
    fn chardev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads the archive in 512-byte blocks' worth; pad like cpio does.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

/// Builds the initramfs around `busybox`.
pub fn initramfs_cpio(busybox: &[u8], nkctl: &[u8], kernel_modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut c = CpioWriter::new();
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "sbin", "lib", "lib/modules"] {
        c.dir(d);
    }
    for (name, bytes) in kernel_modules {
        c.file(&format!("lib/modules/{name}"), 0o644, bytes);
    }
    c.chardev("dev/console", 5, 1);
    c.chardev("dev/ttyS0", 4, 64);
    c.chardev("dev/null", 1, 3);
    c.file("bin/busybox", 0o755, busybox);
    c.symlink("bin/sh", "busybox");
    c.file("bin/nkctl", 0o755, nkctl);
    c.file("bin/nkctl-demo", 0o755, NKCTL_DEMO.as_bytes());
    c.file("bin/nkctl-bypass", 0o755, NKCTL_BYPASS.as_bytes());
    c.file("bin/nkctl-isolation", 0o755, NKCTL_ISOLATION.as_bytes());
    c.file("bin/nk-disk", 0o755, NK_DISK.as_bytes());
    c.file("bin/nk-disk-attack", 0o755, NK_DISK_ATTACK.as_bytes());
    // Root and an unprivileged user, so a demo can show what only root may read.
    c.file("etc/passwd", 0o644, b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n");
    c.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n");
    c.file("init", 0o755, INIT_SCRIPT.as_bytes());
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One archive member: (name, mode, (rdev major, minor), data).
    type Member = (String, u32, (u32, u32), Vec<u8>);

    /// Walks a newc archive as the kernel's unpacker does.
    fn walk(archive: &[u8]) -> Vec<Member> {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(&archive[at..at + 6], b"070701", "magic at {at}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&archive[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6) as usize, field(9), field(10), field(11) as usize);
            let name_at = at + 110;
            let name = String::from_utf8(archive[name_at..name_at + namesize - 1].to_vec()).unwrap();
            assert_eq!(archive[name_at + namesize - 1], 0);
            let data_at = (name_at + namesize).next_multiple_of(4);
            let data = archive[data_at..data_at + size].to_vec();
            at = (data_at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
            out.push((name, mode, (rmaj, rmin), data));
        }
        assert_eq!(archive.len() % 512, 0);
        out
    }

    #[test]
    fn initramfs_has_init_busybox_and_console() {
        let archive = initramfs_cpio(b"\x7fELF fake busybox", b"\x7fELF fake nkctl", &[]);
        let entries = walk(&archive);
        let find = |n: &str| entries.iter().find(|e| e.0 == n).unwrap_or_else(|| panic!("{n} missing")).clone();
        let init = find("init");
        assert_eq!(init.1, S_IFREG | 0o755);
        assert!(String::from_utf8(init.3).unwrap().contains("LINUX-OK"));
        assert_eq!(find("dev/console").2, (5, 1));
        assert_eq!(find("dev/console").1 & 0o170000, S_IFCHR);
        assert_eq!(find("bin/sh").3, b"busybox");
        assert_eq!(find("bin/busybox").3, b"\x7fELF fake busybox");
        assert_eq!(find("bin/nkctl").3, b"\x7fELF fake nkctl");
        assert_eq!(find("bin/nkctl").1, S_IFREG | 0o755);
        assert!(String::from_utf8(find("bin/nkctl-demo").3).unwrap().contains("nkctl caps"));
        assert!(String::from_utf8(find("bin/nkctl-bypass").3).unwrap().contains("nkctl nvram commit"));
        assert!(String::from_utf8(find("bin/nkctl-isolation").3).unwrap().contains("nkctl stress"));
        assert_eq!(find("proc").1, S_IFDIR | 0o755);
    }

    #[test]
    fn init_script_mounts_prints_runs_and_powers_off() {
        for needle in ["mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "uname -r", "eval \"$*\"", "poweroff -f"]
        {
            assert!(INIT_SCRIPT.contains(needle), "{needle}");
        }
    }
}
