//! csvd's settings file (`/etc/csv/csvd.toml`, written by `csvctl
//! cluster init` and `node join`; docs/OPERATIONS.md lists its keys):
//! parsed and checked here, before csvd acts on any of it. Unknown keys,
//! values out of range and malformed addresses are errors that name the
//! key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Longest settings file read (a bigger one is refused, not parsed).
pub const MAX_TEXT: usize = 1 << 20;

/// Parses and checks a settings file's text.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    if text.len() > MAX_TEXT {
        return Err(format!(
            "{} bytes is more than a settings file holds",
            text.len()
        ));
    }
    let f: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    f.check()?;
    Ok(f)
}

/// The Raft tick (ms) csvd accepts.
pub fn check_tick(ms: u64) -> Result<(), String> {
    if !(1..=10_000).contains(&ms) {
        return Err(format!("tick_ms {ms}: between 1 and 10000"));
    }
    Ok(())
}

impl FileConfig {
    /// Every value in range: ids, peers' addresses, LUN volume numbers,
    /// sizes, the tick, names.
    pub fn check(&self) -> Result<(), String> {
        if let Some(id) = self.id {
            parse_id(&id.to_string()).map_err(|e| format!("id: {e}"))?;
        }
        for (k, v) in &self.peers {
            parse_peer(&format!("{k}={}", v.join(","))).map_err(|e| format!("peers: {e}"))?;
        }
        for k in self.luns.keys() {
            parse_lun(&format!("{k}=x")).map_err(|e| format!("luns: {e}"))?;
        }
        if let Some(m) = &self.vm_memory {
            parse_mem(m).map_err(|e| format!("vm_memory: {e}"))?;
        }
        if let Some(t) = self.tick_ms {
            check_tick(t)?;
        }
        if self.snapshot_every == Some(0) {
            return Err("snapshot_every: at least 1".into());
        }
        if let Some(c) = &self.cluster {
            if c.is_empty() || c.len() > 64 || c.chars().any(|c| c.is_control()) {
                return Err(format!("cluster: {c:?} (1 to 64 printable characters)"));
            }
        }
        if let Some(i) = &self.initiator {
            // RFC 3720: an iSCSI name is at most 223 bytes.
            if i.is_empty()
                || i.len() > 223
                || i.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!("initiator: {i:?} is not an iSCSI name"));
            }
        }
        Ok(())
    }
}

/// The settings file, as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// This host's node id.
    pub id: Option<u64>,
    /// Where its Raft state lives.
    pub data_dir: Option<PathBuf>,
    /// Its cluster addresses, one per network.
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// The founders' addresses by node id.
    #[serde(default)]
    pub peers: BTreeMap<String, Vec<String>>,
    /// The cluster's name.
    pub cluster: Option<String>,
    /// The cluster key file.
    pub key_file: Option<PathBuf>,
    /// Found the cluster (first start of a founder).
    #[serde(default)]
    pub init: bool,
    /// Where volumes are mounted (/ClusterStorage).
    pub mount_root: Option<PathBuf>,
    /// Volume number to a LUN path on this host (overrides the registry's).
    #[serde(default)]
    pub luns: BTreeMap<String, PathBuf>,
    /// Old name of `console`.
    pub metrics: Option<SocketAddr>,
    /// The web console's address.
    pub console: Option<SocketAddr>,
    /// The console may act (with the operator token).
    #[serde(default)]
    pub console_actions: bool,
    /// The Raft tick (ms).
    pub tick_ms: Option<u64>,
    /// Raft log entries between state snapshots.
    pub snapshot_every: Option<u64>,
    /// Its iSCSI initiator name.
    pub initiator: Option<String>,
    /// CHAP user name for the targets.
    pub chap_user: Option<String>,
    /// File holding the CHAP secret.
    pub chap_secret_file: Option<PathBuf>,
    /// Memory offered to VMs (4096, 512M, 16G).
    pub vm_memory: Option<String>,
    /// Directory of snapshot hook programs.
    pub snapshot_hooks: Option<PathBuf>,
}

/// A size such as `4096`, `512M` or `16G` (binary units).
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 16G)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n && *v > 0)
        .ok_or_else(|| format!("{s:?}: size out of range"))
}

pub fn parse_peer(s: &str) -> Result<(u64, Vec<String>), String> {
    let (id, addrs) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT[,HOST:PORT...]"))?;
    let id = parse_id(id)?;
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

pub fn parse_id(id: &str) -> Result<u64, String> {
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("{id:?} is not a node id (a positive number)"))?;
    if id == 0 {
        return Err("node id 0 is reserved".into());
    }
    Ok(id)
}

pub fn parse_lun(s: &str) -> Result<(u64, PathBuf), String> {
    let (n, p) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected N=PATH (volume number and LUN path)"))?;
    let n: u64 = n
        .trim()
        .parse()
        .map_err(|_| format!("{n:?} is not a volume number"))?;
    Ok((n, PathBuf::from(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_files_are_checked() {
        let good = "id = 2\ndata_dir = \"/var/lib/csv\"\nlisten = [\"10.0.0.2:7000\"]\n\
                    cluster = \"prod\"\n[peers]\n1 = [\"10.0.0.1:7000\", \"10.1.0.1:7000\"]\n";
        let f = parse(good).unwrap();
        assert_eq!(f.id, Some(2));
        for (bad, why) in [
            ("id = 0", "reserved"),
            ("tick_ms = 0", "tick_ms"),
            ("vm_memory = \"12X\"", "vm_memory"),
            ("[peers]\n0 = [\"a:1\"]", "peers"),
            ("[peers]\n1 = [\"nohost\"]", "peers"),
            ("[luns]\nx = \"/dev/sdb\"", "luns"),
            ("cluster = \"\"", "cluster"),
            ("initiator = \"iqn with space\"", "initiator"),
            ("snapshot_every = 0", "snapshot_every"),
            ("colour = \"blue\"", "unknown field"),
            ("listen = [\"not an address\"]", "listen"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    proptest::proptest! {
        /// Any text gives a settings file or an error, never a panic.
        #[test]
        fn any_text_parses_or_is_refused(text in ".{0,400}") {
            let _ = parse(&text);
        }
    }
}
