//! The deterministic simulator: N kernels, per-pair FIFO channels, a scheduler that picks
//! which channel delivers next or which scripted operation starts, and the invariant checks
//! run after every step.
//!
//! Channels are FIFO per ordered pair of kernels, as Barrelfish assumes (thesis §4.1) and
//! the hypervisor's per-pair rings provide; messages of different pairs are reordered and
//! delayed arbitrarily (the scheduler may leave any channel waiting for any number of
//! steps). A message dropped and retried by a transport is, under that FIFO promise, a
//! delayed message and everything behind it waiting: the same interleavings.

use std::collections::{BTreeMap, VecDeque};

use nk_caps::{
    AmId, Binding, CapName, CapTable, DeadCap, FixedSeed, KernelId, KindSpec, NodeState, NodeView, ObjId, ObjKind,
    Object, Principal, Rights, VmId,
};

use crate::{Kernel, Message, OpId, Outcome, ProtoError, Started};

pub(crate) const EXO: AmId = AmId::new(1);
pub(crate) const FRAME: ObjKind = ObjKind::new(0);
pub(crate) const RWX: Rights = Rights::from_bits(0b111);
pub(crate) const R: Rights = Rights::from_bits(0b001);
pub(crate) const RW: Rights = Rights::from_bits(0b011);

/// Returns VM `n` as a principal.
pub(crate) fn vm(n: u32) -> Principal {
    Principal::Vm(VmId::new(n))
}

/// The exo AM as a principal.
pub(crate) fn exo() -> Principal {
    Principal::Am(EXO)
}

/// Returns kernel `n`'s id.
pub(crate) fn k(n: u16) -> KernelId {
    KernelId::new(n)
}

/// Names a capability operation a scenario starts on a kernel.
#[derive(Clone, Debug)]
pub(crate) enum Action {
    Derive {
        kernel: u16,
        caller: Principal,
        cap: CapName,
        mask: Rights,
    },
    Delegate {
        kernel: u16,
        caller: Principal,
        cap: CapName,
        target: Principal,
        to: u16,
        mask: Rights,
        binding: Binding,
    },
    Revoke {
        kernel: u16,
        caller: Principal,
        cap: CapName,
    },
    Delete {
        kernel: u16,
        caller: Principal,
        cap: CapName,
    },
    Crash {
        kernel: u16,
        vm: VmId,
        also_on: Vec<u16>,
    },
}

impl Action {
    fn kernel(&self) -> u16 {
        match *self {
            Action::Derive { kernel, .. }
            | Action::Delegate { kernel, .. }
            | Action::Revoke { kernel, .. }
            | Action::Delete { kernel, .. }
            | Action::Crash { kernel, .. } => kernel,
        }
    }
}

/// Names one step the scheduler may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Deliver the oldest message of channel `from -> to`.
    Deliver(u16, u16),
    /// Start scripted action number `n`.
    Start(usize),
}

/// What a scripted action ended with, and when (the step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    pub(crate) result: Result<Outcome, ProtoError>,
    pub(crate) step: usize,
}

/// N kernels, their channels, a script of actions and everything the checks need.
pub(crate) struct Sim {
    pub(crate) kernels: Vec<Kernel>,
    /// FIFO channel per ordered pair (from, to).
    pub(crate) channels: BTreeMap<(u16, u16), VecDeque<Message>>,
    pub(crate) actions: Vec<Action>,
    /// Which actions were started.
    pub(crate) started: Vec<bool>,
    /// The pending operation of each started action.
    pending: BTreeMap<(u16, OpId), usize>,
    /// The end of each action.
    pub(crate) ended: Vec<Option<Ended>>,
    /// Actions that ended in the current step (checked once it is observed).
    just_ended: Vec<usize>,
    /// Which actions built the starting state (their deaths and counts are not checked).
    setup: Vec<bool>,
    /// Every capability whose hook ran, with the kernel it ran on (each at most once).
    pub(crate) dead: BTreeMap<CapName, u16>,
    /// Hooks that ran during the scripted phase (setup deaths excluded).
    pub(crate) scripted_deaths: u64,
    /// The global derivation tree as observed: capability -> its parent's name.
    pub(crate) ghost: BTreeMap<CapName, Option<CapName>>,
    pub(crate) steps: usize,
    /// The log of steps, printed when a check fails.
    pub(crate) trace: Vec<String>,
    /// Whether to record a trace (off in large random runs for speed).
    pub(crate) tracing: bool,
    /// Messages delivered.
    pub(crate) delivered: usize,
}

