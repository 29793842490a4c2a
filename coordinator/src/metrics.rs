//! This host's and the cluster's state as Prometheus text-format metrics
//! (served by `csvd --metrics`, printed by `csvctl cluster status
//! --prometheus`).

use crate::proto;

/// A group's name for people: `cluster` or `VolumeN`.
pub fn group_name(g: u64) -> String {
    if g == 0 {
        "cluster".into()
    } else {
        format!("Volume{g}")
    }
}

/// The status of every host in Prometheus text format.
pub fn prometheus_text(all: &[proto::NodeStatus]) -> String {
    let mut out = String::new();
    type Metric = (&'static str, &'static str, fn(&proto::GroupStatus) -> u64);
    let metrics: [Metric; 5] = [
        (
            "csv_raft_term",
            "Raft term of the group on this host",
            |g| g.term,
        ),
        (
            "csv_raft_leader",
            "Node id of the leader this host knows (0: none)",
            |g| g.leader,
        ),
        ("csv_raft_commit_index", "Commit index", |g| g.commit),
        ("csv_raft_applied_index", "Applied index", |g| g.applied),
        (
            "csv_raft_is_leader",
            "1 if this host leads the group",
            |g| u64::from(g.role == "leader"),
        ),
    ];
    for (name, help, f) in metrics {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for s in all {
            for g in &s.groups {
                out.push_str(&format!(
                    "{name}{{host=\"{}\",group=\"{}\"}} {}\n",
                    s.node,
                    group_name(g.group),
                    f(g)
                ));
            }
        }
    }
    out.push_str("# HELP csv_volume_leases Leases on a volume's files, as the host's replica applied them\n# TYPE csv_volume_leases gauge\n");
    for s in all {
        for g in s.groups.iter().filter(|g| g.group != 0) {
            for (kind, n) in [("write", g.write_leases), ("read", g.read_leases)] {
                out.push_str(&format!(
                    "csv_volume_leases{{host=\"{}\",group=\"{}\",kind=\"{kind}\"}} {n}\n",
                    s.node,
                    group_name(g.group)
                ));
            }
        }
    }
    out.push_str("# HELP csv_raft_follower_lag Entries a follower is behind its leader\n# TYPE csv_raft_follower_lag gauge\n");
    for s in all {
        for g in &s.groups {
            for fl in &g.followers {
                out.push_str(&format!(
                    "csv_raft_follower_lag{{leader=\"{}\",group=\"{}\",follower=\"{}\"}} {}\n",
                    s.node,
                    group_name(g.group),
                    fl.node,
                    fl.lag
                ));
            }
        }
    }
    out.push_str("# HELP csv_volume_direct 1 if this host reaches the volume's LUN directly\n# TYPE csv_volume_direct gauge\n");
    for s in all {
        for v in &s.volumes {
            out.push_str(&format!(
                "csv_volume_direct{{host=\"{}\",volume=\"Volume{}\"}} {}\n",
                s.node,
                v.number,
                u64::from(v.state == "Direct")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_help_type_and_labels() {
        let s = proto::NodeStatus {
            node: 2,
            groups: vec![proto::GroupStatus {
                group: 1,
                role: "leader".into(),
                term: 7,
                leader: 2,
                commit: 40,
                applied: 40,
                followers: vec![proto::FollowerStatus {
                    node: 3,
                    matched: 38,
                    lag: 2,
                    state: "replicate".into(),
                }],
                ..Default::default()
            }],
            load: None,
            vms: vec![],
            volumes: vec![proto::VolumeState {
                number: 1,
                state: "Direct".into(),
                ..Default::default()
            }],
        };
        let t = prometheus_text(&[s]);
        assert!(t.contains("# TYPE csv_raft_term gauge"));
        assert!(t.contains("csv_raft_term{host=\"2\",group=\"Volume1\"} 7"));
        assert!(
            t.contains("csv_raft_follower_lag{leader=\"2\",group=\"Volume1\",follower=\"3\"} 2")
        );
        assert!(t.contains("csv_volume_direct{host=\"2\",volume=\"Volume1\"} 1"));
    }
}
