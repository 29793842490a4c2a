//! The console's view of the cluster: its JSON, built from the registry
//! and every host's status, and the events read off the difference
//! between two rounds of it.

use coordinator::group::now_ms;
use coordinator::proto::{self, Label as _, RaftRole};
use hypervisor_shim::supervisor::placement;
use hypervisor_shim::supervisor::role::VmConfig;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};

/// Events kept for the page.
pub const EVENTS: usize = 200;

/// Records an event (the oldest go past [`EVENTS`]).
pub fn push_event(events: &mut VecDeque<Value>, what: &str, text: String) {
    events.push_back(json!({"at": now_ms(), "kind": what, "text": text}));
    while events.len() > EVENTS {
        events.pop_front();
    }
}

/// The console's JSON from the registry and the hosts' statuses.
pub fn build_state(
    cluster: &str,
    info: &proto::ClusterInfo,
    statuses: &[proto::NodeStatus],
) -> Value {
    let status_of = |id: u64| statuses.iter().find(|s| s.node == id);
    let placed = |id: u64| -> Vec<VmConfig> {
        info.vms
            .iter()
            .filter(|r| r.node == id)
            .filter_map(|r| VmConfig::from_role(r).ok())
            .filter(VmConfig::is_running)
            .collect()
    };
    // Ratings for a typical VM (1 vCPU, 1 GiB), as placement would give.
    let loads: Vec<placement::HostLoad> = info
        .nodes
        .iter()
        .map(|n| {
            let st = status_of(n.id);
            let load = st.and_then(|s| s.load).unwrap_or_default();
            let vms = placed(n.id);
            let (mut mem_total, mut mem_available) = (load.mem_total, load.mem_available);
            if load.vm_memory > 0 {
                let committed: u64 = vms.iter().map(|c| c.memory).sum();
                mem_total = mem_total.min(load.vm_memory);
                mem_available = mem_available.min(load.vm_memory.saturating_sub(committed));
            }
            placement::HostLoad {
                node: n.id,
                up: st.is_some() && info.health.iter().all(|h| h.node != n.id || h.up),
                draining: info.draining.contains(&n.id),
                cores: load.cores,
                cpu_busy: f64::from(load.cpu_busy_permille) / 1000.0,
                vcpus: vms.iter().map(|c| c.vcpus).sum(),
                mem_total,
                mem_available,
                disk_free: 1,
                disk_total: 1,
                net_busy: None,
            }
        })
        .collect();
    let ratings = placement::rate(
        &loads,
        &placement::VmNeeds {
            vcpus: 1,
            memory: 1 << 30,
            disk: 0,
            preferred: vec![],
        },
        &placement::Policy::default(),
    );
    let hosts: Vec<Value> = info
        .nodes
        .iter()
        .map(|n| {
            let st = status_of(n.id);
            let h = info.health.iter().find(|h| h.node == n.id);
            let r = ratings.iter().find(|r| r.node == n.id);
            let load = st.and_then(|s| s.load).unwrap_or_default();
            let health = match (st.is_some(), h.is_none_or(|h| h.up)) {
                (true, true) if info.draining.contains(&n.id) => "draining",
                (true, true) => "up",
                (false, true) => "not answering",
                (_, false) => "down",
            };
            json!({
                "id": n.id,
                "addrs": n.addrs,
                "health": health,
                "since": h.map_or(0, |h| h.since),
                "stars": r.map_or(0, |r| r.stars),
                "rating_reason": r.map(|r| r.reason.clone()).unwrap_or_default(),
                "cores": load.cores,
                "cpu_busy_pct": load.cpu_busy_permille / 10,
                "mem_total": load.mem_total,
                "mem_available": load.mem_available,
                "vm_memory": load.vm_memory,
                "leads": st.map(|s| s.groups.iter().filter(|g| g.role() == RaftRole::Leader)
                    .map(|g| coordinator::metrics::group_name(g.group)).collect::<Vec<_>>()).unwrap_or_default(),
            })
        })
        .collect();
    let volumes: Vec<Value> = info
        .volumes
        .iter()
        .map(|v| {
            let coordinator = statuses
                .iter()
                .find(|s| s.groups.iter().any(|g| g.group == v.number && g.role() == RaftRole::Leader))
                .map_or(0, |s| s.node);
            let per_host: Vec<Value> = info
                .nodes
                .iter()
                .map(|n| {
                    let vs = status_of(n.id).and_then(|s| s.volumes.iter().find(|x| x.number == v.number));
                    match vs {
                        Some(vs) => json!({
                            "host": n.id, "state": vs.state().label(), "reason": vs.reason,
                            "direct_bytes": vs.direct_read + vs.direct_written,
                            "redirected_bytes": vs.redirected_read + vs.redirected_written,
                        }),
                        None => json!({"host": n.id, "state": "Unknown", "reason": "the host does not answer"}),
                    }
                })
                .collect();
            json!({
                "number": v.number,
                "name": format!("Volume{}", v.number),
                "lun": v.lun,
                "capacity": v.capacity,
                "coordinator": coordinator,
                "hosts": per_host,
            })
        })
        .collect();
    let vms: Vec<Value> = info
        .vms
        .iter()
        .map(|r| {
            let cfg = VmConfig::from_role(r).ok();
            let rt = status_of(r.node).and_then(|s| s.vms.iter().find(|v| v.name == r.name));
            json!({
                "name": r.name,
                "host": r.node,
                "wanted": cfg.as_ref().map(|c| c.state.label()).unwrap_or_default(),
                "state": rt.map_or(if r.node == 0 { "stopped" } else { "unknown" }, |v| v.state().label()),
                "memory": cfg.as_ref().map_or(0, |c| c.memory),
                "vcpus": cfg.as_ref().map_or(0, |c| c.vcpus),
                "disk": cfg.as_ref().map(|c| c.disk.clone()).unwrap_or_default(),
                "migrate_to": cfg.as_ref().and_then(|c| c.migrate_to),
                "migration": rt.map(|v| v.migration.clone()).unwrap_or_default(),
                "migration_pct": rt.map_or(0, |v| v.migration_pct),
                "last_migration": cfg.as_ref().and_then(|c| c.last_migration.clone()),
                "heartbeats": rt.map_or(0, |v| v.heartbeats),
            })
        })
        .collect();
    json!({
        "cluster": cluster,
        "at": now_ms(),
        "hosts": hosts,
        "volumes": volumes,
        "vms": vms,
    })
}

