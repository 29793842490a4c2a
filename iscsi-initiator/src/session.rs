//! A session in the full feature phase: many SCSI commands in flight on
//! one connection.
//!
//! ```text
//!   callers ──command()──> [state: CmdSN window, task table] ──frames──> writer task ──> TCP
//!                                  ^                                          
//!   reader task <── TCP: Data-In, SCSI Response, R2T (-> Data-Out), NOP-In (-> NOP-Out),
//!                        Async Message, Reject, Logout Response
//! ```
//!
//! CmdSN is assigned and the frame queued under one lock, so frames leave
//! in CmdSN order. A command waits while CmdSN would pass MaxCmdSN (serial
//! arithmetic). Every response moves ExpCmdSN/MaxCmdSN/ExpStatSN forward.
//! When the connection fails every task in flight fails with
//! [`Error::Closed`]; the caller (the `Lun` layer) logs in again.

use crate::conn::{read_pdu, write_all};
use crate::error::{Error, Result};
use crate::login::{self, LoginConfig, Outcome};
use crate::pdu::{op, sn_le, sn_lt, Digests, Pdu, NO_TAG};
use crate::scsi::Sense;
use crate::text::Params;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

/// How a command moves data.
#[derive(Debug, Clone)]
pub enum Data {
    /// No data.
    None,
    /// Read up to this many bytes.
    In(usize),
    /// Write these bytes.
    Out(Arc<Vec<u8>>),
}

/// The end of a command.
#[derive(Debug, Clone)]
pub struct Reply {
    /// SCSI status.
    pub status: u8,
    /// Sense data with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data read.
    pub data: Vec<u8>,
    /// Residual count: positive for underflow, negative for overflow.
    pub residual: i64,
}

enum Kind {
    Scsi,
    Nop,
    Logout,
    Tmf,
}

struct Task {
    kind: Kind,
    done: oneshot::Sender<Result<Reply>>,
    lun: u16,
    read: Vec<u8>,
    read_max: usize,
    write: Option<Arc<Vec<u8>>>,
}

struct State {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    tasks: HashMap<u32, Task>,
    closed: Option<String>,
}

struct Inner {
    portal: String,
    target: String,
    params: Params,
    digests: Digests,
    timeout: Duration,
    state: Mutex<State>,
    window: Notify,
}

/// An open session to one target through one portal.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({} at {})", self.inner.target, self.inner.portal)
    }
}

