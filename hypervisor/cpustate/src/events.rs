//! Events a VM exit interrupted or reports: the IDT-vectoring information field, the
//! VM-exit interruption information (both laid out as in SDM Vol. 3 Table 25-18/25-19,
//! "Format of the VM-Exit Interruption-Information Field") and what the next VM entry must
//! inject so that no event of the guest is lost (SDM Vol. 3 §28.2.4 "Information for VM
//! Exits During Event Delivery", §29.2.1.3 re-injection of such events).

/// Bit 31: the field holds an event.
pub const VALID: u32 = 1 << 31;
/// Bit 11: an error code was (is to be) pushed.
pub const ERROR_CODE: u32 = 1 << 11;
const TYPE_SHIFT: u32 = 8;
const TYPE_MASK: u32 = 0b111 << TYPE_SHIFT;

/// Interruption types (bits 10:8).
pub mod kind {
    pub const EXTERNAL_INTERRUPT: u32 = 0;
    pub const NMI: u32 = 2;
    pub const HARDWARE_EXCEPTION: u32 = 3;
    pub const SOFTWARE_INTERRUPT: u32 = 4;
    pub const PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    pub const SOFTWARE_EXCEPTION: u32 = 6;
}

/// Returns the interruption type of an information field.
pub fn kind_of(info: u32) -> u32 {
    (info & TYPE_MASK) >> TYPE_SHIFT
}

/// Tells whether the VM-exit interruption information of an exit with basic reason 0
/// ("exception or NMI") reports an NMI, i.e. the exit was caused by an NMI that arrived
/// while the guest ran (NMI exiting, SDM Vol. 3 §26.2).
pub fn is_nmi(exit_interruption_info: u32) -> bool {
    exit_interruption_info & VALID != 0 && kind_of(exit_interruption_info) == kind::NMI
}

/// What the next VM entry injects to finish an event whose delivery a VM exit cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reinjection {
    /// The VM-entry interruption-information field (reserved bits 30:12 clear).
    pub info: u32,
    /// The VM-entry exception error code, when the event pushes one.
    pub error_code: Option<u32>,
    /// The VM-entry instruction length, for software interrupts and exceptions (INT n,
    /// INT3, INTO, INT1), which VM entry needs to push the right return address.
    pub instruction_length: Option<u32>,
}

/// Turns the IDT-vectoring information of a VM exit (with its error code and the exit's
/// instruction length) into the injection that completes the event at the next entry, or
/// None when no event was being delivered.
pub fn reinjection(vectoring_info: u32, error_code: u32, instruction_length: u32) -> Option<Reinjection> {
    if vectoring_info & VALID == 0 {
        return None;
    }
    // Bits 30:12 of the entry field are reserved (bit 12 of the vectoring field is
    // undefined), so only the vector, type, error-code bit and valid bit carry over.
    let info = vectoring_info & (VALID | ERROR_CODE | TYPE_MASK | 0xFF);
    let software = matches!(
        kind_of(info),
        kind::SOFTWARE_INTERRUPT | kind::PRIVILEGED_SOFTWARE_EXCEPTION | kind::SOFTWARE_EXCEPTION
    );
    Some(Reinjection {
        info,
        error_code: (info & ERROR_CODE != 0).then_some(error_code),
        instruction_length: software.then_some(instruction_length),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(vector: u32, kind: u32, error: bool) -> u32 {
        VALID | kind << TYPE_SHIFT | vector | if error { ERROR_CODE } else { 0 }
    }

    #[test]
    fn nothing_to_reinject_without_the_valid_bit() {
        assert_eq!(reinjection(0, 5, 3), None);
        assert_eq!(reinjection(field(14, kind::HARDWARE_EXCEPTION, true) & !VALID, 5, 3), None);
    }

    #[test]
    fn a_page_fault_keeps_its_error_code() {
        let r = reinjection(field(14, kind::HARDWARE_EXCEPTION, true), 0x6, 0).expect("valid");
        assert_eq!(
            r,
            Reinjection {
                info: field(14, kind::HARDWARE_EXCEPTION, true),
                error_code: Some(6),
                instruction_length: None
            }
        );
    }

    #[test]
    fn software_interrupts_carry_their_instruction_length() {
        let r = reinjection(field(0x80, kind::SOFTWARE_INTERRUPT, false), 0, 2).expect("valid");
        assert_eq!(r.instruction_length, Some(2));
        assert_eq!(r.error_code, None);
        let int3 = reinjection(field(3, kind::SOFTWARE_EXCEPTION, false), 0, 1).expect("valid");
        assert_eq!(int3.instruction_length, Some(1));
        let int1 = reinjection(field(1, kind::PRIVILEGED_SOFTWARE_EXCEPTION, false), 0, 1).expect("valid");
        assert_eq!(int1.instruction_length, Some(1));
    }

    #[test]
    fn external_interrupts_and_nmis_need_no_length() {
        let r = reinjection(field(0x30, kind::EXTERNAL_INTERRUPT, false), 0, 7).expect("valid");
        assert_eq!(r.instruction_length, None);
        let nmi = reinjection(field(2, kind::NMI, false), 0, 7).expect("valid");
        assert_eq!(nmi.info, field(2, kind::NMI, false));
    }

    #[test]
    fn the_undefined_and_reserved_bits_are_dropped() {
        let noisy = field(13, kind::HARDWARE_EXCEPTION, true) | 1 << 12 | 1 << 20;
        let r = reinjection(noisy, 0, 0).expect("valid");
        assert_eq!(r.info, field(13, kind::HARDWARE_EXCEPTION, true));
    }

    #[test]
    fn nmi_exits_are_recognised() {
        assert!(is_nmi(field(2, kind::NMI, false)));
        assert!(!is_nmi(field(2, kind::NMI, false) & !VALID));
        assert!(!is_nmi(field(13, kind::HARDWARE_EXCEPTION, true)));
    }
}