impl Sim {
    /// Builds `n` kernels with the exo AM (kind "frame": read, write, exec) and VMs
    /// `vms_per_kernel` per kernel: kernel `k` runs VMs `k * 10 + 1 ..`.
    pub(crate) fn new(n: u16, vms_per_kernel: u32, capacity: u32) -> Self {
        let kernels = (0..n)
            .map(|id| {
                let mut table =
                    CapTable::new(KernelId::new(id), capacity, &mut FixedSeed::from_u64(1000 + u64::from(id)))
                        .expect("table");
                table.register_am(EXO, "exo", capacity).expect("exo");
                table.register_kind(EXO, KindSpec { name: "frame", rights: &["read", "write", "exec"] }).expect("kind");
                for v in 0..vms_per_kernel {
                    table.add_vm(VmId::new(u32::from(id) * 10 + 1 + v), capacity).expect("vm");
                }
                Kernel::new(table, n).expect("kernel")
            })
            .collect();
        Self {
            kernels,
            channels: BTreeMap::new(),
            actions: Vec::new(),
            started: Vec::new(),
            pending: BTreeMap::new(),
            ended: Vec::new(),
            setup: Vec::new(),
            just_ended: Vec::new(),
            dead: BTreeMap::new(),
            scripted_deaths: 0,
            ghost: BTreeMap::new(),
            steps: 0,
            trace: Vec::new(),
            tracing: true,
            delivered: 0,
        }
    }

    /// Returns the VM that runs on kernel `kernel` as its `index`-th (from 0).
    pub(crate) fn vm_on(kernel: u16, index: u32) -> Principal {
        vm(u32::from(kernel) * 10 + 1 + index)
    }

    /// Mints, as the exo AM on `kernel`, a root with all rights to frame `id`.
    pub(crate) fn mint(&mut self, kernel: u16, id: u64) -> CapName {
        let name = self.kernels[usize::from(kernel)]
            .table_mut()
            .mint(exo(), Object::new(EXO, FRAME, ObjId::new(id)), RWX)
            .expect("mint");
        self.observe();
        name
    }

    // ---------------------------------------------------------------------------------
    // Running.
    // ---------------------------------------------------------------------------------

    /// Runs `action` at once and delivers every message (oldest channel first) until all is
    /// quiet; for building a scenario's starting state. Returns its result.
    pub(crate) fn setup(&mut self, action: Action) -> Result<Outcome, ProtoError> {
        let deaths = self.scripted_deaths;
        let index = self.script(action);
        self.setup[index] = true;
        self.apply(Choice::Start(index));
        while let Some(choice) = self.deliveries().first().copied() {
            self.apply(choice);
        }
        self.check().unwrap_or_else(|error| panic!("setup: {error}\n{}", self.trace.join("\n")));
        // Setup deaths are not part of a scenario's count.
        self.scripted_deaths = deaths;
        self.ended[index].expect("setup action ended").result
    }

    /// Runs a setup action that must produce a capability; returns its name.
    pub(crate) fn setup_name(&mut self, action: Action) -> CapName {
        match self.setup(action.clone()) {
            Ok(Outcome::Name(name)) => name,
            other => panic!("setup {action:?} gave {other:?}"),
        }
    }

    /// Adds `action` to the script (not started yet); returns its number.
    pub(crate) fn script(&mut self, action: Action) -> usize {
        self.actions.push(action);
        self.started.push(false);
        self.ended.push(None);
        self.setup.push(false);
        self.actions.len() - 1
    }

    /// Returns the action index of the `n`-th scripted action that is not a setup action.
    pub(crate) fn nth(&self, n: usize) -> usize {
        (0..self.actions.len()).filter(|&i| !self.setup[i]).nth(n).expect("so many scripted actions")
    }