/// How long a command may take before the session is declared dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Session {
    /// Connects to `portal` and logs in, following redirects (at most 4).
    pub async fn connect(portal: &str, cfg: &LoginConfig) -> Result<Session> {
        let mut portal = portal.to_string();
        for _ in 0..5 {
            let mut stream =
                TcpStream::connect(&portal)
                    .await
                    .map_err(|source| Error::Connect {
                        portal: portal.clone(),
                        source,
                    })?;
            let _ = stream.set_nodelay(true);
            match login::login(&mut stream, &portal, cfg, 0).await? {
                Outcome::Redirect(to) => {
                    tracing::info!(from = %portal, to = %to, "login redirected");
                    portal = to;
                }
                Outcome::Done(l) => return Ok(Session::start(stream, portal, cfg, l)),
            }
        }
        Err(Error::Protocol {
            portal,
            what: "more than 4 login redirects".into(),
        })
    }

    fn start(stream: TcpStream, portal: String, cfg: &LoginConfig, l: login::Logged) -> Session {
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let digests = Digests {
            header: l.params.header_digest,
            data: l.params.data_digest,
        };
        let inner = Arc::new(Inner {
            portal: portal.clone(),
            target: cfg.target.clone().unwrap_or_default(),
            params: l.params,
            digests,
            timeout: DEFAULT_TIMEOUT,
            state: Mutex::new(State {
                tx,
                cmd_sn: l.cmd_sn,
                exp_cmd_sn: l.cmd_sn,
                max_cmd_sn: l.max_cmd_sn,
                exp_stat_sn: l.exp_stat_sn,
                next_itt: 1,
                tasks: HashMap::new(),
                closed: None,
            }),
            window: Notify::new(),
        });
        tokio::spawn(writer(wr, rx, portal));
        tokio::spawn(reader(rd, Arc::clone(&inner)));
        Session { inner }
    }

    /// The negotiated parameters.
    pub fn params(&self) -> &Params {
        &self.inner.params
    }

    /// The portal this session is connected to.
    pub fn portal(&self) -> &str {
        &self.inner.portal
    }

    /// The target's name.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// Why the session closed, if it has.
    pub fn closed(&self) -> Option<String> {
        self.inner.state.lock().ok().and_then(|s| s.closed.clone())
    }

    fn closed_err(&self) -> Error {
        Error::Closed {
            target: self.inner.target.clone(),
            portal: self.inner.portal.clone(),
        }
    }

    /// Waits until CmdSN is inside the window, then runs `f` under the
    /// state lock (where the caller queues its frames).
    async fn with_window<T>(&self, immediate: bool, f: impl FnOnce(&mut State) -> T) -> Result<T> {
        loop {
            let n = self.inner.window.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let mut st = self.inner.state.lock().map_err(|_| self.closed_err())?;
                if st.closed.is_some() {
                    return Err(self.closed_err());
                }
                if immediate || sn_le(st.cmd_sn, st.max_cmd_sn) {
                    return Ok(f(&mut st));
                }
            }
            n.await;
        }
    }

    /// Runs one SCSI command on `lun`.
    pub async fn command(&self, lun: u16, cdb: [u8; 16], data: Data) -> Result<Reply> {
        let p = &self.inner.params;
        let d = self.inner.digests;
        let rx = self
            .with_window(false, |st| {
                let itt = take_itt(st);
                let cmd_sn = st.cmd_sn;
                st.cmd_sn = st.cmd_sn.wrapping_add(1);
                let mut pdu = Pdu::new(op::SCSI_CMD, false);
                pdu.set_lun(lun);
                pdu.set_itt(itt);
                pdu.set_u32(24, cmd_sn);
                pdu.set_u32(28, st.exp_stat_sn);
                pdu.bhs[32..48].copy_from_slice(&cdb);
                let mut flags = 0x80 | 0x01; // F, simple task attribute
                let mut unsolicited = Vec::new();
                let (read_max, write) = match &data {
                    Data::None => (0, None),
                    Data::In(n) => {
                        flags |= 0x40;
                        pdu.set_u32(20, *n as u32);
                        (*n, None)
                    }
                    Data::Out(buf) => {
                        flags |= 0x20;
                        pdu.set_u32(20, buf.len() as u32);
                        let burst = (p.first_burst as usize).min(buf.len());
                        let mut sent = 0;
                        if p.immediate_data {
                            sent = burst.min(p.max_send_data as usize);
                            pdu.data = buf[..sent].to_vec();
                        }
                        if !p.initial_r2t && sent < burst {
                            flags &= !0x80; // Data-Out PDUs follow
                            unsolicited = data_out_pdus(
                                itt,
                                lun,
                                NO_TAG,
                                st.exp_stat_sn,
                                buf,
                                sent,
                                burst - sent,
                                p.max_send_data as usize,
                            );
                        }
                        (0, Some(Arc::clone(buf)))
                    }
                };
                pdu.set_flags(flags);
                let (tx, rx) = oneshot::channel();
                st.tasks.insert(
                    itt,
                    Task {
                        kind: Kind::Scsi,
                        done: tx,
                        lun,
                        read: Vec::new(),
                        read_max,
                        write,
                    },
                );
                let mut frame = pdu.encode(d);
                for u in unsolicited {
                    frame.extend_from_slice(&u.encode(d));
                }
                let _ = st.tx.send(frame);
                (itt, rx)
            })
            .await?;
        self.wait(rx).await
    }

    async fn wait(&self, (itt, rx): (u32, oneshot::Receiver<Result<Reply>>)) -> Result<Reply> {
        match tokio::time::timeout(self.inner.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.closed_err()),
            Err(_) => {
                // A command the target never answered: the connection is
                // not trustworthy any more.
                self.fail(format!(
                    "task {itt:#x} got no answer in {} s",
                    self.inner.timeout.as_secs()
                ));
                Err(Error::Timeout {
                    portal: self.inner.portal.clone(),
                    what: format!("task {itt:#x}"),
                    secs: self.inner.timeout.as_secs(),
                })
            }
        }
    }

    /// NOP-Out ping: a round trip to the target.
    pub async fn ping(&self) -> Result<()> {
        let d = self.inner.digests;
        let rx = self
            .with_window(true, |st| {
                let itt = take_itt(st);
                let mut pdu = Pdu::new(op::NOP_OUT, true);
                pdu.set_flags(0x80);
                pdu.set_itt(itt);
                pdu.set_u32(20, NO_TAG);
                pdu.set_u32(24, st.cmd_sn);
                pdu.set_u32(28, st.exp_stat_sn);
                let (tx, rx) = oneshot::channel();
                st.tasks.insert(
                    itt,
                    Task {
                        kind: Kind::Nop,
                        done: tx,
                        lun: 0,
                        read: Vec::new(),
                        read_max: 0,
                        write: None,
                    },
                );
                let _ = st.tx.send(pdu.encode(d));
                (itt, rx)
            })
            .await?;
        self.wait(rx).await.map(drop)
    }

    /// Task management: ABORT TASK (`function` 1, `referenced` = its ITT)
    /// or LOGICAL UNIT RESET (`function` 5). Returns the response code.
    pub async fn task_management(&self, lun: u16, function: u8, referenced: u32) -> Result<u8> {
        let d = self.inner.digests;
        let rx = self
            .with_window(true, |st| {
                let itt = take_itt(st);
                let mut pdu = Pdu::new(op::TASK_MGMT, true);
                pdu.set_flags(0x80 | (function & 0x7f));
                pdu.set_lun(lun);
                pdu.set_itt(itt);
                pdu.set_u32(20, referenced);
                pdu.set_u32(24, st.cmd_sn);
                pdu.set_u32(28, st.exp_stat_sn);
                pdu.set_u32(32, st.cmd_sn);
                let (tx, rx) = oneshot::channel();
                st.tasks.insert(
                    itt,
                    Task {
                        kind: Kind::Tmf,
                        done: tx,
                        lun,
                        read: Vec::new(),
                        read_max: 0,
                        write: None,
                    },
                );
                let _ = st.tx.send(pdu.encode(d));
                (itt, rx)
            })
            .await?;
        self.wait(rx).await.map(|r| r.status)
    }

    /// Logs out (closing the session) and waits for the answer.
    pub async fn logout(&self) -> Result<()> {
        let d = self.inner.digests;
        let rx = self
            .with_window(true, |st| {
                let itt = take_itt(st);
                let mut pdu = Pdu::new(op::LOGOUT, true);
                pdu.set_flags(0x80); // reason 0: close the session
                pdu.set_itt(itt);
                pdu.set_u32(24, st.cmd_sn);
                pdu.set_u32(28, st.exp_stat_sn);
                let (tx, rx) = oneshot::channel();
                st.tasks.insert(
                    itt,
                    Task {
                        kind: Kind::Logout,
                        done: tx,
                        lun: 0,
                        read: Vec::new(),
                        read_max: 0,
                        write: None,
                    },
                );
                let _ = st.tx.send(pdu.encode(d));
                (itt, rx)
            })
            .await?;
        let r = self.wait(rx).await;
        self.fail("logged out".into());
        r.map(drop)
    }

    /// Marks the session closed and fails every task in flight.
    fn fail(&self, why: String) {
        fail_all(&self.inner, why);
    }

    /// Number of commands in flight (for metrics and tests).
    pub fn in_flight(&self) -> usize {
        self.inner.state.lock().map(|s| s.tasks.len()).unwrap_or(0)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        tracing::debug!(portal = %self.portal, "session dropped");
    }
}

