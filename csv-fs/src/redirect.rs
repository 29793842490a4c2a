//! Redirected block I/O: a host that does not use its own SAN path to a
//! volume (when its own path failed, or when the operator asks) sends its
//! block requests over the cluster network to a host that reaches the LUN
//! directly; every frame is encrypted and authenticated (the tag is the
//! payload's checksum).
//!
//! [`RedirectingLun`] is the LUN the filesystem uses: direct I/O while the
//! host's own path is in use, redirected I/O otherwise. [`Served`] answers
//! the peers' redirected requests from this host's direct paths.

use coordinator::node::BlockServer;
use coordinator::proto::{self, reply, request, response, BlockOp};
use coordinator::wire::Identity;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Opens the own path again (a new SAN session): the LUN, and what must
/// live as long as it (the session's runtime).
pub type Reopen = Box<
    dyn Fn() -> Result<(Arc<dyn vhd::BlockIo>, Box<dyn std::any::Any + Send + Sync>), String>
        + Send
        + Sync,
>;

/// Told when I/O to a volume switches: the volume and why it is
/// redirected now (None: back on the own path).
pub type Notify = Box<dyn Fn(u64, Option<String>) + Send + Sync>;

/// A failure drill's faults on the own path: cut until, and a delay added
/// to each I/O until.
type DrillFaults = (
    Option<std::time::Instant>,
    Option<(Duration, std::time::Instant)>,
);

/// A volume's LUN as this host uses it.
pub struct RedirectingLun {
    notify: Option<Notify>,
    vol: u64,
    direct: RwLock<Arc<dyn vhd::BlockIo>>,
    keep: Mutex<Option<Box<dyn std::any::Any + Send + Sync>>>,
    reopen: Option<Reopen>,
    /// The operator asked for redirection.
    redirected: AtomicBool,
    /// The own path failed (redirected until it works again).
    failed: AtomicBool,
    /// The LUN refused this host's writes (RESERVATION CONFLICT): it was
    /// fenced off. Writes fail, and are never redirected, until it rejoins.
    fenced: AtomicBool,
    /// When the LUN last refused this host (a registry read must start
    /// after it before the host registers again).
    fenced_at: Mutex<Option<std::time::Instant>>,
    reason: Mutex<String>,
    peers: Vec<SocketAddr>,
    /// I/O is waiting for any path (own or through a peer) to come back.
    stalled: AtomicBool,
    /// The volume's coordinator's addresses: redirected I/O goes there
    /// first (it has the volume's metadata at hand and is up), then to
    /// the other peers.
    preferred: RwLock<Vec<SocketAddr>>,
    /// The peer that served the last redirected request.
    last_peer: Mutex<Option<SocketAddr>>,
    conns: crate::peers::PeerConns,
    /// Requests served through a peer so far.
    redirected_ops: AtomicU64,
    /// Bytes read and written over its own path, then through a peer,
    /// then over its own path asynchronously (also counted in the first
    /// two).
    bytes: [AtomicU64; 5],
    /// Times its own path failed and I/O switched to a peer.
    switches: AtomicU64,
    /// Times it was fenced off the LUN.
    fences: AtomicU64,
    /// A failure drill's faults on the own path: cut until, and a delay
    /// added to each I/O until.
    drill: Mutex<DrillFaults>,
}

/// A volume's I/O on this host so far (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Bytes read over this host's own path.
    pub direct_read: u64,
    /// Bytes written over this host's own path.
    pub direct_written: u64,
    /// Bytes read through a peer.
    pub redirected_read: u64,
    /// Bytes written through a peer.
    pub redirected_written: u64,
    /// Times the own path failed and I/O switched to a peer.
    pub switches: u64,
    /// Times it was fenced off the LUN.
    pub fences: u64,
    /// Of the own path's bytes, those moved by asynchronous I/O.
    pub async_bytes: u64,
}

impl std::fmt::Debug for RedirectingLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedirectingLun")
            .field("vol", &self.vol)
            .field("redirected", &self.redirected)
            .finish_non_exhaustive()
    }
}

const READ: u32 = 0;
const WRITE: u32 = 1;
const FLUSH: u32 = 2;

