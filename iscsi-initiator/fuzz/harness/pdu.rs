// Fuzz target: bytes from a target, framed as PDUs with every digest
// setting, then the SCSI data parsers on the data segments.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod pdu {
    use iscsi_initiator::pdu::{Digests, Pdu};
    use iscsi_initiator::scsi;

    /// One input.
    pub fn run(data: &[u8]) {
        for (h, d) in [(false, false), (true, false), (true, true)] {
            let mut rest = data;
            while let Ok((p, n)) = Pdu::decode(rest, Digests { header: h, data: d }, 65536) {
                let _ = scsi::Sense::parse(&p.data);
                let _ = scsi::parse_inquiry(&p.data);
                let _ = scsi::parse_capacity16(&p.data);
                let _ = scsi::parse_report_luns(&p.data);
                let _ = scsi::parse_device_ids(&p.data);
                let _ = scsi::parse_pr_keys(&p.data);
                let _ = scsi::parse_pr_reservation(&p.data);
                rest = &rest[n..];
            }
        }
    }
}
