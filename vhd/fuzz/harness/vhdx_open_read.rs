// Fuzz target: a small valid VHDX (two blocks written, its log holding the
// last BAT update, its header's log GUID set, as after a crash) with the
// input's edits applied, opened read-only (the replay in memory) and
// read-write (the replay into the image), each read whole, written a
// little and checked. Any outcome but a panic, a hang or an unbounded
// allocation is fine.
//
// The input is a list of 6-byte edits: a 4-byte offset (little-endian)
// into one of the image's structures, chosen by the fifth byte, and the
// byte to put there. Edits that land in the structures, rather than
// anywhere in a 5 MiB file, reach the parsers.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod vhdx_open_read {
    use std::sync::{Arc, OnceLock};
    use vhd::vhdx::{CreateOptions, Vhdx};
    use vhd::MemIo;

    const MIB: u64 = 1 << 20;

    /// Where the image's structures are: identifier, headers, region
    /// tables, log, metadata table and items, BAT, the first block.
    const SPOTS: &[(usize, usize)] = &[
        (0, 520),
        (64 << 10, 4096),
        (128 << 10, 4096),
        (192 << 10, 4096),
        (256 << 10, 4096),
        (1 << 20, 8192),
        (2 << 20, 512),
        ((2 << 20) + (64 << 10), 64),
        (3 << 20, 4096),
        (4 << 20, 4096),
    ];

    fn base() -> &'static Vec<u8> {
        static BASE: OnceLock<Vec<u8>> = OnceLock::new();
        BASE.get_or_init(|| {
            let mut o = CreateOptions::new(5 * MIB, false);
            o.block_size = MIB as u32;
            let mem = Arc::new(MemIo::default());
            let v = Vhdx::create_on(mem.clone(), "base.vhdx", &o).expect("a new image");
            v.write_at(&[0xab; 10_000], 3000).expect("a write");
            v.write_at(&[0xcd; 512], 4 * MIB).expect("a write");
            v.flush().expect("a flush");
            // The image as it is while open (the log GUID set, as after a
            // crash); the close that follows changes `mem`, not this copy.
            let img = mem.to_vec();
            drop(v);
            img
        })
    }

    fn poke(img: Vec<u8>, write: bool) {
        let Ok(v) = Vhdx::open_on(MemIo::new(img), "fuzz.vhdx", write) else {
            return;
        };
        let size = v.size().min(8 << 20);
        let mut buf = vec![0u8; 1 << 16];
        let mut off = 0;
        while off < size {
            let n = ((size - off) as usize).min(buf.len());
            if v.read_at(&mut buf[..n], off).is_err() {
                break;
            }
            off += n as u64;
        }
        let _ = v.write_at(&[0x5a; 1000], size / 3);
        let _ = v.check();
    }

    /// One input.
    pub fn run(data: &[u8]) {
        let mut img = base().clone();
        for e in data.chunks_exact(6) {
            let at = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as usize;
            let (start, len) = SPOTS[usize::from(e[4]) % SPOTS.len()];
            img[start + at % len] = e[5];
        }
        poke(img.clone(), false);
        poke(img, true);
    }
}
