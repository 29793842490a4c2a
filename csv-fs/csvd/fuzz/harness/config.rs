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
        if let Ok(f) = csvd::settings::parse_file(text) {
            // What parses passes its own check again.
            assert!(f.check().is_ok());
        }
        for line in text.lines().take(64) {
            let _ = csvd::settings::parse_peer(line);
            let _ = csvd::settings::parse_lun(line);
            let _ = csvd::settings::parse_id(line);
            let _ = vhd::size::parse(line);
        }
    }
}
