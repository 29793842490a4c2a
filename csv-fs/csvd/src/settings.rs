//! csvd's settings: its command line and its settings file
//! (`/etc/csv/csvd.toml`, written by `csvctl cluster init` and `node
//! join`; docs/OPERATIONS.md lists its keys), checked and merged into one
//! typed [`Settings`] before csvd acts on any of it. Flags win over the
//! file. Unknown keys, values out of range and malformed addresses are
//! errors that name the key.

use clap::Parser;
use coordinator::group::Timing;
use coordinator::wire::{Identity, Key, KeyError};
use csv_fs::lun::SanIdentity;
use hypervisor_shim::supervisor::engine::EngineKind;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Longest settings file read (a bigger one is refused, not parsed).
pub const MAX_TEXT: usize = 1 << 20;

/// Where snapshot hooks are looked for when none are named.
const DEFAULT_HOOKS: &str = "/etc/csv/snapshot-hooks.d";

/// A value on the command line or in the settings file that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Not `ID=HOST:PORT[,...]`.
    #[error("{0:?}: expected ID=HOST:PORT[,HOST:PORT...]")]
    Peer(String),
    /// An address without a port.
    #[error("{0:?} has no port (HOST:PORT)")]
    NoPort(String),
    /// A host without an address.
    #[error("host {0} has no address")]
    NoAddress(u64),
    /// Not a node id.
    #[error("{0:?} is not a node id (a positive number)")]
    Id(String),
    /// Node id 0.
    #[error("node id 0 is reserved")]
    IdZero,
    /// Not `N=PATH`.
    #[error("{0:?}: expected N=PATH (volume number and LUN path)")]
    Lun(String),
    /// Not a volume number.
    #[error("{0:?} is not a volume number")]
    Volume(String),
}

