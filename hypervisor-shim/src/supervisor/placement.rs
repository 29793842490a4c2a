//! Intelligent placement: how well each host suits a VM.
//!
//! Each host gets a rating from what it would have free once the VM runs
//! there, weighted per resource:
//!
//! ```text
//! rating = freeCPU * wCPU + freeMem * wMem + freeDisk * wDisk + freeNet * wNet
//! ```
//!
//! with every `free*` a fraction in 0..=1 and the weights normalised to sum
//! to 1, so a rating is in 0..=1 (shown as 0 to 5 stars). A host that is
//! down, draining, or would break a threshold rates 0, and the reason says
//! which: the memory reserve (memory that must stay free on a host after
//! placement), the vCPU overcommit limit (vCPUs per core), the share of
//! the VM's volume that must stay free. Preferred hosts that rate above 0 come first,
//! in their order; the others follow by rating, best first, then by host
//! id.
//!
//! - `freeCPU` = 1 − max(measured CPU busy, vCPUs committed after placement
//!   / (cores × overcommit limit));
//! - `freeMem` = (available − VM memory) / total;
//! - `freeDisk` = (free on the VM's volume − VM disk) / volume size;
//! - `freeNet` = 1 − measured network use (1 where it is not measured).

/// What a host has, as it reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLoad {
    pub node: u64,
    pub up: bool,
    pub draining: bool,
    pub cores: u32,
    /// Measured CPU use, 0..=1 of all cores.
    pub cpu_busy: f64,
    /// vCPUs of the VMs already placed there.
    pub vcpus: u32,
    pub mem_total: u64,
    pub mem_available: u64,
    /// Free space and size of the volume that holds the VM's disk (the same
    /// for every host of a cluster volume, but a host may not see it).
    pub disk_free: u64,
    pub disk_total: u64,
    /// Measured network use, 0..=1 (`None`: not measured).
    pub net_busy: Option<f64>,
}

/// What a VM needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNeeds {
    pub vcpus: u32,
    pub memory: u64,
    pub disk: u64,
    /// Hosts tried first, in order.
    pub preferred: Vec<u64>,
}

/// Weights and thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub w_cpu: f64,
    pub w_mem: f64,
    pub w_disk: f64,
    pub w_net: f64,
    /// Memory that must stay available on a host after placement.
    pub mem_reserve: u64,
    /// vCPUs allowed per core.
    pub max_vcpus_per_core: f64,
    /// Share of the VM's volume that must stay free after the VM's disk.
    pub disk_reserve: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            w_cpu: 0.35,
            w_mem: 0.4,
            w_disk: 0.15,
            w_net: 0.1,
            mem_reserve: 512 << 20,
            max_vcpus_per_core: 4.0,
            disk_reserve: 0.05,
        }
    }
}

/// One host's rating for one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    pub node: u64,
    /// 0..=1.
    pub rating: f64,
    /// 0..=5.
    pub stars: u8,
    pub free_cpu: f64,
    pub free_mem: f64,
    pub free_disk: f64,
    pub free_net: f64,
    pub preferred: bool,
    /// Why the rating is 0, or what limits it most.
    pub reason: String,
}

