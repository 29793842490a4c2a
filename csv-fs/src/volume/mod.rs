//! `/ClusterStorage/VolumeN` on one host, apart from any kernel
//! transport: a filesystem whose metadata lives with the volume's
//! coordinator and whose file data this host reads and writes straight on
//! the LUN. The FUSE adapter ([`crate::fuse`]) calls it.
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
//!
//! The files, by concern:
//! - [`ops`]: the namespace and open/close operations the adapter calls;
//! - [`lease`]: open files, their leases and extent maps, and reporting
//!   what was written;
//! - [`read`] and [`write`]: the data path (asynchronous straight to the
//!   LUN where one request maps to one range, synchronous otherwise);
//! - [`gate`]: the snapshot write gate (freeze and thaw);
//! - [`served`]: the file I/O this host does for FileSystemRedirected
//!   hosts, and [`remote`]: this host's file I/O when it is one;
//! - [`file`]: a file as positioned I/O, what VM disk servers open;
//! - [`pool`]: clients of the coordinator; [`errno`]: errors and times.

pub mod errno;
pub mod file;
pub mod gate;
pub mod lease;
pub mod locks;
pub mod ops;
pub mod pool;
pub mod read;
pub mod remote;
pub mod served;
pub mod write;

use crate::lun::RedirectingLun;
use coordinator::client::{Client, ClientError};
use coordinator::proto::{self, volume_op};
use errno::errno;
use fuser::Errno;
use lease::{Handle, OpenFile};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use file::VolumeFile;
pub use gate::FreezeError;
pub use lease::LEASE_TTL;
pub use pool::ClientPool;

/// Told by a volume operation just before it may block (a call to the
/// coordinator, a synchronous LUN I/O, a freeze): the transport can hand
/// the thread's turn at reading requests to another thread.
pub trait Blocking {
    /// The request is about to block.
    fn blocking(&self);
}

/// Tells `ctx`, if any, that the request is about to block.
pub(crate) fn may_block(ctx: Option<&dyn Blocking>) {
    if let Some(c) = ctx {
        c.blocking();
    }
}

/// A directory entry as listed at `opendir`: inode, kind, name.
pub type DirEntry = (u64, proto::NodeKind, String);

/// What one mounted volume needs.
pub struct VolumeConfig {
    /// N of VolumeN.
    pub vol: u64,
    /// This host's node id (the lease holder).
    pub node: u64,
    /// The volume's LUN as this host reaches it.
    pub lun: Arc<RedirectingLun>,
    /// Where its data area ends.
    pub capacity: u64,
    /// Clients of the coordinator service.
    pub clients: ClientPool,
}

impl std::fmt::Debug for VolumeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeConfig")
            .field("vol", &self.vol)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Lease-thread ticks (500 ms) between flushes of access times.
const ATIME_FLUSH_TICKS: u64 = 10;

/// How reads move access times on a mount (`csvd --atime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtimeMode {
    /// Never (`noatime`, the default): a file's access time moves only
    /// when it is set explicitly.
    #[default]
    Never,
    /// relatime's rule (`lazy`): when it is not after the modification
    /// time or is a day old.
    Lazy,
    /// At every read (`strict`, as strictatime).
    Strict,
}

