//! A host's coordinator service: its replicas of every group, the
//! connections to its peers, and the listener that serves clients.
//!
//! Threads:
//! - one *Raft thread* owns every [`Group`]: it ticks them, steps the
//!   messages peers send, proposes client commands, and handles each
//!   group's ready (so a group's storage is only touched from there);
//! - one *sender* per peer writes that peer's Raft messages on one
//!   authenticated connection, trying the peer's addresses in order (its
//!   networks) and reconnecting when one fails;
//! - one *acceptor* per listen address and one thread per accepted
//!   connection read frames and hand them to the Raft thread.
//!
//! Raft messages are unreliable by design: a message to a peer that is
//! down is dropped and raft-rs sends again.

use crate::cluster::{ClusterState, Effect};
use crate::codec;
use crate::group::{Group, Machine, Outbox, Timing, Waiter, CLUSTER};
use crate::meta::Volume;
use crate::proto::{self, admin, frame, request, response, ErrorCode, Frame, Request, Response};
use crate::wire::{self, Conn, Identity};
use prost::Message as _;
use protobuf::Message as _;
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Addresses to listen on (one per cluster network).
    pub listen: Vec<SocketAddr>,
    /// Known hosts and their addresses, preferred first (this host too).
    pub peers: BTreeMap<u64, Vec<String>>,
    /// Create the cluster group with `peers` as its voters if this host
    /// has no replica yet (the founding hosts); otherwise wait to be added.
    pub init: bool,
    /// Raft timing.
    pub timing: Timing,
}

/// Why a host's coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A listen address.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A group's replica.
    #[error("group {group}: {source}")]
    Group {
        /// Group.
        group: u64,
        /// Cause.
        source: crate::group::GroupError,
    },
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
}

enum Event {
    Raft(u64, Vec<raft::eraftpb::Message>),
    Request(Request, Waiter),
}

type Book = Arc<RwLock<BTreeMap<u64, Vec<String>>>>;

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
            let f = Frame {
                body: Some(frame::Body::Raft(proto::RaftBatch { group, msgs })),
            };
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
                    Err(e) => tracing::debug!("host {to} at {a}: {e}"),
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
                    tracing::debug!("lost connection to host {to}: {e}");
                    c.shutdown();
                    conn = None;
                    break;
                }
            }
        }
    }
}

/// How this host reaches each volume, as the filesystem layer reports it
/// (served in the status RPC).
pub type VolumeStates = Arc<RwLock<Vec<proto::VolumeState>>>;

/// The VMs this host runs, as its supervisor reports them (served in the
/// status RPC).
pub type VmStates = Arc<RwLock<Vec<proto::VmRuntime>>>;

/// What the filesystem layer does for peers: block I/O on the LUNs this
/// host reaches directly, and redirection of its own I/O on request.
pub trait BlockServer: Send + Sync {
    /// Serves one redirected block request; reads return the bytes.
    fn block(&self, op: &proto::BlockOp) -> Result<Vec<u8>, String>;
    /// Sends this host's I/O to `volume` through a peer (on) or over its
    /// own path (off); `mode` 1 sends its file I/O to the coordinator
    /// instead (FileSystemRedirected).
    fn redirect(&self, volume: u64, on: bool, mode: u32) -> Result<(), String>;
    /// Does a FileSystemRedirected host's file operation here, through
    /// this host's own mount of the volume.
    fn file(&self, op: &proto::FileOp) -> Result<proto::FileReply, String> {
        Err(format!(
            "this host does not serve files of Volume{}",
            op.volume
        ))
    }
    /// This host's paths to its volumes and its running VMs' memory, for
    /// `csvctl validate` and `csvctl inventory` (probes the LUNs).
    /// `candidates` are LUNs that are no volume yet (volume 0 in the answer).
    fn facts(&self, candidates: &[String]) -> Vec<proto::PathFacts> {
        let _ = candidates;
        vec![]
    }
    /// Injects a failure drill's SAN fault or crash on this host (network
    /// and clock faults are the coordinator's own).
    fn fault(&self, req: &proto::FaultReq) -> Result<(), String> {
        Err(format!("this host cannot inject a {:?} fault", req.kind))
    }
    /// Carries out one phase of a volume snapshot on this host.
    fn snapshot_phase(
        &self,
        req: &proto::SnapshotPhaseReq,
    ) -> Result<proto::SnapshotPhaseReply, String> {
        Err(format!(
            "this host cannot take part in snapshots of Volume{}",
            req.volume
        ))
    }
}

