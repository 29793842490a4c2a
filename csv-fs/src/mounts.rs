//! Mounts every volume of the cluster on this host, and unmounts removed
//! ones, as the cluster registry says; records how this host reaches each
//! volume (served by the status RPC and `csvctl volume status`).

use crate::fs::{ClientPool, Mounted, VolumeFs};
use crate::superblock::Superblock;
use coordinator::client::Client;
use coordinator::node::VolumeStates;
use coordinator::proto::{VolumeInfo, VolumeState};
use coordinator::wire::Identity;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where and how this host mounts volumes.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// This host's node id (the lease holder).
    pub node: u64,
    /// Directory under which `VolumeN` are mounted.
    pub root: PathBuf,
    /// LUN paths on this host by volume number (when they differ from the
    /// path in the registry).
    pub luns: BTreeMap<u64, PathBuf>,
    /// Credentials for the coordinator service.
    pub identity: Identity,
    /// Where to reach it (this host first).
    pub endpoints: Vec<SocketAddr>,
    /// FUSE worker threads per volume.
    pub threads: usize,
    /// Of those, how many read the kernel's requests at a time.
    pub readers: usize,
    /// This host on the SAN (for volumes on iSCSI LUNs).
    pub san: crate::san::SanIdentity,
    /// The other hosts' addresses (redirected I/O goes there).
    pub peers: Vec<SocketAddr>,
}

struct Active {
    session: Option<fuser::BackgroundSession>,
    fs: Arc<VolumeFs>,
    /// How this host reaches the LUN.
    path: String,
    lun: Arc<crate::redirect::RedirectingLun>,
}

/// The mounts of this host.
pub struct Mounts {
    cfg: MountConfig,
    served: Arc<crate::redirect::Served>,
    active: BTreeMap<u64, Active>,
    states: VolumeStates,
    failed: BTreeMap<u64, String>,
    /// (volume, host) pairs this host fenced off while the host is down.
    fenced_done: std::collections::BTreeSet<(u64, u64)>,
    /// When this host last checked its own registrations.
    checked: std::time::Instant,
    /// When the latest registry read that had this host up started: a
    /// reopened SAN path registers again only after such a read (see
    /// `mount`'s reopen).
    up_read: Arc<Mutex<Option<std::time::Instant>>>,
}

impl std::fmt::Debug for Mounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounts")
            .field("active", &self.active.keys())
            .finish()
    }
}

/// Why a FileSystemRedirected host is so, and where its file I/O goes.
fn fs_redirect_reason(fs: &crate::fs::VolumeFs, path: &str) -> String {
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

/// The source and type of each file system mounted at `p`, bottom first
/// (from `/proc/self/mounts`, whose paths escape blanks as `\040`).
fn mounts_at(p: &Path) -> Vec<(String, String)> {
    let want = p.display().to_string();
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (src, at, kind) = (f.next()?, f.next()?, f.next()?);
            (unescape(at) == want).then(|| (src.to_string(), kind.to_string()))
        })
        .collect()
}

/// The source name of the guard under each mounted volume.
const GUARD: &str = "csv-guard";

/// Lazily unmounts the FUSE file systems on top of `p` (left by a csvd
/// that was killed); quiet when there are none. A guard under them stays.
pub fn clear_stale_mount(p: &Path) {
    for _ in 0..8 {
        match mounts_at(p).last() {
            Some((src, kind)) if kind.starts_with("fuse") && src != GUARD => {}
            _ => return,
        }
        if nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).is_err() {
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(p)
                .status();
        }
    }
}

