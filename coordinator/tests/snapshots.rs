//! Redirect-on-write snapshots of the metadata state machine: a snapshot
//! never changes whatever the live files do, shared bytes are never freed
//! while a snapshot holds them, and every byte comes back when the files
//! and the snapshots are gone.

#![allow(clippy::unwrap_used)]

use coordinator::meta::{
    snap_ino, Extent, Kind, MetaError, Op, Reply, Volume, ROOT, SNAPSHOTS_DIR, SNAPSHOTS_NAME,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

const START: u64 = 1 << 20;
const END: u64 = 1 << 22;

fn create(v: &mut Volume, name: &str) -> u64 {
    match v
        .apply(Op::Create {
            parent: ROOT,
            name: name.into(),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: String::new(),
            rdev: 0,
            umask: None,
            now: 1,
            lease: None,
        })
        .unwrap()
    {
        Reply::Attr(a) => a.ino,
        r => panic!("{r:?}"),
    }
}

/// What a host does to write `[off, off + len)`: allocate the holes, mark
/// the range written.
fn write(v: &mut Volume, ino: u64, off: u64, len: u64) -> Result<(), MetaError> {
    v.apply(Op::Allocate { ino, off, len })?;
    let size = v.getattr(ino).unwrap().size.max(off + len);
    v.apply(Op::MarkWritten {
        ino,
        off,
        len,
        size,
        now: 2,
        more: vec![],
    })?;
    Ok(())
}

/// What a host does to rewrite a shared range: reserve, (copy and write),
/// remap.
fn redirect(v: &mut Volume, ino: u64, off: u64, len: u64) -> Result<(), MetaError> {
    v.apply(Op::GrantLease {
        node: 1,
        ino,
        write: true,
        now: 3,
        ttl: 1 << 40,
    })?;
    let Reply::Extents(pieces) = v.apply(Op::Reserve { ino, len })? else {
        panic!("reserve answers extents")
    };
    let pieces: Vec<(u64, u64)> = pieces.iter().map(|e| (e.lun_off, e.len)).collect();
    v.apply(Op::Remap {
        ino,
        ranges: vec![(off, pieces)],
    })?;
    Ok(())
}

#[test]
fn a_snapshot_keeps_the_old_bytes_and_gives_them_back_when_deleted() {
    let mut v = Volume::new(START, END, 0);
    let f = create(&mut v, "vm.vhd");
    write(&mut v, f, 0, 64 << 10).unwrap();
    let before = v.extents(f).unwrap();
    assert!(v.extents_shared(f).unwrap().iter().all(|(_, s)| !s));
    v.apply(Op::CreateSnapshot {
        name: "daily".into(),
        now: 10,
        limit: 0,
    })
    .unwrap();
    assert!(v.extents_shared(f).unwrap().iter().all(|(_, s)| *s));
    // Reading through the snapshot's names.
    let dir = v.lookup(ROOT, SNAPSHOTS_NAME).unwrap();
    assert_eq!(dir, SNAPSHOTS_DIR);
    assert_eq!(
        v.readdir(SNAPSHOTS_DIR).unwrap(),
        vec![("daily".to_string(), snap_ino(1, ROOT))]
    );
    let sf = v.lookup(snap_ino(1, ROOT), "vm.vhd").unwrap();
    assert_eq!(sf, snap_ino(1, f));
    assert_eq!(v.getattr(sf).unwrap().mode & 0o222, 0, "read-only");
    assert_eq!(v.extents(sf).unwrap(), before);
    // The root does not list .snapshots; it cannot be made or written.
    assert!(v
        .readdir(ROOT)
        .unwrap()
        .iter()
        .all(|(n, _)| n != SNAPSHOTS_NAME));
    assert!(matches!(
        v.apply(Op::Create {
            parent: ROOT,
            name: SNAPSHOTS_NAME.into(),
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            target: String::new(),
            rdev: 0,
            umask: None,
            now: 1,
            lease: None,
        }),
        Err(MetaError::Invalid(_))
    ));
    assert!(v
        .apply(Op::GrantLease {
            node: 1,
            ino: sf,
            write: true,
            now: 1,
            ttl: 10
        })
        .is_err());
    assert!(v
        .apply(Op::SetAttr {
            ino: sf,
            mode: None,
            uid: None,
            gid: None,
            size: Some(0),
            mtime: None,
            atime: None,
            now: 1
        })
        .is_err());

    // The live file rewrites its first 16 KiB: new bytes for it, the
    // snapshot keeps the old ones.
    let free0 = v.free_bytes();
    redirect(&mut v, f, 0, 16 << 10).unwrap();
    let live = v.extents_shared(f).unwrap();
    assert!(!live[0].1 && live[0].0.len == 16 << 10);
    assert!(live[0].0.lun_off != before[0].lun_off);
    assert_eq!(v.extents(sf).unwrap(), before);
    assert_eq!(free0 - v.free_bytes(), 16 << 10);
    // Truncating the live file frees nothing the snapshot holds.
    v.apply(Op::SetAttr {
        ino: f,
        mode: None,
        uid: None,
        gid: None,
        size: Some(0),
        mtime: None,
        atime: None,
        now: 5,
    })
    .unwrap();
    assert_eq!(v.extents(sf).unwrap(), before);
    let list = v.snapshots();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].exclusive, 64 << 10);
    assert!(v.check().is_empty(), "{:?}", v.check());
    assert_eq!(Volume::decode(&v.encode()).unwrap(), v);
    // Deleting the snapshot returns its 64 KiB (after the lease on the
    // live file, whose old bytes may still be cached, ends).
    v.apply(Op::RevokeLease {
        node: 1,
        ino: f,
        now: 6,
        revoked: false,
    })
    .unwrap();
    let free1 = v.free_bytes();
    v.apply(Op::DeleteSnapshot {
        name: "daily".into(),
    })
    .unwrap();
    assert_eq!(v.free_bytes() - free1, 64 << 10);
    assert_eq!(v.free_bytes(), END - START);
    assert!(v.lookup(SNAPSHOTS_DIR, "daily").is_err());
    assert!(v.check().is_empty(), "{:?}", v.check());
}

