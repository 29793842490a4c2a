//! The coordinator service as separate `csvd` processes: leader crashes
//! under a stream of metadata writes, a whole-cluster restart, a
//! partitioned minority, leader transfer, a host joining, and peers
//! without the cluster key.

use coordinator::client::{Client, ClientError};
use coordinator::meta::ROOT;
use coordinator::proto::{ErrorCode, NodeKind, RaftRole, VolumeInfo};
use coordinator::wire::{Identity, Key};
use csv_test_support::csvd::CsvCluster;
use csv_test_support::netns::{Lan, NetNs};
use csv_test_support::{skip_unless, Need};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VOL: u64 = 1;

fn volume(number: u64) -> VolumeInfo {
    VolumeInfo {
        number,
        lun: format!("/tmp/csvt-lun{number}"),
        data_start: 1 << 20,
        capacity: 1 << 30,
        voters: vec![],
        now: 0,
    }
}

fn names(c: &mut Client, dir: u64) -> BTreeSet<String> {
    c.readdir(VOL, dir)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

#[derive(Default)]
struct WriterLog {
    acked: Vec<String>,
    errors: Vec<String>,
    longest_gap: Duration,
}

/// Creates files `f0, f1, ...` in Volume1 until told to stop.
fn writer(mut c: Client, stop: Arc<AtomicBool>, log: Arc<Mutex<WriterLog>>) {
    c.timeout = Duration::from_secs(20);
    let mut last_ok = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("f{i}");
        i += 1;
        let r = c.create(VOL, ROOT, &name, NodeKind::File, 0o644, "");
        let mut l = log.lock().unwrap();
        match r {
            Ok(_) => {
                l.acked.push(name);
                l.longest_gap = l.longest_gap.max(last_ok.elapsed());
                last_ok = Instant::now();
            }
            Err(e) => l.errors.push(format!("{name}: {e}")),
        }
    }
}

/// Kills the leader of Volume1 `kills` times while a client creates files,
/// restarting each killed host; then restarts the whole cluster and checks
/// that every replica holds exactly the acknowledged files.
fn leader_kill_loop(hosts: usize, kills: usize) {
    let mut cl = CsvCluster::loopback(hosts).unwrap();
    // Small snapshots, so compaction and snapshot installs happen too.
    cl.extra_args = vec!["--snapshot-every".into(), "64".into()];
    cl.start_all().unwrap();
    let mut c = cl.client();
    c.add_volume(volume(VOL)).unwrap();
    cl.wait_leader(VOL, Duration::from_secs(10)).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(WriterLog::default()));
    let w = {
        let (c, stop, log) = (cl.client(), stop.clone(), log.clone());
        std::thread::spawn(move || writer(c, stop, log))
    };
    let mut elections = Vec::new();
    for k in 0..kills {
        let leader = cl.wait_leader(VOL, Duration::from_secs(10)).unwrap();
        cl.kill(leader).unwrap();
        let t = Instant::now();
        let new = loop {
            match cl.leader_of(VOL) {
                Some(l) if l != leader => break l,
                _ => {}
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "kill {k}: no new leader 10 s after killing host {leader}\n{}",
                cl.log_tail(leader % hosts as u64 + 1, 30)
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        elections.push(t.elapsed());
        eprintln!(
            "kill {k}: host {leader} killed, host {new} leads after {:?}",
            t.elapsed()
        );
        cl.start(leader).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());
    let slowest = elections.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{hosts} hosts, {kills} leader kills: {} creates acknowledged; new leader after at most {slowest:?}; longest client stall {:?}",
        log.acked.len(),
        log.longest_gap
    );
    assert!(
        log.errors.is_empty(),
        "{} failed creates, the first: {:?}",
        log.errors.len(),
        &log.errors[..log.errors.len().min(10)]
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a new leader took {slowest:?} (elections: {elections:?})"
    );
    assert!(log.acked.len() > kills, "too few writes to mean anything");
    let acked: BTreeSet<String> = log.acked.iter().cloned().collect();
    assert_eq!(
        acked.len(),
        log.acked.len(),
        "a name was acknowledged twice"
    );

    // Every acknowledged create is there, and nothing else: a create applied
    // twice would have failed with "exists", one lost would be missing.
    assert_eq!(names(&mut c, ROOT), acked);

    // Restart the whole cluster from disk: the same state.
    let ids: Vec<u64> = cl.hosts.iter().map(|h| h.id).collect();
    for &id in &ids {
        cl.kill(id).unwrap();
    }
    cl.start_all().unwrap();
    let mut c = cl.client();
    assert_eq!(names(&mut c, ROOT), acked, "state after a full restart");

    // Each replica, made leader in turn, serves the same namespace: leader
    // transfer to a named host completes and is reported.
    for &id in &ids {
        c.transfer_leader(VOL, id)
            .unwrap_or_else(|e| panic!("transfer to host {id}: {e}"));
        assert_eq!(cl.leader_of(VOL), Some(id));
        assert_eq!(names(&mut c, ROOT), acked, "replica on host {id}");
    }
}

