//! The dynamic disk header (`cxsparse`, 1024 bytes, big-endian), found at
//! the footer's data offset of dynamic and differencing disks.
//!
//! | offset | size | field                                  |
//! |-------:|-----:|----------------------------------------|
//! |      0 |    8 | cookie `cxsparse`                      |
//! |      8 |    8 | data offset (unused, all ones)         |
//! |     16 |    8 | table offset (the BAT)                 |
//! |     24 |    4 | header version 1.0                     |
//! |     28 |    4 | max table entries                      |
//! |     32 |    4 | block size                             |
//! |     36 |    4 | checksum                               |
//! |     40 |   16 | parent unique id                       |
//! |     56 |    4 | parent time stamp                      |
//! |     60 |    4 | reserved                               |
//! |     64 |  512 | parent name, UTF-16 big-endian         |
//! |    576 |  192 | 8 parent locator entries of 24 bytes   |
//! |    768 |  256 | reserved                               |
//!
//! A parent locator entry: platform code (4), platform data space (4, in
//! sectors by the specification; some writers store bytes), platform data
//! length (4, bytes), reserved (4), platform data offset (8). Windows
//! locators: `W2ku` (absolute path) and `W2ru` (relative path), UTF-16LE.

use crate::footer::checksum;
use crate::{be32, be64};

/// Size of the dynamic header.
pub const HEADER_SIZE: usize = 1024;
/// The header's cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0.
pub const VERSION: u32 = 0x0001_0000;
/// Byte range of the checksum field.
pub const CHECKSUM_RANGE: std::ops::Range<usize> = 36..40;
/// Default block size (what Hyper-V and qemu-img use).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Number of parent locator entries.
pub const LOCATORS: usize = 8;
/// Bytes of the parent name field.
pub const PARENT_NAME_SIZE: usize = 512;
/// Platform code of an absolute Windows path locator.
pub const W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// Platform code of a relative Windows path locator.
pub const W2RU: u32 = u32::from_be_bytes(*b"W2ru");

const OFF_DATA_OFFSET: usize = 8;
const OFF_TABLE_OFFSET: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_MAX_ENTRIES: usize = 28;
const OFF_BLOCK_SIZE: usize = 32;
const OFF_PARENT_ID: usize = 40;
const OFF_PARENT_TS: usize = 56;
const OFF_PARENT_NAME: usize = 64;
const OFF_LOCATORS: usize = 576;
const LOCATOR_SIZE: usize = 24;

/// One parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Locator {
    /// Platform code (`W2ku`, `W2ru`, or 0 for an empty entry).
    pub code: u32,
    /// Space reserved for the data (sectors, or bytes for some writers).
    pub data_space: u32,
    /// Length of the data in bytes.
    pub data_len: u32,
    /// Offset of the data in the file.
    pub data_offset: u64,
}

impl Locator {
    /// Bytes reserved for the locator's data, whichever unit the writer
    /// used: a value below one sector's worth of bytes must be sectors.
    pub fn space_bytes(&self) -> u64 {
        let s = u64::from(self.data_space);
        if s < crate::SECTOR && s * crate::SECTOR >= u64::from(self.data_len) {
            s * crate::SECTOR
        } else {
            s.max(u64::from(self.data_len))
        }
    }
}

/// A parsed dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// Offset of the block allocation table.
    pub table_offset: u64,
    /// Header version.
    pub version: u32,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes per block (a power of two, a multiple of the sector size).
    pub block_size: u32,
    /// Unique id of the parent (differencing disks).
    pub parent_unique_id: [u8; 16],
    /// Parent's time stamp when this child was made.
    pub parent_timestamp: u32,
    /// Parent's file name (UTF-16BE in the file).
    pub parent_name: String,
    /// Parent locators.
    pub locators: [Locator; LOCATORS],
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// No `cxsparse` cookie.
    Cookie,
    /// The stored checksum differs from the computed one.
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// Unknown major version.
    Version(u32),
    /// Block size not a power of two of at least one sector.
    BlockSize(u32),
    /// Fewer bytes than a header.
    Short(usize),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Cookie => write!(f, "no `cxsparse` cookie"),
            HeaderError::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum {stored:#010x} stored, {computed:#010x} computed"
                )
            }
            HeaderError::Version(v) => write!(f, "unknown header version {v:#010x}"),
            HeaderError::BlockSize(b) => {
                write!(
                    f,
                    "block size {b} is not a power of two of at least 512 bytes"
                )
            }
            HeaderError::Short(n) => write!(f, "only {n} bytes"),
        }
    }
}

impl DynHeader {
    /// A header for a new disk with `entries` BAT entries at `table_offset`.
    pub fn new(table_offset: u64, entries: u32, block_size: u32) -> DynHeader {
        DynHeader {
            table_offset,
            version: VERSION,
            max_table_entries: entries,
            block_size,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: [Locator::default(); LOCATORS],
        }
    }

