//! Authenticated, length-delimited frames over TCP.
//!
//! ```text
//! handshake frame: len u32 BE | prost body                      (Hello, then Proof)
//! frame:           len u32 BE | sealed body | tag (16 bytes)
//! sealed body, tag = AES-256-GCM(direction key, nonce = 0u32 | counter u64 BE, body)
//! ```
//!
//! Every host and every client holds the cluster key (32 random bytes made
//! when the cluster is created). Both sides send a [`Hello`] with a fresh
//! nonce, derive keys for each direction from the key and both hellos
//! (HMAC-SHA256), and send a [`Proof`] made with their direction's key. A
//! side that cannot prove it holds the cluster key is refused before any
//! request or Raft message is read from it. Each later frame is encrypted
//! and authenticated with its direction's key and its number on the
//! connection (the AEAD nonce), so a frame cannot be read, forged, altered,
//! replayed or reordered by someone on the network: metadata, Raft
//! messages and redirected VM disk data do not travel in clear on the
//! cluster networks.
//!
//! A host that is not yet a member joins with a join token
//! ([`JoinTicket`]): its hello carries the token's nonce and expiry, and
//! both sides key the handshake with the token's secret,
//! `HMAC(cluster key, "csv-join-1" | cluster | nonce | expiry)`, which only
//! the token's holder and the cluster's hosts can compute. Such a
//! connection serves exactly one join request; the cluster key comes back
//! XORed with a pad derived from that connection's keys.

use crate::proto::{Frame, Hello, Proof, MIN_PROTOCOL, PROTOCOL};
use hmac::{Mac, SimpleHmac};
use prost::Message;
use ring::aead::{self, LessSafeKey, UnboundKey, AES_256_GCM};
use sha2::Sha256;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

type HmacSha256 = SimpleHmac<Sha256>;

/// Largest frame accepted (a bigger length is refused, not allocated).
pub const MAX_FRAME: usize = 64 << 20;
const MAX_HANDSHAKE: usize = 4096;
const TAG: usize = 16;
/// A connection whose sent data stays unacknowledged this long fails
/// (`TCP_USER_TIMEOUT`), so a sender notices a dead network within about
/// an election timeout and moves on to the peer's next address, instead of
/// writing into a dead connection until TCP gives up minutes later.
pub const USER_TIMEOUT: Duration = Duration::from_millis(1500);
const NONCE: usize = 32;

/// What can go wrong on a connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    /// The peer did not prove it holds the cluster key, or spoke another
    /// protocol or cluster.
    #[error("peer refused: {0}")]
    Auth(String),
    /// A frame that is too long, fails its tag, or does not decode.
    #[error("bad frame: {0}")]
    Frame(String),
}

/// What is wrong with a join token's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than any token.
    #[error("a join token is at most {MAX_TOKEN} characters")]
    TooLong,
    /// Not a token at all.
    #[error(
        "not a join token: it starts with {TOKEN_PREFIX:?} (`csvctl cluster token` prints one)"
    )]
    NotAToken,
    /// Not hex after the prefix.
    #[error("the join token is damaged (not hex): copy it whole")]
    NotHex,
    /// Hex, but not a token's fields.
    #[error("the join token is damaged (too short or badly formed): copy it whole")]
    Damaged,
}

/// Why a cluster key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading it.
    #[error("cannot read the cluster key {path}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something else than a key.
    #[error(
        "{path} does not hold a cluster key (64 hex digits, as written by `csvctl cluster init`)"
    )]
    NotAKey {
        /// The file.
        path: std::path::PathBuf,
    },
}

/// The cluster key.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A new random key.
    pub fn generate() -> std::io::Result<Key> {
        let mut k = [0u8; 32];
        random(&mut k)?;
        Ok(Key(k))
    }

    /// The key as 64 hex digits (the key file's content).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A key from 64 hex digits (surrounding white space ignored).
    pub fn from_hex(s: &str) -> Option<Key> {
        unhex(s.trim())?.try_into().ok().map(Key)
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Key::from_hex(&text).ok_or_else(|| KeyError::NotAKey {
            path: path.to_path_buf(),
        })
    }

    /// The secret of the join token with this nonce and expiry.
    pub fn join_secret(&self, cluster: &str, nonce: &[u8], expiry: u64) -> [u8; 32] {
        let mut m = mac(&self.0);
        m.update(b"csv-join-1");
        m.update(&(cluster.len() as u64).to_be_bytes());
        m.update(cluster.as_bytes());
        m.update(nonce);
        m.update(&expiry.to_be_bytes());
        m.finalize().into_bytes().into()
    }

    /// The key XORed with `pad` (and back).
    pub fn xor(&self, pad: &[u8; 32]) -> [u8; 32] {
        let mut k = self.0;
        for (a, b) in k.iter_mut().zip(pad) {
            *a ^= b;
        }
        k
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(b: [u8; 32]) -> Key {
        Key(b)
    }

    fn derive(&self, label: &[u8], transcript: &[u8]) -> [u8; 32] {
        let mut m = mac(&self.0);
        m.update(label);
        m.update(transcript);
        m.finalize().into_bytes().into()
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    }
}

