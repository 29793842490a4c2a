//! A volume's state as bytes, for Raft snapshots and restarts.
//!
//! ```text
//! magic "CSVMETA\0" (8) | major u16 | minor u16 | body length u64 | crc32 of body u32 | body
//! ```
//!
//! All integers little-endian. The body lists, in order: counters, free
//! space, inodes (attributes and directory entries, extents or symlink
//! target), leases, quarantine, (from minor version 1) the write-lease
//! history, (from 2) the volume snapshots (id, name, time and their
//! inodes; the shared-range reference counts are rebuilt from them), and
//! (from 3) each inode's extras: access time, the nanoseconds within the
//! millisecond of its modification and access times, device number and
//! extended attributes, for the live inodes and then for each snapshot's
//! (only inodes with an access time other than their modification time,
//! a device number or attributes are listed; a reader of an older minor
//! version takes the access time to be the modification time), then the
//! file locks held, then the blocked lock requests (a section a reader
//! finds missing in the first minor-3 states, and takes as none).
//! Decoding checks the magic, refuses an
//! unknown major version, verifies the checksum, bounds every count by the
//! bytes left (hostile input cannot make it allocate), and rebuilds the
//! allocator so that overlapping free space is refused.

use super::{Attr, Body, Extent, Inode, Kind, Lease, LeaseChange, LeaseEvent, Volume};
use crate::alloc::Allocator;
use std::collections::BTreeMap;

/// The snapshot's magic.
pub const MAGIC: &[u8; 8] = b"CSVMETA\0";
/// Format version written.
pub const MAJOR: u16 = 1;
/// Minor version written (additions a reader of the same major skips).
pub const MINOR: u16 = 3;
const HEADER: usize = 8 + 2 + 2 + 8 + 4;

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Not a volume snapshot.
    #[error("not a volume metadata snapshot (bad magic)")]
    Magic,
    /// Written by a newer, incompatible version.
    #[error("snapshot format version {0} is not supported (this build reads version {MAJOR})")]
    Version(u16),
    /// The checksum does not match: the bytes are damaged.
    #[error("snapshot checksum {stored:#010x} stored, {computed:#010x} computed")]
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// The bytes end early or hold an impossible value.
    #[error("malformed snapshot at byte {offset}: {what}")]
    Malformed {
        /// Where in the body.
        offset: usize,
        /// What was wrong.
        what: &'static str,
    },
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl R<'_> {
    fn bad(&self, what: &'static str) -> SnapshotError {
        SnapshotError::Malformed {
            offset: self.at,
            what,
        }
    }
    fn take(&mut self, n: usize) -> Result<&[u8], SnapshotError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| self.bad("ends early"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// A count of elements of at least `min` bytes each, bounded by what
    /// is left.
    fn count(&mut self, min: usize) -> Result<usize, SnapshotError> {
        let n = self.u64()?;
        let left = (self.b.len() - self.at) / min.max(1);
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= left)
            .ok_or_else(|| self.bad("count larger than the bytes left"))
    }
    fn string(&mut self) -> Result<String, SnapshotError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("name is not UTF-8"))
    }
}

fn kind_code(k: Kind) -> u8 {
    match k {
        Kind::Dir => 0,
        Kind::File => 1,
        Kind::Symlink => 2,
        Kind::Fifo => 3,
        Kind::CharDevice => 4,
        Kind::BlockDevice => 5,
        Kind::Socket => 6,
    }
}

fn has_extras(i: &Inode) -> bool {
    i.attr.atime != i.attr.mtime
        || i.attr.rdev != 0
        || i.attr.mtime_ns != 0
        || i.attr.atime_ns != 0
        || !i.xattrs.is_empty()
}

fn write_extras(w: &mut W, inodes: &BTreeMap<u64, Inode>) {
    let with: Vec<&Inode> = inodes.values().filter(|i| has_extras(i)).collect();
    w.u64(with.len() as u64);
    for i in with {
        w.u64(i.attr.ino);
        w.u64(i.attr.atime);
        w.u32(i.attr.mtime_ns);
        w.u32(i.attr.atime_ns);
        w.u32(i.attr.rdev);
        w.u64(i.xattrs.len() as u64);
        for (k, v) in &i.xattrs {
            w.bytes(k.as_bytes());
            w.bytes(v);
        }
    }
}

