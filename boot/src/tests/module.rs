//! Module command lines: every option, every refusal line, the reserved ports.

use crate::module::{
    parse, reserved_overlap, ModuleError, ASSIGNABLE_MSRS, DEFAULT_GUEST_MEMORY, MAX_MSRS, RESERVED_PORTS,
};

fn refusal(cmdline: &str) -> String {
    match parse(cmdline) {
        Ok(spec) => panic!("'{cmdline}' was accepted: {spec:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn name_args_and_defaults() {
    let spec = parse("/boot/guests/checks -- survivor 100").unwrap();
    assert_eq!(spec.name, "checks");
    assert_eq!(spec.args, "survivor 100");
    assert_eq!(spec.memory, DEFAULT_GUEST_MEMORY);
    assert_eq!((spec.cpu, spec.ports, spec.unsafe_ports), (None, None, false));
    assert!(spec.msrs.is_empty());
    assert_eq!(parse("").unwrap().name, "guest");
    assert_eq!(parse("g --").unwrap().args, "");
    assert_eq!(parse("g -- a -- b").unwrap().args, "a -- b");
}

#[test]
fn every_option_is_applied() {
    let spec = parse("w mem=8M cpu=3 ports=0x2e8-0x2ef msrs=0x174,0xc0000100 -- x").unwrap();
    assert_eq!(spec.memory, 8 << 20);
    assert_eq!(spec.cpu, Some(3));
    assert_eq!(spec.ports, Some((0x2E8, 8)));
    assert_eq!(spec.msrs.as_slice(), &[0x174, 0xC000_0100]);
    assert_eq!(parse("w mem=1G").unwrap().memory, 1 << 30);
    assert_eq!(parse("w mem=4096k").unwrap().memory, 4 << 20);
    assert_eq!(parse("w mem=6").unwrap().memory, 6 << 20);
    assert_eq!(parse("w ports=128").unwrap().ports, Some((0x80, 1)));
    assert_eq!(parse("w ports=0xffff").unwrap().ports, Some((0xFFFF, 1)));
    assert_eq!(parse("w ports=0-0x1f").unwrap().ports, Some((0, 0x20)));
    assert_eq!(parse("w mem=2M mem=4M").unwrap().memory, 4 << 20);
}

#[test]
fn mem_that_loses_bits_is_refused() {
    // 2^44 + 2 megabytes is 2^64 + 2 MiB: a shift by 20 keeps only the 2 MiB.
    assert_eq!(
        refusal("big mem=17592186044418M"),
        "bad size '17592186044418M' for mem=: too large (more than 2^64 bytes); a multiple of 2M up to 1G, e.g. mem=8M"
    );
    for value in ["17179869186G", "18014398509483982K", "99999999999999999999999M"] {
        assert!(matches!(parse(&format!("g mem={value}")), Err(ModuleError::MemoryTooLarge { .. })), "{value}");
    }
    for value in ["3M", "0", "0M", "2G", "1025M", "M", "8MB", "-2M", "+2M", "0x200000", "2.5M"] {
        let line = refusal(&format!("g mem={value}"));
        assert!(line.contains("for mem=") && line.contains("e.g. mem=8M"), "{value}: {line}");
    }
    assert_eq!(refusal("oddsize mem=3M"), "bad size '3M' for mem=: a multiple of 2M up to 1G, e.g. mem=8M");
}

#[test]
fn bad_values_name_the_option_and_an_example() {
    assert_eq!(refusal("g cpu=x"), "bad value 'x' for cpu=: write a CPU index from 0 to 255, e.g. cpu=1");
    assert!(refusal("g cpu=256").starts_with("bad value '256' for cpu="));
    assert!(refusal("g cpu=+1").starts_with("bad value '+1' for cpu="));
    for value in ["", "0x", "0x10000", "65536", "5-4", "-", "0x80-", "1,2", "0X80", "0x-1"] {
        let line = refusal(&format!("g ports={value}"));
        assert!(line.starts_with(&format!("bad value '{value}' for ports=")), "{line}");
    }
    assert_eq!(refusal("g msrs=174"), "bad value '174' for msrs=: write hexadecimal MSR numbers, e.g. msrs=0xc0000100");
    assert_eq!(refusal("g cpu"), "missing value for cpu=: write a CPU index from 0 to 255, e.g. cpu=1");
    assert_eq!(refusal("g unsafe-ports=1"), "unsafe-ports takes no value (got '1'): write just unsafe-ports");
    assert_eq!(
        refusal("typo memory=8M"),
        "unknown module option 'memory=8M' (known: mem=<size>, cpu=<index>, ports=<first>[-<last>], \
         msrs=<msr>[,<msr>], unsafe-ports, ring3-caps, modules=<name>[,<name>], input=<name>, manages=<name>[,<name>], data, \
         images=<name>[,<name>], frames=<size>, vcpus=<n>, image, nvram, disk=<size>, lwc, gdb, -- <guest args>)"
    );
}

#[test]
fn data_modules_and_their_users() {
    let spec = parse("linux mem=128M modules=initramfs -- console=ttyS0 nokaslr -- echo hi").unwrap();
    assert_eq!(spec.modules.as_slice(), ["initramfs"]);
    assert!(!spec.data);
    assert_eq!(spec.args, "console=ttyS0 nokaslr -- echo hi");
    let data = parse("initramfs data").unwrap();
    assert!(data.data);
    assert_eq!(
        refusal("g modules=a,,b"),
        "bad value 'a,,b' for modules=: write the names of data modules, separated by commas, e.g. modules=initramfs"
    );
    assert_eq!(refusal("g modules=a,b,c,d,e"), "too many modules in modules=: at most 4, e.g. modules=initramfs");
    assert_eq!(refusal("g data=1"), "data takes no value (got '1'): write just data");
    assert_eq!(parse("linux input=keys").unwrap().input, Some("keys"));
    assert_eq!(refusal("g input="), "bad value '' for input=: write the name of a data module, e.g. input=keys");
}

#[test]
fn manages_names_other_guests() {
    let spec = parse("control manages=worker,linux -- control").unwrap();
    assert_eq!(spec.manages.as_slice(), ["worker", "linux"]);
    assert!(parse("worker").unwrap().manages.as_slice().is_empty());
    assert_eq!(
        refusal("g manages=a,,b"),
        "bad value 'a,,b' for manages=: write the names of other guests, separated by commas, e.g. manages=worker"
    );
    assert_eq!(
        refusal("g manages=a,b,c,d,e,f,g,h,i"),
        "too many guests in manages=: at most 8, e.g. manages=worker,linux"
    );
    assert_eq!(
        refusal("g manages"),
        "missing value for manages=: write the names of other guests, separated by commas, e.g. manages=worker"
    );
}

#[test]
fn image_marks_a_module_and_images_names_them() {
    let spec = parse("mbkernel image modules=m -- hello").unwrap();
    assert!(spec.image && !spec.data);
    assert_eq!((spec.modules.as_slice(), spec.args), (&["m"][..], "hello"));
    assert!(!parse("worker").unwrap().image);
    assert_eq!(parse("control images=mb1,linux").unwrap().images.as_slice(), ["mb1", "linux"]);
    assert!(parse("control").unwrap().images.as_slice().is_empty());
    assert_eq!(refusal("g image=1"), "image takes no value (got '1'): write just image");
    assert_eq!(
        refusal("g images=a,,b"),
        "bad value 'a,,b' for images=: write the names of image modules, separated by commas, e.g. images=mbkernel"
    );
    assert_eq!(refusal("g images=a,b,c,d,e,f,g,h,i"), "too many images in images=: at most 8, e.g. images=mbkernel");
    assert!(crate::module::MODULE_OPTIONS.iter().any(|o| o.name == "image" && !o.takes_value));
    assert!(crate::module::MODULE_OPTIONS.iter().any(|o| o.name == "images" && o.takes_value));
}

#[test]
fn frames_sets_the_exo_frame_quota() {
    assert_eq!(parse("control frames=128M").unwrap().frames, Some(128 << 20));
    assert_eq!(parse("control").unwrap().frames, None);
    assert_eq!(refusal("g frames=3M"), "bad size '3M' for frames=: a multiple of 2M up to 1G, e.g. frames=128M");
    assert_eq!(
        refusal("g frames=99999999999999999999G"),
        "bad size '99999999999999999999G' for frames=: a multiple of 2M up to 1G, e.g. frames=128M"
    );
}

#[test]
fn msrs_outside_the_assignable_list_are_refused() {
    assert_eq!(
        refusal("greedy msrs=0xc0000080"),
        "MSR 0xc0000080 in msrs= cannot be given to a guest: only those the VMCS switches per guest may \
         (0x174, 0x175, 0x176, 0xc0000100, 0xc0000101)"
    );
    // unsafe-ports is about ports only.
    assert!(parse("g unsafe-ports msrs=0x10").is_err());
    let all: Vec<String> = ASSIGNABLE_MSRS.iter().map(|m| format!("{m:#x}")).collect();
    assert_eq!(parse(&format!("g msrs={}", all.join(","))).unwrap().msrs.as_slice(), &ASSIGNABLE_MSRS);
    let many = ["0x174"; MAX_MSRS + 1].join(",");
    assert_eq!(refusal(&format!("g msrs={many}")), "too many MSRs in msrs=: at most 8, e.g. msrs=0x174,0x175");
}

#[test]
fn reserved_ports_are_refused_with_the_reason() {
    assert_eq!(
        refusal("dma ports=0xcf8-0xcff"),
        "ports=0xcf8-0xcff includes port 0xcf8, reserved: PCI configuration space (0xCF9 also resets): device \
         set-up gives DMA to all memory, there is no IOMMU; give ports outside 0xcf8-0xcff (e.g. ports=0x80), or \
         add unsafe-ports to give it anyway"
    );
    for (value, port) in [
        ("0xcf9", 0xCF9),
        ("0x64", 0x64),
        ("0x92", 0x92),
        ("0x20", 0x20),
        ("0xa1", 0xA1),
        ("0x40-0x43", 0x40),
        ("0x3f8", 0x3F8),
        ("0x3f0-0x3f8", 0x3F6),
        ("0x1f0", 0x1F0),
        ("0x1f7", 0x1F7),
        ("0x100-0x1ff", 0x170),
        ("0x177", 0x177),
        ("0x376", 0x376),
        ("0x3f6", 0x3F6),
        ("0x2f8", 0x2F8),
        ("0x2f0-0x2f8", 0x2F8),
        ("0x2ff", 0x2FF),
        ("0xe9", 0xE9),
        ("0xb004", 0xB004),
        ("0x604", 0x604),
        ("0x8900", 0x8900),
        ("0-0xffff", 0x20),
        ("0x3fc-0x400", 0x3FC),
    ] {
        let line = refusal(&format!("g ports={value}"));
        assert!(line.starts_with(&format!("ports={value} includes port {port:#x}, reserved: ")), "{line}");
        assert!(line.ends_with("or add unsafe-ports to give it anyway"), "{line}");
        // The override accepts it (in either order) and says which port it lets through.
        for cmdline in [format!("g unsafe-ports ports={value}"), format!("g ports={value} unsafe-ports")] {
            let spec = parse(&cmdline).unwrap();
            assert_eq!(spec.reserved_port().map(|(p, _)| p), Some(port), "{cmdline}");
        }
    }
    for value in
        ["0x80", "0x2e8-0x2ef", "0x400-0x5ff", "0x3f7", "0xd00-0x88ff", "0x178-0x1ef", "0x1f8", "0x377", "0x3f0-0x3f5"]
    {
        let cmdline = format!("g ports={value}");
        assert!(parse(&cmdline).unwrap().reserved_port().is_none(), "{cmdline}");
    }
}

#[test]
fn reserved_table_is_sorted_and_overlap_is_exact() {
    for pair in RESERVED_PORTS.windows(2) {
        assert!(pair[0].last < pair[1].first);
    }
    for port in 0..=0xFFFFu32 {
        let inside = RESERVED_PORTS.iter().any(|r| u32::from(r.first) <= port && port <= u32::from(r.last));
        assert_eq!(reserved_overlap(port as u16, 1).is_some(), inside, "{port:#x}");
    }
}

#[test]
fn ring3_caps_is_a_flag() {
    let spec = parse("g ring3-caps -- checks").expect("accepted");
    assert!(spec.ring3_caps);
    assert!(!parse("g").expect("accepted").ring3_caps);
    assert!(parse("g ring3-caps=1").is_err());
}

#[test]
fn com2_is_the_debuggers_and_gdb_is_a_flag() {
    let line = refusal("g ports=0x2f8-0x2ff");
    assert!(line.contains("COM2: the hypervisor's guest debugger"), "{line}");
    assert!(parse("g ports=0x2e0-0x2f7").unwrap().reserved_port().is_none());
    assert!(parse("g gdb -- checks").unwrap().gdb);
    assert!(!parse("g -- gdb").unwrap().gdb, "words after -- are the guest's");
    assert_eq!(refusal("g gdb=1"), "gdb takes no value (got '1'): write just gdb");
}

#[test]
fn lwc_is_a_flag() {
    assert!(parse("g lwc -- lwc").unwrap().lwc);
    assert!(!parse("g -- lwc").unwrap().lwc, "words after -- are the guest's");
    assert_eq!(refusal("g lwc=1"), "lwc takes no value (got '1'): write just lwc");
}

#[test]
fn vcpus_is_bounded_and_refused_beside_one_vcpu_options() {
    assert_eq!(parse("g").unwrap().vcpus, 1);
    assert_eq!(parse("g vcpus=2").unwrap().vcpus, 2);
    assert_eq!(parse("g vcpus=4 lwc").unwrap().vcpus, 4);
    assert_eq!(parse("g vcpus=1 gdb").unwrap().vcpus, 1);
    for value in ["0", "5", "x", "", "-1", "+2", "256", "0x2", "2.0", "0002"] {
        let line = refusal(&format!("g vcpus={value}"));
        assert_eq!(line, format!("bad value '{value}' for vcpus=: write how many vCPUs, from 1 to 4, e.g. vcpus=2"));
    }
    assert_eq!(refusal("g vcpus"), "missing value for vcpus=: write how many vCPUs, from 1 to 4, e.g. vcpus=2");
    assert_eq!(
        refusal("g vcpus=2 gdb"),
        "vcpus=2 cannot go with gdb: a guest OS image has one vCPU and the debugger serves one; drop gdb or write vcpus=1"
    );
    assert!(matches!(parse("k image vcpus=3"), Err(ModuleError::VcpusWith { vcpus: 3, option: "image" })));
    assert_eq!(crate::module::MAX_VCPUS, 4);
}

#[test]
fn disk_takes_a_size() {
    assert_eq!(parse("linux disk=8M").map(|s| s.disk), Ok(Some(8 << 20)));
    assert_eq!(parse("linux").map(|s| s.disk), Ok(None));
    assert!(refusal("linux disk=3M").starts_with("bad size '3M' for disk="));
}