/// Fills `buf` from the kernel's random source.
pub fn random(buf: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// A random u64 (client ids, read contexts).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if random(&mut b).is_err() {
        // No /dev/urandom: fall back to time and pid, unique enough for ids.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ ((std::process::id() as u64) << 32);
    }
    u64::from_le_bytes(b)
}

/// A join token's contents: what a host that is not yet a member needs to
/// reach the cluster and prove it was invited.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTicket {
    /// The cluster's name.
    pub cluster: String,
    /// Hosts to ask (host:port), any of which admits it.
    pub addrs: Vec<String>,
    /// 16 random bytes naming the token.
    pub nonce: Vec<u8>,
    /// Expiry, ms since the Unix epoch.
    pub expiry: u64,
    /// The token's secret (see the module's documentation).
    pub secret: [u8; 32],
}

impl std::fmt::Debug for JoinTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTicket")
            .field("cluster", &self.cluster)
            .field("addrs", &self.addrs)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// A join token's text starts with this.
pub const TOKEN_PREFIX: &str = "csvjoin1-";
const MAX_TOKEN: usize = 4096;

/// Bytes as lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

impl JoinTicket {
    /// A new token for `cluster`, valid until `expiry`.
    pub fn issue(
        key: &Key,
        cluster: &str,
        addrs: Vec<String>,
        expiry: u64,
    ) -> std::io::Result<JoinTicket> {
        let mut nonce = vec![0u8; 16];
        random(&mut nonce)?;
        let secret = key.join_secret(cluster, &nonce, expiry);
        Ok(JoinTicket {
            cluster: cluster.to_string(),
            addrs,
            nonce,
            expiry,
            secret,
        })
    }

    /// The token as text: `csvjoin1-` and hex of
    /// `cluster NUL addr,addr NUL nonce expiry(8, BE) secret(32)`.
    pub fn encode(&self) -> String {
        let mut b = Vec::new();
        b.extend_from_slice(self.cluster.as_bytes());
        b.push(0);
        b.extend_from_slice(self.addrs.join(",").as_bytes());
        b.push(0);
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.expiry.to_be_bytes());
        b.extend_from_slice(&self.secret);
        format!("{TOKEN_PREFIX}{}", hex(&b))
    }

    /// Reads a token's text; says what is wrong with a bad one.
    pub fn decode(text: &str) -> Result<JoinTicket, TokenError> {
        let t = text.trim();
        if t.len() > MAX_TOKEN {
            return Err(TokenError::TooLong);
        }
        let body = t.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::NotAToken)?;
        let b = unhex(body).ok_or(TokenError::NotHex)?;
        let bad = || TokenError::Damaged;
        let z1 = b.iter().position(|&c| c == 0).ok_or_else(bad)?;
        let rest = b.get(z1 + 1..).ok_or_else(bad)?;
        let z2 = rest.iter().position(|&c| c == 0).ok_or_else(bad)?;
        let tail = rest.get(z2 + 1..).ok_or_else(bad)?;
        if tail.len() != 16 + 8 + 32 {
            return Err(bad());
        }
        let cluster = String::from_utf8(b[..z1].to_vec()).map_err(|_| bad())?;
        let addrs: Vec<String> = String::from_utf8(rest[..z2].to_vec())
            .map_err(|_| bad())?
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if cluster.is_empty() || addrs.is_empty() {
            return Err(bad());
        }
        let mut e = [0u8; 8];
        e.copy_from_slice(&tail[16..24]);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&tail[24..]);
        Ok(JoinTicket {
            cluster,
            addrs,
            nonce: tail[..16].to_vec(),
            expiry: u64::from_be_bytes(e),
            secret,
        })
    }
}