fn read_extras(r: &mut R<'_>, inodes: &mut BTreeMap<u64, Inode>) -> Result<(), SnapshotError> {
    let n = r.count(36)?;
    for _ in 0..n {
        let ino = r.u64()?;
        let atime = r.u64()?;
        let (mtime_ns, atime_ns) = (r.u32()?, r.u32()?);
        if mtime_ns >= 1_000_000 || atime_ns >= 1_000_000 {
            return Err(r.bad("nanoseconds beyond a millisecond"));
        }
        let rdev = r.u32()?;
        let m = r.count(8)?;
        let mut xattrs = super::Xattrs::new();
        for _ in 0..m {
            let name = r.string()?;
            let n = r.u32()? as usize;
            let value = r.take(n)?.to_vec();
            if super::namespace::check_xattr_name(&name).is_err()
                || value.len() > super::XATTR_SIZE_MAX
            {
                return Err(r.bad("extended attribute out of bounds"));
            }
            xattrs.insert(name, value);
        }
        let i = inodes
            .get_mut(&ino)
            .ok_or_else(|| r.bad("extras of an inode not listed"))?;
        i.attr.atime = atime;
        i.attr.mtime_ns = mtime_ns;
        i.attr.atime_ns = atime_ns;
        i.attr.rdev = rdev;
        i.attr.xattrs = xattrs.len() as u32;
        i.xattrs = xattrs;
    }
    Ok(())
}

fn write_inodes(w: &mut W, inodes: &BTreeMap<u64, Inode>) {
    w.u64(inodes.len() as u64);
    for i in inodes.values() {
        let a = &i.attr;
        w.u64(a.ino);
        w.u8(kind_code(a.kind));
        w.u32(a.mode);
        w.u32(a.uid);
        w.u32(a.gid);
        w.u64(a.size);
        w.u32(a.nlink);
        w.u64(a.mtime);
        w.u64(a.ctime);
        match &i.body {
            Body::Dir(d) => {
                w.u64(d.len() as u64);
                for (name, ino) in d {
                    w.bytes(name.as_bytes());
                    w.u64(*ino);
                }
            }
            Body::File(ext) => {
                w.u64(ext.len() as u64);
                for e in ext.values() {
                    w.u64(e.file_off);
                    w.u64(e.lun_off);
                    w.u64(e.len);
                    w.u8(u8::from(e.unwritten));
                }
            }
            Body::Symlink(t) => w.bytes(t.as_bytes()),
            Body::Special => {}
        }
    }
}

fn read_inodes(r: &mut R<'_>) -> Result<BTreeMap<u64, Inode>, SnapshotError> {
    let n = r.count(49)?;
    let mut inodes = BTreeMap::new();
    for _ in 0..n {
        let ino = r.u64()?;
        if ino >= super::LIVE_INO_LIMIT {
            return Err(r.bad("inode number out of range"));
        }
        let kind = match r.u8()? {
            0 => Kind::Dir,
            1 => Kind::File,
            2 => Kind::Symlink,
            3 => Kind::Fifo,
            4 => Kind::CharDevice,
            5 => Kind::BlockDevice,
            6 => Kind::Socket,
            _ => return Err(r.bad("unknown inode kind")),
        };
        let mut attr = Attr {
            ino,
            kind,
            mode: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            size: r.u64()?,
            nlink: r.u32()?,
            mtime: r.u64()?,
            ctime: r.u64()?,
            atime: 0,
            mtime_ns: 0,
            atime_ns: 0,
            rdev: 0,
            xattrs: 0,
        };
        attr.atime = attr.mtime;
        let body = match kind {
            Kind::Dir => {
                let m = r.count(12)?;
                let mut d = BTreeMap::new();
                for _ in 0..m {
                    let name = r.string()?;
                    let child = r.u64()?;
                    d.insert(name, child);
                }
                Body::Dir(d)
            }
            Kind::File => {
                let m = r.count(25)?;
                let mut ext = BTreeMap::new();
                for _ in 0..m {
                    let e = Extent {
                        file_off: r.u64()?,
                        lun_off: r.u64()?,
                        len: r.u64()?,
                        unwritten: r.u8()? != 0,
                    };
                    ext.insert(e.file_off, e);
                }
                Body::File(ext)
            }
            Kind::Symlink => Body::Symlink(r.string()?),
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice | Kind::Socket => Body::Special,
        };
        let inode = Inode {
            attr,
            body,
            xattrs: super::Xattrs::new(),
        };
        if inodes.insert(ino, inode).is_some() {
            return Err(r.bad("inode listed twice"));
        }
    }
    Ok(inodes)
}

