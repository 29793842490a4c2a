//! What the supervisor needs of a VM engine: start a VM's process from a
//! role's configuration, and act on it while it runs. `csv-vmm` is one
//! engine ([`super::csv_vmm`]); another (QEMU) plugs in the same way: a
//! module implementing [`Engine`] and a variant of [`EngineKind`], which
//! is what a host's settings name. The supervisor and the node daemon do
//! not change.

use super::role::VmConfig;
use crate::control::proto::Status;
use crate::migrate::{Progress, Summary};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why an engine could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Starting the VM's process.
    #[error("starting {program} for VM {vm}")]
    Start {
        /// The program.
        program: PathBuf,
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its run directory or log.
    #[error("{what} {path}")]
    Files {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM did not do what it was asked.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The role's configuration does not suit the engine.
    #[error("VM {vm}: {what}")]
    Config {
        /// The VM.
        vm: String,
        /// What does not suit.
        what: String,
    },
    /// A process the VM needs exited.
    #[error("VM {vm}: {what} exited ({status}): {log}")]
    Exited {
        /// Which process.
        what: &'static str,
        /// The VM.
        vm: String,
        /// How.
        status: std::process::ExitStatus,
        /// The last lines of its log.
        log: String,
    },
    /// QEMU's monitor.
    #[error("QEMU monitor{}", if vm.is_empty() { String::new() } else { format!(" of VM {vm}") })]
    Qmp {
        /// The VM (empty where the caller names it).
        vm: String,
        /// Why.
        #[source]
        source: crate::qemu::qmp::QmpError,
    },
    /// A migration QEMU gave up, with QEMU's reason.
    #[error("migration: {0}")]
    Migration(String),
    /// Typing on the VM's serial console.
    #[error("typing on the VM's serial console")]
    Console(#[source] std::io::Error),
    /// The VM's disk does not open for serving.
    #[error("VM {vm}: serving its disk")]
    Disk {
        /// The role.
        vm: String,
        /// Why.
        #[source]
        source: Box<crate::qemu::blk::DiskServerError>,
    },
}

/// The engines this build has, as a host's settings name them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// `csv-vmm`, the project's VMM.
    #[default]
    CsvVmm,
    /// QEMU (`qemu-system-x86_64`), for real guests.
    Qemu,
}

impl EngineKind {
    /// Every engine, in the order `--help` lists them.
    pub const ALL: [EngineKind; 2] = [EngineKind::CsvVmm, EngineKind::Qemu];

    /// The name settings use.
    pub fn label(self) -> &'static str {
        match self {
            EngineKind::CsvVmm => "csv-vmm",
            EngineKind::Qemu => "qemu",
        }
    }

    /// The engine, running `program` (None: the engine's own default).
    pub fn engine(self, program: Option<&Path>) -> Arc<dyn Engine> {
        match self {
            EngineKind::CsvVmm => Arc::new(super::csv_vmm::CsvVmm {
                program: program.map_or_else(super::csv_vmm::default_program, Path::to_path_buf),
            }),
            EngineKind::Qemu => Arc::new(super::qemu::Qemu {
                program: program.map_or_else(super::qemu::default_program, Path::to_path_buf),
            }),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

/// A name that is no engine of this build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a VM engine of this build (csv-vmm, qemu)")]
pub struct UnknownEngine(pub String);

impl std::str::FromStr for EngineKind {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<EngineKind, UnknownEngine> {
        EngineKind::ALL
            .into_iter()
            .find(|k| k.label() == s)
            .ok_or_else(|| UnknownEngine(s.to_string()))
    }
}

/// Makes a VM's process die when the process that started it (csvd)
/// dies: a host without csvd is failed over, and its VMs must not go on
/// writing their disks.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec and
    // only calls prctl(2), which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The last three lines of a VM process's log, on one line (why it
/// failed, for `vm status`).
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// How a VM starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Boots afresh.
    Boot,
    /// From a saved state (a quick migration's file).
    Restore(PathBuf),
    /// Waits for a live migration on `listen`, from a source holding
    /// `token` (hex).
    Incoming {
        /// Where (a port of the kernel's choice on this address).
        listen: SocketAddr,
        /// The migration token.
        token: String,
    },
}

/// A VM to start on this host.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The role's name.
    pub name: String,
    /// The role's configuration.
    pub config: VmConfig,
    /// Its disk as this host mounts it.
    pub disk: PathBuf,
    /// The kernel to boot directly (a real guest), as this host sees it;
    /// None: firmware boots the disk.
    pub kernel: Option<PathBuf>,
    /// Its initramfs.
    pub initrd: Option<PathBuf>,
    /// Where its control socket and logs go.
    pub run_dir: PathBuf,
    /// How it starts.
    pub start: Start,
    /// Where its disk's bytes come from (engines that serve the disk
    /// themselves open it here).
    pub disks: Arc<dyn crate::disk::DiskSource>,
}

/// An engine: starts VMs.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// Its name (what `csvctl vm status` shows).
    fn name(&self) -> &'static str;
    /// Starts a VM's process. It dies with this host's supervisor.
    fn start(&self, vm: &VmSpec) -> Result<Box<dyn Instance>, EngineError>;
}

