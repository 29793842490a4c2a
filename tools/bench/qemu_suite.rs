//! `qemu` suite: real guests in QEMU with csv's disk backend.
//!
//! - fio inside the Linux test guest (tools/guest/build-qemu-guest.sh, its
//!   fio initramfs) on /dev/vda, O_DIRECT with libaio: 4 KiB random reads
//!   and writes at QD32, 1 MiB sequential at QD8, 8 s each after a 256 MiB
//!   fill. The disk is a 512 MiB dynamic VHD on a csvd volume served by
//!   csvd to a VM role of the `qemu` engine (vhost-user-blk, the volume's
//!   own I/O path), against (a) QEMU's own
//!   `vpc` driver on a fresh copy of the same VHD on the same mount and
//!   (b) QEMU on a raw file on the local disk that holds the LUN file,
//!   `cache=none,aio=native`. Each side starts from a fresh disk.
//! - Boot time: QEMU start to the guest's first marker, both disks.
//! - Live migration of an idle 512 MiB guest between two hosts: the
//!   `qemu` engine through csvd with the write lease handed over at
//!   `pre-switchover`, against the same QEMU migration of a guest on a raw
//!   local file with no hand-over (two QEMUs driven over QMP here, with
//!   the engine's TLS-PSK stream and pause, continued at once).
//!   Downtime and total time as QEMU reports them, and how long the
//!   paused guest waited at `pre-switchover` for the hand-over (from
//!   QEMU's event to `migrate-continue`); medians.
//!
//! The accelerator is QEMU's choice for this host (TCG where there is no
//! hardware virtualization): the rows compare disk paths and hand-overs
//! under the same CPU emulation, not absolute guest speed.

use crate::table::{self, Row};
use anyhow::{bail, Context, Result};
use csv_test_support::csvd::CsvCluster;
use hypervisor_shim::qemu::qmp::{
    Command as Qmp, MigrateParameters, MigrationInfo, MigrationStatus,
};
use hypervisor_shim::supervisor::qemu::Accel;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `qemu` suite options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// fio rounds per side, the sides alternated in each round (this
    /// machine's disk swings between runs; medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Live migrations per side (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub migrations: usize,
    /// Where the guest is (vmlinuz, initramfs.cpio.gz, initramfs-fio.cpio.gz).
    #[arg(long, default_value = "target/qemu-guest")]
    pub guest: PathBuf,
}

/// fio's figures for the four jobs: randread IOPS, randwrite IOPS, read
/// MiB/s, write MiB/s.
#[derive(Debug, Default, Clone, Copy)]
struct Fio {
    rand_read: f64,
    rand_write: f64,
    seq_read: f64,
    seq_write: f64,
}

/// One terse (v3) fio line: read IOPS is field 8, read KiB/s field 7,
/// write IOPS field 49, write KiB/s field 48 (1-based).
fn parse_fio(lines: &[String]) -> Result<Fio> {
    let mut f = Fio::default();
    for l in lines {
        let x: Vec<&str> = l.split(';').collect();
        if x.len() < 50 {
            continue;
        }
        let num = |i: usize| x[i - 1].parse::<f64>().unwrap_or(0.0);
        match x[2] {
            "randread-4k" => f.rand_read = num(8),
            "randwrite-4k" => f.rand_write = num(49),
            "read-1M" => f.seq_read = num(7) / 1024.0,
            "write-1M" => f.seq_write = num(48) / 1024.0,
            _ => {}
        }
    }
    if f.rand_read == 0.0 || f.rand_write == 0.0 || f.seq_read == 0.0 || f.seq_write == 0.0 {
        bail!("fio results incomplete: {lines:?}");
    }
    Ok(f)
}

/// The guest's terse fio lines on its console ("fio 3;..."), wherever
/// they start on a console line.
fn fio_lines(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.find("fio 3;").map(|at| l[at + 4..].trim().to_string()))
        .collect()
}

/// QEMU's common arguments for the guest with `mem` bytes.
fn base(guest: &Path, initrd: &str, mode: &str, mem: u64, accel: &Accel) -> Vec<String> {
    vec![
        "-accel".into(),
        accel.name.into(),
        "-m".into(),
        format!("{}M", mem >> 20),
        "-object".into(),
        format!("memory-backend-memfd,id=ram,size={mem},share=on"),
        "-machine".into(),
        "pc,memory-backend=ram".into(),
        "-cpu".into(),
        if accel.name == "kvm" { "host" } else { "max" }.into(),
        "-display".into(),
        "none".into(),
        "-nodefaults".into(),
        "-kernel".into(),
        guest.join("vmlinuz").display().to_string(),
        "-initrd".into(),
        guest.join(initrd).display().to_string(),
        "-append".into(),
        format!("console=ttyS0 quiet csv.mode={mode}"),
    ]
}

