//! Asynchronous LUN I/O for the FUSE data path (Linux native AIO).
//!
//! A FUSE thread that serves a read or write of a LUN file or block device
//! submits it here and goes back for the next request; one completion
//! thread per volume reaps finished I/O in batches and answers the kernel.
//! With synchronous `pread`/`pwrite` every request cost the FUSE thread a
//! sleep and a wake-up while the LUN worked, and every request rang the
//! disk's doorbell alone; here a FUSE thread stays on the CPU while
//! requests are queued, and one wake-up of the completion thread answers
//! several.
//!
//! Native AIO rather than io_uring: an io_uring completion of file I/O is
//! posted by the task that submitted it (task work), which would wake the
//! FUSE thread out of its read of `/dev/fuse` for every completion, the
//! very hand-off this avoids. AIO completes a direct I/O from the device's
//! interrupt straight into the context's ring, waking only the reaper.
//!
//! Only aligned direct I/O to a file descriptor comes here; anything else,
//! and any request that fails or comes back short, takes the synchronous
//! path (which handles redirection through a peer and outages).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vhd::io::AlignedBuf;

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
/// Requests in flight per volume (the context's ring size).
const DEPTH: usize = 256;
/// Completions taken per wake-up at most.
const BATCH: usize = 64;
/// Spare buffers kept per size class.
const SPARE: usize = 64;

/// `struct iocb` of `<linux/aio_abi.h>` (little-endian layout).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: i32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// `struct io_event` of `<linux/aio_abi.h>`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// Which way a request moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// From the LUN into the buffer.
    Read,
    /// From the buffer to the LUN.
    Write,
}

/// What is done with a finished request: the result and the buffer.
pub type Done = Box<dyn FnOnce(io::Result<()>, AlignedBuf) + Send>;

/// A request in flight; its address is the iocb's `data`.
struct Req {
    iocb: Iocb,
    buf: AlignedBuf,
    len: usize,
    /// Keeps the descriptor open until the I/O is over.
    _lun: Arc<dyn vhd::BlockIo>,
    done: Done,
}

struct Shared {
    ctx: u64,
    stop: AtomicBool,
    inflight: AtomicUsize,
    /// Spare buffers by size class (log2 of the size).
    spare: Mutex<Vec<Vec<AlignedBuf>>>,
}

/// One volume's asynchronous I/O: a kernel AIO context and the thread that
/// reaps it. Dropping it lets the thread finish what is in flight and end.
pub struct Aio {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Aio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Aio({} in flight)",
            self.shared.inflight.load(Ordering::Relaxed)
        )
    }
}

