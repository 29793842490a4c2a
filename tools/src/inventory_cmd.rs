//! `csvctl inventory`: every VM and every VHD on every volume, with what
//! each costs and the signs of sprawl (VMs stopped for long, VHDs no VM
//! uses, old snapshots, memory given and not used, expired VMs), and what
//! retiring each would free.
//!
//! The VHDs are found by walking each volume's namespace in its metadata
//! (no host's mount is needed); a differencing disk's parent is read from
//! the VHD itself through `--mount-root` when this host mounts the volumes,
//! so a parent of a used disk is not called unused.

use crate::cluster_cmd::Access;
use anyhow::Result;
use coordinator::client::{self, Client};
use coordinator::proto;
use coordinator::proto::Label as _;
use coordinator::wire::Identity;
use hypervisor_shim::supervisor::role::{VmConfig, Wanted};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Thresholds and prices.
#[derive(Debug, Clone, clap::Args)]
pub struct Policy {
    /// Flag a VM stopped for longer than this.
    #[arg(long, default_value = "30d", value_parser = crate::when::parse_age)]
    pub stopped_for: Duration,
    /// Flag a snapshot older than this.
    #[arg(long, default_value = "14d", value_parser = crate::when::parse_age)]
    pub snapshot_age: Duration,
    /// Warn this long before a VM's expiry date.
    #[arg(long, default_value = "7d", value_parser = crate::when::parse_age)]
    pub warn_before: Duration,
    /// Flag a running VM whose peak resident memory is below this share of
    /// its memory (percent).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub memory_use_pct: u64,
    /// Price of a GiB of volume space per month (for the cost column).
    #[arg(long, default_value_t = 0.10)]
    pub price_gib_month: f64,
    /// Price of a host per month; a VM is charged its share of a host's
    /// memory.
    #[arg(long, default_value_t = 400.0)]
    pub price_host_month: f64,
    /// Where this host mounts the volumes (to read differencing disks'
    /// parents).
    #[arg(long, default_value = "/ClusterStorage")]
    pub mount_root: PathBuf,
}

/// One VHD file on a volume.
#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub volume: u64,
    /// Path under the volume's root.
    pub path: String,
    pub size: u64,
    /// Bytes the volume gives it.
    pub on_disk: u64,
    /// Last write (ms since the epoch).
    pub last_io: u64,
    /// VM roles whose disk it is or whose disk's parent chain holds it.
    pub used_by: Vec<String>,
    /// Snapshots of the volume taken since it exists (they hold its old
    /// blocks).
    pub snapshots_held: Vec<String>,
}

/// One VM role.
#[derive(Debug, Clone, Serialize)]
pub struct Vm {
    pub name: String,
    pub owner: String,
    pub host: u64,
    pub state: String,
    pub memory: u64,
    pub resident_peak: u64,
    pub disk: String,
    pub disk_on_disk: u64,
    /// Now if it runs; else when it stopped (ms; 0: unknown).
    pub last_running: u64,
    pub last_io: u64,
    pub expires: Option<u64>,
    pub snapshots_held: Vec<String>,
    pub cost_month: f64,
}

/// A sign of sprawl, and what acting on it would free.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Flag {
    /// `stopped`, `unattached-vhd`, `old-snapshot`, `over-provisioned`,
    /// `expired`, `expires-soon`.
    pub kind: &'static str,
    /// The VM, disk or snapshot.
    pub subject: String,
    pub detail: String,
    /// Volume space it would free (bytes).
    pub frees_storage: u64,
    /// Memory it would free (bytes).
    pub frees_memory: u64,
}

/// The inventory.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub at: u64,
    pub vms: Vec<Vm>,
    pub disks: Vec<Disk>,
    pub flags: Vec<Flag>,
    pub frees_storage: u64,
    pub frees_memory: u64,
    pub cost_month: f64,
    /// The templates in the volumes' libraries and what each saves.
    pub templates: Vec<crate::template_cmd::Template>,
    /// Volume space the templates' children would take more as full
    /// copies.
    pub templates_save: u64,
}

fn is_vhd(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    l.ends_with(".vhd") || l.ends_with(".avhd")
}

