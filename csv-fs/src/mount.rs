//! One volume mounted on this host: its own path to the LUN opened (an
//! iSCSI session registered for fencing, or a LUN file), the superblock
//! checked, the redirecting LUN, the filesystem and its FUSE session over
//! the guard. The node daemon decides which volumes to mount; this does
//! one.

use crate::fuse::mount::{
    clear_stale_mount, mount_fuse, mounts_at, prepare_mountpoint, release_guard, MountError, GUARD,
};
use crate::fuse::Mounted;
use crate::lun::{san, IscsiPath, Notify, RedirectingLun, Reopen, SanError, SanIdentity};
use crate::superblock::{Superblock, SuperblockError};
use crate::volume::{ClientPool, VolumeConfig, VolumeFs};
use coordinator::client::Client;
use coordinator::proto::VolumeInfo;
use coordinator::wire::Identity;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Why a volume did not mount.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The LUN file or device.
    #[error("opening LUN {path}")]
    OpenLun {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The iSCSI path.
    #[error(transparent)]
    San(#[from] SanError),
    /// The LUN's superblock.
    #[error("{path}")]
    Superblock {
        /// The path as described.
        path: String,
        /// Why.
        #[source]
        source: SuperblockError,
    },
    /// The LUN holds another volume.
    #[error("{path} holds Volume{found}, not Volume{want}")]
    WrongVolume {
        /// The path as described.
        path: String,
        /// What it holds.
        found: u64,
        /// What the registry says.
        want: u64,
    },
    /// The kernel mount.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The FUSE session.
    #[error("starting the FUSE session on {path}")]
    Session {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// When the latest read of the cluster registry that had this host up
/// started: a reopened iSCSI path registers its reservation key again
/// only after such a read (see [`VolumeMount::mount`]).
pub type UpRead = Arc<Mutex<Option<Instant>>>;

/// How this host mounts volumes.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// This host's node id (the lease holder).
    pub node: u64,
    /// Directory under which `VolumeN` are mounted.
    pub root: PathBuf,
    /// Credentials for the coordinator service.
    pub identity: Identity,
    /// Where to reach it (this host first).
    pub endpoints: Vec<SocketAddr>,
    /// FUSE worker threads per volume.
    pub threads: usize,
    /// Of those, how many read the kernel's requests at a time.
    pub readers: usize,
    /// How reads move access times ([`VolumeFs::set_atime_mode`]).
    pub atime: crate::volume::AtimeMode,
    /// Mount a guard under each volume ([`prepare_mountpoint`]).
    pub guard: bool,
    /// This host on the SAN (for volumes on iSCSI LUNs).
    pub san: SanIdentity,
    /// The other hosts' addresses (redirected I/O goes there).
    pub peers: Vec<SocketAddr>,
}

impl MountConfig {
    /// Where VolumeN is mounted.
    pub fn mountpoint(&self, n: u64) -> PathBuf {
        self.root.join(format!("Volume{n}"))
    }
}

/// A mounted volume.
pub struct VolumeMount {
    /// The filesystem.
    pub fs: Arc<VolumeFs>,
    /// Its LUN.
    pub lun: Arc<RedirectingLun>,
    /// How this host reaches the LUN, for people.
    pub path: String,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl std::fmt::Debug for VolumeMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeMount")
            .field("path", &self.path)
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

/// This host's own path to a volume's LUN: the LUN, the iSCSI session
/// behind it (None: a LUN file or device), and how it is described.
type OwnPath = (Arc<dyn vhd::BlockIo>, Option<IscsiPath>, String);

/// Opens this host's own path to volume `v`'s LUN.
fn open_own_path(
    cfg: &MountConfig,
    v: &VolumeInfo,
    lun_file: Option<&Path>,
) -> Result<OwnPath, VolumeError> {
    match (lun_file, v.lun.starts_with("iscsi://")) {
        (None, true) => {
            let p = san::open(&v.lun, &cfg.san, v.number)?;
            if cfg.san.node != 0 {
                // Joining the LUN's registrants: only they can write.
                let key = san::pr_key(cfg.san.node);
                if let Err(e) = san::pr_register(&p.lun, key) {
                    tracing::warn!(
                        "Volume{}: fencing by persistent reservation is not available on {}: {}",
                        v.number,
                        p.describe,
                        coordinator::service::error_chain(&e)
                    );
                }
            }
            let lun: Arc<dyn vhd::BlockIo> = p.lun.clone();
            let d = p.describe.clone();
            Ok((lun, Some(p), d))
        }
        (over, _) => {
            let path = over.map_or_else(|| PathBuf::from(&v.lun), Path::to_path_buf);
            let f =
                vhd::io::DirectFile::open(&path, true).map_err(|source| VolumeError::OpenLun {
                    path: path.clone(),
                    source,
                })?;
            Ok((Arc::new(f), None, format!("LUN file {}", path.display())))
        }
    }
}

/// How a failed iSCSI path is opened again (a new login). A new session
/// is a new I_T nexus to the target, which may not carry the old one's
/// registration (tgtd keeps the key listed, but refuses the new nexus's
/// writes). So it registers again before I/O goes back to it, and only
/// after a registry read that started once the path was found down had
/// this host up: a key the cluster leader preempted was preempted while
/// the registry had this host down, so a fenced host does not let itself
/// back in.
fn reopen(url: String, who: SanIdentity, vol: u64, up_read: UpRead) -> Reopen {
    let lost_at: Mutex<Option<Instant>> = Mutex::new(None);
    Box::new(move || {
        let p = san::open(&url, &who, vol)?;
        if who.node != 0 {
            let key = san::pr_key(who.node);
            let now = Instant::now();
            let since = match lost_at.lock() {
                Ok(mut l) => *l.get_or_insert(now),
                Err(_) => now,
            };
            let up_after = up_read
                .lock()
                .ok()
                .and_then(|u| *u)
                .is_some_and(|u| u > since);
            if !up_after {
                return Err(SanError::NotUpYet { key });
            }
            san::pr_register(&p.lun, key)?;
            if let Ok(mut l) = lost_at.lock() {
                *l = None;
            }
        }
        let lun: Arc<dyn vhd::BlockIo> = p.lun.clone();
        let keep: Box<dyn std::any::Any + Send + Sync> = Box::new(p);
        Ok((lun, keep))
    })
}

impl VolumeMount {
    /// Mounts volume `v` at its mount point: over `lun_file` when this
    /// host has its own path to the LUN (else the registry's). `notify`
    /// makes, from the own path's description, what is told when the
    /// volume's I/O switches between its own path and a peer.
    pub fn mount(
        cfg: &MountConfig,
        v: &VolumeInfo,
        lun_file: Option<&Path>,
        up_read: UpRead,
        notify: impl FnOnce(&str) -> Notify,
    ) -> Result<VolumeMount, VolumeError> {
        let (lun, san, path) = open_own_path(cfg, v, lun_file)?;
        let sb = Superblock::read(lun.as_ref()).map_err(|source| VolumeError::Superblock {
            path: path.clone(),
            source,
        })?;
        if sb.number != v.number {
            return Err(VolumeError::WrongVolume {
                path,
                found: sb.number,
                want: v.number,
            });
        }
        let mp = cfg.mountpoint(v.number);
        prepare_mountpoint(&mp, cfg.guard)?;
        // An iSCSI path is reopened (a new login) when it failed; a LUN
        // file is probed as it is.
        let again = san
            .as_ref()
            .map(|_| reopen(v.lun.clone(), cfg.san.clone(), v.number, up_read));
        let keep = san.map(|p| Box::new(p) as Box<dyn std::any::Any + Send + Sync>);
        let rl = RedirectingLun::new(
            v.number,
            lun,
            keep,
            again,
            cfg.identity.clone(),
            cfg.peers.clone(),
            Some(notify(&path)),
        );
        let (me, endpoints) = (cfg.identity.clone(), cfg.endpoints.clone());
        let fs = VolumeFs::new(VolumeConfig {
            vol: v.number,
            node: cfg.node,
            lun: rl.clone(),
            capacity: v.capacity,
            clients: ClientPool::new(move || Client::new(me.clone(), endpoints.clone())),
        });
        fs.set_atime_mode(cfg.atime);
        // Few readers pay where reads and writes do not block a thread (a
        // LUN file or block device, asynchronous I/O); on an iSCSI path
        // every read and write waits, so every thread reads.
        let readers = if rl.direct().direct_fd().is_some() {
            cfg.readers
        } else {
            cfg.threads
        };
        let mut config = fuser::Config::default();
        // VMs may run as other users than csvd.
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(cfg.threads.max(1));
        config.clone_fd = true;
        let dev = mount_fuse(&mp, v.number)?;
        let adapter = Mounted::new(fs.clone(), readers.min(cfg.threads).max(1));
        let session = fuser::Session::from_fd(adapter, dev, fuser::SessionACL::All, config)
            .and_then(fuser::Session::spawn)
            .map_err(|source| {
                clear_stale_mount(&mp);
                VolumeError::Session {
                    path: mp.clone(),
                    source,
                }
            })?;
        tracing::info!("Volume{} mounted at {} ({path})", v.number, mp.display());
        Ok(VolumeMount {
            fs,
            lun: rl,
            path,
            mountpoint: mp,
            session: Some(session),
        })
    }

    /// Unmounts it: the FUSE session ends, the guard goes.
    pub fn unmount(mut self) {
        self.fs.shutdown();
        let mp = self.mountpoint.clone();
        let n = self.fs.number();
        if let Some(s) = self.session.take() {
            // The volume's own mount is the top one at mp (the guard
            // under it); the session ends when it is gone.
            let own = mounts_at(&mp)
                .last()
                .is_some_and(|(src, kind)| kind.starts_with("fuse") && src != GUARD);
            match own.then(|| nix::mount::umount(&mp)) {
                Some(Ok(())) => {
                    if let Err(e) = s.join() {
                        tracing::warn!("unmount Volume{n}: {e}");
                    }
                }
                r => {
                    if let Some(Err(e)) = r {
                        tracing::warn!("unmount Volume{n}: {e}; detaching it");
                    }
                    clear_stale_mount(&mp);
                }
            }
        }
        release_guard(&mp);
        tracing::info!("Volume{n} unmounted");
    }
}
