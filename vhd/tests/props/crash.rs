//! Crash safety: a scenario of allocating and overwriting writes runs on an
//! I/O layer that "loses power" after its k-th write, flush or truncate, for
//! every k. Writes since the last flush may or may not have reached the
//! disk, in any combination. After every crash the image must open, pass
//! the check (bar a footer the open repairs), hold every write that was
//! flushed before the crash, and show each sector of the interrupted write
//! either old or new, never anything else.

use std::io;
use std::path::Path;
use std::sync::Mutex;
use vhd::{BlockIo, CreateOptions, DiskType, MemIo, OpenOptions, Severity, Vhd};

#[derive(Clone, Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Default)]
struct State {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
    ops: usize,
    crash_at: usize,
    crashed: bool,
}

/// Memory disk that fails every call after `crash_at` operations and keeps
/// what had been flushed apart from what had not.
struct CrashIo(Mutex<State>);

fn apply(img: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(off, d) => {
            let end = *off as usize + d.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(d);
        }
        Pending::SetLen(l) => img.resize(*l as usize, 0),
    }
}

impl CrashIo {
    fn new(image: Vec<u8>, crash_at: usize) -> Self {
        CrashIo(Mutex::new(State {
            durable: image.clone(),
            current: image,
            crash_at,
            ..Default::default()
        }))
    }

    fn step(&self, p: Option<Pending>) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        if s.crashed || s.ops >= s.crash_at {
            s.crashed = true;
            return Err(io::Error::other("power lost"));
        }
        s.ops += 1;
        match p {
            Some(p) => {
                apply(&mut s.current, &p);
                s.pending.push(p);
            }
            None => {
                let pending = std::mem::take(&mut s.pending);
                for p in &pending {
                    apply(&mut s.durable, p);
                }
            }
        }
        Ok(())
    }

    /// Disk images after the crash: the durable state plus a subset of the
    /// unflushed operations (applied in order), for several subsets.
    fn after_crash(&self, seed: u64) -> Vec<Vec<u8>> {
        let s = self.0.lock().unwrap();
        let n = s.pending.len();
        let mut masks: Vec<u64> = vec![0, u64::MAX];
        let mut x = seed | 1;
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            masks.push(x);
        }
        masks
            .into_iter()
            .map(|m| {
                let mut img = s.durable.clone();
                for (i, p) in s.pending.iter().enumerate() {
                    if i >= 64 || m & (1 << i) != 0 {
                        apply(&mut img, p);
                    }
                }
                let _ = n;
                img
            })
            .collect()
    }

    fn ops(&self) -> usize {
        self.0.lock().unwrap().ops
    }
}

impl BlockIo for CrashIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.0.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > s.current.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&s.current[offset as usize..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.step(Some(Pending::Write(offset, buf.to_vec())))
    }
    fn flush(&self) -> io::Result<()> {
        self.step(None)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.step(Some(Pending::SetLen(len)))
    }
}

const SIZE: u64 = 64 * 1024;
const BLOCK: u32 = 8192;

/// The scenario: (offset, length, fill byte) writes, each followed by a
/// flush. New blocks, a rewrite, a write across two blocks, a partial
/// sector.
const WRITES: &[(u64, usize, u8)] = &[
    (0, 4096, 0x11),
    (20_000, 3000, 0x22),
    (512, 512, 0x33),
    (8000, 1000, 0x44),
    (40_001, 10, 0x55),
    (0, 8192, 0x66),
];

fn rw() -> OpenOptions {
    OpenOptions {
        write: true,
        ..Default::default()
    }
}

/// Runs the scenario on `io`; returns how many writes were flushed.
fn scenario(io: CrashIo, name: &str, path: Option<&Path>) -> (usize, CrashIo) {
    let Ok(v) = Vhd::open_on(io, name, path, &rw()) else {
        unreachable!("the image opened before the crash point");
    };
    let mut acked = 0;
    for &(off, len, fill) in WRITES {
        if v.write_at(&vec![fill; len], off).is_err() || v.flush().is_err() {
            break;
        }
        acked += 1;
    }
    // Get the CrashIo back out of the Vhd.
    let io = into_io(v);
    (acked, io)
}

