//! An io_uring queue over a VHD opened with `O_DIRECT`: many requests in
//! flight from one thread, as a VMM's virtio-blk queue or a benchmark
//! drives a disk.
//!
//! Each request is translated with [`Vhd::direct_range`]; one that maps to
//! a single run of the file's data is submitted to the ring, any other
//! (allocating writes, reads from a parent or of holes, requests across
//! blocks) is done synchronously through the format code at submission
//! and completes at once.
//!
//! Two kinds of buffers: a caller's [`AlignedBuf`], owned by the queue
//! while in flight and handed back with its completion; or one of the
//! queue's own registered buffers ([`Queue::with_fixed_buffers`]), which
//! the kernel pins once instead of at every request (the bulk of the CPU
//! cost of large transfers).

use crate::disk::Vhd;
use crate::error::{Error, IoContext, Result};
use crate::io::{AlignedBuf, DirectFile};
use io_uring::{opcode, types, IoUring};
use std::os::fd::AsRawFd;

/// The buffer of a request.
#[derive(Debug)]
pub enum Buffer {
    /// A caller's buffer, handed back with the completion.
    Owned(AlignedBuf),
    /// The queue's registered buffer with this index
    /// ([`Queue::fixed_buffer`] reaches its bytes).
    Fixed(usize),
}

/// A finished request: its tag, its buffer, and how it ended.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag.
    pub tag: u64,
    /// The request's buffer (filled, for a read).
    pub buf: Buffer,
    /// The outcome.
    pub result: Result<()>,
}

struct InFlight {
    tag: u64,
    buf: Buffer,
    len: usize,
    write: bool,
    offset: u64,
    /// Parts still in the kernel (a request larger than the queue's
    /// maximum transfer goes as several).
    parts: u32,
    result: Result<()>,
}

/// A queue's registered buffers: one allocation, each buffer `size`
/// bytes and `stride` (a multiple of 4 KiB) after the one before.
struct Pool {
    mem: AlignedBuf,
    size: usize,
    stride: usize,
}

impl Pool {
    /// Buffer `index`, if there is one.
    fn slot(&mut self, index: usize) -> Option<&mut [u8]> {
        let at = index.checked_mul(self.stride)?;
        self.mem
            .as_mut_slice()
            .get_mut(at..at.checked_add(self.size)?)
    }
}

/// An io_uring submission queue bound to one open VHD, driven by the
/// thread that made it.
pub struct Queue<'a> {
    vhd: &'a Vhd<DirectFile>,
    // Dropped before `fixed`: the ring unregisters the buffers first.
    ring: IoUring,
    /// The registered buffers.
    fixed: Option<Pool>,
    fixed_busy: Vec<bool>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    ready: Vec<Completion>,
    max_transfer: usize,
    /// The ring takes submissions from the thread that made it only: the
    /// queue stays on that thread.
    _thread_bound: std::marker::PhantomData<*const ()>,
}

