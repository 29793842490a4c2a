//! Redirect-on-write volume snapshots.
//!
//! A snapshot is a frozen copy of the volume's namespace (its inodes, with
//! their extent maps) taken by one committed command. It copies no data:
//! its files point at the same LUN bytes as the live files did, and those
//! bytes gain a reference. A host that later writes a *written* extent of
//! a live file that is shared with a snapshot does not write in place: it
//! reserves new space (`Reserve`, held in the file's quarantine so that it
//! comes back if the host dies), copies the unit there, writes, and at its
//! next flush swaps the live map over to the new space (`Remap`), which
//! drops the live file's reference to the old bytes. Unwritten extents
//! need no redirection: the snapshot's copy reads them as zeros whatever
//! the live file writes there later.
//!
//! References are counted per LUN byte range: `refs` holds the *extra*
//! references (owners beyond the first) of shared ranges, so a volume
//! without snapshots has an empty table. Freeing a range drops one
//! reference; only bytes without extra references go back to the free
//! space (or to quarantine while leases on the file are live).
//!
//! Snapshot files are read through inode numbers of their own: snapshot
//! `id`'s copy of inode `ino` is `id << 40 | ino`, and the directory that
//! lists the snapshots (`.snapshots` in the volume's root, not listed by
//! `readdir` so that a copy of the volume does not recurse into it) is
//! [`SNAPSHOTS_DIR`]. Every command that changes the namespace refuses
//! those numbers (they are not live inodes), so snapshots are read-only.

use super::{Attr, Body, Extent, Ino, Inode, Kind, MetaError, Reply, Volume, ROOT};
use std::collections::BTreeMap;

/// Bits of an inode number below the snapshot id.
pub const SNAP_SHIFT: u32 = 40;
/// Live inode numbers stay below this.
pub const LIVE_INO_LIMIT: u64 = 1 << SNAP_SHIFT;
/// The `.snapshots` directory in the volume's root.
pub const SNAPSHOTS_DIR: Ino = u64::MAX;
/// Its name.
pub const SNAPSHOTS_NAME: &str = ".snapshots";
/// Snapshots a volume keeps at once when the command does not ask for
/// more (as many as VSS allows per volume; the limit before feature
/// level 4).
pub const DEFAULT_SNAPSHOTS: usize = 64;
/// The most snapshots a volume keeps at once (as many as Data Protection
/// Manager keeps online; feature level 4).
pub const MAX_SNAPSHOTS: usize = 512;

/// Snapshot `id`'s inode number for live inode `ino`.
pub fn snap_ino(id: u64, ino: Ino) -> Ino {
    (id << SNAP_SHIFT) | ino
}

/// The snapshot id (0: live) and inode of an inode number.
pub fn split_ino(ino: Ino) -> (u64, Ino) {
    (ino >> SNAP_SHIFT, ino & (LIVE_INO_LIMIT - 1))
}

/// Whether an inode number is read-only (a snapshot's, or `.snapshots`).
pub fn is_snapshot_ino(ino: Ino) -> bool {
    ino >= LIVE_INO_LIMIT
}

/// A frozen namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    /// Its name (unique in the volume).
    pub name: String,
    /// Creation time (ms, the leader's clock).
    pub created: u64,
    pub(super) inodes: BTreeMap<Ino, Inode>,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    /// Id (its inode numbers are `id << 40 | ino`).
    pub id: u64,
    /// Name.
    pub name: String,
    /// Creation time (ms).
    pub created: u64,
    /// Files in it.
    pub files: u64,
    /// Bytes of the LUN only this snapshot holds (freed when it goes).
    pub exclusive: u64,
}

/// Extra references of LUN byte ranges: start -> (end, count >= 1),
/// disjoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeCount {
    map: BTreeMap<u64, (u64, u32)>,
}

impl RangeCount {
    fn split_at(&mut self, x: u64) {
        if let Some((&s, &(e, c))) = self.map.range(..x).next_back() {
            if s < x && x < e {
                self.map.insert(s, (x, c));
                self.map.insert(x, (e, c));
            }
        }
    }

