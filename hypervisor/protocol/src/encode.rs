//! The wire format of a [`Message`]: [`MESSAGE_WORDS`] 64-bit words, the slot size of the
//! hypervisor's per-pair rings (nk-ring). Decoding checks every field, so a corrupted slot
//! becomes a [`DecodeError`], never a wrong message or a panic.
//!
//! Word 0 is a header: bits 7..0 the message tag, 15..8 a small field (a binding, an
//! outcome kind), 31..16 an AM id, 47..32 an object kind, 63..48 an error code or a kernel
//! id. The other words carry names (two words, high first), object ids, rights, principals
//! and operation ids, in the order the code below lists.

use nk_caps::{
    AmId, Binding, CapError, CapName, KernelId, ObjId, ObjKind, Object, Principal, RemoteGrant, Rights, VmId,
};

use crate::error::ProtoError;
use crate::message::{Message, Routed};
use crate::op::{OpId, Outcome};

/// The number of 64-bit words one encoded message takes.
pub const MESSAGE_WORDS: usize = 8;

/// Says why words could not be decoded into a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The tag names no message.
    UnknownTag,
    /// A field holds a value its type does not have.
    BadField,
}

mod tag {
    pub const DELEGATE: u64 = 1;
    pub const DELEGATE_ACK: u64 = 2;
    pub const OBTAIN: u64 = 3;
    pub const OBTAIN_ACK: u64 = 4;
    pub const REVOKE: u64 = 5;
    pub const GONE: u64 = 6;
    pub const ROUTED_REVOKE: u64 = 7;
    pub const ROUTED_DELEGATE: u64 = 8;
    pub const ROUTED_DONE: u64 = 9;
    pub const CRASH: u64 = 10;
    pub const CRASH_DONE: u64 = 11;
    pub const REVOKE_BELOW: u64 = 12;
    pub const GONE_BELOW: u64 = 13;
}

/// The header's small field for results: which variant follows.
const RESULT_OK: u64 = 0;
const RESULT_ERR: u64 = 1;
const RESULT_NAME: u64 = 2;
const RESULT_COUNT: u64 = 3;

struct Writer {
    words: [u64; MESSAGE_WORDS],
    next: usize,
}

impl Writer {
    fn new(tag: u64) -> Self {
        Self { words: [tag, 0, 0, 0, 0, 0, 0, 0], next: 1 }
    }

    fn small(&mut self, value: u64) {
        self.words[0] |= (value & 0xff) << 8;
    }

    fn object_kind(&mut self, object: Object) {
        self.words[0] |= (u64::from(object.am.raw()) << 16) | (u64::from(object.kind.raw()) << 32);
    }

    fn high(&mut self, value: u16) {
        self.words[0] |= u64::from(value) << 48;
    }

    fn word(&mut self, value: u64) {
        self.words[self.next] = value;
        self.next += 1;
    }

    fn name(&mut self, name: CapName) {
        let (hi, lo) = name.words();
        self.word(hi);
        self.word(lo);
    }

    fn grant(&mut self, grant: RemoteGrant) {
        self.object_kind(grant.object);
        self.small(binding_code(grant.binding));
        self.name(grant.child);
        self.word(grant.object.id.raw());
        self.word(grant.rights.bits());
    }
}

struct Reader<'a> {
    words: &'a [u64; MESSAGE_WORDS],
    next: usize,
}

impl Reader<'_> {
    fn small(&self) -> u64 {
        (self.words[0] >> 8) & 0xff
    }

    fn high(&self) -> u16 {
        (self.words[0] >> 48) as u16
    }

    fn word(&mut self) -> u64 {
        let value = self.words[self.next];
        self.next += 1;
        value
    }

    fn name(&mut self) -> CapName {
        let hi = self.word();
        CapName::from_words(hi, self.word())
    }

    fn grant(&mut self) -> Result<RemoteGrant, DecodeError> {
        let am = AmId::new((self.words[0] >> 16) as u16);
        let kind = ObjKind::new((self.words[0] >> 32) as u16);
        let binding = binding_from(self.small())?;
        let child = self.name();
        let object = Object::new(am, kind, ObjId::new(self.word()));
        let rights = Rights::from_bits(self.word());
        Ok(RemoteGrant { child, object, rights, binding })
    }

    fn principal(&mut self) -> Result<Principal, DecodeError> {
        principal_from(self.word())
    }
}

