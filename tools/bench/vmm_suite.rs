//! `vmm` suite: csv-vmm against `qemu-system-x86_64 -enable-kvm` on the
//! same guest (the csv test guest, which QEMU boots as a multiboot kernel):
//! time from process start to the guest's first heartbeat, and live
//! migration on loopback (downtime and total time) for 256 MiB and 1 GiB
//! guests, idle and dirtying.
//!
//! Downtime is measured from outside: every heartbeat of every VMM reaches
//! one observer (ours as a UDP datagram the VMM sends on the guest's port
//! write; QEMU's as a text line the guest writes to COM1, which QEMU sends
//! down a Unix-socket chardev), and the downtime of a migration is the
//! largest gap between two heartbeats around it (heartbeats every 2 ms in
//! the migration rows). Both sides migrate with a 100 ms downtime limit and
//! no bandwidth cap; each guest's dirtying rate is measured from its own
//! counter in guest memory (QEMU's through the monitor's `xp`) before the
//! migration, and a run where it falls short is refused.

use crate::table::{self, Row};
use anyhow::{bail, Context, Result};
use hypervisor_shim::control::proto::{MigrateRequest, Reply, Request, Status};
use hypervisor_shim::control::Control;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Beat {
    seq: u64,
    source: u32,
    at: Instant,
}

/// One clock for every heartbeat, from both kinds of VMM.
struct Observer {
    udp: std::net::SocketAddr,
    unix: PathBuf,
    beats: Arc<Mutex<Vec<Beat>>>,
    stop: Arc<AtomicBool>,
}

