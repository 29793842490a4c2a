//! `/ClusterStorage/VolumeN` on one host: a FUSE filesystem whose metadata
//! lives with the volume's coordinator and whose file data this host reads
//! and writes straight on the LUN.
//!
//! - Every namespace operation is one call to the coordinator (committed
//!   through Raft, or a linearizable read), so paths and inode numbers are
//!   the same on every host. Attributes and names are not cached by the
//!   kernel (TTL 0): what one host changed, the next call on any host sees.
//! - Opening a file takes a lease on its extent map (a write lease for a
//!   writer: at most one host writes a file), fetches the map, and keeps it
//!   while the file is open; a background thread renews the leases.
//! - A write finds its LUN blocks in the map; where there are none it asks
//!   the coordinator for space in large chunks (so a growing VHD costs few
//!   calls), then writes to the LUN directly. Writes into never-written
//!   space are remembered and reported at flush, fsync or close, after the
//!   LUN itself was flushed: the coordinator never says "written" about
//!   bytes that might not be on the LUN, so a file never shows what a
//!   deleted file left there.
//! - Close-to-open coherence: another host sees this host's data and size
//!   after its fsync or close; an open re-reads the map, and a reader that
//!   meets a hole or unwritten range inside the size asks again.
//! - A host that cannot renew a write lease before it runs out stops
//!   writing (`EIO`): by then the coordinator may have given the file to
//!   another host.

use crate::aio::Op;
use crate::extents::{ExtentMap, Piece};
use coordinator::client::{Client, ClientError};
use coordinator::codec::extents_from_proto;
use coordinator::meta::{is_snapshot_ino, Extent};
use coordinator::proto::{self, volume_op, ErrorCode};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a lease lasts; renewed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// Smallest and largest allocation request.
const MIN_CHUNK: u64 = 64 << 10;
const MAX_CHUNK: u64 = 64 << 20;
const TTL: Duration = Duration::ZERO;
/// Block of a redirected write (redirect-on-write after a snapshot): the
/// written range is widened to whole blocks within its extent, and what
/// the write does not cover is copied to the new place.
const REDIRECT_UNIT: u64 = 4096;
/// Redirected or written ranges reported to the coordinator in one
/// command.
const REMAP_BATCH: usize = 1024;
/// How long a flush (every close of a descriptor) waits for the
/// coordinator to take this host's writes before it leaves them to the
/// file's fsync or last close.
const FLUSH_PATIENCE: Duration = Duration::from_secs(1);

/// Snapshot files and `.snapshots` are read-only.
fn writable(ino: u64) -> Result<(), Errno> {
    if is_snapshot_ino(ino) {
        Err(Errno::EROFS)
    } else {
        Ok(())
    }
}

/// New writes to a volume wait while a snapshot freezes it.
#[derive(Debug, Default)]
struct GateState {
    /// Frozen until this (the freeze's time limit), unless thawed first.
    frozen_until: Option<Instant>,
    /// Writes in progress.
    inflight: u32,
    /// The time limit passed while frozen: writes went on.
    expired: bool,
}

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

/// A write in progress (lets a freeze wait for it); it may end on another
/// thread than it began (an asynchronous write).
struct GateGuard(Arc<Gate>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = self.0.state.lock() {
            g.inflight = g.inflight.saturating_sub(1);
        }
        self.0.cv.notify_all();
    }
}

impl Gate {
    /// Waits while the volume is frozen (at most until the freeze's time
    /// limit), then counts a write in progress.
    fn enter(self: &Arc<Self>, turn: Option<&Turn>) -> Result<GateGuard, Errno> {
        let mut g = self.state.lock().map_err(|_| Errno::EIO)?;
        if g.frozen_until.is_some() {
            may_block(turn);
        }
        while let Some(until) = g.frozen_until {
            let now = Instant::now();
            if now >= until {
                g.frozen_until = None;
                g.expired = true;
                tracing::warn!("snapshot freeze ran past its time limit; writes resume");
                self.cv.notify_all();
                break;
            }
            g = self
                .cv
                .wait_timeout(g, until - now)
                .map_err(|_| Errno::EIO)?
                .0;
        }
        g.inflight += 1;
        Ok(GateGuard(self.clone()))
    }
}

/// Reader turns per mount (see [`Readers`]).
const DEFAULT_READERS: usize = 2;

/// How long a FUSE thread that finished a request waits for a reader's
/// turn before it reads again without one.
const READER_PARK: Duration = Duration::from_millis(500);

thread_local! {
    /// This FUSE thread holds one of its mount's reader turns.
    static READER_TURN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Few of a mount's FUSE threads wait for the kernel's requests at a time.
///
/// The kernel hands each request to the thread that has waited longest
/// for one. With dozens of threads waiting, nearly every request woke a
/// sleeping thread (a context switch, costly in a VM) while the thread
/// that had just answered one went back to sleep. Reads and writes no
/// longer block a thread (they are submitted asynchronously), so a couple
/// of threads keep up with them and pick queued requests up without
/// sleeping; the others are there for requests that block (anything that
/// asks the coordinator, synchronous LUN I/O). So a thread reads from the
/// kernel only with a turn: it takes one when it finishes a request (waiting
/// at most [`READER_PARK`], then reading anyway, so threads come back when
/// the session ends), and gives it up when it starts a request that may
/// block, for a parked thread to take.
struct Readers {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Readers {
    fn new(turns: usize) -> Readers {
        Readers {
            free: Mutex::new(turns.max(1)),
            cv: Condvar::new(),
        }
    }

    /// The calling request's turn, given back at once if it may block.
    fn turn(&self, may_block: bool) -> Turn<'_> {
        let t = Turn(self);
        if may_block {
            t.blocking();
        }
        t
    }

    fn take(&self) {
        let Ok(mut free) = self.free.lock() else {
            return;
        };
        let deadline = Instant::now() + READER_PARK;
        while *free == 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            free = match self.cv.wait_timeout(free, deadline - now) {
                Ok(g) => g.0,
                Err(_) => return,
            };
        }
        *free -= 1;
        READER_TURN.set(true);
    }

    fn give_up(&self) {
        if READER_TURN.replace(false) {
            if let Ok(mut f) = self.free.lock() {
                *f += 1;
            }
            self.cv.notify_one();
        }
    }
}

/// A request in progress on a FUSE thread; when it ends, the thread takes
/// a reader's turn if it has none.
struct Turn<'a>(&'a Readers);

impl Turn<'_> {
    /// The request is about to block: the turn goes to another thread.
    fn blocking(&self) {
        self.0.give_up();
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !READER_TURN.get() {
            self.0.take();
        }
    }
}

/// A request on a FUSE thread is about to wait (for the coordinator, a
/// synchronous LUN I/O, a freeze): its reader's turn goes to another thread.
fn may_block(turn: Option<&Turn>) {
    if let Some(t) = turn {
        t.blocking();
    }
}

/// Blocking clients to the coordinator, one per concurrent caller.
pub struct ClientPool {
    idle: Mutex<Vec<Client>>,
    make: Box<dyn Fn() -> Client + Send + Sync>,
}

impl std::fmt::Debug for ClientPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientPool")
    }
}

impl ClientPool {
    /// A pool that makes clients with `make`.
    pub fn new(make: impl Fn() -> Client + Send + Sync + 'static) -> ClientPool {
        ClientPool {
            idle: Mutex::new(Vec::new()),
            make: Box::new(make),
        }
    }

