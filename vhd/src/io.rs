//! Positioned I/O: what a VHD is stored on.
//!
//! The format code is generic over [`BlockIo`], so the same code runs on a
//! file, on a LUN through the cluster's client, and on memory in tests.
//! Every method takes `&self`: an implementation must allow concurrent
//! calls (positioned reads and writes do not share a file offset).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::RwLock;

/// Positioned, thread-safe I/O on something with a length.
// `len` is a byte count that can fail, not a container size: no `is_empty`.
#[allow(clippy::len_without_is_empty)]
pub trait BlockIo: Send + Sync {
    /// Fills `buf` from `offset`; fails (`UnexpectedEof`) past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the length if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reads `len` bytes at `offset` into a buffer of their own (a device
    /// that receives data into buffers, such as an iSCSI LUN, hands its
    /// own over instead of copying).
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.read_at(&mut b, offset)?;
        Ok(b)
    }
    /// The descriptor that aligned direct I/O may be submitted to by an
    /// engine of its own (Linux AIO, io_uring), bypassing this trait; None
    /// where every request must come through here.
    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl BlockIo for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// `BlockIo` through a smart pointer: the pointee does the I/O.
macro_rules! forward_block_io {
    ($($ptr:ident)::+) => {
        impl<T: BlockIo + ?Sized> BlockIo for $($ptr)::+<T> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }
            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }
            fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
                (**self).direct_fd()
            }
        }
    };
}

forward_block_io!(Box);
forward_block_io!(std::sync::Arc);

/// An in-memory file, for tests and fuzzing.
#[derive(Debug, Default)]
pub struct MemIo {
    data: RwLock<Vec<u8>>,
}

impl MemIo {
    /// A memory file holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MemIo {
            data: RwLock::new(data),
        }
    }

    /// A copy of the content.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }
}

fn poisoned() -> io::Error {
    io::Error::other("memory file lock poisoned")
}

impl BlockIo for MemIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read().map_err(|_| poisoned())?;
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= d.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&d[start..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.write().map_err(|_| poisoned())?;
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if end > d.len() {
            d.resize(end, 0);
        }
        d[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().map_err(|_| poisoned())?.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.data.write().map_err(|_| poisoned())?.resize(len, 0);
        Ok(())
    }
}

/// A file opened with `O_DIRECT`: I/O bypasses the page cache. Requests
/// that are not aligned (address, length and offset to 512 bytes, the
/// logical block size of the disks this runs on) go through an aligned
/// bounce buffer; a misaligned write reads and rewrites its edge sectors.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    direct: bool,
}

/// Alignment of O_DIRECT requests.
pub const DIRECT_ALIGN: usize = 512;
/// Alignment of bounce buffers (a page: safe for every device).
const BOUNCE_ALIGN: usize = 4096;

impl DirectFile {
    /// Opens `path` with `O_DIRECT`, or with the page cache where the file
    /// system refuses `O_DIRECT` (tmpfs, some FUSE mounts).
    pub fn open(path: &std::path::Path, write: bool) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(write).custom_flags(libc::O_DIRECT);
        match o.open(path) {
            Ok(file) => Ok(DirectFile { file, direct: true }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(path)?;
                Ok(DirectFile {
                    file,
                    direct: false,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether I/O really bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The file, for engines (io_uring) that submit I/O themselves.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        !self.direct
            || ((ptr as usize) % DIRECT_ALIGN == 0
                && len % DIRECT_ALIGN == 0
                && offset % DIRECT_ALIGN as u64 == 0)
    }
}

/// A zeroed heap buffer aligned to a page, as O_DIRECT and io_uring
/// requests need. Its memory does not move when the value does.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    mem: Memory,
    len: usize,
}

/// Where an [`AlignedBuf`]'s bytes come from.
enum Memory {
    /// The global allocator, with this layout.
    Heap(std::alloc::Layout),
    /// An anonymous mapping of this many bytes, aligned to a huge page.
    Mapped(usize),
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through &self, like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    ///
    /// A buffer of 1 MiB or more gets its own mapping, aligned to and
    /// advised onto transparent huge pages before any of it is touched
    /// (memory the allocator hands out zeroed is already in small pages).
    /// A direct I/O on a huge page pins one page instead of 256 and
    /// reaches the device as one segment: on a virtio disk with 254
    /// segments per request, a 1 MiB buffer in small pages is split into
    /// two requests, and the device is then paid twice per transfer.
    pub fn new(len: usize) -> io::Result<Self> {
        const HUGE: usize = 2 << 20;
        if len >= HUGE / 2 {
            let size = len.next_multiple_of(HUGE);
            return Self::mapped(size, HUGE, len);
        }
        let layout = std::alloc::Layout::from_size_align(len.max(1), BOUNCE_ALIGN)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf {
            ptr,
            mem: Memory::Heap(layout),
            len,
        })
    }

    /// `size` bytes (a multiple of `align`) of fresh anonymous memory at an
    /// `align`-aligned address, advised onto huge pages.
    fn mapped(size: usize, align: usize, len: usize) -> io::Result<Self> {
        let span = size.checked_add(align).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a new private anonymous mapping; no existing memory is
        // touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = (base as usize).next_multiple_of(align);
        let head = start - base as usize;
        let tail = span - head - size;
        // SAFETY: the head and tail lie inside the mapping just made and
        // outside the part kept; unmapping them cannot fail for valid
        // ranges, and a failure would only leak address space.
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((start + size) as *mut libc::c_void, tail);
            }
            // Advice only: without huge pages the buffer still works.
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        let ptr = std::ptr::NonNull::new(start as *mut u8).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf {
            ptr,
            mem: Memory::Mapped(size),
            len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of at least len bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of at least len bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

type Bounce = AlignedBuf;

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.mem {
            // SAFETY: allocated in `new` with this very layout.
            Memory::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: the mapping `mapped` kept, unmapped once.
            Memory::Mapped(size) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), size);
            },
        }
    }
}

