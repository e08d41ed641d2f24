//! XCR0 (the XSAVE feature-enabled mask) and the rules XSETBV enforces on it (SDM Vol. 1
//! §13.3 "Enabling the XSAVE feature set and XSAVE-enabled features", and the XSETBV
//! instruction's #GP conditions in Vol. 2).

/// x87 state (bit 0): always enabled.
pub const X87: u64 = 1 << 0;
/// SSE state (XMM registers, MXCSR).
pub const SSE: u64 = 1 << 1;
/// AVX state (upper halves of YMM).
pub const AVX: u64 = 1 << 2;
/// MPX BNDREGS and BNDCSR: enabled together or not at all.
pub const MPX: u64 = 0b11 << 3;
/// AVX-512 opmask, ZMM_Hi256 and Hi16_ZMM: enabled together or not at all, and only with
/// SSE and AVX.
pub const AVX512: u64 = 0b111 << 5;
/// PKRU state.
pub const PKRU: u64 = 1 << 9;
/// AMX TILECFG and TILEDATA: enabled together or not at all.
pub const AMX: u64 = 0b11 << 17;

/// Why XSETBV would refuse a value for XCR0 (each is a #GP(0) on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xcr0Error {
    /// Bit 0 (x87) is clear.
    X87Clear,
    /// A bit the CPU (or the hypervisor's offer) does not support, or a reserved bit.
    Unsupported { bits: u64 },
    /// AVX (bit 2) without SSE (bit 1).
    AvxWithoutSse,
    /// BNDREGS and BNDCSR (bits 3 and 4) differ.
    MpxPair,
    /// Some but not all of bits 7:5, or bits 7:5 without SSE and AVX.
    Avx512,
    /// TILECFG and TILEDATA (bits 17 and 18) differ.
    AmxPair,
}

/// Checks `value` for XCR0 against every rule of SDM Vol. 1 §13.3, where `supported` is the
/// set of bits the guest may enable (CPUID.(EAX=0DH,ECX=0):EDX:EAX, or less).
pub fn check(value: u64, supported: u64) -> Result<(), Xcr0Error> {
    if value & X87 == 0 {
        return Err(Xcr0Error::X87Clear);
    }
    let unsupported = value & !supported;
    if unsupported != 0 {
        return Err(Xcr0Error::Unsupported { bits: unsupported });
    }
    if value & AVX != 0 && value & SSE == 0 {
        return Err(Xcr0Error::AvxWithoutSse);
    }
    let mpx = value & MPX;
    if mpx != 0 && mpx != MPX {
        return Err(Xcr0Error::MpxPair);
    }
    let avx512 = value & AVX512;
    if avx512 != 0 && (avx512 != AVX512 || value & (SSE | AVX) != SSE | AVX) {
        return Err(Xcr0Error::Avx512);
    }
    let amx = value & AMX;
    if amx != 0 && amx != AMX {
        return Err(Xcr0Error::AmxPair);
    }
    Ok(())
}

/// Returns the XCR0 the hypervisor loads while it saves and restores guests' extended
/// state: every supported component, less any group the CPU reports only in part (so the
/// value itself passes `check`).
pub fn switch_mask(supported: u64) -> u64 {
    let mut mask = supported | X87;
    if mask & SSE == 0 {
        mask &= !AVX;
    }
    for group in [MPX, AMX] {
        if mask & group != group {
            mask &= !group;
        }
    }
    if mask & AVX512 != AVX512 || mask & (SSE | AVX) != SSE | AVX {
        mask &= !AVX512;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything a current CPU may report: x87, SSE, AVX, MPX, AVX-512, PKRU, AMX.
    const ALL: u64 = X87 | SSE | AVX | MPX | AVX512 | PKRU | AMX;

    #[test]
    fn accepts_the_usual_values() {
        for value in [X87, X87 | SSE, X87 | SSE | AVX, X87 | SSE | AVX | AVX512, X87 | MPX, X87 | AMX, X87 | PKRU, ALL]
        {
            assert_eq!(check(value, ALL), Ok(()), "{value:#x}");
        }
    }

    #[test]
    fn x87_must_stay_on() {
        assert_eq!(check(0, ALL), Err(Xcr0Error::X87Clear));
        assert_eq!(check(SSE, ALL), Err(Xcr0Error::X87Clear));
    }

    #[test]
    fn unsupported_and_reserved_bits_are_refused() {
        assert_eq!(check(X87 | SSE | AVX, X87 | SSE), Err(Xcr0Error::Unsupported { bits: AVX }));
        assert_eq!(check(X87 | 1 << 63, ALL), Err(Xcr0Error::Unsupported { bits: 1 << 63 }));
        // A supervisor-state bit (PT, bit 8) is never an XCR0 bit.
        assert_eq!(check(X87 | 1 << 8, ALL), Err(Xcr0Error::Unsupported { bits: 1 << 8 }));
    }

    #[test]
    fn avx_needs_sse() {
        assert_eq!(check(X87 | AVX, ALL), Err(Xcr0Error::AvxWithoutSse));
    }

    #[test]
    fn mpx_bits_pair() {
        assert_eq!(check(X87 | 1 << 3, ALL), Err(Xcr0Error::MpxPair));
        assert_eq!(check(X87 | 1 << 4, ALL), Err(Xcr0Error::MpxPair));
        // 0x9 is the value the issue names: BNDREGS alone.
        assert_eq!(check(0x9, ALL), Err(Xcr0Error::MpxPair));
    }

    #[test]
    fn avx512_bits_go_together_and_need_avx() {
        assert_eq!(check(X87 | SSE | AVX | 1 << 5, ALL), Err(Xcr0Error::Avx512));
        assert_eq!(check(X87 | SSE | AVX | 0b011 << 5, ALL), Err(Xcr0Error::Avx512));
        assert_eq!(check(X87 | SSE | AVX512, ALL), Err(Xcr0Error::Avx512));
        assert_eq!(check(X87 | AVX512, ALL), Err(Xcr0Error::Avx512));
    }

    #[test]
    fn amx_bits_pair() {
        assert_eq!(check(X87 | 1 << 17, ALL), Err(Xcr0Error::AmxPair));
        assert_eq!(check(X87 | 1 << 18, ALL), Err(Xcr0Error::AmxPair));
    }

    #[test]
    fn every_value_of_the_low_bits_agrees_with_a_reference() {
        // A second statement of the rules, bit by bit, over every combination of the
        // low 19 bits.
        let reference = |v: u64| {
            let bit = |n: u32| v >> n & 1;
            v & !ALL == 0
                && bit(0) == 1
                && !(bit(2) == 1 && bit(1) == 0)
                && bit(3) == bit(4)
                && bit(5) == bit(6)
                && bit(6) == bit(7)
                && (bit(5) == 0 || (bit(1) == 1 && bit(2) == 1))
                && bit(17) == bit(18)
        };
        for value in 0..1u64 << 19 {
            assert_eq!(check(value, ALL).is_ok(), reference(value), "{value:#x}");
        }
    }

    #[test]
    fn the_switch_mask_is_itself_valid() {
        for supported in
            [ALL, X87 | SSE | AVX, X87 | SSE, X87 | 1 << 3, X87 | AVX | AVX512, X87 | SSE | AVX | 1 << 5, X87 | 1 << 17]
        {
            let mask = switch_mask(supported);
            assert_eq!(check(mask, supported | X87), Ok(()), "supported {supported:#x} -> {mask:#x}");
            assert_eq!(mask & !(supported | X87), 0);
        }
        assert_eq!(switch_mask(ALL), ALL);
    }
}
