//! The volumes of this host: every volume of the cluster mounted, and
//! removed ones unmounted, as the cluster registry says; fencing by
//! persistent reservation on the volumes reached over iSCSI; and how
//! this host reaches each volume (served in its status, and by `csvctl
//! volume status`).
//!
//! Once a second it reads the registry (through this host), then:
//! mounts what is new, unmounts what went, checks this host's own
//! reservation keys, has the cluster leader fence hosts the registry has
//! down, points redirected I/O at each volume's coordinator first, and
//! closes files it opened for FileSystemRedirected hosts that are down.

use coordinator::client::Client;
use coordinator::proto::{ClusterInfo, IoMode, VolumeInfo, VolumeState};
use csv_fs::lun::{san, RedirectingLun};
use csv_fs::mount::{MountConfig, UpRead, VolumeError, VolumeMount};
use csv_fs::volume::{VolumeFile, VolumeFs};
use hypervisor_shim::disk::{DiskIo, DiskSource, LocalFiles};
use hypervisor_shim::supervisor::Fenced;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A volume mounted on this host, as its services see it.
#[derive(Debug, Clone)]
pub struct HostVolume {
    /// Its filesystem.
    pub fs: Arc<VolumeFs>,
    /// Its LUN as this host reaches it.
    pub lun: Arc<RedirectingLun>,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
}

/// The volumes mounted on this host, by number.
pub type HostVolumes = Arc<RwLock<BTreeMap<u64, HostVolume>>>;

/// What the volumes share with the rest of the host.
#[derive(Debug, Clone, Default)]
pub struct VolumesView {
    /// What is mounted.
    pub mounted: HostVolumes,
    /// How this host reaches each volume.
    pub states: Arc<RwLock<Vec<VolumeState>>>,
    /// Each volume's LUN as this host reaches it (URL or path): what
    /// `csvctl validate` probes.
    pub paths: Arc<RwLock<BTreeMap<u64, String>>>,
    /// (volume, host) pairs fenced off while the host is down.
    pub fenced: Fenced,
}

impl VolumesView {
    /// The volume mounted as N, if it is.
    pub fn get(&self, n: u64) -> Option<HostVolume> {
        self.mounted.read().ok()?.get(&n).cloned()
    }

    /// Every mounted volume.
    pub fn all(&self) -> Vec<(u64, HostVolume)> {
        self.mounted
            .read()
            .map(|m| m.iter().map(|(n, v)| (*n, v.clone())).collect())
            .unwrap_or_default()
    }
}

/// VM disks on this host's volumes, opened through each volume's own I/O
/// path ([`VolumeFile`]: the file's lease and extent map, straight to the
/// LUN or through a peer) rather than through the FUSE mount; a disk
/// outside the volumes is a plain file.
#[derive(Debug, Clone)]
pub struct VolumeDisks {
    /// What is mounted.
    pub mounted: HostVolumes,
}

impl VolumeDisks {
    /// The volume `path` is on, and the path inside it.
    fn on_volume(&self, path: &Path) -> Option<(HostVolume, PathBuf)> {
        let m = self.mounted.read().ok()?;
        m.values().find_map(|v| {
            path.strip_prefix(&v.mountpoint)
                .ok()
                .map(|rel| (v.clone(), rel.to_path_buf()))
        })
    }
}

impl DiskSource for VolumeDisks {
    fn open(&self, path: &Path, write: bool) -> std::io::Result<DiskIo> {
        match self.on_volume(path) {
            Some((v, rel)) => Ok(Arc::new(VolumeFile::open(&v.fs, &rel, write)?)),
            None => LocalFiles.open(path, write),
        }
    }

    fn kind(&self, path: &Path) -> &'static str {
        if self.on_volume(path).is_some() {
            "volume"
        } else {
            "file"
        }
    }
}

/// Follows the registry's volumes.
#[derive(Debug)]
pub struct Volumes {
    cfg: MountConfig,
    /// This host's own LUN paths, when they differ from the registry's.
    luns: BTreeMap<u64, PathBuf>,
    view: VolumesView,
    active: BTreeMap<u64, VolumeMount>,
    failed: BTreeMap<u64, String>,
    /// (volume, host) pairs this host fenced off while the host is down.
    fenced_done: BTreeSet<(u64, u64)>,
    /// When this host last checked its own registrations.
    checked: Instant,
    /// When the latest registry read that had this host up started.
    up_read: UpRead,
}

