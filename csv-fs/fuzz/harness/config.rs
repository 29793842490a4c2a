// Any bytes as csvd's settings file (`/etc/csv/csvd.toml`): parsed and
// checked, or refused with an error; never a panic. Each line also goes
// through the parsers of csvd's command-line values.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod config {

    /// One input.
    pub fn run(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(f) = csv_fs::config::parse(text) {
            // What parses passes its own check again.
            assert!(f.check().is_ok());
        }
        for line in text.lines().take(64) {
            let _ = csv_fs::config::parse_peer(line);
            let _ = csv_fs::config::parse_lun(line);
            let _ = csv_fs::config::parse_mem(line);
            let _ = csv_fs::config::parse_id(line);
        }
    }
}
