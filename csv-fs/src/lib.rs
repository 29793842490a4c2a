//! The csv node daemon (`csvd`) and the `/ClusterStorage` FUSE filesystem.
//!
//! A node joins the cluster, hosts its Raft replicas, keeps its SAN paths
//! (direct or redirected through a peer), serves redirected I/O for peers,
//! and mounts every volume at `/ClusterStorage/VolumeN`.
//!
//! Not written yet; see the project's issue list.
