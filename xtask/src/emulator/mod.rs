//! Running one boot in an emulator: start it in its own run directory, follow the serial
//! log as it grows, and stop it when the hypervisor says `nk: shutdown`, when it exits, or
//! at the timeout. A run is judged only by its serial log (docs/emulator-protocol.md):
//! Bochs always exits with status 1.

mod bochs;
mod qemu;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub use crate::cli::Emulator;
use crate::tools::{self, LogTail};

pub use bochs::{check_cpu_model, check_cpus as check_bochs_cpus, DEFAULT_CPU_MODEL};

/// The marker of the last line of every run (docs/emulator-protocol.md "Exit").
pub const SHUTDOWN_MARKER: &str = "nk: shutdown";
/// How long the emulator may take to exit by itself after the shutdown line.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How often the serial log and the emulator are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// One boot to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Names the run in messages (a scenario name, or `run`).
    pub name: String,
    pub emulator: Emulator,
    pub iso: PathBuf,
    pub cpus: u32,
    pub megs: u32,
    /// A Bochs CPU model, or a QEMU `-cpu` value; `None` takes the emulator's default.
    pub cpu_model: Option<String>,
    pub timeout: Duration,
    /// The run directory: emulator configuration and logs; emptied before the run.
    pub dir: PathBuf,
    /// Bochs's emulated instructions per second (the rate of its TSC, PIT and APIC timer).
    pub ips: u32,
    /// An NVRAM disk image (xtask/src/nvram_disk.rs) attached as the primary channel's
    /// slave disk (Bochs `ata0-slave`, QEMU IDE index 1); the run writes to it.
    pub disk: Option<PathBuf>,
    /// QEMU only: the backing file of an NVDIMM (`-machine nvdimm=on`, `-device nvdimm`,
    /// its size the file's), persistent memory the firmware describes in its NFIT; the run
    /// writes to it (xtask/src/pmem_file.rs).
    pub pmem: Option<PathBuf>,
    /// COM2 as a local TCP socket the emulator listens on (the guest debugger's port;
    /// Bochs starts the machine only once a client connected).
    pub gdb_port: Option<u16>,
    /// A scripted gdb session that connects to `gdb_port` once it listens.
    pub gdb_client: Option<crate::gdb::Client>,
}

/// Bochs's instructions per second unless a run says otherwise: the minimum, so that
/// timer waits in the BIOS and GRUB cost the fewest instructions (PLATFORM.md).
pub const DEFAULT_IPS: u32 = 1_000_000;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The hypervisor printed `nk: shutdown`; the emulator then exited (or was stopped
    /// after the grace period).
    Shutdown,
    /// The emulator exited without the shutdown line.
    Exited(ExitStatus),
    /// The run reached its timeout and was killed.
    TimedOut,
}

/// What a run left behind.
#[derive(Debug)]
pub struct RunResult {
    pub ending: Ending,
    pub elapsed: Duration,
    /// The whole serial log, line by line.
    pub serial: String,
    pub serial_path: PathBuf,
    /// What the emulator itself said that may explain a failure (its errors and panics).
    pub emulator_notes: Vec<String>,
    /// What a scripted gdb session printed (`RunSpec::gdb_client`).
    pub gdb_output: Option<String>,
}

impl RunResult {
    /// One phrase for progress lines and failure reports.
    pub fn ending_text(&self, timeout: Duration) -> String {
        match self.ending {
            Ending::Shutdown => "the hypervisor shut down".into(),
            Ending::Exited(status) => format!("the emulator exited ({status}) without `{SHUTDOWN_MARKER}`"),
            Ending::TimedOut => format!("timed out after {} s without `{SHUTDOWN_MARKER}`", timeout.as_secs()),
        }
    }
}

/// A prepared emulator invocation.
struct Launch {
    command: Command,
    serial: PathBuf,
    /// Where the emulator's own stdout and stderr go.
    console: PathBuf,
    /// The emulator's log, searched for explanations when a run fails.
    log: Option<PathBuf>,
}

