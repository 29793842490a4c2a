//! VHDX's metadata log ([MS-VHDX] 2.3): a circular buffer of entries, each
//! a set of 4 KiB sector writes (and zeroed ranges) to the file, written
//! and flushed before the sectors are written in place. After a crash the
//! entries of the active sequence are written again (replayed), so a
//! metadata update (a BAT sector) is whole or absent.
//!
//! An entry: a 64-byte header and 32-byte descriptors filling whole 4 KiB
//! sectors, then one 4 KiB data sector per data descriptor. A data sector
//! keeps 4084 bytes of the sector it stands for; the first 8 and the last
//! 4 are in its descriptor, so that every data sector can carry the
//! entry's sequence number at both ends (a torn entry is found).

use super::format::{guid_at, le32, le64, seal, sealed, Guid};

pub const SIG_ENTRY: &[u8; 4] = b"loge";
pub const SIG_ZERO: &[u8; 4] = b"zero";
pub const SIG_DESC: &[u8; 4] = b"desc";
pub const SIG_DATA: &[u8; 4] = b"data";
pub const SECTOR: usize = 4096;
const ENTRY_HEADER: usize = 64;
const DESCRIPTOR: usize = 32;

/// One write a log entry makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// A whole 4 KiB sector at a 4 KiB-aligned file offset.
    Sector { offset: u64, data: Box<[u8]> },
    /// `length` bytes of zeros.
    Zero { offset: u64, length: u64 },
}

/// A valid entry found in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its position in the log (bytes from the log's start).
    pub at: u64,
    pub length: u32,
    /// The position of the first entry of its sequence.
    pub tail: u32,
    pub sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub writes: Vec<Write>,
}

/// Sectors an entry's header and `n` descriptors take.
fn descriptor_sectors(n: usize) -> usize {
    (ENTRY_HEADER + DESCRIPTOR * n).div_ceil(SECTOR)
}

/// `len` bytes of the circular `log` from `at`.
fn wrapped(log: &[u8], at: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut p = at;
    while out.len() < len {
        let n = (len - out.len()).min(log.len() - p);
        out.extend_from_slice(&log[p..p + n]);
        p = (p + n) % log.len();
    }
    out
}

/// The entry at `at` in `log` if it is whole and belongs to `guid`.
pub fn parse_entry(log: &[u8], at: usize, guid: &Guid) -> Option<Entry> {
    if log.len() < SECTOR || at % SECTOR != 0 || at >= log.len() {
        return None;
    }
    let head = wrapped(log, at, SECTOR);
    if &head[..4] != SIG_ENTRY {
        return None;
    }
    let length = le32(&head, 8) as usize;
    if length < SECTOR || length % SECTOR != 0 || length > log.len() {
        return None;
    }
    let tail = le32(&head, 12);
    let sequence = le64(&head, 16);
    let count = le32(&head, 24) as usize;
    if sequence == 0 || guid_at(&head, 32) != *guid || tail as usize % SECTOR != 0 {
        return None;
    }
    if count > (length / SECTOR) * (SECTOR / DESCRIPTOR) {
        return None;
    }
    let e = wrapped(log, at, length);
    if !sealed(&e, 4) {
        return None;
    }
    let dsec = descriptor_sectors(count);
    let mut data_at = dsec * SECTOR;
    let mut writes = Vec::with_capacity(count);
    for i in 0..count {
        let d = ENTRY_HEADER + DESCRIPTOR * i;
        if d + DESCRIPTOR > dsec * SECTOR || le64(&e, d + 24) != sequence {
            return None;
        }
        let offset = le64(&e, d + 16);
        match &e[d..d + 4] {
            s if s == SIG_ZERO => {
                let length = le64(&e, d + 8);
                if offset % SECTOR as u64 != 0 || length % SECTOR as u64 != 0 {
                    return None;
                }
                writes.push(Write::Zero { offset, length });
            }
            s if s == SIG_DESC => {
                if offset % SECTOR as u64 != 0 || data_at + SECTOR > length {
                    return None;
                }
                let s = &e[data_at..data_at + SECTOR];
                let seq = u64::from(le32(s, 4)) << 32 | u64::from(le32(s, 4092));
                if &s[..4] != SIG_DATA || seq != sequence {
                    return None;
                }
                let mut data = vec![0u8; SECTOR].into_boxed_slice();
                data[..8].copy_from_slice(&e[d + 8..d + 16]);
                data[8..4092].copy_from_slice(&s[8..4092]);
                data[4092..].copy_from_slice(&e[d + 4..d + 8]);
                writes.push(Write::Sector { offset, data });
                data_at += SECTOR;
            }
            _ => return None,
        }
    }
    if data_at != length {
        return None;
    }
    Some(Entry {
        at: at as u64,
        length: length as u32,
        tail,
        sequence,
        flushed_file_offset: le64(&head, 48),
        last_file_offset: le64(&head, 56),
        writes,
    })
}

