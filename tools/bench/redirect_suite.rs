//! `redirect` suite: a host's I/O through the mount with its own iSCSI
//! path (`Direct`) against the same fio job with its I/O redirected
//! through a peer (`BlockRedirected`, forced with `csvctl volume
//! redirect`), on one tgtd LUN; and the stall a writing application sees
//! when the host's SAN path is cut (tgtd drops and refuses its initiator),
//! over 20 cuts.

use crate::fs_suite::{fio, layout, median, JOBS};
use crate::table::{self, Row};
use anyhow::{bail, Context, Result};
use csv_test_support::csvd::CsvCluster;
use csv_test_support::tgt::TgtTarget;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn state(cl: &CsvCluster, h: u64) -> String {
    cl.volume_state(h, 1).map(|(s, _)| s).unwrap_or_default()
}

fn redirect(cl: &CsvCluster, on: bool) -> Result<()> {
    let o = cl
        .csvctl()
        .args([
            "volume",
            "redirect",
            "1",
            "--node",
            "1",
            if on { "on" } else { "off" },
        ])
        .output()?;
    if !o.status.success() {
        bail!(
            "csvctl volume redirect: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// The `redirect` suite's options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs of each fio job both ways (redirected and direct), alternating
    /// which goes first (the median is kept; at least 1).
    #[arg(long, value_name = "N", default_value_t = 3)]
    rounds: usize,
    /// Length of each fio run, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    secs: u64,
    /// Times host 2's SAN path is cut under a write+fsync loop (the rows
    /// give the p50 and the max of the longest stall after each cut).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    cuts: u64,
}

pub fn run(args: Args) -> Result<()> {
    let rounds = args.rounds.max(1);
    let secs = args.secs;
    let cuts = args.cuts;
    let mut tgt = TgtTarget::start()?;
    let t = tgt.add_target("bench")?;
    let backing = tgt.dir().join("lun1.img");
    tgt.add_lun_file(&t, 1, &backing, 4 << 30)?;
    let mut cl = CsvCluster::loopback(3)?;
    cl.mounts = true;
    cl.start_all()?;
    cl.add_volume_url(&tgt.url(&t, 1), 1)?;
    cl.wait_mounted(1, Duration::from_secs(30))?;
    // `volume redirect` looks the host up in the registry, which the
    // founders enter a moment after the first election.
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client().cluster_info().is_ok_and(|i| i.nodes.len() == 3)
    })
    .map_err(|e| anyhow::anyhow!("the hosts did not register: {e:?}"))?;
    let file = cl.mountpoint(1, 1).join("fio.dat");
    eprintln!(
        "redirect bench: fio on {}, Direct vs BlockRedirected, {rounds} rounds of {secs} s",
        file.display()
    );
    layout(&file)?;
    let mut rows = Vec::new();
    for job in &JOBS {
        let (mut red, mut dir) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            for on in if r % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            } {
                redirect(&cl, on)?;
                let x = fio(&file, job, secs)?;
                if on {
                    red.push(x)
                } else {
                    dir.push(x)
                }
            }
        }
        eprintln!("{}: redirected {red:?}, direct {dir:?}", job.name);
        rows.push(Row {
            name: job.name.into(),
            ours: median(red),
            peer: Some(median(dir)),
            unit: job.unit,
            higher_is_better: true,
        });
    }
    redirect(&cl, false)?;

    // Cut host 2's SAN path under a write+fsync loop: the longest gap
    // between two completed writes after each cut.
    let initiator = tgt
        .connections(&t)?
        .into_iter()
        .map(|c| c.initiator)
        .find(|i| i.ends_with("-node2"))
        .context("host 2 has no session")?;
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let path = cl.mountpoint(2, 1).join("cut.bin");
    let w = {
        let (stop, done, path) = (stop.clone(), done.clone(), path.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut f = std::fs::File::create(&path)?;
            let buf = vec![0x5au8; 4096];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all(&buf)?;
                f.sync_data()?;
                if let Ok(mut d) = done.lock() {
                    d.push(Instant::now());
                }
                i += 1;
                if i % 256 == 0 {
                    f.set_len(0)?;
                    use std::io::Seek;
                    f.seek(std::io::SeekFrom::Start(0))?;
                }
            }
            Ok(())
        })
    };
    let mut stalls = Vec::new();
    for k in 0..cuts {
        std::thread::sleep(Duration::from_millis(300));
        let cut = Instant::now();
        tgt.cut_initiator(&t, &initiator)?;
        let t0 = Instant::now();
        while state(&cl, 2) != "BlockRedirected" && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        // The application's stall: the longest gap between two completed
        // writes from the cut until redirection was reported (+300 ms).
        let end = Instant::now();
        let times: Vec<Instant> = done
            .lock()
            .map(|d| {
                d.iter()
                    .filter(|&&x| x >= cut && x <= end)
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        if times.is_empty() {
            let why = if w.is_finished() {
                match w.join() {
                    Ok(Err(e)) => format!("the writer failed: {e:#}"),
                    Ok(Ok(())) => "the writer stopped".to_string(),
                    Err(_) => "the writer panicked".to_string(),
                }
            } else {
                format!("the writer is stuck; host 2 is {:?}", cl.volume_state(2, 1))
            };
            bail!(
                "cut {k}: no write completed after the cut: {why}\nhost 2's log ends:\n{}",
                cl.log_tail(2, 30)
            );
        }
        let mut gap = times[0].duration_since(cut);
        for w in times.windows(2) {
            gap = gap.max(w[1].duration_since(w[0]));
        }
        stalls.push(gap.as_secs_f64() * 1e3);
        tgt.restore_initiator(&t, &initiator)?;
        let t0 = Instant::now();
        while state(&cl, 2) != "Direct" && t0.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    stop.store(true, Ordering::Relaxed);
    w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    stalls.sort_by(f64::total_cmp);
    eprintln!("stalls (ms): {stalls:?}");
    let p50 = stalls[stalls.len() / 2];
    let max = stalls[stalls.len() - 1];
    rows.push(Row {
        name: format!("SAN path cut: longest write stall, p50 of {cuts} cuts"),
        ours: p50,
        peer: None,
        unit: "ms",
        higher_is_better: false,
    });
    rows.push(Row {
        name: format!("SAN path cut: longest write stall, max of {cuts} cuts"),
        ours: max,
        peer: None,
        unit: "ms",
        higher_is_better: false,
    });
    table::print(
        "redirect: a host's I/O through a peer vs its own iSCSI path (same LUN, loopback)",
        "Direct",
        &rows,
    );
    Ok(())
}
