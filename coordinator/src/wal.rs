//! The durable log of a Raft replica: entries in one append-only file of
//! CRC-framed records, and the hard state (term, vote, commit) in a small
//! file replaced atomically.
//!
//! ```text
//! log file:   "CSVWAL\0\0" | major u16 | minor u16 | first index u64 |
//!             record* ; record = len u32 | crc32(rest) u32 | index u64 | term u64 | data
//! state file: "CSVHARD\0" | major u16 | minor u16 | term u64 | vote u64 | commit u64 | crc32 u32
//! ```
//!
//! Appends go to the end of the log and are durable after [`Wal::sync`]
//! (fdatasync). On open the log is read up to the first record that is
//! short or fails its checksum, a torn write from a crash, and the file is
//! cut there: nothing after it was acknowledged as durable, because
//! `sync` had not returned. Truncating a suffix (a new leader overwrote
//! entries) and compacting a prefix (after a snapshot) rewrite what stays
//! into a new file that replaces the old one by rename, so a crash during
//! either leaves the old or the new log, never a mix.
//!
//! Its files are reached through an [`Env`]: the local disk, or memory
//! with injected faults in tests.

use crate::env::{Env, LogFile};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const LOG_MAGIC: &[u8; 8] = b"CSVWAL\0\0";
const STATE_MAGIC: &[u8; 8] = b"CSVHARD\0";
const MAJOR: u16 = 1;
const MINOR: u16 = 0;
const LOG_HEADER: u64 = 8 + 2 + 2 + 8;
/// Largest entry accepted (a bigger length field is a torn or bad record).
pub const MAX_ENTRY: usize = 64 << 20;

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Raft index.
    pub index: u64,
    /// Raft term.
    pub term: u64,
    /// The command.
    pub data: Vec<u8>,
}

/// Raft's hard state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HardState {
    /// Current term.
    pub term: u64,
    /// Vote in that term (0: none).
    pub vote: u64,
    /// Commit index.
    pub commit: u64,
}

/// What went wrong with the log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// I/O on a log file.
    #[error("{what} of {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file that is not ours, or of a newer format.
    #[error("{path} is not a csv log of a version this build reads ({why})")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        why: &'static str,
    },
    /// An append that does not follow the last entry.
    #[error("entry {got} appended after {last}: entries must be contiguous")]
    Gap {
        /// Index of the last entry.
        last: u64,
        /// Index given.
        got: u64,
    },
}

type Result<T> = std::result::Result<T, WalError>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An open log with its entries in memory (the Raft storage reads them
/// from here; the file is for recovery).
#[derive(Debug)]
pub struct Wal {
    env: Arc<dyn Env>,
    dir: PathBuf,
    file: Box<dyn LogFile>,
    len: u64,
    first: u64,
    entries: Vec<Entry>,
    hard: HardState,
    /// Bytes cut off at open (a torn tail).
    pub torn_bytes: u64,
}

fn log_header(first: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(LOG_HEADER as usize);
    h.extend_from_slice(LOG_MAGIC);
    h.extend_from_slice(&MAJOR.to_le_bytes());
    h.extend_from_slice(&MINOR.to_le_bytes());
    h.extend_from_slice(&first.to_le_bytes());
    h
}

fn record(e: &Entry) -> Vec<u8> {
    let mut rest = Vec::with_capacity(16 + e.data.len());
    rest.extend_from_slice(&e.index.to_le_bytes());
    rest.extend_from_slice(&e.term.to_le_bytes());
    rest.extend_from_slice(&e.data);
    let mut r = Vec::with_capacity(8 + rest.len());
    r.extend_from_slice(&(rest.len() as u32).to_le_bytes());
    r.extend_from_slice(&crc32fast::hash(&rest).to_le_bytes());
    r.extend_from_slice(&rest);
    r
}

/// Parses records from `b`; returns the entries and the length of the
/// valid prefix.
fn parse(b: &[u8], first: u64) -> (Vec<Entry>, usize) {
    let mut out: Vec<Entry> = Vec::new();
    let mut at = 0usize;
    while at + 8 <= b.len() {
        let len = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
        let crc = u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]);
        if !(16..=MAX_ENTRY + 16).contains(&len) || at + 8 + len > b.len() {
            break;
        }
        let rest = &b[at + 8..at + 8 + len];
        if crc32fast::hash(rest) != crc {
            break;
        }
        let mut x = [0u8; 8];
        x.copy_from_slice(&rest[0..8]);
        let index = u64::from_le_bytes(x);
        x.copy_from_slice(&rest[8..16]);
        let term = u64::from_le_bytes(x);
        let expected = out.last().map_or(first, |e| e.index + 1);
        if index != expected {
            break;
        }
        out.push(Entry {
            index,
            term,
            data: rest[16..].to_vec(),
        });
        at += 8 + len;
    }
    (out, at)
}

