//! Between the state machine's types ([`crate::meta`]) and the messages on
//! the wire and in the log ([`crate::proto`]).
//!
//! Decoding checks what prost cannot: a command must be present, a kind
//! must be known. Bad input becomes a [`DecodeError`], never a panic.

use crate::meta::{self, Kind, MetaError, Op};
use crate::proto::{self, volume_op, ErrorCode, NodeKind};

pub use crate::proto::error;

/// A message that is well-formed protobuf but not a valid command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message: {0}")]
pub struct DecodeError(pub String);

fn kind_from(k: i32) -> Result<Kind, DecodeError> {
    match NodeKind::try_from(k) {
        Ok(NodeKind::Directory) => Ok(Kind::Dir),
        Ok(NodeKind::File) => Ok(Kind::File),
        Ok(NodeKind::Symlink) => Ok(Kind::Symlink),
        Ok(NodeKind::Fifo) => Ok(Kind::Fifo),
        Ok(NodeKind::CharDevice) => Ok(Kind::CharDevice),
        Ok(NodeKind::BlockDevice) => Ok(Kind::BlockDevice),
        Ok(NodeKind::Socket) => Ok(Kind::Socket),
        Err(_) => Err(DecodeError(format!("unknown inode kind {k}"))),
    }
}

/// The schema's name of an inode kind.
pub fn kind_code(k: Kind) -> NodeKind {
    match k {
        Kind::Dir => NodeKind::Directory,
        Kind::File => NodeKind::File,
        Kind::Symlink => NodeKind::Symlink,
        Kind::Fifo => NodeKind::Fifo,
        Kind::CharDevice => NodeKind::CharDevice,
        Kind::BlockDevice => NodeKind::BlockDevice,
        Kind::Socket => NodeKind::Socket,
    }
}

fn xattr_set_from(how: i32) -> Result<meta::XattrSet, DecodeError> {
    match proto::XattrSet::try_from(how) {
        Ok(proto::XattrSet::Any) => Ok(meta::XattrSet::Any),
        Ok(proto::XattrSet::Create) => Ok(meta::XattrSet::Create),
        Ok(proto::XattrSet::Replace) => Ok(meta::XattrSet::Replace),
        Err(_) => Err(DecodeError(format!(
            "unknown extended attribute mode {how}"
        ))),
    }
}

fn xattr_set_code(how: meta::XattrSet) -> proto::XattrSet {
    match how {
        meta::XattrSet::Any => proto::XattrSet::Any,
        meta::XattrSet::Create => proto::XattrSet::Create,
        meta::XattrSet::Replace => proto::XattrSet::Replace,
    }
}

