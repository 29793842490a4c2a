//! The VM state stream: one format for a save file and a live migration.
//!
//! A stream starts with the 8-byte magic `CSVVMSTR`, a major and a minor
//! version (`u16` each, little-endian), and continues with frames:
//!
//! ```text
//! kind: u8 | reserved: [u8; 3] = 0 | len: u32 | crc32(kind, len, payload): u32 | payload
//! ```
//!
//! A save file is a recorded migration stream of one round: `Hello`, the
//! memory as `Pages` frames, `Devices`, `VmState`, one `VcpuState` per vCPU,
//! then `End`. A live migration sends several rounds of pages and adds the
//! hand-shake frames (`Ready`, `Ack`, `Go`, `Resumed`, `Abort`) that flow back and
//! forth on the same connection. Every frame is checked before anything in
//! it is used; an unknown major version, a bad checksum, an oversized or
//! short frame and a malformed payload are errors that name the frame.
//!
//! Inside the state frames, each KVM structure is a tagged, length-prefixed
//! record (`tag: u16 | len: u32 | bytes`) holding the structure's bytes as
//! KVM returns them; the length must match the structure exactly. Unknown
//! tags are skipped, so a newer minor version can add records.

use std::io::{Read, Write};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

mod state;

pub use state::{DeviceState, VcpuState, VmState};

/// Stream magic.
pub const MAGIC: [u8; 8] = *b"CSVVMSTR";
/// Major version: a reader refuses any other.
pub const MAJOR: u16 = 1;
/// Minor version: additions a reader of the same major can skip.
pub const MINOR: u16 = 0;
/// Largest frame payload accepted (a `Pages` frame carries at most 1 MiB).
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Guest page size.
pub const PAGE: u64 = 4096;
/// Most pages in one `Pages` frame.
pub const MAX_PAGES_PER_FRAME: u32 = 256;

/// Errors while reading or writing a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("I/O on the state stream")]
    Io(#[from] std::io::Error),
    #[error("not a csv VM state stream (magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("state stream version {0}.{1} is not supported (this csv-vmm reads {MAJOR}.x)")]
    Version(u16, u16),
    #[error("frame of kind {kind}: {len} bytes is more than the limit of {MAX_PAYLOAD}")]
    TooLarge { kind: u8, len: u32 },
    #[error("frame of kind {kind}: checksum {found:08x}, expected {expected:08x}")]
    Checksum { kind: u8, found: u32, expected: u32 },
    #[error("frame header has non-zero reserved bytes")]
    Reserved,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{frame} frame: {what}")]
    Malformed { frame: &'static str, what: String },
    #[error("unexpected {got} frame, expected {expected}")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
}

type Result<T> = std::result::Result<T, StreamError>;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Pages = 2,
    Round = 3,
    VmState = 4,
    VcpuState = 5,
    Devices = 6,
    End = 7,
    Ack = 0x81,
    Go = 0x82,
    Resumed = 0x83,
    Abort = 0x84,
    Ready = 0x85,
}

impl Kind {
    fn from_u8(v: u8) -> Result<Kind> {
        Ok(match v {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::Round,
            4 => Kind::VmState,
            5 => Kind::VcpuState,
            6 => Kind::Devices,
            7 => Kind::End,
            0x81 => Kind::Ack,
            0x82 => Kind::Go,
            0x83 => Kind::Resumed,
            0x84 => Kind::Abort,
            0x85 => Kind::Ready,
            other => return Err(StreamError::UnknownKind(other)),
        })
    }

    /// The frame's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::Pages => "Pages",
            Kind::Round => "Round",
            Kind::VmState => "VmState",
            Kind::VcpuState => "VcpuState",
            Kind::Devices => "Devices",
            Kind::End => "End",
            Kind::Ack => "Ack",
            Kind::Go => "Go",
            Kind::Resumed => "Resumed",
            Kind::Abort => "Abort",
            Kind::Ready => "Ready",
        }
    }
}

fn frame_crc(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    h.update(&payload[..covered_len(kind, payload)]);
    h.finalize()
}

/// How much of a payload the frame CRC covers: all of it, except for page
/// data, which carries a CRC per page (in the covered part) instead.
fn covered_len(kind: u8, payload: &[u8]) -> usize {
    if kind != Kind::Pages as u8 || payload.len() < PagesHead::LEN {
        return payload.len();
    }
    let count = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]) as usize;
    let crcs = if payload[12] == 0 {
        4 * count.min(MAX_PAGES_PER_FRAME as usize)
    } else {
        0
    };
    payload.len().min(PagesHead::LEN + crcs)
}

