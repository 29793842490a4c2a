//! `csvctl drill`: failure drills on a live cluster.
//!
//! A drill starts a load of its own on this host's mount of the volume
//! (writers that fsync 64 KiB chunks and keep a checksum log of every
//! acknowledged one), injects one fault through the hosts' csvd (a SAN
//! path cut, a slow SAN, a cluster network cut, a crash, a clock jump; or
//! through the operator's command for a target restart; or by filling the
//! volume), measures what the load and the cluster went through, heals,
//! reads every acknowledged chunk back, asks the coordinator to check the
//! volume, and reports each measure against its objective. Every fault a
//! host takes heals by itself after the drill's duration (a host cut off
//! from every network cannot be told to heal).

use crate::cluster_cmd::Access;
use anyhow::{bail, Context, Result};
use coordinator::client::{self, Client};
use coordinator::proto::{self, FaultReq};
use coordinator::wire::Identity;
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The failures a drill rehearses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The target host (default: this one) loses its SAN path: its I/O
    /// must go through a peer within a second, the load sees no error.
    SanLoss,
    /// The target host (default: this one) loses its first cluster
    /// network: traffic takes the other one.
    NetLossOne,
    /// The target host (default: another one) loses every cluster
    /// network: it is fenced, the others carry on, it rejoins after.
    NetLossAll,
    /// The volume's coordinator host crashes (restarts after 3 s): another
    /// host takes over its metadata.
    CoordinatorKill,
    /// The target host (default: another one) crashes and stays down for
    /// the drill's duration.
    HostKill,
    /// The iSCSI target restarts (--target-cmd does it): every host's
    /// session drops and comes back.
    TargetRestart,
    /// The volume fills up: writers get ENOSPC, nothing written before is
    /// lost, writing resumes once space is freed.
    DiskFull,
    /// The target host's (default: this one) SAN path gets 200 ms slower
    /// per I/O.
    SlowSan,
    /// The coordinator host's clock jumps an hour ahead.
    ClockJump,
    /// Each of the above in turn (target-restart only with --target-cmd).
    All,
}

const ALL: [Scenario; 9] = [
    Scenario::SanLoss,
    Scenario::SlowSan,
    Scenario::NetLossOne,
    Scenario::NetLossAll,
    Scenario::CoordinatorKill,
    Scenario::HostKill,
    Scenario::TargetRestart,
    Scenario::DiskFull,
    Scenario::ClockJump,
];

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::SanLoss => "san-loss",
            Scenario::NetLossOne => "net-loss-one",
            Scenario::NetLossAll => "net-loss-all",
            Scenario::CoordinatorKill => "coordinator-kill",
            Scenario::HostKill => "host-kill",
            Scenario::TargetRestart => "target-restart",
            Scenario::DiskFull => "disk-full",
            Scenario::SlowSan => "slow-san",
            Scenario::ClockJump => "clock-jump",
            Scenario::All => "all",
        }
    }
}

/// `csvctl drill` arguments.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    #[command(flatten)]
    access: Access,
    /// The failure to rehearse.
    #[arg(value_enum)]
    scenario: Scenario,
    /// The volume (N of VolumeN) the load writes to.
    #[arg(long, default_value_t = 1)]
    volume: u64,
    /// How long the fault lasts (90s, 2m, ...).
    #[arg(long, default_value = "10s", value_parser = crate::size::parse_age)]
    duration: Duration,
    /// This host's id: the load runs on its mount (default: `id` in
    /// /etc/csv/csvd.toml).
    #[arg(long)]
    host: Option<u64>,
    /// Where this host mounts the volumes (default: `mount_root` in
    /// /etc/csv/csvd.toml, else /ClusterStorage).
    #[arg(long)]
    mount_root: Option<PathBuf>,
    /// The host to fault instead of the scenario's default.
    #[arg(long)]
    target: Option<u64>,
    /// For target-restart: the command (run with `sh -c`) that restarts
    /// the iSCSI target, e.g. "ssh array systemctl restart tgt".
    #[arg(long)]
    target_cmd: Option<String>,
    /// Writers in the load (each its own file).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16))]
    writers: u64,
    /// Say what the drill would do, and do nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run even though the cluster runs VMs that are not the drill's.
    #[arg(long)]
    yes: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Leave out the drill's VM (a small test-guest VM role that
    /// live-migrates during the fault, or runs on the host that crashes).
    #[arg(long)]
    no_vm: bool,
}

