//! Randomized faults (a nemesis) under a history of client operations on
//! every host, and crashes of the whole cluster at random points; each run
//! ends with the history checked.
//!
//! Replay a run with the seed it prints: `CSV_NEMESIS_SEED=S`. Length:
//! `CSV_NEMESIS_SECS` (the suite runs 40 s; docs/RELIABILITY.md has the
//! 5-minute command) and `CSV_CRASH_ROUNDS`.

use csv_test_support::csvd::CsvCluster;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// xorshift64*: the runs are replayable from their seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("CSV_NEMESIS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

const CHUNK: usize = 16 << 10;
const CHUNKS: u64 = 64;
const KEYS: u64 = 4;

fn chunk(host: u64, n: u64) -> Vec<u8> {
    let mut r = Rng::new(host << 40 | n);
    (0..CHUNK / 8)
        .flat_map(|_| r.next().to_le_bytes())
        .collect()
}

/// One operation of the history, with its real-time interval.
#[derive(Debug, Clone)]
enum Op {
    /// A chunk write + fsync to the host's own data file: `ok` None when
    /// its outcome is unknown (it failed).
    Write {
        host: u64,
        idx: u64,
        n: u64,
        ok: bool,
    },
    /// Register write: `key` := `value` (temp file, fsync, rename).
    Put { key: u64, value: String, ok: bool },
    /// Register read (None: no such key yet).
    Get {
        key: u64,
        value: Option<String>,
        ok: bool,
    },
    /// A record appended (O_APPEND + fsync) to the host's log.
    Append { host: u64, seq: u64, ok: bool },
}

#[derive(Debug, Clone)]
struct Event {
    op: Op,
    start: Instant,
    end: Instant,
}

struct History(Mutex<Vec<Event>>);

impl History {
    fn push(&self, op: Op, start: Instant) {
        if let Ok(mut h) = self.0.lock() {
            h.push(Event {
                op,
                start,
                end: Instant::now(),
            });
        }
    }
}

