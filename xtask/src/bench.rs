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
    Bench {
        name: "lwc",
        about: "lwC AM in Bochs, in emulated instructions: lwSwitch round trip, create + switch + destroy of an untouched child",
        run: bench_lwc,
    },
    Bench {
        name: "bypass",
        about: "layer bypass from a Linux process in Bochs: 4 KiB store + NVRAM commit by VMCALL from ring 3, ring-3 null call (fsync path: see bench_bypass.rs)",
        run: crate::bench_bypass::bench_bypass,
    },
    Bench {
        name: "nvram",
        about: "NVRAM AM in Bochs, in emulated instructions: commit of 1, 16 and 256 dirty pages (sparse and dense) with device bytes and write amplification, the whole region, restore of 1 MiB",
        run: bench_nvram,
    },
];

/// The durable area of the NVRAM bench's disk: a 1 MiB region's extent (about 2.1 MiB)
/// and a 16 MiB one's (about 34 MiB), and the directory.
const NVRAM_BENCH_DISK_MIB: u32 = 40;

/// The write sets `cargo xtask bench nvram` commits: (pages, kind).
const NVRAM_COMMITS: &[(u32, &str)] =
    &[(1, "sparse"), (1, "dense"), (16, "sparse"), (16, "dense"), (256, "sparse"), (256, "dense")];

/// Boots the test guest in its `nvrambench` mode (1 CPU) and writes target/bench/nvram.json:
/// each commit's instructions, device bytes, changed bytes (blocks the diff found, times
/// 256) and write amplification (device bytes over changed bytes, minus 1).
fn bench_nvram(workspace: &Workspace) -> Result<()> {
    let mut metrics: Vec<String> = Vec::new();
    for (pages, kind) in NVRAM_COMMITS {
        for what in ["instructions", "device_bytes", "changed_bytes"] {
            metrics.push(format!("commit_{pages}_pages_{kind}_{what}"));
        }
    }
    metrics.push("naive_commit_256_pages_instructions".into());
    metrics.push("naive_commit_256_pages_device_bytes".into());
    metrics.push("restore_1_mib_instructions".into());
    metrics.push("restore_16_mib_instructions".into());
    let names: Vec<&str> = metrics.iter().map(String::as_str).collect();
    let values = guest_bench_on(
        workspace,
        "bench-nvram",
        1,
        &["keeper nvram -- nvrambench"],
        &names,
        Some(NVRAM_BENCH_DISK_MIB),
    )?;
    println!(
        "xtask: bench: NVRAM AM (1 MiB region, then 16 MiB; device: emulated NVRAM on an ATA disk of {NVRAM_BENCH_DISK_MIB} MiB), \
         emulated instructions per call (guest-side RDTSC):"
    );
    let mut json = String::from("{\n");
    for (pages, kind) in NVRAM_COMMITS {
        let get = |what: &str| values[&format!("commit_{pages}_pages_{kind}_{what}")];
        let (instructions, device, changed) = (get("instructions"), get("device_bytes"), get("changed_bytes"));
        let amplification = device as f64 / changed.max(1) as f64 - 1.0;
        println!(
            "  commit_{pages}_pages_{kind:<6} {instructions:>10} instructions, {device:>8} device bytes for {changed:>8} changed, amplification {:.1}%",
            amplification * 100.0
        );
        json.push_str(&format!("  \"commit_{pages}_pages_{kind}_instructions\": {{\"value\": {instructions}, \"unit\": \"instructions\"}},\n"));
        json.push_str(&format!(
            "  \"commit_{pages}_pages_{kind}_device_bytes\": {{\"value\": {device}, \"unit\": \"bytes\"}},\n"
        ));
        json.push_str(&format!(
            "  \"write_amplification_{pages}_pages_{kind}\": {{\"value\": {amplification:.4}, \"unit\": \"ratio\"}},\n"
        ));
    }
    for name in ["naive_commit_256_pages_instructions", "restore_1_mib_instructions", "restore_16_mib_instructions"] {
        println!("  {name:<36} {:>10}", values[name]);
        json.push_str(&format!("  \"{name}\": {{\"value\": {}, \"unit\": \"instructions\"}},\n", values[name]));
    }
    let naive_bytes = values["naive_commit_256_pages_device_bytes"];
    println!("  naive_commit_256_pages_device_bytes  {naive_bytes:>10}");
    json.push_str(&format!(
        "  \"naive_commit_256_pages_device_bytes\": {{\"value\": {naive_bytes}, \"unit\": \"bytes\"}},\n"
    ));
    json.push_str(&format!(
        "  \"context\": {{\"emulator\": \"bochs\", \"cpu_model\": \"{BENCH_CPU_MODEL}\", \"method\": \"minimum of 5 guest-side RDTSC deltas, overhead subtracted\", \"region_bytes\": 1048576, \"device\": \"emulated NVRAM: DRAM mirror written through to an ATA disk, {NVRAM_BENCH_DISK_MIB} MiB\", \"naive\": \"the whole region (every block, changed or not) written through the device: commit with whole = 1, after one 8-byte store\", \"restore\": \"allocate of an existing region (1 MiB; 16 MiB whole-region committed once)\"}}\n}}\n"
    ));
    let dir = bench_dir(workspace);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("nvram.json"), json)?;
    Ok(())
}

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
const PROTOCOL_METRICS: &[&str] = &[
    "delegate_local_instructions",
    "delegate_remote_instructions",
    "revoke_1000_4k_instructions",
    "message_handle_instructions",
];

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
    guest_bench_on(workspace, name, cpus, modules, metrics, None)
}

