//! When this host leads the cluster group: the running roles of hosts the
//! registry has down restart on the best-rated hosts that are up, high
//! priority first. The dead host's lease on each disk is revoked first, so
//! it cannot be handed a write again, and the placement of each VM counts
//! the ones placed before it in the same pass.

use super::placement::{self, Policy};
use super::role::VmConfig;
use super::Supervisor;
use coordinator::client::Client;
use coordinator::proto;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long a host must have been down before its VMs restart elsewhere
/// (Hyper-V waits for 10-20 missed heartbeats a second apart, VMware HA
/// about 15 s).
const FAILOVER_GRACE: Duration = Duration::from_secs(5);

/// How long a failover onto an iSCSI volume waits for the dead host to
/// be fenced off the LUN before it restarts the VM anyway.
const FENCE_WAIT: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Supervisor {
    pub(super) fn failover(&self, info: &proto::ClusterInfo, c: &mut Client) {
        // Down for a while, not for a moment: a host whose Raft messages
        // were late for a second (its disk busy behind a flush, its CPUs
        // saturated) still runs its VMs, and restarting them elsewhere
        // would have two copies write one disk until its lease ran out.
        let grace = FAILOVER_GRACE.as_millis() as u64;
        let down: Vec<u64> = info
            .health
            .iter()
            .filter(|h| !h.up && now_ms().saturating_sub(h.since) >= grace)
            .map(|h| h.node)
            .collect();
        let mut orphans: Vec<(proto::VmRole, VmConfig)> = info
            .vms
            .iter()
            .filter(|r| r.node != 0 && down.contains(&r.node))
            .filter_map(|r| VmConfig::from_role(r).ok().map(|c| (r.clone(), c)))
            .filter(|(_, c)| c.is_running())
            .collect();
        if orphans.is_empty() {
            return;
        }
        // Only the host that leads the cluster group acts.
        let leads = self
            .cfg
            .endpoints
            .first()
            .is_some_and(|a| coordinator::client::leads_cluster(&self.cfg.identity, *a));
        if !leads {
            return;
        }
        orphans.sort_by_key(|(r, c)| (c.priority_rank(), r.name.clone()));
        let mut placed: BTreeMap<u64, (u32, u64)> = BTreeMap::new();
        for (role, cfg) in orphans {
            if let Some(to) = self.restart_elsewhere(info, c, &role, cfg, &placed) {
                let e = placed.entry(to.0).or_insert((0, 0));
                e.0 += to.1;
                e.1 += to.2;
            }
        }
    }

    /// Whether the dead host is fenced off the VM's volume, or need not
    /// be (a LUN file), or was waited for long enough.
    fn fenced_or_waited(
        &self,
        info: &proto::ClusterInfo,
        role: &proto::VmRole,
        cfg: &VmConfig,
    ) -> bool {
        let dead = role.node;
        // On an iSCSI volume the dead host is fenced off the LUN first
        // (the volumes of the host leading the cluster preempt its key).
        let iscsi = info
            .volumes
            .iter()
            .any(|v| v.number == cfg.volume && v.lun.starts_with("iscsi://"));
        let fenced = self
            .cfg
            .fenced
            .read()
            .is_ok_and(|f| f.contains(&(cfg.volume, dead)));
        if !iscsi || fenced {
            return true;
        }
        let since = info
            .health
            .iter()
            .find(|h| h.node == dead)
            .map_or(0, |h| h.since);
        if now_ms().saturating_sub(since) < FENCE_WAIT.as_millis() as u64 {
            tracing::info!(vm = %role.name, dead, "failover: waiting for host {dead} to be fenced off Volume{}", cfg.volume);
            return false;
        }
        tracing::error!(vm = %role.name, dead, "failover: host {dead} could not be fenced off Volume{} in {} s; restarting the VM anyway", cfg.volume, FENCE_WAIT.as_secs());
        true
    }

    /// Places one VM of a dead host on the best host that can run it:
    /// where it went, with its vCPUs and memory.
    fn restart_elsewhere(
        &self,
        info: &proto::ClusterInfo,
        c: &mut Client,
        role: &proto::VmRole,
        mut cfg: VmConfig,
        placed: &BTreeMap<u64, (u32, u64)>,
    ) -> Option<(u64, u32, u64)> {
        let (me, dead) = (self.cfg.node, role.node);
        let mut loads = placement::cluster_loads(&self.cfg.identity, c, info, cfg.volume).ok()?;
        for l in &mut loads {
            if let Some((vcpus, mem)) = placed.get(&l.node) {
                l.vcpus += vcpus;
                l.mem_available = l.mem_available.saturating_sub(*mem);
            }
        }
        if !self.fenced_or_waited(info, role, &cfg) {
            return None;
        }
        let Some(to) = placement::best(&loads, &cfg.needs(), &Policy::default()) else {
            tracing::error!(vm = %role.name, dead, "failover: no host can run it");
            return None;
        };
        // Fence the dead host off the disk's lease.
        if let Some(disk) = cfg.disk_on(&self.cfg.mount_root) {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata(&disk) {
                let op = proto::volume_op::Op::RevokeLease(proto::RevokeLeaseOp {
                    node: dead,
                    ino: m.ino(),
                    now: 0,
                    revoked: true,
                });
                if let Err(e) = c.volume_op(cfg.volume, op) {
                    tracing::warn!(vm = %role.name, error = %coordinator::client::describe(&e), "failover: revoking the dead host's lease");
                }
            }
        }
        cfg.migrate_to = None;
        cfg.migrate_quick = false;
        cfg.restore_from = None;
        cfg.last_migration = Some(format!(
            "failover: host {dead} went down; restarted on host {to} (placed by host {me})"
        ));
        let new = proto::VmRole {
            name: role.name.clone(),
            node: to,
            config: cfg.to_bytes(),
        };
        match c.set_vm_role(new) {
            Ok(()) => {
                tracing::warn!(vm = %role.name, dead, to, "failover: VM restarts on another host");
                Some((to, cfg.vcpus, cfg.memory))
            }
            Err(e) => {
                tracing::error!(vm = %role.name, error = %coordinator::client::describe(&e), "failover: cannot place");
                None
            }
        }
    }
}
