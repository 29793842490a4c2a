//! Reads: where a range's bytes are (the open file's map, asked again
//! when it may be behind another host's writes), then one asynchronous
//! read straight from the LUN when the range is one aligned LUN range and
//! the own path is in use, a synchronous read of the pieces otherwise.
//! A failed asynchronous read is retried synchronously on a thread of its
//! own (it may go through a peer).

use super::errno::io_errno;
use super::{may_block, Blocking, VolumeFs};
use crate::aio::Op;
use crate::extents::Piece;
use fuser::Errno;
use std::sync::Arc;
use std::time::Duration;
use vhd::BlockIo as _;

/// Where a read's bytes go: called once, with the bytes or the error.
pub type ReadDone = Box<dyn FnOnce(Result<&[u8], Errno>) + Send>;

type BufSlot = std::cell::RefCell<Option<vhd::io::AlignedBuf>>;

thread_local! {
    /// Each thread's aligned buffers for what it reads and writes.
    static READ_BUF: BufSlot = const { std::cell::RefCell::new(None) };
    pub(crate) static WRITE_BUF: BufSlot = const { std::cell::RefCell::new(None) };
}

/// Runs `f` on the first `len` bytes of this thread's buffer in `slot`
/// (grown to the next power of two when too small).
pub(crate) fn with_buf<R>(
    slot: &'static std::thread::LocalKey<BufSlot>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> Result<R, Errno>,
) -> Result<R, Errno> {
    slot.with(|cell| {
        let mut s = cell.borrow_mut();
        if s.as_ref().is_none_or(|b| b.len() < len) {
            let b = vhd::io::AlignedBuf::new(len.next_power_of_two().max(4096))
                .map_err(|e| io_errno(&e))?;
            *s = Some(b);
        }
        match s.as_mut() {
            Some(b) => f(&mut b.as_mut_slice()[..len]),
            None => Err(Errno::EIO),
        }
    })
}

/// Answers `done` with the bytes `read` delivers, or its error.
fn answer(done: ReadDone, read: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), Errno>) {
    let mut done = Some(done);
    let r = read(&mut |b| {
        if let Some(d) = done.take() {
            d(Ok(b));
        }
    });
    if let (Err(e), Some(d)) = (r, done.take()) {
        d(Err(e));
    }
}

/// An asynchronous I/O's way to the own path of the LUN.
pub(crate) struct OwnIo<'a> {
    pub(crate) aio: &'a crate::aio::Aio,
    /// The own path, with a descriptor for direct I/O.
    pub(crate) lun: Arc<dyn vhd::BlockIo>,
}

impl VolumeFs {
    /// Reads `size` bytes at `off` of `ino` (open as `fh`) and hands them
    /// to `done`, from this thread or from the completion of an
    /// asynchronous read.
    pub fn read(
        self: &Arc<Self>,
        ino: u64,
        fh: u64,
        off: u64,
        size: u32,
        ctx: &dyn Blocking,
        done: ReadDone,
    ) {
        self.note_read(ino);
        if let Some((r, h)) = self.remote(fh) {
            ctx.blocking();
            return match r.read(h, off, size) {
                Ok(b) => done(Ok(&b)),
                Err(e) => done(Err(e)),
            };
        }
        let pieces = match self.read_plan(ino, off, size, Some(ctx)) {
            Ok(p) => p,
            Err(e) => return done(Err(e)),
        };
        let Some(done) = self.read_async(ino, off, size, &pieces, done) else {
            return;
        };
        ctx.blocking();
        answer(done, |deliver| {
            self.read_pieces(off, &pieces, |b| {
                deliver(b);
                Ok(())
            })
        });
    }

    /// Reads `[off, off + size)` (clamped to the size) synchronously and
    /// hands the bytes to `deliver`.
    pub(crate) fn read_data<R>(
        &self,
        ino: u64,
        off: u64,
        size: u32,
        deliver: impl FnOnce(&[u8]) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        let plan = self.read_plan(ino, off, size, None)?;
        self.read_pieces(off, &plan, deliver)
    }

    /// Where the bytes of `[off, off + size)` are, clamped to the file's
    /// size (nothing at or past the end).
    fn read_plan(
        &self,
        ino: u64,
        off: u64,
        size: u32,
        ctx: Option<&dyn Blocking>,
    ) -> Result<Vec<Piece>, Errno> {
        let file = self.file(ino).ok_or(Errno::EBADF)?;
        let mut f = file.lock().map_err(|_| Errno::EIO)?;
        let want = off.saturating_add(size as u64);
        let mut pieces = f.extents.pieces(off, want - off);
        // A reader may follow another host's writes: past the size it
        // knows, or on a hole or never-written range, it asks the
        // coordinator again (at most once a second; a sparse file's
        // holes stay holes).
        let unknown = off >= f.size || pieces.iter().any(|p| p.lun_off.is_none() || p.unwritten);
        if f.writers == 0 && unknown && f.refreshed.elapsed() >= Duration::from_secs(1) {
            may_block(ctx);
            self.refresh(ino, &mut f);
            pieces = f.extents.pieces(off, want - off);
        }
        if off >= f.size {
            return Ok(Vec::new());
        }
        let end = want.min(f.size);
        pieces.retain(|p| p.file_off < end);
        if let Some(last) = pieces.last_mut() {
            last.len = last.len.min(end - last.file_off);
        }
        Ok(pieces)
    }