/// A client on host `host`'s mount `m`: random writes, register puts and
/// gets, and appends, until `stop`.
fn client(host: u64, m: &Path, seed: u64, stop: &AtomicBool, h: &History) {
    let mut r = Rng::new(seed ^ host);
    let data = m.join(format!("data-{host}"));
    let log = m.join(format!("log-{host}"));
    let (mut n, mut seq) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        match r.below(10) {
            0..=3 => {
                n += 1;
                let idx = r.below(CHUNKS);
                let ok = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&data)
                    .and_then(|f| {
                        f.write_all_at(&chunk(host, n), idx * CHUNK as u64)?;
                        f.sync_data()
                    })
                    .is_ok();
                h.push(Op::Write { host, idx, n, ok }, start);
            }
            4..=5 => {
                n += 1;
                let key = r.below(KEYS);
                let value = format!("{host}:{n}");
                let tmp = m.join(format!("tmp-{host}-{n}"));
                let ok = File::create(&tmp)
                    .and_then(|mut f| {
                        f.write_all(value.as_bytes())?;
                        f.sync_all()
                    })
                    .and_then(|()| fs::rename(&tmp, m.join(format!("key-{key}"))))
                    .is_ok();
                let _ = fs::remove_file(&tmp);
                h.push(Op::Put { key, value, ok }, start);
            }
            6..=7 => {
                let key = r.below(KEYS);
                let (value, ok) = match fs::read_to_string(m.join(format!("key-{key}"))) {
                    Ok(v) => (Some(v), true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, true),
                    Err(_) => (None, false),
                };
                h.push(Op::Get { key, value, ok }, start);
            }
            _ => {
                seq += 1;
                let ok = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .and_then(|mut f| {
                        f.write_all(format!("{host}:{seq}\n").as_bytes())?;
                        f.sync_data()
                    })
                    .is_ok();
                h.push(Op::Append { host, seq, ok }, start);
            }
        }
        if !matches!(h.0.lock().ok().and_then(|v| v.last().cloned()), Some(e) if op_ok(&e.op)) {
            // The mount may be gone for a moment (its host crashed).
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn op_ok(op: &Op) -> bool {
    match op {
        Op::Write { ok, .. } | Op::Put { ok, .. } | Op::Get { ok, .. } | Op::Append { ok, .. } => {
            *ok
        }
    }
}

/// Checks the history against what the volume holds now (read on host
/// `reader`'s mount). Returns the violations.
fn check(history: &[Event], m: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    // 1. Every acknowledged chunk write is readable: a chunk holds its last
    //    acknowledged write, or a later write whose outcome is unknown.
    let mut chunks: BTreeMap<(u64, u64), Vec<(u64, bool)>> = BTreeMap::new();
    for e in history {
        if let Op::Write { host, idx, n, ok } = e.op {
            chunks.entry((host, idx)).or_default().push((n, ok));
        }
    }
    for ((host, idx), writes) in &chunks {
        let last_ok = writes.iter().rposition(|w| w.1);
        let Some(i) = last_ok else { continue };
        // writes[i] is the last acknowledged one; all after it failed.
        let allowed: Vec<u64> = writes[i..].iter().map(|w| w.0).collect();
        let f = match File::open(m.join(format!("data-{host}"))) {
            Ok(f) => f,
            Err(e) => {
                bad.push(format!("data-{host}: {e}"));
                continue;
            }
        };
        let mut buf = vec![0u8; CHUNK];
        let read = f.read_exact_at(&mut buf, idx * CHUNK as u64);
        if read.is_err() || !allowed.iter().any(|n| chunk(*host, *n) == buf) {
            bad.push(format!(
                "data-{host} chunk {idx}: not its acknowledged write {} (nor a later unknown one)",
                writes[i].0
            ));
        }
    }
    // 2. No append applied twice, none acknowledged missing.
    let mut by_host: BTreeMap<u64, (BTreeSet<u64>, BTreeSet<u64>)> = BTreeMap::new();
    for e in history {
        if let Op::Append { host, seq, ok } = e.op {
            let s = by_host.entry(host).or_default();
            s.0.insert(seq);
            if ok {
                s.1.insert(seq);
            }
        }
    }
    for (host, (tried, acked)) in &by_host {
        let text = fs::read(m.join(format!("log-{host}"))).unwrap_or_default();
        // Whole records `H:SEQ\n` wherever they are: a failed append (a
        // crash, ENOSPC) may have left a torn record, and the next one
        // then follows it on the same line.
        let mut seen = BTreeMap::new();
        let h = host.to_string().into_bytes();
        let mut i = 0;
        while i + h.len() < text.len() {
            if text[i..].starts_with(&h) && text[i + h.len()] == b':' {
                let digits = &text[i + h.len() + 1..];
                let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
                if n > 0 && digits.get(n) == Some(&b'\n') {
                    if let Ok(seq) = std::str::from_utf8(&digits[..n])
                        .unwrap_or("")
                        .parse::<u64>()
                    {
                        *seen.entry(seq).or_insert(0u32) += 1;
                    }
                }
            }
            i += 1;
        }
        for (s, c) in &seen {
            if *c > 1 {
                bad.push(format!("log-{host}: record {s} applied {c} times"));
            }
            if !tried.contains(s) {
                bad.push(format!("log-{host}: record {s} was never written"));
            }
        }
        for s in acked {
            if !seen.contains_key(s) {
                bad.push(format!("log-{host}: acknowledged record {s} is missing"));
            }
        }
    }
    // 3. Single-key registers are linearizable: every value is written
    //    once, so a read of v is wrong if (a) no put of v had started
    //    before the read ended, or (b) another acknowledged put of the key
    //    started after v's put ended and ended before the read started
    //    (v was overwritten for sure), or (c) a read that ended before
    //    another began saw a newer value than the later one.
    let puts: BTreeMap<(u64, String), &Event> = history
        .iter()
        .filter_map(|e| match &e.op {
            Op::Put { key, value, .. } => Some(((*key, value.clone()), e)),
            _ => None,
        })
        .collect();
    let reads: Vec<(&Event, u64, &Option<String>)> = history
        .iter()
        .filter_map(|e| match &e.op {
            Op::Get {
                key,
                value,
                ok: true,
            } => Some((e, *key, value)),
            _ => None,
        })
        .collect();
    for (r, key, value) in &reads {
        let Some(v) = value else {
            // "no such key": wrong once an acknowledged put ended before.
            if let Some(p) = puts.iter().find(|((k, _), p)| {
                k == key && matches!(p.op, Op::Put { ok: true, .. }) && p.end < r.start
            }) {
                bad.push(format!(
                    "key-{key}: read nothing after put {} had been acknowledged",
                    p.0 .1
                ));
            }
            continue;
        };
        let Some(w) = puts.get(&(*key, v.clone())) else {
            bad.push(format!("key-{key}: read {v:?}, which nobody wrote"));
            continue;
        };
        if w.start > r.end {
            bad.push(format!("key-{key}: read {v:?} before it was written"));
        }
        // A failed put may still take effect later: it ends at infinity.
        let w_acked = matches!(w.op, Op::Put { ok: true, .. });
        if let Some(((_, newer), _)) = puts.iter().find(|((k, _), p)| {
            w_acked
                && k == key
                && matches!(p.op, Op::Put { ok: true, .. })
                && p.start > w.end
                && p.end < r.start
        }) {
            bad.push(format!(
                "key-{key}: read {v:?} after {newer:?} had overwritten it"
            ));
        }
    }
    for (r1, k1, v1) in &reads {
        for (r2, k2, v2) in &reads {
            if k1 != k2 || r1.end >= r2.start {
                continue;
            }
            let (Some(v1), Some(v2)) = (v1, v2) else {
                continue;
            };
            let (Some(w1), Some(w2)) = (puts.get(&(*k1, v1.clone())), puts.get(&(*k2, v2.clone())))
            else {
                continue;
            };
            if matches!(w2.op, Op::Put { ok: true, .. }) && w2.end < w1.start {
                bad.push(format!(
                    "key-{k1}: read {v1:?}, then later {v2:?}, which was overwritten by it"
                ));
            }
        }
    }
    bad
}

/// The nemesis's faults: through the hosts' drill interface.
fn fault(cl: &CsvCluster, host: u64, req: coordinator::proto::FaultReq) -> String {
    use coordinator::proto::Label as _;
    let kind = req.kind().label();
    let addrs = cl
        .hosts
        .iter()
        .find(|h| h.id == host)
        .map(|h| h.listen.clone())
        .unwrap_or_default();
    for a in addrs {
        if coordinator::client::fault(&cl.identity(), a, req.clone(), Duration::from_secs(2))
            .is_ok()
        {
            return format!("{kind} on host {host}");
        }
    }
    format!("{kind} on host {host} (not taken: host unreachable)")
}

/// Fills the volume from `m` until ENOSPC, holds it full for `hold`, and
/// frees the space again.
fn disk_full(m: &Path, hold: Duration) -> String {
    let t = Instant::now();
    let p = m.join("nemesis-filler");
    let Ok(f) = File::create(&p) else {
        return "disk-full: the filler could not be made".into();
    };
    let block = vec![0x5au8; 4 << 20];
    let mut at = 0u64;
    let full = loop {
        match f.write_all_at(&block, at).and_then(|()| f.sync_data()) {
            Ok(()) => at += block.len() as u64,
            Err(e) => break e.raw_os_error() == Some(libc::ENOSPC),
        }
        if t.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    std::thread::sleep(hold);
    drop(f);
    let freed = fs::remove_file(&p).is_ok();
    format!(
        "disk-full from {} ({} MiB, {}, {})",
        m.display(),
        at >> 20,
        if full { "ENOSPC" } else { "not full" },
        if freed { "freed" } else { "not freed" }
    )
}

fn nemesis_step(
    cl: &CsvCluster,
    tgt: &mut csv_test_support::tgt::TgtTarget,
    r: &mut Rng,
) -> String {
    use coordinator::proto::{FaultKind, FaultReq};
    let host = 1 + r.below(3);
    let ms = 1000 + r.below(2000);
    let all_addrs: Vec<String> = cl
        .hosts
        .iter()
        .flat_map(|h| h.listen.iter().map(|a| a.to_string()))
        .collect();
    let first_addrs: Vec<String> = cl
        .hosts
        .iter()
        .filter_map(|h| h.listen.first().map(|a| a.to_string()))
        .collect();
    let req = |kind: FaultKind| FaultReq {
        kind: kind as i32,
        volume: 1,
        duration_ms: ms,
        ..Default::default()
    };
    match r.below(8) {
        0 => fault(cl, host, req(FaultKind::SanCut)),
        7 => disk_full(&cl.mountpoint(host, 1), Duration::from_millis(ms)),
        1 => fault(
            cl,
            host,
            FaultReq {
                delay_ms: 50 + r.below(150),
                ..req(FaultKind::SanSlow)
            },
        ),
        2 => fault(
            cl,
            host,
            FaultReq {
                addrs: first_addrs,
                ..req(FaultKind::NetCut)
            },
        ),
        3 => fault(
            cl,
            host,
            FaultReq {
                addrs: all_addrs,
                ..req(FaultKind::NetCut)
            },
        ),
        4 => fault(cl, host, req(FaultKind::Crash)),
        5 => fault(
            cl,
            host,
            FaultReq {
                offset_ms: if r.below(2) == 0 {
                    3_600_000
                } else {
                    -3_600_000
                },
                ..req(FaultKind::Clock)
            },
        ),
        _ => {
            let t = Instant::now();
            match tgt.restart(Duration::from_millis(ms / 2)) {
                Ok(()) => format!(
                    "tgtd restart (back after {:.1} s)",
                    t.elapsed().as_secs_f64()
                ),
                Err(e) => format!("tgtd restart failed: {e:#}"),
            }
        }
    }
}

/// Keeps what a failed run leaves for a post-mortem, under
/// `$TMPDIR/csv-nemesis-<seed>`: each host's log, the clients' files as
/// host 1 reads them, the LUN image, the history and the faults.
fn keep_evidence(
    seed: u64,
    cl: &CsvCluster,
    tgt: &csv_test_support::tgt::TgtTarget,
    history: &[Event],
    faults: &[String],
) {
    let dir = std::env::temp_dir().join(format!("csv-nemesis-{seed}"));
    for h in 1..=3 {
        let _ = fs::copy(
            cl.dir().join(format!("host{h}.log")),
            dir.join(format!("host{h}.log")),
        );
        // The files as each host reads them (a difference points at a
        // host's view, not at the volume).
        let files = dir.join(format!("files-read-on-{h}"));
        let _ = fs::create_dir_all(&files);
        if let Ok(rd) = fs::read_dir(cl.mountpoint(h, 1)) {
            for e in rd.flatten() {
                let _ = fs::copy(e.path(), files.join(e.file_name()));
            }
        }
    }
    let _ = fs::copy(tgt.dir().join("lun1.img"), dir.join("lun1.img"));
    // The coordinator's attributes and extent map of each log.
    let mut maps = String::new();
    let mut c = cl.client();
    for h in 1..=3 {
        let name = format!("log-{h}");
        match c.lookup(1, coordinator::meta::ROOT, &name) {
            Ok(a) => {
                maps += &format!("{name}: ino {} size {}\n", a.ino, a.size);
                for e in c.extents(1, a.ino).unwrap_or_default() {
                    maps += &format!("  {e:?}\n");
                }
            }
            Err(e) => maps += &format!("{name}: {e}\n"),
        }
    }
    let _ = fs::write(dir.join("extents.txt"), maps);
    let t0 = history.iter().map(|e| e.start).min();
    let text: String = history
        .iter()
        .map(|e| {
            let at = |t: Instant| t0.map_or(0.0, |t0| t.duration_since(t0).as_secs_f64());
            format!("{:9.3} {:9.3} {:?}\n", at(e.start), at(e.end), e.op)
        })
        .collect();
    let _ = fs::write(dir.join("history.txt"), text);
    let _ = fs::write(dir.join("faults.txt"), faults.join("\n"));
    println!("nemesis: evidence kept in {}", dir.display());
}

fn wait_healthy(cl: &CsvCluster) {
    csv_test_support::wait_until(Duration::from_secs(60), || {
        (1..=3).all(|h| cl.volume_state(h, 1).is_some_and(|(s, _)| s == "Direct"))
    })
    .unwrap_or_else(|e| panic!("the cluster did not come back after the faults: {e:?}"));
}

#[test]
fn a_nemesis_of_random_faults_leaves_a_clean_history() {
    skip_without_fuse_and_tgtd!();
    let seed = seed();
    let secs = env_u64("CSV_NEMESIS_SECS", 40);
    println!(
        "nemesis: seed {seed}, {secs} s (replay: CSV_NEMESIS_SEED={seed} CSV_NEMESIS_SECS={secs})"
    );
    let (mut tgt, cl) = super::drills::drill_cluster();
    let stop = AtomicBool::new(false);
    let history = History(Mutex::new(Vec::new()));
    let mut faults = Vec::new();
    std::thread::scope(|s| {
        for host in 1..=3u64 {
            let m = cl.mountpoint(host, 1);
            let (stop, history) = (&stop, &history);
            s.spawn(move || client(host, &m, seed, stop, history));
        }
        let _stopper = StopOnDrop(&stop);
        let mut r = Rng::new(seed);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(1500 + r.below(2500)));
            let f = nemesis_step(&cl, &mut tgt, &mut r);
            let f = format!("{:>6.1} s: {f}", t.elapsed().as_secs_f64());
            println!("nemesis {f}");
            faults.push(f);
        }
        // Heal, let the cluster settle, then stop the clients.
        for h in 1..=3 {
            fault(
                &cl,
                h,
                coordinator::proto::FaultReq {
                    kind: coordinator::proto::FaultKind::Heal as i32,
                    ..Default::default()
                },
            );
        }
        wait_healthy(&cl);
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
    });
    wait_healthy(&cl);
    let history = history.0.into_inner().unwrap();
    let count = |f: fn(&Op) -> bool| history.iter().filter(|e| f(&e.op)).count();
    println!(
        "nemesis: {} operations ({} acknowledged; {} writes, {} puts, {} gets, {} appends) under {} faults",
        history.len(),
        count(op_ok),
        count(|o| matches!(o, Op::Write { .. })),
        count(|o| matches!(o, Op::Put { .. })),
        count(|o| matches!(o, Op::Get { .. })),
        count(|o| matches!(o, Op::Append { .. })),
        faults.len()
    );
    assert!(count(op_ok) > 100, "the clients hardly got anything done");
    // The history read back on every host.
    for reader in 1..=3 {
        let bad = check(&history, &cl.mountpoint(reader, 1));
        if !bad.is_empty() {
            keep_evidence(seed, &cl, &tgt, &history, &faults);
        }
        assert!(
            bad.is_empty(),
            "seed {seed}: the history read on host {reader} breaks {} rules:\n{}",
            bad.len(),
            bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }
    let problems = cl.client().check_volume(1).unwrap();
    assert!(problems.is_empty(), "seed {seed}: fsck: {problems:?}");
    println!("nemesis: history clean on every host, fsck clean");
}

/// Sets the flag that stops a test's client threads when dropped, so that
/// a failure in the thread driving them (a panic) does not leave the
/// scope waiting for them until nextest's timeout.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A host's csvd crashes and starts again while an application keeps
/// creating files under its `VolumeN`: no creation may succeed anywhere
/// but on the volume (between the crash and the new mount the path must
/// refuse writes, not take them into the bare directory on the host's own
/// disk, where the new mount would hide them).
#[test]
fn a_crashed_hosts_mount_point_takes_no_writes_until_the_volume_is_back() {
    skip_without_fuse!();
    let (cl, v) = CsvCluster::mounted_loopback(3, 128 << 20).unwrap();
    let m2 = cl.mountpoint(2, v);
    let stop = AtomicBool::new(false);
    let made = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut made = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let name = format!("probe-{i}");
                // As fast as it goes: the gap to catch may be a
                // millisecond long.
                if fs::write(m2.join(&name), name.as_bytes()).is_ok() {
                    made.push(name);
                }
            }
            made
        });
        let stopper = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(300));
        let said = fault(
            &cl,
            2,
            coordinator::proto::FaultReq {
                kind: coordinator::proto::FaultKind::Crash as i32,
                volume: v,
                duration_ms: 1500,
                ..Default::default()
            },
        );
        assert!(!said.contains("not taken"), "{said}");
        // Down, then up and mounted again: a file written there now is
        // on the volume. (Not a probe the writer made: under load its
        // first ones may have fallen into the crash and failed.)
        std::thread::sleep(Duration::from_secs(2));
        if let Err(e) = csv_test_support::wait_until(Duration::from_secs(60), || {
            cl.volume_state(2, v).is_some_and(|(s, _)| s == "Direct")
                && fs::write(m2.join("back"), b"back").is_ok()
                && fs::read(cl.mountpoint(1, v).join("back")).is_ok_and(|b| b == b"back")
        }) {
            panic!(
                "host 2 did not mount the volume again ({e:?}; state {:?}); its log ends:\n{}",
                cl.volume_state(2, v),
                cl.log_tail(2, 80)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        drop(stopper);
        writer.join().unwrap()
    });
    let m1 = cl.mountpoint(1, v);
    let missing: Vec<&String> = made
        .iter()
        .filter(|n| fs::read(m1.join(n)).ok().as_deref() != Some(n.as_bytes()))
        .collect();
    assert!(made.len() > 20, "the writer hardly wrote ({})", made.len());
    assert!(
        missing.is_empty(),
        "{} of {} files host 2 made are not on the volume (written beside it while csvd was down?): {:?}",
        missing.len(),
        made.len(),
        &missing[..missing.len().min(10)]
    );
}

