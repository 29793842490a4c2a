//! The operations a kernel transport asks of a volume: names, attributes,
//! opening and closing, directories, space. Each is one or a few calls
//! to the coordinator; reads and writes are in [`super::read`] and
//! [`super::write`].

use super::errno::{io_errno, name_of};
use super::lease::Lease;
use super::{DirEntry, OpenDir, VolumeFs, LEASE_TTL};
use coordinator::meta::is_snapshot_ino;
use coordinator::proto::{self, volume_op, NodeKind};
use fuser::Errno;
use std::ffi::OsStr;
use std::time::Duration;
use vhd::BlockIo as _;

/// How long a flush (every close of a descriptor) waits for the
/// coordinator to take this host's writes before it leaves them to the
/// file's fsync or last close.
const FLUSH_PATIENCE: Duration = Duration::from_secs(1);

/// Who asks: the caller's user and group (they own what it creates),
/// and its umask when the volume is to apply it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// The caller's umask, for the coordinator to apply in the create
    /// (a directory's default ACL is inherited instead, in the same
    /// command). None: the mode given is final.
    pub umask: Option<u32>,
}

/// Attributes to change (None: unchanged).
#[derive(Debug, Clone, Copy, Default)]
pub struct AttrChange {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (a truncate or an extension).
    pub size: Option<u64>,
    /// Modification time (ms since the epoch, and nanoseconds within
    /// the millisecond).
    pub mtime: Option<(u64, u32)>,
    /// Access time (the same).
    pub atime: Option<(u64, u32)>,
}

/// Space and inodes, as `statfs` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceUse {
    /// Block size.
    pub block: u64,
    /// Blocks in the data area.
    pub blocks: u64,
    /// Free blocks.
    pub free: u64,
    /// Inodes there may be.
    pub files: u64,
    /// Inodes free.
    pub files_free: u64,
}

/// An extended attribute's name: UTF-8 and not longer than Linux allows
/// (ERANGE, as Linux answers a name too long).
fn xattr_name(name: &OsStr) -> Result<&str, Errno> {
    let s = name.to_str().ok_or(Errno::EINVAL)?;
    if s.len() > coordinator::meta::XATTR_NAME_MAX {
        return Err(Errno::ERANGE);
    }
    Ok(s)
}

/// Snapshot files and `.snapshots` are read-only.
fn writable(ino: u64) -> Result<(), Errno> {
    if is_snapshot_ino(ino) {
        Err(Errno::EROFS)
    } else {
        Ok(())
    }
}

impl VolumeFs {
    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<proto::Attr, Errno> {
        // The kernel looks "." up to open a file by its handle
        // (`open_by_handle_at`, an NFS export): the inode itself, or
        // ESTALE once it is gone (inode numbers are never reused).
        if name == "." {
            return self.getattr(parent);
        }
        let n = name_of(name)?;
        let vol = self.vol;
        self.call(|c| c.lookup(vol, parent, n))
    }

    /// The attributes of `ino`. A file or directory removed while open
    /// here still has its own, its link count 0 (`fstat`); an inode gone
    /// and not open here is stale (ESTALE has the kernel look its path up
    /// again: another host removed or renamed over its name).
    pub fn getattr(&self, ino: u64) -> Result<proto::Attr, Errno> {
        let vol = self.vol;
        match self.call(|c| c.getattr(vol, ino)) {
            Err(Errno::ENOENT) => {
                let file = || {
                    self.file(ino)
                        .and_then(|f| f.lock().ok().map(|g| proto::Attr { nlink: 0, ..g.attr }))
                };
                // (The kernel names the handle for files only: a
                // directory open here is found by its inode.)
                let dir = || {
                    let d = self.dirs.lock().ok()?;
                    let a = d
                        .values()
                        .find_map(|o| o.attr.as_ref().filter(|a| a.ino == ino))?;
                    Some(proto::Attr { nlink: 0, ..*a })
                };
                file().or_else(dir).ok_or(Errno::ESTALE)
            }
            Ok(mut a) => {
                // An access time a read moved here, not yet sent.
                if let Some(t) = self.atimes.lock().ok().and_then(|m| m.get(&ino).copied()) {
                    if t > a.atime {
                        (a.atime, a.atime_sub_ns) = (t, 0);
                    }
                }
                Ok(a)
            }
            r => r,
        }
    }

