//! The iSCSI initiator against a real target (tgtd): login with and
//! without CHAP, digests, many commands in flight, the R2T path, and the
//! data on the target's backing file.

use csv_test_support::tgt::{Target, TgtTarget};
use csv_test_support::{skip_unless, Need};
use iscsi_initiator::login::{Chap, LoginConfig};
use iscsi_initiator::text::Offer;
use iscsi_initiator::{new_isid, Error, Lun, Session};
use std::path::PathBuf;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const INITIATOR: &str = "iqn.2026-11.io.csv.test:host1";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn target(name: &str, size: u64) -> (TgtTarget, Target, PathBuf) {
    let mut tgt = TgtTarget::start().unwrap();
    let t = tgt.add_target(name).unwrap();
    let file = tgt.dir().join("lun1.img");
    tgt.add_lun_file(&t, 1, &file, size).unwrap();
    (tgt, t, file)
}

fn config(t: &Target) -> LoginConfig {
    LoginConfig {
        initiator: INITIATOR.into(),
        target: Some(t.iqn.clone()),
        isid: new_isid(),
        chap: None,
        mutual: None,
        offer: Offer::default(),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn login_read_write_and_backing_file_agree() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (tgt, t, file) = target("rw", 64 * MIB);
    runtime().block_on(async {
        let s = Session::connect(&tgt.portal().to_string(), &config(&t))
            .await
            .unwrap();
        let lun = Lun::open(s.clone(), 1).await.unwrap();
        assert_eq!(lun.capacity(), 64 * MIB);
        assert_eq!(lun.block_size(), 512);
        let inq = lun.inquiry().await.unwrap();
        assert_eq!(inq.device_type, 0, "{inq:?}");
        assert!(!lun.device_ids().await.unwrap().is_empty());
        let data = pattern(1 << 20, 7);
        lun.write(3 * MIB, &data, false).await.unwrap();
        lun.flush().await.unwrap();
        assert!(lun.read(3 * MIB, 1 << 20).await.unwrap() == data);
        let on_disk = std::fs::read(&file).unwrap();
        assert!(
            on_disk[3 * MIB as usize..4 * MIB as usize] == data[..],
            "backing file differs"
        );
        // Unaligned and out-of-range requests are refused before the wire.
        assert!(matches!(lun.read(100, 512).await, Err(Error::Invalid(_))));
        assert!(matches!(
            lun.read(64 * MIB, 512).await,
            Err(Error::Invalid(_))
        ));
        s.ping().await.unwrap();
        s.logout().await.unwrap();
        assert!(matches!(lun.read(0, 512).await, Err(Error::Closed { .. })));
    });
}

#[test]
fn many_commands_in_flight() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (tgt, t, file) = target("qd", 64 * MIB);
    runtime().block_on(async {
        let s = Session::connect(&tgt.portal().to_string(), &config(&t))
            .await
            .unwrap();
        let lun = Arc::new(Lun::open(s, 1).await.unwrap());
        let mut writes = Vec::new();
        for i in 0..128u64 {
            let lun = Arc::clone(&lun);
            writes.push(tokio::spawn(async move {
                lun.write(i * 65536, &pattern(65536, i as u8), false).await
            }));
        }
        for w in writes {
            w.await.unwrap().unwrap();
        }
        let mut reads = Vec::new();
        for i in 0..128u64 {
            let lun = Arc::clone(&lun);
            reads.push(tokio::spawn(async move {
                (i, lun.read(i * 65536, 65536).await)
            }));
        }
        for r in reads {
            let (i, data) = r.await.unwrap();
            assert!(data.unwrap() == pattern(65536, i as u8), "block {i}");
        }
        lun.flush().await.unwrap();
        let on_disk = std::fs::read(&file).unwrap();
        for i in 0..128usize {
            assert!(on_disk[i * 65536..(i + 1) * 65536] == pattern(65536, i as u8)[..]);
        }
    });
}

