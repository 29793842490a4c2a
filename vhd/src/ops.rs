//! Operations on whole images: resize (grow), merge a child into its
//! parent, compact a sparse disk, convert between fixed, dynamic and raw.
//! Long operations report progress through a `(done, total)` callback.

use crate::disk::{CreateOptions, OpenOptions, Vhd, UNALLOCATED};
use crate::error::{Error, IoContext, Result};
use crate::footer::{DiskType, Geometry, CREATOR_APP, FOOTER_SIZE};
use crate::io::BlockIo;
use crate::SECTOR;
use std::fs::File;
use std::path::{Path, PathBuf};

/// A progress callback: bytes (or units) done out of a total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Chunk of a copy: large enough for throughput, small enough for memory.
const COPY_CHUNK: usize = 2 << 20;

/// Grows the virtual disk to `new_size` bytes (rounded up to whole
/// sectors). Shrinking is refused: it would cut off data.
pub fn resize<I: BlockIo>(vhd: &mut Vhd<I>, new_size: u64) -> Result<()> {
    if !vhd.is_writable() {
        return Err(Error::ReadOnly {
            file: vhd.name().into(),
        });
    }
    let new_size = new_size.next_multiple_of(SECTOR);
    let old = vhd.size();
    if new_size < old {
        return Err(Error::Invalid(format!(
            "{}: shrinking from {old} to {new_size} bytes is not supported (it would cut off data)",
            vhd.name()
        )));
    }
    if new_size > crate::disk::MAX_SIZE {
        return Err(Error::Invalid(format!(
            "{new_size} bytes is beyond the VHD limit of 2040 GiB"
        )));
    }
    if new_size == old && vhd.footer().current_size == new_size {
        return Ok(());
    }
    let mut f = vhd.footer().clone();
    f.current_size = new_size;
    f.geometry = Geometry::for_size(new_size);
    // Our creator code: readers then take the size from `current_size`
    // rather than from the geometry (which cannot express every size).
    f.creator_app = CREATOR_APP;
    match vhd.sparse_layout() {
        None => {
            let name = vhd.name().to_string();
            vhd.rewrite_metadata(f, None, None)?;
            // The old footer is now inside the disk: it must read as zeros.
            vhd.io().write_at(&[0u8; FOOTER_SIZE], old).ctx(
                &name,
                || "clear old footer".into(),
                old,
            )?;
            vhd.flush()
        }
        Some((bs, _, _)) => {
            let entries = u32::try_from(new_size.div_ceil(bs))
                .map_err(|_| Error::Invalid("too many blocks".into()))?;
            let h = vhd.grow_bat(entries)?;
            vhd.rewrite_metadata(f, Some(h), None)
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The parent the child was merged into.
    pub parent: PathBuf,
    /// Bytes copied from the child.
    pub bytes: u64,
}

/// Merges the differencing disk at `child` into its parent: every sector
/// the child holds is written to the parent, then the parent is flushed.
/// The child is left as it is (the caller deletes it; other children of
/// the same parent are no longer valid after a merge).
pub fn merge(child: &Path, opts: &OpenOptions, progress: Progress) -> Result<MergeReport> {
    let o = OpenOptions {
        write: false,
        write_parent: true,
        ..opts.clone()
    };
    let c = Vhd::open(child, &o)?;
    if c.disk_type() != DiskType::Differencing {
        return Err(Error::Invalid(format!(
            "{} is a {} disk: only a differencing disk can be merged",
            c.name(),
            c.disk_type().name()
        )));
    }
    let Some(p) = c.parent() else {
        return Err(Error::Invalid(format!("{} has no parent", c.name())));
    };
    let parent = p.path().map(Path::to_path_buf).unwrap_or_default();
    let (bs, _, _) =
        c.sparse_layout()
            .unwrap_or((u64::from(crate::header::DEFAULT_BLOCK_SIZE), 0, 0));
    let bat = c.bat()?;
    let total = bat.iter().filter(|&&e| e != UNALLOCATED).count() as u64;
    let mut done = 0;
    let mut bytes = 0;
    let mut buf = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let Some(bitmap) = c.block_bitmap(i as u32)? else {
            continue;
        };
        let first = i as u64 * bs;
        let sectors = (c.size().saturating_sub(first)).min(bs) / SECTOR;
        let mut s = 0;
        while s < sectors {
            if !crate::disk::bit(&bitmap, s) {
                s += 1;
                continue;
            }
            let start = s;
            while s < sectors && crate::disk::bit(&bitmap, s) {
                s += 1;
            }
            let off = first + start * SECTOR;
            let len = ((s - start) * SECTOR) as usize;
            buf.resize(len, 0);
            c.read_at(&mut buf, off)?;
            p.write_at(&buf, off)?;
            bytes += len as u64;
        }
        done += 1;
        progress(done, total);
    }
    p.flush()?;
    Ok(MergeReport { parent, bytes })
}

/// What a compaction did.
#[derive(Debug, Clone, Default)]
pub struct CompactReport {
    /// Blocks dropped (all zeros, or holding no sector of a child).
    pub dropped: u64,
    /// Blocks moved down to close holes.
    pub moved: u64,
    /// File bytes given back.
    pub freed: u64,
}

/// Compacts a dynamic or differencing disk: drops blocks that hold only
/// zeros (dynamic) or no sector at all (differencing), moves the remaining
/// blocks down over the holes, and shortens the file.
///
/// Each step is crash-safe: a block is unreferenced (its BAT entry cleared
/// and flushed) before its space is reused, and a block is copied to a
/// place that does not overlap its old one, flushed, and only then does
/// its BAT entry point there.
pub fn compact<I: BlockIo>(vhd: &mut Vhd<I>, progress: Progress) -> Result<CompactReport> {
    if !vhd.is_writable() {
        return Err(Error::ReadOnly {
            file: vhd.name().into(),
        });
    }
    let name = vhd.name().to_string();
    let Some((bs, bms, _)) = vhd.sparse_layout() else {
        return Err(Error::Invalid(format!(
            "{name} is a fixed disk: only dynamic and differencing disks can be compacted"
        )));
    };
    let before = vhd.io().len().ctx(&name, || "get length".into(), 0)?;
    let diff = vhd.parent().is_some();
    let bat = vhd.bat()?;
    let total = bat.iter().filter(|&&e| e != UNALLOCATED).count() as u64 * 2;
    let mut step = 0;
    let mut report = CompactReport::default();
    let mut buf = vec![0u8; bs as usize];
    // 1. Drop empty blocks.
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let drop_it = if diff {
            vhd.block_bitmap(i as u32)?
                .is_some_and(|b| b.iter().all(|&x| x == 0))
        } else {
            let data = u64::from(e) * SECTOR + bms;
            vhd.io()
                .read_at(&mut buf, data)
                .ctx(&name, || format!("read block {i}"), data)?;
            is_zero(&buf)
        };
        if drop_it {
            vhd.write_bat_entry(i as u32, UNALLOCATED)?;
            report.dropped += 1;
        }
        step += 1;
        progress(step, total);
    }
    vhd.flush()?;
    // 2. Pack the rest towards the start.
    let footprint = bms + bs;
    let mut blocks: Vec<(u64, u32)> = vhd
        .bat()?
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != UNALLOCATED)
        .map(|(i, &e)| (u64::from(e) * SECTOR, i as u32))
        .collect();
    blocks.sort_unstable();
    let regions = vhd.metadata_regions();
    let meta_end = regions.iter().map(|r| r.1).max().unwrap_or(0);
    // Blocks go after the metadata at the start of the file; a BAT moved
    // to the end by a resize stays where it is and blocks skip over it.
    let mut cursor = regions
        .iter()
        .filter(|r| blocks.first().is_none_or(|b| r.0 < b.0))
        .map(|r| r.1)
        .max()
        .unwrap_or(0);
    let mut whole = vec![0u8; footprint as usize];
    for (src, block) in blocks {
        let mut target = (cursor + bms).next_multiple_of(crate::disk::DATA_ALIGN) - bms;
        while let Some(r) = regions
            .iter()
            .find(|r| target < r.1 && target + footprint > r.0)
        {
            target = (r.1 + bms).next_multiple_of(crate::disk::DATA_ALIGN) - bms;
        }
        if target + footprint <= src {
            vhd.io()
                .read_at(&mut whole, src)
                .ctx(&name, || format!("read block {block}"), src)?;
            vhd.io().write_at(&whole, target).ctx(
                &name,
                || format!("move block {block}"),
                target,
            )?;
            vhd.flush()?;
            let sector = u32::try_from(target / SECTOR)
                .map_err(|_| Error::Invalid("offset overflow".into()))?;
            vhd.write_bat_entry(block, sector)?;
            vhd.flush()?;
            report.moved += 1;
            cursor = target + footprint;
        } else {
            cursor = cursor.max(src + footprint);
        }
        step += 1;
        progress(step, total);
    }
    // 3. Footer right after the last block (or the metadata); cut there.
    vhd.truncate_to(cursor.max(meta_end))?;
    let after = vhd.io().len().ctx(&name, || "get length".into(), 0)?;
    report.freed = before.saturating_sub(after);
    progress(total, total);
    Ok(report)
}

