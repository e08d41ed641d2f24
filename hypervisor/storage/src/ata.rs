//! The ATA PIO protocol as a driver speaks it, without the port I/O: which registers to
//! write for a command, what a status byte means, and what IDENTIFY DEVICE says. The
//! register set and commands are those of ATA/ATAPI-8 ACS (T13/1699-D) §7 and ATA8-APT
//! (parallel transport) §5; the hypervisor's driver (hypervisor/src/storage/ata.rs) only
//! moves these bytes through the ports.

use crate::DiskError;

/// Offsets of the command-block registers from a channel's base port (ATA8-APT §5.2).
pub mod register {
    /// Data (16-bit PIO transfers).
    pub const DATA: u16 = 0;
    /// Error (read) / Features (write).
    pub const ERROR: u16 = 1;
    /// Features (write).
    pub const FEATURES: u16 = 1;
    /// Sector count.
    pub const SECTOR_COUNT: u16 = 2;
    /// LBA bits 7:0 (and 31:24 with HOB in LBA48).
    pub const LBA_LOW: u16 = 3;
    /// LBA bits 15:8 (and 39:32); the device signature's low byte.
    pub const LBA_MID: u16 = 4;
    /// LBA bits 23:16 (and 47:40); the device signature's high byte.
    pub const LBA_HIGH: u16 = 5;
    /// Device: drive select, LBA mode, LBA28 bits 27:24.
    pub const DEVICE: u16 = 6;
    /// Status (read) / Command (write).
    pub const STATUS: u16 = 7;
    /// Command (write).
    pub const COMMAND: u16 = 7;
}

/// Command codes (ACS §7).
pub mod command {
    /// IDENTIFY DEVICE (ACS §7.16): 256 words describing an ATA device; ATAPI aborts it.
    pub const IDENTIFY_DEVICE: u8 = 0xEC;
    /// READ SECTORS, LBA28 (ACS §7.28).
    pub const READ_SECTORS: u8 = 0x20;
    /// READ SECTORS EXT, LBA48 (ACS §7.29).
    pub const READ_SECTORS_EXT: u8 = 0x24;
    /// WRITE SECTORS, LBA28 (ACS §7.60).
    pub const WRITE_SECTORS: u8 = 0x30;
    /// WRITE SECTORS EXT, LBA48 (ACS §7.61).
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    /// FLUSH CACHE (ACS §7.10): returns once the volatile write cache is on the medium.
    pub const FLUSH_CACHE: u8 = 0xE7;
    /// FLUSH CACHE EXT (ACS §7.11).
    pub const FLUSH_CACHE_EXT: u8 = 0xEA;
}

/// Device Control register bits (control block, ATA8-APT §5.2.5).
pub mod control {
    /// nIEN: the device asserts no interrupt (the driver polls).
    pub const INTERRUPTS_OFF: u8 = 0x02;
}

/// Which device on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drive {
    /// Device 0.
    Master,
    /// Device 1.
    Slave,
}

impl Drive {
    /// Returns the Device register value that selects this drive in LBA mode (bits 7 and 5
    /// obsolete, set as older devices expect; bit 6 LBA; bit 4 DEV).
    pub const fn select(self) -> u8 {
        match self {
            Drive::Master => 0xE0,
            Drive::Slave => 0xF0,
        }
    }

    /// Names the drive as Bochs's configuration does (`ata0-slave`).
    pub const fn name(self) -> &'static str {
        match self {
            Drive::Master => "master",
            Drive::Slave => "slave",
        }
    }
}

/// A Status (or Alternate Status) register value (ATA8-APT §5.2.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u8);

impl Status {
    /// ERR: the command failed; the Error register says why.
    pub const ERR: u8 = 0x01;
    /// DRQ: the device is ready to transfer a block of data.
    pub const DRQ: u8 = 0x08;
    /// DF: device fault.
    pub const DF: u8 = 0x20;
    /// DRDY: the device accepts commands.
    pub const DRDY: u8 = 0x40;
    /// BSY: the device owns the registers; every other bit is meaningless.
    pub const BSY: u8 = 0x80;

