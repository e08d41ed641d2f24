//! Decode-then-invoke: the check of every capability argument of an AM operation before its
//! handler runs (DESIGN.md §2 "AM operations", seL4's decode/invoke split), and the checked
//! references that are all a handler ever receives.

use super::node::{Node, State};
use super::{CapTable, UseFault};
use crate::ids::{AmId, ObjId, ObjKind, Object, OpId, Principal, Rights};
use crate::name::CapName;
use crate::registry::MAX_CAP_ARGS;

/// Refers to one capability argument that passed its check: it names an object of the
/// operation's own AM, of the kind the operation declared, with at least the rights it
/// declared.
///
/// Only [`CapTable::check`] and [`CapTable::check_into`] create one (the fields are
/// private and there is no public constructor), so holding one proves the check ran. It
/// is neither `Clone` nor `Copy`: it is meant to be used by the handler it was checked
/// for, within that call (AM calls run to completion, seed §5.3), not kept.
///
/// ```compile_fail
/// # use nk_caps::*;
/// // Code outside the core cannot make one up:
/// let forged = CheckedCap { name: CapName::from_u128(1), object: todo!(), rights: Rights::ALL };
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct CheckedCap {
    name: CapName,
    object: Object,
    rights: Rights,
}

impl CheckedCap {
    const UNUSED: CheckedCap = CheckedCap {
        name: CapName::from_words(0, 0),
        object: Object::new(AmId::new(0), ObjKind::new(0), ObjId::new(0)),
        rights: Rights::NONE,
    };

    /// Returns the name that was presented, so an AM can key an effect by it and undo the
    /// effect when the capability dies.
    #[inline]
    pub fn name(&self) -> CapName {
        self.name
    }

    /// Returns the object the capability refers to.
    #[inline]
    pub fn object(&self) -> Object {
        self.object
    }

    /// Returns the object's id (its AM and kind are the operation's and the argument's).
    #[inline]
    pub fn id(&self) -> ObjId {
        self.object.id
    }

    /// Returns all the rights the capability carries (at least those the argument
    /// required).
    #[inline]
    pub fn rights(&self) -> Rights {
        self.rights
    }
}

/// Carries the checked arguments of one invocation of an AM operation; like
/// [`CheckedCap`], only [`CapTable::check`] makes one, or [`CapTable::check_into`] fills
/// a [`Checked::blank`] (which names no AM's operation and has no arguments) in place.
#[derive(Debug)]
pub struct Checked {
    op: OpId,
    caller: Principal,
    args: [CheckedCap; MAX_CAP_ARGS],
    arity: u8,
}

impl Checked {
    /// The operation a blank [`Checked`] names: operation 0 of AM 0, the null-Kernel's
    /// own id, which no AM handler serves.
    const BLANK_OP: OpId = OpId::new(AmId::new(0), 0);

    /// Returns a blank set of checked arguments for [`CapTable::check_into`] to fill: no
    /// arguments, and the null-Kernel's own operation 0 (no AM's). It proves nothing; only
    /// a successful `check_into` makes it name an operation. A kernel instance keeps one
    /// and reuses it for every AM call, so a call neither clears nor copies the argument
    /// array (issue 14: both showed in the AM call's cost).
    pub const fn blank() -> Self {
        Checked {
            op: Self::BLANK_OP,
            caller: Principal::Am(AmId::new(0)),
            args: [CheckedCap::UNUSED; MAX_CAP_ARGS],
            arity: 0,
        }
    }

    /// Returns the operation that was checked.
    #[inline]
    pub fn op(&self) -> OpId {
        self.op
    }

    /// Returns the AM whose handler must run: every argument names one of its objects.
    #[inline]
    pub fn am(&self) -> AmId {
        self.op.am()
    }

    /// Returns the principal that invoked the operation.
    #[inline]
    pub fn caller(&self) -> Principal {
        self.caller
    }

    /// Returns the checked arguments, in the operation's order.
    #[inline]
    pub fn args(&self) -> &[CheckedCap] {
        &self.args[..usize::from(self.arity)]
    }
}

/// Says why the capability arguments of an invocation were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckError {
    /// The AM or the operation is not registered.
    UnknownOperation,
    /// The invocation presented a different number of names than the operation takes.
    WrongArgCount {
        /// The number of capability arguments the operation takes.
        expected: u8,
        /// The number of names presented (saturated at 255).
        presented: u8,
    },
    /// Argument `index` (from 0) failed; arguments before it passed.
    Arg {
        /// The argument's position.
        index: u8,
        /// Why it failed.
        fault: ArgFault,
    },
}

