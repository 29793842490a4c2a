//! A join token as a host that is not yet a member pastes it (`csvctl
//! node join TOKEN`): any text must decode or give an error, and what
//! decodes must encode back to the same token.
#![no_main]

include!("../harness/join_token.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| join_token::run(data));
