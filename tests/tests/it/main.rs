//! Integration tests of the csv stack: one binary, a module per area.
//! Fixtures come from `csv_test_support` (tests/src).

// Test helpers outside `#[test]` functions fail loudly on purpose.
#![allow(clippy::unwrap_used)]

mod coordinator;
mod drills;
mod fixtures;
mod fs;
mod iscsi;
mod nemesis;
mod netfail;
mod operations;
mod posix;
mod security;
mod snapshots;
mod vhd_interop;
mod vm_roles;
mod vmm;
