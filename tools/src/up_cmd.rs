//! `csvctl up` and `csvctl down`: a whole cluster on this machine, the
//! embedded default. N `csvd` hosts on loopback, a LUN file as Volume1,
//! mounted on every host under `DIR/nodeK/ClusterStorage/Volume1`.

use anyhow::{bail, Context, Result};
use clap::Args;
use coordinator::client::{self, Client};
use coordinator::wire::{Identity, Key};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const CLUSTER: &str = "csv-up";

/// `csvctl up`
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of hosts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Where hosts keep their state, logs and mounts (reused if present).
    #[arg(long, default_value = "/tmp/csv-up")]
    dir: PathBuf,
    /// Size of the LUN file made for Volume1 (sparse).
    #[arg(long, default_value = "4G", value_parser = vhd::size::parse_positive)]
    lun_size: u64,
    /// First host's port (host K listens on base + K - 1, on 127.0.0.1).
    #[arg(long, default_value_t = 7101)]
    base_port: u16,
    /// Leave the hosts running and return (stop them with `csvctl down`).
    #[arg(long)]
    detach: bool,
    /// Port of host 1's web console and metrics (host K: this + K - 1, on
    /// 127.0.0.1); 0 for none.
    #[arg(long, default_value_t = 9101)]
    console_port: u16,
    /// Also start a real Linux VM, "linux1", in the qemu engine on host 1:
    /// the test guest's Debian kernel and initramfs from DIR
    /// (tools/setup.sh --qemu-system builds them into target/qemu-guest)
    /// boot from a dynamic VHD on Volume1 that csv serves to QEMU; the
    /// guest makes ext4 on it and writes checksummed records. Its console:
    /// <dir>/node1/data/vms/linux1.serial.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "target/qemu-guest")]
    linux_vm: Option<PathBuf>,
}

/// `csvctl up --linux-vm`: the guest's files and a VHD on Volume1 (through
/// host 1's mount), the role added and started on host 1.
fn linux_vm(dir: &Path, guest: &Path, env: &[(&str, String); 3]) -> Result<()> {
    let vol = node_dir(dir, 1).join("ClusterStorage/Volume1");
    let images = vol.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("make {}", images.display()))?;
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        let from = guest.join(f);
        if !from.exists() {
            bail!(
                "no {} (tools/setup.sh --qemu-system builds the guest into target/qemu-guest; or give --linux-vm DIR)",
                from.display()
            );
        }
        std::fs::copy(&from, images.join(f))
            .with_context(|| format!("copy {} to Volume1", from.display()))?;
    }
    let disk = vol.join("linux1.vhd");
    if !disk.exists() {
        vhd::Vhd::create(
            &disk,
            &vhd::CreateOptions::new(vhd::DiskType::Dynamic, 1 << 30),
        )
        .with_context(|| format!("create {}", disk.display()))?;
    }
    let me = std::env::current_exe().context("find csvctl")?;
    let run = |args: &[&str]| -> Result<()> {
        let o = std::process::Command::new(&me)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .context("run csvctl")?;
        if !o.status.success() {
            bail!(
                "csvctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(())
    };
    let v = "/ClusterStorage/Volume1";
    let exists = std::process::Command::new(&me)
        .args(["vm", "status", "linux1"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        run(&[
            "vm",
            "add",
            "linux1",
            "--memory",
            "512M",
            "--disk",
            &format!("{v}/linux1.vhd"),
            "--kernel",
            &format!("{v}/images/vmlinuz"),
            "--initrd",
            &format!("{v}/images/initramfs.cpio.gz"),
            "--cmdline",
            "console=ttyS0",
        ])?;
    }
    // Started by an earlier `csvctl up` on this state: it runs on.
    match run(&["vm", "start", "linux1", "--on", "1"]) {
        Err(e) if exists && e.to_string().contains("already") => {}
        r => r?,
    }
    println!(
        "VM linux1 (qemu engine, Debian kernel) starting on host 1 from {v}/linux1.vhd; console: {}",
        node_dir(dir, 1).join("data/vms/linux1.serial").display()
    );
    Ok(())
}

/// `csvctl down`
#[derive(Debug, Args)]
pub struct DownArgs {
    /// The directory `csvctl up` used.
    #[arg(long, default_value = "/tmp/csv-up")]
    dir: PathBuf,
}

fn csvd_path() -> PathBuf {
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("csvd")));
    match here {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("csvd"),
    }
}