/// Where the block server is installed (by the filesystem layer, after
/// the node started).
pub type BlockSlot = Arc<RwLock<Option<Arc<dyn BlockServer>>>>;

/// A running coordinator service.
pub struct Node {
    /// The volume states this host reports; the filesystem layer fills it.
    pub volumes: VolumeStates,
    /// The VMs this host runs; the VM supervisor fills it.
    pub vms: VmStates,
    /// Memory this host gives to VMs (bytes; 0: all it has), reported
    /// with its load for placement.
    pub vm_memory: Arc<AtomicU64>,
    /// The filesystem layer's block server, once installed.
    pub block: BlockSlot,
    stop: Arc<AtomicBool>,
    raft: Option<std::thread::JoinHandle<()>>,
    /// Addresses actually bound (port 0 resolved).
    pub bound: Vec<SocketAddr>,
}

impl Node {
    /// Opens this host's replicas and starts serving.
    pub fn start(cfg: Config) -> Result<Node, NodeError> {
        // The lease clock is anchored now, before anything can step the
        // wall clock.
        let _ = crate::group::lease_now_ms();
        let me = cfg.identity.node;
        if me == 0 {
            return Err(NodeError::Config("node id must not be 0".into()));
        }
        if cfg.listen.is_empty() {
            return Err(NodeError::Config(
                "at least one listen address is needed".into(),
            ));
        }
        check_state_format(&cfg.data_dir).map_err(NodeError::Config)?;
        let (tx, rx) = mpsc::channel::<Event>();
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for a in &cfg.listen {
            let l =
                TcpListener::bind(a).map_err(|source| NodeError::Listen { addr: *a, source })?;
            bound.push(
                l.local_addr()
                    .map_err(|source| NodeError::Listen { addr: *a, source })?,
            );
            listeners.push(l);
        }
        let book: Book = Arc::new(RwLock::new(cfg.peers.clone()));
        let volumes: VolumeStates = Arc::default();
        let vms: VmStates = Arc::default();
        let block: BlockSlot = Arc::default();
        let mut state = RaftLoop::open(&cfg, book.clone())?;
        state.volumes = volumes.clone();
        state.vms = vms.clone();
        let vm_memory = state.vm_memory.clone();
        for l in listeners {
            let (tx, me, block, book) = (
                tx.clone(),
                cfg.identity.clone(),
                block.clone(),
                book.clone(),
            );
            std::thread::Builder::new()
                .name("csv-accept".into())
                .spawn(move || acceptor(l, me, tx, block, book))
                .map_err(|e| NodeError::Config(format!("cannot start a thread: {e}")))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let raft = std::thread::Builder::new()
            .name("csv-raft".into())
            .spawn(move || state.run(rx, s2))
            .map_err(|e| NodeError::Config(format!("cannot start a thread: {e}")))?;
        Ok(Node {
            volumes,
            vms,
            vm_memory,
            block,
            stop,
            raft: Some(raft),
            bound,
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

fn acceptor(l: TcpListener, me: Identity, tx: Sender<Event>, block: BlockSlot, book: Book) {
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let (me, tx, block, book) = (me.clone(), tx.clone(), block.clone(), book.clone());
        let _ = std::thread::Builder::new()
            .name("csv-conn".into())
            .spawn(move || serve(s, me, tx, block, book));
    }
}

/// Answers block I/O, redirect and snapshot-phase requests here, off the
/// Raft thread.
fn serve_local(block: &BlockSlot, r: &Request, node: u64) -> Option<Response> {
    // The filesystem layer's server, or the error for a host without one.
    let server = |none: &str| -> Result<Arc<dyn BlockServer>, proto::Error> {
        block
            .read()
            .ok()
            .and_then(|b| b.clone())
            .ok_or_else(|| codec::error(ErrorCode::NoGroup, none))
    };
    let invalid = |e: String| codec::error(ErrorCode::Invalid, e);
    let result = match &r.body {
        Some(request::Body::Block(op)) => Some(server("this host serves no volume").and_then(
            |s| match s.block(op) {
                Ok(data) if op.kind == 0 => Ok(proto::reply::Value::Data(proto::BlockData {
                    data: data.into(),
                })),
                Ok(_) => Ok(proto::reply::Value::Done(proto::Empty {})),
                Err(e) => Err(codec::error(ErrorCode::Unavailable, e)),
            },
        )),
        Some(request::Body::Admin(proto::Admin {
            action: Some(admin::Action::Redirect(q)),
        })) => Some(server("this host mounts no volume").and_then(|s| {
            s.redirect(q.volume, q.on, q.mode)
                .map(|()| proto::reply::Value::Done(proto::Empty {}))
                .map_err(invalid)
        })),
        Some(request::Body::File(op)) => Some(
            server("this host mounts no volume")
                .and_then(|s| {
                    s.file(op)
                        .map_err(|e| codec::error(ErrorCode::Unavailable, e))
                })
                .map(proto::reply::Value::File),
        ),
        Some(request::Body::Admin(proto::Admin {
            action: Some(admin::Action::Probe(q)),
        })) => {
            let paths = block
                .read()
                .ok()
                .and_then(|b| b.clone())
                .map(|s| s.facts(&q.luns))
                .unwrap_or_default();
            Some(Ok(proto::reply::Value::Facts(proto::HostFacts {
                node,
                ..host_facts(paths)
            })))
        }
        Some(request::Body::Admin(proto::Admin {
            action: Some(admin::Action::Fault(q)),
        })) => Some(
            fault(block, q)
                .map_err(invalid)
                .map(|()| proto::reply::Value::Done(proto::Empty {})),
        ),
        Some(request::Body::Admin(proto::Admin {
            action: Some(admin::Action::SnapshotPhase(q)),
        })) => Some(server("this host mounts no volume").and_then(|s| {
            s.snapshot_phase(q)
                .map(proto::reply::Value::Phase)
                .map_err(invalid)
        })),
        _ => None,
    }?;
    Some(Response {
        seq: r.seq,
        result: Some(match result {
            Ok(v) => response::Result::Reply(proto::Reply { value: Some(v) }),
            Err(e) => response::Result::Error(e),
        }),
    })
}

/// The longest a drill's fault may last.
const MAX_FAULT: Duration = Duration::from_secs(600);

/// Injects a failure drill's fault on this host.
fn fault(block: &BlockSlot, q: &proto::FaultReq) -> Result<(), String> {
    let dur = Duration::from_millis(q.duration_ms);
    if dur > MAX_FAULT {
        return Err(format!(
            "a fault lasts at most {} s, not {} ms",
            MAX_FAULT.as_secs(),
            q.duration_ms
        ));
    }
    let server = || {
        block
            .read()
            .ok()
            .and_then(|b| b.clone())
            .ok_or_else(|| "this host serves no volume".to_string())
    };
    match q.kind.as_str() {
        "net-cut" => {
            let mut addrs = Vec::new();
            for a in &q.addrs {
                addrs.push(
                    a.parse::<SocketAddr>()
                        .map_err(|e| format!("address {a:?}: {e}"))?,
                );
            }
            if addrs.is_empty() {
                return Err("net-cut needs the addresses to cut".into());
            }
            tracing::warn!(?addrs, "failure drill: network cut for {dur:?}");
            // Once the answer has left (it may travel on a network cut).
            let until = Instant::now() + dur;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                wire::drill::cut(&addrs, until);
            });
            Ok(())
        }
        "clock" => {
            tracing::warn!("failure drill: clock {:+} ms off for {dur:?}", q.offset_ms);
            crate::group::clock_drill::jump(q.offset_ms, q.duration_ms);
            Ok(())
        }
        "heal" => {
            tracing::warn!("failure drill: every fault healed");
            wire::drill::heal();
            crate::group::clock_drill::jump(0, 0);
            match server() {
                Ok(s) => s.fault(q),
                Err(_) => Ok(()),
            }
        }
        _ => server()?.fault(q),
    }
}

/// What this host knows of itself, for `csvctl validate`.
fn host_facts(paths: Vec<proto::PathFacts>) -> proto::HostFacts {
    let opens = |p: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .is_ok()
    };
    let load = crate::placement::sample_load();
    proto::HostFacts {
        node: 0,
        version: env!("CARGO_PKG_VERSION").to_string(),
        now_ms: crate::group::now_ms(),
        kvm: opens("/dev/kvm"),
        fuse: opens("/dev/fuse"),
        vm_memory: 0,
        mem_available: load.mem_available,
        listen: vec![],
        paths,
    }
}

/// Admits a host that came with a join token: the cluster gives it an id
/// and registers its addresses; it gets the cluster key, wrapped.
fn serve_join(
    mut c: wire::Conn,
    me: &Identity,
    local: SocketAddr,
    peer: Option<SocketAddr>,
    book: &Book,
) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let (seq, req) = match c.recv() {
        Ok(Frame {
            body:
                Some(frame::Body::Request(Request {
                    seq,
                    body:
                        Some(request::Body::Admin(proto::Admin {
                            action: Some(admin::Action::Join(j)),
                        })),
                    ..
                })),
        }) => (seq, j),
        other => {
            tracing::warn!(
                "a host with a join token from {peer:?} sent no join request: {other:?}"
            );
            return;
        }
    };
    let result = join_cluster(me, local, &req).map(|mut j| {
        j.wrapped_key = me.key.xor(&c.key_pad()).to_vec();
        // The hosts this one knows too: founders enter the registry a
        // moment after the first election, and the new host must reach
        // them from the start.
        if let Ok(b) = book.read() {
            for (id, addrs) in b.iter() {
                if !j.nodes.iter().any(|n| n.id == *id) {
                    j.nodes.push(proto::NodeInfo {
                        id: *id,
                        addrs: addrs.clone(),
                    });
                }
            }
        }
        j.nodes.sort_by_key(|n| n.id);
        tracing::info!(
            node = j.id,
            hostname = req.hostname,
            addrs = ?req.addrs,
            "a host joined with a join token"
        );
        proto::reply::Value::Joined(j)
    });
    let resp = Response {
        seq,
        result: Some(match result {
            Ok(v) => response::Result::Reply(proto::Reply { value: Some(v) }),
            Err(e) => {
                tracing::warn!("refused a join from {peer:?}: {}", e.message);
                response::Result::Error(e)
            }
        }),
    };
    let _ = c.send(&Frame {
        body: Some(frame::Body::Response(resp)),
    });
}