/// QEMU's arguments for `file` opened by QEMU itself as `format`.
fn disk_args(file: &Path, format: &str) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "file={},format={format},if=none,id=d,cache=none,aio=native",
            file.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=d".into(),
    ]
}

/// Runs the fio guest on `disk` to its end: (boot time to its first
/// marker, fio's figures).
fn fio_run(
    dir: &Path,
    guest: &Path,
    disk: (&Path, &str),
    accel: &Accel,
) -> Result<(Duration, Fio)> {
    let serial = dir.join("fio.serial");
    let _ = std::fs::remove_file(&serial);
    let mut args = base(guest, "initramfs-fio.cpio.gz", "fio", 512 << 20, accel);
    args.extend(disk_args(disk.0, disk.1));
    args.extend(["-serial".into(), format!("file:{}", serial.display())]);
    let t0 = Instant::now();
    let mut q = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start qemu-system-x86_64")?;
    let mut booted = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if booted.is_none() && text.contains("CSV-GUEST-UP") {
            booted = Some(t0.elapsed());
        }
        if text.contains("CSV-GUEST-FIO-DONE") || q.try_wait()?.is_some() {
            let _ = q.wait();
            let lines = fio_lines(&text);
            return Ok((booted.unwrap_or_default(), parse_fio(&lines)?));
        }
        if Instant::now() > deadline {
            let _ = q.kill();
            bail!("the fio guest did not finish in 10 min");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A fresh dynamic VHD at `path`.
fn fresh_vhd(path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    vhd::Vhd::create(
        path,
        &vhd::CreateOptions::new(vhd::DiskType::Dynamic, 512 << 20),
    )?;
    Ok(())
}

/// Copies the guest's `files` to `images/` on the volume mounted at `mnt`.
fn guest_on_volume(mnt: &Path, guest: &Path, files: &[&str]) -> Result<()> {
    std::fs::create_dir_all(mnt.join("images"))?;
    for f in files {
        std::fs::copy(guest.join(f), mnt.join("images").join(f))?;
    }
    Ok(())
}

/// Runs `csvctl` on the cluster; its standard output.
fn csvctl(cl: &CsvCluster, args: &[&str]) -> Result<String> {
    let o = cl.csvctl().args(args).output()?;
    if !o.status.success() {
        bail!("csvctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs the fio guest as a VM role through csvd's `qemu` engine on host
/// 1 (its disk served by csvd through the volume's own I/O path): (boot
/// time from QEMU's start to the guest's first marker, fio's figures).
fn csv_fio(cl: &CsvCluster, v: u64, guest: &Path) -> Result<(Duration, Fio)> {
    let mnt = cl.mountpoint(1, v);
    guest_on_volume(&mnt, guest, &["vmlinuz", "initramfs-fio.cpio.gz"])?;
    fresh_vhd(&mnt.join("bench.vhd"))?;
    let vol = format!("/ClusterStorage/Volume{v}");
    csvctl(
        cl,
        &[
            "vm",
            "add",
            "fio",
            "--engine",
            "qemu",
            "--memory",
            "512M",
            "--disk",
            &format!("{vol}/bench.vhd"),
            "--kernel",
            &format!("{vol}/images/vmlinuz"),
            "--initrd",
            &format!("{vol}/images/initramfs-fio.cpio.gz"),
            "--cmdline",
            "console=ttyS0 quiet csv.mode=fio",
        ],
    )?;
    // QEMU makes the serial file as it starts: boot time runs from there.
    let serial = cl.host_dir(1).join("vms/fio.serial");
    let _ = std::fs::remove_file(&serial);
    csvctl(cl, &["vm", "start", "fio", "--on", "1"])?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut started = None;
    let mut booted = None;
    let result = loop {
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("the fio guest did not finish in 10 min"));
        }
        if started.is_none() && serial.exists() {
            started = Some(Instant::now());
        }
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if booted.is_none() && text.contains("CSV-GUEST-UP") {
            booted = started.map(|t| t.elapsed());
        }
        if text.contains("CSV-GUEST-FIO-DONE") {
            let lines = fio_lines(&text);
            break parse_fio(&lines).map(|f| (booted.unwrap_or_default(), f));
        }
        std::thread::sleep(Duration::from_millis(if booted.is_some() {
            200
        } else {
            10
        }));
    };
    csvctl(cl, &["vm", "stop", "fio"])?;
    csvctl(cl, &["vm", "remove", "fio"])?;
    result
}

/// Migrations through csvd's `qemu` engine (lease handed over): the
/// (downtime, total, held at switch-over) ms of each.
fn csv_migrations(cl: &CsvCluster, v: u64, guest: &Path, n: usize) -> Result<Vec<(f64, f64, f64)>> {
    let mnt = cl.mountpoint(1, v);
    guest_on_volume(&mnt, guest, &["vmlinuz", "initramfs.cpio.gz"])?;
    fresh_vhd(&mnt.join("mig.vhd"))?;
    let vol = format!("/ClusterStorage/Volume{v}");
    let ok = |args: &[&str]| csvctl(cl, args);
    ok(&[
        "vm",
        "add",
        "mig",
        "--memory",
        "512M",
        "--disk",
        &format!("{vol}/mig.vhd"),
        "--kernel",
        &format!("{vol}/images/vmlinuz"),
        "--initrd",
        &format!("{vol}/images/initramfs.cpio.gz"),
        "--cmdline",
        "console=ttyS0 quiet csv.mode=idle",
    ])?;
    ok(&["vm", "start", "mig", "--on", "1"])?;
    std::thread::sleep(Duration::from_secs(15));
    let mut out = Vec::new();
    let mut host = 1;
    for _ in 0..n {
        let to = 3 - host;
        let text = ok(&[
            "vm",
            "migrate",
            "mig",
            "--to",
            &to.to_string(),
            "--timeout-s",
            "120",
        ])?;
        // "... downtime 45.0 ms, total 1667 ms, ..."
        let num = |key: &str| -> Option<f64> {
            let at = text.find(key)? + key.len();
            text[at..].split_whitespace().next()?.parse().ok()
        };
        match (num("downtime "), num("total "), num("of which ")) {
            (Some(d), Some(t), Some(h)) => out.push((d, t, h)),
            _ => bail!("no figures in {text:?}"),
        }
        eprintln!("csv: {}", text.trim());
        host = to;
        std::thread::sleep(Duration::from_secs(3));
    }
    ok(&["vm", "stop", "mig"])?;
    Ok(out)
}

/// The same QEMU migration without csv's hand-over: a guest on a raw local
/// file, two QEMUs driven over QMP here, with what the `qemu` engine's
/// migration has besides the hand-over (a TLS-PSK stream, the guest
/// paused at `pre-switchover`) but `migrate-continue` sent as soon as the
/// pause is seen: (downtime, total, held at pre-switchover) ms of each.
fn plain_migrations(
    dir: &Path,
    guest: &Path,
    accel: &Accel,
    n: usize,
) -> Result<Vec<(f64, f64, f64)>> {
    let raw = dir.join("plain.raw");
    let f = std::fs::File::create(&raw)?;
    f.set_len(512 << 20)?;
    // The key, where tls-creds-psk reads it.
    let tls = dir.join("plain-tls");
    std::fs::create_dir_all(&tls)?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut k = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tls.join("keys.psk"))?;
        std::io::Write::write_all(&mut k, format!("csv:{}\n", "5a".repeat(32)).as_bytes())?;
    }
    let start = |name: &str, incoming: bool| -> Result<(Child, PathBuf)> {
        let qmp = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp);
        let mut args = base(guest, "initramfs.cpio.gz", "idle", 512 << 20, accel);
        args.extend(disk_args(&raw, "raw"));
        args.extend([
            "-serial".into(),
            "null".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-object".into(),
            format!(
                "tls-creds-psk,id=tls-in,endpoint=server,dir={}",
                tls.display()
            ),
            "-object".into(),
            format!(
                "tls-creds-psk,id=tls-out,endpoint=client,dir={},username=csv",
                tls.display()
            ),
        ]);
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        let c = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok((c, qmp))
    };
    let connect = |p: &Path| {
        hypervisor_shim::qemu::qmp::Qmp::connect(p, Duration::from_secs(10)).context("QMP connect")
    };
    let (mut src, mut src_qmp) = start("plain-a", false)?;
    std::thread::sleep(Duration::from_secs(15));
    let mut out = Vec::new();
    for i in 0..n {
        let (dst, dst_qmp) = start(&format!("plain-{i}"), true)?;
        let mut d = connect(&dst_qmp)?;
        d.run(&Qmp::MigrateSetParameters(MigrateParameters {
            tls_creds: Some("tls-in".into()),
            ..Default::default()
        }))?;
        d.run(&Qmp::MigrateIncoming {
            uri: "tcp:127.0.0.1:0".into(),
        })?;
        let info: MigrationInfo = d.execute(&Qmp::QueryMigrate)?;
        let port = match info.socket_address.unwrap_or_default().first() {
            Some(hypervisor_shim::qemu::qmp::SocketAddress::Inet { port, .. }) => port.clone(),
            _ => bail!("the target does not say where it listens"),
        };
        let mut s = connect(&src_qmp)?;
        s.migrate_paused("tls-out", format!("tcp:127.0.0.1:{port}"))?;
        // Polled as the engine polls (every 2 ms), continued at once.
        let info = s.wait_migration(Duration::from_millis(2), Duration::from_secs(120), |i| {
            matches!(
                i.status,
                Some(
                    MigrationStatus::PreSwitchover
                        | MigrationStatus::Completed
                        | MigrationStatus::Failed
                )
            )
        })?;
        if info.status != Some(MigrationStatus::PreSwitchover) {
            bail!(
                "plain migration ended before its switch-over: {:?}",
                info.error_desc
            );
        }
        let paused_at = s.paused_at().unwrap_or_else(std::time::SystemTime::now);
        s.run(&Qmp::MigrateContinue {
            state: MigrationStatus::PreSwitchover,
        })?;
        let held = paused_at.elapsed().unwrap_or_default().as_secs_f64() * 1e3;
        let info = s.wait_migration(Duration::from_millis(2), Duration::from_secs(120), |i| {
            matches!(
                i.status,
                Some(MigrationStatus::Completed | MigrationStatus::Failed)
            )
        })?;
        if info.status != Some(MigrationStatus::Completed) {
            bail!("plain migration failed: {:?}", info.error_desc);
        }
        let d_ms = info.downtime.unwrap_or(0) as f64;
        let t_ms = info.total_time.unwrap_or(0) as f64;
        eprintln!("plain: downtime {d_ms} ms, total {t_ms} ms, held {held:.1} ms");
        out.push((d_ms, t_ms, held));
        let _ = s.run(&Qmp::Quit);
        let _ = src.wait();
        // The next round sends from the target.
        drop(d);
        src = dst;
        src_qmp = dst_qmp;
        std::thread::sleep(Duration::from_secs(3));
    }
    let _ = src.kill();
    let _ = src.wait();
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Each figure's median over rounds, and the boot time's.
fn median_fio(runs: &[(Duration, Fio)]) -> (Duration, Fio) {
    let col = |f: fn(&Fio) -> f64| median(runs.iter().map(|(_, x)| f(x)).collect());
    let boot = median(runs.iter().map(|(b, _)| b.as_secs_f64()).collect());
    (
        Duration::from_secs_f64(boot),
        Fio {
            rand_read: col(|f| f.rand_read),
            rand_write: col(|f| f.rand_write),
            seq_read: col(|f| f.seq_read),
            seq_write: col(|f| f.seq_write),
        },
    )
}

/// Runs the suite.
pub fn run(args: Args) -> Result<()> {
    let guest = std::fs::canonicalize(&args.guest).with_context(|| {
        format!(
            "no guest at {} (tools/setup.sh --qemu-system)",
            args.guest.display()
        )
    })?;
    if !guest.join("initramfs-fio.cpio.gz").exists() {
        bail!(
            "no fio initramfs in {} (tools/setup.sh --qemu-system with fio installed)",
            guest.display()
        );
    }
    let accel = Accel::detect();
    eprintln!("accelerator: {} ({})", accel.name, accel.reason);
    let (cl, v) = CsvCluster::mounted_loopback(2, 2 << 30)?;
    let mnt = cl.mountpoint(1, v);
    let dir = cl.dir().to_path_buf();

    // fio: ours, QEMU's vpc on the same mount, QEMU raw on the local disk,
    // alternated round by round so that the disk's swings fall on all
    // three alike.
    let vhd_path = mnt.join("bench.vhd");
    let raw = dir.join("local.raw");
    let (mut ours_r, mut vpc_r, mut local_r) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds.max(1) {
        let (boot, f) = csv_fio(&cl, v, &guest)?;
        eprintln!("round {round}: ours: {f:?}, boot {boot:?}");
        ours_r.push((boot, f));
        fresh_vhd(&vhd_path)?;
        let (boot, f) = fio_run(&dir, &guest, (&vhd_path, "vpc"), &accel)?;
        eprintln!("round {round}: vpc: {f:?}, boot {boot:?}");
        vpc_r.push((boot, f));
        let file = std::fs::File::create(&raw)?;
        file.set_len(512 << 20)?;
        drop(file);
        let (boot, f) = fio_run(&dir, &guest, (&raw, "raw"), &accel)?;
        eprintln!("round {round}: local raw: {f:?}");
        local_r.push((boot, f));
        let _ = std::fs::remove_file(&raw);
    }
    let (boot_ours, ours) = median_fio(&ours_r);
    let (boot_vpc, vpc) = median_fio(&vpc_r);
    let (_, local) = median_fio(&local_r);
    let rounds = ours_r.len();

    let rows = |peer: &Fio| {
        vec![
            Row {
                name: "4 KiB random read, QD32".into(),
                ours: ours.rand_read,
                peer: Some(peer.rand_read),
                unit: "IOPS",
                higher_is_better: true,
            },
            Row {
                name: "4 KiB random write, QD32".into(),
                ours: ours.rand_write,
                peer: Some(peer.rand_write),
                unit: "IOPS",
                higher_is_better: true,
            },
            Row {
                name: "1 MiB sequential read, QD8".into(),
                ours: ours.seq_read,
                peer: Some(peer.seq_read),
                unit: "MiB/s",
                higher_is_better: true,
            },
            Row {
                name: "1 MiB sequential write, QD8".into(),
                ours: ours.seq_write,
                peer: Some(peer.seq_write),
                unit: "MiB/s",
                higher_is_better: true,
            },
        ]
    };
    let mut vpc_rows = rows(&vpc);
    vpc_rows.push(Row {
        name: "boot to the guest's first marker".into(),
        ours: boot_ours.as_secs_f64() * 1000.0,
        peer: Some(boot_vpc.as_secs_f64() * 1000.0),
        unit: "ms",
        higher_is_better: false,
    });
    table::print(
        &format!("fio in the guest ({}; medians of {rounds} alternated rounds): csv's vhost-user-blk backend vs QEMU's vpc driver, same VHD on the same mount", accel.name),
        "QEMU vpc",
        &vpc_rows,
    );
    println!();
    table::print(
        &format!("fio in the guest ({}; medians of {rounds} alternated rounds): csv's backend (VHD on the mount) vs QEMU on a raw file on the local disk, cache=none,aio=native", accel.name),
        "QEMU raw local",
        &rows(&local),
    );
    println!();

    // Live migration: with the lease hand-over, and plain.
    let ours_m = csv_migrations(&cl, v, &guest, args.migrations)?;
    let plain_m = plain_migrations(&dir, &guest, &accel, args.migrations)?;
    let ours_col = |f: fn(&(f64, f64, f64)) -> f64| median(ours_m.iter().map(f).collect());
    let plain_col = |f: fn(&(f64, f64, f64)) -> f64| median(plain_m.iter().map(f).collect());
    table::print(
        &format!(
            "live migration of an idle 512 MiB guest ({}; medians of {}): qemu engine with the write-lease hand-over vs the same QEMU migration on a raw local file without one",
            accel.name, args.migrations
        ),
        "plain QEMU",
        &[
            Row { name: "downtime".into(), ours: ours_col(|x| x.0), peer: Some(plain_col(|x| x.0)), unit: "ms", higher_is_better: false },
            Row { name: "total time".into(), ours: ours_col(|x| x.1), peer: Some(plain_col(|x| x.1)), unit: "ms", higher_is_better: false },
            Row { name: "guest held at pre-switchover (ours: the hand-over; plain: continued at once)".into(), ours: ours_col(|x| x.2), peer: Some(plain_col(|x| x.2)), unit: "ms", higher_is_better: false },
        ],
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terse_fio_lines_read() {
        let mut read = vec!["0"; 130];
        read[0] = "3";
        read[2] = "randread-4k";
        read[7] = "3351";
        let mut write = read.clone();
        write[2] = "randwrite-4k";
        write[48] = "1200";
        let mut sr = read.clone();
        sr[2] = "read-1M";
        sr[6] = "1048576";
        let mut sw = read.clone();
        sw[2] = "write-1M";
        sw[47] = "524288";
        let lines: Vec<String> = [read, write, sr, sw].iter().map(|x| x.join(";")).collect();
        let f = parse_fio(&lines).unwrap();
        assert_eq!(
            (f.rand_read, f.rand_write, f.seq_read, f.seq_write),
            (3351.0, 1200.0, 1024.0, 512.0)
        );
        assert!(parse_fio(&lines[..2]).is_err());
    }

    #[test]
    fn fio_lines_are_found_behind_other_console_output() {
        let console = "CSV-GUEST-FIO\r\nfio 3;fio-3.33;randread-4k;0\r\n/ # \x1b[6nfio 3;fio-3.33;write-1M;0\nhb 3\n";
        assert_eq!(
            fio_lines(console),
            ["3;fio-3.33;randread-4k;0", "3;fio-3.33;write-1M;0"]
        );
    }
}
