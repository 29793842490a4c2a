//! The VM supervisor: runs the VM roles the cluster registry places on
//! this host, one `csv-vmm` process each, and reports how they are doing.
//!
//! Every half second it reads the registry. A role whose owner is this host
//! and whose state is `running` gets a `csv-vmm run` with its memory,
//! vCPUs and disk (the role's `/ClusterStorage/VolumeN/...` path under this
//! host's mount root), a control socket and a serial log in the run
//! directory. A process whose role went elsewhere or was stopped is asked
//! to stop (its disk is flushed and closed) and killed if it does not exit
//! within 10 s. A process that exits on its own is reported `failed` with
//! the tail of its log and started again after a pause. Each VM's state,
//! heartbeat and disk writes (read from its control socket) go into this
//! host's status, where `csvctl vm status` finds them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::client::Client;
use coordinator::node::VmStates;
use coordinator::proto::VmRuntime;
use coordinator::vmrole::VmConfig;
use coordinator::wire::Identity;

/// How long a host must have been down before its VMs restart elsewhere
/// (Hyper-V waits for 10-20 missed heartbeats a second apart, VMware HA
/// about 15 s).
const FAILOVER_GRACE: Duration = Duration::from_secs(5);

/// What the supervisor needs.
#[derive(Debug, Clone)]
pub struct VmHostConfig {
    pub node: u64,
    /// Where this host mounts the volumes (`/ClusterStorage`).
    pub mount_root: PathBuf,
    /// Control sockets, serial logs and VMM logs.
    pub run_dir: PathBuf,
    /// The `csv-vmm` program.
    pub vmm: PathBuf,
    pub identity: Identity,
    pub endpoints: Vec<std::net::SocketAddr>,
}

struct Running {
    child: Child,
    control: PathBuf,
    log: PathBuf,
    stopping: Option<Instant>,
    /// Waiting for an incoming migration (no VM in the process yet).
    incoming: bool,
    /// The VM went to another host: the process exits by itself.
    migrated: bool,
    /// A live migration this host is sending.
    migration: Option<std::thread::JoinHandle<Result<String, String>>>,
    /// Its latest progress event (the VMM's JSON) and target host.
    progress: Arc<std::sync::Mutex<(serde_json::Value, u64)>>,
    /// The disk's path on this host.
    disk: PathBuf,
    /// Started from this saved state (a quick migration's file), until the
    /// VM runs and the registry no longer asks for it.
    restored_from: Option<PathBuf>,
    /// An incoming VMM's migration token (hex): the source opens with it.
    token: Option<String>,
}

/// A new migration token: 32 random bytes, as hex.
fn new_token() -> Result<String, String> {
    use std::io::Read;
    let mut t = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut t))
        .map_err(|e| format!("a migration token: {e}"))?;
    Ok(t.iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs this host's VM roles until `stop`, then stops them all.
#[derive(Debug)]
pub struct VmSupervisor {
    cfg: VmHostConfig,
    reports: VmStates,
    /// The running VMs' disks and control sockets (snapshots pause them).
    pub controls: crate::freeze::VmControls,
    /// (volume, host) pairs fenced off by persistent reservation (from
    /// the mounts): a failover from a dead host onto an iSCSI volume waits
    /// for its fence, 10 s at most.
    pub fenced: Arc<std::sync::RwLock<std::collections::BTreeSet<(u64, u64)>>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("pid", &self.child.id())
            .finish()
    }
}

/// A conversation with a csv-vmm control socket (JSON lines).
struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    /// Connects and sends `req`; answers are read with a timeout, if any.
    fn send(
        control: &Path,
        req: &serde_json::Value,
        timeout: Option<Duration>,
    ) -> Result<Control, String> {
        let conn = UnixStream::connect(control).map_err(|e| e.to_string())?;
        conn.set_read_timeout(timeout).map_err(|e| e.to_string())?;
        let mut w = conn.try_clone().map_err(|e| e.to_string())?;
        writeln!(w, "{req}").map_err(|e| e.to_string())?;
        Ok(Control {
            w,
            r: BufReader::new(conn),
        })
    }

    /// The next line the VMM sends (an event or the answer).
    fn next(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        if self.r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the VMM closed its control socket".into());
        }
        serde_json::from_str(&line).map_err(|e| e.to_string())
    }

    /// One more line to the VMM (an answer to an event).
    fn reply(&mut self, v: &serde_json::Value) -> Result<(), String> {
        writeln!(self.w, "{v}").map_err(|e| e.to_string())
    }
}

