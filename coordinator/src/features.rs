//! Feature levels: how hosts of two builds run side by side during a
//! rolling upgrade (as etcd's cluster version does).
//!
//! Each build supports the commands of every level up to its own
//! ([`SUPPORTED`]). Every host reports the level it supports in the
//! cluster registry (a `NodeLevel` command it proposes itself), and the
//! cluster's leader raises the cluster's level once every registered host
//! supports it; it never goes down. Each replicated command carries the
//! level it needs (`Command.version`, see [`required`]):
//!
//! - a leader refuses a client's command that needs more than the
//!   cluster's level (`FeatureLevel`), so an older host never has to apply
//!   what it does not understand; the client then falls back to what the
//!   cluster supports (a create and a lease grant, say, instead of a
//!   create that carries its lease);
//! - a replica that finds a committed command above its own level (which
//!   the first rule prevents) stops applying that group rather than
//!   misapply it, and says so.
//!
//! | level | what it adds |
//! |---|---|
//! | 1 | the base: every command of protocol 3 |
//! | 2 | a create that carries its creator's write lease (`CreateOp.lease_ttl`) |
//! | 3 | FIFOs, device nodes and sockets, access times, nanosecond times, extended attributes and POSIX ACLs, file locks (a create that carries the umask), `RENAME_EXCHANGE` |
//! | 4 | snapshot schedules in the registry (`set_schedule`, `schedule_state`, `remove_schedule`); a volume keeps up to 512 snapshots (`SnapshotOp.limit` above 64) |

use crate::proto::{cluster_op, command, volume_op};

/// The base level: what a host that never reported one supports.
pub const BASE: u32 = 1;

/// A create that carries its creator's write lease.
pub const CREATE_WITH_LEASE: u32 = 2;

/// Special files, access times, extended attributes and exchange.
pub const POSIX_EXTRAS: u32 = 3;

/// Snapshot schedules in the cluster registry.
pub const SNAPSHOT_SCHEDULES: u32 = 4;

/// The highest level this build supports.
pub const SUPPORTED: u32 = SNAPSHOT_SCHEDULES;

/// The level a command needs.
pub fn required(body: &command::Body) -> u32 {
    match body {
        command::Body::Volume(op) => match &op.op {
            Some(volume_op::Op::Create(c))
                if c.kind > crate::proto::NodeKind::Symlink as i32
                    || c.rdev != 0
                    || c.umask.is_some() =>
            {
                POSIX_EXTRAS
            }
            Some(volume_op::Op::SetAttr(c))
                if c.atime.is_some() || c.mtime_sub_ns != 0 || c.atime_sub_ns != 0 =>
            {
                POSIX_EXTRAS
            }
            Some(
                volume_op::Op::SetXattr(_)
                | volume_op::Op::RemoveXattr(_)
                | volume_op::Op::Exchange(_)
                | volume_op::Op::Lock(_)
                | volume_op::Op::UnlockOwner(_)
                | volume_op::Op::Accessed(_),
            ) => POSIX_EXTRAS,
            Some(volume_op::Op::Create(c)) if c.lease_ttl > 0 => CREATE_WITH_LEASE,
            Some(volume_op::Op::CreateSnapshot(s))
                if s.limit as usize > crate::meta::DEFAULT_SNAPSHOTS =>
            {
                SNAPSHOT_SCHEDULES
            }
            _ => BASE,
        },
        command::Body::Cluster(op) => match &op.op {
            Some(
                cluster_op::Op::SetSchedule(_)
                | cluster_op::Op::ScheduleState(_)
                | cluster_op::Op::RemoveSchedule(_),
            ) => SNAPSHOT_SCHEDULES,
            _ => BASE,
        },
    }
}

/// The level a cluster can run at: the lowest any of its hosts supports
/// (`BASE` for a host that has not reported one; none at all: `BASE`).
pub fn lowest(levels: impl IntoIterator<Item = Option<u32>>) -> u32 {
    levels
        .into_iter()
        .map(|l| l.unwrap_or(BASE))
        .min()
        .unwrap_or(BASE)
        .max(BASE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CreateOp, VolumeOp};

    fn create(lease_ttl: u64) -> command::Body {
        command::Body::Volume(VolumeOp {
            op: Some(volume_op::Op::Create(CreateOp {
                lease_ttl,
                ..Default::default()
            })),
        })
    }

    #[test]
    fn a_create_with_its_lease_needs_level_two() {
        assert_eq!(required(&create(0)), BASE);
        assert_eq!(required(&create(30_000)), CREATE_WITH_LEASE);
        const { assert!(SUPPORTED >= CREATE_WITH_LEASE) };
    }

    #[test]
    fn snapshot_schedules_and_512_snapshots_need_level_four() {
        let sched = |o| command::Body::Cluster(crate::proto::ClusterOp { op: Some(o) });
        assert_eq!(
            required(&sched(cluster_op::Op::RemoveSchedule(1))),
            SNAPSHOT_SCHEDULES
        );
        assert_eq!(
            required(&sched(cluster_op::Op::SetSchedule(Box::default()))),
            SNAPSHOT_SCHEDULES
        );
        assert_eq!(required(&sched(cluster_op::Op::RemoveVolume(1))), BASE);
        let snap = |limit| {
            command::Body::Volume(crate::proto::VolumeOp {
                op: Some(volume_op::Op::CreateSnapshot(crate::proto::SnapshotOp {
                    name: "s".into(),
                    now: 0,
                    limit,
                })),
            })
        };
        assert_eq!(required(&snap(0)), BASE);
        assert_eq!(required(&snap(64)), BASE);
        assert_eq!(required(&snap(512)), SNAPSHOT_SCHEDULES);
    }

    #[test]
    fn the_cluster_runs_at_its_lowest_host() {
        assert_eq!(lowest([Some(2), Some(2), Some(2)]), 2);
        assert_eq!(lowest([Some(2), None, Some(2)]), BASE);
        assert_eq!(lowest([Some(2), Some(1)]), 1);
        assert_eq!(lowest(std::iter::empty()), BASE);
    }
}
