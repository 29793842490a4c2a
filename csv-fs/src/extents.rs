//! A host's copy of one file's extent map, and how a byte range of the
//! file maps onto the LUN.
//!
//! The coordinator owns the map; a host fetches it under a lease and keeps
//! it while the file is open. Writes this host made into unwritten extents
//! are marked written here at once (so this host reads back what it wrote)
//! and reported to the coordinator at the next flush, fsync or close.
//!
//! Extents the coordinator flags as shared with a snapshot are remembered
//! by file range: a write to a written one must go elsewhere (see
//! `coordinator::meta` on redirect-on-write), and [`ExtentMap::remap`]
//! puts the new place in the map.

use coordinator::meta::Extent;
use std::collections::BTreeMap;

/// One piece of a byte range: where its bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the file.
    pub file_off: u64,
    /// Length.
    pub len: u64,
    /// Where on the LUN (None: a hole, reads as zeros).
    pub lun_off: Option<u64>,
    /// Allocated but never written: reads as zeros.
    pub unwritten: bool,
}

/// Joins neighbouring pieces that continue each other on the LUN (or
/// are both holes) with the same written state: the I/O they stand for
/// is then one request. (Extents stay apart in the map, so a file grown
/// chunk by chunk into contiguous LUN space reads as one range here.)
pub fn coalesce(pieces: &[Piece]) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for &p in pieces {
        if let Some(last) = out.last_mut() {
            let continues = match (last.lun_off, p.lun_off) {
                (Some(a), Some(b)) => a + last.len == b,
                (None, None) => true,
                _ => false,
            };
            if continues && last.unwritten == p.unwritten && last.file_off + last.len == p.file_off
            {
                last.len += p.len;
                continue;
            }
        }
        out.push(p);
    }
    out
}

/// A file's extents by file offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, Extent>,
    /// File ranges shared with a snapshot: start -> end.
    shared: BTreeMap<u64, u64>,
}

impl ExtentMap {
    /// From the coordinator's list.
    pub fn new(list: &[Extent]) -> ExtentMap {
        ExtentMap {
            map: list.iter().map(|e| (e.file_off, *e)).collect(),
            shared: BTreeMap::new(),
        }
    }

    /// From the coordinator's list with its shared flags.
    pub fn with_shared(list: &[(Extent, bool)]) -> ExtentMap {
        let mut m = ExtentMap::new(&list.iter().map(|(e, _)| *e).collect::<Vec<_>>());
        for (e, shared) in list {
            if *shared {
                m.shared.insert(e.file_off, e.file_off + e.len);
            }
        }
        m
    }

    /// Everything mapped is shared now (a snapshot was just taken of
    /// what this map holds).
    pub fn share_all(&mut self) {
        self.shared.clear();
        let end = self.allocated_end();
        if end > 0 {
            self.shared.insert(0, end);
        }
    }

    /// Whether any byte of `[off, off + len)` is shared with a snapshot.
    pub fn is_shared(&self, off: u64, len: u64) -> bool {
        let end = off.saturating_add(len);
        let first = self
            .shared
            .range(..=off)
            .next_back()
            .map_or(off, |(&s, _)| s);
        self.shared
            .range(first..end)
            .any(|(&s, &e)| s < end && e > off)
    }

    /// The extent holding file offset `off`.
    pub fn extent_at(&self, off: u64) -> Option<Extent> {
        self.map
            .range(..=off)
            .next_back()
            .map(|(_, e)| *e)
            .filter(|e| off < e.file_off + e.len)
    }

