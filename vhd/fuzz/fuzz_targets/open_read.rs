//! Fuzz target: open arbitrary bytes as a VHD, read the whole disk (up to
//! 8 MiB), write a little into it, and run the consistency check. Any
//! outcome but a panic, a hang or an unbounded allocation is fine.
#![no_main]

include!("../harness/open_read.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| open_read::run(data));
