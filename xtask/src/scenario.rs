//! The emulator scenario file, tests/emulator.toml (its format: tests/README.md): each
//! scenario is one boot with its machine, image, command line and the checks its serial
//! log must pass, or a sequence of boots (`[[scenario.boot]]`) on the same NVRAM disk,
//! each with its own command line and checks. A scenario with `sweep` expands into one
//! scenario per value of `{k}` (crash sweeps: `nvram-crash-after={k}`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::checks;
use crate::cli::{Emulator, MAX_CPUS, MAX_MEGS, MIN_MEGS};
use crate::emulator;
use crate::image::{self, ImageKind};

/// The word a module command line may hold for the seed (`--seed`, else [`DEFAULT_SEED`]).
pub const SEED_PLACEHOLDER: &str = "{seed}";
/// The word a sweeping scenario's command lines and expectations hold for the swept value.
pub const SWEEP_PLACEHOLDER: &str = "{k}";
/// The seed `{seed}` stands for without `--seed`: runs stay reproducible.
pub const DEFAULT_SEED: u64 = 1;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    #[serde(default)]
    scenario: Vec<Scenario>,
}

/// One emulator run and what its serial log must show.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default = "default_emulator")]
    pub emulator: Emulator,
    #[serde(default = "default_image")]
    pub image: ImageKind,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_megs")]
    pub megs: u32,
    /// A Bochs CPU model, or a QEMU `-cpu` value.
    #[serde(default)]
    pub cpu_model: Option<String>,
    #[serde(default)]
    pub cmdline: String,
    /// Seconds before the run is stopped and failed.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// Multiboot2 modules loaded beside the hypervisor.
    #[serde(default)]
    pub modules: Vec<ModuleSpec>,
    /// The NKTEST protocol must run to `NKTEST end` with every case `ok`.
    #[serde(default)]
    pub nktest: bool,
    /// How many guests must finish their GTEST checks (`GTEST done`); every `GTEST ok` or
    /// `GTEST FAILED` line of a guest counts as a case.
    #[serde(default)]
    pub gtest: u32,
    /// Substrings that must each appear in the serial log.
    #[serde(default)]
    pub expect: Vec<String>,
    /// Substrings that must not appear anywhere in the serial log.
    #[serde(default)]
    pub forbid: Vec<String>,
    /// Named checks implemented in xtask (checks.rs), e.g. `memmap`.
    #[serde(default)]
    pub checks: Vec<String>,
    /// Bochs's emulated instructions per second (default 1,000,000).
    #[serde(default)]
    pub ips: Option<u32>,
    /// The log must end with `nk: shutdown` (set false for runs meant to die otherwise).
    #[serde(default = "default_true")]
    pub shutdown: bool,
    /// Attaches a fresh NVRAM disk with a durable area of this many MiB (zeroed before the
    /// scenario's first boot, kept across its boots).
    #[serde(default)]
    pub nvram_mib: Option<u32>,
    /// QEMU only: an NVDIMM of this many MiB (persistent memory in the firmware's NFIT),
    /// backed by a file made fresh (zeroed) before the scenario's first boot and kept
    /// across its boots.
    #[serde(default)]
    pub pmem_mib: Option<u32>,
    /// Boots in order on the same machine and NVRAM disk, each with its own command line
    /// and checks (the scenario's own `expect` and `forbid` apply to every boot).
    #[serde(default)]
    pub boot: Vec<BootSpec>,
    /// Values of `{k}`: the scenario runs once per value, named `<name>-k<value>`
    /// (`"1,2,5-9"`); `cargo xtask test --long` uses `sweep_long` instead when given.
    #[serde(default)]
    pub sweep: Option<String>,
    /// The full sweep of `cargo xtask test --long`.
    #[serde(default)]
    pub sweep_long: Option<String>,
    /// For one value of a sweep: the sweeping scenario's name (the report counts the
    /// crash points tried per sweep).
    #[serde(skip)]
    pub sweep_of: Option<String>,
    /// The run's seed (`--seed`), set by [`Scenario::set_seed`].
    #[serde(skip)]
    pub seed: u64,
    /// For one boot of [`Scenario::boots`]: the emulator is killed from outside this many
    /// milliseconds after it started (a power cut at an arbitrary moment).
    #[serde(skip)]
    pub kill_at_ms: Option<u64>,
    /// A gdb command file (relative to the workspace root) run in batch mode against the
    /// guest whose module line says `gdb`, over COM2 (docs/gdb.md).
    #[serde(default)]
    pub gdb: Option<PathBuf>,
    /// Substrings that must each appear in gdb's output.
    #[serde(default)]
    pub gdb_expect: Vec<String>,
}

