//! VHD interoperability with QEMU's `vpc` driver, both ways, through
//! `csvctl vhd` and `qemu-img`/`qemu-io`; and `csvctl vhd check` finding
//! every corruption planted in an image.

use csv_test_support::cmd::{output, run, workspace_bin};
use csv_test_support::{skip_unless, Need};
use std::path::{Path, PathBuf};
use std::process::Command;
use vhd::{OpenOptions, Vhd};

const MIB: u64 = 1 << 20;

fn csvctl(args: &[&str]) -> String {
    run(Command::new(workspace_bin("csvctl")).args(args)).unwrap()
}

fn csvctl_status(args: &[&str]) -> (i32, String) {
    let o = output(Command::new(workspace_bin("csvctl")).args(args)).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args)).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a few distinct patterns through our library, and the same bytes
/// into `model`.
fn write_patterns(img: &Path, model: &mut [u8], salt: u8) {
    let v = Vhd::open(
        img,
        &OpenOptions {
            write: true,
            ..Default::default()
        },
    )
    .unwrap();
    let size = model.len() as u64;
    let writes = [
        (0u64, 4096usize),
        (3 * MIB + 512, 70_000),
        (size / 2 - 1000, 2 * MIB as usize),
        (size - 5000, 5000),
        (7 * MIB + 3, 17),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data: Vec<u8> = (0..len)
            .map(|j| (j as u8).wrapping_mul(7).wrapping_add(salt + i as u8) | 1)
            .collect();
        v.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    v.flush().unwrap();
}

fn read_all(img: &Path) -> Vec<u8> {
    let v = Vhd::open(img, &OpenOptions::default()).unwrap();
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

fn qemu_size(img: &Path) -> u64 {
    let info = qemu_img(&["info", "--output=json", "-f", "vpc", s(img)]);
    // The image's own size comes after that of its `file` child node.
    let key = "\"virtual-size\":";
    let at = info.rfind(key).unwrap() + key.len();
    info[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn qemu_raw(img: &Path, dir: &Path, tag: &str) -> Vec<u8> {
    let out = dir.join(format!("{tag}.qemu.raw"));
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", s(img), s(&out)]);
    std::fs::read(out).unwrap()
}

#[test]
fn our_images_read_identically_by_qemu() {
    skip_unless!(Need::Command("qemu-img"));
    let dir = csv_test_support::temp_dir("vhd-ours").unwrap();
    // Exact sizes (Hyper-V style: the footer's current size, like QEMU's
    // force_size) and CHS-rounded sizes (Virtual PC style).
    for (ty, extra) in [
        ("fixed", None),
        ("dynamic", None),
        ("fixed", Some("--chs-size")),
        ("dynamic", Some("--chs-size")),
    ] {
        let tag = format!("{ty}{}", extra.unwrap_or(""));
        let img = dir.path().join(format!("{tag}.vhd"));
        let mut args = vec!["vhd", "create", s(&img), "--size", "20000000", "--type", ty];
        args.extend(extra);
        csvctl(&args);
        let size = Vhd::open(&img, &OpenOptions::default()).unwrap().size();
        assert_eq!(qemu_size(&img), size, "{tag}: qemu sees another size");
        if extra.is_none() {
            assert_eq!(size, 20_000_256, "exact size, rounded to whole sectors");
        }
        let mut model = vec![0u8; size as usize];
        write_patterns(&img, &mut model, 3);
        let reference = dir.path().join(format!("{tag}.model.raw"));
        std::fs::write(&reference, &model).unwrap();
        run(Command::new("qemu-img").args([
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            s(&img),
            s(&reference),
        ]))
        .unwrap();
        assert!(
            qemu_raw(&img, dir.path(), &tag) == model,
            "{tag}: qemu-img convert differs"
        );
        // qemu-img map: every written range is reported as data.
        let map = qemu_img(&["map", "--output=json", "-f", "vpc", s(&img)]);
        assert!(map.contains("\"data\": true"), "{tag}: {map}");
        assert!(csvctl(&["vhd", "check", s(&img)]).contains("clean"));
    }
}

#[test]
fn qemu_images_read_identically_by_us() {
    skip_unless!(Need::Command("qemu-img"), Need::Command("qemu-io"));
    let dir = csv_test_support::temp_dir("vhd-qemu").unwrap();
    for (sub, force) in [
        ("fixed", false),
        ("dynamic", false),
        ("fixed", true),
        ("dynamic", true),
    ] {
        let tag = format!("{sub}{}", if force { "-force" } else { "" });
        let img = dir.path().join(format!("{tag}.vhd"));
        let mut opts = format!("subformat={sub}");
        if force {
            opts.push_str(",force_size=on");
        }
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            &opts,
            s(&img),
            "30000000",
        ]);
        for (pat, off, len) in [
            ("0xab", "0", "64k"),
            ("0x11", "1048576", "3M"),
            ("0x5c", "20971520", "4096"),
            ("0xee", "29360128", "512"),
        ] {
            run(Command::new("qemu-io").args([
                "-f",
                "vpc",
                "-c",
                &format!("write -P {pat} {off} {len}"),
                s(&img),
            ]))
            .unwrap();
        }
        let ours = read_all(&img);
        assert_eq!(ours.len() as u64, qemu_size(&img), "{tag}: size differs");
        assert!(
            ours == qemu_raw(&img, dir.path(), &tag),
            "{tag}: content differs"
        );
        assert_eq!(ours[1048576], 0x11);
        let (code, text) = csvctl_status(&["vhd", "check", s(&img)]);
        assert_eq!(code, 0, "{tag}: {text}");
        // And we can write into QEMU's image, which QEMU then reads.
        let mut model = ours.clone();
        write_patterns(&img, &mut model, 9);
        assert!(
            qemu_raw(&img, dir.path(), &format!("{tag}-2")) == model,
            "{tag}: qemu reads our writes wrongly"
        );
    }
}

#[test]
fn qemu_writes_into_our_dynamic_image() {
    skip_unless!(Need::Command("qemu-io"));
    let dir = csv_test_support::temp_dir("vhd-mixed").unwrap();
    let img = dir.path().join("d.vhd");
    csvctl(&["vhd", "create", s(&img), "--size", "64M"]);
    let mut model = vec![0u8; 64 * MIB as usize];
    write_patterns(&img, &mut model, 5);
    run(Command::new("qemu-io").args(["-f", "vpc", "-c", "write -P 0x77 40M 1M", s(&img)]))
        .unwrap();
    model[40 * MIB as usize..41 * MIB as usize].fill(0x77);
    assert!(read_all(&img) == model);
    assert!(csvctl(&["vhd", "check", s(&img)]).contains("clean"));
}

#[test]
fn differencing_chain_merges_to_what_qemu_then_sees() {
    skip_unless!(Need::Command("qemu-img"));
    let dir = csv_test_support::temp_dir("vhd-chain").unwrap();
    let base = dir.path().join("base.vhd");
    let mid = dir.path().join("mid.vhd");
    let top = dir.path().join("top.vhd");
    csvctl(&["vhd", "create", s(&base), "--size", "48M"]);
    let mut model = vec![0u8; 48 * MIB as usize];
    write_patterns(&base, &mut model, 1);
    csvctl(&["vhd", "create", s(&mid), "--parent", s(&base)]);
    write_patterns(&mid, &mut model, 2);
    csvctl(&["vhd", "create", s(&top), "--parent", s(&mid)]);
    {
        let v = Vhd::open(
            &top,
            &OpenOptions {
                write: true,
                ..Default::default()
            },
        )
        .unwrap();
        v.write_at(&[0x42; 1000], 10 * MIB + 100).unwrap();
        model[(10 * MIB + 100) as usize..(10 * MIB + 1100) as usize].fill(0x42);
    }
    assert!(read_all(&top) == model, "chain reads wrong");
    let info = csvctl(&["vhd", "info", s(&top), "--json"]);
    assert!(
        info.contains("\"type\": \"differencing\"") && info.contains("mid.vhd"),
        "{info}"
    );
    // Flatten with our converter; then merge top into mid, mid into base.
    let flat = dir.path().join("flat.raw");
    csvctl(&["vhd", "convert", s(&top), s(&flat), "--to", "raw"]);
    assert!(std::fs::read(&flat).unwrap() == model);
    csvctl(&["vhd", "merge", s(&top)]);
    assert!(!top.exists(), "merge deletes the child");
    csvctl(&["vhd", "merge", s(&mid)]);
    // QEMU cannot follow differencing disks, but reads the merged base.
    assert!(
        qemu_raw(&base, dir.path(), "merged") == model,
        "merged base differs"
    );
    run(Command::new("qemu-img").args(["compare", "-f", "vpc", "-F", "raw", s(&base), s(&flat)]))
        .unwrap();
}

#[test]
fn convert_resize_compact_round_trip() {
    skip_unless!(Need::Command("qemu-img"));
    let dir = csv_test_support::temp_dir("vhd-conv").unwrap();
    let raw = dir.path().join("src.raw");
    let mut model = vec![0u8; 24 * MIB as usize];
    for (i, b) in model[5 * MIB as usize..6 * MIB as usize]
        .iter_mut()
        .enumerate()
    {
        *b = (i % 253) as u8;
    }
    std::fs::write(&raw, &model).unwrap();
    let dynamic = dir.path().join("d.vhd");
    let fixed = dir.path().join("f.vhd");
    let back = dir.path().join("back.raw");
    csvctl(&["vhd", "convert", s(&raw), s(&dynamic), "--to", "dynamic"]);
    csvctl(&["vhd", "convert", s(&dynamic), s(&fixed), "--to", "fixed"]);
    csvctl(&["vhd", "convert", s(&fixed), s(&back), "--to", "raw"]);
    assert!(std::fs::read(&back).unwrap() == model);
    let info = csvctl(&["vhd", "info", s(&dynamic), "--json"]);
    assert!(
        info.contains("\"allocated_blocks\": 1"),
        "zero ranges stay unallocated: {info}"
    );
    // Refuses to overwrite.
    let (code, text) = csvctl_status(&["vhd", "convert", s(&raw), s(&dynamic), "--to", "dynamic"]);
    assert_ne!(code, 0);
    assert!(text.contains("exists"), "{text}");

    for img in [&dynamic, &fixed] {
        csvctl(&["vhd", "resize", s(img), "--size", "100M"]);
        assert_eq!(qemu_size(img), 100 * MIB);
        let mut grown = model.clone();
        grown.resize(100 * MIB as usize, 0);
        assert!(qemu_raw(img, dir.path(), "grown") == grown);
        let (code, text) = csvctl_status(&["vhd", "resize", s(img), "--size", "10M"]);
        assert_ne!(code, 0, "shrinking must be refused");
        assert!(text.contains("shrinking"), "{text}");
    }
    // Zero a block's worth of data, then compact gives it back.
    {
        let v = Vhd::open(
            &dynamic,
            &OpenOptions {
                write: true,
                ..Default::default()
            },
        )
        .unwrap();
        v.write_at(&[1u8; 4096], 50 * MIB).unwrap();
        v.write_at(&[0u8; 4096], 50 * MIB).unwrap();
    }
    let before = std::fs::metadata(&dynamic).unwrap().len();
    let out = csvctl(&["vhd", "compact", s(&dynamic)]);
    assert!(out.contains("1 block(s) dropped"), "{out}");
    assert!(std::fs::metadata(&dynamic).unwrap().len() < before);
    let mut grown = model.clone();
    grown.resize(100 * MIB as usize, 0);
    assert!(qemu_raw(&dynamic, dir.path(), "compacted") == grown);
    assert!(csvctl(&["vhd", "check", s(&dynamic)]).contains("clean"));
}

/// An image with two allocated blocks, for planting faults.
fn victim(dir: &Path, name: &str) -> (PathBuf, u64) {
    let img = dir.join(name);
    csvctl(&["vhd", "create", s(&img), "--size", "16M"]);
    let v = Vhd::open(
        &img,
        &OpenOptions {
            write: true,
            ..Default::default()
        },
    )
    .unwrap();
    v.write_at(&[9u8; 4096], 0).unwrap();
    v.write_at(&[8u8; 4096], 2 * MIB).unwrap();
    let table = v.header().unwrap().table_offset;
    (img, table)
}

fn patch(img: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

#[test]
fn check_finds_every_planted_corruption() {
    let dir = csv_test_support::temp_dir("vhd-check").unwrap();
    /// Damages an image, given its path and its BAT's offset.
    type Plant = Box<dyn Fn(&Path, u64)>;
    let cases: Vec<(&str, Plant, &str)> = vec![
        (
            "footer",
            Box::new(|p: &Path, _| {
                let len = std::fs::metadata(p).unwrap().len();
                patch(p, len - 512 + 48, &[0xff; 8]);
                patch(p, 48, &[0xff; 8]);
            }),
            "corrupt footer",
        ),
        (
            "header",
            Box::new(|p: &Path, _| patch(p, 512 + 28, &[0, 0, 0, 1])),
            "corrupt dynamic header",
        ),
        (
            "bat-range",
            Box::new(|p: &Path, t| patch(p, t, &0x7fff_0000u32.to_be_bytes())),
            "BAT entry 0",
        ),
        (
            "bat-overlap",
            Box::new(|p: &Path, t| {
                let mut e = [0u8; 4];
                use std::os::unix::fs::FileExt;
                std::fs::File::open(p)
                    .unwrap()
                    .read_exact_at(&mut e, t)
                    .unwrap();
                patch(p, t + 4, &e);
            }),
            "overlaps",
        ),
        (
            "end-footer-lost",
            Box::new(|p: &Path, _| {
                let len = std::fs::metadata(p).unwrap().len();
                patch(p, len - 512, &[0u8; 512]);
            }),
            "missing at the end",
        ),
    ];
    for (name, plant, expect) in cases {
        let (img, table) = victim(dir.path(), &format!("{name}.vhd"));
        assert_eq!(
            csvctl_status(&["vhd", "check", s(&img)]).0,
            0,
            "{name}: clean before planting"
        );
        plant(&img, table);
        let (code, text) = csvctl_status(&["vhd", "check", s(&img)]);
        assert_eq!(code, 1, "{name}: {text}");
        assert!(
            text.contains(expect),
            "{name}: expected `{expect}` in: {text}"
        );
    }
    // A missing parent.
    let (base, _) = victim(dir.path(), "base.vhd");
    let child = dir.path().join("child.vhd");
    csvctl(&["vhd", "create", s(&child), "--parent", s(&base)]);
    std::fs::remove_file(&base).unwrap();
    let (code, text) = csvctl_status(&["vhd", "check", s(&child)]);
    assert_eq!(code, 1);
    assert!(
        text.contains("parent") && text.contains("not found"),
        "{text}"
    );
}
