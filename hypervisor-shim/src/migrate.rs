//! Save/restore and live migration over the state stream.
//!
//! Live migration (the source side, [`migrate`]):
//! 1. send `Hello` and wait for the target's `Ready` (it has built its VM,
//!    so that time is not downtime); switch on KVM's dirty log (the VMM's own writes are in
//!    the memory bitmap already);
//! 2. round 0 sends every page that is not zero (the target's memory starts
//!    zeroed); each later round takes the dirty pages since the previous
//!    one, ORs them into a pending set, and sends the pending pages, clearing
//!    a page's bit only once its frame is written, so a failed send loses
//!    nothing;
//! 3. when the pending set would go in less than the downtime limit at the
//!    bandwidth measured in the last round, and further rounds no longer
//!    halve it (or it would take under a twentieth of the limit); rounds
//!    that stop shrinking while above the limit throttle the vCPUs
//!    (auto-converge). Then the vCPUs are paused, the last dirty pages, the devices, the VM and the
//!    vCPU state go, then `End`;
//! 4. the target checks everything, restores, and answers `Ack`; the source
//!    runs its hand-over hook (the cluster moves the disk's write lease
//!    there), sends `Go`, and the target resumes the guest and answers
//!    `Resumed`.
//!
//! Until the `Ack` arrives, any failure (the connection drops, the target
//! refuses the state, a timeout) resumes the guest on the source as if
//! nothing happened. After `Go` the source never resumes: if `Resumed` does
//! not arrive, the outcome is reported as unknown rather than risking the
//! guest running twice.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stream::{
    self, DeviceState, End, Hello, Kind, PagesHead, Status, StreamError, VcpuState, VmState,
    MAX_PAGES_PER_FRAME, PAGE,
};
use crate::vm::{RunState, Vm, VmConfig, VmError};

/// Errors of save, restore and migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The state stream.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A file or a socket.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The target's address names no host.
    #[error("{0}: no address")]
    NoAddress(String),
    /// A live migration needs the target's token.
    #[error("the target's migration token is missing")]
    NoToken,
    /// The target said no.
    #[error("the target refused the migration: {0}")]
    Refused(String),
    /// The other side broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// One side gave up.
    #[error("migration aborted: {0}")]
    Aborted(String),
    /// The caller's switch-over step failed: the guest resumes here.
    #[error("migration aborted: the switch-over failed")]
    SwitchOver(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A migration token's text is not 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a migration token is 64 hex digits")]
pub struct TokenError;

type Result<T> = std::result::Result<T, MigrateError>;

/// Options of a live migration.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Longest acceptable pause of the guest.
    pub downtime_limit: Duration,
    /// Give up (and stay on the source) after this long.
    pub timeout: Duration,
    /// Rounds after which the vCPUs are throttled if the dirty set does not
    /// shrink.
    pub throttle_after: u32,
    /// Ask both sides for a CRC of all guest memory at the switch-over
    /// (costs downtime: the target hashes before it resumes).
    pub verify_memory: bool,
    /// The target's migration token (it refuses a connection without it).
    pub token: Option<Token>,
}

/// A target's migration token: 32 random bytes its starter gives it and
/// the source (over the authenticated cluster RPC); a connection that does
/// not open with it is closed before any of its bytes is parsed.
pub type Token = [u8; 32];

/// What a migration connection opens with: this, then the token.
const AUTH_MAGIC: &[u8; 8] = b"CSVMIGT1";

/// A token from its 64 hex digits.
pub fn parse_token(hex: &str) -> std::result::Result<Token, TokenError> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError);
    }
    let mut t = [0u8; 32];
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| TokenError)?;
    }
    Ok(t)
}

/// A new random token (from the kernel's random source).
pub fn new_token() -> std::io::Result<Token> {
    use std::io::Read;
    let mut t = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut t)?;
    Ok(t)
}

