//! `csvctl drill` on a live 3-host cluster: three csvd processes with two
//! cluster networks each, Volume1 on a real tgtd LUN. Each drill runs with
//! its own load and must report no acknowledged write lost, a clean
//! consistency check and every objective met.

use csv_test_support::csvd::CsvCluster;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Three founders, each listening on two loopback ports (two cluster
/// networks), with Volume1 on a 384 MiB tgtd LUN.
pub(crate) fn drill_cluster() -> (csv_test_support::tgt::TgtTarget, CsvCluster) {
    let mut tgt = csv_test_support::tgt::TgtTarget::start().unwrap();
    let t = tgt.add_target("drills").unwrap();
    let backing = tgt.dir().join("lun1.img");
    tgt.add_lun_file(&t, 1, &backing, 384 * MIB).unwrap();
    let specs = (1..=3u64)
        .map(|id| {
            let a = |_| SocketAddr::from(([127, 0, 0, 1], csv_test_support::free_port().unwrap()));
            (id, vec![a(0), a(1)], None)
        })
        .collect();
    let mut cl = CsvCluster::new(specs).unwrap();
    cl.mounts = true;
    cl.start_all().unwrap();
    cl.add_volume_url(&tgt.url(&t, 1), 1).unwrap();
    cl.wait_mounted(1, Duration::from_secs(30)).unwrap();
    csv_test_support::wait_until(Duration::from_secs(10), || {
        cl.client().cluster_info().is_ok_and(|i| i.nodes.len() == 3)
    })
    .unwrap();
    (tgt, cl)
}

fn drill(cl: &CsvCluster, scenario: &str, extra: &[&str]) -> Output {
    let root = cl.mountpoint(1, 1);
    let root = root.parent().unwrap();
    let mut c = cl.csvctl();
    c.args([
        "drill",
        scenario,
        "--duration",
        "4s",
        "--host",
        "1",
        "--json",
    ])
    .arg("--mount-root")
    .arg(root)
    .args(extra);
    if !Path::new("/dev/kvm").exists() {
        // The drills still run, without their VM.
        c.arg("--no-vm");
    }
    c.output().unwrap()
}

/// The report's rows as a Markdown table.
fn rows(report: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for r in report.as_array().into_iter().flatten() {
        for m in r["measures"].as_array().into_iter().flatten() {
            out.push(format!(
                "| {} | {} | {} | {} | {} |",
                r["scenario"].as_str().unwrap_or("?"),
                m["name"].as_str().unwrap_or("?"),
                m["value"].as_str().unwrap_or("?"),
                m["objective"].as_str().unwrap_or("?"),
                if m["pass"].as_bool() == Some(true) {
                    "PASS"
                } else {
                    "FAIL"
                }
            ));
        }
    }
    out
}

#[test]
fn each_drill_on_a_three_host_cluster_loses_nothing() {
    skip_without_fuse_and_tgtd!();
    if !Path::new("/dev/kvm").exists() {
        println!("SKIP drills VM part: no /dev/kvm (the drills run without their VM)");
    }
    let (mut tgt, cl) = drill_cluster();
    // --dry-run explains and does nothing.
    let out = drill(&cl, "all", &["--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("san-loss") && text.contains("Nothing was done"),
        "{text}"
    );
    let mut table = vec![
        "| drill | measure | value | objective | result |".to_string(),
        "|---|---|---:|---|---|".to_string(),
    ];
    for scenario in [
        "san-loss",
        "slow-san",
        "net-loss-one",
        "net-loss-all",
        "coordinator-kill",
        "host-kill",
        "target-restart",
        "disk-full",
        "clock-jump",
    ] {
        let out = if scenario == "target-restart" {
            // The drill runs the operator's command; here it signals this
            // test, which restarts tgtd (SIGKILL, 1 s down, same LUNs).
            let dir = cl.dir().join("target-restart");
            std::fs::create_dir_all(&dir).unwrap();
            let flag = dir.join("now");
            let cmd = format!(
                "touch {f}; while [ -e {f} ]; do sleep 0.05; done",
                f = flag.display()
            );
            std::thread::scope(|s| {
                let h = s.spawn(|| drill(&cl, scenario, &["--target-cmd", &cmd]));
                let seen = csv_test_support::wait_until(Duration::from_secs(60), || flag.exists());
                if seen.is_ok() {
                    tgt.restart(Duration::from_secs(1)).unwrap();
                    std::fs::remove_file(&flag).unwrap();
                }
                h.join().unwrap()
            })
        } else {
            drill(&cl, scenario, &[])
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "{scenario}: no JSON report ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let r = &report[0];
        let lost = r["measures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "acknowledged writes lost")
            .map(|m| m["value"].as_str().unwrap_or("").to_string());
        assert!(
            lost.as_deref().is_some_and(|l| l.starts_with("0 of ")),
            "{scenario}: {lost:?} in {report}"
        );
        table.extend(rows(&report));
        assert!(
            out.status.success() && r["pass"] == true,
            "{scenario} missed an objective:\n{}\nnotes: {}\nlogs:\n{}",
            rows(&report).join("\n"),
            r["notes"],
            cl.log_tail(2, 30)
        );
    }
    println!("{}", table.join("\n"));

    // A cluster running VMs that are not the drill's: refused without
    // --yes, and nothing is done.
    vhd::Vhd::create(
        cl.mountpoint(1, 1).join("prod.vhd"),
        &vhd::CreateOptions::new(vhd::footer::DiskType::Dynamic, 16 << 20),
    )
    .unwrap();
    let out = cl
        .csvctl()
        .args(["vm", "add", "prod-db", "--memory", "32M", "--disk"])
        .arg("/ClusterStorage/Volume1/prod.vhd")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = drill(&cl, "san-loss", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a drill ran beside a VM not its own");
    assert!(err.contains("prod-db") && err.contains("--yes"), "{err}");
    assert!(
        cl.volume_state(1, 1).is_some_and(|(s, _)| s == "Direct"),
        "the refused drill touched host 1"
    );
}
