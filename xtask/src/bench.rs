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
    Bench {
        name: "linux",
        about: "Debian Linux booted to LINUX-OK under the hypervisor vs on bare Bochs (GRUB), ratio, VM exits by reason",
        run: crate::bench_linux::bench_linux,
    },
    Bench {
        name: "exo",
        about: "exo AM memory in Bochs, in emulated instructions: map/unmap a 4 KiB frame, revoke a frame shared on 2 CPUs, dirty bitmap of K in 65,536 pages by A/D scan and by PML",
        run: bench_exo,
    },
];

/// The metrics the test guest's `exobench` mode reports.
const EXO_METRICS: &[&str] = &[
    "map_4k_instructions",
    "unmap_4k_instructions",
    "dirty_ad_1_instructions",
    "dirty_ad_64_instructions",
    "dirty_ad_4096_instructions",
    "dirty_pml_1_instructions",
    "dirty_pml_64_instructions",
    "dirty_pml_4096_instructions",
];

/// Boots the test guest in its `exobench` mode (1 CPU), then a lender and a borrower on 2
/// CPUs for the shared revoke, and writes target/bench/exo.json.
fn bench_exo(workspace: &Workspace) -> Result<()> {
    let mut values = guest_bench(workspace, "bench-exo", 1, &["exo -- exobench"], EXO_METRICS)?;
    let revoke = ["revoke_shared_2cpu_instructions"];
    let shared = guest_bench(
        workspace,
        "bench-exo-revoke",
        2,
        &["lender cpu=0 -- exolend bench 2", "borrower cpu=1 -- exoborrow"],
        &revoke,
    )?;
    values.extend(shared);
    let metrics: Vec<&str> = EXO_METRICS.iter().chain(&revoke).copied().collect();
    println!("xtask: bench: exo AM memory, emulated instructions per operation (guest-side RDTSC):");
    let mut json = String::from("{\n");
    json.push_str(&instruction_members(&metrics, &values));
    json.push_str(&format!(
        "  \"context\": {{\"emulator\": \"bochs\", \"cpu_model\": \"{BENCH_CPU_MODEL}\", \"method\": \"minimum of 5 guest-side RDTSC deltas, timer overhead subtracted (the 2-CPU revoke: one sample)\", \"dirty_N\": 65536}}\n}}\n"
    ));
    let dir = bench_dir(workspace);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("exo.json"), json)?;
    Ok(())
}

/// The metrics the test guest's `bench` mode reports (`GBENCH <metric> <value>`).
const HYPERCALL_METRICS: &[&str] = &[
    "vmcall_null_instructions",
    "am_call_1cap_instructions",
    "am_call_4cap_instructions",
    "derive_instructions",
    "revoke_10_instructions",
];

/// The metrics the test guest's `pbench` mode reports, added to protocol.json.
const PROTOCOL_METRICS: &[&str] =
    &["delegate_local_instructions", "delegate_remote_instructions", "revoke_1000_4k_instructions"];

/// The CPU model the Bochs benchmarks run on.
const BENCH_CPU_MODEL: &str = "corei7_skylake_x";

/// Boots the hypervisor in Bochs on `cpus` CPUs with test-guest `modules` (command lines)
/// and returns the `GBENCH <metric> <value>` lines they printed; fails naming what is
/// missing of `metrics`. In Bochs the TSC counts emulated instructions, so the figures
/// are exact and repeatable.
fn guest_bench(
    workspace: &Workspace,
    name: &str,
    cpus: u32,
    modules: &[&str],
    metrics: &[&str],
) -> Result<BTreeMap<String, u64>> {
    setup::install_missing(workspace, setup::Mode::Quiet)?;
    let elf = image::build_hypervisor(workspace, ImageKind::Normal, Profile::Release, BuildOutput::Summary)?;
    let guest = image::build_package(workspace, "nk-testguest", &[], Profile::Release, BuildOutput::Summary)?;
    let modules: Vec<Module> =
        modules.iter().map(|cmdline| Module { path: guest.clone(), cmdline: (*cmdline).into() }).collect();
    let iso = image::make_iso(workspace, &elf, "", &modules)?;
    let spec = RunSpec {
        name: name.into(),
        emulator: Emulator::Bochs,
        iso,
        cpus,
        megs: 64 + 16 * cpus,
        cpu_model: Some(BENCH_CPU_MODEL.into()),
        timeout: Duration::from_secs(240),
        dir: workspace.runs().join(name),
        ips: emulator::DEFAULT_IPS,
        gdb_port: None,
        gdb_client: None,
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
    let missing: Vec<_> = metrics.iter().filter(|m| !values.contains_key(**m)).collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the guest did not report {missing:?} ({}); see {}",
            result.ending_text(spec.timeout),
            workspace.display(&result.serial_path)
        );
    }
    Ok(values)
}