/// Why csvd's settings are not usable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Reading a file the settings name.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A settings file too big to be one.
    #[error("{0} bytes is more than a settings file holds")]
    TooLong(usize),
    /// Not TOML of the settings' keys.
    #[error("the settings file")]
    Toml(#[source] toml::de::Error),
    /// What is wrong with a settings file, and which file.
    #[error("in {path}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<SettingsError>,
    },
    /// A setting that must be given.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A key's value is wrong.
    #[error("{key}: {why}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A value's syntax.
    #[error("{key}")]
    Value {
        /// The key.
        key: &'static str,
        /// Why.
        #[source]
        source: ValueError,
    },
    /// A size.
    #[error("{key}")]
    Size {
        /// The key.
        key: &'static str,
        /// Why.
        #[source]
        source: vhd::size::SizeError,
    },
    /// The cluster key.
    #[error(transparent)]
    Key(#[from] KeyError),
}

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
#[derive(Parser, Debug, Default)]
#[command(name = "csvd", version, verbatim_doc_comment)]
pub struct Cli {
    /// Settings file (TOML, the keys of the long flags).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This host's node id (a positive number, unique in the cluster).
    #[arg(long, value_parser = parse_id)]
    pub id: Option<u64>,
    /// Directory for this host's Raft logs and snapshots (local disk).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to serve on; repeat for each cluster network.
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Vec<SocketAddr>,
    /// A host and its addresses, preferred network first:
    /// `ID=HOST:PORT[,HOST:PORT...]`. Repeat for each host.
    #[arg(long, value_name = "ID=ADDRS", value_parser = parse_peer)]
    pub peer: Vec<(u64, Vec<String>)>,
    /// The cluster's name (connections from another cluster are refused).
    #[arg(long)]
    pub cluster: Option<String>,
    /// The cluster key file made by `csvctl cluster init`.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Found the cluster with the `--peer` hosts as voters (ignored once
    /// this host has state in --data-dir).
    #[arg(long)]
    pub init: bool,
    /// Mount every volume under this directory as VolumeN.
    #[arg(long, value_name = "DIR")]
    pub mount_root: Option<PathBuf>,
    /// This host's path to a volume's LUN: `N=PATH` (repeat).
    #[arg(long, value_name = "N=PATH", value_parser = parse_lun)]
    pub lun: Vec<(u64, PathBuf)>,
    /// Serve the web console (`/`), its JSON (`/api/state`) and
    /// Prometheus metrics (`/metrics`) over HTTP on this address.
    #[arg(long, alias = "metrics", value_name = "IP:PORT")]
    pub console: Option<SocketAddr>,
    /// Let the console act (migrate VMs), for requests that carry the
    /// operator token (`csvctl cluster console-token`); read-only without.
    #[arg(long)]
    pub console_actions: bool,
    /// Raft tick in milliseconds (elections take 10-20 ticks).
    #[arg(long, value_parser = clap::value_parser!(u64).range(TICK_MS))]
    pub tick_ms: Option<u64>,
    /// Applied entries between snapshots of a group.
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..))]
    pub snapshot_every: Option<u64>,
    /// This host's iSCSI initiator name (default:
    /// iqn.2026-11.io.csv:<hostname>-node<ID>; every host needs its own).
    #[arg(long, value_name = "IQN")]
    pub initiator: Option<String>,
    /// CHAP user for the SAN's targets; the secret is read from
    /// --chap-secret-file (never given on the command line).
    #[arg(long)]
    pub chap_user: Option<String>,
    /// File holding the CHAP secret (one line).
    #[arg(long, value_name = "FILE")]
    pub chap_secret_file: Option<PathBuf>,
    /// FUSE worker threads per mounted volume. Reads and writes of the
    /// LUN are asynchronous and need few; the rest are for requests that
    /// wait for the coordinator (lookups, creates, opens, fsyncs)
    /// [default: 64]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub fuse_threads: Option<u64>,
    /// Of those, how many wait for the kernel's requests at a time (the
    /// others take over while one waits for the coordinator). Few keep
    /// the threads that serve I/O busy instead of waking a sleeping one
    /// per request [default: the number of CPUs, 2 to 8]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub fuse_readers: Option<u64>,
    /// Access times on the mounts: `noatime` (a read never moves a file's
    /// access time; it is kept when set explicitly), `lazy` (a read moves
    /// it at most once a day per file, or when it is older than the
    /// modification time, as relatime does) or `strict` (every read moves
    /// it, as strictatime). The updates go to the coordinator in batches
    /// every 5 s; this host sees its own at once [default: noatime]
    #[arg(long, value_name = "MODE", value_parser = ["noatime", "lazy", "strict"])]
    pub atime: Option<String>,
    /// Mount the volumes without the guard under them. The guard makes
    /// every call under a volume's mount point fail while csvd is down
    /// (instead of reaching the host's own disk); without it, a volume
    /// unmounted by hand (`umount`) leaves the bare directory, as a
    /// kernel file system does. For rigs that mount and unmount volumes
    /// themselves (xfstests' `mount.fuse.csv`); keep the guard on hosts
    /// that run VMs
    #[arg(long)]
    pub no_mount_guard: bool,
    /// The engine that runs the VM roles placed on this host [default:
    /// csv-vmm]
    #[arg(long, value_name = "ENGINE", value_parser = |s: &str| s.parse::<EngineKind>())]
    pub engine: Option<EngineKind>,
    /// The engine's program (default for csv-vmm: `csv-vmm` next to
    /// csvd, else on PATH).
    #[arg(long, value_name = "FILE")]
    pub vmm: Option<PathBuf>,
    /// Memory this host gives to VM roles (e.g. 16G; suffixes K, M, G,
    /// T): placement rates it as if it had this much memory, less what
    /// the roles placed on it take. Default: all it has (MemAvailable).
    #[arg(long, value_name = "SIZE", value_parser = vhd::size::parse_positive)]
    pub vm_memory: Option<u64>,
    /// Directory of snapshot hooks: executables run at each phase of a
    /// volume snapshot as `HOOK PHASE VolumeN SNAPSHOT` (prepare, freeze,
    /// thaw, complete, abort) so applications can quiesce. Default:
    /// /etc/csv/snapshot-hooks.d (when it exists).
    #[arg(long, value_name = "DIR")]
    pub snapshot_hooks: Option<PathBuf>,
    /// Log one JSON object per line (for journald or a log shipper)
    /// instead of text. RUST_LOG sets the level (default: info).
    #[arg(long)]
    pub log_json: bool,
    /// The highest feature level this host reports (default: its
    /// build's). For rolling-upgrade drills: a host started with a lower
    /// level keeps the cluster at it, as a host of an older build would.
    #[arg(long, hide = true)]
    pub feature_level: Option<u32>,
}

