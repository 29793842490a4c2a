//! iSCSI PDUs on the wire (RFC 7143 §11): the 48-byte basic header
//! segment (BHS), additional header segments, the data segment padded to 4
//! bytes, and the optional CRC32C header and data digests.
//!
//! ```text
//! +-----------------+---------+----------+------------------+----------+
//! | BHS (48 bytes)  | AHS     | [HDigest]| data (pad to 4)  | [DDigest]|
//! +-----------------+---------+----------+------------------+----------+
//!   byte 0: I bit (0x40) | opcode (6 bits)
//!   byte 1: F bit (0x80) | opcode-specific flags
//!   byte 4: TotalAHSLength (4-byte words), bytes 5..8: DataSegmentLength
//!   bytes 8..16: LUN or opcode-specific, bytes 16..20: Initiator Task Tag
//! ```
//!
//! This module only frames and checks; what the fields mean to a session
//! is in `session` and `login`. Parsing never panics on hostile input: a
//! length beyond the negotiated limit or a wrong digest is an error.

/// Size of the basic header segment.
pub const BHS_LEN: usize = 48;
/// The reserved "no task" tag.
pub const NO_TAG: u32 = 0xffff_ffff;

/// Opcodes (initiator and target).
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// Task Management Function Request.
    pub const TASK_MGMT: u8 = 0x02;
    /// Login Request.
    pub const LOGIN: u8 = 0x03;
    /// Text Request.
    pub const TEXT: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT: u8 = 0x06;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESP: u8 = 0x21;
    /// Task Management Function Response.
    pub const TASK_MGMT_RESP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Why bytes from a target were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The header digest does not match.
    #[error("header digest {got:#010x}, computed {want:#010x}")]
    HeaderDigest {
        /// Received.
        got: u32,
        /// Computed.
        want: u32,
    },
    /// The data digest does not match.
    #[error("data digest {got:#010x}, computed {want:#010x}")]
    DataDigest {
        /// Received.
        got: u32,
        /// Computed.
        want: u32,
    },
    /// A data segment longer than we accept.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// Our MaxRecvDataSegmentLength.
        max: usize,
    },
    /// Fewer bytes than the PDU announces.
    #[error("truncated PDU: {need} bytes needed, {have} present")]
    Truncated {
        /// Bytes the PDU needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

/// Digest settings of a connection (both off during login).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C over BHS and AHS.
    pub header: bool,
    /// CRC32C over the padded data segment.
    pub data: bool,
}