/// JSON members (`"metric": {"value": N, "unit": "instructions"}`) for `metrics`, printed
/// as a table too.
fn instruction_members(metrics: &[&str], values: &BTreeMap<String, u64>) -> String {
    let mut json = String::new();
    for metric in metrics {
        let value = values[*metric];
        println!("  {metric:<30} {value:>8}");
        json.push_str(&format!("  \"{metric}\": {{\"value\": {value}, \"unit\": \"instructions\"}},\n"));
    }
    json
}

/// Boots the test guest in its `bench` mode and writes target/bench/hypercall.json.
fn bench_hypercall(workspace: &Workspace) -> Result<()> {
    let values = guest_bench(workspace, "bench-hypercall", 1, &["bench -- bench"], HYPERCALL_METRICS)?;
    println!("xtask: bench: hypercall path, emulated instructions per operation (round trip, guest-side RDTSC):");
    let mut json = String::from("{\n");
    json.push_str(&instruction_members(HYPERCALL_METRICS, &values));
    json.push_str(&format!(
        "  \"context\": {{\"emulator\": \"bochs\", \"cpu_model\": \"{BENCH_CPU_MODEL}\", \"method\": \"minimum of 5 guest-side RDTSC deltas, empty-measurement overhead subtracted\"}}\n}}\n"
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

/// The simulator's figures (host), then the hypervisor's own in Bochs: one guest per CPU
/// on 4 CPUs, the measuring one delegating inside its kernel and to another CPU's, and
/// revoking a tree of 1,000 capabilities spread over the 4 kernels. Both go into
/// target/bench/protocol.json.
fn bench_protocol(workspace: &Workspace) -> Result<()> {
    let mut command = Command::new(workspace.cargo());
    command
        .current_dir(workspace.root())
        .args(["bench", "-p", "nk-protocol", "--bench", "protocol"])
        .env("NK_BENCH_DIR", bench_dir(workspace));
    println!("xtask: bench: {}", tools::describe(&command));
    tools::status_checked(&mut command, "the protocol benchmark")?;
    let modules = ["pbench cpu=0 -- pbench 2 3 4", "hold2 cpu=1 -- hold", "hold3 cpu=2 -- hold", "hold4 cpu=3 -- hold"];
    let values = guest_bench(workspace, "bench-protocol", 4, &modules, PROTOCOL_METRICS)?;
    println!("xtask: bench: the protocol in the hypervisor, 4 CPUs, emulated instructions (guest-side RDTSC):");
    let members = instruction_members(PROTOCOL_METRICS, &values);
    let path = bench_dir(workspace).join("protocol.json");
    let simulated = std::fs::read_to_string(&path)?;
    let Some(body) = simulated.trim_start().strip_prefix('{') else {
        anyhow::bail!("{} is not a JSON object", path.display());
    };
    let context = format!(
        "  \"bochs_context\": {{\"emulator\": \"bochs\", \"cpu_model\": \"{BENCH_CPU_MODEL}\", \"cpus\": 4, \"method\": \"delegations: minimum of 5 guest-side RDTSC deltas, empty-measurement overhead subtracted; the remote one includes the wait for the other kernel's acknowledgement. Revoke: one run, a root with 333 children on each of 3 other kernels\"}},\n"
    );
    std::fs::write(&path, format!("{{\n{members}{context}{}", body.trim_start_matches('\n')))?;
    Ok(())
}