/// One boot of a multi-boot scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub expect: Vec<String>,
    #[serde(default)]
    pub forbid: Vec<String>,
    #[serde(default)]
    pub nktest: bool,
    #[serde(default = "default_true")]
    pub shutdown: bool,
    /// How many guests must finish their GTEST checks in this boot (a boot cut by a
    /// power cut may finish none).
    #[serde(default)]
    pub gtest: u32,
    /// Named checks (checks.rs) for this boot, besides the scenario's; they see the
    /// previous boot's log too (e.g. `nvram-versions`).
    #[serde(default)]
    pub checks: Vec<String>,
    /// Before this boot, xtask flips every bit of this byte of the NVRAM disk's durable
    /// area (an offset from the area's start): metadata corrupted between boots.
    #[serde(default)]
    pub flip_byte: Option<u64>,
    /// `[low, high]`: kill the emulator from outside at a moment drawn from this range of
    /// milliseconds after its start (from the run's seed, so `--seed` replays it); the boot
    /// then need not reach `nk: shutdown`, and its `expect` applies to what it printed.
    #[serde(default)]
    pub kill_after_ms: Option<[u64; 2]>,
}

/// A Multiboot2 module: a bare-metal package of the workspace, built for the same target,
/// or a file relative to the workspace root.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSpec {
    pub package: Option<String>,
    pub file: Option<PathBuf>,
    /// The module's string; defaults to the package or file name.
    pub cmdline: Option<String>,
}

fn default_emulator() -> Emulator {
    Emulator::Bochs
}
fn default_image() -> ImageKind {
    ImageKind::Normal
}
fn default_cpus() -> u32 {
    1
}
fn default_megs() -> u32 {
    64
}
fn default_timeout() -> u64 {
    120
}
fn default_true() -> bool {
    true
}

/// Reads and checks the scenario file; sweeping scenarios are expanded, over `sweep_long`
/// when `long`.
pub fn load(path: &Path, long: bool) -> Result<Vec<Scenario>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text, long).with_context(|| format!("in {} (format: tests/README.md)", path.display()))
}

fn parse(text: &str, long: bool) -> Result<Vec<Scenario>> {
    let file: ScenarioFile = toml::from_str(text).map_err(|err| anyhow::anyhow!("{err}"))?;
    let mut problems = Vec::new();
    for (index, scenario) in file.scenario.iter().enumerate() {
        if file.scenario[..index].iter().any(|earlier| earlier.name == scenario.name) {
            problems.push(format!("scenario name '{}' is used twice; names must be unique", scenario.name));
        }
        problems.extend(scenario.problems().into_iter().map(|p| format!("scenario '{}': {p}", scenario.name)));
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    let mut scenarios = Vec::new();
    for scenario in file.scenario {
        let sweep =
            if long { scenario.sweep_long.as_ref().or(scenario.sweep.as_ref()) } else { scenario.sweep.as_ref() };
        match sweep {
            None => scenarios.push(scenario),
            Some(values) => {
                let values =
                    parse_sweep(values).map_err(|why| anyhow::anyhow!("scenario '{}': {why}", scenario.name))?;
                scenarios.extend(values.into_iter().map(|k| scenario.with_sweep_value(k)));
            }
        }
    }
    Ok(scenarios)
}

/// SplitMix64's finaliser: spreads a seed's bits (the kill moment of a boot).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a of a name: a stable number per scenario.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01B3))
}

/// Reads a sweep, `"1,2,5-9"`: numbers and inclusive ranges, at most 10,000 values.
fn parse_sweep(text: &str) -> Result<Vec<u64>, String> {
    let advice = "write numbers and ranges separated by commas, e.g. sweep = \"1,2,5-9\"";
    let mut values = Vec::new();
    for item in text.split(',').map(str::trim) {
        let number = |s: &str| s.trim().parse::<u64>().map_err(|_| format!("sweep item '{item}': {advice}"));
        let (first, last) = match item.split_once('-') {
            Some((first, last)) => (number(first)?, number(last)?),
            None => (number(item)?, number(item)?),
        };
        if first > last || last - first >= 10_000 || values.len() as u64 + (last - first) >= 10_000 {
            return Err(format!("sweep item '{item}': a range low-high of at most 10000 values; {advice}"));
        }
        values.extend(first..=last);
    }
    Ok(values)
}

