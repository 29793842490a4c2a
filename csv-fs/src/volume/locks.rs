//! File locks through the mount: `fcntl` record locks, OFD locks and
//! `flock`, held in the coordinator's replicated state
//! ([`coordinator::meta::FileLock`]) so that a lock taken on one host
//! stands in the way on every other.
//!
//! The kernel hands a FUSE filesystem all three as record locks with an
//! owner: a process's files table for `fcntl` locks, the open file for OFD
//! locks and `flock` (fuser does not pass on the flag that tells `flock`
//! apart), so `flock` locks are whole-file locks that also meet record
//! locks, as NFS has done on Linux since 2.6.12.
//!
//! While the cluster runs below feature level 3 (a host of an older build
//! is a member, or a fresh cluster whose hosts have not all reported yet)
//! the coordinator refuses lock commands: a host then keeps the locks
//! taken through it in its own table, as each kernel did before, and
//! every request also meets the locks in that table.
//!
//! A blocking request (`F_SETLKW`, `flock` without `LOCK_NB`) is recorded
//! in the coordinator as waiting for what stands in the way, or refused
//! with EDEADLK when that owner waits, directly or through others, for
//! this one ([`coordinator::meta::LockTable::wait`]); it then asks the
//! coordinator every 10 ms which lock stands in the way (a read, no
//! commit), tries again once none does, and records its wait again every
//! second. A signal for the waiting thread ends the wait with EINTR
//! (fuser does not pass the kernel's interrupt on, so the thread's pending
//! signals are read from `/proc/<tid>/status`).

use super::VolumeFs;
use coordinator::meta::{FileLock, LockType};
use coordinator::proto::{self, volume_op};
use fuser::Errno;
use std::time::Duration;

/// How often a blocked lock request looks again.
const RETRY: Duration = Duration::from_millis(10);

/// How often a blocked lock request records its wait again (well within
/// [`coordinator::meta::WAIT_TTL_MS`]).
const REWAIT: Duration = Duration::from_secs(1);

/// A lock as the kernel describes it: its range and type (`F_RDLCK`,
/// `F_WRLCK`, `F_UNLCK`).
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: i32,
}

fn lock_type(typ: i32) -> Result<proto::LockType, Errno> {
    match typ {
        libc::F_RDLCK => Ok(proto::LockType::Read),
        libc::F_WRLCK => Ok(proto::LockType::Write),
        libc::F_UNLCK => Ok(proto::LockType::Unlock),
        _ => Err(Errno::EINVAL),
    }
}

/// Whether thread `tid` has a signal pending that it does not block.
fn signal_pending(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        // The thread is gone: nobody waits any more.
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (field("SigPnd:") | field("ShdPnd:")) & !field("SigBlk:") != 0
}

impl VolumeFs {
    fn lock_op(&self, ino: u64, owner: u64, pid: u32, r: Range) -> Result<proto::LockOp, Errno> {
        Ok(proto::LockOp {
            ino,
            node: self.node,
            owner,
            pid,
            flock: false,
            start: r.start,
            end: r.end,
            r#type: lock_type(r.typ)? as i32,
            ..Default::default()
        })
    }

    /// The lock in this host's own table in the way of `owner` taking `r`.
    fn local_conflict(&self, ino: u64, owner: u64, r: Range) -> Option<(Range, u32)> {
        let t = self.local_locks.lock().ok()?;
        let l = t.conflict(
            ino,
            self.node,
            owner,
            false,
            r.start,
            r.end,
            r.typ == libc::F_WRLCK,
        )?;
        let typ = if l.write {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        };
        Some((
            Range {
                start: l.start,
                end: l.end,
                typ,
            },
            l.pid,
        ))
    }

    /// The lock that stands in the way of `owner` taking `r` of `ino`
    /// (`F_GETLK`): its range, type and holder's pid; None when none does.
    pub fn getlk(
        &self,
        ino: u64,
        owner: u64,
        pid: u32,
        r: Range,
    ) -> Result<Option<(Range, u32)>, Errno> {
        if let Some(found) = self.local_conflict(ino, owner, r) {
            return Ok(Some(found));
        }
        let q = self.lock_op(ino, owner, pid, r)?;
        let vol = self.vol;
        let reply = self.call(|c| c.read(vol, proto::read::Query::LockConflict(q)))?;
        match reply.value {
            Some(proto::reply::Value::Lock(l)) if l.ino != 0 => {
                let typ = if l.r#type == proto::LockType::Write as i32 {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                };
                Ok(Some((
                    Range {
                        start: l.start,
                        end: l.end,
                        typ,
                    },
                    l.pid,
                )))
            }
            Some(proto::reply::Value::Lock(_)) => Ok(None),
            _ => Err(Errno::EIO),
        }
    }

