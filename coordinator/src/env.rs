//! The file I/O under a replica's log and snapshots, behind a trait (as
//! raft-engine keeps its `env`): [`DiskEnv`] is the local file system;
//! [`MemEnv`] keeps files in memory and can fail chosen operations and
//! lose what was not synced, so tests can crash a replica or break its
//! disk at any step without a real disk, and many hosts fit in one
//! process.
//!
//! The durability model both follow, and [`crate::wal`] relies on:
//! - bytes written to a file survive a crash only once the file was
//!   synced ([`LogFile::sync_data`], or [`Env::write_new`], which syncs);
//! - a new name (a created or renamed file) survives a crash only once its
//!   directory was synced ([`Env::sync_dir`]); before that, a crash leaves
//!   the name as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where a replica's files live.
pub trait Env: Send + Sync + std::fmt::Debug {
    /// Makes a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// A whole file (NotFound when there is none).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Whether a file is there.
    fn exists(&self, path: &Path) -> bool;
    /// The paths in a directory.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Writes a whole file (replacing one of that name) and syncs it; its
    /// name is durable once the directory is synced.
    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Renames a file (replacing `to`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the names in a directory durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Opens a file for reading and positioned writes, creating it empty
    /// when it is not there.
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn LogFile>>;
}

/// A file opened with [`Env::open_log`].
pub trait LogFile: Send + Sync + std::fmt::Debug {
    /// Everything in it.
    fn read_all(&self) -> io::Result<Vec<u8>>;
    /// Writes `buf` at `offset` (durable after [`LogFile::sync_data`]).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts or extends it to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes what was written durable.
    fn sync_data(&self) -> io::Result<()>;
}

/// The local file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskEnv;

impl Env for DiskEnv {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect()
    }

    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut f = File::create(path)?;
        f.write_all(data)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn open_log(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Box::new(DiskFile(f)))
    }
}

#[derive(Debug)]
struct DiskFile(File);

impl LogFile for DiskFile {
    fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        (&self.0).read_to_end(&mut all)?;
        Ok(all)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// An operation [`MemEnv`] can be told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// [`LogFile::write_at`] and [`Env::write_new`].
    Write,
    /// [`LogFile::sync_data`] and [`Env::sync_dir`].
    Sync,
    /// [`Env::rename`].
    Rename,
    /// [`Env::read`] and [`LogFile::read_all`].
    Read,
}

#[derive(Debug, Default)]
struct Content {
    /// What reads see.
    now: Vec<u8>,
    /// What a crash keeps.
    synced: Vec<u8>,
}

#[derive(Debug, Default)]
struct MemFs {
    next_id: u64,
    files: BTreeMap<u64, Content>,
    /// The names reads see.
    names: BTreeMap<PathBuf, u64>,
    /// The names a crash keeps.
    durable: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    /// Operations to fail, and how many more times.
    failing: BTreeMap<Op, usize>,
}

impl MemFs {
    fn check(&mut self, op: Op, what: &Path) -> io::Result<()> {
        match self.failing.get_mut(&op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(io::Error::other(format!(
                    "injected {op:?} failure on {}",
                    what.display()
                )))
            }
            _ => Ok(()),
        }
    }

    fn file(&mut self, path: &Path) -> io::Result<&mut Content> {
        let id = *self
            .names
            .get(path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))?;
        self.files
            .get_mut(&id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }

    fn create(&mut self, path: &Path) -> u64 {
        if let Some(id) = self.names.get(path) {
            return *id;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.files.insert(id, Content::default());
        self.names.insert(path.to_path_buf(), id);
        id
    }
}

/// Files in memory, shared by every clone, with faults on request.
#[derive(Debug, Clone, Default)]
pub struct MemEnv(Arc<Mutex<MemFs>>);

impl MemEnv {
    /// An empty file system.
    pub fn new() -> MemEnv {
        MemEnv::default()
    }

    fn fs(&self) -> MutexGuard<'_, MemFs> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next `times` operations of kind `op` fail.
    pub fn fail(&self, op: Op, times: usize) {
        self.fs().failing.insert(op, times);
    }

    /// Stops every injected failure.
    pub fn heal(&self) {
        self.fs().failing.clear();
    }

    /// A crash: every file goes back to what was synced, and every name to
    /// what its directory's last sync recorded. With `torn`, up to that
    /// many bytes of each file's unsynced tail survive (a torn write).
    pub fn crash(&self, torn: usize) {
        let mut fs = self.fs();
        fs.names = fs.durable.clone();
        for c in fs.files.values_mut() {
            let keep = if c.now.starts_with(&c.synced) {
                (c.synced.len() + torn).min(c.now.len())
            } else {
                c.synced.len()
            };
            if keep > c.synced.len() {
                c.now.truncate(keep);
            } else {
                c.now = c.synced.clone();
            }
            c.synced = c.now.clone();
        }
    }
}

