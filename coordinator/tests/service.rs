//! The coordinator service in this process, on loopback: a retried
//! request is applied once, and reads see every acknowledged write.

#![allow(clippy::unwrap_used)]

use coordinator::env::DiskEnv;
use coordinator::group::Timing;
use coordinator::meta::ROOT;
use coordinator::node::{Config, Listeners, Node};
use coordinator::proto::{self, frame, request, response, Frame, Request};
use coordinator::service::Services;
use coordinator::wire::{self, Identity, Key};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

fn one_host(dir: &std::path::Path) -> (Node, Identity) {
    let key = Key::generate().unwrap();
    let me = Identity {
        node: 1,
        cluster: "t".into(),
        key,
    };
    let listeners = Listeners::bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let addr = listeners.addrs()[0];
    let node = Node::start(
        Config {
            identity: me.clone(),
            data_dir: dir.to_path_buf(),
            peers: BTreeMap::from([(1, vec![addr.to_string()])]),
            init: true,
            timing: Timing {
                tick: Duration::from_millis(10),
                ..Timing::default()
            },
            level: coordinator::features::SUPPORTED,
        },
        Arc::new(DiskEnv),
        listeners,
        Services::default(),
    )
    .unwrap();
    (node, me)
}

/// A client of the host at `addr`, once that host has added Volume1 and
/// the volume's group has elected its (only) leader.
fn volume_one(client: &Identity, addr: std::net::SocketAddr) -> coordinator::client::Client {
    let mut cl = coordinator::client::Client::new(client.clone(), vec![addr]);
    cl.add_volume(proto::VolumeInfo {
        number: 1,
        lun: "x".into(),
        data_start: 4096,
        capacity: 1 << 30,
        voters: vec![],
        now: 0,
    })
    .unwrap();
    while cl.readdir(1, ROOT).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    cl
}

fn call(c: &mut wire::Conn, r: &Request) -> response::Result {
    c.send(&Frame {
        body: Some(frame::Body::Request(r.clone())),
    })
    .unwrap();
    match c.recv().unwrap().body {
        Some(frame::Body::Response(r)) => r.result.unwrap(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_retried_create_is_applied_once_and_answered_the_same() {
    let d = tempfile::tempdir().unwrap();
    let (node, me) = one_host(d.path());
    let addr = node.bound[0];
    let client = Identity { node: 0, ..me };
    let mut cl = volume_one(&client, addr);
    let mut c = wire::connect(addr, &client, Duration::from_secs(2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let create = |seq, name: &str| Request {
        client: 77,
        seq,
        group: 1,
        body: Some(request::Body::Op(proto::VolumeOp {
            op: Some(proto::volume_op::Op::Create(proto::CreateOp {
                parent: ROOT,
                name: name.into(),
                kind: proto::NodeKind::File as i32,
                mode: 0o644,
                ..Default::default()
            })),
        })),
    };
    let first = call(&mut c, &create(1, "once"));
    let again = call(&mut c, &create(1, "once"));
    assert!(matches!(first, response::Result::Reply(_)), "{first:?}");
    assert_eq!(first, again, "a retry gets the first answer");
    // A new request for the same name is a new command: it fails.
    let third = call(&mut c, &create(2, "once"));
    let response::Result::Error(e) = third else {
        panic!("{third:?}")
    };
    assert_eq!(e.code, proto::ErrorCode::Exists as i32);
    // An older sequence number than the last is refused, not applied.
    let old = call(&mut c, &create(1, "other"));
    let response::Result::Error(e) = old else {
        panic!("{old:?}")
    };
    assert_eq!(e.code, proto::ErrorCode::BadRequest as i32);
    assert!(
        cl.lookup(1, ROOT, "other").is_err(),
        "stale retry was applied"
    );
    assert_eq!(cl.readdir(1, ROOT).unwrap().len(), 1);
}

#[test]
fn a_client_with_patience_gives_up_after_it_and_keeps_its_own_timeouts() {
    let me = Identity {
        node: 0,
        cluster: "t".into(),
        key: Key::generate().unwrap(),
    };
    // A port nobody listens on: every connection attempt is refused.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cl = coordinator::client::Client::new(me, vec![addr]);
    let (timeout, attempt) = (cl.timeout, cl.attempt_timeout);
    let t = std::time::Instant::now();
    let r = cl.with_patience(Duration::from_millis(300), |c| c.readdir(1, ROOT));
    let took = t.elapsed();
    assert!(
        matches!(r, Err(coordinator::client::ClientError::Unavailable { .. })),
        "{r:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "gave up after {took:?}"
    );
    assert_eq!((cl.timeout, cl.attempt_timeout), (timeout, attempt));
}

#[test]
fn a_file_created_with_a_lease_comes_back_with_it() {
    let d = tempfile::tempdir().unwrap();
    let (node, me) = one_host(d.path());
    let client = Identity { node: 0, ..me };
    let mut cl = volume_one(&client, node.bound[0]);
    // A new cluster runs at the base level until its hosts have said
    // what they support (a second or two).
    let t = std::time::Instant::now();
    while cl.cluster_info().unwrap().feature_level < coordinator::features::CREATE_WITH_LEASE {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the feature level never rose"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = cl.volume_op(
        1,
        proto::volume_op::Op::Create(proto::CreateOp {
            parent: ROOT,
            name: "f".into(),
            kind: proto::NodeKind::File as i32,
            mode: 0o644,
            lease_node: 1,
            lease_ttl: 30_000,
            ..Default::default()
        }),
    );
    let Ok(proto::Reply {
        value: Some(proto::reply::Value::Created(c)),
    }) = r
    else {
        panic!("{r:?}")
    };
    assert!(c.lease.is_some_and(|l| l.write));
    assert_eq!(c.attr.map(|a| a.kind()), Some(proto::NodeKind::File));
}

#[test]
fn a_host_without_services_says_so_and_still_reports_its_groups() {
    let d = tempfile::tempdir().unwrap();
    let (node, me) = one_host(d.path());
    let client = Identity { node: 0, ..me };
    let addr = node.bound[0];
    let _ = volume_one(&client, addr);
    let st = coordinator::client::node_status(&client, addr, Duration::from_secs(2)).unwrap();
    assert_eq!(st.node, 1);
    assert!(st.groups.iter().any(|g| g.group == 1), "{st:?}");
    assert!(st.volumes.is_empty() && st.vms.is_empty());
    let e = coordinator::client::redirect(
        &client,
        addr,
        1,
        true,
        proto::RedirectMode::Block,
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert_eq!(e.code(), Some(proto::ErrorCode::NoGroup), "{e}");
    let bad = coordinator::client::fault(
        &client,
        addr,
        proto::FaultReq::default(),
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert_eq!(bad.code(), Some(proto::ErrorCode::Invalid), "{bad}");
}
