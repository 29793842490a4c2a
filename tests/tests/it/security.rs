//! Closing the doors: secrets stay out of process lists and logs, stale
//! credentials are refused, the daemons keep only the privileges they
//! need. (Unknown peers on the cluster port: coordinator.rs; strangers on
//! a migration port: vmm.rs; console actions without the operator token:
//! operations.rs; hostile guest descriptors: hypervisor-shim's unit tests.)

use csv_test_support::csvd::CsvCluster;
use csv_test_support::{skip_unless, Need};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Every process's command line, and the files given, must not hold any
/// of `secrets`.
fn assert_nowhere(secrets: &[(&str, &str)], files: &[std::path::PathBuf]) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        for (what, s) in secrets {
            assert!(
                !cmdline.contains(s),
                "the {what} shows in the process list: {cmdline}"
            );
        }
    }
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for (what, s) in secrets {
            assert!(!text.contains(s), "the {what} is in {}", f.display());
        }
    }
}

#[test]
fn secrets_never_show_in_process_lists_or_logs() {
    skip_without_fuse_and_tgtd!();
    const SECRET: &str = "chap-secret-5f3a9c1e";
    let mut tgt = csv_test_support::tgt::TgtTarget::start().unwrap();
    let t = tgt.add_target("secrets").unwrap();
    tgt.add_lun_file(&t, 1, &tgt.dir().join("lun1.img"), 128 << 20)
        .unwrap();
    tgt.set_chap(&t, "csvuser", SECRET).unwrap();
    let mut cl = CsvCluster::loopback(2).unwrap();
    cl.mounts = true;
    let secret_file = cl.dir().join("chap.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    cl.extra_args = vec![
        "--chap-user".into(),
        "csvuser".into(),
        "--chap-secret-file".into(),
        secret_file.display().to_string(),
    ];
    cl.start_all().unwrap();
    // csvctl takes CHAP from its environment, never from its arguments.
    let out = cl
        .csvctl()
        .args(["volume", "add", &tgt.url(&t, 1), "--number", "1", "--force"])
        .env("CSV_CHAP_USER", "csvuser")
        .env("CSV_CHAP_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cl.wait_mounted(1, Duration::from_secs(30)).unwrap();
    let token = cl.csvctl().args(["cluster", "token"]).output().unwrap();
    let token = String::from_utf8_lossy(&token.stdout).to_string();
    let token = token
        .split_whitespace()
        .find(|w| w.starts_with("csvjoin1-"))
        .unwrap_or_else(|| panic!("no join token in {token:?}"))
        .to_string();
    let key = std::fs::read_to_string(cl.dir().join("cluster.key"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut outputs = Vec::new();
    for args in [
        &["volume", "status"][..],
        &["cluster", "status"][..],
        &["validate"][..],
    ] {
        let o = cl.csvctl().args(args).output().unwrap();
        let p = cl.dir().join(format!("out-{}.txt", args.join("-")));
        std::fs::write(&p, [o.stdout, o.stderr].concat()).unwrap();
        outputs.push(p);
    }
    let mut files: Vec<std::path::PathBuf> = (1..=2)
        .map(|h| cl.dir().join(format!("host{h}.log")))
        .collect();
    files.extend(outputs);
    let mut secrets = vec![("CHAP secret", SECRET), ("join token", token.as_str())];
    if key.len() >= 32 {
        secrets.push(("cluster key", key.as_str()));
    }
    assert_nowhere(&secrets, &files);
}

#[test]
fn a_stale_join_token_is_refused() {
    skip_unless!(Need::Root);
    let mut cl = CsvCluster::loopback(1).unwrap();
    cl.start_all().unwrap();
    let out = cl
        .csvctl()
        .args(["cluster", "token", "--ttl", "1s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let token = text
        .split_whitespace()
        .find(|w| w.starts_with("csvjoin1-"))
        .unwrap_or_else(|| {
            panic!(
                "no join token: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string();
    std::thread::sleep(Duration::from_millis(2500));
    let port = csv_test_support::free_port().unwrap();
    let out = Command::new(csv_test_support::cmd::workspace_bin("csvctl"))
        .args(["node", "join", &token, "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--key-file")
        .arg(cl.dir().join("stale.key"))
        .arg("--config")
        .arg(cl.dir().join("stale.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stale token joined: {err}");
    assert!(err.contains("expired"), "{err}");
    assert!(!cl.dir().join("stale.key").exists(), "a key was written");
}

/// The capability bits of a `/proc/PID/status` line such as `CapBnd:`.
fn caps(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let v = s
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} for {pid}"));
    u64::from_str_radix(v.trim(), 16).unwrap()
}

fn no_new_privs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .any(|l| l.starts_with("NoNewPrivs:") && l.trim_end().ends_with('1'))
}

#[test]
fn daemons_drop_the_privileges_they_do_not_need() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Device("/dev/fuse")
    );
    const SYS_MODULE: u64 = 1 << 16;
    const SYS_RAWIO: u64 = 1 << 17;
    const SYS_PTRACE: u64 = 1 << 19;
    const SYS_ADMIN: u64 = 1 << 21;
    const NET_ADMIN: u64 = 1 << 12;
    const SETUID: u64 = 1 << 7;
    let mut cl = CsvCluster::loopback(1).unwrap();
    cl.mounts = true;
    cl.start_all().unwrap();
    let v = cl.add_volume_file(64 << 20).unwrap();
    cl.wait_mounted(v, Duration::from_secs(20)).unwrap();
    let pid = cl.pid(1).unwrap();
    let (bnd, eff) = (caps(pid, "CapBnd:"), caps(pid, "CapEff:"));
    for (name, bit) in [
        ("sys_module", SYS_MODULE),
        ("sys_rawio", SYS_RAWIO),
        ("sys_ptrace", SYS_PTRACE),
        ("net_admin", NET_ADMIN),
        ("setuid", SETUID),
    ] {
        assert_eq!(
            bnd & bit,
            0,
            "csvd keeps {name} in its bounding set ({bnd:x})"
        );
        assert_eq!(eff & bit, 0, "csvd keeps {name} ({eff:x})");
    }
    assert_ne!(
        eff & SYS_ADMIN,
        0,
        "csvd needs sys_admin for its FUSE mounts"
    );
    assert!(no_new_privs(pid), "csvd runs without no_new_privs");
    // Its mount works with what it kept.
    std::fs::write(cl.mountpoint(1, v).join("f"), b"x").unwrap();

    if !Path::new("/dev/kvm").exists() {
        println!("SKIP csv-vmm privileges: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vmm =
        csv_test_support::vmm::Vmm::spawn(dir.path(), "privs", &["run", "--memory", "32M"], None)
            .unwrap();
    vmm.wait_heartbeats(10, Duration::from_secs(20)).unwrap();
    let pid = vmm.pid();
    let (bnd, eff) = (caps(pid, "CapBnd:"), caps(pid, "CapEff:"));
    for (name, bit) in [
        ("sys_admin", SYS_ADMIN),
        ("sys_module", SYS_MODULE),
        ("sys_ptrace", SYS_PTRACE),
        ("net_admin", NET_ADMIN),
    ] {
        assert_eq!(
            bnd & bit,
            0,
            "csv-vmm keeps {name} in its bounding set ({bnd:x})"
        );
        assert_eq!(eff & bit, 0, "csv-vmm keeps {name} ({eff:x})");
    }
    assert!(no_new_privs(pid), "csv-vmm runs without no_new_privs");
}