    /// Changes attributes; a size change waits while a snapshot freezes
    /// the volume, and reports this host's writes first.
    pub fn setattr(&self, ino: u64, ch: AttrChange) -> Result<proto::Attr, Errno> {
        writable(ino)?;
        let _in_progress = ch.size.map(|_| self.gate.enter(None)).transpose()?;
        let open = self.file(ino);
        if let (Some(f), Some(_)) = (&open, ch.size) {
            if let Ok(mut g) = f.lock() {
                self.report(ino, &mut g)?;
            }
        }
        let op = |sub_ns: bool| {
            volume_op::Op::SetAttr(proto::SetAttrOp {
                ino,
                mode: ch.mode.map(|m| m & 0o7777),
                uid: ch.uid,
                gid: ch.gid,
                size: ch.size,
                now: 0,
                mtime: ch.mtime.map(|t| t.0),
                atime: ch.atime.map(|t| t.0),
                mtime_sub_ns: if sub_ns {
                    ch.mtime.map_or(0, |t| t.1)
                } else {
                    0
                },
                atime_sub_ns: if sub_ns {
                    ch.atime.map_or(0, |t| t.1)
                } else {
                    0
                },
            })
        };
        let a = match self.op_attr(op(true)) {
            // A cluster below feature level 3 keeps times to the
            // millisecond.
            Err(Errno::EOPNOTSUPP) if ch.atime.is_none() => self.op_attr(op(false)),
            r => r,
        }?;
        if let (Some(f), Some(_)) = (&open, ch.mode) {
            if let Ok(mut g) = f.lock() {
                g.attr.mode = a.mode;
            }
        }
        if let (Some(f), Some(s)) = (&open, ch.size) {
            if let Ok(mut g) = f.lock() {
                g.size = s;
                g.size_reported = s;
                g.extents.truncate(s);
                g.dirty.retain(|&(o, _)| o < s);
            }
        }
        Ok(a)
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<String, Errno> {
        let vol = self.vol;
        match self.call(|c| c.read(vol, proto::read::Query::ReadLink(ino)))? {
            proto::Reply {
                value: Some(proto::reply::Value::Text(t)),
            } => Ok(t),
            _ => Err(Errno::EIO),
        }
    }

    /// Makes a file, a directory or a symlink (`target`); for a file with
    /// `lease`, this host's write lease comes in the same command (one
    /// commit where create and open took two) when the cluster's feature
    /// level allows it, and from a grant after it otherwise.
    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        kind: NodeKind,
        (mode, rdev): (u32, u32),
        target: &str,
        lease: bool,
    ) -> Result<(proto::Attr, Option<Lease>), Errno> {
        writable(parent)?;
        let name = name_of(name)?;
        let op = |lease: bool, umask: Option<u32>| {
            volume_op::Op::Create(proto::CreateOp {
                parent,
                name: name.into(),
                kind: kind as i32,
                // With the umask the coordinator applies it (or the
                // directory's default ACL); without it, it is applied here.
                mode: match (umask, who.umask) {
                    (None, Some(u)) => mode & 0o7777 & !u,
                    _ => mode & 0o7777,
                },
                uid: who.uid,
                gid: who.gid,
                target: target.into(),
                rdev,
                umask,
                now: 0,
                lease_node: if lease { self.node } else { 0 },
                lease_ttl: if lease {
                    LEASE_TTL.as_millis() as u64
                } else {
                    0
                },
            })
        };
        let vol = self.vol;
        let r = match self
            .clients
            .with(|c| c.volume_op(vol, op(lease, who.umask)))
        {
            // A cluster with a host of an older build: the umask applied
            // here (no ACL inheritance), a create and then a grant.
            Err(e) if e.code() == Some(proto::ErrorCode::FeatureLevel) => {
                match self.clients.with(|c| c.volume_op(vol, op(lease, None))) {
                    Err(e) if e.code() == Some(proto::ErrorCode::FeatureLevel) => {
                        self.op(op(false, None))?
                    }
                    r => r.map_err(|e| super::errno::errno(&e))?,
                }
            }
            r => r.map_err(|e| super::errno::errno(&e))?,
        };
        match r.value {
            Some(proto::reply::Value::Attr(a)) => Ok((a, None)),
            Some(proto::reply::Value::Created(proto::CreatedFile {
                attr: Some(a),
                lease: Some(l),
            })) => Ok((a, Some(Lease::granted(&l)))),
            _ => Err(Errno::EIO),
        }
    }

