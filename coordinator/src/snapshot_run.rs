//! Taking a consistent snapshot of a volume over every host that mounts
//! it (the orchestration `csvctl snapshot create` and the cluster leader's
//! snapshot schedules share): `prepare` (hooks told, files flushed),
//! `freeze` (hooks quiesce, VMs on the volume pause, new writes wait,
//! writes in progress finish and are flushed), one metadata commit on the
//! volume's coordinator, `thaw`, `complete`. The freeze has a hard time
//! limit: a host that does not freeze within it, or a hook that fails or
//! hangs, aborts the snapshot and every host thaws; a host whose limit
//! passed before the thaw thawed by itself, and the snapshot is deleted.
//! If the orchestrator itself dies, every host thaws at its limit, and the
//! snapshot exists whole (the commit happened while all were frozen) or
//! not at all.

use crate::client::{self, describe, Client};
use crate::proto::{self, SnapshotPhaseReply, SnapshotPhaseReq};
use crate::wire::Identity;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A snapshot name from a prefix and a time: `PREFIX-YYYYMMDD-HHMMSS`
/// (UTC), with the milliseconds when `prefix` is `auto` (a schedule may
/// run more than once a second).
pub fn default_name(prefix: &str, now_ms: u64) -> String {
    let (y, m, d, hh, mm, ss) = crate::group::utc(now_ms);
    let base = format!("{prefix}-{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}");
    if prefix == "auto" {
        format!("{base}-{:03}", now_ms % 1000)
    } else {
        base
    }
}

/// A host taking part: its id and where to reach it.
struct Party {
    node: u64,
    addrs: Vec<SocketAddr>,
}

/// Runs one phase on every host at once; the answers in host order.
fn phase_all(
    me: &Identity,
    parties: &[Party],
    vol: u64,
    name: &str,
    phase: proto::SnapshotPhase,
    limit: Duration,
    timeout: Duration,
) -> Vec<(u64, Result<SnapshotPhaseReply, String>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = parties
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let mut last = String::from("no address");
                    for a in &p.addrs {
                        let req = SnapshotPhaseReq {
                            volume: vol,
                            name: name.to_string(),
                            phase: phase as i32,
                            limit_ms: limit.as_millis() as u64,
                        };
                        match client::snapshot_phase(me, *a, req, timeout) {
                            Ok(r) => return (p.node, Ok(r)),
                            Err(e @ client::ClientError::Refused(_)) => {
                                return (p.node, Err(describe(&e)))
                            }
                            Err(e) => last = format!("{a}: {}", describe(&e)),
                        }
                    }
                    (p.node, Err(last))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, Err("phase thread died".into()))))
            .collect()
    })
}

/// What a snapshot took.
#[derive(Debug, Clone)]
pub struct Taken {
    pub name: String,
    /// Each host's thaw reply, with its freeze's drain and flush times.
    pub hosts: Vec<(u64, SnapshotPhaseReply)>,
    pub freeze_started_ms: u64,
    pub committed_ms: u64,
    pub thawed_ms: u64,
}

