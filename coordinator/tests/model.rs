//! The volume state machine against simple models: a map of paths for the
//! namespace, and the allocator's books for space and leases.

// Test helpers fail loudly on purpose.
#![allow(clippy::unwrap_used)]

use coordinator::meta::{
    check_lease_history, Kind, LeaseChange, MetaError, Op, Reply, Volume, ROOT,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Step {
    Mkdir(usize, usize),
    Create(usize, usize),
    Unlink(usize),
    Rmdir(usize),
    Rename(usize, usize, usize),
    Link(usize, usize, usize),
    Allocate(usize, u64, u64),
    Truncate(usize, u64),
    Lease(usize, u64),
    Revoke(usize, u64),
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let i = 0usize..16;
    let n = 0usize..3;
    prop_oneof![
        (i.clone(), n.clone()).prop_map(|(d, n)| Step::Mkdir(d, n)),
        (i.clone(), n.clone()).prop_map(|(d, n)| Step::Create(d, n)),
        i.clone().prop_map(Step::Unlink),
        i.clone().prop_map(Step::Rmdir),
        (i.clone(), i.clone(), n.clone()).prop_map(|(a, d, n)| Step::Rename(a, d, n)),
        (i.clone(), i.clone(), n).prop_map(|(a, d, n)| Step::Link(a, d, n)),
        (i.clone(), 0u64..200, 1u64..120).prop_map(|(f, o, l)| Step::Allocate(f, o, l)),
        (i.clone(), 0u64..150).prop_map(|(f, s)| Step::Truncate(f, s)),
        (i.clone(), 1u64..4).prop_map(|(f, n)| Step::Lease(f, n)),
        (i, 1u64..4).prop_map(|(f, n)| Step::Revoke(f, n)),
        (1u64..50).prop_map(Step::Tick),
    ]
}

/// The namespace as paths -> (kind, inode), walked from the root.
fn tree(v: &Volume) -> BTreeMap<Vec<String>, (Kind, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(Vec::new(), ROOT)];
    while let Some((path, dir)) = stack.pop() {
        for (name, ino) in v.readdir(dir).unwrap() {
            let mut p = path.clone();
            p.push(name);
            let kind = v.getattr(ino).unwrap().kind;
            if kind == Kind::Dir {
                stack.push((p.clone(), ino));
            }
            out.insert(p, (kind, ino));
        }
    }
    out
}

/// The model: path -> (kind, model inode id).
type Model = BTreeMap<Vec<String>, (Kind, u64)>;

fn pick(paths: &[Vec<String>], i: usize) -> Option<&Vec<String>> {
    (!paths.is_empty()).then(|| &paths[i % paths.len()])
}

