//! `csvd`: the csv node daemon.
//!
//! It runs this host's coordinator service (its replicas of the cluster
//! group and of every volume's group, and the RPC service), mounts every
//! volume at `<mount root>/VolumeN` with file data going straight to the
//! LUN, and serves Prometheus metrics. SIGTERM or SIGINT unmounts the
//! volumes and stops it.

use clap::Parser;
use coordinator::group::Timing;
use coordinator::node::{Config, Node};
use coordinator::wire::{Identity, Key};
use csv_fs::config::{parse_id, parse_lun, parse_mem, parse_peer, FileConfig};
use csv_fs::mounts::{MountConfig, Mounts};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Run a csv cluster host.
///
/// A cluster starts with its founding hosts, each started with `--init` and
/// the same `--peer` list (every founder, itself included). A host added
/// later starts without `--init`, knowing at least one founder, and waits
/// until `csvctl cluster add-node` makes it a member: it then becomes a
/// learner of every Raft group and a voter once it has caught up.
///
/// With `--mount-root`, every volume of the cluster is mounted at
/// `<mount root>/VolumeN` as soon as it exists (the LUN is the path the
/// volume was added with, or the one `--lun N=PATH` gives for this host).
///
/// Settings can also come from a TOML file (`--config`); flags win:
///
///   id = 1
///   data_dir = "/var/lib/csv"
///   listen = ["10.0.0.1:7100", "10.1.0.1:7100"]
///   cluster = "prod"
///   key_file = "/etc/csv/cluster.key"
///   mount_root = "/ClusterStorage"
///   console = "127.0.0.1:9477"
///   vm_memory = "16G"
///   snapshot_hooks = "/etc/csv/snapshot-hooks.d"
///   [peers]
///   1 = ["10.0.0.1:7100", "10.1.0.1:7100"]
///   2 = ["10.0.0.2:7100", "10.1.0.2:7100"]
///   [luns]
///   1 = "/dev/disk/by-id/wwn-0x6001405..."
///
/// Example, three hosts on one machine:
///
///   csvctl cluster init --key-file /etc/csv/cluster.key
///   csvd --id 1 --data-dir /var/lib/csv/1 --listen 127.0.0.1:7101 \
///        --peer 1=127.0.0.1:7101 --peer 2=127.0.0.1:7102 --peer 3=127.0.0.1:7103 \
///        --cluster lab --key-file /etc/csv/cluster.key --init --mount-root /tmp/h1
#[derive(Parser, Debug)]
#[command(name = "csvd", version, verbatim_doc_comment)]
struct Cli {
    /// Settings file (TOML, the keys of the long flags).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This host's node id (a positive number, unique in the cluster).
    #[arg(long)]
    id: Option<u64>,
    /// Directory for this host's Raft logs and snapshots (local disk).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address to serve on; repeat for each cluster network.
    #[arg(long, value_name = "IP:PORT")]
    listen: Vec<SocketAddr>,
    /// A host and its addresses, preferred network first:
    /// `ID=HOST:PORT[,HOST:PORT...]`. Repeat for each host.
    #[arg(long, value_name = "ID=ADDRS", value_parser = parse_peer)]
    peer: Vec<(u64, Vec<String>)>,
    /// The cluster's name (connections from another cluster are refused).
    #[arg(long)]
    cluster: Option<String>,
    /// The cluster key file made by `csvctl cluster init`.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Found the cluster with the `--peer` hosts as voters (ignored once
    /// this host has state in --data-dir).
    #[arg(long)]
    init: bool,
    /// Mount every volume under this directory as VolumeN.
    #[arg(long, value_name = "DIR")]
    mount_root: Option<PathBuf>,
    /// This host's path to a volume's LUN: `N=PATH` (repeat).
    #[arg(long, value_name = "N=PATH", value_parser = parse_lun)]
    lun: Vec<(u64, PathBuf)>,
    /// Serve the web console (`/`), its JSON (`/api/state`) and
    /// Prometheus metrics (`/metrics`) over HTTP on this address.
    #[arg(long, alias = "metrics", value_name = "IP:PORT")]
    console: Option<SocketAddr>,
    /// Let the console act (migrate VMs), for requests that carry the
    /// operator token (`csvctl cluster console-token`); read-only without.
    #[arg(long)]
    console_actions: bool,
    /// Raft tick in milliseconds (elections take 10-20 ticks).
    #[arg(long, value_parser = clap::value_parser!(u64).range(5..=1000))]
    tick_ms: Option<u64>,
    /// Applied entries between snapshots of a group.
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..))]
    snapshot_every: Option<u64>,
    /// This host's iSCSI initiator name (default:
    /// iqn.2026-11.io.csv:<hostname>-node<ID>; every host needs its own).
    #[arg(long, value_name = "IQN")]
    initiator: Option<String>,
    /// CHAP user for the SAN's targets; the secret is read from
    /// --chap-secret-file (never given on the command line).
    #[arg(long)]
    chap_user: Option<String>,
    /// File holding the CHAP secret (one line).
    #[arg(long, value_name = "FILE")]
    chap_secret_file: Option<PathBuf>,
    /// FUSE worker threads per mounted volume. Reads and writes of the
    /// LUN are asynchronous and need few; the rest are for requests that
    /// wait for the coordinator (lookups, creates, opens, fsyncs).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=256))]
    fuse_threads: u64,
    /// Of those, how many wait for the kernel's requests at a time (the
    /// others take over while one waits for the coordinator). Few keep
    /// the threads that serve I/O busy instead of waking a sleeping one
    /// per request [default: the number of CPUs, 2 to 8]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    fuse_readers: Option<u64>,
    /// The VMM program that runs the VM roles placed on this host
    /// (default: `csv-vmm` next to csvd, else on PATH).
    #[arg(long, value_name = "FILE")]
    vmm: Option<PathBuf>,
    /// Memory this host gives to VM roles (e.g. 16G; suffixes K, M, G,
    /// T): placement rates it as if it had this much memory, less what
    /// the roles placed on it take. Default: all it has (MemAvailable).
    #[arg(long, value_name = "SIZE", value_parser = parse_mem)]
    vm_memory: Option<u64>,
    /// Directory of snapshot hooks: executables run at each phase of a
    /// volume snapshot as `HOOK PHASE VolumeN SNAPSHOT` (prepare, freeze,
    /// thaw, complete, abort) so applications can quiesce. Default:
    /// /etc/csv/snapshot-hooks.d (when it exists).
    #[arg(long, value_name = "DIR")]
    snapshot_hooks: Option<PathBuf>,
    /// Log one JSON object per line (for journald or a log shipper)
    /// instead of text. RUST_LOG sets the level (default: info).
    #[arg(long)]
    log_json: bool,
}

