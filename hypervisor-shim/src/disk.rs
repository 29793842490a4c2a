//! Where a VM's disk bytes come from. The node daemon hands the supervisor
//! a [`DiskSource`] that opens a VHD on a mounted volume through the
//! volume's own I/O path (`csv_fs::volume::VolumeFile`: the file's lease
//! and extent map, straight to the LUN or through a peer), so a disk
//! server in the daemon never goes through the FUSE mount. Outside the
//! daemon (`csv-vmm serve-disk`, tests) [`LocalFiles`] opens plain files.

use std::io;
use std::path::Path;
use std::sync::Arc;

/// A VM's disk, as positioned I/O.
pub type DiskIo = Arc<dyn vhd::BlockIo>;

/// A VHD opened on a [`DiskSource`].
pub type Disk = vhd::Vhd<DiskIo>;

/// Opens VM disks.
pub trait DiskSource: Send + Sync + std::fmt::Debug {
    /// Opens the file at `path` (as this host mounts it); for writing with
    /// `write` (on a cluster volume: with the file's write lease).
    fn open(&self, path: &Path, write: bool) -> io::Result<DiskIo>;
    /// What serves the bytes, for logs and status (`volume`, `file`).
    fn kind(&self, path: &Path) -> &'static str;
}

/// Plain files through the kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalFiles;

impl DiskSource for LocalFiles {
    fn open(&self, path: &Path, write: bool) -> io::Result<DiskIo> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)?;
        Ok(Arc::new(f))
    }

    fn kind(&self, _path: &Path) -> &'static str {
        "file"
    }
}

/// Opens the VHD at `path` on `source` (a differencing disk's parents are
/// opened read-only, through the path their locators name).
pub fn open_vhd(source: &dyn DiskSource, path: &Path, write: bool) -> Result<Disk, vhd::Error> {
    let name = path.display().to_string();
    let io = source.open(path, write).map_err(|e| vhd::Error::Io {
        file: name.clone(),
        what: "open".into(),
        offset: 0,
        source: e,
    })?;
    let opts = vhd::OpenOptions {
        write,
        ..Default::default()
    };
    vhd::Vhd::open_on(io, &name, Some(path), &opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_vhd_opens_through_the_source_and_a_missing_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.vhd");
        vhd::Vhd::create(
            &p,
            &vhd::CreateOptions::new(vhd::DiskType::Dynamic, 8 << 20),
        )
        .unwrap();
        let v = open_vhd(&LocalFiles, &p, true).unwrap();
        v.write_at(&[7u8; 4096], 4096).unwrap();
        v.flush().unwrap();
        drop(v);
        let r = open_vhd(&LocalFiles, &p, false).unwrap();
        let mut b = [0u8; 4096];
        r.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [7u8; 4096]);
        let e = open_vhd(&LocalFiles, &d.path().join("none.vhd"), false).unwrap_err();
        assert!(e.to_string().contains("none.vhd"), "{e}");
    }
}
