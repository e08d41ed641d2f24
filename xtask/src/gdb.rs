//! The guest debugger from xtask's side (docs/gdb.md): the socket Bochs gives COM2, the
//! module flag `gdb` that picks the debugged guest, and gdb in batch mode for scripted
//! sessions (scenarios with `gdb = "<script>"`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The port `cargo xtask run --gdb` listens on unless `--gdb-port` says otherwise.
pub const DEFAULT_PORT: u16 = 1234;
/// How long gdb waits for a reply: the hypervisor answers only once it has booted and its
/// scheduler polls COM2 (several seconds of Bochs).
const REMOTE_TIMEOUT_SECS: u32 = 120;
/// How long Bochs may take to open its socket.
const LISTEN_WAIT: Duration = Duration::from_secs(20);

/// A scripted gdb session against a run: the commands after `target remote`, the ELF
/// whose symbols gdb loads, and where its output goes.
#[derive(Debug, Clone)]
pub struct Client {
    pub commands: String,
    pub elf: PathBuf,
}

/// Adds the flag `gdb` to the module line of the guest named `name` (the line's first
/// word, without directories), before any `--`. Says which names there are if none fits.
pub fn mark_module(cmdlines: &mut [&mut String], name: &str) -> Result<(), String> {
    let names: Vec<String> = cmdlines.iter().map(|line| module_name(line).to_string()).collect();
    let Some(index) = names.iter().position(|n| n == name) else {
        return Err(format!("--gdb {name}: no guest of that name; the guests are: {}", names.join(", ")));
    };
    let line = &mut *cmdlines[index];
    *line = with_flag(line);
    Ok(())
}

fn module_name(cmdline: &str) -> &str {
    let first = cmdline.split_ascii_whitespace().next().unwrap_or("");
    first.rsplit('/').next().unwrap_or(first)
}

fn with_flag(cmdline: &str) -> String {
    match cmdline.find(" -- ") {
        Some(at) => format!("{} gdb{}", &cmdline[..at], &cmdline[at..]),
        None if cmdline.ends_with(" --") => format!("{} gdb --", &cmdline[..cmdline.len() - 3]),
        None => format!("{cmdline} gdb"),
    }
}

/// Returns whether a module line has the `gdb` flag (before any `--`).
pub fn has_flag(cmdline: &str) -> bool {
    cmdline.split(" -- ").next().unwrap_or("").split_ascii_whitespace().skip(1).any(|w| w == "gdb")
}

/// Returns a free local TCP port for Bochs's COM2 socket.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free local port")?;
    Ok(listener.local_addr().context("cannot read the port")?.port())
}

/// The gdb command file of a scripted session.
fn script(port: u16, client: &Client) -> String {
    format!(
        "set pagination off\nset confirm off\nset width 0\nset remotetimeout {REMOTE_TIMEOUT_SECS}\n\
         file {}\ntarget remote localhost:{port}\n{}\n",
        client.elf.display(),
        client.commands
    )
}

/// Starts gdb in batch mode on `client`'s script once Bochs listens on `port`; its output
/// goes to `dir/gdb.txt`.
pub fn start(port: u16, client: &Client, dir: &Path) -> Result<Child> {
    let started = Instant::now();
    while !listening(port) {
        if started.elapsed() > LISTEN_WAIT {
            anyhow::bail!("Bochs did not open its COM2 socket (port {port}) within {} s", LISTEN_WAIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let script_path = dir.join("session.gdb");
    std::fs::write(&script_path, script(port, client)).context("cannot write the gdb script")?;
    let out = std::fs::File::create(dir.join("gdb.txt")).context("cannot create gdb.txt")?;
    let err = out.try_clone().context("cannot duplicate gdb.txt's handle")?;
    Command::new("gdb")
        .args(["-nx", "-batch", "-x"])
        .arg(&script_path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("cannot start gdb (is `cargo xtask setup` done? it installs Debian's gdb)")
}

/// Ends a gdb that outlived its run and returns what it printed.
pub fn finish(mut child: Child, dir: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    let _ = child.wait();
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(dir.join("gdb.txt")) {
        let _ = file.read_to_string(&mut text);
    }
    text
}

/// The scripted session of a scenario: `script`'s commands, with the symbols of the module
/// whose line says `gdb`.
pub fn client(root: &Path, script: &Path, modules: &[crate::image::Module]) -> Result<Client, String> {
    let path = root.join(script);
    let commands = std::fs::read_to_string(&path).map_err(|e| format!("gdb = {}: {e}", script.display()))?;
    let module = modules.iter().find(|m| has_flag(&m.cmdline)).ok_or("gdb: no module line says gdb")?;
    Ok(Client { commands, elf: module.path.clone() })
}

/// What a scripted session's output lacks of `expected` (or that gdb never ran).
pub fn judge(expected: &[String], output: Option<&str>) -> Vec<String> {
    let Some(output) = output else {
        return if expected.is_empty() { Vec::new() } else { vec!["gdb did not run".into()] };
    };
    let missing: Vec<String> = expected
        .iter()
        .filter(|text| !output.contains(text.as_str()))
        .map(|text| format!("gdb's output lacks `{text}` (see gdb.txt in the run directory)"))
        .collect();
    missing
}

/// Whether something listens on local TCP `port` (Linux's /proc/net/tcp, state 0A).
fn listening(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 3 && format!("{} ", fields[1]).contains(&needle) && fields[3] == "0A"
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_goes_before_the_guest_args() {
        assert_eq!(with_flag("checks cpu=0 -- checks 2"), "checks cpu=0 gdb -- checks 2");
        assert_eq!(with_flag("worker cpu=1"), "worker cpu=1 gdb");
        assert!(has_flag("checks cpu=0 gdb -- checks 2"));
        assert!(!has_flag("checks cpu=0 -- gdb"));
        let (mut a, mut b) = (String::from("checks cpu=0 -- checks"), String::from("dir/worker -- survivor"));
        mark_module(&mut [&mut a, &mut b], "worker").unwrap();
        assert_eq!(b, "dir/worker gdb -- survivor");
        let err = mark_module(&mut [&mut a], "nobody").unwrap_err();
        assert!(err.contains("the guests are: checks"), "{err}");
    }

    #[test]
    fn missing_output_is_named() {
        let expected = vec!["GDB: connected".to_string(), "GDB: detached".to_string()];
        assert_eq!(judge(&expected, None), ["gdb did not run"]);
        let problems = judge(&expected, Some("GDB: connected\n"));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("`GDB: detached`"), "{problems:?}");
        assert!(judge(&[], None).is_empty());
    }

    #[test]
    fn a_listening_port_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening(port));
        drop(listener);
        assert!(!listening(port));
    }
}
