//! `cargo xtask new-am NAME`: a new abstract machine crate under am/NAME that builds, has
//! a passing host test through the null-Kernel's dispatch, and is a workspace member
//! (docs/writing-an-am.md).

use std::fs;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cli::NewAmArgs;
use crate::workspace::Workspace;

/// Where the hypervisor lists its AMs, one line each (`AMS`), and the comment line new
/// lines go above.
const AM_LIST: &str = "hypervisor/src/ams.rs";
const AM_LIST_MARKER: &str = "// cargo xtask new-am adds new AMs' lines above this one.";
/// The dependency lines of the hypervisor's manifest; a new AM's goes after the last
/// `nk-am-` one.
const HYPERVISOR_MANIFEST: &str = "hypervisor/Cargo.toml";

/// What `generate` made.
pub struct Generated {
    pub package: String,
    pub type_name: String,
}

pub fn new_am_command(workspace: &Workspace, args: &NewAmArgs) -> Result<ExitCode> {
    let made = generate(workspace, &args.name)?;
    let dir = workspace.root().join("am").join(&args.name);
    println!("xtask: new-am: created {} ({}, type {})", workspace.display(&dir), made.package, made.type_name);
    println!("xtask: new-am: registered it in {AM_LIST} (one line in AMS) and {HYPERVISOR_MANIFEST}");
    println!("xtask: new-am: its test: cargo test -p {}", made.package);
    println!("xtask: new-am: boot it: cargo xtask run (the log's `AMs:` line lists it); read docs/writing-an-am.md");
    Ok(ExitCode::SUCCESS)
}

/// Creates am/NAME, adds it to the workspace, to the hypervisor's dependencies and to its
/// AM list. Checks everything it will edit before it writes anything.
pub fn generate(workspace: &Workspace, name: &str) -> Result<Generated> {
    let dir = workspace.root().join("am").join(name);
    if dir.exists() {
        bail!("{} exists already: choose another name, or delete it first", workspace.display(&dir));
    }
    let package = format!("nk-am-{name}");
    let type_name: String = name
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect::<String>()
        + "Am";
    let list_path = workspace.root().join(AM_LIST);
    let list = fs::read_to_string(&list_path).with_context(|| format!("cannot read {AM_LIST}"))?;
    let line = format!(
        "    AmLine {{ name: \"{name}\", quota: AM_QUOTA, when: always, make: |_| Box::new({}::{type_name}::new()) }},",
        package.replace('-', "_")
    );
    let list = insert_before_marker(&list, AM_LIST_MARKER, &line)
        .with_context(|| format!("{AM_LIST} has no line `{AM_LIST_MARKER}` to add the AM above"))?;
    let manifest_path = workspace.root().join(HYPERVISOR_MANIFEST);
    let manifest = fs::read_to_string(&manifest_path).with_context(|| format!("cannot read {HYPERVISOR_MANIFEST}"))?;
    let manifest = add_dependency(&manifest, &format!("{package} = {{ path = \"../am/{name}\" }}"))
        .with_context(|| format!("{HYPERVISOR_MANIFEST} has no `nk-am-` dependency line to add {package} after"))?;

    fs::create_dir_all(dir.join("src"))?;
    fs::write(dir.join("Cargo.toml"), cargo_toml(&package, name))?;
    fs::write(dir.join("src/lib.rs"), lib_rs(name, &type_name))?;
    fs::write(dir.join("src/tests.rs"), tests_rs(&type_name))?;
    add_member(workspace, &format!("am/{name}")).context("adding the crate to the workspace")?;
    fs::write(&list_path, list)?;
    fs::write(&manifest_path, manifest)?;
    Ok(Generated { package, type_name })
}

/// Returns `text` with `line` inserted above the line that is `marker` (trimmed).
fn insert_before_marker(text: &str, marker: &str, line: &str) -> Option<String> {
    let at = text.lines().position(|l| l.trim() == marker)?;
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(at, line);
    Some(lines.join("\n") + "\n")
}

/// Returns `manifest` with `dependency` after its last `nk-am-` dependency line.
fn add_dependency(manifest: &str, dependency: &str) -> Option<String> {
    let mut lines: Vec<&str> = manifest.lines().collect();
    let at = lines.iter().rposition(|l| l.starts_with("nk-am-"))?;
    lines.insert(at + 1, dependency);
    Some(lines.join("\n") + "\n")
}

