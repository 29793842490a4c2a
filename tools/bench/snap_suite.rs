//! `snap` suite: what snapshots cost writers.
//!
//! - Write throughput through host 1's `/ClusterStorage` mount (fio, the
//!   `fs` suite's jobs on a 1 GiB file laid out first) right after five
//!   snapshots of the volume were taken, against the same job on the same
//!   file with no snapshot; the two sides alternate for `--rounds` rounds
//!   and the medians are compared. With snapshots, the first write to each
//!   64 KiB unit is redirected (reserve, copy, write, remap), so this is
//!   the worst case: every unit is shared when the job starts.
//! - The write-hold time of a snapshot with the three hosts under load
//!   (fio random writes on each host's mount): `csvctl snapshot create`
//!   `--count` times, the longest hold over the hosts each time; p50 and
//!   max over the snapshots. No peer.

use crate::fs_suite::{fio, layout, median, Job, JOBS};
use crate::table::{self, Row};
use anyhow::{bail, Context, Result};
use csv_test_support::csvd::CsvCluster;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn csvctl(cl: &CsvCluster, args: &[&str]) -> Result<String> {
    let o = cl.csvctl().args(args).output()?;
    if !o.status.success() {
        bail!(
            "csvctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A background fio random-write job (for the hold-time rows).
fn load(file: &std::path::Path, secs: u64) -> Result<Child> {
    Command::new("fio")
        .args([
            "--name=load",
            "--size=256M",
            "--direct=1",
            "--ioengine=libaio",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--time_based",
        ])
        .arg(format!("--runtime={secs}"))
        .arg(format!("--filename={}", file.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run fio (is the fio package installed?)")
}

/// The `snap` suite's options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs of each write job with five snapshots and with none,
    /// alternating which goes first (the median is kept; at least 1).
    #[arg(long, value_name = "N", default_value_t = 3)]
    rounds: usize,
    /// Length of each fio run, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 4)]
    secs: u64,
    /// Snapshots taken under load for the write-hold rows (at least 1).
    #[arg(long, value_name = "N", default_value_t = 10)]
    count: usize,
    /// Only the write-hold rows (skips the fio runs with and without
    /// snapshots).
    #[arg(long)]
    hold_only: bool,
    /// Snapshots taken before each write run (up to 512, as Data
    /// Protection Manager keeps).
    #[arg(long, value_name = "N", default_value_t = 5)]
    snapshots: usize,
    /// Only the write jobs whose name contains this (e.g. "4 KiB").
    #[arg(long, value_name = "TEXT")]
    job: Option<String>,
}

/// Takes `n` snapshots of `vol` through the whole freeze protocol
/// (in-process: `coordinator::snapshot_run`, what `csvctl snapshot create`
/// runs), named `b0`, `b1`, ...
fn take_n(cl: &CsvCluster, vol: u64, n: usize) -> Result<()> {
    let me = cl.identity();
    let mut c = cl.client();
    for i in 0..n {
        coordinator::snapshot_run::take(
            &me,
            &mut c,
            vol,
            &format!("b{i}"),
            Duration::from_secs(10),
        )
        .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

fn delete_n(cl: &CsvCluster, vol: u64, n: usize) -> Result<()> {
    let mut c = cl.client();
    for i in 0..n {
        c.delete_snapshot(vol, &format!("b{i}"))
            .map_err(|e| anyhow::anyhow!(coordinator::client::describe(&e)))?;
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let rounds = args.rounds.max(1);
    let secs = args.secs;
    let n = args.snapshots.clamp(1, coordinator::meta::MAX_SNAPSHOTS);
    let count = args.count.max(1);
    let mut cl = CsvCluster::loopback(3)?;
    cl.mounts = true;
    cl.start_all()?;
    let v = cl.add_volume_file(8 << 30)?;
    cl.wait_mounted(v, Duration::from_secs(30))?;
    let vs = v.to_string();
    let file = cl.mountpoint(1, v).join("fio.dat");
    eprintln!("snap bench: fio on {} with {n} snapshots and with none; {rounds} rounds of {secs} s per side", file.display());
    layout(&file)?;
    // `--hold-only`: just the hold-time rows.
    let hold_only = args.hold_only;
    let writes: Vec<&Job> = JOBS
        .iter()
        .filter(|j| j.name.contains("write") && !hold_only)
        .filter(|j| {
            args.job
                .as_ref()
                .is_none_or(|t| j.name.contains(t.as_str()))
        })
        .collect();
    let mut rows = Vec::new();
    for job in writes {
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let snapped = || -> Result<f64> {
                let t = std::time::Instant::now();
                take_n(&cl, v, n)?;
                eprintln!("{n} snapshots taken in {:.1} s", t.elapsed().as_secs_f64());
                let x = fio(&file, job, secs)?;
                delete_n(&cl, v, n)?;
                Ok(x)
            };
            if r % 2 == 0 {
                with.push(snapped()?);
                without.push(fio(&file, job, secs)?);
            } else {
                without.push(fio(&file, job, secs)?);
                with.push(snapped()?);
            }
        }
        eprintln!(
            "{}: with {n} snapshots {with:?}, without {without:?}",
            job.name
        );
        rows.push(Row {
            name: format!("{} ({n} snapshots vs none)", job.name),
            ours: median(with),
            peer: Some(median(without)),
            unit: job.unit,
            higher_is_better: true,
        });
    }
    // Hold time under load on all three hosts.
    let mut fios = Vec::new();
    for h in 1..=3 {
        fios.push(load(
            &cl.mountpoint(h, v).join(format!("load{h}.dat")),
            count as u64 + 8,
        )?);
    }
    std::thread::sleep(Duration::from_secs(3));
    let mut held = Vec::new();
    for i in 0..count {
        let out = csvctl(
            &cl,
            &[
                "snapshot",
                "create",
                &vs,
                "--name",
                &format!("h{i}"),
                "--json",
            ],
        )?;
        let j: serde_json::Value = serde_json::from_str(&out)?;
        let hosts = j["hosts"].as_array().map_or(0, |a| a.len());
        if hosts != 3 {
            for h in 1..=3 {
                eprintln!("--- host {h}'s log:\n{}", cl.log_tail(h, 30));
            }
            bail!("snapshot {i} froze {hosts} hosts, not 3: {j}");
        }
        held.push(j["held_max_ms"].as_f64().unwrap_or(0.0));
        let parts: Vec<String> = j["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                format!(
                    "host {} held {} (drain {}, flush {}, refresh {})",
                    h["host"], h["held_ms"], h["drain_ms"], h["flush_ms"], h["refresh_ms"]
                )
            })
            .collect();
        eprintln!(
            "snapshot {i}: freeze to commit {} ms, commit to thaw {} ms; {}",
            j["committed_ms"].as_u64().unwrap_or(0) - j["freeze_started_ms"].as_u64().unwrap_or(0),
            j["thawed_ms"].as_u64().unwrap_or(0) - j["committed_ms"].as_u64().unwrap_or(0),
            parts.join("; ")
        );
        csvctl(&cl, &["snapshot", "delete", &vs, &format!("h{i}")])?;
        std::thread::sleep(Duration::from_millis(500));
    }
    for mut f in fios {
        let _ = f.kill();
        let _ = f.wait();
    }
    eprintln!("write-hold times (ms, longest host each time): {held:?}");
    let mut sorted = held.clone();
    sorted.sort_by(f64::total_cmp);
    rows.push(Row {
        name: format!("write hold of a snapshot, 3 hosts under load, p50 of {count}"),
        ours: median(held),
        peer: None,
        unit: "ms",
        higher_is_better: false,
    });
    rows.push(Row {
        name: format!("write hold of a snapshot, 3 hosts under load, max of {count}"),
        ours: sorted.last().copied().unwrap_or(0.0),
        peer: None,
        unit: "ms",
        higher_is_better: false,
    });
    let title = format!("snap: writes with {n} snapshots vs none; write-hold time of a snapshot");
    table::print(&title, "no snapshot", &rows);
    Ok(())
}