#[test]
fn reserved_space_comes_back_if_the_writer_goes_away() {
    let mut v = Volume::new(START, END, 0);
    let f = create(&mut v, "f");
    write(&mut v, f, 0, 8192).unwrap();
    v.apply(Op::CreateSnapshot {
        name: "s".into(),
        now: 1,
        limit: 0,
    })
    .unwrap();
    // No lease: no reservation.
    assert!(matches!(
        v.apply(Op::Reserve { ino: f, len: 4096 }),
        Err(MetaError::Invalid(_))
    ));
    v.apply(Op::GrantLease {
        node: 2,
        ino: f,
        write: true,
        now: 1,
        ttl: 100,
    })
    .unwrap();
    let free0 = v.free_bytes();
    let Reply::Extents(r) = v.apply(Op::Reserve { ino: f, len: 4096 }).unwrap() else {
        panic!()
    };
    assert_eq!(v.free_bytes(), free0 - 4096);
    // The lease runs out before the remap: the space is free again and
    // the remap is refused.
    v.apply(Op::Tick { now: 500 }).unwrap();
    assert_eq!(v.free_bytes(), free0);
    assert!(matches!(
        v.apply(Op::Remap {
            ino: f,
            ranges: vec![(0, vec![(r[0].lun_off, 4096)])]
        }),
        Err(MetaError::Invalid(_))
    ));
    // A remap over a hole is refused too.
    v.apply(Op::GrantLease {
        node: 2,
        ino: f,
        write: true,
        now: 600,
        ttl: 100,
    })
    .unwrap();
    let Reply::Extents(r) = v.apply(Op::Reserve { ino: f, len: 4096 }).unwrap() else {
        panic!()
    };
    assert!(v
        .apply(Op::Remap {
            ino: f,
            ranges: vec![
                (0, vec![(r[0].lun_off, 2048)]),
                (1 << 20, vec![(r[0].lun_off + 2048, 2048)])
            ]
        })
        .is_err());
    // Two reservations side by side on the LUN take one remap piece that
    // spans both.
    let Reply::Extents(a) = v.apply(Op::Reserve { ino: f, len: 4096 }).unwrap() else {
        panic!()
    };
    let Reply::Extents(b) = v.apply(Op::Reserve { ino: f, len: 4096 }).unwrap() else {
        panic!()
    };
    assert_eq!(
        a[0].lun_off + 4096,
        b[0].lun_off,
        "the allocator hands out neighbours"
    );
    v.apply(Op::Remap {
        ino: f,
        ranges: vec![(0, vec![(a[0].lun_off, 8192)])],
    })
    .unwrap();
    assert!(v.check().is_empty(), "{:?}", v.check());
    assert!(v.check().is_empty(), "{:?}", v.check());
}