    /// Tells whether nothing drives the bus (no device: pulled-up lines read 0xFF), or the
    /// selected device is absent (0x00 after a command).
    pub const fn no_device(self) -> bool {
        self.0 == 0xFF || self.0 == 0x00
    }

    /// Decodes what the driver should do next.
    pub const fn state(self) -> DeviceState {
        if self.0 & Self::BSY != 0 {
            DeviceState::Busy
        } else if self.0 & (Self::ERR | Self::DF) != 0 {
            DeviceState::Failed
        } else if self.0 & Self::DRQ != 0 {
            DeviceState::DataRequest
        } else {
            DeviceState::Ready
        }
    }
}

/// What a status byte says about the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// BSY: keep polling.
    Busy,
    /// ERR or DF: the command ended in error.
    Failed,
    /// DRQ: a 256-word block is ready to be read or written.
    DataRequest,
    /// Neither BSY nor DRQ: the command has completed.
    Ready,
}

/// What the signature in LBA mid/high says after a reset or an aborted IDENTIFY DEVICE
/// (ATA8-APT §9.12, ACS Table 206).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signature {
    /// A (parallel or serial) ATA device: a disk.
    Ata,
    /// A packet (ATAPI) device, e.g. a CD-ROM: not usable as a disk here.
    Atapi,
    /// Anything else.
    Unknown(u8, u8),
}

impl Signature {
    /// Decodes the LBA mid and LBA high registers.
    pub const fn decode(lba_mid: u8, lba_high: u8) -> Signature {
        match (lba_mid, lba_high) {
            (0x00, 0x00) | (0x3C, 0xC3) => Signature::Ata,
            (0x14, 0xEB) | (0x69, 0x96) => Signature::Atapi,
            (mid, high) => Signature::Unknown(mid, high),
        }
    }
}

/// Which way data moves in a sector transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// The register writes that issue one command, in order, after the drive is selected.
/// The last write is always the command register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskFile {
    writes: [(u16, u8); 11],
    len: usize,
}

impl TaskFile {
    fn new() -> Self {
        TaskFile { writes: [(0, 0); 11], len: 0 }
    }

    fn push(&mut self, register: u16, value: u8) {
        if let Some(slot) = self.writes.get_mut(self.len) {
            *slot = (register, value);
            self.len += 1;
        }
    }

    /// Returns the (register offset, value) writes, the command last.
    pub fn writes(&self) -> &[(u16, u8)] {
        &self.writes[..self.len]
    }

    /// Returns the command byte this task file issues.
    pub fn command(&self) -> u8 {
        self.writes().last().map_or(0, |&(_, value)| value)
    }
}

/// The most sectors one LBA28 command moves (a count of 0 means 256).
pub const LBA28_MAX_SECTORS: u32 = 256;
/// The most sectors one LBA48 command moves (a count of 0 means 65536).
pub const LBA48_MAX_SECTORS: u32 = 65536;
/// The sectors LBA28 can address.
pub const LBA28_LIMIT: u64 = 1 << 28;
/// The sectors LBA48 can address.
pub const LBA48_LIMIT: u64 = 1 << 48;

