use super::state::CPU_REGS;
use super::*;
use proptest::prelude::*;

fn from_seed<T: FromBytes>(seed: &[u8]) -> T {
    let mut b = vec![0u8; std::mem::size_of::<T>()];
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed[i % seed.len()].wrapping_add(i as u8);
    }
    T::read_from_bytes(&b).unwrap()
}

fn vcpu(seed: &[u8], id: u32, msrs: usize) -> VcpuState {
    VcpuState {
        id,
        cpuid: (0..3).map(|_| from_seed(seed)).collect(),
        tsc_khz: 2_600_000,
        mp_state: from_seed(seed),
        regs: from_seed(seed),
        sregs: from_seed(seed),
        xsave: Box::new(from_seed(seed)),
        xcrs: from_seed(seed),
        debugregs: from_seed(seed),
        lapic: from_seed(seed),
        msrs: (0..msrs).map(|i| (i as u32, i as u64 * 7)).collect(),
        events: from_seed(seed),
    }
}

#[test]
fn frames_round_trip_and_detect_corruption() {
    let mut s = Vec::new();
    write_header(&mut s).unwrap();
    let hello = Hello {
        mem_bytes: 64 << 20,
        vcpus: 2,
        guest: 1,
    };
    write_frame(&mut s, Kind::Hello, &[&hello.encode()]).unwrap();
    let page = vec![7u8; 4096];
    let head = PagesHead {
        gpa: 0x5000,
        count: 1,
        zero: false,
    };
    write_pages_frame(&mut s, &head, &crc32fast::hash(&page).to_le_bytes(), &page).unwrap();
    let mut r = &s[..];
    read_header(&mut r).unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Hello);
    assert_eq!(Hello::decode(&buf).unwrap(), hello);
    assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Pages);
    let (h, d) = PagesHead::decode(&buf, 64 << 20).unwrap();
    assert_eq!((h, d), (head, &page[..]));
    // Flip one byte anywhere after the header: never accepted silently.
    for at in 12..s.len() {
        let mut bad = s.clone();
        bad[at] ^= 0x40;
        let mut r = &bad[..];
        read_header(&mut r).unwrap();
        let ok = (|| -> Result<()> {
            let k = read_frame(&mut r, &mut buf)?;
            if k == Kind::Hello {
                Hello::decode(&buf)?;
            }
            let k = read_frame(&mut r, &mut buf)?;
            if k == Kind::Pages {
                PagesHead::decode(&buf, 64 << 20)?;
            }
            Ok(())
        })();
        assert!(ok.is_err(), "flip at {at} went unnoticed");
    }
}

#[test]
fn header_refuses_other_majors_and_magics() {
    let mut s = Vec::new();
    write_header(&mut s).unwrap();
    s[8] = 2;
    assert!(matches!(
        read_header(&mut &s[..]),
        Err(StreamError::Version(2, 0))
    ));
    s[0] = b'X';
    assert!(matches!(
        read_header(&mut &s[..]),
        Err(StreamError::BadMagic(_))
    ));
}

#[test]
fn pages_outside_memory_are_refused() {
    let head = PagesHead {
        gpa: (64 << 20) - 4096,
        count: 2,
        zero: true,
    };
    assert!(PagesHead::decode(&head.encode(), 64 << 20).is_err());
    let head = PagesHead {
        gpa: u64::MAX - 4095,
        count: 1,
        zero: true,
    };
    assert!(PagesHead::decode(&head.encode(), u64::MAX).is_err());
    let head = PagesHead {
        gpa: 4096,
        count: 1,
        zero: true,
    };
    assert!(PagesHead::decode(&head.encode(), 64 << 20).is_ok());
}

