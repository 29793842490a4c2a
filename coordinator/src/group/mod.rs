//! One Raft group on one host: a raft-rs `RawNode` over the host's
//! [`RaftStore`], the state machine it drives (the cluster registry or a
//! volume's metadata), and the requests waiting on it.
//!
//! [`Group::on_ready`] follows raft-rs's documented order: install a
//! snapshot, persist entries and hard state, fsync when raft-rs says it
//! must, then send the messages that wait for persistence, apply committed
//! entries, and handle the light ready (its commit index, messages and
//! entries). Messages a leader may send before persisting go first.
//!
//! Every client command carries `(client, seq)`. The table of each
//! client's last applied `seq` and answer is part of the replicated state
//! (and of snapshots), so a command retried after a leader change is
//! applied once and the retry gets the first answer.
//!
//! Every command also carries the feature level it needs
//! ([`crate::features`]); a replica that supports less refuses to apply
//! it ([`GroupError::Level`]) rather than misapply it.
//!
//! - [`apply`]: applying committed entries, answering reads;
//! - [`drain`]: raft-rs's log lines into `tracing`.

mod apply;
mod drain;

use crate::cluster::{ClusterState, Effect};
use crate::codec;
use crate::env::Env;
use crate::meta::Volume;
use crate::proto::{self, command, response, ErrorCode, Response};
use crate::storage::{RaftStore, StoreError};
use drain::TracingDrain;
use prost::Message as _;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Message};
use raft::{RawNode, StateRole};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cluster group's id.
pub const CLUSTER: u64 = 0;

/// Where answers go.
pub type Waiter = Sender<Response>;

/// The replicated state of a group.
#[derive(Debug, Clone)]
pub enum Machine {
    /// The cluster registry.
    Cluster(Box<ClusterState>),
    /// A volume's metadata.
    Volume(Box<Volume>),
}

/// Timing of the Raft groups.
#[derive(Debug, Clone)]
pub struct Timing {
    /// One Raft tick.
    pub tick: Duration,
    /// Election timeout in ticks (randomised up to twice this).
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots (the log is compacted then).
    pub snapshot_every: u64,
    /// How long a read or a leader transfer may wait.
    pub request_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 4096,
            request_timeout: Duration::from_secs(2),
        }
    }
}

struct PendingRead {
    seq: u64,
    query: proto::Read,
    waiter: Waiter,
    deadline: Instant,
}

/// A group's state as restored from a snapshot: its deduplication table,
/// state machine, and what the host must do about it.
type Restored = (BTreeMap<u64, proto::DedupEntry>, Machine, Vec<Effect>);

/// What a group asks of its host after handling a ready.
pub trait Outbox {
    /// Sends Raft messages of `group` to their hosts.
    fn send(&mut self, group: u64, msgs: Vec<Message>);
}

/// One group's replica on this host.
pub struct Group {
    /// Group id (0: cluster, N: VolumeN).
    pub id: u64,
    raw: RawNode<RaftStore>,
    machine: Machine,
    /// The state before the first entry (a snapshot without data means it).
    base: Machine,
    applied: u64,
    /// Take a snapshot at the next chance (a host was added: it must get
    /// one whose configuration names it, or raft-rs on that host drops it).
    force_snapshot: bool,
    conf: ConfState,
    dedup: BTreeMap<u64, proto::DedupEntry>,
    waiters: HashMap<(u64, u64), Waiter>,
    reads: HashMap<Vec<u8>, PendingRead>,
    ready_reads: Vec<(u64, PendingRead)>,
    next_read: u64,
    transfer: Option<(u64, Instant, u64, Waiter)>,
    timing: Timing,
    last_lease_tick: Instant,
    /// When each peer was last heard from (any Raft message).
    heard: HashMap<u64, Instant>,
    /// When this host last became the group's leader.
    leader_since: Option<Instant>,
    /// The highest feature level this replica applies.
    supported: u32,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &self.id)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

