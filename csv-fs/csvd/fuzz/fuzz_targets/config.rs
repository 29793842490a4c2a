//! Any bytes as csvd's settings file (`/etc/csv/csvd.toml`): parsed and
//! checked, or refused with an error; never a panic. Each line also goes
//! through the parsers of csvd's command-line values.
#![no_main]

include!("../harness/config.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| config::run(data));
