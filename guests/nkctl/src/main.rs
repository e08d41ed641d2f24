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

mod bench;
mod bind;
mod checks;
mod demo;
mod virtio_attack;

use nk::{Cap, Error};

const USAGE: &str = "usage: nkctl <command> [arguments]
commands:
  caps                   list this VM's initial and received capabilities
  null                   one empty hypercall round trip
  inspect CAP            what CAP names, its rights and holder
  derive CAP MASK        a child of CAP with the rights in MASK (e.g. 0x3)
  bind CAP [-- COMMAND]  bind CAP to this process (only it may present the name from
                         then on; one-way), then run nkctl COMMAND in the same process
  bind-check FACTORY     process binding at work: a counter bound to this process is
                         refused to a second process, unchanged, and still this one's
  revoke CAP             revoke CAP and everything derived from it
  delete CAP             delete CAP
  exo alloc ASPACE PAGES         allocate a frame set (prints its name)
  exo map FRAMES ASPACE GPA [ro] map a frame set at GPA (below 1 GiB, above RAM)
  exo unmap ASPACE GPA | exo free FRAMES
  dirty GPA PAGES        read and clear the EPT dirty bits of PAGES pages from GPA
                         (exo/aspace; the bitmap goes to a page nkctl maps at 0x3ffff000);
                         from 1 GiB (NVRAM regions) read without clearing
  nvram alloc FACTORY BYTES KEY  allocate (or find again by KEY) an NVRAM region
  nvram map REGION GPA [ro]      map it at GPA (1-2 GiB) in this VM
  nvram unmap REGION GPA | nvram begin|commit|restore|seq REGION
  mem write GPA TEXT | mem read GPA LEN   plain stores/loads through /dev/mem (root)
  bench [--fsync PATH]   nk-bench lines: ring-3 null call, 4 KiB store + NVRAM commit
                         (and pwrite + fsync of 4 KiB to PATH)
  virtio-attack REGS RING  malformed virtqueues on the virtio disk at REGS (driver unloaded)
  probe GPA              one 32-bit load at GPA through /dev/mem (all ones: nothing mapped)
  stress KEY GPA ROUNDS  commit an own 16 KiB NVRAM region ROUNDS times (one dirty page each)
  foreign VM|auto KEY    present a child of an own region delegated to VM: refused, no change
  demo [WAIT]            the layer-bypass demo: a list in an NVRAM region a keeper VM
                         delegated, verified, extended, committed, then revoked from outside
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
            let binding = match (info.bearer, info.process_bound) {
                (true, _) => "bearer",
                (false, true) => "bound to one process",
                (false, false) => "bound",
            };
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
        "bind" => {
            let (cap, rest) = match args {
                [cap] => (cap, &[][..]),
                [cap, dashes, rest @ ..] if dashes == "--" && !rest.is_empty() => (cap, rest),
                _ => return Err(Failure::Usage("bind CAP [-- COMMAND ARGS...]".into())),
            };
            bind::bind(resolve(cap)?)?;
            match rest.split_first() {
                Some((next, more)) if next != "bind" => run(next, more),
                Some(_) => Err(Failure::Usage("bind -- bind: bind several with one bind each".into())),
                None => Ok(()),
            }
        }
        "bind-check" => match args {
            [flag, name, am] if flag == "--intruder" => {
                let am = u16::try_from(number(am)?).map_err(|_| Failure::Usage(format!("'{am}' is no AM id")))?;
                bind::intrude(resolve(name)?, am).map_err(Failure::Call)
            }
            [factory] => bind::check(resolve_obj(factory)?).map_err(Failure::Call),
            _ => Err(Failure::Usage("bind-check FACTORY".into())),
        },
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
        "exo" => exo(args),
        "dirty" => {
            want(2)?;
            dirty(number(&args[0])?, number(&args[1])?)
        }
        "nvram" => nvram(args),
        "bench" => {
            let fsync = match args {
                [] => None,
                [flag, path] if flag == "--fsync" => Some(path.as_str()),
                _ => return Err(Failure::Usage("bench [--fsync PATH]".into())),
            };
            bench::run(fsync).map_err(Failure::Call)
        }
        "virtio-attack" => {
            want(2)?;
            virtio_attack::run(number(&args[0])?, number(&args[1])?).map_err(Failure::Call)
        }
        "probe" => {
            want(1)?;
            checks::probe(number(&args[0])?).map_err(Failure::Call)
        }
        "stress" => {
            want(3)?;
            checks::stress(number(&args[0])?, number(&args[1])?, number(&args[2])?).map_err(Failure::Call)
        }
        "foreign" => {
            want(2)?;
            let vm = if args[0] == "auto" {
                // The VM that delegated this VM's first received capability (the keeper).
                let first =
                    nk::received(0)?.ok_or_else(|| Failure::Call("the inbox is empty: no VM to name".into()))?;
                first.sender.ok_or_else(|| Failure::Call("an AM, not a VM, delegated the first capability".into()))?
                    as u32
            } else {
                u32::try_from(number(&args[0])?).map_err(|_| Failure::Usage("VM is a VM id or auto".into()))?
            };
            checks::foreign(vm, number(&args[1])?).map_err(Failure::Call)
        }
        "demo" => {
            arity(args, 0..=1, "demo [WAIT-SECONDS]")?;
            let wait = args.first().map(|w| number(w)).transpose()?.unwrap_or(120);
            demo::run(std::time::Duration::from_secs(wait)).map_err(Failure::Call)
        }
        "mem" => mem(args),
        "" | "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Failure::Usage(format!("unknown command '{other}'"))),
    }
}

