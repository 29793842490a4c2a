//! Fixtures shared by every integration test of the csv stack.
//!
//! The integration tests use real parts: a real iSCSI target ([`tgt`]), real
//! network namespaces ([`netns`]), real FUSE mounts and `/dev/kvm`. These
//! fixtures start and stop them, and clean up after themselves even when a
//! test fails (every fixture undoes its work in `Drop`). A test that needs
//! something this machine lacks reports `SKIP <test>: <reason>` through
//! [`skip`] instead of passing silently.
//!
//! Names of everything a fixture creates on the host (namespaces, temp
//! directories, tgtd command lines) start with [`PREFIX`], so
//! `tools/test.sh` can find and remove what a killed test left behind.

pub mod cmd;
pub mod csvd;
pub mod netns;
pub mod skip;
pub mod tgt;
pub mod vmm;
pub mod wait;

pub use skip::Need;
pub use wait::{free_port, wait_until};

/// Prefix of every host-wide name a fixture creates (netns names, temp dirs).
pub const PREFIX: &str = "csvt-";

/// A temporary directory whose name carries [`PREFIX`].
pub fn temp_dir(tag: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{tag}-"))
        .tempdir()?)
}
