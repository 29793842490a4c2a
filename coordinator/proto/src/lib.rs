//! The schema of everything csv hosts exchange and log, generated from
//! `proto/*.proto` at build time (prost-build, with protox as the
//! compiler: no `protoc` needed).
//!
//! | file | what it holds |
//! |---|---|
//! | `common.proto` | `Empty` |
//! | `volume.proto` | a volume group's commands (`VolumeOp`), reads (`Read`) and answers: inodes, extents, leases, snapshots |
//! | `cluster.proto` | the cluster group's commands (`ClusterOp`) and registry (`ClusterInfo`): hosts, volumes, VM roles, health, feature level |
//! | `host.proto` | what a host serves itself: redirected block and file I/O, redirection, snapshot phases, drill faults, probes, status |
//! | `wire.proto` | frames on a connection: the handshake, Raft batches, requests and responses |
//! | `log.proto` | what a group's log and snapshots hold (`Command`, `GroupSnapshot`) |
//!
//! Enumerations travel as proto enums; prost keeps them as `i32` in the
//! messages, with a getter (`kind()`) that maps an unknown value to the
//! enum's default. [`label`] names them for people (the words `csvctl`
//! prints), and [`parse`] reads those words back.
//!
//! Compatibility rules: tags are never reused (a retired field is
//! `reserved`; a field whose type changed got a new tag), and every
//! connection starts with the sender's [`PROTOCOL`]; a host accepts peers
//! from [`MIN_PROTOCOL`] up. What a replicated command needs is its
//! feature level (`Command.version`), which the coordinator checks against
//! the cluster's.

#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    rustdoc::all
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/csv.rs"));
}

pub use generated::*;

pub mod label;
pub use label::{label, parse, Label};

/// Protocol version spoken by this build (the first frame carries it).
/// 4: kinds, modes, phases and states as enums; commands carry a feature
/// level.
pub const PROTOCOL: u32 = 4;

/// The oldest protocol a peer may speak.
pub const MIN_PROTOCOL: u32 = 4;

/// The answer to a request that failed.
pub fn error(code: ErrorCode, message: impl Into<String>) -> Error {
    Error {
        code: code as i32,
        message: message.into(),
        node: 0,
    }
}

impl Reply {
    /// A reply carrying `value`.
    pub fn of(value: reply::Value) -> Reply {
        Reply { value: Some(value) }
    }

    /// "Done, nothing to say".
    pub fn done() -> Reply {
        Reply::of(reply::Value::Done(Empty {}))
    }
}

impl Response {
    /// The answer to request `seq`: its reply, or why it failed.
    pub fn of(seq: u64, result: Result<Reply, Error>) -> Response {
        Response {
            seq,
            result: Some(match result {
                Ok(r) => response::Result::Reply(r),
                Err(e) => response::Result::Error(e),
            }),
        }
    }
}

impl Frame {
    /// A frame carrying `body`.
    pub fn of(body: frame::Body) -> Frame {
        Frame { body: Some(body) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn a_response_round_trips_and_keeps_its_oneof() {
        let r = Response::of(
            7,
            Ok(Reply::of(reply::Value::Created(CreatedFile {
                attr: Some(Attr {
                    ino: 9,
                    kind: NodeKind::File as i32,
                    ..Default::default()
                }),
                lease: None,
            }))),
        );
        let back = Response::decode(r.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, r);
        let Some(response::Result::Reply(Reply {
            value: Some(reply::Value::Created(c)),
        })) = back.result
        else {
            panic!("the reply's value was lost: {back:?}");
        };
        assert_eq!(c.attr.unwrap().kind(), NodeKind::File);
    }

    #[test]
    fn an_unknown_enum_value_reads_as_the_default() {
        let op = BlockOp {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(op.kind(), BlockOpKind::Unspecified);
    }

    #[test]
    fn bulk_fields_share_the_frame_buffer() {
        let op = BlockOp {
            data: bytes::Bytes::from(vec![5u8; 4096]),
            kind: BlockOpKind::Write as i32,
            ..Default::default()
        };
        let buf = bytes::Bytes::from(op.encode_to_vec());
        let back = BlockOp::decode(buf.clone()).unwrap();
        let inside = buf.as_ptr_range();
        assert!(inside.contains(&back.data.as_ptr()), "payload was copied");
    }
}