/// A token's 64 hex digits.
pub fn token_hex(t: &Token) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime_limit: Duration::from_millis(100),
            timeout: Duration::from_secs(120),
            throttle_after: 5,
            verify_memory: false,
            token: None,
        }
    }
}

/// Progress of a migration, reported after every round.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub round: u32,
    pub pages_sent: u64,
    pub dirty_pages: u64,
    pub bandwidth_mib_s: f64,
    pub estimated_downtime_ms: f64,
    pub throttle_pct: u32,
}

/// What a finished migration (or save) did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub rounds: u32,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub memory_crc_source: Option<u32>,
    pub memory_crc_target: Option<u32>,
    pub heartbeat_seq: u64,
    /// Connecting and the target building its VM.
    pub setup_ms: f64,
    /// The first round (all memory that is not zero).
    pub first_round_ms: f64,
    /// How long the paused guest waited for the switch-over (the disk's
    /// write lease handed over), from the engine's pause before it to the
    /// go after it; part of the downtime.
    #[serde(default)]
    pub switchover_ms: f64,
}

struct Sender<'a, W: Write> {
    vm: &'a Vm,
    w: W,
    buf: Vec<u8>,
    bytes: u64,
    pages: u64,
    zero_pages: u64,
}

impl<'a, W: Write> Sender<'a, W> {
    /// A sender of `vm`'s state into `w` (buffered).
    fn new(vm: &'a Vm, w: W) -> Sender<'a, BufWriter<W>> {
        Sender {
            vm,
            w: BufWriter::with_capacity(1 << 20, w),
            buf: Vec::new(),
            bytes: 0,
            pages: 0,
            zero_pages: 0,
        }
    }

    fn frame(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<()> {
        stream::write_frame(&mut self.w, kind, parts)?;
        self.bytes += 12 + parts.iter().map(|p| p.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Sends every page of memory that is not zero (the first round and a
    /// save file). Pages the host never backed (neither present nor swapped
    /// in /proc/self/pagemap) were never written and are skipped without
    /// being read, which spares a page fault for each of them.
    fn send_all(&mut self) -> Result<()> {
        let total = self.vm.mem_bytes() / PAGE;
        let backed = backed_pages(self.vm);
        let mut p = 0;
        while p < total {
            let Some(map) = &backed else {
                return self.send_run(0, total, true);
            };
            if !map[p as usize] {
                self.zero_pages += 1;
                self.pages += 1;
                p += 1;
                continue;
            }
            let start = p;
            while p < total && map[p as usize] {
                p += 1;
            }
            self.send_run(start, p - start, true)?;
        }
        Ok(())
    }

    /// The stream's header and its `Hello` frame.
    fn hello(&mut self) -> Result<()> {
        stream::write_header(&mut self.w)?;
        let hello = Hello {
            mem_bytes: self.vm.mem_bytes(),
            vcpus: self.vm.config.vcpus,
            guest: 1,
        };
        self.frame(Kind::Hello, &[&hello.encode()])
    }

    /// Sends pages `first..first + count` (one run).
    fn send_run(&mut self, first: u64, count: u64, skip_zero: bool) -> Result<()> {
        let (base, _) = self.vm.host_memory();
        let mut p = first;
        let end = first + count;
        while p < end {
            let n = (end - p).min(u64::from(MAX_PAGES_PER_FRAME));
            let len = (n * PAGE) as usize;
            // SAFETY: pages p..p+n are inside guest memory (callers pass
            // runs within mem_bytes / 4096 pages). The guest may write them
            // while we read; such a page is in the next round's dirty log,
            // and the last round reads with the vCPUs paused.
            let src = unsafe {
                std::slice::from_raw_parts(base.add((p * PAGE) as usize) as *const u8, len)
            };
            if is_zero(src) {
                self.zero_pages += n;
                if !skip_zero {
                    let head = PagesHead {
                        gpa: p * PAGE,
                        count: n as u32,
                        zero: true,
                    };
                    self.frame(Kind::Pages, &[&head.encode()])?;
                }
                self.pages += n;
                p += n;
                continue;
            }
            // Straight from guest memory, with a CRC per page: a page the
            // guest changes between its CRC and the socket's copy arrives
            // damaged, is set aside by the receiver, and is sent again (the
            // change put it in the dirty log).
            self.buf.clear();
            for page in src.chunks_exact(PAGE as usize) {
                self.buf
                    .extend_from_slice(&crc32fast::hash(page).to_le_bytes());
            }
            let head = PagesHead {
                gpa: p * PAGE,
                count: n as u32,
                zero: false,
            };
            stream::write_pages_frame(&mut self.w, &head, &self.buf, src)?;
            self.bytes += 12 + PagesHead::LEN as u64 + self.buf.len() as u64 + len as u64;
            self.pages += n;
            p += n;
        }
        Ok(())
    }

    /// Sends every page whose bit is set in `pending`, clearing bits as
    /// their frames are written. Returns the number of pages sent.
    fn send_pending(&mut self, pending: &mut [u64]) -> Result<u64> {
        let mut sent = 0;
        let total = (self.vm.mem_bytes() / PAGE) as usize;
        let mut i = 0;
        while i < total {
            let w = pending[i / 64];
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            if w & (1 << (i % 64)) == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < total
                && i - start < MAX_PAGES_PER_FRAME as usize
                && pending[i / 64] & (1 << (i % 64)) != 0
            {
                i += 1;
            }
            self.send_run(start as u64, (i - start) as u64, false)?;
            for j in start..i {
                pending[j / 64] &= !(1 << (j % 64));
            }
            sent += (i - start) as u64;
        }
        Ok(sent)
    }

    fn send_state(&mut self) -> Result<()> {
        let dev = self.vm.device_state().encode();
        self.frame(Kind::Devices, &[&dev])?;
        let vm_state = self.vm.vm_state()?.encode();
        self.frame(Kind::VmState, &[&vm_state])?;
        for c in self.vm.vcpu_states()? {
            self.frame(Kind::VcpuState, &[&c.encode()])?;
        }
        Ok(())
    }
}

/// A short status frame (`Ready`, `Ack`, `Go`, `Resumed`, `Abort`).
fn send_status(
    w: &mut impl Write,
    kind: Kind,
    ok: bool,
    memory_crc: Option<u32>,
    message: String,
) -> Result<()> {
    let st = Status {
        ok,
        memory_crc,
        message,
    };
    stream::write_frame(w, kind, &[&st.encode()])?;
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// For each page of guest memory, whether the host has ever backed it
/// (present or swapped, from /proc/self/pagemap); `None` when the pagemap
/// cannot be read, and then every page is read.
fn backed_pages(vm: &Vm) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let (base, len) = vm.host_memory();
    let pages = len / PAGE as usize;
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; 8 * 65536];
    let mut done = 0usize;
    while done < pages {
        let n = (pages - done).min(65536);
        let off = ((base as usize / PAGE as usize) + done) as u64 * 8;
        f.read_exact_at(&mut buf[..n * 8], off).ok()?;
        for e in buf[..n * 8].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            let v = u64::from_le_bytes(b);
            // Bit 63: present; bit 62: swapped.
            out.push(v & (3 << 62) != 0);
        }
        done += n;
    }
    Some(out)
}

/// Raises the calling thread's scheduling priority for the length of a
/// migration: the guest's vCPUs keep running meanwhile and would otherwise
/// get an equal share of the CPU with the thread that moves their memory.
/// Without the privilege (CAP_SYS_NICE) it changes nothing.
fn boost_this_thread() -> impl Drop {
    struct Restore(i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: setpriority on the calling thread's own tid.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, self.0);
            }
        }
    }
    // SAFETY: getpriority/setpriority on the calling thread's own tid.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        let before = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, -10);
        Restore(before)
    }
}

