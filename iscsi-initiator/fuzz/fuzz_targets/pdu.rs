//! Fuzz target: bytes from a target, framed as PDUs with every digest
//! setting, then the SCSI data parsers on the data segments.
#![no_main]

include!("../harness/pdu.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| pdu::run(data));
