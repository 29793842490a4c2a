//! Volume snapshots on three hosts (three `csvd` processes, real FUSE
//! mounts, one LUN file): a snapshot taken while every host writes holds
//! exactly what was acknowledged before the freeze and nothing
//! acknowledged after the thaw, never changes while the live files do, is
//! readable on every host, gives its space back when deleted; changed-block
//! tracking lists what changed between two snapshots; a hook that hangs
//! aborts the snapshot within the freeze's time limit; while a freeze
//! holds a host's writes, its reads, lookups and listings go on.

use csv_test_support::csvd::CsvCluster;
use csv_test_support::{skip_unless, Need};
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const REC: u64 = 4096;
/// Records per writer's file; writers wrap around and rewrite them.
const SLOTS: u64 = 256;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn cluster(host_args: &[(u64, Vec<String>)]) -> (CsvCluster, u64) {
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.mounts = true;
    for (id, a) in host_args {
        cl.host_args.insert(*id, a.clone());
    }
    cl.start_all().unwrap();
    let v = cl.add_volume_file(512 << 20).unwrap();
    cl.wait_mounted(v, Duration::from_secs(20)).unwrap();
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client()
            .cluster_info()
            .map(|i| i.nodes.len() == 3)
            .unwrap_or(false)
    })
    .unwrap();
    (cl, v)
}

fn csvctl(cl: &CsvCluster, args: &[&str]) -> std::process::Output {
    cl.csvctl().args(args).output().unwrap()
}

fn csvctl_ok(cl: &CsvCluster, args: &[&str]) -> String {
    let o = csvctl(cl, args);
    assert!(
        o.status.success(),
        "csvctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Record `seq` of `host`: a header (seq, host) and a pattern from both.
fn record(host: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; REC as usize];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&host.to_le_bytes());
    let mut x = (seq << 8 | host).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in b[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    b
}

/// The seq in a slot, checking the record is whole (None: never written).
fn read_slot(host: u64, b: &[u8]) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
    assert_eq!(b, record(host, seq), "torn or foreign record in a slot");
    Some(seq)
}

/// A writer's log: seq -> (started, acknowledged) in wall-clock ms.
type Log = Arc<Mutex<Vec<(u64, u64, u64)>>>;

/// Writes records round-robin over the slots of `path` until `stop`.
fn writer(
    host: u64,
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    log: Log,
) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let started = now_ms();
        f.write_all_at(&record(host, seq), (seq % SLOTS) * REC)
            .map_err(|e| format!("host {host}: write {seq}: {e}"))?;
        let acked = now_ms();
        log.lock().unwrap().push((seq, started, acked));
        seq += 1;
        if seq % 32 == 0 {
            f.sync_data()
                .map_err(|e| format!("host {host}: fsync after {seq}: {e}"))?;
        }
    }
    f.sync_all()
        .map_err(|e| format!("host {host}: last fsync: {e}"))
}

