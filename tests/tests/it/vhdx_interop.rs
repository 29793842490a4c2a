//! VHDX interoperability with QEMU's `vhdx` driver, both ways, through
//! `csvctl vhd` and `qemu-img`/`qemu-io`; and an image cut during a write
//! (its log holding the BAT update that did not reach its place), which
//! we and QEMU open with the log replayed.

use csv_test_support::cmd::{output, run, workspace_bin};
use csv_test_support::{skip_unless, Need};
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use vhd::vhdx::{CreateOptions, Vhdx};
use vhd::BlockIo;

const MIB: u64 = 1 << 20;

fn csvctl(args: &[&str]) -> String {
    run(Command::new(workspace_bin("csvctl")).args(args)).unwrap()
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args)).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// (offset, length, pattern byte) writes: across a block boundary, at the
/// end, small and unaligned ones.
fn writes(size: u64) -> Vec<(u64, u64, u8)> {
    vec![
        (0, 4096, 0x11),
        (3 * MIB + 512, 70_000, 0x22),
        (8 * MIB - 1000, 2 * MIB, 0x33),
        (size - 5000, 5000, 0x44),
        (13 * MIB + 3, 17, 0x55),
    ]
}

fn model(size: u64) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    for (off, len, p) in writes(size) {
        m[off as usize..(off + len) as usize].fill(p);
    }
    m
}

/// Our reading of the whole disk.
fn ours(img: &Path) -> Vec<u8> {
    let v = Vhdx::open(img, false).unwrap();
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

#[test]
fn qemu_vhdx_images_read_identically_by_us() {
    skip_unless!(Need::Command("qemu-img"), Need::Command("qemu-io"));
    let dir = csv_test_support::temp_dir("vhdx-qemu").unwrap();
    let size = 24 * MIB;
    for sub in ["dynamic", "fixed"] {
        let img = dir.path().join(format!("{sub}.vhdx"));
        qemu_img(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            &format!("subformat={sub},block_size=1M"),
            s(&img),
            &size.to_string(),
        ]);
        let mut io = Command::new("qemu-io");
        io.args(["-f", "vhdx"]);
        for (off, len, p) in writes(size) {
            io.args(["-c", &format!("write -P {p} {off} {len}")]);
        }
        run(io.arg(s(&img))).unwrap();
        assert!(ours(&img) == model(size), "{sub}: we read other bytes");
        // csvctl's view: info, check, and a conversion to raw that
        // matches QEMU's own.
        let info = csvctl(&["vhd", "info", s(&img)]);
        assert!(info.contains("VHDX") && info.contains("QEMU"), "{info}");
        assert!(csvctl(&["vhd", "check", s(&img)]).contains("clean"));
        let raw = dir.path().join(format!("{sub}.raw"));
        csvctl(&["vhd", "convert", s(&img), s(&raw), "--to", "raw"]);
        assert!(
            std::fs::read(&raw).unwrap() == model(size),
            "{sub}: convert"
        );
    }
}

#[test]
fn our_vhdx_images_read_identically_by_qemu() {
    skip_unless!(Need::Command("qemu-img"), Need::Command("qemu-io"));
    let dir = csv_test_support::temp_dir("vhdx-ours").unwrap();
    let size = 24 * MIB;
    let reference = dir.path().join("model.raw");
    std::fs::write(&reference, model(size)).unwrap();
    for (tag, fixed, bs) in [("dynamic", false, 2 * MIB), ("fixed", true, 32 * MIB)] {
        let img = dir.path().join(format!("{tag}.vhdx"));
        let mut o = CreateOptions::new(size, fixed);
        o.block_size = bs as u32;
        let v = Vhdx::create(&img, &o).unwrap();
        for (off, len, p) in writes(size) {
            v.write_at(&vec![p; len as usize], off).unwrap();
        }
        v.close().unwrap();
        let cmp = qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&reference)]);
        assert!(cmp.contains("identical"), "{tag}: {cmp}");
        let check = qemu_img(&["check", "-f", "vhdx", s(&img)]);
        assert!(check.contains("No errors"), "{tag}: {check}");
        // QEMU writes into ours; we read what it wrote.
        run(Command::new("qemu-io").args(["-f", "vhdx", "-c", "write -P 0x66 20M 1M", s(&img)]))
            .unwrap();
        let mut want = model(size);
        want[20 * MIB as usize..21 * MIB as usize].fill(0x66);
        assert!(ours(&img) == want, "{tag}: after QEMU's write");
    }
    // Conversions through csvctl: VHD to VHDX and back, and raw.
    let vhdx = dir.path().join("fixed.vhdx");
    let vhd = dir.path().join("back.vhd");
    csvctl(&["vhd", "convert", s(&vhdx), s(&vhd), "--to", "dynamic"]);
    let again = dir.path().join("again.vhdx");
    csvctl(&["vhd", "convert", s(&vhd), s(&again), "--to", "vhdx"]);
    let cmp = qemu_img(&["compare", "-f", "vhdx", "-F", "vhdx", s(&vhdx), s(&again)]);
    assert!(cmp.contains("identical"), "{cmp}");
    let made = dir.path().join("made.vhdx");
    let out = csvctl(&["vhd", "create", s(&made), "--size", "1G"]);
    assert!(out.contains("dynamic VHDX"), "{out}");
    let info = qemu_img(&["info", "-f", "vhdx", s(&made)]);
    assert!(info.contains("1 GiB"), "{info}");
}

