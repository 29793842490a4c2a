//! `csvd`: the csv node daemon.
//!
//! Today it runs this host's coordinator service (its replicas of the
//! cluster group and of every volume's group, and the RPC service); the
//! SAN paths and the `/ClusterStorage` mounts join it as they are built.

use clap::Parser;
use coordinator::group::Timing;
use coordinator::node::{Config, Node};
use coordinator::wire::{Identity, Key};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Run a csv cluster host.
///
/// A cluster starts with its founding hosts, each started with `--init` and
/// the same `--peer` list (every founder, itself included). A host added
/// later starts without `--init`, knowing at least one founder, and waits
/// until `csvctl cluster add-node` makes it a member: it then becomes a
/// learner of every Raft group and a voter once it has caught up.
///
/// Example, three hosts on one machine:
///
///   csvctl cluster init --name lab --key-file /etc/csv/cluster.key
///   csvd --id 1 --data-dir /var/lib/csv/1 --listen 127.0.0.1:7101 \
///        --peer 1=127.0.0.1:7101 --peer 2=127.0.0.1:7102 --peer 3=127.0.0.1:7103 \
///        --cluster lab --key-file /etc/csv/cluster.key --init
#[derive(Parser, Debug)]
#[command(name = "csvd", version, verbatim_doc_comment)]
struct Cli {
    /// This host's node id (a positive number, unique in the cluster).
    #[arg(long)]
    id: u64,
    /// Directory for this host's Raft logs and snapshots (local disk).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Address to serve on; repeat for each cluster network.
    #[arg(long, value_name = "IP:PORT", required = true)]
    listen: Vec<SocketAddr>,
    /// A host and its addresses, preferred network first:
    /// `ID=HOST:PORT[,HOST:PORT...]`. Repeat for each host.
    #[arg(long, value_name = "ID=ADDRS", value_parser = parse_peer)]
    peer: Vec<(u64, Vec<String>)>,
    /// The cluster's name (connections from another cluster are refused).
    #[arg(long, default_value = "csv")]
    cluster: String,
    /// The cluster key file made by `csvctl cluster init`.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// Found the cluster with the `--peer` hosts as voters (ignored once
    /// this host has state in --data-dir).
    #[arg(long)]
    init: bool,
    /// Raft tick in milliseconds (elections take 10-20 ticks).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=1000))]
    tick_ms: u64,
    /// Applied entries between snapshots of a group.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(16..))]
    snapshot_every: u64,
}

fn parse_peer(s: &str) -> Result<(u64, Vec<String>), String> {
    let (id, addrs) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT[,HOST:PORT...]"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("{id:?} is not a node id (a positive number)"))?;
    if id == 0 {
        return Err("node id 0 is reserved".into());
    }
    let addrs: Vec<String> = addrs
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    for a in &addrs {
        if !a.contains(':') {
            return Err(format!("{a:?} has no port (HOST:PORT)"));
        }
    }
    if addrs.is_empty() {
        return Err(format!("host {id} has no address"));
    }
    Ok((id, addrs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let key = match Key::load(&cli.key_file) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("csvd: {e}");
            return ExitCode::from(2);
        }
    };
    let mut peers: BTreeMap<u64, Vec<String>> = cli.peer.into_iter().collect();
    peers
        .entry(cli.id)
        .or_insert_with(|| cli.listen.iter().map(|a| a.to_string()).collect());
    let cfg = Config {
        identity: Identity {
            node: cli.id,
            cluster: cli.cluster,
            key,
        },
        data_dir: cli.data_dir,
        listen: cli.listen,
        peers,
        init: cli.init,
        timing: Timing {
            tick: Duration::from_millis(cli.tick_ms),
            snapshot_every: cli.snapshot_every,
            ..Timing::default()
        },
    };
    match Node::start(cfg) {
        Ok(node) => {
            let addrs: Vec<String> = node.bound.iter().map(|a| a.to_string()).collect();
            println!("csvd: host {} serving on {}", cli.id, addrs.join(", "));
            node.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("csvd: {e}");
            ExitCode::from(1)
        }
    }
}
