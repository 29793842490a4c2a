//! The client of the coordinator service: finds the leader of a group,
//! follows redirects, retries through elections and failed networks, and
//! numbers its requests so that a retried command is applied once.
//!
//! A client is blocking and handles one request at a time; run one per
//! thread for concurrency. Every host of the cluster can be given as an
//! endpoint, each with several addresses (one per cluster network): when a
//! connection fails or times out, the client moves on to the next address.

use crate::proto::{
    self, admin, read, reply::Value, request, response, volume_op, ErrorCode, Frame, Request,
};
use crate::wire::{self, Conn, Identity};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The service answered with an error (a metadata error such as
    /// `NotFound`, or a refused request).
    #[error("{}", .0.message)]
    Refused(proto::Error),
    /// No leader answered before the deadline.
    #[error("no answer from the cluster within {secs:.1} s (last: {last})")]
    Unavailable {
        /// The deadline.
        secs: f64,
        /// The last failure seen.
        last: String,
    },
    /// The answer does not fit the question.
    #[error("unexpected answer: {0}")]
    BadReply(String),
}

impl ClientError {
    /// The service's error code, if it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(e) => ErrorCode::try_from(e.code).ok(),
            _ => None,
        }
    }
}

/// A client of the coordinator service.
#[derive(Debug)]
pub struct Client {
    me: Identity,
    endpoints: Vec<SocketAddr>,
    cursor: usize,
    prefer: Vec<SocketAddr>,
    conn: Option<Conn>,
    id: u64,
    seq: u64,
    /// How long one request may take, retries included.
    pub timeout: Duration,
    /// How long one attempt waits for its answer.
    pub attempt_timeout: Duration,
    /// How long a connection attempt may take before the next address is
    /// tried (short: a host or network that is down must not stall).
    pub connect_timeout: Duration,
}

/// Result of a request.
pub type Result<T> = std::result::Result<T, ClientError>;

impl Client {
    /// A client that may reach the cluster at `endpoints`.
    pub fn new(me: Identity, endpoints: Vec<SocketAddr>) -> Client {
        Client {
            me,
            endpoints,
            cursor: 0,
            prefer: Vec::new(),
            conn: None,
            id: wire::random_u64() | 1,
            seq: 0,
            timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_millis(500),
        }
    }

    /// Runs `f` with this client's patience cut to `within`, for each
    /// request as a whole and for each attempt (the live connection's
    /// read timeout included), then gives it back. For callers to whom
    /// an answer later than that is worth nothing, so that a coordinator
    /// out of reach costs them `within`, not the full timeout.
    pub fn with_patience<R>(&mut self, within: Duration, f: impl FnOnce(&mut Client) -> R) -> R {
        let (timeout, attempt) = (self.timeout, self.attempt_timeout);
        self.timeout = timeout.min(within);
        self.attempt_timeout = attempt.min(within);
        if let Some(c) = &self.conn {
            let _ = c.set_read_timeout(Some(self.attempt_timeout));
        }
        let r = f(self);
        self.timeout = timeout;
        self.attempt_timeout = attempt;
        if let Some(c) = &self.conn {
            let _ = c.set_read_timeout(Some(attempt));
        }
        r
    }

    /// The host this client is connected to (0: none).
    pub fn connected_to(&self) -> u64 {
        self.conn.as_ref().map_or(0, |c| c.peer)
    }

    /// Connects to the first endpoint that answers; when none does, says
    /// why in `last` and returns false.
    fn connect(&mut self, last: &mut String) -> bool {
        let mut order: Vec<SocketAddr> = std::mem::take(&mut self.prefer);
        let n = self.endpoints.len();
        for i in 0..n {
            order.push(self.endpoints[(self.cursor + i) % n]);
        }
        if order.is_empty() {
            *last = "no endpoints".into();
        }
        for a in order {
            match wire::connect(a, &self.me, self.connect_timeout) {
                Ok(c) => {
                    let _ = c.set_read_timeout(Some(self.attempt_timeout));
                    self.conn = Some(c);
                    return true;
                }
                Err(e) => *last = format!("{a}: {}", crate::service::error_chain(&e)),
            }
        }
        self.cursor = (self.cursor + 1) % n.max(1);
        false
    }