/// While the SAN is down (tgtd killed) and a process has a file with
/// unreported writes open on the volume, that process can still start
/// others: the close of the file's descriptor in a child that execs is a
/// FUSE flush, which must not wait for the LUN (it did, 60 s per open
/// file, until the storage came back or the wait gave up).
#[test]
fn a_process_with_a_file_open_starts_others_at_once_while_the_san_is_down() {
    skip_without_fuse_and_tgtd!();
    let (mut tgt, cl) = super::drills::drill_cluster();
    let m = cl.mountpoint(1, 1);
    let mut f = File::create(m.join("held")).unwrap();
    f.write_all(b"written before the outage").unwrap();
    tgt.kill();
    std::thread::scope(|s| {
        // An fsync that waits for the storage, as applications do.
        let syncer = s.spawn(|| f.sync_data());
        // The host has noticed there is no path left.
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        let st = std::process::Command::new("true").status().unwrap();
        let took = t.elapsed();
        tgt.restart(Duration::ZERO).unwrap();
        assert!(st.success());
        assert!(
            took < Duration::from_secs(5),
            "starting a process took {took:?} while the SAN was down"
        );
        syncer
            .join()
            .unwrap()
            .expect("the fsync did not finish once the SAN was back");
    });
    assert_eq!(
        fs::read(cl.mountpoint(2, 1).join("held")).unwrap(),
        b"written before the outage"
    );
}

