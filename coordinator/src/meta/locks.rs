//! Cluster-wide file locks: POSIX record locks (`fcntl`, OFD locks, which
//! reach a FUSE filesystem the same way with another owner) and `flock`
//! locks, kept in the volume's replicated state so that every host sees
//! the same holders.
//!
//! A lock belongs to an owner on a host: (host, the kernel's lock owner
//! id, the holder's pid for `F_GETLK`). Record locks and `flock` locks do
//! not conflict with each other, as on Linux. A lock on a file lives no
//! longer than its host's lease on that file (every open file holds one):
//! when the lease ends, given back at the last close, or expired or
//! revoked because the host is down, the host's locks on the file go with
//! it, under the same fencing rules as writes.
//!
//! Deadlocks between record-lock owners are found across hosts: a
//! blocking request (`F_SETLKW`) that meets a lock records its owner as
//! waiting for the range it asked for, for a few seconds
//! ([`WAIT_TTL_MS`]; the waiter asks again every second while it waits),
//! and a request whose waiting would close a cycle (it waits for an
//! owner that waits, through others maybe, for it) is refused with
//! EDEADLK instead, as Linux does for local `fcntl` locks. The waits are
//! the coordinator's soft state: kept in its snapshots, dropped when they
//! expire or the owner gets its lock.

use super::*;

/// One lock held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLock {
    /// The host holding it.
    pub node: NodeId,
    /// The kernel's lock owner on that host.
    pub owner: u64,
    /// The process holding it (what `F_GETLK` reports).
    pub pid: u32,
    /// A `flock` lock (else a record lock).
    pub flock: bool,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive; `u64::MAX`: to the end of the file, however
    /// it grows).
    pub end: u64,
    /// An exclusive (write) lock.
    pub write: bool,
}

/// What a lock command asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockType {
    /// A shared lock.
    Read,
    /// An exclusive lock.
    Write,
    /// Release.
    Unlock,
}

impl FileLock {
    fn same_owner(&self, node: NodeId, owner: u64, flock: bool) -> bool {
        self.node == node && self.owner == owner && self.flock == flock
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    /// Whether this lock stands in the way of `(node, owner)` taking
    /// `[start, end]` (`write`: exclusively).
    fn conflicts(
        &self,
        node: NodeId,
        owner: u64,
        flock: bool,
        start: u64,
        end: u64,
        write: bool,
    ) -> bool {
        self.flock == flock
            && !(self.node == node && self.owner == owner)
            && self.overlaps(start, end)
            && (write || self.write)
    }
}

/// How long a blocked request's wait is remembered after it was asked
/// (ms): the waiter asks again every second while it waits, so a waiter
/// on a host that died is forgotten within this.
pub const WAIT_TTL_MS: u64 = 3_000;

/// A lock owner waiting for a range (a blocked `F_SETLKW`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// The file.
    pub ino: Ino,
    /// What it asked for.
    pub lock: FileLock,
    /// Until when (ms, the proposers' clock) the wait stands.
    pub until: u64,
}

/// Locks by inode, and the rules between them: the volume's replicated
/// table, and a host's own while its cluster runs below the feature level
/// that replicates locks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockTable {
    held: BTreeMap<Ino, Vec<FileLock>>,
    /// Blocked record-lock requests by owner (host, owner).
    waits: BTreeMap<(NodeId, u64), Wait>,
}

impl LockTable {
    /// The first lock that stands in the way of `(node, owner)` taking
    /// `[start, end]` of `ino` (`write`: exclusively).
    #[allow(clippy::too_many_arguments)]
    pub fn conflict(
        &self,
        ino: Ino,
        node: NodeId,
        owner: u64,
        flock: bool,
        start: u64,
        end: u64,
        write: bool,
    ) -> Option<FileLock> {
        self.held
            .get(&ino)?
            .iter()
            .find(|l| l.conflicts(node, owner, flock, start, end, write))
            .copied()
    }

