//! `CsvCluster`: several `csvd` hosts on one machine, as real processes.
//!
//! Each host is a `csvd` process with its own data directory and listen
//! addresses: on loopback with distinct ports, or inside a network
//! namespace of its own (see [`crate::netns`]). The fixture can kill a host
//! with SIGKILL (a crash: nothing is flushed or said goodbye) and start it
//! again on the same directory. Every process is killed on drop.

use crate::cmd::workspace_bin;
use anyhow::{bail, Context, Result};
use coordinator::client::{self, Client};
use coordinator::proto::NodeStatus;
use coordinator::wire::{Identity, Key};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One host of the cluster.
#[derive(Debug)]
pub struct Host {
    /// Node id.
    pub id: u64,
    /// Addresses it listens on.
    pub listen: Vec<SocketAddr>,
    /// Network namespace it runs in (None: this one).
    pub netns: Option<String>,
    /// Found the cluster (`--init`) on first start.
    pub founder: bool,
    /// Started as `csvd --config FILE` (set up by `csvctl cluster init` or
    /// `node join`) instead of with the fixture's flags.
    pub config: Option<PathBuf>,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// A cluster of `csvd` processes.
#[derive(Debug)]
pub struct CsvCluster {
    dir: tempfile::TempDir,
    key_file: PathBuf,
    key: Key,
    /// The hosts, in id order.
    pub hosts: Vec<Host>,
    /// Extra `csvd` arguments (e.g. `--snapshot-every`).
    pub extra_args: Vec<String>,
    /// Extra `csvd` arguments of one host (after `extra_args`).
    pub host_args: std::collections::BTreeMap<u64, Vec<String>>,
    /// Hosts mount the volumes (under `<dir>/host<id>/mnt`).
    pub mounts: bool,
}

/// The cluster name the fixture uses.
pub const CLUSTER: &str = "csvt";

impl CsvCluster {
    /// `n` hosts on loopback, started, with a volume on a LUN file of
    /// `size` bytes mounted on every one of them; the volume's number.
    pub fn mounted_loopback(n: usize, size: u64) -> Result<(CsvCluster, u64)> {
        let mut cl = CsvCluster::loopback(n)?;
        cl.mounts = true;
        cl.start_all()?;
        let v = cl.add_volume_file(size)?;
        cl.wait_mounted(v, Duration::from_secs(30))?;
        Ok((cl, v))
    }

    /// `n` founding hosts on loopback (not started).
    pub fn loopback(n: usize) -> Result<CsvCluster> {
        let mut specs = Vec::new();
        for i in 0..n {
            let port = crate::free_port()?;
            specs.push((
                i as u64 + 1,
                vec![SocketAddr::from(([127, 0, 0, 1], port))],
                None,
            ));
        }
        CsvCluster::new(specs)
    }

    /// Founding hosts with the given ids, addresses and namespaces.
    pub fn new(specs: Vec<(u64, Vec<SocketAddr>, Option<String>)>) -> Result<CsvCluster> {
        let dir = crate::temp_dir("csvd")?;
        let key = Key::generate()?;
        let key_file = dir.path().join("cluster.key");
        std::fs::write(&key_file, key.to_hex())?;
        let hosts = specs
            .into_iter()
            .map(|(id, listen, netns)| Host {
                id,
                dir: dir.path().join(format!("host{id}")),
                listen,
                netns,
                founder: true,
                config: None,
                child: None,
                starts: 0,
            })
            .collect();
        Ok(CsvCluster {
            dir,
            key_file,
            key,
            hosts,
            extra_args: Vec::new(),
            host_args: Default::default(),
            mounts: false,
        })
    }

    /// Adds a host that is not a founder (it waits to be added).
    pub fn add_host(&mut self, id: u64, listen: Vec<SocketAddr>, netns: Option<String>) {
        self.push_host(id, listen, netns, None);
    }

    /// Adds a host set up by `csvctl cluster init` or `node join`: it runs
    /// as `csvd --config FILE` (the file names its mount root; use
    /// [`CsvCluster::host_dir`]`/mnt` for [`CsvCluster::mountpoint`]).
    pub fn add_configured_host(
        &mut self,
        id: u64,
        listen: Vec<SocketAddr>,
        netns: Option<String>,
        config: PathBuf,
    ) {
        self.push_host(id, listen, netns, Some(config));
    }

    fn push_host(
        &mut self,
        id: u64,
        listen: Vec<SocketAddr>,
        netns: Option<String>,
        config: Option<PathBuf>,
    ) {
        self.hosts.push(Host {
            id,
            dir: self.dir.path().join(format!("host{id}")),
            listen,
            netns,
            founder: false,
            config,
            child: None,
            starts: 0,
        });
    }

