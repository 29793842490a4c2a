//! The FUSE adapter: fuser's `Filesystem` over a [`VolumeFs`], and the
//! kernel mount. It turns the kernel's requests into volume operations
//! and their answers into replies; the volume logic knows nothing of
//! FUSE (as fuser keeps its `ll/` protocol layer apart).
//!
//! - [`readers`]: which of a mount's FUSE threads read requests;
//! - [`mount`]: the kernel mount of a volume, and the guard under it.

pub mod mount;
pub mod readers;

use crate::volume::errno::{ms_ns_to_time, ms_to_time};
use crate::volume::locks::Range;
use crate::volume::ops::{AttrChange, Caller};
use crate::volume::VolumeFs;
use coordinator::proto::{self, NodeKind};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use readers::Readers;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Attributes and names are not cached by the kernel: what one host
/// changed, the next call on any host sees.
const TTL: Duration = Duration::ZERO;

/// Reader turns per mount when none are set.
const DEFAULT_READERS: usize = 2;

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Directory => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
        NodeKind::Socket => FileType::Socket,
    }
}

/// The kernel's view of an inode's attributes.
fn fattr(a: &proto::Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: ms_ns_to_time(a.atime, a.atime_sub_ns),
        mtime: ms_ns_to_time(a.mtime, a.mtime_sub_ns),
        ctime: ms_to_time(a.ctime),
        crtime: ms_to_time(a.ctime),
        kind: file_type(a.kind()),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn open_flags(flags: i32) -> FopenFlags {
    if flags & libc::O_DIRECT != 0 {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

/// A time `utimensat` gives: ms since the epoch and nanoseconds within
/// the millisecond.
fn time_ms(t: TimeOrNow) -> (u64, u32) {
    let t = match t {
        TimeOrNow::Now => SystemTime::now(),
        TimeOrNow::SpecificTime(t) => t,
    };
    crate::volume::errno::time_to_ms_ns(t)
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// Answers a getxattr or listxattr: its size when asked for the size
/// (`size` 0), ERANGE when the caller's buffer is too small.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// A volume as fuser serves it (fuser wants the filesystem by value).
#[derive(Debug, Clone)]
pub struct Mounted {
    fs: Arc<VolumeFs>,
    readers: Arc<Readers>,
}

impl Mounted {
    /// `fs` with `readers` FUSE threads reading requests at a time (see
    /// [`readers::Readers`]).
    pub fn new(fs: Arc<VolumeFs>, readers: usize) -> Mounted {
        Mounted {
            fs,
            readers: Arc::new(Readers::new(if readers == 0 {
                DEFAULT_READERS
            } else {
                readers
            })),
        }
    }

    fn entry(&self, reply: ReplyEntry, r: Result<proto::Attr, Errno>) {
        match r {
            Ok(a) => reply.entry(&TTL, &fattr(&self.fs.shown(a)), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn attr(&self, reply: ReplyAttr, r: Result<proto::Attr, Errno>) {
        match r {
            Ok(a) => reply.attr(&TTL, &fattr(&self.fs.shown(a))),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for Mounted {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // Many requests in flight: asynchronous direct I/O (a VM's queue
        // depth reaches the LUN), and lookups in one directory in parallel.
        // POSIX ACLs checked by the kernel from their extended attributes;
        // the umask comes to the volume, which applies it or a directory's
        // default ACL in the create.
        for f in [
            fuser::InitFlags::FUSE_ASYNC_DIO,
            fuser::InitFlags::FUSE_PARALLEL_DIROPS,
            fuser::InitFlags::FUSE_POSIX_ACL,
            fuser::InitFlags::FUSE_DONT_MASK,
            // Locks are the cluster's (volume::locks), not each kernel's.
            fuser::InitFlags::FUSE_POSIX_LOCKS,
            fuser::InitFlags::FUSE_FLOCK_LOCKS,
            // A file opened with O_DIRECT (served with direct I/O) can
            // still be mapped, as on a kernel file system.
            fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            // Files can be opened by handle (`open_by_handle_at`, knfsd):
            // the kernel looks "." up in an inode it no longer holds.
            fuser::InitFlags::FUSE_EXPORT_SUPPORT,
        ] {
            let _ = config.add_capabilities(f);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _turn = self.readers.turn(true);
        self.entry(reply, self.fs.lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _turn = self.readers.turn(true);
        self.attr(reply, self.fs.getattr(ino.0));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _turn = self.readers.turn(true);
        let ch = AttrChange {
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(time_ms),
            atime: atime.map(time_ms),
        };
        self.attr(reply, self.fs.setattr(ino.0, ch));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _turn = self.readers.turn(true);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
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
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _turn = self.readers.turn(true);
        let who = Caller {
            uid: req.uid(),
            gid: req.gid(),
            umask: Some(umask),
        };
        let perm = mode;
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => {
                let r = self.fs.make(who, parent.0, name, NodeKind::File, perm, "");
                return self.entry(reply, r);
            }
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFCHR => NodeKind::CharDevice,
            libc::S_IFBLK => NodeKind::BlockDevice,
            libc::S_IFSOCK => NodeKind::Socket,
            _ => return reply.error(Errno::EINVAL),
        };
        let r = self.fs.make_special(who, parent.0, name, kind, perm, rdev);
        self.entry(reply, r);
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
        let _turn = self.readers.turn(true);
        let who = Caller {
            uid: req.uid(),
            gid: req.gid(),
            umask: Some(umask),
        };
        let r = self
            .fs
            .make(who, parent.0, name, NodeKind::Directory, mode, "");
        self.entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.readers.turn(true);
        reply_empty(reply, self.fs.remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.readers.turn(true);
        reply_empty(reply, self.fs.remove(parent.0, name, true));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _turn = self.readers.turn(true);
        let Some(t) = target.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        let who = Caller {
            uid: req.uid(),
            gid: req.gid(),
            umask: None,
        };
        let r = self
            .fs
            .make(who, parent.0, link_name, NodeKind::Symlink, 0o777, t);
        self.entry(reply, r);
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
        let _turn = self.readers.turn(true);
        // A whiteout (for overlay file systems' upper layers) is not
        // made: refused, as by file systems without it, rather than
        // done as a plain rename.
        if flags.contains(RenameFlags::RENAME_WHITEOUT)
            || !(RenameFlags::RENAME_EXCHANGE
                | RenameFlags::RENAME_NOREPLACE
                | RenameFlags::RENAME_WHITEOUT)
                .contains(flags)
        {
            return reply.error(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return reply.error(Errno::EINVAL);
            }
            return reply_empty(
                reply,
                self.fs.exchange(parent.0, name, newparent.0, newname),
            );
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        reply_empty(
            reply,
            self.fs
                .rename(parent.0, name, newparent.0, newname, noreplace),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _turn = self.readers.turn(true);
        self.entry(reply, self.fs.link(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _turn = self.readers.turn(true);
        let write = (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY;
        match self.fs.open(ino.0, write) {
            Ok(fh) => reply.opened(FileHandle(fh), open_flags(flags.0)),
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
        let _turn = self.readers.turn(true);
        let write = (flags & libc::O_ACCMODE) != libc::O_RDONLY;
        let who = Caller {
            uid: req.uid(),
            gid: req.gid(),
            umask: Some(umask),
        };
        match self.fs.create(who, parent.0, name, mode, write) {
            Ok((a, fh)) => reply.created(
                &TTL,
                &fattr(&self.fs.shown(a)),
                Generation(0),
                FileHandle(fh),
                open_flags(flags),
            ),
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
        let turn = self.readers.turn(false);
        let done = Box::new(move |r: Result<&[u8], Errno>| match r {
            Ok(b) => reply.data(b),
            Err(e) => reply.error(e),
        });
        self.fs.read(ino.0, fh.0, offset, size, &turn, done);
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let turn = self.readers.turn(false);
        self.fs.remove_privs(ino.0, req.uid());
        let done = Box::new(move |r: Result<u32, Errno>| match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        });
        self.fs.write(ino.0, fh.0, offset, data, &turn, done);
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let _turn = self.readers.turn(true);
        // A close: the closing process's record locks on the file go.
        self.fs.release_locks(ino.0, lock_owner.0);
        reply_empty(reply, self.fs.flush(ino.0, fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.readers.turn(true);
        // The open file's flock and OFD locks go with it.
        if let Some(o) = lock_owner {
            self.fs.release_locks(ino.0, o.0);
        }
        self.fs.release_handle_locks(ino.0, fh.0);
        reply_empty(reply, self.fs.release(fh.0));
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: fuser::LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let _turn = self.readers.turn(true);
        match self
            .fs
            .getlk(ino.0, lock_owner.0, pid, Range { start, end, typ })
        {
            Ok(Some((r, holder))) => reply.locked(r.start, r.end, r.typ, holder),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(e),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: fuser::LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.readers.turn(true);
        let r = Range { start, end, typ };
        // The request's header names the calling thread (a signal for it
        // ends a wait); the lock's pid is its process (what F_GETLK shows).
        let waiter = sleep.then(|| req.pid());
        reply_empty(
            reply,
            self.fs.setlk((ino.0, fh.0), lock_owner.0, pid, r, waiter),
        );
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.readers.turn(true);
        reply_empty(reply, self.fs.fsync(ino.0, fh.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _turn = self.readers.turn(true);
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _turn = self.readers.turn(true);
        let r = self.fs.readdir(fh.0, offset, |ino, next, kind, name| {
            reply.add(INodeNo(ino), next, file_type(kind), name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _turn = self.readers.turn(true);
        self.fs.releasedir(fh.0);
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
        let _turn = self.readers.turn(true);
        // Namespace changes are committed to a quorum before they return.
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _turn = self.readers.turn(true);
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.free,
                s.free,
                s.files,
                s.files_free,
                s.block as u32,
                255,
                s.block as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        let _turn = self.readers.turn(true);
        if position != 0 {
            return reply.error(Errno::EINVAL);
        }
        let how = match flags {
            0 => proto::XattrSet::Any,
            libc::XATTR_CREATE => proto::XattrSet::Create,
            libc::XATTR_REPLACE => proto::XattrSet::Replace,
            _ => return reply.error(Errno::EINVAL),
        };
        reply_empty(reply, self.fs.set_xattr(ino.0, name, value, how));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _turn = self.readers.turn(true);
        if name == "security.capability" && self.fs.known_without_xattrs(ino.0) {
            return reply.error(Errno::ENODATA);
        }
        let found = self.fs.xattrs(ino.0).map(|l| {
            l.into_iter()
                .find(|x| x.name.as_bytes() == name.as_encoded_bytes())
        });
        match found {
            Ok(Some(x)) => reply_xattr(reply, size, &x.value),
            Ok(None) => reply.error(Errno::ENODATA),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _turn = self.readers.turn(true);
        match self.fs.xattrs(ino.0) {
            Ok(l) => {
                let mut names = Vec::new();
                for x in l {
                    names.extend_from_slice(x.name.as_bytes());
                    names.push(0);
                }
                reply_xattr(reply, size, &names);
            }
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.readers.turn(true);
        reply_empty(reply, self.fs.remove_xattr(ino.0, name));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let _turn = self.readers.turn(false);
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
        let _turn = self.readers.turn(true);
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        reply_empty(reply, self.fs.fallocate(ino.0, fh.0, offset, length, keep));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_reach_the_kernel_as_they_are() {
        let a = proto::Attr {
            ino: 42,
            kind: NodeKind::Symlink as i32,
            mode: 0o120777,
            uid: 7,
            gid: 8,
            size: 1000,
            nlink: 1,
            mtime: 1_700_000_000_000,
            ctime: 1_700_000_000_500,
            atime: 1_600_000_000_000,
            rdev: 0,
            xattrs: 0,
            mtime_sub_ns: 0,
            atime_sub_ns: 456_789,
        };
        let f = fattr(&a);
        assert_eq!(f.ino, INodeNo(42));
        assert_eq!(f.kind, FileType::Symlink);
        assert_eq!(f.perm, 0o777);
        assert_eq!(f.blocks, 2);
        assert_eq!(f.mtime, ms_to_time(a.mtime));
        assert_eq!(
            f.atime,
            ms_to_time(a.atime) + std::time::Duration::from_nanos(456_789)
        );
        let dev = fattr(&proto::Attr {
            kind: NodeKind::CharDevice as i32,
            rdev: 0x103,
            ..a
        });
        assert_eq!((dev.kind, dev.rdev), (FileType::CharDevice, 0x103));
        assert_eq!(
            [NodeKind::Fifo, NodeKind::BlockDevice, NodeKind::Socket].map(file_type),
            [FileType::NamedPipe, FileType::BlockDevice, FileType::Socket]
        );
        assert_eq!(
            open_flags(libc::O_DIRECT | libc::O_RDWR),
            FopenFlags::FOPEN_DIRECT_IO
        );
        assert_eq!(file_type(NodeKind::Directory), FileType::Directory);
    }
}
