//! `csvctl p2v`: a running Linux machine's disk to a VHD (physical to
//! virtual), consistent: every filesystem mounted from the disk (or one of
//! its partitions) is frozen (FIFREEZE) for the copy and thawed after, so
//! the VHD holds each as it was at one moment, its journal clean. The copy
//! itself is `vhd::ops::convert` from the block device (O_DIRECT, blocks
//! of zeros left out, unreadable ranges reported with their offsets).
//!
//! Freezing holds the machine's writes to those filesystems for the copy's
//! length. Where device-mapper exists, an LVM snapshot (`lvcreate -s`)
//! copied instead would avoid that; this command does not make one, and
//! says so.

use anyhow::{bail, Context, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::vhd_cmd::Format;

/// `csvctl p2v` arguments.
#[derive(Debug, clap::Args)]
pub struct P2vArgs {
    /// The machine's disk: a block device (/dev/sda, /dev/nvme0n1,
    /// /dev/loop0).
    source: PathBuf,
    /// The VHD to make (it must not exist; not on a filesystem of SOURCE).
    dst: PathBuf,
    /// Format of DST.
    #[arg(long = "to", value_enum, default_value = "dynamic")]
    to: Format,
    /// Block size of a dynamic DST [default: 2M for VHD, 32M for VHDX].
    #[arg(long, value_parser = vhd::size::parse_positive)]
    block_size: Option<u64>,
    /// Copy without freezing the filesystems (the copy is then only as
    /// consistent as a power cut: journals are replayed at its first
    /// boot, files being written may be torn).
    #[arg(long)]
    no_freeze: bool,
}

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` (linux/fs.h).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A filesystem mounted from the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// One of its mount points.
    pub at: PathBuf,
    pub fstype: String,
    /// Its device (major, minor).
    pub dev: (u64, u64),
}

/// (major, minor) of `path`'s device node and of its partitions.
fn device_numbers(path: &Path) -> Result<Vec<(u64, u64)>> {
    let m = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let rdev = m.rdev();
    let (maj, min) = (libc::major(rdev) as u64, libc::minor(rdev) as u64);
    let mut out = vec![(maj, min)];
    if let Ok(rd) = std::fs::read_dir(format!("/sys/dev/block/{maj}:{min}")) {
        for e in rd.flatten() {
            if !e.path().join("partition").exists() {
                continue;
            }
            if let Ok(d) = std::fs::read_to_string(e.path().join("dev")) {
                if let Some((a, b)) = d.trim().split_once(':') {
                    if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                        out.push((a, b));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |c: &u8| (b'0'..=b'7').contains(c);
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(octal) {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filesystems of `mountinfo` (the text of /proc/self/mountinfo) on
/// the devices `devs`, one mount point each (a filesystem's root mount
/// first).
pub fn filesystems_on(mountinfo: &str, devs: &[(u64, u64)]) -> Vec<Mounted> {
    let mut out: Vec<(bool, Mounted)> = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < 5 || sep + 1 >= f.len() {
            continue;
        }
        let Some((a, b)) = f[2].split_once(':') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
            continue;
        };
        if !devs.contains(&(a, b)) {
            continue;
        }
        let m = Mounted {
            at: PathBuf::from(unescape(f[4])),
            fstype: f[sep + 1].to_string(),
            dev: (a, b),
        };
        let root = f[3] == "/";
        match out.iter_mut().find(|(_, x)| x.dev == m.dev) {
            Some(slot) if !slot.0 && root => *slot = (root, m),
            Some(_) => {}
            None => out.push((root, m)),
        }
    }
    out.into_iter().map(|(_, m)| m).collect()
}

/// Filesystems frozen so far, thawed by whoever gets there first: the end
/// of the copy, an error, or Ctrl-C.
#[derive(Default)]
struct Frozen(Mutex<Vec<(PathBuf, OwnedFd, Instant)>>);

impl Frozen {
    fn freeze(&self, m: &Mounted) -> Result<()> {
        let dir = std::fs::File::open(&m.at)
            .with_context(|| format!("cannot open {}", m.at.display()))?;
        // SAFETY: FIFREEZE on an open directory takes no argument we own.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "cannot freeze {} ({}): {e}{}",
                m.at.display(),
                m.fstype,
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    " (the filesystem cannot be frozen: unmount it, or copy with --no-freeze)"
                } else {
                    ""
                }
            );
        }
        if let Ok(mut g) = self.0.lock() {
            g.push((m.at.clone(), dir.into(), Instant::now()));
        }
        Ok(())
    }

    /// Thaws everything frozen; each filesystem and how long it was held.
    fn thaw_all(&self) -> Vec<(PathBuf, f64, Option<std::io::Error>)> {
        let Ok(mut g) = self.0.lock() else {
            return vec![];
        };
        g.drain(..)
            .rev()
            .map(|(at, fd, t)| {
                // SAFETY: as for FIFREEZE.
                let r = unsafe { libc::ioctl(fd.as_raw_fd(), FITHAW as _, 0) };
                let e = (r != 0).then(std::io::Error::last_os_error);
                (at, t.elapsed().as_secs_f64(), e)
            })
            .collect()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw_all();
    }
}

/// Thaws `frozen` and exits when SIGINT, SIGTERM or SIGHUP comes (the
/// signals are blocked in every thread but the one waiting for them).
fn thaw_on_signal(frozen: Arc<Frozen>) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("cannot block signals")?;
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            for (at, _, e) in frozen.thaw_all() {
                match e {
                    None => eprintln!("{sig}: thawed {}", at.display()),
                    Some(e) => eprintln!("{sig}: cannot thaw {}: {e}", at.display()),
                }
            }
            std::process::exit(130);
        }
    });
    Ok(())
}

/// `csvctl p2v`.
pub fn run(a: P2vArgs) -> Result<ExitCode> {
    if !vhd::ops::is_block_device(&a.source) {
        bail!(
            "{} is not a block device: p2v copies a machine's disk (for an image file, use csvctl vhd convert)",
            a.source.display()
        );
    }
    if a.dst.exists() {
        bail!("{} exists: p2v never overwrites", a.dst.display());
    }
    let devs = device_numbers(&a.source)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let fss = filesystems_on(&info, &devs);
    let dst_dir = match a.dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dst_dev = std::fs::metadata(&dst_dir)
        .with_context(|| format!("cannot stat {}", dst_dir.display()))?
        .dev();
    if let Some(m) = fss
        .iter()
        .find(|m| dst_dev == libc::makedev(m.dev.0 as u32, m.dev.1 as u32) as u64)
    {
        bail!(
            "{} is on {} ({}), a filesystem of {}: the copy would be frozen with it; write it elsewhere (a cluster volume, another disk)",
            a.dst.display(),
            m.at.display(),
            m.fstype,
            a.source.display()
        );
    }
    // Device-mapper is in the kernel when it registered its control
    // device (a /dev/mapper/control node alone can be a leftover).
    let dm = std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper"));
    let frozen = Arc::new(Frozen::default());
    if fss.is_empty() {
        println!(
            "no filesystem of {} is mounted: copied as it is",
            a.source.display()
        );
    } else if a.no_freeze {
        println!(
            "--no-freeze: {} copied while in use, as consistent as after a power cut",
            fss.iter()
                .map(|m| m.at.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else {
        thaw_on_signal(frozen.clone())?;
        for m in &fss {
            frozen.freeze(m)?;
            println!(
                "frozen {} ({}) with FIFREEZE: its writes wait until the copy ends{}",
                m.at.display(),
                m.fstype,
                if dm {
                    " (device-mapper is here: an LVM snapshot of a logical volume would avoid the wait; this command does not make one)"
                } else {
                    " (no device-mapper here for an LVM snapshot)"
                }
            );
        }
    }
    let vhdx = matches!(a.to, Format::Vhdx | Format::VhdxFixed);
    let bs = a
        .block_size
        .unwrap_or(if vhdx { 32 << 20 } else { 2 << 20 });
    let r = crate::vhd_cmd::convert_reporting(
        &a.source,
        &a.dst,
        a.to,
        bs,
        &vhd::OpenOptions::default(),
    );
    let mut thaw_failed = false;
    for (at, held, e) in frozen.thaw_all() {
        match e {
            None => println!("thawed {} after {held:.2} s", at.display()),
            Some(e) => {
                thaw_failed = true;
                eprintln!(
                    "cannot thaw {}: {e}: run `fsfreeze -u {}`",
                    at.display(),
                    at.display()
                );
            }
        }
    }
    let r = r?;
    if thaw_failed {
        return Ok(ExitCode::from(1));
    }
    Ok(if r.unreadable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystems_of_a_disk_are_found_in_mountinfo_once_each() {
        let info = "\
22 1 7:0 / / rw,relatime shared:1 - ext4 /dev/loop0 rw
30 22 7:1 /sub /mnt/bind rw - ext4 /dev/loop0p1 rw
31 22 7:1 / /mnt/my\\040disk rw - ext4 /dev/loop0p1 rw
32 22 8:0 / /other rw - xfs /dev/sda rw
33 22 0:50 / /proc rw - proc proc rw
";
        let found = filesystems_on(info, &[(7, 0), (7, 1)]);
        assert_eq!(
            found,
            vec![
                Mounted {
                    at: "/".into(),
                    fstype: "ext4".into(),
                    dev: (7, 0)
                },
                Mounted {
                    at: "/mnt/my disk".into(),
                    fstype: "ext4".into(),
                    dev: (7, 1)
                },
            ]
        );
        assert!(filesystems_on("garbage\n- -\n", &[(7, 0)]).is_empty());
    }
}
