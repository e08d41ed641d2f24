//! The end of `cargo xtask test`: every failure with its reason and the end of its serial
//! log, then the totals and the closing line `N passed, M failed`.

use std::time::Duration;

use crate::checks::Verdict;
use crate::emulator::RunResult;
use crate::host::HostTests;
use crate::scenario::Scenario;
use crate::tools;
use crate::workspace::Workspace;

/// How many serial lines a failure report shows.
const SERIAL_TAIL_LINES: usize = 25;

/// What one scenario came to.
#[derive(Debug)]
pub struct ScenarioOutcome {
    pub scenario: Scenario,
    /// The run, when the emulator could be started at all.
    pub run: Option<RunResult>,
    pub verdict: Verdict,
}

impl ScenarioOutcome {
    /// A scenario that failed before its emulator ran, for `problem`.
    pub fn not_run(scenario: Scenario, problem: String) -> Self {
        ScenarioOutcome { scenario, run: None, verdict: Verdict { problems: vec![problem], cases: Vec::new() } }
    }

    pub fn passed(&self) -> bool {
        self.verdict.problems.is_empty() && self.verdict.cases.iter().all(|case| case.failure.is_none())
    }

    /// (passed, failed), counting the scenario's own checks as one test and each
    /// in-emulator case as one more.
    pub fn counts(&self) -> (usize, usize) {
        let cases_failed = self.verdict.cases.iter().filter(|case| case.failure.is_some()).count();
        let cases_passed = self.verdict.cases.len() - cases_failed;
        let own = usize::from(self.verdict.problems.is_empty());
        (cases_passed + own, cases_failed + 1 - own)
    }

    /// The progress line's tail: how it ended and what it showed.
    pub fn summary(&self) -> String {
        let elapsed = self.run.as_ref().map_or_else(String::new, |run| format!(" in {}", tools::secs(run.elapsed)));
        let cases = &self.verdict.cases;
        let failed_cases = cases.iter().filter(|case| case.failure.is_some()).count();
        let cases_text = match (cases.len(), failed_cases) {
            (0, _) => String::new(),
            (n, 0) => format!(", {n} in-emulator cases ok"),
            (n, f) => format!(", {f} of {n} in-emulator cases FAILED"),
        };
        let problem = self.verdict.problems.first().map_or_else(String::new, |first| format!(": {first}"));
        format!("{} ({}){elapsed}{cases_text}{problem}", self.scenario.name, self.scenario.emulator.name())
    }
}

/// Prints the failures and the totals; returns (passed, failed) overall.
pub fn print(
    workspace: &Workspace,
    host: Option<&HostTests>,
    outcomes: &[ScenarioOutcome],
    total: Duration,
) -> (usize, usize) {
    if let Some(host) = host.filter(|host| host.failed > 0) {
        println!();
        println!("xtask: ---- host tests: {} failed ----", host.failed);
        for failure in &host.failures {
            println!("  - {failure}");
        }
        println!("  end of cargo's output (all of it in {}):", workspace.display(&host.log_path));
        for line in host.tail.lines() {
            println!("    | {line}");
        }
    }
    for outcome in outcomes.iter().filter(|outcome| !outcome.passed()) {
        print_failure(workspace, outcome);
    }

    let (host_passed, host_failed) = host.map_or((0, 0), |host| (host.passed, host.failed));
    let (emu_passed, emu_failed) =
        outcomes.iter().map(ScenarioOutcome::counts).fold((0, 0), |(p, f), (dp, df)| (p + dp, f + df));
    let scenarios_failed = outcomes.iter().filter(|outcome| !outcome.passed()).count();
    println!();
    if host.is_some() {
        println!("xtask: test: host tests: {host_passed} passed, {host_failed} failed");
    }
    println!(
        "xtask: test: emulator: {} scenarios ({} failed), counting each scenario and each in-emulator case: \
         {emu_passed} passed, {emu_failed} failed",
        outcomes.len(),
        scenarios_failed
    );
    print_sweeps(outcomes);
    println!("xtask: test: finished in {}", tools::secs(total));
    let passed = host_passed + emu_passed;
    let failed = host_failed + emu_failed;
    println!("{passed} passed, {failed} failed");
    (passed, failed)
}

/// One line per sweep (crash sweeps: `nvram-crash-after={k}`): how many of its points ran
/// and how many recovered (passed), naming the values that failed.
fn print_sweeps(outcomes: &[ScenarioOutcome]) {
    let mut sweeps: Vec<(&str, usize, Vec<&str>)> = Vec::new();
    for outcome in outcomes {
        let Some(sweep) = outcome.scenario.sweep_of.as_deref() else { continue };
        let index = match sweeps.iter().position(|(name, _, _)| *name == sweep) {
            Some(index) => index,
            None => {
                sweeps.push((sweep, 0, Vec::new()));
                sweeps.len() - 1
            }
        };
        let entry = &mut sweeps[index];
        entry.1 += 1;
        if !outcome.passed() {
            let value = outcome.scenario.name.strip_prefix(sweep).unwrap_or(&outcome.scenario.name);
            entry.2.push(value.trim_start_matches("-k"));
        }
    }
    for (name, tried, failed) in sweeps {
        let recovered = tried - failed.len();
        let failures =
            if failed.is_empty() { String::new() } else { format!(" (failed at k = {})", failed.join(", ")) };
        let all = if failed.is_empty() { ": all recovered" } else { "" };
        println!("xtask: test: sweep {name}: {tried} points tried, {recovered} recovered{all}{failures}");
    }
}

fn print_failure(workspace: &Workspace, outcome: &ScenarioOutcome) {
    let scenario = &outcome.scenario;
    println!();
    println!("xtask: ---- FAILED: {} ----", outcome.summary());
    for problem in &outcome.verdict.problems {
        let mut lines = problem.lines();
        if let Some(first) = lines.next() {
            println!("  - {first}");
        }
        for line in lines {
            println!("    {line}");
        }
    }
    for case in &outcome.verdict.cases {
        if let Some(reason) = &case.failure {
            println!("  - case {}/{} FAILED: {reason}", scenario.name, case.name);
        }
    }
    let Some(run) = &outcome.run else { return };
    for note in &run.emulator_notes {
        println!("  emulator: {note}");
    }
    let shown = tools::last_lines(&run.serial, SERIAL_TAIL_LINES);
    let total_lines = run.serial.lines().count();
    if total_lines == 0 {
        println!("  the serial log {} is empty", workspace.display(&run.serial_path));
        return;
    }
    println!("  last {} of {total_lines} lines of {}:", shown.lines().count(), workspace.display(&run.serial_path));
    for line in shown.lines() {
        println!("    | {line}");
    }
}
