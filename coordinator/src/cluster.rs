//! The cluster group's state machine: the hosts and their addresses, the
//! volumes (each with its own Raft group), the VM roles, snapshot sets,
//! the hosts' health as the leader sees it, and the cluster's feature
//! level (see [`crate::features`]).

use crate::codec;
use crate::proto::{
    self, cluster_op, ClusterInfo, ErrorCode, NodeHealth, NodeInfo, SnapshotRecord, VmRole,
    VolumeInfo,
};
use prost::Message;
use std::collections::BTreeMap;

/// What applying a cluster command asks the host to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// A volume exists: host a replica of its group.
    Volume(VolumeInfo),
    /// A host's addresses are known or changed.
    Node(NodeInfo),
    /// A volume was removed: stop serving and hosting it.
    RemoveVolume(u64),
    /// A host was evicted: take it out of every group.
    RemoveNode(u64),
}

/// The registry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    nodes: BTreeMap<u64, NodeInfo>,
    volumes: BTreeMap<u64, VolumeInfo>,
    vms: BTreeMap<String, VmRole>,
    health: BTreeMap<u64, NodeHealth>,
    snapshots: BTreeMap<String, SnapshotRecord>,
    draining: std::collections::BTreeSet<u64>,
    removed: std::collections::BTreeSet<u64>,
    /// The level the cluster runs at (0: never raised, the base).
    feature_level: u32,
    /// The level each host supports, as it reported it.
    levels: BTreeMap<u64, u32>,
    /// Snapshot schedules by volume.
    schedules: BTreeMap<u64, proto::SnapshotSchedule>,
}

/// What a command did: its reply and the effects for the host, or why
/// it was refused.
type Applied = Result<(proto::Reply, Vec<Effect>), proto::Error>;

fn fail(code: ErrorCode, message: impl Into<String>) -> proto::Error {
    codec::error(code, message)
}

/// Highest volume number (the group id space above it is free).
pub const MAX_VOLUME: u64 = 1 << 20;

impl ClusterState {
    /// Applies one committed command.
    pub fn apply(
        &mut self,
        op: &proto::ClusterOp,
    ) -> (Result<proto::Reply, proto::Error>, Vec<Effect>) {
        match self.apply_op(op) {
            Ok((reply, effects)) => (Ok(reply), effects),
            Err(e) => (Err(e), vec![]),
        }
    }