#[test]
fn vcpu_and_vm_state_round_trip() {
    let v = vcpu(b"state", 3, 40);
    let back = VcpuState::decode(&v.encode()).unwrap();
    assert_eq!(back.encode(), v.encode());
    assert_eq!(back.msrs, v.msrs);
    let vm = VmState {
        pic_master: from_seed(b"a"),
        pic_slave: from_seed(b"b"),
        ioapic: from_seed(b"c"),
        pit: from_seed(b"d"),
        clock: from_seed(b"e"),
    };
    assert_eq!(VmState::decode(&vm.encode()).unwrap().encode(), vm.encode());
    let d = DeviceState {
        serial_regs: [1, 2, 3, 4, 5, 6, 7, 8, 9],
        serial_in: b"ls\n".to_vec(),
        heartbeat_seq: 1234,
        heartbeats: 1000,
        heartbeat_gaps: 0,
        guest_errors: 0,
        blk: None,
    };
    assert_eq!(DeviceState::decode(&d.encode()).unwrap(), d);
    let with_disk = DeviceState {
        blk: Some(crate::virtio_blk::BlkState {
            capacity: 64 << 20,
            status: 15,
            driver_features: 1 << 32,
            queue: virtio_queue::QueueState {
                max_size: 64,
                size: 8,
                ready: true,
                next_avail: 7,
                next_used: 7,
                desc_table: 0x60000,
                avail_ring: 0x60100,
                used_ring: 0x61000,
                ..Default::default()
            },
            ..Default::default()
        }),
        ..d.clone()
    };
    assert_eq!(DeviceState::decode(&with_disk.encode()).unwrap(), with_disk);
    // A record of the wrong size is named in the error.
    let mut enc = v.encode();
    let regs_at = enc
        .windows(2)
        .position(|w| w == CPU_REGS.to_le_bytes())
        .unwrap();
    let _ = regs_at;
    enc.truncate(enc.len() - 1);
    let err = VcpuState::decode(&enc).unwrap_err().to_string();
    assert!(err.contains("VcpuState"), "{err}");
}

#[test]
fn a_page_changed_in_flight_is_damaged_until_sent_again() {
    let mem_bytes = 16 * 4096;
    let mut memory = vec![0u8; mem_bytes];
    let mut damaged = vec![0u64; 1];
    let mut buf = Vec::new();
    let head = PagesHead {
        gpa: 2 * 4096,
        count: 2,
        zero: false,
    };
    let pages = vec![0x11u8; 8192];
    let mut crcs = Vec::new();
    crcs.extend_from_slice(&crc32fast::hash(&pages[..4096]).to_le_bytes());
    crcs.extend_from_slice(&crc32fast::hash(&pages[4096..]).to_le_bytes());
    // The second page changed after its CRC was taken.
    let mut sent = pages.clone();
    sent[5000] = 0x22;
    let mut s = Vec::new();
    write_pages_frame(&mut s, &head, &crcs, &sent).unwrap();
    let k = read_frame_to_memory(&mut &s[..], &mut buf, &mut memory, &mut damaged).unwrap();
    assert_eq!(k, Kind::Pages);
    assert_eq!(damaged[0], 1 << 3, "page 3 is damaged, page 2 is not");
    // The general decoder refuses the same frame outright.
    let mut r = &s[..];
    read_frame(&mut r, &mut buf).unwrap();
    assert!(PagesHead::decode(&buf, mem_bytes as u64).is_err());
    // The copy of the next round repairs it.
    let again = PagesHead {
        gpa: 3 * 4096,
        count: 1,
        zero: false,
    };
    let mut s = Vec::new();
    write_pages_frame(
        &mut s,
        &again,
        &crc32fast::hash(&pages[4096..]).to_le_bytes(),
        &pages[4096..],
    )
    .unwrap();
    read_frame_to_memory(&mut &s[..], &mut buf, &mut memory, &mut damaged).unwrap();
    assert_eq!(damaged[0], 0);
    assert_eq!(&memory[2 * 4096..4 * 4096], &pages[..]);
    // A damaged head or CRC list is a frame checksum error, before any
    // page is written.
    let mut s = Vec::new();
    write_pages_frame(&mut s, &again, &[0, 0, 0, 0], &pages[4096..]).unwrap();
    s[12 + PagesHead::LEN] ^= 1;
    let mut fresh = vec![0u8; mem_bytes];
    assert!(read_frame_to_memory(&mut &s[..], &mut buf, &mut fresh, &mut damaged).is_err());
    assert!(fresh.iter().all(|&b| b == 0));
}