    fn drop_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            c.shutdown();
        }
        self.cursor = (self.cursor + 1) % self.endpoints.len().max(1);
    }

    /// Sends a request to the leader of `group` and returns its reply.
    pub fn call(&mut self, group: u64, body: request::Body) -> Result<proto::Reply> {
        self.seq += 1;
        let req = Request {
            client: self.id,
            seq: self.seq,
            group,
            body: Some(body),
        };
        self.send_until_answered(req)
    }

    fn send_until_answered(&mut self, req: Request) -> Result<proto::Reply> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut last = String::new();
        let frame = Frame {
            body: Some(proto::frame::Body::Request(req.clone())),
        };
        loop {
            if Instant::now() >= deadline {
                return Err(ClientError::Unavailable {
                    secs: self.timeout.as_secs_f64(),
                    last,
                });
            }
            if self.conn.is_none() && !self.connect(&mut last) {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let Some(c) = self.conn.as_mut() else {
                continue;
            };
            let got = c.send(&frame).and_then(|()| loop {
                // Skip answers to earlier attempts on this connection.
                match c.recv()? {
                    Frame {
                        body: Some(proto::frame::Body::Response(r)),
                    } if r.seq == req.seq => break Ok(r),
                    Frame {
                        body: Some(proto::frame::Body::Response(_)),
                    } => continue,
                    _ => {
                        break Err(wire::WireError::Frame(
                            "the service sent something other than a response".into(),
                        ))
                    }
                }
            });
            let resp = match got {
                Ok(r) => r,
                Err(e) => {
                    last = format!("host {}: {}", c.peer, crate::service::error_chain(&e));
                    self.drop_conn();
                    continue;
                }
            };
            match resp.result {
                Some(response::Result::Reply(r)) => return Ok(r),
                Some(response::Result::Error(e)) if e.code == ErrorCode::Unavailable as i32 => {
                    last = e.message;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Some(response::Result::Error(e)) if e.code == ErrorCode::NoGroup as i32 => {
                    // A host that has not (yet) opened its replica: ask another.
                    last = e.message;
                    self.drop_conn();
                    std::thread::sleep(Duration::from_millis(10));
                }
                Some(response::Result::Error(e)) => return Err(ClientError::Refused(e)),
                Some(response::Result::Redirect(r)) => {
                    let here = self.connected_to();
                    if r.leader != 0 && r.leader != here && !r.addrs.is_empty() {
                        last = format!("redirected to host {}", r.leader);
                        self.prefer = crate::node::resolve(&r.addrs);
                        self.drop_conn();
                    } else {
                        last = format!("host {here} knows no leader (election running)");
                        self.drop_conn();
                        std::thread::sleep(Duration::from_millis(30));
                    }
                }
                None => return Err(ClientError::BadReply("empty response".into())),
            }
        }
    }

    fn op(&mut self, vol: u64, op: volume_op::Op) -> Result<proto::Reply> {
        self.call(vol, request::Body::Op(proto::VolumeOp { op: Some(op) }))
    }

    /// Any linearizable read.
    pub fn read(&mut self, group: u64, q: read::Query) -> Result<proto::Reply> {
        self.call(group, request::Body::Read(proto::Read { query: Some(q) }))
    }

    /// Creates a file, directory or symlink (`target`) in `vol`.
    pub fn create(
        &mut self,
        vol: u64,
        parent: u64,
        name: &str,
        kind: proto::NodeKind,
        mode: u32,
        target: &str,
    ) -> Result<proto::Attr> {
        let r = self.op(
            vol,
            volume_op::Op::Create(proto::CreateOp {
                parent,
                name: name.into(),
                kind: kind as i32,
                mode,
                uid: 0,
                gid: 0,
                target: target.into(),
                ..Default::default()
            }),
        )?;
        attr(r)
    }

    /// Removes a name (`rmdir` for a directory).
    pub fn unlink(&mut self, vol: u64, parent: u64, name: &str, rmdir: bool) -> Result<()> {
        self.op(
            vol,
            volume_op::Op::Unlink(proto::UnlinkOp {
                parent,
                name: name.into(),
                rmdir,
                now: 0,
            }),
        )
        .map(|_| ())
    }

    /// Renames.
    pub fn rename(
        &mut self,
        vol: u64,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
    ) -> Result<()> {
        self.op(
            vol,
            volume_op::Op::Rename(proto::RenameOp {
                parent,
                name: name.into(),
                new_parent,
                new_name: new_name.into(),
                now: 0,
            }),
        )
        .map(|_| ())
    }

    /// Sets attributes (absent ones stay).
    pub fn setattr(&mut self, vol: u64, op: proto::SetAttrOp) -> Result<proto::Attr> {
        attr(self.op(vol, volume_op::Op::SetAttr(op))?)
    }

    /// Any volume command.
    pub fn volume_op(&mut self, vol: u64, op: volume_op::Op) -> Result<proto::Reply> {
        self.op(vol, op)
    }

    /// Looks a name up (linearizable).
    pub fn lookup(&mut self, vol: u64, parent: u64, name: &str) -> Result<proto::Attr> {
        attr(self.read(
            vol,
            read::Query::Lookup(proto::LookupQ {
                parent,
                name: name.into(),
            }),
        )?)
    }

    /// Attributes of an inode (linearizable).
    pub fn getattr(&mut self, vol: u64, ino: u64) -> Result<proto::Attr> {
        attr(self.read(vol, read::Query::GetAttr(ino))?)
    }

    /// Directory entries (linearizable).
    pub fn readdir(&mut self, vol: u64, ino: u64) -> Result<Vec<proto::DirEntry>> {
        self.listing(vol, ino).map(|e| e.entries)
    }

    /// A directory's entries and its own attributes (linearizable; the
    /// attributes are missing from a coordinator of an older build).
    pub fn listing(&mut self, vol: u64, ino: u64) -> Result<proto::DirEntries> {
        match self.read(vol, read::Query::ReadDir(ino))?.value {
            Some(Value::Entries(e)) => Ok(e),
            v => Err(ClientError::BadReply(format!("{v:?}"))),
        }
    }

    /// Space and inode use of a volume (linearizable).
    pub fn usage(&mut self, vol: u64) -> Result<proto::VolumeUsage> {
        match self.read(vol, read::Query::Usage(proto::Empty {}))?.value {
            Some(Value::Usage(u)) => Ok(u),
            v => Err(ClientError::BadReply(format!("{v:?}"))),
        }
    }

    /// The write-lease history of a file of a volume (`ino` 0: of every
    /// file), oldest first (linearizable).
    pub fn lease_history(&mut self, vol: u64, ino: u64) -> Result<Vec<proto::LeaseEvent>> {
        match self.read(vol, read::Query::LeaseHistory(ino))?.value {
            Some(Value::LeaseHistory(h)) => Ok(h.events),
            v => Err(ClientError::BadReply(format!("{v:?}"))),
        }
    }

    /// The volume's consistency check, run by its coordinator on its
    /// current state: the problems found (none: consistent).
    pub fn check_volume(&mut self, vol: u64) -> Result<Vec<String>> {
        match self.read(vol, read::Query::Check(proto::Empty {}))?.value {
            Some(Value::Text(t)) => Ok(t.lines().map(str::to_string).collect()),
            v => Err(ClientError::BadReply(format!("{v:?}"))),
        }
    }

    /// The snapshots of a volume, oldest first (linearizable).
    pub fn snapshots(&mut self, vol: u64) -> Result<Vec<proto::SnapshotInfo>> {
        match self
            .read(vol, read::Query::Snapshots(proto::Empty {}))?
            .value
        {
            Some(Value::Snapshots(l)) => Ok(l.snapshots),
            v => Err(ClientError::BadReply(format!("{v:?}"))),
        }
    }

    /// Takes a snapshot of a volume (one metadata commit, no data copied):
    /// up to 512 kept where the cluster's feature level allows it, else 64.
    pub fn create_snapshot(&mut self, vol: u64, name: &str) -> Result<()> {
        let op = |limit| {
            volume_op::Op::CreateSnapshot(proto::SnapshotOp {
                name: name.into(),
                now: 0,
                limit,
            })
        };
        match self.volume_op(vol, op(crate::meta::MAX_SNAPSHOTS as u32)) {
            Err(e) if e.code() == Some(ErrorCode::FeatureLevel) => {
                self.volume_op(vol, op(0)).map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }

    /// Deletes a snapshot of a volume.
    pub fn delete_snapshot(&mut self, vol: u64, name: &str) -> Result<()> {
        self.volume_op(
            vol,
            volume_op::Op::DeleteSnapshot(proto::SnapshotOp {
                name: name.into(),
                ..Default::default()
            }),
        )
        .map(|_| ())
    }

    /// A file's extents (with their shared flags).
    pub fn extents(&mut self, vol: u64, ino: u64) -> Result<Vec<proto::Extent>> {
        match self.read(vol, read::Query::Extents(ino))?.value {
            Some(Value::Extents(l)) => Ok(l.extents),
            v => Err(ClientError::BadReply(format!("{v:?}"))),
        }
    }

    /// Removes VolumeN from the cluster.
    pub fn remove_volume(&mut self, number: u64) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::RemoveVolume(number))
    }

    /// The cluster registry (linearizable).
    pub fn cluster_info(&mut self) -> Result<proto::ClusterInfo> {
        match self
            .read(crate::group::CLUSTER, read::Query::Cluster(proto::Empty {}))?
            .value
        {
            Some(Value::Cluster(c)) => Ok(c),
            v => Err(ClientError::BadReply(format!("{v:?}"))),
        }
    }

    /// Creates VolumeN on a LUN; its group starts on the cluster's voters
    /// when `voters` is empty.
    pub fn add_volume(&mut self, info: proto::VolumeInfo) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::AddVolume(info))
    }

    /// Records (or replaces) a VM role.
    pub fn set_vm_role(&mut self, role: proto::VmRole) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::SetVmRole(role))
    }

    /// Puts a host in maintenance (no VM is placed there) or takes it out.
    pub fn set_draining(&mut self, node: u64, draining: bool) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::SetDraining(proto::NodeDraining {
            node,
            draining,
        }))
    }

    /// Forgets a VM role.
    pub fn remove_vm_role(&mut self, name: &str) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::RemoveVmRole(name.to_string()))
    }

    /// Adds a host: it becomes a learner of every group, then a voter.
    pub fn add_node(&mut self, id: u64, addrs: Vec<String>) -> Result<()> {
        self.call(
            crate::group::CLUSTER,
            request::Body::Admin(proto::Admin {
                action: Some(admin::Action::AddNode(proto::NodeInfo { id, addrs })),
            }),
        )
        .map(|_| ())
    }

    /// Commits one cluster command (the registry's group).
    /// Sets VolumeN's snapshot schedule (its run state is kept).
    pub fn set_schedule(&mut self, s: proto::SnapshotSchedule) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::SetSchedule(Box::new(s)))
    }

    /// Records a schedule's run state (the cluster leader's runs).
    pub fn schedule_state(&mut self, s: proto::SnapshotSchedule) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::ScheduleState(Box::new(s)))
    }

    /// Stops VolumeN's snapshot schedule.
    pub fn remove_schedule(&mut self, vol: u64) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::RemoveSchedule(vol))
    }

    fn cluster_op(&mut self, op: proto::cluster_op::Op) -> Result<()> {
        self.call(
            crate::group::CLUSTER,
            request::Body::Cluster(proto::ClusterOp { op: Some(op) }),
        )
        .map(|_| ())
    }

    /// Evicts host `id`: it leaves every group; its id is never reused.
    pub fn remove_node(&mut self, id: u64) -> Result<()> {
        self.cluster_op(proto::cluster_op::Op::RemoveNode(id))
    }

    /// Moves the leadership of `group` to host `to`; returns once it moved.
    pub fn transfer_leader(&mut self, group: u64, to: u64) -> Result<()> {
        self.call(
            group,
            request::Body::Admin(proto::Admin {
                action: Some(admin::Action::TransferLeader(to)),
            }),
        )
        .map(|_| ())
    }
}

