//! The messages hosts exchange, as prost messages.
//!
//! Every connection carries length-delimited frames (see [`crate::wire`]).
//! After the authentication handshake ([`Hello`], [`Proof`]) each frame is
//! one [`Frame`]: Raft traffic between hosts, or a client's [`Request`] and
//! the [`Response`] to it. The commands committed through Raft are
//! [`Command`]s, encoded the same way, so the log and the wire share one
//! schema.
//!
//! The structs are written out with prost's derive (no code generator), and
//! tags are never reused: a field that goes away keeps its number reserved.

/// First frame each side sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// Protocol version ([`PROTOCOL`]).
    #[prost(uint32, tag = "1")]
    pub protocol: u32,
    /// The sender's node id (0 for a client that is not a node).
    #[prost(uint64, tag = "2")]
    pub node: u64,
    /// 32 fresh random bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub nonce: Vec<u8>,
    /// The cluster's name (a connection to another cluster is refused early).
    #[prost(string, tag = "4")]
    pub cluster: String,
    /// A host joining with a join token: the token's nonce (empty on every
    /// other connection). The connection is then keyed with the token's
    /// secret instead of the cluster key, and serves one [`JoinReq`].
    #[prost(bytes = "vec", tag = "5")]
    pub join_nonce: Vec<u8>,
    /// The join token's expiry (ms since the Unix epoch).
    #[prost(uint64, tag = "6")]
    pub join_expiry: u64,
}

/// Protocol version spoken by this build.
pub const PROTOCOL: u32 = 3;

/// Second frame each side sends: proof that it holds the cluster key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Proof {
    /// HMAC-SHA256 under the session key of the side's role.
    #[prost(bytes = "vec", tag = "1")]
    pub mac: Vec<u8>,
}

/// One frame after the handshake.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    /// What it carries.
    #[prost(oneof = "frame::Body", tags = "1, 2, 3")]
    pub body: Option<frame::Body>,
}

/// [`Frame`]'s body.
pub mod frame {
    /// What a frame carries.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// Raft messages of one group (host to host).
        #[prost(message, tag = "1")]
        Raft(super::RaftBatch),
        /// A client's request.
        #[prost(message, tag = "2")]
        Request(super::Request),
        /// The answer to a request.
        #[prost(message, tag = "3")]
        Response(super::Response),
    }
}

/// Raft messages for one group, each in raft-rs's own encoding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RaftBatch {
    /// The group (0: the cluster group, N: VolumeN).
    #[prost(uint64, tag = "1")]
    pub group: u64,
    /// Encoded `eraftpb::Message`s.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub msgs: Vec<Vec<u8>>,
}

/// A client's request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// The client's id (random per client instance).
    #[prost(uint64, tag = "1")]
    pub client: u64,
    /// Grows with every request of that client; a retry reuses it, so a
    /// command is applied once however often it is sent.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// The group it is for.
    #[prost(uint64, tag = "3")]
    pub group: u64,
    /// What is asked.
    #[prost(oneof = "request::Body", tags = "4, 5, 6, 7, 8, 9")]
    pub body: Option<request::Body>,
}

/// [`Request`]'s body.
pub mod request {
    /// What a request asks.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// A metadata command of a volume (committed through Raft).
        #[prost(message, tag = "4")]
        Op(super::VolumeOp),
        /// A linearizable read (ReadIndex).
        #[prost(message, tag = "5")]
        Read(super::Read),
        /// A command of the cluster group.
        #[prost(message, tag = "6")]
        Cluster(super::ClusterOp),
        /// An administrative action.
        #[prost(message, tag = "7")]
        Admin(super::Admin),
        /// Block I/O on a volume's LUN, redirected from a host that does
        /// not use its own path (served by the host asked, not by Raft).
        #[prost(message, tag = "8")]
        Block(super::BlockOp),
        /// File I/O of a host in FileSystemRedirected mode, done by the
        /// host asked (the volume's coordinator) through its own mount.
        #[prost(message, tag = "9")]
        File(super::FileOp),
    }
}

/// A file operation a FileSystemRedirected host sends to the coordinator.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileOp {
    /// N of VolumeN.
    #[prost(uint64, tag = "1")]
    pub volume: u64,
    /// The file.
    #[prost(uint64, tag = "2")]
    pub ino: u64,
    /// 0 open, 1 read, 2 write, 3 sync (flush and report), 4 release.
    #[prost(uint32, tag = "3")]
    pub kind: u32,
    /// Byte offset (read, write).
    #[prost(uint64, tag = "4")]
    pub offset: u64,
    /// Bytes to read.
    #[prost(uint64, tag = "5")]
    pub len: u64,
    /// Bytes to write.
    #[prost(bytes = "bytes", tag = "6")]
    pub data: bytes::Bytes,
    /// The coordinator's handle, from the open.
    #[prost(uint64, tag = "7")]
    pub handle: u64,
    /// Open for writing.
    #[prost(bool, tag = "8")]
    pub write: bool,
    /// The host asking.
    #[prost(uint64, tag = "9")]
    pub from: u64,
}

/// What a [`FileOp`] did.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileReply {
    /// 0, or the errno the application gets.
    #[prost(int32, tag = "1")]
    pub errno: i32,
    /// The handle an open made.
    #[prost(uint64, tag = "2")]
    pub handle: u64,
    /// Bytes read; for a write, empty (`written` says how many).
    #[prost(bytes = "bytes", tag = "3")]
    pub data: bytes::Bytes,
    /// Bytes written.
    #[prost(uint32, tag = "4")]
    pub written: u32,
}

/// The answer to a request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    /// The request's `seq`.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Result.
    #[prost(oneof = "response::Result", tags = "2, 3, 4")]
    pub result: Option<response::Result>,
}

