//! A simulated network for many hosts in one process, as raft-rs's
//! `harness` keeps one: every host is a real [`Host`] (its groups, their
//! storage in a [`MemEnv`], its housekeeping), driven tick by tick from one
//! thread, and the messages between them go through a [`Net`] that can
//! drop them, delay them and cut hosts apart. Hosts crash (losing what
//! their storage had not synced) and start again.
//!
//! Time: a tick is `TICK` of real time (the groups' leases, read
//! deadlines and housekeeping follow the wall clock), so a scenario of
//! 1,000 ticks takes about 10 s.

use crate::env::MemEnv;
use crate::group::{Outbox, Timing, CLUSTER};
use crate::host::{Book, Host, HostConfig};
use crate::proto::{self, request, response, Request, Response};
use raft::eraftpb::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

mod tests;

/// One tick of the simulated hosts.
const TICK: Duration = Duration::from_millis(10);

/// What the network does to messages.
#[derive(Debug, Default)]
struct Net {
    /// Messages on their way: (tick due, group, message).
    flight: Vec<(u64, u64, Message)>,
    /// Share of messages lost (0..1).
    drop: f64,
    /// Extra ticks a message takes, at most (chosen per message).
    delay: u64,
    /// Hosts that can only reach the hosts of their own side.
    sides: Vec<BTreeSet<u64>>,
    rng: u64,
}

impl Net {
    fn random(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, enough for dice.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        self.sides.is_empty() || self.sides.iter().any(|s| s.contains(&a) == s.contains(&b))
    }

    fn send(&mut self, now: u64, group: u64, m: Message) {
        if !self.connected(m.from, m.to) {
            return;
        }
        if self.drop > 0.0 && (self.random() % 10_000) as f64 / 10_000.0 < self.drop {
            return;
        }
        let delay = if self.delay == 0 {
            0
        } else {
            self.random() % (self.delay + 1)
        };
        self.flight.push((now + delay, group, m));
    }
}

/// Collects what a host sends during one ready.
#[derive(Default)]
struct Sent(Vec<(u64, Message)>);

impl Outbox for Sent {
    fn send(&mut self, group: u64, msgs: Vec<Message>) {
        self.0.extend(msgs.into_iter().map(|m| (group, m)));
    }
}

/// A host of the simulation.
struct SimHost {
    /// Running (None: crashed).
    host: Option<Host>,
    env: MemEnv,
    cfg: HostConfig,
    book: Book,
}

/// Many hosts and the network between them.
pub(crate) struct Sim {
    hosts: BTreeMap<u64, SimHost>,
    /// Hosts that stopped because a ready failed, and why.
    pub(crate) stopped: BTreeMap<u64, String>,
    net: Net,
    now: u64,
    client: u64,
    seq: u64,
}

/// The timing of simulated groups: elections after 10-20 ticks.
pub(crate) fn timing() -> Timing {
    Timing {
        tick: TICK,
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_every: 256,
        request_timeout: Duration::from_secs(2),
    }
}

impl Sim {
    /// `n` founding hosts (ids 1..=n) supporting `level` each (the
    /// build's own unless a test says otherwise).
    pub(crate) fn new(n: u64, levels: &BTreeMap<u64, u32>) -> Sim {
        let addrs: BTreeMap<u64, Vec<String>> = (1..=n)
            .map(|i| (i, vec![format!("10.0.0.{i}:7100")]))
            .collect();
        let mut hosts = BTreeMap::new();
        for id in 1..=n {
            let cfg = HostConfig {
                node: id,
                data_dir: "/csv".into(),
                init: true,
                timing: timing(),
                level: levels
                    .get(&id)
                    .copied()
                    .unwrap_or(crate::features::SUPPORTED),
            };
            let env = MemEnv::new();
            let book: Book = Arc::new(RwLock::new(addrs.clone()));
            #[allow(clippy::unwrap_used)]
            let host = Host::open(&cfg, Arc::new(env.clone()), book.clone()).unwrap();
            hosts.insert(
                id,
                SimHost {
                    host: Some(host),
                    env,
                    cfg,
                    book,
                },
            );
        }
        Sim {
            hosts,
            stopped: BTreeMap::new(),
            net: Net {
                rng: 0x9e37_79b9_7f4a_7c15,
                ..Net::default()
            },
            now: 0,
            client: 7,
            seq: 0,
        }
    }