    fn apply_op(&mut self, op: &proto::ClusterOp) -> Applied {
        let done = || Ok((proto::Reply::done(), vec![]));
        match op.op.as_ref() {
            None => Err(fail(ErrorCode::BadRequest, "cluster command missing")),
            Some(cluster_op::Op::RegisterNode(n)) => self.register_node(n),
            Some(cluster_op::Op::JoinNode(n)) => self.join_node(n),
            Some(cluster_op::Op::RemoveNode(id)) => {
                if self.nodes.remove(id).is_none() {
                    return Err(fail(ErrorCode::NotFound, format!("no host {id}")));
                }
                self.removed.insert(*id);
                self.draining.remove(id);
                self.health.remove(id);
                Ok((proto::Reply::done(), vec![Effect::RemoveNode(*id)]))
            }
            Some(cluster_op::Op::AddVolume(v)) => self.add_volume(v),
            Some(cluster_op::Op::SetVmRole(r)) => {
                self.vms.insert(r.name.clone(), r.clone());
                done()
            }
            Some(cluster_op::Op::SetDraining(d)) => {
                self.need_node(d.node)?;
                if d.draining {
                    self.draining.insert(d.node);
                } else {
                    self.draining.remove(&d.node);
                }
                done()
            }
            Some(cluster_op::Op::RemoveVmRole(name)) => {
                if self.vms.remove(name).is_none() {
                    return Err(fail(ErrorCode::NotFound, format!("no VM role {name:?}")));
                }
                done()
            }
            Some(cluster_op::Op::RemoveVolume(n)) => {
                if self.volumes.remove(n).is_none() {
                    return Err(fail(ErrorCode::NotFound, format!("no Volume{n}")));
                }
                Ok((proto::Reply::done(), vec![Effect::RemoveVolume(*n)]))
            }
            Some(cluster_op::Op::NodeHealth(h)) => {
                self.health.insert(h.node, *h);
                done()
            }
            Some(cluster_op::Op::NodeLevel(l)) => {
                self.need_node(l.node)?;
                self.levels.insert(l.node, l.level);
                done()
            }
            Some(cluster_op::Op::SetFeatureLevel(level)) => {
                let lowest = self.lowest_supported_level();
                if *level > lowest {
                    return Err(fail(
                        ErrorCode::FeatureLevel,
                        format!("feature level {level}: a host supports only {lowest}"),
                    ));
                }
                self.feature_level = self.feature_level.max(*level);
                done()
            }
            Some(cluster_op::Op::SetSnapshot(s)) => {
                if s.name.is_empty() {
                    return Err(fail(ErrorCode::Invalid, "a snapshot set needs a name"));
                }
                self.snapshots.insert(s.name.clone(), upgraded(s.clone()));
                done()
            }
            Some(cluster_op::Op::SetSchedule(sch)) => {
                if !self.volumes.contains_key(&sch.volume) {
                    return Err(fail(
                        ErrorCode::NotFound,
                        format!("no Volume{}", sch.volume),
                    ));
                }
                if sch.every_ms == 0 || (sch.keep == 0 && sch.keep_daily == 0) {
                    return Err(fail(
                        ErrorCode::Invalid,
                        "a schedule needs an interval and something to keep",
                    ));
                }
                let e = self
                    .schedules
                    .entry(sch.volume)
                    .or_insert_with(|| (**sch).clone());
                e.every_ms = sch.every_ms;
                e.keep = sch.keep;
                e.keep_daily = sch.keep_daily;
                e.freeze_limit_ms = sch.freeze_limit_ms;
                done()
            }
            Some(cluster_op::Op::ScheduleState(sch)) => {
                let Some(e) = self.schedules.get_mut(&sch.volume) else {
                    return Err(fail(
                        ErrorCode::NotFound,
                        format!("Volume{} has no schedule", sch.volume),
                    ));
                };
                e.last = sch.last.clone().or(e.last.take());
                e.running_since_ms = sch.running_since_ms;
                e.running_on = sch.running_on;
                e.runs = sch.runs;
                e.skipped = sch.skipped;
                e.failures = sch.failures;
                e.last_skip = sch.last_skip.clone();
                done()
            }
            Some(cluster_op::Op::RemoveSchedule(vol)) => {
                if self.schedules.remove(vol).is_none() {
                    return Err(fail(
                        ErrorCode::NotFound,
                        format!("Volume{vol} has no schedule"),
                    ));
                }
                done()
            }
            Some(cluster_op::Op::DeleteSnapshot(name)) => {
                if self.snapshots.remove(name).is_none() {
                    return Err(fail(
                        ErrorCode::NotFound,
                        format!("no snapshot set {name:?}"),
                    ));
                }
                done()
            }
        }
    }

    fn need_node(&self, id: u64) -> Result<(), proto::Error> {
        if self.nodes.contains_key(&id) {
            Ok(())
        } else {
            Err(fail(ErrorCode::NotFound, format!("no host {id}")))
        }
    }

    fn register_node(&mut self, n: &NodeInfo) -> Applied {
        if n.id == 0 || n.addrs.is_empty() {
            return Err(fail(
                ErrorCode::Invalid,
                "a host needs a non-zero id and at least one address",
            ));
        }
        if self.removed.contains(&n.id) {
            return Err(fail(
                ErrorCode::Invalid,
                format!(
                    "host {} was removed from the cluster; a host joins again under a new id",
                    n.id
                ),
            ));
        }
        self.nodes.insert(n.id, n.clone());
        Ok((proto::Reply::done(), vec![Effect::Node(n.clone())]))
    }

    fn join_node(&mut self, n: &NodeInfo) -> Applied {
        if n.addrs.is_empty() {
            return Err(fail(
                ErrorCode::Invalid,
                "a joining host needs at least one address",
            ));
        }
        // Ids are never reused: above every registered, removed or (as the
        // proposer saw them) voting host.
        let id = self
            .nodes
            .keys()
            .chain(self.removed.iter())
            .copied()
            .max()
            .unwrap_or(0)
            .max(n.id.saturating_sub(1))
            + 1;
        let info = NodeInfo {
            id,
            addrs: n.addrs.clone(),
        };
        self.nodes.insert(id, info.clone());
        let reply = proto::Reply {
            value: Some(proto::reply::Value::Joined(proto::JoinReply {
                id,
                wrapped_key: vec![],
                nodes: self.nodes.values().cloned().collect(),
            })),
        };
        Ok((reply, vec![Effect::Node(info)]))
    }