#[test]
fn three_hosts_survive_twenty_leader_kills() {
    skip_unless!(Need::Command("true"));
    leader_kill_loop(3, 20);
}

#[test]
fn five_hosts_survive_twenty_leader_kills() {
    skip_unless!(Need::Command("true"));
    leader_kill_loop(5, 20);
}

#[test]
fn a_partitioned_minority_cannot_commit_while_the_majority_does() {
    skip_unless!(Need::Root, Need::Command("ip"));
    let lan = Lan::new("raft", 41).unwrap();
    let nss: Vec<NetNs> = (1..=3)
        .map(|i| NetNs::new(&format!("raft{i}")).unwrap())
        .collect();
    let links: Vec<_> = nss
        .iter()
        .enumerate()
        .map(|(i, ns)| lan.attach(ns, i as u8 + 1).unwrap())
        .collect();
    let cns = NetNs::new("raftc").unwrap();
    let _clink = lan.attach(&cns, 10).unwrap();
    let addr = |i: usize| -> SocketAddr { format!("{}:7100", lan.addr(i as u8)).parse().unwrap() };
    let specs = (1..=3)
        .map(|i| (i as u64, vec![addr(i)], Some(nss[i - 1].name().to_string())))
        .collect();
    let mut cl = CsvCluster::new(specs).unwrap();
    cl.start_all().unwrap();
    let id = cl.identity();

    // Volume1, led by host 3, with one file.
    cns.run(|| {
        let mut c = cl.client();
        c.add_volume(volume(VOL)).unwrap();
        cl.wait_leader(VOL, Duration::from_secs(10)).unwrap();
        c.transfer_leader(VOL, 3).unwrap();
        c.create(VOL, ROOT, "before", NodeKind::File, 0o644, "")
            .unwrap();
    })
    .unwrap();

    // Cut host 3 (the leader) off.
    links[2].down().unwrap();

    // The majority elects a leader and commits.
    let majority = cns
        .run(|| {
            let mut c = Client::new(id.clone(), vec![addr(1), addr(2)]);
            c.timeout = Duration::from_secs(15);
            let t = Instant::now();
            c.create(VOL, ROOT, "majority", NodeKind::File, 0o644, "")
                .unwrap();
            t.elapsed()
        })
        .unwrap();
    eprintln!("majority committed {majority:?} after the partition");

    // The minority cannot: its client gets no answer, and host 3 stops
    // leading once it cannot hear a quorum (check_quorum).
    let minority = nss[2]
        .run(|| {
            let mut c = Client::new(id.clone(), vec![addr(3)]);
            c.timeout = Duration::from_secs(3);
            c.attempt_timeout = Duration::from_secs(1);
            c.create(VOL, ROOT, "minority", NodeKind::File, 0o644, "")
        })
        .unwrap();
    assert!(
        matches!(minority, Err(ClientError::Unavailable { .. })),
        "the minority answered: {minority:?}"
    );
    let s3 = nss[2].run(|| cl.status(3).unwrap()).unwrap();
    let g3 = s3.groups.iter().find(|g| g.group == VOL).unwrap().clone();
    assert_ne!(
        g3.role(),
        RaftRole::Leader,
        "host 3 still leads without a quorum"
    );

    // Heal: host 3 catches up and learns the majority's file; the
    // minority's create never happened.
    links[2].up().unwrap();
    cns.run(|| {
        let mut c = cl.client();
        c.timeout = Duration::from_secs(15);
        let caught_up = csv_test_support::wait_until(Duration::from_secs(15), || {
            let (Ok(s1), Ok(s3)) = (cl.status(1), cl.status(3)) else {
                return false;
            };
            let a = |s: &coordinator::proto::NodeStatus| {
                s.groups.iter().find(|g| g.group == VOL).map(|g| g.applied)
            };
            a(&s3).is_some() && a(&s3) >= a(&s1)
        });
        assert!(caught_up.is_ok(), "host 3 did not catch up after the heal");
        c.transfer_leader(VOL, 3).unwrap();
        let n = names(&mut c, ROOT);
        assert!(n.contains("before") && n.contains("majority"), "{n:?}");
        assert!(!n.contains("minority"), "the minority committed: {n:?}");
    })
    .unwrap();
}