    /// Loses `share` of the messages (0..1).
    pub(crate) fn set_drop(&mut self, share: f64) {
        self.net.drop = share;
    }

    /// Delays each message by up to `ticks`.
    pub(crate) fn set_delay(&mut self, ticks: u64) {
        self.net.delay = ticks;
    }

    /// Cuts the network into sides; a host on none of them is cut from
    /// every side.
    pub(crate) fn partition(&mut self, sides: Vec<BTreeSet<u64>>) {
        self.net.sides = sides;
        let mut flight = std::mem::take(&mut self.net.flight);
        flight.retain(|(_, _, m)| self.net.connected(m.from, m.to));
        self.net.flight = flight;
    }

    /// Ends every partition.
    pub(crate) fn heal(&mut self) {
        self.net.sides.clear();
    }

    /// Kills a host: what its storage had not synced is lost.
    pub(crate) fn crash(&mut self, id: u64) {
        if let Some(h) = self.hosts.get_mut(&id) {
            h.host = None;
            h.env.crash(0);
        }
        self.net.flight.retain(|(_, _, m)| m.to != id);
    }

    /// Starts a crashed host again on its storage, supporting `level`.
    pub(crate) fn restart(&mut self, id: u64, level: u32) {
        if let Some(h) = self.hosts.get_mut(&id) {
            h.cfg.level = level;
            h.cfg.init = false;
            #[allow(clippy::unwrap_used)]
            let host = Host::open(&h.cfg, Arc::new(h.env.clone()), h.book.clone()).unwrap();
            h.host = Some(host);
        }
    }

    /// A running host.
    pub(crate) fn host(&self, id: u64) -> Option<&Host> {
        self.hosts.get(&id).and_then(|h| h.host.as_ref())
    }

    /// The ids of the running hosts.
    pub(crate) fn running(&self) -> Vec<u64> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.host.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// One tick: messages due are delivered and every host handles its
    /// ready (a few rounds, so a round trip fits in a tick), then every
    /// host ticks.
    pub(crate) fn tick(&mut self) {
        let deadline = Instant::now() + TICK;
        for _ in 0..4 {
            let due: Vec<(u64, Message)>;
            {
                let now = self.now;
                let (d, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.net.flight)
                    .into_iter()
                    .partition(|(t, _, _)| *t <= now);
                self.net.flight = later;
                due = d.into_iter().map(|(_, g, m)| (g, m)).collect();
            }
            for (g, m) in due {
                if let Some(h) = self.hosts.get_mut(&m.to).and_then(|h| h.host.as_mut()) {
                    h.step(g, vec![m]);
                }
            }
            let mut sent = Sent::default();
            for (id, h) in self.hosts.iter_mut() {
                if let Some(host) = h.host.as_mut() {
                    if let Err(e) = host.ready(&mut sent) {
                        // As the real node does: the host stops.
                        self.stopped.insert(*id, crate::service::error_chain(&e));
                        h.host = None;
                    }
                }
            }
            if sent.0.is_empty() {
                break;
            }
            for (g, m) in sent.0 {
                self.net.send(self.now, g, m);
            }
        }
        for h in self.hosts.values_mut() {
            if let Some(host) = h.host.as_mut() {
                host.tick();
            }
        }
        self.now += 1;
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    }