/// Every host killed at once (SIGKILL) at a random point of a metadata and
/// data load, the cluster started again, and the volume checked: every
/// fsync'd write and every acknowledged namespace change is there.
#[test]
fn killing_every_host_at_once_loses_nothing_acknowledged() {
    skip_without_fuse!();
    let seed = seed();
    let rounds = env_u64("CSV_CRASH_ROUNDS", 4);
    println!("crash: seed {seed}, {rounds} rounds (replay: CSV_NEMESIS_SEED={seed} CSV_CRASH_ROUNDS={rounds})");
    let (mut cl, v) = CsvCluster::mounted_loopback(3, 256 << 20).unwrap();
    let mut r = Rng::new(seed);
    // What each round acknowledged, checked after every later crash too.
    let acked_files: Mutex<BTreeMap<PathBuf, u64>> = Mutex::new(BTreeMap::new());
    let acked_dirs: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let removed: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    for round in 0..rounds {
        let stop = AtomicBool::new(false);
        let history = History(Mutex::new(Vec::new()));
        let run_for = Duration::from_millis(1000 + r.below(3000));
        std::thread::scope(|s| {
            for host in 1..=3u64 {
                let m = cl.mountpoint(host, v);
                let (stop, history) = (&stop, &history);
                let (acked_files, acked_dirs, removed) = (&acked_files, &acked_dirs, &removed);
                let sub = seed ^ round << 8;
                s.spawn(move || {
                    let mut r = Rng::new(sub ^ host);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        match r.below(4) {
                            // Metadata: a directory made, a file made and
                            // renamed, one removed.
                            0 => {
                                let d = format!("d-{round}-{host}-{n}");
                                if fs::create_dir(m.join(&d)).is_ok() {
                                    acked_dirs.lock().unwrap().insert(d);
                                }
                            }
                            1 => {
                                let a = m.join(format!("t-{round}-{host}-{n}"));
                                let b = format!("f-{round}-{host}-{n}");
                                let ok = File::create(&a)
                                    .and_then(|mut f| {
                                        f.write_all(&chunk(host, n)[..512])?;
                                        f.sync_all()
                                    })
                                    .and_then(|()| fs::rename(&a, m.join(&b)))
                                    .is_ok();
                                if ok {
                                    acked_files
                                        .lock()
                                        .unwrap()
                                        .insert(m.join(&b), n << 8 | host);
                                }
                            }
                            2 => {
                                let victim = acked_files
                                    .lock()
                                    .unwrap()
                                    .keys()
                                    .find(|p| p.starts_with(&m))
                                    .cloned();
                                if let Some(p) = victim {
                                    let name =
                                        p.file_name().unwrap().to_string_lossy().into_owned();
                                    // A failed remove (the crash came
                                    // first) may or may not have happened:
                                    // the file is no longer checked.
                                    let ok = fs::remove_file(&p).is_ok();
                                    acked_files.lock().unwrap().remove(&p);
                                    if ok {
                                        removed.lock().unwrap().insert(name);
                                    }
                                }
                            }
                            // Data: a chunk written and fsync'd.
                            _ => {
                                let idx = r.below(CHUNKS);
                                let start = Instant::now();
                                let ok = OpenOptions::new()
                                    .create(true)
                                    .truncate(false)
                                    .write(true)
                                    .open(m.join(format!("data-{host}")))
                                    .and_then(|f| {
                                        f.write_all_at(&chunk(host, n), idx * CHUNK as u64)?;
                                        f.sync_data()
                                    })
                                    .is_ok();
                                history.push(Op::Write { host, idx, n, ok }, start);
                            }
                        }
                        if n % 16 == 0 && stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                });
            }
            std::thread::sleep(run_for);
            // Every host at once.
            let pids: Vec<i32> = (1..=3)
                .filter_map(|h| cl.pid(h))
                .map(|p| p as i32)
                .collect();
            for p in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            stop.store(true, Ordering::Relaxed);
        });
        for h in 1..=3 {
            cl.kill(h).unwrap();
        }
        for h in 1..=3 {
            cl.start(h).unwrap();
        }
        cl.wait_mounted(v, Duration::from_secs(60)).unwrap();
        let history = history.0.into_inner().unwrap();
        // Data: this round's acknowledged chunks (a chunk written again in
        // a later round is checked in that round).
        let bad = check(&history, &cl.mountpoint(2, v));
        assert!(
            bad.is_empty(),
            "seed {seed} round {round} (killed after {run_for:?}): {}",
            bad.join("\n")
        );
        // Namespace: every acknowledged directory and file is there, with
        // its content; removed ones are gone.
        let m = cl.mountpoint(3, v);
        for d in acked_dirs.lock().unwrap().iter() {
            assert!(
                m.join(d).is_dir(),
                "seed {seed} round {round}: directory {d} is gone"
            );
        }
        for (p, tag) in acked_files.lock().unwrap().iter() {
            let name = p.file_name().unwrap();
            let got = fs::read(m.join(name));
            let (n, host) = (tag >> 8, tag & 0xff);
            assert!(
                got.as_ref().is_ok_and(|g| *g == chunk(host, n)[..512]),
                "seed {seed} round {round}: file {name:?}: {}",
                match &got {
                    Err(e) => format!("lost ({e})"),
                    Ok(g) => format!("changed ({} bytes)", g.len()),
                }
            );
        }
        for name in removed.lock().unwrap().iter() {
            assert!(
                !m.join(name).exists(),
                "seed {seed} round {round}: {name} came back"
            );
        }
        let problems = cl.client().check_volume(v).unwrap();
        assert!(
            problems.is_empty(),
            "seed {seed} round {round}: fsck: {problems:?}"
        );
        println!(
            "crash round {round}: killed every host after {run_for:?}; {} chunk writes, all acknowledged ones there; fsck clean",
            history.len()
        );
    }
}

