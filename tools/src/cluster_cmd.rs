//! `csvctl cluster` and `csvctl volume`: the cluster's membership, its
//! volumes and their coordinators, through the coordinator service.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use coordinator::client::{self, Client};
use coordinator::proto;
use coordinator::proto::Label as _;
use coordinator::wire::{Identity, Key};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How to reach the cluster.
#[derive(Debug, Clone, Args)]
pub struct Access {
    /// A host's address (HOST:PORT); repeat, or comma-separate, for several.
    #[arg(long = "endpoint", env = "CSV_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// The cluster key file.
    #[arg(long, env = "CSV_KEY_FILE", default_value = "/etc/csv/cluster.key")]
    key_file: PathBuf,
    /// The cluster's name.
    #[arg(long = "cluster-name", env = "CSV_CLUSTER", default_value = "csv")]
    cluster: String,
}

impl Access {
    pub(crate) fn identity(&self) -> Result<Identity> {
        let key = Key::load(&self.key_file).map_err(anyhow::Error::msg)?;
        Ok(Identity {
            node: 0,
            cluster: self.cluster.clone(),
            key,
        })
    }

    pub(crate) fn addrs(&self) -> Result<Vec<SocketAddr>> {
        if self.endpoints.is_empty() {
            bail!("no endpoint given: pass --endpoint HOST:PORT (or set CSV_ENDPOINTS)");
        }
        let mut out = Vec::new();
        for e in &self.endpoints {
            let a = e
                .to_socket_addrs()
                .with_context(|| format!("endpoint {e:?} (expected HOST:PORT)"))?;
            out.extend(a);
        }
        Ok(out)
    }

    /// The endpoints as given.
    pub(crate) fn endpoint_texts(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    pub(crate) fn client(&self) -> Result<Client> {
        Ok(Client::new(self.identity()?, self.addrs()?))
    }

    /// This csvctl, run again with the same cluster access.
    pub(crate) fn csvctl(&self) -> Result<std::process::Command> {
        let mut c =
            std::process::Command::new(std::env::current_exe().context("where is this csvctl?")?);
        c.env("CSV_ENDPOINTS", self.endpoints.join(","))
            .env("CSV_KEY_FILE", &self.key_file)
            .env("CSV_CLUSTER", &self.cluster);
        Ok(c)
    }
}

/// `csvctl cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a new cluster key (give the file to every host and operator).
    ///
    /// With --listen, this host founds the cluster: its csvd settings file
    /// is written too (host 1), and a join token is printed for the others
    /// (`csvctl node join TOKEN`).
    Init {
        /// Where to write the key (mode 0600; an existing file is kept).
        #[arg(long, default_value = "/etc/csv/cluster.key")]
        key_file: PathBuf,
        /// The cluster's name (connections from another cluster are
        /// refused; keep it short).
        #[arg(long, default_value = "csv")]
        name: String,
        /// How long the printed join token admits hosts.
        #[arg(long, default_value = "24h", value_parser = crate::when::parse_age)]
        token_ttl: Duration,
        #[command(flatten)]
        host: Option<crate::setup_cmd::HostSettings>,
    },
    /// Print the operator token that authorizes actions in the web console
    /// (csvd --console-actions): `Authorization: Bearer TOKEN`.
    ConsoleToken {
        #[command(flatten)]
        access: Access,
    },
    /// Print a join token: a further host redeems it with `csvctl node
    /// join TOKEN` to get the cluster key and an id. Anyone holding it can
    /// join a host until it expires: hand it over like a password.
    Token {
        #[command(flatten)]
        access: Access,
        /// How long it admits hosts.
        #[arg(long, default_value = "24h", value_parser = crate::when::parse_age)]
        ttl: Duration,
    },
    /// Show every host's Raft groups: role, term, leader, commit and
    /// applied index, and on leaders the lag of each follower.
    Status {
        #[command(flatten)]
        access: Access,
        /// Print Prometheus text-format metrics instead of a table.
        #[arg(long)]
        prometheus: bool,
    },
    /// List the hosts: id, addresses, and whether the cluster leader hears
    /// from them.
    Nodes {
        #[command(flatten)]
        access: Access,
    },
    /// Add a host: it becomes a learner of every group, then a voter once
    /// caught up. Start its `csvd` (without --init) first.
    AddNode {
        #[command(flatten)]
        access: Access,
        /// Its node id.
        #[arg(long)]
        id: u64,
        /// Its addresses, preferred network first (repeat).
        #[arg(long = "addr", required = true)]
        addrs: Vec<String>,
    },
}