fn take_itt(st: &mut State) -> u32 {
    loop {
        let itt = st.next_itt;
        st.next_itt = st.next_itt.wrapping_add(1);
        if itt != NO_TAG && !st.tasks.contains_key(&itt) {
            return itt;
        }
    }
}

/// Data-Out PDUs carrying `len` bytes of `buf` from `offset`, at most
/// `max` bytes each, DataSN from 0, F on the last.
#[allow(clippy::too_many_arguments)]
fn data_out_pdus(
    itt: u32,
    lun: u16,
    ttt: u32,
    exp_stat_sn: u32,
    buf: &[u8],
    offset: usize,
    len: usize,
    max: usize,
) -> Vec<Pdu> {
    let mut out = Vec::new();
    let max = max.max(512);
    let mut at = offset;
    let end = (offset + len).min(buf.len());
    let mut sn = 0u32;
    while at < end {
        let n = max.min(end - at);
        let mut p = Pdu::new(op::DATA_OUT, false);
        p.set_flags(if at + n == end { 0x80 } else { 0 });
        p.set_lun(lun);
        p.set_itt(itt);
        p.set_u32(20, ttt);
        p.set_u32(28, exp_stat_sn);
        p.set_u32(36, sn);
        p.set_u32(40, at as u32);
        p.data = buf[at..at + n].to_vec();
        out.push(p);
        at += n;
        sn += 1;
    }
    out
}