    /// Merges touching ranges of equal count around `[start, end]`, so
    /// that equal tables are equal maps.
    fn coalesce(&mut self, start: u64, end: u64) {
        let from = self
            .map
            .range(..start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        let keys: Vec<u64> = self.map.range(from..=end).map(|(&k, _)| k).collect();
        let mut prev: Option<u64> = None;
        for k in keys {
            let Some(&(e, c)) = self.map.get(&k) else {
                continue;
            };
            if let Some(p) = prev {
                if let Some(&(pe, pc)) = self.map.get(&p) {
                    if pe == k && pc == c {
                        self.map.insert(p, (e, c));
                        self.map.remove(&k);
                        continue;
                    }
                }
            }
            prev = Some(k);
        }
    }

    /// The counted ranges inside `[start, end)`, cut at its edges.
    fn carve(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u32)> {
        self.split_at(start);
        self.split_at(end);
        self.map
            .range(start..end)
            .map(|(&s, &(e, c))| (s, e, c))
            .collect()
    }

    /// One more reference to every byte of `[start, start + len)`.
    pub fn add(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len);
        if len == 0 {
            return;
        }
        let mut at = start;
        for (s, e, c) in self.carve(start, end) {
            if s > at {
                self.map.insert(at, (s, 1));
            }
            self.map.insert(s, (e, c.saturating_add(1)));
            at = e;
        }
        if at < end {
            self.map.insert(at, (end, 1));
        }
        self.coalesce(start, end);
    }

    /// One more reference to every byte of each of `ranges` (disjoint;
    /// any order), in one sweep: O((n + m) log (n + m)) however many
    /// ranges, where adding them one by one would walk the map each time.
    pub fn add_all(&mut self, ranges: &mut [(u64, u64)]) {
        ranges.sort_unstable();
        let old: Vec<(u64, u64, u32)> = self.map.iter().map(|(&s, &(e, c))| (s, e, c)).collect();
        let mut points: Vec<u64> = Vec::with_capacity(2 * (old.len() + ranges.len()));
        for &(s, e, _) in &old {
            points.extend([s, e]);
        }
        for &(s, l) in ranges.iter() {
            points.extend([s, s.saturating_add(l)]);
        }
        points.sort_unstable();
        points.dedup();
        let (mut i, mut j) = (0usize, 0usize);
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        for w in points.windows(2) {
            let (x, y) = (w[0], w[1]);
            while i < old.len() && old[i].1 <= x {
                i += 1;
            }
            while j < ranges.len() && ranges[j].0.saturating_add(ranges[j].1) <= x {
                j += 1;
            }
            let mut c = 0u32;
            if i < old.len() && old[i].0 <= x {
                c += old[i].2;
            }
            if j < ranges.len() && ranges[j].0 <= x {
                c = c.saturating_add(1);
            }
            if c == 0 {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.1 == x && l.2 == c => l.1 = y,
                _ => out.push((x, y, c)),
            }
        }
        self.map = out.into_iter().map(|(s, e, c)| (s, (e, c))).collect();
    }

    /// One reference fewer to every byte of `[start, start + len)`:
    /// returns the pieces that had no extra reference (their last owner
    /// let go: free them).
    pub fn drop_ref(&mut self, start: u64, len: u64) -> Vec<(u64, u64)> {
        let end = start.saturating_add(len);
        let mut gone = Vec::new();
        if len == 0 {
            return gone;
        }
        let mut at = start;
        for (s, e, c) in self.carve(start, end) {
            if s > at {
                gone.push((at, s - at));
            }
            if c > 1 {
                self.map.insert(s, (e, c - 1));
            } else {
                self.map.remove(&s);
            }
            at = e;
        }
        if at < end {
            gone.push((at, end - at));
        }
        self.coalesce(start, end);
        gone
    }

    /// Bytes of `[start, start + len)` with at least one extra reference.
    pub fn shared_bytes(&self, start: u64, len: u64) -> u64 {
        let end = start.saturating_add(len);
        let first = self
            .map
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        self.map
            .range(first..end)
            .map(|(&s, &(e, _))| e.min(end).saturating_sub(s.max(start)))
            .sum()
    }

    /// Whether the table is empty (no byte shared).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The ranges and their extra references, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.map.iter().map(|(&s, &(e, c))| (s, e - s, c))
    }
}

