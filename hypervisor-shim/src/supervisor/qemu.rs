//! The `qemu` engine: one `qemu-system-x86_64` per VM, driven over QMP
//! ([`crate::qemu::qmp`]), its disk served by csv ([`crate::qemu::blk`],
//! a thread of the node daemon per VM) as a vhost-user-blk device. The
//! disk server opens the VHD through the host's [`crate::disk::DiskSource`]:
//! in csvd that is the volume's own I/O path (the file's lease and extent
//! map, straight to the LUN or redirected through a peer), not the FUSE
//! mount.
//!
//! ```text
//!   csvd ─┬─ supervisor ──QMP──> qemu-system-x86_64
//!         └─ disk server <──vhost-user── (guest RAM shared)
//!              └─ vhd ─> VolumeFile ─> extent map ─> LUN (own path, or a peer's)
//! ```
//!
//! Guest RAM is a shared memfd (`memory-backend-memfd,share=on`): the
//! disk server reads and writes it directly. Acceleration is KVM where
//! the host has hardware virtualization and TCG where it does not
//! ([`Accel::detect`]); the choice and its reason are logged at start and
//! shown in `csvctl validate`, never a silent fall-back.
//!
//! Live migration is QEMU's, with `pause-before-switchover`: when the
//! source reaches `pre-switchover` its vCPUs are stopped and its disk
//! server has flushed and stopped serving; the supervisor's switch-over
//! moves the VHD's write lease to the target, then `migrate-continue`
//! sends the device state and the target resumes (its disk server opens
//! the VHD for writing at the guest's first request there). A failed
//! hand-over cancels the migration and the VM runs on here. The stream is
//! encrypted and authenticated with TLS keyed by the migration token
//! (`tls-creds-psk`): only the host the registry chose can send the VM.
//!
//! A quick migration saves to a file on the volume (`migrate` to
//! `file:PATH`) and the target restores from it (`migrate-incoming`).

use super::engine::{
    die_with_parent, log_tail as tail, Engine, EngineError, Instance, Quiesced, Start, VmHandle,
    VmSpec,
};
use super::role::Guest;
use crate::control::proto::{Status, VmmState};
use crate::migrate::{Progress, Summary};
use crate::qemu::blk::{self, Access, DiskServer, DiskServerError};
use crate::qemu::console::{self, ConsoleInput};
use crate::qemu::qga::Agent;
use crate::qemu::qmp::{
    Capability, CapabilityState, Command, MigrateParameters, MigrationInfo, MigrationStatus, Qmp,
    QmpError, SocketAddress, StatusInfo,
};
use crate::vm::RunState;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The QEMU engine.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `qemu-system-x86_64`.
    pub program: PathBuf,
}

/// How QEMU runs guests on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accel {
    /// `kvm` or `tcg`.
    pub name: &'static str,
    /// Why.
    pub reason: String,
}

impl Accel {
    /// KVM when `/dev/kvm` opens and the CPU has hardware virtualization
    /// (vmx or svm); TCG otherwise. (`/dev/kvm` alone is not enough: a
    /// paravirtual KVM such as kvm_pvm runs no unmodified kernel.)
    pub fn detect() -> Accel {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        Accel::decide(kvm.is_ok(), hw)
    }

    fn decide(kvm: bool, hw: bool) -> Accel {
        match (kvm, hw) {
            (true, true) => Accel {
                name: "kvm",
                reason: "/dev/kvm with hardware virtualization".into(),
            },
            (true, false) => Accel {
                name: "tcg",
                reason: "/dev/kvm is there but the CPU shows no vmx/svm (a paravirtual KVM): \
                         guests run under QEMU's TCG, much slower"
                    .into(),
            },
            (false, _) => Accel {
                name: "tcg",
                reason: "no usable /dev/kvm: guests run under QEMU's TCG, much slower".into(),
            },
        }
    }
}