fn join_cluster(
    me: &Identity,
    local: SocketAddr,
    req: &proto::JoinReq,
) -> Result<proto::JoinReply, proto::Error> {
    if req.addrs.is_empty() || req.addrs.len() > 8 {
        return Err(codec::error(
            ErrorCode::Invalid,
            "a joining host gives 1 to 8 cluster addresses",
        ));
    }
    for a in &req.addrs {
        if resolve(std::slice::from_ref(a)).is_empty() {
            return Err(codec::error(
                ErrorCode::Invalid,
                format!("{a:?} is not a HOST:PORT address"),
            ));
        }
    }
    let client_id = Identity {
        node: 0,
        ..me.clone()
    };
    // Ids above every voter, even founders not registered yet.
    let floor = crate::client::node_status(&client_id, local, Duration::from_secs(2))
        .ok()
        .and_then(|s| {
            s.groups
                .iter()
                .find(|g| g.group == CLUSTER)
                .and_then(|g| g.voters.iter().chain(&g.learners).max().copied())
        })
        .unwrap_or(0)
        + 1;
    let mut cl = crate::client::Client::new(client_id, vec![local]);
    let r = cl
        .call(
            CLUSTER,
            request::Body::Cluster(proto::ClusterOp {
                op: Some(proto::cluster_op::Op::JoinNode(proto::NodeInfo {
                    id: floor,
                    addrs: req.addrs.clone(),
                })),
            }),
        )
        .map_err(|e| match e {
            crate::client::ClientError::Refused(p) => p,
            other => codec::error(ErrorCode::Unavailable, other.to_string()),
        })?;
    match r.value {
        Some(proto::reply::Value::Joined(j)) => Ok(j),
        v => Err(codec::error(
            ErrorCode::Unavailable,
            format!("unexpected answer to a join: {v:?}"),
        )),
    }
}

