//! A virtio-blk device on virtio-mmio (version 2), backed by a VHD through
//! the `vhd` crate (fixed, dynamic or differencing).
//!
//! Requests are served on the vCPU thread that writes the queue-notify
//! register, so none is in flight when the vCPUs are paused for a save or
//! the last round of a migration. Everything the device writes into guest
//! memory (read data, status bytes, the used ring) goes through
//! `vm-memory`, which marks those pages in the VMM's dirty bitmap, so a
//! migration sends them again.

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::vm::GuestMemoryMmap;

/// Guest-physical base of the device's registers.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of the register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// The GSI its interrupt is wired to.
pub const IRQ: u32 = 5;
/// Queue size offered.
pub const QUEUE_MAX: u16 = 64;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
pub(crate) const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// The most bytes moved between the disk and guest memory at once (a
/// longer descriptor is served piecewise, so a guest's length word never
/// sizes an allocation).
const CHUNK: usize = 1 << 20;

/// The disk behind the device.
pub type Backend = vhd::Vhd<std::fs::File>;

/// Counters for status reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlkStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
}

/// What went wrong with the disk device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// A disk of another size than the device.
    #[error("the disk is {disk} bytes, the VM's virtio-blk device {device}")]
    Size {
        /// The disk's size.
        disk: u64,
        /// The device's.
        device: u64,
    },
    /// Flushing the disk.
    #[error("flushing the disk")]
    Flush(#[source] vhd::Error),
    /// A migrated queue's state that virtio-queue refuses.
    #[error("virtio queue state: {0}")]
    Queue(String),
}

/// The device.
pub struct VirtioBlk {
    disk: Option<Arc<Backend>>,
    /// Size in bytes (fixed when the VM is created; a migration carries it).
    capacity: u64,
    queue: Queue,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    pub stats: BlkStats,
}

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("capacity", &self.capacity)
            .field("status", &self.status)
            .field("stats", &self.stats)
            .finish()
    }
}

/// The device's registers and queue as a migration carries them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkState {
    pub capacity: u64,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queue: QueueState,
}

impl BlkState {
    pub const LEN: usize = 8 + 4 * 3 + 8 + 4 * 2 + (2 * 4 + 1 + 1 + 8 * 3);

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(&self.capacity.to_le_bytes());
        v.extend_from_slice(&self.status.to_le_bytes());
        v.extend_from_slice(&self.device_features_sel.to_le_bytes());
        v.extend_from_slice(&self.driver_features_sel.to_le_bytes());
        v.extend_from_slice(&self.driver_features.to_le_bytes());
        v.extend_from_slice(&self.queue_sel.to_le_bytes());
        v.extend_from_slice(&self.interrupt_status.to_le_bytes());
        let q = &self.queue;
        for x in [q.max_size, q.next_avail, q.next_used, q.size] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.push(u8::from(q.event_idx_enabled));
        v.push(u8::from(q.ready));
        for x in [q.desc_table, q.avail_ring, q.used_ring] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    pub fn decode(
        r: &mut crate::stream::Reader<'_>,
    ) -> Result<BlkState, crate::stream::StreamError> {
        let capacity = r.u64("disk capacity")?;
        let status = r.u32("device status")?;
        let device_features_sel = r.u32("device features select")?;
        let driver_features_sel = r.u32("driver features select")?;
        let driver_features = r.u64("driver features")?;
        let queue_sel = r.u32("queue select")?;
        let interrupt_status = r.u32("interrupt status")?;
        let queue = QueueState {
            max_size: r.u16("queue max size")?,
            next_avail: r.u16("next avail")?,
            next_used: r.u16("next used")?,
            size: r.u16("queue size")?,
            event_idx_enabled: r.u8("event idx")? != 0,
            ready: r.u8("queue ready")? != 0,
            desc_table: r.u64("descriptor table")?,
            avail_ring: r.u64("avail ring")?,
            used_ring: r.u64("used ring")?,
        };
        Ok(BlkState {
            capacity,
            status,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            interrupt_status,
            queue,
        })
    }
}

impl VirtioBlk {
    /// A device for a disk of `capacity` bytes; the backend is attached
    /// separately (a migration target opens the disk only once the source
    /// has flushed it and handed it over).
    pub fn new(capacity: u64) -> Self {
        VirtioBlk {
            disk: None,
            capacity,
            queue: fresh_queue(),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            stats: BlkStats::default(),
        }
    }

