//! An open VHD: create, open, read, write, flush; the BAT and the sector
//! bitmaps of dynamic and differencing disks.
//!
//! Layout of a disk this crate creates:
//!
//! ```text
//! fixed:        [ data (size bytes) ][ footer ]
//! dynamic:      [ footer copy ][ header ][ BAT ][ locators ][ block ]...[ footer ]
//! block:        [ pad ][ sector bitmap ][ data (block size) ]   data 4 KiB-aligned
//! ```

use crate::error::{Error, IoContext, Result};
use crate::footer::{DiskType, Footer, Geometry, FOOTER_SIZE, OLD_FOOTER_SIZE};
use crate::header::{self, DynHeader, Locator, HEADER_SIZE};
use crate::io::BlockIo;
use crate::{parent, SECTOR};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

mod open;

use open::metadata_regions;

/// A BAT entry of a block that is not allocated.
pub const UNALLOCATED: u32 = u32::MAX;
/// Alignment of a block's data area in files this crate writes.
pub const DATA_ALIGN: u64 = 4096;
/// Longest parent chain followed.
pub const MAX_CHAIN: usize = 64;
/// Largest BAT accepted (entries): 2^28 blocks is 512 TiB of 2 MiB blocks,
/// beyond the format's 2 TiB limit; larger is a corrupt header.
pub const MAX_BAT_ENTRIES: u32 = 1 << 28;
/// Largest virtual size created (the VHD format's limit, 2040 GiB).
pub const MAX_SIZE: u64 = 2040 << 30;

/// The parent of a differencing disk, on whatever I/O it was opened.
pub type ParentDisk = Vhd<Box<dyn BlockIo>>;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open for writing (the parent chain stays read-only unless
    /// `write_parent`).
    pub write: bool,
    /// Open the immediate parent for writing too (used by merge).
    pub write_parent: bool,
    /// Accept a parent whose time stamp differs from the one recorded in
    /// the child (the unique id must still match).
    pub ignore_parent_timestamp: bool,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// Virtual size in bytes (rounded up to whole sectors). Ignored for a
    /// differencing disk, which takes its parent's size.
    pub size: u64,
    /// Block size of a dynamic or differencing disk (a power of two).
    pub block_size: u32,
    /// Parent of a differencing disk.
    pub parent: Option<PathBuf>,
    /// Round the size up to what its CHS geometry addresses, as Virtual PC
    /// and `qemu-img create` (without `force_size`) do.
    pub chs_size: bool,
    /// Allocate a fixed disk's space up front (`fallocate`).
    pub preallocate: bool,
}

impl CreateOptions {
    /// A disk of `disk_type` and `size` with default settings.
    pub fn new(disk_type: DiskType, size: u64) -> Self {
        CreateOptions {
            disk_type,
            size,
            block_size: header::DEFAULT_BLOCK_SIZE,
            parent: None,
            chs_size: false,
            preallocate: false,
        }
    }
}

/// Where a child's parent is, for the child's header and locators.
#[derive(Debug, Clone)]
pub struct ParentRef {
    /// Parent's unique id.
    pub unique_id: [u8; 16],
    /// Parent's time stamp (its footer's).
    pub timestamp: u32,
    /// Parent's virtual size.
    pub size: u64,
    /// File name for the header's parent-name field.
    pub name: String,
    /// Absolute path (W2ku locator).
    pub absolute: Option<String>,
    /// Path relative to the child (W2ru locator).
    pub relative: Option<String>,
}

/// State of a dynamic or differencing disk beyond the footer.
#[derive(Debug)]
struct Sparse {
    header: DynHeader,
    header_offset: u64,
    block_size: u64,
    bitmap_size: u64,
    bat: RwLock<Vec<u32>>,
    /// Sector bitmaps of a differencing disk's blocks, loaded on first use.
    bitmaps: RwLock<HashMap<u32, Box<[u8]>>>,
    /// Serialises allocation and bitmap updates; holds the offset of the
    /// footer at the end of the file (where the next block goes).
    end: Mutex<u64>,
}