impl Volume {
    /// The whole state as a snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::new());
        w.u64(self.next_ino);
        w.u64(self.next_epoch);
        let free: Vec<(u64, u64)> = self.alloc.intervals().collect();
        w.u64(free.len() as u64);
        for (s, l) in free {
            w.u64(s);
            w.u64(l);
        }
        write_inodes(&mut w, &self.inodes);
        w.u64(self.leases.len() as u64);
        for (&(ino, node), l) in &self.leases {
            w.u64(ino);
            w.u64(node);
            w.u64(l.epoch);
            w.u64(l.expires);
            w.u8(u8::from(l.write));
        }
        w.u64(self.quarantine.len() as u64);
        for (ino, pieces) in &self.quarantine {
            w.u64(*ino);
            w.u64(pieces.len() as u64);
            for &(s, l) in pieces {
                w.u64(s);
                w.u64(l);
            }
        }
        w.u64(self.history.len() as u64);
        for e in &self.history {
            w.u64(e.at);
            w.u64(e.ino);
            w.u64(e.node);
            w.u64(e.epoch);
            w.u8(e.change.code());
            w.u64(e.change.peer());
        }
        w.u64(self.next_snap);
        w.u64(self.snapshots.len() as u64);
        for (id, snap) in &self.snapshots {
            w.u64(*id);
            w.u64(snap.created);
            w.bytes(snap.name.as_bytes());
            write_inodes(&mut w, &snap.inodes);
        }
        write_extras(&mut w, &self.inodes);
        for snap in self.snapshots.values() {
            write_extras(&mut w, &snap.inodes);
        }
        let locks: Vec<(u64, &super::FileLock)> = self.locks.all().collect();
        w.u64(locks.len() as u64);
        for (ino, l) in locks {
            w.u64(ino);
            w.u64(l.node);
            w.u64(l.owner);
            w.u32(l.pid);
            w.u8(u8::from(l.flock));
            w.u64(l.start);
            w.u64(l.end);
            w.u8(u8::from(l.write));
        }
        let waits: Vec<&super::Wait> = self.locks.waits().collect();
        w.u64(waits.len() as u64);
        for x in waits {
            w.u64(x.ino);
            w.u64(x.lock.node);
            w.u64(x.lock.owner);
            w.u32(x.lock.pid);
            w.u64(x.lock.start);
            w.u64(x.lock.end);
            w.u8(u8::from(x.lock.write));
            w.u64(x.until);
        }
        let body = w.0;
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MAJOR.to_le_bytes());
        out.extend_from_slice(&MINOR.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Rebuilds a volume from [`Volume::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<Volume, SnapshotError> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        let major = u16::from_le_bytes([bytes[8], bytes[9]]);
        let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
        if major != MAJOR {
            return Err(SnapshotError::Version(major));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[12..20]);
        let len = u64::from_le_bytes(len);
        let stored = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        let body = usize::try_from(len)
            .ok()
            .and_then(|l| bytes.get(HEADER..HEADER.checked_add(l)?))
            .ok_or(SnapshotError::Malformed {
                offset: 12,
                what: "body length beyond the bytes",
            })?;
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        let mut r = R { b: body, at: 0 };
        let next_ino = r.u64()?;
        let next_epoch = r.u64()?;
        let n = r.count(16)?;
        let mut free = Vec::with_capacity(n);
        for _ in 0..n {
            free.push((r.u64()?, r.u64()?));
        }
        let alloc =
            Allocator::from_intervals(&free).ok_or_else(|| r.bad("free space overlaps itself"))?;
        let mut inodes = read_inodes(&mut r)?;
        let n = r.count(33)?;
        let mut leases = BTreeMap::new();
        for _ in 0..n {
            let key = (r.u64()?, r.u64()?);
            let l = Lease {
                epoch: r.u64()?,
                expires: r.u64()?,
                write: r.u8()? != 0,
            };
            leases.insert(key, l);
        }
        let n = r.count(16)?;
        let mut quarantine = BTreeMap::new();
        for _ in 0..n {
            let ino = r.u64()?;
            let m = r.count(16)?;
            let mut pieces = Vec::with_capacity(m);
            for _ in 0..m {
                pieces.push((r.u64()?, r.u64()?));
            }
            quarantine.insert(ino, pieces);
        }
        let mut history = std::collections::VecDeque::new();
        if minor >= 1 {
            let n = r.count(41)?;
            if n > super::LEASE_HISTORY {
                return Err(r.bad("lease history longer than kept"));
            }
            for _ in 0..n {
                let (at, ino, node, epoch) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let code = r.u8()?;
                let peer = r.u64()?;
                let change = LeaseChange::from_code(code, peer)
                    .ok_or_else(|| r.bad("unknown lease change"))?;
                history.push_back(LeaseEvent {
                    at,
                    ino,
                    node,
                    epoch,
                    change,
                });
            }
        }
        let mut next_snap = 1;
        let mut snapshots = BTreeMap::new();
        if minor >= 2 {
            next_snap = r.u64()?;
            let n = r.count(20)?;
            if n > super::MAX_SNAPSHOTS {
                return Err(r.bad("more snapshots than a volume keeps"));
            }
            for _ in 0..n {
                let id = r.u64()?;
                let created = r.u64()?;
                let name = r.string()?;
                let inodes = read_inodes(&mut r)?;
                if id == 0 || id >= next_snap || id >= 1 << (63 - super::snaps::SNAP_SHIFT) {
                    return Err(r.bad("snapshot id out of range"));
                }
                if !inodes.contains_key(&super::ROOT) {
                    return Err(r.bad("snapshot without a root directory"));
                }
                let snap = super::snaps::Snap {
                    name,
                    created,
                    inodes,
                };
                if snapshots.insert(id, snap).is_some() {
                    return Err(r.bad("snapshot listed twice"));
                }
            }
        }
        let mut locks = super::LockTable::default();
        if minor >= 3 {
            read_extras(&mut r, &mut inodes)?;
            for snap in snapshots.values_mut() {
                read_extras(&mut r, &mut snap.inodes)?;
            }
            let n = r.count(46)?;
            for _ in 0..n {
                let ino = r.u64()?;
                let l = super::FileLock {
                    node: r.u64()?,
                    owner: r.u64()?,
                    pid: r.u32()?,
                    flock: r.u8()? != 0,
                    start: r.u64()?,
                    end: r.u64()?,
                    write: r.u8()? != 0,
                };
                if l.start > l.end || !inodes.contains_key(&ino) {
                    return Err(r.bad("a lock out of range or on a missing inode"));
                }
                locks.push(ino, l);
            }
            // Blocked lock requests (their section came late in minor 3).
            if r.at < body.len() {
                let n = r.count(53)?;
                for _ in 0..n {
                    let ino = r.u64()?;
                    let lock = super::FileLock {
                        node: r.u64()?,
                        owner: r.u64()?,
                        pid: r.u32()?,
                        flock: false,
                        start: r.u64()?,
                        end: r.u64()?,
                        write: r.u8()? != 0,
                    };
                    let until = r.u64()?;
                    if lock.start > lock.end {
                        return Err(r.bad("a blocked lock request out of range"));
                    }
                    locks.push_wait(super::Wait { ino, lock, until });
                }
            }
        }
        // A newer minor version may append sections this build skips.
        if r.at != body.len() && minor <= MINOR {
            return Err(r.bad("bytes after the end"));
        }
        if !inodes.contains_key(&super::ROOT) {
            return Err(r.bad("no root directory"));
        }
        let v = Volume {
            next_ino,
            next_epoch,
            inodes,
            alloc,
            leases,
            quarantine,
            history,
            snapshots,
            next_snap,
            refs: super::RangeCount::default(),
            locks,
        };
        let mut v = v;
        v.refs = v.implied_refs();
        if !v.check().is_empty() {
            return Err(SnapshotError::Malformed {
                offset: 0,
                what: "state fails the consistency check",
            });
        }
        Ok(v)
    }
}
