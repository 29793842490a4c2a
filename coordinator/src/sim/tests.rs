//! Scenarios on the simulated network: elections and failover with many
//! hosts, partitions, a lossy and slow network, and rolling upgrades.

use super::*;
use crate::group::Machine;
use crate::proto::{command, volume_op, CreateOp, ErrorCode, NodeKind};

fn create(name: &str, lease_for: u64) -> request::Body {
    request::Body::Op(proto::VolumeOp {
        op: Some(volume_op::Op::Create(CreateOp {
            parent: crate::meta::ROOT,
            name: name.into(),
            kind: NodeKind::File as i32,
            mode: 0o644,
            lease_node: lease_for,
            lease_ttl: if lease_for == 0 { 0 } else { 30_000 },
            ..Default::default()
        })),
    })
}

fn has_file(sim: &Sim, host: u64, vol: u64, name: &str) -> bool {
    match sim
        .host(host)
        .and_then(|h| h.group(vol))
        .map(|g| g.machine())
    {
        Some(Machine::Volume(v)) => v.lookup(crate::meta::ROOT, name).is_ok(),
        _ => false,
    }
}

fn everywhere(sim: &Sim, vol: u64, name: &str) -> bool {
    sim.running().iter().all(|h| has_file(sim, *h, vol, name))
}

/// A cluster of `n` hosts with Volume1, its groups led.
fn cluster(n: u64, levels: &BTreeMap<u64, u32>) -> Sim {
    let mut sim = Sim::new(n, levels);
    sim.elect(CLUSTER, 1_000)
        .expect("a leader of the cluster group");
    sim.add_volume(1).expect("Volume1 added");
    sim.run_until(1_000, |s| {
        s.running()
            .iter()
            .all(|h| s.host(*h).is_some_and(|h| h.group(1).is_some()))
    })
    .expect("every host hosts a replica of Volume1");
    sim.elect(1, 1_000).expect("a leader of Volume1");
    sim
}

#[test]
fn sixteen_hosts_elect_a_new_leader_when_the_leader_dies() {
    let mut sim = cluster(16, &BTreeMap::new());
    sim.call(1, create("before", 0), 500)
        .expect("a create commits");
    let old = sim.leader(1).expect("a leader");
    assert_eq!(
        sim.host(1)
            .and_then(|h| h.group(1))
            .map(|g| g.status().voters.len()),
        Some(16),
        "every host votes in Volume1's group"
    );
    sim.crash(old);
    let took = sim
        .run_until(1_000, |s| s.leader(1).is_some_and(|l| l != old))
        .expect("a new leader among the 15 left");
    // Followers wait 10-20 ticks for the dead leader, then one pre-vote
    // and one vote round: well within 60 ticks.
    assert!(took <= 60, "the election took {took} ticks");
    sim.call(1, create("after", 0), 500)
        .expect("a create commits under the new leader");
    sim.run_until(500, |s| everywhere(s, 1, "after"))
        .expect("every running replica applies it");
    assert!(everywhere(&sim, 1, "before"));
    sim.restart(old, crate::features::SUPPORTED);
    sim.run_until(1_000, |s| has_file(s, old, 1, "after"))
        .expect("the restarted host catches up");
    assert!(sim.stopped.is_empty(), "{:?}", sim.stopped);
}

#[test]
fn a_partitioned_minority_stops_while_the_majority_goes_on() {
    let mut sim = cluster(16, &BTreeMap::new());
    let old = sim.leader(1).expect("a leader");
    // The leader and six others on one side, nine on the other.
    let mut minority: BTreeSet<u64> = BTreeSet::from([old]);
    minority.extend((1..=16).filter(|h| *h != old).take(6));
    let majority: BTreeSet<u64> = (1..=16).filter(|h| !minority.contains(h)).collect();
    sim.partition(vec![minority.clone(), majority.clone()]);
    let new = |s: &Sim| -> Option<u64> {
        majority.iter().copied().find(|h| {
            s.host(*h)
                .and_then(|x| x.group(1))
                .is_some_and(|g| g.is_leader())
                && majority
                    .iter()
                    .filter(|m| {
                        s.host(**m).and_then(|x| x.group(1)).map(|g| g.leader()) == Some(*h)
                    })
                    .count()
                    == majority.len()
        })
    };
    sim.run_until(1_000, |s| new(s).is_some())
        .expect("the majority elects a leader of its own");
    let leader = new(&sim).expect("the majority's leader");
    let r = sim.ask(leader, 1, create("during", 0), 500);
    assert!(
        matches!(r.and_then(|r| r.result), Some(response::Result::Reply(_))),
        "the majority commits"
    );
    // The old leader cannot: check_quorum makes it step down, and what it
    // was asked never commits.
    let r = sim.ask(old, 1, create("lost", 0), 100);
    assert!(
        !matches!(r.and_then(|r| r.result), Some(response::Result::Reply(_))),
        "a minority committed"
    );
    sim.run_until(200, |s| {
        !s.host(old)
            .and_then(|h| h.group(1))
            .is_some_and(|g| g.is_leader())
    })
    .expect("the old leader steps down");
    assert!(minority.iter().all(|h| !has_file(&sim, *h, 1, "during")));
    sim.heal();
    sim.run_until(1_000, |s| everywhere(s, 1, "during"))
        .expect("the minority catches up once the partition heals");
    assert!(sim.running().iter().all(|h| !has_file(&sim, *h, 1, "lost")));
    assert!(sim.leader(1).is_some());
}