#[test]
fn writes_beyond_the_bursts_take_the_r2t_path() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (mut tgt, t, file) = target("r2t", 64 * MIB);
    // No immediate or unsolicited data, small bursts: every byte of a
    // write is asked for by R2Ts, many per command.
    tgt.set_param(&t, "ImmediateData", "No").unwrap();
    tgt.set_param(&t, "InitialR2T", "Yes").unwrap();
    tgt.set_param(&t, "MaxBurstLength", "65536").unwrap();
    tgt.set_param(&t, "FirstBurstLength", "16384").unwrap();
    tgt.set_param(&t, "MaxRecvDataSegmentLength", "8192")
        .unwrap();
    runtime().block_on(async {
        let s = Session::connect(&tgt.portal().to_string(), &config(&t))
            .await
            .unwrap();
        let p = s.params().clone();
        assert!(p.initial_r2t && !p.immediate_data, "{p:?}");
        assert_eq!(p.max_send_data, 8192);
        let lun = Lun::open(s, 1).await.unwrap();
        let data = pattern(3 * MIB as usize + 4096, 3);
        lun.write(MIB, &data, true).await.unwrap();
        assert!(lun.read(MIB, data.len()).await.unwrap() == data);
        let on_disk = std::fs::read(&file).unwrap();
        assert!(on_disk[MIB as usize..MIB as usize + data.len()] == data[..]);
    });
    // And with immediate + unsolicited data on, writes larger than
    // FirstBurstLength mix both.
    let (mut tgt, t, _file) = target("unsol", 16 * MIB);
    tgt.set_param(&t, "InitialR2T", "No").unwrap();
    tgt.set_param(&t, "FirstBurstLength", "65536").unwrap();
    runtime().block_on(async {
        let s = Session::connect(&tgt.portal().to_string(), &config(&t))
            .await
            .unwrap();
        assert!(!s.params().initial_r2t && s.params().immediate_data);
        let lun = Lun::open(s, 1).await.unwrap();
        let data = pattern(MIB as usize, 9);
        lun.write(0, &data, false).await.unwrap();
        assert!(lun.read(0, data.len()).await.unwrap() == data);
    });
}

#[test]
fn chap_one_way_and_mutual() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (mut tgt, t, _) = target("chap", 16 * MIB);
    tgt.set_chap(&t, "host1", "host1-secret-12").unwrap();
    let portal = tgt.portal().to_string();
    runtime().block_on(async {
        // No credentials: refused.
        let e = Session::connect(&portal, &config(&t)).await.unwrap_err();
        assert!(
            e.to_string().contains("authentication") || e.to_string().contains("CHAP"),
            "{e}"
        );
        // Wrong secret: refused by the target.
        let mut c = config(&t);
        c.chap = Some(Chap {
            user: "host1".into(),
            secret: "wrong-secret-99".into(),
        });
        let e = Session::connect(&portal, &c).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Login {
                    class: 2,
                    detail: 1,
                    ..
                }
            ),
            "{e}"
        );
        // Right secret.
        c.chap = Some(Chap {
            user: "host1".into(),
            secret: "host1-secret-12".into(),
        });
        let s = Session::connect(&portal, &c).await.unwrap();
        Lun::open(s, 1).await.unwrap();
    });
    // Mutual: the target proves itself too.
    tgt.set_mutual_chap(&t, "array1", "array1-secret-34")
        .unwrap();
    runtime().block_on(async {
        let mut c = config(&t);
        c.chap = Some(Chap {
            user: "host1".into(),
            secret: "host1-secret-12".into(),
        });
        c.mutual = Some(Chap {
            user: "array1".into(),
            secret: "array1-secret-34".into(),
        });
        let s = Session::connect(&portal, &c).await.unwrap();
        Lun::open(s, 1).await.unwrap();
        // Expecting another secret from the target: we refuse it.
        c.mutual = Some(Chap {
            user: "array1".into(),
            secret: "not-the-arrays-1".into(),
        });
        let e = Session::connect(&portal, &c).await.unwrap_err();
        assert!(matches!(e, Error::Auth { .. }), "{e}");
        assert!(
            !e.to_string().contains("secret-"),
            "secrets never appear in errors: {e}"
        );
    });
}

