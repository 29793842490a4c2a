//! `csvctl validate`: is this cluster sound enough to trust with VMs?
//! (Test-Cluster.) Every host is asked for its facts: its own paths to
//! every volume's LUN (read latency, persistent-reservation support), its
//! devices, clock and version; with the registry and the hosts' loads
//! this gives one PASS, WARN or FAIL per check and scope, each WARN and
//! FAIL with what to do about it.

use crate::cluster_cmd::Access;
use anyhow::Result;
use coordinator::client;
use coordinator::proto;
use coordinator::proto::Label as _;
use coordinator::wire::Identity;
use hypervisor_shim::supervisor::role::{VmConfig, Wanted};
use serde::Serialize;
use std::process::ExitCode;
use std::time::Duration;

/// One result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Check {
    /// What was checked: `san-path`, `san-latency`, `fencing`, `networks`,
    /// `clock`, `kvm`, `qemu`, `fuse`, `failover-memory`, `quorum`, `version`,
    /// `reachable`.
    pub check: &'static str,
    /// Where: `host 2`, `Volume1 on host 2`, `cluster`, `group Volume1`.
    pub scope: String,
    /// `PASS`, `WARN` or `FAIL`.
    pub result: &'static str,
    /// What was found.
    pub detail: String,
    /// What to do (empty on PASS).
    pub fix: String,
}

fn check(
    check: &'static str,
    scope: String,
    result: &'static str,
    detail: String,
    fix: &str,
) -> Check {
    Check {
        check,
        scope,
        result,
        detail,
        fix: fix.to_string(),
    }
}

/// Validation thresholds.
#[derive(Debug, Clone, clap::Args)]
pub struct Thresholds {
    /// Warn when a host's median 4 KiB read from a LUN takes longer (ms).
    #[arg(long, default_value_t = 20)]
    pub latency_warn_ms: u64,
    /// Warn at this clock difference to csvctl's (ms); fail at 4 times it.
    #[arg(long, default_value_t = 500)]
    pub skew_warn_ms: u64,
}

use coordinator::group::now_ms;

