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

use crate::fs::VolumeFs;
use coordinator::proto::{SnapshotPhaseReply, SnapshotPhaseReq};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The VMs this host runs: name -> (disk path, control socket).
pub type VmControls = Arc<RwLock<BTreeMap<String, (PathBuf, PathBuf)>>>;

/// How long a hook may take outside a freeze (thaw, complete, abort).
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// The freeze's time limit when the request gives none.
pub const DEFAULT_FREEZE_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Session {
    name: String,
    /// When new writes started to wait.
    held_since: Instant,
    /// Control sockets of the VMs this freeze paused.
    paused: Vec<PathBuf>,
    /// Thawed by the watchdog: the limit passed.
    expired: bool,
    thawed: bool,
}

/// Carries out snapshot phases for the volumes mounted on this host.
#[derive(Debug, Default)]
pub struct SnapshotAgent {
    hooks: RwLock<Option<PathBuf>>,
    vms: RwLock<Option<VmControls>>,
    volumes: RwLock<BTreeMap<u64, (Arc<VolumeFs>, PathBuf)>>,
    sessions: Arc<Mutex<BTreeMap<u64, Session>>>,
}

/// Sends one command to a VMM's control socket.
fn vm_command(control: &Path, cmd: &str) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(control)
        .map_err(|e| format!("{}: {e}", control.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    writeln!(s, "{}", serde_json::json!({ "cmd": cmd })).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    match v.get("error").and_then(|e| e.as_str()) {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    }
}

impl SnapshotAgent {
    /// Sets the hook directory and where to find the VMs.
    pub fn configure(&self, hooks: Option<PathBuf>, vms: Option<VmControls>) {
        if let Ok(mut h) = self.hooks.write() {
            *h = hooks;
        }
        if let Ok(mut v) = self.vms.write() {
            *v = vms;
        }
    }

    /// Registers (or, with None, forgets) a mounted volume.
    /// VolumeN's filesystem on this host, if mounted.
    pub fn volume_fs(&self, vol: u64) -> Option<Arc<VolumeFs>> {
        self.volumes
            .read()
            .ok()
            .and_then(|m| m.get(&vol).map(|(f, _)| f.clone()))
    }

    pub fn set_volume(&self, vol: u64, fs: Option<(Arc<VolumeFs>, PathBuf)>) {
        if let Ok(mut m) = self.volumes.write() {
            match fs {
                Some(f) => m.insert(vol, f),
                None => m.remove(&vol),
            };
        }
    }

    /// Runs the hooks for `phase`, each within what is left until
    /// `until`; stops at the first failure when `strict`.
    fn run_hooks(
        &self,
        phase: &str,
        req: &SnapshotPhaseReq,
        mountpoint: &Path,
        until: Instant,
        strict: bool,
    ) -> Result<Vec<String>, String> {
        let Some(dir) = self.hooks.read().ok().and_then(|h| h.clone()) else {
            return Ok(Vec::new());
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
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
            let r = run_hook(&h, phase, req, mountpoint, until);
            match r {
                Ok(()) => out.push(format!("{name}: ok")),
                Err(e) => {
                    let msg = format!("hook {name} ({phase}): {e}");
                    tracing::warn!(volume = req.volume, snapshot = %req.name, "{msg}");
                    if strict {
                        return Err(msg);
                    }
                    out.push(format!("{name}: {e}"));
                }
            }
        }
        Ok(out)
    }

    fn vm_controls_on(&self, mountpoint: &Path) -> Vec<PathBuf> {
        let vms = self.vms.read().ok().and_then(|v| v.clone());
        let Some(vms) = vms else { return Vec::new() };
        let Ok(m) = vms.read() else { return Vec::new() };
        m.values()
            .filter(|(disk, _)| disk.starts_with(mountpoint))
            .map(|(_, control)| control.clone())
            .collect()
    }

    /// One phase, as the coordinator service asks for it.
    pub fn phase(&self, req: &SnapshotPhaseReq) -> Result<SnapshotPhaseReply, String> {
        let (fs, mp) = self
            .volumes
            .read()
            .ok()
            .and_then(|m| m.get(&req.volume).cloned())
            .ok_or_else(|| format!("Volume{} is not mounted on this host", req.volume))?;
        let limit = if req.limit_ms == 0 {
            DEFAULT_FREEZE_LIMIT
        } else {
            Duration::from_millis(req.limit_ms.clamp(100, 600_000))
        };
        let mut reply = SnapshotPhaseReply::default();
        match req.phase.as_str() {
            "prepare" => {
                reply.hooks = self.run_hooks(
                    "prepare",
                    req,
                    &mp,
                    Instant::now() + limit.max(HOOK_TIMEOUT),
                    true,
                )?;
                fs.flush_all()
                    .map_err(|e| format!("flushing Volume{}: {e:?}", req.volume))?;
            }
            "freeze" => {
                let start = Instant::now();
                let until = start + limit;
                {
                    let s = self.sessions.lock().map_err(|_| "poisoned")?;
                    if let Some(other) = s.get(&req.volume).filter(|x| !x.thawed) {
                        return Err(format!(
                            "Volume{} is frozen for snapshot {} already",
                            req.volume, other.name
                        ));
                    }
                }
                reply.hooks = self.run_hooks("freeze", req, &mp, until, true)?;
                let mut paused = Vec::new();
                for c in self.vm_controls_on(&mp) {
                    match vm_command(&c, "pause") {
                        Ok(()) => paused.push(c),
                        Err(e) => {
                            for p in &paused {
                                let _ = vm_command(p, "resume");
                            }
                            return Err(format!("pausing the VM at {}: {e}", c.display()));
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
                        for p in &paused {
                            let _ = vm_command(p, "resume");
                        }
                        return Err(e);
                    }
                }
                reply.vms = paused.len() as u32;
                self.sessions.lock().map_err(|_| "poisoned")?.insert(
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
            }
            "thaw" | "abort" => {
                let session = self
                    .sessions
                    .lock()
                    .map_err(|_| "poisoned")?
                    .remove(&req.volume)
                    .filter(|s| s.name == req.name);
                if let Some(s) = session {
                    if !s.thawed {
                        let t = Instant::now();
                        let late = fs.thaw(req.phase == "thaw");
                        reply.refresh_ms = t.elapsed().as_millis() as u64;
                        reply.expired = s.expired || late;
                        for p in &s.paused {
                            if let Err(e) = vm_command(p, "resume") {
                                tracing::error!(control = %p.display(), "resuming a VM after a snapshot: {e}");
                            }
                        }
                        reply.vms = s.paused.len() as u32;
                    } else {
                        reply.expired = true;
                    }
                    reply.held_ms = s.held_since.elapsed().as_millis() as u64;
                } else if req.phase == "thaw" {
                    return Err(format!(
                        "Volume{} is not frozen for snapshot {}",
                        req.volume, req.name
                    ));
                }
                let phase = req.phase.as_str();
                reply.hooks =
                    self.run_hooks(phase, req, &mp, Instant::now() + HOOK_TIMEOUT, false)?;
            }
            "complete" => {
                reply.hooks =
                    self.run_hooks("complete", req, &mp, Instant::now() + HOOK_TIMEOUT, false)?;
            }
            p => return Err(format!("unknown snapshot phase {p:?}")),
        }
        Ok(reply)
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
                for p in &s.paused {
                    let _ = vm_command(p, "resume");
                }
                s.thawed = true;
                s.expired = true;
            });
    }
}

fn run_hook(
    hook: &Path,
    phase: &str,
    req: &SnapshotPhaseReq,
    mountpoint: &Path,
    until: Instant,
) -> Result<(), String> {
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
        .map_err(|e| format!("cannot run: {e}"))?;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("failed ({st})")),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err("did not finish within the freeze's time limit; killed".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