/// An open VHD image on `I`.
pub struct Vhd<I: BlockIo> {
    io: I,
    name: String,
    path: Option<PathBuf>,
    footer: Footer,
    size: u64,
    writable: bool,
    sparse: Option<Sparse>,
    parent: Option<Box<ParentDisk>>,
    footer_recovered: bool,
}

impl<I: BlockIo> std::fmt::Debug for Vhd<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("name", &self.name)
            .field("type", &self.footer.disk_type())
            .field("size", &self.size)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

fn lock_err(name: &str) -> Error {
    Error::Invalid(format!(
        "{name}: internal lock poisoned by an earlier panic"
    ))
}

/// 16 random bytes for a unique id.
pub fn random_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    let ok = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id));
    if ok.is_err() {
        // No /dev/urandom: time and pid are unique enough for an image id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id[..16].copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    // RFC 4122 version 4, variant 1.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

fn open_file(path: &Path, write: bool) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
}

impl Vhd<crate::io::DirectFile> {
    /// Opens the image at `path` with `O_DIRECT`, bypassing the host's page
    /// cache (as a VMM does for a guest's disk). Falls back to cached I/O
    /// where the file system refuses `O_DIRECT`.
    pub fn open_direct(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = crate::io::DirectFile::open(path, opts.write).ctx(&name, || "open".into(), 0)?;
        Vhd::open_on(file, &name, Some(path), opts)
    }
}

impl Vhd<File> {
    /// Opens the image at `path` (and its parents, for a differencing disk).
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = open_file(path, opts.write).ctx(&name, || "open".into(), 0)?;
        Vhd::open_on(file, &name, Some(path), opts)
    }

    /// Creates an image at `path` (refusing to overwrite an existing file)
    /// and returns it open for writing.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let mut opts = opts.clone();
        let parent = match (&opts.disk_type, &opts.parent) {
            (DiskType::Differencing, Some(p)) => {
                let pvhd = Vhd::open(p, &OpenOptions::default())?;
                let abs = std::fs::canonicalize(p).ctx(
                    &p.display().to_string(),
                    || "resolve path".into(),
                    0,
                )?;
                let child_dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => {
                        std::fs::canonicalize(d).ctx(&name, || "resolve directory".into(), 0)?
                    }
                    _ => std::env::current_dir().ctx(&name, || "resolve directory".into(), 0)?,
                };
                if let Some(ps) = pvhd.sparse.as_ref() {
                    opts.block_size = ps.header.block_size;
                }
                Some(ParentRef {
                    unique_id: pvhd.footer.unique_id,
                    timestamp: pvhd.footer.timestamp,
                    size: pvhd.size,
                    name: abs
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    absolute: Some(abs.to_string_lossy().into_owned()),
                    relative: parent::relative_windows_path(&child_dir, &abs),
                })
            }
            (DiskType::Differencing, None) => {
                return Err(Error::Invalid("a differencing disk needs a parent".into()))
            }
            (_, Some(_)) => {
                return Err(Error::Invalid(format!(
                    "a {} disk has no parent; use a differencing disk",
                    opts.disk_type.name()
                )))
            }
            _ => None,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .ctx(&name, || "create".into(), 0)?;
        if opts.preallocate && opts.disk_type == DiskType::Fixed {
            let size = opts.size.next_multiple_of(SECTOR) + SECTOR;
            fallocate(&file, size).ctx(&name, || "preallocate".into(), 0)?;
        }
        let made = Vhd::create_on(&file, &name, &opts, parent.as_ref());
        if let Err(e) = made {
            // Do not leave a half-made image behind.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Vhd::open(
            path,
            &OpenOptions {
                write: true,
                ..Default::default()
            },
        )
    }
}

