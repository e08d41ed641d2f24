//! Parses the hypervisor command line: whitespace-separated `key=value` or bare `key`
//! tokens. Options are described by one table ([`OPTIONS`]); adding an option is one entry
//! there and one field in [`Options`]. Parsing never fails: an unknown option, a bad value or
//! a repeated option becomes a [`Diagnostic`] (one WARN line each, docs/emulator-protocol.md)
//! and boot goes on with the defaults.

use core::fmt;

use crate::fixed::FixedList;

/// The most diagnostics kept; further ones are counted in [`Diagnostic::Suppressed`].
pub const MAX_DIAGNOSTICS: usize = 8;

/// The largest `cpus=` value.
pub const MAX_CPUS: u32 = 256;

/// Chooses how much the hypervisor logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Normal progress (the default).
    #[default]
    Info,
    /// Details for debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// Every level, least verbose first.
    pub const ALL: [LogLevel; 5] = [LogLevel::Error, LogLevel::Warn, LogLevel::Info, LogLevel::Debug, LogLevel::Trace];

    /// Returns the name `log=` takes.
    pub const fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// Finds the level called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|level| level.name() == name)
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Holds the settings the command line chose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options<'a> {
    /// `log=<error|warn|info|debug|trace>`; `info` by default.
    pub log: LogLevel,
    /// `cpus=<1..=256>`: how many CPUs to bring up; `None` (the default) means all.
    pub cpus: Option<u32>,
    /// `test=<filter>`: which in-emulator test cases to run (test build); `None` by default.
    pub test: Option<&'a str>,
    /// `place=<guest>@<cpu>[,...]`: which CPU each named guest runs on; see
    /// [`Options::placements`].
    pub place: Option<&'a str>,
    /// `nvram-crash-after=<k>`: the machine stops dead, as a power cut, right after the
    /// NVRAM device's k-th write completes (crash tests of the NVRAM AM); `None` by default.
    pub nvram_crash_after: Option<u64>,
    /// `memmap=<size>!<start>` (Linux's syntax): RAM `[start, start + size)` is set aside as
    /// emulated persistent memory for the NVRAM AM (volatile: lost at power off); `None` by
    /// default. See [`PmemEmulation`].
    pub memmap: Option<PmemEmulation>,
}

/// A RAM range the command line sets aside to emulate persistent memory (`memmap=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmemEmulation {
    /// The first byte (4 KiB-aligned).
    pub start: u64,
    /// The length in bytes (a non-zero multiple of 4 KiB; `start + size` does not wrap).
    pub size: u64,
}

impl PmemEmulation {
    /// Returns the end (exclusive).
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

impl<'a> Options<'a> {
    /// Returns the `place=` pairs (guest name, CPU index), in order. The value was checked
    /// when parsed, so every pair is well formed.
    pub fn placements(&self) -> impl Iterator<Item = (&'a str, u32)> {
        self.place.unwrap_or("").split(',').filter_map(|pair| {
            let (name, cpu) = pair.split_once('@')?;
            Some((name, cpu.parse().ok()?))
        })
    }
}

/// Describes one option: its name, what its value must be, and how it sets [`Options`].
#[derive(Clone, Copy)]
pub struct OptionSpec {
    /// The key before `=`.
    pub name: &'static str,
    /// What a valid value is, completing "expected ...".
    pub expected: &'static str,
    /// A valid token, completing "e.g. ...".
    pub example: &'static str,
    /// Stores the value (`None` for a bare key) in the options; `false` when it is invalid,
    /// leaving the options unchanged.
    apply: for<'a> fn(&mut Options<'a>, Option<&'a str>) -> bool,
}

impl fmt::Debug for OptionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptionSpec").field("name", &self.name).field("expected", &self.expected).finish()
    }
}

