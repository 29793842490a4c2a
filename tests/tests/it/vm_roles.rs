//! VM roles in the cluster registry and placement, through csvctl on a
//! three-host cluster: add, list, rate the hosts (memory threshold, a dead
//! host, preferred hosts), remove.

use std::time::Duration;

use csv_test_support::csvd::CsvCluster;
use serde_json::Value;

pub(super) fn csvctl_json(cl: &CsvCluster, args: &[&str]) -> Value {
    let out = cl.csvctl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "csvctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(super) fn csvctl_ok(cl: &CsvCluster, args: &[&str]) -> String {
    let out = cl.csvctl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "csvctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(super) fn csvctl_err(cl: &CsvCluster, args: &[&str]) -> String {
    let out = cl.csvctl().args(args).output().unwrap();
    assert!(!out.status.success(), "csvctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Three hosts with Volume1 (a 256 MiB LUN file) mounted on each, every
/// host in the registry.
pub(super) fn mounted_cluster() -> (CsvCluster, u64) {
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.mounts = true;
    cl.start_all().unwrap();
    let v = cl.add_volume_file(256 << 20).unwrap();
    cl.wait_mounted(v, Duration::from_secs(20)).unwrap();
    wait_registered(&cl);
    (cl, v)
}

/// The founding hosts enter the registry a moment after the first election.
fn wait_registered(cl: &CsvCluster) {
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client()
            .cluster_info()
            .map(|i| i.nodes.len() == 3)
            .unwrap_or(false)
    })
    .unwrap();
}

/// A 16 MiB dynamic VHD made through host 1's mount; its role path.
fn new_vhd(cl: &CsvCluster, v: u64, name: &str) -> String {
    vhd::Vhd::create(
        cl.mountpoint(1, v).join(name),
        &vhd::CreateOptions::new(vhd::footer::DiskType::Dynamic, 16 << 20),
    )
    .unwrap();
    format!("/ClusterStorage/Volume{v}/{name}")
}

/// Stops the VMs and waits until no host runs them.
pub(super) fn stop_and_wait(cl: &CsvCluster, names: &[&str]) {
    for name in names {
        csvctl_ok(cl, &["vm", "stop", name]);
    }
    csv_test_support::wait_until(Duration::from_secs(20), || {
        names.iter().all(|n| {
            let s = csvctl_json(cl, &["vm", "status", n, "--json"]);
            s["runtime"].as_array().is_some_and(|r| r.is_empty())
        })
    })
    .unwrap();
}

/// What the test guest left on the VHD at `path`, read with our reader.
/// VM role tests need root, FUSE and KVM.
macro_rules! skip_without_kvm_and_fuse {
    () => {
        csv_test_support::skip_unless!(
            csv_test_support::Need::Root,
            csv_test_support::Need::Device("/dev/fuse"),
            csv_test_support::Need::Device("/dev/kvm")
        );
    };
}

/// `csvctl vm add NAME --memory MEMORY --disk DISK EXTRA...`.
fn add_vm(cl: &CsvCluster, name: &str, memory: &str, disk: &str, extra: &[&str]) {
    let mut args = vec!["vm", "add", name, "--memory", memory, "--disk", disk];
    args.extend_from_slice(extra);
    csvctl_ok(cl, &args);
}

/// The host's view of VM `name` where it runs (Null while it does not).
pub(super) fn running(cl: &CsvCluster, name: &str) -> Value {
    let s = csvctl_json(cl, &["vm", "status", name, "--json"]);
    s["runtime"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["state"] == "running").cloned())
        .unwrap_or(Value::Null)
}

/// `csvctl volume leases` of a file, which must find a single writer at
/// all times (it exits 1 otherwise).
fn lease_history(cl: &CsvCluster, v: u64, file: &str) -> Value {
    let h = csvctl_json(cl, &["volume", "leases", &v.to_string(), file, "--json"]);
    assert_eq!(h["single_writer"], true, "{h:#}");
    eprintln!(
        "{}",
        csvctl_ok(cl, &["volume", "leases", &v.to_string(), file]).trim_end()
    );
    h
}

/// The hosts that gained the write lease, in turn (repeats of one host
/// merged: a lease it renews late is granted again).
fn writers_in_turn(h: &Value) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for e in h["events"].as_array().unwrap() {
        if e["change"] == "granted" || e["change"] == "handed-in" {
            let n = e["host"].as_u64().unwrap();
            if out.last() != Some(&n) {
                out.push(n);
            }
        }
    }
    out
}