    /// Host `id`'s directory (`<dir>/host<id>`).
    pub fn host_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("host{id}"))
    }

    /// Uses the cluster key in `path` (made by `csvctl cluster init`).
    pub fn use_key_file(&mut self, path: &Path) -> Result<()> {
        self.key = Key::load(path).map_err(anyhow::Error::msg)?;
        self.key_file = path.to_path_buf();
        Ok(())
    }

    /// The fixture's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The identity a client of this cluster uses.
    pub fn identity(&self) -> Identity {
        Identity {
            node: 0,
            cluster: CLUSTER.into(),
            key: self.key.clone(),
        }
    }

    /// Every founder's first address (a client's endpoints).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.hosts.iter().flat_map(|h| h.listen.clone()).collect()
    }

    /// A client of the cluster.
    pub fn client(&self) -> Client {
        Client::new(self.identity(), self.endpoints())
    }

    fn index(&self, id: u64) -> Result<usize> {
        self.hosts
            .iter()
            .position(|h| h.id == id)
            .with_context(|| format!("no host {id}"))
    }

    /// Starts every host.
    pub fn start_all(&mut self) -> Result<()> {
        let ids: Vec<u64> = self.hosts.iter().map(|h| h.id).collect();
        for id in ids {
            self.start(id)?;
        }
        Ok(())
    }

    /// Starts host `id` (again, after a kill: same directory).
    pub fn start(&mut self, id: u64) -> Result<()> {
        let i = self.index(id)?;
        let peers: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| h.founder)
            .map(|h| {
                let a: Vec<String> = h.listen.iter().map(|a| a.to_string()).collect();
                format!("{}={}", h.id, a.join(","))
            })
            .collect();
        let h = &mut self.hosts[i];
        if h.child.is_some() {
            bail!("host {id} is running");
        }
        let bin = workspace_bin("csvd");
        let mut cmd = match &h.netns {
            // Only the network namespace: `ip netns exec` would also give
            // csvd a mount namespace of its own, hiding its FUSE mounts
            // from the test.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg("--")
                    .arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if let Some(config) = &h.config {
            cmd.arg("--config").arg(config);
        } else {
            cmd.arg("--id")
                .arg(h.id.to_string())
                .arg("--data-dir")
                .arg(&h.dir)
                .args(["--cluster", CLUSTER])
                .arg("--key-file")
                .arg(&self.key_file);
            for a in &h.listen {
                cmd.arg("--listen").arg(a.to_string());
            }
            for p in &peers {
                cmd.arg("--peer").arg(p);
            }
            if h.founder {
                cmd.arg("--init");
            }
            if self.mounts {
                cmd.arg("--mount-root")
                    .arg(self.dir.path().join(format!("host{id}/mnt")));
            }
        }
        cmd.args(&self.extra_args);
        cmd.args(self.host_args.get(&id).into_iter().flatten());
        h.starts += 1;
        let out = self.dir.path().join(format!("host{id}.{}.out", h.starts));
        let err = self.dir.path().join(format!("host{id}.log"));
        let errf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&err)?;
        cmd.stdout(std::fs::File::create(&out)?)
            .stderr(errf)
            .stdin(Stdio::null())
            .env("RUST_LOG", "info");
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        h.child = Some(child);
        let ok = crate::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&out).is_ok_and(|s| s.contains("serving on"))
        });
        if ok.is_err() {
            let log = std::fs::read_to_string(&err).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "host {id} did not start; its log ends:\n{}",
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// Kills host `id` with SIGKILL (a crash). Its FUSE mounts, left
    /// without a server, are detached.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let i = self.index(id)?;
        if let Some(mut c) = self.hosts[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.detach_mounts(Some(id));
        Ok(())
    }

    /// Stops host `id` with SIGTERM (it unmounts and exits), SIGKILL after
    /// 10 s.
    pub fn stop(&mut self, id: u64) -> Result<()> {
        let i = self.index(id)?;
        if let Some(c) = self.hosts[i].child.take() {
            stop_child(c);
        }
        self.detach_mounts(Some(id));
        Ok(())
    }

    fn detach_mounts(&self, id: Option<u64>) {
        let root = match id {
            Some(id) => self.dir.path().join(format!("host{id}/")),
            None => self.dir.path().to_path_buf(),
        };
        let root = root.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        // Top first: a killed host's FUSE mount, then the read-only guard
        // csvd keeps under it (a tmpfs, which fusermount3 leaves alone).
        for m in mounts.lines().rev().filter_map(|l| l.split(' ').nth(1)) {
            if m.starts_with(&root) {
                let fuse = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(m)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !fuse {
                    let _ = Command::new("umount").arg("-l").arg(m).status();
                }
            }
        }
    }

    /// Where host `id` mounts VolumeN.
    pub fn mountpoint(&self, id: u64, vol: u64) -> PathBuf {
        self.dir.path().join(format!("host{id}/mnt/Volume{vol}"))
    }

    /// Makes a LUN file of `size` bytes and adds it as a volume with
    /// `csvctl volume add` (which formats it). Returns the volume number.
    pub fn add_volume_file(&self, size: u64) -> Result<u64> {
        let n = std::fs::read_dir(self.dir.path())?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("lun"))
            })
            .count() as u64
            + 1;
        let lun = self.dir.path().join(format!("lun{n}.img"));
        let out = self
            .csvctl()
            .args(["volume", "add"])
            .arg(&lun)
            .args(["--number", &n.to_string(), "--size", &size.to_string()])
            .output()?;
        if !out.status.success() {
            bail!(
                "csvctl volume add: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(n)
    }

    /// Adds the LUN at `url` (an iSCSI URL) as VolumeN with `csvctl volume
    /// add`, which formats it.
    pub fn add_volume_url(&self, url: &str, number: u64) -> Result<()> {
        let out = self
            .csvctl()
            .args([
                "volume",
                "add",
                url,
                "--number",
                &number.to_string(),
                "--force",
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "csvctl volume add {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `csvctl` set up to reach this cluster (endpoints, key, name).
    pub fn csvctl(&self) -> Command {
        let mut c = Command::new(workspace_bin("csvctl"));
        let eps: Vec<String> = self.endpoints().iter().map(|a| a.to_string()).collect();
        c.env("CSV_ENDPOINTS", eps.join(","))
            .env("CSV_KEY_FILE", &self.key_file)
            .env("CSV_CLUSTER", CLUSTER);
        c
    }

    /// How host `id` reports reaching VolumeN: its state (`Direct`,
    /// `BlockRedirected`, ...) and the reason; None when it cannot be asked
    /// or does not know the volume.
    pub fn volume_state(&self, id: u64, vol: u64) -> Option<(String, String)> {
        self.status(id)
            .ok()?
            .volumes
            .into_iter()
            .find(|v| v.number == vol)
            .map(|v| {
                (
                    coordinator::proto::label::<coordinator::proto::IoMode>(v.state).to_string(),
                    v.reason,
                )
            })
    }

    /// Waits until every running host reports VolumeN mounted (Direct).
    pub fn wait_mounted(&self, vol: u64, within: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            let all = self.hosts.iter().filter(|h| h.child.is_some()).all(|h| {
                self.volume_state(h.id, vol)
                    .is_some_and(|(s, _)| s == "Direct")
            });
            if all {
                return Ok(());
            }
            if t.elapsed() > within {
                let st: Vec<String> = self
                    .hosts
                    .iter()
                    .map(|h| format!("host {}: {:?}", h.id, self.status(h.id).map(|s| s.volumes)))
                    .collect();
                bail!("Volume{vol} not mounted everywhere after {within:?}: {st:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether host `id` runs.
    pub fn running(&self, id: u64) -> bool {
        self.index(id).is_ok_and(|i| self.hosts[i].child.is_some())
    }

    /// Host `id`'s csvd process id, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        let i = self.index(id).ok()?;
        self.hosts[i].child.as_ref().map(|c| c.id())
    }

    /// Host `id`'s status (asked of it directly).
    pub fn status(&self, id: u64) -> Result<NodeStatus> {
        let i = self.index(id)?;
        let a = *self.hosts[i]
            .listen
            .first()
            .context("host has no address")?;
        client::node_status(&self.identity(), a, Duration::from_secs(1))
            .map_err(|e| anyhow::anyhow!("host {id}: {e}"))
    }

    /// The leader of `group` that a running host reports as itself, with
    /// the highest term (None: no leader now).
    pub fn leader_of(&self, group: u64) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for h in self.hosts.iter().filter(|h| h.child.is_some()) {
            if let Ok(s) = self.status(h.id) {
                for g in s.groups.iter().filter(|g| g.group == group) {
                    if g.role() == coordinator::proto::RaftRole::Leader
                        && best.is_none_or(|(t, _)| g.term > t)
                    {
                        best = Some((g.term, h.id));
                    }
                }
            }
        }
        best.map(|(_, id)| id)
    }

    /// Waits until `group` has a leader; returns it.
    pub fn wait_leader(&self, group: u64, within: Duration) -> Result<u64> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(l) = self.leader_of(group) {
                return Ok(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("group {group} has no leader after {within:?}")
    }

    /// The last lines of host `id`'s log (for failure messages).
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let s = std::fs::read_to_string(self.dir.path().join(format!("host{id}.log")))
            .unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

/// SIGTERM, then SIGKILL if the process is still there after 10 s.
fn stop_child(mut c: Child) {
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for CsvCluster {
    fn drop(&mut self) {
        let children: Vec<Child> = self
            .hosts
            .iter_mut()
            .filter_map(|h| h.child.take())
            .collect();
        // Stop them in parallel: each unmounts its volumes.
        std::thread::scope(|s| {
            for c in children {
                s.spawn(move || stop_child(c));
            }
        });
        self.detach_mounts(None);
    }
}
