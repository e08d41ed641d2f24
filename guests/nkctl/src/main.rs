//! `nkctl`: the null-Kernel from a Linux shell (layer bypass, seed §5.2.2).
//!
//! A capability argument is written as a label of the VM's NKCP table (`exo/frames`;
//! `exo/frames#1` for the second so labelled: the capabilities the VM's operator handed to
//! root's processes, `nk::handed_caps`), `iN` (the process's N-th initial capability,
//! where the module line says `ring3-caps`), `rN` (the N-th in its inbox) or as the 32 hex
//! digits `nkctl caps` prints. Every failure is
//! one line on stderr, `nkctl: <command>: <what went wrong>`, and exit status 1; a usage
//! mistake exits with 2.

use std::process::ExitCode;

use nk::{Cap, Error};

const USAGE: &str = "usage: nkctl <command> [arguments]
commands:
  caps                   list this VM's initial and received capabilities
  null                   one empty hypercall round trip
  inspect CAP            what CAP names, its rights and holder
  derive CAP MASK        a child of CAP with the rights in MASK (e.g. 0x3)
  revoke CAP             revoke CAP and everything derived from it
  delete CAP             delete CAP
a CAP is a label from nkctl caps (e.g. exo/frames, exo/frames#1 for the second),
iN (N-th initial capability), rN (N-th received) or 32 hex digits";

/// A usage mistake (exit 2) or a refused call (exit 1), with its message.
enum Failure {
    Usage(String),
    Call(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Call(error.reason())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or("");
    match run(command, &args[1.min(args.len())..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("nkctl: {message}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Call(message)) => {
            eprintln!("nkctl: {command}: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: &str, args: &[String]) -> Result<(), Failure> {
    let want = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(Failure::Usage(format!("{command} takes {n} argument(s), got {}", args.len())))
        }
    };
    match command {
        "caps" => {
            want(0)?;
            caps()
        }
        "null" => {
            want(0)?;
            nk::null()?;
            println!("null: ok");
            Ok(())
        }
        "inspect" => {
            want(1)?;
            let cap = resolve(&args[0])?;
            let info = nk::inspect(cap)?;
            let holder = if info.holder_is_am { format!("AM {}", info.holder) } else { format!("vm{}", info.holder) };
            let binding = if info.bearer { "bearer" } else { "bound" };
            println!(
                "{cap}: AM {} kind {} object {} rights {:#x} held by {holder} ({binding})",
                info.am, info.kind, info.object, info.rights
            );
            Ok(())
        }
        "derive" => {
            want(2)?;
            let cap = resolve(&args[0])?;
            let mask = number(&args[1])?;
            println!("{}", nk::derive(cap, mask)?);
            Ok(())
        }
        "revoke" => {
            want(1)?;
            let count = nk::revoke(resolve(&args[0])?)?;
            println!("revoked {count} capabilities");
            Ok(())
        }
        "delete" => {
            want(1)?;
            nk::delete(resolve(&args[0])?)?;
            println!("deleted");
            Ok(())
        }
        "" | "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Failure::Usage(format!("unknown command '{other}'"))),
    }
}

fn caps() -> Result<(), Failure> {
    // What the operator handed over (root only), then what the VM may list itself.
    match nk::handed_caps() {
        Ok(handed) => {
            println!("{} handed over in {}", handed.len(), nk::NKCP_PATH);
            for entry in &handed {
                println!("{} {} AM {} kind {}", entry.label, entry.cap, entry.am, entry.kind);
            }
        }
        Err(why) => println!("none handed over: {why}"),
    }
    let (initial, received) = match nk::all_caps() {
        Ok(lists) => lists,
        Err(nk::Error::Refused { status, .. }) if status.code() == nk::Status::NOT_PERMITTED => {
            println!("listing from ring 3 is not permitted (the module line lacks ring3-caps)");
            return Ok(());
        }
        Err(error) => return Err(error.into()),
    };
    println!("{} initial, {} received", initial.len(), received.len());
    for (index, entry) in initial.iter().enumerate() {
        println!("i{index} {} AM {}", entry.cap, entry.am);
    }
    for (index, entry) in received.iter().enumerate() {
        let from = entry.sender.map_or_else(|| "an AM".to_string(), |vm| format!("vm{vm}"));
        println!("r{index} {} AM {} from {from}", entry.cap, entry.am);
    }
    Ok(())
}

/// Turns `iN`, `rN`, a label of the NKCP table (`exo/frames`, or `exo/frames#1` for the
/// second with that label) or a hex name into a capability name.
fn resolve(text: &str) -> Result<Cap, Failure> {
    if text.contains('/') {
        let (label, nth) = match text.split_once('#') {
            Some((label, nth)) => (
                label,
                nth.parse::<usize>()
                    .map_err(|_| Failure::Usage(format!("'{text}': write LABEL#N, e.g. exo/frames#1")))?,
            ),
            None => (text, 0),
        };
        let handed = nk::handed_caps().map_err(Failure::Call)?;
        return handed
            .iter()
            .filter(|entry| entry.label == label)
            .nth(nth)
            .map(|entry| entry.cap)
            .ok_or_else(|| Failure::Call(format!("no capability labelled {text} was handed over (see nkctl caps)")));
    }
    let indexed = |rest: &str| rest.parse::<u64>().ok();
    if let Some(index) = text.strip_prefix('i').and_then(indexed) {
        return nk::initial(index)?
            .map(|entry| entry.cap)
            .ok_or_else(|| Failure::Call(format!("no initial capability {index} (see nkctl caps)")));
    }
    if let Some(index) = text.strip_prefix('r').and_then(indexed) {
        return nk::received(index)?
            .map(|entry| entry.cap)
            .ok_or_else(|| Failure::Call(format!("no received capability {index} (see nkctl caps)")));
    }
    text.parse::<Cap>().map_err(Failure::Usage)
}

fn number(text: &str) -> Result<u64, Failure> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| Failure::Usage(format!("'{text}' is not a number: write e.g. 3 or 0x3")))
}