/// One request to a csv-vmm control socket; its answer (events skipped).
fn ask(control: &Path, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    let mut c = Control::send(control, req, Some(Duration::from_secs(15)))?;
    loop {
        let v = c.next()?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

/// A process's peak resident memory (VmHWM, bytes; 0 if unknown).
fn resident_peak(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb << 10)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

impl VmSupervisor {
    pub fn new(cfg: VmHostConfig, reports: VmStates) -> Self {
        VmSupervisor {
            cfg,
            reports,
            controls: Default::default(),
            fenced: Default::default(),
        }
    }

    /// A client of the coordinator service through this host.
    fn client(&self, timeout: Duration) -> Client {
        let mut c = Client::new(self.cfg.identity.clone(), self.cfg.endpoints.clone());
        c.timeout = timeout;
        c
    }

    fn spawn(&self, name: &str, vm: &VmConfig, incoming: bool) -> Result<Running, String> {
        let restore = match (&vm.restore_from, incoming) {
            (Some(p), false) => Some(vm.path_on(p, &self.cfg.mount_root).ok_or_else(|| {
                format!("saved state {p:?} is not a path on Volume{}", vm.volume)
            })?),
            _ => None,
        };
        let disk = vm
            .disk_on(&self.cfg.mount_root)
            .ok_or_else(|| format!("disk {:?} is not a path on Volume{}", vm.disk, vm.volume))?;
        if !disk.exists() {
            return Err(format!(
                "disk {} does not exist on this host",
                disk.display()
            ));
        }
        std::fs::create_dir_all(&self.cfg.run_dir).map_err(|e| e.to_string())?;
        let control = self.cfg.run_dir.join(format!("{name}.sock"));
        let log = self.cfg.run_dir.join(format!("{name}.log"));
        let serial = self.cfg.run_dir.join(format!("{name}.serial"));
        let _ = std::fs::remove_file(&control);
        let mut cmd = Command::new(&self.cfg.vmm);
        let mut token = None;
        if incoming {
            // The token reaches the VMM in its environment, never on its
            // command line (which every local user can read).
            let t = new_token()?;
            cmd.env("CSV_MIGRATION_TOKEN", &t);
            token = Some(t);
            // On this host's cluster address, a port of the kernel's choice
            // (the status reports it).
            let ip = self
                .cfg
                .endpoints
                .first()
                .map_or_else(|| std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip());
            cmd.args([
                "incoming",
                "--listen",
                &std::net::SocketAddr::new(ip, 0).to_string(),
            ]);
        } else if let Some(state) = &restore {
            cmd.arg("restore").arg("--from").arg(state);
        } else {
            cmd.args([
                "run",
                "--memory",
                &vm.memory.to_string(),
                "--vcpus",
                &vm.vcpus.to_string(),
            ])
            .args(["--dirty-rate", &vm.dirty_rate.to_string()]);
        }
        // A VM dies with the csvd that runs it: a host whose csvd is gone
        // is failed over, and its VMs must not go on writing their disks.
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg("--disk")
            .arg(&disk)
            .arg("--control")
            .arg(&control)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.cfg.vmm.display()))?;
        tracing::info!(vm = name, pid = child.id(), disk = %disk.display(), incoming, "VMM started");
        Ok(Running {
            child,
            control,
            log,
            stopping: None,
            incoming,
            migrated: false,
            migration: None,
            progress: Default::default(),
            disk,
            restored_from: restore,
            token,
        })
    }

    fn report(r: &mut Running, name: &str) -> VmRuntime {
        let mut out = VmRuntime {
            name: name.to_string(),
            pid: r.child.id(),
            state: if r.stopping.is_some() {
                "stopping".into()
            } else {
                "starting".into()
            },
            resident_peak: resident_peak(r.child.id()),
            ..Default::default()
        };
        if r.stopping.is_none() {
            if let Ok(s) = ask(&r.control, &serde_json::json!({"cmd": "status"})) {
                let hb = &s["heartbeat"];
                out.state = s["state"].as_str().unwrap_or("unknown").to_string();
                out.listen = s["listen"].as_str().unwrap_or_default().to_string();
                if r.incoming {
                    out.listen_token = r.token.clone().unwrap_or_default();
                }
                out.heartbeat_gaps = hb["gaps"].as_u64().unwrap_or(0);
                out.guest_errors = hb["guest_errors"].as_u64().unwrap_or(0);
                if r.migration.is_some() {
                    out.state = "migrating".into();
                    if let Ok(p) = r.progress.lock() {
                        let (p, to) = &*p;
                        out.migrating_to = *to;
                        if !p.is_null() {
                            out.migration = format!(
                                "round {}, {} pages dirty, {:.0} MiB/s, est. downtime {:.1} ms",
                                p["round"],
                                p["dirty_pages"],
                                p["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
                                p["estimated_downtime_ms"].as_f64().unwrap_or(0.0)
                            );
                            let mem = s["mem_bytes"].as_u64().unwrap_or(0).max(1);
                            let sent = p["pages_sent"].as_u64().unwrap_or(0) * 4096;
                            out.migration_pct = (sent.saturating_mul(100) / mem).min(99) as u32;
                        }
                    }
                }
                out.heartbeat_seq = hb["seq"].as_u64().unwrap_or(0);
                out.heartbeats = hb["local_count"].as_u64().unwrap_or(0);
                out.disk_writes = s["guest"]["disk_writes"].as_u64().unwrap_or(0);
                out.disk_last_seq = s["guest"]["disk_last_seq"].as_u64().unwrap_or(0);
            }
        }
        out
    }

    /// Follows the registry until `stop` is set, then stops this host's VMs.
    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut c = self.client(Duration::from_secs(2));
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        let mut failures: BTreeMap<String, (Instant, String)> = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            let info = c.cluster_info().ok();
            if let Some(info) = &info {
                let me = self.cfg.node;
                // Roles placed here, and roles migrating here.
                let wanted: BTreeMap<String, Wanted> = info
                    .vms
                    .iter()
                    .filter_map(|r| VmConfig::from_role(r).ok().map(|c| (r, c)))
                    .filter(|(_, c)| c.state == "running")
                    .filter_map(|(r, c)| {
                        if r.node == me {
                            Some((
                                r.name.clone(),
                                Wanted {
                                    cfg: c,
                                    owner: r.node,
                                    incoming: false,
                                },
                            ))
                        } else if c.migrate_to == Some(me) && !c.migrate_quick {
                            Some((
                                r.name.clone(),
                                Wanted {
                                    cfg: c,
                                    owner: r.node,
                                    incoming: true,
                                },
                            ))
                        } else {
                            None
                        }
                    })
                    .collect();
                self.converge(&wanted, &mut running, &mut failures);
                self.migrations(info, &wanted, &mut running, &mut c);
                self.failover(info, &mut c);
            }
            let mut reports: Vec<VmRuntime> = running
                .iter_mut()
                .map(|(n, r)| Self::report(r, n))
                .collect();
            for (name, (_, err)) in &failures {
                if !running.contains_key(name) {
                    reports.push(VmRuntime {
                        name: name.clone(),
                        state: "failed".into(),
                        error: err.clone(),
                        ..Default::default()
                    });
                }
            }
            if let Ok(mut r) = self.reports.write() {
                *r = reports;
            }
            if let Ok(mut c) = self.controls.write() {
                *c = running
                    .iter()
                    .filter(|(_, r)| !r.incoming && !r.migrated && r.stopping.is_none())
                    .map(|(n, r)| (n.clone(), (r.disk.clone(), r.control.clone())))
                    .collect();
            }
            for _ in 0..5 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Shutting down: every VM stops (flushing its disk) before the
        // volumes are unmounted. A migration under way finishes first.
        for r in running.values_mut() {
            if let Some(h) = r.migration.take() {
                let _ = h.join();
            }
        }
        self.converge(&BTreeMap::new(), &mut running, &mut failures);
        let t = Instant::now();
        while !running.is_empty() && t.elapsed() < Duration::from_secs(12) {
            std::thread::sleep(Duration::from_millis(100));
            self.converge(&BTreeMap::new(), &mut running, &mut failures);
        }
    }

    fn converge(
        &self,
        wanted: &BTreeMap<String, Wanted>,
        running: &mut BTreeMap<String, Running>,
        failures: &mut BTreeMap<String, (Instant, String)>,
    ) {
        // Reap what exited.
        let mut gone = Vec::new();
        for (name, r) in running.iter_mut() {
            if r.migration.is_some() {
                // The migration's outcome decides (a VMM that migrated
                // exits before its answer is read).
                continue;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                if r.migrated {
                    tracing::info!(vm = %name, "VM left for another host");
                } else if r.stopping.is_none() {
                    let err = format!("csv-vmm exited ({status}): {}", log_tail(&r.log));
                    tracing::error!(vm = %name, error = %err, "VM failed");
                    failures.insert(name.clone(), (Instant::now(), err));
                } else {
                    tracing::info!(vm = %name, "VM stopped");
                }
                gone.push(name.clone());
            }
        }
        for n in gone {
            running.remove(&n);
        }
        // Stop what is no longer wanted here.
        for (name, r) in running.iter_mut() {
            if wanted.contains_key(name) || r.migrated || r.migration.is_some() {
                continue;
            }
            match r.stopping {
                None if r.incoming => {
                    // Nothing arrived (the migration was called off).
                    let _ = r.child.kill();
                    r.stopping = Some(Instant::now());
                }
                None => {
                    let _ = ask(&r.control, &serde_json::json!({"cmd": "stop"}));
                    r.stopping = Some(Instant::now());
                }
                Some(since) if since.elapsed() > Duration::from_secs(10) => {
                    tracing::warn!(vm = %name, "VM did not stop in 10 s: killing it");
                    let _ = r.child.kill();
                }
                Some(_) => {}
            }
        }
        // Start what is wanted and not running (a failed one after 5 s).
        for (name, w) in wanted {
            if let Some(r) = running.get_mut(name) {
                // An incoming VM that arrived runs here now.
                if !w.incoming {
                    r.incoming = false;
                }
                continue;
            }
            if let Some((at, _)) = failures.get(name) {
                if at.elapsed() < Duration::from_secs(5) {
                    continue;
                }
            }
            match self.spawn(name, &w.cfg, w.incoming) {
                Ok(r) => {
                    failures.remove(name);
                    running.insert(name.clone(), r);
                }
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "cannot start VM");
                    failures.insert(name.clone(), (Instant::now(), e));
                }
            }
        }
        failures.retain(|n, _| wanted.contains_key(n) || running.contains_key(n));
    }
}

