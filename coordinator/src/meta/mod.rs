//! The metadata state machine of one volume: namespace, inodes, file
//! extents on the LUN, and the leases that say which host may touch which
//! file's blocks.
//!
//! It is deterministic and does no I/O: every replica applies the same
//! committed commands in the same order and reaches the same state (Raft
//! drives it; see the crate documentation). Time comes in the commands
//! (`now`, in milliseconds of the leader's clock) so lease expiry is
//! replicated too.
//!
//! Rules it keeps (each has a property test):
//! - inode numbers only grow, so one is never reused;
//! - a LUN byte belongs to at most one file, or is free;
//! - bytes freed by truncate or unlink are not free again while any lease
//!   on that file is live (a host may still write them): they wait in
//!   quarantine until the leases are revoked or expire;
//! - newly allocated extents are *unwritten* and read as zeros until the
//!   host that wrote them reports it (`MarkWritten`).

use crate::alloc::Allocator;
use std::collections::{BTreeMap, BTreeSet};

pub mod acl;
mod lease;
mod locks;
mod namespace;
mod snaps;
mod snapshot;
mod space;

use namespace::check_name;

pub use lease::{check_lease_history, HistoryError, Lease, LeaseChange, LeaseEvent, LEASE_HISTORY};
pub use locks::{FileLock, LockTable, LockType, Wait, WAIT_TTL_MS};
pub use snaps::{
    is_snapshot_ino, snap_ino, split_ino, RangeCount, SnapInfo, DEFAULT_SNAPSHOTS, LIVE_INO_LIMIT,
    MAX_SNAPSHOTS, SNAPSHOTS_DIR, SNAPSHOTS_NAME,
};
pub use snapshot::SnapshotError;
pub use space::split_extents;

/// An inode number.
pub type Ino = u64;
/// The root directory's inode.
pub const ROOT: Ino = 1;
/// A host of the cluster.
pub type NodeId = u64;
/// Longest name in a directory (bytes).
pub const MAX_NAME: usize = 255;

/// How long a lease a host asks for lasts (it renews it every third of
/// that while the file is open; a write lease handed over at a VM's
/// migration gets as long).
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Every extent starts on the LUN at a multiple of this (files never share
/// a sector, whatever sizes they are truncated to).
pub const ALIGN: u64 = 4096;

/// Kinds of inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
    /// A unix socket's name.
    Socket,
}

impl Attr {
    /// The modification time moves to `now` (ms, the leader's clock).
    pub(crate) fn touch_mtime(&mut self, now: u64) {
        self.mtime = now;
        self.mtime_ns = 0;
    }
}

impl Kind {
    /// A FIFO, device node or socket: metadata only, no data on the LUN.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice | Kind::Socket
        )
    }
}

/// Attributes of an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// Kind.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Hard links.
    pub nlink: u32,
    /// Modification time (ms).
    pub mtime: u64,
    /// Change time (ms).
    pub ctime: u64,
    /// Access time (ms): set only explicitly; it starts at creation.
    pub atime: u64,
    /// Nanoseconds within the millisecond of `mtime` (kept when the time
    /// is set explicitly; 0 when the leader's clock set it).
    pub mtime_ns: u32,
    /// Nanoseconds within the millisecond of `atime`.
    pub atime_ns: u32,
    /// A device node's device number.
    pub rdev: u32,
    /// How many extended attributes the inode has.
    pub xattrs: u32,
}

/// A piece of a file on the LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub file_off: u64,
    /// Offset on the LUN.
    pub lun_off: u64,
    /// Length.
    pub len: u64,
    /// Never written: reads as zeros.
    pub unwritten: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Dir(BTreeMap<String, Ino>),
    File(BTreeMap<u64, Extent>),
    Symlink(String),
    /// A FIFO, device node or socket (what it is and its `rdev` are in the
    /// attributes).
    Special,
}

/// An inode's extended attributes, by full name.
pub type Xattrs = BTreeMap<String, Vec<u8>>;

