//! A small KVM VMM (`csv-vmm`) for the VMs of a csv cluster.
//!
//! - [`vm`]: one KVM virtual machine (memory with dirty tracking, vCPU
//!   threads, serial console, i8042 reset, the test guest's ports),
//!   pause/resume and the state KVM holds;
//! - [`stream`]: the versioned, checksummed state stream shared by save
//!   files and live migration;
//! - [`migrate`]: save/restore (quick migration) and live migration by
//!   iterative pre-copy;
//! - [`guest`]: the purpose-built test guest and its memory layout;
//! - [`control`]: the per-VM control socket (JSON lines).

pub mod control;
pub mod guest;
pub mod linux;
pub mod migrate;
// One copy for csvd and csv-vmm, which share no crate it would belong in.
#[path = "../../csv-fs/src/privileges.rs"]
pub mod privileges;
pub mod stream;
pub mod virtio_blk;
pub mod vm;
