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
    #[error("I/O on the state stream: {0}")]
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

/// The VM-wide KVM state.
#[derive(Debug, Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

const VM_PIC_MASTER: u16 = 1;
const VM_PIC_SLAVE: u16 = 2;
const VM_IOAPIC: u16 = 3;
const VM_PIT: u16 = 4;
const VM_CLOCK: u16 = 5;

impl VmState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put_record(&mut v, VM_PIC_MASTER, bytes_of(&self.pic_master));
        put_record(&mut v, VM_PIC_SLAVE, bytes_of(&self.pic_slave));
        put_record(&mut v, VM_IOAPIC, bytes_of(&self.ioapic));
        put_record(&mut v, VM_PIT, bytes_of(&self.pit));
        put_record(&mut v, VM_CLOCK, bytes_of(&self.clock));
        v
    }

    pub fn decode(p: &[u8]) -> Result<VmState> {
        const F: &str = "VmState";
        let mut r = Reader::new(F, p);
        let (mut pm, mut ps, mut io, mut pit, mut clock) = (None, None, None, None, None);
        while let Some((tag, body)) = r.record()? {
            match tag {
                VM_PIC_MASTER => pm = Some(pod(F, "PIC master", body)?),
                VM_PIC_SLAVE => ps = Some(pod(F, "PIC slave", body)?),
                VM_IOAPIC => io = Some(pod(F, "IOAPIC", body)?),
                VM_PIT => pit = Some(pod(F, "PIT", body)?),
                VM_CLOCK => clock = Some(pod(F, "KVM clock", body)?),
                _ => {}
            }
        }
        let missing = |what: &str| StreamError::Malformed {
            frame: F,
            what: format!("no {what} record"),
        };
        Ok(VmState {
            pic_master: pm.ok_or_else(|| missing("PIC master"))?,
            pic_slave: ps.ok_or_else(|| missing("PIC slave"))?,
            ioapic: io.ok_or_else(|| missing("IOAPIC"))?,
            pit: pit.ok_or_else(|| missing("PIT"))?,
            clock: clock.ok_or_else(|| missing("KVM clock"))?,
        })
    }
}

/// One vCPU's KVM state, in the order it is restored.
#[derive(Debug)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Box<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

const CPU_CPUID: u16 = 1;
const CPU_TSC_KHZ: u16 = 2;
const CPU_MP_STATE: u16 = 3;
const CPU_REGS: u16 = 4;
const CPU_SREGS: u16 = 5;
const CPU_XSAVE: u16 = 6;
const CPU_XCRS: u16 = 7;
const CPU_DEBUGREGS: u16 = 8;
const CPU_LAPIC: u16 = 9;
const CPU_MSRS: u16 = 10;
const CPU_EVENTS: u16 = 11;

/// Most CPUID entries and MSRs accepted in a state record.
const MAX_ENTRIES: usize = 4096;

