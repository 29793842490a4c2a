//! Hosts' and groups' state as Prometheus metrics, in the OpenMetrics
//! text format of the `prometheus-client` crate (served at csvd's
//! `/metrics`, printed by `csvctl cluster status --prometheus`).
//!
//! Every figure comes from a status snapshot ([`proto::NodeStatus`]), so
//! each scrape builds a fresh [`Metrics`] from the statuses at hand; the
//! node daemon adds its own families (volumes' I/O, VMs) to the same
//! builder.

use crate::proto::{self, IoMode, RaftRole};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;

/// A metric's labels, in order.
pub type Labels = Vec<(String, String)>;

/// Labels from pairs of words.
pub fn labels<const N: usize>(pairs: [(&str, String); N]) -> Labels {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A declared gauge family: the registry skips an empty family, this
/// writes its help and type all the same.
#[derive(Debug)]
struct Declared {
    name: &'static str,
    help: String,
    family: Family<Labels, Gauge>,
}

impl Collector for Declared {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metric = encoder.encode_descriptor(self.name, &self.help, None, MetricType::Gauge)?;
        self.family.encode(metric)
    }
}

/// Metric families being filled for one scrape.
#[derive(Default)]
pub struct Metrics {
    registry: Registry,
    gauges: BTreeMap<&'static str, Family<Labels, Gauge>>,
    counters: BTreeMap<&'static str, Family<Labels, Counter>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("gauges", &self.gauges.keys())
            .field("counters", &self.counters.keys())
            .finish()
    }
}

impl Metrics {
    /// No family yet.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Sets a gauge of family `name` (registered with `help` the first
    /// time).
    pub fn gauge(&mut self, name: &'static str, help: &str, labels: Labels, value: i64) {
        let fam = self.gauges.entry(name).or_insert_with(|| {
            let f = Family::default();
            self.registry.register(name, help, f.clone());
            f
        });
        fam.get_or_create(&labels).set(value);
    }

    /// Sets a counter of family `name` (its samples are named
    /// `<name>_total`).
    pub fn counter(&mut self, name: &'static str, help: &str, labels: Labels, value: u64) {
        let fam = self.counters.entry(name).or_insert_with(|| {
            let f = Family::default();
            self.registry.register(name, help, f.clone());
            f
        });
        fam.get_or_create(&labels).inc_by(value);
    }

    /// Registers a gauge family that a scrape lists (its help and type)
    /// even when no host has a sample of it; [`Metrics::gauge`] fills it.
    pub fn declare_gauge(&mut self, name: &'static str, help: &str) {
        if self.gauges.contains_key(name) {
            return;
        }
        let family = Family::default();
        self.gauges.insert(name, family.clone());
        self.registry.register_collector(Box::new(Declared {
            name,
            help: help.to_string(),
            family,
        }));
    }

    /// The text a scraper reads.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# metrics could not be encoded\n");
        }
        out
    }
}

/// A group's name for people: `cluster` or `VolumeN`.
pub fn group_name(g: u64) -> String {
    if g == 0 {
        "cluster".into()
    } else {
        format!("Volume{g}")
    }
}

fn gauge_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Adds every host's groups and how it reaches its volumes.
pub fn add_groups(m: &mut Metrics, all: &[proto::NodeStatus]) {
    type Metric = (&'static str, &'static str, fn(&proto::GroupStatus) -> u64);
    let per_group: [Metric; 5] = [
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
            |g| u64::from(g.role() == RaftRole::Leader),
        ),
    ];
    for (name, help, f) in per_group {
        for s in all {
            for g in &s.groups {
                let l = labels([("host", s.node.to_string()), ("group", group_name(g.group))]);
                m.gauge(name, help, l, gauge_of(f(g)));
            }
        }
    }
    for s in all {
        for g in s.groups.iter().filter(|g| g.group != 0) {
            for (kind, n) in [("write", g.write_leases), ("read", g.read_leases)] {
                let l = labels([
                    ("host", s.node.to_string()),
                    ("group", group_name(g.group)),
                    ("kind", kind.to_string()),
                ]);
                m.gauge(
                    "csv_volume_leases",
                    "Leases on a volume's files, as the host's replica applied them",
                    l,
                    gauge_of(n),
                );
            }
        }
        for g in &s.groups {
            for fl in &g.followers {
                let l = labels([
                    ("leader", s.node.to_string()),
                    ("group", group_name(g.group)),
                    ("follower", fl.node.to_string()),
                ]);
                m.gauge(
                    "csv_raft_follower_lag",
                    "Entries a follower is behind its leader",
                    l,
                    gauge_of(fl.lag),
                );
            }
        }
        for v in &s.volumes {
            let l = labels([
                ("host", s.node.to_string()),
                ("volume", format!("Volume{}", v.number)),
            ]);
            m.gauge(
                "csv_volume_direct",
                "1 if this host reaches the volume's LUN directly",
                l,
                i64::from(v.state() == IoMode::Direct),
            );
        }
    }
}

/// The status of every host as metrics text.
pub fn prometheus_text(all: &[proto::NodeStatus]) -> String {
    let mut m = Metrics::new();
    add_groups(&mut m, all);
    m.encode()
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
                role: RaftRole::Leader as i32,
                term: 7,
                leader: 2,
                commit: 40,
                applied: 40,
                followers: vec![proto::FollowerStatus {
                    node: 3,
                    matched: 38,
                    lag: 2,
                    state: proto::ProgressState::Replicate as i32,
                }],
                ..Default::default()
            }],
            load: None,
            vms: vec![],
            volumes: vec![proto::VolumeState {
                number: 1,
                state: IoMode::Direct as i32,
                ..Default::default()
            }],
        };
        let t = prometheus_text(&[s]);
        assert!(t.contains("# TYPE csv_raft_term gauge"), "{t}");
        assert!(
            t.contains("csv_raft_term{host=\"2\",group=\"Volume1\"} 7"),
            "{t}"
        );
        assert!(t.contains("csv_raft_is_leader{host=\"2\",group=\"Volume1\"} 1"));
        assert!(
            t.contains("csv_raft_follower_lag{leader=\"2\",group=\"Volume1\",follower=\"3\"} 2")
        );
        assert!(t.contains("csv_volume_direct{host=\"2\",volume=\"Volume1\"} 1"));
        assert!(t.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn a_declared_family_is_listed_empty_and_filled_once() {
        let mut m = Metrics::new();
        m.declare_gauge("csv_test_roles", "Roles");
        let t = m.encode();
        assert!(
            t.contains("# HELP csv_test_roles Roles\n# TYPE csv_test_roles gauge\n"),
            "{t}"
        );
        m.declare_gauge("csv_test_roles", "Roles");
        m.gauge("csv_test_roles", "Roles", labels([("vm", "a".into())]), 1);
        let t = m.encode();
        assert_eq!(t.matches("# TYPE csv_test_roles gauge").count(), 1, "{t}");
        assert!(t.contains("csv_test_roles{vm=\"a\"} 1"), "{t}");
    }

    #[test]
    fn counters_are_named_with_total() {
        let mut m = Metrics::new();
        let l = labels([("host", "1".to_string())]);
        m.counter("csv_test_bytes", "Bytes", l, 42);
        let t = m.encode();
        assert!(t.contains("# TYPE csv_test_bytes counter"), "{t}");
        assert!(t.contains("csv_test_bytes_total{host=\"1\"} 42"), "{t}");
    }
}