/// The options the command line knows, in the order diagnostics list them.
pub static OPTIONS: [OptionSpec; 6] = [
    OptionSpec {
        name: "log",
        expected: "one of error, warn, info, debug, trace",
        example: "log=debug",
        apply: apply_log,
    },
    OptionSpec { name: "cpus", expected: "a number from 1 to 256", example: "cpus=4", apply: apply_cpus },
    OptionSpec {
        name: "test",
        expected: "a filter of a-z, 0-9, '_', '*', ',' and '-'",
        example: "test=vmx_*",
        apply: apply_test,
    },
    OptionSpec {
        name: "place",
        expected: "<guest>@<cpu> pairs separated by commas (names of a-z, 0-9, '_' and '-')",
        example: "place=checks@0,worker@1",
        apply: apply_place,
    },
    OptionSpec {
        name: "nvram-crash-after",
        expected: "a number of NVRAM device writes from 1 to 1000000000",
        example: "nvram-crash-after=5",
        apply: apply_nvram_crash_after,
    },
    OptionSpec {
        name: "memmap",
        expected: "<size>!<start>, 4 KiB-aligned numbers (decimal or 0x hex, suffix K, M or G)",
        example: "memmap=16M!96M",
        apply: apply_memmap,
    },
];

/// Reads a size or address: decimal or `0x` hex, optionally followed by K, M or G (binary
/// multiples); `None` on anything else or on overflow.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value = match digits.strip_prefix("0x") {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()?
        }
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => digits.parse().ok()?,
        _ => return None,
    };
    value.checked_mul(1u64 << shift)
}

/// Sets `memmap=<size>!<start>`: both 4 KiB-aligned, the size non-zero, the end within
/// 2^52 (the physical address space).
fn apply_memmap<'a>(options: &mut Options<'a>, value: Option<&'a str>) -> bool {
    const PAGE: u64 = 4096;
    let parsed = value.and_then(|v| v.split_once('!')).and_then(|(size, start)| {
        let (size, start) = (parse_size(size)?, parse_size(start)?);
        let aligned = size > 0 && size % PAGE == 0 && start % PAGE == 0;
        (aligned && start.checked_add(size).is_some_and(|end| end <= 1 << 52)).then_some(PmemEmulation { start, size })
    });
    match parsed {
        Some(range) => {
            options.memmap = Some(range);
            true
        }
        None => false,
    }
}

/// The largest `nvram-crash-after=` value.
pub const MAX_NVRAM_CRASH_AFTER: u64 = 1_000_000_000;

/// Sets `nvram-crash-after=` from a decimal number in 1..=1e9 (digits only).
fn apply_nvram_crash_after<'a>(options: &mut Options<'a>, value: Option<&'a str>) -> bool {
    let parsed = value
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| (1..=MAX_NVRAM_CRASH_AFTER).contains(n));
    match parsed {
        Some(writes) => {
            options.nvram_crash_after = Some(writes);
            true
        }
        None => false,
    }
}

/// Sets `place=` from `<name>@<cpu>` pairs: names of `[a-z0-9_-]`, CPUs in 0..256.
fn apply_place<'a>(options: &mut Options<'a>, value: Option<&'a str>) -> bool {
    let valid_pair = |pair: &str| {
        let Some((name, cpu)) = pair.split_once('@') else { return false };
        let name_ok = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        let cpu_ok = !cpu.is_empty()
            && cpu.bytes().all(|b| b.is_ascii_digit())
            && cpu.parse::<u32>().is_ok_and(|n| n < MAX_CPUS);
        name_ok && cpu_ok
    };
    match value.filter(|v| !v.is_empty() && v.split(',').all(valid_pair)) {
        Some(place) => {
            options.place = Some(place);
            true
        }
        None => false,
    }
}

/// Sets `log=` from a level name.
fn apply_log<'a>(options: &mut Options<'a>, value: Option<&'a str>) -> bool {
    match value.and_then(LogLevel::from_name) {
        Some(level) => {
            options.log = level;
            true
        }
        None => false,
    }
}

/// Sets `cpus=` from a decimal number in 1..=256 (digits only: no sign, no spaces).
fn apply_cpus<'a>(options: &mut Options<'a>, value: Option<&'a str>) -> bool {
    let parsed = value
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| (1..=MAX_CPUS).contains(n));
    match parsed {
        Some(cpus) => {
            options.cpus = Some(cpus);
            true
        }
        None => false,
    }
}

/// Sets `test=` from a non-empty filter of `[a-z0-9_*,-]`.
fn apply_test<'a>(options: &mut Options<'a>, value: Option<&'a str>) -> bool {
    let is_filter_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'*' | b',' | b'-');
    match value.filter(|v| !v.is_empty() && v.bytes().all(is_filter_byte)) {
        Some(filter) => {
            options.test = Some(filter);
            true
        }
        None => false,
    }
}