fn into_io(v: Vhd<CrashIo>) -> CrashIo {
    let s = v.io().0.lock().unwrap();
    let copy = State {
        durable: s.durable.clone(),
        current: s.current.clone(),
        pending: s.pending.clone(),
        ops: s.ops,
        crash_at: s.crash_at,
        crashed: s.crashed,
    };
    CrashIo(Mutex::new(copy))
}

fn expected(upto: usize) -> Vec<u8> {
    let mut m = vec![0u8; SIZE as usize];
    for &(off, len, fill) in &WRITES[..upto] {
        m[off as usize..off as usize + len].fill(fill);
    }
    m
}

fn verify(img: Vec<u8>, name: &str, path: Option<&Path>, acked: usize, base: &[u8]) {
    let v = Vhd::open_on(MemIo::new(img.clone()), name, path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("image does not open after a crash: {e}"));
    let bad: Vec<_> = vhd::check::check_open(&v)
        .into_iter()
        .filter(|f| f.severity == Severity::Error && f.structure != "footer")
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    let mut got = vec![0u8; SIZE as usize];
    v.read_at(&mut got, 0).unwrap();
    let old = overlay(base, &expected(acked));
    let new = overlay(base, &expected((acked + 1).min(WRITES.len())));
    for s in 0..(SIZE / 512) as usize {
        let r = s * 512..(s + 1) * 512;
        assert!(
            got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r.clone()],
            "sector {s} is neither old nor new after {acked} acknowledged writes"
        );
    }
    // A read-write open repairs a lost footer; then the image is clean.
    let v = Vhd::open_on(MemIo::new(img), name, path, &rw()).unwrap();
    let findings = vhd::check::check_open(&v);
    assert!(
        findings.iter().all(|f| f.severity != Severity::Error),
        "{findings:?}"
    );
}

/// `base` where `over` is non-zero... the scenario writes non-zero fills,
/// so zeros in the model mean "not written by the scenario".
fn overlay(base: &[u8], over: &[u8]) -> Vec<u8> {
    base.iter()
        .zip(over)
        .map(|(&b, &o)| if o != 0 { o } else { b })
        .collect()
}

fn crash_everywhere(fresh: Vec<u8>, name: &str, path: Option<&Path>, base: &[u8]) {
    // Count the operations of a run without a crash.
    let (_, io) = scenario(CrashIo::new(fresh.clone(), usize::MAX), name, path);
    let total = io.ops();
    assert!(total > WRITES.len() * 2);
    for k in 0..=total {
        let (acked, io) = scenario(CrashIo::new(fresh.clone(), k), name, path);
        for img in io.after_crash(k as u64 * 7919) {
            verify(img, name, path, acked, base);
        }
    }
}

#[test]
fn dynamic_disk_survives_a_crash_at_every_step() {
    let mem = MemIo::default();
    let mut o = CreateOptions::new(DiskType::Dynamic, SIZE);
    o.block_size = BLOCK;
    Vhd::create_on(&mem, "crash.vhd", &o, None).unwrap();
    crash_everywhere(mem.to_vec(), "crash.vhd", None, &vec![0; SIZE as usize]);
}

#[test]
fn differencing_disk_survives_a_crash_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    let mut o = CreateOptions::new(DiskType::Dynamic, SIZE);
    o.block_size = BLOCK;
    let p = Vhd::create(&parent, &o).unwrap();
    let base: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 | 0x80).collect();
    p.write_at(&base, 0).unwrap();
    drop(p);
    // Make the child on disk, then run it from memory next to its parent.
    let child = dir.path().join("child.vhd");
    let mut o = CreateOptions::new(DiskType::Differencing, 0);
    o.parent = Some(parent);
    drop(Vhd::create(&child, &o).unwrap());
    let fresh = std::fs::read(&child).unwrap();
    crash_everywhere(fresh, "child.vhd", Some(&child), &base);
}

