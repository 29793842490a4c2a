//! `csvctl snapshot`: consistent, redirect-on-write snapshots of a volume
//! taken while its VMs and writers keep running, the way VSS does it on a
//! cluster shared volume, and the hook a backup tool calls.
//!
//! `create` drives the protocol over every host that mounts the volume:
//! `prepare` (hooks told, files flushed), `freeze` (hooks quiesce, VMs on
//! the volume pause, new writes wait, writes in progress finish and are
//! flushed), one metadata commit on the volume's coordinator, `thaw`
//! (writes and VMs go on), `complete`. The freeze has a hard time limit:
//! a host that does not freeze within it, or a hook that fails or hangs,
//! aborts the snapshot and every host thaws; a host whose limit passed
//! before the thaw thawed by itself, and the snapshot is deleted.

use crate::cluster_cmd::{utc_ms, Access};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use coordinator::client::{self, Client};
use coordinator::meta::{ROOT, SNAPSHOTS_DIR, SNAPSHOTS_NAME};
use coordinator::proto;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `csvctl snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a consistent snapshot of VolumeN while it is in use (prepare,
    /// freeze every host, commit, thaw, complete); prints how long writes
    /// were held. Read it at /ClusterStorage/VolumeN/.snapshots/NAME on
    /// any host.
    Create {
        #[command(flatten)]
        access: Access,
        /// The volume: N or VolumeN.
        volume: String,
        #[command(flatten)]
        opts: CreateOpts,
    },
    /// List VolumeN's snapshots: name, time, files, and the space only
    /// each one holds (what deleting it gives back).
    List {
        #[command(flatten)]
        access: Access,
        /// The volume: N or VolumeN.
        volume: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take VolumeN's snapshots on a schedule (as DPM protects a volume
    /// every 15 minutes): the cluster's leader takes one every --every
    /// (named auto-YYYYMMDD-HHMMSS-mmm), one run at a time (a run due while
    /// one goes is skipped and counted), and deletes the scheduled ones
    /// the retention rule no longer keeps (the newest --keep, and the
    /// newest of each of the last --keep-daily days). Snapshots taken by
    /// hand are never deleted by it. Survives leader changes.
    ///
    /// Examples:
    ///   csvctl snapshot schedule 1 --every 15m --keep 96 --keep-daily 14
    ///   csvctl snapshot schedule 1 --off
    #[command(verbatim_doc_comment)]
    Schedule(ScheduleArgs),
    /// The volumes' snapshot schedules and how their runs went (last
    /// snapshot, freeze time, space held, skipped and failed runs).
    Schedules {
        #[command(flatten)]
        access: Access,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot; the space only it held is freed.
    Delete {
        #[command(flatten)]
        access: Access,
        /// The volume: N or VolumeN.
        volume: String,
        /// The snapshot's name.
        name: String,
    },
    /// Changed-block tracking: the byte ranges of a file that differ
    /// between two snapshots (or a snapshot and the live volume), so an
    /// incremental backup of a VHD copies only those.
    Diff {
        #[command(flatten)]
        access: Access,
        /// The volume: N or VolumeN.
        volume: String,
        /// The older snapshot.
        #[arg(long)]
        from: String,
        /// The newer snapshot (default: the live volume).
        #[arg(long)]
        to: Option<String>,
        /// The file, relative to the volume's root (e.g. vms/web1.vhd).
        #[arg(long)]
        file: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The backup hook: take a snapshot, run COMMAND with the snapshot's
    /// path in CSV_SNAPSHOT_PATH (also CSV_SNAPSHOT, CSV_VOLUME), delete
    /// the snapshot afterwards, and exit with COMMAND's status.
    ///
    /// Example: csvctl snapshot run Volume1 -- sh -c 'cp "$CSV_SNAPSHOT_PATH/vm1.vhd" /backup/'
    Run {
        #[command(flatten)]
        access: Access,
        /// The volume: N or VolumeN.
        volume: String,
        #[command(flatten)]
        opts: CreateOpts,
        /// Where this host mounts the volumes.
        #[arg(long, default_value = "/ClusterStorage")]
        mount_root: PathBuf,
        /// Keep the snapshot after the command.
        #[arg(long)]
        keep: bool,
        /// The backup command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// `csvctl snapshot schedule` arguments.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    #[command(flatten)]
    access: Access,
    /// The volume: N or VolumeN.
    volume: String,
    /// Time between snapshots (e.g. 15m, 1h, 30s).
    #[arg(long, value_parser = crate::when::parse_age, required_unless_present = "off")]
    every: Option<Duration>,
    /// Scheduled snapshots kept: the newest N (with --keep-daily, at most
    /// the volume's 512 snapshots, less those taken by hand; 64 until
    /// every host runs a build of feature level 4).
    #[arg(long, default_value_t = 96)]
    keep: u32,
    /// Also keep the newest scheduled snapshot of each of the last N days.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// Longest time a run may hold writes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    freeze_limit: Duration,
    /// Stop the schedule (its snapshots stay).
    #[arg(long, conflicts_with = "every")]
    off: bool,
}

/// How to take a snapshot.
#[derive(Debug, Args)]
pub struct CreateOpts {
    /// The snapshot's name (default: snap-YYYYMMDD-HHMMSS, UTC).
    #[arg(long)]
    name: Option<String>,
    /// Longest time writes may be held; past it the snapshot is aborted
    /// and I/O resumes (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    freeze_limit: Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, "s"), |i| (&t[..i], &t[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s or m)")),
    };
    if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
        return Err(format!("{s:?}: the freeze limit must be 100ms..10m"));
    }
    Ok(d)
}

/// `3` or `Volume3`.
fn parse_volume(s: &str) -> Result<u64> {
    let n = s.strip_prefix("Volume").unwrap_or(s);
    n.parse()
        .ok()
        .filter(|&n| n > 0)
        .with_context(|| format!("{s:?} is not a volume (N or VolumeN)"))
}

use coordinator::group::now_ms;

fn describe(e: client::ClientError) -> anyhow::Error {
    anyhow::anyhow!(client::describe(&e))
}

use coordinator::snapshot_run::Taken;

/// Takes a snapshot of `vol` through the whole protocol
/// (`coordinator::snapshot_run`).
fn take(access: &Access, c: &mut Client, vol: u64, opts: &CreateOpts) -> Result<Taken> {
    let me = access.identity()?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| coordinator::snapshot_run::default_name("snap", now_ms()));
    if name.starts_with("auto-") {
        anyhow::bail!(
            "snapshot names starting with auto- are the scheduled ones (a schedule's retention deletes them); choose another name"
        );
    }
    coordinator::snapshot_run::take(&me, c, vol, &name, opts.freeze_limit)
        .map_err(anyhow::Error::msg)
}

fn report(vol: u64, t: &Taken, json: bool) -> Result<()> {
    let mut held: Vec<u64> = t.hosts.iter().map(|(_, r)| r.held_ms).collect();
    held.sort_unstable();
    let max = held.last().copied().unwrap_or(0);
    let p50 = held.get(held.len() / 2).copied().unwrap_or(0);
    let vms: u32 = t.hosts.iter().map(|(_, r)| r.vms).sum();
    if json {
        let hosts: Vec<serde_json::Value> = t
            .hosts
            .iter()
            .map(|(n, r)| {
                serde_json::json!({"host": n, "held_ms": r.held_ms, "vms_paused": r.vms, "vms": r.vm_quiesce,
                    "drain_ms": r.drain_ms, "flush_ms": r.flush_ms, "refresh_ms": r.refresh_ms,
                    "hooks": r.hooks})
            })
            .collect();
        let out = serde_json::json!({
            "volume": vol, "name": t.name, "hosts": hosts,
            "held_max_ms": max, "held_p50_ms": p50, "vms_paused": vms,
            "freeze_started_ms": t.freeze_started_ms, "committed_ms": t.committed_ms,
            "thawed_ms": t.thawed_ms,
            "path": format!("Volume{vol}/{SNAPSHOTS_NAME}/{}", t.name),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let per: Vec<String> = t
            .hosts
            .iter()
            .map(|(n, r)| format!("host {n} {} ms", r.held_ms))
            .collect();
        println!(
            "snapshot {} of Volume{vol} taken: {} host(s) froze, writes held {max} ms at most ({}); {vms} VM(s) quiesced; read it at Volume{vol}/{SNAPSHOTS_NAME}/{}",
            t.name,
            t.hosts.len(),
            per.join(", "),
            t.name
        );
        for (n, r) in &t.hosts {
            for q in &r.vm_quiesce {
                println!("  host {n}: VM {q}");
            }
        }
    }
    Ok(())
}

/// The inode of `path` below directory `dir` of VolumeN.
fn walk(c: &mut Client, vol: u64, mut ino: u64, path: &str) -> Result<u64> {
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        ino = c
            .lookup(vol, ino, part)
            .map_err(|e| anyhow::anyhow!("{path}: {}", client::describe(&e)))?
            .ino;
    }
    Ok(ino)
}

/// Where each byte of a file is: (start, end, Some(LUN offset) if
/// written).
fn layout(ext: &[proto::Extent]) -> Vec<(u64, u64, Option<u64>)> {
    ext.iter()
        .map(|e| {
            (
                e.file_off,
                e.file_off + e.len,
                (!e.unwritten).then_some(e.lun_off),
            )
        })
        .collect()
}

/// The byte ranges where two versions of a file differ: where one has
/// data the other has not, or their data sit at different LUN places
/// (redirect-on-write moves every rewritten range), and between the two
/// sizes.
pub fn changed_ranges(
    a: &[proto::Extent],
    a_size: u64,
    b: &[proto::Extent],
    b_size: u64,
) -> Vec<(u64, u64)> {
    let (la, lb) = (layout(a), layout(b));
    let mut cuts: Vec<u64> = la
        .iter()
        .chain(lb.iter())
        .flat_map(|&(s, e, _)| [s, e])
        .chain([0, a_size, b_size])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let at = |l: &[(u64, u64, Option<u64>)], x: u64| -> Option<u64> {
        l.iter()
            .find(|&&(s, e, _)| s <= x && x < e)
            .and_then(|&(s, _, lun)| lun.map(|o| o + (x - s)))
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let end = a_size.max(b_size);
    for w in cuts.windows(2) {
        let (x, y) = (w[0], w[1].min(end));
        if x >= y {
            continue;
        }
        let in_a = (x < a_size).then(|| at(&la, x));
        let in_b = (x < b_size).then(|| at(&lb, x));
        if in_a != in_b {
            match out.last_mut() {
                Some(l) if l.0 + l.1 == x => l.1 += y - x,
                _ => out.push((x, y - x)),
            }
        }
    }
    out
}

fn diff(
    access: &Access,
    vol: u64,
    from: &str,
    to: Option<&str>,
    file: &str,
    json: bool,
) -> Result<ExitCode> {
    let mut c = access.client()?;
    let root_of = |c: &mut Client, name: &str| -> Result<u64> {
        c.lookup(vol, SNAPSHOTS_DIR, name)
            .map(|a| a.ino)
            .map_err(|e| anyhow::anyhow!("snapshot {name}: {}", client::describe(&e)))
    };
    let ra = root_of(&mut c, from)?;
    let rb = match to {
        Some(t) => root_of(&mut c, t)?,
        None => ROOT,
    };
    let (ia, ib) = (walk(&mut c, vol, ra, file)?, walk(&mut c, vol, rb, file)?);
    let (aa, ab) = (
        c.getattr(vol, ia).map_err(describe)?,
        c.getattr(vol, ib).map_err(describe)?,
    );
    let (ea, eb) = (
        c.extents(vol, ia).map_err(describe)?,
        c.extents(vol, ib).map_err(describe)?,
    );
    let ranges = changed_ranges(&ea, aa.size, &eb, ab.size);
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let to_name = to.unwrap_or("(live)");
    if json {
        let list: Vec<serde_json::Value> = ranges
            .iter()
            .map(|(o, l)| serde_json::json!({"offset": o, "length": l}))
            .collect();
        let out = serde_json::json!({
            "volume": vol, "file": file, "from": from, "to": to_name,
            "size_from": aa.size, "size_to": ab.size,
            "changed": list, "changed_bytes": total,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{:>16} {:>12}", "OFFSET", "LENGTH");
        for (o, l) in &ranges {
            println!("{o:>16} {l:>12}");
        }
        println!(
            "{file}: {} changed range(s), {} of {} between {from} and {to_name}",
            ranges.len(),
            vhd::size::human(total),
            vhd::size::human(ab.size)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a `snapshot` command.
fn schedule(a: ScheduleArgs) -> Result<ExitCode> {
    let vol = parse_volume(&a.volume)?;
    let mut c = a.access.client()?;
    if a.off {
        c.remove_schedule(vol).map_err(describe)?;
        println!("Volume{vol}: schedule stopped (its snapshots stay)");
        return Ok(ExitCode::SUCCESS);
    }
    let every = a.every.unwrap_or(Duration::from_secs(900));
    if every < Duration::from_secs(1) {
        anyhow::bail!("--every {every:?}: at least 1s");
    }
    if a.keep == 0 && a.keep_daily == 0 {
        anyhow::bail!("--keep 0 with no --keep-daily would keep nothing");
    }
    let max = coordinator::meta::MAX_SNAPSHOTS as u32;
    if a.keep + a.keep_daily > max {
        anyhow::bail!(
            "--keep {} and --keep-daily {}: a volume keeps at most {max} snapshots",
            a.keep,
            a.keep_daily
        );
    }
    c.set_schedule(proto::SnapshotSchedule {
        volume: vol,
        every_ms: every.as_millis() as u64,
        keep: a.keep,
        keep_daily: a.keep_daily,
        freeze_limit_ms: a.freeze_limit.as_millis() as u64,
        created_ms: now_ms(),
        ..Default::default()
    })
    .map_err(describe)?;
    println!(
        "Volume{vol}: a snapshot every {}, keeping the newest {}{} (the cluster's leader runs it; csvctl snapshot schedules shows the runs)",
        crate::when::show_age(every),
        a.keep,
        if a.keep_daily > 0 {
            format!(" and one a day for {} days", a.keep_daily)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn schedules(access: &Access, json: bool) -> Result<ExitCode> {
    let info = access.client()?.cluster_info().map_err(describe)?;
    if json {
        let v: Vec<serde_json::Value> = info
            .schedules
            .iter()
            .map(|s| {
                let l = s.last.clone().unwrap_or_default();
                serde_json::json!({
                    "volume": s.volume, "every_ms": s.every_ms, "keep": s.keep,
                    "keep_daily": s.keep_daily, "freeze_limit_ms": s.freeze_limit_ms,
                    "runs": s.runs, "skipped": s.skipped, "failures": s.failures,
                    "last_skip": s.last_skip,
                    "running_since_ms": s.running_since_ms, "running_on": s.running_on,
                    "last": {"snapshot": l.snapshot, "started_ms": l.started_ms,
                        "ended_ms": l.ended_ms, "ok": l.ok, "error": l.error,
                        "held_ms": l.held_ms, "deleted": l.deleted,
                        "space_held": l.space_held, "host": l.host},
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if info.schedules.is_empty() {
        println!("no schedules (csvctl snapshot schedule VOLUME --every 15m makes one)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<9} {:>7} {:>5} {:>5} {:>6} {:>7} {:>6}  LAST RUN",
        "VOLUME", "EVERY", "KEEP", "DAILY", "RUNS", "SKIPPED", "FAILED"
    );
    for s in &info.schedules {
        let last = match &s.last {
            None => "-".to_string(),
            Some(l) if l.ok => format!(
                "{} at {} on host {}: writes held {} ms, {} deleted, scheduled snapshots hold {}",
                l.snapshot,
                utc_ms(l.started_ms),
                l.host,
                l.held_ms,
                l.deleted,
                vhd::size::human(l.space_held)
            ),
            Some(l) => format!("failed at {}: {}", utc_ms(l.started_ms), l.error),
        };
        println!(
            "{:<9} {:>7} {:>5} {:>5} {:>6} {:>7} {:>6}  {last}",
            format!("Volume{}", s.volume),
            crate::when::show_age(Duration::from_millis(s.every_ms)),
            s.keep,
            s.keep_daily,
            s.runs,
            s.skipped,
            s.failures
        );
        if s.running_since_ms != 0 {
            println!(
                "          running since {} on host {}",
                utc_ms(s.running_since_ms),
                s.running_on
            );
        }
        if !s.last_skip.is_empty() {
            println!("          last skip: {}", s.last_skip);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(c: SnapshotCommand) -> Result<ExitCode> {
    match c {
        SnapshotCommand::Create {
            access,
            volume,
            opts,
        } => {
            let vol = parse_volume(&volume)?;
            let mut c = access.client()?;
            let t = take(&access, &mut c, vol, &opts)?;
            report(vol, &t, opts.json)?;
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::List {
            access,
            volume,
            json,
        } => {
            let vol = parse_volume(&volume)?;
            let list = access.client()?.snapshots(vol).map_err(describe)?;
            if json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|s| {
                        serde_json::json!({"name": s.name, "id": s.id, "created_ms": s.created,
                            "files": s.files, "exclusive_bytes": s.exclusive})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<28} {:<24} {:>7} {:>12}",
                    "NAME", "CREATED (UTC)", "FILES", "EXCLUSIVE"
                );
                for s in &list {
                    println!(
                        "{:<28} {:<24} {:>7} {:>12}",
                        s.name,
                        utc_ms(s.created),
                        s.files,
                        vhd::size::human(s.exclusive)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Schedule(a) => schedule(a),
        SnapshotCommand::Schedules { access, json } => schedules(&access, json),
        SnapshotCommand::Delete {
            access,
            volume,
            name,
        } => {
            let vol = parse_volume(&volume)?;
            let mut c = access.client()?;
            let before = c.usage(vol).map_err(describe)?;
            c.delete_snapshot(vol, &name).map_err(describe)?;
            let after = c.usage(vol).map_err(describe)?;
            println!(
                "snapshot {name} of Volume{vol} deleted; {} freed (more once readers of its files close them)",
                vhd::size::human(after.free.saturating_sub(before.free))
            );
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Diff {
            access,
            volume,
            from,
            to,
            file,
            json,
        } => diff(
            &access,
            parse_volume(&volume)?,
            &from,
            to.as_deref(),
            &file,
            json,
        ),
        SnapshotCommand::Run {
            access,
            volume,
            opts,
            mount_root,
            keep,
            command,
        } => {
            let vol = parse_volume(&volume)?;
            let mut c = access.client()?;
            let t = take(&access, &mut c, vol, &opts)?;
            report(vol, &t, opts.json)?;
            let path = mount_root
                .join(format!("Volume{vol}"))
                .join(SNAPSHOTS_NAME)
                .join(&t.name);
            let status = std::process::Command::new(&command[0])
                .args(&command[1..])
                .env("CSV_SNAPSHOT_PATH", &path)
                .env("CSV_SNAPSHOT", &t.name)
                .env("CSV_VOLUME", format!("Volume{vol}"))
                .status();
            if !keep {
                if let Err(e) = c.delete_snapshot(vol, &t.name) {
                    eprintln!(
                        "warning: snapshot {} of Volume{vol} not deleted: {}",
                        t.name,
                        client::describe(&e)
                    );
                }
            }
            let status = status.with_context(|| format!("cannot run {:?}", command[0]))?;
            use std::os::unix::process::ExitStatusExt;
            let code = status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(1);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(file_off: u64, lun_off: u64, len: u64, unwritten: bool) -> proto::Extent {
        proto::Extent {
            file_off,
            lun_off,
            len,
            unwritten,
            shared: false,
        }
    }

    #[test]
    fn changed_ranges_follow_moved_and_new_data() {
        let a = [ext(0, 1000, 300, false), ext(300, 5000, 100, true)];
        // 100..200 redirected, 300..400 written since, 400..500 grown.
        let b = [
            ext(0, 1000, 100, false),
            ext(100, 9000, 100, false),
            ext(200, 1200, 100, false),
            ext(300, 5000, 200, false),
        ];
        assert_eq!(
            changed_ranges(&a, 400, &b, 500),
            vec![(100, 100), (300, 200)]
        );
        assert!(changed_ranges(&a, 400, &a, 400).is_empty());
        // Unwritten and a hole both read as zeros: no change.
        assert!(changed_ranges(&[ext(0, 7, 50, true)], 50, &[], 50).is_empty());
        // A shrunk file: the cut-off tail changed.
        assert_eq!(changed_ranges(&a, 400, &a[..1], 300), vec![(300, 100)]);
    }

    #[test]
    fn volumes_and_durations_parse() {
        assert_eq!(parse_volume("Volume3").unwrap(), 3);
        assert_eq!(parse_volume("3").unwrap(), 3);
        assert!(parse_volume("Volume").is_err());
        assert!(parse_volume("0").is_err());
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("5ms").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("x").is_err());
    }
}
