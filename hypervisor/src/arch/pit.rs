//! Busy waits on the legacy PIT's channel 2 (8254; gate and output through port 0x61),
//! the one time source that needs no calibration. In Bochs its rate follows the emulated
//! instruction count (`clock: sync=none`), so waits are short and deterministic.

use super::port::{inb, outb};

const PIT_HZ: u64 = 1_193_182;
const CHANNEL2_DATA: u16 = 0x42;
const MODE_COMMAND: u16 = 0x43;
const SYSTEM_CONTROL_B: u16 = 0x61;
/// Channel 2, low then high byte, mode 0 (interrupt on terminal count), binary.
const CHANNEL2_ONE_SHOT: u8 = 0b1011_0000;
const GATE2: u8 = 0x01;
const SPEAKER: u8 = 0x02;
const OUT2: u8 = 0x20;

/// Waits at least `micros` microseconds.
pub fn wait_us(micros: u64) {
    let mut remaining = micros.saturating_mul(PIT_HZ).div_ceil(1_000_000);
    while remaining > 0 {
        let chunk = remaining.min(0xFFFF);
        let control = inb(SYSTEM_CONTROL_B) & !(GATE2 | SPEAKER);
        outb(SYSTEM_CONTROL_B, control);
        outb(MODE_COMMAND, CHANNEL2_ONE_SHOT);
        outb(CHANNEL2_DATA, chunk as u8);
        outb(CHANNEL2_DATA, (chunk >> 8) as u8);
        outb(SYSTEM_CONTROL_B, control | GATE2);
        // Bounded: a missing or stuck PIT must not hang the boot.
        let mut spins = 0u64;
        while inb(SYSTEM_CONTROL_B) & OUT2 == 0 && spins < chunk * 64 + 10_000 {
            spins += 1;
            core::hint::spin_loop();
        }
        remaining -= chunk;
    }
}
