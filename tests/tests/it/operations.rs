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
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
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
        csv_test_support::cmd::run(&mut c).unwrap()
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

    // The console has seen every host Direct (it gathers once a second).
    let direct_everywhere = csv_test_support::wait_until(Duration::from_secs(10), || {
        let (code, body) = http(console, "GET", "/api/state", None);
        code == 200
            && serde_json::from_str::<Value>(&body).is_ok_and(|s| {
                s["volumes"][0]["hosts"]
                    .as_array()
                    .is_some_and(|h| h.len() == 3 && h.iter().all(|x| x["state"] == "Direct"))
            })
    });
    assert!(direct_everywhere.is_ok());

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

/// `csvctl` run on the observer's network (a thread in `ns`), with the
/// fixture's key; its output, failing on a non-zero status unless
/// `allow_fail`.
fn ctl_in(
    ns: &csv_test_support::netns::NetNs,
    cl: &CsvCluster,
    args: &[&str],
    allow_fail: bool,
) -> String {
    let out = ns.run(|| cl.csvctl().args(args).output().unwrap()).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        allow_fail || out.status.success(),
        "csvctl {args:?}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn a_cluster_joined_with_tokens_on_its_own_networks_validates_runs_a_vm_and_takes_inventory() {
    skip_unless!(
        Need::Root,
        Need::Device("/dev/fuse"),
        Need::Device("/dev/kvm"),
        Need::Command("fusermount3"),
        Need::Command("ip"),
        Need::Command("nsenter"),
        Need::Command("tgtd"),
        Need::Command("tgtadm")
    );
    use csv_test_support::netns::{Lan, NetNs};
    // Networks: a SAN, cluster networks A and B. Hosts 1 and 2 are on
    // both cluster networks, host 3 only on A (a planted fault).
    let san = Lan::new("ssan", 71).unwrap();
    let net_a = Lan::new("sna", 72).unwrap();
    let net_b = Lan::new("snb", 73).unwrap();
    let tns = NetNs::new("stgt").unwrap();
    san.attach(&tns, 100).unwrap();
    let hosts: Vec<NetNs> = (1..=3)
        .map(|i| NetNs::new(&format!("s{i}")).unwrap())
        .collect();
    let mut san_links = Vec::new();
    for (i, ns) in hosts.iter().enumerate() {
        let n = i as u8 + 1;
        san_links.push(san.attach(ns, n).unwrap());
        net_a.attach(ns, n).unwrap();
        if n != 3 {
            net_b.attach(ns, n).unwrap();
        }
    }
    let obs = NetNs::new("sobs").unwrap();
    san.attach(&obs, 10).unwrap();
    net_a.attach(&obs, 10).unwrap();
    net_b.attach(&obs, 10).unwrap();
    let portal: SocketAddr = format!("{}:3260", san.addr(100)).parse().unwrap();
    let mut tgt = csv_test_support::tgt::TgtTarget::start_on(&[portal], Some(&tns)).unwrap();
    let t = tgt.add_target("setup").unwrap();
    tgt.add_lun_file(&t, 1, &tgt.dir().join("lun1.img"), 512 * MIB)
        .unwrap();
    let nopr = tgt.add_target("nopr").unwrap();
    tgt.add_lun_cdrom(&nopr, 1, &tgt.dir().join("cd.img"), 64 * MIB)
        .unwrap();
    let (url, nopr_url) = (tgt.url(&t, 1), tgt.url(&nopr, 1));
    let addr =
        |lan: &Lan, i: u8| -> SocketAddr { format!("{}:7100", lan.addr(i)).parse().unwrap() };

    // Host 1 founds the cluster with `cluster init`.
    let mut cl = CsvCluster::new(vec![]).unwrap();
    let base = cl.dir().to_path_buf();
    let h = |i: u64| base.join(format!("host{i}"));
    let csvctl = csv_test_support::cmd::workspace_bin("csvctl");
    let console: SocketAddr = format!("{}:9480", net_a.addr(1)).parse().unwrap();
    let init = Command::new(&csvctl)
        .args(["cluster", "init", "--name", csv_test_support::csvd::CLUSTER])
        .arg("--key-file")
        .arg(h(1).join("cluster.key"))
        .args(["--listen", &addr(&net_a, 1).to_string()])
        .args(["--listen", &addr(&net_b, 1).to_string()])
        .arg("--data-dir")
        .arg(h(1).join("data"))
        .arg("--mount-root")
        .arg(h(1).join("mnt"))
        .arg("--config")
        .arg(h(1).join("csvd.toml"))
        .args(["--console", &console.to_string()])
        .output()
        .unwrap();
    let init_out = String::from_utf8_lossy(&init.stdout).into_owned();
    assert!(
        init.status.success(),
        "{init_out}{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let token = init_out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("CSV_JOIN_TOKEN="))
        .unwrap()
        .to_string();
    let key1 = h(1).join("cluster.key");
    cl.use_key_file(&key1).unwrap();
    let vm_mem = |m: &str| vec![format!("--vm-memory={m}")];
    cl.add_configured_host(
        1,
        vec![addr(&net_a, 1), addr(&net_b, 1)],
        Some(hosts[0].name().into()),
        h(1).join("csvd.toml"),
    );
    cl.host_args.insert(1, vm_mem("2G"));
    cl.start(1).unwrap();

    // Hosts 2 and 3 join with the token, from their own networks.
    for i in [2u8, 3] {
        let mut listen = vec![addr(&net_a, i)];
        if i != 3 {
            listen.push(addr(&net_b, i));
        }
        let hd = h(u64::from(i));
        let out = hosts[usize::from(i) - 1]
            .run(|| {
                let mut c = Command::new(&csvctl);
                // Host 2 takes the token from the environment (out of the
                // process list), host 3 as an argument.
                if i == 2 {
                    c.args(["node", "join"]).env("CSV_JOIN_TOKEN", &token);
                } else {
                    c.args(["node", "join", &token]);
                }
                for a in &listen {
                    c.args(["--listen", &a.to_string()]);
                }
                c.arg("--key-file")
                    .arg(hd.join("cluster.key"))
                    .arg("--data-dir")
                    .arg(hd.join("data"))
                    .arg("--mount-root")
                    .arg(hd.join("mnt"))
                    .arg("--config")
                    .arg(hd.join("csvd.toml"))
                    .output()
                    .unwrap()
            })
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "join of host {i}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&format!("as host {i}")), "{text}");
        assert_eq!(
            std::fs::read(hd.join("cluster.key")).unwrap(),
            std::fs::read(&key1).unwrap(),
            "host {i} got the cluster key"
        );
        cl.add_configured_host(
            u64::from(i),
            listen,
            Some(hosts[usize::from(i) - 1].name().into()),
            hd.join("csvd.toml"),
        );
        cl.host_args.insert(u64::from(i), vm_mem("512M"));
        cl.start(u64::from(i)).unwrap();
    }
    // A forged token is refused.
    let forged = format!(
        "{}{}",
        &token[..token.len() - 2],
        if token.ends_with("00") { "11" } else { "00" }
    );
    let out = hosts[2]
        .run(|| {
            Command::new(&csvctl)
                .args(["node", "join", &forged, "--listen", "10.0.0.1:1"])
                .arg("--key-file")
                .arg(cl.dir().join("forged.key"))
                .arg("--config")
                .arg(cl.dir().join("forged.toml"))
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused the token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!cl.dir().join("forged.key").exists());

    // Every host becomes a voter; the volume mounts everywhere.
    obs.run(|| {
        csv_test_support::wait_until(Duration::from_secs(30), || {
            cl.status(1).is_ok_and(|s| {
                s.groups
                    .iter()
                    .any(|g| g.group == 0 && g.voters == vec![1, 2, 3])
            })
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e:?}: {:?}\nhost 1:\n{}\nhost 2:\n{}\nhost 3:\n{}",
                cl.status(1),
                cl.log_tail(1, 15),
                cl.log_tail(2, 400)
                    .lines()
                    .filter(|l| !l.contains(" INFO raft"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                cl.log_tail(3, 15)
            )
        });
        cl.add_volume_url(&url, 1).unwrap();
        cl.wait_mounted(1, Duration::from_secs(30)).unwrap();
    })
    .unwrap();

    // A VM runs on host 1 (768 MiB: more than hosts 2 and 3 offer).
    let mk_vhd = |name: &str| {
        vhd::Vhd::create(
            cl.mountpoint(1, 1).join(name),
            &vhd::CreateOptions::new(vhd::footer::DiskType::Dynamic, 16 * MIB),
        )
        .unwrap();
        format!("/ClusterStorage/Volume1/{name}")
    };
    let big = mk_vhd("big.vhd");
    ctl_in(
        &obs,
        &cl,
        &[
            "vm", "add", "big", "--memory", "768M", "--disk", &big, "--owner", "web-team",
        ],
        false,
    );
    ctl_in(&obs, &cl, &["vm", "start", "big", "--on", "1"], false);
    obs.run(|| {
        csv_test_support::wait_until(Duration::from_secs(30), || {
            let s: Value = serde_json::from_str(&String::from_utf8_lossy(
                &cl.csvctl()
                    .args(["vm", "status", "big", "--json"])
                    .output()
                    .unwrap()
                    .stdout,
            ))
            .unwrap_or(Value::Null);
            s["runtime"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|x| x["state"] == "running" && x["heartbeats"].as_u64().unwrap_or(0) > 0)
            })
        })
        .unwrap();
    })
    .unwrap();
    eprintln!("VM big runs on host 1");

    // Planted: host 3 loses its SAN link (and writes, so it notices).
    san_links[2].down().unwrap();
    let f = cl.mountpoint(3, 1).join("from3.bin");
    std::fs::write(&f, vec![3u8; MIB as usize]).unwrap();
    std::fs::File::open(&f).unwrap().sync_all().unwrap();

    // Validate: each planted fault FAILs with its fix; sound parts PASS.
    let text = ctl_in(&obs, &cl, &["validate", "--lun", &nopr_url], true);
    eprintln!("{text}");
    let v: Value = serde_json::from_str(&ctl_in(
        &obs,
        &cl,
        &["validate", "--lun", &nopr_url, "--json"],
        true,
    ))
    .unwrap();
    let find = |check: &str, scope: &str| -> Value {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == check && c["scope"] == scope)
            .cloned()
            .unwrap_or_else(|| panic!("no {check} check for {scope}: {v:#}"))
    };
    let fails = |check: &str, scope: &str, fix: &str| {
        let c = find(check, scope);
        assert_eq!(c["result"], "FAIL", "{c:#}");
        assert!(c["fix"].as_str().unwrap().contains(fix), "{c:#}");
    };
    fails(
        "san-path",
        "Volume1 on host 3",
        "restore the host's SAN path",
    );
    fails("networks", "host 3", "second address on another network");
    fails(
        "fencing",
        &format!("LUN {nopr_url} on host 1"),
        "enable SPC-3 persistent reservations",
    );
    fails("failover-memory", "host 1", "add memory or a host");
    for (check, scope) in [
        ("san-path", "Volume1 on host 1"),
        ("fencing", "Volume1 on host 1"),
        ("networks", "host 1"),
        ("networks", "host 2"),
        ("quorum", "group cluster"),
        ("quorum", "group Volume1"),
        ("clock", "host 2"),
        ("version", "host 3"),
        ("kvm", "host 1"),
    ] {
        assert_eq!(
            find(check, scope)["result"],
            "PASS",
            "{check} {scope}: {v:#}"
        );
    }

    // Inventory: planted sprawl, each flagged, with what it frees.
    let idle = mk_vhd("idle.vhd");
    ctl_in(
        &obs,
        &cl,
        &["vm", "add", "idle", "--memory", "256M", "--disk", &idle],
        false,
    );
    let temp = mk_vhd("temp.vhd");
    ctl_in(
        &obs,
        &cl,
        &[
            "vm",
            "add",
            "temp",
            "--memory",
            "256M",
            "--disk",
            &temp,
            "--expires",
            "+1s",
        ],
        false,
    );
    let soon = mk_vhd("soon.vhd");
    ctl_in(
        &obs,
        &cl,
        &[
            "vm",
            "add",
            "soon",
            "--memory",
            "256M",
            "--disk",
            &soon,
            "--expires",
            "+3d",
            "--owner",
            "bob",
        ],
        false,
    );
    let orphan = cl.mountpoint(1, 1).join("orphan.vhd");
    mk_vhd("orphan.vhd");
    {
        let mut o = std::fs::OpenOptions::new()
            .write(true)
            .open(&orphan)
            .unwrap();
        use std::io::{Seek, SeekFrom};
        o.seek(SeekFrom::Start(MIB)).unwrap();
        o.write_all(&vec![9u8; 4 * MIB as usize]).unwrap();
        o.sync_all().unwrap();
    }
    ctl_in(
        &obs,
        &cl,
        &["snapshot", "create", "1", "--name", "forgotten"],
        false,
    );
    std::thread::sleep(Duration::from_millis(2500));
    let mount_root = h(1).join("mnt");
    let inv_args = [
        "inventory",
        "--stopped-for",
        "1s",
        "--snapshot-age",
        "1s",
        "--mount-root",
        mount_root.to_str().unwrap(),
    ];
    eprintln!("{}", ctl_in(&obs, &cl, &inv_args, true));
    let mut json_args = inv_args.to_vec();
    json_args.push("--json");
    let inv: Value = serde_json::from_str(&ctl_in(&obs, &cl, &json_args, true)).unwrap();
    let flagged = |kind: &str, subject: &str| -> Value {
        inv["flags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["kind"] == kind && f["subject"] == subject)
            .cloned()
            .unwrap_or_else(|| panic!("{kind} {subject} not flagged: {inv:#}"))
    };
    flagged("stopped", "idle");
    flagged("expired", "temp");
    flagged("expires-soon", "soon");
    let o = flagged("unattached-vhd", "Volume1/orphan.vhd");
    assert!(o["frees_storage"].as_u64().unwrap() >= 4 * MIB, "{o:#}");
    flagged("old-snapshot", "Volume1@forgotten");
    let b = flagged("over-provisioned", "big");
    assert!(b["frees_memory"].as_u64().unwrap() >= 256 * MIB, "{b:#}");
    assert!(
        inv["frees_storage"].as_u64().unwrap() >= o["frees_storage"].as_u64().unwrap(),
        "{inv:#}"
    );
    assert!(inv["frees_memory"].as_u64().unwrap() >= b["frees_memory"].as_u64().unwrap());
    // Used disks are not flagged; the VMs are listed with their owners.
    for used in ["Volume1/big.vhd", "Volume1/idle.vhd"] {
        assert!(
            !inv["flags"].to_string().contains(&format!("\"{used}\"")),
            "{used} flagged: {inv:#}"
        );
    }
    let big_row = inv["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "big")
        .unwrap();
    assert_eq!(big_row["owner"], "web-team");
    assert_eq!(big_row["host"], 1);
    assert!(big_row["cost_month"].as_f64().unwrap() > 0.0);

    // The console of host 1 (on cluster network A, not loopback) needs the
    // operator token to be read at all; with it, it lists the VM.
    let (code, _) = obs
        .run(|| http(console, "GET", "/api/state", None))
        .unwrap();
    assert_eq!(code, 401, "an off-loopback console read without the token");
    let token = ctl_in(&obs, &cl, &["cluster", "console-token"], false);
    let token = token.trim();
    let (code, _) = obs
        .run(|| http(console, "GET", "/api/state?token=0000", None))
        .unwrap();
    assert_eq!(code, 401, "a wrong token");
    let (code, body) = obs
        .run(|| http(console, "GET", "/api/state", Some(token)))
        .unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"name\":\"big\""), "{body}");
    san_links[2].up().unwrap();
    ctl_in(&obs, &cl, &["vm", "stop", "big"], false);
}