    /// Points `[off, ...)` at new, written LUN pieces (a redirected write),
    /// no longer shared.
    pub fn remap(&mut self, off: u64, pieces: &[(u64, u64)]) {
        let len: u64 = pieces.iter().map(|p| p.1).sum();
        let end = off + len;
        self.split(off);
        self.split(end);
        let keys: Vec<u64> = self.map.range(off..end).map(|(&k, _)| k).collect();
        for k in keys {
            self.map.remove(&k);
        }
        let mut at = off;
        for &(lun_off, l) in pieces {
            self.map.insert(
                at,
                Extent {
                    file_off: at,
                    lun_off,
                    len: l,
                    unwritten: false,
                },
            );
            at += l;
        }
        // Cut the range out of the shared ranges.
        let first = self
            .shared
            .range(..=off)
            .next_back()
            .map_or(off, |(&s, _)| s);
        let hit: Vec<(u64, u64)> = self
            .shared
            .range(first..end)
            .filter(|(&s, &e)| s < end && e > off)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.shared.remove(&s);
            if s < off {
                self.shared.insert(s, off);
            }
            if e > end {
                self.shared.insert(end, e);
            }
        }
    }

    /// Splits the extent straddling `cut` there.
    fn split(&mut self, cut: u64) {
        coordinator::meta::split_extents(&mut self.map, cut);
    }

    /// Adds extents the coordinator just allocated.
    pub fn insert(&mut self, list: &[Extent]) {
        for e in list {
            self.map.insert(e.file_off, *e);
        }
    }

    /// End of the last extent (allocated bytes may run past the size).
    pub fn allocated_end(&self) -> u64 {
        self.map
            .values()
            .next_back()
            .map_or(0, |e| e.file_off + e.len)
    }

    /// Drops extents at and beyond `size` (after a truncate; the
    /// coordinator cut its own map the same way).
    pub fn truncate(&mut self, size: u64) {
        let keys: Vec<u64> = self.map.range(..).map(|(&k, _)| k).collect();
        for k in keys {
            let Some(e) = self.map.get(&k).copied() else {
                continue;
            };
            if e.file_off >= size {
                self.map.remove(&k);
            } else if e.file_off + e.len > size {
                self.map.insert(
                    k,
                    Extent {
                        len: size - e.file_off,
                        ..e
                    },
                );
            }
        }
    }

    /// The pieces of `[off, off + len)`, in order, covering all of it.
    pub fn pieces(&self, off: u64, len: u64) -> Vec<Piece> {
        let end = off.saturating_add(len);
        let mut out = Vec::new();
        let mut at = off;
        let first = self
            .map
            .range(..=off)
            .next_back()
            .map(|(&k, _)| k)
            .unwrap_or(off);
        for (_, e) in self.map.range(first..end) {
            let e_end = e.file_off + e.len;
            if e_end <= at {
                continue;
            }
            if e.file_off > at {
                out.push(Piece {
                    file_off: at,
                    len: e.file_off - at,
                    lun_off: None,
                    unwritten: false,
                });
                at = e.file_off;
            }
            let n = e_end.min(end) - at;
            out.push(Piece {
                file_off: at,
                len: n,
                lun_off: Some(e.lun_off + (at - e.file_off)),
                unwritten: e.unwritten,
            });
            at += n;
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push(Piece {
                file_off: at,
                len: end - at,
                lun_off: None,
                unwritten: false,
            });
        }
        out
    }

    /// Whether any byte of `[off, off + len)` is a hole.
    pub fn has_hole(&self, off: u64, len: u64) -> bool {
        self.pieces(off, len).iter().any(|p| p.lun_off.is_none())
    }

    /// Marks `[off, off + len)` written, splitting unwritten extents at
    /// its edges. Returns whether any unwritten byte became written (the
    /// coordinator must then be told).
    pub fn mark_written(&mut self, off: u64, len: u64) -> bool {
        let end = off.saturating_add(len);
        let mut changed = false;
        for cut in [off, end] {
            if self.extent_at(cut).is_some_and(|e| e.unwritten) {
                self.split(cut);
            }
        }
        for (_, e) in self.map.range_mut(off..end) {
            if e.unwritten {
                e.unwritten = false;
                changed = true;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(file_off: u64, lun_off: u64, len: u64, unwritten: bool) -> Extent {
        Extent {
            file_off,
            lun_off,
            len,
            unwritten,
        }
    }

    #[test]
    fn coalesce_joins_only_what_continues_on_the_lun() {
        let m = ExtentMap::new(&[
            ext(0, 1 << 20, 65536, false),
            ext(65536, (1 << 20) + 65536, 65536, false),
            // Continues on the LUN, but never written.
            ext(131072, (1 << 20) + 131072, 65536, true),
            // Written, elsewhere on the LUN.
            ext(196608, 8 << 20, 65536, false),
        ]);
        let p = coalesce(&m.pieces(0, 5 * 65536));
        let got: Vec<(u64, u64, Option<u64>, bool)> = p
            .iter()
            .map(|p| (p.file_off, p.len, p.lun_off, p.unwritten))
            .collect();
        assert_eq!(
            got,
            [
                (0, 131072, Some(1 << 20), false),
                (131072, 65536, Some((1 << 20) + 131072), true),
                (196608, 65536, Some(8 << 20), false),
                (262144, 65536, None, false),
            ]
        );
    }

    #[test]
    fn pieces_cover_holes_and_extents() {
        let m = ExtentMap::new(&[
            ext(4096, 1 << 20, 8192, false),
            ext(16384, 2 << 20, 4096, true),
        ]);
        let p = m.pieces(0, 24576);
        assert_eq!(
            p,
            vec![
                Piece {
                    file_off: 0,
                    len: 4096,
                    lun_off: None,
                    unwritten: false
                },
                Piece {
                    file_off: 4096,
                    len: 8192,
                    lun_off: Some(1 << 20),
                    unwritten: false
                },
                Piece {
                    file_off: 12288,
                    len: 4096,
                    lun_off: None,
                    unwritten: false
                },
                Piece {
                    file_off: 16384,
                    len: 4096,
                    lun_off: Some(2 << 20),
                    unwritten: true
                },
                Piece {
                    file_off: 20480,
                    len: 4096,
                    lun_off: None,
                    unwritten: false
                },
            ]
        );
        assert_eq!(
            m.pieces(6000, 100),
            vec![Piece {
                file_off: 6000,
                len: 100,
                lun_off: Some((1 << 20) + 1904),
                unwritten: false
            }]
        );
    }

    #[test]
    fn marking_splits_unwritten_extents() {
        let mut m = ExtentMap::new(&[ext(0, 1 << 20, 1 << 20, true)]);
        assert!(m.mark_written(4096, 100));
        assert!(!m.mark_written(4096, 100));
        let p = m.pieces(0, 1 << 20);
        assert_eq!(p.len(), 3);
        assert!(p[0].unwritten && !p[1].unwritten && p[2].unwritten);
        assert_eq!(
            (p[1].file_off, p[1].len, p[1].lun_off),
            (4096, 100, Some((1 << 20) + 4096))
        );
    }

    #[test]
    fn a_remapped_range_is_written_and_no_longer_shared() {
        let mut m = ExtentMap::with_shared(&[(ext(0, 1 << 20, 65536, false), true)]);
        assert!(m.is_shared(4096, 1));
        m.remap(8192, &[(5 << 20, 4096), (7 << 20, 4096)]);
        assert!(!m.is_shared(8192, 8192));
        assert!(m.is_shared(0, 8192) && m.is_shared(16384, 1));
        let p = m.pieces(0, 65536);
        let l: Vec<(u64, Option<u64>)> = p.iter().map(|p| (p.len, p.lun_off)).collect();
        assert_eq!(
            l,
            vec![
                (8192, Some(1 << 20)),
                (4096, Some(5 << 20)),
                (4096, Some(7 << 20)),
                (49152, Some((1 << 20) + 16384)),
            ]
        );
        assert_eq!(m.extent_at(9000).unwrap().lun_off, 5 << 20);
        assert!(m.extent_at(1 << 30).is_none());
    }

    proptest! {
        /// Pieces tile the range exactly, and map file offsets to the LUN
        /// the same way the extents do, whatever was marked written.
        #[test]
        fn pieces_tile_the_range(
            marks in proptest::collection::vec((0u64..1 << 16, 0u64..5000), 0..10),
            off in 0u64..1 << 16,
            len in 0u64..1 << 16,
        ) {
            let base = [ext(4096, 1 << 20, 16384, true), ext(32768, 3 << 20, 8192, true)];
            let mut m = ExtentMap::new(&base);
            for (o, l) in marks {
                m.mark_written(o, l);
            }
            let p = m.pieces(off, len);
            let mut at = off;
            for x in &p {
                prop_assert_eq!(x.file_off, at);
                prop_assert!(x.len > 0);
                at += x.len;
                if let Some(l) = x.lun_off {
                    let e = base.iter().find(|e| e.file_off <= x.file_off && x.file_off < e.file_off + e.len).unwrap();
                    prop_assert_eq!(l, e.lun_off + (x.file_off - e.file_off));
                }
            }
            prop_assert_eq!(at, off + len);
        }
    }
}
