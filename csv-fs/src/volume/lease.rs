//! Open files on this host: the lease each is open under, its extent map,
//! what was written and not yet reported, and the reports themselves.
//!
//! A file open on this host has one entry however many handles it has. It
//! is made at the first open (a lease granted, the attributes and map
//! fetched; a file this host just created comes with its lease and no
//! map), renewed by the volume's lease thread while open, and dropped at
//! the last close, when the lease is given back. Writes into never-written
//! space and redirected writes are reported to the coordinator only after
//! the LUN was flushed.

use super::errno::io_errno;
use super::VolumeFs;
use crate::extents::ExtentMap;
use coordinator::meta::Extent;
use coordinator::proto::{self, volume_op};
use fuser::Errno;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhd::BlockIo as _;

pub use coordinator::meta::LEASE_TTL;

/// Redirected or written ranges reported to the coordinator in one
/// command.
const REPORT_BATCH: usize = 1024;

/// A lease this host holds on a file.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) epoch: u64,
    pub(crate) write: bool,
    /// After this, a writer must stop (a margin before the real expiry).
    pub(crate) deadline: Instant,
}

impl Lease {
    /// A lease the coordinator just granted.
    pub(crate) fn granted(l: &proto::Lease) -> Lease {
        Lease {
            epoch: l.epoch,
            write: l.write,
            deadline: Instant::now() + LEASE_TTL * 3 / 4,
        }
    }
}

/// How often writes in place into a file open for writing move its
/// modification time in the coordinator, at most (the last close always
/// does).
const MTIME_EVERY: Duration = Duration::from_secs(1);

/// A file open on this host.
#[derive(Debug)]
pub(crate) struct OpenFile {
    pub(crate) handles: u32,
    pub(crate) writers: u32,
    pub(crate) extents: ExtentMap,
    /// Size as this host knows it (its own writes included).
    pub(crate) size: u64,
    /// Size the coordinator has.
    pub(crate) size_reported: u64,
    /// Ranges written into unwritten space, not yet reported.
    pub(crate) dirty: Vec<(u64, u64)>,
    /// Written since the coordinator last stamped the modification time
    /// (a write in place needs no other report).
    pub(crate) touched: bool,
    /// When a report last stamped it.
    pub(crate) stamped: Option<Instant>,
    /// Redirected writes (file offset, reserved LUN pieces) whose new
    /// place is not yet in the coordinator's map.
    pub(crate) remaps: Vec<(u64, Vec<(u64, u64)>)>,
    /// Space reserved for redirected writes, not used yet (the coordinator
    /// frees it when this host's lease on the file ends).
    pub(crate) pool: Vec<(u64, u64)>,
    pub(crate) lease: Option<Lease>,
    /// The write lease was lost: writes fail until the file is reopened.
    pub(crate) fenced: bool,
    /// Attributes when opened (what `fstat` shows once the file is
    /// unlinked while still open).
    pub(crate) attr: proto::Attr,
    /// The last handle was released and the lease given back: an opener
    /// that finds this entry must start afresh.
    pub(crate) closed: bool,
    /// When the map and size were last fetched from the coordinator.
    pub(crate) refreshed: Instant,
}

impl OpenFile {
    /// Whether this host may write the file now.
    pub(crate) fn may_write(&self) -> bool {
        !self.fenced
            && self
                .lease
                .as_ref()
                .is_some_and(|l| l.write && Instant::now() <= l.deadline)
    }
}

/// An open file handle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handle {
    pub(crate) ino: u64,
    pub(crate) write: bool,
}

/// Merges redirected writes that follow each other in the file (and their
/// pieces that follow each other on the LUN), in file order.
fn merge_remaps(mut list: Vec<(u64, Vec<(u64, u64)>)>) -> Vec<(u64, Vec<(u64, u64)>)> {
    list.sort_unstable_by_key(|r| r.0);
    let mut merged: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
    for (off, pieces) in list {
        if let Some((moff, mp)) = merged.last_mut() {
            let mlen: u64 = mp.iter().map(|p| p.1).sum();
            if *moff + mlen == off {
                for p in pieces {
                    match mp.last_mut() {
                        Some(l) if l.0 + l.1 == p.0 => l.1 += p.1,
                        _ => mp.push(p),
                    }
                }
                continue;
            }
        }
        merged.push((off, pieces));
    }
    merged
}

