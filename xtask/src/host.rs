//! The host unit tests: plain `cargo test` in the workspace root (its default members are
//! the crates that build on the host), counted from cargo's `test result:` lines.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::tools::{self, LogTail};
use crate::workspace::Workspace;

/// How often a long host test run says it is still going.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// The counted outcome of `cargo test`.
#[derive(Debug, Default)]
pub struct HostTests {
    pub passed: usize,
    pub failed: usize,
    /// Each failure: a test name, or a test binary that did not build or finish.
    pub failures: Vec<String>,
    /// The end of cargo's output, shown when something failed.
    pub tail: String,
    pub log_path: std::path::PathBuf,
    pub elapsed: Duration,
}

/// Runs `cargo test --no-fail-fast [-- FILTER]`, printing a line per test binary.
pub fn run(workspace: &Workspace, filter: Option<&str>) -> Result<HostTests> {
    let dir = workspace.runs();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("host-tests.log");
    let log = File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let log_err = log.try_clone().context("cannot duplicate the log file handle")?;
    let mut command = Command::new(workspace.cargo());
    command.current_dir(workspace.root()).args(["test", "--no-fail-fast"]);
    if let Some(filter) = filter {
        command.args(["--", filter]);
    }
    command.stdin(Stdio::null()).stdout(log).stderr(log_err);
    let shown = format!("cargo test --no-fail-fast{}", filter.map_or_else(String::new, |f| format!(" -- {f}")));
    println!("xtask: host: {shown} (log {})", workspace.display(&log_path));

    let started = Instant::now();
    let mut child = command.spawn().context("cannot start cargo test")?;
    let mut tail = LogTail::new(log_path.clone());
    let mut counter = Counter::default();
    let mut last_heartbeat = Instant::now();
    let status = loop {
        for line in tail.poll() {
            counter.line(&line);
        }
        if let Some(status) = child.try_wait().context("cannot check on cargo test")? {
            break status;
        }
        if last_heartbeat.elapsed() >= HEARTBEAT {
            last_heartbeat = Instant::now();
            println!("xtask: host: still running ({} s): {}", started.elapsed().as_secs(), counter.current_or_last());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for line in tail.finish() {
        counter.line(&line);
    }
    counter.end_binary();
    let mut result = HostTests {
        passed: counter.passed,
        failed: counter.failed,
        failures: counter.failures,
        tail: String::new(),
        log_path,
        elapsed: started.elapsed(),
    };
    if !status.success() && result.failed == 0 {
        // Cargo failed without a failing test: it did not build, or a binary crashed
        // before its summary.
        result.failed = 1;
        result.failures.push(format!("cargo test failed ({status}) without a failing test: a build error?"));
    }
    if result.failed > 0 {
        result.tail = tools::last_lines(tail.text(), 30);
    }
    println!("xtask: host: {} passed, {} failed in {}", result.passed, result.failed, tools::secs(result.elapsed));
    Ok(result)
}

/// Follows cargo test's output: `Running` / `Doc-tests` headers, `test NAME ... FAILED`
/// lines and `test result:` summaries.
#[derive(Debug, Default)]
struct Counter {
    passed: usize,
    failed: usize,
    failures: Vec<String>,
    /// The binary being run and whether it printed its summary yet.
    binary: Option<(String, bool)>,
    last: String,
}

impl Counter {
    fn line(&mut self, line: &str) {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("Running ") {
            self.start_binary(binary_name(rest));
        } else if let Some(krate) = trimmed.strip_prefix("Doc-tests ") {
            self.start_binary(format!("{krate} (doc tests)"));
        } else if let Some(summary) = trimmed.strip_prefix("test result: ") {
            let (passed, failed) = parse_summary(summary);
            self.passed += passed;
            self.failed += failed;
            if let Some((name, done)) = self.binary.as_mut() {
                *done = true;
                if passed + failed > 0 {
                    println!("xtask: host:   {name}: {passed} passed, {failed} failed");
                }
            }
        } else if let Some(test) = trimmed.strip_prefix("test ").and_then(|rest| rest.strip_suffix(" ... FAILED")) {
            let binary = self.binary.as_ref().map(|(name, _)| name.as_str()).unwrap_or("?");
            self.failures.push(format!("{binary}: {test}"));
        } else if trimmed.starts_with("Compiling ") {
            self.last = trimmed.to_string();
        }
    }

    fn start_binary(&mut self, name: String) {
        self.end_binary();
        self.last = format!("running {name}");
        self.binary = Some((name, false));
    }

    /// A binary that ends without its summary line crashed or was killed.
    fn end_binary(&mut self) {
        if let Some((name, false)) = self.binary.take() {
            self.failed += 1;
            self.failures.push(format!("{name}: ended without a `test result` line (crashed?)"));
        }
    }

    fn current_or_last(&self) -> &str {
        if self.last.is_empty() {
            "compiling"
        } else {
            &self.last
        }
    }
}

/// `unittests src/lib.rs (target/debug/deps/nk_caps-0123abcd)` -> `nk_caps (unittests src/lib.rs)`.
fn binary_name(running: &str) -> String {
    let Some((what, path)) = running.rsplit_once(" (") else { return running.to_string() };
    let file = path.trim_end_matches(')').rsplit('/').next().unwrap_or(path);
    let krate = file.rsplit_once('-').map_or(file, |(name, _hash)| name);
    format!("{krate} ({what})")
}

/// `ok. 12 passed; 1 failed; 0 ignored; ...` -> (12, 1).
fn parse_summary(summary: &str) -> (usize, usize) {
    let mut passed = 0;
    let mut failed = 0;
    let summary = summary.split_once(". ").map_or(summary, |(_, rest)| rest);
    for part in summary.split(';') {
        let mut words = part.split_whitespace();
        if let (Some(count), Some(what)) = (words.next(), words.next()) {
            match (count.parse::<usize>(), what) {
                (Ok(count), "passed") => passed = count,
                (Ok(count), "failed") => failed = count,
                _ => {}
            }
        }
    }
    (passed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_test_output_is_counted() {
        let mut counter = Counter::default();
        for line in [
            "   Compiling nk-caps v0.1.0",
            "     Running unittests src/lib.rs (target/debug/deps/nk_caps-0123abcd)",
            "test a ... ok",
            "test b ... FAILED",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "     Running unittests src/main.rs (target/debug/deps/xtask-99)",
            "   Doc-tests nk_caps",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            counter.line(line);
        }
        counter.end_binary();
        assert_eq!((counter.passed, counter.failed), (4, 2));
        assert_eq!(counter.failures[0], "nk_caps (unittests src/lib.rs): b");
        assert!(counter.failures[1].starts_with("xtask (unittests src/main.rs): ended without"));
    }
}
