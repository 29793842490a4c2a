//! A session in the full feature phase: many SCSI commands in flight on
//! one connection, kept alive across connection failures.
//!
//! ```text
//!  callers ─command()─> task table + backlog ─pump (CmdSN <= MaxCmdSN)─> writer task ─> TCP
//!                             ^
//!  reader task <─ TCP: Data-In, SCSI Response, R2T (-> Data-Out), NOP-In (-> NOP-Out),
//!                      Async Message, Reject, Logout/TMF Response
//!  watchdog: NOP-Out when idle; a task unanswered too long = connection lost
//!
//!  connection lost ──> recovery: log in again with the same ISID (session
//!  reinstatement, ErrorRecoveryLevel 0) on this portal or the next one,
//!  then reissue every unanswered command in its original order
//! ```
//!
//! CmdSN is assigned when a command leaves the backlog, under one lock, so
//! frames leave in CmdSN order; a command waits in the backlog while its
//! CmdSN would pass MaxCmdSN (serial arithmetic). A write is answered to
//! its caller only after the target's SCSI Response, so every write that
//! was not answered is sent again after a reconnect, before any command
//! issued later: nothing acknowledged is lost, and a flush still follows
//! the writes it covers.

use crate::conn::read_pdu;
use crate::error::{Error, Result};
use crate::login::{self, LoginConfig, Outcome};
use crate::pdu::{op, sn_le, sn_lt, Digests, Pdu, NO_TAG};
use crate::scsi::Sense;
use crate::text::Params;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

mod discovery;
mod receive;

pub use discovery::discover;
use receive::handle;

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
    /// SCSI status (or the response code of a task management function).
    pub status: u8,
    /// Sense data with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data read.
    pub data: Vec<u8>,
    /// Residual count: positive for underflow, negative for overflow.
    pub residual: i64,
}

/// Timeouts and recovery settings of a session.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// A command unanswered this long means the connection is dead.
    pub command: Duration,
    /// Idle time after which a NOP-Out checks the connection.
    pub keepalive: Duration,
    /// A NOP-Out the target has not answered (nothing at all received)
    /// this long after it was sent means the connection is dead. A live
    /// target answers at once, however slow its disk: this catches a
    /// silent link (no reset) long before the command timeout.
    pub ping: Duration,
    /// How long to keep trying to reconnect before failing the commands.
    pub recovery: Duration,
    /// Time allowed for one connect + login attempt.
    pub login: Duration,
    /// After a reconnection, how long writes that were in flight wait
    /// before they are sent again. A target may still carry out a command
    /// of the lost connection that it had already handed to its backing
    /// store (tgtd does: it frees such a task only when its I/O is done),
    /// and the copy sent again, once answered, lets newer writes to the
    /// same blocks go out: without the pause the old copy could land
    /// after them.
    pub settle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command: Duration::from_secs(15),
            keepalive: Duration::from_secs(5),
            ping: Duration::from_secs(15),
            recovery: Duration::from_secs(120),
            login: Duration::from_secs(5),
            settle: Duration::from_secs(1),
        }
    }
}

/// State of one path (portal) of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathState {
    /// Carrying the session now.
    Active,
    /// Not in use; not known to be broken.
    Standby,
    /// The last attempt on it failed, and why.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Scsi,
    Nop,
    Logout,
    Tmf,
}

struct Task {
    kind: Kind,
    done: Option<oneshot::Sender<Result<Reply>>>,
    lun: u16,
    cdb: [u8; 16],
    data: Data,
    read: Vec<u8>,
    /// Issue order, for reissuing after a reconnect.
    order: u64,
    /// When it was last sent (None while in the backlog).
    sent: Option<Instant>,
    /// TMF: the referenced task; immediate PDUs only.
    referenced: u32,
}