#[derive(Debug, Clone)]
enum Step {
    Write(usize, u64, u64),
    Rewrite(usize, u64, u64),
    Truncate(usize, u64),
    Unlink(usize),
    Snapshot,
    Delete(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let f = 0usize..3;
    prop_oneof![
        (f.clone(), 0u64..16, 1u64..8).prop_map(|(f, o, l)| Step::Write(f, o * 4096, l * 4096)),
        (f.clone(), 0u64..16, 1u64..8).prop_map(|(f, o, l)| Step::Rewrite(f, o * 4096, l * 4096)),
        (f.clone(), 0u64..24).prop_map(|(f, s)| Step::Truncate(f, s * 4096)),
        f.prop_map(Step::Unlink),
        Just(Step::Snapshot),
        (0usize..4).prop_map(Step::Delete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever the live files do, every snapshot's files keep the extent
    /// maps they had when it was taken; the state stays consistent and
    /// survives a Raft snapshot; and once the files, the snapshots and the
    /// leases are gone, the whole LUN is free again.
    #[test]
    fn snapshots_never_change_and_every_byte_comes_back(steps in prop::collection::vec(step(), 1..40)) {
        let mut v = Volume::new(START, END, 0);
        let names = ["a", "b", "c"];
        let mut taken: BTreeMap<String, BTreeMap<u64, Vec<Extent>>> = BTreeMap::new();
        let mut n = 0;
        for s in steps {
            let ino = |v: &Volume, f: usize| v.lookup(ROOT, names[f]).ok();
            match s {
                Step::Write(f, off, len) => {
                    let i = match ino(&v, f) { Some(i) => i, None => create(&mut v, names[f]) };
                    let _ = write(&mut v, i, off, len);
                }
                Step::Rewrite(f, off, len) => {
                    let Some(i) = ino(&v, f) else { continue };
                    let mapped = v.extents(i).unwrap().iter().map(|e| e.len).sum::<u64>() > 0;
                    let r = redirect(&mut v, i, off, len);
                    if r.is_err() {
                        // Only a range that is not all mapped is refused.
                        prop_assert!(mapped || v.extents(i).unwrap().is_empty(), "{:?}", r);
                    }
                }
                Step::Truncate(f, size) => {
                    let Some(i) = ino(&v, f) else { continue };
                    v.apply(Op::SetAttr { ino: i, mode: None, uid: None, gid: None, size: Some(size), mtime: None, atime: None, now: 4 }).unwrap();
                }
                Step::Unlink(f) => {
                    if ino(&v, f).is_some() {
                        v.apply(Op::Unlink { parent: ROOT, name: names[f].into(), rmdir: false, now: 5 }).unwrap();
                    }
                }
                Step::Snapshot => {
                    n += 1;
                    let name = format!("s{n}");
                    v.apply(Op::CreateSnapshot { name: name.clone(), now: 6, limit: 0 }).unwrap();
                    let root = v.lookup(SNAPSHOTS_DIR, &name).unwrap();
                    let mut files = BTreeMap::new();
                    for (_, i) in v.readdir(root).unwrap() {
                        files.insert(i, v.extents(i).unwrap());
                    }
                    taken.insert(name, files);
                }
                Step::Delete(k) => {
                    let Some(name) = taken.keys().nth(k).cloned() else { continue };
                    v.apply(Op::DeleteSnapshot { name: name.clone() }).unwrap();
                    taken.remove(&name);
                }
            }
            for files in taken.values() {
                for (i, ext) in files {
                    prop_assert_eq!(&v.extents(*i).unwrap(), ext, "snapshot file {} changed", i);
                }
            }
            let problems = v.check();
            prop_assert!(problems.is_empty(), "{:?}", problems);
            let restored = Volume::decode(&v.encode()).unwrap();
            prop_assert!(restored == v, "snapshot round trip changed the state");
        }
        for name in taken.keys() {
            v.apply(Op::DeleteSnapshot { name: name.clone() }).unwrap();
        }
        for f in names {
            if v.lookup(ROOT, f).is_ok() {
                v.apply(Op::Unlink { parent: ROOT, name: f.into(), rmdir: false, now: 7 }).unwrap();
            }
        }
        v.apply(Op::Tick { now: 1 << 41 }).unwrap();
        prop_assert_eq!(v.free_bytes(), END - START);
        prop_assert!(v.check().is_empty());
    }
}

#[test]
fn a_volume_keeps_64_snapshots_unless_the_command_asks_for_up_to_512() {
    let mut v = Volume::new(START, END, 0);
    let f = create(&mut v, "f");
    write(&mut v, f, 0, 8192).unwrap();
    let snap = |v: &mut Volume, i: usize, limit| {
        v.apply(Op::CreateSnapshot {
            name: format!("s{i}"),
            now: i as u64,
            limit,
        })
    };
    for i in 0..64 {
        snap(&mut v, i, 0).unwrap();
    }
    let e = snap(&mut v, 64, 0).unwrap_err();
    assert!(e.to_string().contains("64 snapshots"), "{e}");
    // A command of feature level 4 asks for more.
    for i in 64..512 {
        snap(&mut v, i, 512).unwrap();
    }
    let e = snap(&mut v, 512, 512).unwrap_err();
    assert!(e.to_string().contains("512 snapshots"), "{e}");
    let e = snap(&mut v, 512, 100_000).unwrap_err();
    assert!(
        e.to_string().contains("512 snapshots"),
        "asks above 512: {e}"
    );
    assert!(v.check().is_empty(), "{:?}", v.check());
    // The state with 512 snapshots goes through the snapshot codec.
    let back = Volume::decode(&v.encode()).unwrap();
    assert_eq!(back.snapshots().len(), 512);
}
