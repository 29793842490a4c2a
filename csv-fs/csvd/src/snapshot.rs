//! This host's part of the snapshot protocol (like VSS with its writers):
//!
//! - `prepare`: hooks are told, open files are flushed;
//! - `freeze`: hooks quiesce their applications, the VMs whose disks are on
//!   the volume are paused (their in-flight disk writes complete first),
//!   then new writes to the volume wait at the mount while the writes in
//!   progress finish, and every open file's data and map changes reach the
//!   LUN and the coordinator. All of it within the freeze's time limit;
//!   past the limit the host thaws by itself (writes and VMs go on) and
//!   the coordinator-side snapshot is refused at `thaw`;
//! - `thaw`: maps of open files are re-read (the snapshot now shares their
//!   extents), writes go on, VMs resume, hooks are told; the reply says
//!   how long writes were held;
//! - `complete` / `abort`: hooks are told; `abort` also thaws.
//!
//! Hooks are the executables in this host's hook directory, run in name
//! order as `HOOK PHASE VolumeN SNAPSHOT` with `CSV_SNAPSHOT_PHASE`,
//! `CSV_VOLUME`, `CSV_SNAPSHOT` and `CSV_MOUNTPOINT` set. A hook that fails
//! or outlives the time left in `prepare` or `freeze` aborts the snapshot.

use crate::volumes::HostVolumes;
use coordinator::proto::{
    ErrorCode, Label as _, SnapshotPhase, SnapshotPhaseReply, SnapshotPhaseReq,
};
use coordinator::service::{ServiceError, SnapshotService};
use csv_fs::volume::{FreezeError, VolumeFs};
use hypervisor_shim::supervisor::engine::{Quiesced, VmHandle};
use hypervisor_shim::supervisor::SupervisorView;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a hook may take outside a freeze (thaw, complete, abort).
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// The freeze's time limit when the request gives none.
pub const DEFAULT_FREEZE_LIMIT: Duration = Duration::from_secs(10);

/// Why a snapshot phase failed on this host.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    /// The volume is not mounted here.
    #[error("Volume{0} is not mounted on this host")]
    NotMounted(u64),
    /// Another snapshot holds it.
    #[error("Volume{vol} is frozen for snapshot {other} already")]
    Busy {
        /// The volume.
        vol: u64,
        /// The snapshot holding it.
        other: String,
    },
    /// A thaw for a snapshot that does not hold the volume.
    #[error("Volume{vol} is not frozen for snapshot {name}")]
    NotFrozen {
        /// The volume.
        vol: u64,
        /// The snapshot.
        name: String,
    },
    /// No such phase.
    #[error("unknown snapshot phase ({})", SnapshotPhase::words())]
    Phase,
    /// A hook failed.
    #[error("hook {name} ({phase})")]
    Hook {
        /// The hook.
        name: String,
        /// The phase.
        phase: &'static str,
        /// Why.
        #[source]
        source: HookError,
    },
    /// A VM would not pause.
    #[error("pausing VM {0}")]
    Pause(
        String,
        #[source] hypervisor_shim::supervisor::engine::EngineError,
    ),
    /// Open files would not flush.
    #[error("flushing Volume{vol}: {}", std::io::Error::from_raw_os_error(*errno))]
    Flush {
        /// The volume.
        vol: u64,
        /// What the flush got.
        errno: i32,
    },
    /// The write gate.
    #[error(transparent)]
    Freeze(#[from] FreezeError),
}

