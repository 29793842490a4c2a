//! Random reads and writes on fixed, dynamic and differencing images match
//! a plain byte vector, with the image closed and reopened after every step.

use proptest::prelude::*;
use std::path::Path;
use vhd::{CreateOptions, DiskType, OpenOptions, Vhd};

const SIZE: u64 = 3 * 65536 + 4096; // not a multiple of the block size

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let span = (0..SIZE, 1usize..20000)
        .prop_map(|(off, len)| (off, len.min((SIZE - off) as usize).max(1)));
    prop_oneof![
        4 => (span.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        3 => span.prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn rw() -> OpenOptions {
    OpenOptions {
        write: true,
        ..Default::default()
    }
}

/// Runs `ops` on the image at `path` whose current content is `model`,
/// reopening after every step and comparing the whole disk at the end.
fn run(path: &Path, mut model: Vec<u8>, ops: &[Op]) {
    for op in ops {
        let v = Vhd::open(path, &rw()).unwrap();
        match *op {
            Op::Write { off, len, seed } => {
                let data = pattern(len, seed);
                v.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let mut b = vec![0u8; len];
                v.read_at(&mut b, off).unwrap();
                assert_eq!(
                    b,
                    model[off as usize..off as usize + len],
                    "read {len} at {off}"
                );
            }
            Op::Flush => v.flush().unwrap(),
        }
        drop(v);
    }
    let v = Vhd::open(path, &OpenOptions::default()).unwrap();
    let mut all = vec![0u8; model.len()];
    v.read_at(&mut all, 0).unwrap();
    assert!(all == model, "final content differs from the model");
    let findings = vhd::check(path, &OpenOptions::default());
    assert!(findings.is_empty(), "{findings:?}");
}

fn create(path: &Path, dt: DiskType, block: u32) {
    let mut o = CreateOptions::new(dt, SIZE);
    o.block_size = block;
    Vhd::create(path, &o).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn fixed_matches_model(ops in prop::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.vhd");
        create(&p, DiskType::Fixed, 0);
        run(&p, vec![0; SIZE as usize], &ops);
    }

    #[test]
    fn dynamic_matches_model(ops in prop::collection::vec(op(), 1..25), big in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        create(&p, DiskType::Dynamic, if big { 2 << 20 } else { 8192 });
        run(&p, vec![0; SIZE as usize], &ops);
    }

    #[test]
    fn differencing_matches_model(
        base in prop::collection::vec(op(), 0..8),
        mid in prop::collection::vec(op(), 0..8),
        ops in prop::collection::vec(op(), 1..25),
    ) {
        // A chain of three: base (dynamic) <- mid <- top; each layer gets
        // its own writes, then the top is checked against the model.
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("base.vhd");
        create(&b, DiskType::Dynamic, 8192);
        let mut model = vec![0u8; SIZE as usize];
        for op in &base {
            if let Op::Write { off, len, seed } = *op {
                let v = Vhd::open(&b, &rw()).unwrap();
                let d = pattern(len, seed);
                v.write_at(&d, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&d);
            }
        }
        let m = dir.path().join("mid.vhd");
        let mut o = CreateOptions::new(DiskType::Differencing, 0);
        o.parent = Some(b.clone());
        Vhd::create(&m, &o).unwrap();
        for op in &mid {
            if let Op::Write { off, len, seed } = *op {
                let v = Vhd::open(&m, &rw()).unwrap();
                let d = pattern(len, seed.wrapping_add(1));
                v.write_at(&d, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&d);
            }
        }
        let t = dir.path().join("top.vhd");
        o.parent = Some(m.clone());
        Vhd::create(&t, &o).unwrap();
        run(&t, model.clone(), &ops);
        // The layers below are untouched by writes to the top.
        let mut below = vec![0u8; SIZE as usize];
        Vhd::open(&m, &OpenOptions::default()).unwrap().read_at(&mut below, 0).unwrap();
        prop_assert!(below == model);
    }
}

#[test]
fn merge_then_read_parent_equals_child_view() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("base.vhd");
    create(&b, DiskType::Dynamic, 8192);
    let v = Vhd::open(&b, &rw()).unwrap();
    v.write_at(&pattern(50_000, 3), 1000).unwrap();
    drop(v);
    let c = dir.path().join("child.vhd");
    let mut o = CreateOptions::new(DiskType::Differencing, 0);
    o.parent = Some(b.clone());
    let v = Vhd::create(&c, &o).unwrap();
    v.write_at(&pattern(70_000, 9), 30_000).unwrap();
    v.write_at(b"x", 5).unwrap();
    let mut view = vec![0u8; SIZE as usize];
    v.read_at(&mut view, 0).unwrap();
    drop(v);
    let r = vhd::ops::merge(&c, &OpenOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(r.parent, b);
    let mut merged = vec![0u8; SIZE as usize];
    Vhd::open(&b, &OpenOptions::default())
        .unwrap()
        .read_at(&mut merged, 0)
        .unwrap();
    assert!(merged == view);
}

#[test]
fn resize_and_compact_keep_content() {
    let dir = tempfile::tempdir().unwrap();
    for dt in [DiskType::Fixed, DiskType::Dynamic] {
        let p = dir.path().join(format!("{}.vhd", dt.name()));
        create(&p, dt, 8192);
        let mut v = Vhd::open(&p, &rw()).unwrap();
        v.write_at(&pattern(40_000, 1), 100).unwrap();
        v.write_at(&vec![0u8; 8192], 65536).unwrap(); // an all-zero block
        v.write_at(&pattern(9000, 2), SIZE - 9000).unwrap();
        vhd::ops::resize(&mut v, SIZE * 40).unwrap();
        v.write_at(&pattern(5000, 4), SIZE * 40 - 5000).unwrap();
        drop(v);
        let mut v = Vhd::open(&p, &rw()).unwrap();
        assert_eq!(v.size(), SIZE * 40);
        let mut before = vec![0u8; v.size() as usize];
        v.read_at(&mut before, 0).unwrap();
        if dt == DiskType::Dynamic {
            let r = vhd::ops::compact(&mut v, &mut |_, _| {}).unwrap();
            assert!(r.dropped >= 1, "{r:?}");
        }
        drop(v);
        let v = Vhd::open(&p, &OpenOptions::default()).unwrap();
        let mut after = vec![0u8; v.size() as usize];
        v.read_at(&mut after, 0).unwrap();
        assert!(before == after, "{}", dt.name());
        assert!(vhd::check(&p, &OpenOptions::default()).is_empty());
    }
}
