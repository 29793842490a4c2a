// Fuzz target: login/text key segments and CHAP values from a target,
// through parsing and negotiation.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod text {
    use iscsi_initiator::{chap, text};

    /// One input.
    pub fn run(data: &[u8]) {
        if let Ok(pairs) = text::parse(data) {
            let _ = text::Offer::default().resolve(&pairs);
            for (_, v) in &pairs {
                let _ = chap::from_value(v);
            }
        }
    }
}
