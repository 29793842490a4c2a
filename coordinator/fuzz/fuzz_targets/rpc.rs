//! Bytes from a peer or client, after decryption (a host with the cluster key
//! can send anything): decoded as a frame and handled as the service would
//! (Raft messages parsed, commands decoded and applied to a volume), and
//! decoded as a committed command, a handshake message and a group
//! snapshot. Also fed, unauthenticated, to the frame opener.
#![no_main]

include!("../harness/rpc.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| rpc::run(data));
