//! The VHD disk format: fixed, dynamic and differencing disks; and, in
//! [`vhdx`], its successor VHDX (fixed and dynamic).
//!
//! Every VM disk on a csv volume is a VHD file. This crate reads and writes
//! them, interoperably with Hyper-V and with `qemu-img` (its `vpc` driver):
//!
//! - [`Vhd::create`] makes fixed, dynamic and differencing disks;
//!   [`Vhd::open`] opens any of them (following a differencing disk's
//!   parent chain), read-only or read-write.
//! - [`Vhd::read_at`] and [`Vhd::write_at`] take any byte offset and length;
//!   both take `&self`, so several threads may do I/O at once.
//! - [`ops`] has resize (grow), merge, compact and convert (between VHD,
//!   VHDX and raw); [`check`] is a consistency check that names every
//!   problem it finds (of a VHD or a VHDX).
//! - [`vhdx::Vhdx`] reads and writes VHDX, Hyper-V's format since Windows
//!   Server 2012, with its metadata log (replayed at open).
//!
//! The format code is generic over [`BlockIo`] (positioned I/O), so an
//! image can live on a file, on a LUN through the cluster client, or in
//! memory.
//!
//! # Crash safety
//!
//! A new block of a dynamic or differencing disk is committed in this
//! order: its sector bitmap and data, then the footer at the new end of the
//! file, then (after a flush) its BAT entry. A crash at any point leaves
//! either no BAT entry (the block is unreferenced space) or a BAT entry
//! pointing at a complete block; it never leaves one pointing at garbage.
//! If the crash left no footer at the end of the file, [`Vhd::open`] uses
//! the copy at offset 0 and a read-write open puts the footer back.
//!
//! # Layout
//!
//! One module per on-disk structure: [`footer`], [`header`] (with the
//! parent locators); the BAT and bitmaps are handled in [`disk`].
//!
//! Beside the format: [`io`] (positioned I/O, `O_DIRECT` files and
//! aligned buffers), [`check`] and [`ops`] (check, convert, resize,
//! merge, compact), [`size`] (sizes as people write them), and, with the
//! `uring` feature, `uring` (an io_uring queue of requests to an image,
//! which the benchmark uses to keep as many requests in flight as QEMU).

pub mod check;
pub mod disk;
pub mod error;
pub mod footer;
pub mod header;
pub mod io;
pub mod ops;
mod parent;
pub mod size;
#[cfg(feature = "uring")]
pub mod uring;
pub mod vhdx;

pub use check::{check, Finding, Severity};
pub use disk::{CreateOptions, OpenOptions, Vhd};
pub use error::{Error, Result};
pub use footer::{DiskType, Footer, Geometry};
pub use header::DynHeader;
pub use io::{BlockIo, MemIo};

/// Bytes per sector: every offset in a VHD is in these units or bytes.
pub const SECTOR: u64 = 512;

/// Big-endian u32 at `off` (callers check the length first).
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Big-endian u64 at `off` (callers check the length first).
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Formats 16 bytes as a UUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
pub fn format_uuid(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
