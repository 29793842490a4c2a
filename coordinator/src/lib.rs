//! Raft-replicated metadata of csv volumes, and the service that serves it.
//!
//! Every host keeps a replica of one Raft group for the cluster (hosts and
//! their addresses, volumes, VM roles: [`cluster`]) and one group per
//! volume (namespace, inodes, extents, allocator, leases: [`meta`]). The
//! leader of a volume's group is that volume's *coordinator*; moving a
//! volume is a Raft leader transfer.
//!
//! This crate owns consensus, the replicated state machines, the RPC
//! transport and the client. It knows nothing of FUSE, SAN paths or VMs:
//! what a host serves for the layers above (redirected I/O, snapshot
//! phases, drill faults on its paths, its volumes' and VMs' status) comes
//! in through the traits of [`service`], which the node daemon implements.
//!
//! How the modules fit, bottom up:
//! - [`env`]: the file I/O under the log and snapshots, behind a trait
//!   (the real file system, or memory with injected faults for tests);
//! - [`wal`]: a replica's CRC-framed log and hard state; [`storage`]:
//!   raft-rs's `Storage` over it, with snapshots;
//! - [`meta`] (and [`alloc`]): a volume's state machine; [`cluster`]: the
//!   registry's; [`codec`] maps them to and from the schema;
//! - [`group`]: one group on one host: raft-rs's `RawNode` driven in the
//!   documented Ready order (`pre_vote` and `check_quorum` on),
//!   linearizable reads through ReadIndex, a replicated table of each
//!   client's last request so a retry is applied once, leader transfer,
//!   and membership (every registered host becomes a learner of every
//!   group and a voter once caught up, by ConfChangeV2);
//! - [`features`]: the cluster's feature level and what each command
//!   needs, for rolling upgrades;
//! - [`host`]: every group of one host and what applying their commands
//!   asks of it, with no threads or sockets (the simulated network in the
//!   tests drives it as the real node does);
//! - [`wire`]: the handshake that refuses any peer without the cluster key
//!   and the encrypted frames; [`proto`] is the schema (`csv-proto`,
//!   generated from `.proto` files);
//! - [`node`]: a host's threads and sockets around its [`host::Host`]: the
//!   Raft loop, a sender per peer (each peer's addresses tried in order:
//!   several cluster networks), listeners, and the dispatch of requests to
//!   the groups or to the [`service`]s; [`join`] admits hosts that come
//!   with a join token;
//! - [`client`]: finds a group's leader, follows redirects, retries
//!   through elections and failed networks;
//! - [`faults`]: the failure drills' network and clock faults, and the
//!   SAN faults the layers above read, in one registry;
//! - [`metrics`]: the groups' state as Prometheus metrics.
//!
//! Time in the replicated state comes from the leader's clock, stamped into
//! each command before it is proposed, so lease expiry is the same on every
//! replica.

pub use csv_proto as proto;

pub mod alloc;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod env;
pub mod faults;
pub mod features;
pub mod group;
pub mod host;
pub mod join;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod service;
pub mod snapshot_run;
pub mod storage;
pub mod wal;
pub mod wire;

#[cfg(test)]
mod sim;