impl Wal {
    /// Opens (or creates) the log in `dir`, cutting a torn tail.
    pub fn open(env: Arc<dyn Env>, dir: &Path) -> Result<Wal> {
        env.create_dir_all(dir)
            .map_err(io("create directory", dir))?;
        let path = dir.join("log");
        let file = env.open_log(&path).map_err(io("open", &path))?;
        let mut all = file.read_all().map_err(io("read", &path))?;
        let first = if all.is_empty() {
            let h = log_header(1);
            file.write_at(&h, 0).map_err(io("write header", &path))?;
            file.sync_data().map_err(io("sync", &path))?;
            sync_dir(env.as_ref(), dir)?;
            all = h;
            1
        } else {
            if all.len() < LOG_HEADER as usize || &all[..8] != LOG_MAGIC {
                return Err(WalError::Format {
                    path,
                    why: "bad magic",
                });
            }
            if u16::from_le_bytes([all[8], all[9]]) != MAJOR {
                return Err(WalError::Format {
                    path,
                    why: "unknown major version",
                });
            }
            let mut x = [0u8; 8];
            x.copy_from_slice(&all[12..20]);
            u64::from_le_bytes(x)
        };
        let (entries, valid) = parse(&all[LOG_HEADER as usize..], first);
        let len = LOG_HEADER + valid as u64;
        let torn_bytes = all.len() as u64 - len;
        if torn_bytes > 0 {
            file.set_len(len).map_err(io("cut torn tail", &path))?;
            file.sync_data().map_err(io("sync", &path))?;
        }
        let hard = read_state(env.as_ref(), &dir.join("state"))?;
        Ok(Wal {
            env,
            dir: dir.to_path_buf(),
            file,
            len,
            first,
            entries,
            hard,
            torn_bytes,
        })
    }

    /// Entries in the log, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Index of the first entry kept (entries before it were compacted).
    pub fn first_index(&self) -> u64 {
        self.first
    }

    /// Index of the last entry, or `first_index - 1` when empty.
    pub fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.first - 1, |e| e.index)
    }

    /// The hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard
    }

    /// Appends entries (contiguous with the log). Durable after `sync`.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let path = self.dir.join("log");
        let mut buf = Vec::new();
        let mut last = self.last_index();
        for e in entries {
            if e.index != last + 1 {
                return Err(WalError::Gap { last, got: e.index });
            }
            buf.extend_from_slice(&record(e));
            last = e.index;
        }
        self.file
            .write_at(&buf, self.len)
            .map_err(io("append", &path))?;
        self.len += buf.len() as u64;
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Makes every append durable.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(io("sync", &self.dir.join("log")))
    }

    /// Drops entries from `index` on (a leader replaced them).
    pub fn truncate_from(&mut self, index: u64) -> Result<()> {
        let keep: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.index < index)
            .cloned()
            .collect();
        self.rewrite(self.first, keep)
    }

    /// Drops entries up to and including `index` (a snapshot covers them).
    pub fn compact_to(&mut self, index: u64) -> Result<()> {
        let keep: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.index > index)
            .cloned()
            .collect();
        let first = (index + 1).max(self.first);
        self.rewrite(first, keep)
    }

    /// Drops every entry: the log restarts at `first` (a snapshot up to
    /// `first - 1` was installed).
    pub fn reset(&mut self, first: u64) -> Result<()> {
        self.rewrite(first, Vec::new())
    }

    fn rewrite(&mut self, first: u64, keep: Vec<Entry>) -> Result<()> {
        let path = self.dir.join("log");
        let tmp = self.dir.join("log.new");
        let mut bytes = log_header(first);
        for e in &keep {
            bytes.extend_from_slice(&record(e));
        }
        self.env
            .write_new(&tmp, &bytes)
            .map_err(io("write", &tmp))?;
        self.env
            .rename(&tmp, &path)
            .map_err(io("replace log", &path))?;
        sync_dir(self.env.as_ref(), &self.dir)?;
        self.file = self.env.open_log(&path).map_err(io("reopen", &path))?;
        self.len = bytes.len() as u64;
        self.first = first;
        self.entries = keep;
        Ok(())
    }

    /// Replaces the hard state durably (write, fsync, rename, fsync dir).
    pub fn set_hard_state(&mut self, h: HardState) -> Result<()> {
        let path = self.dir.join("state");
        let tmp = self.dir.join("state.new");
        let mut b = Vec::new();
        b.extend_from_slice(STATE_MAGIC);
        b.extend_from_slice(&MAJOR.to_le_bytes());
        b.extend_from_slice(&MINOR.to_le_bytes());
        b.extend_from_slice(&h.term.to_le_bytes());
        b.extend_from_slice(&h.vote.to_le_bytes());
        b.extend_from_slice(&h.commit.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        self.env.write_new(&tmp, &b).map_err(io("write", &tmp))?;
        self.env
            .rename(&tmp, &path)
            .map_err(io("replace hard state", &path))?;
        sync_dir(self.env.as_ref(), &self.dir)?;
        self.hard = h;
        Ok(())
    }
}