#[test]
fn digests_on() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (mut tgt, t, _) = target("digest", 16 * MIB);
    tgt.set_digests(&t, true, true).unwrap();
    runtime().block_on(async {
        let mut c = config(&t);
        c.offer.header_digest = true;
        c.offer.data_digest = true;
        let s = Session::connect(&tgt.portal().to_string(), &c)
            .await
            .unwrap();
        assert!(s.params().header_digest && s.params().data_digest);
        let lun = Lun::open(s, 1).await.unwrap();
        let data = pattern(512 * 1024, 1);
        lun.write(4096, &data, false).await.unwrap();
        assert!(lun.read(4096, data.len()).await.unwrap() == data);
    });
}

#[test]
fn discovery_lists_the_targets() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (mut tgt, t, _) = target("disc-a", 16 * MIB);
    let t2 = tgt.add_target("disc-b").unwrap();
    let portal = tgt.portal().to_string();
    runtime().block_on(async {
        let found = iscsi_initiator::session::discover(&portal, INITIATOR, None)
            .await
            .unwrap();
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&t.iqn.as_str()) && names.contains(&t2.iqn.as_str()),
            "{found:?}"
        );
        assert!(
            found.iter().all(|(_, p)| p.iter().any(|a| a == &portal)),
            "{found:?}"
        );
    });
}

/// Streams `count` 64 KiB writes (16 in flight, a flush every 32) and
/// returns how many were acknowledged.
async fn write_stream(lun: Arc<Lun>, count: u64) -> Result<u64, Error> {
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut handles = Vec::new();
    for i in 0..count {
        let permit = Arc::clone(&sem).acquire_owned().await.unwrap();
        let l = Arc::clone(&lun);
        handles.push(tokio::spawn(async move {
            let r = l
                .write(i * 65536, &pattern(65536, i as u8 ^ 0x5a), false)
                .await;
            drop(permit);
            r
        }));
        if i % 32 == 31 {
            lun.flush().await?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let mut acked = 0;
    for h in handles {
        h.await.unwrap()?;
        acked += 1;
    }
    lun.flush().await?;
    Ok(acked)
}

fn check_stream(file: &std::path::Path, count: u64) {
    let on_disk = std::fs::read(file).unwrap();
    for i in 0..count as usize {
        assert!(
            on_disk[i * 65536..(i + 1) * 65536] == pattern(65536, i as u8 ^ 0x5a)[..],
            "acknowledged write {i} is not on the backing file"
        );
    }
}

/// LUN 1 of `t` through a session with default settings.
fn open_lun(rt: &tokio::runtime::Runtime, tgt: &TgtTarget, t: &Target) -> Arc<Lun> {
    rt.block_on(async {
        let s = Session::connect(&tgt.portal().to_string(), &config(t))
            .await
            .unwrap();
        Arc::new(Lun::open(s, 1).await.unwrap())
    })
}

/// Streams 600 writes at a fresh target, applies `fault` to it 300 ms in,
/// and checks that the stream finished, the session was reinstated, and
/// every acknowledged write is on the backing file.
fn writes_survive(name: &str, fault: impl FnOnce(&mut TgtTarget, &Target)) {
    let (mut tgt, t, file) = target(name, 64 * MIB);
    let rt = runtime();
    let lun = open_lun(&rt, &tgt, &t);
    let stream = rt.spawn(write_stream(Arc::clone(&lun), 600));
    std::thread::sleep(std::time::Duration::from_millis(300));
    fault(&mut tgt, &t);
    let acked = rt.block_on(stream).unwrap().unwrap();
    assert_eq!(acked, 600);
    assert!(lun.session().reconnects() >= 1, "the fault was not noticed");
    check_stream(&file, 600);
}

#[test]
fn cut_connection_during_writes_loses_nothing() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    // The SAN path fails: connections dropped, logins refused for 1 s.
    writes_survive("cut", |tgt, t| {
        tgt.cut_initiator(t, INITIATOR).unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
        tgt.restore_initiator(t, INITIATOR).unwrap();
    });
}

#[test]
fn writes_of_a_dropped_connection_wait_for_the_target_to_settle() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    // The connection drops while tgtd is alive and may still be writing
    // what it received on it: the session reconnects at once but holds
    // the writes it sends again back for `settle`, and nothing is lost.
    let (tgt, t, file) = target("settle", 64 * MIB);
    let rt = runtime();
    let lun = open_lun(&rt, &tgt, &t);
    let mut round = 0u8;
    while lun.session().settles() == 0 && round < 10 {
        round += 1;
        // 32 writes of 1 MiB at once, and a drop while they are out.
        let writes: Vec<_> = (0..32u64)
            .map(|i| {
                let l = Arc::clone(&lun);
                rt.spawn(
                    async move { l.write(i * MIB, &pattern(MIB as usize, round), false).await },
                )
            })
            .collect();
        let t0 = std::time::Instant::now();
        while lun.session().in_flight() < 16 && t0.elapsed().as_secs() < 2 {
            std::thread::yield_now();
        }
        {
            let _in = rt.enter();
            lun.session().drop_connection();
        }
        for w in writes {
            rt.block_on(w).unwrap().unwrap();
        }
    }
    assert!(
        lun.session().settles() >= 1,
        "writes in flight at a drop went out again without waiting"
    );
    rt.block_on(lun.flush()).unwrap();
    let on_disk = std::fs::read(&file).unwrap();
    for i in 0..32usize {
        assert!(
            on_disk[i * MIB as usize..(i + 1) * MIB as usize] == pattern(MIB as usize, round)[..],
            "acknowledged write {i} of round {round} is not on the backing file"
        );
    }
}