impl Aio {
    /// A context and its completion thread (named `name`).
    pub fn new(name: String) -> io::Result<Aio> {
        let mut ctx = 0u64;
        // SAFETY: io_setup writes the new context's id into `ctx`.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, DEPTH as libc::c_long, &mut ctx) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            ctx,
            stop: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            spare: Mutex::new((0..32).map(|_| Vec::new()).collect()),
        });
        let s = shared.clone();
        if let Err(e) = std::thread::Builder::new()
            .name(name)
            .spawn(move || reap(&s))
        {
            // SAFETY: the context was set up above and has no I/O.
            unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
            return Err(e);
        }
        Ok(Aio { shared })
    }

    /// A page-aligned buffer of at least `len` bytes (a spare one when
    /// there is one of its size).
    pub fn buffer(&self, len: usize) -> io::Result<AlignedBuf> {
        let size = len.next_power_of_two().max(4096);
        let class = size.trailing_zeros() as usize;
        if let Ok(mut s) = self.shared.spare.lock() {
            if let Some(b) = s.get_mut(class).and_then(Vec::pop) {
                return Ok(b);
            }
        }
        AlignedBuf::new(size)
    }

    /// Keeps `buf` for a later request.
    pub fn give_back(&self, buf: AlignedBuf) {
        self.shared.give_back(buf);
    }

    /// Reads into (or writes from) the first `len` bytes of `buf` at
    /// `offset` of `lun`, through its direct descriptor, then calls
    /// `done`; `lun` is kept (its descriptor open) until then. A request
    /// that cannot be queued (no direct descriptor, `len` past the buffer,
    /// refused by the kernel) comes back with its buffer, not run.
    pub fn submit(
        &self,
        op: Op,
        lun: Arc<dyn vhd::BlockIo>,
        mut buf: AlignedBuf,
        len: usize,
        offset: u64,
        done: Done,
    ) -> Result<(), (AlignedBuf, Done)> {
        let Some(fd) = lun.direct_fd() else {
            return Err((buf, done));
        };
        if len > buf.len() || fd < 0 || self.shared.stop.load(Ordering::Relaxed) {
            return Err((buf, done));
        }
        let ptr = buf.as_mut_slice().as_mut_ptr() as u64;
        let mut req = Box::new(Req {
            iocb: Iocb {
                opcode: match op {
                    Op::Read => IOCB_CMD_PREAD,
                    Op::Write => IOCB_CMD_PWRITE,
                },
                fildes: fd as u32,
                buf: ptr,
                nbytes: len as u64,
                offset: offset as i64,
                ..Iocb::default()
            },
            buf,
            len,
            _lun: lun,
            done,
        });
        req.iocb.data = &*req as *const Req as u64;
        let raw = Box::into_raw(req);
        // SAFETY: `raw` is a live allocation until the reaper or the
        // failure branch below takes it back.
        let mut iocbp = unsafe { &mut (*raw).iocb as *mut Iocb };
        self.shared.inflight.fetch_add(1, Ordering::AcqRel);
        // SAFETY: one valid iocb pointer; its buffer and descriptor stay
        // alive until the completion is reaped (the request owns them).
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.shared.ctx,
                1 as libc::c_long,
                &mut iocbp as *mut *mut Iocb,
            )
        };
        if r == 1 {
            return Ok(());
        }
        self.shared.inflight.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: the kernel did not take the request: it is still ours.
        let req = unsafe { Box::from_raw(raw) };
        Err((req.buf, req.done))
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

impl Shared {
    fn give_back(&self, buf: AlignedBuf) {
        let class = buf.len().trailing_zeros() as usize;
        if !buf.len().is_power_of_two() {
            return;
        }
        if let Ok(mut s) = self.spare.lock() {
            if let Some(v) = s.get_mut(class) {
                if v.len() < SPARE {
                    v.push(buf);
                }
            }
        }
    }
}