/// A volume command from its message.
pub fn op_from_proto(op: &proto::VolumeOp) -> Result<Op, DecodeError> {
    use volume_op::Op as P;
    Ok(match op.op.as_ref() {
        None => return Err(DecodeError("volume command missing".into())),
        Some(P::Create(c)) => Op::Create {
            parent: c.parent,
            name: c.name.clone(),
            kind: kind_from(c.kind)?,
            mode: c.mode,
            uid: c.uid,
            gid: c.gid,
            target: c.target.clone(),
            rdev: c.rdev,
            umask: c.umask,
            now: c.now,
            lease: (c.lease_ttl > 0).then_some((c.lease_node, c.lease_ttl)),
        },
        Some(P::Link(c)) => Op::Link {
            ino: c.ino,
            parent: c.parent,
            name: c.name.clone(),
            now: c.now,
        },
        Some(P::Unlink(c)) => Op::Unlink {
            parent: c.parent,
            name: c.name.clone(),
            rmdir: c.rmdir,
            now: c.now,
        },
        Some(P::Rename(c)) => Op::Rename {
            parent: c.parent,
            name: c.name.clone(),
            new_parent: c.new_parent,
            new_name: c.new_name.clone(),
            now: c.now,
        },
        Some(P::Exchange(c)) => Op::Exchange {
            parent: c.parent,
            name: c.name.clone(),
            new_parent: c.new_parent,
            new_name: c.new_name.clone(),
            now: c.now,
        },
        Some(P::SetXattr(c)) => Op::SetXattr {
            ino: c.ino,
            name: c.name.clone(),
            value: c.value.clone(),
            how: xattr_set_from(c.how)?,
            now: c.now,
        },
        Some(P::Accessed(c)) => Op::Accessed {
            times: c.times.iter().map(|t| (t.ino, t.atime)).collect(),
        },
        Some(P::RemoveXattr(c)) => Op::RemoveXattr {
            ino: c.ino,
            name: c.name.clone(),
            now: c.now,
        },
        Some(P::Lock(c)) => Op::Lock {
            ino: c.ino,
            lock: lock_from_proto(c),
            typ: match proto::LockType::try_from(c.r#type) {
                Ok(proto::LockType::Read) => meta::LockType::Read,
                Ok(proto::LockType::Write) => meta::LockType::Write,
                Ok(proto::LockType::Unlock) => meta::LockType::Unlock,
                Err(_) => return Err(DecodeError(format!("unknown lock type {}", c.r#type))),
            },
            wait: c.wait.then_some(c.now),
        },
        Some(P::UnlockOwner(c)) => Op::UnlockOwner {
            ino: c.ino,
            node: c.node,
            owner: c.owner,
            flock: c.flock,
        },
        Some(P::SetAttr(c)) => Op::SetAttr {
            ino: c.ino,
            mode: c.mode,
            uid: c.uid,
            gid: c.gid,
            size: c.size,
            mtime: c.mtime.map(|t| (t, c.mtime_sub_ns)),
            atime: c.atime.map(|t| (t, c.atime_sub_ns)),
            now: c.now,
        },
        Some(P::Allocate(c)) => Op::Allocate {
            ino: c.ino,
            off: c.off,
            len: c.len,
        },
        Some(P::MarkWritten(c)) => Op::MarkWritten {
            ino: c.ino,
            off: c.off,
            len: c.len,
            size: c.size,
            now: c.now,
            more: c.more.iter().map(|r| (r.off, r.len)).collect(),
        },
        Some(P::GrantLease(c)) => Op::GrantLease {
            node: c.node,
            ino: c.ino,
            write: c.write,
            now: c.now,
            ttl: c.ttl,
        },
        Some(P::RevokeLease(c)) => Op::RevokeLease {
            node: c.node,
            ino: c.ino,
            now: c.now,
            revoked: c.revoked,
        },
        Some(P::Tick(c)) => Op::Tick { now: c.now },
        Some(P::HandOver(c)) => Op::HandOver {
            ino: c.ino,
            from: c.from,
            to: c.to,
            now: c.now,
            ttl: c.ttl,
        },
        Some(P::CreateSnapshot(c)) => Op::CreateSnapshot {
            name: c.name.clone(),
            now: c.now,
            limit: c.limit,
        },
        Some(P::DeleteSnapshot(c)) => Op::DeleteSnapshot {
            name: c.name.clone(),
        },
        Some(P::Reserve(c)) => Op::Reserve {
            ino: c.ino,
            len: c.len,
        },
        Some(P::Remap(c)) => Op::Remap {
            ino: c.ino,
            ranges: c
                .ranges
                .iter()
                .map(|r| (r.off, r.pieces.iter().map(|e| (e.lun_off, e.len)).collect()))
                .collect(),
        },
    })
}

/// Sets the time of a command that carries one (the leader does this
/// before proposing, so every replica applies the same time).
pub fn stamp(op: &mut proto::VolumeOp, now_ms: u64) {
    use volume_op::Op as P;
    match op.op.as_mut() {
        Some(P::Create(c)) => c.now = now_ms,
        Some(P::Link(c)) => c.now = now_ms,
        Some(P::Unlink(c)) => c.now = now_ms,
        Some(P::Rename(c)) | Some(P::Exchange(c)) => c.now = now_ms,
        Some(P::SetXattr(c)) => c.now = now_ms,
        Some(P::RemoveXattr(c)) => c.now = now_ms,
        Some(P::SetAttr(c)) => c.now = now_ms,
        Some(P::MarkWritten(c)) => c.now = now_ms,
        Some(P::GrantLease(c)) => c.now = now_ms,
        Some(P::Tick(c)) => c.now = now_ms,
        Some(P::HandOver(c)) => c.now = now_ms,
        Some(P::RevokeLease(c)) => c.now = now_ms,
        Some(P::CreateSnapshot(c)) => c.now = now_ms,
        Some(P::Lock(c)) => c.now = now_ms,
        Some(P::Allocate(_))
        | Some(P::Accessed(_))
        | Some(P::UnlockOwner(_))
        | Some(P::DeleteSnapshot(_))
        | Some(P::Reserve(_))
        | Some(P::Remap(_))
        | None => {}
    }
}

/// An inode's attributes as a message.
pub fn attr_to_proto(a: &meta::Attr) -> proto::Attr {
    proto::Attr {
        ino: a.ino,
        kind: kind_code(a.kind) as i32,
        mode: a.mode,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        nlink: a.nlink,
        mtime: a.mtime,
        ctime: a.ctime,
        rdev: a.rdev,
        atime: a.atime,
        xattrs: a.xattrs,
        mtime_sub_ns: a.mtime_ns,
        atime_sub_ns: a.atime_ns,
    }
}

/// A lock from its message (its type aside).
pub fn lock_from_proto(c: &proto::LockOp) -> meta::FileLock {
    meta::FileLock {
        node: c.node,
        owner: c.owner,
        pid: c.pid,
        flock: c.flock,
        start: c.start,
        end: c.end,
        write: c.r#type == proto::LockType::Write as i32,
    }
}

/// A lock of `ino` as a message (a held lock's type: read or write).
pub fn lock_to_proto(ino: u64, l: &meta::FileLock) -> proto::LockOp {
    proto::LockOp {
        ino,
        node: l.node,
        owner: l.owner,
        pid: l.pid,
        flock: l.flock,
        start: l.start,
        end: l.end,
        r#type: if l.write {
            proto::LockType::Write
        } else {
            proto::LockType::Read
        } as i32,
        ..Default::default()
    }
}

/// An inode's extended attributes as a message.
pub fn xattrs_to_proto(x: &meta::Xattrs) -> proto::XattrList {
    proto::XattrList {
        xattrs: x
            .iter()
            .map(|(k, v)| proto::Xattr {
                name: k.clone(),
                value: v.clone(),
            })
            .collect(),
    }
}

/// Extents as a message.
pub fn extents_to_proto(e: &[meta::Extent]) -> proto::ExtentList {
    proto::ExtentList {
        extents: e
            .iter()
            .map(|e| proto::Extent {
                file_off: e.file_off,
                lun_off: e.lun_off,
                len: e.len,
                unwritten: e.unwritten,
                shared: false,
            })
            .collect(),
    }
}

/// A remap command's message.
pub fn remap_to_proto(ino: u64, ranges: &[(u64, Vec<(u64, u64)>)]) -> proto::RemapOp {
    proto::RemapOp {
        ino,
        ranges: ranges
            .iter()
            .map(|(off, pieces)| proto::RemapRange {
                off: *off,
                pieces: pieces
                    .iter()
                    .map(|&(lun_off, len)| proto::Extent {
                        lun_off,
                        len,
                        ..Default::default()
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Extents with their shared flags as a message.
pub fn shared_extents_to_proto(e: &[(meta::Extent, bool)]) -> proto::ExtentList {
    proto::ExtentList {
        extents: e
            .iter()
            .map(|(e, shared)| proto::Extent {
                file_off: e.file_off,
                lun_off: e.lun_off,
                len: e.len,
                unwritten: e.unwritten,
                shared: *shared,
            })
            .collect(),
    }
}

/// A write-lease event as a message.
pub fn lease_event_to_proto(e: &meta::LeaseEvent) -> proto::LeaseEvent {
    proto::LeaseEvent {
        at: e.at,
        ino: e.ino,
        node: e.node,
        epoch: e.epoch,
        change: match e.change {
            meta::LeaseChange::Granted => proto::LeaseChange::Granted,
            meta::LeaseChange::HandedIn { .. } => proto::LeaseChange::HandedIn,
            meta::LeaseChange::Released => proto::LeaseChange::Released,
            meta::LeaseChange::Revoked => proto::LeaseChange::Revoked,
            meta::LeaseChange::HandedOff { .. } => proto::LeaseChange::HandedOff,
            meta::LeaseChange::Expired => proto::LeaseChange::Expired,
        } as i32,
        peer: e.change.peer(),
    }
}

/// A write-lease event from a message (`None`: an unknown change).
pub fn lease_event_from_proto(e: &proto::LeaseEvent) -> Option<meta::LeaseEvent> {
    Some(meta::LeaseEvent {
        at: e.at,
        ino: e.ino,
        node: e.node,
        epoch: e.epoch,
        change: match e.change() {
            proto::LeaseChange::Unspecified => return None,
            proto::LeaseChange::Granted => meta::LeaseChange::Granted,
            proto::LeaseChange::HandedIn => meta::LeaseChange::HandedIn { from: e.peer },
            proto::LeaseChange::Released => meta::LeaseChange::Released,
            proto::LeaseChange::Revoked => meta::LeaseChange::Revoked,
            proto::LeaseChange::HandedOff => meta::LeaseChange::HandedOff { to: e.peer },
            proto::LeaseChange::Expired => meta::LeaseChange::Expired,
        },
    })
}

/// Extents from a message.
pub fn extents_from_proto(e: &proto::ExtentList) -> Vec<meta::Extent> {
    e.extents
        .iter()
        .map(|e| meta::Extent {
            file_off: e.file_off,
            lun_off: e.lun_off,
            len: e.len,
            unwritten: e.unwritten,
        })
        .collect()
}

/// A state machine reply as a message.
pub fn reply_to_proto(r: &meta::Reply) -> proto::Reply {
    use proto::reply::Value;
    let v = match r {
        meta::Reply::Ok => Value::Done(proto::Empty {}),
        meta::Reply::Attr(a) => Value::Attr(attr_to_proto(a)),
        meta::Reply::Extents(e) => Value::Extents(extents_to_proto(e)),
        meta::Reply::Lease(l) => Value::Lease(lease_to_proto(l)),
        meta::Reply::Created(a, l) => Value::Created(proto::CreatedFile {
            attr: Some(attr_to_proto(a)),
            lease: Some(lease_to_proto(l)),
        }),
    };
    proto::Reply::of(v)
}

/// A lease as a message (its holder left out).
fn lease_to_proto(l: &meta::Lease) -> proto::Lease {
    proto::Lease {
        node: 0,
        epoch: l.epoch,
        expires: l.expires,
        write: l.write,
    }
}

/// A state machine error as a message.
pub fn meta_error_to_proto(e: &MetaError) -> proto::Error {
    let (code, node) = match e {
        MetaError::NotFound => (ErrorCode::NotFound, 0),
        MetaError::Exists => (ErrorCode::Exists, 0),
        MetaError::NotDir => (ErrorCode::NotDir, 0),
        MetaError::IsDir => (ErrorCode::IsDir, 0),
        MetaError::NotEmpty => (ErrorCode::NotEmpty, 0),
        MetaError::Invalid(_) => (ErrorCode::Invalid, 0),
        MetaError::Loop => (ErrorCode::Loop, 0),
        MetaError::NoSpace => (ErrorCode::NoSpace, 0),
        MetaError::Busy(n) => (ErrorCode::Busy, *n),
        MetaError::NoData => (ErrorCode::NoData, 0),
        MetaError::TooBig(_) => (ErrorCode::TooBig, 0),
        MetaError::WouldBlock(l) => (ErrorCode::WouldBlock, l.node),
        MetaError::Deadlock(l) => (ErrorCode::Deadlock, l.node),
    };
    proto::Error {
        code: code as i32,
        message: e.to_string(),
        node,
    }
}

/// A volume command as a message (the inverse of [`op_from_proto`]).
pub fn op_to_proto(op: &Op) -> proto::VolumeOp {
    use volume_op::Op as P;
    let p = match op.clone() {
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
        } => P::Create(proto::CreateOp {
            parent,
            name,
            kind: kind_code(kind) as i32,
            mode,
            uid,
            gid,
            target,
            rdev,
            umask,
            now,
            lease_node: lease.map_or(0, |l| l.0),
            lease_ttl: lease.map_or(0, |l| l.1),
        }),
        Op::Link {
            ino,
            parent,
            name,
            now,
        } => P::Link(proto::LinkOp {
            ino,
            parent,
            name,
            now,
        }),
        Op::Unlink {
            parent,
            name,
            rmdir,
            now,
        } => P::Unlink(proto::UnlinkOp {
            parent,
            name,
            rmdir,
            now,
        }),
        Op::Rename {
            parent,
            name,
            new_parent,
            new_name,
            now,
        } => P::Rename(proto::RenameOp {
            parent,
            name,
            new_parent,
            new_name,
            now,
        }),
        Op::Exchange {
            parent,
            name,
            new_parent,
            new_name,
            now,
        } => P::Exchange(proto::RenameOp {
            parent,
            name,
            new_parent,
            new_name,
            now,
        }),
        Op::SetXattr {
            ino,
            name,
            value,
            how,
            now,
        } => P::SetXattr(proto::SetXattrOp {
            ino,
            name,
            value,
            how: xattr_set_code(how) as i32,
            now,
        }),
        Op::Accessed { times } => P::Accessed(proto::AccessedOp {
            times: times
                .into_iter()
                .map(|(ino, atime)| proto::AccessTime { ino, atime })
                .collect(),
        }),
        Op::RemoveXattr { ino, name, now } => {
            P::RemoveXattr(proto::RemoveXattrOp { ino, name, now })
        }
        Op::Lock {
            ino,
            lock,
            typ,
            wait,
        } => P::Lock(proto::LockOp {
            wait: wait.is_some(),
            now: wait.unwrap_or(0),
            r#type: match typ {
                meta::LockType::Read => proto::LockType::Read,
                meta::LockType::Write => proto::LockType::Write,
                meta::LockType::Unlock => proto::LockType::Unlock,
            } as i32,
            ..lock_to_proto(ino, &lock)
        }),
        Op::UnlockOwner {
            ino,
            node,
            owner,
            flock,
        } => P::UnlockOwner(proto::LockOp {
            ino,
            node,
            owner,
            flock,
            ..Default::default()
        }),
        Op::SetAttr {
            ino,
            mode,
            uid,
            gid,
            size,
            mtime,
            atime,
            now,
        } => P::SetAttr(proto::SetAttrOp {
            ino,
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(|t| t.0),
            atime: atime.map(|t| t.0),
            now,
            mtime_sub_ns: mtime.map_or(0, |t| t.1),
            atime_sub_ns: atime.map_or(0, |t| t.1),
        }),
        Op::Allocate { ino, off, len } => P::Allocate(proto::AllocateOp { ino, off, len }),
        Op::MarkWritten {
            ino,
            off,
            len,
            size,
            now,
            more,
        } => P::MarkWritten(proto::MarkWrittenOp {
            ino,
            off,
            len,
            size,
            now,
            more: more
                .into_iter()
                .map(|(off, len)| proto::WrittenRange { off, len })
                .collect(),
        }),
        Op::GrantLease {
            node,
            ino,
            write,
            now,
            ttl,
        } => P::GrantLease(proto::GrantLeaseOp {
            node,
            ino,
            write,
            now,
            ttl,
        }),
        Op::RevokeLease {
            node,
            ino,
            now,
            revoked,
        } => P::RevokeLease(proto::RevokeLeaseOp {
            node,
            ino,
            now,
            revoked,
        }),
        Op::Tick { now } => P::Tick(proto::TickOp { now }),
        Op::HandOver {
            ino,
            from,
            to,
            now,
            ttl,
        } => P::HandOver(proto::HandOverOp {
            ino,
            from,
            to,
            now,
            ttl,
        }),
        Op::CreateSnapshot { name, now, limit } => {
            P::CreateSnapshot(proto::SnapshotOp { name, now, limit })
        }
        Op::DeleteSnapshot { name } => P::DeleteSnapshot(proto::SnapshotOp {
            name,
            ..Default::default()
        }),
        Op::Reserve { ino, len } => P::Reserve(proto::ReserveOp { ino, len }),
        Op::Remap { ino, ranges } => P::Remap(remap_to_proto(ino, &ranges)),
    };
    proto::VolumeOp { op: Some(p) }
}