#[test]
fn target_restart_during_writes_loses_nothing() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    // The array goes down hard and comes back.
    writes_survive("restart", |tgt, _| {
        tgt.restart(std::time::Duration::from_millis(700)).unwrap()
    });
}

#[test]
fn session_fails_over_to_the_next_portal() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    // Two controllers (two tgtd processes) export the same LUN file under
    // the same target name, like two paths to one array.
    let (mut a, t, file) = target("mp", 64 * MIB);
    let mut b = TgtTarget::start().unwrap();
    let tb = b.add_target("mp").unwrap();
    b.add_lun_file(&tb, 1, &file, 64 * MIB).unwrap();
    assert_eq!(t.iqn, tb.iqn);
    // Port 1 (tcpmux) has no listener: connections are refused at once.
    let dead = "127.0.0.1:1".to_string();
    let portals = vec![dead.clone(), a.portal().to_string(), b.portal().to_string()];
    let rt = runtime();
    let lun = rt.block_on(async {
        let s = Session::connect_paths(&portals, &config(&t), Default::default())
            .await
            .unwrap();
        // The first portal refuses connections: the session is on the second.
        assert_eq!(s.portal(), portals[1]);
        let paths = s.paths();
        assert!(
            matches!(paths[0].1, iscsi_initiator::session::PathState::Failed(_)),
            "{paths:?}"
        );
        Arc::new(Lun::open(s, 1).await.unwrap())
    });
    let stream = rt.spawn(write_stream(Arc::clone(&lun), 400));
    std::thread::sleep(std::time::Duration::from_millis(300));
    a.kill();
    let acked = rt.block_on(stream).unwrap().unwrap();
    assert_eq!(acked, 400);
    assert_eq!(
        lun.session().portal(),
        portals[2],
        "{:?}",
        lun.session().paths()
    );
    check_stream(&file, 400);
}