/// The active sequence of `log` (the entries to replay, oldest first):
/// of the sequences of valid entries, each running from its head entry's
/// tail to the head with consecutive sequence numbers, the one whose head
/// has the highest number. Empty when there is none.
pub fn active_sequence(log: &[u8], guid: &Guid) -> Vec<Entry> {
    if log.len() < SECTOR || log.len() % SECTOR != 0 {
        return vec![];
    }
    let mut valid: Vec<Entry> = (0..log.len() / SECTOR)
        .filter_map(|i| parse_entry(log, i * SECTOR, guid))
        .collect();
    valid.sort_by_key(|e| std::cmp::Reverse(e.sequence));
    for head in &valid {
        // Walk from the tail to the head.
        let mut seq = Vec::new();
        let mut at = head.tail as usize;
        let mut ok = false;
        for _ in 0..log.len() / SECTOR {
            let Some(e) = parse_entry(log, at, guid) else {
                break;
            };
            if seq
                .last()
                .is_some_and(|p: &Entry| p.sequence + 1 != e.sequence)
            {
                break;
            }
            let done = e.at == head.at;
            at = (at + e.length as usize) % log.len();
            seq.push(e);
            if done {
                ok = seq.last().is_some_and(|e| e.sequence == head.sequence);
                break;
            }
        }
        if ok {
            return seq;
        }
    }
    vec![]
}

/// The bytes of an entry of `writes`: `sequence` of log `guid`, its
/// sequence starting at `tail`, with the file's length now (`flushed`)
/// and after the writes (`last`). Sector writes must be 4 KiB-aligned.
pub fn build_entry(
    writes: &[Write],
    sequence: u64,
    tail: u32,
    guid: &Guid,
    flushed: u64,
    last: u64,
) -> Vec<u8> {
    let dsec = descriptor_sectors(writes.len());
    let data = writes
        .iter()
        .filter(|w| matches!(w, Write::Sector { .. }))
        .count();
    let mut e = vec![0u8; (dsec + data) * SECTOR];
    let len = e.len() as u32;
    e[..4].copy_from_slice(SIG_ENTRY);
    e[8..12].copy_from_slice(&len.to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&sequence.to_le_bytes());
    e[24..28].copy_from_slice(&(writes.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&flushed.to_le_bytes());
    e[56..64].copy_from_slice(&last.to_le_bytes());
    let mut data_at = dsec * SECTOR;
    for (i, w) in writes.iter().enumerate() {
        let d = ENTRY_HEADER + DESCRIPTOR * i;
        match w {
            Write::Zero { offset, length } => {
                e[d..d + 4].copy_from_slice(SIG_ZERO);
                e[d + 8..d + 16].copy_from_slice(&length.to_le_bytes());
                e[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
            }
            Write::Sector { offset, data } => {
                e[d..d + 4].copy_from_slice(SIG_DESC);
                e[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
                e[d + 8..d + 16].copy_from_slice(&data[..8]);
                e[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
                let s = &mut e[data_at..data_at + SECTOR];
                s[..4].copy_from_slice(SIG_DATA);
                s[4..8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
                s[8..4092].copy_from_slice(&data[8..4092]);
                s[4092..].copy_from_slice(&(sequence as u32).to_le_bytes());
                data_at += SECTOR;
            }
        }
        e[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
    }
    seal(&mut e, 4);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(fill: u8) -> Box<[u8]> {
        (0..SECTOR)
            .map(|i| fill ^ (i as u8))
            .collect::<Vec<_>>()
            .into_boxed_slice()
    }

    #[test]
    fn an_entry_round_trips_and_a_torn_one_is_not_valid() {
        let g = [9u8; 16];
        let writes = vec![
            Write::Sector {
                offset: 3 << 20,
                data: sector(1),
            },
            Write::Zero {
                offset: 8 << 20,
                length: 1 << 20,
            },
            Write::Sector {
                offset: (3 << 20) + 4096,
                data: sector(2),
            },
        ];
        let e = build_entry(&writes, 5, 0, &g, 10 << 20, 11 << 20);
        assert_eq!(e.len(), 3 * SECTOR);
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        let got = parse_entry(&log, 0, &g).unwrap();
        assert_eq!(got.writes, writes);
        assert_eq!((got.sequence, got.last_file_offset), (5, 11 << 20));
        assert!(parse_entry(&log, 0, &[8u8; 16]).is_none(), "another log's");
        // A data sector from an older write (torn entry).
        log[2 * SECTOR + 100] ^= 1;
        assert!(parse_entry(&log, 0, &g).is_none());
    }

    #[test]
    fn the_active_sequence_is_the_newest_whole_one_and_may_wrap() {
        let g = [3u8; 16];
        let one = |seq: u64, tail: u32, fill: u8| {
            build_entry(
                &[Write::Sector {
                    offset: 1 << 20,
                    data: sector(fill),
                }],
                seq,
                tail,
                &g,
                4 << 20,
                4 << 20,
            )
        };
        let mut log = vec![0u8; 16 * SECTOR];
        // An old sequence of one entry at sector 4.
        let a = one(10, 4 * SECTOR as u32, 1);
        log[4 * SECTOR..6 * SECTOR].copy_from_slice(&a);
        assert_eq!(active_sequence(&log, &g).len(), 1);
        // A newer sequence of two from sector 13, the second entry wrapping
        // round to sector 0.
        let b = one(11, 13 * SECTOR as u32, 2);
        let c = one(12, 13 * SECTOR as u32, 3);
        log[13 * SECTOR..15 * SECTOR].copy_from_slice(&b);
        log[15 * SECTOR..].copy_from_slice(&c[..SECTOR]);
        log[..SECTOR].copy_from_slice(&c[SECTOR..]);
        let s = active_sequence(&log, &g);
        assert_eq!(s.iter().map(|e| e.sequence).collect::<Vec<_>>(), [11, 12]);
        assert_eq!(
            s[1].writes[0],
            Write::Sector {
                offset: 1 << 20,
                data: sector(3)
            }
        );
        // The newest entry torn: the sequence before it is whole.
        log[9] ^= 0xff;
        let s = active_sequence(&log, &g);
        assert_eq!(s.iter().map(|e| e.sequence).collect::<Vec<_>>(), [11]);
    }
}