/// A VM's process.
pub trait Instance: Send + std::fmt::Debug {
    /// Its process id.
    fn pid(&self) -> u32;
    /// Its exit status, once it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus>;
    /// Kills it at once.
    fn kill(&mut self);
    /// The last lines of its log (why it failed).
    fn log_tail(&self) -> String;
    /// What can be asked of it from any thread.
    fn handle(&self) -> Arc<dyn VmHandle>;
}

/// How a VM was made consistent for a snapshot of its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiesced {
    /// Its vCPUs were paused (crash-consistent: what a power cut leaves).
    Paused,
    /// Its guest agent froze this many filesystems (application-
    /// consistent: the guest flushed and holds its writes); it runs on.
    Frozen(u32),
}

impl Quiesced {
    /// What `snapshot run` reports.
    pub fn describe(self) -> String {
        match self {
            Quiesced::Paused => "paused".into(),
            Quiesced::Frozen(n) => format!("{n} filesystem(s) frozen by the guest agent"),
        }
    }
}

/// What can be asked of a running VM (from the supervisor, a migration's
/// thread, the snapshot agent).
pub trait VmHandle: Send + Sync + std::fmt::Debug {
    /// Where it stands.
    fn status(&self) -> Result<Status, EngineError>;
    /// Pauses its vCPUs (in-flight disk writes complete first).
    fn pause(&self) -> Result<(), EngineError>;
    /// Resumes it.
    fn resume(&self) -> Result<(), EngineError>;
    /// Makes it consistent for a snapshot, within `limit`: an engine that
    /// can ask the guest to freeze its filesystems does; otherwise, or
    /// when the guest does not answer, the VM is paused.
    fn quiesce(&self, limit: std::time::Duration) -> Result<Quiesced, EngineError> {
        let _ = limit;
        self.pause().map(|()| Quiesced::Paused)
    }
    /// Undoes [`VmHandle::quiesce`].
    fn release(&self, how: Quiesced) -> Result<(), EngineError> {
        let _ = how;
        self.resume()
    }
    /// Types `bytes` on its serial console (what `csvctl vm console
    /// --interactive` sends); engines without console input refuse.
    fn console_input(&self, bytes: &[u8]) -> Result<(), EngineError> {
        let _ = bytes;
        Err(EngineError::Console(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this engine's serial console takes no input",
        )))
    }
    /// Stops it: its disk is flushed and closed, its process exits.
    fn stop(&self) -> Result<(), EngineError>;
    /// Saves its state to `path` and stops it (a quick migration).
    fn save(&self, path: &Path) -> Result<Summary, EngineError>;
    /// Live-migrates it to a VM waiting at `to` with `token`;
    /// `switch_over` runs once the target has the whole state, before it
    /// resumes (its failure gives the migration up: the VM resumes here).
    fn migrate(
        &self,
        to: &str,
        token: &str,
        progress: &mut dyn FnMut(&Progress),
        switch_over: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
    ) -> Result<Summary, EngineError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_are_named_as_settings_name_them() {
        for k in EngineKind::ALL {
            assert_eq!(k.label().parse::<EngineKind>(), Ok(k));
            assert_eq!(k.engine(Some(Path::new("/opt/x"))).name(), k.label());
        }
        let e = "qemu-kvm".parse::<EngineKind>().unwrap_err();
        assert!(e.to_string().contains("not a VM engine"), "{e}");
        assert_eq!(EngineKind::default(), EngineKind::CsvVmm);
    }
}
