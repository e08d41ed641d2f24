//! The pool of virtual-processor identifiers (VPIDs, SDM Vol. 3 §29.1): the tag the CPU
//! puts on the linear and combined translations it caches for a vCPU. VPID 0 belongs to
//! VMX root operation and is never handed out; no two live vCPUs get the same VPID. The
//! pool gives out the lowest free VPID and remembers which ones were handed out before,
//! so the caller knows when an allocation recycles a tag whose translations it must have
//! invalidated (INVVPID) before the new vCPU runs.

/// VPIDs are 16-bit; 0 is the host's.
const WORDS: usize = (u16::MAX as usize + 1) / 64;

/// A VPID handed out by [`VpidPool::allocate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocated {
    /// The VPID (never 0).
    pub vpid: u16,
    /// A vCPU had this VPID before: its translations may still be cached somewhere.
    pub recycled: bool,
}

/// Every VPID, free or held, and which were ever handed out.
#[derive(Clone, Debug)]
pub struct VpidPool {
    held: [u64; WORDS],
    used_before: [u64; WORDS],
    live: u32,
}

impl Default for VpidPool {
    fn default() -> Self {
        Self::new()
    }
}

impl VpidPool {
    /// Makes a pool with every VPID but 0 free.
    pub const fn new() -> Self {
        let mut held = [0; WORDS];
        held[0] = 1;
        Self { held, used_before: [0; WORDS], live: 0 }
    }

    /// Hands out the lowest free VPID, or None when all 65,535 are held.
    pub fn allocate(&mut self) -> Option<Allocated> {
        let word = self.held.iter().position(|&w| w != u64::MAX)?;
        let bit = self.held[word].trailing_ones() as usize;
        let vpid = u16::try_from(word * 64 + bit).ok()?;
        self.held[word] |= 1 << bit;
        let recycled = self.used_before[word] & (1 << bit) != 0;
        self.used_before[word] |= 1 << bit;
        self.live += 1;
        Some(Allocated { vpid, recycled })
    }

    /// Gives `vpid` back; false (and nothing changes) if it was not held or is 0.
    pub fn release(&mut self, vpid: u16) -> bool {
        let (word, bit) = (usize::from(vpid) / 64, vpid % 64);
        if vpid == 0 || self.held[word] & (1 << bit) == 0 {
            return false;
        }
        self.held[word] &= !(1 << bit);
        self.live -= 1;
        true
    }

    /// Returns how many VPIDs are held.
    pub fn live(&self) -> u32 {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_zero_or_a_held_vpid() {
        let mut pool = VpidPool::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..u16::MAX {
            let a = pool.allocate().expect("65,535 VPIDs");
            assert_ne!(a.vpid, 0);
            assert!(!a.recycled);
            assert!(seen.insert(a.vpid), "VPID {} handed out twice", a.vpid);
        }
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.live(), u32::from(u16::MAX));
        assert!(pool.release(700));
        assert_eq!(pool.allocate(), Some(Allocated { vpid: 700, recycled: true }));
    }

    #[test]
    fn recycles_the_lowest_free_vpid_and_says_so() {
        let mut pool = VpidPool::new();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_eq!((a.vpid, b.vpid), (1, 2));
        assert!(pool.release(1));
        assert_eq!(pool.live(), 1);
        assert_eq!(pool.allocate(), Some(Allocated { vpid: 1, recycled: true }));
        assert_eq!(pool.allocate(), Some(Allocated { vpid: 3, recycled: false }));
    }

    #[test]
    fn refuses_to_release_zero_or_a_free_vpid() {
        let mut pool = VpidPool::new();
        assert!(!pool.release(0));
        assert!(!pool.release(5));
        let a = pool.allocate().unwrap();
        assert!(pool.release(a.vpid));
        assert!(!pool.release(a.vpid), "double release");
        assert_eq!(pool.live(), 0);
    }
}