/// Writes a `Pages` frame of page data: the head, one CRC32 per page, and
/// the pages. The frame CRC covers the head and the page CRCs, so a page
/// the guest changes while it is being sent is caught by its own CRC on
/// the receiver, which then waits for the copy a later round must send
/// (the change made it dirty).
pub fn write_pages_frame(
    w: &mut impl Write,
    head: &PagesHead,
    crcs: &[u8],
    data: &[u8],
) -> Result<()> {
    let len = PagesHead::LEN + crcs.len() + data.len();
    if len > MAX_PAYLOAD {
        return Err(StreamError::TooLarge {
            kind: Kind::Pages as u8,
            len: len as u32,
        });
    }
    let len = len as u32;
    let h = head.encode();
    let mut c = crc32fast::Hasher::new();
    c.update(&[Kind::Pages as u8]);
    c.update(&len.to_le_bytes());
    c.update(&h);
    c.update(crcs);
    let mut fh = [0u8; 12];
    fh[0] = Kind::Pages as u8;
    fh[4..8].copy_from_slice(&len.to_le_bytes());
    fh[8..12].copy_from_slice(&c.finalize().to_le_bytes());
    w.write_all(&fh)?;
    w.write_all(&h)?;
    w.write_all(crcs)?;
    w.write_all(data)?;
    Ok(())
}

/// Writes the stream header.
pub fn write_header(w: &mut impl Write) -> Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&MAJOR.to_le_bytes())?;
    w.write_all(&MINOR.to_le_bytes())?;
    Ok(())
}

/// Reads and checks the stream header; returns the minor version.
pub fn read_header(r: &mut impl Read) -> Result<u16> {
    let mut b = [0u8; 12];
    r.read_exact(&mut b)?;
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&b[..8]);
    if magic != MAGIC {
        return Err(StreamError::BadMagic(magic));
    }
    let major = u16::from_le_bytes([b[8], b[9]]);
    let minor = u16::from_le_bytes([b[10], b[11]]);
    if major != MAJOR {
        return Err(StreamError::Version(major, minor));
    }
    Ok(minor)
}

/// Writes one frame whose payload is the concatenation of `parts`.
pub fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_PAYLOAD {
        return Err(StreamError::TooLarge {
            kind: kind as u8,
            len: len as u32,
        });
    }
    let len = len as u32;
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind as u8]);
    h.update(&len.to_le_bytes());
    for p in parts {
        h.update(p);
    }
    let mut head = [0u8; 12];
    head[0] = kind as u8;
    head[4..8].copy_from_slice(&len.to_le_bytes());
    head[8..12].copy_from_slice(&h.finalize().to_le_bytes());
    w.write_all(&head)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Reads one frame into `buf` (reused between calls) and returns its kind;
/// the payload is `buf[..]` afterwards.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head)?;
    let kind_byte = head[0];
    if head[1..4] != [0, 0, 0] {
        return Err(StreamError::Reserved);
    }
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let expected = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let kind = Kind::from_u8(kind_byte)?;
    if len as usize > MAX_PAYLOAD {
        return Err(StreamError::TooLarge {
            kind: kind_byte,
            len,
        });
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf)?;
    let found = frame_crc(kind_byte, len, buf);
    if found != expected {
        return Err(StreamError::Checksum {
            kind: kind_byte,
            found,
            expected,
        });
    }
    Ok(kind)
}

/// Bounds-checked little-endian reader over a frame payload.
#[derive(Debug)]
pub struct Reader<'a> {
    frame: &'static str,
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(frame: &'static str, data: &'a [u8]) -> Self {
        Reader { frame, data }
    }

    fn err(&self, what: impl Into<String>) -> StreamError {
        StreamError::Malformed {
            frame: self.frame,
            what: what.into(),
        }
    }

    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.data.len() < n {
            return Err(self.err(format!("{what}: needs {n} bytes, {} left", self.data.len())));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.bytes(1, what)?[0])
    }

    pub fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next tagged record, or `None` at the end.
    pub fn record(&mut self) -> Result<Option<(u16, &'a [u8])>> {
        if self.data.is_empty() {
            return Ok(None);
        }
        let tag = self.u16("record tag")?;
        let len = self.u32("record length")? as usize;
        let body = self.bytes(len, "record body")?;
        Ok(Some((tag, body)))
    }

    /// Checks that nothing is left over.
    pub fn finish(&self) -> Result<()> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} unexpected trailing bytes", self.data.len())))
        }
    }
}

