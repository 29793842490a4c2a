//! The LUN space allocator of a volume: free space as a set of disjoint,
//! coalesced intervals.

use std::collections::BTreeMap;

/// Free space: start -> length, disjoint and never adjacent (coalesced).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocator {
    free: BTreeMap<u64, u64>,
}

impl Allocator {
    /// All of `[start, end)` free.
    pub fn new(start: u64, end: u64) -> Self {
        let mut a = Allocator::default();
        if end > start {
            a.free.insert(start, end - start);
        }
        a
    }

    /// An allocator whose free space is exactly `intervals` (as saved by a
    /// snapshot). Fails on overlapping or touching intervals.
    pub fn from_intervals(intervals: &[(u64, u64)]) -> Option<Self> {
        let mut a = Allocator::default();
        for &(s, l) in intervals {
            if l == 0 || s.checked_add(l).is_none() || !a.release(s, l) {
                return None;
            }
        }
        (a.free.len() == intervals.len()).then_some(a)
    }

    /// Free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    /// The free intervals.
    pub fn intervals(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.free.iter().map(|(&s, &l)| (s, l))
    }

    /// Takes `len` bytes, as few pieces as it can: the first interval at
    /// or after `hint` that holds all of it, else the largest pieces
    /// first. Returns the pieces, or `None` (and takes nothing) when less
    /// than `len` is free.
    pub fn allocate(&mut self, len: u64, hint: u64) -> Option<Vec<(u64, u64)>> {
        if len == 0 {
            return Some(Vec::new());
        }
        if self.free_bytes() < len {
            return None;
        }
        let whole = self
            .free
            .range(hint..)
            .chain(self.free.range(..hint))
            .find(|(_, &l)| l >= len)
            .map(|(&s, _)| s);
        if let Some(s) = whole {
            self.take(s, len);
            return Some(vec![(s, len)]);
        }
        let mut by_size: Vec<(u64, u64)> = self.intervals().collect();
        by_size.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = Vec::new();
        let mut left = len;
        for (s, l) in by_size {
            let n = l.min(left);
            self.take(s, n);
            out.push((s, n));
            left -= n;
            if left == 0 {
                break;
            }
        }
        out.sort_unstable();
        Some(out)
    }

    /// Like [`Allocator::allocate`], but every piece starts at a multiple
    /// of `align` (a power of two): files never share a sector, so one
    /// host's read-modify-write of a partial sector cannot touch another
    /// file. Unaligned slivers stay free until their neighbours come back.
    pub fn allocate_aligned(&mut self, len: u64, hint: u64, align: u64) -> Option<Vec<(u64, u64)>> {
        if len == 0 {
            return Some(Vec::new());
        }
        let usable = |s: u64, l: u64| -> Option<(u64, u64)> {
            let a = s.checked_next_multiple_of(align)?;
            let end = s.checked_add(l)?;
            (a < end).then(|| (a, end - a))
        };
        let avail: u64 = self
            .intervals()
            .filter_map(|(s, l)| usable(s, l))
            .map(|(_, n)| n)
            .sum();
        if avail < len {
            return None;
        }
        let whole = self
            .free
            .range(hint..)
            .chain(self.free.range(..hint))
            .filter_map(|(&s, &l)| usable(s, l).map(|u| (s, u)))
            .find(|(_, (_, n))| *n >= len)
            .map(|(s, (a, _))| (s, a));
        if let Some((s, a)) = whole {
            self.take_at(s, a, len);
            return Some(vec![(a, len)]);
        }
        let mut by_size: Vec<(u64, u64, u64)> = self
            .intervals()
            .filter_map(|(s, l)| usable(s, l).map(|(a, n)| (s, a, n)))
            .collect();
        by_size.sort_by(|x, y| y.2.cmp(&x.2).then(x.1.cmp(&y.1)));
        let mut out = Vec::new();
        let mut left = len;
        for (s, a, n) in by_size {
            let n = n.min(left);
            self.take_at(s, a, n);
            out.push((a, n));
            left -= n;
            if left == 0 {
                break;
            }
        }
        out.sort_unstable();
        Some(out)
    }