pub(super) fn guest_disk(path: &std::path::Path) -> hypervisor_shim::guest::DiskCheck {
    let d = vhd::Vhd::open(path, &vhd::OpenOptions::default()).unwrap();
    hypervisor_shim::guest::check_disk(256, |b, buf| {
        d.read_at(buf, b * 4096).map_err(std::io::Error::other)
    })
    .unwrap()
}

#[test]
fn vm_roles_are_added_rated_and_removed() {
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.start_all().unwrap();
    let v = cl.add_volume_file(256 << 20).unwrap();
    wait_registered(&cl);
    let disk = format!("/ClusterStorage/Volume{v}/vm1.vhd");

    csvctl_ok(
        &cl,
        &[
            "vm", "add", "vm1", "--memory", "256M", "--vcpus", "2", "--disk", &disk,
        ],
    );
    let err = csvctl_err(&cl, &["vm", "add", "vm1", "--disk", &disk]);
    assert!(err.contains("exists"), "{err}");
    let err = csvctl_err(&cl, &["vm", "add", "../x", "--disk", &disk]);
    assert!(err.contains("not a VM name"), "{err}");
    let err = csvctl_err(
        &cl,
        &[
            "vm",
            "add",
            "vm9",
            "--disk",
            "/ClusterStorage/Volume9/a.vhd",
        ],
    );
    assert!(err.contains("no Volume9"), "{err}");

    let list = csvctl_json(&cl, &["vm", "list", "--json"]);
    assert_eq!(list[0]["name"], "vm1");
    assert_eq!(list[0]["host"], 0);
    assert_eq!(list[0]["config"]["state"], "stopped");
    assert_eq!(list[0]["config"]["vcpus"], 2);
    assert_eq!(list[0]["config"]["volume"], v);

    // Every host can take a small VM: all rate above 0, best first.
    let r = csvctl_json(&cl, &["vm", "place", "vm1", "--json"]);
    let r = r.as_array().unwrap();
    assert_eq!(r.len(), 3);
    assert!(
        r.iter().all(|h| h["rating"].as_f64().unwrap() > 0.0),
        "{r:?}"
    );
    let ratings: Vec<f64> = r.iter().map(|h| h["rating"].as_f64().unwrap()).collect();
    assert!(ratings.windows(2).all(|w| w[0] >= w[1]), "{ratings:?}");
    let table = csvctl_ok(&cl, &["vm", "place", "vm1"]);
    eprintln!("{table}");
    assert!(
        table.contains("best host:") && table.contains('★'),
        "{table}"
    );

    // A VM larger than any host's memory rates 0 everywhere, and says why.
    csvctl_ok(
        &cl,
        &["vm", "add", "big", "--memory", "100000G", "--disk", &disk],
    );
    let r = csvctl_json(&cl, &["vm", "place", "big", "--json"]);
    for h in r.as_array().unwrap() {
        assert_eq!(h["rating"], 0.0, "{h}");
        assert!(
            h["reason"].as_str().unwrap().starts_with("memory reserve"),
            "{h}"
        );
    }
    assert!(csvctl_ok(&cl, &["vm", "place", "big"]).contains("no host can run big"));

    // A preferred host goes first; a dead host rates 0.
    csvctl_ok(
        &cl,
        &["vm", "add", "pref", "--disk", &disk, "--preferred", "3,2"],
    );
    let r = csvctl_json(&cl, &["vm", "place", "pref", "--json"]);
    assert_eq!(r[0]["host"], 3, "{r}");
    assert_eq!(r[0]["preferred"], true);
    cl.kill(3).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = csvctl_json(&cl, &["vm", "place", "pref", "--json"]);
    assert_eq!(r[0]["host"], 2, "the next preferred host: {r}");
    let dead = r
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == 3)
        .unwrap();
    assert_eq!(dead["rating"], 0.0);
    assert_eq!(dead["reason"], "host is down");

    csvctl_ok(&cl, &["vm", "remove", "big"]);
    let err = csvctl_err(&cl, &["vm", "remove", "big"]);
    assert!(err.contains("no VM role"), "{err}");
    let list = csvctl_json(&cl, &["vm", "list", "--json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["pref", "vm1"]);
}

/// A VM role started through csvctl runs on its best-rated host from a VHD
/// on Volume1, stops, and its disk reads back whole on another host.
#[test]
fn a_vm_role_runs_on_its_host_and_its_disk_is_whole_elsewhere() {
    skip_without_kvm_and_fuse!();
    let (cl, v) = mounted_cluster();
    let disk = new_vhd(&cl, v, "vm1.vhd");
    add_vm(&cl, "vm1", "64M", &disk, &["--dirty-rate", "10"]);
    let out = csvctl_ok(&cl, &["vm", "start", "vm1"]);
    eprintln!("{out}");
    let err = csvctl_err(&cl, &["vm", "start", "vm1"]);
    assert!(err.contains("running on host"), "{err}");

    // Its host's csvd runs it; the status shows the guest's heartbeat.
    let mut status = Value::Null;
    let t = std::time::Instant::now();
    let running = csv_test_support::wait_until(Duration::from_secs(30), || {
        status = csvctl_json(&cl, &["vm", "status", "vm1", "--json"]);
        status["runtime"]
            .as_array()
            .and_then(|r| r.first())
            .is_some_and(|r| {
                r["state"] == "running" && r["heartbeats"].as_u64().unwrap_or(0) >= 500
            })
    });
    assert!(
        running.is_ok(),
        "not running after {:?}: {status}",
        t.elapsed()
    );
    let host = status["host"].as_u64().unwrap();
    assert_eq!(status["runtime"][0]["host"], host, "{status}");
    assert_eq!(
        status["runtime"].as_array().unwrap().len(),
        1,
        "one host runs it: {status}"
    );
    eprintln!("{}", csvctl_ok(&cl, &["vm", "status", "vm1"]));
    let err = csvctl_err(&cl, &["vm", "remove", "vm1"]);
    assert!(err.contains("stop it first"), "{err}");

    stop_and_wait(&cl, &["vm1"]);

    // Another host reads the disk the VM wrote (close-to-open through the
    // volume), with our VHD reader.
    let other = if host == 2 { 3 } else { 2 };
    let path = cl.mountpoint(other, v).join("vm1.vhd");
    let found = guest_disk(&path);
    eprintln!("disk seen from host {other}: {found:?}");
    assert!(found.written > 20, "{found:?}");
    assert_eq!(found.bad, 0, "{found:?}");
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
    csvctl_ok(&cl, &["vm", "remove", "vm1"]);
}

/// A running VM role moves between the three hosts ten times (eight live
/// migrations, two quick ones) while it dirties memory and writes its
/// disk: every move lands, the guest's heartbeat has no gap and its pages
/// no damage, and the disk reads back whole.
#[test]
fn a_vm_role_live_migrates_between_hosts_ten_times() {
    skip_without_kvm_and_fuse!();
    let (cl, v) = mounted_cluster();
    let disk = new_vhd(&cl, v, "mig.vhd");
    add_vm(&cl, "mig", "128M", &disk, &["--dirty-rate", "50"]);
    csvctl_ok(&cl, &["vm", "start", "mig", "--on", "1"]);
    let runtime = |cl: &CsvCluster| running(cl, "mig");
    csv_test_support::wait_until(Duration::from_secs(30), || {
        runtime(&cl)["heartbeats"].as_u64().unwrap_or(0) >= 300
    })
    .unwrap();

    let mut host = 1u64;
    for i in 0..10 {
        let to = host % 3 + 1;
        // Every fourth move is a quick one (save to the volume, restore).
        let quick = i % 4 == 3;
        let to_s = to.to_string();
        let mut args = vec!["vm", "migrate", "mig", "--to", &to_s, "--timeout-s", "30"];
        if quick {
            args.push("--quick");
        }
        let o = cl.csvctl().args(&args).output().unwrap();
        assert!(
            o.status.success(),
            "move {}: {}\nstatus: {}\nhost {host} log:\n{}\nhost {to} log:\n{}",
            i + 1,
            String::from_utf8_lossy(&o.stderr),
            csvctl_ok(&cl, &["vm", "status", "mig"]),
            cl.log_tail(host, 15),
            cl.log_tail(to, 15)
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        eprintln!("move {}: {}", i + 1, out.trim());
        assert!(out.contains(&format!("to host {to}")), "{out}");
        assert_eq!(out.contains("save and restore"), quick, "{out}");
        host = to;
        // Running on the new host, heartbeat continuing, no gap.
        let mut rt = Value::Null;
        let ok = csv_test_support::wait_until(Duration::from_secs(20), || {
            rt = runtime(&cl);
            rt["host"] == host && rt["heartbeats"].as_u64().unwrap_or(0) >= 200
        });
        assert!(
            ok.is_ok(),
            "not running on host {host}: {rt}\n{}\nlog:\n{}",
            csvctl_ok(&cl, &["vm", "status", "mig"]),
            cl.log_tail(host, 8)
        );
        assert_eq!(rt["heartbeat_gaps"], 0, "{rt}");
        assert_eq!(rt["guest_errors"], 0, "{rt}");
        assert_eq!(rt["error"], "", "{rt}");
    }
    let rt = runtime(&cl);
    let last_disk_write = rt["disk_writes"].as_u64().unwrap();
    assert!(last_disk_write > 0, "{rt}");

    // The coordinator's lease history of the VHD: one writer at a time,
    // following the VM from host to host, handed over through the
    // coordinator at each live switch-over. At a quick one the source's
    // VMM closes the disk as it stops, and that host's release may reach
    // the coordinator before the hand-over: the target is then granted
    // the free lease (released, then granted, nobody in between).
    let h = lease_history(&cl, v, "mig.vhd");
    let holders = writers_in_turn(&h);
    assert_eq!(holders, vec![1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], "{h:#}");
    let events = h["events"].as_array().unwrap();
    let handed_in = events.iter().filter(|e| e["change"] == "handed-in").count();
    let released_then_granted = events
        .windows(2)
        .filter(|w| {
            w[0]["change"] == "released"
                && w[1]["change"] == "granted"
                && w[0]["host"] != w[1]["host"]
        })
        .count();
    assert!(
        handed_in >= 8 && handed_in + released_then_granted == 10,
        "{handed_in} hand-overs, {released_then_granted} release+grant switch-overs: {h:#}"
    );

    // Drain the host it is on, with a second VM there: both leave, the
    // host rates 0 ("draining") until it resumes.
    let second = new_vhd(&cl, v, "second.vhd");
    add_vm(&cl, "second", "64M", &second, &["--priority", "high"]);
    csvctl_ok(&cl, &["vm", "start", "second", "--on", &host.to_string()]);
    csv_test_support::wait_until(Duration::from_secs(30), || {
        let s = csvctl_json(&cl, &["vm", "status", "second", "--json"]);
        s["runtime"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["state"] == "running"))
    })
    .unwrap();
    let out = csvctl_ok(&cl, &["node", "drain", &host.to_string()]);
    eprintln!("{out}");
    assert!(out.contains("is empty and in maintenance"), "{out}");
    let list = csvctl_json(&cl, &["vm", "list", "--json"]);
    for vm in list.as_array().unwrap() {
        assert_ne!(vm["host"], host, "{vm}");
    }
    let r = csvctl_json(&cl, &["vm", "place", "mig", "--json"]);
    let drained = r
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .unwrap();
    assert_eq!(
        drained["reason"], "host is draining (maintenance)",
        "{drained}"
    );
    csvctl_ok(&cl, &["node", "resume", &host.to_string()]);
    let r = csvctl_json(&cl, &["vm", "place", "mig", "--json"]);
    let back = r
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .unwrap();
    assert!(back["rating"].as_f64().unwrap() > 0.0, "{back}");
    // Its host's view of it (a status read can miss one host for a moment).
    let mut rt = Value::Null;
    csv_test_support::wait_until(Duration::from_secs(10), || {
        rt = runtime(&cl);
        !rt.is_null()
    })
    .unwrap_or_else(|e| panic!("no host reports mig running: {e}"));
    assert_eq!(rt["heartbeat_gaps"], 0, "{rt}");
    csvctl_ok(&cl, &["vm", "stop", "second"]);

    // The guest's own log of its last completed disk write, read before it
    // stops: that write (or a later one) must be on the disk.
    let last_write = runtime(&cl)["disk_last_seq"].as_u64().unwrap();
    assert!(last_write > 0);
    stop_and_wait(&cl, &["mig"]);
    let path = cl.mountpoint(1, v).join("mig.vhd");
    let found = guest_disk(&path);
    eprintln!("disk after ten moves: {found:?}");
    assert_eq!(found.bad, 0, "{found:?}");
    assert!(
        found.newest_seq >= last_write,
        "lost disk writes: {found:?}, guest's last write {last_write}"
    );
    assert!(found.written > 20, "{found:?}");
}

/// A backup of a running VM's disk through the snapshot hook: the VM is
/// paused for the freeze (and goes on afterwards without a heartbeat
/// gap), the copy taken from the snapshot on another host equals the
/// snapshot's file, checks clean as a VHD, and holds the guest's
/// self-checking disk blocks whole; the snapshot is gone afterwards.
#[test]
fn a_running_vms_disk_is_backed_up_through_a_snapshot() {
    skip_without_kvm_and_fuse!();
    let (cl, v) = mounted_cluster();
    let disk = new_vhd(&cl, v, "bk.vhd");
    add_vm(&cl, "bk", "64M", &disk, &["--dirty-rate", "10"]);
    csvctl_ok(&cl, &["vm", "start", "bk", "--on", "2"]);
    let runtime = |cl: &CsvCluster| running(cl, "bk");
    csv_test_support::wait_until(Duration::from_secs(30), || {
        let r = runtime(&cl);
        r["heartbeats"].as_u64().unwrap_or(0) >= 300 && r["disk_writes"].as_u64().unwrap_or(0) > 5
    })
    .unwrap();
    let before = runtime(&cl);
    let out_dir = csv_test_support::temp_dir("backup").unwrap();
    let copy = out_dir.path().join("bk-backup.vhd");
    let root1 = cl.mountpoint(1, v).parent().unwrap().to_path_buf();
    let script = format!(
        "cp \"$CSV_SNAPSHOT_PATH/bk.vhd\" {c} && cmp \"$CSV_SNAPSHOT_PATH/bk.vhd\" {c}",
        c = copy.display()
    );
    let o = cl
        .csvctl()
        .args([
            "snapshot",
            "run",
            "1",
            "--name",
            "nightly",
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
    assert_eq!(snap["vms_paused"], 1, "{snap}");
    // The copy is a whole VHD with the guest's blocks intact.
    let check = cl
        .csvctl()
        .args(["vhd", "check", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-f", "vpc", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let found = guest_disk(&copy);
    eprintln!("backup: {found:?}; guest before the backup: {before}");
    assert_eq!(found.bad, 0, "{found:?}");
    assert!(found.written > 0, "{found:?}");
    assert!(
        found.newest_seq >= before["disk_last_seq"].as_u64().unwrap(),
        "the backup misses writes the guest completed before it: {found:?}"
    );
    // The snapshot is gone; the VM went on.
    let list = csvctl_json(&cl, &["snapshot", "list", "1", "--json"]);
    assert_eq!(list, serde_json::json!([]));
    csv_test_support::wait_until(Duration::from_secs(10), || {
        runtime(&cl)["heartbeats"].as_u64().unwrap_or(0)
            > before["heartbeats"].as_u64().unwrap() + 100
    })
    .unwrap();
    let after = runtime(&cl);
    assert_eq!(after["heartbeat_gaps"], 0, "{after}");
    assert_eq!(after["guest_errors"], 0, "{after}");
    stop_and_wait(&cl, &["bk"]);
}

/// Kill -9 the host that runs two VMs: its VMMs die with it, the cluster
/// marks it down, and both VMs restart on the other hosts, high priority
/// first, each where memory allows (host 1 offers VMs room for one of
/// them, host 2 too); their disks check clean afterwards. The killed host,
/// started again, rejoins without running either VM and cannot write their
/// disks, whose lease histories show the dead host fenced off before
/// anyone else wrote.
#[test]
fn vm_roles_restart_elsewhere_when_their_host_dies() {
    skip_without_kvm_and_fuse!();
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.mounts = true;
    // Memory offered to VMs: host 1 fits one 600 MiB VM (with the 512 MiB
    // reserve) and rates better than host 2, which also fits one.
    for (id, mem) in [(1, "1700M"), (2, "1300M"), (3, "8G")] {
        cl.host_args
            .insert(id, vec!["--vm-memory".into(), mem.into()]);
    }
    cl.start_all().unwrap();
    let v = cl.add_volume_file(256 << 20).unwrap();
    cl.wait_mounted(v, Duration::from_secs(20)).unwrap();
    wait_registered(&cl);
    for (name, prio) in [("fa", "low"), ("fb", "high")] {
        let disk = new_vhd(&cl, v, &format!("{name}.vhd"));
        add_vm(&cl, name, "600M", &disk, &["--priority", prio]);
        csvctl_ok(&cl, &["vm", "start", name, "--on", "3"]);
    }
    let running_on = |cl: &CsvCluster, name: &str| -> Option<u64> {
        let s = csvctl_json(cl, &["vm", "status", name, "--json"]);
        s["runtime"]
            .as_array()?
            .iter()
            .find(|x| x["state"] == "running" && x["heartbeats"].as_u64().unwrap_or(0) > 100)
            .and_then(|x| x["host"].as_u64())
    };
    csv_test_support::wait_until(Duration::from_secs(30), || {
        running_on(&cl, "fa") == Some(3) && running_on(&cl, "fb") == Some(3)
    })
    .unwrap();
    // Before the failure: host 1 rates best for one of them, and says why
    // it could not take both.
    let r = csvctl_json(&cl, &["vm", "place", "fb", "--json"]);
    eprintln!("{}", csvctl_ok(&cl, &["vm", "place", "fb"]));
    let rating = |host: u64| {
        r.as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == host)
            .unwrap()["rating"]
            .as_f64()
            .unwrap()
    };
    assert!(rating(1) > rating(2) && rating(2) > 0.0, "{r:#}");

    let killed = std::time::Instant::now();
    cl.kill(3).unwrap();
    let mut hosts = (None, None);
    let ok = csv_test_support::wait_until(Duration::from_secs(30), || {
        hosts = (running_on(&cl, "fa"), running_on(&cl, "fb"));
        matches!(hosts, (Some(a), Some(b)) if a != 3 && b != 3)
    });
    assert!(
        ok.is_ok(),
        "not restarted: {hosts:?}\n{}\n{}",
        csvctl_ok(&cl, &["vm", "status", "fa"]),
        csvctl_ok(&cl, &["vm", "status", "fb"])
    );
    let took = killed.elapsed();
    eprintln!("both VMs run again {took:?} after the kill, on hosts {hosts:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    // High priority first, on the best host; the other where memory is.
    assert_eq!(hosts, (Some(2), Some(1)), "memory-aware placement");
    let s = csvctl_json(&cl, &["vm", "status", "fb", "--json"]);
    assert!(
        s["config"]["last_migration"]
            .as_str()
            .unwrap_or("")
            .starts_with("failover: host 3"),
        "{s}"
    );
    // Host 1 now has no room for another 600 MiB VM, and says so.
    let r = csvctl_json(&cl, &["vm", "place", "fa", "--json"]);
    let h1 = r
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == 1)
        .unwrap();
    assert!(
        h1["reason"].as_str().unwrap().starts_with("memory reserve"),
        "{h1}"
    );

    // The killed host comes back: it rejoins, runs neither VM, and cannot
    // write their disks (another host holds the write lease) though it
    // can read them.
    cl.start(3).unwrap();
    csv_test_support::wait_until(Duration::from_secs(20), || {
        cl.status(3).is_ok_and(|s| {
            s.volumes
                .iter()
                .any(|x| x.number == v && x.state() == coordinator::proto::IoMode::Direct)
        })
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let st = cl.status(3).unwrap();
    assert!(st.vms.is_empty(), "host 3 runs {:?}", st.vms);
    for name in ["fa", "fb"] {
        let path = cl.mountpoint(3, v).join(format!("{name}.vhd"));
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect_err("host 3 opened a running VM's disk for writing");
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{name}: {e}");
        let mut head = [0u8; 512];
        use std::io::Read;
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut head))
            .unwrap();
        // The history: host 1 made the disk, host 3 wrote it while it ran
        // the VM and lost the lease when it was fenced (revoked) or ran
        // out, and only then did the new host gain it.
        let h = lease_history(&cl, v, &format!("{name}.vhd"));
        assert_eq!(writers_in_turn(&h), [1, 3, hosts_of(name, hosts)], "{h:#}");
        let end3 = h["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["host"] == 3 && (e["change"] == "revoked" || e["change"] == "expired"))
            .cloned();
        assert!(end3.is_some(), "host 3's lease never ended: {h:#}");
    }

    stop_and_wait(&cl, &["fa", "fb"]);
    for name in ["fa", "fb"] {
        let path = cl.mountpoint(1, v).join(format!("{name}.vhd"));
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
        let found = guest_disk(&path);
        assert_eq!(found.bad, 0, "{name}: {found:?}");
    }
}

fn hosts_of(name: &str, hosts: (Option<u64>, Option<u64>)) -> u64 {
    let h = if name == "fa" { hosts.0 } else { hosts.1 };
    h.unwrap_or(0)
}
