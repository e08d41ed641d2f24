//! The MC146818 CMOS RTC at ports 0x70 (index, bit 7 = NMI mask) and 0x71 (data), as Linux's
//! `mach_get_cmos_time` and `rtc-cmos` read it: the time registers in BCD, 24-hour mode,
//! register A with UIP clear (so no reader ever waits for an update), register D "valid",
//! and 114 bytes of battery-backed RAM. The caller supplies the time in seconds since the
//! Unix epoch on every read.

/// Register indices.
pub mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const WEEKDAY: u8 = 0x06;
    pub const DAY: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const A: u8 = 0x0A;
    pub const B: u8 = 0x0B;
    pub const C: u8 = 0x0C;
    pub const D: u8 = 0x0D;
    /// The century register the FADT names.
    pub const CENTURY: u8 = 0x32;
}

const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;

/// The CMOS chip.
#[derive(Clone, Debug)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

/// Converts days since 1970-01-01 to (year, month, day) (H. Hinnant's civil_from_days).
fn civil_from_days(days: u64) -> (u64, u8, u8) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

impl Rtc {
    /// Returns the chip with 24-hour BCD mode set and its RAM zeroed.
    pub fn new() -> Self {
        let mut ram = [0; 128];
        ram[reg::A as usize] = 0x26;
        ram[reg::B as usize] = B_24H;
        ram[reg::D as usize] = 0x80;
        Self { index: 0, ram }
    }

    /// Returns whether `port` belongs to the chip.
    pub fn claims(port: u16) -> bool {
        matches!(port, 0x70 | 0x71)
    }

    fn encode(&self, value: u8) -> u8 {
        if self.ram[reg::B as usize] & B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    /// Reads `port` at wall-clock time `unix_seconds`.
    pub fn read(&mut self, port: u16, unix_seconds: u64) -> u8 {
        if port == 0x70 {
            return 0xFF;
        }
        let days = unix_seconds / 86_400;
        let secs = unix_seconds % 86_400;
        let (year, month, day) = civil_from_days(days);
        match self.index {
            reg::SECONDS => self.encode((secs % 60) as u8),
            reg::MINUTES => self.encode((secs / 60 % 60) as u8),
            reg::HOURS => self.encode((secs / 3600) as u8),
            reg::WEEKDAY => self.encode(((days + 4) % 7 + 1) as u8),
            reg::DAY => self.encode(day),
            reg::MONTH => self.encode(month),
            reg::YEAR => self.encode((year % 100) as u8),
            reg::CENTURY => self.encode((year / 100 % 100) as u8),
            reg::A => self.ram[reg::A as usize] & 0x7F, // UIP always clear
            reg::C => {
                let c = self.ram[reg::C as usize];
                self.ram[reg::C as usize] = 0;
                c
            }
            i => self.ram[usize::from(i & 0x7F)],
        }
    }

    /// Writes `port`: the index (NMI-mask bit dropped), or the selected register (the time
    /// registers, C and D are read-only here).
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            0x70 => self.index = value & 0x7F,
            0x71 => match self.index {
                reg::SECONDS..=reg::YEAR | reg::C | reg::D | reg::CENTURY => {}
                reg::A => self.ram[reg::A as usize] = value & 0x7F,
                reg::B => self.ram[reg::B as usize] = (value & 0x7F) | B_24H,
                i => self.ram[usize::from(i & 0x7F)] = value,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(r: &mut Rtc, index: u8, t: u64) -> u8 {
        r.write(0x70, index | 0x80);
        r.read(0x71, t)
    }

    #[test]
    fn time_reads_in_bcd() {
        let mut r = Rtc::new();
        // 2026-11-30 17:48:58 UTC (a Monday).
        let t = 1_796_060_938;
        assert_eq!(get(&mut r, reg::A, t) & 0x80, 0, "UIP clear");
        assert_eq!(get(&mut r, reg::B, t), 0x02);
        assert_eq!(get(&mut r, reg::SECONDS, t), 0x58);
        assert_eq!(get(&mut r, reg::MINUTES, t), 0x48);
        assert_eq!(get(&mut r, reg::HOURS, t), 0x17);
        assert_eq!(get(&mut r, reg::DAY, t), 0x30);
        assert_eq!(get(&mut r, reg::MONTH, t), 0x11);
        assert_eq!(get(&mut r, reg::YEAR, t), 0x26);
        assert_eq!(get(&mut r, reg::CENTURY, t), 0x20);
        assert_eq!(get(&mut r, reg::WEEKDAY, t), 2, "Monday is day 2");
        assert_eq!(get(&mut r, reg::D, t), 0x80);
    }

    #[test]
    fn binary_mode_and_ram() {
        let mut r = Rtc::new();
        r.write(0x70, reg::B);
        r.write(0x71, B_BINARY);
        assert_eq!(get(&mut r, reg::SECONDS, 59), 59);
        assert_eq!(get(&mut r, reg::B, 0), B_BINARY | B_24H, "24-hour mode stays on");
        r.write(0x70, 0x40);
        r.write(0x71, 0x5A);
        assert_eq!(get(&mut r, 0x40, 0), 0x5A);
        r.write(0x70, reg::SECONDS);
        r.write(0x71, 0x11);
        assert_eq!(get(&mut r, reg::SECONDS, 0), 0, "time registers ignore writes");
        assert_eq!(get(&mut r, 0xFF, 0), get(&mut r, 0x7F, 0), "index wraps at 128");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert!(civil_from_days(u64::MAX / 86_400 / 1000).0 > 2000);
    }
}
