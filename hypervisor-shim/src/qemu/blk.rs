//! csv's disk backend for QEMU: a vhost-user-blk device served from a VHD
//! through the `vhd` crate (fixed, dynamic or differencing), so QEMU never
//! opens the VHD itself (its own `vpc` driver blocks live migration and
//! probes fixed VHDs as raw).
//!
//! Built on rust-vmm's `vhost-user-backend`: QEMU sends the guest's memory
//! map and the virtqueues over the unix socket, this process reads and
//! writes guest memory directly and serves requests with the same request
//! code as `csv-vmm`'s device ([`crate::virtio_blk::serve_request`]).
//!
//! Live migration: QEMU migrates a vhost-user device only if the backend
//! offers `VHOST_F_LOG_ALL` and logs what it writes into guest memory. The
//! memory here is `GuestMemoryMmap<BitmapMmapRegion>`: once QEMU hands over
//! its log (`SET_LOG_BASE`, shared memory, protocol feature `LOG_SHMFD`),
//! every write through `vm-memory` (read data, status bytes, the used ring)
//! marks its page dirty in QEMU's log, which QEMU sends again.
//!
//! The write lease: on a cluster volume one host at a time may write a
//! file. A migration target starts with the VHD open read-only (to learn
//! its size, which QEMU asks for before the guest runs) and opens it for
//! writing at the first request, which arrives only after the guest
//! resumes there, after the switch-over handed the lease to this host. The
//! source's device is stopped (`GET_VRING_BASE`) when QEMU pauses the
//! guest: batches of requests are served under one lock (several requests
//! of a batch at once, on up to 8 threads), so none is in flight then,
//! and the disk is flushed before the stop is answered.
//!
//! Counters (requests, errors, flushes) are written as JSON to a stats
//! file every second and at exit, for the engine's status.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::disk::{open_vhd, Disk, DiskSource};
use crate::virtio_blk::{serve_request, BlkStats};

/// Guest memory as this backend maps it: every region with a dirty log
/// QEMU can switch on.
type Memory = GuestMemoryMmap<BitmapMmapRegion>;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VHOST_F_LOG_ALL: u64 = 1 << 26;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Descriptors per queue.
pub const QUEUE_SIZE: usize = 256;
/// Data segments per request the guest may send: what fits, with the
/// header and status descriptors, in the smallest queue QEMU gives a
/// vhost-user-blk device (128).
const SEG_MAX: u32 = 126;
/// `struct virtio_blk_config` up to `blk_size` and the fields after it
/// that QEMU reads (zeroes: no topology, no discard).
const CONFIG_LEN: usize = 60;

/// What went wrong serving a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskServerError {
    /// The VHD does not open.
    #[error("opening the VHD {path}")]
    Open {
        /// The VHD.
        path: PathBuf,
        /// Why.
        #[source]
        source: vhd::Error,
    },
    /// The vhost-user socket or session.
    #[error("vhost-user session on {socket}: {what}")]
    Session {
        /// The socket.
        socket: PathBuf,
        /// What failed (the crate's error carries no source chain).
        what: String,
    },
}

/// How the disk is opened at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// For writing now: this host holds (or takes) the write lease.
    Write,
    /// Read-only until the first request (a migration target, whose lease
    /// arrives at the switch-over).
    WriteOnFirstRequest,
}

#[derive(Debug)]
struct Inner {
    disk: Arc<Disk>,
    writable: bool,
    stats: BlkStats,
    mem: Option<GuestMemoryAtomic<Memory>>,
}

/// A VHD served as one vhost-user-blk device.
#[derive(Debug)]
pub struct DiskServer {
    source: Arc<dyn DiskSource>,
    path: PathBuf,
    capacity: u64,
    inner: Mutex<Inner>,
    stats_file: Option<PathBuf>,
    workers: Workers,
}

fn open(source: &dyn DiskSource, path: &Path, write: bool) -> Result<Disk, DiskServerError> {
    open_vhd(source, path, write).map_err(|source| DiskServerError::Open {
        path: path.to_path_buf(),
        source,
    })
}

