//! The ATA PIO driver: polls the task-file registers of the legacy IDE channels (primary
//! 0x1F0/0x3F6, secondary 0x170/0x376) with interrupts off at the device (nIEN). The
//! protocol (what to write, what the status means, IDENTIFY) is `nk_storage::ata`; this
//! file only moves its bytes through the ports (ATA8-APT §5, ACS §7; the PIO data-in and
//! data-out protocols of ATA8-APT §11.5-11.6).
//!
//! Every wait is bounded: a device that never clears BSY or never raises DRQ makes the
//! command fail with `DiskError::Timeout`, never a hang.

use nk_storage::ata::{self, command, control, register, DeviceState, Direction, Drive, Identity, Signature, Status};
use nk_storage::{DiskError, SectorDisk, SECTOR_SIZE};

use crate::arch::port::{inb, inw, outb, read_dwords, read_words, write_dwords, write_words};

/// A legacy IDE channel's ports.
#[derive(Clone, Copy, Debug)]
pub struct Channel {
    /// `ata0` or `ata1`, as Bochs names them.
    pub name: &'static str,
    /// The command block's first port.
    base: u16,
    /// The control block's Device Control / Alternate Status port.
    control: u16,
}

impl Channel {
    fn status(&self) -> Status {
        Status(inb(self.base + register::STATUS))
    }

    /// Polls until BSY is clear; returns the status then.
    fn wait_not_busy(&self) -> Result<Status, DiskError> {
        for _ in 0..POLL_LIMIT {
            let status = self.status();
            if status.state() != DeviceState::Busy {
                return Ok(status);
            }
        }
        Err(DiskError::Timeout)
    }

    /// Polls until the device asks for a data block (DRQ), or fails.
    fn wait_data_request(&self) -> Result<(), DiskError> {
        match self.wait_not_busy()?.state() {
            DeviceState::DataRequest => Ok(()),
            DeviceState::Failed => Err(self.device_error()),
            // Neither BSY nor DRQ: the device dropped the command.
            DeviceState::Ready | DeviceState::Busy => Err(DiskError::Timeout),
        }
    }

    /// Polls until the command completes (no BSY, no DRQ) without error.
    fn wait_complete(&self) -> Result<(), DiskError> {
        match self.wait_not_busy()?.state() {
            DeviceState::Ready => Ok(()),
            DeviceState::Failed => Err(self.device_error()),
            DeviceState::DataRequest | DeviceState::Busy => Err(DiskError::Timeout),
        }
    }

    fn device_error(&self) -> DiskError {
        DiskError::DeviceError(inb(self.base + register::ERROR))
    }

    /// Waits the 400 ns a device may take to put a valid status after a select or a
    /// command (ATA8-APT §11.2): four reads of the Alternate Status register.
    fn settle(&self) {
        for _ in 0..4 {
            inb(self.control);
        }
    }
}

/// The two legacy channels, at the ports every PC-compatible IDE controller decodes.
pub const CHANNELS: [Channel; 2] =
    [Channel { name: "ata0", base: 0x1F0, control: 0x3F6 }, Channel { name: "ata1", base: 0x170, control: 0x376 }];

/// Status reads before a wait gives up. Bochs answers at once; a real disk spinning up
/// may need seconds, which this many port reads (about 1 µs each) roughly covers.
const POLL_LIMIT: u32 = 4_000_000;

/// Why a channel position holds no usable disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// Nothing answers there.
    NoDevice,
    /// A packet device (CD-ROM) or something else that is not a disk.
    NotADisk(Signature),
    /// IDENTIFY DEVICE data that cannot be used.
    Identify(ata::IdentifyError),
    /// The device did not complete IDENTIFY DEVICE.
    Disk(DiskError),
}

impl core::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProbeError::NoDevice => f.write_str("no device"),
            ProbeError::NotADisk(Signature::Atapi) => f.write_str("a packet device (CD-ROM)"),
            ProbeError::NotADisk(signature) => write!(f, "not a disk ({signature:?})"),
            ProbeError::Identify(why) => write!(f, "IDENTIFY: {why}"),
            ProbeError::Disk(why) => write!(f, "IDENTIFY: {why}"),
        }
    }
}

/// An ATA disk found by [`AtaDisk::probe`], addressed by LBA.
#[derive(Debug)]
pub struct AtaDisk {
    channel: Channel,
    drive: Drive,
    identity: Identity,
    /// Sector writes completed since boot.
    writes: u64,
    /// Called after each completed sector write with the count so far (crash injection).
    after_write: fn(u64),
}