/// The settings file, as written.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// This host's node id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Where its Raft state lives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Its cluster addresses, one per network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<SocketAddr>,
    /// The founders' addresses by node id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peers: BTreeMap<String, Vec<String>>,
    /// The cluster's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The cluster key file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Found the cluster (first start of a founder).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
    /// Where volumes are mounted (/ClusterStorage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_root: Option<PathBuf>,
    /// Volume number to a LUN path on this host (overrides the registry's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub luns: BTreeMap<String, PathBuf>,
    /// Old name of `console`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// The web console's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<SocketAddr>,
    /// The console may act (with the operator token).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub console_actions: bool,
    /// The Raft tick (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tick_ms: Option<u64>,
    /// Raft log entries between state snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_every: Option<u64>,
    /// Its iSCSI initiator name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    /// CHAP user name for the targets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chap_user: Option<String>,
    /// File holding the CHAP secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chap_secret_file: Option<PathBuf>,
    /// FUSE worker threads per volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuse_threads: Option<u64>,
    /// Of those, how many read requests at a time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuse_readers: Option<u64>,
    /// Access times on the mounts: "noatime", "lazy" or "strict".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub atime: Option<String>,
    /// No guard under the volumes' mounts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_mount_guard: bool,
    /// The VM engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
    /// The engine's program.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm: Option<PathBuf>,
    /// Memory offered to VMs (4096, 512M, 16G).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_memory: Option<String>,
    /// Directory of snapshot hook programs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_hooks: Option<PathBuf>,
}

impl FileConfig {
    /// The file's text (TOML), after `header` (comment lines).
    pub fn to_text(&self, header: &str) -> Result<String, toml::ser::Error> {
        let body = toml::to_string(self)?;
        let mut t = String::new();
        for l in header.lines() {
            t.push_str("# ");
            t.push_str(l);
            t.push('\n');
        }
        t.push_str(&body);
        Ok(t)
    }
}

/// Parses and checks a settings file's text.
pub fn parse_file(text: &str) -> Result<FileConfig, SettingsError> {
    if text.len() > MAX_TEXT {
        return Err(SettingsError::TooLong(text.len()));
    }
    let f: FileConfig = toml::from_str(text).map_err(SettingsError::Toml)?;
    f.check()?;
    Ok(f)
}

fn value(key: &'static str) -> impl FnOnce(ValueError) -> SettingsError {
    move |source| SettingsError::Value { key, source }
}

fn invalid(key: &'static str, why: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        why: why.into(),
    }
}

/// The Raft tick (ms) csvd accepts, on the command line and in the file.
pub const TICK_MS: std::ops::RangeInclusive<u64> = 5..=1000;

fn check_tick(ms: u64) -> Result<(), SettingsError> {
    if !TICK_MS.contains(&ms) {
        return Err(invalid(
            "tick_ms",
            format!("{ms}: between {} and {}", TICK_MS.start(), TICK_MS.end()),
        ));
    }
    Ok(())
}

impl FileConfig {
    /// Every value in range: ids, peers' addresses, LUN volume numbers,
    /// sizes, the tick, names.
    pub fn check(&self) -> Result<(), SettingsError> {
        if let Some(id) = self.id {
            parse_id(&id.to_string()).map_err(value("id"))?;
        }
        for (k, v) in &self.peers {
            parse_peer(&format!("{k}={}", v.join(","))).map_err(value("peers"))?;
        }
        for k in self.luns.keys() {
            parse_lun(&format!("{k}=x")).map_err(value("luns"))?;
        }
        if let Some(m) = &self.vm_memory {
            vhd::size::parse_positive(m).map_err(|source| SettingsError::Size {
                key: "vm_memory",
                source,
            })?;
        }
        if let Some(t) = self.tick_ms {
            check_tick(t)?;
        }
        if self.snapshot_every == Some(0) {
            return Err(invalid("snapshot_every", "at least 1"));
        }
        if let Some(a) = &self.atime {
            if !["noatime", "lazy", "strict"].contains(&a.as_str()) {
                return Err(invalid("atime", "\"noatime\", \"lazy\" or \"strict\""));
            }
        }
        for (key, n) in [
            ("fuse_threads", self.fuse_threads),
            ("fuse_readers", self.fuse_readers),
        ] {
            if n.is_some_and(|n| !(1..=256).contains(&n)) {
                return Err(invalid(key, "between 1 and 256"));
            }
        }
        if let Some(c) = &self.cluster {
            if c.is_empty() || c.len() > 64 || c.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    "cluster",
                    format!("{c:?} (1 to 64 printable characters)"),
                ));
            }
        }
        if let Some(i) = &self.initiator {
            // RFC 3720: an iSCSI name is at most 223 bytes.
            if i.is_empty()
                || i.len() > 223
                || i.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid("initiator", format!("{i:?} is not an iSCSI name")));
            }
        }
        Ok(())
    }
}

