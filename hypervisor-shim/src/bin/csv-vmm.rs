//! `csv-vmm`: one KVM virtual machine per process.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hypervisor_shim::control::proto::{MigrateRequest, Reply, Request};
use hypervisor_shim::control::{self, Control, Slot};
use hypervisor_shim::disk::LocalFiles;
use hypervisor_shim::guest::TestGuestConfig;
use hypervisor_shim::migrate;
use hypervisor_shim::vm::{RunState, SerialOut, Vm, VmConfig};

/// A small KVM VMM for csv cluster VMs: runs the test guest, saves and
/// restores it, and live-migrates it to another csv-vmm.
///
/// Examples:
///   csv-vmm run --memory 256M --dirty-rate 50 --control /run/vm1.sock
///   csv-vmm incoming --listen 0.0.0.0:7400 --token-file vm1.token --control /run/vm1-in.sock
///   CSV_MIGRATION_TOKEN=... csv-vmm ctl --control /run/vm1.sock migrate 10.0.0.2:7400
///   csv-vmm ctl --control /run/vm1.sock save /ClusterStorage/Volume1/vm1.state
///   csv-vmm restore --from /ClusterStorage/Volume1/vm1.state
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot the test guest.
    Run(RunArgs),
    /// Boot a Linux kernel (bzImage) with an initramfs and a command line
    /// (tools/guest/build-linux.sh makes a Debian kernel and a busybox
    /// initramfs). On hosts whose KVM is kvm_pvm this is very slow: see
    /// docs/VMM.md.
    Boot {
        /// The kernel (bzImage, boot protocol 2.12 or later).
        #[arg(long)]
        kernel: PathBuf,
        /// The initramfs.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The kernel command line.
        #[arg(
            long,
            default_value = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 reboot=k"
        )]
        cmdline: String,
        /// Guest memory (bytes, or with K, M, G).
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        memory: u64,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Wait for a live migration, then run the guest it brings.
    Incoming {
        /// Address to listen on for the migration stream.
        #[arg(long)]
        listen: SocketAddr,
        /// File holding this target's migration token (64 hex digits; the
        /// source must open with it). Default: $CSV_MIGRATION_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Restore a VM saved with `ctl save` and run it.
    Restore {
        /// The save file.
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Check a save file frame by frame without running it, and print what
    /// it holds (JSON).
    Inspect {
        /// The save file.
        file: PathBuf,
    },
    /// Write the test guest image (a flat multiboot kernel that also boots
    /// under `qemu-system-x86_64 -kernel FILE -append "TSC_KHZ PAGES TICK_US"`).
    GuestImage {
        /// Where to write it.
        out: PathBuf,
    },
    /// Serve a VHD to QEMU as a vhost-user-blk device (the `qemu` engine
    /// runs one per VM): QEMU connects to SOCKET with
    /// `-chardev socket,id=d,path=SOCKET -device vhost-user-blk-pci,chardev=d`
    /// and guest memory shared (`memory-backend-memfd,share=on`). Exits
    /// when QEMU disconnects, after flushing the disk.
    ServeDisk {
        /// The VHD (fixed, dynamic or differencing).
        #[arg(long)]
        disk: PathBuf,
        /// The vhost-user socket to listen on (made; an old one is removed).
        #[arg(long)]
        socket: PathBuf,
        /// Where to keep the disk's counters (JSON, rewritten every second).
        #[arg(long)]
        stats: Option<PathBuf>,
        /// Open the disk read-only until the guest's first request (a live
        /// migration's target: the write lease arrives at switch-over).
        #[arg(long)]
        migration_target: bool,
        /// Log JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
    },
    /// Talk to a running csv-vmm through its control socket.
    Ctl {
        /// The VMM's control socket.
        #[arg(long)]
        control: PathBuf,
        #[command(subcommand)]
        op: CtlOp,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest memory (bytes, or with K, M, G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Virtual CPUs (the test guest runs on the first; the others wait for
    /// a start-up IPI).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// How fast the test guest rewrites its memory, MiB/s (0: idle).
    #[arg(long, default_value_t = 0.0)]
    dirty_rate: f64,
    /// Heartbeat interval of the test guest, microseconds.
    #[arg(long, default_value_t = 1000)]
    tick_us: u64,
    /// With --disk: 4 KiB blocks the test guest writes round robin.
    #[arg(long, default_value_t = 256)]
    disk_blocks: u64,
    /// With --disk: one block every this many heartbeats.
    #[arg(long, default_value_t = 10)]
    disk_every: u64,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Args, Debug)]
struct HostArgs {
    /// Serial console: `stdout`, `null`, `file:PATH` or `unix:PATH` (a
    /// socket a console server listens on).
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    serial: SerialOut,
    /// Control socket (JSON lines); see `csv-vmm ctl --help`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Send every heartbeat to this UDP observer (u64 sequence, u32 pid).
    #[arg(long)]
    heartbeat_udp: Option<SocketAddr>,
    /// The VM's disk: a VHD (fixed, dynamic or differencing) behind a
    /// virtio-blk device. A migration target or a restore names the same
    /// file on shared storage.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Logs as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum CtlOp {
    /// State, heartbeat and the guest's counters (JSON).
    Status,
    Pause,
    Resume,
    Stop,
    /// Save the VM to a file and stop it (quick migration).
    Save {
        path: PathBuf,
        /// Resume the guest here after saving.
        #[arg(long)]
        keep_running: bool,
    },
    /// Live-migrate to a `csv-vmm incoming` at HOST:PORT.
    Migrate {
        to: String,
        /// The target's migration token (64 hex digits). Default:
        /// $CSV_MIGRATION_TOKEN.
        #[arg(long, env = "CSV_MIGRATION_TOKEN", hide_env_values = true)]
        token: String,
        /// Longest acceptable pause of the guest, ms.
        #[arg(long, default_value_t = 100)]
        downtime_ms: u64,
        /// Give up after this many seconds (the guest stays here).
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        /// Compare a CRC of all guest memory on both sides at the switch-over.
        #[arg(long)]
        verify_memory: bool,
    },
    /// Change the test guest's dirtying rate, MiB/s.
    SetRate {
        mib_per_s: f64,
    },
    /// Check every page the test guest wrote against its pattern.
    Check,
    /// CRC32 of all guest memory.
    MemoryCrc,
    /// Memory size and pages in use.
    Stats,
    /// Each vCPU's RIP, RSP, CR0, CS and MP state.
    Registers,
}

fn parse_size(s: &str) -> Result<u64, vhd::size::SizeError> {
    vhd::size::parse_positive(s)
}

fn parse_serial(s: &str) -> Result<SerialOut, String> {
    match s {
        "stdout" => Ok(SerialOut::Stdout),
        "null" | "none" => Ok(SerialOut::Null),
        _ => match (s.strip_prefix("file:"), s.strip_prefix("unix:")) {
            (Some(p), _) if !p.is_empty() => Ok(SerialOut::File(PathBuf::from(p))),
            (_, Some(p)) if !p.is_empty() => Ok(SerialOut::Unix(PathBuf::from(p))),
            _ => Err(format!("{s:?}: use stdout, null, file:PATH or unix:PATH")),
        },
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CSV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn host_config(h: &HostArgs, mem_bytes: u64, vcpus: u32) -> VmConfig {
    VmConfig {
        mem_bytes,
        vcpus,
        serial: h.serial.clone(),
        heartbeat_udp: h.heartbeat_udp,
        disk: h.disk.clone(),
    }
}

/// Serves the control socket and waits until the VM is stopped, saved or
/// migrated away; returns the process exit code.
fn supervise(vm: Arc<Vm>, slot: &Slot) -> i32 {
    slot.set(vm.clone());
    let end = vm.wait_stopped();
    // Let a `save` or `migrate` request send its answer before exiting.
    slot.drain(Duration::from_secs(5));
    tracing::info!(state = ?end, "VM finished");
    match end {
        RunState::Migrated | RunState::Saved => 0,
        _ => {
            if vm.heartbeat().guest_errors > 0 {
                2
            } else {
                0
            }
        }
    }
}

/// What a VMM keeps of root's capabilities: reading and writing its disk
/// and state files (dac_override, dac_read_search), locking guest memory
/// and raising its limits (ipc_lock, sys_resource), and a migration
/// thread's priority (sys_nice). /dev/kvm needs none.
/// What csv-vmm keeps of root's capabilities: reading and writing its
/// disk and state files whoever owns them (dac_override,
/// dac_read_search), locking guest memory (ipc_lock), and priorities and
/// limits for its vCPU threads (sys_nice, sys_resource).
const CAPS: [caps::Capability; 5] = [
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_IPC_LOCK,
    caps::Capability::CAP_SYS_NICE,
    caps::Capability::CAP_SYS_RESOURCE,
];

fn main() -> anyhow::Result<()> {
    // Before any thread starts (capabilities are per thread).
    let privileges = hypervisor_shim::privileges::drop_all_but(&CAPS);
    let cli = Cli::parse();
    let host = match &cli.cmd {
        Cmd::Run(a) => Some(&a.host),
        Cmd::Incoming { host, .. } | Cmd::Restore { host, .. } | Cmd::Boot { host, .. } => {
            Some(host)
        }
        Cmd::Ctl { .. } | Cmd::GuestImage { .. } | Cmd::Inspect { .. } => None,
        Cmd::ServeDisk { log_json, .. } => {
            init_logs(*log_json);
            None
        }
    };
    if let Some(h) = host {
        init_logs(h.log_json);
        match &privileges {
            Ok(what) => tracing::info!("privileges: {what}"),
            Err(e) => tracing::warn!(
                "could not drop privileges: {}",
                coordinator::service::error_chain(e)
            ),
        }
    }
    let slot = Arc::new(Slot::default());
    if let Some(path) = host.and_then(|h| h.control.as_ref()) {
        control::serve(path, slot.clone())
            .with_context(|| format!("control socket {}", path.display()))?;
    }
    let code = match cli.cmd {
        Cmd::Run(a) => {
            let vm = Arc::new(Vm::new(host_config(&a.host, a.memory, a.vcpus))?);
            vm.attach_disk()?;
            let mut cfg = TestGuestConfig::for_rate(a.dirty_rate, a.tick_us);
            if let Some(stats) = vm.disk_capacity() {
                cfg.disk_blocks = a.disk_blocks.min(stats / 4096);
                cfg.disk_every = a.disk_every.max(1);
            }
            vm.load_test_guest(cfg)?;
            vm.start()?;
            supervise(vm, &slot)
        }
        Cmd::Boot {
            kernel,
            initrd,
            cmdline,
            memory,
            vcpus,
            host,
        } => {
            let image = std::fs::read(&kernel)
                .with_context(|| format!("read the kernel {}", kernel.display()))?;
            let rd = match &initrd {
                Some(p) => Some(
                    std::fs::read(p)
                        .with_context(|| format!("read the initramfs {}", p.display()))?,
                ),
                None => None,
            };
            let vm = Arc::new(Vm::new(host_config(&host, memory, vcpus))?);
            vm.attach_disk()?;
            vm.load_linux(&image, rd.as_deref(), &cmdline)?;
            vm.start()?;
            supervise(vm, &slot)
        }
        Cmd::Incoming {
            listen,
            token_file,
            host,
        } => {
            let hex = match &token_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("read the token file {}", f.display()))?,
                None => std::env::var("CSV_MIGRATION_TOKEN").context(
                    "an incoming migration needs its token: --token-file FILE or CSV_MIGRATION_TOKEN",
                )?,
            };
            let token = migrate::parse_token(&hex)?;
            let l = TcpListener::bind(listen).with_context(|| format!("listen on {listen}"))?;
            let bound = l.local_addr()?;
            slot.set_incoming(bound);
            tracing::info!(listen = %bound, "waiting for an incoming migration");
            let vm = migrate::incoming(&l, &host_config(&host, 0, 1), &token)?;
            supervise(vm, &slot)
        }
        Cmd::Restore { from, host } => {
            let vm = migrate::restore(&from, &host_config(&host, 0, 1))
                .with_context(|| format!("restore {}", from.display()))?;
            supervise(vm, &slot)
        }
        Cmd::Ctl { control, op } => return ctl(&control, op),
        Cmd::ServeDisk {
            disk,
            socket,
            stats,
            migration_target,
            ..
        } => {
            use hypervisor_shim::qemu::blk::{self, Access, DiskServer};
            let access = if migration_target {
                Access::WriteOnFirstRequest
            } else {
                Access::Write
            };
            let server = Arc::new(DiskServer::open(
                Arc::new(LocalFiles),
                &disk,
                access,
                stats,
            )?);
            tracing::info!(disk = %disk.display(), socket = %socket.display(), bytes = server.capacity(), ?access, "serving the disk");
            blk::serve(server.clone(), &socket)?;
            tracing::info!(stats = ?server.stats(), "QEMU disconnected; disk flushed");
            return Ok(());
        }
        Cmd::Inspect { file } => {
            let f =
                std::fs::File::open(&file).with_context(|| format!("open {}", file.display()))?;
            let i = hypervisor_shim::stream::inspect(&mut std::io::BufReader::new(f))
                .with_context(|| format!("{} is not a valid csv-vmm save file", file.display()))?;
            println!("{}", serde_json::to_string_pretty(&i)?);
            return Ok(());
        }
        Cmd::GuestImage { out } => {
            std::fs::write(&out, hypervisor_shim::guest::IMAGE)
                .with_context(|| format!("write {}", out.display()))?;
            return Ok(());
        }
    };
    std::process::exit(code)
}

fn ctl(path: &std::path::Path, op: CtlOp) -> anyhow::Result<()> {
    let req = match op {
        CtlOp::Status => Request::Status,
        CtlOp::Pause => Request::Pause,
        CtlOp::Resume => Request::Resume,
        CtlOp::Stop => Request::Stop,
        CtlOp::Save { path, keep_running } => Request::Save {
            path,
            stop: !keep_running,
        },
        CtlOp::Migrate {
            to,
            token,
            downtime_ms,
            timeout_s,
            verify_memory,
        } => Request::Migrate(MigrateRequest {
            to,
            token,
            downtime_ms: Some(downtime_ms),
            timeout_s: Some(timeout_s),
            verify_memory,
            confirm: false,
        }),
        CtlOp::SetRate { mib_per_s } => Request::SetRate {
            mib_per_s,
            tick_us: 1000,
        },
        CtlOp::Check => Request::Check,
        CtlOp::MemoryCrc => Request::MemoryCrc,
        CtlOp::Stats => Request::Stats,
        CtlOp::Registers => Request::Registers,
    };
    let answer = Control::connect(path, None)?.ask(&req, |p| {
        eprintln!(
            "round {:>3}  dirty {:>8} pages  {:>8.1} MiB/s  est. downtime {:>7.1} ms  throttle {}%",
            p.round, p.dirty_pages, p.bandwidth_mib_s, p.estimated_downtime_ms, p.throttle_pct
        );
    })?;
    let text = match &answer {
        Reply::Done => "done".to_string(),
        Reply::Status(s) => serde_json::to_string_pretty(s)?,
        Reply::Summary(s) => serde_json::to_string_pretty(s)?,
        Reply::Check(c) => serde_json::to_string_pretty(c)?,
        Reply::MemoryCrc(c) => format!("{c:#010x}"),
        Reply::Stats(s) => serde_json::to_string_pretty(s)?,
        Reply::Registers(r) => serde_json::to_string_pretty(r)?,
    };
    println!("{text}");
    Ok(())
}
