//! `Lun`: a logical unit behind a session, as a block device: capacity,
//! byte-addressed (block-aligned) reads and writes, flush, persistent
//! reservations. SCSI status handling lives here: UNIT ATTENTION is
//! retried, BUSY and TASK SET FULL are retried with backoff, RESERVATION
//! CONFLICT becomes [`Error::Fenced`].

use crate::error::{Error, Result};
use crate::scsi::{self, PrOut};
use crate::session::{Data, Reply, Session};
use std::sync::Arc;
use std::time::Duration;

/// Largest transfer of one READ/WRITE command.
pub const MAX_IO: usize = 4 << 20;

/// A logical unit of a target.
#[derive(Debug, Clone)]
pub struct Lun {
    session: Session,
    lun: u16,
    block_size: u32,
    blocks: u64,
}

impl Lun {
    /// Opens LUN `lun` of the session's target: waits out the UNIT
    /// ATTENTION of a new nexus, then reads its capacity.
    pub async fn open(session: Session, lun: u16) -> Result<Lun> {
        let mut l = Lun {
            session,
            lun,
            block_size: 512,
            blocks: 0,
        };
        l.scsi("TEST UNIT READY", None, scsi::test_unit_ready(), Data::None)
            .await?;
        let r = l
            .scsi(
                "READ CAPACITY(16)",
                None,
                scsi::read_capacity16(),
                Data::In(32),
            )
            .await?;
        let (blocks, bs) = scsi::parse_capacity16(&r.data).ok_or_else(|| Error::Protocol {
            portal: l.session.portal().into(),
            what: "short READ CAPACITY(16) data".into(),
        })?;
        if bs == 0 || !bs.is_power_of_two() {
            return Err(Error::Protocol {
                portal: l.session.portal().into(),
                what: format!("block size {bs}"),
            });
        }
        l.blocks = blocks;
        l.block_size = bs;
        Ok(l)
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The LUN number.
    pub fn number(&self) -> u16 {
        self.lun
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }

    /// Runs a command with the status policy of this module.
    pub async fn scsi(
        &self,
        op: &'static str,
        lba: Option<u64>,
        cdb: [u8; 16],
        data: Data,
    ) -> Result<Reply> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let r = self.session.command(self.lun, cdb, data.clone()).await?;
            let retry = match r.status {
                scsi::GOOD | scsi::CONDITION_MET => return Ok(r),
                scsi::RESERVATION_CONFLICT => {
                    return Err(Error::Fenced {
                        op,
                        target: self.session.target().into(),
                        lun: self.lun,
                    });
                }
                scsi::CHECK_CONDITION
                    if r.sense
                        .as_ref()
                        .is_some_and(|s| s.key == scsi::UNIT_ATTENTION) =>
                {
                    attempt < 8
                }
                scsi::CHECK_CONDITION
                    if r.sense
                        .as_ref()
                        .is_some_and(|s| s.key == 0x5 && s.asc == 0x20) =>
                {
                    return Err(Error::Unsupported {
                        op,
                        target: self.session.target().into(),
                    });
                }
                scsi::BUSY | scsi::TASK_SET_FULL => {
                    if attempt < 10 {
                        tokio::time::sleep(Duration::from_millis(5 << attempt.min(7))).await;
                    }
                    attempt < 10
                }
                _ => false,
            };
            if !retry {
                return Err(Error::Scsi {
                    op,
                    target: self.session.target().into(),
                    lun: self.lun,
                    lba,
                    status: r.status,
                    sense: r.sense,
                });
            }
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64> {
        let bs = u64::from(self.block_size);
        if offset % bs != 0 || len as u64 % bs != 0 {
            return Err(Error::Invalid(format!(
                "I/O at {offset}+{len} is not aligned to the {bs}-byte blocks of LUN {}",
                self.lun
            )));
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.capacity())
        {
            return Err(Error::Invalid(format!(
                "I/O at {offset}+{len} is beyond the end of LUN {} ({} bytes)",
                self.lun,
                self.capacity()
            )));
        }
        Ok(offset / bs)
    }

    /// Reads `len` bytes at `offset` (both multiples of the block size).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let lba = self.check(offset, len)?;
        let bs = self.block_size as usize;
        let mut out: Vec<u8> = Vec::new();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_IO);
            let l = lba + (done / bs) as u64;
            let r = self
                .scsi(
                    "READ(16)",
                    Some(l),
                    scsi::rw16(false, l, (n / bs) as u32, false),
                    Data::In(n),
                )
                .await?;
            if r.data.len() != n {
                return Err(Error::Protocol {
                    portal: self.session.portal().into(),
                    what: format!("READ at LBA {l} returned {} of {n} bytes", r.data.len()),
                });
            }
            if out.is_empty() && n == len {
                // One command: its buffer is the answer.
                return Ok(r.data);
            }
            out.extend_from_slice(&r.data);
            done += n;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` (both multiples of the block size); with
    /// `fua` the data is on stable media when this returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let lba = self.check(offset, data.len())?;
        let bs = self.block_size as usize;
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(MAX_IO);
            let l = lba + (done / bs) as u64;
            let buf = Arc::new(data[done..done + n].to_vec());
            self.scsi(
                "WRITE(16)",
                Some(l),
                scsi::rw16(true, l, (n / bs) as u32, fua),
                Data::Out(buf),
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    /// SYNCHRONIZE CACHE: every completed write is on stable media.
    pub async fn flush(&self) -> Result<()> {
        self.scsi(
            "SYNCHRONIZE CACHE",
            None,
            scsi::synchronize_cache(),
            Data::None,
        )
        .await
        .map(drop)
    }

    /// Standard INQUIRY.
    pub async fn inquiry(&self) -> Result<scsi::Inquiry> {
        let r = self
            .scsi("INQUIRY", None, scsi::inquiry(None, 96), Data::In(96))
            .await?;
        scsi::parse_inquiry(&r.data).ok_or_else(|| Error::Protocol {
            portal: self.session.portal().into(),
            what: "short INQUIRY data".into(),
        })
    }

    /// The device identifiers (VPD page 0x83).
    pub async fn device_ids(&self) -> Result<Vec<String>> {
        let r = self
            .scsi(
                "INQUIRY VPD 0x83",
                None,
                scsi::inquiry(Some(0x83), 255),
                Data::In(255),
            )
            .await?;
        Ok(scsi::parse_device_ids(&r.data))
    }

    /// COMPARE AND WRITE of one block at `lba`: writes `new` only if the
    /// block holds `expected`. Returns false on a miscompare.
    pub async fn compare_and_write(&self, lba: u64, expected: &[u8], new: &[u8]) -> Result<bool> {
        let bs = self.block_size as usize;
        if expected.len() != bs || new.len() != bs {
            return Err(Error::Invalid(format!(
                "COMPARE AND WRITE takes one {bs}-byte block each way"
            )));
        }
        let mut buf = expected.to_vec();
        buf.extend_from_slice(new);
        match self
            .scsi(
                "COMPARE AND WRITE",
                Some(lba),
                scsi::compare_and_write(lba, 1),
                Data::Out(Arc::new(buf)),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Scsi { sense: Some(s), .. }) if s.key == scsi::MISCOMPARE => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// PERSISTENT RESERVE OUT.
    pub async fn reserve_out(&self, action: PrOut, kind: u8, key: u64, sa_key: u64) -> Result<()> {
        let (cdb, params) = scsi::pr_out(action, kind, key, sa_key);
        self.scsi(
            "PERSISTENT RESERVE OUT",
            None,
            cdb,
            Data::Out(Arc::new(params)),
        )
        .await
        .map(drop)
    }

    /// Registered reservation keys.
    pub async fn reservation_keys(&self) -> Result<Vec<u64>> {
        let r = self
            .scsi(
                "PERSISTENT RESERVE IN",
                None,
                scsi::pr_in(0, 1024),
                Data::In(1024),
            )
            .await?;
        Ok(scsi::parse_pr_keys(&r.data))
    }

    /// The reservation: (holder's key, type), if one is held.
    pub async fn reservation(&self) -> Result<Option<(u64, u8)>> {
        let r = self
            .scsi(
                "PERSISTENT RESERVE IN",
                None,
                scsi::pr_in(1, 1024),
                Data::In(1024),
            )
            .await?;
        Ok(scsi::parse_pr_reservation(&r.data))
    }
}