/// `ID=HOST:PORT[,HOST:PORT...]`.
pub fn parse_peer(s: &str) -> Result<(u64, Vec<String>), ValueError> {
    let (id, addrs) = s
        .split_once('=')
        .ok_or_else(|| ValueError::Peer(s.to_string()))?;
    let id = parse_id(id)?;
    let addrs: Vec<String> = addrs
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if let Some(a) = addrs.iter().find(|a| !a.contains(':')) {
        return Err(ValueError::NoPort(a.clone()));
    }
    if addrs.is_empty() {
        return Err(ValueError::NoAddress(id));
    }
    Ok((id, addrs))
}

/// A node id: a positive number.
pub fn parse_id(id: &str) -> Result<u64, ValueError> {
    let n: u64 = id
        .trim()
        .parse()
        .map_err(|_| ValueError::Id(id.to_string()))?;
    if n == 0 {
        return Err(ValueError::IdZero);
    }
    Ok(n)
}

/// `N=PATH`: a volume's LUN on this host.
pub fn parse_lun(s: &str) -> Result<(u64, PathBuf), ValueError> {
    let (n, p) = s
        .split_once('=')
        .ok_or_else(|| ValueError::Lun(s.to_string()))?;
    let n: u64 = n
        .trim()
        .parse()
        .map_err(|_| ValueError::Volume(n.to_string()))?;
    Ok((n, PathBuf::from(p)))
}

/// The coordinator service's part of the settings.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Who this host is (node id, cluster name and key).
    pub identity: Identity,
    /// Where its replicas live.
    pub data_dir: PathBuf,
    /// Addresses to serve on (one per cluster network).
    pub listen: Vec<SocketAddr>,
    /// Known hosts and their addresses, preferred first (this host too).
    pub peers: BTreeMap<u64, Vec<String>>,
    /// Found the cluster if this host has no state yet.
    pub init: bool,
    /// Raft timing.
    pub timing: Timing,
    /// The feature level this host reports.
    pub level: u32,
}

/// Everything a host is made from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The coordinator service.
    pub node: NodeSettings,
    /// Where volumes are mounted (None: this host mounts none and runs
    /// no VM).
    pub mount_root: Option<PathBuf>,
    /// This host's own paths to volumes' LUNs, when they differ from the
    /// registry's.
    pub luns: BTreeMap<u64, PathBuf>,
    /// This host on the SAN.
    pub san: SanIdentity,
    /// Where the console serves (None: no console).
    pub console: Option<SocketAddr>,
    /// The console may act, with the operator token.
    pub console_actions: bool,
    /// FUSE worker threads per volume.
    pub fuse_threads: usize,
    /// Of those, how many read requests at a time.
    pub fuse_readers: usize,
    /// How reads move access times (`atime`).
    pub atime: csv_fs::volume::AtimeMode,
    /// A guard under each volume's mount (`no_mount_guard` unset).
    pub mount_guard: bool,
    /// The VM engine.
    pub engine: EngineKind,
    /// The engine's program (None: the engine's default).
    pub vmm: Option<PathBuf>,
    /// Memory given to VM roles (bytes; 0: all it has).
    pub vm_memory: u64,
    /// Directory of snapshot hooks.
    pub snapshot_hooks: Option<PathBuf>,
    /// Log JSON lines.
    pub log_json: bool,
}