/// Longest extended attribute name (bytes, with its namespace prefix), as
/// Linux's `XATTR_NAME_MAX`.
pub const XATTR_NAME_MAX: usize = 255;
/// Largest extended attribute value, as Linux's `XATTR_SIZE_MAX`.
pub const XATTR_SIZE_MAX: usize = 64 << 10;
/// Most bytes of names and values one inode keeps (ENOSPC beyond: the
/// attributes live in the replicated metadata, which every host holds).
pub const XATTR_INODE_MAX: usize = 256 << 10;

/// How a set treats an attribute that exists or does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrSet {
    /// Create or replace.
    Any,
    /// Create only (EEXIST if it exists).
    Create,
    /// Replace only (ENODATA if it does not).
    Replace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Inode {
    attr: Attr,
    body: Body,
    xattrs: Xattrs,
}

/// A command, as committed through Raft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a file, directory, symlink, FIFO, device node or socket.
    Create {
        parent: Ino,
        name: String,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        target: String,
        /// A device node's device number (0 for the others).
        rdev: u32,
        /// The creator's umask, when the state machine applies it: then a
        /// default ACL of the directory is inherited instead, in the same
        /// command ([`acl::inherit`]). None: `mode` is final.
        umask: Option<u32>,
        now: u64,
        /// For a file: (host, ttl ms) of a write lease granted with it.
        lease: Option<(NodeId, u64)>,
    },
    /// A new name for an existing file.
    Link {
        ino: Ino,
        parent: Ino,
        name: String,
        now: u64,
    },
    /// Remove a name (a file or symlink; `rmdir` for directories).
    Unlink {
        parent: Ino,
        name: String,
        rmdir: bool,
        now: u64,
    },
    /// Rename, replacing what the destination names (POSIX rules).
    Rename {
        parent: Ino,
        name: String,
        new_parent: Ino,
        new_name: String,
        now: u64,
    },
    /// Swap two names atomically (`RENAME_EXCHANGE`): both exist.
    Exchange {
        parent: Ino,
        name: String,
        new_parent: Ino,
        new_name: String,
        now: u64,
    },
    /// Change attributes; a smaller size frees the extents beyond it.
    /// `mtime` and `atime` set those times explicitly (`utimensat`): ms,
    /// and nanoseconds within the millisecond.
    SetAttr {
        ino: Ino,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        mtime: Option<(u64, u32)>,
        atime: Option<(u64, u32)>,
        now: u64,
    },
    /// Set an extended attribute.
    SetXattr {
        ino: Ino,
        name: String,
        value: Vec<u8>,
        how: XattrSet,
        now: u64,
    },
    /// Remove an extended attribute.
    RemoveXattr { ino: Ino, name: String, now: u64 },
    /// Access times moved by reads on a host, (inode, ms): only the access
    /// time moves, never backwards; inodes gone meanwhile are skipped.
    Accessed { times: Vec<(Ino, u64)> },
    /// Take, change or release a lock (`lock`'s holder, kind and range).
    /// `wait` (the proposer's clock, ms): a blocking request, recorded as
    /// waiting when a lock stands in the way, or refused as a deadlock
    /// ([`LockTable::wait`]).
    Lock {
        ino: Ino,
        lock: FileLock,
        typ: LockType,
        wait: Option<u64>,
    },
    /// Release every lock of one kind an owner holds on a file (its close).
    UnlockOwner {
        ino: Ino,
        node: NodeId,
        owner: u64,
        flock: bool,
    },
    /// Allocate unwritten extents for `[off, off + len)` of a file.
    Allocate { ino: Ino, off: u64, len: u64 },
    /// The host wrote `[off, off + len)` (and the `more` ranges): those
    /// extents are written now.
    MarkWritten {
        ino: Ino,
        off: u64,
        len: u64,
        size: u64,
        now: u64,
        more: Vec<(u64, u64)>,
    },
    /// Grant (or renew) a lease on a file's extent map.
    GrantLease {
        node: NodeId,
        ino: Ino,
        write: bool,
        now: u64,
        ttl: u64,
    },
    /// Give a lease back, or take it from a host (`revoked`: taken, as
    /// when a host is fenced off).
    RevokeLease {
        node: NodeId,
        ino: Ino,
        now: u64,
        revoked: bool,
    },
    /// Move the write lease of a file from the host that holds it to
    /// another (the switch-over of a live migration): `from` loses its
    /// lease, `to` gets a write lease with a new epoch.
    HandOver {
        ino: Ino,
        from: NodeId,
        to: NodeId,
        now: u64,
        ttl: u64,
    },
    /// Expire every lease whose time has come.
    Tick { now: u64 },
    /// Take a snapshot of the namespace (redirect-on-write, no data
    /// copied), refused when the volume keeps `limit` snapshots already
    /// (0: [`DEFAULT_SNAPSHOTS`]; at most [`MAX_SNAPSHOTS`]).
    CreateSnapshot { name: String, now: u64, limit: u32 },
    /// Delete a snapshot; bytes only it held are freed.
    DeleteSnapshot { name: String },
    /// Reserve space for a redirected write of a live file (held in the
    /// file's quarantine until `Remap`).
    Reserve { ino: Ino, len: u64 },
    /// Point ranges of a live file at reserved space: `(off, pieces)`
    /// maps `[off, ...)` onto the pieces in order.
    Remap {
        ino: Ino,
        ranges: Vec<(u64, Vec<(u64, u64)>)>,
    },
}

