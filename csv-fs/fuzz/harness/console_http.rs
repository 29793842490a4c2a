// What anyone who reaches a host's console address can send: any bytes as
// an HTTP request must parse or give an error (never a panic, never an
// allocation the size of a claimed Content-Length).
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod console_http {

    /// One input.
    pub fn run(data: &[u8]) {
        let _ = csv_fs::console::parse_head(data);
        let _ = csv_fs::console::read_request(&mut std::io::Cursor::new(data));
    }
}