impl AtaDisk {
    /// Looks for an ATA disk at `drive` of `channel` with IDENTIFY DEVICE (ACS §7.16).
    pub fn probe(channel: Channel, drive: Drive, after_write: fn(u64)) -> Result<AtaDisk, ProbeError> {
        if channel.status().0 == 0xFF {
            return Err(ProbeError::NoDevice); // floating bus: no controller or no drives
        }
        outb(channel.control, control::INTERRUPTS_OFF);
        outb(channel.base + register::DEVICE, drive.select());
        channel.settle();
        if channel.status().no_device() {
            return Err(ProbeError::NoDevice);
        }
        for offset in [register::SECTOR_COUNT, register::LBA_LOW, register::LBA_MID, register::LBA_HIGH] {
            outb(channel.base + offset, 0);
        }
        outb(channel.base + register::COMMAND, command::IDENTIFY_DEVICE);
        channel.settle();
        if channel.status().no_device() {
            return Err(ProbeError::NoDevice);
        }
        let signature = |channel: &Channel| {
            Signature::decode(inb(channel.base + register::LBA_MID), inb(channel.base + register::LBA_HIGH))
        };
        match channel.wait_not_busy().map_err(ProbeError::Disk)?.state() {
            DeviceState::DataRequest => {}
            DeviceState::Failed | DeviceState::Ready => {
                return Err(match signature(&channel) {
                    Signature::Ata => ProbeError::Disk(DiskError::DeviceError(inb(channel.base + register::ERROR))),
                    other => ProbeError::NotADisk(other),
                })
            }
            DeviceState::Busy => return Err(ProbeError::Disk(DiskError::Timeout)),
        }
        if signature(&channel) != Signature::Ata {
            return Err(ProbeError::NotADisk(signature(&channel)));
        }
        let mut words = [0u16; 256];
        for word in &mut words {
            *word = inw(channel.base + register::DATA);
        }
        let identity = Identity::parse(&words).map_err(ProbeError::Identify)?;
        Ok(AtaDisk { channel, drive, identity, writes: 0, after_write })
    }

    /// Names the disk's position as Bochs's configuration does (`ata0-slave`).
    pub fn position(&self) -> (&'static str, &'static str) {
        (self.channel.name, self.drive.name())
    }

    /// Returns what IDENTIFY DEVICE said.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Selects the drive and writes a task file, the command last (ATA8-APT §11.2: the
    /// host waits for BSY and DRQ clear before writing the registers).
    fn issue(&self, file: &ata::TaskFile) -> Result<(), DiskError> {
        self.channel.wait_not_busy()?;
        outb(self.channel.base + register::DEVICE, self.drive.select());
        self.channel.settle();
        self.channel.wait_not_busy()?;
        for &(offset, value) in file.writes() {
            outb(self.channel.base + offset, value);
        }
        self.channel.settle();
        Ok(())
    }

    /// Moves one sector from the data register (32-bit accesses where the device takes them).
    fn read_data(&self, sector: &mut [u8]) {
        if self.identity.dword_io {
            read_dwords(self.channel.base + register::DATA, sector);
        } else {
            read_words(self.channel.base + register::DATA, sector);
        }
    }

    /// Moves one sector to the data register (32-bit accesses where the device takes them).
    fn write_data(&self, sector: &[u8]) {
        if self.identity.dword_io {
            write_dwords(self.channel.base + register::DATA, sector);
        } else {
            write_words(self.channel.base + register::DATA, sector);
        }
    }

    fn check_range(&self, lba: u64, count: u64) -> Result<(), DiskError> {
        match lba.checked_add(count) {
            Some(end) if end <= self.identity.sectors => Ok(()),
            _ => Err(DiskError::OutOfRange),
        }
    }
}

impl SectorDisk for AtaDisk {
    fn sectors(&self) -> u64 {
        self.identity.sectors
    }

    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if !buf.len().is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadLength);
        }
        self.check_range(lba, (buf.len() / SECTOR_SIZE) as u64)?;
        let per_command = ata::LBA28_MAX_SECTORS as usize * SECTOR_SIZE;
        for (index, chunk) in buf.chunks_mut(per_command).enumerate() {
            let first = lba + (index * ata::LBA28_MAX_SECTORS as usize) as u64;
            let count = (chunk.len() / SECTOR_SIZE) as u32;
            self.issue(&ata::transfer(self.drive, Direction::Read, first, count, self.identity.lba48)?)?;
            for sector in chunk.chunks_exact_mut(SECTOR_SIZE) {
                self.channel.wait_data_request()?;
                self.read_data(sector);
            }
            self.channel.wait_complete()?;
        }
        Ok(())
    }

    fn write_sector(&mut self, lba: u64, data: &[u8; SECTOR_SIZE]) -> Result<(), DiskError> {
        self.write_sectors(lba, data)
    }

    /// One WRITE SECTORS command per 256 sectors (PIO data-out, ATA8-APT §11.6: a DRQ
    /// block of one sector at a time). The device takes each sector whole as its block
    /// ends, so a power cut keeps every sector old or new, the earlier ones first, as
    /// separate commands would; `after_write` still runs after each sector.
    fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<(), DiskError> {
        if data.is_empty() || !data.len().is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadLength);
        }
        self.check_range(lba, (data.len() / SECTOR_SIZE) as u64)?;
        let per_command = ata::LBA28_MAX_SECTORS as usize * SECTOR_SIZE;
        for (index, chunk) in data.chunks(per_command).enumerate() {
            let first = lba + (index * ata::LBA28_MAX_SECTORS as usize) as u64;
            let count = (chunk.len() / SECTOR_SIZE) as u32;
            self.issue(&ata::transfer(self.drive, Direction::Write, first, count, self.identity.lba48)?)?;
            let last = chunk.len() / SECTOR_SIZE - 1;
            for (i, sector) in chunk.chunks_exact(SECTOR_SIZE).enumerate() {
                self.channel.wait_data_request()?;
                self.write_data(sector);
                if i == last {
                    // The last sector ends the command: wait for its completion.
                    self.channel.wait_complete()?;
                }
                self.writes += 1;
                (self.after_write)(self.writes);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        let Some(flush) = self.identity.flush_command() else {
            return Ok(()); // no write cache to flush: a completed write is on the medium
        };
        self.issue(&ata::simple(self.drive, flush))?;
        self.channel.wait_complete()
    }
}