/// `csvctl volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Format a LUN as VolumeN and add it to the cluster: every host mounts
    /// it under its mount root (its Raft group starts on the cluster's
    /// voters).
    Add {
        #[command(flatten)]
        access: Access,
        /// The LUN: an iscsi://portal/target-iqn/lun URL (each host logs in
        /// with its own initiator), or a file or block device every host
        /// reaches at this path (or at its own: `csvd --lun N=PATH`).
        lun: String,
        /// N in /ClusterStorage/VolumeN (default: the next free number).
        #[arg(long)]
        number: Option<u64>,
        /// Size of the LUN; a file that does not exist is created (sparse)
        /// with this size. Default: the LUN's current size.
        #[arg(long, value_parser = vhd::size::parse_positive)]
        size: Option<u64>,
        /// Format a LUN that already holds a csv volume (its data is lost),
        /// and on an iSCSI LUN clear the persistent reservations other
        /// hosts left on it (their writes are refused from then on).
        #[arg(long)]
        force: bool,
    },
    /// Remove VolumeN from the cluster (refused while any file on it is
    /// open somewhere). Hosts unmount it; the LUN keeps its data.
    Remove {
        #[command(flatten)]
        access: Access,
        /// N in /ClusterStorage/VolumeN.
        number: u64,
    },
    /// Send a host's I/O to VolumeN through a peer that reaches the LUN
    /// directly (`on`), or back over its own path (`off`): for maintenance
    /// of a host's SAN path. `volume status` shows it as BlockRedirected;
    /// with `--mode filesystem`, FileSystemRedirected: the coordinator does
    /// the host's file I/O itself (its leases, maps and path), within a
    /// second; files open before keep their path until closed.
    Redirect {
        #[command(flatten)]
        access: Access,
        /// N in /ClusterStorage/VolumeN.
        number: u64,
        /// The host whose I/O is redirected.
        #[arg(long)]
        node: u64,
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// `block` (BlockRedirected: block I/O through any peer with a
        /// path) or `filesystem` (FileSystemRedirected: file I/O done by
        /// the coordinator).
        #[arg(long, default_value = "block", value_parser = ["block", "filesystem"])]
        mode: String,
    },
    /// How each host reaches each volume: Direct, BlockRedirected,
    /// FileSystemRedirected or Unmounted, and why (like
    /// Get-ClusterSharedVolumeState).
    Status {
        #[command(flatten)]
        access: Access,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The write-lease history of a file on VolumeN (or of every file):
    /// which host could write its blocks when, granted, handed over at a
    /// migration, released, revoked when a host was fenced, or expired.
    /// Ends with a check that no two hosts ever held it at once (exit
    /// status 1 if they did). The volume keeps the last 4096 changes.
    Leases {
        #[command(flatten)]
        access: Access,
        /// N in /ClusterStorage/VolumeN.
        number: u64,
        /// The file, relative to the volume's root (e.g. vms/web1.vhd);
        /// every file if absent.
        path: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check VolumeN's metadata for consistency (like fsck, on the live
    /// volume, by its coordinator): every LUN byte belongs to exactly one
    /// file, the free space or quarantine; directories and link counts
    /// agree. Exit status 1 if a problem is found.
    Check {
        #[command(flatten)]
        access: Access,
        /// N in /ClusterStorage/VolumeN.
        number: u64,
    },
    /// List the volumes.
    List {
        #[command(flatten)]
        access: Access,
    },
    /// Move VolumeN's coordinator to another host (a Raft leader transfer).
    Move {
        #[command(flatten)]
        access: Access,
        /// N in /ClusterStorage/VolumeN.
        number: u64,
        /// The host to move it to.
        #[arg(long)]
        to: u64,
    },
}

/// Runs a `cluster` command.
pub fn run_cluster(c: ClusterCommand) -> Result<ExitCode> {
    match c {
        ClusterCommand::Init {
            key_file,
            name,
            token_ttl,
            host,
        } => crate::setup_cmd::init(key_file, name, host, token_ttl),
        ClusterCommand::Token { access, ttl } => crate::setup_cmd::token(&access, ttl),
        ClusterCommand::ConsoleToken { access } => {
            println!("{}", csvd::console::action_token(&access.identity()?));
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Status { access, prometheus } => status(&access, prometheus),
        ClusterCommand::Nodes { access } => {
            let info = access
                .client()?
                .cluster_info()
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            println!("{:<6} {:<6} {:<22} ADDRESSES", "HOST", "STATE", "SINCE");
            for n in &info.nodes {
                let h = info.health.iter().find(|h| h.node == n.id);
                let (state, since) = match h {
                    Some(h) => (
                        if h.up { "up" } else { "down" },
                        crate::vhd_cmd::iso8601(h.since / 1000),
                    ),
                    None => ("up", "-".to_string()),
                };
                println!(
                    "{:<6} {:<6} {:<22} {}",
                    n.id,
                    state,
                    since,
                    n.addrs.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::AddNode { access, id, addrs } => {
            access
                .client()?
                .add_node(id, addrs)
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            println!(
                "host {id} added; it joins every group as a learner and is promoted once caught up"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("sync {}", path.display()))?;
    Ok(())
}

use coordinator::metrics::group_name;

fn status(access: &Access, prometheus: bool) -> Result<ExitCode> {
    let me = access.identity()?;
    let mut failed = false;
    let mut all = Vec::new();
    for a in access.addrs()? {
        match client::node_status(&me, a, Duration::from_secs(2)) {
            Ok(s) => all.push((a, s)),
            Err(e) => {
                failed = true;
                eprintln!("{a}: {}", client::describe(&e));
            }
        }
    }
    if prometheus {
        let only: Vec<proto::NodeStatus> = all.iter().map(|(_, s)| s.clone()).collect();
        print!("{}", coordinator::metrics::prometheus_text(&only));
    } else {
        println!(
            "{:<6} {:<10} {:<13} {:>6} {:>7} {:>9} {:>9} {:>9}  MEMBERS / LAG",
            "HOST", "GROUP", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "SNAPSHOT"
        );
        for (_, s) in &all {
            for g in &s.groups {
                let members = if g.followers.is_empty() {
                    format!(
                        "voters {:?}{}",
                        g.voters,
                        if g.learners.is_empty() {
                            String::new()
                        } else {
                            format!(" learners {:?}", g.learners)
                        }
                    )
                } else {
                    g.followers
                        .iter()
                        .map(|f| format!("{}:{}({})", f.node, f.lag, f.state().label()))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                println!(
                    "{:<6} {:<10} {:<13} {:>6} {:>7} {:>9} {:>9} {:>9}  {}",
                    s.node,
                    group_name(g.group),
                    g.role().label(),
                    g.term,
                    g.leader,
                    g.commit,
                    g.applied,
                    g.snapshot_index,
                    members
                );
            }
        }
    }
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Formats `lun` as VolumeN: creates a missing file of `size`, refuses
/// a LUN that already holds a volume unless `force`, writes the superblock.
pub(crate) fn format_lun(
    lun: &std::path::Path,
    number: u64,
    size: Option<u64>,
    force: bool,
) -> Result<(PathBuf, csv_fs::superblock::Superblock)> {
    use csv_fs::superblock::{Superblock, DEFAULT_DATA_START};
    use vhd::BlockIo;
    if !lun.exists() {
        let Some(size) = size else {
            bail!("{} does not exist; give --size to create it", lun.display());
        };
        let f = std::fs::File::create(lun).with_context(|| format!("create {}", lun.display()))?;
        f.set_len(size)
            .with_context(|| format!("size {}", lun.display()))?;
    }
    let lun = std::fs::canonicalize(lun).with_context(|| format!("{}", lun.display()))?;
    let dev =
        vhd::io::DirectFile::open(&lun, true).with_context(|| format!("open {}", lun.display()))?;
    let mut len = dev
        .len()
        .with_context(|| format!("size of {}", lun.display()))?;
    if len == 0 {
        // A block device: its size comes from seeking to the end.
        use std::io::Seek;
        len = dev
            .file()
            .try_clone()?
            .seek(std::io::SeekFrom::End(0))
            .with_context(|| format!("size of {}", lun.display()))?;
    }
    if let Some(s) = size {
        if s > len {
            bail!(
                "{} is {} bytes, smaller than --size {s}",
                lun.display(),
                len
            );
        }
        len = s;
    }
    if len < 64 << 20 {
        bail!(
            "{} is {} bytes; a volume needs at least 64 MiB",
            lun.display(),
            len
        );
    }
    match Superblock::read(&dev) {
        Ok(old) if !force => bail!(
            "{} already holds Volume{} (id {}); pass --force to format it again (its data is lost)",
            lun.display(),
            old.number,
            old.id_hex()
        ),
        _ => {}
    }
    let mut id = [0u8; 16];
    coordinator::wire::random(&mut id).context("random volume id")?;
    let sb = Superblock {
        number,
        id,
        capacity: len,
        data_start: DEFAULT_DATA_START,
    };
    sb.write(&dev)
        .with_context(|| format!("write the superblock of {}", lun.display()))?;
    Ok((lun, sb))
}

/// Formats the iSCSI LUN at `url` as VolumeN, logged in as this command
/// (initiator `iqn.2026-11.io.csv:<hostname>-csvctl`; CHAP user and secret
/// from CSV_CHAP_USER and CSV_CHAP_SECRET when the target wants them).
fn format_iscsi(
    url: &str,
    number: u64,
    force: bool,
) -> Result<(String, csv_fs::superblock::Superblock)> {
    use csv_fs::superblock::{Superblock, DEFAULT_DATA_START};
    use vhd::BlockIo;
    let initiator =
        csv_fs::lun::san::SanIdentity::default_initiator(0).replace("-node0", "-csvctl");
    let chap = match (
        std::env::var("CSV_CHAP_USER"),
        std::env::var("CSV_CHAP_SECRET"),
    ) {
        (Ok(user), Ok(secret)) => Some(iscsi_initiator::Chap { user, secret }),
        _ => None,
    };
    let who = csv_fs::lun::san::SanIdentity {
        initiator,
        chap,
        node: 0,
    };
    let path = csv_fs::lun::san::open(url, &who, number).map_err(anyhow::Error::msg)?;
    let len = path.lun.len()?;
    if len < 64 << 20 {
        bail!("{url} is {len} bytes; a volume needs at least 64 MiB");
    }
    if let Ok(old) = Superblock::read(path.lun.as_ref()) {
        if !force {
            bail!(
                "{url} already holds Volume{} (id {}); pass --force to format it again (its data is lost)",
                old.number,
                old.id_hex()
            );
        }
    }
    // Reservations left by another cluster (or hosts still using the LUN)
    // would refuse this tool's writes and, worse, let those registrants
    // keep writing to the new volume. A target that cannot report them
    // has none to clear.
    if let Ok((held, keys)) = csv_fs::lun::san::pr_state(&path.lun) {
        if held.is_some() || !keys.is_empty() {
            let holder = match held {
                Some((k, t)) => format!("reserved (type {t}) by key {k:#x}, "),
                None => String::new(),
            };
            let what = format!(
                "{holder}{} registered key(s): {}",
                keys.len(),
                keys.iter()
                    .map(|k| format!("{k:#x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if !force {
                bail!(
                    "{url} has persistent reservations ({what}): another cluster or host may be using it; \
                     pass --force to clear them and format it (its data is lost)"
                );
            }
            csv_fs::lun::san::pr_clear(&path.lun, csv_fs::lun::san::pr_key(0))
                .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
            eprintln!("{url}: cleared its persistent reservations ({what})");
        }
    }
    let mut id = [0u8; 16];
    coordinator::wire::random(&mut id).context("random volume id")?;
    let sb = Superblock {
        number,
        id,
        capacity: len,
        data_start: DEFAULT_DATA_START,
    };
    sb.write(path.lun.as_ref())
        .with_context(|| format!("write the superblock of {url}"))?;
    Ok((url.to_string(), sb))
}

fn volume_status(access: &Access, json: bool) -> Result<ExitCode> {
    let me = access.identity()?;
    let mut rows = Vec::new();
    let mut failed = false;
    for a in access.addrs()? {
        match client::node_status(&me, a, Duration::from_secs(2)) {
            Ok(s) => {
                for v in s.volumes {
                    rows.push((s.node, v));
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("{a}: {}", client::describe(&e));
            }
        }
    }
    rows.sort_by_key(|(n, v)| (v.number, *n));
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, v)| {
                serde_json::json!({
                    "host": n, "volume": format!("Volume{}", v.number),
                    "state": v.state().label(), "reason": v.reason, "mountpoint": v.mountpoint,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        println!(
            "{:<10} {:<6} {:<22} {:<40} REASON",
            "VOLUME", "HOST", "STATE", "MOUNTPOINT"
        );
        for (n, v) in &rows {
            println!(
                "{:<10} {:<6} {:<22} {:<40} {}",
                format!("Volume{}", v.number),
                n,
                v.state().label(),
                v.mountpoint,
                v.reason
            );
        }
    }
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
pub(crate) fn utc_ms(ms: u64) -> String {
    let (y, m, d, hh, mm, ss) = coordinator::group::utc(ms);
    format!(
        "{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}.{:03}",
        ms % 1000
    )
}

/// The inode of `path` (relative to the volume's root) on VolumeN.
fn resolve_path(c: &mut Client, number: u64, path: &str) -> Result<u64> {
    let mut ino = coordinator::meta::ROOT;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        ino = c
            .lookup(number, ino, part)
            .map_err(|e| anyhow::anyhow!("{path} on Volume{number}: {}", client::describe(&e)))?
            .ino;
    }
    Ok(ino)
}

fn volume_leases(access: &Access, number: u64, path: Option<&str>, json: bool) -> Result<ExitCode> {
    let mut c = access.client()?;
    let ino = match path {
        Some(p) => resolve_path(&mut c, number, p)?,
        None => 0,
    };
    let events = c
        .lease_history(number, ino)
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
    let parsed: Vec<coordinator::meta::LeaseEvent> = events
        .iter()
        .filter_map(coordinator::codec::lease_event_from_proto)
        .collect();
    let verdict = coordinator::meta::check_lease_history(&parsed);
    if json {
        let list: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "at_ms": e.at, "ino": e.ino, "host": e.node, "epoch": e.epoch,
                    "change": e.change().label(), "peer": e.peer,
                })
            })
            .collect();
        let out = serde_json::json!({
            "volume": number,
            "ino": ino,
            "events": list,
            "single_writer": verdict.is_ok(),
            "problem": verdict.as_ref().err().map(|e| e.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<24} {:<8} {:<6} {:<7} CHANGE",
            "TIME (UTC)", "INODE", "HOST", "EPOCH"
        );
        for e in &events {
            let peer = match e.change() {
                proto::LeaseChange::HandedIn => format!(" from host {}", e.peer),
                proto::LeaseChange::HandedOff => format!(" to host {}", e.peer),
                _ => String::new(),
            };
            println!(
                "{:<24} {:<8} {:<6} {:<7} {}{peer}",
                utc_ms(e.at),
                e.ino,
                e.node,
                e.epoch,
                e.change().label()
            );
        }
        match &verdict {
            Ok(()) => println!(
                "{} change(s); no two hosts ever held a write lease on the same file at once",
                events.len()
            ),
            Err(p) => println!("VIOLATION: {p}"),
        }
    }
    Ok(if verdict.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs a `volume` command.
pub fn run_volume(c: VolumeCommand) -> Result<ExitCode> {
    match c {
        VolumeCommand::Add {
            access,
            lun,
            number,
            size,
            force,
        } => {
            let mut c = access.client()?;
            let info = c
                .cluster_info()
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            let number = number
                .unwrap_or_else(|| info.volumes.iter().map(|v| v.number).max().unwrap_or(0) + 1);
            if info.volumes.iter().any(|v| v.number == number) {
                bail!("Volume{number} exists");
            }
            let (lun, sb) = if lun.starts_with("iscsi://") {
                format_iscsi(&lun, number, force)?
            } else {
                let (p, sb) = format_lun(std::path::Path::new(&lun), number, size, force)?;
                (p.display().to_string(), sb)
            };
            c.add_volume(proto::VolumeInfo {
                number,
                lun: lun.clone(),
                data_start: sb.data_start,
                capacity: sb.capacity,
                voters: vec![],
                now: 0,
            })
            .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            println!(
                "Volume{number} created on {} ({}, id {}); every host mounts it as VolumeN under its mount root",
                lun,
                vhd::size::human(sb.capacity),
                sb.id_hex()
            );
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Remove { access, number } => {
            let mut c = access.client()?;
            let u = c
                .usage(number)
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            if u.leases > 0 {
                bail!(
                    "Volume{number} has {} open file(s) on the cluster's hosts; close them (stop the VMs) first",
                    u.leases
                );
            }
            c.remove_volume(number)
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            println!("Volume{number} removed; hosts unmount it (the LUN keeps its data)");
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Status { access, json } => volume_status(&access, json),
        VolumeCommand::Leases {
            access,
            number,
            path,
            json,
        } => volume_leases(&access, number, path.as_deref(), json),
        VolumeCommand::Redirect {
            access,
            number,
            node,
            state,
            mode,
        } => {
            let fs_mode = mode == "filesystem";
            let info = access
                .client()?
                .cluster_info()
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            let host = info
                .nodes
                .iter()
                .find(|n| n.id == node)
                .with_context(|| format!("no host {node} in the cluster"))?;
            let on = state == "on";
            let me = access.identity()?;
            let mut last = String::from("no address");
            for a in coordinator::node::resolve(&host.addrs) {
                match client::redirect(
                    &me,
                    a,
                    number,
                    on,
                    if fs_mode {
                        proto::RedirectMode::FileSystem
                    } else {
                        proto::RedirectMode::Block
                    },
                    Duration::from_secs(5),
                ) {
                    Ok(()) => {
                        println!(
                            "host {node}: Volume{number} {}",
                            match (on, fs_mode) {
                                (true, false) => "I/O now goes through a peer (BlockRedirected)",
                                (true, true) => "file I/O now done by the coordinator (FileSystemRedirected)",
                                (false, false) => "back on its own path (Direct)",
                                (false, true) => "file I/O back on this host (files open through the coordinator stay so until closed)",
                            }
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    Err(e) => last = client::describe(&e),
                }
            }
            bail!("host {node}: {last}")
        }
        VolumeCommand::Check { access, number } => {
            let problems = access
                .client()?
                .check_volume(number)
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            if problems.is_empty() {
                println!("Volume{number}: consistent");
                return Ok(ExitCode::SUCCESS);
            }
            for p in &problems {
                println!("Volume{number}: {p}");
            }
            println!("Volume{number}: {} problem(s)", problems.len());
            Ok(ExitCode::from(1))
        }
        VolumeCommand::List { access } => {
            let info = access
                .client()?
                .cluster_info()
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            println!("{:<10} {:>12}  {:<16} LUN", "VOLUME", "SIZE", "REPLICAS");
            for v in info.volumes {
                println!(
                    "{:<10} {:>12}  {:<16} {}",
                    format!("Volume{}", v.number),
                    vhd::size::human(v.capacity),
                    format!("{:?}", v.voters),
                    v.lun
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Move { access, number, to } => {
            let mut c = access.client()?;
            let t = Instant::now();
            c.transfer_leader(number, to)
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            println!(
                "Volume{number}: coordinator is now host {to} ({} ms)",
                t.elapsed().as_millis()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_times_read_as_calendar_dates() {
        assert_eq!(super::utc_ms(0), "1970-01-01 00:00:00.000");
        assert_eq!(super::utc_ms(951_782_400_123), "2000-02-29 00:00:00.123");
        assert_eq!(super::utc_ms(1_795_268_522_000), "2026-11-21 13:42:02.000");
    }
}
