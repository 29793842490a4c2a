//! Leases: which host may read or write a file's blocks, and the
//! write-lease history that shows one writer at a time.

use super::*;

/// A host's lease on a file's extent map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Epoch: grows with every grant, so a stale holder is recognised.
    pub epoch: u64,
    /// Expiry (ms).
    pub expires: u64,
    /// Write lease (at most one host holds one per file).
    pub write: bool,
}

/// How a write lease began or ended (an entry of the lease history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    /// Granted to a host that held no live write lease on the file.
    Granted,
    /// Received from another host (the switch-over of a migration).
    HandedIn {
        /// The host it came from.
        from: NodeId,
    },
    /// Given back by its holder (the file closed for writing).
    Released,
    /// Taken from its holder by someone else (a host fenced off).
    Revoked,
    /// Handed to another host.
    HandedOff {
        /// The host it went to.
        to: NodeId,
    },
    /// Not renewed in time.
    Expired,
}

impl LeaseChange {
    /// Whether the host can write from this event on.
    pub fn begins(self) -> bool {
        matches!(self, LeaseChange::Granted | LeaseChange::HandedIn { .. })
    }

    /// The other host of a hand-over (0 otherwise).
    pub fn peer(self) -> NodeId {
        match self {
            LeaseChange::HandedIn { from } => from,
            LeaseChange::HandedOff { to } => to,
            _ => 0,
        }
    }

    /// A word for logs and tables.
    pub fn name(self) -> &'static str {
        match self {
            LeaseChange::Granted => "granted",
            LeaseChange::HandedIn { .. } => "handed-in",
            LeaseChange::Released => "released",
            LeaseChange::Revoked => "revoked",
            LeaseChange::HandedOff { .. } => "handed-off",
            LeaseChange::Expired => "expired",
        }
    }

    /// The change [`LeaseChange::name`] names (`peer`: the other host of
    /// a hand-over).
    pub fn parse(name: &str, peer: NodeId) -> Option<LeaseChange> {
        let code = match name {
            "granted" => 0,
            "handed-in" => 1,
            "released" => 2,
            "revoked" => 3,
            "handed-off" => 4,
            "expired" => 5,
            _ => return None,
        };
        LeaseChange::from_code(code, peer)
    }

    pub(super) fn code(self) -> u8 {
        match self {
            LeaseChange::Granted => 0,
            LeaseChange::HandedIn { .. } => 1,
            LeaseChange::Released => 2,
            LeaseChange::Revoked => 3,
            LeaseChange::HandedOff { .. } => 4,
            LeaseChange::Expired => 5,
        }
    }

    pub(super) fn from_code(code: u8, peer: NodeId) -> Option<LeaseChange> {
        Some(match code {
            0 => LeaseChange::Granted,
            1 => LeaseChange::HandedIn { from: peer },
            2 => LeaseChange::Released,
            3 => LeaseChange::Revoked,
            4 => LeaseChange::HandedOff { to: peer },
            5 => LeaseChange::Expired,
            _ => return None,
        })
    }
}

/// One entry of a volume's write-lease history: when a host became able
/// to write a file's blocks, or stopped being able to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseEvent {
    /// When (ms, the leader's clock; for an expiry, the lease's end).
    pub at: u64,
    /// The file.
    pub ino: Ino,
    /// The host.
    pub node: NodeId,
    /// The lease's epoch.
    pub epoch: u64,
    /// What happened.
    pub change: LeaseChange,
}

/// Write-lease events a volume keeps (the oldest go first).
pub const LEASE_HISTORY: usize = 4096;