/// How a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// It would not start.
    #[error("cannot run it")]
    Start(#[source] std::io::Error),
    /// It exited with a failure.
    #[error("failed ({0})")]
    Exit(std::process::ExitStatus),
    /// Waiting for it.
    #[error("waiting for it")]
    Wait(#[source] std::io::Error),
    /// It ran past its time.
    #[error("did not finish within the freeze's time limit; killed")]
    TimedOut,
}

#[derive(Debug)]
struct Session {
    name: String,
    /// When new writes started to wait.
    held_since: Instant,
    /// The VMs this freeze quiesced, and how.
    paused: Vec<(String, Arc<dyn VmHandle>, Quiesced)>,
    /// Thawed by the watchdog: the limit passed.
    expired: bool,
    thawed: bool,
}

fn resume_all(paused: &[(String, Arc<dyn VmHandle>, Quiesced)]) {
    for (name, h, how) in paused {
        if let Err(e) = h.release(*how) {
            tracing::error!(vm = %name, "resuming a VM after a snapshot: {}", coordinator::service::error_chain(&e));
        }
    }
}

/// Carries out snapshot phases for the volumes mounted on this host.
#[derive(Debug)]
pub struct SnapshotAgent {
    hooks: Option<PathBuf>,
    volumes: HostVolumes,
    vms: Option<SupervisorView>,
    sessions: Arc<Mutex<BTreeMap<u64, Session>>>,
}

impl SnapshotAgent {
    /// An agent running the hooks in `hooks`, pausing the VMs of `vms`.
    pub fn new(
        hooks: Option<PathBuf>,
        volumes: HostVolumes,
        vms: Option<SupervisorView>,
    ) -> SnapshotAgent {
        SnapshotAgent {
            hooks,
            volumes,
            vms,
            sessions: Arc::default(),
        }
    }

    /// Runs the hooks for `phase`, each within what is left until
    /// `until`; stops at the first failure when `strict`.
    fn run_hooks(
        &self,
        phase: &'static str,
        req: &SnapshotPhaseReq,
        mountpoint: &Path,
        until: Instant,
        strict: bool,
    ) -> Result<Vec<String>, PhaseError> {
        let Some(dir) = &self.hooks else {
            return Ok(Vec::new());
        };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Ok(Vec::new());
        };
        let mut hooks: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .collect();
        hooks.sort();
        let mut out = Vec::new();
        for h in hooks {
            let name = h
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match run_hook(&h, phase, req, mountpoint, until) {
                Ok(()) => out.push(format!("{name}: ok")),
                Err(source) => {
                    let e = PhaseError::Hook {
                        name: name.clone(),
                        phase,
                        source,
                    };
                    let msg = coordinator::service::error_chain(&e);
                    tracing::warn!(volume = req.volume, snapshot = %req.name, "{msg}");
                    if strict {
                        return Err(e);
                    }
                    out.push(msg);
                }
            }
        }
        Ok(out)
    }

    /// The VMs whose disks are on the volume mounted at `mountpoint`.
    fn vms_on(&self, mountpoint: &Path) -> Vec<(String, Arc<dyn VmHandle>)> {
        self.vms.as_ref().map_or_else(Vec::new, |v| {
            v.running()
                .into_iter()
                .filter(|(_, vm)| vm.disk.starts_with(mountpoint))
                .map(|(n, vm)| (n, vm.handle))
                .collect()
        })
    }

    /// One phase, as the coordinator service asks for it.
    pub fn phase(&self, req: &SnapshotPhaseReq) -> Result<SnapshotPhaseReply, PhaseError> {
        let v = self
            .volumes
            .read()
            .ok()
            .and_then(|m| m.get(&req.volume).cloned())
            .ok_or(PhaseError::NotMounted(req.volume))?;
        let (fs, mp) = (v.fs, v.mountpoint);
        let limit = if req.limit_ms == 0 {
            DEFAULT_FREEZE_LIMIT
        } else {
            Duration::from_millis(req.limit_ms.clamp(100, 600_000))
        };
        let mut reply = SnapshotPhaseReply::default();
        match req.phase() {
            SnapshotPhase::Prepare => {
                let until = Instant::now() + limit.max(HOOK_TIMEOUT);
                reply.hooks = self.run_hooks("prepare", req, &mp, until, true)?;
                fs.flush_all().map_err(|e| PhaseError::Flush {
                    vol: req.volume,
                    errno: e.code(),
                })?;
            }
            SnapshotPhase::Freeze => self.freeze(req, &fs, &mp, limit, &mut reply)?,
            SnapshotPhase::Thaw | SnapshotPhase::Abort => self.thaw(req, &fs, &mp, &mut reply)?,
            SnapshotPhase::Complete => {
                let until = Instant::now() + HOOK_TIMEOUT;
                reply.hooks = self.run_hooks("complete", req, &mp, until, false)?;
            }
            SnapshotPhase::Unspecified => return Err(PhaseError::Phase),
        }
        Ok(reply)
    }

    fn freeze(
        &self,
        req: &SnapshotPhaseReq,
        fs: &Arc<VolumeFs>,
        mp: &Path,
        limit: Duration,
        reply: &mut SnapshotPhaseReply,
    ) -> Result<(), PhaseError> {
        let until = Instant::now() + limit;
        {
            let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(other) = s.get(&req.volume).filter(|x| !x.thawed) {
                return Err(PhaseError::Busy {
                    vol: req.volume,
                    other: other.name.clone(),
                });
            }
        }
        reply.hooks = self.run_hooks("freeze", req, mp, until, true)?;
        let mut paused = Vec::new();
        for (name, h) in self.vms_on(mp) {
            match h.quiesce(until.saturating_duration_since(Instant::now())) {
                Ok(how) => {
                    tracing::info!(vm = %name, how = %how.describe(), "VM quiesced for a snapshot");
                    reply.vm_quiesce.push(format!("{name}: {}", how.describe()));
                    paused.push((name, h, how));
                }
                Err(e) => {
                    resume_all(&paused);
                    return Err(PhaseError::Pause(name, e));
                }
            }
        }
        let held_since = Instant::now();
        match fs.freeze(until) {
            Ok((drain, flush)) => {
                reply.drain_ms = drain.as_millis() as u64;
                reply.flush_ms = flush.as_millis() as u64;
            }
            Err(e) => {
                resume_all(&paused);
                return Err(e.into());
            }
        }
        reply.vms = paused.len() as u32;
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                req.volume,
                Session {
                    name: req.name.clone(),
                    held_since,
                    paused,
                    expired: false,
                    thawed: false,
                },
            );
        self.watchdog(req.volume, req.name.clone(), fs.clone(), until);
        Ok(())
    }

    fn thaw(
        &self,
        req: &SnapshotPhaseReq,
        fs: &Arc<VolumeFs>,
        mp: &Path,
        reply: &mut SnapshotPhaseReply,
    ) -> Result<(), PhaseError> {
        let thaw = req.phase() == SnapshotPhase::Thaw;
        let session = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.volume)
            .filter(|s| s.name == req.name);
        if let Some(s) = session {
            if !s.thawed {
                let t = Instant::now();
                let late = fs.thaw(thaw);
                reply.refresh_ms = t.elapsed().as_millis() as u64;
                reply.expired = s.expired || late;
                resume_all(&s.paused);
                reply.vms = s.paused.len() as u32;
            } else {
                reply.expired = true;
            }
            reply.held_ms = s.held_since.elapsed().as_millis() as u64;
        } else if thaw {
            return Err(PhaseError::NotFrozen {
                vol: req.volume,
                name: req.name.clone(),
            });
        }
        let phase = if thaw { "thaw" } else { "abort" };
        reply.hooks = self.run_hooks(phase, req, mp, Instant::now() + HOOK_TIMEOUT, false)?;
        Ok(())
    }

    /// Thaws by itself when the time limit passes before `thaw` comes.
    fn watchdog(&self, vol: u64, name: String, fs: Arc<VolumeFs>, until: Instant) {
        let sessions = self.sessions.clone();
        let _ = std::thread::Builder::new()
            .name(format!("csv-freeze-v{vol}"))
            .spawn(move || {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                let Ok(mut m) = sessions.lock() else { return };
                let Some(s) = m.get_mut(&vol).filter(|s| s.name == name && !s.thawed) else {
                    return;
                };
                tracing::warn!(
                    volume = vol,
                    snapshot = %name,
                    "freeze time limit reached before the thaw: writes and VMs resume, the snapshot will be refused"
                );
                // The commit may have happened: treat the maps as shared.
                fs.thaw(true);
                resume_all(&s.paused);
                s.thawed = true;
                s.expired = true;
            });
    }
}