/// Whether every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any byte pattern is a valid u64; align_to only splits.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// What to convert to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A fixed VHD.
    Fixed,
    /// A dynamic VHD (zero ranges stay unallocated).
    Dynamic,
    /// A raw image (zero ranges stay holes).
    Raw,
    /// A dynamic VHDX (zero ranges stay unallocated).
    Vhdx,
    /// A fixed VHDX.
    VhdxFixed,
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Virtual size.
    pub size: u64,
    /// Bytes of data written (zero ranges skipped where the format allows).
    pub written: u64,
    /// Whether the source was a VHD (else raw or VHDX).
    pub source_was_vhd: bool,
    /// Whether the source was a VHDX.
    pub source_was_vhdx: bool,
    /// Whether the source was a block device (read with `O_DIRECT`).
    pub source_was_device: bool,
    /// Ranges of a raw source or device that could not be read, as
    /// (offset, length), in order: written as zeros.
    pub unreadable: Vec<(u64, u64)>,
}

/// A source image: a VHD of any kind (its chain flattened), a VHDX, a
/// block device or a raw file.
enum Source {
    Vhd(Box<Vhd<File>>),
    Vhdx(Box<crate::vhdx::Vhdx<File>>),
    Device(crate::io::DirectFile, u64),
    Raw(File, u64),
}

