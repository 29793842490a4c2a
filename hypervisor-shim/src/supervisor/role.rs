//! A VM role's configuration, as the cluster registry stores it (JSON in
//! `VmRole.config`: the registry keeps it as opaque bytes): what `csvctl
//! vm add` records and what each host's VM supervisor runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A role whose stored configuration does not read.
#[derive(Debug, thiserror::Error)]
#[error("VM role {name:?}: unreadable configuration")]
pub struct RoleError {
    /// The role.
    pub name: String,
    /// Why.
    #[source]
    pub source: serde_json::Error,
}

/// The state a role wants its VM in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wanted {
    /// Not running anywhere.
    Stopped,
    /// Running on the role's owner host.
    Running,
}

impl Wanted {
    /// The name `csvctl` and the console show (as stored).
    pub fn label(self) -> &'static str {
        match self {
            Wanted::Stopped => "stopped",
            Wanted::Running => "running",
        }
    }
}

impl std::fmt::Display for Wanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

/// The order of restarts after a host failure and of moves off a host
/// being drained: `High` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// First.
    High,
    /// After the high ones.
    Medium,
    /// Last.
    Low,
}

impl Priority {
    /// The name `csvctl` takes and shows (as stored).
    pub fn label(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

/// A priority's name is none of `high`, `medium`, `low`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a priority: high, medium or low")]
pub struct PriorityError(pub String);

impl std::str::FromStr for Priority {
    type Err = PriorityError;

    fn from_str(s: &str) -> Result<Priority, PriorityError> {
        match s {
            "high" => Ok(Priority::High),
            "medium" => Ok(Priority::Medium),
            "low" => Ok(Priority::Low),
            _ => Err(PriorityError(s.to_string())),
        }
    }
}

/// The guest a role runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Guest {
    /// The project's test guest (heartbeats, dirtying, disk writes).
    Test,
    /// A real operating system (the `qemu` engine): booted from `kernel`
    /// or by firmware from the disk.
    Linux,
}

/// A VM role's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub vcpus: u32,
    /// Bytes.
    pub memory: u64,
    /// The VM's disk: a VHD on a cluster volume, named by its path under
    /// the usual mount root (`/ClusterStorage/VolumeN/...`).
    pub disk: String,
    /// The volume that holds the disk.
    pub volume: u64,
    /// Hosts tried first, in order.
    #[serde(default)]
    pub preferred: Vec<u64>,
    /// The order of restarts after a failure.
    pub priority: Priority,
    /// Whether it should run.
    pub state: Wanted,
    /// The guest it runs.
    pub guest: Guest,
    /// The engine that runs it (None: the host's `engine` setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<super::engine::EngineKind>,
    /// A kernel to boot directly (a real guest; a path on a volume,
    /// `/ClusterStorage/VolumeN/...`, or present on every host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Its initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Its command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Its network card (the qemu engine): `user` (QEMU's user-mode
    /// network, for a demo) or `bridge:NAME` (a tap on the host's bridge
    /// NAME); None: no NIC. Its MAC address is [`VmConfig::mac`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<String>,
    /// Where the guest's second serial port goes, as UDP datagrams
    /// (`HOST:PORT`): its heartbeat, timed by one clock on the host side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
    /// The test guest's dirtying rate, MiB/s.
    #[serde(default)]
    pub dirty_rate: f64,
    /// A live migration asked for: the host it goes to. The target's
    /// supervisor waits for it, the owner's sends it; the owner records
    /// the outcome and clears this.
    #[serde(default)]
    pub migrate_to: Option<u64>,
    /// How the last migration went (its summary, or why it failed).
    #[serde(default)]
    pub last_migration: Option<String>,
    /// The migration asked for is a quick one (save, restore elsewhere).
    #[serde(default)]
    pub migrate_quick: bool,
    /// The owner starts the VM from this saved state (a path on the VM's
    /// volume, like `disk`) instead of booting it; cleared once it runs.
    #[serde(default)]
    pub restore_from: Option<String>,
    /// Who answers for it (free text: a person, a team, a ticket).
    #[serde(default)]
    pub owner: Option<String>,
    /// When it is due to be retired (ms since the Unix epoch): `csvctl
    /// inventory` warns before and flags it after.
    #[serde(default)]
    pub expires: Option<u64>,
    /// When `state` last changed (ms since the Unix epoch).
    #[serde(default)]
    pub state_since: Option<u64>,
}