struct Settings {
    vmm: PathBuf,
    vm_memory: u64,
    snapshot_hooks: Option<PathBuf>,
    san: csv_fs::san::SanIdentity,
    cfg: Config,
    mount_root: Option<PathBuf>,
    luns: BTreeMap<u64, PathBuf>,
    metrics: Option<SocketAddr>,
    console_actions: bool,
}

fn settings(cli: Cli) -> Result<Settings, String> {
    let file = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            csv_fs::config::parse(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let id = cli
        .id
        .or(file.id)
        .ok_or("--id (or `id` in the settings file) is required")?;
    if id == 0 {
        return Err("node id 0 is reserved".into());
    }
    let data_dir = cli
        .data_dir
        .or(file.data_dir)
        .ok_or("--data-dir (or `data_dir`) is required")?;
    let listen = if cli.listen.is_empty() {
        file.listen
    } else {
        cli.listen
    };
    if listen.is_empty() {
        return Err("--listen (or `listen`) needs at least one address".into());
    }
    let key_file = cli
        .key_file
        .or(file.key_file)
        .ok_or("--key-file (or `key_file`) is required")?;
    let key = Key::load(&key_file)?;
    let mut peers: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (k, v) in file.peers {
        peers.insert(parse_id(&k)?, v);
    }
    peers.extend(cli.peer);
    peers
        .entry(id)
        .or_insert_with(|| listen.iter().map(|a| a.to_string()).collect());
    let mut luns = BTreeMap::new();
    for (k, v) in file.luns {
        luns.insert(parse_lun(&format!("{k}=x"))?.0, v);
    }
    luns.extend(cli.lun);
    let tick_ms = cli.tick_ms.or(file.tick_ms).unwrap_or(50);
    csv_fs::config::check_tick(tick_ms)?;
    let timing = Timing {
        tick: Duration::from_millis(tick_ms),
        snapshot_every: cli.snapshot_every.or(file.snapshot_every).unwrap_or(4096),
        ..Timing::default()
    };
    let chap = match (
        cli.chap_user.or(file.chap_user),
        cli.chap_secret_file.or(file.chap_secret_file),
    ) {
        (Some(user), Some(f)) => {
            let secret = std::fs::read_to_string(&f)
                .map_err(|e| format!("CHAP secret {}: {e}", f.display()))?
                .trim()
                .to_string();
            Some(iscsi_initiator::Chap { user, secret })
        }
        (Some(_), None) => return Err("--chap-user needs --chap-secret-file".into()),
        (None, Some(_)) => return Err("--chap-secret-file needs --chap-user".into()),
        (None, None) => None,
    };
    let san = csv_fs::san::SanIdentity {
        initiator: cli
            .initiator
            .or(file.initiator)
            .unwrap_or_else(|| csv_fs::san::SanIdentity::default_initiator(id)),
        chap,
        node: id,
    };
    let vmm = cli.vmm.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("csv-vmm")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("csv-vmm"))
    });
    let vm_memory = match (cli.vm_memory, file.vm_memory) {
        (Some(m), _) => m,
        (None, Some(t)) => parse_mem(&t).map_err(|e| format!("vm_memory: {e}"))?,
        (None, None) => 0,
    };
    let snapshot_hooks = cli
        .snapshot_hooks
        .or(file.snapshot_hooks)
        .or_else(|| Some(PathBuf::from("/etc/csv/snapshot-hooks.d")).filter(|p| p.is_dir()));
    Ok(Settings {
        vmm,
        vm_memory,
        snapshot_hooks,
        san,
        cfg: Config {
            identity: Identity {
                node: id,
                cluster: cli.cluster.or(file.cluster).unwrap_or_else(|| "csv".into()),
                key,
            },
            data_dir,
            listen,
            peers,
            init: cli.init || file.init,
            timing,
        },
        mount_root: cli.mount_root.or(file.mount_root),
        luns,
        metrics: cli.console.or(file.console).or(file.metrics),
        console_actions: cli.console_actions || file.console_actions,
    })
}