    /// Runs ticks until `done` holds, at most `max`; the ticks it took.
    pub(crate) fn run_until(
        &mut self,
        max: u64,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<u64> {
        for t in 0..max {
            if done(self) {
                return Some(t);
            }
            self.tick();
        }
        done(self).then_some(max)
    }

    /// The leader of `group` that a majority of the running hosts follow
    /// (None: no such leader).
    pub(crate) fn leader(&self, group: u64) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        let mut n = 0;
        for id in self.running() {
            if let Some(g) = self.host(id).and_then(|h| h.group(group)) {
                n += 1;
                if g.leader() != 0 {
                    *votes.entry(g.leader()).or_default() += 1;
                }
            }
        }
        votes
            .into_iter()
            .find(|(l, v)| {
                *v * 2 > n
                    && self
                        .host(*l)
                        .and_then(|h| h.group(group))
                        .is_some_and(|g| g.is_leader())
            })
            .map(|(l, _)| l)
    }

    /// Sends a request to the leader of `group` as a client would:
    /// following redirects, retrying while there is none, for at most
    /// `max` ticks.
    pub(crate) fn call(
        &mut self,
        group: u64,
        body: request::Body,
        max: u64,
    ) -> Result<proto::Reply, proto::Error> {
        self.seq += 1;
        let seq = self.seq;
        let running = self.running();
        let mut target = self.leader(group).unwrap_or(running[0]);
        let mut tries = 0usize;
        let start = self.now;
        while self.now - start < max {
            let (tx, rx) = mpsc::channel();
            let req = Request {
                client: self.client,
                seq,
                group,
                body: Some(body.clone()),
            };
            match self.hosts.get_mut(&target).and_then(|h| h.host.as_mut()) {
                Some(h) => h.request(req, tx),
                None => {
                    tries += 1;
                    target = running[tries % running.len()];
                    continue;
                }
            }
            let resp = loop {
                if let Ok(r) = rx.try_recv() {
                    break Some(r);
                }
                if self.now - start >= max {
                    break None;
                }
                self.tick();
            };
            match resp.and_then(|r: Response| r.result) {
                Some(response::Result::Reply(r)) => return Ok(r),
                Some(response::Result::Error(e)) if e.code() != proto::ErrorCode::Unavailable => {
                    return Err(e)
                }
                Some(response::Result::Redirect(r)) if r.leader != 0 => target = r.leader,
                _ => {
                    tries += 1;
                    target = self.leader(group).unwrap_or(running[tries % running.len()]);
                    self.tick();
                }
            }
        }
        Err(proto::error(
            proto::ErrorCode::Unavailable,
            format!("no answer from group {group} in {max} ticks"),
        ))
    }

    /// Sends a request to one host and waits up to `max` ticks for its
    /// answer (None: none came).
    pub(crate) fn ask(
        &mut self,
        host: u64,
        group: u64,
        body: request::Body,
        max: u64,
    ) -> Option<Response> {
        self.seq += 1;
        let (tx, rx) = mpsc::channel();
        let req = Request {
            client: self.client,
            seq: self.seq,
            group,
            body: Some(body),
        };
        self.hosts.get_mut(&host)?.host.as_mut()?.request(req, tx);
        for _ in 0..max {
            if let Ok(r) = rx.try_recv() {
                return Some(r);
            }
            self.tick();
        }
        rx.try_recv().ok()
    }

    /// A running host, to act on one of its groups directly.
    pub(crate) fn host_mut(&mut self, id: u64) -> Option<&mut Host> {
        self.hosts.get_mut(&id).and_then(|h| h.host.as_mut())
    }

    /// Runs until every running host has a leader for `group` that a
    /// majority follows; the ticks it took.
    pub(crate) fn elect(&mut self, group: u64, max: u64) -> Option<u64> {
        self.run_until(max, |s| s.leader(group).is_some())
    }

    /// Adds VolumeN to the cluster; every host opens its replica.
    pub(crate) fn add_volume(&mut self, number: u64) -> Result<proto::Reply, proto::Error> {
        let op = proto::ClusterOp {
            op: Some(proto::cluster_op::Op::AddVolume(proto::VolumeInfo {
                number,
                lun: format!("/luns/{number}"),
                data_start: 1 << 20,
                capacity: 1 << 30,
                ..Default::default()
            })),
        };
        self.call(CLUSTER, request::Body::Cluster(op), 1_000)
    }
}