    /// Removes `[a, a + n)` from the free interval that starts at `s`
    /// (with `s <= a`), keeping what lies before and after free.
    fn take_at(&mut self, s: u64, a: u64, n: u64) {
        if let Some(l) = self.free.remove(&s) {
            if a > s {
                self.free.insert(s, a - s);
            }
            let end = s + l;
            if a + n < end {
                self.free.insert(a + n, end - a - n);
            }
        }
    }

    /// Removes `[s, s + n)` from the front of the free interval at `s`.
    fn take(&mut self, s: u64, n: u64) {
        if let Some(l) = self.free.remove(&s) {
            if l > n {
                self.free.insert(s + n, l - n);
            }
        }
    }

    /// Gives `[start, start + len)` back. Returns false (and changes
    /// nothing) if any of it is free already: a double free.
    pub fn release(&mut self, start: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let end = start + len;
        let before = self.free.range(..end).next_back().map(|(&s, &l)| (s, l));
        if let Some((s, l)) = before {
            if s + l > start {
                return false;
            }
        }
        let mut s0 = start;
        let mut l0 = len;
        if let Some((s, l)) = before {
            if s + l == start {
                self.free.remove(&s);
                s0 = s;
                l0 += l;
            }
        }
        if let Some(&l) = self.free.get(&end) {
            self.free.remove(&end);
            l0 += l;
        }
        self.free.insert(s0, l0);
        true
    }

    /// Whether any byte of `[start, start + len)` is free.
    pub fn overlaps(&self, start: u64, len: u64) -> bool {
        let end = start + len;
        self.free
            .range(..end)
            .next_back()
            .is_some_and(|(&s, &l)| s + l > start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocates_and_coalesces() {
        let mut a = Allocator::new(0, 100);
        let x = a.allocate(30, 0).unwrap();
        let y = a.allocate(30, 0).unwrap();
        assert_eq!((x, y.clone()), (vec![(0, 30)], vec![(30, 30)]));
        assert!(a.release(0, 30));
        assert!(!a.release(10, 5), "double free refused");
        let z = a.allocate(50, 0).unwrap();
        assert_eq!(z, vec![(0, 10), (60, 40)]);
        assert!(a.release(30, 30));
        assert!(a.allocate(1000, 0).is_none());
    }

    proptest! {
        /// Against a bitmap model: allocations never overlap each other or
        /// free space, and releasing everything gives back one interval.
        #[test]
        fn matches_a_bitmap(ops in prop::collection::vec((any::<bool>(), 1u64..40, any::<u16>()), 1..60)) {
            const N: u64 = 256;
            let mut a = Allocator::new(0, N);
            let mut used = vec![false; N as usize];
            let mut held: Vec<(u64, u64)> = Vec::new();
            for (alloc, len, pick) in ops {
                if alloc || held.is_empty() {
                    if let Some(pieces) = a.allocate(len, u64::from(pick) % N) {
                        prop_assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), len);
                        for (s, l) in pieces {
                            for i in s..s + l {
                                prop_assert!(!used[i as usize], "byte {} given twice", i);
                                used[i as usize] = true;
                            }
                            held.push((s, l));
                        }
                    } else {
                        prop_assert!(used.iter().filter(|u| !**u).count() < len as usize);
                    }
                } else {
                    let (s, l) = held.swap_remove(usize::from(pick) % held.len());
                    prop_assert!(a.release(s, l));
                    for i in s..s + l {
                        used[i as usize] = false;
                    }
                }
                let free_model = used.iter().filter(|u| !**u).count() as u64;
                prop_assert_eq!(a.free_bytes(), free_model);
                for (s, l) in a.intervals() {
                    for i in s..s + l {
                        prop_assert!(!used[i as usize]);
                    }
                }
            }
            for (s, l) in held {
                prop_assert!(a.release(s, l));
            }
            prop_assert_eq!(a.intervals().collect::<Vec<_>>(), vec![(0, N)]);
        }
    }
}