/// A file that takes only the first `budget` writes and flushes, then
/// fails every one: the power went there.
struct CutIo {
    file: std::fs::File,
    budget: AtomicUsize,
}

impl CutIo {
    fn spend(&self) -> io::Result<()> {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .map(|_| ())
            .map_err(|_| io::Error::other("power lost"))
    }
}

impl BlockIo for CutIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        BlockIo::read_at(&self.file, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.spend()?;
        BlockIo::write_at(&self.file, buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.spend()?;
        self.file.sync_all()
    }
    fn len(&self) -> io::Result<u64> {
        BlockIo::len(&self.file)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.spend()?;
        self.file.set_len(len)
    }
}

#[test]
fn a_vhdx_cut_during_a_write_opens_with_its_log_replayed() {
    skip_unless!(Need::Command("qemu-img"));
    let dir = csv_test_support::temp_dir("vhdx-cut").unwrap();
    let size = 8 * MIB;
    let base = dir.path().join("base.vhdx");
    let mut o = CreateOptions::new(size, false);
    o.block_size = MIB as u32;
    Vhdx::create(&base, &o).unwrap().close().unwrap();
    // Cut a write into a new block after each of its steps, until a cut
    // leaves the BAT update in the log only.
    let data = vec![0xabu8; 4096];
    let mut found = None;
    for budget in 0..40 {
        let img = dir.path().join(format!("cut{budget}.vhdx"));
        std::fs::copy(&base, &img).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let io = CutIo {
            file,
            budget: AtomicUsize::new(budget),
        };
        let done = Vhdx::open_on(io, "cut", true).and_then(|v| {
            v.write_at(&data, 5 * MIB)?;
            v.flush()?;
            // Leave without the clean close (the power is gone).
            std::mem::forget(v);
            Ok(())
        });
        // Whatever the cut, the image opens; the write is whole or absent.
        let v = Vhdx::open(&img, false).unwrap();
        let mut b = vec![0u8; 4096];
        v.read_at(&mut b, 5 * MIB).unwrap();
        assert!(
            b == data || b == vec![0u8; 4096],
            "cut after {budget} steps: the block is neither old nor new"
        );
        if done.is_ok() {
            assert!(b == data, "a write that returned is there");
            break;
        }
        if v.replayed() > 0 && b == data && found.is_none() {
            // The first such cut: the log entry is written, the BAT sector
            // in place is not.
            found = Some((img, budget));
        }
    }
    let (img, budget) = found.expect("no cut left the BAT update in the log only");
    eprintln!("cut after {budget} steps: the BAT update is in the log only");
    let info = csvctl(&["vhd", "info", s(&img)]);
    assert!(info.contains("log holds 1"), "{info}");
    let mut want = vec![0u8; size as usize];
    want[5 * MIB as usize..5 * MIB as usize + 4096].fill(0xab);
    let reference = dir.path().join("want.raw");
    std::fs::write(&reference, &want).unwrap();
    // QEMU replays our log (it needs a read-write open for that) and sees
    // the write.
    let qimg = dir.path().join("qemu.vhdx");
    std::fs::copy(&img, &qimg).unwrap();
    let o = output(Command::new("qemu-img").args(["check", "-r", "all", "-f", "vhdx", s(&qimg)]))
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("corruptions") || text.contains("No errors"),
        "{text}"
    );
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        s(&qimg),
        s(&reference),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
    // We replay it into the file at a read-write open; then QEMU opens it
    // read-only, which it refuses while a log waits.
    Vhdx::open(&img, true).unwrap().close().unwrap();
    let cmp = qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&reference)]);
    assert!(cmp.contains("identical"), "{cmp}");
    assert!(csvctl(&["vhd", "check", s(&img)]).contains("clean"));
}
