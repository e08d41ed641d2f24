//! The part of the 8042 keyboard controller (ports 0x60/0x64) an OS without a keyboard
//! touches: the status register reads "no data, input buffer empty", and command 0xFE
//! (pulse the reset line) resets the machine, which is how Linux's `reboot=k` (its default
//! fallback) and many small kernels reset.

/// What a write asks of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KbcAction {
    None,
    Reset,
}

/// The controller.
#[derive(Clone, Debug, Default)]
pub struct I8042;

impl I8042 {
    /// Returns whether `port` belongs to the controller.
    pub fn claims(port: u16) -> bool {
        matches!(port, 0x60 | 0x64)
    }

    /// Reads `port`: no output byte and an empty input buffer.
    pub fn read(&self, _port: u16) -> u8 {
        0
    }

    /// Writes `port`; command 0xFE on 0x64 resets (IBM PC/AT technical reference).
    pub fn write(&mut self, port: u16, value: u8) -> KbcAction {
        if port == 0x64 && value == 0xFE {
            KbcAction::Reset
        } else {
            KbcAction::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command() {
        let mut k = I8042;
        assert_eq!(k.read(0x64) & 0x03, 0, "output and input buffers empty");
        assert_eq!(k.write(0x64, 0xFE), KbcAction::Reset);
        assert_eq!(k.write(0x60, 0xFE), KbcAction::None);
        assert_eq!(k.write(0x64, 0xAD), KbcAction::None);
    }
}