/// Set (to milliseconds) in the environment of a csvd started again by a
/// drill's crash: how long the host stays down first.
const DRILL_DOWN: &str = "CSV_DRILL_DOWN_MS";

/// A failure drill's crash of this host (`csvctl drill host-kill`,
/// `coordinator-kill`): its VMs are killed and csvd starts over at once,
/// as the same process (so whoever supervises it keeps its handle), with
/// nothing of its memory: its connections and FUSE sessions close as on a
/// SIGKILL, and the new csvd stays down for `down` before it starts.
fn crash(vms: &coordinator::node::VmStates, down: Duration) {
    use std::os::unix::process::CommandExt;
    if let Ok(v) = vms.read() {
        for vm in v.iter().filter(|vm| vm.pid > 1) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(vm.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let err = std::process::Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .env(DRILL_DOWN, down.as_millis().to_string())
        .exec();
    eprintln!("csvd: starting again after a drill's crash: {err}");
    std::process::abort();
}

/// After a drill's crash: stays down for the time it asked (SIGTERM and
/// SIGINT end the process meanwhile).
fn down_after_drill_crash() {
    let Some(ms) = std::env::var(DRILL_DOWN)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    let _ = sigs.thread_unblock();
    tracing::warn!("a failure drill crashed this host: down for {ms} ms");
    std::thread::sleep(Duration::from_millis(ms.min(600_000)));
}

/// What csvd keeps of root's capabilities (numbers of
/// `linux/capability.h`): file access on its state and mounts (chown,
/// dac_override, dac_read_search, fowner, fsetid), stopping its VMs
/// (kill), a console on a low port (net_bind_service), FUSE mounts
/// (sys_admin), and priorities, memory locks and limits for its VMMs
/// (sys_nice, ipc_lock, sys_resource). Everything else (modules, raw I/O,
/// ptrace, setuid, network administration, ...) is gone for good, for it
/// and for every VMM it starts.
const CAPS: [u32; 11] = [0, 1, 2, 3, 4, 5, 10, 14, 21, 23, 24];

fn main() -> ExitCode {
    // Before any thread starts (capabilities are per thread).
    let privileges = csv_fs::privileges::drop_all_but(&CAPS);
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match privileges {
        Ok(what) => tracing::info!("privileges: {what}"),
        Err(e) => tracing::warn!("could not drop privileges: {e}"),
    }
    let fuse_threads = cli.fuse_threads as usize;
    let fuse_readers = cli.fuse_readers.map_or_else(
        || {
            std::thread::available_parallelism()
                .map_or(2, usize::from)
                .clamp(2, 8)
        },
        |n| n as usize,
    );
    down_after_drill_crash();
    let s = match settings(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("csvd: {e}");
            return ExitCode::from(2);
        }
    };
    // Signals are taken by the main thread only (every thread started
    // from here inherits the mask).
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    if let Err(e) = sigs.thread_block() {
        eprintln!("csvd: cannot block signals: {e}");
        return ExitCode::from(1);
    }
    let identity = s.cfg.identity.clone();
    let id = identity.node;
    let run_dir = s.cfg.data_dir.join("vms");
    let peers = s.cfg.peers.clone();
    let node = match Node::start(s.cfg) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("csvd: {e}");
            return ExitCode::from(1);
        }
    };
    let own = node.bound[0];
    node.vm_memory
        .store(s.vm_memory, std::sync::atomic::Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(m) = s.metrics {
        if let Err(e) = csv_fs::console::Console::start(
            m,
            identity.clone(),
            own,
            s.console_actions,
            stop.clone(),
        ) {
            eprintln!("csvd: console on {m}: {e}");
            return ExitCode::from(1);
        }
        tracing::info!(
            "console and metrics on http://{m}/ ({})",
            if s.console_actions {
                "actions need the operator token"
            } else {
                "read-only"
            }
        );
    }
    let vm_stop = Arc::new(AtomicBool::new(false));
    // The VM roles placed on this host run on its mounts.
    let mut vm_controls = None;
    let served = Arc::new(csv_fs::redirect::Served::default());
    let vm_states = node.vms.clone();
    served.set_crash(Arc::new(move |down| crash(&vm_states, down)));
    let vms = s.mount_root.clone().map(|root| {
        let cfg = csv_fs::vms::VmHostConfig {
            node: id,
            mount_root: root,
            run_dir,
            vmm: s.vmm.clone(),
            identity: Identity {
                node: 0,
                ..identity.clone()
            },
            endpoints: node.bound.clone(),
        };
        let sup = csv_fs::vms::VmSupervisor::new(cfg, node.vms.clone());
        vm_controls = Some(sup.controls.clone());
        let mut sup = sup;
        sup.fenced = served.fenced.clone();
        let stop = vm_stop.clone();
        std::thread::spawn(move || sup.run(stop))
    });
    let mounts = s.mount_root.map(|root| {
        // This host first, then the others.
        let mut endpoints = node.bound.clone();
        endpoints.extend(
            peers
                .iter()
                .filter(|(p, _)| **p != id)
                .flat_map(|(_, a)| coordinator::node::resolve(a)),
        );
        let own: Vec<SocketAddr> = node.bound.clone();
        let peer_addrs: Vec<SocketAddr> = endpoints
            .iter()
            .filter(|a| !own.contains(a))
            .copied()
            .collect();
        let cfg = MountConfig {
            node: id,
            root,
            luns: s.luns,
            identity: Identity {
                node: 0,
                ..identity.clone()
            },
            endpoints,
            threads: fuse_threads,
            readers: fuse_readers,
            san: s.san.clone(),
            peers: peer_addrs,
        };
        served
            .agent
            .configure(s.snapshot_hooks.clone(), vm_controls.clone());
        served.set_identity(s.san.clone());
        served.set_host(identity.clone(), id);
        if let Ok(mut slot) = node.block.write() {
            *slot = Some(served.clone());
        }
        let m = Mounts::new(cfg, node.volumes.clone(), served);
        let stop = stop.clone();
        std::thread::spawn(move || m.run(stop))
    });
    let addrs: Vec<String> = node.bound.iter().map(|a| a.to_string()).collect();
    println!("csvd: host {id} serving on {}", addrs.join(", "));
    let sig = sigs.wait();
    tracing::info!("{sig:?}: stopping the VMs, unmounting and stopping");
    vm_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(h) = vms {
        let _ = h.join();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(h) = mounts {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_sizes_parse_with_binary_units() {
        assert_eq!(super::parse_mem("4096"), Ok(4096));
        assert_eq!(super::parse_mem("512M"), Ok(512 << 20));
        assert_eq!(super::parse_mem(" 16g "), Ok(16 << 30));
        assert!(super::parse_mem("0").is_err());
        assert!(super::parse_mem("12X").unwrap_err().contains("unit"));
        assert!(super::parse_mem("99999999999T")
            .unwrap_err()
            .contains("range"));
        assert!(super::parse_mem("M").is_err());
    }
}