/// [`Response`]'s result.
pub mod response {
    /// How a request ended.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Result {
        /// It was done.
        #[prost(message, tag = "2")]
        Reply(super::Reply),
        /// It failed.
        #[prost(message, tag = "3")]
        Error(super::Error),
        /// This host does not lead the group: ask the one named.
        #[prost(message, tag = "4")]
        Redirect(super::Redirect),
    }
}

/// A failed request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    /// What kind of failure ([`ErrorCode`]).
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    /// Details for people.
    #[prost(string, tag = "2")]
    pub message: String,
    /// For `Busy`: the host holding the write lease.
    #[prost(uint64, tag = "3")]
    pub node: u64,
}

/// Failure kinds (the metadata ones mirror POSIX errno names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    /// Unknown.
    Unspecified = 0,
    /// ENOENT.
    NotFound = 1,
    /// EEXIST.
    Exists = 2,
    /// ENOTDIR.
    NotDir = 3,
    /// EISDIR.
    IsDir = 4,
    /// ENOTEMPTY.
    NotEmpty = 5,
    /// EINVAL.
    Invalid = 6,
    /// EINVAL for a rename into itself.
    Loop = 7,
    /// ENOSPC.
    NoSpace = 8,
    /// Another host holds the write lease.
    Busy = 9,
    /// No such group on this host.
    NoGroup = 10,
    /// The group cannot take the request now (no leader, proposal dropped):
    /// retry.
    Unavailable = 11,
    /// The request is not valid.
    BadRequest = 12,
}

/// Where the leader is.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Redirect {
    /// The leader's node id (0: unknown, an election is running).
    #[prost(uint64, tag = "1")]
    pub leader: u64,
    /// Its addresses, best first.
    #[prost(string, repeated, tag = "2")]
    pub addrs: Vec<String>,
}

/// A successful result.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    /// What came back.
    #[prost(
        oneof = "reply::Value",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18"
    )]
    pub value: Option<reply::Value>,
}

/// [`Reply`]'s value.
pub mod reply {
    /// A result's value.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// Done, nothing to say.
        #[prost(message, tag = "1")]
        Done(super::Empty),
        /// An inode's attributes.
        #[prost(message, tag = "2")]
        Attr(super::Attr),
        /// Extents.
        #[prost(message, tag = "3")]
        Extents(super::ExtentList),
        /// A lease.
        #[prost(message, tag = "4")]
        Lease(super::Lease),
        /// Directory entries.
        #[prost(message, tag = "5")]
        Entries(super::DirEntries),
        /// A symlink target.
        #[prost(string, tag = "6")]
        Text(String),
        /// Leases on a file.
        #[prost(message, tag = "7")]
        Leases(super::LeaseList),
        /// A host's view of its groups.
        #[prost(message, tag = "8")]
        Status(super::NodeStatus),
        /// The cluster's registry.
        #[prost(message, tag = "9")]
        Cluster(super::ClusterInfo),
        /// A volume's use.
        #[prost(message, tag = "10")]
        Usage(super::VolumeUsage),
        /// Bytes read from a LUN.
        #[prost(message, tag = "11")]
        Data(super::BlockData),
        /// Write-lease history.
        #[prost(message, tag = "12")]
        LeaseHistory(super::LeaseHistory),
        /// A volume's snapshots.
        #[prost(message, tag = "13")]
        Snapshots(super::SnapshotList),
        /// What a host did in a snapshot phase.
        #[prost(message, tag = "14")]
        Phase(super::SnapshotPhaseReply),
        /// A host was admitted with a join token.
        #[prost(message, tag = "15")]
        Joined(super::JoinReply),
        /// A host's facts, for `csvctl validate`.
        #[prost(message, tag = "16")]
        Facts(super::HostFacts),
        /// What a redirected file operation did.
        #[prost(message, tag = "17")]
        File(super::FileReply),
        /// A file made with its creator's write lease.
        #[prost(message, tag = "18")]
        Created(super::CreatedFile),
    }
}

/// A file made with its creator's write lease (a [`CreateOp`] with
/// `lease_ttl`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreatedFile {
    /// The file's attributes.
    #[prost(message, optional, tag = "1")]
    pub attr: Option<Attr>,
    /// The lease.
    #[prost(message, optional, tag = "2")]
    pub lease: Option<Lease>,
}

/// A new host asks to join (the one request of a join connection).
#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinReq {
    /// Its cluster addresses (host:port), preferred network first.
    #[prost(string, repeated, tag = "1")]
    pub addrs: Vec<String>,
    /// Its host name (for the log).
    #[prost(string, tag = "2")]
    pub hostname: String,
}

/// The answer to a [`JoinReq`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinReply {
    /// The node id the cluster gave the new host.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The cluster key, XORed with a pad only the two ends of the join
    /// connection can compute.
    #[prost(bytes = "vec", tag = "2")]
    pub wrapped_key: Vec<u8>,
    /// The hosts of the cluster, the new one included.
    #[prost(message, repeated, tag = "3")]
    pub nodes: Vec<NodeInfo>,
}

/// Asks a host for its facts, and to try LUNs that are no volume yet.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProbeReq {
    /// Candidate LUNs (iscsi:// URLs or paths) to try from this host.
    #[prost(string, repeated, tag = "1")]
    pub luns: Vec<String>,
}

/// What one host finds about itself and its paths (`csvctl validate`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HostFacts {
    /// Node id.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// csvd's version.
    #[prost(string, tag = "2")]
    pub version: String,
    /// The host's clock (ms since the Unix epoch) when it answered.
    #[prost(uint64, tag = "3")]
    pub now_ms: u64,
    /// `/dev/kvm` opens.
    #[prost(bool, tag = "4")]
    pub kvm: bool,
    /// `/dev/fuse` opens.
    #[prost(bool, tag = "5")]
    pub fuse: bool,
    /// Memory given to VM roles (bytes; 0: all it has).
    #[prost(uint64, tag = "6")]
    pub vm_memory: u64,
    /// MemAvailable (bytes).
    #[prost(uint64, tag = "7")]
    pub mem_available: u64,
    /// The addresses it serves on.
    #[prost(string, repeated, tag = "8")]
    pub listen: Vec<String>,
    /// One entry per volume it mounts, and per candidate LUN asked about.
    #[prost(message, repeated, tag = "9")]
    pub paths: Vec<PathFacts>,
}

