//! `csvctl vm console`: a VM's serial console from any host, through the
//! host running it (host RPC `VmConsoleReq`): its output, following the
//! VM when it moves, and typing on it (qemu engine).

use crate::cluster_cmd::Access;
use crate::vm_cmd::{find, registry};
use anyhow::{bail, Context, Result};
use coordinator::client;
use coordinator::proto;
use std::process::ExitCode;
use std::time::Duration;

/// The host running VM `name` (its id and addresses), from the registry.
fn console_host(access: &Access, name: &str) -> Result<(u64, Vec<std::net::SocketAddr>)> {
    let (_, info) = registry(access)?;
    let role = find(&info, name)?;
    if role.node == 0 {
        bail!("VM {name} is not running (csvctl vm start {name})");
    }
    let Some(host) = info.nodes.iter().find(|n| n.id == role.node) else {
        bail!("VM {name}'s host {} is not in the registry", role.node);
    };
    Ok((
        host.id,
        host.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
    ))
}

/// A host running a VM: its id and addresses.
type ConsoleHost = (u64, Vec<std::net::SocketAddr>);

/// Reads VM `name`'s console on `host` from `offset` (u64::MAX: the end),
/// typing `input` on it first.
fn console_read(
    me: &coordinator::wire::Identity,
    host: &ConsoleHost,
    name: &str,
    offset: u64,
    max: u32,
    input: &[u8],
) -> Result<proto::VmConsoleReply> {
    let mut last = None;
    for a in &host.1 {
        let req = proto::VmConsoleReq {
            name: name.to_string(),
            offset,
            max,
            input: input.to_vec(),
        };
        match client::vm_console(me, *a, req, Duration::from_secs(5)) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => bail!("host {}: {}", host.0, client::describe(&e)),
        None => bail!("host {} has no address", host.0),
    }
}

/// What `csvctl vm console` was asked to do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConsoleWay<'a> {
    pub(crate) lines: usize,
    pub(crate) follow: bool,
    pub(crate) interactive: bool,
    pub(crate) typed: Option<&'a str>,
}

/// Ctrl-]: leaves an interactive console (as telnet and virsh do).
const ESCAPE: u8 = 0x1d;

/// The terminal in raw mode while the interactive console runs; put back
/// as it was when dropped.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> Result<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let old = tcgetattr(&stdin).context("--interactive needs a terminal on standard input")?;
        let mut raw = old.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("terminal to raw mode")?;
        Ok(RawTerminal(Some(old)))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                &old,
            );
        }
    }
}

/// Bytes typed on standard input within `wait` (none on a timeout); None
/// at its end.
fn typed_within(wait: Duration) -> Option<Vec<u8>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::from(wait.as_millis().min(1000) as u16);
    match poll(&mut fds, ms) {
        Ok(n) if n > 0 => {
            let mut buf = [0u8; 4096];
            match stdin.lock().read(&mut buf) {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            }
        }
        _ => Some(Vec::new()),
    }
}

/// The console goes on at the start of the VM's new host's.
fn follow(name: &str, host: &mut ConsoleHost, at: &mut u64, to: ConsoleHost) {
    eprint!(
        "\r\n(VM {name} moved from host {} to host {})\r\n",
        host.0, to.0
    );
    *host = to;
    *at = 0;
}

pub(crate) fn console(access: &Access, name: &str, way: ConsoleWay<'_>) -> Result<ExitCode> {
    use std::io::Write;
    let mut host = console_host(access, name)?;
    let me = access.identity()?;
    // The tail: the last 64 KiB, cut to the last `lines` lines.
    let first = console_read(&me, &host, name, u64::MAX, 64 << 10, &[])?;
    let text = String::from_utf8_lossy(&first.data);
    let all: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = std::io::stdout().lock();
    for l in &all[all.len().saturating_sub(way.lines)..] {
        out.write_all(l.as_bytes())?;
    }
    out.flush()?;
    let mut at = first.offset + first.data.len() as u64;
    // Typed text goes first, with Enter (a carriage return, as a terminal
    // sends it); what the console prints next is shown for 3 s.
    let mut pending: Vec<u8> = way
        .typed
        .map(|t| [t.as_bytes(), b"\r"].concat())
        .unwrap_or_default();
    let until = (!way.follow && !way.interactive)
        .then(|| std::time::Instant::now() + Duration::from_secs(3));
    if until.is_some() && way.typed.is_none() {
        return Ok(ExitCode::SUCCESS);
    }
    let _raw = if way.interactive {
        let r = RawTerminal::enter()?;
        eprint!(
            "(console of VM {name} on host {}; Ctrl-] leaves)\r\n",
            host.0
        );
        Some(r)
    } else {
        None
    };
    // Follows the VM: when it moves (a migration, a failover), the
    // console goes on from the start of its new host's.
    let moved = |host: &ConsoleHost| -> Result<Option<ConsoleHost>> {
        let now = console_host(access, name)?;
        Ok((now.0 != host.0).then_some(now))
    };
    let mut checked = std::time::Instant::now();
    loop {
        if until.is_some_and(|u| std::time::Instant::now() > u) {
            return Ok(ExitCode::SUCCESS);
        }
        if way.interactive && pending.is_empty() {
            match typed_within(Duration::from_millis(100)) {
                None => return Ok(ExitCode::SUCCESS),
                Some(b) => match b.iter().position(|&c| c == ESCAPE) {
                    Some(i) => {
                        let _ = console_read(&me, &host, name, at, 0, &b[..i]);
                        eprint!("\r\n(left the console)\r\n");
                        return Ok(ExitCode::SUCCESS);
                    }
                    None => pending = b,
                },
            }
        } else if pending.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
        if checked.elapsed() > Duration::from_secs(2) {
            checked = std::time::Instant::now();
            if let Ok(Some(h)) = moved(&host) {
                follow(name, &mut host, &mut at, h);
            }
        }
        let r = match console_read(&me, &host, name, at, 256 << 10, &pending) {
            Ok(r) => r,
            Err(e) => match moved(&host) {
                Ok(Some(h)) => {
                    follow(name, &mut host, &mut at, h);
                    continue;
                }
                Ok(None) if pending.is_empty() => continue,
                Ok(None) => bail!("typing on the console: {e:#}"),
                Err(why) => {
                    eprint!("\r\n(console ended: {e:#}; {why:#})\r\n");
                    return Ok(ExitCode::SUCCESS);
                }
            },
        };
        pending.clear();
        if r.offset != at {
            eprint!("\r\n(output restarted: the VM restarted)\r\n");
        }
        out.write_all(&r.data)?;
        out.flush()?;
        at = r.offset + r.data.len() as u64;
    }
}
