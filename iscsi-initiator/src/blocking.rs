//! A [`Lun`] as blocking positioned I/O ([`vhd::BlockIo`]), the trait the
//! format code and the filesystem use: byte offsets and lengths of any
//! alignment (edge blocks are read, merged and written back), `flush` as
//! SYNCHRONIZE CACHE.
//!
//! The calls block on the runtime whose handle is given, so they must come
//! from threads outside that runtime (FUSE workers, plain threads), never
//! from one of its own tasks.

use crate::lun::Lun;
use std::io;

/// A LUN with blocking, byte-addressed I/O.
#[derive(Debug, Clone)]
pub struct BlockingLun {
    lun: Lun,
    rt: tokio::runtime::Handle,
}

impl BlockingLun {
    /// Wraps `lun`; its I/O runs on the runtime behind `rt`.
    pub fn new(lun: Lun, rt: tokio::runtime::Handle) -> Self {
        BlockingLun { lun, rt }
    }

    /// The LUN.
    pub fn lun(&self) -> &Lun {
        &self.lun
    }

    /// Runs one of the LUN's async calls to completion (for commands that
    /// are not I/O, such as persistent reservations), from a thread outside
    /// the runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn span(&self, offset: u64, len: usize) -> io::Result<(u64, usize)> {
        let bs = u64::from(self.lun.block_size());
        let end = offset
            .checked_add(len as u64)
            .ok_or(io::ErrorKind::InvalidInput)?;
        if end > self.lun.capacity() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} run past the end of the LUN ({} bytes)",
                    self.lun.capacity()
                ),
            ));
        }
        let start = offset / bs * bs;
        Ok((start, (end.next_multiple_of(bs) - start) as usize))
    }
}

fn to_io(e: crate::Error) -> io::Error {
    let kind = match e {
        crate::Error::Fenced { .. } => io::ErrorKind::PermissionDenied,
        crate::Error::Invalid(_) => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl vhd::BlockIo for BlockingLun {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, len) = self.span(offset, buf.len())?;
        let data = self.rt.block_on(self.lun.read(start, len)).map_err(to_io)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&data[at..at + buf.len()]);
        Ok(())
    }

    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let (start, whole) = self.span(offset, len)?;
        let mut data = self
            .rt
            .block_on(self.lun.read(start, whole))
            .map_err(to_io)?;
        if start != offset || whole != len {
            let at = (offset - start) as usize;
            data.copy_within(at..at + len, 0);
            data.truncate(len);
        }
        Ok(data)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, len) = self.span(offset, buf.len())?;
        if start == offset && len == buf.len() {
            return self
                .rt
                .block_on(self.lun.write(offset, buf, false))
                .map_err(to_io);
        }
        // Partial blocks at the edges: read them, merge, write back.
        let bs = self.lun.block_size() as usize;
        let mut whole = vec![0u8; len];
        let at = (offset - start) as usize;
        self.rt
            .block_on(async {
                let first = self.lun.read(start, bs).await?;
                whole[..bs].copy_from_slice(&first);
                if len > bs {
                    let last = self.lun.read(start + (len - bs) as u64, bs).await?;
                    whole[len - bs..].copy_from_slice(&last);
                }
                whole[at..at + buf.len()].copy_from_slice(buf);
                self.lun.write(start, &whole, false).await
            })
            .map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        self.rt.block_on(self.lun.flush()).map_err(to_io)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lun.capacity())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.lun.capacity() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "a LUN's size ({} bytes) is set on the storage array, not by the initiator",
                    self.lun.capacity()
                ),
            ))
        }
    }
}