fn frac(x: f64) -> f64 {
    if x.is_finite() {
        x.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn mib(b: u64) -> u64 {
    b >> 20
}

/// Rates every host for `vm`; best first (see the module documentation for
/// the order).
pub fn rate(hosts: &[HostLoad], vm: &VmNeeds, policy: &Policy) -> Vec<Rating> {
    let wsum = policy.w_cpu + policy.w_mem + policy.w_disk + policy.w_net;
    let w = |x: f64| if wsum > 0.0 { x / wsum } else { 0.25 };
    let mut out: Vec<Rating> = hosts
        .iter()
        .map(|h| {
            let capacity = f64::from(h.cores.max(1)) * policy.max_vcpus_per_core;
            let disk_reserve = (h.disk_total as f64 * policy.disk_reserve.clamp(0.0, 1.0)) as u64;
            let committed = f64::from(h.vcpus + vm.vcpus) / capacity;
            let free_cpu = frac(1.0 - h.cpu_busy.max(committed));
            let mem_left = h.mem_available.saturating_sub(vm.memory);
            let free_mem = frac(mem_left as f64 / h.mem_total.max(1) as f64);
            let disk_left = h.disk_free.saturating_sub(vm.disk);
            let free_disk = frac(disk_left as f64 / h.disk_total.max(1) as f64);
            let free_net = frac(1.0 - h.net_busy.unwrap_or(0.0));
            let zero = if !h.up {
                Some("host is down".to_string())
            } else if h.draining {
                Some("host is draining (maintenance)".to_string())
            } else if h.mem_available < vm.memory.saturating_add(policy.mem_reserve) {
                Some(format!(
                    "memory reserve: {} MiB available, the VM needs {} MiB and {} MiB must stay free",
                    mib(h.mem_available),
                    mib(vm.memory),
                    mib(policy.mem_reserve)
                ))
            } else if committed > 1.0 {
                Some(format!(
                    "vCPU limit: {} + {} vCPUs on {} cores is over {} per core",
                    h.vcpus, vm.vcpus, h.cores, policy.max_vcpus_per_core
                ))
            } else if h.disk_free < vm.disk.saturating_add(disk_reserve) {
                Some(format!(
                    "disk reserve: {} MiB free on the volume, the VM needs {} MiB and {} MiB ({:.0} %) must stay free",
                    mib(h.disk_free),
                    mib(vm.disk),
                    mib(disk_reserve),
                    policy.disk_reserve * 100.0
                ))
            } else {
                None
            };
            let rating = match zero {
                Some(_) => 0.0,
                None => frac(
                    free_cpu * w(policy.w_cpu)
                        + free_mem * w(policy.w_mem)
                        + free_disk * w(policy.w_disk)
                        + free_net * w(policy.w_net),
                ),
            };
            let reason = zero.unwrap_or_else(|| {
                let mut parts = vec![
                    ("CPU", free_cpu),
                    ("memory", free_mem),
                    ("disk", free_disk),
                ];
                if h.net_busy.is_some() {
                    parts.push(("network", free_net));
                }
                let (what, least) = parts
                    .into_iter()
                    .fold(("", f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
                let mut r = format!("least free: {what} ({:.0} %)", least * 100.0);
                if h.net_busy.is_none() {
                    r.push_str("; network not measured");
                }
                r
            });
            Rating {
                node: h.node,
                rating,
                stars: (rating * 5.0).round() as u8,
                free_cpu,
                free_mem,
                free_disk,
                free_net,
                preferred: vm.preferred.contains(&h.node),
                reason,
            }
        })
        .collect();
    let pref_rank = |r: &Rating| {
        if r.rating > 0.0 {
            vm.preferred.iter().position(|&p| p == r.node)
        } else {
            None
        }
    };
    out.sort_by(|a, b| match (pref_rank(a), pref_rank(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b.rating.total_cmp(&a.rating).then(a.node.cmp(&b.node)),
    });
    out
}

/// The best host for `vm`, if any rates above 0.
pub fn best(hosts: &[HostLoad], vm: &VmNeeds, policy: &Policy) -> Option<u64> {
    rate(hosts, vm, policy)
        .into_iter()
        .find(|r| r.rating > 0.0)
        .map(|r| r.node)
}

/// Every registered host's load for a VM on `volume`: what each host
/// reports in its status (asked over the network, 2 s per host at most), the
/// vCPUs of the roles running there, whether the registry has it down or
/// draining, and the volume's free space.
pub fn cluster_loads(
    me: &coordinator::wire::Identity,
    client: &mut coordinator::client::Client,
    info: &coordinator::proto::ClusterInfo,
    volume: u64,
) -> Result<Vec<HostLoad>, coordinator::client::ClientError> {
    let usage = client.usage(volume)?;
    let capacity = info
        .volumes
        .iter()
        .find(|v| v.number == volume)
        .map_or(0, |v| v.capacity);
    let mut out = Vec::new();
    for n in &info.nodes {
        let up_in_registry = info
            .health
            .iter()
            .find(|h| h.node == n.id)
            .is_none_or(|h| h.up);
        let status = if up_in_registry {
            coordinator::client::host_status(me, n)
        } else {
            None
        };
        let load = status.as_ref().and_then(|s| s.load).unwrap_or_default();
        let placed: Vec<super::role::VmConfig> = info
            .vms
            .iter()
            .filter(|r| r.node == n.id)
            .filter_map(|r| super::role::VmConfig::from_role(r).ok())
            .filter(|c| c.is_running())
            .collect();
        let vcpus = placed.iter().map(|c| c.vcpus).sum();
        let (mut mem_total, mut mem_available) = (load.mem_total, load.mem_available);
        if load.vm_memory > 0 {
            // A host that gives VMs only part of its memory: rated as if
            // it had that much, less what the roles placed there take.
            let committed: u64 = placed.iter().map(|c| c.memory).sum();
            mem_total = mem_total.min(load.vm_memory);
            mem_available = mem_available.min(load.vm_memory.saturating_sub(committed));
        }
        out.push(HostLoad {
            node: n.id,
            up: up_in_registry && status.is_some(),
            draining: info.draining.contains(&n.id),
            cores: load.cores,
            cpu_busy: f64::from(load.cpu_busy_permille) / 1000.0,
            vcpus,
            mem_total,
            mem_available,
            disk_free: usage.free,
            disk_total: capacity,
            net_busy: None,
        });
    }
    Ok(out)
}

/// This host's resources: cores, the 1-minute load average per core (a
/// stand-in for CPU use that needs no sampling interval), and memory from
/// /proc/meminfo. Zero where /proc cannot be read.
pub fn sample_load() -> coordinator::proto::HostLoadInfo {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|x| x.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    coordinator::proto::HostLoadInfo {
        cores,
        cpu_busy_permille: ((load1 / f64::from(cores.max(1))).clamp(0.0, 1.0) * 1000.0) as u32,
        mem_total: field("MemTotal:"),
        mem_available: field("MemAvailable:"),
        vm_memory: 0,
    }
}

/// Five characters of stars for a table.
pub fn stars(n: u8) -> String {
    let n = usize::from(n.min(5));
    format!("{}{}", "★".repeat(n), "☆".repeat(5 - n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(node: u64, cores: u32, busy: f64, vcpus: u32, total: u64, avail: u64) -> HostLoad {
        HostLoad {
            node,
            up: true,
            draining: false,
            cores,
            cpu_busy: busy,
            vcpus,
            mem_total: total,
            mem_available: avail,
            disk_free: 60 * GIB,
            disk_total: 100 * GIB,
            net_busy: Some(0.2),
        }
    }

    /// A fixed set of host loads against ratings worked out by hand.
    #[test]
    fn ratings_match_the_hand_computed_table() {
        let policy = Policy::default(); // weights 0.35 / 0.4 / 0.15 / 0.1
        let vm = VmNeeds {
            vcpus: 2,
            memory: 4 * GIB,
            disk: 10 * GIB,
            preferred: vec![],
        };
        let hosts = vec![
            // 1: 8 cores, 25 % busy, 6 vCPUs placed: committed (6+2)/32 = 0.25
            //    -> freeCPU 0.75; memory (24-4)/32 = 0.625; disk (60-10)/100
            //    = 0.5; net 0.8. 0.75*.35 + .625*.4 + .5*.15 + .8*.1 = 0.6675
            host(1, 8, 0.25, 6, 32 * GIB, 24 * GIB),
            // 2: 4 cores, 10 % busy, 12 vCPUs: committed 14/16 = 0.875 ->
            //    freeCPU 0.125; memory (60-4)/64 = 0.875.
            //    .125*.35 + .875*.4 + .075 + .08 = 0.54875
            host(2, 4, 0.10, 12, 64 * GIB, 60 * GIB),
            // 3: plenty of CPU but 4.25 GiB available: 4 GiB for the VM
            //    leaves 256 MiB, under the 512 MiB reserve -> 0.
            host(3, 16, 0.0, 0, 64 * GIB, 4 * GIB + GIB / 4),
            // 4: 2 cores with 7 vCPUs: (7+2)/8 > 1 -> 0.
            host(4, 2, 0.0, 7, 64 * GIB, 60 * GIB),
            // 5: down.
            HostLoad {
                up: false,
                ..host(5, 64, 0.0, 0, 256 * GIB, 250 * GIB)
            },
        ];
        let r = rate(&hosts, &vm, &policy);
        let order: Vec<u64> = r.iter().map(|x| x.node).collect();
        assert_eq!(order, vec![1, 2, 3, 4, 5]);
        assert!((r[0].rating - 0.6675).abs() < 1e-9, "{:?}", r[0]);
        assert_eq!(r[0].stars, 3);
        assert!((r[1].rating - 0.54875).abs() < 1e-9, "{:?}", r[1]);
        assert_eq!(r[1].stars, 3);
        assert!(
            r[1].reason.contains("least free: CPU (12 %)"),
            "{}",
            r[1].reason
        );
        assert_eq!((r[2].rating, r[2].stars), (0.0, 0));
        assert!(
            r[2].reason
                .starts_with("memory reserve: 4352 MiB available"),
            "{}",
            r[2].reason
        );
        assert_eq!(r[3].rating, 0.0);
        assert!(
            r[3].reason
                .starts_with("vCPU limit: 7 + 2 vCPUs on 2 cores"),
            "{}",
            r[3].reason
        );
        assert_eq!(r[4].reason, "host is down");
        assert_eq!(best(&hosts, &vm, &policy), Some(1));

        // A preferred host that can take the VM goes first; one that cannot
        // stays where its 0 puts it.
        let vm = VmNeeds {
            preferred: vec![3, 2],
            ..vm
        };
        let r = rate(&hosts, &vm, &policy);
        let order: Vec<u64> = r.iter().map(|x| x.node).collect();
        assert_eq!(order, vec![2, 1, 3, 4, 5]);
        assert!(r[0].preferred && r[2].preferred);
        assert_eq!(best(&hosts, &vm, &policy), Some(2));

        // Nobody can take a VM larger than every host.
        let huge = VmNeeds {
            vcpus: 1,
            memory: 1 << 40,
            disk: 0,
            preferred: vec![],
        };
        assert_eq!(best(&hosts, &huge, &policy), None);
    }

    #[test]
    fn this_host_reports_its_load() {
        let l = sample_load();
        assert!(l.cores >= 1);
        assert!(l.mem_total > 0 && l.mem_available <= l.mem_total, "{l:?}");
        assert!(l.cpu_busy_permille <= 1000);
    }

    #[test]
    fn draining_hosts_and_full_volumes_rate_zero_and_weights_normalise() {
        let vm = VmNeeds {
            vcpus: 1,
            memory: GIB,
            disk: 59 * GIB + GIB / 2,
            preferred: vec![],
        };
        let mut h = host(1, 8, 0.0, 0, 32 * GIB, 30 * GIB);
        let r = rate(std::slice::from_ref(&h), &vm, &Policy::default());
        assert!(r[0].reason.starts_with("disk reserve"), "{}", r[0].reason);
        h.draining = true;
        let small = VmNeeds { disk: 0, ..vm };
        let r = rate(std::slice::from_ref(&h), &small, &Policy::default());
        assert_eq!(r[0].reason, "host is draining (maintenance)");
        // Weights that do not sum to 1 give the same order and a rating in 0..=1.
        h.draining = false;
        let doubled = Policy {
            w_cpu: 0.7,
            w_mem: 0.8,
            w_disk: 0.3,
            w_net: 0.2,
            ..Policy::default()
        };
        let a = rate(std::slice::from_ref(&h), &small, &Policy::default());
        let b = rate(std::slice::from_ref(&h), &small, &doubled);
        assert!((a[0].rating - b[0].rating).abs() < 1e-12);
        assert!(a[0].rating <= 1.0);
        assert_eq!(stars(3), "★★★☆☆");
    }
}