fn read(path: &std::path::Path) -> Result<String, SettingsError> {
    std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Settings {
    /// The settings the command line gives, with its settings file.
    pub fn from_cli(cli: Cli) -> Result<Settings, SettingsError> {
        let file = match &cli.config {
            Some(p) => parse_file(&read(p)?).map_err(|e| SettingsError::InFile {
                path: p.clone(),
                source: Box::new(e),
            })?,
            None => FileConfig::default(),
        };
        let id = cli.id.or(file.id).ok_or(SettingsError::Missing(
            "--id (or `id` in the settings file)",
        ))?;
        let data_dir = cli
            .data_dir
            .or(file.data_dir)
            .ok_or(SettingsError::Missing("--data-dir (or `data_dir`)"))?;
        let listen = if cli.listen.is_empty() {
            file.listen
        } else {
            cli.listen
        };
        if listen.is_empty() {
            return Err(SettingsError::Missing(
                "--listen (or `listen`), at least one address,",
            ));
        }
        let key_file = cli
            .key_file
            .or(file.key_file)
            .ok_or(SettingsError::Missing("--key-file (or `key_file`)"))?;
        let key = Key::load(&key_file)?;
        let mut peers: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (k, v) in file.peers {
            peers.insert(parse_id(&k).map_err(value("peers"))?, v);
        }
        peers.extend(cli.peer);
        peers
            .entry(id)
            .or_insert_with(|| listen.iter().map(|a| a.to_string()).collect());
        let mut luns = BTreeMap::new();
        for (k, v) in file.luns {
            luns.insert(parse_lun(&format!("{k}=x")).map_err(value("luns"))?.0, v);
        }
        luns.extend(cli.lun);
        let tick_ms = cli.tick_ms.or(file.tick_ms).unwrap_or(50);
        check_tick(tick_ms)?;
        let timing = Timing {
            tick: Duration::from_millis(tick_ms),
            snapshot_every: cli.snapshot_every.or(file.snapshot_every).unwrap_or(4096),
            ..Timing::default()
        };
        let chap = match (
            cli.chap_user.or(file.chap_user),
            cli.chap_secret_file.or(file.chap_secret_file),
        ) {
            (Some(user), Some(f)) => Some(iscsi_initiator::Chap {
                user,
                secret: read(&f)?.trim().to_string(),
            }),
            (Some(_), None) => {
                return Err(SettingsError::Missing(
                    "--chap-secret-file (with --chap-user)",
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::Missing(
                    "--chap-user (with --chap-secret-file)",
                ))
            }
            (None, None) => None,
        };
        let vm_memory = match (cli.vm_memory, file.vm_memory) {
            (Some(m), _) => m,
            (None, Some(t)) => {
                vhd::size::parse_positive(&t).map_err(|source| SettingsError::Size {
                    key: "vm_memory",
                    source,
                })?
            }
            (None, None) => 0,
        };
        let fuse_readers = cli.fuse_readers.or(file.fuse_readers).map_or_else(
            || {
                std::thread::available_parallelism()
                    .map_or(2, usize::from)
                    .clamp(2, 8)
            },
            |n| n as usize,
        );
        Ok(Settings {
            node: NodeSettings {
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
                level: cli
                    .feature_level
                    .unwrap_or(coordinator::features::SUPPORTED),
            },
            mount_root: cli.mount_root.or(file.mount_root),
            luns,
            san: SanIdentity {
                initiator: cli
                    .initiator
                    .or(file.initiator)
                    .unwrap_or_else(|| SanIdentity::default_initiator(id)),
                chap,
                node: id,
            },
            console: cli.console.or(file.console).or(file.metrics),
            console_actions: cli.console_actions || file.console_actions,
            fuse_threads: cli.fuse_threads.or(file.fuse_threads).unwrap_or(64) as usize,
            fuse_readers,
            atime: cli
                .atime
                .or(file.atime)
                .as_deref()
                .and_then(csv_fs::volume::AtimeMode::parse)
                .unwrap_or_default(),
            mount_guard: !(cli.no_mount_guard || file.no_mount_guard),
            engine: cli.engine.or(file.engine).unwrap_or_default(),
            vmm: cli.vmm.or(file.vmm),
            vm_memory,
            snapshot_hooks: cli
                .snapshot_hooks
                .or(file.snapshot_hooks)
                .or_else(|| Some(PathBuf::from(DEFAULT_HOOKS)).filter(|p| p.is_dir())),
            log_json: cli.log_json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_files_are_checked() {
        let good = "id = 2\ndata_dir = \"/var/lib/csv\"\nlisten = [\"10.0.0.2:7000\"]\n\
                    cluster = \"prod\"\n[peers]\n1 = [\"10.0.0.1:7000\", \"10.1.0.1:7000\"]\n";
        let f = parse_file(good).unwrap();
        assert_eq!(f.id, Some(2));
        for (bad, why) in [
            ("id = 0", "reserved"),
            ("tick_ms = 0", "tick_ms"),
            ("tick_ms = 2000", "between 5 and 1000"),
            ("vm_memory = \"12X\"", "vm_memory"),
            ("[peers]\n0 = [\"a:1\"]", "peers"),
            ("[peers]\n1 = [\"nohost\"]", "peers"),
            ("[luns]\nx = \"/dev/sdb\"", "luns"),
            ("cluster = \"\"", "cluster"),
            ("initiator = \"iqn with space\"", "initiator"),
            ("snapshot_every = 0", "snapshot_every"),
            ("fuse_threads = 0", "fuse_threads"),
            ("colour = \"blue\"", "unknown field"),
            ("engine = \"hyperv\"", "engine"),
            ("listen = [\"not an address\"]", "listen"),
        ] {
            let e = coordinator::service::error_chain(&parse_file(bad).unwrap_err());
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn command_line_values_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_peer("2=10.0.0.2:7100, 10.1.0.2:7100"),
            Ok((2, vec!["10.0.0.2:7100".into(), "10.1.0.2:7100".into()]))
        );
        assert_eq!(
            parse_peer("2=nohost"),
            Err(ValueError::NoPort("nohost".into()))
        );
        assert_eq!(parse_peer("2="), Err(ValueError::NoAddress(2)));
        assert_eq!(parse_id("0"), Err(ValueError::IdZero));
        assert_eq!(parse_lun("3=/dev/sdc"), Ok((3, PathBuf::from("/dev/sdc"))));
        assert!(parse_lun("x=/dev/sdc").is_err());
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("key");
        std::fs::write(&key, Key::generate().unwrap().to_hex()).unwrap();
        let file = d.path().join("csvd.toml");
        std::fs::write(
            &file,
            format!(
                "id = 3\ndata_dir = \"/var/lib/csv\"\nlisten = [\"10.0.0.3:7100\"]\nkey_file = {:?}\ncluster = \"prod\"\nvm_memory = \"16G\"\n[luns]\n1 = \"/dev/sdb\"\n",
                key.display().to_string()
            ),
        )
        .unwrap();
        let cli = Cli {
            config: Some(file),
            cluster: Some("lab".into()),
            fuse_threads: Some(8),
            ..Cli::default()
        };
        let s = Settings::from_cli(cli).unwrap();
        assert_eq!(s.node.identity.node, 3);
        assert_eq!(s.node.identity.cluster, "lab", "the flag wins");
        assert_eq!(s.vm_memory, 16 << 30);
        assert_eq!(s.luns[&1], PathBuf::from("/dev/sdb"));
        assert_eq!(s.node.peers[&3], vec!["10.0.0.3:7100".to_string()]);
        assert_eq!(s.fuse_threads, 8);
        assert_eq!(s.node.level, coordinator::features::SUPPORTED);
        let missing = Settings::from_cli(Cli::default()).unwrap_err();
        assert!(matches!(missing, SettingsError::Missing(_)), "{missing}");
    }

    #[test]
    fn a_written_settings_file_reads_back_as_it_was() {
        let f = FileConfig {
            id: Some(4),
            cluster: Some("prod".into()),
            key_file: Some("/etc/csv/cluster.key".into()),
            listen: vec!["10.0.0.4:7100".parse().unwrap()],
            init: true,
            peers: BTreeMap::from([("1".to_string(), vec!["10.0.0.1:7100".to_string()])]),
            console: Some("10.9.0.4:9477".parse().unwrap()),
            ..FileConfig::default()
        };
        let text = f.to_text("csvd settings\nflags win").unwrap();
        assert!(text.starts_with("# csvd settings\n# flags win\n"), "{text}");
        let back = parse_file(&text).unwrap();
        assert_eq!(back.id, Some(4));
        assert_eq!(back.peers, f.peers);
        assert!(back.init);
        assert_eq!(back.listen, f.listen);
        assert_eq!(back.console, f.console);
    }

    proptest::proptest! {
        /// Any text gives a settings file or an error, never a panic.
        #[test]
        fn any_text_parses_or_is_refused(text in ".{0,400}") {
            let _ = parse_file(&text);
        }
    }
}