fn ino_of(v: &Volume, path: &[String]) -> Option<u64> {
    let mut cur = ROOT;
    for n in path {
        cur = v.lookup(cur, n).ok()?;
    }
    Some(cur)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn namespace_and_space_follow_the_models(steps in prop::collection::vec(step(), 1..60)) {
        let mut v = Volume::new(1000, 1600, 0);
        let mut m: Model = BTreeMap::new();
        let mut next_model_ino = 100u64;
        let mut now = 0u64;
        let mut max_ino = ROOT;
        for s in steps {
            now += 1;
            let dirs: Vec<Vec<String>> = std::iter::once(Vec::new()).chain(m.iter().filter(|(_, (k, _))| *k == Kind::Dir).map(|(p, _)| p.clone())).collect();
            let all: Vec<Vec<String>> = m.keys().cloned().collect();
            let files: Vec<Vec<String>> = m.iter().filter(|(_, (k, _))| *k == Kind::File).map(|(p, _)| p.clone()).collect();
            match s {
                Step::Mkdir(d, n) | Step::Create(d, n) => {
                    let kind = if matches!(s, Step::Mkdir(..)) { Kind::Dir } else { Kind::File };
                    let dir = &dirs[d % dirs.len()];
                    let mut p = dir.clone();
                    p.push(NAMES[n].to_string());
                    let parent = ino_of(&v, dir).unwrap();
                    // Every other file is made with its creator's write lease.
                    let lease = (kind == Kind::File && n % 2 == 1).then_some((1, 20));
                    let r = v.apply(Op::Create { parent, name: NAMES[n].into(), kind, mode: 0o644, uid: 0, gid: 0, target: String::new(), rdev: 0, umask: None, now, lease });
                    match m.entry(p) {
                        std::collections::btree_map::Entry::Occupied(_) => {
                            prop_assert_eq!(r, Err(MetaError::Exists));
                        }
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            let a = match r {
                                Ok(Reply::Attr(a)) if lease.is_none() => a,
                                Ok(Reply::Created(a, l)) if lease.is_some() => {
                                    prop_assert!(l.write);
                                    prop_assert_eq!(v.leases(a.ino).len(), 1);
                                    a
                                }
                                r => panic!("create failed: {r:?}"),
                            };
                            prop_assert!(a.ino > max_ino, "inode number reused or not growing");
                            max_ino = a.ino;
                            slot.insert((kind, next_model_ino));
                            next_model_ino += 1;
                        }
                    }
                }
                Step::Unlink(i) | Step::Rmdir(i) => {
                    let Some(p) = pick(&all, i).cloned() else { continue };
                    let rmdir = matches!(s, Step::Rmdir(_));
                    let parent = ino_of(&v, &p[..p.len() - 1]).unwrap();
                    let r = v.apply(Op::Unlink { parent, name: p[p.len() - 1].clone(), rmdir, now });
                    let kind = m[&p].0;
                    let empty = !m.keys().any(|q| q.len() > p.len() && q.starts_with(&p));
                    let ok = if rmdir { kind == Kind::Dir && empty } else { kind != Kind::Dir };
                    prop_assert_eq!(r.is_ok(), ok, "{:?} {:?}", p, r);
                    if ok {
                        m.remove(&p);
                    }
                }
                Step::Rename(a, d, n) => {
                    let Some(from) = pick(&all, a).cloned() else { continue };
                    let dir = dirs[d % dirs.len()].clone();
                    let mut to = dir.clone();
                    to.push(NAMES[n].to_string());
                    let r = v.apply(Op::Rename {
                        parent: ino_of(&v, &from[..from.len() - 1]).unwrap(),
                        name: from[from.len() - 1].clone(),
                        new_parent: ino_of(&v, &dir).unwrap(),
                        new_name: NAMES[n].into(),
                        now,
                    });
                    let (kind, id) = m[&from];
                    let into_itself = kind == Kind::Dir && to.starts_with(&from) && to != from;
                    let expect = if from == to || m.get(&to).is_some_and(|t| t.1 == id) {
                        true
                    } else if into_itself {
                        false
                    } else {
                        match m.get(&to) {
                            None => true,
                            Some((Kind::Dir, _)) => kind == Kind::Dir && !m.keys().any(|q| q.len() > to.len() && q.starts_with(&to)),
                            Some(_) => kind != Kind::Dir,
                        }
                    };
                    prop_assert_eq!(r.is_ok(), expect, "rename {:?} -> {:?}: {:?}", from, to, r);
                    if expect && from != to && m.get(&to).is_none_or(|t| t.1 != id) {
                        m.remove(&to);
                        let moved: Vec<(Vec<String>, (Kind, u64))> = m.iter().filter(|(q, _)| q.starts_with(&from)).map(|(q, x)| (q.clone(), *x)).collect();
                        for (q, x) in moved {
                            m.remove(&q);
                            let mut nq = to.clone();
                            nq.extend_from_slice(&q[from.len()..]);
                            m.insert(nq, x);
                        }
                    }
                }
                Step::Link(a, d, n) => {
                    let Some(from) = pick(&files, a).cloned() else { continue };
                    let dir = dirs[d % dirs.len()].clone();
                    let mut to = dir.clone();
                    to.push(NAMES[n].to_string());
                    let r = v.apply(Op::Link { ino: ino_of(&v, &from).unwrap(), parent: ino_of(&v, &dir).unwrap(), name: NAMES[n].into(), now });
                    prop_assert_eq!(r.is_ok(), !m.contains_key(&to));
                    if !m.contains_key(&to) {
                        let x = m[&from];
                        m.insert(to, x);
                    }
                }
                Step::Allocate(f, off, len) => {
                    let Some(p) = pick(&files, f) else { continue };
                    let ino = ino_of(&v, p).unwrap();
                    let before = v.free_bytes();
                    match v.apply(Op::Allocate { ino, off, len }) {
                        Ok(Reply::Extents(e)) => {
                            let got: u64 = e.iter().map(|x| x.len).sum();
                            prop_assert_eq!(before - v.free_bytes(), got);
                            prop_assert!(e.iter().all(|x| x.unwritten), "new extents read as zeros");
                        }
                        Err(MetaError::NoSpace) => prop_assert_eq!(before, v.free_bytes()),
                        r => panic!("allocate: {r:?}"),
                    }
                }
                Step::Truncate(f, size) => {
                    let Some(p) = pick(&files, f) else { continue };
                    let ino = ino_of(&v, p).unwrap();
                    let leased = !v.leases(ino).is_empty();
                    let (free0, q0) = (v.free_bytes(), v.quarantined_bytes());
                    v.apply(Op::SetAttr { ino, mode: None, uid: None, gid: None, size: Some(size), mtime: None, atime: None, now }).unwrap();
                    if leased {
                        prop_assert_eq!(v.free_bytes(), free0, "space of a leased file freed before its leases ended");
                    } else {
                        prop_assert_eq!(v.quarantined_bytes(), q0);
                    }
                    prop_assert!(v.extents(ino).unwrap().iter().all(|e| e.file_off + e.len <= size));
                }
                Step::Lease(f, node) => {
                    let Some(p) = pick(&files, f) else { continue };
                    let ino = ino_of(&v, p).unwrap();
                    // Hosts 1 and 2 write, host 3 reads.
                    let _ = v.apply(Op::GrantLease { node, ino, write: node != 3, now, ttl: 20 });
                }
                Step::Revoke(f, node) => {
                    let Some(p) = pick(&files, f) else { continue };
                    let ino = ino_of(&v, p).unwrap();
                    v.apply(Op::RevokeLease { node, ino, now, revoked: node == 2 }).unwrap();
                }
                Step::Tick(dt) => {
                    now += dt;
                    v.apply(Op::Tick { now }).unwrap();
                }
            }
            // The namespace equals the model, hard links included.
            let t = tree(&v);
            prop_assert_eq!(t.keys().collect::<Vec<_>>(), m.keys().collect::<Vec<_>>());
            for (p, (kind, id)) in &m {
                prop_assert_eq!(t[p].0, *kind);
                for (q, (_, id2)) in &m {
                    prop_assert_eq!(id == id2, t[p].1 == t[q].1, "{:?} and {:?}", p, q);
                }
            }
            let problems = v.check();
            prop_assert!(problems.is_empty(), "{:?}", problems);
            // The write-lease history never shows two writers of a file.
            let h = v.lease_history(None);
            prop_assert!(check_lease_history(&h).is_ok(), "{:?}", check_lease_history(&h));
            // A snapshot restores exactly this state, and the restored
            // volume carries on in its place.
            let restored = Volume::decode(&v.encode()).unwrap();
            prop_assert!(restored == v, "snapshot round trip changed the state");
            v = restored;
        }
        // When every lease is gone, quarantine is empty again.
        v.apply(Op::Tick { now: now + 1000 }).unwrap();
        prop_assert_eq!(v.quarantined_bytes(), 0);
    }
}