/// What a command can fail with (POSIX errno names).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// No such inode or name.
    #[error("no such file or directory")]
    NotFound,
    /// The name exists.
    #[error("file exists")]
    Exists,
    /// Not a directory.
    #[error("not a directory")]
    NotDir,
    /// Is a directory.
    #[error("is a directory")]
    IsDir,
    /// Directory not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// Bad name or argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Rename of a directory into itself.
    #[error("a directory cannot be moved into itself")]
    Loop,
    /// The LUN is full.
    #[error("no space left on the volume")]
    NoSpace,
    /// Another host holds the write lease.
    #[error("host {0} holds the write lease")]
    Busy(NodeId),
    /// No such extended attribute.
    #[error("no such extended attribute")]
    NoData,
    /// An extended attribute's name or value is too long.
    #[error("extended attribute too large: {0}")]
    TooBig(String),
    /// A lock stands in the way (its holder).
    #[error("locked by process {} on host {}", .0.pid, .0.node)]
    WouldBlock(FileLock),
    /// Waiting for the lock would close a cycle of owners waiting on each
    /// other (the holder in the way).
    #[error("deadlock: waiting for process {} on host {}, which waits for this owner", .0.pid, .0.node)]
    Deadlock(FileLock),
}

/// What a command returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Nothing.
    Ok,
    /// An inode's attributes.
    Attr(Attr),
    /// Extents (of an allocation).
    Extents(Vec<Extent>),
    /// A lease.
    Lease(Lease),
    /// A file made with its creator's write lease.
    Created(Attr, Lease),
}

/// The state of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    next_ino: Ino,
    next_epoch: u64,
    inodes: BTreeMap<Ino, Inode>,
    alloc: Allocator,
    leases: BTreeMap<(Ino, NodeId), Lease>,
    /// Freed extents waiting for the leases of their file to end.
    quarantine: BTreeMap<Ino, Vec<(u64, u64)>>,
    /// Write leases gained and lost, oldest first.
    history: std::collections::VecDeque<LeaseEvent>,
    /// Snapshots by id.
    snapshots: BTreeMap<u64, snaps::Snap>,
    next_snap: u64,
    /// Extra references of LUN ranges shared by live files and snapshots.
    refs: RangeCount,
    /// File locks held, by inode.
    locks: LockTable,
}