/// Whether the file at `path` starts with VHDX's signature.
pub fn is_vhdx_file(path: &Path) -> bool {
    let mut sig = [0u8; 8];
    File::open(path)
        .and_then(|f| BlockIo::read_at(&f, &mut sig, 0))
        .is_ok_and(|()| crate::vhdx::is_vhdx(&sig))
}

/// Whether `path` is a block device.
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

impl Source {
    fn open(path: &Path, opts: &OpenOptions) -> Result<Source> {
        let name = path.display().to_string();
        if is_block_device(path) {
            // A disk of a machine being converted: past the page cache, and
            // its length from its end (a device's metadata says 0).
            use std::io::Seek;
            let mut f = File::open(path).ctx(&name, || "open".into(), 0)?;
            let len = f
                .seek(std::io::SeekFrom::End(0))
                .ctx(&name, || "find the end".into(), 0)?;
            let d = crate::io::DirectFile::open(path, false).ctx(&name, || "open".into(), 0)?;
            return Ok(Source::Device(d, len));
        }
        if is_vhdx_file(path) {
            // Read-only: a log left to replay is replayed in memory.
            return Ok(Source::Vhdx(Box::new(crate::vhdx::Vhdx::open(
                path, false,
            )?)));
        }
        match Vhd::open(
            path,
            &OpenOptions {
                write: false,
                write_parent: false,
                ..opts.clone()
            },
        ) {
            Ok(v) => Ok(Source::Vhd(Box::new(v))),
            Err(Error::NotVhd { .. }) => {
                let f = File::open(path).ctx(&name, || "open".into(), 0)?;
                let len = f.metadata().ctx(&name, || "stat".into(), 0)?.len();
                Ok(Source::Raw(f, len))
            }
            Err(e) => Err(e),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Source::Vhd(v) => v.size(),
            Source::Vhdx(v) => v.size(),
            Source::Device(_, len) | Source::Raw(_, len) => *len,
        }
    }

    fn read_at(&self, buf: &mut [u8], off: u64, name: &str) -> Result<()> {
        match self {
            Source::Vhd(v) => v.read_at(buf, off),
            Source::Vhdx(v) => v.read_at(buf, off),
            Source::Device(_, len) | Source::Raw(_, len) => {
                let n = (len.saturating_sub(off) as usize).min(buf.len());
                let r = match self {
                    Source::Device(d, _) => BlockIo::read_at(d, &mut buf[..n], off),
                    Source::Raw(f, _) => BlockIo::read_at(f, &mut buf[..n], off),
                    _ => Ok(()),
                };
                r.ctx(name, || "read".into(), off)?;
                buf[n..].fill(0);
                Ok(())
            }
        }
    }

    /// Whether a read error is a bad range to step over (a device or raw
    /// file), rather than a broken image.
    fn salvages(&self) -> bool {
        matches!(self, Source::Device(..) | Source::Raw(..))
    }
}

/// Piece in which an unreadable range of a device is narrowed down.
const SALVAGE: usize = 4096;

