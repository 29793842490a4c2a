//! FileSystemRedirected: a host's file I/O done by the volume's coordinator.
//!
//! In this mode (forced by an operator with `csvctl volume redirect N
//! --node X on --mode filesystem`, for maintenance of a host's SAN path or
//! while something must see every write in one place) the host does no I/O
//! on the LUN and holds no write lease: each open, read, write, sync and
//! close of a file is sent, as a file operation, to the coordinator, which
//! does it through its own mount of the volume (its leases, its extent
//! maps, its SAN path) as if one of its own applications had. Metadata
//! operations (lookup, create, rename, ...) go to the coordinator as they
//! always do. Files already open when the mode changes keep the path they
//! were opened with until they are closed.

use super::VolumeFs;
use coordinator::proto::{self, request, response, FileOpKind};
use coordinator::wire::Identity;
use fuser::Errno;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A file open through the coordinator.
#[derive(Debug, Clone, Copy)]
pub struct RemoteHandle {
    /// The coordinator that opened it (it serves the handle until closed,
    /// even if the coordinator role moves on).
    pub addr: SocketAddr,
    /// Its handle there.
    pub handle: u64,
    /// The file.
    pub ino: u64,
}

/// This host's side: where file I/O goes, and the handles open there.
pub struct Redirector {
    vol: u64,
    node: u64,
    /// The coordinator's addresses (None: not known yet; empty: this host
    /// is the coordinator).
    target: Mutex<Option<Vec<SocketAddr>>>,
    /// Local file handle → the coordinator's.
    pub handles: Mutex<HashMap<u64, RemoteHandle>>,
    conns: crate::lun::PeerConns,
    /// File operations sent so far.
    pub ops: AtomicU64,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("vol", &self.vol)
            .finish_non_exhaustive()
    }
}

impl Redirector {
    /// File I/O of VolumeN on host `node` to the coordinator at `target`.
    pub fn new(vol: u64, node: u64, me: Identity) -> Redirector {
        Redirector {
            vol,
            node,
            target: Mutex::new(None),
            handles: Mutex::new(HashMap::new()),
            conns: crate::lun::PeerConns::new(me, Duration::from_secs(30)),
            ops: AtomicU64::new(0),
        }
    }

    /// Follows the coordinator (new opens go to the new one); empty when
    /// this host is the coordinator.
    pub fn set_target(&self, t: Vec<SocketAddr>) {
        if let Ok(mut x) = self.target.lock() {
            *x = Some(t);
        }
    }

    /// Where new opens go (None: the coordinator is not known yet).
    pub fn target(&self) -> Option<Vec<SocketAddr>> {
        self.target.lock().ok().and_then(|t| t.clone())
    }

    /// Sends `op` to `a`; the coordinator's answer.
    fn send(&self, a: SocketAddr, mut op: proto::FileOp) -> Result<proto::FileReply, Errno> {
        op.volume = self.vol;
        op.from = self.node;
        let resp = self
            .conns
            .exchange(a, request::Body::File(op))
            .map_err(|e| {
                tracing::warn!(
                    volume = self.vol,
                    "file I/O through {a} failed: {}",
                    coordinator::service::error_chain(&e)
                );
                Errno::EIO
            })?;
        self.ops.fetch_add(1, Ordering::Relaxed);
        match resp.result {
            Some(response::Result::Reply(proto::Reply {
                value: Some(proto::reply::Value::File(r)),
            })) if r.errno == 0 => Ok(r),
            Some(response::Result::Reply(proto::Reply {
                value: Some(proto::reply::Value::File(r)),
            })) => Err(Errno::from_i32(r.errno)),
            other => {
                tracing::warn!(volume = self.vol, "file I/O through {a}: {other:?}");
                Err(Errno::EIO)
            }
        }
    }

    /// Opens `ino` on the coordinator; records local handle `fh`.
    pub fn open(&self, fh: u64, ino: u64, write: bool) -> Result<(), Errno> {
        let targets = self.target().unwrap_or_default();
        let mut last = Errno::EIO;
        for a in targets {
            match self.send(
                a,
                proto::FileOp {
                    ino,
                    kind: FileOpKind::Open as i32,
                    write,
                    ..Default::default()
                },
            ) {
                Ok(r) => {
                    self.handles.lock().map_err(|_| Errno::EIO)?.insert(
                        fh,
                        RemoteHandle {
                            addr: a,
                            handle: r.handle,
                            ino,
                        },
                    );
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The remote handle behind local `fh`, if it is one.
    pub fn handle(&self, fh: u64) -> Option<RemoteHandle> {
        self.handles.lock().ok()?.get(&fh).copied()
    }

    /// Reads through the coordinator.
    pub fn read(&self, h: RemoteHandle, off: u64, len: u32) -> Result<bytes::Bytes, Errno> {
        self.send(
            h.addr,
            proto::FileOp {
                ino: h.ino,
                kind: FileOpKind::Read as i32,
                offset: off,
                len: u64::from(len),
                handle: h.handle,
                ..Default::default()
            },
        )
        .map(|r| r.data)
    }

    /// Writes through the coordinator.
    pub fn write(&self, h: RemoteHandle, off: u64, data: &[u8]) -> Result<u32, Errno> {
        self.send(
            h.addr,
            proto::FileOp {
                ino: h.ino,
                kind: FileOpKind::Write as i32,
                offset: off,
                data: bytes::Bytes::copy_from_slice(data),
                handle: h.handle,
                ..Default::default()
            },
        )
        .map(|r| r.written)
    }

    /// fsync/flush through the coordinator.
    pub fn sync(&self, h: RemoteHandle) -> Result<(), Errno> {
        self.send(
            h.addr,
            proto::FileOp {
                ino: h.ino,
                kind: FileOpKind::Sync as i32,
                handle: h.handle,
                ..Default::default()
            },
        )
        .map(drop)
    }

    /// Closes local `fh` and its remote handle.
    pub fn release(&self, fh: u64) -> Result<(), Errno> {
        let Some(h) = self.handles.lock().map_err(|_| Errno::EIO)?.remove(&fh) else {
            return Err(Errno::EBADF);
        };
        self.send(
            h.addr,
            proto::FileOp {
                ino: h.ino,
                kind: FileOpKind::Release as i32,
                handle: h.handle,
                ..Default::default()
            },
        )
        .map(drop)
    }
}

impl VolumeFs {
    /// Opens `ino` through the coordinator when FileSystemRedirected (and
    /// this host is not the coordinator); None otherwise.
    pub(crate) fn remote_open(&self, ino: u64, write: bool) -> Option<Result<u64, Errno>> {
        let r = self.fs_redirector()?;
        // Until the coordinator is known (a second at most), and on the
        // coordinator itself, files open here.
        if r.target().is_none_or(|t| t.is_empty()) {
            return None;
        }
        let fh = self.next_handle();
        Some(r.open(fh, ino, write).map(|()| fh))
    }

    /// The coordinator's handle behind `fh`, if the file was opened there.
    pub(crate) fn remote(&self, fh: u64) -> Option<(Arc<Redirector>, RemoteHandle)> {
        let r = self.fs_redirect.read().ok()?.clone()?;
        let h = r.handle(fh)?;
        Some((r, h))
    }
}