impl DiskServer {
    /// Opens the VHD at `path` on `source`.
    pub fn open(
        source: Arc<dyn DiskSource>,
        path: &Path,
        access: Access,
        stats_file: Option<PathBuf>,
    ) -> Result<DiskServer, DiskServerError> {
        let writable = access == Access::Write;
        let disk = open(&*source, path, writable)?;
        Ok(DiskServer {
            source,
            path: path.to_path_buf(),
            capacity: disk.size(),
            inner: Mutex::new(Inner {
                disk: Arc::new(disk),
                writable,
                stats: BlkStats::default(),
                mem: None,
            }),
            stats_file,
            workers: Workers::start(PARALLEL),
        })
    }

    /// The disk's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Its counters so far.
    pub fn stats(&self) -> BlkStats {
        self.lock().stats
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's configuration space: capacity in 512-byte sectors,
    /// the segment limit and the logical block size.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.capacity / 512).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c
    }

    /// Writes the counters to the stats file (write then rename, so a
    /// reader never sees half a file).
    pub fn write_stats(&self) {
        let Some(f) = &self.stats_file else { return };
        let text = serde_json::to_vec(&self.stats()).unwrap_or_default();
        let tmp = f.with_extension("tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }

    /// Serves the queue's available requests.
    fn serve(&self, vring: &VringRwLock<GuestMemoryAtomic<Memory>>) -> io::Result<()> {
        let mut inner = self.lock();
        let Some(atomic) = inner.mem.clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        if !inner.writable {
            // The first request after a migration: the guest runs here,
            // so the switch-over moved the lease to this host.
            match open(&*self.source, &self.path, true) {
                Ok(d) => {
                    inner.disk = Arc::new(d);
                    inner.writable = true;
                    tracing::info!(disk = %self.path.display(), "disk open for writing");
                }
                Err(e) => {
                    tracing::error!(error = %coordinator::service::error_chain(&e), "cannot open the disk for writing");
                }
            }
        }
        loop {
            vring
                .disable_notification()
                .map_err(|e| io::Error::other(format!("virtqueue: {e:?}")))?;
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                let q = state.get_queue_mut();
                match q.iter(&*mem) {
                    Ok(iter) => iter.map(|c| (c.head_index(), c.collect())).collect(),
                    Err(e) => return Err(io::Error::other(format!("virtqueue: {e:?}"))),
                }
            };
            let served =
                self.workers
                    .serve_batch(&mem, chains, &inner.disk, inner.writable, self.capacity);
            for (head, status, written, stats) in served {
                let s = &mut inner.stats;
                s.reads += stats.reads;
                s.writes += stats.writes;
                s.flushes += stats.flushes;
                s.errors += stats.errors + u64::from(status != 0);
                if vring.add_used(head, written + 1).is_err() {
                    inner.stats.errors += 1;
                }
            }
            if !vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("virtqueue: {e:?}")))?
            {
                break;
            }
        }
        vring.signal_used_queue()
    }
}

/// Most requests of one batch served at once (the guest's queue depth is
/// the batch; a 1 MiB write through the volume is worth a thread).
const PARALLEL: usize = 8;

/// A request as taken off the queue: its head index and descriptors.
type Chain = (u16, Vec<virtio_queue::desc::split::Descriptor>);

/// One request's outcome: (head, status, bytes written, counters).
type Served = (u16, u8, u32, BlkStats);

/// Serves one request, writing its status byte into guest memory.
fn serve_one<M: vm_memory::GuestMemory>(
    mem: &M,
    (head, descs): &Chain,
    disk: &Disk,
    writable: bool,
    capacity: u64,
) -> Served {
    let mut stats = BlkStats::default();
    let disk = (writable || is_read(mem, descs)).then_some(disk);
    let (status, written) = serve_request(mem, descs, disk, capacity, &mut stats);
    if let Some(last) = descs.last() {
        if last.is_write_only() && last.len() >= 1 {
            let _ = mem.write_obj(status, last.addr());
        }
    }
    (*head, status, written, stats)
}

type Job = Box<dyn FnOnce() + Send>;

