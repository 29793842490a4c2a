//! Every Raft group of one host, and what applying their commands asks of
//! it: hosting a replica of each new volume, learning hosts' addresses,
//! dropping removed volumes and hosts. No threads and no sockets: the
//! node ([`crate::node`]) drives a [`Host`] from its Raft thread with the
//! real network, the tests' simulated network drives many in one thread.
//!
//! Driving order, each round: [`Host::step`] the messages that arrived and
//! [`Host::request`] the requests, [`Host::tick`] when a tick is due, then
//! [`Host::ready`] to persist, send and apply.
//!
//! Its housekeeping, beside each group's own:
//! - the cluster group's leader registers founding hosts that are voters
//!   but not in the registry yet;
//! - each host reports the feature level it supports when the registry
//!   has another ([`crate::features`]);
//! - a request for a command above the cluster's feature level is
//!   refused before it is proposed.

use crate::cluster::{ClusterState, Effect};
use crate::env::Env;
use crate::group::{Group, GroupError, Machine, Outbox, Timing, Waiter, CLUSTER};
use crate::meta::Volume;
use crate::proto::{self, admin, command, request, response, ErrorCode, Request, Response};
use prost::Message as _;
use raft::eraftpb::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

/// Every host's addresses, preferred network first (this host's too).
pub type Book = Arc<RwLock<BTreeMap<u64, Vec<String>>>>;

/// How a host's groups are set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// This host's node id.
    pub node: u64,
    /// Where its replicas live.
    pub data_dir: PathBuf,
    /// Create the cluster group with the hosts of the address book as its
    /// voters if this host has no replica yet (the founding hosts);
    /// otherwise wait to be added.
    pub init: bool,
    /// Raft timing.
    pub timing: Timing,
    /// The highest feature level this host applies (its build's, except
    /// in tests of rolling upgrades).
    pub level: u32,
}

/// Why a host's groups could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Node id 0 is reserved.
    #[error("node id must not be 0")]
    NoId,
    /// A founder must be one of the founding hosts.
    #[error("--init lists the founding hosts; host {0} must be one of them")]
    NotAFounder(u64),
    /// The state directory.
    #[error(transparent)]
    State(#[from] StateFormatError),
    /// A volume replica's recorded parameters do not decode.
    #[error("{path} does not hold a volume's parameters")]
    VolumeInfo {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: prost::DecodeError,
    },
    /// A group's replica.
    #[error("opening the replica of group {group}")]
    Group {
        /// The group.
        group: u64,
        /// Why.
        #[source]
        source: GroupError,
    },
}

/// Why a state directory is not one this build may use.
#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    /// Reading or writing its format file.
    #[error("state format file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Written by a newer build.
    #[error("{dir} holds state format {major}.{minor}, newer than this csvd understands ({}.{}): run the csvd that wrote it, or a newer one", STATE_FORMAT.0, STATE_FORMAT.1)]
    Newer {
        /// The directory.
        dir: PathBuf,
        /// Its major version.
        major: u32,
        /// Its minor version.
        minor: u32,
    },
    /// Written by a build too old to read.
    #[error("{dir} holds state format {major}.{minor}, older than this csvd can read ({}.{})", STATE_FORMAT.0, STATE_FORMAT.1)]
    Older {
        /// The directory.
        dir: PathBuf,
        /// Its major version.
        major: u32,
        /// Its minor version.
        minor: u32,
    },
    /// Not a format file of ours.
    #[error("{path} is not a csv state format file (expected `csv-state {}.{}`)", STATE_FORMAT.0, STATE_FORMAT.1)]
    Garbage {
        /// The file.
        path: PathBuf,
    },
}

/// The file in the state directory that names its layout and version.
pub const STATE_FORMAT_FILE: &str = "FORMAT";
/// The layout this build writes: `csv-state MAJOR.MINOR`. A newer minor
/// only adds files an older build ignores; a newer major is refused.
pub const STATE_FORMAT: (u32, u32) = (1, 0);
/// The file in a volume replica's directory that records the volume's
/// parameters (the state before the group's first entry).
const VOLUME_INFO: &str = "volume.info";
/// The same, for a volume removed from the cluster (kept, not reopened).
const VOLUME_REMOVED: &str = "volume.removed";