impl AtimeMode {
    /// The mode a setting names: `noatime`, `lazy` (or `relatime`),
    /// `strict` (or `strictatime`).
    pub fn parse(s: &str) -> Option<AtimeMode> {
        match s {
            "noatime" => Some(AtimeMode::Never),
            "lazy" | "relatime" => Some(AtimeMode::Lazy),
            "strict" | "strictatime" => Some(AtimeMode::Strict),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> AtimeMode {
        match c {
            1 => AtimeMode::Lazy,
            2 => AtimeMode::Strict,
            _ => AtimeMode::Never,
        }
    }
}

/// relatime's rule: a read moves the access time when it is not after the
/// modification time or is a day old.
fn atime_due(atime: u64, mtime: u64, now: u64) -> bool {
    atime <= mtime || now.saturating_sub(atime) >= 24 * 3600 * 1000
}

/// An open directory.
struct OpenDir {
    ino: u64,
    /// Its entries when it was listed.
    list: Vec<DirEntry>,
    /// Its attributes then (missing from a coordinator of an older build).
    attr: Option<proto::Attr>,
    /// Read since (a read from the start again lists it anew).
    read: bool,
    /// This host's count of metadata commands when it was listed (a first
    /// read after one lists it anew).
    changes: u64,
}

/// One mounted volume.
pub struct VolumeFs {
    vol: u64,
    node: u64,
    /// The LUN: direct while the own path is in use, through a peer
    /// otherwise.
    lun: Arc<RedirectingLun>,
    capacity: u64,
    clients: ClientPool,
    files: Mutex<HashMap<u64, Arc<Mutex<OpenFile>>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Directory listings by open directory handle, with the directory's
    /// attributes when it was opened.
    dirs: Mutex<HashMap<u64, OpenDir>>,
    next_fh: AtomicU64,
    stop: Arc<AtomicBool>,
    gate: Arc<gate::Gate>,
    /// Asynchronous I/O to the own path (None: every read and write is
    /// synchronous).
    aio: Option<crate::aio::Aio>,
    /// FileSystemRedirected: file I/O goes to the coordinator.
    fs_redirect: RwLock<Option<Arc<remote::Redirector>>>,
    /// Handles this host opened for FileSystemRedirected hosts: handle →
    /// the host (closed if the cluster has that host down).
    served_for: Mutex<HashMap<u64, u64>>,
    /// How reads move access times ([`AtimeMode`] as a number: see
    /// [`VolumeFs::note_read`]).
    atime_mode: std::sync::atomic::AtomicU8,
    /// Access times moved by reads and not yet sent: inode → ms.
    atimes: Mutex<HashMap<u64, u64>>,
    /// (inode, lock owner) of the locks taken through this host: a close
    /// of another owner's descriptor costs no call.
    lockers: Mutex<std::collections::HashSet<(u64, u64)>>,
    /// The lock owners that took locks through each open handle: an OFD
    /// lock's owner is its open file, whose locks go at its release (the
    /// kernel sends no unlock for them).
    handle_lockers: Mutex<HashMap<u64, Vec<u64>>>,
    /// Metadata commands this host sent (an open directory's listing is
    /// taken again at its first read when any was sent since).
    changes: AtomicU64,
    /// Locks kept by this host alone while the cluster runs below the
    /// feature level that replicates them ([`locks`]).
    local_locks: Mutex<coordinator::meta::LockTable>,
}

impl std::fmt::Debug for VolumeFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFs")
            .field("vol", &self.vol)
            .finish_non_exhaustive()
    }
}