impl BlockIo for DirectFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.file.read_exact_at(buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).next_multiple_of(a);
        let mut b = Bounce::new((end - start) as usize)?;
        let s = b.as_mut_slice();
        // The aligned range may run past the end of the file: short reads
        // there are fine as long as the requested bytes were read.
        let mut got = 0usize;
        while got < s.len() {
            match FileExt::read_at(&self.file, &mut s[got..], start + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let at = (offset - start) as usize;
        if got < at + buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&s[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.file.write_all_at(buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).next_multiple_of(a);
        let len = self.len()?;
        let mut b = Bounce::new((end - start) as usize)?;
        let s = b.as_mut_slice();
        let at = (offset - start) as usize;
        // Edge sectors that exist keep their other bytes.
        if at != 0 && start < len {
            let _ = FileExt::read_at(&self.file, &mut s[..DIRECT_ALIGN], start)?;
        }
        let tail = end - a;
        if (offset + buf.len() as u64) % a != 0 && tail < len && (tail > start || at == 0) {
            let n = s.len();
            let _ = FileExt::read_at(&self.file, &mut s[n - DIRECT_ALIGN..], tail)?;
        }
        s[at..at + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(s, start)?;
        // A write that ended mid-sector must not grow the file to the
        // sector's end.
        let want = offset + buf.len() as u64;
        if end > len && want > len && want < end {
            self.file.set_len(want)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.direct.then(|| self.file.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_file_handles_misaligned_io() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        let f = DirectFile::open(&p, true).unwrap();
        f.write_at(b"hello", 510).unwrap();
        f.write_at(&[1, 2, 3, 4], 4094).unwrap();
        assert_eq!(f.len().unwrap(), 4098);
        let mut b = [0u8; 9];
        f.read_at(&mut b, 508).unwrap();
        assert_eq!(&b, &[7, 7, b'h', b'e', b'l', b'l', b'o', 7, 7]);
        let mut b = [0u8; 4];
        f.read_at(&mut b, 4094).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(f.read_at(&mut [0u8; 4], 4096).is_err());
        let mem = std::fs::read(&p).unwrap();
        assert_eq!(&mem[510..515], b"hello");
        assert_eq!(mem[509], 7);
    }

    #[test]
    fn large_buffers_are_zeroed_and_aligned_to_a_huge_page() {
        for len in [1 << 20, (3 << 20) + 4096, 8 << 20] {
            let mut b = AlignedBuf::new(len).unwrap();
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % (2 << 20), 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(0xa5);
            assert!(b.as_slice().iter().all(|&x| x == 0xa5));
        }
        let small = AlignedBuf::new(4096).unwrap();
        assert_eq!(small.as_slice().as_ptr() as usize % 4096, 0);
        assert!(small.as_slice().iter().all(|&x| x == 0));
    }
}