    /// Makes a directory, a regular file (not opened) or a symlink.
    pub fn make(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        kind: NodeKind,
        mode: u32,
        target: &str,
    ) -> Result<proto::Attr, Errno> {
        self.create_node(who, parent, name, kind, (mode, 0), target, false)
            .map(|(a, _)| a)
    }

    /// Makes a FIFO, a socket's name or a device node (`rdev`): metadata
    /// every host sees; a FIFO's or socket's data stays within one host.
    pub fn make_special(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        kind: NodeKind,
        mode: u32,
        rdev: u32,
    ) -> Result<proto::Attr, Errno> {
        self.create_node(who, parent, name, kind, (mode, rdev), "", false)
            .map(|(a, _)| a)
    }

    /// Creates a file and opens it (for writing with `write`): its
    /// attributes and handle.
    pub fn create(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        write: bool,
    ) -> Result<(proto::Attr, u64), Errno> {
        // The write lease with the file, unless the file is opened through
        // the coordinator (FileSystemRedirected), which takes its own.
        let lease = write && self.fs_redirector().is_none();
        let (a, granted) =
            self.create_node(who, parent, name, NodeKind::File, (mode, 0), "", lease)?;
        let fh = match self.remote_open(a.ino, write) {
            Some(r) => {
                if granted.is_some() {
                    // Redirected meanwhile: the lease taken here is not
                    // the one the file is open under.
                    self.revoke(a.ino);
                }
                r
            }
            None => self.open_file_as(a.ino, write, Some(&a), granted),
        }?;
        Ok((a, fh))
    }

    /// Opens `ino` (for writing with `write`): its handle. An inode gone
    /// since the kernel looked it up is stale (ESTALE: an open races a
    /// rename-over as on a local filesystem, the old file or the new,
    /// never ENOENT).
    pub fn open(&self, ino: u64, write: bool) -> Result<u64, Errno> {
        if write {
            writable(ino)?;
        }
        let r = self
            .remote_open(ino, write)
            .unwrap_or_else(|| self.open_file(ino, write));
        match r {
            Err(Errno::ENOENT) => Err(Errno::ESTALE),
            r => r,
        }
    }

    /// Removes a name (`rmdir` for a directory).
    pub fn remove(&self, parent: u64, name: &OsStr, rmdir: bool) -> Result<(), Errno> {
        writable(parent)?;
        let n = name_of(name)?;
        let vol = self.vol;
        self.call(|c| c.unlink(vol, parent, n, rmdir))
    }