impl SnapshotService for SnapshotAgent {
    fn phase(&self, req: &SnapshotPhaseReq) -> Result<SnapshotPhaseReply, ServiceError> {
        SnapshotAgent::phase(self, req).map_err(|e| {
            let code = match e {
                PhaseError::NotMounted(_) => ErrorCode::NoGroup,
                _ => ErrorCode::Invalid,
            };
            ServiceError::new(code, &e)
        })
    }
}

fn run_hook(
    hook: &Path,
    phase: &str,
    req: &SnapshotPhaseReq,
    mountpoint: &Path,
    until: Instant,
) -> Result<(), HookError> {
    let vol = format!("Volume{}", req.volume);
    let mut child = std::process::Command::new(hook)
        .arg(phase)
        .arg(&vol)
        .arg(&req.name)
        .env("CSV_SNAPSHOT_PHASE", phase)
        .env("CSV_VOLUME", &vol)
        .env("CSV_SNAPSHOT", &req.name)
        .env("CSV_MOUNTPOINT", mountpoint)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(HookError::Start)?;
    loop {
        match child.try_wait().map_err(HookError::Wait)? {
            Some(st) if st.success() => return Ok(()),
            Some(st) => return Err(HookError::Exit(st)),
            None => {}
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(phase: SnapshotPhase) -> SnapshotPhaseReq {
        SnapshotPhaseReq {
            volume: 1,
            name: "nightly".into(),
            phase: phase as i32,
            limit_ms: 0,
        }
    }

    #[test]
    fn hooks_run_in_order_and_a_failing_one_stops_a_strict_phase() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        for (name, body) in [
            (
                "10-ok",
                format!(
                    "#!/bin/sh\necho \"$1 $2 $3 $CSV_MOUNTPOINT\" >> {}\n",
                    log.display()
                ),
            ),
            ("20-fail", "#!/bin/sh\nexit 3\n".to_string()),
        ] {
            let p = d.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let agent = SnapshotAgent::new(Some(d.path().to_path_buf()), HostVolumes::default(), None);
        let until = Instant::now() + Duration::from_secs(5);
        let r = req(SnapshotPhase::Freeze);
        let e = agent
            .run_hooks("freeze", &r, Path::new("/mnt/v1"), until, true)
            .unwrap_err();
        assert!(
            coordinator::service::error_chain(&e).contains("20-fail (freeze): failed"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "freeze Volume1 nightly /mnt/v1\n"
        );
        let told = agent
            .run_hooks("complete", &r, Path::new("/mnt/v1"), until, false)
            .unwrap();
        assert_eq!(told[0], "10-ok: ok");
        assert!(told[1].contains("failed"));
    }

    #[test]
    fn a_phase_on_a_volume_not_mounted_here_says_so() {
        let agent = SnapshotAgent::new(None, HostVolumes::default(), None);
        let e = agent.phase(&req(SnapshotPhase::Prepare)).unwrap_err();
        assert!(matches!(e, PhaseError::NotMounted(1)));
        let s = SnapshotService::phase(&agent, &req(SnapshotPhase::Prepare)).unwrap_err();
        assert_eq!(s.code, ErrorCode::NoGroup);
    }
}
