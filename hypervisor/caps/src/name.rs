//! Capability names: sparse, unguessable 128-bit values drawn from a CSPRNG (seed §5.5),
//! carrying the owning kernel's id in fixed bits (DESIGN.md §2).

use core::fmt;

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::ids::KernelId;

/// Names a capability.
///
/// Layout, most significant bit first:
///
/// ```text
///  127        112 111                                                      0
/// +--------------+---------------------------------------------------------+
/// |  kernel id   |          112 bits from the owning kernel's CSPRNG        |
/// +--------------+---------------------------------------------------------+
///     hi word: bits 127..64               lo word: bits 63..0
/// ```
///
/// The kernel id lets any kernel route a request to the owner without a lookup (the role of
/// SemperOS's DDL key). The 112 random bits make a name unguessable: a guest that tries
/// 2^40 names has about a 2^-72 chance of hitting one of 2^32 live names. A name with all
/// random bits zero is never issued, so the all-zero name can stand for "no capability".
///
/// A name travels through a hypercall as two 64-bit registers ([`CapName::from_words`],
/// [`CapName::words`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CapName {
    hi: u64,
    lo: u64,
}

impl CapName {
    /// The number of high bits that hold the owning kernel's id.
    pub const KERNEL_BITS: u32 = 16;
    /// The number of bits drawn from the CSPRNG.
    pub const RANDOM_BITS: u32 = 128 - Self::KERNEL_BITS;
    const KERNEL_SHIFT: u32 = 64 - Self::KERNEL_BITS;
    const HI_RANDOM_MASK: u64 = (1 << Self::KERNEL_SHIFT) - 1;

    /// Rebuilds a name from its two 64-bit words (as a hypercall passes it).
    pub const fn from_words(hi: u64, lo: u64) -> Self {
        Self { hi, lo }
    }

    /// Returns the name's high and low 64-bit words.
    pub const fn words(self) -> (u64, u64) {
        (self.hi, self.lo)
    }

    /// Rebuilds a name from its 128-bit value.
    pub const fn from_u128(value: u128) -> Self {
        Self { hi: (value >> 64) as u64, lo: value as u64 }
    }

    /// Returns the name's 128-bit value.
    pub const fn to_u128(self) -> u128 {
        ((self.hi as u128) << 64) | self.lo as u128
    }

    /// Returns the id of the kernel that owns the capability, read from the name's top bits.
    pub const fn kernel(self) -> KernelId {
        KernelId::new((self.hi >> Self::KERNEL_SHIFT) as u16)
    }

    /// Builds the name owned by `kernel` whose random bits are `random_hi` (low 48 bits
    /// used) and `random_lo`.
    const fn compose(kernel: KernelId, random_hi: u64, random_lo: u64) -> Self {
        Self { hi: ((kernel.raw() as u64) << Self::KERNEL_SHIFT) | (random_hi & Self::HI_RANDOM_MASK), lo: random_lo }
    }

    /// Tells whether all random bits are zero (such a name is never issued).
    const fn is_null(self) -> bool {
        self.hi & Self::HI_RANDOM_MASK == 0 && self.lo == 0
    }
}

impl fmt::Debug for CapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CapName({:016x}_{:016x})", self.hi, self.lo)
    }
}

impl fmt::Display for CapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.hi, self.lo)
    }
}

/// Supplies the 256-bit seed of a kernel's name generator.
///
/// The hypervisor implements it with RDSEED (falling back to RDRAND); host tests and
/// benchmarks use [`FixedSeed`].
pub trait EntropySource {
    /// Fills `seed` with full-entropy bytes, or reports that none could be had.
    fn fill_seed(&mut self, seed: &mut [u8; 32]) -> Result<(), EntropyUnavailable>;
}

/// Reports that an [`EntropySource`] could not produce a seed (e.g. RDSEED kept failing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntropyUnavailable;

/// Supplies a fixed seed, for reproducible tests and benchmarks only: names it leads to are
/// predictable, so it must never seed a production kernel.
#[derive(Clone, Copy, Debug)]
pub struct FixedSeed(pub [u8; 32]);

impl FixedSeed {
    /// Builds a fixed seed from a 64-bit test number.
    pub const fn from_u64(value: u64) -> Self {
        let bytes = value.to_le_bytes();
        let mut seed = [0u8; 32];
        let mut i = 0;
        while i < bytes.len() {
            seed[i] = bytes[i];
            i += 1;
        }
        Self(seed)
    }
}

impl EntropySource for FixedSeed {
    fn fill_seed(&mut self, seed: &mut [u8; 32]) -> Result<(), EntropyUnavailable> {
        *seed = self.0;
        Ok(())
    }
}

/// How many names a [`NameSource`] draws ahead.
const DRAWN_AHEAD: usize = 16;

/// Draws fresh names for one kernel and hashes names for its index.
pub(crate) struct NameSource {
    kernel: KernelId,
    rng: ChaCha20Rng,
    /// The secret key of [`NameSource::hash`], drawn from the CSPRNG so that a guest cannot
    /// aim the names it presents at chosen buckets of the index.
    key: [u64; 2],
    /// Names of this kernel drawn ahead, with their hashes: `drawn[..ready]` are not handed
    /// out yet. A batch is drawn in one go (out of line), so handing one out is a load,
    /// not two generator steps, a compose and a hash (issue 14). They are CSPRNG output as
    /// before and as secret as the generator's state beside them.
    drawn: [(CapName, u64); DRAWN_AHEAD],
    ready: usize,
}