async fn writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    portal: String,
) {
    while let Some(mut frame) = rx.recv().await {
        // Coalesce what is queued into one write.
        while frame.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(more) => frame.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = write_all(&mut wr, &frame, &portal).await {
            tracing::warn!(portal = %portal, error = %e, "connection write failed");
            return;
        }
    }
}

fn fail_all(inner: &Inner, why: String) {
    let tasks = match inner.state.lock() {
        Ok(mut st) => {
            if st.closed.is_none() {
                st.closed = Some(why.clone());
            }
            std::mem::take(&mut st.tasks)
        }
        Err(_) => return,
    };
    for (_, t) in tasks {
        let _ = t.done.send(Err(Error::Closed {
            target: inner.target.clone(),
            portal: inner.portal.clone(),
        }));
    }
    inner.window.notify_waiters();
}

async fn reader(mut rd: tokio::net::tcp::OwnedReadHalf, inner: Arc<Inner>) {
    let max = inner.params.max_recv_data as usize;
    loop {
        let pdu = match read_pdu(&mut rd, inner.digests, max, &inner.portal).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(portal = %inner.portal, error = %e, "connection lost");
                fail_all(&inner, e.to_string());
                return;
            }
        };
        if let Err(e) = handle(&inner, pdu) {
            tracing::warn!(portal = %inner.portal, error = %e, "protocol error; dropping the connection");
            fail_all(&inner, e.to_string());
            return;
        }
    }
}

fn update_sn(st: &mut State, exp: u32, max: u32) -> bool {
    let mut moved = false;
    if sn_lt(st.exp_cmd_sn, exp) {
        st.exp_cmd_sn = exp;
        moved = true;
    }
    // MaxCmdSN only counts when it is not below ExpCmdSN - 1.
    if sn_lt(st.max_cmd_sn, max) && sn_le(exp.wrapping_sub(1), max) {
        st.max_cmd_sn = max;
        moved = true;
    }
    moved
}

