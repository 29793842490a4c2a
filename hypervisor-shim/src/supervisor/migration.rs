//! Migrations of this host's VMs, and their outcome in the registry.
//!
//! ```text
//! owner (source)                 coordinator              target
//!   registry: migrate_to = T ------------------------->  starts an incoming VM
//!   target's status has its listen address and token <-- (status RPC)
//!   pre-copy rounds ------------------------------------> memory
//!   target acked the state
//!   HandOver(ino, me -> T) ----> lease moves
//!   go -------------------------------------------------> target resumes
//!   registry: owner = T, last_migration = summary
//! ```
//!
//! A quick migration saves the VM to a file on its volume and stops it
//! (its disk closed), hands the lease over, and the target restores it.
//! Any failure before the hand-over resumes the VM here.

use super::engine::EngineError;
use super::role::VmConfig;
use super::{Running, Supervisor, Wanted};
use crate::migrate::{Progress, Summary};
use coordinator::client::{Client, ClientError};
use coordinator::proto::{self, VmRuntime};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Why a migration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The disk's inode (its lease is on it).
    #[error("finding the disk {path}")]
    Disk {
        /// The disk.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The coordinator refused the lease hand-over.
    #[error("handing the disk's write lease over")]
    HandOver(#[source] ClientError),
    /// The migration thread died.
    #[error("the migration thread panicked")]
    Panicked,
}

/// A migration under way on its own thread.
#[derive(Debug)]
pub(super) struct Migration {
    thread: JoinHandle<Result<Summary, MigrationError>>,
    /// Its latest progress and target host.
    progress: Arc<Mutex<(Option<Progress>, u64)>>,
}

impl Migration {
    /// Its outcome (waits for it to finish).
    pub(super) fn join(self) -> Result<Summary, MigrationError> {
        self.thread.join().unwrap_or(Err(MigrationError::Panicked))
    }

    fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Puts its progress in a VM's report.
    pub(super) fn report(&self, out: &mut VmRuntime, mem_bytes: u64) {
        let Ok(p) = self.progress.lock() else { return };
        let (p, to) = &*p;
        out.migrating_to = *to;
        if let Some(p) = p {
            out.migration = format!(
                "round {}, {} pages dirty, {:.0} MiB/s, est. downtime {:.1} ms",
                p.round, p.dirty_pages, p.bandwidth_mib_s, p.estimated_downtime_ms
            );
            let sent = p.pages_sent * 4096;
            out.migration_pct = (sent.saturating_mul(100) / mem_bytes.max(1)).min(99) as u32;
        }
    }
}

/// Hands the disk's write lease from `from` to `to`.
fn hand_over(c: &mut Client, volume: u64, ino: u64, from: u64, to: u64) -> Result<(), ClientError> {
    let op = proto::volume_op::Op::HandOver(proto::HandOverOp {
        ino,
        from,
        to,
        now: 0,
        ttl: coordinator::meta::LEASE_TTL.as_millis() as u64,
    });
    c.volume_op(volume, op).map(drop)
}

fn inode(disk: &Path) -> Result<u64, MigrationError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(disk)
        .map(|m| m.ino())
        .map_err(|source| MigrationError::Disk {
            path: disk.to_path_buf(),
            source,
        })
}

impl Supervisor {
    /// Starts the migrations asked of this host's VMs, and records the
    /// outcome of finished ones in the registry.
    pub(super) fn migrations(
        &self,
        info: &proto::ClusterInfo,
        wanted: &BTreeMap<String, Wanted>,
        running: &mut BTreeMap<String, Running>,
        c: &mut Client,
    ) {
        for (name, r) in running.iter_mut() {
            self.restored(info, name, r, c);
            if r.migration.as_ref().is_some_and(Migration::finished) {
                self.record(info, name, r, c);
                continue;
            }
            if let Some(w) = wanted.get(name) {
                self.send(info, name, w, r);
            }
        }
    }

    /// Restored from a quick migration's state and running: the registry
    /// stops asking for the restore, the file goes.
    fn restored(&self, info: &proto::ClusterInfo, name: &str, r: &mut Running, c: &mut Client) {
        let Some(state) = r.restored_from.clone() else {
            return;
        };
        let up = r
            .handle
            .status()
            .is_ok_and(|s| s.vm_state() == proto::VmState::Running);
        let role = info.vms.iter().find(|v| v.name == name);
        if let (true, Some(role)) = (up, role) {
            if let Ok(mut cfg) = VmConfig::from_role(role) {
                cfg.restore_from = None;
                let role = proto::VmRole {
                    name: name.to_string(),
                    node: role.node,
                    config: cfg.to_bytes(),
                };
                if c.set_vm_role(role).is_ok() {
                    let _ = std::fs::remove_file(&state);
                    r.restored_from = None;
                }
            }
        }
    }

