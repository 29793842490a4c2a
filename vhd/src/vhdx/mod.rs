//! VHDX, the disk format of Hyper-V since Windows Server 2012 ([MS-VHDX]):
//! fixed and dynamic disks, read and written, interoperable with Hyper-V
//! and `qemu-img` (its `vhdx` driver).
//!
//! A VHDX file starts with a 1 MiB header section: the file type
//! identifier, two headers (the one with the higher sequence number is
//! current; an update writes the other), and two copies of the region
//! table, which places the BAT and the metadata region in the file. The
//! metadata region holds the disk's parameters (block size, virtual size,
//! sector sizes, id). The BAT maps each payload block (1-256 MiB) to its
//! place in the file, with a sector bitmap entry after every `chunk_ratio`
//! payload entries (used by differencing disks only).
//!
//! # Crash safety
//!
//! Metadata is never written in place without the log ([`log`]): a new
//! block of a dynamic disk is made in this order: the file extended (the
//! rest of the block reads as zeros) and the write's data put in the
//! block, flushed; then a log entry holding the new BAT sector, flushed;
//! then the BAT sector in place, flushed. A crash leaves either no entry
//! (the block is unreferenced space at the end of the file, the write
//! absent) or a whole entry, which the next open replays (the write
//! there); a BAT entry never points at anything but zeros and written
//! data. A writable open
//! sets the header's log GUID (the log may hold entries) and a clean close
//! clears it. An image whose log needs replaying opens read-only too: the
//! replay is then kept in memory and the file is not changed.
//!
//! Differencing VHDX disks (with a parent) are refused with a clear error,
//! as they are by QEMU.

pub mod format;
pub mod log;

use crate::check::{Finding, Severity};
use crate::error::{Error, IoContext, Result};
use crate::io::BlockIo;
use format::*;
use std::sync::{Mutex, RwLock};

/// The default payload block size of a new dynamic VHDX (Hyper-V's).
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;
/// Where a new image puts its log, metadata and BAT.
const LOG_AT: u64 = MIB;
const LOG_LENGTH: u32 = MIB as u32;
const META_AT: u64 = 2 * MIB;
const META_LENGTH: u64 = MIB;
const BAT_AT: u64 = 3 * MIB;
/// The largest log this crate reads whole into memory.
const MAX_LOG: u64 = 256 * MIB;
/// The largest BAT this crate keeps in memory (a 64 TiB disk of 1 MiB
/// blocks).
const MAX_BAT_BYTES: u64 = 512 * MIB;
/// The largest virtual disk the format allows.
pub const MAX_SIZE: u64 = 64 << 40;

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

/// What the writer keeps between allocations.
#[derive(Debug)]
struct Writer {
    /// Where the next block goes (1 MiB-aligned, past everything).
    end: u64,
    /// The last log entry's sequence number.
    sequence: u64,
}

/// An open VHDX image on `I`.
pub struct Vhdx<I: BlockIo> {
    io: I,
    name: String,
    writable: bool,
    /// The current header and its slot (0 or 1).
    header: Mutex<(Header, usize)>,
    creator: String,
    bat_offset: u64,
    meta_offset: u64,
    block_size: u32,
    logical_sector: u32,
    physical_sector: u32,
    size: u64,
    disk_id: Guid,
    leave_allocated: bool,
    chunk_ratio: u64,
    bat: RwLock<Vec<u64>>,
    writer: Mutex<Writer>,
    /// A read-only open's replay of the log, applied to every read.
    overlay: Vec<log::Write>,
    /// Log entries replayed at open.
    replayed: usize,
    /// Findings of the open (a damaged header or region table copy).
    notes: Vec<Finding>,
    closed: bool,
}

impl<I: BlockIo> std::fmt::Debug for Vhdx<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

fn corrupt(file: &str, structure: &str, offset: u64, problem: impl Into<String>) -> Error {
    Error::Corrupt {
        file: file.into(),
        structure: structure.into(),
        offset,
        problem: problem.into(),
    }
}