struct State {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// The connection's sending side, written directly while nothing is
    /// queued for the writer task.
    wr: Option<Arc<tokio::net::tcp::OwnedWriteHalf>>,
    /// Frames handed to the writer task and not yet on the wire.
    queued: usize,
    generation: u64,
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    next_order: u64,
    tasks: HashMap<u32, Task>,
    backlog: VecDeque<u32>,
    last_rx: Instant,
    recovering: bool,
    closed: Option<String>,
    portal: usize,
    paths: Vec<PathState>,
    params: Params,
    digests: Digests,
    io: Vec<JoinHandle<()>>,
    reconnects: u64,
    /// Reconnections after which writes waited [`Timeouts::settle`].
    settles: u64,
}

struct Inner {
    portals: Vec<String>,
    cfg: LoginConfig,
    timeouts: Timeouts,
    state: Mutex<State>,
}

/// An open session to one target, over one of its portals at a time.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({} at {:?})", self.target(), self.inner.portals)
    }
}

async fn connect_login(
    portal: &str,
    cfg: &LoginConfig,
    limit: Duration,
) -> Result<(TcpStream, String, login::Logged)> {
    let attempt = async {
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
                Outcome::Done(l) => return Ok((stream, portal, l)),
            }
        }
        Err(Error::Protocol {
            portal: portal.clone(),
            what: "more than 4 login redirects".into(),
        })
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            portal: portal.into(),
            what: "connect and login".into(),
            secs: limit.as_secs(),
        }),
    }
}

impl Session {
    /// Connects to `portal` and logs in (following redirects).
    pub async fn connect(portal: &str, cfg: &LoginConfig) -> Result<Session> {
        Session::connect_paths(&[portal.to_string()], cfg, Timeouts::default()).await
    }