/// A role this host should run (or receive).
#[derive(Debug, Clone)]
struct Wanted {
    cfg: VmConfig,
    /// The host that owns it now.
    owner: u64,
    /// It is migrating here: wait for it.
    incoming: bool,
}

impl VmSupervisor {
    /// Starts the migrations asked of this host's VMs, and records the
    /// outcome of finished ones in the registry.
    fn migrations(
        &self,
        info: &coordinator::proto::ClusterInfo,
        wanted: &BTreeMap<String, Wanted>,
        running: &mut BTreeMap<String, Running>,
        c: &mut Client,
    ) {
        let me = self.cfg.node;
        for (name, r) in running.iter_mut() {
            // Restored from a quick migration's state and running: the
            // registry stops asking for the restore, the file goes.
            if let Some(state) = r.restored_from.clone() {
                let up = ask(&r.control, &serde_json::json!({"cmd": "status"}))
                    .is_ok_and(|s| s["state"] == "running");
                let role = info.vms.iter().find(|v| &v.name == name);
                if let (true, Some(role)) = (up, role) {
                    if let Ok(mut cfg) = VmConfig::from_role(role) {
                        cfg.restore_from = None;
                        let role = coordinator::proto::VmRole {
                            name: name.clone(),
                            node: role.node,
                            config: cfg.to_bytes(),
                        };
                        if c.set_vm_role(role).is_ok() {
                            let _ = std::fs::remove_file(&state);
                            r.restored_from = None;
                        }
                    }
                }
            }
            // A finished migration: record where the VM is now.
            if r.migration.as_ref().is_some_and(|h| h.is_finished()) {
                let Some(h) = r.migration.take() else {
                    continue;
                };
                let outcome = h
                    .join()
                    .unwrap_or_else(|_| Err("the migration thread panicked".into()));
                let Some(role) = info.vms.iter().find(|v| &v.name == name) else {
                    continue;
                };
                let Ok(mut cfg) = VmConfig::from_role(role) else {
                    continue;
                };
                let to = cfg.migrate_to.take();
                let quick = std::mem::take(&mut cfg.migrate_quick);
                let node = match (&outcome, to) {
                    (Ok(summary), Some(t)) => {
                        r.migrated = true;
                        if quick {
                            cfg.restore_from = Some(cfg.state_path(name));
                        }
                        cfg.last_migration = Some(summary.clone());
                        tracing::info!(vm = %name, to = t, %summary, "VM migrated");
                        t
                    }
                    _ => {
                        let e = outcome
                            .as_ref()
                            .err()
                            .cloned()
                            .unwrap_or_else(|| "the role no longer names a target".into());
                        tracing::error!(vm = %name, error = %e, "migration failed; the VM stays here");
                        cfg.last_migration = Some(format!("failed: {e}"));
                        me
                    }
                };
                let role = coordinator::proto::VmRole {
                    name: name.clone(),
                    node,
                    config: cfg.to_bytes(),
                };
                if let Err(e) = c.set_vm_role(role) {
                    tracing::error!(vm = %name, error = %coordinator::client::describe(&e), "cannot record the migration");
                }
                continue;
            }
            // A migration asked for: send it once the target waits for it.
            let Some(w) = wanted.get(name) else { continue };
            let Some(to) = w.cfg.migrate_to else { continue };
            if w.incoming
                || w.owner != me
                || r.migration.is_some()
                || r.migrated
                || r.stopping.is_some()
            {
                continue;
            }
            // Quick: through a state file on the volume. Live: once the
            // target waits for it.
            let quick = w.cfg.migrate_quick;
            let dest = if quick {
                w.cfg
                    .path_on(&w.cfg.state_path(name), &self.cfg.mount_root)
                    .map(|p| p.display().to_string())
            } else {
                self.target_listen(info, to, name)
            };
            let Some(dest) = dest else { continue };
            let (dest, token) = match dest.split_once(' ') {
                Some((d, t)) => (d.to_string(), t.to_string()),
                None => (dest, String::new()),
            };
            let (control, disk, volume) = (r.control.clone(), r.disk.clone(), w.cfg.volume);
            let mut hc = self.client(Duration::from_secs(5));
            let vm = name.clone();
            tracing::info!(vm = %name, to, quick, %dest, "migration starts");
            let progress = r.progress.clone();
            if let Ok(mut p) = progress.lock() {
                *p = (serde_json::Value::Null, to);
            }
            r.migration = Some(std::thread::spawn(move || {
                if quick {
                    send_quick(&control, Path::new(&dest), &disk, volume, me, to, &mut hc)
                } else {
                    send_migration(
                        &control, &dest, &token, &disk, volume, me, to, &mut hc, &vm, &progress,
                    )
                }
            }));
        }
    }