/// A host's own path to one volume's LUN.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PathFacts {
    /// N of VolumeN (0: a candidate LUN, no volume yet).
    #[prost(uint64, tag = "1")]
    pub volume: u64,
    /// The LUN as the host reaches it (iscsi:// URL or path).
    #[prost(string, tag = "2")]
    pub lun: String,
    /// Empty when the host read the LUN's first block itself; else why not.
    #[prost(string, tag = "3")]
    pub error: String,
    /// How long that read took (microseconds).
    #[prost(uint64, tag = "4")]
    pub read_us: u64,
    /// 1: the target answered PERSISTENT RESERVE IN; 0: it refused it
    /// (see `pr_error`); 2: not an iSCSI LUN (fencing by lease only).
    #[prost(uint32, tag = "5")]
    pub pr: u32,
    /// Why persistent reservations failed.
    #[prost(string, tag = "6")]
    pub pr_error: String,
    /// The host's I/O mode for the volume (Direct, BlockRedirected...).
    #[prost(string, tag = "7")]
    pub mode: String,
    /// The target answered (logged in, or the file opened): an `error`
    /// is then the LUN's, not the path's.
    #[prost(bool, tag = "8")]
    pub reached: bool,
}

/// One change of a write lease.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseEvent {
    /// When (ms, the leader's clock).
    #[prost(uint64, tag = "1")]
    pub at: u64,
    /// The file.
    #[prost(uint64, tag = "2")]
    pub ino: u64,
    /// The host.
    #[prost(uint64, tag = "3")]
    pub node: u64,
    /// The lease's epoch.
    #[prost(uint64, tag = "4")]
    pub epoch: u64,
    /// "granted", "handed-in", "released", "revoked", "handed-off",
    /// "expired".
    #[prost(string, tag = "5")]
    pub change: String,
    /// The other host of a hand-over.
    #[prost(uint64, tag = "6")]
    pub peer: u64,
}

/// Write-lease changes, oldest first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseHistory {
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<LeaseEvent>,
}

/// Nothing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// How much of a volume is used.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeUsage {
    /// Free bytes (not counting quarantine).
    #[prost(uint64, tag = "1")]
    pub free: u64,
    /// Freed bytes waiting for leases to end.
    #[prost(uint64, tag = "2")]
    pub quarantined: u64,
    /// Inodes in use.
    #[prost(uint64, tag = "3")]
    pub inodes: u64,
    /// Live leases (files open somewhere).
    #[prost(uint64, tag = "4")]
    pub leases: u64,
}

/// One redirected block request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlockOp {
    /// N of VolumeN.
    #[prost(uint64, tag = "1")]
    pub volume: u64,
    /// Byte offset on the LUN.
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    /// Bytes to read (reads).
    #[prost(uint64, tag = "3")]
    pub len: u64,
    /// Bytes to write (writes). `Bytes`: a frame decoded from a `Bytes`
    /// buffer shares it instead of copying the payload.
    #[prost(bytes = "bytes", tag = "4")]
    pub data: bytes::Bytes,
    /// 0 read, 1 write, 2 flush.
    #[prost(uint32, tag = "5")]
    pub kind: u32,
    // Tag 6 (a CRC32 of `data`, protocol 1) is retired: the frame's
    // AES-GCM tag, over every byte of it, is the payload's checksum.
}

/// Bytes read for a redirected request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlockData {
    /// The bytes (shared with the received frame, not copied).
    #[prost(bytes = "bytes", tag = "1")]
    pub data: bytes::Bytes,
    // Tag 2 (a CRC32, protocol 1) is retired, as in [`BlockOp`].
}

/// How a host reaches one volume.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeState {
    /// N of VolumeN.
    #[prost(uint64, tag = "1")]
    pub number: u64,
    /// "Direct", "BlockRedirected", "FileSystemRedirected" or "Unmounted".
    #[prost(string, tag = "2")]
    pub state: String,
    /// Why it is in that state.
    #[prost(string, tag = "3")]
    pub reason: String,
    /// Where it is mounted on this host.
    #[prost(string, tag = "4")]
    pub mountpoint: String,
    /// Bytes read over this host's own path.
    #[prost(uint64, tag = "5")]
    pub direct_read: u64,
    /// Bytes written over this host's own path.
    #[prost(uint64, tag = "6")]
    pub direct_written: u64,
    /// Bytes read through a peer.
    #[prost(uint64, tag = "7")]
    pub redirected_read: u64,
    /// Bytes written through a peer.
    #[prost(uint64, tag = "8")]
    pub redirected_written: u64,
    /// Times the own path failed and I/O switched to a peer.
    #[prost(uint64, tag = "9")]
    pub redirect_events: u64,
    /// Times the LUN refused this host or its reservation key was found
    /// gone (it was fenced off).
    #[prost(uint64, tag = "10")]
    pub fenced_events: u64,
    /// Of the bytes over the own path, those read or written
    /// asynchronously (a FUSE thread submitted them and went on).
    #[prost(uint64, tag = "11")]
    pub async_bytes: u64,
}

/// Attributes of an inode.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Attr {
    /// Inode number.
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    /// 0 directory, 1 file, 2 symlink.
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    /// Permission bits.
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    /// Owner.
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    /// Group.
    #[prost(uint32, tag = "5")]
    pub gid: u32,
    /// Size.
    #[prost(uint64, tag = "6")]
    pub size: u64,
    /// Links.
    #[prost(uint32, tag = "7")]
    pub nlink: u32,
    /// Modification time (ms).
    #[prost(uint64, tag = "8")]
    pub mtime: u64,
    /// Change time (ms).
    #[prost(uint64, tag = "9")]
    pub ctime: u64,
}