/// A write-lease history that breaks the one-writer rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// A second host gained the lease while the first held it.
    #[error("event {index}: host {node} gains the write lease on inode {ino} (epoch {epoch}) at {at} ms while host {holder} holds it (epoch {held_epoch})")]
    SecondWriter {
        /// The event's place in the history.
        index: usize,
        /// The host gaining it.
        node: NodeId,
        /// The file.
        ino: Ino,
        /// The new lease's epoch.
        epoch: u64,
        /// When (ms).
        at: u64,
        /// The host holding it.
        holder: NodeId,
        /// Its lease's epoch.
        held_epoch: u64,
    },
    /// A host lost a lease it did not hold.
    #[error("event {index}: host {node} loses a write lease on inode {ino} it did not hold")]
    NotHeld {
        /// The event's place in the history.
        index: usize,
        /// The host.
        node: NodeId,
        /// The file.
        ino: Ino,
    },
}

/// Checks a file's write-lease history (in commit order): no host gains
/// a write lease while another still holds one, and every end matches a
/// beginning. Returns the first violation.
pub fn check_lease_history(events: &[LeaseEvent]) -> Result<(), HistoryError> {
    let mut holders: BTreeMap<Ino, (NodeId, u64)> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        match (e.change.begins(), holders.get(&e.ino).copied()) {
            (true, Some((other, epoch))) if other != e.node => {
                return Err(HistoryError::SecondWriter {
                    index: i,
                    node: e.node,
                    ino: e.ino,
                    epoch: e.epoch,
                    at: e.at,
                    holder: other,
                    held_epoch: epoch,
                })
            }
            (true, _) => {
                holders.insert(e.ino, (e.node, e.epoch));
            }
            (false, Some((holder, _))) if holder == e.node => {
                holders.remove(&e.ino);
            }
            (false, _) => {
                // The beginning fell out of the kept history; only the
                // first end of a file may lack one.
                if events[..i].iter().any(|p| p.ino == e.ino) {
                    return Err(HistoryError::NotHeld {
                        index: i,
                        node: e.node,
                        ino: e.ino,
                    });
                }
            }
        }
    }
    Ok(())
}

impl Volume {
    pub(super) fn record(
        &mut self,
        at: u64,
        ino: Ino,
        node: NodeId,
        epoch: u64,
        change: LeaseChange,
    ) {
        if self.history.len() >= LEASE_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(LeaseEvent {
            at,
            ino,
            node,
            epoch,
            change,
        });
    }

    /// Records the end of `lease` if it was a write lease: at `now`, or
    /// at its expiry if that came first.
    pub(super) fn record_end(
        &mut self,
        ino: Ino,
        node: NodeId,
        lease: Lease,
        now: u64,
        change: LeaseChange,
    ) {
        if !lease.write {
            return;
        }
        if lease.expires <= now {
            self.record(lease.expires, ino, node, lease.epoch, LeaseChange::Expired);
        } else {
            self.record(now, ino, node, lease.epoch, change);
        }
    }

    /// Grants a lease and records in the history what it changes for
    /// writing: the end of other hosts' expired write leases (gone before
    /// this one begins), of this host's own expired or downgraded one, and
    /// the beginning of a write lease.
    pub(super) fn grant(
        &mut self,
        node: NodeId,
        ino: Ino,
        write: bool,
        now: u64,
        ttl: u64,
    ) -> Result<Reply, MetaError> {
        let before: Vec<(NodeId, Lease)> = self.leases(ino);
        let r = self.grant_quiet(node, ino, write, now, ttl)?;
        let Reply::Lease(new) = r else { return Ok(r) };
        if write {
            for &(other, l) in &before {
                if other != node && l.write && l.expires <= now {
                    self.leases.remove(&(ino, other));
                    self.record(l.expires, ino, other, l.epoch, LeaseChange::Expired);
                }
            }
        }
        let own = before.iter().find(|(n, _)| *n == node).map(|&(_, l)| l);
        let was_writing = match own {
            Some(l) if l.write && l.expires <= now => {
                self.record(l.expires, ino, node, l.epoch, LeaseChange::Expired);
                false
            }
            Some(l) if l.write && !write => {
                self.record(now, ino, node, l.epoch, LeaseChange::Released);
                false
            }
            Some(l) => l.write,
            None => false,
        };
        if write && !was_writing {
            self.record(now, ino, node, new.epoch, LeaseChange::Granted);
        }
        Ok(r)
    }

