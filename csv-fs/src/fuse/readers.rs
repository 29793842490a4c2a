//! Reader turns: few of a mount's FUSE threads wait for the kernel's
//! requests at a time (see [`Readers`]).

use crate::volume::Blocking;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a FUSE thread that finished a request waits for a reader's
/// turn before it reads again without one.
const READER_PARK: Duration = Duration::from_millis(500);

thread_local! {
    /// This FUSE thread holds one of its mount's reader turns.
    static READER_TURN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Few of a mount's FUSE threads wait for the kernel's requests at a time.
///
/// The kernel hands each request to the thread that has waited longest
/// for one. With dozens of threads waiting, nearly every request woke a
/// sleeping thread (a context switch, costly in a VM) while the thread
/// that had just answered one went back to sleep. Reads and writes no
/// longer block a thread (they are submitted asynchronously), so a couple
/// of threads keep up with them and pick queued requests up without
/// sleeping; the others are there for requests that block (anything that
/// asks the coordinator, synchronous LUN I/O). So a thread reads from the
/// kernel only with a turn: it takes one when it finishes a request (waiting
/// at most [`READER_PARK`], then reading anyway, so threads come back when
/// the session ends), and gives it up when it starts a request that may
/// block, for a parked thread to take.
#[derive(Debug)]
pub(crate) struct Readers {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Readers {
    pub(crate) fn new(turns: usize) -> Readers {
        Readers {
            free: Mutex::new(turns.max(1)),
            cv: Condvar::new(),
        }
    }

    /// The calling request's turn, given back at once if it may block.
    pub(crate) fn turn(&self, may_block: bool) -> Turn<'_> {
        let t = Turn(self);
        if may_block {
            t.blocking();
        }
        t
    }

    fn take(&self) {
        let Ok(mut free) = self.free.lock() else {
            return;
        };
        let deadline = Instant::now() + READER_PARK;
        while *free == 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            free = match self.cv.wait_timeout(free, deadline - now) {
                Ok(g) => g.0,
                Err(_) => return,
            };
        }
        *free -= 1;
        READER_TURN.set(true);
    }

    fn give_up(&self) {
        if READER_TURN.replace(false) {
            if let Ok(mut f) = self.free.lock() {
                *f += 1;
            }
            self.cv.notify_one();
        }
    }
}

/// A request in progress on a FUSE thread; when it ends, the thread takes
/// a reader's turn if it has none.
pub(crate) struct Turn<'a>(&'a Readers);

impl Blocking for Turn<'_> {
    /// The request is about to block: the turn goes to another thread.
    fn blocking(&self) {
        self.0.give_up();
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !READER_TURN.get() {
            self.0.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Runs one request on a thread of its own (reader turns are per
    /// thread), blocking or not; returns how long the request's end (the
    /// wait for a turn) took and whether the thread then held one.
    fn request(r: &Arc<Readers>, may_block: bool, hold: Duration) -> (Duration, bool) {
        let r = r.clone();
        std::thread::spawn(move || {
            let t = r.turn(may_block);
            std::thread::sleep(hold);
            let end = Instant::now();
            drop(t);
            (end.elapsed(), READER_TURN.get())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_thread_takes_a_free_turn_at_once() {
        let r = Arc::new(Readers::new(2));
        let (took, held) = request(&r, false, Duration::ZERO);
        assert!(held && took < Duration::from_millis(100), "{took:?}");
        assert_eq!(*r.free.lock().unwrap(), 1);
    }

    #[test]
    fn without_a_free_turn_a_thread_reads_anyway_after_a_while() {
        let r = Arc::new(Readers::new(1));
        *r.free.lock().unwrap() = 0;
        let (took, held) = request(&r, false, Duration::ZERO);
        assert!(!held);
        assert!(took >= READER_PARK - Duration::from_millis(50), "{took:?}");
    }

    #[test]
    fn a_blocking_request_hands_its_turn_to_a_parked_thread() {
        let r = Arc::new(Readers::new(1));
        // Thread A holds the only turn, then starts a request that blocks.
        let (a_to_blocking, a_go) = (
            Arc::new(std::sync::Barrier::new(2)),
            Arc::new(std::sync::Barrier::new(2)),
        );
        let a = {
            let (r, b1, b2) = (r.clone(), a_to_blocking.clone(), a_go.clone());
            std::thread::spawn(move || {
                drop(r.turn(false));
                assert!(READER_TURN.get());
                b1.wait();
                let t = r.turn(false);
                b2.wait();
                t.blocking();
                std::thread::sleep(Duration::from_millis(300));
                drop(t);
                READER_TURN.get()
            })
        };
        a_to_blocking.wait();
        // Thread B finishes a request while A holds the turn: it parks
        // until A blocks, then takes it (well before READER_PARK).
        let b = {
            let r = r.clone();
            std::thread::spawn(move || {
                let t = r.turn(false);
                let start = Instant::now();
                drop(t);
                (start.elapsed(), READER_TURN.get())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        a_go.wait();
        let (took, b_held) = b.join().unwrap();
        assert!(b_held, "B took the turn A gave up");
        assert!(took < READER_PARK, "{took:?}");
        // A, back from its blocking request, finds no turn free and reads
        // without one once it has waited READER_PARK.
        assert!(!a.join().unwrap());
    }
}
