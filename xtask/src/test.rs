//! `cargo xtask test`: the host unit tests, then every emulator scenario of
//! tests/emulator.toml in parallel, then the report ending in `N passed, M failed`.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::checks::{self, Verdict};
use crate::cli::{Profile, TestArgs};
use crate::emulator::{self, RunSpec};
use crate::host;
use crate::image::{self, BuildOutput, Module};
use crate::report::{self, ScenarioOutcome};
use crate::scenario::{self, ModuleSpec, Scenario};
use crate::setup;
use crate::workspace::Workspace;

/// How often a line lists the runs still going.
const HEARTBEAT: Duration = Duration::from_secs(20);

pub fn test_command(workspace: &Workspace, args: &TestArgs) -> Result<ExitCode> {
    let started = Instant::now();
    // A broken scenario file fails before anything slow runs.
    let scenario_file = args.scenarios.clone().unwrap_or_else(|| workspace.scenario_file());
    let mut scenarios: Vec<Scenario> = scenario::load(&scenario_file, args.long)?
        .into_iter()
        .filter(|scenario| scenario.matches(args.filter.as_deref()))
        .collect();
    let seed = match args.seed.as_deref() {
        None => scenario::DEFAULT_SEED,
        Some("random") => {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos());
            let seed = (nanos as u64) % 1_000_000_000;
            println!("xtask: test: seed {seed} for {{seed}} in module command lines (replay with --seed {seed})");
            seed
        }
        Some(text) => {
            text.parse().map_err(|_| anyhow::anyhow!("--seed {text}: write a number or 'random', e.g. --seed 42"))?
        }
    };
    for scenario in &mut scenarios {
        scenario.set_seed(seed);
    }
    setup::install_missing(workspace, setup::Mode::Quiet)?;

    let host = if args.skip_host {
        println!("xtask: host: skipped (--skip-host)");
        None
    } else {
        Some(host::run(workspace, args.filter.as_deref())?)
    };

    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let outcomes = if scenarios.is_empty() {
        println!("xtask: test: no emulator scenario matches the filter");
        Vec::new()
    } else {
        run_scenarios(workspace, scenarios, jobs)
    };

    let (_, failed) = report::print(workspace, host.as_ref(), &outcomes, started.elapsed());
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One scenario ready to boot (an ISO per boot), or the reason it cannot.
struct Job {
    index: usize,
    scenario: Scenario,
    isos: Result<Vec<PathBuf>, String>,
    /// The scripted gdb session of a scenario with `gdb` (its first boot).
    gdb: Option<crate::gdb::Client>,
}

enum Event {
    Started(usize),
    Finished(Box<ScenarioOutcome>, usize),
}