fn lock_err(name: &str) -> Error {
    Error::Invalid(format!(
        "{name}: internal lock poisoned by an earlier panic"
    ))
}

/// Whether `b` (the first bytes of a file) is a VHDX.
pub fn is_vhdx(b: &[u8]) -> bool {
    b.len() >= 8 && &b[..8] == SIG_FILE
}

impl Vhdx<std::fs::File> {
    /// Opens the VHDX at `path`.
    pub fn open(path: impl AsRef<std::path::Path>, write: bool) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .ctx(&name, || "open".into(), 0)?;
        Vhdx::open_on(f, &name, write)
    }

    /// Creates a VHDX at `path` (refusing to overwrite a file), open for
    /// writing.
    pub fn create(path: impl AsRef<std::path::Path>, opts: &CreateOptions) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .ctx(&name, || "create".into(), 0)?;
        match Vhdx::create_on(f, &name, opts) {
            Ok(v) => Ok(v),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }
}

/// Checks the parameters of a disk.
fn check_params(
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

    /// Opens the VHDX on `io`: replays its log when it holds entries (in
    /// the file when `write`, in memory otherwise).
    pub fn open_on(io: I, name: &str, write: bool) -> Result<Self> {
        let len = io.len().ctx(name, || "stat".into(), 0)?;
        if len < HEADER_SECTION {
            return Err(Error::NotVhd {
                file: name.into(),
                reason: format!("{len} bytes is too short for a VHDX"),
            });
        }
        let mut id = vec![0u8; 64 * 1024];
        io.read_at(&mut id, 0)
            .ctx(name, || "read identifier".into(), 0)?;
        if !is_vhdx(&id) {
            return Err(Error::NotVhd {
                file: name.into(),
                reason: "no `vhdxfile` signature at its start".into(),
            });
        }
        let creator = creator_of(&id);
        let mut notes = Vec::new();

        // The current header: the valid copy with the higher number.
        let mut headers = Vec::new();
        for (slot, at) in HEADER_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; HEADER_SIZE];
            io.read_at(&mut b, *at)
                .ctx(name, || "read header".into(), *at)?;
            match Header::parse(&b) {
                Some(h) => headers.push((h, slot)),
                None => notes.push(Finding {
                    severity: Severity::Warning,
                    structure: format!("header {}", slot + 1),
                    offset: Some(*at),
                    problem: "bad signature or checksum (the other copy is used)".into(),
                }),
            }
        }
        let Some((header, slot)) = headers.into_iter().max_by_key(|(h, _)| h.sequence) else {
            return Err(corrupt(
                name,
                "headers",
                HEADER_OFFSETS[0],
                "neither copy has a valid signature and checksum",
            ));
        };
        header.validate(name, HEADER_OFFSETS[slot])?;

        // A writer changes the file write GUID before it changes anything
        // else, the log's replay included ([MS-VHDX] 2.2.2).
        let mut current = (header.clone(), slot);
        if write {
            write_headers(&io, name, &mut current, |h| {
                h.file_write_guid = crate::disk::random_id();
            })?;
        }

        // The log.
        let mut overlay = Vec::new();
        let mut replayed = 0;
        if header.log_guid != [0; 16] {
            let ll = u64::from(header.log_length);
            if ll > MAX_LOG {
                return Err(Error::Unsupported {
                    file: name.into(),
                    what: format!("a log of {} (at most {})", ll, MAX_LOG),
                });
            }
            let mut raw = vec![0u8; ll as usize];
            io.read_at(&mut raw, header.log_offset).ctx(
                name,
                || "read log".into(),
                header.log_offset,
            )?;
            let seq = log::active_sequence(&raw, &header.log_guid);
            if let Some(head) = seq.last() {
                if head.flushed_file_offset > len {
                    return Err(corrupt(
                        name,
                        "log",
                        header.log_offset + head.at,
                        format!(
                            "its entries were written to a file of {} bytes, and it is {len}: data is missing",
                            head.flushed_file_offset
                        ),
                    ));
                }
                replayed = seq.len();
                let last = head.last_file_offset;
                let writes: Vec<log::Write> = seq.into_iter().flat_map(|e| e.writes).collect();
                for w in &writes {
                    let (log::Write::Sector { offset, .. } | log::Write::Zero { offset, .. }) = w;
                    if *offset < HEADER_SECTION {
                        return Err(corrupt(
                            name,
                            "log",
                            header.log_offset,
                            format!("an entry writes the header section (offset {offset})"),
                        ));
                    }
                }
                if write {
                    for w in &writes {
                        match w {
                            log::Write::Sector { offset, data } => io.write_at(data, *offset).ctx(
                                name,
                                || "replay log".into(),
                                *offset,
                            )?,
                            log::Write::Zero { offset, length } => {
                                zero_range(&io, name, *offset, *length)?
                            }
                        }
                    }
                    let last = last.next_multiple_of(MIB);
                    if io.len().ctx(name, || "stat".into(), 0)? < last {
                        io.set_len(last).ctx(name, || "set length".into(), last)?;
                    }
                    io.flush().ctx(name, || "flush".into(), 0)?;
                } else {
                    overlay = writes;
                }
            }
        }

        // Reads from here on see the replay.
        let mut me = Vhdx {
            io,
            name: name.into(),
            writable: write,
            header: Mutex::new(current),
            creator,
            bat_offset: 0,
            meta_offset: 0,
            block_size: 0,
            logical_sector: 512,
            physical_sector: 512,
            size: 0,
            disk_id: [0; 16],
            leave_allocated: false,
            chunk_ratio: 1,
            bat: RwLock::new(vec![]),
            writer: Mutex::new(Writer {
                end: 0,
                sequence: 0,
            }),
            overlay,
            replayed,
            notes,
            closed: !write,
        };
        if write && header.log_guid != [0; 16] {
            // The log is replayed: say so before anything else changes.
            me.update_header(|h| h.log_guid = [0; 16])?;
        }
        me.load()?;
        if write {
            me.update_header(|h| {
                h.data_write_guid = crate::disk::random_id();
                h.log_guid = crate::disk::random_id();
            })?;
        }
        Ok(me)
    }

    /// Reads `buf` at file offset `off` as the file is after the log's
    /// replay.
    fn read_raw(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.io
            .read_at(buf, off)
            .ctx(&self.name, || format!("read {what}"), off)?;
        let end = off + buf.len() as u64;
        for w in &self.overlay {
            let (at, len, data) = match w {
                log::Write::Sector { offset, data } => (*offset, data.len() as u64, Some(data)),
                log::Write::Zero { offset, length } => (*offset, *length, None),
            };
            let (s, e) = (at.max(off), (at + len).min(end));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - off) as usize..(e - off) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - at) as usize..(e - at) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Reads the region table, the metadata and the BAT.
    fn load(&mut self) -> Result<()> {
        let name = self.name.clone();
        let file_len = self.io.len().ctx(&name, || "stat".into(), 0)?;
        let (log_offset, log_length) = {
            let g = self.header.lock().map_err(|_| lock_err(&name))?;
            (g.0.log_offset, u64::from(g.0.log_length))
        };
        let mut tables = Vec::new();
        for (i, at) in REGION_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            self.read_raw(&mut b, *at, "region table")?;
            match parse_regions(&b) {
                Some(r) => tables.push(r),
                None => self.notes.push(Finding {
                    severity: Severity::Warning,
                    structure: format!("region table {}", i + 1),
                    offset: Some(*at),
                    problem: "bad signature or checksum (the other copy is used)".into(),
                }),
            }
        }
        let Some(regions) = tables.first().cloned() else {
            return Err(corrupt(
                &name,
                "region tables",
                REGION_OFFSETS[0],
                "neither copy has a valid signature and checksum",
            ));
        };
        let find = |g: &Guid, what: &str| -> Result<Region> {
            let r = regions
                .iter()
                .find(|r| r.guid == *g)
                .copied()
                .ok_or_else(|| {
                    corrupt(
                        &name,
                        "region table",
                        REGION_OFFSETS[0],
                        format!("no {what} region"),
                    )
                })?;
            if r.offset % MIB != 0
                || r.offset < HEADER_SECTION
                || u64::from(r.length) % MIB != 0
                || r.length == 0
            {
                return Err(corrupt(
                    &name,
                    "region table",
                    REGION_OFFSETS[0],
                    format!(
                        "{what} region at {} of {} bytes (whole MiB after the first)",
                        r.offset, r.length
                    ),
                ));
            }
            Ok(r)
        };
        let bat = find(&REGION_BAT, "BAT")?;
        let meta = find(&REGION_METADATA, "metadata")?;
        if let Some(r) = regions
            .iter()
            .find(|r| r.required && r.guid != REGION_BAT && r.guid != REGION_METADATA)
        {
            return Err(Error::Unsupported {
                file: name.clone(),
                what: format!("required region {}", format_guid(&r.guid)),
            });
        }

        // Metadata.
        let mut tb = vec![0u8; METADATA_TABLE_SIZE];
        self.read_raw(&mut tb, meta.offset, "metadata table")?;
        let entries = parse_metadata_table(&tb, &name, meta.offset)?;
        let item = |g: &Guid, len: usize, what: &str| -> Result<Option<Vec<u8>>> {
            let Some(e) = entries.iter().find(|e| e.item == *g && !e.is_user) else {
                return Ok(None);
            };
            if (e.length as usize) < len
                || e.offset < METADATA_TABLE_SIZE as u32
                || u64::from(e.offset) + u64::from(e.length) > u64::from(meta.length)
            {
                return Err(corrupt(
                    &name,
                    what,
                    meta.offset + u64::from(e.offset),
                    format!("{} bytes at {} of the metadata region", e.length, e.offset),
                ));
            }
            let mut b = vec![0u8; len];
            self.read_raw(&mut b, meta.offset + u64::from(e.offset), what)?;
            Ok(Some(b))
        };
        let need = |v: Option<Vec<u8>>, what: &str| {
            v.ok_or_else(|| corrupt(&name, "metadata", meta.offset, format!("no {what} item")))
        };
        let fp = need(
            item(&META_FILE_PARAMETERS, 8, "file parameters")?,
            "file parameters",
        )?;
        let size = le64(
            &need(
                item(&META_VIRTUAL_DISK_SIZE, 8, "virtual disk size")?,
                "virtual disk size",
            )?,
            0,
        );
        let logical = le32(
            &need(
                item(&META_LOGICAL_SECTOR_SIZE, 4, "logical sector size")?,
                "logical sector size",
            )?,
            0,
        );
        let physical = item(&META_PHYSICAL_SECTOR_SIZE, 4, "physical sector size")?
            .map_or(512, |b| le32(&b, 0));
        let disk_id =
            item(&META_VIRTUAL_DISK_ID, 16, "virtual disk id")?.map_or([0; 16], |b| guid_at(&b, 0));
        let block_size = le32(&fp, 0);
        let flags = le32(&fp, 4);
        if flags & 2 != 0 || entries.iter().any(|e| e.item == META_PARENT_LOCATOR) {
            return Err(Error::Unsupported {
                file: name.clone(),
                what: "differencing VHDX (a disk with a parent): convert it with its parent to one without (qemu-img convert)".into(),
            });
        }
        let known = [
            META_FILE_PARAMETERS,
            META_VIRTUAL_DISK_SIZE,
            META_VIRTUAL_DISK_ID,
            META_LOGICAL_SECTOR_SIZE,
            META_PHYSICAL_SECTOR_SIZE,
        ];
        if let Some(e) = entries
            .iter()
            .find(|e| e.required && !e.is_user && !known.contains(&e.item))
        {
            return Err(Error::Unsupported {
                file: name.clone(),
                what: format!("required metadata item {}", format_guid(&e.item)),
            });
        }
        check_params(&name, block_size, logical, physical, size, meta.offset)?;

        // The BAT.
        let ratio = chunk_ratio(logical, block_size);
        let n = bat_entries(size, block_size, ratio);
        if n * 8 > u64::from(bat.length) {
            return Err(corrupt(
                &name,
                "BAT",
                bat.offset,
                format!("region of {} bytes for {n} entries of 8 bytes", bat.length),
            ));
        }
        if n * 8 > MAX_BAT_BYTES || n * 8 + bat.offset > file_len {
            return Err(corrupt(
                &name,
                "BAT",
                bat.offset,
                format!("{n} entries reach past the end of the file ({file_len} bytes)"),
            ));
        }
        let mut raw = vec![0u8; (n * 8) as usize];
        self.read_raw(&mut raw, bat.offset, "BAT")?;
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        // A block outside the file (a truncated or damaged image) reads as
        // an error; writing such an image could put a new block where the
        // entry points, so it is refused.
        if self.writable {
            let bs = u64::from(block_size);
            let blocks = size.div_ceil(bs);
            for b in 0..blocks {
                let i = bat_index(b, ratio);
                let Some(&e) = table.get(i as usize) else {
                    break;
                };
                let at = entry_offset(e);
                let need = bs.min(size - b * bs);
                if payload_state(e) == Some(BlockState::FullyPresent)
                    && (at < HEADER_SECTION || at.saturating_add(need) > file_len)
                {
                    return Err(corrupt(
                        &name,
                        &format!("BAT entry {i}"),
                        bat.offset + i * 8,
                        format!(
                            "block {b} at {at} is outside the file's data ({file_len} bytes): the image is damaged or cut short; it opens read-only (csvctl vhd check shows every such block)"
                        ),
                    ));
                }
            }
        }
        let end = [
            file_len,
            bat.offset + u64::from(bat.length),
            meta.offset + u64::from(meta.length),
            log_offset + log_length,
        ]
        .into_iter()
        .max()
        .unwrap_or(file_len)
        .next_multiple_of(MIB);
        self.bat_offset = bat.offset;
        self.meta_offset = meta.offset;
        self.block_size = block_size;
        self.logical_sector = logical;
        self.physical_sector = physical;
        self.size = size;
        self.disk_id = disk_id;
        self.leave_allocated = flags & 1 != 0;
        self.chunk_ratio = ratio;
        self.bat = RwLock::new(table);
        self.writer = Mutex::new(Writer { end, sequence: 0 });
        Ok(())
    }

    /// Writes the next header: `change` applied to the current one, with
    /// the next sequence number, into the other slot, and then again into
    /// this one, so both copies are current ([MS-VHDX] 2.2.2.1).
    fn update_header(&self, change: impl FnOnce(&mut Header)) -> Result<()> {
        let mut g = self.header.lock().map_err(|_| lock_err(&self.name))?;
        write_headers(&self.io, &self.name, &mut g, change)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn logical_sector(&self) -> u32 {
        self.logical_sector
    }

    pub fn physical_sector(&self) -> u32 {
        self.physical_sector
    }

    pub fn disk_id(&self) -> Guid {
        self.disk_id
    }

    /// What made the file (its identifier's creator).
    pub fn creator(&self) -> &str {
        &self.creator
    }

    /// Whether its blocks were all allocated when it was made (a fixed
    /// disk; the file parameters' LeaveBlocksAllocated flag).
    pub fn is_fixed(&self) -> bool {
        self.leave_allocated
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Log entries replayed when it was opened.
    pub fn replayed(&self) -> usize {
        self.replayed
    }

    /// The current header.
    pub fn header(&self) -> Result<Header> {
        Ok(self
            .header
            .lock()
            .map_err(|_| lock_err(&self.name))?
            .0
            .clone())
    }

    /// Payload blocks in the file.
    pub fn allocated_blocks(&self) -> Result<u64> {
        let bat = self.bat.read().map_err(|_| lock_err(&self.name))?;
        Ok((0..self.blocks())
            .filter(|b| {
                bat.get(bat_index(*b, self.chunk_ratio) as usize)
                    .is_some_and(|e| payload_state(*e) == Some(BlockState::FullyPresent))
            })
            .count() as u64)
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.block_size))
    }

    /// The BAT entry of payload block `block`.
    fn block_entry(&self, block: u64) -> Result<u64> {
        let bat = self.bat.read().map_err(|_| lock_err(&self.name))?;
        let i = bat_index(block, self.chunk_ratio);
        bat.get(i as usize).copied().ok_or_else(|| {
            corrupt(
                &self.name,
                &format!("BAT entry {i}"),
                self.bat_offset + i * 8,
                "missing",
            )
        })
    }

    fn range(&self, op: &'static str, offset: u64, len: usize) -> Result<()> {
        if offset.checked_add(len as u64).is_none_or(|e| e > self.size) {
            return Err(Error::OutOfRange {
                file: self.name.clone(),
                op,
                offset,
                len: len as u64,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Where payload block `block`'s data is in the file; None when it
    /// reads as zeros.
    fn block_at(&self, block: u64) -> Result<Option<u64>> {
        let e = self.block_entry(block)?;
        let i = bat_index(block, self.chunk_ratio);
        match payload_state(e) {
            Some(BlockState::FullyPresent) => {
                let at = entry_offset(e);
                if at < HEADER_SECTION {
                    return Err(corrupt(
                        &self.name,
                        &format!("BAT entry {i}"),
                        self.bat_offset + i * 8,
                        format!("block {block} at {at}, inside the header section"),
                    ));
                }
                Ok(Some(at))
            }
            Some(BlockState::PartiallyPresent) => Err(corrupt(
                &self.name,
                &format!("BAT entry {i}"),
                self.bat_offset + i * 8,
                format!("block {block} is partially present in a disk without a parent"),
            )),
            Some(_) => Ok(None),
            None => Err(corrupt(
                &self.name,
                &format!("BAT entry {i}"),
                self.bat_offset + i * 8,
                format!("block {block} has the unknown state {}", entry_state(e)),
            )),
        }
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.range("read", offset, buf.len())?;
        let bs = u64::from(self.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (block, within) = (off / bs, off % bs);
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match self.block_at(block)? {
                Some(at) => self.read_raw(part, at + within, "block")?,
                None => part.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` to the virtual disk at `offset`, allocating blocks as
    /// needed (see the module's crash-safety rules).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                file: self.name.clone(),
            });
        }
        self.range("write", offset, buf.len())?;
        let bs = u64::from(self.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (block, within) = (off / bs, off % bs);
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = &buf[done..done + n];
            let at = match self.block_at(block)? {
                Some(at) => at,
                None => {
                    if !crate::ops::is_zero(part) {
                        // (Zeros into a block that reads as zeros need
                        // nothing.)
                        self.allocate(block, within, part)?;
                    }
                    done += n;
                    continue;
                }
            };
            self.io.write_at(part, at + within).ctx(
                &self.name,
                || format!("write block {block}"),
                at + within,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Gives payload block `block` space (zeros), writes `part` into it at
    /// `within`, and commits its BAT entry through the log.
    fn allocate(&self, block: u64, within: u64, part: &[u8]) -> Result<()> {
        let mut w = self.writer.lock().map_err(|_| lock_err(&self.name))?;
        // Another writer may have made it meanwhile.
        if let Some(at) = self.block_at(block)? {
            return self.io.write_at(part, at + within).ctx(
                &self.name,
                || format!("write block {block}"),
                at + within,
            );
        }
        let bs = u64::from(self.block_size);
        let name = &self.name;
        let i = bat_index(block, self.chunk_ratio);
        // A block that reads as zeros but keeps its place in the file (a
        // fixed disk QEMU made, a block trimmed) is zeroed there and used
        // again; any other goes at the end of the file.
        let old = self.block_entry(block)?;
        let keep = entry_offset(old);
        let at = if keep >= HEADER_SECTION && keep + bs <= w.end && keep % MIB == 0 {
            zero_range(&self.io, name, keep, bs)?;
            keep
        } else {
            let at = w.end;
            self.io
                .set_len(at + bs)
                .ctx(name, || format!("extend for block {block}"), at)?;
            w.end = at + bs;
            at
        };
        self.io.write_at(part, at + within).ctx(
            name,
            || format!("write block {block}"),
            at + within,
        )?;
        self.io.flush().ctx(name, || "flush".into(), at)?;
        let e = entry(PAYLOAD_FULLY_PRESENT, at);
        let pos = self.bat_offset + i * 8;
        let sector_at = pos - pos % log::SECTOR as u64;
        let mut sector = vec![0u8; log::SECTOR];
        self.read_raw(&mut sector, sector_at, "BAT sector")?;
        let k = (pos - sector_at) as usize;
        sector[k..k + 8].copy_from_slice(&e.to_le_bytes());
        let end = w.end;
        self.log_and_write(
            &mut w,
            vec![log::Write::Sector {
                offset: sector_at,
                data: sector.into_boxed_slice(),
            }],
            end,
        )?;
        if let Some(x) = self
            .bat
            .write()
            .map_err(|_| lock_err(name))?
            .get_mut(i as usize)
        {
            *x = e;
        }
        Ok(())
    }

    /// Commits `writes` (whole sectors of metadata): a log entry, flushed,
    /// then the sectors in place, flushed. The file is `file_len` bytes
    /// long.
    fn log_and_write(&self, w: &mut Writer, writes: Vec<log::Write>, file_len: u64) -> Result<()> {
        let (guid, log_offset, log_length) = {
            let g = self.header.lock().map_err(|_| lock_err(&self.name))?;
            (g.0.log_guid, g.0.log_offset, u64::from(g.0.log_length))
        };
        // Every entry goes at the log's start, over the one before (whose
        // writes are in place and flushed): the log never holds two
        // entries of one log GUID, so no reader can replay an older one
        // after a newer (QEMU takes a run of entries in log order).
        w.sequence += 1;
        let at = 0u64;
        let e = log::build_entry(&writes, w.sequence, 0, &guid, file_len, file_len);
        if e.len() as u64 > log_length {
            return Err(Error::Invalid(format!(
                "{}: a log entry of {} bytes does not fit the log ({log_length} bytes)",
                self.name,
                e.len()
            )));
        }
        let name = &self.name;
        self.io.write_at(&e, log_offset + at).ctx(
            name,
            || "write log entry".into(),
            log_offset + at,
        )?;
        self.io.flush().ctx(name, || "flush".into(), 0)?;
        for wr in &writes {
            match wr {
                log::Write::Sector { offset, data } => self.io.write_at(data, *offset).ctx(
                    name,
                    || "write metadata".into(),
                    *offset,
                )?,
                log::Write::Zero { offset, length } => {
                    zero_range(&self.io, name, *offset, *length)?
                }
            }
        }
        self.io.flush().ctx(name, || "flush".into(), 0)?;
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.io.flush().ctx(&self.name, || "flush".into(), 0)
    }

    /// Flushes and marks the log empty (a clean close): readers need not
    /// replay it. Dropping a writable image does the same, ignoring errors.
    pub fn close(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.flush()?;
        self.update_header(|h| h.log_guid = [0; 16])
    }

    /// The underlying I/O.
    pub fn io(&self) -> &I {
        &self.io
    }

    /// A consistency check: every finding, errors and warnings.
    pub fn check(&self) -> Result<Vec<Finding>> {
        let mut out = self.notes.clone();
        if self.replayed > 0 {
            out.push(Finding {
                severity: Severity::Warning,
                structure: "log".into(),
                offset: None,
                problem: format!(
                    "{} entr{} replayed at open{}",
                    self.replayed,
                    if self.replayed == 1 { "y" } else { "ies" },
                    if self.writable {
                        ""
                    } else {
                        " (in memory: the file still needs the replay; open it for writing)"
                    }
                ),
            });
        }
        let len = self.io.len().ctx(&self.name, || "stat".into(), 0)?;
        let bat = self.bat.read().map_err(|_| lock_err(&self.name))?;
        let bs = u64::from(self.block_size);
        let mut used: Vec<(u64, u64)> = Vec::new();
        for (i, e) in bat.iter().enumerate() {
            let i = i as u64;
            let pos = self.bat_offset + i * 8;
            let bitmap = (i + 1) % (self.chunk_ratio + 1) == 0;
            if bitmap {
                if entry_state(*e) != SB_NOT_PRESENT {
                    out.push(Finding {
                        severity: Severity::Warning,
                        structure: format!("BAT entry {i}"),
                        offset: Some(pos),
                        problem: format!(
                            "a sector bitmap entry in state {} in a disk without a parent",
                            entry_state(*e)
                        ),
                    });
                }
                continue;
            }
            match payload_state(*e) {
                None => out.push(Finding {
                    severity: Severity::Error,
                    structure: format!("BAT entry {i}"),
                    offset: Some(pos),
                    problem: format!("unknown state {}", entry_state(*e)),
                }),
                Some(BlockState::PartiallyPresent) => out.push(Finding {
                    severity: Severity::Error,
                    structure: format!("BAT entry {i}"),
                    offset: Some(pos),
                    problem: "partially present in a disk without a parent".into(),
                }),
                Some(BlockState::FullyPresent) => {
                    let at = entry_offset(*e);
                    let block = i - i / (self.chunk_ratio + 1);
                    let need = bs.min(self.size.saturating_sub(block * bs));
                    if at < HEADER_SECTION || at.saturating_add(need) > len {
                        out.push(Finding {
                            severity: Severity::Error,
                            structure: format!("BAT entry {i}"),
                            offset: Some(pos),
                            problem: format!(
                                "block at {at}..{} is outside the file's data ({len} bytes)",
                                at + bs
                            ),
                        });
                    }
                    used.push((at, i));
                }
                Some(_) => {}
            }
        }
        // No two blocks share space, and none overlaps the metadata.
        used.sort();
        for w in used.windows(2) {
            if w[0].0 + bs > w[1].0 {
                out.push(Finding {
                    severity: Severity::Error,
                    structure: format!("BAT entry {}", w[1].1),
                    offset: Some(self.bat_offset + w[1].1 * 8),
                    problem: format!("its block overlaps entry {}'s", w[0].1),
                });
            }
        }
        let fixed_regions = [
            (
                self.bat_offset,
                (bat.len() as u64 * 8).next_multiple_of(MIB),
            ),
            (self.meta_offset, MIB),
        ];
        for (at, i) in &used {
            if fixed_regions
                .iter()
                .any(|(s, l)| *at < s + l && s < &(at + bs))
            {
                out.push(Finding {
                    severity: Severity::Error,
                    structure: format!("BAT entry {i}"),
                    offset: Some(self.bat_offset + i * 8),
                    problem: "its block overlaps the BAT or the metadata".into(),
                });
            }
        }
        Ok(out)
    }
}

impl<I: BlockIo> Drop for Vhdx<I> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Writes the next header: `change` applied to `current` (the header and
/// its slot), with the next sequence number, into the other slot, and then
/// again into this one, so that both copies are current ([MS-VHDX]
/// 2.2.2.1); each write flushed.
fn write_headers(
    io: &dyn BlockIo,
    name: &str,
    current: &mut (Header, usize),
    change: impl FnOnce(&mut Header),
) -> Result<()> {
    let (mut h, mut slot) = current.clone();
    change(&mut h);
    for _ in 0..2 {
        slot = 1 - slot;
        h.sequence += 1;
        let at = HEADER_OFFSETS[slot];
        io.write_at(&h.to_bytes(), at)
            .ctx(name, || "write header".into(), at)?;
        io.flush().ctx(name, || "flush".into(), at)?;
    }
    *current = (h, slot);
    Ok(())
}

/// Writes `length` zeros at `offset`.
fn zero_range(io: &dyn BlockIo, name: &str, offset: u64, length: u64) -> Result<()> {
    let zeros = vec![0u8; MIB as usize];
    let mut done = 0;
    while done < length {
        let n = (length - done).min(MIB);
        io.write_at(&zeros[..n as usize], offset + done).ctx(
            name,
            || "write zeros".into(),
            offset + done,
        )?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
