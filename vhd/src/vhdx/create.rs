//! Making a new VHDX: its options, the rules a disk's parameters follow
//! (also checked at open), and the layout of a new file.

use super::format::*;
use super::{Vhdx, BAT_AT, DEFAULT_BLOCK_SIZE, LOG_AT, LOG_LENGTH, MAX_SIZE, META_AT, META_LENGTH};
use crate::error::{Error, IoContext, Result};
use crate::io::BlockIo;

/// How to make a VHDX.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to a whole sector).
    pub size: u64,
    /// Payload block size: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// All blocks allocated up front (a fixed disk), else as written.
    pub fixed: bool,
    /// Logical sector size the guest sees: 512 or 4096.
    pub logical_sector: u32,
    /// Physical sector size reported: 512 or 4096.
    pub physical_sector: u32,
}

impl CreateOptions {
    pub fn new(size: u64, fixed: bool) -> Self {
        CreateOptions {
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            fixed,
            logical_sector: 512,
            physical_sector: 4096,
        }
    }
}

/// Checks the parameters of a disk.
pub(super) fn check_params(
    file: &str,
    block_size: u32,
    logical: u32,
    physical: u32,
    size: u64,
    at: u64,
) -> Result<()> {
    if !block_size.is_power_of_two() || !(1 << 20..=256 << 20).contains(&block_size) {
        return Err(corrupt(
            file,
            "file parameters",
            at,
            format!("block size {block_size} (a power of two from 1 MiB to 256 MiB)"),
        ));
    }
    for (what, s) in [("logical", logical), ("physical", physical)] {
        if s != 512 && s != 4096 {
            return Err(corrupt(
                file,
                "sector size",
                at,
                format!("{what} sector size {s} (512 or 4096)"),
            ));
        }
    }
    if size == 0 || size > MAX_SIZE || size % u64::from(logical) != 0 {
        return Err(corrupt(
            file,
            "virtual disk size",
            at,
            format!("{size} bytes (a whole number of {logical}-byte sectors, up to 64 TiB)"),
        ));
    }
    Ok(())
}
impl<I: BlockIo> Vhdx<I> {
    /// Writes a new, empty VHDX on `io` (which must be empty) and opens it
    /// for writing.
    pub fn create_on(io: I, name: &str, opts: &CreateOptions) -> Result<Self> {
        let size = opts
            .size
            .next_multiple_of(u64::from(opts.logical_sector.max(1)));
        check_params(
            name,
            opts.block_size,
            opts.logical_sector,
            opts.physical_sector,
            size,
            0,
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let ratio = chunk_ratio(opts.logical_sector, opts.block_size);
        let entries = bat_entries(size, opts.block_size, ratio);
        let bat_len = (entries * 8).next_multiple_of(MIB).max(MIB);
        if bat_len > u64::from(u32::MAX) {
            return Err(Error::Invalid(format!(
                "{} of BAT is too large: use larger blocks",
                crate::size::human(bat_len)
            )));
        }
        let w = |buf: &[u8], off: u64, what: &str| -> Result<()> {
            io.write_at(buf, off)
                .ctx(name, || format!("write {what}"), off)
        };
        w(&identifier("csv vhd"), IDENTIFIER_OFFSET, "identifier")?;
        let regions = [
            Region {
                guid: REGION_BAT,
                offset: BAT_AT,
                length: bat_len as u32,
                required: true,
            },
            Region {
                guid: REGION_METADATA,
                offset: META_AT,
                length: META_LENGTH as u32,
                required: true,
            },
        ];
        let rt = regions_to_bytes(&regions);
        for at in REGION_OFFSETS {
            w(&rt, at, "region table")?;
        }
        // Metadata: the table, then the items from 64 KiB.
        let items: [(Guid, Vec<u8>, bool); 5] = [
            (
                META_FILE_PARAMETERS,
                [
                    opts.block_size.to_le_bytes(),
                    u32::from(opts.fixed).to_le_bytes(),
                ]
                .concat(),
                false,
            ),
            (META_VIRTUAL_DISK_SIZE, size.to_le_bytes().to_vec(), true),
            (
                META_VIRTUAL_DISK_ID,
                crate::disk::random_id().to_vec(),
                true,
            ),
            (
                META_LOGICAL_SECTOR_SIZE,
                opts.logical_sector.to_le_bytes().to_vec(),
                true,
            ),
            (
                META_PHYSICAL_SECTOR_SIZE,
                opts.physical_sector.to_le_bytes().to_vec(),
                true,
            ),
        ];
        let mut table = Vec::new();
        let mut at = METADATA_TABLE_SIZE as u32;
        for (g, data, vd) in &items {
            table.push(MetaEntry {
                item: *g,
                offset: at,
                length: data.len() as u32,
                is_user: false,
                is_virtual_disk: *vd,
                required: true,
            });
            w(data, META_AT + u64::from(at), "metadata item")?;
            at += data.len() as u32;
        }
        w(&metadata_table_to_bytes(&table), META_AT, "metadata table")?;
        // The BAT: a fixed disk's blocks one after another from its end.
        let data_at = BAT_AT + bat_len;
        let blocks = size.div_ceil(u64::from(opts.block_size));
        let mut bat = vec![0u64; entries as usize];
        if opts.fixed {
            for b in 0..blocks {
                bat[bat_index(b, ratio) as usize] = entry(
                    PAYLOAD_FULLY_PRESENT,
                    data_at + b * u64::from(opts.block_size),
                );
            }
        }
        let raw: Vec<u8> = bat.iter().flat_map(|e| e.to_le_bytes()).collect();
        w(&raw, BAT_AT, "BAT")?;
        let end = if opts.fixed {
            data_at + blocks * u64::from(opts.block_size)
        } else {
            data_at
        };
        io.set_len(end).ctx(name, || "set length".into(), end)?;
        // The headers last: until they are there, the file is no VHDX.
        let h = Header {
            sequence: 0,
            file_write_guid: crate::disk::random_id(),
            data_write_guid: crate::disk::random_id(),
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH,
            log_offset: LOG_AT,
        };
        for (slot, at) in HEADER_OFFSETS.iter().enumerate() {
            let hs = Header {
                sequence: slot as u64,
                ..h.clone()
            };
            w(&hs.to_bytes(), *at, "header")?;
        }
        io.flush().ctx(name, || "flush".into(), 0)?;
        Vhdx::open_on(io, name, true)
    }
}
