//! A virtio block device on the virtio-mmio transport, version 2 (Virtual I/O Device
//! (VIRTIO) Version 1.1, §4.2 "Virtio Over MMIO", §2.6 "Split Virtqueues", §5.2 "Block
//! Device"): one request queue, requests served synchronously when the driver writes
//! `QueueNotify`, from and to a [`Backend`] of `capacity` bytes (the hypervisor's is a
//! block-AM range the VM holds a capability to).
//!
//! Everything the driver controls is checked before it is used: ring and buffer addresses
//! go through [`GuestMemory`], which refuses what is not the VM's RAM; descriptor indices
//! are checked against the queue size, a chain longer than the queue is a loop, a request
//! moves at most [`REQUEST_MAX`] bytes through a fixed bounce buffer, and a sector outside
//! the capacity fails the request. A malformed ring (an index out of range, a loop, an
//! avail index that runs ahead by more than the queue size, a ring the VM's RAM does not
//! hold) marks the device broken (`DEVICE_NEEDS_RESET`, §2.1.2, with a configuration
//! change interrupt): it serves nothing more until the driver resets it. A malformed
//! request whose status byte can be written (an unknown type, a sector out of range, a
//! data buffer outside RAM, a direction that does not match the type) completes with
//! `VIRTIO_BLK_S_IOERR` or `_UNSUPP`. Nothing here panics or allocates.
//!
//! Offered features: `VIRTIO_BLK_F_SIZE_MAX`, `_SEG_MAX`, `_FLUSH` (a `FLUSH` request is
//! the backend's `flush`: durability) and `VIRTIO_F_VERSION_1`; no indirect descriptors,
//! no event index.

/// The bytes of the register window (registers at 0x000-0x0FF, configuration after).
pub const WINDOW: u64 = 0x200;
/// The queue size offered (`QueueNumMax`).
pub const QUEUE_MAX: u16 = 128;
/// The most bytes one data descriptor may carry (`size_max`).
pub const SEGMENT_MAX: u32 = 64 << 10;
/// The most data descriptors in one request (`seg_max`).
pub const SEGMENTS_MAX: u32 = 32;
/// The most data bytes one request moves.
pub const REQUEST_MAX: u64 = SEGMENT_MAX as u64 * SEGMENTS_MAX as u64;
/// The bytes moved between the guest and the backend at a time.
const BOUNCE: usize = 4096;
/// A sector of the block device (§5.2.6: `sector` counts 512-byte units).
pub const SECTOR: u64 = 512;

/// Register offsets (§4.2.2).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00C;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0A0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0A4;
    pub const CONFIG_GENERATION: u64 = 0x0FC;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (§2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Feature bits (§5.2.3, §6).
pub mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const FLUSH: u64 = 1 << 9;
    pub const VERSION_1: u64 = 1 << 32;
    pub const OFFERED: u64 = SIZE_MAX | SEG_MAX | FLUSH | VERSION_1;
}

/// Request types and status values (§5.2.6).
pub mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;
}

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4E4B_4850; // "PHKN"
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const AVAIL_NO_INTERRUPT: u16 = 1;
/// Interrupt status bits (§4.2.2).
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;
/// The serial number a `GET_ID` request returns (20 bytes, NUL-padded).
const ID: &[u8; 20] = b"nk-block-am-range\0\0\0";

/// The VM's memory as the device reaches it: `false` where `[gpa, gpa + len)` is not
/// wholly the VM's RAM (nothing is read or written then).
pub trait GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;
    fn write(&mut self, gpa: u64, data: &[u8]) -> bool;
}

/// Where the blocks live: byte offsets inside the device's capacity, multiples of
/// [`SECTOR`]; `false` is an I/O error (the request fails, the device goes on). `write`
/// may use `data` as scratch (the device's bounce buffer; the block AM lends it on).
pub trait Backend {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> bool;
    fn write(&mut self, offset: u64, data: &mut [u8]) -> bool;
    /// Returns once every earlier write is durable.
    fn flush(&mut self) -> bool;
}

