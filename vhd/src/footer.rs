//! The hard disk footer: 512 bytes, big-endian, at the end of every VHD
//! (and, for dynamic and differencing disks, copied at offset 0).
//!
//! | offset | size | field                         |
//! |-------:|-----:|-------------------------------|
//! |      0 |    8 | cookie `conectix`             |
//! |      8 |    4 | features (bit 1 always set)   |
//! |     12 |    4 | file format version 1.0       |
//! |     16 |    8 | data offset (dynamic header)  |
//! |     24 |    4 | time stamp (s since 2000-01-01 UTC) |
//! |     28 |    4 | creator application           |
//! |     32 |    4 | creator version               |
//! |     36 |    4 | creator host OS               |
//! |     40 |    8 | original size                 |
//! |     48 |    8 | current size                  |
//! |     56 |    4 | geometry: cylinders (2), heads (1), sectors/track (1) |
//! |     60 |    4 | disk type                     |
//! |     64 |    4 | checksum                      |
//! |     68 |   16 | unique id                     |
//! |     84 |    1 | saved state                   |
//! |     85 |  427 | reserved (zero)               |
//!
//! Very old Virtual PC images end in a 511-byte footer (the last reserved
//! byte missing); [`Footer::parse`] accepts that length.

use crate::{be32, be64, SECTOR};

/// Size of a footer as written.
pub const FOOTER_SIZE: usize = 512;
/// Size of the footer of very old images, accepted on read.
pub const OLD_FOOTER_SIZE: usize = 511;
/// The footer's cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// Features field: the reserved bit that must always be set.
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// File format version 1.0.
pub const VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Creator application we write.
pub const CREATOR_APP: [u8; 4] = *b"csv ";
/// Creator version we write (major.minor as 16.16).
pub const CREATOR_VERSION: u32 = 0x0001_0000;
/// Creator host OS we write ("Wi2k", what Hyper-V writes; Linux has no code).
pub const CREATOR_HOST_WI2K: u32 = 0x5769_326B;
/// Byte range of the checksum field.
pub const CHECKSUM_RANGE: std::ops::Range<usize> = 64..68;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

const OFF_FEATURES: usize = 8;
const OFF_VERSION: usize = 12;
const OFF_DATA_OFFSET: usize = 16;
const OFF_TIMESTAMP: usize = 24;
const OFF_CREATOR_APP: usize = 28;
const OFF_CREATOR_VER: usize = 32;
const OFF_CREATOR_OS: usize = 36;
const OFF_ORIG_SIZE: usize = 40;
const OFF_CUR_SIZE: usize = 48;
const OFF_CYLINDERS: usize = 56;
const OFF_HEADS: usize = 58;
const OFF_SPT: usize = 59;
const OFF_DISK_TYPE: usize = 60;
const OFF_UNIQUE_ID: usize = 68;
const OFF_SAVED_STATE: usize = 84;

/// The kind of disk a footer describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Data first, footer last; size of the file = size of the disk + 512.
    Fixed,
    /// Blocks allocated on first write, located through the BAT.
    Dynamic,
    /// A dynamic disk holding only the changes against a parent.
    Differencing,
}

impl DiskType {
    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The type of an on-disk code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// Lower-case name as used by the CLI.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }

    /// Whether the disk has a dynamic header and a BAT.
    pub fn is_sparse(self) -> bool {
        self != DiskType::Fixed
    }
}

