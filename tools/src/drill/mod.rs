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

mod ctx;
mod faults;
mod load;
mod vm;

use crate::cluster_cmd::Access;
use anyhow::{bail, Context, Result};
use coordinator::client::{self, Client};
use ctx::Ctx;
use faults::{Fault, Outcome};
use load::{verify, Load};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vm::DrillVm;

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
    #[arg(long, default_value = "10s", value_parser = crate::when::parse_age)]
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
pub(super) struct Measure {
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

pub(super) fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// The settings file of this host's csvd, where the drill learns its id
/// and mount root; `None` when there is none.
fn settings_file() -> Result<Option<csvd::settings::FileConfig>> {
    let path = Path::new("/etc/csv/csvd.toml");
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file =
        csvd::settings::parse_file(&text).with_context(|| format!("in {}", path.display()))?;
    Ok(Some(file))
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
    let settings = settings_file()?;
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

pub(super) fn measure(name: &str, value: String, objective: &str, pass: bool) -> Measure {
    Measure {
        name: name.into(),
        value,
        objective: objective.into(),
        pass,
    }
}

/// Every host is up and Direct on the volume before the fault.
fn precheck(ctx: &Ctx) -> Result<()> {
    for h in ctx.hosts() {
        let direct = ctx.wait(Duration::from_secs(30), || {
            ctx.mode(h).as_deref() == Some("Direct")
        });
        if direct.is_none() {
            bail!(
                "host {h} is not Direct on Volume{} before the drill ({:?})",
                ctx.vol,
                ctx.mode(h)
            );
        }
    }
    Ok(())
}

/// Checks the scenario can run and picks its target: a kill of this
/// host's coordinator moves the coordinator away first (the load runs
/// here), and targets the host it moved to.
fn pick_target(
    ctx: &Ctx,
    s: Scenario,
    target: Option<u64>,
    a: &DrillArgs,
    c: &mut Client,
    notes: &mut Vec<String>,
) -> Result<Option<u64>> {
    let needs_host = !matches!(s, Scenario::TargetRestart | Scenario::DiskFull);
    if needs_host && target.is_none() {
        bail!("no host to fault (a cluster of one host?)");
    }
    if s == Scenario::TargetRestart && a.target_cmd.is_none() {
        bail!("target-restart needs --target-cmd (the command that restarts the iSCSI target)");
    }
    if s == Scenario::NetLossOne && ctx.info.nodes.iter().any(|n| n.addrs.len() < 2) {
        bail!("every host needs two cluster networks for this drill (some list one address)");
    }
    let kill = matches!(s, Scenario::CoordinatorKill | Scenario::HostKill);
    if !(kill && target == Some(ctx.host)) {
        return Ok(target);
    }
    if s == Scenario::HostKill {
        bail!("host-kill of the host the load runs on: pick another --target");
    }
    let to = *ctx.others().first().context("no other host")?;
    c.transfer_leader(ctx.vol, to)
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
    ctx.wait(Duration::from_secs(10), || ctx.coordinator() == Some(to))
        .context("the coordinator did not move off this host")?;
    notes.push(format!(
        "moved the coordinator from host {} (the load's host) to host {to} first",
        ctx.host
    ));
    Ok(Some(to))
}

/// What the drill's VM does while the fault lasts: on a host that
/// crashes at `t0` it must run again (elsewhere, or there once the host is
/// back); elsewhere it live-migrates to `migrate_to` during the fault.
fn watch_vm(vm: DrillVm, kill: bool, migrate_to: Option<u64>, t0: Instant) -> Result<Measure> {
    if kill {
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
}

/// The drill's VM, or the measure saying why it could not start.
fn start_vm(a: &DrillArgs, ctx: &Ctx, on: Option<u64>, out: &mut Outcome) -> Option<DrillVm> {
    let h = on.filter(|_| !a.no_vm)?;
    match DrillVm::start(&a.access, ctx, h) {
        Ok(vm) => Some(vm),
        Err(e) => {
            out.measures.push(measure(
                "drill VM running",
                format!("no: {e:#}"),
                "yes (or --no-vm)",
                false,
            ));
            None
        }
    }
}

/// What the load went through, measured once it stopped.
fn conclude(s: Scenario, logs: &[load::WriterLog], out: &mut Outcome) {
    let writes: u64 = logs.iter().map(|l| l.writes).sum();
    let errors: Vec<&String> = logs.iter().flat_map(|l| l.errors.iter()).collect();
    let enospc: u64 = logs.iter().map(|l| l.enospc).sum();
    let stall = logs.iter().map(|l| l.longest_gap).max().unwrap_or_default();
    let may_stall = s == Scenario::DiskFull || out.load_may_fail;
    out.measures.push(measure(
        "acknowledged writes",
        writes.to_string(),
        "> 0",
        writes > 0,
    ));
    out.measures.push(measure(
        "longest write stall",
        ms(stall),
        if may_stall { "-" } else { "<= 10000 ms" },
        stall <= Duration::from_secs(10) || may_stall,
    ));
    out.measures.push(measure(
        "I/O errors seen by the load",
        errors.len().to_string(),
        "0",
        errors.is_empty() || out.load_may_fail,
    ));
    if let Some(e) = errors.first() {
        out.notes.push(format!("first load error: {e}"));
    }
    if s == Scenario::DiskFull {
        out.notes.push(format!(
            "{enospc} writes got ENOSPC while the volume was full"
        ));
    }
    let (checked, lost, why) = verify(logs);
    out.measures.push(measure(
        "acknowledged writes lost",
        format!("{lost} of {checked}"),
        "0",
        lost == 0 && checked > 0,
    ));
    out.notes.extend(why);
}

/// One drill: load, fault, measures, heal, verification.
fn drill(
    ctx: &Ctx,
    s: Scenario,
    target: Option<u64>,
    a: &DrillArgs,
    c: &mut Client,
) -> Result<Report> {
    let mut out = Outcome::default();
    precheck(ctx)?;
    let target = pick_target(ctx, s, target, a, c, &mut out.notes)?;
    let load = Load::start(&ctx.dir, a.writers, std::process::id() as u64 * 1000)?;
    // The VM: on the host that crashes, else on a host the fault spares,
    // migrating during the fault to another one it spares.
    let kill = matches!(s, Scenario::CoordinatorKill | Scenario::HostKill);
    let vm_on = if kill {
        target
    } else {
        ctx.hosts().into_iter().find(|h| Some(*h) != target)
    };
    let vm = start_vm(a, ctx, vm_on, &mut out);
    let migrate_to = ctx
        .hosts()
        .into_iter()
        .find(|h| Some(*h) != target && Some(*h) != vm_on);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let vm_thread = vm
        .clone()
        .map(|vm| std::thread::spawn(move || watch_vm(vm, kill, migrate_to, t0)));
    let injected = faults::inject(
        s,
        &mut Fault {
            ctx,
            target,
            t0,
            args: a,
            client: c,
        },
        &mut out,
    );
    std::thread::sleep(Duration::from_millis(500));
    ctx.heal_all();
    if let Some(h) = vm_thread {
        out.measures.push(match h.join() {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => measure("drill VM", format!("failed: {e:#}"), "-", false),
            Err(_) => measure("drill VM", "panicked".into(), "-", false),
        });
    }
    if let Some(vm) = &vm {
        if let Err(e) = vm.remove() {
            out.notes.push(format!("removing the drill's VM: {e:#}"));
        }
    }
    let logs = load.finish();
    injected?;
    conclude(s, &logs, &mut out);
    let problems = c
        .check_volume(ctx.vol)
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
    out.measures.push(measure(
        "volume consistency check",
        if problems.is_empty() {
            "clean".into()
        } else {
            format!("{} problems", problems.len())
        },
        "clean",
        problems.is_empty(),
    ));
    out.notes.extend(problems.into_iter().take(5));
    let pass = out.measures.iter().all(|m| m.pass);
    Ok(Report {
        scenario: s.name().into(),
        target,
        measures: out.measures,
        notes: out.notes,
        pass,
    })
}