/// Why the device stopped serving (its log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// A ring (descriptor table, available or used ring) lies outside the VM's RAM.
    RingOutsideRam,
    /// A descriptor index at or past the queue size.
    IndexOutOfRange,
    /// A chain with more descriptors than the queue has (a loop).
    ChainLoop,
    /// The available index ran ahead of the device by more than the queue size.
    AvailRunaway,
    /// Notified with the queue not set up (not ready, or a size of 0 or above the maximum).
    QueueNotReady,
    /// A chain without a header or without a writable status byte.
    NoStatus,
    /// The status byte or the used ring could not be written.
    UsedOutsideRam,
}

impl Broken {
    pub fn describe(self) -> &'static str {
        match self {
            Broken::RingOutsideRam => "a virtqueue ring outside the VM's RAM",
            Broken::IndexOutOfRange => "a descriptor index past the queue size",
            Broken::ChainLoop => "a descriptor chain longer than the queue (a loop)",
            Broken::AvailRunaway => "an available index more than a queue ahead",
            Broken::QueueNotReady => "a notify with no queue set up",
            Broken::NoStatus => "a request without a header or a writable status byte",
            Broken::UsedOutsideRam => "a status byte or used ring outside the VM's RAM",
        }
    }
}

/// What the device counted (for the VM's end line and the tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub failed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Queue {
    num: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    used_idx: u16,
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One virtio-mmio block device.
#[derive(Debug)]
pub struct VirtioBlk {
    capacity: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queue: Queue,
    interrupt_status: u32,
    broken: Option<Broken>,
    pub counters: Counters,
    bounce: [u8; BOUNCE],
}

/// What a register write led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    None,
    /// Requests were completed (how many).
    Served(u32),
    /// The device broke on this notify.
    Broke(Broken),
}

