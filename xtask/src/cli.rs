//! The command line: subcommands, their flags and the checks on flag values, each with a
//! message that says what to write instead.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The highest CPU count a run may ask for (the hypervisor's per-CPU tables and the
/// emulators' practical limit on this project's machines).
pub const MAX_CPUS: u32 = 16;
/// The smallest and largest guest RAM, in MiB, a run may ask for.
pub const MIN_MEGS: u32 = 16;
pub const MAX_MEGS: u32 = 2048;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, boot, test and benchmark the null-Kernel hypervisor",
    after_help = "Start with `cargo xtask run` (boots in Bochs) or `cargo xtask test` (all tests)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Installs the Debian packages and the Rust target this machine lacks (idempotent).
    Setup,
    /// Builds the hypervisor ELF and a bootable GRUB ISO under target/images/.
    Build(BuildArgs),
    /// Boots the hypervisor in an emulator and streams its serial console.
    Run(RunArgs),
    /// Runs the host unit tests and every emulator scenario; ends with `N passed, M failed`.
    Test(TestArgs),
    /// Runs a benchmark by name (without a name: lists them).
    Bench(BenchArgs),
    /// Creates a new abstract machine crate under am/ that builds and has a passing test.
    NewAm(NewAmArgs),
}

#[derive(Debug, Args)]
pub struct NewAmArgs {
    /// The AM's name: lowercase letters, digits and '-', starting with a letter (e.g. `disk`).
    #[arg(value_parser = parse_am_name)]
    pub name: String,
}

fn parse_am_name(text: &str) -> Result<String, String> {
    let ok = text.len() <= 24
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(text.to_string())
    } else {
        Err(format!("'{text}' is not an AM name: write lowercase letters, digits and '-', starting with a letter, at most 24 characters (e.g. disk or nvram-log)"))
    }
}

/// Which cargo profile the hypervisor is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// Profile flags shared by `build` and `run`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Optimised build (the default).
    #[arg(long, conflicts_with = "debug")]
    pub release: bool,
    /// Unoptimised build with debug assertions.
    #[arg(long)]
    pub debug: bool,
}

impl ProfileArgs {
    pub fn profile(&self) -> Profile {
        if self.debug {
            Profile::Debug
        } else {
            Profile::Release
        }
    }
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Builds the test image (feature `test-harness`: in-emulator test cases).
    #[arg(long)]
    pub test_harness: bool,
    /// The hypervisor command line baked into the ISO's grub.cfg.
    #[arg(long, default_value = "", value_parser = parse_cmdline)]
    pub cmdline: String,
}

/// The emulators xtask can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Emulator {
    /// Bochs: emulates VT-x with EPT, the project's test platform.
    Bochs,
    /// QEMU: with KVM on an Intel host it has nested VT-x; without KVM (TCG) it has no VMX.
    Qemu,
}

