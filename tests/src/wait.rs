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

/// A TCP port on 127.0.0.1 that was free a moment ago. Ports are drawn by
/// the kernel from its ephemeral range, so parallel test processes rarely
/// collide; a fixture that gets `EADDRINUSE` should draw again.
pub fn free_port() -> std::io::Result<u16> {
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
