//! Setting up a cluster on several hosts: `cluster init` (the cluster's
//! key and the first host's settings), `cluster token` (a join token),
//! `node join` (a further host redeems a token) and `node remove`.
//!
//! The cluster key is the cluster's root of trust: every host and every
//! operator's `csvctl` proves it holds it when it connects (see
//! `coordinator::wire`). A join token lets a host that does not hold it yet
//! ask for it once, over a connection keyed with a secret derived from the
//! key, the token's nonce and its expiry; the cluster gives the host its
//! id and registers its addresses in the same step.

use crate::cluster_cmd::Access;
use anyhow::{bail, Context, Result};
use coordinator::client;
use coordinator::wire::{JoinTicket, Key};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use coordinator::group::now_ms;

/// Settings for the csvd of the host being set up.
#[derive(Debug, clap::Args)]
pub struct HostSettings {
    /// This host's cluster address, one per cluster network, preferred
    /// first (repeat; two networks are recommended).
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Where csvd keeps its Raft logs (local disk).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/csv")]
    pub data_dir: PathBuf,
    /// Where the volumes are mounted.
    #[arg(long, value_name = "DIR", default_value = "/ClusterStorage")]
    pub mount_root: PathBuf,
    /// Serve the web console and Prometheus metrics on this address.
    #[arg(long, value_name = "IP:PORT")]
    pub console: Option<SocketAddr>,
    /// csvd's settings file to write.
    #[arg(long, value_name = "FILE", default_value = "/etc/csv/csvd.toml")]
    pub config: PathBuf,
}

/// Writes csvd's settings file (refuses to overwrite one).
fn write_config(
    h: &HostSettings,
    key_file: &Path,
    id: u64,
    cluster: &str,
    init: bool,
    peers: &[(u64, Vec<String>)],
    why: &str,
) -> Result<()> {
    let f = csvd::settings::FileConfig {
        id: Some(id),
        cluster: Some(cluster.to_string()),
        key_file: Some(key_file.to_path_buf()),
        data_dir: Some(h.data_dir.clone()),
        mount_root: Some(h.mount_root.clone()),
        listen: h.listen.clone(),
        console: h.console,
        init,
        peers: peers
            .iter()
            .map(|(id, addrs)| (id.to_string(), addrs.clone()))
            .collect(),
        ..Default::default()
    };
    let header = format!(
        "csvd settings, written by `{why}`.\n\
         Every key is a long flag of csvd (`csvd --help`); flags win.\n\
         `init`: this host founds the cluster (ignored once it has state).\n\
         `peers`: hosts to reach the cluster through (the cluster's registry\n\
         is authoritative once this host is a member)."
    );
    let text = f
        .to_text(&header)
        .context("writing csvd's settings as TOML")?;
    if let Some(dir) = h.config.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    crate::cluster_cmd::write_private(&h.config, &text).with_context(|| {
        format!(
            "{} may exist already: csvd keeps its settings",
            h.config.display()
        )
    })
}