    /// Lists the channels with a message to deliver.
    pub(crate) fn deliveries(&self) -> Vec<Choice> {
        self.channels.iter().filter(|(_, q)| !q.is_empty()).map(|(&(from, to), _)| Choice::Deliver(from, to)).collect()
    }

    /// Lists every step the scheduler may take now.
    pub(crate) fn choices(&self) -> Vec<Choice> {
        let mut choices = self.deliveries();
        choices.extend((0..self.actions.len()).filter(|&i| !self.started[i]).map(Choice::Start));
        choices
    }

    /// Takes one step.
    pub(crate) fn apply(&mut self, choice: Choice) {
        self.steps += 1;
        let mut hook_log: Vec<(u16, DeadCap)> = Vec::new();
        let mut out: Vec<(KernelId, Message)> = Vec::new();
        let at = match choice {
            Choice::Deliver(from, to) => {
                let message = self.channels.get_mut(&(from, to)).and_then(VecDeque::pop_front).expect("a message");
                if self.tracing {
                    self.trace.push(format!("{:>4}: k{from} -> k{to}: {message:?}", self.steps));
                }
                self.delivered += 1;
                let mut hook = |dead: &DeadCap| hook_log.push((to, *dead));
                self.kernels[usize::from(to)].handle(k(from), message, &mut hook, &mut out);
                to
            }
            Choice::Start(index) => {
                self.started[index] = true;
                let action = self.actions[index].clone();
                if self.tracing {
                    self.trace.push(format!("{:>4}: start #{index} {action:?}", self.steps));
                }
                let at = action.kernel();
                let kernel = &mut self.kernels[usize::from(at)];
                let mut hook = |dead: &DeadCap| hook_log.push((at, *dead));
                let started = match action {
                    Action::Derive { caller, cap, mask, .. } => kernel.derive(caller, cap, mask, &mut out),
                    Action::Delegate { caller, cap, target, to, mask, binding, .. } => {
                        kernel.delegate(caller, cap, target, k(to), mask, binding, &mut out)
                    }
                    Action::Revoke { caller, cap, .. } => kernel.revoke(caller, cap, &mut hook, &mut out),
                    Action::Delete { caller, cap, .. } => kernel.delete(caller, cap, &mut hook, &mut out),
                    Action::Crash { vm, also_on, .. } => {
                        let also: Vec<KernelId> = also_on.iter().map(|&n| k(n)).collect();
                        kernel.crash(vm, &also, &mut hook, &mut out)
                    }
                };
                match started {
                    Started::Done(result) => self.end(index, result),
                    Started::Pending(op) => {
                        self.pending.insert((at, op), index);
                    }
                }
                at
            }
        };
        for (kernel, dead) in hook_log {
            if self.tracing {
                self.trace.push(format!("        k{kernel} hook: {:?}", dead.name));
            }
            if let Some(first) = self.dead.insert(dead.name, kernel) {
                self.fail_now(format!("the hook of {:?} ran twice (k{first}, k{kernel})", dead.name));
            }
            self.scripted_deaths += 1;
        }
        for (to, message) in out {
            if self.tracing {
                self.trace.push(format!("        k{at} sends to k{}: {message:?}", to.raw()));
            }
            self.channels.entry((at, to.raw())).or_default().push_back(message);
        }
        for id in 0..self.kernels.len() {
            while let Some(done) = self.kernels[id].poll() {
                match self.pending.remove(&(id as u16, done.op)) {
                    Some(index) => self.end(index, done.result),
                    None => self.fail_now(format!("k{id} completed unknown {:?}", done.op)),
                }
            }
        }
        self.observe();
        for index in core::mem::take(&mut self.just_ended) {
            if let Err(error) = self.check_ended(index) {
                self.fail_now(error);
            }
        }
    }

    fn end(&mut self, index: usize, result: Result<Outcome, ProtoError>) {
        if self.tracing {
            self.trace.push(format!("        #{index} ends: {result:?}"));
        }
        if self.ended[index].is_some() {
            self.fail_now(format!("action #{index} ended twice"));
        }
        self.ended[index] = Some(Ended { result, step: self.steps });
        self.just_ended.push(index);
    }