/// Makes `p` ready for a volume's FUSE mount: what a killed csvd left
/// there detached, the directory made, and a guard mounted on it first.
/// When csvd dies, the kernel keeps its FUSE mount (every call fails with
/// ENOTCONN) until the next csvd detaches it to mount again; without the
/// guard, the bare directory would be there in between: an application
/// writing to `VolumeN/...` would write to the host's root file system,
/// be told it succeeded, and the next mount would hide it; one reading
/// would be told the file does not exist. The guard is a FUSE mount whose
/// connection is closed at once, so under it every call fails with
/// ENOTCONN, just as under the dead mount. It goes when the volume is
/// unmounted in order.
fn prepare_mountpoint(p: &Path) -> Result<(), String> {
    clear_stale_mount(p);
    // (Under the guard, the directory answers nothing, not even stat.)
    if mounts_at(p).last().is_some_and(|(src, _)| src == GUARD) {
        return Ok(());
    }
    std::fs::create_dir_all(p).map_err(|e| format!("create {}: {e}", p.display()))?;
    if let Err(e) = mount_guard(p) {
        tracing::warn!(
            "{}: no guard under the volume's mount ({e}): while csvd is down, writes there would go to the local disk",
            p.display()
        );
    }
    Ok(())
}

/// Mounts a FUSE file system named `source` of type `fuse.<subtype>` at
/// `p` and gives the connection's device.
fn fuse_mount(
    p: &Path,
    source: &str,
    subtype: &str,
    opts: &str,
    flags: nix::mount::MsFlags,
) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("/dev/fuse: {e}"))?;
    let opts = format!(
        "fd={},user_id={},group_id={},allow_other,{opts}",
        dev.as_raw_fd(),
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    let flags = flags | nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
    nix::mount::mount(
        Some(source),
        p,
        Some(format!("fuse.{subtype}").as_str()),
        flags,
        Some(opts.as_str()),
    )
    .map_err(|e| e.to_string())?;
    Ok(dev.into())
}

/// Mounts VolumeN's file system at `p` (over the guard); the device for
/// its session.
fn mount_fuse(p: &Path, vol: u64) -> Result<std::os::fd::OwnedFd, String> {
    fuse_mount(
        p,
        &format!("csv-Volume{vol}"),
        "csv",
        "rootmode=40755,default_permissions",
        nix::mount::MsFlags::MS_NOATIME,
    )
}

/// Mounts the guard at `p`: FUSE, its device closed at once, so that
/// every call under it fails (ENOTCONN).
fn mount_guard(p: &Path) -> Result<(), String> {
    let dev = fuse_mount(
        p,
        GUARD,
        "csv-guard",
        "rootmode=40000",
        nix::mount::MsFlags::MS_RDONLY | nix::mount::MsFlags::MS_NOEXEC,
    )?;
    drop(dev);
    Ok(())
}

