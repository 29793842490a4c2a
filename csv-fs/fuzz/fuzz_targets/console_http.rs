//! What anyone who reaches a host's console address can send: any bytes as
//! an HTTP request must parse or give an error (never a panic, never an
//! allocation the size of a claimed Content-Length).
#![no_main]

include!("../harness/console_http.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| console_http::run(data));