/// The UEFI firmware image, where installed (Debian's `ovmf`).
pub fn ovmf() -> Option<PathBuf> {
    ["/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Whether `qemu-system-x86_64` is on PATH.
pub fn installed() -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    })
}

/// Where `qemu-system-x86_64` is.
pub fn default_program() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

/// The files of one VM in its run directory.
#[derive(Debug, Clone)]
struct Files {
    qmp: PathBuf,
    vhost: PathBuf,
    serial: PathBuf,
    console: PathBuf,
    log: PathBuf,
    tls: PathBuf,
    qga: PathBuf,
}

impl Files {
    fn of(vm: &VmSpec) -> Files {
        let f = |ext: &str| vm.run_dir.join(format!("{}.{ext}", vm.name));
        Files {
            qmp: f("qmp"),
            vhost: f("vhost"),
            serial: f("serial"),
            console: f("console"),
            log: f("log"),
            tls: f("tls"),
            qga: f("qga"),
        }
    }
}

/// Writes the migration token as a TLS pre-shared key where QEMU's
/// `tls-creds-psk` reads it (`DIR/keys.psk`, `user:hexkey`, mode 0600).
fn write_psk(dir: &Path, token: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("keys.psk"))?;
    std::io::Write::write_all(&mut f, format!("csv:{token}\n").as_bytes())
}

/// The user name the key is filed under.
const PSK_USER: &str = "csv";
/// The credentials object's id in an incoming QEMU.
const TLS_ID: &str = "csv-migration-tls";
/// The credentials object's id in a sending QEMU (which may hold the
/// incoming one still, having been a target before).
const TLS_OUT_ID: &str = "csv-migration-tls-out";