/// [`guest_bench`], with a fresh NVRAM disk of this many MiB (durable area) when given
/// (and 256 MiB of memory: the disk's DRAM mirror and the regions' frames).
fn guest_bench_on(
    workspace: &Workspace,
    name: &str,
    cpus: u32,
    modules: &[&str],
    metrics: &[&str],
    nvram_mib: Option<u32>,
) -> Result<BTreeMap<String, u64>> {
    setup::install_missing(workspace, setup::Mode::Quiet)?;
    let elf = image::build_hypervisor(workspace, ImageKind::Normal, Profile::Release, BuildOutput::Summary)?;
    let guest = image::build_package(workspace, "nk-testguest", &[], Profile::Release, BuildOutput::Summary)?;
    let modules: Vec<Module> =
        modules.iter().map(|cmdline| Module { path: guest.clone(), cmdline: (*cmdline).into() }).collect();
    let iso = image::make_iso(workspace, &elf, "", &modules)?;
    let disk = match nvram_mib {
        Some(mib) => {
            let path = workspace.target().join("nvram").join("bench").join(format!("{name}.img"));
            crate::nvram_disk::create(&path, mib)?;
            Some(path)
        }
        None => None,
    };
    let spec = RunSpec {
        name: name.into(),
        emulator: Emulator::Bochs,
        iso,
        cpus,
        megs: if disk.is_some() { 256 } else { 64 + 16 * cpus },
        cpu_model: Some(BENCH_CPU_MODEL.into()),
        timeout: Duration::from_secs(if disk.is_some() { 600 } else { 240 }),
        dir: workspace.runs().join(name),
        ips: emulator::DEFAULT_IPS,
        disk,
        pmem: None,
        gdb_port: None,
        gdb_client: None,
    };
    println!("xtask: bench: booting {}", emulator::describe(&spec));
    let result = emulator::run(&spec, |_| {})?;
    let mut values = BTreeMap::new();
    for line in result.serial.lines() {
        // The hypervisor's own figure: what one delegation message costs its receiving CPU
        // (hypervisor/src/sched.rs, at the end of a run with cross-CPU delegations).
        if let Some((_, rest)) = line.split_once("mesh: delegation messages handled: ") {
            let ticks = rest.split(", ").nth(1).and_then(|t| t.split_whitespace().next()).map(str::parse::<u64>);
            if let Some(Ok(ticks)) = ticks {
                values.insert("message_handle_instructions".to_string(), ticks);
            }
        }
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

/// The metrics the test guest's `lwcbench` mode reports.
const LWC_METRICS: &[&str] = &[
    "lwswitch_instructions",
    "lwc_cycle_0_pages_instructions",
    "lwc_cycle_100_pages_instructions",
    "lwc_cycle_1000_pages_instructions",
];
/// What its `vmbench` modes report: the same ping-pong between two VMs on one CPU.
const VM_SWITCH_METRICS: &[&str] = &["vm_switch_instructions"];

/// Boots the test guest in its `lwcbench` mode (1 CPU), then two in `vmbench` (1 CPU, a
/// boot of their own so nothing else shares the CPU), and writes target/bench/lwc.json.
fn bench_lwc(workspace: &Workspace) -> Result<()> {
    let mut values = guest_bench(workspace, "bench-lwc", 1, &["lwc mem=16M frames=8M lwc -- lwcbench"], LWC_METRICS)?;
    let pingpong = ["ping manages=pong -- vmbench ping", "pong manages=ping -- vmbench pong"];
    values.extend(guest_bench(workspace, "bench-vm-switch", 1, &pingpong, VM_SWITCH_METRICS)?);
    println!("xtask: bench: lwC AM, emulated instructions per operation (guest-side RDTSC):");
    let metrics: Vec<&str> = LWC_METRICS.iter().chain(VM_SWITCH_METRICS).copied().collect();
    let mut json = String::from("{\n");
    json.push_str(&instruction_members(&metrics, &values));
    json.push_str(&format!(
        "  \"context\": {{\"emulator\": \"bochs\", \"cpu_model\": \"{BENCH_CPU_MODEL}\", \"method\": \"minimum of 5 guest-side RDTSC deltas, empty-measurement overhead subtracted; lwswitch: two lwSwitch calls (child shares all memory); lwc_cycle_0: a child sharing all memory; lwc_cycle_100/1000: a copy-on-write child writing that many pages (plus its stack's); vm_switch: two VM switches by the guest-OS AM's directed yield between two VMs alone on one CPU\"}}\n}}\n"
    ));
    let dir = bench_dir(workspace);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("lwc.json"), json)?;
    Ok(())
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
    let json = bench_dir(workspace).join(format!("{}.json", bench.name));
    let previous = std::fs::read_to_string(&json).ok().map(|text| json_metrics(&text));
    (bench.run)(workspace)?;
    if json.is_file() {
        println!("xtask: bench: results in {}", workspace.display(&json));
    } else {
        anyhow::bail!("the benchmark finished but did not write {}", json.display());
    }
    let text = std::fs::read_to_string(&json)?;
    if let Some(previous) = previous {
        print_changes(&previous, &json_metrics(&text));
    }
    if bench.name == "protocol" {
        for svg in plot_protocol(&bench_dir(workspace), &text)? {
            println!("xtask: bench: plot {}", workspace.display(&svg));
        }
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
        "  \"bochs_context\": {{\"emulator\": \"bochs\", \"cpu_model\": \"{BENCH_CPU_MODEL}\", \"cpus\": 4, \"method\": \"delegations: minimum of 5 guest-side RDTSC deltas, empty-measurement overhead subtracted; the remote one includes the wait for the other kernel's acknowledgement. Revoke: one run, a root with 333 children on each of 3 other kernels. message_handle_instructions: the hypervisor's own count (its last mesh line) of TSC ticks its CPUs spent per Delegate or DelegateAck received, from the ring through the protocol step and effects to the answer's doorbell, over the whole run; the doorbell's VM exit and re-entry are not in it\"}},\n"
    );
    std::fs::write(&path, format!("{{\n{members}{context}{}", body.trim_start_matches('\n')))?;
    Ok(())
}

/// Reads the metrics of a bench JSON: every member written as
/// `"name": {"value": N, "unit": "..."}` on its own line.
fn json_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.trim().split_once(": {\"value\": ") else { continue };
        let value: String = rest.chars().take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | 'e')).collect();
        if let Ok(value) = value.parse::<f64>() {
            metrics.insert(name.trim_matches('"').to_string(), value);
        }
    }
    metrics
}