/// Where `nkctl dirty` maps its bitmap page: the last page of the exo AM's range (below
/// 1 GiB), far above the RAM the scenarios give Linux, so `/dev/mem` may map it.
pub(crate) const BITMAP_GPA: u64 = 0x3fff_f000;
/// Where the NVRAM AM's window starts (guest-physical 1 GiB).
const NVRAM_WINDOW: u64 = 0x4000_0000;

fn arity(args: &[String], range: std::ops::RangeInclusive<usize>, what: &str) -> Result<(), Failure> {
    if range.contains(&args.len()) {
        Ok(())
    } else {
        Err(Failure::Usage(format!("{what}: wrong number of arguments")))
    }
}

fn exo(args: &[String]) -> Result<(), Failure> {
    let sub = args.first().map(String::as_str).unwrap_or("");
    match sub {
        "alloc" => {
            arity(args, 3..=3, "exo alloc ASPACE PAGES")?;
            let frames = nk::exo::alloc(resolve_obj(&args[1])?, number(&args[2])?, false)?;
            println!("{}", frames.cap);
        }
        "map" => {
            arity(args, 4..=5, "exo map FRAMES ASPACE GPA [ro]")?;
            let access = if args.get(4).map(String::as_str) == Some("ro") { 1 } else { 3 };
            nk::exo::map(resolve_obj(&args[1])?, resolve_obj(&args[2])?, number(&args[3])?, access)?;
            println!("mapped at {:#x}", number(&args[3])?);
        }
        "unmap" => {
            arity(args, 3..=3, "exo unmap ASPACE GPA")?;
            nk::exo::unmap(resolve_obj(&args[1])?, number(&args[2])?)?;
            println!("unmapped");
        }
        "free" => {
            arity(args, 2..=2, "exo free FRAMES")?;
            nk::exo::free(resolve_obj(&args[1])?)?;
            println!("freed");
        }
        other => return Err(Failure::Usage(format!("unknown exo command '{other}'"))),
    }
    Ok(())
}

/// Reads and clears the dirty bits of `pages` pages from `gpa` through the exo AM: a
/// one-page frame set for the bitmap is allocated with `exo/aspace`, mapped at
/// [`BITMAP_GPA`], read through `/dev/mem`, then unmapped and freed.
fn dirty(gpa: u64, pages: u64) -> Result<(), Failure> {
    if pages == 0 || pages > 4096 * 8 {
        return Err(Failure::Usage(format!("PAGES must be 1 to {} (one bitmap page)", 4096 * 8)));
    }
    let aspace = resolve_obj("exo/aspace")?;
    let bitmap = nk::exo::alloc(aspace, 1, false)?;
    let result = (|| {
        nk::exo::map(bitmap, aspace, BITMAP_GPA, 3)?;
        let outcome = (|| {
            // In the NVRAM window (from 1 GiB) the flags are the NVRAM AM's write set:
            // read them without clearing.
            let keep = gpa >= NVRAM_WINDOW;
            if keep {
                nk::exo::dirty_keep(aspace, bitmap, gpa, pages, 0)?;
            } else {
                nk::exo::dirty(aspace, bitmap, gpa, pages, 0)?;
            }
            let bytes = nk::map_phys(BITMAP_GPA, 4096).map_err(Failure::Call)?;
            let list = nk::exo::dirty_pages(bytes, pages);
            let shown: Vec<String> = list.iter().map(|p| p.to_string()).collect();
            let how = if keep { " (read, left set for the NVRAM AM's commit)" } else { "" };
            println!("dirty: {} of {pages} pages from {gpa:#x}: [{}]{how}", list.len(), shown.join(","));
            Ok(())
        })();
        let _ = nk::exo::unmap(aspace, BITMAP_GPA);
        outcome
    })();
    let _ = nk::exo::free(bitmap);
    result
}