/// Every file extent of an inode table, as LUN ranges.
pub(super) fn lun_ranges(inodes: &BTreeMap<Ino, Inode>) -> impl Iterator<Item = (u64, u64)> + '_ {
    inodes.values().flat_map(|i| match &i.body {
        Body::File(ext) => ext.values().map(|e| (e.lun_off, e.len)).collect::<Vec<_>>(),
        _ => Vec::new(),
    })
}

impl Volume {
    /// The reference table the live files and the snapshots imply (what
    /// `refs` must equal).
    pub(super) fn implied_refs(&self) -> RangeCount {
        let mut total = RangeCount::default();
        total.add_all(&mut lun_ranges(&self.inodes).collect::<Vec<_>>());
        for snap in self.snapshots.values() {
            total.add_all(&mut lun_ranges(&snap.inodes).collect::<Vec<_>>());
        }
        // Owners beyond the first.
        let mut extra = RangeCount {
            map: total
                .map
                .iter()
                .filter(|(_, &(_, c))| c > 1)
                .map(|(&s, &(e, c))| (s, (e, c - 1)))
                .collect(),
        };
        // Touching ranges whose counts became equal merge.
        let keys: Vec<u64> = extra.map.keys().copied().collect();
        if let (Some(&a), Some(&b)) = (keys.first(), keys.last()) {
            extra.coalesce(a, b);
        }
        extra
    }

    /// The inode behind a (live or snapshot) inode number, and its
    /// snapshot id (0: live).
    pub(super) fn node(&self, ino: Ino) -> Option<(&Inode, u64)> {
        let (id, local) = split_ino(ino);
        if id == 0 {
            return self.inodes.get(&local).map(|i| (i, 0));
        }
        self.snapshots
            .get(&id)
            .and_then(|s| s.inodes.get(&local))
            .map(|i| (i, id))
    }

    /// Attributes as the reader sees them: a snapshot's inode numbers,
    /// write permission bits cleared.
    pub(super) fn view_attr(i: &Inode, id: u64) -> Attr {
        let mut a = i.attr.clone();
        if id != 0 {
            a.ino = snap_ino(id, a.ino);
            a.mode &= !0o222;
        }
        a
    }

    /// The `.snapshots` directory's attributes.
    pub(super) fn snapshots_dir_attr(&self) -> Attr {
        let latest = self.snapshots.values().map(|s| s.created).max();
        let root = self.inodes.get(&ROOT).map(|r| r.attr.mtime).unwrap_or(0);
        Attr {
            ino: SNAPSHOTS_DIR,
            kind: Kind::Dir,
            mode: 0o555,
            uid: 0,
            gid: 0,
            size: 0,
            nlink: 2 + self.snapshots.len() as u32,
            mtime: latest.unwrap_or(root),
            ctime: latest.unwrap_or(root),
            atime: latest.unwrap_or(root),
            mtime_ns: 0,
            atime_ns: 0,
            rdev: 0,
            xattrs: 0,
        }
    }