/// Reads `buf` at `off` from `s`; where a raw source or device fails, reads
/// it again piece by piece, leaves the pieces that fail as zeros and adds
/// them to `bad` (merged with a range they continue).
fn read_salvaging(
    s: &Source,
    buf: &mut [u8],
    off: u64,
    name: &str,
    bad: &mut Vec<(u64, u64)>,
) -> Result<()> {
    match s.read_at(buf, off, name) {
        Ok(()) => Ok(()),
        Err(e) if !s.salvages() => Err(e),
        Err(_) => {
            for (i, piece) in buf.chunks_mut(SALVAGE).enumerate() {
                let at = off + (i * SALVAGE) as u64;
                if s.read_at(piece, at, name).is_err() {
                    piece.fill(0);
                    let len = piece.len() as u64;
                    match bad.last_mut() {
                        Some((o, l)) if *o + *l == at => *l += len,
                        _ => bad.push((at, len)),
                    }
                }
            }
            Ok(())
        }
    }
}

/// Copies every range of `s` that is not all zeros to `write`, chunk by
/// chunk; the bytes written and the ranges that could not be read.
fn copy(
    s: &Source,
    name: &str,
    size: u64,
    progress: Progress,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<(u64, Vec<(u64, u64)>)> {
    let mut buf = crate::io::AlignedBuf::new(COPY_CHUNK).map_err(|e| Error::Io {
        file: name.into(),
        what: "allocate a buffer".into(),
        offset: 0,
        source: e,
    })?;
    let mut written = 0u64;
    let mut bad = Vec::new();
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(COPY_CHUNK);
        let b = &mut buf.as_mut_slice()[..n];
        read_salvaging(s, b, off, name, &mut bad)?;
        if !is_zero(b) {
            write(b, off)?;
            written += n as u64;
        }
        off += n as u64;
        progress(off, size);
    }
    Ok((written, bad))
}

/// Converts `src` (a VHD of any kind, a VHDX, a block device or a raw
/// image) to a new file `dst` in `to` format. `dst` must not exist; it is
/// removed if the conversion fails. A raw source whose size is not a whole
/// number of sectors is padded with zeros. Ranges of a device or raw file
/// that cannot be read are written as zeros and listed in the report
/// (never skipped silently); a VHD or VHDX that cannot be read is an
/// error.
pub fn convert(
    src: &Path,
    dst: &Path,
    to: Format,
    block_size: u32,
    opts: &OpenOptions,
    progress: Progress,
) -> Result<ConvertReport> {
    if dst.exists() {
        return Err(Error::Invalid(format!(
            "{} exists already; convert never overwrites",
            dst.display()
        )));
    }
    let s = Source::open(src, opts)?;
    let sname = src.display().to_string();
    let size = s.size().next_multiple_of(SECTOR);
    if size == 0 {
        return Err(Error::Invalid(format!("{sname} is empty")));
    }
    let result = (|| -> Result<(u64, Vec<(u64, u64)>)> {
        match to {
            Format::Raw => {
                let dname = dst.display().to_string();
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(dst)
                    .ctx(&dname, || "create".into(), 0)?;
                f.set_len(size).ctx(&dname, || "set length".into(), 0)?;
                let r = copy(&s, &sname, size, progress, |b, off| {
                    BlockIo::write_at(&f, b, off).ctx(&dname, || "write".into(), off)
                })?;
                f.sync_all().ctx(&dname, || "flush".into(), 0)?;
                Ok(r)
            }
            Format::Fixed | Format::Dynamic => {
                let dt = if to == Format::Fixed {
                    DiskType::Fixed
                } else {
                    DiskType::Dynamic
                };
                let mut co = CreateOptions::new(dt, size);
                co.block_size = block_size;
                let d = Vhd::create(dst, &co)?;
                let r = copy(&s, &sname, size, progress, |b, off| d.write_at(b, off))?;
                d.flush()?;
                Ok(r)
            }
            Format::Vhdx | Format::VhdxFixed => {
                let mut co = crate::vhdx::CreateOptions::new(size, to == Format::VhdxFixed);
                if (1 << 20..=256 << 20).contains(&block_size) {
                    co.block_size = block_size;
                }
                let d = crate::vhdx::Vhdx::create(dst, &co)?;
                let r = copy(&s, &sname, size, progress, |b, off| d.write_at(b, off))?;
                d.close()?;
                Ok(r)
            }
        }
    })();
    match result {
        Ok((written, unreadable)) => Ok(ConvertReport {
            size,
            written,
            source_was_vhd: matches!(s, Source::Vhd(_)),
            source_was_vhdx: matches!(s, Source::Vhdx(_)),
            source_was_device: matches!(s, Source::Device(..)),
            unreadable,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(dst);
            Err(e)
        }
    }
}
