// A join token as a host that is not yet a member pastes it (`csvctl
// node join TOKEN`): any text must decode or give an error, and what
// decodes must encode back to the same token.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod join_token {
    use coordinator::wire::JoinTicket;

    /// One input.
    pub fn run(data: &[u8]) {
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
    }
}
