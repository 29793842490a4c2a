//! The errno an application gets for what went wrong under a volume
//! operation, and the conversions between the coordinator's times and
//! the kernel's.

use coordinator::client::ClientError;
use coordinator::proto::ErrorCode;
use fuser::Errno;
use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The errno for a failed call to the coordinator.
pub(crate) fn errno(e: &ClientError) -> Errno {
    match e.code() {
        Some(ErrorCode::NotFound) => Errno::ENOENT,
        Some(ErrorCode::Exists) => Errno::EEXIST,
        Some(ErrorCode::NotDir) => Errno::ENOTDIR,
        Some(ErrorCode::IsDir) => Errno::EISDIR,
        Some(ErrorCode::NotEmpty) => Errno::ENOTEMPTY,
        Some(ErrorCode::Invalid) | Some(ErrorCode::Loop) => Errno::EINVAL,
        Some(ErrorCode::NoSpace) => Errno::ENOSPC,
        Some(ErrorCode::Busy) => Errno::EBUSY,
        Some(ErrorCode::NoData) => Errno::ENODATA,
        Some(ErrorCode::TooBig) => Errno::E2BIG,
        Some(ErrorCode::WouldBlock) => Errno::EAGAIN,
        Some(ErrorCode::Deadlock) => Errno::EDEADLK,
        // A host of an older build is a member: what it cannot apply is
        // not offered yet (special files, extended attributes, exchange).
        Some(ErrorCode::FeatureLevel) => Errno::EOPNOTSUPP,
        _ => {
            tracing::warn!("metadata call failed: {e}");
            Errno::EIO
        }
    }
}

/// The errno of a failed LUN I/O.
pub(crate) fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// A time the coordinator keeps (ms since the epoch) for the kernel.
pub fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A time the coordinator keeps (ms since the epoch, and nanoseconds
/// within the millisecond) for the kernel.
pub fn ms_ns_to_time(ms: u64, ns: u32) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms) + Duration::from_nanos(u64::from(ns % 1_000_000))
}

/// A time the kernel gives as the coordinator keeps it: ms since the
/// epoch, and nanoseconds within the millisecond.
pub(crate) fn time_to_ms_ns(t: SystemTime) -> (u64, u32) {
    t.duration_since(UNIX_EPOCH).map_or((0, 0), |d| {
        (d.as_millis() as u64, d.subsec_nanos() % 1_000_000)
    })
}

/// A time the kernel gives, as the coordinator keeps it.
pub(crate) fn time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A name in a directory: UTF-8 and not too long.
pub(crate) fn name_of(name: &OsStr) -> Result<&str, Errno> {
    let s = name.to_str().ok_or(Errno::EINVAL)?;
    if s.len() > coordinator::meta::MAX_NAME {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinators_refusals_become_posix_errors() {
        let refused = |code: ErrorCode| ClientError::Refused(coordinator::proto::error(code, "x"));
        assert_eq!(errno(&refused(ErrorCode::NotFound)), Errno::ENOENT);
        assert_eq!(errno(&refused(ErrorCode::NotEmpty)), Errno::ENOTEMPTY);
        assert_eq!(errno(&refused(ErrorCode::Loop)), Errno::EINVAL);
        assert_eq!(errno(&refused(ErrorCode::Busy)), Errno::EBUSY);
        let down = ClientError::Unavailable {
            secs: 1.0,
            last: "no leader".into(),
        };
        assert_eq!(errno(&down), Errno::EIO);
    }

    #[test]
    fn names_are_checked_and_times_convert_both_ways() {
        assert_eq!(name_of(OsStr::new("vm1.vhd")), Ok("vm1.vhd"));
        let long = "x".repeat(coordinator::meta::MAX_NAME + 1);
        assert_eq!(name_of(OsStr::new(&long)), Err(Errno::ENAMETOOLONG));
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(name_of(OsStr::from_bytes(b"\xff")), Err(Errno::EINVAL));
        assert_eq!(time_to_ms(ms_to_time(1_700_000_000_123)), 1_700_000_000_123);
        assert_eq!(
            io_errno(&std::io::Error::from_raw_os_error(libc::ENOSPC)),
            Errno::ENOSPC
        );
        assert_eq!(io_errno(&std::io::Error::other("x")), Errno::EIO);
    }
}
