//! The run-time registry of abstract machines: their object kinds (with right names) and
//! their operations (with the capability arguments each needs), seed §5.2.1
//! "Extensibility".
//!
//! The null-Kernel attaches no meaning to kinds, rights or operations: it only keeps the
//! names for logs and tools, and the argument requirements it checks before an AM's handler
//! runs (DESIGN.md §2 "AM operations").

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use crate::ids::{AmId, ObjKind, OpId, Rights};

/// The largest number of capability arguments one operation takes: each travels as two
/// registers of a hypercall (DESIGN.md §4).
pub const MAX_CAP_ARGS: usize = 4;

/// The longest name, in bytes, of an AM, kind, right or operation.
pub const MAX_NAME_LEN: usize = 32;

/// Describes one capability argument of an operation: the kind of object it must name and
/// the rights it must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    /// The kind, which belongs to the AM that exports the operation: an operation can never
    /// ask for another AM's objects, so a handler only ever sees its own (invariant 5).
    pub kind: ObjKind,
    /// The rights the presented capability must hold (it may hold more).
    pub rights: Rights,
}

impl ArgSpec {
    /// Requires a capability to an object of `kind` holding at least `rights`.
    pub const fn new(kind: ObjKind, rights: Rights) -> Self {
        Self { kind, rights }
    }
}

/// Describes an object kind an AM registers: its name and the names of its rights, bit `i`
/// of [`Rights`] standing for `rights[i]`.
#[derive(Clone, Copy, Debug)]
pub struct KindSpec<'a> {
    /// The kind's name, unique within its AM.
    pub name: &'a str,
    /// The names of its rights, at most [`Rights::MAX_NAMED`], unique within the kind.
    pub rights: &'a [&'a str],
}

/// Describes an operation an AM registers: its name and its capability arguments.
#[derive(Clone, Copy, Debug)]
pub struct OpSpec<'a> {
    /// The operation's name, unique within its AM.
    pub name: &'a str,
    /// Its capability arguments, in order: one to [`MAX_CAP_ARGS`] (an operation that names
    /// no capability would be unguarded, and the seed has every operation refer to "one or
    /// more pairs of objects and access rights").
    pub args: &'a [ArgSpec],
}

/// Says why a registration was refused. Nothing is registered when one is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// An AM with this id is registered already.
    AmIdTaken,
    /// No AM with this id is registered.
    UnknownAm,
    /// The AM has no kind with this number.
    UnknownKind,
    /// A name is empty, longer than [`MAX_NAME_LEN`] bytes, or holds a byte that is not
    /// printable ASCII (or is a space).
    MalformedName,
    /// A name repeats: two AMs, two kinds of one AM, two rights of one kind or two
    /// operations of one AM with the same name.
    DuplicateName,
    /// A kind would name more than [`Rights::MAX_NAMED`] rights.
    TooManyRights,
    /// The AM already has 65,536 kinds.
    TooManyKinds,
    /// The AM already has 65,536 operations.
    TooManyOps,
    /// The operation takes no capability argument.
    NoCapArgs,
    /// The operation takes more than [`MAX_CAP_ARGS`] capability arguments.
    TooManyCapArgs,
    /// An argument requires rights its kind does not name.
    UndefinedRights,
    /// Memory for the registration could not be allocated.
    OutOfMemory,
}

/// Holds every registered AM with its kinds and operations.
#[derive(Debug, Default)]
pub struct Registry {
    /// Indexed by [`AmId`]: AM ids are few and chosen by the hypervisor.
    ams: Vec<Option<Box<AmEntry>>>,
}

#[derive(Debug)]
struct AmEntry {
    name: String,
    kinds: Vec<KindEntry>,
    ops: Vec<OpEntry>,
}

#[derive(Debug)]
pub(crate) struct KindEntry {
    name: String,
    right_names: Vec<String>,
}

impl KindEntry {
    /// Returns every right the kind names.
    pub(crate) fn defined_rights(&self) -> Rights {
        Rights::first(self.right_names.len())
    }
}

#[derive(Debug)]
pub(crate) struct OpEntry {
    name: String,
    args: [ArgSpec; MAX_CAP_ARGS],
    arity: u8,
}

impl OpEntry {
    /// Returns the operation's capability arguments, in order.
    #[inline]
    pub(crate) fn args(&self) -> &[ArgSpec] {
        &self.args[..usize::from(self.arity)]
    }
}

