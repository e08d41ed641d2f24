//! `cargo xtask bench NAME`: the project's benchmarks by name. Each writes
//! `target/bench/NAME.json` (DESIGN.md §7); a new one is one entry in [`BENCHES`].

use std::collections::BTreeMap;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Result;

use crate::cli::{BenchArgs, Emulator, Profile};
use crate::emulator::{self, RunSpec};
use crate::image::{self, BuildOutput, ImageKind, Module};
use crate::setup;
use crate::tools;
use crate::workspace::Workspace;

/// A benchmark `cargo xtask bench` knows.
struct Bench {
    name: &'static str,
    about: &'static str,
    run: fn(&Workspace) -> Result<()>,
}

const BENCHES: &[Bench] = &[
    Bench {
        name: "caps",
        about: "capability core on the host (nk-caps): derive, delegate, lookup, revoke, memory per capability",
        run: bench_caps,
    },
    Bench {
        name: "protocol",
        about: "distributed capability protocol (nk-protocol), simulated: SemperOS's application mix on 1 to 640 kernels",
        run: bench_protocol,
    },
    Bench {
        name: "hypercall",
        about: "hypercall path in Bochs, in emulated instructions (guest-side RDTSC): null VMCALL, AM calls, derive, revoke",
        run: bench_hypercall,
    },
];

/// The metrics the test guest's `bench` mode reports (`GBENCH <metric> <value>`).
const HYPERCALL_METRICS: &[&str] = &[
    "vmcall_null_instructions",
    "am_call_1cap_instructions",
    "am_call_4cap_instructions",
    "derive_instructions",
    "revoke_10_instructions",
];

/// Boots the hypervisor in Bochs with the test guest in its `bench` mode and turns its
/// `GBENCH` lines into target/bench/hypercall.json. In Bochs the TSC counts emulated
/// instructions, so the figures are exact and repeatable.
fn bench_hypercall(workspace: &Workspace) -> Result<()> {
    setup::install_missing(workspace, setup::Mode::Quiet)?;
    let elf = image::build_hypervisor(workspace, ImageKind::Normal, Profile::Release, BuildOutput::Summary)?;
    let guest = image::build_package(workspace, "nk-testguest", &[], Profile::Release, BuildOutput::Summary)?;
    let module = Module { path: guest, cmdline: "bench -- bench".into() };
    let iso = image::make_iso(workspace, &elf, "", &[module])?;
    let model = "corei7_skylake_x";
    let spec = RunSpec {
        name: "bench-hypercall".into(),
        emulator: Emulator::Bochs,
        iso,
        cpus: 1,
        megs: 64,
        cpu_model: Some(model.into()),
        timeout: Duration::from_secs(120),
        dir: workspace.runs().join("bench-hypercall"),
    };
    println!("xtask: bench: booting {}", emulator::describe(&spec));
    let result = emulator::run(&spec, |_| {})?;
    let mut values = BTreeMap::new();
    for line in result.serial.lines() {
        if let Some((_, rest)) = line.split_once(": GBENCH ") {
            let mut words = rest.split_whitespace();
            if let (Some(metric), Some(Ok(value))) = (words.next(), words.next().map(str::parse::<u64>)) {
                values.insert(metric.to_string(), value);
            }
        }
    }
    let missing: Vec<_> = HYPERCALL_METRICS.iter().filter(|m| !values.contains_key(**m)).collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the guest did not report {missing:?} ({}); see {}",
            result.ending_text(spec.timeout),
            workspace.display(&result.serial_path)
        );
    }
    println!("xtask: bench: hypercall path, emulated instructions per operation (round trip, guest-side RDTSC):");
    let mut json = String::from("{\n");
    for metric in HYPERCALL_METRICS {
        let value = values[*metric];
        println!("  {metric:<28} {value:>8}");
        json.push_str(&format!("  \"{metric}\": {{\"value\": {value}, \"unit\": \"instructions\"}},\n"));
    }
    json.push_str(&format!(
        "  \"context\": {{\"emulator\": \"bochs\", \"cpu_model\": \"{model}\", \"method\": \"minimum of 5 guest-side RDTSC deltas, empty-measurement overhead subtracted\"}}\n}}\n"
    ));
    let dir = bench_dir(workspace);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("hypercall.json"), json)?;
    Ok(())
}

pub fn bench_command(workspace: &Workspace, args: &BenchArgs) -> Result<ExitCode> {
    let Some(name) = args.name.as_deref() else {
        println!("xtask: bench: name a benchmark: cargo xtask bench NAME");
        print_list();
        return Ok(ExitCode::FAILURE);
    };
    let Some(bench) = BENCHES.iter().find(|bench| bench.name == name) else {
        println!("xtask: bench: there is no benchmark '{name}'");
        print_list();
        return Ok(ExitCode::FAILURE);
    };
    (bench.run)(workspace)?;
    let json = bench_dir(workspace).join(format!("{}.json", bench.name));
    if json.is_file() {
        println!("xtask: bench: results in {}", workspace.display(&json));
    } else {
        anyhow::bail!("the benchmark finished but did not write {}", json.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_list() {
    println!("xtask: bench: known benchmarks:");
    for bench in BENCHES {
        println!("  {:<8} {}", bench.name, bench.about);
    }
}

/// Where benchmarks write their JSON: target/bench/.
fn bench_dir(workspace: &Workspace) -> std::path::PathBuf {
    workspace.target().join("bench")
}

fn bench_caps(workspace: &Workspace) -> Result<()> {
    let mut command = Command::new(workspace.cargo());
    command
        .current_dir(workspace.root())
        .args(["bench", "-p", "nk-caps", "--bench", "caps"])
        .env("NK_BENCH_DIR", bench_dir(workspace));
    println!("xtask: bench: {}", tools::describe(&command));
    tools::status_checked(&mut command, "the caps benchmark")
}

fn bench_protocol(workspace: &Workspace) -> Result<()> {
    let mut command = Command::new(workspace.cargo());
    command
        .current_dir(workspace.root())
        .args(["bench", "-p", "nk-protocol", "--bench", "protocol"])
        .env("NK_BENCH_DIR", bench_dir(workspace));
    println!("xtask: bench: {}", tools::describe(&command));
    tools::status_checked(&mut command, "the protocol benchmark")
}