#[test]
fn persistent_reservations_fence_an_unregistered_host() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    use iscsi_initiator::scsi::{PrOut, PR_WE_RO};
    let (tgt, t, _) = target("pr", 16 * MIB);
    runtime().block_on(async {
        let portal = tgt.portal().to_string();
        let host_a = Lun::open(Session::connect(&portal, &config(&t)).await.unwrap(), 1)
            .await
            .unwrap();
        let mut cb = config(&t);
        cb.initiator = "iqn.2026-11.io.csv.test:host2".into();
        let host_b = Lun::open(Session::connect(&portal, &cb).await.unwrap(), 1)
            .await
            .unwrap();
        let block = vec![0x11u8; 512];
        // A registers and takes a Write Exclusive - Registrants Only reservation.
        host_a
            .reserve_out(PrOut::Register, 0, 0, 0xA)
            .await
            .unwrap();
        host_a
            .reserve_out(PrOut::Reserve, PR_WE_RO, 0xA, 0)
            .await
            .unwrap();
        assert_eq!(host_a.reservation().await.unwrap(), Some((0xA, PR_WE_RO)));
        host_a.write(0, &block, false).await.unwrap();
        // B is not registered: it may read, and its writes are fenced.
        host_b.read(0, 512).await.unwrap();
        let e = host_b.write(0, &block, false).await.unwrap_err();
        assert!(matches!(e, Error::Fenced { .. }), "{e}");
        // B registers and may write (registrants only)...
        host_b
            .reserve_out(PrOut::RegisterAndIgnore, 0, 0, 0xB)
            .await
            .unwrap();
        let mut keys = host_a.reservation_keys().await.unwrap();
        keys.sort_unstable();
        assert_eq!(keys, vec![0xA, 0xB]);
        host_b.write(512, &block, false).await.unwrap();
        // ...until A preempts B's key: B is fenced again.
        host_a
            .reserve_out(PrOut::Preempt, PR_WE_RO, 0xA, 0xB)
            .await
            .unwrap();
        assert_eq!(host_a.reservation_keys().await.unwrap(), vec![0xA]);
        let e = host_b.write(512, &block, false).await.unwrap_err();
        assert!(matches!(e, Error::Fenced { .. }), "{e}");
        // Clearing everything opens the LUN to all again.
        host_a.reserve_out(PrOut::Clear, 0, 0xA, 0).await.unwrap();
        assert_eq!(host_a.reservation().await.unwrap(), None);
        host_b.write(512, &block, false).await.unwrap();
    });
}

#[test]
fn a_vhd_made_through_the_initiator_is_read_by_qemu() {
    skip_unless!(Need::Root, Need::Command("tgtd"), Need::Command("qemu-img"));
    use vhd::{BlockIo, CreateOptions, DiskType, OpenOptions, Vhd};
    // The VHD lives on the LUN (whose size is fixed): make it a fixed disk
    // of the LUN's size minus its footer.
    let (tgt, t, file) = target("vhd", 32 * MIB);
    let rt = runtime();
    let lun = rt.block_on(async {
        Lun::open(
            Session::connect(&tgt.portal().to_string(), &config(&t))
                .await
                .unwrap(),
            1,
        )
        .await
        .unwrap()
    });
    let io = iscsi_initiator::BlockingLun::new(lun, rt.handle().clone());
    assert!(
        io.set_len(10).is_err(),
        "a LUN cannot be resized by the initiator"
    );
    let size = 32 * MIB - 512;
    Vhd::create_on(
        &io,
        "lun.vhd",
        &CreateOptions::new(DiskType::Fixed, size),
        None,
    )
    .unwrap();
    let v = Vhd::open_on(
        io,
        "lun.vhd",
        None,
        &OpenOptions {
            write: true,
            ..Default::default()
        },
    )
    .unwrap();
    let data = pattern(100_000, 4);
    v.write_at(&data, 12_345).unwrap(); // unaligned: edge blocks merged
    v.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    v.read_at(&mut back, 12_345).unwrap();
    assert!(back == data);
    drop(v);
    // The LUN's backing file is that VHD, byte for byte: QEMU agrees.
    let out = tgt.dir().join("out.raw");
    csv_test_support::cmd::run(
        std::process::Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&file)
            .arg(&out),
    )
    .unwrap();
    let raw = std::fs::read(&out).unwrap();
    assert_eq!(raw.len() as u64, size);
    assert!(raw[12_345..12_345 + data.len()] == data[..]);
}