fn handle(inner: &Inner, p: Pdu) -> Result<()> {
    let proto = |what: String| Error::Protocol {
        portal: inner.portal.clone(),
        what,
    };
    let mut st = inner
        .state
        .lock()
        .map_err(|_| proto("state lock poisoned".into()))?;
    let opcode = p.opcode();
    if matches!(
        opcode,
        op::NOP_IN
            | op::SCSI_RESP
            | op::DATA_IN
            | op::R2T
            | op::ASYNC
            | op::REJECT
            | op::LOGOUT_RESP
            | op::TASK_MGMT_RESP
    ) && update_sn(&mut st, p.u32_at(28), p.u32_at(32))
    {
        inner.window.notify_waiters();
    }
    let itt = p.itt();
    match opcode {
        op::DATA_IN => {
            let status_here = p.flags() & 0x01 != 0;
            let offset = p.u32_at(40) as usize;
            let Some(t) = st.tasks.get_mut(&itt) else {
                return Err(proto(format!("Data-In for unknown task {itt:#x}")));
            };
            let end = offset
                .checked_add(p.data.len())
                .filter(|&e| e <= t.read_max)
                .ok_or_else(|| {
                    proto(format!(
                        "Data-In at {offset}+{} beyond the {} bytes expected",
                        p.data.len(),
                        t.read_max
                    ))
                })?;
            if t.read.len() < end {
                t.read.resize(end, 0);
            }
            t.read[offset..end].copy_from_slice(&p.data);
            if status_here {
                st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
                let residual = residual(&p);
                if let Some(t) = st.tasks.remove(&itt) {
                    let _ = t.done.send(Ok(Reply {
                        status: p.bhs[3],
                        sense: None,
                        data: t.read,
                        residual,
                    }));
                }
            }
        }
        op::SCSI_RESP => {
            st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
            let Some(t) = st.tasks.remove(&itt) else {
                return Err(proto(format!("SCSI Response for unknown task {itt:#x}")));
            };
            if p.bhs[2] != 0 {
                let _ = t.done.send(Err(proto(format!(
                    "target failure response {:#04x} to task {itt:#x}",
                    p.bhs[2]
                ))));
                return Ok(());
            }
            let sense = if p.data.len() >= 2 {
                let n = usize::from(u16::from_be_bytes([p.data[0], p.data[1]]));
                p.data.get(2..2 + n).and_then(Sense::parse)
            } else {
                None
            };
            let _ = t.done.send(Ok(Reply {
                status: p.bhs[3],
                sense,
                data: t.read,
                residual: residual(&p),
            }));
        }
        op::R2T => {
            let ttt = p.u32_at(20);
            let offset = p.u32_at(40) as usize;
            let len = p.u32_at(44) as usize;
            let Some(t) = st.tasks.get(&itt) else {
                return Err(proto(format!("R2T for unknown task {itt:#x}")));
            };
            let Some(buf) = t.write.clone() else {
                return Err(proto(format!(
                    "R2T for task {itt:#x}, which writes nothing"
                )));
            };
            if offset.checked_add(len).is_none_or(|e| e > buf.len())
                || len > inner.params.max_burst as usize
            {
                return Err(proto(format!(
                    "R2T for {len} bytes at {offset} of a {}-byte write",
                    buf.len()
                )));
            }
            let lun = t.lun;
            let mut frame = Vec::new();
            for d in data_out_pdus(
                itt,
                lun,
                ttt,
                st.exp_stat_sn,
                &buf,
                offset,
                len,
                inner.params.max_send_data as usize,
            ) {
                frame.extend_from_slice(&d.encode(inner.digests));
            }
            let _ = st.tx.send(frame);
        }
        op::NOP_IN => {
            st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
            let ttt = p.u32_at(20);
            if itt != NO_TAG {
                if let Some(t) = st.tasks.remove(&itt) {
                    let _ = t.done.send(Ok(Reply {
                        status: 0,
                        sense: None,
                        data: Vec::new(),
                        residual: 0,
                    }));
                }
            }
            if ttt != NO_TAG {
                // The target pings us: answer with its TTT and LUN.
                let mut r = Pdu::new(op::NOP_OUT, true);
                r.set_flags(0x80);
                r.bhs[8..16].copy_from_slice(&p.bhs[8..16]);
                r.set_itt(NO_TAG);
                r.set_u32(20, ttt);
                r.set_u32(24, st.cmd_sn);
                r.set_u32(28, st.exp_stat_sn);
                let _ = st.tx.send(r.encode(inner.digests));
            }
        }
        op::ASYNC => {
            st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
            let event = p.bhs[36];
            tracing::info!(portal = %inner.portal, event, "asynchronous message from target");
            if matches!(event, 1..=3) {
                return Err(proto(format!(
                    "target asks to end the connection (async event {event})"
                )));
            }
        }
        op::REJECT => {
            let reason = p.bhs[2];
            let rejected = if p.data.len() >= 20 {
                u32::from_be_bytes([p.data[16], p.data[17], p.data[18], p.data[19]])
            } else {
                NO_TAG
            };
            if let Some(t) = st.tasks.remove(&rejected) {
                let _ = t.done.send(Err(proto(format!(
                    "target rejected task {rejected:#x} (reason {reason:#04x})"
                ))));
            } else {
                return Err(proto(format!(
                    "target rejected a PDU (reason {reason:#04x})"
                )));
            }
        }
        op::LOGOUT_RESP | op::TASK_MGMT_RESP => {
            st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
            if let Some(t) = st.tasks.remove(&itt) {
                let ok = matches!(t.kind, Kind::Logout | Kind::Tmf);
                let _ = t.done.send(if ok {
                    Ok(Reply {
                        status: p.bhs[2],
                        sense: None,
                        data: Vec::new(),
                        residual: 0,
                    })
                } else {
                    Err(proto("unexpected response".into()))
                });
            }
        }
        other => {
            return Err(proto(format!(
                "unexpected opcode {other:#04x} in full feature phase"
            )))
        }
    }
    Ok(())
}