impl Qemu {
    /// QEMU's command line for `vm`.
    fn args(&self, vm: &VmSpec, files: &Files, accel: &Accel) -> Result<Vec<String>, EngineError> {
        let c = &vm.config;
        let mem = c.memory;
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("guest={},debug-threads=on", vm.name),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-machine".into(),
            format!("pc,accel={},memory-backend=csv-ram", accel.name),
            "-cpu".into(),
            if accel.name == "kvm" { "host" } else { "max" }.into(),
            "-m".into(),
            format!("{}M", mem >> 20),
            "-object".into(),
            format!("memory-backend-memfd,id=csv-ram,size={mem},share=on"),
            "-smp".into(),
            c.vcpus.to_string(),
            "-chardev".into(),
            format!("socket,id=csv-disk,path={}", files.vhost.display()),
            "-device".into(),
            format!(
                "vhost-user-blk-pci,chardev=csv-disk,num-queues=1,queue-size={}{}",
                crate::qemu::blk::QUEUE_SIZE,
                // Firmware boots the disk first (a direct kernel boot's
                // loader takes the first boot slot itself).
                if vm.kernel.is_none() {
                    ",bootindex=0"
                } else {
                    ""
                }
            ),
            // The serial console: QEMU connects to this process, which
            // keeps its output in NAME.serial and types console input.
            "-chardev".into(),
            format!(
                "socket,id=csv-con,path={},server=off",
                files.console.display()
            ),
            "-serial".into(),
            "chardev:csv-con".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", files.qmp.display()),
            // The guest agent's port (org.qemu.guest_agent.0); used when
            // the guest runs qemu-ga.
            "-device".into(),
            "virtio-serial-pci,id=csv-vser".into(),
            "-chardev".into(),
            format!(
                "socket,id=csv-qga,path={},server=on,wait=off",
                files.qga.display()
            ),
            "-device".into(),
            "virtserialport,bus=csv-vser.0,chardev=csv-qga,name=org.qemu.guest_agent.0".into(),
        ];
        a.extend(
            nic_args(&vm.name, c.nic.as_deref()).map_err(|what| EngineError::Config {
                vm: vm.name.clone(),
                what,
            })?,
        );
        if let Some(hb) = &c.heartbeat {
            let (host, port) = hb.rsplit_once(':').ok_or_else(|| EngineError::Config {
                vm: vm.name.clone(),
                what: format!("heartbeat {hb:?} is not HOST:PORT"),
            })?;
            a.push("-chardev".into());
            a.push(format!("udp,id=csv-hb,host={host},port={port}"));
            a.push("-serial".into());
            a.push("chardev:csv-hb".into());
        }
        match &vm.kernel {
            Some(k) => {
                a.push("-kernel".into());
                a.push(k.display().to_string());
                if let Some(i) = &vm.initrd {
                    a.push("-initrd".into());
                    a.push(i.display().to_string());
                }
                a.push("-append".into());
                a.push(
                    c.cmdline
                        .clone()
                        .unwrap_or_else(|| "console=ttyS0".to_string()),
                );
            }
            // Firmware boots the disk: UEFI (OVMF) where installed.
            // SeaBIOS is QEMU's default, but here it cannot boot from a
            // vhost-user-blk disk: its requests live in the BIOS area
            // below 1 MiB and stall after the boot sector (the same with
            // qemu-storage-daemon's backend).
            None => match ovmf() {
                Some(fw) => {
                    a.push("-bios".into());
                    a.push(fw.display().to_string());
                }
                None => tracing::warn!(vm = %vm.name,
                    "no OVMF (apt install ovmf): SeaBIOS may not boot a vhost-user-blk disk"),
            },
        }
        match &vm.start {
            Start::Boot => {}
            Start::Restore(_) => a.extend(["-incoming".into(), "defer".into()]),
            Start::Incoming { .. } => {
                a.extend(["-incoming".into(), "defer".into()]);
                a.push("-object".into());
                a.push(format!(
                    "tls-creds-psk,id={TLS_ID},endpoint=server,dir={}",
                    files.tls.display()
                ));
            }
        }
        Ok(a)
    }

    /// Starts the VM's disk server on a thread of this process, serving
    /// the VHD through the host's disk source, and waits for its socket.
    fn start_disk_server(&self, vm: &VmSpec, files: &Files) -> Result<DiskThread, EngineError> {
        let _ = std::fs::remove_file(&files.vhost);
        let access = match vm.start {
            Start::Incoming { .. } => Access::WriteOnFirstRequest,
            _ => Access::Write,
        };
        let server =
            DiskServer::open(vm.disks.clone(), &vm.disk, access, None).map_err(|source| {
                EngineError::Disk {
                    vm: vm.name.clone(),
                    source: Box::new(source),
                }
            })?;
        let server = Arc::new(server);
        tracing::info!(vm = %vm.name, disk = %vm.disk.display(), through = vm.disks.kind(&vm.disk),
            bytes = server.capacity(), ?access, "serving the disk");
        let thread = {
            let (s, socket, name) = (server.clone(), files.vhost.clone(), vm.name.clone());
            std::thread::Builder::new()
                .name(format!("disk {}", vm.name))
                .spawn(move || {
                    let r = blk::serve(s.clone(), &socket);
                    match &r {
                        Ok(()) => tracing::info!(vm = %name, stats = ?s.stats(), "QEMU disconnected; disk flushed and closed"),
                        Err(e) => tracing::warn!(vm = %name, error = %coordinator::service::error_chain(e), "disk server ended"),
                    }
                    r
                })
                .map_err(|source| EngineError::Files {
                    what: "starting a thread to serve",
                    path: vm.disk.clone(),
                    source,
                })?
        };
        let mut disk = DiskThread {
            server,
            socket: files.vhost.clone(),
            thread: Some(thread),
        };
        // QEMU connects to the socket as it starts: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !files.vhost.exists() {
            if disk.finished() || Instant::now() > deadline {
                let why = disk.end(Duration::from_secs(1));
                return Err(EngineError::Config {
                    vm: vm.name.clone(),
                    what: format!(
                        "the disk server did not listen on {}: {why}",
                        files.vhost.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(disk)
    }
}

/// A VM's disk server: a thread of the node daemon serving the VHD on
/// the vhost-user socket until QEMU goes away.
#[derive(Debug)]
struct DiskThread {
    server: Arc<DiskServer>,
    socket: PathBuf,
    thread: Option<std::thread::JoinHandle<Result<(), DiskServerError>>>,
}

impl DiskThread {
    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits up to `patience` for the server to end (QEMU gone: it flushes
    /// and closes the VHD, giving its lease back); a server still waiting
    /// for QEMU to connect is woken by a connection that closes at once.
    /// Says how it ended.
    fn end(&mut self, patience: Duration) -> String {
        let Some(t) = self.thread.take() else {
            return "ended".into();
        };
        let deadline = Instant::now() + patience;
        let mut poked = false;
        while !t.is_finished() && Instant::now() < deadline {
            if !poked && deadline - Instant::now() < patience / 2 {
                let _ = std::os::unix::net::UnixStream::connect(&self.socket);
                poked = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if !t.is_finished() {
            tracing::warn!(socket = %self.socket.display(), "the disk server did not end; left running");
            return "still running".into();
        }
        match t.join() {
            Ok(Ok(())) => "ended".into(),
            Ok(Err(e)) => coordinator::service::error_chain(&e),
            Err(_) => "panicked".into(),
        }
    }
}

/// QEMU's arguments for a role's NIC setting (`user`, `bridge:NAME`, or
/// none), its MAC address derived from the role's name.
fn nic_args(name: &str, nic: Option<&str>) -> Result<Vec<String>, String> {
    let netdev = match nic {
        None => return Ok(vec!["-nic".into(), "none".into()]),
        Some("user") => "user,id=csv-net".to_string(),
        Some(n) => match n.strip_prefix("bridge:") {
            Some(br)
                if !br.is_empty()
                    && br
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
            {
                format!("bridge,id=csv-net,br={br}")
            }
            _ => return Err(format!("nic {n:?}: give user or bridge:NAME")),
        },
    };
    Ok(vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!(
            "virtio-net-pci,netdev=csv-net,mac={}",
            super::role::VmConfig::mac(name)
        ),
    ])
}

impl Engine for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, vm: &VmSpec) -> Result<Box<dyn Instance>, EngineError> {
        if vm.config.guest != Guest::Linux {
            return Err(EngineError::Config {
                vm: vm.name.clone(),
                what: "the qemu engine runs real guests (guest \"linux\"); the test guest runs in csv-vmm"
                    .into(),
            });
        }
        std::fs::create_dir_all(&vm.run_dir).map_err(|source| EngineError::Files {
            what: "making",
            path: vm.run_dir.clone(),
            source,
        })?;
        let files = Files::of(vm);
        let accel = Accel::detect();
        if let Start::Incoming { token, .. } = &vm.start {
            write_psk(&files.tls, token).map_err(|source| EngineError::Files {
                what: "writing the migration key in",
                path: files.tls.clone(),
                source,
            })?;
        }
        let disk = self.start_disk_server(vm, &files)?;
        let console =
            console::keep(&files.console, &files.serial).map_err(|source| EngineError::Files {
                what: "listening for the serial console on",
                path: files.console.clone(),
                source,
            })?;
        let _ = std::fs::remove_file(&files.qmp);
        let log = std::fs::File::create(&files.log).map_err(|source| EngineError::Files {
            what: "creating",
            path: files.log.clone(),
            source,
        })?;
        let mut cmd = Process::new(&self.program);
        cmd.args(self.args(vm, &files, &accel)?);
        die_with_parent(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| EngineError::Start {
                program: self.program.clone(),
                vm: vm.name.clone(),
                source,
            })?;
        tracing::info!(vm = %vm.name, pid = child.id(), accel = accel.name, why = %accel.reason,
            disk = %vm.disk.display(), start = ?vm.start, "QEMU started");
        let handle = Arc::new(Handle {
            qmp_path: files.qmp.clone(),
            qmp: Mutex::new(None),
            disk: disk.server.clone(),
            console,
            tls: files.tls.clone(),
            qga: files.qga.clone(),
            mem_bytes: vm.config.memory,
            vcpus: vm.config.vcpus,
            incoming: match &vm.start {
                Start::Incoming { listen, .. } => Some(format!("tcp:{}:0", listen.ip())),
                Start::Restore(p) => Some(format!("file:{}", p.display())),
                Start::Boot => None,
            },
            listen: Mutex::new(None),
        });
        let mut process = QemuProcess {
            child,
            disk,
            log: files.log,
            handle,
        };
        if let Err(e) = process.handle.begin_incoming() {
            process.kill();
            return Err(EngineError::Qmp {
                vm: vm.name.clone(),
                source: e,
            });
        }
        Ok(Box::new(process))
    }
}

#[derive(Debug)]
struct QemuProcess {
    child: Child,
    disk: DiskThread,
    log: PathBuf,
    handle: Arc<Handle>,
}

impl Instance for QemuProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.try_wait().ok().flatten();
        if st.is_some() {
            // QEMU gone: its disk server sees the socket close, flushes
            // and closes the VHD (its lease goes back before anyone is
            // told the VM stopped).
            self.disk.end(Duration::from_secs(10));
        }
        st
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.disk.end(Duration::from_secs(10));
    }

    fn log_tail(&self) -> String {
        tail(&self.log)
    }

    fn handle(&self) -> Arc<dyn VmHandle> {
        self.handle.clone()
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.disk.end(Duration::from_secs(10));
    }
}

/// A running QEMU, through its QMP socket.
#[derive(Debug)]
struct Handle {
    qmp_path: PathBuf,
    qmp: Mutex<Option<Qmp>>,
    /// The VM's disk server (its counters).
    disk: Arc<DiskServer>,
    /// Its serial console's input.
    console: ConsoleInput,
    tls: PathBuf,
    qga: PathBuf,
    mem_bytes: u64,
    vcpus: u32,
    /// An incoming migration's URI (`tcp:IP:0`, `file:PATH`).
    incoming: Option<String>,
    /// Where it listens, once it does.
    listen: Mutex<Option<String>>,
}

impl Handle {
    /// Runs `f` on the QMP connection (connecting first if need be; a
    /// broken connection is dropped, the next call reconnects).
    fn with<T>(&self, f: impl FnOnce(&mut Qmp) -> Result<T, QmpError>) -> Result<T, QmpError> {
        let mut g = self.qmp.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(Qmp::connect(&self.qmp_path, Duration::from_secs(10))?);
        }
        let Some(q) = g.as_mut() else {
            return Err(QmpError::Closed);
        };
        let r = f(q);
        if matches!(r, Err(QmpError::Io { .. } | QmpError::Closed)) {
            *g = None;
        }
        r
    }

    fn run(&self, cmd: Command) -> Result<(), QmpError> {
        self.with(|q| q.run(&cmd))
    }

    /// Polls the migration every `every` until it completed, failed or
    /// was cancelled (at most `limit`).
    fn wait_ended(&self, every: Duration, limit: Duration) -> Result<MigrationInfo, QmpError> {
        self.with(|q| q.wait_migration(every, limit, |i| ended(i.status)))
    }

    /// For an incoming VM: starts listening and notes where.
    fn begin_incoming(&self) -> Result<(), QmpError> {
        let Some(uri) = &self.incoming else {
            return Ok(());
        };
        if uri.starts_with("tcp:") {
            self.run(Command::MigrateSetParameters(MigrateParameters {
                tls_creds: Some(TLS_ID.into()),
                ..Default::default()
            }))?;
        }
        self.run(Command::MigrateIncoming { uri: uri.clone() })?;
        if uri.starts_with("file:") {
            // A saved state: the guest was paused to be saved, so it stays
            // paused once loaded; it runs on here.
            let info = self.wait_ended(Duration::from_millis(20), Duration::from_secs(600))?;
            if info.status != Some(MigrationStatus::Completed) {
                return Err(QmpError::Unexpected(format!(
                    "restoring {uri} ended {:?}: {}",
                    info.status,
                    info.error_desc.unwrap_or_default()
                )));
            }
            self.run(Command::Cont)?;
        }
        if uri.starts_with("tcp:") {
            let info: MigrationInfo = self.with(|q| q.execute(&Command::QueryMigrate))?;
            let addr = info
                .socket_address
                .unwrap_or_default()
                .into_iter()
                .find_map(|a| match a {
                    SocketAddress::Inet { host, port } => Some(format!("{host}:{port}")),
                    _ => None,
                });
            *self.listen.lock().unwrap_or_else(|p| p.into_inner()) = addr;
        }
        Ok(())
    }

    fn summary(info: &MigrationInfo) -> Summary {
        let ram = info.ram.unwrap_or_default();
        Summary {
            rounds: ram.dirty_sync_count as u32,
            total_ms: info.total_time.unwrap_or(0) as f64,
            downtime_ms: info.downtime.unwrap_or(0) as f64,
            bytes: ram.transferred,
            pages: ram.transferred / 4096,
            ..Default::default()
        }
    }

    fn progress(info: &MigrationInfo) -> Progress {
        let ram = info.ram.unwrap_or_default();
        Progress {
            round: ram.dirty_sync_count as u32,
            pages_sent: ram.transferred / 4096,
            dirty_pages: ram.remaining / 4096,
            bandwidth_mib_s: ram.mbps / 8.0 * 1e6 / (1 << 20) as f64,
            estimated_downtime_ms: info.expected_downtime.unwrap_or(0) as f64,
            throttle_pct: 0,
        }
    }
}