#[test]
fn csvctl_san_discover_ls_reservations() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    use csv_test_support::cmd::{output, workspace_bin};
    use iscsi_initiator::scsi::{PrOut, PR_WE_RO};
    let (mut tgt, t, _) = target("cli", 48 * MIB);
    tgt.add_lun_file(&t, 2, &tgt.dir().join("lun2.img"), 16 * MIB)
        .unwrap();
    let csvctl = |args: &[&str]| {
        let o = output(std::process::Command::new(workspace_bin("csvctl")).args(args)).unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let portal = tgt.portal().to_string();
    let (ok, out) = csvctl(&["san", "discover", &portal]);
    assert!(ok && out.contains(&t.iqn), "{out}");
    let url = format!("iscsi://{portal}/{}", t.iqn);
    let (ok, out) = csvctl(&["san", "ls", &url, "--json"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&(48 * MIB).to_string()) && out.contains(&(16 * MIB).to_string()),
        "{out}"
    );
    runtime().block_on(async {
        let lun = Lun::open(Session::connect(&portal, &config(&t)).await.unwrap(), 1)
            .await
            .unwrap();
        lun.reserve_out(PrOut::Register, 0, 0, 0xC5F0_0001)
            .await
            .unwrap();
        lun.reserve_out(PrOut::Reserve, PR_WE_RO, 0xC5F0_0001, 0)
            .await
            .unwrap();
        let (ok, out) = csvctl(&["san", "reservations", &format!("{url}/1")]);
        assert!(
            ok && out.contains("0x00000000c5f00001") && out.contains("Registrants Only"),
            "{out}"
        );
    });
    // A wrong target name is a clear error, not a hang.
    let (ok, out) = csvctl(&[
        "san",
        "ls",
        &format!("iscsi://{portal}/iqn.2026-11.io.csv.test:nope"),
    ]);
    assert!(!ok && out.contains("target not found"), "{out}");
}

#[test]
fn target_nop_ins_are_answered_and_lun_reset_works() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (mut tgt, t, _) = target("nop", 16 * MIB);
    // tgtd pings every second and drops a connection after 2 unanswered.
    tgt.set_param(&t, "nop_interval", "1").unwrap();
    tgt.set_param(&t, "nop_count", "2").unwrap();
    runtime().block_on(async {
        let s = Session::connect(&tgt.portal().to_string(), &config(&t))
            .await
            .unwrap();
        let lun = Lun::open(s.clone(), 1).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        assert_eq!(
            s.reconnects(),
            0,
            "the target dropped us: its NOP-Ins went unanswered"
        );
        lun.read(0, 4096).await.unwrap();
        // LOGICAL UNIT RESET: function complete (0); the unit attention
        // it raises is absorbed by the next command.
        assert_eq!(s.task_management(1, 5, 0xffff_ffff).await.unwrap(), 0);
        lun.read(0, 4096).await.unwrap();
    });
}

/// A portal that answers every login with "moved temporarily" to `to`.
async fn redirecting_portal(to: String) -> std::net::SocketAddr {
    use iscsi_initiator::pdu::{op, Digests, Pdu};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut bhs = [0u8; 48];
            if c.read_exact(&mut bhs).await.is_err() {
                continue;
            }
            let (rest, data) = Pdu::lengths(&bhs, Digests::default(), 1 << 16).unwrap();
            let mut skip = vec![0u8; rest + data];
            let _ = c.read_exact(&mut skip).await;
            let mut r = Pdu::new(op::LOGIN_RESP, false);
            r.bhs[8..14].copy_from_slice(&bhs[8..14]);
            r.set_itt(u32::from_be_bytes([bhs[16], bhs[17], bhs[18], bhs[19]]));
            r.bhs[36] = 1; // status class: redirection
            r.bhs[37] = 1; // target moved temporarily
            r.data = iscsi_initiator::text::encode(&[("TargetAddress", format!("{to},1"))]);
            let _ = c.write_all(&r.encode(Digests::default())).await;
        }
    });
    addr
}