/// Says why one capability argument failed its check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgFault {
    /// No capability has this name (never issued, deleted, or owned by another kernel).
    UnknownName,
    /// The capability is bound to another principal.
    WrongHolder,
    /// The capability was revoked.
    Revoked,
    /// The capability refers to an object of another kind, or of another AM.
    WrongKind,
    /// The capability lacks some of the rights the argument requires.
    MissingRights,
}

impl From<UseFault> for ArgFault {
    fn from(fault: UseFault) -> Self {
        match fault {
            UseFault::UnknownName => ArgFault::UnknownName,
            UseFault::WrongHolder | UseFault::ProcessBound => ArgFault::WrongHolder,
            UseFault::Revoked => ArgFault::Revoked,
        }
    }
}

impl CapTable {
    /// Checks the capability arguments `names` that `caller` presented to operation `op`
    /// and returns references to them that the operation's handler may use.
    ///
    /// Every argument is resolved and checked, in order, before anything else happens: the
    /// name must exist, be usable by `caller` (its holder, or a bearer capability), be live,
    /// refer to an object of the kind the operation declared for that argument (a kind of
    /// the operation's own AM) and carry at least the declared rights. The first failure is
    /// reported with its argument's index. The check changes nothing.
    #[inline]
    pub fn check(&self, caller: Principal, op: OpId, names: &[CapName]) -> Result<Checked, CheckError> {
        let mut checked = Checked::blank();
        self.check_into(caller, op, names, &mut checked)?;
        Ok(checked)
    }

    /// Checks as [`check`](Self::check) does, writing the checked arguments into
    /// `checked` (the hypercall path's reused [`Checked::blank`]) instead of returning a
    /// new value: only the presented arguments are written. On a refusal `checked` is
    /// left blank (no arguments, no AM's operation), so it never passes for a check that
    /// failed.
    #[inline]
    pub fn check_into(
        &self,
        caller: Principal,
        op: OpId,
        names: &[CapName],
        checked: &mut Checked,
    ) -> Result<(), CheckError> {
        let specs = self.registry.op(op).ok_or(CheckError::UnknownOperation)?.args();
        // Blank until every argument passed.
        (checked.op, checked.arity) = (Checked::BLANK_OP, 0);
        if names.len() != specs.len() {
            return Err(CheckError::WrongArgCount {
                // At most MAX_CAP_ARGS.
                expected: specs.len() as u8,
                presented: u8::try_from(names.len()).unwrap_or(u8::MAX),
            });
        }
        for index in 0..names.len() {
            let (name, spec) = (names[index], &specs[index]);
            let fail = |fault: ArgFault| CheckError::Arg {
                // At most MAX_CAP_ARGS.
                index: index as u8,
                fault,
            };
            let found = match self.resolve_fast(caller, name) {
                Ok(found) => found,
                Err(UseFault::ProcessBound) => return self.check_pinned(caller, op, names.iter().copied(), checked),
                Err(fault) => return Err(fail(fault.into())),
            };
            let node = &self.nodes[found];
            debug_assert_eq!(node.state, State::Live);
            if node.am != op.am() || node.kind != spec.kind {
                return Err(fail(ArgFault::WrongKind));
            }
            if !node.rights.contains(spec.rights) {
                return Err(fail(ArgFault::MissingRights));
            }
            checked.args[index] = CheckedCap { name, object: node.object(), rights: node.rights };
        }
        // At most MAX_CAP_ARGS.
        (checked.op, checked.caller, checked.arity) = (op, caller, specs.len() as u8);
        Ok(())
    }

