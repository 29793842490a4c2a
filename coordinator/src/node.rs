//! A host's coordinator service: the threads and sockets around its
//! [`Host`].
//!
//! Threads:
//! - one *Raft thread* owns the [`Host`] (every group): it ticks it, steps
//!   the messages peers send, starts client requests, and handles the
//!   groups' readies (so a group's storage is only touched from there);
//! - one *sender* per peer writes that peer's Raft messages on one
//!   authenticated connection, trying the peer's addresses in order (its
//!   networks) and reconnecting when one fails;
//! - one *acceptor* per listen address and one thread per accepted
//!   connection: it reads frames, hands Raft messages and group requests
//!   to the Raft thread, and answers what the host serves itself (the
//!   [`Services`], drill faults, status) right there.
//!
//! Raft messages are unreliable by design: a message to a peer that is
//! down is dropped and raft-rs sends again.

use crate::env::Env;
use crate::group::{Outbox, Timing, Waiter};
use crate::host::{Book, Host, HostConfig, HostError};
use crate::proto::{
    self, admin, frame, reply::Value, request, ErrorCode, FaultKind, Frame, Request, Response,
};
use crate::service::{missing, ServiceError, Services};
use crate::wire::{self, Conn, Identity};
use protobuf::Message as _;
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How a host's coordinator is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Who this host is (node id, cluster name and key).
    pub identity: Identity,
    /// Where its replicas live.
    pub data_dir: PathBuf,
    /// Known hosts and their addresses, preferred first (this host too).
    pub peers: BTreeMap<u64, Vec<String>>,
    /// Create the cluster group with `peers` as its voters if this host
    /// has no replica yet (the founding hosts); otherwise wait to be added.
    pub init: bool,
    /// Raft timing.
    pub timing: Timing,
    /// The feature level this host supports (its build's:
    /// [`crate::features::SUPPORTED`]).
    pub level: u32,
}

/// Why a host's coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A listen address.
    #[error("listen on {addr}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No address to listen on.
    #[error("at least one listen address is needed")]
    NoListen,
    /// The host's groups.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A thread.
    #[error("starting a thread")]
    Thread(#[source] std::io::Error),
}

/// The sockets a host serves on, bound before the rest of the daemon
/// starts (which needs their addresses: a port 0 is resolved here).
#[derive(Debug)]
pub struct Listeners {
    listeners: Vec<TcpListener>,
    addrs: Vec<SocketAddr>,
}

impl Listeners {
    /// Binds every address (one per cluster network).
    pub fn bind(addrs: &[SocketAddr]) -> Result<Listeners, NodeError> {
        if addrs.is_empty() {
            return Err(NodeError::NoListen);
        }
        let mut out = Listeners {
            listeners: Vec::new(),
            addrs: Vec::new(),
        };
        for a in addrs {
            let err = |source| NodeError::Listen { addr: *a, source };
            let l = TcpListener::bind(a).map_err(err)?;
            out.addrs.push(l.local_addr().map_err(err)?);
            out.listeners.push(l);
        }
        Ok(out)
    }

    /// The addresses actually bound.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

enum Event {
    Raft(u64, Vec<raft::eraftpb::Message>),
    Request(Request, Waiter),
    Status(Sender<Vec<proto::GroupStatus>>),
}

struct Transport {
    me: Identity,
    book: Book,
    senders: HashMap<u64, Sender<Frame>>,
}

impl Transport {
    fn sender(&mut self, to: u64) -> &Sender<Frame> {
        let (me, book) = (self.me.clone(), self.book.clone());
        self.senders.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name(format!("csv-peer-{to}"))
                .spawn(move || peer_sender(me, book, to, rx))
                .map_err(|e| tracing::error!("cannot start the sender to host {to}: {e}"))
                .ok();
            tx
        })
    }
}

impl Outbox for Transport {
    fn send(&mut self, group: u64, msgs: Vec<raft::eraftpb::Message>) {
        let mut by_peer: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for m in msgs {
            match m.write_to_bytes() {
                Ok(b) => by_peer.entry(m.to).or_default().push(b),
                Err(e) => tracing::error!(group, "cannot encode a Raft message: {e}"),
            }
        }
        for (to, msgs) in by_peer {
            let f = Frame::of(frame::Body::Raft(proto::RaftBatch { group, msgs }));
            let _ = self.sender(to).send(f);
        }
    }
}

