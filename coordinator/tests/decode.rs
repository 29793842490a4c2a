//! Bad input to the coordinator's parsers gets an error, never a panic:
//! frames from the network (authenticated or not), commands from the log,
//! and any command the state machine is handed, however absurd its values.

#![allow(clippy::unwrap_used)]

use coordinator::codec::{op_from_proto, op_to_proto};
use coordinator::meta::{FileLock, Kind, LockType, Op, Volume, XattrSet};
use coordinator::proto::{self, frame, request, Command, Frame};
use coordinator::wire;
use proptest::prelude::*;
use prost::Message;

/// Feeds whatever a frame carries to the code that would handle it.
fn consume(f: Frame, v: &mut Volume) {
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
        Some(frame::Body::Response(_)) | None => {}
    }
}

fn any_u64() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..8, any::<u64>(), Just(u64::MAX), Just(u64::MAX - 1)]
}

fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c]{1,3}",
        Just(String::new()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("a/b".to_string()),
        "\\PC{0,300}",
    ]
}

prop_compose! {
    fn any_kind()(k in 0u32..7) -> Kind {
        match k {
            0 => Kind::Dir,
            1 => Kind::File,
            2 => Kind::Symlink,
            3 => Kind::Fifo,
            4 => Kind::CharDevice,
            5 => Kind::BlockDevice,
            _ => Kind::Socket,
        }
    }
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            any_u64(),
            any_name(),
            any_kind(),
            any::<u32>(),
            any_name(),
            (any::<u32>(), any_u64(), proptest::option::of(any::<u32>())),
            proptest::option::of((any_u64(), any_u64()))
        )
            .prop_map(
                |(parent, name, kind, mode, target, (rdev, now, umask), lease)| {
                    Op::Create {
                        parent,
                        name,
                        kind,
                        mode,
                        uid: 0,
                        gid: 0,
                        target,
                        rdev,
                        umask,
                        now,
                        // What the message can carry: a lease with a length.
                        lease: lease.filter(|l| l.1 > 0),
                    }
                }
            ),
        (any_u64(), any_u64(), any_name(), any_u64()).prop_map(|(ino, parent, name, now)| {
            Op::Link {
                ino,
                parent,
                name,
                now,
            }
        }),
        (any_u64(), any_name(), any::<bool>(), any_u64()).prop_map(|(parent, name, rmdir, now)| {
            Op::Unlink {
                parent,
                name,
                rmdir,
                now,
            }
        }),
        (any_u64(), any_name(), any_u64(), any_name(), any_u64()).prop_map(
            |(parent, name, new_parent, new_name, now)| Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                now
            }
        ),
        (
            any_u64(),
            proptest::option::of(any_u64()),
            proptest::option::of((any_u64(), 0u32..1_000_000)),
            proptest::option::of((any_u64(), 0u32..1_000_000)),
            any_u64()
        )
            .prop_map(|(ino, size, mtime, atime, now)| Op::SetAttr {
                ino,
                mode: Some(0o644),
                uid: None,
                gid: Some(7),
                size,
                mtime,
                atime,
                now,
            }),
        (any_u64(), any_name(), any_u64(), any_name(), any_u64()).prop_map(
            |(parent, name, new_parent, new_name, now)| Op::Exchange {
                parent,
                name,
                new_parent,
                new_name,
                now
            }
        ),
        (
            any_u64(),
            any_name(),
            prop::collection::vec(any::<u8>(), 0..64),
            0u8..3,
            any_u64()
        )
            .prop_map(|(ino, name, value, how, now)| Op::SetXattr {
                ino,
                name,
                value,
                how: match how {
                    0 => XattrSet::Any,
                    1 => XattrSet::Create,
                    _ => XattrSet::Replace,
                },
                now
            }),
        proptest::collection::vec((any_u64(), any_u64()), 0..4)
            .prop_map(|times| Op::Accessed { times }),
        (any_u64(), any_name(), any_u64()).prop_map(|(ino, name, now)| Op::RemoveXattr {
            ino,
            name,
            now
        }),
        (
            any_u64(),
            (any_u64(), any_u64(), any::<u32>(), any::<bool>()),
            (any_u64(), any_u64(), 0u8..3),
            proptest::option::of(any_u64())
        )
            .prop_map(
                |(ino, (node, owner, pid, flock), (start, end, typ), wait)| Op::Lock {
                    ino,
                    lock: FileLock {
                        node,
                        owner,
                        pid,
                        flock,
                        start,
                        end,
                        // What the message carries: the type says write.
                        write: typ == 1,
                    },
                    typ: match typ {
                        0 => LockType::Read,
                        1 => LockType::Write,
                        _ => LockType::Unlock,
                    },
                    wait,
                }
            ),
        (any_u64(), any_u64(), any_u64(), any::<bool>()).prop_map(|(ino, node, owner, flock)| {
            Op::UnlockOwner {
                ino,
                node,
                owner,
                flock,
            }
        }),
        (any_u64(), any_u64(), any_u64()).prop_map(|(ino, off, len)| Op::Allocate {
            ino,
            off,
            len
        }),
        (
            any_u64(),
            any_u64(),
            any_u64(),
            any_u64(),
            any_u64(),
            prop::collection::vec((any_u64(), any_u64()), 0..3)
        )
            .prop_map(|(ino, off, len, size, now, more)| Op::MarkWritten {
                ino,
                off,
                len,
                size,
                now,
                more
            }),
        (any_u64(), any_u64(), any::<bool>(), any_u64(), any_u64()).prop_map(
            |(node, ino, write, now, ttl)| Op::GrantLease {
                node,
                ino,
                write,
                now,
                ttl
            }
        ),
        (any_u64(), any_u64(), any_u64(), any::<bool>()).prop_map(|(node, ino, now, revoked)| {
            Op::RevokeLease {
                node,
                ino,
                now,
                revoked,
            }
        }),
        any_u64().prop_map(|now| Op::Tick { now }),
        (any_u64(), any_u64(), any_u64(), any_u64(), any_u64()).prop_map(
            |(ino, from, to, now, ttl)| Op::HandOver {
                ino,
                from,
                to,
                now,
                ttl
            }
        ),
        ("[a-z.]{0,8}", any_u64(), 0u32..600).prop_map(|(name, now, limit)| Op::CreateSnapshot {
            name,
            now,
            limit
        }),
        "[a-z.]{0,8}".prop_map(|name| Op::DeleteSnapshot { name }),
        (any_u64(), any_u64()).prop_map(|(ino, len)| Op::Reserve { ino, len }),
        (
            any_u64(),
            prop::collection::vec(
                (
                    any_u64(),
                    prop::collection::vec((any_u64(), any_u64()), 0..4)
                ),
                0..3
            )
        )
            .prop_map(|(ino, ranges)| Op::Remap { ino, ranges }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every command survives the trip through its message and the log.
    #[test]
    fn commands_round_trip(op in any_op()) {
        let c = Command {
            client: 3,
            seq: 9,
            version: 1,
            body: Some(proto::command::Body::Volume(op_to_proto(&op))),
        };
        let back = Command::decode(c.encode_to_vec().as_slice()).unwrap();
        let Some(proto::command::Body::Volume(v)) = back.body else { panic!("body lost") };
        prop_assert_eq!(op_from_proto(&v).unwrap(), op);
    }

    /// Any command, with any values, is applied or refused; the volume's
    /// own checks still hold afterwards.
    #[test]
    fn the_state_machine_takes_any_command(ops in proptest::collection::vec(any_op(), 1..40)) {
        let mut v = Volume::new(1 << 20, 1 << 30, 0);
        for op in ops {
            let _ = v.apply(op);
        }
        let problems = v.check();
        prop_assert!(problems.is_empty(), "{:?}", problems);
    }

    /// Arbitrary bytes as a frame body, a command, a handshake message.
    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut v = Volume::new(1 << 20, 1 << 30, 0);
        if let Ok(f) = Frame::decode(bytes.as_slice()) {
            consume(f, &mut v);
        }
        if let Ok(c) = Command::decode(bytes.as_slice()) {
            if let Some(proto::command::Body::Volume(op)) = c.body {
                if let Ok(op) = op_from_proto(&op) {
                    let _ = v.apply(op);
                }
            }
        }
        let _ = proto::Hello::decode(bytes.as_slice());
        let _ = proto::GroupSnapshot::decode(bytes.as_slice());
        // Unauthenticated bytes never get past the frame's tag.
        prop_assert!(wire::open_frame(&[1u8; 32], 0, &bytes).is_err());
    }

    /// A sealed frame with any byte changed is refused.
    #[test]
    fn a_changed_frame_is_refused(op in any_op(), at in any::<usize>(), flip in 1u8..=255) {
        let f = Frame {
            body: Some(frame::Body::Request(proto::Request {
                client: 1,
                seq: 1,
                group: 1,
                body: Some(request::Body::Op(op_to_proto(&op))),
            })),
        };
        let key = [9u8; 32];
        let sealed = wire::seal_frame(&key, 5, &f).unwrap();
        let mut b = sealed[4..].to_vec();
        prop_assert_eq!(wire::open_frame(&key, 5, &b).unwrap(), f);
        let i = at % b.len();
        b[i] ^= flip;
        prop_assert!(wire::open_frame(&key, 5, &b).is_err());
    }
}

proptest! {
    /// Aligned allocation: every piece starts aligned, pieces never overlap
    /// each other or what stays free, and the lengths add up; or nothing is
    /// taken.
    #[test]
    fn aligned_pieces_never_share_a_sector(
        frees in proptest::collection::vec((0u64..1 << 20, 1u64..40_000), 1..20),
        want in 1u64..200_000,
        hint in 0u64..1 << 20,
    ) {
        use coordinator::alloc::Allocator;
        let mut a = Allocator::default();
        for (s, l) in frees {
            let _ = a.release(s, l);
        }
        let before = a.clone();
        match a.allocate_aligned(want, hint, 4096) {
            None => prop_assert_eq!(a, before),
            Some(pieces) => {
                prop_assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), want);
                for &(s, l) in &pieces {
                    prop_assert_eq!(s % 4096, 0);
                    prop_assert!(!a.overlaps(s, l));
                    prop_assert!(before.intervals().any(|(fs, fl)| fs <= s && s + l <= fs + fl));
                }
                prop_assert_eq!(a.free_bytes() + want, before.free_bytes());
            }
        }
    }
}
