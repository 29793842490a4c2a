//! Redirected block I/O: a host that does not use its own SAN path to a
//! volume (when its own path failed, or when the operator asks) sends its
//! block requests over the cluster network to a host that reaches the LUN
//! directly; every frame is encrypted and authenticated (the tag is the
//! payload's checksum).
//!
//! [`RedirectingLun`] is the LUN the filesystem uses: direct I/O while the
//! host's own path is in use, redirected I/O otherwise. The node daemon's
//! block service answers the peers' redirected requests from this host's
//! direct paths.
//!
//! Failure drills act on the own path through [`coordinator::faults`]: a
//! cut path fails as a cut SAN link would, a slowed one waits first.

use super::SanError;
use coordinator::proto::{self, reply, request, response, BlockOp, BlockOpKind};
use coordinator::wire::Identity;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Opens the own path again (a new SAN session): the LUN, and what must
/// live as long as it (the session's runtime).
pub type Reopen = Box<
    dyn Fn() -> Result<(Arc<dyn vhd::BlockIo>, Box<dyn std::any::Any + Send + Sync>), SanError>
        + Send
        + Sync,
>;

/// Told when I/O to a volume switches: the volume and why it is
/// redirected now (None: back on the own path).
pub type Notify = Box<dyn Fn(u64, Option<String>) + Send + Sync>;

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
    conns: super::PeerConns,
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
            conns: super::PeerConns::new(me, Duration::from_secs(10)),
            redirected_ops: AtomicU64::new(0),
            preferred: RwLock::new(Vec::new()),
            last_peer: Mutex::new(None),
            bytes: Default::default(),
            switches: AtomicU64::new(0),
            fences: AtomicU64::new(0),
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
                let opened = reopen().and_then(|(lun, keep)| {
                    lun.read_at(&mut b, 0)
                        .map(|()| (lun, keep))
                        .map_err(|source| SanError::Io {
                            what: "reading the first block",
                            source,
                        })
                });
                match opened {
                    Ok((lun, keep)) => (lun, Some(keep)),
                    Err(e) => {
                        tracing::debug!(
                            volume = self.vol,
                            "own path still down: {}",
                            coordinator::service::error_chain(&e)
                        );
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

    fn drill_cut(&self) -> bool {
        coordinator::faults::san_cut(self.vol)
    }

    fn drill_delay(&self) -> Option<Duration> {
        coordinator::faults::san_delay(self.vol)
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
        any.downcast_ref::<super::IscsiPath>()
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
        if self.is_redirected()
            || self.is_fenced()
            || self.drill_cut()
            || self.drill_delay().is_some()
        {
            return None;
        }
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
            let write = op.kind() == BlockOpKind::Write;
            let sent = if write {
                self.conns.exchange_block_write(a, &op, data)
            } else {
                self.conns.exchange(a, request::Body::Block(op.clone()))
            };
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{a}: {}", coordinator::service::error_chain(&e));
                    if write && e.maybe_delivered() {
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
                    kind: BlockOpKind::Read as i32,
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
                        kind: BlockOpKind::Write as i32,
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
                    kind: BlockOpKind::Flush as i32,
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

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::wire::Key;
    use vhd::BlockIo as _;

    /// What the LUN told, in order.
    type Told = Arc<Mutex<Vec<Option<String>>>>;

    /// Volume numbers of their own: the fault registry is process-wide.
    const VOL: u64 = 9_001;

    fn lun(vol: u64, peers: Vec<SocketAddr>) -> (Arc<RedirectingLun>, Told) {
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        let notify: Notify = Box::new(move |v, why| {
            assert_eq!(v, vol);
            t.lock().unwrap().push(why);
        });
        let me = Identity {
            node: 1,
            cluster: "t".into(),
            key: Key::from_bytes([1; 32]),
        };
        let disk = Arc::new(vhd::MemIo::new(vec![0u8; 1 << 20]));
        (
            RedirectingLun::new(vol, disk, None, None, me, peers, Some(notify)),
            told,
        )
    }

    #[test]
    fn direct_io_is_counted_and_changes_nothing_else() {
        let (l, told) = lun(VOL, vec![]);
        l.write_at(&[7u8; 4096], 8192).unwrap();
        let mut back = [0u8; 4096];
        l.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, [7u8; 4096]);
        l.flush().unwrap();
        let c = l.io_counters();
        assert_eq!((c.direct_read, c.direct_written), (4096, 4096));
        assert_eq!(
            (c.redirected_read, c.redirected_written, c.switches),
            (0, 0, 0)
        );
        assert!(!l.is_redirected() && !l.stalled());
        assert!(told.lock().unwrap().is_empty());
        assert_eq!(l.len().unwrap(), 1 << 20);
        assert!(l.set_len(0).is_err());
    }

    #[test]
    fn redirection_on_request_is_told_and_takes_the_own_path_away() {
        let (l, told) = lun(VOL + 1, vec![]);
        assert!(l.direct_now().is_some());
        l.set_redirected(true);
        l.set_redirected(true);
        assert!(l.is_redirected());
        assert!(l.direct_now().is_none());
        assert_eq!(
            l.redirect_reason().as_deref(),
            Some("asked by the operator")
        );
        l.set_redirected(false);
        assert_eq!(
            *told.lock().unwrap(),
            vec![Some("asked by the operator".to_string()), None]
        );
        assert!(l.direct_now().is_some());
    }

    #[test]
    fn a_fenced_host_loses_its_own_path_until_it_rejoins() {
        let (l, told) = lun(VOL + 2, vec![]);
        assert!(l.fenced_since().is_none());
        l.set_fenced(true);
        l.set_fenced(true);
        assert!(l.is_fenced() && l.fenced_since().is_some());
        assert!(l.direct_now().is_none());
        assert_eq!(l.io_counters().fences, 1);
        l.set_fenced(false);
        assert!(l.fenced_since().is_none() && l.direct_now().is_some());
        assert_eq!(told.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_drill_cut_takes_the_own_path_away_until_healed() {
        let (l, _) = lun(VOL + 3, vec![]);
        coordinator::faults::cut_san(VOL + 3, std::time::Instant::now() + Duration::from_secs(60));
        assert!(l.direct_now().is_none());
        coordinator::faults::heal_san(VOL + 3);
        assert!(l.direct_now().is_some());
    }

    #[test]
    fn redirected_io_tries_the_coordinator_first() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let (l, _) = lun(VOL + 4, vec![a, b, c]);
        assert_eq!(l.peer_order(), vec![a, b, c]);
        // Not a peer of this volume: left out.
        l.set_preferred(vec!["127.0.0.1:9".parse().unwrap(), c]);
        assert_eq!(l.peer_order(), vec![c, a, b]);
    }
}
