//! LUN space: allocating extents to files, marking them written,
//! freeing them (through quarantine while a lease lives) and the
//! consistency check of who owns every LUN byte.

use super::*;

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
    pub(super) fn allocate(&mut self, ino: Ino, off: u64, len: u64) -> Result<Reply, MetaError> {
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

    pub(super) fn mark_written(
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
        // A write changes the file: both times move (POSIX).
        i.attr.touch_mtime(now);
        i.attr.ctime = now;
        Ok(Reply::Attr(i.attr.clone()))
    }

    /// Frees LUN space of `ino`: at once if nobody holds a lease on it,
    /// else into quarantine until the last lease ends.
    /// Bytes a snapshot still holds only lose a reference.
    pub(super) fn free(&mut self, ino: Ino, pieces: Vec<(u64, u64)>) {
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

    pub(super) fn release_quarantine(&mut self, ino: Ino) {
        // Locks go with their host's lease on the file.
        self.drop_unleased_locks(ino);
        if self.is_leased(ino) {
            return;
        }
        for (s, l) in self.quarantine.remove(&ino).unwrap_or_default() {
            let _ = self.alloc.release(s, l);
        }
        // A file unlinked while open goes with its last lease.
        if self
            .inodes
            .get(&ino)
            .is_some_and(|i| i.attr.nlink == 0 && i.attr.kind == Kind::File)
        {
            self.reclaim(ino);
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