fn sha(path: &std::path::Path) -> String {
    let o = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Three hosts write their own files without pause; a snapshot taken in
/// the middle holds, slot by slot, a record at least as new as the last
/// one acknowledged before the freeze began and none acknowledged after
/// the thaw; it reads the same on every host while the live files move on;
/// deleting it frees the space only it held.
#[test]
fn a_snapshot_under_load_holds_exactly_the_writes_before_the_freeze() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Device("/dev/fuse")
    );
    let (cl, v) = cluster(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut logs = Vec::new();
    let mut threads = Vec::new();
    for h in 1..=3u64 {
        let log: Log = Arc::default();
        logs.push(log.clone());
        let path = cl.mountpoint(h, v).join(format!("w{h}.dat"));
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || writer(h, path, stop, log)));
    }
    // Long enough for every writer to wrap around (rewrites in place).
    csv_test_support::wait_until(Duration::from_secs(30), || {
        logs.iter()
            .all(|l| l.lock().unwrap().len() as u64 > SLOTS + 50)
    })
    .unwrap();
    let out = csvctl_ok(&cl, &["snapshot", "create", "1", "--name", "mid", "--json"]);
    let snap: Value = serde_json::from_str(&out).unwrap();
    eprintln!("{snap:#}");
    let (freeze, thawed) = (
        snap["freeze_started_ms"].as_u64().unwrap(),
        snap["thawed_ms"].as_u64().unwrap(),
    );
    assert_eq!(snap["hosts"].as_array().unwrap().len(), 3, "{snap}");
    // Writers go on, rewriting what the snapshot holds.
    std::thread::sleep(Duration::from_millis(1500));
    let snap_files: Vec<_> = (1..=3u64)
        .map(|h| {
            cl.mountpoint(2, v)
                .join(".snapshots/mid")
                .join(format!("w{h}.dat"))
        })
        .collect();
    let early: Vec<String> = snap_files.iter().map(|p| sha(p)).collect();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        if let Err(e) = t.join().unwrap() {
            panic!(
                "{e}\nhost 1:\n{}\nhost 2:\n{}\nhost 3:\n{}",
                cl.log_tail(1, 10),
                cl.log_tail(2, 10),
                cl.log_tail(3, 10)
            );
        }
    }
    for (i, h) in (1..=3u64).enumerate() {
        let log = logs[i].lock().unwrap();
        // What the snapshot holds, read on host 3.
        let p = cl
            .mountpoint(3, v)
            .join(".snapshots/mid")
            .join(format!("w{h}.dat"));
        let f = std::fs::File::open(&p).unwrap();
        let mut held = vec![None; SLOTS as usize];
        for (s, slot) in held.iter_mut().enumerate() {
            let mut b = vec![0u8; REC as usize];
            let n = f.read_at(&mut b, s as u64 * REC).unwrap();
            if n == REC as usize {
                *slot = read_slot(h, &b);
            }
        }
        let mut before = 0;
        let mut after = 0;
        for &(seq, _, acked) in log.iter() {
            let slot = (seq % SLOTS) as usize;
            if acked < freeze {
                before += 1;
                let got = held[slot];
                assert!(
                    got.is_some_and(|g| g >= seq),
                    "host {h}: write {seq} acknowledged at {acked} before the freeze at {freeze} is missing (slot holds {got:?})"
                );
            }
            if acked > thawed {
                after += 1;
                assert_ne!(
                    held[slot],
                    Some(seq),
                    "host {h}: write {seq} acknowledged at {acked} after the thaw at {thawed} is in the snapshot"
                );
            }
        }
        eprintln!(
            "host {h}: {} writes, {before} acknowledged before the freeze (all in), {after} after the thaw (none in)",
            log.len()
        );
        assert!(before > 0 && after > 0);
        // Byte-identical on every host and over time; the live file moved on.
        let late = sha(&p);
        assert_eq!(early[i], late, "snapshot of w{h}.dat changed");
        let live = sha(&cl.mountpoint(1, v).join(format!("w{h}.dat")));
        assert_ne!(live, late, "w{h}.dat did not change after the snapshot");
    }
    // Read-only.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&snap_files[0])
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(std::fs::read_dir(cl.mountpoint(1, v))
        .unwrap()
        .all(|e| e.unwrap().file_name() != ".snapshots"));

    // Deleting it gives back what only it held.
    let list: Value =
        serde_json::from_str(&csvctl_ok(&cl, &["snapshot", "list", "1", "--json"])).unwrap();
    let exclusive = list[0]["exclusive_bytes"].as_u64().unwrap();
    assert!(exclusive >= 3 * SLOTS * REC / 2, "{list}");
    let free0 = cl.client().usage(v).unwrap().free;
    csvctl_ok(&cl, &["snapshot", "delete", "1", "mid"]);
    let free1 = cl.client().usage(v).unwrap().free;
    eprintln!(
        "snapshot held {exclusive} bytes of its own; deleting it freed {}",
        free1 - free0
    );
    assert_eq!(free1 - free0, exclusive);
    assert!(!cl.mountpoint(1, v).join(".snapshots/mid").exists());
}