fn node_dir(dir: &Path, k: u64) -> PathBuf {
    dir.join(format!("node{k}"))
}

fn addr(base: u16, k: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], base + k as u16 - 1))
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn read_pid(dir: &Path, k: u64) -> Option<i32> {
    std::fs::read_to_string(node_dir(dir, k).join("csvd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Stops the hosts whose pid files are in `dir`: SIGTERM (they unmount),
/// SIGKILL after 10 s. `children` are those this process started (reaped
/// here; the others were reparented and are reaped by init).
fn stop_all(dir: &Path, children: &mut [std::process::Child]) -> usize {
    let mut alive = |pid: i32| match children.iter_mut().find(|c| c.id() as i32 == pid) {
        Some(c) => matches!(c.try_wait(), Ok(None)),
        None => pid_alive(pid),
    };
    let mut pids = Vec::new();
    for k in 1..=9 {
        if let Some(p) = read_pid(dir, k) {
            if alive(p) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGTERM,
                );
                pids.push((k, p));
            }
            let _ = std::fs::remove_file(node_dir(dir, k).join("csvd.pid"));
        }
    }
    let t = Instant::now();
    while pids.iter().any(|&(_, p)| alive(p)) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &(k, p) in &pids {
        if alive(p) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
            let mp = node_dir(dir, k).join("ClusterStorage");
            for e in std::fs::read_dir(&mp).into_iter().flatten().flatten() {
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(e.path())
                    .status();
            }
        }
    }
    pids.len()
}