/// A piece of a file on the LUN.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Extent {
    /// Offset in the file.
    #[prost(uint64, tag = "1")]
    pub file_off: u64,
    /// Offset on the LUN.
    #[prost(uint64, tag = "2")]
    pub lun_off: u64,
    /// Length.
    #[prost(uint64, tag = "3")]
    pub len: u64,
    /// Reads as zeros.
    #[prost(bool, tag = "4")]
    pub unwritten: bool,
    /// Shared with a snapshot: a written one is not written in place
    /// (reserve, copy, write, remap).
    #[prost(bool, tag = "5")]
    pub shared: bool,
}

/// Extents.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExtentList {
    /// In file order.
    #[prost(message, repeated, tag = "1")]
    pub extents: Vec<Extent>,
}

/// A lease.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Lease {
    /// The holder.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// Epoch.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// Expiry (ms).
    #[prost(uint64, tag = "3")]
    pub expires: u64,
    /// Write lease.
    #[prost(bool, tag = "4")]
    pub write: bool,
}

/// Leases.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseList {
    /// By holder.
    #[prost(message, repeated, tag = "1")]
    pub leases: Vec<Lease>,
}

/// One directory entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DirEntry {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Inode.
    #[prost(uint64, tag = "2")]
    pub ino: u64,
    /// 0 directory, 1 file, 2 symlink.
    #[prost(uint32, tag = "3")]
    pub kind: u32,
}

/// Directory entries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DirEntries {
    /// In name order.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<DirEntry>,
}

/// A volume metadata command.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeOp {
    /// Which command.
    #[prost(
        oneof = "volume_op::Op",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15"
    )]
    pub op: Option<volume_op::Op>,
}

/// [`VolumeOp`]'s commands. `now` fields are set by the leader when it
/// proposes the command, so every replica sees the same time.
pub mod volume_op {
    /// A volume metadata command.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Op {
        /// Create.
        #[prost(message, tag = "1")]
        Create(super::CreateOp),
        /// Link.
        #[prost(message, tag = "2")]
        Link(super::LinkOp),
        /// Unlink or rmdir.
        #[prost(message, tag = "3")]
        Unlink(super::UnlinkOp),
        /// Rename.
        #[prost(message, tag = "4")]
        Rename(super::RenameOp),
        /// Set attributes.
        #[prost(message, tag = "5")]
        SetAttr(super::SetAttrOp),
        /// Allocate extents.
        #[prost(message, tag = "6")]
        Allocate(super::AllocateOp),
        /// Extents written.
        #[prost(message, tag = "7")]
        MarkWritten(super::MarkWrittenOp),
        /// Grant or renew a lease.
        #[prost(message, tag = "8")]
        GrantLease(super::GrantLeaseOp),
        /// Give back or take away a lease.
        #[prost(message, tag = "9")]
        RevokeLease(super::RevokeLeaseOp),
        /// Expire leases (the leader proposes it).
        #[prost(message, tag = "10")]
        Tick(super::TickOp),
        /// Hand a write lease from one host to another (migration).
        #[prost(message, tag = "11")]
        HandOver(super::HandOverOp),
        /// Take a snapshot of the volume.
        #[prost(message, tag = "12")]
        CreateSnapshot(super::SnapshotOp),
        /// Delete a snapshot.
        #[prost(message, tag = "13")]
        DeleteSnapshot(super::SnapshotOp),
        /// Reserve space for a redirected write.
        #[prost(message, tag = "14")]
        Reserve(super::ReserveOp),
        /// Point a file range at reserved space.
        #[prost(message, tag = "15")]
        Remap(super::RemapOp),
    }
}

/// Take or delete a snapshot.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotOp {
    /// Its name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Time (ms; the leader sets it).
    #[prost(uint64, tag = "2")]
    pub now: u64,
}

/// Reserve space for a redirected write.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReserveOp {
    /// The file.
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    /// Bytes (a multiple of 4096).
    #[prost(uint64, tag = "2")]
    pub len: u64,
}

/// Point ranges of a file at reserved space.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RemapOp {
    /// The file.
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    /// The ranges, all applied or none.
    #[prost(message, repeated, tag = "2")]
    pub ranges: Vec<RemapRange>,
}

/// One range of a [`RemapOp`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct RemapRange {
    /// File offset.
    #[prost(uint64, tag = "1")]
    pub off: u64,
    /// The reserved pieces, in file order (`lun_off` and `len` used).
    #[prost(message, repeated, tag = "2")]
    pub pieces: Vec<Extent>,
}

/// A snapshot of a volume, as listed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotInfo {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub name: String,
    /// Creation time (ms).
    #[prost(uint64, tag = "3")]
    pub created: u64,
    /// Files in it.
    #[prost(uint64, tag = "4")]
    pub files: u64,
    /// Bytes only it holds.
    #[prost(uint64, tag = "5")]
    pub exclusive: u64,
}

/// A volume's snapshots, oldest first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotList {
    #[prost(message, repeated, tag = "1")]
    pub snapshots: Vec<SnapshotInfo>,
}

/// Create a file, directory or symlink.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateOp {
    /// Parent directory.
    #[prost(uint64, tag = "1")]
    pub parent: u64,
    /// Name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// 0 directory, 1 file, 2 symlink.
    #[prost(uint32, tag = "3")]
    pub kind: u32,
    /// Permission bits.
    #[prost(uint32, tag = "4")]
    pub mode: u32,
    /// Owner.
    #[prost(uint32, tag = "5")]
    pub uid: u32,
    /// Group.
    #[prost(uint32, tag = "6")]
    pub gid: u32,
    /// Symlink target.
    #[prost(string, tag = "7")]
    pub target: String,
    /// Time (ms).
    #[prost(uint64, tag = "8")]
    pub now: u64,
    /// For a file: the host that gets its write lease in the same command
    /// (with `lease_ttl`), sparing the opener a second commit.
    #[prost(uint64, tag = "9")]
    pub lease_node: u64,
    /// Length (ms) of that lease; 0: no lease.
    #[prost(uint64, tag = "10")]
    pub lease_ttl: u64,
}

