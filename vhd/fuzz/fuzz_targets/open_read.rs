//! Fuzz target: open arbitrary bytes as a VHD, read the whole disk (up to
//! 8 MiB), write a little into it, and run the consistency check. Any
//! outcome but a panic, a hang or an unbounded allocation is fine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::{MemIo, OpenOptions, Vhd};

fuzz_target!(|data: &[u8]| {
    let opts = OpenOptions { write: true, ..Default::default() };
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
});
