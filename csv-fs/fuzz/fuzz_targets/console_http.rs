//! What anyone who reaches a host's console address can send: any bytes as
//! an HTTP request must parse or give an error (never a panic, never an
//! allocation the size of a claimed Content-Length).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = csv_fs::console::parse_head(data);
    let _ = csv_fs::console::read_request(&mut std::io::Cursor::new(data));
});