impl Registry {
    /// Registers AM `id` under `name`.
    pub(crate) fn register_am(&mut self, id: AmId, name: &str) -> Result<(), RegisterError> {
        validate_name(name)?;
        if self.am(id).is_some() {
            return Err(RegisterError::AmIdTaken);
        }
        if self.ams().any(|am| am.name == name) {
            return Err(RegisterError::DuplicateName);
        }
        let entry = Box::new(AmEntry { name: copy_name(name)?, kinds: Vec::new(), ops: Vec::new() });
        if self.ams.len() <= id.index() {
            let grow = id.index() + 1 - self.ams.len();
            self.ams.try_reserve(grow).map_err(|_| RegisterError::OutOfMemory)?;
            self.ams.resize_with(id.index() + 1, || None);
        }
        self.ams[id.index()] = Some(entry);
        Ok(())
    }

    /// Registers a kind of AM `am` and returns its number.
    pub(crate) fn register_kind(&mut self, am: AmId, spec: KindSpec<'_>) -> Result<ObjKind, RegisterError> {
        let entry = self.am_mut(am).ok_or(RegisterError::UnknownAm)?;
        validate_name(spec.name)?;
        if entry.kinds.iter().any(|kind| kind.name == spec.name) {
            return Err(RegisterError::DuplicateName);
        }
        let number = u16::try_from(entry.kinds.len()).map_err(|_| RegisterError::TooManyKinds)?;
        let mut kind = KindEntry { name: copy_name(spec.name)?, right_names: Vec::new() };
        append_rights(&mut kind, spec.rights)?;
        entry.kinds.try_reserve(1).map_err(|_| RegisterError::OutOfMemory)?;
        entry.kinds.push(kind);
        Ok(ObjKind::new(number))
    }

    /// Adds rights to a registered kind and returns their bits; capabilities that exist
    /// keep the rights they had (seed §5.2.1: the set of rights "too is extensible at
    /// runtime").
    pub(crate) fn add_rights(&mut self, am: AmId, kind: ObjKind, names: &[&str]) -> Result<Rights, RegisterError> {
        let entry = self.am_mut(am).ok_or(RegisterError::UnknownAm)?;
        let kind = entry.kinds.get_mut(kind.index()).ok_or(RegisterError::UnknownKind)?;
        let before = kind.defined_rights();
        append_rights(kind, names)?;
        Ok(kind.defined_rights().without(before))
    }

    /// Registers an operation of AM `am` and returns its id.
    pub(crate) fn register_op(&mut self, am: AmId, spec: OpSpec<'_>) -> Result<OpId, RegisterError> {
        let entry = self.am_mut(am).ok_or(RegisterError::UnknownAm)?;
        validate_name(spec.name)?;
        if entry.ops.iter().any(|op| op.name == spec.name) {
            return Err(RegisterError::DuplicateName);
        }
        if spec.args.is_empty() {
            return Err(RegisterError::NoCapArgs);
        }
        if spec.args.len() > MAX_CAP_ARGS {
            return Err(RegisterError::TooManyCapArgs);
        }
        let mut args = [ArgSpec::new(ObjKind::new(0), Rights::NONE); MAX_CAP_ARGS];
        for (slot, arg) in args.iter_mut().zip(spec.args) {
            let kind = entry.kinds.get(arg.kind.index()).ok_or(RegisterError::UnknownKind)?;
            if !kind.defined_rights().contains(arg.rights) {
                return Err(RegisterError::UndefinedRights);
            }
            *slot = *arg;
        }
        let index = u16::try_from(entry.ops.len()).map_err(|_| RegisterError::TooManyOps)?;
        let op = OpEntry {
            name: copy_name(spec.name)?,
            args,
            // Bounded by MAX_CAP_ARGS above.
            arity: spec.args.len() as u8,
        };
        entry.ops.try_reserve(1).map_err(|_| RegisterError::OutOfMemory)?;
        entry.ops.push(op);
        Ok(OpId::new(am, index))
    }

    /// Returns the operation `op`, if registered.
    #[inline]
    pub(crate) fn op(&self, op: OpId) -> Option<&OpEntry> {
        self.am(op.am())?.ops.get(usize::from(op.index()))
    }

    /// Returns kind `kind` of AM `am`, if registered.
    pub(crate) fn kind(&self, am: AmId, kind: ObjKind) -> Option<&KindEntry> {
        self.am(am)?.kinds.get(kind.index())
    }

    /// Tells whether AM `am` is registered.
    #[inline]
    pub fn has_am(&self, am: AmId) -> bool {
        self.am(am).is_some()
    }

    /// Returns the name of AM `am`.
    pub fn am_name(&self, am: AmId) -> Option<&str> {
        Some(&self.am(am)?.name)
    }

