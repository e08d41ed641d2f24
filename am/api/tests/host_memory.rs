//! `HostMemory::equal`'s default (reads both ranges through buffers), as the NVRAM AM's
//! diff uses it on host memory without its own comparison.

use std::sync::Mutex;

use nk_am::HostMemory;

/// Host memory as a vector from address 0x1000.
struct Frames(Mutex<Vec<u8>>);

const BASE: u64 = 0x1000;

impl HostMemory for Frames {
    fn read(&self, hpa: u64, buf: &mut [u8]) -> bool {
        let frames = self.0.lock().unwrap();
        let Some(at) = hpa.checked_sub(BASE).map(|a| a as usize) else { return false };
        match frames.get(at..at + buf.len()) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }

    fn write(&self, hpa: u64, data: &[u8]) -> bool {
        let mut frames = self.0.lock().unwrap();
        let at = (hpa - BASE) as usize;
        match frames.get_mut(at..at + data.len()) {
            Some(bytes) => {
                bytes.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
}

#[test]
fn equal_compares_whole_ranges_across_its_buffers() {
    let memory = Frames(Mutex::new(vec![7u8; 2 * 4096]));
    let (a, b) = (BASE, BASE + 4096);
    assert_eq!(memory.equal(a, b, 4096), Some(true));
    assert_eq!(memory.equal(a, b, 0), Some(true));
    // A difference in the last byte, past the first 256-byte buffer, is found.
    assert!(memory.write(b + 4095, &[8]));
    assert_eq!(memory.equal(a, b, 4096), Some(false));
    assert_eq!(memory.equal(a, b, 4095), Some(true));
    // Ranges outside memory are refused.
    assert_eq!(memory.equal(a, b + 1, 4096), None);
    assert_eq!(memory.equal(0, b, 16), None);
}