    /// Runs `f` with a client of the pool.
    pub fn with<R>(&self, f: impl FnOnce(&mut Client) -> R) -> R {
        let c = self.idle.lock().ok().and_then(|mut v| v.pop());
        let mut c = c.unwrap_or_else(|| (self.make)());
        let r = f(&mut c);
        if let Ok(mut v) = self.idle.lock() {
            v.push(c);
        }
        r
    }
}

fn errno(e: &ClientError) -> Errno {
    match e.code() {
        Some(ErrorCode::NotFound) => Errno::ENOENT,
        Some(ErrorCode::Exists) => Errno::EEXIST,
        Some(ErrorCode::NotDir) => Errno::ENOTDIR,
        Some(ErrorCode::IsDir) => Errno::EISDIR,
        Some(ErrorCode::NotEmpty) => Errno::ENOTEMPTY,
        Some(ErrorCode::Invalid) | Some(ErrorCode::Loop) => Errno::EINVAL,
        Some(ErrorCode::NoSpace) => Errno::ENOSPC,
        Some(ErrorCode::Busy) => Errno::EBUSY,
        _ => {
            tracing::warn!("metadata call failed: {e}");
            Errno::EIO
        }
    }
}

/// A lease the coordinator just granted.
fn lease_from(l: &proto::Lease) -> Lease {
    Lease {
        epoch: l.epoch,
        write: l.write,
        deadline: Instant::now() + LEASE_TTL * 3 / 4,
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn name_of(name: &OsStr) -> Result<&str, Errno> {
    let s = name.to_str().ok_or(Errno::EINVAL)?;
    if s.len() > coordinator::meta::MAX_NAME {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(s)
}

#[derive(Debug)]
struct Lease {
    epoch: u64,
    write: bool,
    /// After this, a writer must stop (a margin before the real expiry).
    deadline: Instant,
}

#[derive(Debug)]
struct OpenFile {
    handles: u32,
    writers: u32,
    extents: ExtentMap,
    /// Size as this host knows it (its own writes included).
    size: u64,
    /// Size the coordinator has.
    size_reported: u64,
    /// Ranges written into unwritten space, not yet reported.
    dirty: Vec<(u64, u64)>,
    /// Redirected writes (file offset, reserved LUN pieces) whose new
    /// place is not yet in the coordinator's map.
    remaps: Vec<(u64, Vec<(u64, u64)>)>,
    /// Space reserved for redirected writes, not used yet (the coordinator
    /// frees it when this host's lease on the file ends).
    pool: Vec<(u64, u64)>,
    lease: Option<Lease>,
    /// The write lease was lost: writes fail until the file is reopened.
    fenced: bool,
    /// Attributes when opened (what `fstat` shows once the file is
    /// unlinked while still open).
    attr: proto::Attr,
    /// The last handle was released and the lease given back: an opener
    /// that finds this entry must start afresh.
    closed: bool,
    /// When the map and size were last fetched from the coordinator.
    refreshed: Instant,
}

type BufSlot = std::cell::RefCell<Option<vhd::io::AlignedBuf>>;

thread_local! {
    /// Each FUSE thread's aligned buffers for what it reads and writes.
    static READ_BUF: BufSlot = const { std::cell::RefCell::new(None) };
    static WRITE_BUF: BufSlot = const { std::cell::RefCell::new(None) };
}

/// Runs `f` on the first `len` bytes of this thread's buffer in `slot`
/// (grown to the next power of two when too small).
fn with_buf<R>(
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

/// An asynchronous I/O's way to the own path of the LUN.
struct OwnIo<'a> {
    aio: &'a crate::aio::Aio,
    /// The own path, with a descriptor for direct I/O.
    lun: Arc<dyn vhd::BlockIo>,
    /// Counts the bytes.
    own: Arc<crate::redirect::RedirectingLun>,
}

/// A write ready to go (see [`VolumeFs::write_plan`]).
struct WritePlan {
    file: Arc<Mutex<OpenFile>>,
    pieces: Vec<Piece>,
    /// Holds a snapshot's freeze off until the write is over.
    in_progress: GateGuard,
}

/// Answers a FUSE read with the bytes `read` delivers, or its error.
fn answer_read(reply: ReplyData, read: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), Errno>) {
    let mut reply = Some(reply);
    let r = read(&mut |b| {
        if let Some(r) = reply.take() {
            r.data(b);
        }
    });
    if let (Err(e), Some(r)) = (r, reply.take()) {
        r.error(e);
    }
}

/// A directory entry as listed at `opendir`: inode, kind, name.
type DirEntry = (u64, FileType, String);

#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: u64,
    write: bool,
}

/// One mounted volume.
pub struct VolumeFs {
    vol: u64,
    node: u64,
    lun: Arc<dyn vhd::BlockIo>,
    capacity: u64,
    clients: ClientPool,
    files: Mutex<HashMap<u64, Arc<Mutex<OpenFile>>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Directory listings by open directory handle.
    dirs: Mutex<HashMap<u64, Vec<DirEntry>>>,
    next_fh: AtomicU64,
    stop: Arc<AtomicBool>,
    gate: Arc<Gate>,
    /// Asynchronous I/O to the own path (None: every read and write is
    /// synchronous).
    aio: Option<crate::aio::Aio>,
    /// The redirecting LUN behind `lun`, whose own path asynchronous I/O
    /// goes to while it is in use.
    own_path: std::sync::RwLock<Option<Arc<crate::redirect::RedirectingLun>>>,
    /// Which FUSE threads read requests from the kernel.
    readers: Readers,
    /// FileSystemRedirected: file I/O goes to the coordinator.
    fs_redirect: std::sync::RwLock<Option<Arc<crate::fsredirect::Redirector>>>,
    /// Handles this host opened for FileSystemRedirected hosts: handle →
    /// the host (closed if the cluster has that host down).
    served_for: Mutex<HashMap<u64, u64>>,
    /// Whether the LUN is out of reach from here (no path, own or
    /// through a peer): I/O waits for one.
    outage: std::sync::RwLock<Option<Box<dyn Fn() -> bool + Send + Sync>>>,
}

impl std::fmt::Debug for VolumeFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFs")
            .field("vol", &self.vol)
            .finish_non_exhaustive()
    }
}

fn file_type(kind: u32) -> FileType {
    match kind {
        0 => FileType::Directory,
        2 => FileType::Symlink,
        _ => FileType::RegularFile,
    }
}