/// Builds the images the scenarios need, then runs them `jobs` at a time.
fn run_scenarios(workspace: &Workspace, scenarios: Vec<Scenario>, jobs: usize) -> Vec<ScenarioOutcome> {
    let total = scenarios.len();
    println!("xtask: test: {total} emulator scenario(s), up to {jobs} at a time");
    let queue: VecDeque<Job> = prepare_images(workspace, scenarios);
    let queue = Arc::new(Mutex::new(queue));
    let (events, inbox) = mpsc::channel::<Event>();

    let mut scenarios_by_index: BTreeMap<usize, Scenario> = BTreeMap::new();
    if let Ok(queue) = queue.lock() {
        for job in queue.iter() {
            scenarios_by_index.insert(job.index, job.scenario.clone());
        }
    }
    let workers: Vec<_> = (0..jobs.min(total))
        .map(|_| {
            let queue = Arc::clone(&queue);
            let events = events.clone();
            let runs = workspace.runs().join("test");
            let disks = workspace.target().join("nvram").join("test");
            std::thread::spawn(move || worker(&queue, &events, &runs, &disks))
        })
        .collect();
    drop(events);

    let mut running: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut outcomes: Vec<(usize, ScenarioOutcome)> = Vec::new();
    let mut last_heartbeat = Instant::now();
    loop {
        match inbox.recv_timeout(Duration::from_millis(500)) {
            Ok(Event::Started(index)) => {
                running.insert(index, Instant::now());
            }
            Ok(Event::Finished(outcome, index)) => {
                running.remove(&index);
                let mark = if outcome.passed() { "pass" } else { "FAIL" };
                println!("xtask: test: [{}/{total}] {mark} {}", outcomes.len() + 1, outcome.summary());
                outcomes.push((index, *outcome));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !running.is_empty() && last_heartbeat.elapsed() >= HEARTBEAT {
            last_heartbeat = Instant::now();
            let list: Vec<String> = running
                .iter()
                .map(|(index, since)| {
                    let name = scenarios_by_index.get(index).map_or("?", |scenario| scenario.name.as_str());
                    format!("{name} {} s", since.elapsed().as_secs())
                })
                .collect();
            println!("xtask: test: still running: {}", list.join(", "));
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
    // A scenario without an outcome lost its worker to a panic (a bug in xtask): it still
    // counts, as a failure.
    for (index, scenario) in scenarios_by_index {
        if !outcomes.iter().any(|(done, _)| *done == index) {
            let problem = "xtask's worker thread panicked before this scenario finished".to_string();
            outcomes.push((index, ScenarioOutcome::not_run(scenario, problem)));
        }
    }
    outcomes.sort_by_key(|(index, _)| *index);
    outcomes.into_iter().map(|(_, outcome)| outcome).collect()
}

/// Takes jobs off the queue until it is empty.
fn worker(queue: &Mutex<VecDeque<Job>>, events: &mpsc::Sender<Event>, runs: &std::path::Path, disks: &std::path::Path) {
    loop {
        let job = match queue.lock() {
            Ok(mut queue) => queue.pop_front(),
            Err(_) => None,
        };
        let Some(job) = job else { return };
        let _ = events.send(Event::Started(job.index));
        let outcome = run_one(job.scenario, job.isos, job.gdb, runs, disks);
        let _ = events.send(Event::Finished(Box::new(outcome), job.index));
    }
}

/// Runs a scenario's boots in order (on one fresh NVRAM disk when it asks for one) and
/// judges each; the first failing boot ends the scenario.
fn run_one(
    scenario: Scenario,
    isos: Result<Vec<PathBuf>, String>,
    mut gdb: Option<crate::gdb::Client>,
    runs: &std::path::Path,
    disks: &std::path::Path,
) -> ScenarioOutcome {
    let isos = match isos {
        Ok(isos) => isos,
        Err(why) => return ScenarioOutcome::not_run(scenario, why),
    };
    let disk = match scenario.nvram_mib {
        None => None,
        Some(mib) => {
            let path = disks.join(format!("{}.img", scenario.name));
            if let Err(err) = crate::nvram_disk::create(&path, mib) {
                return ScenarioOutcome::not_run(scenario, format!("the NVRAM disk: {err:#}"));
            }
            Some(path)
        }
    };
    let pmem = match scenario.pmem_mib {
        None => None,
        Some(mib) => {
            let path = disks.join(format!("{}.pmem", scenario.name));
            if let Err(err) = crate::pmem_file::create(&path, mib) {
                return ScenarioOutcome::not_run(scenario, format!("the NVDIMM file: {err:#}"));
            }
            Some(path)
        }
    };
    let boots = scenario.boots();
    let several = boots.len() > 1;
    let mut verdict = Verdict::default();
    let mut last_run: Option<emulator::RunResult> = None;
    for (number, (boot, iso)) in boots.iter().zip(isos).enumerate().map(|(i, pair)| (i + 1, pair)) {
        if let Some(path) = &disk {
            // A boot killed from outside leaves Bochs's lock on the image.
            if let Err(err) = crate::nvram_disk::remove_stale_lock(path) {
                verdict.problems.push(format!("boot {number}: {err:#}"));
                break;
            }
            if let Some(offset) = scenario.boot.get(number - 1).and_then(|spec| spec.flip_byte) {
                if let Err(err) = crate::nvram_disk::flip_byte(path, offset) {
                    verdict.problems.push(format!("boot {number}: {err:#}"));
                    break;
                }
                println!(
                    "xtask: test: {} boot {number}: flipped the byte at {offset} of the NVRAM area",
                    scenario.name
                );
            }
        }
        // A scripted gdb session drives the first boot.
        let gdb_client = gdb.take();
        let gdb_port = match &gdb_client {
            Some(_) => match crate::gdb::free_port() {
                Ok(port) => Some(port),
                Err(err) => {
                    verdict.problems.push(prefix_boot(several, number, format!("{err:#}")));
                    break;
                }
            },
            None => None,
        };
        let judged_by_gdb = gdb_client.is_some();
        let spec = RunSpec {
            name: scenario.name.clone(),
            emulator: scenario.emulator,
            iso,
            cpus: scenario.cpus,
            megs: scenario.megs,
            cpu_model: scenario.cpu_model.clone(),
            timeout: boot.kill_at_ms.map_or(Duration::from_secs(scenario.timeout), Duration::from_millis),
            dir: if several {
                runs.join(&scenario.name).join(format!("boot{number}"))
            } else {
                runs.join(&scenario.name)
            },
            ips: scenario.ips.unwrap_or(crate::emulator::DEFAULT_IPS),
            disk: disk.clone(),
            pmem: pmem.clone(),
            gdb_port,
            gdb_client,
        };
        let ending = match boot.kill_at_ms {
            Some(ms) => format!("killed after {ms} ms (seed {})", scenario.seed),
            None => format!("timeout {} s", scenario.timeout),
        };
        println!(
            "xtask: test: start {}{} ({}, cmdline \"{}\", {ending})",
            scenario.name,
            if several { format!(" boot {number}") } else { String::new() },
            emulator::describe(&spec),
            boot.cmdline,
        );
        let prefix = |text: String| if several { format!("boot {number}: {text}") } else { text };
        match emulator::run(&spec, |_| {}) {
            Ok(run) => {
                let previous = last_run.as_ref().map(|previous| previous.serial.as_str());
                let mut boot_verdict = checks::judge(boot, &run, previous);
                if judged_by_gdb {
                    boot_verdict.problems.extend(crate::gdb::judge(&scenario.gdb_expect, run.gdb_output.as_deref()));
                }
                verdict.problems.extend(boot_verdict.problems.into_iter().map(prefix));
                verdict.cases.extend(boot_verdict.cases.into_iter().map(|mut case| {
                    if several {
                        case.name = format!("boot{number}/{}", case.name);
                    }
                    case
                }));
                last_run = Some(run);
            }
            Err(err) => verdict.problems.push(prefix(format!("cannot run the emulator: {err:#}"))),
        }
        let failed = !verdict.problems.is_empty() || verdict.cases.iter().any(|case| case.failure.is_some());
        if failed {
            break;
        }
    }
    ScenarioOutcome { scenario, run: last_run, verdict }
}

fn prefix_boot(several: bool, number: usize, text: String) -> String {
    if several {
        format!("boot {number}: {text}")
    } else {
        text
    }
}

/// Builds each image kind the scenarios use once, then an ISO per scenario (cached, so
/// scenarios with the same image and command line share one). A build failure fails the
/// scenarios that need it, not the whole run.
fn prepare_images(workspace: &Workspace, scenarios: Vec<Scenario>) -> VecDeque<Job> {
    let mut elves: BTreeMap<&'static str, Result<PathBuf, String>> = BTreeMap::new();
    let mut packages: BTreeMap<String, Result<PathBuf, String>> = BTreeMap::new();
    let mut jobs = VecDeque::new();
    for (index, scenario) in scenarios.into_iter().enumerate() {
        let kind = scenario.image;
        let elf = elves
            .entry(kind.name())
            .or_insert_with(|| {
                let built = match kind {
                    image::ImageKind::NewAm => crate::new_am_check::build(workspace),
                    _ => image::build_hypervisor(workspace, kind, Profile::Release, BuildOutput::Summary),
                };
                built.map_err(|err| format!("the {} image did not build: {err:#}", kind.name()))
            })
            .clone();
        let mut gdb = None;
        let isos = elf.and_then(|elf| {
            let modules = resolve_modules(workspace, &scenario.modules, &mut packages)?;
            if let Some(script) = &scenario.gdb {
                gdb = Some(crate::gdb::client(workspace.root(), script, &modules)?);
            }
            scenario
                .boots()
                .iter()
                .map(|boot| {
                    image::make_iso(workspace, &elf, &boot.cmdline, &modules)
                        .map_err(|err| format!("the ISO was not made: {err:#}"))
                })
                .collect::<Result<Vec<_>, String>>()
        });
        if let Err(why) = &isos {
            println!("xtask: test: {}: {why}", scenario.name);
        }
        jobs.push_back(Job { index, scenario, isos, gdb });
    }
    jobs
}

fn resolve_modules(
    workspace: &Workspace,
    specs: &[ModuleSpec],
    packages: &mut BTreeMap<String, Result<PathBuf, String>>,
) -> Result<Vec<Module>, String> {
    let mut modules = Vec::new();
    for spec in specs {
        let (path, default_cmdline) = match (&spec.package, &spec.file) {
            (Some(package), _) => {
                let built = packages
                    .entry(package.clone())
                    .or_insert_with(|| {
                        image::build_package(workspace, package, &[], Profile::Release, BuildOutput::Summary)
                            .map_err(|err| format!("module package {package} did not build: {err:#}"))
                    })
                    .clone()?;
                (built, package.clone())
            }
            (None, Some(file)) => {
                if file.starts_with("target/linux") {
                    // The Linux guest's files are fetched and built on first use.
                    crate::linux::ensure(workspace).map_err(|err| format!("the Linux guest files: {err:#}"))?;
                }
                let path = workspace.root().join(file);
                let name =
                    file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
                (path, name)
            }
            (None, None) => return Err("a module names neither a package nor a file".into()),
        };
        modules.push(Module { path, cmdline: spec.cmdline.clone().unwrap_or(default_cmdline) });
    }
    Ok(modules)
}