/// One PDU: header, additional header segments, data.
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The basic header segment.
    pub bhs: [u8; BHS_LEN],
    /// Additional header segments (a multiple of 4 bytes).
    pub ahs: Vec<u8>,
    /// The data segment (unpadded).
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pdu(op={:#04x}, itt={:#010x}, data={}B)",
            self.opcode(),
            self.itt(),
            self.data.len()
        )
    }
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl Pdu {
    /// A PDU with opcode `op` (and the immediate bit when `immediate`).
    pub fn new(op: u8, immediate: bool) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = (op & 0x3f) | if immediate { 0x40 } else { 0 };
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// Byte 1 (the F bit and opcode-specific flags).
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    /// Sets byte 1.
    pub fn set_flags(&mut self, f: u8) {
        self.bhs[1] = f;
    }

    /// A big-endian u32 field at `off` (a multiple of 4 within the BHS).
    pub fn u32_at(&self, off: usize) -> u32 {
        be32(&self.bhs, off)
    }

    /// Sets a big-endian u32 field.
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bhs[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// Sets the Initiator Task Tag.
    pub fn set_itt(&mut self, itt: u32) {
        self.set_u32(16, itt);
    }

    /// The LUN field, raw.
    pub fn lun_field(&self) -> [u8; 8] {
        let mut l = [0u8; 8];
        l.copy_from_slice(&self.bhs[8..16]);
        l
    }

    /// Sets the LUN field from a LUN number (SAM single-level addressing:
    /// peripheral below 256, flat up to 16383).
    pub fn set_lun(&mut self, lun: u16) {
        self.bhs[8..16].copy_from_slice(&encode_lun(lun));
    }

    /// DataSegmentLength as the header states it.
    pub fn data_len_field(&self) -> usize {
        (usize::from(self.bhs[5]) << 16)
            | (usize::from(self.bhs[6]) << 8)
            | usize::from(self.bhs[7])
    }

    /// Encodes the PDU for the wire with the given digests.
    pub fn encode(&self, d: Digests) -> Vec<u8> {
        let mut bhs = self.bhs;
        let ahs_words = self.ahs.len().div_ceil(4);
        bhs[4] = ahs_words.min(255) as u8;
        let dl = self.data.len().min(0xff_ffff);
        bhs[5] = (dl >> 16) as u8;
        bhs[6] = (dl >> 8) as u8;
        bhs[7] = dl as u8;
        let pad = (4 - dl % 4) % 4;
        let mut out = Vec::with_capacity(BHS_LEN + self.ahs.len() + 8 + dl + pad);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&self.ahs);
        out.resize(BHS_LEN + ahs_words * 4, 0);
        if d.header {
            let c = crc32c::crc32c(&out);
            out.extend_from_slice(&c.to_le_bytes());
        }
        if dl > 0 {
            let start = out.len();
            out.extend_from_slice(&self.data[..dl]);
            out.resize(start + dl + pad, 0);
            if d.data {
                let c = crc32c::crc32c(&out[start..]);
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        out
    }

    /// Total wire length of a PDU whose BHS is `bhs`: (bytes after the BHS
    /// up to the data segment, data segment length with padding and
    /// digest). Fails when the data segment is longer than `max_data`.
    pub fn lengths(
        bhs: &[u8; BHS_LEN],
        d: Digests,
        max_data: usize,
    ) -> Result<(usize, usize), PduError> {
        let ahs = usize::from(bhs[4]) * 4;
        let dl = (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]);
        if dl > max_data {
            return Err(PduError::TooLong {
                len: dl,
                max: max_data,
            });
        }
        let head_rest = ahs + if d.header { 4 } else { 0 };
        let data = if dl == 0 {
            0
        } else {
            dl.next_multiple_of(4) + if d.data { 4 } else { 0 }
        };
        Ok((head_rest, data))
    }

    /// Builds a PDU from its BHS, the bytes that follow it up to the data
    /// (AHS and header digest) and the data bytes (padded, with digest),
    /// checking the digests.
    pub fn assemble(
        bhs: [u8; BHS_LEN],
        head_rest: &[u8],
        data: &[u8],
        d: Digests,
    ) -> Result<Pdu, PduError> {
        Pdu::assemble_owned(bhs, head_rest, data.to_vec(), d)
    }

    /// [`Pdu::assemble`] taking the data buffer, which becomes the PDU's
    /// data segment without a copy.
    pub fn assemble_owned(
        bhs: [u8; BHS_LEN],
        head_rest: &[u8],
        mut data: Vec<u8>,
        d: Digests,
    ) -> Result<Pdu, PduError> {
        let ahs_len = usize::from(bhs[4]) * 4;
        if head_rest.len() < ahs_len + if d.header { 4 } else { 0 } {
            return Err(PduError::Truncated {
                need: ahs_len + 4,
                have: head_rest.len(),
            });
        }
        let ahs = head_rest[..ahs_len].to_vec();
        if d.header {
            let got = u32::from_le_bytes([
                head_rest[ahs_len],
                head_rest[ahs_len + 1],
                head_rest[ahs_len + 2],
                head_rest[ahs_len + 3],
            ]);
            let mut h = crc32c::crc32c(&bhs);
            h = crc32c::crc32c_append(h, &ahs);
            if got != h {
                return Err(PduError::HeaderDigest { got, want: h });
            }
        }
        let dl = (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]);
        let padded = dl.next_multiple_of(4);
        let need = if dl == 0 {
            0
        } else {
            padded + if d.data { 4 } else { 0 }
        };
        if data.len() < need {
            return Err(PduError::Truncated {
                need,
                have: data.len(),
            });
        }
        if dl > 0 && d.data {
            let got = u32::from_le_bytes([
                data[padded],
                data[padded + 1],
                data[padded + 2],
                data[padded + 3],
            ]);
            let want = crc32c::crc32c(&data[..padded]);
            if got != want {
                return Err(PduError::DataDigest { got, want });
            }
        }
        data.truncate(dl);
        Ok(Pdu { bhs, ahs, data })
    }

    /// Decodes one PDU from the front of `buf`; returns it and the number
    /// of bytes it took.
    pub fn decode(buf: &[u8], d: Digests, max_data: usize) -> Result<(Pdu, usize), PduError> {
        if buf.len() < BHS_LEN {
            return Err(PduError::Truncated {
                need: BHS_LEN,
                have: buf.len(),
            });
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&buf[..BHS_LEN]);
        let (head_rest, data) = Pdu::lengths(&bhs, d, max_data)?;
        let total = BHS_LEN + head_rest + data;
        if buf.len() < total {
            return Err(PduError::Truncated {
                need: total,
                have: buf.len(),
            });
        }
        let p = Pdu::assemble(
            bhs,
            &buf[BHS_LEN..BHS_LEN + head_rest],
            &buf[BHS_LEN + head_rest..total],
            d,
        )?;
        Ok((p, total))
    }
}