#[test]
fn a_host_joins_with_a_token_from_cluster_token_and_node_remove_evicts_it() {
    skip_unless!(Need::Root);
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.start_all().unwrap();
    let ctl = |cl: &CsvCluster, args: &[&str]| -> (bool, String) {
        let out = cl.csvctl().args(args).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    cl.wait_leader(0, Duration::from_secs(10)).unwrap();
    let (ok, token) = ctl(&cl, &["cluster", "token", "--ttl", "10m"]);
    assert!(ok, "{token}");
    let token = token.lines().next().unwrap().trim().to_string();
    let h4 = cl.host_dir(4);
    let listen: SocketAddr = format!("127.0.0.1:{}", csv_test_support::free_port().unwrap())
        .parse()
        .unwrap();
    let (ok, out) = ctl(
        &cl,
        &[
            "node",
            "join",
            &token,
            "--listen",
            &listen.to_string(),
            "--key-file",
            h4.join("cluster.key").to_str().unwrap(),
            "--data-dir",
            h4.join("data").to_str().unwrap(),
            "--mount-root",
            h4.join("mnt").to_str().unwrap(),
            "--config",
            h4.join("csvd.toml").to_str().unwrap(),
        ],
    );
    assert!(ok && out.contains("as host 4"), "{out}");
    // A second join with the same files is refused before anything is sent.
    let (ok, again) = ctl(
        &cl,
        &[
            "node",
            "join",
            &token,
            "--listen",
            "127.0.0.1:1",
            "--key-file",
            h4.join("cluster.key").to_str().unwrap(),
            "--config",
            h4.join("other.toml").to_str().unwrap(),
        ],
    );
    assert!(
        !ok && again.contains("already belongs to a cluster"),
        "{again}"
    );
    cl.add_configured_host(4, vec![listen], None, h4.join("csvd.toml"));
    cl.start(4).unwrap();
    let voters = |cl: &CsvCluster| -> Vec<u64> {
        cl.status(1)
            .ok()
            .and_then(|s| s.groups.into_iter().find(|g| g.group == 0))
            .map(|g| g.voters)
            .unwrap_or_default()
    };
    csv_test_support::wait_until(Duration::from_secs(20), || voters(&cl) == vec![1, 2, 3, 4])
        .unwrap_or_else(|e| panic!("{e:?}: {:?}", voters(&cl)));
    assert_eq!(
        std::fs::read_to_string(h4.join("data/FORMAT")).unwrap(),
        "csv-state 1.0\n"
    );
    // The founders enter the registry a moment after the first election.
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client().cluster_info().is_ok_and(|i| i.nodes.len() == 4)
    })
    .unwrap();
    // Host 4 leads the cluster group for a moment: removing it moves the
    // leadership away first.
    cl.client().transfer_leader(0, 4).unwrap();
    let (ok, out) = ctl(&cl, &["node", "remove", "4"]);
    assert!(ok, "{out}");
    csv_test_support::wait_until(Duration::from_secs(10), || voters(&cl) == vec![1, 2, 3])
        .unwrap_or_else(|e| panic!("{e:?}: {:?}", voters(&cl)));
    let (ok, out) = ctl(&cl, &["cluster", "nodes"]);
    assert!(ok && !out.contains(&listen.to_string()), "{out}");
    // Its id is not given again, and removing it twice says so.
    let (ok, out) = ctl(&cl, &["node", "remove", "4"]);
    assert!(!ok && out.contains("removed already"), "{out}");
    let mut c = cl.client();
    let e = c.add_node(4, vec![listen.to_string()]).unwrap_err();
    assert!(format!("{e:?}").contains("removed"), "{e:?}");
    cl.stop(4).unwrap();
}
