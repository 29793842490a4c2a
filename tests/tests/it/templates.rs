//! VM templates on a three-host cluster: a golden disk put in Volume1's
//! library, ten VMs made from it with `csvctl vm add --template`, each run
//! (the test guest writes its own disk), and the template's bytes the same
//! at the end.

use std::time::{Duration, Instant};

use super::vm_roles::{
    csvctl_err, csvctl_json, csvctl_ok, guest_disk, mounted_cluster, running, stop_and_wait,
};

/// The golden disk's data: 2 MiB at 4 MiB, past the blocks the test guest
/// writes (its first 1 MiB).
const DATA_AT: u64 = 4 << 20;

fn golden_bytes() -> Vec<u8> {
    (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

#[test]
fn ten_vms_are_made_from_one_template_and_leave_it_unchanged() {
    csv_test_support::skip_unless!(
        csv_test_support::Need::Root,
        csv_test_support::Need::Device("/dev/fuse"),
        csv_test_support::Need::Device("/dev/kvm")
    );
    let (cl, v) = mounted_cluster();
    let root1 = cl.mountpoint(1, v).parent().unwrap().to_path_buf();
    let root1 = root1.to_str().unwrap();

    // A golden disk outside the cluster.
    let src = tempfile::tempdir().unwrap();
    let golden = src.path().join("golden.vhd");
    let d = vhd::Vhd::create(
        &golden,
        &vhd::CreateOptions::new(vhd::footer::DiskType::Dynamic, 16 << 20),
    )
    .unwrap();
    d.write_at(&golden_bytes(), DATA_AT).unwrap();
    d.flush().unwrap();
    drop(d);

    let out = csvctl_ok(
        &cl,
        &[
            "template",
            "add",
            "golden",
            "--from",
            golden.to_str().unwrap(),
            "--mount-root",
            root1,
        ],
    );
    eprintln!("{out}");
    let err = csvctl_err(
        &cl,
        &[
            "template",
            "add",
            "golden",
            "--from",
            golden.to_str().unwrap(),
            "--mount-root",
            root1,
        ],
    );
    assert!(err.contains("already"), "{err}");
    // Seen from another host: read-only, and its bytes kept to compare.
    let file3 = cl.mountpoint(3, v).join("Library/Templates/golden.vhd");
    let meta = std::fs::metadata(&file3).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o444
    );
    let before = std::fs::read(&file3).unwrap();

    // Ten VMs from it.
    let names: Vec<String> = (1..=10).map(|i| format!("t{i}")).collect();
    let t = Instant::now();
    for n in &names {
        csvctl_ok(
            &cl,
            &[
                "vm",
                "add",
                n,
                "--memory",
                "32M",
                "--template",
                "golden",
                "--mount-root",
                root1,
                "--dirty-rate",
                "2",
            ],
        );
    }
    let made = t.elapsed();
    eprintln!("10 VMs made from the template in {made:?}");
    assert!(made < Duration::from_secs(10), "{made:?}");

    let list = csvctl_json(&cl, &["template", "list", "--json", "--mount-root", root1]);
    eprintln!(
        "{}",
        csvctl_ok(&cl, &["template", "list", "--mount-root", root1])
    );
    assert_eq!(
        list[0]["children"].as_array().unwrap().len(),
        10,
        "{list:#}"
    );
    assert_eq!(list[0]["vms"].as_array().unwrap().len(), 10, "{list:#}");
    let err = csvctl_err(
        &cl,
        &["template", "remove", "golden", "--mount-root", root1],
    );
    assert!(err.contains("in use"), "{err}");

    // Each runs and writes its own disk.
    for n in &names {
        csvctl_ok(&cl, &["vm", "start", n]);
    }
    let t = Instant::now();
    csv_test_support::wait_until(Duration::from_secs(90), || {
        names
            .iter()
            .all(|n| running(&cl, n)["heartbeats"].as_u64().unwrap_or(0) >= 200)
    })
    .unwrap_or_else(|_| {
        let s: Vec<_> = names.iter().map(|n| running(&cl, n)).collect();
        panic!("not all heartbeating after {:?}: {s:?}", t.elapsed())
    });
    let strs: Vec<&str> = names.iter().map(String::as_str).collect();
    stop_and_wait(&cl, &strs);

    let golden = golden_bytes();
    for n in &names {
        let path = cl.mountpoint(2, v).join(format!("{n}.vhd"));
        let found = guest_disk(&path);
        assert!(found.written > 0, "{n}: {found:?}");
        assert_eq!(found.bad, 0, "{n}: {found:?}");
        // The template's data shows through the child.
        let d = vhd::Vhd::open(&path, &vhd::OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; golden.len()];
        d.read_at(&mut buf, DATA_AT).unwrap();
        assert!(
            buf == golden,
            "{n}: the template's data differs through the child"
        );
    }
    let after = std::fs::read(&file3).unwrap();
    assert!(before == after, "the template's bytes changed");

    // The inventory counts what the template saves.
    let inv = {
        let out = cl
            .csvctl()
            .args(["inventory", "--json", "--mount-root", root1])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let t = &inv["templates"][0];
    assert_eq!(t["children"].as_array().unwrap().len(), 10, "{t:#}");
    assert_eq!(
        inv["templates_save"].as_u64().unwrap(),
        t["on_disk"].as_u64().unwrap() * 10,
        "{inv:#}"
    );
    assert!(
        !inv["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["subject"].as_str().unwrap_or("").contains("Library/")),
        "a template is not sprawl: {inv:#}"
    );

    // Once no disk is made from it, it goes.
    for n in &names {
        csvctl_ok(&cl, &["vm", "remove", n]);
        std::fs::remove_file(cl.mountpoint(1, v).join(format!("{n}.vhd"))).unwrap();
    }
    csvctl_ok(
        &cl,
        &["template", "remove", "golden", "--mount-root", root1],
    );
    assert!(!file3.exists());
}