fn write_key(path: &Path, key: &Key) -> Result<()> {
    if path.exists() {
        bail!(
            "{} exists; a host keeps its cluster key (remove the file to make or join another cluster)",
            path.display()
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    crate::cluster_cmd::write_private(path, &format!("{}\n", key.to_hex()))
}

/// `csvctl cluster init`: a new cluster key, and with `--listen` the first
/// host's settings and a join token for the others.
pub fn init(
    key_file: PathBuf,
    name: String,
    host: Option<HostSettings>,
    ttl: Duration,
) -> Result<ExitCode> {
    let key = Key::generate().context("read random bytes")?;
    let Some(h) = host else {
        write_key(&key_file, &key)?;
        println!("cluster key written to {}", key_file.display());
        return Ok(ExitCode::SUCCESS);
    };
    if h.config.exists() {
        bail!(
            "{} exists: this host already has csvd settings",
            h.config.display()
        );
    }
    if h.listen.is_empty() {
        bail!("give this host's cluster address: --listen IP:PORT (one per cluster network)");
    }
    write_key(&key_file, &key)?;
    let addrs: Vec<String> = h.listen.iter().map(|a| a.to_string()).collect();
    write_config(
        &h,
        &key_file,
        1,
        &name,
        true,
        &[(1, addrs.clone())],
        "csvctl cluster init",
    )?;
    let t = JoinTicket::issue(&key, &name, addrs, now_ms() + ttl.as_millis() as u64)
        .context("read random bytes")?;
    println!(
        "cluster {name:?}: key in {}, this host is host 1",
        key_file.display()
    );
    println!("csvd settings in {}; start it with:", h.config.display());
    println!(
        "  csvd --config {}    (or: systemctl enable --now csvd)",
        h.config.display()
    );
    println!();
    println!(
        "On each further host (this token admits hosts for {}; hand it over like a password):",
        human(ttl)
    );
    println!(
        "  CSV_JOIN_TOKEN={} csvctl node join --listen IP:PORT",
        t.encode()
    );
    Ok(ExitCode::SUCCESS)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// `csvctl cluster token`: a join token admitting hosts until it expires.
pub fn token(access: &Access, ttl: Duration) -> Result<ExitCode> {
    let me = access.identity()?;
    // The hosts a joining host asks: those given, as the cluster's
    // registry knows them (all their networks) when it answers.
    let mut addrs: Vec<String> = Vec::new();
    if let Ok(info) = access.client().and_then(|mut c| {
        c.cluster_info()
            .map_err(|e| anyhow::anyhow!(client::describe(&e)))
    }) {
        for n in &info.nodes {
            addrs.extend(n.addrs.iter().cloned());
        }
    }
    if addrs.is_empty() {
        addrs = access.endpoint_texts();
    }
    if addrs.is_empty() {
        bail!("name a host of the cluster: --endpoint HOST:PORT");
    }
    let t = JoinTicket::issue(
        &me.key,
        &me.cluster,
        addrs,
        now_ms() + ttl.as_millis() as u64,
    )
    .context("read random bytes")?;
    println!("{}", t.encode());
    eprintln!(
        "admits hosts for {}: csvctl node join TOKEN --listen IP:PORT",
        human(ttl)
    );
    Ok(ExitCode::SUCCESS)
}

/// `csvctl node join`: redeems a token, writes the key and csvd's
/// settings, and (with `--start`) starts csvd.
pub fn join(token: &str, key_file: &Path, h: HostSettings, start: bool) -> Result<ExitCode> {
    let read;
    let token = if token == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(8192)
            .read_to_string(&mut s)
            .context("read the join token from standard input")?;
        read = s;
        read.trim()
    } else {
        token
    };
    let t = JoinTicket::decode(token).map_err(anyhow::Error::msg)?;
    if h.listen.is_empty() {
        bail!("give this host's cluster address: --listen IP:PORT (one per cluster network)");
    }
    if t.expiry <= now_ms() {
        bail!("the join token has expired: ask for a new one (`csvctl cluster token`)");
    }
    if key_file.exists() {
        bail!(
            "{} exists: this host already belongs to a cluster (remove it, and {}, to join another)",
            key_file.display(),
            h.config.display()
        );
    }
    if h.config.exists() {
        bail!(
            "{} exists: this host already has csvd settings",
            h.config.display()
        );
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let addrs: Vec<String> = h.listen.iter().map(|a| a.to_string()).collect();
    let j = client::join(&t, addrs, &hostname, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))
        .context("join the cluster")?;
    write_key(key_file, &j.key)?;
    let peers: Vec<(u64, Vec<String>)> = j.nodes.iter().map(|n| (n.id, n.addrs.clone())).collect();
    write_config(
        &h,
        key_file,
        j.id,
        &t.cluster,
        false,
        &peers,
        "csvctl node join",
    )?;
    println!(
        "joined cluster {:?} as host {}; key in {}, csvd settings in {}",
        t.cluster,
        j.id,
        key_file.display(),
        h.config.display()
    );
    if start {
        let csvd = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("csvd")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("csvd"));
        std::fs::create_dir_all(&h.data_dir)
            .with_context(|| format!("create {}", h.data_dir.display()))?;
        let log = h.data_dir.join("csvd.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = std::process::Command::new(&csvd)
            .arg("--config")
            .arg(&h.config)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {}", csvd.display()))?;
        println!(
            "csvd started (pid {}), logging to {}",
            child.id(),
            log.display()
        );
    } else {
        println!(
            "start csvd: csvd --config {}   (or: systemctl enable --now csvd)",
            h.config.display()
        );
    }
    println!("it becomes a learner of every group, then a voter once it has caught up");
    Ok(ExitCode::SUCCESS)
}

use std::io::Read;
use std::os::unix::process::CommandExt;

/// `csvctl node remove`: evicts a host. It must run no VM role; every
/// group it leads moves to another host first.
pub fn remove(access: &Access, host: u64) -> Result<ExitCode> {
    let mut c = access.client()?;
    let cerr = |e: client::ClientError| anyhow::anyhow!(client::describe(&e));
    let info = c.cluster_info().map_err(cerr)?;
    let Some(node) = info.nodes.iter().find(|n| n.id == host) else {
        if info.removed.contains(&host) {
            bail!("host {host} was removed already");
        }
        bail!("no host {host} in the cluster (`csvctl cluster nodes` lists them)");
    };
    let vms: Vec<&str> = info
        .vms
        .iter()
        .filter(|r| r.node == host)
        .map(|r| r.name.as_str())
        .collect();
    if !vms.is_empty() {
        bail!(
            "host {host} runs VM roles {}: move them first (`csvctl node drain {host}`)",
            vms.join(", ")
        );
    }
    if info.nodes.len() <= 1 {
        bail!("host {host} is the cluster's last host");
    }
    let me = access.identity()?;
    let other = info
        .nodes
        .iter()
        .find(|n| n.id != host && info.health.iter().all(|h| h.node != n.id || h.up))
        .map(|n| n.id)
        .context("no other host is up to take over its groups")?;
    // Move the leadership of every group it leads.
    if let Some(st) = client::host_status(&me, node) {
        for g in st
            .groups
            .iter()
            .filter(|g| g.role() == coordinator::proto::RaftRole::Leader)
        {
            c.transfer_leader(g.group, other)
                .map_err(cerr)
                .with_context(|| format!("move the leadership of group {} away", g.group))?;
        }
    }
    c.remove_node(host).map_err(cerr)?;
    // Wait until no group lists it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = info.nodes.iter().filter(|n| n.id != host).all(|n| {
            client::host_status(&me, n).is_none_or(|s| {
                s.groups
                    .iter()
                    .all(|g| !g.voters.contains(&host) && !g.learners.contains(&host))
            })
        });
        if left {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "host {host} is removed from the registry but some group still lists it after 20 s"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "host {host} removed: it left every group; stop its csvd and delete its state directory (its id is never reused)"
    );
    Ok(ExitCode::SUCCESS)
}
