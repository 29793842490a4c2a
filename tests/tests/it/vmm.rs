//! csv-vmm on /dev/kvm with the purpose-built test guest: boot, save and
//! restore, live migration under a dirtying load, and a migration killed
//! half-way. Every VMM reports its heartbeats to one observer, so a missing
//! sequence number anywhere (on either host) fails the test.

use std::time::{Duration, Instant};

use std::path::Path;

use csv_test_support::vmm::{Observer, Vmm};
use csv_test_support::{skip_unless, temp_dir, Need};
use hypervisor_shim::control::proto::{MigrateRequest, Reply, Request, VmmState};
use hypervisor_shim::control::ControlError;
use hypervisor_shim::guest::{check_disk, DiskCheck};
use hypervisor_shim::vm::RunState;
use vhd::footer::DiskType;

const DISK_BLOCKS: u64 = 256;

fn make_disk(path: &Path, kind: DiskType) {
    vhd::Vhd::create(path, &vhd::CreateOptions::new(kind, 16 << 20)).unwrap();
}

/// Checks what the test guest wrote to its VHD, read by our crate and by
/// qemu-img (converted to raw): both must agree that every written block
/// holds together and that the newest write is `last_seq` or later.
fn check_guest_disk(path: &Path, last_seq: u64) -> DiskCheck {
    let ours = check_guest_disk_ours(path, last_seq);
    let raw = path.with_extension("raw");
    csv_test_support::cmd::run_args(
        "qemu-img",
        [
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    )
    .unwrap();
    let f = std::fs::File::open(&raw).unwrap();
    let qemu = check_disk(DISK_BLOCKS, |b, buf| {
        std::os::unix::fs::FileExt::read_exact_at(&f, buf, b * 4096)
    })
    .unwrap();
    assert_eq!(ours, qemu, "our reading of the VHD and qemu-img's differ");
    ours
}

/// The same check with our reader alone (qemu-img cannot follow a
/// differencing VHD).
fn check_guest_disk_ours(path: &Path, last_seq: u64) -> DiskCheck {
    let disk = vhd::Vhd::open(path, &vhd::OpenOptions::default()).unwrap();
    let ours = check_disk(DISK_BLOCKS, |b, buf| {
        disk.read_at(buf, b * 4096).map_err(std::io::Error::other)
    })
    .unwrap();
    assert_eq!(ours.bad, 0, "{ours:?}");
    assert!(ours.written > 0, "{ours:?}");
    assert!(
        ours.newest_seq >= last_seq,
        "newest block on disk {ours:?}, guest's last write {last_seq}"
    );
    ours
}

fn no_errors(vm: &Vmm) {
    let s = vm.status().unwrap();
    assert_eq!(s.guest.errors, 0, "the guest found a bad page: {s:?}");
    assert_eq!(s.heartbeat.guest_errors, 0, "{s:?}");
    assert_eq!(s.heartbeat.gaps, 0, "the VMM saw a heartbeat gap: {s:?}");
    let Reply::Check(c) = vm.ok(Request::Check).unwrap() else {
        panic!("check answered something else")
    };
    assert_eq!(c.bad_pages, 0, "host-side page check: {c:?}");
}

/// Pages the guest wrote per second, measured over `over`.
fn dirty_rate_mib_s(vm: &Vmm, over: Duration) -> f64 {
    let a = vm.status().unwrap().guest.pages_written;
    let t = Instant::now();
    std::thread::sleep(over);
    let b = vm.status().unwrap().guest.pages_written;
    (b - a) as f64 / 256.0 / t.elapsed().as_secs_f64()
}

/// A live migration to `to` with `token`.
fn migrate(to: &str, token: &str, downtime_ms: Option<u64>, verify_memory: bool) -> Request {
    Request::Migrate(MigrateRequest {
        to: to.to_string(),
        token: token.to_string(),
        downtime_ms,
        timeout_s: None,
        verify_memory,
        confirm: false,
    })
}

/// The migration token the tests' targets are started with.
const TOKEN: &str = "5ec0e7c5ec0e7c5ec0e7c5ec0e7c5ec0e7c5ec0e7c5ec0e7c5ec0e7c5ec0e7c5";

/// A file holding [`TOKEN`] (what `--token-file` reads).
fn token_file(dir: &std::path::Path) -> String {
    let p = dir.join("migration.token");
    std::fs::write(&p, TOKEN).unwrap();
    p.display().to_string()
}

#[test]
fn test_guest_boots_and_heartbeats() {
    skip_unless!(Need::Device("/dev/kvm"));
    let dir = temp_dir("vmm-boot").unwrap();
    let obs = Observer::start().unwrap();
    let t = Instant::now();
    // The disk is a differencing VHD over a dynamic parent.
    let parent = dir.path().join("parent.vhd");
    make_disk(&parent, DiskType::Dynamic);
    let child = dir.path().join("child.vhd");
    let mut opts = vhd::CreateOptions::new(DiskType::Differencing, 0);
    opts.parent = Some(parent.clone());
    vhd::Vhd::create(&child, &opts).unwrap();
    let mut vm = Vmm::spawn(
        dir.path(),
        "vm",
        &[
            "run",
            "--memory",
            "64M",
            "--disk",
            child.to_str().unwrap(),
            "--disk-every",
            "3",
        ],
        Some(&obs),
    )
    .unwrap();
    vm.wait_heartbeats(300, Duration::from_secs(20)).unwrap();
    eprintln!("300 heartbeats {:?} after the process started", t.elapsed());
    let serial = std::fs::read_to_string(dir.path().join("vm.serial")).unwrap();
    assert!(
        serial.contains("csv test guest: up"),
        "serial console: {serial:?}"
    );
    let s = vm.status().unwrap();
    assert_eq!(s.state, Some(VmmState::Vm(RunState::Running)));
    assert!(s.heartbeat.booted);
    assert!(
        obs.beats().len() >= 250,
        "observer got {} heartbeats",
        obs.beats().len()
    );
    assert_eq!(obs.missing(), Vec::<u64>::new());
    no_errors(&vm);
    // Its disk writes went into the child; the parent is untouched.
    let last = vm.status().unwrap().guest.disk_last_seq;
    assert!(last > 0);
    vm.ok(Request::Stop).unwrap();
    vm.wait_exit(Duration::from_secs(10)).unwrap();
    let found = check_guest_disk_ours(&child, last);
    assert!(found.written > 10, "{found:?}");
    let p = vhd::Vhd::open(&parent, &vhd::OpenOptions::default()).unwrap();
    let untouched = check_disk(DISK_BLOCKS, |b, buf| {
        p.read_at(buf, b * 4096).map_err(std::io::Error::other)
    })
    .unwrap();
    assert_eq!(
        untouched.written, 0,
        "the parent was written: {untouched:?}"
    );

    // The serial console also goes to a socket a console server listens on.
    let sock = dir.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let arg = format!("unix:{}", sock.display());
    let mut child = std::process::Command::new(csv_test_support::cmd::workspace_bin("csv-vmm"))
        .args(["run", "--memory", "8M", "--serial", &arg])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&got).contains("csv test guest: up") {
        let n = std::io::Read::read(&mut conn, &mut buf).unwrap();
        assert!(n > 0, "console closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn save_and_restore_continue_the_heartbeat() {
    skip_unless!(Need::Device("/dev/kvm"));
    let dir = temp_dir("vmm-save").unwrap();
    let obs = Observer::start().unwrap();
    let disk = dir.path().join("fixed.vhd");
    make_disk(&disk, DiskType::Fixed);
    let disk_arg = disk.to_str().unwrap();
    let mut a = Vmm::spawn(
        dir.path(),
        "a",
        &[
            "run",
            "--memory",
            "128M",
            "--dirty-rate",
            "50",
            "--disk",
            disk_arg,
        ],
        Some(&obs),
    )
    .unwrap();
    a.wait_heartbeats(300, Duration::from_secs(20)).unwrap();
    let state = dir.path().join("vm.state");
    let r = a
        .summary(Request::Save {
            path: state.clone(),
            stop: true,
        })
        .unwrap();
    let saved_seq = r.heartbeat_seq;
    assert_eq!(
        a.wait_exit(Duration::from_secs(10)).unwrap(),
        0,
        "{}",
        a.log_text()
    );

    let b = Vmm::spawn(
        dir.path(),
        "b",
        &[
            "restore",
            "--from",
            state.to_str().unwrap(),
            "--disk",
            disk_arg,
        ],
        Some(&obs),
    )
    .unwrap();
    b.wait_heartbeats(300, Duration::from_secs(20)).unwrap();
    let s = b.status().unwrap();
    assert!(s.heartbeat.seq >= saved_seq + 300, "{s:?}");
    assert_eq!(
        obs.missing(),
        Vec::<u64>::new(),
        "heartbeats lost across save/restore"
    );
    let pids: std::collections::BTreeSet<u32> = obs.beats().iter().map(|b| b.pid).collect();
    assert_eq!(pids.len(), 2, "both processes reported heartbeats");
    no_errors(&b);
    let s = b.status().unwrap();
    assert!(s.guest.disk_writes > 30, "{s:?}");
    let last = s.guest.disk_last_seq;
    b.ok(Request::Stop).unwrap();
    let mut b = b;
    b.wait_exit(Duration::from_secs(10)).unwrap();
    check_guest_disk(&disk, last);

    // A damaged save file is refused with a reason, not restored.
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = dir.path().join("bad.state");
    std::fs::write(&bad, bytes).unwrap();
    let out = std::process::Command::new(csv_test_support::cmd::workspace_bin("csv-vmm"))
        .args([
            "restore",
            "--serial",
            "null",
            "--from",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum") || err.contains("CRC"), "{err}");
}

#[test]
fn live_migration_under_a_dirtying_load_loses_nothing() {
    skip_unless!(Need::Device("/dev/kvm"));
    let dir = temp_dir("vmm-live").unwrap();
    let obs = Observer::start().unwrap();
    let disk = dir.path().join("dynamic.vhd");
    make_disk(&disk, DiskType::Dynamic);
    let disk_arg = disk.to_str().unwrap();
    let mut src = Vmm::spawn(
        dir.path(),
        "src",
        &[
            "run",
            "--memory",
            "256M",
            "--dirty-rate",
            "100",
            "--disk",
            disk_arg,
            "--disk-every",
            "2",
        ],
        Some(&obs),
    )
    .unwrap();
    let port = csv_test_support::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let tok = token_file(dir.path());
    let mut dst = Vmm::spawn(
        dir.path(),
        "dst",
        &[
            "incoming",
            "--listen",
            &listen,
            "--disk",
            disk_arg,
            "--token-file",
            &tok,
        ],
        Some(&obs),
    )
    .unwrap();
    src.wait_heartbeats(200, Duration::from_secs(20)).unwrap();
    // The load is real: at least 50 MiB/s in one of three one-second
    // windows (the suite runs two tests at a time on two cores, and a
    // window in which the other test holds a core shows half the rate).
    let mut rates = Vec::new();
    while rates.len() < 3 && rates.iter().all(|r| *r < 50.0) {
        rates.push(dirty_rate_mib_s(&src, Duration::from_secs(1)));
    }
    assert!(
        rates.iter().any(|r| *r >= 50.0),
        "the guest dirties only {rates:.1?} MiB/s"
    );
    // Strangers are turned away before any of their bytes is parsed: one
    // with no token, one with a stale one; the target waits on.
    for stranger in [
        &b"CSVSTATE not a token"[..],
        &[&b"CSVMIGT1"[..], &[7u8; 32][..]].concat(),
    ] {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&listen).unwrap();
        c.write_all(stranger).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        assert!(
            matches!(c.read(&mut b), Ok(0) | Err(_)),
            "the target answered a stranger"
        );
    }
    // A source without the token is refused too.
    let r = src.request(&migrate(&listen, "", None, false), |_| {});
    assert!(matches!(r, Err(ControlError::Refused(_))), "{r:?}");

    let mut rounds = 0;
    let r = src.request(&migrate(&listen, TOKEN, None, true), |_| rounds += 1);
    let sum = match r {
        Ok(Reply::Summary(s)) => s,
        other => panic!(
            "{other:?}; source log: {}; target log: {}",
            src.log_text(),
            dst.log_text()
        ),
    };
    eprintln!("migration at {rates:.1?} MiB/s of dirtying (one-second windows before it): {sum:?}");
    assert!(rounds >= 1);
    assert!(sum.memory_crc_source.is_some());
    assert_eq!(
        sum.memory_crc_source, sum.memory_crc_target,
        "memory differs at the switch-over"
    );
    assert_eq!(
        src.wait_exit(Duration::from_secs(10)).unwrap(),
        0,
        "{}",
        src.log_text()
    );

    dst.wait_heartbeats(300, Duration::from_secs(20)).unwrap();
    assert_eq!(
        obs.missing(),
        Vec::<u64>::new(),
        "heartbeats lost in the migration"
    );
    let last_src = obs
        .beats()
        .iter()
        .filter(|b| b.pid == src.pid())
        .map(|b| b.seq)
        .max()
        .unwrap();
    let first_dst = obs
        .beats()
        .iter()
        .filter(|b| b.pid == dst.pid())
        .map(|b| b.seq)
        .min()
        .unwrap();
    assert_eq!(
        first_dst,
        last_src + 1,
        "the target continues where the source stopped"
    );
    eprintln!(
        "largest heartbeat gap seen by the observer: {:?}",
        obs.longest_gap()
    );
    no_errors(&dst);
    // The disk: writes went on from the target into the same VHD.
    let s = dst.status().unwrap();
    assert_eq!(s.guest.disk_errors, 0, "{s:?}");
    assert!(
        s.disk.is_some_and(|d| d.writes > 50),
        "the target wrote to the disk: {s:?}"
    );
    let last = s.guest.disk_last_seq;
    dst.ok(Request::Stop).unwrap();
    dst.wait_exit(Duration::from_secs(10)).unwrap();
    let found = check_guest_disk(&disk, last);
    eprintln!("disk after the migration: {found:?}");
}

#[test]
fn a_migration_killed_half_way_leaves_the_source_running() {
    skip_unless!(Need::Device("/dev/kvm"));
    let dir = temp_dir("vmm-kill").unwrap();
    let obs = Observer::start().unwrap();
    let src = Vmm::spawn(
        dir.path(),
        "src",
        &["run", "--memory", "256M", "--dirty-rate", "100"],
        Some(&obs),
    )
    .unwrap();
    let port = csv_test_support::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let tok = token_file(dir.path());
    let mut dst = Vmm::spawn(
        dir.path(),
        "dst",
        &["incoming", "--listen", &listen, "--token-file", &tok],
        None,
    )
    .unwrap();
    src.wait_heartbeats(200, Duration::from_secs(20)).unwrap();

    // The target is killed as soon as the first round of memory is across.
    let victim = dst.pid() as i32;
    let mut killed = false;
    let answer = src.request(&migrate(&listen, TOKEN, Some(0), false), |_| {
        if !killed {
            // SAFETY: plain kill(2) of the target process this test started.
            unsafe { libc::kill(victim, libc::SIGKILL) };
            killed = true;
        }
    });
    dst.kill();
    assert!(killed, "the migration never reported a round");
    let Err(ControlError::Refused(why)) = answer else {
        panic!("the migration did not fail: {answer:?}")
    };
    eprintln!("migration error as reported: {why}");

    let before = src.status().unwrap().heartbeat.local_count;
    src.wait_heartbeats(before + 300, Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        src.status().unwrap().state,
        Some(VmmState::Vm(RunState::Running))
    );
    assert_eq!(obs.missing(), Vec::<u64>::new());
    no_errors(&src);
}
