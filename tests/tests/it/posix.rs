//! A POSIX behaviour suite run against a `/ClusterStorage` mount: the
//! ground pjdfstest and xfstests' generic tests cover for namespace
//! operations, permissions, sizes and holes, times, links and renames
//! (neither suite is packaged for Debian; this is our equivalent). Each
//! check prints a line; the known exceptions are checked too, so that
//! docs/FILESYSTEM.md stays true.

use csv_test_support::csvd::CsvCluster;
use csv_test_support::{skip_unless, Need};
use nix::errno::Errno;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

type Check = Result<(), String>;

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn expect_errno(what: &str, r: std::io::Result<impl Sized>, want: i32) -> Check {
    match errno_of(r) {
        Some(e) if e == want => Ok(()),
        got => Err(format!(
            "{what}: expected {}, got {:?}",
            Errno::from_raw(want),
            got.map(Errno::from_raw)
        )),
    }
}

fn ensure(cond: bool, what: impl Into<String>) -> Check {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: both paths are NUL-terminated strings that live across the
    // call; renameat2 reads them and nothing else.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn xattr_errno(path: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (c, n) = (cpath(path), CString::new(name).unwrap_or_default());
    // SAFETY: NUL-terminated path and name and a value of the length
    // given, all alive across the call.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Two hosts on loopback with Volume1 (`size` bytes) mounted on both, at
/// feature level 3; csvd gets `args`. The cluster and the two mounts.
fn two_hosts(size: u64, args: &[&str]) -> (CsvCluster, std::path::PathBuf, std::path::PathBuf) {
    let mut cl = CsvCluster::loopback(2).unwrap();
    cl.mounts = true;
    cl.extra_args = args.iter().map(|a| a.to_string()).collect();
    cl.start_all().unwrap();
    let v = cl.add_volume_file(size).unwrap();
    cl.wait_mounted(v, Duration::from_secs(20)).unwrap();
    let (d, other) = (cl.mountpoint(1, v), cl.mountpoint(2, v));
    wait_for_level_3(&d);
    (cl, d, other)
}

/// Waits until the cluster runs at feature level 3 (a fresh cluster starts
/// at the base level until every host has reported its own; extended
/// attributes answer EOPNOTSUPP until then).
fn wait_for_level_3(mnt: &Path) {
    let probe = mnt.join(".level-probe");
    fs::write(&probe, b"").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match xattr_errno(&probe, "user.probe", b"1", 0) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "feature level 3 not reached in 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("setxattr probe: {e}"),
        }
    }
    fs::remove_file(&probe).unwrap();
}

/// A POSIX ACL attribute's value: (tag, perm, id) entries; the entries
/// without an id (owner, group, mask, other) get the undefined id as the
/// kernel writes them.
fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        let id = if matches!(tag, 0x02 | 0x08) {
            id
        } else {
            u32::MAX
        };
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

fn xattr_set(path: &Path, name: &str, value: &[u8], flags: i32) -> Check {
    xattr_errno(path, name, value, flags).map_err(|e| format!("setxattr {name}: {e}"))
}

/// getxattr into a buffer of `len` bytes (0: asks the size).
fn xattr_get_into(path: &Path, name: &str, len: usize) -> std::io::Result<Vec<u8>> {
    let (c, n) = (cpath(path), CString::new(name).unwrap_or_default());
    let mut buf = vec![0u8; len];
    // SAFETY: NUL-terminated path and name, and a buffer of `len` bytes,
    // all alive across the call.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// getxattr asking the size only (ENODATA for a missing name).
fn xattr_get_errno(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    xattr_get_into(path, name, 0)
}

fn xattr_get_small(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    xattr_get_into(path, name, 1)
}

fn xattr_get(path: &Path, name: &str) -> Result<Vec<u8>, String> {
    let c = cpath(path);
    let n = CString::new(name).unwrap_or_default();
    // SAFETY: as above; a null buffer of length 0 asks for the size.
    let len = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(format!(
            "getxattr {name} size: {}",
            std::io::Error::last_os_error()
        ));
    }
    xattr_get_into(path, name, len as usize).map_err(|e| format!("getxattr {name}: {e}"))
}