    /// Grants a lease without touching the history.
    pub(super) fn grant_quiet(
        &mut self,
        node: NodeId,
        ino: Ino,
        write: bool,
        now: u64,
        ttl: u64,
    ) -> Result<Reply, MetaError> {
        match self.node(ino).map(|(i, _)| i.attr.kind) {
            Some(Kind::File) => {}
            Some(_) => return Err(MetaError::IsDir),
            None => return Err(MetaError::NotFound),
        }
        if write && is_snapshot_ino(ino) {
            return Err(MetaError::Invalid("snapshots are read-only".into()));
        }
        if write {
            if let Some((&(_, other), _)) = self
                .leases
                .range((ino, 0)..=(ino, u64::MAX))
                .find(|(&(_, n), l)| n != node && l.write && l.expires > now)
            {
                return Err(MetaError::Busy(other));
            }
        }
        let epoch = match self.leases.get(&(ino, node)) {
            Some(l) if l.expires > now => l.epoch,
            _ => {
                self.next_epoch += 1;
                self.next_epoch
            }
        };
        let l = Lease {
            epoch,
            expires: now.saturating_add(ttl),
            write,
        };
        self.leases.insert((ino, node), l);
        Ok(Reply::Lease(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: u64, ino: Ino, node: NodeId, epoch: u64, change: LeaseChange) -> LeaseEvent {
        LeaseEvent {
            at,
            ino,
            node,
            epoch,
            change,
        }
    }

    #[test]
    fn every_change_keeps_its_name_and_code() {
        for c in [
            LeaseChange::Granted,
            LeaseChange::HandedIn { from: 3 },
            LeaseChange::Released,
            LeaseChange::Revoked,
            LeaseChange::HandedOff { to: 3 },
            LeaseChange::Expired,
        ] {
            assert_eq!(LeaseChange::parse(c.name(), c.peer()), Some(c));
            assert_eq!(LeaseChange::from_code(c.code(), c.peer()), Some(c));
        }
        assert_eq!(LeaseChange::parse("stolen", 0), None);
        assert_eq!(LeaseChange::from_code(6, 0), None);
    }

    #[test]
    fn a_hand_over_keeps_one_writer() {
        let h = [
            ev(10, 5, 1, 1, LeaseChange::Granted),
            ev(20, 5, 1, 1, LeaseChange::HandedOff { to: 2 }),
            ev(20, 5, 2, 2, LeaseChange::HandedIn { from: 1 }),
            ev(30, 5, 2, 2, LeaseChange::Released),
            // Another file's writer at the same time.
            ev(15, 6, 3, 1, LeaseChange::Granted),
        ];
        assert_eq!(check_lease_history(&h), Ok(()));
    }

    #[test]
    fn a_second_writer_is_named() {
        let h = [
            ev(10, 5, 1, 1, LeaseChange::Granted),
            ev(20, 5, 2, 2, LeaseChange::Granted),
        ];
        let e = check_lease_history(&h).unwrap_err();
        assert_eq!(
            e,
            HistoryError::SecondWriter {
                index: 1,
                node: 2,
                ino: 5,
                epoch: 2,
                at: 20,
                holder: 1,
                held_epoch: 1
            }
        );
        assert!(e.to_string().contains("while host 1 holds it"), "{e}");
    }

    #[test]
    fn an_end_without_a_beginning_passes_only_first() {
        // The beginning fell out of the kept history.
        let h = [
            ev(10, 5, 1, 1, LeaseChange::Expired),
            ev(20, 5, 2, 2, LeaseChange::Granted),
        ];
        assert_eq!(check_lease_history(&h), Ok(()));
        let h = [
            ev(10, 5, 1, 1, LeaseChange::Granted),
            ev(20, 5, 1, 1, LeaseChange::Released),
            ev(30, 5, 2, 1, LeaseChange::Revoked),
        ];
        assert_eq!(
            check_lease_history(&h),
            Err(HistoryError::NotHeld {
                index: 2,
                node: 2,
                ino: 5
            })
        );
    }
}
