//! Physical to virtual: `csvctl p2v` of a loop device holding an ext4
//! filesystem in use (mounted, a writer appending and syncing records), and
//! `csvctl vhd convert` of a block device with an unreadable range (a loop
//! device over a file of a small FUSE filesystem that answers EIO there).

use csv_test_support::cmd::{output, run, workspace_bin};
use csv_test_support::{skip_unless, Need};
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Loop devices and mounts made by a test, undone at its end (also when it
/// fails).
#[derive(Default)]
struct Undo {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
}

impl Undo {
    fn attach(&mut self, file: &Path, ro: bool) -> String {
        let mut c = Command::new("losetup");
        if ro {
            c.arg("-r");
        }
        let dev = run(c.args(["--find", "--show", s(file)]))
            .unwrap()
            .trim()
            .to_string();
        self.loops.push(dev.clone());
        dev
    }

    fn mount(&mut self, dev: &str, at: &Path, opts: &str) {
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount").args(["-o", opts, dev, s(at)])).unwrap();
        self.mounts.push(at.to_path_buf());
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
        }
        for l in self.loops.drain(..).rev() {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
    }
}

/// File `i`'s bytes.
fn content(i: usize) -> Vec<u8> {
    let len = 1000 + i * 7919;
    (0..len)
        .map(|j| {
            (j as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(i as u32) as u8
        })
        .collect()
}

#[test]
fn a_disk_in_use_is_copied_consistently() {
    skip_unless!(
        Need::Root,
        Need::Command("losetup"),
        Need::Command("mkfs.ext4"),
        Need::Command("e2fsck"),
        Need::Command("qemu-img")
    );
    let dir = csv_test_support::temp_dir("p2v").unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F", s(&img)])).unwrap();
    let mut undo = Undo::default();
    let dev = undo.attach(&img, false);
    let mnt = dir.path().join("mnt");
    undo.mount(&dev, &mnt, "rw");
    for i in 0..30 {
        std::fs::write(mnt.join(format!("f{i}")), content(i)).unwrap();
    }
    // A writer appending 4 KiB records, each synced, all through the copy.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, count) = (stop.clone(), count.clone());
        let path = mnt.join("log");
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(path).unwrap();
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let rec: Vec<u8> = seq
                    .to_le_bytes()
                    .iter()
                    .copied()
                    .cycle()
                    .take(4096)
                    .collect();
                f.write_all(&rec).unwrap();
                f.sync_data().unwrap();
                seq += 1;
                count.store(seq, Ordering::SeqCst);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let vhd = dir.path().join("out.vhd");
    let t = Instant::now();
    let o = output(Command::new(workspace_bin("csvctl")).args(["p2v", &dev, s(&vhd)])).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{text}(p2v took {:?})", t.elapsed());
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("FIFREEZE") && text.contains("thawed"),
        "{text}"
    );
    // The writer goes on after the thaw.
    let after = count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert!(count.load(Ordering::SeqCst) > after, "the writer is stuck");
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    // The copy: a filesystem that checks clean, every file, and whole
    // records in order.
    let raw = dir.path().join("out.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "vpc", "-O", "raw", s(&vhd), s(&raw)]))
        .unwrap();
    let fsck = output(Command::new("e2fsck").args(["-n", "-f", s(&raw)])).unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let info = run(Command::new(workspace_bin("csvctl")).args(["vhd", "info", s(&vhd)])).unwrap();
    eprintln!("{info}");
    let copy = undo.attach(&raw, true);
    let cmnt = dir.path().join("copy");
    undo.mount(&copy, &cmnt, "ro,noload");
    for i in 0..30 {
        assert!(
            std::fs::read(cmnt.join(format!("f{i}"))).unwrap() == content(i),
            "file f{i} differs in the copy"
        );
    }
    let log = std::fs::read(cmnt.join("log")).unwrap();
    assert_eq!(log.len() % 4096, 0, "a torn record");
    assert!(!log.is_empty());
    for (i, rec) in log.chunks(4096).enumerate() {
        let want: Vec<u8> = (i as u64)
            .to_le_bytes()
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
        assert!(rec == want, "record {i} is not whole");
    }
    eprintln!(
        "{} records in the copy, {} written in all",
        log.len() / 4096,
        count.load(Ordering::SeqCst)
    );
}

/// A one-file FUSE filesystem: `disk`, `LEN` bytes of a pattern, that
/// answers EIO to any read touching `BAD`.
struct Faulty;

const LEN: u64 = 8 * MIB;
const BAD: std::ops::Range<u64> = 3 * MIB..3 * MIB + 64 * 1024;

fn pattern(off: u64) -> u8 {
    (off / 512) as u8 ^ 0x5a
}

fn attr(ino: u64) -> fuser::FileAttr {
    let t = std::time::SystemTime::UNIX_EPOCH;
    fuser::FileAttr {
        ino: fuser::INodeNo(ino),
        size: if ino == 1 { 0 } else { LEN },
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: if ino == 1 {
            fuser::FileType::Directory
        } else {
            fuser::FileType::RegularFile
        },
        perm: if ino == 1 { 0o755 } else { 0o444 },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl fuser::Filesystem for Faulty {
    fn lookup(
        &self,
        _req: &fuser::Request,
        parent: fuser::INodeNo,
        name: &OsStr,
        reply: fuser::ReplyEntry,
    ) {
        if parent.0 == 1 && name == "disk" {
            reply.entry(&Duration::ZERO, &attr(2), fuser::Generation(0));
        } else {
            reply.error(fuser::Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        reply.attr(&Duration::ZERO, &attr(ino.0));
    }

    fn open(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        // No page cache: every read of the loop device comes here as it
        // was asked.
        reply.opened(fuser::FileHandle(0), fuser::FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        let end = (offset + u64::from(size)).min(LEN);
        if offset < BAD.end && end > BAD.start {
            return reply.error(fuser::Errno::EIO);
        }
        let data: Vec<u8> = (offset..end).map(pattern).collect();
        reply.data(&data);
    }
}

#[test]
fn an_unreadable_range_of_a_device_is_reported_with_its_offset() {
    skip_unless!(
        Need::Root,
        Need::Device("/dev/fuse"),
        Need::Command("losetup")
    );
    let dir = csv_test_support::temp_dir("p2v-eio").unwrap();
    let at = dir.path().join("fuse");
    std::fs::create_dir_all(&at).unwrap();
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        fuse.as_raw_fd()
    );
    nix::mount::mount(
        Some("p2v-test"),
        &at,
        Some("fuse.p2v-test"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    let config = fuser::Config::default();
    let session = fuser::Session::from_fd(Faulty, fuse.into(), fuser::SessionACL::All, config)
        .and_then(fuser::Session::spawn)
        .unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(at.clone());
    let mut undo = Undo::default();
    let dev = undo.attach(&at.join("disk"), true);
    let vhd = dir.path().join("out.vhd");
    let o = output(Command::new(workspace_bin("csvctl")).args([
        "vhd",
        "convert",
        &dev,
        s(&vhd),
        "--to",
        "dynamic",
    ]))
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("{}{err}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "unreadable: {} bytes at offset {}",
            BAD.end - BAD.start,
            BAD.start
        )),
        "{err}"
    );
    assert!(err.contains("1 unreadable range(s)"), "{err}");
    // Every other byte is in the VHD; the bad range reads as zeros.
    let v = vhd::Vhd::open(&vhd, &vhd::OpenOptions::default()).unwrap();
    let mut got = vec![0u8; LEN as usize];
    v.read_at(&mut got, 0).unwrap();
    for (i, b) in got.iter().enumerate() {
        let off = i as u64;
        let want = if BAD.contains(&off) { 0 } else { pattern(off) };
        assert_eq!(*b, want, "byte {off}");
    }
    drop(undo);
    drop(session);
}
