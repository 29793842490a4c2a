// Bytes from a peer or client, after decryption (a host with the cluster key
// can send anything): decoded as a frame and handled as the service would
// (Raft messages parsed, commands decoded and applied to a volume), and
// decoded as a committed command, a handshake message and a group
// snapshot. Also fed, unauthenticated, to the frame opener.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod rpc {
    use coordinator::codec::op_from_proto;
    use coordinator::meta::Volume;
    use coordinator::proto::{self, frame, request, Command, Frame};
    use prost::Message;

    /// One input.
    pub fn run(data: &[u8]) {
        let mut v = Volume::new(1 << 20, 1 << 30, 0);
        if let Ok(f) = Frame::decode(data) {
            match f.body {
                Some(frame::Body::Raft(b)) => {
                    for m in &b.msgs {
                        let _ = <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(m);
                    }
                }
                Some(frame::Body::Request(r)) => {
                    if let Some(request::Body::Op(op)) = r.body {
                        if let Ok(op) = op_from_proto(&op) {
                            let _ = v.apply(op);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Ok(c) = Command::decode(data) {
            if let Some(proto::command::Body::Volume(op)) = c.body {
                if let Ok(op) = op_from_proto(&op) {
                    let _ = v.apply(op);
                    assert!(v.check().is_empty());
                    // What the command left in the root (a default ACL,
                    // say) is what a create there inherits.
                    for kind in [coordinator::meta::Kind::File, coordinator::meta::Kind::Dir] {
                        let _ = v.apply(coordinator::meta::Op::Create {
                            parent: coordinator::meta::ROOT,
                            name: format!("fuzz-{kind:?}"),
                            kind,
                            mode: 0o777,
                            uid: 0,
                            gid: 0,
                            target: String::new(),
                            rdev: 0,
                            umask: Some(0o022),
                            now: 1,
                            lease: None,
                        });
                    }
                    assert!(v.check().is_empty());
                    let back = Volume::decode(&v.encode());
                    assert_eq!(back.as_ref(), Ok(&v));
                }
            }
        }
        let _ = proto::Hello::decode(data);
        if let Ok(s) = proto::GroupSnapshot::decode(data) {
            let _ = Volume::decode(&s.machine);
        }
        assert!(coordinator::wire::open_frame(&[3u8; 32], 0, data).is_err());
    }
}