/// Every file under `ino` (a directory), as (path, ino); `.snapshots` is
/// hidden by the metadata already.
fn walk(
    c: &mut Client,
    vol: u64,
    ino: u64,
    prefix: &str,
    out: &mut Vec<(String, u64)>,
    depth: u32,
) -> Result<()> {
    if depth > 32 {
        return Ok(());
    }
    let entries = c
        .readdir(vol, ino)
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
    for e in entries {
        if e.name == "." || e.name == ".." {
            continue;
        }
        let p = if prefix.is_empty() {
            e.name.clone()
        } else {
            format!("{prefix}/{}", e.name)
        };
        if e.kind() == coordinator::proto::NodeKind::Directory {
            walk(c, vol, e.ino, &p, out, depth + 1)?;
        } else if e.kind() == coordinator::proto::NodeKind::File {
            out.push((p, e.ino));
        }
    }
    Ok(())
}

/// The path of a role's disk under its volume's root
/// (`/ClusterStorage/Volume1/vms/a.vhd` → `vms/a.vhd`).
pub(crate) fn rel_path(disk: &str, vol: u64) -> String {
    let marker = format!("Volume{vol}/");
    match disk.find(&marker) {
        Some(i) => disk[i + marker.len()..].to_string(),
        None => disk.trim_start_matches('/').to_string(),
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 30)
}

/// Gathers the inventory.
pub fn gather(access: &Access, p: &Policy, now: u64) -> Result<Inventory> {
    let me = access.identity()?;
    let mut c = access.client()?;
    let info = c.cluster_info().map_err(cerr)?;
    let (runtimes, avg_host_mem) = host_views(&me, &info);
    let (mut disks, snaps_of) = list_disks(&mut c, &info)?;
    // Which disks each role uses: its own, and its parents'.
    let mut vms = Vec::new();
    for r in &info.vms {
        let Ok(cfg) = VmConfig::from_role(r) else {
            continue;
        };
        let rel = rel_path(&cfg.disk, cfg.volume);
        let chain = parent_chain(p, &cfg, rel.clone());
        for (vol, path) in &chain {
            for d in disks
                .iter_mut()
                .filter(|d| d.volume == *vol && &d.path == path)
            {
                d.used_by.push(r.name.clone());
            }
        }
        let own = disks
            .iter()
            .find(|d| d.volume == cfg.volume && d.path == rel);
        let rt = runtimes.get(&r.name);
        let running = cfg.state == Wanted::Running && r.node != 0;
        let on_disk = own.map_or(0, |d| d.on_disk);
        let cost = gib(on_disk) * p.price_gib_month
            + p.price_host_month * (cfg.memory as f64 / avg_host_mem.max(1) as f64);
        vms.push(Vm {
            name: r.name.clone(),
            owner: cfg.owner.clone().unwrap_or_default(),
            host: r.node,
            state: rt
                .map(|v| v.state().label().to_string())
                .unwrap_or_else(|| cfg.state.to_string()),
            memory: cfg.memory,
            resident_peak: rt.map_or(0, |v| v.resident_peak),
            disk: cfg.disk.clone(),
            disk_on_disk: on_disk,
            last_running: if running {
                now
            } else {
                cfg.state_since.unwrap_or(0)
            },
            last_io: own.map_or(0, |d| d.last_io),
            expires: cfg.expires,
            snapshots_held: own.map(|d| d.snapshots_held.clone()).unwrap_or_default(),
            cost_month: (cost * 100.0).round() / 100.0,
        });
    }
    let mut flags = sprawl(&vms, &info, p, now);
    disk_flags(&disks, &snaps_of, p, now, &mut flags);
    // A VM flagged twice (stopped and expired) frees its disk once.
    let mut seen = BTreeSet::new();
    let mut frees_storage = 0;
    let mut frees_memory = 0;
    for f in &flags {
        if seen.insert((f.subject.clone(), f.frees_storage > 0)) {
            frees_storage += f.frees_storage;
        }
        frees_memory += f.frees_memory;
    }
    let cost_month = vms.iter().map(|v| v.cost_month).sum::<f64>();
    let templates = crate::template_cmd::gather(access, &p.mount_root)?;
    let templates_save = templates.iter().map(|t| t.saves).sum();
    Ok(Inventory {
        at: now,
        vms,
        disks,
        flags,
        frees_storage,
        frees_memory,
        cost_month: (cost_month * 100.0).round() / 100.0,
        templates,
        templates_save,
    })
}

fn cerr(e: client::ClientError) -> anyhow::Error {
    anyhow::anyhow!(client::describe(&e))
}