impl VcpuState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8192);
        v.extend_from_slice(&self.id.to_le_bytes());
        let mut cpuid = Vec::with_capacity(self.cpuid.len() * 40);
        for e in &self.cpuid {
            cpuid.extend_from_slice(bytes_of(e));
        }
        put_record(&mut v, CPU_CPUID, &cpuid);
        put_record(&mut v, CPU_TSC_KHZ, &self.tsc_khz.to_le_bytes());
        put_record(&mut v, CPU_MP_STATE, bytes_of(&self.mp_state));
        put_record(&mut v, CPU_REGS, bytes_of(&self.regs));
        put_record(&mut v, CPU_SREGS, bytes_of(&self.sregs));
        put_record(&mut v, CPU_XSAVE, bytes_of(&*self.xsave));
        put_record(&mut v, CPU_XCRS, bytes_of(&self.xcrs));
        put_record(&mut v, CPU_DEBUGREGS, bytes_of(&self.debugregs));
        put_record(&mut v, CPU_LAPIC, bytes_of(&self.lapic));
        let mut msrs = Vec::with_capacity(self.msrs.len() * 12);
        for (i, d) in &self.msrs {
            msrs.extend_from_slice(&i.to_le_bytes());
            msrs.extend_from_slice(&d.to_le_bytes());
        }
        put_record(&mut v, CPU_MSRS, &msrs);
        put_record(&mut v, CPU_EVENTS, bytes_of(&self.events));
        v
    }

    pub fn decode(p: &[u8]) -> Result<VcpuState> {
        const F: &str = "VcpuState";
        let mut r = Reader::new(F, p);
        let id = r.u32("vCPU id")?;
        let mut cpuid = None;
        let mut tsc_khz = None;
        let mut mp = None;
        let mut regs = None;
        let mut sregs = None;
        let mut xsave: Option<Box<kvm_xsave>> = None;
        let mut xcrs = None;
        let mut dregs = None;
        let mut lapic = None;
        let mut msrs = None;
        let mut events = None;
        while let Some((tag, body)) = r.record()? {
            match tag {
                CPU_CPUID => {
                    let sz = std::mem::size_of::<kvm_cpuid_entry2>();
                    if body.len() % sz != 0 || body.len() / sz > MAX_ENTRIES {
                        return Err(r.err(format!("CPUID record of {} bytes", body.len())));
                    }
                    let mut v = Vec::with_capacity(body.len() / sz);
                    for c in body.chunks_exact(sz) {
                        v.push(pod(F, "CPUID entry", c)?);
                    }
                    cpuid = Some(v);
                }
                CPU_TSC_KHZ => tsc_khz = Some(pod::<u32>(F, "TSC kHz", body)?),
                CPU_MP_STATE => mp = Some(pod(F, "MP state", body)?),
                CPU_REGS => regs = Some(pod(F, "registers", body)?),
                CPU_SREGS => sregs = Some(pod(F, "special registers", body)?),
                CPU_XSAVE => xsave = Some(Box::new(pod(F, "XSAVE area", body)?)),
                CPU_XCRS => xcrs = Some(pod(F, "XCRs", body)?),
                CPU_DEBUGREGS => dregs = Some(pod(F, "debug registers", body)?),
                CPU_LAPIC => lapic = Some(pod(F, "local APIC", body)?),
                CPU_MSRS => {
                    if body.len() % 12 != 0 || body.len() / 12 > MAX_ENTRIES {
                        return Err(r.err(format!("MSR record of {} bytes", body.len())));
                    }
                    let v = body
                        .chunks_exact(12)
                        .map(|c| {
                            let mut i = [0u8; 4];
                            let mut d = [0u8; 8];
                            i.copy_from_slice(&c[..4]);
                            d.copy_from_slice(&c[4..]);
                            (u32::from_le_bytes(i), u64::from_le_bytes(d))
                        })
                        .collect();
                    msrs = Some(v);
                }
                CPU_EVENTS => events = Some(pod(F, "vCPU events", body)?),
                _ => {}
            }
        }
        let missing = |what: &str| StreamError::Malformed {
            frame: F,
            what: format!("vCPU {id}: no {what} record"),
        };
        Ok(VcpuState {
            id,
            cpuid: cpuid.ok_or_else(|| missing("CPUID"))?,
            tsc_khz: tsc_khz.ok_or_else(|| missing("TSC frequency"))?,
            mp_state: mp.ok_or_else(|| missing("MP state"))?,
            regs: regs.ok_or_else(|| missing("registers"))?,
            sregs: sregs.ok_or_else(|| missing("special registers"))?,
            xsave: xsave.ok_or_else(|| missing("XSAVE"))?,
            xcrs: xcrs.ok_or_else(|| missing("XCRs"))?,
            debugregs: dregs.ok_or_else(|| missing("debug registers"))?,
            lapic: lapic.ok_or_else(|| missing("local APIC"))?,
            msrs: msrs.ok_or_else(|| missing("MSRs"))?,
            events: events.ok_or_else(|| missing("vCPU events"))?,
        })
    }
}

/// The VMM's own device state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// 16550 registers: divisor low/high, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub serial_regs: [u8; 9],
    /// Bytes waiting in the serial receive FIFO.
    pub serial_in: Vec<u8>,
    /// Last heartbeat sequence number seen (full 64 bits).
    pub heartbeat_seq: u64,
    /// Heartbeats seen since the guest booted (across hosts).
    pub heartbeats: u64,
    /// Gaps seen in the heartbeat sequence.
    pub heartbeat_gaps: u64,
    /// Page-check failures the guest reported.
    pub guest_errors: u64,
    /// The virtio-blk device, when the VM has a disk.
    pub blk: Option<crate::virtio_blk::BlkState>,
}

const DEV_SERIAL: u16 = 1;
const DEV_HEARTBEAT: u16 = 2;
const DEV_VIRTIO_BLK: u16 = 3;

