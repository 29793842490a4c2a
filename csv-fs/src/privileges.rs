//! Dropping the privileges this process does not need: after it, the
//! process keeps only the capabilities in `keep` (effective and
//! permitted), none beyond them can come back (bounding set), and nothing
//! it executes gains any (`no_new_privs`).

/// The capabilities (numbers of `linux/capability.h`) there are.
const LAST_CAP: u32 = 40;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// Keeps only `keep`; returns what it did, for the log.
pub fn drop_all_but(keep: &[u32]) -> std::io::Result<String> {
    let mut dropped = 0;
    for cap in 0..=LAST_CAP {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl(2) with integer arguments; EINVAL for a capability
        // this kernel does not know is ignored.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } == 0 {
            dropped += 1;
        }
    }
    let mut head = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut now = [CapData::default(); 2];
    // SAFETY: capget(2) with a v3 header and room for two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &mut head, now.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut data = [CapData::default(); 2];
    for &cap in keep {
        let (i, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        // Only what it holds: a process without a capability cannot keep it.
        if i < 2 && now[i].permitted & bit != 0 {
            data[i].effective |= bit;
            data[i].permitted |= bit;
        }
    }
    // SAFETY: capset(2) with a v3 header and two data words, as the ABI
    // wants; it only lowers this thread's capabilities. Threads started
    // later inherit them; call this before starting any.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut head, data.as_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl(2) with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(format!(
        "kept capabilities {keep:?}, dropped {dropped} from the bounding set, no_new_privs set"
    ))
}
