//! `cargo xtask bench NAME`: the project's benchmarks by name. Each writes
//! `target/bench/NAME.json` (DESIGN.md §7); a new one is one entry in [`BENCHES`].

use std::process::{Command, ExitCode};

use anyhow::Result;

use crate::cli::BenchArgs;
use crate::tools;
use crate::workspace::Workspace;

/// A benchmark `cargo xtask bench` knows.
struct Bench {
    name: &'static str,
    about: &'static str,
    run: fn(&Workspace) -> Result<()>,
}

const BENCHES: &[Bench] = &[Bench {
    name: "caps",
    about: "capability core on the host (nk-caps): derive, delegate, lookup, revoke, memory per capability",
    run: bench_caps,
}];

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
