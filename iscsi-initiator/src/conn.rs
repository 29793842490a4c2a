//! Reading and writing whole PDUs on a TCP connection.

use crate::error::{Error, Result};
use crate::pdu::{Digests, Pdu, BHS_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one PDU. `max_data` is our MaxRecvDataSegmentLength: a longer
/// data segment is a protocol error, not an allocation.
pub async fn read_pdu<R: AsyncRead + Unpin>(
    r: &mut R,
    d: Digests,
    max_data: usize,
    portal: &str,
) -> Result<Pdu> {
    let mut bhs = [0u8; BHS_LEN];
    r.read_exact(&mut bhs).await.map_err(|source| Error::Io {
        portal: portal.into(),
        what: "reading a PDU header",
        source,
    })?;
    let (head_rest, data_len) = Pdu::lengths(&bhs, d, max_data).map_err(|source| Error::Pdu {
        portal: portal.into(),
        source,
    })?;
    let mut rest = vec![0u8; head_rest];
    r.read_exact(&mut rest).await.map_err(|source| Error::Io {
        portal: portal.into(),
        what: "reading a PDU header",
        source,
    })?;
    let mut data = vec![0u8; data_len];
    r.read_exact(&mut data).await.map_err(|source| Error::Io {
        portal: portal.into(),
        what: "reading a PDU data segment",
        source,
    })?;
    Pdu::assemble_owned(bhs, &rest, data, d).map_err(|source| Error::Pdu {
        portal: portal.into(),
        source,
    })
}

/// Writes encoded PDU bytes.
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8], portal: &str) -> Result<()> {
    w.write_all(bytes).await.map_err(|source| Error::Io {
        portal: portal.into(),
        what: "sending a PDU",
        source,
    })
}