    /// Connects through the first portal of `portals` that works; the
    /// others are standby paths the session moves to when its path fails.
    pub async fn connect_paths(
        portals: &[String],
        cfg: &LoginConfig,
        timeouts: Timeouts,
    ) -> Result<Session> {
        if portals.is_empty() {
            return Err(Error::Invalid("a session needs at least one portal".into()));
        }
        let mut paths = vec![PathState::Standby; portals.len()];
        let mut last = None;
        for (i, p) in portals.iter().enumerate() {
            match connect_login(p, cfg, timeouts.login).await {
                Ok((stream, _, l)) => {
                    paths[i] = PathState::Active;
                    let (tx, _) = mpsc::unbounded_channel();
                    let wr = None;
                    let queued = 0;
                    let digests = Digests {
                        header: l.params.header_digest,
                        data: l.params.data_digest,
                    };
                    let inner = Arc::new(Inner {
                        portals: portals.to_vec(),
                        cfg: cfg.clone(),
                        timeouts: timeouts.clone(),
                        state: Mutex::new(State {
                            tx,
                            wr,
                            queued,
                            generation: 0,
                            cmd_sn: l.cmd_sn,
                            exp_cmd_sn: l.cmd_sn,
                            max_cmd_sn: l.max_cmd_sn,
                            exp_stat_sn: l.exp_stat_sn,
                            next_itt: 1,
                            next_order: 0,
                            tasks: HashMap::new(),
                            backlog: VecDeque::new(),
                            last_rx: Instant::now(),
                            recovering: false,
                            closed: None,
                            portal: i,
                            paths,
                            params: l.params,
                            digests,
                            io: Vec::new(),
                            reconnects: 0,
                            settles: 0,
                        }),
                    });
                    {
                        let mut st = lock(&inner)?;
                        attach(&inner, &mut st, stream);
                    }
                    tokio::spawn(watchdog(Arc::downgrade(&inner)));
                    return Ok(Session { inner });
                }
                Err(e) => {
                    paths[i] = PathState::Failed(e.to_string());
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Invalid("no portal".into())))
    }

    /// The negotiated parameters of the current connection.
    pub fn params(&self) -> Params {
        self.inner
            .state
            .lock()
            .map(|s| s.params.clone())
            .unwrap_or_default()
    }

    /// The portal carrying the session now.
    pub fn portal(&self) -> &str {
        let i = self.inner.state.lock().map(|s| s.portal).unwrap_or(0);
        self.inner.portals.get(i).map_or("", String::as_str)
    }

    /// Every portal with its state.
    pub fn paths(&self) -> Vec<(String, PathState)> {
        let st = self.inner.state.lock();
        let states = st.map(|s| s.paths.clone()).unwrap_or_default();
        self.inner.portals.iter().cloned().zip(states).collect()
    }

    /// How many times the session was reinstated after a failure.
    pub fn reconnects(&self) -> u64 {
        self.inner.state.lock().map(|s| s.reconnects).unwrap_or(0)
    }

    /// Reconnections after which in-flight writes waited for the target
    /// to settle before they were sent again.
    pub fn settles(&self) -> u64 {
        self.inner.state.lock().map(|s| s.settles).unwrap_or(0)
    }

    /// The target's name.
    pub fn target(&self) -> &str {
        self.inner.cfg.target.as_deref().unwrap_or("")
    }

    /// Why the session closed, if it has.
    pub fn closed(&self) -> Option<String> {
        self.inner.state.lock().ok().and_then(|s| s.closed.clone())
    }

    /// Runs one SCSI command on `lun`.
    pub async fn command(&self, lun: u16, cdb: [u8; 16], data: Data) -> Result<Reply> {
        let rx = submit(&self.inner, Kind::Scsi, lun, cdb, data, 0)?;
        self.wait(rx).await
    }

    async fn wait(&self, rx: oneshot::Receiver<Result<Reply>>) -> Result<Reply> {
        rx.await.unwrap_or_else(|_| Err(closed_err(&self.inner)))
    }

    /// NOP-Out ping: a round trip to the target.
    pub async fn ping(&self) -> Result<()> {
        let rx = submit(&self.inner, Kind::Nop, 0, [0; 16], Data::None, 0)?;
        self.wait(rx).await.map(drop)
    }

    /// Task management: ABORT TASK (`function` 1, `referenced` = its ITT)
    /// or LOGICAL UNIT RESET (`function` 5). Returns the response code
    /// (0: function complete).
    pub async fn task_management(&self, lun: u16, function: u8, referenced: u32) -> Result<u8> {
        let mut cdb = [0u8; 16];
        cdb[0] = function;
        let rx = submit(&self.inner, Kind::Tmf, lun, cdb, Data::None, referenced)?;
        self.wait(rx).await.map(|r| r.status)
    }

    /// Logs out (closing the session) and waits for the answer.
    pub async fn logout(&self) -> Result<()> {
        let rx = submit(&self.inner, Kind::Logout, 0, [0; 16], Data::None, 0)?;
        let r = self.wait(rx).await;
        close(&self.inner, "logged out".into());
        r.map(drop)
    }

    /// Drops the current connection as if the network had failed (for
    /// fault tests and for an operator's "reconnect now").
    pub fn drop_connection(&self) {
        let gen = self.inner.state.lock().map(|s| s.generation).unwrap_or(0);
        connection_lost(&self.inner, gen, "dropped on request".into());
    }

    /// Commands in flight or waiting for the window.
    pub fn in_flight(&self) -> usize {
        self.inner.state.lock().map(|s| s.tasks.len()).unwrap_or(0)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The last handle closes the connection (the I/O tasks and the
        // watchdog only hold weak references).
        if Arc::strong_count(&self.inner) == 1 {
            close(&self.inner, "session dropped".into());
        }
    }
}

/// Registers a task and sends it (a command through the backlog and the
/// CmdSN window, an immediate request at once).
fn submit(
    inner: &Inner,
    kind: Kind,
    lun: u16,
    cdb: [u8; 16],
    data: Data,
    referenced: u32,
) -> Result<oneshot::Receiver<Result<Reply>>> {
    let mut st = lock(inner)?;
    if st.closed.is_some() {
        let portal = inner.portals.get(st.portal).cloned().unwrap_or_default();
        return Err(Error::Closed {
            target: inner.cfg.target.clone().unwrap_or_default(),
            portal,
        });
    }
    let itt = take_itt(&mut st);
    let (tx, rx) = oneshot::channel();
    let order = st.next_order;
    st.next_order += 1;
    st.tasks.insert(
        itt,
        Task {
            kind,
            done: Some(tx),
            lun,
            cdb,
            data,
            read: Vec::new(),
            order,
            sent: None,
            referenced,
        },
    );
    if kind == Kind::Scsi {
        st.backlog.push_back(itt);
        pump(&mut st);
    } else if !st.recovering {
        send_immediate(&mut st, itt);
    }
    Ok(rx)
}

fn lock(inner: &Inner) -> Result<std::sync::MutexGuard<'_, State>> {
    inner
        .state
        .lock()
        .map_err(|_| Error::Invalid("session state lock poisoned".into()))
}

fn closed_err(inner: &Inner) -> Error {
    let portal = inner
        .state
        .lock()
        .ok()
        .and_then(|s| inner.portals.get(s.portal).cloned())
        .unwrap_or_default();
    Error::Closed {
        target: inner.cfg.target.clone().unwrap_or_default(),
        portal,
    }
}

fn take_itt(st: &mut State) -> u32 {
    loop {
        let itt = st.next_itt;
        st.next_itt = st.next_itt.wrapping_add(1);
        if itt != NO_TAG && itt != 0 && !st.tasks.contains_key(&itt) {
            return itt;
        }
    }
}

/// Wires a freshly logged-in connection into the session.
fn attach(inner: &Arc<Inner>, st: &mut State, stream: TcpStream) {
    for h in st.io.drain(..) {
        h.abort();
    }
    let (rd, wr) = stream.into_split();
    let wr = Arc::new(wr);
    let (tx, rx) = mpsc::unbounded_channel();
    st.tx = tx;
    st.wr = Some(Arc::clone(&wr));
    st.queued = 0;
    st.generation += 1;
    st.last_rx = Instant::now();
    let gen = st.generation;
    let portal = inner.portals.get(st.portal).cloned().unwrap_or_default();
    st.io.push(tokio::spawn(writer(
        wr,
        rx,
        portal,
        Arc::downgrade(inner),
        gen,
    )));
    st.io
        .push(tokio::spawn(reader(rd, Arc::downgrade(inner), gen)));
}

/// Sends commands from the backlog while the CmdSN window allows.
fn pump(st: &mut State) {
    if st.recovering || st.closed.is_some() {
        return;
    }
    while let Some(&itt) = st.backlog.front() {
        if !sn_le(st.cmd_sn, st.max_cmd_sn) {
            return;
        }
        st.backlog.pop_front();
        let cmd_sn = st.cmd_sn;
        st.cmd_sn = st.cmd_sn.wrapping_add(1);
        let frame = {
            let (p, d, exp) = (st.params.clone(), st.digests, st.exp_stat_sn);
            let Some(t) = st.tasks.get_mut(&itt) else {
                continue;
            };
            t.sent = Some(Instant::now());
            t.read.clear();
            command_frame(itt, cmd_sn, exp, t, &p, d)
        };
        send(st, frame);
    }
}

/// The SCSI Command PDU of a task, with its immediate data and the
/// unsolicited Data-Out PDUs the session's parameters allow.
fn command_frame(
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    t: &Task,
    p: &Params,
    d: Digests,
) -> Vec<u8> {
    let mut pdu = Pdu::new(op::SCSI_CMD, false);
    pdu.set_lun(t.lun);
    pdu.set_itt(itt);
    pdu.set_u32(24, cmd_sn);
    pdu.set_u32(28, exp_stat_sn);
    pdu.bhs[32..48].copy_from_slice(&t.cdb);
    let mut flags = 0x80 | 0x01; // F, simple task attribute
    let mut unsolicited = Vec::new();
    match &t.data {
        Data::None => {}
        Data::In(n) => {
            flags |= 0x40;
            pdu.set_u32(20, *n as u32);
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
                    t.lun,
                    NO_TAG,
                    exp_stat_sn,
                    buf,
                    sent,
                    burst - sent,
                    p.max_send_data as usize,
                );
            }
        }
    }
    pdu.set_flags(flags);
    let mut frame = pdu.encode(d);
    for u in unsolicited {
        frame.extend_from_slice(&u.encode(d));
    }
    frame
}

