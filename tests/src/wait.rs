//! Polling and port helpers.

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

/// The condition did not hold within the timeout.
#[derive(Debug)]
pub struct TimedOut {
    /// How long was waited.
    pub waited: Duration,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "condition still false after {:?}", self.waited)
    }
}

impl std::error::Error for TimedOut {}

/// Polls `condition` (every 10 ms at first, backing off to 100 ms) until it
/// returns true or `timeout` passes. Returns how long it took.
pub fn wait_until(
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<Duration, TimedOut> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if condition() {
            return Ok(start.elapsed());
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(TimedOut { waited });
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, drawn below the
/// kernel's ephemeral range (`ip_local_port_range`): a port drawn from that
/// range with bind(0) can be handed, between the draw and csvd's bind, to
/// an outgoing connection of any process, which then holds it
/// (EADDRINUSE); ports below it are never given to outgoing connections.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u32, ephemeral.max(10_001));
    // A start that differs between test processes, then a walk.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..2000 {
        let n = NEXT.fetch_add(7919, Ordering::Relaxed);
        let port = lo + seed.wrapping_add(n) % (hi - lo);
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    // Nothing free below the range: the kernel's draw.
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn wait_until_returns_once_true() {
        let mut n = 0;
        let took = wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        })
        .unwrap();
        assert_eq!(n, 3);
        assert!(took < Duration::from_secs(5));
    }

    #[test]
    fn wait_until_times_out() {
        let err = wait_until(Duration::from_millis(50), || false).unwrap_err();
        assert!(err.waited >= Duration::from_millis(50));
    }

    #[test]
    fn free_port_can_be_bound() {
        let p = free_port().unwrap();
        assert_ne!(p, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
    }
}
