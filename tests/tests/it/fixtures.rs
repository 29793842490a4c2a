//! The fixtures prove themselves: tgtd answers real initiators (libiscsi's
//! tools), CHAP and cuts are enforced, and a downed link stops traffic.

use csv_test_support::cmd::{output, run};
use csv_test_support::netns::{Lan, NetNs};
use csv_test_support::tgt::TgtTarget;
use csv_test_support::{skip_unless, wait_until, Need};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn target_with_lun(name: &str) -> (TgtTarget, csv_test_support::tgt::Target) {
    let mut tgt = TgtTarget::start().unwrap();
    let t = tgt.add_target(name).unwrap();
    let lun = tgt.dir().join("lun1.img");
    tgt.add_lun_file(&t, 1, &lun, 64 * MIB).unwrap();
    (tgt, t)
}

fn inq(initiator: &str, url: &str) -> bool {
    output(Command::new("iscsi-inq").args(["-i", initiator, url]))
        .unwrap()
        .status
        .success()
}

/// A long-running libiscsi session (`iscsi-perf` reading), as initiator.
struct PerfSession(Child);

impl PerfSession {
    fn start(initiator: &str, url: &str) -> Self {
        let c = Command::new("iscsi-perf")
            .args(["-i", initiator, "-t", "60", "-x", "0", url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        PerfSession(c)
    }
}

impl Drop for PerfSession {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tgt_serves_a_file_lun_to_libiscsi() {
    skip_unless!(Need::Root, Need::Command("tgtd"), Need::Command("iscsi-ls"));
    let (tgt, t) = target_with_lun("lists");
    let out =
        run(Command::new("iscsi-ls").args(["-s", &format!("iscsi://{}", tgt.portal())])).unwrap();
    assert!(out.contains(&t.iqn), "{out}");
    assert!(
        out.contains("Lun:1") && out.contains("DIRECT_ACCESS"),
        "{out}"
    );
    assert!(inq("iqn.2026-11.io.csv.test:i1", &tgt.url(&t, 1)));
}

#[test]
fn tgt_null_lun_for_speed_tests() {
    skip_unless!(Need::Root, Need::Command("tgtd"), Need::Command("iscsi-ls"));
    let mut tgt = TgtTarget::start().unwrap();
    let t = tgt.add_target("null").unwrap();
    tgt.add_lun_null(&t, 1).unwrap();
    let out =
        run(Command::new("iscsi-ls").args(["-s", &format!("iscsi://{}", tgt.portal())])).unwrap();
    assert!(out.contains("Lun:1"), "{out}");
}

#[test]
fn tgt_chap_refuses_a_wrong_secret() {
    skip_unless!(
        Need::Root,
        Need::Command("tgtd"),
        Need::Command("iscsi-inq")
    );
    let (mut tgt, t) = target_with_lun("chap");
    tgt.set_chap(&t, "alice", "correct-horse-1").unwrap();
    let p = tgt.portal();
    let good = format!("iscsi://alice%correct-horse-1@{p}/{}/1", t.iqn);
    let bad = format!("iscsi://alice%wrong-secret-1@{p}/{}/1", t.iqn);
    assert!(inq("iqn.2026-11.io.csv.test:i1", &good));
    assert!(!inq("iqn.2026-11.io.csv.test:i1", &bad));
    assert!(!inq("iqn.2026-11.io.csv.test:i1", &tgt.url(&t, 1)));
}

#[test]
fn tgt_digests_are_configured() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (mut tgt, t) = target_with_lun("digest");
    tgt.set_digests(&t, true, true).unwrap();
    let show = tgt
        .tgtadm(&[
            "--op",
            "show",
            "--mode",
            "target",
            "--tid",
            &t.tid.to_string(),
        ])
        .unwrap();
    assert!(show.contains("HeaderDigest=CRC32C"), "{show}");
    assert!(show.contains("DataDigest=CRC32C"), "{show}");
}

#[test]
fn tgt_cut_drops_one_initiator_and_restore_lets_it_back() {
    skip_unless!(
        Need::Root,
        Need::Command("tgtd"),
        Need::Command("iscsi-perf"),
        Need::Command("iscsi-inq")
    );
    let (mut tgt, t) = target_with_lun("cut");
    let url = tgt.url(&t, 1);
    let (a, b) = (
        "iqn.2026-11.io.csv.test:host-a",
        "iqn.2026-11.io.csv.test:host-b",
    );
    let _pa = PerfSession::start(a, &url);
    let _pb = PerfSession::start(b, &url);
    let logged_in = |tgt: &TgtTarget, who: &str| {
        tgt.connections(&t)
            .unwrap()
            .iter()
            .any(|c| c.initiator == who)
    };
    wait_until(Duration::from_secs(10), || {
        logged_in(&tgt, a) && logged_in(&tgt, b)
    })
    .unwrap();

    tgt.cut_initiator(&t, a).unwrap();
    // a's connection is gone and stays gone (it cannot log in again); b's
    // session is untouched.
    wait_until(Duration::from_secs(5), || !logged_in(&tgt, a)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!logged_in(&tgt, a));
    assert!(logged_in(&tgt, b));
    assert!(!inq(a, &url), "a cut initiator must not log in");

    tgt.restore_initiator(&t, a).unwrap();
    assert!(inq(a, &url), "a restored initiator logs in again");
}

#[test]
fn tgt_restart_brings_back_the_same_target() {
    skip_unless!(
        Need::Root,
        Need::Command("tgtd"),
        Need::Command("iscsi-inq")
    );
    let (mut tgt, t) = target_with_lun("restart");
    tgt.set_chap(&t, "bob", "restart-secret").unwrap();
    let url = format!("iscsi://bob%restart-secret@{}/{}/1", tgt.portal(), t.iqn);
    assert!(inq("iqn.2026-11.io.csv.test:i1", &url));
    let old = tgt.pid().unwrap();
    tgt.restart(Duration::from_millis(200)).unwrap();
    assert_ne!(tgt.pid().unwrap(), old);
    assert!(inq("iqn.2026-11.io.csv.test:i1", &url));
}

#[test]
fn tgt_stop_leaves_no_daemon() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (mut tgt, _t) = target_with_lun("stop");
    let pid = tgt.pid().unwrap();
    let portal = tgt.portal();
    tgt.stop().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(TcpStream::connect_timeout(&portal, Duration::from_millis(200)).is_err());
}

fn connects(ns: &NetNs, to: SocketAddr) -> bool {
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(500)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut b = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"pong"
    })
    .unwrap()
}