    /// When this host leads the cluster group: the running roles of hosts
    /// the registry has down restart on the best-rated hosts that are up,
    /// high priority first. The dead host's lease on each disk is revoked
    /// first, so it cannot be handed a write again, and the placement of
    /// each VM counts the ones placed before it in the same pass.
    fn failover(&self, info: &coordinator::proto::ClusterInfo, c: &mut Client) {
        let me = self.cfg.node;
        // Down for a while, not for a moment: a host whose Raft messages
        // were late for a second (its disk busy behind a flush, its CPUs
        // saturated) still runs its VMs, and restarting them elsewhere
        // would have two copies write one disk until its lease ran out.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let grace = FAILOVER_GRACE.as_millis() as u64;
        let down: Vec<u64> = info
            .health
            .iter()
            .filter(|h| !h.up && now_ms.saturating_sub(h.since) >= grace)
            .map(|h| h.node)
            .collect();
        let mut orphans: Vec<(coordinator::proto::VmRole, VmConfig)> = info
            .vms
            .iter()
            .filter(|r| r.node != 0 && down.contains(&r.node))
            .filter_map(|r| VmConfig::from_role(r).ok().map(|c| (r.clone(), c)))
            .filter(|(_, c)| c.state == "running")
            .collect();
        if orphans.is_empty() {
            return;
        }
        // Only the host that leads the cluster group acts.
        let leads = self
            .cfg
            .endpoints
            .first()
            .is_some_and(|a| coordinator::client::leads_cluster(&self.cfg.identity, *a));
        if !leads {
            return;
        }
        orphans.sort_by_key(|(r, c)| (c.priority_rank(), r.name.clone()));
        let mut placed: BTreeMap<u64, (u32, u64)> = BTreeMap::new();
        for (role, mut cfg) in orphans {
            let dead = role.node;
            let Ok(mut loads) =
                coordinator::placement::cluster_loads(&self.cfg.identity, c, info, cfg.volume)
            else {
                continue;
            };
            for l in &mut loads {
                if let Some((vcpus, mem)) = placed.get(&l.node) {
                    l.vcpus += vcpus;
                    l.mem_available = l.mem_available.saturating_sub(*mem);
                }
            }
            // On an iSCSI volume the dead host is fenced off the LUN first
            // (the mounts on this host, the cluster leader, preempt its
            // key); past 10 s without it, the VM restarts anyway.
            let iscsi = info
                .volumes
                .iter()
                .any(|v| v.number == cfg.volume && v.lun.starts_with("iscsi://"));
            let fenced = self
                .fenced
                .read()
                .is_ok_and(|f| f.contains(&(cfg.volume, dead)));
            if iscsi && !fenced {
                let since = info
                    .health
                    .iter()
                    .find(|h| h.node == dead)
                    .map_or(0, |h| h.since);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                if now.saturating_sub(since) < 10_000 {
                    tracing::info!(vm = %role.name, dead, "failover: waiting for host {dead} to be fenced off Volume{}", cfg.volume);
                    continue;
                }
                tracing::error!(vm = %role.name, dead, "failover: host {dead} could not be fenced off Volume{} in 10 s; restarting the VM anyway", cfg.volume);
            }
            let needs = cfg.needs();
            let policy = coordinator::placement::Policy::default();
            let Some(to) = coordinator::placement::best(&loads, &needs, &policy) else {
                tracing::error!(vm = %role.name, dead, "failover: no host can run it");
                continue;
            };
            // Fence the dead host off the disk's lease.
            if let Some(disk) = cfg.disk_on(&self.cfg.mount_root) {
                use std::os::unix::fs::MetadataExt;
                if let Ok(m) = std::fs::metadata(&disk) {
                    let op = coordinator::proto::volume_op::Op::RevokeLease(
                        coordinator::proto::RevokeLeaseOp {
                            node: dead,
                            ino: m.ino(),
                            now: 0,
                            revoked: true,
                        },
                    );
                    if let Err(e) = c.volume_op(cfg.volume, op) {
                        tracing::warn!(vm = %role.name, error = %coordinator::client::describe(&e), "failover: revoking the dead host's lease");
                    }
                }
            }
            cfg.migrate_to = None;
            cfg.migrate_quick = false;
            cfg.restore_from = None;
            cfg.last_migration = Some(format!(
                "failover: host {dead} went down; restarted on host {to} (placed by host {me})"
            ));
            let new = coordinator::proto::VmRole {
                name: role.name.clone(),
                node: to,
                config: cfg.to_bytes(),
            };
            match c.set_vm_role(new) {
                Ok(()) => {
                    tracing::warn!(vm = %role.name, dead, to, "failover: VM restarts on another host");
                    let e = placed.entry(to).or_insert((0, 0));
                    e.0 += cfg.vcpus;
                    e.1 += cfg.memory;
                }
                Err(e) => {
                    tracing::error!(vm = %role.name, error = %coordinator::client::describe(&e), "failover: cannot place")
                }
            }
        }
    }

