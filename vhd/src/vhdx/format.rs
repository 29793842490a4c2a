//! VHDX's on-disk structures ([MS-VHDX] 2.2): the file type identifier,
//! the two headers, the two region tables, the metadata table and its
//! items, and BAT entries. Every integer is little-endian; every structure
//! with a checksum carries a CRC-32C of its whole extent with the checksum
//! field taken as zero.

use crate::error::{Error, Result};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// Where each fixed structure sits.
pub const IDENTIFIER_OFFSET: u64 = 0;
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const REGION_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// The header section: the structures above, and nothing else, live in
/// the first MiB.
pub const HEADER_SECTION: u64 = MIB;

pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// The largest number of entries a region or metadata table may hold.
pub const MAX_TABLE_ENTRIES: u32 = 2047;

pub const SIG_FILE: &[u8; 8] = b"vhdxfile";
pub const SIG_HEADER: &[u8; 4] = b"head";
pub const SIG_REGION: &[u8; 4] = b"regi";
pub const SIG_METADATA: &[u8; 8] = b"metadata";

/// A GUID as it is stored: the first three fields little-endian, the last
/// eight bytes as written.
pub type Guid = [u8; 16];

/// The stored bytes of a GUID written `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`.
pub const fn guid(s: &str) -> Guid {
    const fn hex(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("not a hex digit"),
        }
    }
    let b = s.as_bytes();
    let mut raw = [0u8; 16];
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        if b[i] != b'-' {
            raw[n / 2] |= hex(b[i]) << (if n % 2 == 0 { 4 } else { 0 });
            n += 1;
        }
        i += 1;
    }
    [
        raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6], raw[8], raw[9], raw[10],
        raw[11], raw[12], raw[13], raw[14], raw[15],
    ]
}

/// Formats stored GUID bytes the way Windows prints them.
pub fn format_guid(g: &Guid) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

pub const REGION_BAT: Guid = guid("2DC27766-F623-4200-9D64-115E9BFD4A08");
pub const REGION_METADATA: Guid = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");

pub const META_FILE_PARAMETERS: Guid = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
pub const META_VIRTUAL_DISK_SIZE: Guid = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
pub const META_VIRTUAL_DISK_ID: Guid = guid("BECA12AB-B2E6-4523-93EF-C309E000C746");
pub const META_LOGICAL_SECTOR_SIZE: Guid = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
pub const META_PHYSICAL_SECTOR_SIZE: Guid = guid("CDA348C7-445D-4471-9CC9-E9885251C556");
pub const META_PARENT_LOCATOR: Guid = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn guid_at(b: &[u8], off: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[off..off + 16]);
    g
}

/// CRC-32C of `b` with the 4 bytes at `at` taken as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

/// Stores the checksum of `b` at `at`.
pub fn seal(b: &mut [u8], at: usize) {
    let c = checksum(b, at);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// Whether `b`'s stored checksum at `at` matches its content.
pub fn sealed(b: &[u8], at: usize) -> bool {
    le32(b, at) == checksum(b, at)
}

pub(crate) fn corrupt(
    file: &str,
    structure: &str,
    offset: u64,
    problem: impl Into<String>,
) -> Error {
    Error::Corrupt {
        file: file.into(),
        structure: structure.into(),
        offset,
        problem: problem.into(),
    }
}

/// The file type identifier (its first 64 KiB): the signature and the
/// creator, a UTF-16 string.
pub fn identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64 * 1024];
    b[..8].copy_from_slice(SIG_FILE);
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        b[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    b
}

