//! The ACPI fixed-hardware PM1a event and control blocks (ACPI 6.5 §4.8.3) at the ports the
//! FADT names ([`PM1_EVT`], [`PM1_CNT`]): status/enable registers that keep their bits
//! (no event ever fires) and the control register whose SLP_EN write with SLP_TYP = S5 (the
//! value the DSDT's `\_S5` package gives) powers the VM off. SCI_EN reads as set: the
//! machine is always in ACPI mode (the FADT has no SMI command port).

/// PM1a event block: status (2 bytes) then enable (2 bytes).
pub const PM1_EVT: u16 = 0x600;
/// PM1a control block (2 bytes).
pub const PM1_CNT: u16 = 0x604;
/// SLP_TYP for S5 as the DSDT's `\_S5` declares it.
pub const SLP_TYP_S5: u16 = 5;

const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;

/// The PM1a registers.
#[derive(Clone, Debug, Default)]
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
}

/// What a write asks of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmAction {
    None,
    PowerOff,
}

impl AcpiPm {
    /// Returns whether `port` belongs to the blocks.
    pub fn claims(port: u16) -> bool {
        (PM1_EVT..PM1_CNT + 2).contains(&port)
    }

    fn reg16(&self, port: u16) -> u16 {
        match port & !1 {
            PM1_EVT => self.status,
            p if p == PM1_EVT + 2 => self.enable,
            _ => self.control | SCI_EN,
        }
    }

    /// Reads `size` bytes (1, 2 or 4) at `port`.
    pub fn read(&self, port: u16, size: u8) -> u32 {
        let lo = u32::from(self.reg16(port));
        let value = if port & 1 != 0 { lo >> 8 } else { lo };
        match size {
            1 => value & 0xFF,
            2 => value & 0xFFFF,
            _ => value | if port == PM1_EVT { u32::from(self.enable) << 16 } else { 0 },
        }
    }

    /// Writes `size` bytes at `port`.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> PmAction {
        let mut writes = [(port, value as u16), (port + 2, (value >> 16) as u16)];
        let count = if size == 4 { 2 } else { 1 };
        if size == 1 {
            // A byte write merges into its register.
            let old = self.reg16(port & !1);
            writes[0] = if port & 1 != 0 {
                (port & !1, (old & 0xFF) | ((value as u16 & 0xFF) << 8))
            } else {
                (port, (old & 0xFF00) | (value as u16 & 0xFF))
            };
        }
        for &(p, v) in &writes[..count] {
            match p & !1 {
                PM1_EVT => self.status &= !v, // write-1-to-clear
                x if x == PM1_EVT + 2 => self.enable = v,
                PM1_CNT => {
                    self.control = v & !SLP_EN;
                    if v & SLP_EN != 0 && (v >> 10) & 7 == SLP_TYP_S5 {
                        return PmAction::PowerOff;
                    }
                }
                _ => {}
            }
        }
        PmAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_s5_power_off() {
        let mut pm = AcpiPm::default();
        assert_eq!(pm.read(PM1_CNT, 2) & 1, 1, "ACPI mode");
        // acpi_hw_legacy_sleep: write SLP_TYP first, then SLP_TYP|SLP_EN.
        assert_eq!(pm.write(PM1_CNT, 2, (SLP_TYP_S5 << 10) as u32 | 1), PmAction::None);
        assert_eq!(pm.write(PM1_CNT, 2, ((SLP_TYP_S5 << 10) | SLP_EN) as u32), PmAction::PowerOff);
    }

    #[test]
    fn other_sleep_states_do_nothing() {
        let mut pm = AcpiPm::default();
        assert_eq!(pm.write(PM1_CNT, 2, ((1 << 10) | SLP_EN) as u32), PmAction::None);
        assert_eq!(pm.read(PM1_CNT, 2) & u32::from(SLP_EN), 0, "SLP_EN reads 0");
    }

    #[test]
    fn enable_register_keeps_bits_status_clears() {
        let mut pm = AcpiPm::default();
        pm.write(PM1_EVT + 2, 2, 0x0121);
        assert_eq!(pm.read(PM1_EVT + 2, 2), 0x0121);
        assert_eq!(pm.read(PM1_EVT, 4), 0x0121 << 16);
        pm.write(PM1_EVT + 3, 1, 0);
        assert_eq!(pm.read(PM1_EVT + 2, 2), 0x0021, "byte write merges");
        pm.write(PM1_EVT, 2, 0xFFFF);
        assert_eq!(pm.read(PM1_EVT, 2), 0);
        assert!(AcpiPm::claims(0x605) && !AcpiPm::claims(0x606) && !AcpiPm::claims(0x5FF));
    }
}