/// Runs `csvctl up`.
pub fn up(a: UpArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("create {}", a.dir.display()))?;
    let dir = std::fs::canonicalize(&a.dir)?;
    for k in 1..=a.nodes {
        if read_pid(&dir, k).is_some_and(pid_alive) {
            bail!(
                "hosts from an earlier `csvctl up` still run in {} (stop them with `csvctl down --dir {}`)",
                dir.display(),
                dir.display()
            );
        }
    }
    let key_file = dir.join("cluster.key");
    let key = if key_file.exists() {
        Key::load(&key_file).map_err(anyhow::Error::msg)?
    } else {
        let k = Key::generate()?;
        std::fs::write(&key_file, format!("{}\n", k.to_hex()))?;
        k
    };
    let csvd = csvd_path();
    let peers: Vec<String> = (1..=a.nodes)
        .map(|k| format!("--peer={k}={}", addr(a.base_port, k)))
        .collect();
    // Block SIGINT/SIGTERM here before starting the hosts; in the
    // foreground they are waited for below.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.thread_block()?;
    println!("starting {} hosts in {}", a.nodes, dir.display());
    let mut children = Vec::new();
    for k in 1..=a.nodes {
        let nd = node_dir(&dir, k);
        std::fs::create_dir_all(nd.join("ClusterStorage"))?;
        let out = nd.join("csvd.out");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(nd.join("csvd.log"))?;
        let mut cmd = Command::new(&csvd);
        cmd.arg(format!("--id={k}"))
            .arg("--data-dir")
            .arg(nd.join("data"))
            .arg(format!("--listen={}", addr(a.base_port, k)))
            .args(&peers)
            .arg(format!("--cluster={CLUSTER}"))
            .arg("--key-file")
            .arg(&key_file)
            .arg("--init")
            .arg("--mount-root")
            .arg(nd.join("ClusterStorage"))
            .args(
                (a.console_port != 0)
                    .then(|| format!("--console=127.0.0.1:{}", a.console_port + k as u16 - 1)),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(log);
        // The hosts take signals themselves (SIGTERM: unmount, exit); they
        // get their own process group so a terminal's Ctrl-C reaches only
        // this command, which stops them in order.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", csvd.display()))?;
        std::fs::write(nd.join("csvd.pid"), child.id().to_string())?;
        children.push(child);
        let t = Instant::now();
        while !std::fs::read_to_string(&out).is_ok_and(|s| s.contains("serving")) {
            let exited = children
                .last_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || t.elapsed() > Duration::from_secs(15) {
                stop_all(&dir, &mut children);
                let log = std::fs::read_to_string(nd.join("csvd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                bail!(
                    "host {k} did not start ({}):\n{}",
                    nd.join("csvd.log").display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
            "  host {k}: csvd on {} (log {})",
            addr(a.base_port, k),
            nd.join("csvd.log").display()
        );
    }
    let me = Identity {
        node: 0,
        cluster: CLUSTER.into(),
        key,
    };
    let endpoints: Vec<SocketAddr> = (1..=a.nodes).map(|k| addr(a.base_port, k)).collect();
    let mut c = Client::new(me.clone(), endpoints.clone());
    let info = c
        .cluster_info()
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
    if !info.volumes.iter().any(|v| v.number == 1) {
        let lun = dir.join("lun1.img");
        let (lun, sb) = crate::cluster_cmd::format_lun(&lun, 1, Some(a.lun_size), true)?;
        c.add_volume(coordinator::proto::VolumeInfo {
            number: 1,
            lun: lun.display().to_string(),
            data_start: sb.data_start,
            capacity: sb.capacity,
            voters: vec![],
            now: 0,
        })
        .map_err(|e| anyhow::anyhow!(client::describe(&e)))?;
        println!(
            "Volume1: {} on LUN file {}",
            vhd::size::human(sb.capacity),
            lun.display()
        );
    }
    let t = Instant::now();
    loop {
        let mounted = endpoints.iter().all(|e| {
            client::node_status(&me, *e, Duration::from_secs(1)).is_ok_and(|s| {
                s.volumes
                    .iter()
                    .any(|v| v.number == 1 && v.state() == coordinator::proto::IoMode::Direct)
            })
        });
        if mounted {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            stop_all(&dir, &mut children);
            bail!("Volume1 was not mounted on every host within 30 s; see the hosts' logs");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let eps: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
    if let Some(guest) = &a.linux_vm {
        let env = [
            ("CSV_ENDPOINTS", eps.join(",")),
            ("CSV_KEY_FILE", key_file.display().to_string()),
            ("CSV_CLUSTER", CLUSTER.to_string()),
        ];
        if let Err(e) = linux_vm(&dir, guest, &env) {
            stop_all(&dir, &mut children);
            return Err(e);
        }
    }
    println!();
    println!("Use it:");
    for k in 1..=a.nodes {
        println!(
            "  host {k}: {}",
            node_dir(&dir, k).join("ClusterStorage/Volume1").display()
        );
    }
    println!(
        "  export CSV_ENDPOINTS={} CSV_KEY_FILE={} CSV_CLUSTER={CLUSTER}",
        eps.join(","),
        key_file.display()
    );
    println!("  csvctl cluster status; csvctl volume status; csvctl validate; csvctl volume move 1 --to 2");
    if a.console_port != 0 {
        println!(
            "  web console: http://127.0.0.1:{}/ (metrics: /metrics)",
            a.console_port
        );
    }
    println!(
        "ready: {} hosts, Volume1 mounted at {}",
        a.nodes,
        (1..=a.nodes)
            .map(|k| node_dir(&dir, k)
                .join("ClusterStorage/Volume1")
                .display()
                .to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    if a.detach {
        println!(
            "(left running; `csvctl down --dir {}` stops them)",
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("(Ctrl-C stops them)");
    let _ = sigs.wait();
    println!("stopping...");
    let n = stop_all(&dir, &mut children);
    println!("stopped {n} hosts; their state stays in {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Runs `csvctl down`.
pub fn down(a: DownArgs) -> Result<ExitCode> {
    let n = stop_all(&a.dir, &mut []);
    if n == 0 {
        println!("no hosts running from {}", a.dir.display());
    } else {
        println!("stopped {n} hosts");
    }
    Ok(ExitCode::SUCCESS)
}