    /// Returns the name of kind `kind` of AM `am`.
    pub fn kind_name(&self, am: AmId, kind: ObjKind) -> Option<&str> {
        Some(&self.kind(am, kind)?.name)
    }

    /// Finds the kind of AM `am` called `name`.
    pub fn find_kind(&self, am: AmId, name: &str) -> Option<ObjKind> {
        let index = self.am(am)?.kinds.iter().position(|kind| kind.name == name)?;
        // Kind numbers fit in u16 by construction (TooManyKinds).
        Some(ObjKind::new(index as u16))
    }

    /// Returns every right kind `kind` of AM `am` names.
    pub fn kind_rights(&self, am: AmId, kind: ObjKind) -> Option<Rights> {
        Some(self.kind(am, kind)?.defined_rights())
    }

    /// Finds the right called `name` of kind `kind` of AM `am`.
    pub fn find_right(&self, am: AmId, kind: ObjKind, name: &str) -> Option<Rights> {
        let kind = self.kind(am, kind)?;
        let index = kind.right_names.iter().position(|right| right == name)?;
        Rights::bit(index)
    }

    /// Lists the names of the rights in `rights` (for logs), lowest bit first; bits the
    /// kind does not name are skipped.
    pub fn right_names(&self, am: AmId, kind: ObjKind, rights: Rights) -> impl Iterator<Item = &str> + '_ {
        let names = self.kind(am, kind).map_or(&[][..], |k| &k.right_names[..]);
        names
            .iter()
            .enumerate()
            .filter(move |(bit, _)| Rights::bit(*bit).is_some_and(|r| rights.contains(r)))
            .map(|(_, name)| name.as_str())
    }

    /// Finds the operation of AM `am` called `name`.
    pub fn find_op(&self, am: AmId, name: &str) -> Option<OpId> {
        let index = self.am(am)?.ops.iter().position(|op| op.name == name)?;
        // Operation numbers fit in u16 by construction (TooManyOps).
        Some(OpId::new(am, index as u16))
    }

    /// Returns the name of operation `op`.
    pub fn op_name(&self, op: OpId) -> Option<&str> {
        Some(&self.op(op)?.name)
    }

    /// Returns the capability arguments operation `op` requires, in order.
    #[inline]
    pub fn op_args(&self, op: OpId) -> Option<&[ArgSpec]> {
        Some(self.op(op)?.args())
    }

    #[inline]
    fn am(&self, am: AmId) -> Option<&AmEntry> {
        self.ams.get(am.index())?.as_deref()
    }

    fn am_mut(&mut self, am: AmId) -> Option<&mut AmEntry> {
        self.ams.get_mut(am.index())?.as_deref_mut()
    }

    fn ams(&self) -> impl Iterator<Item = &AmEntry> {
        self.ams.iter().filter_map(|am| am.as_deref())
    }
}

/// Appends right names to a kind, all or none.
fn append_rights(kind: &mut KindEntry, names: &[&str]) -> Result<(), RegisterError> {
    if kind.right_names.len() + names.len() > Rights::MAX_NAMED {
        return Err(RegisterError::TooManyRights);
    }
    for (i, name) in names.iter().enumerate() {
        validate_name(name)?;
        let repeated_new = names[..i].contains(name);
        if repeated_new || kind.right_names.iter().any(|right| right == name) {
            return Err(RegisterError::DuplicateName);
        }
    }
    // Copy every name before touching the kind, so a failed allocation leaves it as it was.
    let mut copies = Vec::new();
    copies.try_reserve_exact(names.len()).map_err(|_| RegisterError::OutOfMemory)?;
    for name in names {
        copies.push(copy_name(name)?);
    }
    kind.right_names.try_reserve(copies.len()).map_err(|_| RegisterError::OutOfMemory)?;
    kind.right_names.extend(copies);
    Ok(())
}

/// Accepts a name of 1 to [`MAX_NAME_LEN`] printable, non-space ASCII bytes.
fn validate_name(name: &str) -> Result<(), RegisterError> {
    let well_formed =
        !name.is_empty() && name.len() <= MAX_NAME_LEN && name.bytes().all(|byte| byte.is_ascii_graphic());
    if well_formed {
        Ok(())
    } else {
        Err(RegisterError::MalformedName)
    }
}

/// Copies a name into the registry without aborting on allocation failure.
fn copy_name(name: &str) -> Result<String, RegisterError> {
    let mut copy = String::new();
    copy.try_reserve_exact(name.len()).map_err(|_| RegisterError::OutOfMemory)?;
    copy.push_str(name);
    Ok(copy)
}
