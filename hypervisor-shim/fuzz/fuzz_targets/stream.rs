//! Arbitrary bytes as a VM state stream (a save file or what a migration
//! source sends): every frame and payload is checked, nothing panics.
#![no_main]

include!("../harness/stream.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| stream::run(data));