/// Checks (or, in a new or older directory, records) the state
/// directory's format, so a downgrade cannot misread newer state.
pub fn check_state_format(env: &dyn Env, dir: &Path) -> Result<(), StateFormatError> {
    let f = dir.join(STATE_FORMAT_FILE);
    let io = |source| StateFormatError::Io {
        path: f.clone(),
        source,
    };
    env.create_dir_all(dir).map_err(io)?;
    let (major, _) = STATE_FORMAT;
    match env.read(&f) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let v = text.trim().strip_prefix("csv-state ").and_then(|v| {
                let (a, b) = v.split_once('.')?;
                Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
            });
            match v {
                Some((a, _)) if a == major => Ok(()),
                Some((a, b)) if a > major => Err(StateFormatError::Newer {
                    dir: dir.to_path_buf(),
                    major: a,
                    minor: b,
                }),
                Some((a, b)) => Err(StateFormatError::Older {
                    dir: dir.to_path_buf(),
                    major: a,
                    minor: b,
                }),
                None => Err(StateFormatError::Garbage { path: f.clone() }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = format!("csv-state {}.{}\n", STATE_FORMAT.0, STATE_FORMAT.1);
            write_durably(env, &f, text.as_bytes()).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

fn write_durably(env: &dyn Env, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("new");
    env.write_new(&tmp, bytes)?;
    env.rename(&tmp, path)?;
    match path.parent() {
        Some(d) => env.sync_dir(d),
        None => Ok(()),
    }
}

/// The groups of one host.
pub struct Host {
    me: u64,
    env: Arc<dyn Env>,
    dir: PathBuf,
    timing: Timing,
    level: u32,
    groups: BTreeMap<u64, Group>,
    book: Book,
    /// Hosts registered in the cluster group (every one is a replica of
    /// every group).
    members: Vec<u64>,
    /// Hosts evicted from the cluster: taken out of every group.
    removed: Vec<u64>,
    last_housekeeping: Instant,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("me", &self.me)
            .field("groups", &self.groups.keys())
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Opens this host's replicas: the cluster group's, and every volume
    /// group's it already has.
    pub fn open(cfg: &HostConfig, env: Arc<dyn Env>, book: Book) -> Result<Host, HostError> {
        let me = cfg.node;
        if me == 0 {
            return Err(HostError::NoId);
        }
        check_state_format(env.as_ref(), &cfg.data_dir)?;
        let init: Vec<u64> = if cfg.init {
            book.read()
                .map(|b| b.keys().copied().collect())
                .unwrap_or_default()
        } else {
            vec![]
        };
        if cfg.init && !init.contains(&me) {
            return Err(HostError::NotAFounder(me));
        }
        let mut h = Host {
            me,
            env,
            dir: cfg.data_dir.clone(),
            timing: cfg.timing.clone(),
            level: cfg.level,
            groups: BTreeMap::new(),
            book,
            members: Vec::new(),
            removed: Vec::new(),
            last_housekeeping: Instant::now(),
        };
        let (g, fx) = h
            .open_group(CLUSTER, &init, Machine::Cluster(Box::default()))
            .map_err(|source| HostError::Group {
                group: CLUSTER,
                source,
            })?;
        h.groups.insert(CLUSTER, g);
        h.effects(fx);
        // Volume replicas this host already has: open them now rather than
        // when the cluster log is replayed (which waits for a leader).
        let mut infos = Vec::new();
        for d in h.env.list_dir(&h.dir).unwrap_or_default() {
            let p = d.join(VOLUME_INFO);
            if let Ok(b) = h.env.read(&p) {
                let v = proto::VolumeInfo::decode(b.as_slice())
                    .map_err(|source| HostError::VolumeInfo { path: p, source })?;
                infos.push(Effect::Volume(v));
            }
        }
        h.effects(infos);
        Ok(h)
    }

    fn open_group(
        &self,
        id: u64,
        init: &[u64],
        base: Machine,
    ) -> Result<(Group, Vec<Effect>), GroupError> {
        let (mut g, fx) = Group::open(
            id,
            self.me,
            self.env.clone(),
            &self.group_dir(id),
            init,
            base,
            self.timing.clone(),
        )?;
        g.set_supported_level(self.level);
        Ok((g, fx))
    }

    /// This host's node id.
    pub fn id(&self) -> u64 {
        self.me
    }

    fn group_dir(&self, g: u64) -> PathBuf {
        if g == CLUSTER {
            self.dir.join("cluster")
        } else {
            self.dir.join(format!("volume{g}"))
        }
    }

    /// A group's replica on this host.
    pub fn group(&self, id: u64) -> Option<&Group> {
        self.groups.get(&id)
    }

    /// A group's replica, to act on directly (tests).
    #[cfg(test)]
    pub(crate) fn group_mut(&mut self, id: u64) -> Option<&mut Group> {
        self.groups.get_mut(&id)
    }

    /// The cluster registry as this host's replica applied it.
    pub fn cluster(&self) -> Option<&ClusterState> {
        match self.groups.get(&CLUSTER).map(Group::machine) {
            Some(Machine::Cluster(c)) => Some(c),
            _ => None,
        }
    }

    /// Every group as this host sees it.
    pub fn status(&self) -> Vec<proto::GroupStatus> {
        self.groups.values().map(Group::status).collect()
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
                        let _ = self
                            .env
                            .rename(&dir.join(VOLUME_INFO), &dir.join(VOLUME_REMOVED));
                        tracing::info!("Volume{n} removed from the cluster");
                    }
                }
                Effect::Volume(v) => self.host_volume(v),
            }
        }
    }

    /// Hosts a replica of a volume's group (once).
    fn host_volume(&mut self, v: proto::VolumeInfo) {
        let dir = self.group_dir(v.number);
        if self.groups.contains_key(&v.number) || self.env.exists(&dir.join(VOLUME_REMOVED)) {
            return;
        }
        let init = if v.voters.contains(&self.me) {
            v.voters.clone()
        } else {
            vec![]
        };
        if let Err(e) = self.env.create_dir_all(&dir).and_then(|()| {
            write_durably(
                self.env.as_ref(),
                &dir.join(VOLUME_INFO),
                &v.encode_to_vec(),
            )
        }) {
            tracing::error!("cannot record Volume{} in {}: {e}", v.number, dir.display());
            return;
        }
        let base = Machine::Volume(Box::new(Volume::new(v.data_start, v.capacity, v.now)));
        match self.open_group(v.number, &init, base) {
            Ok((g, more)) => {
                tracing::info!("hosting a replica of Volume{}", v.number);
                self.groups.insert(v.number, g);
                debug_assert!(more.is_empty());
            }
            Err(e) => tracing::error!(
                "cannot open the replica of Volume{}: {}",
                v.number,
                crate::service::error_chain(&e)
            ),
        }
    }

    /// Steps messages from a peer into a group.
    pub fn step(&mut self, group: u64, msgs: Vec<Message>) {
        if let Some(g) = self.groups.get_mut(&group) {
            for m in msgs {
                g.step(m);
            }
        }
    }

    /// One tick of every group, and this host's housekeeping.
    pub fn tick(&mut self) {
        let members = self.members.clone();
        for g in self.groups.values_mut() {
            g.tick(&members, &self.removed);
        }
        if self.last_housekeeping.elapsed() >= Duration::from_secs(1) {
            self.last_housekeeping = Instant::now();
            self.register_founders();
            self.report_level();
        }
    }

    /// Persists, sends and applies what every group has ready. An error
    /// means a replica's storage failed (or it met a command it cannot
    /// apply): continuing could acknowledge what is not durable, so the
    /// host must stop.
    pub fn ready(&mut self, out: &mut dyn Outbox) -> Result<(), GroupError> {
        let mut fx = Vec::new();
        for g in self.groups.values_mut() {
            fx.extend(g.on_ready(out)?);
        }
        self.effects(fx);
        Ok(())
    }

    /// The cluster leader records the addresses of founding hosts that are
    /// voters but not yet registered.
    fn register_founders(&mut self) {
        let Some(g) = self.groups.get_mut(&CLUSTER) else {
            return;
        };
        if !g.is_leader() {
            return;
        }
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
                let op = proto::ClusterOp {
                    op: Some(proto::cluster_op::Op::RegisterNode(proto::NodeInfo {
                        id,
                        addrs,
                    })),
                };
                g.propose_internal(command::Body::Cluster(op));
            }
        }
    }

    /// Once registered, a host says which feature level it supports
    /// (again whenever the registry has another: after an upgrade).
    fn report_level(&mut self) {
        let me = self.me;
        let level = self.level;
        let Some(g) = self.groups.get_mut(&CLUSTER) else {
            return;
        };
        let Machine::Cluster(c) = g.machine() else {
            return;
        };
        if !c.has_node(me) || c.level_of(me) == Some(level) || g.leader() == 0 {
            return;
        }
        let op = proto::ClusterOp {
            op: Some(proto::cluster_op::Op::NodeLevel(proto::NodeLevel {
                node: me,
                level,
            })),
        };
        g.propose_internal(command::Body::Cluster(op));
    }

    fn redirect(&self, g: &Group, seq: u64) -> Response {
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
            seq,
            result: Some(response::Result::Redirect(proto::Redirect {
                leader,
                addrs,
            })),
        }
    }

    /// Starts a client's request on the group it is for; the answer goes
    /// to `w` (a redirect when this host does not lead the group).
    pub fn request(&mut self, r: Request, w: Waiter) {
        let seq = r.seq;
        let fail = |w: &Waiter, code, msg: String| {
            let _ = w.send(Response::of(seq, Err(proto::error(code, msg))));
        };
        let Some(body) = r.body else {
            return fail(&w, ErrorCode::BadRequest, "empty request".into());
        };
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
        let level = self
            .cluster()
            .map_or(crate::features::BASE, ClusterState::feature_level);
        let Some(g) = self.groups.get(&group) else {
            return fail(
                &w,
                ErrorCode::NoGroup,
                format!("host {} has no replica of group {group}", self.me),
            );
        };
        if !g.is_leader() {
            let _ = w.send(self.redirect(g, seq));
            return;
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let gated = |body: command::Body, g: &mut Group, w: Waiter| {
            let needs = crate::features::required(&body);
            if needs > level {
                fail(
                    &w,
                    ErrorCode::FeatureLevel,
                    format!(
                        "this command needs feature level {needs}; the cluster runs at {level} until every host supports it"
                    ),
                );
                return;
            }
            g.propose(r.client, seq, body, w);
        };
        match body {
            request::Body::Op(op) => gated(command::Body::Volume(op), g, w),
            request::Body::Cluster(mut op) => {
                if let Some(proto::cluster_op::Op::AddVolume(v)) = op.op.as_mut() {
                    // A volume's group starts on the cluster's voters unless
                    // told otherwise; its clock starts at the leader's.
                    if v.voters.is_empty() {
                        v.voters = g.status().voters;
                    }
                    v.now = crate::group::lease_now_ms();
                }
                gated(command::Body::Cluster(op), g, w)
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
                    gated(command::Body::Cluster(op), g, w)
                }
                _ => fail(
                    &w,
                    ErrorCode::BadRequest,
                    "unknown administrative action".into(),
                ),
            },
        }
    }
}