fn parent_of(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl Env for MemEnv {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.fs();
        for a in dir.ancestors() {
            fs.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut fs = self.fs();
        fs.check(Op::Read, path)?;
        Ok(fs.file(path)?.now.clone())
    }

    fn exists(&self, path: &Path) -> bool {
        self.fs().names.contains_key(path)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let fs = self.fs();
        if !fs.dirs.contains(dir) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                dir.display().to_string(),
            ));
        }
        let mut out: BTreeSet<PathBuf> = fs
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        out.extend(fs.dirs.iter().filter(|p| p.parent() == Some(dir)).cloned());
        Ok(out.into_iter().collect())
    }

    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut fs = self.fs();
        fs.check(Op::Write, path)?;
        if !fs.dirs.contains(&parent_of(path)) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory for {}", path.display()),
            ));
        }
        let id = fs.create(path);
        if let Some(c) = fs.files.get_mut(&id) {
            c.now = data.to_vec();
        }
        fs.check(Op::Sync, path)?;
        if let Some(c) = fs.files.get_mut(&id) {
            c.synced = c.now.clone();
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.fs();
        fs.check(Op::Rename, from)?;
        let id = fs
            .names
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.display().to_string()))?;
        fs.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.fs();
        fs.check(Op::Sync, dir)?;
        fs.durable.retain(|p, _| p.parent() != Some(dir));
        let now: Vec<(PathBuf, u64)> = fs
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        fs.durable.extend(now);
        Ok(())
    }

    fn open_log(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        let mut fs = self.fs();
        if !fs.dirs.contains(&parent_of(path)) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory for {}", path.display()),
            ));
        }
        let id = fs.create(path);
        Ok(Box::new(MemFile {
            env: self.clone(),
            id,
            path: path.to_path_buf(),
        }))
    }
}

#[derive(Debug)]
struct MemFile {
    env: MemEnv,
    id: u64,
    path: PathBuf,
}

impl MemFile {
    fn with<R>(&self, op: Op, f: impl FnOnce(&mut Content) -> R) -> io::Result<R> {
        let mut fs = self.env.fs();
        fs.check(op, &self.path)?;
        let c = fs.files.get_mut(&self.id).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, self.path.display().to_string())
        })?;
        Ok(f(c))
    }
}

impl LogFile for MemFile {
    fn read_all(&self) -> io::Result<Vec<u8>> {
        self.with(Op::Read, |c| c.now.clone())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(Op::Write, |c| {
            let end = offset as usize + buf.len();
            if c.now.len() < end {
                c.now.resize(end, 0);
            }
            c.now[offset as usize..end].copy_from_slice(buf);
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(Op::Write, |c| c.now.resize(len as usize, 0))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(Op::Sync, |c| c.synced = c.now.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (MemEnv, PathBuf) {
        let env = MemEnv::new();
        let dir = PathBuf::from("/r/g");
        env.create_dir_all(&dir).unwrap();
        (env, dir)
    }

    #[test]
    fn a_crash_keeps_only_synced_bytes() {
        let (env, dir) = setup();
        let f = env.open_log(&dir.join("log")).unwrap();
        env.sync_dir(&dir).unwrap();
        f.write_at(b"durable", 0).unwrap();
        f.sync_data().unwrap();
        f.write_at(b"-lost", 7).unwrap();
        assert_eq!(f.read_all().unwrap(), b"durable-lost");
        env.crash(0);
        assert_eq!(env.read(&dir.join("log")).unwrap(), b"durable");
    }

    #[test]
    fn a_torn_crash_keeps_part_of_the_unsynced_tail() {
        let (env, dir) = setup();
        let f = env.open_log(&dir.join("log")).unwrap();
        env.sync_dir(&dir).unwrap();
        f.write_at(b"abc", 0).unwrap();
        f.sync_data().unwrap();
        f.write_at(b"defgh", 3).unwrap();
        env.crash(2);
        assert_eq!(env.read(&dir.join("log")).unwrap(), b"abcde");
    }

    #[test]
    fn a_rename_is_durable_only_after_the_directory_sync() {
        let (env, dir) = setup();
        env.write_new(&dir.join("state"), b"old").unwrap();
        env.sync_dir(&dir).unwrap();
        env.write_new(&dir.join("state.new"), b"new").unwrap();
        env.rename(&dir.join("state.new"), &dir.join("state"))
            .unwrap();
        assert_eq!(env.read(&dir.join("state")).unwrap(), b"new");
        env.crash(0);
        assert_eq!(env.read(&dir.join("state")).unwrap(), b"old");
        env.write_new(&dir.join("state.new"), b"new").unwrap();
        env.rename(&dir.join("state.new"), &dir.join("state"))
            .unwrap();
        env.sync_dir(&dir).unwrap();
        env.crash(0);
        assert_eq!(env.read(&dir.join("state")).unwrap(), b"new");
        assert!(!env.exists(&dir.join("state.new")));
    }

    #[test]
    fn injected_failures_fail_that_many_times() {
        let (env, dir) = setup();
        let f = env.open_log(&dir.join("log")).unwrap();
        env.fail(Op::Sync, 2);
        assert!(f.sync_data().is_err());
        assert!(env.sync_dir(&dir).is_err());
        f.sync_data().unwrap();
        env.fail(Op::Write, 1);
        assert!(f.write_at(b"x", 0).is_err());
        env.heal();
        f.write_at(b"x", 0).unwrap();
    }

    #[test]
    fn the_disk_env_does_what_the_memory_one_does() {
        let d = tempfile::tempdir().unwrap();
        let env = DiskEnv;
        let dir = d.path().join("g");
        env.create_dir_all(&dir).unwrap();
        let f = env.open_log(&dir.join("log")).unwrap();
        f.write_at(b"hello", 0).unwrap();
        f.set_len(4).unwrap();
        f.sync_data().unwrap();
        assert_eq!(f.read_all().unwrap(), b"hell");
        env.write_new(&dir.join("a"), b"1").unwrap();
        env.rename(&dir.join("a"), &dir.join("b")).unwrap();
        env.sync_dir(&dir).unwrap();
        assert!(env.exists(&dir.join("b")));
        let mut names = env.list_dir(&dir).unwrap();
        names.sort();
        assert_eq!(names, vec![dir.join("b"), dir.join("log")]);
    }
}