/// Describes how `spec` will run (emulator, mode, CPU model), for a progress line.
pub fn describe(spec: &RunSpec) -> String {
    let cpus = if spec.cpus == 1 { "1 CPU".to_string() } else { format!("{} CPUs", spec.cpus) };
    match spec.emulator {
        Emulator::Bochs => {
            let model = spec.cpu_model.as_deref().unwrap_or(DEFAULT_CPU_MODEL);
            format!("Bochs {model}, {cpus}, {} MiB", spec.megs)
        }
        Emulator::Qemu => format!("QEMU {}, {cpus}, {} MiB", qemu::Acceleration::detect().describe(), spec.megs),
    }
}

/// Runs `spec`, handing every serial line to `on_line` as it arrives.
pub fn run(spec: &RunSpec, mut on_line: impl FnMut(&str)) -> Result<RunResult> {
    prepare_dir(&spec.dir)?;
    let Launch { mut command, serial, console, log } = match spec.emulator {
        Emulator::Bochs => bochs::launch(spec)?,
        Emulator::Qemu => qemu::launch(spec)?,
    };
    let console_file = File::create(&console).with_context(|| format!("cannot create {}", console.display()))?;
    let console_err = console_file.try_clone().context("cannot duplicate the console file handle")?;
    command.current_dir(&spec.dir).stdin(Stdio::null()).stdout(console_file).stderr(console_err);
    std::fs::write(spec.dir.join("command.txt"), tools::describe(&command) + "\n")
        .context("cannot write command.txt")?;

    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {} (is `cargo xtask setup` done?)", tools::describe(&command)))?;
    let gdb = match (spec.gdb_port, &spec.gdb_client) {
        (Some(port), Some(client)) => match crate::gdb::start(port, client, &spec.dir) {
            Ok(gdb) => Some(gdb),
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err);
            }
        },
        _ => None,
    };
    let mut tail = LogTail::new(serial.clone());
    let outcome = follow(&mut child, &mut tail, spec.timeout, &mut on_line);
    // Whatever happened, the emulator must not outlive the run.
    if !matches!(child.try_wait(), Ok(Some(_))) {
        let _ = child.kill();
        let _ = child.wait();
    }
    let gdb_output = gdb.map(|gdb| crate::gdb::finish(gdb, &spec.dir));
    let ending = outcome?;
    for line in tail.finish() {
        on_line(&line);
    }
    let elapsed = started.elapsed();
    let mut emulator_notes = Vec::new();
    if ending != Ending::Shutdown {
        emulator_notes = match spec.emulator {
            Emulator::Bochs => bochs::notes(log.as_deref(), &console),
            Emulator::Qemu => qemu::notes(&console),
        };
    }
    Ok(RunResult { ending, elapsed, serial: tail.text().to_string(), serial_path: serial, emulator_notes, gdb_output })
}

/// Polls the serial log and the emulator until the run ends.
fn follow(child: &mut Child, tail: &mut LogTail, timeout: Duration, on_line: &mut impl FnMut(&str)) -> Result<Ending> {
    let started = Instant::now();
    let mut shutdown_at: Option<Instant> = None;
    loop {
        for line in tail.poll() {
            on_line(&line);
            if shutdown_at.is_none() && line.contains(SHUTDOWN_MARKER) {
                shutdown_at = Some(Instant::now());
            }
        }
        if let Some(status) = child.try_wait().context("cannot check on the emulator process")? {
            // Lines written just before the exit are read by the caller's `finish`.
            let rest = tail.poll();
            let saw_shutdown = shutdown_at.is_some() || rest.iter().any(|line| line.contains(SHUTDOWN_MARKER));
            for line in rest {
                on_line(&line);
            }
            return Ok(if saw_shutdown { Ending::Shutdown } else { Ending::Exited(status) });
        }
        if let Some(at) = shutdown_at {
            if at.elapsed() >= SHUTDOWN_GRACE {
                return Ok(Ending::Shutdown);
            }
        } else if started.elapsed() >= timeout {
            return Ok(Ending::TimedOut);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Empties (or creates) the run directory, so no file of an earlier run is mistaken for
/// this one's.
fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot empty the run directory {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the run directory {}", dir.display()))
}
