//! Connections to other hosts for the requests the host asked serves
//! itself (redirected block I/O, FileSystemRedirected file I/O): a pool of
//! authenticated connections per address, one request in flight on each.

use coordinator::proto::{frame, request, BlockOp, Frame, Request, Response};
use coordinator::wire::{self, Conn, Identity};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Why an exchange with a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// No connection: the request did not leave.
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    /// Sending failed.
    #[error("sending the request")]
    Send {
        /// The request may have reached the peer (part or all of the frame
        /// went out on the socket).
        maybe_delivered: bool,
        /// Why.
        #[source]
        source: wire::WireError,
    },
    /// The request went out and no answer came back.
    #[error("waiting for the answer")]
    Receive(#[source] wire::WireError),
    /// Something other than the answer came back.
    #[error("the peer answered something else than the request's answer")]
    Unexpected,
}

impl ExchangeError {
    /// The request may have reached the peer (it went out, and no answer
    /// came back): the peer may still carry it out.
    pub fn maybe_delivered(&self) -> bool {
        match self {
            ExchangeError::Connect(_) => false,
            ExchangeError::Send {
                maybe_delivered, ..
            } => *maybe_delivered,
            ExchangeError::Receive(_) | ExchangeError::Unexpected => true,
        }
    }
}

/// Pooled connections to peers.
pub struct PeerConns {
    me: Identity,
    read_timeout: Duration,
    pool: Mutex<Vec<(SocketAddr, Conn)>>,
    seq: AtomicU64,
}

impl std::fmt::Debug for PeerConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConns").finish_non_exhaustive()
    }
}

impl PeerConns {
    /// Connections as `me`; an answer may take up to `read_timeout`.
    pub fn new(me: Identity, read_timeout: Duration) -> PeerConns {
        PeerConns {
            me,
            read_timeout,
            pool: Mutex::new(Vec::new()),
            seq: AtomicU64::new(1),
        }
    }

    fn conn(&self, a: SocketAddr) -> std::io::Result<Conn> {
        let pooled = self.pool.lock().ok().and_then(|mut p| {
            let i = p.iter().position(|(x, _)| *x == a)?;
            Some(p.swap_remove(i).1)
        });
        if let Some(c) = pooled {
            return Ok(c);
        }
        let c = wire::connect(a, &self.me, Duration::from_millis(500))
            .map_err(std::io::Error::other)?;
        c.set_read_timeout(Some(self.read_timeout))?;
        Ok(c)
    }

    /// Sends one request to `a` and waits for its answer; the connection
    /// goes back to the pool when the exchange worked (a failed one is
    /// dropped).
    pub fn exchange(&self, a: SocketAddr, body: request::Body) -> Result<Response, ExchangeError> {
        self.exchange_with(a, |c, seq| {
            c.send(&Frame {
                body: Some(frame::Body::Request(Request {
                    client: 0,
                    seq,
                    group: 0,
                    body: Some(body),
                })),
            })
        })
    }

    /// [`exchange`](Self::exchange) of a block write: `data` goes straight
    /// into the frame (one copy, not two).
    pub fn exchange_block_write(
        &self,
        a: SocketAddr,
        op: &BlockOp,
        data: &[u8],
    ) -> Result<Response, ExchangeError> {
        self.exchange_with(a, |c, seq| {
            let req = Request {
                client: 0,
                seq,
                group: 0,
                body: None,
            };
            c.send_block_write(&req, op, data)
        })
    }

    fn exchange_with(
        &self,
        a: SocketAddr,
        send: impl FnOnce(&mut Conn, u64) -> Result<(), wire::WireError>,
    ) -> Result<Response, ExchangeError> {
        let mut c = self.conn(a).map_err(ExchangeError::Connect)?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        // A send that failed on the socket may have put part or all of
        // the frame on the wire; a frame refused before it was written (too
        // long, a drill's cut) did not leave.
        send(&mut c, seq).map_err(|e| ExchangeError::Send {
            maybe_delivered: match &e {
                wire::WireError::Io(io) => io.kind() != std::io::ErrorKind::NetworkUnreachable,
                _ => false,
            },
            source: e,
        })?;
        match c.recv() {
            Ok(Frame {
                body: Some(frame::Body::Response(r)),
            }) if r.seq == seq => {
                if let Ok(mut p) = self.pool.lock() {
                    p.push((a, c));
                }
                Ok(r)
            }
            Ok(_) => Err(ExchangeError::Unexpected),
            Err(e) => Err(ExchangeError::Receive(e)),
        }
    }
}