    /// Reads `pieces` (from [`VolumeFs::read_plan`]) synchronously and
    /// hands the bytes to `deliver`.
    fn read_pieces<R>(
        &self,
        off: u64,
        pieces: &[Piece],
        deliver: impl FnOnce(&[u8]) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        let Some(last) = pieces.last() else {
            return deliver(&[]);
        };
        // This thread's aligned buffer: O_DIRECT reads of aligned ranges
        // land in it without a bounce copy, and it is not reallocated.
        let len = (last.file_off + last.len - off) as usize;
        with_buf(&READ_BUF, len, |b| {
            self.fill_pieces(off, pieces, b)?;
            deliver(b)
        })
    }

    /// Reads `pieces` (from `off`) into `dst`, zeroes where nothing was
    /// written.
    fn fill_pieces(&self, off: u64, pieces: &[Piece], dst: &mut [u8]) -> Result<(), Errno> {
        for p in pieces {
            let at = (p.file_off - off) as usize;
            let d = dst.get_mut(at..at + p.len as usize).ok_or(Errno::EIO)?;
            match (p.lun_off, p.unwritten) {
                (Some(l), false) => self.lun.read_at(d, l).map_err(|e| io_errno(&e))?,
                _ => d.fill(0),
            }
        }
        Ok(())
    }

    /// Reads `[off, off + buf.len())` (clamped to the size) synchronously
    /// straight into `buf` (a caller's aligned buffer takes O_DIRECT reads
    /// without a copy): how many bytes came.
    pub(crate) fn read_into(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let len = u32::try_from(buf.len()).map_err(|_| Errno::EINVAL)?;
        let pieces = self.read_plan(ino, off, len, None)?;
        let Some(last) = pieces.last() else {
            return Ok(0);
        };
        let n = (last.file_off + last.len - off) as usize;
        self.fill_pieces(off, &pieces, &mut buf[..n])?;
        Ok(n)
    }

    /// The own path for asynchronous I/O of `len` bytes at LUN offset
    /// `at`, when such I/O may go there now: aligned for O_DIRECT, the
    /// path a file or device open for direct I/O, the volume not
    /// redirected, no fault drill on the path.
    pub(crate) fn own_io(&self, at: u64, len: u64) -> Option<OwnIo<'_>> {
        let align = vhd::io::DIRECT_ALIGN as u64;
        if at % align != 0 || len % align != 0 || len == 0 {
            return None;
        }
        let aio = self.aio.as_ref()?;
        let lun = self.lun.direct_now()?;
        lun.direct_fd()?;
        Some(OwnIo { aio, lun })
    }

    /// Runs `f` on a thread of its own: the synchronous retry of an
    /// asynchronous request that failed, which may wait for a path
    /// through a peer and must not hold up the completion thread.
    pub(crate) fn retry_in_background(
        self: &Arc<Self>,
        f: impl FnOnce(&VolumeFs) + Send + 'static,
    ) {
        let fs = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("csv-retry-v{}", self.vol))
            .spawn(move || f(&fs));
        if let Err(e) = spawned {
            tracing::error!(
                "Volume{}: cannot start a thread to retry an I/O ({e}); the request fails",
                self.vol
            );
        }
    }

    /// Reads one piece of a file asynchronously when it can (answering
    /// `done` from the completion thread); gives `done` back when not.
    fn read_async(
        self: &Arc<Self>,
        ino: u64,
        off: u64,
        size: u32,
        pieces: &[Piece],
        done: ReadDone,
    ) -> Option<ReadDone> {
        let [Piece {
            lun_off: Some(at),
            unwritten: false,
            len,
            ..
        }] = *crate::extents::coalesce(pieces)
        else {
            return Some(done);
        };
        let Some(OwnIo { aio, lun }) = self.own_io(at, len) else {
            return Some(done);
        };
        let Ok(buf) = aio.buffer(len as usize) else {
            return Some(done);
        };
        let fs = self.clone();
        let complete: crate::aio::Done = Box::new(move |r, buf| {
            match r {
                Ok(()) => {
                    fs.lun.count_direct(false, len);
                    done(Ok(&buf.as_slice()[..len as usize]));
                }
                Err(e) => {
                    tracing::debug!(
                        ino,
                        off,
                        "asynchronous read failed ({e}); retried synchronously"
                    );
                    fs.retry_in_background(move |fs| {
                        answer(done, |deliver| {
                            fs.read_data(ino, off, size, |b| {
                                deliver(b);
                                Ok(())
                            })
                        });
                    });
                }
            }
            if let Some(a) = &fs.aio {
                a.give_back(buf);
            }
        });
        if let Err((buf, complete)) = aio.submit(Op::Read, lun, buf, len as usize, at, complete) {
            complete(Err(std::io::Error::other("not queued")), buf);
        }
        None
    }
}