/// Prints each metric's change against the previous run's JSON.
fn print_changes(previous: &BTreeMap<String, f64>, now: &BTreeMap<String, f64>) {
    println!("xtask: bench: change against the previous run:");
    for (name, &value) in now {
        match previous.get(name) {
            Some(&before) if before != 0.0 => {
                let change = (value - before) / before * 100.0;
                let mark = if change.abs() < 0.05 { String::from("  =") } else { format!("{change:+.1}%") };
                println!("  {name:<40} {before:>14.4} -> {value:>14.4}  {mark}");
            }
            Some(&before) => println!("  {name:<40} {before:>14.4} -> {value:>14.4}"),
            None => println!("  {name:<40} {:>14} -> {value:>14.4}  (new)", "-"),
        }
    }
    for name in previous.keys().filter(|name| !now.contains_key(*name)) {
        println!("  {name:<40} (no longer reported)");
    }
}

/// Reads the numbers of the JSON array member `key` (nested arrays flattened).
fn json_numbers(text: &str, key: &str) -> Option<Vec<f64>> {
    let at = text.find(&format!("\"{key}\": ["))?;
    let rest = &text[at + key.len() + 4..];
    let mut depth = 0;
    let mut end = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            _ => {}
        }
    }
    let numbers = rest[..end]
        .split(|c: char| c == ',' || c == '[' || c == ']' || c.is_whitespace())
        .filter(|word| !word.is_empty())
        .map(str::parse::<f64>)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(numbers)
}