/// Sends an immediate PDU (NOP-Out, task management, logout).
fn send_immediate(st: &mut State, itt: u32) {
    let (cmd_sn, exp) = (st.cmd_sn, st.exp_stat_sn);
    let d = st.digests;
    let Some(t) = st.tasks.get_mut(&itt) else {
        return;
    };
    t.sent = Some(Instant::now());
    let mut pdu = match t.kind {
        Kind::Nop => {
            let mut p = Pdu::new(op::NOP_OUT, true);
            p.set_u32(20, NO_TAG);
            p
        }
        Kind::Tmf => {
            let mut p = Pdu::new(op::TASK_MGMT, true);
            p.set_lun(t.lun);
            p.set_u32(20, t.referenced);
            p.set_u32(32, cmd_sn);
            p
        }
        Kind::Logout => Pdu::new(op::LOGOUT, true),
        Kind::Scsi => return,
    };
    pdu.set_flags(
        0x80 | if t.kind == Kind::Tmf {
            t.cdb[0] & 0x7f
        } else {
            0
        },
    );
    pdu.set_itt(itt);
    pdu.set_u32(24, cmd_sn);
    pdu.set_u32(28, exp);
    let frame = pdu.encode(d);
    send(st, frame);
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

/// Sends a frame: straight to the socket when nothing is queued and the
/// socket takes it all (no task switch on the way), else through the
/// writer task, which keeps the order.
fn send(st: &mut State, mut frame: Vec<u8>) {
    if st.queued == 0 {
        if let Some(wr) = &st.wr {
            match wr.try_write(&frame) {
                Ok(n) if n == frame.len() => return,
                Ok(n) => {
                    frame.drain(..n);
                }
                // WouldBlock, or a broken connection the writer task will
                // report.
                Err(_) => {}
            }
        }
    }
    st.queued += 1;
    let _ = st.tx.send(frame);
}

async fn writer(
    wr: Arc<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    portal: String,
    inner: std::sync::Weak<Inner>,
    gen: u64,
) {
    while let Some(mut frame) = rx.recv().await {
        // Coalesce what is queued into one write.
        let mut frames = 1;
        while frame.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(more) => {
                    frame.extend_from_slice(&more);
                    frames += 1;
                }
                Err(_) => break,
            }
        }
        let mut at = 0;
        let mut failed = None;
        while at < frame.len() {
            if let Err(e) = wr.writable().await {
                failed = Some(e);
                break;
            }
            match wr.try_write(&frame[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let Some(i) = inner.upgrade() else { return };
        if let Some(e) = failed {
            tracing::warn!(portal = %portal, error = %e, "iSCSI send failed");
            connection_lost(&i, gen, format!("sending to {portal}: {e}"));
            return;
        }
        if let Ok(mut st) = i.state.lock() {
            if st.generation == gen {
                st.queued = st.queued.saturating_sub(frames);
            }
        };
    }
}

async fn reader(rd: tokio::net::tcp::OwnedReadHalf, inner: std::sync::Weak<Inner>, gen: u64) {
    // Buffered: most PDUs are a header and a little data, read in one
    // system call together with those queued behind them. The buffer is
    // small on purpose: the rest of a large data segment bypasses it and
    // lands in its own buffer without a copy.
    let mut rd = tokio::io::BufReader::with_capacity(16 * 1024, rd);
    // What this connection negotiated at login: fixed for its life (a new
    // login is a new generation, with a reader of its own).
    let (digests, max, portal) = {
        let Some(i) = inner.upgrade() else { return };
        let Ok(st) = i.state.lock() else { return };
        (
            st.digests,
            st.params.max_recv_data as usize,
            i.portals.get(st.portal).cloned().unwrap_or_default(),
        )
    };
    loop {
        let got = read_pdu(&mut rd, digests, max, &portal).await;
        let Some(i) = inner.upgrade() else { return };
        let result = got.and_then(|p| handle(&i, gen, p));
        if let Err(e) = result {
            tracing::warn!(portal = %portal, error = %e, "iSCSI connection failed");
            connection_lost(&i, gen, e.to_string());
            return;
        }
    }
}

/// Checks the connection: a NOP-Out when idle, and a dead connection when
/// a task waits too long.
async fn watchdog(inner: std::sync::Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.timeouts.keepalive.min(i.timeouts.ping) / 2)
            .clamp(Duration::from_millis(20), Duration::from_millis(250)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    let mut last_ping = Instant::now();
    // A NOP-Out sent and not answered yet (nothing received since).
    let mut unanswered: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(i) = inner.upgrade() else { return };
        let mut lost = None;
        let mut ping = false;
        {
            let Ok(st) = i.state.lock() else { return };
            if st.closed.is_some() {
                return;
            }
            if st.recovering {
                unanswered = None;
                continue;
            }
            let now = Instant::now();
            let quiet = now.duration_since(st.last_rx);
            if unanswered.is_some_and(|p| st.last_rx >= p) {
                unanswered = None;
            }
            if let Some(p) = unanswered.filter(|p| now.duration_since(*p) > i.timeouts.ping) {
                unanswered = None;
                lost = Some((
                    st.generation,
                    format!(
                        "no answer to a NOP-Out in {:.1} s (nothing received for {:.1} s)",
                        now.duration_since(p).as_secs_f64(),
                        quiet.as_secs_f64()
                    ),
                ));
            } else if let Some(old) = st.tasks.values().filter_map(|t| t.sent).min() {
                if now.duration_since(old) > i.timeouts.command && quiet > i.timeouts.command {
                    lost = Some((
                        st.generation,
                        format!(
                            "no answer from the target in {:.1} s",
                            i.timeouts.command.as_secs_f64()
                        ),
                    ));
                } else if quiet > i.timeouts.keepalive
                    && now.duration_since(last_ping) > i.timeouts.keepalive
                {
                    // Commands are out but the connection is quiet: a
                    // target that is alive answers a NOP-Out at once even
                    // while a slow command runs, so only a dead connection
                    // stays quiet for the command timeout.
                    ping = true;
                }
            } else if quiet > i.timeouts.keepalive {
                ping = true;
            }
        }
        if let Some((gen, why)) = lost {
            connection_lost(&i, gen, why);
        } else if ping {
            // Fire and forget: the answer (or its absence, which the check
            // above notices) is what matters.
            last_ping = Instant::now();
            if unanswered.is_none() {
                unanswered = Some(last_ping);
            }
            let _ = submit(&i, Kind::Nop, 0, [0; 16], Data::None, 0);
        }
    }
}

/// Marks the session closed and fails every task.
fn close(inner: &Inner, why: String) {
    let tasks = match inner.state.lock() {
        Ok(mut st) => {
            if st.closed.is_none() {
                st.closed = Some(why);
            }
            for h in st.io.drain(..) {
                h.abort();
            }
            st.backlog.clear();
            std::mem::take(&mut st.tasks)
        }
        Err(_) => return,
    };
    for (_, mut t) in tasks {
        if let Some(d) = t.done.take() {
            let _ = d.send(Err(closed_err(inner)));
        }
    }
}

/// The connection of generation `gen` failed: start recovery (once).
fn connection_lost(inner: &Arc<Inner>, gen: u64, why: String) {
    let failed_immediate = {
        let Ok(mut st) = inner.state.lock() else {
            return;
        };
        if st.generation != gen || st.recovering || st.closed.is_some() {
            return;
        }
        st.recovering = true;
        let p = st.portal;
        if let Some(s) = st.paths.get_mut(p) {
            *s = PathState::Failed(why.clone());
        }
        for h in st.io.drain(..) {
            h.abort();
        }
        // Immediate requests do not survive a reconnect; commands do.
        let gone: Vec<u32> = st
            .tasks
            .iter()
            .filter(|(_, t)| t.kind != Kind::Scsi)
            .map(|(&k, _)| k)
            .collect();
        gone.into_iter()
            .filter_map(|k| st.tasks.remove(&k))
            .collect::<Vec<_>>()
    };
    for mut t in failed_immediate {
        if let Some(d) = t.done.take() {
            let _ = d.send(Err(closed_err(inner)));
        }
    }
    tracing::warn!(reason = %why, "iSCSI connection lost; reinstating the session");
    tokio::spawn(recover(Arc::clone(inner)));
}

async fn recover(inner: Arc<Inner>) {
    let deadline = Instant::now() + inner.timeouts.recovery;
    let n = inner.portals.len();
    let start = inner.state.lock().map(|s| s.portal).unwrap_or(0);
    let mut pause = Duration::from_millis(50);
    let mut attempt = 0usize;
    loop {
        if inner
            .state
            .lock()
            .map(|s| s.closed.is_some())
            .unwrap_or(true)
        {
            return;
        }
        // The current path first, then the others in turn.
        let idx = (start + attempt) % n;
        attempt += 1;
        match connect_login(&inner.portals[idx], &inner.cfg, inner.timeouts.login).await {
            Ok((stream, _, l)) => {
                let Some((gen, settle)) = reinstate(&inner, idx, stream, l) else {
                    return;
                };
                tokio::time::sleep(settle).await;
                let Ok(mut st) = inner.state.lock() else {
                    return;
                };
                if st.generation == gen && st.closed.is_none() {
                    st.recovering = false;
                    pump(&mut st);
                }
                return;
            }
            Err(e) => {
                if let Ok(mut st) = inner.state.lock() {
                    if let Some(p) = st.paths.get_mut(idx) {
                        *p = PathState::Failed(e.to_string());
                    }
                }
                if Instant::now() >= deadline {
                    close(&inner, format!("could not reinstate the session: {e}"));
                    return;
                }
                if attempt % n == 0 {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Puts the session on the new connection `stream` (logged in on portal
/// `idx`) and queues every unanswered command again, oldest first. Gives
/// the generation and how long to wait before sending when writes were
/// among them (None: sent already, or the session is gone).
fn reinstate(
    inner: &Arc<Inner>,
    idx: usize,
    stream: TcpStream,
    l: login::Logged,
) -> Option<(u64, Duration)> {
    let Ok(mut st) = inner.state.lock() else {
        return None;
    };
    if st.closed.is_some() {
        return None;
    }
    st.portal = idx;
    for (i, p) in st.paths.iter_mut().enumerate() {
        if i == idx {
            *p = PathState::Active;
        } else if *p == PathState::Active {
            *p = PathState::Standby;
        }
    }
    st.cmd_sn = l.cmd_sn;
    st.exp_cmd_sn = l.cmd_sn;
    st.max_cmd_sn = l.max_cmd_sn;
    st.exp_stat_sn = l.exp_stat_sn;
    st.digests = Digests {
        header: l.params.header_digest,
        data: l.params.data_digest,
    };
    st.params = l.params;
    st.reconnects += 1;
    attach(inner, &mut st, stream);
    // Every unanswered command again, oldest first, ahead of
    // those still waiting to be sent.
    let mut sent: Vec<(u64, u32)> = st
        .tasks
        .iter()
        .filter(|(k, t)| t.sent.is_some() && !st.backlog.contains(k))
        .map(|(&k, t)| (t.order, k))
        .collect();
    sent.sort_unstable();
    let writes = sent
        .iter()
        .filter(|(_, k)| {
            st.tasks
                .get(k)
                .is_some_and(|t| matches!(t.data, Data::Out(_)))
        })
        .count();
    for (_, itt) in sent.into_iter().rev() {
        if let Some(t) = st.tasks.get_mut(&itt) {
            t.sent = None;
        }
        st.backlog.push_front(itt);
    }
    tracing::info!(portal = %inner.portals[idx], reissued = st.backlog.len(), "iSCSI session reinstated");
    let settle = inner.timeouts.settle;
    if writes == 0 || settle.is_zero() {
        st.recovering = false;
        pump(&mut st);
        return None;
    }
    // Still "recovering": new commands queue behind the
    // reissued ones and the watchdog leaves the idle
    // connection alone.
    st.settles += 1;
    tracing::info!(
        writes,
        "iSCSI: the lost connection's writes go out again in {} ms \
         (the target may still be finishing the old copies)",
        settle.as_millis()
    );
    Some((st.generation, settle))
}
