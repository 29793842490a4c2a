//! `vhd` suite: our VHD crate against `qemu-img bench` (QEMU's vpc
//! driver) on the same image files, the same request sequence, the same
//! queue depth (32) and the same cache mode (O_DIRECT, `-t none`).
//!
//! Request sequence, as `qemu-img bench` makes it: request i is at
//! `(i * step) mod image_size`. "Random" rows use a step of a prime number
//! of 4 KiB units (a full-period scatter over the image); sequential rows
//! use the request size as the step. Our side is the crate's io_uring
//! queue (`vhd::uring::Queue`) with 32 requests in flight, as QEMU's
//! (refilled four at a time: 28 to 32).

use crate::table::{self, Row};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use vhd::{CreateOptions, DiskType, OpenOptions, Vhd};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const DEPTH: usize = 32;

#[derive(Debug, Clone, Copy)]
struct Work {
    size: u64,
    step: u64,
    count: u64,
    write: bool,
}

fn ours(img: &Path, w: Work) -> Result<f64> {
    let v = Vhd::open_direct(
        img,
        &OpenOptions {
            write: w.write,
            ..Default::default()
        },
    )?;
    let image = v.size();
    let len = w.size as usize;
    let mut q = vhd::uring::Queue::with_fixed_buffers(&v, DEPTH as u32, DEPTH, len)?;
    for i in 0..DEPTH {
        if let Some(b) = q.fixed_buffer(i) {
            b.fill(0x5a ^ i as u8);
        }
    }
    let mut idle: Vec<usize> = (0..DEPTH).collect();
    let start = Instant::now();
    let mut next = 0u64;
    let mut done = 0u64;
    while done < w.count {
        while next < w.count && q.has_room() {
            let Some(i) = idle.pop() else { break };
            q.submit_fixed(next, i, len, (next * w.step) % image, w.write)?;
            next += 1;
        }
        // Refills go in batches of an eighth of the queue: one system
        // call for several completions and submissions, and sequential
        // requests that reach the block layer together merge.
        for c in q.complete_at_least(DEPTH / 8)? {
            c.result?;
            if let vhd::uring::Buffer::Fixed(i) = c.buf {
                idle.push(i);
            }
            done += 1;
        }
    }
    // Timed like `qemu-img bench`: until the last completion, without a
    // flush (QEMU flushes only when the image is closed, after its clock).
    let rate = w.count as f64 / start.elapsed().as_secs_f64();
    if w.write {
        v.flush()?;
    }
    Ok(rate)
}

