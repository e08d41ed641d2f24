//! The order in which a VM's vCPUs take their slices (a module's `vcpus=<n>`; the
//! hypervisor's guest/vcpus.rs): after vCPU `active`, the runnable vCPU with the next higher
//! index runs in the same round; past the highest, the lowest runs after the CPU's other
//! guests had their turn.

/// Returns the index of the vCPU that runs after `active` among `runnable`, and whether it
/// runs in the same round (it has a higher index); None when no vCPU is runnable.
pub fn next_vcpu(active: u8, runnable: impl Iterator<Item = u8> + Clone) -> Option<(u8, bool)> {
    match runnable.clone().filter(|&i| i > active).min() {
        Some(i) => Some((i, true)),
        None => runnable.min().map(|i| (i, false)),
    }
}

/// Returns the initial stack pointer of vCPU `index` of a VM whose first vCPU starts at
/// `top` with `stack_bytes` for each (nk-abi `vcpu`: each vCPU's stack below the previous
/// one's), or None when that goes below `floor` (the end of the guest's image).
pub fn stack_top(top: u64, index: u8, stack_bytes: u64, floor: u64) -> Option<u64> {
    let below = u64::from(index).checked_mul(stack_bytes)?;
    let bottom = top.checked_sub(below)?.checked_sub(stack_bytes)?;
    (bottom >= floor).then_some(top - below)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_vcpu_goes_up_then_wraps() {
        assert_eq!(next_vcpu(0, [1u8, 2].into_iter()), Some((1, true)));
        assert_eq!(next_vcpu(1, [0u8, 2].into_iter()), Some((2, true)));
        assert_eq!(next_vcpu(2, [0u8, 1].into_iter()), Some((0, false)));
        assert_eq!(next_vcpu(0, [3u8, 1].into_iter()), Some((1, true)));
        assert_eq!(next_vcpu(3, [].into_iter()), None);
        // A halted vCPU is not in `runnable`: the others go on in order.
        assert_eq!(next_vcpu(1, [0u8].into_iter()), Some((0, false)));
    }

    #[test]
    fn stacks_go_down_and_stay_above_the_image() {
        let k64 = 64 * 1024;
        assert_eq!(stack_top(4 << 20, 0, k64, 0x20_0000), Some(4 << 20));
        assert_eq!(stack_top(4 << 20, 3, k64, 0x20_0000), Some((4 << 20) - 3 * k64));
        assert_eq!(stack_top(0x21_0000, 1, k64, 0x20_0000), None);
        assert_eq!(stack_top(0x22_0000, 1, k64, 0x20_0000), Some(0x21_0000));
        assert_eq!(stack_top(k64, 200, u64::MAX, 0), None);
    }
}