    /// One try at `owner`'s lock `r` of `ino`: in the cluster's table, or
    /// this host's own while the cluster cannot keep locks; EAGAIN when a
    /// lock stands in the way (with `wait`, recorded as waiting for it) or
    /// EDEADLK when waiting would close a cycle.
    fn try_lock(&self, ino: u64, owner: u64, pid: u32, r: Range, wait: bool) -> Result<(), Errno> {
        let op = proto::LockOp {
            wait,
            ..self.lock_op(ino, owner, pid, r)?
        };
        if r.typ != libc::F_UNLCK && self.local_conflict(ino, owner, r).is_some() {
            return Err(Errno::EAGAIN);
        }
        let local = || -> Result<(), Errno> {
            let typ = match r.typ {
                libc::F_RDLCK => LockType::Read,
                libc::F_WRLCK => LockType::Write,
                _ => LockType::Unlock,
            };
            let l = FileLock {
                node: self.node,
                owner,
                pid,
                flock: false,
                start: r.start,
                end: r.end,
                write: typ == LockType::Write,
            };
            let mut t = self.local_locks.lock().map_err(|_| Errno::EIO)?;
            t.set(ino, l, typ).map_err(|_| Errno::EAGAIN)
        };
        match self.op(volume_op::Op::Lock(op)) {
            // Below feature level 3: this host's own table.
            Err(Errno::EOPNOTSUPP) => local(),
            // An unlock also reaches a lock taken in the own table before.
            Ok(_) if r.typ == libc::F_UNLCK => local(),
            r => r.map(|_| ()),
        }
    }

    /// Takes, changes or releases `owner`'s lock `r` of `ino` (open as
    /// `fh`) for process `pid`: EAGAIN when another holds it and `waiter`
    /// is None; with the waiting thread's id, until it can be had or that
    /// thread gets a signal (EINTR).
    pub fn setlk(
        &self,
        (ino, fh): (u64, u64),
        owner: u64,
        pid: u32,
        r: Range,
        waiter: Option<u32>,
    ) -> Result<(), Errno> {
        let wait = waiter.is_some() && r.typ != libc::F_UNLCK;
        loop {
            match self.try_lock(ino, owner, pid, r, wait) {
                Ok(()) => {
                    if let Ok(mut held) = self.lockers.lock() {
                        held.insert((ino, owner));
                    }
                    if let Ok(mut by) = self.handle_lockers.lock() {
                        let owners = by.entry(fh).or_default();
                        if !owners.contains(&owner) {
                            owners.push(owner);
                        }
                    }
                    return Ok(());
                }
                Err(Errno::EAGAIN) if wait => {}
                Err(e) => return Err(e),
            }
            let tid = waiter.unwrap_or(pid);
            let asked = std::time::Instant::now();
            // Wait until nothing stands in the way (or it is time to
            // record the wait again), then try again.
            loop {
                if signal_pending(tid) {
                    return Err(Errno::EINTR);
                }
                std::thread::sleep(RETRY);
                if asked.elapsed() >= REWAIT {
                    break;
                }
                match self.getlk(ino, owner, pid, r) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Handle `fh` of `ino` is released: the locks taken through it go
    /// (its OFD and `flock` locks; a process's record locks went at the
    /// close that flushed it).
    pub fn release_handle_locks(&self, ino: u64, fh: u64) {
        let owners = self
            .handle_lockers
            .lock()
            .ok()
            .and_then(|mut by| by.remove(&fh))
            .unwrap_or_default();
        for o in owners {
            self.release_locks(ino, o);
        }
    }

    /// `owner` closed a descriptor of `ino` (POSIX: its record locks on the
    /// file go) or released an open file (its `flock` lock goes). Only an
    /// owner that locked something here costs a call.
    pub fn release_locks(&self, ino: u64, owner: u64) {
        let held = self
            .lockers
            .lock()
            .map(|mut h| h.remove(&(ino, owner)))
            .unwrap_or(false);
        if !held {
            return;
        }
        if let Ok(mut t) = self.local_locks.lock() {
            t.drop_owner(ino, self.node, owner, false);
        }
        let r = self.op(volume_op::Op::UnlockOwner(proto::LockOp {
            ino,
            node: self.node,
            owner,
            ..Default::default()
        }));
        match r {
            Ok(_) | Err(Errno::EOPNOTSUPP) => {}
            Err(e) => tracing::debug!(ino, owner, "locks not released at close: {e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pending_signal_is_seen_and_a_blocked_one_is_not() {
        // This thread: nothing pending.
        let tid = nix::unistd::gettid().as_raw() as u32;
        assert!(!super::signal_pending(tid));
        // A thread that no longer exists has nobody waiting.
        assert!(super::signal_pending(u32::MAX - 1));
    }
}