/// The creator named in an identifier.
pub fn creator_of(id: &[u8]) -> String {
    let units: Vec<u16> = id[8..id.len().min(520)]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// One of the two headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    /// Not zero while the log may hold entries to replay.
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses a header; `None` when its signature or checksum is wrong
    /// (the other copy is then the one to use).
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || &b[..4] != SIG_HEADER || !sealed(&b[..HEADER_SIZE], 4) {
            return None;
        }
        Some(Header {
            sequence: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(SIG_HEADER);
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }

    /// Checks what this crate relies on.
    pub fn validate(&self, file: &str, offset: u64) -> Result<()> {
        if self.version != 1 {
            return Err(Error::Unsupported {
                file: file.into(),
                what: format!("VHDX version {} (1 is known)", self.version),
            });
        }
        if self.log_version != 0 {
            return Err(Error::Unsupported {
                file: file.into(),
                what: format!("VHDX log version {} (0 is known)", self.log_version),
            });
        }
        if self.log_length == 0
            || u64::from(self.log_length) % MIB != 0
            || self.log_offset % MIB != 0
            || self.log_offset < HEADER_SECTION
        {
            return Err(corrupt(
                file,
                "header",
                offset,
                format!(
                    "log at {} of {} bytes: both must be whole MiB, after the first",
                    self.log_offset, self.log_length
                ),
            ));
        }
        Ok(())
    }
}

/// A region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

/// Parses a region table; `None` when its signature or checksum is wrong.
pub fn parse_regions(b: &[u8]) -> Option<Vec<Region>> {
    if b.len() < REGION_TABLE_SIZE || &b[..4] != SIG_REGION || !sealed(&b[..REGION_TABLE_SIZE], 4) {
        return None;
    }
    let n = le32(b, 8);
    if n > MAX_TABLE_ENTRIES {
        return None;
    }
    Some(
        (0..n as usize)
            .map(|i| {
                let e = 16 + 32 * i;
                Region {
                    guid: guid_at(b, e),
                    offset: le64(b, e + 16),
                    length: le32(b, e + 24),
                    required: le32(b, e + 28) & 1 != 0,
                }
            })
            .collect(),
    )
}

pub fn regions_to_bytes(rs: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[..4].copy_from_slice(SIG_REGION);
    b[8..12].copy_from_slice(&(rs.len() as u32).to_le_bytes());
    for (i, r) in rs.iter().enumerate() {
        let e = 16 + 32 * i;
        b[e..e + 16].copy_from_slice(&r.guid);
        b[e + 16..e + 24].copy_from_slice(&r.offset.to_le_bytes());
        b[e + 24..e + 28].copy_from_slice(&r.length.to_le_bytes());
        b[e + 28..e + 32].copy_from_slice(&u32::from(r.required).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// A metadata table entry; its offset is from the start of the metadata
/// region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaEntry {
    pub item: Guid,
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub is_virtual_disk: bool,
    pub required: bool,
}

pub fn parse_metadata_table(b: &[u8], file: &str, at: u64) -> Result<Vec<MetaEntry>> {
    if b.len() < METADATA_TABLE_SIZE || &b[..8] != SIG_METADATA {
        return Err(corrupt(
            file,
            "metadata table",
            at,
            "no `metadata` signature",
        ));
    }
    let n = le16(b, 10);
    if u32::from(n) > MAX_TABLE_ENTRIES {
        return Err(corrupt(
            file,
            "metadata table",
            at,
            format!("{n} entries (at most {MAX_TABLE_ENTRIES})"),
        ));
    }
    Ok((0..n as usize)
        .map(|i| {
            let e = 32 + 32 * i;
            let flags = le32(b, e + 24);
            MetaEntry {
                item: guid_at(b, e),
                offset: le32(b, e + 16),
                length: le32(b, e + 20),
                is_user: flags & 1 != 0,
                is_virtual_disk: flags & 2 != 0,
                required: flags & 4 != 0,
            }
        })
        .collect())
}

pub fn metadata_table_to_bytes(es: &[MetaEntry]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE];
    b[..8].copy_from_slice(SIG_METADATA);
    b[10..12].copy_from_slice(&(es.len() as u16).to_le_bytes());
    for (i, m) in es.iter().enumerate() {
        let e = 32 + 32 * i;
        b[e..e + 16].copy_from_slice(&m.item);
        b[e + 16..e + 20].copy_from_slice(&m.offset.to_le_bytes());
        b[e + 20..e + 24].copy_from_slice(&m.length.to_le_bytes());
        let flags =
            u32::from(m.is_user) | u32::from(m.is_virtual_disk) << 1 | u32::from(m.required) << 2;
        b[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
    }
    b
}

/// A payload block's BAT state ([MS-VHDX] 2.5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Never written: reads as zeros (or from the parent).
    NotPresent,
    /// Contents undefined: reads as zeros here.
    Undefined,
    /// Reads as zeros.
    Zero,
    /// Unmapped by a trim: reads as zeros here.
    Unmapped,
    /// Allocated, all of it in the file.
    FullyPresent,
    /// Allocated in a differencing disk, its sector bitmap says which
    /// sectors.
    PartiallyPresent,
}

pub const PAYLOAD_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_UNDEFINED: u64 = 1;
pub const PAYLOAD_ZERO: u64 = 2;
pub const PAYLOAD_UNMAPPED: u64 = 3;
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// A sector bitmap block's states.
pub const SB_NOT_PRESENT: u64 = 0;
pub const SB_PRESENT: u64 = 6;

/// A BAT entry: the state in its low 3 bits, the file offset in MiB in
/// its high 44.
pub fn entry(state: u64, offset: u64) -> u64 {
    (offset / MIB) << 20 | state
}

pub fn entry_state(e: u64) -> u64 {
    e & 7
}

pub fn entry_offset(e: u64) -> u64 {
    (e >> 20) * MIB
}

pub fn payload_state(e: u64) -> Option<BlockState> {
    Some(match entry_state(e) {
        PAYLOAD_NOT_PRESENT => BlockState::NotPresent,
        PAYLOAD_UNDEFINED => BlockState::Undefined,
        PAYLOAD_ZERO => BlockState::Zero,
        PAYLOAD_UNMAPPED => BlockState::Unmapped,
        PAYLOAD_FULLY_PRESENT => BlockState::FullyPresent,
        PAYLOAD_PARTIALLY_PRESENT => BlockState::PartiallyPresent,
        _ => return None,
    })
}

/// Payload blocks per sector bitmap block: a bitmap block covers 2^23
/// sectors.
pub fn chunk_ratio(logical_sector: u32, block_size: u32) -> u64 {
    ((1u64 << 23) * u64::from(logical_sector)) / u64::from(block_size)
}

/// The BAT index of payload block `block`: a sector bitmap entry follows
/// every `chunk_ratio` payload entries.
pub fn bat_index(block: u64, chunk_ratio: u64) -> u64 {
    block + block / chunk_ratio
}

/// BAT entries of a disk of `size` bytes in `block_size` blocks (no
/// parent): the payload entries and the bitmap entries between them.
pub fn bat_entries(size: u64, block_size: u32, chunk_ratio: u64) -> u64 {
    let blocks = size.div_ceil(u64::from(block_size));
    if blocks == 0 {
        return 0;
    }
    blocks + (blocks - 1) / chunk_ratio
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_mixed_endian() {
        assert_eq!(
            REGION_BAT,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(
            format_guid(&REGION_METADATA),
            "8b7ca206-4790-4b9a-b8fe-575f050f886e"
        );
    }

    #[test]
    fn headers_and_tables_round_trip_and_checksums_catch_a_flip() {
        let h = Header {
            sequence: 7,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b), Some(h));
        b[100] ^= 1;
        assert_eq!(Header::parse(&b), None);
        let rs = vec![Region {
            guid: REGION_BAT,
            offset: 3 * MIB,
            length: MIB as u32,
            required: true,
        }];
        assert_eq!(parse_regions(&regions_to_bytes(&rs)), Some(rs));
    }

    #[test]
    fn bat_geometry() {
        // 512-byte sectors, 32 MiB blocks: 128 payload blocks per bitmap.
        assert_eq!(chunk_ratio(512, 32 << 20), 128);
        assert_eq!(bat_index(127, 128), 127);
        assert_eq!(bat_index(128, 128), 129);
        assert_eq!(bat_entries(128 * (32 << 20), 32 << 20, 128), 128);
        assert_eq!(bat_entries(129 * (32 << 20), 32 << 20, 128), 130);
        let e = entry(PAYLOAD_FULLY_PRESENT, 5 * MIB);
        assert_eq!((entry_state(e), entry_offset(e)), (6, 5 * MIB));
    }
}
