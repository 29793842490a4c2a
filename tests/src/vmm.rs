//! `csv-vmm` processes and a heartbeat observer for the VMM tests.
//!
//! [`Vmm`] starts one `csv-vmm` (boot, incoming or restore) with its control
//! socket in a `csvt-` temp directory and kills it on drop. [`Observer`] is
//! the one clock for every VMM of a test: a UDP socket that records each
//! heartbeat datagram (`u64` sequence, `u32` pid) with its arrival time.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hypervisor_shim::control::proto::{Reply, Request, Status};
use hypervisor_shim::control::{Control, ControlError};
use hypervisor_shim::migrate::{Progress, Summary};

/// One heartbeat as the observer saw it.
#[derive(Debug, Clone, Copy)]
pub struct Beat {
    pub seq: u64,
    pub pid: u32,
    pub at: Instant,
}

/// Collects heartbeats from every VMM pointed at it.
#[derive(Debug)]
pub struct Observer {
    pub addr: SocketAddr,
    beats: Arc<Mutex<Vec<Beat>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    pub fn start() -> Result<Observer> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let beats = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, s) = (beats.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if n == 12 {
                        let at = Instant::now();
                        let mut q = [0u8; 8];
                        q.copy_from_slice(&buf[..8]);
                        let mut p = [0u8; 4];
                        p.copy_from_slice(&buf[8..12]);
                        b.lock().unwrap_or_else(|p| p.into_inner()).push(Beat {
                            seq: u64::from_le_bytes(q),
                            pid: u32::from_le_bytes(p),
                            at,
                        });
                    }
                }
            }
        });
        Ok(Observer {
            addr,
            beats,
            stop,
            thread: Some(thread),
        })
    }

    /// Every heartbeat so far, in arrival order.
    pub fn beats(&self) -> Vec<Beat> {
        self.beats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sequence numbers between the first and the last heartbeat seen that
    /// never arrived.
    pub fn missing(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self.beats().iter().map(|b| b.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let mut out = Vec::new();
        for w in seqs.windows(2) {
            out.extend(w[0] + 1..w[1]);
        }
        out
    }

    /// The longest time between two consecutive heartbeats (by arrival).
    pub fn longest_gap(&self) -> Duration {
        self.beats()
            .windows(2)
            .map(|w| w[1].at.duration_since(w[0].at))
            .max()
            .unwrap_or_default()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `csv-vmm` process.
#[derive(Debug)]
pub struct Vmm {
    child: Child,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Vmm {
    /// Starts `csv-vmm <args>` with a control socket `<name>.sock` and a log
    /// `<name>.log` in `dir`, and waits for the socket.
    pub fn spawn(
        dir: &Path,
        name: &str,
        args: &[&str],
        observer: Option<&Observer>,
    ) -> Result<Vmm> {
        let control = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(crate::cmd::workspace_bin("csv-vmm"));
        cmd.args(args).arg("--control").arg(&control).args([
            "--serial",
            &format!("file:{}", dir.join(format!("{name}.serial")).display()),
        ]);
        if let Some(o) = observer {
            cmd.args(["--heartbeat-udp", &o.addr.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start csv-vmm")?;
        let mut v = Vmm {
            child,
            control,
            log,
        };
        let ok = crate::wait_until(Duration::from_secs(10), || {
            v.control.exists() || v.child.try_wait().ok().flatten().is_some()
        });
        if ok.is_err() || !v.control.exists() {
            bail!("csv-vmm {args:?} did not come up: {}", v.log_text());
        }
        Ok(v)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one control request; progress lines go to `on_progress`.
    /// The VMM's refusal is an error ([`ControlError::Refused`]).
    pub fn request(
        &self,
        req: &Request,
        on_progress: impl FnMut(&Progress),
    ) -> std::result::Result<Reply, ControlError> {
        Control::connect(&self.control, None)?.ask(req, on_progress)
    }

    /// Sends a request that must succeed.
    pub fn ok(&self, req: Request) -> Result<Reply> {
        self.request(&req, |_| {})
            .with_context(|| format!("control request {req:?} (log: {})", self.log_text()))
    }

    /// `status` of the VM.
    pub fn status(&self) -> Result<Status> {
        match self.ok(Request::Status)? {
            Reply::Status(s) => Ok(*s),
            other => bail!("status answered {other:?}"),
        }
    }

    /// The summary a `save` or `migrate` answers.
    pub fn summary(&self, req: Request) -> Result<Summary> {
        match self.ok(req)? {
            Reply::Summary(s) => Ok(s),
            other => bail!("answered {other:?}, not a summary"),
        }
    }

    /// Waits until the VM has seen at least `n` heartbeats in this process.
    pub fn wait_heartbeats(&self, n: u64, timeout: Duration) -> Result<()> {
        let r = crate::wait_until(timeout, || {
            self.status()
                .map(|s| s.heartbeat.local_count >= n)
                .unwrap_or(false)
        });
        if r.is_err() {
            bail!(
                "fewer than {n} heartbeats in {timeout:?}: {:?}; log: {}",
                self.status(),
                self.log_text()
            );
        }
        Ok(())
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s.code().unwrap_or(-1));
            }
            if t.elapsed() > timeout {
                bail!("csv-vmm still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.control);
    }
}
