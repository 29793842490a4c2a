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

mod snaps;
mod snapshot;

pub use snaps::{
    is_snapshot_ino, snap_ino, split_ino, RangeCount, SnapInfo, LIVE_INO_LIMIT, MAX_SNAPSHOTS,
    SNAPSHOTS_DIR, SNAPSHOTS_NAME,
};
pub use snapshot::SnapshotError;

/// An inode number.
pub type Ino = u64;
/// The root directory's inode.
pub const ROOT: Ino = 1;
/// A host of the cluster.
pub type NodeId = u64;
/// Longest name in a directory (bytes).
pub const MAX_NAME: usize = 255;
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Inode {
    attr: Attr,
    body: Body,
}

/// A host's lease on a file's extent map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Epoch: grows with every grant, so a stale holder is recognised.
    pub epoch: u64,
    /// Expiry (ms).
    pub expires: u64,
    /// Write lease (at most one host holds one per file).
    pub write: bool,
}

/// How a write lease began or ended (an entry of the lease history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    /// Granted to a host that held no live write lease on the file.
    Granted,
    /// Received from another host (the switch-over of a migration).
    HandedIn {
        /// The host it came from.
        from: NodeId,
    },
    /// Given back by its holder (the file closed for writing).
    Released,
    /// Taken from its holder by someone else (a host fenced off).
    Revoked,
    /// Handed to another host.
    HandedOff {
        /// The host it went to.
        to: NodeId,
    },
    /// Not renewed in time.
    Expired,
}

impl LeaseChange {
    /// Whether the host can write from this event on.
    pub fn begins(self) -> bool {
        matches!(self, LeaseChange::Granted | LeaseChange::HandedIn { .. })
    }

    /// The other host of a hand-over (0 otherwise).
    pub fn peer(self) -> NodeId {
        match self {
            LeaseChange::HandedIn { from } => from,
            LeaseChange::HandedOff { to } => to,
            _ => 0,
        }
    }

    /// A word for logs and tables.
    pub fn name(self) -> &'static str {
        match self {
            LeaseChange::Granted => "granted",
            LeaseChange::HandedIn { .. } => "handed-in",
            LeaseChange::Released => "released",
            LeaseChange::Revoked => "revoked",
            LeaseChange::HandedOff { .. } => "handed-off",
            LeaseChange::Expired => "expired",
        }
    }

    /// The change [`LeaseChange::name`] names (`peer`: the other host of
    /// a hand-over).
    pub fn parse(name: &str, peer: NodeId) -> Option<LeaseChange> {
        let code = match name {
            "granted" => 0,
            "handed-in" => 1,
            "released" => 2,
            "revoked" => 3,
            "handed-off" => 4,
            "expired" => 5,
            _ => return None,
        };
        LeaseChange::from_code(code, peer)
    }

    fn code(self) -> u8 {
        match self {
            LeaseChange::Granted => 0,
            LeaseChange::HandedIn { .. } => 1,
            LeaseChange::Released => 2,
            LeaseChange::Revoked => 3,
            LeaseChange::HandedOff { .. } => 4,
            LeaseChange::Expired => 5,
        }
    }

    fn from_code(code: u8, peer: NodeId) -> Option<LeaseChange> {
        Some(match code {
            0 => LeaseChange::Granted,
            1 => LeaseChange::HandedIn { from: peer },
            2 => LeaseChange::Released,
            3 => LeaseChange::Revoked,
            4 => LeaseChange::HandedOff { to: peer },
            5 => LeaseChange::Expired,
            _ => return None,
        })
    }
}

/// One entry of a volume's write-lease history: when a host became able
/// to write a file's blocks, or stopped being able to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseEvent {
    /// When (ms, the leader's clock; for an expiry, the lease's end).
    pub at: u64,
    /// The file.
    pub ino: Ino,
    /// The host.
    pub node: NodeId,
    /// The lease's epoch.
    pub epoch: u64,
    /// What happened.
    pub change: LeaseChange,
}

/// Write-lease events a volume keeps (the oldest go first).
pub const LEASE_HISTORY: usize = 4096;

