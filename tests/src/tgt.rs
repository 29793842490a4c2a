//! `TgtTarget`: a private `tgtd` (Linux SCSI target framework) for tests.
//!
//! Each fixture runs its own `tgtd` in the foreground on its own portal(s)
//! and its own management socket (`TGT_IPC_SOCKET` in a temp directory), so
//! parallel tests never see each other's targets, and drives it with
//! `tgtadm`. Every `tgtadm` call that changes the configuration is recorded,
//! so [`TgtTarget::restart`] can bring up an identical target after
//! killing the daemon (a SAN outage in a fault test).
//!
//! tgtd ignores SIGTERM; stopping deletes the targets, then asks the daemon
//! to exit (`--op delete --mode system`), and kills it by PID only if it is
//! still there after a grace period.

use crate::cmd;
use crate::netns::NetNs;
use crate::wait::wait_until;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Base of the IQNs of test targets.
pub const IQN_BASE: &str = "iqn.2026-11.io.csv.test";

/// A target created on a [`TgtTarget`]: its tid and IQN.
#[derive(Debug, Clone)]
pub struct Target {
    /// Target id inside tgtd.
    pub tid: u32,
    /// The target's name.
    pub iqn: String,
}

/// One iSCSI connection as tgtd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Session id.
    pub sid: u64,
    /// Connection id within the session.
    pub cid: u64,
    /// Initiator name (IQN) that logged in.
    pub initiator: String,
    /// Initiator's IP address.
    pub ip: String,
}

/// The tgtd process: started by this process, or by the launcher.
#[derive(Debug)]
enum Daemon {
    Child(Child),
    Launched(i32),
}

/// A shell started with the fixture that starts tgtd again on request
/// (one line on its input; it answers the new pid). A restart done here
/// instead would exec tgtd from the test process, whose open files on a
/// csv mount the exec closes: each close is a FUSE flush, which waits for
/// the SAN that is down until tgtd is back (60 s per file: seen as
/// restarts of 60-240 s).
#[derive(Debug)]
struct Launcher {
    sh: Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
}

/// A running `tgtd` with its targets. Stopped on drop.
#[derive(Debug)]
pub struct TgtTarget {
    dir: tempfile::TempDir,
    ipc: PathBuf,
    portals: Vec<SocketAddr>,
    netns: Option<String>,
    child: Option<Daemon>,
    launcher: Option<Launcher>,
    targets: Vec<Target>,
    /// Every configuring `tgtadm` argument list, in order, for `restart`.
    journal: Vec<Vec<String>>,
    /// Initiators refused by `cut_initiator`, per tid.
    cut: Vec<(u32, String)>,
}

