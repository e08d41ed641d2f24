use super::*;
use proptest::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

/// 64 KiB of guest memory.
#[derive(Debug)]
struct Ram(Vec<u8>);

impl GuestMemory for Ram {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(end) = gpa.checked_add(buf.len() as u64) else { return false };
        if end > self.0.len() as u64 {
            return false;
        }
        buf.copy_from_slice(&self.0[gpa as usize..end as usize]);
        true
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(end) = gpa.checked_add(data.len() as u64) else { return false };
        if end > self.0.len() as u64 {
            return false;
        }
        self.0[gpa as usize..end as usize].copy_from_slice(data);
        true
    }
}

#[derive(Debug, Clone, Default)]
struct Wire(Rc<RefCell<Vec<u8>>>);

impl Connection for Wire {
    type Error = ();
    fn write(&mut self, byte: u8) -> Result<(), ()> {
        self.0.borrow_mut().push(byte);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

impl Wire {
    fn take(&self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut *self.0.borrow_mut())).into_owned()
    }
}

fn ram() -> Ram {
    let mut ram = Ram(vec![0; 0x10000]);
    for (i, byte) in ram.0.iter_mut().enumerate().skip(0x8000) {
        *byte = i as u8;
    }
    ram
}

fn start() -> (Session<Ram, Wire>, Wire) {
    let wire = Wire::default();
    let snapshot = Snapshot { rip: 0x8000, rflags: 0x2, gprs: [7; 16], ..Snapshot::default() };
    (Session::new(ram(), wire.clone(), snapshot), wire)
}

fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Sends one packet; returns the last event and the reply's body (ack stripped).
fn send(session: &mut Session<Ram, Wire>, wire: &Wire, body: &str) -> (Event, String) {
    let mut event = Event::None;
    for byte in packet(body) {
        let e = session.receive(byte);
        if e != Event::None {
            event = e;
        }
    }
    let reply = wire.take();
    let reply = reply.strip_prefix('+').unwrap_or(&reply).to_string();
    (event, reply)
}