/// The 8-byte LUN field for a LUN number.
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut l = [0u8; 8];
    if lun < 256 {
        l[1] = lun as u8;
    } else {
        l[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        l[1] = lun as u8;
    }
    l
}

/// The LUN number of an 8-byte LUN field (single-level peripheral or flat
/// addressing), or `None` for other forms.
pub fn decode_lun(l: &[u8; 8]) -> Option<u16> {
    match l[0] >> 6 {
        0 => Some(u16::from(l[1])),
        1 => Some((u16::from(l[0] & 0x3f) << 8) | u16::from(l[1])),
        _ => None,
    }
}

/// Serial number arithmetic (RFC 1982, 32 bits): whether `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// Serial number arithmetic: whether `a <= b`.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Login Response as tgtd sends it, field by field.
    fn login_response() -> Vec<u8> {
        let mut b = vec![0u8; 48];
        b[0] = 0x23; // Login Response
        b[1] = 0x87; // T=1, CSG=1 (operational), NSG=3 (full feature)
        b[2] = 0x00; // Version-max
        b[3] = 0x00; // Version-active
        b[7] = 8; // DataSegmentLength = 8
        b[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]); // ISID
        b[14..16].copy_from_slice(&[0x00, 0x05]); // TSIH
        b[16..20].copy_from_slice(&[0, 0, 0, 1]); // ITT
        b[24..28].copy_from_slice(&[0, 0, 0, 7]); // StatSN
        b[28..32].copy_from_slice(&[0, 0, 0, 1]); // ExpCmdSN
        b[32..36].copy_from_slice(&[0, 0, 0, 9]); // MaxCmdSN
        b.extend_from_slice(b"A=B\0C=D\0"); // data: two keys, already 4-aligned
        b
    }

    #[test]
    fn decodes_a_login_response() {
        let (p, n) = Pdu::decode(&login_response(), Digests::default(), 8192).unwrap();
        assert_eq!(n, 56);
        assert_eq!(p.opcode(), op::LOGIN_RESP);
        assert_eq!(p.itt(), 1);
        assert_eq!(p.u32_at(24), 7);
        assert_eq!(p.data, b"A=B\0C=D\0");
    }

    #[test]
    fn digests_are_checked() {
        let mut p = Pdu::new(op::SCSI_CMD, false);
        p.set_itt(5);
        p.data = b"hello".to_vec();
        let d = Digests {
            header: true,
            data: true,
        };
        let mut wire = p.encode(d);
        assert_eq!(wire.len(), 48 + 4 + 8 + 4);
        let q = Pdu::decode(&wire, d, 1024).unwrap().0;
        assert_eq!((q.itt(), q.data.as_slice()), (5, b"hello".as_slice()));
        wire[20] ^= 1;
        assert!(matches!(
            Pdu::decode(&wire, d, 1024),
            Err(PduError::HeaderDigest { .. })
        ));
        wire[20] ^= 1;
        wire[53] ^= 1;
        assert!(matches!(
            Pdu::decode(&wire, d, 1024),
            Err(PduError::DataDigest { .. })
        ));
    }

    #[test]
    fn crc32c_matches_rfc3720_vector() {
        // RFC 3720 B.4: 32 bytes of zeros -> 0x8a9136aa.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn oversize_data_is_refused() {
        let mut b = [0u8; 48];
        b[5] = 0x10; // 1 MiB
        assert!(matches!(
            Pdu::lengths(&b, Digests::default(), 65536),
            Err(PduError::TooLong { .. })
        ));
    }

    #[test]
    fn luns_and_serial_numbers() {
        assert_eq!(decode_lun(&encode_lun(3)), Some(3));
        assert_eq!(decode_lun(&encode_lun(1000)), Some(1000));
        assert!(sn_lt(0xffff_fff0, 5));
        assert!(!sn_lt(5, 0xffff_fff0));
        assert!(sn_le(7, 7));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(op in 0u8..64, itt: u32, data in prop::collection::vec(any::<u8>(), 0..3000), h: bool, dd: bool) {
            let mut p = Pdu::new(op, false);
            p.set_itt(itt);
            p.data = data;
            let d = Digests { header: h, data: dd };
            let wire = p.encode(d);
            let (q, n) = Pdu::decode(&wire, d, 1 << 24).unwrap();
            prop_assert_eq!(n, wire.len());
            prop_assert_eq!(q.encode(d), wire);
            prop_assert_eq!((q.opcode(), q.itt(), &q.data), (op, itt, &p.data));
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..600), h: bool, dd: bool) {
            let _ = Pdu::decode(&buf, Digests { header: h, data: dd }, 512);
        }
    }
}
