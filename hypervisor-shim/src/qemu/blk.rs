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
//! guest: the stop waits until every request taken off the queue is
//! answered, then flushes the disk, before QEMU reads the queue's position.
//!
//! Requests are served on 8 I/O threads kept for the server's life, each
//! answered (used ring, interrupt) as soon as it is done, so the guest's
//! queue depth reaches the disk; a request's scattered segments go to the
//! disk as one run of bytes ([`crate::virtio_blk::serve_request`]).
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

/// What a batch is taken off the queue with (its lock is the submission
/// lock: the queue's stop takes it, so no request is taken while the
/// device stops).
#[derive(Debug)]
struct Inner {
    disk: Arc<Disk>,
    writable: bool,
    mem: Option<GuestMemoryAtomic<Memory>>,
}

/// What the I/O threads share with the server: the counters, and the
/// requests taken off the queue and not yet answered.
#[derive(Debug, Default)]
struct Shared {
    stats: Mutex<BlkStats>,
    in_flight: Mutex<usize>,
    idle: std::sync::Condvar,
}

impl Shared {
    fn stats(&self) -> MutexGuard<'_, BlkStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_flight(&self) -> MutexGuard<'_, usize> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request fewer in flight.
    fn done(&self) {
        let mut n = self.in_flight();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until every request taken off the queue is answered.
    fn wait_idle(&self) {
        let mut n = self.in_flight();
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A VHD served as one vhost-user-blk device.
#[derive(Debug)]
pub struct DiskServer {
    source: Arc<dyn DiskSource>,
    path: PathBuf,
    capacity: u64,
    inner: Mutex<Inner>,
    shared: Arc<Shared>,
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
                mem: None,
            }),
            shared: Arc::default(),
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
        *self.shared.stats()
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

    /// Takes the queue's available requests and hands each to the I/O
    /// threads, which answer it (used ring, interrupt) as soon as it is
    /// done: the queue is taken again at the next kick, not when the
    /// batch's slowest request ends, so the guest's queue depth reaches
    /// the disk.
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
            let chains: Vec<Chain> = {
                let mut state = vring.get_mut();
                let q = state.get_queue_mut();
                match q.iter(&*mem) {
                    Ok(iter) => iter.map(|c| (c.head_index(), c.collect())).collect(),
                    Err(e) => return Err(io::Error::other(format!("virtqueue: {e:?}"))),
                }
            };
            *self.shared.in_flight() += chains.len();
            for chain in chains {
                let job = Request {
                    mem: mem.clone().into_inner(),
                    chain,
                    disk: inner.disk.clone(),
                    writable: inner.writable,
                    capacity: self.capacity,
                    vring: vring.clone(),
                    shared: self.shared.clone(),
                };
                self.workers.submit(job);
            }
            if !vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("virtqueue: {e:?}")))?
            {
                break;
            }
        }
        Ok(())
    }
}

/// I/O threads: requests served at once (a guest's queue depth of 32
/// 4 KiB requests keeps them busy; a 1 MiB write through the volume is
/// worth a thread of its own).
const PARALLEL: usize = 8;

/// A request as taken off the queue: its head index and descriptors.
type Chain = (u16, Vec<virtio_queue::desc::split::Descriptor>);

/// One request taken off the queue, with what answering it needs.
struct Request {
    mem: Arc<Memory>,
    chain: Chain,
    disk: Arc<Disk>,
    writable: bool,
    capacity: u64,
    vring: VringRwLock<GuestMemoryAtomic<Memory>>,
    shared: Arc<Shared>,
}

impl Request {
    /// Serves the request and answers it: status byte, used ring,
    /// interrupt; then it no longer counts as in flight.
    fn run(self) {
        let (head, status, written, stats) = serve_one(
            &*self.mem,
            &self.chain,
            &self.disk,
            self.writable,
            self.capacity,
        );
        self.answer(head, status, written, stats);
    }

    /// Answers the request with `status` and counts it.
    fn answer(self, head: u16, status: u8, written: u32, stats: BlkStats) {
        let used = self.vring.add_used(head, written + 1).is_ok();
        {
            let mut s = self.shared.stats();
            s.reads += stats.reads;
            s.writes += stats.writes;
            s.flushes += stats.flushes;
            s.errors += stats.errors + u64::from(status != 0) + u64::from(!used);
        }
        let _ = self.vring.signal_used_queue();
        self.shared.done();
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("head", &self.chain.0)
            .finish()
    }
}

/// Serves one request, writing its status byte into guest memory.
fn serve_one<M: vm_memory::GuestMemory>(
    mem: &M,
    (head, descs): &Chain,
    disk: &Disk,
    writable: bool,
    capacity: u64,
) -> (u16, u8, u32, BlkStats) {
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

/// The I/O threads, kept for the server's life: a thread per request
/// would pay for its stack and, on the volume, for its aligned I/O
/// buffer (fresh pages) at every request.
#[derive(Debug)]
struct Workers {
    jobs: Mutex<std::sync::mpsc::Sender<Request>>,
}

impl Workers {
    fn start(n: usize) -> Workers {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
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
                    let Ok(req) = job else { return };
                    // A panic in the disk code must not leave the request
                    // unanswered (the queue's stop would wait for it); it
                    // is answered with an error, not served again (that
                    // could repeat a write already done).
                    let head = req.chain.0;
                    let (vring, shared) = (req.vring.clone(), req.shared.clone());
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| req.run())).is_err()
                    {
                        tracing::error!(head, "disk request panicked; answered with an I/O error");
                        let _ = vring.add_used(head, 1);
                        let _ = vring.signal_used_queue();
                        shared.stats().errors += 1;
                        shared.done();
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a disk I/O thread");
            }
        }
        Workers {
            jobs: Mutex::new(tx),
        }
    }

    /// Hands `req` to an I/O thread, or serves it on this one when none
    /// is left to take it.
    fn submit(&self, req: Request) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(std::sync::mpsc::SendError(req)) = jobs.send(req) {
            drop(jobs);
            req.run();
        }
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
        // Taking the lock waits for requests being taken off the queue;
        // then every request taken is answered and the disk flushed,
        // before QEMU hears the device has stopped (and reads the queue's
        // position, which must have no request between taken and used).
        let t = std::time::Instant::now();
        let inner = self.lock();
        self.shared.wait_idle();
        let waited = t.elapsed();
        self.shared.stats().flushes += 1;
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
        let inner = server.lock();
        server.shared.wait_idle();
        if inner.writable {
            let _ = inner.disk.flush();
        }
        server.shared.stats().flushes += 1;
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
