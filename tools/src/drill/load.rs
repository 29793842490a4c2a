//! A drill's load: writers that each fsync 64 KiB chunks into a file of
//! their own and log every acknowledged chunk's checksum, and the read
//! back that checks none of them was lost.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The drill's load: writers that each fsync 64 KiB chunks into a file of
/// their own and log every acknowledged chunk's checksum.
pub(super) struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<WriterLog>>,
}

pub(super) const CHUNK: usize = 64 << 10;
/// Chunks per writer file (it wraps: 16 MiB each).
const CHUNKS: u64 = 256;

#[derive(Default)]
pub(super) struct WriterLog {
    pub(super) path: PathBuf,
    /// Chunk index -> checksum of its last acknowledged content.
    pub(super) acked: std::collections::BTreeMap<u64, u32>,
    pub(super) writes: u64,
    /// Errors the writer saw (kind, message), in order.
    pub(super) errors: Vec<String>,
    pub(super) enospc: u64,
    /// Longest time between two acknowledged writes.
    pub(super) longest_gap: Duration,
    /// When an acknowledged write last completed.
    pub(super) last_ok: Option<Instant>,
}

fn chunk_bytes(writer: u64, n: u64) -> Vec<u8> {
    // Different in every chunk and every pass.
    let mut x = writer.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut v = Vec::with_capacity(CHUNK);
    while v.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

impl Load {
    pub(super) fn start(dir: &Path, writers: u64, seed: u64) -> Result<Load> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for w in 0..writers {
            let path = dir.join(format!("writer{w}.dat"));
            let stop = stop.clone();
            let id = seed.wrapping_add(w);
            threads.push(std::thread::spawn(move || write_loop(path, id, &stop)));
        }
        Ok(Load { stop, threads })
    }

    pub(super) fn finish(self) -> Vec<WriterLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .filter_map(|t| t.join().ok())
            .collect()
    }
}

fn write_loop(path: PathBuf, id: u64, stop: &AtomicBool) -> WriterLog {
    let mut log = WriterLog {
        path: path.clone(),
        last_ok: Some(Instant::now()),
        ..Default::default()
    };
    let mut file: Option<File> = None;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let f = match &file {
            Some(f) => f,
            None => match OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)
            {
                Ok(f) => file.insert(f),
                Err(e) => {
                    log.errors.push(format!("open: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let data = chunk_bytes(id, n);
        let at = (n % CHUNKS) * CHUNK as u64;
        match f.write_all_at(&data, at).and_then(|()| f.sync_data()) {
            Ok(()) => {
                let now = Instant::now();
                if let Some(l) = log.last_ok {
                    log.longest_gap = log.longest_gap.max(now - l);
                }
                log.last_ok = Some(now);
                log.acked.insert(n % CHUNKS, crc32fast::hash(&data));
                log.writes += 1;
                n += 1;
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc_enospc()) {
                    log.enospc += 1;
                } else {
                    log.errors.push(e.to_string());
                    // A handle on a mount that went away is opened again.
                    file = None;
                }
                // The chunk's content is now unknown until rewritten.
                log.acked.remove(&(n % CHUNKS));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    log
}

pub(super) fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

/// Reads every acknowledged chunk back: the chunks lost or changed.
pub(super) fn verify(logs: &[WriterLog]) -> (u64, u64, Vec<String>) {
    let (mut checked, mut lost, mut why) = (0, 0, Vec::new());
    for l in logs {
        let f = match File::open(&l.path) {
            Ok(f) => f,
            Err(e) => {
                lost += l.acked.len() as u64;
                why.push(format!("{}: {e}", l.path.display()));
                continue;
            }
        };
        let mut buf = vec![0u8; CHUNK];
        for (&i, &crc) in &l.acked {
            checked += 1;
            let ok =
                f.read_exact_at(&mut buf, i * CHUNK as u64).is_ok() && crc32fast::hash(&buf) == crc;
            if !ok {
                lost += 1;
                if why.len() < 5 {
                    why.push(format!("{} chunk {i}", l.path.display()));
                }
            }
        }
    }
    (checked, lost, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_differ_by_writer_and_pass() {
        assert_eq!(chunk_bytes(1, 2).len(), CHUNK);
        assert_eq!(chunk_bytes(1, 2), chunk_bytes(1, 2));
        assert_ne!(chunk_bytes(1, 2), chunk_bytes(2, 2));
        assert_ne!(chunk_bytes(1, 2), chunk_bytes(1, 2 + CHUNKS));
    }

    #[test]
    fn the_load_writes_what_verify_reads_back_and_a_changed_chunk_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let load = Load::start(dir.path(), 2, 7).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let logs = load.finish();
        assert!(logs.iter().all(|l| l.writes > 0 && l.errors.is_empty()));
        let (checked, lost, why) = verify(&logs);
        assert!(checked > 0);
        assert_eq!((lost, why), (0, vec![]));
        // One acknowledged chunk overwritten: verify names it.
        let l = &logs[0];
        let (&i, _) = l.acked.iter().next().unwrap();
        let f = OpenOptions::new().write(true).open(&l.path).unwrap();
        f.write_all_at(&[0xFF; 16], i * CHUNK as u64).unwrap();
        let (_, lost, why) = verify(&logs);
        assert_eq!(lost, 1);
        assert!(why[0].ends_with(&format!("chunk {i}")), "{why:?}");
    }
}