/// VHDX: the same kind of scenario on a dynamic VHDX of 1 MiB blocks (the
/// format's smallest): new blocks, a rewrite, writes across a block
/// boundary, one at the end. After a crash at any step the image opens
/// (its log replayed in memory, read-only), every acknowledged write is
/// there, each sector of the interrupted one is old or new, and a
/// read-write open leaves a clean image.
mod vhdx {
    use super::CrashIo;
    use std::sync::Arc;
    use vhd::vhdx::{CreateOptions, Vhdx};
    use vhd::{MemIo, Severity};

    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 4 * MIB;
    const WRITES: &[(u64, usize, u8)] = &[
        (0, 4096, 0x11),
        (2 * MIB + 100, 3000, 0x22),
        (MIB - 512, 1024, 0x33),
        (512, 512, 0x44),
        (SIZE - 700, 700, 0x55),
        (0, 8192, 0x66),
    ];

    fn expected(upto: usize) -> Vec<u8> {
        let mut m = vec![0u8; SIZE as usize];
        for &(off, len, fill) in &WRITES[..upto] {
            m[off as usize..off as usize + len].fill(fill);
        }
        m
    }

    /// Runs the scenario on `io`; how many writes were acknowledged.
    fn scenario(io: &Arc<CrashIo>) -> usize {
        let mut acked = 0;
        // Opening for writing writes the headers: it may crash too.
        if let Ok(v) = Vhdx::open_on(io.clone(), "crash.vhdx", true) {
            for &(off, len, fill) in WRITES {
                if v.write_at(&vec![fill; len], off).is_err() || v.flush().is_err() {
                    break;
                }
                acked += 1;
            }
            // No clean close: the power is gone (a drop would try one).
            std::mem::forget(v);
        }
        acked
    }

    fn verify(img: Vec<u8>, acked: usize, k: usize) {
        let v = Vhdx::open_on(MemIo::new(img.clone()), "crash.vhdx", false)
            .unwrap_or_else(|e| panic!("crash at {k}: the image does not open: {e}"));
        let mut got = vec![0u8; SIZE as usize];
        v.read_at(&mut got, 0).unwrap();
        let old = expected(acked);
        let new = expected((acked + 1).min(WRITES.len()));
        for s in 0..(SIZE / 512) as usize {
            let r = s * 512..(s + 1) * 512;
            assert!(
                got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r.clone()],
                "crash at {k}: sector {s} is neither old nor new after {acked} acknowledged writes"
            );
        }
        let bad: Vec<_> = v
            .check()
            .unwrap()
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .collect();
        assert!(bad.is_empty(), "crash at {k}: {bad:?}");
        drop(v);
        let v = Vhdx::open_on(MemIo::new(img), "crash.vhdx", true).unwrap();
        let mut again = vec![0u8; SIZE as usize];
        v.read_at(&mut again, 0).unwrap();
        assert!(
            again == got,
            "crash at {k}: the replay in the file differs from the one in memory"
        );
        let f = v.check().unwrap();
        assert!(f.iter().all(|f| f.severity != Severity::Error), "{f:?}");
    }

    #[test]
    fn dynamic_vhdx_survives_a_crash_at_every_step() {
        let mut o = CreateOptions::new(SIZE, false);
        o.block_size = MIB as u32;
        let v = Vhdx::create_on(MemIo::default(), "crash.vhdx", &o).unwrap();
        let fresh = v.io().to_vec();
        v.close().unwrap();
        let io = Arc::new(CrashIo::new(fresh.clone(), usize::MAX));
        assert_eq!(scenario(&io), WRITES.len());
        let total = io.ops();
        for k in 0..=total {
            let io = Arc::new(CrashIo::new(fresh.clone(), k));
            let acked = scenario(&io);
            for img in io.after_crash(k as u64 * 7919) {
                verify(img, acked, k);
            }
        }
    }
}
