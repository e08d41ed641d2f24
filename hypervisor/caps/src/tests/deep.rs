//! Deep chains and wide trees of 100,000 capabilities revoke without recursion. These run
//! on the test's own thread, whose stack is small (2 MiB by default): a recursive walk of a
//! 100,000-deep chain would overflow it.

use super::*;

const N: u32 = 100_000;

/// Builds a fixture with room for `N` capabilities per principal and a frame root.
fn big() -> (Fixture, CapName) {
    let mut f = Fixture::new(2 * N + 16, 2 * N);
    let root = f.frame_root(1);
    (f, root)
}

/// Derives a chain of `N` capabilities below `top`, alternating holders and bindings, and
/// returns them from the top down.
fn chain(f: &mut Fixture, top: CapName) -> Vec<CapName> {
    let mut names = Vec::with_capacity(N as usize);
    let mut parent = f.give(top, VM1, RWX);
    names.push(parent);
    for i in 1..N {
        let (caller, target) = if i % 2 == 1 { (VM1, VM2) } else { (VM2, VM1) };
        let binding = if i % 3 == 0 { Binding::Bearer } else { Binding::Bound };
        parent = f.table.delegate(vm(caller), parent, vm(target), RWX, binding).expect("chain link");
        names.push(parent);
    }
    names
}

#[test]
fn deep_chain_revokes_iteratively() {
    let (mut f, root) = big();
    let names = chain(&mut f, root);
    let mut hook = Recorder::default();
    assert_eq!(f.table.revoke(am(EXO), root, &mut hook), Ok(N as usize + 1));
    assert_eq!(hook.dead.len(), N as usize + 1);
    // Post-order: the bottom of the chain dies first, the root last.
    assert_eq!(hook.dead.first().map(|d| d.name), names.last().copied());
    assert_eq!(hook.dead.last().map(|d| d.name), Some(root));
    assert!(names.iter().all(|&name| !f.table.peek(name).unwrap().live));
    f.table.audit();
}

#[test]
fn deep_chain_revokes_from_the_middle() {
    let (mut f, root) = big();
    let names = chain(&mut f, root);
    let middle = (N / 2) as usize;
    let holder = f.table.peek(names[middle]).unwrap().holder;
    let revoked = f.table.revoke(holder, names[middle], &mut ignore).unwrap();
    assert_eq!(revoked, N as usize - middle);
    assert!(f.table.peek(names[middle - 1]).unwrap().live);
    assert!(!f.table.peek(names[middle + 1]).unwrap().live);
    f.table.audit();
}

#[test]
fn deep_chain_dies_with_its_deleted_top_and_with_its_vm() {
    let (mut f, root) = big();
    let names = chain(&mut f, root);
    assert_eq!(f.table.delete(vm(VM1), names[0], &mut ignore), Ok(N as usize));
    f.table.audit();

    let names = chain(&mut f, root);
    let revoked = f.table.remove_vm(VM2, &mut ignore).unwrap();
    // names[1] is VM2's, so everything below names[0] dies.
    assert_eq!(revoked, N as usize - 1);
    assert!(f.table.peek(names[0]).unwrap().live);
    f.table.audit();
}

#[test]
fn wide_tree_revokes_iteratively() {
    let (mut f, root) = big();
    let children: Vec<CapName> = (0..N).map(|_| f.give(root, VM1, READ)).collect();
    let mut hook = Recorder::default();
    assert_eq!(f.table.revoke(am(EXO), root, &mut hook), Ok(N as usize + 1));
    assert_eq!(hook.finished, 1);
    assert!(children.iter().all(|&name| !f.table.peek(name).unwrap().live));
    f.table.audit();
}

#[test]
fn wide_tree_children_delete_in_constant_time_each() {
    let (mut f, root) = big();
    let children: Vec<CapName> = (0..N).map(|_| f.give(root, VM1, READ)).collect();
    // Oldest first, then youngest first: both ends of the sibling list unlink in O(1).
    let (older, younger) = children.split_at(N as usize / 2);
    for &name in older.iter().chain(younger.iter().rev()) {
        assert_eq!(f.table.delete(vm(VM1), name, &mut ignore), Ok(1));
    }
    assert_eq!(f.table.len(), 1);
    f.table.audit();
}

#[test]
fn comb_of_chains_and_fans_revokes_iteratively() {
    // Every node of a 50,000-deep spine also has a leaf child: the walk goes down, across
    // and up at every level.
    let (mut f, root) = big();
    let mut spine = f.give(root, VM1, RWX);
    for _ in 0..N / 2 - 1 {
        f.table.derive(vm(VM1), spine, READ).expect("leaf");
        spine = f.table.derive(vm(VM1), spine, RWX).expect("spine");
    }
    assert_eq!(f.table.revoke(am(EXO), root, &mut ignore), Ok(N as usize));
    f.table.audit();
}
