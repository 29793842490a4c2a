//! The VM supervisor: runs the VM roles the cluster registry places on
//! this host, one engine process each, and reports how they are doing.
//!
//! Every half second it reads the registry. A role whose owner is this host
//! and whose state is `running` gets a VM from the engine, with its memory,
//! vCPUs and disk (the role's `/ClusterStorage/VolumeN/...` path under this
//! host's mount root). A VM whose role went elsewhere or was stopped is
//! asked to stop (its disk is flushed and closed) and killed if it does
//! not exit within 10 s. A VM that exits on its own is reported `failed`
//! with the tail of its log and started again after a pause. Each VM's
//! state, heartbeat and disk writes go into this host's status, where
//! `csvctl vm status` finds them.
//!
//! - [`engine`]: what an engine provides; [`csv_vmm`]: the `csv-vmm` one;
//! - [`role`]: a role's configuration; [`placement`]: how well each host
//!   suits a VM;
//! - [`migration`]: live and quick migrations with the disk's write lease
//!   handed over at switch-over;
//! - [`failover`]: the roles of a dead host restarted elsewhere.

pub mod csv_vmm;
pub mod engine;
pub mod failover;
pub mod migration;
pub mod placement;
pub mod qemu;
pub mod role;

use coordinator::client::Client;
use coordinator::proto::{VmRuntime, VmState};
use coordinator::wire::Identity;
use engine::{Engine, Instance, Start, VmHandle, VmSpec};
use migration::Migration;
use role::VmConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// (volume, host) pairs whose host this host fenced off the volume's LUN
/// while the registry has it down (a failover onto an iSCSI volume waits
/// for them).
pub type Fenced = Arc<RwLock<BTreeSet<(u64, u64)>>>;

/// What the supervisor needs.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// This host's node id.
    pub node: u64,
    /// Where this host mounts the volumes (`/ClusterStorage`).
    pub mount_root: PathBuf,
    /// Control sockets, serial logs and VMM logs.
    pub run_dir: PathBuf,
    /// The engine that runs the VMs.
    pub engine: Arc<dyn Engine>,
    /// Credentials for the coordinator service (a client's).
    pub identity: Identity,
    /// Where to reach it (this host first).
    pub endpoints: Vec<SocketAddr>,
    /// What this host fenced off (kept by the node daemon's volumes).
    pub fenced: Fenced,
    /// Where VM disks' bytes come from (csvd: the volumes' own I/O path).
    pub disks: Arc<dyn crate::disk::DiskSource>,
}

/// A VM running here, as others may act on it.
#[derive(Debug, Clone)]
pub struct RunningVm {
    /// Its disk as this host mounts it.
    pub disk: PathBuf,
    /// Its process.
    pub pid: u32,
    /// What can be asked of it.
    pub handle: Arc<dyn VmHandle>,
}

#[derive(Debug, Default)]
struct Shared {
    reports: RwLock<Vec<VmRuntime>>,
    running: RwLock<BTreeMap<String, RunningVm>>,
    run_dir: std::sync::OnceLock<PathBuf>,
}

/// What others see of the supervisor while it runs: its reports and its
/// VMs (the snapshot agent pauses those on a volume; a drill's crash
/// kills them all).
#[derive(Debug, Clone, Default)]
pub struct SupervisorView(Arc<Shared>);

impl SupervisorView {
    /// The VMs as this host reports them.
    pub fn reports(&self) -> Vec<VmRuntime> {
        self.0.reports.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// The VMs running here (not arriving, leaving or stopping).
    pub fn running(&self) -> BTreeMap<String, RunningVm> {
        self.0.running.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// Up to `max` bytes of VM `name`'s serial console from `offset` (its
    /// whole output since it started here, kept in the run directory):
    /// (the bytes, where they start, the output's length so far). An
    /// offset past the end reads from the last `max` bytes. `input`, if
    /// any, is typed on the console first.
    pub fn console(
        &self,
        name: &str,
        offset: u64,
        max: u32,
        input: &[u8],
    ) -> std::io::Result<(Vec<u8>, u64, u64)> {
        use std::io::{Read, Seek, SeekFrom};
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string());
        if !role::valid_name(name) {
            return Err(bad("no such VM"));
        }
        if !self.reports().iter().any(|r| r.name == name) {
            return Err(bad("the VM does not run on this host"));
        }
        let dir = self
            .0
            .run_dir
            .get()
            .ok_or_else(|| bad("no VM runs on this host"))?;
        if !input.is_empty() {
            let vm = self
                .running()
                .remove(name)
                .ok_or_else(|| bad("the VM does not run on this host"))?;
            vm.handle.console_input(input).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    coordinator::service::error_chain(&e),
                )
            })?;
        }
        let mut f = std::fs::File::open(dir.join(format!("{name}.serial")))?;
        let size = f.metadata()?.len();
        let max = u64::from(max.min(1 << 20));
        let from = if offset > size {
            size.saturating_sub(max)
        } else {
            offset
        };
        f.seek(SeekFrom::Start(from))?;
        let mut data = Vec::new();
        f.take(max).read_to_end(&mut data)?;
        Ok((data, from, size))
    }
}