fn binding_code(binding: Binding) -> u64 {
    match binding {
        Binding::Bound => 0,
        Binding::Bearer => 1,
        // Never sent: a process binding does not leave its kernel instance (nk-caps
        // `pin.rs`); were it sent, the receiver would hold a capability nobody can use.
        Binding::Process => 2,
    }
}

fn binding_from(code: u64) -> Result<Binding, DecodeError> {
    match code {
        0 => Ok(Binding::Bound),
        1 => Ok(Binding::Bearer),
        2 => Ok(Binding::Process),
        _ => Err(DecodeError::BadField),
    }
}

const AM_BIT: u64 = 1 << 63;

fn principal_code(principal: Principal) -> u64 {
    match principal {
        Principal::Vm(vm) => u64::from(vm.raw()),
        Principal::Am(am) => AM_BIT | u64::from(am.raw()),
    }
}

fn principal_from(word: u64) -> Result<Principal, DecodeError> {
    if word & AM_BIT != 0 {
        u16::try_from(word & !AM_BIT).map(|am| Principal::Am(AmId::new(am))).map_err(|_| DecodeError::BadField)
    } else {
        u32::try_from(word).map(|vm| Principal::Vm(VmId::new(vm))).map_err(|_| DecodeError::BadField)
    }
}

/// Packs the two principals of a delegation, whose message has no word to spare: a word
/// with the holder's id (bits 31:0), its AM flag (bit 32), the delegator's AM flag (bit 33)
/// and the delegator id's high half (bits 63:48); the delegator id's low half goes to the
/// header's high field.
fn principal_pair(holder: Principal, delegator: Principal) -> (u64, u16) {
    let split = |principal| match principal {
        Principal::Vm(vm) => (u64::from(vm.raw()), 0),
        Principal::Am(am) => (u64::from(am.raw()), 1),
    };
    let ((holder_id, holder_am), (delegator_id, delegator_am)) = (split(holder), split(delegator));
    let word = holder_id | (holder_am << 32) | (delegator_am << 33) | ((delegator_id >> 16) << 48);
    (word, delegator_id as u16)
}

fn principal_pair_from(word: u64, low: u16) -> Result<(Principal, Principal), DecodeError> {
    if word & 0x0000_FFFC_0000_0000 != 0 {
        return Err(DecodeError::BadField);
    }
    let make = |id: u64, am: bool| -> Result<Principal, DecodeError> {
        if am {
            u16::try_from(id).map(|am| Principal::Am(AmId::new(am))).map_err(|_| DecodeError::BadField)
        } else {
            Ok(Principal::Vm(VmId::new(id as u32)))
        }
    };
    let holder = make(word & 0xFFFF_FFFF, word & (1 << 32) != 0)?;
    let delegator = make(((word >> 48) << 16) | u64::from(low), word & (1 << 33) != 0)?;
    Ok((holder, delegator))
}

/// Numbers errors for the header's high field (0 means none).
fn error_code(error: ProtoError) -> u16 {
    match error {
        ProtoError::UnknownKernel => 1,
        ProtoError::Cap(error) => {
            0x100
                + match error {
                    CapError::UnknownName => 0,
                    CapError::WrongHolder => 1,
                    CapError::Revoked => 2,
                    CapError::NotImplementer => 3,
                    CapError::UnknownAm => 4,
                    CapError::UnknownKind => 5,
                    CapError::UndefinedRights => 6,
                    CapError::UnknownPrincipal => 7,
                    CapError::QuotaExceeded => 8,
                    CapError::TableFull => 9,
                    CapError::NotBindable => 10,
                }
        }
    }
}

