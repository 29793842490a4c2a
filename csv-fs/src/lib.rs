//! The `/ClusterStorage` filesystem and a volume's I/O path on one host.
//!
//! A host mounts every volume at `<mount root>/VolumeN`: metadata goes to
//! the volume's coordinator, file data straight to the LUN over the
//! host's own path, or through a peer when that path is not in use. The
//! node daemon (`csvd`, in `csv-fs/csvd`) decides what to mount and runs
//! the rest of the host; this crate owns the filesystem.
//!
//! - [`volume`]: a volume's filesystem logic ([`volume::VolumeFs`]):
//!   namespace operations, open files and their leases, reads and writes,
//!   the snapshot write gate, FileSystemRedirected file I/O both ways;
//! - [`fuse`]: the FUSE adapter over it, reader turns, and the kernel
//!   mount with its guard;
//! - [`lun`]: the LUN as this host reaches it: its own SAN path (iSCSI
//!   with persistent reservations, or a LUN file), redirection through a
//!   peer, the connections to peers;
//! - [`mount`]: one volume mounted (path, LUN, filesystem, FUSE session);
//! - [`aio`]: asynchronous I/O to a LUN file or device (Linux AIO);
//! - [`extents`]: a host's copy of a file's extent map;
//! - [`superblock`]: the first 4 KiB of a volume's LUN.

pub mod aio;
pub mod extents;
pub mod fuse;
pub mod lun;
pub mod mount;
pub mod superblock;
pub mod volume;