#[test]
fn login_follows_a_redirect() {
    skip_unless!(Need::Root, Need::Command("tgtd"));
    let (tgt, t, _) = target("redirect", 16 * MIB);
    runtime().block_on(async {
        let front = redirecting_portal(tgt.portal().to_string()).await;
        let s = Session::connect(&front.to_string(), &config(&t))
            .await
            .unwrap();
        let lun = Lun::open(s, 1).await.unwrap();
        assert_eq!(lun.capacity(), 16 * MIB);
    });
}

/// istgt (a second, independent userspace target) on a free port with one
/// 16 MiB disk; killed on drop.
struct Istgt {
    child: std::process::Child,
    portal: String,
    _dir: tempfile::TempDir,
}

impl Istgt {
    fn start() -> Istgt {
        let dir = csv_test_support::temp_dir("istgt").unwrap();
        let d = dir.path().display().to_string();
        let port = csv_test_support::free_port().unwrap();
        let uc = csv_test_support::free_port().unwrap();
        std::fs::File::create(dir.path().join("disk1.img"))
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        std::fs::write(
            dir.path().join("auth.conf"),
            "[AuthGroup10000]\n  Auth \"u\" \"unused-secret\"\n",
        )
        .unwrap();
        let conf = format!(
            "[Global]\n  NodeBase \"iqn.2026-11.io.csv.istgt\"\n  PidFile {d}/istgt.pid\n  AuthFile {d}/auth.conf\n  MediaDirectory {d}\n  \
             DiscoveryAuthMethod Auto\n  MaxSessions 16\n  MaxConnections 4\n\
             [UnitControl]\n  AuthMethod CHAP Mutual\n  AuthGroup AuthGroup10000\n  Portal UC1 127.0.0.1:{uc}\n  Netmask 127.0.0.1\n\
             [PortalGroup1]\n  Portal DA1 127.0.0.1:{port}\n\
             [InitiatorGroup1]\n  InitiatorName \"ALL\"\n  Netmask 127.0.0.0/8\n\
             [LogicalUnit1]\n  TargetName disk1\n  Mapping PortalGroup1 InitiatorGroup1\n  AuthMethod Auto\n  AuthGroup None\n  UnitType Disk\n  \
             LUN0 Storage {d}/disk1.img Auto\n"
        );
        let conf_path = dir.path().join("istgt.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = std::process::Command::new("istgt")
            .arg("-c")
            .arg(&conf_path)
            .arg("-D")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let portal = format!("127.0.0.1:{port}");
        csv_test_support::wait_until(std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(&portal).is_ok()
        })
        .unwrap();
        Istgt {
            child,
            portal,
            _dir: dir,
        }
    }
}

impl Drop for Istgt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn compare_and_write_against_istgt() {
    skip_unless!(Need::Root, Need::Command("istgt"));
    let target = Istgt::start();
    runtime().block_on(async {
        let mut c = config(&Target {
            tid: 1,
            iqn: "iqn.2026-11.io.csv.istgt:disk1".into(),
        });
        c.initiator = INITIATOR.into();
        let s = Session::connect(&target.portal, &c).await.unwrap();
        let lun = Lun::open(s, 0).await.unwrap();
        assert_eq!(lun.capacity(), 16 * MIB);
        let old = vec![0u8; 512];
        let new = vec![0x77u8; 512];
        match lun.compare_and_write(8, &old, &new).await {
            Err(Error::Unsupported { .. }) => {
                csv_test_support::skip::report("istgt does not implement COMPARE AND WRITE either");
                return;
            }
            r => assert!(r.unwrap(), "zeros compare equal"),
        }
        assert!(
            !lun.compare_and_write(8, &old, &[0x99u8; 512])
                .await
                .unwrap(),
            "miscompare reported"
        );
        assert!(
            lun.read(8 * 512, 512).await.unwrap() == new,
            "a miscompare writes nothing"
        );
        // And the ordinary I/O path against a second target implementation.
        let data = pattern(300_000 / 512 * 512, 2);
        lun.write(MIB, &data, false).await.unwrap();
        assert!(lun.read(MIB, data.len()).await.unwrap() == data);
    });
}
