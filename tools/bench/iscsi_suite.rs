//! `iscsi` suite: our initiator against libiscsi's `iscsi-perf` on the
//! same tgtd LUNs (null backing and file backing), same request size,
//! queue depth and duration, alternating which runs first. Writes have no
//! libiscsi peer (iscsi-perf only reads): those rows show our figures.

use crate::table::{self, Row};
use anyhow::{bail, Context, Result};
use csv_test_support::tgt::TgtTarget;
use iscsi_initiator::login::LoginConfig;
use iscsi_initiator::{new_isid, Lun, Session};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const INITIATOR: &str = "iqn.2026-11.io.csv.bench:initiator";

#[derive(Debug, Clone, Copy)]
struct Work {
    blocks: u32,
    depth: usize,
    random: bool,
    write: bool,
    secs: u64,
}

/// Our initiator: `depth` tasks issuing requests until the time is up.
/// Returns IOPS.
fn ours(rt: &tokio::runtime::Runtime, url: &iscsi_initiator::IscsiUrl, w: Work) -> Result<f64> {
    rt.block_on(async {
        let cfg = LoginConfig {
            initiator: INITIATOR.into(),
            target: Some(url.target.clone()),
            isid: new_isid(),
            chap: None,
            mutual: None,
            offer: Default::default(),
        };
        let s = Session::connect(&url.portal, &cfg).await?;
        let lun = Arc::new(Lun::open(s.clone(), url.lun).await?);
        let bytes = w.blocks as usize * lun.block_size() as usize;
        let span = (lun.capacity().min(1 << 30) / bytes as u64).max(1);
        let deadline = Instant::now() + Duration::from_secs(w.secs);
        let mut tasks = Vec::new();
        for t in 0..w.depth {
            let lun = Arc::clone(&lun);
            tasks.push(tokio::spawn(async move {
                let data = vec![0x5au8; bytes];
                let mut n = 0u64;
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                let mut seq = t as u64;
                while Instant::now() < deadline {
                    let slot = if w.random {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % span
                    } else {
                        seq = (seq + w.depth as u64) % span;
                        seq
                    };
                    let off = slot * bytes as u64;
                    if w.write {
                        lun.write(off, &data, false).await?;
                    } else {
                        lun.read(off, bytes).await?;
                    }
                    n += 1;
                }
                Ok::<u64, iscsi_initiator::Error>(n)
            }));
        }
        let start = Instant::now();
        let mut total = 0;
        for t in tasks {
            total += t.await.context("benchmark task panicked")??;
        }
        let secs = start.elapsed().as_secs_f64().max(w.secs as f64);
        let _ = s.logout().await;
        Ok(total as f64 / secs)
    })
}