impl TgtTarget {
    /// Starts tgtd on a free port of 127.0.0.1.
    pub fn start() -> Result<Self> {
        let mut last = None;
        // A free port can be taken between the probe and tgtd's bind.
        for _ in 0..5 {
            let port = crate::free_port()?;
            match Self::start_on(&[SocketAddr::from(([127, 0, 0, 1], port))], None) {
                Ok(t) => return Ok(t),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no port tried")))
    }

    /// Starts tgtd listening on every portal of `portals`, inside `netns`
    /// when given (the management socket stays reachable from the host).
    pub fn start_on(portals: &[SocketAddr], netns: Option<&NetNs>) -> Result<Self> {
        if portals.is_empty() {
            bail!("tgtd needs at least one portal");
        }
        let dir = crate::temp_dir("tgtd")?;
        let ipc = dir.path().join("mgmt");
        let mut t = TgtTarget {
            ipc,
            portals: portals.to_vec(),
            netns: netns.map(|n| n.name().to_string()),
            child: None,
            launcher: None,
            targets: Vec::new(),
            journal: Vec::new(),
            cut: Vec::new(),
            dir,
        };
        t.spawn()?;
        t.launcher = t.launcher().ok();
        Ok(t)
    }

    /// tgtd's command line.
    fn command_line(&self) -> Vec<String> {
        let mut c: Vec<String> = match &self.netns {
            Some(ns) => ["ip", "netns", "exec", ns, "tgtd"]
                .map(String::from)
                .to_vec(),
            None => vec!["tgtd".into()],
        };
        c.push("-f".into());
        // The pid file is unused in the foreground; its path in the command
        // line lets tools/test.sh find daemons a killed test left behind.
        c.push("--pid-file".into());
        c.push(self.dir.path().join("tgtd.pid").display().to_string());
        for p in &self.portals {
            c.push("--iscsi".into());
            c.push(format!("portal={p}"));
        }
        c
    }

    fn launcher(&self) -> Result<Launcher> {
        let mut sh = Command::new("sh")
            .arg("-c")
            .arg(r#"while read -r _; do "$@" >>"$TGT_LOG" 2>&1 </dev/null & echo $!; done"#)
            .arg("tgtd-launcher")
            .args(self.command_line())
            .env("TGT_IPC_SOCKET", &self.ipc)
            .env("TGT_LOG", self.log_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the tgtd launcher (sh)")?;
        let (Some(input), Some(output)) = (sh.stdin.take(), sh.stdout.take()) else {
            bail!("the tgtd launcher has no pipes");
        };
        Ok(Launcher {
            sh,
            input,
            output: std::io::BufReader::new(output),
        })
    }

    fn spawn(&mut self) -> Result<()> {
        if let Some(l) = self.launcher.as_mut() {
            use std::io::{BufRead, Write};
            writeln!(l.input).context("the tgtd launcher is gone")?;
            let mut line = String::new();
            l.output.read_line(&mut line)?;
            let pid: i32 = line
                .trim()
                .parse()
                .with_context(|| format!("the tgtd launcher answered {line:?}"))?;
            self.child = Some(Daemon::Launched(pid));
        } else {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())?;
            let argv = self.command_line();
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..])
                .env("TGT_IPC_SOCKET", &self.ipc)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let child = c.spawn().context("cannot start tgtd (package `tgt`)")?;
            self.child = Some(Daemon::Child(child));
        }
        let ready = wait_until(Duration::from_secs(10), || {
            self.exited()
                || self
                    .tgtadm_within(&["--op", "show", "--mode", "sys"], Duration::from_secs(2))
                    .is_ok()
        });
        if self.exited() || ready.is_err() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            self.kill();
            bail!("tgtd on {:?} did not come up: {}", self.portals, log.trim());
        }
        Ok(())
    }

    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(Daemon::Child(c)) => !matches!(c.try_wait(), Ok(None)),
            // Gone, or a zombie its launcher has not reaped yet.
            Some(Daemon::Launched(pid)) => std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X']))
                }),
            None => true,
        }
    }

    /// The first portal (the address initiators connect to).
    pub fn portal(&self) -> SocketAddr {
        self.portals[0]
    }

    /// Every portal tgtd listens on.
    pub fn portals(&self) -> &[SocketAddr] {
        &self.portals
    }

    /// tgtd's log file (its stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tgtd.log")
    }

    /// A directory for LUN backing files that lives as long as the fixture.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PID of the running tgtd (of `ip netns exec`, which execs tgtd).
    pub fn pid(&self) -> Option<u32> {
        match self.child.as_ref()? {
            Daemon::Child(c) => Some(c.id()),
            Daemon::Launched(pid) => u32::try_from(*pid).ok(),
        }
    }

    /// Runs `tgtadm --lld iscsi ARGS` against this daemon.
    pub fn tgtadm(&self, args: &[&str]) -> Result<String> {
        self.tgtadm_within(args, Duration::from_secs(20))
    }

    /// [`tgtadm`](Self::tgtadm), killed after `limit`: under load a call
    /// can hang on a tgtd that has just started (seen: three minutes).
    fn tgtadm_within(&self, args: &[&str], limit: Duration) -> Result<String> {
        cmd::run_within(
            Command::new("tgtadm")
                .env("TGT_IPC_SOCKET", &self.ipc)
                .args(["--lld", "iscsi"])
                .args(args),
            limit,
        )
    }

    /// Runs a configuring `tgtadm` call and records it for `restart`.
    fn configure(&mut self, args: &[&str]) -> Result<String> {
        let out = self.tgtadm(args)?;
        self.journal
            .push(args.iter().map(|s| s.to_string()).collect());
        Ok(out)
    }

    /// Creates a target named `IQN_BASE:<name>` open to every initiator.
    pub fn add_target(&mut self, name: &str) -> Result<Target> {
        let tid = self.targets.iter().map(|t| t.tid).max().unwrap_or(0) + 1;
        let iqn = format!("{IQN_BASE}:{name}");
        let tids = tid.to_string();
        self.configure(&[
            "--op", "new", "--mode", "target", "--tid", &tids, "-T", &iqn,
        ])?;
        self.configure(&[
            "--op", "bind", "--mode", "target", "--tid", &tids, "-I", "ALL",
        ])?;
        let t = Target { tid, iqn };
        self.targets.push(t.clone());
        Ok(t)
    }

    /// Adds LUN `lun` backed by the file `path`, created sparse with `size`
    /// bytes when it does not exist.
    pub fn add_lun_file(&mut self, t: &Target, lun: u32, path: &Path, size: u64) -> Result<()> {
        self.add_lun_typed(t, lun, path, size, &[])
    }

    /// A LUN backed by `path` (made sparse with `size` bytes when missing),
    /// with extra `tgtadm` arguments.
    fn add_lun_typed(
        &mut self,
        t: &Target,
        lun: u32,
        path: &Path,
        size: u64,
        extra: &[&str],
    ) -> Result<()> {
        if !path.exists() {
            let f = std::fs::File::create(path)
                .with_context(|| format!("cannot create LUN file {}", path.display()))?;
            f.set_len(size)?;
        }
        let p = path.to_str().context("LUN path is not UTF-8")?;
        let (tid, lun) = (t.tid.to_string(), lun.to_string());
        let mut args = vec![
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            &tid,
            "--lun",
            &lun,
            "--backing-store",
            p,
        ];
        args.extend_from_slice(extra);
        self.configure(&args)?;
        Ok(())
    }

    /// Adds LUN `lun` of type cd/dvd backed by a new sparse file `path`.
    /// tgtd implements SPC-3 persistent reservations for disks only: this
    /// LUN answers PERSISTENT RESERVE IN with ILLEGAL REQUEST (invalid
    /// opcode), as an array without them would.
    pub fn add_lun_cdrom(&mut self, t: &Target, lun: u32, path: &Path, size: u64) -> Result<()> {
        self.add_lun_typed(t, lun, path, size, &["--device-type", "cd"])
    }

    /// Adds LUN `lun` with the `null` backing store (reads return zeros,
    /// writes are dropped; 1 TiB as tgtd sizes it), for speed tests.
    pub fn add_lun_null(&mut self, t: &Target, lun: u32) -> Result<()> {
        self.configure(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            &t.tid.to_string(),
            "--lun",
            &lun.to_string(),
            "--bstype",
            "null",
            "--backing-store",
            "/dev/null",
        ])?;
        Ok(())
    }

    /// Requires CHAP: the initiator must log in as `user` with `secret`.
    pub fn set_chap(&mut self, t: &Target, user: &str, secret: &str) -> Result<()> {
        self.chap_account(t, user, secret, false)
    }

    /// Mutual CHAP: the target answers the initiator's challenge as `user`
    /// with `secret` (tgt's "outgoing" account).
    pub fn set_mutual_chap(&mut self, t: &Target, user: &str, secret: &str) -> Result<()> {
        self.chap_account(t, user, secret, true)
    }

    fn chap_account(&mut self, t: &Target, user: &str, secret: &str, outgoing: bool) -> Result<()> {
        self.configure(&[
            "--op",
            "new",
            "--mode",
            "account",
            "--user",
            user,
            "--password",
            secret,
        ])?;
        let tid = t.tid.to_string();
        let mut bind = vec![
            "--op", "bind", "--mode", "account", "--tid", &tid, "--user", user,
        ];
        if outgoing {
            bind.push("--outgoing");
        }
        self.configure(&bind)?;
        Ok(())
    }

    /// Offers CRC32C header and/or data digests (and only them when set).
    pub fn set_digests(&mut self, t: &Target, header: bool, data: bool) -> Result<()> {
        let v = |on: bool| if on { "CRC32C" } else { "None" };
        let tid = t.tid.to_string();
        self.configure(&[
            "--op",
            "update",
            "--mode",
            "target",
            "--tid",
            &tid,
            "-n",
            "HeaderDigest",
            "-v",
            v(header),
        ])?;
        self.configure(&[
            "--op",
            "update",
            "--mode",
            "target",
            "--tid",
            &tid,
            "-n",
            "DataDigest",
            "-v",
            v(data),
        ])?;
        Ok(())
    }

    /// Sets any target parameter (`MaxRecvDataSegmentLength`,
    /// `FirstBurstLength`, `ImmediateData`, ...).
    pub fn set_param(&mut self, t: &Target, name: &str, value: &str) -> Result<()> {
        self.configure(&[
            "--op",
            "update",
            "--mode",
            "target",
            "--tid",
            &t.tid.to_string(),
            "-n",
            name,
            "-v",
            value,
        ])?;
        Ok(())
    }

    /// `iscsi://host:port/iqn/lun`, the URL form of libiscsi and csvctl.
    pub fn url(&self, t: &Target, lun: u32) -> String {
        format!("iscsi://{}/{}/{}", self.portal(), t.iqn, lun)
    }

    /// The connections currently logged in to `t`.
    pub fn connections(&self, t: &Target) -> Result<Vec<Connection>> {
        let out = self.tgtadm(&[
            "--op",
            "show",
            "--mode",
            "conn",
            "--tid",
            &t.tid.to_string(),
        ])?;
        Ok(parse_connections(&out))
    }

    /// Cuts `initiator` off `t`: it is refused at login from now on and its
    /// open connections are dropped, like a SAN path that failed. Other
    /// initiators connected now keep working; an initiator that was never
    /// seen before is refused too until [`restore_initiator`] (tgtd's ACL
    /// becomes an explicit list while a cut is in force).
    ///
    /// [`restore_initiator`]: TgtTarget::restore_initiator
    pub fn cut_initiator(&mut self, t: &Target, initiator: &str) -> Result<()> {
        let tid = t.tid.to_string();
        let conns = self.connections(t)?;
        let mut allowed: Vec<String> = conns
            .iter()
            .map(|c| c.initiator.clone())
            .filter(|i| i != initiator)
            .collect();
        allowed.sort();
        allowed.dedup();
        if !self.cut.iter().any(|(tid, _)| *tid == t.tid) {
            self.configure(&[
                "--op", "unbind", "--mode", "target", "--tid", &tid, "-I", "ALL",
            ])?;
        }
        for name in &allowed {
            if !self.cut.iter().any(|(tid, n)| *tid == t.tid && n == name) {
                // Binding a name twice is an error in tgtd; ignore it.
                let _ = self.configure(&[
                    "--op", "bind", "--mode", "target", "--tid", &tid, "-Q", name,
                ]);
            }
        }
        // If `initiator` was bound explicitly by an earlier cut, unbind it.
        let _ = self.configure(&[
            "--op", "unbind", "--mode", "target", "--tid", &tid, "-Q", initiator,
        ]);
        self.cut.push((t.tid, initiator.to_string()));
        for c in conns.iter().filter(|c| c.initiator == initiator) {
            self.tgtadm(&[
                "--op",
                "delete",
                "--mode",
                "conn",
                "--tid",
                &tid,
                "--sid",
                &c.sid.to_string(),
                "--cid",
                &c.cid.to_string(),
            ])
            .with_context(|| format!("cannot drop connection {c:?}"))?;
        }
        Ok(())
    }

    /// Lets `initiator` log in to `t` again (ends every cut on `t` when it
    /// was the last one).
    pub fn restore_initiator(&mut self, t: &Target, initiator: &str) -> Result<()> {
        self.cut
            .retain(|(tid, n)| !(*tid == t.tid && n == initiator));
        if !self.cut.iter().any(|(tid, _)| *tid == t.tid) {
            let tid = t.tid.to_string();
            self.configure(&[
                "--op", "bind", "--mode", "target", "--tid", &tid, "-I", "ALL",
            ])?;
        } else {
            let tid = t.tid.to_string();
            self.configure(&[
                "--op", "bind", "--mode", "target", "--tid", &tid, "-Q", initiator,
            ])?;
        }
        Ok(())
    }

    /// Kills tgtd (SIGKILL, as a crashed or power-cycled array), waits
    /// `down` and starts it again on the same portals with the same
    /// targets, LUNs, accounts and ACLs. Persistent reservations are lost,
    /// as tgtd keeps them in memory only.
    pub fn restart(&mut self, down: Duration) -> Result<()> {
        let t = Instant::now();
        self.kill();
        let killed = t.elapsed();
        std::thread::sleep(down);
        // A start whose configuration replay fails (a `tgtadm` call that
        // hangs on the new daemon and is killed) is started over.
        let mut last = None;
        for attempt in 1..=3 {
            let s = Instant::now();
            match self.start_and_replay() {
                Ok(up) => {
                    if t.elapsed() > Duration::from_secs(10) {
                        eprintln!(
                            "tgtd restart took {:.1} s: the old daemon gone after {:.1} s, start {attempt} up after {:.1} s, configured after {:.1} s more",
                            t.elapsed().as_secs_f64(),
                            killed.as_secs_f64(),
                            up.as_secs_f64(),
                            (s.elapsed() - up).as_secs_f64()
                        );
                    }
                    return Ok(());
                }
                Err(e) => {
                    eprintln!("tgtd restart, start {attempt}: {e:#}");
                    self.kill();
                    last = Some(e);
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no start"))
            .context("tgtd did not come back after restart"))
    }

    /// Starts tgtd (again) and replays its configuration; gives how long
    /// the start took.
    fn start_and_replay(&mut self) -> Result<Duration> {
        let t = Instant::now();
        let mut last = None;
        // The old listening socket can linger for a moment.
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    eprintln!(
                        "tgtd start failed after {:.1} s: {e:#}",
                        t.elapsed().as_secs_f64()
                    );
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        let up = t.elapsed();
        for args in self.journal.clone() {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            self.tgtadm(&a)
                .with_context(|| format!("replaying `tgtadm {}` after restart", args.join(" ")))?;
        }
        Ok(up)
    }

    /// Kills tgtd at once (SIGKILL), as a controller that loses power;
    /// its sessions die with it.
    pub fn kill(&mut self) {
        match self.child.take() {
            Some(Daemon::Child(mut c)) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Some(Daemon::Launched(pid)) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                self.child = Some(Daemon::Launched(pid));
                let _ = wait_until(Duration::from_secs(30), || self.exited());
                self.child = None;
            }
            None => {}
        }
    }

    /// Stops tgtd: deletes the targets (dropping their sessions), asks the
    /// daemon to exit, and kills it if it has not after 5 s.
    pub fn stop(&mut self) -> Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        for t in &self.targets {
            let _ = self.tgtadm(&[
                "--op",
                "delete",
                "--mode",
                "target",
                "--tid",
                &t.tid.to_string(),
                "--force",
            ]);
        }
        let _ = self.tgtadm(&["--op", "delete", "--mode", "system"]);
        let gone = wait_until(Duration::from_secs(5), || self.exited());
        if gone.is_err() {
            self.kill();
            bail!("tgtd ignored `--op delete --mode system`; killed it");
        }
        if let Some(Daemon::Child(mut c)) = self.child.take() {
            let _ = c.wait();
        }
        Ok(())
    }
}

