// Fuzz target: open arbitrary bytes as a VHD, read the whole disk (up to
// 8 MiB), write a little into it, and run the consistency check. Any
// outcome but a panic, a hang or an unbounded allocation is fine.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod open_read {
    use vhd::{MemIo, OpenOptions, Vhd};

    /// One input.
    pub fn run(data: &[u8]) {
        let opts = OpenOptions {
            write: true,
            ..Default::default()
        };
        let Ok(v) = Vhd::open_on(MemIo::new(data.to_vec()), "fuzz.vhd", None, &opts) else {
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
        let _ = vhd::check::check_open(&v);
    }
}