fn put_record(out: &mut Vec<u8>, tag: u16, body: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn pod<T: FromBytes>(frame: &'static str, what: &str, bytes: &[u8]) -> Result<T> {
    T::read_from_bytes(bytes).map_err(|_| StreamError::Malformed {
        frame,
        what: format!(
            "{what}: {} bytes, expected {}",
            bytes.len(),
            std::mem::size_of::<T>()
        ),
    })
}

fn bytes_of<T: IntoBytes + Immutable>(t: &T) -> &[u8] {
    t.as_bytes()
}

/// First frame: what the receiver must create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// 1: the csv test guest.
    pub guest: u8,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(13);
        v.extend_from_slice(&self.mem_bytes.to_le_bytes());
        v.extend_from_slice(&self.vcpus.to_le_bytes());
        v.push(self.guest);
        v
    }

    pub fn decode(p: &[u8]) -> Result<Hello> {
        let mut r = Reader::new("Hello", p);
        let h = Hello {
            mem_bytes: r.u64("memory size")?,
            vcpus: r.u32("vCPU count")?,
            guest: r.u8("guest kind")?,
        };
        if h.mem_bytes == 0 || h.mem_bytes % PAGE != 0 || h.mem_bytes > (64 << 30) {
            return Err(r.err(format!(
                "memory size {} is not a page multiple up to 64 GiB",
                h.mem_bytes
            )));
        }
        if h.vcpus == 0 || h.vcpus > 64 {
            return Err(r.err(format!("{} vCPUs (1 to 64 supported)", h.vcpus)));
        }
        Ok(h)
    }
}

/// Header of a `Pages` frame: `count` pages from `gpa`, zero-filled when
/// `zero` (then no data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesHead {
    pub gpa: u64,
    pub count: u32,
    pub zero: bool,
}

impl PagesHead {
    pub const LEN: usize = 13;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12] = u8::from(self.zero);
        b
    }

    /// Parses the 13-byte head of a `Pages` payload against a memory of
    /// `mem_bytes`; returns it and the number of bytes that must follow
    /// (a CRC32 per page, then the pages; nothing for a zero run).
    pub fn decode_head(p: &[u8], mem_bytes: u64) -> Result<(PagesHead, usize)> {
        let mut r = Reader::new("Pages", p);
        let gpa = r.u64("guest address")?;
        let count = r.u32("page count")?;
        let zero = match r.u8("zero flag")? {
            0 => false,
            1 => true,
            other => return Err(r.err(format!("zero flag {other}"))),
        };
        if gpa % PAGE != 0 {
            return Err(r.err(format!("guest address {gpa:#x} is not page aligned")));
        }
        if count == 0 || count > MAX_PAGES_PER_FRAME {
            return Err(r.err(format!("{count} pages (1 to {MAX_PAGES_PER_FRAME})")));
        }
        if gpa
            .checked_add(u64::from(count) * PAGE)
            .is_none_or(|e| e > mem_bytes)
        {
            return Err(r.err(format!(
                "pages {gpa:#x}+{count} run past the end of memory ({mem_bytes:#x})"
            )));
        }
        let want = if zero {
            0
        } else {
            count as usize * (4 + PAGE as usize)
        };
        Ok((PagesHead { gpa, count, zero }, want))
    }

    /// Parses a whole `Pages` payload and checks every page's CRC; returns
    /// the head and the page data (empty for a zero run).
    pub fn decode(p: &[u8], mem_bytes: u64) -> Result<(PagesHead, &[u8])> {
        let (head, want) = Self::decode_head(p, mem_bytes)?;
        let rest = p.get(Self::LEN..).unwrap_or_default();
        if rest.len() != want {
            return Err(StreamError::Malformed {
                frame: "Pages",
                what: format!(
                    "{} bytes after the head for {} pages, expected {want}",
                    rest.len(),
                    head.count
                ),
            });
        }
        if head.zero {
            return Ok((head, rest));
        }
        let (crcs, data) = rest.split_at(4 * head.count as usize);
        if let Some(bad) = bad_pages(crcs, data).next() {
            return Err(StreamError::Malformed {
                frame: "Pages",
                what: format!(
                    "page {:#x} does not match its CRC",
                    head.gpa + bad as u64 * PAGE
                ),
            });
        }
        Ok((head, data))
    }
}