fn attr(r: proto::Reply) -> Result<proto::Attr> {
    match r.value {
        Some(Value::Attr(a)) => Ok(a),
        v => Err(ClientError::BadReply(format!("{v:?}"))),
    }
}

/// Asks the host at `addr` itself (not a group's leader) to do `action`.
fn ask_host(
    me: &Identity,
    addr: SocketAddr,
    action: admin::Action,
    timeout: Duration,
) -> Result<proto::Reply> {
    let unavailable = |e: wire::WireError| ClientError::Unavailable {
        secs: timeout.as_secs_f64(),
        last: format!("{addr}: {}", crate::service::error_chain(&e)),
    };
    let mut c = wire::connect(addr, me, timeout).map_err(unavailable)?;
    c.set_read_timeout(Some(timeout))
        .map_err(|e| unavailable(e.into()))?;
    let f = Frame {
        body: Some(proto::frame::Body::Request(Request {
            client: 0,
            seq: 1,
            group: 0,
            body: Some(request::Body::Admin(proto::Admin {
                action: Some(action),
            })),
        })),
    };
    c.send(&f).map_err(unavailable)?;
    match c.recv().map_err(unavailable)?.body {
        Some(proto::frame::Body::Response(proto::Response {
            result: Some(response::Result::Reply(r)),
            ..
        })) => Ok(r),
        Some(proto::frame::Body::Response(proto::Response {
            result: Some(response::Result::Error(e)),
            ..
        })) => Err(ClientError::Refused(e)),
        other => Err(ClientError::BadReply(format!("{other:?}"))),
    }
}