#[test]
fn a_file_made_with_its_creators_lease_is_that_hosts_to_write() {
    let mut v = Volume::new(0, 1 << 20, 0);
    let create = |v: &mut Volume, name: &str, kind, lease| {
        v.apply(Op::Create {
            parent: ROOT,
            name: name.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: String::new(),
            rdev: 0,
            umask: None,
            now: 5,
            lease,
        })
    };
    let Ok(Reply::Created(f, l)) = create(&mut v, "new.vhd", Kind::File, Some((1, 100))) else {
        panic!("no lease with the file")
    };
    assert!(l.write);
    assert_eq!(l.expires, 105);
    // As if granted on its own: others cannot write, the history has it.
    assert_eq!(
        v.apply(Op::GrantLease {
            node: 2,
            ino: f.ino,
            write: true,
            now: 10,
            ttl: 100
        }),
        Err(MetaError::Busy(1))
    );
    assert_eq!(v.lease_history(Some(f.ino)).len(), 1);
    // A directory takes no lease; a name that exists gets none either.
    assert!(matches!(
        create(&mut v, "d", Kind::Dir, Some((1, 100))),
        Ok(Reply::Attr(_))
    ));
    assert_eq!(
        create(&mut v, "new.vhd", Kind::File, Some((2, 100))),
        Err(MetaError::Exists)
    );
    assert!(v.check().is_empty());
}

#[test]
fn write_leases_exclude_other_writers_and_epochs_grow() {
    let mut v = Volume::new(0, 1 << 20, 0);
    let f = mk(&mut v, ROOT, "vm1.vhd", Kind::File, "", 0);
    let Reply::Lease(a) = v
        .apply(Op::GrantLease {
            node: 1,
            ino: f.ino,
            write: true,
            now: 0,
            ttl: 100,
        })
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(
        v.apply(Op::GrantLease {
            node: 2,
            ino: f.ino,
            write: true,
            now: 10,
            ttl: 100
        }),
        Err(MetaError::Busy(1))
    );
    // A reader may hold a lease alongside.
    v.apply(Op::GrantLease {
        node: 2,
        ino: f.ino,
        write: false,
        now: 10,
        ttl: 100,
    })
    .unwrap();
    // Hand-over: host 1 gives the write lease back, host 2 takes it with a
    // newer epoch.
    v.apply(Op::RevokeLease {
        node: 1,
        ino: f.ino,
        now: 15,
        revoked: false,
    })
    .unwrap();
    let Reply::Lease(b) = v
        .apply(Op::GrantLease {
            node: 2,
            ino: f.ino,
            write: true,
            now: 20,
            ttl: 100,
        })
        .unwrap()
    else {
        unreachable!()
    };
    assert!(b.write);
    assert!(b.epoch >= a.epoch);
    // Expiry frees the file for another writer.
    v.apply(Op::Tick { now: 500 }).unwrap();
    let Reply::Lease(c) = v
        .apply(Op::GrantLease {
            node: 3,
            ino: f.ino,
            write: true,
            now: 500,
            ttl: 100,
        })
        .unwrap()
    else {
        unreachable!()
    };
    assert!(c.epoch > b.epoch);
    let story: Vec<(u64, &str, u64)> = v
        .lease_history(Some(f.ino))
        .iter()
        .map(|e| (e.node, e.change.name(), e.at))
        .collect();
    assert_eq!(
        story,
        vec![
            (1, "granted", 0),
            (1, "released", 15),
            (2, "granted", 20),
            (2, "expired", 120),
            (3, "granted", 500),
        ]
    );
}

