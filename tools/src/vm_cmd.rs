//! `csvctl vm`: VM roles of the cluster (Add-ClusterVirtualMachineRole and
//! friends) and where they would run best.
//!
//! A role lives in the cluster group's state: its name, the host that owns
//! it (0 while stopped) and its configuration as JSON ([`VmConfig`]).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use coordinator::client;
use coordinator::proto;
use coordinator::proto::Label as _;
use hypervisor_shim::supervisor::engine::EngineKind;
use hypervisor_shim::supervisor::placement::{self, HostLoad, Policy};
use hypervisor_shim::supervisor::role::{volume_of, Guest, Priority, VmConfig, Wanted};
use std::process::ExitCode;
use std::time::Duration;

use crate::cluster_cmd::Access;

/// `csvctl vm add` arguments.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    #[command(flatten)]
    access: Access,
    /// Its name: letters, digits, '-', '_' and '.', up to 63.
    name: String,
    /// Memory (bytes, or with K, M, G).
    #[arg(long, default_value = "256M", value_parser = vhd::size::parse_positive)]
    memory: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Its disk: a VHD under a host's mount root, e.g.
    /// /ClusterStorage/Volume1/vm1.vhd (the volume is read from the path).
    /// With --template: where to make it [default:
    /// /ClusterStorage/VolumeN/NAME.vhd on the template's volume].
    #[arg(long, required_unless_present = "template")]
    disk: Option<String>,
    /// The volume of the disk, when the path does not say.
    #[arg(long)]
    volume: Option<u64>,
    /// Make its disk from this template (csvctl template list): a
    /// differencing child of it, made in a moment, holding only what the
    /// VM writes.
    #[arg(long)]
    template: Option<String>,
    /// Where this host mounts the volumes (to make the disk from a
    /// template).
    #[arg(long, default_value = "/ClusterStorage")]
    mount_root: std::path::PathBuf,
    /// Hosts to try first, in order (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    preferred: Vec<u64>,
    /// Restart order after a host failure: high, medium or low.
    #[arg(long, default_value = "medium", value_parser = |s: &str| s.parse::<Priority>())]
    priority: Priority,
    /// The test guest's dirtying rate, MiB/s.
    #[arg(long, default_value_t = 0.0)]
    dirty_rate: f64,
    /// The engine that runs it: csv-vmm (the test guest) or qemu (real
    /// guests). Default: the host's `engine` setting, or qemu when a
    /// --kernel or --firmware-boot is given.
    #[arg(long, value_parser = |s: &str| s.parse::<EngineKind>())]
    engine: Option<EngineKind>,
    /// A real guest: boot this Linux kernel directly (a path under
    /// /ClusterStorage/VolumeN, or present on every host).
    #[arg(long, conflicts_with = "firmware_boot")]
    kernel: Option<String>,
    /// The kernel's initramfs.
    #[arg(long, requires = "kernel")]
    initrd: Option<String>,
    /// The kernel's command line [default: console=ttyS0].
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// A real guest booted by its firmware (SeaBIOS) from the disk, as a
    /// Hyper-V VM boots from its VHD.
    #[arg(long)]
    firmware_boot: bool,
    /// A network card (qemu engine): `user` (QEMU's user-mode network, for
    /// a demo) or `bridge:NAME` (a tap on bridge NAME, through
    /// qemu-bridge-helper: allow it in /etc/qemu/bridge.conf). Its MAC
    /// address follows from the VM's name, the same on every host.
    #[arg(long, value_name = "user|bridge:NAME")]
    nic: Option<String>,
    /// Send the guest's second serial port (ttyS1) as UDP datagrams to
    /// HOST:PORT (a heartbeat observer with one clock).
    #[arg(long, value_name = "HOST:PORT")]
    heartbeat: Option<String>,
    /// Who answers for it (shown by `inventory`).
    #[arg(long)]
    owner: Option<String>,
    /// When it is due to be retired: YYYY-MM-DD or +90d; `inventory`
    /// warns before and flags it after.
    #[arg(long)]
    expires: Option<String>,
}