    fn add_volume(&mut self, v: &proto::VolumeInfo) -> Applied {
        if v.number == 0 || v.number > MAX_VOLUME {
            return Err(fail(
                ErrorCode::Invalid,
                format!("volume number must be 1..={MAX_VOLUME}"),
            ));
        }
        if v.data_start >= v.capacity || v.voters.is_empty() {
            return Err(fail(
                ErrorCode::Invalid,
                "a volume needs a data area and at least one replica",
            ));
        }
        if self.volumes.contains_key(&v.number) {
            return Err(fail(
                ErrorCode::Exists,
                format!("Volume{} exists", v.number),
            ));
        }
        self.volumes.insert(v.number, v.clone());
        Ok((proto::Reply::done(), vec![Effect::Volume(v.clone())]))
    }

    /// Registered hosts.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    /// The level the cluster runs at.
    pub fn feature_level(&self) -> u32 {
        self.feature_level.max(crate::features::BASE)
    }

    /// The level `node` reported (None: it has not).
    pub fn level_of(&self, node: u64) -> Option<u32> {
        self.levels.get(&node).copied()
    }

    /// The highest level every registered host supports.
    pub fn lowest_supported_level(&self) -> u32 {
        crate::features::lowest(self.nodes.keys().map(|n| self.level_of(*n)))
    }

    /// Whether the leader last saw `node` up (unknown hosts count as up).
    pub fn is_up(&self, node: u64) -> bool {
        self.health.get(&node).is_none_or(|h| h.up)
    }

    /// Whether `id` is registered.
    pub fn has_node(&self, id: u64) -> bool {
        self.nodes.contains_key(&id)
    }

    /// Whether `id` was evicted.
    pub fn was_removed(&self, id: u64) -> bool {
        self.removed.contains(&id)
    }

    /// The registry as a message.
    pub fn info(&self) -> ClusterInfo {
        ClusterInfo {
            nodes: self.nodes.values().cloned().collect(),
            volumes: self.volumes.values().cloned().collect(),
            vms: self.vms.values().cloned().collect(),
            health: self.health.values().cloned().collect(),
            snapshots: self.snapshots.values().cloned().collect(),
            draining: self.draining.iter().copied().collect(),
            removed: self.removed.iter().copied().collect(),
            feature_level: self.feature_level,
            levels: self
                .levels
                .iter()
                .map(|(&node, &level)| proto::NodeLevel { node, level })
                .collect(),
            schedules: self.schedules.values().cloned().collect(),
        }
    }

    /// Encoded for a snapshot.
    pub fn encode(&self) -> Vec<u8> {
        self.info().encode_to_vec()
    }

    /// From a snapshot, with the effects of everything in it.
    pub fn decode(b: &[u8]) -> Result<(ClusterState, Vec<Effect>), prost::DecodeError> {
        let info = ClusterInfo::decode(b)?;
        let mut s = ClusterState::default();
        let mut fx = Vec::new();
        for n in info.nodes {
            fx.push(Effect::Node(n.clone()));
            s.nodes.insert(n.id, n);
        }
        for v in info.volumes {
            fx.push(Effect::Volume(v.clone()));
            s.volumes.insert(v.number, v);
        }
        for r in info.vms {
            s.vms.insert(r.name.clone(), r);
        }
        s.draining = info.draining.into_iter().collect();
        for id in info.removed {
            fx.push(Effect::RemoveNode(id));
            s.removed.insert(id);
        }
        for h in info.health {
            s.health.insert(h.node, h);
        }
        for r in info.snapshots {
            s.snapshots.insert(r.name.clone(), upgraded(r));
        }
        s.feature_level = info.feature_level;
        s.levels = info.levels.iter().map(|l| (l.node, l.level)).collect();
        s.schedules = info.schedules.into_iter().map(|x| (x.volume, x)).collect();
        Ok((s, fx))
    }
}