/// A new name for a file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkOp {
    /// The file.
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    /// Directory of the new name.
    #[prost(uint64, tag = "2")]
    pub parent: u64,
    /// New name.
    #[prost(string, tag = "3")]
    pub name: String,
    /// Time (ms).
    #[prost(uint64, tag = "4")]
    pub now: u64,
}

/// Remove a name.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnlinkOp {
    /// Directory.
    #[prost(uint64, tag = "1")]
    pub parent: u64,
    /// Name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Remove a directory.
    #[prost(bool, tag = "3")]
    pub rmdir: bool,
    /// Time (ms).
    #[prost(uint64, tag = "4")]
    pub now: u64,
}

/// Rename.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RenameOp {
    /// Source directory.
    #[prost(uint64, tag = "1")]
    pub parent: u64,
    /// Source name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Destination directory.
    #[prost(uint64, tag = "3")]
    pub new_parent: u64,
    /// Destination name.
    #[prost(string, tag = "4")]
    pub new_name: String,
    /// Time (ms).
    #[prost(uint64, tag = "5")]
    pub now: u64,
}

/// Set attributes (absent fields stay).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SetAttrOp {
    /// The inode.
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    /// Permission bits.
    #[prost(uint32, optional, tag = "2")]
    pub mode: Option<u32>,
    /// Owner.
    #[prost(uint32, optional, tag = "3")]
    pub uid: Option<u32>,
    /// Group.
    #[prost(uint32, optional, tag = "4")]
    pub gid: Option<u32>,
    /// Size.
    #[prost(uint64, optional, tag = "5")]
    pub size: Option<u64>,
    /// Time (ms).
    #[prost(uint64, tag = "6")]
    pub now: u64,
    /// Modification time to set (ms).
    #[prost(uint64, optional, tag = "7")]
    pub mtime: Option<u64>,
}

/// Allocate unwritten extents.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AllocateOp {
    /// The file.
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    /// Offset.
    #[prost(uint64, tag = "2")]
    pub off: u64,
    /// Length.
    #[prost(uint64, tag = "3")]
    pub len: u64,
}

/// Extents were written.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MarkWrittenOp {
    /// The file.
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    /// Offset.
    #[prost(uint64, tag = "2")]
    pub off: u64,
    /// Length.
    #[prost(uint64, tag = "3")]
    pub len: u64,
    /// The file's size after the write.
    #[prost(uint64, tag = "4")]
    pub size: u64,
    /// Time (ms).
    #[prost(uint64, tag = "5")]
    pub now: u64,
    /// More written ranges, reported in the same command.
    #[prost(message, repeated, tag = "6")]
    pub more: Vec<WrittenRange>,
}

/// A range of a file that was written.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WrittenRange {
    #[prost(uint64, tag = "1")]
    pub off: u64,
    #[prost(uint64, tag = "2")]
    pub len: u64,
}

/// Grant or renew a lease.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GrantLeaseOp {
    /// The host.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// The file.
    #[prost(uint64, tag = "2")]
    pub ino: u64,
    /// Write lease.
    #[prost(bool, tag = "3")]
    pub write: bool,
    /// Time (ms).
    #[prost(uint64, tag = "4")]
    pub now: u64,
    /// Lifetime (ms).
    #[prost(uint64, tag = "5")]
    pub ttl: u64,
}

/// End a lease.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RevokeLeaseOp {
    /// The host.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// The file.
    #[prost(uint64, tag = "2")]
    pub ino: u64,
    /// Time (ms; the leader sets it).
    #[prost(uint64, tag = "3")]
    pub now: u64,
    /// Taken from the host (fenced off), not given back by it.
    #[prost(bool, tag = "4")]
    pub revoked: bool,
}

/// Expire leases.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TickOp {
    /// Time (ms).
    #[prost(uint64, tag = "1")]
    pub now: u64,
}

/// Move a write lease from one host to another.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HandOverOp {
    /// The file.
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    /// Current holder.
    #[prost(uint64, tag = "2")]
    pub from: u64,
    /// New holder.
    #[prost(uint64, tag = "3")]
    pub to: u64,
    /// Time (ms).
    #[prost(uint64, tag = "4")]
    pub now: u64,
    /// Lifetime of the new lease (ms).
    #[prost(uint64, tag = "5")]
    pub ttl: u64,
}

/// A read served at a linearizable point (ReadIndex).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Read {
    /// Which read.
    #[prost(oneof = "read::Query", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11")]
    pub query: Option<read::Query>,
}

/// [`Read`]'s queries.
pub mod read {
    /// A read.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Query {
        /// Look a name up in a directory: its attributes.
        #[prost(message, tag = "1")]
        Lookup(super::LookupQ),
        /// Attributes of an inode.
        #[prost(uint64, tag = "2")]
        GetAttr(u64),
        /// Entries of a directory.
        #[prost(uint64, tag = "3")]
        ReadDir(u64),
        /// Target of a symlink.
        #[prost(uint64, tag = "4")]
        ReadLink(u64),
        /// Extents of a file.
        #[prost(uint64, tag = "5")]
        Extents(u64),
        /// Leases on a file.
        #[prost(uint64, tag = "6")]
        Leases(u64),
        /// The cluster registry (cluster group).
        #[prost(message, tag = "7")]
        Cluster(super::Empty),
        /// Space and inode use of the volume.
        #[prost(message, tag = "8")]
        Usage(super::Empty),
        /// Write-lease history of a file (0: of every file).
        #[prost(uint64, tag = "9")]
        LeaseHistory(u64),
        /// The volume's snapshots.
        #[prost(message, tag = "10")]
        Snapshots(super::Empty),
        /// The volume's consistency check (every LUN byte owned once,
        /// directories and links agree): the problems found, one per line.
        #[prost(message, tag = "11")]
        Check(super::Empty),
    }
}

