//! Fuzz target: login/text key segments and CHAP values from a target,
//! through parsing and negotiation.
#![no_main]

use iscsi_initiator::{chap, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = text::parse(data) {
        let _ = text::Offer::default().resolve(&pairs);
        for (_, v) in &pairs {
            let _ = chap::from_value(v);
        }
    }
});