fn xattr_list(path: &Path) -> Result<Vec<String>, String> {
    let c = cpath(path);
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated path and a 4096-byte buffer, alive across the
    // call.
    let r = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(format!("listxattr: {}", std::io::Error::last_os_error()));
    }
    buf.truncate(r as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn xattr_remove(path: &Path, name: &str) -> Check {
    let (c, n) = (cpath(path), CString::new(name).unwrap_or_default());
    // SAFETY: NUL-terminated path and name alive across the call.
    if unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "removexattr {name}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

fn run_checks(d: &Path, other: &Path) -> Vec<(&'static str, Check)> {
    let p = |n: &str| d.join(n);
    let mut out: Vec<(&'static str, Check)> = Vec::new();
    let mut check = |name: &'static str, f: &dyn Fn() -> Check| out.push((name, f()));

    check(
        "open O_CREAT|O_EXCL on an existing name fails EEXIST",
        &|| {
            File::create(p("excl")).map_err(|e| e.to_string())?;
            expect_errno(
                "second create",
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(p("excl")),
                libc::EEXIST,
            )
        },
    );
    check("open of a missing name fails ENOENT", &|| {
        expect_errno("open", File::open(p("missing")), libc::ENOENT)
    });
    check(
        "mkdir/rmdir/unlink errors: EEXIST, ENOTEMPTY, ENOTDIR, EISDIR",
        &|| {
            fs::create_dir(p("d1")).map_err(|e| e.to_string())?;
            expect_errno("mkdir again", fs::create_dir(p("d1")), libc::EEXIST)?;
            File::create(p("d1/f")).map_err(|e| e.to_string())?;
            expect_errno("rmdir non-empty", fs::remove_dir(p("d1")), libc::ENOTEMPTY)?;
            expect_errno("rmdir of a file", fs::remove_dir(p("d1/f")), libc::ENOTDIR)?;
            expect_errno("unlink of a dir", fs::remove_file(p("d1")), libc::EISDIR)
        },
    );
    check(
        "rename replaces a file atomically and keeps the source's content",
        &|| {
            fs::write(p("ra"), b"source").map_err(|e| e.to_string())?;
            fs::write(p("rb"), b"target").map_err(|e| e.to_string())?;
            let ino = fs::metadata(p("ra")).map_err(|e| e.to_string())?.ino();
            fs::rename(p("ra"), p("rb")).map_err(|e| e.to_string())?;
            ensure(!p("ra").exists(), "source still there")?;
            let m = fs::metadata(p("rb")).map_err(|e| e.to_string())?;
            ensure(m.ino() == ino, "target is not the source's inode")?;
            ensure(
                fs::read(p("rb")).map_err(|e| e.to_string())? == b"source",
                "content",
            )
        },
    );
    check(
        "rename rules for directories: ENOTEMPTY, EISDIR, ENOTDIR, EINVAL",
        &|| {
            fs::create_dir_all(p("rd/sub")).map_err(|e| e.to_string())?;
            fs::create_dir_all(p("full/x")).map_err(|e| e.to_string())?;
            fs::create_dir(p("empty")).map_err(|e| e.to_string())?;
            File::create(p("rf")).map_err(|e| e.to_string())?;
            expect_errno(
                "dir over non-empty dir",
                fs::rename(p("rd"), p("full")),
                libc::ENOTEMPTY,
            )?;
            expect_errno(
                "file over dir",
                fs::rename(p("rf"), p("empty")),
                libc::EISDIR,
            )?;
            expect_errno(
                "dir over file",
                fs::rename(p("empty"), p("rf")),
                libc::ENOTDIR,
            )?;
            expect_errno(
                "dir into itself",
                fs::rename(p("rd"), p("rd/sub/in")),
                libc::EINVAL,
            )?;
            fs::rename(p("rd"), p("empty")).map_err(|e| format!("dir over empty dir: {e}"))?;
            ensure(p("empty/sub").is_dir(), "moved dir lost its child")
        },
    );
    check(
        "renameat2(RENAME_NOREPLACE) over an existing name fails EEXIST",
        &|| {
            fs::write(p("n1"), b"1").map_err(|e| e.to_string())?;
            fs::write(p("n2"), b"2").map_err(|e| e.to_string())?;
            expect_errno(
                "noreplace",
                renameat2(&p("n1"), &p("n2"), libc::RENAME_NOREPLACE),
                libc::EEXIST,
            )?;
            renameat2(&p("n1"), &p("n3"), libc::RENAME_NOREPLACE).map_err(|e| e.to_string())
        },
    );
    check(
        "hard links count, survive unlink of the other name; none to dirs",
        &|| {
            fs::write(p("h1"), b"linked").map_err(|e| e.to_string())?;
            fs::hard_link(p("h1"), p("h2")).map_err(|e| e.to_string())?;
            ensure(
                fs::metadata(p("h1")).map_err(|e| e.to_string())?.nlink() == 2,
                "nlink != 2",
            )?;
            fs::remove_file(p("h1")).map_err(|e| e.to_string())?;
            let m = fs::metadata(p("h2")).map_err(|e| e.to_string())?;
            ensure(m.nlink() == 1, "nlink != 1 after unlink")?;
            ensure(
                fs::read(p("h2")).map_err(|e| e.to_string())? == b"linked",
                "content",
            )?;
            fs::create_dir(p("hd")).map_err(|e| e.to_string())?;
            expect_errno(
                "link to a dir",
                fs::hard_link(p("hd"), p("hd2")),
                libc::EPERM,
            )
        },
    );
    check("symlinks: readlink, lstat, open follows", &|| {
        fs::write(p("target"), b"t").map_err(|e| e.to_string())?;
        symlink("target", p("sl")).map_err(|e| e.to_string())?;
        ensure(
            fs::read_link(p("sl")).map_err(|e| e.to_string())? == Path::new("target"),
            "readlink",
        )?;
        ensure(
            fs::symlink_metadata(p("sl"))
                .map_err(|e| e.to_string())?
                .file_type()
                .is_symlink(),
            "lstat",
        )?;
        ensure(
            fs::read(p("sl")).map_err(|e| e.to_string())? == b"t",
            "follow",
        )
    });
    check("chmod and chown are kept and seen on another host", &|| {
        fs::write(p("perm"), b"x").map_err(|e| e.to_string())?;
        fs::set_permissions(p("perm"), fs::Permissions::from_mode(0o640))
            .map_err(|e| e.to_string())?;
        std::os::unix::fs::chown(p("perm"), Some(1234), Some(5678)).map_err(|e| e.to_string())?;
        let m = fs::metadata(other.join("perm")).map_err(|e| e.to_string())?;
        ensure(
            m.mode() & 0o7777 == 0o640 && m.uid() == 1234 && m.gid() == 5678,
            format!(
                "mode {:o} uid {} gid {}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            ),
        )
    });
    check("permissions are enforced for other users (EACCES)", &|| {
        fs::write(p("secret"), b"s").map_err(|e| e.to_string())?;
        fs::set_permissions(p("secret"), fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(p("secret"))
            .output()
            .map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&o.stderr);
        ensure(
            !o.status.success() && err.contains("Permission denied"),
            format!("nobody read it: {err}"),
        )
    });
    check(
        "truncate: grow reads zeros, shrink then grow shows no old bytes",
        &|| {
            fs::write(p("tr"), vec![7u8; 10000]).map_err(|e| e.to_string())?;
            let f = OpenOptions::new()
                .write(true)
                .open(p("tr"))
                .map_err(|e| e.to_string())?;
            f.set_len(100).map_err(|e| e.to_string())?;
            f.set_len(20000).map_err(|e| e.to_string())?;
            drop(f);
            let b = fs::read(p("tr")).map_err(|e| e.to_string())?;
            ensure(b.len() == 20000, "size")?;
            ensure(
                b[..100].iter().all(|&x| x == 7) && b[100..].iter().all(|&x| x == 0),
                "old bytes after shrink+grow",
            )
        },
    );
    check("O_APPEND writes land at the end", &|| {
        fs::write(p("ap"), b"abc").map_err(|e| e.to_string())?;
        let mut f = OpenOptions::new()
            .append(true)
            .open(p("ap"))
            .map_err(|e| e.to_string())?;
        f.write_all(b"def").map_err(|e| e.to_string())?;
        drop(f);
        ensure(
            fs::read(p("ap")).map_err(|e| e.to_string())? == b"abcdef",
            "content",
        )
    });
    check(
        "pwrite far past the end leaves a hole that reads as zeros (10 GiB sparse file)",
        &|| {
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(p("sparse"))
                .map_err(|e| e.to_string())?;
            f.write_all_at(b"end", 10 << 30)
                .map_err(|e| e.to_string())?;
            let mut b = vec![1u8; 4096];
            f.read_exact_at(&mut b, 5 << 30)
                .map_err(|e| e.to_string())?;
            ensure(b.iter().all(|&x| x == 0), "hole not zero")?;
            let mut e = [0u8; 3];
            f.read_exact_at(&mut e, 10 << 30)
                .map_err(|e| e.to_string())?;
            ensure(&e == b"end", "tail")?;
            ensure(
                f.metadata().map_err(|e| e.to_string())?.len() == (10 << 30) + 3,
                "size",
            )
        },
    );
    check(
        "mtime moves on write; utimensat sets it to the nanosecond",
        &|| {
            fs::write(p("mt"), b"1").map_err(|e| e.to_string())?;
            let t = std::time::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
            let f = File::options()
                .write(true)
                .open(p("mt"))
                .map_err(|e| e.to_string())?;
            f.set_modified(t).map_err(|e| e.to_string())?;
            drop(f);
            let seen = fs::metadata(other.join("mt"))
                .map_err(|e| e.to_string())?
                .modified()
                .map_err(|e| e.to_string())?;
            ensure(seen == t, format!("utimensat: {seen:?} on the other host"))?;
            fs::write(p("mt"), b"22").map_err(|e| e.to_string())?;
            ensure(
                fs::metadata(other.join("mt"))
                    .map_err(|e| e.to_string())?
                    .modified()
                    .map_err(|e| e.to_string())?
                    > t,
                "write did not move mtime",
            )
        },
    );
    check("readdir lists . and .. and every one of 500 names", &|| {
        fs::create_dir(p("many")).map_err(|e| e.to_string())?;
        for i in 0..500 {
            File::create(p(&format!("many/f{i:03}"))).map_err(|e| e.to_string())?;
        }
        let mut names: Vec<String> = fs::read_dir(other.join("many"))
            .map_err(|e| e.to_string())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        names.sort();
        ensure(
            names.len() == 500 && names[0] == "f000" && names[499] == "f499",
            format!("{} names", names.len()),
        )?;
        let o = Command::new("ls")
            .arg("-a")
            .arg(p("many"))
            .output()
            .map_err(|e| e.to_string())?;
        let s = String::from_utf8_lossy(&o.stdout);
        ensure(
            s.lines().any(|l| l == ".") && s.lines().any(|l| l == ".."),
            "no . or ..",
        )
    });
    check("names: 255 bytes work, 256 fail ENAMETOOLONG", &|| {
        File::create(p(&"n".repeat(255))).map_err(|e| e.to_string())?;
        expect_errno("256", File::create(p(&"n".repeat(256))), libc::ENAMETOOLONG)
    });
    check("statfs reports the volume's size and free space", &|| {
        let s = nix::sys::statvfs::statvfs(d).map_err(|e| e.to_string())?;
        ensure(
            s.blocks() > 0 && s.blocks_free() <= s.blocks() && s.blocks_free() > 0,
            format!("{s:?}"),
        )
    });
    check(
        "fallocate reserves space and extends the size (KEEP_SIZE does not)",
        &|| {
            let f = File::create(p("fa")).map_err(|e| e.to_string())?;
            nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, 1 << 20)
                .map_err(|e| e.to_string())?;
            ensure(
                f.metadata().map_err(|e| e.to_string())?.len() == 1 << 20,
                "size after fallocate",
            )?;
            nix::fcntl::fallocate(
                &f,
                nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                1 << 20,
                1 << 20,
            )
            .map_err(|e| e.to_string())?;
            ensure(
                f.metadata().map_err(|e| e.to_string())?.len() == 1 << 20,
                "KEEP_SIZE changed the size",
            )?;
            let mut b = vec![1u8; 1 << 20];
            File::open(p("fa"))
                .and_then(|mut g| g.read_exact(&mut b))
                .map_err(|e| e.to_string())?;
            ensure(b.iter().all(|&x| x == 0), "fallocated range not zero")
        },
    );
    check("fsync of a file and of a directory succeed", &|| {
        let f = File::create(p("fs")).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        File::open(d)
            .and_then(|g| g.sync_all())
            .map_err(|e| e.to_string())
    });
    check(
        "an unlinked open file stays readable through its descriptor",
        &|| {
            fs::write(p("ul"), b"still here").map_err(|e| e.to_string())?;
            let mut f = File::open(p("ul")).map_err(|e| e.to_string())?;
            fs::remove_file(p("ul")).map_err(|e| e.to_string())?;
            let mut s = String::new();
            f.read_to_string(&mut s).map_err(|e| e.to_string())?;
            ensure(s == "still here", "content")?;
            ensure(
                f.metadata().map_err(|e| e.to_string())?.nlink() == 0,
                "fstat nlink",
            )
        },
    );
    check(
        "a file unlinked on the other host while open here grows to 64 MiB; its space comes back after the last close",
        &|| {
            let free = |m: &Path| {
                nix::sys::statvfs::statvfs(m)
                    .map(|s| s.blocks_free() * s.fragment_size())
                    .map_err(|e| e.to_string())
            };
            let before = free(other)?;
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(p("orphan"))
                .map_err(|e| e.to_string())?;
            f.write_all(b"head").map_err(|e| e.to_string())?;
            f.sync_all().map_err(|e| e.to_string())?;
            fs::remove_file(other.join("orphan")).map_err(|e| e.to_string())?;
            ensure(fs::metadata(p("orphan")).is_err(), "the name is gone")?;
            let chunk = vec![0x5Au8; 1 << 20];
            for _ in 0..64 {
                f.write_all(&chunk).map_err(|e| format!("growing the unlinked file: {e}"))?;
            }
            f.sync_all().map_err(|e| format!("fsync of the unlinked file: {e}"))?;
            let mut back = vec![0u8; 1 << 20];
            f.read_exact_at(&mut back, 4 + (63 << 20)).map_err(|e| e.to_string())?;
            ensure(back == chunk, "the last MiB reads back")?;
            ensure(f.metadata().map_err(|e| e.to_string())?.len() == 4 + (64 << 20), "size")?;
            let held = free(other)?;
            ensure(held + (60 << 20) <= before, format!("64 MiB not taken: {before} -> {held}"))?;
            drop(f);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let now = free(other)?;
                if now + (1 << 20) >= before {
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!("space not back 20 s after the close: {before} -> {now}"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        },
    );
    check("mmap: a shared mapping writes the file", &|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(p("mm"))
            .map_err(|e| e.to_string())?;
        f.set_len(8192).map_err(|e| e.to_string())?;
        // SAFETY: maps 8 KiB of a file opened read-write, writes inside the
        // mapping, syncs and unmaps it before the file is read again.
        unsafe {
            let a = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            if a == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error().to_string());
            }
            std::ptr::copy_nonoverlapping(b"mapped".as_ptr(), (a as *mut u8).add(4096), 6);
            libc::msync(a, 8192, libc::MS_SYNC);
            libc::munmap(a, 8192);
        }
        let mut b = [0u8; 6];
        f.seek(SeekFrom::Start(4096))
            .and_then(|_| f.read_exact(&mut b))
            .map_err(|e| e.to_string())?;
        ensure(&b == b"mapped", "mapping not written back")
    });
    check(
        "special files made on one host are seen on the other with type, mode and rdev",
        &|| {
            use nix::sys::stat::{makedev, mknod, Mode, SFlag};
            let m = |b| Mode::from_bits_truncate(b);
            nix::unistd::mkfifo(&p("fifo"), m(0o640)).map_err(|e| e.to_string())?;
            mknod(&p("chr"), SFlag::S_IFCHR, m(0o600), makedev(1, 3)).map_err(|e| e.to_string())?;
            mknod(&p("blk"), SFlag::S_IFBLK, m(0o660), makedev(7, 42))
                .map_err(|e| e.to_string())?;
            let sock =
                std::os::unix::net::UnixListener::bind(p("sock")).map_err(|e| e.to_string())?;
            use std::os::unix::fs::FileTypeExt;
            let meta =
                |n: &str| fs::symlink_metadata(other.join(n)).map_err(|e| format!("{n}: {e}"));
            let f = meta("fifo")?;
            ensure(
                f.file_type().is_fifo() && f.mode() & 0o7777 == 0o640,
                format!("fifo: {:o}", f.mode()),
            )?;
            let c = meta("chr")?;
            ensure(
                c.file_type().is_char_device()
                    && c.rdev() == makedev(1, 3)
                    && c.mode() & 0o7777 == 0o600,
                format!("chr: {:o} rdev {:x}", c.mode(), c.rdev()),
            )?;
            let b = meta("blk")?;
            ensure(
                b.file_type().is_block_device() && b.rdev() == makedev(7, 42),
                format!("blk: {:o} rdev {:x}", b.mode(), b.rdev()),
            )?;
            ensure(meta("sock")?.file_type().is_socket(), "socket")?;
            // A FIFO carries data within one host.
            let path = p("fifo");
            let writer = std::thread::spawn(move || fs::write(path, b"through the pipe"));
            let got = fs::read(p("fifo")).map_err(|e| e.to_string())?;
            writer
                .join()
                .map_err(|_| "writer panicked")?
                .map_err(|e| e.to_string())?;
            ensure(got == b"through the pipe", "fifo data")?;
            drop(sock);
            for n in ["fifo", "chr", "blk", "sock"] {
                fs::remove_file(other.join(n)).map_err(|e| format!("unlink {n}: {e}"))?;
            }
            Ok(())
        },
    );
    check(
        "touch -a -d sets an access time every host reads back",
        &|| {
            fs::write(p("at"), b"a").map_err(|e| e.to_string())?;
            let t = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
            let mtime = fs::metadata(p("at"))
                .map_err(|e| e.to_string())?
                .modified()
                .map_err(|e| e.to_string())?;
            let o = Command::new("touch")
                .args(["-a", "-d", "@1500000000"])
                .arg(p("at"))
                .output()
                .map_err(|e| e.to_string())?;
            ensure(
                o.status.success(),
                format!("touch: {}", String::from_utf8_lossy(&o.stderr)),
            )?;
            let m = fs::metadata(other.join("at")).map_err(|e| e.to_string())?;
            ensure(
                m.accessed().map_err(|e| e.to_string())? == t,
                format!("atime {}", m.atime()),
            )?;
            ensure(
                m.modified().map_err(|e| e.to_string())? == mtime,
                "touch -a moved mtime",
            )?;
            // Mounted noatime (the default): a read does not move it.
            fs::read(p("at")).map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(5500));
            let m = fs::metadata(other.join("at")).map_err(|e| e.to_string())?;
            ensure(
                m.accessed().map_err(|e| e.to_string())? == t,
                format!("a read moved the access time under noatime: {}", m.atime()),
            )
        },
    );
    check(
        "extended attributes: set on one host, read, listed and removed on the other",
        &|| {
            fs::write(p("xa"), b"x").map_err(|e| e.to_string())?;
            let q = other.join("xa");
            xattr_set(&p("xa"), "user.colour", b"blue", 0)?;
            xattr_set(&p("xa"), "trusted.csv", &[0, 1, 2, 255], 0)?;
            ensure(xattr_get(&q, "user.colour")? == b"blue", "user.colour")?;
            ensure(
                xattr_get(&q, "trusted.csv")? == [0, 1, 2, 255],
                "trusted.csv",
            )?;
            let names = xattr_list(&q)?;
            ensure(
                names == ["trusted.csv", "user.colour"],
                format!("list: {names:?}"),
            )?;
            // XATTR_CREATE on an existing name, XATTR_REPLACE on a missing one.
            expect_errno(
                "create again",
                xattr_errno(&q, "user.colour", b"red", libc::XATTR_CREATE),
                libc::EEXIST,
            )?;
            expect_errno(
                "replace missing",
                xattr_errno(&q, "user.none", b"x", libc::XATTR_REPLACE),
                libc::ENODATA,
            )?;
            expect_errno(
                "get missing",
                xattr_get_errno(&q, "user.none"),
                libc::ENODATA,
            )?;
            // A buffer too small is ERANGE; a value over 64 KiB is E2BIG.
            expect_errno(
                "small buffer",
                xattr_get_small(&q, "user.colour"),
                libc::ERANGE,
            )?;
            expect_errno(
                "too big",
                xattr_errno(&q, "user.big", &vec![7u8; (64 << 10) + 1], 0),
                libc::E2BIG,
            )?;
            let big = vec![9u8; 64 << 10];
            xattr_set(&q, "user.big", &big, 0)?;
            ensure(xattr_get(&p("xa"), "user.big")? == big, "64 KiB value")?;
            xattr_remove(&q, "user.colour")?;
            expect_errno(
                "removed",
                xattr_get_errno(&p("xa"), "user.colour"),
                libc::ENODATA,
            )?;
            // Directories and symlinks' targets carry them too.
            fs::create_dir(p("xd")).map_err(|e| e.to_string())?;
            xattr_set(&p("xd"), "user.d", b"dir", 0)?;
            ensure(
                xattr_get(&other.join("xd"), "user.d")? == b"dir",
                "dir xattr",
            )
        },
    );
    check(
        "POSIX ACLs set on one host are enforced on the other; a default ACL is inherited",
        &|| {
            // user::rw- user:65534:--- group::r-- mask::r-- other::r--
            fs::write(p("acl-f"), b"acl").map_err(|e| e.to_string())?;
            fs::set_permissions(p("acl-f"), fs::Permissions::from_mode(0o644))
                .map_err(|e| e.to_string())?;
            let deny = acl_bytes(&[
                (0x01, 6, 0),
                (0x02, 0, 65534),
                (0x04, 4, 0),
                (0x10, 4, 0),
                (0x20, 4, 0),
            ]);
            xattr_set(&p("acl-f"), "system.posix_acl_access", &deny, 0)?;
            let as_user = |uid: &str, cmd: &str| {
                Command::new("setpriv")
                    .args([
                        &format!("--reuid={uid}"),
                        &format!("--regid={uid}"),
                        "--clear-groups",
                        "sh",
                        "-c",
                        cmd,
                    ])
                    .output()
                    .map(|o| o.status.success())
                    .map_err(|e| e.to_string())
            };
            let f2 = other.join("acl-f").display().to_string();
            ensure(
                !as_user("65534", &format!("cat {f2}"))?,
                "user 65534 read despite its ACL entry",
            )?;
            ensure(
                as_user("65533", &format!("cat {f2}"))?,
                "another user could not read (other::r--)",
            )?;
            ensure(
                xattr_get(&other.join("acl-f"), "system.posix_acl_access")? == deny,
                "ACL read back",
            )?;
            // A malformed ACL is refused.
            expect_errno(
                "malformed ACL",
                xattr_errno(&p("acl-f"), "system.posix_acl_access", &[2, 0, 0, 0, 9], 0),
                libc::EINVAL,
            )?;

            // default: user::rwx user:65534:rwx group::r-x mask::rwx other::---
            fs::create_dir(p("acl-d")).map_err(|e| e.to_string())?;
            let def = acl_bytes(&[
                (0x01, 7, 0),
                (0x02, 7, 65534),
                (0x04, 5, 0),
                (0x10, 7, 0),
                (0x20, 0, 0),
            ]);
            xattr_set(&p("acl-d"), "system.posix_acl_default", &def, 0)?;
            fs::set_permissions(p("acl-d"), fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
            // Made on the other host with mode 0666 (and this test's umask).
            fs::write(other.join("acl-d/new"), b"inherited").map_err(|e| e.to_string())?;
            fs::create_dir(other.join("acl-d/sub")).map_err(|e| e.to_string())?;
            let m = fs::metadata(p("acl-d/new")).map_err(|e| e.to_string())?;
            ensure(
                m.mode() & 0o777 == 0o660,
                format!("inherited mode {:o}", m.mode() & 0o777),
            )?;
            let access = xattr_get(&p("acl-d/new"), "system.posix_acl_access")?;
            ensure(
                access
                    .get(4..)
                    .unwrap_or_default()
                    .chunks(8)
                    .any(|e| e == [2, 0, 7, 0, 0xFE, 0xFF, 0, 0]),
                "the new file's ACL names user 65534",
            )?;
            ensure(
                xattr_get(&p("acl-d/sub"), "system.posix_acl_default")? == def,
                "a new directory keeps the default ACL",
            )?;
            let n = p("acl-d/new").display().to_string();
            ensure(
                as_user("65534", &format!("echo more >> {n}"))?,
                "user 65534 could not write through the inherited ACL",
            )?;
            ensure(
                !as_user("65533", &format!("cat {n}"))?,
                "another user read (other::---)",
            )
        },
    );
    check(
        "RENAME_EXCHANGE swaps two names atomically under concurrent lookups",
        &|| {
            fs::write(p("ex-a"), b"A").map_err(|e| e.to_string())?;
            fs::create_dir(p("ex-b")).map_err(|e| e.to_string())?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let looker = {
                let (stop, a, b) = (stop.clone(), other.join("ex-a"), other.join("ex-b"));
                std::thread::spawn(move || {
                    let mut missing = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if fs::symlink_metadata(&a).is_err() || fs::symlink_metadata(&b).is_err() {
                            missing += 1;
                        }
                    }
                    missing
                })
            };
            for _ in 0..50 {
                renameat2(&p("ex-a"), &p("ex-b"), libc::RENAME_EXCHANGE)
                    .map_err(|e| e.to_string())?;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let missing = looker.join().map_err(|_| "looker panicked")?;
            ensure(
                missing == 0,
                format!("a name was missing {missing} times during the swaps"),
            )?;
            // 50 swaps: back where they started.
            ensure(
                fs::read(other.join("ex-a")).map_err(|e| e.to_string())? == b"A",
                "ex-a",
            )?;
            renameat2(&p("ex-a"), &p("ex-b"), libc::RENAME_EXCHANGE).map_err(|e| e.to_string())?;
            ensure(
                fs::metadata(other.join("ex-a"))
                    .map_err(|e| e.to_string())?
                    .is_dir(),
                "ex-a is the dir now",
            )?;
            ensure(
                fs::read(other.join("ex-b")).map_err(|e| e.to_string())? == b"A",
                "ex-b is the file",
            )?;
            expect_errno(
                "exchange with a missing name",
                renameat2(&p("ex-a"), &p("ex-none"), libc::RENAME_EXCHANGE),
                libc::ENOENT,
            )
        },
    );
    out
}

#[test]
fn posix_behaviour_suite() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Command("setpriv"),
        Need::Device("/dev/fuse")
    );
    let (_cl, d, other) = two_hosts(1 << 30, &[]);
    let results = run_checks(&d, &other);
    let mut failed = Vec::new();
    for (name, r) in &results {
        match r {
            Ok(()) => eprintln!("ok    {name}"),
            Err(e) => {
                eprintln!("FAIL  {name}: {e}");
                failed.push(*name);
            }
        }
    }
    eprintln!("{} checks, {} failed", results.len(), failed.len());
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// With `--atime lazy` a read moves an access time older than the
/// modification time, and the other host sees it within the 5 s batch.
#[test]
fn lazy_access_times_move_on_read_and_reach_the_other_host() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Device("/dev/fuse")
    );
    let (_cl, d, other) = two_hosts(256 << 20, &["--atime", "lazy"]);
    fs::write(d.join("f"), b"lazy").unwrap();
    let o = Command::new("touch")
        .args(["-a", "-d", "@1500000000"])
        .arg(d.join("f"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "touch: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        fs::metadata(other.join("f")).unwrap().atime(),
        1_500_000_000
    );
    let before = std::time::SystemTime::now();
    assert_eq!(fs::read(d.join("f")).unwrap(), b"lazy");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let a = fs::metadata(other.join("f")).unwrap().accessed().unwrap();
        if a + Duration::from_secs(1) >= before {
            eprintln!("access time moved by the read, seen on host 2");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the read's access time did not reach host 2 in 15 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `fcntl` on an open file: `cmd` with a lock of `typ` over
/// `[start, start + len)` (len 0: to the end); the lock as the kernel
/// answers it (for F_GETLK).
fn fcntl_lock(f: &File, cmd: i32, typ: i32, start: i64, len: i64) -> std::io::Result<libc::flock> {
    // SAFETY: a zeroed flock is a valid value of the C struct.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = typ as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = start;
    l.l_len = len;
    // SAFETY: an open descriptor and a pointer to a flock that lives
    // across the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut l) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(l)
    }
}

fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: an open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

extern "C" fn on_sigusr1(_: libc::c_int) {}

/// Locks across two hosts: a record lock held on host 1 makes F_SETLK on
/// host 2 fail with EAGAIN and F_GETLK there name it; F_SETLKW on host 2
/// wakes when host 1 releases (time measured); closing any descriptor of
/// the file releases the process's record locks; OFD locks and flock
/// the same; a signal ends a wait with EINTR.
#[test]
fn locks_taken_on_one_host_stand_in_the_way_on_the_other() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Device("/dev/fuse")
    );
    let (_cl, d, other) = two_hosts(256 << 20, &[]);
    fs::write(d.join("db"), vec![0u8; 4096]).unwrap();
    // One host at a time may have a file open for writing (the write
    // lease): host 1 writes, host 2 reads, and read locks meet write locks.
    let open = |p: &Path| OpenOptions::new().read(true).write(true).open(p).unwrap();
    let open_ro = |p: &Path| File::open(p).unwrap();
    let (h1, h2) = (open(&d.join("db")), open_ro(&other.join("db")));

    // Record locks.
    fcntl_lock(&h1, libc::F_SETLK, libc::F_WRLCK, 0, 100).unwrap();
    let me = std::process::id() as i32;
    let e = fcntl_lock(&h2, libc::F_SETLK, libc::F_RDLCK, 50, 10).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
    let held = fcntl_lock(&h2, libc::F_GETLK, libc::F_RDLCK, 0, 0).unwrap();
    assert_eq!(
        (i32::from(held.l_type), held.l_start, held.l_len, held.l_pid),
        (libc::F_WRLCK, 0, 100, me),
        "F_GETLK names the holder"
    );
    fcntl_lock(&h2, libc::F_SETLK, libc::F_RDLCK, 100, 10).unwrap();
    fcntl_lock(&h2, libc::F_SETLK, libc::F_UNLCK, 100, 10).unwrap();

    // F_SETLKW on host 2 wakes when host 1 unlocks. (The waiter borrows
    // the descriptor: closing a copy would drop the process's locks.)
    let (released, woke) = std::thread::scope(|sc| {
        let waiter = sc.spawn(|| {
            fcntl_lock(&h2, libc::F_SETLKW, libc::F_RDLCK, 0, 100)
                .map(|_| std::time::Instant::now())
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(!waiter.is_finished(), "F_SETLKW did not wait");
        let released = std::time::Instant::now();
        fcntl_lock(&h1, libc::F_SETLK, libc::F_UNLCK, 0, 100).unwrap();
        (released, waiter.join().unwrap().unwrap())
    });
    let ms = woke.duration_since(released).as_secs_f64() * 1e3;
    eprintln!("F_SETLKW on host 2 woke {ms:.1} ms after host 1's unlock");
    assert!(ms < 500.0, "woke {ms} ms after the release");
    // Host 2's read lock keeps host 1 from writing there; closing any
    // descriptor of the file on host 2 drops the process's record locks.
    let e = fcntl_lock(&h1, libc::F_SETLK, libc::F_WRLCK, 0, 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
    drop(open_ro(&other.join("db")));
    fcntl_lock(&h1, libc::F_SETLK, libc::F_WRLCK, 0, 1).unwrap();
    fcntl_lock(&h1, libc::F_SETLK, libc::F_UNLCK, 0, 1).unwrap();

    // OFD locks.
    fcntl_lock(&h1, libc::F_OFD_SETLK, libc::F_WRLCK, 1000, 10).unwrap();
    let e = fcntl_lock(&h2, libc::F_OFD_SETLK, libc::F_RDLCK, 1005, 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
    fcntl_lock(&h1, libc::F_OFD_SETLK, libc::F_UNLCK, 1000, 10).unwrap();
    fcntl_lock(&h2, libc::F_OFD_SETLK, libc::F_RDLCK, 1005, 1).unwrap();
    fcntl_lock(&h2, libc::F_OFD_SETLK, libc::F_UNLCK, 1005, 1).unwrap();

    // Two owners waiting on each other's ranges across hosts: the request
    // that would close the cycle gets EDEADLK; the other waits on, and
    // wakes once the range it waits for is unlocked.
    fcntl_lock(&h1, libc::F_SETLK, libc::F_WRLCK, 0, 10).unwrap();
    fcntl_lock(&h2, libc::F_SETLK, libc::F_RDLCK, 10, 10).unwrap();
    std::thread::scope(|sc| {
        let waiter = sc.spawn(|| fcntl_lock(&h1, libc::F_SETLKW, libc::F_WRLCK, 10, 10));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "F_SETLKW on host 1 did not wait");
        let t = std::time::Instant::now();
        let e = fcntl_lock(&h2, libc::F_SETLKW, libc::F_RDLCK, 0, 10).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EDEADLK), "{e}");
        eprintln!(
            "EDEADLK across hosts after {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        assert!(!waiter.is_finished(), "the other waiter gave up");
        fcntl_lock(&h2, libc::F_SETLK, libc::F_UNLCK, 10, 10).unwrap();
        waiter.join().unwrap().unwrap();
    });
    fcntl_lock(&h1, libc::F_SETLK, libc::F_UNLCK, 0, 20).unwrap();

    // flock; the lock goes when its file is closed.
    let f1 = open(&d.join("db"));
    flock(&f1, libc::LOCK_EX).unwrap();
    let f2 = open_ro(&other.join("db"));
    let e = flock(&f2, libc::LOCK_EX | libc::LOCK_NB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK));
    drop(f1);
    // The kernel sends FUSE's release after close returns: the lock goes
    // a moment later, not at once.
    let t = std::time::Instant::now();
    while let Err(e) = flock(&f2, libc::LOCK_EX | libc::LOCK_NB) {
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the flock lock of a closed file stayed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "flock free on host 2 {:.1} ms after the close on host 1",
        t.elapsed().as_secs_f64() * 1e3
    );
    flock(&f2, libc::LOCK_UN).unwrap();

    // QEMU's image locking (OFD locks) works across hosts: a VM on host 2
    // reading an image (a read-only drive, which does not share writing)
    // makes qemu-io refuse, with its image-lock error, to open it for
    // writing on host 1, which the write lease alone would allow.
    if csv_test_support::cmd::have("qemu-io") && csv_test_support::cmd::have("qemu-system-x86_64") {
        let img = d.join("disk.raw");
        fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let mut vm = Command::new("qemu-system-x86_64")
            .args(["-nodefaults", "-display", "none", "-S", "-drive"])
            .arg(format!(
                "file={},format=raw,if=none,id=d,readonly=on",
                other.join("disk.raw").display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let qemu_io = || {
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", "write 0 512"])
                .arg(&img)
                .output()
                .unwrap()
        };
        // The VM has taken its locks once qemu-io meets them (QEMU
        // starts in well under the 20 s allowed).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let err = loop {
            let o = qemu_io();
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            if !o.status.success() {
                break err;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io on host 1 was never refused"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(err.contains("Failed to get \"write\" lock"), "{err}");
        eprintln!(
            "qemu-io on host 1: {}",
            err.lines().next().unwrap_or_default()
        );
        let _ = vm.kill();
        let _ = vm.wait();
        let o = qemu_io();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    } else {
        eprintln!("SKIP qemu image locking across hosts: no qemu-io or qemu-system-x86_64");
    }

    // A signal ends a wait with EINTR.
    fcntl_lock(&h1, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    // SAFETY: installs a handler that does nothing, without SA_RESTART,
    // so that a blocked fcntl returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (r, t) = std::thread::scope(|sc| {
        let waiter = sc.spawn(|| {
            // SAFETY: pthread_self has no preconditions.
            let _ = tx.send(unsafe { libc::pthread_self() });
            fcntl_lock(&h2, libc::F_SETLKW, libc::F_RDLCK, 0, 0).map(|_| ())
        });
        let thread = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: the thread is alive (it waits in fcntl).
        unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
        let t = std::time::Instant::now();
        (waiter.join().unwrap(), t)
    });
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINTR));
    eprintln!(
        "a signal ended the wait in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    // The interrupted request took nothing: host 1 still holds the lock.
    let held = fcntl_lock(&h2, libc::F_GETLK, libc::F_RDLCK, 0, 0).unwrap();
    assert_eq!(i32::from(held.l_type), libc::F_WRLCK);
}