/// A snapshot record as hosts of protocol 3 wrote it (its state as text)
/// in today's form.
fn upgraded(mut r: SnapshotRecord) -> SnapshotRecord {
    if r.state() == proto::SnapshotSetState::Unspecified && !r.legacy_state.is_empty() {
        if let Some(s) = proto::parse::<proto::SnapshotSetState>(&r.legacy_state) {
            r.state = s;
            r.legacy_state.clear();
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> proto::ClusterOp {
        proto::ClusterOp {
            op: Some(cluster_op::Op::RegisterNode(NodeInfo {
                id,
                addrs: vec![format!("10.0.0.{id}:7100")],
            })),
        }
    }

    fn op(o: cluster_op::Op) -> proto::ClusterOp {
        proto::ClusterOp { op: Some(o) }
    }

    #[test]
    fn the_feature_level_rises_only_to_what_every_host_supports() {
        let mut c = ClusterState::default();
        for n in 1..=3 {
            assert!(c.apply(&node(n)).0.is_ok());
        }
        assert_eq!(c.feature_level(), 1);
        assert_eq!(c.lowest_supported_level(), 1, "hosts that never reported");
        for n in 1..=2 {
            let l = cluster_op::Op::NodeLevel(proto::NodeLevel { node: n, level: 2 });
            assert!(c.apply(&op(l)).0.is_ok());
        }
        let (r, _) = c.apply(&op(cluster_op::Op::SetFeatureLevel(2)));
        assert_eq!(
            r.unwrap_err().code(),
            ErrorCode::FeatureLevel,
            "host 3 has not said it supports level 2"
        );
        let l = cluster_op::Op::NodeLevel(proto::NodeLevel { node: 3, level: 2 });
        assert!(c.apply(&op(l)).0.is_ok());
        assert_eq!(c.lowest_supported_level(), 2);
        assert!(c.apply(&op(cluster_op::Op::SetFeatureLevel(2))).0.is_ok());
        assert_eq!(c.feature_level(), 2);
        // It never goes down, and it survives a snapshot.
        assert!(c.apply(&op(cluster_op::Op::SetFeatureLevel(1))).0.is_ok());
        let (back, _) = ClusterState::decode(&c.encode()).unwrap();
        assert_eq!(back.feature_level(), 2);
        assert_eq!(back.level_of(3), Some(2));
        assert_eq!(back, c);
    }

    #[test]
    fn a_schedule_keeps_its_run_state_when_its_settings_change() {
        let mut c = ClusterState::default();
        assert!(c.apply(&node(1)).0.is_ok());
        let sch = |every_ms| proto::SnapshotSchedule {
            volume: 1,
            every_ms,
            keep: 5,
            ..Default::default()
        };
        let set = |s| op(cluster_op::Op::SetSchedule(Box::new(s)));
        let (r, _) = c.apply(&set(sch(2000)));
        assert_eq!(r.unwrap_err().code(), ErrorCode::NotFound, "no Volume1 yet");
        let v = VolumeInfo {
            number: 1,
            lun: "/tmp/lun".into(),
            data_start: 1 << 20,
            capacity: 1 << 30,
            voters: vec![1],
            ..Default::default()
        };
        assert!(c.apply(&op(cluster_op::Op::AddVolume(v))).0.is_ok());
        let (r, _) = c.apply(&set(sch(0)));
        assert_eq!(r.unwrap_err().code(), ErrorCode::Invalid);
        assert!(c.apply(&set(sch(2000))).0.is_ok());
        // A run recorded, then the interval changed: the run state stays.
        let mut run = sch(0);
        run.runs = 3;
        run.running_since_ms = 77;
        run.last = Some(proto::ScheduleRun {
            snapshot: "auto-x".into(),
            ok: true,
            ..Default::default()
        });
        assert!(c
            .apply(&op(cluster_op::Op::ScheduleState(Box::new(run))))
            .0
            .is_ok());
        assert!(c.apply(&set(sch(60_000))).0.is_ok());
        let (back, _) = ClusterState::decode(&c.encode()).unwrap();
        assert_eq!(back, c, "schedules survive a snapshot of the registry");
        let s = &back.info().schedules[0];
        assert_eq!((s.every_ms, s.runs, s.running_since_ms), (60_000, 3, 77));
        assert_eq!(s.last.as_ref().unwrap().snapshot, "auto-x");
        assert!(c.apply(&op(cluster_op::Op::RemoveSchedule(1))).0.is_ok());
        assert!(c.info().schedules.is_empty());
        let (r, _) = c.apply(&op(cluster_op::Op::RemoveSchedule(1)));
        assert_eq!(r.unwrap_err().code(), ErrorCode::NotFound);
    }

    #[test]
    fn a_snapshot_record_of_an_older_host_reads_as_today() {
        let mut c = ClusterState::default();
        let old = SnapshotRecord {
            name: "nightly".into(),
            legacy_state: "complete".into(),
            ..Default::default()
        };
        assert!(c.apply(&op(cluster_op::Op::SetSnapshot(old))).0.is_ok());
        let r = &c.info().snapshots[0];
        assert_eq!(r.state(), proto::SnapshotSetState::Complete);
        assert!(r.legacy_state.is_empty());
    }
}
