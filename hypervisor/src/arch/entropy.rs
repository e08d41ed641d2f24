//! Seeds for the capability-name CSPRNG from the CPU's hardware random number generators:
//! RDSEED (full entropy) where present, else RDRAND (SDM Vol. 1 §7.3.17). Without either,
//! no seed is produced: predictable capability names would break unforgeability (seed
//! §5.5), so the hypervisor refuses rather than guess.

use core::arch::x86_64::{_rdrand64_step, _rdseed64_step};

use nk_caps::{EntropySource, EntropyUnavailable};
use x86::cpuid::CpuId;

/// The CPU's hardware entropy.
#[derive(Debug, Default)]
pub struct HardwareEntropy;

const RETRIES: usize = 64;

#[target_feature(enable = "rdseed")]
fn rdseed() -> Option<u64> {
    let mut value = 0;
    // RDSEED may fail transiently (CF=0) when the entropy source is drained: retry.
    (0..RETRIES).find_map(|_| (_rdseed64_step(&mut value) == 1).then_some(value))
}

#[target_feature(enable = "rdrand")]
fn rdrand() -> Option<u64> {
    let mut value = 0;
    (0..RETRIES).find_map(|_| (_rdrand64_step(&mut value) == 1).then_some(value))
}

impl EntropySource for HardwareEntropy {
    fn fill_seed(&mut self, seed: &mut [u8; 32]) -> Result<(), EntropyUnavailable> {
        let cpuid = CpuId::new();
        let has_rdseed = cpuid.get_extended_feature_info().is_some_and(|f| f.has_rdseed());
        let has_rdrand = cpuid.get_feature_info().is_some_and(|f| f.has_rdrand());
        for chunk in seed.chunks_exact_mut(8) {
            let word = if has_rdseed {
                // SAFETY: CPUID reported RDSEED.
                unsafe { rdseed() }
            } else if has_rdrand {
                // SAFETY: CPUID reported RDRAND.
                unsafe { rdrand() }
            } else {
                None
            };
            chunk.copy_from_slice(&word.ok_or(EntropyUnavailable)?.to_le_bytes());
        }
        Ok(())
    }
}
