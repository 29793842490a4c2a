//! Applying a group's committed entries to its state machine, and
//! answering linearizable reads from the applied state.

use super::{respond, Group, GroupError, Machine};
use crate::cluster::Effect;
use crate::codec;
use crate::proto::{self, command, read, response, ErrorCode, Response};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, EntryType};

impl Group {
    pub(super) fn apply(
        &mut self,
        entries: Vec<raft::eraftpb::Entry>,
        fx: &mut Vec<Effect>,
    ) -> Result<(), GroupError> {
        for e in entries {
            let index = e.index;
            match e.get_entry_type() {
                EntryType::EntryNormal if !e.get_data().is_empty() => {
                    self.apply_command(index, e.get_data(), fx)?
                }
                EntryType::EntryNormal => {}
                EntryType::EntryConfChangeV2 => {
                    match ConfChangeV2::parse_from_bytes(e.get_data()) {
                        Ok(cc) => {
                            self.conf = self.raw.apply_conf_change(&cc)?;
                            self.force_snapshot |= cc
                                .get_changes()
                                .iter()
                                .any(|c| c.get_change_type() == ConfChangeType::AddLearnerNode);
                        }
                        Err(x) => tracing::error!(group = self.id, index, "bad conf change: {x}"),
                    }
                }
                EntryType::EntryConfChange => match ConfChange::parse_from_bytes(e.get_data()) {
                    Ok(cc) => self.conf = self.raw.apply_conf_change(&cc)?,
                    Err(x) => tracing::error!(group = self.id, index, "bad conf change: {x}"),
                },
            }
            self.applied = index;
            // Forget clients idle for a long stretch of the log (the same
            // on every replica: it depends on the index only).
            if index % 1024 == 0 {
                let horizon = index.saturating_sub(1 << 20);
                self.dedup.retain(|_, d| d.index > horizon);
            }
        }
        Ok(())
    }

    fn apply_command(
        &mut self,
        index: u64,
        data: &[u8],
        fx: &mut Vec<Effect>,
    ) -> Result<(), GroupError> {
        let cmd = match proto::Command::decode(data) {
            Ok(c) => c,
            Err(e) => {
                // Only proposals of hosts that passed the handshake reach
                // the log; skip it the same way on every replica rather
                // than stop the group.
                tracing::error!(group = self.id, index, "undecodable command skipped: {e}");
                return Ok(());
            }
        };
        if cmd.version > self.supported {
            return Err(GroupError::Level {
                group: self.id,
                index,
                needs: cmd.version,
                supports: self.supported,
            });
        }
        let (client, seq) = (cmd.client, cmd.seq);
        if client != 0 {
            if let Some(d) = self.dedup.get(&client) {
                if d.seq >= seq {
                    // A retry that was proposed twice: applied once.
                    if let Some(w) = self.waiters.remove(&(client, seq)) {
                        let mut r = d.response.clone().unwrap_or_default();
                        r.seq = seq;
                        let _ = w.send(r);
                    }
                    return Ok(());
                }
            }
        }
        let result = match (&mut self.machine, cmd.body) {
            (Machine::Volume(v), Some(command::Body::Volume(op))) => {
                match codec::op_from_proto(&op) {
                    Ok(op) => v
                        .apply(op)
                        .map(|r| codec::reply_to_proto(&r))
                        .map_err(|e| codec::meta_error_to_proto(&e)),
                    Err(e) => Err(codec::error(ErrorCode::BadRequest, e.to_string())),
                }
            }
            (Machine::Cluster(c), Some(command::Body::Cluster(op))) => {
                let (r, f) = c.apply(&op);
                fx.extend(f);
                r
            }
            _ => Err(codec::error(
                ErrorCode::BadRequest,
                "command does not belong to this group",
            )),
        };
        let resp = Response {
            seq,
            result: Some(match result {
                Ok(v) => response::Result::Reply(v),
                Err(e) => response::Result::Error(e),
            }),
        };
        if client != 0 {
            self.dedup.insert(
                client,
                proto::DedupEntry {
                    client,
                    seq,
                    index,
                    response: Some(resp.clone()),
                },
            );
        }
        if let Some(w) = self.waiters.remove(&(client, seq)) {
            let _ = w.send(resp);
        }
        Ok(())
    }