/// Why a group could not be opened or advanced.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// Storage.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// raft-rs refused.
    #[error("raft-rs refused")]
    Raft(#[from] raft::Error),
    /// A snapshot's state does not decode.
    #[error("group {group}: its snapshot does not decode")]
    Snapshot {
        /// The group.
        group: u64,
        /// Why.
        #[source]
        source: SnapshotDecodeError,
    },
    /// A committed command needs a feature level this build does not
    /// support: this replica stops rather than misapply it.
    #[error("group {group}: the command at index {index} needs feature level {needs}, this build supports {supports}: upgrade this host")]
    Level {
        /// The group.
        group: u64,
        /// The entry.
        index: u64,
        /// What it needs.
        needs: u32,
        /// What this build supports.
        supports: u32,
    },
}

/// Which part of a group's snapshot does not decode.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotDecodeError {
    /// The snapshot's frame.
    #[error("the snapshot frame")]
    Frame(#[source] prost::DecodeError),
    /// The cluster group's state.
    #[error("the cluster state")]
    Cluster(#[source] prost::DecodeError),
    /// A volume group's state.
    #[error("the volume state")]
    Volume(#[source] crate::meta::SnapshotError),
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v
}

fn done() -> proto::Reply {
    proto::Reply {
        value: Some(proto::reply::Value::Done(proto::Empty {})),
    }
}

fn respond(w: &Waiter, seq: u64, r: Result<proto::Reply, proto::Error>) {
    let result = match r {
        Ok(v) => response::Result::Reply(v),
        Err(e) => response::Result::Error(e),
    };
    let _ = w.send(Response {
        seq,
        result: Some(result),
    });
}

/// Milliseconds of the wall clock (the time stamped into commands), as a
/// failure drill's clock jump has it.
pub fn now_ms() -> u64 {
    crate::faults::wall_ms()
}

/// The UTC calendar date and time of `ms` since the Unix epoch: (year,
/// month, day, hour, minute, second) (H. Hinnant's civil-from-days).
pub fn utc(ms: u64) -> (i64, i64, i64, u64, u64, u64) {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}

/// The time a leader stamps on commands (lease grants and expiry, file
/// times): the wall clock when this process started, advanced by the
/// monotonic clock since. A step of the wall clock while it runs (an
/// operator's `date`, NTP stepping) neither expires nor extends leases;
/// leaders on different hosts differ by their clocks' skew at start,
/// which `csvctl validate` checks.
pub fn lease_now_ms() -> u64 {
    static BASE: std::sync::OnceLock<(u64, Instant)> = std::sync::OnceLock::new();
    let (wall, at) = BASE.get_or_init(|| (now_ms(), Instant::now()));
    wall + at.elapsed().as_millis() as u64
}

fn decode_machine(
    base: &Machine,
    data: &[u8],
) -> Result<(Machine, Vec<Effect>), SnapshotDecodeError> {
    match base {
        Machine::Cluster(_) => ClusterState::decode(data)
            .map(|(s, fx)| (Machine::Cluster(Box::new(s)), fx))
            .map_err(SnapshotDecodeError::Cluster),
        Machine::Volume(_) => Volume::decode(data)
            .map(|v| (Machine::Volume(Box::new(v)), vec![]))
            .map_err(SnapshotDecodeError::Volume),
    }
}

impl Group {
    /// Opens the replica of group `id` in `dir`, creating it with the
    /// voters `init` when the directory is new (empty `init`: a host that
    /// waits to be added). `base` is the state before the first entry.
    pub fn open(
        id: u64,
        node: u64,
        env: Arc<dyn Env>,
        dir: &Path,
        init: &[u64],
        base: Machine,
        timing: Timing,
    ) -> Result<(Group, Vec<Effect>), GroupError> {
        let store = if RaftStore::exists(env.as_ref(), dir) {
            RaftStore::open(env, dir)?
        } else {
            let mut cs = ConfState::default();
            cs.set_voters(init.to_vec());
            RaftStore::create(env, dir, cs)?
        };
        let snap = store.snapshot_ref().clone();
        let applied = snap.get_metadata().index;
        let conf = snap.get_metadata().get_conf_state().clone();
        let (dedup, machine, fx) = if snap.get_data().is_empty() {
            (BTreeMap::new(), base.clone(), vec![])
        } else {
            Self::decode_snapshot(id, &base, snap.get_data())?
        };
        let config = raft::Config {
            id: node,
            election_tick: timing.election_ticks,
            heartbeat_tick: timing.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Fuse(TracingDrain { group: id }), slog::o!());
        let raw = RawNode::new(&config, store, &logger)?;
        Ok((
            Group {
                id,
                raw,
                machine,
                base,
                applied,
                force_snapshot: false,
                conf,
                dedup,
                waiters: HashMap::new(),
                reads: HashMap::new(),
                ready_reads: Vec::new(),
                next_read: 1,
                transfer: None,
                timing,
                last_lease_tick: Instant::now(),
                heard: HashMap::new(),
                leader_since: None,
                supported: crate::features::SUPPORTED,
            },
            fx,
        ))
    }

    fn decode_snapshot(id: u64, base: &Machine, data: &[u8]) -> Result<Restored, GroupError> {
        let bad = |source| GroupError::Snapshot { group: id, source };
        let gs =
            proto::GroupSnapshot::decode(data).map_err(|e| bad(SnapshotDecodeError::Frame(e)))?;
        let (m, fx) = decode_machine(base, &gs.machine).map_err(bad)?;
        let dedup = gs.dedup.into_iter().map(|d| (d.client, d)).collect();
        Ok((dedup, m, fx))
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        let machine = match &self.machine {
            Machine::Cluster(c) => c.encode(),
            Machine::Volume(v) => v.encode(),
        };
        proto::GroupSnapshot {
            dedup: self.dedup.values().cloned().collect(),
            machine,
        }
        .encode_to_vec()
    }

    /// Applies commands up to feature level `level` only (a host of an
    /// older build, in tests of rolling upgrades).
    pub fn set_supported_level(&mut self, level: u32) {
        self.supported = level;
    }

    /// Whether this host leads the group.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this host knows of (0: none).
    pub fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// The state machine.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Steps a message from a peer.
    pub fn step(&mut self, m: Message) {
        self.heard.insert(m.from, Instant::now());
        if let Err(e) = self.raw.step(m) {
            tracing::debug!(group = self.id, "dropped a Raft message: {e}");
        }
    }

    /// One tick of the Raft clock, plus the leader's housekeeping:
    /// expiring leases, adding registered hosts as learners, promoting
    /// learners that caught up.
    pub fn tick(&mut self, members: &[u64], removed: &[u64]) {
        self.raw.tick();
        let now = Instant::now();
        if let Some((to, deadline, seq, w)) = self.transfer.take() {
            if self.leader() == to {
                respond(&w, seq, Ok(done()));
            } else if now >= deadline {
                respond(
                    &w,
                    seq,
                    Err(codec::error(
                        ErrorCode::Unavailable,
                        format!(
                            "leadership of group {} did not move to host {to} in time",
                            self.id
                        ),
                    )),
                );
            } else {
                self.transfer = Some((to, deadline, seq, w));
            }
        }
        self.expire_reads(now);
        if !self.is_leader() {
            return;
        }
        if now.duration_since(self.last_lease_tick) >= Duration::from_secs(1) {
            self.last_lease_tick = now;
            match &self.machine {
                Machine::Volume(v) if v.has_leases() => {
                    let op = proto::VolumeOp {
                        op: Some(proto::volume_op::Op::Tick(proto::TickOp {
                            now: lease_now_ms(),
                        })),
                    };
                    self.propose_internal(command::Body::Volume(op));
                }
                Machine::Volume(_) => {}
                Machine::Cluster(c)
                    if self.leader_since.is_some_and(|t| {
                        now.duration_since(t)
                            >= self.timing.tick * (self.timing.election_ticks as u32 * 2)
                    }) =>
                {
                    // Record hosts whose reachability changed, as this
                    // leader sees it (heard from within two election
                    // timeouts), so the cluster can act on a dead host.
                    let r = &self.raw.raft;
                    let window = self.timing.tick * (self.timing.election_ticks as u32 * 2);
                    let changed: Vec<(u64, bool)> = r
                        .prs()
                        .iter()
                        .map(|(&id, _)| {
                            let heard = self
                                .heard
                                .get(&id)
                                .is_some_and(|t| now.duration_since(*t) < window);
                            (id, id == r.id || heard)
                        })
                        .filter(|&(id, up)| c.is_up(id) != up)
                        .collect();
                    // Every registered host supports a higher level now:
                    // the cluster moves to it.
                    let (level, can) = (c.feature_level(), c.lowest_supported_level());
                    for (node, up) in changed {
                        tracing::info!(node, up, "host reachability changed");
                        let op = proto::ClusterOp {
                            op: Some(proto::cluster_op::Op::NodeHealth(proto::NodeHealth {
                                node,
                                up,
                                since: now_ms(),
                            })),
                        };
                        self.propose_internal(command::Body::Cluster(op));
                    }
                    if can > level {
                        tracing::info!(
                            from = level,
                            to = can,
                            "raising the cluster's feature level"
                        );
                        let op = proto::ClusterOp {
                            op: Some(proto::cluster_op::Op::SetFeatureLevel(can)),
                        };
                        self.propose_internal(command::Body::Cluster(op));
                    }
                }
                Machine::Cluster(_) => {}
            }
        }
        self.membership(members, removed);
    }

    fn membership(&mut self, members: &[u64], removed: &[u64]) {
        let r = &self.raw.raft;
        if r.pending_conf_index > r.raft_log.applied {
            return;
        }
        let voters = self.conf.get_voters();
        let learners = self.conf.get_learners();
        let commit = r.raft_log.committed;
        let mut change = None;
        // An evicted host leaves first (never the leader itself: `csvctl
        // node remove` moves leadership away before it evicts a host).
        if let Some(&n) = voters
            .iter()
            .chain(learners.iter())
            .find(|n| removed.contains(n) && **n != r.id)
        {
            change = Some((ConfChangeType::RemoveNode, n));
        }
        for &l in learners.iter().filter(|_| change.is_none()) {
            if let Some(pr) = r.prs().get(l) {
                if pr.matched >= commit {
                    change = Some((ConfChangeType::AddNode, l));
                    break;
                }
            }
        }
        if change.is_none() {
            if let Some(&n) = members
                .iter()
                .find(|n| !voters.contains(n) && !learners.contains(n) && !removed.contains(n))
            {
                change = Some((ConfChangeType::AddLearnerNode, n));
            }
        }
        if let Some((t, n)) = change {
            let mut s = ConfChangeSingle::default();
            s.set_change_type(t);
            s.node_id = n;
            let mut cc = ConfChangeV2::default();
            cc.set_changes(vec![s].into());
            tracing::info!(group = self.id, node = n, "membership change: {t:?}");
            if let Err(e) = self.raw.propose_conf_change(vec![], cc) {
                tracing::debug!(group = self.id, "conf change not proposed: {e}");
            }
        }
    }

    /// Proposes a command of the group's own (client 0, not
    /// deduplicated); on a follower raft-rs forwards it to the leader. A
    /// dropped one is proposed again by whoever needs it.
    pub fn propose_internal(&mut self, body: command::Body) {
        let c = proto::Command {
            client: 0,
            seq: 0,
            version: crate::features::required(&body),
            body: Some(body),
        };
        let _ = self.raw.propose(vec![], c.encode_to_vec());
    }

    /// Proposes a client's command; the answer goes to `w` once applied.
    pub fn propose(&mut self, client: u64, seq: u64, mut body: command::Body, w: Waiter) {
        if client != 0 {
            if let Some(d) = self.dedup.get(&client) {
                if d.seq == seq {
                    let mut r = d.response.clone().unwrap_or_default();
                    r.seq = seq;
                    let _ = w.send(r);
                    return;
                }
                if d.seq > seq {
                    respond(
                        &w,
                        seq,
                        Err(codec::error(
                            ErrorCode::BadRequest,
                            format!("request {seq} is older than this client's last ({})", d.seq),
                        )),
                    );
                    return;
                }
            }
        }
        if let command::Body::Volume(op) = &mut body {
            codec::stamp(op, lease_now_ms());
        }
        let c = proto::Command {
            client,
            seq,
            version: crate::features::required(&body),
            body: Some(body),
        };
        match self.raw.propose(vec![], c.encode_to_vec()) {
            Ok(()) => {
                if let Some(old) = self.waiters.insert((client, seq), w) {
                    respond(
                        &old,
                        seq,
                        Err(codec::error(
                            ErrorCode::Unavailable,
                            "superseded by a retry",
                        )),
                    );
                }
            }
            Err(e) => respond(
                &w,
                seq,
                Err(codec::error(
                    ErrorCode::Unavailable,
                    format!("proposal dropped: {e}"),
                )),
            ),
        }
    }

    /// Starts a linearizable read; it is answered once this host has
    /// applied up to the index the leader confirmed.
    pub fn read(&mut self, seq: u64, query: proto::Read, w: Waiter) {
        let ctx = self.next_read.to_le_bytes().to_vec();
        self.next_read += 1;
        self.raw.read_index(ctx.clone());
        self.reads.insert(
            ctx,
            PendingRead {
                seq,
                query,
                waiter: w,
                deadline: Instant::now() + self.timing.request_timeout,
            },
        );
    }

    /// Asks the group's leadership to move to `to`; answered when it did.
    pub fn transfer(&mut self, to: u64, seq: u64, w: Waiter) {
        if self.leader() == to {
            respond(&w, seq, Ok(done()));
            return;
        }
        if !self.conf.get_voters().contains(&to) {
            respond(
                &w,
                seq,
                Err(codec::error(
                    ErrorCode::Invalid,
                    format!("host {to} is not a voter of group {}", self.id),
                )),
            );
            return;
        }
        self.raw.transfer_leader(to);
        let deadline = Instant::now() + self.timing.request_timeout * 2;
        if let Some((_, _, s, old)) = self.transfer.replace((to, deadline, seq, w)) {
            respond(
                &old,
                s,
                Err(codec::error(
                    ErrorCode::Unavailable,
                    "another transfer was asked",
                )),
            );
        }
    }

    fn expire_reads(&mut self, now: Instant) {
        let late: Vec<Vec<u8>> = self
            .reads
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in late {
            if let Some(r) = self.reads.remove(&k) {
                respond(
                    &r.waiter,
                    r.seq,
                    Err(codec::error(
                        ErrorCode::Unavailable,
                        "read not confirmed by a quorum in time",
                    )),
                );
            }
        }
    }

    fn fail_all(&mut self, why: &str) {
        for ((_, seq), w) in self.waiters.drain() {
            respond(&w, seq, Err(codec::error(ErrorCode::Unavailable, why)));
        }
        for (_, r) in self.reads.drain() {
            respond(
                &r.waiter,
                r.seq,
                Err(codec::error(ErrorCode::Unavailable, why)),
            );
        }
        for (_, r) in self.ready_reads.drain(..) {
            respond(
                &r.waiter,
                r.seq,
                Err(codec::error(ErrorCode::Unavailable, why)),
            );
        }
    }

    /// Handles raft-rs's ready, if any. Returns what the host must do.
    pub fn on_ready(&mut self, out: &mut dyn Outbox) -> Result<Vec<Effect>, GroupError> {
        if !self.raw.has_ready() {
            return Ok(vec![]);
        }
        let mut fx = Vec::new();
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            if ss.raft_state == StateRole::Leader {
                self.leader_since = Some(Instant::now());
            } else {
                self.leader_since = None;
                self.fail_all("this host is no longer the group's leader");
            }
        }
        if !rd.messages().is_empty() {
            out.send(self.id, rd.take_messages());
        }
        if !rd.snapshot().is_empty() {
            let s = rd.snapshot().clone();
            let (dedup, m, f) = if s.get_data().is_empty() {
                (BTreeMap::new(), self.base.clone(), vec![])
            } else {
                Self::decode_snapshot(self.id, &self.base, s.get_data())?
            };
            self.raw.mut_store().apply_snapshot(s.clone())?;
            self.dedup = dedup;
            self.machine = m;
            self.applied = s.get_metadata().index;
            self.conf = s.get_metadata().get_conf_state().clone();
            fx.extend(f);
        }
        let committed = rd.take_committed_entries();
        let store = self.raw.mut_store();
        store.append(rd.entries())?;
        if let Some(hs) = rd.hs() {
            store.set_hard_state(hs)?;
        }
        if rd.must_sync() && !rd.entries().is_empty() {
            store.sync()?;
        }
        if !rd.persisted_messages().is_empty() {
            out.send(self.id, rd.take_persisted_messages());
        }
        for rs in rd.take_read_states() {
            if let Some(r) = self.reads.remove(rs.request_ctx.as_slice()) {
                self.ready_reads.push((rs.index, r));
            }
        }
        self.apply(committed, &mut fx)?;
        let mut light = self.raw.advance(rd);
        if let Some(c) = light.commit_index() {
            self.raw.mut_store().set_commit(c);
        }
        out.send(self.id, light.take_messages());
        self.apply(light.take_committed_entries(), &mut fx)?;
        self.raw.advance_apply();
        self.serve_reads();
        self.maybe_compact()?;
        Ok(fx)
    }

    fn maybe_compact(&mut self) -> Result<(), GroupError> {
        let snap_index = self.raw.store().snapshot_ref().get_metadata().index;
        if self.applied > snap_index
            && (self.force_snapshot || self.applied >= snap_index + self.timing.snapshot_every)
        {
            self.force_snapshot = false;
            let data = self.encode_snapshot();
            let (applied, conf) = (self.applied, self.conf.clone());
            self.raw.mut_store().compact(applied, conf, data)?;
            tracing::debug!(
                group = self.id,
                index = applied,
                "snapshot taken, log compacted"
            );
        }
        Ok(())
    }

    /// The group as this host sees it.
    pub fn status(&self) -> proto::GroupStatus {
        let r = &self.raw.raft;
        let role = match r.state {
            StateRole::Leader => proto::RaftRole::Leader,
            StateRole::Follower => proto::RaftRole::Follower,
            StateRole::Candidate => proto::RaftRole::Candidate,
            StateRole::PreCandidate => proto::RaftRole::PreCandidate,
        };
        let last = r.raft_log.last_index();
        let (write_leases, read_leases) = match &self.machine {
            Machine::Volume(v) => v.lease_counts(),
            Machine::Cluster(_) => (0, 0),
        };
        let followers = if r.state == StateRole::Leader {
            r.prs()
                .iter()
                .filter(|(id, _)| **id != r.id)
                .map(|(id, pr)| proto::FollowerStatus {
                    node: *id,
                    matched: pr.matched,
                    lag: last.saturating_sub(pr.matched),
                    state: match pr.state {
                        raft::ProgressState::Probe => proto::ProgressState::Probe,
                        raft::ProgressState::Replicate => proto::ProgressState::Replicate,
                        raft::ProgressState::Snapshot => proto::ProgressState::Snapshot,
                    } as i32,
                })
                .collect()
        } else {
            vec![]
        };
        proto::GroupStatus {
            group: self.id,
            role: role as i32,
            term: r.term,
            leader: r.leader_id,
            commit: r.raft_log.committed,
            applied: self.applied,
            last_index: last,
            snapshot_index: self.raw.store().snapshot_ref().get_metadata().index,
            voters: sorted(self.conf.get_voters()),
            learners: sorted(self.conf.get_learners()),
            followers,
            write_leases,
            read_leases,
        }
    }
}