/// Indexes (within the frame) of the pages whose CRC does not match.
fn bad_pages<'a>(crcs: &'a [u8], data: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    crcs.chunks_exact(4)
        .zip(data.chunks_exact(PAGE as usize))
        .enumerate()
        .filter(|(_, (c, page))| {
            u32::from_le_bytes([c[0], c[1], c[2], c[3]]) != crc32fast::hash(page)
        })
        .map(|(i, _)| i)
}

/// Reads one frame like [`read_frame`], except that the pages of a `Pages`
/// frame go straight into `memory` (the receiver's guest memory, whose
/// length is the memory size) once its head and page CRCs are checked.
/// A page whose own CRC does not match (the sender's guest changed it
/// while it was sent) gets its bit set in `damaged` (one bit per page); a
/// page that arrives intact gets its bit cleared. A receiver must refuse a
/// stream that ends with any bit set.
pub fn read_frame_to_memory(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    memory: &mut [u8],
    damaged: &mut [u64],
) -> Result<Kind> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head)?;
    if head[0] != Kind::Pages as u8 {
        // Not page data: the ordinary path (re-using the header just read).
        return read_frame(&mut Chain(&head[..], r), buf);
    }
    if head[1..4] != [0, 0, 0] {
        return Err(StreamError::Reserved);
    }
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let expected = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if len as usize > MAX_PAYLOAD {
        return Err(StreamError::TooLarge { kind: head[0], len });
    }
    if (len as usize) < PagesHead::LEN {
        return Err(StreamError::Malformed {
            frame: "Pages",
            what: format!("{len} bytes, shorter than its head"),
        });
    }
    buf.clear();
    buf.resize(PagesHead::LEN, 0);
    r.read_exact(buf)?;
    let (ph, want) = PagesHead::decode_head(buf, memory.len() as u64)?;
    if len as usize != PagesHead::LEN + want {
        return Err(StreamError::Malformed {
            frame: "Pages",
            what: format!(
                "{len} bytes for {} pages, expected {}",
                ph.count,
                PagesHead::LEN + want
            ),
        });
    }
    let crc_len = if ph.zero { 0 } else { 4 * ph.count as usize };
    buf.resize(PagesHead::LEN + crc_len, 0);
    r.read_exact(&mut buf[PagesHead::LEN..])?;
    let found = frame_crc(head[0], len, buf);
    if found != expected {
        return Err(StreamError::Checksum {
            kind: head[0],
            found,
            expected,
        });
    }
    let first = (ph.gpa / PAGE) as usize;
    let at = ph.gpa as usize;
    let bytes = ph.count as usize * PAGE as usize;
    let dest = memory
        .get_mut(at..at + bytes)
        .ok_or_else(|| StreamError::Malformed {
            frame: "Pages",
            what: "pages outside memory".into(),
        })?;
    let mark = |damaged: &mut [u64], page: usize, bad: bool| {
        if let Some(w) = damaged.get_mut(page / 64) {
            if bad {
                *w |= 1 << (page % 64);
            } else {
                *w &= !(1 << (page % 64));
            }
        }
    };
    if ph.zero {
        dest.fill(0);
        for p in first..first + ph.count as usize {
            mark(damaged, p, false);
        }
        return Ok(Kind::Pages);
    }
    // Fault the destination in with one call rather than a trap per page
    // (the receiver's memory is fresh; this is most of the cost of a first
    // round). Best effort: on kernels without MADV_POPULATE_WRITE the read
    // faults the pages in as usual.
    // SAFETY: `dest` is a valid, writable range of the caller's mapping;
    // populating it changes no contents.
    unsafe {
        libc::madvise(
            dest.as_mut_ptr() as *mut libc::c_void,
            dest.len(),
            libc::MADV_POPULATE_WRITE,
        );
    }
    r.read_exact(dest)?;
    let crcs = &buf[PagesHead::LEN..];
    for (i, (c, page)) in crcs
        .chunks_exact(4)
        .zip(dest.chunks_exact(PAGE as usize))
        .enumerate()
    {
        let ok = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == crc32fast::hash(page);
        mark(damaged, first + i, !ok);
    }
    Ok(Kind::Pages)
}

/// `Read` over a prefix already read, then the rest of the stream.
struct Chain<'a, R: Read>(&'a [u8], &'a mut R);

impl<R: Read> Read for Chain<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if !self.0.is_empty() {
            let n = self.0.len().min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            return Ok(n);
        }
        self.1.read(out)
    }
}