fn fallocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: fallocate on a valid open descriptor; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl<I: BlockIo> Vhd<I> {
    /// Writes a new, empty image of the requested kind onto `io` (which
    /// should be empty). A differencing disk needs `parent`.
    pub fn create_on(
        io: &I,
        name: &str,
        opts: &CreateOptions,
        parent: Option<&ParentRef>,
    ) -> Result<()> {
        let mut size = match (opts.disk_type, parent) {
            (DiskType::Differencing, Some(p)) => p.size,
            (DiskType::Differencing, None) => {
                return Err(Error::Invalid("a differencing disk needs a parent".into()))
            }
            _ => opts.size,
        };
        if size == 0 {
            return Err(Error::Invalid("size must be more than 0 bytes".into()));
        }
        size = size.next_multiple_of(SECTOR);
        if opts.chs_size {
            size = Geometry::round_size(size);
        }
        if size > MAX_SIZE {
            return Err(Error::Invalid(format!(
                "size {size} is beyond the VHD format's limit of {MAX_SIZE} bytes (2040 GiB)"
            )));
        }
        let bs = opts.block_size;
        if opts.disk_type.is_sparse() && (!bs.is_power_of_two() || u64::from(bs) < SECTOR) {
            return Err(Error::Invalid(format!(
                "block size {bs} is not a power of two of at least 512 bytes"
            )));
        }
        let mut footer = Footer::new(opts.disk_type, size, random_id());
        if opts.disk_type == DiskType::Fixed {
            let fb = footer.to_bytes();
            io.write_at(&fb, size)
                .ctx(name, || "write footer".into(), size)?;
            io.flush().ctx(name, || "flush".into(), 0)?;
            return Ok(());
        }
        let entries = u32::try_from(size.div_ceil(u64::from(bs)))
            .map_err(|_| Error::Invalid("too many blocks".into()))?;
        let header_offset = SECTOR;
        let table_offset = header_offset + HEADER_SIZE as u64;
        let mut h = DynHeader::new(table_offset, entries, bs);
        let mut end = table_offset + h.bat_size();
        let mut locator_data: Vec<(u64, Vec<u8>)> = Vec::new();
        if let Some(p) = parent {
            h.parent_unique_id = p.unique_id;
            h.parent_timestamp = p.timestamp;
            h.parent_name = p.name.clone();
            let mut slot = 0;
            for (code, path) in [(header::W2KU, &p.absolute), (header::W2RU, &p.relative)] {
                let Some(path) = path else { continue };
                let data = header::encode_locator(path);
                let space = (data.len() as u64).next_multiple_of(SECTOR).max(SECTOR);
                h.locators[slot] = Locator {
                    code,
                    data_space: (space / SECTOR) as u32,
                    data_len: data.len() as u32,
                    data_offset: end,
                };
                locator_data.push((end, data));
                end += space;
                slot += 1;
            }
        }
        footer.data_offset = header_offset;
        let bat = vec![0xffu8; h.bat_size() as usize];
        io.write_at(&h.to_bytes(), header_offset).ctx(
            name,
            || "write dynamic header".into(),
            header_offset,
        )?;
        io.write_at(&bat, table_offset)
            .ctx(name, || "write BAT".into(), table_offset)?;
        for (off, data) in &locator_data {
            io.write_at(data, *off)
                .ctx(name, || "write parent locator".into(), *off)?;
        }
        let fb = footer.to_bytes();
        io.write_at(&fb, 0)
            .ctx(name, || "write footer copy".into(), 0)?;
        io.write_at(&fb, end)
            .ctx(name, || "write footer".into(), end)?;
        io.flush().ctx(name, || "flush".into(), 0)?;
        Ok(())
    }

    /// The file (or LUN) name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path the image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Size of the virtual disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type()
    }

    /// The dynamic header of a dynamic or differencing disk.
    pub fn header(&self) -> Option<&DynHeader> {
        self.sparse.as_ref().map(|s| &s.header)
    }

    /// The parent of a differencing disk.
    pub fn parent(&self) -> Option<&ParentDisk> {
        self.parent.as_deref()
    }

    /// Whether the footer at the end was missing and the copy at offset 0
    /// was used (a crash during allocation; a read-write open repairs it).
    pub fn footer_recovered(&self) -> bool {
        self.footer_recovered
    }

    /// Whether the image is open for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The underlying I/O.
    pub fn io(&self) -> &I {
        &self.io
    }

    /// Block size of a sparse disk.
    pub fn block_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(|s| s.block_size)
    }

    /// The BAT of a sparse disk (sector offsets; [`UNALLOCATED`] for none).
    pub fn bat(&self) -> Result<Vec<u32>> {
        match &self.sparse {
            Some(s) => Ok(s.bat.read().map_err(|_| lock_err(&self.name))?.clone()),
            None => Ok(Vec::new()),
        }
    }

    /// Number of allocated blocks of a sparse disk.
    pub fn allocated_blocks(&self) -> Result<usize> {
        Ok(self.bat()?.iter().filter(|&&e| e != UNALLOCATED).count())
    }

    /// Offset where the next block would go (the end footer's offset).
    pub fn data_end(&self) -> Result<u64> {
        match &self.sparse {
            Some(s) => Ok(*s.end.lock().map_err(|_| lock_err(&self.name))?),
            None => Ok(self.size),
        }
    }

    fn range_check(&self, op: &'static str, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                file: self.name.clone(),
                op,
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.range_check("read", offset, buf.len())?;
        let Some(sp) = self.sparse.as_ref() else {
            return self
                .io
                .read_at(buf, offset)
                .ctx(&self.name, || "read data".into(), offset);
        };
        for (block, in_block, range) in block_spans(sp.block_size, offset, buf.len()) {
            self.read_in_block(sp, block, in_block, &mut buf[range])?;
        }
        Ok(())
    }

    /// Reads from the parent, or zeros where there is none (or beyond its
    /// end, for a child grown past its parent).
    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            Some(p) if offset < p.size => {
                let n = ((p.size - offset) as usize).min(buf.len());
                p.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_in_block(&self, sp: &Sparse, block: u32, in_block: u64, buf: &mut [u8]) -> Result<()> {
        let entry = sp.bat.read().map_err(|_| lock_err(&self.name))?[block as usize];
        let vpos = u64::from(block) * sp.block_size + in_block;
        if entry == UNALLOCATED {
            return self.read_parent(buf, vpos);
        }
        let data = u64::from(entry) * SECTOR + sp.bitmap_size;
        if self.parent.is_none() {
            // Dynamic disks: an allocated block is read whole, as QEMU and
            // Hyper-V do; never-written sectors in it are zeros.
            return self.io.read_at(buf, data + in_block).ctx(
                &self.name,
                || format!("read block {block}"),
                data + in_block,
            );
        }
        // Differencing: the bitmap says, sector by sector, child or parent.
        let bitmap = self.bitmap(sp, block, entry)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = in_block + done as u64;
            let sector = pos / SECTOR;
            let present = bit(&bitmap, sector);
            // Extend the run while sectors have the same source.
            let mut run_end = (sector + 1) * SECTOR;
            while run_end < in_block + buf.len() as u64 && bit(&bitmap, run_end / SECTOR) == present
            {
                run_end += SECTOR;
            }
            let n = ((run_end - pos) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            if present {
                self.io.read_at(chunk, data + pos).ctx(
                    &self.name,
                    || format!("read block {block}"),
                    data + pos,
                )?;
            } else {
                self.read_parent(chunk, vpos + done as u64)?;
            }
            done += n;
        }
        Ok(())
    }

    fn bitmap(&self, sp: &Sparse, block: u32, entry: u32) -> Result<Box<[u8]>> {
        if let Some(b) = sp
            .bitmaps
            .read()
            .map_err(|_| lock_err(&self.name))?
            .get(&block)
        {
            return Ok(b.clone());
        }
        let off = u64::from(entry) * SECTOR;
        let mut b = vec![0u8; sp.bitmap_size as usize].into_boxed_slice();
        self.io.read_at(&mut b, off).ctx(
            &self.name,
            || format!("read block {block} bitmap"),
            off,
        )?;
        sp.bitmaps
            .write()
            .map_err(|_| lock_err(&self.name))?
            .insert(block, b.clone());
        Ok(b)
    }

    /// The sector bitmap of `block` of a sparse disk (`None` when the
    /// block is not allocated).
    pub fn block_bitmap(&self, block: u32) -> Result<Option<Box<[u8]>>> {
        let Some(sp) = self.sparse.as_ref() else {
            return Ok(None);
        };
        let entry = match sp
            .bat
            .read()
            .map_err(|_| lock_err(&self.name))?
            .get(block as usize)
        {
            Some(&e) if e != UNALLOCATED => e,
            _ => return Ok(None),
        };
        self.bitmap(sp, block, entry).map(Some)
    }

    /// Writes `buf` to the virtual disk at `offset`.
    ///
    /// Concurrent writes that touch the same 512-byte sector are not
    /// ordered with each other (as on a disk); all others are independent.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                file: self.name.clone(),
            });
        }
        self.range_check("write", offset, buf.len())?;
        let Some(sp) = self.sparse.as_ref() else {
            return self
                .io
                .write_at(buf, offset)
                .ctx(&self.name, || "write data".into(), offset);
        };
        for (block, in_block, range) in block_spans(sp.block_size, offset, buf.len()) {
            self.write_in_block(sp, block, in_block, &buf[range])?;
        }
        Ok(())
    }

    fn write_in_block(&self, sp: &Sparse, block: u32, in_block: u64, data: &[u8]) -> Result<()> {
        // Whole sectors only below this point: complete partial ones with
        // what the disk holds now.
        let start = in_block / SECTOR * SECTOR;
        let end = (in_block + data.len() as u64).next_multiple_of(SECTOR);
        let owned;
        let aligned: &[u8] = if start == in_block && end == in_block + data.len() as u64 {
            data
        } else {
            let mut b = vec![0u8; (end - start) as usize];
            self.read_in_block(sp, block, start, &mut b[..SECTOR as usize])?;
            if end - start > SECTOR {
                let last = (end - start - SECTOR) as usize;
                self.read_in_block(sp, block, end - SECTOR, &mut b[last..])?;
            }
            let at = (in_block - start) as usize;
            b[at..at + data.len()].copy_from_slice(data);
            owned = b;
            &owned
        };
        let entry = sp.bat.read().map_err(|_| lock_err(&self.name))?[block as usize];
        if entry == UNALLOCATED && self.allocate(sp, block, start, aligned)? {
            return Ok(());
        }
        let entry = sp.bat.read().map_err(|_| lock_err(&self.name))?[block as usize];
        let base = u64::from(entry) * SECTOR;
        let off = base + sp.bitmap_size + start;
        self.io
            .write_at(aligned, off)
            .ctx(&self.name, || format!("write block {block}"), off)?;
        if self.parent.is_some() {
            self.mark_present(sp, block, entry, start / SECTOR, (end - start) / SECTOR)?;
        }
        Ok(())
    }

    /// Sets the bitmap bits of `count` sectors from `first` of an allocated
    /// block of a differencing disk, after the data they cover is durable.
    fn mark_present(
        &self,
        sp: &Sparse,
        block: u32,
        entry: u32,
        first: u64,
        count: u64,
    ) -> Result<()> {
        let bitmap = self.bitmap(sp, block, entry)?;
        if (first..first + count).all(|s| bit(&bitmap, s)) {
            return Ok(());
        }
        let _guard = sp.end.lock().map_err(|_| lock_err(&self.name))?;
        let mut map = sp.bitmaps.write().map_err(|_| lock_err(&self.name))?;
        let Some(b) = map.get_mut(&block) else {
            return Err(lock_err(&self.name));
        };
        for s in first..first + count {
            set_bit(b, s);
        }
        let copy = b.clone();
        drop(map);
        // Data first, then the bits that make it visible.
        self.io.flush().ctx(&self.name, || "flush".into(), 0)?;
        let off = u64::from(entry) * SECTOR;
        self.io.write_at(&copy, off).ctx(
            &self.name,
            || format!("write block {block} bitmap"),
            off,
        )?;
        Ok(())
    }

    /// Allocates `block` and writes `data` (whole sectors at `start` within
    /// the block) into it. Returns false when another thread allocated the
    /// block first (the caller then writes into that).
    fn allocate(&self, sp: &Sparse, block: u32, start: u64, data: &[u8]) -> Result<bool> {
        let name = &self.name;
        let mut end = sp.end.lock().map_err(|_| lock_err(name))?;
        if sp.bat.read().map_err(|_| lock_err(name))?[block as usize] != UNALLOCATED {
            return Ok(false);
        }
        let old_end = *end;
        let data_off = (old_end + sp.bitmap_size).next_multiple_of(DATA_ALIGN);
        let bitmap_off = data_off - sp.bitmap_size;
        let new_end = data_off + sp.block_size;
        let sector = u32::try_from(bitmap_off / SECTOR).map_err(|_| Error::Unsupported {
            file: name.clone(),
            what: format!("block at offset {bitmap_off}, beyond a BAT entry's reach"),
        })?;
        // Bitmap: a dynamic disk's new block is all present (its unwritten
        // sectors read as the zeros of a hole); a differencing disk's has
        // just the sectors written here, the rest still come from the parent.
        let mut bitmap = vec![0u8; sp.bitmap_size as usize].into_boxed_slice();
        if self.parent.is_none() {
            let sectors = sp.block_size / SECTOR;
            bitmap[..(sectors / 8) as usize].fill(0xff);
        } else {
            for s in start / SECTOR..(start + data.len() as u64) / SECTOR {
                set_bit(&mut bitmap, s);
            }
        }
        // 1. Padding (over the old footer) and bitmap in one write; data.
        let mut head = vec![0u8; (data_off - old_end) as usize];
        let at = (bitmap_off - old_end) as usize;
        head[at..].copy_from_slice(&bitmap);
        self.io.write_at(&head, old_end).ctx(
            name,
            || format!("write block {block} bitmap"),
            bitmap_off,
        )?;
        self.io.write_at(data, data_off + start).ctx(
            name,
            || format!("write block {block}"),
            data_off + start,
        )?;
        self.io.flush().ctx(name, || "flush".into(), 0)?;
        // 2. Footer at the new end.
        self.io.write_at(&self.footer.to_bytes(), new_end).ctx(
            name,
            || "write footer".into(),
            new_end,
        )?;
        self.io.flush().ctx(name, || "flush".into(), 0)?;
        // 3. The BAT entry: only now does the block exist.
        let eoff = sp.header.table_offset + 4 * u64::from(block);
        self.io.write_at(&sector.to_be_bytes(), eoff).ctx(
            name,
            || format!("write BAT entry {block}"),
            eoff,
        )?;
        if self.parent.is_some() {
            sp.bitmaps
                .write()
                .map_err(|_| lock_err(name))?
                .insert(block, bitmap);
        }
        sp.bat.write().map_err(|_| lock_err(name))?[block as usize] = sector;
        *end = new_end;
        Ok(true)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.io.flush().ctx(&self.name, || "flush".into(), 0)
    }

    /// Rewrites the footer (at the end, and the copy at 0 of a sparse disk)
    /// and, for a sparse disk, the first sector of the header; used by
    /// resize. Only the header's first sector changes in a resize, so the
    /// header write is a single-sector (atomic) write.
    pub(crate) fn rewrite_metadata(
        &mut self,
        footer: Footer,
        header: Option<DynHeader>,
        new_end: Option<u64>,
    ) -> Result<()> {
        let name = self.name.clone();
        let fb = footer.to_bytes();
        match &mut self.sparse {
            None => {
                let at = footer.current_size;
                self.io
                    .write_at(&fb, at)
                    .ctx(&name, || "write footer".into(), at)?;
                self.io.flush().ctx(&name, || "flush".into(), 0)?;
            }
            Some(sp) => {
                let mut end = sp.end.lock().map_err(|_| lock_err(&name))?;
                if let Some(e) = new_end {
                    *end = e;
                }
                self.io
                    .write_at(&fb, *end)
                    .ctx(&name, || "write footer".into(), *end)?;
                self.io.flush().ctx(&name, || "flush".into(), 0)?;
                if let Some(h) = header {
                    let hb = h.to_bytes();
                    self.io
                        .write_at(&hb[..SECTOR as usize], sp.header_offset)
                        .ctx(&name, || "write dynamic header".into(), sp.header_offset)?;
                    self.io.flush().ctx(&name, || "flush".into(), 0)?;
                    sp.header = h;
                }
                self.io
                    .write_at(&fb, 0)
                    .ctx(&name, || "write footer copy".into(), 0)?;
                self.io.flush().ctx(&name, || "flush".into(), 0)?;
            }
        }
        self.size = footer.virtual_size();
        self.footer = footer;
        Ok(())
    }

    /// Grows the BAT of a sparse disk to `entries`, moving it to the end of
    /// the file when it has no room where it is. Returns the new header.
    pub(crate) fn grow_bat(&mut self, entries: u32) -> Result<DynHeader> {
        let name = self.name.clone();
        let Some(sp) = self.sparse.as_mut() else {
            return Err(Error::Invalid(format!("{name} has no BAT")));
        };
        let mut h = sp.header.clone();
        let mut bat = sp.bat.write().map_err(|_| lock_err(&name))?;
        if entries as usize <= bat.len() {
            return Ok(h);
        }
        // Room up to the first thing after the BAT (a block or a locator)?
        let mut next = *sp.end.lock().map_err(|_| lock_err(&name))?;
        for &e in bat.iter().filter(|&&e| e != UNALLOCATED) {
            next = next.min(u64::from(e) * SECTOR);
        }
        for l in h.locators.iter().filter(|l| l.code != 0) {
            if l.data_offset > h.table_offset {
                next = next.min(l.data_offset);
            }
        }
        bat.resize(entries as usize, UNALLOCATED);
        let raw: Vec<u8> = bat.iter().flat_map(|e| e.to_be_bytes()).collect();
        let mut padded = raw.clone();
        padded.resize((raw.len() as u64).next_multiple_of(SECTOR) as usize, 0xff);
        if h.table_offset + padded.len() as u64 <= next {
            self.io.write_at(&padded, h.table_offset).ctx(
                &name,
                || "write BAT".into(),
                h.table_offset,
            )?;
        } else {
            let mut end = sp.end.lock().map_err(|_| lock_err(&name))?;
            let at = *end;
            self.io
                .write_at(&padded, at)
                .ctx(&name, || "write relocated BAT".into(), at)?;
            *end = at + padded.len() as u64;
            h.table_offset = at;
        }
        h.max_table_entries = entries;
        Ok(h)
    }
}