    /// Renames; with `noreplace`, fails if the new name exists.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        writable(parent)?;
        writable(new_parent)?;
        let (n, nn) = (name_of(name)?, name_of(new_name)?);
        let vol = self.vol;
        if noreplace && self.call(|c| c.lookup(vol, new_parent, nn)).is_ok() {
            return Err(Errno::EEXIST);
        }
        self.call(|c| c.rename(vol, parent, n, new_parent, nn))
    }

    /// Swaps two names atomically (`RENAME_EXCHANGE`).
    pub fn exchange(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
    ) -> Result<(), Errno> {
        writable(parent)?;
        writable(new_parent)?;
        let (n, nn) = (name_of(name)?, name_of(new_name)?);
        self.op(volume_op::Op::Exchange(proto::RenameOp {
            parent,
            name: n.into(),
            new_parent,
            new_name: nn.into(),
            now: 0,
        }))
        .map(|_| ())
    }

    /// The extended attributes of `ino`, in name order.
    pub fn xattrs(&self, ino: u64) -> Result<Vec<proto::Xattr>, Errno> {
        let vol = self.vol;
        match self.call(|c| c.read(vol, proto::read::Query::Xattrs(ino)))? {
            proto::Reply {
                value: Some(proto::reply::Value::Xattrs(l)),
            } => Ok(l.xattrs),
            _ => Err(Errno::EIO),
        }
    }

    /// Whether `ino`, open on this host, had no extended attribute when
    /// this host last heard (the kernel asks for `security.capability`
    /// at every write; that need not go to the coordinator).
    pub fn known_without_xattrs(&self, ino: u64) -> bool {
        self.file(ino)
            .and_then(|f| f.lock().ok().map(|g| g.attr.xattrs == 0))
            .unwrap_or(false)
    }

    /// Sets extended attribute `name` of `ino`.
    pub fn set_xattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        how: proto::XattrSet,
    ) -> Result<(), Errno> {
        writable(ino)?;
        let n = xattr_name(name)?;
        let a = self.op_attr(volume_op::Op::SetXattr(proto::SetXattrOp {
            ino,
            name: n.into(),
            value: value.to_vec(),
            how: how as i32,
            now: 0,
        }))?;
        self.note_xattrs(ino, a.xattrs);
        Ok(())
    }

    /// Removes extended attribute `name` of `ino`.
    pub fn remove_xattr(&self, ino: u64, name: &OsStr) -> Result<(), Errno> {
        writable(ino)?;
        let n = xattr_name(name)?;
        let a = self.op_attr(volume_op::Op::RemoveXattr(proto::RemoveXattrOp {
            ino,
            name: n.into(),
            now: 0,
        }))?;
        self.note_xattrs(ino, a.xattrs);
        Ok(())
    }

    /// Keeps an open file's count of extended attributes current.
    fn note_xattrs(&self, ino: u64, n: u32) {
        if let Some(f) = self.file(ino) {
            if let Ok(mut g) = f.lock() {
                g.attr.xattrs = n;
            }
        }
    }

    /// Gives `ino` a new name.
    pub fn link(&self, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<proto::Attr, Errno> {
        writable(new_parent)?;
        let n = name_of(new_name)?;
        self.op_attr(volume_op::Op::Link(proto::LinkOp {
            ino,
            parent: new_parent,
            name: n.into(),
            now: 0,
        }))
    }

    /// A flush comes with every close of a descriptor, also of a copy
    /// that a child closes when it execs. Reporting here (for other hosts
    /// to see this one's writes after its close) is a courtesy that fsync
    /// and the last close do in any case; while the LUN or the
    /// coordinator is out of reach it would wait for them, and hang every
    /// fork and exec of a process with the file open. So not while the LUN
    /// is, and not for long when the coordinator does not answer: what is
    /// not reported stays for fsync and the last close.
    pub fn flush(&self, ino: u64, fh: u64) -> Result<(), Errno> {
        if let Some((r, h)) = self.remote(fh) {
            return r.sync(h);
        }
        if self.in_outage() {
            return Ok(());
        }
        let r = match self.file(ino) {
            Some(f) => match f.lock() {
                Ok(mut g) if g.writers > 0 => self.report_within(ino, &mut g, Some(FLUSH_PATIENCE)),
                _ => Ok(()),
            },
            None => Ok(()),
        };
        match r {
            Err(Errno::ETIMEDOUT) => {
                tracing::warn!(
                    ino,
                    "flush: the coordinator did not answer within {FLUSH_PATIENCE:?}; this file's latest writes are reported at its fsync or last close"
                );
                Ok(())
            }
            r => r,
        }
    }

    /// Closes handle `fh`.
    pub fn release(&self, fh: u64) -> Result<(), Errno> {
        if let Some((r, _)) = self.remote(fh) {
            return r.release(fh);
        }
        self.release_handle(fh)
    }

    /// Makes `ino`'s data and size durable and known to the coordinator.
    pub fn fsync(&self, ino: u64, fh: u64) -> Result<(), Errno> {
        if let Some((r, h)) = self.remote(fh) {
            return r.sync(h);
        }
        match self.file(ino) {
            Some(f) => match f.lock() {
                Ok(mut g) => self
                    .lun
                    .flush()
                    .map_err(|e| io_errno(&e))
                    .and_then(|()| self.report(ino, &mut g)),
                Err(_) => Err(Errno::EIO),
            },
            None => self.lun.flush().map_err(|e| io_errno(&e)),
        }
    }

    /// Lists directory `ino` (with `.` and `..`): the listing's handle.
    pub fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        let dir = self.list_dir(ino)?;
        let fh = self.next_handle();
        if let Ok(mut d) = self.dirs.lock() {
            d.insert(fh, dir);
        }
        Ok(fh)
    }

    /// Directory `ino`'s entries (with `.` and `..`) and attributes now.
    fn list_dir(&self, ino: u64) -> Result<OpenDir, Errno> {
        let vol = self.vol;
        let changes = self.changes.load(std::sync::atomic::Ordering::Relaxed);
        let listing = self.call(|c| c.listing(vol, ino))?;
        let mut list: Vec<DirEntry> = vec![
            (ino, NodeKind::Directory, ".".to_string()),
            (ino, NodeKind::Directory, "..".to_string()),
        ];
        for e in listing.entries {
            list.push((e.ino, e.kind(), e.name));
        }
        Ok(OpenDir {
            ino,
            list,
            attr: listing.dir,
            read: false,
            changes,
        })
    }

    /// Hands the entries of listing `fh` from `offset` on to `add` (its
    /// arguments: inode, the next entry's offset, kind, name) until it
    /// says it is full. Reading from the start again (`rewinddir`), or
    /// for the first time after this host changed any metadata since the
    /// listing, lists the directory anew, as POSIX asks of `rewinddir`:
    /// names made since it was opened are seen.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, NodeKind, &str) -> bool,
    ) -> Result<(), Errno> {
        let again = {
            let d = self.dirs.lock().map_err(|_| Errno::EIO)?;
            let dir = d.get(&fh).ok_or(Errno::EBADF)?;
            let stale =
                dir.read || dir.changes != self.changes.load(std::sync::atomic::Ordering::Relaxed);
            (offset == 0 && stale).then_some(dir.ino)
        };
        if let Some(ino) = again {
            let fresh = self.list_dir(ino)?;
            if let Ok(mut d) = self.dirs.lock() {
                d.insert(fh, fresh);
            }
        }
        let mut d = self.dirs.lock().map_err(|_| Errno::EIO)?;
        let dir = d.get_mut(&fh).ok_or(Errno::EBADF)?;
        dir.read = true;
        for (i, (ino, kind, name)) in dir.list.iter().enumerate().skip(offset as usize) {
            if add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    /// Forgets listing `fh`.
    pub fn releasedir(&self, fh: u64) {
        if let Ok(mut d) = self.dirs.lock() {
            d.remove(&fh);
        }
    }

    /// The volume's space and inodes.
    pub fn statfs(&self) -> Result<SpaceUse, Errno> {
        let vol = self.vol;
        let u = self.call(|c| c.usage(vol))?;
        let block = 4096u64;
        let files = u.inodes + (1 << 32);
        Ok(SpaceUse {
            block,
            blocks: self.capacity / block,
            free: u.free / block,
            files,
            files_free: files - u.inodes,
        })
    }

    /// Allocates `[offset, offset + length)` of open file `ino`; the size
    /// grows unless `keep_size`.
    pub fn fallocate(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        keep_size: bool,
    ) -> Result<(), Errno> {
        if self.remote(fh).is_some() {
            // Not forwarded (yet): preallocation needs the file open here.
            return Err(Errno::EOPNOTSUPP);
        }
        let file = self.file(ino).ok_or(Errno::EBADF)?;
        let _in_progress = self.gate.enter(None)?;
        let mut f = file.lock().map_err(|_| Errno::EIO)?;
        if f.fenced || !f.lease.as_ref().is_some_and(|l| l.write) {
            return Err(Errno::EBADF);
        }
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        self.ensure_space(ino, &mut f, offset, length)?;
        if !keep_size && end > f.size {
            f.size = end;
            self.report(ino, &mut f)?;
        }
        Ok(())
    }
}
