//! SCSI commands (SPC-4, SBC-3) the initiator issues, and parsing of what
//! comes back: CDBs, sense data (fixed and descriptor), INQUIRY, READ
//! CAPACITY(16), REPORT LUNS, PERSISTENT RESERVE IN.

/// SCSI status: GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status: CHECK CONDITION (sense data follows).
pub const CHECK_CONDITION: u8 = 0x02;
/// SCSI status: CONDITION MET.
pub const CONDITION_MET: u8 = 0x04;
/// SCSI status: BUSY.
pub const BUSY: u8 = 0x08;
/// SCSI status: RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x18;
/// SCSI status: TASK SET FULL.
pub const TASK_SET_FULL: u8 = 0x28;

/// Sense key: UNIT ATTENTION.
pub const UNIT_ATTENTION: u8 = 0x6;
/// Sense key: MISCOMPARE (COMPARE AND WRITE).
pub const MISCOMPARE: u8 = 0xe;

/// Parsed sense data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// Information field (for MISCOMPARE: offset of the first difference).
    pub information: Option<u64>,
}

impl std::fmt::Display for Sense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = match self.key {
            0x0 => "NO SENSE",
            0x1 => "RECOVERED ERROR",
            0x2 => "NOT READY",
            0x3 => "MEDIUM ERROR",
            0x4 => "HARDWARE ERROR",
            0x5 => "ILLEGAL REQUEST",
            0x6 => "UNIT ATTENTION",
            0x7 => "DATA PROTECT",
            0xb => "ABORTED COMMAND",
            0xe => "MISCOMPARE",
            _ => "sense key",
        };
        write!(
            f,
            "{key} ({:#x}) asc/ascq {:#04x}/{:#04x}",
            self.key, self.asc, self.ascq
        )
    }
}

impl Sense {
    /// Parses fixed (0x70/0x71) or descriptor (0x72/0x73) sense data.
    pub fn parse(b: &[u8]) -> Option<Sense> {
        let code = *b.first()? & 0x7f;
        match code {
            0x70 | 0x71 => {
                if b.len() < 14 {
                    return Some(Sense {
                        key: b.get(2).map_or(0, |k| k & 0xf),
                        asc: 0,
                        ascq: 0,
                        information: None,
                    });
                }
                let info = (b[0] & 0x80 != 0)
                    .then(|| u64::from(u32::from_be_bytes([b[3], b[4], b[5], b[6]])));
                Some(Sense {
                    key: b[2] & 0xf,
                    asc: b[12],
                    ascq: b[13],
                    information: info,
                })
            }
            0x72 | 0x73 => {
                if b.len() < 4 {
                    return None;
                }
                let mut information = None;
                let add = usize::from(*b.get(7).unwrap_or(&0));
                let mut i = 8;
                let end = (8 + add).min(b.len());
                while i + 2 <= end {
                    let (ty, len) = (b[i], usize::from(b[i + 1]));
                    if ty == 0 && i + 12 <= end && len >= 10 {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(&b[i + 4..i + 12]);
                        information = Some(u64::from_be_bytes(a));
                    }
                    i += 2 + len;
                }
                Some(Sense {
                    key: b[1] & 0xf,
                    asc: b[2],
                    ascq: b[3],
                    information,
                })
            }
            _ => None,
        }
    }
}

/// TEST UNIT READY.
pub fn test_unit_ready() -> [u8; 16] {
    [0; 16]
}

/// INQUIRY of the standard page (`vpd == None`) or a VPD page.
pub fn inquiry(vpd: Option<u8>, alloc: u16) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x12;
    if let Some(p) = vpd {
        c[1] = 1;
        c[2] = p;
    }
    c[3..5].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// READ CAPACITY(16).
pub fn read_capacity16() -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[10..14].copy_from_slice(&32u32.to_be_bytes());
    c
}

