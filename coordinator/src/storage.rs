//! A replica's Raft storage on its local disk: the log and hard state in a
//! [`Wal`], the latest snapshot in a checksummed file.
//!
//! ```text
//! snapshot file: "CSVSNAP\0" | major u16 | minor u16 | len u64 | crc32 u32 | eraftpb::Snapshot
//! ```
//!
//! Durability rules (what raft-rs requires of us):
//! - entries are durable when [`RaftStore::sync`] returns, before the
//!   messages that acknowledge them leave this host;
//! - term and vote are written and synced before any message of that term
//!   leaves (a node must never vote twice in one term);
//! - the commit index is kept in memory and written with the next term or
//!   vote change or snapshot. A commit index that is behind after a crash
//!   is safe: it is learned again from the leader, and on restart it is
//!   raised to at least the snapshot's index (everything in a snapshot was
//!   committed).

use crate::env::Env;
use crate::wal::{self, Wal, WalError};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SNAP_MAGIC: &[u8; 8] = b"CSVSNAP\0";
const SNAP_MAJOR: u16 = 1;
const SNAP_MINOR: u16 = 0;
const SNAP_HEADER: usize = 8 + 2 + 2 + 8 + 4;

/// What went wrong with a replica's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The log.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The snapshot file.
    #[error("snapshot {path}: {why}")]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// A log record that is not a Raft entry.
    #[error("log entry {index} does not decode: {why}")]
    Entry {
        /// Its index.
        index: u64,
        /// Why.
        why: String,
    },
}

/// A replica's durable state.
#[derive(Debug)]
pub struct RaftStore {
    env: Arc<dyn Env>,
    dir: PathBuf,
    wal: Wal,
    /// Decoded copies of the log's entries (raft-rs reads them often).
    entries: Vec<Entry>,
    hard: HardState,
    durable: wal::HardState,
    snap: Snapshot,
}

fn snap_path(dir: &Path) -> PathBuf {
    dir.join("snapshot")
}