impl std::fmt::Debug for Queue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("depth", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Queue<'a> {
    /// A queue with room for `depth` requests in flight.
    pub fn new(vhd: &'a Vhd<DirectFile>, depth: u32) -> Result<Self> {
        // Completions are run when the queue waits for them, not whenever
        // the kernel interrupts the thread (DEFER_TASKRUN, which wants a
        // single submitting thread): fewer interruptions of the thread
        // that issues. Older kernels get the cooperative mode, or none.
        let entries = depth.next_power_of_two();
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
            .or_else(|_| IoUring::new(entries))
            .ctx(vhd.name(), || "set up io_uring".into(), 0)?;
        Ok(Queue {
            vhd,
            ring,
            fixed: None,
            fixed_busy: Vec::new(),
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as usize).rev().collect(),
            ready: Vec::new(),
            max_transfer: 0,
            _thread_bound: std::marker::PhantomData,
        })
    }

    /// Splits requests larger than `bytes` (a multiple of 4 KiB; 0 for no
    /// limit) into several kernel requests in flight at once. Devices with
    /// parallel queues move large transfers faster that way.
    pub fn set_max_transfer(&mut self, bytes: usize) {
        self.max_transfer = bytes / 4096 * 4096;
    }

    /// A queue with `depth` slots and `count` registered buffers of `size`
    /// bytes each, for [`Queue::submit_fixed`].
    pub fn with_fixed_buffers(
        vhd: &'a Vhd<DirectFile>,
        depth: u32,
        count: usize,
        size: usize,
    ) -> Result<Self> {
        let mut q = Queue::new(vhd, depth)?;
        // One allocation for all: from 1 MiB in total it sits on huge
        // pages, so each buffer is one segment for the device and
        // requests on neighbouring blocks can merge into large ones.
        let stride = size.max(1).next_multiple_of(4096);
        let total = stride.checked_mul(count).ok_or_else(|| {
            Error::Invalid(format!("{}: {count} buffers of {size} bytes", vhd.name()))
        })?;
        let mut mem =
            AlignedBuf::new(total).ctx(vhd.name(), || "allocate I/O buffers".into(), 0)?;
        let base = mem.as_mut_slice().as_mut_ptr();
        let iovecs: Vec<libc::iovec> = (0..count)
            .map(|i| libc::iovec {
                // SAFETY: buffer i lies inside the pool of count * stride bytes.
                iov_base: unsafe { base.add(i * stride) }.cast(),
                iov_len: size,
            })
            .collect();
        // SAFETY: the iovecs describe memory owned by `q.fixed`, which is
        // dropped only after the ring (and with it the registration).
        unsafe { q.ring.submitter().register_buffers(&iovecs) }.ctx(
            vhd.name(),
            || "register io_uring buffers".into(),
            0,
        )?;
        q.fixed_busy = vec![false; count];
        q.fixed = Some(Pool { mem, size, stride });
        Ok(q)
    }

    /// Registered buffer `index`, whatever its state.
    fn fixed_slice(&mut self, index: usize) -> Option<&mut [u8]> {
        self.fixed.as_mut()?.slot(index)
    }

    /// The bytes of registered buffer `index`, unless a request using it is
    /// in flight.
    pub fn fixed_buffer(&mut self, index: usize) -> Option<&mut [u8]> {
        if *self.fixed_busy.get(index)? {
            return None;
        }
        self.fixed_slice(index)
    }

    /// Submits a read or write of the first `len` bytes of registered
    /// buffer `index` at virtual `offset`.
    pub fn submit_fixed(
        &mut self,
        tag: u64,
        index: usize,
        len: usize,
        offset: u64,
        write: bool,
    ) -> Result<()> {
        let vhd = self.vhd;
        let name = vhd.name();
        let buf = match (self.fixed_busy.get(index), self.fixed.as_mut()) {
            (Some(false), Some(p)) => p.slot(index).and_then(|b| b.get_mut(..len)),
            _ => None,
        };
        let Some(buf) = buf else {
            return Err(Error::Invalid(format!(
                "{name}: registered buffer {index} is busy, missing or shorter than {len} bytes"
            )));
        };
        let Some(slot) = self.free.last().copied() else {
            return Err(Error::Invalid(format!("{name}: io_uring queue is full")));
        };
        let Some(file_off) = vhd.direct_range(offset, len as u64) else {
            let result = if write {
                vhd.write_at(buf, offset)
            } else {
                vhd.read_at(buf, offset)
            };
            self.ready.push(Completion {
                tag,
                buf: Buffer::Fixed(index),
                result,
            });
            return Ok(());
        };
        let ptr = buf.as_mut_ptr();
        self.free.pop();
        self.fixed_busy[index] = true;
        self.start(
            slot,
            InFlight {
                tag,
                buf: Buffer::Fixed(index),
                len,
                write,
                offset: file_off,
                parts: 0,
                result: Ok(()),
            },
            ptr,
            Some(index as u16),
        )
    }

    /// Queues the kernel requests of the request in `slot`: one per
    /// `max_transfer` bytes. `ptr` is the request's buffer, owned by the
    /// slot (or a registered buffer marked busy) until every part is reaped.
    fn start(&mut self, slot: usize, f: InFlight, ptr: *mut u8, fixed: Option<u16>) -> Result<()> {
        let fd = types::Fd(self.vhd.io().file().as_raw_fd());
        let step = if self.max_transfer == 0 {
            f.len.max(1)
        } else {
            self.max_transfer
        };
        let (len, write, file_off) = (f.len, f.write, f.offset);
        let parts = len.div_ceil(step).max(1);
        self.slots[slot] = Some(InFlight {
            parts: parts as u32,
            ..f
        });
        for part in 0..parts {
            let at = part * step;
            let n = step.min(len - at) as u32;
            // SAFETY: `at` is inside the buffer of `len` bytes at `ptr`.
            let p = unsafe { ptr.add(at) };
            let off = file_off + at as u64;
            let entry = match (write, fixed) {
                (true, Some(i)) => opcode::WriteFixed::new(fd, p, n, i).offset(off).build(),
                (false, Some(i)) => opcode::ReadFixed::new(fd, p, n, i).offset(off).build(),
                (true, None) => opcode::Write::new(fd, p, n).offset(off).build(),
                (false, None) => opcode::Read::new(fd, p, n).offset(off).build(),
            }
            .user_data(slot as u64 | (part as u64) << 32);
            self.push(&entry, off)?;
        }
        Ok(())
    }

    fn push(&mut self, entry: &io_uring::squeue::Entry, offset: u64) -> Result<()> {
        // SAFETY: the entry points at a buffer owned by the queue (a slot's
        // buffer or a registered one marked busy) until its completion is
        // reaped in `reap`.
        let pushed = unsafe { self.ring.submission().push(entry) };
        if pushed.is_err() {
            self.ring
                .submit()
                .ctx(self.vhd.name(), || "submit to io_uring".into(), offset)?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(entry) }.map_err(|_| {
                Error::Invalid(format!(
                    "{}: io_uring submission queue is full",
                    self.vhd.name()
                ))
            })?;
        }
        Ok(())
    }

    /// Requests in flight or completed but not yet collected.
    pub fn pending(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len()
    }

    /// Whether another request can be submitted now.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Submits a read (`write == false`) or write of `buf` at virtual
    /// `offset`. Fails only when the queue is full; I/O errors arrive with
    /// the completion.
    pub fn submit(
        &mut self,
        tag: u64,
        mut buf: AlignedBuf,
        offset: u64,
        write: bool,
    ) -> Result<()> {
        let Some(slot) = self.free.pop() else {
            return Err(Error::Invalid(format!(
                "{}: io_uring queue is full",
                self.vhd.name()
            )));
        };
        let len = buf.len() as u64;
        let Some(file_off) = self.vhd.direct_range(offset, len) else {
            self.free.push(slot);
            let result = if write {
                self.vhd.write_at(buf.as_slice(), offset)
            } else {
                self.vhd.read_at(buf.as_mut_slice(), offset)
            };
            self.ready.push(Completion {
                tag,
                buf: Buffer::Owned(buf),
                result,
            });
            return Ok(());
        };
        // The buffer's memory stays put (it is heap memory owned by the
        // slot) until the completion for this slot is reaped.
        let len = buf.len();
        let ptr = buf.as_mut_slice().as_mut_ptr();
        self.start(
            slot,
            InFlight {
                tag,
                buf: Buffer::Owned(buf),
                len,
                write,
                offset: file_off,
                parts: 0,
                result: Ok(()),
            },
            ptr,
            None,
        )
    }

    /// Sends submitted requests to the kernel and waits for at least one
    /// completion (when any is outstanding); returns every completion.
    pub fn complete(&mut self) -> Result<Vec<Completion>> {
        self.complete_at_least(1)
    }

    /// As [`Queue::complete`], waiting for `n` completions (or every
    /// request in flight, when fewer are): a caller that keeps the queue
    /// full refills it in batches, one system call for several requests.
    pub fn complete_at_least(&mut self, n: usize) -> Result<Vec<Completion>> {
        let in_flight = self.slots.len() - self.free.len();
        let want = if self.ready.is_empty() {
            n.min(in_flight)
        } else {
            0
        };
        self.ring
            .submit_and_wait(want)
            .ctx(self.vhd.name(), || "wait for io_uring".into(), 0)?;
        self.reap();
        Ok(std::mem::take(&mut self.ready))
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let step = self.max_transfer;
        for (data, res) in done {
            let slot = (data & 0xffff_ffff) as usize;
            let part = (data >> 32) as usize;
            let Some(f) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let name = self.vhd.name();
            let step = if step == 0 { f.len.max(1) } else { step };
            let at = part * step;
            let len = step.min(f.len.saturating_sub(at));
            let off = f.offset + at as u64;
            if res < 0 {
                if f.result.is_ok() {
                    f.result = Err(std::io::Error::from_raw_os_error(-res)).ctx(
                        name,
                        || {
                            if f.write {
                                "write".into()
                            } else {
                                "read".into()
                            }
                        },
                        off,
                    );
                }
            } else if (res as usize) < len && f.result.is_ok() {
                // Short transfer: finish the part synchronously.
                let done = res as usize;
                let io = self.vhd.io();
                let bytes = match &mut f.buf {
                    Buffer::Owned(b) => Some(b.as_mut_slice()),
                    Buffer::Fixed(i) => self.fixed.as_mut().and_then(|p| p.slot(*i)),
                };
                let r = match bytes.and_then(|b| b.get_mut(at + done..at + len)) {
                    Some(rest) if f.write => {
                        crate::io::BlockIo::write_at(io, rest, off + done as u64)
                    }
                    Some(rest) => crate::io::BlockIo::read_at(io, rest, off + done as u64),
                    None => Err(std::io::Error::other("request without its buffer")),
                };
                f.result = r.ctx(name, || "finish short transfer".into(), off + done as u64);
            }
            f.parts -= 1;
            if f.parts > 0 {
                continue;
            }
            let Some(f) = self.slots[slot].take() else {
                continue;
            };
            self.free.push(slot);
            if let Buffer::Fixed(i) = f.buf {
                self.fixed_busy[i] = false;
            }
            self.ready.push(Completion {
                tag: f.tag,
                buf: f.buf,
                result: f.result,
            });
        }
    }

    /// Waits for every outstanding request and returns their completions.
    pub fn drain(&mut self) -> Result<Vec<Completion>> {
        let mut all = Vec::new();
        while self.pending() > 0 {
            all.extend(self.complete()?);
        }
        Ok(all)
    }
}