impl Volume {
    /// An empty volume whose data area is `[data_start, capacity)`.
    pub fn new(data_start: u64, capacity: u64, now: u64) -> Volume {
        let root = Inode {
            attr: Attr {
                ino: ROOT,
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                nlink: 2,
                mtime: now,
                ctime: now,
                atime: now,
                mtime_ns: 0,
                atime_ns: 0,
                rdev: 0,
                xattrs: 0,
            },
            body: Body::Dir(BTreeMap::new()),
            xattrs: Xattrs::new(),
        };
        Volume {
            next_ino: ROOT + 1,
            next_epoch: 1,
            inodes: BTreeMap::from([(ROOT, root)]),
            alloc: Allocator::new(data_start, capacity),
            leases: BTreeMap::new(),
            quarantine: BTreeMap::new(),
            history: std::collections::VecDeque::new(),
            snapshots: BTreeMap::new(),
            next_snap: 1,
            refs: RangeCount::default(),
            locks: LockTable::default(),
        }
    }

    /// Attributes of `ino`.
    /// (Snapshot inode numbers and [`SNAPSHOTS_DIR`] included.)
    pub fn getattr(&self, ino: Ino) -> Option<Attr> {
        if ino == SNAPSHOTS_DIR {
            return Some(self.snapshots_dir_attr());
        }
        self.node(ino).map(|(i, id)| Volume::view_attr(i, id))
    }

    /// The inode `name` in directory `parent` (in a snapshot: that
    /// snapshot's inode number).
    pub fn lookup(&self, parent: Ino, name: &str) -> Result<Ino, MetaError> {
        if parent == ROOT && name == SNAPSHOTS_NAME {
            return Ok(SNAPSHOTS_DIR);
        }
        if parent == SNAPSHOTS_DIR {
            return self
                .snapshot_id(name)
                .map(|id| snap_ino(id, ROOT))
                .ok_or(MetaError::NotFound);
        }
        match self.node(parent) {
            Some((
                Inode {
                    body: Body::Dir(d), ..
                },
                id,
            )) => d
                .get(name)
                .map(|&c| if id == 0 { c } else { snap_ino(id, c) })
                .ok_or(MetaError::NotFound),
            Some(_) => Err(MetaError::NotDir),
            None => Err(MetaError::NotFound),
        }
    }

    /// Entries of a directory, in name order (`.snapshots` is not listed
    /// in the root; it lists the snapshots).
    pub fn readdir(&self, dir: Ino) -> Result<Vec<(String, Ino)>, MetaError> {
        if dir == SNAPSHOTS_DIR {
            let mut v: Vec<(String, Ino)> = self
                .snapshots
                .iter()
                .map(|(&id, s)| (s.name.clone(), snap_ino(id, ROOT)))
                .collect();
            v.sort();
            return Ok(v);
        }
        match self.node(dir) {
            Some((
                Inode {
                    body: Body::Dir(d), ..
                },
                id,
            )) => Ok(d
                .iter()
                .map(|(k, &v)| (k.clone(), if id == 0 { v } else { snap_ino(id, v) }))
                .collect()),
            Some(_) => Err(MetaError::NotDir),
            None => Err(MetaError::NotFound),
        }
    }

    /// A symlink's target.
    pub fn readlink(&self, ino: Ino) -> Result<&str, MetaError> {
        match self.node(ino).map(|(i, _)| &i.body) {
            Some(Body::Symlink(t)) => Ok(t),
            Some(_) => Err(MetaError::Invalid("not a symlink".into())),
            None => Err(MetaError::NotFound),
        }
    }

    /// The extended attributes of `ino` (in a snapshot too).
    pub fn xattrs(&self, ino: Ino) -> Result<&Xattrs, MetaError> {
        if ino == SNAPSHOTS_DIR {
            static NONE: Xattrs = Xattrs::new();
            return Ok(&NONE);
        }
        self.node(ino)
            .map(|(i, _)| &i.xattrs)
            .ok_or(MetaError::NotFound)
    }

