//! The snapshot write gate: while a snapshot freezes the volume on this
//! host, new writes wait (until the freeze's time limit at most); a freeze
//! waits for the writes in progress, then makes every open file's data
//! and map changes reach the LUN and the coordinator.

use super::{may_block, Blocking, VolumeFs};
use fuser::Errno;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vhd::BlockIo as _;

/// Why a freeze did not hold the volume.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// A freeze already holds it.
    #[error("Volume{vol} is already frozen")]
    AlreadyFrozen {
        /// The volume.
        vol: u64,
    },
    /// Writes in progress did not finish in time.
    #[error("{inflight} write(s) on Volume{vol} did not finish within the time limit")]
    Drain {
        /// The volume.
        vol: u64,
        /// Writes still in progress.
        inflight: u32,
    },
    /// The open files' changes could not be made durable.
    #[error("flushing Volume{vol}'s open files: {}", std::io::Error::from_raw_os_error(errno.code()))]
    Flush {
        /// The volume.
        vol: u64,
        /// What the flush got.
        errno: Errno,
    },
}

#[derive(Debug, Default)]
struct GateState {
    /// Frozen until this (the freeze's time limit), unless thawed first.
    frozen_until: Option<Instant>,
    /// Writes in progress.
    inflight: u32,
    /// The time limit passed while frozen: writes went on.
    expired: bool,
}

/// New writes to a volume wait while a snapshot freezes it.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

/// A write in progress (lets a freeze wait for it); it may end on another
/// thread than it began (an asynchronous write).
pub(crate) struct GateGuard(Arc<Gate>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = self.0.state.lock() {
            g.inflight = g.inflight.saturating_sub(1);
        }
        self.0.cv.notify_all();
    }
}

impl Gate {
    /// Waits while the volume is frozen (at most until the freeze's time
    /// limit), then counts a write in progress.
    pub(crate) fn enter(self: &Arc<Self>, ctx: Option<&dyn Blocking>) -> Result<GateGuard, Errno> {
        let mut g = self.state.lock().map_err(|_| Errno::EIO)?;
        if g.frozen_until.is_some() {
            may_block(ctx);
        }
        while let Some(until) = g.frozen_until {
            let now = Instant::now();
            if now >= until {
                g.frozen_until = None;
                g.expired = true;
                tracing::warn!("snapshot freeze ran past its time limit; writes resume");
                self.cv.notify_all();
                break;
            }
            g = self
                .cv
                .wait_timeout(g, until - now)
                .map_err(|_| Errno::EIO)?
                .0;
        }
        g.inflight += 1;
        Ok(GateGuard(self.clone()))
    }

    /// Holds new writes until `until` and waits for those in progress.
    fn hold(&self, vol: u64, until: Instant) -> Result<(), FreezeError> {
        let poisoned = || FreezeError::Flush {
            vol,
            errno: Errno::EIO,
        };
        let mut g = self.state.lock().map_err(|_| poisoned())?;
        if g.frozen_until.is_some() {
            return Err(FreezeError::AlreadyFrozen { vol });
        }
        g.frozen_until = Some(until);
        g.expired = false;
        while g.inflight > 0 {
            let now = Instant::now();
            if now >= until {
                g.frozen_until = None;
                self.cv.notify_all();
                return Err(FreezeError::Drain {
                    vol,
                    inflight: g.inflight,
                });
            }
            g = self
                .cv
                .wait_timeout(g, until - now)
                .map_err(|_| poisoned())?
                .0;
        }
        Ok(())
    }

    /// Lets writes go on; whether the time limit had passed first.
    fn release(&self) -> bool {
        let Ok(mut g) = self.state.lock() else {
            return true;
        };
        let expired = g.expired || g.frozen_until.is_some_and(|u| Instant::now() >= u);
        g.frozen_until = None;
        g.expired = false;
        self.cv.notify_all();
        expired
    }

    fn frozen(&self) -> bool {
        self.state
            .lock()
            .map(|g| g.frozen_until.is_some_and(|u| Instant::now() < u))
            .unwrap_or(false)
    }
}

