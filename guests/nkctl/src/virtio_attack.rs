//! `nkctl virtio-attack REGS RING`: a root process drives the VM's virtio block device
//! (its registers at guest-physical REGS, once Linux's driver is unloaded) through
//! `/dev/mem` with malformed virtqueues built in the page at RING (a reserved page below
//! 1 MiB, which strict /dev/mem lets root map): a descriptor loop, a descriptor table
//! outside the VM's RAM, an available index far ahead, and then, after a reset, a
//! well-formed write one sector past the device's end. The first three must break the
//! device (`DEVICE_NEEDS_RESET`) and nothing else; the last must fail with
//! `VIRTIO_BLK_S_IOERR` (the block AM refuses offsets outside the VM's range); a read of
//! sector 0 after it must succeed. Prints one line per case.

const STATUS: usize = 0x70;
const NEEDS_RESET: u32 = 0x40;

struct Device {
    regs: &'static mut [u8],
    ring: &'static mut [u8],
    ring_gpa: u64,
}

impl Device {
    fn r(&self, off: usize) -> u32 {
        // SAFETY: an aligned 4-byte volatile load inside the mapped register page.
        unsafe { std::ptr::read_volatile(self.regs[off..off + 4].as_ptr().cast::<u32>()) }
    }

    fn w(&mut self, off: usize, value: u32) {
        // SAFETY: an aligned 4-byte volatile store inside the mapped register page.
        unsafe { std::ptr::write_volatile(self.regs[off..off + 4].as_mut_ptr().cast::<u32>(), value) }
    }

    fn put(&mut self, off: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: a volatile byte store inside the mapped ring page.
            unsafe { std::ptr::write_volatile(&mut self.ring[off + i], *b) };
        }
    }

    fn byte(&self, off: usize) -> u8 {
        // SAFETY: a volatile byte load inside the mapped ring page.
        unsafe { std::ptr::read_volatile(&self.ring[off]) }
    }

    /// Resets the device and sets queue 0 up (8 entries) with its rings in the ring page,
    /// the descriptor table at `desc` (a guest-physical address).
    fn setup(&mut self, desc: u64) {
        self.ring.iter_mut().for_each(|b| *b = 0);
        self.w(STATUS, 0);
        self.w(STATUS, 3);
        self.w(0x24, 1);
        self.w(0x20, 1); // VERSION_1
        self.w(0x24, 0);
        self.w(0x20, 0);
        self.w(STATUS, 0xB);
        self.w(0x30, 0);
        self.w(0x38, 8);
        self.w(0x80, desc as u32);
        self.w(0x84, (desc >> 32) as u32);
        let (avail, used) = (self.ring_gpa + 0x200, self.ring_gpa + 0x400);
        self.w(0x90, avail as u32);
        self.w(0x94, 0);
        self.w(0xA0, used as u32);
        self.w(0xA4, 0);
        self.w(0x44, 1);
        self.w(STATUS, 0xF);
    }

    fn desc(&mut self, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.put(16 * i, &d);
    }

    /// Makes chain `head` available (avail index `idx`) and notifies.
    fn submit(&mut self, head: u16, idx: u16) {
        self.put(0x204, &head.to_le_bytes());
        self.put(0x202, &idx.to_le_bytes());
        self.w(0x50, 0);
    }

    /// A request at descriptors 0-2: header (type, sector) at +0x800, data at +0xA00
    /// (512 bytes), status at +0xE00.
    fn request(&mut self, kind: u32, sector: u64) -> u8 {
        let g = self.ring_gpa;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.put(0x800, &h);
        self.put(0xE00, &[0xFF]);
        self.desc(0, g + 0x800, 16, 1, 1);
        self.desc(1, g + 0xA00, 512, if kind == 0 { 3 } else { 1 }, 2);
        self.desc(2, g + 0xE00, 1, 2, 0);
        self.submit(0, 1);
        self.byte(0xE00)
    }

    fn report(&self, case: &str) {
        let status = self.r(STATUS);
        let what = if status & NEEDS_RESET != 0 { "device broken (DEVICE_NEEDS_RESET)" } else { "device not broken" };
        println!("virtio-attack: {case}: {what}, status {status:#x}, interrupt status {:#x}", self.r(0x60));
    }
}

pub fn run(regs_gpa: u64, ring_gpa: u64) -> Result<(), String> {
    let regs = nk::map_phys(regs_gpa, 4096)?;
    let ring = nk::map_phys(ring_gpa, 4096)?;
    let mut dev = Device { regs, ring, ring_gpa };
    if dev.r(0) != 0x7472_6976 || dev.r(8) != 2 {
        return Err(format!("no virtio block device at {regs_gpa:#x}"));
    }
    let capacity = u64::from(dev.r(0x100)) | (u64::from(dev.r(0x104)) << 32);
    println!("virtio-attack: device at {regs_gpa:#x}, {capacity} sectors");

    dev.setup(ring_gpa);
    let g = ring_gpa;
    dev.put(0x800, &[0; 16]);
    dev.desc(0, g + 0x800, 16, 1, 1);
    dev.desc(1, g + 0xA00, 512, 3, 0);
    dev.submit(0, 1);
    dev.report("descriptor loop");

    dev.setup(0xFFFF_FFFF_F000);
    dev.submit(0, 1);
    dev.report("descriptor table outside RAM");

    dev.setup(ring_gpa);
    dev.submit(0, 1000);
    dev.report("available index 1000 ahead");

    dev.setup(ring_gpa);
    let status = dev.request(1, capacity);
    println!("virtio-attack: write of sector {capacity} (one past the end): request status {status}");
    dev.report("after the write past the end");
    dev.setup(ring_gpa);
    let status = dev.request(0, 0);
    println!("virtio-attack: read of sector 0 after a reset: request status {status}");
    dev.w(STATUS, 0);
    Ok(())
}
