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
}

/// Runs this host's VM roles until `stop`, then stops them all.
#[derive(Debug)]
pub struct VmSupervisor {
    cfg: VmHostConfig,
    reports: VmStates,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("pid", &self.child.id())
            .finish()
    }
}

/// One JSON-lines request to a csv-vmm control socket.
fn ask(control: &Path, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    let conn = UnixStream::connect(control).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    writeln!(w, "{req}").map_err(|e| e.to_string())?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the VMM closed its control socket".into());
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

impl VmSupervisor {
    pub fn new(cfg: VmHostConfig, reports: VmStates) -> Self {
        VmSupervisor { cfg, reports }
    }

    fn spawn(&self, name: &str, vm: &VmConfig) -> Result<Running, String> {
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
        let child = Command::new(&self.cfg.vmm)
            .args([
                "run",
                "--memory",
                &vm.memory.to_string(),
                "--vcpus",
                &vm.vcpus.to_string(),
            ])
            .args(["--dirty-rate", &vm.dirty_rate.to_string()])
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
        tracing::info!(vm = name, pid = child.id(), disk = %disk.display(), "VM started");
        Ok(Running {
            child,
            control,
            log,
            stopping: None,
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
            ..Default::default()
        };
        if r.stopping.is_none() {
            if let Ok(s) = ask(&r.control, &serde_json::json!({"cmd": "status"})) {
                let hb = &s["heartbeat"];
                out.state = s["state"].as_str().unwrap_or("unknown").to_string();
                out.heartbeat_seq = hb["seq"].as_u64().unwrap_or(0);
                out.heartbeats = hb["local_count"].as_u64().unwrap_or(0);
                out.disk_writes = s["guest"]["disk_writes"].as_u64().unwrap_or(0);
            }
        }
        out
    }

    /// Follows the registry until `stop` is set, then stops this host's VMs.
    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut c = Client::new(self.cfg.identity.clone(), self.cfg.endpoints.clone());
        c.timeout = Duration::from_secs(2);
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        let mut failures: BTreeMap<String, (Instant, String)> = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            let wanted: Option<BTreeMap<String, VmConfig>> = c.cluster_info().ok().map(|info| {
                info.vms
                    .iter()
                    .filter(|r| r.node == self.cfg.node)
                    .filter_map(|r| VmConfig::from_role(r).ok().map(|c| (r.name.clone(), c)))
                    .filter(|(_, c)| c.state == "running")
                    .collect()
            });
            if let Some(wanted) = wanted {
                self.converge(&wanted, &mut running, &mut failures);
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
            for _ in 0..5 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Shutting down: every VM stops (flushing its disk) before the
        // volumes are unmounted.
        self.converge(&BTreeMap::new(), &mut running, &mut failures);
        let t = Instant::now();
        while !running.is_empty() && t.elapsed() < Duration::from_secs(12) {
            std::thread::sleep(Duration::from_millis(100));
            self.converge(&BTreeMap::new(), &mut running, &mut failures);
        }
    }

    fn converge(
        &self,
        wanted: &BTreeMap<String, VmConfig>,
        running: &mut BTreeMap<String, Running>,
        failures: &mut BTreeMap<String, (Instant, String)>,
    ) {
        // Reap what exited.
        let mut gone = Vec::new();
        for (name, r) in running.iter_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                if r.stopping.is_none() {
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
            if wanted.contains_key(name) {
                continue;
            }
            match r.stopping {
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
        for (name, vm) in wanted {
            if running.contains_key(name) {
                continue;
            }
            if let Some((at, _)) = failures.get(name) {
                if at.elapsed() < Duration::from_secs(5) {
                    continue;
                }
            }
            match self.spawn(name, vm) {
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

impl Drop for Running {
    fn drop(&mut self) {
        // A supervisor that goes away takes its VMs with it.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