/// A host's locks go when the cluster has it down, under the same rules
/// as its write leases: after kill -9 of host 1's csvd, host 2's
/// `F_SETLKW`, blocked by host 1's lock, gets the lock once the cluster
/// has host 1 down (the time is measured), and host 1's old descriptor can
/// no longer write.
#[test]
fn a_dead_hosts_locks_go_once_the_cluster_has_it_down() {
    skip_unless!(
        Need::Root,
        Need::Command("fusermount3"),
        Need::Device("/dev/fuse")
    );
    let mut cl = CsvCluster::loopback(3).unwrap();
    cl.mounts = true;
    cl.start_all().unwrap();
    let v = cl.add_volume_file(64 << 20).unwrap();
    cl.wait_mounted(v, Duration::from_secs(20)).unwrap();
    let (d, other) = (cl.mountpoint(1, v), cl.mountpoint(2, v));
    wait_for_level_3(&d);
    fs::write(d.join("db"), vec![0u8; 4096]).unwrap();
    let h1 = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join("db"))
        .unwrap();
    fcntl_lock(&h1, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let h2 = File::open(other.join("db")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = fcntl_lock(&h2, libc::F_SETLKW, libc::F_RDLCK, 0, 0);
        let _ = tx.send((r.map(|_| std::time::Instant::now()), h2));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "F_SETLKW on host 2 did not wait for host 1's lock"
    );
    let killed = std::time::Instant::now();
    cl.kill(1).unwrap();
    let (got, _h2) = rx
        .recv_timeout(Duration::from_secs(90))
        .expect("host 2 never got the lock of the dead host 1");
    let s = got.unwrap().duration_since(killed).as_secs_f64();
    eprintln!("host 2 got host 1's lock {s:.1} s after host 1's csvd was killed");
    // Host 1's descriptor is dead: no write reaches the volume through it.
    let e = h1.write_at(b"late", 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let mut back = vec![0u8; 4];
    File::open(other.join("db"))
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert_eq!(back, [0u8; 4], "host 1 wrote after it was down");
    // Host 2 may now write the file (host 1's write lease went too) and
    // lock it exclusively.
    let w = OpenOptions::new()
        .write(true)
        .open(other.join("db"))
        .unwrap();
    fcntl_lock(&w, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
}