    /// A file's extents, in file order.
    pub fn extents(&self, ino: Ino) -> Result<Vec<Extent>, MetaError> {
        Ok(self
            .extents_shared(ino)?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// A file's extents, each with whether its LUN bytes are shared with
    /// a snapshot (a host must then redirect writes to written ones).
    pub fn extents_shared(&self, ino: Ino) -> Result<Vec<(Extent, bool)>, MetaError> {
        match self.node(ino) {
            Some((
                Inode {
                    body: Body::File(e),
                    ..
                },
                id,
            )) => Ok(e
                .values()
                .map(|x| {
                    let shared = id == 0 && self.refs.shared_bytes(x.lun_off, x.len) > 0;
                    (*x, shared)
                })
                .collect()),
            Some(_) => Err(MetaError::IsDir),
            None => Err(MetaError::NotFound),
        }
    }

    /// Free bytes of the LUN (not counting quarantine).
    pub fn free_bytes(&self) -> u64 {
        self.alloc.free_bytes()
    }

    /// Inodes in use.
    pub fn inode_count(&self) -> u64 {
        self.inodes.len() as u64
    }

    /// Live leases on all files.
    pub fn lease_count(&self) -> u64 {
        self.leases.len() as u64
    }

    /// Bytes waiting in quarantine.
    pub fn quarantined_bytes(&self) -> u64 {
        self.quarantine.values().flatten().map(|p| p.1).sum()
    }

    /// Live leases of `ino`.
    pub fn leases(&self, ino: Ino) -> Vec<(NodeId, Lease)> {
        self.leases
            .range((ino, 0)..=(ino, u64::MAX))
            .map(|(&(_, n), &l)| (n, l))
            .collect()
    }

    /// The write-lease history of `ino` (every file: `None`), oldest
    /// first; the volume keeps the last [`LEASE_HISTORY`] events.
    pub fn lease_history(&self, ino: Option<Ino>) -> Vec<LeaseEvent> {
        self.history
            .iter()
            .filter(|e| ino.is_none_or(|i| e.ino == i))
            .copied()
            .collect()
    }

    /// Whether any host holds a lease (the leader then proposes `Tick`s so
    /// that they expire).
    pub fn has_leases(&self) -> bool {
        !self.leases.is_empty()
    }

    /// Leases held now: (write, read).
    pub fn lease_counts(&self) -> (u64, u64) {
        let w = self.leases.values().filter(|l| l.write).count() as u64;
        (w, self.leases.len() as u64 - w)
    }

    /// Applies one committed command.
    pub fn apply(&mut self, op: Op) -> Result<Reply, MetaError> {
        match op {
            Op::Create {
                parent,
                name,
                kind,
                mode,
                uid,
                gid,
                target,
                rdev,
                umask,
                now,
                lease,
            } => {
                let r = self.create(
                    parent,
                    &name,
                    kind,
                    [mode, uid, gid, rdev],
                    umask,
                    target,
                    now,
                )?;
                match (lease, r) {
                    (Some((node, ttl)), Reply::Attr(a)) if a.kind == Kind::File && ttl > 0 => {
                        // A new file has no other holder: the grant cannot
                        // be refused; if it were, the file stays made and
                        // its opener asks for the lease on its own.
                        match self.grant(node, a.ino, true, now, ttl) {
                            Ok(Reply::Lease(l)) => Ok(Reply::Created(a, l)),
                            _ => Ok(Reply::Attr(a)),
                        }
                    }
                    (_, r) => Ok(r),
                }
            }
            Op::Link {
                ino,
                parent,
                name,
                now,
            } => self.link(ino, parent, &name, now),
            Op::Unlink {
                parent,
                name,
                rmdir,
                now,
            } => self.unlink(parent, &name, rmdir, now).map(|()| Reply::Ok),
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                now,
            } => self
                .rename(parent, &name, new_parent, &new_name, now)
                .map(|()| Reply::Ok),
            Op::Exchange {
                parent,
                name,
                new_parent,
                new_name,
                now,
            } => self
                .exchange(parent, &name, new_parent, &new_name, now)
                .map(|()| Reply::Ok),
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                size,
                mtime,
                atime,
                now,
            } => self.setattr(ino, [mode, uid, gid], size, [mtime, atime], now),
            Op::SetXattr {
                ino,
                name,
                value,
                how,
                now,
            } => self.set_xattr(ino, name, value, how, now),
            Op::RemoveXattr { ino, name, now } => self.remove_xattr(ino, &name, now),
            Op::Accessed { times } => {
                for (ino, t) in times {
                    if let Some(i) = self.inodes.get_mut(&ino) {
                        if t > i.attr.atime {
                            (i.attr.atime, i.attr.atime_ns) = (t, 0);
                        }
                    }
                }
                Ok(Reply::Ok)
            }
            Op::Lock {
                ino,
                lock,
                typ,
                wait,
            } => self.set_lock(ino, lock, typ, wait),
            Op::UnlockOwner {
                ino,
                node,
                owner,
                flock,
            } => {
                self.drop_owner_locks(ino, node, owner, flock);
                Ok(Reply::Ok)
            }
            Op::Allocate { ino, off, len } => self.allocate(ino, off, len),
            Op::MarkWritten {
                ino,
                off,
                len,
                size,
                now,
                more,
            } => {
                // Every range or none: the checks (a file that exists) do
                // not depend on the range.
                let mut r = self.mark_written(ino, off, len, size, now)?;
                for (o, l) in more {
                    r = self.mark_written(ino, o, l, size, now)?;
                }
                Ok(r)
            }
            Op::GrantLease {
                node,
                ino,
                write,
                now,
                ttl,
            } => self.grant(node, ino, write, now, ttl),
            Op::RevokeLease {
                node,
                ino,
                now,
                revoked,
            } => {
                if let Some(l) = self.leases.remove(&(ino, node)) {
                    let change = if revoked {
                        LeaseChange::Revoked
                    } else {
                        LeaseChange::Released
                    };
                    self.record_end(ino, node, l, now, change);
                }
                self.release_quarantine(ino);
                Ok(Reply::Ok)
            }
            Op::HandOver {
                ino,
                from,
                to,
                now,
                ttl,
            } => {
                match self.leases.get(&(ino, from)) {
                    Some(l) if l.write && l.expires > now => {}
                    _ => {
                        return Err(MetaError::Invalid(format!(
                            "host {from} holds no live write lease on inode {ino}"
                        )))
                    }
                }
                if let Some(l) = self.leases.remove(&(ino, from)) {
                    self.record(now, ino, from, l.epoch, LeaseChange::HandedOff { to });
                }
                // The new holder gets a fresh epoch even if it held a read
                // lease: anything it cached under the old one is stale.
                self.leases.remove(&(ino, to));
                let r = self.grant_quiet(to, ino, true, now, ttl);
                if let Ok(Reply::Lease(l)) = &r {
                    self.record(now, ino, to, l.epoch, LeaseChange::HandedIn { from });
                }
                self.release_quarantine(ino);
                r
            }
            Op::CreateSnapshot { name, now, limit } => self.create_snapshot(&name, now, limit),
            Op::DeleteSnapshot { name } => self.delete_snapshot(&name),
            Op::Reserve { ino, len } => self.reserve(ino, len),
            Op::Remap { ino, ranges } => self.remap(ino, &ranges),
            Op::Tick { now } => {
                let expired: Vec<(Ino, NodeId)> = self
                    .leases
                    .iter()
                    .filter(|(_, l)| l.expires <= now)
                    .map(|(&k, _)| k)
                    .collect();
                for &(ino, node) in &expired {
                    if let Some(l) = self.leases.remove(&(ino, node)) {
                        self.record_end(ino, node, l, now, LeaseChange::Expired);
                    }
                }
                let inos: BTreeSet<Ino> = expired.iter().map(|k| k.0).collect();
                for ino in inos {
                    self.release_quarantine(ino);
                }
                Ok(Reply::Ok)
            }
        }
    }
}