impl DeviceState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let mut s = self.serial_regs.to_vec();
        s.extend_from_slice(&self.serial_in);
        put_record(&mut v, DEV_SERIAL, &s);
        let mut h = Vec::with_capacity(32);
        for x in [
            self.heartbeat_seq,
            self.heartbeats,
            self.heartbeat_gaps,
            self.guest_errors,
        ] {
            h.extend_from_slice(&x.to_le_bytes());
        }
        put_record(&mut v, DEV_HEARTBEAT, &h);
        if let Some(b) = &self.blk {
            put_record(&mut v, DEV_VIRTIO_BLK, &b.encode());
        }
        v
    }

    pub fn decode(p: &[u8]) -> Result<DeviceState> {
        const F: &str = "Devices";
        let mut r = Reader::new(F, p);
        let mut d = DeviceState::default();
        let (mut serial, mut hb) = (false, false);
        while let Some((tag, body)) = r.record()? {
            match tag {
                DEV_SERIAL => {
                    if body.len() < 9 || body.len() > 9 + 4096 {
                        return Err(r.err(format!("serial record of {} bytes", body.len())));
                    }
                    d.serial_regs.copy_from_slice(&body[..9]);
                    d.serial_in = body[9..].to_vec();
                    serial = true;
                }
                DEV_HEARTBEAT => {
                    let mut hr = Reader::new(F, body);
                    d.heartbeat_seq = hr.u64("heartbeat sequence")?;
                    d.heartbeats = hr.u64("heartbeat count")?;
                    d.heartbeat_gaps = hr.u64("heartbeat gaps")?;
                    d.guest_errors = hr.u64("guest errors")?;
                    hr.finish()?;
                    hb = true;
                }
                DEV_VIRTIO_BLK => {
                    let mut br = Reader::new(F, body);
                    let b = crate::virtio_blk::BlkState::decode(&mut br)?;
                    br.finish()?;
                    d.blk = Some(b);
                }
                _ => {}
            }
        }
        if !serial || !hb {
            return Err(r.err("missing serial or heartbeat record"));
        }
        Ok(d)
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn from_seed<T: FromBytes>(seed: &[u8]) -> T {
        let mut b = vec![0u8; std::mem::size_of::<T>()];
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed[i % seed.len()].wrapping_add(i as u8);
        }
        T::read_from_bytes(&b).unwrap()
    }

    fn vcpu(seed: &[u8], id: u32, msrs: usize) -> VcpuState {
        VcpuState {
            id,
            cpuid: (0..3).map(|_| from_seed(seed)).collect(),
            tsc_khz: 2_600_000,
            mp_state: from_seed(seed),
            regs: from_seed(seed),
            sregs: from_seed(seed),
            xsave: Box::new(from_seed(seed)),
            xcrs: from_seed(seed),
            debugregs: from_seed(seed),
            lapic: from_seed(seed),
            msrs: (0..msrs).map(|i| (i as u32, i as u64 * 7)).collect(),
            events: from_seed(seed),
        }
    }

    #[test]
    fn frames_round_trip_and_detect_corruption() {
        let mut s = Vec::new();
        write_header(&mut s).unwrap();
        let hello = Hello {
            mem_bytes: 64 << 20,
            vcpus: 2,
            guest: 1,
        };
        write_frame(&mut s, Kind::Hello, &[&hello.encode()]).unwrap();
        let page = vec![7u8; 4096];
        let head = PagesHead {
            gpa: 0x5000,
            count: 1,
            zero: false,
        };
        write_pages_frame(&mut s, &head, &crc32fast::hash(&page).to_le_bytes(), &page).unwrap();
        let mut r = &s[..];
        read_header(&mut r).unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Hello);
        assert_eq!(Hello::decode(&buf).unwrap(), hello);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Pages);
        let (h, d) = PagesHead::decode(&buf, 64 << 20).unwrap();
        assert_eq!((h, d), (head, &page[..]));
        // Flip one byte anywhere after the header: never accepted silently.
        for at in 12..s.len() {
            let mut bad = s.clone();
            bad[at] ^= 0x40;
            let mut r = &bad[..];
            read_header(&mut r).unwrap();
            let ok = (|| -> Result<()> {
                let k = read_frame(&mut r, &mut buf)?;
                if k == Kind::Hello {
                    Hello::decode(&buf)?;
                }
                let k = read_frame(&mut r, &mut buf)?;
                if k == Kind::Pages {
                    PagesHead::decode(&buf, 64 << 20)?;
                }
                Ok(())
            })();
            assert!(ok.is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn header_refuses_other_majors_and_magics() {
        let mut s = Vec::new();
        write_header(&mut s).unwrap();
        s[8] = 2;
        assert!(matches!(
            read_header(&mut &s[..]),
            Err(StreamError::Version(2, 0))
        ));
        s[0] = b'X';
        assert!(matches!(
            read_header(&mut &s[..]),
            Err(StreamError::BadMagic(_))
        ));
    }

    #[test]
    fn pages_outside_memory_are_refused() {
        let head = PagesHead {
            gpa: (64 << 20) - 4096,
            count: 2,
            zero: true,
        };
        assert!(PagesHead::decode(&head.encode(), 64 << 20).is_err());
        let head = PagesHead {
            gpa: u64::MAX - 4095,
            count: 1,
            zero: true,
        };
        assert!(PagesHead::decode(&head.encode(), u64::MAX).is_err());
        let head = PagesHead {
            gpa: 4096,
            count: 1,
            zero: true,
        };
        assert!(PagesHead::decode(&head.encode(), 64 << 20).is_ok());
    }

    #[test]
    fn vcpu_and_vm_state_round_trip() {
        let v = vcpu(b"state", 3, 40);
        let back = VcpuState::decode(&v.encode()).unwrap();
        assert_eq!(back.encode(), v.encode());
        assert_eq!(back.msrs, v.msrs);
        let vm = VmState {
            pic_master: from_seed(b"a"),
            pic_slave: from_seed(b"b"),
            ioapic: from_seed(b"c"),
            pit: from_seed(b"d"),
            clock: from_seed(b"e"),
        };
        assert_eq!(VmState::decode(&vm.encode()).unwrap().encode(), vm.encode());
        let d = DeviceState {
            serial_regs: [1, 2, 3, 4, 5, 6, 7, 8, 9],
            serial_in: b"ls\n".to_vec(),
            heartbeat_seq: 1234,
            heartbeats: 1000,
            heartbeat_gaps: 0,
            guest_errors: 0,
            blk: None,
        };
        assert_eq!(DeviceState::decode(&d.encode()).unwrap(), d);
        let with_disk = DeviceState {
            blk: Some(crate::virtio_blk::BlkState {
                capacity: 64 << 20,
                status: 15,
                driver_features: 1 << 32,
                queue: virtio_queue::QueueState {
                    max_size: 64,
                    size: 8,
                    ready: true,
                    next_avail: 7,
                    next_used: 7,
                    desc_table: 0x60000,
                    avail_ring: 0x60100,
                    used_ring: 0x61000,
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..d.clone()
        };
        assert_eq!(DeviceState::decode(&with_disk.encode()).unwrap(), with_disk);
        // A record of the wrong size is named in the error.
        let mut enc = v.encode();
        let regs_at = enc
            .windows(2)
            .position(|w| w == CPU_REGS.to_le_bytes())
            .unwrap();
        let _ = regs_at;
        enc.truncate(enc.len() - 1);
        let err = VcpuState::decode(&enc).unwrap_err().to_string();
        assert!(err.contains("VcpuState"), "{err}");
    }

    #[test]
    fn a_page_changed_in_flight_is_damaged_until_sent_again() {
        let mem_bytes = 16 * 4096;
        let mut memory = vec![0u8; mem_bytes];
        let mut damaged = vec![0u64; 1];
        let mut buf = Vec::new();
        let head = PagesHead {
            gpa: 2 * 4096,
            count: 2,
            zero: false,
        };
        let pages = vec![0x11u8; 8192];
        let mut crcs = Vec::new();
        crcs.extend_from_slice(&crc32fast::hash(&pages[..4096]).to_le_bytes());
        crcs.extend_from_slice(&crc32fast::hash(&pages[4096..]).to_le_bytes());
        // The second page changed after its CRC was taken.
        let mut sent = pages.clone();
        sent[5000] = 0x22;
        let mut s = Vec::new();
        write_pages_frame(&mut s, &head, &crcs, &sent).unwrap();
        let k = read_frame_to_memory(&mut &s[..], &mut buf, &mut memory, &mut damaged).unwrap();
        assert_eq!(k, Kind::Pages);
        assert_eq!(damaged[0], 1 << 3, "page 3 is damaged, page 2 is not");
        // The general decoder refuses the same frame outright.
        let mut r = &s[..];
        read_frame(&mut r, &mut buf).unwrap();
        assert!(PagesHead::decode(&buf, mem_bytes as u64).is_err());
        // The copy of the next round repairs it.
        let again = PagesHead {
            gpa: 3 * 4096,
            count: 1,
            zero: false,
        };
        let mut s = Vec::new();
        write_pages_frame(
            &mut s,
            &again,
            &crc32fast::hash(&pages[4096..]).to_le_bytes(),
            &pages[4096..],
        )
        .unwrap();
        read_frame_to_memory(&mut &s[..], &mut buf, &mut memory, &mut damaged).unwrap();
        assert_eq!(damaged[0], 0);
        assert_eq!(&memory[2 * 4096..4 * 4096], &pages[..]);
        // A damaged head or CRC list is a frame checksum error, before any
        // page is written.
        let mut s = Vec::new();
        write_pages_frame(&mut s, &again, &[0, 0, 0, 0], &pages[4096..]).unwrap();
        s[12 + PagesHead::LEN] ^= 1;
        let mut fresh = vec![0u8; mem_bytes];
        assert!(read_frame_to_memory(&mut &s[..], &mut buf, &mut fresh, &mut damaged).is_err());
        assert!(fresh.iter().all(|&b| b == 0));
    }

    fn synthetic_stream() -> Vec<u8> {
        let mut s = Vec::new();
        write_header(&mut s).unwrap();
        let mem = 8 << 20;
        write_frame(
            &mut s,
            Kind::Hello,
            &[&Hello {
                mem_bytes: mem,
                vcpus: 1,
                guest: 1,
            }
            .encode()],
        )
        .unwrap();
        let zero = PagesHead {
            gpa: 0,
            count: 16,
            zero: true,
        };
        write_frame(&mut s, Kind::Pages, &[&zero.encode()]).unwrap();
        let one = PagesHead {
            gpa: 0x5000,
            count: 1,
            zero: false,
        };
        write_pages_frame(
            &mut s,
            &one,
            &crc32fast::hash(&[0x5a; 4096]).to_le_bytes(),
            &[0x5a; 4096],
        )
        .unwrap();
        write_frame(&mut s, Kind::Round, &[&1u32.to_le_bytes()]).unwrap();
        write_frame(&mut s, Kind::Devices, &[&DeviceState::default().encode()]).unwrap();
        let vm = VmState {
            pic_master: from_seed(b"a"),
            pic_slave: from_seed(b"b"),
            ioapic: from_seed(b"c"),
            pit: from_seed(b"d"),
            clock: from_seed(b"e"),
        };
        write_frame(&mut s, Kind::VmState, &[&vm.encode()]).unwrap();
        write_frame(&mut s, Kind::VcpuState, &[&vcpu(b"cpu", 0, 8).encode()]).unwrap();
        write_frame(
            &mut s,
            Kind::End,
            &[&End {
                memory_crc: Some(7),
            }
            .encode()],
        )
        .unwrap();
        s
    }

    /// The fuzz target's seed is a complete stream that `inspect` accepts
    /// (`CSV_REGEN_FUZZ_SEED=1` rewrites it after a format change).
    #[test]
    fn fuzz_seed_is_a_valid_stream() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/stream/full-stream");
        if std::env::var_os("CSV_REGEN_FUZZ_SEED").is_some() {
            std::fs::write(path, synthetic_stream()).unwrap();
        }
        let seed = std::fs::read(path).unwrap();
        let i = inspect(&mut &seed[..]).unwrap();
        assert_eq!(
            (i.pages, i.zero_pages, i.vcpu_states, i.memory_crc),
            (17, 16, 1, Some(7))
        );
        // Cut anywhere: an error, never a panic or a success.
        for cut in 0..seed.len() {
            assert!(inspect(&mut &seed[..cut]).is_err(), "cut at {cut} accepted");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Hello::decode(&data);
            let _ = PagesHead::decode(&data, 1 << 30);
            let _ = VmState::decode(&data);
            let _ = VcpuState::decode(&data);
            let _ = DeviceState::decode(&data);
            let _ = End::decode(&data);
            let _ = Status::decode(&data);
            let mut buf = Vec::new();
            let mut r = &data[..];
            if read_header(&mut r).is_ok() {
                while read_frame(&mut r, &mut buf).is_ok() {}
            }
            let mut r = &data[..];
            let _ = read_frame(&mut r, &mut buf);
            let _ = inspect(&mut &data[..]);
        }

        #[test]
        fn vcpu_state_round_trips(seed in proptest::collection::vec(any::<u8>(), 1..64), id in 0u32..64, msrs in 0usize..100) {
            let v = vcpu(&seed, id, msrs);
            let back = VcpuState::decode(&v.encode()).unwrap();
            prop_assert_eq!(back.encode(), v.encode());
        }

        #[test]
        fn truncated_state_is_an_error(seed in proptest::collection::vec(any::<u8>(), 1..16), cut in 1usize..9000) {
            let enc = vcpu(&seed, 0, 10).encode();
            let cut = cut.min(enc.len());
            prop_assert!(VcpuState::decode(&enc[..enc.len() - cut]).is_err());
        }

        #[test]
        fn status_round_trips(ok: bool, crc: Option<u32>, msg in ".{0,200}") {
            let s = Status { ok, memory_crc: crc, message: msg };
            prop_assert_eq!(Status::decode(&s.encode()).unwrap(), s);
        }
    }
}