/// Adds `member` to the root Cargo.toml's `members` and `default-members` lists.
fn add_member(workspace: &Workspace, member: &str) -> Result<()> {
    let path = workspace.root().join("Cargo.toml");
    let text = fs::read_to_string(&path)?;
    let mut out = String::new();
    let mut in_list = false;
    let mut added = 0;
    for line in text.lines() {
        if line.starts_with("members = [") || line.starts_with("default-members = [") {
            in_list = true;
        } else if in_list && line.trim() == "]" {
            out.push_str(&format!("    \"{member}\",\n"));
            in_list = false;
            added += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if added != 2 {
        bail!("the root Cargo.toml has no `members = [` and `default-members = [` lists to add {member} to");
    }
    fs::write(&path, out)?;
    Ok(())
}

fn cargo_toml(package: &str, name: &str) -> String {
    format!(
        r#"[package]
name = "{package}"
version = "0.1.0"
description = "The {name} abstract machine of the null-Kernel"
edition.workspace = true
license.workspace = true

[dependencies]
nk-am.workspace = true

[dev-dependencies]
nk-abi.workspace = true
nk-caps.workspace = true
nk-core.workspace = true

[lints]
workspace = true
"#
    )
}

fn lib_rs(name: &str, type_name: &str) -> String {
    format!(
        r#"//! The {name} AM. Replace this description with what its objects are and what its
//! operations do (docs/writing-an-am.md).
//!
//! Objects: `thing`s with the rights `read` and `write`. Operations (ABI numbers):
//! 0 `create(f: factory/create)` -> name; 1 `get(t: read)` -> value; 2 `set(t: write, value)`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;

use nk_am::{{
    AbstractMachine, AmError, AmId, ArgSpec, Binding, CapName, Checked, DeadCap, Effects, Kernel, KindSpec, ObjId,
    ObjKind, Object, OpSpec, Outcome, Principal, RegisterError, Registrar, Rights, VmId, PLAIN_ARGS,
}};

/// ABI operation numbers.
pub mod op {{
    pub const CREATE: u16 = 0;
    pub const GET: u16 = 1;
    pub const SET: u16 = 2;
}}

/// The {name} AM.
#[derive(Debug, Default)]
pub struct {type_name} {{
    am: Option<AmId>,
    factory: Option<(ObjKind, Rights)>,
    thing: Option<(ObjKind, Rights)>,
    values: Vec<u64>,
}}

impl {type_name} {{
    /// Creates the AM with no objects.
    pub fn new() -> Self {{
        Self::default()
    }}
}}

impl AbstractMachine for {type_name} {{
    fn name(&self) -> &'static str {{
        "{name}"
    }}

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {{
        let factory = r.kind(KindSpec {{ name: "factory", rights: &["create"] }})?;
        let thing = r.kind(KindSpec {{ name: "thing", rights: &["read", "write"] }})?;
        let right = |r: &Registrar<'_>, kind, name| r.rights(kind, &[name]).ok_or(RegisterError::UnknownKind);
        let (create, read, write) = (right(r, factory, "create")?, right(r, thing, "read")?, right(r, thing, "write")?);
        self.am = Some(r.am());
        self.factory = Some((factory, create));
        self.thing = Some((thing, Rights::from_bits(read.bits() | write.bits())));
        r.operation(OpSpec {{ name: "create", args: &[ArgSpec::new(factory, create)] }})?;
        r.operation(OpSpec {{ name: "get", args: &[ArgSpec::new(thing, read)] }})?;
        r.operation(OpSpec {{ name: "set", args: &[ArgSpec::new(thing, write)] }})?;
        Ok(())
    }}

    fn invoke(&mut self, checked: &Checked, args: &[u64; PLAIN_ARGS], kernel: &mut dyn Kernel) -> Result<Outcome, AmError> {{
        match checked.op().index() {{
            op::CREATE => {{
                let (kind, rights) = self.thing.ok_or(AmError::NotPermitted)?;
                let object = Object::new(checked.am(), kind, ObjId::new(self.values.len() as u64));
                let name = kernel.grant_new(object, rights, checked.caller(), Binding::Bound)?;
                self.values.push(0);
                Ok(Outcome {{ name: Some(name), results: [0; 4] }})
            }}
            op::GET => {{
                let id = checked.args()[0].object().id.raw() as usize;
                Ok(Outcome::value(*self.values.get(id).ok_or(AmError::BadArgument)?))
            }}
            op::SET => {{
                let id = checked.args()[0].object().id.raw() as usize;
                *self.values.get_mut(id).ok_or(AmError::BadArgument)? = args[0];
                Ok(Outcome::default())
            }}
            _ => Err(AmError::NotPermitted),
        }}
    }}

    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {{
        let (kind, create) = self.factory.ok_or(AmError::NotPermitted)?;
        let object = Object::new(self.am.ok_or(AmError::NotPermitted)?, kind, ObjId::new(u64::from(vm.raw())));
        Ok(alloc::vec![kernel.grant_new(object, create, Principal::Vm(vm), Binding::Bound)?])
    }}

    fn revoked(&mut self, _dead: &DeadCap, _effects: &mut dyn Effects) {{
        // Undo here what the dead capability enabled (emit effects for hardware state).
    }}
}}

#[cfg(test)]
mod tests;
"#
    )
}