/// What changed between two rounds, as (kind, text) events.
pub fn diff(old: &Value, new: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let by = |v: &Value, list: &str, key: &str| -> BTreeMap<String, Value> {
        v[list]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| (x[key].to_string(), x.clone()))
            .collect()
    };
    let (oh, nh) = (by(old, "hosts", "id"), by(new, "hosts", "id"));
    for (id, h) in &nh {
        match oh.get(id) {
            None => out.push(("host".into(), format!("host {id} joined the cluster"))),
            Some(o) if o["health"] != h["health"] => out.push((
                "host".into(),
                format!(
                    "host {id}: {} → {}",
                    o["health"].as_str().unwrap_or("?"),
                    h["health"].as_str().unwrap_or("?")
                ),
            )),
            _ => {}
        }
    }
    for id in oh.keys().filter(|k| !nh.contains_key(*k)) {
        out.push(("host".into(), format!("host {id} left the cluster")));
    }
    let (ov, nv) = (by(old, "volumes", "number"), by(new, "volumes", "number"));
    for (n, v) in &nv {
        let Some(o) = ov.get(n) else {
            out.push(("volume".into(), format!("Volume{n} added")));
            continue;
        };
        if o["coordinator"] != v["coordinator"] && v["coordinator"] != 0 {
            out.push((
                "volume".into(),
                format!("Volume{n}: coordinator now host {}", v["coordinator"]),
            ));
        }
        let oh = by(o, "hosts", "host");
        for (h, s) in by(v, "hosts", "host") {
            if let Some(os) = oh.get(&h) {
                if os["state"] != s["state"] {
                    out.push((
                        "io".into(),
                        format!(
                            "Volume{n} on host {h}: {} → {} ({})",
                            os["state"].as_str().unwrap_or("?"),
                            s["state"].as_str().unwrap_or("?"),
                            s["reason"].as_str().unwrap_or("")
                        ),
                    ));
                }
            }
        }
    }
    for n in ov.keys().filter(|k| !nv.contains_key(*k)) {
        out.push(("volume".into(), format!("Volume{n} removed")));
    }
    let (om, nm) = (by(old, "vms", "name"), by(new, "vms", "name"));
    for (name, v) in &nm {
        let label = name.trim_matches('"');
        match om.get(name) {
            None => out.push(("vm".into(), format!("{label}: added"))),
            Some(o) => {
                if o["host"] != v["host"] && v["host"] != 0 && o["host"] != 0 {
                    out.push((
                        "vm".into(),
                        format!(
                            "{label}: moved from host {} to host {}",
                            o["host"], v["host"]
                        ),
                    ));
                }
                if o["state"] != v["state"] {
                    out.push((
                        "vm".into(),
                        format!(
                            "{label}: {} → {}",
                            o["state"].as_str().unwrap_or("?"),
                            v["state"].as_str().unwrap_or("?")
                        ),
                    ));
                }
            }
        }
    }
    for n in om.keys().filter(|k| !nm.contains_key(*k)) {
        out.push(("vm".into(), format!("{}: removed", n.trim_matches('"'))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_become_events() {
        let old = json!({"hosts": [{"id": 1, "health": "up"}, {"id": 2, "health": "up"}],
            "volumes": [{"number": 1, "coordinator": 1, "hosts": [{"host": 2, "state": "Direct", "reason": ""}]}],
            "vms": [{"name": "a", "host": 1, "state": "running"}]});
        let new = json!({"hosts": [{"id": 1, "health": "up"}, {"id": 2, "health": "down"}],
            "volumes": [{"number": 1, "coordinator": 2, "hosts": [{"host": 2, "state": "BlockRedirected", "reason": "own path failed"}]}],
            "vms": [{"name": "a", "host": 2, "state": "running"}]});
        let ev: Vec<String> = diff(&old, &new).into_iter().map(|e| e.1).collect();
        assert!(ev.contains(&"host 2: up → down".to_string()), "{ev:?}");
        assert!(
            ev.iter().any(|e| e.contains("coordinator now host 2")),
            "{ev:?}"
        );
        assert!(
            ev.iter()
                .any(|e| e.contains("Direct → BlockRedirected (own path failed)")),
            "{ev:?}"
        );
        assert!(
            ev.iter().any(|e| e.contains("moved from host 1 to host 2")),
            "{ev:?}"
        );
        assert!(diff(&new, &new).is_empty());
    }
}
