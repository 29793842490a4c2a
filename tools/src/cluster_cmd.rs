//! `csvctl cluster` and `csvctl volume`: the cluster's membership, its
//! volumes and their coordinators, through the coordinator service.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use coordinator::client::{self, Client};
use coordinator::proto;
use coordinator::wire::{Identity, Key};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How to reach the cluster.
#[derive(Debug, Args)]
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
    fn identity(&self) -> Result<Identity> {
        let key = Key::load(&self.key_file).map_err(anyhow::Error::msg)?;
        Ok(Identity {
            node: 0,
            cluster: self.cluster.clone(),
            key,
        })
    }

    fn addrs(&self) -> Result<Vec<SocketAddr>> {
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

    fn client(&self) -> Result<Client> {
        Ok(Client::new(self.identity()?, self.addrs()?))
    }
}

/// `csvctl cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a new cluster key (give the file to every host and operator).
    Init {
        /// Where to write it (mode 0600; an existing file is kept).
        #[arg(long, default_value = "/etc/csv/cluster.key")]
        key_file: PathBuf,
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
    /// Create VolumeN on a LUN (its Raft group starts on the cluster's
    /// voters).
    Add {
        #[command(flatten)]
        access: Access,
        /// N in /ClusterStorage/VolumeN.
        number: u64,
        /// The LUN: an iscsi:// URL or a file path.
        #[arg(long)]
        lun: String,
        /// The LUN's size (e.g. 10G).
        #[arg(long, value_parser = crate::size::parse_size)]
        size: u64,
        /// Bytes reserved at the start of the LUN for the volume's header.
        #[arg(long, default_value = "1M", value_parser = crate::size::parse_size)]
        data_start: u64,
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
        ClusterCommand::Init { key_file } => {
            if key_file.exists() {
                bail!(
                    "{} exists; a cluster keeps its key (remove the file to make a new cluster)",
                    key_file.display()
                );
            }
            if let Some(dir) = key_file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
            let key = Key::generate().context("read random bytes")?;
            write_private(&key_file, &format!("{}\n", key.to_hex()))?;
            println!("cluster key written to {}", key_file.display());
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

fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
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

fn group_name(g: u64) -> String {
    if g == 0 {
        "cluster".into()
    } else {
        format!("Volume{g}")
    }
}

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
        print!("{}", prometheus_text(&all));
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
                        .map(|f| format!("{}:{}({})", f.node, f.lag, f.state))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                println!(
                    "{:<6} {:<10} {:<13} {:>6} {:>7} {:>9} {:>9} {:>9}  {}",
                    s.node,
                    group_name(g.group),
                    g.role,
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

/// The status of every host in Prometheus text format.
pub fn prometheus_text(all: &[(SocketAddr, proto::NodeStatus)]) -> String {
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
        for (_, s) in all {
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
    out.push_str("# HELP csv_raft_follower_lag Entries a follower is behind its leader\n# TYPE csv_raft_follower_lag gauge\n");
    for (_, s) in all {
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
    out
}

/// Runs a `volume` command.
pub fn run_volume(c: VolumeCommand) -> Result<ExitCode> {
    match c {
        VolumeCommand::Add {
            access,
            number,
            lun,
            size,
            data_start,
        } => {
            if data_start >= size {
                bail!("--data-start ({data_start}) must be below --size ({size})");
            }
            access
                .client()?
                .add_volume(proto::VolumeInfo {
                    number,
                    lun,
                    data_start,
                    capacity: size,
                    voters: vec![],
                    now: 0,
                })
                .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
            println!("Volume{number} created");
            Ok(ExitCode::SUCCESS)
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
                    crate::size::human(v.capacity),
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