/// The network an address is on (its /24 for IPv4, /64 for IPv6).
fn network_of(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>().map(|a| a.ip()) {
        Ok(std::net::IpAddr::V4(ip)) if ip.is_loopback() => "loopback".into(),
        Ok(std::net::IpAddr::V4(ip)) => {
            let o = ip.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            let s = ip.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string(),
    }
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
}

/// What one host told.
struct Host {
    id: u64,
    addrs: Vec<String>,
    facts: Option<proto::HostFacts>,
    status: Option<proto::NodeStatus>,
    /// csvctl's clock minus the host's, at the middle of the round trip.
    skew_ms: i64,
    error: String,
}

/// Runs every check; the results in order.
pub fn validate(access: &Access, candidates: &[String], t: &Thresholds) -> Result<Vec<Check>> {
    let me = access.identity()?;
    let info = access
        .client()?
        .cluster_info()
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
    let hosts = ask_hosts(&me, &info, candidates);
    let mut out = Vec::new();
    check_reachable(&hosts, &mut out);
    let up: Vec<&Host> = hosts.iter().filter(|h| h.facts.is_some()).collect();
    check_networks(&hosts, &mut out);
    check_devices(&up, t, &mut out);
    check_san_paths(&up, t, &mut out);
    check_failover_memory(&info, &up, &mut out);
    check_quorum(&up, &mut out);
    Ok(out)
}

/// Every host's facts and status, through the first of its addresses
/// that answers.
fn ask_hosts(me: &Identity, info: &proto::ClusterInfo, candidates: &[String]) -> Vec<Host> {
    let mut hosts = Vec::new();
    for n in &info.nodes {
        let mut h = Host {
            id: n.id,
            addrs: n.addrs.clone(),
            facts: None,
            status: None,
            skew_ms: 0,
            error: String::new(),
        };
        for a in n.addrs.iter().filter_map(|a| a.parse().ok()) {
            match client::probe(me, a, candidates.to_vec(), Duration::from_secs(20)) {
                Ok(f) => {
                    // The host reads its clock last, after its LUN probes:
                    // the answer's one-way trip is all that separates it
                    // from this clock's reading now.
                    h.skew_ms = f.now_ms as i64 - now_ms() as i64;
                    h.facts = Some(f);
                    h.status = client::node_status(me, a, Duration::from_secs(2)).ok();
                    break;
                }
                Err(e) => h.error = format!("{a}: {}", client::describe(&e)),
            }
        }
        hosts.push(h);
    }
    hosts
}

/// Hosts answer.
fn check_reachable(hosts: &[Host], out: &mut Vec<Check>) {
    for h in hosts {
        let scope = format!("host {}", h.id);
        if h.facts.is_none() {
            out.push(check(
                "reachable",
                scope,
                "FAIL",
                format!("does not answer: {}", h.error),
                "start csvd on it (systemctl start csvd) or check the cluster networks to it; a host the cluster has down has its VMs restarted elsewhere",
            ));
        }
    }
}

/// Two cluster networks per host, on networks of their own.
fn check_networks(hosts: &[Host], out: &mut Vec<Check>) {
    for h in hosts {
        let nets: std::collections::BTreeSet<String> =
            h.addrs.iter().map(|a| network_of(a)).collect();
        let scope = format!("host {}", h.id);
        if h.addrs.len() < 2 {
            out.push(check(
                "networks",
                scope,
                "FAIL",
                format!("one cluster network ({}): a single NIC, cable or switch failure cuts it off and its VMs are restarted elsewhere", h.addrs.join(", ")),
                "give csvd a second address on another network (`listen` in csvd.toml, or --listen twice) and register it: the hosts fail over between networks within seconds",
            ));
        } else if nets.len() < 2 {
            out.push(check(
                "networks",
                scope,
                "WARN",
                format!(
                    "{} addresses, all on {}",
                    h.addrs.len(),
                    nets.into_iter().collect::<Vec<_>>().join(", ")
                ),
                "put the second cluster address on a network of its own (another NIC and switch)",
            ));
        } else {
            out.push(check(
                "networks",
                scope,
                "PASS",
                format!("{} networks: {}", nets.len(), h.addrs.join(", ")),
                "",
            ));
        }
    }
}

/// Devices, clocks, versions.
fn check_devices(up: &[&Host], t: &Thresholds, out: &mut Vec<Check>) {
    let versions: std::collections::BTreeSet<String> = up
        .iter()
        .filter_map(|h| h.facts.as_ref().map(|f| f.version.clone()))
        .collect();
    for h in up {
        let Some(f) = &h.facts else { continue };
        let scope = format!("host {}", h.id);
        out.push(if f.kvm {
            check("kvm", scope.clone(), "PASS", "/dev/kvm opens".into(), "")
        } else {
            check("kvm", scope.clone(), "FAIL", "/dev/kvm does not open: VM roles cannot run here".into(),
                "enable virtualization in the firmware and load kvm_intel or kvm_amd; or drain the host (csvctl node drain) so no VM is placed on it")
        });
        out.push(match f.qemu_accel.as_str() {
            "" => check("qemu", scope.clone(), "WARN", "qemu-system-x86_64 is not installed: real guests (the qemu engine) cannot run here".into(),
                "tools/setup.sh --qemu-system (or apt install qemu-system-x86 ovmf)"),
            "kvm" => check("qemu", scope.clone(), "PASS", format!("QEMU runs guests with KVM ({})", f.qemu_accel_reason), ""),
            _ => check("qemu", scope.clone(), "WARN", format!("QEMU runs guests under TCG: {}", f.qemu_accel_reason),
                "enable hardware virtualization (vmx/svm) in the firmware or the hypervisor below this host; guests run many times slower without it"),
        });
        out.push(if f.fuse {
            check("fuse", scope.clone(), "PASS", "/dev/fuse opens".into(), "")
        } else {
            check(
                "fuse",
                scope.clone(),
                "FAIL",
                "/dev/fuse does not open: the volumes cannot be mounted here".into(),
                "install fuse3 and load the fuse module (modprobe fuse)",
            )
        });
        let skew = h.skew_ms.unsigned_abs();
        let detail = format!("{:+} ms from csvctl's clock", h.skew_ms);
        out.push(if skew > 4 * t.skew_warn_ms {
            check("clock", scope.clone(), "FAIL", detail, "run NTP (chrony) on every host: leases and the logs' order rely on clocks within a second")
        } else if skew > t.skew_warn_ms {
            check("clock", scope.clone(), "WARN", detail, "run NTP (chrony) on every host")
        } else {
            check("clock", scope.clone(), "PASS", detail, "")
        });
        out.push(if versions.len() > 1 {
            check("version", scope, "FAIL", format!("csvd {} (the cluster runs {})", f.version, versions.iter().cloned().collect::<Vec<_>>().join(", ")),
                "upgrade every host to the same csv release, one host at a time (drain, upgrade, resume)")
        } else {
            check("version", scope, "PASS", format!("csvd {}", f.version), "")
        });
    }
}

/// SAN paths: every volume from every host, and the candidate LUNs.
fn check_san_paths(up: &[&Host], t: &Thresholds, out: &mut Vec<Check>) {
    for h in up {
        let Some(f) = &h.facts else { continue };
        for p in &f.paths {
            let what = if p.volume == 0 {
                format!("LUN {}", p.lun)
            } else {
                format!("Volume{}", p.volume)
            };
            let scope = format!("{what} on host {}", h.id);
            if !p.error.is_empty() && p.reached {
                out.push(check(
                    "san-path",
                    scope.clone(),
                    "FAIL",
                    p.error.clone(),
                    "present the LUN as a disk (SCSI block device) of at least the volume's size",
                ));
            } else if !p.error.is_empty() {
                let state = match p.mode() {
                    coordinator::proto::IoMode::Unspecified => String::new(),
                    m => format!(" (the volume is {} on this host)", m.label()),
                };
                out.push(check("san-path", scope.clone(), "FAIL",
                    format!("{}{state}", p.error),
                    "restore the host's SAN path: its link to the SAN, the target's ACL for its initiator name, CHAP; meanwhile its I/O to the volume goes through a peer over the cluster network"));
            } else {
                out.push(check(
                    "san-path",
                    scope.clone(),
                    "PASS",
                    format!("reads the LUN itself ({})", p.lun),
                    "",
                ));
                let ms = p.read_us as f64 / 1000.0;
                out.push(if p.read_us > t.latency_warn_ms * 1000 {
                    check("san-latency", scope.clone(), "WARN", format!("median 4 KiB read {ms:.2} ms"), "check the SAN path's load and errors (multipath, link speed); slow reads slow every VM on the volume")
                } else {
                    check("san-latency", scope.clone(), "PASS", format!("median 4 KiB read {ms:.2} ms"), "")
                });
            }
            out.push(match p.pr() {
                _ if !p.reached => check("fencing", scope, "WARN", "cannot tell: this host does not reach the LUN".into(),
                    "restore the host's SAN path, then validate again"),
                coordinator::proto::PrSupport::Answered => check("fencing", scope, "PASS", "persistent reservations work: a host cut off from the cluster is fenced off the LUN".into(), ""),
                coordinator::proto::PrSupport::NotIscsi => check("fencing", scope, "WARN", "a LUN file or local device: no persistent reservations; a host cut off from the cluster stops writing only when its leases expire".into(),
                    "use an iSCSI LUN (iscsi://...) for production volumes"),
                _ => check("fencing", scope, "FAIL", format!("the target does not support SCSI-3 persistent reservations ({}): a host cut off from the cluster cannot be fenced off the LUN", p.pr_error),
                    "enable SPC-3 persistent reservations on the array (Write Exclusive - Registrants Only), or move the volume to a target that has them"),
            });
        }
    }
}

/// Failover memory (N+1): the VMs of each host must fit on the others.
fn check_failover_memory(info: &proto::ClusterInfo, up: &[&Host], out: &mut Vec<Check>) {
    let mut budget: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut placed: std::collections::BTreeMap<u64, Vec<(String, u64)>> = Default::default();
    for r in &info.vms {
        let Ok(c) = VmConfig::from_role(r) else {
            continue;
        };
        if c.state == Wanted::Running && r.node != 0 {
            placed
                .entry(r.node)
                .or_default()
                .push((r.name.clone(), c.memory));
        }
    }
    for h in up {
        let Some(load) = h.status.as_ref().and_then(|s| s.load) else {
            continue;
        };
        if info.draining.contains(&h.id) {
            continue;
        }
        let offered = if load.vm_memory > 0 {
            load.vm_memory
        } else {
            load.mem_total
        };
        let used: u64 = placed.get(&h.id).map_or(0, |v| v.iter().map(|x| x.1).sum());
        budget.insert(h.id, offered.saturating_sub(used));
    }
    for (host, vms) in &placed {
        let mut free: Vec<(u64, u64)> = budget
            .iter()
            .filter(|(id, _)| *id != host)
            .map(|(id, b)| (*id, *b))
            .collect();
        let mut vms = vms.clone();
        vms.sort_by_key(|v| std::cmp::Reverse(v.1));
        let total: u64 = vms.iter().map(|v| v.1).sum();
        let mut homeless = Vec::new();
        for (name, mem) in &vms {
            free.sort_by_key(|f| std::cmp::Reverse(f.1));
            match free.first_mut() {
                Some(f) if f.1 >= *mem => f.1 -= mem,
                _ => homeless.push(name.clone()),
            }
        }
        let spare: u64 = budget
            .iter()
            .filter(|(id, _)| *id != host)
            .map(|(_, b)| *b)
            .sum();
        let scope = format!("host {host}");
        out.push(if homeless.is_empty() {
            check("failover-memory", scope, "PASS", format!("its VMs ({}) fit on the other hosts ({} free)", gib(total), gib(spare)), "")
        } else {
            check("failover-memory", scope, "FAIL",
                format!("if it fails, {} of its VMs ({} in all) find no host with the memory: the others have {} free", homeless.join(", "), gib(total), gib(spare)),
                "add memory or a host, raise the others' --vm-memory, or lower these VMs' memory; otherwise they stay down after a host failure")
        });
    }
}

/// Quorum of every group, from its leader's view.
fn check_quorum(up: &[&Host], out: &mut Vec<Check>) {
    let mut groups: std::collections::BTreeMap<u64, (u64, Vec<u64>)> = Default::default();
    for h in up {
        for g in h.status.iter().flat_map(|s| &s.groups) {
            let e = groups.entry(g.group).or_default();
            if g.role() == coordinator::proto::RaftRole::Leader {
                *e = (h.id, g.voters.clone());
            } else if e.1.is_empty() {
                e.1 = g.voters.clone();
            }
        }
    }
    let alive: std::collections::BTreeSet<u64> = up.iter().map(|h| h.id).collect();
    for (g, (leader, voters)) in &groups {
        let scope = format!("group {}", coordinator::metrics::group_name(*g));
        let live = voters.iter().filter(|v| alive.contains(v)).count();
        let need = voters.len() / 2 + 1;
        out.push(if *leader == 0 || live < need {
            check("quorum", scope, "FAIL", format!("{live} of {} voters answer, {need} needed; leader: {}", voters.len(), if *leader == 0 { "none".to_string() } else { leader.to_string() }),
                "bring the missing hosts back: without a quorum the volume's metadata cannot change")
        } else if live < voters.len() {
            check("quorum", scope, "WARN", format!("{live} of {} voters answer (leader host {leader}): one more failure may stop it", voters.len()),
                "bring the missing hosts back, or remove the dead ones (csvctl node remove)")
        } else {
            check("quorum", scope, "PASS", format!("{} voters, all answer; leader host {leader}", voters.len()), "")
        });
    }
}

/// `csvctl validate`.
pub fn run(access: &Access, candidates: &[String], t: &Thresholds, json: bool) -> Result<ExitCode> {
    let checks = validate(access, candidates, t)?;
    let fails = checks.iter().filter(|c| c.result == "FAIL").count();
    let warns = checks.iter().filter(|c| c.result == "WARN").count();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "checks": checks, "fail": fails, "warn": warns,
            }))?
        );
    } else {
        println!("{:<16} {:<26} {:<5} DETAIL", "CHECK", "SCOPE", "RESULT");
        for c in &checks {
            println!(
                "{:<16} {:<26} {:<5} {}",
                c.check, c.scope, c.result, c.detail
            );
            if !c.fix.is_empty() {
                println!("{:<16} {:<26} {:<5} fix: {}", "", "", "", c.fix);
            }
        }
        println!(
            "{} checks: {} passed, {warns} warnings, {fails} failed",
            checks.len(),
            checks.len() - fails - warns
        );
    }
    Ok(if fails > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_map_to_their_networks() {
        assert_eq!(super::network_of("10.1.2.3:7100"), "10.1.2.0/24");
        assert_eq!(super::network_of("127.0.0.1:7100"), "loopback");
        assert_eq!(super::network_of("[fd00:1:2:3::9]:7100"), "fd00:1:2:3::/64");
        assert_eq!(super::network_of("host-a:7100"), "host-a");
    }
}