impl RedirectingLun {
    /// VolumeN's LUN over `direct` (kept alive with `keep`), redirected
    /// through `peers` (the other hosts' addresses) when asked or when the
    /// own path fails; `reopen` makes a new own path (None: probe `direct`
    /// itself). A probe thread brings the own path back.
    pub fn new(
        vol: u64,
        direct: Arc<dyn vhd::BlockIo>,
        keep: Option<Box<dyn std::any::Any + Send + Sync>>,
        reopen: Option<Reopen>,
        me: Identity,
        peers: Vec<SocketAddr>,
        notify: Option<Notify>,
    ) -> Arc<Self> {
        let lun = Arc::new(RedirectingLun {
            notify,
            vol,
            direct: RwLock::new(direct),
            keep: Mutex::new(keep),
            reopen,
            redirected: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            fenced_at: Mutex::new(None),
            reason: Mutex::new(String::new()),
            peers,
            conns: crate::peers::PeerConns::new(me, Duration::from_secs(10)),
            redirected_ops: AtomicU64::new(0),
            preferred: RwLock::new(Vec::new()),
            last_peer: Mutex::new(None),
            bytes: Default::default(),
            switches: AtomicU64::new(0),
            fences: AtomicU64::new(0),
            drill: Mutex::new((None, None)),
        });
        let weak = Arc::downgrade(&lun);
        let _ = std::thread::Builder::new()
            .name(format!("csv-probe-v{vol}"))
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(500));
                match weak.upgrade() {
                    Some(l) => l.probe(),
                    None => return,
                }
            });
        lun
    }

    /// While the own path is failed, tries it again; switches back to
    /// direct I/O when it works.
    fn probe(&self) {
        if !self.failed.load(Ordering::Relaxed) || self.drill_cut() {
            return;
        }
        // The session in use first: it may work again (the failure was a
        // drill's cut, or the session came back by itself). A new login
        // with this host's ISID while it lives would make the target drop
        // it, and its own recovery would drop the new one in turn.
        let current = self.direct();
        let mut b = vec![0u8; 4096];
        let (lun, keep) = match current.read_at(&mut b, 0) {
            Ok(()) => (current, None),
            Err(e) => {
                drop(current);
                let Some(reopen) = &self.reopen else {
                    tracing::debug!(volume = self.vol, "own path still down: {e}");
                    return;
                };
                match reopen().and_then(|(lun, keep)| {
                    lun.read_at(&mut b, 0)
                        .map(|()| (lun, keep))
                        .map_err(|e| e.to_string())
                }) {
                    Ok((lun, keep)) => (lun, Some(keep)),
                    Err(e) => {
                        tracing::debug!(volume = self.vol, "own path still down: {e}");
                        return;
                    }
                }
            }
        };
        if let Ok(mut d) = self.direct.write() {
            *d = lun;
        }
        if let Some(k) = keep {
            if let Ok(mut slot) = self.keep.lock() {
                // The old session's runtime is dropped here.
                *slot = Some(k);
            }
        }
        self.failed.store(false, Ordering::Relaxed);
        if let Ok(mut r) = self.reason.lock() {
            r.clear();
        }
        self.tell();
        tracing::warn!(
            volume = self.vol,
            "Volume{}: own path works again: Direct",
            self.vol
        );
    }

    /// Runs `f` on the own path unless I/O is redirected; a failure of the
    /// path (not of the request) switches to redirected I/O and gives None,
    /// so the caller sends the request through a peer.
    fn try_direct<R>(
        &self,
        mut f: impl FnMut(&dyn vhd::BlockIo) -> io::Result<R>,
    ) -> Option<io::Result<R>> {
        if self.is_redirected() {
            return None;
        }
        let d = self.direct.read().ok()?.clone();
        let r = if self.drill_cut() {
            Err(io::Error::other("SAN path cut by a failure drill"))
        } else {
            if let Some(delay) = self.drill_delay() {
                std::thread::sleep(delay);
            }
            f(d.as_ref())
        };
        match r {
            Ok(r) => Some(Ok(r)),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                // Refused by the LUN. Going through a peer would get round
                // a fence, so the request waits (a few seconds at most)
                // for the host to register again, which it does only once
                // the registry, read after the refusal, has it up: after a
                // reconnection that lost the registration, or a rejoin.
                self.set_fenced(true);
                let t = std::time::Instant::now();
                while self.is_fenced() && t.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if self.is_fenced() {
                    tracing::error!(
                        volume = self.vol,
                        "Volume{}: the LUN refuses this host ({e}): fenced off until it rejoins the cluster",
                        self.vol
                    );
                    return Some(Err(e));
                }
                let d = self.direct.read().ok()?.clone();
                Some(f(d.as_ref()))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof
                ) =>
            {
                Some(Err(e))
            }
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    self.switches.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        volume = self.vol,
                        "Volume{}: own path failed ({e}): BlockRedirected, I/O goes through a peer",
                        self.vol
                    );
                    if let Ok(mut r) = self.reason.lock() {
                        *r = format!("own path failed: {e}");
                    }
                    self.tell();
                }
                None
            }
        }
    }

    /// A failure drill: the own path fails (as if its SAN link were cut)
    /// until `cut`; each own I/O waits `delay` until its deadline. None
    /// for both: the faults end.
    pub fn set_drill(
        &self,
        cut: Option<std::time::Instant>,
        delay: Option<(Duration, std::time::Instant)>,
    ) {
        if let Ok(mut d) = self.drill.lock() {
            *d = (cut, delay);
        }
    }

    fn drill_cut(&self) -> bool {
        self.drill
            .lock()
            .is_ok_and(|d| d.0.is_some_and(|t| t > std::time::Instant::now()))
    }

    fn drill_delay(&self) -> Option<Duration> {
        let d = self.drill.lock().ok()?;
        d.1.filter(|(_, until)| *until > std::time::Instant::now())
            .map(|(delay, _)| delay)
    }

    /// Why I/O is redirected (None: it is not).
    pub fn redirect_reason(&self) -> Option<String> {
        if self.redirected.load(Ordering::Relaxed) {
            return Some("asked by the operator".into());
        }
        if self.failed.load(Ordering::Relaxed) {
            return Some(self.reason.lock().map(|r| r.clone()).unwrap_or_default());
        }
        None
    }

    /// Whether the LUN refused this host (reservation conflict).
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Marks this host fenced (its key is gone from the LUN) or not (it
    /// registered again).
    pub fn set_fenced(&self, on: bool) {
        if on {
            if let Ok(mut t) = self.fenced_at.lock() {
                *t = Some(std::time::Instant::now());
            }
        }
        if self.fenced.swap(on, Ordering::Relaxed) != on {
            if on {
                self.fences.fetch_add(1, Ordering::Relaxed);
            }
            self.tell();
        }
    }

    /// When the LUN last refused this host, or its key was found missing.
    pub fn fenced_since(&self) -> Option<std::time::Instant> {
        if !self.is_fenced() {
            return None;
        }
        self.fenced_at.lock().ok().and_then(|t| *t)
    }

    /// The own iSCSI path, for persistent-reservation commands (None: a
    /// LUN file, or no path open).
    pub fn san_lun(&self) -> Option<Arc<iscsi_initiator::BlockingLun>> {
        let keep = self.keep.lock().ok()?;
        let k = keep.as_ref()?;
        let any: &(dyn std::any::Any + Send + Sync) = k.as_ref();
        any.downcast_ref::<crate::san::IscsiPath>()
            .map(|p| p.lun.clone())
    }

    /// Whether I/O goes through a peer.
    pub fn is_redirected(&self) -> bool {
        self.redirected.load(Ordering::Relaxed) || self.failed.load(Ordering::Relaxed)
    }

    fn tell(&self) {
        if let Some(n) = &self.notify {
            n(self.vol, self.redirect_reason());
        }
    }

    /// Sends I/O through a peer (true) or over the own path (false).
    pub fn set_redirected(&self, on: bool) {
        if self.redirected.swap(on, Ordering::Relaxed) != on {
            self.tell();
            tracing::warn!(
                volume = self.vol,
                "Volume{}: {}",
                self.vol,
                if on {
                    "BlockRedirected (I/O through a peer)"
                } else {
                    "Direct again"
                }
            );
        }
    }

    /// The peer that served the last redirected request, if any did.
    pub fn last_peer(&self) -> Option<SocketAddr> {
        self.last_peer.lock().ok().and_then(|l| *l)
    }

    /// Bytes over each path and path failures so far.
    pub fn io_counters(&self) -> IoCounters {
        let b = |i: usize| self.bytes[i].load(Ordering::Relaxed);
        IoCounters {
            direct_read: b(0),
            direct_written: b(1),
            redirected_read: b(2),
            redirected_written: b(3),
            switches: self.switches.load(Ordering::Relaxed),
            fences: self.fences.load(Ordering::Relaxed),
            async_bytes: b(4),
        }
    }

    /// Requests served through a peer so far.
    pub fn redirected_ops(&self) -> u64 {
        self.redirected_ops.load(Ordering::Relaxed)
    }

    /// The own path when I/O may be submitted to it without this layer
    /// now: not redirected, not fenced, no drill fault on it.
    pub fn direct_now(&self) -> Option<Arc<dyn vhd::BlockIo>> {
        let drill = self.drill.lock().ok()?;
        let now = std::time::Instant::now();
        if self.is_redirected()
            || self.is_fenced()
            || drill.0.is_some_and(|t| t > now)
            || drill.1.is_some_and(|(_, until)| until > now)
        {
            return None;
        }
        drop(drill);
        self.direct.read().ok().map(|d| d.clone())
    }

    /// Counts bytes that went over the own path outside this layer.
    pub fn count_direct(&self, write: bool, bytes: u64) {
        self.bytes[usize::from(write)].fetch_add(bytes, Ordering::Relaxed);
        self.bytes[4].fetch_add(bytes, Ordering::Relaxed);
    }

    /// The LUN this host reaches directly.
    pub fn direct(&self) -> Arc<dyn vhd::BlockIo> {
        match self.direct.read() {
            Ok(d) => d.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Sends redirected I/O to these addresses (the volume's coordinator)
    /// before the other peers.
    pub fn set_preferred(&self, addrs: Vec<SocketAddr>) {
        if let Ok(mut p) = self.preferred.write() {
            if *p != addrs {
                tracing::debug!(
                    volume = self.vol,
                    ?addrs,
                    "redirected I/O goes to the coordinator first"
                );
                *p = addrs;
            }
        }
    }

    /// The peers in the order redirected I/O tries them: the coordinator
    /// first.
    pub fn peer_order(&self) -> Vec<SocketAddr> {
        let mut order: Vec<SocketAddr> =
            self.preferred.read().map(|p| p.clone()).unwrap_or_default();
        order.retain(|a| self.peers.contains(a));
        for a in &self.peers {
            if !order.contains(a) {
                order.push(*a);
            }
        }
        order
    }

    /// One redirected request, tried on each peer until one serves it.
    fn call(&self, op: BlockOp) -> io::Result<bytes::Bytes> {
        self.call_with(op, &[])
    }

    /// [`call`](Self::call) of a write of `data`.
    fn call_with(&self, mut op: BlockOp, data: &[u8]) -> io::Result<bytes::Bytes> {
        op.volume = self.vol;
        let mut last = String::from("no peer to redirect to");
        for a in self.peer_order() {
            let sent = if op.kind == WRITE {
                self.conns.exchange_block_write(a, &op, data)
            } else {
                self.conns.exchange(a, request::Body::Block(op.clone()))
            };
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{a}: {e}");
                    if op.kind == WRITE && e.maybe_delivered {
                        // The peer may have the write and still carry it
                        // out (or its target may): sent again elsewhere
                        // and answered at once, it would let newer writes
                        // to the same blocks go out before the old copy
                        // lands. Give that copy time to land first.
                        std::thread::sleep(REDIRECT_SETTLE);
                    }
                    continue;
                }
            };
            if let Ok(mut l) = self.last_peer.lock() {
                *l = Some(a);
            }
            match resp.result {
                Some(response::Result::Reply(proto::Reply {
                    value: Some(reply::Value::Data(d)),
                })) => {
                    // The frame's tag (checked on receipt) covers every
                    // byte of the payload: it is the payload's checksum.
                    self.redirected_ops.fetch_add(1, Ordering::Relaxed);
                    return Ok(d.data);
                }
                Some(response::Result::Reply(_)) => {
                    self.redirected_ops.fetch_add(1, Ordering::Relaxed);
                    return Ok(bytes::Bytes::new());
                }
                Some(response::Result::Error(e)) => last = format!("{a}: {}", e.message),
                _ => last = format!("{a}: empty answer"),
            }
        }
        Err(io::Error::other(format!(
            "redirected I/O to Volume{} failed on every peer ({last})",
            self.vol
        )))
    }
}

/// How long a redirected write whose peer went silent after it was sent
/// waits before it is sent anywhere else (see the iSCSI session's
/// `settle`, which does the same for its own reconnections).
const REDIRECT_SETTLE: Duration = Duration::from_millis(500);

/// How long I/O waits, when neither the own path nor any peer can do it
/// (a storage outage: the target restarting, every path down at once),
/// before it fails: meanwhile the own path is probed and the peers tried
/// again, so the outage is a pause to the application, not an error, like
/// multipath's queueing when no path is left.
const OUTAGE_WAIT: Duration = Duration::from_secs(60);

impl RedirectingLun {
    /// One I/O: over the own path, else through a peer, else again until
    /// a path comes back or [`OUTAGE_WAIT`] passes.
    fn io<R>(
        &self,
        mut direct: impl FnMut(&dyn vhd::BlockIo) -> io::Result<R>,
        mut redirected: impl FnMut() -> io::Result<R>,
    ) -> io::Result<R> {
        let start = std::time::Instant::now();
        let mut told = false;
        loop {
            if let Some(r) = self.try_direct(&mut direct) {
                if told {
                    self.stalled.store(false, Ordering::Relaxed);
                }
                return r;
            }
            match redirected() {
                Ok(r) => {
                    if told {
                        self.stalled.store(false, Ordering::Relaxed);
                        tracing::warn!(
                            volume = self.vol,
                            "Volume{}: I/O goes on after {:.1} s without any path",
                            self.vol,
                            start.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(r);
                }
                Err(e) if start.elapsed() < OUTAGE_WAIT => {
                    // Each time round: another I/O that got through may
                    // have cleared it meanwhile.
                    self.stalled.store(true, Ordering::Relaxed);
                    if !told {
                        told = true;
                        tracing::error!(
                            volume = self.vol,
                            "Volume{}: no path to the LUN, own or through a peer ({e}): I/O waits for one (at most {} s)",
                            self.vol,
                            OUTAGE_WAIT.as_secs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    self.stalled.store(false, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// Whether I/O is waiting for any path to the LUN to come back (a
    /// storage outage as seen from this host).
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

impl vhd::BlockIo for RedirectingLun {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len();
        let d = self.io(
            |d| d.read_at(buf, offset).map(|()| bytes::Bytes::new()),
            || {
                self.call(BlockOp {
                    offset,
                    len: len as u64,
                    kind: READ,
                    ..Default::default()
                })
            },
        )?;
        if d.is_empty() {
            // Read over the own path, into `buf`.
            self.bytes[0].fetch_add(len as u64, Ordering::Relaxed);
            return Ok(());
        }
        if d.len() != len {
            return Err(io::Error::other("redirected read came back short"));
        }
        self.bytes[2].fetch_add(len as u64, Ordering::Relaxed);
        buf.copy_from_slice(&d);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let direct = std::cell::Cell::new(false);
        self.io(
            |d| {
                direct.set(true);
                d.write_at(buf, offset)
            },
            || {
                direct.set(false);
                self.call_with(
                    BlockOp {
                        offset,
                        kind: WRITE,
                        ..Default::default()
                    },
                    buf,
                )
                .map(|_| ())
            },
        )?;
        let i = if direct.get() { 1 } else { 3 };
        self.bytes[i].fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.io(
            |d| d.flush(),
            || {
                self.call(BlockOp {
                    kind: FLUSH,
                    ..Default::default()
                })
                .map(|_| ())
            },
        )
    }

    fn len(&self) -> io::Result<u64> {
        self.direct().len()
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::other("a volume's LUN does not change size"))
    }
}

/// This host's LUNs, served to peers whose I/O is redirected.
#[derive(Default)]
pub struct Served {
    luns: RwLock<BTreeMap<u64, Arc<RedirectingLun>>>,
    /// This host's part of volume snapshots.
    pub agent: crate::freeze::SnapshotAgent,
    /// (volume, host) pairs whose host this host fenced off the volume's
    /// LUN while the registry has it down (a failover waits for them).
    pub fenced: Arc<RwLock<std::collections::BTreeSet<(u64, u64)>>>,
    /// Each volume's LUN as this host reaches it (URL or path), and who it
    /// logs in as: what `csvctl validate` probes.
    paths: RwLock<BTreeMap<u64, (String, crate::san::SanIdentity)>>,
    /// This host's SAN identity (for candidate LUNs).
    who: RwLock<Option<crate::san::SanIdentity>>,
    /// This host's cluster identity and node id (FileSystemRedirected
    /// hosts connect to the coordinator with it).
    host: RwLock<Option<(Identity, u64)>>,
    /// What a drill's "crash" does (csvd kills its VMs and starts again
    /// after the given time down).
    crash: RwLock<Option<CrashHook>>,
}

/// Kills this host's VMs and restarts csvd after the given time down.
pub type CrashHook = Arc<dyn Fn(Duration) + Send + Sync>;

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Served")
    }
}

impl Served {
    /// Registers (or, with None, forgets) VolumeN's LUN.
    pub fn set(&self, vol: u64, lun: Option<Arc<RedirectingLun>>) {
        if let Ok(mut m) = self.luns.write() {
            match lun {
                Some(l) => m.insert(vol, l),
                None => m.remove(&vol),
            };
        }
    }

    /// Sets this host's cluster identity and node id.
    pub fn set_host(&self, me: Identity, node: u64) {
        if let Ok(mut h) = self.host.write() {
            *h = Some((me, node));
        }
    }

    /// Sets what a drill's "crash" does on this host.
    pub fn set_crash(&self, hook: CrashHook) {
        if let Ok(mut c) = self.crash.write() {
            *c = Some(hook);
        }
    }

    /// Sets this host's SAN identity.
    pub fn set_identity(&self, who: crate::san::SanIdentity) {
        if let Ok(mut w) = self.who.write() {
            *w = Some(who);
        }
    }

    /// Records how this host reaches VolumeN's LUN (set before mounting,
    /// so a volume that does not mount is probed too; None forgets it).
    pub fn set_path(&self, vol: u64, path: Option<(String, crate::san::SanIdentity)>) {
        if let Ok(mut m) = self.paths.write() {
            match path {
                Some(p) => m.insert(vol, p),
                None => m.remove(&vol),
            };
        }
    }

    fn get(&self, vol: u64) -> Result<Arc<RedirectingLun>, String> {
        self.luns
            .read()
            .ok()
            .and_then(|m| m.get(&vol).cloned())
            .ok_or_else(|| format!("Volume{vol} is not mounted on this host"))
    }
}

impl BlockServer for Served {
    fn block(&self, op: &BlockOp) -> Result<Vec<u8>, String> {
        let lun = self.get(op.volume)?;
        if lun.is_redirected() {
            // Its own I/O goes through a peer: it must not serve others.
            return Err(format!(
                "this host is redirected for Volume{} too",
                op.volume
            ));
        }
        let d = lun.direct();
        let cap = d.len().map_err(|e| e.to_string())?;
        match op.kind {
            READ => {
                if op.len > 64 << 20 || op.offset.checked_add(op.len).is_none_or(|e| e > cap) {
                    return Err(format!(
                        "read of {} bytes at {} is outside the LUN",
                        op.len, op.offset
                    ));
                }
                // The iSCSI path's own receive buffer, not a copy.
                d.read_vec(op.offset, op.len as usize)
                    .map_err(|e| e.to_string())
            }
            WRITE => {
                if op
                    .offset
                    .checked_add(op.data.len() as u64)
                    .is_none_or(|e| e > cap)
                {
                    return Err(format!("write at {} is outside the LUN", op.offset));
                }
                d.write_at(&op.data, op.offset).map_err(|e| e.to_string())?;
                Ok(Vec::new())
            }
            FLUSH => d.flush().map(|()| Vec::new()).map_err(|e| e.to_string()),
            k => Err(format!("unknown block request kind {k}")),
        }
    }

    fn fault(&self, req: &coordinator::proto::FaultReq) -> Result<(), String> {
        let until = std::time::Instant::now() + Duration::from_millis(req.duration_ms);
        let luns: Vec<Arc<RedirectingLun>> = self
            .luns
            .read()
            .map(|m| {
                m.iter()
                    .filter(|(v, _)| req.volume == 0 || **v == req.volume)
                    .map(|(_, l)| l.clone())
                    .collect()
            })
            .unwrap_or_default();
        let need_luns = || {
            if luns.is_empty() {
                Err(format!("Volume{} is not mounted on this host", req.volume))
            } else {
                Ok(())
            }
        };
        match req.kind.as_str() {
            "san-cut" => {
                need_luns()?;
                tracing::warn!(
                    volume = req.volume,
                    "failure drill: own SAN path cut for {} ms",
                    req.duration_ms
                );
                luns.iter().for_each(|l| l.set_drill(Some(until), None));
                Ok(())
            }
            "san-slow" => {
                need_luns()?;
                if req.delay_ms == 0 || req.delay_ms > 10_000 {
                    return Err(format!(
                        "a SAN delay of {} ms (1-10000 allowed)",
                        req.delay_ms
                    ));
                }
                tracing::warn!(
                    volume = req.volume,
                    "failure drill: own SAN path {} ms slower for {} ms",
                    req.delay_ms,
                    req.duration_ms
                );
                let delay = Duration::from_millis(req.delay_ms);
                luns.iter()
                    .for_each(|l| l.set_drill(None, Some((delay, until))));
                Ok(())
            }
            "heal" => {
                luns.iter().for_each(|l| l.set_drill(None, None));
                Ok(())
            }
            "crash" => {
                let hook = self
                    .crash
                    .read()
                    .ok()
                    .and_then(|h| h.clone())
                    .ok_or("this host cannot crash on request")?;
                let down = Duration::from_millis(req.duration_ms);
                tracing::error!("failure drill: this host crashes now and stays down {down:?}");
                // Once the answer has left.
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    hook(down)
                });
                Ok(())
            }
            k => Err(format!(
                "unknown fault {k:?} (san-cut, san-slow, net-cut, clock, crash, heal)"
            )),
        }
    }

    fn facts(&self, candidates: &[String]) -> Vec<coordinator::proto::PathFacts> {
        let paths: Vec<(u64, String, crate::san::SanIdentity)> = self
            .paths
            .read()
            .map(|m| {
                m.iter()
                    .map(|(v, (s, w))| (*v, s.clone(), w.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let who = self.who.read().ok().and_then(|w| w.clone());
        let mut out = Vec::new();
        let mut probe = |volume: u64, spec: &str, who: &crate::san::SanIdentity, mode: String| {
            let p = crate::san::probe(spec, who);
            out.push(coordinator::proto::PathFacts {
                volume,
                lun: spec.to_string(),
                error: p.error,
                reached: p.reached,
                read_us: p.read_us,
                pr: p.pr,
                pr_error: p.pr_error,
                mode,
            });
        };
        for (vol, spec, who) in &paths {
            let mode = match self.get(*vol) {
                Ok(l) if l.is_fenced() => "Fenced".to_string(),
                Ok(l) if l.is_redirected() => "BlockRedirected".to_string(),
                Ok(_) => "Direct".to_string(),
                Err(_) => "Unmounted".to_string(),
            };
            probe(*vol, spec, who, mode);
        }
        if let Some(who) = who {
            for c in candidates.iter().take(16) {
                probe(0, c, &who, String::new());
            }
        }
        out
    }

    fn redirect(&self, volume: u64, on: bool, mode: u32) -> Result<(), String> {
        if mode == 1 {
            let fs = self
                .agent
                .volume_fs(volume)
                .ok_or_else(|| format!("Volume{volume} is not mounted on this host"))?;
            if !on {
                fs.set_fs_redirect(None);
                return Ok(());
            }
            if fs.fs_redirector().is_none() {
                let (me, node) = self
                    .host
                    .read()
                    .ok()
                    .and_then(|h| h.clone())
                    .ok_or("this host's identity is not known yet")?;
                // The coordinator's address is filled in by the mounts'
                // loop within a second; until then files open here.
                fs.set_fs_redirect(Some(Arc::new(crate::fsredirect::Redirector::new(
                    volume,
                    node,
                    Identity { node: 0, ..me },
                ))));
            }
            return Ok(());
        }
        self.get(volume)?.set_redirected(on);
        Ok(())
    }

    fn file(
        &self,
        op: &coordinator::proto::FileOp,
    ) -> Result<coordinator::proto::FileReply, String> {
        let fs = self
            .agent
            .volume_fs(op.volume)
            .ok_or_else(|| format!("Volume{} is not mounted on this host", op.volume))?;
        Ok(fs.serve_file(op))
    }

    fn snapshot_phase(
        &self,
        req: &coordinator::proto::SnapshotPhaseReq,
    ) -> Result<coordinator::proto::SnapshotPhaseReply, String> {
        self.agent.phase(req)
    }
}