fn run_state(s: &StatusInfo) -> VmmState {
    match s.status.as_str() {
        "running" => VmmState::Vm(RunState::Running),
        "inmigrate" => VmmState::Incoming,
        "prelaunch" => VmmState::Starting,
        "postmigrate" | "finish-migrate" => VmmState::Vm(RunState::Migrated),
        "shutdown" | "guest-panicked" | "internal-error" => VmmState::Vm(RunState::Stopped),
        _ => VmmState::Vm(RunState::Paused),
    }
}

fn qmp_err(e: QmpError) -> EngineError {
    EngineError::Qmp {
        vm: String::new(),
        source: e,
    }
}

/// Whether a migration has ended one way or the other.
fn ended(s: Option<MigrationStatus>) -> bool {
    matches!(
        s,
        Some(MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
    )
}

impl VmHandle for Handle {
    fn status(&self) -> Result<Status, EngineError> {
        let s: StatusInfo = self
            .with(|q| q.execute(&Command::QueryStatus))
            .map_err(qmp_err)?;
        let disk = Some(self.disk.stats());
        Ok(Status {
            state: Some(run_state(&s)),
            listen: self
                .listen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            mem_bytes: self.mem_bytes,
            vcpus: self.vcpus,
            disk,
            ..Default::default()
        })
    }

    fn pause(&self) -> Result<(), EngineError> {
        self.run(Command::Stop).map_err(qmp_err)
    }

    fn resume(&self) -> Result<(), EngineError> {
        self.run(Command::Cont).map_err(qmp_err)
    }

    fn quiesce(&self, limit: Duration) -> Result<Quiesced, EngineError> {
        // An agent answers within a second or is taken as absent (a
        // snapshot's freeze is short); the freeze itself gets the rest.
        let ask = limit.min(Duration::from_secs(1));
        match Agent::connect(&self.qga, ask) {
            Ok(mut a) => {
                let left = limit.saturating_sub(ask).max(Duration::from_millis(500));
                match a.freeze(left) {
                    Ok(n) => return Ok(Quiesced::Frozen(n)),
                    Err(e) => {
                        // Half-frozen is worse than either: thaw, pause.
                        let _ = a.thaw(Duration::from_secs(2));
                        tracing::warn!(error = %coordinator::service::error_chain(&e),
                            "the guest agent did not freeze its filesystems; pausing the VM instead");
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %coordinator::service::error_chain(&e), "no guest agent")
            }
        }
        self.pause().map(|()| Quiesced::Paused)
    }

    fn release(&self, how: Quiesced) -> Result<(), EngineError> {
        match how {
            Quiesced::Paused => self.resume(),
            Quiesced::Frozen(_) => Agent::connect(&self.qga, Duration::from_secs(2))
                .and_then(|mut a| a.thaw(Duration::from_secs(5)))
                .map(drop)
                .map_err(qmp_err),
        }
    }

    fn console_input(&self, bytes: &[u8]) -> Result<(), EngineError> {
        console::type_into(&self.console, bytes).map_err(EngineError::Console)
    }

    fn stop(&self) -> Result<(), EngineError> {
        // QEMU exits; its disk server flushes the VHD as the socket closes.
        match self.run(Command::Quit) {
            Ok(()) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(qmp_err(e)),
        }
    }

    fn save(&self, path: &Path) -> Result<Summary, EngineError> {
        // A file needs no TLS (a VM that came in by live migration has
        // the incoming credentials set) and no pause before switch-over.
        self.run(Command::MigrateSetParameters(MigrateParameters {
            tls_creds: Some(String::new()),
            ..Default::default()
        }))
        .map_err(qmp_err)?;
        self.run(Command::MigrateSetCapabilities {
            capabilities: vec![CapabilityState {
                capability: Capability::PauseBeforeSwitchover,
                state: false,
            }],
        })
        .map_err(qmp_err)?;
        self.run(Command::Stop).map_err(qmp_err)?;
        self.run(Command::Migrate {
            uri: format!("file:{}", path.display()),
        })
        .map_err(qmp_err)?;
        let info = self
            .wait_ended(Duration::from_millis(50), Duration::from_secs(600))
            .map_err(qmp_err)?;
        if info.status != Some(MigrationStatus::Completed) {
            let _ = self.run(Command::Cont);
            return Err(EngineError::Migration(
                info.error_desc
                    .unwrap_or_else(|| format!("saving ended {:?}", info.status)),
            ));
        }
        let _ = self.stop();
        Ok(Handle::summary(&info))
    }

    fn migrate(
        &self,
        to: &str,
        token: &str,
        progress: &mut dyn FnMut(&Progress),
        switch_over: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
    ) -> Result<Summary, EngineError> {
        write_psk(&self.tls, token).map_err(|source| EngineError::Files {
            what: "writing the migration key in",
            path: self.tls.clone(),
            source,
        })?;
        let setup = |q: &mut Qmp| -> Result<(), QmpError> {
            // A fresh object for this migration's key (one left by an
            // earlier attempt goes first).
            let _ = q.run(&Command::ObjectDel {
                id: TLS_OUT_ID.into(),
            });
            q.run(&Command::ObjectAdd(crate::qemu::qmp::TlsCredsPsk {
                qom_type: "tls-creds-psk".into(),
                id: TLS_OUT_ID.into(),
                endpoint: "client".into(),
                dir: self.tls.display().to_string(),
                username: PSK_USER.into(),
            }))?;
            q.migrate_paused(TLS_OUT_ID, format!("tcp:{to}"))
        };
        self.with(setup).map_err(qmp_err)?;
        // Pre-copy rounds until QEMU stops the guest before switch-over.
        let info = loop {
            let info: MigrationInfo = self
                .with(|q| q.execute(&Command::QueryMigrate))
                .map_err(qmp_err)?;
            match info.status {
                Some(MigrationStatus::PreSwitchover) => break info,
                s if ended(s) => {
                    return Err(EngineError::Migration(
                        info.error_desc
                            .unwrap_or_else(|| format!("the migration ended {s:?}")),
                    ))
                }
                _ => progress(&Handle::progress(&info)),
            }
            // The guest is paused from `pre-switchover` until the lease
            // has moved and QEMU hears `migrate-continue`: a coarse poll
            // would add its period to the downtime.
            std::thread::sleep(Duration::from_millis(2));
        };
        progress(&Handle::progress(&info));
        // The guest is paused and its disk server stopped and flushed:
        // the write lease moves now, or the migration is given up.
        // When QEMU paused before the switch-over (its event's stamp; the
        // poll's own time otherwise).
        let paused_at = self
            .with(|q| Ok(q.paused_at()))
            .ok()
            .flatten()
            .unwrap_or_else(std::time::SystemTime::now);
        let t = Instant::now();
        let handed = switch_over();
        let handed_ms = t.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = handed {
            let _ = self.run(Command::MigrateCancel);
            let _ = self.wait_ended(Duration::from_millis(20), Duration::from_secs(30));
            if let Ok(s) = self.with(|q| q.execute::<StatusInfo>(&Command::QueryStatus)) {
                if !s.running {
                    let _ = self.run(Command::Cont);
                }
            }
            return Err(EngineError::Migration(format!(
                "switch-over refused, the VM runs on here: {e}"
            )));
        }
        self.run(Command::MigrateContinue {
            state: MigrationStatus::PreSwitchover,
        })
        .map_err(qmp_err)?;
        let held = paused_at.elapsed().unwrap_or_default();
        tracing::info!(
            held_ms = held.as_secs_f64() * 1e3,
            hand_over_ms = handed_ms,
            "switch-over: the guest waited at pre-switchover"
        );
        let info = self
            .wait_ended(Duration::from_millis(2), Duration::from_secs(120))
            .map_err(qmp_err)?;
        if info.status != Some(MigrationStatus::Completed) {
            return Err(EngineError::Migration(info.error_desc.unwrap_or_else(
                || format!("the migration ended {:?}", info.status),
            )));
        }
        // The guest runs on the target: this QEMU exits, and its disk
        // server closes the VHD (this host no longer holds its lease).
        let _ = self.stop();
        Ok(Summary {
            switchover_ms: held.as_secs_f64() * 1e3,
            ..Handle::summary(&info)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_is_chosen_with_its_reason_where_kvm_cannot_run_guests() {
        assert_eq!(Accel::decide(true, true).name, "kvm");
        let pvm = Accel::decide(true, false);
        assert_eq!(pvm.name, "tcg");
        assert!(pvm.reason.contains("vmx/svm"), "{}", pvm.reason);
        assert_eq!(Accel::decide(false, true).name, "tcg");
    }

    #[test]
    fn qemu_run_states_map_to_the_supervisors() {
        let s = |x: &str| {
            run_state(&StatusInfo {
                running: x == "running",
                status: x.into(),
            })
        };
        assert_eq!(s("running"), VmmState::Vm(RunState::Running));
        assert_eq!(s("inmigrate"), VmmState::Incoming);
        assert_eq!(s("postmigrate"), VmmState::Vm(RunState::Migrated));
        assert_eq!(s("paused"), VmmState::Vm(RunState::Paused));
        assert_eq!(s("shutdown"), VmmState::Vm(RunState::Stopped));
    }

    #[test]
    fn nics_get_the_roles_mac_on_every_host() {
        assert_eq!(nic_args("a", None).unwrap(), ["-nic", "none"]);
        let u = nic_args("web1", Some("user")).unwrap();
        assert_eq!(u[1], "user,id=csv-net");
        assert!(u[3].ends_with(&super::super::role::VmConfig::mac("web1")));
        let b = nic_args("web1", Some("bridge:br0")).unwrap();
        assert_eq!(b[1], "bridge,id=csv-net,br=br0");
        assert!(nic_args("x", Some("bridge:")).is_err());
        assert!(nic_args("x", Some("bridge:a,b=c")).is_err());
        assert!(nic_args("x", Some("tap")).is_err());
    }

    #[test]
    fn the_migration_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        write_psk(&d.path().join("tls"), "00ff").unwrap();
        let f = d.path().join("tls/keys.psk");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "csv:00ff\n");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