/// Last frame of the source's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// CRC32 of all guest memory at the switch-over, when the sender computed it.
    pub memory_crc: Option<u32>,
}

impl End {
    pub fn encode(&self) -> Vec<u8> {
        match self.memory_crc {
            Some(c) => {
                let mut v = vec![1u8];
                v.extend_from_slice(&c.to_le_bytes());
                v
            }
            None => vec![0u8],
        }
    }

    pub fn decode(p: &[u8]) -> Result<End> {
        let mut r = Reader::new("End", p);
        let memory_crc = match r.u8("hash flag")? {
            0 => None,
            1 => Some(r.u32("memory CRC")?),
            other => return Err(r.err(format!("hash flag {other}"))),
        };
        r.finish()?;
        Ok(End { memory_crc })
    }
}

/// A short status message (`Ack`, `Resumed`, `Abort`): ok flag and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub ok: bool,
    pub memory_crc: Option<u32>,
    pub message: String,
}

impl Status {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![u8::from(self.ok)];
        v.extend_from_slice(
            &End {
                memory_crc: self.memory_crc,
            }
            .encode(),
        );
        let msg = self.message.as_bytes();
        let msg = &msg[..msg.len().min(4096)];
        v.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        v.extend_from_slice(msg);
        v
    }

    pub fn decode(p: &[u8]) -> Result<Status> {
        let mut r = Reader::new("Status", p);
        let ok = r.u8("ok flag")? == 1;
        let memory_crc = match r.u8("hash flag")? {
            0 => None,
            1 => Some(r.u32("memory CRC")?),
            other => return Err(r.err(format!("hash flag {other}"))),
        };
        let n = r.u32("message length")? as usize;
        if n > 4096 {
            return Err(r.err(format!("message of {n} bytes")));
        }
        let message = String::from_utf8_lossy(r.bytes(n, "message")?).into_owned();
        r.finish()?;
        Ok(Status {
            ok,
            memory_crc,
            message,
        })
    }
}

/// What a stream holds, from [`inspect`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Inspection {
    pub minor: u16,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub frames: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub vcpu_states: u32,
    pub memory_crc: Option<u32>,
}

/// Reads and checks a whole stream (a save file) without a VM: every
/// frame's checksum and payload, pages inside memory, one state per vCPU,
/// and an `End` frame last. What `csv-vmm inspect` and the fuzz target run.
pub fn inspect(r: &mut impl Read) -> Result<Inspection> {
    let mut out = Inspection {
        minor: read_header(r)?,
        ..Default::default()
    };
    let mut buf = Vec::new();
    let k = read_frame(r, &mut buf)?;
    if k != Kind::Hello {
        return Err(StreamError::Unexpected {
            got: k.name(),
            expected: "Hello",
        });
    }
    let hello = Hello::decode(&buf)?;
    out.mem_bytes = hello.mem_bytes;
    out.vcpus = hello.vcpus;
    out.frames = 1;
    let (mut devices, mut vm) = (false, false);
    loop {
        let k = read_frame(r, &mut buf)?;
        out.frames += 1;
        match k {
            Kind::Pages => {
                let (head, _) = PagesHead::decode(&buf, hello.mem_bytes)?;
                out.pages += u64::from(head.count);
                if head.zero {
                    out.zero_pages += u64::from(head.count);
                }
            }
            Kind::Round => {}
            Kind::Devices => {
                DeviceState::decode(&buf)?;
                devices = true;
            }
            Kind::VmState => {
                VmState::decode(&buf)?;
                vm = true;
            }
            Kind::VcpuState => {
                let v = VcpuState::decode(&buf)?;
                if v.id >= hello.vcpus {
                    return Err(StreamError::Malformed {
                        frame: "VcpuState",
                        what: format!("vCPU {} of a {}-vCPU VM", v.id, hello.vcpus),
                    });
                }
                out.vcpu_states += 1;
            }
            Kind::End => {
                out.memory_crc = End::decode(&buf)?.memory_crc;
                if !devices || !vm || out.vcpu_states != hello.vcpus {
                    return Err(StreamError::Malformed {
                        frame: "End",
                        what: format!(
                            "stream ends with devices={devices}, VM state={vm}, {} of {} vCPU states",
                            out.vcpu_states, hello.vcpus
                        ),
                    });
                }
                return Ok(out);
            }
            other => {
                return Err(StreamError::Unexpected {
                    got: other.name(),
                    expected: "state",
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