/// Takes snapshot `name` of `vol` through the whole protocol: prepare,
/// freeze every host that mounts it, commit, thaw, complete; aborted (every
/// host thawed) when a step fails or the freeze nears `limit`.
pub fn take(
    me: &Identity,
    c: &mut Client,
    vol: u64,
    name: &str,
    limit: Duration,
) -> Result<Taken, String> {
    let me = me.clone();
    let name = name.to_string();
    let info = c.cluster_info().map_err(|e| describe(&e))?;
    if !info.volumes.iter().any(|v| v.number == vol) {
        return Err(format!("there is no Volume{vol} in the cluster"));
    }
    // Every host that answers and mounts the volume takes part, also one
    // the registry has down for the moment (a host whose Raft messages
    // were late under load is still writing, and one left out would go
    // on writing in place over blocks the snapshot shares). One that is up
    // but does not answer could be writing too, so the snapshot waits for
    // nobody and is refused; one that is down and does not answer is
    // skipped.
    let mut parties = Vec::new();
    for n in &info.nodes {
        let down = info.health.iter().any(|h| h.node == n.id && !h.up);
        let Some(st) = client::host_status(&me, n) else {
            if down {
                continue;
            }
            return Err(format!(
                "host {} is up in the registry but does not answer; cannot freeze it (retry, or wait until the cluster marks it down)",
                n.id
            ));
        };
        let mounted = st
            .volumes
            .iter()
            .any(|v| v.number == vol && v.state() != proto::IoMode::Unmounted);
        if mounted {
            parties.push(Party {
                node: n.id,
                addrs: crate::node::resolve(&n.addrs),
            });
        }
    }
    if parties.is_empty() {
        return Err(format!("no host mounts Volume{vol}"));
    }
    let abort = |why: String| -> String {
        let _ = phase_all(
            &me,
            &parties,
            vol,
            &name,
            proto::SnapshotPhase::Abort,
            limit,
            Duration::from_secs(15),
        );
        format!("snapshot {name} of Volume{vol} aborted: {why}; every host thawed")
    };
    let failed = |r: &[(u64, Result<SnapshotPhaseReply, String>)]| -> Option<String> {
        let bad: Vec<String> = r
            .iter()
            .filter_map(|(n, x)| x.as_ref().err().map(|e| format!("host {n}: {e}")))
            .collect();
        (!bad.is_empty()).then(|| bad.join("; "))
    };
    let r = phase_all(
        &me,
        &parties,
        vol,
        &name,
        proto::SnapshotPhase::Prepare,
        limit,
        limit + Duration::from_secs(15),
    );
    if let Some(e) = failed(&r) {
        return Err(abort(format!("prepare failed ({e})")));
    }
    let freeze_started_ms = crate::group::now_ms();
    let t0 = Instant::now();
    let frozen = phase_all(
        &me,
        &parties,
        vol,
        &name,
        proto::SnapshotPhase::Freeze,
        limit,
        limit + Duration::from_secs(2),
    );
    if let Some(e) = failed(&frozen) {
        return Err(abort(format!("freeze failed ({e})")));
    }
    // Commit only with time to spare before the hosts' own limit.
    if t0.elapsed() + Duration::from_millis(50) >= limit {
        return Err(abort(format!(
            "the hosts froze after {} ms, too close to the {} ms limit",
            t0.elapsed().as_millis(),
            limit.as_millis()
        )));
    }
    if let Err(e) = c.create_snapshot(vol, &name) {
        return Err(abort(format!("commit failed ({})", describe(&e))));
    }
    let committed_ms = crate::group::now_ms();
    let thaw = phase_all(
        &me,
        &parties,
        vol,
        &name,
        proto::SnapshotPhase::Thaw,
        limit,
        Duration::from_secs(30),
    );
    let thawed_ms = crate::group::now_ms();
    let expired: Vec<u64> = thaw
        .iter()
        .filter(|(_, x)| x.as_ref().is_ok_and(|r| r.expired))
        .map(|(n, _)| *n)
        .collect();
    let thaw_failed = failed(&thaw);
    if !expired.is_empty() || thaw_failed.is_some() {
        let _ = c.delete_snapshot(vol, &name);
        let why = match thaw_failed {
            Some(e) => format!("thaw failed ({e})"),
            None => format!(
                "the freeze limit of {} ms passed on host(s) {expired:?} before the thaw, so writes went on during the commit",
                limit.as_millis()
            ),
        };
        return Err(abort(why));
    }
    let _ = phase_all(
        &me,
        &parties,
        vol,
        &name,
        proto::SnapshotPhase::Complete,
        limit,
        Duration::from_secs(15),
    );
    let hosts = thaw
        .into_iter()
        .filter_map(|(n, r)| r.ok().map(|r| (n, r)))
        .map(|(n, mut r)| {
            if let Some((_, Ok(f))) = frozen.iter().find(|(m, _)| *m == n) {
                r.drain_ms = f.drain_ms;
                r.flush_ms = f.flush_ms;
                r.vms = f.vms;
                r.vm_quiesce = f.vm_quiesce.clone();
                r.hooks.splice(0..0, f.hooks.iter().cloned());
            }
            (n, r)
        })
        .collect();
    Ok(Taken {
        name,
        hosts,
        freeze_started_ms,
        committed_ms,
        thawed_ms,
    })
}
