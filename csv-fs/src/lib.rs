//! The csv node daemon (`csvd`) and the `/ClusterStorage` FUSE filesystem.
//!
//! A node joins the cluster, hosts its Raft replicas (the coordinator
//! service), and mounts every volume at `<mount root>/VolumeN`: metadata
//! goes to the volume's coordinator, file data straight to the LUN.
//!
//! - [`superblock`]: the first 4 KiB of a volume's LUN (identity, layout);
//! - [`extents`]: a host's copy of a file's extent map;
//! - [`fs`]: the FUSE filesystem of one volume;
//! - [`mounts`]: mounts and unmounts volumes as the cluster registry says,
//!   and reports how this host reaches each one.
//!
//! - [`san`]: this host's own iSCSI session to a volume's LUN;
//! - [`redirect`]: block I/O through a peer when this host does not use its
//!   own path, and the service that answers peers;
//! - [`freeze`]: this host's part of the snapshot protocol (hooks, VM
//!   pauses, the write freeze);
//! - [`vms`]: runs the VM roles placed on this host.
//!
//! Still to come (see the project's issues): fencing by persistent
//! reservation.

pub mod aio;
pub mod config;
pub mod console;
pub mod extents;
pub mod freeze;
pub mod fs;
pub mod fsredirect;
pub mod mounts;
pub mod peers;
pub mod privileges;
pub mod redirect;
pub mod san;
pub mod superblock;
pub mod vms;