    /// Checks as [`check_into`](Self::check_into) does the arguments of a call that
    /// presents its names in slots, `slots` yielding them in order: the operation's
    /// arguments are the first slots (as many as it takes) and the rest are ignored. The
    /// hypercall path's check: it reads each name where the call holds it (no copy of the
    /// slots first) and looks the operation up once. Fewer slots than the operation takes
    /// is a [`CheckError::WrongArgCount`].
    ///
    /// A process-bound argument ends the loop early, and the check starts again out of
    /// line with the call's root (`pin.rs`), so no other argument pays for it.
    ///
    /// Always inlined: the hypercall path's check is part of its one frame (issue 14: out
    /// of line it cost about 30 instructions more per call).
    #[inline(always)]
    pub fn check_slots_into<S>(
        &self,
        caller: Principal,
        op: OpId,
        slots: S,
        checked: &mut Checked,
    ) -> Result<(), CheckError>
    where
        S: IntoIterator<Item = CapName>,
        S::IntoIter: Clone,
    {
        let specs = self.registry.op(op).ok_or(CheckError::UnknownOperation)?.args();
        (checked.op, checked.arity) = (Checked::BLANK_OP, 0);
        let am = op.am();
        let mut presented = 0;
        let mut slots = slots.into_iter();
        let again = slots.clone();
        // The common one-argument operation, without the loop's state (issue 14: the loop
        // kept its iterators and the index's fields on the stack even for one argument).
        if let [spec] = specs {
            let fail = |fault: ArgFault| CheckError::Arg { index: 0, fault };
            let found = match slots.next().map(|name| (name, self.resolve_fast(caller, name))) {
                Some((name, Ok(found))) => (name, found),
                // No slot, or a process-bound argument: the full check tells which.
                None | Some((_, Err(UseFault::ProcessBound))) => return self.check_pinned(caller, op, again, checked),
                Some((_, Err(fault))) => return Err(fail(fault.into())),
            };
            let (name, node) = (found.0, &self.nodes[found.1]);
            debug_assert_eq!(node.state, State::Live);
            if node.am != am || node.kind != spec.kind {
                return Err(fail(ArgFault::WrongKind));
            }
            if !node.rights.contains(spec.rights) {
                return Err(fail(ArgFault::MissingRights));
            }
            checked.args[0] = CheckedCap { name, object: node.object(), rights: node.rights };
            (checked.op, checked.caller, checked.arity) = (op, caller, 1);
            return Ok(());
        }
        // The node of the argument before, if any: a call that presents one name in
        // several arguments resolves it once (the node there is live and usable by
        // `caller` without a root, and names are unique, so a repeated name resolves to
        // it again).
        let mut previous: Option<&Node> = None;
        for ((name, spec), out) in slots.zip(specs).zip(checked.args.iter_mut()) {
            let fail = |fault: ArgFault| CheckError::Arg {
                // At most MAX_CAP_ARGS.
                index: presented as u8,
                fault,
            };
            let node = match previous {
                Some(node) if node.name == name => node,
                _ => match self.resolve_fast(caller, name) {
                    Ok(found) => &self.nodes[found],
                    // Leaves `presented` short: the check below starts again.
                    Err(UseFault::ProcessBound) => break,
                    Err(fault) => return Err(fail(fault.into())),
                },
            };
            previous = Some(node);
            debug_assert_eq!(node.state, State::Live);
            if node.am != am || node.kind != spec.kind {
                return Err(fail(ArgFault::WrongKind));
            }
            if !node.rights.contains(spec.rights) {
                return Err(fail(ArgFault::MissingRights));
            }
            *out = CheckedCap { name, object: node.object(), rights: node.rights };
            presented += 1;
        }
        if presented != specs.len() {
            // Too few slots, or a process-bound argument: the full check tells which.
            return self.check_pinned(caller, op, again, checked);
        }
        // At most MAX_CAP_ARGS.
        (checked.op, checked.caller, checked.arity) = (op, caller, specs.len() as u8);
        Ok(())
    }

    /// The check of [`check_slots_into`](Self::check_slots_into) with
    /// [`resolve`](Self::resolve), which reads the call's root for a process-bound
    /// argument: where the fast loops go when they meet one.
    #[cold]
    #[inline(never)]
    fn check_pinned(
        &self,
        caller: Principal,
        op: OpId,
        slots: impl Iterator<Item = CapName>,
        checked: &mut Checked,
    ) -> Result<(), CheckError> {
        let specs = self.registry.op(op).ok_or(CheckError::UnknownOperation)?.args();
        (checked.op, checked.arity) = (Checked::BLANK_OP, 0);
        let mut presented = 0;
        for ((name, spec), out) in slots.zip(specs).zip(checked.args.iter_mut()) {
            let fail = |fault: ArgFault| CheckError::Arg {
                // At most MAX_CAP_ARGS.
                index: presented as u8,
                fault,
            };
            let found = self.resolve(caller, name).map_err(|fault| fail(fault.into()))?;
            let node = &self.nodes[found];
            if node.am != op.am() || node.kind != spec.kind {
                return Err(fail(ArgFault::WrongKind));
            }
            if !node.rights.contains(spec.rights) {
                return Err(fail(ArgFault::MissingRights));
            }
            *out = CheckedCap { name, object: node.object(), rights: node.rights };
            presented += 1;
        }
        if presented != specs.len() {
            return Err(CheckError::WrongArgCount {
                // At most MAX_CAP_ARGS.
                expected: specs.len() as u8,
                presented: presented as u8,
            });
        }
        // At most MAX_CAP_ARGS.
        (checked.op, checked.caller, checked.arity) = (op, caller, specs.len() as u8);
        Ok(())
    }
}