    fn fail_now(&self, error: String) -> ! {
        panic!("{error}\ntrace:\n{}", self.trace.join("\n"))
    }

    /// Runs `choices` in order, checking after each.
    pub(crate) fn run(&mut self, choices: &[Choice]) {
        for &choice in choices {
            assert!(self.choices().contains(&choice), "{choice:?} is not enabled");
            self.apply(choice);
            self.check_or_panic();
        }
    }

    /// Delivers everything, oldest channel first, checking after each step.
    pub(crate) fn drain(&mut self) {
        while let Some(choice) = self.deliveries().first().copied() {
            self.apply(choice);
            self.check_or_panic();
        }
    }

    pub(crate) fn check_or_panic(&self) {
        if let Err(error) = self.check() {
            self.fail_now(error);
        }
    }

    // ---------------------------------------------------------------------------------
    // Observation and checks.
    // ---------------------------------------------------------------------------------

    /// Records the global parent of every capability seen (links never change while a
    /// capability is in a tree, so the first sighting is its parent for good).
    fn observe(&mut self) {
        for kernel in &self.kernels {
            for view in kernel.table().nodes() {
                if view.cap.is_none() || self.ghost.contains_key(&view.name) {
                    continue;
                }
                if view.state == NodeState::Revoked {
                    // Revoked before being seen: a child created and killed in one step
                    // never happens, so this is a setup root; record it without a parent.
                    self.ghost.insert(view.name, None);
                    continue;
                }
                self.ghost.insert(view.name, view.parent);
            }
        }
    }

    /// Finds the node named `name` on the kernel its name says.
    pub(crate) fn node(&self, name: CapName) -> Option<NodeView> {
        self.kernels.get(usize::from(name.kernel().raw()))?.table().node(name)
    }

    /// Finds the node named `name` on kernel `kernel` (a proxy, there).
    fn node_on(&self, kernel: u16, name: CapName) -> Option<NodeView> {
        self.kernels[usize::from(kernel)].table().node(name)
    }

    /// Tells whether `name` is usable on its kernel.
    pub(crate) fn live(&self, name: CapName) -> bool {
        self.node(name).is_some_and(|view| view.state == NodeState::Live)
    }

    /// Lists `root` and every capability ever derived from it, through the ghost tree.
    pub(crate) fn subtree(&self, root: CapName) -> Vec<CapName> {
        let mut children: BTreeMap<CapName, Vec<CapName>> = BTreeMap::new();
        for (&child, &parent) in &self.ghost {
            if let Some(parent) = parent {
                children.entry(parent).or_default().push(child);
            }
        }
        let mut found = vec![root];
        let mut at = 0;
        while at < found.len() {
            if let Some(list) = children.get(&found[at]) {
                found.extend(list.iter().copied());
            }
            at += 1;
        }
        found
    }

    /// Tells whether a message mentioning `name` is in flight between `a` and `b` (either
    /// way): one that will resolve a link that looks dangling.
    fn in_flight(&self, a: u16, b: u16, name: CapName) -> bool {
        let mentions = |message: &Message| match *message {
            Message::Delegate { grant, .. } => grant.child == name,
            Message::DelegateAck { child, .. }
            | Message::Obtain { child, .. }
            | Message::ObtainAck { child, .. }
            | Message::Gone { child, .. } => child == name,
            Message::Revoke { target } => target == name,
            _ => false,
        };
        [(a, b), (b, a)].iter().any(|pair| self.channels.get(pair).is_some_and(|q| q.iter().any(mentions)))
    }

    /// Tells whether kernel `home` will report the children of `parent` (on `kernel`) gone
    /// in one batch: it holds the batch open, or its `GoneBelow` is on the way.
    fn batch_resolves(&self, home: u16, kernel: u16, parent: CapName) -> bool {
        self.kernels[usize::from(home)].below.contains_key(&parent)
            || self.channels.get(&(home, kernel)).is_some_and(|q| {
                q.iter().any(|message| matches!(*message, Message::GoneBelow { parent: p, .. } if p == parent))
            })
    }