/// Merges overlapping and touching written ranges, in file order.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (o, l) in ranges {
        match merged.last_mut() {
            Some((mo, ml)) if *mo + *ml >= o => *ml = (*ml).max(o + l - *mo),
            _ => merged.push((o, l)),
        }
    }
    merged
}

impl VolumeFs {
    /// A file's map as the coordinator has it, shared flags included.
    pub(crate) fn fetch_extents(&self, ino: u64) -> Result<ExtentMap, Errno> {
        let vol = self.vol;
        let list = self.call(|c| c.extents(vol, ino))?;
        let shared: Vec<(Extent, bool)> = list
            .iter()
            .map(|e| {
                (
                    Extent {
                        file_off: e.file_off,
                        lun_off: e.lun_off,
                        len: e.len,
                        unwritten: e.unwritten,
                    },
                    e.shared,
                )
            })
            .collect();
        Ok(ExtentMap::with_shared(&shared))
    }

    pub(crate) fn grant(&self, ino: u64, write: bool) -> Result<Lease, Errno> {
        let r = self.op(volume_op::Op::GrantLease(proto::GrantLeaseOp {
            node: self.node,
            ino,
            write,
            now: 0,
            ttl: LEASE_TTL.as_millis() as u64,
        }))?;
        match r.value {
            Some(proto::reply::Value::Lease(l)) => Ok(Lease::granted(&l)),
            _ => Err(Errno::EIO),
        }
    }

    /// Gives back this host's lease on `ino` (best effort: an unanswered
    /// one runs out by itself).
    pub(crate) fn revoke(&self, ino: u64) {
        let _ = self.op(volume_op::Op::RevokeLease(proto::RevokeLeaseOp {
            node: self.node,
            ino,
            ..Default::default()
        }));
    }

    /// Opens `ino` on this host: lease, attributes, extent map.
    pub(crate) fn open_file(&self, ino: u64, write: bool) -> Result<u64, Errno> {
        self.open_file_as(ino, write, None, None)
    }

    /// Opens `ino`; `created` is its attributes when this host just made
    /// it (empty: nothing to fetch), `granted` the lease it came with.
    pub(crate) fn open_file_as(
        &self,
        ino: u64,
        write: bool,
        created: Option<&proto::Attr>,
        mut granted: Option<Lease>,
    ) -> Result<u64, Errno> {
        loop {
            let file = self.open_entry(ino, write, created, granted.take())?;
            let mut f = file.lock().map_err(|_| Errno::EIO)?;
            if f.closed {
                // Released and revoked meanwhile: drop it and start again.
                drop(f);
                self.forget(ino, &file);
                continue;
            }
            if write && !f.lease.as_ref().is_some_and(|l| l.write) {
                let l = self.grant(ino, true)?;
                f.lease = Some(l);
            }
            if f.handles > 0 && f.writers == 0 {
                // Open again while open here for reading: close-to-open
                // wants what other hosts closed since.
                self.refresh(ino, &mut f);
            }
            f.handles += 1;
            if write {
                f.writers += 1;
            }
            break;
        }
        let fh = self.next_handle();
        self.handles
            .lock()
            .map_err(|_| Errno::EIO)?
            .insert(fh, Handle { ino, write });
        Ok(fh)
    }

    /// Removes `file` from the open files if it is still the entry of `ino`.
    fn forget(&self, ino: u64, file: &Arc<Mutex<OpenFile>>) {
        if let Ok(mut m) = self.files.lock() {
            if m.get(&ino).is_some_and(|x| Arc::ptr_eq(x, file)) {
                m.remove(&ino);
            }
        }
    }

    /// The open-file entry of `ino`, made (lease, attributes, map) if there
    /// is none.
    fn open_entry(
        &self,
        ino: u64,
        write: bool,
        created: Option<&proto::Attr>,
        granted: Option<Lease>,
    ) -> Result<Arc<Mutex<OpenFile>>, Errno> {
        if let Some(f) = self.file(ino) {
            return Ok(f);
        }
        let vol = self.vol;
        let attr = match created {
            Some(a) => *a,
            None => self.call(|c| c.getattr(vol, ino))?,
        };
        if attr.kind() != proto::NodeKind::File {
            return Err(Errno::EISDIR);
        }
        let lease = match granted {
            Some(l) => l,
            None => self.grant(ino, write)?,
        };
        let extents = match created {
            // A file this host just created has no extents yet.
            Some(_) => ExtentMap::default(),
            None => self.fetch_extents(ino)?,
        };
        let f = Arc::new(Mutex::new(OpenFile {
            handles: 0,
            writers: 0,
            extents,
            size: attr.size,
            size_reported: attr.size,
            dirty: Vec::new(),
            touched: false,
            stamped: None,
            remaps: Vec::new(),
            pool: Vec::new(),
            lease: Some(lease),
            fenced: false,
            attr,
            closed: false,
            refreshed: Instant::now(),
        }));
        let mut files = self.files.lock().map_err(|_| Errno::EIO)?;
        Ok(files.entry(ino).or_insert(f).clone())
    }