impl VolumeFs {
    /// Freezes the volume on this host for a snapshot: new writes wait
    /// (until `until` at most), the writes in progress finish, and every
    /// open file's data and map changes reach the LUN and the coordinator.
    /// On failure the volume is thawed again.
    /// Returns how long the drain and the flush took.
    pub fn freeze(&self, until: Instant) -> Result<(Duration, Duration), FreezeError> {
        let t0 = Instant::now();
        self.gate.hold(self.vol, until)?;
        let drained = t0.elapsed();
        if let Err(errno) = self.flush_all() {
            self.thaw(false);
            return Err(FreezeError::Flush {
                vol: self.vol,
                errno,
            });
        }
        Ok((drained, t0.elapsed() - drained))
    }

    /// Lets writes go on after a freeze; first marks the extents of the
    /// files open for writing shared (a snapshot now holds them).
    /// Returns whether the freeze's time limit had passed (writes went
    /// on before the thaw).
    /// `committed`: a snapshot was taken (or may have been).
    pub fn thaw(&self, committed: bool) -> bool {
        if committed {
            self.refresh_writers();
        }
        self.gate.release()
    }

    /// Whether a freeze holds writes now.
    pub fn frozen(&self) -> bool {
        self.gate.frozen()
    }

    /// Flushes the LUN and reports every open file's writes.
    pub fn flush_all(&self) -> Result<(), Errno> {
        self.lun.flush().map_err(|e| super::errno::io_errno(&e))?;
        for (ino, f) in self.open_files() {
            let mut g = f.lock().map_err(|_| Errno::EIO)?;
            if g.writers > 0 && !g.closed {
                self.report(ino, &mut g)?;
            }
        }
        Ok(())
    }

    /// Marks every extent of the files open for writing as shared: the
    /// snapshot just committed holds all of them (their changes were all
    /// reported at the freeze), so their next writes are redirected. A
    /// file whose changes were not all reported (the freeze's limit passed)
    /// has its map re-read from the coordinator instead.
    fn refresh_writers(&self) {
        for (ino, f) in self.open_files() {
            let Ok(mut g) = f.lock() else { continue };
            if g.writers == 0 || g.closed {
                continue;
            }
            if g.dirty.is_empty() && g.remaps.is_empty() {
                g.extents.share_all();
                continue;
            }
            match self.fetch_extents(ino) {
                Ok(m) if g.dirty.is_empty() => g.extents = m,
                _ => {
                    // Without the shared flags this host could write over
                    // what the snapshot holds: stop writing this file.
                    tracing::error!(ino, "cannot tell what a snapshot shares of this open file; writes to it now fail");
                    g.fenced = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freeze_waits_for_writes_in_progress_and_holds_new_ones() {
        let gate = Arc::new(Gate::default());
        let w = gate.enter(None).unwrap();
        let g2 = gate.clone();
        let freezer = std::thread::spawn(move || {
            let t = Instant::now();
            g2.hold(1, Instant::now() + Duration::from_secs(5)).unwrap();
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(w);
        let waited = freezer.join().unwrap();
        assert!(waited >= Duration::from_millis(80), "{waited:?}");
        assert!(gate.frozen());
        let g3 = gate.clone();
        let writer = std::thread::spawn(move || {
            let t = Instant::now();
            drop(g3.enter(None).unwrap());
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!gate.release(), "thawed before the limit");
        assert!(writer.join().unwrap() >= Duration::from_millis(80));
    }

    #[test]
    fn a_freeze_past_its_limit_lets_writes_go_and_says_so() {
        let gate = Arc::new(Gate::default());
        gate.hold(1, Instant::now() + Duration::from_millis(50))
            .unwrap();
        drop(gate.enter(None).unwrap());
        assert!(gate.release(), "the limit passed while frozen");
        let w = gate.enter(None).unwrap();
        let e = gate
            .hold(1, Instant::now() + Duration::from_millis(30))
            .unwrap_err();
        assert!(matches!(e, FreezeError::Drain { inflight: 1, .. }), "{e}");
        drop(w);
        assert!(!gate.frozen());
    }
}