use crate::group::now_ms;

/// Who this side is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Node id (0 for a client that is not a host).
    pub node: u64,
    /// Cluster name.
    pub cluster: String,
    /// Cluster key.
    pub key: Key,
}

/// An authenticated connection.
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    send_key: FrameKey,
    recv_key: FrameKey,
    send_ctr: u64,
    recv_ctr: u64,
    /// Both ends' addresses (a drill's network cut is checked on them).
    ends: [Option<SocketAddr>; 2],
    /// The peer's node id (0: a client).
    pub peer: u64,
    /// The peer came with a join token (it may only ask to join).
    pub joining: bool,
    /// A pad only the two ends can compute (wraps the key sent to a
    /// joining host).
    pad: [u8; 32],
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf).map_err(WireError::Io)
}

fn read_len(r: &mut impl Read, max: usize) -> Result<usize, WireError> {
    let mut l = [0u8; 4];
    read_exact_or(r, &mut l)?;
    let len = u32::from_be_bytes(l) as usize;
    if len > max {
        return Err(WireError::Frame(format!(
            "frame of {len} bytes is longer than the {max} allowed"
        )));
    }
    Ok(len)
}

fn send_plain(w: &mut TcpStream, m: &impl Message) -> Result<(), WireError> {
    let body = m.encode_to_vec();
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    Ok(())
}

fn recv_plain<M: Message + Default>(r: &mut impl Read) -> Result<M, WireError> {
    let len = read_len(r, MAX_HANDSHAKE)?;
    let mut body = vec![0u8; len];
    read_exact_or(r, &mut body)?;
    M::decode(body.as_slice()).map_err(|e| WireError::Frame(e.to_string()))
}

fn handshake(
    stream: TcpStream,
    me: &Identity,
    initiator: bool,
    join: Option<&JoinTicket>,
    timeout: Duration,
) -> Result<Conn, WireError> {
    stream.set_nodelay(true)?;
    nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::TcpUserTimeout,
        &(USER_TIMEOUT.as_millis() as u32),
    )
    .map_err(std::io::Error::from)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut nonce = vec![0u8; NONCE];
    random(&mut nonce)?;
    let hello = Hello {
        protocol: PROTOCOL,
        node: me.node,
        nonce,
        cluster: me.cluster.clone(),
        join_nonce: join.map(|t| t.nonce.clone()).unwrap_or_default(),
        join_expiry: join.map_or(0, |t| t.expiry),
    };
    send_plain(&mut writer, &hello)?;
    let theirs: Hello = recv_plain(&mut reader)?;
    if theirs.protocol < MIN_PROTOCOL {
        return Err(WireError::Auth(format!(
            "peer speaks protocol {}, older than this build accepts ({MIN_PROTOCOL} to {PROTOCOL}): upgrade it",
            theirs.protocol
        )));
    }
    if theirs.cluster != me.cluster {
        return Err(WireError::Auth(format!(
            "peer belongs to cluster {:?}, not {:?}",
            theirs.cluster, me.cluster
        )));
    }
    if theirs.nonce.len() != NONCE || theirs.nonce == hello.nonce {
        return Err(WireError::Auth("bad nonce".into()));
    }
    let (ih, ah) = if initiator {
        (&hello, &theirs)
    } else {
        (&theirs, &hello)
    };
    let mut transcript = Vec::new();
    transcript.extend_from_slice(b"csv-wire-1");
    transcript.extend_from_slice(&ih.encode_to_vec());
    transcript.extend_from_slice(&ah.encode_to_vec());
    // A join connection is keyed with the token's secret: the joining side
    // has it from the token, this cluster's hosts compute it.
    let joining = !initiator && !theirs.join_nonce.is_empty();
    let token_key;
    let k = if let Some(t) = join {
        token_key = Key(t.secret);
        &token_key
    } else if joining {
        if theirs.join_nonce.len() != 16 {
            return Err(WireError::Auth("bad join token nonce".into()));
        }
        if theirs.join_expiry <= now_ms() {
            return Err(WireError::Auth(
                "the join token has expired: ask for a new one (`csvctl cluster token`)".into(),
            ));
        }
        token_key = Key(me
            .key
            .join_secret(&me.cluster, &theirs.join_nonce, theirs.join_expiry));
        &token_key
    } else {
        &me.key
    };
    let (my_proof, their_proof, send_key, recv_key) = if initiator {
        (
            k.derive(b"proof-i", &transcript),
            k.derive(b"proof-a", &transcript),
            k.derive(b"frames-i", &transcript),
            k.derive(b"frames-a", &transcript),
        )
    } else {
        (
            k.derive(b"proof-a", &transcript),
            k.derive(b"proof-i", &transcript),
            k.derive(b"frames-a", &transcript),
            k.derive(b"frames-i", &transcript),
        )
    };
    send_plain(
        &mut writer,
        &Proof {
            mac: my_proof.to_vec(),
        },
    )?;
    let proof: Proof = recv_plain(&mut reader)?;
    if !ct_eq(&proof.mac, &their_proof) {
        return Err(WireError::Auth(if join.is_some() || joining {
            "the join token is not this cluster's (or was altered)".into()
        } else {
            "peer does not hold this cluster's key".into()
        }));
    }
    let pad = k.derive(b"key-wrap", &transcript);
    let ends = [writer.local_addr().ok(), writer.peer_addr().ok()];
    Ok(Conn {
        joining,
        pad,
        reader,
        writer,
        send_key: FrameKey::new(&send_key),
        recv_key: FrameKey::new(&recv_key),
        send_ctr: 0,
        recv_ctr: 0,
        ends,
        peer: theirs.node,
    })
}