fn nvram(args: &[String]) -> Result<(), Failure> {
    let sub = args.first().map(String::as_str).unwrap_or("");
    match sub {
        "alloc" => {
            arity(args, 4..=4, "nvram alloc FACTORY BYTES KEY")?;
            let r = nk::nvram::allocate(resolve_obj(&args[1])?, number(&args[2])?, number(&args[3])?)?;
            let how = if r.created { "created" } else { "restored" };
            println!("region {} {} bytes seq {} {how}", r.region.cap, r.bytes, r.seq);
        }
        "map" => {
            arity(args, 3..=4, "nvram map REGION GPA [ro]")?;
            let write = args.get(3).map(String::as_str) != Some("ro");
            nk::nvram::map(resolve_obj(&args[1])?, number(&args[2])?, write)?;
            println!("mapped at {:#x}", number(&args[2])?);
        }
        "unmap" => {
            arity(args, 3..=3, "nvram unmap REGION GPA")?;
            nk::nvram::unmap(resolve_obj(&args[1])?, number(&args[2])?)?;
            println!("unmapped");
        }
        "begin" => {
            arity(args, 2..=2, "nvram begin REGION")?;
            println!("begun at seq {}", nk::nvram::begin(resolve_obj(&args[1])?)?);
        }
        "commit" => {
            arity(args, 2..=2, "nvram commit REGION")?;
            let c = nk::nvram::commit(resolve_obj(&args[1])?)?;
            println!(
                "committed seq {}: {} dirty pages (EPT dirty bits), {} blocks, {} device bytes",
                c.seq, c.dirty_pages, c.blocks, c.device_bytes
            );
        }
        "restore" => {
            arity(args, 2..=2, "nvram restore REGION")?;
            println!("restored to seq {}", nk::nvram::restore(resolve_obj(&args[1])?)?);
        }
        "seq" => {
            arity(args, 2..=2, "nvram seq REGION")?;
            let (seq, bytes, open) = nk::nvram::seq(resolve_obj(&args[1])?)?;
            println!("seq {seq} bytes {bytes}{}", if open { " transaction open" } else { "" });
        }
        other => return Err(Failure::Usage(format!("unknown nvram command '{other}'"))),
    }
    Ok(())
}

fn mem(args: &[String]) -> Result<(), Failure> {
    let sub = args.first().map(String::as_str).unwrap_or("");
    match sub {
        "write" => {
            arity(args, 3..=3, "mem write GPA TEXT")?;
            let text = args[2].as_bytes();
            let bytes = nk::map_phys(number(&args[1])?, text.len().max(1)).map_err(Failure::Call)?;
            bytes[..text.len()].copy_from_slice(text);
            println!("wrote {} bytes at {}", text.len(), args[1]);
        }
        "read" => {
            arity(args, 3..=3, "mem read GPA LEN")?;
            let len = usize::try_from(number(&args[2])?).unwrap_or(usize::MAX).clamp(1, 4096);
            let bytes = nk::map_phys(number(&args[1])?, len).map_err(Failure::Call)?;
            println!("{}", String::from_utf8_lossy(bytes).trim_end_matches('\0'));
        }
        other => return Err(Failure::Usage(format!("unknown mem command '{other}'"))),
    }
    Ok(())
}

/// Resolves a label of the NKCP table to its capability and AM.
pub(crate) fn label_obj(label: &str) -> Result<nk::Obj, String> {
    match resolve_obj(label) {
        Ok(obj) => Ok(obj),
        Err(Failure::Call(why) | Failure::Usage(why)) => Err(why),
    }
}

/// Resolves a capability and its AM: a label's AM comes from the NKCP table, any other
/// name's from one `inspect` call.
fn resolve_obj(text: &str) -> Result<nk::Obj, Failure> {
    if text.contains('/') {
        let (label, nth) = split_label(text)?;
        let handed = nk::handed_caps().map_err(Failure::Call)?;
        return handed
            .iter()
            .filter(|entry| entry.label == label)
            .nth(nth)
            .map(|entry| nk::Obj { cap: entry.cap, am: entry.am })
            .ok_or_else(|| Failure::Call(format!("no capability labelled {text} was handed over (see nkctl caps)")));
    }
    Ok(nk::Obj::of(resolve(text)?)?)
}

fn split_label(text: &str) -> Result<(&str, usize), Failure> {
    Ok(match text.split_once('#') {
        Some((label, nth)) => (
            label,
            nth.parse::<usize>().map_err(|_| Failure::Usage(format!("'{text}': write LABEL#N, e.g. exo/frames#1")))?,
        ),
        None => (text, 0),
    })
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