    /// The open-file entry of `ino`, if it is open here.
    pub(crate) fn file(&self, ino: u64) -> Option<Arc<Mutex<OpenFile>>> {
        self.files.lock().ok()?.get(&ino).cloned()
    }

    /// Every open file.
    pub(crate) fn open_files(&self) -> Vec<(u64, Arc<Mutex<OpenFile>>)> {
        match self.files.lock() {
            Ok(m) => m.iter().map(|(k, v)| (*k, v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Fetches the size and extent map of a file this host only reads.
    pub(crate) fn refresh(&self, ino: u64, f: &mut OpenFile) {
        f.refreshed = Instant::now();
        let vol = self.vol;
        if let Ok(a) = self.call(|c| c.getattr(vol, ino)) {
            f.size = f.size.max(a.size);
            f.size_reported = f.size;
        }
        if let Ok(e) = self.fetch_extents(ino) {
            f.extents = e;
        }
    }

    /// Reports writes into unwritten space and a grown size, after making
    /// the data durable on the LUN.
    pub(crate) fn report(&self, ino: u64, f: &mut OpenFile) -> Result<(), Errno> {
        self.report_within(ino, f, None)
    }

    /// As [`VolumeFs::report`], each call to the coordinator giving up
    /// after `within` when given (ETIMEDOUT); what was not reported stays
    /// to be reported.
    pub(crate) fn report_within(
        &self,
        ino: u64,
        f: &mut OpenFile,
        within: Option<Duration>,
    ) -> Result<(), Errno> {
        if f.dirty.is_empty() && f.remaps.is_empty() && f.size <= f.size_reported {
            // Only writes in place: they move the modification time, at
            // the last writer's close, and at most once a second while
            // the file is open for writing (a VM disk's every flush
            // would otherwise cost a commit).
            let due = f.touched
                && (f.writers == 0 || f.stamped.is_none_or(|t| t.elapsed() >= MTIME_EVERY));
            if !due {
                return Ok(());
            }
        }
        self.lun.flush().map_err(|e| io_errno(&e))?;
        // Redirected writes first: their new places go into the map,
        // neighbours merged, many to a command.
        if !f.remaps.is_empty() {
            self.report_remaps(ino, f, within)?;
        }
        let mut merged = merge_ranges(std::mem::take(&mut f.dirty));
        if merged.is_empty() {
            merged.push((0, 0));
        }
        // Many ranges to a command.
        while !merged.is_empty() {
            let n = merged.len().min(REPORT_BATCH);
            let (off, len) = merged[0];
            let r = self.op_within(
                volume_op::Op::MarkWritten(proto::MarkWrittenOp {
                    ino,
                    off,
                    len,
                    size: f.size,
                    now: 0,
                    more: merged[1..n]
                        .iter()
                        .map(|&(off, len)| proto::WrittenRange { off, len })
                        .collect(),
                }),
                within,
            );
            if let Err(e) = r {
                f.dirty.extend(merged);
                return Err(e);
            }
            merged.drain(..n);
        }
        f.size_reported = f.size;
        f.touched = false;
        f.stamped = Some(Instant::now());
        Ok(())
    }

    /// Points the coordinator's map at the new places of redirected
    /// writes.
    fn report_remaps(
        &self,
        ino: u64,
        f: &mut OpenFile,
        within: Option<Duration>,
    ) -> Result<(), Errno> {
        let mut merged = merge_remaps(std::mem::take(&mut f.remaps));
        while !merged.is_empty() {
            let n = merged.len().min(REPORT_BATCH);
            let r = self.op_within(
                volume_op::Op::Remap(coordinator::codec::remap_to_proto(ino, &merged[..n])),
                within,
            );
            match r {
                Ok(_) => {
                    merged.drain(..n);
                }
                Err(Errno::EINVAL) => {
                    // The reserved space is gone: the lease ran out, and
                    // what was written there is not this file's any more.
                    tracing::error!(
                        ino,
                        "redirected writes lost their reserved space; writes to this open file now fail"
                    );
                    f.fenced = true;
                    return Err(Errno::EIO);
                }
                Err(e) => {
                    f.remaps = merged;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Renews the leases of open files that are due.
    pub(crate) fn renew_leases(&self) {
        for (ino, f) in self.open_files() {
            let (write, due) = match f.lock() {
                Ok(g) => match &g.lease {
                    Some(l) => (
                        l.write,
                        l.deadline.saturating_duration_since(Instant::now()) < LEASE_TTL / 2,
                    ),
                    None => continue,
                },
                Err(_) => continue,
            };
            if !due {
                continue;
            }
            match self.grant(ino, write) {
                Ok(l) => {
                    if let Ok(mut g) = f.lock() {
                        if g.closed {
                            // Closed while this renewal was on its way:
                            // give back what it just took.
                            self.revoke(ino);
                            continue;
                        }
                        let lost = g.lease.as_ref().is_some_and(|old| old.epoch != l.epoch);
                        if lost && write {
                            // The lease lapsed and another host may have
                            // had the file meanwhile: stop writing.
                            tracing::error!(
                                ino,
                                "write lease lapsed; writes to this open file now fail"
                            );
                            g.fenced = true;
                        }
                        g.lease = Some(l);
                    }
                }
                Err(e) => tracing::warn!(ino, "cannot renew the lease: {e:?}"),
            }
        }
    }

    /// Closes handle `fh`: reports its writes, and at the file's last
    /// close gives back space allocated past the end and the lease.
    pub(crate) fn release_handle(&self, fh: u64) -> Result<(), Errno> {
        let h = self
            .handles
            .lock()
            .map_err(|_| Errno::EIO)?
            .remove(&fh)
            .ok_or(Errno::EBADF)?;
        let Some(file) = self.file(h.ino) else {
            return Ok(());
        };
        let mut f = file.lock().map_err(|_| Errno::EIO)?;
        f.handles = f.handles.saturating_sub(1);
        if h.write {
            f.writers = f.writers.saturating_sub(1);
        }
        let res = if h.write {
            self.report(h.ino, &mut f)
        } else {
            Ok(())
        };
        if f.handles == 0 {
            if h.write && f.extents.allocated_end() > f.size.next_multiple_of(4096) {
                let _ = self.op(volume_op::Op::SetAttr(proto::SetAttrOp {
                    ino: h.ino,
                    size: Some(f.size),
                    ..Default::default()
                }));
            }
            self.revoke(h.ino);
            f.closed = true;
            f.lease = None;
            drop(f);
            self.forget(h.ino, &file);
        }
        res
    }

    /// The file behind handle `fh`, if it is one of this host's.
    pub(crate) fn handle_ino(&self, fh: u64) -> Option<u64> {
        self.handles.lock().ok()?.get(&fh).map(|h| h.ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_ranges_merge_when_they_touch() {
        assert_eq!(
            merge_ranges(vec![(8192, 4096), (0, 4096), (4096, 4096), (20_000, 10)]),
            vec![(0, 12288), (20_000, 10)]
        );
        // A gap keeps two ranges apart.
        assert_eq!(
            merge_ranges(vec![(0, 4096), (4096, 100), (8192, 4096)]),
            vec![(0, 4196), (8192, 4096)]
        );
        assert_eq!(merge_ranges(vec![(0, 10), (2, 3)]), vec![(0, 10)]);
    }

    #[test]
    fn redirected_writes_merge_when_they_follow_each_other() {
        let merged = merge_remaps(vec![
            (4096, vec![(1_000_000, 4096)]),
            (0, vec![(996_000, 4096)]),
            (16384, vec![(50, 4096)]),
        ]);
        assert_eq!(
            merged,
            vec![
                (0, vec![(996_000, 4096), (1_000_000, 4096)]),
                (16384, vec![(50, 4096)])
            ]
        );
        let joined = merge_remaps(vec![(0, vec![(0, 4096)]), (4096, vec![(4096, 4096)])]);
        assert_eq!(joined, vec![(0, vec![(0, 8192)])]);
    }
}