    /// Where host `to` waits for VM `name`, from its status: "ADDR TOKEN".
    fn target_listen(
        &self,
        info: &coordinator::proto::ClusterInfo,
        to: u64,
        name: &str,
    ) -> Option<String> {
        let node = info.nodes.iter().find(|n| n.id == to)?;
        let st = coordinator::client::host_status(&self.cfg.identity, node)?;
        st.vms
            .into_iter()
            .find(|v| v.name == name && v.state == "incoming" && !v.listen.is_empty())
            .map(|v| format!("{} {}", v.listen, v.listen_token))
    }
}

/// A quick migration: the VMM saves the VM to `state` (on the VM's volume)
/// and stops, closing the disk; the disk's write lease goes to `to`, whose
/// supervisor restores the VM from the file. Returns the save's summary.
fn send_quick(
    control: &Path,
    state: &Path,
    disk: &Path,
    volume: u64,
    from: u64,
    to: u64,
    c: &mut Client,
) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(disk)
        .map_err(|e| format!("{}: {e}", disk.display()))?
        .ino();
    if let Some(dir) = state.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let a = ask(
        control,
        &serde_json::json!({"cmd": "save", "path": state, "stop": true}),
    )?;
    if a["ok"] != true {
        return Err(a["error"].as_str().unwrap_or("save failed").to_string());
    }
    // The VMM exits and its host gives the lease back; hand it over now so
    // the target can open the disk at once. When the release got there
    // first, the lease is free anyway.
    let op = coordinator::proto::volume_op::Op::HandOver(coordinator::proto::HandOverOp {
        ino,
        from,
        to,
        now: 0,
        ttl: crate::fs::LEASE_TTL.as_millis() as u64,
    });
    if let Err(e) = c.volume_op(volume, op) {
        tracing::debug!(error = %coordinator::client::describe(&e), "lease hand-over after save");
    }
    Ok(a["summary"].to_string())
}