/// Changed-block tracking: between two snapshots only the rewritten
/// ranges of a file are listed (in 64 KiB units at most), and against the
/// live volume the writes since.
#[test]
fn snapshot_diff_lists_the_ranges_written_between_two_snapshots() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Device("/dev/fuse")
    );
    let (cl, v) = cluster(&[]);
    let p = cl.mountpoint(1, v).join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.write_all_at(&vec![7u8; 4 << 20], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    csvctl_ok(&cl, &["snapshot", "create", "Volume1", "--name", "a"]);
    // Rewrites through another host.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(cl.mountpoint(2, v).join("disk.img"))
        .unwrap();
    let writes = [(100 << 10, 4096u64), (1 << 20, 200 << 10), (3 << 20, 1)];
    for &(o, l) in &writes {
        f.write_all_at(&vec![9u8; l as usize], o).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    csvctl_ok(&cl, &["snapshot", "create", "1", "--name", "b"]);
    let d: Value = serde_json::from_str(&csvctl_ok(
        &cl,
        &[
            "snapshot", "diff", "1", "--from", "a", "--to", "b", "--file", "disk.img", "--json",
        ],
    ))
    .unwrap();
    eprintln!("{d:#}");
    let ranges: Vec<(u64, u64)> = d["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    for &(o, l) in &writes {
        assert!(
            ranges.iter().any(|&(ro, rl)| ro <= o && o + l <= ro + rl),
            "write at {o}+{l} not listed: {ranges:?}"
        );
    }
    for &(ro, rl) in &ranges {
        assert!(
            writes
                .iter()
                .any(|&(o, l)| ro < o + l + (64 << 10) && o < ro + rl + (64 << 10)),
            "range {ro}+{rl} was not written"
        );
    }
    let total = d["changed_bytes"].as_u64().unwrap();
    assert!(total <= 4 * (64 << 10) + (200 << 10), "{total}");
    // Nothing changed since b.
    let d: Value = serde_json::from_str(&csvctl_ok(
        &cl,
        &[
            "snapshot", "diff", "1", "--from", "b", "--file", "disk.img", "--json",
        ],
    ))
    .unwrap();
    assert_eq!(d["changed_bytes"], 0, "{d}");
    // `.snapshots` lists them, and each lists the volume as it was.
    let names = |p: std::path::PathBuf| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(cl.mountpoint(2, v).join(".snapshots")), ["a", "b"]);
    assert_eq!(
        names(cl.mountpoint(2, v).join(".snapshots/a")),
        ["disk.img"]
    );
    let md = std::fs::metadata(cl.mountpoint(2, v).join(".snapshots/a/disk.img")).unwrap();
    assert_eq!(md.len(), 4 << 20);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        md.permissions().mode() & 0o222,
        0,
        "snapshot files are read-only"
    );
    // And the snapshots read back what the file held then.
    let a = std::fs::read(cl.mountpoint(3, v).join(".snapshots/a/disk.img")).unwrap();
    assert!(a.iter().all(|&x| x == 7));
    let b = std::fs::read(cl.mountpoint(3, v).join(".snapshots/b/disk.img")).unwrap();
    assert_eq!(b[100 << 10], 9);
    assert_eq!(b[(100 << 10) - 1], 7);
}

/// A hook on host 2 that hangs in `freeze`: the snapshot is aborted once
/// the freeze's time limit passes, no snapshot is left, the hook hears
/// `abort`, and writes on host 2 go on at once.
#[test]
fn a_hanging_hook_aborts_the_snapshot_within_the_freeze_limit() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Device("/dev/fuse")
    );
    let hooks = csv_test_support::temp_dir("hooks").unwrap();
    let log = hooks.path().join("phases.log");
    let dir = hooks.path().join("hooks.d");
    std::fs::create_dir(&dir).unwrap();
    let script = dir.join("10-app");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $2 $3 $CSV_MOUNTPOINT\" >> {}\n[ \"$1\" = freeze ] && exec sleep 60\nexit 0\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cl, v) = cluster(&[(
        2,
        vec!["--snapshot-hooks".into(), dir.display().to_string()],
    )]);
    let f = std::fs::File::create(cl.mountpoint(2, v).join("busy.dat")).unwrap();
    f.write_all_at(b"before", 0).unwrap();
    let t = Instant::now();
    let o = csvctl(
        &cl,
        &[
            "snapshot",
            "create",
            "1",
            "--name",
            "stuck",
            "--freeze-limit",
            "2s",
        ],
    );
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{err}\nin {took:?}");
    assert!(!o.status.success());
    assert!(err.contains("aborted") && err.contains("10-app"), "{err}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    // Writes on host 2 are not held.
    let t = Instant::now();
    f.write_all_at(b"after", 4096).unwrap();
    f.sync_all().unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let list: Value =
        serde_json::from_str(&csvctl_ok(&cl, &["snapshot", "list", "1", "--json"])).unwrap();
    assert_eq!(list, serde_json::json!([]));
    let phases = std::fs::read_to_string(&log).unwrap();
    let said: Vec<&str> = phases
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(said, ["prepare", "freeze", "abort"], "{phases}");
    assert!(phases.contains("Volume1 stuck"), "{phases}");
}