/// The hosts' views: the VMs' runtimes by name, and the memory a host
/// offers VMs on average.
fn host_views(
    me: &Identity,
    info: &proto::ClusterInfo,
) -> (BTreeMap<String, proto::VmRuntime>, u64) {
    let mut runtimes: BTreeMap<String, proto::VmRuntime> = BTreeMap::new();
    let mut host_mem: BTreeMap<u64, u64> = BTreeMap::new();
    for n in &info.nodes {
        if let Some(s) = client::host_status(me, n) {
            for v in &s.vms {
                runtimes.insert(v.name.clone(), v.clone());
            }
            if let Some(l) = &s.load {
                host_mem.insert(
                    n.id,
                    if l.vm_memory > 0 {
                        l.vm_memory
                    } else {
                        l.mem_total
                    },
                );
            }
        }
    }
    let avg_host_mem = if host_mem.is_empty() {
        1u64 << 36
    } else {
        host_mem.values().sum::<u64>() / host_mem.len() as u64
    };
    (runtimes, avg_host_mem)
}

/// Every VHD of every volume, and each volume's snapshots.
#[allow(clippy::type_complexity)]
fn list_disks(
    c: &mut client::Client,
    info: &proto::ClusterInfo,
) -> Result<(Vec<Disk>, BTreeMap<u64, Vec<proto::SnapshotInfo>>)> {
    let mut disks: Vec<Disk> = Vec::new();
    let mut snaps_of: BTreeMap<u64, Vec<proto::SnapshotInfo>> = BTreeMap::new();
    for v in &info.volumes {
        let snaps = c.snapshots(v.number).map_err(cerr)?;
        let mut files = Vec::new();
        walk(c, v.number, 1, "", &mut files, 0)?;
        for (path, ino) in files.into_iter().filter(|(p, _)| is_vhd(p)) {
            let a = c.getattr(v.number, ino).map_err(cerr)?;
            let on_disk: u64 = c
                .extents(v.number, ino)
                .map_err(cerr)?
                .iter()
                .map(|e| e.len)
                .sum();
            let held = snaps
                .iter()
                .filter(|s| s.created >= a.ctime.min(a.mtime))
                .map(|s| s.name.clone())
                .collect();
            disks.push(Disk {
                volume: v.number,
                path,
                size: a.size,
                on_disk,
                last_io: a.mtime,
                used_by: vec![],
                snapshots_held: held,
            });
        }
        snaps_of.insert(v.number, snaps);
    }
    Ok((disks, snaps_of))
}

/// A role's disk and its parents, as (volume, path under the volume).
fn parent_chain(p: &Policy, cfg: &VmConfig, rel: String) -> Vec<(u64, String)> {
    chain(&p.mount_root, cfg.volume, &rel)
}

/// The VHD at `rel` on VolumeN and its parents, as (volume, path under
/// the volume), read through this host's mounts under `mount_root` (the
/// disk alone when they cannot be read).
pub(crate) fn chain(mount_root: &Path, vol: u64, rel: &str) -> Vec<(u64, String)> {
    let mut chain = vec![(vol, rel.to_string())];
    let mut cur = mount_root.join(format!("Volume{vol}")).join(rel);
    for _ in 0..16 {
        let Ok(vhd) = vhd::Vhd::open(&cur, &vhd::OpenOptions::default()) else {
            break;
        };
        let Some(parent) = vhd.parent().map(|x| lexical(Path::new(x.name()))) else {
            break;
        };
        let Ok(prel) = parent.strip_prefix(mount_root) else {
            break;
        };
        let mut parts = prel.components();
        let vol = parts.next().and_then(|c| {
            c.as_os_str()
                .to_str()?
                .strip_prefix("Volume")?
                .parse::<u64>()
                .ok()
        });
        let Some(vol) = vol else { break };
        chain.push((vol, parts.as_path().display().to_string()));
        cur = parent;
    }
    chain
}

/// `p` with its `.` and `..` parts resolved by their names alone (a
/// relative parent locator such as `vms/../base.vhd`).
fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Every VHD file of every volume, as (volume, path under the volume),
/// from the volumes' metadata (no mount needed).
pub(crate) fn vhd_files(c: &mut Client, info: &proto::ClusterInfo) -> Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    for v in &info.volumes {
        let mut files = Vec::new();
        walk(c, v.number, 1, "", &mut files, 0)?;
        out.extend(
            files
                .into_iter()
                .filter(|(p, _)| is_vhd(p))
                .map(|(p, _)| (v.number, p)),
        );
    }
    Ok(out)
}

