//! Fuzz target: a valid VHDX with a pending log, edited in its structures
//! by the input, opened read-only and read-write, read, written and
//! checked (see the harness). Any outcome but a panic, a hang or an
//! unbounded allocation is fine.
#![no_main]

include!("../harness/vhdx_open_read.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhdx_open_read::run(data));