/// Encodes a READ SECTORS / WRITE SECTORS of `count` sectors at `lba` for `drive`: LBA28
/// when it reaches, else LBA48 if the device has it (ACS §7.28-7.29, §7.60-7.61; for
/// LBA48 each register is written twice, the high-order byte first, ATA8-APT §5.2).
pub fn transfer(drive: Drive, direction: Direction, lba: u64, count: u32, lba48: bool) -> Result<TaskFile, DiskError> {
    let end = lba.checked_add(u64::from(count)).ok_or(DiskError::OutOfRange)?;
    if count == 0 {
        return Err(DiskError::BadLength);
    }
    let mut file = TaskFile::new();
    if end <= LBA28_LIMIT && count <= LBA28_MAX_SECTORS {
        let command = match direction {
            Direction::Read => command::READ_SECTORS,
            Direction::Write => command::WRITE_SECTORS,
        };
        file.push(register::DEVICE, drive.select() | ((lba >> 24) as u8 & 0x0F));
        file.push(register::SECTOR_COUNT, count as u8); // 256 wraps to 0, which means 256
        file.push(register::LBA_LOW, lba as u8);
        file.push(register::LBA_MID, (lba >> 8) as u8);
        file.push(register::LBA_HIGH, (lba >> 16) as u8);
        file.push(register::COMMAND, command);
        return Ok(file);
    }
    if !lba48 || end > LBA48_LIMIT || count > LBA48_MAX_SECTORS {
        return Err(DiskError::OutOfRange);
    }
    let command = match direction {
        Direction::Read => command::READ_SECTORS_EXT,
        Direction::Write => command::WRITE_SECTORS_EXT,
    };
    file.push(register::DEVICE, drive.select());
    file.push(register::SECTOR_COUNT, (count >> 8) as u8); // 65536 wraps to 0, which means 65536
    file.push(register::SECTOR_COUNT, count as u8);
    file.push(register::LBA_LOW, (lba >> 24) as u8);
    file.push(register::LBA_LOW, lba as u8);
    file.push(register::LBA_MID, (lba >> 32) as u8);
    file.push(register::LBA_MID, (lba >> 8) as u8);
    file.push(register::LBA_HIGH, (lba >> 40) as u8);
    file.push(register::LBA_HIGH, (lba >> 16) as u8);
    file.push(register::COMMAND, command);
    Ok(file)
}

/// Encodes a command without data or address (IDENTIFY DEVICE, FLUSH CACHE [EXT]).
pub fn simple(drive: Drive, command: u8) -> TaskFile {
    let mut file = TaskFile::new();
    file.push(register::DEVICE, drive.select());
    file.push(register::COMMAND, command);
    file
}

/// What IDENTIFY DEVICE says about a disk (ACS §7.16.7, Table 45).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Addressable sectors (LBA48 count when supported, else the LBA28 one).
    pub sectors: u64,
    /// The 48-bit address feature set is supported (word 83 bit 10).
    pub lba48: bool,
    /// FLUSH CACHE is supported (word 83 bit 12); without it, a completed write is on the
    /// medium.
    pub flush_cache: bool,
    /// FLUSH CACHE EXT is supported (word 83 bit 13).
    pub flush_cache_ext: bool,
    /// The data register takes 32-bit accesses (word 48 = 1, ATA-1's "can perform
    /// doubleword I/O"; since ATA-8 word 48 holds the trusted-computing bits, valid only
    /// with bit 14 set, so a 1 there still means the old flag): PIO then moves a sector in
    /// 128 double-word accesses instead of 256 word accesses.
    pub dword_io: bool,
    /// The model number, words 27-46 (two ASCII characters a word, the first in the high
    /// byte), trailing spaces kept out.
    model: [u8; 40],
}

/// Why an IDENTIFY DEVICE answer cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentifyError {
    /// Word 0 bit 15 is set: not an ATA device.
    NotAta,
    /// Word 49 bit 9 is clear: no LBA addressing (CHS only).
    NoLba,
    /// Word 106 says logical sectors are longer than 512 bytes.
    LargeSectors,
    /// The device reports no sectors.
    Empty,
}

impl core::fmt::Display for IdentifyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            IdentifyError::NotAta => "not an ATA device (IDENTIFY word 0 bit 15)",
            IdentifyError::NoLba => "no LBA addressing (IDENTIFY word 49 bit 9)",
            IdentifyError::LargeSectors => "logical sectors larger than 512 bytes (IDENTIFY word 106)",
            IdentifyError::Empty => "no addressable sectors",
        })
    }
}