/// Reports one problem with the command line; `Display` renders the message of one
/// `cmdline:` WARN line (docs/emulator-protocol.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diagnostic<'a> {
    /// A key no [`OptionSpec`] names.
    UnknownOption { name: &'a str },
    /// A value the option does not accept; the option keeps its previous value.
    BadValue { option: &'static str, value: &'a str, expected: &'static str, example: &'static str },
    /// A bare key for an option that needs a value.
    MissingValue { option: &'static str, expected: &'static str, example: &'static str },
    /// An option given again; the last valid value wins.
    Repeated { option: &'static str, previous: &'a str, current: &'a str },
    /// This many further diagnostics did not fit in [`MAX_DIAGNOSTICS`].
    Suppressed { count: usize },
}

impl fmt::Display for Diagnostic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Diagnostic::UnknownOption { name } => {
                write!(f, "unknown option '{name}' (known: ")?;
                for (index, spec) in OPTIONS.iter().enumerate() {
                    let separator = if index == 0 { "" } else { ", " };
                    write!(f, "{separator}{}", spec.name)?;
                }
                f.write_str(")")
            }
            Diagnostic::BadValue { option, value, expected, example } => {
                write!(f, "bad value '{value}' for '{option}': expected {expected}, e.g. {example}")
            }
            Diagnostic::MissingValue { option, expected, example } => {
                write!(f, "missing value for '{option}': expected {expected}, e.g. {example}")
            }
            Diagnostic::Repeated { option, previous, current } => write!(
                f,
                "option '{option}' given more than once ('{previous}', then '{current}'): the last valid one wins"
            ),
            Diagnostic::Suppressed { count } => write!(f, "{count} more diagnostics not shown"),
        }
    }
}

/// Holds the parsed options and what was wrong with the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The settings, defaults where the command line said nothing valid.
    pub options: Options<'a>,
    diagnostics: FixedList<Diagnostic<'a>, MAX_DIAGNOSTICS>,
    suppressed: usize,
}

impl<'a> Parsed<'a> {
    /// Returns the diagnostics in command-line order, then a [`Diagnostic::Suppressed`] if
    /// some did not fit.
    pub fn diagnostics(&self) -> impl Iterator<Item = Diagnostic<'a>> + '_ {
        let suppressed = (self.suppressed > 0).then_some(Diagnostic::Suppressed { count: self.suppressed });
        self.diagnostics.iter().copied().chain(suppressed)
    }

    /// Tells whether the command line was free of problems.
    pub fn is_clean(&self) -> bool {
        self.diagnostics.is_empty() && self.suppressed == 0
    }

    /// Keeps a diagnostic, or counts it when the list is full.
    fn report(&mut self, diagnostic: Diagnostic<'a>) {
        if self.diagnostics.push(diagnostic).is_err() {
            self.suppressed = self.suppressed.saturating_add(1);
        }
    }
}

/// Parses `cmdline`. Tokens are split on ASCII whitespace; a leading token starting with
/// `/` is the image path some loaders prepend and is skipped. Each option is applied in
/// order, so the last valid occurrence wins; a bad value leaves the option as it was.
pub fn parse(cmdline: &str) -> Parsed<'_> {
    let mut parsed = Parsed {
        options: Options::default(),
        diagnostics: FixedList::with_filler(Diagnostic::Suppressed { count: 0 }),
        suppressed: 0,
    };
    let mut seen: [Option<&str>; OPTIONS.len()] = [None; OPTIONS.len()];
    let mut tokens = cmdline.split_ascii_whitespace().peekable();
    if tokens.peek().is_some_and(|first| first.starts_with('/')) {
        tokens.next();
    }
    for token in tokens {
        let (name, value) = match token.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (token, None),
        };
        let Some((index, spec)) = OPTIONS.iter().enumerate().find(|(_, spec)| spec.name == name) else {
            parsed.report(Diagnostic::UnknownOption { name });
            continue;
        };
        if let Some(slot) = seen.get_mut(index) {
            if let Some(previous) = slot.replace(token) {
                parsed.report(Diagnostic::Repeated { option: spec.name, previous, current: token });
            }
        }
        if !(spec.apply)(&mut parsed.options, value) {
            let (option, expected, example) = (spec.name, spec.expected, spec.example);
            parsed.report(match value {
                Some(value) => Diagnostic::BadValue { option, value, expected, example },
                None => Diagnostic::MissingValue { option, expected, example },
            });
        }
    }
    parsed
}