/// Draws the protocol's curves next to protocol.json: parallel efficiency and cap ops/s
/// against kernels (the mix, think time / 10, saturated), and revoke cost against
/// capabilities and kernels reached. Returns the files written.
fn plot_protocol(dir: &std::path::Path, text: &str) -> Result<Vec<std::path::PathBuf>> {
    use crate::plot::{line_chart, Series};
    let mut written = Vec::new();
    let (Some(kernels), Some(mix), Some(fast), Some(ops)) = (
        json_numbers(text, "series_kernels"),
        json_numbers(text, "series_mix_efficiency"),
        json_numbers(text, "series_think_div10_efficiency"),
        json_numbers(text, "series_mix_cap_ops_per_s"),
    ) else {
        println!("xtask: bench: protocol.json has no series to plot");
        return Ok(written);
    };
    let zip = |ys: &[f64]| kernels.iter().copied().zip(ys.iter().copied()).collect::<Vec<_>>();
    let mut efficiency = vec![
        Series { name: "SemperOS mix".into(), points: zip(&mix) },
        Series { name: "mix, think time / 10".into(), points: zip(&fast) },
    ];
    if let Some(saturated) = json_numbers(text, "series_saturated_efficiency") {
        let points = saturated.chunks_exact(2).map(|pair| (pair[0], pair[1])).collect();
        efficiency.push(Series { name: "saturated, 10% cross-kernel (Bochs costs)".into(), points });
    }
    let path = dir.join("protocol-efficiency.svg");
    line_chart(&path, "Parallel efficiency against kernels (simulated)", "kernels", "efficiency", true, &efficiency)?;
    written.push(path);
    let path = dir.join("protocol-cap-ops.svg");
    let series = [Series { name: "SemperOS mix".into(), points: zip(&ops) }];
    line_chart(
        &path,
        "Capability operations per second against kernels (simulated)",
        "kernels",
        "cap ops/s",
        true,
        &series,
    )?;
    written.push(path);
    if let Some(revoke) = json_numbers(text, "series_revoke_host") {
        let mut by_kernels: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
        for row in revoke.chunks_exact(4) {
            by_kernels.entry(row[0] as u64).or_default().push((row[1], row[2] / row[1]));
        }
        let series: Vec<Series> = by_kernels
            .into_iter()
            .map(|(k, points)| Series { name: format!("{k} kernel(s) reached"), points })
            .collect();
        let path = dir.join("protocol-revoke.svg");
        line_chart(
            &path,
            "Revoke cost per capability (host, real kernels)",
            "capabilities",
            "ns per capability",
            true,
            &series,
        )?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
  "parallel_efficiency_512": {"value": 0.9975, "unit": "ratio"},
  "revoke_1000_4k_instructions": {"value": 562105, "unit": "instructions"},
  "context": {
    "series_kernels": [1, 2, 4],
    "series_mix_efficiency": [1.0000, 0.9990, 0.9980],
    "series_mix_cap_ops_per_s": [6763.1, 10373.6, 14508.5],
    "series_think_div10_efficiency": [1.0000, 0.9984, 0.9914],
    "series_saturated_efficiency": [[1, 1.0000], [2, 0.7233]],
    "series_revoke_host": [[1, 100, 3044, 0], [1, 1000, 3756, 0], [2, 100, 12479, 2], [2, 1000, 32108, 2]],
    "bench_seconds": 0.7
  }
}"#;

    #[test]
    fn metrics_and_series_are_read_back() {
        let metrics = json_metrics(SAMPLE);
        assert_eq!(metrics["parallel_efficiency_512"], 0.9975);
        assert_eq!(metrics["revoke_1000_4k_instructions"], 562105.0);
        assert_eq!(metrics.len(), 2);
        assert_eq!(json_numbers(SAMPLE, "series_saturated_efficiency"), Some(vec![1.0, 1.0, 2.0, 0.7233]));
        assert_eq!(json_numbers(SAMPLE, "series_kernels"), Some(vec![1.0, 2.0, 4.0]));
        assert_eq!(json_numbers(SAMPLE, "absent"), None);
    }

    #[test]
    fn the_protocol_plots_are_svg_files() {
        let dir = std::env::temp_dir().join(format!("nk-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let written = plot_protocol(&dir, SAMPLE).unwrap();
        assert_eq!(written.len(), 3);
        for path in written {
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{}", path.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