impl Identity {
    /// Parses the 256 words of IDENTIFY DEVICE data.
    pub fn parse(words: &[u16; 256]) -> Result<Identity, IdentifyError> {
        if words[0] & 0x8000 != 0 {
            return Err(IdentifyError::NotAta);
        }
        if words[49] & (1 << 9) == 0 {
            return Err(IdentifyError::NoLba);
        }
        // Word 106 is valid when bit 14 is set and bit 15 clear; bit 12: long sectors.
        if words[106] & 0xC000 == 0x4000 && words[106] & (1 << 12) != 0 {
            return Err(IdentifyError::LargeSectors);
        }
        // Words 82-83 are valid unless they read 0 or 0xFFFF (ACS §7.16.7.39).
        let features = if words[83] == 0xFFFF { 0 } else { words[83] };
        let lba48 = features & (1 << 10) != 0;
        let lba28_sectors = u64::from(words[60]) | u64::from(words[61]) << 16;
        let lba48_sectors = (0..4).fold(0u64, |acc, i| acc | u64::from(words[100 + i]) << (16 * i));
        let sectors = if lba48 && lba48_sectors > 0 { lba48_sectors } else { lba28_sectors };
        if sectors == 0 {
            return Err(IdentifyError::Empty);
        }
        let mut model = [0u8; 40];
        for (i, word) in words[27..47].iter().enumerate() {
            model[2 * i] = (word >> 8) as u8;
            model[2 * i + 1] = *word as u8;
        }
        Ok(Identity {
            sectors,
            lba48,
            flush_cache: features & (1 << 12) != 0,
            flush_cache_ext: features & (1 << 13) != 0,
            dword_io: words[48] == 1,
            model,
        })
    }

