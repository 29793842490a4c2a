//! A userspace iSCSI initiator (RFC 7143).
//!
//! Each host of a csv cluster reaches the SAN through this crate: discovery,
//! login (with CHAP), pipelined SCSI commands, digests, keepalive, reconnect
//! across several portals, and SCSI-3 persistent reservations for fencing. A
//! LUN is exposed as an async block device implementing the positioned-I/O
//! trait the rest of the stack uses.
//!
//! The protocol implementation is not written yet; see the project's issue
//! list. The crate exists so the workspace layout is the final one.