/// The status of one host's groups, asked of that host directly.
pub fn node_status(
    me: &Identity,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<proto::NodeStatus> {
    match ask_host(me, addr, admin::Action::Status(proto::Empty {}), timeout)?.value {
        Some(Value::Status(s)) => Ok(s),
        v => Err(ClientError::BadReply(format!("{v:?}"))),
    }
}

/// The status of a registered host, from the first of its addresses that
/// answers (2 s each); `None` when none does.
pub fn host_status(me: &Identity, host: &proto::NodeInfo) -> Option<proto::NodeStatus> {
    host.addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .find_map(|a| node_status(me, a, Duration::from_secs(2)).ok())
}

/// Asks the host at `addr` to send its I/O to VolumeN through a peer
/// (`on`) or over its own path.
pub fn redirect(
    me: &Identity,
    addr: SocketAddr,
    volume: u64,
    on: bool,
    mode: proto::RedirectMode,
    timeout: Duration,
) -> Result<()> {
    let action = admin::Action::Redirect(proto::RedirectReq {
        volume,
        on,
        mode: mode as i32,
    });
    ask_host(me, addr, action, timeout).map(|_| ())
}

/// Injects a failure drill's fault on the host at `addr`.
pub fn fault(
    me: &Identity,
    addr: SocketAddr,
    req: proto::FaultReq,
    timeout: Duration,
) -> Result<()> {
    ask_host(me, addr, admin::Action::Fault(req), timeout).map(|_| ())
}

/// Whether the host at `addr` (this host's own address) leads the cluster
/// group now: cluster-wide duties (failover, fencing) run there.
pub fn leads_cluster(me: &Identity, addr: SocketAddr) -> bool {
    node_status(me, addr, Duration::from_secs(1)).is_ok_and(|s| {
        s.groups
            .iter()
            .any(|g| g.group == crate::group::CLUSTER && g.role() == proto::RaftRole::Leader)
    })
}

/// Asks host `addr` to carry out one phase of a volume snapshot.
pub fn snapshot_phase(
    me: &Identity,
    addr: SocketAddr,
    req: proto::SnapshotPhaseReq,
    timeout: Duration,
) -> Result<proto::SnapshotPhaseReply> {
    match ask_host(me, addr, admin::Action::SnapshotPhase(req), timeout)?.value {
        Some(Value::Phase(p)) => Ok(p),
        v => Err(ClientError::BadReply(format!("{v:?}"))),
    }
}

/// What the host at `addr` finds about itself and its paths.
pub fn probe(
    me: &Identity,
    addr: SocketAddr,
    luns: Vec<String>,
    timeout: Duration,
) -> Result<proto::HostFacts> {
    match ask_host(
        me,
        addr,
        admin::Action::Probe(proto::ProbeReq { luns }),
        timeout,
    )?
    .value
    {
        Some(Value::Facts(f)) => Ok(f),
        v => Err(ClientError::BadReply(format!("{v:?}"))),
    }
}

/// Part of VM `name`'s serial console output from the host at `addr`
/// (the one running it).
pub fn vm_console(
    me: &Identity,
    addr: SocketAddr,
    req: proto::VmConsoleReq,
    timeout: Duration,
) -> Result<proto::VmConsoleReply> {
    match ask_host(me, addr, admin::Action::VmConsole(req), timeout)?.value {
        Some(Value::Console(c)) => Ok(c),
        v => Err(ClientError::BadReply(format!("{v:?}"))),
    }
}

/// What a join gave: the new host's id, the cluster key, the hosts.
#[derive(Debug)]
pub struct Joined {
    /// The id the cluster gave this host.
    pub id: u64,
    /// The cluster key.
    pub key: wire::Key,
    /// The cluster's hosts (this one included).
    pub nodes: Vec<proto::NodeInfo>,
}

/// Asks the token's hosts, in turn, to admit a host with `addrs`.
pub fn join(
    ticket: &wire::JoinTicket,
    addrs: Vec<String>,
    hostname: &str,
    timeout: Duration,
) -> Result<Joined> {
    let mut last = String::from("the token names no host");
    for a in &ticket.addrs {
        for sa in crate::node::resolve(std::slice::from_ref(a)) {
            let mut c = match wire::connect_join(sa, ticket, timeout) {
                Ok(c) => c,
                Err(wire::WireError::Auth(e)) => {
                    return Err(ClientError::Refused(proto::error(
                        ErrorCode::Invalid,
                        format!("{sa} refused the token: {e}"),
                    )))
                }
                Err(e) => {
                    last = format!("{sa}: {}", crate::service::error_chain(&e));
                    continue;
                }
            };
            let _ = c.set_read_timeout(Some(timeout + Duration::from_secs(10)));
            let f = Frame {
                body: Some(proto::frame::Body::Request(Request {
                    client: 0,
                    seq: 1,
                    group: 0,
                    body: Some(request::Body::Admin(proto::Admin {
                        action: Some(admin::Action::Join(proto::JoinReq {
                            addrs: addrs.clone(),
                            hostname: hostname.to_string(),
                            feature_level: crate::features::SUPPORTED,
                        })),
                    })),
                })),
            };
            if let Err(e) = c.send(&f) {
                last = format!("{sa}: {}", crate::service::error_chain(&e));
                continue;
            }
            match c.recv().map(|f| f.body) {
                Ok(Some(proto::frame::Body::Response(proto::Response {
                    result:
                        Some(response::Result::Reply(proto::Reply {
                            value: Some(Value::Joined(j)),
                        })),
                    ..
                }))) => {
                    let wrapped: [u8; 32] = j.wrapped_key.as_slice().try_into().map_err(|_| {
                        ClientError::BadReply("the wrapped cluster key is not 32 bytes".into())
                    })?;
                    return Ok(Joined {
                        id: j.id,
                        key: wire::Key::from_bytes(
                            wire::Key::from_bytes(wrapped).xor(&c.key_pad()),
                        ),
                        nodes: j.nodes,
                    });
                }
                Ok(Some(proto::frame::Body::Response(proto::Response {
                    result: Some(response::Result::Error(e)),
                    ..
                }))) => return Err(ClientError::Refused(e)),
                Ok(other) => return Err(ClientError::BadReply(format!("{other:?}"))),
                Err(e) => last = format!("{sa}: {}", crate::service::error_chain(&e)),
            }
        }
    }
    Err(ClientError::Unavailable {
        secs: timeout.as_secs_f64(),
        last,
    })
}

/// A readable error for a failed metadata call.
pub fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Refused(p) => format!(
            "{} ({:?})",
            p.message,
            ErrorCode::try_from(p.code).unwrap_or(ErrorCode::Unspecified)
        ),
        other => other.to_string(),
    }
}