/// The completion thread: answers finished requests until the volume is
/// gone and nothing is in flight, then frees the context.
fn reap(s: &Shared) {
    let mut events = [IoEvent::default(); BATCH];
    loop {
        if s.stop.load(Ordering::Relaxed) && s.inflight.load(Ordering::Acquire) == 0 {
            break;
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: Duration::from_millis(250).as_nanos() as libc::c_long,
        };
        // SAFETY: `events` has room for BATCH events.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                s.ctx,
                1 as libc::c_long,
                BATCH as libc::c_long,
                events.as_mut_ptr(),
                &timeout as *const libc::timespec,
            )
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(
                "asynchronous LUN I/O: io_getevents failed: {}",
                io::Error::last_os_error()
            );
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        for ev in &events[..n as usize] {
            // SAFETY: `data` is the address of a request leaked at submit
            // and reaped exactly once, here.
            let req = unsafe { Box::from_raw(ev.data as *mut Req) };
            s.inflight.fetch_sub(1, Ordering::AcqRel);
            let r = if ev.res < 0 {
                Err(io::Error::from_raw_os_error((-ev.res) as i32))
            } else if ev.res as usize != req.len {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {} of {} bytes", ev.res, req.len),
                ))
            } else {
                Ok(())
            };
            let Req { buf, done, .. } = *req;
            done(r, buf);
        }
    }
    // SAFETY: nothing is in flight and no one submits any more.
    unsafe { libc::syscall(libc::SYS_io_destroy, s.ctx) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    type Finished = mpsc::Receiver<(io::Result<()>, AlignedBuf)>;

    fn done_to(tx: &mpsc::Sender<(io::Result<()>, AlignedBuf)>) -> Done {
        let tx = tx.clone();
        Box::new(move |r, b| {
            let _ = tx.send((r, b));
        })
    }

    fn recv(rx: &Finished) -> (io::Result<()>, AlignedBuf) {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a completion within 10 s")
    }

    /// A file of its own under the temporary directory, removed at drop.
    struct TempPath(std::path::PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A LUN file of `blocks` 4 KiB blocks open for direct I/O; None
    /// (after a SKIP line for `test`) where the temporary directory
    /// refuses O_DIRECT (tmpfs).
    fn lun(blocks: u64, test: &str) -> Option<(TempPath, Arc<dyn vhd::BlockIo>)> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("csv-aio-test-{}-{n}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(blocks * 4096).unwrap();
        let d = vhd::io::DirectFile::open(&p, true).unwrap();
        let p = TempPath(p);
        if !d.is_direct() {
            println!("SKIP {test}: {} refuses O_DIRECT", p.0.display());
            return None;
        }
        Some((p, Arc::new(d)))
    }

    #[test]
    fn writes_then_reads_come_back_through_the_completion_thread() {
        let Some((_p, f)) = lun(
            64,
            "writes_then_reads_come_back_through_the_completion_thread",
        ) else {
            return;
        };
        let aio = Aio::new("aio-test".into()).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..16u64 {
            let mut b = aio.buffer(8192).unwrap();
            b.as_mut_slice()[..8192].fill(i as u8 + 1);
            assert!(aio
                .submit(Op::Write, f.clone(), b, 8192, i * 8192, done_to(&tx))
                .is_ok());
        }
        for _ in 0..16 {
            let (r, b) = recv(&rx);
            r.unwrap();
            aio.give_back(b);
        }
        for i in 0..16u64 {
            let b = aio.buffer(8192).unwrap();
            assert!(aio
                .submit(Op::Read, f.clone(), b, 8192, i * 8192, done_to(&tx))
                .is_ok());
        }
        let mut seen = Vec::new();
        for _ in 0..16 {
            let (r, b) = recv(&rx);
            r.unwrap();
            let first = b.as_slice()[0];
            assert!(b.as_slice()[..8192].iter().all(|&x| x == first));
            seen.push(first);
        }
        seen.sort_unstable();
        assert_eq!(seen, (1..=16).collect::<Vec<u8>>());
    }

    #[test]
    fn a_read_past_the_end_completes_as_an_error() {
        let Some((_p, f)) = lun(2, "a_read_past_the_end_completes_as_an_error") else {
            return;
        };
        let aio = Aio::new("aio-test".into()).unwrap();
        let (tx, rx) = mpsc::channel();
        let b = aio.buffer(4096).unwrap();
        assert!(aio
            .submit(Op::Read, f, b, 4096, 1 << 20, done_to(&tx))
            .is_ok());
        let (r, _) = recv(&rx);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_request_that_cannot_be_queued_comes_back_unrun() {
        let Some((_p, f)) = lun(2, "a_request_that_cannot_be_queued_comes_back_unrun") else {
            return;
        };
        let aio = Aio::new("aio-test".into()).unwrap();
        let (tx, rx) = mpsc::channel();
        // A LUN with no descriptor for direct I/O.
        let mem: Arc<dyn vhd::BlockIo> = Arc::new(vhd::io::MemIo::new(vec![0; 8192]));
        let b = aio.buffer(4096).unwrap();
        let Err((b, _done)) = aio.submit(Op::Read, mem, b, 4096, 0, done_to(&tx)) else {
            panic!("a LUN without a descriptor was queued");
        };
        // Longer than the buffer.
        assert!(aio.submit(Op::Read, f, b, 8192, 0, done_to(&tx)).is_err());
        assert!(rx.try_recv().is_err(), "nothing completes");
    }

    #[test]
    fn dropping_the_context_still_answers_what_is_in_flight() {
        let Some((_p, f)) = lun(256, "dropping_the_context_still_answers_what_is_in_flight") else {
            return;
        };
        let aio = Aio::new("aio-test".into()).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..64u64 {
            let b = aio.buffer(4096).unwrap();
            assert!(aio
                .submit(Op::Write, f.clone(), b, 4096, i * 4096, done_to(&tx))
                .is_ok());
        }
        drop(aio);
        for _ in 0..64 {
            recv(&rx).0.unwrap();
        }
    }
}