    /// Parses and validates a header.
    pub fn parse(b: &[u8]) -> Result<DynHeader, HeaderError> {
        if b.len() < HEADER_SIZE {
            return Err(HeaderError::Short(b.len()));
        }
        let b = &b[..HEADER_SIZE];
        if &b[..8] != COOKIE {
            return Err(HeaderError::Cookie);
        }
        let stored = be32(b, CHECKSUM_RANGE.start);
        let computed = checksum(b, CHECKSUM_RANGE);
        if stored != computed {
            return Err(HeaderError::Checksum { stored, computed });
        }
        let version = be32(b, OFF_VERSION);
        if version >> 16 != 1 {
            return Err(HeaderError::Version(version));
        }
        let block_size = be32(b, OFF_BLOCK_SIZE);
        if !block_size.is_power_of_two() || u64::from(block_size) < crate::SECTOR {
            return Err(HeaderError::BlockSize(block_size));
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&b[OFF_PARENT_ID..OFF_PARENT_ID + 16]);
        let name_units: Vec<u16> = b[OFF_PARENT_NAME..OFF_PARENT_NAME + PARENT_NAME_SIZE]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let mut locators = [Locator::default(); LOCATORS];
        for (i, l) in locators.iter_mut().enumerate() {
            let o = OFF_LOCATORS + i * LOCATOR_SIZE;
            *l = Locator {
                code: be32(b, o),
                data_space: be32(b, o + 4),
                data_len: be32(b, o + 8),
                data_offset: be64(b, o + 16),
            };
        }
        Ok(DynHeader {
            table_offset: be64(b, OFF_TABLE_OFFSET),
            version,
            max_table_entries: be32(b, OFF_MAX_ENTRIES),
            block_size,
            parent_unique_id,
            parent_timestamp: be32(b, OFF_PARENT_TS),
            parent_name: String::from_utf16_lossy(&name_units),
            locators,
        })
    }

    /// Serialises the header with a fresh checksum. A parent name longer
    /// than the field (255 UTF-16 units) is cut.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        b[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        b[OFF_TABLE_OFFSET..OFF_TABLE_OFFSET + 8].copy_from_slice(&self.table_offset.to_be_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&self.version.to_be_bytes());
        b[OFF_MAX_ENTRIES..OFF_MAX_ENTRIES + 4]
            .copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&self.block_size.to_be_bytes());
        b[OFF_PARENT_ID..OFF_PARENT_ID + 16].copy_from_slice(&self.parent_unique_id);
        b[OFF_PARENT_TS..OFF_PARENT_TS + 4].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, u) in self
            .parent_name
            .encode_utf16()
            .take(PARENT_NAME_SIZE / 2 - 1)
            .enumerate()
        {
            let o = OFF_PARENT_NAME + 2 * i;
            b[o..o + 2].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let o = OFF_LOCATORS + i * LOCATOR_SIZE;
            b[o..o + 4].copy_from_slice(&l.code.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&l.data_space.to_be_bytes());
            b[o + 8..o + 12].copy_from_slice(&l.data_len.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let sum = checksum(&b, CHECKSUM_RANGE);
        b[CHECKSUM_RANGE].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Bytes of a block's sector bitmap on disk (one bit per sector,
    /// rounded up to whole sectors).
    pub fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size)
    }

    /// Bytes the BAT occupies on disk (whole sectors).
    pub fn bat_size(&self) -> u64 {
        (u64::from(self.max_table_entries) * 4).next_multiple_of(crate::SECTOR)
    }
}

/// Bytes of the sector bitmap of a block of `block_size` bytes.
pub fn bitmap_size(block_size: u32) -> u64 {
    (u64::from(block_size) / crate::SECTOR)
        .div_ceil(8)
        .next_multiple_of(crate::SECTOR)
}

/// A path encoded as a Windows locator stores it: UTF-16LE.
pub fn encode_locator(path: &str) -> Vec<u8> {
    path.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Decodes a locator's UTF-16LE data (stopping at a NUL).
pub fn decode_locator(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_parent_fields() {
        let mut h = DynHeader::new(1536, 2048, DEFAULT_BLOCK_SIZE);
        h.parent_unique_id = [9; 16];
        h.parent_timestamp = 1234;
        h.parent_name = "base ö.vhd".into();
        h.locators[0] = Locator {
            code: W2RU,
            data_space: 1,
            data_len: 24,
            data_offset: 10240,
        };
        let b = h.to_bytes();
        // Parent name is UTF-16 big-endian: 'b' = 00 62.
        assert_eq!(&b[64..66], &[0x00, 0x62]);
        assert_eq!(DynHeader::parse(&b).unwrap(), h);
    }

    #[test]
    fn refuses_corruption() {
        let h = DynHeader::new(1536, 16, DEFAULT_BLOCK_SIZE);
        let mut b = h.to_bytes();
        b[20] ^= 1;
        assert!(matches!(
            DynHeader::parse(&b),
            Err(HeaderError::Checksum { .. })
        ));
        let mut h2 = h.clone();
        h2.block_size = 3000;
        assert_eq!(
            DynHeader::parse(&h2.to_bytes()),
            Err(HeaderError::BlockSize(3000))
        );
        let mut b = h.to_bytes();
        b[0] = 0;
        assert_eq!(DynHeader::parse(&b), Err(HeaderError::Cookie));
    }

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(64 << 20), 16384);
    }

    #[test]
    fn locator_text_is_utf16le() {
        let e = encode_locator(".\\a.vhd");
        assert_eq!(&e[..2], &[b'.', 0]);
        assert_eq!(decode_locator(&e), ".\\a.vhd");
    }

    #[test]
    fn locator_space_in_sectors_or_bytes() {
        let l = Locator {
            code: W2KU,
            data_space: 1,
            data_len: 100,
            data_offset: 0,
        };
        assert_eq!(l.space_bytes(), 512);
        let l = Locator {
            code: W2KU,
            data_space: 512,
            data_len: 100,
            data_offset: 0,
        };
        assert_eq!(l.space_bytes(), 512);
    }
}