/// The threads that serve a batch's requests, kept for the server's life:
/// a thread per batch would pay for its stack and, on the volume, for its
/// aligned I/O buffers (fresh pages) again at every batch.
#[derive(Debug)]
struct Workers {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    n: usize,
}

impl Workers {
    fn start(n: usize) -> Workers {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("disk-io-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(j) => j(),
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a disk I/O thread");
            }
        }
        Workers {
            jobs: Mutex::new(tx),
            n,
        }
    }

    /// Serves a batch of requests, several at once: each request's outcome
    /// in the batch's order. Requests the workers cannot take are served
    /// on this thread.
    fn serve_batch(
        &self,
        mem: &vm_memory::GuestMemoryLoadGuard<Memory>,
        chains: Vec<Chain>,
        disk: &Arc<Disk>,
        writable: bool,
        capacity: u64,
    ) -> Vec<Served> {
        if chains.len() < 2 || self.n == 0 {
            return chains
                .iter()
                .map(|c| serve_one(&**mem, c, disk, writable, capacity))
                .collect();
        }
        let per = chains.len().div_ceil(self.n);
        let groups: Vec<Vec<Chain>> = chains.chunks(per).map(<[Chain]>::to_vec).collect();
        let heads: Vec<Vec<u16>> = groups
            .iter()
            .map(|g| g.iter().map(|c| c.0).collect())
            .collect();
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<Served>)>();
        {
            let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            for (i, g) in groups.into_iter().enumerate() {
                let (m, d, tx) = (mem.clone().into_inner(), disk.clone(), tx.clone());
                let job: Job = Box::new(move || {
                    let r = g
                        .iter()
                        .map(|c| serve_one(&*m, c, &d, writable, capacity))
                        .collect();
                    let _ = tx.send((i, r));
                });
                // No worker left to take it: served on this thread.
                if let Err(std::sync::mpsc::SendError(job)) = jobs.send(job) {
                    job();
                }
            }
        }
        drop(tx);
        let mut out: Vec<Option<Vec<Served>>> = vec![None; heads.len()];
        for (i, r) in rx {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(r);
            }
        }
        // A group whose worker died is answered with I/O errors (serving
        // it again could repeat writes already done).
        out.into_iter()
            .zip(heads)
            .flat_map(|(r, heads)| {
                r.unwrap_or_else(|| {
                    heads
                        .into_iter()
                        .map(|h| (h, crate::virtio_blk::S_IOERR, 0, BlkStats::default()))
                        .collect()
                })
            })
            .collect()
    }
}

/// Whether a request only reads the disk (may be served before this host
/// may write).
fn is_read<M: vm_memory::GuestMemory>(
    mem: &M,
    descs: &[virtio_queue::desc::split::Descriptor],
) -> bool {
    descs
        .first()
        .and_then(|h| mem.read_obj::<u32>(h.addr()).ok())
        .is_some_and(|kind| kind == 0 || kind == 8)
}

impl VhostUserBackend for DiskServer {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<GuestMemoryAtomic<Memory>>;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_F_LOG_ALL
            | VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn exit_event(
        &self,
        _thread_index: usize,
    ) -> Option<(
        vmm_sys_util::event::EventConsumer,
        vmm_sys_util::event::EventNotifier,
    )> {
        // Without one the queue's worker thread never hears that QEMU
        // went away, and the process never exits.
        vmm_sys_util::event::new_event_consumer_and_notifier(
            vmm_sys_util::event::EventFlag::NONBLOCK,
        )
        .ok()
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Memory>) -> io::Result<()> {
        {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            let m = mem.memory();
            for r in m.iter() {
                tracing::debug!(
                    start = r.start_addr().0,
                    len = r.len(),
                    "guest memory region"
                );
            }
        }
        self.lock().mem = Some(mem);
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        tracing::debug!(queue_index, "queue stopped");
        // Taking the lock waits for a batch being served; then the disk
        // is flushed, before QEMU hears the device has stopped.
        let t = std::time::Instant::now();
        let mut inner = self.lock();
        let waited = t.elapsed();
        inner.stats.flushes += 1;
        let r = inner.disk.flush();
        drop(inner);
        tracing::info!(
            waited_ms = waited.as_secs_f64() * 1e3,
            flushed_ms = (t.elapsed() - waited).as_secs_f64() * 1e3,
            "disk queue stopped and flushed"
        );
        self.write_stats();
        r.map_err(|e| io::Error::other(coordinator::service::error_chain(&e)))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        match vrings.get(device_event as usize) {
            Some(v) => self.serve(v),
            None => Err(io::Error::other(format!("no queue {device_event}"))),
        }
    }
}