/// CHS geometry of the disk, as the footer stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The largest geometry the format can express.
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// The geometry of a disk of `size` bytes, by the algorithm of the VHD
    /// specification (appendix "CHS calculation").
    pub fn for_size(size: u64) -> Geometry {
        let mut total = size / SECTOR;
        if total > 65535 * 16 * 255 {
            total = 65535 * 16 * 255;
        }
        let (spt, heads, cyl_times_heads);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cyl_times_heads = total / spt;
        } else {
            let mut s = 17;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            spt = s;
            heads = h;
            cyl_times_heads = cth;
        }
        Geometry {
            cylinders: (cyl_times_heads / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// Bytes addressed by this geometry.
    pub fn size(&self) -> u64 {
        u64::from(self.cylinders)
            * u64::from(self.heads)
            * u64::from(self.sectors_per_track)
            * SECTOR
    }

    /// The smallest size >= `size` that a geometry addresses exactly (what
    /// Virtual PC and `qemu-img create` without `force_size` produce).
    pub fn round_size(size: u64) -> u64 {
        let mut sectors = size.div_ceil(SECTOR);
        loop {
            let g = Geometry::for_size(sectors * SECTOR);
            if g.size() >= size || g == Geometry::MAX {
                return g.size().max(size);
            }
            sectors += 1;
        }
    }
}

/// A parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Features field.
    pub features: u32,
    /// File format version.
    pub version: u32,
    /// Offset of the dynamic header, or [`NO_DATA_OFFSET`].
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application, 4 ASCII bytes (`vpc `, `qemu`, `win `, `csv `).
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS code.
    pub creator_host_os: u32,
    /// Size at creation.
    pub original_size: u64,
    /// Current size as stored (see [`Footer::virtual_size`]).
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Raw disk type code.
    pub disk_type_code: u32,
    /// Stored checksum.
    pub checksum: u32,
    /// Unique id of the image; a differencing child names its parent by it.
    pub unique_id: [u8; 16],
    /// Saved-state flag (Virtual PC).
    pub saved_state: u8,
}

/// Why a footer was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FooterError {
    /// No `conectix` cookie.
    Cookie,
    /// The stored checksum differs from the computed one.
    Checksum {
        /// Stored in the footer.
        stored: u32,
        /// Computed over its bytes.
        computed: u32,
    },
    /// A major version other than 1.
    Version(u32),
    /// A disk type code other than 2, 3 or 4.
    DiskType(u32),
    /// Fewer bytes than a footer.
    Short(usize),
}

impl std::fmt::Display for FooterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FooterError::Cookie => write!(f, "no `conectix` cookie"),
            FooterError::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum {stored:#010x} stored, {computed:#010x} computed"
                )
            }
            FooterError::Version(v) => write!(f, "unknown file format version {v:#010x}"),
            FooterError::DiskType(t) => write!(f, "unknown disk type {t}"),
            FooterError::Short(n) => write!(f, "only {n} bytes"),
        }
    }
}

/// The VHD checksum: one's complement of the sum of all bytes, with the
/// checksum field itself counted as zero.
pub fn checksum(bytes: &[u8], checksum_range: std::ops::Range<usize>) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !checksum_range.contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

impl Footer {
    /// A footer for a new disk of `size` bytes, created now.
    pub fn new(disk_type: DiskType, size: u64, unique_id: [u8; 16]) -> Footer {
        Footer {
            features: FEATURES_RESERVED,
            version: VERSION,
            data_offset: if disk_type.is_sparse() {
                SECTOR
            } else {
                NO_DATA_OFFSET
            },
            timestamp: now_vhd(),
            creator_app: CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_host_os: CREATOR_HOST_WI2K,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type_code: disk_type.code(),
            checksum: 0,
            unique_id,
            saved_state: 0,
        }
    }

