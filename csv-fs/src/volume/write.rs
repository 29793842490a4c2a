//! Writes: the lease checked, LUN space found or allocated (in chunks
//! that grow with the file), blocks a snapshot shares moved first
//! (redirect-on-write), then one asynchronous write straight to the LUN
//! when the range is one aligned LUN range and the own path is in use, a
//! synchronous write of the pieces otherwise. Every write holds the
//! snapshot gate until it is over, so a freeze waits for it.

use super::errno::io_errno;
use super::gate::GateGuard;
use super::lease::OpenFile;
use super::read::{with_buf, OwnIo, WRITE_BUF};
use super::{may_block, Blocking, VolumeFs};
use crate::aio::Op;
use crate::extents::Piece;
use coordinator::codec::extents_from_proto;
use coordinator::proto::{self, volume_op};
use fuser::Errno;
use std::sync::{Arc, Mutex};
use vhd::BlockIo as _;

/// Where a write's outcome goes: called once, with the bytes written or
/// the error.
pub type WriteDone = Box<dyn FnOnce(Result<u32, Errno>) + Send>;

/// Smallest and largest allocation request.
const MIN_CHUNK: u64 = 64 << 10;
const MAX_CHUNK: u64 = 64 << 20;
/// Block of a redirected write (redirect-on-write after a snapshot): the
/// written range is widened to whole blocks within its extent, and what
/// the write does not cover is copied to the new place.
const REDIRECT_UNIT: u64 = 4096;

/// A write ready to go (see [`VolumeFs::write_plan`]).
struct WritePlan {
    file: Arc<Mutex<OpenFile>>,
    pieces: Vec<Piece>,
    /// Holds a snapshot's freeze off until the write is over.
    in_progress: GateGuard,
}

/// How much to allocate at once for a file of `size` bytes.
fn chunk_for(size: u64) -> u64 {
    (size / 8).next_power_of_two().clamp(MIN_CHUNK, MAX_CHUNK)
}

impl VolumeFs {
    /// A write by `uid` is about to change `ino`: unless it is root's, a
    /// set-user-ID bit goes, and a set-group-ID bit with group execute
    /// permission, as the kernel's `file_remove_privs` does for the
    /// writes it buffers (for direct I/O to a FUSE filesystem it leaves
    /// it undone). The open file's mode is looked at first: a file
    /// without the bits costs nothing.
    pub fn remove_privs(&self, ino: u64, uid: u32) {
        const PRIVS: u32 = 0o4000 | 0o2000;
        if uid == 0 {
            return;
        }
        let Some(file) = self.file(ino) else { return };
        if file.lock().map_or(true, |g| g.attr.mode & PRIVS == 0) {
            return;
        }
        let Ok(a) = self.getattr(ino) else { return };
        let kill = 0o4000 | if a.mode & 0o010 != 0 { 0o2000 } else { 0 };
        let mode = a.mode & !kill;
        if mode != a.mode {
            let r = self.op(volume_op::Op::SetAttr(proto::SetAttrOp {
                ino,
                mode: Some(mode & 0o7777),
                ..Default::default()
            }));
            if let Err(e) = r {
                tracing::debug!(ino, "set-ID bits not removed at a write: {e:?}");
                return;
            }
        }
        if let Ok(mut g) = file.lock() {
            g.attr.mode = mode;
        };
    }

    /// Writes `data` at `off` of `ino` (open as `fh`) and tells `done`,
    /// from this thread or from the completion of an asynchronous write.
    pub fn write(
        self: &Arc<Self>,
        ino: u64,
        fh: u64,
        off: u64,
        data: &[u8],
        ctx: &dyn Blocking,
        done: WriteDone,
    ) {
        if let Some((r, h)) = self.remote(fh) {
            ctx.blocking();
            return done(r.write(h, off, data));
        }
        let Some(done) = self.write_async(ino, off, data, ctx, done) else {
            return;
        };
        ctx.blocking();
        done(self.write_data(ino, off, data));
    }