impl VmConfig {
    /// Parses a role's stored configuration.
    pub fn from_role(role: &coordinator::proto::VmRole) -> Result<VmConfig, RoleError> {
        serde_json::from_slice(&role.config).map_err(|source| RoleError {
            name: role.name.clone(),
            source,
        })
    }

    /// The MAC address of the role's NIC: derived from its name (locally
    /// administered, QEMU's 52:54:00 prefix), so it is the same on every
    /// host and across migrations, failovers and restarts.
    pub fn mac(name: &str) -> String {
        let c = crc32fast::hash(name.as_bytes()).to_be_bytes();
        format!("52:54:00:{:02x}:{:02x}:{:02x}", c[1], c[2], c[3])
    }

    /// Whether the role wants its VM running.
    pub fn is_running(&self) -> bool {
        self.state == Wanted::Running
    }

    /// What placement needs to know of this VM (its disk is on its volume
    /// already, so it asks for no new space).
    pub fn needs(&self) -> super::placement::VmNeeds {
        super::placement::VmNeeds {
            vcpus: self.vcpus,
            memory: self.memory,
            disk: 0,
            preferred: self.preferred.clone(),
        }
    }

    /// Restart and drain order: `high` first, then `medium`, then `low`.
    pub fn priority_rank(&self) -> u8 {
        self.priority as u8
    }

    /// The stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The disk's path under this host's mount root: the part of `disk`
    /// after `VolumeN/`, under `<mount_root>/VolumeN/`. `None` when the
    /// path names no volume or tries to leave it.
    pub fn disk_on(&self, mount_root: &Path) -> Option<PathBuf> {
        self.path_on(&self.disk, mount_root)
    }

    /// Where a quick migration keeps the VM's saved state (on its volume).
    pub fn state_path(&self, name: &str) -> String {
        format!(
            "/ClusterStorage/Volume{}/.csv-vm-state/{name}.state",
            self.volume
        )
    }

    /// `path` (a `/ClusterStorage/VolumeN/...` path on this VM's volume)
    /// under this host's mount root.
    pub fn path_on(&self, path: &str, mount_root: &Path) -> Option<PathBuf> {
        let marker = format!("Volume{}/", self.volume);
        let at = path.find(&marker)?;
        let rel = &path[at + marker.len()..];
        if rel.is_empty() || rel.split('/').any(|p| p == ".." || p == ".") {
            return None;
        }
        Some(mount_root.join(format!("Volume{}", self.volume)).join(rel))
    }
}

/// A file a role names (its kernel, its initramfs) as this host sees it: a
/// path under `/ClusterStorage/VolumeN/` goes under this host's mount
/// root; any other path is taken as it is (present on every host).
pub fn host_path(path: &str, mount_root: &Path) -> PathBuf {
    match path.strip_prefix("/ClusterStorage/") {
        Some(rel) if !rel.split('/').any(|p| p == "..") => mount_root.join(rel),
        _ => PathBuf::from(path),
    }
}