/// Sends a live migration through the VMM's control socket and moves the
/// disk's write lease to `to` at the switch-over (after the target has
/// acknowledged the state, before it resumes). Returns the VMM's summary.
#[allow(clippy::too_many_arguments)]
fn send_migration(
    control: &Path,
    listen: &str,
    token: &str,
    disk: &Path,
    volume: u64,
    from: u64,
    to: u64,
    c: &mut Client,
    name: &str,
    progress: &std::sync::Mutex<(serde_json::Value, u64)>,
) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(disk)
        .map_err(|e| format!("{}: {e}", disk.display()))?
        .ino();
    let req = serde_json::json!({"cmd": "migrate", "to": listen, "token": token, "confirm": true});
    let mut vmm = Control::send(control, &req, None)?;
    loop {
        let v = vmm
            .next()
            .map_err(|e| format!("during the migration: {e}"))?;
        match v.get("event").and_then(|e| e.as_str()) {
            Some("acked") => {
                // The switch-over: the disk's write lease goes to the target.
                let op =
                    coordinator::proto::volume_op::Op::HandOver(coordinator::proto::HandOverOp {
                        ino,
                        from,
                        to,
                        now: 0,
                        ttl: crate::fs::LEASE_TTL.as_millis() as u64,
                    });
                let answer = match c.volume_op(volume, op) {
                    Ok(_) => serde_json::json!({"cmd": "go"}),
                    Err(e) => {
                        tracing::error!(vm = name, error = %coordinator::client::describe(&e), "lease hand-over failed");
                        serde_json::json!({"cmd": "abort"})
                    }
                };
                vmm.reply(&answer)?;
            }
            Some("progress") => {
                if let Ok(mut p) = progress.lock() {
                    p.0 = v["progress"].clone();
                }
            }
            Some(_) => {}
            None => {
                return if v["ok"] == true {
                    Ok(v["summary"].to_string())
                } else {
                    Err(v["error"]
                        .as_str()
                        .unwrap_or("migration failed")
                        .to_string())
                };
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A supervisor that goes away takes its VMs with it.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