    /// The owners of the locks that stand in the way of `req` on `ino`.
    fn blockers(&self, ino: Ino, req: &FileLock) -> Vec<(NodeId, u64)> {
        let mut v: Vec<(NodeId, u64)> = self
            .held
            .get(&ino)
            .into_iter()
            .flatten()
            .filter(|l| {
                l.conflicts(
                    req.node, req.owner, req.flock, req.start, req.end, req.write,
                )
            })
            .map(|l| (l.node, l.owner))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// `req` (a record lock of `ino` that `holder` stands in the way of)
    /// waits: recorded until `now` + [`WAIT_TTL_MS`], or `Err(holder)`
    /// when waiting would close a cycle: an owner it waits for waits,
    /// directly or through others, for it. Expired waits are forgotten.
    pub fn wait(
        &mut self,
        ino: Ino,
        req: FileLock,
        holder: FileLock,
        now: u64,
    ) -> Result<(), FileLock> {
        self.waits.retain(|_, w| w.until > now);
        let me = (req.node, req.owner);
        self.waits.remove(&me);
        if req.flock {
            return Ok(());
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut next = self.blockers(ino, &req);
        while let Some(o) = next.pop() {
            if o == me {
                return Err(holder);
            }
            if !seen.insert(o) {
                continue;
            }
            if let Some(w) = self.waits.get(&o) {
                next.extend(self.blockers(w.ino, &w.lock));
            }
        }
        self.waits.insert(
            me,
            Wait {
                ino,
                lock: req,
                until: now.saturating_add(WAIT_TTL_MS),
            },
        );
        Ok(())
    }

    /// The blocked requests remembered.
    pub fn waits(&self) -> impl Iterator<Item = &Wait> {
        self.waits.values()
    }

    /// Adds a wait as it is (a decoded state).
    pub(super) fn push_wait(&mut self, w: Wait) {
        self.waits.insert((w.lock.node, w.lock.owner), w);
    }

    /// The locks held on `ino`, in range order.
    pub fn of(&self, ino: Ino) -> Vec<FileLock> {
        self.held.get(&ino).cloned().unwrap_or_default()
    }

    /// Every lock held, with its inode.
    pub fn all(&self) -> impl Iterator<Item = (Ino, &FileLock)> {
        self.held
            .iter()
            .flat_map(|(ino, l)| l.iter().map(move |x| (*ino, x)))
    }

    /// Adds a lock as it is (a decoded state).
    pub(super) fn push(&mut self, ino: Ino, l: FileLock) {
        self.held.entry(ino).or_default().push(l);
    }

    /// Takes, changes or releases `req`'s lock of `ino`; the holder in the
    /// way when it cannot be had. A record lock replaces the owner's own
    /// locks on the range it covers (POSIX: a lock changes type in place,
    /// an unlock may split one in two); a `flock` lock covers the whole
    /// file and replaces the owner's other `flock` lock. An owner that
    /// gets its lock no longer waits.
    pub fn set(&mut self, ino: Ino, req: FileLock, typ: LockType) -> Result<(), FileLock> {
        let (start, end) = if req.flock {
            (0, u64::MAX)
        } else {
            (req.start, req.end)
        };
        if typ != LockType::Unlock {
            let write = typ == LockType::Write;
            if let Some(l) = self.conflict(ino, req.node, req.owner, req.flock, start, end, write) {
                return Err(l);
            }
        }
        if !req.flock {
            self.waits.remove(&(req.node, req.owner));
        }
        let old = self.held.remove(&ino).unwrap_or_default();
        // The owner's own locks on the range are cut out of it.
        let mut kept = Vec::with_capacity(old.len() + 1);
        for l in old {
            if !l.same_owner(req.node, req.owner, req.flock) || !l.overlaps(start, end) {
                kept.push(l);
                continue;
            }
            if l.start < start {
                kept.push(FileLock {
                    end: start - 1,
                    ..l
                });
            }
            if l.end > end {
                kept.push(FileLock {
                    start: end + 1,
                    ..l
                });
            }
        }
        if typ != LockType::Unlock {
            kept.push(FileLock {
                start,
                end,
                write: typ == LockType::Write,
                ..req
            });
        }
        kept.sort_by_key(|l| (l.start, l.node, l.owner));
        if !kept.is_empty() {
            self.held.insert(ino, kept);
        }
        Ok(())
    }

    /// Drops every lock of `(node, owner)` on `ino` of one kind.
    pub fn drop_owner(&mut self, ino: Ino, node: NodeId, owner: u64, flock: bool) {
        self.retain(ino, |l| !l.same_owner(node, owner, flock));
    }

    /// Keeps the locks of `ino` that `keep` says to.
    pub fn retain(&mut self, ino: Ino, keep: impl FnMut(&FileLock) -> bool) {
        if let Some(list) = self.held.get_mut(&ino) {
            list.retain(keep);
            if list.is_empty() {
                self.held.remove(&ino);
            }
        }
    }

    /// Drops every lock of `ino` (it is gone).
    pub fn remove(&mut self, ino: Ino) {
        self.held.remove(&ino);
        self.waits.retain(|_, w| w.ino != ino);
    }
}

impl Volume {
    /// The first lock that stands in the way of `(node, owner)` taking
    /// `[start, end]` of `ino` (`F_GETLK`).
    #[allow(clippy::too_many_arguments)]
    pub fn lock_conflict(
        &self,
        ino: Ino,
        node: NodeId,
        owner: u64,
        flock: bool,
        start: u64,
        end: u64,
        write: bool,
    ) -> Option<FileLock> {
        self.locks
            .conflict(ino, node, owner, flock, start, end, write)
    }

    /// The locks held on `ino`.
    pub fn locks_of(&self, ino: Ino) -> Vec<FileLock> {
        self.locks.of(ino)
    }

    /// The blocked lock requests remembered (for deadlock detection).
    pub fn lock_waits(&self) -> impl Iterator<Item = &Wait> {
        self.locks.waits()
    }

    /// Takes, changes or releases a lock of `ino` ([`LockTable::set`]):
    /// `WouldBlock` names the holder in the way; with `wait` (a blocking
    /// request, at that time) the owner is recorded as waiting, or
    /// `Deadlock` answered ([`LockTable::wait`]). A host must hold a lease
    /// on a file to lock it (it has the file open).
    pub(super) fn set_lock(
        &mut self,
        ino: Ino,
        req: FileLock,
        typ: LockType,
        wait: Option<u64>,
    ) -> Result<Reply, MetaError> {
        if req.start > req.end {
            return Err(MetaError::Invalid(
                "a lock's range ends before it starts".into(),
            ));
        }
        let kind = self
            .inodes
            .get(&ino)
            .map(|i| i.attr.kind)
            .ok_or(MetaError::NotFound)?;
        if typ != LockType::Unlock
            && kind == Kind::File
            && !self.leases.contains_key(&(ino, req.node))
        {
            return Err(MetaError::Invalid(format!(
                "host {} holds no lease on inode {ino}: it has not opened it",
                req.node
            )));
        }
        match self.locks.set(ino, req, typ) {
            Ok(()) => Ok(Reply::Ok),
            Err(holder) => {
                if let Some(now) = wait {
                    let asked = FileLock {
                        write: typ == LockType::Write,
                        ..req
                    };
                    self.locks
                        .wait(ino, asked, holder, now)
                        .map_err(MetaError::Deadlock)?;
                }
                Err(MetaError::WouldBlock(holder))
            }
        }
    }

    /// Drops the locks on file `ino` of hosts that no longer hold a lease
    /// on it (closed, or down: expired or revoked).
    pub(super) fn drop_unleased_locks(&mut self, ino: Ino) {
        if !self
            .inodes
            .get(&ino)
            .is_some_and(|i| i.attr.kind == Kind::File)
        {
            return;
        }
        let leases = &self.leases;
        self.locks
            .retain(ino, |l| leases.contains_key(&(ino, l.node)));
    }

    /// Drops every lock of `(node, owner)` on `ino` of one kind (a close).
    pub(super) fn drop_owner_locks(&mut self, ino: Ino, node: NodeId, owner: u64, flock: bool) {
        self.locks.drop_owner(ino, node, owner, flock);
    }
}
