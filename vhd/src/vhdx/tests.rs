// Test helpers fail loudly on purpose.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::check::Severity;
use crate::io::MemIo;

fn small(fixed: bool) -> CreateOptions {
    CreateOptions {
        size: 5 << 20,
        block_size: 1 << 20,
        fixed,
        logical_sector: 512,
        physical_sector: 4096,
    }
}

fn bytes(v: &Vhdx<MemIo>) -> Vec<u8> {
    v.io().to_vec()
}

#[test]
fn a_new_dynamic_disk_reads_zeros_and_keeps_what_is_written() {
    let v = Vhdx::create_on(MemIo::default(), "t.vhdx", &small(false)).unwrap();
    assert_eq!(v.size(), 5 << 20);
    let mut b = vec![1u8; 4096];
    v.read_at(&mut b, 4 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Across a block boundary, and zeros that allocate nothing.
    v.write_at(&[7u8; 10_000], (1 << 20) - 5000).unwrap();
    v.write_at(&[0u8; 4096], 3 << 20).unwrap();
    assert_eq!(v.allocated_blocks().unwrap(), 2);
    assert!(v.check().unwrap().is_empty(), "{:?}", v.check());
    v.flush().unwrap();
    let img = bytes(&v);
    drop(v);
    let v = Vhdx::open_on(MemIo::new(img), "t.vhdx", false).unwrap();
    let mut b = vec![0u8; 12_000];
    v.read_at(&mut b, (1 << 20) - 6000).unwrap();
    assert!(b[..1000].iter().all(|&x| x == 0));
    assert!(b[1000..11_000].iter().all(|&x| x == 7));
    assert!(b[11_000..].iter().all(|&x| x == 0));
    assert!(v.write_at(&[1], 0).is_err(), "read-only");
    assert!(
        v.read_at(&mut [0u8; 2], (5 << 20) - 1).is_err(),
        "past the end"
    );
}

#[test]
fn a_fixed_disk_has_every_block_and_a_clean_close_empties_the_log_guid() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.vhdx");
    let v = Vhdx::create(&p, &small(true)).unwrap();
    assert!(v.is_fixed());
    assert_eq!(v.allocated_blocks().unwrap(), 5);
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        BAT_AT + MIB + (5 << 20)
    );
    assert_ne!(v.header().unwrap().log_guid, [0; 16], "open for writing");
    v.write_at(&[9u8; 512], 4096).unwrap();
    v.close().unwrap();
    let v = Vhdx::open(&p, false).unwrap();
    assert_eq!(v.header().unwrap().log_guid, [0; 16], "closed cleanly");
    let mut b = [0u8; 512];
    v.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [9u8; 512]);
}

#[test]
fn an_entry_left_in_the_log_is_replayed_in_the_file_or_in_memory() {
    let v = Vhdx::create_on(MemIo::default(), "l.vhdx", &small(false)).unwrap();
    v.write_at(&[5u8; 4096], 2 << 20).unwrap();
    v.flush().unwrap();
    // The file as it is while open (its header has the log GUID), with
    // the BAT's in-place update undone, as if the power went before it.
    let mut img = bytes(&v);
    drop(v);
    let bat = BAT_AT as usize + 8 * 2;
    assert_ne!(le64(&img, bat), 0);
    img[bat..bat + 8].fill(0);

    // Read-only: replayed in memory, the file untouched.
    let ro = Vhdx::open_on(MemIo::new(img.clone()), "l.vhdx", false).unwrap();
    assert_eq!(ro.replayed(), 1);
    let mut b = vec![0u8; 4096];
    ro.read_at(&mut b, 2 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 5));
    assert_eq!(le64(&ro.io().to_vec(), bat), 0);
    assert!(ro.check().unwrap().iter().any(|f| f.structure == "log"));

    // Read-write: replayed into the file.
    let rw = Vhdx::open_on(MemIo::new(img), "l.vhdx", true).unwrap();
    assert_eq!(rw.replayed(), 1);
    assert_ne!(le64(&rw.io().to_vec(), bat), 0);
    rw.read_at(&mut b, 2 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 5));
}

#[test]
fn hostile_parameters_are_refused_with_what_is_wrong() {
    let v = Vhdx::create_on(MemIo::default(), "h.vhdx", &small(false)).unwrap();
    v.flush().unwrap();
    let good = bytes(&v);
    drop(v);
    // Not a VHDX at all.
    let e = Vhdx::open_on(MemIo::new(vec![0u8; 2 << 20]), "z", false).unwrap_err();
    assert!(matches!(e, Error::NotVhd { .. }), "{e}");
    // Both headers broken.
    let mut img = good.clone();
    img[(64 << 10) + 20] ^= 1;
    img[(128 << 10) + 20] ^= 1;
    let e = Vhdx::open_on(MemIo::new(img), "h", false).unwrap_err();
    assert!(e.to_string().contains("headers"), "{e}");
    // One header broken: the other serves, with a warning.
    let mut img = good.clone();
    img[(64 << 10) + 20] ^= 1;
    let v = Vhdx::open_on(MemIo::new(img), "h", false).unwrap();
    assert!(v.check().unwrap().iter().any(|f| f.structure == "header 1"));
    // A block size that is no power of two (item at 64 KiB of metadata).
    let mut img = good.clone();
    let at = META_AT as usize + METADATA_TABLE_SIZE;
    img[at..at + 4].copy_from_slice(&3_000_000u32.to_le_bytes());
    let e = Vhdx::open_on(MemIo::new(img), "h", false).unwrap_err();
    assert!(e.to_string().contains("block size"), "{e}");
    // A differencing disk.
    let mut img = good.clone();
    img[at + 4] = 2;
    let e = Vhdx::open_on(MemIo::new(img), "h", false).unwrap_err();
    assert!(e.to_string().contains("differencing"), "{e}");
    // A BAT entry in an unknown state.
    let mut img = good;
    img[BAT_AT as usize] = 4;
    let v = Vhdx::open_on(MemIo::new(img), "h", false).unwrap();
    assert!(v.read_at(&mut [0u8; 512], 0).is_err());
    assert!(v
        .check()
        .unwrap()
        .iter()
        .any(|f| f.severity == Severity::Error && f.problem.contains("unknown state")));
}