/// Checks a file's write-lease history (in commit order): no host gains
/// a write lease while another still holds one, and every end matches a
/// beginning. Returns the first violation.
pub fn check_lease_history(events: &[LeaseEvent]) -> Result<(), String> {
    let mut holders: BTreeMap<Ino, (NodeId, u64)> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        match (e.change.begins(), holders.get(&e.ino).copied()) {
            (true, Some((other, epoch))) if other != e.node => {
                return Err(format!(
                    "event {i}: host {} gains the write lease on inode {} (epoch {}) at {} ms while host {other} holds it (epoch {epoch})",
                    e.node, e.ino, e.epoch, e.at
                ))
            }
            (true, _) => {
                holders.insert(e.ino, (e.node, e.epoch));
            }
            (false, Some((holder, _))) if holder == e.node => {
                holders.remove(&e.ino);
            }
            (false, _) => {
                // The beginning fell out of the kept history; only the
                // first end of a file may lack one.
                if events[..i].iter().any(|p| p.ino == e.ino) {
                    return Err(format!(
                        "event {i}: host {} loses a write lease on inode {} it did not hold",
                        e.node, e.ino
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A command, as committed through Raft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a file, directory or symlink.
    Create {
        parent: Ino,
        name: String,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        target: String,
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
    /// Change attributes; a smaller size frees the extents beyond it.
    /// `mtime` sets the modification time (ms) explicitly (`utimensat`).
    SetAttr {
        ino: Ino,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        mtime: Option<u64>,
        now: u64,
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
    /// Take a snapshot of the namespace (redirect-on-write, no data copied).
    CreateSnapshot { name: String, now: u64 },
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
}

fn check_name(name: &str) -> Result<(), MetaError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > MAX_NAME
        || name.contains('/')
        || name.contains('\0')
    {
        return Err(MetaError::Invalid(format!("bad name {name:?}")));
    }
    Ok(())
}

/// Splits the extent that straddles file offset `cut` in two there (the
/// coordinator's maps and the hosts' copies alike).
pub fn split_extents(ext: &mut BTreeMap<u64, Extent>, cut: u64) {
    let hit = ext.range(..cut).next_back().map(|(&k, &e)| (k, e));
    if let Some((k, e)) = hit {
        if e.file_off < cut && cut < e.file_off + e.len {
            let head = cut - e.file_off;
            ext.insert(k, Extent { len: head, ..e });
            ext.insert(
                cut,
                Extent {
                    file_off: cut,
                    lun_off: e.lun_off + head,
                    len: e.len - head,
                    unwritten: e.unwritten,
                },
            );
        }
    }
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
            },
            body: Body::Dir(BTreeMap::new()),
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

    fn record(&mut self, at: u64, ino: Ino, node: NodeId, epoch: u64, change: LeaseChange) {
        if self.history.len() >= LEASE_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(LeaseEvent {
            at,
            ino,
            node,
            epoch,
            change,
        });
    }

    /// Records the end of `lease` if it was a write lease: at `now`, or
    /// at its expiry if that came first.
    fn record_end(&mut self, ino: Ino, node: NodeId, lease: Lease, now: u64, change: LeaseChange) {
        if !lease.write {
            return;
        }
        if lease.expires <= now {
            self.record(lease.expires, ino, node, lease.epoch, LeaseChange::Expired);
        } else {
            self.record(now, ino, node, lease.epoch, change);
        }
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
                now,
                lease,
            } => {
                let r = self.create(parent, &name, kind, mode, uid, gid, target, now)?;
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
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                size,
                mtime,
                now,
            } => self.setattr(ino, [mode, uid, gid], size, mtime, now),
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
            Op::CreateSnapshot { name, now } => self.create_snapshot(&name, now),
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

    fn dir_mut(&mut self, ino: Ino) -> Result<&mut BTreeMap<String, Ino>, MetaError> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.body) {
            Some(Body::Dir(d)) => Ok(d),
            Some(_) => Err(MetaError::NotDir),
            None => Err(MetaError::NotFound),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        parent: Ino,
        name: &str,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        target: String,
        now: u64,
    ) -> Result<Reply, MetaError> {
        check_name(name)?;
        if parent == ROOT && name == SNAPSHOTS_NAME {
            return Err(MetaError::Invalid(format!(
                "{SNAPSHOTS_NAME} in the root is reserved for snapshots"
            )));
        }
        let ino = self.next_ino;
        if ino >= LIVE_INO_LIMIT {
            return Err(MetaError::NoSpace);
        }
        let dir = self.dir_mut(parent)?;
        if dir.contains_key(name) {
            return Err(MetaError::Exists);
        }
        dir.insert(name.to_string(), ino);
        self.next_ino += 1;
        let (body, size, nlink) = match kind {
            Kind::Dir => (Body::Dir(BTreeMap::new()), 0, 2),
            Kind::File => (Body::File(BTreeMap::new()), 0, 1),
            Kind::Symlink => {
                let n = target.len() as u64;
                (Body::Symlink(target), n, 1)
            }
        };
        let attr = Attr {
            ino,
            kind,
            mode,
            uid,
            gid,
            size,
            nlink,
            mtime: now,
            ctime: now,
        };
        self.inodes.insert(
            ino,
            Inode {
                attr: attr.clone(),
                body,
            },
        );
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.attr.mtime = now;
            p.attr.ctime = now;
            if kind == Kind::Dir {
                p.attr.nlink += 1;
            }
        }
        Ok(Reply::Attr(attr))
    }

    fn link(&mut self, ino: Ino, parent: Ino, name: &str, now: u64) -> Result<Reply, MetaError> {
        check_name(name)?;
        match self.inodes.get(&ino).map(|i| i.attr.kind) {
            None => return Err(MetaError::NotFound),
            Some(Kind::Dir) => return Err(MetaError::IsDir),
            Some(_) => {}
        }
        let dir = self.dir_mut(parent)?;
        if dir.contains_key(name) {
            return Err(MetaError::Exists);
        }
        dir.insert(name.to_string(), ino);
        let i = self.inodes.get_mut(&ino).ok_or(MetaError::NotFound)?;
        i.attr.nlink += 1;
        i.attr.ctime = now;
        Ok(Reply::Attr(i.attr.clone()))
    }

    /// Drops one link of `ino`; at zero links the inode goes and its
    /// extents are freed (or quarantined while leased).
    fn drop_link(&mut self, ino: Ino, now: u64) {
        let Some(i) = self.inodes.get_mut(&ino) else {
            return;
        };
        i.attr.nlink = i
            .attr
            .nlink
            .saturating_sub(if i.attr.kind == Kind::Dir { 2 } else { 1 });
        i.attr.ctime = now;
        if i.attr.nlink > 0 {
            return;
        }
        if let Some(Inode {
            body: Body::File(ext),
            ..
        }) = self.inodes.remove(&ino)
        {
            let pieces: Vec<(u64, u64)> = ext.values().map(|e| (e.lun_off, e.len)).collect();
            self.free(ino, pieces);
        }
    }

    fn unlink(&mut self, parent: Ino, name: &str, rmdir: bool, now: u64) -> Result<(), MetaError> {
        let ino = self.lookup(parent, name)?;
        let kind = self
            .inodes
            .get(&ino)
            .map(|i| i.attr.kind)
            .ok_or(MetaError::NotFound)?;
        match (rmdir, kind) {
            (true, Kind::Dir) => {
                if !self.readdir(ino)?.is_empty() {
                    return Err(MetaError::NotEmpty);
                }
            }
            (true, _) => return Err(MetaError::NotDir),
            (false, Kind::Dir) => return Err(MetaError::IsDir),
            (false, _) => {}
        }
        self.dir_mut(parent)?.remove(name);
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.attr.mtime = now;
            p.attr.ctime = now;
            if kind == Kind::Dir {
                p.attr.nlink -= 1;
            }
        }
        self.drop_link(ino, now);
        Ok(())
    }

    /// Whether `ino` is `dir` or below it.
    fn is_under(&self, mut ino: Ino, dir: Ino) -> bool {
        // Walk up through parents: find each directory's parent by search
        // (directories have exactly one name).
        let mut guard = 0;
        loop {
            if ino == dir {
                return true;
            }
            if ino == ROOT || guard > self.inodes.len() {
                return false;
            }
            guard += 1;
            let parent = self.inodes.iter().find_map(|(&p, i)| match &i.body {
                Body::Dir(d) if d.values().any(|&c| c == ino) => Some(p),
                _ => None,
            });
            match parent {
                Some(p) => ino = p,
                None => return false,
            }
        }
    }

    fn rename(
        &mut self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        now: u64,
    ) -> Result<(), MetaError> {
        check_name(new_name)?;
        if new_parent == ROOT && new_name == SNAPSHOTS_NAME {
            return Err(MetaError::Invalid(format!(
                "{SNAPSHOTS_NAME} in the root is reserved for snapshots"
            )));
        }
        let ino = self.lookup(parent, name)?;
        self.dir_mut(new_parent)?;
        let kind = self
            .inodes
            .get(&ino)
            .map(|i| i.attr.kind)
            .ok_or(MetaError::NotFound)?;
        if kind == Kind::Dir && self.is_under(new_parent, ino) {
            return Err(MetaError::Loop);
        }
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if old == ino {
                return Ok(());
            }
            let old_kind = self
                .inodes
                .get(&old)
                .map(|i| i.attr.kind)
                .ok_or(MetaError::NotFound)?;
            match (kind, old_kind) {
                (Kind::Dir, Kind::Dir) if !self.readdir(old)?.is_empty() => {
                    return Err(MetaError::NotEmpty);
                }
                (Kind::Dir, Kind::Dir) => {}
                (Kind::Dir, _) => return Err(MetaError::NotDir),
                (_, Kind::Dir) => return Err(MetaError::IsDir),
                _ => {}
            }
            self.unlink(new_parent, new_name, old_kind == Kind::Dir, now)?;
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(new_parent)?.insert(new_name.to_string(), ino);
        if kind == Kind::Dir && parent != new_parent {
            if let Some(p) = self.inodes.get_mut(&parent) {
                p.attr.nlink -= 1;
            }
            if let Some(p) = self.inodes.get_mut(&new_parent) {
                p.attr.nlink += 1;
            }
        }
        for d in [parent, new_parent] {
            if let Some(p) = self.inodes.get_mut(&d) {
                p.attr.mtime = now;
                p.attr.ctime = now;
            }
        }
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.attr.ctime = now;
        }
        Ok(())
    }

    fn setattr(
        &mut self,
        ino: Ino,
        [mode, uid, gid]: [Option<u32>; 3],
        size: Option<u64>,
        mtime: Option<u64>,
        now: u64,
    ) -> Result<Reply, MetaError> {
        let i = self.inodes.get_mut(&ino).ok_or(MetaError::NotFound)?;
        // Refuse before changing anything: a command applies whole or not.
        if size.is_some() && !matches!(i.body, Body::File(_)) {
            return Err(MetaError::IsDir);
        }
        if let Some(m) = mode {
            i.attr.mode = m;
        }
        if let Some(u) = uid {
            i.attr.uid = u;
        }
        if let Some(g) = gid {
            i.attr.gid = g;
        }
        i.attr.ctime = now;
        let mut freed = Vec::new();
        if let Some(new) = size {
            let Body::File(ext) = &mut i.body else {
                return Err(MetaError::IsDir);
            };
            // Cut extents at the new size; free what lies beyond.
            let keys: Vec<u64> = ext.keys().copied().collect();
            for k in keys {
                let Some(e) = ext.get(&k).copied() else {
                    continue;
                };
                if e.file_off >= new {
                    ext.remove(&k);
                    freed.push((e.lun_off, e.len));
                } else if e.file_off + e.len > new {
                    let keep = new - e.file_off;
                    ext.insert(k, Extent { len: keep, ..e });
                    freed.push((e.lun_off + keep, e.len - keep));
                }
            }
            i.attr.size = new;
            i.attr.mtime = now;
        }
        if let Some(t) = mtime {
            i.attr.mtime = t;
        }
        let attr = i.attr.clone();
        self.free(ino, freed);
        Ok(Reply::Attr(attr))
    }

    fn allocate(&mut self, ino: Ino, off: u64, len: u64) -> Result<Reply, MetaError> {
        let ext = match self.inodes.get(&ino).map(|i| &i.body) {
            Some(Body::File(e)) => e,
            Some(_) => return Err(MetaError::IsDir),
            None => return Err(MetaError::NotFound),
        };
        // Only the holes of [off, off + len) need space.
        let mut holes = Vec::new();
        let mut at = off;
        let end = off
            .checked_add(len)
            .ok_or_else(|| MetaError::Invalid("range overflows".into()))?;
        for e in ext.values() {
            if e.file_off + e.len <= at || e.file_off >= end {
                continue;
            }
            if e.file_off > at {
                holes.push((at, e.file_off - at));
            }
            at = at.max(e.file_off + e.len);
        }
        if at < end {
            holes.push((at, end - at));
        }
        let need: u64 = holes.iter().map(|h| h.1).sum();
        if need > self.alloc.free_bytes() {
            return Err(MetaError::NoSpace);
        }
        let hint = ext.values().last().map_or(0, |e| e.lun_off + e.len);
        let mut new = Vec::new();
        // Allocate every hole or none: work on a copy of the free list.
        let mut alloc = self.alloc.clone();
        for (hoff, hlen) in holes {
            let pieces = alloc
                .allocate_aligned(hlen, hint, ALIGN)
                .ok_or(MetaError::NoSpace)?;
            let mut foff = hoff;
            for (s, l) in pieces {
                new.push(Extent {
                    file_off: foff,
                    lun_off: s,
                    len: l,
                    unwritten: true,
                });
                foff += l;
            }
        }
        self.alloc = alloc;
        if let Some(Inode {
            body: Body::File(ext),
            ..
        }) = self.inodes.get_mut(&ino)
        {
            for e in &new {
                ext.insert(e.file_off, *e);
            }
        }
        Ok(Reply::Extents(new))
    }

    fn mark_written(
        &mut self,
        ino: Ino,
        off: u64,
        len: u64,
        size: u64,
        now: u64,
    ) -> Result<Reply, MetaError> {
        let i = self.inodes.get_mut(&ino).ok_or(MetaError::NotFound)?;
        let Body::File(ext) = &mut i.body else {
            return Err(MetaError::IsDir);
        };
        let end = off.saturating_add(len);
        // Split extents at the range's edges, then mark the inside written.
        split_extents(ext, off);
        split_extents(ext, end);
        for (_, e) in ext.range_mut(off..end) {
            e.unwritten = false;
        }
        if size > i.attr.size {
            i.attr.size = size;
        }
        i.attr.mtime = now;
        Ok(Reply::Attr(i.attr.clone()))
    }

    /// Grants a lease and records in the history what it changes for
    /// writing: the end of other hosts' expired write leases (gone before
    /// this one begins), of this host's own expired or downgraded one, and
    /// the beginning of a write lease.
    fn grant(
        &mut self,
        node: NodeId,
        ino: Ino,
        write: bool,
        now: u64,
        ttl: u64,
    ) -> Result<Reply, MetaError> {
        let before: Vec<(NodeId, Lease)> = self.leases(ino);
        let r = self.grant_quiet(node, ino, write, now, ttl)?;
        let Reply::Lease(new) = r else { return Ok(r) };
        if write {
            for &(other, l) in &before {
                if other != node && l.write && l.expires <= now {
                    self.leases.remove(&(ino, other));
                    self.record(l.expires, ino, other, l.epoch, LeaseChange::Expired);
                }
            }
        }
        let own = before.iter().find(|(n, _)| *n == node).map(|&(_, l)| l);
        let was_writing = match own {
            Some(l) if l.write && l.expires <= now => {
                self.record(l.expires, ino, node, l.epoch, LeaseChange::Expired);
                false
            }
            Some(l) if l.write && !write => {
                self.record(now, ino, node, l.epoch, LeaseChange::Released);
                false
            }
            Some(l) => l.write,
            None => false,
        };
        if write && !was_writing {
            self.record(now, ino, node, new.epoch, LeaseChange::Granted);
        }
        Ok(r)
    }

    /// Grants a lease without touching the history.
    fn grant_quiet(
        &mut self,
        node: NodeId,
        ino: Ino,
        write: bool,
        now: u64,
        ttl: u64,
    ) -> Result<Reply, MetaError> {
        match self.node(ino).map(|(i, _)| i.attr.kind) {
            Some(Kind::File) => {}
            Some(_) => return Err(MetaError::IsDir),
            None => return Err(MetaError::NotFound),
        }
        if write && is_snapshot_ino(ino) {
            return Err(MetaError::Invalid("snapshots are read-only".into()));
        }
        if write {
            if let Some((&(_, other), _)) = self
                .leases
                .range((ino, 0)..=(ino, u64::MAX))
                .find(|(&(_, n), l)| n != node && l.write && l.expires > now)
            {
                return Err(MetaError::Busy(other));
            }
        }
        let epoch = match self.leases.get(&(ino, node)) {
            Some(l) if l.expires > now => l.epoch,
            _ => {
                self.next_epoch += 1;
                self.next_epoch
            }
        };
        let l = Lease {
            epoch,
            expires: now.saturating_add(ttl),
            write,
        };
        self.leases.insert((ino, node), l);
        Ok(Reply::Lease(l))
    }

    /// Frees LUN space of `ino`: at once if nobody holds a lease on it,
    /// else into quarantine until the last lease ends.
    /// Bytes a snapshot still holds only lose a reference.
    fn free(&mut self, ino: Ino, pieces: Vec<(u64, u64)>) {
        let pieces: Vec<(u64, u64)> = if self.refs.is_empty() {
            pieces
        } else {
            pieces
                .into_iter()
                .flat_map(|(s, l)| self.refs.drop_ref(s, l))
                .collect()
        };
        if pieces.is_empty() {
            return;
        }
        if self
            .leases
            .range((ino, 0)..=(ino, u64::MAX))
            .next()
            .is_some()
        {
            self.quarantine.entry(ino).or_default().extend(pieces);
        } else {
            for (s, l) in pieces {
                let _ = self.alloc.release(s, l);
            }
        }
    }

    fn release_quarantine(&mut self, ino: Ino) {
        if self
            .leases
            .range((ino, 0)..=(ino, u64::MAX))
            .next()
            .is_some()
        {
            return;
        }
        for (s, l) in self.quarantine.remove(&ino).unwrap_or_default() {
            let _ = self.alloc.release(s, l);
        }
    }

    /// Consistency check: every LUN byte is in exactly one of a file, the
    /// free space or quarantine; directories' link counts and names agree.
    /// Returns the problems found.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut owned: Vec<(u64, u64, String)> = Vec::new();
        for (ino, i) in &self.inodes {
            if let Body::File(ext) = &i.body {
                for e in ext.values() {
                    owned.push((e.lun_off, e.len, format!("inode {ino}")));
                }
            }
        }
        for (ino, q) in &self.quarantine {
            for &(s, l) in q {
                owned.push((s, l, format!("quarantine of {ino}")));
            }
        }
        for (s, l) in self.alloc.intervals() {
            owned.push((s, l, "free space".into()));
        }
        owned.sort();
        for w in owned.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                problems.push(format!(
                    "LUN bytes {}..{} belong to both {} and {}",
                    w[1].0,
                    (w[0].0 + w[0].1).min(w[1].0 + w[1].1),
                    w[0].2,
                    w[1].2
                ));
            }
        }
        // Bytes a snapshot holds are neither free nor in quarantine, and
        // the reference table is what the owners imply.
        let mut fq: Vec<(u64, u64)> = self.alloc.intervals().collect();
        fq.extend(self.quarantine.values().flatten().copied());
        fq.sort_unstable();
        for (id, snap) in &self.snapshots {
            for (s, l) in snaps::lun_ranges(&snap.inodes) {
                let i = fq.partition_point(|&(fs, fl)| fs + fl <= s);
                if fq.get(i).is_some_and(|&(fs, _)| fs < s + l) {
                    problems.push(format!(
                        "LUN bytes at {s} of snapshot {id} are free or in quarantine"
                    ));
                }
            }
        }
        if self.refs != self.implied_refs() {
            problems.push("the shared-range reference counts disagree with the owners".into());
        }
        for (ino, i) in &self.inodes {
            if let Body::Dir(d) = &i.body {
                for (name, child) in d {
                    if !self.inodes.contains_key(child) {
                        problems.push(format!(
                            "{name} in directory {ino} names missing inode {child}"
                        ));
                    }
                }
            }
        }
        problems
    }
}
