//! `fs` suite: fio through a `/ClusterStorage` mount against the same fio
//! job on a raw file next to the LUN file (same disk, same flags), and file
//! create+close per second through the mount against the local filesystem.
//!
//! The cluster is three `csvd` hosts on loopback with Volume1 on a LUN
//! file; fio runs on host 1's mount. Both sides use `--direct=1
//! --ioengine=libaio` on a 1 GiB file laid out first; each row alternates
//! the sides for `--rounds` rounds (default 3) and keeps the median, because
//! this machine's virtual disk varies a lot from run to run.

use crate::table::{self, Row};
use anyhow::{bail, Context, Result};
use csv_test_support::csvd::CsvCluster;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub(crate) struct Job {
    pub name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
    pub unit: &'static str,
}

pub(crate) const JOBS: [Job; 4] = [
    Job {
        name: "1 MiB sequential write, QD8",
        rw: "write",
        bs: "1m",
        depth: 8,
        unit: "MiB/s",
    },
    Job {
        name: "1 MiB sequential read, QD8",
        rw: "read",
        bs: "1m",
        depth: 8,
        unit: "MiB/s",
    },
    Job {
        name: "4 KiB random read, QD32",
        rw: "randread",
        bs: "4k",
        depth: 32,
        unit: "IOPS",
    },
    Job {
        name: "4 KiB random write, QD32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
        unit: "IOPS",
    },
];

pub(crate) fn fio(file: &Path, job: &Job, secs: u64) -> Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=csv",
            "--size=1G",
            "--direct=1",
            "--ioengine=libaio",
            "--time_based",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.depth))
        .arg(format!("--runtime={secs}"))
        .arg("--output-format=json")
        .output()
        .context("cannot run fio (is the fio package installed?)")?;
    if !out.status.success() {
        bail!(
            "fio on {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
    let job0 = &j["jobs"][0];
    let get = |k: &str, f: &str| job0[k][f].as_f64().unwrap_or(0.0);
    Ok(if job.unit == "IOPS" {
        get("read", "iops") + get("write", "iops")
    } else {
        (get("read", "bw") + get("write", "bw")) / 1024.0
    })
}

/// Writes `file` fully (1 GiB), so jobs measure I/O, not allocation.
pub(crate) fn layout(file: &Path) -> Result<()> {
    let o = Command::new("fio")
        .args([
            "--name=layout",
            "--size=1G",
            "--rw=write",
            "--bs=1m",
            "--direct=1",
        ])
        .arg(format!("--filename={}", file.display()))
        .output()
        .context("cannot run fio (is the fio package installed?)")?;
    if !o.status.success() {
        bail!("laying out {}", file.display());
    }
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Files created and closed per second in `dir` for `secs`.
fn creates(dir: &Path, secs: f64) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        std::fs::File::create(dir.join(format!("f{n}")))
            .with_context(|| format!("create in {}", dir.display()))?;
        n += 1;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// The `fs` suite's options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs of each side per row, alternating which goes first (the
    /// median is kept; at least 1).
    #[arg(long, value_name = "N", default_value_t = 3)]
    rounds: usize,
    /// Length of each fio run, seconds (the create+close rows run half as
    /// long).
    #[arg(long, value_name = "SECS", default_value_t = 4)]
    secs: u64,
}

pub fn run(args: Args) -> Result<()> {
    let rounds = args.rounds.max(1);
    let secs = args.secs;
    let mut cl = CsvCluster::loopback(3)?;
    cl.mounts = true;
    cl.start_all()?;
    let v = cl.add_volume_file(8 << 30)?;
    cl.wait_mounted(v, Duration::from_secs(30))?;
    let ours = cl.mountpoint(1, v).join("fio.dat");
    let raw = cl.dir().join("raw.img");
    eprintln!(
        "fs bench: fio on {} against {}; {rounds} rounds of {secs} s per side and row",
        ours.display(),
        raw.display()
    );
    // Lay both files out fully first (fio writes them when they are new).
    for f in [&ours, &raw] {
        layout(f)?;
    }
    let mut rows = Vec::new();
    for job in &JOBS {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            if r % 2 == 0 {
                a.push(fio(&ours, job, secs)?);
                b.push(fio(&raw, job, secs)?);
            } else {
                b.push(fio(&raw, job, secs)?);
                a.push(fio(&ours, job, secs)?);
            }
        }
        eprintln!("{}: ours {a:?}, raw {b:?}", job.name);
        rows.push(Row {
            name: job.name.into(),
            ours: median(a),
            peer: Some(median(b)),
            unit: job.unit,
            higher_is_better: true,
        });
    }
    let local = cl.dir().join("local-creates");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let m = cl.mountpoint(1, v).join(format!("creates{r}"));
        let l = local.join(format!("r{r}"));
        if r % 2 == 0 {
            a.push(creates(&m, secs as f64 / 2.0)?);
            b.push(creates(&l, secs as f64 / 2.0)?);
        } else {
            b.push(creates(&l, secs as f64 / 2.0)?);
            a.push(creates(&m, secs as f64 / 2.0)?);
        }
    }
    rows.push(Row {
        name: "file create+close, 1 thread (vs local ext4)".into(),
        ours: median(a),
        peer: Some(median(b)),
        unit: "files/s",
        higher_is_better: true,
    });
    table::print(
        "fs: through the /ClusterStorage mount (3 hosts) vs the raw file",
        "raw file / local fs",
        &rows,
    );
    Ok(())
}