impl VolumeFs {
    /// A filesystem for VolumeN on `lun` (whose data area ends at
    /// `capacity`), acting as host `node`.
    pub fn new(
        vol: u64,
        node: u64,
        lun: Arc<dyn vhd::BlockIo>,
        capacity: u64,
        clients: ClientPool,
    ) -> Arc<VolumeFs> {
        let fs = Arc::new(VolumeFs {
            vol,
            node,
            lun,
            capacity,
            clients,
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            stop: Arc::new(AtomicBool::new(false)),
            gate: Arc::default(),
            aio: match crate::aio::Aio::new(format!("csv-aio-v{vol}")) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(
                        "Volume{vol}: no asynchronous I/O ({e}): reads and writes are synchronous"
                    );
                    None
                }
            },
            own_path: std::sync::RwLock::new(None),
            readers: Readers::new(DEFAULT_READERS),
            fs_redirect: std::sync::RwLock::new(None),
            served_for: Mutex::new(HashMap::new()),
            outage: std::sync::RwLock::new(None),
        });
        let weak = Arc::downgrade(&fs);
        let stop = fs.stop.clone();
        let _ = std::thread::Builder::new()
            .name(format!("csv-lease-v{vol}"))
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(500));
                    match weak.upgrade() {
                        Some(fs) => fs.renew_leases(),
                        None => return,
                    }
                }
            });
        fs
    }

    fn fattr(&self, a: &proto::Attr) -> FileAttr {
        let mut size = a.size;
        if let Some(f) = self.files.lock().ok().and_then(|m| m.get(&a.ino).cloned()) {
            if let Ok(f) = f.lock() {
                size = size.max(f.size);
            }
        }
        let kind = file_type(a.kind);
        FileAttr {
            ino: INodeNo(a.ino),
            size,
            blocks: size.div_ceil(512),
            atime: ms_to_time(a.mtime),
            mtime: ms_to_time(a.mtime),
            ctime: ms_to_time(a.ctime),
            crtime: ms_to_time(a.ctime),
            kind,
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn call<R>(&self, f: impl FnOnce(&mut Client) -> Result<R, ClientError>) -> Result<R, Errno> {
        self.clients.with(f).map_err(|e| errno(&e))
    }

    fn op(&self, op: volume_op::Op) -> Result<proto::Reply, Errno> {
        self.op_within(op, None)
    }

    /// As [`VolumeFs::op`], giving up after `within` when given: the
    /// coordinator's silence is then ETIMEDOUT.
    fn op_within(
        &self,
        op: volume_op::Op,
        within: Option<Duration>,
    ) -> Result<proto::Reply, Errno> {
        let vol = self.vol;
        let Some(t) = within else {
            return self.call(|c| c.volume_op(vol, op));
        };
        self.clients
            .with(|c| c.with_patience(t, |c| c.volume_op(vol, op)))
            .map_err(|e| match e {
                ClientError::Unavailable { .. } => Errno::ETIMEDOUT,
                e => errno(&e),
            })
    }

    fn op_attr(&self, op: volume_op::Op) -> Result<proto::Attr, Errno> {
        match self.op(op)?.value {
            Some(proto::reply::Value::Attr(a)) => Ok(a),
            _ => Err(Errno::EIO),
        }
    }

    /// Makes a file, a directory or a symlink; for a file with `lease`,
    /// this host's write lease comes in the same command (one commit
    /// where create and open took two), when the coordinator gave it.
    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        kind: u32,
        mode: u32,
        target: &str,
        lease: bool,
    ) -> Result<(proto::Attr, Option<Lease>), Errno> {
        writable(parent)?;
        let name = name_of(name)?;
        let r = self.op(volume_op::Op::Create(proto::CreateOp {
            parent,
            name: name.into(),
            kind,
            mode: mode & 0o7777,
            uid: req.uid(),
            gid: req.gid(),
            target: target.into(),
            now: 0,
            lease_node: if lease { self.node } else { 0 },
            lease_ttl: if lease {
                LEASE_TTL.as_millis() as u64
            } else {
                0
            },
        }))?;
        match r.value {
            Some(proto::reply::Value::Attr(a)) => Ok((a, None)),
            Some(proto::reply::Value::Created(proto::CreatedFile {
                attr: Some(a),
                lease: Some(l),
            })) => Ok((a, Some(lease_from(&l)))),
            _ => Err(Errno::EIO),
        }
    }

    /// A file's map as the coordinator has it, shared flags included.
    fn fetch_extents(&self, ino: u64) -> Result<ExtentMap, Errno> {
        let vol = self.vol;
        let list = self.call(|c| c.extents(vol, ino))?;
        let shared: Vec<(Extent, bool)> = list
            .iter()
            .map(|e| {
                (
                    Extent {
                        file_off: e.file_off,
                        lun_off: e.lun_off,
                        len: e.len,
                        unwritten: e.unwritten,
                    },
                    e.shared,
                )
            })
            .collect();
        Ok(ExtentMap::with_shared(&shared))
    }

    fn grant(&self, ino: u64, write: bool) -> Result<Lease, Errno> {
        let r = self.op(volume_op::Op::GrantLease(proto::GrantLeaseOp {
            node: self.node,
            ino,
            write,
            now: 0,
            ttl: LEASE_TTL.as_millis() as u64,
        }))?;
        match r.value {
            Some(proto::reply::Value::Lease(l)) => Ok(lease_from(&l)),
            _ => Err(Errno::EIO),
        }
    }

    /// Gives back this host's lease on `ino` (best effort: an unanswered
    /// one runs out by itself).
    fn revoke(&self, ino: u64) {
        let _ = self.op(volume_op::Op::RevokeLease(proto::RevokeLeaseOp {
            node: self.node,
            ino,
            ..Default::default()
        }));
    }

    /// Opens `ino` on this host: lease, attributes, extent map.
    fn open_file(&self, ino: u64, write: bool) -> Result<u64, Errno> {
        self.open_file_as(ino, write, None, None)
    }

    /// Opens `ino`; `created` is its attributes when this host just made
    /// it (empty: nothing to fetch), `granted` the lease it came with.
    fn open_file_as(
        &self,
        ino: u64,
        write: bool,
        created: Option<&proto::Attr>,
        mut granted: Option<Lease>,
    ) -> Result<u64, Errno> {
        loop {
            let file = self.open_entry(ino, write, created, granted.take())?;
            let mut f = file.lock().map_err(|_| Errno::EIO)?;
            if f.closed {
                // Released and revoked meanwhile: drop it and start again.
                drop(f);
                self.forget(ino, &file);
                continue;
            }
            if write && !f.lease.as_ref().is_some_and(|l| l.write) {
                let l = self.grant(ino, true)?;
                f.lease = Some(l);
            }
            if f.handles > 0 && f.writers == 0 {
                // Open again while open here for reading: close-to-open
                // wants what other hosts closed since.
                self.refresh(ino, &mut f);
            }
            f.handles += 1;
            if write {
                f.writers += 1;
            }
            break;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .map_err(|_| Errno::EIO)?
            .insert(fh, Handle { ino, write });
        Ok(fh)
    }

    /// Removes `file` from the open files if it is still the entry of `ino`.
    fn forget(&self, ino: u64, file: &Arc<Mutex<OpenFile>>) {
        if let Ok(mut m) = self.files.lock() {
            if m.get(&ino).is_some_and(|x| Arc::ptr_eq(x, file)) {
                m.remove(&ino);
            }
        }
    }

    /// The open-file entry of `ino`, made (lease, attributes, map) if there
    /// is none.
    fn open_entry(
        &self,
        ino: u64,
        write: bool,
        created: Option<&proto::Attr>,
        granted: Option<Lease>,
    ) -> Result<Arc<Mutex<OpenFile>>, Errno> {
        let existing = self
            .files
            .lock()
            .map_err(|_| Errno::EIO)?
            .get(&ino)
            .cloned();
        let file = match existing {
            Some(f) => f,
            None => {
                let vol = self.vol;
                let attr = match created {
                    Some(a) => a.clone(),
                    None => self.call(|c| c.getattr(vol, ino))?,
                };
                if attr.kind != 1 {
                    return Err(Errno::EISDIR);
                }
                let lease = match granted {
                    Some(l) => l,
                    None => self.grant(ino, write)?,
                };
                let extents = match created {
                    // A file this host just created has no extents yet.
                    Some(_) => ExtentMap::default(),
                    None => self.fetch_extents(ino)?,
                };
                let f = Arc::new(Mutex::new(OpenFile {
                    handles: 0,
                    writers: 0,
                    extents,
                    size: attr.size,
                    size_reported: attr.size,
                    dirty: Vec::new(),
                    remaps: Vec::new(),
                    pool: Vec::new(),
                    lease: Some(lease),
                    fenced: false,
                    attr,
                    closed: false,
                    refreshed: Instant::now(),
                }));
                let mut files = self.files.lock().map_err(|_| Errno::EIO)?;
                files.entry(ino).or_insert(f).clone()
            }
        };
        Ok(file)
    }

    fn file(&self, ino: u64) -> Option<Arc<Mutex<OpenFile>>> {
        self.files.lock().ok()?.get(&ino).cloned()
    }

    /// Reports writes into unwritten space and a grown size, after making
    /// the data durable on the LUN.
    fn report(&self, ino: u64, f: &mut OpenFile) -> Result<(), Errno> {
        self.report_within(ino, f, None)
    }

    /// As [`VolumeFs::report`], each call to the coordinator giving up
    /// after `within` when given (ETIMEDOUT); what was not reported stays
    /// to be reported.
    fn report_within(
        &self,
        ino: u64,
        f: &mut OpenFile,
        within: Option<Duration>,
    ) -> Result<(), Errno> {
        if f.dirty.is_empty() && f.remaps.is_empty() && f.size <= f.size_reported {
            return Ok(());
        }
        self.lun.flush().map_err(|e| io_errno(&e))?;
        // Redirected writes first: their new places go into the map,
        // neighbours merged, many to a command.
        if !f.remaps.is_empty() {
            let mut list = std::mem::take(&mut f.remaps);
            list.sort_unstable_by_key(|r| r.0);
            let mut merged: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
            for (off, pieces) in list {
                if let Some((moff, mp)) = merged.last_mut() {
                    let mlen: u64 = mp.iter().map(|p| p.1).sum();
                    if *moff + mlen == off {
                        for p in pieces {
                            match mp.last_mut() {
                                Some(l) if l.0 + l.1 == p.0 => l.1 += p.1,
                                _ => mp.push(p),
                            }
                        }
                        continue;
                    }
                }
                merged.push((off, pieces));
            }
            while !merged.is_empty() {
                let n = merged.len().min(REMAP_BATCH);
                let batch: Vec<(u64, Vec<(u64, u64)>)> = merged[..n].to_vec();
                let r = self.op_within(
                    volume_op::Op::Remap(coordinator::codec::remap_to_proto(ino, &batch)),
                    within,
                );
                match r {
                    Ok(_) => {
                        merged.drain(..n);
                    }
                    Err(Errno::EINVAL) => {
                        // The reserved space is gone: the lease ran out, and
                        // what was written there is not this file's any more.
                        tracing::error!(ino, "redirected writes lost their reserved space; writes to this open file now fail");
                        f.fenced = true;
                        return Err(Errno::EIO);
                    }
                    Err(e) => {
                        f.remaps = merged;
                        return Err(e);
                    }
                }
            }
        }
        let mut ranges = std::mem::take(&mut f.dirty);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (o, l) in ranges {
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml >= o => *ml = (*ml).max(o + l - *mo),
                _ => merged.push((o, l)),
            }
        }
        if merged.is_empty() {
            merged.push((0, 0));
        }
        // Many ranges to a command.
        while !merged.is_empty() {
            let n = merged.len().min(REMAP_BATCH);
            let (off, len) = merged[0];
            let r = self.op_within(
                volume_op::Op::MarkWritten(proto::MarkWrittenOp {
                    ino,
                    off,
                    len,
                    size: f.size,
                    now: 0,
                    more: merged[1..n]
                        .iter()
                        .map(|&(off, len)| proto::WrittenRange { off, len })
                        .collect(),
                }),
                within,
            );
            if let Err(e) = r {
                f.dirty.extend(merged);
                return Err(e);
            }
            merged.drain(..n);
        }
        f.size_reported = f.size;
        Ok(())
    }

    fn renew_leases(&self) {
        let open: Vec<(u64, Arc<Mutex<OpenFile>>)> = match self.files.lock() {
            Ok(m) => m.iter().map(|(k, v)| (*k, v.clone())).collect(),
            Err(_) => return,
        };
        for (ino, f) in open {
            let (write, due) = match f.lock() {
                Ok(g) => match &g.lease {
                    Some(l) => (
                        l.write,
                        l.deadline.saturating_duration_since(Instant::now()) < LEASE_TTL / 2,
                    ),
                    None => continue,
                },
                Err(_) => continue,
            };
            if !due {
                continue;
            }
            match self.grant(ino, write) {
                Ok(l) => {
                    if let Ok(mut g) = f.lock() {
                        if g.closed {
                            // Closed while this renewal was on its way:
                            // give back what it just took.
                            self.revoke(ino);
                            continue;
                        }
                        let lost = g.lease.as_ref().is_some_and(|old| old.epoch != l.epoch);
                        if lost && write {
                            // The lease lapsed and another host may have
                            // had the file meanwhile: stop writing.
                            tracing::error!(
                                ino,
                                "write lease lapsed; writes to this open file now fail"
                            );
                            g.fenced = true;
                        }
                        g.lease = Some(l);
                    }
                }
                Err(e) => tracing::warn!(ino, "cannot renew the lease: {e:?}"),
            }
        }
    }

    /// Reads `[off, off + size)` (clamped to the size) and hands the bytes
    /// to `f` (a reply).
    fn read_data<R>(
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
        turn: Option<&Turn>,
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
            may_block(turn);
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
            for p in pieces {
                let at = (p.file_off - off) as usize;
                let dst = &mut b[at..at + p.len as usize];
                match (p.lun_off, p.unwritten) {
                    (Some(l), false) => self.lun.read_at(dst, l).map_err(|e| io_errno(&e))?,
                    _ => dst.fill(0),
                }
            }
            deliver(b)
        })
    }

    /// The own path for asynchronous I/O of `len` bytes at LUN offset
    /// `at`, when such I/O may go there now: aligned for O_DIRECT, the
    /// path a file or device open for direct I/O, the volume not
    /// redirected, no fault drill on the path.
    fn own_io(&self, at: u64, len: u64) -> Option<OwnIo<'_>> {
        let align = vhd::io::DIRECT_ALIGN as u64;
        if at % align != 0 || len % align != 0 || len == 0 {
            return None;
        }
        let aio = self.aio.as_ref()?;
        let own = self.own_path.read().ok()?.clone()?;
        let lun = own.direct_now()?;
        lun.direct_fd()?;
        Some(OwnIo { aio, lun, own })
    }

    /// Lets `n` FUSE threads read requests at a time (before the session
    /// starts; see [`Readers`]).
    pub fn set_readers(&self, n: usize) {
        if let Ok(mut f) = self.readers.free.lock() {
            *f = n.max(1);
        }
    }

    /// Uses `rl`'s own path for asynchronous reads and writes while it is
    /// in use (`rl` must be this volume's LUN).
    pub fn set_own_path(&self, rl: Arc<crate::redirect::RedirectingLun>) {
        if let Ok(mut o) = self.own_path.write() {
            *o = Some(rl);
        }
    }

    /// Runs `f` on a thread of its own: the synchronous retry of an
    /// asynchronous request that failed, which may wait for a path
    /// through a peer and must not hold up the completion thread.
    fn retry_in_background(self: &Arc<Self>, f: impl FnOnce(&VolumeFs) + Send + 'static) {
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
    /// `reply` from the completion thread); gives `reply` back when not.
    fn read_async(
        self: &Arc<Self>,
        ino: u64,
        off: u64,
        size: u32,
        pieces: &[Piece],
        reply: ReplyData,
    ) -> Option<ReplyData> {
        let [Piece {
            lun_off: Some(at),
            unwritten: false,
            len,
            ..
        }] = *crate::extents::coalesce(pieces)
        else {
            return Some(reply);
        };
        let Some(OwnIo { aio, lun, own }) = self.own_io(at, len) else {
            return Some(reply);
        };
        let Ok(buf) = aio.buffer(len as usize) else {
            return Some(reply);
        };
        let fs = self.clone();
        let done: crate::aio::Done = Box::new(move |r, buf| {
            match r {
                Ok(()) => {
                    own.count_direct(false, len);
                    reply.data(&buf.as_slice()[..len as usize]);
                }
                Err(e) => {
                    tracing::debug!(
                        ino,
                        off,
                        "asynchronous read failed ({e}); retried synchronously"
                    );
                    fs.retry_in_background(move |fs| {
                        answer_read(reply, |deliver| {
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
        if let Err((buf, done)) = aio.submit(Op::Read, lun, buf, len as usize, at, done) {
            done(Err(std::io::Error::other("not queued")), buf);
        }
        None
    }

    /// Fetches the size and extent map of a file this host only reads.
    fn refresh(&self, ino: u64, f: &mut OpenFile) {
        f.refreshed = Instant::now();
        let vol = self.vol;
        if let Ok(a) = self.call(|c| c.getattr(vol, ino)) {
            f.size = f.size.max(a.size);
            f.size_reported = f.size;
        }
        if let Ok(e) = self.fetch_extents(ino) {
            f.extents = e;
        }
    }

    fn chunk_for(size: u64) -> u64 {
        (size / 8).next_power_of_two().clamp(MIN_CHUNK, MAX_CHUNK)
    }

    /// Makes sure `[off, off + len)` has LUN space; returns the pieces.
    fn ensure_space(
        &self,
        ino: u64,
        f: &mut OpenFile,
        off: u64,
        len: u64,
    ) -> Result<Vec<Piece>, Errno> {
        if f.extents.has_hole(off, len) {
            let chunk = Self::chunk_for(f.size.max(off + len));
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
        turn: Option<&Turn>,
    ) -> Result<Vec<(u64, u64)>, Errno> {
        let have: u64 = f.pool.iter().map(|p| p.1).sum();
        if have < len {
            may_block(turn);
            let chunk = Self::chunk_for(f.size).max((len - have).next_multiple_of(4096));
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
        turn: Option<&Turn>,
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
            let pieces = self.take_reserved(ino, f, u1 - u0, turn)?;
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
                may_block(turn);
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

    fn write_data(&self, ino: u64, off: u64, data: &[u8]) -> Result<u32, Errno> {
        let WritePlan {
            file,
            pieces,
            in_progress: _in_progress,
        } = self.write_plan(ino, off, data.len() as u64, None)?;
        // FUSE hands the data at an unaligned address; copy it into this
        // thread's aligned buffer once, so O_DIRECT writes of aligned
        // ranges go out without a fresh bounce buffer each time.
        with_buf(&WRITE_BUF, data.len(), |b| {
            b.copy_from_slice(data);
            self.write_pieces(b, off, &pieces)
        })?;
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
        turn: Option<&Turn>,
    ) -> Result<WritePlan, Errno> {
        let file = self.file(ino).ok_or(Errno::EBADF)?;
        let in_progress = self.gate.enter(turn)?;
        let mut f = file.lock().map_err(|_| Errno::EIO)?;
        if f.fenced
            || f.lease
                .as_ref()
                .is_none_or(|l| !l.write || Instant::now() > l.deadline)
        {
            return Err(Errno::EIO);
        }
        if f.extents.has_hole(off, len) {
            may_block(turn);
        }
        let p = self.ensure_space(ino, &mut f, off, len)?;
        let pieces = if p.iter().any(|p| !p.unwritten) && f.extents.is_shared(off, len) {
            self.redirect(ino, &mut f, off, len, turn)?;
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
        Ok(len as u32)
    }

    /// Writes `data` at `off` asynchronously when it lands in one piece of
    /// the LUN (answering `reply` from the completion thread); gives
    /// `reply` back, with nothing done, when not.
    fn write_async(
        self: &Arc<Self>,
        ino: u64,
        off: u64,
        data: &[u8],
        reply: ReplyWrite,
        turn: &Turn,
    ) -> Option<ReplyWrite> {
        let len = data.len() as u64;
        let (aio, lun, own, buf) = {
            // A cheap look first: a write this cannot take does not pay
            // for a plan twice.
            let Some(file) = self.file(ino) else {
                return Some(reply);
            };
            let Ok(f) = file.lock() else {
                return Some(reply);
            };
            let [Piece {
                lun_off: Some(at), ..
            }] = *crate::extents::coalesce(&f.extents.pieces(off, len))
            else {
                return Some(reply);
            };
            drop(f);
            let Some(OwnIo { aio, lun, own }) = self.own_io(at, len) else {
                return Some(reply);
            };
            let Ok(mut buf) = aio.buffer(data.len()) else {
                return Some(reply);
            };
            buf.as_mut_slice()[..data.len()].copy_from_slice(data);
            (aio, lun, own, buf)
        };
        let WritePlan {
            file,
            pieces,
            in_progress,
        } = match self.write_plan(ino, off, len, Some(turn)) {
            Ok(p) => p,
            Err(e) => {
                aio.give_back(buf);
                reply.error(e);
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
                turn.blocking();
                let r = self
                    .write_pieces(&buf.as_slice()[..data.len()], off, &pieces)
                    .and_then(|()| self.write_finish(&file, &pieces, off, len));
                self.answer_write(r, in_progress, buf, reply);
                return None;
            }
        };
        let fs = self.clone();
        let done: crate::aio::Done = Box::new(move |r, buf| match r {
            Ok(()) => {
                own.count_direct(true, len);
                let r = fs.write_finish(&file, &pieces, off, len);
                fs.answer_write(r, in_progress, buf, reply);
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
                    fs.answer_write(r, in_progress, buf, reply);
                });
            }
        });
        if let Err((buf, done)) = aio.submit(Op::Write, lun, buf, data.len(), at, done) {
            done(Err(std::io::Error::other("not queued")), buf);
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
        reply: ReplyWrite,
    ) {
        drop(in_progress);
        if let Some(a) = &self.aio {
            a.give_back(buf);
        }
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn release_handle(&self, fh: u64) -> Result<(), Errno> {
        let h = self
            .handles
            .lock()
            .map_err(|_| Errno::EIO)?
            .remove(&fh)
            .ok_or(Errno::EBADF)?;
        let Some(file) = self.file(h.ino) else {
            return Ok(());
        };
        let mut f = file.lock().map_err(|_| Errno::EIO)?;
        f.handles = f.handles.saturating_sub(1);
        if h.write {
            f.writers = f.writers.saturating_sub(1);
        }
        let res = if h.write {
            self.report(h.ino, &mut f)
        } else {
            Ok(())
        };
        if f.handles == 0 {
            // Give back space allocated past the end, and the lease.
            if h.write && f.extents.allocated_end() > f.size.next_multiple_of(4096) {
                let _ = self.op(volume_op::Op::SetAttr(proto::SetAttrOp {
                    ino: h.ino,
                    size: Some(f.size),
                    ..Default::default()
                }));
            }
            self.revoke(h.ino);
            f.closed = true;
            f.lease = None;
            drop(f);
            self.forget(h.ino, &file);
        }
        res
    }

    /// Removes a name (`rmdir` for a directory) and answers the kernel.
    fn remove(&self, parent: u64, name: &OsStr, rmdir: bool, reply: ReplyEmpty) {
        let vol = self.vol;
        let r = writable(parent)
            .and_then(|()| name_of(name))
            .and_then(|n| self.call(|c| c.unlink(vol, parent, n, rmdir)));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Freezes the volume on this host for a snapshot: new writes wait
    /// (until `until` at most), the writes in progress finish, and every
    /// open file's data and map changes reach the LUN and the coordinator.
    /// On failure the volume is thawed again.
    /// Returns how long the drain and the flush took.
    pub fn freeze(&self, until: Instant) -> Result<(Duration, Duration), String> {
        let t0 = Instant::now();
        {
            let mut g = self.gate.state.lock().map_err(|_| "gate poisoned")?;
            if g.frozen_until.is_some() {
                return Err(format!("Volume{} is already frozen", self.vol));
            }
            g.frozen_until = Some(until);
            g.expired = false;
            while g.inflight > 0 {
                let now = Instant::now();
                if now >= until {
                    g.frozen_until = None;
                    self.gate.cv.notify_all();
                    return Err(format!(
                        "{} write(s) on Volume{} did not finish within the time limit",
                        g.inflight, self.vol
                    ));
                }
                g = self
                    .gate
                    .cv
                    .wait_timeout(g, until - now)
                    .map_err(|_| "gate poisoned")?
                    .0;
            }
        }
        let drained = t0.elapsed();
        if let Err(e) = self.flush_all() {
            self.thaw(false);
            return Err(format!("flushing Volume{}: {e:?}", self.vol));
        }
        Ok((drained, t0.elapsed() - drained))
    }

    /// Lets writes go on after a freeze; first marks the extents of the
    /// files open for writing shared (a snapshot now holds them).
    /// Returns whether the freeze's time limit had passed (writes went
    /// on before the thaw).
    /// `committed`: a snapshot was taken (or may have been).
    pub fn thaw(&self, committed: bool) -> bool {
        if committed {
            self.refresh_writers();
        }
        let Ok(mut g) = self.gate.state.lock() else {
            return true;
        };
        let expired = g.expired || g.frozen_until.is_some_and(|u| Instant::now() >= u);
        g.frozen_until = None;
        g.expired = false;
        self.gate.cv.notify_all();
        expired
    }

    /// Whether a freeze holds writes now.
    pub fn frozen(&self) -> bool {
        self.gate
            .state
            .lock()
            .map(|g| g.frozen_until.is_some_and(|u| Instant::now() < u))
            .unwrap_or(false)
    }

    fn open_files(&self) -> Vec<(u64, Arc<Mutex<OpenFile>>)> {
        match self.files.lock() {
            Ok(m) => m.iter().map(|(k, v)| (*k, v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Flushes the LUN and reports every open file's writes.
    pub fn flush_all(&self) -> Result<(), Errno> {
        self.lun.flush().map_err(|e| io_errno(&e))?;
        for (ino, f) in self.open_files() {
            let mut g = f.lock().map_err(|_| Errno::EIO)?;
            if g.writers > 0 && !g.closed {
                self.report(ino, &mut g)?;
            }
        }
        Ok(())
    }

    /// Marks every extent of the files open for writing as shared: the
    /// snapshot just committed holds all of them (their changes were all
    /// reported at the freeze), so their next writes are redirected. A
    /// file whose changes were not all reported (the freeze's limit passed)
    /// has its map re-read from the coordinator instead.
    fn refresh_writers(&self) {
        for (ino, f) in self.open_files() {
            let Ok(mut g) = f.lock() else { continue };
            if g.writers == 0 || g.closed {
                continue;
            }
            if g.dirty.is_empty() && g.remaps.is_empty() {
                g.extents.share_all();
                continue;
            }
            match self.fetch_extents(ino) {
                Ok(m) if g.dirty.is_empty() => g.extents = m,
                _ => {
                    // Without the shared flags this host could write over
                    // what the snapshot holds: stop writing this file.
                    tracing::error!(ino, "cannot tell what a snapshot shares of this open file; writes to it now fail");
                    g.fenced = true;
                }
            }
        }
    }

    /// Stops the lease thread (the mount is going away).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Sets the LUN's "out of reach" probe (see [`VolumeFs::in_outage`]).
    pub fn set_outage_probe(&self, f: Box<dyn Fn() -> bool + Send + Sync>) {
        if let Ok(mut o) = self.outage.write() {
            *o = Some(f);
        }
    }

    /// Whether the LUN is out of reach from this host now.
    fn in_outage(&self) -> bool {
        self.outage
            .read()
            .ok()
            .and_then(|o| o.as_ref().map(|f| f()))
            .unwrap_or(false)
    }

    /// Sends this host's file I/O to the coordinator (Some) or does it
    /// here again (None; files open through the coordinator stay so until
    /// closed).
    pub fn set_fs_redirect(&self, r: Option<Arc<crate::fsredirect::Redirector>>) {
        if let Ok(mut x) = self.fs_redirect.write() {
            *x = r;
        }
    }

    /// Closes the files this host opened for `host` (a FileSystemRedirected
    /// host the cluster now has down), so their leases do not outlive it.
    pub fn release_served_for(&self, host: u64) -> usize {
        let handles: Vec<u64> = match self.served_for.lock() {
            Ok(mut m) => {
                let h: Vec<u64> = m
                    .iter()
                    .filter(|(_, from)| **from == host)
                    .map(|(h, _)| *h)
                    .collect();
                for x in &h {
                    m.remove(x);
                }
                h
            }
            Err(_) => return 0,
        };
        for h in &handles {
            let _ = self.release_handle(*h);
        }
        handles.len()
    }

    /// The redirector, while FileSystemRedirected.
    pub fn fs_redirector(&self) -> Option<Arc<crate::fsredirect::Redirector>> {
        self.fs_redirect.read().ok().and_then(|r| r.clone())
    }

    /// Opens `ino` through the coordinator when FileSystemRedirected (and
    /// this host is not the coordinator); None otherwise.
    fn remote_open(&self, ino: u64, write: bool) -> Option<Result<u64, Errno>> {
        let r = self.fs_redirector()?;
        // Until the coordinator is known (a second at most), and on the
        // coordinator itself, files open here.
        if r.target().is_none_or(|t| t.is_empty()) {
            return None;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        Some(r.open(fh, ino, write).map(|()| fh))
    }

    /// The coordinator's handle behind `fh`, if the file was opened there.
    fn remote(
        &self,
        fh: u64,
    ) -> Option<(
        Arc<crate::fsredirect::Redirector>,
        crate::fsredirect::RemoteHandle,
    )> {
        let r = self.fs_redirect.read().ok()?.clone()?;
        let h = r.handle(fh)?;
        Some((r, h))
    }

    /// Does a FileSystemRedirected host's file operation here, as if one of
    /// this host's applications had (its leases, its maps, its path).
    pub fn serve_file(&self, op: &proto::FileOp) -> proto::FileReply {
        use crate::fsredirect::{OPEN, READ, RELEASE, SYNC, WRITE};
        let owned = |h: u64| {
            self.handles
                .lock()
                .ok()
                .and_then(|m| m.get(&h).map(|x| x.ino))
                == Some(op.ino)
        };
        let r: Result<proto::FileReply, Errno> = match op.kind {
            OPEN if is_snapshot_ino(op.ino) && op.write => Err(Errno::EROFS),
            OPEN => self.open_file(op.ino, op.write).map(|h| {
                if let Ok(mut m) = self.served_for.lock() {
                    m.insert(h, op.from);
                }
                proto::FileReply {
                    handle: h,
                    ..Default::default()
                }
            }),
            _ if !owned(op.handle) => Err(Errno::EBADF),
            READ => {
                let len = op.len.min(8 << 20) as u32;
                self.read_data(op.ino, op.offset, len, |b| {
                    Ok(proto::FileReply {
                        data: bytes::Bytes::copy_from_slice(b),
                        ..Default::default()
                    })
                })
            }
            WRITE => self
                .write_data(op.ino, op.offset, &op.data)
                .map(|n| proto::FileReply {
                    written: n,
                    ..Default::default()
                }),
            SYNC => match self.file(op.ino) {
                Some(f) => match f.lock() {
                    Ok(mut g) => self
                        .lun
                        .flush()
                        .map_err(|e| io_errno(&e))
                        .and_then(|()| self.report(op.ino, &mut g))
                        .map(|()| proto::FileReply::default()),
                    Err(_) => Err(Errno::EIO),
                },
                None => Err(Errno::EBADF),
            },
            RELEASE => {
                if let Ok(mut m) = self.served_for.lock() {
                    m.remove(&op.handle);
                }
                self.release_handle(op.handle)
                    .map(|()| proto::FileReply::default())
            }
            _ => Err(Errno::EINVAL),
        };
        r.unwrap_or_else(|e| proto::FileReply {
            errno: e.code(),
            ..Default::default()
        })
    }
}

/// The FUSE adapter (fuser wants the filesystem by value).
#[derive(Debug, Clone)]
pub struct Mounted(pub Arc<VolumeFs>);

impl Filesystem for Mounted {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // Many requests in flight: asynchronous direct I/O (a VM's queue
        // depth reaches the LUN), and lookups in one directory in parallel.
        for f in [
            fuser::InitFlags::FUSE_ASYNC_DIO,
            fuser::InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(f);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let r = name_of(name).and_then(|n| {
            let vol = fs.vol;
            fs.call(|c| c.lookup(vol, parent.0, n))
        });
        match r {
            Ok(a) => reply.entry(&TTL, &fs.fattr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let vol = fs.vol;
        match fs.call(|c| c.getattr(vol, ino.0)) {
            Ok(a) => reply.attr(&TTL, &fs.fattr(&a)),
            Err(Errno::ENOENT) => {
                // Unlinked while open here: the open file still has one.
                let local = fs.file(ino.0).and_then(|f| {
                    f.lock().ok().map(|g| proto::Attr {
                        nlink: 0,
                        ..g.attr.clone()
                    })
                });
                match local {
                    Some(a) => reply.attr(&TTL, &fs.fattr(&a)),
                    // Gone, and not open here: the kernel's inode is
                    // stale (another host removed or renamed over its
                    // name); ESTALE has the kernel look the path up again.
                    None => reply.error(Errno::ESTALE),
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        if let Err(e) = writable(ino.0) {
            return reply.error(e);
        }
        // A truncate changes data: it waits while a snapshot freezes the
        // volume.
        let _in_progress = match size.map(|_| fs.gate.enter(None)).transpose() {
            Ok(g) => g,
            Err(e) => return reply.error(e),
        };
        let open = fs.file(ino.0);
        if let (Some(f), Some(_)) = (&open, size) {
            if let Ok(mut g) = f.lock() {
                if let Err(e) = fs.report(ino.0, &mut g) {
                    return reply.error(e);
                }
            }
        }
        let mtime = mtime.map(|t| match t {
            TimeOrNow::Now => time_to_ms(SystemTime::now()),
            TimeOrNow::SpecificTime(t) => time_to_ms(t),
        });
        let r = fs.op_attr(volume_op::Op::SetAttr(proto::SetAttrOp {
            ino: ino.0,
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            now: 0,
            mtime,
        }));
        match r {
            Ok(a) => {
                if let (Some(f), Some(s)) = (&open, size) {
                    if let Ok(mut g) = f.lock() {
                        g.size = s;
                        g.size_reported = s;
                        g.extents.truncate(s);
                        g.dirty.retain(|&(o, _)| o < s);
                    }
                }
                reply.attr(&TTL, &fs.fattr(&a))
            }
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let vol = fs.vol;
        match fs.call(|c| c.read(vol, proto::read::Query::ReadLink(ino.0))) {
            Ok(proto::Reply {
                value: Some(proto::reply::Value::Text(t)),
            }) => reply.data(t.as_bytes()),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let _turn = self.0.readers.turn(true);
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Device nodes, FIFOs and sockets do not belong on a shared
            // volume of VM disks.
            return reply.error(Errno::EPERM);
        }
        let fs = &self.0;
        match fs.create_node(req, parent.0, name, 1, mode & !umask, "", false) {
            Ok((a, _)) => reply.entry(&TTL, &fs.fattr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        match fs.create_node(req, parent.0, name, 0, mode & !umask, "", false) {
            Ok((a, _)) => reply.entry(&TTL, &fs.fattr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.0.readers.turn(true);
        self.0.remove(parent.0, name, false, reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.0.readers.turn(true);
        self.0.remove(parent.0, name, true, reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let Some(t) = target.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        match fs.create_node(req, parent.0, link_name, 2, 0o777, t, false) {
            Ok((a, _)) => reply.entry(&TTL, &fs.fattr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let r = (|| {
            writable(parent.0)?;
            writable(newparent.0)?;
            let (n, nn) = (name_of(name)?, name_of(newname)?);
            let vol = fs.vol;
            if flags.contains(RenameFlags::RENAME_NOREPLACE)
                && fs.call(|c| c.lookup(vol, newparent.0, nn)).is_ok()
            {
                return Err(Errno::EEXIST);
            }
            fs.call(|c| c.rename(vol, parent.0, n, newparent.0, nn))
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let r = writable(newparent.0)
            .and_then(|()| name_of(newname))
            .and_then(|n| {
                fs.op_attr(volume_op::Op::Link(proto::LinkOp {
                    ino: ino.0,
                    parent: newparent.0,
                    name: n.into(),
                    now: 0,
                }))
            });
        match r {
            Ok(a) => reply.entry(&TTL, &fs.fattr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let write = (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY;
        if write && is_snapshot_ino(ino.0) {
            return reply.error(Errno::EROFS);
        }
        let opened = fs
            .remote_open(ino.0, write)
            .unwrap_or_else(|| fs.open_file(ino.0, write));
        match opened {
            Ok(fh) => {
                let f = if flags.0 & libc::O_DIRECT != 0 {
                    FopenFlags::FOPEN_DIRECT_IO
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), f)
            }
            // The inode the kernel looked up is gone: another host renamed
            // over or removed its name since. ESTALE has the kernel look
            // the path up again, so an open races a rename-over as on a
            // local filesystem (the old file or the new, never ENOENT).
            Err(Errno::ENOENT) => reply.error(Errno::ESTALE),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let write = (flags & libc::O_ACCMODE) != libc::O_RDONLY;
        // The write lease with the file, unless the file is opened through
        // the coordinator (FileSystemRedirected), which takes its own.
        let lease = write && fs.fs_redirector().is_none();
        let (a, granted) = match fs.create_node(req, parent.0, name, 1, mode & !umask, "", lease) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let opened = match fs.remote_open(a.ino, write) {
            Some(r) => {
                if granted.is_some() {
                    // Redirected meanwhile: the lease taken here is not
                    // the one the file is open under.
                    fs.revoke(a.ino);
                }
                r
            }
            None => fs.open_file_as(a.ino, write, Some(&a), granted),
        };
        match opened {
            Ok(fh) => {
                let f = if flags & libc::O_DIRECT != 0 {
                    FopenFlags::FOPEN_DIRECT_IO
                } else {
                    FopenFlags::empty()
                };
                reply.created(&TTL, &fs.fattr(&a), Generation(0), FileHandle(fh), f)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let turn = self.0.readers.turn(false);
        if let Some((r, h)) = self.0.remote(fh.0) {
            turn.blocking();
            return match r.read(h, offset, size) {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(e),
            };
        }
        let fs = &self.0;
        let pieces = match fs.read_plan(ino.0, offset, size, Some(&turn)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let Some(reply) = fs.read_async(ino.0, offset, size, &pieces, reply) else {
            return;
        };
        turn.blocking();
        answer_read(reply, |deliver| {
            fs.read_pieces(offset, &pieces, |b| {
                deliver(b);
                Ok(())
            })
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let turn = self.0.readers.turn(false);
        if let Some((r, h)) = self.0.remote(fh.0) {
            turn.blocking();
            return match r.write(h, offset, data) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            };
        }
        let Some(reply) = self.0.write_async(ino.0, offset, data, reply, &turn) else {
            return;
        };
        turn.blocking();
        match self.0.write_data(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        if let Some((r, h)) = fs.remote(fh.0) {
            return match r.sync(h) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        // A flush comes with every close of a descriptor, also of a copy
        // that a child closes when it execs. Reporting here (for other
        // hosts to see this one's writes after its close) is a courtesy
        // that fsync and the last close do in any case; while the LUN or
        // the coordinator is out of reach it would wait for them, and hang
        // every fork and exec of a process with the file open. So not
        // while the LUN is, and not for long when the coordinator does not
        // answer: what is not reported stays for fsync and the last close.
        if fs.in_outage() {
            return reply.ok();
        }
        let r = match fs.file(ino.0) {
            Some(f) => match f.lock() {
                Ok(mut g) if g.writers > 0 => fs.report_within(ino.0, &mut g, Some(FLUSH_PATIENCE)),
                _ => Ok(()),
            },
            None => Ok(()),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(Errno::ETIMEDOUT) => {
                tracing::warn!(
                    ino = ino.0,
                    "flush: the coordinator did not answer within {FLUSH_PATIENCE:?}; this file's latest writes are reported at its fsync or last close"
                );
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.0.readers.turn(true);
        if let Some((r, _)) = self.0.remote(fh.0) {
            return match r.release(fh.0) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        match self.0.release_handle(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        if let Some((r, h)) = fs.remote(fh.0) {
            return match r.sync(h) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        let r = match fs.file(ino.0) {
            Some(f) => match f.lock() {
                Ok(mut g) => fs
                    .lun
                    .flush()
                    .map_err(|e| io_errno(&e))
                    .and_then(|()| fs.report(ino.0, &mut g)),
                Err(_) => Err(Errno::EIO),
            },
            None => fs.lun.flush().map_err(|e| io_errno(&e)),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let vol = fs.vol;
        let entries = match fs.call(|c| c.readdir(vol, ino.0)) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let mut list = vec![
            (ino.0, FileType::Directory, ".".to_string()),
            (ino.0, FileType::Directory, "..".to_string()),
        ];
        for e in entries {
            list.push((e.ino, file_type(e.kind), e.name));
        }
        let fh = fs.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut d) = fs.dirs.lock() {
            d.insert(fh, list);
        }
        reply.opened(FileHandle(fh), FopenFlags::empty())
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let Ok(d) = fs.dirs.lock() else {
            return reply.error(Errno::EIO);
        };
        let Some(list) = d.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _turn = self.0.readers.turn(true);
        if let Ok(mut d) = self.0.dirs.lock() {
            d.remove(&fh.0);
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.0.readers.turn(true);
        // Namespace changes are committed to a quorum before they return.
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        let vol = fs.vol;
        match fs.call(|c| c.usage(vol)) {
            Ok(u) => {
                let bs = 4096u64;
                let blocks = fs.capacity / bs;
                let free = u.free / bs;
                let files = u.inodes + (1 << 32);
                reply.statfs(
                    blocks,
                    free,
                    free,
                    files,
                    files - u.inodes,
                    bs as u32,
                    255,
                    bs as u32,
                )
            }
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let _turn = self.0.readers.turn(false);
        // The kernel checks permissions (default_permissions).
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _turn = self.0.readers.turn(true);
        let fs = &self.0;
        if fs.remote(fh.0).is_some() {
            // Not forwarded (yet): preallocation needs the file open here.
            return reply.error(Errno::EOPNOTSUPP);
        }
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let Some(file) = fs.file(ino.0) else {
            return reply.error(Errno::EBADF);
        };
        let r = (|| {
            let _in_progress = fs.gate.enter(None)?;
            let mut f = file.lock().map_err(|_| Errno::EIO)?;
            if f.fenced || !f.lease.as_ref().is_some_and(|l| l.write) {
                return Err(Errno::EBADF);
            }
            let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
            fs.ensure_space(ino.0, &mut f, offset, length)?;
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > f.size {
                f.size = end;
                fs.report(ino.0, &mut f)?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one request on a thread of its own (reader turns are per
    /// thread), blocking or not; returns how long the request's end (the
    /// wait for a turn) took and whether the thread then held one.
    fn request(r: &Arc<Readers>, may_block: bool, hold: Duration) -> (Duration, bool) {
        let r = r.clone();
        std::thread::spawn(move || {
            let t = r.turn(may_block);
            std::thread::sleep(hold);
            let end = Instant::now();
            drop(t);
            (end.elapsed(), READER_TURN.get())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_thread_takes_a_free_turn_at_once() {
        let r = Arc::new(Readers::new(2));
        let (took, held) = request(&r, false, Duration::ZERO);
        assert!(held && took < Duration::from_millis(100), "{took:?}");
        assert_eq!(*r.free.lock().unwrap(), 1);
    }

    #[test]
    fn without_a_free_turn_a_thread_reads_anyway_after_a_while() {
        let r = Arc::new(Readers::new(1));
        *r.free.lock().unwrap() = 0;
        let (took, held) = request(&r, false, Duration::ZERO);
        assert!(!held);
        assert!(took >= READER_PARK - Duration::from_millis(50), "{took:?}");
    }

    #[test]
    fn a_blocking_request_hands_its_turn_to_a_parked_thread() {
        let r = Arc::new(Readers::new(1));
        // Thread A holds the only turn, then starts a request that blocks.
        let (a_to_blocking, a_go) = (
            Arc::new(std::sync::Barrier::new(2)),
            Arc::new(std::sync::Barrier::new(2)),
        );
        let a = {
            let (r, b1, b2) = (r.clone(), a_to_blocking.clone(), a_go.clone());
            std::thread::spawn(move || {
                drop(r.turn(false));
                assert!(READER_TURN.get());
                b1.wait();
                let t = r.turn(false);
                b2.wait();
                t.blocking();
                std::thread::sleep(Duration::from_millis(300));
                drop(t);
                READER_TURN.get()
            })
        };
        a_to_blocking.wait();
        // Thread B finishes a request while A holds the turn: it parks
        // until A blocks, then takes it (well before READER_PARK).
        let b = {
            let r = r.clone();
            std::thread::spawn(move || {
                let t = r.turn(false);
                let start = Instant::now();
                drop(t);
                (start.elapsed(), READER_TURN.get())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        a_go.wait();
        let (took, b_held) = b.join().unwrap();
        assert!(b_held, "B took the turn A gave up");
        assert!(took < READER_PARK, "{took:?}");
        // A, back from its blocking request, finds no turn free and reads
        // without one once it has waited READER_PARK.
        assert!(!a.join().unwrap());
    }
}
