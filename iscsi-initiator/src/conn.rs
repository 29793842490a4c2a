//! Reading and writing whole PDUs on a TCP connection.

use crate::error::{Error, Result};
use crate::pdu::{Digests, Pdu, BHS_LEN};
use bytes::BufMut;
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
    // Read into the vector's spare room: zeroing a large data segment
    // first costs as much as receiving it.
    let mut data = Vec::with_capacity(data_len);
    while data.len() < data_len {
        let want = data_len - data.len();
        let got = r.read_buf(&mut (&mut data).limit(want)).await;
        let source = match got {
            Ok(0) => std::io::ErrorKind::UnexpectedEof.into(),
            Ok(_) => continue,
            Err(e) => e,
        };
        return Err(Error::Io {
            portal: portal.into(),
            what: "reading a PDU data segment",
            source,
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::op;

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_pdu_read_from_a_stream_equals_the_one_sent_and_a_cut_one_is_an_error() {
        for digests in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
        ] {
            for len in [0usize, 1, 4093, 131_072] {
                let mut p = Pdu::new(op::DATA_IN, false);
                p.set_itt(7);
                p.data = (0..len).map(|i| (i * 31) as u8).collect();
                let bytes = p.encode(digests);
                let got = run(read_pdu(&mut &bytes[..], digests, 1 << 20, "t")).expect("whole PDU");
                assert_eq!(got.itt(), 7);
                assert_eq!(got.data, p.data);
                for cut in [bytes.len() - 1, bytes.len() / 2, 47] {
                    let r = run(read_pdu(&mut &bytes[..cut], digests, 1 << 20, "t"));
                    assert!(
                        matches!(r, Err(Error::Io { .. })),
                        "{len}-byte PDU cut at {cut}: {r:?}"
                    );
                }
            }
        }
    }
}
