//! Property tests: no input makes a parser panic, accepted boot information keeps its
//! invariants, and the usable ranges match a page-by-page model.

use proptest::prelude::*;

use super::mb2::{full_mbi, MbiBuilder};
use super::pvh::{StartInfo, BASE, MEMORY_LEN, START_INFO};
use super::VecMemory;
use crate::memory::{usable_ranges, PhysRange, PAGE_SIZE};
use crate::{multiboot2, pvh, BootInfo, MemoryKind, MemoryRegion, MAX_MODULES, MAX_REGIONS};

/// Checks what every accepted `BootInfo` promises.
fn check_invariants(info: &BootInfo<'_>) -> Result<(), TestCaseError> {
    prop_assert!(info.memory_map().len() <= MAX_REGIONS);
    prop_assert!(info.modules().len() <= MAX_MODULES);
    for region in info.memory_map() {
        prop_assert!(region.len > 0);
        prop_assert!(region.start.checked_add(region.len - 1).is_some());
        prop_assert!(!region.to_string().contains('\n'));
    }
    for module in info.modules() {
        prop_assert!(module.start <= module.end);
    }
    Ok(())
}

/// Applies `(index, byte)` overwrites to `bytes` (indices wrap around its length).
fn mutate(bytes: &mut [u8], flips: &[(usize, u8)]) {
    let len = bytes.len();
    for &(at, value) in flips {
        if len > 0 {
            bytes[at % len] = value;
        }
    }
}

fn any_flips() -> impl Strategy<Value = Vec<(usize, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>()), 1..12)
}

proptest! {
    #[test]
    fn multiboot2_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(info) = multiboot2::parse(&bytes) {
            check_invariants(&info)?;
        }
    }

    #[test]
    fn multiboot2_never_panics_on_arbitrary_tags(
        tags in proptest::collection::vec((0u32..20, 0u32..80, proptest::collection::vec(any::<u8>(), 0..64)), 0..8),
        total_delta in -16i64..16,
    ) {
        let mut builder = MbiBuilder::new();
        for (tag_type, size, payload) in &tags {
            builder = builder.raw_tag(*tag_type, *size, payload);
        }
        let mut mbi = builder.finish();
        let total = i64::try_from(mbi.len()).unwrap() + total_delta;
        mbi[..4].copy_from_slice(&u32::try_from(total.max(0)).unwrap().to_le_bytes());
        if let Ok(info) = multiboot2::parse(&mbi) {
            check_invariants(&info)?;
        }
    }

    #[test]
    fn multiboot2_never_panics_on_mutated_valid_mbi(flips in any_flips(), cut in any::<u16>()) {
        let (mut mbi, _) = full_mbi();
        mutate(&mut mbi, &flips);
        let len = mbi.len();
        mbi.truncate(len - usize::from(cut) % 64);
        if let Ok(info) = multiboot2::parse(&mbi) {
            check_invariants(&info)?;
        }
    }

    #[test]
    fn pvh_never_panics_on_arbitrary_memory(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        at in 0usize..512,
        version in 0u32..3,
    ) {
        let mut memory = VecMemory { base: 0x1000, bytes };
        // Give the parser a valid magic most of the time so it reaches the pointers.
        if memory.bytes.len() >= at + 8 {
            memory.bytes[at..at + 4].copy_from_slice(&pvh::START_MAGIC.to_le_bytes());
            memory.bytes[at + 4..at + 8].copy_from_slice(&version.to_le_bytes());
        }
        if let Ok(info) = pvh::parse(&memory, 0x1000 + at as u64) {
            check_invariants(&info)?;
        }
    }

    #[test]
    fn pvh_never_panics_on_mutated_valid_start_info(flips in any_flips(), region in 0usize..6) {
        let mut memory = StartInfo::valid().layout();
        // Concentrate the damage on one structure: start info, command line, module list,
        // memory map, RSDP, module command lines.
        let window = 0x1000 * region;
        let shifted: Vec<(usize, u8)> = flips.iter().map(|&(at, v)| (window + at % 0x100, v)).collect();
        mutate(&mut memory.bytes, &shifted);
        if let Ok(info) = pvh::parse(&memory, START_INFO) {
            check_invariants(&info)?;
            prop_assert!(info.boot_data().iter().all(|r| r.start() >= BASE && r.end() <= BASE + MEMORY_LEN as u64));
        }
    }

    #[test]
    fn usable_ranges_match_a_page_model(
        regions in proptest::collection::vec((0u64..4096, 0u64..512, 1u32..6), 0..12),
        reserved in proptest::collection::vec((0u64..4096, 0u64..256), 0..8),
    ) {
        // Addresses in 256-byte units over 1 MiB; a page is 16 units.
        const UNIT: u64 = 256;
        const UNITS: usize = 4096;
        let map: Vec<MemoryRegion> = regions
            .iter()
            .map(|&(start, len, kind)| MemoryRegion { start: start * UNIT, len: len * UNIT, kind: MemoryKind::from_raw(kind) })
            .collect();
        let holes: Vec<PhysRange> =
            reserved.iter().map(|&(start, len)| PhysRange::from_start_len(start * UNIT, len * UNIT).unwrap()).collect();

        let mut available = vec![false; UNITS + 512];
        let mut blocked = vec![false; UNITS + 512];
        for region in &map {
            let units = (region.start / UNIT) as usize..(region.end() / UNIT) as usize;
            let target = if region.kind == MemoryKind::Available { &mut available } else { &mut blocked };
            target[units].iter_mut().for_each(|u| *u = true);
        }
        for hole in &holes {
            blocked[(hole.start() / UNIT) as usize..(hole.end() / UNIT) as usize].iter_mut().for_each(|u| *u = true);
        }
        let units_per_page = (PAGE_SIZE / UNIT) as usize;
        let expected: Vec<bool> = (0..available.len() / units_per_page)
            .map(|page| {
                let units = page * units_per_page..(page + 1) * units_per_page;
                available[units.clone()].iter().all(|&u| u) && !blocked[units].iter().any(|&u| u)
            })
            .collect();

        let ranges = usable_ranges(&map, holes.iter().copied()).unwrap();
        let mut got = vec![false; expected.len()];
        let mut previous_end = None;
        for range in ranges.iter() {
            prop_assert!(range.start() % PAGE_SIZE == 0 && range.end() % PAGE_SIZE == 0 && !range.is_empty());
            if let Some(end) = previous_end {
                prop_assert!(range.start() > end, "ranges must be sorted, disjoint and not adjacent");
            }
            previous_end = Some(range.end());
            for page in range.start() / PAGE_SIZE..range.end() / PAGE_SIZE {
                got[page as usize] = true;
            }
        }
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn cmdline_never_panics_and_diagnostics_are_single_lines(cmdline in "[ -~\t\n]{0,120}|[a-z=0-9 ]{0,60}") {
        let parsed = crate::cmdline::parse(&cmdline);
        let count = parsed.diagnostics().count();
        prop_assert!(count <= crate::cmdline::MAX_DIAGNOSTICS + 1);
        for diagnostic in parsed.diagnostics() {
            let line = diagnostic.to_string();
            prop_assert!(!line.contains('\n') && !line.contains('\t'), "{:?}", line);
        }
        if let Some(cpus) = parsed.options.cpus {
            prop_assert!((1..=256).contains(&cpus));
        }
    }
}