/// Connects to `addr` and authenticates.
pub fn connect(addr: SocketAddr, me: &Identity, timeout: Duration) -> Result<Conn, WireError> {
    if crate::faults::network_cut(&addr) {
        return Err(WireError::Io(crate::faults::unreachable()));
    }
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    handshake(stream, me, true, None, timeout)
}

/// Connects to `addr` as a host that holds a join token, not the key.
pub fn connect_join(
    addr: SocketAddr,
    ticket: &JoinTicket,
    timeout: Duration,
) -> Result<Conn, WireError> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    let me = Identity {
        node: 0,
        cluster: ticket.cluster.clone(),
        key: Key(ticket.secret),
    };
    handshake(stream, &me, true, Some(ticket), timeout)
}

/// Authenticates a connection a listener accepted.
pub fn accept(stream: TcpStream, me: &Identity, timeout: Duration) -> Result<Conn, WireError> {
    if stream
        .local_addr()
        .is_ok_and(|a| crate::faults::network_cut(&a))
    {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return Err(WireError::Io(crate::faults::unreachable()));
    }
    handshake(stream, me, false, None, timeout)
}

/// Equality that takes the same time wherever the first difference is.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One direction's frame key (AES-256-GCM, expanded once per connection).
pub struct FrameKey(LessSafeKey);

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKey(..)")
    }
}

impl FrameKey {
    /// The key for frames sealed with these 32 bytes.
    pub fn new(key: &[u8; 32]) -> FrameKey {
        // AES-256 takes any 32 bytes: this cannot fail.
        let k = UnboundKey::new(&AES_256_GCM, key).unwrap_or_else(|_| unreachable!());
        FrameKey(LessSafeKey::new(k))
    }
}