    /// Parses a footer from 512 bytes, or 511 for very old images.
    pub fn parse(bytes: &[u8]) -> Result<Footer, FooterError> {
        if bytes.len() < OLD_FOOTER_SIZE {
            return Err(FooterError::Short(bytes.len()));
        }
        let mut b = [0u8; FOOTER_SIZE];
        let n = bytes.len().min(FOOTER_SIZE);
        b[..n].copy_from_slice(&bytes[..n]);
        if &b[..8] != COOKIE {
            return Err(FooterError::Cookie);
        }
        let stored = be32(&b, CHECKSUM_RANGE.start);
        let computed = checksum(&b, CHECKSUM_RANGE);
        if stored != computed {
            return Err(FooterError::Checksum { stored, computed });
        }
        let version = be32(&b, OFF_VERSION);
        if version >> 16 != 1 {
            return Err(FooterError::Version(version));
        }
        let disk_type_code = be32(&b, OFF_DISK_TYPE);
        if DiskType::from_code(disk_type_code).is_none() {
            return Err(FooterError::DiskType(disk_type_code));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[OFF_CREATOR_APP..OFF_CREATOR_APP + 4]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16]);
        Ok(Footer {
            features: be32(&b, OFF_FEATURES),
            version,
            data_offset: be64(&b, OFF_DATA_OFFSET),
            timestamp: be32(&b, OFF_TIMESTAMP),
            creator_app,
            creator_version: be32(&b, OFF_CREATOR_VER),
            creator_host_os: be32(&b, OFF_CREATOR_OS),
            original_size: be64(&b, OFF_ORIG_SIZE),
            current_size: be64(&b, OFF_CUR_SIZE),
            geometry: Geometry {
                cylinders: u16::from_be_bytes([b[OFF_CYLINDERS], b[OFF_CYLINDERS + 1]]),
                heads: b[OFF_HEADS],
                sectors_per_track: b[OFF_SPT],
            },
            disk_type_code,
            checksum: stored,
            unique_id,
            saved_state: b[OFF_SAVED_STATE],
        })
    }

    /// Serialises the footer with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        b[OFF_FEATURES..OFF_FEATURES + 4].copy_from_slice(&self.features.to_be_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&self.version.to_be_bytes());
        b[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&self.data_offset.to_be_bytes());
        b[OFF_TIMESTAMP..OFF_TIMESTAMP + 4].copy_from_slice(&self.timestamp.to_be_bytes());
        b[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        b[OFF_CREATOR_VER..OFF_CREATOR_VER + 4]
            .copy_from_slice(&self.creator_version.to_be_bytes());
        b[OFF_CREATOR_OS..OFF_CREATOR_OS + 4].copy_from_slice(&self.creator_host_os.to_be_bytes());
        b[OFF_ORIG_SIZE..OFF_ORIG_SIZE + 8].copy_from_slice(&self.original_size.to_be_bytes());
        b[OFF_CUR_SIZE..OFF_CUR_SIZE + 8].copy_from_slice(&self.current_size.to_be_bytes());
        b[OFF_CYLINDERS..OFF_CYLINDERS + 2].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[OFF_HEADS] = self.geometry.heads;
        b[OFF_SPT] = self.geometry.sectors_per_track;
        b[OFF_DISK_TYPE..OFF_DISK_TYPE + 4].copy_from_slice(&self.disk_type_code.to_be_bytes());
        b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].copy_from_slice(&self.unique_id);
        b[OFF_SAVED_STATE] = self.saved_state;
        let sum = checksum(&b, CHECKSUM_RANGE);
        b[CHECKSUM_RANGE].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// The disk type (the code was validated by [`Footer::parse`]).
    pub fn disk_type(&self) -> DiskType {
        DiskType::from_code(self.disk_type_code).unwrap_or(DiskType::Fixed)
    }

    /// The size of the virtual disk, decided as QEMU does: images made by
    /// Virtual PC (`vpc `) and by older QEMU (`qemu`) are as large as their
    /// CHS geometry; every other creator (Hyper-V `win `, `qem2`, `d2v `,
    /// XenServer, csv) uses `current_size`. An image at the largest
    /// geometry uses `current_size` whatever made it, as its geometry would
    /// truncate it.
    pub fn virtual_size(&self) -> u64 {
        let chs_creator = &self.creator_app == b"vpc " || &self.creator_app == b"qemu";
        if chs_creator && self.geometry != Geometry::MAX && self.geometry.size() > 0 {
            self.geometry.size()
        } else {
            self.current_size
        }
    }

    /// The creator application as text.
    pub fn creator(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches(['\0', ' '])
            .to_string()
    }
}

/// Now, in seconds since 2000-01-01 UTC (0 for clocks before it).
pub fn now_vhd() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