/// A word of a module line: a known option with a value that is often valid, often near a
/// boundary, sometimes garbage; or a stray word.
fn module_word() -> impl Strategy<Value = String> {
    let size =
        (0u64..40_000_000_000_000_000, prop_oneof![Just(""), Just("K"), Just("M"), Just("G"), Just("k"), Just("T")])
            .prop_map(|(n, unit)| format!("mem={}{unit}", n >> (n % 64)));
    let port = || {
        prop_oneof![
            any::<u16>().prop_map(|p| format!("{p:#x}")),
            any::<u16>().prop_map(|p| p.to_string()),
            "[0-9a-fx]{0,6}"
        ]
    };
    let ports = prop_oneof![
        port().prop_map(|p| format!("ports={p}")),
        (port(), port()).prop_map(|(a, b)| format!("ports={a}-{b}"))
    ];
    let msr = prop_oneof![
        proptest::sample::select(&crate::module::ASSIGNABLE_MSRS[..]).prop_map(|m| format!("{m:#x}")),
        any::<u32>().prop_map(|m| format!("{m:#x}")),
        "[0-9a-fx]{0,10}",
    ];
    let msrs = proptest::collection::vec(msr, 0..10).prop_map(|list| format!("msrs={}", list.join(",")));
    prop_oneof![
        size,
        "cpu=[0-9+-]{0,4}",
        ports,
        msrs,
        Just(String::from("unsafe-ports")),
        "unsafe-ports=[a-z0-9]{0,3}",
        "(mem|cpu|ports|msrs)",
        "[ -~]{0,12}",
    ]
}

