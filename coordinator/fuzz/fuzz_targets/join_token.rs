//! A join token as a host that is not yet a member pastes it (`csvctl
//! node join TOKEN`): any text must decode or give an error, and what
//! decodes must encode back to the same token.
#![no_main]

use coordinator::wire::JoinTicket;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // With and without the prefix, so the hex body is reached.
    for t in [text.to_string(), format!("csvjoin1-{text}")] {
        if let Ok(ticket) = JoinTicket::decode(&t) {
            let again = JoinTicket::decode(&ticket.encode()).expect("an encoded token decodes");
            assert_eq!(again, ticket);
        }
    }
});