/// Writes held by a freeze must not hold anything else up: with more
/// writers waiting at host 1's gate than it has FUSE threads reading
/// requests (`--fuse-readers 2`), reads, lookups and listings on host 1
/// still answer at once, and the writes go on after the thaw. (Host 2's
/// hook hangs in `freeze`, so host 1 stays frozen until the limit.)
#[test]
fn reads_and_lookups_go_on_while_a_freeze_holds_the_writes() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Device("/dev/fuse")
    );
    let hooks = csv_test_support::temp_dir("hooks").unwrap();
    let script = hooks.path().join("10-hang");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = freeze ] && exec sleep 60\nexit 0\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cl, v) = cluster(&[
        (1, vec!["--fuse-readers".into(), "2".into()]),
        (
            2,
            vec![
                "--snapshot-hooks".into(),
                hooks.path().display().to_string(),
            ],
        ),
    ]);
    let m = cl.mountpoint(1, v);
    std::fs::write(m.join("other.dat"), vec![7u8; 1 << 20]).unwrap();
    const WRITERS: usize = 8;
    let files: Vec<std::fs::File> = (0..WRITERS)
        .map(|i| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(m.join(format!("w{i}.dat")))
                .unwrap();
            f.write_all_at(&[0u8; 4096], 0).unwrap();
            f
        })
        .collect();
    let stop = AtomicBool::new(false);
    let (writes, reads) = std::thread::scope(|s| {
        let writers: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let stop = &stop;
                s.spawn(move || {
                    let (mut n, mut slowest) = (0u32, Duration::ZERO);
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        f.write_all_at(&[i as u8 + 1; 4096], 0).unwrap();
                        slowest = slowest.max(t.elapsed());
                        n += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    (n, slowest)
                })
            })
            .collect();
        let snap = s.spawn(|| {
            csvctl(
                &cl,
                &[
                    "snapshot",
                    "create",
                    "1",
                    "--name",
                    "held",
                    "--freeze-limit",
                    "4s",
                ],
            )
        });
        // Read, look up and list on host 1 until the snapshot is over.
        use std::os::unix::fs::OpenOptionsExt;
        let r = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(m.join("other.dat"))
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let (mut n, mut slowest, mut total) = (0u32, Duration::ZERO, Duration::ZERO);
        while !snap.is_finished() {
            let t = Instant::now();
            r.read_exact_at(&mut buf, (n as u64 % 256) * 4096).unwrap();
            assert!(buf.iter().all(|&b| b == 7));
            std::fs::metadata(m.join("w0.dat")).unwrap();
            assert!(std::fs::read_dir(&m).unwrap().count() > WRITERS);
            slowest = slowest.max(t.elapsed());
            total += t.elapsed();
            n += 1;
        }
        let o = snap.join().unwrap();
        assert!(!o.status.success(), "the hanging hook aborts the snapshot");
        // Writes go on after the thaw.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let w: Vec<(u32, Duration)> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        (w, (n, slowest, total / n.max(1)))
    });
    eprintln!("writers (writes, slowest): {writes:?}; reader: {reads:?}");
    let held = writes.iter().map(|w| w.1).max().unwrap();
    assert!(
        held >= Duration::from_secs(2),
        "the freeze held the writes ({held:?})"
    );
    // Had the held writes kept every reader's turn, each request would
    // wait for a parked thread to give up waiting for one (half a second)
    // and the three would take 80-100 ms on average.
    assert!(
        reads.1 < Duration::from_secs(1) && reads.2 < Duration::from_millis(40),
        "a read, lookup and listing took {:?} at worst, {:?} on average, while the writes were held",
        reads.1,
        reads.2
    );
    for (i, f) in files.iter().enumerate() {
        let mut b = [0u8; 4096];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1), "w{i}.dat");
    }
}

