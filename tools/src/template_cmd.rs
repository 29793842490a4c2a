//! `csvctl template`: a library of golden VHDs that new VMs are cloned
//! from, as System Center VMM keeps templates in its library.
//!
//! A template is a dynamic VHD at `Library/Templates/NAME.vhd` on a volume,
//! read-only (mode 0444). `csvctl vm add NAME --template T` gives the VM a
//! differencing child of it: made in a moment, it holds only the blocks the
//! VM writes, and every VM made from one template shares the template's
//! blocks. The child names its parent by a path relative to itself, so
//! every host finds the template under its own mount root; hosts open a
//! parent read-only, so the template's bytes never change while children
//! use it. The library is the directory itself: there is no second record
//! to drift from the files.

use crate::cluster_cmd::Access;
use crate::inventory_cmd;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use coordinator::proto;
use hypervisor_shim::supervisor::role::{valid_name, volume_of, VmConfig};
use serde::Serialize;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where a volume keeps its templates, under its root.
pub const LIBRARY: &str = "Library/Templates";

/// `csvctl template ...`
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Put a golden disk in a volume's library: DISK (a VHD of any kind, a
    /// differencing one flattened with its parents, or a raw image) is
    /// copied to Library/Templates/NAME.vhd as a dynamic VHD (blocks of
    /// zeros left out) and made read-only. VMs are then made from it with
    /// `csvctl vm add VM --template NAME`.
    ///
    /// Example:
    ///   csvctl template add debian12 --from /srv/images/debian12.vhd --volume 1
    #[command(verbatim_doc_comment)]
    Add {
        #[command(flatten)]
        access: Access,
        /// The template's name: letters, digits, '-', '_' and '.', up to 63.
        name: String,
        /// The disk to copy (this host's path; it is not changed).
        #[arg(long)]
        from: PathBuf,
        /// The volume whose library keeps it [default: the volume DISK is
        /// on, or the cluster's only volume].
        #[arg(long)]
        volume: Option<u64>,
        /// Where this host mounts the volumes.
        #[arg(long, default_value = "/ClusterStorage")]
        mount_root: PathBuf,
    },
    /// The templates of every volume's library, with the disks made from
    /// each (its children) and the VMs that use them.
    List {
        #[command(flatten)]
        access: Access,
        /// Where this host mounts the volumes.
        #[arg(long, default_value = "/ClusterStorage")]
        mount_root: PathBuf,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take a template out of its library. Refused while any disk is made
    /// from it (remove those VMs' disks first, or merge them with
    /// `csvctl vhd merge`).
    Remove {
        #[command(flatten)]
        access: Access,
        /// The template's name.
        name: String,
        /// Its volume, when several libraries have a template of that name.
        #[arg(long)]
        volume: Option<u64>,
        /// Where this host mounts the volumes.
        #[arg(long, default_value = "/ClusterStorage")]
        mount_root: PathBuf,
    },
}

/// One template and what uses it.
#[derive(Debug, Clone, Serialize)]
pub struct Template {
    pub name: String,
    pub volume: u64,
    /// Its path as VM roles name paths (`/ClusterStorage/VolumeN/...`).
    pub path: String,
    /// Virtual size.
    pub size: u64,
    /// Bytes the volume gives it.
    pub on_disk: u64,
    /// When it was added (ms since the epoch).
    pub added: u64,
    /// The disks made from it, directly or through other differencing
    /// disks (`/ClusterStorage/VolumeN/...`).
    pub children: Vec<String>,
    /// The VM roles whose disk is one of them.
    pub vms: Vec<String>,
    /// Volume space its children would take as full copies of it.
    pub saves: u64,
}

pub fn run(c: TemplateCommand) -> Result<ExitCode> {
    match c {
        TemplateCommand::Add {
            access,
            name,
            from,
            volume,
            mount_root,
        } => add(&access, &name, &from, volume, &mount_root),
        TemplateCommand::List {
            access,
            mount_root,
            json,
        } => list(&access, &mount_root, json),
        TemplateCommand::Remove {
            access,
            name,
            volume,
            mount_root,
        } => remove(&access, &name, volume, &mount_root),
    }
}

/// Whether this host's csvd has `dir` mounted (its own FUSE mount on top).
fn mounted(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = dir.to_string_lossy();
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let _src = f.next()?;
        let at = f.next()?;
        let kind = f.next()?;
        (at == want).then_some(kind)
    }) == Some("fuse.csv")
}

/// VolumeN's root on this host, checked to be mounted.
fn volume_root(mount_root: &Path, vol: u64) -> Result<PathBuf> {
    let root = mount_root.join(format!("Volume{vol}"));
    if !mounted(&root) {
        bail!(
            "Volume{vol} is not mounted at {} on this host: run csvctl on a host of the cluster, or give --mount-root",
            root.display()
        );
    }
    Ok(root)
}