/// Splits `len` bytes at virtual `offset` at block boundaries: (block,
/// offset in the block, range of the caller's buffer) for each piece.
fn block_spans(
    block_size: u64,
    offset: u64,
    len: usize,
) -> impl Iterator<Item = (u32, u64, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let in_block = pos % block_size;
        let n = ((block_size - in_block) as usize).min(len - done);
        let piece = ((pos / block_size) as u32, in_block, done..done + n);
        done += n;
        Some(piece)
    })
}

/// Whether sector `s` is marked in a bitmap (MSB first).
pub fn bit(bitmap: &[u8], s: u64) -> bool {
    bitmap
        .get((s / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (s % 8)) != 0)
}

fn set_bit(bitmap: &mut [u8], s: u64) {
    if let Some(b) = bitmap.get_mut((s / 8) as usize) {
        *b |= 0x80 >> (s % 8);
    }
}

/// Internals that `ops` (compact) needs.
impl<I: BlockIo> Vhd<I> {
    /// (block size, bitmap size, table offset) of a sparse disk.
    pub(crate) fn sparse_layout(&self) -> Option<(u64, u64, u64)> {
        self.sparse
            .as_ref()
            .map(|s| (s.block_size, s.bitmap_size, s.header.table_offset))
    }

    /// Writes BAT entry `block` (and updates the in-memory BAT).
    pub(crate) fn write_bat_entry(&self, block: u32, entry: u32) -> Result<()> {
        let Some(sp) = self.sparse.as_ref() else {
            return Err(Error::Invalid(format!("{} has no BAT", self.name)));
        };
        let off = sp.header.table_offset + 4 * u64::from(block);
        self.io.write_at(&entry.to_be_bytes(), off).ctx(
            &self.name,
            || format!("write BAT entry {block}"),
            off,
        )?;
        sp.bat.write().map_err(|_| lock_err(&self.name))?[block as usize] = entry;
        if entry == UNALLOCATED {
            sp.bitmaps
                .write()
                .map_err(|_| lock_err(&self.name))?
                .remove(&block);
        }
        Ok(())
    }

