//! One KVM virtual machine: memory, vCPU threads, the devices the test guest
//! and a serial console need, pause/resume, and the state that a save or a
//! migration carries.

mod exits;
mod setup;
mod state;

use state::readable_msrs;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_msr_entry, kvm_pit_config, kvm_segment,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vm_superio::{I8042Device, Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::guest;
use crate::stream::{DeviceState, VcpuState, VmState};
use crate::virtio_blk::{self, VirtioBlk};

/// Guest memory with the VMM's own writes tracked in a bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors of the VM core.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl.
    #[error("KVM: {what}")]
    Kvm {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A configuration or state this VMM cannot use.
    #[error("{0}")]
    Config(String),
    /// The disk.
    #[error("disk {path}")]
    Disk {
        /// The VHD.
        path: PathBuf,
        /// Why.
        #[source]
        source: vhd::Error,
    },
    /// The disk device.
    #[error(transparent)]
    Blk(#[from] crate::virtio_blk::BlkError),
    /// A Linux kernel image this VMM cannot boot.
    #[error("the kernel image")]
    Kernel(#[from] crate::linux::BzImageError),
    /// Restoring a vCPU.
    #[error("restoring vCPU {id}: {what}")]
    Restore {
        /// The vCPU.
        id: u32,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

type Result<T> = std::result::Result<T, VmError>;

fn kvm<T>(what: impl Into<String>, r: std::result::Result<T, kvm_ioctls::Error>) -> Result<T> {
    r.map_err(|source| VmError::Kvm {
        what: what.into(),
        source,
    })
}

/// Where the serial console goes.
#[derive(Debug, Clone, Default)]
pub enum SerialOut {
    /// Discarded.
    #[default]
    Null,
    /// The VMM's standard output.
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Sent to a Unix socket something listens on (a console server).
    Unix(PathBuf),
}

impl SerialOut {
    fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            SerialOut::Null => Box::new(std::io::sink()),
            SerialOut::Stdout => Box::new(std::io::stdout()),
            SerialOut::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            SerialOut::Unix(p) => Box::new(std::os::unix::net::UnixStream::connect(p)?),
        })
    }
}

/// What a VM is made of (the part that a migration's `Hello` carries is
/// memory and vCPUs; the rest is local to each host).
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub serial: SerialOut,
    /// Every heartbeat is also sent as a UDP datagram (sequence number `u64`
    /// then the VMM's pid `u32`, little-endian) to this observer.
    pub heartbeat_udp: Option<SocketAddr>,
    /// The VHD behind the virtio-blk device (on a migration target or a
    /// restore, the same file the source used, on shared storage).
    pub disk: Option<PathBuf>,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Created,
    Running,
    Paused,
    /// The guest now runs on another host; this process only reports.
    Migrated,
    /// The state was saved and this process stopped the guest.
    Saved,
    Stopped,
}

#[derive(Debug)]
struct ResetFlag(Arc<AtomicBool>);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> std::result::Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Debug)]
struct IrqFd(EventFd);