/// The reply's body, run-length encoding undone (`X*n`: n - 29 more copies of X).
fn body(reply: &str) -> String {
    let raw = reply.strip_prefix('$').and_then(|r| r.rsplit_once('#')).map_or(reply, |(b, _)| b);
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '*' {
            let last = out.chars().last().unwrap_or('0');
            let n = chars.next().map_or(0, |n| n as usize - 29);
            out.extend(std::iter::repeat_n(last, n));
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn registers_memory_breakpoints_step_and_continue() {
    let (mut s, wire) = start();
    let (_, reply) = send(&mut s, &wire, "?");
    assert!(body(&reply).starts_with('S') || body(&reply).starts_with('T'), "{reply}");
    let (_, reply) = send(&mut s, &wire, "g");
    // rax = 7 little-endian, then rip 0x8000 at register 16.
    assert!(body(&reply).starts_with("0700000000000000"), "{reply}");
    assert_eq!(&body(&reply)[16 * 16..17 * 16], "0080000000000000");
    let (_, reply) = send(&mut s, &wire, "m8010,4");
    assert_eq!(body(&reply), "10111213");
    let (_, reply) = send(&mut s, &wire, "m20000,4");
    assert!(body(&reply).starts_with('E'), "outside the guest's memory: {reply}");
    let (_, reply) = send(&mut s, &wire, "M8010,2:aabb");
    assert_eq!(body(&reply), "OK");
    let (_, reply) = send(&mut s, &wire, "Z0,8020,1");
    assert_eq!(body(&reply), "OK");
    assert!(s.is_breakpoint(0x8020));
    assert_eq!(s.target.memory.0[0x8020], INT3);
    let (_, reply) = send(&mut s, &wire, "m8010,4");
    assert_eq!(body(&reply), "aabb1213");
    let (_, reply) = send(&mut s, &wire, "m801e,4");
    assert_eq!(body(&reply), "1e1f2021", "reads show the original byte under a breakpoint");
    // Write RIP: gdb falls back to `G` (no single-register access).
    let (_, regs) = send(&mut s, &wire, "g");
    let mut regs = body(&regs);
    regs.replace_range(16 * 16..17 * 16, "1080000000000000");
    let (_, reply) = send(&mut s, &wire, &format!("G{regs}"));
    assert_eq!(body(&reply), "OK");
    assert_eq!(s.take_changes().map(|snap| snap.rip), Some(0x8010));
    assert_eq!(s.take_changes(), None);

    let (event, _) = send(&mut s, &wire, "vCont;s");
    assert_eq!(event, Event::Resume(Resume::Step));
    assert_eq!(s.state(), State::Running);
    let snap = Snapshot { rip: 0x8011, ..s.snapshot().clone() };
    assert_eq!(s.stopped(snap, StopReason::Step), Event::None);
    let reply = body(&wire.take());
    assert!(reply.starts_with("S05") || reply.starts_with("T05"), "{reply}");
    let (event, _) = send(&mut s, &wire, "vCont;c");
    assert_eq!(event, Event::Resume(Resume::Continue));
    let snap = Snapshot { rip: 0x8020, ..s.snapshot().clone() };
    s.stopped(snap, StopReason::Breakpoint);
    assert!(wire.take().contains("swbreak"));
    // Ctrl-C while running.
    send(&mut s, &wire, "c");
    assert_eq!(s.receive(0x03), Event::Interrupt);
    s.stopped(s.snapshot().clone(), StopReason::Interrupted);
    let reply = body(&wire.take());
    assert!(reply.starts_with("S02") || reply.starts_with("T02"), "{reply}");

    let (event, _) = send(&mut s, &wire, "D");
    assert_eq!(event, Event::Detached);
    assert_eq!(s.target.memory.0[0x8020], 0x20, "detaching puts the original bytes back");
    // A new connection: the first byte asks the guest to stop, then the session starts.
    assert_eq!(s.receive(b'+'), Event::Interrupt);
    s.stopped(s.snapshot().clone(), StopReason::Interrupted);
    assert_eq!(s.state(), State::Stopped);
    let (_, reply) = send(&mut s, &wire, "m8010,1");
    assert_eq!(body(&reply), "aa");
}

#[test]
fn a_stop_after_a_broken_session_leaves_the_guest_free() {
    let (mut s, wire) = start();
    let (event, _) = send(&mut s, &wire, "vCont;s");
    assert_eq!(event, Event::Resume(Resume::Step));
    // A packet with a bad body while it runs: gdbstub gives up, the guest runs free.
    s.detach();
    assert_eq!(s.state(), State::Detached);
    assert_eq!(s.stopped(s.snapshot().clone(), StopReason::Step), Event::None);
    assert_eq!(s.state(), State::Detached, "nobody asked for that stop");
}

#[test]
fn an_exit_ends_the_session() {
    let (mut s, wire) = start();
    send(&mut s, &wire, "c");
    s.exited(0);
    assert!(wire.take().contains("W00"));
    assert_eq!(s.state(), State::Detached);
}

#[test]
fn breakpoints_are_bounded() {
    let (mut s, wire) = start();
    for i in 0..MAX_BREAKPOINTS as u64 {
        let (_, reply) = send(&mut s, &wire, &format!("Z0,{:x},1", 0x9000 + i));
        assert_eq!(body(&reply), "OK");
    }
    let (_, reply) = send(&mut s, &wire, "Z0,a000,1");
    assert_ne!(body(&reply), "OK");
    let (_, reply) = send(&mut s, &wire, "Z0,ffff0000,1");
    assert_ne!(body(&reply), "OK");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No byte stream panics the stub, and whatever state it ends in is one of the three.
    #[test]
    fn no_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (mut s, _wire) = start();
        for byte in bytes {
            if s.receive(byte) == Event::Interrupt {
                s.stopped(s.snapshot().clone(), StopReason::Interrupted);
            }
        }
    }

    /// Well-framed packets of random commands (the checksums right) do not panic it
    /// either, and a running guest's stop is always accepted.
    #[test]
    fn no_packet_panics(bodies in proptest::collection::vec("[a-zA-Z?!][ -~]{0,40}", 1..12)) {
        let (mut s, wire) = start();
        for body in bodies {
            let body = body.replace(['$', '#', '}', '*'], "");
            for byte in packet(&body) {
                match s.receive(byte) {
                    Event::Interrupt => { s.stopped(s.snapshot().clone(), StopReason::Interrupted); }
                    Event::Resume(_) => { s.stopped(s.snapshot().clone(), StopReason::Step); }
                    _ => {}
                }
            }
            wire.take();
        }
    }
}