    /// The snapshot named `name`.
    pub(super) fn snapshot_id(&self, name: &str) -> Option<u64> {
        self.snapshots
            .iter()
            .find(|(_, s)| s.name == name)
            .map(|(&id, _)| id)
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapInfo> {
        self.snapshots
            .iter()
            .map(|(&id, s)| {
                let mut files = 0;
                let mut exclusive = 0;
                for i in s.inodes.values() {
                    if let Body::File(ext) = &i.body {
                        files += 1;
                        for e in ext.values() {
                            exclusive += e.len - self.refs.shared_bytes(e.lun_off, e.len);
                        }
                    }
                }
                SnapInfo {
                    id,
                    name: s.name.clone(),
                    created: s.created,
                    files,
                    exclusive,
                }
            })
            .collect()
    }

    /// Takes a snapshot of the whole namespace.
    pub(super) fn create_snapshot(
        &mut self,
        name: &str,
        now: u64,
        limit: u32,
    ) -> Result<Reply, MetaError> {
        super::check_name(name)?;
        if self.snapshot_id(name).is_some() {
            return Err(MetaError::Exists);
        }
        let max = match limit {
            0 => DEFAULT_SNAPSHOTS,
            n => (n as usize).min(MAX_SNAPSHOTS),
        };
        if self.snapshots.len() >= max {
            return Err(MetaError::Invalid(format!(
                "the volume already keeps {max} snapshots; delete one first"
            )));
        }
        let id = self.next_snap;
        if id >= 1 << (63 - SNAP_SHIFT) {
            return Err(MetaError::Invalid("snapshot ids exhausted".into()));
        }
        self.next_snap += 1;
        let mut ranges: Vec<(u64, u64)> = lun_ranges(&self.inodes).collect();
        self.refs.add_all(&mut ranges);
        self.snapshots.insert(
            id,
            Snap {
                name: name.to_string(),
                created: now,
                inodes: self.inodes.clone(),
            },
        );
        Ok(Reply::Ok)
    }

    /// Deletes a snapshot: the bytes only it held are freed (after the
    /// leases of readers of its files end).
    pub(super) fn delete_snapshot(&mut self, name: &str) -> Result<Reply, MetaError> {
        let id = self.snapshot_id(name).ok_or(MetaError::NotFound)?;
        let Some(snap) = self.snapshots.remove(&id) else {
            return Err(MetaError::NotFound);
        };
        for (ino, i) in snap.inodes {
            if let Body::File(ext) = i.body {
                let pieces: Vec<(u64, u64)> = ext.values().map(|e| (e.lun_off, e.len)).collect();
                self.free(snap_ino(id, ino), pieces);
            }
        }
        Ok(Reply::Ok)
    }

    /// Reserves `len` bytes for a redirected write of live file `ino`: the
    /// space waits in the file's quarantine (so it comes back if the
    /// writer's lease ends) until `Remap` puts it in the map.
    pub(super) fn reserve(&mut self, ino: Ino, len: u64) -> Result<Reply, MetaError> {
        match self.inodes.get(&ino).map(|i| i.attr.kind) {
            Some(Kind::File) => {}
            Some(_) => return Err(MetaError::IsDir),
            None => return Err(MetaError::NotFound),
        }
        if self.leases(ino).is_empty() {
            return Err(MetaError::Invalid(
                "a reservation needs a lease on the file".into(),
            ));
        }
        if len == 0 || len % super::ALIGN != 0 {
            return Err(MetaError::Invalid(format!(
                "reservations are whole multiples of {} bytes",
                super::ALIGN
            )));
        }
        let pieces = self
            .alloc
            .allocate_aligned(len, 0, super::ALIGN)
            .ok_or(MetaError::NoSpace)?;
        let mut out = Vec::new();
        let mut at = 0;
        for &(s, l) in &pieces {
            out.push(Extent {
                file_off: at,
                lun_off: s,
                len: l,
                unwritten: false,
            });
            at += l;
        }
        self.quarantine.entry(ino).or_default().extend(pieces);
        Ok(Reply::Extents(out))
    }

    /// Points ranges of live file `ino` at reserved space the host has
    /// written: each `(off, pieces)` maps `[off, off + total)` onto the
    /// pieces in order, dropping the file's reference to the bytes it
    /// pointed at before. All ranges apply, or none.
    pub(super) fn remap(
        &mut self,
        ino: Ino,
        ranges: &[(u64, Vec<(u64, u64)>)],
    ) -> Result<Reply, MetaError> {
        let ext = match self.inodes.get(&ino).map(|i| &i.body) {
            Some(Body::File(e)) => e,
            Some(_) => return Err(MetaError::IsDir),
            None => return Err(MetaError::NotFound),
        };
        let overflow = || MetaError::Invalid("range overflows".into());
        // The file's reserved space, touching pieces merged (a host may
        // remap across two reservations that lie side by side).
        let mut q: Vec<(u64, u64)> = Vec::new();
        let mut held = self.quarantine.get(&ino).cloned().unwrap_or_default();
        held.sort_unstable();
        for (s, l) in held {
            match q.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => q.push((s, l)),
            }
        }
        for (off, pieces) in ranges {
            let off = *off;
            let len = pieces
                .iter()
                .try_fold(0u64, |a, p| a.checked_add(p.1))
                .ok_or_else(overflow)?;
            let end = off.checked_add(len).ok_or_else(overflow)?;
            // The range must be mapped all through.
            let mut at = off;
            let first = ext.range(..=off).next_back().map_or(off, |(&k, _)| k);
            for e in ext.range(first..end).map(|(_, e)| e) {
                if e.file_off + e.len <= at {
                    continue;
                }
                if e.file_off > at {
                    break;
                }
                at = e.file_off + e.len;
            }
            if at < end {
                return Err(MetaError::Invalid(format!(
                    "bytes {off}..{end} of inode {ino} are not all mapped"
                )));
            }
            // Every piece must be space reserved for this file.
            for &(s, l) in pieces {
                let i = q
                    .iter()
                    .position(|&(qs, ql)| qs <= s && s.saturating_add(l) <= qs + ql)
                    .ok_or_else(|| {
                        MetaError::Invalid(
                            "the reserved space is gone (the writer's lease ended)".into(),
                        )
                    })?;
                let (qs, ql) = q.swap_remove(i);
                if s > qs {
                    q.push((qs, s - qs));
                }
                if s + l < qs + ql {
                    q.push((s + l, qs + ql - (s + l)));
                }
            }
        }
        if q.is_empty() {
            self.quarantine.remove(&ino);
        } else {
            self.quarantine.insert(ino, q);
        }
        let mut old: Vec<(u64, u64)> = Vec::new();
        if let Some(Inode {
            body: Body::File(ext),
            ..
        }) = self.inodes.get_mut(&ino)
        {
            for (off, pieces) in ranges {
                let off = *off;
                let len: u64 = pieces.iter().map(|p| p.1).sum();
                if len == 0 {
                    continue;
                }
                let end = off + len;
                super::split_extents(ext, off);
                super::split_extents(ext, end);
                let keys: Vec<u64> = ext.range(off..end).map(|(&k, _)| k).collect();
                for k in keys {
                    if let Some(e) = ext.remove(&k) {
                        old.push((e.lun_off, e.len));
                    }
                }
                let mut foff = off;
                for &(s, l) in pieces {
                    ext.insert(
                        foff,
                        Extent {
                            file_off: foff,
                            lun_off: s,
                            len: l,
                            unwritten: false,
                        },
                    );
                    foff += l;
                }
            }
        }
        self.free(ino, old);
        Ok(Reply::Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_counts_add_and_drop_piecewise() {
        let mut r = RangeCount::default();
        assert_eq!(r.drop_ref(0, 100), vec![(0, 100)]);
        r.add(10, 20);
        r.add(20, 20);
        assert_eq!(r.shared_bytes(0, 100), 30);
        let mut same = RangeCount::default();
        same.add(10, 10);
        same.add(30, 10);
        same.add(20, 10);
        same.add(20, 10);
        assert_eq!(same, r, "equal counts, equal tables");
        assert_eq!(
            r.ranges().collect::<Vec<_>>(),
            vec![(10, 10, 1), (20, 10, 2), (30, 10, 1)]
        );
        assert_eq!(r.drop_ref(0, 50), vec![(0, 10), (40, 10)]);
        assert_eq!(r.ranges().collect::<Vec<_>>(), vec![(20, 10, 1)]);
        assert_eq!(r.drop_ref(25, 10), vec![(30, 5)]);
        assert_eq!(r.drop_ref(20, 5), Vec::<(u64, u64)>::new());
        assert!(r.is_empty());
    }

    proptest::proptest! {
        /// Adding many ranges in one sweep counts the same as adding them
        /// one by one.
        #[test]
        fn a_sweep_adds_like_one_at_a_time(
            base in proptest::collection::vec((0u64..64, 1u64..16), 0..12),
            new in proptest::collection::btree_set(0u64..40, 0..20),
        ) {
            let mut one = RangeCount::default();
            for &(s, l) in &base {
                one.add(s * 8, l * 8);
            }
            let mut sweep = one.clone();
            // Disjoint new ranges: [k*10, k*10+7).
            let mut ranges: Vec<(u64, u64)> = new.iter().rev().map(|&k| (k * 10, 7)).collect();
            for &(s, l) in &ranges {
                one.add(s, l);
            }
            sweep.add_all(&mut ranges);
            proptest::prop_assert_eq!(one, sweep);
        }
    }

    #[test]
    fn snapshot_inode_numbers_round_trip() {
        assert_eq!(split_ino(snap_ino(3, 77)), (3, 77));
        assert_eq!(split_ino(77), (0, 77));
        assert!(is_snapshot_ino(snap_ino(1, ROOT)));
        assert!(is_snapshot_ino(SNAPSHOTS_DIR));
        assert!(!is_snapshot_ino(LIVE_INO_LIMIT - 1));
    }
}