impl Trigger for IrqFd {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Heartbeats of the test guest as this VMM saw them.
#[derive(Debug)]
pub struct Heartbeat {
    pub seq: u64,
    pub count: u64,
    pub gaps: u64,
    pub guest_errors: u64,
    pub booted: bool,
    /// Heartbeats seen by this process (not carried by a migration).
    pub local_count: u64,
    pub last_at: Option<Instant>,
    /// Longest wall-clock gap between two heartbeats seen by this process.
    pub max_gap: Duration,
    udp: Option<(UdpSocket, SocketAddr)>,
}

impl Heartbeat {
    fn record(&mut self, low: u32) {
        let mut full = (self.seq & !0xffff_ffff) | u64::from(low);
        if full < self.seq && self.seq - full > 1 << 31 {
            full += 1 << 32;
        }
        if self.count > 0 && full != self.seq + 1 {
            self.gaps += 1;
            tracing::warn!(last = self.seq, got = full, "heartbeat sequence gap");
        }
        self.seq = full;
        self.count += 1;
        self.local_count += 1;
        let now = Instant::now();
        if let Some(last) = self.last_at {
            self.max_gap = self.max_gap.max(now - last);
        }
        self.last_at = Some(now);
        if let Some((sock, to)) = &self.udp {
            let mut b = [0u8; 12];
            b[..8].copy_from_slice(&full.to_le_bytes());
            b[8..].copy_from_slice(&std::process::id().to_le_bytes());
            let _ = sock.send_to(&b, to);
        }
    }
}

struct Devices {
    serial: Serial<IrqFd, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    i8042: I8042Device<ResetFlag>,
    heartbeat: Heartbeat,
    blk: Option<VirtioBlk>,
    blk_irq: EventFd,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

#[derive(Debug, Default)]
struct GateState {
    parked: usize,
}

/// Stops and restarts the vCPU threads.
#[derive(Debug, Default)]
struct Gate {
    pause: AtomicBool,
    stop: AtomicBool,
    /// Percentage of time the vCPUs are held back (auto-converge).
    throttle: AtomicU32,
    state: Mutex<GateState>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// A running or ready virtual machine.
#[derive(Debug)]
pub struct Vm {
    _kvm_sys: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    host: usize,
    pub config: VmConfig,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    devices: Arc<Mutex<Devices>>,
    gate: Arc<Gate>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    msr_list: Vec<u32>,
    tsc_khz: u32,
    reset: Arc<AtomicBool>,
    state: Mutex<RunState>,
    state_cv: Condvar,
}

impl Vm {
    /// Creates the VM, its memory, irqchip, PIT and vCPUs; nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Vm> {
        if config.mem_bytes < guest::MIN_MEMORY || config.mem_bytes > guest::MAX_MEMORY {
            return Err(VmError::Config(format!(
                "memory of {} MiB is outside what the test guest supports ({} MiB to {} MiB)",
                config.mem_bytes >> 20,
                guest::MIN_MEMORY >> 20,
                guest::MAX_MEMORY >> 20
            )));
        }
        if config.mem_bytes % crate::stream::PAGE != 0 {
            return Err(VmError::Config(
                "memory size must be a multiple of 4 KiB".into(),
            ));
        }
        if config.vcpus == 0 || config.vcpus > 64 {
            return Err(VmError::Config(format!("{} vCPUs (1 to 64)", config.vcpus)));
        }
        let kvm_sys = kvm("open /dev/kvm", Kvm::new())?;
        let fd = kvm("create the VM", kvm_sys.create_vm())?;
        kvm("set the TSS address", fd.set_tss_address(0xfffb_d000))?;
        kvm("create the in-kernel irqchip", fd.create_irq_chip())?;
        kvm(
            "create the PIT",
            fd.create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            }),
        )?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), config.mem_bytes as usize)])
            .map_err(|e| VmError::Memory(format!("map {} bytes: {e}", config.mem_bytes)))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmError::Memory(e.to_string()))? as usize;
        let cpuid = kvm(
            "read the supported CPUID",
            kvm_sys.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let v = kvm(format!("create vCPU {id}"), fd.create_vcpu(u64::from(id)))?;
            let mut c = cpuid.clone();
            for e in c.as_mut_slice() {
                match e.function {
                    1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
                    0xb | 0x1f => e.edx = id,
                    _ => {}
                }
            }
            kvm(format!("set CPUID of vCPU {id}"), v.set_cpuid2(&c))?;
            vcpus.push(v);
        }
        let tsc_khz = kvm("read the TSC frequency", vcpus[0].get_tsc_khz())?;
        let msr_list = readable_msrs(&kvm_sys, &vcpus[0])?;
        let serial_irq = IrqFd(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmError::Config(format!("eventfd: {e}")))?,
        );
        kvm("wire the serial IRQ", fd.register_irqfd(&serial_irq.0, 4))?;
        let out = config
            .serial
            .open()
            .map_err(|e| VmError::Config(format!("serial output {:?}: {e}", config.serial)))?;
        let reset = Arc::new(AtomicBool::new(false));
        let blk_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Config(format!("eventfd: {e}")))?;
        kvm(
            "wire the virtio-blk IRQ",
            fd.register_irqfd(&blk_irq, virtio_blk::IRQ),
        )?;
        let udp = match config.heartbeat_udp {
            Some(to) => Some((
                UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
                    .map_err(|e| VmError::Config(format!("heartbeat socket: {e}")))?,
                to,
            )),
            None => None,
        };
        let devices = Devices {
            serial: Serial::new(serial_irq, out),
            i8042: I8042Device::new(ResetFlag(reset.clone())),
            heartbeat: Heartbeat {
                seq: 0,
                count: 0,
                gaps: 0,
                guest_errors: 0,
                booted: false,
                local_count: 0,
                last_at: None,
                max_gap: Duration::ZERO,
                udp,
            },
            blk: None,
            blk_irq,
        };
        let vm = Vm {
            _kvm_sys: kvm_sys,
            fd,
            mem,
            host,
            config,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            devices: Arc::new(Mutex::new(devices)),
            gate: Arc::new(Gate::default()),
            threads: Mutex::new(Vec::new()),
            msr_list,
            tsc_khz,
            reset,
            state: Mutex::new(RunState::Created),
            state_cv: Condvar::new(),
        };
        vm.set_memory_region(false)?;
        Ok(vm)
    }

    fn set_memory_region(&self, log_dirty: bool) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: self.config.mem_bytes,
            userspace_addr: self.host as u64,
        };
        // SAFETY: the region is the mapping owned by `self.mem`, which is
        // never unmapped or resized while `self` lives; `fd` is declared
        // before `mem`, so the VM fd is closed (and KVM lets go of the
        // memory) before the mapping is dropped.
        unsafe {
            kvm(
                "register guest memory",
                self.fd.set_user_memory_region(region),
            )
        }
    }

    /// Guest memory size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.config.mem_bytes
    }

    /// The TSC frequency the guest sees.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Guest memory as a raw pointer and length (for the stream code).
    pub(crate) fn host_memory(&self) -> (*mut u8, usize) {
        (self.host as *mut u8, self.config.mem_bytes as usize)
    }

    /// Guest memory (for the loaders).
    pub(crate) fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Loads the test guest and sets up its vCPU 0 to enter it in long mode at
    /// CPL 3 (see guest/testguest.S for why not ring 0).
    pub fn load_test_guest(&self, cfg: guest::TestGuestConfig) -> Result<()> {
        let m = &self.mem;
        for (off, v) in [
            (guest::MB_MAGIC, guest::MAGIC),
            (guest::MB_TSC_KHZ, u64::from(self.tsc_khz)),
            (guest::MB_MEM, self.config.mem_bytes),
            (guest::MB_RATE, cfg.pages_per_tick),
            (guest::MB_TICK_US, cfg.tick_us),
            (guest::MB_DIRTY, guest::DIRTY_BASE),
            (guest::MB_DISK_BLOCKS, cfg.disk_blocks),
            (guest::MB_DISK_EVERY, cfg.disk_every),
        ] {
            m.write_obj(v, GuestAddress(guest::MAILBOX + off))
                .map_err(|e| VmError::Memory(format!("write the mailbox: {e}")))?;
        }
        m.write_slice(guest::IMAGE, GuestAddress(guest::LOAD_ADDR))
            .map_err(|e| VmError::Memory(format!("load the test guest: {e}")))?;
        // IOPL 3: the guest's port writes are allowed at CPL 3.
        self.setup_long_mode(3, guest::LOAD_ADDR, guest::STACK_TOP, 0, 0x3002)
    }

    /// Starts the vCPU threads.
    pub fn start(self: &Arc<Self>) -> Result<()> {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        let mut handler_err = None;
        HANDLER.call_once(|| {
            if let Err(e) =
                vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            {
                handler_err = Some(e);
            }
        });
        if let Some(e) = handler_err {
            return Err(VmError::Config(format!("vCPU kick signal handler: {e}")));
        }
        let mut threads = lock(&self.threads);
        for (i, v) in self.vcpus.iter().enumerate() {
            let vm = Arc::clone(self);
            let v = Arc::clone(v);
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vm.vcpu_loop(i, v))
                .map_err(|e| VmError::Config(format!("spawn vCPU thread: {e}")))?;
            threads.push(t);
        }
        self.set_state(RunState::Running);
        Ok(())
    }

    fn set_state(&self, s: RunState) {
        *lock(&self.state) = s;
        self.state_cv.notify_all();
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        *lock(&self.state)
    }

    /// Marks the VM as handed over (migrated) or saved; its vCPUs stay
    /// parked until the process exits.
    pub fn finish(&self, s: RunState) {
        self.set_state(s);
    }

    /// Blocks until the VM leaves the running/paused states.
    pub fn wait_stopped(&self) -> RunState {
        let mut s = lock(&self.state);
        while matches!(*s, RunState::Created | RunState::Running | RunState::Paused) {
            s = self.state_cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        *s
    }

    /// Opens the VHD of `config.disk` and attaches it to the virtio-blk
    /// device (creating the device on a fresh VM; a restored one has it
    /// from the state). A restored device without a disk is an error.
    pub fn attach_disk(&self) -> Result<()> {
        let mut d = lock(&self.devices);
        let Some(path) = &self.config.disk else {
            return match d.blk {
                Some(_) => Err(VmError::Config(
                    "this VM has a virtio-blk disk: give its VHD with --disk".into(),
                )),
                None => Ok(()),
            };
        };
        let opts = vhd::OpenOptions {
            write: true,
            ..Default::default()
        };
        let disk = vhd::Vhd::open(path, &opts).map_err(|source| VmError::Disk {
            path: path.clone(),
            source,
        })?;
        let blk = d.blk.get_or_insert_with(|| VirtioBlk::new(disk.size()));
        Ok(blk.attach(Arc::new(disk))?)
    }

    /// Checks, without opening it for writing, that the disk of
    /// `config.disk` opens and fits the VM's device (a migration target,
    /// before it acknowledges).
    pub fn check_disk(&self) -> Result<()> {
        let d = lock(&self.devices);
        let Some(path) = &self.config.disk else {
            return match d.blk {
                Some(_) => Err(VmError::Config(
                    "this VM has a virtio-blk disk: give its VHD with --disk".into(),
                )),
                None => Ok(()),
            };
        };
        let disk =
            vhd::Vhd::open(path, &vhd::OpenOptions::default()).map_err(|source| VmError::Disk {
                path: path.clone(),
                source,
            })?;
        match &d.blk {
            Some(b) if b.capacity() != disk.size() => Err(VmError::Config(format!(
                "{} is {} bytes, the VM's disk {}",
                path.display(),
                disk.size(),
                b.capacity()
            ))),
            _ => Ok(()),
        }
    }

    /// Flushes the disk (before handing it to another host).
    pub fn flush_disk(&self) -> Result<()> {
        match &lock(&self.devices).blk {
            Some(b) => Ok(b.flush()?),
            None => Ok(()),
        }
    }

    /// The disk's size in bytes, when the VM has one.
    pub fn disk_capacity(&self) -> Option<u64> {
        lock(&self.devices).blk.as_ref().map(VirtioBlk::capacity)
    }

    /// The disk's request counters, when there is one.
    pub fn disk_stats(&self) -> Option<virtio_blk::BlkStats> {
        lock(&self.devices).blk.as_ref().map(|b| b.stats)
    }

    /// Parks every vCPU thread outside KVM_RUN. Idempotent.
    pub fn pause(&self) {
        self.gate.pause.store(true, Ordering::SeqCst);
        let n = lock(&self.threads).len();
        let mut st = lock(&self.gate.state);
        while st.parked < n && !self.gate.stop.load(Ordering::SeqCst) {
            drop(st);
            self.kick_all();
            st = lock(&self.gate.state);
            let (s, _) = self
                .gate
                .cv
                .wait_timeout(st, Duration::from_micros(200))
                .unwrap_or_else(|p| p.into_inner());
            st = s;
        }
        drop(st);
        if self.state() == RunState::Running {
            self.set_state(RunState::Paused);
        }
    }

    /// Lets the vCPU threads run again.
    pub fn resume(&self) {
        {
            let _st = lock(&self.gate.state);
            self.gate.pause.store(false, Ordering::SeqCst);
            self.gate.cv.notify_all();
        }
        if self.state() == RunState::Paused {
            self.set_state(RunState::Running);
        }
    }

    /// Stops the guest for good (the disk is flushed).
    pub fn stop(&self) {
        if let Err(e) = self.flush_disk() {
            tracing::error!(error = %e, "flushing the disk at stop");
        }
        {
            let _st = lock(&self.gate.state);
            self.gate.stop.store(true, Ordering::SeqCst);
            self.gate.cv.notify_all();
        }
        self.kick_all();
        let mut s = lock(&self.state);
        if matches!(*s, RunState::Created | RunState::Running | RunState::Paused) {
            *s = RunState::Stopped;
        }
        drop(s);
        self.state_cv.notify_all();
    }

    /// Holds the vCPUs back for `pct` percent of the time (0 to release).
    pub fn throttle(&self, pct: u32) {
        self.gate.throttle.store(pct.min(99), Ordering::Relaxed);
    }

    /// Changes the test guest's dirtying rate while it runs.
    pub fn set_guest_rate(&self, cfg: guest::TestGuestConfig) -> Result<()> {
        self.mem
            .write_obj(
                cfg.pages_per_tick,
                GuestAddress(guest::MAILBOX + guest::MB_RATE),
            )
            .map_err(|e| VmError::Memory(e.to_string()))
    }

    /// Reads a `u64` of the mailbox.
    pub fn mailbox(&self, off: u64) -> u64 {
        self.mem
            .read_obj::<u64>(GuestAddress(guest::MAILBOX + off))
            .unwrap_or(0)
    }

    /// A snapshot of the heartbeat counters.
    pub fn heartbeat(&self) -> HeartbeatView {
        let d = lock(&self.devices);
        let h = &d.heartbeat;
        HeartbeatView {
            booted: h.booted,
            seq: h.seq,
            count: h.count,
            local_count: h.local_count,
            gaps: h.gaps,
            guest_errors: h.guest_errors,
            max_gap_ms: h.max_gap.as_secs_f64() * 1e3,
        }
    }
}