#[test]
fn netns_downed_link_stops_traffic_until_up() {
    skip_unless!(Need::Root, Need::Command("ip"));
    let lan = Lan::new("fx", 1).unwrap();
    let h1 = NetNs::new("h1").unwrap();
    let h2 = NetNs::new("h2").unwrap();
    let _l1 = lan.attach(&h1, 1).unwrap();
    let l2 = lan.attach(&h2, 2).unwrap();
    let addr: SocketAddr = format!("{}:7000", lan.addr(1)).parse().unwrap();
    let listener = h1.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(b"pong");
            }
        }
    });
    assert!(connects(&h2, addr));
    l2.down().unwrap();
    assert!(!connects(&h2, addr), "traffic crossed a downed link");
    l2.up().unwrap();
    wait_until(Duration::from_secs(5), || connects(&h2, addr)).unwrap();
}

#[test]
fn netns_are_removed_on_drop() {
    skip_unless!(Need::Root, Need::Command("ip"));
    let name = {
        let ns = NetNs::new("drop").unwrap();
        let list = run(Command::new("ip").args(["netns", "list"])).unwrap();
        assert!(list.contains(ns.name()));
        ns.name().to_string()
    };
    let list = run(Command::new("ip").args(["netns", "list"])).unwrap();
    assert!(!list.contains(&name), "{list}");
}
