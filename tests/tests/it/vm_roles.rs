//! VM roles in the cluster registry and placement, through csvctl on a
//! three-host cluster: add, list, rate the hosts (memory threshold, a dead
//! host, preferred hosts), remove.

use std::time::Duration;

use csv_test_support::csvd::CsvCluster;
use serde_json::Value;

fn csvctl_json(cl: &CsvCluster, args: &[&str]) -> Value {
    let out = cl.csvctl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "csvctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn csvctl_ok(cl: &CsvCluster, args: &[&str]) -> String {
    let out = cl.csvctl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "csvctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn csvctl_err(cl: &CsvCluster, args: &[&str]) -> String {
    let out = cl.csvctl().args(args).output().unwrap();
    assert!(!out.status.success(), "csvctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn vm_roles_are_added_rated_and_removed() {
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.start_all().unwrap();
    let v = cl.add_volume_file(256 << 20).unwrap();
    // The founding hosts enter the registry a moment after the first election.
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client()
            .cluster_info()
            .map(|i| i.nodes.len() == 3)
            .unwrap_or(false)
    })
    .unwrap();
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