/// Heartbeat counters as the control socket reports them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeartbeatView {
    pub booted: bool,
    pub seq: u64,
    pub count: u64,
    pub local_count: u64,
    pub gaps: u64,
    pub guest_errors: u64,
    pub max_gap_ms: f64,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
        let threads = std::mem::take(&mut *lock(&self.threads));
        let me = std::thread::current().id();
        for t in threads {
            // The last reference can go away on a vCPU thread itself.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

/// What a host-side scan of the test guest's dirty area found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestCheck {
    /// Pages the guest has written at least once.
    pub pages_checked: u64,
    /// Pages whose contents do not match their recorded generation.
    pub bad_pages: u64,
}

impl Vm {
    /// Checks every written page of the test guest's dirty area against the
    /// pattern of its generation (call while paused).
    pub fn check_test_guest(&self) -> GuestCheck {
        let (base, len) = self.host_memory();
        // SAFETY: the mapping is `len` bytes and outlives this borrow; the
        // caller pauses the vCPUs so the contents are stable.
        let mem = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
        let mut out = GuestCheck::default();
        let pages = (len as u64).saturating_sub(guest::DIRTY_BASE) / 4096;
        // The page at the guest's cursor may be half rewritten (its new
        // generation is recorded before its contents).
        let in_flight = self.mailbox(guest::MB_CURSOR);
        for p in 0..pages {
            if p == in_flight {
                continue;
            }
            let g_at = (guest::GEN_TABLE + 4 * p) as usize;
            let generation =
                u32::from_le_bytes([mem[g_at], mem[g_at + 1], mem[g_at + 2], mem[g_at + 3]]);
            if generation == 0 {
                continue;
            }
            out.pages_checked += 1;
            let at = (guest::DIRTY_BASE + p * 4096) as usize;
            let page = &mem[at..at + 4096];
            let ok = page.chunks_exact(8).enumerate().all(|(i, q)| {
                let mut b = [0u8; 8];
                b.copy_from_slice(q);
                u64::from_le_bytes(b) == guest::pattern(p, generation, i as u64)
            });
            if !ok {
                out.bad_pages += 1;
            }
        }
        out
    }

    /// Pages of guest memory that are not all zero (what the guest uses, for
    /// placement; there is no balloon driver in the test guest).
    pub fn touched_pages(&self) -> u64 {
        let (base, len) = self.host_memory();
        // SAFETY: as in `check_test_guest`; a racing guest write only makes
        // the estimate a little stale.
        let mem = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
        mem.chunks_exact(4096)
            .filter(|p| p.iter().any(|&b| b != 0))
            .count() as u64
    }
}
