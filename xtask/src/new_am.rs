//! `cargo xtask new-am NAME`: a new abstract machine crate under am/NAME that builds, has
//! a passing host test through the null-Kernel's dispatch, and is a workspace member
//! (docs/writing-an-am.md).

use std::fs;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cli::NewAmArgs;
use crate::workspace::Workspace;

pub fn new_am_command(workspace: &Workspace, args: &NewAmArgs) -> Result<ExitCode> {
    let name = args.name.as_str();
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
    fs::create_dir_all(dir.join("src"))?;
    fs::write(dir.join("Cargo.toml"), cargo_toml(&package, name))?;
    fs::write(dir.join("src/lib.rs"), lib_rs(name, &type_name))?;
    fs::write(dir.join("src/tests.rs"), tests_rs(&type_name))?;
    add_member(workspace, &format!("am/{name}")).context("adding the crate to the workspace")?;
    println!("xtask: new-am: created {} ({package}, type {type_name})", workspace.display(&dir));
    println!("xtask: new-am: its test: cargo test -p {package}");
    println!("xtask: new-am: to boot it, register it in hypervisor/src/main.rs (null_kernel()):");
    println!("    kernel.add_am(Box::new({}::{type_name}::new()), 4096)", package.replace('-', "_"));
    println!("xtask: new-am: and read docs/writing-an-am.md");
    Ok(ExitCode::SUCCESS)
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