/// Returns the bytes a `mem=` word asks for, computed without overflow, if it is one.
fn exact_size(word: &str) -> Option<u128> {
    let value = word.strip_prefix("mem=")?;
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let shift = match unit {
        "K" | "k" => 10,
        "M" | "m" | "" => 20,
        "G" | "g" => 30,
        _ => return None,
    };
    Some(digits.parse::<u128>().ok()? << shift)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// The bad-boot-input sweep for modules: every generated line is either accepted with
    /// settings inside their limits, or refused with one line that names an option (or the
    /// unknown word) and says what to write.
    #[test]
    fn module_lines_are_accepted_within_limits_or_refused_with_one_clear_line(
        name in "[a-z][a-z/]{0,7}",
        words in proptest::collection::vec(module_word(), 0..5),
        args in proptest::option::of("[ -~]{0,20}"),
    ) {
        use crate::module::{self, ModuleError, MAX_GUEST_MEMORY, ASSIGNABLE_MSRS};
        let mut line = name.clone();
        for word in &words {
            line.push(' ');
            line.push_str(word);
        }
        if let Some(args) = &args {
            line.push_str(" -- ");
            line.push_str(args);
        }
        match module::parse(&line) {
            Ok(spec) => {
                prop_assert!(spec.memory > 0 && spec.memory % (2 << 20) == 0 && spec.memory <= MAX_GUEST_MEMORY);
                prop_assert!(spec.cpu.is_none_or(|cpu| cpu < 256));
                prop_assert!(spec.msrs.iter().all(|m| ASSIGNABLE_MSRS.contains(m)));
                if let Some((first, count)) = spec.ports {
                    prop_assert!(count >= 1 && u32::from(first) + count <= 0x1_0000);
                }
                prop_assert!(spec.unsafe_ports || spec.reserved_port().is_none(), "reserved port without unsafe-ports: {line}");
                // The last mem= word decides, and its exact value is what was asked for.
                if let Some(size) = words.iter().rev().find_map(|w| exact_size(w)) {
                    prop_assert_eq!(u128::from(spec.memory), size, "{}", line);
                }
            }
            Err(error) => {
                let text = error.to_string();
                prop_assert!(!text.contains('\n') && !text.contains('\t') && !text.is_empty(), "{text:?}");
                let named = match error {
                    ModuleError::UnknownOption { word } => text.contains(&format!("'{word}'")) && text.contains("known:"),
                    ModuleError::ReservedPort { .. } => text.contains("ports=") && text.contains("unsafe-ports"),
                    ModuleError::UnexpectedValue { .. } => text.contains("unsafe-ports") || text.contains("write just"),
                    _ => text.contains("=") && (text.contains("e.g.") || text.contains("only those")),
                };
                prop_assert!(named, "refusal does not name the option and a fix: {text}");
                // A refused mem= is one whose exact value is out of range.
                if let ModuleError::MemoryTooLarge { value } = error {
                    prop_assert!(exact_size(&format!("mem={value}")).is_none_or(|n| n > u128::from(u64::MAX)), "{value}");
                }
            }
        }
    }

    /// The bad-boot-input sweep for the hypervisor command line: tokens built from the known
    /// option names with random values; every token is applied or gets exactly one
    /// diagnostic line naming its option.
    #[test]
    fn hypervisor_tokens_are_applied_or_get_one_line_each(
        tokens in proptest::collection::vec(
            (proptest::sample::select(vec!["log", "cpus", "test", "place", "bogus"]), proptest::option::of("[!-~]{0,10}")),
            0..4,
        ),
    ) {
        let mut seen = Vec::new();
        let mut line = String::new();
        for (name, value) in &tokens {
            if seen.contains(name) || value.as_deref().is_some_and(|v| v.contains('=') || v.starts_with('/')) {
                continue;
            }
            seen.push(*name);
            line.push_str(name);
            if let Some(value) = value {
                line.push('=');
                line.push_str(value);
            }
            line.push(' ');
        }
        let parsed = crate::cmdline::parse(&line);
        let lines: Vec<String> = parsed.diagnostics().map(|d| d.to_string()).collect();
        prop_assert!(lines.len() <= seen.len());
        for text in &lines {
            prop_assert!(!text.contains('\n'));
            prop_assert!(text.contains("e.g.") || text.contains("known:"), "{text}");
        }
        for diagnostic in parsed.diagnostics() {
            let option = match diagnostic {
                crate::cmdline::Diagnostic::BadValue { option, .. } | crate::cmdline::Diagnostic::MissingValue { option, .. } => option,
                crate::cmdline::Diagnostic::UnknownOption { name } => name,
                other => return Err(TestCaseError::fail(format!("unexpected diagnostic {other:?}"))),
            };
            prop_assert!(seen.contains(&option), "{option} {line}");
        }
    }
}