    /// Makes sure `[off, off + len)` has LUN space; returns the pieces.
    pub(crate) fn ensure_space(
        &self,
        ino: u64,
        f: &mut OpenFile,
        off: u64,
        len: u64,
    ) -> Result<Vec<Piece>, Errno> {
        if f.extents.has_hole(off, len) {
            let chunk = chunk_for(f.size.max(off + len));
            let start = off / chunk * chunk;
            let end = (off + len).div_ceil(chunk) * chunk;
            let r = self.op(volume_op::Op::Allocate(proto::AllocateOp {
                ino,
                off: start,
                len: end - start,
            }));
            let got = match r {
                Ok(r) => r,
                Err(e) if e == Errno::ENOSPC && end - start > len => {
                    // Not room for the whole chunk: just what is written.
                    let a = off / 4096 * 4096;
                    let b = (off + len).div_ceil(4096) * 4096;
                    self.op(volume_op::Op::Allocate(proto::AllocateOp {
                        ino,
                        off: a,
                        len: b - a,
                    }))?
                }
                Err(e) => return Err(e),
            };
            if let Some(proto::reply::Value::Extents(e)) = got.value {
                f.extents.insert(&extents_from_proto(&e));
            }
        }
        let p = f.extents.pieces(off, len);
        if p.iter().any(|p| p.lun_off.is_none()) {
            return Err(Errno::EIO);
        }
        Ok(p)
    }

