//! A RAM-backed [`Media`] for tests that can cut power right after its k-th write, as a
//! crash would: every write made durable by a `fence` survives; of the writes since the
//! last fence, each 256-byte unit survives or not (chosen by a seeded generator, or all
//! or none), and the survivors land in any order. The unit itself is never torn: that is
//! what `Media` promises (`MEDIA_UNIT`). Not durable: it is for host tests.

use alloc::vec;
use alloc::vec::Vec;

use nk_am::{Media, MediaError, MEDIA_UNIT};

/// Which unfenced units survive a power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutPolicy {
    /// Each unit survives with probability 1/2, in a random order (seeded).
    Random(u64),
    /// None survives.
    DropAll,
    /// All survive, in write order.
    KeepAll,
}

/// RAM media that can lose power after a chosen write.
#[derive(Debug, Clone)]
pub struct CrashMedia {
    /// What survives a power cut.
    durable: Vec<u8>,
    /// What reads see (durable plus unfenced writes).
    current: Vec<u8>,
    /// Unfenced writes, unit by unit: (offset, data).
    pending: Vec<(u64, [u8; MEDIA_UNIT as usize])>,
    writes: u64,
    fences: u64,
    bytes_written: u64,
    crash_after: Option<u64>,
    policy: CutPolicy,
    dead: bool,
}

impl CrashMedia {
    /// Makes zeroed media of `size` bytes (a multiple of `MEDIA_UNIT`).
    pub fn new(size: u64) -> Self {
        Self::from_image(vec![0; size as usize])
    }

    /// Makes media whose durable contents are `image` (e.g. what survived a crash).
    pub fn from_image(image: Vec<u8>) -> Self {
        Self {
            current: image.clone(),
            durable: image,
            pending: Vec::new(),
            writes: 0,
            fences: 0,
            bytes_written: 0,
            crash_after: None,
            policy: CutPolicy::DropAll,
            dead: false,
        }
    }

    /// Cuts power right after the `k`-th write from now (1-based) under `policy`.
    pub fn crash_after(&mut self, k: u64, policy: CutPolicy) {
        self.crash_after = Some(self.writes + k);
        self.policy = policy;
    }

    /// Tells whether power was cut.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Returns the writes, fences and bytes written so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.writes, self.fences, self.bytes_written)
    }

    /// Returns what is durable (after a power cut: what survived it).
    pub fn durable_image(&self) -> Vec<u8> {
        self.durable.clone()
    }

    /// Flips bits `mask` of durable byte `offset` (a corruption on the device).
    pub fn corrupt(&mut self, offset: u64, mask: u8) {
        self.durable[offset as usize] ^= mask;
        self.current[offset as usize] ^= mask;
    }

    /// Returns durable byte range `[offset, offset + len)`.
    pub fn durable_bytes(&self, offset: u64, len: usize) -> &[u8] {
        &self.durable[offset as usize..offset as usize + len]
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), MediaError> {
        if self.dead {
            return Err(MediaError::Device);
        }
        MediaError::check_range(offset, len, self.durable.len() as u64)
    }

    fn cut_power(&mut self) {
        let mut units = core::mem::take(&mut self.pending);
        match self.policy {
            CutPolicy::DropAll => units.clear(),
            CutPolicy::KeepAll => {}
            CutPolicy::Random(seed) => {
                let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
                let mut next = move || {
                    // xorshift64*: a small generator; the policy only needs variety.
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
                };
                for i in (1..units.len()).rev() {
                    let j = (next() % (i as u64 + 1)) as usize;
                    units.swap(i, j);
                }
                units.retain(|_| next() & 1 == 1);
            }
        }
        for (offset, data) in units {
            self.durable[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        self.current = self.durable.clone();
        self.dead = true;
    }
}

impl Media for CrashMedia {
    fn describe(&self) -> &str {
        "test RAM media (not durable; power cut after a chosen write)"
    }

    fn size(&self) -> u64 {
        self.durable.len() as u64
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        self.check(offset, buf.len())?;
        buf.copy_from_slice(&self.current[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        self.check(offset, data.len())?;
        self.current[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for (i, chunk) in data.chunks_exact(MEDIA_UNIT as usize).enumerate() {
            let mut unit = [0; MEDIA_UNIT as usize];
            unit.copy_from_slice(chunk);
            self.pending.push((offset + i as u64 * MEDIA_UNIT, unit));
        }
        self.writes += 1;
        self.bytes_written += data.len() as u64;
        if self.crash_after == Some(self.writes) {
            self.cut_power();
        }
        Ok(())
    }

    fn fence(&mut self) -> Result<(), MediaError> {
        if self.dead {
            return Err(MediaError::Device);
        }
        for (offset, data) in self.pending.drain(..) {
            self.durable[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        self.fences += 1;
        Ok(())
    }
}