impl Observer {
    fn start(dir: &Path) -> Result<Observer> {
        let beats = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let udp = sock.local_addr()?;
        {
            let (b, s) = (beats.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((12, _)) = sock.recv_from(&mut buf) {
                        let at = Instant::now();
                        let mut q = [0u8; 8];
                        q.copy_from_slice(&buf[..8]);
                        let mut p = [0u8; 4];
                        p.copy_from_slice(&buf[8..12]);
                        let beat = Beat {
                            seq: u64::from_le_bytes(q),
                            source: u32::from_le_bytes(p),
                            at,
                        };
                        b.lock().unwrap_or_else(|p| p.into_inner()).push(beat);
                    }
                }
            });
        }
        let unix = dir.join("serial-observer.sock");
        let listener = UnixListener::bind(&unix)?;
        {
            let b = beats.clone();
            let next = Arc::new(AtomicU32::new(1_000_000));
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let b = b.clone();
                    let source = next.fetch_add(1, Ordering::Relaxed);
                    std::thread::spawn(move || {
                        let mut r = BufReader::new(conn);
                        let mut line = String::new();
                        while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                            let at = Instant::now();
                            let t = line.trim();
                            if let Some(hex) = t.strip_prefix('H') {
                                // The low 32 bits of the sequence number.
                                if let Ok(seq) = u64::from_str_radix(hex, 16) {
                                    b.lock().unwrap_or_else(|p| p.into_inner()).push(Beat {
                                        seq,
                                        source,
                                        at,
                                    });
                                }
                            }
                            line.clear();
                        }
                    });
                }
            });
        }
        Ok(Observer {
            udp,
            unix,
            beats,
            stop,
        })
    }

    fn beats(&self) -> Vec<Beat> {
        self.beats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn clear(&self) {
        self.beats.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn wait_beats(&self, pred: impl Fn(&Beat) -> bool, n: usize, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while self.beats().iter().filter(|b| pred(b)).count() < n {
            if t.elapsed() > timeout {
                bail!("fewer than {n} heartbeats in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The largest gap between consecutive heartbeats (by arrival) that
    /// arrived from `from` on, and whether sequence numbers are missing.
    fn gap_since(&self, from: Instant) -> (Duration, usize) {
        let mut b: Vec<Beat> = self.beats().into_iter().filter(|b| b.at >= from).collect();
        b.sort_by_key(|x| x.at);
        let gap = b
            .windows(2)
            .map(|w| w[1].at - w[0].at)
            .max()
            .unwrap_or_default();
        let mut seqs: Vec<u64> = b.iter().map(|x| x.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let missing = seqs.windows(2).map(|w| (w[1] - w[0] - 1) as usize).sum();
        (gap, missing)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn csv_vmm() -> PathBuf {
    csv_test_support::cmd::workspace_bin("csv-vmm")
}

fn ours_spawn(dir: &Path, name: &str, args: &[&str], obs: &Observer) -> Result<(Proc, PathBuf)> {
    let control = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&control);
    let child = Command::new(csv_vmm())
        .args(args)
        .arg("--control")
        .arg(&control)
        .args(["--serial", "null", "--heartbeat-udp", &obs.udp.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start csv-vmm")?;
    let p = Proc(child);
    let t = Instant::now();
    while !control.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("csv-vmm did not create its control socket");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((p, control))
}

fn qemu_spawn(
    dir: &Path,
    name: &str,
    mem_mib: u64,
    append: &str,
    incoming: Option<u16>,
    obs: &Observer,
) -> Result<(Proc, PathBuf)> {
    let image = dir.join("guest.bin");
    if !image.exists() {
        std::fs::write(&image, hypervisor_shim::guest::IMAGE)?;
    }
    let qmp = dir.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&qmp);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-enable-kvm",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-m",
    ])
    .arg(mem_mib.to_string())
    .arg("-kernel")
    .arg(&image)
    .args(["-append", append])
    .arg("-chardev")
    .arg(format!("socket,id=hb,path={}", obs.unix.display()))
    .args(["-serial", "chardev:hb", "-qmp"])
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(port) = incoming {
        cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-system-x86_64")?;
    let p = Proc(child);
    let t = Instant::now();
    while !qmp.exists() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("qemu did not create its QMP socket");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((p, qmp))
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(path)?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.cmd(json!({"execute": "qmp_capabilities"}))?;
        Ok(q)
    }

    fn cmd(&mut self, c: Value) -> Result<Value> {
        writeln!(self.w, "{c}")?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("QMP closed");
            }
            let v: Value = serde_json::from_str(&line)?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {c}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

/// Sends `req` to the csv-vmm whose control socket is at `control` and
/// waits for its answer (a refusal is an error).
fn ctl(control: &Path, req: &Request) -> Result<Reply> {
    Control::connect(control, None)
        .and_then(|mut c| c.ask(req, |_| {}))
        .with_context(|| format!("control request {req:?}"))
}

/// The status of the csv-vmm at `control`.
fn status(control: &Path) -> Result<Status> {
    match ctl(control, &Request::Status)? {
        Reply::Status(s) => Ok(*s),
        other => bail!("status: csv-vmm answered {other:?}"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn tsc_khz(dir: &Path, obs: &Observer) -> Result<u64> {
    let (_p, control) = ours_spawn(dir, "probe", &["run", "--memory", "8M"], obs)?;
    let t = Instant::now();
    loop {
        // The control socket answers before the VM exists (with a TSC
        // frequency of 0).
        let s = status(&control)?;
        if s.tsc_khz > 0 {
            return Ok(u64::from(s.tsc_khz));
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("csv-vmm reports no TSC frequency: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Heartbeat interval of the guest in the migration rows, both sides.
/// Under QEMU every heartbeat is a text line on COM1, one exit per byte;
/// fewer of them leave more of the guest's time for dirtying.
const TICK_US: u64 = 2000;

/// A run counts when the guest dirtied at least this share of the rate
/// asked for. Under QEMU the guest reaches 85-90 % of 64 MiB/s on this
/// machine (its exits to QEMU cost more than ours); the measured rates are
/// printed with the results.
const MIN_RATE: f64 = 0.8;

struct Migration {
    downtime_ms: f64,
    total_ms: f64,
    missing: usize,
    /// The guest's dirtying rate measured before the migration, MiB/s.
    dirty_mib_s: f64,
}

/// The test guest's pages-written counter, read from its mailbox.
const PAGES_WRITTEN: u64 = hypervisor_shim::guest::MAILBOX + hypervisor_shim::guest::MB_WRITTEN;

/// Pages the guest wrote per second over `over`, in MiB/s, from a reader
/// of its pages-written counter.
fn dirty_rate(mut read: impl FnMut() -> Result<u64>, over: Duration) -> Result<f64> {
    let (a, t) = (read()?, Instant::now());
    std::thread::sleep(over);
    let b = read()?;
    Ok(b.saturating_sub(a) as f64 / 256.0 / t.elapsed().as_secs_f64())
}

impl Qmp {
    /// A u64 of guest-physical memory (through the human monitor's `xp`).
    fn read_u64(&mut self, gpa: u64) -> Result<u64> {
        let out = self.cmd(json!({"execute": "human-monitor-command",
            "arguments": {"command-line": format!("xp /1gx {gpa:#x}")}}))?;
        let text = out.as_str().unwrap_or_default();
        let hex = text.rsplit("0x").next().unwrap_or_default().trim();
        u64::from_str_radix(hex, 16).with_context(|| format!("xp answered {text:?}"))
    }
}

fn ours_boot(dir: &Path, obs: &Observer) -> Result<f64> {
    obs.clear();
    let t = Instant::now();
    let (p, _) = ours_spawn(dir, "boot", &["run", "--memory", "256M"], obs)?;
    let src = p.0.id();
    obs.wait_beats(|b| b.source == src, 1, Duration::from_secs(10))?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn qemu_boot(dir: &Path, obs: &Observer, append: &str) -> Result<f64> {
    obs.clear();
    let t = Instant::now();
    let _p = qemu_spawn(dir, "boot", 256, append, None, obs)?;
    obs.wait_beats(|b| b.source >= 1_000_000, 1, Duration::from_secs(60))?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn ours_migrate(dir: &Path, obs: &Observer, mem_mib: u64, rate: f64) -> Result<Migration> {
    let mem = format!("{mem_mib}M");
    let rate_s = rate.to_string();
    let (sp, sc) = ours_spawn(
        dir,
        "src",
        &[
            "run",
            "--memory",
            &mem,
            "--dirty-rate",
            &rate_s,
            "--tick-us",
            &TICK_US.to_string(),
        ],
        obs,
    )?;
    let port = csv_test_support::free_port()?;
    let to = format!("127.0.0.1:{port}");
    // Any 64 hex digits: the target and source are ours.
    let token = "b0".repeat(32);
    let tok = dir.join("migration.token");
    std::fs::write(&tok, &token)?;
    let tok = tok.display().to_string();
    let (dp, _dc) = ours_spawn(
        dir,
        "dst",
        &["incoming", "--listen", &to, "--token-file", &tok],
        obs,
    )?;
    let (src, dst) = (sp.0.id(), dp.0.id());
    obs.clear();
    obs.wait_beats(|b| b.source == src, 250, Duration::from_secs(20))?;
    let dirty_mib_s = dirty_rate(
        || Ok(status(&sc)?.guest.pages_written),
        Duration::from_millis(500),
    )?;
    let t = Instant::now();
    let migrate = Request::Migrate(MigrateRequest {
        to,
        token,
        downtime_ms: Some(100),
        timeout_s: None,
        verify_memory: false,
        confirm: false,
    });
    let summary = match ctl(&sc, &migrate)? {
        Reply::Summary(s) => s,
        other => bail!("migrate: csv-vmm answered {other:?}"),
    };
    obs.wait_beats(|b| b.source == dst, 100, Duration::from_secs(20))?;
    let (gap, missing) = obs.gap_since(t);
    Ok(Migration {
        downtime_ms: gap.as_secs_f64() * 1e3,
        total_ms: summary.total_ms,
        missing,
        dirty_mib_s,
    })
}

fn qemu_migrate(dir: &Path, obs: &Observer, mem_mib: u64, append: &str) -> Result<Migration> {
    obs.clear();
    let (_sp, sq) = qemu_spawn(dir, "qsrc", mem_mib, append, None, obs)?;
    let port = csv_test_support::free_port()?;
    let (_dp, _dq) = qemu_spawn(dir, "qdst", mem_mib, append, Some(port), obs)?;
    // The source's serial connection is the first; wait for its heartbeats.
    obs.wait_beats(|b| b.source >= 1_000_000, 250, Duration::from_secs(60))?;
    let mut q = Qmp::connect(&sq)?;
    q.cmd(json!({"execute": "migrate-set-parameters",
        "arguments": {"downtime-limit": 100, "max-bandwidth": 100u64 << 30}}))?;
    let dirty_mib_s = dirty_rate(|| q.read_u64(PAGES_WRITTEN), Duration::from_millis(500))?;
    let before: std::collections::BTreeSet<u32> = obs.beats().iter().map(|b| b.source).collect();
    let t = Instant::now();
    q.cmd(json!({"execute": "migrate", "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}))?;
    let total_ms = loop {
        let s = q.cmd(json!({"execute": "query-migrate"}))?;
        match s["status"].as_str() {
            Some("completed") => break s["total-time"].as_f64().unwrap_or(0.0),
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {s}"),
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("QEMU migration did not finish in 120 s: {s}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The target's heartbeats arrive on a connection of its own; wait until
    // the source's last sequence number is followed by 200 more.
    let last_src = obs
        .beats()
        .iter()
        .filter(|b| before.contains(&b.source))
        .map(|b| b.seq)
        .max()
        .unwrap_or(0);
    obs.wait_beats(|b| b.seq > last_src, 100, Duration::from_secs(20))?;
    let (gap, missing) = obs.gap_since(t);
    Ok(Migration {
        downtime_ms: gap.as_secs_f64() * 1e3,
        total_ms,
        missing,
        dirty_mib_s,
    })
}

/// The `vmm` suite's options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs of each side per row, alternating which goes first (the
    /// median is kept; at least 1).
    #[arg(long, value_name = "N", default_value_t = 3)]
    reps: usize,
}

pub fn run(args: Args) -> Result<()> {
    let reps = args.reps.max(1);
    if !csv_test_support::cmd::have("qemu-system-x86_64") {
        bail!("qemu-system-x86_64 is not installed (tools/setup.sh installs qemu-system-x86)");
    }
    let dir = csv_test_support::temp_dir("bench-vmm")?;
    let obs = Observer::start(dir.path())?;
    let khz = tsc_khz(dir.path(), &obs)?;
    let mut rows = Vec::new();

    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for i in 0..reps {
        let idle = format!("{khz} 0 1000");
        if i % 2 == 0 {
            ours.push(ours_boot(dir.path(), &obs)?);
            peer.push(qemu_boot(dir.path(), &obs, &idle)?);
        } else {
            peer.push(qemu_boot(dir.path(), &obs, &idle)?);
            ours.push(ours_boot(dir.path(), &obs)?);
        }
    }
    eprintln!("boot: ours {ours:?} ms, qemu {peer:?} ms");
    rows.push(Row {
        name: "start to first heartbeat, 256 MiB".into(),
        ours: median(ours),
        peer: Some(median(peer)),
        unit: "ms",
        higher_is_better: false,
    });

    for mem in [256u64, 1024] {
        for rate in [0.0f64, 64.0] {
            let pages =
                hypervisor_shim::guest::TestGuestConfig::for_rate(rate, TICK_US).pages_per_tick;
            let append = format!("{khz} {pages} {TICK_US}");
            let (mut od, mut ot, mut pd, mut pt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut ours_rates, mut qemu_rates) = (Vec::new(), Vec::new());
            for i in 0..reps {
                let mut run_ours = || -> Result<()> {
                    let m = ours_migrate(dir.path(), &obs, mem, rate)?;
                    if m.missing > 0 {
                        bail!("ours lost {} heartbeats", m.missing);
                    }
                    if m.dirty_mib_s < rate * MIN_RATE {
                        bail!("our guest dirtied {:.1} MiB/s, not {rate}", m.dirty_mib_s);
                    }
                    ours_rates.push(m.dirty_mib_s.round());
                    od.push(m.downtime_ms);
                    ot.push(m.total_ms);
                    Ok(())
                };
                let mut run_qemu = || -> Result<()> {
                    let m = qemu_migrate(dir.path(), &obs, mem, &append)?;
                    if m.missing > 0 {
                        eprintln!(
                            "qemu: {} heartbeats missing across the migration",
                            m.missing
                        );
                    }
                    if m.dirty_mib_s < rate * MIN_RATE {
                        bail!(
                            "the guest under QEMU dirtied {:.1} MiB/s, not {rate}",
                            m.dirty_mib_s
                        );
                    }
                    qemu_rates.push(m.dirty_mib_s.round());
                    pd.push(m.downtime_ms);
                    pt.push(m.total_ms);
                    Ok(())
                };
                if i % 2 == 0 {
                    run_ours()?;
                    run_qemu()?;
                } else {
                    run_qemu()?;
                    run_ours()?;
                }
            }
            let load = if rate > 0.0 {
                format!("dirtying {rate} MiB/s")
            } else {
                "idle".into()
            };
            eprintln!("{mem} MiB {load}: ours downtime {od:?} total {ot:?}; qemu downtime {pd:?} total {pt:?}; dirtying measured, MiB/s: ours {ours_rates:?}, qemu {qemu_rates:?}");
            rows.push(Row {
                name: format!("live migration {mem} MiB {load}: downtime"),
                ours: median(od),
                peer: Some(median(pd)),
                unit: "ms",
                higher_is_better: false,
            });
            rows.push(Row {
                name: format!("live migration {mem} MiB {load}: total time"),
                ours: median(ot),
                peer: Some(median(pt)),
                unit: "ms",
                higher_is_better: false,
            });
        }
    }
    table::print(
        "vmm: csv-vmm against qemu-system-x86_64 -enable-kvm",
        "QEMU",
        &rows,
    );
    Ok(())
}