/// A VHD time stamp as Unix seconds.
pub fn vhd_time_to_unix(t: u32) -> u64 {
    VHD_EPOCH_UNIX + u64::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The footer of a 16 MiB fixed disk written by Hyper-V, field by field.
    fn hyperv_fixed_16m() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(b"conectix"); // cookie
        b[8..12].copy_from_slice(&[0, 0, 0, 2]); // features: reserved bit
        b[12..16].copy_from_slice(&[0, 1, 0, 0]); // version 1.0
        b[16..24].copy_from_slice(&[0xff; 8]); // data offset: none (fixed)
        b[24..28].copy_from_slice(&0x2a3b_4c5du32.to_be_bytes()); // time stamp
        b[28..32].copy_from_slice(b"win "); // creator: Hyper-V
        b[32..36].copy_from_slice(&[0, 10, 0, 0]); // creator version 10.0
        b[36..40].copy_from_slice(b"Wi2k"); // host OS
        b[40..48].copy_from_slice(&(16u64 << 20).to_be_bytes()); // original size
        b[48..56].copy_from_slice(&(16u64 << 20).to_be_bytes()); // current size
        b[56..58].copy_from_slice(&481u16.to_be_bytes()); // cylinders
        b[58] = 4; // heads
        b[59] = 17; // sectors per track
        b[60..64].copy_from_slice(&2u32.to_be_bytes()); // disk type: fixed
        b[68..84].copy_from_slice(&[7; 16]); // unique id
        let sum = checksum(&b, CHECKSUM_RANGE);
        b[64..68].copy_from_slice(&sum.to_be_bytes()); // checksum
        b
    }

    #[test]
    fn parses_a_hyperv_footer() {
        let f = Footer::parse(&hyperv_fixed_16m()).unwrap();
        assert_eq!(f.disk_type(), DiskType::Fixed);
        assert_eq!(f.current_size, 16 << 20);
        assert_eq!(f.virtual_size(), 16 << 20);
        assert_eq!(
            f.geometry,
            Geometry {
                cylinders: 481,
                heads: 4,
                sectors_per_track: 17
            }
        );
        assert_eq!(f.data_offset, NO_DATA_OFFSET);
        assert_eq!(f.creator(), "win");
        assert_eq!(f.to_bytes(), hyperv_fixed_16m());
    }

    #[test]
    fn accepts_the_old_511_byte_footer() {
        let b = hyperv_fixed_16m();
        let f = Footer::parse(&b[..511]).unwrap();
        assert_eq!(f.current_size, 16 << 20);
    }

    #[test]
    fn refuses_bad_cookie_checksum_type_version() {
        let mut b = hyperv_fixed_16m();
        b[0] = b'C';
        assert_eq!(Footer::parse(&b), Err(FooterError::Cookie));
        let mut b = hyperv_fixed_16m();
        b[100] = 1;
        assert!(matches!(
            Footer::parse(&b),
            Err(FooterError::Checksum { .. })
        ));
        let mut f = Footer::parse(&hyperv_fixed_16m()).unwrap();
        f.disk_type_code = 9;
        assert_eq!(Footer::parse(&f.to_bytes()), Err(FooterError::DiskType(9)));
        let mut f = Footer::parse(&hyperv_fixed_16m()).unwrap();
        f.version = 0x0002_0000;
        assert_eq!(
            Footer::parse(&f.to_bytes()),
            Err(FooterError::Version(0x0002_0000))
        );
        assert_eq!(Footer::parse(&[0u8; 10]), Err(FooterError::Short(10)));
    }

    #[test]
    fn geometry_follows_the_specification() {
        // Values from the specification's algorithm, as Hyper-V writes them.
        assert_eq!(
            Geometry::for_size(16 << 20),
            Geometry {
                cylinders: 481,
                heads: 4,
                sectors_per_track: 17
            }
        );
        assert_eq!(
            Geometry::for_size(1 << 30),
            Geometry {
                cylinders: 2080,
                heads: 16,
                sectors_per_track: 63
            }
        );
        // 127 GiB = 266338304 sectors: 255 sectors/track, 16 heads.
        assert_eq!(
            Geometry::for_size(127 << 30),
            Geometry {
                cylinders: 65278,
                heads: 16,
                sectors_per_track: 255
            }
        );
        assert_eq!(Geometry::for_size(4 << 40), Geometry::MAX);
    }

    #[test]
    fn round_size_is_addressable_and_not_smaller() {
        for size in [1u64 << 20, 10_000_000, 1 << 30, 3 * (1 << 30) + 12345] {
            let r = Geometry::round_size(size);
            assert!(r >= size);
            assert_eq!(Geometry::for_size(r).size(), r, "size {size}");
        }
    }

    #[test]
    fn virtual_size_uses_chs_for_vpc_and_qemu_creators() {
        let mut f = Footer::new(DiskType::Dynamic, 10_000_000, [1; 16]);
        assert_eq!(f.virtual_size(), 10_000_000);
        f.creator_app = *b"qemu";
        assert_eq!(f.virtual_size(), f.geometry.size());
        f.creator_app = *b"qem2";
        assert_eq!(f.virtual_size(), 10_000_000);
    }
}