    /// Takes `len` bytes of this file's reserved space (reserving more,
    /// in growing chunks, when the pool runs dry): the pieces, in order.
    fn take_reserved(
        &self,
        ino: u64,
        f: &mut OpenFile,
        len: u64,
        ctx: Option<&dyn Blocking>,
    ) -> Result<Vec<(u64, u64)>, Errno> {
        let have: u64 = f.pool.iter().map(|p| p.1).sum();
        if have < len {
            may_block(ctx);
            let chunk = chunk_for(f.size).max((len - have).next_multiple_of(4096));
            let got = self.op(volume_op::Op::Reserve(proto::ReserveOp { ino, len: chunk }))?;
            let Some(proto::reply::Value::Extents(r)) = got.value else {
                return Err(Errno::EIO);
            };
            f.pool.extend(r.extents.iter().map(|x| (x.lun_off, x.len)));
        }
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let Some(&(s, l)) = f.pool.first() else {
                return Err(Errno::EIO);
            };
            let n = l.min(left);
            out.push((s, n));
            if n == l {
                f.pool.remove(0);
            } else {
                f.pool[0] = (s + n, l - n);
            }
            left -= n;
        }
        Ok(out)
    }

    /// Moves the written pieces of `[off, off + len)` that a snapshot
    /// shares to new space (redirect-on-write): each piece, widened to
    /// whole 4 KiB blocks within its extent, gets space from the file's
    /// reservation; the bytes of those blocks the write does not cover are
    /// copied over; this host's map points there at once, the
    /// coordinator's at the next report.
    fn redirect(
        &self,
        ino: u64,
        f: &mut OpenFile,
        off: u64,
        len: u64,
        ctx: Option<&dyn Blocking>,
    ) -> Result<(), Errno> {
        let end = off + len;
        let shared: Vec<Piece> = f
            .extents
            .pieces(off, len)
            .into_iter()
            .filter(|p| p.lun_off.is_some() && !p.unwritten)
            .filter(|p| f.extents.is_shared(p.file_off, p.len))
            .collect();
        for p in shared {
            let Some(e) = f.extents.extent_at(p.file_off) else {
                continue;
            };
            let u0 = e.file_off.max(p.file_off / REDIRECT_UNIT * REDIRECT_UNIT);
            let u1 = (e.file_off + e.len)
                .min((p.file_off + p.len).div_ceil(REDIRECT_UNIT) * REDIRECT_UNIT);
            let pieces = self.take_reserved(ino, f, u1 - u0, ctx)?;
            // Where file offset x lands in the new pieces.
            let new_at = |x: u64| -> u64 {
                let mut rel = x - u0;
                for &(s, l) in &pieces {
                    if rel < l {
                        return s + rel;
                    }
                    rel -= l;
                }
                0
            };
            // The parts of the unit the write leaves alone keep their bytes.
            for (a, b) in [(u0, off.clamp(u0, u1)), (end.clamp(u0, u1), u1)] {
                if a >= b {
                    continue;
                }
                may_block(ctx);
                let n = (b - a) as usize;
                let mut buf =
                    vhd::io::AlignedBuf::new(n.next_multiple_of(4096)).map_err(|e| io_errno(&e))?;
                let data = &mut buf.as_mut_slice()[..n];
                self.lun
                    .read_at(data, e.lun_off + (a - e.file_off))
                    .map_err(|e| io_errno(&e))?;
                // Within one 4 KiB block, so within one reserved piece.
                self.lun
                    .write_at(data, new_at(a))
                    .map_err(|e| io_errno(&e))?;
            }
            f.extents.remap(u0, &pieces);
            f.remaps.push((u0, pieces));
        }
        Ok(())
    }

    /// Writes `data` at `off` synchronously.
    pub(crate) fn write_data(&self, ino: u64, off: u64, data: &[u8]) -> Result<u32, Errno> {
        let WritePlan {
            file,
            pieces,
            in_progress: _in_progress,
        } = self.write_plan(ino, off, data.len() as u64, None)?;
        // Data from the kernel comes at an unaligned address; copy it into
        // this thread's aligned buffer once, so O_DIRECT writes of aligned
        // ranges go out without a fresh bounce buffer each time. Data that
        // is aligned already (a VM disk server's) goes out as it is.
        if (data.as_ptr() as usize) % vhd::io::DIRECT_ALIGN == 0 {
            self.write_pieces(data, off, &pieces)?;
        } else {
            with_buf(&WRITE_BUF, data.len(), |b| {
                b.copy_from_slice(data);
                self.write_pieces(b, off, &pieces)
            })?;
        }
        self.write_finish(&file, &pieces, off, data.len() as u64)
    }

    /// Readies a write of `len` bytes at `off`: checks the lease, gets LUN
    /// space, moves blocks a snapshot shares. Returns the file, where the
    /// bytes go, and the write's place in the snapshot gate (held until
    /// the write is over).
    fn write_plan(
        &self,
        ino: u64,
        off: u64,
        len: u64,
        ctx: Option<&dyn Blocking>,
    ) -> Result<WritePlan, Errno> {
        let file = self.file(ino).ok_or(Errno::EBADF)?;
        let in_progress = self.gate.enter(ctx)?;
        let mut f = file.lock().map_err(|_| Errno::EIO)?;
        if !f.may_write() {
            return Err(Errno::EIO);
        }
        if f.extents.has_hole(off, len) {
            may_block(ctx);
        }
        let p = self.ensure_space(ino, &mut f, off, len)?;
        let pieces = if p.iter().any(|p| !p.unwritten) && f.extents.is_shared(off, len) {
            self.redirect(ino, &mut f, off, len, ctx)?;
            f.extents.pieces(off, len)
        } else {
            p
        };
        drop(f);
        Ok(WritePlan {
            file,
            pieces,
            in_progress,
        })
    }

    /// Writes `data` (aligned, at file offset `off`) to `pieces`.
    fn write_pieces(&self, data: &[u8], off: u64, pieces: &[Piece]) -> Result<(), Errno> {
        for p in pieces {
            let at = (p.file_off - off) as usize;
            if let Some(l) = p.lun_off {
                self.lun
                    .write_at(&data[at..at + p.len as usize], l)
                    .map_err(|e| io_errno(&e))?;
            }
        }
        Ok(())
    }

    /// Records a finished write: ranges it wrote for the first time (for
    /// the coordinator) and the size.
    fn write_finish(
        &self,
        file: &Mutex<OpenFile>,
        pieces: &[Piece],
        off: u64,
        len: u64,
    ) -> Result<u32, Errno> {
        let mut f = file.lock().map_err(|_| Errno::EIO)?;
        if pieces.iter().any(|p| p.unwritten) && f.extents.mark_written(off, len) {
            f.dirty.push((off, len));
        }
        f.size = f.size.max(off + len);
        f.touched = true;
        Ok(len as u32)
    }

    /// Writes `data` at `off` asynchronously when it lands in one piece of
    /// the LUN (answering `done` from the completion thread); gives
    /// `done` back, with nothing done, when not.
    fn write_async(
        self: &Arc<Self>,
        ino: u64,
        off: u64,
        data: &[u8],
        ctx: &dyn Blocking,
        done: WriteDone,
    ) -> Option<WriteDone> {
        let len = data.len() as u64;
        let (aio, lun, buf) = {
            // A cheap look first: a write this cannot take does not pay
            // for a plan twice.
            let Some(file) = self.file(ino) else {
                return Some(done);
            };
            let Ok(f) = file.lock() else {
                return Some(done);
            };
            let [Piece {
                lun_off: Some(at), ..
            }] = *crate::extents::coalesce(&f.extents.pieces(off, len))
            else {
                return Some(done);
            };
            drop(f);
            let Some(OwnIo { aio, lun }) = self.own_io(at, len) else {
                return Some(done);
            };
            let Ok(mut buf) = aio.buffer(data.len()) else {
                return Some(done);
            };
            buf.as_mut_slice()[..data.len()].copy_from_slice(data);
            (aio, lun, buf)
        };
        let WritePlan {
            file,
            pieces,
            in_progress,
        } = match self.write_plan(ino, off, len, Some(ctx)) {
            Ok(p) => p,
            Err(e) => {
                aio.give_back(buf);
                done(Err(e));
                return None;
            }
        };
        // The plan may have moved the range (a snapshot shared it).
        let pieces = crate::extents::coalesce(&pieces);
        let at = match *pieces.as_slice() {
            [Piece {
                lun_off: Some(at), ..
            }] if at % vhd::io::DIRECT_ALIGN as u64 == 0 => at,
            _ => {
                ctx.blocking();
                let r = self
                    .write_pieces(&buf.as_slice()[..data.len()], off, &pieces)
                    .and_then(|()| self.write_finish(&file, &pieces, off, len));
                self.answer_write(r, in_progress, buf, done);
                return None;
            }
        };
        let fs = self.clone();
        let complete: crate::aio::Done = Box::new(move |r, buf| match r {
            Ok(()) => {
                fs.lun.count_direct(true, len);
                let r = fs.write_finish(&file, &pieces, off, len);
                fs.answer_write(r, in_progress, buf, done);
            }
            Err(e) => {
                tracing::debug!(
                    ino,
                    off,
                    "asynchronous write failed ({e}); retried synchronously"
                );
                fs.retry_in_background(move |fs| {
                    let r = fs
                        .write_pieces(&buf.as_slice()[..len as usize], off, &pieces)
                        .and_then(|()| fs.write_finish(&file, &pieces, off, len));
                    fs.answer_write(r, in_progress, buf, done);
                });
            }
        });
        if let Err((buf, complete)) = aio.submit(Op::Write, lun, buf, data.len(), at, complete) {
            complete(Err(std::io::Error::other("not queued")), buf);
        }
        None
    }

    /// Ends a write that took the asynchronous path's buffer: lets a
    /// freeze go on, keeps the buffer for another request, answers.
    fn answer_write(
        &self,
        r: Result<u32, Errno>,
        in_progress: GateGuard,
        buf: vhd::io::AlignedBuf,
        done: WriteDone,
    ) {
        drop(in_progress);
        if let Some(a) = &self.aio {
            a.give_back(buf);
        }
        done(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_chunks_grow_with_the_file_within_bounds() {
        assert_eq!(chunk_for(0), MIN_CHUNK);
        assert_eq!(chunk_for(1 << 20), 128 << 10);
        assert_eq!(chunk_for(1 << 30), MAX_CHUNK);
        assert_eq!(chunk_for(u64::MAX / 2), MAX_CHUNK);
    }
}
