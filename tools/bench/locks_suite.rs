//! `locks` suite: file locks through a 2-host cluster's mounts against the
//! same program on a file of the local ext4.
//!
//! - Uncontended lock latency: one thread takes and releases a write lock
//!   on a byte of a file open on host 1 (`F_SETLK`, then `F_UNLCK`), for
//!   `--secs`; p50 and p99 of the lock call, and lock+unlock pairs per
//!   second. On the mount each call is a commit in the volume's Raft
//!   group (the lock table is replicated); on ext4 it is the kernel's.
//! - Round trips across hosts: a write lock on host 1 and a read lock of
//!   the same byte on host 2 (where the file is open read-only: one host
//!   at a time writes a file), each taken and released in turn, each
//!   after the other's release has committed: rounds per second.
//!   The peer does the same through two descriptors of the local file
//!   (OFD locks, which conflict between descriptors).
//! - create+close per second on the mount, which the lock table must not
//!   slow (issue #25's "metadata rates unchanged"), against local ext4.

use crate::table::{self, Row};
use anyhow::{Context, Result};
use csv_test_support::csvd::CsvCluster;
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// `locks` suite options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per row and side.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
}

/// `fcntl(cmd)` with a lock of `typ` on byte `at`.
fn lock(f: &File, cmd: i32, typ: i32, at: i64) -> Result<()> {
    // SAFETY: a zeroed flock is a valid value of the C struct.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = typ as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = at;
    l.l_len = 1;
    // SAFETY: an open descriptor and a flock that lives across the call.
    if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut l) } < 0 {
        return Err(std::io::Error::last_os_error()).context("fcntl");
    }
    Ok(())
}

/// p50 and p99 (ms) of `v`.
fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    (at(0.5), at(0.99))
}

/// Lock+unlock pairs on `f` for `secs`: (pairs/s, p50, p99 of the lock).
fn uncontended(f: &File, cmd: i32, secs: f64) -> Result<(f64, f64, f64)> {
    let mut lat = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        lock(f, cmd, libc::F_WRLCK, 0)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        lock(f, cmd, libc::F_UNLCK, 0)?;
    }
    let n = lat.len() as f64;
    let (p50, p99) = percentiles(lat);
    Ok((n / t0.elapsed().as_secs_f64(), p50, p99))
}

/// A write lock through `a` and a read lock through `b`, each taken and
/// released in turn (each blocking until the other's release): pairs/s.
fn ping_pong(a: &File, b: &File, cmd_wait: i32, cmd: i32, secs: f64) -> Result<f64> {
    let mut n = 0u64;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        lock(a, cmd_wait, libc::F_WRLCK, 0)?;
        lock(a, cmd, libc::F_UNLCK, 0)?;
        lock(b, cmd_wait, libc::F_RDLCK, 0)?;
        lock(b, cmd, libc::F_UNLCK, 0)?;
        n += 1;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Files created and closed per second in `dir` for `secs`.
fn creates(dir: &Path, secs: f64) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let mut n = 0u64;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        File::create(dir.join(format!("f{n}")))?;
        n += 1;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Runs the suite.
pub fn run(args: Args) -> Result<()> {
    let (cl, v) = CsvCluster::mounted_loopback(2, 1 << 30)?;
    let (m1, m2) = (cl.mountpoint(1, v), cl.mountpoint(2, v));
    // Locks are replicated from feature level 3, which a fresh cluster
    // reaches once every host has reported its own.
    let probe = m1.join("probe");
    File::create(&probe)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())?;
        // SAFETY: NUL-terminated path and name and a 1-byte value, alive
        // across the call.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                c"user.level".as_ptr(),
                b"3".as_ptr().cast(),
                1,
                0,
            )
        };
        if r == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cluster did not reach feature level 3"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let local_dir = cl.dir().join("local");
    std::fs::create_dir_all(&local_dir)?;
    let (ours_file, local_file) = (m1.join("locked"), local_dir.join("locked"));
    for p in [&ours_file, &local_file] {
        std::fs::write(p, b"x")?;
    }
    let rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
    let (o1, o2) = (rw(&ours_file)?, File::open(m2.join("locked"))?);
    let (l1, l2) = (rw(&local_file)?, File::open(&local_file)?);

    let (ours_u, ours_p50, ours_p99) = uncontended(&o1, libc::F_SETLK, args.secs)?;
    let (local_u, local_p50, local_p99) = uncontended(&l1, libc::F_SETLK, args.secs)?;
    eprintln!("uncontended: ours {ours_u:.0}/s, local {local_u:.0}/s");
    let ours_pp = ping_pong(&o1, &o2, libc::F_SETLKW, libc::F_SETLK, args.secs)?;
    let local_pp = ping_pong(&l1, &l2, libc::F_OFD_SETLKW, libc::F_OFD_SETLK, args.secs)?;
    eprintln!("round trips: ours {ours_pp:.0}/s, local {local_pp:.0}/s");
    let ours_c = creates(&m1.join("creates"), args.secs)?;
    let local_c = creates(&local_dir.join("creates"), args.secs)?;

    let row = |name: &str, ours, peer, unit, higher_is_better| Row {
        name: name.into(),
        ours,
        peer: Some(peer),
        unit,
        higher_is_better,
    };
    table::print(
        "locks: fcntl locks through a 2-host cluster's mounts vs the same calls on local ext4",
        "local ext4",
        &[
            row("uncontended lock+unlock pairs, 1 thread", ours_u, local_u, "pairs/s", true),
            row("uncontended lock latency, p50", ours_p50, local_p50, "ms", false),
            row("uncontended lock latency, p99", ours_p99, local_p99, "ms", false),
            row("write lock on host 1, read lock on host 2, in turn (local: two descriptors, OFD locks)", ours_pp, local_pp, "round trips/s", true),
            row("file create+close, 1 thread", ours_c, local_c, "files/s", true),
        ],
    );
    Ok(())
}