/// Why a FileSystemRedirected host is so, and where its file I/O goes.
fn fs_redirect_reason(fs: &VolumeFs, path: &str) -> String {
    let Some(r) = fs.fs_redirector() else {
        return String::new();
    };
    let ops = r.ops.load(Ordering::Relaxed);
    match r.target() {
        None => "forced by the operator; finding the coordinator".to_string(),
        Some(t) if t.is_empty() => format!(
            "forced by the operator; this host coordinates the volume, so its file I/O stays here ({path})"
        ),
        Some(t) => format!(
            "forced by the operator: file I/O done by the coordinator at {} ({ops} operations so far; files open before stay on their path until closed)",
            t.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

impl Volumes {
    /// This host's volumes, mounted under `cfg.root`.
    pub fn new(cfg: MountConfig, luns: BTreeMap<u64, PathBuf>, view: VolumesView) -> Volumes {
        Volumes {
            cfg,
            luns,
            view,
            active: BTreeMap::new(),
            failed: BTreeMap::new(),
            fenced_done: BTreeSet::new(),
            checked: Instant::now(),
            up_read: UpRead::default(),
        }
    }

    /// Fencing by persistent reservation on the volumes this host reaches
    /// over iSCSI: checks that it is still registered (a host fenced while
    /// it was cut off registers again only once the registry, read with
    /// quorum, has it up: it rejoined), and, on the host leading the
    /// cluster group, preempts the keys of hosts the registry has down.
    fn fence(&mut self, info: &ClusterInfo, read_started: Instant) {
        let me = self.cfg.node;
        let key = san::pr_key(me);
        let iscsi: Vec<(u64, Arc<RedirectingLun>)> = self
            .active
            .iter()
            .filter(|(_, a)| a.lun.san_lun().is_some())
            .map(|(n, a)| (*n, a.lun.clone()))
            .collect();
        if iscsi.is_empty() || self.cfg.san.node == 0 {
            return;
        }
        let up = |n: u64| {
            info.health
                .iter()
                .find(|h| h.node == n)
                .is_none_or(|h| h.up)
        };
        // A host registers again only on a registry read that started
        // after it found its key gone (or the LUN refused it): a key the
        // cluster leader preempted was preempted after the registry had
        // the host down, so such a read says "down" unless the host is
        // back in the cluster.
        for (vol, rl) in &iscsi {
            let Some(since) = rl.fenced_since() else {
                continue;
            };
            if since >= read_started || !up(me) {
                continue;
            }
            let Some(l) = rl.san_lun() else { continue };
            match san::pr_register(&l, key) {
                Ok(()) => {
                    rl.set_fenced(false);
                    tracing::warn!("Volume{vol}: the LUN had lost this host's registration (fenced, or a new session); the registry has the host up, so it registered again");
                }
                Err(e) => tracing::error!(
                    "Volume{vol}: registering again: {}",
                    coordinator::service::error_chain(&e)
                ),
            }
        }
        if self.checked.elapsed() >= Duration::from_secs(1) {
            self.checked = Instant::now();
            for (vol, rl) in &iscsi {
                if rl.is_fenced() {
                    continue;
                }
                let Some(l) = rl.san_lun() else { continue };
                match san::pr_registered(&l, key) {
                    Ok(true) => {}
                    Ok(false) => rl.set_fenced(true),
                    Err(e) => tracing::debug!(
                        "Volume{vol}: reading the registrations: {}",
                        coordinator::service::error_chain(&e)
                    ),
                }
            }
        }
        let down: Vec<u64> = info
            .health
            .iter()
            .filter(|h| !h.up && h.node != me)
            .map(|h| h.node)
            .collect();
        self.fenced_done.retain(|(_, n)| down.contains(n));
        if let Ok(mut f) = self.view.fenced.write() {
            f.retain(|(_, n)| down.contains(n));
        }
        let all_done = down.iter().all(|d| {
            iscsi
                .iter()
                .all(|(v, _)| self.fenced_done.contains(&(*v, *d)))
        });
        if all_done {
            return;
        }
        let leads = self
            .cfg
            .endpoints
            .first()
            .is_some_and(|a| coordinator::client::leads_cluster(&self.cfg.identity, *a));
        if !leads {
            return;
        }
        self.fence_down_hosts(&down, &iscsi, key);
        if let Ok(mut f) = self.view.fenced.write() {
            *f = self.fenced_done.clone();
        }
    }

    fn fence_down_hosts(&mut self, down: &[u64], iscsi: &[(u64, Arc<RedirectingLun>)], key: u64) {
        for &d in down {
            for (vol, rl) in iscsi {
                if self.fenced_done.contains(&(*vol, d)) {
                    continue;
                }
                let Some(l) = rl.san_lun() else { continue };
                match san::pr_preempt_node(&l, key, d) {
                    Ok(gone) if !gone.is_empty() => tracing::warn!("Volume{vol}: host {d} is down: fenced off the LUN (its reservation keys {gone:x?} preempted)"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(
                            "Volume{vol}: fencing host {d}: {}",
                            coordinator::service::error_chain(&e)
                        );
                        continue;
                    }
                }
                self.fenced_done.insert((*vol, d));
            }
        }
    }

    /// The notice a volume's LUN gives when its I/O switches paths:
    /// `volume status` shows it at once, not at the next sync.
    fn notify(&self, own: String) -> csv_fs::lun::Notify {
        let states = self.view.states.clone();
        Box::new(move |vol, why| {
            if let Ok(mut st) = states.write() {
                for s in st.iter_mut().filter(|s| s.number == vol) {
                    match &why {
                        Some(w) => {
                            s.state = IoMode::BlockRedirected as i32;
                            s.reason = format!("I/O through a peer: {w} (own path: {own})");
                        }
                        None => {
                            s.state = IoMode::Direct as i32;
                            s.reason = own.clone();
                        }
                    }
                }
            }
        })
    }

    fn mount(&mut self, v: &VolumeInfo) -> Result<(), VolumeError> {
        let lun_file = self.luns.get(&v.number).cloned();
        let spec = lun_file
            .as_ref()
            .map_or_else(|| v.lun.clone(), |p| p.display().to_string());
        if let Ok(mut p) = self.view.paths.write() {
            p.insert(v.number, spec.clone());
        }
        let notify = |own: &str| self.notify(own.to_string());
        let m = VolumeMount::mount(
            &self.cfg,
            v,
            lun_file.as_deref(),
            self.up_read.clone(),
            notify,
        )?;
        if let Ok(mut mounted) = self.view.mounted.write() {
            mounted.insert(
                v.number,
                HostVolume {
                    fs: m.fs.clone(),
                    lun: m.lun.clone(),
                    mountpoint: m.mountpoint.clone(),
                },
            );
        }
        self.active.insert(v.number, m);
        Ok(())
    }

    fn unmount(&mut self, n: u64) {
        if let Ok(mut m) = self.view.mounted.write() {
            m.remove(&n);
        }
        if let Ok(mut p) = self.view.paths.write() {
            p.remove(&n);
        }
        if let Some(m) = self.active.remove(&n) {
            m.unmount();
        }
    }

    /// Brings the mounts in line with the registry.
    pub fn sync(&mut self, volumes: &[VolumeInfo]) {
        let wanted: BTreeMap<u64, &VolumeInfo> = volumes.iter().map(|v| (v.number, v)).collect();
        let gone: Vec<u64> = self
            .active
            .keys()
            .filter(|n| !wanted.contains_key(n))
            .copied()
            .collect();
        for n in gone {
            self.unmount(n);
        }
        self.failed.retain(|n, _| wanted.contains_key(n));
        for (n, v) in &wanted {
            if self.active.contains_key(n) {
                continue;
            }
            match self.mount(v) {
                Ok(()) => {
                    self.failed.remove(n);
                }
                Err(e) => {
                    // Kept as text: the host's status reports it.
                    let e = coordinator::service::error_chain(&e);
                    if self.failed.get(n) != Some(&e) {
                        tracing::error!("Volume{n} not mounted: {e}");
                    }
                    self.failed.insert(*n, e);
                }
            }
        }
        let states = wanted.keys().map(|n| self.state(*n)).collect();
        if let Ok(mut s) = self.view.states.write() {
            *s = states;
        }
    }

    /// How this host reaches VolumeN, and why.
    fn state(&self, n: u64) -> VolumeState {
        let mp = self.cfg.mountpoint(n).display().to_string();
        let (state, reason) = match (self.active.get(&n), self.failed.get(&n)) {
            (Some(a), _) if a.lun.is_fenced() => (
                IoMode::Fenced,
                format!(
                    "the LUN refuses this host's writes (its reservation key was preempted while the cluster had it down); it registers again once it has rejoined ({})",
                    a.path
                ),
            ),
            (Some(a), _) if a.fs.fs_redirector().is_some() => (
                IoMode::FileSystemRedirected,
                fs_redirect_reason(&a.fs, &a.path),
            ),
            (Some(a), _) if a.lun.is_redirected() => (
                IoMode::BlockRedirected,
                format!(
                    "I/O through a peer: {} ({} requests so far{}; own path: {})",
                    a.lun.redirect_reason().unwrap_or_default(),
                    a.lun.redirected_ops(),
                    a.lun
                        .last_peer()
                        .map(|p| format!(", last served by {p}"))
                        .unwrap_or_default(),
                    a.path
                ),
            ),
            (Some(a), _) => (IoMode::Direct, a.path.clone()),
            (None, Some(e)) => (IoMode::Unmounted, e.clone()),
            (None, None) => (IoMode::Unmounted, "not mounted yet".to_string()),
        };
        let io = self
            .active
            .get(&n)
            .map(|a| a.lun.io_counters())
            .unwrap_or_default();
        VolumeState {
            number: n,
            state: state as i32,
            reason,
            mountpoint: mp,
            direct_read: io.direct_read,
            direct_written: io.direct_written,
            redirected_read: io.redirected_read,
            redirected_written: io.redirected_written,
            redirect_events: io.switches,
            fenced_events: io.fences,
            async_bytes: io.async_bytes,
        }
    }

    /// Points each volume's redirected I/O at its coordinator first (the
    /// leader of its Raft group, as this host's replica knows it).
    fn prefer_coordinators(&self, info: &ClusterInfo) {
        let Some(own) = self.cfg.endpoints.first() else {
            return;
        };
        let Ok(st) =
            coordinator::client::node_status(&self.cfg.identity, *own, Duration::from_millis(500))
        else {
            return;
        };
        for (n, a) in &self.active {
            let leader = st
                .groups
                .iter()
                .find(|g| g.group == *n)
                .map_or(0, |g| g.leader);
            let addrs = if leader == 0 || leader == self.cfg.node {
                vec![]
            } else {
                info.nodes
                    .iter()
                    .find(|x| x.id == leader)
                    .map(|x| coordinator::node::resolve(&x.addrs))
                    .unwrap_or_default()
            };
            if let Some(r) = a.fs.fs_redirector() {
                r.set_target(addrs.clone());
            }
            a.lun.set_preferred(addrs);
        }
    }

    /// One round with the registry as read.
    fn round(&mut self, info: &ClusterInfo, read_started: Instant) {
        let me = self.cfg.node;
        if info
            .health
            .iter()
            .find(|h| h.node == me)
            .is_none_or(|h| h.up)
        {
            if let Ok(mut u) = self.up_read.lock() {
                *u = Some(read_started);
            }
        }
        self.sync(&info.volumes);
        self.fence(info, read_started);
        self.prefer_coordinators(info);
        // Files opened here for a FileSystemRedirected host that the
        // cluster has down are closed.
        for h in info.health.iter().filter(|h| !h.up) {
            for (n, a) in &self.active {
                let k = a.fs.release_served_for(h.node);
                if k > 0 {
                    tracing::warn!(
                        "Volume{n}: closed {k} file(s) opened for host {}, which is down",
                        h.node
                    );
                }
            }
        }
    }

    /// Follows the registry until `stop` is set, then unmounts everything.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut c = Client::new(self.cfg.identity.clone(), self.cfg.endpoints.clone());
        c.timeout = Duration::from_secs(2);
        while !stop.load(Ordering::Relaxed) {
            let read_started = Instant::now();
            match c.cluster_info() {
                Ok(info) => self.round(&info, read_started),
                Err(e) => tracing::debug!("cluster registry not readable yet: {e}"),
            }
            for _ in 0..10 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let all: Vec<u64> = self.active.keys().copied().collect();
        for n in all {
            self.unmount(n);
        }
    }
}