/// The VMs' signs of sprawl: stopped long, expired or expiring,
/// over-provisioned.
fn sprawl(vms: &[Vm], info: &proto::ClusterInfo, p: &Policy, now: u64) -> Vec<Flag> {
    let mut flags = Vec::new();
    let days = |ms: u64| ms as f64 / 86_400_000.0;
    for (vm, r) in vms
        .iter()
        .zip(info.vms.iter().filter(|r| VmConfig::from_role(r).is_ok()))
    {
        let Ok(cfg) = VmConfig::from_role(r) else {
            continue;
        };
        let stopped = cfg.state == Wanted::Stopped;
        if stopped
            && vm.last_running > 0
            && now.saturating_sub(vm.last_running) > p.stopped_for.as_millis() as u64
        {
            flags.push(Flag {
                kind: "stopped",
                subject: vm.name.clone(),
                detail: format!(
                    "stopped for {:.1} days; removing it and its disk frees the disk",
                    days(now - vm.last_running)
                ),
                frees_storage: vm.disk_on_disk,
                frees_memory: 0,
            });
        }
        if let Some(e) = vm.expires {
            if e <= now {
                flags.push(Flag {
                    kind: "expired",
                    subject: vm.name.clone(),
                    detail: format!(
                        "expired {} ({:.1} days ago); owner: {}",
                        crate::vhd_cmd::iso8601(e / 1000),
                        days(now - e),
                        if vm.owner.is_empty() { "-" } else { &vm.owner }
                    ),
                    frees_storage: vm.disk_on_disk,
                    frees_memory: if stopped { 0 } else { vm.memory },
                });
            } else if e - now <= p.warn_before.as_millis() as u64 {
                flags.push(Flag {
                    kind: "expires-soon",
                    subject: vm.name.clone(),
                    detail: format!("expires {} (in {:.1} days): renew it (csvctl vm set {} --expires ...) or let it go; owner: {}", crate::vhd_cmd::iso8601(e / 1000), days(e - now), vm.name, if vm.owner.is_empty() { "-" } else { &vm.owner }),
                    frees_storage: 0,
                    frees_memory: 0,
                });
            }
        }
        if !stopped && vm.resident_peak > 0 && vm.resident_peak * 100 < vm.memory * p.memory_use_pct
        {
            // Keep a quarter above the peak seen.
            let keep = (vm.resident_peak + vm.resident_peak / 4).next_multiple_of(64 << 20);
            flags.push(Flag {
                kind: "over-provisioned",
                subject: vm.name.clone(),
                detail: format!(
                    "given {} MiB, used at most {} MiB: {} MiB would do",
                    vm.memory >> 20,
                    vm.resident_peak >> 20,
                    keep >> 20
                ),
                frees_storage: 0,
                frees_memory: vm.memory.saturating_sub(keep),
            });
        }
    }
    flags
}

/// Disks no role uses and old snapshots.
fn disk_flags(
    disks: &[Disk],
    snaps_of: &BTreeMap<u64, Vec<proto::SnapshotInfo>>,
    p: &Policy,
    now: u64,
    flags: &mut Vec<Flag>,
) {
    let days = |ms: u64| ms as f64 / 86_400_000.0;
    // A template waits in its library for VMs to be made from it.
    let template = |d: &Disk| {
        d.path
            .starts_with(&format!("{}/", crate::template_cmd::LIBRARY))
    };
    for d in disks
        .iter()
        .filter(|d| d.used_by.is_empty() && !template(d))
    {
        flags.push(Flag {
            kind: "unattached-vhd",
            subject: format!("Volume{}/{}", d.volume, d.path),
            detail: format!(
                "no VM role uses it (nor a disk's parent chain); last written {}",
                crate::vhd_cmd::iso8601(d.last_io / 1000)
            ),
            frees_storage: d.on_disk,
            frees_memory: 0,
        });
    }
    for (vol, snaps) in snaps_of {
        for s in snaps {
            if now.saturating_sub(s.created) > p.snapshot_age.as_millis() as u64 {
                flags.push(Flag {
                    kind: "old-snapshot",
                    subject: format!("Volume{vol}@{}", s.name),
                    detail: format!(
                        "taken {} ({:.1} days ago), {} files",
                        crate::vhd_cmd::iso8601(s.created / 1000),
                        days(now - s.created),
                        s.files
                    ),
                    frees_storage: s.exclusive,
                    frees_memory: 0,
                });
            }
        }
    }
}

