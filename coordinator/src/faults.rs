//! The failure drills' faults (`csvctl drill`), in one registry per
//! process: what the drills inject, and the one place the code paths they
//! affect ask.
//!
//! | fault | set by | read by |
//! |---|---|---|
//! | network cut (addresses, until) | `net-cut` on this host | [`crate::wire`]: connects, accepts, sends |
//! | clock offset (until) | `clock` | [`crate::group::now_ms`] |
//! | SAN path cut or slowed (volume, until) | `san-cut`, `san-slow` | the filesystem's LUN path |
//!
//! Every fault ends by itself at its deadline (a host cut off from every
//! network cannot be told to heal), or at [`heal`]. With no fault set, a
//! check is one atomic load.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A fault on a volume's own SAN path.
#[derive(Debug, Clone, Copy, Default)]
struct San {
    /// The path fails until then.
    cut: Option<Instant>,
    /// Each I/O waits this long first, until then.
    slow: Option<(Duration, Instant)>,
}

#[derive(Debug, Default)]
struct Registry {
    net: Vec<(SocketAddr, Instant)>,
    /// By volume (0: every volume).
    san: BTreeMap<u64, San>,
}

static ANY_NET: AtomicBool = AtomicBool::new(false);
static ANY_SAN: AtomicBool = AtomicBool::new(false);
static CLOCK_OFFSET: AtomicI64 = AtomicI64::new(0);
/// Real time (ms since the epoch) when the clock jump ends.
static CLOCK_UNTIL: AtomicU64 = AtomicU64::new(0);
static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    net: Vec::new(),
    san: BTreeMap::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Cuts traffic to and from `addrs` until `until`.
pub fn cut_network(addrs: &[SocketAddr], until: Instant) {
    let mut r = registry();
    r.net.retain(|(a, _)| !addrs.contains(a));
    r.net.extend(addrs.iter().map(|a| (*a, until)));
    ANY_NET.store(!r.net.is_empty(), Ordering::Relaxed);
}

/// Whether traffic to or from `a` is cut now.
pub fn network_cut(a: &SocketAddr) -> bool {
    if !ANY_NET.load(Ordering::Relaxed) {
        return false;
    }
    let mut r = registry();
    let now = Instant::now();
    r.net.retain(|(_, until)| *until > now);
    ANY_NET.store(!r.net.is_empty(), Ordering::Relaxed);
    r.net.iter().any(|(x, _)| x == a)
}

/// The error of a connection on a cut network.
pub fn unreachable() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NetworkUnreachable,
        "network unreachable (cut by a failure drill)",
    )
}

/// Jumps this process's wall clock by `offset_ms` for `for_ms` (0: back
/// now).
pub fn jump_clock(offset_ms: i64, for_ms: u64) {
    let real = real_ms();
    CLOCK_UNTIL.store(real.saturating_add(for_ms), Ordering::Relaxed);
    CLOCK_OFFSET.store(if for_ms == 0 { 0 } else { offset_ms }, Ordering::Relaxed);
}

fn real_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall clock (ms since the epoch) as a clock jump has it.
pub fn wall_ms() -> u64 {
    let real = real_ms();
    let off = CLOCK_OFFSET.load(Ordering::Relaxed);
    if off == 0 || real >= CLOCK_UNTIL.load(Ordering::Relaxed) {
        return real;
    }
    real.saturating_add_signed(off)
}

/// Cuts volume `vol`'s own SAN path (0: every volume's) until `until`.
pub fn cut_san(vol: u64, until: Instant) {
    let mut r = registry();
    r.san.entry(vol).or_default().cut = Some(until);
    ANY_SAN.store(true, Ordering::Relaxed);
}

/// Slows each I/O on volume `vol`'s own path (0: every volume's) by
/// `delay` until `until`.
pub fn slow_san(vol: u64, delay: Duration, until: Instant) {
    let mut r = registry();
    r.san.entry(vol).or_default().slow = Some((delay, until));
    ANY_SAN.store(true, Ordering::Relaxed);
}

/// Whether volume `vol`'s own SAN path is cut now.
pub fn san_cut(vol: u64) -> bool {
    if !ANY_SAN.load(Ordering::Relaxed) {
        return false;
    }
    let now = Instant::now();
    let r = registry();
    [vol, 0]
        .iter()
        .filter_map(|v| r.san.get(v))
        .any(|f| f.cut.is_some_and(|t| t > now))
}

/// How long each I/O on volume `vol`'s own path waits now (None: it
/// does not).
pub fn san_delay(vol: u64) -> Option<Duration> {
    if !ANY_SAN.load(Ordering::Relaxed) {
        return None;
    }
    let now = Instant::now();
    let r = registry();
    [vol, 0]
        .iter()
        .filter_map(|v| r.san.get(v))
        .filter_map(|f| f.slow.filter(|(_, until)| *until > now))
        .map(|(d, _)| d)
        .max()
}

/// Ends the SAN faults of volume `vol` (0: of every volume).
pub fn heal_san(vol: u64) {
    let mut r = registry();
    if vol == 0 {
        r.san.clear();
    } else {
        r.san.remove(&vol);
    }
    ANY_SAN.store(!r.san.is_empty(), Ordering::Relaxed);
}

/// Ends every fault now.
pub fn heal() {
    {
        let mut r = registry();
        r.net.clear();
        r.san.clear();
    }
    ANY_NET.store(false, Ordering::Relaxed);
    ANY_SAN.store(false, Ordering::Relaxed);
    jump_clock(0, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the registry is the process's, and tests run in threads.
    #[test]
    fn faults_hold_until_their_deadline_or_a_heal() {
        let a: SocketAddr = "192.0.2.1:7100".parse().unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        cut_network(&[a], far);
        assert!(network_cut(&a));
        assert!(!network_cut(&"192.0.2.2:7100".parse().unwrap()));
        cut_network(&[a], Instant::now());
        assert!(!network_cut(&a), "a cut ends at its deadline");

        cut_san(7, far);
        slow_san(0, Duration::from_millis(30), far);
        assert!(san_cut(7));
        assert!(!san_cut(8));
        assert_eq!(san_delay(8), Some(Duration::from_millis(30)));
        heal_san(7);
        assert!(!san_cut(7));
        assert_eq!(san_delay(7), Some(Duration::from_millis(30)));

        let before = wall_ms();
        jump_clock(-3_600_000, 60_000);
        assert!(wall_ms() + 3_000_000 < before);
        heal();
        assert!(wall_ms() >= before);
        assert_eq!(san_delay(7), None);
        assert!(!network_cut(&a));
    }
}