/// The template file `name` on VolumeN under `mount_root`.
pub fn file_of(mount_root: &Path, vol: u64, name: &str) -> PathBuf {
    mount_root
        .join(format!("Volume{vol}"))
        .join(LIBRARY)
        .join(format!("{name}.vhd"))
}

fn add(
    access: &Access,
    name: &str,
    from: &Path,
    volume: Option<u64>,
    mount_root: &Path,
) -> Result<ExitCode> {
    if !valid_name(name) {
        bail!("{name:?} is not a template name: use letters, digits, '-', '_' and '.', up to 63");
    }
    if !from.is_file() {
        bail!("--from {}: no such file", from.display());
    }
    let (_, info) = crate::vm_cmd::registry(access)?;
    let vol = match volume {
        Some(v) => v,
        None => match from
            .strip_prefix(mount_root)
            .ok()
            .and_then(|p| volume_of(&p.to_string_lossy()))
        {
            Some(v) => v,
            None if info.volumes.len() == 1 => info.volumes[0].number,
            None => bail!("give --volume N: the cluster has several volumes"),
        },
    };
    if !info.volumes.iter().any(|v| v.number == vol) {
        bail!("there is no Volume{vol} (csvctl volume list shows the volumes)");
    }
    let root = volume_root(mount_root, vol)?;
    let dst = file_of(mount_root, vol, name);
    if dst.exists() {
        bail!(
            "Volume{vol} has a template {name:?} already ({})",
            dst.display()
        );
    }
    let lib = root.join(LIBRARY);
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot make {}", lib.display()))?;
    // Copied under a hidden name and renamed: a copy cut short never
    // shows as a template.
    let part = lib.join(format!(".{name}.vhd.part"));
    let _ = std::fs::remove_file(&part);
    let pb = crate::vhd_cmd::bar(0, "copy");
    let t = std::time::Instant::now();
    let r = vhd::ops::convert(
        from,
        &part,
        vhd::ops::Format::Dynamic,
        vhd::header::DEFAULT_BLOCK_SIZE,
        &vhd::OpenOptions::default(),
        &mut crate::vhd_cmd::track(&pb),
    )
    .with_context(|| format!("cannot copy {} into the library", from.display()))?;
    pb.finish_and_clear();
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o444))
        .with_context(|| format!("cannot make {} read-only", part.display()))?;
    std::fs::rename(&part, &dst).with_context(|| format!("cannot name {}", dst.display()))?;
    println!(
        "template {name} added to Volume{vol}'s library: {} ({}, {} of data, copied in {:.1} s)",
        canonical(vol, name),
        vhd::size::human(r.size),
        vhd::size::human(r.written),
        t.elapsed().as_secs_f64()
    );
    println!("make a VM from it with: csvctl vm add VM --template {name}");
    Ok(ExitCode::SUCCESS)
}

/// A template's path as VM roles write paths.
fn canonical(vol: u64, name: &str) -> String {
    format!("/ClusterStorage/Volume{vol}/{LIBRARY}/{name}.vhd")
}

/// Every template on the volumes this host mounts, with its children
/// (every VHD of every volume whose parent chain holds it) and the VM
/// roles using them. Volumes this host does not mount are left out.
pub fn gather(access: &Access, mount_root: &Path) -> Result<Vec<Template>> {
    let (mut c, info) = crate::vm_cmd::registry(access)?;
    let mut out = library(&info, mount_root);
    if out.is_empty() {
        return Ok(out);
    }
    let files = inventory_cmd::vhd_files(&mut c, &info)?;
    for (vol, rel) in files {
        let chain = inventory_cmd::chain(mount_root, vol, &rel);
        for (pv, pp) in chain.iter().skip(1) {
            for t in out.iter_mut() {
                if t.volume == *pv && *pp == format!("{LIBRARY}/{}.vhd", t.name) {
                    t.children
                        .push(format!("/ClusterStorage/Volume{vol}/{rel}"));
                }
            }
        }
    }
    for r in &info.vms {
        let Ok(cfg) = VmConfig::from_role(r) else {
            continue;
        };
        let disk = format!(
            "/ClusterStorage/Volume{}/{}",
            cfg.volume,
            inventory_cmd::rel_path(&cfg.disk, cfg.volume)
        );
        for t in out.iter_mut().filter(|t| t.children.contains(&disk)) {
            t.vms.push(r.name.clone());
        }
    }
    for t in &mut out {
        t.saves = t.on_disk * t.children.len() as u64;
    }
    Ok(out)
}