fn qemu(img: &Path, w: Work) -> Result<f64> {
    let mut c = Command::new("qemu-img");
    c.args([
        "bench",
        "-f",
        "vpc",
        "-t",
        "none",
        "-i",
        "io_uring",
        "-d",
        &DEPTH.to_string(),
    ])
    .args([
        "-c",
        &w.count.to_string(),
        "-s",
        &w.size.to_string(),
        "-S",
        &w.step.to_string(),
    ]);
    if w.write {
        c.args(["-w", "--pattern=90"]);
    }
    let out = c.arg(img).output().context("cannot run qemu-img bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "qemu-img bench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "Run completed in 1.234 seconds."
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .with_context(|| format!("unexpected qemu-img bench output: {text}"))?;
    Ok(w.count as f64 / secs)
}

/// A new image as both tools make one by default: a fixed disk is a
/// sparse file (no `--preallocate`, QEMU's `preallocation=off`), so its
/// first writes make the host filesystem allocate blocks.
fn create(path: &Path, dt: DiskType, size: u64) -> Result<()> {
    let _ = std::fs::remove_file(path);
    Vhd::create(path, &CreateOptions::new(dt, size))?;
    Ok(())
}

/// An image of `size` bytes with every byte written (so reads hit data).
fn filled(path: &Path, dt: DiskType, size: u64) -> Result<()> {
    create(path, dt, size)?;
    let v = Vhd::open(
        path,
        &OpenOptions {
            write: true,
            ..Default::default()
        },
    )?;
    let chunk = vec![0xa5u8; 8 * MIB as usize];
    let mut off = 0;
    while off < size {
        v.write_at(&chunk, off)?;
        off += chunk.len() as u64;
    }
    v.flush()?;
    Ok(())
}

/// Large transfers are bound by this machine's virtual disk, whose speed
/// swings by 2x from second to second, and runs of less than 64 MiB last
/// a tenth of a second on a fixed disk: both get more rounds.
fn rounds_for(rounds: usize, w: Work) -> usize {
    if w.size >= MIB || w.size * w.count < 64 * MIB {
        rounds * 3
    } else {
        rounds
    }
}

/// Runs both sides `rounds` times, alternating which goes first, and
/// keeps each side's median: the virtual disk of these machines swings by
/// 2x from one second to the next, and a median of interleaved runs sees
/// both sides through the same swings.
fn alternate(
    rounds: usize,
    mut ours: impl FnMut() -> Result<f64>,
    mut peer: impl FnMut() -> Result<f64>,
) -> Result<(f64, f64)> {
    let (mut o, mut p) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            o.push(ours()?);
            p.push(peer()?);
        } else {
            p.push(peer()?);
            o.push(ours()?);
        }
    }
    Ok((median(o), median(p)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `vhd` suite's options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for the image files: 1 GiB images written in full, and
    /// fresh sparse ones of 8 GiB (dynamic) and 16 GiB (fixed).
    #[arg(long, value_name = "DIR", default_value_os_t = default_dir())]
    dir: PathBuf,
    /// Runs of each side per row, alternating which goes first (the median
    /// is kept); rows of 1 MiB requests, and rows that move less than
    /// 64 MiB, get three times as many.
    #[arg(long, value_name = "N", default_value_t = 3)]
    rounds: usize,
    /// Only the rows whose name ("fixed 4k random read", "dynamic 1m
    /// sequential write", ...) contains this text.
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
}

fn default_dir() -> PathBuf {
    std::env::temp_dir().join("csv-bench-vhd")
}

pub fn run(args: Args) -> Result<()> {
    let Args { dir, rounds, only } = args;
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "vhd bench in {} (images of 1 GiB and 8 GiB, O_DIRECT, queue depth {DEPTH})",
        dir.display()
    );
    let mut rows = Vec::new();
    let rand4k = Work {
        size: 4096,
        step: 4096 * 7919,
        count: 100_000,
        write: false,
    };
    let seq64k = Work {
        size: 64 << 10,
        step: 64 << 10,
        count: 65_536,
        write: false,
    };
    let seq1m = Work {
        size: MIB,
        step: MIB,
        count: 2048,
        write: false,
    };
    let only = only.unwrap_or_default();
    let wanted = |kind: &str, name: &str| format!("{kind} {name}").contains(only.as_str());
    for dt in [DiskType::Fixed, DiskType::Dynamic] {
        let kind = dt.name();
        let full = dir.join(format!("{kind}-full.vhd"));
        eprintln!("preparing {}", full.display());
        filled(&full, dt, GIB)?;
        // Reads on a fully written image.
        for (name, w) in [
            ("4k random read", rand4k),
            ("64k sequential read", seq64k),
            ("1m sequential read", seq1m),
        ] {
            if !wanted(kind, name) {
                continue;
            }
            let (o, p) = alternate(rounds_for(rounds, w), || ours(&full, w), || qemu(&full, w))?;
            rows.push(row(kind, name, w, o, p));
        }
        // Rewrites of allocated data (each side on its own copy).
        for (name, w) in [
            ("4k random write", rand4k),
            ("64k sequential write", seq64k),
            ("1m sequential write", seq1m),
        ] {
            if !wanted(kind, name) {
                continue;
            }
            let w = Work { write: true, ..w };
            let (o, p) = alternate(rounds_for(rounds, w), || ours(&full, w), || qemu(&full, w))?;
            rows.push(row(kind, name, w, o, p));
        }
        // First writes into a fresh image: allocating writes for a dynamic
        // disk (one request per 2 MiB block of an 8 GiB image).
        let fresh = dir.join(format!("{kind}-fresh.vhd"));
        if !wanted(kind, "4k first write (allocating)") {
            continue;
        }
        // A fixed disk takes these at 40-50K IOPS: 8192 requests on a
        // 16 GiB image, for a run long enough to time.
        let (count, image) = match dt {
            DiskType::Fixed => (8192, 16 * GIB),
            _ => (4096, 8 * GIB),
        };
        let alloc = Work {
            size: 4096,
            step: 2 * MIB * 1009,
            count,
            write: true,
        };
        let (o, p) = alternate(
            rounds_for(rounds, alloc),
            || create(&fresh, dt, image).and_then(|()| ours(&fresh, alloc)),
            || create(&fresh, dt, image).and_then(|()| qemu(&fresh, alloc)),
        )?;
        rows.push(row(kind, "4k first write (allocating)", alloc, o, p));
        let _ = std::fs::remove_file(&fresh);
        let _ = std::fs::remove_file(&full);
    }
    table::print(
        "vhd: our crate vs qemu-img bench (vpc), O_DIRECT, QD32",
        "qemu-img",
        &rows,
    );
    Ok(())
}

fn row(kind: &str, name: &str, w: Work, ours: f64, peer: f64) -> Row {
    let (unit, scale) = if w.size >= 64 << 10 {
        ("MiB/s", w.size as f64 / MIB as f64)
    } else {
        ("IOPS", 1.0)
    };
    Row {
        name: format!("{kind} {name}"),
        ours: ours * scale,
        peer: Some(peer * scale),
        unit,
        higher_is_better: true,
    }
}
