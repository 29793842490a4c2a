//! The host agent: what this host serves for the others and for
//! operators beside its Raft groups (the coordinator's host services):
//! redirected block I/O from its direct paths, the file I/O of
//! FileSystemRedirected hosts, redirection on request, a failure drill's
//! SAN faults and crash, `csvctl validate`'s probe, and the volumes, VMs
//! and load in its status.

use crate::volumes::VolumesView;
use coordinator::proto::{
    self, BlockOpKind, ErrorCode, FaultKind, IoMode, PathFacts, RedirectMode,
};
use coordinator::service::{
    BlockService, ConsoleService, FaultService, FileService, ProbeService, RedirectService,
    ServiceError, StatusService,
};
use coordinator::wire::Identity;
use csv_fs::lun::SanIdentity;
use csv_fs::volume::remote::Redirector;
use hypervisor_shim::supervisor::SupervisorView;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhd::BlockIo as _;

/// Kills this host's VMs and starts csvd again after the given time down
/// (a drill's crash).
pub type CrashHook = Arc<dyn Fn(Duration) + Send + Sync>;

/// What the agent is made of.
pub struct AgentConfig {
    /// This host's identity (its node id; FileSystemRedirected hosts
    /// connect to the coordinator with it, as a client).
    pub identity: Identity,
    /// This host on the SAN (for candidate LUNs).
    pub san: SanIdentity,
    /// The addresses it serves on.
    pub listen: Vec<SocketAddr>,
    /// Its volumes.
    pub volumes: VolumesView,
    /// Its VMs (None: it runs none).
    pub vms: Option<SupervisorView>,
    /// Memory given to VM roles (bytes; 0: all it has).
    pub vm_memory: u64,
    /// What a drill's crash does.
    pub crash: CrashHook,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("node", &self.identity.node)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// The host agent.
#[derive(Debug)]
pub struct HostAgent(AgentConfig);

fn not_mounted(vol: u64) -> ServiceError {
    ServiceError::text(
        ErrorCode::NoGroup,
        format!("Volume{vol} is not mounted on this host"),
    )
}

fn unavailable(e: std::io::Error) -> ServiceError {
    ServiceError::unavailable(&e)
}

impl HostAgent {
    /// The agent of a host.
    pub fn new(cfg: AgentConfig) -> HostAgent {
        HostAgent(cfg)
    }
}

impl BlockService for HostAgent {
    fn block(&self, op: &proto::BlockOp) -> Result<bytes::Bytes, ServiceError> {
        let v = self
            .0
            .volumes
            .get(op.volume)
            .ok_or_else(|| not_mounted(op.volume))?;
        let lun = v.lun;
        if lun.is_redirected() {
            // Its own I/O goes through a peer: it must not serve others.
            return Err(ServiceError::text(
                ErrorCode::Unavailable,
                format!("this host is redirected for Volume{} too", op.volume),
            ));
        }
        let d = lun.direct();
        let cap = d.len().map_err(unavailable)?;
        let outside = |end: Option<u64>| end.is_none_or(|e| e > cap);
        match op.kind() {
            BlockOpKind::Read => {
                if op.len > 64 << 20 || outside(op.offset.checked_add(op.len)) {
                    return Err(ServiceError::text(
                        ErrorCode::Invalid,
                        format!(
                            "read of {} bytes at {} is outside the LUN",
                            op.len, op.offset
                        ),
                    ));
                }
                // The iSCSI path's own receive buffer, not a copy.
                d.read_vec(op.offset, op.len as usize)
                    .map(bytes::Bytes::from)
                    .map_err(unavailable)
            }
            BlockOpKind::Write => {
                if outside(op.offset.checked_add(op.data.len() as u64)) {
                    return Err(ServiceError::text(
                        ErrorCode::Invalid,
                        format!("write at {} is outside the LUN", op.offset),
                    ));
                }
                d.write_at(&op.data, op.offset).map_err(unavailable)?;
                Ok(bytes::Bytes::new())
            }
            BlockOpKind::Flush => d.flush().map(|()| bytes::Bytes::new()).map_err(unavailable),
            BlockOpKind::Unspecified => Err(ServiceError::text(
                ErrorCode::BadRequest,
                "a block request without its kind",
            )),
        }
    }
}

impl FileService for HostAgent {
    fn file(&self, op: &proto::FileOp) -> Result<proto::FileReply, ServiceError> {
        let v = self
            .0
            .volumes
            .get(op.volume)
            .ok_or_else(|| not_mounted(op.volume))?;
        Ok(v.fs.serve_file(op))
    }
}

impl RedirectService for HostAgent {
    fn redirect(&self, req: &proto::RedirectReq) -> Result<(), ServiceError> {
        let v = self
            .0
            .volumes
            .get(req.volume)
            .ok_or_else(|| not_mounted(req.volume))?;
        match req.mode() {
            RedirectMode::Block => v.lun.set_redirected(req.on),
            RedirectMode::FileSystem if !req.on => v.fs.set_fs_redirect(None),
            RedirectMode::FileSystem => {
                if v.fs.fs_redirector().is_none() {
                    // The coordinator's address is filled in by the
                    // volumes' loop within a second; until then files open
                    // here.
                    let me = Identity {
                        node: 0,
                        ..self.0.identity.clone()
                    };
                    v.fs.set_fs_redirect(Some(Arc::new(Redirector::new(
                        req.volume,
                        self.0.identity.node,
                        me,
                    ))));
                }
            }
        }
        Ok(())
    }
}

impl FaultService for HostAgent {
    fn fault(&self, req: &proto::FaultReq) -> Result<(), ServiceError> {
        let until = Instant::now() + Duration::from_millis(req.duration_ms);
        let any_mounted = self
            .0
            .volumes
            .all()
            .iter()
            .any(|(v, _)| req.volume == 0 || *v == req.volume);
        let need_mounted = || {
            if any_mounted {
                Ok(())
            } else {
                Err(not_mounted(req.volume))
            }
        };
        match req.kind() {
            FaultKind::SanCut => {
                need_mounted()?;
                tracing::warn!(
                    volume = req.volume,
                    "failure drill: own SAN path cut for {} ms",
                    req.duration_ms
                );
                coordinator::faults::cut_san(req.volume, until);
                Ok(())
            }
            FaultKind::SanSlow => {
                need_mounted()?;
                if req.delay_ms == 0 || req.delay_ms > 10_000 {
                    return Err(ServiceError::text(
                        ErrorCode::Invalid,
                        format!("a SAN delay of {} ms (1-10000 allowed)", req.delay_ms),
                    ));
                }
                tracing::warn!(
                    volume = req.volume,
                    "failure drill: own SAN path {} ms slower for {} ms",
                    req.delay_ms,
                    req.duration_ms
                );
                let delay = Duration::from_millis(req.delay_ms);
                coordinator::faults::slow_san(req.volume, delay, until);
                Ok(())
            }
            FaultKind::Heal => {
                coordinator::faults::heal_san(0);
                Ok(())
            }
            FaultKind::Crash => {
                let down = Duration::from_millis(req.duration_ms);
                tracing::error!("failure drill: this host crashes now and stays down {down:?}");
                // Once the answer has left.
                let hook = self.0.crash.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    hook(down)
                });
                Ok(())
            }
            FaultKind::NetCut | FaultKind::Clock | FaultKind::Unspecified => {
                Err(ServiceError::text(
                    ErrorCode::Invalid,
                    "network and clock faults are the coordinator's own",
                ))
            }
        }
    }
}

