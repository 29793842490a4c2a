//! Raft-replicated metadata of csv volumes.
//!
//! One Raft group for the cluster (membership, volume registry, VM roles)
//! and one per volume (namespace, inodes, extents, allocator, leases). The
//! leader of a volume's group is that volume's coordinator.
//!
//! Written so far: the deterministic state machine of a volume ([`meta`],
//! with snapshots), its LUN space allocator ([`alloc`]) and the durable log
//! a replica keeps ([`wal`]). Still to come (see the project's issues):
//! the Raft groups driving them, the RPC service and client.

pub mod alloc;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod group;
pub mod meta;
pub mod node;
pub mod proto;
pub mod storage;
pub mod wal;
pub mod wire;