    /// Attaches the disk; its size must be the device's.
    pub fn attach(&mut self, disk: Arc<Backend>) -> Result<(), BlkError> {
        if disk.size() != self.capacity {
            return Err(BlkError::Size {
                disk: disk.size(),
                device: self.capacity,
            });
        }
        self.disk = Some(disk);
        Ok(())
    }

    /// Size of the disk in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether a disk is attached.
    pub fn attached(&self) -> bool {
        self.disk.is_some()
    }

    /// Flushes the disk (before a hand-over).
    pub fn flush(&self) -> Result<(), BlkError> {
        match &self.disk {
            Some(d) => d.flush().map_err(BlkError::Flush),
            None => Ok(()),
        }
    }

    pub fn state(&self) -> BlkState {
        BlkState {
            capacity: self.capacity,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            queue: self.queue.state(),
        }
    }

    /// Takes a migrated device's state.
    pub fn restore(&mut self, s: &BlkState) -> Result<(), BlkError> {
        self.capacity = s.capacity;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.queue = Queue::try_from(s.queue).map_err(|e| BlkError::Queue(format!("{e:?}")))?;
        Ok(())
    }

    /// A register read at `offset` into the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let v: u32 = match offset {
            0x000 => 0x7472_6976, // "virt"
            0x004 => 2,
            0x008 => 2,           // block device
            0x00c => 0x0043_5356, // "CSV"
            0x010 => match self.device_features_sel {
                0 => FEATURES as u32,
                1 => (FEATURES >> 32) as u32,
                _ => 0,
            },
            0x034 => u32::from(QUEUE_MAX),
            0x044 => u32::from(self.queue.ready()),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0,
            0x100..=0x107 => {
                let b = self.capacity / 512;
                let shift = (offset - 0x100) * 8;
                (b >> shift) as u32
            }
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    /// A register write; a queue notification serves the queue. Returns
    /// whether the guest should be interrupted.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) -> bool {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let q = &mut self.queue;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => q.set_size(v as u16),
            0x044 => q.set_ready(v == 1),
            0x050 => return self.serve(mem),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    // Reset.
                    self.status = 0;
                    self.queue = fresh_queue();
                    self.driver_features = 0;
                    self.interrupt_status = 0;
                } else {
                    self.status = v;
                }
            }
            0x080 => q.set_desc_table_address(Some(v), None),
            0x084 => q.set_desc_table_address(None, Some(v)),
            0x090 => q.set_avail_ring_address(Some(v), None),
            0x094 => q.set_avail_ring_address(None, Some(v)),
            0x0a0 => q.set_used_ring_address(Some(v), None),
            0x0a4 => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
        false
    }

    fn serve(&mut self, mem: &GuestMemoryMmap) -> bool {
        const DRIVER_OK: u32 = 4;
        if self.status & DRIVER_OK == 0 || !self.queue.ready() {
            return false;
        }
        let mut served = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let disk = self.disk.clone();
            let (status, written) =
                serve_request(mem, &descs, disk.as_deref(), self.capacity, &mut self.stats);
            if status != S_OK {
                self.stats.errors += 1;
            }
            if let Some(last) = descs.last() {
                if last.is_write_only() && last.len() >= 1 {
                    let _ = mem.write_obj(status, last.addr());
                }
            }
            if self.queue.add_used(mem, head, written + 1).is_err() {
                self.stats.errors += 1;
            }
            served = true;
        }
        if served {
            self.interrupt_status |= 1;
        }
        served
    }
}