#[test]
fn a_new_host_joins_as_learner_then_voter() {
    skip_unless!(Need::Command("true"));
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.start_all().unwrap();
    let mut c = cl.client();
    c.add_volume(volume(VOL)).unwrap();
    for i in 0..50 {
        c.create(VOL, ROOT, &format!("g{i}"), NodeKind::File, 0o644, "")
            .unwrap();
    }
    let port = csv_test_support::free_port().unwrap();
    let a4 = SocketAddr::from(([127, 0, 0, 1], port));
    cl.add_host(4, vec![a4], None);
    cl.start(4).unwrap();
    c.add_node(4, vec![a4.to_string()]).unwrap();
    let joined = csv_test_support::wait_until(Duration::from_secs(20), || {
        let Ok(s) = cl.status(4) else { return false };
        s.groups.len() == 2
            && s.groups
                .iter()
                .all(|g| g.voters.contains(&4) && g.leader != 0)
    });
    let s4 = cl.status(4).unwrap();
    assert!(joined.is_ok(), "host 4 did not become a voter: {s4:?}");
    // The new voter leads Volume1 and serves everything written before.
    c.transfer_leader(VOL, 4).unwrap();
    assert_eq!(names(&mut c, ROOT).len(), 50);
    // With four voters, losing one founder leaves a quorum of three.
    cl.kill(1).unwrap();
    c.create(VOL, ROOT, "after", NodeKind::File, 0o644, "")
        .unwrap();
    assert!(names(&mut c, ROOT).contains("after"));
    // The cluster records host 1 as unreachable, and as back once it is.
    let health = |c: &mut Client, node: u64| {
        c.cluster_info()
            .unwrap()
            .health
            .into_iter()
            .find(|h| h.node == node)
            .map(|h| h.up)
    };
    let down =
        csv_test_support::wait_until(Duration::from_secs(15), || health(&mut c, 1) == Some(false));
    assert!(
        down.is_ok(),
        "host 1 not recorded as down: {:?}",
        c.cluster_info()
    );
    cl.start(1).unwrap();
    let up =
        csv_test_support::wait_until(Duration::from_secs(15), || health(&mut c, 1) == Some(true));
    assert!(up.is_ok(), "host 1 not recorded as up again");
}

