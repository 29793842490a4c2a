//! Errors of the VHD crate. Each names the file, the structure and the
//! offset it concerns, so an operator can tell what is broken and where.

use std::path::PathBuf;

/// What went wrong with a VHD file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call on the image failed.
    #[error("{what} of {file} at offset {offset}")]
    Io {
        /// The file (or LUN) name.
        file: String,
        /// What was being done ("read footer", "write block 12 bitmap", ...).
        what: String,
        /// Byte offset in the file.
        offset: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is too small or too short to hold a VHD at all.
    #[error("{file} is not a VHD: {reason}")]
    NotVhd {
        /// The file name.
        file: String,
        /// Why ("no `conectix` footer at its end or start", ...).
        reason: String,
    },
    /// A structure is present but its content is invalid.
    #[error("corrupt {structure} of {file} at offset {offset}: {problem}")]
    Corrupt {
        /// The file name.
        file: String,
        /// Which structure ("footer", "dynamic header", "BAT entry 17", ...).
        structure: String,
        /// Byte offset of the structure in the file.
        offset: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// A feature or version this crate does not handle.
    #[error("{file}: unsupported {what}")]
    Unsupported {
        /// The file name.
        file: String,
        /// What is unsupported.
        what: String,
    },
    /// The parent of a differencing disk cannot be found.
    #[error("parent of {child} not found (tried: {})", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    ParentNotFound {
        /// The differencing disk.
        child: String,
        /// The paths that were tried, in order.
        tried: Vec<PathBuf>,
    },
    /// A parent was found but is not the one the child was made from.
    #[error("parent {parent} of {child} does not match: {problem}")]
    ParentMismatch {
        /// The differencing disk.
        child: String,
        /// The parent that was opened.
        parent: String,
        /// What differs (unique id or time stamp).
        problem: String,
    },
    /// A differencing chain refers back to one of its own members.
    #[error("parent chain of {child} loops back to {repeated}")]
    ParentLoop {
        /// The disk whose chain was being opened.
        child: String,
        /// The file seen twice.
        repeated: String,
    },
    /// A request lies outside the virtual disk.
    #[error("{op} of {len} bytes at offset {offset} is beyond the end of {file} ({size} bytes)")]
    OutOfRange {
        /// The file name.
        file: String,
        /// "read" or "write".
        op: &'static str,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the disk.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("{file} is open read-only")]
    ReadOnly {
        /// The file name.
        file: String,
    },
    /// Arguments that do not make a valid image or operation.
    #[error("{0}")]
    Invalid(String),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Extension that wraps an `io::Result` with the file, the operation and
/// the offset.
pub(crate) trait IoContext<T> {
    fn ctx(self, file: &str, what: impl FnOnce() -> String, offset: u64) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, file: &str, what: impl FnOnce() -> String, offset: u64) -> Result<T> {
        self.map_err(|source| Error::Io {
            file: file.to_string(),
            what: what(),
            offset,
            source,
        })
    }
}