#[test]
fn commands_commit_through_a_lossy_slow_network() {
    let mut sim = cluster(16, &BTreeMap::new());
    sim.set_drop(0.1);
    sim.set_delay(3);
    for i in 0..10 {
        sim.call(1, create(&format!("f{i}"), 0), 2_000)
            .unwrap_or_else(|e| panic!("create f{i}: {}", e.message));
    }
    sim.set_drop(0.0);
    sim.run_until(1_000, |s| everywhere(s, 1, "f9"))
        .expect("every replica applies them");
    assert!((0..10).all(|i| everywhere(&sim, 1, &format!("f{i}"))));
}

fn level(sim: &Sim) -> u32 {
    sim.leader(CLUSTER)
        .and_then(|l| sim.host(l))
        .and_then(|h| h.cluster())
        .map_or(0, |c| c.feature_level())
}

#[test]
fn a_cluster_raises_its_feature_level_once_every_host_supports_it() {
    // Host 3 runs an older build: it supports the base level only.
    let mut sim = cluster(3, &BTreeMap::from([(3, crate::features::BASE)]));
    sim.run_until(800, |s| {
        s.host(1)
            .and_then(|h| h.cluster())
            .is_some_and(|c| (1..=3).all(|n| c.level_of(n).is_some()))
    })
    .expect("every host reports its level");
    assert_eq!(level(&sim), crate::features::BASE);
    let e = sim
        .call(1, create("leased", 1), 300)
        .expect_err("a create carrying its lease needs level 2");
    assert_eq!(e.code(), ErrorCode::FeatureLevel, "{}", e.message);
    sim.call(1, create("plain", 0), 300)
        .expect("a plain create works at level 1");
    // Host 3 is upgraded.
    sim.crash(3);
    sim.restart(3, crate::features::SUPPORTED);
    sim.run_until(1_500, |s| level(s) == crate::features::SUPPORTED)
        .expect("the cluster's level rises once host 3 supports this build's");
    let r = sim
        .call(1, create("leased", 1), 500)
        .expect("a create carrying its lease works at level 2");
    assert!(
        matches!(r.value, Some(proto::reply::Value::Created(_))),
        "{r:?}"
    );
    assert!(sim.stopped.is_empty(), "{:?}", sim.stopped);
}

#[test]
fn a_replica_refuses_a_command_above_its_level() {
    let mut sim = cluster(3, &BTreeMap::from([(3, crate::features::BASE)]));
    // What the leader's gate prevents, forced: a level-2 command in the log.
    let leader = sim.leader(1).expect("a leader");
    let body = match create("forced", 1) {
        request::Body::Op(op) => command::Body::Volume(op),
        _ => unreachable!(),
    };
    sim.host_mut(leader)
        .and_then(|h| h.group_mut(1))
        .expect("the leader's replica")
        .propose_internal(body);
    sim.run_until(500, |s| s.stopped.contains_key(&3))
        .expect("host 3 stops at the command");
    let why = &sim.stopped[&3];
    assert!(
        why.contains("needs feature level 2") && why.contains("supports 1"),
        "{why}"
    );
    let others: Vec<u64> = (1..=2).collect();
    sim.run_until(300, |s| others.iter().all(|h| has_file(s, *h, 1, "forced")))
        .expect("hosts that support it apply it");
}