impl Emulator {
    pub fn name(self) -> &'static str {
        match self {
            Emulator::Bochs => "bochs",
            Emulator::Qemu => "qemu",
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// The emulator to boot in.
    #[arg(long, value_enum, default_value = "bochs")]
    pub emu: Emulator,
    /// Number of CPUs, 1 to 16 (Bochs: at most 15).
    #[arg(long, default_value = "2", value_name = "N", value_parser = parse_cpus)]
    pub cpus: u32,
    /// CPU model: a Bochs model (default corei7_skylake_x), or for QEMU a `-cpu` value.
    #[arg(long, value_name = "MODEL")]
    pub cpu_model: Option<String>,
    /// Machine RAM in MiB, 16 to 2048.
    #[arg(long, default_value = "64", value_name = "N", value_parser = parse_megs)]
    pub megs: u32,
    /// The hypervisor command line, e.g. "log=debug cpus=2".
    #[arg(long, default_value = "", value_parser = parse_cmdline)]
    pub cmdline: String,
    /// Seconds before the run is stopped.
    #[arg(long, default_value = "60", value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: u64,
    /// Boots the test image (in-emulator test cases, selected with --cmdline test=...).
    #[arg(long)]
    pub test_harness: bool,
    /// Boots the hypervisor without its default guests.
    #[arg(long)]
    pub no_guests: bool,
    /// Also boots Debian's Linux (fetched by `cargo xtask setup`) in a VM on CPU 0, with the
    /// layer-bypass demo and a durable virtio disk (an NVRAM disk of at least 8 MiB).
    #[arg(long)]
    pub linux: bool,
    /// Adds a guest: any image the hypervisor boots (a 64-bit ELF guest, a Linux bzImage,
    /// a Multiboot v1/v2 kernel) with its module line (default: the file's name);
    /// repeatable; beside the default guests, or instead of them with --no-guests.
    #[arg(long, value_name = "PATH[:MODULE-LINE]", value_parser = crate::guest_arg::parse)]
    pub guest: Vec<crate::guest_arg::GuestArg>,
    /// Starts with a zeroed NVRAM disk (target/nvram/run.img) instead of the one kept from
    /// the last run.
    #[arg(long, conflicts_with = "no_nvram")]
    pub fresh_nvram: bool,
    /// The NVRAM disk's durable area in MiB (the hypervisor mirrors it in RAM); a size
    /// other than the kept image's makes a new image.
    #[arg(long, default_value_t = crate::nvram_disk::DEFAULT_MIB, value_name = "MIB", value_parser = parse_nvram_mib)]
    pub nvram_mib: u32,
    /// Boots without an NVRAM disk (the hypervisor then has no durable device).
    #[arg(long)]
    pub no_nvram: bool,
    /// QEMU only: gives the machine an NVDIMM of MIB MiB (persistent memory in the NFIT),
    /// backed by target/nvram/run.pmem, kept across runs (a size other than the kept
    /// file's, or --fresh-nvram, makes a new, zeroed one). The hypervisor then uses it as
    /// the NVRAM device instead of the disk.
    #[arg(long, value_name = "MIB", value_parser = parse_nvram_mib)]
    pub pmem_mib: Option<u32>,
    /// Debugs the guest named VM (its module name, e.g. checks) with gdb over COM2: the
    /// emulator waits for gdb on localhost:PORT (--gdb-port) before it boots, and the
    /// guest starts stopped (docs/gdb.md).
    #[arg(long, value_name = "VM")]
    pub gdb: Option<String>,
    /// The local TCP port of --gdb's COM2.
    #[arg(long, value_name = "PORT", default_value_t = crate::gdb::DEFAULT_PORT)]
    pub gdb_port: u16,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Runs only the tests whose names contain STR (host test names and scenario names).
    #[arg(long, value_name = "STR")]
    pub filter: Option<String>,
    /// Emulator runs at the same time (default: the number of cores).
    #[arg(long, value_name = "N", value_parser = parse_jobs)]
    pub jobs: Option<usize>,
    /// Another scenario file instead of tests/emulator.toml.
    #[arg(long, value_name = "FILE")]
    pub scenarios: Option<std::path::PathBuf>,
    /// Skips the host unit tests (only the emulator scenarios run).
    #[arg(long)]
    pub skip_host: bool,
    /// The number `{seed}` stands for in module command lines (a fuzzer's seed; default
    /// 1), or `random` (printed, so the run can be replayed).
    #[arg(long, value_name = "N|random")]
    pub seed: Option<String>,
    /// Runs the full sweeps (`sweep_long` of a scenario, e.g. every NVRAM crash point)
    /// instead of the sampled ones.
    #[arg(long)]
    pub long: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The benchmark to run (omit it to list them).
    pub name: Option<String>,
}

fn parse_number<T: std::str::FromStr>(text: &str, what: &str, example: &str) -> Result<T, String> {
    text.trim().parse().map_err(|_| format!("'{text}' is not a number; {what}, e.g. {example}"))
}

fn parse_cpus(text: &str) -> Result<u32, String> {
    let cpus: u32 = parse_number(text, "write a CPU count from 1 to 16", "--cpus 4")?;
    if (1..=MAX_CPUS).contains(&cpus) {
        Ok(cpus)
    } else {
        Err(format!("{cpus} CPUs is out of range; write a count from 1 to {MAX_CPUS}, e.g. --cpus 4"))
    }
}

fn parse_megs(text: &str) -> Result<u32, String> {
    let megs: u32 = parse_number(text, "write the RAM size in MiB", "--megs 128")?;
    if (MIN_MEGS..=MAX_MEGS).contains(&megs) {
        Ok(megs)
    } else {
        Err(format!("{megs} MiB is out of range; write {MIN_MEGS} to {MAX_MEGS}, e.g. --megs 128"))
    }
}

fn parse_timeout(text: &str) -> Result<u64, String> {
    let secs: u64 = parse_number(text, "write whole seconds", "--timeout 120")?;
    if secs == 0 {
        Err("a timeout of 0 s stops the run at once; write at least 1, e.g. --timeout 120".into())
    } else {
        Ok(secs)
    }
}

fn parse_nvram_mib(text: &str) -> Result<u32, String> {
    let max = crate::nvram_disk::MAX_MIB;
    let mib: u32 = parse_number(text, "write the NVRAM size in MiB", "--nvram-mib 16")?;
    if (1..=max).contains(&mib) {
        Ok(mib)
    } else {
        Err(format!("{mib} MiB of NVRAM is out of range; write 1 to {max}, e.g. --nvram-mib 16"))
    }
}

fn parse_jobs(text: &str) -> Result<usize, String> {
    let jobs: usize = parse_number(text, "write how many emulators may run at once", "--jobs 2")?;
    if jobs == 0 {
        Err("0 jobs would run nothing; write at least 1, e.g. --jobs 2".into())
    } else {
        Ok(jobs)
    }
}

fn parse_cmdline(text: &str) -> Result<String, String> {
    crate::image::check_cmdline(text)?;
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_range_is_checked_with_advice() {
        assert_eq!(parse_cpus("4"), Ok(4));
        assert!(parse_cpus("0").unwrap_err().contains("1 to 16"));
        assert!(parse_cpus("17").unwrap_err().contains("--cpus 4"));
        assert!(parse_cpus("many").unwrap_err().contains("not a number"));
    }

    #[test]
    fn cli_parses_a_full_run_line() {
        let cli = Cli::try_parse_from([
            "xtask",
            "run",
            "--emu",
            "qemu",
            "--cpus",
            "2",
            "--megs",
            "128",
            "--cmdline",
            "log=debug",
            "--timeout",
            "5",
        ])
        .expect("valid command line");
        let Command::Run(run) = cli.command else { panic!("expected run") };
        assert_eq!(run.emu, Emulator::Qemu);
        assert_eq!((run.cpus, run.megs, run.timeout), (2, 128, 5));
        assert_eq!(run.cmdline, "log=debug");
    }

    #[test]
    fn unknown_emulator_is_rejected() {
        assert!(Cli::try_parse_from(["xtask", "run", "--emu", "vmware"]).is_err());
    }
}