    /// Moves the end footer to `end` and cuts the file after it.
    pub(crate) fn truncate_to(&self, end: u64) -> Result<()> {
        let Some(sp) = self.sparse.as_ref() else {
            return Err(Error::Invalid(format!("{} is not sparse", self.name)));
        };
        let mut e = sp.end.lock().map_err(|_| lock_err(&self.name))?;
        self.io.write_at(&self.footer.to_bytes(), end).ctx(
            &self.name,
            || "write footer".into(),
            end,
        )?;
        self.io.flush().ctx(&self.name, || "flush".into(), 0)?;
        self.io
            .set_len(end + FOOTER_SIZE as u64)
            .ctx(&self.name, || "truncate".into(), end)?;
        self.io.flush().ctx(&self.name, || "flush".into(), 0)?;
        *e = end;
        Ok(())
    }

    /// The metadata regions (start, end, name) blocks must keep clear of.
    pub(crate) fn metadata_regions(&self) -> Vec<(u64, u64, &'static str)> {
        match &self.sparse {
            None => Vec::new(),
            Some(sp) => metadata_regions(sp.header_offset, &sp.header),
        }
    }
}

impl<I: BlockIo> Vhd<I> {
    /// Where `len` bytes at virtual `offset` are in the file, when they are
    /// one contiguous run of this file's own data that an I/O engine may
    /// read or overwrite directly (an allocated block of a dynamic disk, a
    /// present run of a differencing disk, any range of a fixed disk).
    /// `None` means the request must go through [`Vhd::read_at`] or
    /// [`Vhd::write_at`] (it spans blocks, needs an allocation, or reads
    /// from a parent). Whole sectors only.
    pub fn direct_range(&self, offset: u64, len: u64) -> Option<u64> {
        if offset % SECTOR != 0 || len % SECTOR != 0 || offset.checked_add(len)? > self.size {
            return None;
        }
        let Some(sp) = self.sparse.as_ref() else {
            return Some(offset);
        };
        let block = offset / sp.block_size;
        let in_block = offset % sp.block_size;
        if in_block + len > sp.block_size {
            return None;
        }
        let entry = *sp.bat.read().ok()?.get(block as usize)?;
        if entry == UNALLOCATED {
            return None;
        }
        if self.parent.is_some() {
            let map = sp.bitmaps.read().ok()?;
            let b = map.get(&(block as u32))?;
            if !(in_block / SECTOR..(in_block + len) / SECTOR).all(|s| bit(b, s)) {
                return None;
            }
        }
        Some(u64::from(entry) * SECTOR + sp.bitmap_size + in_block)
    }
}
