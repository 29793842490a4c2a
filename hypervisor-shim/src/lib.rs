//! A small KVM VMM (`csv-vmm`) for the VMs of a csv cluster.
//!
//! Boots a guest with a serial console and a virtio-blk disk backed by a VHD
//! on a cluster volume; pause, save, restore, and live migration by
//! iterative pre-copy of dirty memory. One process per VM.
//!
//! Not written yet; see the project's issue list.
