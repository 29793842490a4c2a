//! Blocking clients of the coordinator, one per concurrent caller.

use coordinator::client::Client;
use std::sync::Mutex;

/// Clients made on demand and kept for the next caller.
pub struct ClientPool {
    idle: Mutex<Vec<Client>>,
    make: Box<dyn Fn() -> Client + Send + Sync>,
}

impl std::fmt::Debug for ClientPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientPool")
    }
}

impl ClientPool {
    /// A pool that makes clients with `make`.
    pub fn new(make: impl Fn() -> Client + Send + Sync + 'static) -> ClientPool {
        ClientPool {
            idle: Mutex::new(Vec::new()),
            make: Box::new(make),
        }
    }

    /// Runs `f` with a client of the pool.
    pub fn with<R>(&self, f: impl FnOnce(&mut Client) -> R) -> R {
        let c = self.idle.lock().ok().and_then(|mut v| v.pop());
        let mut c = c.unwrap_or_else(|| (self.make)());
        let r = f(&mut c);
        if let Ok(mut v) = self.idle.lock() {
            v.push(c);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::wire::{Identity, Key};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_client_is_made_once_and_reused() {
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let pool = ClientPool::new(move || {
            m.fetch_add(1, Ordering::Relaxed);
            let me = Identity {
                node: 0,
                cluster: "t".into(),
                key: Key::from_bytes([1; 32]),
            };
            Client::new(me, vec![])
        });
        pool.with(|_| ());
        pool.with(|_| ());
        assert_eq!(made.load(Ordering::Relaxed), 1);
        // Two callers at once need two.
        pool.with(|_| pool.with(|_| ()));
        assert_eq!(made.load(Ordering::Relaxed), 2);
    }
}