fn count_bits(b: &[u64]) -> u64 {
    b.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> MigrateError {
    move |source| MigrateError::Io { what, source }
}

/// Saves the VM to `path` (pausing it) for a quick migration; the caller
/// decides whether the guest resumes here or stops.
pub fn save(vm: &Vm, path: &Path) -> Result<Summary> {
    let t0 = Instant::now();
    vm.pause();
    let r = (|| -> Result<Summary> {
        // The restoring host opens the disk afresh: everything written must be on it.
        vm.flush_disk()?;
        let tmp = path.with_extension("partial");
        let f = std::fs::File::create(&tmp).map_err(io("create the save file"))?;
        let mut s = Sender::new(vm, f);
        s.hello()?;
        s.send_all()?;
        s.send_state()?;
        let crc = vm.memory_crc();
        s.frame(
            Kind::End,
            &[&End {
                memory_crc: Some(crc),
            }
            .encode()],
        )?;
        let f =
            s.w.into_inner()
                .map_err(|e| io("write the save file")(e.into_error()))?;
        f.sync_all().map_err(io("sync the save file"))?;
        std::fs::rename(&tmp, path).map_err(io("rename the save file into place"))?;
        let elapsed = t0.elapsed().as_secs_f64() * 1e3;
        Ok(Summary {
            rounds: 1,
            total_ms: elapsed,
            downtime_ms: elapsed,
            bytes: s.bytes,
            pages: s.pages,
            zero_pages: s.zero_pages,
            memory_crc_source: Some(crc),
            memory_crc_target: None,
            heartbeat_seq: vm.heartbeat().seq,
            setup_ms: 0.0,
            first_round_ms: elapsed,
            switchover_ms: 0.0,
        })
    })();
    if r.is_err() {
        vm.resume();
    }
    r
}

/// Live-migrates `vm` to a `csv-vmm incoming` listening at `to`.
/// `handover` runs after the target acknowledged the state and before it
/// is told to resume (the cluster moves the disk's write lease there).
pub fn migrate(
    vm: &Vm,
    to: &str,
    opts: &MigrateOptions,
    mut progress: impl FnMut(&Progress),
    handover: impl FnOnce() -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Summary> {
    let t0 = Instant::now();
    let _boost = boost_this_thread();
    let addr = to
        .to_socket_addrs()
        .map_err(io("resolve the target"))?
        .next()
        .ok_or_else(|| MigrateError::NoAddress(to.to_string()))?;
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(io("connect to the target"))?;
    let _ = conn.set_nodelay(true);
    let token = opts.token.ok_or(MigrateError::NoToken)?;
    let mut auth = AUTH_MAGIC.to_vec();
    auth.extend_from_slice(&token);
    (&conn)
        .write_all(&auth)
        .map_err(io("send the migration token"))?;
    let mut back = conn.try_clone().map_err(io("clone the connection"))?;
    let mut s = Sender::new(vm, conn);
    let pages_total = (vm.mem_bytes() / PAGE) as usize;
    let mut pending = vec![0u64; pages_total.div_ceil(64)];
    let mut paused_at = None;
    let mut acked = false;
    let (mut setup_ms, mut first_round_ms) = (0.0, 0.0);
    let result = (|| -> Result<Summary> {
        s.hello()?;
        s.w.flush().map_err(io("send Hello"))?;
        // The target builds its VM now, so that time is not downtime.
        back.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("set timeout"))?;
        let mut buf = Vec::new();
        match stream::read_frame(&mut back, &mut buf)? {
            Kind::Ready => {}
            Kind::Ack | Kind::Abort => {
                return Err(MigrateError::Refused(Status::decode(&buf)?.message))
            }
            other => {
                return Err(MigrateError::Protocol(format!(
                    "expected Ready, got {}",
                    other.name()
                )))
            }
        }
        setup_ms = t0.elapsed().as_secs_f64() * 1e3;
        vm.set_dirty_log(true)?;
        // Round 0: everything that is not zero.
        let r0 = Instant::now();
        s.send_all()?;
        s.w.flush().map_err(io("send memory"))?;
        let mut round = 0u32;
        let mut round_bytes = s.bytes;
        let mut round_time = r0.elapsed();
        first_round_ms = round_time.as_secs_f64() * 1e3;
        let mut last_dirty = u64::MAX;
        let mut throttle = 0u32;
        loop {
            round += 1;
            vm.take_dirty(&mut pending)?;
            let dirty = count_bits(&pending);
            let bw = round_bytes as f64 / round_time.as_secs_f64().max(1e-6);
            let est = Duration::from_secs_f64(dirty as f64 * PAGE as f64 / bw.max(1.0));
            progress(&Progress {
                round,
                pages_sent: s.pages,
                dirty_pages: dirty,
                bandwidth_mib_s: bw / (1 << 20) as f64,
                estimated_downtime_ms: est.as_secs_f64() * 1e3,
                throttle_pct: throttle,
            });
            // Within the limit, one more round is still worth it while the
            // dirty set keeps shrinking by half or more: the pause is what
            // the guest feels.
            if est <= opts.downtime_limit
                && (est <= opts.downtime_limit / 20
                    || dirty.saturating_mul(2) > last_dirty
                    || round > 10)
            {
                break;
            }
            if t0.elapsed() > opts.timeout {
                return Err(MigrateError::Aborted(format!(
                    "did not converge in {:?} ({dirty} pages dirty per round)",
                    opts.timeout
                )));
            }
            if round >= opts.throttle_after && dirty >= last_dirty / 2 {
                throttle = (throttle + 20).min(95);
                vm.throttle(throttle);
                tracing::info!(throttle, "auto-converge: holding the vCPUs back");
            }
            last_dirty = dirty;
            let before = s.bytes;
            let rt = Instant::now();
            s.send_pending(&mut pending)?;
            s.w.flush().map_err(io("send memory"))?;
            round_bytes = s.bytes - before;
            round_time = rt.elapsed();
        }
        // Stop-and-copy.
        vm.pause();
        paused_at = Some(Instant::now());
        // The target opens the disk before it acknowledges: nothing the
        // guest wrote may be left in this host's caches.
        vm.flush_disk()?;
        vm.take_dirty(&mut pending)?;
        s.send_pending(&mut pending)?;
        s.frame(Kind::Round, &[&round.to_le_bytes()])?;
        s.send_state()?;
        let crc = opts.verify_memory.then(|| vm.memory_crc());
        s.frame(Kind::End, &[&End { memory_crc: crc }.encode()])?;
        s.w.flush().map_err(io("send the final state"))?;
        // Wait for the target's verdict.
        let k = stream::read_frame(&mut back, &mut buf)?;
        let st = Status::decode(&buf)?;
        match k {
            Kind::Ack if st.ok => {}
            Kind::Ack | Kind::Abort => return Err(MigrateError::Refused(st.message)),
            other => {
                return Err(MigrateError::Protocol(format!(
                    "expected Ack, got {}",
                    other.name()
                )))
            }
        }
        acked = true;
        let t_switch = Instant::now();
        handover().map_err(MigrateError::SwitchOver)?;
        let switchover = t_switch.elapsed();
        send_status(&mut s.w, Kind::Go, true, None, String::new())?;
        s.w.flush().map_err(io("send Go"))?;
        let k = stream::read_frame(&mut back, &mut buf)?;
        if k != Kind::Resumed {
            return Err(MigrateError::Protocol(format!(
                "expected Resumed, got {}",
                k.name()
            )));
        }
        let resumed = Status::decode(&buf)?;
        let downtime = paused_at.map(|p| p.elapsed()).unwrap_or_default();
        Ok(Summary {
            rounds: round + 1,
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            bytes: s.bytes,
            pages: s.pages,
            zero_pages: s.zero_pages,
            memory_crc_source: crc,
            memory_crc_target: st.memory_crc.or(resumed.memory_crc),
            heartbeat_seq: vm.heartbeat().seq,
            setup_ms,
            first_round_ms,
            switchover_ms: switchover.as_secs_f64() * 1e3,
        })
    })();
    vm.throttle(0);
    let _ = vm.set_dirty_log(false);
    match &result {
        Ok(_) => vm.finish(RunState::Migrated),
        Err(e) if !acked => {
            tracing::warn!(error = %e, "migration failed; the guest keeps running here");
            let _ = send_status(&mut s.w, Kind::Abort, false, None, e.to_string());
            let _ = s.w.flush();
            vm.resume();
        }
        Err(e) => {
            tracing::error!(error = %e, "migration failed after the target took the state; the guest stays paused here so it never runs twice");
        }
    }
    result
}

/// The receiving side: builds a VM from a stream. With `reply`, it is a
/// live migration (answers `Ack`, waits for `Go`); without, a restore.
struct Receiver {
    vm: Option<Arc<Vm>>,
    mem_bytes: u64,
    devices: Option<DeviceState>,
    vm_state: Option<VmState>,
    vcpus: Vec<VcpuState>,
    pages: u64,
}

impl Receiver {
    fn run(
        r: &mut impl Read,
        mut reply: Option<&mut dyn Write>,
        live: bool,
        config: &VmConfig,
    ) -> Result<(Arc<Vm>, Option<u32>)> {
        stream::read_header(r)?;
        let mut buf = Vec::new();
        let k = stream::read_frame(r, &mut buf)?;
        if k != Kind::Hello {
            return Err(StreamError::Unexpected {
                got: k.name(),
                expected: "Hello",
            }
            .into());
        }
        let hello = Hello::decode(&buf)?;
        let mut cfg = config.clone();
        cfg.mem_bytes = hello.mem_bytes;
        cfg.vcpus = hello.vcpus;
        let vm = Arc::new(Vm::new(cfg)?);
        if let Some(w) = reply.as_mut() {
            send_status(w, Kind::Ready, true, None, String::new())?;
        }
        let mut me = Receiver {
            vm: Some(vm.clone()),
            mem_bytes: hello.mem_bytes,
            devices: None,
            vm_state: None,
            vcpus: Vec::new(),
            pages: 0,
        };
        let (base, len) = vm.host_memory();
        // SAFETY: the mapping is `len` bytes and lives as long as `vm`; no
        // vCPU runs before the stream is complete, so nothing else touches it.
        let memory = unsafe { std::slice::from_raw_parts_mut(base, len) };
        let mut damaged = vec![0u64; (len / PAGE as usize).div_ceil(64)];
        loop {
            let k = stream::read_frame_to_memory(r, &mut buf, memory, &mut damaged)?;
            match k {
                Kind::Pages => {
                    let (head, _) = PagesHead::decode_head(&buf, me.mem_bytes)?;
                    me.pages += u64::from(head.count);
                }
                Kind::Round => {}
                Kind::Devices => me.devices = Some(DeviceState::decode(&buf)?),
                Kind::VmState => me.vm_state = Some(VmState::decode(&buf)?),
                Kind::VcpuState => me.vcpus.push(VcpuState::decode(&buf)?),
                Kind::End => {
                    let end = End::decode(&buf)?;
                    let bad = count_bits(&damaged);
                    if bad > 0 {
                        return Err(MigrateError::Protocol(format!(
                            "{bad} pages arrived damaged (CRC mismatch) and were not sent again"
                        )));
                    }
                    let devices = me.devices.take().ok_or_else(|| {
                        MigrateError::Protocol("stream ended without device state".into())
                    })?;
                    let vm_state = me.vm_state.take().ok_or_else(|| {
                        MigrateError::Protocol("stream ended without VM state".into())
                    })?;
                    me.vcpus.sort_by_key(|c| c.id);
                    vm.restore_vm_state(&vm_state)?;
                    vm.restore_vcpus(&me.vcpus)?;
                    vm.restore_devices(&devices)?;
                    // With the sender's CRC of all memory, ours must match.
                    let crc = match end.memory_crc {
                        Some(want) => {
                            let got = vm.memory_crc();
                            if got != want {
                                return Err(MigrateError::Protocol(format!(
                                    "memory CRC here is {got:08x}, the sender's is {want:08x}"
                                )));
                            }
                            Some(got)
                        }
                        None => None,
                    };
                    // The source flushed the disk before End. A restore
                    // opens it now; a migration target checks that it can
                    // (read-only: the source's host still holds the write
                    // lease until the hand-over) and opens it for writing
                    // after Go.
                    if live {
                        vm.check_disk()?;
                    } else {
                        vm.attach_disk()?;
                    }
                    let vm = me
                        .vm
                        .take()
                        .ok_or_else(|| MigrateError::Protocol("VM gone".into()))?;
                    return Ok((vm, crc));
                }
                Kind::Abort => {
                    let st = Status::decode(&buf).map(|s| s.message).unwrap_or_default();
                    return Err(MigrateError::Aborted(format!("the source gave up: {st}")));
                }
                other => {
                    return Err(StreamError::Unexpected {
                        got: other.name(),
                        expected: "state",
                    }
                    .into())
                }
            }
        }
    }
}

/// Restores a VM saved with [`save`] and starts it.
pub fn restore(path: &Path, config: &VmConfig) -> Result<Arc<Vm>> {
    let f = std::fs::File::open(path).map_err(io("open the save file"))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let (vm, _) = Receiver::run(&mut r, None, false, config)?;
    vm.start()?;
    Ok(vm)
}

/// Waits for one incoming migration on `listener`, restores it, answers the
/// hand-shake and starts the guest.
pub fn incoming(listener: &TcpListener, config: &VmConfig, token: &Token) -> Result<Arc<Vm>> {
    let (conn, peer) = loop {
        let (conn, peer) = listener.accept().map_err(io("accept the migration"))?;
        // The token first, within 5 s; anyone else is turned away and the
        // target goes on waiting for its source.
        let mut got = [0u8; 40];
        let ok = conn.set_read_timeout(Some(Duration::from_secs(5))).is_ok()
            && std::io::Read::read_exact(&mut &conn, &mut got).is_ok()
            && got[..8] == AUTH_MAGIC[..]
            && got[8..]
                .iter()
                .zip(token)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if ok {
            let _ = conn.set_read_timeout(None);
            break (conn, peer);
        }
        tracing::warn!(%peer, "refused an incoming migration: it did not open with this target's token");
        let _ = conn.shutdown(std::net::Shutdown::Both);
    };
    let _boost = boost_this_thread();
    tracing::info!(%peer, "incoming migration");
    let _ = conn.set_nodelay(true);
    let mut w = conn.try_clone().map_err(io("clone the connection"))?;
    let mut r = BufReader::with_capacity(1 << 20, conn);
    let got = Receiver::run(&mut r, Some(&mut w), true, config);
    let (vm, crc) = match got {
        Ok(v) => v,
        Err(e) => {
            let _ = send_status(&mut w, Kind::Ack, false, None, e.to_string());
            return Err(e);
        }
    };
    send_status(&mut w, Kind::Ack, true, crc, String::new())?;
    let mut buf = Vec::new();
    r.get_mut()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io("set timeout"))?;
    let k = stream::read_frame(&mut r, &mut buf)?;
    if k != Kind::Go {
        return Err(MigrateError::Aborted(format!(
            "the source sent {} instead of Go; the guest does not start here",
            k.name()
        )));
    }
    // This host holds the disk's write lease now (the source's caller
    // moved it before Go).
    vm.attach_disk()?;
    vm.start()?;
    send_status(&mut w, Kind::Resumed, true, crc, String::new())?;
    Ok(vm)
}