/// One measure of a drill against its objective.
#[derive(Debug, Clone, serde::Serialize)]
struct Measure {
    name: String,
    value: String,
    objective: String,
    pass: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Report {
    scenario: String,
    target: Option<u64>,
    measures: Vec<Measure>,
    notes: Vec<String>,
    pass: bool,
}

/// What the drill knows of the cluster.
struct Ctx {
    me: Identity,
    info: proto::ClusterInfo,
    host: u64,
    vol: u64,
    dir: PathBuf,
    dur: Duration,
}

impl Ctx {
    fn addrs(&self, node: u64) -> Vec<SocketAddr> {
        self.info
            .nodes
            .iter()
            .filter(|n| n.id == node)
            .flat_map(|n| n.addrs.iter())
            .filter_map(|a| a.to_socket_addrs().ok())
            .flatten()
            .collect()
    }

    fn hosts(&self) -> Vec<u64> {
        self.info.nodes.iter().map(|n| n.id).collect()
    }

    /// Host `node`'s status, through whichever of its addresses answers.
    fn status(&self, node: u64) -> Option<proto::NodeStatus> {
        self.addrs(node)
            .into_iter()
            .find_map(|a| client::node_status(&self.me, a, Duration::from_millis(700)).ok())
    }

    /// Host `node`'s mode for the volume ("Direct", "BlockRedirected", ...).
    fn mode(&self, node: u64) -> Option<String> {
        self.status(node)?
            .volumes
            .into_iter()
            .find(|v| v.number == self.vol)
            .map(|v| v.state)
    }

    /// The volume's coordinator (the leader of its group), as any host
    /// that answers sees it.
    fn coordinator(&self) -> Option<u64> {
        self.hosts().into_iter().find_map(|h| {
            let s = self.status(h)?;
            s.groups
                .iter()
                .find(|g| g.group == self.vol && g.role == "leader")
                .map(|_| h)
        })
    }

    fn fault(&self, node: u64, req: FaultReq) -> Result<()> {
        let mut last = String::from("no address");
        for a in self.addrs(node) {
            match client::fault(&self.me, a, req.clone(), Duration::from_secs(3)) {
                Ok(()) => return Ok(()),
                Err(e) => last = client::describe(&e),
            }
        }
        bail!("host {node} did not take the {} fault: {last}", req.kind)
    }

    /// Ends every fault on every host that answers (the others heal by
    /// themselves at the deadline).
    fn heal_all(&self) {
        for h in self.hosts() {
            let _ = self.fault(
                h,
                FaultReq {
                    kind: "heal".into(),
                    ..Default::default()
                },
            );
        }
    }