    /// Returns the model number, printable ASCII without trailing spaces ("?" for others).
    pub fn model(&self) -> &str {
        let end = self.model.iter().rposition(|b| *b != b' ' && *b != 0).map_or(0, |i| i + 1);
        let text = &self.model[..end];
        if text.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            core::str::from_utf8(text).unwrap_or("?")
        } else {
            "?"
        }
    }

    /// Returns the command that empties the write cache, if the device has one (EXT when
    /// the disk is addressed beyond LBA28).
    pub fn flush_command(&self) -> Option<u8> {
        if self.flush_cache_ext && self.sectors > LBA28_LIMIT {
            Some(command::FLUSH_CACHE_EXT)
        } else if self.flush_cache {
            Some(command::FLUSH_CACHE)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IDENTIFY data shaped like Bochs 2.7's for a flat disk of `sectors` (harddrv.cc
    /// identify_drive: words 49, 60-61, 83, 100-103, model "Generic 1234").
    fn bochs_identify(sectors: u64) -> [u16; 256] {
        let mut words = [0u16; 256];
        words[0] = 0x0040;
        let model = b"Generic 1234                            ";
        for i in 0..20 {
            words[27 + i] = u16::from(model[2 * i]) << 8 | u16::from(model[2 * i + 1]);
        }
        words[48] = 1;
        words[49] = 1 << 9 | 1 << 8;
        words[60] = sectors as u16;
        words[61] = (sectors >> 16) as u16;
        words[83] = 1 << 14 | 1 << 13 | 1 << 12 | 1 << 10;
        for i in 0..4 {
            words[100 + i] = (sectors >> (16 * i)) as u16;
        }
        words
    }

    #[test]
    fn identify_reads_size_features_and_model() {
        let identity = Identity::parse(&bochs_identify(32768)).expect("a disk");
        assert_eq!(identity.sectors, 32768);
        assert!(identity.lba48 && identity.flush_cache && identity.flush_cache_ext && identity.dword_io);
        assert_eq!(identity.model(), "Generic 1234");
        assert_eq!(identity.flush_command(), Some(command::FLUSH_CACHE));
    }

    #[test]
    fn identify_refuses_what_is_not_an_lba_disk() {
        let mut atapi = bochs_identify(100);
        atapi[0] = 0x85C0;
        assert_eq!(Identity::parse(&atapi), Err(IdentifyError::NotAta));
        let mut chs = bochs_identify(100);
        chs[49] = 0;
        assert_eq!(Identity::parse(&chs), Err(IdentifyError::NoLba));
        let mut big = bochs_identify(100);
        big[106] = 0x4000 | 1 << 12;
        assert_eq!(Identity::parse(&big), Err(IdentifyError::LargeSectors));
        assert_eq!(Identity::parse(&bochs_identify(0)), Err(IdentifyError::Empty));
    }

    #[test]
    fn identify_without_lba48_uses_the_lba28_count() {
        let mut words = bochs_identify(5000);
        words[83] = 0;
        words[100] = 0xFFFF;
        words[48] = 0x4001; // the trusted-computing word (bit 14): not the old dword flag
        let identity = Identity::parse(&words).expect("a disk");
        assert_eq!((identity.sectors, identity.lba48, identity.flush_command()), (5000, false, None));
        assert!(!identity.dword_io);
    }

    #[test]
    fn lba28_transfer_writes_the_registers_in_order() {
        let file = transfer(Drive::Slave, Direction::Write, 0x0123_4567, 1, true).expect("fits");
        assert_eq!(
            file.writes(),
            &[
                (register::DEVICE, 0xF1),
                (register::SECTOR_COUNT, 1),
                (register::LBA_LOW, 0x67),
                (register::LBA_MID, 0x45),
                (register::LBA_HIGH, 0x23),
                (register::COMMAND, command::WRITE_SECTORS),
            ]
        );
        let whole = transfer(Drive::Master, Direction::Read, 0, 256, false).expect("fits");
        assert_eq!(whole.writes()[0], (register::DEVICE, 0xE0));
        assert_eq!(whole.writes()[1], (register::SECTOR_COUNT, 0), "256 sectors is written as 0");
        assert_eq!(whole.command(), command::READ_SECTORS);
    }

    #[test]
    fn lba48_transfer_writes_high_bytes_first() {
        let file = transfer(Drive::Master, Direction::Read, 0x0000_0A0B_0C0D_0E0F, 2, true).expect("fits");
        assert_eq!(
            file.writes(),
            &[
                (register::DEVICE, 0xE0),
                (register::SECTOR_COUNT, 0),
                (register::SECTOR_COUNT, 2),
                (register::LBA_LOW, 0x0C),
                (register::LBA_LOW, 0x0F),
                (register::LBA_MID, 0x0B),
                (register::LBA_MID, 0x0E),
                (register::LBA_HIGH, 0x0A),
                (register::LBA_HIGH, 0x0D),
                (register::COMMAND, command::READ_SECTORS_EXT),
            ]
        );
        // 257 sectors do not fit LBA28's count.
        assert_eq!(
            transfer(Drive::Master, Direction::Write, 0, 257, true).map(|f| f.command()),
            Ok(command::WRITE_SECTORS_EXT)
        );
    }

    #[test]
    fn transfers_out_of_reach_are_refused() {
        assert_eq!(transfer(Drive::Master, Direction::Read, LBA28_LIMIT, 1, false), Err(DiskError::OutOfRange));
        assert_eq!(transfer(Drive::Master, Direction::Read, LBA48_LIMIT, 1, true), Err(DiskError::OutOfRange));
        assert_eq!(transfer(Drive::Master, Direction::Read, u64::MAX, 2, true), Err(DiskError::OutOfRange));
        assert_eq!(transfer(Drive::Master, Direction::Read, 0, 0, true), Err(DiskError::BadLength));
        assert_eq!(transfer(Drive::Master, Direction::Read, 0, 65537, true), Err(DiskError::OutOfRange));
    }

    #[test]
    fn status_decodes_to_the_next_step() {
        assert_eq!(Status(0xD0).state(), DeviceState::Busy, "BSY hides every other bit");
        assert_eq!(Status(0x51).state(), DeviceState::Failed);
        assert_eq!(Status(0x70).state(), DeviceState::Failed, "DF");
        assert_eq!(Status(0x58).state(), DeviceState::DataRequest);
        assert_eq!(Status(0x50).state(), DeviceState::Ready);
        assert!(Status(0xFF).no_device() && Status(0).no_device() && !Status(0x50).no_device());
    }

    #[test]
    fn signatures_tell_disks_from_cd_roms() {
        assert_eq!(Signature::decode(0, 0), Signature::Ata);
        assert_eq!(Signature::decode(0x14, 0xEB), Signature::Atapi);
        assert_eq!(Signature::decode(0x12, 0x34), Signature::Unknown(0x12, 0x34));
    }

    #[test]
    fn simple_commands_select_then_command() {
        let file = simple(Drive::Slave, command::FLUSH_CACHE);
        assert_eq!(file.writes(), &[(register::DEVICE, 0xF0), (register::COMMAND, 0xE7)]);
    }
}