impl Drop for TgtTarget {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("TgtTarget: {e:#}");
        }
        if let Some(mut l) = self.launcher.take() {
            let _ = l.sh.kill();
            let _ = l.sh.wait();
        }
    }
}

/// Parses `tgtadm --op show --mode conn` output:
///
/// ```text
/// Session: 6
///     Connection: 0
///         Initiator: iqn.2026-11.test:init2
///         IP Address: 127.0.0.1
/// ```
fn parse_connections(text: &str) -> Vec<Connection> {
    let mut out = Vec::new();
    let mut sid = None;
    let mut cur: Option<Connection> = None;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Session:") {
            out.extend(cur.take());
            sid = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("Connection:") {
            out.extend(cur.take());
            if let (Some(sid), Ok(cid)) = (sid, v.trim().parse()) {
                cur = Some(Connection {
                    sid,
                    cid,
                    initiator: String::new(),
                    ip: String::new(),
                });
            }
        } else if let Some(v) = line.strip_prefix("Initiator:") {
            if let Some(c) = cur.as_mut() {
                c.initiator = v.split_whitespace().next().unwrap_or("").to_string();
            }
        } else if let Some(v) = line.strip_prefix("IP Address:") {
            if let Some(c) = cur.as_mut() {
                c.ip = v.trim().to_string();
            }
        }
    }
    out.extend(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tgtadm_connection_listing() {
        let text = "Session: 6\n    Connection: 0\n        Initiator: iqn.a:1\n        IP Address: 127.0.0.1\n\
                    Session: 9\n    Connection: 0\n        Initiator: iqn.b:2 alias: none\n        IP Address: 10.0.0.2\n    Connection: 1\n        Initiator: iqn.b:2\n        IP Address: 10.0.1.2\n";
        let c = parse_connections(text);
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0],
            Connection {
                sid: 6,
                cid: 0,
                initiator: "iqn.a:1".into(),
                ip: "127.0.0.1".into()
            }
        );
        assert_eq!(c[1].initiator, "iqn.b:2");
        assert_eq!((c[2].sid, c[2].cid, c[2].ip.as_str()), (9, 1, "10.0.1.2"));
    }

    #[test]
    fn empty_listing_has_no_connections() {
        assert!(parse_connections("").is_empty());
    }
}