/// A 2-second schedule keeping 5, run for 30 s while every host writes,
/// with the cluster's leader killed during a run: afterwards exactly the 5
/// newest scheduled snapshots remain, each readable with whole records;
/// the writers of the hosts that live never got an error and went on
/// after the kill (no host stayed frozen); the cut-off run is recorded as
/// failed and the schedule went on under the new leader.
#[test]
fn a_schedule_keeps_its_newest_snapshots_through_a_leader_kill() {
    skip_unless!(Need::Root, Need::Device("/dev/fuse"));
    let (mut cl, v) = cluster(&[]);
    // Schedules need feature level 4 (every host reports it at start).
    csv_test_support::wait_until(Duration::from_secs(20), || {
        cl.client()
            .cluster_info()
            .is_ok_and(|i| i.feature_level >= coordinator::features::SNAPSHOT_SCHEDULES)
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut logs = Vec::new();
    for h in 1..=3u64 {
        let log: Log = Arc::default();
        logs.push(log.clone());
        let path = cl.mountpoint(h, v).join(format!("w{h}"));
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || writer(h, path, stop, log)));
    }
    let vol = v.to_string();
    let out = csvctl_ok(
        &cl,
        &[
            "snapshot",
            "schedule",
            &vol,
            "--every",
            "2s",
            "--keep",
            "5",
            "--freeze-limit",
            "3s",
        ],
    );
    eprintln!("{out}");
    let t0 = Instant::now();
    // Halfway, the leader is killed while a run is going.
    let leader = loop {
        assert!(t0.elapsed() < Duration::from_secs(25), "no run seen going");
        let info = cl.client().cluster_info().unwrap();
        let s = info
            .schedules
            .iter()
            .find(|s| s.volume == v)
            .cloned()
            .unwrap();
        if t0.elapsed() > Duration::from_secs(12) && s.running_since_ms != 0 {
            break s.running_on;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("killing host {leader} (the leader) during a run");
    cl.kill(leader).unwrap();
    let killed_at = Instant::now();
    let acked_at_kill: Vec<usize> = logs.iter().map(|l| l.lock().unwrap().len()).collect();
    while t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    // The writers of the living hosts went on after the kill.
    for (i, l) in logs.iter().enumerate() {
        let h = i as u64 + 1;
        if h == leader {
            continue;
        }
        let n = l.lock().unwrap().len();
        assert!(
            n > acked_at_kill[i] + 10,
            "host {h}'s writer stalled after the kill ({} -> {n})",
            acked_at_kill[i]
        );
    }
    // Let the schedule's last run end, then stop it.
    let survivor = if leader == 1 { 2 } else { 1 };
    let settled = csv_test_support::wait_until(Duration::from_secs(60), || {
        cl.client().cluster_info().is_ok_and(|i| {
            i.schedules
                .iter()
                .any(|s| s.volume == v && s.running_since_ms == 0 && s.runs >= 8)
        })
    });
    let status = csvctl_ok(&cl, &["snapshot", "schedules"]);
    eprintln!("{status}");
    settled.unwrap();
    let sched: Value =
        serde_json::from_str(&csvctl_ok(&cl, &["snapshot", "schedules", "--json"])).unwrap();
    csvctl_ok(&cl, &["snapshot", "schedule", &vol, "--off"]);
    stop.store(true, Ordering::Relaxed);
    for (i, w) in writers.into_iter().enumerate() {
        let h = i as u64 + 1;
        let r = w.join().unwrap();
        if h != leader {
            r.unwrap_or_else(|e| panic!("a living host's writer failed: {e}"));
        }
    }
    eprintln!(
        "the killed host's runs: stopped {:?} after the kill",
        killed_at.elapsed()
    );
    eprintln!("{sched:#}");
    let s = &sched[0];
    assert!(s["runs"].as_u64().unwrap() >= 8, "{s:#}");
    assert!(
        s["failures"].as_u64().unwrap() >= 1,
        "the run cut off by the kill is recorded as failed: {s:#}"
    );
    assert!(
        s["failures"].as_u64().unwrap() < s["runs"].as_u64().unwrap() / 2,
        "{s:#}"
    );
    // Exactly the 5 newest scheduled snapshots.
    let list: Value =
        serde_json::from_str(&csvctl_ok(&cl, &["snapshot", "list", &vol, "--json"])).unwrap();
    let auto: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"].as_str().unwrap().starts_with("auto-"))
        .collect();
    assert_eq!(auto.len(), 5, "{list:#}");
    // The auto- names are the schedule's: none is taken by hand.
    let o = csvctl(&cl, &["snapshot", "create", &vol, "--name", "auto-mine"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("scheduled"),
        "{o:?}"
    );
    // Each readable on a living host, every record whole.
    for s in &auto {
        let name = s["name"].as_str().unwrap();
        let dir = cl.mountpoint(survivor, v).join(".snapshots").join(name);
        for h in 1..=3u64 {
            let Ok(b) = std::fs::read(dir.join(format!("w{h}"))) else {
                continue; // a writer that had not made its file yet
            };
            for slot in b.chunks(REC as usize).filter(|c| c.len() == REC as usize) {
                read_slot(h, slot);
            }
        }
    }
}
