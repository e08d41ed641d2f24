//! Command-line options and every diagnostic.

use crate::cmdline::{parse, Diagnostic, LogLevel, Options, MAX_DIAGNOSTICS};

fn lines(cmdline: &str) -> Vec<String> {
    parse(cmdline).diagnostics().map(|d| d.to_string()).collect()
}

#[test]
fn empty_command_line_gives_defaults() {
    for cmdline in ["", "   ", "\t\n"] {
        let parsed = parse(cmdline);
        assert_eq!(
            parsed.options,
            Options { log: LogLevel::Info, cpus: None, test: None, place: None, nvram_crash_after: None, memmap: None }
        );
        assert!(parsed.is_clean());
    }
}

#[test]
fn known_options_are_applied() {
    let parsed = parse("log=trace cpus=4 test=vmx_*,ept-1");
    assert_eq!(
        parsed.options,
        Options {
            log: LogLevel::Trace,
            cpus: Some(4),
            test: Some("vmx_*,ept-1"),
            place: None,
            nvram_crash_after: None,
            memmap: None,
        }
    );
    assert!(parsed.is_clean());
    for level in LogLevel::ALL {
        assert_eq!(parse(&format!("log={level}")).options.log, level);
    }
    assert_eq!(parse("cpus=1").options.cpus, Some(1));
    assert_eq!(parse("cpus=256").options.cpus, Some(256));
    assert_eq!(parse("cpus=004").options.cpus, Some(4));
}

#[test]
fn extra_whitespace_is_ignored() {
    let parsed = parse("  \tlog=debug \n\n  cpus=2\t ");
    assert_eq!(
        parsed.options,
        Options { log: LogLevel::Debug, cpus: Some(2), test: None, place: None, nvram_crash_after: None, memmap: None }
    );
    assert!(parsed.is_clean());
}

#[test]
fn leading_image_path_is_skipped() {
    let parsed = parse("/boot/nk.elf cpus=3");
    assert_eq!(parsed.options.cpus, Some(3));
    assert!(parsed.is_clean());
    // Only in first position.
    assert_eq!(
        lines("cpus=3 /boot/nk.elf"),
        ["unknown option '/boot/nk.elf' (known: log, cpus, test, place, nvram-crash-after, memmap)"]
    );
}

#[test]
fn unknown_option_lists_the_known_ones() {
    assert_eq!(lines("bogus"), ["unknown option 'bogus' (known: log, cpus, test, place, nvram-crash-after, memmap)"]);
    assert_eq!(
        lines("bogus=1 LOG=info =x"),
        [
            "unknown option 'bogus' (known: log, cpus, test, place, nvram-crash-after, memmap)",
            "unknown option 'LOG' (known: log, cpus, test, place, nvram-crash-after, memmap)",
            "unknown option '' (known: log, cpus, test, place, nvram-crash-after, memmap)",
        ]
    );
}

#[test]
fn bad_cpus_values_keep_the_default() {
    for value in ["abc", "0", "257", "-1", "+4", " ", "", "4k", "99999999999999999999", "0x10"] {
        let cmdline = format!("cpus={value}");
        let parsed = parse(&cmdline);
        if value == " " {
            // "cpus= " splits into "cpus=" with an empty value.
            assert_eq!(parsed.diagnostics().count(), 1);
            continue;
        }
        assert_eq!(parsed.options.cpus, None, "{value}");
        assert_eq!(
            parsed.diagnostics().map(|d| d.to_string()).collect::<Vec<_>>(),
            [format!("bad value '{value}' for 'cpus': expected a number from 1 to 256, e.g. cpus=4")]
        );
    }
}

#[test]
fn bad_log_value_keeps_the_default() {
    let parsed = parse("log=loud");
    assert_eq!(parsed.options.log, LogLevel::Info);
    assert_eq!(
        lines("log=loud"),
        ["bad value 'loud' for 'log': expected one of error, warn, info, debug, trace, e.g. log=debug"]
    );
    assert_eq!(parse("log=DEBUG").options.log, LogLevel::Info);
}

#[test]
fn bad_test_filter_is_refused() {
    for value in ["", "Vmx", "a b", "vmx.ept", "é"] {
        let cmdline = format!("test={value}");
        let parsed = parse(&cmdline);
        if value.contains(' ') {
            continue;
        }
        assert_eq!(parsed.options.test, None, "{value}");
        assert_eq!(
            parsed.diagnostics().map(|d| d.to_string()).collect::<Vec<_>>(),
            [format!(
                "bad value '{value}' for 'test': expected a filter of a-z, 0-9, '_', '*', ',' and '-', e.g. test=vmx_*"
            )]
        );
    }
}

#[test]
fn bare_key_of_a_valued_option_is_missing_its_value() {
    let parsed = parse("cpus log");
    assert_eq!(parsed.options, Options::default());
    assert_eq!(
        lines("cpus log"),
        [
            "missing value for 'cpus': expected a number from 1 to 256, e.g. cpus=4",
            "missing value for 'log': expected one of error, warn, info, debug, trace, e.g. log=debug",
        ]
    );
}