thread_local! {
    /// Each serving thread's I/O buffer (CHUNK bytes, page-aligned).
    static IO_BUF: std::cell::RefCell<Option<vhd::io::AlignedBuf>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` on this thread's CHUNK-byte aligned buffer (made at its first
/// use); an I/O error status when it cannot be had.
fn with_io_buf(f: impl FnOnce(&mut [u8]) -> (u8, u32)) -> (u8, u32) {
    IO_BUF.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = vhd::io::AlignedBuf::new(CHUNK).ok();
        }
        match slot.as_mut() {
            Some(b) => f(b.as_mut_slice()),
            None => (S_IOERR, 0),
        }
    })
}

/// A cursor over a request's data descriptors, as one run of bytes.
struct Segments<'a> {
    descs: &'a [virtio_queue::desc::split::Descriptor],
    /// The descriptor at the cursor, and how far into it.
    i: usize,
    off: u64,
}

impl Segments<'_> {
    /// Moves `buf.len()` bytes between guest memory and `buf` from the
    /// cursor on (`to_guest`: into guest memory); None when a descriptor
    /// is outside guest memory or the descriptors end first.
    fn copy<M: GuestMemory>(&mut self, mem: &M, buf: &mut [u8], to_guest: bool) -> Option<()> {
        let mut pos = 0;
        while pos < buf.len() {
            let d = self.descs.get(self.i)?;
            let left = u64::from(d.len()) - self.off;
            if left == 0 {
                self.i += 1;
                self.off = 0;
                continue;
            }
            let n = left.min((buf.len() - pos) as u64) as usize;
            let at = d.addr().checked_add(self.off)?;
            let piece = &mut buf[pos..pos + n];
            let r = if to_guest {
                mem.write_slice(piece, at)
            } else {
                mem.read_slice(piece, at)
            };
            r.ok()?;
            pos += n;
            self.off += n as u64;
        }
        Some(())
    }

    /// Fills `buf` from the guest's segments.
    fn gather<M: GuestMemory>(&mut self, mem: &M, buf: &mut [u8]) -> Option<()> {
        self.copy(mem, buf, false)
    }

    /// Copies `buf` out to the guest's segments.
    fn scatter<M: GuestMemory>(&mut self, mem: &M, buf: &mut [u8]) -> Option<()> {
        self.copy(mem, buf, true)
    }
}

/// Serves one virtio-blk request (its descriptors: header, data, status)
/// on `disk` of `capacity` bytes; returns its status and the bytes written
/// into guest memory before the status byte. Shared by the MMIO device
/// here and the vhost-user-blk backend ([`crate::qemu::blk`]); every
/// length and address comes from the guest and is checked.
pub(crate) fn serve_request<M: GuestMemory, I: vhd::BlockIo>(
    mem: &M,
    descs: &[virtio_queue::desc::split::Descriptor],
    disk: Option<&vhd::Vhd<I>>,
    capacity: u64,
    stats: &mut BlkStats,
) -> (u8, u32) {
    let Some((hdr, rest)) = descs.split_first() else {
        return (S_IOERR, 0);
    };
    let Some((_status, data)) = rest.split_last() else {
        return (S_IOERR, 0);
    };
    if hdr.len() < 16 || hdr.is_write_only() {
        return (S_IOERR, 0);
    }
    let Ok(kind) = mem.read_obj::<u32>(hdr.addr()) else {
        return (S_IOERR, 0);
    };
    let Ok(sector) = mem.read_obj::<u64>(GuestAddress(hdr.addr().0 + 8)) else {
        return (S_IOERR, 0);
    };
    let Some(disk) = disk else {
        return (S_IOERR, 0);
    };
    match kind {
        T_IN | T_OUT => {
            let Some(start) = sector.checked_mul(512) else {
                return (S_IOERR, 0);
            };
            // Every data descriptor is checked before any byte moves: a
            // bad request writes nothing.
            let mut total = 0u64;
            for d in data {
                if (kind == T_OUT) == d.is_write_only() {
                    return (S_IOERR, 0);
                }
                match total.checked_add(u64::from(d.len())) {
                    Some(t) => total = t,
                    None => return (S_IOERR, 0),
                }
            }
            if start.checked_add(total).is_none_or(|e| e > capacity) {
                return (S_IOERR, 0);
            }
            // The guest's segments (often one per 4 KiB page) are
            // gathered into, or scattered from, this thread's page-aligned
            // buffer: one disk call per CHUNK bytes of the request, not one
            // per segment, and the disk may send the buffer to the LUN with
            // O_DIRECT as it is. A descriptor's length is the guest's word
            // (firmware reads a whole kernel in one), so a long request is
            // served CHUNK by CHUNK.
            let mut segs = Segments {
                descs: data,
                i: 0,
                off: 0,
            };
            with_io_buf(|io| {
                let (mut done, mut written) = (0u64, 0u32);
                while done < total {
                    let n = (total - done).min(CHUNK as u64) as usize;
                    let buf = &mut io[..n];
                    let at = start + done;
                    if kind == T_OUT {
                        if segs.gather(mem, buf).is_none() || disk.write_at(buf, at).is_err() {
                            return (S_IOERR, written);
                        }
                    } else {
                        if disk.read_at(buf, at).is_err() || segs.scatter(mem, buf).is_none() {
                            return (S_IOERR, written);
                        }
                        written = written.saturating_add(n as u32);
                    }
                    done += n as u64;
                }
                if kind == T_OUT {
                    stats.writes += 1;
                } else {
                    stats.reads += 1;
                }
                (S_OK, written)
            })
        }
        T_FLUSH => {
            stats.flushes += 1;
            if disk.flush().is_err() {
                (S_IOERR, 0)
            } else {
                (S_OK, 0)
            }
        }
        T_GET_ID => {
            let mut id = [0u8; 20];
            id[..8].copy_from_slice(b"csv-vhd\0");
            match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(20);
                    if mem.write_slice(&id[..n], d.addr()).is_err() {
                        return (S_IOERR, 0);
                    }
                    (S_OK, n as u32)
                }
                _ => (S_IOERR, 0),
            }
        }
        _ => (S_UNSUPP, 0),
    }
}

fn fresh_queue() -> Queue {
    // QUEUE_MAX is a power of two: Queue::new cannot fail.
    Queue::new(QUEUE_MAX).unwrap_or_else(|_| unreachable!("queue size {QUEUE_MAX} is valid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const MEM: u64 = 64 << 10;

    fn device() -> (VirtioBlk, GuestMemoryMmap, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let v = vhd::Vhd::create(
            dir.path().join("d.vhd"),
            &vhd::CreateOptions::new(vhd::footer::DiskType::Fixed, 1 << 20),
        )
        .unwrap();
        let mut d = VirtioBlk::new(1 << 20);
        d.attach(Arc::new(v)).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        (d, mem, dir)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(0)).unwrap();
        mem.write_obj(sector, GuestAddress(8)).unwrap();
    }

    /// A hostile guest's descriptor chains: outside its memory, wrapping
    /// the address space, longer than the disk or than any request, a
    /// header where data should be, no status byte. Each gets an error
    /// status; none touches memory outside the guest's or panics; the
    /// device serves a good request afterwards.
    fn req(d: &mut VirtioBlk, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> (u8, u32) {
        let disk = d.disk.clone();
        serve_request(mem, descs, disk.as_deref(), d.capacity, &mut d.stats)
    }

    /// A request's data in many segments of odd sizes (as a guest's
    /// scattered pages are) lands on the disk as one run of bytes and reads
    /// back the same through another segmentation; a request with one bad
    /// descriptor among good ones writes nothing.
    #[test]
    fn segments_are_one_run_of_bytes_and_a_bad_one_spoils_the_whole_request() {
        let (mut d, mem, _dir) = device();
        let hdr = Descriptor::new(0, 16, NEXT, 1);
        let status = Descriptor::new(0x100, 1, WRITE, 0);
        let data = |addr: u64, len: u32, flags: u16| Descriptor::new(addr, len, flags | NEXT, 2);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        // Written from five pieces at scattered places, one of them empty.
        let pieces = [
            (0x8000u64, 512u32),
            (0x2000, 1536),
            (0x9000, 0),
            (0x5000, 4096),
            (0xC000, 2048),
        ];
        let mut at = 0usize;
        let mut chain = vec![hdr];
        for (addr, len) in pieces {
            mem.write_slice(&pattern[at..at + len as usize], GuestAddress(addr))
                .unwrap();
            chain.push(data(addr, len, 0));
            at += len as usize;
        }
        chain.push(status);
        header(&mem, T_OUT, 16);
        assert_eq!(req(&mut d, &mem, &chain), (S_OK, 0));
        // Read back as two pieces.
        header(&mem, T_IN, 16);
        let back = [data(0x3000, 3000, WRITE), data(0xE000, 5192, WRITE)];
        assert_eq!(
            req(&mut d, &mem, &[hdr, back[0], back[1], status]),
            (S_OK, 8192)
        );
        let mut got = vec![0u8; 8192];
        mem.read_slice(&mut got[..3000], GuestAddress(0x3000))
            .unwrap();
        mem.read_slice(&mut got[3000..], GuestAddress(0xE000))
            .unwrap();
        assert_eq!(got, pattern);
        // A good piece followed by one outside guest memory: nothing of
        // the request reaches the disk.
        mem.write_slice(&[0xEE; 512], GuestAddress(0x2000)).unwrap();
        header(&mem, T_OUT, 16);
        let bad = [hdr, data(0x2000, 512, 0), data(MEM + 4096, 512, 0), status];
        assert_eq!(req(&mut d, &mem, &bad).0, S_IOERR);
        header(&mem, T_OUT, 16);
        let mixed = [hdr, data(0x2000, 512, 0), data(0x3000, 512, WRITE), status];
        assert_eq!(req(&mut d, &mem, &mixed).0, S_IOERR);
        header(&mem, T_IN, 16);
        assert_eq!(
            req(&mut d, &mem, &[hdr, data(0x3000, 512, WRITE), status]),
            (S_OK, 512)
        );
        let mut first = [0u8; 512];
        mem.read_slice(&mut first, GuestAddress(0x3000)).unwrap();
        assert_eq!(&first[..], &pattern[..512]);
    }

    #[test]
    fn hostile_descriptor_chains_get_an_error() {
        let (mut d, mem, _dir) = device();
        let hdr = Descriptor::new(0, 16, NEXT, 1);
        let status = Descriptor::new(0x100, 1, WRITE, 0);
        let data = |addr: u64, len: u32, flags: u16| Descriptor::new(addr, len, flags | NEXT, 2);
        header(&mem, T_IN, 0);
        let reads: Vec<Vec<Descriptor>> = vec![
            // Data running past the end of guest memory.
            vec![hdr, data(MEM - 512, 4096, WRITE), status],
            // Data far outside it, and wrapping the address space.
            vec![hdr, data(1 << 40, 512, WRITE), status],
            vec![hdr, data(u64::MAX - 100, 512, WRITE), status],
            // Longer than the disk, and than any request.
            vec![hdr, data(0x1000, u32::MAX, WRITE), status],
            vec![hdr, data(0x1000, (2 * CHUNK + 512) as u32, WRITE), status],
            // A read into a buffer the device may not write.
            vec![hdr, data(0x1000, 512, 0), status],
            // The header outside guest memory, or too short.
            vec![
                Descriptor::new(MEM + 4096, 16, NEXT, 1),
                data(0x1000, 512, WRITE),
                status,
            ],
            vec![
                Descriptor::new(0, 4, NEXT, 1),
                data(0x1000, 512, WRITE),
                status,
            ],
            // No status descriptor at all, and nothing.
            vec![hdr],
            vec![],
        ];
        for (i, c) in reads.iter().enumerate() {
            assert_eq!(req(&mut d, &mem, c).0, S_IOERR, "read case {i}");
        }
        // Writes from outside guest memory, and past the disk's end.
        header(&mem, T_OUT, 0);
        assert_eq!(
            req(&mut d, &mem, &[hdr, data(MEM - 16, 512, 0), status]).0,
            S_IOERR
        );
        header(&mem, T_OUT, (1 << 20) / 512);
        assert_eq!(
            req(&mut d, &mem, &[hdr, data(0x1000, 512, 0), status]).0,
            S_IOERR
        );
        // A sector number whose byte offset overflows.
        header(&mem, T_IN, u64::MAX / 256);
        assert_eq!(
            req(&mut d, &mem, &[hdr, data(0x1000, 512, WRITE), status]).0,
            S_IOERR
        );
        // The device still serves a good request.
        mem.write_slice(&[0xAB; 512], GuestAddress(0x2000)).unwrap();
        header(&mem, T_OUT, 3);
        assert_eq!(
            req(&mut d, &mem, &[hdr, data(0x2000, 512, 0), status]),
            (S_OK, 0)
        );
        header(&mem, T_IN, 3);
        assert_eq!(
            req(&mut d, &mem, &[hdr, data(0x3000, 512, WRITE), status]),
            (S_OK, 512)
        );
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(back, [0xAB; 512]);
    }
}