#[test]
fn hand_over_moves_the_write_lease_atomically() {
    let mut v = Volume::new(0, 1 << 20, 0);
    let f = mk(&mut v, ROOT, "vm.vhd", Kind::File, "", 0);
    let Reply::Lease(a) = v
        .apply(Op::GrantLease {
            node: 1,
            ino: f.ino,
            write: true,
            now: 10,
            ttl: 1000,
        })
        .unwrap()
    else {
        unreachable!()
    };
    // Only the holder's live write lease can be handed over.
    for (from, now) in [(2, 20), (1, 5000)] {
        assert!(matches!(
            v.apply(Op::HandOver {
                ino: f.ino,
                from,
                to: 3,
                now,
                ttl: 1000
            }),
            Err(MetaError::Invalid(_))
        ));
    }
    let Reply::Lease(b) = v
        .apply(Op::HandOver {
            ino: f.ino,
            from: 1,
            to: 2,
            now: 20,
            ttl: 1000,
        })
        .unwrap()
    else {
        unreachable!()
    };
    assert!(b.write && b.epoch > a.epoch);
    let holders: Vec<u64> = v.leases(f.ino).into_iter().map(|(n, _)| n).collect();
    assert_eq!(holders, vec![2], "the source keeps nothing");
    // The source cannot take it back while the destination holds it.
    assert_eq!(
        v.apply(Op::GrantLease {
            node: 1,
            ino: f.ino,
            write: true,
            now: 30,
            ttl: 1000
        }),
        Err(MetaError::Busy(2))
    );
    // The history tells the whole story, one writer at a time; it survives
    // a snapshot.
    let h = v.lease_history(Some(f.ino));
    let story: Vec<(u64, &str, u64)> = h.iter().map(|e| (e.node, e.change.name(), e.at)).collect();
    assert_eq!(
        story,
        vec![
            (1, "granted", 10),
            (1, "handed-off", 20),
            (2, "handed-in", 20),
        ]
    );
    assert_eq!(h[1].change, LeaseChange::HandedOff { to: 2 });
    check_lease_history(&h).unwrap();
    assert_eq!(
        Volume::decode(&v.encode())
            .unwrap()
            .lease_history(Some(f.ino)),
        h
    );
    // A forged history with two writers is caught.
    let mut bad = h.clone();
    bad.insert(
        1,
        coordinator::meta::LeaseEvent {
            node: 3,
            change: LeaseChange::Granted,
            ..h[0]
        },
    );
    assert!(check_lease_history(&bad)
        .unwrap_err()
        .to_string()
        .contains("while host"));
}

#[test]
fn written_ranges_split_unwritten_extents() {
    let mut v = Volume::new(0, 1 << 20, 0);
    let f = mk(&mut v, ROOT, "f", Kind::File, "", 0);
    v.apply(Op::Allocate {
        ino: f.ino,
        off: 0,
        len: 4096,
    })
    .unwrap();
    v.apply(Op::MarkWritten {
        ino: f.ino,
        off: 1024,
        len: 1024,
        size: 2048,
        now: 1,
        more: vec![],
    })
    .unwrap();
    let e = v.extents(f.ino).unwrap();
    assert_eq!(
        e.iter()
            .map(|x| (x.file_off, x.len, x.unwritten))
            .collect::<Vec<_>>(),
        vec![(0, 1024, true), (1024, 1024, false), (2048, 2048, true)]
    );
    assert_eq!(v.getattr(f.ino).unwrap().size, 2048);
    assert!(v.check().is_empty());
}

#[test]
fn names_are_checked() {
    let mut v = Volume::new(0, 1 << 20, 0);
    for bad in ["", ".", "..", "a/b", "nul\0", &"x".repeat(256)] {
        let r = v.apply(Op::Create {
            parent: ROOT,
            name: bad.into(),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: String::new(),
            rdev: 0,
            umask: None,
            now: 0,
            lease: None,
        });
        assert!(matches!(r, Err(MetaError::Invalid(_))), "{bad:?}: {r:?}");
    }
}