impl VirtioBlk {
    /// Returns a device of `capacity` bytes (rounded down to sectors) in its reset state.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity: capacity - capacity % SECTOR,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queue: Queue::default(),
            interrupt_status: 0,
            broken: None,
            counters: Counters::default(),
            bounce: [0; BOUNCE],
        }
    }

    /// Returns the capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Returns why the device stopped serving, if it did.
    pub fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// Returns the level of the device's interrupt line (some interrupt status bit set).
    pub fn irq_level(&self) -> bool {
        self.interrupt_status != 0
    }

    fn reset(&mut self) {
        let counters = self.counters;
        *self = Self::new(self.capacity);
        self.counters = counters;
    }

    fn config_byte(&self, at: u64) -> u8 {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&(self.capacity / SECTOR).to_le_bytes());
        config[8..12].copy_from_slice(&SEGMENT_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEGMENTS_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        config.get(at as usize).copied().unwrap_or(0)
    }

    /// Reads `size` bytes (1, 2 or 4) at `offset` in the window. Registers below
    /// [`reg::CONFIG`] answer only aligned 32-bit reads (§4.2.2); other reads give 0.
    pub fn read(&self, offset: u64, size: u8) -> u32 {
        if offset >= reg::CONFIG {
            let at = offset - reg::CONFIG;
            let mut value = 0u32;
            for i in 0..u64::from(size.min(4)) {
                value |= u32::from(self.config_byte(at + i)) << (8 * i);
            }
            return value;
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return 0;
        }
        let selected = self.queue_sel == 0;
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => 2,
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => feature::OFFERED as u32,
                1 => (feature::OFFERED >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX if selected => u32::from(QUEUE_MAX),
            reg::QUEUE_READY if selected => u32::from(self.queue.ready),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    /// Writes `size` bytes at `offset`; a `QueueNotify` serves the queue from `memory`
    /// and `backend`. Writes of another size than 32 bits, or to the configuration, are
    /// ignored (the block configuration is read-only without `VIRTIO_BLK_F_CONFIG_WCE`).
    pub fn write(
        &mut self,
        offset: u64,
        size: u8,
        value: u32,
        memory: &mut dyn GuestMemory,
        backend: &mut dyn Backend,
    ) -> WriteEffect {
        if offset >= reg::CONFIG || size != 4 || !offset.is_multiple_of(4) {
            return WriteEffect::None;
        }
        let selected = self.queue_sel == 0;
        // The queue's set-up may change only while it is not ready (§4.2.3.2).
        let setup = selected && !self.queue.ready;
        let low = |old: u64| (old & !0xFFFF_FFFF) | u64::from(value);
        let high = |old: u64| (old & 0xFFFF_FFFF) | (u64::from(value) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = low(self.driver_features),
                1 => self.driver_features = high(self.driver_features),
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if setup => self.queue.num = value.min(u32::from(u16::MAX)) as u16,
            reg::QUEUE_READY if selected => {
                self.queue.ready = value & 1 != 0;
                if self.queue.ready {
                    self.queue.last_avail = 0;
                    self.queue.used_idx = 0;
                }
            }
            reg::QUEUE_DESC_LOW if setup => self.queue.desc = low(self.queue.desc),
            reg::QUEUE_DESC_HIGH if setup => self.queue.desc = high(self.queue.desc),
            reg::QUEUE_DRIVER_LOW if setup => self.queue.avail = low(self.queue.avail),
            reg::QUEUE_DRIVER_HIGH if setup => self.queue.avail = high(self.queue.avail),
            reg::QUEUE_DEVICE_LOW if setup => self.queue.used = low(self.queue.used),
            reg::QUEUE_DEVICE_HIGH if setup => self.queue.used = high(self.queue.used),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => {
                if value == 0 {
                    self.reset();
                    return WriteEffect::None;
                }
                let mut value = value & 0xFF;
                // FEATURES_OK only for a subset of the offered features with VERSION_1.
                if value & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
                    let fine =
                        self.driver_features & !feature::OFFERED == 0 && self.driver_features & feature::VERSION_1 != 0;
                    if !fine {
                        value &= !status::FEATURES_OK;
                    }
                }
                self.status = value | (self.status & status::DEVICE_NEEDS_RESET);
            }
            reg::QUEUE_NOTIFY if value == 0 => return self.notify(memory, backend),
            _ => {}
        }
        WriteEffect::None
    }

    fn notify(&mut self, memory: &mut dyn GuestMemory, backend: &mut dyn Backend) -> WriteEffect {
        if self.broken.is_some() || self.status & status::DRIVER_OK == 0 {
            return WriteEffect::None;
        }
        match self.serve(memory, backend) {
            Ok(0) => WriteEffect::None,
            Ok(n) => WriteEffect::Served(n),
            Err(why) => {
                self.broken = Some(why);
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt_status |= INT_CONFIG;
                WriteEffect::Broke(why)
            }
        }
    }

    fn read_u16(memory: &dyn GuestMemory, gpa: u64) -> Result<u16, Broken> {
        let mut b = [0u8; 2];
        if !memory.read(gpa, &mut b) {
            return Err(Broken::RingOutsideRam);
        }
        Ok(u16::from_le_bytes(b))
    }

    fn desc(&self, memory: &dyn GuestMemory, index: u16) -> Result<Desc, Broken> {
        if index >= self.queue.num {
            return Err(Broken::IndexOutOfRange);
        }
        let mut b = [0u8; 16];
        let at = self.queue.desc.checked_add(16 * u64::from(index)).ok_or(Broken::RingOutsideRam)?;
        if !memory.read(at, &mut b) {
            return Err(Broken::RingOutsideRam);
        }
        let word = |r: core::ops::Range<usize>| {
            let mut v = [0u8; 8];
            v[..r.len()].copy_from_slice(&b[r]);
            u64::from_le_bytes(v)
        };
        Ok(Desc { addr: word(0..8), len: word(8..12) as u32, flags: word(12..14) as u16, next: word(14..16) as u16 })
    }

    /// Serves every available request; returns how many completed.
    fn serve(&mut self, memory: &mut dyn GuestMemory, backend: &mut dyn Backend) -> Result<u32, Broken> {
        let q = self.queue;
        if !q.ready || q.num == 0 || q.num > QUEUE_MAX {
            return Err(Broken::QueueNotReady);
        }
        let num = u64::from(q.num);
        let flags = Self::read_u16(memory, q.avail)?;
        let avail_idx = Self::read_u16(memory, q.avail.checked_add(2).ok_or(Broken::RingOutsideRam)?)?;
        if avail_idx.wrapping_sub(q.last_avail) > q.num {
            return Err(Broken::AvailRunaway);
        }
        let mut served = 0u32;
        while self.queue.last_avail != avail_idx {
            let slot = u64::from(self.queue.last_avail) % num;
            let head = Self::read_u16(memory, q.avail.checked_add(4 + 2 * slot).ok_or(Broken::RingOutsideRam)?)?;
            let written = self.request(memory, backend, head)?;
            let used_slot = u64::from(self.queue.used_idx) % num;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&written.to_le_bytes());
            let at = q.used.checked_add(4 + 8 * used_slot).ok_or(Broken::UsedOutsideRam)?;
            if !memory.write(at, &elem) {
                return Err(Broken::UsedOutsideRam);
            }
            self.queue.used_idx = self.queue.used_idx.wrapping_add(1);
            let idx_at = q.used.checked_add(2).ok_or(Broken::UsedOutsideRam)?;
            if !memory.write(idx_at, &self.queue.used_idx.to_le_bytes()) {
                return Err(Broken::UsedOutsideRam);
            }
            self.queue.last_avail = self.queue.last_avail.wrapping_add(1);
            served += 1;
        }
        if served > 0 && flags & AVAIL_NO_INTERRUPT == 0 {
            self.interrupt_status |= INT_VRING;
        }
        Ok(served)
    }

    /// Serves the request whose chain starts at `head`: returns how many bytes the device
    /// wrote into the chain. A malformed chain breaks the
    /// device; a bad request fails with its status.
    fn request(&mut self, memory: &mut dyn GuestMemory, backend: &mut dyn Backend, head: u16) -> Result<u32, Broken> {
        // Walk the chain once: check every index and its length, find the header and the
        // status byte, and add up the data.
        let first = self.desc(memory, head)?;
        if first.flags & DESC_WRITE != 0 || first.len < 16 || first.flags & DESC_NEXT == 0 {
            return Err(Broken::NoStatus);
        }
        let mut header = [0u8; 16];
        if !memory.read(first.addr, &mut header) {
            return Err(Broken::NoStatus);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let mut count = 1u32;
        let mut index = first.next;
        let mut last;
        let mut data_bytes = 0u64;
        let mut segments = 0u32;
        let mut dirs_ok = true;
        loop {
            let d = self.desc(memory, index)?;
            count += 1;
            if count > u32::from(self.queue.num) {
                return Err(Broken::ChainLoop);
            }
            last = d;
            if d.flags & DESC_NEXT == 0 {
                break;
            }
            // A data descriptor (every one but the last).
            segments += 1;
            data_bytes += u64::from(d.len);
            let writable = d.flags & DESC_WRITE != 0;
            dirs_ok &= match kind {
                request::IN | request::GET_ID => writable,
                _ => !writable,
            };
            index = d.next;
        }
        if last.flags & DESC_WRITE == 0 || last.len == 0 {
            return Err(Broken::NoStatus);
        }
        let status_gpa = last.addr.checked_add(u64::from(last.len) - 1).ok_or(Broken::UsedOutsideRam)?;
        let fits = segments <= SEGMENTS_MAX && data_bytes <= REQUEST_MAX;
        let (status, written) = if !dirs_ok || !fits {
            (request::S_IOERR, 0)
        } else {
            self.execute(memory, backend, head, kind, sector, data_bytes)
        };
        if status != request::S_OK {
            self.counters.failed += 1;
        }
        if !memory.write(status_gpa, &[status]) {
            return Err(Broken::UsedOutsideRam);
        }
        Ok(written + 1)
    }

    /// Moves the data of a well-formed chain; returns the status and the bytes written
    /// into guest buffers.
    fn execute(
        &mut self,
        memory: &mut dyn GuestMemory,
        backend: &mut dyn Backend,
        head: u16,
        kind: u32,
        sector: u64,
        data_bytes: u64,
    ) -> (u8, u32) {
        let in_range = sector
            .checked_mul(SECTOR)
            .and_then(|start| start.checked_add(data_bytes).map(|end| (start, end)))
            .filter(|&(_, end)| end <= self.capacity);
        match kind {
            request::FLUSH => {
                self.counters.flushes += 1;
                (if backend.flush() { request::S_OK } else { request::S_IOERR }, 0)
            }
            request::GET_ID => {
                let Ok(d) = self.desc(memory, head).and_then(|h| self.desc(memory, h.next)) else {
                    return (request::S_IOERR, 0);
                };
                let n = (d.len as usize).min(ID.len());
                if d.flags & DESC_NEXT == 0 || !memory.write(d.addr, &ID[..n]) {
                    return (request::S_IOERR, 0);
                }
                (request::S_OK, n as u32)
            }
            request::IN | request::OUT => {
                let Some((start, _)) = in_range else { return (request::S_IOERR, 0) };
                let mut offset = start;
                let Ok(mut d) = self.desc(memory, head) else { return (request::S_IOERR, 0) };
                let mut written = 0u32;
                // The same walk as `request`'s, which checked it: every data descriptor.
                while let Ok(next) = self.desc(memory, d.next) {
                    if next.flags & DESC_NEXT == 0 || d.flags & DESC_NEXT == 0 {
                        break;
                    }
                    d = next;
                    if !u64::from(d.len).is_multiple_of(SECTOR) {
                        return (request::S_IOERR, written);
                    }
                    let mut done = 0u64;
                    while done < u64::from(d.len) {
                        let n = (u64::from(d.len) - done).min(BOUNCE as u64) as usize;
                        let Some(gpa) = d.addr.checked_add(done) else { return (request::S_IOERR, written) };
                        let buf = &mut self.bounce[..n];
                        let ok = if kind == request::IN {
                            backend.read(offset, buf) && memory.write(gpa, buf)
                        } else {
                            memory.read(gpa, buf) && backend.write(offset, buf)
                        };
                        if !ok {
                            return (request::S_IOERR, written);
                        }
                        if kind == request::IN {
                            written += n as u32;
                            self.counters.bytes_read += n as u64;
                        } else {
                            self.counters.bytes_written += n as u64;
                        }
                        done += n as u64;
                        offset += n as u64;
                    }
                }
                if kind == request::IN {
                    self.counters.reads += 1;
                } else {
                    self.counters.writes += 1;
                }
                (request::S_OK, written)
            }
            _ => (request::S_UNSUPP, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM's RAM of 1 MiB.
    struct Ram(Vec<u8>);

    impl GuestMemory for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let Some(end) = gpa.checked_add(buf.len() as u64).filter(|&e| e <= self.0.len() as u64) else {
                return false;
            };
            buf.copy_from_slice(&self.0[gpa as usize..end as usize]);
            true
        }
        fn write(&mut self, gpa: u64, data: &[u8]) -> bool {
            let Some(end) = gpa.checked_add(data.len() as u64).filter(|&e| e <= self.0.len() as u64) else {
                return false;
            };
            self.0[gpa as usize..end as usize].copy_from_slice(data);
            true
        }
    }

    struct Disk {
        bytes: Vec<u8>,
        flushes: u32,
    }

    impl Backend for Disk {
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> bool {
            match self.bytes.get(offset as usize..offset as usize + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
        fn write(&mut self, offset: u64, data: &mut [u8]) -> bool {
            match self.bytes.get_mut(offset as usize..offset as usize + data.len()) {
                Some(dst) => {
                    dst.copy_from_slice(data);
                    true
                }
                None => false,
            }
        }
        fn flush(&mut self) -> bool {
            self.flushes += 1;
            true
        }
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const NUM: u16 = 8;

    struct Rig {
        dev: VirtioBlk,
        ram: Ram,
        disk: Disk,
        avail_idx: u16,
    }

    impl Rig {
        /// A device after Linux's probe: features, queue 0 set up, DRIVER_OK.
        fn new() -> Self {
            let mut rig = Rig {
                dev: VirtioBlk::new(64 * 1024),
                ram: Ram(vec![0; 1 << 20]),
                disk: Disk { bytes: vec![0; 64 * 1024], flushes: 0 },
                avail_idx: 0,
            };
            assert_eq!(rig.dev.read(reg::MAGIC, 4), MAGIC);
            assert_eq!(rig.dev.read(reg::VERSION, 4), 2);
            assert_eq!(rig.dev.read(reg::DEVICE_ID, 4), 2);
            rig.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            rig.w(reg::DEVICE_FEATURES_SEL, 1);
            assert_eq!(rig.dev.read(reg::DEVICE_FEATURES, 4), 1, "VERSION_1");
            rig.w(reg::DRIVER_FEATURES_SEL, 0);
            rig.w(reg::DRIVER_FEATURES, feature::FLUSH as u32);
            rig.w(reg::DRIVER_FEATURES_SEL, 1);
            rig.w(reg::DRIVER_FEATURES, 1);
            rig.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            assert_ne!(rig.dev.read(reg::STATUS, 4) & status::FEATURES_OK, 0);
            rig.w(reg::QUEUE_SEL, 0);
            assert_eq!(rig.dev.read(reg::QUEUE_NUM_MAX, 4), u32::from(QUEUE_MAX));
            rig.w(reg::QUEUE_NUM, u32::from(NUM));
            rig.w(reg::QUEUE_DESC_LOW, DESC as u32);
            rig.w(reg::QUEUE_DESC_HIGH, 0);
            rig.w(reg::QUEUE_DRIVER_LOW, AVAIL as u32);
            rig.w(reg::QUEUE_DEVICE_LOW, USED as u32);
            rig.w(reg::QUEUE_READY, 1);
            rig.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
            rig
        }

        fn w(&mut self, offset: u64, value: u32) -> WriteEffect {
            self.dev.write(offset, 4, value, &mut self.ram, &mut self.disk)
        }

        fn put(&mut self, gpa: u64, bytes: &[u8]) {
            self.ram.0[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
        }

        fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            self.put(DESC + 16 * u64::from(i), &b);
        }

        fn header(&mut self, at: u64, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.put(at, &h);
        }

        /// Makes chain `head` available and notifies.
        fn submit(&mut self, head: u16) -> WriteEffect {
            let slot = u64::from(self.avail_idx % NUM);
            self.put(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
            let idx = self.avail_idx;
            self.put(AVAIL + 2, &idx.to_le_bytes());
            self.w(reg::QUEUE_NOTIFY, 0)
        }

        /// A three-descriptor request at descriptors 0-2: header at 0x10000, data at
        /// 0x20000, status at 0x30000.
        fn rw(&mut self, kind: u32, sector: u64, len: u32) -> WriteEffect {
            self.header(0x10000, kind, sector);
            self.set_desc(0, 0x10000, 16, DESC_NEXT, 1);
            let data_flags = DESC_NEXT | if kind == request::IN { DESC_WRITE } else { 0 };
            self.set_desc(1, 0x20000, len, data_flags, 2);
            self.set_desc(2, 0x30000, 1, DESC_WRITE, 0);
            self.put(0x30000, &[0xFF]);
            self.submit(0)
        }

        fn status_byte(&self) -> u8 {
            self.ram.0[0x30000]
        }

        fn used_idx(&self) -> u16 {
            u16::from_le_bytes([self.ram.0[USED as usize + 2], self.ram.0[USED as usize + 3]])
        }
    }

    #[test]
    fn linux_probe_reads_capacity_and_features() {
        let rig = Rig::new();
        assert_eq!(rig.dev.read(reg::CONFIG, 4), 128, "capacity low word in sectors");
        assert_eq!(rig.dev.read(reg::CONFIG + 4, 4), 0);
        assert_eq!(rig.dev.read(reg::CONFIG + 12, 4), SEGMENTS_MAX);
        assert_eq!(rig.dev.read(reg::CONFIG, 1), 128, "byte access to the configuration");
        assert_eq!(rig.dev.read(reg::DEVICE_FEATURES, 2), 0, "registers are 32-bit only");
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mut rig = Rig::new();
        rig.w(reg::STATUS, 0);
        rig.w(reg::DRIVER_FEATURES_SEL, 0);
        rig.w(reg::DRIVER_FEATURES, feature::FLUSH as u32);
        rig.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(rig.dev.read(reg::STATUS, 4) & status::FEATURES_OK, 0);
    }

    #[test]
    fn write_flush_read_round_trip() {
        let mut rig = Rig::new();
        rig.put(0x20000, &[0xAB; 1024]);
        assert_eq!(rig.rw(request::OUT, 4, 1024), WriteEffect::Served(1));
        assert_eq!(rig.status_byte(), request::S_OK);
        assert_eq!(&rig.disk.bytes[2048..3072], &[0xAB; 1024][..]);
        assert!(rig.dev.irq_level());
        assert_eq!(rig.dev.read(reg::INTERRUPT_STATUS, 4), INT_VRING);
        rig.w(reg::INTERRUPT_ACK, INT_VRING);
        assert!(!rig.dev.irq_level());
        // FLUSH: header + status only.
        rig.header(0x10000, request::FLUSH, 0);
        rig.set_desc(3, 0x10000, 16, DESC_NEXT, 4);
        rig.set_desc(4, 0x30000, 1, DESC_WRITE, 0);
        assert_eq!(rig.submit(3), WriteEffect::Served(1));
        assert_eq!(rig.disk.flushes, 1);
        rig.put(0x20000, &[0; 1024]);
        assert_eq!(rig.rw(request::IN, 4, 1024), WriteEffect::Served(1));
        assert_eq!(rig.status_byte(), request::S_OK);
        assert_eq!(&rig.ram.0[0x20000..0x20400], &[0xAB; 1024][..]);
        assert_eq!(rig.used_idx(), 3);
        let used_len = u32::from_le_bytes(rig.ram.0[USED as usize + 4 + 16 + 4..][..4].try_into().unwrap());
        assert_eq!(used_len, 1025);
    }

    #[test]
    fn requests_outside_the_capacity_fail_and_touch_nothing() {
        let mut rig = Rig::new();
        rig.put(0x20000, &[0xCD; 512]);
        assert_eq!(rig.rw(request::OUT, 128, 512), WriteEffect::Served(1), "first sector past the end");
        assert_eq!(rig.status_byte(), request::S_IOERR);
        assert_eq!(rig.rw(request::OUT, 127, 1024), WriteEffect::Served(1), "straddles the end");
        assert_eq!(rig.status_byte(), request::S_IOERR);
        assert_eq!(rig.rw(request::IN, u64::MAX / 256, 512), WriteEffect::Served(1), "sector * 512 overflows");
        assert_eq!(rig.status_byte(), request::S_IOERR);
        assert!(rig.disk.bytes.iter().all(|&b| b == 0));
        assert_eq!(rig.dev.counters.failed, 3);
        assert_eq!(rig.dev.broken(), None, "bad requests do not break the device");
        assert_eq!(rig.rw(request::OUT, 0, 512), WriteEffect::Served(1));
        assert_eq!(rig.status_byte(), request::S_OK);
    }

    #[test]
    fn bad_requests_fail_with_their_status() {
        let mut rig = Rig::new();
        assert_eq!(rig.rw(99, 0, 512), WriteEffect::Served(1));
        assert_eq!(rig.status_byte(), request::S_UNSUPP);
        // IN with a device-readable data buffer.
        rig.header(0x10000, request::IN, 0);
        rig.set_desc(0, 0x10000, 16, DESC_NEXT, 1);
        rig.set_desc(1, 0x20000, 512, DESC_NEXT, 2);
        rig.set_desc(2, 0x30000, 1, DESC_WRITE, 0);
        assert_eq!(rig.submit(0), WriteEffect::Served(1));
        assert_eq!(rig.status_byte(), request::S_IOERR);
        // Data outside the VM's RAM.
        rig.set_desc(1, 0xFFFF_FFFF_FFFF_F000, 4096, DESC_NEXT | DESC_WRITE, 2);
        assert_eq!(rig.submit(0), WriteEffect::Served(1));
        assert_eq!(rig.status_byte(), request::S_IOERR);
        // A length that is not whole sectors.
        rig.set_desc(1, 0x20000, 100, DESC_NEXT | DESC_WRITE, 2);
        assert_eq!(rig.submit(0), WriteEffect::Served(1));
        assert_eq!(rig.status_byte(), request::S_IOERR);
        // Oversized: one segment over the limit.
        rig.set_desc(1, 0x20000, SEGMENT_MAX * SEGMENTS_MAX + 512, DESC_NEXT | DESC_WRITE, 2);
        assert_eq!(rig.submit(0), WriteEffect::Served(1));
        assert_eq!(rig.status_byte(), request::S_IOERR);
        assert_eq!(rig.dev.broken(), None);
    }

    #[test]
    fn malformed_rings_break_the_device_and_it_stays_quiet() {
        // A loop: 0 -> 1 -> 0.
        let mut rig = Rig::new();
        rig.header(0x10000, request::IN, 0);
        rig.set_desc(0, 0x10000, 16, DESC_NEXT, 1);
        rig.set_desc(1, 0x20000, 512, DESC_NEXT | DESC_WRITE, 0);
        assert_eq!(rig.submit(0), WriteEffect::Broke(Broken::ChainLoop));
        assert_ne!(rig.dev.read(reg::STATUS, 4) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rig.dev.read(reg::INTERRUPT_STATUS, 4), INT_CONFIG);
        assert_eq!(rig.used_idx(), 0);
        // Broken: a good request is not served until a reset.
        assert_eq!(rig.rw(request::OUT, 0, 512), WriteEffect::None);

        // A next index past the queue.
        let mut rig = Rig::new();
        rig.set_desc(0, 0x10000, 16, DESC_NEXT, NUM);
        assert_eq!(rig.submit(0), WriteEffect::Broke(Broken::IndexOutOfRange));
        // A head index past the queue.
        let mut rig = Rig::new();
        assert_eq!(rig.submit(u16::MAX), WriteEffect::Broke(Broken::IndexOutOfRange));
        // The descriptor table outside RAM.
        let mut rig = Rig::new();
        rig.w(reg::QUEUE_READY, 0);
        rig.w(reg::QUEUE_DESC_LOW, 0xFFFF_F000);
        rig.w(reg::QUEUE_DESC_HIGH, 0xFFFF_FFFF);
        rig.w(reg::QUEUE_READY, 1);
        assert_eq!(rig.submit(0), WriteEffect::Broke(Broken::RingOutsideRam));
        // The avail ring outside RAM.
        let mut rig = Rig::new();
        rig.w(reg::QUEUE_READY, 0);
        rig.w(reg::QUEUE_DRIVER_LOW, 0x10_0000);
        rig.w(reg::QUEUE_READY, 1);
        assert_eq!(rig.w(reg::QUEUE_NOTIFY, 0), WriteEffect::Broke(Broken::RingOutsideRam));
        // The used ring outside RAM.
        let mut rig = Rig::new();
        rig.w(reg::QUEUE_READY, 0);
        rig.w(reg::QUEUE_DEVICE_LOW, 0xFFFF_FFF0);
        rig.w(reg::QUEUE_READY, 1);
        assert_eq!(rig.rw(request::FLUSH, 0, 512), WriteEffect::Broke(Broken::UsedOutsideRam));
        // The avail index far ahead.
        let mut rig = Rig::new();
        rig.put(AVAIL + 2, &1000u16.to_le_bytes());
        assert_eq!(rig.w(reg::QUEUE_NOTIFY, 0), WriteEffect::Broke(Broken::AvailRunaway));
        // A queue size above the maximum.
        let mut rig = Rig::new();
        rig.w(reg::QUEUE_READY, 0);
        rig.w(reg::QUEUE_NUM, 4096);
        rig.w(reg::QUEUE_READY, 1);
        assert_eq!(rig.rw(request::OUT, 0, 512), WriteEffect::Broke(Broken::QueueNotReady));
        // No status descriptor (a header alone).
        let mut rig = Rig::new();
        rig.set_desc(0, 0x10000, 16, 0, 0);
        assert_eq!(rig.submit(0), WriteEffect::Broke(Broken::NoStatus));
        // A read-only status byte.
        let mut rig = Rig::new();
        rig.set_desc(0, 0x10000, 16, DESC_NEXT, 1);
        rig.set_desc(1, 0x30000, 1, 0, 0);
        assert_eq!(rig.submit(0), WriteEffect::Broke(Broken::NoStatus));
    }

    #[test]
    fn reset_recovers_a_broken_device() {
        let mut rig = Rig::new();
        assert_eq!(rig.submit(NUM), WriteEffect::Broke(Broken::IndexOutOfRange));
        rig.w(reg::STATUS, 0);
        assert_eq!(rig.dev.broken(), None);
        assert_eq!(rig.dev.read(reg::STATUS, 4), 0);
        assert!(!rig.dev.irq_level());
    }

    /// Every ring the bytes of a small generator make is refused or served without a
    /// panic, and no backend access falls outside the capacity.
    #[test]
    fn random_rings_never_panic() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut rig = Rig::new();
            for i in 0..NUM {
                let r = next();
                let addr = match r % 4 {
                    0 => 0x10000,
                    1 => 0x20000 + (r >> 8) % 0x1000,
                    2 => r,
                    _ => 0xFFFF_0000,
                };
                rig.set_desc(i, addr, (next() % 70_000) as u32, (next() % 8) as u16, (next() % 10) as u16);
            }
            let kind = [request::IN, request::OUT, request::FLUSH, request::GET_ID, 7][(next() % 5) as usize];
            rig.header(0x10000, kind, next() % 200);
            for _ in 0..3 {
                let _ = rig.submit((next() % 10) as u16);
            }
        }
    }
}
