//! Helpers the host benchmarks share for their JSON reports (DESIGN.md §7), included by
//! `hypervisor/caps/benches/caps.rs` and `hypervisor/protocol/benches/protocol.rs` with
//! `#[path]` (two files do not justify a crate).

use std::fmt::Write as _;
use std::path::PathBuf;

/// Returns the host CPU's model name from /proc/cpuinfo, or "unknown".
#[allow(dead_code)]
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// Quotes `text` as a JSON string.
pub fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).expect("writing to a String"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Returns where benchmarks write their JSON: `$NK_BENCH_DIR`, else the workspace's
/// `target/bench` (`manifest_dir` is the bench's crate, two levels below the root).
pub fn output_dir(manifest_dir: &str) -> PathBuf {
    match std::env::var_os("NK_BENCH_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(manifest_dir).join("../../target/bench"),
    }
}
