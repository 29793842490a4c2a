//! `/ClusterStorage` on three hosts (three `csvd` processes, real FUSE
//! mounts) sharing one LUN file: data written on one host is read on the
//! others, VHDs made through one mount open with qemu-img through another,
//! namespace changes show everywhere, new files never show old bytes, and
//! a writer carries on through the coordinator's crash.

use csv_test_support::csvd::CsvCluster;
use csv_test_support::{skip_unless, Need};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Three hosts with Volume1 (1 GiB LUN file) mounted on each.
fn cluster() -> (CsvCluster, u64) {
    let (cl, v) = CsvCluster::mounted_loopback(3, 1 << 30).unwrap();
    registered(&cl);
    (cl, v)
}

/// Waits until the founders are in the registry (a moment after the first
/// election): `volume redirect` and the like look hosts up there.
fn registered(cl: &CsvCluster) {
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client().cluster_info().is_ok_and(|i| i.nodes.len() == 3)
    })
    .unwrap();
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_synced(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// A tgtd target `name` with a 512 MiB LUN, and three hosts with it
/// mounted as Volume1 (each logged in with its own initiator).
fn iscsi_cluster(
    name: &str,
) -> (
    csv_test_support::tgt::TgtTarget,
    csv_test_support::tgt::Target,
    std::path::PathBuf,
    CsvCluster,
) {
    let mut tgt = csv_test_support::tgt::TgtTarget::start().unwrap();
    let t = tgt.add_target(name).unwrap();
    let backing = tgt.dir().join("lun1.img");
    tgt.add_lun_file(&t, 1, &backing, 512 * MIB).unwrap();
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.mounts = true;
    cl.start_all().unwrap();
    cl.add_volume_url(&tgt.url(&t, 1), 1).unwrap();
    cl.wait_mounted(1, Duration::from_secs(30)).unwrap();
    registered(&cl);
    (tgt, t, backing, cl)
}

#[test]
fn data_written_on_one_host_reads_the_same_on_the_others() {
    skip_without_fuse!();
    let (cl, v) = cluster();
    let m = |h| cl.mountpoint(h, v);
    let data = pattern(1, (5 * MIB + 123) as usize);
    write_synced(&m(1).join("a.bin"), &data);
    for h in [2, 3] {
        assert_eq!(fs::read(m(h).join("a.bin")).unwrap(), data, "host {h}");
    }
    // Concurrent writers to different files on different hosts.
    std::thread::scope(|s| {
        for h in 1..=3u64 {
            let p = m(h).join(format!("from{h}.bin"));
            s.spawn(move || write_synced(&p, &pattern(10 + h, (8 * MIB) as usize)));
        }
    });
    for reader in 1..=3u64 {
        for writer in 1..=3u64 {
            let got = fs::read(m(reader).join(format!("from{writer}.bin"))).unwrap();
            assert!(
                got == pattern(10 + writer, (8 * MIB) as usize),
                "host {reader} reads host {writer}'s file wrong"
            );
        }
    }
    // Close without fsync is enough for the next opener (close-to-open).
    fs::write(m(2).join("closed.txt"), b"closed, not synced").unwrap();
    assert_eq!(
        fs::read(m(3).join("closed.txt")).unwrap(),
        b"closed, not synced"
    );
    // The same inode numbers everywhere.
    use std::os::unix::fs::MetadataExt;
    let inos: Vec<u64> = (1..=3)
        .map(|h| fs::metadata(m(h).join("a.bin")).unwrap().ino())
        .collect();
    assert!(inos.windows(2).all(|w| w[0] == w[1]), "{inos:?}");
}

#[test]
fn a_vhd_made_through_one_host_opens_with_qemu_img_on_another() {
    skip_without_fuse!();
    skip_unless!(Need::Command("qemu-img"), Need::Command("qemu-io"));
    let (cl, v) = cluster();
    let img = |h| cl.mountpoint(h, v).join("vm1.vhd");
    let run = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    run(Command::new("qemu-img")
        .args(["create", "-f", "vpc"])
        .arg(img(1))
        .arg("4G"));
    run(Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x5a 1M 16M"])
        .arg(img(1)));
    let info = run(Command::new("qemu-img")
        .args(["info", "-f", "vpc"])
        .arg(img(2)));
    assert!(info.contains("virtual size: 4 GiB"), "{info}");
    let read = run(Command::new("qemu-io")
        .args([
            "-f",
            "vpc",
            "-c",
            "read -P 0x5a 1M 16M",
            "-c",
            "read -P 0 0 1M",
        ])
        .arg(img(3)));
    assert!(!read.contains("Pattern verification failed"), "{read}");
    // Our own checker agrees on the third host.
    let out = Command::new(csv_test_support::cmd::workspace_bin("csvctl"))
        .args(["vhd", "check"])
        .arg(img(3))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn names_change_everywhere_and_new_files_never_show_old_bytes() {
    skip_without_fuse!();
    let (cl, v) = cluster();
    let m = |h| cl.mountpoint(h, v);
    // Rename and unlink are seen at once on the other hosts.
    fs::create_dir(m(1).join("dir")).unwrap();
    fs::write(m(1).join("dir/old"), b"x").unwrap();
    fs::rename(m(2).join("dir/old"), m(2).join("new")).unwrap();
    assert!(!m(3).join("dir/old").exists());
    assert_eq!(fs::read(m(3).join("new")).unwrap(), b"x");
    fs::remove_file(m(3).join("new")).unwrap();
    assert!(!m(1).join("new").exists());
    // Fill files with a recognisable secret, delete them, then make new
    // files in the freed space: they must read as zeros wherever they
    // were not written.
    let secret = vec![0xa5u8; (8 * MIB) as usize];
    for i in 0..4 {
        write_synced(&m(1).join(format!("secret{i}")), &secret);
    }
    for i in 0..4 {
        fs::remove_file(m(2).join(format!("secret{i}"))).unwrap();
    }
    for i in 0..4 {
        let p = m(3).join(format!("fresh{i}"));
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        // A sparse file with one byte in the middle, and an allocated
        // but unwritten range.
        f.write_all_at(b"!", 3 * MIB).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.sync_all().unwrap();
        drop(f);
        for h in 1..=3 {
            let got = fs::read(m(h).join(format!("fresh{i}"))).unwrap();
            assert_eq!(got.len() as u64, 8 * MIB);
            let bad = got
                .iter()
                .enumerate()
                .find(|&(o, &b)| b != 0 && o as u64 != 3 * MIB);
            assert!(
                bad.is_none(),
                "host {h} sees old bytes in fresh{i} at {bad:?}"
            );
            assert_eq!(got[(3 * MIB) as usize], b'!');
        }
    }
}

#[test]
fn a_writer_carries_on_through_the_coordinators_crash() {
    skip_without_fuse!();
    let (mut cl, v) = cluster();
    let leader = cl.wait_leader(v, Duration::from_secs(10)).unwrap();
    let writer_host = if leader == 1 { 2 } else { 1 };
    let path = cl.mountpoint(writer_host, v).join("stream.bin");
    const CHUNK: usize = 256 << 10;
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(u64, Duration), String> {
            let mut f = File::create(&path).map_err(|e| e.to_string())?;
            let mut synced = 0u64;
            let mut slowest = Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) || i < 8 {
                let t = Instant::now();
                f.write_all(&pattern(1000 + i, CHUNK))
                    .map_err(|e| format!("write of chunk {i}: {e}"))?;
                if i % 4 == 3 {
                    f.sync_all()
                        .map_err(|e| format!("fsync after chunk {i}: {e}"))?;
                    synced = (i + 1) * CHUNK as u64;
                }
                slowest = slowest.max(t.elapsed());
                i += 1;
                // About 20 MiB/s: the stream spans the crash without
                // filling the volume.
                std::thread::sleep(Duration::from_millis(12));
            }
            f.sync_all().map_err(|e| format!("last fsync: {e}"))?;
            assert!(synced <= i * CHUNK as u64);
            Ok((i * CHUNK as u64, slowest))
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    cl.kill(leader).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let (written, slowest) = w
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the stream failed: {e}"));
    eprintln!(
        "streamed {} MiB through host {writer_host}; host {leader} (coordinator) killed; slowest write+fsync {slowest:?}",
        written / MIB
    );
    // Every byte is there, read on the third host (and on the writer).
    let third = (1..=3).find(|h| *h != leader && *h != writer_host).unwrap();
    for h in [third, writer_host] {
        let mut f = File::open(cl.mountpoint(h, v).join("stream.bin")).unwrap();
        let mut buf = vec![0u8; CHUNK];
        for i in 0..written / CHUNK as u64 {
            f.read_exact(&mut buf).unwrap();
            assert!(
                buf == pattern(1000 + i, CHUNK),
                "chunk {i} wrong on host {h}"
            );
        }
    }
    // The killed host comes back and sees the same file.
    cl.start(leader).unwrap();
    cl.wait_mounted(v, Duration::from_secs(20)).unwrap();
    let len = fs::metadata(cl.mountpoint(leader, v).join("stream.bin"))
        .unwrap()
        .len();
    assert_eq!(len, written);
}

#[test]
fn csvctl_up_starts_a_mounted_cluster_and_ctrl_c_stops_it() {
    skip_without_fuse!();
    let dir = csv_test_support::temp_dir("up").unwrap();
    // Two consecutive free ports (host K listens on base + K - 1), below
    // the kernel's ephemeral range, where outgoing connections of the other
    // tests do not take them.
    let start = 20000 + (std::process::id() % 5000) as u16 * 2;
    let base = (0..2000u16)
        .map(|i| 20000 + (start - 20000 + 2 * i) % 10000)
        .find(|&p| {
            let a = std::net::TcpListener::bind(("127.0.0.1", p));
            let b = std::net::TcpListener::bind(("127.0.0.1", p + 1));
            a.is_ok() && b.is_ok()
        })
        .unwrap();
    let mut child = Command::new(csv_test_support::cmd::workspace_bin("csvctl"))
        .args([
            "up",
            "--nodes",
            "2",
            "--lun-size",
            "256M",
            "--base-port",
            &base.to_string(),
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    let t = Instant::now();
    while !ready.starts_with("ready:") {
        ready.clear();
        if std::io::BufRead::read_line(&mut out, &mut ready).unwrap() == 0
            || t.elapsed() > Duration::from_secs(60)
        {
            let _ = child.kill();
            panic!("csvctl up ended or stalled before `ready:`");
        }
    }
    let m1 = dir.path().join("node1/ClusterStorage/Volume1");
    let m2 = dir.path().join("node2/ClusterStorage/Volume1");
    assert!(ready.contains(&m1.display().to_string()), "{ready}");
    fs::write(m1.join("hello"), b"from host 1").unwrap();
    assert_eq!(fs::read(m2.join("hello")).unwrap(), b"from host 1");
    // Ctrl-C: hosts unmount and stop, the command exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&dir.path().display().to_string()),
        "a mount was left"
    );
}

#[test]
fn one_host_at_a_time_writes_a_file() {
    skip_without_fuse!();
    let (cl, v) = cluster();
    let m = |h| cl.mountpoint(h, v);
    let mut w1 = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m(1).join("vm.vhd"))
        .unwrap();
    w1.write_all(b"host 1").unwrap();
    // Another host may read it, but not open it for writing.
    let err = OpenOptions::new()
        .write(true)
        .open(m(2).join("vm.vhd"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    assert!(File::open(m(3).join("vm.vhd")).is_ok());
    // Closing gives the write lease back at once.
    drop(w1);
    let mut w2 = OpenOptions::new()
        .write(true)
        .open(m(2).join("vm.vhd"))
        .unwrap();
    w2.write_all(b"host 2").unwrap();
    drop(w2);
    assert_eq!(fs::read(m(3).join("vm.vhd")).unwrap(), b"host 2");
}

#[test]
fn metrics_json_logs_and_volume_removal() {
    skip_without_fuse!();
    let mut cl = CsvCluster::loopback(1).unwrap();
    cl.mounts = true;
    let port = csv_test_support::free_port().unwrap();
    cl.extra_args = vec![
        "--metrics".into(),
        format!("127.0.0.1:{port}"),
        "--log-json".into(),
    ];
    cl.start_all().unwrap();
    let v = cl.add_volume_file(256 << 20).unwrap();
    cl.wait_mounted(v, Duration::from_secs(20)).unwrap();
    // Direct I/O through the mount: a first write into a hole gets the
    // space (and goes synchronously); the rewrite of that space goes to
    // the LUN file asynchronously.
    {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(cl.mountpoint(1, v).join("direct.dat"))
            .unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        for _ in 0..2 {
            for at in (0..1u64 << 20).step_by(64 << 10) {
                let a = at as usize;
                f.write_all_at(&data[a..a + (64 << 10)], at).unwrap();
            }
        }
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data, "what was written comes back");
    }
    let metrics = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let async_bytes = |body: &str| -> u64 {
        body.lines()
            .find_map(|l| {
                l.strip_prefix("csv_volume_async_io_bytes_total{host=\"1\",volume=\"Volume1\"} ")
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    // Prometheus text over HTTP (the volume counters follow within a
    // second or two).
    let mut body = metrics();
    let _ = csv_test_support::wait_until(Duration::from_secs(10), || {
        body = metrics();
        async_bytes(&body) >= 1 << 20
    });
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        async_bytes(&body) >= 1 << 20,
        "the rewrite went asynchronously:\n{body}"
    );
    assert!(
        body.contains("csv_raft_term{host=\"1\",group=\"Volume1\"}"),
        "{body}"
    );
    assert!(
        body.contains("csv_volume_direct{host=\"1\",volume=\"Volume1\"} 1"),
        "{body}"
    );
    // Structured logs: one JSON object per line.
    let log = fs::read_to_string(cl.dir().join("host1.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("mounted"))
        .unwrap_or_default();
    assert!(
        line.starts_with('{') && line.contains("\"level\":\"INFO\""),
        "{line}"
    );
    // Volume status as JSON, for scripts.
    let out = cl
        .csvctl()
        .args(["volume", "status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let j = String::from_utf8_lossy(&out.stdout);
    assert!(
        j.contains("\"state\": \"Direct\"") && j.contains("\"volume\": \"Volume1\""),
        "{j}"
    );
    // Removal is refused while a file is open, then unmounts the volume.
    let mp = cl.mountpoint(1, v);
    let f = File::create(mp.join("open")).unwrap();
    let out = cl
        .csvctl()
        .args(["volume", "remove", &v.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("open file"),
        "{out:?}"
    );
    // The kernel sends FUSE's release after close returns: the file
    // counts as open for a few more milliseconds.
    drop(f);
    let mut out = None;
    let removed = csv_test_support::wait_until(Duration::from_secs(5), || {
        let o = cl
            .csvctl()
            .args(["volume", "remove", &v.to_string()])
            .output()
            .unwrap();
        let ok = o.status.success();
        out = Some(o);
        ok
    });
    assert!(removed.is_ok(), "{out:?}");
    let gone = csv_test_support::wait_until(Duration::from_secs(10), || {
        !fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .contains(&mp.display().to_string())
    });
    assert!(gone.is_ok(), "Volume{v} still mounted after removal");
}

/// A LUN another cluster left reserved: `volume add` refuses it and says
/// why; with --force it clears the reservations (the old registrant can
/// no longer write) and the volume mounts on every host, fenced by this
/// cluster's own keys.
#[test]
fn a_lun_another_cluster_reserved_is_refused_then_cleared_with_force() {
    skip_without_fuse!();
    skip_unless!(Need::Command("tgtd"), Need::Command("tgtadm"));
    use csv_fs::lun::san::{open, pr_holds, SanIdentity};
    use vhd::BlockIo;
    let mut tgt = csv_test_support::tgt::TgtTarget::start().unwrap();
    let t = tgt.add_target("foreign").unwrap();
    let backing = tgt.dir().join("lun1.img");
    tgt.add_lun_file(&t, 1, &backing, 256 * MIB).unwrap();
    let url = tgt.url(&t, 1);
    // The other cluster's host: registered and holding the reservation.
    let other = SanIdentity {
        initiator: "iqn.2026-11.io.other:host1".into(),
        chap: None,
        node: 0,
    };
    let old = open(&url, &other, 1).unwrap();
    csv_fs::lun::san::pr_register(&old.lun, 0x0DD0_0001).unwrap();
    let l = old.lun.lun();
    assert_eq!(
        old.lun.block_on(l.reservation()).unwrap(),
        Some((0x0DD0_0001, iscsi_initiator::scsi::PR_WE_RO))
    );
    old.lun.write_at(&[0x11u8; 4096], 1 << 20).unwrap();

    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.mounts = true;
    cl.start_all().unwrap();
    registered(&cl);
    let out = cl
        .csvctl()
        .args(["volume", "add", &url, "--number", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "added a reserved LUN: {err}");
    assert!(
        err.contains("persistent reservations")
            && err.contains("0xdd00001")
            && err.contains("--force"),
        "{err}"
    );
    // Nothing was written: the LUN still has no volume on it.
    assert_ne!(&fs::read(&backing).unwrap()[..8], b"CSVVOL\0\0");

    cl.add_volume_url(&url, 1).unwrap();
    cl.wait_mounted(1, Duration::from_secs(30)).unwrap();
    let keys = || old.lun.block_on(l.reservation_keys()).unwrap();
    csv_test_support::wait_until(Duration::from_secs(10), || {
        (1..=3).all(|n| pr_holds(&keys(), n))
    })
    .unwrap();
    assert!(!keys().contains(&0x0DD0_0001), "{:x?}", keys());
    let e = old.lun.write_at(&[0x22u8; 4096], 1 << 20).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    let data = pattern(5, (3 * MIB) as usize);
    write_synced(&cl.mountpoint(1, 1).join("after-clear.bin"), &data);
    assert_eq!(
        fs::read(cl.mountpoint(2, 1).join("after-clear.bin")).unwrap(),
        data
    );
}

/// Fencing by persistent reservation: every host registers its key on
/// the volume's LUN under a Write Exclusive – Registrants Only reservation,
/// so a stranger cannot write; a host the cluster has down (its csvd frozen
/// with SIGSTOP) loses its key to the cluster leader, and a write in its
/// name (its initiator name and ISID: the same I_T nexus) gets RESERVATION
/// CONFLICT while the other hosts go on; resumed, it rejoins, registers
/// again and writes.
#[test]
fn a_host_the_cluster_has_down_is_fenced_off_the_iscsi_lun() {
    skip_without_fuse!();
    skip_unless!(Need::Command("tgtd"), Need::Command("tgtadm"));
    use csv_fs::lun::san::{open, pr_holds, SanIdentity};
    use vhd::BlockIo;
    let (tgt, t, _backing, cl) = iscsi_cluster("fence");
    let url = tgt.url(&t, 1);
    let tool = SanIdentity {
        initiator: "iqn.2026-11.io.csv.test:fence-observer".into(),
        chap: None,
        node: 0,
    };
    let observer = open(&url, &tool, 1).unwrap();
    let keys = |p: &csv_fs::lun::san::IscsiPath| -> Vec<u64> {
        p.lun.block_on(p.lun.lun().reservation_keys()).unwrap()
    };
    csv_test_support::wait_until(Duration::from_secs(10), || {
        (1..=3).all(|n| pr_holds(&keys(&observer), n))
    })
    .unwrap();
    let r = observer
        .lun
        .block_on(observer.lun.lun().reservation())
        .unwrap();
    assert_eq!(
        r.map(|r| r.1),
        Some(iscsi_initiator::scsi::PR_WE_RO),
        "{r:?}"
    );
    // A stranger (registered nowhere) reads but cannot write.
    let last = observer.lun.len().unwrap() - 4096;
    let mut b = vec![0u8; 4096];
    observer.lun.read_at(&mut b, last).unwrap();
    let e = observer.lun.write_at(&b, last).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");

    // Freeze host 2 until the cluster has it down and its key is gone.
    let pid = cl.pid(2).unwrap().to_string();
    let sig = |s: &str| {
        assert!(Command::new("kill")
            .args([s, &pid])
            .status()
            .unwrap()
            .success());
    };
    sig("-STOP");
    let down =
        csv_test_support::wait_until(Duration::from_secs(20), || !pr_holds(&keys(&observer), 2));
    if down.is_err() {
        sig("-CONT");
        panic!(
            "host 2 not fenced: keys {:x?}\nhost 1:\n{}\nhost 3:\n{}",
            keys(&observer),
            cl.log_tail(1, 10),
            cl.log_tail(3, 10)
        );
    }
    assert!(pr_holds(&keys(&observer), 1) && pr_holds(&keys(&observer), 3));
    // A write in host 2's name, on its own I_T nexus, is refused.
    let as2 = SanIdentity {
        initiator: SanIdentity::default_initiator(2),
        chap: None,
        node: 2,
    };
    let impostor = open(&url, &as2, 1).unwrap();
    impostor.lun.read_at(&mut b, last).unwrap();
    let e = impostor.lun.write_at(&b, last).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    drop(impostor);
    // The others go on.
    let data = pattern(77, (2 * MIB) as usize);
    write_synced(&cl.mountpoint(1, 1).join("while-fenced.bin"), &data);
    assert_eq!(
        fs::read(cl.mountpoint(3, 1).join("while-fenced.bin")).unwrap(),
        data
    );

    // Resumed, host 2 rejoins, registers again, and writes.
    sig("-CONT");
    csv_test_support::wait_until(Duration::from_secs(20), || pr_holds(&keys(&observer), 2))
        .unwrap();
    let data = pattern(78, MIB as usize);
    write_synced(&cl.mountpoint(2, 1).join("after-rejoin.bin"), &data);
    assert_eq!(
        fs::read(cl.mountpoint(1, 1).join("after-rejoin.bin")).unwrap(),
        data
    );
    assert!(
        cl.log_tail(2, 200).contains("registered again"),
        "{}",
        cl.log_tail(2, 20)
    );
}

#[test]
fn a_volume_on_an_iscsi_lun_is_shared_by_three_hosts() {
    skip_without_fuse!();
    skip_unless!(Need::Command("tgtd"), Need::Command("tgtadm"));
    let (tgt, t, backing, cl) = iscsi_cluster("csvvol");
    // Each host has its own session, under its own initiator name.
    let names: std::collections::BTreeSet<String> = tgt
        .connections(&t)
        .unwrap()
        .into_iter()
        .map(|c| c.initiator)
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let st = cl.status(2).unwrap();
    assert!(st.volumes[0].reason.contains("iSCSI"), "{:?}", st.volumes);
    let m = |h| cl.mountpoint(h, 1);
    let data = pattern(77, (6 * MIB + 5) as usize);
    write_synced(&m(1).join("over-iscsi.bin"), &data);
    for h in [2, 3] {
        assert_eq!(
            fs::read(m(h).join("over-iscsi.bin")).unwrap(),
            data,
            "host {h}"
        );
    }
    // The bytes are on the target's LUN, past the volume's superblock.
    let lun = fs::read(&backing).unwrap();
    assert_eq!(&lun[..8], b"CSVVOL\0\0");
    assert!(
        lun.windows(64).any(|w| w == &data[..64]),
        "the file's data is not on the LUN"
    );
}

#[test]
fn moving_the_coordinator_ten_times_under_a_write_stream_loses_nothing() {
    skip_without_fuse!();
    let (cl, v) = cluster();
    let path = cl.mountpoint(1, v).join("moving.bin");
    const CHUNK: usize = 128 << 10;
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || -> Result<u64, String> {
            let mut f = File::create(&path).map_err(|e| e.to_string())?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all(&pattern(5000 + i, CHUNK))
                    .map_err(|e| format!("write of chunk {i}: {e}"))?;
                if i % 2 == 1 {
                    f.sync_all()
                        .map_err(|e| format!("fsync after chunk {i}: {e}"))?;
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            f.sync_all().map_err(|e| format!("last fsync: {e}"))?;
            Ok(i)
        })
    };
    let mut c = cl.client();
    for k in 0..10u64 {
        let to = k % 3 + 1;
        let t = Instant::now();
        c.transfer_leader(v, to)
            .unwrap_or_else(|e| panic!("move {k} to host {to}: {e}"));
        eprintln!("move {k}: coordinator on host {to} after {:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let chunks = w
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the stream failed: {e}"));
    for h in [2, 3] {
        let got = fs::read(cl.mountpoint(h, v).join("moving.bin")).unwrap();
        assert_eq!(got.len(), chunks as usize * CHUNK);
        for i in 0..chunks as usize {
            assert!(
                got[i * CHUNK..(i + 1) * CHUNK] == pattern(5000 + i as u64, CHUNK),
                "chunk {i} wrong on host {h}"
            );
        }
    }
}

#[test]
fn a_host_redirected_by_the_operator_carries_on_through_a_peer() {
    skip_without_fuse!();
    let (cl, v) = cluster();
    let state = |h: u64| cl.volume_state(h, v).unwrap();
    let redirect = |on: &str| {
        let o = cl
            .csvctl()
            .args(["volume", "redirect", &v.to_string(), "--node", "2", on])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let path = cl.mountpoint(2, v).join("redirected.bin");
    const CHUNK: usize = 256 << 10;
    let mut f = File::create(&path).unwrap();
    for i in 0..8u64 {
        f.write_all(&pattern(9000 + i, CHUNK)).unwrap();
    }
    f.sync_all().unwrap();
    // Redirect host 2 in the middle of its stream: no error, and every
    // byte it writes or reads now travels through a peer.
    redirect("on");
    let (s, why) = state(2);
    assert_eq!(s, "BlockRedirected", "{why}");
    assert_eq!(state(1).0, "Direct");
    for i in 8..16u64 {
        f.write_all(&pattern(9000 + i, CHUNK)).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    // Redirected I/O goes to the volume's coordinator first: move it to
    // host 3, then to host 1, and see who serves host 2.
    for to in [3u64, 1] {
        cl.client().transfer_leader(v, to).unwrap();
        let addr = cl.hosts.iter().find(|h| h.id == to).unwrap().listen[0];
        let served = csv_test_support::wait_until(Duration::from_secs(10), || {
            let mut g = File::options().append(true).open(&path).unwrap();
            g.write_all(b"x").unwrap();
            g.sync_all().unwrap();
            state(2).1.contains(&format!("last served by {addr}"))
        });
        assert!(served.is_ok(), "coordinator {to} at {addr}: {:?}", state(2));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(16 * CHUNK as u64)
        .unwrap();
    let back = fs::read(&path).unwrap();
    for h in [1, 3] {
        assert_eq!(
            fs::read(cl.mountpoint(h, v).join("redirected.bin")).unwrap(),
            back
        );
    }
    for i in 0..16usize {
        assert!(
            back[i * CHUNK..(i + 1) * CHUNK] == pattern(9000 + i as u64, CHUNK),
            "chunk {i}"
        );
    }
    // A file written elsewhere reads right on the redirected host.
    write_synced(
        &cl.mountpoint(3, v).join("from3.bin"),
        &pattern(4, (3 * MIB) as usize),
    );
    assert!(
        fs::read(cl.mountpoint(2, v).join("from3.bin")).unwrap() == pattern(4, (3 * MIB) as usize)
    );
    // The bytes really went through a peer (the state's reason counts the
    // requests; it is refreshed every second).
    let through = csv_test_support::wait_until(Duration::from_secs(5), || {
        let (_, why) = state(2);
        why.split_whitespace()
            .zip(why.split_whitespace().skip(1))
            .find(|(_, w)| *w == "requests")
            .and_then(|(n, _)| n.trim_start_matches('(').parse::<u64>().ok())
            .is_some_and(|n| n >= 16)
    });
    assert!(through.is_ok(), "{:?}", state(2));
    redirect("off");
    assert_eq!(state(2).0, "Direct");
    write_synced(&cl.mountpoint(2, v).join("direct-again.bin"), b"own path");
    assert_eq!(
        fs::read(cl.mountpoint(1, v).join("direct-again.bin")).unwrap(),
        b"own path"
    );
}

#[test]
fn a_host_that_loses_its_san_path_is_redirected_and_comes_back_by_itself() {
    skip_without_fuse!();
    skip_unless!(Need::Command("tgtd"), Need::Command("tgtadm"));
    let (mut tgt, t, _backing, cl) = iscsi_cluster("csvpath");
    let host2 = tgt
        .connections(&t)
        .unwrap()
        .into_iter()
        .map(|c| c.initiator)
        .find(|i| i.ends_with("-node2"))
        .unwrap();
    let state = |h: u64| cl.volume_state(h, 1).unwrap();
    // Host 2 streams writes and fsyncs while its SAN path is cut.
    let path = cl.mountpoint(2, 1).join("stream.bin");
    const CHUNK: usize = 128 << 10;
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(u64, Duration), String> {
            let mut f = File::create(&path).map_err(|e| e.to_string())?;
            let (mut i, mut slowest) = (0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                f.write_all(&pattern(7000 + i, CHUNK))
                    .map_err(|e| format!("write {i}: {e}"))?;
                f.sync_all().map_err(|e| format!("fsync {i}: {e}"))?;
                slowest = slowest.max(t.elapsed());
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok((i, slowest))
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let cut = Instant::now();
    tgt.cut_initiator(&t, &host2).unwrap();
    let redirected =
        csv_test_support::wait_until(Duration::from_secs(10), || state(2).0 == "BlockRedirected");
    assert!(redirected.is_ok(), "host 2 not redirected: {:?}", state(2));
    eprintln!(
        "BlockRedirected {:?} after the cut: {}",
        cut.elapsed(),
        state(2).1
    );
    std::thread::sleep(Duration::from_millis(1500));
    tgt.restore_initiator(&t, &host2).unwrap();
    let back = csv_test_support::wait_until(Duration::from_secs(15), || state(2).0 == "Direct");
    assert!(back.is_ok(), "host 2 did not come back: {:?}", state(2));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (chunks, slowest) = w
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the stream failed: {e}"));
    eprintln!("{chunks} chunks written and fsync'd; slowest write+fsync {slowest:?}");
    for h in [1, 2, 3] {
        let got = fs::read(cl.mountpoint(h, 1).join("stream.bin")).unwrap();
        assert_eq!(got.len(), chunks as usize * CHUNK, "host {h}");
        for i in 0..chunks as usize {
            assert!(
                got[i * CHUNK..(i + 1) * CHUNK] == pattern(7000 + i as u64, CHUNK),
                "chunk {i} on host {h}"
            );
        }
    }
}

#[test]
fn a_host_forced_to_filesystem_redirected_has_the_coordinator_do_its_file_io() {
    skip_without_fuse!();
    let (mut cl, v) = cluster();
    let state = |h: u64| cl.volume_state(h, v).unwrap();
    let ctl = |args: &[&str]| -> String {
        let o = cl.csvctl().args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    cl.client().transfer_leader(v, 3).unwrap();
    let coord = cl.hosts.iter().find(|h| h.id == 3).unwrap().listen[0];
    let vs = v.to_string();
    // Host 2 in or out of FileSystemRedirected.
    let fs_redirect = |state: &str| {
        ctl(&[
            "volume",
            "redirect",
            &vs,
            "--node",
            "2",
            state,
            "--mode",
            "filesystem",
        ])
    };
    fs_redirect("on");
    let ready = csv_test_support::wait_until(Duration::from_secs(10), || {
        let (s, why) = state(2);
        s == "FileSystemRedirected" && why.contains(&format!("coordinator at {coord}"))
    });
    assert!(ready.is_ok(), "{:?}", state(2));
    assert_eq!(state(1).0, "Direct");

    // Host 2 writes, fsyncs, closes and reads back: the coordinator did it.
    let data = pattern(77, (3 << 20) + 123);
    write_synced(&cl.mountpoint(2, v).join("fsredir.bin"), &data);
    assert_eq!(
        fs::read(cl.mountpoint(2, v).join("fsredir.bin")).unwrap(),
        data
    );
    assert_eq!(
        fs::read(cl.mountpoint(1, v).join("fsredir.bin")).unwrap(),
        data
    );
    // An append through an open handle, read on another host after close.
    let mut f = OpenOptions::new()
        .append(true)
        .open(cl.mountpoint(2, v).join("fsredir.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let got = fs::read(cl.mountpoint(3, v).join("fsredir.bin")).unwrap();
    assert_eq!(got.len(), data.len() + 4);
    assert_eq!(&got[data.len()..], b"tail");
    let (_, why) = state(2);
    assert!(!why.contains(" 0 operations"), "{why}");
    // Only the coordinator ever held the write lease.
    let leases = |file: &str| -> serde_json::Value {
        serde_json::from_str(&ctl(&["volume", "leases", &vs, file, "--json"])).unwrap()
    };
    let writers = |h: &serde_json::Value| -> Vec<u64> {
        h["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["change"] == "granted")
            .map(|e| e["host"].as_u64().unwrap())
            .collect()
    };
    let h = leases("fsredir.bin");
    let w = writers(&h);
    assert!(!w.is_empty() && w.iter().all(|&x| x == 3), "{h:#}");

    // Back to Direct: host 2 writes itself again.
    fs_redirect("off");
    let back = csv_test_support::wait_until(Duration::from_secs(5), || state(2).0 == "Direct");
    assert!(back.is_ok(), "{:?}", state(2));
    write_synced(&cl.mountpoint(2, v).join("fsredir.bin"), b"own");
    assert!(writers(&leases("fsredir.bin")).contains(&2));
    assert_eq!(
        fs::read(cl.mountpoint(1, v).join("fsredir.bin")).unwrap(),
        b"own"
    );

    // A redirected host that dies with a file open: the coordinator closes
    // what it opened for it, and another host can write the file.
    fs_redirect("on");
    csv_test_support::wait_until(Duration::from_secs(10), || {
        state(2).1.contains("done by the coordinator")
    })
    .unwrap();
    let held = OpenOptions::new()
        .write(true)
        .open(cl.mountpoint(2, v).join("fsredir.bin"))
        .unwrap();
    let busy = OpenOptions::new()
        .write(true)
        .open(cl.mountpoint(1, v).join("fsredir.bin"));
    assert!(
        busy.is_err(),
        "host 1 wrote a file the coordinator holds for host 2"
    );
    cl.kill(2).unwrap();
    std::mem::forget(held);
    let t = Instant::now();
    let free = csv_test_support::wait_until(Duration::from_secs(20), || {
        OpenOptions::new()
            .write(true)
            .open(cl.mountpoint(1, v).join("fsredir.bin"))
            .is_ok()
    });
    assert!(
        free.is_ok(),
        "the coordinator kept host 2's file open: {:?}\n{}\nhost 3's log:\n{}",
        OpenOptions::new()
            .write(true)
            .open(cl.mountpoint(1, v).join("fsredir.bin")),
        String::from_utf8_lossy(
            &cl.csvctl()
                .args(["volume", "leases", &vs, "fsredir.bin"])
                .output()
                .unwrap()
                .stdout
        ),
        cl.log_tail(3, 300)
            .lines()
            .filter(|l| !l.contains("raft"))
            .collect::<Vec<_>>()
            .join("\n")
            + &String::from_utf8_lossy(
                &cl.csvctl()
                    .args(["cluster", "nodes"])
                    .output()
                    .unwrap()
                    .stdout
            )
    );
    eprintln!(
        "host 2 killed: its file writable on host 1 after {:?}",
        t.elapsed()
    );
}