/// REPORT LUNS.
pub fn report_luns(alloc: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0xa0;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// READ(16) or WRITE(16) of `blocks` at `lba`, optionally with FUA.
pub fn rw16(write: bool, lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = if write { 0x8a } else { 0x88 };
    if fua {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// READ(10) or WRITE(10).
pub fn rw10(write: bool, lba: u32, blocks: u16, fua: bool) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = if write { 0x2a } else { 0x28 };
    if fua {
        c[1] = 0x08;
    }
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// SYNCHRONIZE CACHE(10) of the whole LUN.
pub fn synchronize_cache() -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x35;
    c
}

/// COMPARE AND WRITE of `blocks` at `lba` (data: compare half, then write half).
pub fn compare_and_write(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

/// PERSISTENT RESERVE IN: service action 0 (read keys) or 1 (read
/// reservation).
pub fn pr_in(action: u8, alloc: u16) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x5e;
    c[1] = action & 0x1f;
    c[7..9].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// PERSISTENT RESERVE OUT service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrOut {
    /// Register `new` (with `key` the current one, 0 when none).
    Register,
    /// Reserve with the given type.
    Reserve,
    /// Release the reservation.
    Release,
    /// Clear every registration and the reservation.
    Clear,
    /// Remove `new`'s registrations (and reservation), keep ours.
    Preempt,
    /// Register ignoring the current key.
    RegisterAndIgnore,
}

/// Reservation type: Write Exclusive – Registrants Only.
pub const PR_WE_RO: u8 = 5;
/// Reservation type: Exclusive Access – Registrants Only.
pub const PR_EA_RO: u8 = 6;

/// PERSISTENT RESERVE OUT CDB and its 24-byte parameter list.
pub fn pr_out(action: PrOut, kind: u8, key: u64, sa_key: u64) -> ([u8; 16], Vec<u8>) {
    let sa = match action {
        PrOut::Register => 0,
        PrOut::Reserve => 1,
        PrOut::Release => 2,
        PrOut::Clear => 3,
        PrOut::Preempt => 4,
        PrOut::RegisterAndIgnore => 6,
    };
    let mut c = [0u8; 16];
    c[0] = 0x5f;
    c[1] = sa;
    c[2] = kind & 0xf;
    c[5..9].copy_from_slice(&24u32.to_be_bytes());
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    (c, p)
}

/// Standard INQUIRY data, the parts worth showing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    /// Peripheral device type (0 = disk).
    pub device_type: u8,
    /// T10 vendor.
    pub vendor: String,
    /// Product.
    pub product: String,
    /// Revision.
    pub revision: String,
}

/// Parses standard INQUIRY data.
pub fn parse_inquiry(b: &[u8]) -> Option<Inquiry> {
    if b.len() < 36 {
        return None;
    }
    let s = |r: std::ops::Range<usize>| String::from_utf8_lossy(&b[r]).trim().to_string();
    Some(Inquiry {
        device_type: b[0] & 0x1f,
        vendor: s(8..16),
        product: s(16..32),
        revision: s(32..36),
    })
}

/// Parses READ CAPACITY(16): (number of blocks, block size).
pub fn parse_capacity16(b: &[u8]) -> Option<(u64, u32)> {
    if b.len() < 12 {
        return None;
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[0..8]);
    let last = u64::from_be_bytes(a);
    let bs = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    Some((last.checked_add(1)?, bs))
}

/// Parses REPORT LUNS data into LUN numbers.
pub fn parse_report_luns(b: &[u8]) -> Vec<u16> {
    if b.len() < 8 {
        return Vec::new();
    }
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    b[8..]
        .chunks_exact(8)
        .take(len / 8)
        .filter_map(|c| {
            let mut l = [0u8; 8];
            l.copy_from_slice(c);
            crate::pdu::decode_lun(&l)
        })
        .collect()
}

/// Parses the device identification VPD page (0x83) into readable ids.
pub fn parse_device_ids(b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    if b.len() < 4 {
        return out;
    }
    let end = (4 + usize::from(u16::from_be_bytes([b[2], b[3]]))).min(b.len());
    let mut i = 4;
    while i + 4 <= end {
        let code_set = b[i] & 0xf;
        let len = usize::from(b[i + 3]);
        let Some(id) = b.get(i + 4..i + 4 + len) else {
            break;
        };
        out.push(if code_set == 2 || code_set == 3 {
            String::from_utf8_lossy(id)
                .trim_end_matches('\0')
                .trim()
                .to_string()
        } else {
            id.iter().map(|x| format!("{x:02x}")).collect()
        });
        i += 4 + len;
    }
    out
}

/// PERSISTENT RESERVE IN (read keys): the registered keys.
pub fn parse_pr_keys(b: &[u8]) -> Vec<u64> {
    if b.len() < 8 {
        return Vec::new();
    }
    let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
    b[8..]
        .chunks_exact(8)
        .take(len / 8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// PERSISTENT RESERVE IN (read reservation): (holder's key, type), or
/// `None` when no reservation is held.
pub fn parse_pr_reservation(b: &[u8]) -> Option<(u64, u8)> {
    if b.len() < 24 || u32::from_be_bytes([b[4], b[5], b[6], b[7]]) < 16 {
        return None;
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[8..16]);
    Some((u64::from_be_bytes(a), b[21] & 0xf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_and_descriptor_sense() {
        // Fixed: UNIT ATTENTION, asc/ascq 0x29/0x00 (power on or reset).
        let mut f = [0u8; 18];
        f[0] = 0x70;
        f[2] = 0x06;
        f[7] = 10;
        f[12] = 0x29;
        let s = Sense::parse(&f).unwrap();
        assert_eq!((s.key, s.asc, s.ascq), (UNIT_ATTENTION, 0x29, 0));
        // Descriptor: MISCOMPARE with an information descriptor = 7.
        let mut d = vec![0x72, 0x0e, 0x1d, 0x00, 0, 0, 0, 12];
        d.extend_from_slice(&[0x00, 0x0a, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        let s = Sense::parse(&d).unwrap();
        assert_eq!((s.key, s.asc, s.information), (MISCOMPARE, 0x1d, Some(7)));
    }

    #[test]
    fn capacity_and_luns() {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&1023u64.to_be_bytes());
        b[8..12].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_capacity16(&b), Some((1024, 512)));
        let mut r = vec![0, 0, 0, 16, 0, 0, 0, 0];
        r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_report_luns(&r), vec![0, 1]);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = Sense::parse(&b);
            let _ = parse_inquiry(&b);
            let _ = parse_capacity16(&b);
            let _ = parse_report_luns(&b);
            let _ = parse_device_ids(&b);
            let _ = parse_pr_keys(&b);
            let _ = parse_pr_reservation(&b);
        }
    }
}
