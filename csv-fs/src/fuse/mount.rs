//! Mounting a volume's FUSE file system, and the guard under it.
//!
//! csvd mounts each volume itself (`mount(2)` with a `/dev/fuse`
//! descriptor it hands to fuser) rather than through fuser, which opens
//! the mount point first: on the guard that fails, as it should.

use std::path::{Path, PathBuf};

/// Why a volume's mount point could not be made ready or mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Making the mount point.
    #[error("making the mount point {path}")]
    MountPoint {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Opening the FUSE device.
    #[error("opening /dev/fuse")]
    Device(#[source] std::io::Error),
    /// The kernel's mount.
    #[error("mounting {path}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The source and type of each file system mounted at `p`, bottom first
/// (from `/proc/self/mounts`, whose paths escape blanks as `\040`).
pub fn mounts_at(p: &Path) -> Vec<(String, String)> {
    let want = p.display().to_string();
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (src, at, kind) = (f.next()?, f.next()?, f.next()?);
            (unescape(at) == want).then(|| (src.to_string(), kind.to_string()))
        })
        .collect()
}

/// The source name of the guard under each mounted volume.
pub const GUARD: &str = "csv-guard";

/// Lazily unmounts the FUSE file systems on top of `p` (left by a csvd
/// that was killed); quiet when there are none. A guard under them stays.
pub fn clear_stale_mount(p: &Path) {
    for _ in 0..8 {
        match mounts_at(p).last() {
            Some((src, kind)) if kind.starts_with("fuse") && src != GUARD => {}
            _ => return,
        }
        if nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).is_err() {
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(p)
                .status();
        }
    }
}

/// Makes `p` ready for a volume's FUSE mount: what a killed csvd left
/// there detached, the directory made, and a guard mounted on it first.
/// When csvd dies, the kernel keeps its FUSE mount (every call fails with
/// ENOTCONN) until the next csvd detaches it to mount again; without the
/// guard, the bare directory would be there in between: an application
/// writing to `VolumeN/...` would write to the host's root file system,
/// be told it succeeded, and the next mount would hide it; one reading
/// would be told the file does not exist. The guard is a FUSE mount whose
/// connection is closed at once, so under it every call fails with
/// ENOTCONN, just as under the dead mount. It goes when the volume is
/// unmounted in order. Without `guard` (`csvd --no-mount-guard`), the
/// directory is only made.
pub fn prepare_mountpoint(p: &Path, guard: bool) -> Result<(), MountError> {
    clear_stale_mount(p);
    // (Under the guard, the directory answers nothing, not even stat.)
    if mounts_at(p).last().is_some_and(|(src, _)| src == GUARD) {
        return Ok(());
    }
    std::fs::create_dir_all(p).map_err(|source| MountError::MountPoint {
        path: p.to_path_buf(),
        source,
    })?;
    if !guard {
        return Ok(());
    }
    if let Err(e) = mount_guard(p) {
        tracing::warn!(
            "{}: no guard under the volume's mount ({}): while csvd is down, writes there would go to the local disk",
            p.display(),
            coordinator::service::error_chain(&e)
        );
    }
    Ok(())
}

/// Mounts a FUSE file system named `source` of type `fuse.<subtype>` at
/// `p` and gives the connection's device.
fn fuse_mount(
    p: &Path,
    source: &str,
    subtype: &str,
    opts: &str,
    flags: nix::mount::MsFlags,
) -> Result<std::os::fd::OwnedFd, MountError> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(MountError::Device)?;
    let opts = format!(
        "fd={},user_id={},group_id={},allow_other,{opts}",
        dev.as_raw_fd(),
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    nix::mount::mount(
        Some(source),
        p,
        Some(format!("fuse.{subtype}").as_str()),
        flags,
        Some(opts.as_str()),
    )
    .map_err(|errno| MountError::Mount {
        path: p.to_path_buf(),
        source: errno.into(),
    })?;
    Ok(dev.into())
}

/// Mounts VolumeN's file system at `p` (over the guard); the device for
/// its session. Device nodes and set-user-ID programs on it work as on a
/// kernel file system (a chroot or container image on a volume needs its
/// `/dev/null`): only root makes them, and every host of the cluster
/// trusts the others' root alike.
pub fn mount_fuse(p: &Path, vol: u64) -> Result<std::os::fd::OwnedFd, MountError> {
    fuse_mount(
        p,
        &format!("csv-Volume{vol}"),
        "csv",
        "rootmode=40755,default_permissions",
        nix::mount::MsFlags::MS_NOATIME,
    )
}

/// Mounts the guard at `p`: FUSE, its device closed at once, so that
/// every call under it fails (ENOTCONN).
fn mount_guard(p: &Path) -> Result<(), MountError> {
    let dev = fuse_mount(
        p,
        GUARD,
        "csv-guard",
        "rootmode=40000",
        nix::mount::MsFlags::MS_RDONLY
            | nix::mount::MsFlags::MS_NOEXEC
            | nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV,
    )?;
    drop(dev);
    Ok(())
}

/// Unmounts the guard at `p` (after the volume's own clean unmount).
pub fn release_guard(p: &Path) {
    if mounts_at(p).last().is_some_and(|(src, _)| src == GUARD) {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}
