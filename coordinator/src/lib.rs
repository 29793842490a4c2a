//! Raft-replicated metadata of csv volumes, and the service that serves it.
//!
//! Every host keeps a replica of one Raft group for the cluster (hosts and
//! their addresses, volumes, VM roles: [`cluster`]) and one group per
//! volume (namespace, inodes, extents, allocator, leases: [`meta`]). The
//! leader of a volume's group is that volume's *coordinator*; moving a
//! volume is a Raft leader transfer.
//!
//! How the pieces fit:
//! - [`storage`]: a replica's durable Raft log, hard state and snapshots
//!   on local disk (over the CRC-framed log of [`wal`]);
//! - [`group`]: one group on one host: raft-rs's `RawNode` driven in the
//!   documented Ready order (`pre_vote` and `check_quorum` on), linearizable
//!   reads through ReadIndex, a replicated table of each client's last
//!   request so a retry is applied once, leader transfer, and membership:
//!   every registered host becomes a learner of every group and is promoted
//!   to voter once it has caught up (ConfChangeV2);
//! - [`node`]: the groups of one host, its connections to peers (each
//!   peer's addresses tried in order: several cluster networks), and the
//!   listener that serves clients; run by `csvd`;
//! - [`client`]: finds a group's leader, follows redirects, retries through
//!   elections and failed networks;
//! - [`wire`] and [`proto`]: prost messages in length-delimited frames over
//!   TCP, with a handshake that refuses any peer without the cluster key and
//!   every frame encrypted and authenticated; [`codec`] maps them to the state machine's types.
//!
//! Time in the replicated state comes from the leader's clock, stamped into
//! each command before it is proposed, so lease expiry is the same on every
//! replica.

pub mod alloc;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod group;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod proto;
pub mod storage;
pub mod vmrole;
pub mod wal;
pub mod wire;
