//! The volume superblock: the first 4 KiB of a volume's LUN.
//!
//! ```text
//! magic "CSVVOL\0\0" (8) | major u16 | minor u16 | number u64 | id (16) |
//! capacity u64 | data_start u64 | crc32 u32 (of the bytes before it) | zeros
//! ```
//!
//! All integers little-endian. Only the superblock lives outside the data
//! area; files' bytes start at `data_start`. Formatting writes it and
//! syncs; mounting reads it and refuses a LUN that is not a csv volume, a
//! newer format, or a different volume than the cluster registry says.

use std::io;

/// The magic.
pub const MAGIC: &[u8; 8] = b"CSVVOL\0\0";
/// Format version written.
pub const MAJOR: u16 = 1;
const MINOR: u16 = 0;
/// Bytes reserved for the superblock.
pub const SIZE: usize = 4096;
const BODY: usize = 8 + 2 + 2 + 8 + 16 + 8 + 8;
/// Where file data starts by default.
pub const DEFAULT_DATA_START: u64 = 1 << 20;

/// A volume's identity and layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// N of VolumeN.
    pub number: u64,
    /// Random id made at format time.
    pub id: [u8; 16],
    /// Usable size of the LUN.
    pub capacity: u64,
    /// First byte of the data area.
    pub data_start: u64,
}

/// Why a LUN is not a usable volume.
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    /// Reading or writing the LUN.
    #[error("reading or writing the superblock")]
    Io(#[from] io::Error),
    /// Not formatted as a csv volume.
    #[error("not a csv volume (no superblock)")]
    NotAVolume,
    /// A newer format.
    #[error("volume format version {0} is newer than this build reads ({MAJOR})")]
    Version(u16),
    /// Damaged.
    #[error("superblock checksum does not match: the LUN's first sector is damaged")]
    Checksum,
}

impl Superblock {
    /// Encoded, padded to [`SIZE`].
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SIZE);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&MAJOR.to_le_bytes());
        b.extend_from_slice(&MINOR.to_le_bytes());
        b.extend_from_slice(&self.number.to_le_bytes());
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.capacity.to_le_bytes());
        b.extend_from_slice(&self.data_start.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(SIZE, 0);
        b
    }

    /// Decodes the first bytes of a LUN.
    pub fn decode(b: &[u8]) -> Result<Superblock, SuperblockError> {
        if b.len() < BODY + 4 || &b[..8] != MAGIC {
            return Err(SuperblockError::NotAVolume);
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let major = u16_at(8);
        if major != MAJOR {
            return Err(SuperblockError::Version(major));
        }
        let mut c = [0u8; 4];
        c.copy_from_slice(&b[BODY..BODY + 4]);
        if crc32fast::hash(&b[..BODY]) != u32::from_le_bytes(c) {
            return Err(SuperblockError::Checksum);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[20..36]);
        Ok(Superblock {
            number: u64_at(12),
            id,
            capacity: u64_at(36),
            data_start: u64_at(44),
        })
    }

    /// Reads and checks the superblock of `lun`.
    pub fn read(lun: &dyn vhd::BlockIo) -> Result<Superblock, SuperblockError> {
        let mut b = vec![0u8; SIZE];
        match lun.read_at(&mut b, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(SuperblockError::NotAVolume)
            }
            Err(e) => return Err(e.into()),
        }
        Superblock::decode(&b)
    }

    /// Writes the superblock and makes it durable.
    pub fn write(&self, lun: &dyn vhd::BlockIo) -> Result<(), SuperblockError> {
        lun.write_at(&self.encode(), 0)?;
        lun.flush()?;
        Ok(())
    }

    /// The id as text.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_damage() {
        let s = Superblock {
            number: 3,
            id: [7; 16],
            capacity: 1 << 30,
            data_start: DEFAULT_DATA_START,
        };
        let mut b = s.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), s);
        b[40] ^= 1;
        assert!(matches!(
            Superblock::decode(&b),
            Err(SuperblockError::Checksum)
        ));
        let mut v = s.encode();
        v[8] = 9;
        assert!(matches!(
            Superblock::decode(&v),
            Err(SuperblockError::Version(9))
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; 4096]),
            Err(SuperblockError::NotAVolume)
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Superblock::decode(&b);
        }
    }
}
