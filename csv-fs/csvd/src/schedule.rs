//! Scheduled snapshots (`csvctl snapshot schedule`), as Data Protection
//! Manager protects a cluster shared volume every 15 minutes.
//!
//! Every csvd runs this loop; only the host leading the cluster group
//! acts. The schedules and their run state live in the cluster registry
//! (replicated), so a new leader carries on where the last one stopped:
//!
//! - a volume's run is due `every` after the last run started (the first
//!   at once); the leader records the run as going (`schedule_state`),
//!   takes the snapshot through the whole freeze protocol
//!   ([`coordinator::snapshot_run`]), applies the retention rule to the
//!   scheduled snapshots (names `auto-...`; snapshots taken by hand are
//!   never deleted here), and records how it went;
//! - one run at a time per volume: a run that outlasts the interval makes
//!   the slots it covered skipped (counted, with the reason), and the next
//!   run waits for the next slot;
//! - a run recorded as going by a host that is down in the registry, or
//!   for longer than its freeze limit and [`ABANDON_AFTER`], was cut off
//!   (a leader killed mid-run): it is recorded as failed and the schedule
//!   goes on. Such a run left no frozen host (each thaws by itself at the
//!   freeze limit) and no half-made snapshot (the commit is one metadata
//!   command, made while every host was frozen).

use coordinator::client::{self, Client};
use coordinator::group::now_ms;
use coordinator::proto::{self, ScheduleRun, SnapshotSchedule};
use coordinator::snapshot_run;
use coordinator::wire::Identity;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the leader looks at the schedules.
const TICK: Duration = Duration::from_millis(250);
/// A run recorded as going this long past its freeze limit was cut off.
pub const ABANDON_AFTER: Duration = Duration::from_secs(30);
/// Names of scheduled snapshots start with this.
pub const PREFIX: &str = "auto-";

/// The scheduler of this host.
pub struct Scheduler {
    /// This host's id.
    pub node: u64,
    /// Who it is to other hosts (as a client).
    pub identity: Identity,
    /// This host's address first, then the others.
    pub endpoints: Vec<SocketAddr>,
}

/// When a schedule's next run is due (ms): at once for a new one; else
/// the first slot (`every` apart from the last start) after the last run
/// ended.
pub fn next_due(s: &SnapshotSchedule) -> u64 {
    let Some(l) = &s.last else {
        return s.created_ms;
    };
    let every = s.every_ms.max(1);
    let took = l.ended_ms.saturating_sub(l.started_ms);
    l.started_ms + every * took.div_ceil(every).max(1)
}

/// Slots a run from `started` to `ended` covered beyond its own: the runs
/// it made skip.
pub fn skipped_slots(every_ms: u64, started: u64, ended: u64) -> u64 {
    ended
        .saturating_sub(started)
        .div_ceil(every_ms.max(1))
        .saturating_sub(1)
}