/// Makes a rename in `dir` durable.
pub fn sync_dir(env: &dyn Env, dir: &Path) -> Result<()> {
    env.sync_dir(dir).map_err(io("sync directory", dir))
}

fn read_state(env: &dyn Env, path: &Path) -> Result<HardState> {
    let b = match env.read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HardState::default()),
        Err(e) => {
            return Err(WalError::Io {
                what: "read",
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    // The state file is replaced by rename, so a torn one means damage,
    // not a crash: refuse it rather than guess.
    if b.len() != 8 + 4 + 24 + 4 || &b[..8] != STATE_MAGIC {
        return Err(WalError::Format {
            path: path.to_path_buf(),
            why: "bad size or magic",
        });
    }
    if u16::from_le_bytes([b[8], b[9]]) != MAJOR {
        return Err(WalError::Format {
            path: path.to_path_buf(),
            why: "unknown major version",
        });
    }
    let crc = u32::from_le_bytes([b[36], b[37], b[38], b[39]]);
    if crc32fast::hash(&b[..36]) != crc {
        return Err(WalError::Format {
            path: path.to_path_buf(),
            why: "checksum mismatch",
        });
    }
    let u = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    Ok(HardState {
        term: u(12),
        vote: u(20),
        commit: u(28),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{DiskEnv, MemEnv, Op};
    use proptest::prelude::*;

    fn e(index: u64, term: u64, n: usize) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; n],
        }
    }

    fn disk(d: &tempfile::TempDir) -> Result<Wal> {
        Wal::open(Arc::new(DiskEnv), d.path())
    }

    fn mem(env: &MemEnv) -> Result<Wal> {
        Wal::open(Arc::new(env.clone()), Path::new("/g"))
    }

    #[test]
    fn append_reopen_truncate_compact() {
        let d = tempfile::tempdir().unwrap();
        let mut w = disk(&d).unwrap();
        w.append(&[e(1, 1, 10), e(2, 1, 0), e(3, 2, 100)]).unwrap();
        w.sync().unwrap();
        w.set_hard_state(HardState {
            term: 2,
            vote: 3,
            commit: 2,
        })
        .unwrap();
        assert!(matches!(
            w.append(&[e(5, 2, 1)]),
            Err(WalError::Gap { last: 3, got: 5 })
        ));
        drop(w);
        let mut w = disk(&d).unwrap();
        assert_eq!(w.entries().len(), 3);
        assert_eq!(
            w.hard_state(),
            HardState {
                term: 2,
                vote: 3,
                commit: 2
            }
        );
        w.truncate_from(3).unwrap();
        w.append(&[e(3, 3, 5)]).unwrap();
        w.compact_to(1).unwrap();
        drop(w);
        let w = disk(&d).unwrap();
        assert_eq!(w.first_index(), 2);
        assert_eq!(w.entries(), &[e(2, 1, 0), e(3, 3, 5)]);
    }

    #[test]
    fn refuses_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("log"), b"something else entirely").unwrap();
        assert!(matches!(disk(&d), Err(WalError::Format { .. })));
    }

    #[test]
    fn a_failed_sync_is_an_error_that_names_the_file() {
        let env = MemEnv::new();
        let mut w = mem(&env).unwrap();
        w.append(&[e(1, 1, 3)]).unwrap();
        env.fail(Op::Sync, 1);
        let err = w.sync().unwrap_err();
        assert!(err.to_string().contains("sync of /g/log"), "{err}");
        w.sync().unwrap();
    }

    #[test]
    fn a_crash_loses_only_what_was_not_synced() {
        let env = MemEnv::new();
        let mut w = mem(&env).unwrap();
        w.append(&[e(1, 1, 3), e(2, 1, 4)]).unwrap();
        w.sync().unwrap();
        w.append(&[e(3, 2, 5)]).unwrap();
        drop(w);
        env.crash(0);
        let w = mem(&env).unwrap();
        assert_eq!(w.entries(), &[e(1, 1, 3), e(2, 1, 4)]);
        assert_eq!(w.torn_bytes, 0);
    }

    #[test]
    fn a_torn_record_is_cut_at_open() {
        let env = MemEnv::new();
        let mut w = mem(&env).unwrap();
        w.append(&[e(1, 1, 3)]).unwrap();
        w.sync().unwrap();
        w.append(&[e(2, 1, 40)]).unwrap();
        drop(w);
        // Half of the second record reached the disk.
        env.crash(30);
        let w = mem(&env).unwrap();
        assert_eq!(w.entries(), &[e(1, 1, 3)]);
        assert_eq!(w.torn_bytes, 30);
    }

    #[test]
    fn a_failed_rewrite_leaves_the_old_log() {
        let env = MemEnv::new();
        let mut w = mem(&env).unwrap();
        w.append(&[e(1, 1, 3), e(2, 1, 3), e(3, 1, 3)]).unwrap();
        w.sync().unwrap();
        env.fail(Op::Rename, 1);
        assert!(w.truncate_from(2).is_err());
        drop(w);
        env.crash(0);
        let w = mem(&env).unwrap();
        assert_eq!(w.entries().len(), 3, "the log before the rewrite");
    }

    #[test]
    fn a_hard_state_not_yet_renamed_into_place_is_the_old_one() {
        let env = MemEnv::new();
        let mut w = mem(&env).unwrap();
        let old = HardState {
            term: 1,
            vote: 1,
            commit: 0,
        };
        w.set_hard_state(old).unwrap();
        env.fail(Op::Rename, 1);
        let new = HardState {
            term: 2,
            vote: 3,
            commit: 0,
        };
        assert!(w.set_hard_state(new).is_err());
        drop(w);
        env.crash(0);
        assert_eq!(mem(&env).unwrap().hard_state(), old);
    }

    proptest! {
        /// A crash can cut the file anywhere after the last sync, or leave
        /// garbage there: reopening keeps every synced entry, keeps a
        /// prefix of the rest, and never invents one.
        #[test]
        fn torn_tails_lose_only_unsynced_entries(
            synced in 0usize..8, extra in 1usize..8, cut in any::<u64>(), garbage in prop::collection::vec(any::<u8>(), 0..40)
        ) {
            use std::os::unix::fs::FileExt;
            let d = tempfile::tempdir().unwrap();
            let mut w = disk(&d).unwrap();
            let all: Vec<Entry> = (1..=(synced + extra) as u64).map(|i| e(i, 1 + i / 3, (i * 7 % 50) as usize)).collect();
            w.append(&all[..synced]).unwrap();
            w.sync().unwrap();
            let durable = std::fs::metadata(d.path().join("log")).unwrap().len();
            w.append(&all[synced..]).unwrap();
            drop(w);
            let full = std::fs::metadata(d.path().join("log")).unwrap().len();
            let at = durable + cut % (full - durable + 1);
            let f = std::fs::OpenOptions::new().write(true).open(d.path().join("log")).unwrap();
            f.set_len(at).unwrap();
            f.write_all_at(&garbage, at).unwrap();
            drop(f);
            let w = disk(&d).unwrap();
            let got = w.entries();
            prop_assert!(got.len() >= synced, "synced entries lost");
            prop_assert_eq!(got, &all[..got.len()]);
        }
    }
}