fn residual(p: &Pdu) -> i64 {
    let r = i64::from(p.u32_at(44));
    if p.flags() & 0x04 != 0 {
        -r
    } else if p.flags() & 0x02 != 0 {
        r
    } else {
        0
    }
}

/// SendTargets discovery: the targets (name, portals) a portal offers.
pub async fn discover(
    portal: &str,
    initiator: &str,
    chap: Option<login::Chap>,
) -> Result<Vec<(String, Vec<String>)>> {
    let cfg = LoginConfig {
        initiator: initiator.into(),
        target: None,
        isid: crate::new_isid(),
        chap,
        mutual: None,
        offer: Default::default(),
    };
    let mut stream = TcpStream::connect(portal)
        .await
        .map_err(|source| Error::Connect {
            portal: portal.into(),
            source,
        })?;
    let l = match login::login(&mut stream, portal, &cfg, 0).await? {
        Outcome::Done(l) => l,
        Outcome::Redirect(to) => {
            return Err(Error::Protocol {
                portal: portal.into(),
                what: format!("discovery redirected to {to}"),
            })
        }
    };
    let mut req = Pdu::new(op::TEXT, true);
    req.set_flags(0x80);
    req.set_itt(1);
    req.set_u32(20, NO_TAG);
    req.set_u32(24, l.cmd_sn);
    req.set_u32(28, l.exp_stat_sn);
    req.data = crate::text::encode(&[("SendTargets", "All".into())]);
    write_all(&mut stream, &req.encode(Digests::default()), portal).await?;
    let mut text = Vec::new();
    loop {
        let r = read_pdu(&mut stream, Digests::default(), 1 << 20, portal).await?;
        if r.opcode() != op::TEXT_RESP {
            return Err(Error::Protocol {
                portal: portal.into(),
                what: format!("opcode {:#04x} answering SendTargets", r.opcode()),
            });
        }
        text.extend_from_slice(&r.data);
        if r.flags() & 0x40 == 0 {
            break;
        }
        // Continue: ask for the rest with the target's TTT.
        let mut more = Pdu::new(op::TEXT, true);
        more.set_flags(0x80);
        more.set_itt(1);
        more.set_u32(20, r.u32_at(20));
        more.set_u32(24, l.cmd_sn);
        more.set_u32(28, r.u32_at(24).wrapping_add(1));
        write_all(&mut stream, &more.encode(Digests::default()), portal).await?;
    }
    let pairs = crate::text::parse(&text).map_err(|source| Error::Text {
        portal: portal.into(),
        source,
    })?;
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "TargetName" => out.push((v, Vec::new())),
            "TargetAddress" => {
                if let Some(last) = out.last_mut() {
                    last.1
                        .push(v.split(',').next().unwrap_or_default().to_string());
                }
            }
            _ => {}
        }
    }
    Ok(out)
}