impl HostAgent {
    /// This host's paths to its volumes (and to `candidates`, LUNs that
    /// are no volume yet), each tried.
    fn paths(&self, candidates: &[String]) -> Vec<PathFacts> {
        let paths: Vec<(u64, String)> = self
            .0
            .volumes
            .paths
            .read()
            .map(|m| m.iter().map(|(v, s)| (*v, s.clone())).collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        let mut probe = |volume: u64, spec: &str, mode: IoMode| {
            let p = csv_fs::lun::san::probe(spec, &self.0.san);
            out.push(PathFacts {
                volume,
                lun: spec.to_string(),
                error: p.error,
                reached: p.reached,
                read_us: p.read_us,
                pr: p.pr as i32,
                pr_error: p.pr_error,
                mode: mode as i32,
            });
        };
        for (vol, spec) in &paths {
            let mode = match self.0.volumes.get(*vol) {
                Some(v) if v.lun.is_fenced() => IoMode::Fenced,
                Some(v) if v.lun.is_redirected() => IoMode::BlockRedirected,
                Some(_) => IoMode::Direct,
                None => IoMode::Unmounted,
            };
            probe(*vol, spec, mode);
        }
        for c in candidates.iter().take(16) {
            probe(0, c, IoMode::Unspecified);
        }
        out
    }
}

/// Whether the device at `p` opens for reading and writing.
fn opens(p: &str) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .is_ok()
}