/// While a host is cut off from the cluster network and a process there
/// has a file with unreported writes open on the volume, that process can
/// still start others: the child's close of its copy of the descriptor
/// (a FUSE flush) must not wait for the coordinator it cannot reach.
#[test]
fn a_process_with_a_file_open_starts_others_at_once_while_the_cluster_network_is_cut() {
    skip_without_fuse!();
    let (cl, v) = CsvCluster::mounted_loopback(3, 64 << 20).unwrap();
    // The volume's group may still be electing when its mounts are up.
    let leader = cl.wait_leader(v, Duration::from_secs(10)).unwrap();
    let host = (1..=3).find(|h| *h != leader).unwrap_or(1);
    let m = cl.mountpoint(host, v);
    let mut f = File::create(m.join("held")).unwrap();
    f.write_all(b"written before the cut").unwrap();
    let addrs: Vec<String> = cl
        .hosts
        .iter()
        .flat_map(|h| h.listen.iter().map(|a| a.to_string()))
        .collect();
    let said = fault(
        &cl,
        host,
        coordinator::proto::FaultReq {
            kind: coordinator::proto::FaultKind::NetCut as i32,
            volume: v,
            duration_ms: 8_000,
            addrs,
            ..Default::default()
        },
    );
    assert!(!said.contains("not taken"), "{said}");
    // More written after the cut: unreported when the child starts.
    f.write_all(b" and after it").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let st = std::process::Command::new("true").status().unwrap();
    let took = t.elapsed();
    assert!(st.success());
    assert!(
        took < Duration::from_secs(5),
        "starting a process took {took:?} while host {host} was cut off from the cluster"
    );
    println!("a process started in {took:?} while host {host} was cut off");
    // The writes the flush could not report reach the others once the
    // network is back (the last close reports them).
    drop(f);
    let other = if host == 1 { 2 } else { 1 };
    let want = b"written before the cut and after it";
    csv_test_support::wait_until(Duration::from_secs(60), || {
        fs::read(cl.mountpoint(other, v).join("held")).is_ok_and(|b| b == want)
    })
    .unwrap_or_else(|e| {
        panic!("host {other} never read what host {host} wrote during the cut: {e:?}")
    });
}
