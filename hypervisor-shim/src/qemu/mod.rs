//! What the `qemu` engine ([`crate::supervisor::qemu`]) needs besides
//! QEMU itself: its machine protocol, typed ([`qmp`]), and csv's disk
//! backend for it ([`blk`]: the VM's VHD served as a vhost-user-blk
//! device, so QEMU never opens the VHD, and live migration is allowed), and
//! the guest agent ([`qga`]) that freezes a guest's filesystems for a
//! snapshot, and the serial console kept by csvd ([`console`]).

pub mod blk;
pub mod console;
pub mod qga;
pub mod qmp;