fn read_snapshot(env: &dyn Env, path: &Path) -> Result<Option<Snapshot>, StoreError> {
    let bad = |why: String| StoreError::Snapshot {
        path: path.to_path_buf(),
        why,
    };
    let b = match env.read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    if b.len() < SNAP_HEADER || &b[..8] != SNAP_MAGIC {
        return Err(bad("not a csv Raft snapshot (bad magic)".into()));
    }
    let major = u16::from_le_bytes([b[8], b[9]]);
    if major != SNAP_MAJOR {
        return Err(bad(format!(
            "format version {major} is not supported (this build reads {SNAP_MAJOR})"
        )));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&b[12..20]);
    let len = u64::from_le_bytes(l);
    let body = &b[SNAP_HEADER..];
    if body.len() as u64 != len {
        return Err(bad(format!(
            "{} bytes of body, header says {len}",
            body.len()
        )));
    }
    let mut c = [0u8; 4];
    c.copy_from_slice(&b[20..24]);
    if crc32fast::hash(body) != u32::from_le_bytes(c) {
        return Err(bad("checksum mismatch: the file is damaged".into()));
    }
    Snapshot::parse_from_bytes(body)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

fn write_snapshot(env: &dyn Env, dir: &Path, s: &Snapshot) -> Result<(), StoreError> {
    let path = snap_path(dir);
    let bad = |why: String| StoreError::Snapshot {
        path: path.clone(),
        why,
    };
    let body = s.write_to_bytes().map_err(|e| bad(e.to_string()))?;
    let mut b = Vec::with_capacity(SNAP_HEADER + body.len());
    b.extend_from_slice(SNAP_MAGIC);
    b.extend_from_slice(&SNAP_MAJOR.to_le_bytes());
    b.extend_from_slice(&SNAP_MINOR.to_le_bytes());
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    b.extend_from_slice(&body);
    let tmp = dir.join("snapshot.new");
    env.write_new(&tmp, &b).map_err(|e| bad(e.to_string()))?;
    env.rename(&tmp, &path).map_err(|e| bad(e.to_string()))?;
    wal::sync_dir(env, dir)?;
    Ok(())
}

fn decode(e: &wal::Entry) -> Result<Entry, StoreError> {
    let d = Entry::parse_from_bytes(&e.data).map_err(|x| StoreError::Entry {
        index: e.index,
        why: x.to_string(),
    })?;
    if d.index != e.index || d.term != e.term {
        return Err(StoreError::Entry {
            index: e.index,
            why: format!("record says index {} term {}", d.index, d.term),
        });
    }
    Ok(d)
}

impl RaftStore {
    /// Whether `dir` holds a replica.
    pub fn exists(env: &dyn Env, dir: &Path) -> bool {
        env.exists(&snap_path(dir))
    }

    /// Creates a replica whose group starts with the configuration `cs`
    /// (empty for a host that joins later and waits to be added).
    pub fn create(env: Arc<dyn Env>, dir: &Path, cs: ConfState) -> Result<RaftStore, StoreError> {
        env.create_dir_all(dir).map_err(|e| StoreError::Snapshot {
            path: dir.to_path_buf(),
            why: e.to_string(),
        })?;
        let mut s = Snapshot::default();
        s.mut_metadata().set_conf_state(cs);
        write_snapshot(env.as_ref(), dir, &s)?;
        RaftStore::open(env, dir)
    }

    /// Opens a replica.
    pub fn open(env: Arc<dyn Env>, dir: &Path) -> Result<RaftStore, StoreError> {
        let snap =
            read_snapshot(env.as_ref(), &snap_path(dir))?.ok_or_else(|| StoreError::Snapshot {
                path: snap_path(dir),
                why: "missing: this directory holds no replica".into(),
            })?;
        let mut wal = Wal::open(env.clone(), dir)?;
        let si = snap.get_metadata().index;
        if wal.first_index() <= si {
            // Crash between writing a snapshot and compacting the log.
            wal.compact_to(si)?;
        }
        if wal.first_index() > si + 1 {
            return Err(StoreError::Snapshot {
                path: snap_path(dir),
                why: format!(
                    "snapshot ends at {si} but the log starts at {}: entries are missing",
                    wal.first_index()
                ),
            });
        }
        let entries = wal.entries().iter().map(decode).collect::<Result<_, _>>()?;
        let d = wal.hard_state();
        let hard = HardState {
            term: d.term,
            vote: d.vote,
            commit: d.commit.max(si).min(wal.last_index()),
            ..Default::default()
        };
        Ok(RaftStore {
            env,
            dir: dir.to_path_buf(),
            wal,
            entries,
            hard,
            durable: d,
            snap,
        })
    }

    /// The latest snapshot.
    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snap
    }

    /// Index of the last entry.
    pub fn last(&self) -> u64 {
        self.wal.last_index()
    }

    /// Appends entries, replacing any conflicting suffix. Durable after
    /// [`RaftStore::sync`].
    pub fn append(&mut self, ents: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        if first.index <= self.wal.last_index() {
            self.wal.truncate_from(first.index)?;
            let keep = first.index.saturating_sub(self.wal.first_index()) as usize;
            self.entries.truncate(keep);
        }
        let recs: Vec<wal::Entry> = ents
            .iter()
            .map(|e| {
                Ok(wal::Entry {
                    index: e.index,
                    term: e.term,
                    data: e.write_to_bytes().map_err(|x| StoreError::Entry {
                        index: e.index,
                        why: x.to_string(),
                    })?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        self.wal.append(&recs)?;
        self.entries.extend_from_slice(ents);
        Ok(())
    }

    /// Makes appended entries durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.wal.sync()?)
    }

    /// Records the hard state: durably at once if term or vote changed.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.hard = hs.clone();
        if hs.term != self.durable.term || hs.vote != self.durable.vote {
            self.persist_hard()?;
        }
        Ok(())
    }

    /// Records a new commit index (in memory; see the module notes).
    pub fn set_commit(&mut self, commit: u64) {
        self.hard.commit = commit;
    }

    fn persist_hard(&mut self) -> Result<(), StoreError> {
        let d = wal::HardState {
            term: self.hard.term,
            vote: self.hard.vote,
            commit: self.hard.commit,
        };
        self.wal.set_hard_state(d)?;
        self.durable = d;
        Ok(())
    }

    /// Installs a snapshot received from the leader: it replaces the log.
    pub fn apply_snapshot(&mut self, s: Snapshot) -> Result<(), StoreError> {
        let m = s.get_metadata();
        let (index, term) = (m.index, m.term);
        write_snapshot(self.env.as_ref(), &self.dir, &s)?;
        self.wal.reset(index + 1)?;
        self.entries.clear();
        self.snap = s;
        self.hard.commit = self.hard.commit.max(index);
        self.hard.term = self.hard.term.max(term);
        self.persist_hard()
    }

    /// Saves a snapshot of the applied state at `index` (with the
    /// configuration `cs` in force there) and drops the log up to it.
    pub fn compact(&mut self, index: u64, cs: ConfState, data: Vec<u8>) -> Result<(), StoreError> {
        let term = raft::Storage::term(self, index).map_err(|e| StoreError::Snapshot {
            path: snap_path(&self.dir),
            why: format!("no term for index {index}: {e}"),
        })?;
        let mut s = Snapshot::default();
        s.set_data(data.into());
        let m = s.mut_metadata();
        m.index = index;
        m.term = term;
        m.set_conf_state(cs);
        write_snapshot(self.env.as_ref(), &self.dir, &s)?;
        self.snap = s;
        self.persist_hard()?;
        let drop = (index + 1).saturating_sub(self.wal.first_index()) as usize;
        self.wal.compact_to(index)?;
        self.entries.drain(..drop.min(self.entries.len()));
        Ok(())
    }
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard.clone(),
            conf_state: self.snap.get_metadata().get_conf_state().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.wal.first_index();
        if low < first {
            return Err(store_err(StorageError::Compacted));
        }
        if high > self.wal.last_index() + 1 || low > high {
            return Err(store_err(StorageError::Unavailable));
        }
        let lo = (low - first) as usize;
        let hi = (high - first) as usize;
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(hi - lo);
        let mut size = 0u64;
        for e in &self.entries[lo..hi] {
            size += e.compute_size() as u64;
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let m = self.snap.get_metadata();
        if idx == m.index {
            return Ok(m.term);
        }
        let first = self.wal.first_index();
        if idx < first {
            return Err(store_err(StorageError::Compacted));
        }
        if idx > self.wal.last_index() {
            return Err(store_err(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - first) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.wal.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.wal.last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snap.get_metadata().index < request_index {
            // A newer one is made at the next compaction; raft-rs retries.
            return Err(store_err(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snap.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::DiskEnv;
    use raft::Storage;

    fn create(d: &tempfile::TempDir, cs: ConfState) -> RaftStore {
        RaftStore::create(Arc::new(DiskEnv), d.path(), cs).unwrap()
    }

    fn open(d: &tempfile::TempDir) -> Result<RaftStore, StoreError> {
        RaftStore::open(Arc::new(DiskEnv), d.path())
    }

    fn ent(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn voters(v: &[u64]) -> ConfState {
        let mut cs = ConfState::default();
        cs.set_voters(v.to_vec());
        cs
    }

    #[test]
    fn entries_survive_reopen_and_conflicts_are_replaced() {
        let d = tempfile::tempdir().unwrap();
        let mut s = create(&d, voters(&[1, 2, 3]));
        s.append(&[ent(1, 1, b"a"), ent(2, 1, b"b"), ent(3, 1, b"c")])
            .unwrap();
        s.append(&[ent(2, 2, b"x")]).unwrap();
        s.sync().unwrap();
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 2,
            ..Default::default()
        };
        s.set_hard_state(&hs).unwrap();
        drop(s);
        let s = open(&d).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        let e = s
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(e[1].get_data(), b"x");
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state.vote, 3);
        assert_eq!(st.conf_state.get_voters(), &[1, 2, 3]);
    }

    #[test]
    fn compaction_keeps_the_snapshot_and_the_tail() {
        let d = tempfile::tempdir().unwrap();
        let mut s = create(&d, voters(&[1]));
        let ents: Vec<Entry> = (1..=10).map(|i| ent(i, 1, &[i as u8])).collect();
        s.append(&ents).unwrap();
        s.set_commit(10);
        s.compact(6, voters(&[1, 2]), b"state".to_vec()).unwrap();
        assert!(matches!(
            s.entries(5, 7, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.term(6).unwrap(), 1);
        drop(s);
        let s = open(&d).unwrap();
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.snapshot_ref().get_data(), b"state");
        assert_eq!(s.initial_state().unwrap().conf_state.get_voters(), &[1, 2]);
        // The commit index is at least the snapshot's after a restart.
        assert!(s.initial_state().unwrap().hard_state.commit >= 6);
    }

    #[test]
    fn a_damaged_snapshot_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        create(&d, voters(&[1]));
        let p = d.path().join("snapshot");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len() - 1;
        b[n] ^= 0x40;
        std::fs::write(&p, b).unwrap();
        let e = open(&d).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn installing_a_snapshot_replaces_the_log() {
        let d = tempfile::tempdir().unwrap();
        let mut s = create(&d, ConfState::default());
        s.append(&[ent(1, 1, b"a")]).unwrap();
        let mut snap = Snapshot::default();
        snap.set_data(b"x".to_vec().into());
        snap.mut_metadata().index = 40;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().set_conf_state(voters(&[1, 2, 3]));
        s.apply_snapshot(snap).unwrap();
        assert_eq!(s.first_index().unwrap(), 41);
        assert_eq!(s.last_index().unwrap(), 40);
        s.append(&[ent(41, 3, b"b")]).unwrap();
        s.sync().unwrap();
        drop(s);
        let s = open(&d).unwrap();
        assert_eq!(s.last_index().unwrap(), 41);
        assert_eq!(s.term(40).unwrap(), 3);
    }
}
