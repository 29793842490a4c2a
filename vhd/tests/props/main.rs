//! Property and crash tests of the VHD crate against simple models.

// Test helpers fail loudly on purpose.
#![allow(clippy::unwrap_used)]

mod crash;
mod hostile;
mod model;
mod vhdx;