fn tests_rs(type_name: &str) -> String {
    format!(
        r#"use super::*;
use nk_abi::{{nk_op, Call, NameWords, Reply, Selector, Status}};
use nk_caps::{{FixedSeed, KernelId}};
use nk_core::NullKernel;

fn call(nk: &mut NullKernel, am: u16, op: u32, cap: NameWords, args: &[u64]) -> Reply {{
    let mut call = Call {{ selector: Selector::new(am, op).encode(), ..Call::default() }};
    call.caps[0] = cap;
    call.args[..args.len()].copy_from_slice(args);
    nk.dispatch(VmId::new(1), &call, &mut Vec::new()).reply().expect("one kernel instance finishes every call at once")
}}

#[test]
fn create_set_get_through_checked_capabilities() {{
    let mut nk = NullKernel::new(KernelId::new(0), 1, 256, &mut FixedSeed::from_u64(1)).unwrap();
    let am = nk.add_am(alloc::boxed::Box::new({type_name}::new()), 64).unwrap().raw();
    nk.add_vm(VmId::new(1), 64).unwrap();
    let factory = call(&mut nk, 0, nk_op::INITIAL, NameWords::default(), &[0]).name;
    let thing = call(&mut nk, am, op::CREATE.into(), factory, &[]);
    assert!(thing.status().is_ok(), "{{}}", thing.status());
    assert!(call(&mut nk, am, op::SET.into(), thing.name, &[42]).status().is_ok());
    assert_eq!(call(&mut nk, am, op::GET.into(), thing.name, &[]).results[0], 42);
    let read_only = call(&mut nk, 0, nk_op::DERIVE, thing.name, &[0b01]).name;
    assert_eq!(call(&mut nk, am, op::SET.into(), read_only, &[7]).status(), Status::new(Status::MISSING_RIGHTS, Some(0)));
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_am_line_goes_above_the_marker_and_the_dependency_after_the_last_am() {
        let list = format!("pub static AMS: &[AmLine] = &[\n    AmLine {{ a }},\n    {AM_LIST_MARKER}\n];\n");
        let out = insert_before_marker(&list, AM_LIST_MARKER, "    AmLine { b },").unwrap();
        assert!(out.contains(&format!("AmLine {{ a }},\n    AmLine {{ b }},\n    {AM_LIST_MARKER}")), "{out}");
        assert!(insert_before_marker("no marker here", AM_LIST_MARKER, "x").is_none());
        let manifest =
            "[dependencies]\nnk-abi.workspace = true\nnk-am-exo.workspace = true\nnk-boot.workspace = true\n";
        let out = add_dependency(manifest, "nk-am-disk = { path = \"../am/disk\" }").unwrap();
        assert!(out.contains("nk-am-exo.workspace = true\nnk-am-disk = { path = \"../am/disk\" }\nnk-boot"), "{out}");
    }

    /// The real files have what `generate` edits.
    #[test]
    fn the_hypervisor_files_have_the_anchors() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let list = fs::read_to_string(root.join(AM_LIST)).unwrap();
        assert!(insert_before_marker(&list, AM_LIST_MARKER, "x").is_some());
        let manifest = fs::read_to_string(root.join(HYPERVISOR_MANIFEST)).unwrap();
        assert!(add_dependency(&manifest, "x").is_some());
    }
}
