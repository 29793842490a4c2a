//! The file I/O this host does for FileSystemRedirected hosts, when it
//! coordinates the volume: each of their file operations is done here,
//! through this host's own leases, maps and path, as if one of its own
//! applications had opened the file. Files opened for a host the cluster
//! has down are closed, so their leases do not outlive it.

use super::errno::io_errno;
use super::VolumeFs;
use coordinator::meta::is_snapshot_ino;
use coordinator::proto::{self, FileOpKind};
use fuser::Errno;
use vhd::BlockIo as _;

impl VolumeFs {
    /// Does a FileSystemRedirected host's file operation here.
    pub fn serve_file(&self, op: &proto::FileOp) -> proto::FileReply {
        let owned = |h: u64| self.handle_ino(h) == Some(op.ino);
        let r: Result<proto::FileReply, Errno> = match op.kind() {
            FileOpKind::Open if is_snapshot_ino(op.ino) && op.write => Err(Errno::EROFS),
            FileOpKind::Open => self.open_file(op.ino, op.write).map(|h| {
                if let Ok(mut m) = self.served_for.lock() {
                    m.insert(h, op.from);
                }
                proto::FileReply {
                    handle: h,
                    ..Default::default()
                }
            }),
            FileOpKind::Unspecified => Err(Errno::EINVAL),
            _ if !owned(op.handle) => Err(Errno::EBADF),
            FileOpKind::Read => {
                let len = op.len.min(8 << 20) as u32;
                self.read_data(op.ino, op.offset, len, |b| {
                    Ok(proto::FileReply {
                        data: bytes::Bytes::copy_from_slice(b),
                        ..Default::default()
                    })
                })
            }
            FileOpKind::Write => {
                self.write_data(op.ino, op.offset, &op.data)
                    .map(|n| proto::FileReply {
                        written: n,
                        ..Default::default()
                    })
            }
            FileOpKind::Sync => match self.file(op.ino) {
                Some(f) => match f.lock() {
                    Ok(mut g) => self
                        .lun
                        .flush()
                        .map_err(|e| io_errno(&e))
                        .and_then(|()| self.report(op.ino, &mut g))
                        .map(|()| proto::FileReply::default()),
                    Err(_) => Err(Errno::EIO),
                },
                None => Err(Errno::EBADF),
            },
            FileOpKind::Release => {
                if let Ok(mut m) = self.served_for.lock() {
                    m.remove(&op.handle);
                }
                self.release_handle(op.handle)
                    .map(|()| proto::FileReply::default())
            }
        };
        r.unwrap_or_else(|e| proto::FileReply {
            errno: e.code(),
            ..Default::default()
        })
    }

    /// Closes the files this host opened for `host` (a FileSystemRedirected
    /// host the cluster now has down), so their leases do not outlive it.
    pub fn release_served_for(&self, host: u64) -> usize {
        let handles: Vec<u64> = match self.served_for.lock() {
            Ok(mut m) => {
                let h: Vec<u64> = m
                    .iter()
                    .filter(|(_, from)| **from == host)
                    .map(|(h, _)| *h)
                    .collect();
                for x in &h {
                    m.remove(x);
                }
                h
            }
            Err(_) => return 0,
        };
        for h in &handles {
            let _ = self.release_handle(*h);
        }
        handles.len()
    }
}