/// Unmounts the guard at `p` (after the volume's own clean unmount).
fn release_guard(p: &Path) {
    if mounts_at(p).last().is_some_and(|(src, _)| src == GUARD) {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Mounts {
    /// A mount manager reporting into `states`; `served` answers peers'
    /// redirected I/O from this host's mounted LUNs.
    pub fn new(
        cfg: MountConfig,
        states: VolumeStates,
        served: Arc<crate::redirect::Served>,
    ) -> Mounts {
        Mounts {
            cfg,
            served,
            active: BTreeMap::new(),
            states,
            failed: BTreeMap::new(),
            fenced_done: Default::default(),
            checked: std::time::Instant::now(),
            up_read: Arc::default(),
        }
    }

    /// Fencing by persistent reservation on the volumes this host reaches
    /// over iSCSI: checks that it is still registered (a host fenced while
    /// it was cut off registers again only once the registry, read with
    /// quorum, has it up: it rejoined), and, on the host leading the
    /// cluster group, preempts the keys of hosts the registry has down.
    fn fence(&mut self, info: &coordinator::proto::ClusterInfo, read_started: std::time::Instant) {
        let me = self.cfg.node;
        let key = crate::san::pr_key(me);
        let iscsi: Vec<(u64, Arc<crate::redirect::RedirectingLun>)> = self
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
            match crate::san::pr_register(&l, key) {
                Ok(()) => {
                    rl.set_fenced(false);
                    tracing::warn!("Volume{vol}: the LUN had lost this host's registration (fenced, or a new session); the registry has the host up, so it registered again");
                }
                Err(e) => tracing::error!("Volume{vol}: registering again: {e}"),
            }
        }
        if self.checked.elapsed() >= Duration::from_secs(1) {
            self.checked = std::time::Instant::now();
            for (vol, rl) in &iscsi {
                if rl.is_fenced() {
                    continue;
                }
                let Some(l) = rl.san_lun() else { continue };
                match crate::san::pr_registered(&l, key) {
                    Ok(true) => {}
                    Ok(false) => rl.set_fenced(true),
                    Err(e) => tracing::debug!("Volume{vol}: reading the registrations: {e}"),
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
        if let Ok(mut f) = self.served.fenced.write() {
            f.retain(|(_, n)| down.contains(n));
        }
        if down.iter().all(|d| {
            iscsi
                .iter()
                .all(|(v, _)| self.fenced_done.contains(&(*v, *d)))
        }) {
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
        if let Ok(mut f) = self.served.fenced.write() {
            *f = self.fenced_done.clone();
        }
    }

    fn fence_down_hosts(
        &mut self,
        down: &[u64],
        iscsi: &[(u64, Arc<crate::redirect::RedirectingLun>)],
        key: u64,
    ) {
        for &d in down {
            for (vol, rl) in iscsi {
                if self.fenced_done.contains(&(*vol, d)) {
                    continue;
                }
                let Some(l) = rl.san_lun() else { continue };
                match crate::san::pr_preempt_node(&l, key, d) {
                    Ok(gone) if !gone.is_empty() => tracing::warn!("Volume{vol}: host {d} is down: fenced off the LUN (its reservation keys {gone:x?} preempted)"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!("Volume{vol}: fencing host {d}: {e}");
                        continue;
                    }
                }
                self.fenced_done.insert((*vol, d));
            }
        }
    }

    fn mountpoint(&self, n: u64) -> PathBuf {
        self.cfg.root.join(format!("Volume{n}"))
    }

    fn mount(&mut self, v: &VolumeInfo) -> Result<(), String> {
        let spec = match self.cfg.luns.get(&v.number) {
            Some(p) => p.display().to_string(),
            None => v.lun.clone(),
        };
        self.served
            .set_path(v.number, Some((spec, self.cfg.san.clone())));
        let (lun, san, path): (Arc<dyn vhd::BlockIo>, _, String) = match (
            self.cfg.luns.get(&v.number),
            v.lun.starts_with("iscsi://"),
        ) {
            (None, true) => {
                let p = crate::san::open(&v.lun, &self.cfg.san, v.number)?;
                if self.cfg.san.node != 0 {
                    // Joining the LUN's registrants: only they can write.
                    let key = crate::san::pr_key(self.cfg.san.node);
                    if let Err(e) = crate::san::pr_register(&p.lun, key) {
                        tracing::warn!(
                                "Volume{}: fencing by persistent reservation is not available on {}: {e}",
                                v.number,
                                p.describe
                            );
                    }
                }
                let lun: Arc<dyn vhd::BlockIo> = p.lun.clone();
                let d = p.describe.clone();
                (lun, Some(p), d)
            }
            (over, _) => {
                let path = over.cloned().unwrap_or_else(|| PathBuf::from(&v.lun));
                let f = vhd::io::DirectFile::open(&path, true)
                    .map_err(|e| format!("cannot open LUN {}: {e}", path.display()))?;
                (Arc::new(f), None, format!("LUN file {}", path.display()))
            }
        };
        let sb = Superblock::read(lun.as_ref()).map_err(|e| format!("{path}: {e}"))?;
        if sb.number != v.number {
            return Err(format!(
                "{path} holds Volume{}, not Volume{}",
                sb.number, v.number
            ));
        }
        let mp = self.mountpoint(v.number);
        prepare_mountpoint(&mp)?;
        let (me, endpoints) = (self.cfg.identity.clone(), self.cfg.endpoints.clone());
        let pool = ClientPool::new(move || Client::new(me.clone(), endpoints.clone()));
        // An iSCSI path is reopened (a new login) when it failed; a LUN
        // file is probed as it is.
        let reopen: Option<crate::redirect::Reopen> = san.as_ref().map(|_| {
            let (url, who, vol) = (v.lun.clone(), self.cfg.san.clone(), v.number);
            let (up_read, lost_at) = (self.up_read.clone(), Mutex::new(None));
            let f: crate::redirect::Reopen = Box::new(move || {
                // A new session is a new I_T nexus to the target, which
                // may not carry the old one's registration (tgtd keeps the
                // key listed, but refuses the new nexus's writes). So it
                // registers again before I/O goes back to it, and only
                // after a registry read that started once the path was
                // found down had this host up: a key the cluster leader
                // preempted was preempted while the registry had this host
                // down, so a fenced host does not let itself back in.
                let p = crate::san::open(&url, &who, vol)?;
                if who.node != 0 {
                    let key = crate::san::pr_key(who.node);
                    let now = std::time::Instant::now();
                    let since = *lost_at
                        .lock()
                        .map_err(|_| "lock poisoned".to_string())?
                        .get_or_insert(now);
                    let up_after = up_read
                        .lock()
                        .ok()
                        .and_then(|u| *u)
                        .is_some_and(|u| u > since);
                    if !up_after {
                        return Err(format!(
                            "the path answers again; registering key {key:#x} on the new session once the registry has this host up"
                        ));
                    }
                    crate::san::pr_register(&p.lun, key)?;
                    if let Ok(mut l) = lost_at.lock() {
                        *l = None;
                    }
                }
                let lun: Arc<dyn vhd::BlockIo> = p.lun.clone();
                let keep: Box<dyn std::any::Any + Send + Sync> = Box::new(p);
                Ok((lun, keep))
            });
            f
        });
        let keep = san.map(|p| Box::new(p) as Box<dyn std::any::Any + Send + Sync>);
        // Switches show in `volume status` at once, not at the next sync.
        let (states, own) = (self.states.clone(), path.clone());
        let notify: crate::redirect::Notify = Box::new(move |vol, why| {
            if let Ok(mut st) = states.write() {
                for s in st.iter_mut().filter(|s| s.number == vol) {
                    match &why {
                        Some(w) => {
                            s.state = "BlockRedirected".into();
                            s.reason = format!("I/O through a peer: {w} (own path: {own})");
                        }
                        None => {
                            s.state = "Direct".into();
                            s.reason = own.clone();
                        }
                    }
                }
            }
        });
        let rl = crate::redirect::RedirectingLun::new(
            v.number,
            lun,
            keep,
            reopen,
            self.cfg.identity.clone(),
            self.cfg.peers.clone(),
            Some(notify),
        );
        let lun: Arc<dyn vhd::BlockIo> = rl.clone();
        let fs = VolumeFs::new(v.number, self.cfg.node, lun, v.capacity, pool);
        fs.set_own_path(rl.clone());
        // Few readers pay where reads and writes do not block a thread (a
        // LUN file or block device, asynchronous I/O); on an iSCSI path
        // every read and write waits, so every thread reads.
        let readers = if rl.direct().direct_fd().is_some() {
            self.cfg.readers
        } else {
            self.cfg.threads
        };
        fs.set_readers(readers.min(self.cfg.threads).max(1));
        let probe = rl.clone();
        fs.set_outage_probe(Box::new(move || probe.stalled()));
        let mut config = fuser::Config::default();
        // VMs may run as other users than csvd.
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(self.cfg.threads.max(1));
        config.clone_fd = true;
        // Mounted here rather than by fuser, which opens the mount point
        // first: on the guard that fails (ENOTCONN), as it should.
        let dev = mount_fuse(&mp, v.number).map_err(|e| format!("mount {}: {e}", mp.display()))?;
        let session =
            fuser::Session::from_fd(Mounted(fs.clone()), dev, fuser::SessionACL::All, config)
                .and_then(fuser::Session::spawn)
                .map_err(|e| {
                    clear_stale_mount(&mp);
                    format!("mount {}: {e}", mp.display())
                })?;
        tracing::info!("Volume{} mounted at {} ({path})", v.number, mp.display());
        self.active.insert(
            v.number,
            Active {
                session: Some(session),
                fs,
                path,
                lun: rl.clone(),
            },
        );
        self.served.set(v.number, Some(rl));
        self.served
            .agent
            .set_volume(v.number, Some((self.active[&v.number].fs.clone(), mp)));
        Ok(())
    }

    fn unmount(&mut self, n: u64) {
        self.served.set(n, None);
        self.served.set_path(n, None);
        self.served.agent.set_volume(n, None);
        if let Some(mut a) = self.active.remove(&n) {
            a.fs.shutdown();
            let mp = self.mountpoint(n);
            if let Some(s) = a.session.take() {
                // The volume's own mount is the top one at mp (the guard
                // under it); the session ends when it is gone.
                let own = mounts_at(&mp)
                    .last()
                    .is_some_and(|(src, kind)| kind.starts_with("fuse") && src != GUARD);
                match own.then(|| nix::mount::umount(&mp)) {
                    Some(Ok(())) => {
                        if let Err(e) = s.join() {
                            tracing::warn!("unmount Volume{n}: {e}");
                        }
                    }
                    r => {
                        if let Some(Err(e)) = r {
                            tracing::warn!("unmount Volume{n}: {e}; detaching it");
                        }
                        clear_stale_mount(&mp);
                    }
                }
            }
            release_guard(&mp);
            tracing::info!("Volume{n} unmounted");
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
            if !self.active.contains_key(n) {
                match self.mount(v) {
                    Ok(()) => {
                        self.failed.remove(n);
                    }
                    Err(e) => {
                        if self.failed.get(n) != Some(&e) {
                            tracing::error!("Volume{n} not mounted: {e}");
                        }
                        self.failed.insert(*n, e);
                    }
                }
            }
        }
        let mut states = Vec::new();
        for n in wanted.keys() {
            let mp = self.mountpoint(*n).display().to_string();
            let (state, reason) = match (self.active.get(n), self.failed.get(n)) {
                (Some(a), _) if a.lun.is_fenced() => (
                    "Fenced",
                    format!(
                        "the LUN refuses this host's writes (its reservation key was preempted while the cluster had it down); it registers again once it has rejoined ({})",
                        a.path
                    ),
                ),
                (Some(a), _) if a.fs.fs_redirector().is_some() => (
                    "FileSystemRedirected",
                    fs_redirect_reason(&a.fs, &a.path),
                ),
                (Some(a), _) if a.lun.is_redirected() => (
                    "BlockRedirected",
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
                (Some(a), _) => ("Direct", a.path.clone()),
                (None, Some(e)) => ("Unmounted", e.clone()),
                (None, None) => ("Unmounted", "not mounted yet".to_string()),
            };
            let io = self
                .active
                .get(n)
                .map(|a| a.lun.io_counters())
                .unwrap_or_default();
            states.push(VolumeState {
                number: *n,
                state: state.into(),
                reason,
                mountpoint: mp,
                direct_read: io.direct_read,
                direct_written: io.direct_written,
                redirected_read: io.redirected_read,
                redirected_written: io.redirected_written,
                redirect_events: io.switches,
                fenced_events: io.fences,
                async_bytes: io.async_bytes,
            });
        }
        if let Ok(mut s) = self.states.write() {
            *s = states;
        }
    }

    /// Points each volume's redirected I/O at its coordinator first (the
    /// leader of its Raft group, as this host's replica knows it).
    fn prefer_coordinators(&self, info: &coordinator::proto::ClusterInfo) {
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

    /// Follows the registry until `stop` is set, then unmounts everything.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut c = Client::new(self.cfg.identity.clone(), self.cfg.endpoints.clone());
        c.timeout = Duration::from_secs(2);
        while !stop.load(Ordering::Relaxed) {
            let read_started = std::time::Instant::now();
            match c.cluster_info() {
                Ok(info) => {
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
                    self.fence(&info, read_started);
                    self.prefer_coordinators(&info);
                    // Files opened here for a FileSystemRedirected host
                    // that the cluster has down are closed.
                    for h in info.health.iter().filter(|h| !h.up) {
                        for (n, a) in &self.active {
                            let k = a.fs.release_served_for(h.node);
                            if k > 0 {
                                tracing::warn!("Volume{n}: closed {k} file(s) opened for host {}, which is down", h.node);
                            }
                        }
                    }
                }
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
