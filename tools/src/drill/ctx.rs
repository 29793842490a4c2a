//! What a drill knows of the cluster, and how it asks the hosts.

use anyhow::{bail, Result};
use coordinator::client;
use coordinator::proto::{self, FaultReq, Label as _};
use coordinator::wire::Identity;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the drill knows of the cluster.
pub(super) struct Ctx {
    pub(super) me: Identity,
    pub(super) info: proto::ClusterInfo,
    pub(super) host: u64,
    pub(super) vol: u64,
    pub(super) dir: PathBuf,
    pub(super) dur: Duration,
}

impl Ctx {
    pub(super) fn addrs(&self, node: u64) -> Vec<SocketAddr> {
        self.info
            .nodes
            .iter()
            .filter(|n| n.id == node)
            .flat_map(|n| n.addrs.iter())
            .filter_map(|a| a.to_socket_addrs().ok())
            .flatten()
            .collect()
    }

    pub(super) fn hosts(&self) -> Vec<u64> {
        self.info.nodes.iter().map(|n| n.id).collect()
    }

    /// Host `node`'s status, through whichever of its addresses answers.
    pub(super) fn status(&self, node: u64) -> Option<proto::NodeStatus> {
        self.addrs(node)
            .into_iter()
            .find_map(|a| client::node_status(&self.me, a, Duration::from_millis(700)).ok())
    }

    /// Host `node`'s mode for the volume ("Direct", "BlockRedirected", ...).
    pub(super) fn mode(&self, node: u64) -> Option<String> {
        self.status(node)?
            .volumes
            .into_iter()
            .find(|v| v.number == self.vol)
            .map(|v| v.state().label().to_string())
    }

    /// The volume's coordinator (the leader of its group), as any host
    /// that answers sees it.
    pub(super) fn coordinator(&self) -> Option<u64> {
        self.hosts().into_iter().find_map(|h| {
            let s = self.status(h)?;
            s.groups
                .iter()
                .find(|g| g.group == self.vol && g.role() == proto::RaftRole::Leader)
                .map(|_| h)
        })
    }

    pub(super) fn fault(&self, node: u64, req: FaultReq) -> Result<()> {
        let mut last = String::from("no address");
        for a in self.addrs(node) {
            match client::fault(&self.me, a, req.clone(), Duration::from_secs(3)) {
                Ok(()) => return Ok(()),
                Err(e) => last = client::describe(&e),
            }
        }
        bail!(
            "host {node} did not take the {} fault: {last}",
            req.kind().label()
        )
    }

    /// Ends every fault on every host that answers (the others heal by
    /// themselves at the deadline).
    pub(super) fn heal_all(&self) {
        for h in self.hosts() {
            let _ = self.fault(
                h,
                FaultReq {
                    kind: proto::FaultKind::Heal as i32,
                    ..Default::default()
                },
            );
        }
    }

    pub(super) fn wait(&self, within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < within {
            if f() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub(super) fn others(&self) -> Vec<u64> {
        self.hosts()
            .into_iter()
            .filter(|h| *h != self.host)
            .collect()
    }
}

/// How often host `node` has been fenced off the volume's LUN.
pub(super) fn fence_count(ctx: &Ctx, node: u64) -> u64 {
    ctx.status(node)
        .and_then(|s| s.volumes.into_iter().find(|v| v.number == ctx.vol))
        .map_or(0, |v| v.fenced_events)
}