/// A name in a directory.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LookupQ {
    /// Directory.
    #[prost(uint64, tag = "1")]
    pub parent: u64,
    /// Name.
    #[prost(string, tag = "2")]
    pub name: String,
}

/// A command of the cluster group.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClusterOp {
    /// Which command.
    #[prost(oneof = "cluster_op::Op", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11")]
    pub op: Option<cluster_op::Op>,
}

/// [`ClusterOp`]'s commands.
pub mod cluster_op {
    /// A cluster command.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Op {
        /// Record a host and its addresses.
        #[prost(message, tag = "1")]
        RegisterNode(super::NodeInfo),
        /// Create a volume (and its Raft group on its replicas).
        #[prost(message, tag = "2")]
        AddVolume(super::VolumeInfo),
        /// Place a VM role on a host.
        #[prost(message, tag = "3")]
        SetVmRole(super::VmRole),
        /// A host became reachable or unreachable from the cluster leader
        /// (the leader proposes it).
        #[prost(message, tag = "4")]
        NodeHealth(super::NodeHealth),
        /// Record (or update) a snapshot set.
        #[prost(message, tag = "5")]
        SetSnapshot(super::SnapshotRecord),
        /// Forget a snapshot set.
        #[prost(string, tag = "6")]
        DeleteSnapshot(String),
        /// Remove a volume from the cluster (hosts unmount it).
        #[prost(uint64, tag = "7")]
        RemoveVolume(u64),
        /// Forget a VM role.
        #[prost(string, tag = "8")]
        RemoveVmRole(String),
        /// Put a host in maintenance (no VM is placed there) or back.
        #[prost(message, tag = "9")]
        SetDraining(super::NodeDraining),
        /// Evict a host: it leaves every group and its id is never reused.
        #[prost(uint64, tag = "10")]
        RemoveNode(u64),
        /// Admit a host that came with a join token: the cluster picks its
        /// id (above `id`, every registered and every removed one).
        #[prost(message, tag = "11")]
        JoinNode(super::NodeInfo),
    }
}

/// A host of the cluster.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeInfo {
    /// Node id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its cluster addresses (host:port), preferred first.
    #[prost(string, repeated, tag = "2")]
    pub addrs: Vec<String>,
}

/// A volume of the cluster.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeInfo {
    /// N in `/ClusterStorage/VolumeN` (also its Raft group id).
    #[prost(uint64, tag = "1")]
    pub number: u64,
    /// Where its LUN is (iSCSI URL or file path).
    #[prost(string, tag = "2")]
    pub lun: String,
    /// First byte of the data area.
    #[prost(uint64, tag = "3")]
    pub data_start: u64,
    /// Capacity of the LUN.
    #[prost(uint64, tag = "4")]
    pub capacity: u64,
    /// The replicas its group starts with.
    #[prost(uint64, repeated, tag = "5")]
    pub voters: Vec<u64>,
    /// Creation time (ms).
    #[prost(uint64, tag = "6")]
    pub now: u64,
}

/// A VM role and where it runs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmRole {
    /// The VM's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The host that owns it (0: none, stopped).
    #[prost(uint64, tag = "2")]
    pub node: u64,
    /// Its configuration (opaque here).
    #[prost(bytes = "vec", tag = "3")]
    pub config: Vec<u8>,
}

/// Whether a host is reachable, as the cluster leader last saw it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeHealth {
    /// The host.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// Heard from within the last election timeout.
    #[prost(bool, tag = "2")]
    pub up: bool,
    /// Since when (leader's clock, ms).
    #[prost(uint64, tag = "3")]
    pub since: u64,
}

/// A snapshot set (the VSS-like hook's record of one backup point).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotRecord {
    /// Its name (unique).
    #[prost(string, tag = "1")]
    pub name: String,
    /// The volumes it covers.
    #[prost(uint64, repeated, tag = "2")]
    pub volumes: Vec<u64>,
    /// Creation time (ms).
    #[prost(uint64, tag = "3")]
    pub created: u64,
    /// "preparing", "frozen", "complete" or "failed".
    #[prost(string, tag = "4")]
    pub state: String,
    /// Details for the tool that made it (opaque here).
    #[prost(bytes = "vec", tag = "5")]
    pub detail: Vec<u8>,
}

/// A host in maintenance or back.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeDraining {
    #[prost(uint64, tag = "1")]
    pub node: u64,
    #[prost(bool, tag = "2")]
    pub draining: bool,
}

/// The cluster registry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClusterInfo {
    /// Hosts.
    #[prost(message, repeated, tag = "1")]
    pub nodes: Vec<NodeInfo>,
    /// Volumes.
    #[prost(message, repeated, tag = "2")]
    pub volumes: Vec<VolumeInfo>,
    /// VM roles.
    #[prost(message, repeated, tag = "3")]
    pub vms: Vec<VmRole>,
    /// Reachability of hosts.
    #[prost(message, repeated, tag = "4")]
    pub health: Vec<NodeHealth>,
    /// Snapshot sets.
    #[prost(message, repeated, tag = "5")]
    pub snapshots: Vec<SnapshotRecord>,
    /// Hosts in maintenance (drained: no VM is placed there).
    #[prost(uint64, repeated, tag = "6")]
    pub draining: Vec<u64>,
    /// Hosts evicted from the cluster (their ids are never reused).
    #[prost(uint64, repeated, tag = "7")]
    pub removed: Vec<u64>,
}