fn error_from(code: u16) -> Result<ProtoError, DecodeError> {
    let cap = |error| Ok(ProtoError::Cap(error));
    match code {
        1 => Ok(ProtoError::UnknownKernel),
        0x100 => cap(CapError::UnknownName),
        0x101 => cap(CapError::WrongHolder),
        0x102 => cap(CapError::Revoked),
        0x103 => cap(CapError::NotImplementer),
        0x104 => cap(CapError::UnknownAm),
        0x105 => cap(CapError::UnknownKind),
        0x106 => cap(CapError::UndefinedRights),
        0x107 => cap(CapError::UnknownPrincipal),
        0x108 => cap(CapError::QuotaExceeded),
        0x109 => cap(CapError::TableFull),
        0x10A => cap(CapError::NotBindable),
        _ => Err(DecodeError::BadField),
    }
}

impl Message {
    /// Encodes the message as [`MESSAGE_WORDS`] words for a ring slot.
    pub fn encode(&self) -> [u64; MESSAGE_WORDS] {
        match *self {
            Message::Delegate { grant, parent, holder, delegator } => {
                let mut w = Writer::new(tag::DELEGATE);
                w.grant(grant);
                w.name(parent);
                let (word, low) = principal_pair(holder, delegator);
                w.high(low);
                w.word(word);
                w.words
            }
            Message::DelegateAck { child, result } => {
                let mut w = Writer::new(tag::DELEGATE_ACK);
                w.name(child);
                if let Err(error) = result {
                    w.small(RESULT_ERR);
                    w.high(error_code(error));
                }
                w.words
            }
            Message::Obtain { child, parent, presenter, mask, binding } => {
                let mut w = Writer::new(tag::OBTAIN);
                w.small(binding.map_or(0, |b| 1 + binding_code(b)));
                w.name(child);
                w.name(parent);
                w.word(principal_code(presenter));
                w.word(mask.bits());
                w.words
            }
            Message::ObtainAck { child, result } => {
                let mut w = Writer::new(tag::OBTAIN_ACK);
                match result {
                    Ok(grant) => {
                        w.grant(grant);
                        w.name(child);
                    }
                    Err(error) => {
                        w.high(error_code(error));
                        // The grant's slot is left empty; the child follows it as above.
                        w.next = 5;
                        w.name(child);
                        w.words[0] |= 1 << 15;
                    }
                }
                w.words
            }
            Message::Revoke { target } => {
                let mut w = Writer::new(tag::REVOKE);
                w.name(target);
                w.words
            }
            Message::Gone { child, killed } => {
                let mut w = Writer::new(tag::GONE);
                w.name(child);
                w.word(killed);
                w.words
            }
            Message::RevokeBelow { parent } => {
                let mut w = Writer::new(tag::REVOKE_BELOW);
                w.name(parent);
                w.words
            }
            Message::GoneBelow { parent, killed } => {
                let mut w = Writer::new(tag::GONE_BELOW);
                w.name(parent);
                w.word(killed);
                w.words
            }
            Message::Routed { op, presenter, request: Routed::Revoke { target } } => {
                let mut w = Writer::new(tag::ROUTED_REVOKE);
                w.word(op.raw());
                w.word(principal_code(presenter));
                w.name(target);
                w.words
            }
            Message::Routed { op, presenter, request: Routed::Delegate { parent, target, kernel, mask, binding } } => {
                let mut w = Writer::new(tag::ROUTED_DELEGATE);
                w.small(binding_code(binding));
                w.high(kernel.raw());
                w.word(op.raw());
                w.word(principal_code(presenter));
                w.name(parent);
                w.word(principal_code(target));
                w.word(mask.bits());
                w.words
            }
            Message::RoutedDone { op, result } => {
                let mut w = Writer::new(tag::ROUTED_DONE);
                w.word(op.raw());
                match result {
                    Ok(Outcome::Name(name)) => {
                        w.small(RESULT_NAME);
                        w.name(name);
                    }
                    Ok(Outcome::Count(count)) => {
                        w.small(RESULT_COUNT);
                        w.word(count);
                    }
                    Err(error) => {
                        w.small(RESULT_ERR);
                        w.high(error_code(error));
                    }
                }
                w.words
            }
            Message::Crash { op, vm } => {
                let mut w = Writer::new(tag::CRASH);
                w.word(op.raw());
                w.word(u64::from(vm.raw()));
                w.words
            }
            Message::CrashDone { op, killed } => {
                let mut w = Writer::new(tag::CRASH_DONE);
                w.word(op.raw());
                w.word(killed);
                w.words
            }
        }
    }