impl Drop for Queue<'_> {
    fn drop(&mut self) {
        // The kernel may still write into buffers of requests in flight:
        // wait for them before the buffers are freed.
        while self.slots.len() > self.free.len() {
            if self.ring.submit_and_wait(1).is_err() {
                // Leak the buffers rather than free memory the kernel uses.
                for s in self.slots.iter_mut() {
                    if let Some(f) = s.take() {
                        std::mem::forget(f.buf);
                    }
                }
                std::mem::forget(self.fixed.take());
                return;
            }
            self.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, DiskType, OpenOptions};

    #[test]
    fn uring_reads_and_writes_match_the_format_code() {
        let dir = tempfile::tempdir().unwrap();
        for dt in [DiskType::Fixed, DiskType::Dynamic] {
            let p = dir.path().join(format!("{}.vhd", dt.name()));
            Vhd::create(&p, &CreateOptions::new(dt, 8 << 20)).unwrap();
            let v = Vhd::open_direct(
                &p,
                &OpenOptions {
                    write: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut q = match Queue::new(&v, 8) {
                Ok(q) => q,
                Err(e) => {
                    eprintln!("SKIP uring test: {e}");
                    return;
                }
            };
            // Writes: first ones allocate (synchronous path), later ones
            // overwrite (ring path).
            for round in 0..2u8 {
                for i in 0..16u64 {
                    while !q.has_room() {
                        for c in q.complete_at_least(3).unwrap() {
                            c.result.unwrap();
                        }
                    }
                    let mut b = AlignedBuf::new(4096).unwrap();
                    b.as_mut_slice().fill(i as u8 + round * 16);
                    q.submit(i, b, i * 512 * 1024, true).unwrap();
                }
                // Writes in flight to the same place are unordered.
                for c in q.drain().unwrap() {
                    c.result.unwrap();
                }
            }
            for c in q.drain().unwrap() {
                c.result.unwrap();
            }
            for i in 0..16u64 {
                let b = AlignedBuf::new(4096).unwrap();
                q.submit(i, b, i * 512 * 1024, false).unwrap();
                for c in q.drain().unwrap() {
                    c.result.unwrap();
                    let Buffer::Owned(b) = c.buf else {
                        panic!("owned buffer expected")
                    };
                    assert!(b.as_slice().iter().all(|&x| x == c.tag as u8 + 16));
                }
            }
            drop(q);
            // Registered buffers: write through one, read through another.
            let mut q = Queue::with_fixed_buffers(&v, 4, 2, 8192).unwrap();
            q.set_max_transfer(4096);
            q.fixed_buffer(0).unwrap().fill(0xcd);
            q.submit_fixed(1, 0, 8192, 7 << 20, true).unwrap();
            assert!(q.fixed_buffer(0).is_none(), "busy while in flight");
            q.drain()
                .unwrap()
                .into_iter()
                .for_each(|c| c.result.unwrap());
            q.submit_fixed(2, 1, 8192, 7 << 20, false).unwrap();
            q.drain()
                .unwrap()
                .into_iter()
                .for_each(|c| c.result.unwrap());
            assert!(q.fixed_buffer(1).unwrap().iter().all(|&x| x == 0xcd));
            let mut plain = [0u8; 4096];
            v.read_at(&mut plain, 3 * 512 * 1024).unwrap();
            assert!(plain.iter().all(|&x| x == 19));
        }
    }
}