/// Whether `name` is a VM role's name: letters, digits, '-', '_' and '.',
/// up to 63, not starting with '.' (it names files in the run directory).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// VolumeN from a path like `/ClusterStorage/Volume3/vm.vhd`.
pub fn volume_of(path: &str) -> Option<u64> {
    path.split('/')
        .find_map(|part| part.strip_prefix("Volume").and_then(|n| n.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(disk: &str, volume: u64) -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory: 1 << 28,
            disk: disk.into(),
            volume,
            preferred: vec![],
            priority: Priority::Medium,
            state: Wanted::Stopped,
            guest: Guest::Test,
            dirty_rate: 0.0,
            engine: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            nic: None,
            heartbeat: None,
            migrate_to: None,
            last_migration: None,
            migrate_quick: false,
            restore_from: None,
            owner: None,
            expires: None,
            state_since: None,
        }
    }

    #[test]
    fn a_real_guests_files_map_to_each_hosts_mount_root() {
        let root = Path::new("/tmp/csv-up/node2/ClusterStorage");
        assert_eq!(
            host_path("/ClusterStorage/Volume1/images/vmlinuz", root),
            root.join("Volume1/images/vmlinuz")
        );
        assert_eq!(host_path("/boot/vmlinuz", root), Path::new("/boot/vmlinuz"));
        assert_eq!(
            host_path("/ClusterStorage/../etc/shadow", root),
            Path::new("/ClusterStorage/../etc/shadow")
        );
        // A NIC's MAC address follows the role's name, nothing else.
        assert_eq!(VmConfig::mac("web1"), VmConfig::mac("web1"));
        assert_ne!(VmConfig::mac("web1"), VmConfig::mac("web2"));
        assert!(VmConfig::mac("web1").starts_with("52:54:00:"));
        // A role stored before real guests existed still reads.
        let old = r#"{"vcpus":1,"memory":268435456,"disk":"/ClusterStorage/Volume1/a.vhd","volume":1,"priority":"medium","state":"stopped","guest":"test"}"#;
        let c: VmConfig = serde_json::from_str(old).unwrap();
        assert_eq!((c.engine, c.kernel), (None, None));
    }

    #[test]
    fn disk_paths_map_to_each_hosts_mount_root() {
        let root = Path::new("/tmp/csv-up/node2/ClusterStorage");
        assert_eq!(
            cfg("/ClusterStorage/Volume1/vms/a.vhd", 1).disk_on(root),
            Some(root.join("Volume1/vms/a.vhd"))
        );
        assert_eq!(
            cfg("/ClusterStorage/Volume1/../etc/x", 1).disk_on(root),
            None
        );
        assert_eq!(cfg("/ClusterStorage/Volume2/a.vhd", 1).disk_on(root), None);
        assert_eq!(cfg("/ClusterStorage/Volume1/", 1).disk_on(root), None);
        assert_eq!(volume_of("/ClusterStorage/Volume12/a/b.vhd"), Some(12));
        assert_eq!(volume_of("/srv/vm.vhd"), None);
        let c = cfg("/ClusterStorage/Volume1/a.vhd", 1);
        let role = coordinator::proto::VmRole {
            name: "a".into(),
            node: 0,
            config: c.to_bytes(),
        };
        assert_eq!(VmConfig::from_role(&role).unwrap(), c);
    }

    #[test]
    fn the_stored_form_keeps_its_words() {
        // Roles written before the enums read the same.
        let text = br#"{"vcpus":1,"memory":268435456,"disk":"/ClusterStorage/Volume1/a.vhd","volume":1,"priority":"high","state":"running","guest":"test"}"#;
        let role = coordinator::proto::VmRole {
            name: "a".into(),
            node: 2,
            config: text.to_vec(),
        };
        let c = VmConfig::from_role(&role).unwrap();
        assert_eq!(
            (c.priority, c.state, c.guest),
            (Priority::High, Wanted::Running, Guest::Test)
        );
        let back = String::from_utf8(c.to_bytes()).unwrap();
        assert!(
            back.contains(r#""priority":"high","state":"running","guest":"test""#),
            "{back}"
        );
        assert_eq!("low".parse::<Priority>(), Ok(Priority::Low));
        assert!("urgent"
            .parse::<Priority>()
            .unwrap_err()
            .to_string()
            .contains("high, medium or low"));
        let bad = coordinator::proto::VmRole {
            config: br#"{"vcpus":1,"memory":1,"disk":"d","volume":1,"priority":"urgent","state":"running","guest":"test"}"#.to_vec(),
            ..role
        };
        assert!(VmConfig::from_role(&bad).is_err());
    }
}
