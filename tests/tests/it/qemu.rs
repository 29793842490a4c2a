//! Real guests in the `qemu` engine on a three-host cluster: a Debian
//! kernel and initramfs (tools/guest/build-qemu-guest.sh) boot from a
//! dynamic VHD on Volume1 that csv serves to QEMU (vhost-user-blk), make
//! ext4 on it and write checksummed records with fdatasync while the VM
//! live-migrates between hosts. The guest's heartbeat (its ttyS1, sent by
//! QEMU as UDP datagrams) is observed here, on one clock.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::vm_roles::{csvctl_json, csvctl_ok};
use csv_test_support::csvd::CsvCluster;
use serde_json::Value;

/// Where tools/setup.sh --qemu-system builds the guest (vmlinuz,
/// initramfs.cpio.gz).
fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CSV_QEMU_GUEST") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/qemu-guest")
}

/// Skips unless this machine can run the guest: root, FUSE, QEMU and the
/// built guest image.
macro_rules! skip_without_qemu_guest {
    () => {
        csv_test_support::skip_unless!(
            csv_test_support::Need::Root,
            csv_test_support::Need::Command("fusermount3"),
            csv_test_support::Need::Device("/dev/fuse"),
            csv_test_support::Need::Command("qemu-system-x86_64")
        );
        if !guest_dir().join("vmlinuz").exists() {
            csv_test_support::skip::report(&format!(
                "no guest image in {} (tools/setup.sh --qemu-system builds it)",
                guest_dir().display()
            ));
            return;
        }
    };
}

/// Whether a host reports the VM failed (the test stops waiting).
fn failed(cl: &CsvCluster, name: &str) -> bool {
    let s = csvctl_json(cl, &["vm", "status", name, "--json"]);
    s["runtime"]
        .as_array()
        .is_some_and(|r| r.iter().any(|x| x["state"] == "failed"))
}

/// What the guest says on its heartbeat port, line by line, with the
/// arrival time of each line's end.
#[derive(Default)]
struct Heard {
    lines: Vec<(Instant, String)>,
    partial: String,
}

/// Listens for the guest's heartbeat datagrams on 127.0.0.1.
fn observer() -> (u16, Arc<Mutex<Heard>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let heard = Arc::new(Mutex::new(Heard::default()));
    let h = heard.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok(n) = sock.recv(&mut buf) {
            let now = Instant::now();
            let mut g = h.lock().unwrap();
            for &b in &buf[..n] {
                match b {
                    b'\n' => {
                        let line = std::mem::take(&mut g.partial);
                        g.lines.push((now, line.trim().to_string()));
                    }
                    b'\r' => {}
                    _ => g.partial.push(b as char),
                }
            }
        }
    });
    (port, heard)
}

/// The highest N of "verify ok N" heard after `since`.
fn verified_after(heard: &Mutex<Heard>, since: Instant) -> Option<u64> {
    let g = heard.lock().unwrap();
    g.lines
        .iter()
        .filter(|(t, _)| *t >= since)
        .filter_map(|(_, l)| l.strip_prefix("verify ok "))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .max()
}

fn bad_lines(heard: &Mutex<Heard>) -> Vec<String> {
    let g = heard.lock().unwrap();
    g.lines
        .iter()
        .filter(|(_, l)| l.contains("BAD") || l.starts_with("writer:"))
        .map(|(_, l)| l.clone())
        .collect()
}

