//! The guest console: bytes written to the debug port 0xE9, which the hypervisor turns
//! into log lines tagged with the guest's name.

use core::fmt::{self, Write};

const DEBUG_PORT: u16 = 0xE9;

/// A `fmt::Write` sink on the debug port.
#[derive(Debug)]
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            // SAFETY: writing the debug port only makes the hypervisor record the byte; it
            // touches no guest memory.
            unsafe { core::arch::asm!("out dx, al", in("dx") DEBUG_PORT, in("al") byte, options(nomem, nostack)) }
        }
        Ok(())
    }
}

/// Prints formatted text (used by `println!`).
pub fn print(args: fmt::Arguments<'_>) {
    let _ = Console.write_fmt(args);
}

/// Prints a line on the guest console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