/// Why a VM did not start here.
#[derive(Debug, thiserror::Error)]
enum SpawnError {
    /// A path of the role that is not on its volume.
    #[error("{what} {path:?} is not a path on Volume{volume}")]
    NotOnVolume {
        what: &'static str,
        path: String,
        volume: u64,
    },
    /// The disk is not there.
    #[error("disk {} does not exist on this host", .0.display())]
    NoDisk(PathBuf),
    /// No migration token.
    #[error("making a migration token")]
    Token(#[source] std::io::Error),
    /// The engine did not start it.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
}

/// A VM process of this host.
#[derive(Debug)]
struct Running {
    instance: Box<dyn Instance>,
    handle: Arc<dyn VmHandle>,
    stopping: Option<Instant>,
    /// Waiting for an incoming migration (no VM in the process yet).
    incoming: bool,
    /// The VM went to another host: the process exits by itself.
    migrated: bool,
    /// A migration this host is sending.
    migration: Option<Migration>,
    /// The disk's path on this host.
    disk: PathBuf,
    /// Started from this saved state (a quick migration's file), until the
    /// VM runs and the registry no longer asks for it.
    restored_from: Option<PathBuf>,
    /// An incoming VM's migration token (hex): the source opens with it.
    token: Option<String>,
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

/// A new migration token: 32 random bytes, as hex.
fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut t = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut t)?;
    Ok(t.iter().map(|b| format!("{b:02x}")).collect())
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

/// Runs this host's VM roles.
#[derive(Debug)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    view: SupervisorView,
}

impl Supervisor {
    /// A supervisor; [`Supervisor::run`] runs it.
    pub fn new(cfg: SupervisorConfig) -> Supervisor {
        let view = SupervisorView::default();
        let _ = view.0.run_dir.set(cfg.run_dir.clone());
        Supervisor { cfg, view }
    }

    /// What others see of it.
    pub fn view(&self) -> SupervisorView {
        self.view.clone()
    }

    /// A client of the coordinator service through this host.
    fn client(&self, timeout: Duration) -> Client {
        let mut c = Client::new(self.cfg.identity.clone(), self.cfg.endpoints.clone());
        c.timeout = timeout;
        c
    }

    fn spawn(&self, name: &str, vm: &VmConfig, incoming: bool) -> Result<Running, SpawnError> {
        let restore = match (&vm.restore_from, incoming) {
            (Some(p), false) => Some(vm.path_on(p, &self.cfg.mount_root).ok_or_else(|| {
                SpawnError::NotOnVolume {
                    what: "saved state",
                    path: p.clone(),
                    volume: vm.volume,
                }
            })?),
            _ => None,
        };
        let disk = vm
            .disk_on(&self.cfg.mount_root)
            .ok_or_else(|| SpawnError::NotOnVolume {
                what: "disk",
                path: vm.disk.clone(),
                volume: vm.volume,
            })?;
        if !disk.exists() {
            return Err(SpawnError::NoDisk(disk));
        }
        let mut token = None;
        let start = if incoming {
            let t = new_token().map_err(SpawnError::Token)?;
            token = Some(t.clone());
            // On this host's cluster address, a port of the kernel's
            // choice (the status reports it).
            let ip = self
                .cfg
                .endpoints
                .first()
                .map_or_else(|| std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip());
            Start::Incoming {
                listen: SocketAddr::new(ip, 0),
                token: t,
            }
        } else if let Some(state) = &restore {
            Start::Restore(state.clone())
        } else {
            Start::Boot
        };
        let root = &self.cfg.mount_root;
        let spec = VmSpec {
            name: name.to_string(),
            config: vm.clone(),
            disk: disk.clone(),
            kernel: vm.kernel.as_deref().map(|k| role::host_path(k, root)),
            initrd: vm.initrd.as_deref().map(|i| role::host_path(i, root)),
            run_dir: self.cfg.run_dir.clone(),
            start,
            disks: self.cfg.disks.clone(),
        };
        // The role may name its engine; otherwise the host's runs it.
        let engine = match vm.engine {
            Some(k) if k.label() != self.cfg.engine.name() => k.engine(None),
            _ => self.cfg.engine.clone(),
        };
        let instance = engine.start(&spec)?;
        Ok(Running {
            handle: instance.handle(),
            instance,
            stopping: None,
            incoming,
            migrated: false,
            migration: None,
            disk,
            restored_from: restore,
            token,
        })
    }

