//! Process binding from a shell (issue 13's stretch): `nkctl bind CAP [-- COMMAND...]`
//! binds a capability to this nkctl process and then runs one more nkctl command in the
//! same process (a binding made by a process that exits at once is of no use), and
//! `nkctl bind-check FACTORY` shows the binding at work with two processes: it creates a
//! counter, binds it, uses it, then starts a second process (another page-table root) that
//! presents the same name to every operation and must be refused with nothing changed,
//! and uses the counter again.

use nk::{Cap, Obj, Status};

/// Prints what [`nk::bind`] answered.
pub fn bind(cap: Cap) -> Result<(), nk::Error> {
    let root = nk::bind(cap)?;
    println!("bound {cap} to this process (pid {}, page-table root {root:#x})", std::process::id());
    Ok(())
}

/// Process A: creates a counter with `factory`, binds it to itself, adds 1, lets process B
/// (`nkctl bind-check --intruder NAME`, a child process: another page-table root) present
/// the name, checks that the counter is still 1 and B's attempts left it alone, adds 1
/// again, and deletes it.
pub fn check(factory: Obj) -> Result<(), String> {
    let counter = nk::counter::create(factory).map_err(|e| e.to_string())?;
    let root = nk::bind(counter.cap).map_err(|e| e.to_string())?;
    let info = nk::inspect(counter.cap).map_err(|e| e.to_string())?;
    if !info.process_bound {
        return Err("inspect does not report the counter process-bound".into());
    }
    let first = nk::counter::add(counter, 1).map_err(|e| e.to_string())?;
    println!("bind-check: A (pid {}) bound counter to root {root:#x} and added 1: {first}", std::process::id());
    let exe = std::env::current_exe().map_err(|e| format!("cannot find nkctl itself: {e}"))?;
    let intruder = std::process::Command::new(exe)
        .args(["bind-check", "--intruder", &counter.cap.to_string(), &counter.am.to_string()])
        .status()
        .map_err(|e| format!("cannot start process B: {e}"))?;
    if !intruder.success() {
        return Err(format!("process B was not refused everything ({intruder})"));
    }
    let value = nk::counter::read(counter).map_err(|e| e.to_string())?;
    if value != 1 {
        return Err(format!("the counter is {value} after B's attempts, not 1"));
    }
    let second = nk::counter::add(counter, 1).map_err(|e| e.to_string())?;
    println!("bind-check: A still uses it: the counter was {value}, now {second}");
    nk::delete(counter.cap).map_err(|e| e.to_string())?;
    println!("bind-check: ok");
    Ok(())
}

/// Process B: presents A's process-bound `name` (of AM `am`) to every operation; each must
/// be refused with `WRONG_HOLDER`.
pub fn intrude(name: Cap, am: u16) -> Result<(), String> {
    let counter = Obj { cap: name, am };
    let tries: [(&str, Result<(), nk::Error>); 7] = [
        ("add", nk::counter::add(counter, 100).map(|_| ())),
        ("read", nk::counter::read(counter).map(|_| ())),
        ("inspect", nk::inspect(name).map(|_| ())),
        ("derive", nk::derive(name, u64::MAX).map(|_| ())),
        ("bind", nk::bind(name).map(|_| ())),
        ("revoke", nk::revoke(name).map(|_| ())),
        ("delete", nk::delete(name)),
    ];
    for (what, result) in tries {
        match result {
            Err(error) if error.status().is_some_and(|s| s.code() == Status::WRONG_HOLDER) => {
                println!("bind-check: B (pid {}) {what}: {}", std::process::id(), error.reason());
            }
            other => return Err(format!("{what} of another process's capability: {other:?}")),
        }
    }
    Ok(())
}
