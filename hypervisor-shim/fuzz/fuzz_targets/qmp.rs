//! Arbitrary bytes as a line from QEMU's QMP socket: parsed and read as
//! the replies the qemu engine uses; nothing panics.
#![no_main]

include!("../harness/qmp.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp::run(data));