/// The AEAD nonce of the `ctr`-th frame in a direction (each direction of
/// each connection has its own key, so a counter never repeats under one).
fn nonce(ctr: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&ctr.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// Checks, decrypts and decodes one frame's `sealed body | tag` (the bytes
/// after its length), the `ctr`-th frame received under `key`.
pub fn open_frame(key: &[u8; 32], ctr: u64, buf: &[u8]) -> Result<Frame, WireError> {
    open_frame_vec(&FrameKey::new(key), ctr, buf.to_vec())
}

/// [`open_frame`] in place: payload fields (`bytes::Bytes`) of the frame
/// point into `buf` instead of being copied.
fn open_frame_vec(key: &FrameKey, ctr: u64, mut buf: Vec<u8>) -> Result<Frame, WireError> {
    if buf.len() < TAG {
        return Err(WireError::Frame("frame shorter than its tag".into()));
    }
    let n = key
        .0
        .open_in_place(nonce(ctr), aead::Aad::empty(), &mut buf)
        .map_err(|_| {
            WireError::Frame("tag does not match: frame forged, altered or replayed".into())
        })?
        .len();
    buf.truncate(n);
    Frame::decode(bytes::Bytes::from(buf)).map_err(|e| WireError::Frame(e.to_string()))
}

/// Seals a frame: `len | sealed body | tag`, the `ctr`-th frame sent under
/// `key`.
pub fn seal_frame(key: &[u8; 32], ctr: u64, f: &Frame) -> Result<Vec<u8>, WireError> {
    seal_frame_with(&FrameKey::new(key), ctr, f)
}

/// [`seal_frame`] with an expanded key (encoded and encrypted in place: the
/// body is not copied again).
fn seal_frame_with(key: &FrameKey, ctr: u64, f: &Frame) -> Result<Vec<u8>, WireError> {
    let len = f.encoded_len();
    let mut buf = frame_buf(len)?;
    f.encode(&mut buf)
        .map_err(|e| WireError::Frame(e.to_string()))?;
    seal_buf(key, ctr, buf)
}

/// A buffer for a frame of `len` bytes, its length already in it.
fn frame_buf(len: usize) -> Result<Vec<u8>, WireError> {
    if len > MAX_FRAME {
        return Err(WireError::Frame(format!(
            "frame of {len} bytes is longer than the {MAX_FRAME} allowed"
        )));
    }
    let mut buf = Vec::with_capacity(4 + len + TAG);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Encodes the body of a redirected block write's request frame into
/// `buf`, `data` copied once, straight into it (not first into the
/// message): the frame with `req.body = Block(op)` and `op.data = data`,
/// with the payload as its last field (prost reads fields in any order).
/// `req` has no body and `op` no data. Returns the body's length.
pub fn encode_block_write(
    req: &crate::proto::Request,
    op: &crate::proto::BlockOp,
    data: &[u8],
    buf: &mut Vec<u8>,
) -> usize {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    // key + length + bytes of a length-delimited field.
    let field = |tag: u32, len: usize| {
        encoded_len_varint(u64::from(tag << 3)) + encoded_len_varint(len as u64) + len
    };
    let op_len = op.encoded_len() + field(4, data.len());
    let req_len = req.encoded_len() + field(8, op_len);
    let body_len = field(2, req_len);
    buf.reserve(body_len + TAG);
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(req_len as u64, buf);
    // Encoding into a Vec cannot run out of room.
    let _ = req.encode(buf);
    encode_key(8, WireType::LengthDelimited, buf);
    encode_varint(op_len as u64, buf);
    let _ = op.encode(buf);
    encode_key(4, WireType::LengthDelimited, buf);
    encode_varint(data.len() as u64, buf);
    buf.extend_from_slice(data);
    body_len
}

/// Encrypts `len | body` in place and appends the tag.
fn seal_buf(key: &FrameKey, ctr: u64, mut buf: Vec<u8>) -> Result<Vec<u8>, WireError> {
    let tag = key
        .0
        .seal_in_place_separate_tag(nonce(ctr), aead::Aad::empty(), &mut buf[4..])
        .map_err(|_| WireError::Frame("frame too long to seal".into()))?;
    buf.extend_from_slice(tag.as_ref());
    Ok(buf)
}

impl Conn {
    /// Sends one frame.
    pub fn send(&mut self, f: &Frame) -> Result<(), WireError> {
        self.check_cut()?;
        let buf = seal_frame_with(&self.send_key, self.send_ctr, f)?;
        self.send_ctr += 1;
        self.writer.write_all(&buf)?;
        Ok(())
    }

    /// Sends a redirected block write (see [`encode_block_write`]): the
    /// payload is copied once, into the sealed frame.
    pub fn send_block_write(
        &mut self,
        req: &crate::proto::Request,
        op: &crate::proto::BlockOp,
        data: &[u8],
    ) -> Result<(), WireError> {
        self.check_cut()?;
        let mut buf = frame_buf(0)?;
        let len = encode_block_write(req, op, data, &mut buf);
        if len > MAX_FRAME {
            return Err(WireError::Frame(format!(
                "frame of {len} bytes is longer than the {MAX_FRAME} allowed"
            )));
        }
        buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
        let buf = seal_buf(&self.send_key, self.send_ctr, buf)?;
        self.send_ctr += 1;
        self.writer.write_all(&buf)?;
        Ok(())
    }

    /// Receives one frame (waits at most the read timeout, if one is set).
    pub fn recv(&mut self) -> Result<Frame, WireError> {
        let len = read_len(&mut self.reader, MAX_FRAME)?;
        // Read into spare capacity (no zeroing of a buffer about to be
        // overwritten), then decode sharing it.
        let mut buf = Vec::with_capacity(len + TAG);
        (&mut self.reader)
            .take((len + TAG) as u64)
            .read_to_end(&mut buf)?;
        if buf.len() != len + TAG {
            return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        self.check_cut()?;
        let f = open_frame_vec(&self.recv_key, self.recv_ctr, buf)?;
        self.recv_ctr += 1;
        Ok(f)
    }

    /// Fails (and closes the connection) while a drill has cut either
    /// end's address off: to both ends it is as if the network died.
    fn check_cut(&self) -> Result<(), WireError> {
        if self.ends.iter().flatten().any(crate::faults::network_cut) {
            self.shutdown();
            return Err(WireError::Io(crate::faults::unreachable()));
        }
        Ok(())
    }

    /// Sets how long `recv` waits (None: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.writer.set_read_timeout(t)
    }

    /// Sets how long `send` may block.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.writer.set_write_timeout(t)
    }

    /// The pad that wraps the cluster key on a join connection.
    pub fn key_pad(&self) -> [u8; 32] {
        self.pad
    }

    /// Closes both directions.
    pub fn shutdown(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{frame, RaftBatch};
    use std::net::TcpListener;

    fn ident(node: u64, key: &Key) -> Identity {
        Identity {
            node,
            cluster: "t".into(),
            key: key.clone(),
        }
    }

    fn pair(a: Identity, b: Identity) -> (Result<Conn, WireError>, Result<Conn, WireError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            accept(s, &b, Duration::from_secs(2))
        });
        let c = connect(addr, &a, Duration::from_secs(2));
        (c, t.join().unwrap())
    }

    #[test]
    fn a_drill_cut_fails_connections_until_it_heals() {
        let k = Key([6u8; 32]);
        let (c, a) = pair(ident(1, &k), ident(2, &k));
        let (mut c, mut a) = (c.unwrap(), a.unwrap());
        let to = c.ends[1].unwrap();
        crate::faults::cut_network(&[to], std::time::Instant::now() + Duration::from_secs(30));
        assert!(c.send(&raft_frame(1)).is_err());
        assert!(connect(to, &ident(1, &k), Duration::from_secs(1)).is_err());
        assert!(a.recv().is_err(), "the other end sees the connection die");
        crate::faults::heal();
        let (c, a) = pair(ident(1, &k), ident(2, &k));
        c.unwrap().send(&raft_frame(2)).unwrap();
        assert_eq!(a.unwrap().recv().unwrap(), raft_frame(2));
        // A cut ends by itself at its deadline.
        crate::faults::cut_network(&[to], std::time::Instant::now());
        assert!(!crate::faults::network_cut(&to));
    }

    #[test]
    fn a_block_write_frame_decodes_as_the_message() {
        use crate::proto::{request, BlockOp, Request};
        let data: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let req = Request {
            client: 0,
            seq: 77,
            group: 0,
            body: None,
        };
        let op = BlockOp {
            volume: 3,
            offset: 1 << 40,
            kind: crate::proto::BlockOpKind::Write as i32,
            ..Default::default()
        };
        let mut body = Vec::new();
        let n = encode_block_write(&req, &op, &data, &mut body);
        assert_eq!(n, body.len());
        let whole = Frame {
            body: Some(frame::Body::Request(Request {
                body: Some(request::Body::Block(BlockOp {
                    data: data.clone().into(),
                    ..op.clone()
                })),
                ..req.clone()
            })),
        };
        assert_eq!(n, whole.encoded_len());
        assert_eq!(Frame::decode(body.as_slice()).unwrap(), whole);
        // And through a connection, sealed.
        let k = Key([4u8; 32]);
        let (c, a) = pair(ident(1, &k), ident(2, &k));
        let (mut c, mut a) = (c.unwrap(), a.unwrap());
        c.send_block_write(&req, &op, &data).unwrap();
        assert_eq!(a.recv().unwrap(), whole);
    }

    fn raft_frame(n: u8) -> Frame {
        Frame {
            body: Some(frame::Body::Raft(RaftBatch {
                group: 7,
                msgs: vec![vec![n; 3]],
            })),
        }
    }

    #[test]
    fn peers_with_the_key_talk_both_ways() {
        let k = Key::generate().unwrap();
        let (c, s) = pair(ident(1, &k), ident(2, &k));
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert_eq!((c.peer, s.peer), (2, 1));
        for i in 0..3 {
            c.send(&raft_frame(i)).unwrap();
            assert_eq!(s.recv().unwrap(), raft_frame(i));
            s.send(&raft_frame(10 + i)).unwrap();
            assert_eq!(c.recv().unwrap(), raft_frame(10 + i));
        }
    }

    #[test]
    fn a_peer_with_another_key_is_refused_by_both_sides() {
        let (c, s) = pair(
            ident(1, &Key::generate().unwrap()),
            ident(2, &Key::generate().unwrap()),
        );
        assert!(matches!(c, Err(WireError::Auth(_))), "{c:?}");
        assert!(matches!(s, Err(WireError::Auth(_))), "{s:?}");
    }

    #[test]
    fn a_frame_replayed_reordered_or_altered_is_refused() {
        let k = [7u8; 32];
        let f0 = seal_frame(&k, 0, &raft_frame(1)).unwrap();
        let f1 = seal_frame(&k, 1, &raft_frame(2)).unwrap();
        assert_eq!(open_frame(&k, 0, &f0[4..]).unwrap(), raft_frame(1));
        // Replayed as the second frame, or out of order.
        assert!(open_frame(&k, 1, &f0[4..]).is_err());
        assert!(open_frame(&k, 0, &f1[4..]).is_err());
        // One bit flipped anywhere.
        for i in 4..f0.len() {
            let mut b = f0.clone();
            b[i] ^= 1;
            assert!(open_frame(&k, 0, &b[4..]).is_err(), "bit at {i}");
        }
        // Another key.
        assert!(open_frame(&[8u8; 32], 0, &f0[4..]).is_err());
        assert!(open_frame(&k, 0, &[1, 2, 3]).is_err());
    }

    #[test]
    fn a_join_token_admits_until_it_expires_and_only_to_its_cluster() {
        let k = Key::generate().unwrap();
        let later = now_ms() + 60_000;
        let t = JoinTicket::issue(&k, "t", vec!["127.0.0.1:1".into()], later).unwrap();
        assert_eq!(JoinTicket::decode(&t.encode()).unwrap(), t);
        // The token's holder talks to a host, keyed by the token.
        let join = |t: JoinTicket, host: Identity| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let h = std::thread::spawn(move || {
                let (s, _) = l.accept().unwrap();
                accept(s, &host, Duration::from_secs(2))
            });
            let c = connect_join(addr, &t, Duration::from_secs(2));
            (c, h.join().unwrap())
        };
        let (c, s) = join(t.clone(), ident(1, &k));
        let (c, s) = (c.unwrap(), s.unwrap());
        assert!(s.joining && !c.joining);
        assert_eq!(Key(k.xor(&s.key_pad())).xor(&c.key_pad()), k.0);
        // Expired, forged (secret changed), or another cluster's key.
        let old = JoinTicket::issue(&k, "t", vec!["x:1".into()], now_ms() - 1).unwrap();
        let (c, s) = join(old, ident(1, &k));
        assert!(c.is_err() && format!("{:?}", s.unwrap_err()).contains("expired"));
        let mut forged = t.clone();
        forged.secret[0] ^= 1;
        let (c, s) = join(forged, ident(1, &k));
        assert!(c.is_err() && s.is_err());
        let (c, s) = join(t.clone(), ident(1, &Key::generate().unwrap()));
        assert!(c.is_err() && s.is_err());
        let mut longer = t.clone();
        longer.expiry += 1;
        let (c, s) = join(longer, ident(1, &k));
        assert!(c.is_err() && s.is_err(), "expiry is bound to the secret");
        // Damaged text.
        let text = t.encode();
        assert!(JoinTicket::decode(&text[..text.len() - 2]).is_err());
        assert!(JoinTicket::decode("csvjoin1-zz").is_err());
        assert_eq!(JoinTicket::decode("hello"), Err(TokenError::NotAToken));
        assert!(!format!("{t:?}").contains(&hex(&t.secret)));
    }

    proptest::proptest! {
        #[test]
        fn join_token_text_never_panics(s in "csvjoin1-[0-9a-f]{0,300}", junk in ".{0,64}") {
            let _ = JoinTicket::decode(&s);
            let _ = JoinTicket::decode(&junk);
        }
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let k = Key::generate().unwrap();
        let back = Key::from_hex(&format!("  {}\n", k.to_hex())).unwrap();
        assert_eq!(back.0, k.0);
        assert!(Key::from_hex("abc").is_none());
        assert!(Key::from_hex(&"zz".repeat(32)).is_none());
        assert!(Key::from_hex(&"é".repeat(32)).is_none());
    }
}
