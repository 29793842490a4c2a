//! The metrics csvd's `/metrics` serves: this host's groups (the
//! coordinator's families), its volumes' I/O and its VMs, and the
//! cluster's VM roles and hosts. One registry per scrape, built from the
//! statuses at hand, in the OpenMetrics text format of
//! `prometheus-client`.

use coordinator::metrics::{add_groups, labels, Metrics};
use coordinator::proto::{self, IoMode, Label as _};
use hypervisor_shim::supervisor::role::VmConfig;

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// This host's volumes and VMs.
fn add_host(m: &mut Metrics, s: &proto::NodeStatus) {
    let h = s.node.to_string();
    for v in &s.volumes {
        let vol = format!("Volume{}", v.number);
        for (path, dir, b) in [
            ("direct", "read", v.direct_read),
            ("direct", "write", v.direct_written),
            ("redirected", "read", v.redirected_read),
            ("redirected", "write", v.redirected_written),
        ] {
            let l = labels([
                ("host", h.clone()),
                ("volume", vol.clone()),
                ("path", path.into()),
                ("op", dir.into()),
            ]);
            m.counter("csv_volume_io_bytes", "Bytes this host moved to and from a volume's LUN, by path (direct: its own SAN path; redirected: through a peer)", l, b);
        }
        let l = labels([("host", h.clone()), ("volume", vol.clone())]);
        m.counter(
            "csv_volume_async_io_bytes",
            "Of the bytes over a volume's own path, those read or written asynchronously (Linux AIO on a LUN file or block device)",
            l.clone(),
            v.async_bytes,
        );
        m.counter(
            "csv_volume_redirect_events",
            "Times this host's own path to a volume failed and its I/O switched to a peer",
            l,
            v.redirect_events,
        );
        for mode in [
            IoMode::Direct,
            IoMode::BlockRedirected,
            IoMode::FileSystemRedirected,
            IoMode::Fenced,
            IoMode::Unmounted,
        ] {
            let l = labels([
                ("host", h.clone()),
                ("volume", vol.clone()),
                ("mode", mode.label().into()),
            ]);
            m.gauge(
                "csv_volume_mode",
                "1 for the I/O mode this host is in for a volume",
                l,
                i64::from(v.state() == mode),
            );
        }
    }
    for v in &s.vms {
        let l = labels([
            ("host", h.clone()),
            ("vm", v.name.clone()),
            ("state", v.state().label().into()),
        ]);
        m.gauge("csv_vm_running_state", "VMs this host runs, by state", l, 1);
        let l = labels([("host", h.clone()), ("vm", v.name.clone())]);
        m.gauge(
            "csv_vm_resident_peak_bytes",
            "Peak resident memory of each VM's VMM process on this host",
            l,
            gauge(v.resident_peak),
        );
        if v.migrating_to != 0 {
            let l = labels([
                ("host", h.clone()),
                ("vm", v.name.clone()),
                ("to", v.migrating_to.to_string()),
            ]);
            m.gauge(
                "csv_vm_migration_progress_percent",
                "Live migrations this host is sending: pages sent against guest memory",
                l,
                i64::from(v.migration_pct),
            );
        }
    }
}

/// The cluster's VM roles and hosts (the same on every host).
fn add_cluster(m: &mut Metrics, info: &proto::ClusterInfo, statuses: &[proto::NodeStatus]) {
    m.declare_gauge(
        "csv_vm_role",
        "VM roles of the cluster: owner host (0: none) and wanted state",
    );
    for r in &info.vms {
        let Ok(c) = VmConfig::from_role(r) else {
            continue;
        };
        let l = labels([
            ("vm", r.name.clone()),
            ("host", r.node.to_string()),
            ("state", c.state.to_string()),
        ]);
        m.gauge(
            "csv_vm_role",
            "VM roles of the cluster: owner host (0: none) and wanted state",
            l,
            1,
        );
        let last = c
            .last_migration
            .as_deref()
            .and_then(|s| serde_json::from_str::<hypervisor_shim::migrate::Summary>(s).ok());
        if let Some(s) = last {
            let l = labels([("vm", r.name.clone())]);
            m.gauge(
                "csv_vm_last_migration_downtime_ms",
                "Pause of each VM's last live migration",
                l.clone(),
                s.downtime_ms.round() as i64,
            );
            m.gauge(
                "csv_vm_last_migration_total_ms",
                "Duration of each VM's last live migration",
                l,
                s.total_ms.round() as i64,
            );
        }
    }
    for n in &info.nodes {
        let up = info.health.iter().all(|h| h.node != n.id || h.up)
            && statuses.iter().any(|s| s.node == n.id);
        m.gauge(
            "csv_host_up",
            "1 if the host is up and answers",
            labels([("host", n.id.to_string())]),
            i64::from(up),
        );
    }
}

/// Everything `/metrics` shows: this host's own status (`own`, fresh),
/// and the cluster's as the console last gathered it.
pub fn render(
    own: Option<&proto::NodeStatus>,
    info: &proto::ClusterInfo,
    statuses: &[proto::NodeStatus],
) -> String {
    let mut m = Metrics::new();
    if let Some(s) = own {
        add_groups(&mut m, std::slice::from_ref(s));
        add_host(&mut m, s);
    }
    add_cluster(&mut m, info, statuses);
    m.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_has_every_family_the_dashboards_use() {
        let own = proto::NodeStatus {
            node: 2,
            volumes: vec![proto::VolumeState {
                number: 1,
                state: IoMode::BlockRedirected as i32,
                redirected_written: 4096,
                ..Default::default()
            }],
            vms: vec![proto::VmRuntime {
                name: "web1".into(),
                state: proto::VmState::Running as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let info = proto::ClusterInfo {
            nodes: vec![proto::NodeInfo {
                id: 2,
                addrs: vec![],
            }],
            ..Default::default()
        };
        let t = render(Some(&own), &info, std::slice::from_ref(&own));
        for want in [
            "csv_volume_io_bytes_total{host=\"2\",volume=\"Volume1\",path=\"redirected\",op=\"write\"} 4096",
            "csv_volume_mode{host=\"2\",volume=\"Volume1\",mode=\"BlockRedirected\"} 1",
            "csv_volume_mode{host=\"2\",volume=\"Volume1\",mode=\"Direct\"} 0",
            "csv_vm_running_state{host=\"2\",vm=\"web1\",state=\"running\"} 1",
            "csv_host_up{host=\"2\"} 1",
            "# TYPE csv_vm_role gauge",
        ] {
            assert!(t.contains(want), "{want} missing from\n{t}");
        }
    }
}