#[test]
fn value_may_contain_equals_signs() {
    assert_eq!(
        lines("log=info=debug"),
        ["bad value 'info=debug' for 'log': expected one of error, warn, info, debug, trace, e.g. log=debug",]
    );
}

#[test]
fn repeated_option_warns_and_the_last_valid_one_wins() {
    let parsed = parse("log=info cpus=2 log=trace");
    assert_eq!(parsed.options.log, LogLevel::Trace);
    assert_eq!(parsed.options.cpus, Some(2));
    let diagnostics: Vec<Diagnostic<'_>> = parsed.diagnostics().collect();
    assert_eq!(diagnostics, [Diagnostic::Repeated { option: "log", previous: "log=info", current: "log=trace" }]);
    assert_eq!(
        diagnostics[0].to_string(),
        "option 'log' given more than once ('log=info', then 'log=trace'): the last valid one wins"
    );
    // A bad repeat keeps the earlier valid value.
    let parsed = parse("cpus=2 cpus=zero");
    assert_eq!(parsed.options.cpus, Some(2));
    assert_eq!(parsed.diagnostics().count(), 2);
}

#[test]
fn diagnostics_beyond_the_capacity_are_counted() {
    let cmdline = "a b c d e f g h i j k";
    let parsed = parse(cmdline);
    let diagnostics: Vec<Diagnostic<'_>> = parsed.diagnostics().collect();
    assert_eq!(diagnostics.len(), MAX_DIAGNOSTICS + 1);
    assert_eq!(diagnostics[MAX_DIAGNOSTICS], Diagnostic::Suppressed { count: 3 });
    assert_eq!(diagnostics[MAX_DIAGNOSTICS].to_string(), "3 more diagnostics not shown");
    assert!(!parsed.is_clean());
}

#[test]
fn options_borrow_from_the_command_line() {
    let cmdline = String::from("test=caps_*");
    let parsed = parse(&cmdline);
    let filter = parsed.options.test.unwrap();
    assert!(std::ptr::eq(filter.as_ptr(), cmdline[5..].as_ptr()));
}

#[test]
fn place_pairs_are_read_and_malformed_ones_refused() {
    let parsed = parse("place=checks@0,worker-2@3");
    assert!(parsed.is_clean());
    let pairs: Vec<_> = parsed.options.placements().collect();
    assert_eq!(pairs, [("checks", 0), ("worker-2", 3)]);
    for bad in ["place=", "place=a", "place=a@", "place=@1", "place=A@1", "place=a@x", "place=a@1,", "place=a@999"] {
        let parsed = parse(bad);
        assert_eq!(parsed.options.place, None, "{bad}");
        assert_eq!(parsed.diagnostics().count(), 1, "{bad}");
    }
}

#[test]
fn nvram_crash_after_takes_a_write_count() {
    assert_eq!(parse("nvram-crash-after=7").options.nvram_crash_after, Some(7));
    assert_eq!(parse("nvram-crash-after=1000000000").options.nvram_crash_after, Some(1_000_000_000));
    for value in ["0", "-1", "x", "1000000001", "99999999999999999999999", ""] {
        let cmdline = format!("nvram-crash-after={value}");
        let parsed = parse(&cmdline);
        assert_eq!(parsed.options.nvram_crash_after, None, "{value}");
        assert_eq!(
            lines(&cmdline),
            [format!(
                "bad value '{value}' for 'nvram-crash-after': expected a number of NVRAM device writes from 1 to 1000000000, e.g. nvram-crash-after=5"
            )]
        );
    }
    assert_eq!(
        lines("nvram-crash-after"),
        ["missing value for 'nvram-crash-after': expected a number of NVRAM device writes from 1 to 1000000000, e.g. nvram-crash-after=5"]
    );
}

#[test]
fn memmap_sets_aside_an_aligned_range() {
    use crate::cmdline::PmemEmulation;
    assert_eq!(parse("memmap=16M!96M").options.memmap, Some(PmemEmulation { start: 96 << 20, size: 16 << 20 }));
    assert_eq!(parse("memmap=0x1000!0x200000").options.memmap, Some(PmemEmulation { start: 0x20_0000, size: 0x1000 }));
    assert_eq!(parse("memmap=1G!4g").options.memmap, Some(PmemEmulation { start: 4 << 30, size: 1 << 30 }));
    for bad in [
        "memmap",
        "memmap=",
        "memmap=16M",
        "memmap=16M!",
        "memmap=!96M",
        "memmap=0!96M",
        "memmap=100!96M",
        "memmap=16M!0x123",
        "memmap=16M$96M",
        "memmap=0x!1M",
        "memmap=99999999999999999999!0",
        "memmap=2G!4194303G",
        "memmap=-1M!1M",
    ] {
        let parsed = parse(bad);
        assert_eq!(parsed.options.memmap, None, "{bad}");
        assert_eq!(parsed.diagnostics().count(), 1, "{bad}");
    }
}
