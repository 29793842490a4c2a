//! Authenticated, length-delimited frames over TCP.
//!
//! ```text
//! handshake frame: len u32 BE | prost body                      (Hello, then Proof)
//! frame:           len u32 BE | prost body | mac (16 bytes)
//! mac = HMAC-SHA256(direction key, counter u64 BE | body)[..16]
//! ```
//!
//! Every host and every client holds the cluster key (32 random bytes made
//! when the cluster is created). Both sides send a [`Hello`] with a fresh
//! nonce, derive keys for each direction from the key and both hellos,
//! and send a [`Proof`] made with their direction's key. A side that cannot
//! prove it holds the cluster key is refused before any request or Raft
//! message is read from it. Each later frame carries a MAC over a counter
//! and its bytes, so a frame cannot be forged, altered, replayed or
//! reordered by someone on the network. (Frames are authenticated, not
//! encrypted: metadata travels in clear on the cluster networks.)

use crate::proto::{Frame, Hello, Proof, PROTOCOL};
use hmac::{Mac, SimpleHmac};
use prost::Message;
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
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer did not prove it holds the cluster key, or spoke another
    /// protocol or cluster.
    #[error("peer refused: {0}")]
    Auth(String),
    /// A frame that is too long, fails its MAC, or does not decode.
    #[error("bad frame: {0}")]
    Frame(String),
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
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A key from 64 hex digits (surrounding white space ignored).
    pub fn from_hex(s: &str) -> Option<Key> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(k))
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Key, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read cluster key {}: {e}", path.display()))?;
        Key::from_hex(&text).ok_or_else(|| {
            format!(
                "{} does not hold a cluster key (64 hex digits, as written by `csvctl cluster init`)",
                path.display()
            )
        })
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
    send_key: [u8; 32],
    recv_key: [u8; 32],
    send_ctr: u64,
    recv_ctr: u64,
    /// The peer's node id (0: a client).
    pub peer: u64,
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
    };
    send_plain(&mut writer, &hello)?;
    let theirs: Hello = recv_plain(&mut reader)?;
    if theirs.protocol != PROTOCOL {
        return Err(WireError::Auth(format!(
            "peer speaks protocol {}, this build speaks {PROTOCOL}",
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
    let k = &me.key;
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
        return Err(WireError::Auth(
            "peer does not hold this cluster's key".into(),
        ));
    }
    Ok(Conn {
        reader,
        writer,
        send_key,
        recv_key,
        send_ctr: 0,
        recv_ctr: 0,
        peer: theirs.node,
    })
}

/// Connects to `addr` and authenticates.
pub fn connect(addr: SocketAddr, me: &Identity, timeout: Duration) -> Result<Conn, WireError> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    handshake(stream, me, true, timeout)
}

/// Authenticates a connection a listener accepted.
pub fn accept(stream: TcpStream, me: &Identity, timeout: Duration) -> Result<Conn, WireError> {
    handshake(stream, me, false, timeout)
}

/// Equality that takes the same time wherever the first difference is.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn tag(key: &[u8; 32], ctr: u64, body: &[u8]) -> HmacSha256 {
    let mut m = mac(key);
    m.update(&ctr.to_be_bytes());
    m.update(body);
    m
}

/// Checks and decodes one frame's `body | mac` (the bytes after its
/// length), the `ctr`-th frame received under `key`.
pub fn open_frame(key: &[u8; 32], ctr: u64, buf: &[u8]) -> Result<Frame, WireError> {
    if buf.len() < TAG {
        return Err(WireError::Frame("frame shorter than its MAC".into()));
    }
    let (body, t) = buf.split_at(buf.len() - TAG);
    if tag(key, ctr, body).verify_truncated_left(t).is_err() {
        return Err(WireError::Frame(
            "MAC does not match: frame forged, altered or replayed".into(),
        ));
    }
    Frame::decode(body).map_err(|e| WireError::Frame(e.to_string()))
}

/// Seals a frame: `len | body | mac`, the `ctr`-th frame sent under `key`.
pub fn seal_frame(key: &[u8; 32], ctr: u64, f: &Frame) -> Result<Vec<u8>, WireError> {
    let body = f.encode_to_vec();
    if body.len() > MAX_FRAME {
        return Err(WireError::Frame(format!(
            "frame of {} bytes is longer than the {MAX_FRAME} allowed",
            body.len()
        )));
    }
    let t = tag(key, ctr, &body).finalize().into_bytes();
    let mut buf = Vec::with_capacity(4 + body.len() + TAG);
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    buf.extend_from_slice(&t[..TAG]);
    Ok(buf)
}

impl Conn {
    /// Sends one frame.
    pub fn send(&mut self, f: &Frame) -> Result<(), WireError> {
        let buf = seal_frame(&self.send_key, self.send_ctr, f)?;
        self.send_ctr += 1;
        self.writer.write_all(&buf)?;
        Ok(())
    }

    /// Receives one frame (waits at most the read timeout, if one is set).
    pub fn recv(&mut self) -> Result<Frame, WireError> {
        let len = read_len(&mut self.reader, MAX_FRAME)?;
        let mut buf = vec![0u8; len + TAG];
        read_exact_or(&mut self.reader, &mut buf)?;
        let f = open_frame(&self.recv_key, self.recv_ctr, &buf)?;
        self.recv_ctr += 1;
        Ok(f)
    }

    /// Sets how long `recv` waits (None: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.writer.set_read_timeout(t)
    }

    /// Sets how long `send` may block.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.writer.set_write_timeout(t)
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
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let k = Key::generate().unwrap();
        let back = Key::from_hex(&format!("  {}\n", k.to_hex())).unwrap();
        assert_eq!(back.0, k.0);
        assert!(Key::from_hex("abc").is_none());
        assert!(Key::from_hex(&"zz".repeat(32)).is_none());
        assert!(Key::from_hex(&"é".repeat(32)).is_none());
    }
}
