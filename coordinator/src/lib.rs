//! Raft-replicated metadata of csv volumes.
//!
//! One Raft group for the cluster (membership, volume registry, VM roles)
//! and one per volume (namespace, inodes, extents, allocator, leases). The
//! leader of a volume's group is that volume's coordinator. The RPC service
//! and the client that finds the leader and retries live here too.
//!
//! Not written yet; see the project's issue list.
