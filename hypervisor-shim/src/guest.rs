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
//! | 0x100 | heartbeat sequence number | guest |
//! | 0x108 | pages that failed their check | guest |
//! | 0x110 | pages written | guest |
//! | 0x118 | laps over the dirty area | guest |
//! | 0x120 | next page to write | guest |
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

/// Settings of a test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestGuestConfig {
    /// Pages dirtied per heartbeat.
    pub pages_per_tick: u64,
    /// Heartbeat interval in microseconds.
    pub tick_us: u64,
}

impl TestGuestConfig {
    /// The settings for a dirtying rate in MiB/s at a heartbeat interval.
    pub fn for_rate(mib_per_s: f64, tick_us: u64) -> Self {
        let pages_per_s = mib_per_s * 256.0;
        let per_tick = (pages_per_s * tick_us as f64 / 1e6).round().max(0.0) as u64;
        TestGuestConfig {
            pages_per_tick: per_tick,
            tick_us: tick_us.max(1),
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
