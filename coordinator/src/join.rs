//! Admitting a host that comes with a join token (`csvctl node join`):
//! its connection is keyed with the token's secret instead of the cluster
//! key and serves one `JoinReq`. The cluster gives the host an id above
//! every registered, removed or voting one, registers its addresses, and
//! sends it the cluster key wrapped with a pad only the two ends of the
//! connection can compute.

use crate::group::CLUSTER;
use crate::host::Book;
use crate::node::resolve;
use crate::proto::{self, admin, frame, request, response, ErrorCode, Frame, Request, Response};
use crate::wire::{self, Identity};
use std::net::SocketAddr;
use std::time::Duration;

/// Admits a host that came with a join token: the cluster gives it an id
/// and registers its addresses; it gets the cluster key, wrapped.
pub(crate) fn serve_join(
    mut c: wire::Conn,
    me: &Identity,
    local: SocketAddr,
    peer: Option<SocketAddr>,
    book: &Book,
) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let (seq, req) = match c.recv() {
        Ok(Frame {
            body:
                Some(frame::Body::Request(Request {
                    seq,
                    body:
                        Some(request::Body::Admin(proto::Admin {
                            action: Some(admin::Action::Join(j)),
                        })),
                    ..
                })),
        }) => (seq, j),
        other => {
            tracing::warn!(
                "a host with a join token from {peer:?} sent no join request: {other:?}"
            );
            return;
        }
    };
    let result = join_cluster(me, local, &req).map(|mut j| {
        j.wrapped_key = me.key.xor(&c.key_pad()).to_vec();
        // The hosts this one knows too: founders enter the registry a
        // moment after the first election, and the new host must reach
        // them from the start.
        if let Ok(b) = book.read() {
            for (id, addrs) in b.iter() {
                if !j.nodes.iter().any(|n| n.id == *id) {
                    j.nodes.push(proto::NodeInfo {
                        id: *id,
                        addrs: addrs.clone(),
                    });
                }
            }
        }
        j.nodes.sort_by_key(|n| n.id);
        tracing::info!(
            node = j.id,
            hostname = req.hostname,
            addrs = ?req.addrs,
            "a host joined with a join token"
        );
        proto::reply::Value::Joined(j)
    });
    let resp = Response {
        seq,
        result: Some(match result {
            Ok(v) => response::Result::Reply(proto::Reply { value: Some(v) }),
            Err(e) => {
                tracing::warn!("refused a join from {peer:?}: {}", e.message);
                response::Result::Error(e)
            }
        }),
    };
    let _ = c.send(&Frame {
        body: Some(frame::Body::Response(resp)),
    });
}

fn join_cluster(
    me: &Identity,
    local: SocketAddr,
    req: &proto::JoinReq,
) -> Result<proto::JoinReply, proto::Error> {
    if req.addrs.is_empty() || req.addrs.len() > 8 {
        return Err(proto::error(
            ErrorCode::Invalid,
            "a joining host gives 1 to 8 cluster addresses",
        ));
    }
    for a in &req.addrs {
        if resolve(std::slice::from_ref(a)).is_empty() {
            return Err(proto::error(
                ErrorCode::Invalid,
                format!("{a:?} is not a HOST:PORT address"),
            ));
        }
    }
    let client_id = Identity {
        node: 0,
        ..me.clone()
    };
    // Ids above every voter, even founders not registered yet.
    let floor = crate::client::node_status(&client_id, local, Duration::from_secs(2))
        .ok()
        .and_then(|s| {
            s.groups
                .iter()
                .find(|g| g.group == CLUSTER)
                .and_then(|g| g.voters.iter().chain(&g.learners).max().copied())
        })
        .unwrap_or(0)
        + 1;
    let mut cl = crate::client::Client::new(client_id, vec![local]);
    // A host of a build older than the cluster's feature level could not
    // apply what the cluster commits.
    let level = cl
        .cluster_info()
        .map_err(|e| proto::error(ErrorCode::Unavailable, e.to_string()))?
        .feature_level
        .max(crate::features::BASE);
    let theirs = req.feature_level.max(crate::features::BASE);
    if theirs < level {
        return Err(proto::error(
            ErrorCode::FeatureLevel,
            format!("this host supports feature level {theirs}, the cluster runs at {level}: install a newer csv on it"),
        ));
    }
    let r = cl
        .call(
            CLUSTER,
            request::Body::Cluster(proto::ClusterOp {
                op: Some(proto::cluster_op::Op::JoinNode(proto::NodeInfo {
                    id: floor,
                    addrs: req.addrs.clone(),
                })),
            }),
        )
        .map_err(|e| match e {
            crate::client::ClientError::Refused(p) => p,
            other => proto::error(ErrorCode::Unavailable, other.to_string()),
        })?;
    match r.value {
        Some(proto::reply::Value::Joined(j)) => Ok(j),
        v => Err(proto::error(
            ErrorCode::Unavailable,
            format!("unexpected answer to a join: {v:?}"),
        )),
    }
}
