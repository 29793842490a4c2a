//! VHDX against a model and against hostile bytes: random writes read
//! back as a plain buffer would (before and after a reopen), and images
//! with bytes changed in their structures give a typed error or a clean
//! read, never a panic.

use proptest::prelude::*;
use vhd::vhdx::{CreateOptions, Vhdx};
use vhd::MemIo;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 5 * MIB;

fn small() -> Vhdx<MemIo> {
    let mut o = CreateOptions::new(SIZE, false);
    o.block_size = MIB as u32;
    Vhdx::create_on(MemIo::default(), "m.vhdx", &o).unwrap()
}

/// A small dynamic VHDX with two blocks written, closed cleanly, and the
/// same image as it is while still open (its log GUID set, an entry in
/// its log).
fn images() -> (Vec<u8>, Vec<u8>) {
    let v = small();
    v.write_at(&[0xab; 10_000], 3000).unwrap();
    v.write_at(&[0xcd; 512], 4 * MIB).unwrap();
    v.flush().unwrap();
    let open = v.io().to_vec();
    let mem = std::sync::Arc::new(MemIo::new(open.clone()));
    Vhdx::open_on(mem.clone(), "m.vhdx", true)
        .unwrap()
        .close()
        .unwrap();
    (mem.to_vec(), open)
}

/// Opens, reads everything, writes a little and checks; any error is
/// fine, a panic is not.
fn poke(bytes: Vec<u8>) {
    for write in [false, true] {
        if let Ok(v) = Vhdx::open_on(MemIo::new(bytes.clone()), "fuzz.vhdx", write) {
            let size = v.size().min(8 << 20);
            let mut buf = vec![0u8; 1 << 16];
            let mut off = 0;
            while off < size {
                let n = ((size - off) as usize).min(buf.len());
                let _ = v.read_at(&mut buf[..n], off);
                off += n as u64;
            }
            let _ = v.write_at(&[0x5a; 1000], size / 3);
            let _ = v.check();
        }
    }
}

/// Where the structures of `images()` are: identifier, headers, region
/// tables, log, metadata, BAT.
const SPOTS: &[(usize, usize)] = &[
    (0, 520),
    (64 << 10, 80),
    (128 << 10, 80),
    (192 << 10, 16 + 64),
    (256 << 10, 16 + 64),
    (1 << 20, 8192),
    (2 << 20, 32 + 5 * 32),
    ((2 << 20) + (64 << 10), 40),
    (3 << 20, 64),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn writes_read_back_as_a_model_would(
        ops in prop::collection::vec((0..SIZE, 1usize..300_000, any::<u8>()), 1..12)
    ) {
        let v = small();
        let mut model = vec![0u8; SIZE as usize];
        for (off, len, fill) in ops {
            let len = len.min((SIZE - off) as usize);
            v.write_at(&vec![fill; len], off).unwrap();
            model[off as usize..off as usize + len].fill(fill);
        }
        let mut got = vec![0u8; SIZE as usize];
        v.read_at(&mut got, 0).unwrap();
        prop_assert!(got == model);
        prop_assert!(v.check().unwrap().is_empty());
        let img = v.io().to_vec();
        v.close().unwrap();
        let v = Vhdx::open_on(MemIo::new(img), "m.vhdx", false).unwrap();
        v.read_at(&mut got, 0).unwrap();
        prop_assert!(got == model);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut img = b"vhdxfile".to_vec();
        img.extend(bytes);
        poke(img);
    }

    #[test]
    fn changed_structures_never_panic(
        open in any::<bool>(),
        flips in prop::collection::vec((0usize..SPOTS.len(), any::<usize>(), any::<u8>()), 1..6)
    ) {
        let (closed, opened) = images();
        let mut img = if open { opened } else { closed };
        for (spot, at, v) in flips {
            let (start, len) = SPOTS[spot];
            img[start + at % len] = v;
        }
        poke(img);
    }
}