    /// Checks every invariant that must hold after each step: each table's audit, no
    /// dangling link across kernels (allowing for messages in flight that resolve it), and
    /// no amplification across kernels.
    pub(crate) fn check(&self) -> Result<(), String> {
        for (id, kernel) in self.kernels.iter().enumerate() {
            kernel.table().check_consistency().map_err(|failure| format!("k{id} audit: {}", failure.0))?;
        }
        for (id, kernel) in self.kernels.iter().enumerate() {
            let id = id as u16;
            for view in kernel.table().nodes() {
                let parent = view.parent.and_then(|p| kernel.table().node(p));
                match view.state {
                    NodeState::Live | NodeState::Revoking | NodeState::Pending => {
                        // A capability below a proxy: the parent's kernel links back.
                        let Some(proxy) = parent.filter(|p| p.cap.is_none()) else { continue };
                        let home = proxy.name.kernel().raw();
                        let back = self.node_on(home, view.name);
                        let linked = back.is_some_and(|b| b.cap.is_none() && b.parent == Some(proxy.name));
                        let resolving = view.state == NodeState::Pending && self.in_flight(id, home, view.name);
                        if !linked && !resolving {
                            return Err(format!(
                                "k{id}: {:?} ({:?}) hangs below remote {:?}, but k{home} has no proxy of it below that parent",
                                view.name, view.state, proxy.name
                            ));
                        }
                        if view.state == NodeState::Live {
                            if let (Some(remote), Some(cap)) = (self.node(proxy.name), view.cap) {
                                if let (NodeState::Live, Some(parent_cap)) = (remote.state, remote.cap) {
                                    if parent_cap.object != cap.object || !parent_cap.rights.contains(cap.rights) {
                                        return Err(format!("k{id}: {:?} amplifies its remote parent", view.name));
                                    }
                                }
                            }
                        }
                    }
                    NodeState::Remote | NodeState::RemoteRevoking => {
                        // A proxy of a remote child: the child's kernel has it below a proxy
                        // of this parent, or a message about it is on the way.
                        let Some(local_parent) = parent.filter(|p| p.cap.is_some()) else { continue };
                        let home = view.name.kernel().raw();
                        let there = self.node_on(home, view.name);
                        let linked = there.is_some_and(|t| {
                            matches!(t.state, NodeState::Live | NodeState::Revoking | NodeState::Pending)
                                && t.parent == Some(local_parent.name)
                        });
                        if !linked
                            && !self.in_flight(id, home, view.name)
                            && !self.batch_resolves(home, id, local_parent.name)
                        {
                            return Err(format!(
                                "k{id}: proxy {:?} ({:?}) below {:?} dangles: k{home} has {:?}",
                                view.name,
                                view.state,
                                local_parent.name,
                                there.map(|t| t.state)
                            ));
                        }
                    }
                    NodeState::Revoked => {}
                }
            }
        }
        Ok(())
    }

