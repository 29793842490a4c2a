//! A file on the volume as positioned I/O ([`vhd::BlockIo`]): what a VM's
//! disk server opens a VHD through, so that the VM's I/O takes the
//! volume's own path and not the FUSE mount and the kernel. Reads and
//! writes go through this host's lease and extent map of the file straight
//! to the LUN (on the caller's thread: a disk server serves several
//! requests at once on threads of its own), through a peer while this
//! host's SAN path is down, or as file operations on the coordinating host
//! while this host is FileSystemRedirected: the same code the FUSE adapter
//! calls, without a trip through the kernel and back.
//! CSV's direct I/O skips the filesystem stack for VHDs the same way.
//!
//! Opening for writing takes the file's write lease (at most one host
//! writes a file); dropping the file closes it, which reports what was
//! written and gives the lease back.

use super::ops::AttrChange;
use super::{Blocking, VolumeFs};
use coordinator::meta::ROOT;
use coordinator::proto::NodeKind;
use fuser::Errno;
use std::io;
use std::path::{Component, Path};
use std::sync::mpsc;
use std::sync::Arc;

/// Most bytes one read or write asks of the volume at once (what the FUSE
/// adapter sends at most, so the data path sees the requests it knows).
const MAX_IO: usize = 1 << 20;

/// A request of this file's never hands its thread's turn to anyone: it
/// runs on the disk server's own thread.
struct Own;

impl Blocking for Own {
    fn blocking(&self) {}
}

fn to_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.code())
}

/// One open file of a mounted volume.
#[derive(Debug)]
pub struct VolumeFile {
    fs: Arc<VolumeFs>,
    ino: u64,
    fh: u64,
}

impl VolumeFs {
    /// The inode at `path` inside the volume (relative, or absolute from
    /// the volume's root). Symbolic links are not followed: a VM's disk
    /// is named by its real path.
    pub fn resolve(&self, path: &Path) -> Result<u64, Errno> {
        let mut ino = ROOT;
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(name) => {
                    let a = self.lookup(ino, name)?;
                    if a.kind() == NodeKind::Symlink {
                        return Err(Errno::ELOOP);
                    }
                    ino = a.ino;
                }
                Component::ParentDir | Component::Prefix(_) => return Err(Errno::EINVAL),
            }
        }
        Ok(ino)
    }
}

impl VolumeFile {
    /// Opens `path` (inside the volume) on `fs`; for writing with `write`
    /// (this host takes the file's write lease).
    pub fn open(fs: &Arc<VolumeFs>, path: &Path, write: bool) -> io::Result<VolumeFile> {
        let ino = fs.resolve(path).map_err(to_io)?;
        let fh = fs.open(ino, write).map_err(to_io)?;
        Ok(VolumeFile {
            fs: fs.clone(),
            ino,
            fh,
        })
    }

    /// Its inode number.
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// Reads up to `buf.len()` (at most [`MAX_IO`]) bytes at `offset`:
    /// how many came (fewer at the end of the file). On this host's own
    /// leases and map the bytes are read on this thread straight into
    /// `buf`; as file operations on the coordinating host while this host
    /// is FileSystemRedirected.
    fn read_some(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if self.fs.remote(self.fh).is_none() {
            return self.fs.read_into(self.ino, offset, buf).map_err(to_io);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.fs.read(
            self.ino,
            self.fh,
            offset,
            buf.len() as u32,
            &Own,
            Box::new(move |r| {
                let _ = tx.send(r.map(<[u8]>::to_vec));
            }),
        );
        let data = rx
            .recv()
            .map_err(|_| io::Error::other("the volume dropped a read"))?
            .map_err(to_io)?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }

    /// Writes `data` (at most [`MAX_IO`] bytes) at `offset`: how many
    /// bytes were written.
    fn write_some(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        if self.fs.remote(self.fh).is_none() {
            return self
                .fs
                .write_data(self.ino, offset, data)
                .map(|n| n as usize)
                .map_err(to_io);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.fs.write(
            self.ino,
            self.fh,
            offset,
            data,
            &Own,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let n = rx
            .recv()
            .map_err(|_| io::Error::other("the volume dropped a write"))?
            .map_err(to_io)?;
        Ok(n as usize)
    }
}

impl vhd::BlockIo for VolumeFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let end = buf.len().min(done + MAX_IO);
            let n = self.read_some(&mut buf[done..end], offset + done as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("read past the end of the file at {}", offset + done as u64),
                ));
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let end = buf.len().min(done + MAX_IO);
            let n = self.write_some(&buf[done..end], offset + done as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the volume wrote nothing",
                ));
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.fs.fsync(self.ino, self.fh).map_err(to_io)
    }

    /// The size this host knows (its own writes included, reported or
    /// not), else the coordinator's.
    fn len(&self) -> io::Result<u64> {
        if let Some(f) = self.fs.file(self.ino) {
            if let Ok(g) = f.lock() {
                return Ok(g.size);
            }
        }
        self.fs.getattr(self.ino).map(|a| a.size).map_err(to_io)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fs
            .setattr(
                self.ino,
                AttrChange {
                    size: Some(len),
                    ..Default::default()
                },
            )
            .map(|_| ())
            .map_err(to_io)
    }
}

impl Drop for VolumeFile {
    fn drop(&mut self) {
        if let Err(e) = self.fs.release(self.fh) {
            tracing::warn!(ino = self.ino, error = ?e, "closing a disk on the volume");
        }
    }
}