    /// A finished migration: records where the VM is now.
    fn record(&self, info: &proto::ClusterInfo, name: &str, r: &mut Running, c: &mut Client) {
        let me = self.cfg.node;
        let Some(m) = r.migration.take() else {
            return;
        };
        let outcome = m.join();
        let Some(role) = info.vms.iter().find(|v| v.name == name) else {
            return;
        };
        let Ok(mut cfg) = VmConfig::from_role(role) else {
            return;
        };
        let to = cfg.migrate_to.take();
        let quick = std::mem::take(&mut cfg.migrate_quick);
        let node = match (&outcome, to) {
            (Ok(summary), Some(t)) => {
                r.migrated = true;
                if quick {
                    cfg.restore_from = Some(cfg.state_path(name));
                }
                let text = serde_json::to_string(summary).unwrap_or_default();
                tracing::info!(vm = %name, to = t, summary = %text, "VM migrated");
                cfg.last_migration = Some(text);
                t
            }
            _ => {
                let e = match &outcome {
                    Err(e) => coordinator::service::error_chain(e),
                    Ok(_) => "the role no longer names a target".into(),
                };
                tracing::error!(vm = %name, error = %e, "migration failed; the VM stays here");
                cfg.last_migration = Some(format!("failed: {e}"));
                me
            }
        };
        let role = proto::VmRole {
            name: name.to_string(),
            node,
            config: cfg.to_bytes(),
        };
        if let Err(e) = c.set_vm_role(role) {
            tracing::error!(vm = %name, error = %coordinator::client::describe(&e), "cannot record the migration");
        }
    }

    /// A migration asked for: sent once the target waits for it (live), or
    /// at once through a state file on the volume (quick).
    fn send(&self, info: &proto::ClusterInfo, name: &str, w: &Wanted, r: &mut Running) {
        let me = self.cfg.node;
        let Some(to) = w.cfg.migrate_to else { return };
        if w.incoming
            || w.owner != me
            || r.migration.is_some()
            || r.migrated
            || r.stopping.is_some()
        {
            return;
        }
        let quick = w.cfg.migrate_quick;
        let dest = if quick {
            w.cfg
                .path_on(&w.cfg.state_path(name), &self.cfg.mount_root)
                .map(|p| (p.display().to_string(), String::new()))
        } else {
            self.target_listen(info, to, name)
        };
        let Some((dest, token)) = dest else { return };
        let (handle, disk, volume) = (r.handle.clone(), r.disk.clone(), w.cfg.volume);
        let mut c = self.client(Duration::from_secs(5));
        tracing::info!(vm = %name, to, quick, %dest, "migration starts");
        let progress: Arc<Mutex<(Option<Progress>, u64)>> = Arc::new(Mutex::new((None, to)));
        let p2 = progress.clone();
        let thread = std::thread::spawn(move || {
            let ino = inode(&disk)?;
            if quick {
                let state = Path::new(&dest);
                if let Some(dir) = state.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| MigrationError::Disk {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                }
                let summary = handle.save(state)?;
                // The VMM exits and its host gives the lease back; hand it
                // over now so the target can open the disk at once. When
                // the release got there first, the lease is free anyway.
                if let Err(e) = hand_over(&mut c, volume, ino, me, to) {
                    tracing::debug!(error = %coordinator::client::describe(&e), "lease hand-over after save");
                }
                return Ok(summary);
            }
            // Reach the volume's coordinator now (a read goes to its
            // leader): the hand-over happens while the guest is paused,
            // and must not pay for a connection then.
            if let Err(e) = c.getattr(volume, ino) {
                tracing::debug!(error = %coordinator::client::describe(&e), "reaching the coordinator before the migration");
            }
            let mut on_progress = |p: &Progress| {
                if let Ok(mut x) = p2.lock() {
                    x.0 = Some(p.clone());
                }
            };
            // The switch-over: the disk's write lease goes to the target
            // (after it acknowledged the state, before it resumes).
            let mut switch_over = || {
                hand_over(&mut c, volume, ino, me, to).map_err(|e| {
                    tracing::error!(error = %coordinator::client::describe(&e), "lease hand-over failed");
                    Box::new(MigrationError::HandOver(e)) as Box<dyn std::error::Error + Send + Sync>
                })
            };
            Ok(handle.migrate(&dest, &token, &mut on_progress, &mut switch_over)?)
        });
        r.migration = Some(Migration { thread, progress });
    }

    /// Where host `to` waits for VM `name`, from its status: its address
    /// and migration token.
    fn target_listen(
        &self,
        info: &proto::ClusterInfo,
        to: u64,
        name: &str,
    ) -> Option<(String, String)> {
        let node = info.nodes.iter().find(|n| n.id == to)?;
        let st = coordinator::client::host_status(&self.cfg.identity, node)?;
        st.vms
            .into_iter()
            .find(|v| {
                v.name == name && v.state() == proto::VmState::Incoming && !v.listen.is_empty()
            })
            .map(|v| (v.listen, v.listen_token))
    }
}