impl NameSource {
    /// Seeds a name source for `kernel` from `entropy`.
    pub(crate) fn new(
        kernel: KernelId,
        entropy: &mut (impl EntropySource + ?Sized),
    ) -> Result<Self, EntropyUnavailable> {
        let mut seed = [0u8; 32];
        entropy.fill_seed(&mut seed)?;
        let mut rng = ChaCha20Rng::from_seed(seed);
        let key = [rng.next_u64(), rng.next_u64()];
        Ok(Self { kernel, rng, key, drawn: [(CapName::from_words(0, 0), 0); DRAWN_AHEAD], ready: 0 })
    }

    /// Draws a batch of names ahead if none is left (`fresh` calls it when it runs out).
    #[inline]
    fn draw_ahead(&mut self) {
        if self.ready == 0 {
            self.refill();
        }
    }

    #[cold]
    #[inline(never)]
    fn refill(&mut self) {
        for index in 0..DRAWN_AHEAD {
            let name = loop {
                let name = CapName::compose(self.kernel, self.rng.next_u64(), self.rng.next_u64());
                if !name.is_null() {
                    break name;
                }
            };
            self.drawn[index] = (name, self.hash(name));
        }
        self.ready = DRAWN_AHEAD;
    }

    /// Returns the kernel whose names this source draws.
    pub(crate) fn kernel(&self) -> KernelId {
        self.kernel
    }

    /// Draws a fresh name owned by this kernel, skipping any that `is_taken` reports. The
    /// loop runs more than once only with probability about 2^-80 for any table that fits
    /// in memory.
    /// Returns the name with its [`hash`](Self::hash), which `is_taken` also receives.
    #[inline]
    pub(crate) fn fresh(&mut self, mut is_taken: impl FnMut(CapName, u64) -> bool) -> (CapName, u64) {
        loop {
            self.draw_ahead();
            self.ready -= 1;
            // Below DRAWN_AHEAD: `ready` was at least 1.
            let (name, hash) = self.drawn[self.ready % DRAWN_AHEAD];
            // A name drawn ahead may have been taken since (a delegated child another
            // kernel named with this kernel's id): checked when it is handed out.
            if !is_taken(name, hash) {
                return (name, hash);
            }
        }
    }

    /// Draws a fresh name carrying `kernel`'s id instead of this kernel's, for a child that
    /// this kernel delegates to `kernel` (nk-protocol's delegation handshake names the child
    /// before it exists, so both sides can refer to it from the first message). The 112
    /// random bits come from this kernel's CSPRNG, so the name is as unguessable as one
    /// `kernel` would draw; `is_taken` filters names already in this kernel's index (as
    /// proxies), and the receiving kernel refuses one it already uses.
    pub(crate) fn fresh_for(
        &mut self,
        kernel: KernelId,
        mut is_taken: impl FnMut(CapName, u64) -> bool,
    ) -> (CapName, u64) {
        loop {
            let name = CapName::compose(kernel, self.rng.next_u64(), self.rng.next_u64());
            let hash = self.hash(name);
            if !name.is_null() && !is_taken(name, hash) {
                return (name, hash);
            }
        }
    }

    /// Hashes `name` for the index: one keyed folded multiply (the name is random already;
    /// the key only stops a guest from choosing where its lookups probe).
    #[inline]
    pub(crate) fn hash(&self, name: CapName) -> u64 {
        folded_multiply(name.lo ^ self.key[0], name.hi ^ self.key[1])
    }
}

impl fmt::Debug for NameSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The generator state and hash key are secrets: never print them.
        f.debug_struct("NameSource").field("kernel", &self.kernel).finish_non_exhaustive()
    }
}

/// Multiplies two words into 128 bits and folds the halves together.
#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_puts_kernel_in_top_bits() {
        let mut source = NameSource::new(KernelId::new(0xbeef), &mut FixedSeed::from_u64(1)).expect("fixed seed");
        for _ in 0..1000 {
            let (name, hash) = source.fresh(|_, _| false);
            assert_eq!(hash, source.hash(name));
            assert_eq!(name.kernel(), KernelId::new(0xbeef));
            assert_eq!(name.to_u128() >> 112, 0xbeef);
            assert!(!name.is_null());
            assert_eq!(CapName::from_u128(name.to_u128()), name);
            let (hi, lo) = name.words();
            assert_eq!(CapName::from_words(hi, lo), name);
        }
    }

    #[test]
    fn fresh_skips_taken_names() {
        let mut source = NameSource::new(KernelId::new(1), &mut FixedSeed::from_u64(2)).expect("fixed seed");
        let mut first = None;
        let (name, _) = source.fresh(|candidate, _| {
            // Refuse the first candidate: the source must draw another.
            if first.is_none() {
                first = Some(candidate);
                true
            } else {
                false
            }
        });
        assert_ne!(Some(name), first);
    }

    #[test]
    fn names_drawn_ahead_are_distinct_and_hashed() {
        let mut source = NameSource::new(KernelId::new(3), &mut FixedSeed::from_u64(3)).expect("fixed seed");
        let mut seen = std::collections::HashSet::new();
        // Several batches, so refills in the middle of a run are covered.
        for _ in 0..(DRAWN_AHEAD * 5 + 3) {
            let (name, hash) = source.fresh(|_, _| false);
            assert_eq!(hash, source.hash(name));
            assert!(!name.is_null());
            assert!(seen.insert(name), "a name was handed out twice");
        }
    }

    #[test]
    fn failing_entropy_is_reported() {
        struct Broken;
        impl EntropySource for Broken {
            fn fill_seed(&mut self, _: &mut [u8; 32]) -> Result<(), EntropyUnavailable> {
                Err(EntropyUnavailable)
            }
        }
        assert!(NameSource::new(KernelId::new(0), &mut Broken).is_err());
    }
}