/// libiscsi's iscsi-perf on the same LUN. Returns IOPS.
fn peer(url: &str, w: Work) -> Result<f64> {
    let mut c = Command::new("iscsi-perf");
    c.args([
        "-i",
        "iqn.2026-11.io.csv.bench:libiscsi",
        "-t",
        &w.secs.to_string(),
    ])
    .args(["-m", &w.depth.to_string(), "-b", &w.blocks.to_string()]);
    if w.random {
        c.arg("-r");
    }
    let out = c
        .arg(url)
        .output()
        .context("cannot run iscsi-perf (package libiscsi-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    // Last "iops average N (M MB/s)".
    let iops = text
        .rsplit("iops average ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok());
    match iops {
        Some(v) if out.status.success() => Ok(v),
        _ => bail!(
            "iscsi-perf failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// CPU seconds (user + system) used so far by this process, or by its
/// waited-for children (`/proc/self/stat`, in clock ticks of 10 ms).
fn cpu_seconds(children: bool) -> f64 {
    proc_cpu_seconds("/proc/self/stat", children)
}

/// CPU seconds (user + system) of the process whose `stat` file is at
/// `path` (or of its waited-for children).
fn proc_cpu_seconds(path: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name in parentheses: state is the first,
    // utime the 12th, stime, cutime and cstime the next three.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let at = if children { 13 } else { 11 };
    (f.get(at).unwrap_or(&0.0) + f.get(at + 1).unwrap_or(&0.0)) / 100.0
}

/// Runs one side and reports (rate, µs of CPU per request).
fn timed(children: bool, w: Work, f: impl FnOnce() -> Result<f64>) -> Result<(f64, f64)> {
    let c0 = cpu_seconds(children);
    let rate = f()?;
    let used = cpu_seconds(children) - c0;
    Ok((rate, used * 1e6 / (rate * w.secs as f64).max(1.0)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The `iscsi` suite's options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs of each side per row, alternating which goes first (the
    /// median is kept).
    #[arg(long, value_name = "N", default_value_t = 5)]
    rounds: usize,
    /// Length of each run, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    secs: u64,
    /// Worker threads of our side's tokio runtime (csvd runs each iSCSI
    /// session on 2; 1 gives it one core like iscsi-perf's event loop).
    #[arg(long, value_name = "N", default_value_t = 2)]
    threads: usize,
    /// Profiling aid: one run of our side alone, reads at QD32 on the null
    /// LUN (4 KiB random ones unless `--blocks` says otherwise), printing
    /// IOPS and the CPU per request of the initiator and of tgtd; no table.
    #[arg(long)]
    ours_only: bool,
    /// With `--ours-only`: run iscsi-perf alone instead of our initiator.
    #[arg(long, requires = "ours_only")]
    peer_only: bool,
    /// With `--ours-only`: read the file LUN instead of the null LUN.
    #[arg(long, requires = "ours_only")]
    file: bool,
    /// With `--ours-only`: blocks of 512 bytes per read; 8 (4 KiB) reads
    /// at random offsets, any other size sequentially.
    #[arg(long, value_name = "N", default_value_t = 8, requires = "ours_only")]
    blocks: u32,
}

pub fn run(args: Args) -> Result<()> {
    let (rounds, secs) = (args.rounds, args.secs);
    let mut tgt = TgtTarget::start()?;
    let t = tgt.add_target("bench")?;
    tgt.add_lun_null(&t, 1)?;
    let file = tgt.dir().join("lun2.img");
    {
        // A file LUN with its blocks allocated, so reads hit data.
        let f = std::fs::File::create(&file)?;
        f.set_len(1 << 30)?;
        let chunk = vec![0xa5u8; 8 << 20];
        for i in 0..128u64 {
            std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i * (8 << 20))?;
        }
        f.sync_all()?;
    }
    tgt.add_lun_file(&t, 2, &file, 1 << 30)?;
    eprintln!(
        "iscsi bench: tgtd at {}, {rounds} rounds of {secs} s per side and row",
        tgt.portal()
    );
    // Worker threads of our side's runtime (csvd runs each iSCSI session
    // on 2); `--threads 1` gives it one core like iscsi-perf's event loop.
    let threads = args.threads.max(1);
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    if args.ours_only {
        // Profiling aid: our side (or, with `--peer-only`, iscsi-perf)
        // alone, reads at QD32 on the null LUN (`--file`: the file LUN),
        // 4 KiB random ones or (`--blocks N`) sequential ones of N blocks.
        let rt = runtime()?;
        let lun = if args.file { 2 } else { 1 };
        let url: iscsi_initiator::IscsiUrl = tgt.url(&t, lun).parse()?;
        let blocks = args.blocks;
        let w = Work {
            blocks,
            depth: 32,
            random: blocks == 8,
            write: false,
            secs,
        };
        let tgtd = format!("/proc/{}/stat", tgt.pid().unwrap_or(0));
        let t0 = proc_cpu_seconds(&tgtd, false);
        let (who, (rate, cpu)) = if args.peer_only {
            ("iscsi-perf", timed(true, w, || peer(&tgt.url(&t, lun), w))?)
        } else {
            ("ours", timed(false, w, || ours(&rt, &url, w))?)
        };
        let target = (proc_cpu_seconds(&tgtd, false) - t0) * 1e6 / (rate * secs as f64).max(1.0);
        // tgtd's figure is its whole CPU time over the requests: when it
        // is near 1 s / IOPS, tgtd is saturated and sets the pace.
        println!("{who}: {rate:.0} IOPS, {cpu:.1} us of CPU per request, tgtd {target:.1} us");
        return Ok(());
    }
    let rt = runtime()?;
    let mut rows = Vec::new();
    let reads = [
        (
            "4k random read QD1",
            Work {
                blocks: 8,
                depth: 1,
                random: true,
                write: false,
                secs,
            },
        ),
        (
            "4k random read QD32",
            Work {
                blocks: 8,
                depth: 32,
                random: true,
                write: false,
                secs,
            },
        ),
        (
            "128k sequential read QD32",
            Work {
                blocks: 256,
                depth: 32,
                random: false,
                write: false,
                secs,
            },
        ),
    ];
    for (lun, backing) in [(1u16, "null"), (2, "file")] {
        let url = tgt.url(&t, u32::from(lun));
        let parsed: iscsi_initiator::IscsiUrl = url.parse()?;
        for (name, w) in reads {
            let (mut o, mut p) = (Vec::new(), Vec::new());
            for r in 0..rounds {
                let (a, b) = if r % 2 == 0 {
                    let a = timed(false, w, || ours(&rt, &parsed, w))?;
                    (a, timed(true, w, || peer(&url, w))?)
                } else {
                    let b = timed(true, w, || peer(&url, w))?;
                    (timed(false, w, || ours(&rt, &parsed, w))?, b)
                };
                // The figure that decides these rows: initiator and tgtd
                // share the cores, so CPU an initiator spends is CPU tgtd
                // does not get.
                eprintln!(
                    "{backing} {name}: CPU per request: ours {:.1} us, iscsi-perf {:.1} us",
                    a.1, b.1
                );
                o.push(a.0);
                p.push(b.0);
            }
            rows.push(row(backing, name, w, median(o), Some(median(p))));
        }
    }
    let url: iscsi_initiator::IscsiUrl = tgt.url(&t, 2).parse()?;
    for (name, w) in [
        (
            "4k random write QD32",
            Work {
                blocks: 8,
                depth: 32,
                random: true,
                write: true,
                secs,
            },
        ),
        (
            "128k sequential write QD32",
            Work {
                blocks: 256,
                depth: 32,
                random: false,
                write: true,
                secs,
            },
        ),
    ] {
        let o: Vec<f64> = (0..rounds)
            .map(|_| ours(&rt, &url, w))
            .collect::<Result<_>>()?;
        rows.push(row("file", name, w, median(o), None));
    }
    table::print(
        "iscsi: our initiator vs libiscsi iscsi-perf, tgtd on loopback",
        "iscsi-perf",
        &rows,
    );
    Ok(())
}

fn row(backing: &str, name: &str, w: Work, ours: f64, peer: Option<f64>) -> Row {
    let bytes = f64::from(w.blocks) * 512.0;
    let (unit, scale) = if bytes >= 65536.0 {
        ("MB/s", bytes / 1e6)
    } else {
        ("IOPS", 1.0)
    };
    Row {
        name: format!("{backing} {name}"),
        ours: ours * scale,
        peer: peer.map(|p| p * scale),
        unit,
        higher_is_better: true,
    }
}
