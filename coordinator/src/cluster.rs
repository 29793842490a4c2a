//! The cluster group's state machine: the hosts and their addresses, the
//! volumes (each with its own Raft group) and the VM roles.

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
}

/// Highest volume number (the group id space above it is free).
pub const MAX_VOLUME: u64 = 1 << 20;

impl ClusterState {
    /// Applies one committed command.
    pub fn apply(
        &mut self,
        op: &proto::ClusterOp,
    ) -> (Result<proto::Reply, proto::Error>, Vec<Effect>) {
        let done = Ok(proto::Reply {
            value: Some(proto::reply::Value::Done(proto::Empty {})),
        });
        match op.op.as_ref() {
            None => (
                Err(codec::error(
                    ErrorCode::BadRequest,
                    "cluster command missing",
                )),
                vec![],
            ),
            Some(cluster_op::Op::RegisterNode(n)) => {
                if n.id == 0 || n.addrs.is_empty() {
                    return (
                        Err(codec::error(
                            ErrorCode::Invalid,
                            "a host needs a non-zero id and at least one address",
                        )),
                        vec![],
                    );
                }
                if self.removed.contains(&n.id) {
                    return (
                        Err(codec::error(
                            ErrorCode::Invalid,
                            format!(
                                "host {} was removed from the cluster; a host joins again under a new id",
                                n.id
                            ),
                        )),
                        vec![],
                    );
                }
                self.nodes.insert(n.id, n.clone());
                (done, vec![Effect::Node(n.clone())])
            }
            Some(cluster_op::Op::JoinNode(n)) => {
                if n.addrs.is_empty() {
                    return (
                        Err(codec::error(
                            ErrorCode::Invalid,
                            "a joining host needs at least one address",
                        )),
                        vec![],
                    );
                }
                // Ids are never reused: above every registered, removed or
                // (as the proposer saw them) voting host.
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
                (
                    Ok(proto::Reply {
                        value: Some(proto::reply::Value::Joined(proto::JoinReply {
                            id,
                            wrapped_key: vec![],
                            nodes: self.nodes.values().cloned().collect(),
                        })),
                    }),
                    vec![Effect::Node(info)],
                )
            }
            Some(cluster_op::Op::RemoveNode(id)) => {
                if self.nodes.remove(id).is_none() {
                    return (
                        Err(codec::error(ErrorCode::NotFound, format!("no host {id}"))),
                        vec![],
                    );
                }
                self.removed.insert(*id);
                self.draining.remove(id);
                self.health.remove(id);
                (done, vec![Effect::RemoveNode(*id)])
            }
            Some(cluster_op::Op::AddVolume(v)) => {
                if v.number == 0 || v.number > MAX_VOLUME {
                    return (
                        Err(codec::error(
                            ErrorCode::Invalid,
                            format!("volume number must be 1..={MAX_VOLUME}"),
                        )),
                        vec![],
                    );
                }
                if v.data_start >= v.capacity || v.voters.is_empty() {
                    return (
                        Err(codec::error(
                            ErrorCode::Invalid,
                            "a volume needs a data area and at least one replica",
                        )),
                        vec![],
                    );
                }
                if self.volumes.contains_key(&v.number) {
                    return (
                        Err(codec::error(
                            ErrorCode::Exists,
                            format!("Volume{} exists", v.number),
                        )),
                        vec![],
                    );
                }
                self.volumes.insert(v.number, v.clone());
                (done, vec![Effect::Volume(v.clone())])
            }
            Some(cluster_op::Op::SetVmRole(r)) => {
                self.vms.insert(r.name.clone(), r.clone());
                (done, vec![])
            }
            Some(cluster_op::Op::SetDraining(d)) => {
                if !self.nodes.contains_key(&d.node) {
                    return (
                        Err(codec::error(
                            ErrorCode::NotFound,
                            format!("no host {}", d.node),
                        )),
                        vec![],
                    );
                }
                if d.draining {
                    self.draining.insert(d.node);
                } else {
                    self.draining.remove(&d.node);
                }
                (done, vec![])
            }
            Some(cluster_op::Op::RemoveVmRole(name)) => {
                if self.vms.remove(name).is_none() {
                    return (
                        Err(codec::error(
                            ErrorCode::NotFound,
                            format!("no VM role {name:?}"),
                        )),
                        vec![],
                    );
                }
                (done, vec![])
            }
            Some(cluster_op::Op::RemoveVolume(n)) => {
                if self.volumes.remove(n).is_none() {
                    return (
                        Err(codec::error(ErrorCode::NotFound, format!("no Volume{n}"))),
                        vec![],
                    );
                }
                (done, vec![Effect::RemoveVolume(*n)])
            }
            Some(cluster_op::Op::NodeHealth(h)) => {
                self.health.insert(h.node, h.clone());
                (done, vec![])
            }
            Some(cluster_op::Op::SetSnapshot(s)) => {
                if s.name.is_empty() {
                    return (
                        Err(codec::error(
                            ErrorCode::Invalid,
                            "a snapshot set needs a name",
                        )),
                        vec![],
                    );
                }
                self.snapshots.insert(s.name.clone(), s.clone());
                (done, vec![])
            }
            Some(cluster_op::Op::DeleteSnapshot(name)) => {
                if self.snapshots.remove(name).is_none() {
                    return (
                        Err(codec::error(
                            ErrorCode::NotFound,
                            format!("no snapshot set {name:?}"),
                        )),
                        vec![],
                    );
                }
                (done, vec![])
            }
        }
    }

    /// Registered hosts.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
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
            s.snapshots.insert(r.name.clone(), r);
        }
        Ok((s, fx))
    }
}
