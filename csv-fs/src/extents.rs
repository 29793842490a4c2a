//! A host's copy of one file's extent map, and how a byte range of the
//! file maps onto the LUN.
//!
//! The coordinator owns the map; a host fetches it under a lease and keeps
//! it while the file is open. Writes this host made into unwritten extents
//! are marked written here at once (so this host reads back what it wrote)
//! and reported to the coordinator at the next flush, fsync or close.

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

/// A file's extents by file offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, Extent>,
}

impl ExtentMap {
    /// From the coordinator's list.
    pub fn new(list: &[Extent]) -> ExtentMap {
        ExtentMap {
            map: list.iter().map(|e| (e.file_off, *e)).collect(),
        }
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
            let hit = self.map.range(..cut).next_back().map(|(&k, &e)| (k, e));
            if let Some((k, e)) = hit {
                if e.unwritten && e.file_off < cut && cut < e.file_off + e.len {
                    let head = cut - e.file_off;
                    self.map.insert(k, Extent { len: head, ..e });
                    self.map.insert(
                        cut,
                        Extent {
                            file_off: cut,
                            lun_off: e.lun_off + head,
                            len: e.len - head,
                            unwritten: true,
                        },
                    );
                }
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
