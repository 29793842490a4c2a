//! Finding the parent of a differencing disk.
//!
//! A child names its parent three ways: the `W2ru` locator (a path relative
//! to the child, Windows style), the `W2ku` locator (an absolute path), and
//! the parent's file name in the header. They are tried in that order; a
//! Windows path is turned into a Linux one (`\` to `/`), and an absolute
//! path with a drive letter falls back to its file name next to the child.

use crate::header::{decode_locator, DynHeader, W2KU, W2RU};
use crate::io::BlockIo;
use std::path::{Path, PathBuf};

/// Candidate parent paths for a child at `child_path`, best first.
pub(crate) fn candidates(io: &dyn BlockIo, header: &DynHeader, child_path: &Path) -> Vec<PathBuf> {
    let dir = child_path.parent().unwrap_or(Path::new("."));
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    for code in [W2RU, W2KU] {
        for l in header.locators.iter().filter(|l| l.code == code) {
            // Locator data is a path: a few hundred bytes at most.
            let len = l.data_len.min(64 * 1024) as usize;
            let mut buf = vec![0u8; len];
            if io.read_at(&mut buf, l.data_offset).is_err() {
                continue;
            }
            let text = decode_locator(&buf);
            if text.is_empty() {
                continue;
            }
            let unix = text.replace('\\', "/");
            let has_drive = unix.len() >= 2 && unix.as_bytes()[1] == b':';
            if has_drive {
                if let Some(name) = unix.rsplit('/').next() {
                    push(dir.join(name));
                }
            } else if unix.starts_with('/') {
                push(PathBuf::from(unix));
            } else {
                push(dir.join(unix.trim_start_matches("./")));
            }
        }
    }
    if !header.parent_name.is_empty() {
        let unix = header.parent_name.replace('\\', "/");
        if let Some(name) = unix.rsplit('/').next() {
            push(dir.join(name));
        }
    }
    out
}

/// `target` relative to the directory `from`, Windows style (`.\a\b.vhd`,
/// `..\b.vhd`) as a `W2ru` locator stores it; `None` when there is no
/// relative path (different roots).
pub(crate) fn relative_windows_path(from_dir: &Path, target: &Path) -> Option<String> {
    let from: Vec<_> = from_dir.components().collect();
    let to: Vec<_> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    if common == from.len() {
        parts.push(".".into());
    }
    for _ in common..from.len() {
        parts.push("..".into());
    }
    for c in &to[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    Some(parts.join("\\"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_windows_style() {
        assert_eq!(
            relative_windows_path(Path::new("/v/vms"), Path::new("/v/vms/base.vhd")).unwrap(),
            ".\\base.vhd"
        );
        assert_eq!(
            relative_windows_path(Path::new("/v/vms/a"), Path::new("/v/base/b.vhd")).unwrap(),
            "..\\..\\base\\b.vhd"
        );
    }
}