/// A waiter whose answer nobody reads (for proposals of the host's own).
pub fn nobody() -> Waiter {
    mpsc::channel().0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemEnv;

    #[test]
    fn the_state_directory_records_its_format_and_refuses_a_newer_one() {
        let env = MemEnv::new();
        let d = Path::new("/state");
        check_state_format(&env, d).unwrap();
        let f = d.join(STATE_FORMAT_FILE);
        assert_eq!(env.read(&f).unwrap(), b"csv-state 1.0\n");
        check_state_format(&env, d).unwrap();
        env.write_new(&f, b"csv-state 1.7\n").unwrap();
        check_state_format(&env, d).unwrap();
        env.write_new(&f, b"csv-state 2.0\n").unwrap();
        let e = check_state_format(&env, d).unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
        env.write_new(&f, b"garbage").unwrap();
        assert!(matches!(
            check_state_format(&env, d),
            Err(StateFormatError::Garbage { .. })
        ));
    }

    #[test]
    fn a_founder_must_be_in_its_own_founding_list() {
        let book: Book = Arc::new(RwLock::new(BTreeMap::from([(2, vec!["a:1".into()])])));
        let cfg = HostConfig {
            node: 1,
            data_dir: "/s".into(),
            init: true,
            timing: Timing::default(),
            level: crate::features::SUPPORTED,
        };
        let e = Host::open(&cfg, Arc::new(MemEnv::new()), book).unwrap_err();
        assert!(matches!(e, HostError::NotAFounder(1)));
    }
}