/// The longest gap between two heartbeat lines in [from, to].
fn longest_gap(heard: &Mutex<Heard>, from: Instant, to: Instant) -> Duration {
    let g = heard.lock().unwrap();
    let times: Vec<Instant> = g
        .lines
        .iter()
        .filter(|(t, l)| *t >= from && *t <= to && l.starts_with("hb "))
        .map(|(t, _)| *t)
        .collect();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

fn serial_tail(cl: &CsvCluster, host: u64) -> String {
    let dir = cl.host_dir(host);
    let mut out = String::new();
    for f in walk(&dir) {
        if f.extension().is_some_and(|e| e == "serial" || e == "log")
            && f.parent().is_some_and(|p| p.ends_with("vms"))
        {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!(
                "--- {}\n{}\n",
                f.display(),
                lines[lines.len().saturating_sub(12)..].join("\n")
            );
        }
    }
    out
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.ends_with("mnt") {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `csvctl vm add NAME` for the test guest booted from Volume `v`'s
/// images/ with its disk `NAME.vhd` there, and `extra` arguments.
fn add_linux(cl: &CsvCluster, v: u64, name: &str, memory: &str, cmdline: &str, extra: &[&str]) {
    let vol = format!("/ClusterStorage/Volume{v}");
    let (disk, kernel, initrd) = (
        format!("{vol}/{name}.vhd"),
        format!("{vol}/images/vmlinuz"),
        format!("{vol}/images/initramfs.cpio.gz"),
    );
    let mut args = vec![
        "vm",
        "add",
        name,
        "--memory",
        memory,
        "--disk",
        &disk,
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    csvctl_ok(cl, &args);
}

/// Three mounted hosts; the guest's kernel and initramfs copied to
/// Volume1; VM role "linux" on a 128 MiB dynamic VHD there, started on
/// host `on` and writing (its first full check heard).
fn linux_vm_running(on: u64) -> (CsvCluster, u64, Arc<Mutex<Heard>>) {
    let (cl, v) = CsvCluster::mounted_loopback(3, 512 << 20).unwrap();
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client()
            .cluster_info()
            .map(|i| i.nodes.len() == 3)
            .unwrap_or(false)
    })
    .unwrap();
    // The kernel and initramfs on the volume, where every host finds them.
    let images = cl.mountpoint(1, v).join("images");
    std::fs::create_dir_all(&images).unwrap();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        std::fs::copy(guest_dir().join(f), images.join(f)).unwrap();
    }
    vhd::Vhd::create(
        cl.mountpoint(1, v).join("linux.vhd"),
        &vhd::CreateOptions::new(vhd::footer::DiskType::Dynamic, 128 << 20),
    )
    .unwrap();
    let (port, heard) = observer();
    let hb = format!("127.0.0.1:{port}");
    add_linux(
        &cl,
        v,
        "linux",
        "256M",
        "console=ttyS0 quiet",
        &["--heartbeat", &hb, "--nic", "user"],
    );
    let t0 = Instant::now();
    csvctl_ok(&cl, &["vm", "start", "linux", "--on", &on.to_string()]);
    // Boot, mkfs, mount, the first full check of the records.
    let booted = csv_test_support::wait_until(Duration::from_secs(180), || {
        verified_after(&heard, t0).is_some_and(|n| n > 0) || failed(&cl, "linux")
    });
    assert!(
        booted.is_ok() && !failed(&cl, "linux"),
        "the guest did not start writing: {:?}\n{}\n{}",
        heard.lock().unwrap().lines.last(),
        csvctl_ok(&cl, &["vm", "status", "linux"]),
        serial_tail(&cl, on)
    );
    eprintln!("booted and writing after {:?}", t0.elapsed());
    // csvd serves the disk through the volume's own I/O path, not the
    // FUSE mount.
    let log = cl.log_tail(on, 5000);
    assert!(
        log.lines()
            .any(|l| l.contains("serving the disk") && l.contains("through=\"volume\"")),
        "no disk served through the volume in host {on}'s log:\n{log}"
    );
    (cl, v, heard)
}

#[test]
fn a_linux_guest_on_a_csv_disk_live_migrates_five_times_across_three_hosts_and_quick_migrates() {
    skip_without_qemu_guest!();
    let (cl, v, heard) = linux_vm_running(1);

    let mut host = 1u64;
    let mut gaps = Vec::new();
    for i in 0..5 {
        let to = host % 3 + 1;
        let before = Instant::now();
        let o = cl
            .csvctl()
            .args([
                "vm",
                "migrate",
                "linux",
                "--to",
                &to.to_string(),
                "--timeout-s",
                "120",
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "move {}: {}\nhost {host} log:\n{}\nhost {to} log:\n{}\n{}",
            i + 1,
            String::from_utf8_lossy(&o.stderr),
            cl.log_tail(host, 15),
            cl.log_tail(to, 15),
            serial_tail(&cl, to)
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        eprintln!("move {}: {}", i + 1, out.trim());
        host = to;
        // After the move the guest goes on and checks every record it
        // wrote (a full reread) at least once more.
        let moved = Instant::now();
        let ok = csv_test_support::wait_until(Duration::from_secs(90), || {
            verified_after(&heard, moved).is_some() || failed(&cl, "linux")
        });
        assert!(
            ok.is_ok() && !failed(&cl, "linux"),
            "no full check after move {} to host {host}: {:?}\n{}\n{}",
            i + 1,
            heard.lock().unwrap().lines.last(),
            csvctl_ok(&cl, &["vm", "status", "linux"]),
            serial_tail(&cl, host)
        );
        let gap = longest_gap(&heard, before, Instant::now());
        eprintln!(
            "move {}: longest heartbeat gap {gap:?}; records checked {:?}",
            i + 1,
            verified_after(&heard, moved)
        );
        gaps.push(gap);
        assert!(bad_lines(&heard).is_empty(), "{:?}", bad_lines(&heard));
    }
    eprintln!("heartbeat gaps at the five moves: {gaps:?}");
    // The NIC kept the role's MAC address: the guest saw it at boot, and
    // the QEMU now running it on host 3 has it.
    let mac = hypervisor_shim::supervisor::role::VmConfig::mac("linux");
    assert!(
        heard
            .lock()
            .unwrap()
            .lines
            .iter()
            .any(|(_, l)| *l == format!("CSV-GUEST-MAC {mac}")),
        "the guest did not see its MAC {mac}"
    );
    let rt = csvctl_json(&cl, &["vm", "status", "linux", "--json"]);
    let pid = rt["runtime"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["host"] == host))
        .and_then(|x| x["pid"].as_u64())
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains(&format!("mac={mac}")), "{cmdline}");

    // A quick migration: QEMU saves the guest to a file on the volume,
    // the target restores it, the guest goes on and checks its records.
    let to = host % 3 + 1;
    let o = cl
        .csvctl()
        .args([
            "vm",
            "migrate",
            "linux",
            "--to",
            &to.to_string(),
            "--quick",
            "--timeout-s",
            "120",
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "quick move: {}\nhost {host} log:\n{}\nhost {to} log:\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        cl.log_tail(host, 15),
        cl.log_tail(to, 15),
        serial_tail(&cl, to)
    );
    eprintln!("quick move: {}", String::from_utf8_lossy(&o.stdout).trim());
    let moved = Instant::now();
    let ok = csv_test_support::wait_until(Duration::from_secs(90), || {
        verified_after(&heard, moved).is_some() || failed(&cl, "linux")
    });
    assert!(
        ok.is_ok() && !failed(&cl, "linux"),
        "no full check after the quick move to host {to}: {:?}\n{}\n{}",
        heard.lock().unwrap().lines.last(),
        csvctl_ok(&cl, &["vm", "status", "linux"]),
        serial_tail(&cl, to)
    );
    assert!(bad_lines(&heard).is_empty(), "{:?}", bad_lines(&heard));

    // One writer at a time, following the VM: 1, 2, 3, 1, 2, 3, then 1
    // after the quick move.
    let h = csvctl_json(
        &cl,
        &["volume", "leases", &v.to_string(), "linux.vhd", "--json"],
    );
    assert_eq!(h["single_writer"], true, "{h:#}");
    let mut holders: Vec<u64> = Vec::new();
    for e in h["events"].as_array().unwrap() {
        if e["change"] == "granted" || e["change"] == "handed-in" {
            let n = e["host"].as_u64().unwrap();
            if holders.last() != Some(&n) {
                holders.push(n);
            }
        }
    }
    assert_eq!(holders, vec![1, 2, 3, 1, 2, 3, 1], "{h:#}");
    // Every live switch-over was a hand-over; at the quick one the
    // source's release may reach the coordinator first (then the target
    // is granted the free lease).
    let handed_in = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["change"] == "handed-in")
        .count();
    assert!((5..=6).contains(&handed_in), "{h:#}");

    // Stopped, the VHD checks clean and holds the guest's ext4.
    csvctl_ok(&cl, &["vm", "stop", "linux"]);
    csv_test_support::wait_until(Duration::from_secs(30), || {
        let s = csvctl_json(&cl, &["vm", "status", "linux", "--json"]);
        s["runtime"].as_array().is_some_and(|r| r.is_empty())
    })
    .unwrap();
    let path = cl.mountpoint(2, v).join("linux.vhd");
    let check = cl
        .csvctl()
        .args(["vhd", "check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// The newest "hb N" heard: the writer sends it after record N-1's
/// fdatasync, so N records were on the disk.
fn last_heartbeat(heard: &Mutex<Heard>) -> u64 {
    let g = heard.lock().unwrap();
    g.lines
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("hb "))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The highest record count of the guest's "hb N" lines heard after `since`.
fn synced_after(heard: &Mutex<Heard>, since: Instant) -> Option<u64> {
    let g = heard.lock().unwrap();
    g.lines
        .iter()
        .filter(|(t, _)| *t >= since)
        .filter_map(|(_, l)| l.strip_prefix("hb ")?.trim().parse().ok())
        .max()
}

#[test]
fn a_linux_guests_disk_goes_through_a_peer_while_its_hosts_san_path_is_cut() {
    skip_without_qemu_guest!();
    let (cl, v, heard) = linux_vm_running(1);
    // Host 1's own path to the LUN fails for 20 s.
    let cut = coordinator::proto::FaultReq {
        kind: coordinator::proto::FaultKind::SanCut as i32,
        volume: v,
        duration_ms: 20_000,
        ..Default::default()
    };
    let addr = cl.hosts.iter().find(|h| h.id == 1).unwrap().listen[0];
    coordinator::client::fault(&cl.identity(), addr, cut, Duration::from_secs(5)).unwrap();
    let redirected = csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.volume_state(1, v)
            .is_some_and(|(m, _)| m == "BlockRedirected")
    });
    assert!(
        redirected.is_ok(),
        "host 1 did not redirect: {:?}",
        cl.volume_state(1, v)
    );
    let t_redirected = Instant::now();
    let before = synced_after(&heard, Instant::now() - Duration::from_secs(5)).unwrap_or(0);
    // The guest's fdatasync'd records go on while its host reaches the
    // LUN through a peer.
    let went_on = csv_test_support::wait_until(Duration::from_secs(12), || {
        synced_after(&heard, t_redirected).is_some_and(|n| n >= before + 30)
    });
    let still = cl.volume_state(1, v);
    assert!(
        went_on.is_ok(),
        "the guest's writes stalled while redirected: {before} then {:?}\n{}",
        synced_after(&heard, t_redirected),
        serial_tail(&cl, 1)
    );
    assert_eq!(
        still.as_ref().map(|s| s.0.as_str()),
        Some("BlockRedirected"),
        "the writes must have gone on during the cut"
    );
    eprintln!(
        "redirected: records {before} -> {:?} in {:?}",
        synced_after(&heard, t_redirected),
        t_redirected.elapsed()
    );
    // The path comes back; the guest reads every record back whole.
    csv_test_support::wait_until(Duration::from_secs(40), || {
        cl.volume_state(1, v).is_some_and(|(m, _)| m == "Direct")
    })
    .expect("host 1 back on its own path");
    let healed = Instant::now();
    let checked = csv_test_support::wait_until(Duration::from_secs(90), || {
        verified_after(&heard, healed).is_some()
    });
    assert!(
        checked.is_ok() && bad_lines(&heard).is_empty() && !failed(&cl, "linux"),
        "after the cut: {:?}\n{}",
        bad_lines(&heard),
        serial_tail(&cl, 1)
    );
}

#[test]
fn a_linux_guest_restarts_elsewhere_with_its_records_after_kill_9_of_its_host() {
    skip_without_qemu_guest!();
    let (mut cl, _v, heard) = linux_vm_running(3);
    std::thread::sleep(Duration::from_secs(2));
    let synced = last_heartbeat(&heard);
    assert!(synced > 0);
    let killed = Instant::now();
    cl.kill(3).unwrap();
    // Once the cluster has host 3 down (its lease revoked first), the VM
    // boots on another host: the guest replays its journal, checks its
    // filesystem and every record before writing more.
    let ok = csv_test_support::wait_until(Duration::from_secs(120), || {
        verified_after(&heard, killed).is_some()
    });
    let lines = |heard: &Mutex<Heard>| -> Vec<String> {
        let g = heard.lock().unwrap();
        g.lines
            .iter()
            .filter(|(t, l)| *t >= killed && !l.starts_with("hb "))
            .map(|(_, l)| l.clone())
            .collect()
    };
    assert!(
        ok.is_ok(),
        "not running again: {:?}\n{}",
        lines(&heard),
        csvctl_ok(&cl, &["vm", "status", "linux"])
    );
    let after = lines(&heard);
    eprintln!(
        "running again and checked {:?} after the kill: {after:?}",
        killed.elapsed()
    );
    assert!(after.iter().any(|l| l == "fsck clean"), "{after:?}");
    let restart = after
        .iter()
        .find_map(|l| {
            l.strip_prefix("verify ok ")?
                .strip_suffix(" (start)")?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no start-up check: {after:?}"));
    assert!(
        restart >= synced,
        "records lost: {restart} on the disk, {synced} were synced before the kill"
    );
    assert!(bad_lines(&heard).is_empty(), "{:?}", bad_lines(&heard));
    let s = csvctl_json(&cl, &["vm", "status", "linux", "--json"]);
    assert_ne!(s["host"], 3, "{s}");
    assert!(
        s["config"]["last_migration"]
            .as_str()
            .unwrap_or("")
            .starts_with("failover: host 3"),
        "{s}"
    );
}

#[test]
fn a_bootable_vhd_boots_by_firmware_in_the_qemu_engine() {
    skip_without_qemu_guest!();
    let (cl, v) = CsvCluster::mounted_loopback(3, 256 << 20).unwrap();
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client()
            .cluster_info()
            .map(|i| i.nodes.len() == 3)
            .unwrap_or(false)
    })
    .unwrap();
    // The bootable disk image becomes a dynamic VHD on the volume.
    let vhd = cl.mountpoint(2, v).join("boot.vhd");
    csvctl_ok(
        &cl,
        &[
            "vhd",
            "convert",
            "--to",
            "dynamic",
            guest_dir().join("bootable.raw").to_str().unwrap(),
            vhd.to_str().unwrap(),
        ],
    );
    let (port, heard) = observer();
    csvctl_ok(
        &cl,
        &[
            "vm",
            "add",
            "bios",
            "--memory",
            "256M",
            "--disk",
            &format!("/ClusterStorage/Volume{v}/boot.vhd"),
            "--firmware-boot",
            "--heartbeat",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let s = csvctl_json(&cl, &["vm", "status", "bios", "--json"]);
    assert_eq!(s["config"]["engine"], "qemu", "{s}");
    assert_eq!(s["config"]["guest"], "linux", "{s}");
    let t0 = Instant::now();
    csvctl_ok(&cl, &["vm", "start", "bios", "--on", "2"]);
    let marker = |m: &str| heard.lock().unwrap().lines.iter().any(|(_, l)| l == m);
    let ok = csv_test_support::wait_until(Duration::from_secs(120), || {
        marker("CSV-GUEST-IDLE") || failed(&cl, "bios")
    });
    assert!(
        ok.is_ok() && marker("CSV-GUEST-UP"),
        "no marker from the firmware-booted guest: {:?}\n{}\n{}",
        heard.lock().unwrap().lines.last(),
        csvctl_ok(&cl, &["vm", "status", "bios"]),
        serial_tail(&cl, 2)
    );
    eprintln!("firmware boot to the guest's marker: {:?}", t0.elapsed());
    let serial = serial_tail(&cl, 2);
    assert!(serial.contains("CSV-GUEST-UP"), "{serial}");
    // Its console, read from the host running it through the cluster.
    let con = csvctl_ok(&cl, &["vm", "console", "bios", "--lines", "1000"]);
    assert!(con.contains("CSV-GUEST-UP"), "{con}");
    // Typed on it from any host: the guest's console shell answers.
    let mut answer = String::new();
    let typed = csv_test_support::wait_until(Duration::from_secs(40), || {
        answer = csvctl_ok(
            &cl,
            &[
                "vm",
                "console",
                "bios",
                "--lines",
                "0",
                "--type",
                "echo CSV-CONSOLE-$((6*7))",
            ],
        );
        answer.contains("CSV-CONSOLE-42")
    });
    assert!(typed.is_ok(), "no answer on the console: {answer:?}");
    let o = cl
        .csvctl()
        .args(["vm", "console", "nosuch"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn a_snapshot_freezes_a_guest_with_its_agent_and_pauses_one_without() {
    skip_without_qemu_guest!();
    csv_test_support::skip_unless!(
        csv_test_support::Need::Command("e2fsck"),
        csv_test_support::Need::Command("qemu-img")
    );
    let (cl, v, heard) = linux_vm_running(2);
    // A second guest on the same volume and host, without an agent (idle
    // mode starts none).
    let mnt = cl.mountpoint(1, v);
    vhd::Vhd::create(
        mnt.join("idle.vhd"),
        &vhd::CreateOptions::new(vhd::footer::DiskType::Dynamic, 16 << 20),
    )
    .unwrap();
    add_linux(
        &cl,
        v,
        "idle",
        "128M",
        "console=ttyS0 quiet csv.mode=idle",
        &[],
    );
    csvctl_ok(&cl, &["vm", "start", "idle", "--on", "2"]);
    let agent = csv_test_support::wait_until(Duration::from_secs(60), || {
        heard
            .lock()
            .unwrap()
            .lines
            .iter()
            .any(|(_, l)| l == "CSV-GUEST-AGENT")
    });
    assert!(agent.is_ok(), "the guest's agent did not start");
    csv_test_support::wait_until(Duration::from_secs(60), || {
        let s = csvctl_json(&cl, &["vm", "status", "idle", "--json"]);
        s["runtime"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["state"] == "running"))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));

    let out = csv_test_support::temp_dir("qemu-backup").unwrap();
    let copy = out.path().join("linux.vhd");
    let root1 = mnt.parent().unwrap().to_path_buf();
    let script = format!("cp \"$CSV_SNAPSHOT_PATH/linux.vhd\" {}", copy.display());
    let o = cl
        .csvctl()
        .args([
            "snapshot",
            "run",
            &v.to_string(),
            "--name",
            "app",
            "--json",
            "--mount-root",
        ])
        .arg(&root1)
        .args(["--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let snap: Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("{snap:#}");
    let how: Vec<String> = snap["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| h["vms"].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect();
    assert!(
        how.iter()
            .any(|h| h.starts_with("linux: ") && h.contains("frozen by the guest agent")),
        "{how:?}"
    );
    assert!(how.iter().any(|h| h == "idle: paused"), "{how:?}");
    // The guest goes on writing and checking after the thaw.
    let thawed = Instant::now();
    csv_test_support::wait_until(Duration::from_secs(60), || {
        verified_after(&heard, thawed).is_some()
    })
    .unwrap();
    assert!(bad_lines(&heard).is_empty(), "{:?}", bad_lines(&heard));

    // The copy is an application-consistent disk: its ext4 needs no
    // journal recovery and checks clean.
    let raw = out.path().join("linux.raw");
    let conv = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&copy)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&raw)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    eprintln!("e2fsck -fn on the snapshot's copy:\n{text}");
    assert!(fsck.status.success(), "{text}");
    assert!(!text.contains("recovery"), "{text}");
}