#[test]
fn hosts_and_clients_move_to_the_second_network_when_the_first_fails() {
    skip_unless!(Need::Root, Need::Command("ip"));
    // Two cluster networks; every host and the client on both.
    let lan_a = Lan::new("neta", 42).unwrap();
    let lan_b = Lan::new("netb", 43).unwrap();
    let nss: Vec<NetNs> = (1..=3)
        .map(|i| NetNs::new(&format!("net{i}")).unwrap())
        .collect();
    let mut links_a = Vec::new();
    for (i, ns) in nss.iter().enumerate() {
        links_a.push(lan_a.attach(ns, i as u8 + 1).unwrap());
        lan_b.attach(ns, i as u8 + 1).unwrap();
    }
    let cns = NetNs::new("netc").unwrap();
    let ca = lan_a.attach(&cns, 10).unwrap();
    lan_b.attach(&cns, 10).unwrap();
    let on = |lan: &Lan, i: usize| -> SocketAddr {
        format!("{}:7100", lan.addr(i as u8)).parse().unwrap()
    };
    let specs = (1..=3)
        .map(|i| {
            (
                i as u64,
                vec![on(&lan_a, i), on(&lan_b, i)],
                Some(nss[i - 1].name().to_string()),
            )
        })
        .collect();
    let mut cl = CsvCluster::new(specs).unwrap();
    cl.start_all().unwrap();
    cns.run(|| {
        let mut c = cl.client();
        c.add_volume(volume(VOL)).unwrap();
        c.create(VOL, ROOT, "on-a", NodeKind::File, 0o644, "")
            .unwrap();
    })
    .unwrap();
    // Network A fails everywhere: hosts keep their quorum over B, and a
    // client that knows both addresses of each host carries on.
    for l in links_a.iter().chain(std::iter::once(&ca)) {
        l.down().unwrap();
    }
    cns.run(|| {
        let mut c = cl.client();
        c.timeout = Duration::from_secs(20);
        let t = Instant::now();
        c.create(VOL, ROOT, "on-b", NodeKind::File, 0o644, "")
            .unwrap();
        eprintln!("first create over network B after {:?}", t.elapsed());
        // The hosts' own traffic moved too: a leader transfer needs it.
        c.transfer_leader(VOL, 2).unwrap();
        c.transfer_leader(VOL, 3).unwrap();
        let n = names(&mut c, ROOT);
        assert!(n.contains("on-a") && n.contains("on-b"), "{n:?}");
    })
    .unwrap();
}

#[test]
fn a_peer_without_the_cluster_key_is_refused() {
    skip_unless!(Need::Command("true"));
    let mut cl = CsvCluster::loopback(1).unwrap();
    cl.start_all().unwrap();
    let a = cl.endpoints()[0];
    let good = cl.identity();
    assert!(coordinator::client::node_status(&good, a, Duration::from_secs(2)).is_ok());
    let wrong_key = Identity {
        key: Key::generate().unwrap(),
        ..good.clone()
    };
    let e = coordinator::client::node_status(&wrong_key, a, Duration::from_secs(2)).unwrap_err();
    assert!(e.to_string().contains("key"), "{e}");
    let wrong_cluster = Identity {
        cluster: "other".into(),
        ..good.clone()
    };
    let e =
        coordinator::client::node_status(&wrong_cluster, a, Duration::from_secs(2)).unwrap_err();
    assert!(e.to_string().contains("cluster"), "{e}");
    // Metadata errors come back as such, not as transport failures.
    let mut c = cl.client();
    c.add_volume(volume(VOL)).unwrap();
    cl.wait_leader(VOL, Duration::from_secs(10)).unwrap();
    let e = c.lookup(VOL, ROOT, "nothing").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
}

#[test]
fn csvd_reads_a_toml_settings_file_and_refuses_a_bad_one() {
    skip_unless!(Need::Command("true"));
    let dir = csv_test_support::temp_dir("toml").unwrap();
    let key = Key::generate().unwrap();
    let key_file = dir.path().join("cluster.key");
    std::fs::write(&key_file, key.to_hex()).unwrap();
    let port = csv_test_support::free_port().unwrap();
    let conf = dir.path().join("csvd.toml");
    std::fs::write(
        &conf,
        format!(
            "id = 1\ndata_dir = \"{}\"\nlisten = [\"127.0.0.1:{port}\"]\ncluster = \"tomlcl\"\nkey_file = \"{}\"\ninit = true\n[peers]\n1 = [\"127.0.0.1:{port}\"]\n",
            dir.path().join("data").display(),
            key_file.display()
        ),
    )
    .unwrap();
    let csvd = csv_test_support::cmd::workspace_bin("csvd");
    let mut child = std::process::Command::new(&csvd)
        .arg("--config")
        .arg(&conf)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("serving on"), "{line}");
    let me = Identity {
        node: 0,
        cluster: "tomlcl".into(),
        key,
    };
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let st = coordinator::client::node_status(&me, a, Duration::from_secs(2)).unwrap();
    assert_eq!(st.node, 1);
    let _ = child.kill();
    let _ = child.wait();
    // A misspelt key is refused with the file's name and the key.
    std::fs::write(&conf, "id = 1\ndata_dri = \"/x\"\n").unwrap();
    let out = std::process::Command::new(&csvd)
        .arg("--config")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("csvd.toml") && err.contains("data_dri"),
        "{err}"
    );
}