    fn report(r: &mut Running, name: &str) -> VmRuntime {
        let pid = r.instance.pid();
        let mut out = VmRuntime {
            name: name.to_string(),
            pid,
            state: if r.stopping.is_some() {
                VmState::Stopping
            } else {
                VmState::Starting
            } as i32,
            resident_peak: resident_peak(pid),
            ..Default::default()
        };
        if r.stopping.is_some() {
            return out;
        }
        let Ok(s) = r.handle.status() else {
            return out;
        };
        out.state = s.vm_state() as i32;
        out.listen = s.listen.clone().unwrap_or_default();
        if r.incoming {
            out.listen_token = r.token.clone().unwrap_or_default();
        }
        out.heartbeat_gaps = s.heartbeat.gaps;
        out.guest_errors = s.heartbeat.guest_errors;
        out.heartbeat_seq = s.heartbeat.seq;
        out.heartbeats = s.heartbeat.local_count;
        // The test guest counts its own disk writes; for a real guest the
        // disk's server counts the requests.
        out.disk_writes = s.guest.disk_writes.max(s.disk.map_or(0, |d| d.writes));
        out.disk_last_seq = s.guest.disk_last_seq;
        if let Some(m) = &r.migration {
            out.state = VmState::Migrating as i32;
            m.report(&mut out, s.mem_bytes);
        }
        out
    }

    /// Follows the registry until `stop` is set, then stops this host's VMs.
    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut c = self.client(Duration::from_secs(2));
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        let mut failures: BTreeMap<String, (Instant, String)> = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(info) = c.cluster_info() {
                let wanted = self.wanted(&info);
                self.converge(&wanted, &mut running, &mut failures);
                self.migrations(&info, &wanted, &mut running, &mut c);
                self.failover(&info, &mut c);
            }
            self.publish(&mut running, &failures);
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
            if let Some(m) = r.migration.take() {
                let _ = m.join();
            }
        }
        self.converge(&BTreeMap::new(), &mut running, &mut failures);
        let t = Instant::now();
        while !running.is_empty() && t.elapsed() < Duration::from_secs(12) {
            std::thread::sleep(Duration::from_millis(100));
            self.converge(&BTreeMap::new(), &mut running, &mut failures);
        }
    }

    /// The roles placed here, and those migrating here.
    fn wanted(&self, info: &coordinator::proto::ClusterInfo) -> BTreeMap<String, Wanted> {
        let me = self.cfg.node;
        info.vms
            .iter()
            .filter_map(|r| VmConfig::from_role(r).ok().map(|c| (r, c)))
            .filter(|(_, c)| c.is_running())
            .filter_map(|(r, c)| {
                let incoming = if r.node == me {
                    false
                } else if c.migrate_to == Some(me) && !c.migrate_quick {
                    true
                } else {
                    return None;
                };
                Some((
                    r.name.clone(),
                    Wanted {
                        cfg: c,
                        owner: r.node,
                        incoming,
                    },
                ))
            })
            .collect()
    }

    /// Makes this host's status and the running VMs visible.
    fn publish(
        &self,
        running: &mut BTreeMap<String, Running>,
        failures: &BTreeMap<String, (Instant, String)>,
    ) {
        let mut reports: Vec<VmRuntime> = running
            .iter_mut()
            .map(|(n, r)| Self::report(r, n))
            .collect();
        for (name, (_, err)) in failures {
            if !running.contains_key(name) {
                reports.push(VmRuntime {
                    name: name.clone(),
                    state: VmState::Failed as i32,
                    error: err.clone(),
                    ..Default::default()
                });
            }
        }
        if let Ok(mut r) = self.view.0.reports.write() {
            *r = reports;
        }
        if let Ok(mut v) = self.view.0.running.write() {
            *v = running
                .iter()
                .filter(|(_, r)| !r.incoming && !r.migrated && r.stopping.is_none())
                .map(|(n, r)| {
                    (
                        n.clone(),
                        RunningVm {
                            disk: r.disk.clone(),
                            pid: r.instance.pid(),
                            handle: r.handle.clone(),
                        },
                    )
                })
                .collect();
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
            if let Some(status) = r.instance.exited() {
                if r.migrated {
                    tracing::info!(vm = %name, "VM left for another host");
                } else if r.stopping.is_none() {
                    let err = format!("the VMM exited ({status}): {}", r.instance.log_tail());
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
                    r.instance.kill();
                    r.stopping = Some(Instant::now());
                }
                None => {
                    let _ = r.handle.stop();
                    r.stopping = Some(Instant::now());
                }
                Some(since) if since.elapsed() > Duration::from_secs(10) => {
                    tracing::warn!(vm = %name, "VM did not stop in 10 s: killing it");
                    r.instance.kill();
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
                    let e = coordinator::service::error_chain(&e);
                    tracing::error!(vm = %name, error = %e, "cannot start VM");
                    failures.insert(name.clone(), (Instant::now(), e));
                }
            }
        }
        failures.retain(|n, _| wanted.contains_key(n) || running.contains_key(n));
    }
}
