//! Opening a VHDX: the identifier, the current header, the log's replay
//! (into the file, or kept in memory for a read-only open), the region
//! table, the metadata and the BAT.

use super::create::check_params;
use super::format::*;
use super::{
    is_vhdx, lock_err, log, write_headers, zero_range, Vhdx, Writer, MAX_BAT_BYTES, MAX_LOG,
};
use crate::check::{Finding, Severity};
use crate::error::{Error, IoContext, Result};
use crate::io::BlockIo;
use std::sync::{Mutex, RwLock};

impl<I: BlockIo> Vhdx<I> {
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
    pub(super) fn read_raw(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
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
}