/// Serves `server` on the vhost-user socket `socket` to one QEMU until it
/// disconnects; the disk is flushed and the counters written at the end.
pub fn serve(server: Arc<DiskServer>, socket: &Path) -> Result<(), DiskServerError> {
    let session = |what: String| DiskServerError::Session {
        socket: socket.to_path_buf(),
        what,
    };
    let mut daemon = VhostUserDaemon::new(
        "csv-disk".to_string(),
        server.clone(),
        GuestMemoryAtomic::new(Memory::new()),
    )
    .map_err(|e| session(format!("{e}")))?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (s, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.write_stats();
                std::thread::park_timeout(std::time::Duration::from_secs(1));
            }
        })
    };
    let r = daemon.serve(socket).map_err(|e| session(format!("{e}")));
    {
        let mut inner = server.lock();
        if inner.writable {
            let _ = inner.disk.flush();
        }
        inner.stats.flushes += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.thread().unpark();
    let _ = ticker.join();
    server.write_stats();
    drop(daemon);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::LocalFiles;

    fn open_local(
        p: &Path,
        access: Access,
        stats: Option<PathBuf>,
    ) -> Result<DiskServer, DiskServerError> {
        DiskServer::open(Arc::new(LocalFiles), p, access, stats)
    }

    fn vhd(dir: &Path, size: u64) -> PathBuf {
        let p = dir.join("d.vhd");
        vhd::Vhd::create(&p, &vhd::CreateOptions::new(vhd::DiskType::Dynamic, size)).unwrap();
        p
    }

    #[test]
    fn config_space_names_the_capacity_and_limits() {
        let d = tempfile::tempdir().unwrap();
        let s = open_local(&vhd(d.path(), 64 << 20), Access::Write, None).unwrap();
        let c = s.get_config(0, CONFIG_LEN as u32);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (64 << 20) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        // Any window QEMU asks for is answered at its size.
        assert_eq!(s.get_config(8, 4), vec![0; 4]);
        assert_eq!(s.get_config(1000, 8), vec![0; 8]);
        assert_eq!(s.get_config(u32::MAX, 3).len(), 3);
    }

    #[test]
    fn migration_is_allowed_and_the_log_is_shared_memory() {
        let d = tempfile::tempdir().unwrap();
        let s = open_local(&vhd(d.path(), 8 << 20), Access::Write, None).unwrap();
        assert_ne!(s.features() & VHOST_F_LOG_ALL, 0);
        assert_ne!(s.features() & VIRTIO_BLK_F_FLUSH, 0);
        assert!(s
            .protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD));
        assert!(s
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
    }

    #[test]
    fn a_target_opens_read_only_and_a_missing_disk_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = vhd(d.path(), 8 << 20);
        let s = open_local(&p, Access::WriteOnFirstRequest, None).unwrap();
        assert!(!s.lock().writable);
        assert_eq!(s.capacity(), 8 << 20);
        let e = open_local(&d.path().join("none.vhd"), Access::Write, None).unwrap_err();
        assert!(e.to_string().contains("none.vhd"), "{e}");
    }

    #[test]
    fn stop_flushes_and_writes_the_counters() {
        let d = tempfile::tempdir().unwrap();
        let stats = d.path().join("d.stats");
        let s = open_local(&vhd(d.path(), 8 << 20), Access::Write, Some(stats.clone())).unwrap();
        s.stop_vring(0).unwrap();
        let read: BlkStats = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        assert_eq!(read.flushes, 1);
    }
}