/// Creates `name` in `parent` and returns its attributes.
fn mk(
    v: &mut Volume,
    parent: u64,
    name: &str,
    kind: Kind,
    target: &str,
    now: u64,
) -> coordinator::meta::Attr {
    match v.apply(Op::Create {
        parent,
        name: name.into(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        target: target.into(),
        rdev: 0,
        umask: None,
        now,
        lease: None,
    }) {
        Ok(Reply::Attr(a)) => a,
        r => panic!("create {name}: {r:?}"),
    }
}

fn busy_volume() -> Volume {
    let mut v = Volume::new(0, 1 << 20, 0);
    let d = mk(&mut v, ROOT, "vms", Kind::Dir, "", 1);
    let f = mk(&mut v, d.ino, "vm1.vhd", Kind::File, "", 2);
    mk(&mut v, ROOT, "latest", Kind::Symlink, "vms/vm1.vhd", 3);
    v.apply(Op::Allocate {
        ino: f.ino,
        off: 0,
        len: 65536,
    })
    .unwrap();
    v.apply(Op::GrantLease {
        node: 2,
        ino: f.ino,
        write: true,
        now: 4,
        ttl: 100,
    })
    .unwrap();
    v.apply(Op::SetAttr {
        ino: f.ino,
        mode: None,
        uid: None,
        gid: None,
        size: Some(4096),
        mtime: None,
        atime: None,
        now: 5,
    })
    .unwrap();
    assert!(v.quarantined_bytes() > 0);
    v
}

#[test]
fn snapshot_refuses_damage_and_other_versions() {
    use coordinator::meta::SnapshotError;
    let v = busy_volume();
    let bytes = v.encode();
    assert_eq!(Volume::decode(&bytes).unwrap(), v);
    let mut b = bytes.clone();
    b[8] = 2; // major version 2
    assert_eq!(Volume::decode(&b), Err(SnapshotError::Version(2)));
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    assert!(matches!(
        Volume::decode(&b),
        Err(SnapshotError::Checksum { .. })
    ));
    assert_eq!(Volume::decode(b"nonsense"), Err(SnapshotError::Magic));
    assert!(Volume::decode(&bytes[..bytes.len() - 3]).is_err());
}

proptest! {
    /// Damaged snapshots (with the checksum made right again, so the
    /// parser itself is exercised) give an error or a consistent volume,
    /// never a panic or a huge allocation.
    #[test]
    fn damaged_snapshots_never_panic(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut b = busy_volume().encode();
        for (at, x) in flips {
            let i = 24 + at % (b.len() - 24);
            b[i] = x;
        }
        let sum = crc32fast_hash(&b[24..]);
        b[20..24].copy_from_slice(&sum.to_le_bytes());
        if let Ok(v) = Volume::decode(&b) {
            prop_assert!(v.check().is_empty());
        }
    }
}

/// CRC-32 (IEEE), as the snapshot header uses.
fn crc32fast_hash(b: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Special files keep their kind and device number, extended attributes
/// follow Linux's rules (create/replace, ENODATA, E2BIG, a bound per
/// inode), access times are set only explicitly, an exchange swaps two
/// names (a directory's link moving with it) and refuses a directory
/// below itself; all of it survives an encode/decode and a snapshot.
#[test]
fn special_files_xattrs_times_and_exchange() {
    use coordinator::meta::XattrSet;
    let mut v = Volume::new(0, 1 << 20, 0);
    let chr = match v.apply(Op::Create {
        parent: ROOT,
        name: "null".into(),
        kind: Kind::CharDevice,
        mode: 0o666,
        uid: 0,
        gid: 0,
        target: String::new(),
        rdev: 0x103,
        umask: None,
        now: 1,
        lease: None,
    }) {
        Ok(Reply::Attr(a)) => a,
        r => panic!("{r:?}"),
    };
    assert_eq!(
        (chr.kind, chr.rdev, chr.size, chr.atime),
        (Kind::CharDevice, 0x103, 0, 1)
    );
    let fifo = mk(&mut v, ROOT, "pipe", Kind::Fifo, "", 2);
    assert_eq!(fifo.rdev, 0, "only device nodes keep a device number");
    let d = mk(&mut v, ROOT, "d", Kind::Dir, "", 3);
    let sub = mk(&mut v, d.ino, "sub", Kind::Dir, "", 3);
    let f = mk(&mut v, ROOT, "f", Kind::File, "", 4);

    let set = |v: &mut Volume, name: &str, value: &[u8], how| {
        v.apply(Op::SetXattr {
            ino: f.ino,
            name: name.into(),
            value: value.to_vec(),
            how,
            now: 5,
        })
    };
    set(&mut v, "user.a", b"1", XattrSet::Any).unwrap();
    assert_eq!(
        set(&mut v, "user.a", b"2", XattrSet::Create),
        Err(MetaError::Exists)
    );
    assert_eq!(
        set(&mut v, "user.b", b"2", XattrSet::Replace),
        Err(MetaError::NoData)
    );
    set(&mut v, "user.a", b"2", XattrSet::Replace).unwrap();
    assert!(matches!(
        set(&mut v, "user.big", &vec![0; (64 << 10) + 1], XattrSet::Any),
        Err(MetaError::TooBig(_))
    ));
    assert!(matches!(
        set(&mut v, "nonamespace", b"", XattrSet::Any),
        Err(MetaError::Invalid(_))
    ));
    for i in 0..3 {
        set(
            &mut v,
            &format!("trusted.v{i}"),
            &vec![i as u8; 64 << 10],
            XattrSet::Any,
        )
        .unwrap();
    }
    assert_eq!(
        set(&mut v, "trusted.v3", &vec![3; 64 << 10], XattrSet::Any),
        Err(MetaError::NoSpace)
    );
    assert_eq!(v.getattr(f.ino).unwrap().xattrs, 4);
    assert_eq!(
        v.apply(Op::RemoveXattr {
            ino: f.ino,
            name: "user.none".into(),
            now: 6
        }),
        Err(MetaError::NoData)
    );
    v.apply(Op::RemoveXattr {
        ino: f.ino,
        name: "trusted.v2".into(),
        now: 6,
    })
    .unwrap();
    assert_eq!(
        v.xattrs(f.ino).unwrap().get("user.a").map(Vec::as_slice),
        Some(&b"2"[..])
    );

    v.apply(Op::SetAttr {
        ino: f.ino,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        mtime: None,
        atime: Some((77, 123_456)),
        now: 8,
    })
    .unwrap();
    let a = v.getattr(f.ino).unwrap();
    assert_eq!((a.atime, a.mtime), (77, 4));

    // Exchange a file in the root with a directory in d: names swap, the
    // directory's ".." link moves from d to the root.
    let (root_links, d_links) = (
        v.getattr(ROOT).unwrap().nlink,
        v.getattr(d.ino).unwrap().nlink,
    );
    v.apply(Op::Exchange {
        parent: ROOT,
        name: "f".into(),
        new_parent: d.ino,
        new_name: "sub".into(),
        now: 9,
    })
    .unwrap();
    assert_eq!(v.lookup(ROOT, "f"), Ok(sub.ino));
    assert_eq!(v.lookup(d.ino, "sub"), Ok(f.ino));
    assert_eq!(v.getattr(ROOT).unwrap().nlink, root_links + 1);
    assert_eq!(v.getattr(d.ino).unwrap().nlink, d_links - 1);
    assert!(v.check().is_empty(), "{:?}", v.check());
    // A directory may not go below itself; a missing name is ENOENT.
    let inner = mk(&mut v, sub.ino, "inner", Kind::File, "", 10);
    assert_eq!(
        v.apply(Op::Exchange {
            parent: ROOT,
            name: "f".into(),
            new_parent: sub.ino,
            new_name: "inner".into(),
            now: 11
        }),
        Err(MetaError::Loop)
    );
    assert_eq!(v.lookup(sub.ino, "inner"), Ok(inner.ino));
    assert_eq!(
        v.apply(Op::Exchange {
            parent: ROOT,
            name: "f".into(),
            new_parent: ROOT,
            new_name: "none".into(),
            now: 11
        }),
        Err(MetaError::NotFound)
    );

    // Encoded and decoded, and in a snapshot, all of it is kept.
    v.apply(Op::CreateSnapshot {
        name: "s".into(),
        now: 12,
        limit: 0,
    })
    .unwrap();
    let back = Volume::decode(&v.encode()).unwrap();
    assert_eq!(back, v);
    let snap_root = back.lookup(coordinator::meta::SNAPSHOTS_DIR, "s").unwrap();
    let snap_null = back.lookup(snap_root, "null").unwrap();
    let sa = back.getattr(snap_null).unwrap();
    assert_eq!((sa.kind, sa.rdev), (Kind::CharDevice, 0x103));
    let snap_d = back.lookup(snap_root, "d").unwrap();
    let snap_f = back.lookup(snap_d, "sub").unwrap();
    assert_eq!(back.xattrs(snap_f).unwrap().len(), 3);
    assert_eq!(
        back.getattr(snap_f).map(|a| (a.atime, a.atime_ns)),
        Some((77, 123_456))
    );
}

/// A file unlinked while a host holds a lease on it stays, nameless, and
/// may grow; its space comes back when the last lease ends (given back,
/// or expired after its host died).
#[test]
fn a_file_unlinked_while_open_grows_and_goes_with_its_last_lease() {
    let mut v = Volume::new(0, 64 << 20, 0);
    let free0 = v.free_bytes();
    for (n, end) in [("given-back", true), ("expired", false)] {
        let f = mk(&mut v, ROOT, n, Kind::File, "", 1);
        v.apply(Op::GrantLease {
            node: 2,
            ino: f.ino,
            write: true,
            now: 1,
            ttl: 100,
        })
        .unwrap();
        v.apply(Op::Unlink {
            parent: ROOT,
            name: n.into(),
            rmdir: false,
            now: 2,
        })
        .unwrap();
        assert_eq!(v.lookup(ROOT, n), Err(MetaError::NotFound));
        assert_eq!(
            v.getattr(f.ino).map(|a| a.nlink),
            Some(0),
            "kept while leased"
        );
        // It grows.
        v.apply(Op::Allocate {
            ino: f.ino,
            off: 0,
            len: 8 << 20,
        })
        .unwrap();
        v.apply(Op::MarkWritten {
            ino: f.ino,
            off: 0,
            len: 8 << 20,
            size: 8 << 20,
            now: 3,
            more: vec![],
        })
        .unwrap();
        assert!(v.free_bytes() <= free0 - (8 << 20));
        assert!(v.check().is_empty(), "{:?}", v.check());
        let back = Volume::decode(&v.encode()).unwrap();
        assert_eq!(back, v, "an orphan survives a snapshot of the state");
        if end {
            v.apply(Op::RevokeLease {
                node: 2,
                ino: f.ino,
                now: 4,
                revoked: false,
            })
            .unwrap();
        } else {
            v.apply(Op::Tick { now: 200 }).unwrap();
        }
        assert_eq!(v.getattr(f.ino), None, "{n}: gone with its last lease");
        assert_eq!(v.free_bytes(), free0, "{n}: its space is back");
        assert!(v.check().is_empty(), "{:?}", v.check());
    }
    // Unlinked with no lease: gone at once.
    let f = mk(&mut v, ROOT, "closed", Kind::File, "", 300);
    v.apply(Op::Unlink {
        parent: ROOT,
        name: "closed".into(),
        rmdir: false,
        now: 301,
    })
    .unwrap();
    assert_eq!(v.getattr(f.ino), None);
}

/// File locks: record locks conflict by range and type between owners,
/// an unlock splits a lock, `flock` locks live apart from record locks,
/// a host must have the file open (a lease) to lock it, the locks survive
/// an encode/decode, and a host's locks go with its lease on the file.
#[test]
fn file_locks_conflict_split_and_go_with_the_lease() {
    use coordinator::meta::{FileLock, LockType};
    let mut v = Volume::new(0, 1 << 20, 0);
    let f = mk(&mut v, ROOT, "db", Kind::File, "", 1);
    for (node, ttl) in [(2, 100), (3, 1000)] {
        v.apply(Op::GrantLease {
            node,
            ino: f.ino,
            write: false,
            now: 1,
            ttl,
        })
        .unwrap();
    }
    let lk = |node, owner, flock, start, end| FileLock {
        node,
        owner,
        pid: 100 + node as u32,
        flock,
        start,
        end,
        write: false,
    };
    let lock = |v: &mut Volume, l: FileLock, typ| {
        v.apply(Op::Lock {
            ino: f.ino,
            lock: l,
            typ,
            wait: None,
        })
    };
    lock(&mut v, lk(2, 10, false, 0, 99), LockType::Write).unwrap();
    match lock(&mut v, lk(3, 20, false, 50, 60), LockType::Read) {
        Err(MetaError::WouldBlock(h)) => assert_eq!(
            (h.node, h.pid, h.start, h.end, h.write),
            (2, 102, 0, 99, true)
        ),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        v.lock_conflict(f.ino, 3, 20, false, 50, 60, false)
            .map(|l| l.node),
        Some(2)
    );
    lock(&mut v, lk(3, 20, false, 100, 199), LockType::Read).unwrap();
    // Host 2 unlocks the middle: its lock splits, host 3 reads there.
    lock(&mut v, lk(2, 10, false, 40, 59), LockType::Unlock).unwrap();
    let held: Vec<(u64, u64, u64)> = v
        .locks_of(f.ino)
        .iter()
        .map(|l| (l.node, l.start, l.end))
        .collect();
    assert_eq!(held, [(2, 0, 39), (2, 60, 99), (3, 100, 199)]);
    lock(&mut v, lk(3, 20, false, 40, 59), LockType::Read).unwrap();
    // Another owner on the same host conflicts too (OFD locks).
    assert!(matches!(
        lock(&mut v, lk(2, 11, false, 0, 0), LockType::Write),
        Err(MetaError::WouldBlock(_))
    ));
    // flock locks do not meet record locks, but meet each other.
    lock(&mut v, lk(3, 21, true, 0, 0), LockType::Write).unwrap();
    assert!(matches!(
        lock(&mut v, lk(2, 12, true, 0, 0), LockType::Read),
        Err(MetaError::WouldBlock(_))
    ));
    // A host without the file open cannot lock it.
    assert!(matches!(
        lock(&mut v, lk(4, 1, false, 0, 0), LockType::Read),
        Err(MetaError::Invalid(_))
    ));
    assert_eq!(Volume::decode(&v.encode()).unwrap(), v);
    // Host 2's lease expires (it died): its locks go; host 3 writes there.
    v.apply(Op::Tick { now: 500 }).unwrap();
    assert!(v.locks_of(f.ino).iter().all(|l| l.node == 3));
    lock(&mut v, lk(3, 20, false, 0, 99), LockType::Write).unwrap();
    // A close drops an owner's locks of one kind.
    v.apply(Op::UnlockOwner {
        ino: f.ino,
        node: 3,
        owner: 20,
        flock: false,
    })
    .unwrap();
    assert_eq!(
        v.locks_of(f.ino)
            .iter()
            .map(|l| (l.owner, l.flock))
            .collect::<Vec<_>>(),
        [(21, true)]
    );
    // The last lease ends: nothing is left.
    v.apply(Op::RevokeLease {
        node: 3,
        ino: f.ino,
        now: 600,
        revoked: false,
    })
    .unwrap();
    assert!(v.locks_of(f.ino).is_empty());
}

/// Deadlocks between lock owners: a blocking request records its wait;
/// one that would close a cycle of waits (two owners on two hosts, or a
/// chain of three) is refused with `Deadlock`, the others keep waiting;
/// waits outlive an encode/decode, end when their owner gets its lock,
/// and are forgotten once they expire (a waiter that stopped asking).
#[test]
fn blocked_lock_requests_that_would_close_a_cycle_are_deadlocks() {
    use coordinator::meta::{FileLock, LockType, WAIT_TTL_MS};
    let mut v = Volume::new(0, 1 << 20, 0);
    let f = mk(&mut v, ROOT, "db", Kind::File, "", 1);
    for node in [2, 3, 4] {
        v.apply(Op::GrantLease {
            node,
            ino: f.ino,
            write: false,
            now: 1,
            ttl: 1 << 40,
        })
        .unwrap();
    }
    let lk = |node: u64, start, end| FileLock {
        node,
        owner: 10 * node,
        pid: 100 + node as u32,
        flock: false,
        start,
        end,
        write: true,
    };
    let lock = |v: &mut Volume, l: FileLock, wait: Option<u64>| {
        v.apply(Op::Lock {
            ino: f.ino,
            lock: l,
            typ: LockType::Write,
            wait,
        })
    };
    // Hosts 2, 3, 4 each hold a range.
    for (n, s) in [(2, 0), (3, 10), (4, 20)] {
        lock(&mut v, lk(n, s, s + 9), None).unwrap();
    }
    // 2 waits for 3, 3 waits for 4: a chain, no cycle.
    assert!(matches!(
        lock(&mut v, lk(2, 10, 19), Some(1000)),
        Err(MetaError::WouldBlock(h)) if h.node == 3
    ));
    assert!(matches!(
        lock(&mut v, lk(3, 20, 29), Some(1000)),
        Err(MetaError::WouldBlock(h)) if h.node == 4
    ));
    assert_eq!(v.lock_waits().count(), 2);
    assert_eq!(Volume::decode(&v.encode()).unwrap(), v);
    // A request that does not block never counts as waiting.
    assert!(matches!(
        lock(&mut v, lk(4, 0, 9), None),
        Err(MetaError::WouldBlock(_))
    ));
    // 4 waiting for 2 would close 2 -> 3 -> 4 -> 2.
    match lock(&mut v, lk(4, 0, 9), Some(1001)) {
        Err(MetaError::Deadlock(h)) => assert_eq!((h.node, h.pid), (2, 102)),
        r => panic!("{r:?}"),
    }
    assert_eq!(v.lock_waits().count(), 2);
    // 4 gives up its range: 3 gets it and no longer waits; 2 still does.
    v.apply(Op::Lock {
        ino: f.ino,
        lock: lk(4, 20, 29),
        typ: LockType::Unlock,
        wait: None,
    })
    .unwrap();
    lock(&mut v, lk(3, 20, 29), Some(1002)).unwrap();
    let waiting: Vec<u64> = v.lock_waits().map(|w| w.lock.node).collect();
    assert_eq!(waiting, [2]);
    // 3 waiting for 2 now closes 2 -> 3 -> 2.
    assert!(matches!(
        lock(&mut v, lk(3, 0, 9), Some(1003)),
        Err(MetaError::Deadlock(_))
    ));
    // Once 2's wait has expired (it stopped asking), 3 just waits.
    assert!(matches!(
        lock(&mut v, lk(3, 0, 9), Some(1000 + WAIT_TTL_MS)),
        Err(MetaError::WouldBlock(_))
    ));
    let waiting: Vec<u64> = v.lock_waits().map(|w| w.lock.node).collect();
    assert_eq!(waiting, [3]);
}

/// In a set-group-ID directory a new inode takes the directory's group
/// and a new directory the bit too; elsewhere the creator's group stands.
#[test]
fn a_set_group_id_directory_gives_its_group_to_what_is_made_in_it() {
    let mut v = Volume::new(0, 1 << 20, 0);
    let d = mk(&mut v, ROOT, "shared", Kind::Dir, "", 1);
    v.apply(Op::SetAttr {
        ino: d.ino,
        mode: Some(0o42775),
        uid: None,
        gid: Some(50),
        size: None,
        mtime: None,
        atime: None,
        now: 2,
    })
    .unwrap();
    let make = |v: &mut Volume, parent, name: &str, kind| match v.apply(Op::Create {
        parent,
        name: name.into(),
        kind,
        mode: 0o755,
        uid: 1000,
        gid: 1000,
        target: String::new(),
        rdev: 0,
        umask: None,
        now: 3,
        lease: None,
    }) {
        Ok(Reply::Attr(a)) => a,
        r => panic!("{r:?}"),
    };
    let f = make(&mut v, d.ino, "f", Kind::File);
    assert_eq!((f.gid, f.mode & 0o7777), (50, 0o755));
    let sub = make(&mut v, d.ino, "sub", Kind::Dir);
    assert_eq!((sub.gid, sub.mode & 0o7777), (50, 0o2755));
    let g = make(&mut v, sub.ino, "g", Kind::File);
    assert_eq!(g.gid, 50);
    let out = make(&mut v, ROOT, "out", Kind::File);
    assert_eq!(out.gid, 1000);
}

/// Access times moved by reads arrive in a batch: each moves only
/// forward, the change time stays, an inode gone meanwhile is skipped.
#[test]
fn access_times_from_reads_move_only_the_access_time() {
    let mut v = Volume::new(0, 1 << 20, 0);
    let f = mk(&mut v, ROOT, "f", Kind::File, "", 10);
    let g = mk(&mut v, ROOT, "g", Kind::File, "", 10);
    v.apply(Op::Accessed {
        times: vec![(f.ino, 50), (g.ino, 5), (999_999, 70)],
    })
    .unwrap();
    let (f2, g2) = (v.getattr(f.ino).unwrap(), v.getattr(g.ino).unwrap());
    assert_eq!((f2.atime, f2.ctime, f2.mtime), (50, 10, 10));
    assert_eq!(g2.atime, 10, "an access time never moves back");
    assert_eq!(Volume::decode(&v.encode()).unwrap(), v);
}
