//! Running VMs on a csv host: the VM supervisor with its engine
//! interface, and `csv-vmm`, a small KVM VMM (rust-vmm crates) that runs
//! the project's test guest and, on hosts with hardware virtualization,
//! Linux.
//!
//! - [`supervisor`]: runs the VM roles the registry places on this host
//!   through an [`supervisor::engine::Engine`] (`csv-vmm` or QEMU), live and
//!   quick migrations with the disk's write lease handed over at
//!   switch-over, failover of a dead host's roles, placement;
//! - [`control`]: the per-VM control socket, typed on both sides;
//! - [`vm`]: one KVM virtual machine (memory with dirty tracking, vCPU
//!   threads, serial console, i8042 reset, the test guest's ports),
//!   pause/resume and the state KVM holds;
//! - [`stream`]: the versioned, checksummed state stream shared by save
//!   files and live migration;
//! - [`migrate`]: save/restore (quick migration) and live migration by
//!   iterative pre-copy;
//! - [`guest`]: the purpose-built test guest and its memory layout;
//!   [`linux`]: booting a Linux kernel;
//! - [`virtio_blk`]: the guest's disk, a VHD through the `vhd` crate;
//!   [`disk`]: where a VM's disk bytes come from (the volume's own I/O
//!   path in the node daemon);
//! - [`qemu`]: what the `qemu` engine needs: QMP, and csv's disk backend
//!   for QEMU (vhost-user-blk on a VHD);
//! - [`privileges`]: dropping the capabilities a process does not need
//!   (csvd uses it too).

pub mod control;
pub mod disk;
pub mod guest;
pub mod linux;
pub mod migrate;
pub mod privileges;
pub mod qemu;
pub mod stream;
pub mod supervisor;
pub mod virtio_blk;
pub mod vm;
