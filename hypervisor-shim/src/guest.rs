//! The purpose-built test guest and the guest-physical layout csv-vmm gives
//! it.
//!
//! The guest (`guest/testguest.S`, assembled by `build.rs`) is entered in
//! 64-bit mode at [`LOAD_ADDR`]. It reads its settings from the mailbox page
//! and keeps its progress there, so the VMM (and a test) can read how far it
//! got from guest memory alone:
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0x000 | magic `CSVGUEST` | VMM |
//! | 0x008 | TSC frequency, kHz | VMM |
//! | 0x010 | guest memory size, bytes | VMM |
//! | 0x018 | pages dirtied per heartbeat | VMM (may change while running) |
//! | 0x020 | heartbeat interval, µs | VMM |
//! | 0x028 | start of the dirty area | VMM |
//! | 0x030 | heartbeat also on COM1 as text when not 0 | VMM (multiboot entry: 1) |
//! | 0x038 | disk blocks written round robin (0: none) | VMM |
//! | 0x040 | a disk write every this many heartbeats | VMM |
//! | 0x100 | heartbeat sequence number | guest |
//! | 0x108 | pages that failed their check | guest |
//! | 0x110 | pages written | guest |
//! | 0x118 | laps over the dirty area | guest |
//! | 0x120 | next page to write | guest |
//! | 0x128 | disk writes completed | guest |
//! | 0x130 | heartbeat number of the last completed disk write | guest |
//! | 0x138 | disk requests that failed | guest |
//! | 0x140 | virtqueue avail index | guest |
//!
//! Page `p` of the dirty area at generation `g` (kept as a `u32` per page in
//! the generation table) holds `((p << 32 | g) * PAT_MUL) + i * PAT_STEP` in
//! qword `i`; generation 0 means "never written".

/// The guest image: flat x86-64 code linked at [`LOAD_ADDR`].
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.bin"));

/// Where the VMM builds the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// An empty IDT (the test guest takes no interrupts).
pub const IDT_ADDR: u64 = 0x2000;
/// The mailbox page.
pub const MAILBOX: u64 = 0x5000;
/// The page tables: PML4, PDPT and four page directories (4 GiB, 2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
/// Initial stack pointer.
pub const STACK_TOP: u64 = 0x80000;
/// Where the image is loaded and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// One `u32` generation per page of the dirty area.
pub const GEN_TABLE: u64 = 0x20_0000;
/// First page the guest dirties.
pub const DIRTY_BASE: u64 = 0x40_0000;
/// The generation table holds 512 Ki entries: 2 GiB of dirty area.
pub const MAX_MEMORY: u64 = DIRTY_BASE + (DIRTY_BASE - GEN_TABLE) / 4 * 4096;
/// The smallest memory the guest runs in (layout plus one MiB to dirty).
pub const MIN_MEMORY: u64 = DIRTY_BASE + 0x10_0000;

pub const MB_MAGIC: u64 = 0x000;
pub const MB_TSC_KHZ: u64 = 0x008;
pub const MB_MEM: u64 = 0x010;
pub const MB_RATE: u64 = 0x018;
pub const MB_TICK_US: u64 = 0x020;
pub const MB_DIRTY: u64 = 0x028;
pub const MB_HB_SERIAL: u64 = 0x030;
pub const MB_DISK_BLOCKS: u64 = 0x038;
pub const MB_DISK_EVERY: u64 = 0x040;
pub const MB_DISK_WRITES: u64 = 0x128;
pub const MB_DISK_LAST: u64 = 0x130;
pub const MB_DISK_ERRORS: u64 = 0x138;
pub const MB_SEQ: u64 = 0x100;
pub const MB_ERRORS: u64 = 0x108;
pub const MB_WRITTEN: u64 = 0x110;
pub const MB_LAPS: u64 = 0x118;
pub const MB_CURSOR: u64 = 0x120;

/// `CSVGUEST`, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CSVGUEST");

/// Heartbeat: the low 32 bits of the sequence number, `out dx, eax`.
pub const PORT_HEARTBEAT: u16 = 0x510;
/// A page failed its check: the page number.
pub const PORT_ERROR: u16 = 0x511;
/// The guest is up (written once at boot).
pub const PORT_BOOTED: u16 = 0x512;

pub const PAT_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
pub const PAT_STEP: u64 = 0x2545_F491_4F6C_DD1D;

/// The value of qword `i` of dirty page `page` at generation `gen`.
pub fn pattern(page: u64, generation: u32, i: u64) -> u64 {
    ((page << 32) | u64::from(generation))
        .wrapping_mul(PAT_MUL)
        .wrapping_add(i.wrapping_mul(PAT_STEP))
}

/// A request failed (or the virtio device was not found: 0xffffffff).
pub const PORT_DISK_ERROR: u16 = 0x513;

/// What a scan of the test guest's disk found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskCheck {
    /// Blocks the guest has written (not all zero).
    pub written: u64,
    /// Written blocks whose contents do not hold together.
    pub bad: u64,
    /// The highest heartbeat number found on the disk.
    pub newest_seq: u64,
}

/// Checks the blocks the test guest wrote to its disk: block `b` holds its
/// heartbeat number `s` (with `s mod blocks == b`), `b`, and the pattern
/// of page `b | 1 << 31` at generation `s mod 2^32`; unwritten blocks are
/// zero. `read` reads 4 KiB block `b`.
pub fn check_disk(
    blocks: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<DiskCheck> {
    let mut out = DiskCheck::default();
    let mut buf = vec![0u8; 4096];
    for b in 0..blocks {
        read(b, &mut buf)?;
        if buf.iter().all(|&x| x == 0) {
            continue;
        }
        out.written += 1;
        let q = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        let seq = q(0);
        let ok = q(1) == b
            && seq % blocks == b
            && (2..512).all(|i| q(i) == pattern(b | 1 << 31, seq as u32, i as u64));
        if ok {
            out.newest_seq = out.newest_seq.max(seq);
        } else {
            out.bad += 1;
        }
    }
    Ok(out)
}

/// Settings of a test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestGuestConfig {
    /// Pages dirtied per heartbeat.
    pub pages_per_tick: u64,
    /// Heartbeat interval in microseconds.
    pub tick_us: u64,
    /// 4 KiB blocks of the virtio-blk disk the guest writes round robin
    /// (0: no disk writes).
    pub disk_blocks: u64,
    /// One block written every this many heartbeats.
    pub disk_every: u64,
}

impl TestGuestConfig {
    /// The settings for a dirtying rate in MiB/s at a heartbeat interval.
    pub fn for_rate(mib_per_s: f64, tick_us: u64) -> Self {
        let pages_per_s = mib_per_s * 256.0;
        let per_tick = (pages_per_s * tick_us as f64 / 1e6).round().max(0.0) as u64;
        TestGuestConfig {
            pages_per_tick: per_tick,
            tick_us: tick_us.max(1),
            disk_blocks: 0,
            disk_every: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_built_and_starts_with_the_stack_setup() {
        // A short jump over the multiboot header, which follows at offset 4.
        assert_eq!(IMAGE[0], 0xeb);
        assert_eq!(&IMAGE[4..8], &0x1BAD_B002u32.to_le_bytes());
        assert!(IMAGE.len() < 4096);
    }

    #[test]
    fn layout_limits() {
        assert_eq!(MAX_MEMORY, DIRTY_BASE + (2 << 30));
        assert_eq!(TestGuestConfig::for_rate(50.0, 1000).pages_per_tick, 13);
        assert_eq!(TestGuestConfig::for_rate(0.0, 1000).pages_per_tick, 0);
    }
}