    /// Checks what an action's end promises: a finished revoke, delete or crash left every
    /// capability it covered unusable on every kernel; an obtain's child is live.
    fn check_ended(&self, index: usize) -> Result<(), String> {
        let ended = self.ended[index].expect("ended");
        let revoked_everywhere = |root: CapName| -> Result<(), String> {
            for name in self.subtree(root) {
                if let Some(view) = self.node(name) {
                    // A reservation is no capability: its obtain will be refused.
                    if matches!(view.state, NodeState::Live | NodeState::Revoking) {
                        return Err(format!(
                            "#{index} ended ({:?}) but {name:?} below {root:?} is still {:?}",
                            ended.result, view.state
                        ));
                    }
                }
            }
            Ok(())
        };
        match &self.actions[index] {
            Action::Revoke { cap, .. } | Action::Delete { cap, .. } => {
                if matches!(ended.result, Ok(_) | Err(ProtoError::Cap(nk_caps::CapError::Revoked))) {
                    revoked_everywhere(*cap)?;
                }
            }
            Action::Crash { vm, kernel, .. } => {
                if ended.result.is_ok() {
                    // Forgotten where the crash was asked; elsewhere another crash of the
                    // same VM may still be finishing, but nothing it held is usable.
                    if self.kernels[usize::from(*kernel)].table().usage(Principal::Vm(*vm)).is_some() {
                        return Err(format!("#{index}: crashed {vm:?} still registered on k{kernel}"));
                    }
                    for kernel in &self.kernels {
                        let held = kernel.table().nodes().find(|v| {
                            v.cap.is_some_and(|c| c.holder == Principal::Vm(*vm))
                                && matches!(v.state, NodeState::Live | NodeState::Revoking | NodeState::Pending)
                        });
                        if let Some(view) = held {
                            return Err(format!(
                                "#{index}: crashed {vm:?} still holds {:?} ({:?})",
                                view.name, view.state
                            ));
                        }
                    }
                }
            }
            Action::Derive { .. } | Action::Delegate { .. } => {
                // The child existed (it may have died since: a crash of its holder that the
                // answer crossed).
                if let Ok(Outcome::Name(child)) = ended.result {
                    if !self.ghost.contains_key(&child) {
                        return Err(format!("#{index} returned {child:?}, which never existed"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks the end state, once no message is left and every action started: every
    /// action ended, every kernel is idle, nothing is left revoking, reserved or dangling,
    /// no live capability has a dead parent, and the counts add up to the deaths.
    pub(crate) fn check_final(&self) -> Result<(), String> {
        self.check()?;
        if let Some(i) = (0..self.actions.len()).find(|&i| self.ended[i].is_none()) {
            return Err(format!("action #{i} {:?} never ended", self.actions[i]));
        }
        let mut counted = 0;
        for (ended, _) in self.ended.iter().zip(&self.setup).filter(|(_, &setup)| !setup) {
            if let Some(Ended { result: Ok(Outcome::Count(count)), .. }) = ended {
                counted += *count;
            }
        }
        for (id, kernel) in self.kernels.iter().enumerate() {
            if !kernel.is_idle() {
                return Err(format!("k{id} is not idle at the end: {kernel:?}"));
            }
            for view in kernel.table().nodes() {
                if matches!(view.state, NodeState::Revoking | NodeState::RemoteRevoking | NodeState::Pending) {
                    return Err(format!("k{id}: {:?} is left {:?}", view.name, view.state));
                }
                if view.state == NodeState::Live {
                    if let Some(parent) = self.ghost.get(&view.name).copied().flatten() {
                        if !self.live(parent) {
                            return Err(format!("k{id}: {:?} is live but its parent {parent:?} is not", view.name));
                        }
                    }
                }
            }
        }
        Ok(counted).and_then(|counted| {
            if counted == self.scripted_deaths {
                Ok(())
            } else {
                Err(format!("the results count {counted} deaths, the hooks saw {}", self.scripted_deaths))
            }
        })
    }
}

/// A small deterministic generator (SplitMix64) for the random scheduler and scenarios.
#[derive(Clone, Debug)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One level of the exploration's depth-first search.
struct Frame {
    /// The steps enabled at this level.
    choices: Vec<Choice>,
    /// The one taken on the current path.
    current: usize,
    /// Steps not to take here: an equivalent interleaving was explored already.
    sleep: Vec<Choice>,
    /// Steps whose subtrees are explored.
    done: Vec<Choice>,
}

impl Sim {
    /// Returns the kernel a step runs on: two steps on different kernels commute (each
    /// changes only its kernel and appends to that kernel's outgoing channels, while a
    /// delivery takes the head of a channel into another kernel).
    fn kernel_of(&self, choice: Choice) -> u16 {
        match choice {
            Choice::Deliver(_, to) => to,
            Choice::Start(index) => self.actions[index].kernel(),
        }
    }
}

/// Explores every interleaving of the scenario `build` makes, up to the commutation of
/// steps on different kernels (sleep sets, Godefroid 1996: one interleaving per class of
/// equivalent ones, and every reachable state is still visited). Depth-first, replaying the
/// prefix from a fresh build for each path; the checks run after every new step and
/// `verify` on every end state. Returns the number of complete interleavings explored.
pub(crate) fn explore_all(build: impl Fn() -> Sim, verify: impl FnMut(&Sim), limit: usize) -> usize {
    explore(build, verify, limit, true)
}

/// Explores every interleaving of the scenario, without the reduction: every order of
/// every step, for the small scenarios of the interference table.
pub(crate) fn explore_every_order(build: impl Fn() -> Sim, verify: impl FnMut(&Sim), limit: usize) -> usize {
    explore(build, verify, limit, false)
}

fn explore(build: impl Fn() -> Sim, mut verify: impl FnMut(&Sim), limit: usize, reduce: bool) -> usize {
    let mut path: Vec<Frame> = Vec::new();
    let mut runs = 0;
    loop {
        let mut sim = build();
        for (depth, frame) in path.iter().enumerate() {
            sim.apply(frame.choices[frame.current]);
            if depth + 1 == path.len() {
                sim.check_or_panic();
            }
        }
        loop {
            let choices = sim.choices();
            if choices.is_empty() {
                if let Err(error) = sim.check_final() {
                    sim.fail_now(format!("interleaving {runs}: {error}"));
                }
                verify(&sim);
                runs += 1;
                assert!(runs <= limit, "more than {limit} interleavings: shrink the scenario");
                break;
            }
            let sleep: Vec<Choice> = match path.last() {
                Some(parent) if reduce => {
                    let taken = parent.choices[parent.current];
                    let here = sim.kernel_of(taken);
                    parent.sleep.iter().chain(&parent.done).copied().filter(|&c| sim.kernel_of(c) != here).collect()
                }
                _ => Vec::new(),
            };
            let Some(current) = choices.iter().position(|c| !sleep.contains(c)) else {
                // Every step here leads to an interleaving explored already.
                break;
            };
            let choice = choices[current];
            path.push(Frame { choices, current, sleep, done: Vec::new() });
            sim.apply(choice);
            sim.check_or_panic();
        }
        // Backtrack to the deepest level with a step neither done nor asleep.
        loop {
            let Some(frame) = path.last_mut() else {
                return runs;
            };
            let taken = frame.choices[frame.current];
            frame.done.push(taken);
            let next = frame.choices.iter().position(|c| !frame.done.contains(c) && !frame.sleep.contains(c));
            match next {
                Some(next) => {
                    frame.current = next;
                    break;
                }
                None => {
                    path.pop();
                }
            }
        }
    }
}

/// Runs the scenario `build` makes under a random scheduler seeded with `seed`: each
/// channel gets a random weight (some are slow: delays), each step picks a channel or an
/// action by weight. Checks after every step and at the end.
pub(crate) fn run_random(mut sim: Sim, seed: u64) -> Sim {
    let mut rng = Rng(seed);
    let mut weights: BTreeMap<(u16, u16), u64> = BTreeMap::new();
    loop {
        let choices = sim.choices();
        if choices.is_empty() {
            break;
        }
        let weight = |choice: &Choice, rng: &mut Rng, weights: &mut BTreeMap<(u16, u16), u64>| match *choice {
            Choice::Deliver(from, to) => *weights.entry((from, to)).or_insert_with(|| 1 + rng.next() % 16),
            Choice::Start(_) => 4,
        };
        let scored: Vec<u64> = choices.iter().map(|c| weight(c, &mut rng, &mut weights)).collect();
        let total: u64 = scored.iter().sum();
        let mut pick = rng.next() % total;
        let mut chosen = choices[0];
        for (choice, w) in choices.iter().zip(&scored) {
            if pick < *w {
                chosen = *choice;
                break;
            }
            pick -= w;
        }
        sim.apply(chosen);
        if let Err(error) = sim.check() {
            sim.fail_now(format!("seed {seed}: {error}\nreplay with NK_SIM_SEED={seed}"));
        }
    }
    if let Err(error) = sim.check_final() {
        sim.fail_now(format!("seed {seed}: {error}\nreplay with NK_SIM_SEED={seed}"));
    }
    sim
}