/// `csvctl vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Make a VM a role of the cluster (stopped; nothing runs yet).
    Add(Box<AddArgs>),
    /// Change a VM role's owner or expiry date.
    Set {
        #[command(flatten)]
        access: Access,
        name: String,
        /// Who answers for it.
        #[arg(long)]
        owner: Option<String>,
        /// When it is due to be retired: YYYY-MM-DD, +90d, or `never`.
        #[arg(long)]
        expires: Option<String>,
    },
    /// The cluster's VM roles.
    List {
        #[command(flatten)]
        access: Access,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a stopped VM role (its disk stays).
    Remove {
        #[command(flatten)]
        access: Access,
        name: String,
    },
    /// Start a VM role: on its best-rated host (or --on HOST), whose csvd
    /// runs it.
    Start {
        #[command(flatten)]
        access: Access,
        name: String,
        /// Run it on this host rather than the best-rated one.
        #[arg(long)]
        on: Option<u64>,
    },
    /// Live-migrate a running VM role to another host
    /// (Move-ClusterVirtualMachineRole): its host sends the memory while
    /// the guest runs, the disk's write lease moves to the target at the
    /// switch-over, and the target resumes it.
    Migrate {
        #[command(flatten)]
        access: Access,
        name: String,
        /// The host to move it to.
        #[arg(long)]
        to: u64,
        /// Quick migration (Move-ClusterGroup): save the VM's state to its
        /// volume, stop it, and restore it on the target (a longer pause,
        /// no memory copied while it runs).
        #[arg(long)]
        quick: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// A VM's serial console, from any host (through the host running
    /// it): the last --lines lines, then, with --follow, what it prints
    /// next until Ctrl-C or the VM stops, following the VM when it moves.
    /// --interactive attaches to it: keys go to the guest (qemu engine),
    /// Ctrl-] leaves. --type sends one line and shows the answer.
    Console {
        #[command(flatten)]
        access: Access,
        name: String,
        /// Lines of earlier output to show first.
        #[arg(long, default_value_t = 40)]
        lines: usize,
        /// Keep printing what the console prints.
        #[arg(long, short)]
        follow: bool,
        /// Attach: what you type goes to the guest's console (raw
        /// terminal; Ctrl-] leaves).
        #[arg(long, short, conflicts_with = "type_text")]
        interactive: bool,
        /// Type TEXT and Enter on the console, then show what it prints
        /// for 3 s (with --follow, until Ctrl-C).
        #[arg(long = "type", value_name = "TEXT")]
        type_text: Option<String>,
    },
    /// Stop a VM role (its host stops the VMM, which flushes the disk).
    Stop {
        #[command(flatten)]
        access: Access,
        name: String,
    },
    /// A VM role's state: the registry's, and its host's view of the VM
    /// (heartbeat, disk writes, errors).
    Status {
        #[command(flatten)]
        access: Access,
        name: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rate every host for a VM, best first, with the reason for each
    /// rating (nothing moves).
    Place {
        #[command(flatten)]
        access: Access,
        name: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

use hypervisor_shim::supervisor::role::valid_name;

pub(crate) use coordinator::group::now_ms;

/// A client error as an operator reads it.
fn cerr(e: client::ClientError) -> anyhow::Error {
    anyhow::anyhow!(client::describe(&e))
}

/// A client and the registry as it is now.
pub(crate) fn registry(access: &Access) -> Result<(client::Client, proto::ClusterInfo)> {
    let mut c = access.client()?;
    let info = c.cluster_info().map_err(cerr)?;
    Ok((c, info))
}

/// Records `name` on `node` with `cfg`.
fn put_role(c: &mut client::Client, name: &str, node: u64, cfg: &VmConfig) -> Result<()> {
    c.set_vm_role(proto::VmRole {
        name: name.to_string(),
        node,
        config: cfg.to_bytes(),
    })
    .map_err(cerr)
}

fn config_of(role: &proto::VmRole) -> Result<VmConfig> {
    serde_json::from_slice(&role.config).with_context(|| {
        format!(
            "VM role {:?} has a configuration this csvctl cannot read",
            role.name
        )
    })
}

pub(crate) fn find(info: &proto::ClusterInfo, name: &str) -> Result<proto::VmRole> {
    info.vms
        .iter()
        .find(|r| r.name == name)
        .cloned()
        .with_context(|| format!("no VM role {name:?} (csvctl vm list shows them)"))
}

pub fn run(c: VmCommand) -> Result<ExitCode> {
    match c {
        VmCommand::Add(a) => add(*a),
        VmCommand::List { access, json } => list(&access, json),
        VmCommand::Remove { access, name } => {
            let (mut c, info) = registry(&access)?;
            let role = find(&info, &name)?;
            let cfg = config_of(&role)?;
            if cfg.state != Wanted::Stopped || role.node != 0 {
                bail!(
                    "VM {name} is {} on host {}: stop it first",
                    cfg.state,
                    role.node
                );
            }
            c.remove_vm_role(&name).map_err(cerr)?;
            println!("VM role {name} removed (its disk {} stays)", cfg.disk);
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Place { access, name, json } => place(&access, &name, json),
        VmCommand::Start { access, name, on } => start(&access, &name, on),
        VmCommand::Migrate {
            access,
            name,
            to,
            quick,
            timeout_s,
        } => migrate(&access, &name, to, quick, timeout_s),
        VmCommand::Set {
            access,
            name,
            owner,
            expires,
        } => {
            let (mut c, info) = registry(&access)?;
            let role = find(&info, &name)?;
            let mut cfg = config_of(&role)?;
            if let Some(o) = owner {
                cfg.owner = Some(o).filter(|o| !o.is_empty());
            }
            if let Some(e) = expires {
                cfg.expires = if e == "never" {
                    None
                } else {
                    Some(crate::when::parse_when(&e, now_ms()).map_err(anyhow::Error::msg)?)
                };
            }
            put_role(&mut c, &name, role.node, &cfg)?;
            println!(
                "VM {name}: owner {}, expires {}",
                cfg.owner.as_deref().unwrap_or("-"),
                cfg.expires
                    .map_or("never".into(), |e| crate::vhd_cmd::iso8601(e / 1000))
            );
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Stop { access, name } => {
            let (mut c, info) = registry(&access)?;
            let role = find(&info, &name)?;
            let mut cfg = config_of(&role)?;
            if cfg.state == Wanted::Stopped && role.node == 0 {
                println!("VM {name} is stopped already");
                return Ok(ExitCode::SUCCESS);
            }
            cfg.state = Wanted::Stopped;
            cfg.state_since = Some(now_ms());
            put_role(&mut c, &name, 0, &cfg)?;
            println!("VM {name} stopping on host {}", role.node);
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Status { access, name, json } => status(&access, &name, json),
        VmCommand::Console {
            access,
            name,
            lines,
            follow,
            interactive,
            type_text,
        } => crate::vm_console::console(
            &access,
            &name,
            crate::vm_console::ConsoleWay {
                lines,
                follow,
                interactive,
                typed: type_text.as_deref(),
            },
        ),
    }
}

/// `csvctl vm add`.
fn add(a: AddArgs) -> Result<ExitCode> {
    let AddArgs {
        access,
        name,
        memory,
        vcpus,
        disk,
        volume,
        template,
        mount_root,
        preferred,
        priority,
        dirty_rate,
        engine,
        kernel,
        initrd,
        cmdline,
        firmware_boot,
        nic,
        heartbeat,
        owner,
        expires,
    } = a;
    let real = kernel.is_some() || firmware_boot;
    let engine = match (engine, real) {
        (None, true) => Some(EngineKind::Qemu),
        (Some(EngineKind::CsvVmm), true) => {
            bail!("--engine csv-vmm runs the test guest; a real guest (--kernel, --firmware-boot) needs --engine qemu")
        }
        (Some(EngineKind::Qemu), false) => {
            bail!("--engine qemu runs real guests: give --kernel (and --initrd) or --firmware-boot")
        }
        (e, _) => e,
    };
    if let Some(n) = &nic {
        if !real {
            bail!("--nic is for real guests (--kernel or --firmware-boot)");
        }
        let ok = n == "user" || n.strip_prefix("bridge:").is_some_and(|b| !b.is_empty());
        if !ok {
            bail!("--nic {n:?}: give user or bridge:NAME");
        }
    }
    if let Some(hb) = &heartbeat {
        if hb.parse::<std::net::SocketAddr>().is_err() {
            bail!("--heartbeat {hb:?}: give HOST:PORT with an IP address, e.g. 127.0.0.1:7000");
        }
    }
    if !valid_name(&name) {
        bail!("{name:?} is not a VM name: use letters, digits, '-', '_' and '.', up to 63");
    }
    if vcpus == 0 || vcpus > 64 {
        bail!("--vcpus {vcpus}: 1 to 64");
    }
    if memory < 16 << 20 {
        bail!("--memory {}: at least 16 MiB", vhd::size::human(memory));
    }
    let (mut c, info) = registry(&access)?;
    if info.vms.iter().any(|r| r.name == name) {
        bail!("a VM role {name:?} exists");
    }
    // From a template: the disk is made here, a differencing child of it.
    let from = match &template {
        Some(t) => {
            let lib = crate::template_cmd::library(&info, &mount_root);
            let at = volume.or_else(|| disk.as_deref().and_then(volume_of));
            let t = crate::template_cmd::find(&lib, t, None)
                .or_else(|_| crate::template_cmd::find(&lib, t, at))?;
            Some(t)
        }
        None => None,
    };
    let disk = match (disk, &from) {
        (Some(d), _) => d,
        (None, Some(t)) => format!(
            "/ClusterStorage/Volume{}/{name}.vhd",
            volume.unwrap_or(t.volume)
        ),
        (None, None) => bail!("give --disk (or --template)"),
    };
    let Some(volume) = volume.or_else(|| volume_of(&disk)) else {
        bail!("cannot tell the volume of {disk:?}: give a path with VolumeN in it or --volume N");
    };
    if !info.volumes.iter().any(|v| v.number == volume) {
        bail!("there is no Volume{volume} (csvctl volume list shows the volumes)");
    }
    for p in &preferred {
        if !info.nodes.iter().any(|n| n.id == *p) {
            bail!("--preferred {p}: no such host");
        }
    }
    let cfg = VmConfig {
        vcpus,
        memory,
        disk,
        volume,
        preferred,
        priority,
        state: Wanted::Stopped,
        guest: if real { Guest::Linux } else { Guest::Test },
        dirty_rate,
        engine,
        kernel,
        initrd,
        cmdline,
        nic,
        heartbeat,
        migrate_to: None,
        last_migration: None,
        migrate_quick: false,
        restore_from: None,
        owner,
        expires: expires
            .map(|e| crate::when::parse_when(&e, now_ms()))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        state_since: Some(now_ms()),
    };
    if let Some(t) = &from {
        let Some(local) = cfg.disk_on(&mount_root) else {
            bail!("--disk {:?} is not a path on Volume{volume}", cfg.disk);
        };
        crate::template_cmd::make_child(&mount_root, t, &local)?;
        if let Err(e) = put_role(&mut c, &name, 0, &cfg) {
            let _ = std::fs::remove_file(&local);
            return Err(e);
        }
    } else {
        put_role(&mut c, &name, 0, &cfg)?;
    }
    println!(
        "VM role {name} added (stopped): {vcpus} vCPU(s), {}, disk {} on Volume{volume}{}",
        vhd::size::human(memory),
        cfg.disk,
        from.map(|t| format!(", made from template {}", t.name))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// `csvctl vm list`.
fn list(access: &Access, json: bool) -> Result<ExitCode> {
    let (_, info) = registry(access)?;
    let mut rows = Vec::new();
    for r in &info.vms {
        rows.push((r.clone(), config_of(r)?));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(r, c)| serde_json::json!({"name": r.name, "host": r.node, "config": c}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<8} {:>5} {:>6} {:>10} {:<8} DISK",
        "NAME", "STATE", "HOST", "VCPUS", "MEMORY", "PRIORITY"
    );
    for (r, c) in rows {
        let host = if r.node == 0 {
            "-".to_string()
        } else {
            r.node.to_string()
        };
        println!(
            "{:<20} {:<8} {:>5} {:>6} {:>10} {:<8} {}",
            r.name,
            c.state,
            host,
            c.vcpus,
            vhd::size::human(c.memory),
            c.priority,
            c.disk
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `csvctl vm start`.
fn start(access: &Access, name: &str, on: Option<u64>) -> Result<ExitCode> {
    let (mut c, info) = registry(access)?;
    let role = find(&info, name)?;
    let mut cfg = config_of(&role)?;
    if cfg.state == Wanted::Running {
        bail!("VM {name} is running on host {} already", role.node);
    }
    let host = match on {
        Some(h) => {
            if !info.nodes.iter().any(|n| n.id == h) {
                bail!("--on {h}: no such host");
            }
            h
        }
        None => {
            let loads = host_loads(access, &info, cfg.volume)?;
            let needs = cfg.needs();
            match placement::best(&loads, &needs, &Policy::default()) {
                Some(h) => h,
                None => {
                    bail!("no host can run {name} now (csvctl vm place {name} says why)")
                }
            }
        }
    };
    cfg.state = Wanted::Running;
    cfg.state_since = Some(now_ms());
    put_role(&mut c, name, host, &cfg)?;
    println!("VM {name} placed on host {host}; its csvd starts it (csvctl vm status {name})");
    Ok(ExitCode::SUCCESS)
}

/// `csvctl vm status`.
fn status(access: &Access, name: &str, json: bool) -> Result<ExitCode> {
    let (_, info) = registry(access)?;
    let role = find(&info, name)?;
    let cfg = config_of(&role)?;
    let me = access.identity()?;
    // Every host's view (a VM that is stopping is still on its old host).
    // The role's engine, else the hosts' setting (csv-vmm unless changed).
    let engine = cfg.engine.unwrap_or_default().label();
    let mut seen = Vec::new();
    for n in &info.nodes {
        let st = client::host_status(&me, n);
        if let Some(st) = st {
            for v in st.vms.into_iter().filter(|v| v.name == name) {
                seen.push((n.id, v));
            }
        }
    }
    if json {
        let hosts: Vec<_> = seen
            .iter()
            .map(|(h, v)| {
                serde_json::json!({
                    "host": h, "engine": engine, "pid": v.pid, "state": v.state().label(),
                    "heartbeat_seq": v.heartbeat_seq, "heartbeats": v.heartbeats,
                    "disk_writes": v.disk_writes, "error": v.error,
                    "heartbeat_gaps": v.heartbeat_gaps, "guest_errors": v.guest_errors,
                    "disk_last_seq": v.disk_last_seq,
                    "listen": v.listen,
                })
            })
            .collect();
        let v =
            serde_json::json!({"name": name, "host": role.node, "config": cfg, "runtime": hosts});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "VM {name}: {} on host {}; {} vCPU(s), {}, disk {}",
        cfg.state,
        if role.node == 0 {
            "-".to_string()
        } else {
            role.node.to_string()
        },
        cfg.vcpus,
        vhd::size::human(cfg.memory),
        cfg.disk
    );
    if seen.is_empty() {
        println!("no host runs it");
    }
    for (h, v) in seen {
        println!(
            "host {h}: {engine} pid {} {}; heartbeat {} ({} seen here), {} disk writes{}{}",
            v.pid,
            v.state().label(),
            v.heartbeat_seq,
            v.heartbeats,
            v.disk_writes,
            if v.migration.is_empty() {
                String::new()
            } else {
                format!("; migrating to host {}: {}", v.migrating_to, v.migration)
            },
            if v.error.is_empty() {
                String::new()
            } else {
                format!("; error: {}", v.error)
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `csvctl vm console`.
fn migrate(access: &Access, name: &str, to: u64, quick: bool, timeout_s: u64) -> Result<ExitCode> {
    let (mut c, info) = registry(access)?;
    let role = find(&info, name)?;
    let mut cfg = config_of(&role)?;
    if cfg.state != Wanted::Running || role.node == 0 {
        bail!("VM {name} is not running (csvctl vm start {name})");
    }
    if role.node == to {
        bail!("VM {name} runs on host {to} already");
    }
    if !info.nodes.iter().any(|n| n.id == to) {
        bail!("--to {to}: no such host");
    }
    if let Some(t) = cfg.migrate_to {
        bail!("VM {name} is migrating to host {t} already");
    }
    let from = role.node;
    cfg.migrate_to = Some(to);
    cfg.migrate_quick = quick;
    cfg.last_migration = None;
    put_role(&mut c, name, from, &cfg)?;
    eprintln!("VM {name}: host {to} prepares to receive it, host {from} sends it");
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout_s);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let info = c.cluster_info().map_err(cerr)?;
        let role = find(&info, name)?;
        let cfg = config_of(&role)?;
        if cfg.migrate_to.is_none() {
            let outcome = cfg.last_migration.unwrap_or_default();
            if role.node != to {
                bail!("VM {name} stays on host {}: {outcome}", role.node);
            }
            let s: serde_json::Value = serde_json::from_str(&outcome).unwrap_or_default();
            if quick {
                println!(
                    "VM {name} moved from host {from} to host {to} by save and restore: saved {} in {:.0} ms",
                    vhd::size::human(s["bytes"].as_u64().unwrap_or(0)),
                    s["total_ms"].as_f64().unwrap_or(0.0)
                );
                return Ok(ExitCode::SUCCESS);
            }
            let switch = match s["switchover_ms"].as_f64() {
                Some(ms) if ms > 0.0 => format!(" (of which {ms:.1} ms for the disk's hand-over)"),
                _ => String::new(),
            };
            println!(
                "VM {name} moved from host {from} to host {to}: downtime {:.1} ms{switch}, total {:.0} ms, {} rounds, {}",
                s["downtime_ms"].as_f64().unwrap_or(0.0),
                s["total_ms"].as_f64().unwrap_or(0.0),
                s["rounds"],
                vhd::size::human(s["bytes"].as_u64().unwrap_or(0))
            );
            return Ok(ExitCode::SUCCESS);
        }
        if std::time::Instant::now() > deadline {
            bail!("VM {name} has not moved after {timeout_s} s (csvctl vm status {name}); the request stays in the registry");
        }
    }
}

/// `csvctl node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Maintenance: no VM is placed on HOST any more, and every VM running
    /// there live-migrates to its best-rated other host, high priority
    /// first (Suspend-ClusterNode -Drain).
    Drain {
        #[command(flatten)]
        access: Access,
        host: u64,
        /// Give up on one VM after this many seconds (it stays).
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// End maintenance: HOST takes VMs again (Resume-ClusterNode).
    Resume {
        #[command(flatten)]
        access: Access,
        host: u64,
    },
    /// Join this host to a cluster with a join token (from `csvctl cluster
    /// init` or `csvctl cluster token`): the cluster gives it an id and its
    /// key; its csvd settings file is written (and csvd started with
    /// --start). It becomes a voter of every group once caught up.
    Join {
        /// The join token; `-` reads it from standard input, and without it
        /// it comes from CSV_JOIN_TOKEN (either keeps it out of process
        /// lists and shell history).
        #[arg(env = "CSV_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Where to write the cluster key.
        #[arg(long, default_value = "/etc/csv/cluster.key")]
        key_file: std::path::PathBuf,
        #[command(flatten)]
        host: crate::setup_cmd::HostSettings,
        /// Start csvd with the new settings (detached; it logs to
        /// DATA_DIR/csvd.log). Without it, start csvd yourself (systemd).
        #[arg(long)]
        start: bool,
    },
    /// Evict HOST (Remove-ClusterNode): refused while VM roles run there;
    /// groups it leads move first; it leaves every group and its id is
    /// never reused. Stop its csvd afterwards.
    Remove {
        #[command(flatten)]
        access: Access,
        host: u64,
    },
}

pub fn run_node(c: NodeCommand) -> Result<ExitCode> {
    match c {
        NodeCommand::Join {
            token,
            key_file,
            host,
            start,
        } => crate::setup_cmd::join(&token, &key_file, host, start),
        NodeCommand::Remove { access, host } => crate::setup_cmd::remove(&access, host),
        NodeCommand::Resume { access, host } => {
            let mut c = access.client()?;
            c.set_draining(host, false).map_err(cerr)?;
            println!("host {host} takes VMs again");
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Drain {
            access,
            host,
            timeout_s,
        } => {
            let mut c = access.client()?;
            c.set_draining(host, true).map_err(cerr)?;
            let info = c.cluster_info().map_err(cerr)?;
            let mut here: Vec<(proto::VmRole, VmConfig)> = info
                .vms
                .iter()
                .filter(|r| r.node == host)
                .filter_map(|r| config_of(r).ok().map(|c| (r.clone(), c)))
                .filter(|(_, c)| c.state == Wanted::Running)
                .collect();
            here.sort_by_key(|(r, c)| (c.priority_rank(), r.name.clone()));
            println!("host {host} drains: {} VM(s) to move", here.len());
            let mut failed = 0;
            for (role, cfg) in here {
                let info = c.cluster_info().map_err(cerr)?;
                let loads = host_loads(&access, &info, cfg.volume)?;
                let needs = cfg.needs();
                let Some(to) = placement::best(&loads, &needs, &Policy::default()) else {
                    eprintln!("VM {}: no other host can run it; it stays", role.name);
                    failed += 1;
                    continue;
                };
                if let Err(e) = migrate(&access, &role.name, to, false, timeout_s) {
                    eprintln!("VM {}: {e:#}", role.name);
                    failed += 1;
                }
            }
            if failed > 0 {
                eprintln!("host {host} is draining, but {failed} VM(s) still run there");
                return Ok(ExitCode::from(1));
            }
            println!("host {host} is empty and in maintenance (csvctl node resume {host} ends it)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Every host's load as the hosts report it, with the vCPUs of the roles
/// running there and the free space of `volume`.
fn host_loads(access: &Access, info: &proto::ClusterInfo, volume: u64) -> Result<Vec<HostLoad>> {
    let me = access.identity()?;
    let mut c = access.client()?;
    placement::cluster_loads(&me, &mut c, info, volume).map_err(cerr)
}

fn place(access: &Access, name: &str, json: bool) -> Result<ExitCode> {
    let (_, info) = registry(access)?;
    let role = find(&info, name)?;
    let cfg = config_of(&role)?;
    let loads = host_loads(access, &info, cfg.volume)?;
    let needs = cfg.needs();
    let policy = Policy::default();
    let ratings = placement::rate(&loads, &needs, &policy);
    if json {
        let v: Vec<_> = ratings
            .iter()
            .map(|r| {
                serde_json::json!({
                    "host": r.node, "rating": r.rating, "stars": r.stars,
                    "free_cpu": r.free_cpu, "free_mem": r.free_mem,
                    "free_disk": r.free_disk, "free_net": r.free_net,
                    "preferred": r.preferred, "reason": r.reason,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "VM {name}: {} vCPU(s), {}, disk on Volume{}; weights CPU {} memory {} disk {} network {}; memory reserve {}, {} vCPUs per core, {:.0} % of the volume kept free",
        cfg.vcpus,
        vhd::size::human(cfg.memory),
        cfg.volume,
        policy.w_cpu,
        policy.w_mem,
        policy.w_disk,
        policy.w_net,
        vhd::size::human(policy.mem_reserve),
        policy.max_vcpus_per_core,
        policy.disk_reserve * 100.0
    );
    println!(
        "{:<6} {:<7} {:>6} {:>5} {:>5} {:>5} {:>5}  WHY",
        "HOST", "STARS", "RATING", "CPU", "MEM", "DISK", "NET"
    );
    for r in &ratings {
        println!(
            "{:<6} {} {:>6.2} {:>4.0}% {:>4.0}% {:>4.0}% {:>4.0}%  {}{}",
            r.node,
            placement::stars(r.stars),
            r.rating,
            r.free_cpu * 100.0,
            r.free_mem * 100.0,
            r.free_disk * 100.0,
            r.free_net * 100.0,
            if r.preferred { "preferred; " } else { "" },
            r.reason
        );
    }
    match ratings.iter().find(|r| r.rating > 0.0) {
        Some(b) => println!("best host: {}", b.node),
        None => println!("no host can run {name} now"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_volumes_from_paths() {
        assert!(valid_name("web-01.prod"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name(&"a".repeat(64)));
        assert_eq!(volume_of("/ClusterStorage/Volume3/vm.vhd"), Some(3));
        assert_eq!(
            volume_of("/tmp/csv-up/node1/ClusterStorage/Volume12/a/b.vhd"),
            Some(12)
        );
        assert_eq!(volume_of("/srv/vm.vhd"), None);
    }
}