/// An administrative action.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Admin {
    /// Which action.
    #[prost(oneof = "admin::Action", tags = "1, 2, 3, 4, 5, 6, 7, 8")]
    pub action: Option<admin::Action>,
}

/// [`Admin`]'s actions.
pub mod admin {
    /// An administrative action.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Action {
        /// This host's view of its groups (served by any host).
        #[prost(message, tag = "1")]
        Status(super::Empty),
        /// Move the group's leadership to the node given.
        #[prost(uint64, tag = "2")]
        TransferLeader(u64),
        /// Add a host: learner in every group, promoted to voter once it
        /// has caught up.
        #[prost(message, tag = "3")]
        AddNode(super::NodeInfo),
        /// Make the host asked send its I/O to a volume through a peer
        /// (on) or over its own path again (off).
        #[prost(message, tag = "4")]
        Redirect(super::RedirectReq),
        /// A phase of a volume snapshot on the host asked (served by the
        /// host itself).
        #[prost(message, tag = "5")]
        SnapshotPhase(super::SnapshotPhaseReq),
        /// A new host asks to join (only on a join-token connection).
        #[prost(message, tag = "6")]
        Join(super::JoinReq),
        /// The host asked reports its facts (served by the host itself).
        #[prost(message, tag = "7")]
        Probe(super::ProbeReq),
        /// A failure drill's fault, injected on the host asked (served by
        /// the host itself; `csvctl drill`).
        #[prost(message, tag = "8")]
        Fault(super::FaultReq),
    }
}

/// A fault a failure drill injects on one host. Every fault heals by
/// itself after `duration_ms` (a host cut off from every network cannot
/// be told to heal), or on a `heal`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FaultReq {
    /// "san-cut" (the host's own path to the volume's LUN fails),
    /// "san-slow" (`delay_ms` added to each of its own I/Os), "net-cut"
    /// (no traffic to or from `addrs` on this host), "clock" (its clock
    /// `offset_ms` off), "crash" (the host dies at once: its VMs are
    /// killed, csvd restarts after `duration_ms`), or "heal" (every fault
    /// ends now).
    #[prost(string, tag = "1")]
    pub kind: String,
    /// N of VolumeN (0: every volume), for the SAN faults.
    #[prost(uint64, tag = "2")]
    pub volume: u64,
    /// For "net-cut": the addresses (HOST:PORT) whose traffic is cut.
    #[prost(string, repeated, tag = "3")]
    pub addrs: Vec<String>,
    /// For "san-slow": delay added to each I/O (ms).
    #[prost(uint64, tag = "4")]
    pub delay_ms: u64,
    /// For "clock": how far the clock jumps (ms, either way).
    #[prost(sint64, tag = "5")]
    pub offset_ms: i64,
    /// How long the fault lasts (ms; at most 10 minutes).
    #[prost(uint64, tag = "6")]
    pub duration_ms: u64,
}

/// One phase of the snapshot protocol on one host.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotPhaseReq {
    /// N of VolumeN.
    #[prost(uint64, tag = "1")]
    pub volume: u64,
    /// The snapshot's name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// "prepare", "freeze", "thaw", "complete" or "abort".
    #[prost(string, tag = "3")]
    pub phase: String,
    /// For "freeze": how long writes may be held (ms).
    #[prost(uint64, tag = "4")]
    pub limit_ms: u64,
}

/// What a host did in a snapshot phase.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotPhaseReply {
    /// For "thaw": how long this host held writes (ms).
    #[prost(uint64, tag = "1")]
    pub held_ms: u64,
    /// For "thaw": the time limit passed first (writes went on).
    #[prost(bool, tag = "2")]
    pub expired: bool,
    /// VMs paused (freeze) or resumed (thaw).
    #[prost(uint32, tag = "3")]
    pub vms: u32,
    /// Hooks run, with their outcome ("NAME: ok", "NAME: exit 3", ...).
    #[prost(string, repeated, tag = "4")]
    pub hooks: Vec<String>,
    /// For "freeze": waiting for the writes in progress (ms).
    #[prost(uint64, tag = "5")]
    pub drain_ms: u64,
    /// For "freeze": flushing the LUN and reporting open files (ms).
    #[prost(uint64, tag = "6")]
    pub flush_ms: u64,
    /// For "thaw": re-reading the maps of open files (ms).
    #[prost(uint64, tag = "7")]
    pub refresh_ms: u64,
}

/// Redirect a volume's I/O on the host asked.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RedirectReq {
    /// N of VolumeN.
    #[prost(uint64, tag = "1")]
    pub volume: u64,
    /// On or off.
    #[prost(bool, tag = "2")]
    pub on: bool,
    /// 0: BlockRedirected (block I/O through any peer with a path); 1:
    /// FileSystemRedirected (file I/O done by the coordinator).
    #[prost(uint32, tag = "3")]
    pub mode: u32,
}

/// A host's view of its Raft groups.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeStatus {
    /// The host.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// Its groups.
    #[prost(message, repeated, tag = "2")]
    pub groups: Vec<GroupStatus>,
    /// How it reaches each volume.
    #[prost(message, repeated, tag = "3")]
    pub volumes: Vec<VolumeState>,
    /// What it has free, for placement.
    #[prost(message, optional, tag = "4")]
    pub load: Option<HostLoadInfo>,
    /// The VMs it runs.
    #[prost(message, repeated, tag = "5")]
    pub vms: Vec<VmRuntime>,
}