    /// Decodes a message from a ring slot, checking every field.
    pub fn decode(words: &[u64; MESSAGE_WORDS]) -> Result<Message, DecodeError> {
        let mut r = Reader { words, next: 1 };
        let result_ok_or_err = |r: &Reader<'_>| match r.small() {
            RESULT_OK => Ok(Ok(())),
            RESULT_ERR => Ok(Err(error_from(r.high())?)),
            _ => Err(DecodeError::BadField),
        };
        Ok(match words[0] & 0xff {
            tag::DELEGATE => {
                let grant = r.grant()?;
                let parent = r.name();
                let (holder, delegator) = principal_pair_from(r.word(), r.high())?;
                Message::Delegate { grant, parent, holder, delegator }
            }
            tag::DELEGATE_ACK => Message::DelegateAck { child: r.name(), result: result_ok_or_err(&r)? },
            tag::OBTAIN => {
                let binding = match r.small() {
                    0 => None,
                    code => Some(binding_from(code - 1)?),
                };
                let child = r.name();
                let parent = r.name();
                let presenter = r.principal()?;
                Message::Obtain { child, parent, presenter, mask: Rights::from_bits(r.word()), binding }
            }
            tag::OBTAIN_ACK => {
                if words[0] & (1 << 15) != 0 {
                    let error = error_from(r.high())?;
                    r.next = 5;
                    Message::ObtainAck { child: r.name(), result: Err(error) }
                } else {
                    let grant = r.grant()?;
                    Message::ObtainAck { child: r.name(), result: Ok(grant) }
                }
            }
            tag::REVOKE => Message::Revoke { target: r.name() },
            tag::GONE => {
                let child = r.name();
                Message::Gone { child, killed: r.word() }
            }
            tag::REVOKE_BELOW => Message::RevokeBelow { parent: r.name() },
            tag::GONE_BELOW => {
                let parent = r.name();
                Message::GoneBelow { parent, killed: r.word() }
            }
            tag::ROUTED_REVOKE => {
                let op = OpId::new(r.word());
                let presenter = r.principal()?;
                Message::Routed { op, presenter, request: Routed::Revoke { target: r.name() } }
            }
            tag::ROUTED_DELEGATE => {
                let binding = binding_from(r.small())?;
                let kernel = KernelId::new(r.high());
                let op = OpId::new(r.word());
                let presenter = r.principal()?;
                let parent = r.name();
                let target = r.principal()?;
                let mask = Rights::from_bits(r.word());
                Message::Routed { op, presenter, request: Routed::Delegate { parent, target, kernel, mask, binding } }
            }
            tag::ROUTED_DONE => {
                let op = OpId::new(r.word());
                let result = match r.small() {
                    RESULT_NAME => Ok(Outcome::Name(r.name())),
                    RESULT_COUNT => Ok(Outcome::Count(r.word())),
                    RESULT_ERR => Err(error_from(r.high())?),
                    _ => return Err(DecodeError::BadField),
                };
                Message::RoutedDone { op, result }
            }
            tag::CRASH => {
                let op = OpId::new(r.word());
                let vm = u32::try_from(r.word()).map_err(|_| DecodeError::BadField)?;
                Message::Crash { op, vm: VmId::new(vm) }
            }
            tag::CRASH_DONE => {
                let op = OpId::new(r.word());
                Message::CrashDone { op, killed: r.word() }
            }
            _ => return Err(DecodeError::UnknownTag),
        })
    }
}
