//! The emulator scenario file, tests/emulator.toml (its format: tests/README.md): each
//! scenario is one boot with its machine, image, command line and the checks its serial
//! log must pass.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::checks;
use crate::cli::{Emulator, MAX_CPUS, MAX_MEGS, MIN_MEGS};
use crate::emulator;
use crate::image::{self, ImageKind};

/// The word a module command line may hold for the seed (`--seed`, else [`DEFAULT_SEED`]).
pub const SEED_PLACEHOLDER: &str = "{seed}";
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
    /// A gdb command file (relative to the workspace root) run in batch mode against the
    /// guest whose module line says `gdb`, over COM2 (docs/gdb.md).
    #[serde(default)]
    pub gdb: Option<PathBuf>,
    /// Substrings that must each appear in gdb's output.
    #[serde(default)]
    pub gdb_expect: Vec<String>,
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

/// Reads and checks the scenario file.
pub fn load(path: &Path) -> Result<Vec<Scenario>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).with_context(|| format!("in {} (format: tests/README.md)", path.display()))
}

fn parse(text: &str) -> Result<Vec<Scenario>> {
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
    Ok(file.scenario)
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
        if let Err(why) = image::check_cmdline(&self.cmdline) {
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
        problems
    }

    /// Writes `seed` for every `{seed}` in the module command lines (how a fuzzing guest's
    /// seed is chosen from the command line: `cargo xtask test --seed N`).
    pub fn set_seed(&mut self, seed: u64) {
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
        let scenarios = parse("[[scenario]]\nname = \"boot\"\n").expect("valid");
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
        let message = format!("{:#}", parse(text).unwrap_err());
        assert!(message.contains("cpus = 40: write 1 to 16"), "{message}");
        assert!(message.contains("no check 'nope'; known: memmap"), "{message}");
        assert!(message.contains("image = \\\"test\\\"") || message.contains("image = \"test\""), "{message}");
        assert!(message.contains("used twice"), "{message}");
    }

    #[test]
    fn the_seed_reaches_module_command_lines() {
        let text = "[[scenario]]\nname = \"f\"\nmodules = [{ package = \"p\", cmdline = \"f -- fuzz {seed} 10\" }]\n";
        let mut scenario = parse(text).expect("valid").remove(0);
        scenario.set_seed(77);
        assert_eq!(scenario.modules[0].cmdline.as_deref(), Some("f -- fuzz 77 10"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let message = format!("{:#}", parse("[[scenario]]\nname = \"a\"\nexpects = []\n").unwrap_err());
        assert!(message.contains("expects"), "{message}");
    }

    #[test]
    fn the_project_scenario_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/emulator.toml");
        let scenarios = load(&path).expect("tests/emulator.toml parses and validates");
        assert!(!scenarios.is_empty());
    }
}
