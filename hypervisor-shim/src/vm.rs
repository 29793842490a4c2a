//! One KVM virtual machine: memory, vCPU threads, the devices the test guest
//! and a serial console need, pause/resume, and the state that a save or a
//! migration carries.

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
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: String,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0}")]
    Config(String),
    #[error("restoring vCPU {id}: {what}: {source}")]
    Restore {
        id: u32,
        what: &'static str,
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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

    /// Builds a GDT (null, 64-bit code, data, busy TSS; code and data at
    /// privilege `dpl`), an empty IDT and an identity map of the first
    /// 4 GiB with 2 MiB pages, and sets vCPU 0 up in long mode at `rip`
    /// with `rsp`, `rsi` and `rflags`.
    pub(crate) fn setup_long_mode(
        &self,
        dpl: u8,
        rip: u64,
        rsp: u64,
        rsi: u64,
        rflags: u64,
    ) -> Result<()> {
        let m = &self.mem;
        let w = |addr: u64, v: u64| {
            m.write_obj(v, GuestAddress(addr))
                .map_err(|e| VmError::Memory(format!("write {addr:#x}: {e}")))
        };
        let d = u64::from(dpl & 3) << 45;
        for (i, e) in [
            0u64,
            0x00af_9b00_0000_ffff | d,
            0x00cf_9300_0000_ffff | d,
            0x008f_8b00_0000_ffff,
        ]
        .iter()
        .enumerate()
        {
            w(guest::GDT_ADDR + 8 * i as u64, *e)?;
        }
        w(guest::IDT_ADDR, 0)?;
        let pdpt = guest::PML4_ADDR + 0x1000;
        let pd = guest::PML4_ADDR + 0x2000;
        w(guest::PML4_ADDR, pdpt | 7)?;
        for i in 0..4u64 {
            w(pdpt + 8 * i, (pd + 0x1000 * i) | 7)?;
            for j in 0..512u64 {
                w(pd + 0x1000 * i + 8 * j, ((i * 512 + j) << 21) | 0x87)?;
            }
        }
        let v = lock(&self.vcpus[0]);
        let mut sregs = kvm("read sregs", v.get_sregs())?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08 | u16::from(dpl & 3),
            type_: 0xb,
            present: 1,
            dpl: dpl & 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x10 | u16::from(dpl & 3),
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        let tss = kvm_segment {
            selector: 0x18,
            type_: 0xb,
            s: 0,
            dpl: 0,
            db: 0,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.gdt.base = guest::GDT_ADDR;
        sregs.gdt.limit = 4 * 8 - 1;
        sregs.idt.base = guest::IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cr3 = guest::PML4_ADDR;
        sregs.cr4 |= 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = (sregs.cr0 | 0x1 | 0x8000_0000 | 0x20) & !0x6000_0000; // PE, PG, NE; caches on
        sregs.efer |= 0x500; // LME, LMA
        kvm("set sregs", v.set_sregs(&sregs))?;
        let mut regs = kvm("read regs", v.get_regs())?;
        regs.rip = rip;
        regs.rsp = rsp;
        regs.rsi = rsi;
        regs.rflags = rflags;
        kvm("set regs", v.set_regs(&regs))?;
        let mut fpu = kvm("read FPU", v.get_fpu())?;
        fpu.fcw = 0x37f;
        fpu.mxcsr = 0x1f80;
        kvm("set FPU", v.set_fpu(&fpu))?;
        Ok(())
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
        lock(&self.state).clone()
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
        s.clone()
    }

    fn vcpu_loop(&self, index: usize, vcpu: Arc<Mutex<VcpuFd>>) {
        let gate = &self.gate;
        let mut ran_since = Instant::now();
        loop {
            if gate.stop.load(Ordering::SeqCst) {
                break;
            }
            if gate.pause.load(Ordering::SeqCst) {
                // An I/O or MMIO exit is complete (RIP past the instruction)
                // only once KVM_RUN is entered again: do that with
                // immediate_exit, which runs no guest instruction, so the
                // state a save reads is consistent.
                {
                    let mut v = lock(&vcpu);
                    v.set_kvm_immediate_exit(1);
                    let _ = v.run();
                    v.set_kvm_immediate_exit(0);
                }
                let mut st = lock(&gate.state);
                st.parked += 1;
                gate.cv.notify_all();
                while gate.pause.load(Ordering::SeqCst) && !gate.stop.load(Ordering::SeqCst) {
                    st = gate.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                st.parked -= 1;
                gate.cv.notify_all();
                ran_since = Instant::now();
                continue;
            }
            let pct = gate.throttle.load(Ordering::Relaxed);
            if pct > 0 {
                // Auto-converge: run (100 - pct)% of each 10 ms window.
                let window = Duration::from_millis(10);
                let run_for = window * (100 - pct.min(99)) / 100;
                if ran_since.elapsed() >= run_for {
                    std::thread::sleep(window - run_for);
                    ran_since = Instant::now();
                }
            }
            let mut v = lock(&vcpu);
            let stop_reason = match v.run() {
                Ok(VcpuExit::IoOut(port, data)) => self.io_out(port, data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.io_in(port, data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio_read(addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio_write(addr, data);
                    None
                }
                Ok(VcpuExit::Intr) | Ok(VcpuExit::Hlt) => None,
                Ok(VcpuExit::Shutdown) => {
                    Some("the guest shut down (triple fault or reset)".to_string())
                }
                Ok(VcpuExit::SystemEvent(t, _)) => Some(format!("system event {t}")),
                Ok(other) => Some(format!("unhandled exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(format!("KVM_RUN failed: {e}")),
            };
            drop(v);
            if let Some(reason) = stop_reason {
                tracing::warn!(vcpu = index, %reason, "guest stopped");
                self.stop();
                break;
            }
        }
    }

    fn io_out(&self, port: u16, data: &[u8]) -> Option<String> {
        let mut d = lock(&self.devices);
        match port {
            0x3f8..=0x3ff => {
                if let Some(&b) = data.first() {
                    let _ = d.serial.write((port - 0x3f8) as u8, b);
                }
            }
            0x60 | 0x64 => {
                if let Some(&b) = data.first() {
                    let _ = d.i8042.write((port - 0x60) as u8, b);
                }
                if self.reset.load(Ordering::SeqCst) {
                    return Some("the guest asked for a reset (i8042)".into());
                }
            }
            guest::PORT_HEARTBEAT if data.len() == 4 => {
                d.heartbeat
                    .record(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            }
            guest::PORT_ERROR if data.len() == 4 => {
                d.heartbeat.guest_errors += 1;
                let page = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                tracing::error!(
                    page,
                    "the test guest found a page that does not match what it wrote"
                );
            }
            guest::PORT_DISK_ERROR => {
                tracing::error!(status = ?data, "the test guest's disk request failed");
            }
            guest::PORT_BOOTED => {
                d.heartbeat.booted = true;
                tracing::info!("test guest booted");
            }
            _ => {}
        }
        None
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let d = lock(&self.devices);
        match &d.blk {
            Some(b)
                if (virtio_blk::MMIO_BASE..virtio_blk::MMIO_BASE + virtio_blk::MMIO_SIZE)
                    .contains(&addr) =>
            {
                b.read(addr - virtio_blk::MMIO_BASE, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        let mut d = lock(&self.devices);
        let d = &mut *d;
        if let Some(b) = &mut d.blk {
            if (virtio_blk::MMIO_BASE..virtio_blk::MMIO_BASE + virtio_blk::MMIO_SIZE)
                .contains(&addr)
                && b.write(addr - virtio_blk::MMIO_BASE, data, &self.mem)
            {
                let _ = d.blk_irq.write(1);
            }
        }
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
        let disk = vhd::Vhd::open(path, &opts)
            .map_err(|e| VmError::Config(format!("open the disk: {e}")))?;
        let blk = d.blk.get_or_insert_with(|| VirtioBlk::new(disk.size()));
        blk.attach(Arc::new(disk))
            .map_err(|e| VmError::Config(format!("{}: {e}", path.display())))
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
        let disk = vhd::Vhd::open(path, &vhd::OpenOptions::default())
            .map_err(|e| VmError::Config(format!("open the disk: {e}")))?;
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
            Some(b) => b
                .flush()
                .map_err(|e| VmError::Config(format!("flush the disk: {e}"))),
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

    fn io_in(&self, port: u16, data: &mut [u8]) {
        let mut d = lock(&self.devices);
        let v = match port {
            0x3f8..=0x3ff => d.serial.read((port - 0x3f8) as u8),
            0x60 | 0x64 => d.i8042.read((port - 0x60) as u8),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn kick_all(&self) {
        for t in lock(&self.threads).iter() {
            // SAFETY: the thread handle is alive (joined only in `Drop`), and
            // the kick signal has a handler that does nothing, so it only
            // interrupts KVM_RUN.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), kick_signal());
            }
        }
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

    /// Switches KVM's dirty-page log on or off (and clears both logs).
    pub fn set_dirty_log(&self, on: bool) -> Result<()> {
        self.set_memory_region(on)?;
        self.vmm_bitmap().reset();
        Ok(())
    }

    fn vmm_bitmap(&self) -> &AtomicBitmap {
        // One region, created in `new`.
        self.mem
            .iter()
            .next()
            .map(|r| (**r).bitmap())
            .expect("guest memory has one region")
    }

    /// Takes (and clears) the pages dirtied since the last call, by the
    /// guest (KVM's log) or by the VMM (the memory bitmap), merged into
    /// `into` (one bit per page).
    pub fn take_dirty(&self, into: &mut [u64]) -> Result<()> {
        let kvm_log = kvm(
            "read the dirty log",
            self.fd.get_dirty_log(0, self.config.mem_bytes as usize),
        )?;
        for (d, s) in into.iter_mut().zip(kvm_log) {
            *d |= s;
        }
        // The VMM's own writes: one bit per page, taken and cleared at once.
        for (d, s) in into.iter_mut().zip(self.vmm_bitmap().get_and_reset()) {
            *d |= s;
        }
        Ok(())
    }

    /// CRC32 of all guest memory (call while paused for a stable answer).
    pub fn memory_crc(&self) -> u32 {
        let (p, len) = self.host_memory();
        // SAFETY: the mapping is `len` bytes long and lives as long as `self`.
        let s = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
        crc32fast::hash(s)
    }

    /// The device state (call while paused).
    pub fn device_state(&self) -> DeviceState {
        let d = lock(&self.devices);
        let s = d.serial.state();
        DeviceState {
            serial_regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            serial_in: s.in_buffer.clone(),
            heartbeat_seq: d.heartbeat.seq,
            heartbeats: d.heartbeat.count,
            heartbeat_gaps: d.heartbeat.gaps,
            guest_errors: d.heartbeat.guest_errors,
            blk: d.blk.as_ref().map(VirtioBlk::state),
        }
    }

    /// Restores the device state (before `start`).
    pub fn restore_devices(&self, s: &DeviceState) -> Result<()> {
        let mut d = lock(&self.devices);
        let r = s.serial_regs;
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.serial_in.clone(),
        };
        let irq = IrqFd(
            d.serial
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| VmError::Config(format!("eventfd: {e}")))?,
        );
        let out = self
            .config
            .serial
            .open()
            .map_err(|e| VmError::Config(format!("serial output: {e}")))?;
        d.serial = Serial::from_state(&state, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| VmError::Config(format!("serial state: {e:?}")))?;
        d.heartbeat.seq = s.heartbeat_seq;
        d.heartbeat.count = s.heartbeats;
        d.heartbeat.gaps = s.heartbeat_gaps;
        d.heartbeat.guest_errors = s.guest_errors;
        d.heartbeat.booted = s.heartbeats > 0;
        if let Some(b) = &s.blk {
            let mut dev = VirtioBlk::new(b.capacity);
            dev.restore(b).map_err(VmError::Config)?;
            d.blk = Some(dev);
        }
        Ok(())
    }

    /// The VM-wide KVM state (call while paused).
    pub fn vm_state(&self) -> Result<VmState> {
        let chip = |id| -> Result<kvm_irqchip> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            kvm("read the irqchip", self.fd.get_irqchip(&mut c))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: kvm("read the PIT", self.fd.get_pit2())?,
            clock: kvm("read the KVM clock", self.fd.get_clock())?,
        })
    }

    /// Restores the VM-wide state (before `start`).
    pub fn restore_vm_state(&self, s: &VmState) -> Result<()> {
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            kvm("restore the irqchip", self.fd.set_irqchip(c))?;
        }
        kvm("restore the PIT", self.fd.set_pit2(&s.pit))?;
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            // With the realtime stamp KVM advances the clock by the wall
            // time that passed between save and restore.
            flags: s.clock.flags & KVM_CLOCK_REALTIME,
            realtime: s.clock.realtime,
            ..Default::default()
        };
        kvm("restore the KVM clock", self.fd.set_clock(&clock))?;
        Ok(())
    }

    /// Every vCPU's state (call while paused).
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>> {
        let mut out = Vec::with_capacity(self.vcpus.len());
        for (id, v) in self.vcpus.iter().enumerate() {
            let v = lock(v);
            let id = id as u32;
            let what = |w: &str| format!("vCPU {id}: read {w}");
            let mp_state = kvm(what("MP state"), v.get_mp_state())?;
            let regs = kvm(what("registers"), v.get_regs())?;
            let sregs = kvm(what("special registers"), v.get_sregs())?;
            let xsave = Box::new(kvm(what("XSAVE"), v.get_xsave())?);
            let xcrs = kvm(what("XCRs"), v.get_xcrs())?;
            let debugregs = kvm(what("debug registers"), v.get_debug_regs())?;
            let lapic = kvm(what("local APIC"), v.get_lapic())?;
            let entries: Vec<kvm_msr_entry> = self
                .msr_list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| VmError::Config(format!("MSR list: {e:?}")))?;
            let n = kvm(what("MSRs"), v.get_msrs(&mut msrs))?;
            let msrs: Vec<(u32, u64)> = msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect();
            let events = kvm(what("events"), v.get_vcpu_events())?;
            let cpuid = kvm(what("CPUID"), v.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
            out.push(VcpuState {
                id,
                cpuid: cpuid.as_slice().to_vec(),
                tsc_khz: self.tsc_khz,
                mp_state,
                regs,
                sregs,
                xsave,
                xcrs,
                debugregs,
                lapic,
                msrs,
                events,
            });
        }
        Ok(out)
    }

    /// Restores the vCPUs in the order KVM needs: CPUID, MP state,
    /// registers, special registers, XSAVE, XCRs, debug registers, local
    /// APIC, MSRs, and the pending events last.
    pub fn restore_vcpus(&self, states: &[VcpuState]) -> Result<()> {
        if states.len() != self.vcpus.len() {
            return Err(VmError::Config(format!(
                "the state has {} vCPUs, this VM {}",
                states.len(),
                self.vcpus.len()
            )));
        }
        for s in states {
            let v = self
                .vcpus
                .get(s.id as usize)
                .ok_or_else(|| VmError::Config(format!("state for unknown vCPU {}", s.id)))?;
            let v = lock(v);
            let id = s.id;
            let e = |what: &'static str| move |source| VmError::Restore { id, what, source };
            if s.tsc_khz != self.tsc_khz {
                tracing::warn!(
                    saved = s.tsc_khz,
                    here = self.tsc_khz,
                    "TSC frequency differs from the source host; the guest's sense of time will drift"
                );
                let _ = v.set_tsc_khz(s.tsc_khz);
            }
            let cpuid = CpuId::from_entries(&s.cpuid)
                .map_err(|err| VmError::Config(format!("CPUID of vCPU {id}: {err:?}")))?;
            v.set_cpuid2(&cpuid).map_err(e("CPUID"))?;
            v.set_mp_state(s.mp_state).map_err(e("MP state"))?;
            v.set_regs(&s.regs).map_err(e("registers"))?;
            v.set_sregs(&s.sregs).map_err(e("special registers"))?;
            // SAFETY: the XSAVE area was read from KVM by the same structure
            // layout (kvm_xsave, 4 KiB); extended areas beyond it are not used.
            unsafe { v.set_xsave(&s.xsave) }.map_err(e("XSAVE"))?;
            v.set_xcrs(&s.xcrs).map_err(e("XCRs"))?;
            v.set_debug_regs(&s.debugregs)
                .map_err(e("debug registers"))?;
            v.set_lapic(&s.lapic).map_err(e("local APIC"))?;
            let entries: Vec<kvm_msr_entry> = s
                .msrs
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries)
                .map_err(|err| VmError::Config(format!("MSRs of vCPU {id}: {err:?}")))?;
            let n = v.set_msrs(&msrs).map_err(e("MSRs"))?;
            if n != entries.len() {
                let failed = entries.get(n).map(|m| m.index).unwrap_or(0);
                return Err(VmError::Config(format!(
                    "vCPU {id}: KVM took {n} of {} MSRs (refused MSR {failed:#x})",
                    entries.len()
                )));
            }
            v.set_vcpu_events(&s.events).map_err(e("vCPU events"))?;
        }
        Ok(())
    }
}

/// The MSRs KVM reports and can actually read on this host.
fn readable_msrs(kvm_sys: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm("read the MSR list", kvm_sys.get_msr_index_list())?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| VmError::Config(format!("MSR list: {e:?}")))?;
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            ok.push(index);
        }
    }
    Ok(ok)
}

/// Heartbeat counters as the control socket reports them.
#[derive(Debug, Clone, serde::Serialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
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