fn serve(s: std::net::TcpStream, me: Identity, tx: Sender<Event>, block: BlockSlot, book: Book) {
    let peer = s.peer_addr().ok();
    let local = s.local_addr().ok();
    let mut c = match wire::accept(s, &me, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("refused a connection from {peer:?}: {e}");
            return;
        }
    };
    if c.joining {
        if let Some(local) = local {
            serve_join(c, &me, local, peer, &book);
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
                tracing::warn!("closing the connection from {peer:?}: {e}");
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
                if tx.send(Event::Raft(b.group, msgs)).is_err() {
                    return;
                }
            }
            Some(frame::Body::Request(r)) => {
                if let Some(resp) = serve_local(&block, &r, me.node) {
                    let f = Frame {
                        body: Some(frame::Body::Response(resp)),
                    };
                    if c.send(&f).is_err() {
                        return;
                    }
                    continue;
                }
                let seq = r.seq;
                let (wtx, wrx) = mpsc::channel();
                if tx.send(Event::Request(r, wtx)).is_err() {
                    return;
                }
                let resp = wrx
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| Response {
                        seq,
                        result: Some(response::Result::Error(codec::error(
                            ErrorCode::Unavailable,
                            "no answer in time",
                        ))),
                    });
                let f = Frame {
                    body: Some(frame::Body::Response(resp)),
                };
                if c.send(&f).is_err() {
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

/// The file in the state directory that names its layout and version.
pub const STATE_FORMAT_FILE: &str = "FORMAT";
/// The layout this build writes: `csv-state MAJOR.MINOR`. A newer minor
/// only adds files an older build ignores; a newer major is refused.
pub const STATE_FORMAT: (u32, u32) = (1, 0);

/// Checks (or, in a new or older directory, records) the state
/// directory's format, so a downgrade cannot misread newer state.
pub fn check_state_format(dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("state directory {}: {e}", dir.display()))?;
    let f = dir.join(STATE_FORMAT_FILE);
    let (major, minor) = STATE_FORMAT;
    match std::fs::read_to_string(&f) {
        Ok(text) => {
            let v = text.trim().strip_prefix("csv-state ").and_then(|v| {
                let (a, b) = v.split_once('.')?;
                Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
            });
            match v {
                Some((a, _)) if a == major => Ok(()),
                Some((a, b)) if a > major => Err(format!(
                    "{} holds state format {a}.{b}, newer than this csvd understands ({major}.{minor}): run the csvd that wrote it, or a newer one",
                    dir.display()
                )),
                Some((a, b)) => Err(format!(
                    "{} holds state format {a}.{b}, older than this csvd can read ({major}.{minor})",
                    dir.display()
                )),
                None => Err(format!(
                    "{} is not a csv state format file (expected `csv-state {major}.{minor}`)",
                    f.display()
                )),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_durably(&f, format!("csv-state {major}.{minor}\n").as_bytes())
                .map_err(|e| format!("{}: {e}", f.display()))
        }
        Err(e) => Err(format!("{}: {e}", f.display())),
    }
}

/// The file in a volume replica's directory that records the volume's
/// parameters (the state before the group's first entry).
const VOLUME_INFO: &str = "volume.info";

fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

struct RaftLoop {
    me: u64,
    dir: PathBuf,
    timing: Timing,
    groups: BTreeMap<u64, Group>,
    net: Transport,
    book: Book,
    /// Hosts registered in the cluster group (every one is a replica of
    /// every group).
    members: Vec<u64>,
    /// Hosts evicted from the cluster: taken out of every group.
    removed: Vec<u64>,
    last_register: Instant,
    volumes: VolumeStates,
    vms: VmStates,
    vm_memory: Arc<AtomicU64>,
}

impl RaftLoop {
    fn open(cfg: &Config, book: Book) -> Result<RaftLoop, NodeError> {
        let me = cfg.identity.node;
        let mut l = RaftLoop {
            me,
            dir: cfg.data_dir.clone(),
            timing: cfg.timing.clone(),
            groups: BTreeMap::new(),
            net: Transport {
                me: cfg.identity.clone(),
                book: book.clone(),
                senders: HashMap::new(),
            },
            book,
            members: Vec::new(),
            removed: Vec::new(),
            last_register: Instant::now(),
            volumes: Arc::default(),
            vms: Arc::default(),
            vm_memory: Arc::default(),
        };
        let init: Vec<u64> = if cfg.init {
            cfg.peers.keys().copied().collect()
        } else {
            vec![]
        };
        if cfg.init && !init.contains(&me) {
            return Err(NodeError::Config(format!(
                "--init lists the founding hosts; host {me} must be one of them"
            )));
        }
        let (g, fx) = Group::open(
            CLUSTER,
            me,
            &l.group_dir(CLUSTER),
            &init,
            Machine::Cluster(ClusterState::default()),
            l.timing.clone(),
        )
        .map_err(|source| NodeError::Group {
            group: CLUSTER,
            source,
        })?;
        l.groups.insert(CLUSTER, g);
        l.effects(fx);
        // Volume replicas this host already has: open them now rather than
        // when the cluster log is replayed (which waits for a leader).
        if let Ok(rd) = std::fs::read_dir(&l.dir) {
            let mut infos = Vec::new();
            for e in rd.flatten() {
                let p = e.path().join(VOLUME_INFO);
                if let Ok(b) = std::fs::read(&p) {
                    match proto::VolumeInfo::decode(b.as_slice()) {
                        Ok(v) => infos.push(Effect::Volume(v)),
                        Err(e) => return Err(NodeError::Config(format!("{}: {e}", p.display()))),
                    }
                }
            }
            l.effects(infos);
        }
        Ok(l)
    }

    fn group_dir(&self, g: u64) -> PathBuf {
        if g == CLUSTER {
            self.dir.join("cluster")
        } else {
            self.dir.join(format!("volume{g}"))
        }
    }

    fn effects(&mut self, fx: Vec<Effect>) {
        for f in fx {
            match f {
                Effect::Node(n) => {
                    if let Ok(mut b) = self.book.write() {
                        b.insert(n.id, n.addrs.clone());
                    }
                    if !self.members.contains(&n.id) {
                        self.members.push(n.id);
                    }
                }
                Effect::RemoveNode(n) => {
                    self.members.retain(|m| *m != n);
                    if !self.removed.contains(&n) {
                        self.removed.push(n);
                    }
                    if let Ok(mut b) = self.book.write() {
                        b.remove(&n);
                    }
                    tracing::info!(node = n, "host removed from the cluster");
                }
                Effect::RemoveVolume(n) => {
                    if self.groups.remove(&n).is_some() {
                        // Keep the replica's files (a removed volume's
                        // metadata is not destroyed by accident); mark it
                        // so it is not reopened at the next start.
                        let dir = self.group_dir(n);
                        let _ = std::fs::rename(dir.join(VOLUME_INFO), dir.join("volume.removed"));
                        tracing::info!("Volume{n} removed from the cluster");
                    }
                }
                Effect::Volume(v) => {
                    if self.groups.contains_key(&v.number) {
                        continue;
                    }
                    if self.group_dir(v.number).join("volume.removed").exists() {
                        continue;
                    }
                    let init = if v.voters.contains(&self.me) {
                        v.voters.clone()
                    } else {
                        vec![]
                    };
                    let dir = self.group_dir(v.number);
                    if let Err(e) = std::fs::create_dir_all(&dir)
                        .and_then(|()| write_durably(&dir.join(VOLUME_INFO), &v.encode_to_vec()))
                    {
                        tracing::error!(
                            "cannot record Volume{} in {}: {e}",
                            v.number,
                            dir.display()
                        );
                        continue;
                    }
                    let base =
                        Machine::Volume(Box::new(Volume::new(v.data_start, v.capacity, v.now)));
                    match Group::open(
                        v.number,
                        self.me,
                        &self.group_dir(v.number),
                        &init,
                        base,
                        self.timing.clone(),
                    ) {
                        Ok((g, more)) => {
                            tracing::info!("hosting a replica of Volume{}", v.number);
                            self.groups.insert(v.number, g);
                            debug_assert!(more.is_empty());
                        }
                        Err(e) => {
                            tracing::error!("cannot open the replica of Volume{}: {e}", v.number)
                        }
                    }
                }
            }
        }
    }

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
                let members = self.members.clone();
                for g in self.groups.values_mut() {
                    g.tick(&members, &self.removed);
                }
                self.register_founders();
            }
            let mut fx = Vec::new();
            for g in self.groups.values_mut() {
                match g.on_ready(&mut self.net) {
                    Ok(f) => fx.extend(f),
                    Err(e) => {
                        // Storage failed under a replica: continuing could
                        // acknowledge what is not durable. Stop the host.
                        tracing::error!("group {}: {e}; stopping this host's coordinator", g.id);
                        std::process::exit(70);
                    }
                }
            }
            self.effects(fx);
        }
    }

    /// The cluster leader records the addresses of founding hosts that are
    /// voters but not yet registered.
    fn register_founders(&mut self) {
        let Some(g) = self.groups.get_mut(&CLUSTER) else {
            return;
        };
        if !g.is_leader() || self.last_register.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_register = Instant::now();
        let Machine::Cluster(c) = g.machine() else {
            return;
        };
        let voters = g.status().voters;
        let missing: Vec<u64> = voters
            .into_iter()
            .filter(|v| !c.has_node(*v) && !c.was_removed(*v))
            .collect();
        for id in missing {
            let addrs = self.book.read().ok().and_then(|b| b.get(&id).cloned());
            if let Some(addrs) = addrs {
                let (w, _r) = mpsc::channel();
                let op = proto::ClusterOp {
                    op: Some(proto::cluster_op::Op::RegisterNode(proto::NodeInfo {
                        id,
                        addrs,
                    })),
                };
                g.propose(0, 0, proto::command::Body::Cluster(op), w);
            }
        }
    }

    fn redirect(&self, g: &Group) -> Response {
        let leader = g.leader();
        let addrs = if leader == 0 {
            vec![]
        } else {
            self.book
                .read()
                .ok()
                .and_then(|b| b.get(&leader).cloned())
                .unwrap_or_default()
        };
        Response {
            seq: 0,
            result: Some(response::Result::Redirect(proto::Redirect {
                leader,
                addrs,
            })),
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Raft(group, msgs) => {
                if let Some(g) = self.groups.get_mut(&group) {
                    for m in msgs {
                        g.step(m);
                    }
                }
            }
            Event::Request(r, w) => self.request(r, w),
        }
    }

    fn request(&mut self, r: Request, w: Waiter) {
        let seq = r.seq;
        let fail = |w: &Waiter, code, msg: String| {
            let _ = w.send(Response {
                seq,
                result: Some(response::Result::Error(codec::error(code, msg))),
            });
        };
        let Some(body) = r.body else {
            return fail(&w, ErrorCode::BadRequest, "empty request".into());
        };
        if let request::Body::Admin(proto::Admin {
            action: Some(admin::Action::Status(_)),
        }) = &body
        {
            let _ = w.send(Response {
                seq,
                result: Some(response::Result::Reply(proto::Reply {
                    value: Some(proto::reply::Value::Status(proto::NodeStatus {
                        node: self.me,
                        groups: self.groups.values().map(|g| g.status()).collect(),
                        volumes: self.volumes.read().map(|v| v.clone()).unwrap_or_default(),
                        load: Some(crate::proto::HostLoadInfo {
                            vm_memory: self.vm_memory.load(Ordering::Relaxed),
                            ..crate::placement::sample_load()
                        }),
                        vms: self.vms.read().map(|v| v.clone()).unwrap_or_default(),
                    })),
                })),
            });
            return;
        }
        let group = if matches!(
            body,
            request::Body::Admin(proto::Admin {
                action: Some(admin::Action::AddNode(_))
            })
        ) {
            CLUSTER
        } else {
            r.group
        };
        let Some(g) = self.groups.get(&group) else {
            return fail(
                &w,
                ErrorCode::NoGroup,
                format!("host {} has no replica of group {group}", self.me),
            );
        };
        if !g.is_leader() {
            let mut resp = self.redirect(g);
            resp.seq = seq;
            let _ = w.send(resp);
            return;
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        match body {
            request::Body::Op(op) => g.propose(r.client, seq, proto::command::Body::Volume(op), w),
            request::Body::Cluster(mut op) => {
                if let Some(proto::cluster_op::Op::AddVolume(v)) = op.op.as_mut() {
                    // A volume's group starts on the cluster's voters unless
                    // told otherwise; its clock starts at the leader's.
                    if v.voters.is_empty() {
                        v.voters = g.status().voters;
                    }
                    v.now = crate::group::lease_now_ms();
                }
                g.propose(r.client, seq, proto::command::Body::Cluster(op), w)
            }
            request::Body::Read(q) => g.read(seq, q, w),
            request::Body::Block(_) | request::Body::File(_) => fail(
                &w,
                ErrorCode::BadRequest,
                "block and file requests are served by the connection, not the groups".into(),
            ),
            request::Body::Admin(a) => match a.action {
                Some(admin::Action::TransferLeader(to)) => g.transfer(to, seq, w),
                Some(admin::Action::AddNode(n)) => {
                    let op = proto::ClusterOp {
                        op: Some(proto::cluster_op::Op::RegisterNode(n)),
                    };
                    g.propose(r.client, seq, proto::command::Body::Cluster(op), w)
                }
                Some(admin::Action::Status(_))
                | Some(admin::Action::Redirect(_))
                | Some(admin::Action::Join(_))
                | Some(admin::Action::Probe(_))
                | Some(admin::Action::SnapshotPhase(_))
                | Some(admin::Action::Fault(_))
                | None => fail(
                    &w,
                    ErrorCode::BadRequest,
                    "unknown administrative action".into(),
                ),
            },
        }
    }
}

#[cfg(test)]
mod format_tests {
    #[test]
    fn the_state_directory_records_its_format_and_refuses_a_newer_one() {
        let d = tempfile::tempdir().unwrap();
        super::check_state_format(d.path()).unwrap();
        let f = d.path().join(super::STATE_FORMAT_FILE);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "csv-state 1.0\n");
        super::check_state_format(d.path()).unwrap();
        std::fs::write(&f, "csv-state 1.7\n").unwrap();
        super::check_state_format(d.path()).unwrap();
        std::fs::write(&f, "csv-state 2.0\n").unwrap();
        let e = super::check_state_format(d.path()).unwrap_err();
        assert!(e.contains("newer"), "{e}");
        std::fs::write(&f, "garbage").unwrap();
        assert!(super::check_state_format(d.path()).is_err());
    }
}