/// The templates in the libraries of the volumes this host mounts (their
/// children not looked for).
pub fn library(info: &proto::ClusterInfo, mount_root: &Path) -> Vec<Template> {
    let mut out = Vec::new();
    for v in &info.volumes {
        let Ok(root) = volume_root(mount_root, v.number) else {
            continue;
        };
        let Ok(dir) = std::fs::read_dir(root.join(LIBRARY)) else {
            continue;
        };
        for e in dir.flatten() {
            let fname = e.file_name().to_string_lossy().into_owned();
            let Some(name) = fname.strip_suffix(".vhd") else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            let size = vhd::Vhd::open(e.path(), &vhd::OpenOptions::default())
                .map(|d| d.size())
                .unwrap_or(0);
            out.push(Template {
                name: name.to_string(),
                volume: v.number,
                path: canonical(v.number, name),
                size,
                on_disk: m.blocks() * 512,
                added: u64::try_from(m.mtime()).unwrap_or(0) * 1000,
                children: vec![],
                vms: vec![],
                saves: 0,
            });
        }
    }
    out.sort_by(|a, b| (a.volume, &a.name).cmp(&(b.volume, &b.name)));
    out
}

fn list(access: &Access, mount_root: &Path, json: bool) -> Result<ExitCode> {
    let ts = gather(access, mount_root)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&ts)?);
        return Ok(ExitCode::SUCCESS);
    }
    if ts.is_empty() {
        println!("no templates (csvctl template add NAME --from DISK makes one)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:>6} {:>9} {:>9} {:<21} {:>8} {:>9}  VMS",
        "NAME", "VOLUME", "SIZE", "ON DISK", "ADDED", "CHILDREN", "SAVES"
    );
    for t in &ts {
        println!(
            "{:<20} {:>6} {:>9} {:>9} {:<21} {:>8} {:>9}  {}",
            t.name,
            t.volume,
            vhd::size::human(t.size),
            vhd::size::human(t.on_disk),
            crate::vhd_cmd::iso8601(t.added / 1000),
            t.children.len(),
            vhd::size::human(t.saves),
            if t.vms.is_empty() {
                "-".to_string()
            } else {
                t.vms.join(", ")
            }
        );
        for ch in &t.children {
            println!("  child {ch}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The template `name`: on `volume`, or the only library that has it.
pub fn find(ts: &[Template], name: &str, volume: Option<u64>) -> Result<Template> {
    let found: Vec<&Template> = ts
        .iter()
        .filter(|t| t.name == name && volume.is_none_or(|v| v == t.volume))
        .collect();
    match found.as_slice() {
        [t] => Ok((*t).clone()),
        [] => bail!(
            "no template {name:?}{} on the volumes this host mounts (csvctl template list shows them)",
            volume.map(|v| format!(" on Volume{v}")).unwrap_or_default()
        ),
        many => bail!(
            "template {name:?} is in the libraries of volumes {}: give --volume",
            many.iter()
                .map(|t| t.volume.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn remove(access: &Access, name: &str, volume: Option<u64>, mount_root: &Path) -> Result<ExitCode> {
    let ts = gather(access, mount_root)?;
    let t = find(&ts, name, volume)?;
    if !t.children.is_empty() {
        bail!(
            "template {name} is in use: {} disk(s) are made from it ({}){}; remove them or merge them into standalone disks (csvctl vhd merge) first",
            t.children.len(),
            t.children.join(", "),
            if t.vms.is_empty() {
                String::new()
            } else {
                format!(", used by VM(s) {}", t.vms.join(", "))
            }
        );
    }
    let file = file_of(mount_root, t.volume, name);
    std::fs::remove_file(&file).with_context(|| format!("cannot remove {}", file.display()))?;
    println!("template {name} removed from Volume{}'s library", t.volume);
    Ok(ExitCode::SUCCESS)
}

/// Makes the disk of a VM from template `t` at `disk` (this host's path):
/// a differencing child of it. `disk` must not exist.
pub fn make_child(mount_root: &Path, t: &Template, disk: &Path) -> Result<()> {
    if disk.exists() {
        bail!("{} exists: give another --disk", disk.display());
    }
    if let Some(dir) = disk.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    }
    let parent = file_of(mount_root, t.volume, &t.name);
    let mut co = vhd::CreateOptions::new(vhd::footer::DiskType::Differencing, 0);
    co.parent = Some(parent.clone());
    vhd::Vhd::create(disk, &co).with_context(|| {
        format!(
            "cannot make {} from template {} ({})",
            disk.display(),
            t.name,
            parent.display()
        )
    })?;
    Ok(())
}