impl Scenario {
    /// Everything wrong with this scenario, each with what to write instead.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            problems.push("name: use letters, digits, '-' and '_' only (it names the run directory)".into());
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            problems.push(format!("cpus = {}: write 1 to {MAX_CPUS}", self.cpus));
        }
        if !(MIN_MEGS..=MAX_MEGS).contains(&self.megs) {
            problems.push(format!("megs = {}: write {MIN_MEGS} to {MAX_MEGS}", self.megs));
        }
        if self.timeout == 0 {
            problems.push("timeout = 0: write the seconds the run may take, e.g. 120".into());
        }
        if let Err(why) = image::check_cmdline(&self.cmdline.replace(SWEEP_PLACEHOLDER, "1")) {
            problems.push(format!("cmdline: {why}"));
        }
        if self.emulator == Emulator::Bochs {
            if let Some(Err(why)) = self.cpu_model.as_deref().map(emulator::check_cpu_model) {
                problems.push(format!("cpu_model: {why}"));
            }
            if let Err(why) = emulator::check_bochs_cpus(self.cpus) {
                problems.push(format!("cpus: {why}"));
            }
        }
        for check in &self.checks {
            if !checks::is_host_check(check) {
                problems.push(format!("checks: no check '{check}'; known: {}", checks::host_check_names().join(", ")));
            }
        }
        if self.expect.iter().chain(&self.forbid).any(|text| text.is_empty()) {
            problems.push("expect/forbid: an empty string matches everything; remove it".into());
        }
        if self.nktest && self.image != ImageKind::Test {
            problems.push("nktest = true needs image = \"test\" (the normal image has no test cases)".into());
        }
        let debugged = self.modules.iter().filter(|m| m.cmdline.as_deref().is_some_and(crate::gdb::has_flag)).count();
        if self.gdb.is_some() && (debugged == 0 || self.modules.iter().any(|m| m.package.is_none())) {
            problems.push(
                "gdb: a module (a package; the first if several) says gdb on its module line, e.g. \"g cpu=0 gdb -- debuggee\""
                    .into(),
            );
        }
        if self.gdb.is_none() && !self.gdb_expect.is_empty() {
            problems.push("gdb_expect needs gdb = \"<script>\"".into());
        }
        for module in &self.modules {
            if module.package.is_some() == module.file.is_some() {
                problems.push("modules: give each module either package = \"...\" or file = \"...\"".into());
            }
        }
        if let Some(mib) = self.nvram_mib {
            if !(1..=crate::nvram_disk::MAX_MIB).contains(&mib) {
                problems.push(format!("nvram_mib = {mib}: write 1 to {}", crate::nvram_disk::MAX_MIB));
            }
        }
        if let Some(mib) = self.pmem_mib {
            if !(1..=crate::pmem_file::MAX_MIB).contains(&mib) {
                problems.push(format!("pmem_mib = {mib}: write 1 to {}", crate::pmem_file::MAX_MIB));
            }
            if self.emulator != crate::emulator::Emulator::Qemu {
                problems.push(
                    "pmem_mib needs emulator = \"qemu\" (Bochs has no NVDIMM; use memmap= on the command line)".into(),
                );
            }
        }
        if !self.boot.is_empty() && (!self.cmdline.is_empty() || self.nktest || self.gtest > 0 || !self.shutdown) {
            problems.push("with [[scenario.boot]], put cmdline, nktest, gtest and shutdown in each boot".into());
        }
        for (index, boot) in self.boot.iter().enumerate() {
            if let Err(why) = image::check_cmdline(&boot.cmdline.replace(SWEEP_PLACEHOLDER, "1")) {
                problems.push(format!("boot {}: cmdline: {why}", index + 1));
            }
            if boot.flip_byte.is_some() && self.nvram_mib.is_none() {
                problems.push(format!("boot {}: flip_byte needs nvram_mib (a disk to corrupt)", index + 1));
            }
            for check in &boot.checks {
                if !checks::is_host_check(check) {
                    problems.push(format!(
                        "boot {}: checks: no check '{check}'; known: {}",
                        index + 1,
                        checks::host_check_names().join(", ")
                    ));
                }
            }
            if boot.nktest && self.image != ImageKind::Test {
                problems.push(format!("boot {}: nktest = true needs image = \"test\"", index + 1));
            }
            if boot.kill_after_ms.is_some_and(|[low, high]| low > high || high > 3_600_000) {
                problems.push(format!("boot {}: kill_after_ms = [low, high]: low <= high <= 3600000", index + 1));
            }
            if boot.expect.iter().chain(&boot.forbid).any(|text| text.is_empty()) {
                problems.push(format!("boot {}: expect/forbid: an empty string matches everything", index + 1));
            }
        }
        for sweep in [&self.sweep, &self.sweep_long].into_iter().flatten() {
            if let Err(why) = parse_sweep(sweep) {
                problems.push(why);
            }
        }
        if self.sweep.is_none() && self.sweep_long.is_some() {
            problems.push("sweep_long needs sweep (the sampled values of a normal run)".into());
        }
        problems
    }

    /// This scenario for one swept value: named `<name>-k<k>`, with `{k}` replaced.
    fn with_sweep_value(&self, k: u64) -> Scenario {
        let value = k.to_string();
        let fill = |text: &String| text.replace(SWEEP_PLACEHOLDER, &value);
        let mut scenario = self.clone();
        scenario.name = format!("{}-k{k}", self.name);
        scenario.cmdline = fill(&self.cmdline);
        scenario.expect = self.expect.iter().map(fill).collect();
        scenario.forbid = self.forbid.iter().map(fill).collect();
        for boot in &mut scenario.boot {
            boot.cmdline = fill(&boot.cmdline);
            boot.expect = boot.expect.iter().map(fill).collect();
            boot.forbid = boot.forbid.iter().map(fill).collect();
        }
        scenario.sweep = None;
        scenario.sweep_long = None;
        scenario.sweep_of = Some(self.name.clone());
        scenario
    }

    /// The boots to run: the `[[scenario.boot]]` list, or the scenario itself as one boot.
    pub fn boots(&self) -> Vec<Scenario> {
        if self.boot.is_empty() {
            return vec![self.clone()];
        }
        self.boot
            .iter()
            .enumerate()
            .map(|(index, boot)| {
                let kill_at_ms = boot.kill_after_ms.map(|[low, high]| {
                    let draw = mix(self.seed ^ mix(fnv1a(&self.name) ^ index as u64));
                    low + draw % (high - low + 1)
                });
                Scenario {
                    cmdline: boot.cmdline.clone(),
                    expect: self.expect.iter().chain(&boot.expect).cloned().collect(),
                    forbid: self.forbid.iter().chain(&boot.forbid).cloned().collect(),
                    nktest: boot.nktest,
                    gtest: boot.gtest,
                    checks: self.checks.iter().chain(&boot.checks).cloned().collect(),
                    shutdown: boot.shutdown && kill_at_ms.is_none(),
                    boot: Vec::new(),
                    kill_at_ms,
                    ..self.clone()
                }
            })
            .collect()
    }

    /// Writes `seed` for every `{seed}` in the module command lines (how a fuzzing guest's
    /// seed is chosen from the command line: `cargo xtask test --seed N`).
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
        for module in &mut self.modules {
            if let Some(cmdline) = &mut module.cmdline {
                *cmdline = cmdline.replace(SEED_PLACEHOLDER, &seed.to_string());
            }
        }
    }

    /// True when `filter` selects this scenario (a substring of its name).
    pub fn matches(&self, filter: Option<&str>) -> bool {
        filter.is_none_or(|text| self.name.contains(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_a_minimal_scenario() {
        let scenarios = parse("[[scenario]]\nname = \"boot\"\n", false).expect("valid");
        let boot = &scenarios[0];
        assert_eq!(
            (boot.emulator, boot.image, boot.cpus, boot.megs, boot.timeout),
            (Emulator::Bochs, ImageKind::Normal, 1, 64, 120)
        );
        assert!(boot.shutdown && !boot.nktest && boot.cmdline.is_empty());
    }

    #[test]
    fn mistakes_are_reported_with_advice() {
        let text = "[[scenario]]\nname = \"a\"\ncpus = 40\nchecks = [\"nope\"]\nnktest = true\n\
                    [[scenario]]\nname = \"a\"\n";
        let message = format!("{:#}", parse(text, false).unwrap_err());
        assert!(message.contains("cpus = 40: write 1 to 16"), "{message}");
        assert!(message.contains("no check 'nope'; known: memmap"), "{message}");
        assert!(message.contains("image = \\\"test\\\"") || message.contains("image = \"test\""), "{message}");
        assert!(message.contains("used twice"), "{message}");
    }

    #[test]
    fn the_seed_reaches_module_command_lines() {
        let text = "[[scenario]]\nname = \"f\"\nmodules = [{ package = \"p\", cmdline = \"f -- fuzz {seed} 10\" }]\n";
        let mut scenario = parse(text, false).expect("valid").remove(0);
        scenario.set_seed(77);
        assert_eq!(scenario.modules[0].cmdline.as_deref(), Some("f -- fuzz 77 10"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let message = format!("{:#}", parse("[[scenario]]\nname = \"a\"\nexpects = []\n", false).unwrap_err());
        assert!(message.contains("expects"), "{message}");
    }

    #[test]
    fn the_project_scenario_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/emulator.toml");
        let scenarios = load(&path, false).expect("tests/emulator.toml parses and validates");
        assert!(!scenarios.is_empty());
        let long = load(&path, true).expect("tests/emulator.toml parses and validates with --long");
        assert!(long.len() >= scenarios.len());
    }

    #[test]
    fn a_sweep_expands_into_one_scenario_per_value() {
        let text = "[[scenario]]\nname = \"crash\"\nimage = \"test\"\nnvram_mib = 1\nsweep = \"1,3-4\"\n\
                    sweep_long = \"1-6\"\n\
                    [[scenario.boot]]\ncmdline = \"nvram-crash-after={k}\"\nshutdown = false\n\
                    expect = [\"power cut after write {k}\"]\n\
                    [[scenario.boot]]\ncmdline = \"test=x\"\nnktest = true\n";
        let scenarios = parse(text, false).expect("valid");
        let names: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["crash-k1", "crash-k3", "crash-k4"]);
        let boots = scenarios[1].boots();
        assert_eq!(boots.len(), 2);
        assert_eq!((boots[0].cmdline.as_str(), boots[0].shutdown), ("nvram-crash-after=3", false));
        assert_eq!(boots[0].expect, ["power cut after write 3"]);
        assert!(boots[1].nktest && boots[1].shutdown && boots[1].nvram_mib == Some(1));
        assert_eq!(parse(text, true).expect("valid").len(), 6);
    }

    #[test]
    fn a_kill_moment_comes_from_the_seed_within_its_range() {
        let text = "[[scenario]]\nname = \"kill\"\n[[scenario.boot]]\nkill_after_ms = [1000, 2000]\n\
                    [[scenario.boot]]\n";
        let mut scenario = parse(text, false).expect("valid").remove(0);
        let moments: Vec<u64> = (1..20)
            .map(|seed| {
                scenario.set_seed(seed);
                let boots = scenario.boots();
                assert!(!boots[0].shutdown && boots[1].shutdown && boots[1].kill_at_ms.is_none());
                boots[0].kill_at_ms.expect("a kill moment")
            })
            .collect();
        assert!(moments.iter().all(|ms| (1000..=2000).contains(ms)), "{moments:?}");
        assert!(moments.windows(2).any(|pair| pair[0] != pair[1]), "the seed changes the moment");
        scenario.set_seed(5);
        assert_eq!(scenario.boots()[0].kill_at_ms, scenario.boots()[0].kill_at_ms, "one seed, one moment");
        let bad = "[[scenario]]\nname = \"k\"\n[[scenario.boot]]\nkill_after_ms = [2, 1]\n";
        assert!(format!("{:#}", parse(bad, false).unwrap_err()).contains("kill_after_ms"));
    }

    #[test]
    fn bad_sweeps_and_boots_are_reported() {
        let text = "[[scenario]]\nname = \"a\"\nsweep = \"3-1\"\ncmdline = \"x\"\nnvram_mib = 0\n\
                    [[scenario.boot]]\nnktest = true\n";
        let message = format!("{:#}", parse(text, false).unwrap_err());
        assert!(message.contains("sweep item '3-1'"), "{message}");
        assert!(message.contains("put cmdline, nktest, gtest and shutdown in each boot"), "{message}");
        assert!(message.contains("nvram_mib = 0"), "{message}");
        assert!(message.contains("boot 1: nktest = true needs image"), "{message}");
        assert_eq!(parse_sweep("1, 2,4-5"), Ok(vec![1, 2, 4, 5]));
        assert!(parse_sweep("x").is_err() && parse_sweep("1-20000").is_err());
    }
}