impl ProbeService for HostAgent {
    fn facts(&self, candidates: &[String]) -> proto::HostFacts {
        let load = hypervisor_shim::supervisor::placement::sample_load();
        let qemu = hypervisor_shim::supervisor::qemu::installed();
        let accel = hypervisor_shim::supervisor::qemu::Accel::detect();
        proto::HostFacts {
            node: self.0.identity.node,
            version: env!("CARGO_PKG_VERSION").to_string(),
            now_ms: coordinator::group::now_ms(),
            kvm: opens("/dev/kvm"),
            fuse: opens("/dev/fuse"),
            vm_memory: self.0.vm_memory,
            mem_available: load.mem_available,
            listen: self.0.listen.iter().map(|a| a.to_string()).collect(),
            paths: self.paths(candidates),
            qemu_accel: if qemu {
                accel.name.to_string()
            } else {
                String::new()
            },
            qemu_accel_reason: accel.reason,
        }
    }
}

impl ConsoleService for HostAgent {
    fn console(&self, q: &proto::VmConsoleReq) -> Result<proto::VmConsoleReply, ServiceError> {
        let Some(vms) = &self.0.vms else {
            return Err(ServiceError::text(
                ErrorCode::NotFound,
                "this host runs no VMs",
            ));
        };
        match vms.console(&q.name, q.offset, q.max, &q.input) {
            Ok((data, offset, size)) => Ok(proto::VmConsoleReply { data, offset, size }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ServiceError::text(
                ErrorCode::NotFound,
                format!("VM {}: {e}", q.name),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Err(ServiceError::text(
                ErrorCode::Invalid,
                format!("VM {}: {e}", q.name),
            )),
            Err(e) => Err(unavailable(e)),
        }
    }
}

impl StatusService for HostAgent {
    fn volumes(&self) -> Vec<proto::VolumeState> {
        self.0
            .volumes
            .states
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn vms(&self) -> Vec<proto::VmRuntime> {
        self.0.vms.as_ref().map(|v| v.reports()).unwrap_or_default()
    }

    fn load(&self) -> Option<proto::HostLoadInfo> {
        Some(proto::HostLoadInfo {
            vm_memory: self.0.vm_memory,
            ..hypervisor_shim::supervisor::placement::sample_load()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::wire::Key;
    use std::sync::mpsc;

    fn agent(crash: CrashHook) -> HostAgent {
        HostAgent::new(AgentConfig {
            identity: Identity {
                node: 2,
                cluster: "t".into(),
                key: Key::from_bytes([7; 32]),
            },
            san: SanIdentity {
                initiator: "iqn.2026-12.io.csv.test:h2".into(),
                chap: None,
                node: 2,
            },
            listen: vec!["127.0.0.1:7100".parse().unwrap()],
            volumes: VolumesView::default(),
            vms: None,
            vm_memory: 4 << 30,
            crash,
        })
    }

    fn no_crash() -> CrashHook {
        Arc::new(|_| panic!("no crash expected"))
    }

    #[test]
    fn a_volume_not_mounted_here_is_refused_by_every_service() {
        let a = agent(no_crash());
        let e = a
            .block(&proto::BlockOp {
                volume: 3,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoGroup);
        assert!(e.message.contains("Volume3 is not mounted"), "{e:?}");
        let e = a
            .file(&proto::FileOp {
                volume: 3,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoGroup);
        let e = a
            .redirect(&proto::RedirectReq {
                volume: 3,
                on: true,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoGroup);
        let e = a
            .fault(&proto::FaultReq {
                kind: FaultKind::SanCut as i32,
                volume: 3,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoGroup);
    }

    #[test]
    fn the_coordinators_faults_are_not_the_agents() {
        let a = agent(no_crash());
        for kind in [FaultKind::NetCut, FaultKind::Clock, FaultKind::Unspecified] {
            let e = a
                .fault(&proto::FaultReq {
                    kind: kind as i32,
                    ..Default::default()
                })
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::Invalid, "{kind:?}");
        }
        // Healing with nothing cut is fine.
        a.fault(&proto::FaultReq {
            kind: FaultKind::Heal as i32,
            ..Default::default()
        })
        .unwrap();
    }

    #[test]
    fn a_drill_crash_runs_the_hook_after_answering() {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let a = agent(Arc::new(move |down| {
            let _ = tx.lock().unwrap().send(down);
        }));
        a.fault(&proto::FaultReq {
            kind: FaultKind::Crash as i32,
            duration_ms: 1500,
            ..Default::default()
        })
        .unwrap();
        let down = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(down, Duration::from_millis(1500));
    }

    #[test]
    fn the_status_and_probe_say_what_this_host_has() {
        let a = agent(no_crash());
        assert!(a.volumes().is_empty());
        assert!(a.vms().is_empty());
        assert_eq!(a.load().map(|l| l.vm_memory), Some(4 << 30));
        let f = a.facts(&[]);
        assert_eq!(f.listen, vec!["127.0.0.1:7100".to_string()]);
        assert!(f.paths.is_empty());
    }
}
