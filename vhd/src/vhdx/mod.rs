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

mod check;
mod create;
pub mod format;
pub mod log;
mod open;

pub use create::CreateOptions;

use crate::check::Finding;
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

impl<I: BlockIo> Vhdx<I> {
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

    /// `len` bytes at `offset` of the virtual disk, block by block: (the
    /// block, the offset in it, the range of the request).
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (u64, u64, std::ops::Range<usize>)> {
        let bs = u64::from(self.block_size);
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let off = offset + done as u64;
            let (block, within) = (off / bs, off % bs);
            let n = ((bs - within) as usize).min(len - done);
            let r = done..done + n;
            done += n;
            Some((block, within, r))
        })
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.range("read", offset, buf.len())?;
        for (block, within, r) in self.pieces(offset, buf.len()) {
            let part = &mut buf[r];
            match self.block_at(block)? {
                Some(at) => self.read_raw(part, at + within, "block")?,
                None => part.fill(0),
            }
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
        for (block, within, r) in self.pieces(offset, buf.len()) {
            let part = &buf[r];
            match self.block_at(block)? {
                Some(at) => self.io.write_at(part, at + within).ctx(
                    &self.name,
                    || format!("write block {block}"),
                    at + within,
                )?,
                // Zeros into a block that reads as zeros need nothing.
                None if crate::ops::is_zero(part) => {}
                None => self.allocate(block, within, part)?,
            }
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