impl VolumeFs {
    /// The filesystem of one volume; a thread renews its leases until
    /// [`VolumeFs::shutdown`].
    pub fn new(cfg: VolumeConfig) -> Arc<VolumeFs> {
        let vol = cfg.vol;
        let fs = Arc::new(VolumeFs {
            vol,
            node: cfg.node,
            lun: cfg.lun,
            capacity: cfg.capacity,
            clients: cfg.clients,
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
            fs_redirect: RwLock::new(None),
            served_for: Mutex::new(HashMap::new()),
            atime_mode: std::sync::atomic::AtomicU8::new(AtimeMode::Never.code()),
            atimes: Mutex::new(HashMap::new()),
            lockers: Mutex::new(std::collections::HashSet::new()),
            handle_lockers: Mutex::new(HashMap::new()),
            changes: AtomicU64::new(0),
            local_locks: Mutex::default(),
        });
        let weak = Arc::downgrade(&fs);
        let stop = fs.stop.clone();
        let _ = std::thread::Builder::new()
            .name(format!("csv-lease-v{vol}"))
            .spawn(move || {
                let mut ticks = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(500));
                    ticks += 1;
                    match weak.upgrade() {
                        Some(fs) => {
                            fs.renew_leases();
                            if ticks % ATIME_FLUSH_TICKS == 0 {
                                fs.flush_atimes();
                            }
                        }
                        None => return,
                    }
                }
            });
        fs
    }

    /// How reads move access times (`noatime` by default).
    pub fn set_atime_mode(&self, mode: AtimeMode) {
        self.atime_mode.store(mode.code(), Ordering::Relaxed);
    }

    /// A read of `ino` (open here) happened: unless access times are off,
    /// its access time moves (lazily: if it is older than its modification
    /// time or a day old, relatime's rule; strictly: always), in the open
    /// file's attributes at once and in the coordinator at the next flush
    /// (every 5 s).
    pub(crate) fn note_read(&self, ino: u64) {
        let mode = AtimeMode::from_code(self.atime_mode.load(Ordering::Relaxed));
        if mode == AtimeMode::Never {
            return;
        }
        let Some(f) = self.file(ino) else { return };
        let Ok(mut g) = f.lock() else { return };
        let now = errno::time_to_ms(std::time::SystemTime::now());
        // A time moved by an earlier read, not sent yet, counts.
        let pending = self
            .atimes
            .lock()
            .ok()
            .and_then(|m| m.get(&ino).copied())
            .unwrap_or(0);
        let atime = g.attr.atime.max(pending);
        if mode == AtimeMode::Lazy && !atime_due(atime, g.attr.mtime, now) {
            return;
        }
        g.attr.atime = now;
        drop(g);
        if let Ok(mut m) = self.atimes.lock() {
            m.insert(ino, now);
        }
    }

    /// Sends the access times moved by reads since the last flush, in one
    /// command (the change time stays).
    pub fn flush_atimes(&self) {
        let pending: Vec<(u64, u64)> = match self.atimes.lock() {
            Ok(mut m) => m.drain().collect(),
            Err(_) => return,
        };
        if pending.is_empty() {
            return;
        }
        let r = self.op(volume_op::Op::Accessed(proto::AccessedOp {
            times: pending
                .into_iter()
                .map(|(ino, atime)| proto::AccessTime { ino, atime })
                .collect(),
        }));
        if let Err(e) = r {
            tracing::debug!("access times not kept: {e:?}");
        }
    }

    /// N of VolumeN.
    pub fn number(&self) -> u64 {
        self.vol
    }

    /// The LUN as this host reaches it.
    pub fn lun(&self) -> &Arc<RedirectingLun> {
        &self.lun
    }

    /// Stops the lease thread (the mount is going away).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Access times moved by reads are not lost with the mount.
        self.flush_atimes();
    }

    /// Whether the LUN is out of reach from this host now (no path, own
    /// or through a peer: I/O waits for one).
    fn in_outage(&self) -> bool {
        self.lun.stalled()
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
        self.changes.fetch_add(1, Ordering::Relaxed);
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

    /// `a` as this host shows it: the size of a file open here includes
    /// its writes not reported yet.
    pub fn shown(&self, mut a: proto::Attr) -> proto::Attr {
        if let Some(f) = self.file(a.ino) {
            if let Ok(f) = f.lock() {
                a.size = a.size.max(f.size);
            }
        }
        a
    }

    /// A new file handle.
    fn next_handle(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends this host's file I/O to the coordinator (Some) or does it
    /// here again (None; files open through the coordinator stay so until
    /// closed).
    pub fn set_fs_redirect(&self, r: Option<Arc<remote::Redirector>>) {
        if let Ok(mut x) = self.fs_redirect.write() {
            *x = r;
        }
    }

    /// The redirector, while FileSystemRedirected.
    pub fn fs_redirector(&self) -> Option<Arc<remote::Redirector>> {
        self.fs_redirect.read().ok().and_then(|r| r.clone())
    }
}

#[cfg(test)]
mod atime_tests {
    #[test]
    fn a_read_moves_the_access_time_as_relatime_does() {
        let day = 24 * 3600 * 1000;
        // Not after the modification time: moves.
        assert!(super::atime_due(1000, 1000, 5000));
        assert!(super::atime_due(999, 1000, 5000));
        // After it and fresh: stays.
        assert!(!super::atime_due(2000, 1000, 5000));
        assert!(!super::atime_due(2000, 1000, 2000 + day - 1));
        // A day old: moves.
        assert!(super::atime_due(2000, 1000, 2000 + day));
    }

    #[test]
    fn access_time_modes_are_named_as_mount_options_are() {
        use super::AtimeMode;
        for (name, mode) in [
            ("noatime", AtimeMode::Never),
            ("lazy", AtimeMode::Lazy),
            ("relatime", AtimeMode::Lazy),
            ("strict", AtimeMode::Strict),
            ("strictatime", AtimeMode::Strict),
        ] {
            assert_eq!(AtimeMode::parse(name), Some(mode));
            assert_eq!(AtimeMode::from_code(mode.code()), mode);
        }
        assert_eq!(AtimeMode::parse("atime"), None);
    }
}