fn synthetic_stream() -> Vec<u8> {
    let mut s = Vec::new();
    write_header(&mut s).unwrap();
    let mem = 8 << 20;
    write_frame(
        &mut s,
        Kind::Hello,
        &[&Hello {
            mem_bytes: mem,
            vcpus: 1,
            guest: 1,
        }
        .encode()],
    )
    .unwrap();
    let zero = PagesHead {
        gpa: 0,
        count: 16,
        zero: true,
    };
    write_frame(&mut s, Kind::Pages, &[&zero.encode()]).unwrap();
    let one = PagesHead {
        gpa: 0x5000,
        count: 1,
        zero: false,
    };
    write_pages_frame(
        &mut s,
        &one,
        &crc32fast::hash(&[0x5a; 4096]).to_le_bytes(),
        &[0x5a; 4096],
    )
    .unwrap();
    write_frame(&mut s, Kind::Round, &[&1u32.to_le_bytes()]).unwrap();
    write_frame(&mut s, Kind::Devices, &[&DeviceState::default().encode()]).unwrap();
    let vm = VmState {
        pic_master: from_seed(b"a"),
        pic_slave: from_seed(b"b"),
        ioapic: from_seed(b"c"),
        pit: from_seed(b"d"),
        clock: from_seed(b"e"),
    };
    write_frame(&mut s, Kind::VmState, &[&vm.encode()]).unwrap();
    write_frame(&mut s, Kind::VcpuState, &[&vcpu(b"cpu", 0, 8).encode()]).unwrap();
    write_frame(
        &mut s,
        Kind::End,
        &[&End {
            memory_crc: Some(7),
        }
        .encode()],
    )
    .unwrap();
    s
}

/// The fuzz target's seed is a complete stream that `inspect` accepts
/// (`CSV_REGEN_FUZZ_SEED=1` rewrites it after a format change).
#[test]
fn fuzz_seed_is_a_valid_stream() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/stream/full-stream");
    if std::env::var_os("CSV_REGEN_FUZZ_SEED").is_some() {
        std::fs::write(path, synthetic_stream()).unwrap();
    }
    let seed = std::fs::read(path).unwrap();
    let i = inspect(&mut &seed[..]).unwrap();
    assert_eq!(
        (i.pages, i.zero_pages, i.vcpu_states, i.memory_crc),
        (17, 16, 1, Some(7))
    );
    // Cut anywhere: an error, never a panic or a success.
    for cut in 0..seed.len() {
        assert!(inspect(&mut &seed[..cut]).is_err(), "cut at {cut} accepted");
    }
}

proptest! {
    #[test]
    fn any_bytes_decode_without_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Hello::decode(&data);
        let _ = PagesHead::decode(&data, 1 << 30);
        let _ = VmState::decode(&data);
        let _ = VcpuState::decode(&data);
        let _ = DeviceState::decode(&data);
        let _ = End::decode(&data);
        let _ = Status::decode(&data);
        let mut buf = Vec::new();
        let mut r = &data[..];
        if read_header(&mut r).is_ok() {
            while read_frame(&mut r, &mut buf).is_ok() {}
        }
        let mut r = &data[..];
        let _ = read_frame(&mut r, &mut buf);
        let _ = inspect(&mut &data[..]);
    }

    #[test]
    fn vcpu_state_round_trips(seed in proptest::collection::vec(any::<u8>(), 1..64), id in 0u32..64, msrs in 0usize..100) {
        let v = vcpu(&seed, id, msrs);
        let back = VcpuState::decode(&v.encode()).unwrap();
        prop_assert_eq!(back.encode(), v.encode());
    }

    #[test]
    fn truncated_state_is_an_error(seed in proptest::collection::vec(any::<u8>(), 1..16), cut in 1usize..9000) {
        let enc = vcpu(&seed, 0, 10).encode();
        let cut = cut.min(enc.len());
        prop_assert!(VcpuState::decode(&enc[..enc.len() - cut]).is_err());
    }

    #[test]
    fn status_round_trips(ok: bool, crc: Option<u32>, msg in ".{0,200}") {
        let s = Status { ok, memory_crc: crc, message: msg };
        prop_assert_eq!(Status::decode(&s.encode()).unwrap(), s);
    }
}