/// A VM a host runs, as its supervisor sees it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmRuntime {
    /// The role's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The csv-vmm process.
    #[prost(uint32, tag = "2")]
    pub pid: u32,
    /// "starting", "running", "paused", "stopping", "failed", ...
    #[prost(string, tag = "3")]
    pub state: String,
    /// The guest's heartbeat sequence number.
    #[prost(uint64, tag = "4")]
    pub heartbeat_seq: u64,
    /// Heartbeats this host has seen.
    #[prost(uint64, tag = "5")]
    pub heartbeats: u64,
    /// Disk writes the guest completed.
    #[prost(uint64, tag = "6")]
    pub disk_writes: u64,
    /// The last error, if any.
    #[prost(string, tag = "7")]
    pub error: String,
    /// Where it waits for an incoming migration (state "incoming").
    #[prost(string, tag = "8")]
    pub listen: String,
    /// Gaps in the guest's heartbeat sequence (carried across migrations).
    #[prost(uint64, tag = "9")]
    pub heartbeat_gaps: u64,
    /// Pages the guest found damaged.
    #[prost(uint64, tag = "10")]
    pub guest_errors: u64,
    /// Heartbeat number of the guest's last completed disk write.
    #[prost(uint64, tag = "11")]
    pub disk_last_seq: u64,
    /// Peak resident memory of the csv-vmm process (bytes, VmHWM): what
    /// the guest touched, plus the VMM's own few MiB.
    #[prost(uint64, tag = "12")]
    pub resident_peak: u64,
    /// A live migration this host is sending: its latest pre-copy round,
    /// as text (empty: none).
    #[prost(string, tag = "13")]
    pub migration: String,
    /// How far it is: pages sent against the guest's memory (0..=99).
    #[prost(uint32, tag = "14")]
    pub migration_pct: u32,
    /// The host it goes to.
    #[prost(uint64, tag = "15")]
    pub migrating_to: u64,
    /// The token a source must open the migration with (state
    /// "incoming"; it travels only on the cluster's encrypted RPC).
    #[prost(string, tag = "16")]
    pub listen_token: String,
}

/// A host's resources as it measures them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HostLoadInfo {
    /// CPU cores.
    #[prost(uint32, tag = "1")]
    pub cores: u32,
    /// 1-minute load average per core, in thousandths (capped at 1000).
    #[prost(uint32, tag = "2")]
    pub cpu_busy_permille: u32,
    /// Memory, bytes (MemTotal).
    #[prost(uint64, tag = "3")]
    pub mem_total: u64,
    /// Memory available without swapping, bytes (MemAvailable).
    #[prost(uint64, tag = "4")]
    pub mem_available: u64,
    /// Memory the host gives to VMs, bytes (0: all it has); placement
    /// treats the host as if it had this much, less the memory of the VM
    /// roles placed there.
    #[prost(uint64, tag = "5")]
    pub vm_memory: u64,
}

/// One group as a host sees it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupStatus {
    /// Group id.
    #[prost(uint64, tag = "1")]
    pub group: u64,
    /// "leader", "follower", "candidate", "pre-candidate".
    #[prost(string, tag = "2")]
    pub role: String,
    /// Term.
    #[prost(uint64, tag = "3")]
    pub term: u64,
    /// Known leader (0: none).
    #[prost(uint64, tag = "4")]
    pub leader: u64,
    /// Commit index.
    #[prost(uint64, tag = "5")]
    pub commit: u64,
    /// Applied index.
    #[prost(uint64, tag = "6")]
    pub applied: u64,
    /// Last log index.
    #[prost(uint64, tag = "7")]
    pub last_index: u64,
    /// Index of the latest snapshot.
    #[prost(uint64, tag = "8")]
    pub snapshot_index: u64,
    /// Voters.
    #[prost(uint64, repeated, tag = "9")]
    pub voters: Vec<u64>,
    /// Learners.
    #[prost(uint64, repeated, tag = "10")]
    pub learners: Vec<u64>,
    /// On the leader: each follower's progress.
    #[prost(message, repeated, tag = "11")]
    pub followers: Vec<FollowerStatus>,
    /// A volume group: write leases held (as this replica applied them).
    #[prost(uint64, tag = "12")]
    pub write_leases: u64,
    /// A volume group: read leases held.
    #[prost(uint64, tag = "13")]
    pub read_leases: u64,
}

/// A follower's progress as the leader sees it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FollowerStatus {
    /// The follower.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// Highest index known replicated there.
    #[prost(uint64, tag = "2")]
    pub matched: u64,
    /// Entries behind the leader's last index.
    #[prost(uint64, tag = "3")]
    pub lag: u64,
    /// "probe", "replicate" or "snapshot".
    #[prost(string, tag = "4")]
    pub state: String,
}

/// A command as committed in a group's log.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    /// Client id (0: proposed by the leader itself, not deduplicated).
    #[prost(uint64, tag = "1")]
    pub client: u64,
    /// The client's sequence number.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// The command.
    #[prost(oneof = "command::Body", tags = "3, 4")]
    pub body: Option<command::Body>,
}

/// [`Command`]'s body.
pub mod command {
    /// A committed command.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// Of a volume group.
        #[prost(message, tag = "3")]
        Volume(super::VolumeOp),
        /// Of the cluster group.
        #[prost(message, tag = "4")]
        Cluster(super::ClusterOp),
    }
}

/// A client's last applied command, kept so a retry gets the same answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DedupEntry {
    /// Client id.
    #[prost(uint64, tag = "1")]
    pub client: u64,
    /// Its last applied sequence number.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// Log index where it was applied.
    #[prost(uint64, tag = "3")]
    pub index: u64,
    /// The answer given.
    #[prost(message, optional, tag = "4")]
    pub response: Option<Response>,
}

/// The applied state of a group, as stored in a Raft snapshot.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupSnapshot {
    /// Deduplication table.
    #[prost(message, repeated, tag = "1")]
    pub dedup: Vec<DedupEntry>,
    /// The state machine's own encoding (a volume's `CSVMETA` bytes, or
    /// an encoded [`ClusterInfo`]).
    #[prost(bytes = "vec", tag = "2")]
    pub machine: Vec<u8>,
}