    fn wait(&self, within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < within {
            if f() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn others(&self) -> Vec<u64> {
        self.hosts()
            .into_iter()
            .filter(|h| *h != self.host)
            .collect()
    }
}

/// The drill's load: writers that each fsync 64 KiB chunks into a file of
/// their own and log every acknowledged chunk's checksum.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<WriterLog>>,
}

const CHUNK: usize = 64 << 10;
/// Chunks per writer file (it wraps: 16 MiB each).
const CHUNKS: u64 = 256;

#[derive(Default)]
struct WriterLog {
    path: PathBuf,
    /// Chunk index -> checksum of its last acknowledged content.
    acked: std::collections::BTreeMap<u64, u32>,
    writes: u64,
    /// Errors the writer saw (kind, message), in order.
    errors: Vec<String>,
    enospc: u64,
    /// Longest time between two acknowledged writes.
    longest_gap: Duration,
    /// When an acknowledged write last completed.
    last_ok: Option<Instant>,
}

fn chunk_bytes(writer: u64, n: u64) -> Vec<u8> {
    // Different in every chunk and every pass.
    let mut x = writer.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut v = Vec::with_capacity(CHUNK);
    while v.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

impl Load {
    fn start(dir: &Path, writers: u64, seed: u64) -> Result<Load> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for w in 0..writers {
            let path = dir.join(format!("writer{w}.dat"));
            let stop = stop.clone();
            let id = seed.wrapping_add(w);
            threads.push(std::thread::spawn(move || write_loop(path, id, &stop)));
        }
        Ok(Load { stop, threads })
    }

    fn finish(self) -> Vec<WriterLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .filter_map(|t| t.join().ok())
            .collect()
    }
}

fn write_loop(path: PathBuf, id: u64, stop: &AtomicBool) -> WriterLog {
    let mut log = WriterLog {
        path: path.clone(),
        last_ok: Some(Instant::now()),
        ..Default::default()
    };
    let mut file: Option<File> = None;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let f = match &file {
            Some(f) => f,
            None => match OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)
            {
                Ok(f) => file.insert(f),
                Err(e) => {
                    log.errors.push(format!("open: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let data = chunk_bytes(id, n);
        let at = (n % CHUNKS) * CHUNK as u64;
        match f.write_all_at(&data, at).and_then(|()| f.sync_data()) {
            Ok(()) => {
                let now = Instant::now();
                if let Some(l) = log.last_ok {
                    log.longest_gap = log.longest_gap.max(now - l);
                }
                log.last_ok = Some(now);
                log.acked.insert(n % CHUNKS, crc32fast::hash(&data));
                log.writes += 1;
                n += 1;
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc_enospc()) {
                    log.enospc += 1;
                } else {
                    log.errors.push(e.to_string());
                    // A handle on a mount that went away is opened again.
                    file = None;
                }
                // The chunk's content is now unknown until rewritten.
                log.acked.remove(&(n % CHUNKS));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    log
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

/// The drill's VM: a VM role of the test guest on a small VHD in the
/// drill's directory, driven through csvctl's own `vm` commands.
#[derive(Clone)]
struct DrillVm {
    name: String,
    access: Access,
}

impl DrillVm {
    fn csvctl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .access
            .csvctl()?
            .args(args)
            .output()
            .context("running csvctl")?;
        if !out.status.success() {
            bail!(
                "csvctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds and starts it on `host`; waits until its guest runs.
    fn start(access: &Access, ctx: &Ctx, host: u64) -> Result<DrillVm> {
        let name = format!("csv-drill-{}", std::process::id());
        let file = ctx.dir.join("vm.vhd");
        vhd::Vhd::create(
            &file,
            &vhd::CreateOptions::new(vhd::footer::DiskType::Dynamic, 16 << 20),
        )
        .with_context(|| format!("create {}", file.display()))?;
        let disk = format!(
            "/ClusterStorage/Volume{}/{}/vm.vhd",
            ctx.vol,
            ctx.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let vm = DrillVm {
            name,
            access: access.clone(),
        };
        vm.csvctl(&[
            "vm",
            "add",
            &vm.name,
            "--memory",
            "32M",
            "--disk",
            &disk,
            "--volume",
            &ctx.vol.to_string(),
            "--owner",
            "csv-drill",
        ])?;
        vm.csvctl(&["vm", "start", &vm.name, "--on", &host.to_string()])?;
        if ctx
            .wait(Duration::from_secs(30), || vm.host() == Some(host))
            .is_none()
        {
            let _ = vm.remove();
            bail!("the drill's VM did not start on host {host}");
        }
        Ok(vm)
    }

    /// Where its guest runs (and has sent heartbeats).
    fn host(&self) -> Option<u64> {
        let s: serde_json::Value =
            serde_json::from_str(&self.csvctl(&["vm", "status", &self.name, "--json"]).ok()?)
                .ok()?;
        s["runtime"]
            .as_array()?
            .iter()
            .find(|x| x["state"] == "running" && x["heartbeats"].as_u64().unwrap_or(0) > 10)
            .and_then(|x| x["host"].as_u64())
    }

    /// Live-migrates it to `to`: the downtime its hosts measured.
    fn migrate(&self, to: u64) -> Result<f64> {
        let out = self.csvctl(&["vm", "migrate", &self.name, "--to", &to.to_string()])?;
        out.split("downtime ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no downtime in {out:?}"))
    }

    fn remove(&self) -> Result<()> {
        let _ = self.csvctl(&["vm", "stop", &self.name]);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            let s = self.csvctl(&["vm", "status", &self.name, "--json"])?;
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            if v["runtime"].as_array().is_none_or(|r| r.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.csvctl(&["vm", "remove", &self.name]).map(|_| ())
    }
}

/// How often host `node` has been fenced off the volume's LUN.
fn fence_count(ctx: &Ctx, node: u64) -> u64 {
    ctx.status(node)
        .and_then(|s| s.volumes.into_iter().find(|v| v.number == ctx.vol))
        .map_or(0, |v| v.fenced_events)
}

/// Reads every acknowledged chunk back: the chunks lost or changed.
fn verify(logs: &[WriterLog]) -> (u64, u64, Vec<String>) {
    let (mut checked, mut lost, mut why) = (0, 0, Vec::new());
    for l in logs {
        let f = match File::open(&l.path) {
            Ok(f) => f,
            Err(e) => {
                lost += l.acked.len() as u64;
                why.push(format!("{}: {e}", l.path.display()));
                continue;
            }
        };
        let mut buf = vec![0u8; CHUNK];
        for (&i, &crc) in &l.acked {
            checked += 1;
            let ok =
                f.read_exact_at(&mut buf, i * CHUNK as u64).is_ok() && crc32fast::hash(&buf) == crc;
            if !ok {
                lost += 1;
                if why.len() < 5 {
                    why.push(format!("{} chunk {i}", l.path.display()));
                }
            }
        }
    }
    (checked, lost, why)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn settings_file() -> Option<toml_lite::Settings> {
    toml_lite::read(Path::new("/etc/csv/csvd.toml"))
}

/// The two keys of the host's settings file the drill needs.
mod toml_lite {
    use std::path::{Path, PathBuf};

    pub struct Settings {
        pub id: Option<u64>,
        pub mount_root: Option<PathBuf>,
    }

    pub fn read(p: &Path) -> Option<Settings> {
        let text = std::fs::read_to_string(p).ok()?;
        let mut s = Settings {
            id: None,
            mount_root: None,
        };
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "id" => s.id = v.parse().ok(),
                "mount_root" => s.mount_root = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        Some(s)
    }
}

/// The plan of one drill, for --dry-run and the report.
fn plan(s: Scenario, target: Option<u64>, dur: Duration, ctx: &Ctx) -> String {
    let t = target.map_or("-".to_string(), |t| format!("host {t}"));
    let d = dur.as_secs_f64();
    match s {
        Scenario::SanLoss => format!("cut the SAN path of {t} to Volume{} for {d} s; expect BlockRedirected within 1 s, no error in the load, Direct again by itself", ctx.vol),
        Scenario::SlowSan => format!("add 200 ms to every SAN I/O of {t} for {d} s; expect no error in the load"),
        Scenario::NetLossOne => format!("cut the first cluster network of {t} for {d} s; expect traffic to take the other network, no error in the load"),
        Scenario::NetLossAll => format!("cut every cluster network of {t} for {d} s; expect it fenced, the load on host {} going on without error, and {t} back after", ctx.host),
        Scenario::CoordinatorKill => format!("crash {t}, the coordinator of Volume{} (down 3 s); expect another coordinator within 5 s and no error in the load", ctx.vol),
        Scenario::HostKill => format!("crash {t} and keep it down {d} s; expect the others to carry on without error and it to come back"),
        Scenario::TargetRestart => "run --target-cmd to restart the iSCSI target; expect every host's session back, no error in the load".to_string(),
        Scenario::DiskFull => format!("fill Volume{} from host {} until ENOSPC, hold {d} s, free it; expect nothing acknowledged lost and writing to resume", ctx.vol, ctx.host),
        Scenario::ClockJump => format!("jump the clock of {t} an hour ahead for {d} s; expect no error in the load"),
        Scenario::All => String::new(),
    }
}

fn default_target(s: Scenario, ctx: &Ctx) -> Option<u64> {
    match s {
        Scenario::SanLoss | Scenario::SlowSan | Scenario::NetLossOne => Some(ctx.host),
        Scenario::NetLossAll | Scenario::HostKill => ctx.others().last().copied(),
        Scenario::CoordinatorKill | Scenario::ClockJump => ctx.coordinator(),
        _ => None,
    }
}

/// Runs `csvctl drill`.
pub fn run(a: DrillArgs) -> Result<ExitCode> {
    let settings = settings_file();
    let host = a
        .host
        .or(settings.as_ref().and_then(|s| s.id))
        .context("which host is this? pass --host N (no `id` in /etc/csv/csvd.toml)")?;
    let root = a
        .mount_root
        .clone()
        .or(settings.and_then(|s| s.mount_root))
        .unwrap_or_else(|| PathBuf::from("/ClusterStorage"));
    let me = a.access.identity()?;
    let mut c: Client = a.access.client()?;
    let info = c
        .cluster_info()
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
    if !info.nodes.iter().any(|n| n.id == host) {
        bail!("host {host} is not in the cluster");
    }
    if !info.volumes.iter().any(|v| v.number == a.volume) {
        bail!("Volume{} does not exist (csvctl volume list)", a.volume);
    }
    let mount = root.join(format!("Volume{}", a.volume));
    if !a.dry_run && !mount.is_dir() {
        bail!("{} is not mounted on this host", mount.display());
    }
    let foreign: Vec<String> = info
        .vms
        .iter()
        .filter(|r| !r.name.starts_with("csv-drill"))
        .map(|r| r.name.clone())
        .collect();
    let ctx = Ctx {
        me,
        info,
        host,
        vol: a.volume,
        dir: mount.join(format!(".csv-drill-{}", std::process::id())),
        dur: a.duration,
    };
    let scenarios: Vec<Scenario> = if a.scenario == Scenario::All {
        ALL.iter()
            .copied()
            .filter(|s| *s != Scenario::TargetRestart || a.target_cmd.is_some())
            .collect()
    } else {
        vec![a.scenario]
    };
    if a.dry_run {
        println!(
            "csvctl drill would run on a load of {} writers on host {host} ({}):",
            a.writers,
            mount.display()
        );
        for s in &scenarios {
            let t = a.target.or_else(|| default_target(*s, &ctx));
            println!("- {}: {}", s.name(), plan(*s, t, a.duration, &ctx));
        }
        println!("then read back every acknowledged write and check the volume. Nothing was done.");
        return Ok(ExitCode::SUCCESS);
    }
    if !foreign.is_empty() && !a.yes {
        bail!(
            "the cluster runs VMs that are not the drill's ({}): a drill disturbs them; pass --yes to run it anyway",
            foreign.join(", ")
        );
    }
    let mut reports = Vec::new();
    for s in scenarios {
        let t = a.target.or_else(|| default_target(s, &ctx));
        let r = drill(&ctx, s, t, &a, &mut c);
        ctx.heal_all();
        let _ = std::fs::remove_dir_all(&ctx.dir);
        let r = r.unwrap_or_else(|e| Report {
            scenario: s.name().into(),
            target: t,
            measures: vec![Measure {
                name: "drill ran".into(),
                value: format!("no: {e:#}"),
                objective: "yes".into(),
                pass: false,
            }],
            notes: vec![],
            pass: false,
        });
        if !a.json {
            print_report(&r);
        }
        reports.push(r);
    }
    let pass = reports.iter().all(|r| r.pass);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_report(r: &Report) {
    println!(
        "drill {}{}: {}",
        r.scenario,
        r.target.map_or(String::new(), |t| format!(" on host {t}")),
        if r.pass { "PASS" } else { "FAIL" }
    );
    println!(
        "  {:<34} {:>14}  {:<14} RESULT",
        "MEASURE", "VALUE", "OBJECTIVE"
    );
    for m in &r.measures {
        println!(
            "  {:<34} {:>14}  {:<14} {}",
            m.name,
            m.value,
            m.objective,
            if m.pass { "PASS" } else { "FAIL" }
        );
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
}

fn measure(name: &str, value: String, objective: &str, pass: bool) -> Measure {
    Measure {
        name: name.into(),
        value,
        objective: objective.into(),
        pass,
    }
}

/// One drill: load, fault, measures, heal, verification.
fn drill(
    ctx: &Ctx,
    s: Scenario,
    mut target: Option<u64>,
    a: &DrillArgs,
    c: &mut Client,
) -> Result<Report> {
    let dur = ctx.dur;
    let ms_u = |d: Duration| d.as_millis() as u64;
    let mut measures = Vec::new();
    let mut notes = Vec::new();
    // Every host up and Direct before the fault.
    for h in ctx.hosts() {
        if ctx
            .wait(Duration::from_secs(30), || {
                ctx.mode(h).as_deref() == Some("Direct")
            })
            .is_none()
        {
            bail!(
                "host {h} is not Direct on Volume{} before the drill ({:?})",
                ctx.vol,
                ctx.mode(h)
            );
        }
    }
    let kill = matches!(s, Scenario::CoordinatorKill | Scenario::HostKill);
    if kill && target == Some(ctx.host) {
        if s == Scenario::HostKill {
            bail!("host-kill of the host the load runs on: pick another --target");
        }
        // The load runs here: move the coordinator away first.
        let to = *ctx.others().first().context("no other host")?;
        c.transfer_leader(ctx.vol, to)
            .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
        ctx.wait(Duration::from_secs(10), || ctx.coordinator() == Some(to))
            .context("the coordinator did not move off this host")?;
        notes.push(format!(
            "moved the coordinator from host {} (the load's host) to host {to} first",
            ctx.host
        ));
        target = Some(to);
    }
    let need_target = || target.context("no host to fault (a cluster of one host?)");
    match s {
        Scenario::TargetRestart | Scenario::DiskFull => {}
        _ => {
            need_target()?;
        }
    }
    if s == Scenario::TargetRestart && a.target_cmd.is_none() {
        bail!("target-restart needs --target-cmd (the command that restarts the iSCSI target)");
    }
    if s == Scenario::NetLossOne && ctx.info.nodes.iter().any(|n| n.addrs.len() < 2) {
        bail!("every host needs two cluster networks for this drill (some list one address)");
    }
    let load = Load::start(&ctx.dir, a.writers, std::process::id() as u64 * 1000)?;
    // The VM: on the host that crashes, else on a host the fault spares,
    // migrating during the fault to another one it spares.
    let vm_on = if kill {
        target
    } else {
        ctx.hosts().into_iter().find(|h| Some(*h) != target)
    };
    let vm = match vm_on {
        Some(h) if !a.no_vm => match DrillVm::start(&a.access, ctx, h) {
            Ok(vm) => Some(vm),
            Err(e) => {
                measures.push(measure(
                    "drill VM running",
                    format!("no: {e:#}"),
                    "yes (or --no-vm)",
                    false,
                ));
                None
            }
        },
        _ => None,
    };
    let migrate_to = ctx
        .hosts()
        .into_iter()
        .find(|h| Some(*h) != target && Some(*h) != vm_on);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let mut load_may_fail = false;
    let vm_thread = vm.clone().map(|vm| {
        std::thread::spawn(move || -> Result<Measure> {
            if kill {
                // The host crashes at t0: the VM runs again (elsewhere, or
                // there once it is back).
                std::thread::sleep(Duration::from_millis(300));
                while t0.elapsed() < Duration::from_secs(60) {
                    if vm.host().is_some() {
                        let d = t0.elapsed();
                        return Ok(measure(
                            "VM running again after",
                            ms(d),
                            "<= 30000 ms",
                            d <= Duration::from_secs(30),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                return Ok(measure(
                    "VM running again after",
                    "never".into(),
                    "<= 30000 ms",
                    false,
                ));
            }
            let Some(to) = migrate_to else {
                return Ok(measure(
                    "VM live migration",
                    "no host to migrate to".into(),
                    "-",
                    true,
                ));
            };
            std::thread::sleep(Duration::from_millis(1500));
            let d = vm.migrate(to)?;
            Ok(measure(
                "VM downtime (live migration)",
                format!("{d:.1} ms"),
                "<= 500 ms",
                d <= 500.0,
            ))
        })
    });
    let mut fenced_before = 0;
    let mut injected = || -> Result<()> {
        match s {
            Scenario::SanLoss => {
                let t = need_target()?;
                ctx.fault(
                    t,
                    FaultReq {
                        kind: "san-cut".into(),
                        volume: ctx.vol,
                        duration_ms: ms_u(dur),
                        ..Default::default()
                    },
                )?;
                let red = ctx.wait(Duration::from_secs(5), || {
                    ctx.mode(t).as_deref() == Some("BlockRedirected")
                });
                measures.push(measure(
                    "time to BlockRedirected",
                    red.map_or("never".into(), ms),
                    "<= 1000 ms",
                    red.is_some_and(|d| d <= Duration::from_secs(1)),
                ));
                std::thread::sleep(dur.saturating_sub(t0.elapsed()));
                let back = ctx.wait(Duration::from_secs(30), || {
                    ctx.mode(t).as_deref() == Some("Direct")
                });
                measures.push(measure(
                    "back to Direct after the path returns",
                    back.map_or("never".into(), ms),
                    "<= 5000 ms",
                    back.is_some_and(|d| d <= Duration::from_secs(5)),
                ));
            }
            Scenario::SlowSan => {
                let t = need_target()?;
                ctx.fault(
                    t,
                    FaultReq {
                        kind: "san-slow".into(),
                        volume: ctx.vol,
                        delay_ms: 200,
                        duration_ms: ms_u(dur),
                        ..Default::default()
                    },
                )?;
                std::thread::sleep(dur);
            }
            Scenario::NetLossOne | Scenario::NetLossAll => {
                let t = need_target()?;
                let all = s == Scenario::NetLossAll;
                let per_host: Vec<Vec<String>> =
                    ctx.info.nodes.iter().map(|n| n.addrs.clone()).collect();
                let addrs: Vec<String> = per_host
                    .iter()
                    .flat_map(|a| {
                        if all {
                            a.clone()
                        } else {
                            a.first().cloned().into_iter().collect()
                        }
                    })
                    .collect();
                fenced_before = fence_count(ctx, t);
                ctx.fault(
                    t,
                    FaultReq {
                        kind: "net-cut".into(),
                        addrs,
                        duration_ms: ms_u(dur),
                        ..Default::default()
                    },
                )?;
                // Metadata through the cluster network while it is cut: a
                // file created and removed every 200 ms on this host's mount.
                let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
                let mut marked_down = None;
                while t0.elapsed() < dur {
                    if all && marked_down.is_none() {
                        let down = c
                            .cluster_info()
                            .is_ok_and(|i| i.health.iter().any(|h| h.node == t && !h.up));
                        if down {
                            marked_down = Some(t0.elapsed());
                        }
                    }
                    let p = ctx.dir.join("meta-probe");
                    let t1 = Instant::now();
                    match File::create(&p).and_then(|_| std::fs::remove_file(&p)) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            failed += 1;
                            if failed == 1 {
                                notes.push(format!("metadata on host {}: {e}", ctx.host));
                            }
                        }
                    }
                    slowest = slowest.max(t1.elapsed());
                    std::thread::sleep(Duration::from_millis(200));
                }
                let local_cut = t == ctx.host && all;
                load_may_fail = local_cut;
                measures.push(measure(
                    "metadata operations failed",
                    format!("{failed} of {}", ok + failed),
                    "0",
                    failed == 0 || local_cut,
                ));
                measures.push(measure(
                    "slowest metadata operation",
                    ms(slowest),
                    "<= 5000 ms",
                    slowest <= Duration::from_secs(5) || local_cut,
                ));
                if all {
                    measures.push(measure(
                        "cut-off host marked down after",
                        marked_down.map_or("never".into(), ms),
                        "<= 3000 ms",
                        marked_down.is_some_and(|d| d <= Duration::from_secs(3)),
                    ));
                    let back = ctx.wait(Duration::from_secs(60), || {
                        ctx.mode(t).as_deref() == Some("Direct")
                    });
                    measures.push(measure(
                        "cut-off host back to Direct after",
                        back.map_or("never".into(), ms),
                        "<= 30000 ms",
                        back.is_some(),
                    ));
                    // Its key was preempted while it was cut off: it finds
                    // out (and registers again) once it is back.
                    let iscsi = ctx
                        .info
                        .volumes
                        .iter()
                        .any(|v| v.number == ctx.vol && v.lun.starts_with("iscsi://"));
                    let fenced = iscsi
                        && ctx
                            .wait(Duration::from_secs(10), || {
                                fence_count(ctx, t) > fenced_before
                            })
                            .is_some();
                    measures.push(measure(
                        "cut-off host fenced off the LUN",
                        match (iscsi, fenced) {
                            (false, _) => "n/a (LUN file)".into(),
                            (true, f) => {
                                if f {
                                    "yes".into()
                                } else {
                                    "no".into()
                                }
                            }
                        },
                        "yes",
                        fenced || !iscsi,
                    ));
                }
            }
            Scenario::CoordinatorKill | Scenario::HostKill => {
                let t = need_target()?;
                let was_coordinator = ctx.coordinator() == Some(t);
                let down = if s == Scenario::CoordinatorKill {
                    Duration::from_secs(3)
                } else {
                    dur
                };
                let k0 = Instant::now();
                ctx.fault(
                    t,
                    FaultReq {
                        kind: "crash".into(),
                        duration_ms: ms_u(down),
                        ..Default::default()
                    },
                )?;
                if was_coordinator {
                    std::thread::sleep(Duration::from_millis(150));
                    let f = ctx.wait(Duration::from_secs(30), || {
                        ctx.coordinator().is_some_and(|h| h != t)
                    });
                    measures.push(measure(
                        "failover: a new coordinator after",
                        f.map(|d| d + Duration::from_millis(150))
                            .map_or("never".into(), ms),
                        "<= 5000 ms",
                        f.is_some_and(|d| d <= Duration::from_millis(4850)),
                    ));
                }
                std::thread::sleep(down.max(dur).saturating_sub(k0.elapsed()));
                let back = ctx.wait(Duration::from_secs(60), || {
                    ctx.mode(t).as_deref() == Some("Direct")
                });
                measures.push(measure(
                    "crashed host back to Direct after",
                    back.map_or("never".into(), |d| {
                        ms(d + down.max(dur).saturating_sub(down))
                    }),
                    "<= 30000 ms",
                    back.is_some(),
                ));
            }
            Scenario::TargetRestart => {
                let cmd = a.target_cmd.as_deref().context(
                "target-restart needs --target-cmd (the command that restarts the iSCSI target)",
            )?;
                let st = std::process::Command::new("sh")
                    .args(["-c", cmd])
                    .status()
                    .with_context(|| format!("running {cmd:?}"))?;
                measures.push(measure(
                    "target restart command",
                    format!(
                        "{} in {}",
                        if st.success() { "ok" } else { "failed" },
                        ms(t0.elapsed())
                    ),
                    "ok",
                    st.success(),
                ));
                let all = ctx.wait(Duration::from_secs(60), || {
                    ctx.hosts()
                        .iter()
                        .all(|h| ctx.mode(*h).as_deref() == Some("Direct"))
                });
                measures.push(measure(
                    "every host Direct again after",
                    all.map_or("never".into(), ms),
                    "<= 30000 ms",
                    all.is_some(),
                ));
                std::thread::sleep(dur.saturating_sub(t0.elapsed()));
            }
            Scenario::DiskFull => {
                let fill = ctx.dir.join("filler");
                let f = File::create(&fill)?;
                let block = vec![0xA5u8; 4 << 20];
                let mut at = 0u64;
                let full = loop {
                    match f.write_all_at(&block, at).and_then(|()| f.sync_data()) {
                        Ok(()) => at += block.len() as u64,
                        Err(e) if e.raw_os_error() == Some(libc_enospc()) => break true,
                        Err(e) => {
                            notes.push(format!("filling: {e}"));
                            break false;
                        }
                    }
                    if t0.elapsed() > Duration::from_secs(120) {
                        break false;
                    }
                };
                measures.push(measure(
                    "volume full (ENOSPC) after",
                    format!("{} in {}", crate::size::human(at), ms(t0.elapsed())),
                    "ENOSPC",
                    full,
                ));
                std::thread::sleep(dur);
                drop(f);
                std::fs::remove_file(&fill)?;
                let freed = Instant::now();
                // Writing resumes: every writer acknowledges new chunks.
                let probe = ctx.dir.join("after-full");
                let resumed = ctx.wait(Duration::from_secs(30), || {
                    File::create(&probe)
                        .and_then(|f| {
                            f.write_all_at(&block[..CHUNK], 0)
                                .and_then(|()| f.sync_data())
                        })
                        .is_ok()
                });
                measures.push(measure(
                    "writing again after space is freed",
                    resumed.map_or("never".into(), |_| ms(freed.elapsed())),
                    "<= 5000 ms",
                    resumed.is_some_and(|d| d <= Duration::from_secs(5)),
                ));
            }
            Scenario::ClockJump => {
                let t = need_target()?;
                ctx.fault(
                    t,
                    FaultReq {
                        kind: "clock".into(),
                        offset_ms: 3_600_000,
                        duration_ms: ms_u(dur),
                        ..Default::default()
                    },
                )?;
                std::thread::sleep(dur);
            }
            Scenario::All => unreachable!("expanded before"),
        }
        Ok(())
    };
    let injected = injected();
    std::thread::sleep(Duration::from_millis(500));
    ctx.heal_all();
    if let Some(h) = vm_thread {
        match h.join() {
            Ok(Ok(m)) => measures.push(m),
            Ok(Err(e)) => measures.push(measure("drill VM", format!("failed: {e:#}"), "-", false)),
            Err(_) => measures.push(measure("drill VM", "panicked".into(), "-", false)),
        }
    }
    if let Some(vm) = &vm {
        if let Err(e) = vm.remove() {
            notes.push(format!("removing the drill's VM: {e:#}"));
        }
    }
    let logs = load.finish();
    injected?;
    let writes: u64 = logs.iter().map(|l| l.writes).sum();
    let errors: Vec<String> = logs.iter().flat_map(|l| l.errors.iter().cloned()).collect();
    let enospc: u64 = logs.iter().map(|l| l.enospc).sum();
    let stall = logs.iter().map(|l| l.longest_gap).max().unwrap_or_default();
    measures.push(measure(
        "acknowledged writes",
        writes.to_string(),
        "> 0",
        writes > 0,
    ));
    measures.push(measure(
        "longest write stall",
        ms(stall),
        if s == Scenario::DiskFull || load_may_fail {
            "-"
        } else {
            "<= 10000 ms"
        },
        stall <= Duration::from_secs(10) || s == Scenario::DiskFull || load_may_fail,
    ));
    measures.push(measure(
        "I/O errors seen by the load",
        errors.len().to_string(),
        "0",
        errors.is_empty() || load_may_fail,
    ));
    if let Some(e) = errors.first() {
        notes.push(format!("first load error: {e}"));
    }
    if s == Scenario::DiskFull {
        notes.push(format!(
            "{enospc} writes got ENOSPC while the volume was full"
        ));
    }
    let (checked, lost, why) = verify(&logs);
    measures.push(measure(
        "acknowledged writes lost",
        format!("{lost} of {checked}"),
        "0",
        lost == 0 && checked > 0,
    ));
    notes.extend(why);
    let problems = c
        .check_volume(ctx.vol)
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
    measures.push(measure(
        "volume consistency check",
        if problems.is_empty() {
            "clean".into()
        } else {
            format!("{} problems", problems.len())
        },
        "clean",
        problems.is_empty(),
    ));
    notes.extend(problems.into_iter().take(5));
    let pass = measures.iter().all(|m| m.pass);
    Ok(Report {
        scenario: s.name().into(),
        target,
        measures,
        notes,
        pass,
    })
}