/// The scheduled snapshots to delete: all but the newest `keep` and the
/// newest of each of the last `keep_daily` days (UTC) before `now`.
/// `snaps` are (name, created ms); only `auto-` names are considered.
pub fn expired(snaps: &[(String, u64)], keep: u32, keep_daily: u32, now: u64) -> Vec<String> {
    let mut auto: Vec<&(String, u64)> = snaps
        .iter()
        .filter(|(n, _)| n.starts_with(PREFIX))
        .collect();
    auto.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut kept: Vec<&str> = auto
        .iter()
        .take(keep as usize)
        .map(|(n, _)| n.as_str())
        .collect();
    let today = now / 86_400_000;
    let mut days = std::collections::BTreeSet::new();
    for (n, c) in &auto {
        let day = c / 86_400_000;
        if today.saturating_sub(day) < u64::from(keep_daily) && days.insert(day) {
            kept.push(n);
        }
    }
    auto.iter()
        .filter(|(n, _)| !kept.contains(&n.as_str()))
        .map(|(n, _)| n.clone())
        .collect()
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("node", &self.node)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    fn client(&self) -> Client {
        Client::new(self.identity.clone(), self.endpoints.clone())
    }

    /// Runs until `stop`.
    pub fn run(self, stop: Arc<AtomicBool>) {
        let me = Arc::new(self);
        let mut runs: BTreeMap<u64, JoinHandle<()>> = BTreeMap::new();
        let mut c = me.client();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            runs.retain(|_, h| !h.is_finished());
            let leads = me
                .endpoints
                .first()
                .is_some_and(|a| client::leads_cluster(&me.identity, *a));
            if !leads {
                continue;
            }
            let Ok(info) = c.with_patience(Duration::from_secs(2), |c| c.cluster_info()) else {
                continue;
            };
            let now = now_ms();
            for s in &info.schedules {
                if runs.contains_key(&s.volume) {
                    continue;
                }
                if s.running_since_ms != 0 {
                    me.maybe_abandon(&mut c, &info, s, now);
                    continue;
                }
                if now < next_due(s) {
                    continue;
                }
                let mut going = s.clone();
                going.running_since_ms = now;
                going.running_on = me.node;
                going.last = None;
                if let Err(e) = c.schedule_state(going) {
                    tracing::warn!(
                        "schedule of Volume{}: cannot record the run: {}",
                        s.volume,
                        client::describe(&e)
                    );
                    continue;
                }
                let (m, s) = (me.clone(), s.clone());
                runs.insert(s.volume, std::thread::spawn(move || m.run_once(&s, now)));
            }
        }
        for (_, h) in runs {
            let _ = h.join();
        }
    }

    /// Records a run that was cut off (its host down, or gone far past
    /// its freeze limit).
    fn maybe_abandon(
        &self,
        c: &mut Client,
        info: &proto::ClusterInfo,
        s: &SnapshotSchedule,
        now: u64,
    ) {
        let host_down = info.health.iter().any(|h| h.node == s.running_on && !h.up)
            || !info.nodes.iter().any(|n| n.id == s.running_on);
        let limit = s.freeze_limit_ms + ABANDON_AFTER.as_millis() as u64;
        let overdue = now.saturating_sub(s.running_since_ms) > limit;
        // This host's own run (a csvd restarted mid-run) waits for the
        // limit; another's ends when its host is down.
        let cut_off = overdue || (host_down && s.running_on != self.node);
        if !cut_off {
            return;
        }
        let why = if host_down {
            format!(
                "the run on host {} was cut off (the host is down); no host stays frozen past the freeze limit, and the snapshot was made whole or not at all",
                s.running_on
            )
        } else {
            format!(
                "the run on host {} did not end within {} s",
                s.running_on,
                limit / 1000
            )
        };
        tracing::warn!("schedule of Volume{}: {why}", s.volume);
        let mut done = s.clone();
        done.last = Some(ScheduleRun {
            started_ms: s.running_since_ms,
            ended_ms: now,
            ok: false,
            error: why,
            host: s.running_on,
            ..Default::default()
        });
        done.running_since_ms = 0;
        done.running_on = 0;
        done.runs += 1;
        done.failures += 1;
        let _ = c.schedule_state(done);
    }

    /// One run: the snapshot, the retention rule, and the record.
    fn run_once(&self, s: &SnapshotSchedule, started: u64) {
        let mut c = self.client();
        let vol = s.volume;
        let name = snapshot_run::default_name("auto", started);
        let limit = Duration::from_millis(s.freeze_limit_ms.clamp(100, 600_000));
        let mut run = ScheduleRun {
            started_ms: started,
            host: self.node,
            ..Default::default()
        };
        match snapshot_run::take(&self.identity, &mut c, vol, &name, limit) {
            Ok(t) => {
                run.ok = true;
                run.snapshot = t.name;
                run.held_ms = t.hosts.iter().map(|(_, r)| r.held_ms).max().unwrap_or(0);
                match self.retain(&mut c, s) {
                    Ok((deleted, held)) => {
                        run.deleted = deleted;
                        run.space_held = held;
                    }
                    Err(e) => {
                        run.ok = false;
                        run.error = format!("snapshot {name} taken; retention failed: {e}");
                    }
                }
                tracing::info!(
                    "schedule of Volume{vol}: snapshot {name} taken (writes held {} ms), {} deleted",
                    run.held_ms,
                    run.deleted
                );
            }
            Err(e) => {
                tracing::warn!("schedule of Volume{vol}: {e}");
                run.error = e;
            }
        }
        run.ended_ms = now_ms();
        // The counters as they are now (only the leader writes them).
        let cur = c
            .with_patience(Duration::from_secs(10), |c| c.cluster_info())
            .ok()
            .and_then(|i| i.schedules.into_iter().find(|x| x.volume == vol));
        let Some(mut done) = cur else {
            return; // The schedule was removed meanwhile.
        };
        let missed = skipped_slots(done.every_ms, run.started_ms, run.ended_ms);
        if missed > 0 {
            done.skipped += missed;
            done.last_skip = format!(
                "{missed} run(s) skipped: the run from {} ms took {} ms, longer than the interval of {} ms",
                run.started_ms,
                run.ended_ms - run.started_ms,
                done.every_ms
            );
        }
        done.runs += 1;
        if !run.ok {
            done.failures += 1;
        }
        done.last = Some(run);
        done.running_since_ms = 0;
        done.running_on = 0;
        if let Err(e) = c.with_patience(Duration::from_secs(10), |c| c.schedule_state(done)) {
            tracing::warn!(
                "schedule of Volume{vol}: cannot record the run's end: {}",
                client::describe(&e)
            );
        }
    }

    /// Deletes the scheduled snapshots the rule no longer keeps; how many,
    /// and the bytes the remaining scheduled ones hold on their own.
    fn retain(&self, c: &mut Client, s: &SnapshotSchedule) -> Result<(u64, u64), String> {
        let list = c.snapshots(s.volume).map_err(|e| client::describe(&e))?;
        let snaps: Vec<(String, u64)> = list.iter().map(|x| (x.name.clone(), x.created)).collect();
        let gone = expired(&snaps, s.keep, s.keep_daily, now_ms());
        for n in &gone {
            c.delete_snapshot(s.volume, n)
                .map_err(|e| format!("deleting {n}: {}", client::describe(&e)))?;
        }
        let held = c
            .snapshots(s.volume)
            .map_err(|e| client::describe(&e))?
            .iter()
            .filter(|x| x.name.starts_with(PREFIX))
            .map(|x| x.exclusive)
            .sum();
        Ok((gone.len() as u64, held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_due_a_slot_after_the_last_and_long_runs_skip_slots() {
        let mut s = SnapshotSchedule {
            every_ms: 1000,
            created_ms: 50,
            ..Default::default()
        };
        assert_eq!(next_due(&s), 50, "a new schedule runs at once");
        s.last = Some(ScheduleRun {
            started_ms: 10_000,
            ended_ms: 10_300,
            ..Default::default()
        });
        assert_eq!(next_due(&s), 11_000);
        // A run of 2.5 intervals: the next at the third slot, two skipped.
        s.last = Some(ScheduleRun {
            started_ms: 10_000,
            ended_ms: 12_500,
            ..Default::default()
        });
        assert_eq!(next_due(&s), 13_000);
        assert_eq!(skipped_slots(1000, 10_000, 12_500), 2);
        assert_eq!(skipped_slots(1000, 10_000, 10_900), 0);
    }

    #[test]
    fn retention_keeps_the_newest_and_one_a_day_and_never_hand_made_ones() {
        let day = 86_400_000u64;
        let now = 10 * day + 5000;
        let mut snaps: Vec<(String, u64)> = (0..6)
            .map(|i| (format!("auto-{i}"), now - i * 1000))
            .collect();
        // Older ones, one on each of the three days before.
        snaps.push(("auto-d1".into(), now - day));
        snaps.push(("auto-d2".into(), now - 2 * day));
        snaps.push(("auto-d3".into(), now - 3 * day));
        snaps.push(("by-hand".into(), 1));
        let mut gone = expired(&snaps, 3, 0, now);
        gone.sort();
        assert_eq!(
            gone,
            ["auto-3", "auto-4", "auto-5", "auto-d1", "auto-d2", "auto-d3"]
        );
        // Three days of dailies: today's newest is kept anyway, and the
        // newest of each of the two days before.
        let mut gone = expired(&snaps, 3, 3, now);
        gone.sort();
        assert_eq!(gone, ["auto-3", "auto-4", "auto-5", "auto-d3"]);
    }
}