/// Resolves `host:port` strings (a name may give several addresses).
pub fn resolve(addrs: &[String]) -> Vec<SocketAddr> {
    addrs
        .iter()
        .flat_map(|a| {
            a.to_socket_addrs()
                .map(|i| i.collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect()
}

fn peer_sender(me: Identity, book: Book, to: u64, rx: Receiver<Frame>) {
    let timeout = Duration::from_millis(500);
    let mut conn: Option<Conn> = None;
    let mut next_try = Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(f) = rx.try_recv() {
            batch.push(f);
        }
        if conn.is_none() {
            if Instant::now() < next_try {
                continue;
            }
            let addrs = book.read().map(|b| b.get(&to).cloned()).ok().flatten();
            for a in resolve(&addrs.unwrap_or_default()) {
                match wire::connect(a, &me, timeout) {
                    Ok(c) if c.peer == to => {
                        let _ = c.set_read_timeout(None);
                        tracing::debug!("connected to host {to} at {a}");
                        conn = Some(c);
                        break;
                    }
                    Ok(c) => {
                        tracing::warn!("{a} answered as host {}, not {to}", c.peer);
                        c.shutdown();
                    }
                    Err(e) => {
                        tracing::debug!("host {to} at {a}: {}", crate::service::error_chain(&e))
                    }
                }
            }
            if conn.is_none() {
                // Messages for a host that is down are dropped; Raft resends.
                next_try = Instant::now() + Duration::from_millis(100);
                continue;
            }
        }
        if let Some(c) = conn.as_mut() {
            for f in &batch {
                if let Err(e) = c.send(f) {
                    tracing::debug!(
                        "lost connection to host {to}: {}",
                        crate::service::error_chain(&e)
                    );
                    c.shutdown();
                    conn = None;
                    break;
                }
            }
        }
    }
}

/// What every connection thread shares.
struct Shared {
    me: Identity,
    raft: Sender<Event>,
    book: Book,
    services: Services,
}

/// A running coordinator service.
pub struct Node {
    stop: Arc<AtomicBool>,
    raft: Option<std::thread::JoinHandle<()>>,
    /// Addresses it serves on.
    pub bound: Vec<SocketAddr>,
}

impl Node {
    /// Opens this host's replicas in `env` and serves on `listeners`,
    /// answering what the host serves itself with `services`.
    pub fn start(
        cfg: Config,
        env: Arc<dyn Env>,
        listeners: Listeners,
        services: Services,
    ) -> Result<Node, NodeError> {
        // The lease clock is anchored now, before anything can step the
        // wall clock.
        let _ = crate::group::lease_now_ms();
        let book: Book = Arc::new(RwLock::new(cfg.peers.clone()));
        let host = Host::open(
            &HostConfig {
                node: cfg.identity.node,
                data_dir: cfg.data_dir.clone(),
                init: cfg.init,
                timing: cfg.timing.clone(),
                level: cfg.level,
            },
            env,
            book.clone(),
        )?;
        let (tx, rx) = mpsc::channel::<Event>();
        let shared = Arc::new(Shared {
            me: cfg.identity.clone(),
            raft: tx,
            book: book.clone(),
            services,
        });
        for l in listeners.listeners {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("csv-accept".into())
                .spawn(move || acceptor(l, shared))
                .map_err(NodeError::Thread)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut raft = RaftLoop {
            host,
            timing: cfg.timing,
            net: Transport {
                me: cfg.identity,
                book,
                senders: HashMap::new(),
            },
        };
        let s2 = stop.clone();
        let raft = std::thread::Builder::new()
            .name("csv-raft".into())
            .spawn(move || raft.run(rx, s2))
            .map_err(NodeError::Thread)?;
        Ok(Node {
            stop,
            raft: Some(raft),
            bound: listeners.addrs,
        })
    }

    /// Waits until the service stops (it runs until the process ends).
    pub fn wait(mut self) {
        if let Some(h) = self.raft.take() {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct RaftLoop {
    host: Host,
    timing: Timing,
    net: Transport,
}

impl RaftLoop {
    fn run(&mut self, rx: Receiver<Event>, stop: Arc<AtomicBool>) {
        let mut next_tick = Instant::now() + self.timing.tick;
        while !stop.load(Ordering::Relaxed) {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(ev) => self.event(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(ev) = rx.try_recv() {
                self.event(ev);
            }
            if Instant::now() >= next_tick {
                next_tick += self.timing.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.timing.tick;
                }
                self.host.tick();
            }
            if let Err(e) = self.host.ready(&mut self.net) {
                // Storage failed under a replica (or it met a command it
                // cannot apply): continuing could acknowledge what is not
                // durable. Stop the host.
                tracing::error!(
                    "{}; stopping this host's coordinator",
                    crate::service::error_chain(&e)
                );
                std::process::exit(70);
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Raft(group, msgs) => self.host.step(group, msgs),
            Event::Request(r, w) => self.host.request(r, w),
            Event::Status(w) => {
                let _ = w.send(self.host.status());
            }
        }
    }
}

fn acceptor(l: TcpListener, shared: Arc<Shared>) {
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("csv-conn".into())
            .spawn(move || serve(s, &shared));
    }
}

/// The longest a drill's fault may last.
const MAX_FAULT: Duration = Duration::from_secs(600);

impl Shared {
    /// Answers what this host serves itself (off the Raft thread): block
    /// and file I/O, redirection, snapshot phases, faults, probes and its
    /// status. None: a request for the groups.
    fn serve_local(&self, r: &Request) -> Option<Response> {
        let result = match r.body.as_ref()? {
            request::Body::Block(op) => self.services.block.as_ref().map_or_else(
                || Err(missing("serves no volume")),
                |s| {
                    s.block(op).map(|data| {
                        if op.kind() == proto::BlockOpKind::Read {
                            Value::Data(proto::BlockData { data })
                        } else {
                            Value::Done(proto::Empty {})
                        }
                    })
                },
            ),
            request::Body::File(op) => self.services.file.as_ref().map_or_else(
                || Err(missing("mounts no volume")),
                |s| s.file(op).map(Value::File),
            ),
            request::Body::Admin(proto::Admin {
                action: Some(action),
            }) => match action {
                admin::Action::Status(_) => self.status().map(Value::Status),
                admin::Action::Redirect(q) => self.services.redirect.as_ref().map_or_else(
                    || Err(missing("mounts no volume")),
                    |s| s.redirect(q).map(|()| Value::Done(proto::Empty {})),
                ),
                admin::Action::SnapshotPhase(q) => self.services.snapshot.as_ref().map_or_else(
                    || Err(missing("mounts no volume")),
                    |s| s.phase(q).map(Value::Phase),
                ),
                admin::Action::Probe(q) => Ok(Value::Facts(proto::HostFacts {
                    node: self.me.node,
                    ..self.services.probe.as_ref().map_or_else(
                        || proto::HostFacts {
                            version: env!("CARGO_PKG_VERSION").into(),
                            now_ms: crate::group::now_ms(),
                            ..Default::default()
                        },
                        |p| p.facts(&q.luns),
                    )
                })),
                admin::Action::Fault(q) => self.fault(q).map(|()| Value::Done(proto::Empty {})),
                admin::Action::VmConsole(q) => self.services.console.as_ref().map_or_else(
                    || Err(missing("runs no VM")),
                    |s| s.console(q).map(Value::Console),
                ),
                _ => return None,
            },
            _ => return None,
        };
        Some(Response::of(
            r.seq,
            result.map(proto::Reply::of).map_err(|e| e.to_proto()),
        ))
    }

    /// This host's status: its groups (from the Raft thread) and what its
    /// status service reports.
    fn status(&self) -> Result<proto::NodeStatus, ServiceError> {
        let (tx, rx) = mpsc::channel();
        let groups = self
            .raft
            .send(Event::Status(tx))
            .ok()
            .and_then(|()| rx.recv_timeout(Duration::from_secs(5)).ok())
            .ok_or_else(|| {
                ServiceError::text(ErrorCode::Unavailable, "the Raft thread does not answer")
            })?;
        let s = self.services.status.as_ref();
        Ok(proto::NodeStatus {
            node: self.me.node,
            groups,
            volumes: s.map(|s| s.volumes()).unwrap_or_default(),
            load: s.and_then(|s| s.load()),
            vms: s.map(|s| s.vms()).unwrap_or_default(),
        })
    }

    /// Injects a failure drill's fault: network and clock faults here,
    /// the rest through the fault service.
    fn fault(&self, q: &proto::FaultReq) -> Result<(), ServiceError> {
        let dur = Duration::from_millis(q.duration_ms);
        if dur > MAX_FAULT {
            return Err(ServiceError::text(
                ErrorCode::Invalid,
                format!(
                    "a fault lasts at most {} s, not {} ms",
                    MAX_FAULT.as_secs(),
                    q.duration_ms
                ),
            ));
        }
        let service = || {
            self.services
                .fault
                .as_ref()
                .ok_or_else(|| missing("serves no volume"))
        };
        match q.kind() {
            FaultKind::NetCut => {
                let mut addrs = Vec::new();
                for a in &q.addrs {
                    addrs.push(a.parse::<SocketAddr>().map_err(|e| {
                        ServiceError::text(ErrorCode::Invalid, format!("address {a:?}: {e}"))
                    })?);
                }
                if addrs.is_empty() {
                    return Err(ServiceError::text(
                        ErrorCode::Invalid,
                        "net-cut needs the addresses to cut",
                    ));
                }
                tracing::warn!(?addrs, "failure drill: network cut for {dur:?}");
                // Once the answer has left (it may travel on a network cut).
                let until = Instant::now() + dur;
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    crate::faults::cut_network(&addrs, until);
                });
                Ok(())
            }
            FaultKind::Clock => {
                tracing::warn!("failure drill: clock {:+} ms off for {dur:?}", q.offset_ms);
                crate::faults::jump_clock(q.offset_ms, q.duration_ms);
                Ok(())
            }
            FaultKind::Heal => {
                tracing::warn!("failure drill: every fault healed");
                crate::faults::heal();
                match service() {
                    Ok(s) => s.fault(q),
                    Err(_) => Ok(()),
                }
            }
            FaultKind::Unspecified => Err(ServiceError::text(
                ErrorCode::Invalid,
                format!("unknown fault ({})", <FaultKind as proto::Label>::words()),
            )),
            FaultKind::SanCut | FaultKind::SanSlow | FaultKind::Crash => service()?.fault(q),
        }
    }
}

fn serve(s: std::net::TcpStream, shared: &Shared) {
    let peer = s.peer_addr().ok();
    let local = s.local_addr().ok();
    let mut c = match wire::accept(s, &shared.me, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "refused a connection from {peer:?}: {}",
                crate::service::error_chain(&e)
            );
            return;
        }
    };
    if c.joining {
        if let Some(local) = local {
            crate::join::serve_join(c, &shared.me, local, peer, &shared.book);
        }
        return;
    }
    // Hosts talk all the time (heartbeats); a peer connection silent this
    // long is dead (its network failed) and only holds a thread.
    let idle = (c.peer != 0).then(|| Duration::from_secs(30));
    let _ = c.set_read_timeout(idle);
    let _ = c.set_write_timeout(Some(Duration::from_secs(10)));
    loop {
        let f = match c.recv() {
            Ok(f) => f,
            Err(wire::WireError::Io(_)) => return,
            Err(e) => {
                tracing::warn!(
                    "closing the connection from {peer:?}: {}",
                    crate::service::error_chain(&e)
                );
                return;
            }
        };
        match f.body {
            Some(frame::Body::Raft(b)) => {
                if c.peer == 0 {
                    tracing::warn!("a client sent Raft messages; closing {peer:?}");
                    return;
                }
                let mut msgs = Vec::with_capacity(b.msgs.len());
                for m in &b.msgs {
                    match raft::eraftpb::Message::parse_from_bytes(m) {
                        Ok(m) if m.from == c.peer => msgs.push(m),
                        Ok(m) => {
                            tracing::warn!("host {} sent a message as host {}", c.peer, m.from)
                        }
                        Err(e) => tracing::warn!("bad Raft message from host {}: {e}", c.peer),
                    }
                }
                if shared.raft.send(Event::Raft(b.group, msgs)).is_err() {
                    return;
                }
            }
            Some(frame::Body::Request(r)) => {
                let resp = match shared.serve_local(&r) {
                    Some(resp) => resp,
                    None => {
                        let seq = r.seq;
                        let (wtx, wrx) = mpsc::channel();
                        if shared.raft.send(Event::Request(r, wtx)).is_err() {
                            return;
                        }
                        wrx.recv_timeout(Duration::from_secs(10))
                            .unwrap_or_else(|_| {
                                Response::of(
                                    seq,
                                    Err(proto::error(ErrorCode::Unavailable, "no answer in time")),
                                )
                            })
                    }
                };
                if c.send(&Frame::of(frame::Body::Response(resp))).is_err() {
                    return;
                }
            }
            Some(frame::Body::Response(_)) | None => {
                tracing::warn!("unexpected frame from {peer:?}; closing");
                return;
            }
        }
    }
}
