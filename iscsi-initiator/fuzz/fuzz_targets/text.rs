//! Fuzz target: login/text key segments and CHAP values from a target,
//! through parsing and negotiation.
#![no_main]

include!("../harness/text.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| text::run(data));
