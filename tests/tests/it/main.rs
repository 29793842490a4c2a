//! Integration tests of the csv stack: one binary, a module per area.
//! Fixtures come from `csv_test_support` (tests/src).

// Test helpers outside `#[test]` functions fail loudly on purpose.
#![allow(clippy::unwrap_used)]

/// Skips a test that needs root, FUSE and a tgtd target (the cluster
/// tests with iSCSI volumes).
macro_rules! skip_without_fuse_and_tgtd {
    () => {
        csv_test_support::skip_unless!(
            csv_test_support::Need::Root,
            csv_test_support::Need::Command("fusermount3"),
            csv_test_support::Need::Device("/dev/fuse"),
            csv_test_support::Need::Command("tgtd"),
            csv_test_support::Need::Command("tgtadm")
        );
    };
}

/// Skips a test that needs root and FUSE (the cluster tests with mounts).
macro_rules! skip_without_fuse {
    () => {
        csv_test_support::skip_unless!(
            csv_test_support::Need::Root,
            csv_test_support::Need::Command("fusermount3"),
            csv_test_support::Need::Device("/dev/fuse")
        );
    };
}

mod coordinator;
mod drills;
mod fixtures;
mod fs;
mod iscsi;
mod nemesis;
mod netfail;
mod operations;
mod p2v;
mod posix;
mod qemu;
mod security;
mod snapshots;
mod templates;
mod vhd_interop;
mod vhdx_interop;
mod vm_roles;
mod vmm;