fn mib(b: u64) -> String {
    vhd::size::human(b)
}

/// `csvctl inventory`.
pub fn run(access: &Access, p: &Policy, json: bool) -> Result<ExitCode> {
    let inv = gather(access, p, crate::vm_cmd::now_ms())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(if inv.flags.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        });
    }
    let when = |ms: u64| {
        if ms == 0 {
            "-".to_string()
        } else {
            crate::vhd_cmd::iso8601(ms / 1000)
        }
    };
    println!("VMs");
    println!(
        "  {:<16} {:<10} {:>4} {:<10} {:>9} {:>9} {:>10} {:<21} {:<21} {:>5} {:>9}",
        "NAME",
        "OWNER",
        "HOST",
        "STATE",
        "MEMORY",
        "PEAK",
        "ON DISK",
        "LAST RUNNING",
        "EXPIRES",
        "SNAPS",
        "COST/MO"
    );
    for v in &inv.vms {
        println!(
            "  {:<16} {:<10} {:>4} {:<10} {:>9} {:>9} {:>10} {:<21} {:<21} {:>5} {:>9.2}",
            v.name,
            if v.owner.is_empty() { "-" } else { &v.owner },
            v.host,
            v.state,
            mib(v.memory),
            if v.resident_peak == 0 {
                "-".into()
            } else {
                mib(v.resident_peak)
            },
            mib(v.disk_on_disk),
            when(v.last_running),
            v.expires.map_or("never".into(), when),
            v.snapshots_held.len(),
            v.cost_month
        );
    }
    println!("\nVHDs");
    println!(
        "  {:<40} {:>10} {:>10} {:<21} USED BY",
        "PATH", "SIZE", "ON DISK", "LAST I/O"
    );
    for d in &inv.disks {
        println!(
            "  {:<40} {:>10} {:>10} {:<21} {}",
            format!("Volume{}/{}", d.volume, d.path),
            mib(d.size),
            mib(d.on_disk),
            when(d.last_io),
            if d.used_by.is_empty() {
                "-".into()
            } else {
                d.used_by.join(", ")
            }
        );
    }
    if !inv.templates.is_empty() {
        println!("\nTemplates");
        println!(
            "  {:<40} {:>10} {:>8} {:>10}",
            "PATH", "ON DISK", "CHILDREN", "SAVES"
        );
        for t in &inv.templates {
            println!(
                "  {:<40} {:>10} {:>8} {:>10}",
                format!(
                    "Volume{}/{}/{}.vhd",
                    t.volume,
                    crate::template_cmd::LIBRARY,
                    t.name
                ),
                mib(t.on_disk),
                t.children.len(),
                mib(t.saves)
            );
        }
        println!(
            "  the templates save {} against full copies of each child",
            mib(inv.templates_save)
        );
    }
    println!("\nSprawl");
    if inv.flags.is_empty() {
        println!("  none");
    }
    for f in &inv.flags {
        println!(
            "  {:<17} {:<28} frees {:>9} disk {:>9} memory  {}",
            f.kind,
            f.subject,
            mib(f.frees_storage),
            mib(f.frees_memory),
            f.detail
        );
    }
    println!(
        "\nActing on all of it frees {} of volume space and {} of memory; the VMs cost {:.2} a month",
        mib(inv.frees_storage),
        mib(inv.frees_memory),
        inv.cost_month
    );
    Ok(if inv.flags.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn role_disks_map_to_volume_paths() {
        assert_eq!(
            super::rel_path("/ClusterStorage/Volume1/vms/a.vhd", 1),
            "vms/a.vhd"
        );
        assert_eq!(super::rel_path("/tmp/h1/mnt/Volume12/a.vhd", 12), "a.vhd");
        assert_eq!(super::rel_path("/a.vhd", 3), "a.vhd");
        assert!(super::is_vhd("X.VHD") && super::is_vhd("d.avhd") && !super::is_vhd("a.img"));
        assert_eq!(
            super::lexical(std::path::Path::new("/m/Volume1/vms/./../Library/t.vhd")),
            std::path::Path::new("/m/Volume1/Library/t.vhd")
        );
    }
}
