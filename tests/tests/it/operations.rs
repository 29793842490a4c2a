//! Operating a cluster: the web console in a real browser, a cluster set
//! up with join tokens on networks of its own, `csvctl validate` against
//! planted faults, `csvctl inventory` against planted sprawl.

use csv_test_support::csvd::CsvCluster;
use csv_test_support::{skip_unless, Need};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Where tests leave files for people to look at (`target/test-artifacts`).
fn artifacts() -> PathBuf {
    let bin = csv_test_support::cmd::workspace_bin("csvctl");
    let dir = bin
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("test-artifacts"))
        .unwrap_or_else(|| PathBuf::from("target/test-artifacts"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One HTTP request; (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, body)
}

/// The page after its script ran, as headless Chromium sees it; and a
/// screenshot at `shot`.
fn browse(url: &str, shot: &Path, netns: Option<&str>) -> String {
    let run = |extra: &[String]| {
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg("--")
                    .arg("chromium-headless-shell");
                c
            }
            None => Command::new("chromium-headless-shell"),
        };
        c.args([
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--window-size=1280,1000",
        ])
        .args(extra)
        .arg(url);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = run(&["--dump-dom".to_string()]);
    run(&[format!("--screenshot={}", shot.display())]);
    dom
}

#[test]
fn the_console_shows_a_host_redirected_after_its_san_path_is_cut() {
    skip_unless!(
        Need::Root,
        Need::Device("/dev/fuse"),
        Need::Command("fusermount3"),
        Need::Command("tgtd"),
        Need::Command("tgtadm"),
        Need::Command("chromium-headless-shell")
    );
    let mut tgt = csv_test_support::tgt::TgtTarget::start().unwrap();
    let t = tgt.add_target("csvconsole").unwrap();
    let backing = tgt.dir().join("lun1.img");
    tgt.add_lun_file(&t, 1, &backing, 256 * MIB).unwrap();
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.mounts = true;
    let console: SocketAddr = format!("127.0.0.1:{}", csv_test_support::free_port().unwrap())
        .parse()
        .unwrap();
    cl.host_args.insert(
        1,
        vec![format!("--console={console}"), "--console-actions".into()],
    );
    cl.start_all().unwrap();
    cl.add_volume_url(&tgt.url(&t, 1), 1).unwrap();
    cl.wait_mounted(1, Duration::from_secs(30)).unwrap();

    // Host 2 loses its SAN path; its next writes go through a peer.
    let host2 = tgt
        .connections(&t)
        .unwrap()
        .into_iter()
        .map(|c| c.initiator)
        .find(|i| i.ends_with("-node2"))
        .unwrap();
    tgt.cut_initiator(&t, &host2).unwrap();
    let f = cl.mountpoint(2, 1).join("after-cut.bin");
    std::fs::write(&f, vec![7u8; MIB as usize]).unwrap();
    std::fs::File::open(&f).unwrap().sync_all().unwrap();
    csv_test_support::wait_until(Duration::from_secs(15), || {
        cl.volume_state(2, 1)
            .is_some_and(|s| s.0 == "BlockRedirected")
    })
    .unwrap();

    // The JSON the page reads says so, and so does the page in a browser.
    let start = Instant::now();
    let state = loop {
        let (code, body) = http(console, "GET", "/api/state", None);
        assert_eq!(code, 200, "{body}");
        let s: Value = serde_json::from_str(&body).unwrap();
        let h2 = s["volumes"][0]["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == 2)
            .cloned()
            .unwrap();
        if h2["state"] == "BlockRedirected" {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s:#}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let events = state["events"].to_string();
    assert!(
        events.contains("Volume1 on host 2: Direct → BlockRedirected"),
        "{events}"
    );
    let shot = artifacts().join("console-redirected.png");
    let _ = std::fs::remove_file(&shot);
    let dom = browse(&format!("http://{console}/"), &shot, None);
    assert!(
        dom.contains(r#"data-volume="1" data-host="2" data-state="BlockRedirected""#),
        "the page does not show host 2 redirected:\n{dom}"
    );
    for h in [1, 3] {
        assert!(
            dom.contains(&format!(
                r#"data-volume="1" data-host="{h}" data-state="Direct""#
            )),
            "host {h}:\n{dom}"
        );
    }
    assert!(dom.contains("own path failed"), "the reason is shown");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "screenshot"
    );
    eprintln!(
        "console screenshot: {} ({} bytes)",
        shot.display(),
        png.len()
    );

    // Metrics: the mode and the bytes that went through a peer.
    let metrics = |addr| http(addr, "GET", "/metrics", None).1;
    let m = metrics(console);
    assert!(m.contains("csv_raft_is_leader{host=\"1\""), "{m}");
    assert!(m.contains("csv_volume_leases{host=\"1\",group=\"Volume1\",kind=\"write\"}"));
    assert!(m.contains("csv_host_up{host=\"2\"} 1"), "{m}");
    // Host 1's own I/O is direct; the redirected bytes are host 2's.
    assert!(m.contains("csv_volume_mode{host=\"1\",volume=\"Volume1\",mode=\"Direct\"} 1"));

    // Actions: refused without the operator token, let through with it.
    let (code, _) = http(console, "POST", "/api/vms/nope/migrate?to=2", None);
    assert_eq!(code, 401);
    let (code, _) = http(console, "POST", "/api/vms/nope/migrate?to=2", Some("0000"));
    assert_eq!(code, 401);
    let out = cl
        .csvctl()
        .args(["cluster", "console-token"])
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap();
    let (code, body) = http(
        console,
        "POST",
        "/api/vms/nope/migrate?to=2",
        Some(token.trim()),
    );
    assert_eq!(code, 400, "authorized, and the VM does not exist: {body}");
    assert!(body.contains("no VM role"), "{body}");
    // A malformed request gets a 400, not a dropped server.
    let mut s = TcpStream::connect(console).unwrap();
    s.write_all(b"\xff\xfe garbage\r\n\r\n").unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(http(console, "GET", "/api/state", None).0, 200);
    tgt.restore_initiator(&t, &host2).unwrap();
}