    pub(super) fn serve_reads(&mut self) {
        let applied = self.applied;
        let (now, later): (Vec<_>, Vec<_>) =
            self.ready_reads.drain(..).partition(|(i, _)| *i <= applied);
        self.ready_reads = later;
        for (_, r) in now {
            let res = self.query(&r.query);
            respond(&r.waiter, r.seq, res);
        }
    }

    /// Answers a read from the applied state.
    fn query(&self, q: &proto::Read) -> Result<proto::Reply, proto::Error> {
        use proto::reply::Value;
        let value = match (&self.machine, q.query.as_ref()) {
            (Machine::Cluster(c), Some(read::Query::Cluster(_))) => Value::Cluster(c.info()),
            (Machine::Volume(v), Some(q)) => {
                let me = |e: crate::meta::MetaError| codec::meta_error_to_proto(&e);
                let attr = |ino| {
                    v.getattr(ino)
                        .map(|a| codec::attr_to_proto(&a))
                        .ok_or_else(|| me(crate::meta::MetaError::NotFound))
                };
                match q {
                    read::Query::Lookup(l) => {
                        Value::Attr(attr(v.lookup(l.parent, &l.name).map_err(me)?)?)
                    }
                    read::Query::GetAttr(i) => Value::Attr(attr(*i)?),
                    read::Query::ReadDir(i) => Value::Entries(proto::DirEntries {
                        entries: v
                            .readdir(*i)
                            .map_err(me)?
                            .into_iter()
                            .map(|(name, ino)| proto::DirEntry {
                                name,
                                ino,
                                kind: v
                                    .getattr(ino)
                                    .map_or(proto::NodeKind::File, |a| codec::kind_code(a.kind))
                                    as i32,
                            })
                            .collect(),
                        dir: v.getattr(*i).map(|a| codec::attr_to_proto(&a)),
                    }),
                    read::Query::ReadLink(i) => {
                        Value::Text(v.readlink(*i).map_err(me)?.to_string())
                    }
                    read::Query::Extents(i) => Value::Extents(codec::shared_extents_to_proto(
                        &v.extents_shared(*i).map_err(me)?,
                    )),
                    read::Query::Snapshots(_) => Value::Snapshots(proto::SnapshotList {
                        snapshots: v
                            .snapshots()
                            .into_iter()
                            .map(|s| proto::SnapshotInfo {
                                id: s.id,
                                name: s.name,
                                created: s.created,
                                files: s.files,
                                exclusive: s.exclusive,
                            })
                            .collect(),
                    }),
                    read::Query::Leases(i) => Value::Leases(proto::LeaseList {
                        leases: v
                            .leases(*i)
                            .into_iter()
                            .map(|(node, l)| proto::Lease {
                                node,
                                epoch: l.epoch,
                                expires: l.expires,
                                write: l.write,
                            })
                            .collect(),
                    }),
                    read::Query::LeaseHistory(i) => Value::LeaseHistory(proto::LeaseHistory {
                        events: v
                            .lease_history((*i != 0).then_some(*i))
                            .iter()
                            .map(codec::lease_event_to_proto)
                            .collect(),
                    }),
                    read::Query::Check(_) => Value::Text(v.check().join("\n")),
                    read::Query::LockConflict(c) => {
                        let want = codec::lock_from_proto(c);
                        let (start, end) = if want.flock {
                            (0, u64::MAX)
                        } else {
                            (want.start, want.end)
                        };
                        Value::Lock(
                            v.lock_conflict(
                                c.ino, want.node, want.owner, want.flock, start, end, want.write,
                            )
                            .map(|l| codec::lock_to_proto(c.ino, &l))
                            .unwrap_or_default(),
                        )
                    }
                    read::Query::Xattrs(i) => {
                        Value::Xattrs(codec::xattrs_to_proto(v.xattrs(*i).map_err(me)?))
                    }
                    read::Query::Usage(_) => Value::Usage(proto::VolumeUsage {
                        free: v.free_bytes(),
                        quarantined: v.quarantined_bytes(),
                        inodes: v.inode_count(),
                        leases: v.lease_count(),
                    }),
                    read::Query::Cluster(_) => {
                        return Err(codec::error(
                            ErrorCode::BadRequest,
                            "the cluster registry is read from the cluster group",
                        ))
                    }
                }
            }
            _ => {
                return Err(codec::error(
                    ErrorCode::BadRequest,
                    "read does not belong to this group",
                ))
            }
        };
        Ok(proto::Reply::of(value))
    }
}
