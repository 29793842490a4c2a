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
            .get(&ino)?
            .iter()
            .find(|l| l.conflicts(node, owner, flock, start, end, write))
            .copied()
    }

    /// The locks held on `ino`.
    pub fn locks_of(&self, ino: Ino) -> Vec<FileLock> {
        self.locks.get(&ino).cloned().unwrap_or_default()
    }

    /// Takes, changes or releases a lock of `ino`: `WouldBlock` names the
    /// holder in the way. A host must hold a lease on a file to lock it
    /// (it has the file open). A record lock replaces the owner's own
    /// locks on the range it covers (POSIX: a lock changes type in place,
    /// an unlock may split one in two); a `flock` lock covers the whole
    /// file and replaces the owner's other `flock` lock.
    pub(super) fn set_lock(
        &mut self,
        ino: Ino,
        req: FileLock,
        typ: LockType,
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
        let (start, end) = if req.flock {
            (0, u64::MAX)
        } else {
            (req.start, req.end)
        };
        if typ != LockType::Unlock {
            if kind == Kind::File && self.leases.get(&(ino, req.node)).is_none() {
                return Err(MetaError::Invalid(format!(
                    "host {} holds no lease on inode {ino}: it has not opened it",
                    req.node
                )));
            }
            let write = typ == LockType::Write;
            if let Some(l) =
                self.lock_conflict(ino, req.node, req.owner, req.flock, start, end, write)
            {
                return Err(MetaError::WouldBlock(l));
            }
        }
        let old = self.locks.remove(&ino).unwrap_or_default();
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
            self.locks.insert(ino, kept);
        }
        Ok(Reply::Ok)
    }

    /// Drops the locks on file `ino` of hosts that no longer hold a lease
    /// on it (closed, or down: expired or revoked).
    pub(super) fn drop_unleased_locks(&mut self, ino: Ino) {
        let Some(list) = self.locks.remove(&ino) else {
            return;
        };
        let file = self
            .inodes
            .get(&ino)
            .is_some_and(|i| i.attr.kind == Kind::File);
        let kept: Vec<FileLock> = list
            .into_iter()
            .filter(|l| !file || self.leases.contains_key(&(ino, l.node)))
            .collect();
        if !kept.is_empty() {
            self.locks.insert(ino, kept);
        }
    }

    /// Drops every lock of `(node, owner)` on `ino` of one kind (a close:
    /// record locks at the flush of the owner's descriptor, `flock` locks
    /// at the release of the file).
    pub(super) fn drop_owner_locks(&mut self, ino: Ino, node: NodeId, owner: u64, flock: bool) {
        if let Some(list) = self.locks.get_mut(&ino) {
            list.retain(|l| !l.same_owner(node, owner, flock));
            if list.is_empty() {
                self.locks.remove(&ino);
            }
        }
    }
}
